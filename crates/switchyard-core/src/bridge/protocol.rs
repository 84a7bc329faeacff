//! The conversation every binding has with the core, in one place: the
//! error vocabulary ([`ErrorClass`]), what a failed call raises
//! ([`Raised`], [`raise`]), how an answer is built ([`Reply`]'s
//! constructors), and the conversions from foreign data (tasks, decisions,
//! fan-out plans). A binding converts its language's values and calls these;
//! it keeps no table, tag or parser of its own.
//!
//! Durable control flow — suspension, a lost lease, cancellation, an await
//! that timed out — never round-trips through JSON or user code: the
//! context call that raised it keeps the core's error ([`raise`]); the
//! binding raises its language's exception of that class, and when that
//! exception ends the handler the binding answers [`Reply::error`] with the
//! class, and the core passes on what it kept.

use serde_json::{Map, Value};

use super::Reply;
use crate::client::{hint_secs, validate_name};
use crate::context::{ChildSpec, Context};
use crate::error::Error;
use crate::handler::{ApiError, Decision, StepError};
use crate::model::NewStep;
use crate::model::{ErrorInfo, NewTask, TaskId};

/// One concept of the error vocabulary, the same in every language (README
/// "Vocabulary"). Each binding maps a class to its language's exception
/// class once; [`ErrorClass::name`] is the class name in Python and Ruby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Never retried: the step and its task fail.
    Permanent,
    /// Worth another attempt (the class of every unexpected exception).
    Retryable,
    /// The input is unusable; never retried.
    InvalidInput,
    /// A payload exceeds the limit (a kind of invalid input).
    PayloadTooLarge,
    /// `await_event` ran out of time (catchable; fails the step if it escapes).
    AwaitTimeout,
    /// The task was cancelled; the step stops.
    Cancelled,
    /// Another run owns the step now; the step stops.
    LeaseLost,
    /// Not an error: the step suspends. Handlers must let it propagate.
    Suspend,
    /// A task waited for failed.
    TaskFailed,
    /// A task waited for was cancelled.
    TaskCancelled,
    /// A client's wait ran out of time.
    Timeout,
    /// No task, step or event with that id.
    NotFound,
    /// Not allowed in the current state.
    Conflict,
    /// Bad configuration (store URL, options).
    Config,
    /// The database failed (usually transient).
    Store,
    /// The host or client is shutting down.
    Shutdown,
}

