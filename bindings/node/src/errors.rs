//! The one place that maps core errors to what the TypeScript side throws.
//! Fallible async calls resolve to a JSON envelope rather than rejecting
//! with a `napi::Error`: the envelope carries the error *kind* (and, for a
//! suspension, the wait) so `typescript/src/errors.ts` can build the right
//! subclass of `SwitchyardError` with the core's message.

use serde_json::{json, Value};
use switchyard_core::{Error, StepError};

/// `{"ok": v}`.
pub fn ok(v: Value) -> String {
    json!({ "ok": v }).to_string()
}

/// `{"err": {...}}` for a core error.
pub fn core_err(e: &Error) -> String {
    let kind = match e {
        Error::InvalidInput(_) => "InvalidInput",
        Error::NotFound(_) => "NotFound",
        Error::LeaseLost(_) => "LeaseLost",
        Error::Cancelled(_) => "Cancelled",
        Error::PayloadTooLarge { .. } => "PayloadTooLarge",
        Error::Conflict(_) => "Conflict",
        Error::Timeout(_) => "Timeout",
        Error::Config(_) => "Config",
        Error::Store(_) => "Store",
        Error::Shutdown => "Shutdown",
        Error::TaskFailed { .. } | Error::TaskCancelled { .. } => "Conflict",
    };
    json!({ "err": { "kind": kind, "message": e.to_string() } }).to_string()
}

/// `{"err": {...}}` for a step error raised out of a durable operation.
pub fn step_err(e: &StepError) -> String {
    let err = match e {
        StepError::Suspend(wait) => json!({
            "kind": "Suspend",
            "message": "the step suspends (rethrow this error)",
            "wait": serde_json::to_value(wait).unwrap_or(Value::Null),
        }),
        StepError::AwaitTimeout { event } => json!({
            "kind": "AwaitTimeout",
            "message": format!("timed out waiting for event `{event}`"),
            "event": event,
        }),
        StepError::LeaseLost => {
            json!({"kind": "LeaseLost", "message": "the step's lease was lost"})
        }
        StepError::Cancelled => json!({"kind": "Cancelled", "message": "the task was cancelled"}),
        StepError::InvalidInput(m) => json!({"kind": "InvalidInput", "message": m}),
        StepError::Permanent { message, .. } => json!({"kind": "Permanent", "message": message}),
        StepError::Retryable { message, .. } => json!({"kind": "Retryable", "message": message}),
    };
    json!({ "err": err }).to_string()
}

/// Envelope for a core result.
pub fn core<T: serde::Serialize>(r: switchyard_core::Result<T>) -> String {
    match r {
        Ok(v) => ok(serde_json::to_value(v).unwrap_or(Value::Null)),
        Err(e) => core_err(&e),
    }
}

/// Envelope for a durable-operation result.
pub fn step<T: serde::Serialize>(r: switchyard_core::StepResult<T>) -> String {
    match r {
        Ok(v) => ok(serde_json::to_value(v).unwrap_or(Value::Null)),
        Err(e) => step_err(&e),
    }
}

/// Parses JSON text produced by the TypeScript side; a failure names `what`.
pub fn parse(what: &str, text: &str) -> napi::Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| napi::Error::from_reason(format!("{what} is not valid JSON: {e}")))
}

/// Like [`parse`], as an envelope error for async calls.
pub fn parse_env(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| {
        core_err(&Error::InvalidInput(format!(
            "{what} is not valid JSON: {e}"
        )))
    })
}
