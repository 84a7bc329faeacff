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

/// Like [`block`], mapping a step error (suspension included) to Python.
pub(crate) fn block_step<T: Send + 'static>(
    py: Python<'_>,
    fut: impl Future<Output = switchyard_core::StepResult<T>> + Send + 'static,
) -> PyResult<T> {
    block(py, fut)?.map_err(|e| errors::step_err(py, e))
}

/// The core's fan-out plan ([`switchyard_core::Decision::fan_out`]): the
/// steps (dicts with `name`, `handler`, `input`, `depends_on`) and the final
/// step's name.
#[pyfunction]
fn fan_out<'py>(
    py: Python<'py>,
    handler: &str,
    total: u64,
    batch_size: u64,
    input: &Bound<'py, PyAny>,
    converge: &str,
) -> PyResult<(Bound<'py, PyAny>, Option<String>)> {
    let input = convert::to_value(input, "input")?;
    match switchyard_core::Decision::fan_out(handler, total, batch_size, input, converge) {
        switchyard_core::Decision::Steps { steps, final_step } => {
            let steps = serde_json::to_value(&steps)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
            Ok((convert::to_py(py, &steps)?, final_step))
        }
        switchyard_core::Decision::Complete(_) => unreachable!("fan_out always plans steps"),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::NativeClient>()?;
    m.add_class::<worker::NativeWorker>()?;
    m.add_class::<worker::NativeJob>()?;
    m.add_class::<worker::NativeConsumer>()?;
    m.add_class::<context::NativeContext>()?;
    m.add_class::<context::CancelWatch>()?;
    m.add_function(wrap_pyfunction!(logs::take_logs, m)?)?;
    m.add_function(wrap_pyfunction!(fan_out, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    logs::install();
    Ok(())
}
