"""One concept, one name (README "Vocabulary"): every name of the table's
Python column exists on the installed package; and the error model behind
those names — what a task's outcome raises, how a handler's exception is
classified, durable control flow — against real workers on SQLite files."""

import os
import re

import pytest

import switchyard
from switchyard import Retry
from switchyard.errors import Suspend

from helpers import until

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
ONCE = Retry(max_attempts=1)
FAST = Retry(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)


def _python_column():
    """The names in the Python column of the README's vocabulary table."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Vocabulary\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col = header.index("Python")
    names = []
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names += re.findall(r"`([^`]+)`", cells[col])
    return names


def _missing(name):
    """None if `name` exists on the package, else why not."""
    owner, sep, member = re.split(r"([#.])", name, maxsplit=1) if re.search(r"[#.]", name) else (name, "", "")
    if not hasattr(switchyard, owner):
        return f"{name}: switchyard.{owner} does not exist"
    if sep and not hasattr(getattr(switchyard, owner), member):
        return f"{name}: switchyard.{owner} has no {'attribute' if sep == '#' else 'class attribute'} {member}"
    return None


def test_every_python_name_of_the_vocabulary_table_exists():
    names = _python_column()
    assert len(names) >= 25, names  # the table was found and read
    missing = [m for m in map(_missing, names) if m]
    assert not missing, "missing from the installed switchyard package:\n" + "\n".join(missing)


def test_the_check_itself_reports_missing_names():
    assert _missing("Worker#start") is None
    assert _missing("Worker#no_such_method")
    assert _missing("NoSuchClass")
    assert _missing("Context#step_name") is None


def test_a_failed_task_raises_task_failed_with_what_was_recorded(make_worker, client):
    w = make_worker()

    @w.step("declines", retry=ONCE)
    def declines(inp, ctx):
        raise switchyard.PermanentError("card declined")

    @w.step("flaky", retry=FAST)
    async def flaky(inp, ctx):
        raise ValueError("still broken")

    w.start()
    t = client.spawn("declines", {})
    with pytest.raises(switchyard.TaskFailed) as e:
        client.result(t, timeout=10)
    err = e.value
    assert isinstance(err, switchyard.Error)
    assert (err.task_id, err.kind, err.message, err.attempt) == (t, "permanent", "card declined", 1)
    assert "Traceback" in err.traceback and "card declined" in err.traceback
    assert t in str(err) and "card declined" in str(err)

    f = client.spawn("flaky", {})
    with pytest.raises(switchyard.TaskFailed) as e:
        client.result(f, timeout=10)
    assert (e.value.task_id, e.value.kind, e.value.attempt) == (f, "retryable", 2)
    assert e.value.message == "attempt 2 of 2 failed: ValueError: still broken"


def test_a_cancelled_task_raises_task_cancelled(client):
    t = client.spawn("unserved", {})
    client.cancel(t)
    with pytest.raises(switchyard.TaskCancelled) as e:
        client.result(t, timeout=5)
    assert e.value.task_id == t
    assert "cancel" in e.value.message
    assert not isinstance(e.value, switchyard.TaskFailed)


@pytest.mark.parametrize("is_async", [False, True])
def test_a_suspend_raised_by_hand_fails_its_step_permanently(make_worker, client, is_async):
    w = make_worker()
    if is_async:

        @w.step("fake")
        async def fake(inp, ctx):
            raise Suspend()

    else:

        @w.step("fake")
        def fake(inp, ctx):
            raise Suspend()

    w.start()
    t = client.spawn("fake", {})
    with pytest.raises(switchyard.TaskFailed) as e:
        client.result(t, timeout=10)
    assert e.value.kind == "permanent" and e.value.attempt == 1
    assert "raised Suspend but no context call asked it to" in e.value.message


def test_subclasses_of_our_exceptions_keep_their_class(make_worker, client):
    class Declined(switchyard.PermanentError):
        pass

    class Busy(switchyard.RetryableError):
        pass

    class BadField(switchyard.InvalidInput):
        pass

    calls = {"declined": 0, "busy": 0}
    w = make_worker()

    @w.step("declined", retry=Retry(max_attempts=3, initial_backoff=0.01))
    def declined(inp, ctx):
        calls["declined"] += 1
        raise Declined("no funds")

    @w.step("busy", retry=Retry(max_attempts=3, initial_backoff=0.01, max_backoff=0.02))
    async def busy(inp, ctx):
        calls["busy"] += 1
        raise Busy("try later")

    @w.step("badfield", retry=Retry(max_attempts=3, initial_backoff=0.01))
    def badfield(inp, ctx):
        raise BadField("no name")

    w.start()
    kinds = {}
    for name in ("declined", "busy", "badfield"):
        with pytest.raises(switchyard.TaskFailed) as e:
            client.result(client.spawn(name, {}), timeout=10)
        kinds[name] = (e.value.kind, e.value.attempt, e.value.message)
    assert kinds == {
        "declined": ("permanent", 1, "no funds"),
        "busy": ("retryable", 3, "attempt 3 of 3 failed: try later"),
        "badfield": ("invalid_input", 1, "invalid input: no name"),
    }
    assert calls == {"declined": 1, "busy": 3}


@pytest.mark.parametrize("is_async", [False, True])
def test_await_timeout_is_not_a_clients_timeout(make_worker, client, is_async):
    w = make_worker()
    seen = []
    if is_async:

        @w.step("catches")
        async def catches(inp, ctx):
            try:
                await ctx.await_event("never", timeout=0.05)
            except switchyard.AwaitTimeout as e:
                seen.append(e)
                return "carried on"

        @w.step("escapes", retry=FAST)
        async def escapes(inp, ctx):
            await ctx.await_event("never", timeout=0.05)

    else:

        @w.step("catches")
        def catches(inp, ctx):
            try:
                ctx.await_event("never", timeout=0.05)
            except switchyard.AwaitTimeout as e:
                seen.append(e)
                return "carried on"

        @w.step("escapes", retry=FAST)
        def escapes(inp, ctx):
            ctx.await_event("never", timeout=0.05)

    w.start()
    assert client.result(client.spawn("catches", {}), timeout=10) == "carried on"
    assert not isinstance(seen[0], switchyard.TimeoutError)
    assert seen[0].event == "never"
    # Escaping the handler, it fails the step permanently with the core's message.
    with pytest.raises(switchyard.TaskFailed) as e:
        client.result(client.spawn("escapes", {}), timeout=10)
    assert (e.value.kind, e.value.attempt) == ("permanent", 1)
    assert e.value.message == "timed out waiting for event `never`"
    # A client's wait that runs out is the other class.
    with pytest.raises(switchyard.TimeoutError) as e:
        client.result(client.spawn("unserved", {}), timeout=0.05)
    assert not isinstance(e.value, switchyard.AwaitTimeout)


def test_fifty_awaits_in_an_async_handler_cost_no_attempt(make_worker, client):
    w = make_worker()

    @w.step("approvals")
    async def approvals(inp, ctx):
        got = [await ctx.await_event(f"async-{i}") for i in range(50)]
        return {"sum": sum(got), "attempt": ctx.attempt, "run": ctx.run}

    w.start()
    tid = client.spawn("approvals", {})
    for i in range(50):
        until(lambda: any(s["state"] == "suspended" and s["run"] == i + 1 for s in client.inspect(tid)["steps"]))
        client.emit(f"async-{i}", 1)
    assert client.result(tid, timeout=30) == {"sum": 50, "attempt": 1, "run": 51}


def test_step_name_and_its_deprecated_alias(make_worker, client):
    w = make_worker()

    @w.step("named")
    def named(inp, ctx):
        with pytest.warns(DeprecationWarning, match="step_name"):
            old = ctx.step
        return [ctx.step_name, old]

    w.start()
    assert client.result(client.spawn("named", {}), timeout=10) == ["named", "named"]


def test_fan_out_plans_are_checked_by_the_core():
    d = switchyard.Decision.fan_out("count", total=5, batch_size=2, converge="sum")
    assert [s["name"] for s in d.steps] == ["count#0", "count#1", "count#2", "sum"]
    assert d.final_step == "sum"
    for total, size in ((-1, 2), (5, 0), (10**12, 1)):
        with pytest.raises(switchyard.InvalidInput):
            switchyard.Decision.fan_out("count", total=total, batch_size=size)
