"""Tests that need a real separate Python process: signals and fork."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import switchyard

from helpers import wait_step_state

# `worker.run()` must notice SIGINT/SIGTERM promptly (it waits in short
# slices); these bounds only catch a hang, they are not timing assertions.
STOP_BOUND = 10


def _run_worker(store, body, grace=5.0):
    code = textwrap.dedent(
        """
        import sys, threading, asyncio, switchyard
        w = switchyard.Worker(sys.argv[1], shutdown_grace=float(sys.argv[2]))
        """
    ) + textwrap.dedent(body) + textwrap.dedent(
        """
        orig_start = w.start
        def start():
            orig_start()
            print("ready", flush=True)
        w.start = start
        w.run()
        print("stopped", flush=True)
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, store, str(grace)], stdout=subprocess.PIPE, text=True
    )


ECHO = """
@w.step("echo")
def echo(inp, ctx):
    return inp
"""

AECHO = """
@w.step("aecho")
async def aecho(inp, ctx):
    await asyncio.sleep(0)
    return inp
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("handlers", [ECHO, AECHO, ECHO + AECHO], ids=["sync", "async", "both"])
def test_signal_stops_worker_gracefully(store, client, sig, handlers):
    p = _run_worker(store, handlers)
    try:
        assert p.stdout.readline().strip() == "ready"
        name = "echo" if "def echo" in handlers else "aecho"
        tid = client.spawn(name, {"hi": 1})
        assert client.result(tid, timeout=15) == {"hi": 1}
        p.send_signal(sig)
        out, _ = p.communicate(timeout=STOP_BOUND)
        assert p.returncode == 0
        assert "stopped" in out
        assert client.workers() == []  # deregistered on the way out
    finally:
        if p.poll() is None:
            p.kill()


def test_running_step_finishes_within_grace_on_sigterm(store, client):
    # The handler is mid-run when SIGTERM arrives: it sees is_cancelled()
    # only once the grace period is over, and the step is handed back, not
    # failed; the next worker completes it.
    body = """
    @w.step("long")
    def long(inp, ctx):
        print("running", flush=True)
        while not ctx.is_cancelled():
            threading.Event().wait(0.01)
        raise RuntimeError("interrupted by shutdown")
    """
    p = _run_worker(store, body, grace=0.3)
    try:
        assert p.stdout.readline().strip() == "ready"
        tid = client.spawn("long", {})
        assert p.stdout.readline().strip() == "running"
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=STOP_BOUND)
        assert p.returncode == 0 and "stopped" in out
    finally:
        if p.poll() is None:
            p.kill()
    t = client.get(tid)
    assert t["state"] == "running"  # handed back, not failed
    w = switchyard.Worker(store)

    @w.step("long")
    def long_again(inp, ctx):
        return {"attempt": ctx.attempt}

    with w:
        assert client.result(tid, timeout=15)["attempt"] >= 1
    assert client.get(tid)["state"] == "completed"


def test_suspended_task_survives_a_worker_restart(store, client):
    body = """
    @w.step("approval")
    def approval(inp, ctx):
        return ctx.await_event("approved:" + inp)
    """
    p = _run_worker(store, body)
    try:
        assert p.stdout.readline().strip() == "ready"
        tid = client.spawn("approval", "42")
        wait_step_state(client, tid, "suspended")
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=STOP_BOUND)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
    client.emit("approved:42", {"by": "ada"})
    p = _run_worker(store, body)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert client.result(tid, timeout=15) == {"by": "ada"}
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=STOP_BOUND)
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_opens_its_own_client_and_refuses_the_parents(store):
    c = switchyard.Client(store)
    c.spawn("x", {})
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            try:
                c.spawn("x", {"from": "parent client in child"})
                code = 2  # the parent's store has no threads here: must refuse
            except switchyard.ConfigError as e:
                if "forked child" not in str(e):
                    code = 3
            mine = switchyard.Client(store)
            mine.spawn("x", {"from": "child"})
        except BaseException:
            code = code or 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    inputs = [t["input"] for t in c.list(handler="x")]
    assert {"from": "child"} in inputs
    assert {"from": "parent client in child"} not in inputs
    c.spawn("x", {"from": "parent after fork"})