impl ErrorClass {
    /// Every class.
    pub const ALL: &'static [ErrorClass] = &[
        Self::Permanent,
        Self::Retryable,
        Self::InvalidInput,
        Self::PayloadTooLarge,
        Self::AwaitTimeout,
        Self::Cancelled,
        Self::LeaseLost,
        Self::Suspend,
        Self::TaskFailed,
        Self::TaskCancelled,
        Self::Timeout,
        Self::NotFound,
        Self::Conflict,
        Self::Config,
        Self::Store,
        Self::Shutdown,
    ];

    /// The class name in Python and Ruby (TypeScript's names and C's
    /// statuses are in the README's vocabulary table; C's is
    /// [`Self::status_name`]).
    pub fn name(self) -> &'static str {
        match self {
            Self::Permanent => "PermanentError",
            Self::Retryable => "RetryableError",
            Self::InvalidInput => "InvalidInput",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::AwaitTimeout => "AwaitTimeout",
            Self::Cancelled => "Cancelled",
            Self::LeaseLost => "LeaseLost",
            Self::Suspend => "Suspend",
            Self::TaskFailed => "TaskFailed",
            Self::TaskCancelled => "TaskCancelled",
            Self::Timeout => "TimeoutError",
            Self::NotFound => "NotFound",
            Self::Conflict => "Conflict",
            Self::Config => "ConfigError",
            Self::Store => "StoreError",
            Self::Shutdown => "ShutdownError",
        }
    }

    /// The C status for this class (`SY_` + this name).
    pub fn status_name(self) -> &'static str {
        match self {
            Self::Permanent => "SY_ERROR_PERMANENT",
            Self::Retryable => "SY_ERROR_RETRYABLE",
            Self::InvalidInput => "SY_INVALID_ARGUMENT",
            Self::PayloadTooLarge => "SY_PAYLOAD_TOO_LARGE",
            Self::AwaitTimeout => "SY_AWAIT_TIMEOUT",
            Self::Cancelled => "SY_CANCELLED",
            Self::LeaseLost => "SY_LEASE_LOST",
            Self::Suspend => "SY_SUSPENDED",
            Self::TaskFailed => "SY_TASK_FAILED",
            Self::TaskCancelled => "SY_TASK_CANCELLED",
            Self::Timeout => "SY_TIMEOUT",
            Self::NotFound => "SY_NOT_FOUND",
            Self::Conflict => "SY_CONFLICT",
            Self::Config => "SY_CONFIG",
            Self::Store => "SY_STORE",
            Self::Shutdown => "SY_SHUTDOWN",
        }
    }

    /// The class of a core error.
    pub fn of(e: &Error) -> Self {
        match e {
            Error::InvalidInput(_) => Self::InvalidInput,
            Error::NotFound(_) => Self::NotFound,
            Error::LeaseLost(_) => Self::LeaseLost,
            Error::Cancelled(_) => Self::Cancelled,
            Error::PayloadTooLarge { .. } => Self::PayloadTooLarge,
            Error::Conflict(_) => Self::Conflict,
            Error::Timeout(_) => Self::Timeout,
            Error::Config(_) => Self::Config,
            Error::Store(_) => Self::Store,
            Error::Shutdown => Self::Shutdown,
            Error::TaskFailed { .. } => Self::TaskFailed,
            Error::TaskCancelled { .. } => Self::TaskCancelled,
        }
    }

    /// The class of a step error raised out of a context call.
    pub fn of_step(e: &StepError) -> Self {
        match e {
            StepError::Retryable { .. } => Self::Retryable,
            StepError::Permanent { .. } => Self::Permanent,
            StepError::InvalidInput(_) => Self::InvalidInput,
            StepError::AwaitTimeout { .. } => Self::AwaitTimeout,
            StepError::Cancelled => Self::Cancelled,
            StepError::Suspend(_) => Self::Suspend,
            StepError::LeaseLost => Self::LeaseLost,
        }
    }

    /// True for durable control flow the core keeps while the foreign
    /// exception travels ([`raise`]).
    pub fn is_control_flow(self) -> bool {
        matches!(
            self,
            Self::Suspend | Self::LeaseLost | Self::Cancelled | Self::AwaitTimeout
        )
    }
}

/// What a binding raises for a failed call: the class, the message, and the
/// details some classes carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    /// The vocabulary class.
    pub class: ErrorClass,
    /// The message (the core's wording, the same in every language).
    pub message: String,
    /// The task, for [`ErrorClass::TaskFailed`] / [`ErrorClass::TaskCancelled`].
    pub task: Option<TaskId>,
    /// The recorded error, for [`ErrorClass::TaskFailed`] (kind, message,
    /// traceback, the attempt it happened on).
    pub error: Option<ErrorInfo>,
    /// The event, for [`ErrorClass::AwaitTimeout`].
    pub event: Option<String>,
}

impl Raised {
    fn new(class: ErrorClass, message: String) -> Self {
        Self {
            class,
            message,
            task: None,
            error: None,
            event: None,
        }
    }
}

impl From<Error> for Raised {
    fn from(e: Error) -> Self {
        let class = ErrorClass::of(&e);
        let message = e.to_string();
        match e {
            Error::TaskFailed { task, error } => Self {
                task: Some(task),
                error: Some(*error),
                ..Self::new(class, message)
            },
            Error::TaskCancelled { task, .. } => Self {
                task: Some(task),
                ..Self::new(class, message)
            },
            _ => Self::new(class, message),
        }
    }
}

