/**
 * Switchyard for Node.js and TypeScript: register Promise-returning handlers
 * with a durable worker host whose dispatch, batching, retries, leases and
 * workflow state live in the Rust core (loaded as a native addon).
 *
 * ```ts
 * import { Worker, Client } from "switchyard";
 * const worker = new Worker({ store: "sqlite:app.db" });
 * worker.step("greet", async (input, ctx) => {
 *   const name = await ctx.checkpoint("lookup", () => input.name);
 *   return { hello: name };
 * });
 * await worker.run(); // SIGINT / SIGTERM shut down gracefully
 * ```
 *
 * The JS thread is never blocked: every call that waits on the core returns
 * a Promise, and the core hands jobs to JS in batches through one
 * thread-safe function call per batch.
 */

import { types as utilTypes } from "node:util";
import { isMainThread } from "node:worker_threads";

// ---------------------------------------------------------------------------
// The native addon (bindings/node). Its shape, as used here.

interface NativeContext {
  readonly taskId: string;
  readonly stepId: string;
  readonly stepName: string;
  readonly handler: string;
  readonly attempt: number;
  readonly run: number;
  readonly priority: number;
  readonly headersJson: string;
  readonly timeLeft: number | null;
  readonly isCancelled: boolean;
  setStatus(status: string): string;
  checkpointLookup(name: string): Promise<string>;
  checkpointSave(key: string, value: string): Promise<string>;
  awaitEvent(name: string, timeoutSecs?: number | null): Promise<string>;
  sleep(seconds: number): Promise<string>;
  sleepUntil(atMs: number): Promise<string>;
  emitEvent(name: string, payload: string): Promise<string>;
  spawn(handler: string, input: string, responseEvent?: string | null): Promise<string>;
  delegate(handler: string, input: string): Promise<string>;
  delegateParallel(children: string): Promise<string>;
  heartbeat(): Promise<string>;
  dependencyResults(): Promise<string>;
}

interface NativeWorker {
  register(name: string, kind: string, options?: Record<string, unknown>): void;
  /** `dispatch` gets each batch as JSON text: a flat array `[jobId,
   * handlerIndex, input, ...]` (for batch handlers `input` is the array of
   * the items' inputs); handler indexes follow the `register` calls.
   * `cancel` gets the core's cancellation notices for jobs JS holds, never
   * before their job: a flat array `[jobId, reason, ...]`, `reason` being
   * "cancelled", "timeout" or "shutdown". A batch item asked to stop on
   * its own is named `[jobId, itemIndex]` in place of `jobId`. */
  start(dispatch: (batch: string) => void, cancel: (notices: string) => void): Promise<string>;
  /** The durable context of item `index` of job `jobId`, while it runs. */
  context(jobId: number, index: number): NativeContext;
  /** `outcomes`: JSON array, one entry per id (see `Outcome`). */
  complete(ids: number[], outcomes: string): void;
  /** Blocks until the steps JS holds are handed back (the environment is going away). */
  handBack(): void;
  shutdown(): void;
  stop(): Promise<void>;
  readonly hostId: string | null;
  readonly inFlight: number;
  readonly healthAddr: string | null;
  readonly running: boolean;
  readonly concurrency: number;
  readonly storeUrl: string;
}

interface NativeClient {
  readonly storeUrl: string;
  spawn(task: string): Promise<string>;
  spawnMany(tasks: string): Promise<string>;
  emit(name: string, payload: string): Promise<string>;
  get(id: string): Promise<string>;
  inspect(id: string): Promise<string>;
  list(state: string | null | undefined, handler: string | null | undefined, limit: number): Promise<string>;
  wait(id: string, timeoutSecs: number): Promise<string>;
  result(id: string, timeoutSecs: number): Promise<string>;
  awaitEvent(name: string, timeoutSecs: number): Promise<string>;
  cancel(id: string, cascade: boolean): Promise<string>;
  retry(id: string): Promise<string>;
  workers(): Promise<string>;
  events(limit: number, name: string | null): Promise<string>;
  countSteps(): Promise<string>;
}

interface NativeModule {
  NativeWorker: {
    new (store: string, options?: Record<string, unknown>): NativeWorker;
    /** Throws the configuration's error (naming the key and the file). */
    fromConfig(path?: string | null): NativeWorker;
  };
  NativeClient: { open(url: string, maxPayloadBytes?: number | null): Promise<NativeClient> };
  nativeVersion(): string;
  /** An envelope: the store URL checked without opening the store. */
  checkStoreUrl(url: string): string;
  /** An envelope of the core's plan. */
  fanOut(handler: string, total: number, batchSize: number, input: string, converge: string): string;
}

/**
 * The platforms an addon package is published for (napi-rs convention: one
 * package per platform, `@switchyard/<platform>`, with `os`, `cpu` and `libc`
 * fields, listed in this package's optionalDependencies so npm installs only
 * the one that matches).
 * @internal
 */
const PLATFORM_PACKAGES = ["linux-x64-gnu"];

/** linux-x64-gnu, linux-arm64-musl, darwin-arm64, win32-x64-msvc, ... */
function platformName(): string {
  const { platform, arch } = process;
  if (platform === "linux") {
    // glibc reports its version; musl (Alpine) does not.
    const report = process.report?.getReport?.() as { header?: { glibcVersionRuntime?: string } } | undefined;
    return `linux-${arch}-${report?.header?.glibcVersionRuntime ? "gnu" : "musl"}`;
  }
  if (platform === "win32") return `win32-${arch}-msvc`;
  return `${platform}-${arch}`;
}

function isMissing(e: unknown, what: string): boolean {
  const err = e as { code?: string; message?: string };
  return err.code === "MODULE_NOT_FOUND" && (err.message ?? "").includes(what);
}

/**
 * The addon from `@switchyard/<platform>`, or from `switchyard.<platform>.node`
 * next to this package (a local build); otherwise an error naming the platform.
 */
function loadNative(): NativeModule {
  const name = platformName();
  const pkg = `@switchyard/${name}`;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require(pkg) as NativeModule;
  } catch (e) {
    if (!isMissing(e, pkg)) throw e;
  }
  const local = `../switchyard.${name}.node`;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require(local) as NativeModule;
  } catch (e) {
    if (!isMissing(e, `switchyard.${name}.node`)) throw e;
  }
  const why = PLATFORM_PACKAGES.includes(name)
    ? `the package ${pkg} is not installed (npm skips optional dependencies with --omit=optional or ` +
      `when the lock file was made on another platform): install it, e.g. \`npm install ${pkg}\``
    : `switchyard publishes native addons for ${PLATFORM_PACKAGES.join(", ")} only`;
  throw new Error(`switchyard: no native addon for this platform (${name}): ${why}`);
}

const native: NativeModule = loadNative();

/** The version of the native core. */
export const nativeVersion: string = native.nativeVersion();

// ---------------------------------------------------------------------------
// Errors

