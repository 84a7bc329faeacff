//! `switchyard._native.NativeClient`: spawn, emit, wait, cancel, retry, inspect.
//!
//! Every call is built once (`*_call`: arguments converted, a `Send` future
//! of one core call returned) and run two ways: the sync method blocks with
//! the GIL released ([`block_core`]); the `*_async` method is a Python
//! coroutine (PyO3 `async fn`) whose core call runs on the bindings' tokio
//! runtime ([`run_core`]) — no thread pool, so pending waits never delay
//! other calls. Cancelling the awaiting task drops the coroutine, which
//! aborts the core call.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde::Serialize;
use switchyard_core::client::duration_from_secs;
use switchyard_core::{Client, NewTask, TaskFilter, TaskId, TaskState};

use crate::block_core;
use crate::convert::{record_to_py, to_py, to_value};
use crate::errors::core_err;

pub(crate) fn parse_id(py: Python<'_>, id: &str) -> PyResult<TaskId> {
    id.parse().map_err(|e| core_err(py, e))
}

pub(crate) fn open_store(py: Python<'_>, url: &str) -> PyResult<switchyard_core::DynStore> {
    // Fails in a forked child before a store of the parent is handed out.
    crate::runtime()?;
    let url = url.to_string();
    block_core(py, async move { switchyard_store::open_shared(&url).await })
}

/// Builds a `NewTask` from Python arguments.
#[allow(clippy::too_many_arguments)]
pub(crate) fn new_task(
    handler: &str,
    input: &Bound<'_, PyAny>,
    priority: i32,
    idempotency_key: Option<String>,
    response_event: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    run_at_ms: Option<i64>,
) -> PyResult<NewTask> {
    let mut t = NewTask::new(handler, to_value(input, "input")?);
    t.priority = priority;
    t.idempotency_key = idempotency_key;
    t.response_event = response_event;
    t.headers = headers.unwrap_or_default();
    t.run_at = run_at_ms;
    Ok(t)
}

/// One core call, arguments already converted.
type Call<T> = Pin<Box<dyn Future<Output = switchyard_core::Result<T>> + Send + 'static>>;

fn call<T>(fut: impl Future<Output = switchyard_core::Result<T>> + Send + 'static) -> Call<T> {
    Box::pin(fut)
}

/// Runs a core call on the bindings' runtime and awaits it from a Python
/// coroutine: the event loop thread only polls a join handle. Dropping the
/// returned future (the awaiting task was cancelled) aborts the call.
async fn run_core<T: Send + 'static>(fut: Call<T>) -> PyResult<T> {
    off_core(fut)
        .await?
        .map_err(|e| Python::attach(|py| core_err(py, e)))
}

/// Runs `fut` on the bindings' runtime and awaits its output from a Python
/// coroutine (the client's calls and the async context's durable calls).
/// Dropping the returned future aborts the call.
pub(crate) async fn off_core<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> PyResult<T> {
    let task = AbortOnDrop(crate::runtime()?.spawn(fut));
    OffCore(task).await.map_err(|e| {
        PyRuntimeError::new_err(format!(
            "switchyard: the operation ended inside the core without an answer ({e})"
        ))
    })
}

/// [`run_core`], then the record as Python objects.
async fn run_record<T: Serialize + Send + 'static>(fut: Call<T>) -> PyResult<Py<PyAny>> {
    let r = run_core(fut).await?;
    Python::attach(|py| record_to_py(py, &r).map(Bound::unbind))
}

/// Sync twin of [`run_record`].
fn block_record<'py, T: Serialize + Send + 'static>(
    py: Python<'py>,
    fut: Call<T>,
) -> PyResult<Bound<'py, PyAny>> {
    let r = block_core(py, fut)?;
    record_to_py(py, &r)
}

/// A spawned core call that is aborted when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Polls `F` with a waker that hands the coroutine's waker to the waking
/// thread: PyO3's coroutine waker takes the GIL, and a core (tokio) thread
/// must never wait on a foreign lock.
struct OffCore<F>(F);

impl<F: Future + Unpin> Future for OffCore<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::new(Forward(cx.waker().clone())));
        Pin::new(&mut self.0).poll(&mut Context::from_waker(&waker))
    }
}

struct Forward(Waker);

impl Wake for Forward {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if let Err(back) = waking_thread().send(self.0.clone()) {
            // No waking thread (it could not be started): wake here.
            back.0.wake();
        }
    }
}