/// What a binding raises when context call of `ctx` failed with `e`. Durable
/// control flow is kept in `ctx`, so the answer [`Reply::error`] of the same
/// class passes on the core's own error (a suspension's wait included).
pub fn raise(ctx: &Context, e: StepError) -> Raised {
    let class = ErrorClass::of_step(&e);
    let message = match &e {
        StepError::Suspend(_) => {
            "the step suspends; let this exception propagate out of the handler".to_string()
        }
        StepError::Cancelled => "the task was cancelled".to_string(),
        other => other.to_string(),
    };
    let event = match &e {
        StepError::AwaitTimeout { event } => Some(event.clone()),
        _ => None,
    };
    if class.is_control_flow() {
        ctx.hold_raised(e);
    }
    Raised {
        event,
        ..Raised::new(class, message)
    }
}

impl Reply {
    /// The answer for an exception of `class` that ended the handler: its
    /// message, the language's traceback, and for retryable errors the delay
    /// asked for (seconds; ignored unless finite and positive). Control flow
    /// classes pass on what the context kept (see [`raise`]). Classes that
    /// are not step outcomes (a client's `NotFound`, say) are unexpected
    /// exceptions: retryable.
    pub fn error(
        class: ErrorClass,
        message: String,
        trace: Option<String>,
        retry_after: Option<f64>,
    ) -> Self {
        match class {
            ErrorClass::Permanent => Self::Error(StepError::Permanent { message, trace }),
            ErrorClass::InvalidInput | ErrorClass::PayloadTooLarge => {
                Self::Error(StepError::InvalidInput(message))
            }
            c if c.is_control_flow() => Self::Raised {
                class: c,
                message,
                trace,
            },
            _ => Self::Error(StepError::Retryable {
                message,
                retry_after: retry_after.and_then(hint_secs),
                trace,
            }),
        }
    }

    /// The answer for a result that has no JSON form: fails the step
    /// permanently, naming what was returned (`what`, e.g. "a float NaN at
    /// `result.x`").
    pub fn unrepresentable(lang: &str, handler: &str, what: &str) -> Self {
        Self::Error(StepError::permanent(format!(
            "the {lang} handler `{handler}` returned {what}, which has no JSON form"
        )))
    }

    /// A decision that plans `steps` (JSON: a list of `{name, handler,
    /// input, depends_on?}`), finishing with `final_step`'s result. Bad steps
    /// fail the step permanently, naming the handler.
    pub fn decision_steps(handler: &str, steps: Value, final_step: Option<String>) -> Self {
        match serde_json::from_value::<Vec<NewStep>>(steps) {
            Ok(steps) => Self::Decision(Decision::Steps { steps, final_step }),
            Err(e) => Self::Error(StepError::permanent(format!(
                "decision of handler `{handler}`: each step needs `name`, `handler`, `input` \
                 and optional `depends_on`: {e}"
            ))),
        }
    }

    /// A decision from its whole JSON document, for bindings that receive
    /// it as one value (C): `{"steps": [...], "final_step"?: name}` or
    /// `{"complete": value}` (see [`Decision::from_json`]). A bad document
    /// fails the step permanently, naming the handler and what is wrong.
    pub fn decision_json(handler: &str, v: Value) -> Self {
        match Decision::from_json(v) {
            Ok(d) => Self::Decision(d),
            Err(m) => Self::Error(StepError::permanent(format!(
                "decision handler `{handler}`: {m}"
            ))),
        }
    }

    /// A decision that completes the task with `v`.
    pub fn complete(v: Value) -> Self {
        Self::Decision(Decision::Complete(v))
    }

    /// An HTTP-shaped failure of an API handler (`retry_after` in seconds,
    /// honoured on 429 and 503).
    pub fn http(status: u16, retry_after: Option<f64>, message: String) -> Self {
        Self::Api(ApiError::Http {
            status,
            retry_after: retry_after.and_then(hint_secs),
            message,
        })
    }

    /// A network failure of an API handler (retryable).
    pub fn network(message: String) -> Self {
        Self::Api(ApiError::Network(message))
    }

