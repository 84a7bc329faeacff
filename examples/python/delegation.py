"""Worker delegation with parallel sub-tasks and response events, in Python.

`report.build` delegates one `region.total` child per region in parallel
(the parent step suspends, its slot freed, until every child has finished)
and gets their results in order, with a failing region reported per child
instead of failing the report; then it delegates one more child. The report
task itself is spawned with `response_event`, so a caller anywhere can
await the event `report.ready` carrying its outcome.

    python examples/python/delegation.py [--store sqlite:report.db]
"""

import argparse
import os
import sys
import tempfile

import switchyard

SALES = {"north": [120, 80], "south": [200], "east": [50, 50, 25], "atlantis": None}


def build(worker):
    @worker.step("report.build")
    def report(input, ctx):
        children = [("region.total", {"region": r}) for r in input["regions"]]
        outcomes = ctx.delegate_parallel(children)
        totals, failures = {}, {}
        for region, o in zip(input["regions"], outcomes):
            if o["state"] == "completed":
                totals[region] = o["result"]
            else:
                failures[region] = o["error"]["message"]
        # One more child, awaited on its own.
        rate = ctx.delegate("fx.rate", {"to": "EUR"})
        grand = sum(totals.values())
        print(f"report: totals={totals} failures={list(failures)} rate={rate}", flush=True)
        return {"totals": totals, "failures": failures, "eur": round(grand * rate, 2)}

    @worker.step("region.total", retry=1)
    def region_total(input, ctx):
        rows = SALES.get(input["region"])
        if rows is None:
            raise switchyard.PermanentError(f"no sales ledger for region {input['region']}")
        return sum(rows)

    @worker.step("fx.rate")
    async def fx_rate(input, ctx):
        return 0.5


def main():
    ap = argparse.ArgumentParser(description="delegation with parallel sub-tasks")
    ap.add_argument("--store", help="store URL (default: a fresh temporary SQLite file)")
    args = ap.parse_args()
    tmp = None
    if not args.store:
        tmp = tempfile.TemporaryDirectory(prefix="switchyard-delegation-")
        args.store = f"sqlite:{os.path.join(tmp.name, 'report.db')}"
    worker = switchyard.Worker(args.store, concurrency=8)
    build(worker)
    client = switchyard.Client(args.store)
    worker.start()
    try:
        # A caller elsewhere waits for the report through its response event.
        task = client.spawn("report.build", {"regions": list(SALES)}, response_event="report.ready")
        print(f"spawned report.build {task}", flush=True)
        result = client.result(task, timeout=30)
        assert result["totals"] == {"north": 200, "south": 200, "east": 125}, result
        assert list(result["failures"]) == ["atlantis"], result
        assert result["eur"] == 262.5, result
        events = {e["name"]: e for e in client.events()}
        assert "report.ready" in events, "the response event was emitted"
        print(f"result: {result}", flush=True)
        print(f"response event report.ready: {events['report.ready']['payload']}", flush=True)
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
