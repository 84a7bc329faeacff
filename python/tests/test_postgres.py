"""The Python worker and client on the PostgreSQL store.

The server is a throwaway one started by `switchyard dev-postgres` (initdb in
a temporary directory, 127.0.0.1 on a free port), stopped when the module's
tests are done. Needs the CLI (`SWITCHYARD_CLI`, set by `make test-python`)
and PostgreSQL's binaries (`make test` installs them).
"""

import os
import subprocess
import threading

import pytest

import switchyard

CLI = os.environ.get("SWITCHYARD_CLI")

pytestmark = pytest.mark.skipif(not CLI, reason="SWITCHYARD_CLI is not set (make test-python sets it)")


@pytest.fixture(scope="module")
def pg_store():
    server = subprocess.Popen([CLI, "dev-postgres"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("postgres://"), f"dev-postgres printed {url!r} (exit {server.poll()})"
        yield url
    finally:
        server.stdin.close()  # the server stops and removes its directory
        server.wait(timeout=60)


def test_sync_and_async_handlers_with_events_on_postgres(pg_store):
    w = switchyard.Worker(pg_store, concurrency=16, shutdown_grace=2.0)
    client = switchyard.Client(pg_store)
    seen = []
    lock = threading.Lock()

    @w.step("pg.double")
    def double(inp, ctx):
        with lock:
            seen.append(inp["n"])
        return {"n": inp["n"] * 2}

    @w.step("pg.approve")
    async def approve(inp, ctx):
        first = await ctx.checkpoint("first", lambda: inp)
        event = await ctx.await_event(f"pg.approved:{inp}")
        return {"first": first, "event": event}

    with w:
        ids = client.spawn_many([{"handler": "pg.double", "input": {"n": i}} for i in range(200)])
        assert [client.result(t, timeout=30)["n"] for t in ids] == [2 * i for i in range(200)]
        assert sorted(seen) == list(range(200)), "every task ran exactly once"

        waiting = client.spawn("pg.approve", "7")
        # The step suspends (its slot is freed) until the event arrives.
        assert client.emit("pg.approved:7", {"ok": True}) is True
        assert client.result(waiting, timeout=30) == {"first": "7", "event": {"ok": True}}
        assert client.get(waiting)["state"] == "completed"


def test_failures_and_bad_input_on_postgres(pg_store):
    w = switchyard.Worker(pg_store, shutdown_grace=2.0)
    client = switchyard.Client(pg_store)

    @w.step("pg.explode", retry=switchyard.Retry(max_attempts=1))
    def explode(inp, ctx):
        raise ValueError("kaboom on postgres")

    with w:
        bad = client.spawn("pg.explode", None)
        done = client.wait(bad, timeout=30)
        assert done["state"] == "failed"
        assert "kaboom on postgres" in str(done["error"])
        with pytest.raises(TypeError):
            client.spawn("pg.explode", {"not json": object()})
        with pytest.raises(switchyard.InvalidInput):
            client.spawn("", {})
