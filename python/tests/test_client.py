"""Client: spawn, spawn_many, emit, result, cancel, retry, list, inspect,
sync and async, against a real SQLite file."""

import asyncio

import pytest

import switchyard
from switchyard import Retry

ONCE = Retry(max_attempts=1)


def test_cancel_and_retry_without_a_worker(client):
    t = client.spawn("unserved", {"x": 1})
    assert client.get(t)["state"] == "running"
    assert client.cancel(t) is True
    assert client.get(t)["state"] == "cancelled"
    assert client.cancel(t) is False  # already finished
    with pytest.raises(switchyard.TaskCancelled):
        client.result(t, timeout=1)
    client.retry(t)
    assert client.get(t)["state"] == "running"
    with pytest.raises(switchyard.Conflict):
        client.retry(t)  # only failed or cancelled tasks
    with pytest.raises(switchyard.NotFound):
        client.cancel("00000000-0000-7000-8000-000000000000")


def test_list_inspect_and_retry_after_a_fix(make_worker, client):
    w = make_worker()
    fixed = []

    @w.step("flaky", retry=ONCE)
    def flaky(inp, ctx):
        if not fixed:
            raise switchyard.PermanentError("broken dependency")
        return {"fixed": inp}

    w.start()
    ok = client.spawn("other", {})  # no handler: stays running
    bad = client.spawn("flaky", 1)
    assert client.wait(bad, timeout=10)["state"] == "failed"
    assert [t["id"] for t in client.list(state="failed")] == [bad]
    assert [t["id"] for t in client.list(handler="flaky")] == [bad]
    assert {t["id"] for t in client.list()} == {ok, bad}
    assert len(client.list(limit=1)) == 1
    with pytest.raises(switchyard.Error):
        client.list(state="bogus")
    detail = client.inspect(bad)
    assert detail["task"]["id"] == bad and detail["steps"][0]["error"]["kind"] == "permanent"
    assert "PermanentError" in detail["steps"][0]["error"]["trace"]
    fixed.append(True)
    client.retry(bad)
    assert client.result(bad, timeout=10) == {"fixed": 1}
    assert client.list(state="failed") == []
    assert client.count_steps().get("completed") == 1
    assert [h["handlers"] for h in client.workers()] == [["flaky"]]
    (host,) = client.workers()
    assert (host["language"], host["slots"]) == ("python", 64)  # the default concurrency


def test_spawn_options(make_worker, client):
    w = make_worker()

    @w.step("echo")
    def echo(inp, ctx):
        return {"input": inp, "headers": ctx.headers}

    w.start()
    tid = client.spawn("echo", [1, "two", None, True, 2.5], headers={"h": "v"}, idempotency_key="once",
                       response_event="echo.done")
    assert client.spawn("echo", "different", idempotency_key="once") == tid
    assert client.result(tid, timeout=10) == {"input": [1, "two", None, True, 2.5], "headers": {"h": "v"}}
    ev = {e["name"]: e["payload"] for e in client.events()}
    assert ev["echo.done"]["result"]["input"][1] == "two"
    client.emit("order.1", 1)
    client.emit("order.2", 2)
    client.emit("other", 3)
    assert sorted(e["name"] for e in client.events(name="order.")) == ["order.1", "order.2"]
    assert [e["name"] for e in client.events(limit=1, name="order.")] == ["order.2"], "newest first"
    assert client.events(name="nothing.like.it") == []
    ids = client.spawn_many([
        {"handler": "echo", "input": i, "priority": i, "headers": {"n": str(i)}} for i in range(3)
    ])
    assert [client.result(t, timeout=10)["headers"] for t in ids] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]
    assert client.spawn_many([]) == []
    with pytest.raises(switchyard.InvalidInput, match="task #1"):
        client.spawn_many([{"handler": "echo", "input": 1}, {"handler": "", "input": 2}])
    # Future run_at: the task exists but does not run yet.
    import time

    later = client.spawn("echo", "later", run_at=int(time.time() * 1000) + 3_600_000)
    assert client.get(later)["state"] == "running"
    assert client.inspect(later)["steps"][0]["state"] in ("pending", "ready", "scheduled")


