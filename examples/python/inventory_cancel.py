"""An inventory checker: routing on a status, a transient error retried,
and cancellation, in Python.

`inventory.order` plans one `check` step routed on its status: the
`inventory.check` handler says `ctx.set_status("out_of_stock")` when the
stock is short (and sets nothing, status `ok`, when it is not); `ok` ships
and `out_of_stock` backorders, each reading the check's result. The check's
first attempt fails with a transient error (the warehouse API timed out),
which is retried.

`inventory.scan` walks a long list of warehouse bins, checkpointing its
cursor every bin and heartbeating so its lease stays valid; it checks
`ctx.is_cancelled()` between bins, so cancelling the task stops it
cooperatively. `inventory.watch` is an async handler that starts a scan as
a child task and then awaits a restock event that never comes (its step is
suspended, holding no slot); cancelling it with `cascade=True` cancels the
suspended step and the child scan (which notices between two bins). An
async handler cancelled while running gets `CancelledError` in its asyncio
task.

    python examples/python/inventory_cancel.py [--store sqlite:inv.db]
"""

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time

import switchyard

BINS = 10_000
STOCK = {"bolt": 10, "nut": 1}
seen = {"scan_stopped_at": None, "watch_cancelled": threading.Event(), "scanning": threading.Event()}


def build(worker):
    @worker.decision("inventory.order")
    def order(input, ctx):
        return switchyard.Decision.create(
            [
                switchyard.step(
                    "check",
                    handler="inventory.check",
                    input=input,
                    routes={
                        "ok": [switchyard.step("ship", handler="inventory.ship")],
                        "out_of_stock": [switchyard.step("backorder", handler="inventory.backorder")],
                    },
                )
            ]
        )

    @worker.step("inventory.check", retry=switchyard.Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.05))
    def check(input, ctx):
        if ctx.attempt == 1:
            raise switchyard.RetryableError("warehouse API timed out")
        have = STOCK.get(input["sku"], 0)
        if have < input["qty"]:
            ctx.set_status("out_of_stock")
            return {"sku": input["sku"], "missing": input["qty"] - have}
        return {"sku": input["sku"], "reserved": input["qty"]}

    @worker.step("inventory.ship")
    def ship(input, ctx):
        check = ctx.dependency_results()["check"]
        return {"shipped": check["reserved"], "sku": check["sku"]}

    @worker.step("inventory.backorder")
    def backorder(input, ctx):
        check = ctx.dependency_results()["check"]
        return {"backordered": check["missing"], "sku": check["sku"]}

    @worker.step("inventory.scan", timeout=120)
    def scan(input, ctx):
        cursor = ctx.checkpoint("start", lambda: 0)
        for b in range(cursor, BINS):
            if ctx.is_cancelled():
                seen["scan_stopped_at"] = b
                print(f"inventory.scan: cancelled at bin {b}, stopping", flush=True)
                raise switchyard.Cancelled("scan cancelled")
            seen["scanning"].set()
            time.sleep(0.005)  # count the bin
            if b % 50 == 0:
                ctx.heartbeat()
        return {"bins": BINS}

    @worker.step("inventory.watch")
    async def watch(input, ctx):
        try:
            await ctx.spawn("inventory.scan", {"warehouse": input["warehouse"]})
            return await ctx.await_event(f"restock:{input['warehouse']}", timeout=3600)
        except asyncio.CancelledError:
            print("inventory.watch: asyncio task cancelled", flush=True)
            seen["watch_cancelled"].set()
            raise


def main():
    ap = argparse.ArgumentParser(description="inventory checker with cancellation")
    ap.add_argument("--store", help="store URL (default: a fresh temporary SQLite file)")
    args = ap.parse_args()
    tmp = None
    if not args.store:
        tmp = tempfile.TemporaryDirectory(prefix="switchyard-inventory-")
        args.store = f"sqlite:{os.path.join(tmp.name, 'inventory.db')}"
    worker = switchyard.Worker(args.store, concurrency=4)
    build(worker)
    client = switchyard.Client(args.store)
    worker.start()
    try:
        for sku, qty, want in [("bolt", 4, {"shipped": 4, "sku": "bolt"}), ("nut", 3, {"backordered": 2, "sku": "nut"})]:
            order_task = client.spawn("inventory.order", {"sku": sku, "qty": qty})
            result = client.result(order_task, timeout=20)
            check = next(s for s in client.inspect(order_task)["steps"] if s["name"] == "check")
            print(f"order {sku} x{qty}: check ended `{check['status']}` on attempt {check['attempt']}: {result}", flush=True)
            assert result == want, result
            assert check["attempt"] == 2, "the transient error was retried once"
        scan_task = client.spawn("inventory.scan", {"warehouse": "W1"})
        if not seen["scanning"].wait(20):
            raise SystemExit("the scan never started")
        time.sleep(0.2)
        print(f"client: cancelling scan {scan_task}", flush=True)
        assert client.cancel(scan_task)
        t = client.wait(scan_task, timeout=20)
        assert t["state"] == "cancelled", t
        deadline = time.monotonic() + 10
        while seen["scan_stopped_at"] is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen["scan_stopped_at"] is not None, "the sync handler saw ctx.is_cancelled()"

        watch_task = client.spawn("inventory.watch", {"warehouse": "W2"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            d = client.inspect(watch_task)
            if d["steps"][0]["state"] in ("running", "suspended") and d["children"]:
                break
            time.sleep(0.02)
        print(f"client: cancelling watch {watch_task} and its descendants", flush=True)
        assert client.cancel(watch_task, cascade=True)
        t = client.wait(watch_task, timeout=20)
        assert t["state"] == "cancelled", t
        for child in client.inspect(watch_task)["children"]:
            c = client.wait(child["id"], timeout=20)
            assert c["state"] == "cancelled", c
        print(f"done: scan stopped at bin {seen['scan_stopped_at']} of {BINS}; watch and its scan cancelled", flush=True)
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
