"""The Client: spawn tasks, emit events, wait for results, cancel, retry, inspect."""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
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

    Every method has an ``_async`` twin (``await client.result_async(id)``).
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
        """Waits for the task and returns its result; raises ``Conflict`` if it
        failed or was cancelled, ``switchyard.TimeoutError`` on timeout."""
        return self._n.result(task_id, timeout)

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

    def events(self, limit: int = 100) -> List[Dict[str, Any]]:
        return self._n.events(limit)

    def count_steps(self) -> Dict[str, int]:
        return self._n.count_steps()


def _async_twin(name: str) -> Any:
    sync = getattr(Client, name)

    @functools.wraps(sync)
    async def twin(self: Client, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(sync, self, *args, **kwargs))

    twin.__name__ = f"{name}_async"
    return twin


for _name in ("spawn", "spawn_many", "emit", "result", "wait", "get", "inspect", "list", "cancel", "retry", "workers", "events"):
    setattr(Client, f"{_name}_async", _async_twin(_name))
