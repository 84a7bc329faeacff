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
/** The version of the native core. */
export declare const nativeVersion: string;
/** Base class of every error switchyard throws. */
export declare class SwitchyardError extends Error {
    constructor(message?: string, options?: {
        cause?: unknown;
    });
}
/** Thrown by a handler: the step fails and is never retried. */
export declare class PermanentError extends SwitchyardError {
}
/** Thrown by a handler: the step is retried, after at least `retryAfter` seconds if given. */
export declare class RetryableError extends SwitchyardError {
    readonly retryAfter: number | undefined;
    constructor(message?: string, options?: {
        retryAfter?: number;
        cause?: unknown;
    });
}
/** The input was rejected (by the core, or thrown by a handler): fails at once. */
export declare class InvalidInput extends SwitchyardError {
}
/** A payload exceeded the configured size limit; nothing was stored. */
export declare class PayloadTooLarge extends InvalidInput {
}
/** `ctx.awaitEvent` ran out of time (checkpointed: a replay throws it again). */
export declare class AwaitTimeoutError extends SwitchyardError {
    readonly event: string | undefined;
    constructor(message?: string, options?: {
        event?: string;
        cause?: unknown;
    });
}
/** The task this step runs for was cancelled (thrown by a ctx call; the
 * step stops). `ctx.signal.reason` is one of these. */
export declare class CancelledError extends SwitchyardError {
}
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
export declare class TaskFailedError extends SwitchyardError {
    readonly taskId: string;
    readonly kind: string;
    readonly traceback: string | null;
    readonly attempt: number;
    readonly error: TaskError;
    constructor(message: string, options: {
        taskId: string;
        error: TaskError;
    });
}
/** `client.result` (and everything that waits for a task's outcome): the
 * task was cancelled. */
export declare class TaskCancelledError extends SwitchyardError {
    readonly taskId: string;
    constructor(message: string, options: {
        taskId: string;
    });
}
/** A client wait (`result`, `wait`) ran out of time. */
export declare class WaitTimeoutError extends SwitchyardError {
}
/** No task with that id exists. */
export declare class NotFound extends SwitchyardError {
}
/** The operation does not fit the task's state (e.g. the result of a failed task). */
export declare class Conflict extends SwitchyardError {
}
/** The step's lease was lost (cancelled or taken over by another host). */
export declare class LeaseLost extends SwitchyardError {
}
/** Bad configuration (worker options, store URL). */
export declare class ConfigError extends SwitchyardError {
}
/** The store failed (I/O, database). */
export declare class StoreError extends SwitchyardError {
}
/** The host is shutting down. */
export declare class ShutdownError extends SwitchyardError {
}
/** Thrown by `worker.api` handlers for a non-2xx answer: 429 is retried after
 * `retryAfter` seconds, other 4xx fail permanently, 5xx are retried. */
export declare class HttpError extends SwitchyardError {
    readonly status: number;
    readonly retryAfter: number | undefined;
    constructor(status: number, message?: string, options?: {
        retryAfter?: number;
    });
}
/** Thrown by `worker.api` handlers when a request got no answer (retried). */
export declare class NetworkError extends SwitchyardError {
}
/** True for the internal error that suspends a step (rethrow it if you catch errors broadly). */
export declare function isSuspension(e: unknown): boolean;
/** The payload of a task's response event (`responseEvent` of a spawn),
 * emitted when the task finishes. Event payloads are data: the keys are
 * the stored ones. */