def test_async_client_twins(make_worker, store):
    w = make_worker()

    @w.step("await_it")
    async def await_it(inp, ctx):
        return await ctx.await_event(inp)

    @w.step("fails", retry=ONCE)
    def fails(inp, ctx):
        raise switchyard.PermanentError("nope")

    w.start()

    async def main():
        c = switchyard.Client(store)
        t = await c.spawn_async("await_it", "go")
        many = await c.spawn_many_async([{"handler": "await_it", "input": "go"}] * 2)
        assert await c.emit_async("go", {"went": True}) is True
        assert await c.result_async(t, timeout=10) == {"went": True}
        assert [(await c.wait_async(x, timeout=10))["result"] for x in many] == [{"went": True}] * 2
        assert (await c.get_async(t))["state"] == "completed"
        assert (await c.inspect_async(t))["task"]["result"] == {"went": True}
        f = await c.spawn_async("fails", None)
        assert (await c.wait_async(f, timeout=10))["state"] == "failed"
        assert [x["id"] for x in await c.list_async(state="failed")] == [f]
        pending = await c.spawn_async("nobody", None)
        assert await c.cancel_async(pending) is True
        await c.retry_async(pending)
        assert (await c.get_async(pending))["state"] == "running"
        with pytest.raises(switchyard.TimeoutError):
            await c.result_async(pending, timeout=0.05)
        assert len(await c.workers_async()) == 1
        assert any(e["name"] == "go" for e in await c.events_async())

    asyncio.run(main())


def test_memory_store_is_shared_in_process(make_worker):
    # `memory` names one store per process while a client or worker holds it.
    client = switchyard.Client("memory")
    w = switchyard.Worker("memory", shutdown_grace=1.0)

    @w.step("mem")
    def mem(inp, ctx):
        return inp + 1

    with w:
        assert client.result(client.spawn("mem", 41), timeout=10) == 42
        assert switchyard.Client("memory").get(client.list()[0]["id"])["result"] == 42


def test_await_event_from_outside_a_task(make_worker, client):
    """Client.await_event: a caller waits for a task's response_event (sync
    and async), gets an event emitted earlier at once, and a clear timeout."""
    import asyncio
    import threading

    w = make_worker()

    @w.step("answer")
    def answer(inp, ctx):
        return {"answer": inp["q"]}

    w.start()
    got = {}

    def wait_for_reply():
        got["reply"] = client.await_event("reply.py", timeout=20)

    t = threading.Thread(target=wait_for_reply)
    t.start()
    tid = client.spawn("answer", {"q": 7}, response_event="reply.py")
    t.join(20)
    assert got["reply"]["task_id"] == tid
    assert got["reply"]["state"] == "completed"
    assert got["reply"]["result"] == {"answer": 7}
    assert got["reply"]["error"] is None

    client.emit("plain.py", {"n": 1})
    client.emit("plain.py", {"n": 2})
    assert client.await_event("plain.py", timeout=5) == {"n": 1}
    with pytest.raises(switchyard.TimeoutError, match="`never.py`"):
        client.await_event("never.py", timeout=0.2)
    with pytest.raises(switchyard.InvalidInput):
        client.await_event("", timeout=1)

    async def twin():
        waiting = asyncio.ensure_future(client.await_event_async("reply.async", 20))
        await asyncio.sleep(0.05)
        tid2 = await client.spawn_async("answer", {"q": 8}, response_event="reply.async")
        reply = await waiting
        return tid2, reply

    tid2, reply = asyncio.run(twin())
    assert reply["task_id"] == tid2 and reply["result"] == {"answer": 8}
