//! Envelopes: fallible async calls resolve to `{"ok": value}` or `{"err":
//! {"class", "message", "task"?, "error"?, "event"?}}` rather than rejecting
//! with a `napi::Error`. `class` is the core's vocabulary name
//! ([`ErrorClass::name`]); `toError` in `typescript/src/index.ts` is the one
//! map from a class to a TypeScript error. Nothing here decides a class: the
//! core does ([`Raised::from`], [`raise`]).

use serde_json::{json, Value};
use switchyard_core::bridge::{raise, Raised};
use switchyard_core::{Context, Error};

/// `{"ok": v}`.
pub fn ok(v: Value) -> String {
    json!({ "ok": v }).to_string()
}

fn raised(r: Raised) -> String {
    json!({ "err": {
        "class": r.class.name(),
        "message": r.message,
        "task": r.task.map(|t| t.to_string()),
        "error": r.error,
        "event": r.event,
    } })
    .to_string()
}

/// `{"err": {...}}` for a core error.
pub fn core_err(e: &Error) -> String {
    raised(Raised::from(e.clone()))
}

/// Envelope for a core result.
pub fn core<T: serde::Serialize>(r: switchyard_core::Result<T>) -> String {
    match r {
        Ok(v) => ok(serde_json::to_value(v).unwrap_or(Value::Null)),
        Err(e) => raised(Raised::from(e)),
    }
}

/// Envelope for a context call of `ctx`: durable control flow stays in
/// `ctx` (see [`raise`]).
pub fn step<T: serde::Serialize>(ctx: &Context, r: switchyard_core::StepResult<T>) -> String {
    match r {
        Ok(v) => ok(serde_json::to_value(v).unwrap_or(Value::Null)),
        Err(e) => raised(raise(ctx, e)),
    }
}

/// Parses JSON text produced by the TypeScript side, as an envelope error
/// naming `what`.
pub fn parse_env(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| {
        core_err(&Error::InvalidInput(format!(
            "{what} is not valid JSON: {e}"
        )))
    })
}

/// The message of a core error thrown from a constructor (the TypeScript
/// side throws it as `InvalidInput`).
pub fn message(e: &Error) -> String {
    match e {
        Error::InvalidInput(m) => m.clone(),
        other => other.to_string(),
    }
}
