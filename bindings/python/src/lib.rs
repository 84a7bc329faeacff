//! PyO3 glue for the `switchyard` Python package: conversion plus one call
//! into the core. Python-side ergonomics (decorators, asyncio, exceptions)
//! live in `python/switchyard/`.
//!
//! Thread affinity: every `#[pymethods]` function runs on the calling Python
//! thread with the GIL held, and releases it (`py.detach`) for anything that
//! waits on the core. Core work runs on one tokio runtime per process.

use std::future::Future;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod client;
mod context;
mod convert;
mod errors;
mod logs;
mod worker;

/// The process's tokio runtime (the core's, shared by every binding in the
/// process); refused with a clear error in a forked child.
pub(crate) fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    switchyard_core::bridge::runtime().map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Runs `fut` on the core runtime and waits for it with the GIL released,
/// in slices so Ctrl-C (KeyboardInterrupt) is seen within 100 ms on the main
/// thread; on a signal the operation is abandoned.
pub(crate) fn block<T: Send + 'static>(
    py: Python<'_>,
    fut: impl Future<Output = T> + Send + 'static,
) -> PyResult<T> {
    let rt = runtime()?;
    let (tx, rx) = sync_channel(1);
    let handle = rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    let mut rx = rx;
    loop {
        // The receiver is Send but not Sync: move it into the GIL-free
        // closure and back out.
        let (r, got) = py.detach(move || {
            let got = rx.recv_timeout(Duration::from_millis(100));
            (rx, got)
        });
        rx = r;
        match got {
            Ok(v) => return Ok(v),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    handle.abort();
                    return Err(e);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err(
                    "switchyard: the operation ended inside the core without an answer (a panic, or the runtime is shutting down)",
                ))
            }
        }
    }
}

/// Like [`block`], mapping a core error to its Python exception.
pub(crate) fn block_core<T: Send + 'static>(
    py: Python<'_>,
    fut: impl Future<Output = switchyard_core::Result<T>> + Send + 'static,
) -> PyResult<T> {
    block(py, fut)?.map_err(|e| errors::core_err(py, e))
}

/// The core's bounded fan-out plan ([`switchyard_core::bridge::fan_out`]):
/// the steps (dicts with `name`, `handler`, `input`, `depends_on`) and the
/// final step's name.
#[pyfunction]
fn fan_out<'py>(
    py: Python<'py>,
    handler: &str,
    total: i64,
    batch_size: i64,
    input: &Bound<'py, PyAny>,
    converge: &str,
) -> PyResult<(Bound<'py, PyAny>, Option<String>)> {
    let input = convert::to_value(input, "fan_out input")?;
    let plan = switchyard_core::bridge::fan_out(handler, total, batch_size, input, converge)
        .map_err(|e| errors::core_err(py, e))?;
    let final_step = plan["final_step"].as_str().map(str::to_string);
    Ok((convert::to_py(py, &plan["steps"])?, final_step))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::NativeClient>()?;
    m.add_class::<worker::NativeWorker>()?;
    m.add_class::<worker::NativeJob>()?;
    m.add_class::<worker::NativeConsumer>()?;
    m.add_class::<context::NativeContext>()?;
    m.add_function(wrap_pyfunction!(logs::take_logs, m)?)?;
    m.add_function(wrap_pyfunction!(fan_out, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    logs::install();
    Ok(())
}
