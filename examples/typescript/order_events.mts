// Order fulfilment with events, in TypeScript.
//
// A decision step reserves stock (checkpointed), then fans out to payment,
// packing and e-mail in parallel; the convergence step `order.ship` awaits
// the payment provider's confirmation (emitted before it waits: the event is
// cached) and the courier's delivery (emitted after it suspended: the step
// is parked, its slot freed, and the event resumes it).
//
//   node order_events.mjs [--store sqlite:orders.db]
import { Client, Decision, InvalidInput, Worker, step } from "switchyard";
import { say, storeFromArgs, until } from "./common.mjs";

interface Item {
  sku: string;
  qty: number;
  price: number;
}
interface Order {
  id: string;
  email: string;
  items: Item[];
}

export function build(worker: Worker): void {
  worker.decision("order.fulfil", async (order: Order, ctx) => {
    if (!order.items?.length) throw new InvalidInput("the order has no items");
    const reservation = await ctx.checkpoint("reserve-inventory", () => ({ reservation: `RES-${order.id}` }));
    say("order.fulfil", `reserved ${JSON.stringify(reservation)}; deciding the next steps`);
    const total = order.items.reduce((s, i) => s + i.qty * i.price, 0);
    const parallel = [
      step("charge.payment", { input: { order: order.id, amount: total, currency: "EUR" } }),
      step("pack.items", { input: { order: order.id, items: order.items } }),
      step("notify.customer", { input: { order: order.id, email: order.email } }),
    ];
    const names = parallel.map((s) => s.name);
    return Decision.create([...parallel, step("order.ship", { input: { order: order.id }, dependsOn: names })]);
  });

  worker.step(
    "charge.payment",
    async (input: { order: string; amount: number }) => {
      say("charge.payment", `authorising ${input.amount.toFixed(2)}`);
      return { authorisation: `AUTH-${input.order}`, amount: input.amount };
    },
    { retry: 3 },
  );

  worker.step("pack.items", async (input: { order: string; items: Item[] }) => {
    say("pack.items", `packing ${input.items.length} lines`);
    return { parcel: `PCL-${input.order}` };
  });

  worker.step("notify.customer", (input: { email: string }, ctx) =>
    ctx.checkpoint("email", () => ({ sent_to: input.email })),
  );

  worker.step("order.ship", async (input: { order: string }, ctx) => {
    const done = await ctx.dependencyResults();
    const paid = await ctx.awaitEvent(`payment.confirmed:${input.order}`, { timeout: 60 });
    say("order.ship", `payment confirmed ${JSON.stringify(paid)}`);
    const tracking = await ctx.checkpoint("ship", () => ({ tracking: `TRK-${input.order}` }));
    say("order.ship", "waiting for the courier (the step suspends)");
    const delivered = await ctx.awaitEvent(`shipment.delivered:${input.order}`, { timeout: 60 });
    say("order.ship", `delivered ${JSON.stringify(delivered)}`);
    return { status: "delivered", order: input.order, ...done, payment: paid, shipment: tracking, delivery: delivered };
  });
}

async function main(): Promise<void> {
  const store = storeFromArgs("orders");
  const worker = new Worker({ store, concurrency: 8 });
  build(worker);
  const client = new Client({ store });
  const order: Order = { id: "P-1001", email: "ada@example.com", items: [{ sku: "tea", qty: 2, price: 4.5 }] };
  await worker.start();
  try {
    const task = await client.spawn("order.fulfil", order, { idempotencyKey: `order:${order.id}` });
    say("client", `spawned order.fulfil (task ${task})`);
    await client.emit(`payment.confirmed:${order.id}`, { amount: 9.0 });
    say("client", "payment provider emitted payment.confirmed before anyone awaited it");
    // Deliver once the ship step is parked on the delivery event.
    await until(
      async () => {
        const ship = (await client.inspect(task)).steps.find((s: any) => s.name === "order.ship");
        return ship?.state === "suspended" && String(ship.wait?.event ?? "").startsWith("shipment.");
      },
      30_000,
      "order.ship to suspend on the delivery event",
    );
    await client.emit(`shipment.delivered:${order.id}`, { signed_by: "Ada" });
    say("client", "courier emitted shipment.delivered");
    const result: any = await client.result(task, { timeout: 30 });
    say("client", `result: ${JSON.stringify(result)}`);
    if (result.status !== "delivered" || result.delivery.signed_by !== "Ada") throw new Error("unexpected result");
  } finally {
    await worker.stop();
  }
}

await main();
