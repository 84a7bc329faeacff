"""The async client: every ``Client.*_async`` method is a coroutine whose core
call runs on the core's runtime (no thread pool), with the sync method's
results and errors, declared so ``mypy --strict`` accepts awaiting it.
Against the installed wheel and a real SQLite file."""

import asyncio
import gc
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import switchyard
from switchyard import Retry

ONCE = Retry(max_attempts=1)
MISSING = "00000000-0000-7000-8000-000000000000"
ASYNC_METHODS = [n for n in dir(switchyard.Client) if n.endswith("_async")]


def test_every_method_has_a_coroutine_twin_on_the_class():
    sync = {n for n in vars(switchyard.Client) if not n.startswith("_") and not n.endswith("_async")}
    assert sorted(ASYNC_METHODS) == sorted(f"{n}_async" for n in sync)
    for name in ASYNC_METHODS:
        # Defined on the class, not attached at runtime.
        assert name in vars(switchyard.Client), name
        assert inspect.iscoroutinefunction(getattr(switchyard.Client, name)), name


def test_pending_results_do_not_delay_other_calls(client):
    # Issue 21: on asyncio's default thread pool (min(32, cpus + 4) threads)
    # 40 pending result_async calls starved an emit_async for 17.7 s.
    async def main():
        never = [await client.spawn_async("nobody", i) for i in range(40)]
        waits = [asyncio.ensure_future(client.result_async(t, timeout=10)) for t in never]
        await asyncio.sleep(0.3)  # every wait is pending in the core
        assert not any(w.done() for w in waits)
        started = time.monotonic()
        assert await client.emit_async("still.served", {"ok": True}) is True
        t = await client.spawn_async("nobody", "later")
        assert (await client.get_async(t))["state"] == "running"
        elapsed = time.monotonic() - started
        assert not any(w.done() for w in waits)
        for w in waits:
            w.cancel()
        done = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(d, asyncio.CancelledError) for d in done)
        return elapsed

    elapsed = asyncio.run(asyncio.wait_for(main(), 30))
    assert elapsed < 2.0, f"emit/spawn/get took {elapsed:.1f} s behind 40 pending waits"


def _outcome(call):
    try:
        return ("ok", call())
    except Exception as e:  # noqa: BLE001 - compared below
        return ("raised", type(e), str(e))


def _both(c, name, *args, **kw):
    sync = _outcome(lambda: getattr(c, name)(*args, **kw))
    asyn = _outcome(lambda: asyncio.run(getattr(c, f"{name}_async")(*args, **kw)))
    return sync, asyn


def test_async_results_and_errors_match_sync(make_worker, store):
    w = make_worker()

    @w.step("echo")
    def echo(inp, ctx):
        return {"echo": inp}

    @w.step("fails", retry=ONCE)
    def fails(inp, ctx):
        raise switchyard.PermanentError("nope")

    w.start()
    c = switchyard.Client(store)
    small = switchyard.Client(store, max_payload_bytes=64)
    done = c.spawn("echo", [1, "two"])
    failed = c.spawn("fails", None)
    assert c.wait(done, timeout=10)["state"] == "completed"
    assert c.wait(failed, timeout=10)["state"] == "failed"
    cancelled = c.spawn("nobody", None)
    assert c.cancel(cancelled) is True
    pending = c.spawn("nobody", 1)

    same = [
        ("spawn", ("echo", {"k": 1}), {"idempotency_key": "same-key"}),
        ("spawn", ("",), {}),
        ("spawn", ("echo", object()), {}),
        ("spawn", ("echo", None), {"headers": {"h": 1}}),
        ("spawn_many", ([{"handler": "echo", "input": 1, "idempotency_key": "many-key"}],), {}),
        ("spawn_many", ([{"handler": "echo", "input": 1}, {"handler": "", "input": 2}],), {}),
        ("spawn_many", (["not a dict"],), {}),
        ("spawn_many", ([{"input": 1}],), {}),
        ("emit", ("", None), {}),
        ("emit", ("e", object()), {}),
        ("result", (done,), {"timeout": 5}),
        ("result", (failed,), {"timeout": 5}),
        ("result", (cancelled,), {"timeout": 5}),
        ("result", (pending,), {"timeout": 0.05}),
        ("result", (MISSING,), {"timeout": 1}),
        ("result", ("not-an-id",), {"timeout": 1}),
        ("result", (done,), {"timeout": -1}),
        ("result", (done,), {"timeout": float("nan")}),
        ("wait", (done,), {"timeout": 5}),
        ("wait", (pending,), {"timeout": 0.05}),
        ("wait", (MISSING,), {"timeout": 1}),
        ("get", (done,), {}),
        ("get", (MISSING,), {}),
        ("get", ("not-an-id",), {}),
        ("inspect", (failed,), {}),
        ("inspect", (MISSING,), {}),
        ("list", (), {"state": "failed"}),
        ("list", (), {"handler": "fails", "limit": 1}),
        ("list", (), {"state": "bogus"}),
        ("cancel", (done,), {}),
        ("cancel", (MISSING,), {}),
        ("retry", (done,), {}),
        ("retry", (MISSING,), {}),
        ("events", (), {"limit": 5}),
    ]
    for name, args, kw in same:
        sync, asyn = _both(c, name, *args, **kw)
        assert sync == asyn, (name, args, kw)
    # The error cases above did raise, with the classes the sync client raises.
    assert _both(c, "get", MISSING)[1][1] is switchyard.NotFound
    assert _both(c, "result", pending, timeout=0.05)[1][1] is switchyard.TimeoutError
    assert _both(c, "result", failed, timeout=5)[1][0] == "raised"
    assert _both(c, "spawn", "")[1][1] is switchyard.InvalidInput
    assert _both(small, "spawn", "echo", "x" * 100)[1][1] is switchyard.PayloadTooLarge
    assert _both(small, "emit", "big", "x" * 100)[1][1] is switchyard.PayloadTooLarge

    # Hosts (their heartbeat times move): the same hosts.
    assert [h["id"] for h in asyncio.run(c.workers_async())] == [h["id"] for h in c.workers()]
    # Calls that change state: same answers on the same state.
    assert asyncio.run(c.emit_async("once", 1)) is True
    assert c.emit("once", 2) is False and asyncio.run(c.emit_async("once", 3)) is False
    t = asyncio.run(c.spawn_async("nobody", None))
    assert asyncio.run(c.cancel_async(t, cascade=True)) is True
    assert asyncio.run(c.cancel_async(t)) is False
    asyncio.run(c.retry_async(t))
    assert c.get(t)["state"] == "running"
    assert asyncio.run(c.count_steps_async()) == c.count_steps()
    ids = asyncio.run(c.spawn_many_async([{"handler": "echo", "input": i} for i in range(3)]))
    assert [c.result(i, timeout=10) for i in ids] == [{"echo": 0}, {"echo": 1}, {"echo": 2}]
    assert asyncio.run(c.spawn_many_async([])) == []


