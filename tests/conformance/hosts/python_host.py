"""The Python host of the conformance suite (tests/conformance/).

    python python_host.py --store sqlite:PATH --scenarios scenarios.json --log PATH [--async]

Registers every handler of the scenario file with the options the file gives
it (as sync handlers, or ``async def`` ones with --async), prints ``ready``
once registered, and runs until SIGTERM. Handlers append ``<task_id> <label>``
lines to the log where a scenario counts how often something ran.
"""

import argparse
import json
import os
import threading
import time

import switchyard

p = argparse.ArgumentParser()
p.add_argument("--store", required=True)
p.add_argument("--scenarios", required=True)
p.add_argument("--log", required=True)
p.add_argument("--async", dest="use_async", action="store_true")
args = p.parse_args()

with open(args.scenarios) as f:
    spec = json.load(f)
log_lock = threading.Lock()


def note(ctx, label):
    with log_lock, open(args.log, "a") as f:
        f.write(f"{ctx.task_id} {label}\n")


def summary(outcomes):
    """What conf_delegate_parallel_fails returns from the children's outcomes."""
    return {
        "states": [o["state"] for o in outcomes],
        "first": outcomes[0]["result"],
        "second_error": (outcomes[1]["error"] or {}).get("message"),
    }


def batch_item(input):
    """conf_batch's outcome for one item: a value, or an exception for it alone."""
    if input["n"] < 0:
        return switchyard.PermanentError(f"negative: {input['n']}")
    return {"double": input["n"] * 2}


def plan():
    """What conf_plan decides: two parts, then their sum, which depends on both."""
    return switchyard.Decision.create(
        [
            switchyard.step("a", handler="conf_plan_part", input={"n": 2}),
            switchyard.step("b", handler="conf_plan_part", input={"n": 3}),
            switchyard.step("sum", handler="conf_plan_sum", input={}, depends_on=["a", "b"]),
        ],
        final_step="sum",
    )


def route_plan(input):
    """What conf_route decides: one check, routed on its status."""
    return switchyard.Decision.create(
        [
            switchyard.step(
                "check",
                handler="conf_route_check",
                input=input,
                routes={
                    "ok": [switchyard.step("shipped", handler="conf_route_next", input={"route": "ok"})],
                    "out_of_stock": [
                        switchyard.step("backordered", handler="conf_route_next", input={"route": "out_of_stock"})
                    ],
                },
            )
        ]
    )


def route_check(input, ctx):
    if "status" in input:
        ctx.set_status(input["status"])
    return {"qty": input["qty"]}


def plan_sum(deps):
    return {"sum": sum(deps.values()), "from": sorted(deps)}


class Unrenderable(Exception):
    """An exception whose message cannot be rendered."""

    def __str__(self):
        raise ValueError("no message for you")

    def __repr__(self):
        raise ValueError("no repr either")


class Hostile(Exception):
    """An exception every attribute read of which raises (message, class,
    traceback, args...), and whose str() and repr() raise too."""

    def __getattribute__(self, name):
        raise RuntimeError(f"no attribute {name} for you")

    def __str__(self):
        raise RuntimeError("no str")

    def __repr__(self):
        raise RuntimeError("no repr")


def unrepresentable(what):
    """conf_unrepresentable's result: a value with no JSON form."""
    if what == "nan":
        return float("nan")
    if what == "cycle":
        d = {}
        d["self"] = d
        return d
    return object()


