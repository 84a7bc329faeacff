"""How the Python host behaves when handlers block, outlive their step,
raise odd exceptions or ask the process to exit. Each test runs the real
extension on a real SQLite file."""

import asyncio
import threading
import time

import pytest

import switchyard
from switchyard import Retry

from helpers import until


def test_concurrency_n_runs_n_blocking_sync_handlers_at_once(make_worker, client):
    # Every body waits for all the others: this completes only if the host
    # runs `concurrency` sync bodies at the same time (a hidden cap on the
    # thread pool left 8 of them queued and broke the barrier).
    n = 40
    w = make_worker(concurrency=n)
    barrier = threading.Barrier(n, timeout=15)

    @w.step("meet", retry=1)
    def meet(inp, ctx):
        barrier.wait()
        return inp

    w.start()
    ids = client.spawn_many([{"handler": "meet", "input": i} for i in range(n)])
    for i, tid in enumerate(ids):
        assert client.result(tid, timeout=30) == i


def test_a_job_the_core_gave_up_on_never_starts(make_worker, client):
    # One slot and one thread. The first body blocks until released, long
    # past its 0.3 s timeout; meanwhile the core times it out, then claims
    # the other attempts one by one and pushes them to the busy thread, where
    # each times out too while still queued. Once released, the thread finds
    # only abandoned jobs: none of their bodies may start.
    w = make_worker(concurrency=1)
    release = threading.Event()
    lock = threading.Lock()
    begun = []  # (step_id, attempt) in start order
    running = set()  # step ids whose body is running now
    overlaps = []

    @w.step("slow", timeout=0.3, retry=Retry(max_attempts=2, initial_backoff=0.01, max_backoff=0.01))
    def slow(inp, ctx):
        with lock:
            if ctx.step_id in running:
                overlaps.append((ctx.step_id, ctx.attempt))
            running.add(ctx.step_id)
            begun.append((ctx.step_id, ctx.attempt))
            first = len(begun) == 1
        try:
            if first:
                assert release.wait(30)
        finally:
            with lock:
                running.discard(ctx.step_id)
        return None

    w.start()
    ids = client.spawn_many([{"handler": "slow", "input": i} for i in range(5)])
    # 5 steps x 2 attempts = 10 jobs, every one timed out by the core.
    for tid in ids:
        t = client.wait(tid, timeout=30)
        assert t["state"] == "failed" and "timed out" in t["error"]["message"], t
    release.set()
    w.stop()  # the thread drains the queue (skipping abandoned jobs) and exits
    assert len(begun) == 1, f"bodies started for abandoned jobs: {begun}"
    assert begun[0][1] == 1
    assert overlaps == []


class BadStr(Exception):
    def __str__(self):
        raise ValueError("no text")


class BadStrAndRepr(Exception):
    def __str__(self):
        raise ValueError("no text")

    def __repr__(self):
        raise RuntimeError("no repr either")


class BadRetryable(switchyard.RetryableError):
    def __str__(self):
        raise ValueError("no text")


def test_an_exception_that_cannot_be_printed_fails_its_step_promptly(make_worker, client):
    # Describing the failure used to raise inside the glue, so the step was
    # never answered and hung until the handler timeout (300 s by default).
    w = make_worker()

    @w.step("bad_str", retry=1)
    def bad_str(inp, ctx):
        raise BadStr()

    @w.step("bad_both", retry=1)
    def bad_both(inp, ctx):
        raise BadStrAndRepr()

    @w.step("bad_retryable", retry=1)
    def bad_retryable(inp, ctx):
        raise BadRetryable()

    @w.step("abad_both", retry=1)
    async def abad_both(inp, ctx):
        raise BadStrAndRepr()

    @w.step("good")
    def good(inp, ctx):
        return "fine"

    w.start()
    expected = {
        "bad_str": "<exception BadStr: str() raised ValueError>",
        "bad_both": "<exception BadStrAndRepr: str() raised ValueError>",
        "bad_retryable": "<exception BadRetryable: str() raised ValueError>",
        "abad_both": "<exception BadStrAndRepr: str() raised ValueError>",
    }
    tasks = {name: client.spawn(name, {}) for name in expected}
    good_task = client.spawn("good", {})
    for name, tid in tasks.items():
        t = client.wait(tid, timeout=15)
        assert t["state"] == "failed", t
        assert t["error"]["message"].endswith(": " + expected[name]), t
    assert client.result(good_task, timeout=15) == "fine"


def _quitter(w, name, exc, is_async):
    if is_async:

        @w.step(name, retry=1)
        async def quit_async(inp, ctx):
            raise exc

    else:

        @w.step(name, retry=1)
        def quit_sync(inp, ctx):
            raise exc


