"""The Worker: register Python handlers and serve them from the Rust core.

Sync handlers run on a pool of Python threads (one per unit of
``concurrency`` unless ``threads`` says otherwise) that wait for work inside
Rust with the GIL released. A thread that is running handlers takes the jobs
already queued without giving up the GIL; idle threads are woken only when no
thread is taking jobs, or when the queue stalls because every busy thread sits
in a blocking handler (the core's serial-inbox policy). ``async def`` handlers run on one long-lived asyncio loop, many at a
time up to each handler's concurrency. The core enforces timeouts, leases and
retries; a cancelled task cancels the asyncio task of an async handler and
sets ``ctx.is_cancelled()`` for sync handlers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

from . import _native
from ._context import AsyncContext, Context
from .errors import HttpError, NetworkError

log = logging.getLogger("switchyard")
_core_log = logging.getLogger("switchyard.core")


def _forward_core_logs() -> None:
    """Re-emits the Rust core's queued log records through ``logging``
    (logger ``switchyard.core``). Called by threads that wake regularly."""
    for level, target, message in _native.take_logs():
        if _core_log.isEnabledFor(level):
            _core_log.log(level, "%s", message, extra={"rust_target": target})

DEFAULT_STORE = "sqlite:switchyard.db"


def default_store() -> str:
    """The store URL from ``SWITCHYARD_STORE``, or ``sqlite:switchyard.db``."""
    return os.environ.get("SWITCHYARD_STORE") or DEFAULT_STORE


# A handler as registered: the decorators hand it back unchanged, so type
# checkers keep its exact signature.
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Retry:
    """Retry policy: exponential backoff with jitter, up to ``max_attempts``."""

    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 300.0


def step(
    name: str,
    handler: Optional[str] = None,
    input: Any = None,
    depends_on: Sequence[str] = (),
    routes: Optional[Mapping[str, Sequence[Dict[str, Any]]]] = None,
) -> Dict[str, Any]:
    """A step for a :class:`Decision`: ``handler`` defaults to ``name``.

    ``routes`` maps a status to the steps to create when this step completes
    with it (``ctx.set_status``; ``"ok"`` when the handler sets none); a
    routed step with no ``depends_on`` depends on this one and reads its
    result with ``ctx.dependency_results()``. A status with no route fails
    the step."""
    s: Dict[str, Any] = {"name": name, "handler": handler or name, "input": input, "depends_on": list(depends_on)}
    if routes is not None:
        s["routes"] = {status: list(steps) for status, steps in routes.items()}
    return s


@dataclass
class Decision:
    """What a ``@worker.decision`` handler returns: steps to create (with
    dependencies by name), or ``Decision.complete(value)``."""

    steps: List[Dict[str, Any]] = field(default_factory=list)
    final_step: Optional[str] = None
    value: Any = None
    done: bool = False

    @staticmethod
    def complete(value: Any = None) -> "Decision":
        return Decision(value=value, done=True)

    @staticmethod
    def create(steps: Sequence[Dict[str, Any]], final_step: Optional[str] = None) -> "Decision":
        return Decision(steps=list(steps), final_step=final_step)

    @staticmethod
    def fan_out(handler: str, total: int, batch_size: int, input: Any = None, converge: str = "converge") -> "Decision":
        """Splits ``total`` items into cursor ranges run as parallel ``handler`` steps,
        then a ``converge`` step that receives their results (planned by the
        core, which refuses a negative ``total``, a ``batch_size`` below 1 and
        plans of more than 100,000 batches with ``InvalidInput``)."""
        steps, final_step = _native.fan_out(handler, total, batch_size, input, converge)
        return Decision(steps=steps, final_step=final_step)


@dataclass
class BatchItem:
    """One step of a ``@worker.batch`` call."""

    input: Any
    ctx: Union[Context, AsyncContext]


@dataclass
class _Handler:
    name: str
    fn: Callable[..., Any]
    kind: str
    is_async: bool


# Raised by a handler, these stop the host instead of failing the step.
_EXIT = (SystemExit, KeyboardInterrupt)


class Worker:
    """A host for Python handlers.

    >>> worker = Worker(store="sqlite:app.db")
    >>> @worker.step("greet")
    ... def greet(input, ctx):
    ...     return {"hello": input["name"]}
    >>> worker.run()  # blocks; Ctrl-C / SIGTERM shut down gracefully

    ``concurrency`` is how many steps the host runs at once. Sync handlers
    run on ``threads`` Python threads, by default one per unit of
    ``concurrency``, so that many blocking handlers can be inside their
    bodies at the same time; with fewer threads a claimed step may wait for
    a free thread (its timeout already running). Idle threads wait in Rust
    with the GIL released and are woken only when needed.

    ``shutdown_grace`` bounds :meth:`stop`: running steps get that long to
    finish before they are handed back to the store (without costing an
    attempt), and :meth:`stop` waits about as long for handler bodies it
    started, including those the core already gave up on (timed out or
    cancelled), before it returns.

    A handler that raises ``SystemExit`` (``sys.exit()``) or
    ``KeyboardInterrupt`` does not fail its step: the host shuts down
    gracefully as if :meth:`stop` were called, the step is handed back at the
    end of the grace period without costing an attempt (another host, or
    this one restarted, runs it again), and the exception is re-raised once
    the host has stopped: by :meth:`run` / :meth:`run_async`, or, after
    :meth:`start`, by :meth:`stop` (so also at the end of a ``with`` block).
    """

    def __init__(
        self,
        store: Optional[str] = None,
        *,
        concurrency: int = 64,
        threads: Optional[int] = None,
        lease: float = 30.0,
        shutdown_grace: float = 10.0,
        max_payload_bytes: Optional[int] = None,
        health_listen: Optional[str] = None,
    ) -> None:
        native = _native.NativeWorker(
            store or default_store(), concurrency, lease, shutdown_grace, max_payload_bytes, health_listen
        )
        self._init(native, threads)

    @classmethod
    def from_config(cls, path: "Optional[Union[str, os.PathLike[str]]]" = None, *, threads: Optional[int] = None) -> "Worker":
        """A worker configured like every Switchyard host: the file at ``path``,
        else the one named by ``SWITCHYARD_CONFIG``, else none, then the
        ``SWITCHYARD_*`` environment variables (``SWITCHYARD_STORE``,
        ``SWITCHYARD_HOST__CONCURRENCY``, ...). It uses the configured store
        (``[store]``) and host settings (``[host]``: concurrency, lease,
        heartbeat, shutdown_grace). An unknown key or a value of the wrong type
        raises ``switchyard.ConfigError`` naming the key and where it came from.
        """
        native = _native.NativeWorker.from_config(None if path is None else os.fspath(path))
        self = cls.__new__(cls)
        self._init(native, threads)
        return self

    def _init(self, native: "_native.NativeWorker", threads: Optional[int]) -> None:
        self._native = native
        self.store = native.store_url
        concurrency = native.concurrency
        shutdown_grace = native.shutdown_grace
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        self._handlers: Dict[str, _Handler] = {}
        # By the id the core gave each handler at registration (jobs carry it).
        self._by_id: List[_Handler] = []
        self._threads_n = threads or concurrency
        self._grace = shutdown_grace
        self._threads: List[threading.Thread] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._tasks: "set[asyncio.Future[None]]" = set()
        # Async jobs running, by job id (for the core's cancellation notices).
        self._job_tasks: "Dict[int, asyncio.Future[Any]]" = {}
        self._started = False
        self._stopped = threading.Event()
        # Guards the fields below.
        self._lock = threading.Lock()
        # Handler bodies running now (sync and async); notified when one ends.
        self._bodies = 0
        self._bodies_done = threading.Condition(self._lock)
        self._stopping = False
        # The first SystemExit / KeyboardInterrupt raised by a handler, until
        # it has been re-raised to the caller.
        self._fatal: Optional[BaseException] = None
        self._fatal_seen = False
        # Jobs of handlers that raised it: kept unanswered (an answer would
        # cost an attempt) until the host hands their steps back.
        self._held: List["_native.NativeJob"] = []

    # -- registration -------------------------------------------------------
    def _register(self, name: str, kind: str, fn: Callable[..., Any], retry: Union[None, int, Retry], **opts: Any) -> None:
        if not callable(fn):
            raise TypeError(f"handler `{name}` must be callable")
        is_async = inspect.iscoroutinefunction(fn)
        if isinstance(retry, int):
            retry = Retry(max_attempts=retry)
        if retry is not None:
            opts.update(max_attempts=retry.max_attempts, initial_backoff=retry.initial_backoff, max_backoff=retry.max_backoff)
        handler_id = self._native.register(name, kind, is_async, **opts)
        h = _Handler(name, fn, kind, is_async)
        self._handlers[name] = h
        assert handler_id == len(self._by_id), "the core numbers handlers in order"
        self._by_id.append(h)

    def step(
        self,
        name: str,
        *,
        concurrency: Optional[int] = None,
        timeout: Optional[float] = None,
        retry: Union[None, int, Retry] = None,
    ) -> Callable[[F], F]:
        """Registers a plain handler ``fn(input, ctx) -> result`` (or ``async def``)."""

        def deco(fn: F) -> F:
            self._register(name, "step", fn, retry, concurrency=concurrency, timeout=timeout)
            return fn

        return deco

    def batch(
        self,
        name: str,
        *,
        max_batch: int = 64,
        linger: float = 0.005,
        concurrency: Optional[int] = None,
        timeout: Optional[float] = None,
        retry: Union[None, int, Retry] = None,
    ) -> Callable[[F], F]:
        """Registers a batch handler ``fn(items: list[BatchItem]) -> list[result | Exception]``."""

        def deco(fn: F) -> F:
            self._register(name, "batch", fn, retry, concurrency=concurrency, timeout=timeout, max_batch=max_batch, linger=linger)
            return fn

        return deco

    def decision(
        self,
        name: str,
        *,
        concurrency: Optional[int] = None,
        timeout: Optional[float] = None,
        retry: Union[None, int, Retry] = None,
    ) -> Callable[[F], F]:
        """Registers a decision handler ``fn(input, ctx) -> Decision``."""

        def deco(fn: F) -> F:
            self._register(name, "decision", fn, retry, concurrency=concurrency, timeout=timeout)
            return fn

        return deco

    def api(
        self,
        name: str,
        *,
        rate_limit: Optional[float] = None,
        burst: Optional[int] = None,
        concurrency: Optional[int] = None,
        timeout: Optional[float] = None,
        retry: Union[None, int, Retry] = None,
    ) -> Callable[[F], F]:
        """Registers an API-shaped handler; raise :class:`HttpError` or
        :class:`NetworkError` for failures. ``rate_limit`` is starts per second."""

        def deco(fn: F) -> F:
            self._register(name, "api", fn, retry, concurrency=concurrency, timeout=timeout, rate_limit=rate_limit, burst=burst)
            return fn

        return deco

    # -- running ------------------------------------------------------------
    @property
    def host_id(self) -> Optional[str]:
        return self._native.host_id

    @property
    def health_addr(self) -> Optional[str]:
        """Where ``/healthz``, ``/readyz`` and ``/metrics`` are served once
        started with ``health_listen="127.0.0.1:9464"`` (port 0 picks a free
        port), else None."""
        return self._native.health_addr

    def start(self) -> None:
        """Starts serving in background threads and returns."""
        if self._started:
            raise RuntimeError("the worker was already started")
        if not self._handlers:
            raise RuntimeError("register at least one handler before starting the worker")
        self._started = True
        self._native.start()
        if any(not h.is_async for h in self._handlers.values()):
            for i in range(self._threads_n):
                t = threading.Thread(target=self._sync_loop, name=f"switchyard-worker-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        if any(h.is_async for h in self._handlers.values()):
            ready = threading.Event()
            t = threading.Thread(target=self._async_main, args=(ready,), name="switchyard-asyncio", daemon=True)
            t.start()
            self._threads.append(t)
            self._loop_thread = t
            ready.wait()
            p = threading.Thread(target=self._async_puller, name="switchyard-asyncio-feed", daemon=True)
            p.start()
            self._threads.append(p)
            c = threading.Thread(target=self._async_canceller, name="switchyard-asyncio-cancel", daemon=True)
            c.start()
            self._threads.append(c)
        _forward_core_logs()
        log.info("switchyard worker %s started with handlers %s", self.host_id, sorted(self._handlers))

    def stop(self) -> None:
        """Graceful shutdown: no more claims; running steps get the grace
        period, then are handed back. Blocks until the host has stopped and
        the handler bodies it started have returned, waiting for those at
        most until ``shutdown_grace`` (plus a second) after the call; a body
        still running then is left behind on its daemon thread.

        If a handler raised ``SystemExit`` or ``KeyboardInterrupt`` (see the
        class docs), that exception is raised here once the host has stopped.
        """
        if self._started:
            self._shutdown()
        self._raise_fatal()

    def _shutdown(self) -> None:
        with self._lock:
            first = not self._stopping
            self._stopping = True
        if not first:
            # Another thread is stopping the host: wait for it to finish.
            while not self._stopped.wait(0.25):
                pass
            return
        began = time.monotonic()
        try:
            # Handler threads keep serving while the core drains; the inboxes
            # close afterwards and the threads see ``None`` and exit.
            self._native.stop()
        except BaseException:
            # A second Ctrl-C while draining: give up at once and leave the
            # daemon threads behind.
            self._stopped.set()
            raise
        # The core has drained (or handed back what was still running after
        # the grace period). Bodies it no longer waits for (timed out,
        # cancelled, handed back) may still be running: wait for them too,
        # until the grace period (counted from this call) plus a second.
        deadline = max(began + self._grace, time.monotonic()) + 1.0
        here = threading.current_thread()
        mine = 1 if here in self._threads else 0  # stop() called from a handler
        with self._lock:
            while self._bodies > mine:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("switchyard: %d handler(s) still running after the shutdown grace period; leaving them behind", self._bodies - mine)
                    break
                self._bodies_done.wait(left)
        loop = self._loop
        for t in self._threads:
            if t is not self._loop_thread and t is not here:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        if loop is not None and self._loop_thread is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not here:
                self._loop_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            # The core has handed their steps back: nothing waits for them.
            self._held.clear()
        self._stopped.set()
        _forward_core_logs()
        log.info("switchyard worker stopped")

    def _raise_fatal(self) -> None:
        with self._lock:
            e, self._fatal = self._fatal, None
        if e is not None:
            raise e

    def _exit_requested(self, e: BaseException, job: "_native.NativeJob") -> None:
        """A handler raised SystemExit or KeyboardInterrupt: keep its job
        unanswered and stop the host, which hands the step back."""
        with self._lock:
            self._held.append(job)
            first = not self._fatal_seen
            if first:
                self._fatal_seen = True
                self._fatal = e
        if first:
            log.warning("handler %s raised %s: stopping the worker", job.handler, type(e).__name__)
            threading.Thread(target=self._shutdown, name="switchyard-stop", daemon=True).start()

    def run(self) -> None:
        """Serves until Ctrl-C (SIGINT) or SIGTERM, then shuts down gracefully.

        On the main thread SIGTERM is turned into ``KeyboardInterrupt`` while
        this runs (the previous handler is restored afterwards); a signal
        ends ``run()`` normally. A ``SystemExit`` or ``KeyboardInterrupt``
        raised by a handler stops the host gracefully and is then re-raised
        from here (so ``sys.exit(3)`` in a handler exits the process with
        status 3 once the worker has stopped).
        """
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)

            def on_term(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, on_term)
        try:
            self.start()
            # The main thread only waits here; a signal interrupts the wait.
            while not self._stopped.wait(0.25):
                pass
        except KeyboardInterrupt:
            log.info("signal received, shutting down")
        finally:
            try:
                self.stop()
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

    async def run_async(self) -> None:
        """Serves until cancelled, then shuts down gracefully. Like
        :meth:`run`, re-raises a handler's ``SystemExit`` or
        ``KeyboardInterrupt`` once the host has stopped."""
        self.start()
        try:
            while not self._stopped.is_set():
                await asyncio.sleep(0.2)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.stop)

    def __enter__(self) -> "Worker":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def __aenter__(self) -> "Worker":
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    # -- handler bodies -----------------------------------------------------
    def _body_begins(self) -> None:
        with self._lock:
            self._bodies += 1

    def _body_ends(self) -> None:
        with self._lock:
            self._bodies -= 1
            self._bodies_done.notify_all()

    # -- sync handlers ------------------------------------------------------
    def _sync_loop(self) -> None:
        # One job at a time: queued jobs are taken without releasing the GIL,
        # and a job never waits behind a slow handler on this thread.
        consumer = self._native.consumer()
        while True:
            jobs = consumer.next_jobs(1, 0.25)
            if jobs is None:
                return
            if not jobs:
                _forward_core_logs()
            for job in jobs:
                try:
                    self._run_sync(job)
                except BaseException:  # noqa: BLE001 - never lose a serving thread
                    log.exception("switchyard: internal error while running %r", job)
            # Hold no job while waiting for the next: an unanswered job must
            # be dropped (which fails its step) rather than kept alive.
            jobs = job = None

    def _begin(self, job: "_native.NativeJob", ctx: Any) -> Optional[Callable[[], Any]]:
        """The call of the job's handler with its arguments, or None for a job
        the core gave up on before it started: it may have waited in the inbox
        (or behind earlier jobs of its batch) until it timed out, was
        cancelled or handed back at shutdown. Its step is no longer ours."""
        if job.abandoned:
            log.debug("switchyard: skipping %r, abandoned by the core before it started", job)
            return None
        h = self._by_id[job.handler_id]
        items = job.items
        if h.kind == "batch":
            batch = [BatchItem(inp, ctx(c)) for inp, c in items]
            return lambda: h.fn(batch)
        inp, c = items[0]
        return lambda: h.fn(inp, ctx(c))

    def _run_sync(self, job: "_native.NativeJob") -> None:
        call = self._begin(job, Context)
        if call is None:
            return
        answer = job.ok
        self._body_begins()
        try:
            out = call()
        except _EXIT as e:
            self._exit_requested(e, job)
            return
        except BaseException as e:  # noqa: BLE001 - a handler failure fails only its steps
            answer, out = job.raised, e
        finally:
            self._body_ends()
        answer(out)

    # -- async handlers -----------------------------------------------------
    def _async_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _async_puller(self) -> None:
        native, loop = self._native, self._loop
        assert loop is not None
        while True:
            jobs = native.next_async_jobs(64, 0.25)
            if jobs is None:
                return
            if not jobs:
                _forward_core_logs()
            if jobs:
                loop.call_soon_threadsafe(self._schedule, jobs)

    def _async_canceller(self) -> None:
        # Push cancellation: the core's notices name the jobs whose runs were
        # cancelled (task cancelled, timeout, shutdown); their asyncio tasks
        # are cancelled (the handler sees CancelledError).
        native, loop = self._native, self._loop
        assert loop is not None
        while True:
            ids = native.next_async_cancels(0.25)
            if ids is None:
                return
            for job_id in ids:
                loop.call_soon_threadsafe(self._cancel_job, job_id)

    def _cancel_job(self, job_id: int) -> None:
        task = self._job_tasks.get(job_id)
        if task is not None:
            task.cancel()

    def _schedule(self, jobs: List["_native.NativeJob"]) -> None:
        for job in jobs:
            # The loop keeps only weak references to tasks: hold them until done.
            task = asyncio.ensure_future(self._run_async(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_async(self, job: "_native.NativeJob") -> None:
        call = self._begin(job, AsyncContext)
        if call is None:
            return
        task = asyncio.current_task()
        answer = job.ok
        self._body_begins()
        watched = task is not None and job.kind != "batch"
        try:
            if watched:
                # Push cancellation (see _async_canceller). Batch items are
                # cancelled one by one through ``ctx.is_cancelled()`` instead.
                # A notice that came before this registration is seen here.
                self._job_tasks[job.id] = task
                if job.items and all(c.is_cancelled() for _, c in job.items):
                    task.cancel()
            out = await call()
        except _EXIT as e:
            self._exit_requested(e, job)
            return
        except BaseException as e:  # noqa: BLE001 - a handler failure fails only its steps
            answer, out = job.raised, e
        finally:
            if watched:
                self._job_tasks.pop(job.id, None)
            self._body_ends()
        answer(out)
