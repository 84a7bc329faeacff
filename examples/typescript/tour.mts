// A complete worker with one example of each capability (the package README shows this file).
//
//   node tour.mjs [--store sqlite:tour.db]
import { setTimeout as delay } from "node:timers/promises";
import { Client, Decision, HttpError, Worker, step, type ResponseEvent } from "switchyard";
import { storeFromArgs } from "./common.mjs";

type Order = { sku: string; qty: number };
type Checked = Order & { have: number };
const STOCK: Record<string, number> = { bolt: 10 };

export function build(worker: Worker): void {
  // A decision plans steps; `check` is routed on the status it ends with.
  worker.decision<Order>("order.place", (order) =>
    Decision.create([
      step("check", {
        handler: "stock.check",
        input: order,
        routes: {
          ok: [step("price", { handler: "order.price" }), step("ship", { handler: "order.ship", dependsOn: ["check", "price"] })],
          out_of_stock: [step("backorder", { handler: "order.backorder" })],
        },
      }),
    ]),
  );

  worker.step<Order, Checked>(
    "stock.check",
    async (order, ctx) => {
      const have = await ctx.checkpoint("stock", () => STOCK[order.sku] ?? 0); // once per task, ever
      if (have < order.qty) ctx.setStatus("out_of_stock");
      return { ...order, have };
    },
    { retry: { maxAttempts: 3, initialBackoff: 0.05 } },
  );

  // An API-shaped handler: a 429 is retried after Retry-After, other 4xx fail.
  worker.api("order.price", async (_input, ctx) => {
    if (ctx.attempt === 1) throw new HttpError(429, "slow down", { retryAfter: 0.1 });
    return { unit: 2.5 };
  }, { rateLimit: 50 });

  // Dependencies' results; a child task delegated (the step suspends meanwhile).
  worker.step("order.ship", async (_input, ctx) => {
    const deps = (await ctx.dependencyResults()) as { check: Checked; price: { unit: number } };
    const label = await ctx.delegate<string>("label.print", { sku: deps.check.sku });
    return { total: deps.check.qty * deps.price.unit, label };
  });

  worker.step("order.backorder", async (_input, ctx) => {
    const check = (await ctx.dependencyResults()).check as Checked;
    // A child with a response event, awaited durably (the slot is freed meanwhile).
    await ctx.spawn("supplier.ask", check, { responseEvent: `supplied:${ctx.taskId}` });
    const supplied = await ctx.awaitEvent<ResponseEvent>(`supplied:${ctx.taskId}`, { timeout: 60 });
    return { backordered: check.qty - check.have, supplier: supplied.result };
  });

  worker.step("supplier.ask", async (_item, ctx) => {
    await ctx.sleep(0.05); // durable: survives restarts
    return "on its way";
  });

  // A batch handler gets many steps at once and answers each.
  worker.batch<{ sku: string }, string>("label.print", (items) => items.map((i) => `LABEL-${i.input.sku}`), {
    maxBatch: 16,
    linger: 0.01,
  });

  // Several children at once; each one's outcome is reported.
  worker.step("audit", async (skus: string[], ctx) => {
    const outcomes = await ctx.delegateParallel(skus.map((sku) => ({ handler: "label.print", input: { sku } })));
    await ctx.emitEvent("audited", outcomes.length);
    return outcomes.map((o) => o.result);
  });

  // Long work: heartbeat, and stop when cancelled (ctx.signal aborts the timer).
  worker.step("inventory.scan", async (_input, ctx) => {
    for (let n = 0; n < 10_000; n++) {
      await delay(10, undefined, { signal: ctx.signal });
      await ctx.heartbeat(); // keeps the lease while the work goes on
    }
    return "done";
  }, { timeout: 60 });
}

async function main(): Promise<void> {
  const store = storeFromArgs("tour");
  const worker = new Worker({ store, concurrency: 16 });
  build(worker);
  const client = new Client({ store });
  await worker.start();
  try {
    const shipped = await client.spawn("order.place", { sku: "bolt", qty: 4 });
    const backordered = await client.spawn("order.place", { sku: "nut", qty: 3 });
    console.log("shipped:", JSON.stringify(await client.result(shipped, { timeout: 30 })));
    console.log("backordered:", JSON.stringify(await client.result(backordered, { timeout: 30 })));
    console.log("audit:", JSON.stringify(await client.result(await client.spawn("audit", ["a", "b"]), { timeout: 30 })));
    const scan = await client.spawn("inventory.scan");
    await delay(300);
    await client.cancel(scan);
    console.log("scan:", (await client.wait(scan, { timeout: 30 })).state);
  } finally {
    await worker.stop();
  }
}

await main();
