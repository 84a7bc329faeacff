//! A poison outcome fails only itself, and a failing store cannot hold up
//! shutdown (issue item 4). A wrapper store injects the failures into
//! `complete`: a non-transient refusal of any batch holding one particular
//! outcome (validation in the core now stops the real poison, NUL and
//! over-long names, before it reaches a store), or a transient failure of
//! every batch.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard::{
    open, ClaimBatch, Client, Completion, DynStore, Error, ErrorKind, EventRecord, HandlerOptions,
    HeartbeatReply, HostInfo, Lease, Millis, NewTask, Resolution, Result, Signals, Spawned,
    StateCounts, StepState, Store, TaskDetail, TaskFilter, TaskId, TaskRecord, TaskState, Worker,
};
use tokio::sync::Semaphore;

use common::{eventually, Tally};

type Fault = Box<dyn Fn(&[Completion]) -> Option<Error> + Send + Sync>;

/// A memory store whose `complete` waits for a permit of `gate`, then
/// fails with what `fault` returns for the batch (if anything).
struct Faulty {
    inner: DynStore,
    gate: Semaphore,
    fault: Fault,
    /// Calls of `complete`.
    completing: Arc<Tally>,
    /// Batches of more than one outcome that `fault` refused.
    refused_batches: Arc<Tally>,
}

impl Faulty {
    async fn new(permits: usize, fault: Fault) -> Arc<Self> {
        Arc::new(Self {
            inner: open("memory").await.unwrap(),
            gate: Semaphore::new(permits),
            fault,
            completing: Tally::new(),
            refused_batches: Tally::new(),
        })
    }
}

#[async_trait]
impl Store for Faulty {
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
        self.inner.claim(host_id, wants, lease_ms).await
    }
    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>> {
        self.completing.bump();
        let permit = self.gate.acquire().await.expect("gate open");
        permit.forget();
        if let Some(e) = (self.fault)(&completions) {
            if completions.len() > 1 {
                self.refused_batches.bump();
            }
            return Err(e);
        }
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

/// The outcome the wrapper refuses: a step completing with this value.
const POISON: &str = "poison";

/// A batch holding an outcome the store refuses outright (not a transient
/// error) is split until that outcome is alone; it fails its step with the
/// store's reason and every other outcome of the batch is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_outcome_fails_only_its_step() {
    let faulty = Faulty::new(
        0,
        Box::new(|batch: &[Completion]| {
            batch
                .iter()
                .any(|c| c.resolution == Resolution::Completed(json!(POISON)))
                .then(|| Error::InvalidInput("simulated: the store cannot hold this value".into()))
        }),
    )
    .await;
    let store: DynStore = faulty.clone();
    let client = Client::new(store.clone());
    // Steps `early` finish first, then the poison one, then `late` ones, so
    // that the poison outcome shares a batch whichever way the completer
    // cuts them.
    let early_done = Tally::new();
    let poison_done = Tally::new();
    let (early, late) = (5, 3);
    let (e, p) = (early_done.clone(), poison_done.clone());
    let worker = Worker::builder(store.clone())
        .shutdown_grace(Duration::from_millis(200))
        .step("echo", HandlerOptions::default(), move |input, _| {
            let (e, p) = (e.clone(), p.clone());
            async move {
                match input["kind"].as_str().unwrap() {
                    "early" => {
                        e.bump();
                    }
                    "poison" => {
                        e.reach(early).await;
                        p.bump();
                    }
                    _ => {
                        p.reach(1).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(input["value"].clone())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let spawn =
        |kind: &str, value: Value| NewTask::new("echo", json!({ "kind": kind, "value": value }));
    let mut tasks = Vec::new();
    for i in 0..early {
        tasks.push(spawn("early", json!(i)));
    }
    tasks.push(spawn("poison", json!(POISON)));
    for i in 0..late {
        tasks.push(spawn("late", json!(100 + i)));
    }
    let ids: Vec<TaskId> = client
        .spawn_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.task_id)
        .collect();
    // Hold the first write until every outcome has reached the completer.
    faulty.completing.reach(1).await;
    eventually("every handler to return", || async {
        (worker.inflight() == 0).then_some(())
    })
    .await;
    faulty.gate.add_permits(10_000);
    for (i, id) in ids.iter().enumerate() {
        let t = client.wait(*id, Duration::from_secs(10)).await.unwrap();
        if i == early {
            assert_eq!(t.state, TaskState::Failed);
            let e = t.error.unwrap();
            assert_eq!(e.kind, ErrorKind::InvalidInput);
            assert!(
                e.message
                    .contains("simulated: the store cannot hold this value"),
                "{}",
                e.message
            );
        } else {
            assert_eq!(t.state, TaskState::Completed, "task #{i}: {:?}", t.error);
        }
    }
    assert!(
        faulty.refused_batches.get() >= 1,
        "the poison outcome was never refused together with others"
    );
    tokio::time::timeout(Duration::from_secs(60), worker.stop())
        .await
        .expect("stop() returned");
}

/// With a store whose every `complete` fails transiently, `stop()` still
/// returns: after the grace period the host retries recording for at most
/// `shutdown_flush`, then drops the outcomes (their steps stay `running`
/// until their leases expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_when_the_store_never_records() {
    let faulty = Faulty::new(
        usize::MAX >> 4,
        Box::new(|_: &[Completion]| Some(Error::Store("simulated: connection refused".into()))),
    )
    .await;
    let store: DynStore = faulty.clone();
    let client = Client::new(store.clone());
    let ran = Tally::new();
    let r = ran.clone();
    let worker = Worker::builder(store.clone())
        .shutdown_grace(Duration::from_secs(1))
        .shutdown_flush(Duration::from_secs(2))
        .step("quick", HandlerOptions::default(), move |input, _| {
            let r = r.clone();
            async move {
                r.bump();
                Ok(input)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = client.spawn("quick", json!(1)).await.unwrap();
    ran.reach(1).await;
    faulty.completing.reach(2).await;
    // Generous: the bound is 1 s grace + 2 s flush + about a second.
    tokio::time::timeout(Duration::from_secs(60), worker.stop())
        .await
        .expect("stop() did not return with a store that never records");
    let d = client.inspect(id).await.unwrap();
    assert_eq!(
        d.steps[0].state,
        StepState::Running,
        "the outcome was not recorded"
    );
}
