"""Small polling helpers for tests (conditions, never durations, are asserted)."""

import threading
import time


def until(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.01)


def wait_step_state(client, tid, state):
    until(lambda: any(s["state"] == state for s in client.inspect(tid)["steps"]))
