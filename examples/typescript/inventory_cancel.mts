// An inventory checker with cancellation, in TypeScript.
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
import { Client, TaskCancelledError, Worker } from "switchyard";
import { storeFromArgs, until } from "./common.mjs";

const BINS = 10_000;
const seen = { stoppedAt: -1, scanning: false };

export function build(worker: Worker): void {
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
