//! The one place where the core's error vocabulary ([`ErrorClass`]) meets
//! Python's exception classes, both ways. The classes are defined in Python
//! (`switchyard/errors.py`) so users can subclass and construct them
//! naturally; they are resolved once, by the core's class names, and cached.
//!
//! - Out: a failed client or core call raises the class of
//!   [`Raised::from`]; a failed context call the class of [`bridge::raise`]
//!   (which keeps durable control flow in the context).
//! - In: an exception that ended a handler becomes [`Reply::error`] of the
//!   first of our classes it is an instance of (subclasses included);
//!   anything else is unexpected, hence retryable.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use switchyard_core::bridge::{self, ErrorClass, Raised, Reply};
use switchyard_core::{Context, Error, StepError};

/// Our exception classes, looked up once.
struct Classes {
    /// One per [`ErrorClass::ALL`], in that order.
    vocabulary: Vec<Py<PyType>>,
    asyncio_cancelled: Py<PyType>,
    http: Py<PyType>,
    network: Py<PyType>,
    format_exception: Py<PyAny>,
    /// The worker glue's file: its frames are dropped from the top of tracebacks.
    glue_file: Option<String>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&'static Classes> {
    CLASSES.get_or_try_init(py, || {
        let errors = py.import("switchyard.errors")?;
        let class = |name: &str| -> PyResult<Py<PyType>> {
            Ok(errors.getattr(name)?.cast_into::<PyType>()?.unbind())
        };
        let vocabulary = ErrorClass::ALL
            .iter()
            .map(|c| class(c.name()))
            .collect::<PyResult<_>>()?;
        let glue = py.import("switchyard._worker")?;
        Ok(Classes {
            vocabulary,
            asyncio_cancelled: py
                .import("asyncio")?
                .getattr("CancelledError")?
                .cast_into::<PyType>()?
                .unbind(),
            http: class("HttpError")?,
            network: class("NetworkError")?,
            format_exception: py
                .import("traceback")?
                .getattr("format_exception")?
                .unbind(),
            glue_file: glue.getattr("__file__")?.extract().ok(),
        })
    })
}

impl Classes {
    fn of(&self, c: ErrorClass) -> &Py<PyType> {
        let i = ErrorClass::ALL.iter().position(|x| *x == c).unwrap_or(0);
        &self.vocabulary[i]
    }

    /// The class of an exception: control flow first (a subclass of ours
    /// that also derives from another of ours stays control flow), then the
    /// vocabulary's order; None for an exception that is not ours.
    fn classify(&self, e: &Bound<'_, PyAny>) -> PyResult<Option<ErrorClass>> {
        let py = e.py();
        if e.is_instance(self.asyncio_cancelled.bind(py))? {
            return Ok(Some(ErrorClass::Cancelled));
        }
        let flow = ErrorClass::ALL.iter().filter(|c| c.is_control_flow());
        let rest = ErrorClass::ALL.iter().filter(|c| !c.is_control_flow());
        for c in flow.chain(rest) {
            if e.is_instance(self.of(*c).bind(py))? {
                return Ok(Some(*c));
            }
        }
        Ok(None)
    }
}

/// The exception for `r`, with the details its class carries.
fn exception(py: Python<'_>, r: Raised, cancelled_because: Option<String>) -> PyResult<PyErr> {
    let cls = classes(py)?.of(r.class).bind(py);
    let kwargs = PyDict::new(py);
    if let Some(task) = r.task {
        kwargs.set_item("task_id", task.to_string())?;
    }
    if let Some(info) = r.error {
        kwargs.set_item("kind", info.kind.to_string())?;
        kwargs.set_item("message", info.message)?;
        kwargs.set_item("traceback", info.trace)?;
        kwargs.set_item("attempt", info.attempt)?;
    }
    if let Some(m) = cancelled_because {
        kwargs.set_item("message", m)?;
    }
    if let Some(event) = r.event {
        kwargs.set_item("event", event)?;
    }
    let exc = cls.call(PyTuple::new(py, [r.message])?, Some(&kwargs))?;
    Ok(PyErr::from_value(exc))
}

fn raise(py: Python<'_>, r: Raised, cancelled_because: Option<String>) -> PyErr {
    let class = r.class.name();
    exception(py, r, cancelled_because).unwrap_or_else(|e| {
        PyRuntimeError::new_err(format!("switchyard: could not raise {class}: {e}"))
    })
}