/** Base class of every error switchyard throws. */
export class SwitchyardError extends Error {
  constructor(message?: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}
/** Thrown by a handler: the step fails and is never retried. */
export class PermanentError extends SwitchyardError {}
/** Thrown by a handler: the step is retried, after at least `retryAfter` seconds if given. */
export class RetryableError extends SwitchyardError {
  readonly retryAfter: number | undefined;
  constructor(message?: string, options?: { retryAfter?: number; cause?: unknown }) {
    super(message, options);
    this.retryAfter = options?.retryAfter;
  }
}
/** The input was rejected (by the core, or thrown by a handler): fails at once. */
export class InvalidInput extends SwitchyardError {}
/** A payload exceeded the configured size limit; nothing was stored. */
export class PayloadTooLarge extends InvalidInput {}
/** `ctx.awaitEvent` ran out of time (checkpointed: a replay throws it again). */
export class AwaitTimeoutError extends SwitchyardError {
  readonly event: string | undefined;
  constructor(message?: string, options?: { event?: string; cause?: unknown }) {
    super(message, options);
    this.event = options?.event;
  }
}
/** The task this step runs for was cancelled (thrown by a ctx call; the
 * step stops). `ctx.signal.reason` is one of these. */
export class CancelledError extends SwitchyardError {}
/** What a step recorded when it failed. */
export interface TaskError {
  kind: string;
  message: string;
  trace: string | null;
  attempt: number;
}
/** `client.result` (and everything that waits for a task's outcome): the
 * task failed. `kind`, `message`, `traceback` and `attempt` are what its
 * step recorded (`traceback`: the JS stack trace); `error` is all of it. */
export class TaskFailedError extends SwitchyardError {
  readonly taskId: string;
  readonly kind: string;
  readonly traceback: string | null;
  readonly attempt: number;
  readonly error: TaskError;
  constructor(message: string, options: { taskId: string; error: TaskError }) {
    super(message);
    this.taskId = options.taskId;
    this.error = options.error;
    this.kind = options.error.kind;
    this.traceback = options.error.trace;
    this.attempt = options.error.attempt;
  }
}
/** `client.result` (and everything that waits for a task's outcome): the
 * task was cancelled. */
export class TaskCancelledError extends SwitchyardError {
  readonly taskId: string;
  constructor(message: string, options: { taskId: string }) {
    super(message);
    this.taskId = options.taskId;
  }
}
/** A client wait (`result`, `wait`) ran out of time. */
export class WaitTimeoutError extends SwitchyardError {}
/** No task with that id exists. */
export class NotFound extends SwitchyardError {}
/** The operation does not fit the task's state (e.g. the result of a failed task). */
export class Conflict extends SwitchyardError {}
/** The step's lease was lost (cancelled or taken over by another host). */
export class LeaseLost extends SwitchyardError {}
/** Bad configuration (worker options, store URL). */
export class ConfigError extends SwitchyardError {}
/** The store failed (I/O, database). */
export class StoreError extends SwitchyardError {}
/** The host is shutting down. */
export class ShutdownError extends SwitchyardError {}

/** Thrown by `worker.api` handlers for a non-2xx answer: 429 is retried after
 * `retryAfter` seconds, other 4xx fail permanently, 5xx are retried. */
export class HttpError extends SwitchyardError {
  readonly status: number;
  readonly retryAfter: number | undefined;
  constructor(status: number, message = "", options?: { retryAfter?: number }) {
    super(`HTTP ${status}: ${message}`);
    this.status = status;
    this.retryAfter = options?.retryAfter;
  }
}
/** Thrown by `worker.api` handlers when a request got no answer (retried). */
export class NetworkError extends SwitchyardError {}

/** A durable operation suspended the step. Never catch it: let it propagate
 * (or rethrow it) so the step frees its slot and resumes by replay. It
 * carries nothing: the core keeps what the step waits for. */
class Suspension extends SwitchyardError {}

/** True for the internal error that suspends a step (rethrow it if you catch errors broadly). */
export function isSuspension(e: unknown): boolean {
  return e instanceof Suspension;
}

/** An envelope's error: `class` is the core's vocabulary name. */
interface ErrBody {
  class: string;
  message: string;
  task?: string | null;
  error?: { kind: string; message: string; trace?: string | null; attempt?: number } | null;
  event?: string | null;
}

/** The one map from the core's error classes to TypeScript errors. */
const CLASSES: Record<string, (e: ErrBody) => Error> = {
  PermanentError: (e) => new PermanentError(e.message),
  RetryableError: (e) => new RetryableError(e.message),
  InvalidInput: (e) => new InvalidInput(e.message),
  PayloadTooLarge: (e) => new PayloadTooLarge(e.message),
  AwaitTimeout: (e) => new AwaitTimeoutError(e.message, { event: e.event ?? undefined }),
  Cancelled: (e) => new CancelledError(e.message),
  LeaseLost: (e) => new LeaseLost(e.message),
  Suspend: (e) => new Suspension(e.message),
  TaskFailed: (e) =>
    new TaskFailedError(e.message, {
      taskId: e.task ?? "",
      error: {
        kind: e.error?.kind ?? "permanent",
        message: e.error?.message ?? e.message,
        trace: e.error?.trace ?? null,
        attempt: e.error?.attempt ?? 0,
      },
    }),
  TaskCancelled: (e) => new TaskCancelledError(e.message, { taskId: e.task ?? "" }),
  TimeoutError: (e) => new WaitTimeoutError(e.message),
  NotFound: (e) => new NotFound(e.message),
  Conflict: (e) => new Conflict(e.message),
  ConfigError: (e) => new ConfigError(e.message),
  StoreError: (e) => new StoreError(e.message),
  ShutdownError: (e) => new ShutdownError(e.message),
};

function toError(e: ErrBody): Error {
  const make = Object.hasOwn(CLASSES, e.class) ? CLASSES[e.class] : undefined;
  return make ? make(e) : new SwitchyardError(`${e.class}: ${e.message}`);
}

/** The core's class name of a TypeScript error (what a handler's outcome
 * carries); null for errors that are not the vocabulary's. */
function classOf(e: Error): string | null {
  if (e instanceof Suspension) return "Suspend";
  if (e instanceof CancelledError) return "Cancelled";
  if (e instanceof PayloadTooLarge) return "PayloadTooLarge";
  if (e instanceof InvalidInput) return "InvalidInput";
  if (e instanceof LeaseLost) return "LeaseLost";
  if (e instanceof AwaitTimeoutError) return "AwaitTimeout";
  if (e instanceof PermanentError) return "PermanentError";
  if (e instanceof RetryableError) return "RetryableError";
  return null;
}

function unwrap(text: string): any {
  const r = JSON.parse(text);
  if (r.err !== undefined) throw toError(r.err);
  return r.ok;
}

/** JSON text of `v` for the core; names `what` if it cannot be serialised. */
function toJson(v: unknown, what: string): string {
  let s: string | undefined;
  try {
    s = JSON.stringify(v === undefined ? null : v);
  } catch (e) {
    throw new InvalidInput(`${what} is not JSON-serialisable: ${(e as Error).message}`);
  }
  if (s === undefined) {
    throw new InvalidInput(`${what} is not JSON-serialisable (got ${typeof v})`);
  }
  return s;
}

function nonNeg(what: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
    throw new InvalidInput(`${what} must be a non-negative number of seconds, got ${String(v)}`);
  }
  return v;
}

function name(what: string, v: unknown): string {
  if (typeof v !== "string" || v.length === 0) {
    throw new InvalidInput(`${what} must be a non-empty string, got ${typeof v === "string" ? '""' : typeof v}`);
  }
  return v;
}

// Records come from the core with snake_case keys; user payloads inside
// them (input, result, payload, checkpoint values, headers) are left alone.
const OPAQUE = new Set(["input", "result", "payload", "value", "headers", "checkpoints", "output"]);