def test_cancelling_an_awaiting_task_leaves_the_client_usable(make_worker, client):
    w = make_worker()

    @w.step("echo")
    def echo(inp, ctx):
        return inp

    async def main():
        pending = await client.spawn_async("nobody", None)
        for _ in range(20):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.result_async(pending, timeout=30), 0.01)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.wait_async(pending, timeout=30), 0.01)
        # Cancelled at once, and while the call may be in flight.
        for delay in (0, 0, 0.001, 0.005):
            call = asyncio.ensure_future(client.spawn_async("echo", "cancelled", idempotency_key=f"c{delay}"))
            await asyncio.sleep(delay)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
        # A coroutine made and never awaited is harmless.
        client.get_async(pending).close()
        client._n.result_async(pending, 30)
        w.start()
        t = await client.spawn_async("echo", {"after": "cancel"})
        assert await client.result_async(t, timeout=10) == {"after": "cancel"}
        assert (await client.get_async(pending))["state"] == "running"

    asyncio.run(main())
    assert client.get(client.spawn("echo", 1))["state"] in ("running", "completed")


def test_a_cancelled_wait_is_aborted_in_the_core():
    # The core call behind a cancelled await stops at once instead of running
    # to its timeout: it holds the client (and so the process's `memory`
    # store) no longer.
    async def main():
        c = switchyard.Client("memory")
        t = await c.spawn_async("nobody", None)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.result_async(t, timeout=60), 0.05)
        return t

    t = asyncio.run(main())
    gc.collect()
    deadline = time.monotonic() + 10
    while t in [x["id"] for x in switchyard.Client("memory").list()]:
        assert time.monotonic() < deadline, "the cancelled wait still holds the store"
        time.sleep(0.05)


def test_many_concurrent_coroutines_all_complete(make_worker, client):
    w = make_worker(concurrency=64)

    @w.step("double")
    def double(inp, ctx):
        return inp * 2

    w.start()

    async def main():
        ids = await asyncio.gather(*(client.spawn_async("double", i) for i in range(500)))
        assert len(set(ids)) == 500
        results = await asyncio.gather(*(client.result_async(t, timeout=60) for t in ids))
        assert results == [i * 2 for i in range(500)]

    asyncio.run(asyncio.wait_for(main(), 120))
    assert client.count_steps().get("completed") == 500


