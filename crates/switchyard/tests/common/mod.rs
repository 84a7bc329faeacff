//! Shared helpers for the in-process integration tests: a fake-clocked store
//! of each kind, a worker builder with test-friendly defaults, and ways to
//! wait for conditions without sleeping for fixed times.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard::{
    open_with, ChildOutcome, ClaimBatch, Client, Completion, DynStore, EventRecord, FakeClock,
    HandlerOptions, HeartbeatReply, HostInfo, Lease, Millis, NewTask, Result as SyResult,
    RetryPolicy, RunRef, Signals, Spawned, StateCounts, StepId, StepRecord, StepState, Store,
    StoreOptions, TaskDetail, TaskFilter, TaskId, TaskRecord, Worker, WorkerBuilder,
};
use switchyard_store::pg_server::PgServer;
use tempfile::TempDir;
use tokio::sync::Notify;

/// How long any single wait in a test may take before it counts as a hang.
pub const WAIT: Duration = Duration::from_secs(10);

/// The stores every test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Sqlite,
    /// A fresh database on the throwaway server shared by the test binary
    /// ([`PgServer::shared`]).
    Postgres,
}

/// Generates `mod <name> { memory, sqlite, postgres }` test triples, each
/// calling `async fn <name>(env: Env)` with a fresh store of that kind and
/// an overall time limit so a hang fails the test instead of stalling the
/// suite.
#[macro_export]
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    let env = $crate::common::Env::new($crate::common::StoreKind::Memory).await;
                    $crate::common::run_limited(super::$name(env)).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let env = $crate::common::Env::new($crate::common::StoreKind::Sqlite).await;
                    $crate::common::run_limited(super::$name(env)).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let env = $crate::common::Env::new($crate::common::StoreKind::Postgres).await;
                    $crate::common::run_limited(super::$name(env)).await;
                }
            }
        )*
    };
}

/// Runs a test body with an overall limit.
pub async fn run_limited(body: impl Future<Output = ()>) {
    init_tracing();
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("the test did not finish within 60 s");
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A store with a fake clock, a client on it, and the temp dir it lives in.
pub struct Env {
    pub kind: StoreKind,
    pub store: DynStore,
    pub clock: Arc<FakeClock>,
    pub client: Client,
    _dir: Option<TempDir>,
}

impl Env {
    pub async fn new(kind: StoreKind) -> Self {
        let clock = Arc::new(FakeClock::new());
        let options = StoreOptions {
            clock: clock.clone(),
            migrate: true,
            create: true,
        };
        let (url, dir) = match kind {
            StoreKind::Memory => ("memory".to_string(), None),
            StoreKind::Postgres => (
                PgServer::shared()
                    .unwrap_or_else(|e| panic!("{e}"))
                    .fresh_database()
                    .await
                    .expect("create a test database"),
                None,
            ),
            StoreKind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                (
                    format!("sqlite:{}", dir.path().join("switchyard.db").display()),
                    Some(dir),
                )
            }
        };
        let store = open_with(&url, options)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
        let client = Client::new(store.clone());
        Self {
            kind,
            store,
            clock,
            client,
            _dir: dir,
        }
    }

    /// A worker on this store with a short shutdown grace and a `barrier`
    /// handler (see [`Self::barrier`]).
    pub fn worker(&self) -> WorkerBuilder {
        Worker::builder(self.store.clone())
            .shutdown_grace(Duration::from_millis(200))
            .step(BARRIER, HandlerOptions::default(), |_, _| async {
                Ok(Value::Null)
            })
    }

    /// Moves the fake clock and wakes idle hosts.
    pub fn advance(&self, ms: Millis) {
        self.clock.advance(ms);
        self.store.signals().notify_ready();
    }

    /// The store's (fake) time.
    pub async fn now(&self) -> Millis {
        self.store.now().await.expect("store clock")
    }

    /// Runs one `barrier` task to completion. Every claim asks for all the
    /// host's handlers at once (and promotes due suspended steps), so once the
    /// barrier has run, a step that was due would have been claimed too: this
    /// is how tests show that something did *not* run, without sleeping.
    pub async fn barrier(&self) {
        for _ in 0..2 {
            let id = self
                .client
                .spawn(BARRIER, json!({}))
                .await
                .expect("spawn barrier");
            self.result(id).await;
        }
    }

    pub async fn detail(&self, id: TaskId) -> TaskDetail {
        self.client.inspect(id).await.expect("inspect")
    }

    /// The task's step named `name`.
    pub async fn step(&self, id: TaskId, name: &str) -> StepRecord {
        let d = self.detail(id).await;
        d.steps
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("task {id} has no step `{name}`: {:?}", d.steps))
    }

    /// Waits until the task's step `name` is in `state`.
    pub async fn wait_step(&self, id: TaskId, name: &str, state: StepState) -> StepRecord {
        eventually(&format!("step `{name}` of {id} to be {state}"), || async {
            self.detail(id)
                .await
                .steps
                .into_iter()
                .find(|s| s.name == name && s.state == state)
        })
        .await
    }

    /// Waits for the task to finish.
    pub async fn finished(&self, id: TaskId) -> TaskRecord {
        self.client
            .wait(id, WAIT)
            .await
            .unwrap_or_else(|e| panic!("waiting for {id}: {e}"))
    }

    /// Waits for the task's result; panics if it did not complete.
    pub async fn result(&self, id: TaskId) -> Value {
        let t = self.finished(id).await;
        assert_eq!(
            t.state,
            switchyard::TaskState::Completed,
            "task {id} ended {}: {:?}",
            t.state,
            t.error
        );
        t.result.unwrap_or(Value::Null)
    }
}

