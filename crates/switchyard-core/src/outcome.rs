//! Typed outcomes of a handler run: [`StepError`] (and [`StepResult`]),
//! [`Decision`], [`ApiError`]. Shared by the handler traits, the context
//! (whose durable calls fail with a `StepError`) and the worker; kept apart
//! from `handler.rs` so the context does not depend on the handler traits.

use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::Error;
use crate::model::{ErrorKind, NewStep, WaitFor};

/// Why a step run did not produce a value. Control flow (suspension) travels
/// here too, so durable operations compose with `?`:
/// `let paid = ctx.await_event("paid", None).await?;`.
#[derive(Debug, Clone, PartialEq)]
pub enum StepError {
    /// Worth another attempt (the default for unexpected errors), after the
    /// retry policy's backoff or after `retry_after` if given.
    Retryable {
        /// What happened.
        message: String,
        /// Wait at least this long before the next attempt.
        retry_after: Option<Duration>,
        /// A traceback from the handler's language, if any.
        trace: Option<String>,
    },
    /// Never retried: the step and its task fail.
    Permanent {
        /// What happened.
        message: String,
        /// A traceback from the handler's language, if any.
        trace: Option<String>,
    },
    /// The input is unusable: fails at once, never retried.
    InvalidInput(String),
    /// `ctx.await_event` ran out of time. The timeout is checkpointed, so a
    /// replay takes the same path; if the handler lets it escape, the step
    /// fails permanently.
    AwaitTimeout {
        /// The event waited for.
        event: String,
    },
    /// The task was cancelled (or the handler cancelled itself).
    Cancelled,
    /// Not an error: the step waits for an event, a time or children and
    /// frees its host slot; it resumes later by replay. Handlers propagate
    /// this with `?` and must not swallow it.
    Suspend(WaitFor),
    /// The step's lease was lost (expired or cancelled); its result would be
    /// rejected, so the run stops.
    LeaseLost,
}

impl StepError {
    /// A retryable error.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::Retryable {
            message: message.to_string(),
            retry_after: None,
            trace: None,
        }
    }
    /// A retryable error that asks for a minimum delay.
    pub fn retry_after(message: impl fmt::Display, after: Duration) -> Self {
        Self::Retryable {
            message: message.to_string(),
            retry_after: Some(after),
            trace: None,
        }
    }
    /// A permanent error.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::Permanent {
            message: message.to_string(),
            trace: None,
        }
    }
    /// Invalid input.
    pub fn invalid_input(message: impl fmt::Display) -> Self {
        Self::InvalidInput(message.to_string())
    }
    /// The error kind recorded in the store.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Retryable { .. } => ErrorKind::Retryable,
            Self::Permanent { .. } | Self::AwaitTimeout { .. } => ErrorKind::Permanent,
            Self::InvalidInput(_) => ErrorKind::InvalidInput,
            Self::Cancelled => ErrorKind::Cancelled,
            Self::LeaseLost => ErrorKind::LeaseExpired,
            Self::Suspend(_) => ErrorKind::Retryable,
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable { message, .. } | Self::Permanent { message, .. } => {
                f.write_str(message)
            }
            Self::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Self::AwaitTimeout { event } => write!(f, "timed out waiting for event `{event}`"),
            Self::Cancelled => f.write_str("cancelled"),
            Self::Suspend(w) => write!(f, "suspended waiting for {w:?}"),
            Self::LeaseLost => f.write_str("the step's lease was lost"),
        }
    }
}

impl std::error::Error for StepError {}

/// The name checks of [`Decision::validate_names`] for `steps`, whose
/// errors start with `what` (e.g. ``decision step #3 `name` …``), and
/// recursively for their routes: each status is a name, and each routed
/// step is checked as a decision step is.
fn validate_steps(what: &str, steps: &[NewStep]) -> crate::Result<()> {
    use crate::client::validate_name;
    for (i, s) in steps.iter().enumerate() {
        validate_name(&format!("{what} #{i} `name`"), &s.name)?;
        validate_name(&format!("{what} #{i} (`{}`) `handler`", s.name), &s.handler)?;
        for (j, d) in s.depends_on.iter().enumerate() {
            validate_name(&format!("{what} #{i} (`{}`) `depends_on[{j}]`", s.name), d)?;
        }
        for (status, routed) in &s.routes {
            let here = format!("{what} #{i} (`{}`) route", s.name);
            validate_name(&here, status)?;
            validate_steps(&format!("{here} `{status}` step"), routed)?;
        }
    }
    Ok(())
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        match e {
            Error::LeaseLost(_) => Self::LeaseLost,
            Error::Cancelled(_) => Self::Cancelled,
            Error::InvalidInput(m) => Self::InvalidInput(m),
            Error::PayloadTooLarge { .. } => Self::Permanent {
                message: e.to_string(),
                trace: None,
            },
            other => Self::retryable(other),
        }
    }
}

