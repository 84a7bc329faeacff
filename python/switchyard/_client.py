"""The Client: spawn tasks, emit events, wait for results, cancel, retry, inspect."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from . import _native
from ._worker import default_store

When = Union[None, int, float, _dt.datetime]


def _ms(when: When) -> Optional[int]:
    if when is None:
        return None
    if isinstance(when, _dt.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        return int(when.timestamp() * 1000)
    return int(when)


class Client:
    """Talks to a store: ``Client("sqlite:app.db")``. Thread-safe.

    Every method has an ``_async`` twin (``await client.result_async(id)``):
    a coroutine whose call runs on the core's own runtime, not on a thread
    pool, so pending waits never delay other calls. Cancelling the awaiting
    task abandons the call.
    """

    def __init__(self, store: Optional[str] = None, *, max_payload_bytes: Optional[int] = None) -> None:
        self.store = store or default_store()
        self._n = _native.NativeClient(self.store, max_payload_bytes)

    def spawn(
        self,
        handler: str,
        input: Any = None,
        *,
        priority: int = 0,
        idempotency_key: Optional[str] = None,
        response_event: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        run_at: When = None,
    ) -> str:
        """Spawns a task; returns its id (the existing task's id when the
        idempotency key was used before). ``run_at``: epoch ms or datetime."""
        task_id, _created = self._n.spawn(
            handler, input, priority, idempotency_key, response_event, dict(headers) if headers else None, _ms(run_at)
        )
        return task_id

    def spawn_many(self, tasks: Sequence[Mapping[str, Any]]) -> List[str]:
        """Spawns many tasks in one write (dicts with ``handler``, ``input`` and
        optional ``priority``, ``idempotency_key``, ``response_event``, ``headers``)."""
        return [tid for tid, _ in self._n.spawn_many([dict(t) for t in tasks])]

    def emit(self, name: str, payload: Any = None) -> bool:
        """Emits an event (first write wins); True if this call stored it."""
        return self._n.emit(name, payload)

    def result(self, task_id: str, timeout: float = 30.0) -> Any:
        """Waits for the task and returns its result; raises ``TaskFailed``
        (``task_id``, ``kind``, ``message``, ``traceback``, ``attempt``) if it
        failed, ``TaskCancelled`` if it was cancelled, and
        ``switchyard.TimeoutError`` if this wait ran out."""
        return self._n.result(task_id, timeout)

    def await_event(self, name: str, timeout: float = 30.0) -> Any:
        """Waits, from outside any task, until event ``name`` is emitted and
        returns its payload (at once if it already was; the first emit wins).
        This is how a caller waits for a task's ``response_event``
        (``{"task_id", "state", "result", "error"}``) without polling. Raises
        ``switchyard.TimeoutError`` naming the event if it is not emitted in
        time, ``InvalidInput`` for a bad name or timeout."""
        return self._n.await_event(name, timeout)

    def wait(self, task_id: str, timeout: float = 30.0) -> Dict[str, Any]:
        """Waits until the task finishes and returns it (any final state)."""
        return self._n.wait(task_id, timeout)

    def get(self, task_id: str) -> Dict[str, Any]:
        return self._n.get(task_id)

    def inspect(self, task_id: str) -> Dict[str, Any]:
        """The task with its steps, checkpoints and children."""
        return self._n.inspect(task_id)

    def list(self, state: Optional[str] = None, handler: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
        return self._n.list(state, handler, limit)

    def cancel(self, task_id: str, cascade: bool = False) -> bool:
        return self._n.cancel(task_id, cascade)

    def retry(self, task_id: str) -> None:
        self._n.retry(task_id)

    def workers(self) -> List[Dict[str, Any]]:
        return self._n.workers()

    def events(self, limit: int = 100, name: Optional[str] = None) -> List[Dict[str, Any]]:
        """Cached events, newest first; with ``name``, only those whose name
        starts with it."""
        return self._n.events(limit, name)

    def count_steps(self) -> Dict[str, int]:
        return self._n.count_steps()


    # The async twins: same arguments, results and exceptions as above.

    async def spawn_async(
        self,
        handler: str,
        input: Any = None,
        *,
        priority: int = 0,
        idempotency_key: Optional[str] = None,
        response_event: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        run_at: When = None,
    ) -> str:
        task_id, _created = await self._n.spawn_async(
            handler, input, priority, idempotency_key, response_event, dict(headers) if headers else None, _ms(run_at)
        )
        return task_id

    async def spawn_many_async(self, tasks: Sequence[Mapping[str, Any]]) -> List[str]:
        return [tid for tid, _ in await self._n.spawn_many_async([dict(t) for t in tasks])]

    async def emit_async(self, name: str, payload: Any = None) -> bool:
        return await self._n.emit_async(name, payload)

    async def result_async(self, task_id: str, timeout: float = 30.0) -> Any:
        return await self._n.result_async(task_id, timeout)

    async def await_event_async(self, name: str, timeout: float = 30.0) -> Any:
        return await self._n.await_event_async(name, timeout)

    async def wait_async(self, task_id: str, timeout: float = 30.0) -> Dict[str, Any]:
        return await self._n.wait_async(task_id, timeout)

    async def get_async(self, task_id: str) -> Dict[str, Any]:
        return await self._n.get_async(task_id)

    async def inspect_async(self, task_id: str) -> Dict[str, Any]:
        return await self._n.inspect_async(task_id)

    async def list_async(
        self, state: Optional[str] = None, handler: Optional[str] = None, limit: int = 100
    ) -> List[Dict[str, Any]]:
        return await self._n.list_async(state, handler, limit)

    async def cancel_async(self, task_id: str, cascade: bool = False) -> bool:
        return await self._n.cancel_async(task_id, cascade)

    async def retry_async(self, task_id: str) -> None:
        await self._n.retry_async(task_id)

    async def workers_async(self) -> List[Dict[str, Any]]:
        return await self._n.workers_async()

    async def events_async(self, limit: int = 100, name: Optional[str] = None) -> List[Dict[str, Any]]:
        return await self._n.events_async(limit, name)

    async def count_steps_async(self) -> Dict[str, int]:
        return await self._n.count_steps_async()
