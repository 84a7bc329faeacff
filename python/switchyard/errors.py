"""Exceptions raised by switchyard, and the ones handlers raise to steer retries.

Handlers raise :class:`PermanentError` (never retried), :class:`RetryableError`
(retried after the policy's backoff or ``retry_after`` seconds) or
:class:`InvalidInput` (fails at once). Any other exception is retryable, with
its traceback stored on the step.
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


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - the documented name
    """``ctx.await_event`` ran out of time (checkpointed: a replay raises it again),
    or a client wait ran out of time."""


#: The Rust name of the same condition (``StepError::AwaitTimeout``).
AwaitTimeout = TimeoutError


class Cancelled(Error):
    """The task was cancelled."""


class NotFound(Error):
    """No task with that id exists."""


class Conflict(Error):
    """The operation does not fit the task's state (e.g. retrying a running task,
    or asking for the result of a failed task)."""


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


class _Suspend(BaseException):
    """Raised by durable operations to suspend the step (await, sleep, delegation).

    Not an error: it unwinds the handler so its slot is freed, and the step
    resumes later by replay. A ``BaseException`` so that ``except Exception``
    in handler code does not swallow it.
    """

    def __init__(self, wait: str) -> None:
        super().__init__(wait)
        self.wait = wait


__all__ = [
    "Error",
    "PermanentError",
    "RetryableError",
    "InvalidInput",
    "PayloadTooLarge",
    "TimeoutError",
    "AwaitTimeout",
    "Cancelled",
    "NotFound",
    "Conflict",
    "ConfigError",
    "StoreError",
    "ShutdownError",
    "LeaseLost",
]