/// This process's waking thread: it wakes Python coroutines (taking the GIL
/// for `loop.call_soon_threadsafe`) so core threads never do. One per
/// process, started on first use; a forked child starts its own (the
/// parent's thread does not exist there). No lock, for the same reason as
/// `bridge::runtime`.
fn waking_thread() -> &'static Sender<Waker> {
    static WAKING: AtomicPtr<(u32, Sender<Waker>)> = AtomicPtr::new(std::ptr::null_mut());
    let pid = std::process::id();
    let cur = WAKING.load(Ordering::Acquire);
    // SAFETY: a non-null pointer comes from `Box::into_raw` below and is never freed.
    if let Some(owned) = unsafe { cur.as_ref() } {
        if owned.0 == pid {
            return &owned.1;
        }
    }
    let (tx, rx) = channel::<Waker>();
    let mine = Box::into_raw(Box::new((pid, tx)));
    match WAKING.compare_exchange(cur, mine, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            // If the thread cannot start, `rx` is dropped and `Forward` wakes inline.
            let _ = std::thread::Builder::new()
                .name("switchyard-py-wake".into())
                .spawn(move || {
                    for w in rx {
                        // A waker that fails (interpreter finalizing) must not end the thread.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
                    }
                });
            // SAFETY: just published; never freed.
            unsafe { &(*mine).1 }
        }
        Err(winner) => {
            // SAFETY: `mine` was never published; `winner` is a leaked record of this process.
            drop(unsafe { Box::from_raw(mine) });
            unsafe { &(*winner).1 }
        }
    }
}

/// The client half of the API; thread-safe.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeClient {
    client: Client,
}

/// The calls, shared by the sync and async methods.
impl NativeClient {
    #[allow(clippy::too_many_arguments)]
    fn spawn_call(
        &self,
        handler: &str,
        input: &Bound<'_, PyAny>,
        priority: i32,
        idempotency_key: Option<String>,
        response_event: Option<String>,
        headers: Option<BTreeMap<String, String>>,
        run_at_ms: Option<i64>,
    ) -> PyResult<Call<(String, bool)>> {
        let t = new_task(
            handler,
            input,
            priority,
            idempotency_key,
            response_event,
            headers,
            run_at_ms,
        )?;
        let c = self.client.clone();
        Ok(call(async move {
            let s = c.spawn_task(t).await?;
            Ok((s.task_id.to_string(), s.created))
        }))
    }

    fn spawn_many_call(&self, tasks: &Bound<'_, PyList>) -> PyResult<Call<Vec<(String, bool)>>> {
        let py = tasks.py();
        let mut v = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            let d = t.cast::<PyDict>().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(format!(
                    "spawn_many: task #{i} must be a dict"
                ))
            })?;
            let handler: String = d
                .get_item("handler")?
                .ok_or_else(|| {
                    pyo3::exceptions::PyValueError::new_err(format!(
                        "spawn_many: task #{i} has no `handler`"
                    ))
                })?
                .extract()?;
            let input = d
                .get_item("input")?
                .unwrap_or_else(|| py.None().into_bound(py));
            let get_s = |k: &str| -> PyResult<Option<String>> {
                match d.get_item(k)? {
                    Some(x) if !x.is_none() => Ok(Some(x.extract()?)),
                    _ => Ok(None),
                }
            };
            let priority: i32 = match d.get_item("priority")? {
                Some(p) if !p.is_none() => p.extract()?,
                _ => 0,
            };
            let headers: Option<BTreeMap<String, String>> = match d.get_item("headers")? {
                Some(h) if !h.is_none() => Some(h.extract()?),
                _ => None,
            };
            v.push(new_task(
                &handler,
                &input,
                priority,
                get_s("idempotency_key")?,
                get_s("response_event")?,
                headers,
                None,
            )?);
        }
        let c = self.client.clone();
        Ok(call(async move {
            let out = c.spawn_many(v).await?;
            Ok(out
                .into_iter()
                .map(|s| (s.task_id.to_string(), s.created))
                .collect())
        }))
    }

    fn emit_call(&self, name: String, payload: &Bound<'_, PyAny>) -> PyResult<Call<bool>> {
        let p = to_value(payload, "event payload")?;
        let c = self.client.clone();
        Ok(call(async move { c.emit(&name, p).await }))
    }

    fn get_call(&self, py: Python<'_>, id: &str) -> PyResult<Call<switchyard_core::TaskRecord>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        Ok(call(async move { c.get(id).await }))
    }

    fn inspect_call(
        &self,
        py: Python<'_>,
        id: &str,
    ) -> PyResult<Call<switchyard_core::TaskDetail>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        Ok(call(async move { c.inspect(id).await }))
    }

    fn list_call(
        &self,
        py: Python<'_>,
        state: Option<&str>,
        handler: Option<String>,
        limit: usize,
    ) -> PyResult<Call<Vec<switchyard_core::TaskRecord>>> {
        let state = match state {
            Some(s) => Some(s.parse::<TaskState>().map_err(|e| core_err(py, e))?),
            None => None,
        };
        let c = self.client.clone();
        let f = TaskFilter {
            state,
            handler,
            limit,
            ..TaskFilter::default()
        };
        Ok(call(async move { c.list(&f).await }))
    }

    fn wait_call(
        &self,
        py: Python<'_>,
        id: &str,
        timeout: f64,
    ) -> PyResult<Call<switchyard_core::TaskRecord>> {
        let id = parse_id(py, id)?;
        let d = duration_from_secs("timeout", timeout).map_err(|e| core_err(py, e))?;
        let c = self.client.clone();
        Ok(call(async move { c.wait(id, d).await }))
    }

    fn result_call(
        &self,
        py: Python<'_>,
        id: &str,
        timeout: f64,
    ) -> PyResult<Call<serde_json::Value>> {
        let id = parse_id(py, id)?;
        let d = duration_from_secs("timeout", timeout).map_err(|e| core_err(py, e))?;
        let c = self.client.clone();
        Ok(call(async move { c.result(id, d).await }))
    }

    fn await_event_call(
        &self,
        py: Python<'_>,
        name: String,
        timeout: f64,
    ) -> PyResult<Call<serde_json::Value>> {
        let d = duration_from_secs("timeout", timeout).map_err(|e| core_err(py, e))?;
        let c = self.client.clone();
        Ok(call(async move { c.await_event(&name, d).await }))
    }

    fn cancel_call(&self, py: Python<'_>, id: &str, cascade: bool) -> PyResult<Call<bool>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        Ok(call(async move { c.cancel(id, cascade).await }))
    }

    fn retry_call(&self, py: Python<'_>, id: &str) -> PyResult<Call<()>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        Ok(call(async move { c.retry(id).await }))
    }

    fn workers_call(&self) -> Call<Vec<switchyard_core::HostInfo>> {
        let c = self.client.clone();
        call(async move { c.workers().await })
    }

    fn events_call(
        &self,
        limit: usize,
        name: Option<String>,
    ) -> Call<Vec<switchyard_core::EventRecord>> {
        let c = self.client.clone();
        call(async move { c.events_named(name.as_deref(), limit).await })
    }

    fn count_steps_call(&self) -> Call<switchyard_core::StateCounts> {
        let s = self.client.store().clone();
        call(async move { s.count_steps().await })
    }
}

