// Not an example to run: a program that uses every public API of the
// package, compiled with `tsc --strict` against the installed package by
// `make test-node` (with the examples). The `@ts-expect-error` lines must
// stay errors: they fail the build if a type were loosened to `any`.
import {
  Client,
  ConfigError,
  Decision,
  HttpError,
  InvalidInput,
  PermanentError,
  RetryableError,
  TaskFailedError,
  Worker,
  step,
  type BatchItem,
  type Context,
  type PlannedStep,
  type ResponseEvent,
} from "switchyard";

type Order = { sku: string; qty: number; email: string };

export function build(worker: Worker): void {
  worker.decision<Order>("order.place", (order) =>
    Decision.create(
      [
        step("check", {
          handler: "inventory.check",
          input: order,
          routes: { ok: [step("ship")], out_of_stock: [step("backorder", { handler: "order.backorder" })] },
        }),
        step("notify", { input: { to: order.email }, dependsOn: ["check"] }),
      ],
      "check",
    ),
  );
  worker.decision<number>("split", (total) =>
    total === 0 ? Decision.complete(null) : Decision.fanOut("part", total, 100, { total }, "join"),
  );
  worker.step<Order, { missing: number }>(
    "inventory.check",
    async (order, ctx: Context) => {
      if (ctx.isCancelled) throw ctx.signal.reason;
      if (ctx.attempt > 1 && ctx.run > 1 && ctx.priority >= 0 && ctx.timeLeft !== null) await ctx.heartbeat();
      ctx.setStatus("out_of_stock");
      const seen: number = await ctx.checkpoint("seen", () => 1);
      const ev: unknown = await ctx.awaitEvent(`restock:${ctx.taskId}`, { timeout: 5 });
      await ctx.sleep(0.1);
      await ctx.sleepUntil(new Date(1_700_000_000_000));
      const stored: boolean = await ctx.emitEvent("checked", { by: ctx.stepName, handler: ctx.handler, id: ctx.stepId });
      const child: string = await ctx.spawn("audit", order, { responseEvent: `audit:${ctx.taskId}` });
      const done = await ctx.awaitEvent<ResponseEvent>(`audit:${ctx.taskId}`);
      const state: "completed" | "failed" | "cancelled" = done.state;
      const price = await ctx.delegate<number>("price", order);
      const many = await ctx.delegateParallel([{ handler: "a", input: 1 }, ["b", 2]]);
      const first: string = many[0].taskId;
      const deps: Record<string, unknown> = await ctx.dependencyResults();
      const headers: Record<string, string> = ctx.headers;
      console.log(ev, stored, child, state, price, first, deps, headers, order.qty - seen);
      return { missing: order.qty - seen };
    },
    { timeout: 30, retry: { maxAttempts: 3, initialBackoff: 0.1, maxBackoff: 1 }, concurrency: 2 },
  );
  worker.batch<number, number>(
    "charge",
    (items: BatchItem<number>[]) => items.map((i) => (i.input < 0 ? new PermanentError("negative") : i.input * 2)),
    { maxBatch: 16, linger: 0.01 },
  );
  worker.api<Order, number>("price", async () => {
    throw new HttpError(429, "slow down", { retryAfter: 1 });
  }, { rateLimit: 10, burst: 5 });

  // @ts-expect-error: a step handler's input type is checked at the call.
  worker.step<Order>("bad", (order: number) => order);
  // @ts-expect-error: a decision handler must return a Decision.
  worker.decision("bad.decision", () => 42);
  // @ts-expect-error: routes hold planned steps, not names.
  const badRoute: PlannedStep = step("x", { routes: { ok: ["ship"] } });
  console.log(badRoute);
}

export async function use(client: Client, worker: Worker): Promise<void> {
  await worker.start();
  const id: string = await client.spawn("order.place", { sku: "a", qty: 1, email: "e" }, { priority: 1, idempotencyKey: "k", responseEvent: "placed" });
  const ids: string[] = await client.spawnMany([{ handler: "split", input: 10 }]);
  const emitted: boolean = await client.emit("restock:a", { qty: 3 });
  const result = await client.result<{ missing: number }>(id, { timeout: 5 });
  const missing: number = result.missing;
  const placed = await client.awaitEvent<ResponseEvent>("placed", { timeout: 5 });
  const task = await client.wait(ids[0], { timeout: 5 });
  const detail = await client.inspect(id);
  const tasks = await client.list({ state: "failed", handler: "split", limit: 10 });
  const cancelled: boolean = await client.cancel(id, { cascade: true });
  await client.retry(id);
  const hosts = await client.workers();
  const events = await client.events(5);
  const counts: Record<string, number> = await client.countSteps();
  console.log(emitted, missing, placed.task_id, task.state, detail.steps, tasks.length, cancelled, hosts, events, counts);
  console.log(worker.hostId, worker.healthAddr, worker.inFlight);
  await worker.stop();
  for (const E of [ConfigError, InvalidInput, RetryableError, TaskFailedError]) console.log(E.name);
  // @ts-expect-error: result() is typed by the caller, not `any`.
  const wrong: string = (await client.result<{ missing: number }>(id)).missing;
  console.log(wrong);
}