def _runs_again_on_its_first_attempt(store, client, name, tid):
    # retry=1: had the exit cost the step its only attempt, the task would
    # have failed instead of coming back for another host.
    other = switchyard.Worker(store, shutdown_grace=2.0)

    @other.step(name, retry=1)
    def again(inp, ctx):
        return ctx.attempt

    with other:
        assert client.result(tid, timeout=15) == 1


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_system_exit_in_a_handler_stops_the_host_and_is_raised_by_run(store, client, is_async):
    w = switchyard.Worker(store, shutdown_grace=0.5)
    _quitter(w, "quit", SystemExit(3), is_async)
    tid = client.spawn("quit", {})
    # Without the fix run() would serve forever: stop it from outside so the
    # test fails instead of hanging (run() then returns without raising).
    safety = threading.Timer(30, w.stop)
    safety.start()
    try:
        with pytest.raises(SystemExit) as raised:
            w.run()
    finally:
        safety.cancel()
    assert raised.value.code == 3
    w.stop()  # raised once only
    step = client.inspect(tid)["steps"][0]
    assert step["state"] == "ready", step
    _runs_again_on_its_first_attempt(store, client, "quit", tid)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_keyboard_interrupt_in_a_handler_stops_the_host_and_is_raised_by_stop(store, client, is_async):
    # (It used to be retried like any error, the host serving on.)
    w = switchyard.Worker(store, shutdown_grace=0.5)
    _quitter(w, "interrupt", KeyboardInterrupt(), is_async)
    w.start()
    tid = client.spawn("interrupt", {})
    # The host stops by itself (it deregisters last) and hands the step back.
    host = w.host_id
    until(lambda: all(h["id"] != host for h in client.workers()))
    step = client.inspect(tid)["steps"][0]
    assert step["state"] == "ready", step
    with pytest.raises(KeyboardInterrupt):
        w.stop()
    w.stop()  # raised once only
    _runs_again_on_its_first_attempt(store, client, "interrupt", tid)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_stop_waits_for_bodies_the_core_gave_up_on(make_worker, client, is_async):
    # The core times the step out at 0.2 s, but its body ignores that and
    # goes on: stop() must not return before it ends, as long as that is
    # within the grace period (10 s). The sync body outlasts the 5 s that
    # stop() used to give handler threads whatever the grace period.
    w = make_worker(shutdown_grace=10.0)
    started = threading.Event()
    finished = threading.Event()

    if is_async:

        @w.step("linger", timeout=0.2, retry=1)
        async def linger_async(inp, ctx):
            started.set()
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.0
            while loop.time() < end:
                try:
                    await asyncio.sleep(end - loop.time())
                except asyncio.CancelledError:
                    pass  # this body will not be hurried
            finished.set()

    else:

        @w.step("linger", timeout=0.2, retry=1)
        def linger_sync(inp, ctx):
            started.set()
            time.sleep(6.0)  # ignores ctx.is_cancelled()
            finished.set()

    w.start()
    tid = client.spawn("linger", {})
    assert started.wait(15)
    t = client.wait(tid, timeout=15)
    assert t["state"] == "failed" and "timed out" in t["error"]["message"], t
    assert not finished.is_set()
    w.stop()
    assert finished.is_set(), "stop() returned while a handler body was still running"


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_stop_waits_for_bodies_handed_back_at_the_end_of_the_grace(make_worker, client, is_async):
    # A body still running when the grace period ends is handed back by the
    # core; stop() still waits (a little) for it to return.
    w = make_worker(shutdown_grace=0.3)
    started = threading.Event()
    finished = threading.Event()

    if is_async:

        @w.step("overrun")
        async def overrun_async(inp, ctx):
            started.set()
            loop = asyncio.get_running_loop()
            end = loop.time() + 0.8
            while loop.time() < end:
                try:
                    await asyncio.sleep(end - loop.time())
                except asyncio.CancelledError:
                    pass
            finished.set()

    else:

        @w.step("overrun")
        def overrun_sync(inp, ctx):
            started.set()
            time.sleep(0.8)
            finished.set()

    w.start()
    client.spawn("overrun", {})
    assert started.wait(15)
    w.stop()
    assert finished.is_set(), "stop() returned while a handler body was still running"


def test_odd_exceptions_fail_only_their_step_saying_why(make_worker, client):
    # An HttpError whose status is no HTTP status, a batch result that is not
    # a list, a decision that is not a Decision: each fails its own step
    # permanently with a message naming what was wrong.
    w = make_worker()

    @w.api("badstatus", retry=Retry(max_attempts=3, initial_backoff=0.01))
    def badstatus(inp, ctx):
        raise switchyard.HttpError(10**6, "odd")

    @w.batch("notalist", retry=Retry(max_attempts=1))
    def notalist(items):
        return 42

    @w.decision("notadecision", retry=Retry(max_attempts=3, initial_backoff=0.01))
    def notadecision(inp, ctx):
        return {"steps": []}

    w.start()
    expect = {
        "badstatus": "raised HttpError with status 1000000, which is not an HTTP status code",
        "notalist": "TypeError: 'int' object is not iterable",
        "notadecision": "returned dict, not switchyard.Decision",
    }
    for name, needle in expect.items():
        with pytest.raises(switchyard.TaskFailed) as e:
            client.result(client.spawn(name, {}), timeout=10)
        assert needle in e.value.message, (name, e.value)
    for name in ("badstatus", "notadecision"):
        with pytest.raises(switchyard.TaskFailed) as e:
            client.result(client.spawn(name, {}), timeout=10)
        assert (e.value.kind, e.value.attempt) == ("permanent", 1), e.value
