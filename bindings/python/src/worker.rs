//! `switchyard._native.NativeWorker` and `NativeJob`: a host whose handlers
//! are Python functions. Two inboxes (sync handlers on Python threads, async
//! handlers on one asyncio loop) are fed by the core. Each sync thread reads
//! the sync inbox through its own `NativeConsumer` (the core's serial-inbox
//! policy: a thread running handlers keeps taking queued jobs while holding
//! the GIL; idle threads wait with the GIL released and are woken only when
//! needed); the asyncio feeder takes batches. Each job is answered once.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use switchyard_core::bridge::{Consumer, HandlerSpec, HostPlan, Inbox, Job, JobKind, Reply};
use switchyard_core::{ApiError, Decision, NewStep, RunningWorker, StepError, WaitFor};

use crate::block_core;
use crate::client::open_store;
use crate::context::NativeContext;
use crate::convert::{to_py, to_value};

/// A host for Python handlers.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeWorker {
    store_url: String,
    plan: Mutex<HostPlan>,
    sync_inbox: Arc<Inbox>,
    async_inbox: Arc<Inbox>,
    running: Mutex<Option<Arc<RunningWorker>>>,
}

fn positive_secs(what: &str, s: f64) -> PyResult<Duration> {
    switchyard_core::bridge::seconds(what, s).map_err(PyValueError::new_err)
}

fn jobs_for_python(
    py: Python<'_>,
    jobs: Result<Vec<Job>, switchyard_core::bridge::Closed>,
) -> PyResult<Option<Vec<NativeJob>>> {
    match jobs {
        Err(_) => Ok(None),
        Ok(jobs) => jobs
            .into_iter()
            .map(|j| NativeJob::new(py, j))
            .collect::<PyResult<Vec<_>>>()
            .map(Some),
    }
}

/// One sync handler thread's handle on the sync inbox.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeConsumer {
    inner: Mutex<Consumer>,
}

#[pymethods]
impl NativeConsumer {
    /// Up to `max` jobs: those already queued are taken at once with the GIL
    /// held; otherwise waits at most `timeout` seconds with the GIL released.
    /// Returns None once the worker has stopped.
    #[pyo3(signature = (max=1, timeout=0.2))]
    fn next_jobs(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: f64,
    ) -> PyResult<Option<Vec<NativeJob>>> {
        let slice = positive_secs("timeout", timeout)?;
        let mut consumer = self.inner.lock();
        let jobs = match consumer.try_next(max) {
            Ok(jobs) if jobs.is_empty() => {
                let c = &mut *consumer;
                py.detach(move || c.next(max, slice))
            }
            other => other,
        };
        jobs_for_python(py, jobs)
    }
}

#[pymethods]
impl NativeWorker {
    #[new]
    #[pyo3(signature = (store, concurrency=64, lease=30.0, shutdown_grace=10.0, max_payload_bytes=None))]
    fn new(
        store: String,
        concurrency: usize,
        lease: f64,
        shutdown_grace: f64,
        max_payload_bytes: Option<usize>,
    ) -> PyResult<Self> {
        if concurrency == 0 {
            return Err(PyValueError::new_err("concurrency must be at least 1"));
        }
        Ok(Self {
            store_url: store,
            plan: Mutex::new(HostPlan::new(
                concurrency,
                positive_secs("lease", lease)?,
                positive_secs("shutdown_grace", shutdown_grace)?,
                max_payload_bytes,
            )),
            sync_inbox: Inbox::serial(),
            async_inbox: Inbox::new(),
            running: Mutex::new(None),
        })
    }