#[pymethods]
impl NativeClient {
    #[new]
    #[pyo3(signature = (store, max_payload_bytes=None))]
    fn new(py: Python<'_>, store: &str, max_payload_bytes: Option<usize>) -> PyResult<Self> {
        let store = open_store(py, store)?;
        let mut client = Client::new(store);
        if let Some(n) = max_payload_bytes {
            client = client.with_max_payload(n);
        }
        Ok(Self { client })
    }

    /// The store URL.
    #[getter]
    fn store_url(&self) -> String {
        self.client.store().url()
    }

    #[pyo3(signature = (handler, input, priority=0, idempotency_key=None, response_event=None, headers=None, run_at_ms=None))]
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        py: Python<'_>,
        handler: &str,
        input: &Bound<'_, PyAny>,
        priority: i32,
        idempotency_key: Option<String>,
        response_event: Option<String>,
        headers: Option<BTreeMap<String, String>>,
        run_at_ms: Option<i64>,
    ) -> PyResult<(String, bool)> {
        let c = self.spawn_call(
            handler,
            input,
            priority,
            idempotency_key,
            response_event,
            headers,
            run_at_ms,
        )?;
        block_core(py, c)
    }

    #[pyo3(signature = (handler, input, priority=0, idempotency_key=None, response_event=None, headers=None, run_at_ms=None))]
    #[allow(clippy::too_many_arguments)]
    async fn spawn_async(
        &self,
        handler: String,
        input: Py<PyAny>,
        priority: i32,
        idempotency_key: Option<String>,
        response_event: Option<String>,
        headers: Option<BTreeMap<String, String>>,
        run_at_ms: Option<i64>,
    ) -> PyResult<(String, bool)> {
        let c = Python::attach(|py| {
            self.spawn_call(
                &handler,
                input.bind(py),
                priority,
                idempotency_key,
                response_event,
                headers,
                run_at_ms,
            )
        })?;
        run_core(c).await
    }

    /// `tasks`: a list of dicts with `handler`, `input` and optional
    /// `priority`, `idempotency_key`, `response_event`, `headers`.
    fn spawn_many(
        &self,
        py: Python<'_>,
        tasks: &Bound<'_, PyList>,
    ) -> PyResult<Vec<(String, bool)>> {
        block_core(py, self.spawn_many_call(tasks)?)
    }

    async fn spawn_many_async(&self, tasks: Py<PyList>) -> PyResult<Vec<(String, bool)>> {
        let c = Python::attach(|py| self.spawn_many_call(tasks.bind(py)))?;
        run_core(c).await
    }

    fn emit(&self, py: Python<'_>, name: String, payload: &Bound<'_, PyAny>) -> PyResult<bool> {
        block_core(py, self.emit_call(name, payload)?)
    }

    async fn emit_async(&self, name: String, payload: Py<PyAny>) -> PyResult<bool> {
        let c = Python::attach(|py| self.emit_call(name, payload.bind(py)))?;
        run_core(c).await
    }

    fn get<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.get_call(py, id)?)
    }

    async fn get_async(&self, id: String) -> PyResult<Py<PyAny>> {
        run_record(Python::attach(|py| self.get_call(py, &id))?).await
    }

    fn inspect<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.inspect_call(py, id)?)
    }

    async fn inspect_async(&self, id: String) -> PyResult<Py<PyAny>> {
        run_record(Python::attach(|py| self.inspect_call(py, &id))?).await
    }

    #[pyo3(signature = (state=None, handler=None, limit=100))]
    fn list<'py>(
        &self,
        py: Python<'py>,
        state: Option<&str>,
        handler: Option<String>,
        limit: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.list_call(py, state, handler, limit)?)
    }

    #[pyo3(signature = (state=None, handler=None, limit=100))]
    async fn list_async(
        &self,
        state: Option<String>,
        handler: Option<String>,
        limit: usize,
    ) -> PyResult<Py<PyAny>> {
        let c = Python::attach(|py| self.list_call(py, state.as_deref(), handler, limit))?;
        run_record(c).await
    }

    fn wait<'py>(&self, py: Python<'py>, id: &str, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.wait_call(py, id, timeout)?)
    }

    async fn wait_async(&self, id: String, timeout: f64) -> PyResult<Py<PyAny>> {
        run_record(Python::attach(|py| self.wait_call(py, &id, timeout))?).await
    }

    fn result<'py>(&self, py: Python<'py>, id: &str, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let v = block_core(py, self.result_call(py, id, timeout)?)?;
        to_py(py, &v)
    }

    async fn result_async(&self, id: String, timeout: f64) -> PyResult<Py<PyAny>> {
        let v = run_core(Python::attach(|py| self.result_call(py, &id, timeout))?).await?;
        Python::attach(|py| to_py(py, &v).map(Bound::unbind))
    }

    fn await_event<'py>(
        &self,
        py: Python<'py>,
        name: String,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let v = block_core(py, self.await_event_call(py, name, timeout)?)?;
        to_py(py, &v)
    }

    async fn await_event_async(&self, name: String, timeout: f64) -> PyResult<Py<PyAny>> {
        let v = run_core(Python::attach(|py| {
            self.await_event_call(py, name, timeout)
        })?)
        .await?;
        Python::attach(|py| to_py(py, &v).map(Bound::unbind))
    }

    #[pyo3(signature = (id, cascade=false))]
    fn cancel(&self, py: Python<'_>, id: &str, cascade: bool) -> PyResult<bool> {
        block_core(py, self.cancel_call(py, id, cascade)?)
    }

    #[pyo3(signature = (id, cascade=false))]
    async fn cancel_async(&self, id: String, cascade: bool) -> PyResult<bool> {
        run_core(Python::attach(|py| self.cancel_call(py, &id, cascade))?).await
    }

    fn retry(&self, py: Python<'_>, id: &str) -> PyResult<()> {
        block_core(py, self.retry_call(py, id)?)
    }

    async fn retry_async(&self, id: String) -> PyResult<()> {
        run_core(Python::attach(|py| self.retry_call(py, &id))?).await
    }

    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.workers_call())
    }

    async fn workers_async(&self) -> PyResult<Py<PyAny>> {
        run_record(self.workers_call()).await
    }

    #[pyo3(signature = (limit=100, name=None))]
    fn events<'py>(
        &self,
        py: Python<'py>,
        limit: usize,
        name: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.events_call(limit, name))
    }

    #[pyo3(signature = (limit=100, name=None))]
    async fn events_async(&self, limit: usize, name: Option<String>) -> PyResult<Py<PyAny>> {
        run_record(self.events_call(limit, name)).await
    }

    /// Number of steps per state (for progress and tests).
    fn count_steps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        block_record(py, self.count_steps_call())
    }

    async fn count_steps_async(&self) -> PyResult<Py<PyAny>> {
        run_record(self.count_steps_call()).await
    }
}