/// A core error as a Python exception (`TaskFailed` and `TaskCancelled`
/// carry the task and what was recorded).
pub fn core_err(py: Python<'_>, e: Error) -> PyErr {
    let because = match &e {
        Error::TaskCancelled { message, .. } => Some(message.clone()),
        _ => None,
    };
    raise(py, Raised::from(e), because)
}

/// The exception for context call of `ctx` that failed with `e` (durable
/// control flow stays kept in `ctx`; see [`bridge::raise`]).
pub fn step_err(py: Python<'_>, ctx: &Context, e: StepError) -> PyErr {
    raise(py, bridge::raise(ctx, e), None)
}

fn type_name(e: &Bound<'_, PyAny>) -> String {
    e.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `str(e)`; describing a failure must never fail (the step would never be
/// answered), so an exception whose `__str__` raises gets a placeholder.
fn text(e: &Bound<'_, PyAny>) -> String {
    match e.str() {
        Ok(s) => s.to_string(),
        Err(inner) => format!(
            "<exception {}: str() raised {}>",
            type_name(e),
            type_name(inner.value(e.py()).as_any())
        ),
    }
}

/// The traceback, starting at the user's code (the glue's frames at the top
/// are dropped). Optional: None if it cannot be rendered.
fn trace(c: &Classes, e: &Bound<'_, PyAny>) -> Option<String> {
    let py = e.py();
    let mut tb = e.getattr("__traceback__").ok()?;
    if let Some(glue) = &c.glue_file {
        while !tb.is_none() {
            let next = tb.getattr("tb_next").ok()?;
            if next.is_none() {
                break;
            }
            let file: String = tb
                .getattr("tb_frame")
                .and_then(|f| f.getattr("f_code"))
                .and_then(|code| code.getattr("co_filename"))
                .and_then(|f| f.extract())
                .ok()?;
            if &file != glue {
                break;
            }
            tb = next;
        }
    }
    let lines = c
        .format_exception
        .bind(py)
        .call1((e.get_type(), e, tb))
        .ok()?;
    let mut out = String::new();
    for line in lines.try_iter().ok()? {
        out.push_str(&line.ok()?.extract::<String>().ok()?);
    }
    Some(out)
}

/// An optional number attribute; anything that is not a number is ignored.
fn number(e: &Bound<'_, PyAny>, attr: &str) -> Option<f64> {
    e.getattr(attr).ok()?.extract().ok()
}

fn classify(c: &Classes, handler: &str, e: &Bound<'_, PyAny>) -> PyResult<Reply> {
    let py = e.py();
    if e.is_instance(c.http.bind(py))? {
        let status = e.getattr("status")?;
        let Ok(status) = status.extract::<u16>() else {
            let message = format!(
                "handler `{handler}` raised HttpError with status {}, which is not an HTTP \
                 status code",
                text(&status)
            );
            return Ok(Reply::error(ErrorClass::Permanent, message, None, None));
        };
        let message = match e.getattr("message") {
            Ok(m) if !m.is_none() => text(&m),
            _ => String::new(),
        };
        return Ok(Reply::http(status, number(e, "retry_after"), message));
    }
    if e.is_instance(c.network.bind(py))? {
        return Ok(Reply::network(text(e)));
    }
    let Some(class) = c.classify(e)? else {
        let message = format!("{}: {}", type_name(e), text(e));
        tracing::warn!(target: "switchyard", "handler {handler} raised {message}");
        return Ok(Reply::error(
            ErrorClass::Retryable,
            message,
            trace(c, e),
            None,
        ));
    };
    let mut message = text(e);
    if message.is_empty() {
        message = type_name(e);
    }
    let trace = match class {
        ErrorClass::Cancelled | ErrorClass::LeaseLost | ErrorClass::InvalidInput => None,
        _ => trace(c, e),
    };
    let retry_after = match class {
        ErrorClass::Retryable => number(e, "retry_after"),
        _ => None,
    };
    Ok(Reply::error(class, message, trace, retry_after))
}

/// The answer for exception `e` that ended handler `handler` (or that a
/// batch handler returned for one item). Never fails: an exception that
/// cannot even be classified still fails only its step.
pub fn reply_for(handler: &str, e: &Bound<'_, PyAny>) -> Reply {
    let py = e.py();
    let r = classes(py).and_then(|c| classify(c, handler, e));
    r.unwrap_or_else(|inner| {
        Reply::error(
            ErrorClass::Retryable,
            format!(
                "<exception {}: describing it raised {}: {}>",
                type_name(e),
                type_name(inner.value(py).as_any()),
                text(inner.value(py).as_any())
            ),
            None,
            None,
        )
    })
}