function camel(k: string): string {
  return k.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

function camelRecord(v: any): any {
  if (Array.isArray(v)) return v.map(camelRecord);
  if (v === null || typeof v !== "object") return v;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    if (k === "routes" && x !== null && typeof x === "object" && !Array.isArray(x)) {
      // A step's routes: the keys are statuses (data, kept as they are);
      // the routed steps are records like any other.
      out.routes = Object.fromEntries(Object.entries(x).map(([status, steps]) => [status, camelRecord(steps)]));
      continue;
    }
    out[camel(k)] = OPAQUE.has(k) ? x : camelRecord(x);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Context

/** The payload of a task's response event (`responseEvent` of a spawn),
 * emitted when the task finishes. Event payloads are data: the keys are
 * the stored ones. */
export interface ResponseEvent {
  task_id: string;
  state: "completed" | "failed" | "cancelled";
  /** The result (completed), else null. */
  result: unknown;
  /** `kind`, `message`, `trace`, `attempt` (failed or cancelled), else null. */
  error: { kind: string; message: string; trace?: string | null; attempt: number } | null;
}

/** A child task for `ctx.delegateParallel`. */
export interface Child {
  handler: string;
  input?: unknown;
}

/** One child's outcome from `ctx.delegateParallel`. */
export interface ChildOutcome {
  taskId: string;
  state: string;
  result?: unknown;
  error?: unknown;
}

/** Options of `ctx.awaitEvent`. */
export interface AwaitOptions {
  /** Seconds; afterwards `AwaitTimeoutError` is thrown (and checkpointed). */
  timeout?: number;
}

/** The message of `ctx.signal.reason` for each reason a notice gives. */
const REASONS: Record<string, string> = {
  cancelled: "the task was cancelled",
  timeout: "the handler's timeout passed",
  shutdown: "the worker shut down before the step finished",
};

/**
 * The durable context of one step run. Durable operations are keyed by name
 * and call order, so a replay (after a suspension, a retry or a crash) gets
 * the stored values back. Operations that suspend the step throw an internal
 * error that must propagate out of the handler.
 */
export class Context {
  readonly #worker: NativeWorker;
  readonly #job: number;
  readonly #index: number;
  #native: NativeContext | undefined;
  #abort: AbortController | undefined;
  /** Set by a cancellation notice that came before `signal` was asked for. */
  #reason: CancelledError | undefined;

  /** @internal */
  constructor(worker: NativeWorker, job: number, index: number) {
    this.#worker = worker;
    this.#job = job;
    this.#index = index;
  }
  // Asked for on first use: most handlers never touch their context, and a
  // native object per step would cost more than the step.
  get #n(): NativeContext {
    if (this.#native === undefined) {
      try {
        this.#native = this.#worker.context(this.#job, this.#index);
      } catch (e) {
        throw new SwitchyardError((e as Error).message);
      }
    }
    return this.#native;
  }
  /** The task id. */
  get taskId(): string {
    return this.#n.taskId;
  }
  /** The step id. */
  get stepId(): string {
    return this.#n.stepId;
  }
  /** The step's name. */
  get stepName(): string {
    return this.#n.stepName;
  }
  /** The handler's name. */
  get handler(): string {
    return this.#n.handler;
  }
  /** The attempt this run belongs to: 1 until a run fails; a resume after a
   * suspension continues the same attempt. */
  get attempt(): number {
    return this.#n.attempt;
  }
  /** This run's number: grows with every claim of the step (resumes
   * included) and is never reused. */
  get run(): number {
    return this.#n.run;
  }
  /** The task's priority. */
  get priority(): number {
    return this.#n.priority;
  }
  /** The task's headers. */
  get headers(): Record<string, string> {
    return JSON.parse(this.#n.headersJson);
  }
  /** Seconds left before the handler's timeout, or null. */
  get timeLeft(): number | null {
    return this.#n.timeLeft;
  }
  /** True once the task was cancelled. */
  get isCancelled(): boolean {
    return this.#n.isCancelled;
  }
  /** Ends this run with `status` when the handler returns a value: the
   * steps the decision routed from that status are created (see
   * `routes` in `step`) and the status is recorded with the step. Without
   * a call the status is `ok`; the last call wins. A status the step has
   * no route for fails the step; a status that is not a name throws
   * `InvalidInput`. */
  setStatus(status: string): void {
    unwrap(this.#n.setStatus(status));
  }
  /** Fired with a `CancelledError` reason when the core stops wanting this
   * run: the task was cancelled, the handler's timeout passed, or the worker
   * shut down before the run ended. Pass it to `fetch`, timers and the like.
   * For a batch handler each item's signal fires when its own run is asked
   * to stop (its task cancelled, say), the others running on. */
  get signal(): AbortSignal {
    if (this.#abort === undefined) {
      // Created on first use: a handler that never looks costs nothing.
      this.#abort = new AbortController();
      if (this.#reason !== undefined) this.#abort.abort(this.#reason);
    }
    return this.#abort.signal;
  }
  /** @internal The worker got the core's cancellation notice for this run's job. */
  _abort(why: string): void {
    if (this.#reason !== undefined) return;
    this.#reason = new CancelledError(REASONS[why] ?? REASONS.cancelled);
    this.#abort?.abort(this.#reason);
  }

  /** Runs `fn` once per task, ever: a replay returns the stored value. */
  async checkpoint<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
    const found = unwrap(await this.#n.checkpointLookup(name));
    if (found.found) return found.value as T;
    const v = await fn();
    unwrap(await this.#n.checkpointSave(found.key, toJson(v, `checkpoint \`${name}\` value`)));
    // What a replay would see: the JSON round trip of the value.
    return (v === undefined ? null : JSON.parse(JSON.stringify(v))) as T;
  }
  /** Waits for event `name`: its payload if it was emitted, else the step
   * suspends (freeing its slot) until it is. */
  async awaitEvent<T = unknown>(name: string, options: AwaitOptions = {}): Promise<T> {
    const t = options.timeout === undefined ? null : nonNeg("awaitEvent timeout", options.timeout);
    return unwrap(await this.#n.awaitEvent(name, t));
  }
  /** Durable sleep (survives restarts; the step suspends meanwhile). */
  async sleep(seconds: number): Promise<void> {
    unwrap(await this.#n.sleep(nonNeg("sleep", seconds)));
  }
  /** Durable sleep until a time (a `Date` or milliseconds since the epoch). */
  async sleepUntil(at: Date | number): Promise<void> {
    const ms = at instanceof Date ? at.getTime() : at;
    if (typeof ms !== "number" || !Number.isFinite(ms)) {
      throw new InvalidInput(`sleepUntil needs a Date or milliseconds since the epoch, got ${String(at)}`);
    }
    unwrap(await this.#n.sleepUntil(Math.floor(ms)));
  }
  /** Emits an event (first write wins); true if this call stored it. */
  async emitEvent(name: string, payload: unknown = null): Promise<boolean> {
    return unwrap(await this.#n.emitEvent(name, toJson(payload, "event payload")));
  }
  /** Alias of `emitEvent`. */
  emit(name: string, payload: unknown = null): Promise<boolean> {
    return this.emitEvent(name, payload);
  }
  /** Spawns a child task the step does not wait for; returns its id. */
  async spawn(handler: string, input: unknown = null, options: { responseEvent?: string } = {}): Promise<string> {
    return unwrap(await this.#n.spawn(handler, toJson(input, "child input"), options.responseEvent ?? null));
  }
  /** Runs a child task and returns its result (the step suspends meanwhile);
   * a failed child fails this step permanently. */
  async delegate<T = unknown>(handler: string, input: unknown = null): Promise<T> {
    return unwrap(await this.#n.delegate(handler, toJson(input, "child input")));
  }
  /** Runs child tasks in parallel and returns one outcome per child, in order
   * (failures are reported per child). */
  async delegateParallel(children: Array<Child | [string, unknown]>): Promise<ChildOutcome[]> {
    // The core parses the children and names a bad one.
    return camelRecord(unwrap(await this.#n.delegateParallel(toJson(children, "delegateParallel children"))));
  }
  /** Extends the lease for long work. */
  async heartbeat(): Promise<void> {
    unwrap(await this.#n.heartbeat());
  }
  /** Results of the steps this step depends on, by step name (convergence steps). */
  async dependencyResults(): Promise<Record<string, unknown>> {
    return unwrap(await this.#n.dependencyResults());
  }
}

// ---------------------------------------------------------------------------
// Decisions

/** A step planned by a decision handler. */
export interface PlannedStep {
  name: string;
  handler: string;
  input: unknown;
  dependsOn: string[];
  /** Routing on the step's status: when it completes with status `S`
   * (`ctx.setStatus(S)`; `ok` when it sets none), the steps under `S` are
   * created; a routed step with no `dependsOn` depends on this step. A
   * status with no route fails the step. */
  routes?: Record<string, PlannedStep[]>;
}

/** A step for `Decision.create`: `handler` defaults to `name`. */
export function step(
  name: string,
  options: { handler?: string; input?: unknown; dependsOn?: string[]; routes?: Record<string, PlannedStep[]> } = {},
): PlannedStep {
  const s: PlannedStep = {
    name,
    handler: options.handler ?? name,
    input: options.input ?? null,
    dependsOn: options.dependsOn ?? [],
  };
  if (options.routes !== undefined) s.routes = options.routes;
  return s;
}

/** A planned step in the core's JSON shape (`depends_on`, routes
 * recursively). */
function plannedJson(s: PlannedStep): Record<string, unknown> {
  const out: Record<string, unknown> = { name: s.name, handler: s.handler, input: s.input ?? null, depends_on: s.dependsOn ?? [] };
  if (s.routes !== undefined && s.routes !== null) {
    const routes: Record<string, unknown> = {};
    for (const [status, steps] of Object.entries(s.routes)) {
      routes[status] = Array.isArray(steps) ? steps.map(plannedJson) : steps;
    }
    out.routes = routes;
  }
  return out;
}

/** What a `worker.decision` handler returns: steps to create (with
 * dependencies by name), or `Decision.complete(value)`. */
export class Decision {
  private constructor(
    readonly steps: PlannedStep[],
    readonly finalStep: string | null,
    readonly value: unknown,
    readonly done: boolean,
  ) {}
  /** Finish the step with `value`. */
  static complete(value: unknown = null): Decision {
    return new Decision([], null, value, true);
  }
  /** Create `steps`; the step completes with `finalStep`'s result. */
  static create(steps: PlannedStep[], finalStep: string | null = null): Decision {
    return new Decision(steps, finalStep, null, false);
  }
  /** Splits `total` items into cursor ranges run as parallel `handler`
   * steps, then a `converge` step that receives their results. */
  static fanOut(handler: string, total: number, batchSize: number, input: unknown = null, converge = "converge"): Decision {
    const plan = unwrap(native.fanOut(handler, total, batchSize, toJson(input, "fanOut input"), converge));
    if (plan.complete !== undefined) return Decision.complete(plan.complete);
    const steps = (plan.steps as any[]).map((s) => ({
      name: s.name,
      handler: s.handler,
      input: s.input,
      dependsOn: s.depends_on ?? [],
    }));
    return Decision.create(steps, plan.final_step ?? null);
  }
}

// ---------------------------------------------------------------------------
// Worker

type HandlerKind = "step" | "batch" | "decision" | "api";

/** Retry policy: exponential backoff with jitter up to `maxAttempts`. */
export interface Retry {
  maxAttempts?: number;
  /** Seconds. */
  initialBackoff?: number;
  /** Seconds. */
  maxBackoff?: number;
}

/** Options of every handler. */
export interface HandlerOptions {
  /** Steps of this handler in flight at once (default: the worker's). */
  concurrency?: number;
  /** Seconds; the core fails (and retries) a run that takes longer. */
  timeout?: number;
  /** A number of attempts, or a policy. */
  retry?: number | Retry;
}
/** Options of `worker.batch`. */
export interface BatchOptions extends HandlerOptions {
  /** Steps per call (default 64). */
  maxBatch?: number;
  /** Seconds to wait to fill a batch (default 0.005). */
  linger?: number;
}
/** Options of `worker.api`. */
export interface ApiOptions extends HandlerOptions {
  /** Starts per second. */
  rateLimit?: number;
  burst?: number;
}

/** A value or a Promise of it. */
export type Awaitable<T> = T | Promise<T>;
/** A plain or API handler. */
export type StepHandler<I = any, O = unknown> = (input: I, ctx: Context) => Awaitable<O>;
/** One step of a batch. */
export interface BatchItem<I = any> {
  input: I;
  ctx: Context;
}
/** A batch handler: one result (or `Error`) per item, in order. */
export type BatchHandler<I = any, O = unknown> = (items: BatchItem<I>[]) => Awaitable<Array<O | Error>>;
/** A decision handler. */
export type DecisionHandler<I = any> = (input: I, ctx: Context) => Awaitable<Decision>;

/** Options of `new Worker`. */
export interface WorkerOptions {
  /** Store URL: `sqlite:path.db`, `postgres://...` or `memory`
   * (default: `$SWITCHYARD_STORE`, else `sqlite:switchyard.db`). */
  store?: string;
  /** Steps in flight at once for the whole worker (default 64). */
  concurrency?: number;
  /** Lease length in seconds (default 30). */
  lease?: number;
  /** Seconds running steps get to finish on shutdown (default 10). */
  shutdownGrace?: number;
  /** Largest input, result or checkpoint in bytes. */
  maxPayloadBytes?: number;
  /** Serve `/healthz`, `/readyz` and `/metrics` on this address, e.g.
   * `"127.0.0.1:9464"` (port 0 picks a free one: see `healthAddr`). Off by
   * default. */
  healthListen?: string;
  /** Shut down gracefully on SIGINT/SIGTERM while `run()` waits (default true). */
  handleSignals?: boolean;
}

/** The store URL from `SWITCHYARD_STORE`, or `sqlite:switchyard.db`. */
export function defaultStore(): string {
  return process.env.SWITCHYARD_STORE || "sqlite:switchyard.db";
}

interface Registered {
  name: string;
  kind: HandlerKind;
  fn: (...args: any[]) => unknown;
}

// What a finished step answers, as the native addon reads it (the table is
// in bindings/node/src/worker.rs, `decode`; each kind is one of the core's
// `Reply` constructors): an array whose first element is the kind of
// outcome. A batch job answers an array of these.
const VALUE = 0;
const ERROR = 1;
const COMPLETE = 3;
const DECIDE = 4;
const HTTP = 5;
const NETWORK = 6;
const UNREPRESENTABLE = 7;
type Outcome = unknown[];

/** An error of the core's class `cls` (e.g. "RetryableError"): the core
 * decides what it means. */
function failure(cls: string, message: string, trace: string | null = null, retryAfter: number | null = null): Outcome {
  return [ERROR, cls, message, trace, retryAfter];
}

/** `v` as text for a message, never throwing: a value that cannot be
 * rendered (a Proxy, a throwing `toString`) becomes `<unrenderable NOUN: type>`. */
function render(v: unknown, noun: string): string {
  if (typeof v === "string") return JSON.stringify(v);
  if (v === null || (typeof v !== "object" && typeof v !== "function")) return String(v);
  // Nothing may touch a Proxy: any of its traps can throw.
  if (utilTypes.isProxy(v)) return `<unrenderable ${noun}: Proxy>`;
  try {
    const s = String(v);
    if (typeof s === "string") return s;
  } catch {
    // below
  }
  let tag: string = typeof v;
  try {
    tag = Object.prototype.toString.call(v).slice(8, -1);
  } catch {
    // a throwing Symbol.toStringTag getter
  }
  return `<unrenderable ${noun}: ${tag}>`;
}

/** `o[key]` as text (rendered if it is not a string), or `fallback` when it
 * is undefined or reading it throws. */
function textOf(o: unknown, key: string, fallback: string): string {
  let v: unknown;
  try {
    v = (o as any)[key];
  } catch {
    return fallback;
  }
  if (typeof v === "string") return v;
  return v === undefined ? fallback : render(v, key);
}

/** `o[key]` if it is a finite number, else null (also when reading it throws). */
function numberOf(o: unknown, key: string): number | null {
  try {
    const v = (o as any)[key];
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  } catch {
    return null;
  }
}

function stackOf(e: unknown): string | null {
  const s = textOf(e, "stack", "");
  return s === "" ? null : s;
}

/** What a thrown (or rejected) `e` fails its step with. Never throws:
 * whatever `e` is, only its own step fails. */
function errorOutcome(e: unknown, handler: string): Outcome {
  try {
    return classify(e, handler);
  } catch {
    // Looking at `e` threw (a Proxy trap, a getter).
    return failure(
      "RetryableError",
      `handler \`${handler}\` threw (or rejected with) ${render(e, "rejection")}; throw an Error to get a stack trace`,
    );
  }
}

function classify(e: unknown, handler: string): Outcome {
  if (e !== null && (typeof e === "object" || typeof e === "function") && utilTypes.isProxy(e)) {
    return failure(
      "RetryableError",
      `handler \`${handler}\` threw (or rejected with) a non-Error value: ${render(e, "rejection")}; throw an Error to get a stack trace`,
    );
  }
  const message = (fallback: string) => textOf(e, "message", fallback);
  if (e instanceof HttpError) return [HTTP, numberOf(e, "status"), numberOf(e, "retryAfter"), message("<unrenderable message>")];
  if (e instanceof NetworkError) return [NETWORK, message("<unrenderable message>")];
  // An abort (ctx.signal passed to fetch, timers...) stops the step like a cancellation.
  const cls = e instanceof Error ? (classOf(e) ?? (textOf(e, "name", "") === "AbortError" ? "Cancelled" : null)) : null;
  if (cls !== null) {
    // An await timeout that escapes the handler is final (the core decides);
    // a message-less error is named by its class.
    const name = textOf(e, "name", cls);
    return failure(cls, message("") || name, stackOf(e), cls === "RetryableError" ? numberOf(e, "retryAfter") : null);
  }
  if (e instanceof Error) {
    return failure("RetryableError", `${textOf(e, "name", "Error")}: ${message("<unrenderable message>")}`, stackOf(e));
  }
  return failure(
    "RetryableError",
    `handler \`${handler}\` threw (or rejected with) a non-Error value: ${render(e, "rejection")}; throw an Error to get a stack trace`,
  );
}

/** Why JSON cannot represent a value faithfully: what it is, where (a path
 * from the value's root, built on the way out) and what to do instead. */
interface NotJson {
  what: string;
  hint: string;
  path: string[];
}

/** `toJSON` was found: check the value again while serialising it. */
const HAS_TO_JSON = Symbol("toJSON");

function notJson(what: string, hint: string): NotJson {
  return { what, hint, path: [] };
}

/** What JSON would silently turn into something else, or drop: a BigInt (it
 * throws), a symbol, a function, NaN or ±Infinity, a Map, a Set and other
 * objects whose contents are not properties. `undefined` is allowed: an
 * absent result is null, an absent field is left out. Null when `v` itself
 * is fine (its contents are checked by the caller). */
function problemOf(v: unknown): NotJson | null {
  switch (typeof v) {
    case "string":
    case "boolean":
    case "undefined":
      return null;
    case "number":
      return Number.isFinite(v) ? null : notJson(String(v), "JSON has no NaN or Infinity; return null or a string instead");
    case "bigint":
      return notJson("a BigInt", "convert it (e.g. String(n), or Number(n) if it is small enough)");
    case "symbol":
      return notJson("a Symbol", "JSON drops symbols; return a string instead");
    case "function":
      return notJson("a function", "JSON drops functions; return data instead");
  }
  if (v === null) return null;
  if (utilTypes.isMap(v)) return notJson("a Map", "convert it (e.g. Object.fromEntries(map))");
  if (utilTypes.isSet(v)) return notJson("a Set", "convert it (e.g. [...set])");
  if (utilTypes.isWeakMap(v) || utilTypes.isWeakSet(v)) return notJson("a WeakMap or WeakSet", "return data instead");
  if (utilTypes.isPromise(v)) return notJson("a Promise", "await it first");
  if (utilTypes.isRegExp(v)) return notJson("a RegExp", "convert it (e.g. re.source)");
  if (utilTypes.isAnyArrayBuffer(v) || (utilTypes.isArrayBufferView(v) && typeof (v as any).toJSON !== "function")) {
    return notJson("binary data (an ArrayBuffer or typed array)", "convert it (e.g. Array.from(bytes), or base64)");
  }
  return null;
}

/** True for the values JSON represents as they are (the common case, checked inline). */
function plainLeaf(v: unknown): boolean {
  return typeof v === "string" || typeof v === "boolean" || v === null || (typeof v === "number" && Number.isFinite(v));
}

/** The first part of `v` JSON cannot represent, `HAS_TO_JSON` if a
 * `toJSON` method is in the way, or null. `seen` holds the objects on the
 * path from the root (a circular structure refers back to one). */
function findNotJson(v: unknown, seen: object[]): NotJson | typeof HAS_TO_JSON | null {
  if (v === null || typeof v !== "object") return problemOf(v);
  const o = v as Record<string, unknown>;
  const proto = Object.getPrototypeOf(o);
  // Plain objects and arrays (nearly every result) skip the type checks.
  if (proto !== Object.prototype && proto !== null && !Array.isArray(o)) {
    const p = problemOf(o);
    if (p !== null) return p;
    if (o instanceof Date) {
      return Number.isNaN(o.getTime()) ? notJson("an invalid Date", "return null or a valid Date instead") : null;
    }
  }
  if (typeof o.toJSON === "function") return HAS_TO_JSON;
  if (seen.includes(o)) return notJson("a circular structure (a value that contains itself)", "return a tree of plain values");
  seen.push(o);
  if (Array.isArray(o)) {
    for (let i = 0; i < o.length; i++) {
      if (plainLeaf(o[i])) continue;
      const q = findNotJson(o[i], seen);
      if (q === HAS_TO_JSON) return q;
      if (q !== null) {
        q.path.push(`[${i}]`);
        return q;
      }
    }
  } else {
    for (const k of Object.keys(o)) {
      if (plainLeaf(o[k])) continue;
      const q = findNotJson(o[k], seen);
      if (q === HAS_TO_JSON) return q;
      if (q !== null) {
        q.path.push(/^[A-Za-z_$][\w$]*$/.test(k) ? `.${k}` : `[${JSON.stringify(k)}]`);
        return q;
      }
    }
  }
  seen.pop();
  return null;
}

class NotJsonError extends Error {
  constructor(readonly problem: NotJson) {
    super(problem.what);
  }
}

/** JSON text of a handler's result. Throws `NotJsonError` for a part JSON
 * cannot represent faithfully (see `problemOf`), or what serialising threw. */
function resultJson(v: unknown): string {
  const found = findNotJson(v, []);
  if (found === null) return JSON.stringify(v) ?? "null";
  if (found !== HAS_TO_JSON) throw new NotJsonError(found);
  // `toJSON` runs once, inside JSON.stringify: check what it produced there.
  return (
    JSON.stringify(v, function (this: any, key: string, value: unknown) {
      const p = problemOf(value);
      if (p !== null) {
        if (key !== "") p.path.push(Array.isArray(this) ? `[${key}]` : `.${key}`);
        throw new NotJsonError(p);
      }
      return value;
    }) ?? "null"
  );
}

/** The failure for a result of handler `handler` that `resultJson` refused. */
function notJsonOutcome(e: unknown, handler: string): Outcome {
  try {
    return describeNotJson(e, handler);
  } catch {
    return failure("PermanentError", `handler \`${handler}\` returned a value that is not JSON-serialisable`);
  }
}

function describeNotJson(e: unknown, handler: string): Outcome {
  const proxy = e !== null && (typeof e === "object" || typeof e === "function") && utilTypes.isProxy(e);
  if (!proxy && e instanceof NotJsonError) {
    const { what, hint, path } = e.problem;
    const at = path.length > 0 ? ` at ${path.reverse().join("")}` : "";
    return [UNREPRESENTABLE, `${what}${at} [${hint}]`];
  }
  let why: string;
  if (!proxy && e instanceof Error) {
    why = `${textOf(e, "name", "Error")}: ${textOf(e, "message", "<unrenderable message>")}`;
  } else {
    why = render(e, "exception");
  }
  return failure(
    "PermanentError",
    `handler \`${handler}\` returned a value that is not JSON-serialisable: converting it to JSON (its toJSON or a getter) threw ${why}`,
  );
}

/** The JSON text of a successful outcome of handler `h`; a result JSON
 * cannot represent fails the step permanently instead. */
function okText(h: Registered, v: unknown): string {
  try {
    if (h.kind === "decision") {
      if (!(v instanceof Decision)) {
        return JSON.stringify(
          failure(
            "PermanentError",
            `decision handler \`${h.name}\` returned ${v === null ? "null" : typeof v}, not a Decision (use Decision.create or Decision.complete)`,
          ),
        );
      }
      if (v.done) return `[${COMPLETE},${resultJson(v.value ?? null)}]`;
      const steps = v.steps.map(plannedJson);
      return `[${DECIDE},${resultJson(steps)},${JSON.stringify(v.finalStep ?? null)}]`;
    }
    return `[${VALUE},${resultJson(v)}]`;
  } catch (e) {
    return JSON.stringify(notJsonOutcome(e, h.name));
  }
}

/** The JSON text of an error outcome; never throws. */
function errorText(e: unknown, h: Registered): string {
  try {
    return JSON.stringify(errorOutcome(e, h.name));
  } catch {
    return lastResort(h);
  }
}

/** For an outcome that could not be made at all (never expected). */
function lastResort(h: Registered): string {
  return JSON.stringify(failure("PermanentError", `handler \`${h.name}\`: its outcome could not be turned into JSON`));
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return v !== null && (typeof v === "object" || typeof v === "function") && typeof (v as any).then === "function";
}

/** Set by `Worker.fromConfig` for the constructor it calls. */
let adopted: NativeWorker | undefined;

/**
 * A host for JS handlers. Register handlers, then `await worker.run()`
 * (until SIGINT/SIGTERM or `stop()`), or `await worker.start()` and later
 * `await worker.stop()` (`close()` is an alias).
 */
export class Worker {
  /** The store URL. */
  readonly store: string;
  readonly #native: NativeWorker;
  readonly #handlers = new Map<string, Registered>();
  /** In registration order: the native side names handlers by index. */
  readonly #byIndex: Registered[] = [];
  readonly #handleSignals: boolean;
  #state: "new" | "starting" | "running" | "closing" | "closed" = "new";
  #closed: Promise<void> | undefined;
  #starting: Promise<string> | undefined;
  #closedResolve: (() => void) | undefined;
  /** The process exits while this worker runs: answers already made go
   * back, then the steps still running are handed back (blocking). */
  readonly #leave = (): void => {
    this.#flush();
    this.#native.handBack();
  };
  /** The contexts of the jobs JS runs, by job id, for the core's
   * cancellation notices (an array for a batch job). */
  readonly #live = new Map<number, Context | Context[]>();
  #doneIds: number[] = [];
  /** The JSON text of each answer (see `Outcome`). */
  #doneTexts: string[] = [];
  #flushScheduled = false;

  constructor(options: WorkerOptions = {}) {
    if (options === null || typeof options !== "object") {
      throw new InvalidInput("new Worker(options): options must be an object like { store: 'sqlite:app.db' }");
    }
    if (adopted !== undefined) {
      // Worker.fromConfig: the native worker is built from the configuration.
      this.#native = adopted;
      adopted = undefined;
      this.store = this.#native.storeUrl;
      this.#handleSignals = options.handleSignals ?? true;
      return;
    }
    this.store = options.store ?? defaultStore();
    if (typeof this.store !== "string") throw new InvalidInput("store must be a URL string");
    // A store URL that cannot work fails here (ConfigError), not at start.
    unwrap(native.checkStoreUrl(this.store));
    if (options.concurrency !== undefined && !(Number.isInteger(options.concurrency) && options.concurrency >= 1)) {
      throw new InvalidInput(`concurrency must be a positive integer, got ${String(options.concurrency)}`);
    }
    const o: Record<string, unknown> = { concurrency: options.concurrency };
    if (options.lease !== undefined) o.lease = nonNeg("lease", options.lease);
    if (options.shutdownGrace !== undefined) o.shutdownGrace = nonNeg("shutdownGrace", options.shutdownGrace);
    if (options.maxPayloadBytes !== undefined) o.maxPayloadBytes = options.maxPayloadBytes;
    if (options.healthListen !== undefined) o.healthListen = options.healthListen;
    this.#handleSignals = options.handleSignals ?? true;
    try {
      this.#native = new native.NativeWorker(this.store, o);
    } catch (e) {
      throw new InvalidInput((e as Error).message);
    }
  }

  /**
   * A worker from the configuration (the same `switchyard.toml` the CLI and
   * every binding read): the file at `path`, else `SWITCHYARD_CONFIG`, else
   * none, then the `SWITCHYARD_*` environment overrides. Uses its store
   * (`store.url`) and `[host]` settings (`name`, `concurrency`, `lease`,
   * `heartbeat`, `shutdown_grace`, `health_listen`). Throws `ConfigError`
   * (as Python and Ruby do) naming the key and the file or environment
   * variable for an unknown key, a value of the wrong type or one that
   * cannot work. `store` is the configured URL (with its password, if any:
   * never print it).
   */
  static fromConfig(path?: string, options: { handleSignals?: boolean } = {}): Worker {
    if (path !== undefined && path !== null && typeof path !== "string") {
      throw new InvalidInput(`Worker.fromConfig(path): path must be a string, got ${typeof path}`);
    }
    let n: NativeWorker;
    try {
      n = native.NativeWorker.fromConfig(path ?? null);
    } catch (e) {
      // As in every binding: the core's class for configuration errors.
      throw new ConfigError((e as Error).message);
    }
    adopted = n;
    try {
      return new Worker({ handleSignals: options?.handleSignals });
    } finally {
      adopted = undefined;
    }
  }

  /** Steps run at once by the host. */
  get concurrency(): number {
    return this.#native.concurrency;
  }

  #register(name: string, kind: HandlerKind, fn: unknown, options: Record<string, any> | undefined): this {
    if (typeof name !== "string" || name.length === 0) {
      throw new InvalidInput(`worker.${kind}(name, handler): name must be a non-empty string`);
    }
    if (typeof fn !== "function") {
      throw new InvalidInput(`worker.${kind}("${name}", handler): handler must be a function, got ${typeof fn}`);
    }
    if (this.#state !== "new") throw new SwitchyardError("register handlers before the worker starts");
    const o = { ...(options ?? {}) };
    const retry = o.retry;
    delete o.retry;
    if (typeof retry === "number") o.maxAttempts = retry;
    else if (retry !== undefined && retry !== null) Object.assign(o, retry);
    for (const k of ["timeout", "initialBackoff", "maxBackoff", "linger"]) {
      if (o[k] !== undefined) nonNeg(`handler \`${name}\`: ${k}`, o[k]);
    }
    try {
      this.#native.register(name, kind, o);
    } catch (e) {
      throw new InvalidInput((e as Error).message);
    }
    const reg: Registered = { name, kind, fn: fn as Registered["fn"] };
    this.#handlers.set(name, reg);
    this.#byIndex.push(reg);
    return this;
  }

  /** Registers a plain handler `(input, ctx) => result | Promise<result>`. */
  step<I = any, O = unknown>(name: string, handler: StepHandler<I, O>, options?: HandlerOptions): this {
    return this.#register(name, "step", handler, options);
  }
  /** Registers a batch handler `(items) => results` (one result or Error per item). */
  batch<I = any, O = unknown>(name: string, handler: BatchHandler<I, O>, options?: BatchOptions): this {
    return this.#register(name, "batch", handler, options);
  }
  /** Registers a decision handler `(input, ctx) => Decision`. */
  decision<I = any>(name: string, handler: DecisionHandler<I>, options?: HandlerOptions): this {
    return this.#register(name, "decision", handler, options);
  }
  /** Registers an API-shaped handler; throw `HttpError` or `NetworkError` for failures. */
  api<I = any, O = unknown>(name: string, handler: StepHandler<I, O>, options?: ApiOptions): this {
    return this.#register(name, "api", handler, options);
  }

  /** The host id once started. */
  get hostId(): string | null {
    return this.#native.hostId;
  }
  /** Where `/healthz`, `/readyz` and `/metrics` are served once started
   * with `healthListen` (`"127.0.0.1:41234"`), else null. */
  get healthAddr(): string | null {
    return this.#native.healthAddr ?? null;
  }
  /** Steps running in this host now. */
  get inFlight(): number {
    return this.#native.inFlight;
  }

  /** Starts serving and resolves once the host is running. */
  async start(): Promise<void> {
    if (this.#state === "closed") throw new SwitchyardError("the worker was closed: create a new Worker");
    if (this.#state !== "new") throw new SwitchyardError("the worker was already started");
    if (this.#handlers.size === 0) throw new SwitchyardError("register at least one handler before starting the worker");
    this.#state = "starting";
    this.#closed = new Promise((r) => (this.#closedResolve = r));
    try {
      this.#starting = this.#native.start(
        (jobs) => this.#dispatch(jobs),
        (notices) => this.#cancel(notices),
      );
      unwrap(await this.#starting);
    } catch (e) {
      this.#state = "closed";
      this.#closedResolve?.();
      throw e;
    }
    this.#state = "running";
    watchExit(this.#leave);
  }

  /** Graceful shutdown: no more claims; running steps get the grace period,
   * then are handed back. Afterwards nothing keeps the event loop alive. */
  async stop(): Promise<void> {
    if (this.#state === "new") {
      this.#state = "closed";
      return;
    }
    if (this.#state === "closing" || this.#state === "closed") return this.#closed;
    if (this.#state === "starting") {
      // Let the host finish starting, then stop it.
      await this.#starting?.catch(() => undefined);
      if ((this.#state as string) !== "running") return this.#closed;
    }
    this.#state = "closing";
    try {
      await this.#native.stop();
      this.#flush();
    } finally {
      live.delete(this.#leave);
      this.#state = "closed";
      this.#closedResolve?.();
    }
  }

  /** Alias of `stop()`. */
  close(): Promise<void> {
    return this.stop();
  }

  /** Serves until `stop()` is called or SIGINT/SIGTERM arrives (then shuts
   * down gracefully). On a worker thread no signal handlers are installed. */
  async run(): Promise<void> {
    if (this.#state === "new") await this.start();
    const signals = this.#handleSignals && isMainThread;
    const onSignal = (signal: string) => {
      // A second signal while draining gets Node's default action (exit).
      this.stop().catch((e) => process.emitWarning(`switchyard: shutdown after ${signal} failed: ${String(e)}`));
    };
    if (signals) {
      process.once("SIGINT", onSignal);
      process.once("SIGTERM", onSignal);
    }
    try {
      await this.#closed;
    } finally {
      if (signals) {
        process.removeListener("SIGINT", onSignal);
        process.removeListener("SIGTERM", onSignal);
      }
    }
  }

  /** Called by the core (through a thread-safe function) with a batch of
   * jobs: starts every handler at once; answers arrive through `#finish`.
   * Never throws: whatever one handler does fails only its own step. */
  #dispatch(batch: string): void {
    const jobs: unknown[] = JSON.parse(batch);
    for (let i = 0; i < jobs.length; i += 3) {
      const id = jobs[i] as number;
      const h = this.#byIndex[jobs[i + 1] as number];
      if (h.kind === "batch") {
        void this.#runBatch(id, h, jobs[i + 2] as unknown[]);
        continue;
      }
      let r: unknown;
      const ctx = new Context(this.#native, id, 0);
      this.#live.set(id, ctx);
      try {
        r = h.fn(jobs[i + 2], ctx);
      } catch (e) {
        this.#finish(id, errorText(e, h));
        continue;
      }
      let thenable: boolean;
      try {
        thenable = isThenable(r);
      } catch {
        // Its `then` cannot even be read: a hostile value, reported by okText.
        thenable = false;
      }
      if (thenable) {
        let p: Promise<unknown>;
        try {
          // One reaction per step; a foreign thenable is adopted first.
          p = r instanceof Promise ? r : Promise.resolve(r);
        } catch (e) {
          this.#finish(id, errorText(e, h));
          continue;
        }
        // Neither reaction throws (okText and errorText never do).
        p.then(
          (v) => this.#finish(id, okText(h, v)),
          (e) => this.#finish(id, errorText(e, h)),
        );
        continue;
      }
      this.#finish(id, okText(h, r));
    }
  }

  async #runBatch(id: number, h: Registered, inputs: unknown[]): Promise<void> {
    const items = inputs.map((input, i) => ({ input, ctx: new Context(this.#native, id, i) }));
    this.#live.set(id, items.map((i) => i.ctx));
    const all = (text: string) => `[${items.map(() => text).join(",")}]`;
    let results: unknown;
    try {
      results = await h.fn(items);
    } catch (e) {
      return this.#finish(id, all(errorText(e, h)));
    }
    let texts: string[];
    try {
      if (!Array.isArray(results) || results.length !== items.length) {
        const got = Array.isArray(results) ? `${results.length} results` : typeof results;
        const o = failure("PermanentError", `batch handler \`${h.name}\` returned ${got} for ${items.length} steps`);
        return this.#finish(id, all(JSON.stringify(o)));
      }
      texts = results.map((r: unknown) => {
        let isError: boolean;
        try {
          isError = r instanceof Error;
        } catch {
          return errorText(r, h);
        }
        return isError ? errorText(r, h) : okText(h, r);
      });
    } catch (e) {
      return this.#finish(id, all(errorText(e, h)));
    }
    this.#finish(id, `[${texts.join(",")}]`);
  }

  /** Called by the core with its cancellation notices: the runs of these
   * jobs were all asked to stop, so their contexts' signals fire; a notice
   * naming `[jobId, index]` is for one item of a batch job. A notice
   * always comes after its job's dispatch; one for a job already finished
   * is ignored. */
  #cancel(notices: string): void {
    const n: unknown[] = JSON.parse(notices);
    for (let i = 0; i < n.length; i += 2) {
      const key = n[i];
      const why = n[i + 1] as string;
      if (Array.isArray(key)) {
        const ctx = this.#live.get(key[0] as number);
        if (Array.isArray(ctx)) ctx[key[1] as number]?._abort(why);
        continue;
      }
      const ctx = this.#live.get(key as number);
      if (ctx === undefined) continue;
      if (Array.isArray(ctx)) for (const c of ctx) c._abort(why);
      else ctx._abort(why);
    }
  }

  #finish(id: number, text: string): void {
    this.#live.delete(id);
    this.#doneIds.push(id);
    this.#doneTexts.push(text);
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      // Answers finished in the same turn of the event loop go back in one call.
      setImmediate(() => this.#flush());
    }
  }

  #flush(): void {
    this.#flushScheduled = false;
    if (this.#doneIds.length === 0) return;
    const ids = this.#doneIds;
    const text = `[${this.#doneTexts.join(",")}]`;
    this.#doneIds = [];
    this.#doneTexts = [];
    this.#native.complete(ids, text);
  }
}

/** What each running worker does when the process exits under it: Node
 * runs no cleanup hooks on `process.exit()` (a terminated worker thread
 * gets the native side's cleanup hook instead). */
const live = new Set<() => void>();
let exitListener = false;

function watchExit(leave: () => void): void {
  live.add(leave);
  if (exitListener) return;
  exitListener = true;
  process.on("exit", () => {
    for (const leave of live) leave();
    live.clear();
  });
}

// ---------------------------------------------------------------------------
// Client

/** Options of `client.spawn`. */
export interface SpawnOptions {
  /** Higher runs first. */
  priority?: number;
  /** Spawning twice with the same key returns the first task. */
  idempotencyKey?: string;
  /** An event emitted with the outcome when the task finishes. */
  responseEvent?: string;
  /** Headers visible to every step. */
  headers?: Record<string, string>;
  /** Do not start before this time. */
  runAt?: Date | number;
}

/** A task for `client.spawnMany`. */
export interface TaskSpec extends SpawnOptions {
  handler: string;
  input?: unknown;
}

/** Options of `new Client`. */
export interface ClientOptions {
  /** Store URL (default: `$SWITCHYARD_STORE`, else `sqlite:switchyard.db`). */
  store?: string;
  /** Largest input or payload in bytes. */
  maxPayloadBytes?: number;
}

/** The core's key for each option; any other key goes to the core as it
 * is, which refuses it by name (as it refuses `parent`). */
const TASK_KEYS: Record<string, string> = {
  idempotencyKey: "idempotency_key",
  responseEvent: "response_event",
  runAt: "run_at",
};

function taskObject(t: TaskSpec, what: string): Record<string, unknown> {
  if (t === null || typeof t !== "object") throw new InvalidInput(`${what} must be an object with a handler`);
  const out: Record<string, unknown> = { input: null };
  for (const [k, v] of Object.entries(t)) {
    if (v === undefined) continue;
    out[Object.hasOwn(TASK_KEYS, k) ? TASK_KEYS[k] : k] = k === "runAt" && v instanceof Date ? v.getTime() : v;
  }
  out.handler = name(`${what}: handler`, t.handler);
  return out;
}

function taskJson(t: TaskSpec, what: string): string {
  return toJson(taskObject(t, what), `${what} input`);
}

/** Spawns tasks and inspects, waits for, cancels and retries them. */
export class Client {
  /** The store URL. */
  readonly store: string;
  readonly #native: Promise<NativeClient>;

  constructor(options: ClientOptions = {}) {
    this.store = options.store ?? defaultStore();
    if (typeof this.store !== "string") throw new InvalidInput("store must be a URL string");
    // A store URL that cannot work fails here (ConfigError), not at first use.
    unwrap(native.checkStoreUrl(this.store));
    this.#native = native.NativeClient.open(this.store, options.maxPayloadBytes ?? null).catch((e: Error) => {
      let body: { err?: ErrBody } | undefined;
      try {
        body = JSON.parse(e.message);
      } catch {
        throw e;
      }
      throw body?.err ? toError(body.err) : e;
    });
    // Reported by the first call; do not crash the process if none comes.
    this.#native.catch(() => undefined);
  }

  /** Spawns a task running `handler` with `input`; resolves to its id. */
  async spawn(handler: string, input: unknown = null, options: SpawnOptions = {}): Promise<string> {
    const n = await this.#native;
    return unwrap(await n.spawn(taskJson({ ...options, handler, input }, "spawn"))).task_id;
  }
  /** Spawns many tasks in one transaction; resolves to their ids, in order. */
  async spawnMany(tasks: TaskSpec[]): Promise<string[]> {
    if (!Array.isArray(tasks)) throw new InvalidInput("spawnMany needs an array of {handler, input}");
    const objects = tasks.map((t, i) => taskObject(t, `spawnMany: task #${i}`));
    let json: string;
    try {
      json = JSON.stringify(objects);
    } catch {
      // Name the task that cannot be serialised.
      objects.forEach((o, i) => toJson(o, `spawnMany: task #${i} input`));
      throw new InvalidInput("spawnMany: the tasks are not JSON-serialisable");
    }
    const n = await this.#native;
    return (unwrap(await n.spawnMany(json)) as any[]).map((s) => s.task_id);
  }
  /** Emits an event (first write wins); true if this call stored it. */
  async emit(name: string, payload: unknown = null): Promise<boolean> {
    const n = await this.#native;
    return unwrap(await n.emit(name, toJson(payload, "event payload")));
  }
  /** Waits for the task to finish and resolves to its result; rejects with
   * `TaskFailedError`, `TaskCancelledError`, or `WaitTimeoutError` after
   * `timeout` seconds (default 30). */
  async result<T = unknown>(taskId: string, options: { timeout?: number } = {}): Promise<T> {
    const n = await this.#native;
    return (unwrap(await n.result(taskId, nonNeg("timeout", options.timeout ?? 30))) ?? null) as T;
  }
  /** Waits, from outside any task, until event `name` is emitted and
   * resolves to its payload (at once if it already was; the first emit
   * wins): how a caller waits for a task's `responseEvent` (`{ task_id,
   * state, result, error }`) without polling. Rejects with
   * `WaitTimeoutError` naming the event after `timeout` seconds (default
   * 30), `InvalidInput` for a bad name. */
  async awaitEvent<T = unknown>(name: string, options: { timeout?: number } = {}): Promise<T> {
    const n = await this.#native;
    return (unwrap(await n.awaitEvent(name, nonNeg("timeout", options.timeout ?? 30))) ?? null) as T;
  }
  /** Waits for the task to finish and resolves to its record. */
  async wait(taskId: string, options: { timeout?: number } = {}): Promise<Record<string, any>> {
    const n = await this.#native;
    return camelRecord(unwrap(await n.wait(taskId, nonNeg("timeout", options.timeout ?? 30))));
  }
  /** The task's record. */
  async get(taskId: string): Promise<Record<string, any>> {
    const n = await this.#native;
    return camelRecord(unwrap(await n.get(taskId)));
  }
  /** The task with its steps, attempts (errors and stack traces), checkpoints, waits and children. */
  async inspect(taskId: string): Promise<Record<string, any>> {
    const n = await this.#native;
    return camelRecord(unwrap(await n.inspect(taskId)));
  }
  /** Task records, filtered by state and handler. */
  async list(options: { state?: string; handler?: string; limit?: number } = {}): Promise<Record<string, any>[]> {
    const n = await this.#native;
    return camelRecord(unwrap(await n.list(options.state ?? null, options.handler ?? null, options.limit ?? 100)));
  }
  /** Cancels the task (and its children with `cascade`); true if it was still running. */
  async cancel(taskId: string, options: { cascade?: boolean } = {}): Promise<boolean> {
    const n = await this.#native;
    return unwrap(await n.cancel(taskId, options.cascade ?? false));
  }
  /** Makes a failed or cancelled task run again. */
  async retry(taskId: string): Promise<void> {
    const n = await this.#native;
    unwrap(await n.retry(taskId));
  }
  /** Hosts registered in the store. */
  async workers(): Promise<Record<string, any>[]> {
    const n = await this.#native;
    return camelRecord(unwrap(await n.workers()));
  }
  /** Recent events. */
  /** Cached events, newest first; with `name`, only those whose name
   * starts with it. */
  async events(limit = 100, options: { name?: string } = {}): Promise<Record<string, any>[]> {
    const n = await this.#native;
    return camelRecord(unwrap(await n.events(limit, options.name ?? null)));
  }
  /** Number of steps per state. */
  async countSteps(): Promise<Record<string, number>> {
    const n = await this.#native;
    return unwrap(await n.countSteps());
  }
}
