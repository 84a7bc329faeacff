"""Order fulfilment with events, in Python.

A decision step reserves stock (checkpointed), then fans out to payment,
packing and e-mail in parallel; the convergence step `order.ship` awaits the
payment provider's confirmation (emitted before it waits: the event is cached)
and the courier's delivery (emitted after it suspended: the step is parked,
its slot freed, and the event resumes it).

    python examples/python/order_events.py [--store sqlite:orders.db]
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import switchyard
from switchyard import Decision, step

T0 = time.monotonic()


def say(who, msg):
    print(f"[{(time.monotonic() - T0) * 1000:7.0f} ms] {who:<16} {msg}", flush=True)


def build(worker):
    @worker.decision("order.fulfil")
    def fulfil(order, ctx):
        if not order.get("items"):
            raise switchyard.InvalidInput("the order has no items")
        reservation = ctx.checkpoint("reserve-inventory", lambda: {"reservation": f"RES-{order['id']}"})
        say("order.fulfil", f"reserved {reservation}; deciding the next steps")
        total = sum(i["qty"] * i["price"] for i in order["items"])
        parallel = [
            step("charge.payment", input={"order": order["id"], "amount": total}),
            step("pack.items", input={"order": order["id"], "items": order["items"]}),
            step("notify.customer", input={"order": order["id"], "email": order["email"]}),
        ]
        names = [s["name"] for s in parallel]
        return Decision.create(parallel + [step("order.ship", input={"order": order["id"]}, depends_on=names)])

    @worker.step("charge.payment", retry=3)
    def charge(input, ctx):
        say("charge.payment", f"authorising {input['amount']:.2f}")
        return {"authorisation": f"AUTH-{input['order']}", "amount": input["amount"]}

    @worker.step("pack.items")
    async def pack(input, ctx):
        say("pack.items", f"packing {len(input['items'])} lines")
        return {"parcel": f"PCL-{input['order']}"}

    @worker.step("notify.customer")
    def notify(input, ctx):
        return ctx.checkpoint("email", lambda: {"sent_to": input["email"]})

    @worker.step("order.ship")
    def ship(input, ctx):
        done = ctx.dependency_results()
        order_id = input["order"]
        paid = ctx.await_event(f"payment.confirmed:{order_id}", timeout=60)
        say("order.ship", f"payment confirmed {paid}")
        tracking = ctx.checkpoint("ship", lambda: {"tracking": f"TRK-{order_id}"})
        say("order.ship", "waiting for the courier (the step suspends)")
        delivered = ctx.await_event(f"shipment.delivered:{order_id}", timeout=60)
        say("order.ship", f"delivered {delivered}")
        return {"status": "delivered", "order": order_id, **done, "payment": paid, "shipment": tracking, "delivery": delivered}


def main():
    ap = argparse.ArgumentParser(description="order fulfilment with events")
    ap.add_argument("--store", help="store URL (default: a fresh temporary SQLite file)")
    args = ap.parse_args()
    tmp = None
    if not args.store:
        tmp = tempfile.TemporaryDirectory(prefix="switchyard-orders-")
        args.store = f"sqlite:{os.path.join(tmp.name, 'orders.db')}"
    worker = switchyard.Worker(args.store, concurrency=8)
    build(worker)
    client = switchyard.Client(args.store)
    order = {"id": "P-1001", "email": "ada@example.com", "items": [{"sku": "tea", "qty": 2, "price": 4.5}]}
    worker.start()
    try:
        task = client.spawn("order.fulfil", order, idempotency_key=f"order:{order['id']}")
        say("client", f"spawned order.fulfil (task {task})")
        client.emit(f"payment.confirmed:{order['id']}", {"amount": 9.0})
        say("client", "payment provider emitted payment.confirmed before anyone awaited it")
        # Deliver once the ship step is parked on the delivery event.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            steps = {s["name"]: s for s in client.inspect(task)["steps"]}
            ship = steps.get("order.ship")
            if ship and ship["state"] == "suspended" and (ship.get("wait") or {}).get("event", "").startswith("shipment."):
                break
            time.sleep(0.02)
        else:
            raise SystemExit("order.ship never suspended on the delivery event")
        client.emit(f"shipment.delivered:{order['id']}", {"signed_by": "Ada"})
        say("client", "courier emitted shipment.delivered")
        result = client.result(task, timeout=30)
        say("client", f"result: {result}")
        assert result["status"] == "delivered" and result["delivery"] == {"signed_by": "Ada"}
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