def test_the_client_outlives_its_event_loop(make_worker, client):
    w = make_worker()

    @w.step("echo")
    def echo(inp, ctx):
        return inp

    w.start()
    pending = client.spawn("nobody", None)

    async def leave_a_wait_behind():
        asyncio.ensure_future(client.result_async(pending, timeout=30))
        return await client.result_async(await client.spawn_async("echo", "first"), timeout=10)

    # asyncio.run closes the loop, cancelling the wait left behind.
    assert asyncio.run(leave_a_wait_behind()) == "first"

    async def again(tag):
        return await client.result_async(await client.spawn_async("echo", tag), timeout=10)

    assert asyncio.run(again("second")) == "second"
    # A loop closed under a pending wait: the core answers after the close.
    closed = asyncio.new_event_loop()

    async def start_a_wait():
        return asyncio.ensure_future(client.result_async(pending, timeout=0.2))

    left = closed.run_until_complete(start_a_wait())
    closed.close()
    time.sleep(0.5)
    assert not left.done()
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(again("third")) == "third"
    finally:
        loop.close()
    # Loops on two threads at once.
    out = {}

    def in_thread():
        out["thread"] = asyncio.run(again("thread"))

    th = threading.Thread(target=in_thread)
    th.start()
    assert asyncio.run(again("main")) == "main"
    th.join(30)
    assert out == {"thread": "thread"}
    assert client.result(client.spawn("echo", "sync"), timeout=10) == "sync"


def test_sync_waits_release_the_gil(client):
    pending = client.spawn("nobody", None)
    waiters = [threading.Thread(target=_outcome, args=(lambda: client.result(pending, timeout=4),)) for _ in range(4)]
    for t in waiters:
        t.start()
    time.sleep(0.2)
    # Holding the GIL while waiting would stop this thread until the waits end.
    t = client.spawn("nobody", "meanwhile")
    assert client.get(t)["state"] == "running"
    assert all(w.is_alive() for w in waiters)
    for w in waiters:
        w.join(30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_async_calls_in_a_forked_child(store):
    parent = switchyard.Client(store)
    # Async calls made here before the fork (this process's wake-ups started).
    assert asyncio.run(parent.spawn_many_async([{"handler": "x", "input": "parent"}]))
    pid = os.fork()
    if pid == 0:
        code = 0
        try:

            async def child():
                try:
                    await parent.spawn_async("x", "parent client in child")
                    return 2  # the parent's store has no threads here: must refuse
                except switchyard.ConfigError as e:
                    if "forked child" not in str(e):
                        return 3
                mine = switchyard.Client(store)
                t = await mine.spawn_async("x", "child")
                return 0 if (await mine.get_async(t))["input"] == "child" else 5

            code = asyncio.run(asyncio.wait_for(child(), 20))
        except BaseException:
            code = code or 4
        os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.WEXITSTATUS(status) == 0
    assert sorted(t["input"] for t in parent.list(handler="x")) == ["child", "parent"]


PROGRAM = """
import asyncio
from typing import Any, Dict, List

import switchyard


async def main(c: switchyard.Client) -> None:
    tid: str = await c.spawn_async(
        "h", {"x": 1}, priority=1, idempotency_key="k", response_event="r", headers={"a": "b"}, run_at=None
    )
    ids: List[str] = await c.spawn_many_async([{"handler": "h", "input": 1}])
    stored: bool = await c.emit_async("e", {"p": 1})
    value: Any = await c.result_async(tid, timeout=1.0)
    task: Dict[str, Any] = await c.wait_async(tid, timeout=1.0)
    event: Any = await c.await_event_async("e", timeout=1.0)
    got: Dict[str, Any] = await c.get_async(tid)
    detail: Dict[str, Any] = await c.inspect_async(tid)
    tasks: List[Dict[str, Any]] = await c.list_async(state="failed", handler="h", limit=10)
    was: bool = await c.cancel_async(tid, cascade=True)
    await c.retry_async(tid)
    hosts: List[Dict[str, Any]] = await c.workers_async()
    events: List[Dict[str, Any]] = await c.events_async(limit=5)
    counts: Dict[str, int] = await c.count_steps_async()
    later: "asyncio.Task[Dict[str, Any]]" = asyncio.ensure_future(c.get_async(ids[0]))
    print(stored, value, task, got, detail, tasks, was, hosts, events, counts, await later)


asyncio.run(main(switchyard.Client("sqlite:unused.db")))
"""

WRONG = """
import switchyard


async def main(c: switchyard.Client) -> None:
    n: int = await c.spawn_async("h", None)
    c.emit_async("e", None, 1)
"""


def _mypy(tmp_path, *args):
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / ".mypy_cache"))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def _mypy_program(tmp_path, source):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(source))
    return _mypy(tmp_path, str(prog))


def test_mypy_strict_accepts_awaiting_every_async_method(tmp_path):
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed in the test environment (mk/python.mk installs it)")
    # The program above awaits every async method.
    assert {m for m in ASYNC_METHODS if f"c.{m}(" not in PROGRAM} == set()
    ok = _mypy_program(tmp_path, PROGRAM)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Precise types, not Any: mistakes are caught.
    bad = _mypy_program(tmp_path, WRONG)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert 'Incompatible types in assignment (expression has type "str", variable has type "int")' in bad.stdout
    assert 'Too many arguments for "emit_async" of "Client"' in bad.stdout
    assert 'Value of type "Coroutine[Any, Any, bool]" must be used' in bad.stdout
    # The installed Client against the installed stub: the native twins are
    # declared as coroutines of the types Client returns.
    client = _mypy(tmp_path, "--follow-imports=silent", "-m", "switchyard._client")
    assert client.returncode == 0, client.stdout + client.stderr
