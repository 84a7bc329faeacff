import asyncio
import threading

import pytest

import switchyard
from switchyard import Decision, Retry, step

FAST = Retry(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


def test_sync_and_async_handlers(make_worker, client):
    w = make_worker()

    @w.step("double")
    def double(inp, ctx):
        assert isinstance(ctx, switchyard.Context)
        return {"value": inp["n"] * 2, "attempt": ctx.attempt, "task": ctx.task_id}

    @w.step("adouble")
    async def adouble(inp, ctx):
        assert isinstance(ctx, switchyard.AsyncContext)
        await asyncio.sleep(0)
        return inp["n"] * 2

    w.start()
    t1 = client.spawn("double", {"n": 21})
    t2 = client.spawn("adouble", {"n": 4})
    r1 = client.result(t1, timeout=10)
    assert r1["value"] == 42 and r1["attempt"] == 1 and r1["task"] == t1
    assert client.result(t2, timeout=10) == 8


def test_many_tasks_in_batches(make_worker, client):
    w = make_worker(concurrency=32)
    seen = set()
    lock = threading.Lock()

    @w.step("noop")
    def noop(inp, ctx):
        with lock:
            seen.add(inp["i"])
        return inp["i"]

    w.start()
    ids = client.spawn_many([{"handler": "noop", "input": {"i": i}} for i in range(500)])
    for i, tid in enumerate(ids):
        assert client.result(tid, timeout=30) == i
    assert seen == set(range(500))


def test_errors_classify(make_worker, client):
    w = make_worker()
    calls = {"perm": 0, "retry": 0, "boom": 0}

    @w.step("perm", retry=FAST)
    def perm(inp, ctx):
        calls["perm"] += 1
        raise switchyard.PermanentError("card declined")

    @w.step("retry", retry=FAST)
    def retry(inp, ctx):
        calls["retry"] += 1
        if ctx.attempt < 3:
            raise switchyard.RetryableError("try later", retry_after=0.01)
        return "third time"

    @w.step("boom", retry=FAST)
    def boom(inp, ctx):
        calls["boom"] += 1
        raise ValueError("unexpected")

    @w.step("invalid", retry=FAST)
    def invalid(inp, ctx):
        raise switchyard.InvalidInput("missing field `sku`")

    w.start()
    p, r, b, i = (client.spawn(n, {}) for n in ("perm", "retry", "boom", "invalid"))
    assert client.result(r, timeout=10) == "third time"
    assert calls["retry"] == 3
    for tid, msg in ((p, "card declined"), (b, "unexpected"), (i, "missing field")):
        t = client.wait(tid, timeout=10)
        assert t["state"] == "failed"
        assert msg in t["error"]["message"]
    assert calls["perm"] == 1
    assert calls["boom"] == 3
    # The Python traceback is stored on the step.
    steps = client.inspect(b)["steps"]
    assert "ValueError" in steps[0]["error"]["trace"] and "Traceback" in steps[0]["error"]["trace"]
    assert client.get(i)["error"]["kind"] == "invalid_input"
    with pytest.raises(switchyard.TaskFailed):
        client.result(p, timeout=1)


def test_unserialisable_result_names_the_type(make_worker, client):
    w = make_worker()

    class Money:
        pass

    @w.step("bad", retry=FAST)
    def bad(inp, ctx):
        return {"amount": Money()}

    w.start()
    t = client.wait(client.spawn("bad", {}), timeout=10)
    assert t["state"] == "failed"
    assert "Money" in t["error"]["message"] and "not JSON serialisable" in t["error"]["message"]


def test_checkpoint_runs_once_across_retries(make_worker, client):
    w = make_worker()
    charged = []

    @w.step("order", retry=FAST)
    def order(inp, ctx):
        receipt = ctx.checkpoint("charge", lambda: charged.append(1) or {"receipt": "r-1"})
        again = ctx.checkpoint("charge", lambda: "second call is numbered separately")
        if ctx.attempt == 1:
            raise RuntimeError("crash after charging")
        return [receipt, again]

    w.start()
    tid = client.spawn("order", {})
    assert client.result(tid, timeout=10) == [{"receipt": "r-1"}, "second call is numbered separately"]
    assert charged == [1]
    keys = [c["key"] for c in client.inspect(tid)["checkpoints"]]
    assert "order/charge" in keys and "order/charge#2" in keys


def test_events_before_and_after_await(make_worker, client):
    w = make_worker()

    @w.step("waiter")
    def waiter(inp, ctx):
        return ctx.await_event(inp["event"])

    @w.step("await_async")
    async def await_async(inp, ctx):
        return await ctx.await_event(inp["event"], timeout=30)

    w.start()
    assert client.emit("early", {"ok": 1}) is True
    assert client.emit("early", {"ok": 2}) is False  # first write wins
    t1 = client.spawn("waiter", {"event": "early"})
    assert client.result(t1, timeout=10) == {"ok": 1}

    t2 = client.spawn("waiter", {"event": "late"})
    t3 = client.spawn("await_async", {"event": "late"})
    _wait_state(client, t2, "suspended")
    client.emit("late", [1, 2])
    assert client.result(t2, timeout=10) == [1, 2]
    assert client.result(t3, timeout=10) == [1, 2]


def test_await_timeout_is_checkpointed(make_worker, client):
    w = make_worker()
    outcomes = []

    @w.step("patient", retry=FAST)
    def patient(inp, ctx):
        try:
            got = ctx.await_event("never", timeout=0.05)
        except switchyard.AwaitTimeout:
            got = "timed out"
        outcomes.append(got)
        if ctx.attempt == 1:
            raise RuntimeError("replay me")
        return got

    w.start()
    tid = client.spawn("patient", {})
    _wait_state(client, tid, "suspended")
    assert client.result(tid, timeout=10) == "timed out"
    client.emit("never", "too late")
    assert outcomes[-1] == "timed out"


def test_sleep_suspends_and_resumes(make_worker, client):
    w = make_worker()

    @w.step("nap")
    def nap(inp, ctx):
        ctx.sleep(0.2)
        return "rested"

    w.start()
    tid = client.spawn("nap", {})
    assert client.result(tid, timeout=10) == "rested"
    assert any(c["key"].startswith("$sleep") for c in client.inspect(tid)["checkpoints"])


def test_delegation_and_response_events(make_worker, client):
    w = make_worker()

    @w.step("inventory.reserve")
    def reserve(inp, ctx):
        return {"reserved": inp["sku"]}

    @w.step("payment.process")
    def pay(inp, ctx):
        if inp["amount"] < 0:
            raise switchyard.PermanentError("negative amount")
        return {"paid": inp["amount"]}

    @w.step("order.process")
    def process(inp, ctx):
        out = ctx.delegate_parallel(
            [("inventory.reserve", {"sku": "A1"}), {"handler": "payment.process", "input": {"amount": inp["amount"]}}]
        )
        return [(o["state"], o["result"]) for o in out]

    @w.step("requester")
    def requester(inp, ctx):
        one = ctx.delegate("inventory.reserve", {"sku": "B2"})
        child = ctx.spawn("payment.process", {"amount": 5})
        return {"one": one, "child": child}

    w.start()
    ok = client.spawn("order.process", {"amount": 10}, response_event="order.done:1")
    assert client.result(ok, timeout=10) == [["completed", {"reserved": "A1"}], ["completed", {"paid": 10}]]
    ev = {e["name"]: e["payload"] for e in client.events()}
    assert ev["order.done:1"]["result"] == [["completed", {"reserved": "A1"}], ["completed", {"paid": 10}]]

    bad = client.spawn("order.process", {"amount": -1})
    res = client.result(bad, timeout=10)
    assert res[0][0] == "completed" and res[1][0] == "failed"

    r = client.result(client.spawn("requester", {}), timeout=10)
    assert r["one"] == {"reserved": "B2"}
    assert client.result(r["child"], timeout=10) == {"paid": 5}


def test_decision_and_batch(make_worker, client):
    w = make_worker()
    sizes = []

    @w.decision("route")
    def route(inp, ctx):
        if inp.get("skip"):
            return Decision.complete("nothing to do")
        return Decision.create(
            [step("pack", input=inp), step("notify", input=inp), step("summary", depends_on=["pack", "notify"])],
            final_step="summary",
        )

    @w.step("pack")
    def pack(inp, ctx):
        return "packed"

    @w.step("notify")
    async def notify(inp, ctx):
        return "notified"

    @w.step("summary")
    def summary(inp, ctx):
        return ctx.dependency_results()

    @w.batch("square", max_batch=8, linger=0.05)
    def square(items):
        sizes.append(len(items))
        return [it.input * it.input if it.input != 3 else switchyard.PermanentError("no threes") for it in items]

    w.start()
    assert client.result(client.spawn("route", {}), timeout=10) == {"pack": "packed", "notify": "notified"}
    assert client.result(client.spawn("route", {"skip": True}), timeout=10) == "nothing to do"
    ids = client.spawn_many([{"handler": "square", "input": i} for i in range(20)])
    results = [client.wait(t, timeout=10) for t in ids]
    assert [r["result"] for r in results if r["state"] == "completed"] == [i * i for i in range(20) if i != 3]
    assert results[3]["state"] == "failed"
    assert max(sizes) <= 8 and sum(sizes) == 20


def test_api_classification(make_worker, client):
    w = make_worker()
    calls = {"429": 0}

    @w.api("remote", retry=FAST, rate_limit=1000, burst=10)
    def remote(inp, ctx):
        if inp == 404:
            raise switchyard.HttpError(404, "no such order")
        if inp == 429:
            calls["429"] += 1
            if calls["429"] == 1:
                raise switchyard.HttpError(429, "slow down", retry_after=0.01)
            return "after backoff"
        return "ok"

    w.start()
    assert client.result(client.spawn("remote", 200), timeout=10) == "ok"
    assert client.result(client.spawn("remote", 429), timeout=10) == "after backoff"
    t = client.wait(client.spawn("remote", 404), timeout=10)
    assert t["state"] == "failed" and "HTTP 404" in t["error"]["message"]


def test_cancellation_reaches_handlers(make_worker, client):
    w = make_worker()
    started = threading.Event()
    saw = {}

    @w.step("spin")
    def spin(inp, ctx):
        started.set()
        while not ctx.is_cancelled():
            threading.Event().wait(0.01)
        saw["sync"] = True
        return None

    @w.step("aspin")
    async def aspin(inp, ctx):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw["async"] = True
            raise

    w.start()
    t1 = client.spawn("spin", {})
    t2 = client.spawn("aspin", {})
    assert started.wait(10)
    _wait_state(client, t2, "running")
    assert client.cancel(t1) is True
    assert client.cancel(t2) is True
    assert client.wait(t1, timeout=10)["state"] == "cancelled"
    _until(lambda: saw.get("sync") and saw.get("async"))


def test_client_bad_input_and_idempotency(client):
    a = client.spawn("nobody.serves.this", {"x": 1}, idempotency_key="k-1")
    b = client.spawn("nobody.serves.this", {"x": 2}, idempotency_key="k-1")
    assert a == b
    assert client.get(a)["state"] == "running"
    with pytest.raises(switchyard.InvalidInput):
        client.spawn("", {})
    with pytest.raises(TypeError):
        client.spawn("x", {"when": object()})
    small = switchyard.Client(client.store, max_payload_bytes=100)
    with pytest.raises(switchyard.PayloadTooLarge):
        small.spawn("x", {"blob": "y" * 1000})
    with pytest.raises(switchyard.InvalidInput):
        client.get("not-a-uuid")
    with pytest.raises(switchyard.NotFound):
        client.get("00000000-0000-7000-8000-000000000000")
    with pytest.raises(switchyard.ConfigError):
        switchyard.Client("mysql://nope")
    with pytest.raises(switchyard.TimeoutError):
        client.result(a, timeout=0.05)


def test_a_worker_with_a_store_url_that_cannot_work_fails_at_construction(tmp_path):
    for store, says in [
        (f"sqlite:{tmp_path}/no/such/dir/x.db", f"directory `{tmp_path}/no/such/dir` does not exist"),
        ("mysql://u:s3cr3t@h/db", "unrecognised store URL `mysql://u:***@h/db`"),
        ("sqlite:x.db?synchronous=sometimes", "synchronous"),
        ("postgres://h/db?wakeup=never", "wakeup"),
    ]:
        with pytest.raises(switchyard.ConfigError) as e:
            switchyard.Worker(store)
        assert says in str(e.value) and "s3cr3t" not in str(e.value), str(e.value)


def test_async_client_and_context_manager(store):
    async def main():
        c = switchyard.Client(store)
        w = switchyard.Worker(store, shutdown_grace=1.0)

        @w.step("hello")
        async def hello(inp, ctx):
            return await ctx.checkpoint("greeting", lambda: f"hello {inp}")

        async with w:
            tid = await c.spawn_async("hello", "ada")
            return await c.result_async(tid, timeout=10)

    assert asyncio.run(main()) == "hello ada"


def _until(cond, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.01)


def _wait_state(client, tid, state):
    _until(lambda: any(s["state"] == state for s in client.inspect(tid)["steps"]))


def test_health_listen_serves_health_and_metrics(make_worker, client):
    import time
    import urllib.error
    import urllib.request

    w = make_worker(health_listen="127.0.0.1:0")

    @w.step("echo")
    def echo(inp, ctx):
        return inp

    assert w.health_addr is None
    w.start()
    addr = w.health_addr
    assert addr is not None and addr.startswith("127.0.0.1:")
    tid = client.spawn("echo", {"m": "PAYLOAD-MARKER-py"})
    client.result(tid, timeout=10)
    assert urllib.request.urlopen(f"http://{addr}/healthz").read() == b"ok\n"
    assert urllib.request.urlopen(f"http://{addr}/readyz").status == 200
    text = ""
    for _ in range(200):
        text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
        if 'switchyard_steps_completed_total{handler="echo"} 1' in text:
            break
        time.sleep(0.01)
    assert 'switchyard_steps_completed_total{handler="echo"} 1' in text
    assert 'lang="python"' in text
    assert "PAYLOAD-MARKER-py" not in text
    w.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{addr}/healthz", timeout=2)
    with pytest.raises(ValueError, match="health_listen must be an address"):
        switchyard.Worker("memory", health_listen="localhost:80")