/// The name of the handler every test worker registers for [`Env::barrier`].
pub const BARRIER: &str = "barrier";

/// Retries at once (no backoff, no jitter), `max_attempts` in all.
pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
        multiplier: 1.0,
        jitter: 0.0,
    }
}

/// Polls `check` until it yields a value, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A counter that can be awaited.
#[derive(Default)]
pub struct Tally {
    n: AtomicUsize,
    changed: Notify,
}

impl Tally {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Adds one; returns the new value.
    pub fn bump(&self) -> usize {
        let v = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed.notify_waiters();
        v
    }
    pub fn get(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }
    /// Waits until the count reaches `n`.
    pub async fn reach(&self, n: usize) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.get() >= n {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!(
                "timed out waiting for a count of {n} (it is {})",
                self.get()
            );
        }
    }
}

/// An append-only log shared with handlers.
pub struct Log<T>(Mutex<Vec<T>>);

impl<T: Clone> Log<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(Vec::new())))
    }
    pub fn push(&self, v: T) {
        self.0.lock().unwrap().push(v);
    }
    pub fn all(&self) -> Vec<T> {
        self.0.lock().unwrap().clone()
    }
}

/// Tracks how many handlers run at once and the most ever seen.
#[derive(Default)]
pub struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn enter(&self) {
        let v = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(v, Ordering::SeqCst);
    }
    pub fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

/// What a test's wrapper store ([`Hooked`]) does differently from the store
/// it wraps; every other call goes to the inner store unchanged.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Sees each batch the inner store handed out.
    fn claimed(&self, _batch: &ClaimBatch) {}
    /// Records outcomes (by default: the inner store's `complete`).
    async fn complete(
        &self,
        inner: &DynStore,
        completions: Vec<Completion>,
    ) -> SyResult<Vec<SyResult<()>>> {
        inner.complete(completions).await
    }
}

/// A store that delegates every call to `inner`, except what `hooks`
/// changes (counting claims, holding or refusing completions).
pub struct Hooked<H> {
    pub inner: DynStore,
    pub hooks: H,
}

impl<H: Hooks> Hooked<H> {
    /// `hooks` around a fresh memory store.
    pub async fn memory(hooks: H) -> Arc<Self> {
        Arc::new(Self {
            inner: switchyard::open("memory").await.expect("memory store"),
            hooks,
        })
    }
}

