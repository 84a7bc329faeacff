//! A host whose store records outcomes slower than its handlers produce
//! them stops claiming: its claimed steps without a recorded outcome stay
//! bounded (twice the larger of its concurrency and claim batch) instead of
//! growing for as long as the store lags. Without the bound, every
//! heartbeat renewed the lease of every step in the backlog; on PostgreSQL
//! that held up the completions behind it and a 300,000-step run fell from
//! ~30,000 to ~1,700 steps/s.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard::{
    open, ClaimBatch, Client, Completion, DynStore, EventRecord, HandlerOptions, HeartbeatReply,
    HostInfo, Lease, Millis, NewTask, Result, Signals, Spawned, StateCounts, Store, TaskDetail,
    TaskFilter, TaskId, TaskRecord, TaskState, Worker,
};
use tokio::sync::Semaphore;

use common::Tally;

/// A memory store whose `complete` waits for a permit, counting the steps
/// it hands out.
struct Gated {
    inner: DynStore,
    gate: Semaphore,
    /// Steps handed out by `claim`.
    claimed: Arc<Tally>,
    /// Calls of `complete`.
    completing: Arc<Tally>,
}

#[async_trait]
impl Store for Gated {
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
    async fn now(&self) -> Result<Millis> {
        self.inner.now().await
    }
    async fn migrate(&self) -> Result<u32> {
        self.inner.migrate().await
    }
    async fn spawn(&self, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        self.inner.spawn(tasks).await
    }
    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<ClaimBatch> {
        let batch = self.inner.claim(host_id, wants, lease_ms).await?;
        for _ in &batch.steps {
            self.claimed.bump();
        }
        Ok(batch)
    }
    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>> {
        self.completing.bump();
        let permit = self.gate.acquire().await.expect("gate open");
        permit.forget();
        self.inner.complete(completions).await
    }
    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[switchyard::RunRef],
        lease_ms: i64,
    ) -> Result<HeartbeatReply> {
        self.inner.heartbeat(host, running, lease_ms).await
    }
    async fn deregister_host(&self, host_id: &str) -> Result<()> {
        self.inner.deregister_host(host_id).await
    }
    async fn recover_expired(&self) -> Result<u64> {
        self.inner.recover_expired().await
    }
    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> Result<()> {
        self.inner.put_checkpoint(lease, key, value, lease_ms).await
    }
    async fn checkpoints(&self, task_id: TaskId) -> Result<BTreeMap<String, Value>> {
        self.inner.checkpoints(task_id).await
    }
    async fn emit_event(&self, name: &str, payload: Value) -> Result<bool> {
        self.inner.emit_event(name, payload).await
    }
    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> Result<bool> {
        self.inner.emit_event_fenced(fence, name, payload).await
    }
    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        self.inner.spawn_fenced(fence, tasks).await
    }
    async fn get_event(&self, name: &str) -> Result<Option<EventRecord>> {
        self.inner.get_event(name).await
    }
    async fn list_events(&self, limit: usize) -> Result<Vec<EventRecord>> {
        self.inner.list_events(limit).await
    }
    async fn group_outcomes(&self, group: &str) -> Result<Vec<switchyard::ChildOutcome>> {
        self.inner.group_outcomes(group).await
    }
    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> Result<BTreeMap<String, Value>> {
        self.inner.step_results(task_id, names).await
    }
    async fn cancel_task(&self, id: TaskId, cascade: bool) -> Result<bool> {
        self.inner.cancel_task(id, cascade).await
    }
    async fn retry_task(&self, id: TaskId) -> Result<()> {
        self.inner.retry_task(id).await
    }
    async fn cleanup(&self, finished_before: Millis, batch: usize) -> Result<u64> {
        self.inner.cleanup(finished_before, batch).await
    }
    async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        self.inner.get_task(id).await
    }
    async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        self.inner.task_detail(id).await
    }
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        self.inner.list_tasks(filter).await
    }
    async fn list_hosts(&self) -> Result<Vec<HostInfo>> {
        self.inner.list_hosts().await
    }
    async fn count_steps(&self) -> Result<StateCounts> {
        self.inner.count_steps().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stop_while_outcomes_wait_to_be_recorded() {
    const CONCURRENCY: usize = 4;
    const OUTSTANDING: usize = 2 * CONCURRENCY;
    const TASKS: usize = 40;
    let gated = Arc::new(Gated {
        inner: open("memory").await.unwrap(),
        gate: Semaphore::new(0),
        claimed: Tally::new(),
        completing: Tally::new(),
    });
    let store: DynStore = gated.clone();
    let client = Client::new(store.clone());
    let ids: Vec<TaskId> = client
        .spawn_many(
            (0..TASKS)
                .map(|i| NewTask::new("quick", json!(i)))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.task_id)
        .collect();
    let worker = Worker::builder(store.clone())
        .concurrency(CONCURRENCY)
        .claim_batch(CONCURRENCY)
        .step("quick", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    // The first outcomes reach the store and stay there; the host keeps
    // claiming only until OUTSTANDING steps lack a recorded outcome.
    // (Each wait fails the test after common::WAIT.)
    gated.completing.reach(1).await;
    gated.claimed.reach(OUTSTANDING).await;
    // Showing that something does not happen takes a wait: wake the claimer
    // repeatedly (as new work would) and check it still holds back.
    for _ in 0..20 {
        store.signals().notify_ready();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        gated.claimed.get(),
        OUTSTANDING,
        "the host claimed more steps while {OUTSTANDING} outcomes waited to be recorded"
    );

    // Once the store records again, everything finishes.
    gated.gate.add_permits(10_000);
    for id in ids {
        let task = client.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(task.state, TaskState::Completed);
    }
    assert_eq!(gated.claimed.get(), TASKS);
    worker.stop().await;
}
