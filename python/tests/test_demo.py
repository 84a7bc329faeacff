"""`make demo` with its Python step: the Rust order workflow on one SQLite
file, `notify.customer` served by a Python worker process
(examples/python/notify_worker.py) using the installed wheel.

Needs the demo binary: `SWITCHYARD_DEMO=/path/to/demo` (make test-python sets it).
"""

import json
import os
import subprocess
import sys

import pytest

DEMO = os.environ.get("SWITCHYARD_DEMO")
pytestmark = pytest.mark.skipif(not DEMO, reason="SWITCHYARD_DEMO is not set (make test-python sets it)")


def test_demo_runs_the_notify_step_in_python(tmp_path):
    store = f"sqlite:{tmp_path / 'demo.db'}"
    proc = subprocess.run(
        [DEMO, "--python", sys.executable, "--store", store],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "serves notify.customer" in out, out
    assert "Python worker stopped (exit status: 0)" in out, out
    # The task's result carries what the Python step returned.
    start = proc.stdout.index("\n{\n")
    result = json.loads(proc.stdout[start:])
    assert result["status"] == "delivered"
    assert result["notified"] == {"sent_to": "ada@example.com", "template": "order-received", "sent_by": "python"}
