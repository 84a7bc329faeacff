//! The one place that maps core errors to Ruby exception classes. The
//! classes are defined in Ruby (`lib/switchyard/errors.rb`) so users can
//! subclass and construct them naturally; the message keeps the cause.

use magnus::{prelude::*, Error, ExceptionClass, RModule, Ruby};
use switchyard_core::{Error as CoreError, StepError};

fn class(ruby: &Ruby, name: &str) -> Option<ExceptionClass> {
    let m: RModule = ruby.class_object().const_get("Switchyard").ok()?;
    m.const_get(name).ok()
}

/// A `Switchyard::<name>` exception with `msg` (a RuntimeError if the Ruby
/// side of the gem is not loaded).
pub fn error(ruby: &Ruby, name: &str, msg: String) -> Error {
    match class(ruby, name) {
        Some(c) => Error::new(c, msg),
        None => Error::new(ruby.exception_runtime_error(), msg),
    }
}

/// A Rust panic as a `Switchyard::Error` (instead of Ruby's `fatal`).
pub fn panic_error(ruby: &Ruby, p: Box<dyn std::any::Any + Send>) -> Error {
    let msg = if let Some(m) = p.downcast_ref::<&'static str>() {
        (*m).to_string()
    } else if let Some(m) = p.downcast_ref::<String>() {
        m.clone()
    } else {
        "unknown panic".to_string()
    };
    error(ruby, "Error", format!("switchyard: a Rust panic: {msg}"))
}

/// A core error as a Ruby exception.
pub fn core_err(ruby: &Ruby, e: CoreError) -> Error {
    let name = match &e {
        CoreError::InvalidInput(_) => "InvalidInput",
        CoreError::NotFound(_) => "NotFound",
        CoreError::LeaseLost(_) => "LeaseLost",
        CoreError::Cancelled(_) => "Cancelled",
        CoreError::PayloadTooLarge { .. } => "PayloadTooLarge",
        CoreError::Conflict(_) => "Conflict",
        CoreError::Timeout(_) => "TimeoutError",
        CoreError::Config(_) => "ConfigError",
        CoreError::Store(_) => "StoreError",
        CoreError::Shutdown => "ShutdownError",
        CoreError::TaskFailed { .. } | CoreError::TaskCancelled { .. } => "Conflict",
    };
    error(ruby, name, e.to_string())
}

/// A step error raised out of a durable operation (suspension included).
pub fn step_err(ruby: &Ruby, e: StepError) -> Error {
    match e {
        StepError::Suspend(wait) => error(
            ruby,
            "Suspend",
            serde_json::to_string(&wait).unwrap_or_default(),
        ),
        StepError::AwaitTimeout { event } => error(
            ruby,
            "AwaitTimeout",
            format!("timed out waiting for event `{event}`"),
        ),
        StepError::LeaseLost => error(ruby, "LeaseLost", "the step's lease was lost".into()),
        StepError::Cancelled => error(ruby, "Cancelled", "the task was cancelled".into()),
        StepError::InvalidInput(m) => error(ruby, "InvalidInput", m),
        StepError::Permanent { message, .. } => error(ruby, "PermanentError", message),
        StepError::Retryable { message, .. } => error(ruby, "RetryableError", message),
    }
}
