"""Exceptions raised by switchyard, and the ones handlers raise to steer retries.

Handlers raise :class:`PermanentError` (never retried), :class:`RetryableError`
(retried after the policy's backoff or ``retry_after`` seconds) or
:class:`InvalidInput` (fails at once). Any other exception is retryable, with
its traceback stored on the step. Waiting for a task's outcome raises
:class:`TaskFailed` or :class:`TaskCancelled`. The names are the README's
vocabulary, the same in every language.
"""

from __future__ import annotations

import builtins
from typing import Optional


class Error(Exception):
    """Base class of every switchyard exception."""


class PermanentError(Error):
    """The step failed and must not be retried."""


class RetryableError(Error):
    """The step failed but may succeed later; ``retry_after`` is a minimum delay in seconds."""

    def __init__(self, message: str = "", retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidInput(Error):
    """The input was rejected: fails at once, never retried."""


class PayloadTooLarge(InvalidInput):
    """A payload exceeded the configured size limit; nothing was stored."""


class AwaitTimeout(Error, builtins.TimeoutError):
    """``ctx.await_event`` ran out of time. Checkpointed: a replay raises it
    again. Catch it to carry on; if it escapes the handler, the step fails
    permanently. ``event`` is the event that was awaited."""

    def __init__(self, message: str = "", event: Optional[str] = None) -> None:
        super().__init__(message)
        self.event = event


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - the documented name
    """A client's wait (``Client.result``, ``Client.wait``) ran out of time;
    the task goes on."""


class Cancelled(Error):
    """The task was cancelled: the step stops (a handler that lets it escape
    just stops; the core already knows)."""


class TaskFailed(Error):
    """A task waited for (``Client.result`` and every helper that waits for a
    task's outcome) failed: ``task_id``, the recorded error's ``kind``
    (``"permanent"``, ``"retryable"``...), ``message`` and ``traceback``, and
    the ``attempt`` it happened on. ``str()`` says all of it."""

    def __init__(
        self,
        description: str = "",
        *,
        task_id: str = "",
        kind: str = "",
        message: str = "",
        traceback: Optional[str] = None,
        attempt: int = 0,
    ) -> None:
        super().__init__(description or f"task {task_id} failed on attempt {attempt}: {kind}: {message}")
        self.task_id = task_id
        self.kind = kind
        self.message = message
        self.traceback = traceback
        self.attempt = attempt


class TaskCancelled(Error):
    """A task waited for was cancelled: ``task_id``, and ``message`` as
    recorded (e.g. "cancelled by a client")."""

    def __init__(self, description: str = "", *, task_id: str = "", message: str = "") -> None:
        super().__init__(description or f"task {task_id} was cancelled: {message}")
        self.task_id = task_id
        self.message = message


class NotFound(Error):
    """No task with that id exists."""


class Conflict(Error):
    """The operation does not fit the task's state (e.g. retrying a running task)."""


class ConfigError(Error):
    """Invalid configuration: a bad store URL, option or registration."""


class StoreError(Error):
    """The store failed (usually transient)."""


class ShutdownError(Error):
    """The worker is shutting down."""


class LeaseLost(BaseException):
    """The step's lease was lost (cancelled or taken over by another host).

    A ``BaseException`` so that ``except Exception`` in handler code does not
    swallow it: the run must stop.
    """


class Suspend(BaseException):
    """Raised by durable operations (await, sleep, delegation) to suspend the
    step: not an error, handlers must let it propagate. The core keeps the
    wait; the step resumes later by replay. A ``BaseException`` so that
    ``except Exception`` in handler code does not swallow it. Raised by hand
    (no context call asked for it) it fails the step permanently."""


class HttpError(Error):
    """Raised by ``@worker.api`` handlers for a non-2xx answer: 429 is retried
    after ``retry_after``, other 4xx fail permanently, 5xx are retried."""

    def __init__(self, status: int, message: str = "", retry_after: Optional[float] = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


class NetworkError(Error):
    """Raised by ``@worker.api`` handlers when the request got no answer (retried)."""


__all__ = [
    "Error",
    "PermanentError",
    "RetryableError",
    "InvalidInput",
    "PayloadTooLarge",
    "TimeoutError",
    "AwaitTimeout",
    "Cancelled",
    "TaskFailed",
    "TaskCancelled",
    "NotFound",
    "Conflict",
    "ConfigError",
    "StoreError",
    "ShutdownError",
    "LeaseLost",
    "Suspend",
    "HttpError",
    "NetworkError",
]
