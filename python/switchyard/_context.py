"""The durable context handed to handlers: ``Context`` for plain functions,
``AsyncContext`` (awaitable operations) for ``async def`` handlers."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Awaitable, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, TypedDict, TypeVar, Union, cast

from . import _native

T = TypeVar("T")


class ResponseEvent(TypedDict):
    """The payload of a task's response event (``response_event`` of a
    spawn), emitted when the task finishes."""

    task_id: str
    state: Literal["completed", "failed", "cancelled"]
    result: Any
    """The result (completed), else None."""
    error: Optional[Dict[str, Any]]
    """``kind``, ``message``, ``trace``, ``attempt`` (failed or cancelled), else None."""

class _Base:
    __slots__ = ("_n",)

    def __init__(self, native: "_native.NativeContext") -> None:
        self._n = native

    @property
    def task_id(self) -> str:
        return self._n.task_id

    @property
    def step_id(self) -> str:
        return self._n.step_id

    @property
    def step_name(self) -> str:
        """The name of the step being run."""
        return self._n.step_name

    @property
    def step(self) -> str:
        """Deprecated alias of :attr:`step_name`."""
        warnings.warn("ctx.step is deprecated: use ctx.step_name", DeprecationWarning, stacklevel=2)
        return self._n.step_name

    @property
    def handler(self) -> str:
        return self._n.handler

    @property
    def attempt(self) -> int:
        """The attempt this run belongs to: 1 until a run fails; a resume
        after a suspension continues the same attempt."""
        return self._n.attempt

    @property
    def run(self) -> int:
        """This run's number: grows with every claim of the step (resumes
        included) and is never reused."""
        return self._n.run

    @property
    def priority(self) -> int:
        return self._n.priority

    @property
    def headers(self) -> Dict[str, str]:
        return self._n.headers

    @property
    def time_left(self) -> Optional[float]:
        """Seconds before the handler's timeout, or None."""
        return self._n.time_left

    def is_cancelled(self) -> bool:
        """True once the task was cancelled (cooperative cancellation)."""
        return self._n.is_cancelled()

    def set_status(self, status: str) -> None:
        """Ends this run with ``status`` when the handler returns a value:
        the steps the decision routed from that status are created (see
        ``routes`` in decision steps) and the status is recorded with the
        step. Without a call the status is ``ok``; the last call wins. A
        status the step has no route for fails the step; a status that is
        not a name raises :class:`InvalidInput`."""
        self._n.set_status(status)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} task={self.task_id} step={self.step_name} attempt={self.attempt}>"


Child = Union[Tuple[str, Any], Mapping[str, Any]]


def _children(children: Sequence[Child]) -> List[Tuple[str, Any]]:
    out = []
    for i, c in enumerate(children):
        if isinstance(c, Mapping):
            out.append((c["handler"], c.get("input")))
        else:
            handler, payload = c
            out.append((handler, payload))
    return out


class Context(_Base):
    """Durable context for plain (synchronous) handlers."""

    __slots__ = ()

    def checkpoint(self, name: str, fn: Callable[[], T]) -> T:
        """Runs ``fn`` once per task, ever; a replay returns the stored value."""
        key, found, value = self._n.checkpoint_lookup(name)
        if found:
            return value
        value = fn()
        self._n.checkpoint_save(key, value)
        return value

    def await_event(self, name: str, timeout: Optional[float] = None) -> Any:
        """Returns the payload of event ``name`` (emitted before or after this call).
        Suspends the step until it arrives; raises ``switchyard.AwaitTimeout``
        after ``timeout`` seconds (checkpointed)."""
        return self._n.await_event(name, timeout)

    def sleep(self, seconds: float) -> None:
        """Durable sleep: the step suspends and the host is free meanwhile."""
        self._n.sleep(seconds)

    def sleep_until(self, at_ms: int) -> None:
        """Durable sleep until ``at_ms`` (milliseconds since the epoch)."""
        self._n.sleep_until(at_ms)

    def emit_event(self, name: str, payload: Any = None) -> bool:
        """Emits an event (first write wins); True if this call stored it."""
        return self._n.emit_event(name, payload)

    def emit(self, name: str, payload: Any = None) -> bool:
        """Alias of :meth:`emit_event`."""
        return self._n.emit_event(name, payload)

    def spawn(self, handler: str, input: Any = None, *, response_event: Optional[str] = None) -> str:
        """Spawns a child task without waiting for it; returns its id. With
        ``response_event``, the child's outcome is emitted as that event when
        it finishes (payload: :class:`ResponseEvent`)."""
        return self._n.spawn(handler, input, response_event)

    def delegate(self, handler: str, input: Any = None) -> Any:
        """Runs a child task and returns its result (the step suspends meanwhile)."""
        return self._n.delegate(handler, input)

    def delegate_parallel(self, children: Sequence[Child]) -> List[Dict[str, Any]]:
        """Runs child tasks in parallel; returns one dict per child, in order, with
        ``task_id``, ``state``, ``result`` and ``error`` (failures reported per child)."""
        return self._n.delegate_parallel(_children(children))

    def heartbeat(self) -> None:
        """Extends the step's lease during long work."""
        self._n.heartbeat()

    def dependency_results(self) -> Dict[str, Any]:
        """Results of the steps this step depends on (convergence steps)."""
        return self._n.dependency_results()


class AsyncContext(_Base):
    """Durable context for ``async def`` handlers: every operation is awaitable.

    Each is a coroutine whose call runs on the core's own runtime (no thread
    pool): any number of handlers may wait in durable calls at once."""

    __slots__ = ()

    async def checkpoint(self, name: str, fn: Callable[[], Union[T, Awaitable[T]]]) -> T:
        key, found, value = await self._n.checkpoint_lookup_async(name)
        if found:
            return cast(T, value)
        value = fn()
        if inspect.isawaitable(value):
            value = await value
        await self._n.checkpoint_save_async(key, value)
        return cast(T, value)

    async def await_event(self, name: str, timeout: Optional[float] = None) -> Any:
        return await self._n.await_event_async(name, timeout)

    async def sleep(self, seconds: float) -> None:
        await self._n.sleep_async(seconds)

    async def sleep_until(self, at_ms: int) -> None:
        await self._n.sleep_until_async(at_ms)

    async def emit_event(self, name: str, payload: Any = None) -> bool:
        return await self._n.emit_event_async(name, payload)

    async def emit(self, name: str, payload: Any = None) -> bool:
        """Alias of :meth:`emit_event`."""
        return await self._n.emit_event_async(name, payload)

    async def spawn(self, handler: str, input: Any = None, *, response_event: Optional[str] = None) -> str:
        return await self._n.spawn_async(handler, input, response_event)

    async def delegate(self, handler: str, input: Any = None) -> Any:
        return await self._n.delegate_async(handler, input)

    async def delegate_parallel(self, children: Sequence[Child]) -> List[Dict[str, Any]]:
        return await self._n.delegate_parallel_async(_children(children))

    async def heartbeat(self) -> None:
        await self._n.heartbeat_async()

    async def dependency_results(self) -> Dict[str, Any]:
        return await self._n.dependency_results_async()
