//! Handlers and their capabilities (DESIGN.md §5), with typed outcomes.
//!
//! | capability | trait | returns |
//! | --- | --- | --- |
//! | plain | [`Handler`] | a value or a [`StepError`] |
//! | batchable | [`BatchableCapable`] | one outcome per step of a micro-batch |
//! | decision | [`DecisionCapable`] | a [`Decision`]: which steps to create next |
//! | API | [`APICapable`] | a value or an [`ApiError`] (HTTP-shaped) |

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::context::Context;
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

/// A plain handler: input and context in, a value out.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one step.
    async fn run(&self, input: Value, ctx: Context) -> StepResult;
}

/// One step of a micro-batch.
pub struct BatchItem {
    /// Its input.
    pub input: Value,
    /// Its durable context.
    pub ctx: Context,
}

/// A handler that receives up to `max_batch` steps at once (waiting at most
/// `linger` for the batch to fill) and answers one outcome per step, in order.
#[async_trait]
pub trait BatchableCapable: Send + Sync + 'static {
    /// Runs a batch; the answer must have exactly one entry per item.
    async fn run_batch(&self, items: Vec<BatchItem>) -> Vec<StepResult>;
}

/// What a [`DecisionCapable`] handler decides.
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
        for (i, s) in steps.iter().enumerate() {
            validate_name(&format!("decision step #{i} `name`"), &s.name)?;
            validate_name(
                &format!("decision step #{i} (`{}`) `handler`", s.name),
                &s.handler,
            )?;
            for (j, d) in s.depends_on.iter().enumerate() {
                validate_name(
                    &format!("decision step #{i} (`{}`) `depends_on[{j}]`", s.name),
                    d,
                )?;
            }
        }
        if let Some(f) = final_step {
            validate_name("decision `final_step`", f)?;
        }
        Ok(())
    }

    /// Fan-out: splits `total` items into cursor ranges of `batch_size`
    /// (`{"start", "end", "size", "index", "input"}`), each run as a parallel
    /// step of `handler` named `{handler}#{index}`, followed by a convergence
    /// step `converge` (handler `converge`) that depends on all of them and
    /// receives their results through [`Context::dependency_results`]. The
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

/// A handler that decides which steps come next.
#[async_trait]
pub trait DecisionCapable: Send + Sync + 'static {
    /// Decides.
    async fn decide(&self, input: Value, ctx: Context) -> StepResult<Decision>;
}

/// An HTTP-shaped failure from an [`APICapable`] handler, classified by the
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

/// A handler shaped like an HTTP call.
#[async_trait]
pub trait APICapable: Send + Sync + 'static {
    /// Makes the call.
    async fn call(&self, input: Value, ctx: Context) -> Result<Value, ApiError>;
}

/// Retry policy: exponential backoff with jitter, up to `max_attempts`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of the delay.
    pub max_backoff: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
    /// Random spread, as a fraction of the delay (0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy with `max_attempts` and the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// The delay after failed attempt number `attempt` (1-based), with jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(62) as i32);
        let base = (self.initial_backoff.as_secs_f64() * exp).min(self.max_backoff.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            crate::ids::with_rng(|r| rand::Rng::gen::<f64>(r)) * 2.0 - 1.0
        } else {
            0.0
        };
        // A multiplier or jitter out of range (NaN, huge) must not panic:
        // clamp to zero .. MAX_DURATION.
        crate::client::hint_secs(base * (1.0 + self.jitter * spread)).unwrap_or_default()
    }
}

/// Per-handler rate limit (token bucket).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained starts per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: u32,
}

/// Options of one registered handler.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerOptions {
    /// Steps of this handler running at once in this host.
    pub concurrency: usize,
    /// Per-run timeout enforced by the core (`None` = no limit).
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Batch handlers: most steps per batch.
    pub max_batch: usize,
    /// Batch handlers: longest wait for a batch to fill.
    pub linger: Duration,
    /// API handlers: optional rate limit.
    pub rate_limit: Option<RateLimit>,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            timeout: Some(Duration::from_secs(300)),
            retry: RetryPolicy::default(),
            max_batch: 64,
            linger: Duration::from_millis(5),
            rate_limit: None,
        }
    }
}

impl HandlerOptions {
    /// Sets the concurrency.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// Sets the retry policy.
    pub fn retry(mut self, r: RetryPolicy) -> Self {
        self.retry = r;
        self
    }
    /// Sets the maximum batch size.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }
    /// Sets the linger time.
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }
    /// Sets the rate limit.
    pub fn rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.rate_limit = Some(RateLimit {
            per_second,
            burst: burst.max(1),
        });
        self
    }
}

/// The registered implementation of a handler: one capability.
#[derive(Clone)]
pub enum Capability {
    /// Plain.
    Plain(std::sync::Arc<dyn Handler>),
    /// Micro-batched.
    Batch(std::sync::Arc<dyn BatchableCapable>),
    /// Decision.
    Decision(std::sync::Arc<dyn DecisionCapable>),
    /// API-shaped.
    Api(std::sync::Arc<dyn APICapable>),
}

impl Capability {
    /// `plain`, `batch`, `decision` or `api`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Plain(_) => "plain",
            Self::Batch(_) => "batch",
            Self::Decision(_) => "decision",
            Self::Api(_) => "api",
        }
    }
}

/// Adapts an async closure `|input, ctx| async { ... }` into a [`Handler`].
pub struct FnHandler<F>(pub F);

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepResult> + Send + 'static,
{
    async fn run(&self, input: Value, ctx: Context) -> StepResult {
        (self.0)(input, ctx).await
    }
}

/// Adapts an async closure over a batch into a [`BatchableCapable`].
pub struct FnBatch<F>(pub F);

#[async_trait]
impl<F, Fut> BatchableCapable for FnBatch<F>
where
    F: Fn(Vec<BatchItem>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<StepResult>> + Send + 'static,
{
    async fn run_batch(&self, items: Vec<BatchItem>) -> Vec<StepResult> {
        (self.0)(items).await
    }
}

/// Adapts an async closure into a [`DecisionCapable`].
pub struct FnDecision<F>(pub F);

#[async_trait]
impl<F, Fut> DecisionCapable for FnDecision<F>
where
    F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepResult<Decision>> + Send + 'static,
{
    async fn decide(&self, input: Value, ctx: Context) -> StepResult<Decision> {
        (self.0)(input, ctx).await
    }
}

/// Adapts an async closure into an [`APICapable`].
pub struct FnApi<F>(pub F);

#[async_trait]
impl<F, Fut> APICapable for FnApi<F>
where
    F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ApiError>> + Send + 'static,
{
    async fn call(&self, input: Value, ctx: Context) -> Result<Value, ApiError> {
        (self.0)(input, ctx).await
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
    fn backoff_grows_within_jitter_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.2,
        };
        for _ in 0..100 {
            let d1 = p.backoff(1).as_secs_f64();
            assert!((0.08..=0.12).contains(&d1), "{d1}");
            let d3 = p.backoff(3).as_secs_f64();
            assert!((0.32..=0.48).contains(&d3), "{d3}");
            let d9 = p.backoff(9).as_secs_f64();
            assert!((0.8..=1.2).contains(&d9), "capped: {d9}");
        }
        let no_jitter = RetryPolicy { jitter: 0.0, ..p };
        assert_eq!(no_jitter.backoff(2), Duration::from_millis(200));
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
