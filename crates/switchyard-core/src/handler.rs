//! Handlers and their capabilities (DESIGN.md §5); their typed outcomes are
//! in `outcome.rs`.
//!
//! | capability | trait | returns |
//! | --- | --- | --- |
//! | plain | [`Handler`] | a value or a [`StepError`] |
//! | batchable | [`BatchableCapable`] | one outcome per step of a micro-batch |
//! | decision | [`DecisionCapable`] | a [`Decision`]: which steps to create next |
//! | API | [`APICapable`] | a value or an [`ApiError`] (HTTP-shaped) |

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::context::Context;
pub use crate::outcome::{ApiError, Decision, ResultExt, StepError, StepResult};

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

/// A handler that decides which steps come next.
#[async_trait]
pub trait DecisionCapable: Send + Sync + 'static {
    /// Decides.
    async fn decide(&self, input: Value, ctx: Context) -> StepResult<Decision>;
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
}
