"""A user program using the worker-side API (handlers of every kind, every
context call, decisions with routes, response events) must pass
``mypy --strict`` against the installed package; handlers keep their exact
signatures through the decorators, so a wrong call of a decorated handler is
caught. (The client's methods are checked by test_client_async.py.)"""

import os
import subprocess
import sys
import textwrap

import pytest

PROGRAM = """
import asyncio
from typing import Any, Dict, List, Optional

import switchyard
from switchyard import BatchItem, Context, AsyncContext, Decision, ResponseEvent, Retry, Worker, step

worker = Worker("sqlite:unused.db", concurrency=4, lease=10.0, shutdown_grace=1.0)


@worker.decision("order.place", retry=Retry(max_attempts=3, initial_backoff=0.1, max_backoff=1.0))
def place(order: Dict[str, Any], ctx: Context) -> Decision:
    return Decision.create(
        [
            step(
                "check",
                handler="inventory.check",
                input=order,
                routes={"ok": [step("ship", handler="ship")], "out_of_stock": [step("backorder")]},
            ),
            step("notify", input={"to": order["email"]}, depends_on=["check"]),
        ],
        final_step="check",
    )


@worker.decision("split")
def split(total: int, ctx: Context) -> Decision:
    return Decision.complete(None) if total == 0 else Decision.fan_out("part", total, 100, {"t": total})


@worker.step("inventory.check", timeout=30.0, retry=3, concurrency=2)
def check(order: Dict[str, Any], ctx: Context) -> Dict[str, int]:
    if ctx.is_cancelled():
        raise switchyard.Cancelled("stop")
    if ctx.attempt > 1 and ctx.run > 1 and ctx.priority >= 0 and ctx.time_left is not None:
        ctx.heartbeat()
    ctx.set_status("out_of_stock")
    seen: int = ctx.checkpoint("seen", lambda: 1)
    ev: Any = ctx.await_event(f"restock:{ctx.task_id}", timeout=5.0)
    ctx.sleep(0.1)
    ctx.sleep_until(1_700_000_000_000)
    stored: bool = ctx.emit_event("checked", {"by": ctx.step_name, "h": ctx.handler, "s": ctx.step_id})
    child: str = ctx.spawn("audit", {"o": order}, response_event=f"audit:{ctx.task_id}")
    done: ResponseEvent = ctx.await_event(f"audit:{ctx.task_id}")
    state: str = done["state"]
    result: Any = ctx.delegate("price", order)
    many: List[Dict[str, Any]] = ctx.delegate_parallel([("a", 1), {"handler": "b", "input": 2}])
    deps: Dict[str, Any] = ctx.dependency_results()
    headers: Dict[str, str] = ctx.headers
    print(ev, stored, child, state, result, many, deps, headers)
    return {"missing": seen}


@worker.step("audit")
async def audit(order: Dict[str, Any], ctx: AsyncContext) -> str:
    n: int = await ctx.checkpoint("n", lambda: 2)
    await ctx.sleep(0.01)
    ev: Any = await ctx.await_event("e", timeout=1.0)
    child: str = await ctx.spawn("x", None, response_event="y")
    r: Any = await ctx.delegate("x")
    many: List[Dict[str, Any]] = await ctx.delegate_parallel([("x", 1)])
    ok: bool = await ctx.emit_event("z", n)
    await ctx.heartbeat()
    deps: Dict[str, Any] = await ctx.dependency_results()
    ctx.set_status("audited")
    return f"{ev}{child}{r}{many}{ok}{deps}"


@worker.batch("charge", max_batch=16, linger=0.01)
def charge(items: List[BatchItem]) -> List[Any]:
    return [switchyard.PermanentError("no") if i.input is None else i.input for i in items]


@worker.api("price", rate_limit=10.0, burst=5)
def price(order: Dict[str, Any], ctx: Context) -> float:
    raise switchyard.HttpError(429, "slow down", retry_after=1.0)


# The decorators keep each handler's signature: a wrong call is an error
# (the ignores below would be unused, and so errors under --strict, if the
# decorators erased the types).
check("not a dict", None)  # type: ignore[arg-type]
n: int = place({}, None)  # type: ignore[arg-type, assignment]
missing: Dict[str, int] = check({}, None)  # type: ignore[arg-type]
later: "asyncio.Future[str]" = asyncio.ensure_future(audit({}, None))  # type: ignore[arg-type]

worker.start()
addr: Optional[str] = worker.health_addr
host: Optional[str] = worker.host_id
worker.stop()
"""

WRONG = """
from typing import Dict

import switchyard

worker = switchyard.Worker("memory")


@worker.step("double")
def double(n: int, ctx: switchyard.Context) -> int:
    ctx.set_status(3)
    return n * 2


s: str = double(2, None)  # type: ignore[arg-type]
"""


def _mypy(tmp_path, source):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(source))
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / ".mypy_cache"))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(prog)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def test_mypy_strict_accepts_a_worker_using_every_api(tmp_path):
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed in the test environment (mk/python.mk installs it)")
    ok = _mypy(tmp_path, PROGRAM)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _mypy(tmp_path, WRONG)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    # The decorated handler kept its return type, and set_status takes a str.
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in bad.stdout, bad.stdout
    assert 'Argument 1 to "set_status" of "_Base" has incompatible type "int"; expected "str"' in bad.stdout, bad.stdout
