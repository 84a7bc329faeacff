// Worker delegation with parallel sub-tasks and response events, in TypeScript.
//
// `report.build` delegates one `region.total` child per region in parallel
// (the parent step suspends, its slot freed, until every child finished) and
// gets their outcomes in order, with a failing region reported per child
// instead of failing the report; then it delegates one more child. The
// report task is spawned with `responseEvent`, so a caller anywhere can await
// the event `report.ready` carrying its outcome.
//
//   node delegation.mjs [--store sqlite:report.db]
import { Client, PermanentError, Worker } from "switchyard";
import { storeFromArgs } from "./common.mjs";

const SALES: Record<string, number[] | null> = { north: [120, 80], south: [200], east: [50, 50, 25], atlantis: null };

export function build(worker: Worker): void {
  worker.step("report.build", async (input: { regions: string[] }, ctx) => {
    const outcomes = await ctx.delegateParallel(input.regions.map((region) => ({ handler: "region.total", input: { region } })));
    const totals: Record<string, number> = {};
    const failures: Record<string, string> = {};
    input.regions.forEach((region, i) => {
      const o = outcomes[i];
      if (o.state === "completed") totals[region] = o.result as number;
      else failures[region] = (o.error as { message: string }).message;
    });
    // One more child, awaited on its own.
    const rate = await ctx.delegate<number>("fx.rate", { to: "EUR" });
    const grand = Object.values(totals).reduce((a, b) => a + b, 0);
    console.log(`report: totals=${JSON.stringify(totals)} failures=${Object.keys(failures)} rate=${rate}`);
    return { totals, failures, eur: Math.round(grand * rate * 100) / 100 };
  });

  worker.step(
    "region.total",
    (input: { region: string }) => {
      const rows = SALES[input.region];
      if (!rows) throw new PermanentError(`no sales ledger for region ${input.region}`);
      return rows.reduce((a, b) => a + b, 0);
    },
    { retry: 1 },
  );

  worker.step("fx.rate", async () => 0.5);
}

async function main(): Promise<void> {
  const store = storeFromArgs("delegation");
  const worker = new Worker({ store, concurrency: 8 });
  build(worker);
  const client = new Client({ store });
  await worker.start();
  try {
    const task = await client.spawn("report.build", { regions: Object.keys(SALES) }, { responseEvent: "report.ready" });
    console.log(`spawned report.build ${task}`);
    const result: any = await client.result(task, { timeout: 30 });
    const expect = (ok: boolean, what: string) => {
      if (!ok) throw new Error(`${what}: ${JSON.stringify(result)}`);
    };
    const totals = result.totals as Record<string, number>;
    expect(totals.north === 200 && totals.south === 200 && totals.east === 125 && Object.keys(totals).length === 3, "totals");
    expect(JSON.stringify(Object.keys(result.failures)) === JSON.stringify(["atlantis"]), "failures");
    expect(result.eur === 262.5, "eur");
    const ready = (await client.events()).find((e) => e.name === "report.ready");
    if (!ready) throw new Error("the response event was not emitted");
    console.log(`result: ${JSON.stringify(result)}`);
    console.log(`response event report.ready: ${JSON.stringify(ready.payload)}`);
  } finally {
    await worker.stop();
  }
}

await main();