    /// Registers a handler served by this process's Python code.
    #[pyo3(signature = (name, kind, is_async, concurrency=None, timeout=None, max_attempts=None, initial_backoff=None, max_backoff=None, max_batch=None, linger=None, rate_limit=None, burst=None))]
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        name: String,
        kind: &str,
        is_async: bool,
        concurrency: Option<usize>,
        timeout: Option<f64>,
        max_attempts: Option<u32>,
        initial_backoff: Option<f64>,
        max_backoff: Option<f64>,
        max_batch: Option<usize>,
        linger: Option<f64>,
        rate_limit: Option<f64>,
        burst: Option<u32>,
    ) -> PyResult<()> {
        if self.running.lock().is_some() {
            return Err(PyRuntimeError::new_err(
                "register handlers before the worker starts",
            ));
        }
        let kind = JobKind::from_name(kind).map_err(PyValueError::new_err)?;
        let spec = HandlerSpec {
            concurrency,
            timeout,
            max_attempts,
            initial_backoff,
            max_backoff,
            max_batch,
            linger,
            rate_limit,
            burst,
        };
        let mut plan = self.plan.lock();
        let opts = spec
            .build(&name, kind, plan.concurrency, str::to_string)
            .map_err(PyValueError::new_err)?;
        let inbox = if is_async {
            self.async_inbox.clone()
        } else {
            self.sync_inbox.clone()
        };
        plan.register(name, kind, opts, inbox)
            .map(|_| ())
            .map_err(PyValueError::new_err)
    }

    /// Opens the store and starts the host (handlers must be registered).
    fn start(&self, py: Python<'_>) -> PyResult<String> {
        if self.running.lock().is_some() {
            return Err(PyRuntimeError::new_err("the worker is already running"));
        }
        let store = open_store(py, &self.store_url)?;
        let worker = self
            .plan
            .lock()
            .build(store, "Python")
            .map_err(|e| crate::errors::core_err(py, e))?;
        let running = block_core(py, async move { worker.start().await })?;
        let id = running.host_id().to_string();
        *self.running.lock() = Some(Arc::new(running));
        Ok(id)
    }

    #[getter]
    fn host_id(&self) -> Option<String> {
        self.running
            .lock()
            .as_ref()
            .map(|r| r.host_id().to_string())
    }

    /// Takes up to `max` jobs from the async inbox (the asyncio feeder
    /// thread), waiting at most `timeout` seconds with the GIL released.
    /// Returns None once the worker has stopped.
    #[pyo3(signature = (max=64, timeout=0.2))]
    fn next_async_jobs(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: f64,
    ) -> PyResult<Option<Vec<NativeJob>>> {
        let inbox = self.async_inbox.clone();
        let slice = positive_secs("timeout", timeout)?;
        jobs_for_python(py, py.detach(move || inbox.recv_batch(max, slice)))
    }

    /// A handle on the sync inbox for one serving thread.
    fn consumer(&self) -> NativeConsumer {
        NativeConsumer {
            inner: Mutex::new(Consumer::new(self.sync_inbox.clone())),
        }
    }

    /// Wakes threads waiting for jobs (they return an empty list).
    fn interrupt(&self) {
        self.sync_inbox.interrupt();
        self.async_inbox.interrupt();
    }

    /// Begins a graceful shutdown and returns at once.
    fn shutdown(&self) {
        if let Some(r) = self.running.lock().as_ref() {
            r.shutdown();
        }
    }

    /// Stops the host: no more claims, running steps get the grace period,
    /// then the inboxes close so handler threads exit. Waits with the GIL
    /// released; the handler threads must keep serving jobs meanwhile.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let running = self.running.lock().clone();
        if let Some(r) = running {
            crate::block(py, async move { r.stop().await })?;
        }
        self.sync_inbox.close();
        self.async_inbox.close();
        Ok(())
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.lock().is_some() && !self.sync_inbox.is_closed()
    }
}

/// One unit of work for a Python handler: one step, or a batch.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeJob {
    job: Mutex<Option<Job>>,
    #[pyo3(get)]
    handler: String,
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    items: Py<PyList>,
}

impl NativeJob {
    fn new(py: Python<'_>, mut job: Job) -> PyResult<Self> {
        let items = PyList::empty(py);
        for item in job.items.drain(..) {
            let input = to_py(py, &item.input)?;
            let ctx = Py::new(py, NativeContext { ctx: item.ctx })?;
            items.append(PyTuple::new(py, [input, ctx.into_bound(py).into_any()])?)?;
        }
        let handler = job.handler.clone();
        let kind = job.kind.name();
        // Items were moved out for Python; the job keeps the reply channel.
        Ok(Self {
            job: Mutex::new(Some(job)),
            handler,
            kind,
            items: items.unbind(),
        })
    }
}

fn error_kind(
    kind: &str,
    message: String,
    trace: Option<String>,
    retry_after: Option<f64>,
) -> PyResult<StepError> {
    Ok(match kind {
        "retryable" => StepError::Retryable {
            message,
            retry_after: retry_after.and_then(switchyard_core::client::hint_secs),
            trace,
        },
        "permanent" => StepError::Permanent { message, trace },
        "invalid_input" => StepError::InvalidInput(message),
        "cancelled" => StepError::Cancelled,
        "await_timeout" => StepError::AwaitTimeout { event: message },
        "lease_lost" => StepError::LeaseLost,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown error kind `{other}`"
            )))
        }
    })
}