#[async_trait]
impl<H: Hooks> Store for Hooked<H> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn url(&self) -> String {
        self.inner.url()
    }
    fn signals(&self) -> &Arc<Signals> {
        self.inner.signals()
    }
    fn poll_interval(&self) -> Duration {
        self.inner.poll_interval()
    }
    async fn now(&self) -> SyResult<Millis> {
        self.inner.now().await
    }
    async fn migrate(&self) -> SyResult<u32> {
        self.inner.migrate().await
    }
    async fn spawn(&self, tasks: Vec<NewTask>) -> SyResult<Vec<Spawned>> {
        self.inner.spawn(tasks).await
    }
    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> SyResult<ClaimBatch> {
        let batch = self.inner.claim(host_id, wants, lease_ms).await?;
        self.hooks.claimed(&batch);
        Ok(batch)
    }
    async fn complete(&self, completions: Vec<Completion>) -> SyResult<Vec<SyResult<()>>> {
        self.hooks.complete(&self.inner, completions).await
    }
    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
    ) -> SyResult<HeartbeatReply> {
        self.inner.heartbeat(host, running, lease_ms).await
    }
    async fn cancelled_steps(&self, steps: &[StepId]) -> SyResult<Vec<StepId>> {
        self.inner.cancelled_steps(steps).await
    }
    async fn expire_host(&self, host_id: &str) -> SyResult<u64> {
        self.inner.expire_host(host_id).await
    }
    async fn deregister_host(&self, host_id: &str) -> SyResult<()> {
        self.inner.deregister_host(host_id).await
    }
    async fn recover_expired(&self) -> SyResult<u64> {
        self.inner.recover_expired().await
    }
    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> SyResult<()> {
        self.inner.put_checkpoint(lease, key, value, lease_ms).await
    }
    async fn checkpoints(&self, task_id: TaskId) -> SyResult<BTreeMap<String, Value>> {
        self.inner.checkpoints(task_id).await
    }
    async fn emit_event(&self, name: &str, payload: Value) -> SyResult<bool> {
        self.inner.emit_event(name, payload).await
    }
    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> SyResult<bool> {
        self.inner.emit_event_fenced(fence, name, payload).await
    }
    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> SyResult<Vec<Spawned>> {
        self.inner.spawn_fenced(fence, tasks).await
    }
    async fn get_event(&self, name: &str) -> SyResult<Option<EventRecord>> {
        self.inner.get_event(name).await
    }
    async fn list_events(&self, limit: usize) -> SyResult<Vec<EventRecord>> {
        self.inner.list_events(limit).await
    }
    async fn list_events_prefixed(&self, prefix: &str, limit: usize) -> SyResult<Vec<EventRecord>> {
        self.inner.list_events_prefixed(prefix, limit).await
    }
    async fn handler_stats(&self) -> SyResult<Vec<switchyard::HandlerStats>> {
        self.inner.handler_stats().await
    }
    async fn running_by_host(&self) -> SyResult<std::collections::BTreeMap<String, u64>> {
        self.inner.running_by_host().await
    }
    async fn group_outcomes(&self, group: &str) -> SyResult<Vec<ChildOutcome>> {
        self.inner.group_outcomes(group).await
    }
    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> SyResult<BTreeMap<String, Value>> {
        self.inner.step_results(task_id, names).await
    }
    async fn cancel_task(&self, id: TaskId, cascade: bool) -> SyResult<bool> {
        self.inner.cancel_task(id, cascade).await
    }
    async fn retry_task(&self, id: TaskId) -> SyResult<()> {
        self.inner.retry_task(id).await
    }
    async fn cleanup(&self, finished_before: Millis, batch: usize) -> SyResult<u64> {
        self.inner.cleanup(finished_before, batch).await
    }
    async fn cleanup_events(&self, created_before: Millis, batch: usize) -> SyResult<u64> {
        self.inner.cleanup_events(created_before, batch).await
    }
    async fn task_counts(&self) -> SyResult<Vec<switchyard::TaskCount>> {
        self.inner.task_counts().await
    }
    async fn finished_buckets(
        &self,
        since: Millis,
        bucket_ms: i64,
    ) -> SyResult<Vec<switchyard::FinishedBucket>> {
        self.inner.finished_buckets(since, bucket_ms).await
    }
    async fn failure_groups(&self, limit: usize) -> SyResult<Vec<switchyard::FailureGroup>> {
        self.inner.failure_groups(limit).await
    }
    async fn get_task(&self, id: TaskId) -> SyResult<Option<TaskRecord>> {
        self.inner.get_task(id).await
    }
    async fn task_detail(&self, id: TaskId) -> SyResult<Option<TaskDetail>> {
        self.inner.task_detail(id).await
    }
    async fn list_tasks(&self, filter: &TaskFilter) -> SyResult<Vec<TaskRecord>> {
        self.inner.list_tasks(filter).await
    }
    async fn list_hosts(&self) -> SyResult<Vec<HostInfo>> {
        self.inner.list_hosts().await
    }

    async fn ended_hosts(&self, since: Millis) -> SyResult<Vec<HostInfo>> {
        self.inner.ended_hosts(since).await
    }
    async fn count_steps(&self) -> SyResult<StateCounts> {
        self.inner.count_steps().await
    }
}