    /// Resolves control flow against the context that raised it.
    pub(super) fn resolve(self, ctx: &Context) -> Self {
        let Self::Raised {
            class,
            message,
            trace,
        } = self
        else {
            return self;
        };
        match ctx.take_raised() {
            Some(kept) if ErrorClass::of_step(&kept) == class => Self::Error(kept),
            _ => Self::Error(match class {
                ErrorClass::Cancelled => StepError::Cancelled,
                ErrorClass::LeaseLost => StepError::LeaseLost,
                ErrorClass::AwaitTimeout => StepError::Permanent { message, trace },
                _ => StepError::Permanent {
                    message: format!(
                        "the handler raised {} but no context call asked it to (raised by \
                         hand, or caught and raised again after another context call)",
                        class.name()
                    ),
                    trace,
                },
            }),
        }
    }
}

/// A task from foreign data: a JSON object with `handler` (string) and
/// `input`, and optional `priority` (32-bit integer), `idempotency_key`,
/// `response_event`, `headers` (string → string) and `run_at` (epoch
/// milliseconds). `what` names the task in errors ("task #3"). Unknown keys
/// are refused (a misspelt option is not silently dropped), and so is
/// `parent`: only `ctx.spawn`/`ctx.delegate` set it.
pub fn new_task(what: &str, v: Value) -> Result<NewTask, Error> {
    let bad = |m: String| Error::InvalidInput(format!("{what}: {m}"));
    let Value::Object(mut m) = v else {
        return Err(Error::InvalidInput(format!(
            "{what} must be an object with `handler` and `input`"
        )));
    };
    let handler = match m.remove("handler") {
        Some(Value::String(h)) => h,
        Some(_) => return Err(bad("`handler` must be a string".into())),
        None => return Err(bad("`handler` is missing".into())),
    };
    validate_name("handler", &handler).map_err(|e| bad(inner(e)))?;
    let mut t = NewTask::new(handler, m.remove("input").unwrap_or(Value::Null));
    let string = |m: &mut Map<String, Value>, k: &str| match m.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("`{k}` must be a string"))),
    };
    t.idempotency_key = string(&mut m, "idempotency_key")?;
    t.response_event = string(&mut m, "response_event")?;
    if let Some(e) = &t.response_event {
        validate_name("response_event", e).map_err(|e| bad(inner(e)))?;
    }
    match m.remove("priority") {
        None | Some(Value::Null) => {}
        Some(p) => {
            t.priority = p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| bad(format!("`priority` must be a 32-bit integer, not {p}")))?
        }
    }
    match m.remove("run_at") {
        None | Some(Value::Null) => {}
        Some(at) => {
            t.run_at = Some(at.as_i64().ok_or_else(|| {
                bad(format!(
                    "`run_at` must be epoch milliseconds (an integer), not {at}"
                ))
            })?)
        }
    }
    match m.remove("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                let Value::String(v) = v else {
                    return Err(bad(format!("header `{k}` must be a string")));
                };
                t.headers.insert(k, v);
            }
        }
        Some(_) => return Err(bad("`headers` must be an object of strings".into())),
    }
    if m.contains_key("parent") {
        return Err(bad(
            "`parent` is set by ctx.spawn / ctx.delegate, not by clients".into(),
        ));
    }
    if let Some(k) = m.keys().next() {
        return Err(bad(format!(
            "unknown key `{k}` (expected handler, input, priority, idempotency_key, \
             response_event, headers, run_at)"
        )));
    }
    Ok(t)
}

/// The message of an input error, without the "invalid input: " prefix.
fn inner(e: Error) -> String {
    match e {
        Error::InvalidInput(m) => m,
        other => other.to_string(),
    }
}

/// Tasks from a JSON array (see [`new_task`]); each is named `task #i`.
pub fn new_tasks(v: Value) -> Result<Vec<NewTask>, Error> {
    let Value::Array(items) = v else {
        return Err(Error::InvalidInput("tasks must be a list".into()));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, t)| new_task(&format!("task #{i}"), t))
        .collect()
}