impl From<serde_json::Error> for StepError {
    fn from(e: serde_json::Error) -> Self {
        Self::InvalidInput(e.to_string())
    }
}

/// Converts any displayable error into a [`StepError`] of a chosen class.
pub trait ResultExt<T> {
    /// Classifies the error as retryable.
    fn retryable(self) -> Result<T, StepError>;
    /// Classifies the error as permanent.
    fn permanent(self) -> Result<T, StepError>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, StepError> {
        self.map_err(StepError::retryable)
    }
    fn permanent(self) -> Result<T, StepError> {
        self.map_err(StepError::permanent)
    }
}

/// What a step run returns.
pub type StepResult<T = Value> = Result<T, StepError>;

/// What a [`DecisionCapable`](crate::handler::DecisionCapable) handler decides.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing more to do: the task completes with this value (if this step
    /// is the task's final step).
    Complete(Value),
    /// Create these steps atomically. `final_step` names the step whose
    /// result becomes the task's result (default: the last one).
    Steps {
        /// Steps to create, with dependencies by name.
        steps: Vec<NewStep>,
        /// Which of them carries the task's result.
        final_step: Option<String>,
    },
}

impl Decision {
    /// Creates `steps`; the last one's result becomes the task's result.
    pub fn steps(steps: Vec<NewStep>) -> Self {
        Self::Steps {
            steps,
            final_step: None,
        }
    }

