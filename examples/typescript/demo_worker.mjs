// The Node worker of `make demo`: serves `charge.payment` for the Rust demo
// host on a shared store until SIGTERM/SIGINT, then stops gracefully.
//
//   node examples/typescript/demo_worker.mjs --store sqlite:demo.db
//
// Plain JavaScript so it runs without a compile step; it imports the
// installed `switchyard` package.
import { parseArgs } from "node:util";
import { Worker, InvalidInput } from "switchyard";

const { values } = parseArgs({ options: { store: { type: "string" } } });
const store = values.store ?? process.env.SWITCHYARD_STORE ?? "sqlite:switchyard.db";

const worker = new Worker({ store, concurrency: 16 });

worker.step(
  "charge.payment",
  async (input, ctx) => {
    const { order, amount, currency } = input ?? {};
    if (order === undefined || typeof amount !== "number") {
      throw new InvalidInput("charge.payment needs {order, amount, currency}");
    }
    const authorisation = await ctx.checkpoint("authorise", () => {
      console.log(`[node pid ${process.pid}] charge.payment  authorised ${amount} ${currency ?? ""}`.trimEnd());
      return `AUTH-${order}`;
    });
    return { authorisation, amount, charged_by: "node" };
  },
  { retry: 3 },
);

await worker.start();
// run() resolves after SIGTERM/SIGINT once the host has drained; its signal
// handlers are installed before it returns, so announce readiness after.
const running = worker.run();
console.log(`[node pid ${process.pid}] worker ${worker.hostId} serving charge.payment on ${store}`);
await running;
console.log(`[node pid ${process.pid}] worker stopped`);
