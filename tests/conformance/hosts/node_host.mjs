// The Node host of the conformance suite (tests/conformance/).
//
//   node node_host.mjs --store sqlite:PATH --scenarios scenarios.json --log PATH
//
// Run from a project where the `switchyard` package is installed. Registers
// every handler of the scenario file with the options the file gives it,
// prints `ready` once started, and runs until SIGTERM. Handlers append
// `<task_id> <label>` lines to the log where a scenario counts how often
// something ran.
import { appendFileSync, existsSync, readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { Worker, Decision, step, PermanentError, RetryableError, InvalidInput, CancelledError, HttpError } from "switchyard";

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, "")] = process.argv[i + 1];
const spec = JSON.parse(readFileSync(args.scenarios, "utf8"));
const note = (ctx, label) => appendFileSync(args.log, `${ctx.taskId} ${label}\n`);

const bodies = {
  conf_value: async (input) => ({ echo: input }),
  conf_permanent: async () => {
    throw new PermanentError("nope");
  },
  conf_flaky: async (input, ctx) => {
    if (ctx.attempt < 3) throw new RetryableError(`flaky on attempt ${ctx.attempt}`);
    return { attempt: ctx.attempt };
  },
  conf_crash: async () => {
    throw new Error("boom");
  },
  conf_checkpoint_once: async (input, ctx) => {
    const charged = await ctx.checkpoint("charge", () => {
      note(ctx, "charge");
      return 42;
    });
    if (ctx.attempt === 1) throw new RetryableError("failed after the charge");
    return { charged };
  },
  conf_same_name: async (input, ctx) => {
    const a = await ctx.checkpoint("x", () => (note(ctx, "first"), 1));
    const b = await ctx.checkpoint("x", () => (note(ctx, "second"), 2));
    return [a, b];
  },
  conf_await: async (input, ctx) => ({ got: await ctx.awaitEvent(input.event, { timeout: 60 }) }),
  conf_await_timeout: async (input, ctx) => {
    await ctx.awaitEvent("never.sent", { timeout: 0.2 });
    return "unreachable";
  },
  conf_suspensions: async (input, ctx) => {
    for (let i = 0; i < input.n; i++) await ctx.sleep(0.02);
    return { slept: input.n };
  },
  conf_timeout: async () => {
    await sleep(5000);
    return "too late";
  },
  conf_unrenderable: async () => {
    // An Error whose message and string form throw when read.
    const e = new Error("x");
    Object.defineProperty(e, "message", {
      get() {
        throw new Error("no message for you");
      },
    });
    e.toString = () => {
      throw new Error("no string either");
    };
    throw e;
  },
  conf_hostile: async () => {
    // A Proxy of an Error whose every trap throws.
    const trap = () => {
      throw new Error("trap");
    };
    throw new Proxy(new Error("x"), {
      get: trap,
      has: trap,
      ownKeys: trap,
      getOwnPropertyDescriptor: trap,
      getPrototypeOf: trap,
    });
  },
  // Holds its slot until the driver's release file exists, or until
  // cancelled (shutdown), for at most 15 s.
  conf_hold: async (input, ctx) => {
    note(ctx, "start");
    for (let i = 0; i < 750; i++) {
      if (existsSync(`${args.log}.release`)) return { released: true };
      if (ctx.isCancelled) {
        note(ctx, "stopped");
        return "stopped";
      }
      await sleep(20);
    }
    return "never released";
  },
  conf_unrepresentable: async (input) => {
    if (input.what === "nan") return NaN;
    if (input.what === "cycle") {
      const o = {};
      o.self = o;
      return o;
    }
    return Symbol("opaque");
  },
  // Holds its handler's only slot for input.ms milliseconds.
  conf_queued_timeout: async (input, ctx) => {
    note(ctx, "started");
    await sleep(input.ms);
    note(ctx, "finished");
    return { slept: input.ms };
  },
  conf_invalid: async () => {
    throw new InvalidInput("missing field `amount`");
  },
  conf_delegate_fails: async (input, ctx) => ({ child: await ctx.delegate("conf_permanent", {}) }),
  conf_delegate_parallel_fails: async (input, ctx) => {
    const out = await ctx.delegateParallel([
      { handler: "conf_value", input: { i: 1 } },
      { handler: "conf_permanent", input: {} },
    ]);
    return {
      states: out.map((o) => o.state),
      first: out[0].result,
      second_error: out[1].error?.message ?? null,
    };
  },
  conf_cancel_running: async (input, ctx) => {
    note(ctx, "started");
    for (let i = 0; i < 500; i++) {
      if (ctx.isCancelled) {
        note(ctx, "saw cancel");
        throw new CancelledError("cancelled");
      }
      await sleep(20);
    }
    return "never cancelled";
  },
  conf_cancel_suspended: async (input, ctx) => {
    note(ctx, "started");
    await ctx.awaitEvent("never.comes", { timeout: 60 });
    return "unreachable";
  },
  conf_wrong_return: async () => 42,
  conf_batch: async (items) =>
    items.map(({ input }) => (input.n < 0 ? new PermanentError(`negative: ${input.n}`) : { double: input.n * 2 })),
  conf_batch_fails: async () => {
    throw new PermanentError("the whole batch failed");
  },
  // Two parts, then their sum, which depends on both.
  conf_plan: async () =>
    Decision.create(
      [
        step("a", { handler: "conf_plan_part", input: { n: 2 } }),
        step("b", { handler: "conf_plan_part", input: { n: 3 } }),
        step("sum", { handler: "conf_plan_sum", input: {}, dependsOn: ["a", "b"] }),
      ],
      "sum",
    ),
  // One check, routed on its status.
  conf_route: async (input) =>
    Decision.create([
      step("check", {
        handler: "conf_route_check",
        input,
        routes: {
          ok: [step("shipped", { handler: "conf_route_next", input: { route: "ok" } })],
          out_of_stock: [step("backordered", { handler: "conf_route_next", input: { route: "out_of_stock" } })],
        },
      }),
    ]),
  conf_route_check: async (input, ctx) => {
    if (input.status !== undefined) ctx.setStatus(input.status);
    return { qty: input.qty };
  },
  conf_route_next: async (input, ctx) => ({ input, saw: await ctx.dependencyResults() }),
  conf_plan_part: async (input) => input.n * 10,
  conf_plan_sum: async (input, ctx) => {
    const deps = await ctx.dependencyResults();
    return { sum: Object.values(deps).reduce((a, b) => a + b, 0), from: Object.keys(deps).sort() };
  },
  conf_api_429: async (input, ctx) => {
    const t0 = await ctx.checkpoint("t0", () => Date.now());
    if (ctx.attempt === 1) throw new HttpError(429, "slow down", { retryAfter: 1 });
    return { attempt: ctx.attempt, waited: Date.now() - t0 >= 900 };
  },
};

bodies.conf_queued_cancel = bodies.conf_queued_timeout;

const worker = new Worker({ store: args.store, concurrency: 16, shutdownGrace: 1 });
for (const [name, o] of Object.entries(spec.handlers)) {
  const options = {};
  if (o.timeout !== undefined) options.timeout = o.timeout;
  if (o.max_attempts !== undefined) {
    options.retry = { maxAttempts: o.max_attempts, initialBackoff: o.initial_backoff, maxBackoff: o.max_backoff };
  }
  if (o.max_batch !== undefined) options.maxBatch = o.max_batch;
  if (o.linger !== undefined) options.linger = o.linger;
  if (o.concurrency !== undefined) options.concurrency = o.concurrency;
  worker[o.kind ?? "step"](name, bodies[name], options); // step, decision, api, batch
}
await worker.start();
console.log("ready");
await worker.run();
