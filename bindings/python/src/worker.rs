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
use pyo3::exceptions::{PyBaseException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyList, PyTuple, PyType};
use serde_json::Value;
use switchyard_core::bridge::{
    Consumer, ErrorClass, HandlerSpec, Host, HostPlan, Inbox, Job, JobKind, Reply,
};

use crate::block_core;
use crate::client::open_store;
use crate::context::NativeContext;
use crate::convert::{to_py, to_value};
use crate::errors::{core_err, reply_for};

/// A host for Python handlers.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeWorker {
    store_url: String,
    /// Registration, start and bounded stop: the core's lifecycle.
    host: Arc<Host>,
    sync_inbox: Arc<Inbox>,
    async_inbox: Arc<Inbox>,
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

impl NativeWorker {
    fn with_plan(store_url: String, plan: HostPlan) -> Self {
        Self {
            store_url,
            host: Arc::new(Host::new(switchyard_core::bridge::Language::Python, plan)),
            sync_inbox: Inbox::serial(),
            async_inbox: {
                // Push cancellation of async handlers comes through the inbox.
                let inbox = Inbox::new();
                inbox.watch_cancels();
                inbox
            },
        }
    }
}

#[pymethods]
impl NativeWorker {
    #[new]
    #[pyo3(signature = (store, concurrency=64, lease=30.0, shutdown_grace=10.0, max_payload_bytes=None, health_listen=None))]
    fn new(
        store: String,
        concurrency: usize,
        lease: f64,
        shutdown_grace: f64,
        max_payload_bytes: Option<usize>,
        health_listen: Option<String>,
    ) -> PyResult<Self> {
        if concurrency == 0 {
            return Err(PyValueError::new_err("concurrency must be at least 1"));
        }
        let mut plan = HostPlan::new(
            concurrency,
            positive_secs("lease", lease)?,
            positive_secs("shutdown_grace", shutdown_grace)?,
            max_payload_bytes,
        );
        if let Some(a) = health_listen {
            plan.health_listen = Some(
                switchyard_core::bridge::listen_address("health_listen", &a)
                    .map_err(PyValueError::new_err)?,
            );
        }
        switchyard_store::check_url(&store)
            .map_err(|e| Python::attach(|py| crate::errors::core_err(py, e)))?;
        Ok(Self::with_plan(store, plan))
    }

    /// A worker from the configuration (`switchyard_core::config`): the
    /// file at `path`, else `SWITCHYARD_CONFIG`, else none, then the
    /// `SWITCHYARD_*` environment; its store and `[host]` settings, and its
    /// `log.level` for the core records forwarded to `logging`.
    #[staticmethod]
    #[pyo3(signature = (path=None))]
    fn from_config(py: Python<'_>, path: Option<std::path::PathBuf>) -> PyResult<Self> {
        let config = switchyard_core::Config::load(path.as_deref()).map_err(|e| core_err(py, e))?;
        let url = config.store.open_url().map_err(|e| core_err(py, e))?;
        crate::logs::apply(&config.log);
        switchyard_store::check_url(&url)
            .map_err(|e| Python::attach(|py| crate::errors::core_err(py, e)))?;
        Ok(Self::with_plan(url, HostPlan::from_config(&config.host)))
    }

    /// The store URL the worker opens (with its password, if any: never print it).
    #[getter]
    fn store_url(&self) -> String {
        self.store_url.clone()
    }

    /// Steps run at once by the host.
    #[getter]
    fn concurrency(&self) -> usize {
        self.host.concurrency()
    }

    /// Seconds running steps may finish during a graceful shutdown.
    #[getter]
    fn shutdown_grace(&self) -> f64 {
        self.host.shutdown_grace().as_secs_f64()
    }

