//! `switchyard._native.NativeClient`: spawn, emit, wait, cancel, retry, inspect.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use switchyard_core::client::duration_from_secs;
use switchyard_core::{Client, NewTask, TaskFilter, TaskId, TaskState};

use crate::convert::{record_to_py, to_py, to_value};
use crate::errors::core_err;
use crate::{block, block_core};

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

/// The client half of the API; thread-safe.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeClient {
    client: Client,
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
        let s = block_core(py, async move { c.spawn_task(t).await })?;
        Ok((s.task_id.to_string(), s.created))
    }

    /// `tasks`: a list of dicts with `handler`, `input` and optional
    /// `priority`, `idempotency_key`, `response_event`, `headers`.
    fn spawn_many(
        &self,
        py: Python<'_>,
        tasks: &Bound<'_, PyList>,
    ) -> PyResult<Vec<(String, bool)>> {
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
        let out = block_core(py, async move { c.spawn_many(v).await })?;
        Ok(out
            .into_iter()
            .map(|s| (s.task_id.to_string(), s.created))
            .collect())
    }

    fn emit(&self, py: Python<'_>, name: String, payload: &Bound<'_, PyAny>) -> PyResult<bool> {
        let p = to_value(payload, "event payload")?;
        let c = self.client.clone();
        block_core(py, async move { c.emit(&name, p).await })
    }

    fn get<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyAny>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        let t = block_core(py, async move { c.get(id).await })?;
        record_to_py(py, &t)
    }

    fn inspect<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyAny>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        let t = block_core(py, async move { c.inspect(id).await })?;
        record_to_py(py, &t)
    }

    #[pyo3(signature = (state=None, handler=None, limit=100))]
    fn list<'py>(
        &self,
        py: Python<'py>,
        state: Option<&str>,
        handler: Option<String>,
        limit: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let state = match state {
            Some(s) => Some(s.parse::<TaskState>().map_err(|e| core_err(py, e))?),
            None => None,
        };
        let c = self.client.clone();
        let f = TaskFilter {
            state,
            handler,
            limit,
        };
        let v = block_core(py, async move { c.list(&f).await })?;
        record_to_py(py, &v)
    }

    fn wait<'py>(&self, py: Python<'py>, id: &str, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        let d = duration_from_secs("timeout", timeout).map_err(|e| core_err(py, e))?;
        let t = block_core(py, async move { c.wait(id, d).await })?;
        record_to_py(py, &t)
    }

    fn result<'py>(&self, py: Python<'py>, id: &str, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        let d = duration_from_secs("timeout", timeout).map_err(|e| core_err(py, e))?;
        let v = block_core(py, async move { c.result(id, d).await })?;
        to_py(py, &v)
    }

    #[pyo3(signature = (id, cascade=false))]
    fn cancel(&self, py: Python<'_>, id: &str, cascade: bool) -> PyResult<bool> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        block_core(py, async move { c.cancel(id, cascade).await })
    }

    fn retry(&self, py: Python<'_>, id: &str) -> PyResult<()> {
        let id = parse_id(py, id)?;
        let c = self.client.clone();
        block_core(py, async move { c.retry(id).await })
    }

    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = self.client.clone();
        let v = block_core(py, async move { c.workers().await })?;
        record_to_py(py, &v)
    }

    #[pyo3(signature = (limit=100))]
    fn events<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyAny>> {
        let c = self.client.clone();
        let v = block_core(py, async move { c.events(limit).await })?;
        record_to_py(py, &v)
    }

    /// Number of steps per state (for progress and tests).
    fn count_steps<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = self.client.store().clone();
        let v = block(py, async move { s.count_steps().await })?.map_err(|e| core_err(py, e))?;
        record_to_py(py, &v)
    }
}