/// The children of `delegate_parallel` from foreign data: a JSON array
/// whose items are `{"handler": ..., "input": ...}` objects (no other keys)
/// or `[handler, input]` pairs. Errors name the child (`child #i`).
pub fn child_specs(v: Value) -> Result<Vec<ChildSpec>, Error> {
    let bad = |i: usize, m: &str| Error::InvalidInput(format!("delegate_parallel: child #{i} {m}"));
    let Value::Array(items) = v else {
        return Err(Error::InvalidInput(
            "delegate_parallel: children must be a list".into(),
        ));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let (handler, input) = match item {
                Value::Object(mut m) => {
                    let handler = m.remove("handler");
                    let input = m.remove("input").unwrap_or(Value::Null);
                    if let Some(k) = m.keys().next() {
                        return Err(bad(i, &format!("has an unknown key `{k}`")));
                    }
                    (handler, input)
                }
                Value::Array(mut pair) if pair.len() == 2 => {
                    let input = pair.pop().unwrap_or(Value::Null);
                    (pair.pop(), input)
                }
                _ => {
                    return Err(bad(
                        i,
                        "must be {\"handler\", \"input\"} or a [handler, input] pair",
                    ))
                }
            };
            let Some(Value::String(handler)) = handler else {
                return Err(bad(i, "needs a string `handler`"));
            };
            validate_name("handler", &handler).map_err(|e| bad(i, &format!("({})", inner(e))))?;
            Ok(ChildSpec::new(handler, input))
        })
        .collect()
}

/// The most batches a fan-out may plan (each is a step of one task).
pub const MAX_FAN_OUT: u64 = 100_000;