    /// Registers a handler served by this process's Python code; returns its
    /// id (0, 1, 2… in order), which its jobs carry as `handler_id`.
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
    ) -> PyResult<usize> {
        if self.host.host_id().is_some() {
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
        let inbox = if is_async {
            &self.async_inbox
        } else {
            &self.sync_inbox
        };
        self.host
            .register(name, kind, &spec, inbox, str::to_string)
            .map_err(PyValueError::new_err)
    }

    /// Opens the store and starts the host (handlers must be registered).
    fn start(&self, py: Python<'_>) -> PyResult<String> {
        if self.host.host_id().is_some() {
            return Err(PyRuntimeError::new_err("the worker is already running"));
        }
        let store = open_store(py, &self.store_url)?;
        let host = self.host.clone();
        block_core(py, async move { host.start(store).await })
    }

    #[getter]
    fn host_id(&self) -> Option<String> {
        self.host.host_id()
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served, once started
    /// with `health_listen`.
    #[getter]
    fn health_addr(&self) -> Option<String> {
        self.host.health_addr().map(|a| a.to_string())
    }

    /// Ids of async jobs that should stop (the core's cancellation
    /// notices), waiting at most `timeout` seconds with the GIL released;
    /// None once the worker has stopped. The asyncio side cancels the task
    /// running each.
    #[pyo3(signature = (timeout=0.25))]
    fn next_async_cancels(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Vec<u64>>> {
        let inbox = self.async_inbox.clone();
        let slice = positive_secs("timeout", timeout)?;
        Ok(py.detach(move || inbox.recv_cancels(slice).ok()))
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
        self.host.shutdown();
    }

    /// Stops the host: no more claims, running steps get the grace period,
    /// then the inboxes close so handler threads exit. Waits with the GIL
    /// released; the handler threads must keep serving jobs meanwhile.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let host = self.host.clone();
        crate::block(py, async move { host.stop().await })?;
        // Inboxes with no handler registered are closed here too.
        self.sync_inbox.close();
        self.async_inbox.close();
        Ok(())
    }

    #[getter]
    fn running(&self) -> bool {
        self.host.is_running()
    }
}

/// One unit of work for a Python handler: one step, or a batch. Answered
/// once, by [`NativeJob::ok`] or [`NativeJob::raised`].
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeJob {
    job: Mutex<Option<Job>>,
    /// The job's id (what the inbox's cancellation notices name).
    #[pyo3(get)]
    id: u64,
    /// The handler's id, as `NativeWorker.register` returned it.
    #[pyo3(get)]
    handler_id: usize,
    #[pyo3(get)]
    handler: String,
    kind: JobKind,
    n: usize,
    #[pyo3(get)]
    items: Py<PyList>,
}

impl NativeJob {
    fn new(py: Python<'_>, mut job: Job) -> PyResult<Self> {
        let items = PyList::empty(py);
        let n = job.items.len();
        for item in job.items.drain(..) {
            let input = to_py(py, &item.input)?;
            let ctx = Py::new(py, NativeContext { ctx: item.ctx })?;
            items.append(PyTuple::new(py, [input, ctx.into_bound(py).into_any()])?)?;
        }
        // Items were moved out for Python; the job keeps the reply channel.
        Ok(Self {
            id: job.id,
            handler_id: job.handler_id,
            handler: job.handler.clone(),
            kind: job.kind,
            n,
            job: Mutex::new(Some(job)),
            items: items.unbind(),
        })
    }

    fn answer(&self, replies: Vec<Reply>) -> PyResult<()> {
        let job = self
            .job
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this job was already answered"))?;
        job.complete(replies);
        Ok(())
    }

    /// The answer for a value.
    fn value(&self, v: &Bound<'_, PyAny>) -> Reply {
        self.json(v, "a value").map_or_else(|r| r, Reply::Value)
    }

    /// `v` as JSON, or the failure naming what has no JSON form.
    fn json(&self, v: &Bound<'_, PyAny>, what: &str) -> Result<Value, Reply> {
        to_value(v, what).map_err(|e| {
            Reply::unrepresentable("Python", &self.handler, &e.value(v.py()).to_string())
        })
    }

    /// The answer for what a decision handler returned.
    fn decision(&self, d: &Bound<'_, PyAny>) -> PyResult<Reply> {
        let py = d.py();
        let class = DECISION.import(py, "switchyard._worker", "Decision")?;
        if !d.is_instance(class.as_any())? {
            return Ok(Reply::error(
                ErrorClass::Permanent,
                format!(
                    "decision handler `{}` returned {}, not switchyard.Decision",
                    self.handler,
                    d.get_type().name()?
                ),
                None,
                None,
            ));
        }
        if d.getattr("done")?.is_truthy()? {
            return Ok(match self.json(&d.getattr("value")?, "a value") {
                Ok(v) => Reply::complete(v),
                Err(r) => r,
            });
        }
        let Ok(final_step) = d.getattr("final_step")?.extract::<Option<String>>() else {
            return Ok(Reply::error(
                ErrorClass::Permanent,
                format!(
                    "decision of handler `{}`: final_step must be a step name (str) or None",
                    self.handler
                ),
                None,
                None,
            ));
        };
        Ok(match self.json(&d.getattr("steps")?, "a decision") {
            Ok(steps) => Reply::decision_steps(&self.handler, steps, final_step),
            Err(r) => r,
        })
    }

    /// The answers for what the handler returned, one per item.
    fn replies(&self, result: &Bound<'_, PyAny>) -> PyResult<Vec<Reply>> {
        let one = |r: Reply| vec![r];
        Ok(match self.kind {
            JobKind::Decision => one(self.decision(result)?),
            JobKind::Batch => {
                let results = result.try_iter()?.collect::<PyResult<Vec<_>>>()?;
                if results.len() != self.n {
                    let message = format!(
                        "batch handler `{}` returned {} results for {} steps",
                        self.handler,
                        results.len(),
                        self.n
                    );
                    return Ok(vec![
                        Reply::error(ErrorClass::Permanent, message, None, None);
                        self.n
                    ]);
                }
                results
                    .iter()
                    .map(|r| {
                        if r.is_instance_of::<PyBaseException>() {
                            reply_for(&self.handler, r)
                        } else {
                            self.value(r)
                        }
                    })
                    .collect()
            }
            _ => one(self.value(result)),
        })
    }
}

static DECISION: PyOnceLock<Py<PyType>> = PyOnceLock::new();

#[pymethods]
impl NativeJob {
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind.name()
    }

    /// True if the core stopped waiting (timeout, cancellation, shutdown).
    #[getter]
    fn abandoned(&self) -> bool {
        self.job
            .lock()
            .as_ref()
            .map(|j| j.abandoned())
            .unwrap_or(true)
    }

    /// Answers with what the handler returned: a value, a `Decision` for
    /// decision handlers, a list with one value or exception per item for
    /// batch handlers. What cannot be stored fails its step, saying why.
    /// Never blocks. A second answer is an error.
    fn ok(&self, result: &Bound<'_, PyAny>) -> PyResult<()> {
        let replies = match self.replies(result) {
            Ok(r) => r,
            // Looking at the result raised (a batch result that is not a
            // list, say): as if the handler had raised that.
            Err(e) => vec![reply_for(&self.handler, e.value(result.py()).as_any()); self.n],
        };
        self.answer(replies)
    }

    /// Answers with the exception that ended the handler (every item of a
    /// batch fails with it). Never blocks. A second answer is an error.
    fn raised(&self, exception: &Bound<'_, PyAny>) -> PyResult<()> {
        let reply = reply_for(&self.handler, exception);
        self.answer(vec![reply; self.n])
    }

    fn __repr__(&self) -> String {
        format!(
            "<NativeJob handler={} kind={}>",
            self.handler,
            self.kind.name()
        )
    }
}