fn decision(
    handler: &str,
    steps: &Bound<'_, PyAny>,
    final_step: Option<String>,
) -> PyResult<Decision> {
    let what = format!("decision of handler `{handler}`");
    let v = to_value(steps, &what)?;
    let steps: Vec<NewStep> = serde_json::from_value(v).map_err(|e| {
        PyTypeError::new_err(format!(
            "{what}: each step needs `name`, `handler`, `input` and optional `depends_on`: {e}"
        ))
    })?;
    Ok(Decision::Steps { steps, final_step })
}

/// Converts one outcome tuple built by the Python glue into a reply.
fn reply(handler: &str, o: &Bound<'_, PyAny>) -> PyResult<Reply> {
    let t = o
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("outcome must be a tuple"))?;
    let tag: String = t.get_item(0)?.extract()?;
    Ok(match tag.as_str() {
        "value" => match to_value(&t.get_item(1)?, &format!("result of handler `{handler}`")) {
            Ok(v) => Reply::Value(v),
            // A non-serialisable result fails the step, naming the type.
            Err(e) => Reply::Error(StepError::permanent(Python::attach(|py| {
                e.value(py).to_string()
            }))),
        },
        "error" => {
            let kind: String = t.get_item(1)?.extract()?;
            let message: String = t.get_item(2)?.extract()?;
            let trace: Option<String> = t.get_item(3)?.extract()?;
            let retry_after: Option<f64> = t.get_item(4)?.extract()?;
            Reply::Error(error_kind(&kind, message, trace, retry_after)?)
        }
        "suspend" => {
            let wait: String = t.get_item(1)?.extract()?;
            let wait: WaitFor =
                serde_json::from_str(&wait).map_err(|e| PyValueError::new_err(e.to_string()))?;
            Reply::Error(StepError::Suspend(wait))
        }
        "complete" => match to_value(&t.get_item(1)?, &format!("result of decision `{handler}`")) {
            Ok(v) => Reply::Decision(Decision::Complete(v)),
            Err(e) => Reply::Error(StepError::permanent(Python::attach(|py| {
                e.value(py).to_string()
            }))),
        },
        "decision" => {
            let final_step: Option<String> = t.get_item(2)?.extract()?;
            match decision(handler, &t.get_item(1)?, final_step) {
                Ok(d) => Reply::Decision(d),
                Err(e) => Reply::Error(StepError::permanent(Python::attach(|py| {
                    e.value(py).to_string()
                }))),
            }
        }
        "http" => {
            let status: u16 = t.get_item(1)?.extract()?;
            let retry_after: Option<f64> = t.get_item(2)?.extract()?;
            let message: String = t.get_item(3)?.extract()?;
            Reply::Api(ApiError::Http {
                status,
                retry_after: retry_after.and_then(switchyard_core::client::hint_secs),
                message,
            })
        }
        "network" => Reply::Api(ApiError::Network(t.get_item(1)?.extract()?)),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown outcome tag `{other}`"
            )))
        }
    })
}

#[pymethods]
impl NativeJob {
    /// True if the core stopped waiting (timeout, cancellation, shutdown).
    #[getter]
    fn abandoned(&self) -> bool {
        self.job
            .lock()
            .as_ref()
            .map(|j| j.abandoned())
            .unwrap_or(true)
    }

    /// Answers the job with one outcome tuple per item:
    /// `("value", v)`, `("error", kind, message, trace, retry_after)`,
    /// `("suspend", wait_json)`, `("complete", v)`, `("decision", steps, final_step)`,
    /// `("http", status, retry_after, message)`, `("network", message)`.
    /// Never blocks. A second call is an error.
    fn finish(&self, outcomes: &Bound<'_, PyList>) -> PyResult<()> {
        let job = self
            .job
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this job was already finished"))?;
        let mut replies = Vec::with_capacity(outcomes.len());
        for o in outcomes.iter() {
            replies.push(reply(&self.handler, &o).unwrap_or_else(|e| {
                Reply::Error(StepError::permanent(format!(
                    "bad outcome from the Python glue: {e}"
                )))
            }));
        }
        job.complete(replies);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("<NativeJob handler={} kind={}>", self.handler, self.kind)
    }
}
