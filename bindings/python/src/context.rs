//! `switchyard._native.NativeContext`: the durable context of one step run.
//! Every operation waits with the GIL released; the Python wrapper
//! (`switchyard.Context` / `AsyncContext`) adds `checkpoint(name, fn)` on top
//! of `checkpoint_lookup` / `checkpoint_save` because `fn` is Python code.

use std::future::Future;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyList;
use switchyard_core::{ChildSpec, Context, StepResult};

use crate::convert::{record_to_py, to_py, to_value};

/// Durable context handle given to Python handlers.
#[pyclass(module = "switchyard._native", frozen)]
pub struct NativeContext {
    pub(crate) ctx: Context,
}

impl NativeContext {
    /// Waits for context call `fut` with the GIL released. A step error
    /// becomes the exception of [`switchyard_core::bridge::raise`] (durable
    /// control flow stays kept in the context).
    fn wait<T: Send + 'static>(
        &self,
        py: Python<'_>,
        fut: impl Future<Output = StepResult<T>> + Send + 'static,
    ) -> PyResult<T> {
        crate::block(py, fut)?.map_err(|e| crate::errors::step_err(py, &self.ctx, e))
    }

    /// [`Self::wait`] for `async def` handlers: a coroutine whose call runs
    /// on the core's runtime (no thread pool, so the number of durable calls
    /// in flight is bounded only by the handlers running).
    async fn wait_async<T: Send + 'static>(
        &self,
        fut: impl Future<Output = StepResult<T>> + Send + 'static,
    ) -> PyResult<T> {
        crate::client::off_core(fut)
            .await?
            .map_err(|e| Python::attach(|py| crate::errors::step_err(py, &self.ctx, e)))
    }
}

/// `children` of `delegate_parallel`: `(handler, input)` pairs.
fn children_of(children: &Bound<'_, PyList>) -> PyResult<Vec<ChildSpec>> {
    let mut specs = Vec::with_capacity(children.len());
    for (i, c) in children.iter().enumerate() {
        let (handler, input): (String, Bound<'_, PyAny>) = c.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "delegate_parallel: child #{i} must be a (handler, input) pair"
            ))
        })?;
        specs.push(ChildSpec::new(
            handler,
            to_value(&input, &format!("child #{i} input"))?,
        ));
    }
    Ok(specs)
}

fn spawn_options(response_event: Option<String>) -> switchyard_core::SpawnOptions {
    let mut o = switchyard_core::SpawnOptions::default();
    o.response_event = response_event;
    o
}

/// Seconds from Python, refused (InvalidInput naming `what`) when negative,
/// NaN, infinite or over the core's maximum.
fn secs(what: &str, s: f64) -> switchyard_core::Result<Duration> {
    switchyard_core::client::duration_from_secs(what, s)
}

#[pymethods]
impl NativeContext {
    #[getter]
    fn task_id(&self) -> String {
        self.ctx.task_id().to_string()
    }
    #[getter]
    fn step_id(&self) -> String {
        self.ctx.step_id().to_string()
    }
    #[getter]
    fn step_name(&self) -> String {
        self.ctx.step_name().to_string()
    }
    #[getter]
    fn handler(&self) -> String {
        self.ctx.handler().to_string()
    }
    #[getter]
    fn attempt(&self) -> u32 {
        self.ctx.attempt()
    }
    #[getter]
    fn run(&self) -> u64 {
        self.ctx.run()
    }
    #[getter]
    fn priority(&self) -> i32 {
        self.ctx.priority()
    }
    #[getter]
    fn headers(&self) -> std::collections::BTreeMap<String, String> {
        self.ctx.headers().clone()
    }
    /// Seconds left before the handler's timeout, or None.
    #[getter]
    fn time_left(&self) -> Option<f64> {
        self.ctx.time_left().map(|d| d.as_secs_f64())
    }

    fn is_cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    fn set_status(&self, py: Python<'_>, status: String) -> PyResult<()> {
        self.ctx
            .set_status(&status)
            .map_err(|e| crate::errors::step_err(py, &self.ctx, e))
    }

