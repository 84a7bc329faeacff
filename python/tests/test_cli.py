"""A Python worker and the Rust CLI share one SQLite store.

Needs the `switchyard` binary: `SWITCHYARD_CLI=/path/to/switchyard` (the
`test-python` make target builds it and sets this).
"""

import json
import os
import subprocess

import pytest

import switchyard
from switchyard import Retry

CLI = os.environ.get("SWITCHYARD_CLI")

pytestmark = pytest.mark.skipif(not CLI, reason="SWITCHYARD_CLI is not set (make test-python sets it)")


def cli(store, *args, check=True):
    assert os.path.exists(CLI), f"SWITCHYARD_CLI={CLI} does not exist"
    p = subprocess.run([CLI, "--store", store, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def test_cli_and_python_worker_share_a_store(make_worker, store, client):
    w = make_worker()

    @w.step("greet")
    def greet(inp, ctx):
        return {"greeting": f"hello {inp['name']}"}

    @w.step("approve")
    async def approve(inp, ctx):
        return await ctx.await_event(f"approved:{inp}")

    @w.step("explode", retry=Retry(max_attempts=1))
    def explode(inp, ctx):
        raise ValueError("kaboom from python")

    w.start()
    # The CLI spawns and waits; the Python worker serves.
    out = cli(store, "--json", "spawn", "greet", "--input", '{"name": "ada"}', "--wait", "20")
    doc = json.loads(out.stdout)
    assert json.dumps(doc).count("hello ada") >= 1

    # A Python client spawns; the CLI emits the event the handler awaits.
    tid = client.spawn("approve", "7")
    cli(store, "emit", "approved:7", "--payload", '{"ok": true}')
    assert client.result(tid, timeout=20) == {"ok": True}

    # The Python traceback appears in `tasks show`.
    bad = client.spawn("explode", None)
    assert client.wait(bad, timeout=20)["state"] == "failed"
    shown = cli(store, "tasks", "show", bad).stdout
    assert "kaboom from python" in shown
    assert "Traceback" in shown and "ValueError" in shown

    # The CLI sees the Python host and its handlers.
    workers = json.loads(cli(store, "--json", "workers").stdout)
    assert "greet" in json.dumps(workers)

    # The CLI cancels and retries what Python spawned.
    idle = client.spawn("nobody.serves.this", None)
    cli(store, "cancel", idle)
    assert client.get(idle)["state"] == "cancelled"
    cli(store, "retry", idle)
    assert client.get(idle)["state"] == "running"