def sync_bodies():
    def conf_value(input, ctx):
        return {"echo": input}

    def conf_permanent(input, ctx):
        raise switchyard.PermanentError("nope")

    def conf_flaky(input, ctx):
        if ctx.attempt < 3:
            raise switchyard.RetryableError(f"flaky on attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}

    def conf_crash(input, ctx):
        raise RuntimeError("boom")

    def conf_checkpoint_once(input, ctx):
        def charge():
            note(ctx, "charge")
            return 42

        charged = ctx.checkpoint("charge", charge)
        if ctx.attempt == 1:
            raise switchyard.RetryableError("failed after the charge")
        return {"charged": charged}

    def conf_same_name(input, ctx):
        a = ctx.checkpoint("x", lambda: (note(ctx, "first"), 1)[1])
        b = ctx.checkpoint("x", lambda: (note(ctx, "second"), 2)[1])
        return [a, b]

    def conf_await(input, ctx):
        return {"got": ctx.await_event(input["event"], timeout=60)}

    def conf_await_timeout(input, ctx):
        ctx.await_event("never.sent", timeout=0.2)
        return "unreachable"

    def conf_suspensions(input, ctx):
        for _ in range(input["n"]):
            ctx.sleep(0.02)
        return {"slept": input["n"]}

    def conf_timeout(input, ctx):
        time.sleep(5)
        return "too late"

    def conf_unrenderable(input, ctx):
        raise Unrenderable()

    def conf_hostile(input, ctx):
        raise Hostile()

    def conf_hold(input, ctx):
        # Holds its slot until the driver's release file exists, or until
        # cancelled (shutdown), for at most 15 s.
        note(ctx, "start")
        for _ in range(750):
            if os.path.exists(args.log + ".release"):
                return {"released": True}
            if ctx.is_cancelled():
                note(ctx, "stopped")
                return "stopped"
            time.sleep(0.02)
        return "never released"

    def conf_unrepresentable(input, ctx):
        return unrepresentable(input["what"])

    def conf_queued_timeout(input, ctx):
        # Holds its handler's only slot for input["ms"] milliseconds.
        note(ctx, "started")
        time.sleep(input["ms"] / 1000)
        note(ctx, "finished")
        return {"slept": input["ms"]}

    conf_queued_cancel = conf_queued_timeout

    def conf_invalid(input, ctx):
        raise switchyard.InvalidInput("missing field `amount`")

    def conf_delegate_fails(input, ctx):
        return {"child": ctx.delegate("conf_permanent", {})}

    def conf_delegate_parallel_fails(input, ctx):
        out = ctx.delegate_parallel([("conf_value", {"i": 1}), ("conf_permanent", {})])
        return summary(out)

    def conf_cancel_running(input, ctx):
        note(ctx, "started")
        for _ in range(500):
            if ctx.is_cancelled():
                note(ctx, "saw cancel")
                raise switchyard.Cancelled("cancelled")
            time.sleep(0.02)
        return "never cancelled"

    def conf_cancel_suspended(input, ctx):
        note(ctx, "started")
        ctx.await_event("never.comes", timeout=60)
        return "unreachable"

    def conf_wrong_return(input, ctx):
        return 42

    def conf_batch(items):
        return [batch_item(i.input) for i in items]

    def conf_batch_fails(items):
        raise switchyard.PermanentError("the whole batch failed")

    def conf_plan(input, ctx):
        return plan()

    def conf_plan_part(input, ctx):
        return input["n"] * 10

    def conf_plan_sum(input, ctx):
        return plan_sum(ctx.dependency_results())

    def conf_route(input, ctx):
        return route_plan(input)

    def conf_route_check(input, ctx):
        return route_check(input, ctx)

    def conf_route_next(input, ctx):
        return {"input": input, "saw": ctx.dependency_results()}

    def conf_api_429(input, ctx):
        t0 = ctx.checkpoint("t0", lambda: time.time() * 1000)
        if ctx.attempt == 1:
            raise switchyard.HttpError(429, "slow down", retry_after=1.0)
        return {"attempt": ctx.attempt, "waited": time.time() * 1000 - t0 >= 900}

    return locals()


def async_bodies():
    import asyncio

    async def conf_value(input, ctx):
        return {"echo": input}

    async def conf_permanent(input, ctx):
        raise switchyard.PermanentError("nope")

    async def conf_flaky(input, ctx):
        if ctx.attempt < 3:
            raise switchyard.RetryableError(f"flaky on attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}

    async def conf_crash(input, ctx):
        raise RuntimeError("boom")

    async def conf_checkpoint_once(input, ctx):
        def charge():
            note(ctx, "charge")
            return 42

        charged = await ctx.checkpoint("charge", charge)
        if ctx.attempt == 1:
            raise switchyard.RetryableError("failed after the charge")
        return {"charged": charged}

    async def conf_same_name(input, ctx):
        a = await ctx.checkpoint("x", lambda: (note(ctx, "first"), 1)[1])
        b = await ctx.checkpoint("x", lambda: (note(ctx, "second"), 2)[1])
        return [a, b]

    async def conf_await(input, ctx):
        return {"got": await ctx.await_event(input["event"], timeout=60)}

    async def conf_await_timeout(input, ctx):
        await ctx.await_event("never.sent", timeout=0.2)
        return "unreachable"

    async def conf_suspensions(input, ctx):
        for _ in range(input["n"]):
            await ctx.sleep(0.02)
        return {"slept": input["n"]}

    async def conf_timeout(input, ctx):
        await asyncio.sleep(5)
        return "too late"

    async def conf_unrenderable(input, ctx):
        raise Unrenderable()

    async def conf_hostile(input, ctx):
        raise Hostile()

    async def conf_hold(input, ctx):
        note(ctx, "start")
        try:
            for _ in range(750):
                if os.path.exists(args.log + ".release"):
                    return {"released": True}
                if ctx.is_cancelled():
                    note(ctx, "stopped")
                    return "stopped"
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            note(ctx, "stopped")
            raise
        return "never released"

    async def conf_unrepresentable(input, ctx):
        return unrepresentable(input["what"])

    async def conf_queued_timeout(input, ctx):
        note(ctx, "started")
        await asyncio.sleep(input["ms"] / 1000)
        note(ctx, "finished")
        return {"slept": input["ms"]}

    conf_queued_cancel = conf_queued_timeout

    async def conf_invalid(input, ctx):
        raise switchyard.InvalidInput("missing field `amount`")

    async def conf_delegate_fails(input, ctx):
        return {"child": await ctx.delegate("conf_permanent", {})}

    async def conf_delegate_parallel_fails(input, ctx):
        out = await ctx.delegate_parallel([("conf_value", {"i": 1}), ("conf_permanent", {})])
        return summary(out)

    async def conf_cancel_running(input, ctx):
        # A cancelled task cancels this asyncio task: the sleep raises
        # CancelledError (is_cancelled is checked too, for completeness).
        note(ctx, "started")
        try:
            for _ in range(500):
                if ctx.is_cancelled():
                    note(ctx, "saw cancel")
                    raise switchyard.Cancelled("cancelled")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            note(ctx, "saw cancel")
            raise
        return "never cancelled"

    async def conf_cancel_suspended(input, ctx):
        note(ctx, "started")
        await ctx.await_event("never.comes", timeout=60)
        return "unreachable"

    async def conf_wrong_return(input, ctx):
        return 42

    async def conf_batch(items):
        return [batch_item(i.input) for i in items]

    async def conf_batch_fails(items):
        raise switchyard.PermanentError("the whole batch failed")

    async def conf_plan(input, ctx):
        return plan()

    async def conf_plan_part(input, ctx):
        return input["n"] * 10

    async def conf_plan_sum(input, ctx):
        return plan_sum(await ctx.dependency_results())

    async def conf_route(input, ctx):
        return route_plan(input)

    async def conf_route_check(input, ctx):
        return route_check(input, ctx)

    async def conf_route_next(input, ctx):
        return {"input": input, "saw": await ctx.dependency_results()}

    async def conf_api_429(input, ctx):
        t0 = await ctx.checkpoint("t0", lambda: time.time() * 1000)
        if ctx.attempt == 1:
            raise switchyard.HttpError(429, "slow down", retry_after=1.0)
        return {"attempt": ctx.attempt, "waited": time.time() * 1000 - t0 >= 900}

    return locals()


bodies = async_bodies() if args.use_async else sync_bodies()
worker = switchyard.Worker(args.store, concurrency=16, shutdown_grace=1.0)
for name, opts in spec["handlers"].items():
    retry = None
    if "max_attempts" in opts:
        retry = switchyard.Retry(
            max_attempts=opts["max_attempts"],
            initial_backoff=opts.get("initial_backoff", 1.0),
            max_backoff=opts.get("max_backoff", 300.0),
        )
    kind = opts.get("kind", "step")  # step, decision, api, batch
    extra = {}
    if kind == "batch":
        extra = {k: opts[k] for k in ("max_batch", "linger") if k in opts}
    if "concurrency" in opts:
        extra["concurrency"] = opts["concurrency"]
    getattr(worker, kind)(name, timeout=opts.get("timeout"), retry=retry, **extra)(bodies[name])
print("ready", flush=True)
worker.run()