    /// Returns `(key, found, value)` for checkpoint `name` (numbered by call order).
    fn checkpoint_lookup<'py>(
        &self,
        py: Python<'py>,
        name: String,
    ) -> PyResult<(String, bool, Bound<'py, PyAny>)> {
        let ctx = self.ctx.clone();
        let (key, v) = self.wait(py, async move { ctx.checkpoint_lookup(&name).await })?;
        match v {
            Some(v) => Ok((key, true, to_py(py, &v)?)),
            None => Ok((key, false, py.None().into_bound(py))),
        }
    }

    fn checkpoint_save(
        &self,
        py: Python<'_>,
        key: String,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let v = to_value(value, &format!("checkpoint `{key}` value"))?;
        let ctx = self.ctx.clone();
        self.wait(py, async move { ctx.checkpoint_save(&key, v).await })
    }

    #[pyo3(signature = (name, timeout=None))]
    fn await_event<'py>(
        &self,
        py: Python<'py>,
        name: String,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.ctx.clone();
        let t = timeout.map(|s| secs("await_event timeout", s)).transpose();
        let v = self.wait(py, async move { ctx.await_event(&name, t?).await })?;
        to_py(py, &v)
    }

    fn sleep(&self, py: Python<'_>, seconds: f64) -> PyResult<()> {
        let ctx = self.ctx.clone();
        let d = secs("sleep duration", seconds);
        self.wait(py, async move { ctx.sleep(d?).await })
    }

    fn sleep_until(&self, py: Python<'_>, at_ms: i64) -> PyResult<()> {
        let ctx = self.ctx.clone();
        self.wait(py, async move { ctx.sleep_until(at_ms).await })
    }

    fn emit_event(
        &self,
        py: Python<'_>,
        name: String,
        payload: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let p = to_value(payload, "event payload")?;
        let ctx = self.ctx.clone();
        self.wait(py, async move { ctx.emit_event(&name, p).await })
    }

    #[pyo3(signature = (handler, input, response_event=None))]
    fn spawn(
        &self,
        py: Python<'_>,
        handler: String,
        input: &Bound<'_, PyAny>,
        response_event: Option<String>,
    ) -> PyResult<String> {
        let i = to_value(input, "child input")?;
        let ctx = self.ctx.clone();
        let opts = spawn_options(response_event);
        let id = self.wait(py, async move { ctx.spawn_with(&handler, i, opts).await })?;
        Ok(id.to_string())
    }

    fn delegate<'py>(
        &self,
        py: Python<'py>,
        handler: String,
        input: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let i = to_value(input, "child input")?;
        let ctx = self.ctx.clone();
        let v = self.wait(py, async move { ctx.delegate(&handler, i).await })?;
        to_py(py, &v)
    }

    /// `children`: a list of `(handler, input)` pairs. Returns one dict per
    /// child (`task_id`, `state`, `result`, `error`), in order.
    fn delegate_parallel<'py>(
        &self,
        py: Python<'py>,
        children: &Bound<'py, PyList>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let specs = children_of(children)?;
        let ctx = self.ctx.clone();
        let out = self.wait(py, async move { ctx.delegate_parallel(specs).await })?;
        record_to_py(py, &out)
    }

    fn heartbeat(&self, py: Python<'_>) -> PyResult<()> {
        let ctx = self.ctx.clone();
        self.wait(py, async move { ctx.heartbeat().await })
    }

    fn dependency_results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.ctx.clone();
        let v = self.wait(py, async move { ctx.dependency_results().await })?;
        record_to_py(py, &v)
    }

    async fn checkpoint_lookup_async(&self, name: String) -> PyResult<(String, bool, Py<PyAny>)> {
        let ctx = self.ctx.clone();
        let (key, v) = self
            .wait_async(async move { ctx.checkpoint_lookup(&name).await })
            .await?;
        Python::attach(|py| match v {
            Some(v) => Ok((key, true, to_py(py, &v)?.unbind())),
            None => Ok((key, false, py.None())),
        })
    }

    async fn checkpoint_save_async(&self, key: String, value: Py<PyAny>) -> PyResult<()> {
        let v =
            Python::attach(|py| to_value(value.bind(py), &format!("checkpoint `{key}` value")))?;
        let ctx = self.ctx.clone();
        self.wait_async(async move { ctx.checkpoint_save(&key, v).await })
            .await
    }

    #[pyo3(signature = (name, timeout=None))]
    async fn await_event_async(&self, name: String, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let ctx = self.ctx.clone();
        let t = timeout.map(|s| secs("await_event timeout", s)).transpose();
        let v = self
            .wait_async(async move { ctx.await_event(&name, t?).await })
            .await?;
        Python::attach(|py| to_py(py, &v).map(Bound::unbind))
    }

    async fn sleep_async(&self, seconds: f64) -> PyResult<()> {
        let ctx = self.ctx.clone();
        let d = secs("sleep duration", seconds);
        self.wait_async(async move { ctx.sleep(d?).await }).await
    }

    async fn sleep_until_async(&self, at_ms: i64) -> PyResult<()> {
        let ctx = self.ctx.clone();
        self.wait_async(async move { ctx.sleep_until(at_ms).await })
            .await
    }

    async fn emit_event_async(&self, name: String, payload: Py<PyAny>) -> PyResult<bool> {
        let p = Python::attach(|py| to_value(payload.bind(py), "event payload"))?;
        let ctx = self.ctx.clone();
        self.wait_async(async move { ctx.emit_event(&name, p).await })
            .await
    }

    #[pyo3(signature = (handler, input, response_event=None))]
    async fn spawn_async(
        &self,
        handler: String,
        input: Py<PyAny>,
        response_event: Option<String>,
    ) -> PyResult<String> {
        let i = Python::attach(|py| to_value(input.bind(py), "child input"))?;
        let ctx = self.ctx.clone();
        let opts = spawn_options(response_event);
        let id = self
            .wait_async(async move { ctx.spawn_with(&handler, i, opts).await })
            .await?;
        Ok(id.to_string())
    }

    async fn delegate_async(&self, handler: String, input: Py<PyAny>) -> PyResult<Py<PyAny>> {
        let i = Python::attach(|py| to_value(input.bind(py), "child input"))?;
        let ctx = self.ctx.clone();
        let v = self
            .wait_async(async move { ctx.delegate(&handler, i).await })
            .await?;
        Python::attach(|py| to_py(py, &v).map(Bound::unbind))
    }

    async fn delegate_parallel_async(&self, children: Py<PyList>) -> PyResult<Py<PyAny>> {
        let specs = Python::attach(|py| children_of(children.bind(py)))?;
        let ctx = self.ctx.clone();
        let out = self
            .wait_async(async move { ctx.delegate_parallel(specs).await })
            .await?;
        Python::attach(|py| record_to_py(py, &out).map(Bound::unbind))
    }

    async fn heartbeat_async(&self) -> PyResult<()> {
        let ctx = self.ctx.clone();
        self.wait_async(async move { ctx.heartbeat().await }).await
    }

    async fn dependency_results_async(&self) -> PyResult<Py<PyAny>> {
        let ctx = self.ctx.clone();
        let v = self
            .wait_async(async move { ctx.dependency_results().await })
            .await?;
        Python::attach(|py| record_to_py(py, &v).map(Bound::unbind))
    }
}
