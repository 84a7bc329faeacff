// An inventory checker: routing on a status, a transient error retried,
// and cancellation, in TypeScript.
//
// `inventory.order` plans one `check` step routed on its status: the
// `inventory.check` handler calls `ctx.setStatus("out_of_stock")` when the
// stock is short (and sets nothing, status `ok`, when it is not); `ok`
// ships and `out_of_stock` backorders, each reading the check's result. The
// check's first attempt fails with a transient error (the warehouse API
// timed out), which is retried.
//
// `inventory.scan` walks a long list of warehouse bins, checkpointing its
// cursor and heartbeating so its lease stays valid; each bin is counted
// with a timer that takes `ctx.signal`, so cancelling the task aborts the
// scan at once. `inventory.watch` starts a scan as a child task and then
// awaits a restock event that never comes (its step is suspended, holding
// no slot); cancelling it with `cascade` cancels the suspended step and the
// child scan.
//
//   node inventory_cancel.mjs [--store sqlite:inv.db]
import { setTimeout as delay } from "node:timers/promises";
import { Client, Decision, RetryableError, TaskCancelledError, Worker, step } from "switchyard";
import { storeFromArgs, until } from "./common.mjs";

const BINS = 10_000;
const STOCK: Record<string, number> = { bolt: 10, nut: 1 };
type Order = { sku: string; qty: number };
type Checked = { sku: string; reserved?: number; missing?: number };
const seen = { stoppedAt: -1, scanning: false };

export function build(worker: Worker): void {
  worker.decision("inventory.order", async (input: Order) =>
    Decision.create([
      step("check", {
        handler: "inventory.check",
        input,
        routes: {
          ok: [step("ship", { handler: "inventory.ship" })],
          out_of_stock: [step("backorder", { handler: "inventory.backorder" })],
        },
      }),
    ]),
  );

  worker.step(
    "inventory.check",
    async (input: Order, ctx): Promise<Checked> => {
      if (ctx.attempt === 1) throw new RetryableError("warehouse API timed out");
      const have = STOCK[input.sku] ?? 0;
      if (have < input.qty) {
        ctx.setStatus("out_of_stock");
        return { sku: input.sku, missing: input.qty - have };
      }
      return { sku: input.sku, reserved: input.qty };
    },
    { retry: { maxAttempts: 3, initialBackoff: 0.05, maxBackoff: 0.05 } },
  );

  worker.step("inventory.ship", async (_input: unknown, ctx) => {
    const check = (await ctx.dependencyResults()).check as Checked;
    return { shipped: check.reserved, sku: check.sku };
  });

  worker.step("inventory.backorder", async (_input: unknown, ctx) => {
    const check = (await ctx.dependencyResults()).check as Checked;
    return { backordered: check.missing, sku: check.sku };
  });

  worker.step(
    "inventory.scan",
    async (_input: { warehouse: string }, ctx) => {
      const cursor = await ctx.checkpoint("start", () => 0);
      for (let b = cursor; b < BINS; b++) {
        seen.scanning = true;
        try {
          await delay(5, undefined, { signal: ctx.signal }); // count the bin
        } catch (e) {
          seen.stoppedAt = b;
          console.log(`inventory.scan: cancelled at bin ${b}, stopping`);
          throw ctx.signal.reason ?? e;
        }
        if (b % 50 === 0) await ctx.heartbeat();
      }
      return { bins: BINS };
    },
    { timeout: 120 },
  );

  worker.step("inventory.watch", async (input: { warehouse: string }, ctx) => {
    await ctx.spawn("inventory.scan", { warehouse: input.warehouse });
    return ctx.awaitEvent(`restock:${input.warehouse}`, { timeout: 3600 });
  });
}

async function main(): Promise<void> {
  const store = storeFromArgs("inventory");
  const worker = new Worker({ store, concurrency: 4 });
  build(worker);
  const client = new Client({ store });
  await worker.start();
  try {
    const orders: [string, number, unknown][] = [
      ["bolt", 4, { shipped: 4, sku: "bolt" }],
      ["nut", 3, { backordered: 2, sku: "nut" }],
    ];
    for (const [sku, qty, want] of orders) {
      const orderTask = await client.spawn("inventory.order", { sku, qty });
      const result = await client.result(orderTask, { timeout: 20 });
      const check = (await client.inspect(orderTask)).steps.find((s: { name: string }) => s.name === "check");
      console.log(`order ${sku} x${qty}: check ended \`${check.status}\` on attempt ${check.attempt}: ${JSON.stringify(result)}`);
      if (JSON.stringify(result) !== JSON.stringify(want)) throw new Error(`order ${sku}: ${JSON.stringify(result)}`);
      if (check.attempt !== 2) throw new Error("the transient error was retried once");
    }
    const scanTask = await client.spawn("inventory.scan", { warehouse: "W1" });
    await until(async () => seen.scanning, 20_000, "the scan to start");
    console.log(`client: cancelling scan ${scanTask}`);
    if (!(await client.cancel(scanTask))) throw new Error("the scan had already finished");
    const t = await client.wait(scanTask, { timeout: 20 });
    if (t.state !== "cancelled") throw new Error(`scan is ${t.state}`);
    await until(async () => seen.stoppedAt >= 0, 10_000, "the handler to see ctx.signal");

    const watchTask = await client.spawn("inventory.watch", { warehouse: "W2" });
    await until(
      async () => {
        const d = await client.inspect(watchTask);
        return ["running", "suspended"].includes(d.steps[0].state) && d.children.length > 0;
      },
      20_000,
      "the watch to start its scan",
    );
    console.log(`client: cancelling watch ${watchTask} and its descendants`);
    if (!(await client.cancel(watchTask, { cascade: true }))) throw new Error("the watch had already finished");
    await client.result(watchTask, { timeout: 20 }).then(
      () => {
        throw new Error("the watch completed");
      },
      (e) => {
        if (!(e instanceof TaskCancelledError)) throw e;
      },
    );
    for (const child of (await client.inspect(watchTask)).children) {
      const c = await client.wait(child.id, { timeout: 20 });
      if (c.state !== "cancelled") throw new Error(`child ${child.id} is ${c.state}`);
    }
    console.log(`done: scan stopped at bin ${seen.stoppedAt} of ${BINS}; watch and its scan cancelled`);
  } finally {
    await worker.stop();
  }
}

await main();
