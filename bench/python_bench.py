#!/usr/bin/env python3
"""Python counterpart of `switchyard bench` (noop workload): prints one JSON
line on stdout, progress on stderr.

    python bench/python_bench.py --store sqlite --steps 100000 [--async]

Needs the `switchyard` wheel installed (`make test-python` builds one into
target/venv-py). Two phases, as in the Rust benchmark:

1. Throughput: `--steps N` tasks are spawned with `Client.spawn_many` in
   batches of `--batch B` while one worker runs them `--concurrency C` at a
   time; the clock runs from the first spawn until the handler has counted N
   runs and the store confirms N completed steps.
2. Latency: `--trials` single tasks one after another on the idle worker,
   from the start of the spawn call to the start of the handler.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import switchyard


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def percentile_ms(samples, p):
    if not samples:
        return None
    s = sorted(samples)
    i = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return round(s[i] * 1000.0, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="sqlite", help="memory, sqlite (fresh temporary file) or a store URL")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--async", dest="is_async", action="store_true", help="an `async def` handler")
    args = ap.parse_args()

    tmp = None
    url = args.store
    if url == "sqlite":
        tmp = tempfile.mkdtemp(prefix="switchyard-bench-")
        url = f"sqlite:{os.path.join(tmp, 'bench.db')}"
    kind = url.split(":", 1)[0]
    run = uuid.uuid4().hex[:8]
    tp_name, lat_name = f"bench.{run}.noop", f"bench.{run}.latency"

    worker = switchyard.Worker(url, concurrency=args.concurrency + 8, shutdown_grace=2.0)
    client = switchyard.Client(url)
    lock = threading.Lock()
    counted = [0]
    all_ran = threading.Event()
    started = {}
    started_cv = threading.Condition()

    def note_start(i):
        with started_cv:
            started[i] = time.perf_counter()
            started_cv.notify_all()

    def count():
        with lock:
            counted[0] += 1
            if counted[0] == args.steps:
                all_ran.set()

    if args.is_async:
        @worker.step(tp_name, concurrency=args.concurrency)
        async def noop(inp, ctx):
            count()

        @worker.step(lat_name, concurrency=8)
        async def lat(inp, ctx):
            note_start(inp["i"])
    else:
        @worker.step(tp_name, concurrency=args.concurrency)
        def noop(inp, ctx):
            count()

        @worker.step(lat_name, concurrency=8)
        def lat(inp, ctx):
            note_start(inp["i"])

    worker.start()
    try:
        base = client.count_steps().get("completed", 0)
        progress(f"throughput: {args.steps} steps, {'async' if args.is_async else 'sync'} handler, store {kind}")
        t0 = time.perf_counter()
        for start in range(0, args.steps, args.batch):
            n = min(args.batch, args.steps - start)
            client.spawn_many([{"handler": tp_name, "input": None}] * n)
        if not all_ran.wait(600):
            raise SystemExit(f"only {counted[0]} of {args.steps} steps ran")
        while client.count_steps().get("completed", 0) - base < args.steps:
            time.sleep(0.005)
        seconds = time.perf_counter() - t0

        progress(f"latency: {args.trials} trials on an idle host")
        samples = []
        for i in range(args.trials):
            t = time.perf_counter()
            tid = client.spawn(lat_name, {"i": i})
            with started_cv:
                if not started_cv.wait_for(lambda: i in started, timeout=30):
                    raise SystemExit(f"latency trial {i}: the handler did not start")
            samples.append(started[i] - t)
            client.wait(tid, timeout=30)
    finally:
        worker.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps({
        "lang": "python",
        "store": kind,
        "workload": "noop-async" if args.is_async else "noop",
        "steps": args.steps,
        "concurrency": args.concurrency,
        "batch": args.batch,
        "seconds": round(seconds, 3),
        "steps_per_sec": round(args.steps / seconds),
        "trials": len(samples),
        "p50_ms": percentile_ms(samples, 50),
        "p99_ms": percentile_ms(samples, 99),
    }))


if __name__ == "__main__":
    main()
