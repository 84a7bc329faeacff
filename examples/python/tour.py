"""A complete worker with one example of each capability (the package README shows this file).

    python examples/python/tour.py [--store sqlite:tour.db]
"""

import argparse
import os
import sys
import tempfile
import time

import switchyard
from switchyard import Decision, HttpError, Retry, Worker, step

STOCK = {"bolt": 10}


def build(worker: Worker) -> None:
    # A decision plans steps; `check` is routed on the status it ends with.
    @worker.decision("order.place")
    def place(order, ctx):
        return Decision.create([
            step("check", handler="stock.check", input=order, routes={
                "ok": [step("price", handler="order.price"), step("ship", handler="order.ship", depends_on=["check", "price"])],
                "out_of_stock": [step("backorder", handler="order.backorder")],
            }),
        ])

    @worker.step("stock.check", retry=Retry(max_attempts=3, initial_backoff=0.05))
    def check(order, ctx):
        have = ctx.checkpoint("stock", lambda: STOCK.get(order["sku"], 0))  # once per task, ever
        if have < order["qty"]:
            ctx.set_status("out_of_stock")
        return {"sku": order["sku"], "qty": order["qty"], "have": have}

    # An API-shaped handler: a 429 is retried after Retry-After, other 4xx fail.
    @worker.api("order.price", rate_limit=50)
    def price(_input, ctx):
        if ctx.attempt == 1:
            raise HttpError(429, "slow down", retry_after=0.1)
        return {"unit": 2.5}

    # Dependencies' results; a child task delegated (the step suspends meanwhile).
    @worker.step("order.ship")
    def ship(_input, ctx):
        deps = ctx.dependency_results()
        label = ctx.delegate("label.print", {"sku": deps["check"]["sku"]})
        return {"total": deps["check"]["qty"] * deps["price"]["unit"], "label": label}

    @worker.step("order.backorder")
    async def backorder(_input, ctx):  # async handlers share one event loop
        check = (await ctx.dependency_results())["check"]
        # A child with a response event, awaited durably (the slot is freed meanwhile).
        await ctx.spawn("supplier.ask", check, response_event=f"supplied:{ctx.task_id}")
        supplied = await ctx.await_event(f"supplied:{ctx.task_id}", timeout=60)
        return {"backordered": check["qty"] - check["have"], "supplier": supplied["result"]}

    @worker.step("supplier.ask")
    async def ask(_item, ctx):
        await ctx.sleep(0.05)  # durable: survives restarts
        return "on its way"

    # A batch handler gets many steps at once and answers each.
    @worker.batch("label.print", max_batch=16, linger=0.01)
    def print_labels(items):
        return [f"LABEL-{item.input['sku']}" for item in items]

    # Several children at once; each one's outcome is reported.
    @worker.step("audit")
    def audit(skus, ctx):
        outcomes = ctx.delegate_parallel([("label.print", {"sku": s}) for s in skus])
        ctx.emit_event("audited", len(outcomes))
        return [o["result"] for o in outcomes]

    # Long work: heartbeat, and stop when cancelled.
    @worker.step("inventory.scan", timeout=60)
    def scan(_input, ctx):
        for n in range(10_000):
            if ctx.is_cancelled():
                raise switchyard.Cancelled(f"stopped at bin {n}")
            ctx.heartbeat()  # keeps the lease while the work goes on
            time.sleep(0.01)
        return "done"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    store = args.store or f"sqlite:{os.path.join(tmp.name, 'tour.db')}"
    worker = Worker(store, concurrency=16)
    build(worker)
    client = switchyard.Client(store)
    worker.start()
    try:
        shipped = client.spawn("order.place", {"sku": "bolt", "qty": 4})
        backordered = client.spawn("order.place", {"sku": "nut", "qty": 3})
        print("shipped:", client.result(shipped, timeout=30))
        print("backordered:", client.result(backordered, timeout=30))
        print("audit:", client.result(client.spawn("audit", ["a", "b"]), timeout=30))
        scan = client.spawn("inventory.scan")
        time.sleep(0.3)
        client.cancel(scan)
        print("scan:", client.wait(scan, timeout=30)["state"])
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
