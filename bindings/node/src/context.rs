//! `NativeContext`: the durable context of one step run. Every durable
//! operation is async and resolves to an envelope; the TypeScript `Context`
//! adds `checkpoint(name, fn)` on top of `checkpointLookup` /
//! `checkpointSave` because `fn` is JS code. Its `signal` is fired by the
//! worker's cancellation notices (see `worker.rs`), not through the context.

use napi_derive::napi;
use switchyard_core::Context;

use crate::client::secs;
use crate::errors::{core_err, parse_env, step};

/// Durable context handle given to JS handlers.
#[napi]
pub struct NativeContext {
    pub(crate) ctx: Context,
}

fn either(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| e)
}

#[napi]
impl NativeContext {
    /// The task id.
    #[napi(getter)]
    pub fn task_id(&self) -> String {
        self.ctx.task_id().to_string()
    }
    /// The step id.
    #[napi(getter)]
    pub fn step_id(&self) -> String {
        self.ctx.step_id().to_string()
    }
    /// The step's name.
    #[napi(getter)]
    pub fn step_name(&self) -> String {
        self.ctx.step_name().to_string()
    }
    /// The handler's name.
    #[napi(getter)]
    pub fn handler(&self) -> String {
        self.ctx.handler().to_string()
    }
    /// The attempt this run belongs to: 1 until a run fails; a resume after
    /// a suspension continues the same attempt.
    #[napi(getter)]
    pub fn attempt(&self) -> u32 {
        self.ctx.attempt()
    }
    /// This run's number: grows with every claim of the step (resumes
    /// included) and is never reused.
    #[napi(getter)]
    pub fn run(&self) -> f64 {
        self.ctx.run() as f64
    }
    /// The task's priority.
    #[napi(getter)]
    pub fn priority(&self) -> i32 {
        self.ctx.priority()
    }
    /// The task's headers as JSON.
    #[napi(getter)]
    pub fn headers_json(&self) -> String {
        serde_json::to_string(self.ctx.headers()).unwrap_or_else(|_| "{}".into())
    }
    /// Seconds left before the handler's timeout, or null.
    #[napi(getter)]
    pub fn time_left(&self) -> Option<f64> {
        self.ctx.time_left().map(|d| d.as_secs_f64())
    }
    /// True once the task was cancelled (or the host aborts the run).
    #[napi(getter)]
    pub fn is_cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    /// Ends this run with `status` (routing); answers like the other calls.
    #[napi]
    pub fn set_status(&self, status: String) -> String {
        step(&self.ctx, self.ctx.set_status(&status))
    }

    /// Resolves to `{"ok": {"key", "found", "value"}}` for checkpoint `name`
    /// (numbered by call order).
    #[napi]
    pub async fn checkpoint_lookup(&self, name: String) -> String {
        let ctx = self.ctx.clone();
        let r = ctx.checkpoint_lookup(&name).await;
        step(
            &ctx,
            r.map(|(key, v)| serde_json::json!({ "key": key, "found": v.is_some(), "value": v })),
        )
    }

    /// Stores a checkpoint value (JSON) under a key from `checkpointLookup`.
    #[napi]
    pub async fn checkpoint_save(&self, key: String, value: String) -> String {
        let ctx = self.ctx.clone();
        either(
            async move {
                let v = parse_env(&format!("checkpoint `{key}` value"), &value)?;
                Ok(step(&ctx, ctx.checkpoint_save(&key, v).await))
            }
            .await,
        )
    }

    /// Waits for event `name` (suspends the step if it is not there yet).
    #[napi]
    pub async fn await_event(&self, name: String, timeout_secs: Option<f64>) -> String {
        let ctx = self.ctx.clone();
        let timeout = timeout_secs
            .map(|s| secs("awaitEvent timeout", s))
            .transpose();
        let r = async { ctx.await_event(&name, timeout?).await }.await;
        step(&ctx, r)
    }

    /// Durable sleep.
    #[napi]
    pub async fn sleep(&self, seconds: f64) -> String {
        let ctx = self.ctx.clone();
        let d = secs("sleep duration", seconds);
        let r = async { ctx.sleep(d?).await }.await;
        step(&ctx, r)
    }

    /// Durable sleep until `at_ms` (milliseconds since the epoch).
    #[napi]
    pub async fn sleep_until(&self, at_ms: i64) -> String {
        let ctx = self.ctx.clone();
        step(&ctx, ctx.sleep_until(at_ms).await)
    }

    /// Emits an event; true if this call stored it.
    #[napi]
    pub async fn emit_event(&self, name: String, payload: String) -> String {
        let ctx = self.ctx.clone();
        either(
            async move {
                let p = parse_env("event payload", &payload)?;
                Ok(step(&ctx, ctx.emit_event(&name, p).await))
            }
            .await,
        )
    }

    /// Spawns a child task the step does not wait for; resolves to its id.
    #[napi]
    pub async fn spawn(
        &self,
        handler: String,
        input: String,
        response_event: Option<String>,
    ) -> String {
        let ctx = self.ctx.clone();
        either(
            async move {
                let i = parse_env("child input", &input)?;
                let mut opts = switchyard_core::SpawnOptions::default();
                opts.response_event = response_event;
                let r = ctx.spawn_with(&handler, i, opts).await;
                Ok(step(&ctx, r.map(|id| id.to_string())))
            }
            .await,
        )
    }

    /// Delegates to a child task and waits for its result.
    #[napi]
    pub async fn delegate(&self, handler: String, input: String) -> String {
        let ctx = self.ctx.clone();
        either(
            async move {
                let i = parse_env("child input", &input)?;
                Ok(step(&ctx, ctx.delegate(&handler, i).await))
            }
            .await,
        )
    }

    /// `children`: JSON array of `{handler, input}` objects or `[handler,
    /// input]` pairs (parsed by the core's [`switchyard_core::bridge::child_specs`]).
    /// Resolves to one outcome per child (`task_id`, `state`, `result`,
    /// `error`), in order.
    #[napi]
    pub async fn delegate_parallel(&self, children: String) -> String {
        let ctx = self.ctx.clone();
        either(
            async move {
                let v = parse_env("delegateParallel children", &children)?;
                let specs = switchyard_core::bridge::child_specs(v).map_err(|e| core_err(&e))?;
                Ok(step(&ctx, ctx.delegate_parallel(specs).await))
            }
            .await,
        )
    }

    /// Extends the lease.
    #[napi]
    pub async fn heartbeat(&self) -> String {
        let ctx = self.ctx.clone();
        step(&ctx, ctx.heartbeat().await)
    }

    /// Results of the steps this step depends on, by name.
    #[napi]
    pub async fn dependency_results(&self) -> String {
        let ctx = self.ctx.clone();
        step(&ctx, ctx.dependency_results().await)
    }
}
