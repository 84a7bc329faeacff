"""Switchyard: a durable worker host with a Rust core.

Register handlers on a :class:`Worker`, spawn tasks with a :class:`Client`;
tasks live in an embedded SQLite file by default (``sqlite:switchyard.db``).
"""

from . import _native
from ._client import Client
from ._context import AsyncContext, Context, ResponseEvent
from ._worker import BatchItem, Decision, Retry, Worker, default_store, step
from .errors import (
    AwaitTimeout,
    Cancelled,
    ConfigError,
    Conflict,
    Error,
    HttpError,
    InvalidInput,
    LeaseLost,
    NetworkError,
    NotFound,
    PayloadTooLarge,
    PermanentError,
    RetryableError,
    ShutdownError,
    StoreError,
    TaskCancelled,
    TaskFailed,
    TimeoutError,
)

__version__ = _native.__version__

__all__ = [
    "AsyncContext",
    "AwaitTimeout",
    "BatchItem",
    "Cancelled",
    "Client",
    "ConfigError",
    "Conflict",
    "Context",
    "Decision",
    "Error",
    "HttpError",
    "InvalidInput",
    "LeaseLost",
    "NetworkError",
    "NotFound",
    "PayloadTooLarge",
    "PermanentError",
    "ResponseEvent",
    "Retry",
    "RetryableError",
    "ShutdownError",
    "StoreError",
    "TaskCancelled",
    "TaskFailed",
    "TimeoutError",
    "Worker",
    "default_store",
    "step",
]
