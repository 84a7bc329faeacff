"""The durable context from sync and async handlers, handler options,
timeouts, cancellation and bad outcomes, against a real SQLite file."""

import asyncio
import threading

import pytest

import switchyard
from switchyard import Decision, Retry, step

from helpers import until, wait_step_state

FAST = Retry(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
ONCE = Retry(max_attempts=1)


def test_async_context_operations(make_worker, client):
    w = make_worker()
    computed = []

    @w.step("child")
    async def child(inp, ctx):
        return {"child": inp}

    @w.step("failing_child", retry=ONCE)
    def failing_child(inp, ctx):
        raise switchyard.PermanentError("child says no")

    @w.step("parent")
    async def parent(inp, ctx):
        async def compute():
            computed.append(ctx.attempt)
            return {"n": 7}

        cp = await ctx.checkpoint("compute", compute)
        plain = await ctx.checkpoint("plain", lambda: "sync fn is fine too")
        await ctx.emit("parent.emitted", {"from": ctx.task_id})
        spawned = await ctx.spawn("child", "fire-and-forget")
        one = await ctx.delegate("child", "one")
        many = await ctx.delegate_parallel([("child", "a"), {"handler": "failing_child", "input": None}])
        await ctx.heartbeat()
        await ctx.sleep(0.05)
        try:
            await ctx.await_event("never.async", timeout=0.05)
            timed_out = False
        except switchyard.AwaitTimeout:  # the same class as switchyard.TimeoutError
            timed_out = True
        return {
            "cp": cp,
            "plain": plain,
            "spawned": spawned,
            "one": one,
            "many": [(o["state"], o["result"]) for o in many],
            "child_error": many[1]["error"]["message"],
            "timed_out": timed_out,
            "cancelled": ctx.is_cancelled(),
        }

    w.start()
    tid = client.spawn("parent", {})
    r = client.result(tid, timeout=20)
    assert r["cp"] == {"n": 7} and r["plain"] == "sync fn is fine too"
    assert computed == [1]  # replays after each suspension reuse the checkpoint
    assert r["one"] == {"child": "one"}
    assert r["many"] == [["completed", {"child": "a"}], ["failed", None]]
    assert "child says no" in r["child_error"]
    assert r["timed_out"] is True and r["cancelled"] is False
    # The spawn is idempotent across replays: one child, and it ran.
    assert client.result(r["spawned"], timeout=10) == {"child": "fire-and-forget"}
    children = client.inspect(tid)["children"]
    assert len([c for c in children if c["handler"] == "child"]) == 3
    events = {e["name"]: e["payload"] for e in client.events()}
    assert events["parent.emitted"] == {"from": tid}


def test_sync_emit_heartbeat_and_headers(make_worker, client):
    w = make_worker()

    @w.step("announce")
    def announce(inp, ctx):
        ctx.heartbeat()
        first = ctx.emit_event("announced", {"by": ctx.step_name})
        again = ctx.emit("announced", "ignored")  # first write wins
        return {"first": first, "again": again, "headers": ctx.headers, "priority": ctx.priority,
                "handler": ctx.handler, "time_left": ctx.time_left is not None}

    w.start()
    tid = client.spawn("announce", {}, headers={"tenant": "acme"}, priority=3)
    r = client.result(tid, timeout=10)
    assert r == {"first": True, "again": False, "headers": {"tenant": "acme"}, "priority": 3,
                 "handler": "announce", "time_left": True}
    assert {e["name"]: e["payload"] for e in client.events()}["announced"] == {"by": "announce"}


def test_escaped_await_timeout_fails_the_step(make_worker, client):
    w = make_worker()

    @w.step("impatient")
    async def impatient(inp, ctx):
        return await ctx.await_event("never.comes", timeout=0.05)

    w.start()
    t = client.wait(client.spawn("impatient", {}), timeout=10)
    assert t["state"] == "failed"
    assert "timed out waiting for event `never.comes`" in t["error"]["message"]
    assert t["error"]["kind"] == "permanent"


def test_handler_timeout_reaches_sync_and_async_handlers(make_worker, client):
    w = make_worker()
    saw = {}

    @w.step("slow_sync", timeout=0.2, retry=ONCE)
    def slow_sync(inp, ctx):
        while not ctx.is_cancelled():
            threading.Event().wait(0.01)
        saw["sync"] = True
        return "too late"

    @w.step("slow_async", timeout=0.2, retry=ONCE)
    async def slow_async(inp, ctx):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw["async"] = True
            raise

    w.start()
    for name in ("slow_sync", "slow_async"):
        t = client.wait(client.spawn(name, {}), timeout=10)
        assert t["state"] == "failed", name
        assert t["error"]["kind"] == "timeout"
        assert f"handler `{name}` timed out" in t["error"]["message"]
    until(lambda: saw.get("sync") and saw.get("async"))


def test_concurrency_option_limits_parallel_runs(make_worker, client):
    w = make_worker(concurrency=16)
    lock = threading.Lock()
    active, peak = [0], [0]

    @w.step("one_at_a_time", concurrency=1)
    def one(inp, ctx):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.02)
        with lock:
            active[0] -= 1
        return inp

    w.start()
    ids = client.spawn_many([{"handler": "one_at_a_time", "input": i} for i in range(6)])
    assert [client.result(t, timeout=20) for t in ids] == list(range(6))
    assert peak[0] == 1