export interface ResponseEvent {
    task_id: string;
    state: "completed" | "failed" | "cancelled";
    /** The result (completed), else null. */
    result: unknown;
    /** `kind`, `message`, `trace`, `attempt` (failed or cancelled), else null. */
    error: {
        kind: string;
        message: string;
        trace?: string | null;
        attempt: number;
    } | null;
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
/**
 * The durable context of one step run. Durable operations are keyed by name
 * and call order, so a replay (after a suspension, a retry or a crash) gets
 * the stored values back. Operations that suspend the step throw an internal
 * error that must propagate out of the handler.
 */
export declare class Context {
    #private;
    /** The task id. */
    get taskId(): string;
    /** The step id. */
    get stepId(): string;
    /** The step's name. */
    get stepName(): string;
    /** The handler's name. */
    get handler(): string;
    /** The attempt this run belongs to: 1 until a run fails; a resume after a
     * suspension continues the same attempt. */
    get attempt(): number;
    /** This run's number: grows with every claim of the step (resumes
     * included) and is never reused. */
    get run(): number;
    /** The task's priority. */
    get priority(): number;
    /** The task's headers. */
    get headers(): Record<string, string>;
    /** Seconds left before the handler's timeout, or null. */
    get timeLeft(): number | null;
    /** True once the task was cancelled. */
    get isCancelled(): boolean;
    /** Ends this run with `status` when the handler returns a value: the
     * steps the decision routed from that status are created (see
     * `routes` in `step`) and the status is recorded with the step. Without
     * a call the status is `ok`; the last call wins. A status the step has
     * no route for fails the step; a status that is not a name throws
     * `InvalidInput`. */
    setStatus(status: string): void;
    /** Fired with a `CancelledError` reason when the core stops wanting this
     * run: the task was cancelled, the handler's timeout passed, or the worker
     * shut down before the run ended. Pass it to `fetch`, timers and the like.
     * For a batch handler each item's signal fires when its own run is asked
     * to stop (its task cancelled, say), the others running on. */
    get signal(): AbortSignal;
    /** Runs `fn` once per task, ever: a replay returns the stored value. */
    checkpoint<T>(name: string, fn: () => T | Promise<T>): Promise<T>;
    /** Waits for event `name`: its payload if it was emitted, else the step
     * suspends (freeing its slot) until it is. */
    awaitEvent<T = unknown>(name: string, options?: AwaitOptions): Promise<T>;
    /** Durable sleep (survives restarts; the step suspends meanwhile). */
    sleep(seconds: number): Promise<void>;
    /** Durable sleep until a time (a `Date` or milliseconds since the epoch). */
    sleepUntil(at: Date | number): Promise<void>;
    /** Emits an event (first write wins); true if this call stored it. */
    emitEvent(name: string, payload?: unknown): Promise<boolean>;
    /** Alias of `emitEvent`. */
    emit(name: string, payload?: unknown): Promise<boolean>;
    /** Spawns a child task the step does not wait for; returns its id. */
    spawn(handler: string, input?: unknown, options?: {
        responseEvent?: string;
    }): Promise<string>;
    /** Runs a child task and returns its result (the step suspends meanwhile);
     * a failed child fails this step permanently. */
    delegate<T = unknown>(handler: string, input?: unknown): Promise<T>;
    /** Runs child tasks in parallel and returns one outcome per child, in order
     * (failures are reported per child). */
    delegateParallel(children: Array<Child | [string, unknown]>): Promise<ChildOutcome[]>;
    /** Extends the lease for long work. */
    heartbeat(): Promise<void>;
    /** Results of the steps this step depends on, by step name (convergence steps). */
    dependencyResults(): Promise<Record<string, unknown>>;
}
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
export declare function step(name: string, options?: {
    handler?: string;
    input?: unknown;
    dependsOn?: string[];
    routes?: Record<string, PlannedStep[]>;
}): PlannedStep;
/** What a `worker.decision` handler returns: steps to create (with
 * dependencies by name), or `Decision.complete(value)`. */
export declare class Decision {
    readonly steps: PlannedStep[];
    readonly finalStep: string | null;
    readonly value: unknown;
    readonly done: boolean;
    private constructor();
    /** Finish the step with `value`. */
    static complete(value?: unknown): Decision;
    /** Create `steps`; the step completes with `finalStep`'s result. */
    static create(steps: PlannedStep[], finalStep?: string | null): Decision;
    /** Splits `total` items into cursor ranges run as parallel `handler`
     * steps, then a `converge` step that receives their results. */
    static fanOut(handler: string, total: number, batchSize: number, input?: unknown, converge?: string): Decision;
}
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
export declare function defaultStore(): string;
/**
 * A host for JS handlers. Register handlers, then `await worker.run()`
 * (until SIGINT/SIGTERM or `stop()`), or `await worker.start()` and later
 * `await worker.stop()` (`close()` is an alias).
 */
export declare class Worker {
    #private;
    /** The store URL. */
    readonly store: string;
    constructor(options?: WorkerOptions);
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
    static fromConfig(path?: string, options?: {
        handleSignals?: boolean;
    }): Worker;
    /** Steps run at once by the host. */
    get concurrency(): number;
    /** Registers a plain handler `(input, ctx) => result | Promise<result>`. */
    step<I = any, O = unknown>(name: string, handler: StepHandler<I, O>, options?: HandlerOptions): this;
    /** Registers a batch handler `(items) => results` (one result or Error per item). */
    batch<I = any, O = unknown>(name: string, handler: BatchHandler<I, O>, options?: BatchOptions): this;
    /** Registers a decision handler `(input, ctx) => Decision`. */
    decision<I = any>(name: string, handler: DecisionHandler<I>, options?: HandlerOptions): this;
    /** Registers an API-shaped handler; throw `HttpError` or `NetworkError` for failures. */
    api<I = any, O = unknown>(name: string, handler: StepHandler<I, O>, options?: ApiOptions): this;
    /** The host id once started. */
    get hostId(): string | null;
    /** Where `/healthz`, `/readyz` and `/metrics` are served once started
     * with `healthListen` (`"127.0.0.1:41234"`), else null. */
    get healthAddr(): string | null;
    /** Steps running in this host now. */
    get inFlight(): number;
    /** Starts serving and resolves once the host is running. */
    start(): Promise<void>;
    /** Graceful shutdown: no more claims; running steps get the grace period,
     * then are handed back. Afterwards nothing keeps the event loop alive. */
    stop(): Promise<void>;
    /** Alias of `stop()`. */
    close(): Promise<void>;
    /** Serves until `stop()` is called or SIGINT/SIGTERM arrives (then shuts
     * down gracefully). On a worker thread no signal handlers are installed. */
    run(): Promise<void>;
}
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
/** Spawns tasks and inspects, waits for, cancels and retries them. */
export declare class Client {
    #private;
    /** The store URL. */
    readonly store: string;
    constructor(options?: ClientOptions);
    /** Spawns a task running `handler` with `input`; resolves to its id. */
    spawn(handler: string, input?: unknown, options?: SpawnOptions): Promise<string>;
    /** Spawns many tasks in one transaction; resolves to their ids, in order. */
    spawnMany(tasks: TaskSpec[]): Promise<string[]>;
    /** Emits an event (first write wins); true if this call stored it. */
    emit(name: string, payload?: unknown): Promise<boolean>;
    /** Waits for the task to finish and resolves to its result; rejects with
     * `TaskFailedError`, `TaskCancelledError`, or `WaitTimeoutError` after
     * `timeout` seconds (default 30). */
    result<T = unknown>(taskId: string, options?: {
        timeout?: number;
    }): Promise<T>;
    /** Waits, from outside any task, until event `name` is emitted and
     * resolves to its payload (at once if it already was; the first emit
     * wins): how a caller waits for a task's `responseEvent` (`{ task_id,
     * state, result, error }`) without polling. Rejects with
     * `WaitTimeoutError` naming the event after `timeout` seconds (default
     * 30), `InvalidInput` for a bad name. */
    awaitEvent<T = unknown>(name: string, options?: {
        timeout?: number;
    }): Promise<T>;
    /** Waits for the task to finish and resolves to its record. */
    wait(taskId: string, options?: {
        timeout?: number;
    }): Promise<Record<string, any>>;
    /** The task's record. */
    get(taskId: string): Promise<Record<string, any>>;
    /** The task with its steps, attempts (errors and stack traces), checkpoints, waits and children. */
    inspect(taskId: string): Promise<Record<string, any>>;
    /** Task records, filtered by state and handler. */
    list(options?: {
        state?: string;
        handler?: string;
        limit?: number;
    }): Promise<Record<string, any>[]>;
    /** Cancels the task (and its children with `cascade`); true if it was still running. */
    cancel(taskId: string, options?: {
        cascade?: boolean;
    }): Promise<boolean>;
    /** Makes a failed or cancelled task run again. */
    retry(taskId: string): Promise<void>;
    /** Hosts registered in the store. */
    workers(): Promise<Record<string, any>[]>;
    /** Recent events. */
    /** Cached events, newest first; with `name`, only those whose name
     * starts with it. */
    events(limit?: number, options?: {
        name?: string;
    }): Promise<Record<string, any>[]>;
    /** Number of steps per state. */
    countSteps(): Promise<Record<string, number>>;
}
