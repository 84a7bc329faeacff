"""An inventory checker with cancellation, in Python.

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
seen = {"scan_stopped_at": None, "watch_cancelled": threading.Event(), "scanning": threading.Event()}


def build(worker):
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
