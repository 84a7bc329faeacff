//! The one place that maps core errors to Python exception classes. The
//! classes are defined in Python (`switchyard/errors.py`) so users can
//! subclass and construct them naturally; the message keeps the cause.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use switchyard_core::{Error, StepError};

fn raise(
    py: Python<'_>,
    class: &str,
    args: impl for<'a> FnOnce(Python<'a>) -> PyResult<Bound<'a, pyo3::types::PyTuple>>,
) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let module = py.import("switchyard.errors")?;
        let cls = module.getattr(class)?;
        let exc = cls.call1(args(py)?)?;
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|e| {
        PyRuntimeError::new_err(format!("switchyard: could not raise {class}: {e}"))
    })
}

fn msg_args(
    m: String,
) -> impl for<'a> FnOnce(Python<'a>) -> PyResult<Bound<'a, pyo3::types::PyTuple>> {
    move |py| pyo3::types::PyTuple::new(py, [m])
}

/// A core error as a Python exception.
pub fn core_err(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::InvalidInput(_) => "InvalidInput",
        Error::NotFound(_) => "NotFound",
        Error::LeaseLost(_) => "LeaseLost",
        Error::Cancelled(_) => "Cancelled",
        Error::PayloadTooLarge { .. } => "PayloadTooLarge",
        Error::Conflict(_) => "Conflict",
        Error::Timeout(_) => "TimeoutError",
        Error::Config(_) => "ConfigError",
        Error::Store(_) => "StoreError",
        Error::Shutdown => "ShutdownError",
        Error::TaskFailed { .. } | Error::TaskCancelled { .. } => "Conflict",
    };
    raise(py, class, msg_args(e.to_string()))
}

/// A step error raised out of a durable operation (suspension included).
pub fn step_err(py: Python<'_>, e: StepError) -> PyErr {
    match e {
        StepError::Suspend(wait) => {
            let wait = serde_json::to_string(&wait).unwrap_or_default();
            raise(py, "_Suspend", msg_args(wait))
        }
        StepError::AwaitTimeout { event } => {
            let message = format!("timed out waiting for event `{event}`");
            raise(py, "TimeoutError", move |py| {
                pyo3::types::PyTuple::new(py, [message])
            })
        }
        StepError::LeaseLost => raise(
            py,
            "LeaseLost",
            msg_args("the step's lease was lost".into()),
        ),
        StepError::Cancelled => raise(py, "Cancelled", msg_args("the task was cancelled".into())),
        StepError::InvalidInput(m) => raise(py, "InvalidInput", msg_args(m)),
        StepError::Permanent { message, .. } => raise(py, "PermanentError", msg_args(message)),
        StepError::Retryable { message, .. } => raise(py, "RetryableError", msg_args(message)),
    }
}
