//! The durable context every handler gets (DESIGN.md §6).
//!
//! Durable operations are keyed by name and call order, so a replay (after a
//! suspension, a retry or a crash) meets the same keys in the same order and
//! gets the stored values back:
//!
//! * `ctx.checkpoint("charge", ..)` is stored under `{step}/charge`; the
//!   second call with the same name in one run under `{step}/charge#2`.
//! * awaits, sleeps, spawns and delegations use `$`-prefixed keys the same way.
//!
//! Keys are structural (see [`crate::keys`]): no step name, checkpoint name
//! or event name can stand for another one, an occurrence or an internal key.
//!
//! A suspension is returned as [`StepError::Suspend`]: handlers propagate it
//! with `?`, which unwinds the run and frees the host slot.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::model::*;
use crate::outcome::{StepError, StepResult};
use crate::store::DynStore;

/// What every context of one host shares.
pub(crate) struct CtxEnv {
    pub(crate) store: DynStore,
    pub(crate) host: HostInfo,
    pub(crate) lease_ms: i64,
    pub(crate) max_payload: usize,
}

struct Inner {
    env: Arc<CtxEnv>,
    step: ClaimedStep,
    lease: Lease,
    token: CancellationToken,
    deadline: Option<Instant>,
    cache: tokio::sync::Mutex<Option<BTreeMap<String, Value>>>,
    counters: parking_lot::Mutex<HashMap<String, u32>>,
    /// Durable control flow (suspension, lost lease, cancellation) that a
    /// context call raised into a foreign handler; its answer
    /// [`crate::bridge::Reply::Raised`] passes it on without converting it.
    raised: parking_lot::Mutex<Option<StepError>>,
    /// The status set by [`Context::set_status`] (routing).
    status: parking_lot::Mutex<Option<String>>,
}

/// A child task to delegate to.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    /// Handler of the child's root step.
    pub handler: String,
    /// Its input.
    pub input: Value,
}

impl ChildSpec {
    /// A child running `handler` with `input`.
    pub fn new(handler: impl Into<String>, input: Value) -> Self {
        Self {
            handler: handler.into(),
            input,
        }
    }
}

/// Options of [`Context::spawn_with`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct SpawnOptions {
    /// When the child finishes (completed, failed or cancelled), its outcome
    /// is emitted as this event (first write wins), with the payload
    /// [`crate::model::ResponseEvent`]: `{"task_id", "state", "result",
    /// "error"}`.
    pub response_event: Option<String>,
}

impl SpawnOptions {
    /// Emits the child's outcome as event `name` when it finishes.
    pub fn response_event(mut self, name: impl Into<String>) -> Self {
        self.response_event = Some(name.into());
        self
    }
}

/// The durable context of one step run. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("task_id", &self.inner.step.task_id)
            .field("step", &self.inner.step.name)
            .field("attempt", &self.inner.step.attempt)
            .field("run", &self.inner.step.run)
            .finish()
    }
}

fn lost(e: Error) -> StepError {
    StepError::from(e)
}