/// The core's fan-out plan ([`Decision::fan_out`]) as JSON, `{"steps":
/// [...], "final_step": name}`, for bindings to hand to their language.
/// `total` must not be negative, `batch_size` must be at least 1, and the
/// plan at most [`MAX_FAN_OUT`] batches.
pub fn fan_out(
    handler: &str,
    total: i64,
    batch_size: i64,
    input: Value,
    converge: &str,
) -> Result<Value, Error> {
    validate_name("fan_out handler", handler)?;
    validate_name("fan_out converge", converge)?;
    let total = u64::try_from(total).map_err(|_| {
        Error::InvalidInput(format!("fan_out: total must not be negative (got {total})"))
    })?;
    let size = u64::try_from(batch_size)
        .ok()
        .filter(|b| *b >= 1)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "fan_out: batch_size must be at least 1 (got {batch_size})"
            ))
        })?;
    if total.div_ceil(size) > MAX_FAN_OUT {
        return Err(Error::InvalidInput(format!(
            "fan_out: {total} items in batches of {size} make more than {MAX_FAN_OUT} steps; \
             use larger batches"
        )));
    }
    match Decision::fan_out(handler, total, size, input, converge) {
        Decision::Steps { steps, final_step } => Ok(serde_json::json!({
            "steps": steps,
            "final_step": final_step,
        })),
        Decision::Complete(v) => Ok(serde_json::json!({ "complete": v })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_specs_take_objects_and_pairs_and_name_the_bad_child() {
        let v = serde_json::json!([
            {"handler": "a", "input": 1},
            ["b", {"x": 2}],
            {"handler": "c"}
        ]);
        let c = child_specs(v).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].handler.as_str(), &c[0].input),
            ("a", &serde_json::json!(1))
        );
        assert_eq!(
            (c[1].handler.as_str(), &c[1].input),
            ("b", &serde_json::json!({"x": 2}))
        );
        assert_eq!((c[2].handler.as_str(), &c[2].input), ("c", &Value::Null));
        let err = |v: Value| child_specs(v).unwrap_err().to_string();
        assert!(err(serde_json::json!({"handler": "a"})).contains("must be a list"));
        assert!(
            err(serde_json::json!([["a", 1], {"handler": "b", "parent": 1}]))
                .contains("child #1 has an unknown key `parent`")
        );
        assert!(
            err(serde_json::json!([{"input": 1}])).contains("child #0 needs a string `handler`")
        );
        assert!(err(serde_json::json!([[1, 2]])).contains("child #0 needs a string `handler`"));
        assert!(err(serde_json::json!([["a"]])).contains("child #0 must be"));
        assert!(err(serde_json::json!([["", 1]])).contains("child #0"));
    }

    #[test]
    fn every_class_has_a_distinct_name_and_status() {
        let names: std::collections::HashSet<_> =
            ErrorClass::ALL.iter().map(|c| c.name()).collect();
        let statuses: std::collections::HashSet<_> =
            ErrorClass::ALL.iter().map(|c| c.status_name()).collect();
        assert_eq!(names.len(), ErrorClass::ALL.len());
        assert_eq!(statuses.len(), ErrorClass::ALL.len());
    }

    #[test]
    fn an_error_of_each_class_becomes_the_same_reply_in_every_binding() {
        let r = |c| Reply::error(c, "m".into(), Some("t".into()), Some(2.0));
        assert_eq!(
            r(ErrorClass::Permanent),
            Reply::Error(StepError::Permanent {
                message: "m".into(),
                trace: Some("t".into())
            })
        );
        assert_eq!(
            r(ErrorClass::Retryable),
            Reply::Error(StepError::Retryable {
                message: "m".into(),
                retry_after: Some(std::time::Duration::from_secs(2)),
                trace: Some("t".into())
            })
        );
        assert_eq!(
            r(ErrorClass::PayloadTooLarge),
            Reply::Error(StepError::InvalidInput("m".into()))
        );
        // Not a step outcome: an unexpected exception, retryable.
        assert!(matches!(
            r(ErrorClass::NotFound),
            Reply::Error(StepError::Retryable { .. })
        ));
        for c in [
            ErrorClass::Suspend,
            ErrorClass::LeaseLost,
            ErrorClass::Cancelled,
            ErrorClass::AwaitTimeout,
        ] {
            assert!(matches!(r(c), Reply::Raised { class, .. } if class == c));
        }
        // Hostile retry hints are ignored, never a panic.
        for h in [f64::NAN, f64::INFINITY, -1.0, 1e300] {
            let _ = Reply::error(ErrorClass::Retryable, "m".into(), None, Some(h));
        }
    }

    #[test]
    fn tasks_from_foreign_data_are_checked_in_one_place() {
        let t = new_task(
            "t",
            serde_json::json!({"handler": "h", "input": [1], "priority": -3,
                "idempotency_key": "k", "response_event": "done",
                "headers": {"a": "b"}, "run_at": 5}),
        )
        .unwrap();
        assert_eq!(t.handler, "h");
        assert_eq!(t.priority, -3);
        assert_eq!(t.run_at, Some(5));
        assert_eq!(t.headers.get("a").map(String::as_str), Some("b"));
        let err = |v: Value| new_task("task #2", v).unwrap_err().to_string();
        assert!(err(serde_json::json!([])).contains("task #2 must be an object"));
        assert!(err(serde_json::json!({"input": 1})).contains("`handler` is missing"));
        assert!(
            err(serde_json::json!({"handler": "h", "priority": 1e10})).contains("32-bit integer")
        );
        assert!(err(serde_json::json!({"handler": "h", "parent": {}})).contains("`parent`"));
        assert!(err(serde_json::json!({"handler": "h", "prio": 1})).contains("unknown key `prio`"));
        assert!(
            err(serde_json::json!({"handler": "h", "headers": {"a": 1}})).contains("header `a`")
        );
        let empty = err(serde_json::json!({"handler": ""}));
        assert_eq!(empty, "invalid input: task #2: handler must not be empty");
        assert!(
            new_tasks(serde_json::json!([{"handler": "h"}, {"handler": 1}]))
                .unwrap_err()
                .to_string()
                .contains("task #1")
        );
    }

    #[test]
    fn fan_out_plans_are_bounded() {
        let p = fan_out("h", 5, 2, Value::Null, "c").unwrap();
        assert_eq!(p["steps"].as_array().unwrap().len(), 4);
        assert_eq!(p["final_step"], "c");
        assert!(fan_out("h", -1, 2, Value::Null, "c").is_err());
        assert!(fan_out("h", 5, 0, Value::Null, "c").is_err());
        let e = fan_out("h", i64::MAX, 1, Value::Null, "c").unwrap_err();
        assert!(e.to_string().contains("larger batches"), "{e}");
    }
}