def test_bad_return_values_fail_naming_the_type(make_worker, client):
    w = make_worker()

    @w.step("aset", retry=FAST)
    async def aset(inp, ctx):
        return {"tags": {1, 2}}

    @w.step("nan", retry=FAST)
    def nan(inp, ctx):
        return float("nan")

    @w.step("intkeys", retry=FAST)
    def intkeys(inp, ctx):
        return {1: "one"}

    @w.decision("notadecision", retry=FAST)
    def notadecision(inp, ctx):
        return {"steps": []}

    @w.step("badcheckpoint", retry=FAST)
    def badcheckpoint(inp, ctx):
        return ctx.checkpoint("obj", lambda: object())

    w.start()
    expect = {
        "aset": "set",
        "nan": "nan",
        "intkeys": "dict keys must be str, not int",
        "notadecision": "dict",
        "badcheckpoint": "object",
    }
    for name, needle in expect.items():
        t = client.wait(client.spawn(name, {}), timeout=10)
        assert t["state"] == "failed", name
        assert needle in t["error"]["message"], (name, t["error"])
    # The result type is named in the message, not only the kind of failure.
    assert "not JSON serialisable" in client.get(client.list(handler="aset")[0]["id"])["error"]["message"]


def test_async_batch_and_api(make_worker, client):
    w = make_worker()
    batches = []

    @w.batch("abatch", max_batch=4, linger=0.05, retry=ONCE)
    async def abatch(items):
        batches.append(len(items))
        assert all(isinstance(i.ctx, switchyard.AsyncContext) for i in items)
        return [switchyard.InvalidInput("odd") if i.input % 2 else i.input // 2 for i in items]

    @w.api("aapi", rate_limit=500.0, retry=ONCE)
    async def aapi(inp, ctx):
        if inp == "down":
            raise switchyard.NetworkError("connection refused")
        if inp == "teapot":
            raise switchyard.HttpError(418, "I'm a teapot")
        return {"status": 200}

    w.start()
    ids = client.spawn_many([{"handler": "abatch", "input": i} for i in range(8)])
    tasks = [client.wait(t, timeout=10) for t in ids]
    assert [t["result"] for t in tasks if t["state"] == "completed"] == [0, 1, 2, 3]
    assert all(t["error"]["kind"] == "invalid_input" for t in tasks[1::2])
    assert max(batches) <= 4 and sum(batches) == 8
    assert client.result(client.spawn("aapi", "ok"), timeout=10) == {"status": 200}
    teapot = client.wait(client.spawn("aapi", "teapot"), timeout=10)
    assert teapot["state"] == "failed" and "HTTP 418" in teapot["error"]["message"]
    down = client.wait(client.spawn("aapi", "down"), timeout=10)
    assert down["state"] == "failed" and "network error: connection refused" in down["error"]["message"]


def test_decision_fan_out_async(make_worker, client):
    w = make_worker()

    @w.decision("split")
    async def split(inp, ctx):
        return Decision.fan_out("count", total=10, batch_size=4, input=inp, converge="total")

    @w.step("count")
    async def count(inp, ctx):
        return inp["end"] - inp["start"]

    @w.step("total")
    async def total(inp, ctx):
        deps = await ctx.dependency_results()
        return sum(deps.values())

    w.start()
    assert client.result(client.spawn("split", {}), timeout=15) == 10


def test_cancel_async_and_sync_running_steps(make_worker, client):
    w = make_worker()
    started = {"sync": threading.Event(), "async": threading.Event()}
    saw = {}

    @w.step("spin")
    def spin(inp, ctx):
        started["sync"].set()
        while not ctx.is_cancelled():
            threading.Event().wait(0.01)
        saw["sync"] = True

    @w.step("aspin")
    async def aspin(inp, ctx):
        started["async"].set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw["async"] = ctx.is_cancelled()
            raise

    w.start()
    t1, t2 = client.spawn("spin", {}), client.spawn("aspin", {})
    assert started["sync"].wait(10) and started["async"].wait(10)
    assert client.cancel(t1) is True and client.cancel(t2) is True
    assert client.wait(t1, timeout=10)["state"] == "cancelled"
    assert client.wait(t2, timeout=10)["state"] == "cancelled"
    until(lambda: saw.get("sync") is True and saw.get("async") is True)
    # The host keeps serving after cancellations.
    assert client.cancel(t1) is False


def test_run_async_stops_when_cancelled(store):
    async def main():
        c = switchyard.Client(store)
        w = switchyard.Worker(store, shutdown_grace=1.0)

        @w.step("ping")
        async def ping(inp, ctx):
            return "pong"

        runner = asyncio.ensure_future(w.run_async())
        tid = await c.spawn_async("ping", None)
        assert await c.result_async(tid, timeout=10) == "pong"
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        return await c.workers_async()

    assert asyncio.run(main()) == []


def test_suspended_step_frees_its_slot(make_worker, client):
    # With concurrency 1, a step waiting for an event must not block others.
    w = make_worker()

    @w.step("gate", concurrency=1)
    def gate(inp, ctx):
        if inp == "wait":
            return ctx.await_event("gate.open")
        return inp

    w.start()
    waiting = client.spawn("gate", "wait")
    wait_step_state(client, waiting, "suspended")
    assert client.result(client.spawn("gate", "pass"), timeout=10) == "pass"
    client.emit("gate.open", "opened")
    assert client.result(waiting, timeout=10) == "opened"


def test_sync_handlers_run_in_parallel_threads(make_worker, client):
    # Four steps that can only finish together: they must run on four threads
    # at once (a thread holding several queued jobs would deadlock here).
    w = make_worker(concurrency=8)
    barrier = threading.Barrier(4, timeout=20)
    threads = set()

    @w.step("together")
    def together(inp, ctx):
        threads.add(threading.get_ident())
        barrier.wait()
        return inp

    w.start()
    ids = client.spawn_many([{"handler": "together", "input": i} for i in range(4)])
    assert [client.result(t, timeout=30) for t in ids] == [0, 1, 2, 3]
    assert len(threads) == 4


def test_async_handlers_share_one_loop_concurrently(make_worker, client):
    w = make_worker()
    loops = set()
    state = {"started": 0}
    all_started = []

    @w.step("gather", concurrency=5)
    async def gather(inp, ctx):
        if not all_started:
            all_started.append(asyncio.Event())
        loops.add(id(asyncio.get_running_loop()))
        state["started"] += 1
        if state["started"] == 5:
            all_started[0].set()
        await all_started[0].wait()
        return inp

    w.start()
    ids = client.spawn_many([{"handler": "gather", "input": i} for i in range(5)])
    assert [client.result(t, timeout=20) for t in ids] == list(range(5))
    assert len(loops) == 1


def test_core_logs_reach_python_logging(make_worker, client, caplog):
    caplog.set_level("INFO", logger="switchyard")
    w = make_worker()

    @w.step("quiet")
    def quiet(inp, ctx):
        return inp

    w.start()
    assert client.result(client.spawn("quiet", 1), timeout=10) == 1
    w.stop()
    core = [r for r in caplog.records if r.name == "switchyard.core"]
    assert any("host started" in r.getMessage() and w.host_id in r.getMessage() for r in core)
    assert any("host stopped" in r.getMessage() for r in core)


def test_bad_durations_raise_invalid_input_and_do_not_crash(make_worker, client):
    # Issue item 5: negative, NaN, infinite or absurd (1e20 s panicked in
    # Rust) timeouts and sleeps raise InvalidInput naming the argument.
    w = make_worker()

    @w.step("bad.durations", retry=ONCE)
    def bad(inp, ctx):
        out = []
        for t in (-1, float("nan"), float("inf"), 1e20):
            try:
                ctx.await_event("never", timeout=t)
                out.append("no error")
            except switchyard.InvalidInput as e:
                out.append(str(e))
        try:
            ctx.sleep(1e20)
            out.append("no error")
        except switchyard.InvalidInput as e:
            out.append(str(e))
        return out

    @w.step("bad.sleep", retry=ONCE)
    def bad_sleep(inp, ctx):
        ctx.sleep(1e20)

    w.start()
    out = client.result(client.spawn("bad.durations", {}), timeout=10)
    assert len(out) == 5, out
    for msg in out[:3]:
        assert "await_event timeout must be a non-negative number of seconds" in msg, out
    assert "await_event timeout must be at most 100 years" in out[3], out
    assert "sleep duration must be at most 100 years" in out[4], out
    tid = client.spawn("bad.sleep", {})
    t = client.wait(tid, timeout=10)
    assert t["state"] == "failed"
    assert t["error"]["kind"] == "invalid_input", t["error"]
    with pytest.raises(switchyard.InvalidInput):
        client.wait(tid, timeout=float("nan"))


def test_waiting_fifty_times_costs_no_attempt(make_worker, client):
    """Issue 20: a step that awaits 50 events, or sleeps 50 times, completes
    under the default retry policy (5 attempts) on attempt 1; every resume is
    a new run."""
    w = make_worker()

    @w.step("approvals")
    def approvals(inp, ctx):
        got = [ctx.await_event(f"{inp['prefix']}-{i}") for i in range(50)]
        return {"sum": sum(got), "attempt": ctx.attempt, "run": ctx.run}

    @w.step("naps")
    async def naps(inp, ctx):
        for _ in range(50):
            await ctx.sleep(0.02)
        return {"attempt": ctx.attempt, "run": ctx.run}

    w.start()
    sleeper = client.spawn("naps", {})
    tid = client.spawn("approvals", {"prefix": "fifty"})
    for i in range(50):
        until(
            lambda: any(
                s["state"] == "suspended" and s["run"] == i + 1 and s["attempt"] == 0
                for s in client.inspect(tid)["steps"]
            )
        )
        client.emit(f"fifty-{i}", 1)
    assert client.result(tid, timeout=30) == {"sum": 50, "attempt": 1, "run": 51}
    out = client.result(sleeper, timeout=30)
    assert out["attempt"] == 1
    # A sleep whose time has already come returns without suspending.
    assert 2 <= out["run"] <= 51


def test_async_durable_calls_run_without_a_thread_pool(make_worker, client):
    # 80 async handlers, all inside durable calls at once: the calls are
    # coroutines driven by the core (no pool thread, no cap of 32).
    w = make_worker(concurrency=80)
    started = {"n": 0}
    gate = []

    @w.step("many", concurrency=80)
    async def many(inp, ctx):
        if not gate:
            gate.append(asyncio.Event())
        started["n"] += 1
        if started["n"] == 80:
            gate[0].set()
        await gate[0].wait()
        v = await ctx.checkpoint("v", lambda: inp * 2)
        await ctx.emit_event(f"many.{inp}", v)
        await ctx.heartbeat()
        return v

    w.start()
    ids = client.spawn_many([{"handler": "many", "input": i} for i in range(80)])
    assert [client.result(t, timeout=30) for t in ids] == [i * 2 for i in range(80)]
    pool = [t.name for t in threading.enumerate() if t.name.startswith("switchyard-ctx")]
    assert pool == [], f"durable calls ran on pool threads: {pool}"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_spawn_with_response_event_and_await_it(make_worker, client, kind):
    """ctx.spawn(..., response_event=...) emits the child's outcome as an
    event the parent awaits; its payload is a ResponseEvent."""
    w = make_worker()

    @w.step("child")
    def child(inp, ctx):
        if inp.get("fail"):
            raise switchyard.PermanentError("child says no")
        return inp["x"] * 2

    if kind == "sync":

        @w.step("parent")
        def parent(inp, ctx):
            name = f"child.done:{ctx.task_id}"
            child_id = ctx.spawn("child", inp, response_event=name)
            ev: switchyard.ResponseEvent = ctx.await_event(name, timeout=30)
            return {"child": child_id, "event": ev}

    else:

        @w.step("parent")
        async def parent(inp, ctx):
            name = f"child.done:{ctx.task_id}"
            child_id = await ctx.spawn("child", inp, response_event=name)
            ev: switchyard.ResponseEvent = await ctx.await_event(name, timeout=30)
            return {"child": child_id, "event": ev}

    @w.step("bad_name")
    def bad_name(inp, ctx):
        try:
            ctx.spawn("child", {"x": 1}, response_event="")
        except switchyard.InvalidInput as e:
            return f"refused: {e}"
        return "accepted"

    w.start()
    r = client.result(client.spawn("parent", {"x": 21}), timeout=30)
    ev = r["event"]
    assert ev == {"task_id": r["child"], "state": "completed", "result": 42, "error": None}
    r = client.result(client.spawn("parent", {"fail": True}), timeout=30)
    ev = r["event"]
    assert ev["task_id"] == r["child"] and ev["state"] == "failed" and ev["result"] is None
    assert ev["error"]["kind"] == "permanent" and ev["error"]["message"] == "child says no", ev
    refused = client.result(client.spawn("bad_name", {}), timeout=30)
    assert refused.startswith("refused: ") and "response_event" in refused, refused


def test_set_status_routes_and_refuses_a_bad_status(make_worker, client):
    w = make_worker()

    @w.decision("plan")
    def plan(inp, ctx):
        return Decision.create(
            [step("check", handler="check", input=inp, routes={"late": [step("chase", handler="chase")]})]
        )

    @w.step("check")
    def check(inp, ctx):
        try:
            ctx.set_status("")
        except switchyard.InvalidInput as e:
            bad = str(e)
        ctx.set_status("late")
        return {"bad": bad}

    @w.step("chase")
    def chase(inp, ctx):
        return ctx.dependency_results()

    w.start()
    t = client.spawn("plan", {})
    r = client.result(t, timeout=30)
    assert "status" in r["check"]["bad"], r
    steps = {s["name"]: s for s in client.inspect(t)["steps"]}
    assert steps["check"]["status"] == "late"
    assert list(steps["check"]["routes"]) == ["late"]
    assert steps["chase"]["state"] == "completed"