    /// Reads a decision from its JSON form, the one every foreign binding
    /// hands over: `{"steps": [{"name", "handler", "input", "depends_on"?}],
    /// "final_step"?: name}` or `{"complete": value}`. The error names what
    /// is wrong.
    pub fn from_json(v: Value) -> Result<Self, String> {
        let Value::Object(mut m) = v else {
            return Err(format!(
                "a decision must be an object with `steps` or `complete`, not {}",
                json_kind(&v)
            ));
        };
        if let Some(done) = m.remove("complete") {
            if let Some(k) = m.keys().next() {
                return Err(format!(
                    "a `complete` decision has no other keys (found `{k}`)"
                ));
            }
            return Ok(Self::Complete(done));
        }
        let steps = m
            .remove("steps")
            .ok_or("a decision needs `steps` (a list) or `complete` (the result)")?;
        let final_step = match m.remove("final_step") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(format!(
                    "`final_step` must be a step name, not {}",
                    json_kind(&other)
                ))
            }
        };
        if let Some(k) = m.keys().next() {
            return Err(format!(
                "unknown key `{k}` in a decision (expected `steps`, `final_step` or `complete`)"
            ));
        }
        let steps: Vec<NewStep> = serde_json::from_value(steps).map_err(|e| {
            format!("each step needs `name`, `handler`, `input` and optional `depends_on`: {e}")
        })?;
        Ok(Self::Steps { steps, final_step })
    }

    /// Checks every name a decision hands to the store (each step's `name`,
    /// `handler` and `depends_on` entries, and `final_step`) with
    /// [`crate::client::validate_name`]: non-empty, at most
    /// [`crate::client::MAX_NAME_LEN`] bytes, no control characters (NUL
    /// included). A store could not key on such a name (PostgreSQL text
    /// holds no NUL and refuses the whole write batch), so the worker fails
    /// the deciding step with this error before anything is written. The
    /// error names the step by position and the field, e.g.
    /// ``decision step #3 `name` contains control characters``.
    pub fn validate_names(&self) -> crate::Result<()> {
        use crate::client::validate_name;
        let Self::Steps { steps, final_step } = self else {
            return Ok(());
        };
        validate_steps("decision step", steps)?;
        if let Some(f) = final_step {
            validate_name("decision `final_step`", f)?;
        }
        Ok(())
    }

    /// Fan-out: splits `total` items into cursor ranges of `batch_size`
    /// (`{"start", "end", "size", "index", "input"}`), each run as a parallel
    /// step of `handler` named `{handler}#{index}`, followed by a convergence
    /// step `converge` (handler `converge`) that depends on all of them and
    /// receives their results through [`Context::dependency_results`](crate::Context::dependency_results). The
    /// convergence step's result becomes the task's result.
    pub fn fan_out(
        handler: &str,
        total: u64,
        batch_size: u64,
        input: Value,
        converge: &str,
    ) -> Self {
        let size = batch_size.max(1);
        let mut steps = Vec::new();
        let mut start = 0;
        let mut index = 0;
        while start < total {
            let end = (start + size).min(total);
            steps.push(NewStep {
                name: format!("{handler}#{index}"),
                handler: handler.to_string(),
                input: json!({"start": start, "end": end, "size": end - start, "index": index, "input": input}),
                depends_on: vec![],
                routes: Default::default(),
            });
            start = end;
            index += 1;
        }
        let deps = steps.iter().map(|s| s.name.clone()).collect();
        steps.push(NewStep {
            name: converge.to_string(),
            handler: converge.to_string(),
            input: json!({"total": total, "batches": index, "input": input}),
            depends_on: deps,
            routes: Default::default(),
        });
        Self::Steps {
            steps,
            final_step: Some(converge.to_string()),
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An HTTP-shaped failure from an [`APICapable`](crate::handler::APICapable) handler, classified by the
/// core: 429 retried after `Retry-After`, other 4xx permanent, 5xx and network
/// errors transient.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The remote answered with a non-2xx status.
    Http {
        /// HTTP status code.
        status: u16,
        /// The `Retry-After` header, already parsed.
        retry_after: Option<Duration>,
        /// Response body or message.
        message: String,
    },
    /// The request did not get an answer (connection refused, reset, timeout).
    Network(String),
    /// Any other step error (including suspension from durable operations).
    Step(StepError),
}

impl ApiError {
    /// Classifies the failure into a step error.
    pub fn classify(self) -> StepError {
        match self {
            ApiError::Http {
                status,
                retry_after,
                message,
            } => {
                let message = format!("HTTP {status}: {message}");
                match status {
                    429 => StepError::Retryable {
                        message,
                        retry_after,
                        trace: None,
                    },
                    400..=499 => StepError::Permanent {
                        message,
                        trace: None,
                    },
                    500..=599 => StepError::Retryable {
                        message,
                        retry_after,
                        trace: None,
                    },
                    _ => StepError::Permanent {
                        message: format!("{message} (not an error status)"),
                        trace: None,
                    },
                }
            }
            ApiError::Network(m) => StepError::retryable(format!("network error: {m}")),
            ApiError::Step(e) => e,
        }
    }

    /// Parses a `Retry-After` header given in seconds.
    pub fn parse_retry_after(header: &str) -> Option<Duration> {
        header
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(crate::client::hint_secs)
    }
}

impl From<StepError> for ApiError {
    fn from(e: StepError) -> Self {
        Self::Step(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_read_from_json_or_name_the_problem() {
        let d = Decision::from_json(json!({
            "steps": [{"name": "a", "handler": "h", "input": 1},
                      {"name": "b", "handler": "h", "input": 2, "depends_on": ["a"]}],
            "final_step": "a"
        }))
        .unwrap();
        let Decision::Steps { steps, final_step } = d else {
            panic!("steps expected")
        };
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].depends_on, vec!["a".to_string()]);
        assert_eq!(final_step.as_deref(), Some("a"));
        assert_eq!(
            Decision::from_json(json!({"complete": {"x": 1}})).unwrap(),
            Decision::Complete(json!({"x": 1}))
        );
        let e = |v| Decision::from_json(v).unwrap_err();
        assert!(e(json!([1])).contains("not a list"), "{}", e(json!([1])));
        assert!(e(json!({})).contains("needs `steps`"));
        assert!(e(json!({"steps": [], "extra": 1})).contains("unknown key `extra`"));
        assert!(e(json!({"steps": [{"name": "a"}]})).contains("`handler`"));
        assert!(e(json!({"steps": [], "final_step": 3})).contains("not a number"));
        assert!(e(json!({"complete": 1, "steps": []})).contains("no other keys"));
    }

    #[test]
    fn api_errors_are_classified_by_status() {
        let http = |status, retry_after| ApiError::Http {
            status,
            retry_after,
            message: "x".into(),
        };
        let r = http(429, Some(Duration::from_secs(7))).classify();
        assert_eq!(r.kind(), ErrorKind::Retryable);
        assert!(
            matches!(r, StepError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert_eq!(http(404, None).classify().kind(), ErrorKind::Permanent);
        assert_eq!(http(400, None).classify().kind(), ErrorKind::Permanent);
        assert_eq!(http(503, None).classify().kind(), ErrorKind::Retryable);
        assert_eq!(http(500, None).classify().kind(), ErrorKind::Retryable);
        assert_eq!(
            ApiError::Network("reset".into()).classify().kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            ApiError::parse_retry_after(" 2.5 "),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(ApiError::parse_retry_after("soon"), None);
    }

    #[test]
    fn fan_out_covers_the_range_once() {
        let Decision::Steps { steps, final_step } =
            Decision::fan_out("sum", 10, 4, json!({"k": 1}), "total")
        else {
            panic!("fan_out makes steps");
        };
        assert_eq!(final_step.as_deref(), Some("total"));
        assert_eq!(steps.len(), 4);
        let ranges: Vec<(u64, u64)> = steps[..3]
            .iter()
            .map(|s| {
                (
                    s.input["start"].as_u64().unwrap(),
                    s.input["end"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(ranges, vec![(0, 4), (4, 8), (8, 10)]);
        assert_eq!(steps[3].depends_on, vec!["sum#0", "sum#1", "sum#2"]);
        assert_eq!(steps[3].input["batches"], 3);
    }
}