impl Context {
    pub(crate) fn new(
        env: Arc<CtxEnv>,
        step: ClaimedStep,
        lease: Lease,
        token: CancellationToken,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                env,
                step,
                lease,
                token,
                deadline,
                cache: tokio::sync::Mutex::new(None),
                counters: parking_lot::Mutex::new(HashMap::new()),
                raised: parking_lot::Mutex::new(None),
                status: parking_lot::Mutex::new(None),
            }),
        }
    }

    /// Keeps control flow a context call raised into foreign code.
    pub(crate) fn hold_raised(&self, e: StepError) {
        *self.inner.raised.lock() = Some(e);
    }

    /// The control flow kept by [`Self::hold_raised`], once.
    pub(crate) fn take_raised(&self) -> Option<StepError> {
        self.inner.raised.lock().take()
    }

    /// Says this run ends with `status` when the handler returns a value:
    /// the step's routes for that status are then created (see
    /// [`crate::model::NewStep::routes`]), and the status is recorded with
    /// the step. Returning without setting one ends with status `ok`; the
    /// last call wins. The status is a name ([`crate::client::validate_name`]);
    /// a status that the step has no route for fails the step when it
    /// returns. An error or a suspension drops it (a resumed run sets it
    /// again).
    pub fn set_status(&self, status: &str) -> StepResult<()> {
        crate::client::validate_name("status", status).map_err(StepError::from)?;
        *self.inner.status.lock() = Some(status.to_owned());
        Ok(())
    }

    /// The status set by [`Self::set_status`] in this run, if any.
    pub fn status(&self) -> Option<String> {
        self.inner.status.lock().clone()
    }

    /// The step's routes, by status (empty if the step is not routed).
    pub fn routes(&self) -> &crate::model::Routes {
        &self.inner.step.routes
    }

    /// The task.
    pub fn task_id(&self) -> TaskId {
        self.inner.step.task_id
    }
    /// The step.
    pub fn step_id(&self) -> StepId {
        self.inner.step.step_id
    }
    /// The step's name.
    pub fn step_name(&self) -> &str {
        &self.inner.step.name
    }
    /// The handler's name.
    pub fn handler(&self) -> &str {
        &self.inner.step.handler
    }
    /// The attempt this run belongs to: 1 until a run fails; resuming after
    /// a suspension continues the same attempt.
    pub fn attempt(&self) -> u32 {
        self.inner.step.attempt
    }
    /// This run's number (fencing token): grows with every claim of the
    /// step, resumes after suspensions included, and is never reused.
    pub fn run(&self) -> u64 {
        self.inner.step.run
    }
    /// The task's headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.step.headers
    }
    /// The task's priority.
    pub fn priority(&self) -> i32 {
        self.inner.step.priority
    }
    /// When the handler's timeout fires, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }
    /// Time left before the handler's timeout fires (zero once it has), if
    /// it has one.
    pub fn time_left(&self) -> Option<std::time::Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
    /// The lease this run holds.
    pub fn lease(&self) -> &Lease {
        &self.inner.lease
    }
    /// True once the task was cancelled (or the host is aborting the run).
    pub fn is_cancelled(&self) -> bool {
        self.inner.token.is_cancelled()
    }
    /// Resolves when the run is cancelled (push cancellation).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn cancelled(&self) {
        self.inner.token.cancelled().await
    }
    /// The cancellation token (for bindings that forward cancellation).
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    fn store(&self) -> &DynStore {
        &self.inner.env.store
    }

    /// The next key for `base` (a first-occurrence key from
    /// [`crate::keys`]) in this run: `base`, then `base#2`, ...
    fn next_key(&self, base: String) -> String {
        let mut c = self.inner.counters.lock();
        let n = c.entry(base.clone()).or_insert(0);
        *n += 1;
        crate::keys::occurrence(&base, *n)
    }

    async fn lookup(&self, key: &str) -> StepResult<Option<Value>> {
        let mut cache = self.inner.cache.lock().await;
        if cache.is_none() {
            *cache = Some(
                self.store()
                    .checkpoints(self.task_id())
                    .await
                    .map_err(lost)?,
            );
        }
        Ok(cache.as_ref().and_then(|c| c.get(key).cloned()))
    }

    async fn save(&self, key: &str, value: Value) -> StepResult<()> {
        crate::client::check_size(
            &format!("checkpoint `{key}`"),
            &value,
            self.inner.env.max_payload,
        )?;
        self.store()
            .put_checkpoint(
                &self.inner.lease,
                key,
                value.clone(),
                self.inner.env.lease_ms,
            )
            .await
            .map_err(lost)?;
        if let Some(c) = self.inner.cache.lock().await.as_mut() {
            c.insert(key.to_string(), value);
        }
        Ok(())
    }

    async fn now(&self) -> StepResult<Millis> {
        self.store()
            .now()
            .await
            .map_err(|e| StepError::retryable(format!("reading the store clock: {e}")))
    }

    /// Reserves the key for checkpoint `name` and returns its stored value,
    /// if any. With [`Self::checkpoint_save`] this is the building block for
    /// bindings, whose `fn` runs in another language.
    pub async fn checkpoint_lookup(&self, name: &str) -> StepResult<(String, Option<Value>)> {
        // Names are keys in every store; one that a store cannot index or
        // store (PostgreSQL text holds no NUL) must fail this step alone,
        // before it reaches a write batch shared with other steps.
        crate::client::validate_name("checkpoint name", name)?;
        let key = self.next_key(crate::keys::checkpoint(&self.inner.step.name, name));
        let v = self.lookup(&key).await?;
        Ok((key, v))
    }

    /// Stores a checkpoint value under a key from [`Self::checkpoint_lookup`].
    /// Also extends the lease.
    pub async fn checkpoint_save(&self, key: &str, value: Value) -> StepResult<()> {
        self.save(key, value).await
    }

    /// Runs `f` once per task, ever: on replay returns the stored value
    /// without running it. Repeated names in one run are numbered in call
    /// order.
    pub async fn checkpoint<T, F, Fut>(&self, name: &str, f: F) -> StepResult<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = StepResult<T>>,
    {
        let (key, stored) = self.checkpoint_lookup(name).await?;
        if let Some(v) = stored {
            return serde_json::from_value(v).map_err(|e| {
                StepError::permanent(format!(
                    "checkpoint `{key}` holds a value of another type: {e}"
                ))
            });
        }
        let value = f().await?;
        let json = serde_json::to_value(&value).map_err(|e| {
            StepError::permanent(format!(
                "checkpoint `{key}`: value is not JSON-serialisable: {e}"
            ))
        })?;
        self.save(&key, json).await?;
        Ok(value)
    }

    /// Waits for event `name`: returns its payload if it was emitted before
    /// or after the call. Otherwise the step suspends (propagate the error
    /// with `?`) and resumes by replay when the event arrives. With a
    /// timeout, returns [`StepError::AwaitTimeout`] once it has passed; the
    /// deadline and the timeout are checkpointed, so replays agree.
    pub async fn await_event(&self, name: &str, timeout: Option<Duration>) -> StepResult<Value> {
        crate::client::validate_name("event name", name)?;
        if let Some(t) = timeout {
            crate::client::check_duration("await_event timeout", t)?;
        }
        let key = self.next_key(crate::keys::await_event(&self.inner.step.name, name));
        if let Some(v) = self.lookup(&key).await? {
            return match v.get("event") {
                Some(p) => Ok(p.clone()),
                None => Err(StepError::AwaitTimeout {
                    event: name.to_string(),
                }),
            };
        }
        let deadline = match timeout {
            None => None,
            Some(t) => {
                let dkey = crate::keys::deadline(&key);
                match self.lookup(&dkey).await?.and_then(|v| v.as_i64()) {
                    Some(d) => Some(d),
                    None => {
                        let now = self.now().await?;
                        let d = crate::client::deadline_after("await_event timeout", now, t)?;
                        self.save(&dkey, json!(d)).await?;
                        Some(d)
                    }
                }
            }
        };
        if let Some(ev) = self.store().get_event(name).await.map_err(lost)? {
            self.save(&key, json!({ "event": ev.payload })).await?;
            return Ok(ev.payload);
        }
        if let Some(d) = deadline {
            if self.now().await? >= d {
                self.save(&key, json!({ "timeout": true })).await?;
                return Err(StepError::AwaitTimeout {
                    event: name.to_string(),
                });
            }
        }
        Err(StepError::Suspend(WaitFor {
            wake_at: deadline,
            event: Some(name.to_string()),
            group: None,
        }))
    }

    /// Durable sleep: suspends the step until `duration` after the first
    /// call (on the store's clock); survives restarts.
    ///
    /// A duration over [`crate::client::MAX_DURATION`] fails the step with
    /// [`StepError::InvalidInput`].
    pub async fn sleep(&self, duration: Duration) -> StepResult<()> {
        crate::client::check_duration("sleep duration", duration)?;
        let key = self.next_key(crate::keys::internal("sleep", &self.inner.step.name));
        let wake = match self.lookup(&key).await?.and_then(|v| v.as_i64()) {
            Some(w) => w,
            None => {
                let now = self.now().await?;
                let w = crate::client::deadline_after("sleep duration", now, duration)?;
                self.save(&key, json!(w)).await?;
                w
            }
        };
        self.wait_until(wake).await
    }

    /// Durable sleep until `at` (milliseconds since the epoch, store clock).
    ///
    /// The first call's `at` is checkpointed and wins on replay, so an `at`
    /// computed from the wall clock on each run still wakes. An `at` more
    /// than [`crate::client::MAX_DURATION`] after now fails the step with
    /// [`StepError::InvalidInput`].
    pub async fn sleep_until(&self, at: Millis) -> StepResult<()> {
        let key = self.next_key(crate::keys::internal("sleep", &self.inner.step.name));
        let wake = match self.lookup(&key).await?.and_then(|v| v.as_i64()) {
            Some(w) => w,
            None => {
                let now = self.now().await?;
                let limit =
                    crate::client::deadline_after("sleep_until", now, crate::client::MAX_DURATION)?;
                if at > limit {
                    return Err(StepError::invalid_input(format!(
                        "sleep_until: {at} ms since the epoch is more than 100 years from now ({now})"
                    )));
                }
                self.save(&key, json!(at)).await?;
                at
            }
        };
        self.wait_until(wake).await
    }

    async fn wait_until(&self, wake: Millis) -> StepResult<()> {
        if self.now().await? >= wake {
            return Ok(());
        }
        Err(StepError::Suspend(WaitFor {
            wake_at: Some(wake),
            event: None,
            group: None,
        }))
    }

    /// Emits an event (first write wins). Returns true if this call stored it.
    pub async fn emit_event(&self, name: &str, payload: Value) -> StepResult<bool> {
        crate::client::validate_name("event name", name)?;
        crate::client::check_size("event payload", &payload, self.inner.env.max_payload)?;
        self.store()
            .emit_event_fenced(&self.inner.lease, name, payload)
            .await
            .map_err(lost)
    }

    fn child(
        &self,
        handler: &str,
        input: Value,
        key: String,
        parent: ParentRef,
    ) -> StepResult<NewTask> {
        crate::client::validate_name("handler name", handler)?;
        crate::client::check_size("child input", &input, self.inner.env.max_payload)?;
        let mut t = NewTask::new(handler, input);
        t.headers = self.inner.step.headers.clone();
        t.priority = self.inner.step.priority;
        t.idempotency_key = Some(key);
        t.parent = Some(parent);
        Ok(t)
    }

    /// Spawns a child task that the step does not wait for. Replays return
    /// the same child (the spawn is idempotent by call order).
    pub async fn spawn(&self, handler: &str, input: Value) -> StepResult<TaskId> {
        self.spawn_with(handler, input, SpawnOptions::default())
            .await
    }

    /// [`Self::spawn`] with options: `response_event` emits the child's
    /// outcome as an event when it finishes, so this step (or any other
    /// code) can `await_event` it. An option that is not valid (a
    /// `response_event` that is no name) fails with `InvalidInput`.
    pub async fn spawn_with(
        &self,
        handler: &str,
        input: Value,
        opts: SpawnOptions,
    ) -> StepResult<TaskId> {
        if let Some(e) = &opts.response_event {
            crate::client::validate_name("response_event", e)?;
        }
        let key = self.next_key(crate::keys::internal("spawn", &self.inner.step.name));
        let idem = format!("{}/{key}", self.task_id());
        let parent = ParentRef {
            task_id: self.task_id(),
            step_id: self.step_id(),
            group: None,
            index: 0,
        };
        let mut task = self.child(handler, input, idem, parent)?;
        task.response_event = opts.response_event;
        let spawned = self
            .store()
            .spawn_fenced(&self.inner.lease, vec![task])
            .await
            .map_err(lost)?;
        Ok(spawned[0].task_id)
    }

    /// Delegates to child tasks run in parallel and waits for all of them
    /// (the step suspends meanwhile). Returns one outcome per child, in
    /// order; failures are reported per child (collect, not fail-fast).
    pub async fn delegate_parallel(
        &self,
        children: Vec<ChildSpec>,
    ) -> StepResult<Vec<ChildOutcome>> {
        let key = self.next_key(crate::keys::internal("group", &self.inner.step.name));
        // A replay uses the group it recorded (its name is derived from the
        // key when the group is made).
        let recorded = self.lookup(&key).await?;
        let group = match recorded
            .as_ref()
            .and_then(|v| v.get("group"))
            .and_then(Value::as_str)
        {
            Some(g) => g.to_string(),
            None => format!("{}/{key}", self.task_id()),
        };
        if recorded.is_none() {
            let mut tasks = Vec::with_capacity(children.len());
            for (i, c) in children.into_iter().enumerate() {
                let parent = ParentRef {
                    task_id: self.task_id(),
                    step_id: self.step_id(),
                    group: Some(group.clone()),
                    index: i as u32,
                };
                tasks.push(self.child(&c.handler, c.input, format!("{group}/{i}"), parent)?);
            }
            let n = tasks.len();
            let spawned = self
                .store()
                .spawn_fenced(&self.inner.lease, tasks)
                .await
                .map_err(lost)?;
            let ids: Vec<String> = spawned.iter().map(|s| s.task_id.to_string()).collect();
            self.save(&key, json!({ "group": group, "children": ids, "count": n }))
                .await?;
        }
        let outcomes = self.store().group_outcomes(&group).await.map_err(lost)?;
        if outcomes.iter().all(|o| o.state.is_terminal()) {
            return Ok(outcomes);
        }
        Err(StepError::Suspend(WaitFor {
            wake_at: None,
            event: None,
            group: Some(group),
        }))
    }

    /// Delegates to one child task and waits for its result; a failed or
    /// cancelled child fails this step permanently with the child's error.
    pub async fn delegate(&self, handler: &str, input: Value) -> StepResult<Value> {
        let mut out = self
            .delegate_parallel(vec![ChildSpec::new(handler, input)])
            .await?;
        let o = out
            .pop()
            .ok_or_else(|| StepError::permanent("delegation returned no outcome"))?;
        match o.state {
            TaskState::Completed => Ok(o.result.unwrap_or(Value::Null)),
            state => Err(StepError::permanent(format!(
                "delegated task {} ({handler}) {state}: {}",
                o.task_id,
                o.error.map(|e| e.message).unwrap_or_default()
            ))),
        }
    }

    /// Extends the lease for long work. Fails with [`StepError::Cancelled`]
    /// if the step was cancelled, and with [`StepError::LeaseLost`] if its
    /// lease expired and another run took it over.
    pub async fn heartbeat(&self) -> StepResult<()> {
        let env = &self.inner.env;
        let me = RunRef {
            step_id: self.step_id(),
            run: self.run(),
        };
        let reply = self
            .store()
            .heartbeat(&env.host, &[me], env.lease_ms)
            .await
            .map_err(lost)?;
        if reply.lost.contains(&me) {
            self.inner.token.cancel();
            if reply.cancelled.contains(&me) {
                return Err(StepError::Cancelled);
            }
            return Err(StepError::LeaseLost);
        }
        Ok(())
    }

    /// Results of the steps this step depends on, by name (convergence steps).
    pub async fn dependency_results(&self) -> StepResult<BTreeMap<String, Value>> {
        if !self.inner.step.has_dependencies {
            return Ok(BTreeMap::new());
        }
        let detail = self
            .store()
            .task_detail(self.task_id())
            .await
            .map_err(lost)?
            .ok_or_else(|| StepError::permanent("the task disappeared"))?;
        let deps = detail
            .steps
            .iter()
            .find(|s| s.id == self.step_id())
            .map(|s| s.depends_on.clone())
            .unwrap_or_default();
        self.store()
            .step_results(self.task_id(), &deps)
            .await
            .map_err(lost)
    }
}
