//! The store contract suite: the rules of [`switchyard_core::Store`] as
//! executable tests, run unchanged against every store (memory, SQLite and,
//! later, PostgreSQL).
//!
//! Each public `async fn` below checks one rule (or a small group of related
//! rules) of the trait docs in `switchyard_core::store`; its doc comment says
//! which. It takes a [`Factory`] that opens a fresh, empty store driven by a
//! [`FakeClock`]. Time-based rules are tested by advancing that clock, never by
//! sleeping; wake-ups are checked with [`tokio::sync::Notify`] (enabled before
//! the call) and a short timeout.
//!
//! A store plugs in with one line in its integration tests:
//!
//! ```ignore
//! switchyard_store::contract_suite!(memory, my_memory_factory());
//! ```
//!
//! which expands to a module `memory` with one `#[tokio::test]` per rule. The
//! test crate needs `tokio` (features `macros` and `rt-multi-thread`).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_core::{
    ClaimBatch, ClaimedStep, Clock, Completion, DynStore, Error, ErrorInfo, ErrorKind, EventRecord,
    FakeClock, HeartbeatReply, HostInfo, Lease, Millis, NewStep, NewTask, ParentRef, Resolution,
    Result, RunRef, StepId, StepRecord, StepState, TaskDetail, TaskFilter, TaskId, TaskRecord,
    TaskState, WaitFor,
};
use tokio::sync::{broadcast, Notify};

/// A boxed, sendable future (what a [`Factory`] returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Opens a fresh, empty store whose clock is the given fake clock (pass it
/// as [`crate::StoreOptions::clock`]).
pub type Factory = Arc<dyn Fn(Arc<FakeClock>) -> BoxFuture<Opened> + Send + Sync>;

/// A store opened for one contract test, with whatever must outlive it (for
/// example the `tempfile::TempDir` holding a SQLite file).
pub struct Opened {
    /// The store under test.
    pub store: DynStore,
    guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Opened {
    /// A store that needs nothing kept alive.
    pub fn new(store: DynStore) -> Self {
        Self { store, guard: None }
    }

    /// A store with a guard dropped after the store, when the test ends.
    pub fn with_guard(store: DynStore, guard: impl Any + Send + Sync) -> Self {
        Self {
            store,
            guard: Some(Box::new(guard)),
        }
    }
}

/// Builds a [`Factory`] from an async closure-like function.
pub fn factory<F, Fut>(open: F) -> Factory
where
    F: Fn(Arc<FakeClock>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Opened> + Send + 'static,
{
    Arc::new(move |clock| Box::pin(open(clock)) as BoxFuture<Opened>)
}

/// Upper bound for one contract test: a store call that hangs fails the test
/// instead of hanging the suite.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a test waits for a signal ([`switchyard_core::Signals`]) that
/// must have been given.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one contract test under [`TEST_TIMEOUT`] (used by [`contract_suite!`]).
pub async fn run(test: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_TIMEOUT, test).await.is_err() {
        panic!("contract test did not finish within {TEST_TIMEOUT:?} (a store call hung?)");
    }
}

/// Expands to a module `$name` with one `#[tokio::test]` per contract rule,
/// each opening stores with the [`contract::Factory`](crate::contract::Factory)
/// expression `$factory` (evaluated once per test; items of the calling
/// module are in scope).
#[macro_export]
macro_rules! contract_suite {
    ($name:ident, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> $crate::contract::Factory {
                $factory
            }

            $crate::__contract_tests! {
                factory;
                store_clock_and_migrate,
                spawn_creates_task_and_root_step,
                spawn_answers_in_input_order,
                spawn_idempotency_key,
                spawn_idempotency_within_one_batch,
                spawn_and_complete_a_large_batch,
                spawn_future_run_at_not_claimed_until_due,
                spawn_notifies_ready,
                claim_only_requested_handlers,
                claim_respects_per_handler_limits,
                claim_orders_by_priority_run_at_creation,
                claim_sets_lease_fields,
                claim_reports_next_due,
                attempt_increments_per_claim,
                complete_final_step_completes_task,
                completed_unblocks_dependants_when_all_deps_done,
                complete_batch_applies_items_in_order,
                decided_creates_steps_atomically,
                decided_keeps_routes_and_status,
                decided_invalid_items_change_nothing,
                decided_final_step_semantics,
                retry_ready_at_run_at_with_error,
                failed_fails_task_and_cancels_other_steps,
                suspended_on_event_until_emitted,
                suspended_with_satisfied_wait_is_ready,
                suspended_wake_at_claimable_after_clock,
                released_returns_step_without_cost,
                stale_completions_are_rejected,
                heartbeat_extends_leases_and_reports_lost,
                recover_expired_makes_steps_ready,
                checkpoint_requires_current_lease_and_extends_it,
                checkpoint_overwrite_rules,
                runs_grow_and_suspensions_cost_no_attempt,
                same_host_reclaim_fences_the_old_run,
                cancelled_runs_cannot_write,
                expire_host_recovers_only_that_hosts_steps,
                cancelled_steps_lists_cancelled_ones,
                emit_event_first_write_wins,
                emit_event_wakes_every_waiter,
                delegation_group_outcomes_and_parent_wake,
                group_already_finished_wakes_at_once,
                response_event_on_finish,
                cancel_task_cancels_steps,
                cancel_task_cascade,
                retry_task_reruns_unfinished_steps,
                retry_task_conflicts,
                list_tasks_filters_and_orders,
                list_tasks_combined_filters_and_cursor,
                list_events_by_prefix,
                handler_stats_counts_and_oldest_ready,
                task_counts_buckets_and_failure_groups,
                list_tasks_default_limit,
                hosts_list_and_deregister,
                count_steps_by_state,
                step_results_named_completed,
                cleanup_removes_old_finished_tasks,
                cleanup_keeps_children_of_unfinished_parents,
                cleanup_batches_and_frees_idempotency_keys,
                cleanup_events_deletes_old_events_and_frees_their_names,
            }
        }
    };
}

/// Implementation detail of [`contract_suite!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __contract_tests {
    ($factory:ident; $($test:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::contract::run($crate::contract::$test($factory())).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The host most tests lease steps as.
const HOST: &str = "host-a";
/// Another host.
const HOST_B: &str = "host-b";
/// Default lease length.
const LEASE_MS: i64 = 30_000;
/// Where the fake clock starts (a fixed time keeps failures readable).
const START: Millis = 1_700_000_000_000;

struct H {
    // Field order matters: the store is dropped before its guard.
    store: DynStore,
    clock: Arc<FakeClock>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl H {
    async fn open(factory: &Factory) -> Self {
        let clock = Arc::new(FakeClock::new());
        clock.set(START);
        let opened = factory(clock.clone()).await;
        Self {
            store: opened.store,
            clock,
            _guard: opened.guard,
        }
    }

    fn now(&self) -> Millis {
        self.clock.now()
    }

    fn advance(&self, ms: Millis) {
        self.clock.advance(ms);
    }

    async fn spawn(&self, task: NewTask) -> TaskId {
        let out = self.store.spawn(vec![task]).await.expect("spawn");
        assert_eq!(out.len(), 1, "spawn answers one item per task");
        assert!(
            out[0].created,
            "a task without a known idempotency key is created"
        );
        out[0].task_id
    }

    async fn spawn_handler(&self, handler: &str) -> TaskId {
        self.spawn(NewTask::new(handler, json!({ "for": handler })))
            .await
    }

    async fn spawn_child(
        &self,
        handler: &str,
        parent: &ClaimedStep,
        group: Option<&str>,
        index: u32,
    ) -> TaskId {
        self.spawn(child_task(
            handler,
            json!({ "index": index }),
            parent,
            group,
            index,
        ))
        .await
    }

    async fn claim_batch(&self, host: &str, wants: &[(&str, usize)], lease_ms: i64) -> ClaimBatch {
        let wants: Vec<(String, usize)> = wants.iter().map(|(h, n)| (h.to_string(), *n)).collect();
        let batch = self
            .store
            .claim(host, &wants, lease_ms)
            .await
            .expect("claim");
        for step in &batch.steps {
            assert!(
                wants.iter().any(|(h, _)| h == &step.handler),
                "claim returned a step of handler `{}` that was not asked for",
                step.handler
            );
        }
        for (handler, n) in &wants {
            let got = batch.steps.iter().filter(|s| &s.handler == handler).count();
            assert!(
                got <= *n,
                "claim returned {got} `{handler}` steps, more than the {n} asked for"
            );
        }
        batch
    }

    async fn claim(&self, handler: &str, n: usize) -> Vec<ClaimedStep> {
        self.claim_batch(HOST, &[(handler, n)], LEASE_MS)
            .await
            .steps
    }

    async fn claim_one(&self, handler: &str) -> ClaimedStep {
        let mut steps = self.claim(handler, 1).await;
        assert_eq!(
            steps.len(),
            1,
            "expected exactly one ready `{handler}` step to claim"
        );
        steps.remove(0)
    }

    async fn claim_none(&self, handler: &str) {
        let steps = self.claim(handler, 100).await;
        assert!(
            steps.is_empty(),
            "expected no claimable `{handler}` step, got {steps:#?}"
        );
    }

    async fn complete(&self, lease: Lease, resolution: Resolution) -> Result<()> {
        let mut out = self
            .store
            .complete(vec![Completion { lease, resolution }])
            .await
            .expect("complete (whole batch)");
        assert_eq!(out.len(), 1, "complete answers one item per completion");
        out.remove(0)
    }

    async fn resolve(&self, step: &ClaimedStep, resolution: Resolution) {
        if let Err(e) = self.complete(lease(step, HOST), resolution).await {
            panic!(
                "completing step `{}` with its current lease failed: {e}",
                step.name
            );
        }
    }

    async fn decide(
        &self,
        step: &ClaimedStep,
        steps: Vec<NewStep>,
        final_step: Option<&str>,
        result: Value,
    ) {
        let resolution = Resolution::Decided {
            steps,
            final_step: final_step.map(str::to_string),
            result,
            status: None,
        };
        self.resolve(step, resolution).await;
    }

    async fn suspend(&self, step: &ClaimedStep, wait: WaitFor) {
        self.resolve(step, Resolution::Suspended(wait)).await;
    }

    async fn put_checkpoint(&self, step: &ClaimedStep, key: &str, value: Value) -> Result<()> {
        self.store
            .put_checkpoint(&lease(step, HOST), key, value, LEASE_MS)
            .await
    }

    async fn task(&self, id: TaskId) -> TaskRecord {
        self.store
            .get_task(id)
            .await
            .expect("get_task")
            .unwrap_or_else(|| panic!("task {id} not found"))
    }

    async fn detail(&self, id: TaskId) -> TaskDetail {
        self.store
            .task_detail(id)
            .await
            .expect("task_detail")
            .unwrap_or_else(|| panic!("task {id} not found"))
    }

    async fn step(&self, task: TaskId, name: &str) -> StepRecord {
        let detail = self.detail(task).await;
        detail
            .steps
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("task {task} has no step named `{name}`"))
    }

    async fn step_state(&self, task: TaskId, name: &str) -> StepState {
        self.step(task, name).await.state
    }

    async fn emit(&self, name: &str, payload: Value) -> bool {
        self.store
            .emit_event(name, payload)
            .await
            .expect("emit_event")
    }

    /// The steps of the lost runs.
    async fn heartbeat(&self, host: &str, running: &[RunRef], lease_ms: i64) -> BTreeSet<StepId> {
        self.heartbeat_reply(host, running, lease_ms)
            .await
            .lost
            .into_iter()
            .map(|r| r.step_id)
            .collect()
    }

    async fn heartbeat_reply(
        &self,
        host: &str,
        running: &[RunRef],
        lease_ms: i64,
    ) -> HeartbeatReply {
        self.store
            .heartbeat(&host_info(host, self.now()), running, lease_ms)
            .await
            .expect("heartbeat")
    }
}

fn lease(step: &ClaimedStep, host: &str) -> Lease {
    Lease {
        step_id: step.step_id,
        task_id: step.task_id,
        attempt: step.attempt,
        run: step.run,
        host_id: host.to_string(),
    }
}

fn run_of(step: &ClaimedStep) -> RunRef {
    RunRef {
        step_id: step.step_id,
        run: step.run,
    }
}

fn new_step(name: &str, handler: &str, depends_on: &[&str]) -> NewStep {
    NewStep {
        name: name.to_string(),
        handler: handler.to_string(),
        input: json!({ "step": name }),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
        routes: Default::default(),
    }
}

fn child_task(
    handler: &str,
    input: Value,
    parent: &ClaimedStep,
    group: Option<&str>,
    index: u32,
) -> NewTask {
    let mut task = NewTask::new(handler, input);
    task.parent = Some(ParentRef {
        task_id: parent.task_id,
        step_id: parent.step_id,
        group: group.map(str::to_string),
        index,
    });
    task
}

fn host_info(id: &str, now: Millis) -> HostInfo {
    HostInfo {
        id: id.to_string(),
        pid: 4242,
        hostname: "box-1".to_string(),
        name: (id == "host-1").then(|| "orders-1".to_string()),
        handlers: vec!["alpha".to_string(), "beta".to_string()],
        started_at: now,
        last_heartbeat: 0,
        language: (id == "host-1").then(|| "python".to_string()),
        slots: (id == "host-1").then_some(8),
        ended_at: None,
        end_reason: None,
    }
}

fn wait_event(name: &str) -> WaitFor {
    WaitFor {
        event: Some(name.to_string()),
        ..WaitFor::default()
    }
}

fn wait_until(at: Millis) -> WaitFor {
    WaitFor {
        wake_at: Some(at),
        ..WaitFor::default()
    }
}

fn wait_group(group: &str) -> WaitFor {
    WaitFor {
        group: Some(group.to_string()),
        ..WaitFor::default()
    }
}

fn find(steps: &[ClaimedStep], task: TaskId) -> ClaimedStep {
    steps
        .iter()
        .find(|s| s.task_id == task)
        .cloned()
        .unwrap_or_else(|| panic!("no claimed step of task {task} in {steps:#?}"))
}

fn find_named(steps: &[ClaimedStep], task: TaskId, name: &str) -> ClaimedStep {
    steps
        .iter()
        .find(|s| s.task_id == task && s.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no claimed step `{name}` of task {task} in {steps:#?}"))
}

#[track_caller]
fn assert_error(error: &Option<ErrorInfo>, kind: ErrorKind, message: &str) {
    match error {
        Some(e) => {
            assert_eq!(e.kind, kind, "error kind of {e:?}");
            assert_eq!(e.message, message, "error message of {e:?}");
        }
        None => panic!("expected a recorded {kind:?} error `{message}`, found none"),
    }
}

#[track_caller]
fn assert_lease_lost(result: &Result<()>, step: StepId, what: &str) {
    assert_eq!(result, &Err(Error::LeaseLost(step)), "{what}");
}

/// Runs `action` and asserts that `notify` was notified while it ran (the
/// waiter is registered before the call, so no wake-up can be missed).
async fn expect_signal<T>(notify: &Notify, what: &str, action: impl Future<Output = T>) -> T {
    let notified = notify.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let out = action.await;
    if tokio::time::timeout(SIGNAL_TIMEOUT, notified)
        .await
        .is_err()
    {
        panic!("{what}: the signal was not notified");
    }
    out
}

/// Collects what is announced on `signals().cancelled` and asserts it is
/// exactly `expected`.
async fn expect_announced(rx: &mut broadcast::Receiver<Vec<StepId>>, expected: &[StepId]) {
    let want: BTreeSet<StepId> = expected.iter().copied().collect();
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + SIGNAL_TIMEOUT;
    while !want.is_subset(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(batch)) => got.extend(batch),
            Ok(Err(e)) => panic!("signals().cancelled: {e}"),
            Err(_) => break,
        }
    }
    while let Ok(batch) = rx.try_recv() {
        got.extend(batch);
    }
    assert_eq!(got, want, "steps announced on signals().cancelled");
}

// ---------------------------------------------------------------------------
// The store itself
// ---------------------------------------------------------------------------

/// The store reads time from the clock it was opened with; `migrate` is
/// idempotent and reports a schema version; `kind` and `url` are set.
pub async fn store_clock_and_migrate(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(
        ["memory", "sqlite", "postgres"].contains(&h.store.kind()),
        "kind: {}",
        h.store.kind()
    );
    assert!(!h.store.url().is_empty(), "url must name the store");
    assert_eq!(
        h.store.now().await.unwrap(),
        START,
        "now() reads the store's clock"
    );
    h.advance(1_234);
    assert_eq!(
        h.store.now().await.unwrap(),
        START + 1_234,
        "now() follows the store's clock"
    );
    let v1 = h.store.migrate().await.expect("migrate");
    let v2 = h.store.migrate().await.expect("migrate again");
    assert_eq!(v1, v2, "migrating twice reports the same schema version");
}

// ---------------------------------------------------------------------------
// spawn
// ---------------------------------------------------------------------------

/// `spawn`: the task is `running` with its input, headers and priority, and
/// has one root step named after its handler, `ready` at now, attempt 0.
pub async fn spawn_creates_task_and_root_step(factory: Factory) {
    let h = H::open(&factory).await;
    let now = h.now();
    let input = json!({ "order": 42, "items": ["a", "b"] });
    let id = h
        .spawn(
            NewTask::new("ship", input.clone())
                .header("tenant", "acme")
                .priority(3)
                .response_event("shipped"),
        )
        .await;

    let task = h.task(id).await;
    assert_eq!(task.id, id);
    assert_eq!(task.handler, "ship");
    assert_eq!(task.input, input);
    assert_eq!(task.state, TaskState::Running);
    assert_eq!(task.result, None);
    assert_eq!(task.error, None);
    assert_eq!(task.headers.get("tenant").map(String::as_str), Some("acme"));
    assert_eq!(task.headers.len(), 1);
    assert_eq!(task.priority, 3);
    assert_eq!(task.idempotency_key, None);
    assert_eq!(task.response_event.as_deref(), Some("shipped"));
    assert_eq!(task.parent, None);
    assert_eq!(task.created_at, now);
    assert_eq!(task.updated_at, now);

    let detail = h.detail(id).await;
    assert_eq!(detail.task, task, "task_detail().task equals get_task()");
    assert_eq!(
        detail.steps.len(),
        1,
        "a new task has exactly its root step"
    );
    assert!(detail.checkpoints.is_empty());
    assert!(detail.children.is_empty());
    let root = &detail.steps[0];
    assert_eq!(root.task_id, id);
    assert_eq!(
        root.name, "ship",
        "the root step is named after its handler"
    );
    assert_eq!(root.handler, "ship");
    assert_eq!(root.input, input);
    assert_eq!(root.state, StepState::Ready);
    assert_eq!(root.attempt, 0);
    assert_eq!(root.priority, 3);
    assert_eq!(root.run_at, Some(now), "run_at defaults to now");
    assert_eq!(root.lease_owner, None);
    assert_eq!(root.lease_expires_at, None);
    assert_eq!(root.result, None);
    assert_eq!(root.error, None);
    assert!(root.depends_on.is_empty());
    assert_eq!(root.wait, None);
    assert_eq!(root.created_at, now);
}

/// `spawn` answers one item per task, in input order; an empty batch answers
/// nothing.
pub async fn spawn_answers_in_input_order(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(h.store.spawn(vec![]).await.expect("empty spawn").is_empty());
    let handlers = ["h0", "h1", "h2", "h3"];
    let tasks = handlers
        .iter()
        .map(|name| NewTask::new(*name, json!(name)))
        .collect();
    let out = h.store.spawn(tasks).await.expect("spawn");
    assert_eq!(out.len(), handlers.len());
    let distinct: BTreeSet<TaskId> = out.iter().map(|s| s.task_id).collect();
    assert_eq!(distinct.len(), handlers.len(), "each task gets its own id");
    for (spawned, handler) in out.iter().zip(handlers) {
        assert!(spawned.created);
        let task = h.task(spawned.task_id).await;
        assert_eq!(task.handler, handler, "answers are in input order");
        assert_eq!(task.input, json!(handler));
    }
}

/// `spawn` with a known idempotency key returns the existing task with
/// `created = false` and creates nothing; other keys create other tasks.
pub async fn spawn_idempotency_key(factory: Factory) {
    let h = H::open(&factory).await;
    let first = h
        .store
        .spawn(vec![
            NewTask::new("pay", json!(1)).idempotency_key("order-1")
        ])
        .await
        .unwrap();
    assert!(first[0].created);
    let first = first[0].task_id;

    let again = h
        .store
        .spawn(vec![
            NewTask::new("pay", json!(2)).idempotency_key("order-1")
        ])
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].task_id, first, "same key, same task");
    assert!(!again[0].created, "same key: not created");
    let task = h.task(first).await;
    assert_eq!(task.input, json!(1), "the first task is kept as it was");
    assert_eq!(task.idempotency_key.as_deref(), Some("order-1"));

    let other = h
        .spawn(NewTask::new("pay", json!(3)).idempotency_key("order-2"))
        .await;
    assert_ne!(other, first, "a different key makes a different task");

    let mixed = h
        .store
        .spawn(vec![
            NewTask::new("pay", json!(4)).idempotency_key("order-1"),
            NewTask::new("pay", json!(5)).idempotency_key("order-3"),
            NewTask::new("pay", json!(6)),
        ])
        .await
        .unwrap();
    assert_eq!(mixed.len(), 3);
    assert_eq!((mixed[0].task_id, mixed[0].created), (first, false));
    assert!(mixed[1].created && mixed[2].created);
    let all: BTreeSet<TaskId> = [first, other, mixed[1].task_id, mixed[2].task_id].into();
    assert_eq!(all.len(), 4);

    let listed = h.store.list_tasks(&TaskFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 4, "duplicates create no task");
    let counts = h.store.count_steps().await.unwrap();
    assert_eq!(
        counts.get("ready"),
        Some(&4),
        "duplicates create no step: {counts:?}"
    );
}

/// `spawn`: a key repeated inside one batch creates one task; the later item
/// is answered with the first's id and `created = false`.
pub async fn spawn_idempotency_within_one_batch(factory: Factory) {
    let h = H::open(&factory).await;
    let out = h
        .store
        .spawn(vec![
            NewTask::new("pay", json!(1)).idempotency_key("dup"),
            NewTask::new("pay", json!(2)).idempotency_key("dup"),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert!(out[0].created);
    assert_eq!(out[1].task_id, out[0].task_id);
    assert!(!out[1].created);
    assert_eq!(
        h.store
            .list_tasks(&TaskFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(h.task(out[0].task_id).await.input, json!(1));
}

/// A batch of many tasks (stores may insert them in chunks) with
/// idempotency keys, headers and priorities in between: every task is stored
/// as given, in input order, a repeated key answers with the first task, and
/// completing every root step in one batch completes every task.
pub async fn spawn_and_complete_a_large_batch(factory: Factory) {
    let h = H::open(&factory).await;
    let n = 150;
    let tasks = (0..n)
        .map(|i| {
            let t = NewTask::new("bulk", json!({ "i": i })).priority(i as i32 % 3);
            match i {
                40 | 120 => t.idempotency_key("same"),
                70 => t.header("trace", "t70"),
                _ => t,
            }
        })
        .collect();
    let out = h.store.spawn(tasks).await.expect("spawn");
    assert_eq!(out.len(), n);
    assert_eq!(out[120].task_id, out[40].task_id, "the repeated key");
    assert!(!out[120].created);
    let distinct: BTreeSet<TaskId> = out.iter().map(|s| s.task_id).collect();
    assert_eq!(distinct.len(), n - 1);
    for (i, spawned) in out.iter().enumerate().filter(|(i, _)| *i != 120) {
        assert!(spawned.created, "task {i}");
        let task = h.task(spawned.task_id).await;
        assert_eq!(task.input, json!({ "i": i }), "task {i}");
        assert_eq!(task.priority, i as i32 % 3, "task {i}");
        assert_eq!(task.state, TaskState::Running, "task {i}");
    }
    assert_eq!(
        h.task(out[70].task_id)
            .await
            .headers
            .get("trace")
            .map(String::as_str),
        Some("t70")
    );
    let claimed = h.claim("bulk", n).await;
    assert_eq!(claimed.len(), n - 1);
    let completions = claimed
        .iter()
        .map(|s| Completion {
            lease: lease(s, HOST),
            resolution: Resolution::Completed(json!({ "done": s.input["i"] })),
        })
        .collect();
    let results = h.store.complete(completions).await.expect("complete");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for (i, spawned) in out.iter().enumerate() {
        let task = h.task(spawned.task_id).await;
        assert_eq!(task.state, TaskState::Completed, "task {i}");
        let first = if i == 120 { 40 } else { i };
        assert_eq!(task.result, Some(json!({ "done": first })), "task {i}");
    }
}

/// `spawn` with a future `run_at`: the root step is `ready` at that time, not
/// claimed before the clock reaches it, and reported as `next_due`.
pub async fn spawn_future_run_at_not_claimed_until_due(factory: Factory) {
    let h = H::open(&factory).await;
    let t0 = h.now();
    let id = h
        .spawn(NewTask::new("later", json!(null)).run_at(t0 + 1_000))
        .await;
    let root = h.step(id, "later").await;
    assert_eq!(root.state, StepState::Ready);
    assert_eq!(root.run_at, Some(t0 + 1_000));

    let batch = h.claim_batch(HOST, &[("later", 10)], LEASE_MS).await;
    assert!(batch.steps.is_empty(), "not claimable before run_at");
    assert_eq!(batch.next_due, Some(t0 + 1_000));
    h.advance(999);
    let batch = h.claim_batch(HOST, &[("later", 10)], LEASE_MS).await;
    assert!(batch.steps.is_empty(), "not claimable 1 ms before run_at");
    assert_eq!(batch.next_due, Some(t0 + 1_000));
    h.advance(1);
    let step = h.claim_one("later").await;
    assert_eq!(step.task_id, id);
    assert_eq!(step.attempt, 1);
}

/// `spawn` notifies `signals().ready`.
pub async fn spawn_notifies_ready(factory: Factory) {
    let h = H::open(&factory).await;
    let signals = h.store.signals().clone();
    let out = expect_signal(
        &signals.ready,
        "ready on spawn",
        h.store.spawn(vec![NewTask::new("w", json!(1))]),
    )
    .await;
    assert!(out.expect("spawn")[0].created);
}

// ---------------------------------------------------------------------------
// claim
// ---------------------------------------------------------------------------

/// `claim` leases only steps of the handlers asked for.
pub async fn claim_only_requested_handlers(factory: Factory) {
    let h = H::open(&factory).await;
    let alpha = h.spawn_handler("alpha").await;
    let beta = h.spawn_handler("beta").await;
    let gamma = h.spawn_handler("gamma").await;
    assert!(
        h.claim_batch(HOST, &[], LEASE_MS).await.steps.is_empty(),
        "asking for nothing claims nothing"
    );
    let batch = h
        .claim_batch(HOST, &[("alpha", 10), ("gamma", 10)], LEASE_MS)
        .await;
    let got: BTreeSet<TaskId> = batch.steps.iter().map(|s| s.task_id).collect();
    assert_eq!(got, [alpha, gamma].into());
    let beta_root = h.step(beta, "beta").await;
    assert_eq!(beta_root.state, StepState::Ready);
    assert_eq!(beta_root.attempt, 0);
    h.claim_none("delta").await;
}

/// `claim` takes at most `n` steps per `(handler, n)` and never more than asked.
pub async fn claim_respects_per_handler_limits(factory: Factory) {
    let h = H::open(&factory).await;
    let tasks =
        ["alpha", "alpha", "alpha", "beta", "beta", "beta"].map(|n| NewTask::new(n, json!(null)));
    h.store.spawn(tasks.to_vec()).await.unwrap();
    let batch = h
        .claim_batch(HOST, &[("alpha", 2), ("beta", 1), ("gamma", 5)], LEASE_MS)
        .await;
    assert_eq!(
        batch.steps.iter().filter(|s| s.handler == "alpha").count(),
        2
    );
    assert_eq!(
        batch.steps.iter().filter(|s| s.handler == "beta").count(),
        1
    );
    assert_eq!(batch.steps.len(), 3);
    assert!(h.claim("alpha", 0).await.is_empty(), "n = 0 claims nothing");
    assert_eq!(
        h.claim("alpha", 5).await.len(),
        1,
        "one alpha step was left"
    );
    assert_eq!(
        h.claim("beta", 5).await.len(),
        2,
        "two beta steps were left"
    );
    h.claim_none("alpha").await;
    h.claim_none("beta").await;
}

/// `claim` picks and returns steps by highest priority, then earliest
/// `run_at`, then creation order.
pub async fn claim_orders_by_priority_run_at_creation(factory: Factory) {
    let h = H::open(&factory).await;
    let t = h.now();
    let mut names = BTreeMap::new();
    for (name, task) in [
        ("a", NewTask::new("ord", json!("a"))),
        ("b", NewTask::new("ord", json!("b")).priority(5)),
        ("c", NewTask::new("ord", json!("c")).run_at(t - 50)),
        ("d", NewTask::new("ord", json!("d"))),
        (
            "e",
            NewTask::new("ord", json!("e")).priority(5).run_at(t - 10),
        ),
        (
            "f",
            NewTask::new("ord", json!("f"))
                .priority(-1)
                .run_at(t - 1_000),
        ),
        ("g", NewTask::new("ord", json!("g"))),
    ] {
        names.insert(h.spawn(task).await, name);
    }
    let order =
        |steps: Vec<ClaimedStep>| steps.iter().map(|s| names[&s.task_id]).collect::<Vec<_>>();
    // Small claims check which steps are picked, the last one how they are returned.
    assert_eq!(
        order(h.claim("ord", 2).await),
        ["e", "b"],
        "the two best steps, best first"
    );
    assert_eq!(
        order(h.claim("ord", 1).await),
        ["c"],
        "earliest run_at among equal priority"
    );
    assert_eq!(
        order(h.claim("ord", 1).await),
        ["a"],
        "creation order among equal run_at"
    );
    assert_eq!(
        order(h.claim("ord", 10).await),
        ["d", "g", "f"],
        "the rest, in order"
    );

    // One claim for several handlers returns the whole batch in that order.
    h.spawn(NewTask::new("ord_low", json!(null)).run_at(t - 500))
        .await;
    h.spawn(NewTask::new("ord_high", json!(null)).priority(9))
        .await;
    let batch = h
        .claim_batch(HOST, &[("ord_low", 5), ("ord_high", 5)], LEASE_MS)
        .await;
    let handlers: Vec<&str> = batch.steps.iter().map(|s| s.handler.as_str()).collect();
    assert_eq!(
        handlers,
        ["ord_high", "ord_low"],
        "highest priority first across handlers"
    );
}

/// `claim`: state `running`, `attempt + 1`, `lease_owner = host_id`,
/// `lease_expires_at = now + lease_ms`; the claimed step carries the task's
/// input, headers and priority.
pub async fn claim_sets_lease_fields(factory: Factory) {
    let h = H::open(&factory).await;
    let input = json!({ "x": 1 });
    let id = h
        .spawn(
            NewTask::new("lease", input.clone())
                .header("k", "v")
                .priority(2),
        )
        .await;
    h.advance(5);
    let t = h.now();
    let batch = h.claim_batch(HOST, &[("lease", 1)], 12_345).await;
    assert_eq!(batch.steps.len(), 1);
    let s = &batch.steps[0];
    assert_eq!(s.task_id, id);
    assert_eq!(s.name, "lease");
    assert_eq!(s.handler, "lease");
    assert_eq!(s.input, input);
    assert_eq!(s.headers.get("k").map(String::as_str), Some("v"));
    assert_eq!(s.attempt, 1);
    assert_eq!(s.priority, 2);
    assert_eq!(s.lease_expires_at, t + 12_345);
    assert!(!s.has_dependencies);
    let rec = h.step(id, "lease").await;
    assert_eq!(rec.id, s.step_id);
    assert_eq!(rec.state, StepState::Running);
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.lease_owner.as_deref(), Some(HOST));
    assert_eq!(rec.lease_expires_at, Some(t + 12_345));
    assert!(
        h.claim_batch(HOST_B, &[("lease", 5)], LEASE_MS)
            .await
            .steps
            .is_empty(),
        "a running step is not claimed"
    );
}

/// `claim` reports as `next_due` the earliest future time at which a step of
/// a requested handler becomes due (scheduled spawn, retry backoff, sleep),
/// or `None`.
pub async fn claim_reports_next_due(factory: Factory) {
    let h = H::open(&factory).await;
    let t = h.now();
    h.spawn(NewTask::new("nd_a", json!(1)).run_at(t + 500))
        .await;
    h.spawn(NewTask::new("nd_a", json!(2)).run_at(t + 200))
        .await;
    h.spawn(NewTask::new("nd_b", json!(3)).run_at(t + 100))
        .await;
    assert_eq!(
        h.claim_batch(HOST, &[("nd_a", 5)], LEASE_MS).await.next_due,
        Some(t + 200)
    );
    assert_eq!(
        h.claim_batch(HOST, &[("nd_b", 5)], LEASE_MS).await.next_due,
        Some(t + 100)
    );
    assert_eq!(
        h.claim_batch(HOST, &[("nd_a", 5), ("nd_b", 5)], LEASE_MS)
            .await
            .next_due,
        Some(t + 100)
    );
    assert_eq!(
        h.claim_batch(HOST, &[("nd_c", 5)], LEASE_MS).await.next_due,
        None,
        "nothing scheduled"
    );

    h.spawn_handler("nd_s").await;
    let s = h.claim_one("nd_s").await;
    h.suspend(&s, wait_until(t + 50)).await;
    assert_eq!(
        h.claim_batch(HOST, &[("nd_s", 5)], LEASE_MS).await.next_due,
        Some(t + 50),
        "a sleep is due"
    );

    h.spawn_handler("nd_r").await;
    let r = h.claim_one("nd_r").await;
    let error = ErrorInfo::new(ErrorKind::Retryable, "later");
    h.resolve(
        &r,
        Resolution::Retry {
            error,
            run_at: t + 70,
        },
    )
    .await;
    assert_eq!(
        h.claim_batch(HOST, &[("nd_r", 5)], LEASE_MS).await.next_due,
        Some(t + 70),
        "a retry is due"
    );
}

/// Each claim of a step adds one to its attempt.
pub async fn attempt_increments_per_claim(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("att").await;
    for expected in 1..=3 {
        let s = h.claim_one("att").await;
        assert_eq!(s.attempt, expected);
        assert_eq!(h.step(id, "att").await.attempt, expected);
        let error = ErrorInfo::new(ErrorKind::Retryable, "again");
        h.resolve(
            &s,
            Resolution::Retry {
                error,
                run_at: h.now(),
            },
        )
        .await;
    }
}

// ---------------------------------------------------------------------------
// complete: Completed and dependencies
// ---------------------------------------------------------------------------

/// `Completed` on the final step: step `completed` with the result and lease
/// cleared; task `completed` with the result and `updated_at`; `finished`
/// notified.
pub async fn complete_final_step_completes_task(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("done").await;
    let s = h.claim_one("done").await;
    h.advance(250);
    let value = json!({ "ok": true, "n": 7 });
    let signals = h.store.signals().clone();
    expect_signal(
        &signals.finished,
        "finished on task completion",
        h.resolve(&s, Resolution::Completed(value.clone())),
    )
    .await;
    let rec = h.step(id, "done").await;
    assert_eq!(rec.state, StepState::Completed);
    assert_eq!(rec.result, Some(value.clone()));
    assert_eq!(rec.lease_owner, None, "lease cleared");
    assert_eq!(rec.lease_expires_at, None, "lease cleared");
    assert_eq!(rec.attempt, 1);
    let task = h.task(id).await;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result, Some(value));
    assert_eq!(task.error, None);
    assert_eq!(task.updated_at, h.now());
    h.claim_none("done").await;
}

/// `Completed` unblocks dependants of the same task only when all their
/// dependencies completed (`blocked` → `ready` at now), notifying `ready`.
pub async fn completed_unblocks_dependants_when_all_deps_done(factory: Factory) {
    let h = H::open(&factory).await;
    let plan = || {
        vec![
            new_step("a", "work", &[]),
            new_step("b", "work", &[]),
            new_step("c", "join", &["a", "b"]),
        ]
    };
    let t1 = h.spawn_handler("flow").await;
    let t2 = h.spawn_handler("flow").await;
    for root in h.claim("flow", 2).await {
        h.decide(&root, plan(), None, json!("planned")).await;
    }
    let c = h.step(t1, "c").await;
    assert_eq!(c.state, StepState::Blocked);
    assert_eq!(c.depends_on, ["a", "b"]);

    let work = h.claim("work", 10).await;
    assert_eq!(work.len(), 4);
    let (a1, b1) = (find_named(&work, t1, "a"), find_named(&work, t1, "b"));
    h.resolve(&a1, Resolution::Completed(json!("A"))).await;
    assert_eq!(
        h.step_state(t1, "c").await,
        StepState::Blocked,
        "one dependency left"
    );
    h.claim_none("join").await;

    h.advance(100);
    let signals = h.store.signals().clone();
    expect_signal(
        &signals.ready,
        "ready on dependency completed",
        h.resolve(&b1, Resolution::Completed(json!("B"))),
    )
    .await;
    let c = h.step(t1, "c").await;
    assert_eq!(c.state, StepState::Ready);
    assert_eq!(c.run_at, Some(h.now()));
    assert_eq!(
        h.step_state(t2, "c").await,
        StepState::Blocked,
        "another task's steps are not unblocked"
    );

    let join = h.claim_one("join").await;
    assert_eq!((join.task_id, join.name.as_str()), (t1, "c"));
    assert!(join.has_dependencies);
    assert_eq!(
        h.task(t1).await.state,
        TaskState::Running,
        "the final step (c) has not run yet"
    );
    h.resolve(&join, Resolution::Completed(json!("C"))).await;
    let task = h.task(t1).await;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result, Some(json!("C")));
}

/// `complete` answers one item per completion, applying them in order: two
/// dependencies completed in one batch unblock their dependant, and a second
/// completion of the same lease in the batch finds the step no longer running.
pub async fn complete_batch_applies_items_in_order(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(h
        .store
        .complete(vec![])
        .await
        .expect("empty batch")
        .is_empty());
    let id = h.spawn_handler("cb_root").await;
    let root = h.claim_one("cb_root").await;
    let plan = vec![
        new_step("a", "cb_work", &[]),
        new_step("b", "cb_work", &[]),
        new_step("c", "cb_join", &["a", "b"]),
    ];
    h.decide(&root, plan, None, json!(null)).await;
    let work = h.claim("cb_work", 2).await;
    let (a, b) = (find_named(&work, id, "a"), find_named(&work, id, "b"));
    let out = h
        .store
        .complete(vec![
            Completion {
                lease: lease(&a, HOST),
                resolution: Resolution::Completed(json!("A")),
            },
            Completion {
                lease: lease(&b, HOST),
                resolution: Resolution::Completed(json!("B")),
            },
            Completion {
                lease: lease(&a, HOST),
                resolution: Resolution::Completed(json!("A2")),
            },
        ])
        .await
        .expect("complete batch");
    assert_eq!(out, vec![Ok(()), Ok(()), Err(Error::LeaseLost(a.step_id))]);
    assert_eq!(
        h.step(id, "a").await.result,
        Some(json!("A")),
        "the first completion wins"
    );
    assert_eq!(h.step(id, "b").await.result, Some(json!("B")));
    assert_eq!(
        h.step_state(id, "c").await,
        StepState::Ready,
        "both dependencies completed"
    );
    assert_eq!(h.claim_one("cb_join").await.name, "c");
}

// ---------------------------------------------------------------------------
// complete: Decided
// ---------------------------------------------------------------------------

/// `Decided`: the step completes with `result`; the steps are created in
/// order, `blocked` or `ready` by their dependencies (which may name existing
/// steps), inheriting the task's priority; `ready` is notified.
pub async fn decided_creates_steps_atomically(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn(NewTask::new("plan", json!(null)).priority(7)).await;
    let root = h.claim_one("plan").await;
    h.advance(10);
    let plan = vec![
        new_step("x", "x_h", &[]),
        new_step("y", "y_h", &["x"]),
        new_step("z", "z_h", &[]),
    ];
    let signals = h.store.signals().clone();
    expect_signal(
        &signals.ready,
        "ready on decision",
        h.decide(&root, plan, None, json!("planned")),
    )
    .await;

    let detail = h.detail(id).await;
    let names: Vec<&str> = detail.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["plan", "x", "y", "z"], "steps in creation order");
    let by_name: BTreeMap<&str, &StepRecord> =
        detail.steps.iter().map(|s| (s.name.as_str(), s)).collect();
    let root_rec = by_name["plan"];
    assert_eq!(root_rec.state, StepState::Completed);
    assert_eq!(root_rec.result, Some(json!("planned")));
    assert_eq!(root_rec.lease_owner, None);
    for name in ["x", "y", "z"] {
        let s = by_name[name];
        assert_eq!(s.task_id, id);
        assert_eq!(s.handler, format!("{name}_h"));
        assert_eq!(s.input, json!({ "step": name }));
        assert_eq!(s.priority, 7, "created steps inherit the task's priority");
        assert_eq!(s.attempt, 0);
        assert_eq!(s.created_at, h.now());
    }
    assert_eq!(by_name["x"].state, StepState::Ready);
    assert_eq!(by_name["y"].state, StepState::Blocked);
    assert_eq!(by_name["y"].depends_on, ["x"]);
    assert_eq!(by_name["z"].state, StepState::Ready);
    assert_eq!(detail.task.state, TaskState::Running);

    let x = h.claim_one("x_h").await;
    assert_eq!(x.priority, 7);
    h.resolve(&x, Resolution::Completed(json!("X"))).await;
    let y = h.claim_one("y_h").await;
    // Dependencies may name existing steps: `x` is completed, `w` is new.
    let more = vec![
        new_step("w", "w_h", &["x"]),
        new_step("v", "v_h", &["x", "w"]),
    ];
    h.decide(&y, more, None, json!("y")).await;
    assert_eq!(
        h.step_state(id, "w").await,
        StepState::Ready,
        "depends only on a completed step"
    );
    assert_eq!(h.step_state(id, "v").await, StepState::Blocked);
    let w = h.claim_one("w_h").await;
    h.resolve(&w, Resolution::Completed(json!("W"))).await;
    assert_eq!(h.step_state(id, "v").await, StepState::Ready);
}

/// Routing: a created step's `routes` are stored, shown by `task_detail`
/// and handed back by `claim`; `Decided`'s `status` is recorded with the
/// completed step (and `None` leaves none).
pub async fn decided_keeps_routes_and_status(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn(NewTask::new("plan", json!(null))).await;
    let root = h.claim_one("plan").await;
    assert!(root.routes.is_empty(), "a spawned root step has no routes");
    let routed = NewStep::new("check", "check_h", json!(1))
        .route("ok", vec![new_step("ship", "ship_h", &["check"])])
        .route(
            "out_of_stock",
            vec![NewStep::new("wait", "wait_h", json!(2))
                .route("ok", vec![new_step("notify", "notify_h", &[])])],
        );
    h.decide(&root, vec![routed.clone()], None, json!("planned"))
        .await;
    let detail = h.detail(id).await;
    assert_eq!(
        detail.steps[0].status, None,
        "no status given: none recorded"
    );
    assert_eq!(
        detail.steps[1].routes, routed.routes,
        "routes read back whole"
    );

    let check = h.claim_one("check_h").await;
    assert_eq!(check.routes, routed.routes, "claim hands the routes over");
    let resolution = Resolution::Decided {
        steps: routed.routes["out_of_stock"].clone(),
        final_step: None,
        result: json!({ "missing": 3 }),
        status: Some("out_of_stock".into()),
    };
    h.resolve(&check, resolution).await;
    let detail = h.detail(id).await;
    let check = detail.steps.iter().find(|s| s.name == "check").unwrap();
    assert_eq!(check.status.as_deref(), Some("out_of_stock"));
    assert_eq!(check.result, Some(json!({ "missing": 3 })));
    let wait = h.claim_one("wait_h").await;
    assert_eq!(
        wait.routes.keys().collect::<Vec<_>>(),
        ["ok"],
        "a routed step's own routes are kept"
    );
}

/// `Decided` with a duplicate step name (within the decision or with an
/// existing step) or an unknown dependency: that item is answered
/// `InvalidInput` and nothing changes (the lease stays valid); the other
/// items of the batch still apply.
pub async fn decided_invalid_items_change_nothing(factory: Factory) {
    let h = H::open(&factory).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(h.spawn(NewTask::new("dv", json!(i))).await);
    }
    let claimed = h.claim("dv", 5).await;
    assert_eq!(claimed.len(), 5);
    let step = |i: usize| find(&claimed, tasks[i]);
    let decided = |steps: Vec<NewStep>| Resolution::Decided {
        steps,
        final_step: None,
        result: json!("d"),
        status: None,
    };
    let completions = vec![
        // 0: duplicate name inside the decision.
        Completion {
            lease: lease(&step(0), HOST),
            resolution: decided(vec![new_step("a", "dv_w", &[]), new_step("a", "dv_w", &[])]),
        },
        // 1: valid.
        Completion {
            lease: lease(&step(1), HOST),
            resolution: decided(vec![
                new_step("a", "dv_w", &[]),
                new_step("b", "dv_w", &["a"]),
            ]),
        },
        // 2: unknown dependency.
        Completion {
            lease: lease(&step(2), HOST),
            resolution: decided(vec![
                new_step("a", "dv_w", &[]),
                new_step("b", "dv_w", &["nope"]),
            ]),
        },
        // 3: duplicates the existing root step's name.
        Completion {
            lease: lease(&step(3), HOST),
            resolution: decided(vec![new_step("dv", "dv_w", &[])]),
        },
        // 4: valid plain completion after the invalid ones.
        Completion {
            lease: lease(&step(4), HOST),
            resolution: Resolution::Completed(json!("done")),
        },
    ];
    let out = h.store.complete(completions).await.expect("complete batch");
    assert_eq!(out.len(), 5);
    for i in [0, 2, 3] {
        assert!(
            matches!(out[i], Err(Error::InvalidInput(_))),
            "item {i}: expected InvalidInput, got {:?}",
            out[i]
        );
    }
    assert_eq!(out[1], Ok(()));
    assert_eq!(out[4], Ok(()));

    for i in [0, 2, 3] {
        let detail = h.detail(tasks[i]).await;
        assert_eq!(detail.steps.len(), 1, "task {i}: no step created");
        let root = &detail.steps[0];
        assert_eq!(
            root.state,
            StepState::Running,
            "task {i}: the deciding step is unchanged"
        );
        assert_eq!(root.attempt, 1);
        assert_eq!(root.lease_owner.as_deref(), Some(HOST));
        assert_eq!(root.result, None);
        assert_eq!(detail.task.state, TaskState::Running);
    }
    let valid = h.detail(tasks[1]).await;
    assert_eq!(valid.steps.len(), 3);
    assert_eq!(valid.steps[0].state, StepState::Completed);
    assert_eq!(h.task(tasks[4]).await.state, TaskState::Completed);
    assert_eq!(h.task(tasks[4]).await.result, Some(json!("done")));

    // Nothing changed, so the lease is still current.
    h.resolve(&step(0), Resolution::Completed(json!("fixed")))
        .await;
    assert_eq!(h.task(tasks[0]).await.result, Some(json!("fixed")));
}

/// `Decided` by the final step: `final_step = Some(name)` makes that created
/// step final; without it the last created step is final; with no steps the
/// task completes with `result`. A non-final step's decision never finishes
/// the task.
pub async fn decided_final_step_semantics(factory: Factory) {
    let h = H::open(&factory).await;

    // Explicit final step.
    let explicit = h.spawn_handler("fs_explicit").await;
    let root = h.claim_one("fs_explicit").await;
    let plan = vec![
        new_step("a", "fs_e_work", &[]),
        new_step("b", "fs_e_work", &[]),
    ];
    h.decide(&root, plan, Some("a"), json!("root")).await;
    assert_eq!(
        h.task(explicit).await.state,
        TaskState::Running,
        "a decision with steps does not finish the task"
    );
    let work = h.claim("fs_e_work", 2).await;
    h.resolve(
        &find_named(&work, explicit, "b"),
        Resolution::Completed(json!("B")),
    )
    .await;
    assert_eq!(
        h.task(explicit).await.state,
        TaskState::Running,
        "b is not the final step"
    );
    h.resolve(
        &find_named(&work, explicit, "a"),
        Resolution::Completed(json!("A")),
    )
    .await;
    let task = h.task(explicit).await;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result, Some(json!("A")));

    // Default: the last created step.
    let last = h.spawn_handler("fs_last").await;
    let root = h.claim_one("fs_last").await;
    let plan = vec![
        new_step("a", "fs_l_work", &[]),
        new_step("b", "fs_l_work", &[]),
    ];
    h.decide(&root, plan, None, json!("root")).await;
    let work = h.claim("fs_l_work", 2).await;
    h.resolve(
        &find_named(&work, last, "a"),
        Resolution::Completed(json!("A")),
    )
    .await;
    assert_eq!(
        h.task(last).await.state,
        TaskState::Running,
        "a is not the final step"
    );
    h.resolve(
        &find_named(&work, last, "b"),
        Resolution::Completed(json!("B")),
    )
    .await;
    let task = h.task(last).await;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result, Some(json!("B")));

    // No steps: the task completes with the decision's result.
    let empty = h.spawn_handler("fs_empty").await;
    let root = h.claim_one("fs_empty").await;
    h.decide(&root, vec![], None, json!({ "nothing": "to do" }))
        .await;
    let task = h.task(empty).await;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result, Some(json!({ "nothing": "to do" })));
    assert_eq!(
        h.step(empty, "fs_empty").await.result,
        Some(json!({ "nothing": "to do" }))
    );

    // Chained: the final step decides again, a non-final step decides nothing.
    let chain = h.spawn_handler("fs_chain").await;
    let root = h.claim_one("fs_chain").await;
    let plan = vec![new_step("a", "fs_c_a", &[]), new_step("b", "fs_c_b", &[])];
    h.decide(&root, plan, Some("a"), json!("root")).await;
    let b = h.claim_one("fs_c_b").await;
    h.decide(&b, vec![], None, json!("b")).await;
    assert_eq!(
        h.task(chain).await.state,
        TaskState::Running,
        "b is not final: its empty decision finishes nothing"
    );
    let a = h.claim_one("fs_c_a").await;
    h.decide(
        &a,
        vec![
            new_step("c1", "fs_c_c", &[]),
            new_step("c2", "fs_c_c", &["c1"]),
        ],
        None,
        json!("a"),
    )
    .await;
    assert_eq!(
        h.task(chain).await.state,
        TaskState::Running,
        "a handed the final role to c2"
    );
    let c1 = h.claim_one("fs_c_c").await;
    h.resolve(&c1, Resolution::Completed(json!("C1"))).await;
    assert_eq!(h.task(chain).await.state, TaskState::Running);
    let c2 = h.claim_one("fs_c_c").await;
    assert_eq!(c2.name, "c2");
    h.resolve(&c2, Resolution::Completed(json!("C2"))).await;
    let task = h.task(chain).await;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.result, Some(json!("C2")));
}

// ---------------------------------------------------------------------------
// complete: Retry, Failed, Suspended, Released
// ---------------------------------------------------------------------------

/// `Retry`: step `ready` at `run_at` with the error recorded and the lease
/// cleared; not claimable before `run_at`; `ready` is notified.
pub async fn retry_ready_at_run_at_with_error(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("rty").await;
    let s = h.claim_one("rty").await;
    let t = h.now();
    let mut error = ErrorInfo::new(ErrorKind::Retryable, "connection reset");
    error.attempt = 1;
    let signals = h.store.signals().clone();
    expect_signal(
        &signals.ready,
        "ready on retry",
        h.resolve(
            &s,
            Resolution::Retry {
                error: error.clone(),
                run_at: t + 1_000,
            },
        ),
    )
    .await;
    let rec = h.step(id, "rty").await;
    assert_eq!(rec.state, StepState::Ready);
    assert_eq!(rec.run_at, Some(t + 1_000));
    assert_error(&rec.error, ErrorKind::Retryable, "connection reset");
    assert_eq!(rec.lease_owner, None);
    assert_eq!(rec.lease_expires_at, None);
    assert_eq!(
        rec.attempt, 1,
        "the attempt is kept (the next claim adds one)"
    );
    assert_eq!(h.task(id).await.state, TaskState::Running);

    let batch = h.claim_batch(HOST, &[("rty", 5)], LEASE_MS).await;
    assert!(batch.steps.is_empty(), "not claimable before run_at");
    assert_eq!(batch.next_due, Some(t + 1_000));
    h.advance(999);
    h.claim_none("rty").await;
    h.advance(1);
    let again = h.claim_one("rty").await;
    assert_eq!(again.attempt, 2);
}

/// `Failed`: the step fails with the error, the task fails with it, every
/// other non-terminal step is cancelled, running ones are announced on
/// `signals().cancelled` and their completions rejected; `finished` notified.
pub async fn failed_fails_task_and_cancels_other_steps(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("f_root").await;
    let root = h.claim_one("f_root").await;
    let plan = vec![
        new_step("a", "f_work", &[]),
        new_step("b", "f_work", &[]),
        new_step("c", "f_work", &["a"]),
        new_step("d", "f_idle", &[]),
    ];
    h.decide(&root, plan, None, json!("root")).await;
    let work = h.claim("f_work", 10).await;
    assert_eq!(work.len(), 2, "a and b are ready, c is blocked");
    let (a, b) = (find_named(&work, id, "a"), find_named(&work, id, "b"));
    let mut rx = h.store.signals().cancelled.subscribe();
    h.advance(20);
    let signals = h.store.signals().clone();
    let error = ErrorInfo::new(ErrorKind::Permanent, "bad card");
    expect_signal(
        &signals.finished,
        "finished on task failure",
        h.resolve(&a, Resolution::Failed(error)),
    )
    .await;

    let task = h.task(id).await;
    assert_eq!(task.state, TaskState::Failed);
    assert_error(&task.error, ErrorKind::Permanent, "bad card");
    assert_eq!(task.result, None);
    assert_eq!(task.updated_at, h.now());
    let a_rec = h.step(id, "a").await;
    assert_eq!(a_rec.state, StepState::Failed);
    assert_error(&a_rec.error, ErrorKind::Permanent, "bad card");
    assert_eq!(
        h.step_state(id, "f_root").await,
        StepState::Completed,
        "terminal steps are kept"
    );
    for name in ["b", "c", "d"] {
        assert_eq!(
            h.step_state(id, name).await,
            StepState::Cancelled,
            "step {name}"
        );
    }
    expect_announced(&mut rx, &[b.step_id]).await;
    let late = h
        .complete(lease(&b, HOST), Resolution::Completed(json!("late")))
        .await;
    assert_lease_lost(&late, b.step_id, "completion of a cancelled sibling");
    assert_eq!(
        h.heartbeat(HOST, &[run_of(&b)], LEASE_MS).await,
        [b.step_id].into()
    );
    h.claim_none("f_work").await;
    h.claim_none("f_idle").await;
}

/// `Suspended` on an event: step `suspended` with the wait recorded, `run_at
/// = wake_at` (none), lease cleared; time alone does not wake it; emitting
/// the event makes it `ready` and notifies `ready`.
pub async fn suspended_on_event_until_emitted(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("waiter").await;
    let s = h.claim_one("waiter").await;
    let wait = wait_event("ev-1");
    h.suspend(&s, wait.clone()).await;
    let rec = h.step(id, "waiter").await;
    assert_eq!(rec.state, StepState::Suspended);
    assert_eq!(rec.wait, Some(wait));
    assert_eq!(rec.run_at, None, "run_at = wait.wake_at");
    assert_eq!(rec.lease_owner, None);
    assert_eq!(rec.lease_expires_at, None);
    assert_eq!(
        (rec.attempt, rec.run),
        (0, 1),
        "a suspension gives its attempt back"
    );
    h.claim_none("waiter").await;
    h.advance(86_400_000);
    h.claim_none("waiter").await;

    let signals = h.store.signals().clone();
    let stored = expect_signal(
        &signals.ready,
        "ready on event",
        h.emit("ev-1", json!({ "paid": true })),
    )
    .await;
    assert!(stored);
    assert_eq!(h.step_state(id, "waiter").await, StepState::Ready);
    let again = h.claim_one("waiter").await;
    assert_eq!((again.attempt, again.run), (1, 2));
    assert_eq!(h.task(id).await.state, TaskState::Running);
}

/// `Suspended` with a wait already satisfied (the event exists, `wake_at <=
/// now`, either of several conditions) makes the step `ready` at once.
pub async fn suspended_with_satisfied_wait_is_ready(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(h.emit("ev-here", json!(1)).await);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(h.spawn_handler("sat").await);
    }
    let steps = h.claim("sat", 4).await;
    assert_eq!(steps.len(), 4);
    let now = h.now();
    let waits = [
        wait_event("ev-here"),
        wait_until(now),
        wait_until(now - 1),
        WaitFor {
            event: Some("ev-missing".into()),
            wake_at: Some(now - 5),
            group: None,
        },
    ];
    for (task, wait) in tasks.iter().zip(waits) {
        h.suspend(&find(&steps, *task), wait.clone()).await;
        assert_eq!(
            h.step_state(*task, "sat").await,
            StepState::Ready,
            "already satisfied: {wait:?}"
        );
    }
    let again = h.claim("sat", 10).await;
    assert_eq!(again.len(), 4, "all four are claimable now");
    assert!(again.iter().all(|s| (s.attempt, s.run) == (1, 2)));
}

/// `Suspended` with a future `wake_at` (alone or with an event): `suspended`
/// with `run_at = wake_at`, reported as `next_due`, and claimed once the clock
/// passes it.
pub async fn suspended_wake_at_claimable_after_clock(factory: Factory) {
    let h = H::open(&factory).await;
    let sleeper = h.spawn_handler("sleeper").await;
    let awaiter = h.spawn_handler("awaiter").await;
    let t = h.now();
    let s = h.claim_one("sleeper").await;
    h.suspend(&s, wait_until(t + 5_000)).await;
    let a = h.claim_one("awaiter").await;
    h.suspend(
        &a,
        WaitFor {
            event: Some("never".into()),
            wake_at: Some(t + 8_000),
            group: None,
        },
    )
    .await;

    let rec = h.step(sleeper, "sleeper").await;
    assert_eq!(rec.state, StepState::Suspended);
    assert_eq!(rec.run_at, Some(t + 5_000));
    let batch = h.claim_batch(HOST, &[("sleeper", 5)], LEASE_MS).await;
    assert!(batch.steps.is_empty());
    assert_eq!(batch.next_due, Some(t + 5_000));
    h.advance(4_999);
    h.claim_none("sleeper").await;
    h.advance(1);
    let woke = h.claim_one("sleeper").await;
    assert_eq!((woke.task_id, woke.attempt, woke.run), (sleeper, 1, 2));

    h.advance(2_999);
    h.claim_none("awaiter").await;
    h.advance(1);
    let timed_out = h.claim_one("awaiter").await;
    assert_eq!(
        (timed_out.task_id, timed_out.attempt, timed_out.run),
        (awaiter, 1, 2)
    );
}

/// `Released`: step `ready` at now, lease cleared, attempt given back;
/// `ready` notified.
pub async fn released_returns_step_without_cost(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("rel").await;
    let s = h.claim_one("rel").await;
    assert_eq!(s.attempt, 1);
    h.advance(40);
    let signals = h.store.signals().clone();
    expect_signal(
        &signals.ready,
        "ready on release",
        h.resolve(&s, Resolution::Released),
    )
    .await;
    let rec = h.step(id, "rel").await;
    assert_eq!(rec.state, StepState::Ready);
    assert_eq!(rec.run_at, Some(h.now()));
    assert_eq!(rec.attempt, 0, "a release does not cost an attempt");
    assert_eq!(rec.lease_owner, None);
    assert_eq!(rec.lease_expires_at, None);
    let again = h.claim_one("rel").await;
    assert_eq!(again.attempt, 1);
}

/// A completion with the wrong host, the wrong attempt, or for a step that is
/// not running is answered `LeaseLost` and changes nothing; other items of
/// the batch still apply.
pub async fn stale_completions_are_rejected(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("stale").await;
    let s = h.claim_one("stale").await;
    let before = h.step(id, "stale").await;
    let done = || Resolution::Completed(json!("x"));

    let wrong_host = h.complete(lease(&s, HOST_B), done()).await;
    assert_lease_lost(&wrong_host, s.step_id, "wrong host");
    for run in [0, 2] {
        let bad = Lease {
            run,
            ..lease(&s, HOST)
        };
        assert_lease_lost(&h.complete(bad, done()).await, s.step_id, "wrong run");
    }
    let failed = h
        .complete(
            lease(&s, HOST_B),
            Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "x")),
        )
        .await;
    assert_lease_lost(&failed, s.step_id, "wrong host, failure");
    assert_eq!(
        h.step(id, "stale").await,
        before,
        "rejected completions change nothing"
    );
    assert_eq!(h.task(id).await.state, TaskState::Running);

    let out = h
        .store
        .complete(vec![
            Completion {
                lease: lease(&s, HOST_B),
                resolution: done(),
            },
            Completion {
                lease: lease(&s, HOST),
                resolution: Resolution::Completed(json!("right")),
            },
        ])
        .await
        .expect("complete batch");
    assert_eq!(out, vec![Err(Error::LeaseLost(s.step_id)), Ok(())]);
    let after = h.step(id, "stale").await;
    assert_eq!(after.result, Some(json!("right")));

    let twice = h.complete(lease(&s, HOST), done()).await;
    assert_lease_lost(&twice, s.step_id, "completing a completed step");
    assert_eq!(h.step(id, "stale").await, after);
    assert_eq!(h.task(id).await.result, Some(json!("right")));

    // A ready step (never claimed) and a suspended one are not running.
    let ready_task = h.spawn_handler("stale_ready").await;
    let ready = h.step(ready_task, "stale_ready").await;
    for run in [0, 1] {
        let bad = Lease {
            step_id: ready.id,
            task_id: ready_task,
            attempt: 0,
            run,
            host_id: HOST.into(),
        };
        assert_lease_lost(
            &h.complete(bad, done()).await,
            ready.id,
            "completing a ready step",
        );
    }
    assert_eq!(h.step(ready_task, "stale_ready").await, ready);

    let sus_task = h.spawn_handler("stale_sus").await;
    let sus = h.claim_one("stale_sus").await;
    h.suspend(&sus, wait_event("stale-ev")).await;
    let sus_before = h.step(sus_task, "stale_sus").await;
    assert_lease_lost(
        &h.complete(lease(&sus, HOST), done()).await,
        sus.step_id,
        "completing a suspended step",
    );
    assert_eq!(h.step(sus_task, "stale_sus").await, sus_before);
}

// ---------------------------------------------------------------------------
// Leases: heartbeat and recovery
// ---------------------------------------------------------------------------

/// `heartbeat` registers the host, extends the leases it still holds to now +
/// `lease_ms`, and reports as lost the steps it no longer holds (cancelled,
/// expired and taken over, or never its own) without touching them.
pub async fn heartbeat_extends_leases_and_reports_lost(factory: Factory) {
    let h = H::open(&factory).await;
    let t = h.now();
    let tasks = [
        h.spawn_handler("hb").await,
        h.spawn_handler("hb").await,
        h.spawn_handler("hb").await,
    ];
    let claimed = h.claim_batch(HOST, &[("hb", 3)], 1_000).await.steps;
    let [s1, s2, s3] = [0, 1, 2].map(|i| find(&claimed, tasks[i]));

    h.advance(500);
    let lost = h.heartbeat(HOST, &[run_of(&s1), run_of(&s2)], 1_000).await;
    assert!(lost.is_empty(), "nothing lost: {lost:?}");
    for (task, name) in [(tasks[0], "hb"), (tasks[1], "hb")] {
        let rec = h.step(task, name).await;
        assert_eq!(
            rec.lease_expires_at,
            Some(t + 1_500),
            "lease extended to now + lease_ms"
        );
        assert_eq!(rec.state, StepState::Running);
    }
    assert_eq!(
        h.step(tasks[2], "hb").await.lease_expires_at,
        Some(t + 1_000),
        "unlisted lease not extended"
    );
    let hosts = h.store.list_hosts().await.unwrap();
    let me = hosts
        .iter()
        .find(|x| x.id == HOST)
        .expect("heartbeat registers the host");
    assert_eq!(me.last_heartbeat, h.now());

    // s3 expires and is taken over by another host.
    h.advance(600);
    assert_eq!(h.store.recover_expired().await.unwrap(), 1);
    let taken = h.claim_batch(HOST_B, &[("hb", 1)], 1_000).await.steps;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].step_id, s3.step_id);
    let lost = h.heartbeat(HOST, &[run_of(&s1), run_of(&s3)], 1_000).await;
    assert_eq!(lost, [s3.step_id].into(), "taken over");
    let s3_rec = h.step(tasks[2], "hb").await;
    assert_eq!(s3_rec.lease_owner.as_deref(), Some(HOST_B));
    assert_eq!(
        s3_rec.lease_expires_at,
        Some(h.now() + 1_000),
        "the new owner's lease is untouched"
    );
    assert_eq!(s3_rec.attempt, 2);

    // s2 is cancelled with its task.
    assert!(h.store.cancel_task(tasks[1], false).await.unwrap());
    let lost = h.heartbeat(HOST, &[run_of(&s1), run_of(&s2)], 1_000).await;
    assert_eq!(lost, [s2.step_id].into(), "cancelled");

    // Another host cannot extend this host's lease.
    h.advance(100);
    let before = h.step(tasks[0], "hb").await.lease_expires_at;
    let lost = h.heartbeat(HOST_B, &[run_of(&s1)], 60_000).await;
    assert_eq!(lost, [s1.step_id].into(), "not that host's lease");
    assert_eq!(h.step(tasks[0], "hb").await.lease_expires_at, before);
    assert_eq!(
        h.step(tasks[0], "hb").await.lease_owner.as_deref(),
        Some(HOST)
    );
}

/// `recover_expired` makes running steps with expired leases `ready` (run_at
/// = now, lease cleared, attempt kept, error `LeaseExpired`), returns how
/// many, notifies `ready`; the old lease's writes are then rejected.
pub async fn recover_expired_makes_steps_ready(factory: Factory) {
    let h = H::open(&factory).await;
    let short = h.spawn_handler("rec").await;
    let long = h.spawn_handler("rec").await;
    let s1 = h
        .claim_batch(HOST, &[("rec", 1)], 1_000)
        .await
        .steps
        .remove(0);
    let s2 = h
        .claim_batch(HOST, &[("rec", 1)], 5_000)
        .await
        .steps
        .remove(0);
    assert_eq!((s1.task_id, s2.task_id), (short, long));

    assert_eq!(
        h.store.recover_expired().await.unwrap(),
        0,
        "nothing expired yet"
    );
    h.advance(999);
    assert_eq!(
        h.store.recover_expired().await.unwrap(),
        0,
        "1 ms left on the lease"
    );
    h.advance(2);
    let signals = h.store.signals().clone();
    let n = expect_signal(
        &signals.ready,
        "ready on lease recovery",
        h.store.recover_expired(),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    let rec = h.step(short, "rec").await;
    assert_eq!(rec.state, StepState::Ready);
    assert_eq!(rec.run_at, Some(h.now()));
    assert_eq!(rec.lease_owner, None);
    assert_eq!(rec.lease_expires_at, None);
    assert_eq!(rec.attempt, 1, "the lost run costs an attempt");
    assert_eq!(
        rec.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::LeaseExpired)
    );
    assert_eq!(
        h.step_state(long, "rec").await,
        StepState::Running,
        "an unexpired lease is kept"
    );

    let late = h
        .complete(lease(&s1, HOST), Resolution::Completed(json!("late")))
        .await;
    assert_lease_lost(&late, s1.step_id, "completion under an expired lease");
    let cp = h.put_checkpoint(&s1, "k", json!(1)).await;
    assert_lease_lost(&cp, s1.step_id, "checkpoint under an expired lease");
    assert_eq!(
        h.step(short, "rec").await,
        rec,
        "rejected writes change nothing"
    );

    let again = h.claim_one("rec").await;
    assert_eq!((again.task_id, again.attempt), (short, 2));
    assert_eq!(h.store.recover_expired().await.unwrap(), 0);
    let old = h
        .complete(lease(&s1, HOST), Resolution::Completed(json!("late")))
        .await;
    assert_lease_lost(
        &old,
        s1.step_id,
        "completion of attempt 1 while attempt 2 runs",
    );
    h.resolve(&again, Resolution::Completed(json!("ok"))).await;
    assert_eq!(h.task(short).await.result, Some(json!("ok")));
}

// ---------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------

/// `put_checkpoint` needs the current lease (else `LeaseLost`, nothing
/// written), extends the lease to now + `lease_ms`; `checkpoints` and
/// `task_detail` return what was written.
pub async fn checkpoint_requires_current_lease_and_extends_it(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("cp").await;
    let s = h
        .claim_batch(HOST, &[("cp", 1)], 1_000)
        .await
        .steps
        .remove(0);
    h.advance(800);
    let t1 = h.now();
    h.store
        .put_checkpoint(&lease(&s, HOST), "charge", json!({ "id": "ch_1" }), 1_000)
        .await
        .expect("checkpoint");
    assert_eq!(
        h.step(id, "cp").await.lease_expires_at,
        Some(t1 + 1_000),
        "lease extended"
    );
    h.advance(900);
    assert_eq!(
        h.store.recover_expired().await.unwrap(),
        0,
        "the extended lease has not expired"
    );

    let wrong_host = h
        .store
        .put_checkpoint(&lease(&s, HOST_B), "x", json!(1), 1_000)
        .await;
    assert_lease_lost(&wrong_host, s.step_id, "checkpoint from the wrong host");
    let wrong_attempt = h
        .store
        .put_checkpoint(
            &Lease {
                run: 2,
                ..lease(&s, HOST)
            },
            "x",
            json!(1),
            1_000,
        )
        .await;
    assert_lease_lost(
        &wrong_attempt,
        s.step_id,
        "checkpoint from the wrong attempt",
    );
    let t2 = h.now();
    h.put_checkpoint(&s, "mail#2", json!(["sent"]))
        .await
        .expect("second checkpoint");

    let expected: BTreeMap<String, Value> = [
        ("charge".to_string(), json!({ "id": "ch_1" })),
        ("mail#2".to_string(), json!(["sent"])),
    ]
    .into();
    assert_eq!(h.store.checkpoints(id).await.unwrap(), expected);
    let detail = h.detail(id).await;
    let keys: Vec<&str> = detail.checkpoints.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["charge", "mail#2"], "checkpoints in creation order");
    let first = &detail.checkpoints[0];
    assert_eq!(first.task_id, id);
    assert_eq!(first.step_id, s.step_id);
    assert_eq!(first.run, 1);
    assert_eq!(first.value, json!({ "id": "ch_1" }));
    assert_eq!(first.created_at, t1);
    assert_eq!(detail.checkpoints[1].created_at, t2);

    h.resolve(&s, Resolution::Completed(json!("done"))).await;
    let after = h.put_checkpoint(&s, "late", json!(1)).await;
    assert_lease_lost(&after, s.step_id, "checkpoint after completion");
    assert_eq!(
        h.store.checkpoints(id).await.unwrap(),
        expected,
        "rejected checkpoints are not written"
    );
}

/// A checkpoint written by an older run is overwritten by a newer run of
/// the same step. Runs keep growing across a task retry (which resets the
/// attempt), so the retried run's write is the newer one and its record
/// names its run.
pub async fn checkpoint_overwrite_rules(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("cpo").await;
    let s1 = h.claim_one("cpo").await;
    h.put_checkpoint(&s1, "k", json!(1)).await.unwrap();
    h.resolve(
        &s1,
        Resolution::Retry {
            error: ErrorInfo::new(ErrorKind::Retryable, "again"),
            run_at: h.now(),
        },
    )
    .await;
    let s2 = h.claim_one("cpo").await;
    assert_eq!((s2.attempt, s2.run), (2, 2));
    h.put_checkpoint(&s2, "k", json!(2)).await.unwrap();
    assert_eq!(
        h.store.checkpoints(id).await.unwrap()["k"],
        json!(2),
        "a newer run overwrites an older one"
    );
    h.resolve(
        &s2,
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "stop")),
    )
    .await;

    // After a task retry the attempt starts again at 1, the run does not.
    h.store.retry_task(id).await.unwrap();
    let s3 = h.claim_one("cpo").await;
    assert_eq!((s3.attempt, s3.run), (1, 3), "runs are never reused");
    assert_lease_lost(
        &h.put_checkpoint(&s2, "k", json!("stale")).await,
        s2.step_id,
        "the failed run's lease is dead",
    );
    h.put_checkpoint(&s3, "k", json!(3)).await.unwrap();
    let cps = h.store.checkpoints(id).await.unwrap();
    assert_eq!(cps["k"], json!(3));
    let detail = h.detail(id).await;
    let k = detail
        .checkpoints
        .iter()
        .find(|c| c.key == "k")
        .expect("checkpoint k");
    assert_eq!(k.run, 3);
}

/// Each claim takes the next run number, whatever ended the run before
/// (suspension, retry, lost lease, release, task retry); suspensions and
/// releases give their attempt back, failures and lost leases keep it.
pub async fn runs_grow_and_suspensions_cost_no_attempt(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("runs").await;
    let mut expected_run = 0;
    let mut claim = |attempt: u32| {
        expected_run += 1;
        let run = expected_run;
        let h = &h;
        async move {
            let s = h.claim_one("runs").await;
            assert_eq!((s.attempt, s.run), (attempt, run), "claim {run}");
            let rec = h.step(id, "runs").await;
            assert_eq!(
                (rec.attempt, rec.run),
                (attempt, run),
                "stored after claim {run}"
            );
            s
        }
    };
    // 20 suspensions in a row (each woken at once): still attempt 1.
    for _ in 0..20 {
        let s = claim(1).await;
        h.suspend(
            &s,
            WaitFor {
                wake_at: Some(h.now()),
                ..WaitFor::default()
            },
        )
        .await;
        assert_eq!(
            h.step(id, "runs").await.attempt,
            0,
            "a suspension gives its attempt back"
        );
    }
    // A suspension that really waits, then an event: still attempt 1.
    let s = claim(1).await;
    h.suspend(
        &s,
        WaitFor {
            event: Some("runs-go".into()),
            ..WaitFor::default()
        },
    )
    .await;
    h.store.emit_event("runs-go", json!(1)).await.unwrap();
    let s = claim(1).await;
    // A failure costs the attempt.
    h.resolve(
        &s,
        Resolution::Retry {
            error: ErrorInfo::new(ErrorKind::Retryable, "x"),
            run_at: h.now(),
        },
    )
    .await;
    let s = claim(2).await;
    // A lost lease costs it too.
    h.advance(LEASE_MS + 1);
    assert_eq!(h.store.recover_expired().await.unwrap(), 1);
    assert_lease_lost(
        &h.complete(lease(&s, HOST), Resolution::Completed(json!(0)))
            .await,
        s.step_id,
        "the expired run",
    );
    let s = claim(3).await;
    // A release gives it back.
    h.resolve(&s, Resolution::Released).await;
    let s = claim(3).await;
    h.resolve(
        &s,
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "stop")),
    )
    .await;
    h.store.retry_task(id).await.unwrap();
    let s = claim(1).await;
    h.resolve(&s, Resolution::Completed(json!("done"))).await;
    assert_eq!(h.task(id).await.state, TaskState::Completed);
}

/// The same host claiming a step again after its lease was lost (a host
/// paused past its lease) holds two runs of one step: only the current run
/// is renewed, may write and may complete; the old one is reported lost.
pub async fn same_host_reclaim_fences_the_old_run(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("reclaim").await;
    let old = h.claim_one("reclaim").await;
    h.advance(LEASE_MS + 1);
    assert_eq!(h.store.recover_expired().await.unwrap(), 1);
    let new = h.claim_one("reclaim").await;
    assert_eq!(new.step_id, old.step_id);
    assert_eq!(new.run, old.run + 1);

    let reply = h
        .heartbeat_reply(HOST, &[run_of(&old), run_of(&new)], LEASE_MS)
        .await;
    assert_eq!(reply.lost, [run_of(&old)], "only the old run is lost");
    assert!(reply.cancelled.is_empty());
    assert_lease_lost(
        &h.put_checkpoint(&old, "c", json!("old")).await,
        old.step_id,
        "old run's checkpoint",
    );
    assert_eq!(
        h.store
            .emit_event_fenced(&lease(&old, HOST), "reclaim-ev", json!(1))
            .await,
        Err(Error::LeaseLost(old.step_id)),
        "old run's emit"
    );
    assert_eq!(
        h.store
            .spawn_fenced(&lease(&old, HOST), vec![NewTask::new("child", json!(1))])
            .await,
        Err(Error::LeaseLost(old.step_id)),
        "old run's spawn"
    );
    assert!(h.store.get_event("reclaim-ev").await.unwrap().is_none());
    assert!(h.detail(id).await.children.is_empty(), "no child created");
    assert_lease_lost(
        &h.complete(lease(&old, HOST), Resolution::Completed(json!("old")))
            .await,
        old.step_id,
        "old run's completion",
    );
    h.put_checkpoint(&new, "c", json!("new")).await.unwrap();
    assert!(h
        .store
        .emit_event_fenced(&lease(&new, HOST), "reclaim-ev", json!(2))
        .await
        .unwrap());
    let mut child = NewTask::new("child", json!(2));
    child.parent = Some(ParentRef {
        task_id: id,
        step_id: new.step_id,
        group: None,
        index: 0,
    });
    let spawned = h
        .store
        .spawn_fenced(&lease(&new, HOST), vec![child])
        .await
        .unwrap();
    assert!(spawned[0].created);
    h.resolve(&new, Resolution::Completed(json!("new"))).await;
    assert_eq!(h.task(id).await.result, Some(json!("new")));
    assert_eq!(h.store.checkpoints(id).await.unwrap()["c"], json!("new"));

    // Once the run has ended, it can no longer emit or spawn.
    assert_eq!(
        h.store
            .emit_event_fenced(&lease(&new, HOST), "late-ev", json!(1))
            .await,
        Err(Error::LeaseLost(new.step_id))
    );
    assert!(h.store.get_event("late-ev").await.unwrap().is_none());
}

/// `expire_host` ends the leases of the steps one host runs (recovered by
/// the next `recover_expired`) and ends its registration; another host's
/// steps keep their leases.
pub async fn expire_host_recovers_only_that_hosts_steps(factory: Factory) {
    let h = H::open(&factory).await;
    let dead = h.spawn_handler("eh").await;
    let alive = h.spawn_handler("eh").await;
    let d = h.claim_batch(HOST, &[("eh", 1)], LEASE_MS).await.steps;
    let a = h.claim_batch(HOST_B, &[("eh", 1)], LEASE_MS).await.steps;
    assert_eq!((d.len(), a.len()), (1, 1));
    let (d, a) = (&d[0], &a[0]);
    h.heartbeat(HOST, &[run_of(d)], LEASE_MS).await;
    h.heartbeat(HOST_B, &[run_of(a)], LEASE_MS).await;
    assert_eq!(h.store.expire_host(HOST).await.unwrap(), 1);
    assert_eq!(h.store.recover_expired().await.unwrap(), 1);
    let rec = h.step(d.task_id, "eh").await;
    assert_eq!(
        (rec.state, rec.attempt),
        (StepState::Ready, 1),
        "the lost run cost its attempt"
    );
    assert_eq!(h.step(a.task_id, "eh").await.state, StepState::Running);
    let hosts: Vec<String> = h
        .store
        .list_hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(hosts, [HOST_B.to_string()]);
    assert_lease_lost(
        &h.complete(lease(d, HOST), Resolution::Completed(json!(1)))
            .await,
        d.step_id,
        "the dead host's run",
    );
    h.complete(lease(a, HOST_B), Resolution::Completed(json!(2)))
        .await
        .expect("the live host's run completes");
    assert_eq!(h.task(alive).await.state, TaskState::Completed);
    assert_eq!(h.task(dead).await.state, TaskState::Running);
    assert_eq!(h.store.expire_host("no-such-host").await.unwrap(), 0);
}

/// `cancelled_steps` answers which of the given steps are cancelled.
pub async fn cancelled_steps_lists_cancelled_ones(factory: Factory) {
    let h = H::open(&factory).await;
    let keep = h.spawn_handler("cs").await;
    let drop = h.spawn_handler("cs").await;
    let steps = h.claim("cs", 2).await;
    assert!(h.store.cancel_task(drop, false).await.unwrap());
    let ids: Vec<StepId> = steps.iter().map(|s| s.step_id).collect();
    let dropped = find(&steps, drop).step_id;
    assert_eq!(h.store.cancelled_steps(&ids).await.unwrap(), [dropped]);
    assert_eq!(h.store.cancelled_steps(&[]).await.unwrap(), []);
    assert_eq!(h.task(keep).await.state, TaskState::Running);
}

/// Writes of a run whose task was cancelled are refused as cancelled (not as
/// a lost lease), and the heartbeat says so; nothing is created.
pub async fn cancelled_runs_cannot_write(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("doomed").await;
    let s = h.claim_one("doomed").await;
    assert!(h.store.cancel_task(id, true).await.unwrap());
    let l = lease(&s, HOST);
    let cancelled = Err(Error::Cancelled(s.step_id));
    assert_eq!(
        h.store
            .spawn_fenced(&l, vec![NewTask::new("child", json!(1))])
            .await,
        cancelled.clone().map(|()| Vec::new()),
        "spawn after cancel"
    );
    assert_eq!(
        h.store.emit_event_fenced(&l, "doomed-ev", json!(1)).await,
        cancelled.clone().map(|()| false),
        "emit after cancel"
    );
    assert_eq!(
        h.put_checkpoint(&s, "c", json!(1)).await,
        cancelled,
        "checkpoint after cancel"
    );
    let reply = h.heartbeat_reply(HOST, &[run_of(&s)], LEASE_MS).await;
    assert_eq!(reply.lost, [run_of(&s)]);
    assert_eq!(reply.cancelled, [run_of(&s)]);
    assert!(h.store.get_event("doomed-ev").await.unwrap().is_none());
    let detail = h.detail(id).await;
    assert!(detail.children.is_empty());
    assert!(detail.checkpoints.is_empty());
    assert_eq!(
        h.store
            .list_tasks(&TaskFilter {
                handler: Some("child".into()),
                ..TaskFilter::default()
            })
            .await
            .unwrap(),
        []
    );
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// `emit_event`: the first write wins and returns true, later ones false;
/// `get_event` returns it; `list_events` lists newest first, `limit` applies.
pub async fn emit_event_first_write_wins(factory: Factory) {
    let h = H::open(&factory).await;
    let t = h.now();
    assert_eq!(h.store.get_event("e1").await.unwrap(), None);
    assert!(h.store.list_events(0).await.unwrap().is_empty());
    assert!(
        h.emit("e1", json!({ "v": 1 })).await,
        "the first emit stores the payload"
    );
    h.advance(10);
    assert!(
        !h.emit("e1", json!({ "v": 2 })).await,
        "a later emit does not"
    );
    let ev = h.store.get_event("e1").await.unwrap().expect("event e1");
    assert_eq!(ev.name, "e1");
    assert_eq!(ev.payload, json!({ "v": 1 }));
    assert_eq!(ev.created_at, t);
    h.advance(10);
    assert!(h.emit("e2", json!(2)).await);
    h.advance(10);
    assert!(h.emit("e3", json!(3)).await);
    let names = |events: Vec<EventRecord>| events.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(
        names(h.store.list_events(0).await.unwrap()),
        ["e3", "e2", "e1"]
    );
    assert_eq!(names(h.store.list_events(2).await.unwrap()), ["e3", "e2"]);
}

/// `emit_event` makes every step suspended on that event `ready` (and only
/// those), notifying `ready`; a repeated emit changes nothing.
pub async fn emit_event_wakes_every_waiter(factory: Factory) {
    let h = H::open(&factory).await;
    let tasks = [
        h.spawn_handler("ew").await,
        h.spawn_handler("ew").await,
        h.spawn_handler("ew").await,
    ];
    let steps = h.claim("ew", 3).await;
    h.suspend(&find(&steps, tasks[0]), wait_event("go")).await;
    h.suspend(
        &find(&steps, tasks[1]),
        WaitFor {
            event: Some("go".into()),
            wake_at: Some(h.now() + 60_000),
            group: None,
        },
    )
    .await;
    h.suspend(&find(&steps, tasks[2]), wait_event("other"))
        .await;
    let signals = h.store.signals().clone();
    assert!(expect_signal(&signals.ready, "ready on emit", h.emit("go", json!("now"))).await);
    assert_eq!(h.step_state(tasks[0], "ew").await, StepState::Ready);
    assert_eq!(h.step_state(tasks[1], "ew").await, StepState::Ready);
    assert_eq!(
        h.step_state(tasks[2], "ew").await,
        StepState::Suspended,
        "waits on another event"
    );
    assert!(!h.emit("go", json!("again")).await);
    assert_eq!(h.step_state(tasks[2], "ew").await, StepState::Suspended);
    let woke: BTreeSet<TaskId> = h.claim("ew", 10).await.iter().map(|s| s.task_id).collect();
    assert_eq!(woke, [tasks[0], tasks[1]].into());
}

// ---------------------------------------------------------------------------
// Delegation groups and response events
// ---------------------------------------------------------------------------

/// Delegation: children carry `ParentRef { group, index }`; `group_outcomes`
/// lists them by index with state, result and error; the parent suspended on
/// the group is woken (`ready`, signal) only when the last child finishes,
/// whether it completed, failed or was cancelled.
pub async fn delegation_group_outcomes_and_parent_wake(factory: Factory) {
    let h = H::open(&factory).await;
    let parent = h.spawn_handler("g_parent").await;
    let p = h.claim_one("g_parent").await;
    let group = "grp-orders";
    assert!(
        h.store.group_outcomes(group).await.unwrap().is_empty(),
        "unknown group"
    );
    let out = h
        .store
        .spawn(vec![
            child_task("g_child", json!("c2"), &p, Some(group), 2),
            child_task("g_child", json!("c0"), &p, Some(group), 0),
            child_task("g_child", json!("c1"), &p, Some(group), 1),
        ])
        .await
        .unwrap();
    let (c2, c0, c1) = (out[0].task_id, out[1].task_id, out[2].task_id);

    let outcomes = h.store.group_outcomes(group).await.unwrap();
    let order: Vec<TaskId> = outcomes.iter().map(|o| o.task_id).collect();
    assert_eq!(order, [c0, c1, c2], "ordered by index");
    for o in &outcomes {
        assert_eq!(
            (o.state, &o.result, &o.error),
            (TaskState::Running, &None, &None)
        );
    }
    let expected_parent = ParentRef {
        task_id: parent,
        step_id: p.step_id,
        group: Some(group.to_string()),
        index: 0,
    };
    assert_eq!(h.task(c0).await.parent, Some(expected_parent));
    let children: Vec<TaskId> = h
        .detail(parent)
        .await
        .children
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(children, [c2, c0, c1], "children in creation order");

    h.suspend(&p, wait_group(group)).await;
    assert_eq!(h.step_state(parent, "g_parent").await, StepState::Suspended);
    let kids = h.claim("g_child", 10).await;
    assert_eq!(kids.len(), 3);
    h.resolve(
        &find(&kids, c0),
        Resolution::Completed(json!({ "sum": 10 })),
    )
    .await;
    assert_eq!(
        h.step_state(parent, "g_parent").await,
        StepState::Suspended,
        "two children left"
    );
    h.claim_none("g_parent").await;
    h.resolve(
        &find(&kids, c1),
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "child failed")),
    )
    .await;
    assert_eq!(
        h.step_state(parent, "g_parent").await,
        StepState::Suspended,
        "one child left"
    );
    h.claim_none("g_parent").await;

    let signals = h.store.signals().clone();
    let cancelled = expect_signal(
        &signals.ready,
        "ready on group finished",
        h.store.cancel_task(c2, false),
    )
    .await;
    assert!(cancelled.unwrap());
    assert_eq!(
        h.step_state(parent, "g_parent").await,
        StepState::Ready,
        "the last child finished"
    );
    assert_eq!(
        h.task(parent).await.state,
        TaskState::Running,
        "a failed child does not fail the parent"
    );

    let outcomes = h.store.group_outcomes(group).await.unwrap();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0].task_id, c0);
    assert_eq!(outcomes[0].state, TaskState::Completed);
    assert_eq!(outcomes[0].result, Some(json!({ "sum": 10 })));
    assert_eq!(outcomes[0].error, None);
    assert_eq!(outcomes[1].task_id, c1);
    assert_eq!(outcomes[1].state, TaskState::Failed);
    assert_eq!(outcomes[1].result, None);
    assert_error(&outcomes[1].error, ErrorKind::Permanent, "child failed");
    assert_eq!(outcomes[2].task_id, c2);
    assert_eq!(outcomes[2].state, TaskState::Cancelled);
    assert_eq!(outcomes[2].result, None);
    if let Some(e) = &outcomes[2].error {
        assert_eq!(
            e.kind,
            ErrorKind::Cancelled,
            "a cancelled child's error, if any, is `Cancelled`"
        );
    }
    let again = h.claim_one("g_parent").await;
    assert_eq!(
        (again.attempt, again.run),
        (1, 2),
        "a resume costs no attempt"
    );
}

/// A step suspending on a group whose children have all finished is `ready`
/// at once; a step whose children are still running stays suspended.
pub async fn group_already_finished_wakes_at_once(factory: Factory) {
    let h = H::open(&factory).await;
    let done_parent = h.spawn_handler("gf_parent").await;
    let busy_parent = h.spawn_handler("gf_parent").await;
    let parents = h.claim("gf_parent", 2).await;
    let (pd, pb) = (find(&parents, done_parent), find(&parents, busy_parent));
    let c_done = h.spawn_child("gf_child", &pd, Some("gf-done"), 0).await;
    h.spawn_child("gf_busy", &pb, Some("gf-busy"), 0).await;
    let c = h.claim_one("gf_child").await;
    assert_eq!(c.task_id, c_done);
    h.resolve(&c, Resolution::Completed(json!("child"))).await;
    assert_eq!(h.task(c_done).await.state, TaskState::Completed);

    h.suspend(&pd, wait_group("gf-done")).await;
    assert_eq!(
        h.step_state(done_parent, "gf_parent").await,
        StepState::Ready,
        "every child already finished"
    );
    h.suspend(&pb, wait_group("gf-busy")).await;
    assert_eq!(
        h.step_state(busy_parent, "gf_parent").await,
        StepState::Suspended
    );
    let woke = h.claim_one("gf_parent").await;
    assert_eq!(woke.task_id, done_parent);

    // A parent suspended on something else is not woken by its children.
    let other_parent = h.spawn_handler("gf_other").await;
    let po = h.claim_one("gf_other").await;
    let child = h
        .spawn_child("gf_other_child", &po, Some("gf-other"), 0)
        .await;
    h.suspend(&po, wait_event("gf-unrelated")).await;
    let c = h.claim_one("gf_other_child").await;
    h.resolve(&c, Resolution::Completed(json!("child"))).await;
    assert_eq!(h.task(child).await.state, TaskState::Completed);
    assert_eq!(
        h.step_state(other_parent, "gf_other").await,
        StepState::Suspended,
        "only a parent waiting on the group is woken"
    );
}

fn assert_response(payload: &Value, task: TaskId, state: &str) {
    let obj = payload
        .as_object()
        .unwrap_or_else(|| panic!("response payload is an object: {payload}"));
    for key in obj.keys() {
        assert!(
            ["task_id", "state", "result", "error"].contains(&key.as_str()),
            "unexpected key `{key}` in {payload}"
        );
    }
    assert_eq!(payload["task_id"], json!(task), "task_id in {payload}");
    assert_eq!(payload["state"], json!(state), "state in {payload}");
}

/// A finishing task with a `response_event` emits it (first write wins) with
/// `{"task_id", "state", "result", "error"}`, waking its waiters, on
/// completion, failure and cancellation.
pub async fn response_event_on_finish(factory: Factory) {
    let h = H::open(&factory).await;
    let mut tasks = Vec::new();
    for event in ["resp-ok", "resp-fail", "resp-cancel", "resp-pre"] {
        tasks.push(
            h.spawn(NewTask::new("resp", json!(event)).response_event(event))
                .await,
        );
    }
    let plain = h.spawn_handler("resp").await;
    let waiter = h.spawn_handler("resp_waiter").await;
    let w = h.claim_one("resp_waiter").await;
    h.suspend(&w, wait_event("resp-ok")).await;
    let steps = h.claim("resp", 5).await;
    assert_eq!(steps.len(), 5);

    h.advance(5);
    h.resolve(
        &find(&steps, tasks[0]),
        Resolution::Completed(json!({ "total": 3 })),
    )
    .await;
    let ev = h
        .store
        .get_event("resp-ok")
        .await
        .unwrap()
        .expect("response event on completion");
    assert_response(&ev.payload, tasks[0], "completed");
    assert_eq!(ev.payload["result"], json!({ "total": 3 }));
    assert!(ev.payload["error"].is_null());
    assert_eq!(ev.created_at, h.now());
    assert_eq!(
        h.step_state(waiter, "resp_waiter").await,
        StepState::Ready,
        "the response event wakes waiters"
    );

    h.resolve(
        &find(&steps, tasks[1]),
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "nope")),
    )
    .await;
    let ev = h
        .store
        .get_event("resp-fail")
        .await
        .unwrap()
        .expect("response event on failure");
    assert_response(&ev.payload, tasks[1], "failed");
    assert!(ev.payload["result"].is_null());
    assert_eq!(ev.payload["error"]["kind"], json!("permanent"));
    assert_eq!(ev.payload["error"]["message"], json!("nope"));

    assert!(h.store.cancel_task(tasks[2], false).await.unwrap());
    let ev = h
        .store
        .get_event("resp-cancel")
        .await
        .unwrap()
        .expect("response event on cancellation");
    assert_response(&ev.payload, tasks[2], "cancelled");
    assert!(ev.payload["result"].is_null());

    assert!(h.emit("resp-pre", json!("already")).await);
    h.resolve(
        &find(&steps, tasks[3]),
        Resolution::Completed(json!("mine")),
    )
    .await;
    let ev = h.store.get_event("resp-pre").await.unwrap().unwrap();
    assert_eq!(ev.payload, json!("already"), "first write wins");

    h.resolve(&find(&steps, plain), Resolution::Completed(json!("quiet")))
        .await;
    assert_eq!(
        h.store.list_events(0).await.unwrap().len(),
        4,
        "a task without response_event emits nothing"
    );
}

// ---------------------------------------------------------------------------
// cancel_task and retry_task
// ---------------------------------------------------------------------------

/// `cancel_task`: task `cancelled`, every non-terminal step `cancelled`,
/// running ones announced and reported lost, their completions rejected,
/// `finished` notified; false on a finished task; `NotFound` when unknown.
pub async fn cancel_task_cancels_steps(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("cx_root").await;
    let root = h.claim_one("cx_root").await;
    let plan = vec![
        new_step("a", "cx_work", &[]),
        new_step("b", "cx_work", &["a"]),
        new_step("s", "cx_wait", &[]),
    ];
    h.decide(&root, plan, None, json!("root")).await;
    let a = h.claim_one("cx_work").await;
    let s = h.claim_one("cx_wait").await;
    h.suspend(&s, wait_event("cx-event")).await;
    let mut rx = h.store.signals().cancelled.subscribe();
    h.advance(10);
    let signals = h.store.signals().clone();
    let cancelled = expect_signal(
        &signals.finished,
        "finished on cancel",
        h.store.cancel_task(id, false),
    )
    .await;
    assert!(cancelled.unwrap());

    let task = h.task(id).await;
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(task.result, None);
    assert_eq!(task.updated_at, h.now());
    assert_eq!(
        h.step_state(id, "cx_root").await,
        StepState::Completed,
        "completed steps stay completed"
    );
    for name in ["a", "b", "s"] {
        assert_eq!(
            h.step_state(id, name).await,
            StepState::Cancelled,
            "step {name}"
        );
    }
    expect_announced(&mut rx, &[a.step_id]).await;
    assert_eq!(
        h.heartbeat(HOST, &[run_of(&a)], LEASE_MS).await,
        [a.step_id].into()
    );
    let late = h
        .complete(lease(&a, HOST), Resolution::Completed(json!("late")))
        .await;
    assert_lease_lost(&late, a.step_id, "completion of a cancelled step");
    assert!(h.emit("cx-event", json!(1)).await);
    assert_eq!(
        h.step_state(id, "s").await,
        StepState::Cancelled,
        "an event does not revive a cancelled step"
    );
    h.claim_none("cx_work").await;
    h.claim_none("cx_wait").await;

    assert!(
        !h.store.cancel_task(id, false).await.unwrap(),
        "already finished"
    );
    let done = h.spawn_handler("cx_done").await;
    let d = h.claim_one("cx_done").await;
    h.resolve(&d, Resolution::Completed(json!("ok"))).await;
    assert!(
        !h.store.cancel_task(done, false).await.unwrap(),
        "a completed task is not cancelled"
    );
    let task = h.task(done).await;
    assert_eq!(
        (task.state, task.result),
        (TaskState::Completed, Some(json!("ok")))
    );
    let unknown = h.store.cancel_task(TaskId::new(), false).await;
    assert!(
        matches!(unknown, Err(Error::NotFound(_))),
        "unknown task: {unknown:?}"
    );
}

/// `cancel_task` cancels descendants only with `cascade`, and leaves finished
/// descendants alone.
pub async fn cancel_task_cascade(factory: Factory) {
    let h = H::open(&factory).await;
    // Without cascade, the child keeps running.
    let p1 = h.spawn_handler("cc_parent").await;
    let pp1 = h.claim_one("cc_parent").await;
    let c1 = h.spawn_child("cc_child", &pp1, None, 0).await;
    assert!(h.store.cancel_task(p1, false).await.unwrap());
    assert_eq!(h.task(c1).await.state, TaskState::Running);
    assert_eq!(h.step_state(c1, "cc_child").await, StepState::Ready);

    // With cascade: children and grandchildren, not finished ones.
    let p2 = h.spawn_handler("cc_parent").await;
    let pp2 = h.claim_one("cc_parent").await;
    let c2 = h.spawn_child("cc_child", &pp2, None, 0).await;
    let c3 = h.spawn_child("cc_done", &pp2, None, 1).await;
    let kids = h.claim("cc_child", 10).await;
    let c2s = find(&kids, c2);
    let g2 = h.spawn_child("cc_grand", &c2s, None, 0).await;
    let c3s = h.claim_one("cc_done").await;
    h.resolve(&c3s, Resolution::Completed(json!("finished")))
        .await;

    let mut rx = h.store.signals().cancelled.subscribe();
    assert!(h.store.cancel_task(p2, true).await.unwrap());
    for (task, what) in [(p2, "parent"), (c2, "child"), (g2, "grandchild")] {
        assert_eq!(h.task(task).await.state, TaskState::Cancelled, "{what}");
    }
    assert_eq!(h.step_state(g2, "cc_grand").await, StepState::Cancelled);
    assert_eq!(h.step_state(c2, "cc_child").await, StepState::Cancelled);
    let c3 = h.task(c3).await;
    assert_eq!(
        (c3.state, c3.result),
        (TaskState::Completed, Some(json!("finished"))),
        "finished child untouched"
    );
    assert_eq!(
        h.task(c1).await.state,
        TaskState::Running,
        "another tree is untouched"
    );
    expect_announced(&mut rx, &[pp2.step_id, c2s.step_id]).await;

    // A parent that already finished: the cascade still reaches its
    // unfinished descendants (the call answers false for the parent).
    let p3 = h.spawn_handler("cc_parent").await;
    let pp3 = h.claim_one("cc_parent").await;
    let c4 = h.spawn_child("cc_child", &pp3, None, 0).await;
    h.resolve(&pp3, Resolution::Completed(json!("parent done")))
        .await;
    assert_eq!(h.task(p3).await.state, TaskState::Completed);
    assert!(!h.store.cancel_task(p3, false).await.unwrap());
    assert_eq!(
        h.task(c4).await.state,
        TaskState::Running,
        "no cascade asked"
    );
    assert!(!h.store.cancel_task(p3, true).await.unwrap());
    assert_eq!(h.task(c4).await.state, TaskState::Cancelled);
    assert_eq!(
        h.task(p3).await.state,
        TaskState::Completed,
        "the finished parent keeps its outcome"
    );
}

/// `retry_task` on a failed or cancelled task: `running`, error cleared;
/// unfinished steps `ready` (attempt 0) or `blocked` by their dependencies;
/// completed steps and checkpoints kept; `ready` notified.
pub async fn retry_task_reruns_unfinished_steps(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("rt_root").await;
    let root = h.claim_one("rt_root").await;
    let plan = vec![
        new_step("a", "rt_a", &[]),
        new_step("b", "rt_b", &["a"]),
        new_step("c", "rt_c", &[]),
    ];
    h.decide(&root, plan, None, json!("root")).await;
    let a = h.claim_one("rt_a").await;
    h.put_checkpoint(&a, "cp", json!(1)).await.unwrap();
    h.resolve(&a, Resolution::Completed(json!("A"))).await;
    let c = h.claim_one("rt_c").await;
    h.resolve(
        &c,
        Resolution::Retry {
            error: ErrorInfo::new(ErrorKind::Retryable, "hmm"),
            run_at: h.now(),
        },
    )
    .await;
    let c = h.claim_one("rt_c").await;
    assert_eq!(c.attempt, 2);
    h.resolve(
        &c,
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "c broke")),
    )
    .await;
    assert_eq!(h.task(id).await.state, TaskState::Failed);
    assert_eq!(h.step_state(id, "b").await, StepState::Cancelled);

    h.advance(10);
    let signals = h.store.signals().clone();
    expect_signal(
        &signals.ready,
        "ready on task retry",
        h.store.retry_task(id),
    )
    .await
    .expect("retry_task");
    let task = h.task(id).await;
    assert_eq!(task.state, TaskState::Running);
    assert_eq!(task.error, None);
    assert_eq!(task.result, None);
    let a_rec = h.step(id, "a").await;
    assert_eq!(
        (a_rec.state, a_rec.result, a_rec.attempt),
        (StepState::Completed, Some(json!("A")), 1)
    );
    assert_eq!(h.step_state(id, "rt_root").await, StepState::Completed);
    for name in ["b", "c"] {
        let rec = h.step(id, name).await;
        assert_eq!(
            (rec.state, rec.attempt),
            (StepState::Ready, 0),
            "step {name}"
        );
    }
    assert_eq!(
        h.store.checkpoints(id).await.unwrap(),
        [("cp".to_string(), json!(1))].into()
    );
    let c = h.claim_one("rt_c").await;
    assert_eq!(c.attempt, 1);

    // A step whose dependency is not completed goes back to `blocked`.
    let id2 = h.spawn_handler("rt2_root").await;
    let root2 = h.claim_one("rt2_root").await;
    h.decide(
        &root2,
        vec![new_step("a", "rt2_a", &[]), new_step("b", "rt2_b", &["a"])],
        None,
        json!(null),
    )
    .await;
    let a2 = h.claim_one("rt2_a").await;
    h.resolve(
        &a2,
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "a broke")),
    )
    .await;
    h.store.retry_task(id2).await.unwrap();
    assert_eq!(h.step_state(id2, "a").await, StepState::Ready);
    assert_eq!(h.step_state(id2, "b").await, StepState::Blocked);

    // A cancelled task is retried too.
    let id3 = h.spawn_handler("rt3").await;
    assert!(h.store.cancel_task(id3, false).await.unwrap());
    h.store.retry_task(id3).await.unwrap();
    assert_eq!(h.task(id3).await.state, TaskState::Running);
    let r3 = h.step(id3, "rt3").await;
    assert_eq!((r3.state, r3.attempt), (StepState::Ready, 0));
    assert_eq!(h.claim_one("rt3").await.task_id, id3);
}

/// `retry_task`: `Conflict` on a running or completed task, `NotFound` on an
/// unknown one; nothing changes.
pub async fn retry_task_conflicts(factory: Factory) {
    let h = H::open(&factory).await;
    let running = h.spawn_handler("rc").await;
    let r = h.store.retry_task(running).await;
    assert!(matches!(r, Err(Error::Conflict(_))), "running task: {r:?}");
    assert_eq!(h.step(running, "rc").await.state, StepState::Ready);

    let s = h.claim_one("rc").await;
    h.resolve(&s, Resolution::Completed(json!("ok"))).await;
    let r = h.store.retry_task(running).await;
    assert!(
        matches!(r, Err(Error::Conflict(_))),
        "completed task: {r:?}"
    );
    assert_eq!(h.task(running).await.state, TaskState::Completed);
    assert_eq!(h.step(running, "rc").await.state, StepState::Completed);

    let r = h.store.retry_task(TaskId::new()).await;
    assert!(matches!(r, Err(Error::NotFound(_))), "unknown task: {r:?}");
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// `list_tasks` filters that combine (root only, children of a parent,
/// idempotency key, created and finished time ranges, tasks with a step in
/// a given state) and the keyset cursor (`after`): pages follow each other
/// without gaps or repeats, also under a filter; an unknown cursor task is
/// [`Error::NotFound`].
pub async fn list_tasks_combined_filters_and_cursor(factory: Factory) {
    let h = H::open(&factory).await;
    let t0 = h.now();
    let parent = h
        .spawn(NewTask::new("lc_parent", json!(null)).idempotency_key("lc-key"))
        .await;
    h.advance(10);
    let plain = h.spawn_handler("lc_plain").await;
    h.advance(10);
    let step = h.claim_one("lc_parent").await;
    let c1 = h.spawn_child("lc_child", &step, Some("g"), 0).await;
    h.advance(10);
    let c2 = h.spawn_child("lc_child", &step, Some("g"), 1).await;
    h.resolve(
        &step,
        Resolution::Suspended(WaitFor {
            group: Some("g".into()),
            ..WaitFor::default()
        }),
    )
    .await;
    h.advance(10);
    let t_done = h.now();
    let s = h.claim_one("lc_plain").await;
    h.resolve(&s, Resolution::Completed(json!(1))).await;
    h.advance(10);

    let store = &h.store;
    let list = |filter: TaskFilter| async move {
        store
            .list_tasks(&filter)
            .await
            .expect("list_tasks")
            .into_iter()
            .map(|t| t.id)
            .collect::<Vec<_>>()
    };
    let all = list(TaskFilter::default()).await;
    assert_eq!(all, [c2, c1, plain, parent], "newest first");
    let root = TaskFilter {
        root_only: true,
        ..TaskFilter::default()
    };
    assert_eq!(list(root.clone()).await, [plain, parent]);
    let children = TaskFilter {
        parent: Some(parent),
        ..TaskFilter::default()
    };
    assert_eq!(list(children.clone()).await, [c2, c1]);
    assert!(
        list(TaskFilter {
            parent: Some(plain),
            ..TaskFilter::default()
        })
        .await
        .is_empty(),
        "a task without children has none"
    );
    assert_eq!(
        list(TaskFilter {
            idempotency_key: Some("lc-key".into()),
            ..TaskFilter::default()
        })
        .await,
        [parent]
    );
    assert_eq!(
        list(TaskFilter {
            created_after: Some(t0 + 10),
            created_before: Some(t0 + 30),
            ..TaskFilter::default()
        })
        .await,
        [c1, plain],
        "created_after is inclusive, created_before exclusive"
    );
    assert_eq!(
        list(TaskFilter {
            finished_after: Some(t_done),
            ..TaskFilter::default()
        })
        .await,
        [plain],
        "a finished-time bound keeps finished tasks only"
    );
    assert!(list(TaskFilter {
        finished_before: Some(t_done),
        ..TaskFilter::default()
    })
    .await
    .is_empty());
    assert_eq!(
        list(TaskFilter {
            step_state: Some(StepState::Suspended),
            ..TaskFilter::default()
        })
        .await,
        [parent],
        "the parent waits on its group"
    );
    assert_eq!(
        list(TaskFilter {
            step_state: Some(StepState::Ready),
            ..root.clone()
        })
        .await,
        Vec::<TaskId>::new(),
        "combined: no root task has a ready step"
    );
    assert_eq!(
        list(TaskFilter {
            state: Some(TaskState::Running),
            handler: Some("lc_child".into()),
            ..children.clone()
        })
        .await,
        [c2, c1]
    );

    // The cursor: pages of 1 walk the whole listing, in order, then stop.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = list(TaskFilter {
            limit: 1,
            after,
            ..TaskFilter::default()
        })
        .await;
        if page.is_empty() {
            break;
        }
        assert_eq!(page.len(), 1);
        after = Some(page[0]);
        seen.push(page[0]);
        assert!(
            seen.len() <= all.len(),
            "the cursor does not advance: {seen:?}"
        );
    }
    assert_eq!(seen, all);
    // Under a filter, the cursor may be a task the filter would not list.
    assert_eq!(
        list(TaskFilter {
            after: Some(plain),
            ..root.clone()
        })
        .await,
        [parent]
    );
    assert_eq!(
        list(TaskFilter {
            after: Some(c2),
            limit: 1,
            ..children
        })
        .await,
        [c1]
    );
    let err = h
        .store
        .list_tasks(&TaskFilter {
            after: Some(TaskId::new()),
            ..TaskFilter::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("cursor")),
        "an unknown cursor task is NotFound naming the cursor, got {err:?}"
    );
}

/// `list_events_prefixed`: names starting with the prefix, taken as plain
/// text (`%` and `_` are not wildcards), newest first, `limit` applied.
pub async fn list_events_by_prefix(factory: Factory) {
    let h = H::open(&factory).await;
    for name in [
        "order.1", "order.2", "orders", "pay.1", "order%x", "o_der.3",
    ] {
        assert!(h.store.emit_event(name, json!(name)).await.unwrap());
        h.advance(1);
    }
    let names = |prefix: &'static str, limit: usize| {
        let store = &h.store;
        async move {
            store
                .list_events_prefixed(prefix, limit)
                .await
                .expect("list_events_prefixed")
                .into_iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names("order.", 0).await, ["order.2", "order.1"]);
    assert_eq!(
        names("order", 0).await,
        ["order%x", "orders", "order.2", "order.1"]
    );
    assert_eq!(names("order%", 0).await, ["order%x"], "% is plain text");
    assert_eq!(names("o_d", 0).await, ["o_der.3"], "_ is plain text");
    assert_eq!(names("order", 2).await, ["order%x", "orders"]);
    assert!(names("nothing", 0).await.is_empty());
    assert_eq!(names("", 0).await.len(), 6, "the empty prefix lists all");
}

/// `handler_stats`: per handler, step counts by state and the earliest
/// `run_at` of its ready steps; `running_by_host`: steps in flight per host.
pub async fn handler_stats_counts_and_oldest_ready(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(h.store.handler_stats().await.unwrap().is_empty());
    let t0 = h.now();
    h.spawn_handler("hs_a").await;
    h.advance(100);
    h.spawn_handler("hs_a").await;
    h.spawn_handler("hs_a").await;
    h.spawn_handler("hs_b").await;
    let s = h.claim_one("hs_b").await;
    h.resolve(
        &s,
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "no")),
    )
    .await;
    let running = h.claim_one("hs_a").await;
    let stats = h.store.handler_stats().await.unwrap();
    assert_eq!(stats.len(), 2, "{stats:#?}");
    let a = stats.iter().find(|s| s.handler == "hs_a").expect("hs_a");
    assert_eq!(a.steps.get("ready"), Some(&2));
    assert_eq!(a.steps.get("running"), Some(&1));
    assert_eq!(
        a.oldest_ready_at,
        Some(t0 + 100),
        "the first task's step is running; the oldest ready one is due at t0+100"
    );
    let b = stats.iter().find(|s| s.handler == "hs_b").expect("hs_b");
    assert_eq!(b.steps.get("failed"), Some(&1));
    assert_eq!(b.steps.get("ready"), None);
    assert_eq!(b.oldest_ready_at, None);
    // Steps in flight per host.
    let on_b = h.claim_batch(HOST_B, &[("hs_a", 1)], LEASE_MS).await.steps;
    assert_eq!(on_b.len(), 1);
    let by_host = h.store.running_by_host().await.unwrap();
    assert_eq!(
        by_host.into_iter().collect::<Vec<_>>(),
        [(HOST.to_string(), 1), (HOST_B.to_string(), 1)]
    );
    h.resolve(&running, Resolution::Completed(json!(1))).await;
    let by_host = h.store.running_by_host().await.unwrap();
    assert_eq!(
        by_host.into_iter().collect::<Vec<_>>(),
        [(HOST_B.to_string(), 1)],
        "a finished step is no longer in flight"
    );
}

/// `list_tasks`: newest first, filtered by state and root handler, `limit`
/// applied; `get_task`/`task_detail` answer `None` for unknown ids.
pub async fn list_tasks_filters_and_orders(factory: Factory) {
    let h = H::open(&factory).await;
    assert_eq!(h.store.get_task(TaskId::new()).await.unwrap(), None);
    assert_eq!(h.store.task_detail(TaskId::new()).await.unwrap(), None);
    assert!(h
        .store
        .list_tasks(&TaskFilter::default())
        .await
        .unwrap()
        .is_empty());
    let mut ids = Vec::new();
    for handler in ["lt_a", "lt_b", "lt_a", "lt_b"] {
        ids.push(h.spawn_handler(handler).await);
        h.advance(1);
    }
    let s = h.claim_one("lt_a").await;
    assert_eq!(s.task_id, ids[0]);
    h.resolve(&s, Resolution::Completed(json!("done"))).await;

    let store = &h.store;
    let list = |filter: TaskFilter| async move {
        store
            .list_tasks(&filter)
            .await
            .expect("list_tasks")
            .into_iter()
            .map(|t| t.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(TaskFilter::default()).await,
        [ids[3], ids[2], ids[1], ids[0]],
        "newest first"
    );
    let state = |s| TaskFilter {
        state: Some(s),
        ..TaskFilter::default()
    };
    assert_eq!(list(state(TaskState::Completed)).await, [ids[0]]);
    assert_eq!(
        list(state(TaskState::Running)).await,
        [ids[3], ids[2], ids[1]]
    );
    assert!(list(state(TaskState::Failed)).await.is_empty());
    let handler = TaskFilter {
        handler: Some("lt_a".into()),
        ..TaskFilter::default()
    };
    assert_eq!(list(handler.clone()).await, [ids[2], ids[0]]);
    assert_eq!(
        list(TaskFilter {
            state: Some(TaskState::Running),
            ..handler
        })
        .await,
        [ids[2]]
    );
    assert_eq!(
        list(TaskFilter {
            limit: 2,
            ..TaskFilter::default()
        })
        .await,
        [ids[3], ids[2]]
    );
    let full = h
        .store
        .list_tasks(&TaskFilter {
            limit: 1,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        full,
        vec![h.task(ids[3]).await],
        "list_tasks returns whole records"
    );

    // The handler filter looks at the root handler only.
    let root = h.claim_one("lt_b").await;
    assert_eq!(root.task_id, ids[1]);
    h.decide(&root, vec![new_step("x", "lt_c", &[])], None, json!(null))
        .await;
    let by_step_handler = TaskFilter {
        handler: Some("lt_c".into()),
        ..TaskFilter::default()
    };
    assert!(
        list(by_step_handler).await.is_empty(),
        "lt_c is not a root handler"
    );
}

/// `list_tasks` with `limit` 0 returns at most the default of 100.
pub async fn list_tasks_default_limit(factory: Factory) {
    let h = H::open(&factory).await;
    let tasks = (0..120).map(|i| NewTask::new("many", json!(i))).collect();
    assert_eq!(h.store.spawn(tasks).await.unwrap().len(), 120);
    assert_eq!(
        h.store
            .list_tasks(&TaskFilter::default())
            .await
            .unwrap()
            .len(),
        100
    );
    assert_eq!(
        h.store
            .list_tasks(&TaskFilter {
                limit: 110,
                ..TaskFilter::default()
            })
            .await
            .unwrap()
            .len(),
        110
    );
}

/// `heartbeat` registers hosts (`last_heartbeat` = now), `list_hosts` lists
/// them newest heartbeat first, `deregister_host` ends one (listed by
/// `ended_hosts` for a day).
pub async fn hosts_list_and_deregister(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(h.store.list_hosts().await.unwrap().is_empty());
    let t = h.now();
    assert!(h.heartbeat("host-1", &[], LEASE_MS).await.is_empty());
    h.advance(10);
    h.heartbeat("host-2", &[], LEASE_MS).await;
    let hosts = h.store.list_hosts().await.unwrap();
    let listed: Vec<(&str, Millis)> = hosts
        .iter()
        .map(|x| (x.id.as_str(), x.last_heartbeat))
        .collect();
    assert_eq!(listed, [("host-2", t + 10), ("host-1", t)]);
    let one = &hosts[1];
    assert_eq!(one.pid, 4242);
    assert_eq!(one.hostname, "box-1");
    assert_eq!(one.name.as_deref(), Some("orders-1"));
    assert_eq!(hosts[0].name, None);
    assert_eq!(one.handlers, ["alpha", "beta"]);
    assert_eq!(one.started_at, t);
    assert_eq!(
        (one.language.as_deref(), one.slots),
        (Some("python"), Some(8))
    );
    assert_eq!((hosts[0].language.as_deref(), hosts[0].slots), (None, None));
    assert_eq!((one.ended_at, one.end_reason.as_deref()), (None, None));

    h.advance(10);
    h.heartbeat("host-1", &[], LEASE_MS).await;
    let order: Vec<String> = h
        .store
        .list_hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(order, ["host-1", "host-2"], "a refreshed host moves first");
    h.store.deregister_host("host-1").await.unwrap();
    let order: Vec<String> = h
        .store
        .list_hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(order, ["host-2"]);

    // Ended registrations: kept for `ended_hosts`, newest end first, with
    // how they ended; a host that heartbeats again is registered again.
    let ended = |since: Millis| {
        let store = h.store.clone();
        async move {
            store
                .ended_hosts(since)
                .await
                .unwrap()
                .into_iter()
                .map(|x| (x.id, x.ended_at, x.end_reason))
                .collect::<Vec<_>>()
        }
    };
    let stopped_at = h.now();
    assert_eq!(
        ended(t).await,
        [(
            "host-1".to_string(),
            Some(stopped_at),
            Some("stopped".to_string())
        )]
    );
    let gone = h.store.ended_hosts(t).await.unwrap().remove(0);
    assert_eq!(
        (gone.language.as_deref(), gone.slots, gone.pid),
        (Some("python"), Some(8), 4242)
    );
    h.advance(5);
    assert_eq!(h.store.expire_host("host-2").await.unwrap(), 0);
    h.store.deregister_host("host-2").await.unwrap();
    assert_eq!(
        ended(t).await,
        [
            (
                "host-2".to_string(),
                Some(stopped_at + 5),
                Some("dead".to_string())
            ),
            (
                "host-1".to_string(),
                Some(stopped_at),
                Some("stopped".to_string())
            ),
        ],
        "ending twice keeps the first end"
    );
    assert_eq!(
        ended(stopped_at + 1).await.len(),
        1,
        "`since` bounds the list"
    );
    assert!(h.store.list_hosts().await.unwrap().is_empty());
    h.heartbeat("host-1", &[], LEASE_MS).await;
    let back = h.store.list_hosts().await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].id.as_str(), back[0].ended_at), ("host-1", None));
    assert_eq!(
        ended(t).await.len(),
        1,
        "a host that came back is not ended"
    );

    // Retention: ended registrations older than a day are forgotten when
    // another host ends.
    h.advance(switchyard_core::ENDED_HOST_RETENTION_MS + 1);
    h.store.deregister_host("host-1").await.unwrap();
    let left: Vec<String> = ended(0).await.into_iter().map(|x| x.0).collect();
    assert_eq!(left, ["host-1"], "host-2 ended more than a day ago");
}

/// `count_steps` counts steps by state, leaving out states with none.
pub async fn count_steps_by_state(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(
        h.store.count_steps().await.unwrap().is_empty(),
        "no steps, no states"
    );
    h.store
        .spawn((0..3).map(|i| NewTask::new("cs", json!(i))).collect())
        .await
        .unwrap();
    let claimed = h.claim("cs", 2).await;
    h.resolve(&claimed[0], Resolution::Completed(json!(0)))
        .await;
    h.spawn_handler("cs_root").await;
    let root = h.claim_one("cs_root").await;
    h.decide(
        &root,
        vec![new_step("x", "cs_x", &[]), new_step("y", "cs_y", &["x"])],
        None,
        json!(null),
    )
    .await;
    let expected: BTreeMap<String, u64> = [
        ("blocked", 1),
        ("completed", 2),
        ("ready", 2),
        ("running", 1),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    assert_eq!(h.store.count_steps().await.unwrap(), expected);
}

/// `task_counts` counts tasks by root handler and state; `finished_buckets`
/// counts finished tasks per time bucket and state from `since` on;
/// `failure_groups` groups failed tasks by handler and error message,
/// largest first, and follows retries.
pub async fn task_counts_buckets_and_failure_groups(factory: Factory) {
    let h = H::open(&factory).await;
    assert!(h.store.task_counts().await.unwrap().is_empty());
    assert!(h
        .store
        .finished_buckets(0, 60_000)
        .await
        .unwrap()
        .is_empty());
    assert!(h.store.failure_groups(0).await.unwrap().is_empty());
    let t0 = h.now();
    for handler in ["tc_ok", "tc_ok", "tc_bad", "tc_bad", "tc_bad", "tc_run"] {
        h.spawn_handler(handler).await;
    }
    let cancelled = h.spawn_handler("tc_cancel").await;
    let ok = h.claim("tc_ok", 2).await;
    h.resolve(&ok[0], Resolution::Completed(json!(1))).await;
    h.advance(60_005);
    let t1 = h.now();
    h.resolve(&ok[1], Resolution::Completed(json!(2))).await;
    let bad = h.claim("tc_bad", 3).await;
    for (s, m) in bad
        .iter()
        .zip(["card declined", "timeout", "card declined"])
    {
        h.resolve(
            s,
            Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, m)),
        )
        .await;
    }
    assert!(h.store.cancel_task(cancelled, false).await.unwrap());
    let counts: Vec<(String, String, u64)> = h
        .store
        .task_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.handler, c.state, c.count))
        .collect();
    let want = |v: &[(&str, &str, u64)]| -> Vec<(String, String, u64)> {
        v.iter()
            .map(|(a, b, n)| (a.to_string(), b.to_string(), *n))
            .collect()
    };
    assert_eq!(
        counts,
        want(&[
            ("tc_bad", "failed", 3),
            ("tc_cancel", "cancelled", 1),
            ("tc_ok", "completed", 2),
            ("tc_run", "running", 1),
        ])
    );
    let buckets: Vec<(Millis, String, u64)> = h
        .store
        .finished_buckets(t0, 60_000)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.start, b.state, b.count))
        .collect();
    assert_eq!(
        buckets,
        vec![
            (t0, "completed".to_string(), 1),
            (t0 + 60_000, "cancelled".to_string(), 1),
            (t0 + 60_000, "completed".to_string(), 1),
            (t0 + 60_000, "failed".to_string(), 3),
        ]
    );
    let later = h.store.finished_buckets(t1, 1_000).await.unwrap();
    assert_eq!(
        later.iter().map(|b| b.count).sum::<u64>(),
        5,
        "the task finished before `since` is left out: {later:?}"
    );
    assert!(later.iter().all(|b| b.start == t1), "{later:?}");
    assert!(matches!(
        h.store.finished_buckets(t0, 0).await,
        Err(Error::InvalidInput(_))
    ));
    let groups: Vec<(String, String, u64, Millis)> = h
        .store
        .failure_groups(0)
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.handler, g.message, g.count, g.last_failed_at))
        .collect();
    assert_eq!(
        groups,
        vec![
            ("tc_bad".to_string(), "card declined".to_string(), 2, t1),
            ("tc_bad".to_string(), "timeout".to_string(), 1, t1),
        ]
    );
    assert_eq!(h.store.failure_groups(1).await.unwrap().len(), 1);
    h.store.retry_task(bad[0].task_id).await.unwrap();
    let groups = h.store.failure_groups(0).await.unwrap();
    assert_eq!(
        groups.iter().map(|g| g.count).collect::<Vec<_>>(),
        vec![1, 1],
        "a retried task leaves its group: {groups:?}"
    );
}

/// `step_results` returns the results of the named completed steps, leaving
/// out unknown and unfinished ones.
pub async fn step_results_named_completed(factory: Factory) {
    let h = H::open(&factory).await;
    let id = h.spawn_handler("sr").await;
    let root = h.claim_one("sr").await;
    h.decide(
        &root,
        vec![new_step("a", "sr_w", &[]), new_step("b", "sr_w", &[])],
        None,
        json!("decided"),
    )
    .await;
    let a = h.claim_one("sr_w").await;
    assert_eq!(a.name, "a");
    h.resolve(&a, Resolution::Completed(json!({ "a": 1 })))
        .await;
    let names: Vec<String> = ["a", "b", "missing", "sr"].map(String::from).to_vec();
    let results = h.store.step_results(id, &names).await.unwrap();
    let expected: BTreeMap<String, Value> = [
        ("a".to_string(), json!({ "a": 1 })),
        ("sr".to_string(), json!("decided")),
    ]
    .into();
    assert_eq!(results, expected);
    assert!(h.store.step_results(id, &[]).await.unwrap().is_empty());
}

/// `cleanup_events` deletes events created before the cutoff, oldest first,
/// at most `batch` per call; newer events stay; a deleted name can be
/// emitted again (a new event, first write wins again); a waiter suspended
/// on it is woken by the new emit.
pub async fn cleanup_events_deletes_old_events_and_frees_their_names(factory: Factory) {
    let h = H::open(&factory).await;
    for i in 0..5 {
        assert!(h.emit(&format!("old.{i}"), json!(i)).await);
        h.advance(10);
    }
    let cutoff = h.now();
    h.advance(10);
    assert!(h.emit("new", json!("kept")).await);
    assert_eq!(h.store.cleanup_events(cutoff, 0).await.unwrap(), 0);
    assert_eq!(h.store.cleanup_events(cutoff, 2).await.unwrap(), 2);
    assert!(
        h.store.get_event("old.0").await.unwrap().is_none(),
        "oldest first"
    );
    assert!(h.store.get_event("old.2").await.unwrap().is_some());
    assert_eq!(h.store.cleanup_events(cutoff, 100).await.unwrap(), 3);
    assert_eq!(h.store.cleanup_events(cutoff, 100).await.unwrap(), 0);
    let left: Vec<String> = h
        .store
        .list_events(100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(left, ["new"], "events newer than the cutoff stay");

    // The name is free again: a step waiting on it is woken by the new emit.
    let id = h.spawn(NewTask::new("ce_wait", json!(null))).await;
    let step = h.claim_one("ce_wait").await;
    h.resolve(
        &step,
        Resolution::Suspended(WaitFor {
            event: Some("old.1".into()),
            ..WaitFor::default()
        }),
    )
    .await;
    assert_eq!(h.step_state(id, "ce_wait").await, StepState::Suspended);
    assert!(
        h.emit("old.1", json!("again")).await,
        "a deleted name is stored anew"
    );
    assert_eq!(
        h.store.get_event("old.1").await.unwrap().unwrap().payload,
        json!("again")
    );
    assert_eq!(h.step_state(id, "ce_wait").await, StepState::Ready);
}

/// Calls `cleanup` until it returns 0; returns the total and checks every
/// call stayed within `batch`.
async fn cleanup_all(h: &H, before: Millis, batch: usize) -> u64 {
    let mut total = 0;
    for _ in 0..1000 {
        let n = h.store.cleanup(before, batch).await.expect("cleanup");
        assert!(
            n <= batch as u64,
            "cleanup removed {n} tasks, more than the batch of {batch}"
        );
        if n == 0 {
            return total;
        }
        total += n;
    }
    panic!("cleanup never returned 0");
}

/// `cleanup` removes finished (completed, failed, cancelled) tasks older than
/// the cutoff with their steps, dependencies and checkpoints; unfinished
/// tasks of any age and recently finished ones are kept; cached events
/// (including response events of removed tasks) survive.
pub async fn cleanup_removes_old_finished_tasks(factory: Factory) {
    let h = H::open(&factory).await;
    // A completed task with several steps, a dependency and a checkpoint.
    let done = h
        .spawn(NewTask::new("cl_done", json!(1)).response_event("cl-done-ev"))
        .await;
    let root = h.claim_one("cl_done").await;
    h.put_checkpoint(&root, "cp", json!("saved")).await.unwrap();
    h.decide(
        &root,
        vec![new_step("b", "cl_w", &[]), new_step("c", "cl_w", &["b"])],
        None,
        json!("decided"),
    )
    .await;
    let b = h.claim_one("cl_w").await;
    h.resolve(&b, Resolution::Completed(json!("b"))).await;
    let c = h.claim_one("cl_w").await;
    h.resolve(&c, Resolution::Completed(json!("c"))).await;
    assert_eq!(h.task(done).await.state, TaskState::Completed);
    // A failed and a cancelled task.
    let failed = h.spawn_handler("cl_fail").await;
    let f = h.claim_one("cl_fail").await;
    h.resolve(
        &f,
        Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "boom")),
    )
    .await;
    let cancelled = h.spawn_handler("cl_cancel").await;
    assert!(h.store.cancel_task(cancelled, false).await.unwrap());
    // Unfinished tasks: one ready, one running.
    let waiting = h.spawn_handler("cl_wait").await;
    let running = h.spawn_handler("cl_run").await;
    let run = h.claim_one("cl_run").await;
    assert!(h.emit("cl-other-ev", json!("fact")).await);

    h.advance(10_000);
    let cutoff = h.now() - 5_000;
    // Finished after the cutoff: kept.
    let recent = h.spawn_handler("cl_recent").await;
    let r = h.claim_one("cl_recent").await;
    h.resolve(&r, Resolution::Completed(json!("recent"))).await;

    assert_eq!(cleanup_all(&h, cutoff, 100).await, 3);
    for id in [done, failed, cancelled] {
        assert!(
            h.store.get_task(id).await.unwrap().is_none(),
            "{id} removed"
        );
        assert!(h.store.task_detail(id).await.unwrap().is_none());
        assert!(h.store.checkpoints(id).await.unwrap().is_empty());
    }
    let names: Vec<String> = ["cl_done", "b", "c"].map(String::from).to_vec();
    assert!(h.store.step_results(done, &names).await.unwrap().is_empty());
    for id in [waiting, running, recent] {
        assert!(h.store.get_task(id).await.unwrap().is_some(), "{id} kept");
    }
    let expected: BTreeMap<String, u64> = [("completed", 1), ("ready", 1), ("running", 1)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    assert_eq!(
        h.store.count_steps().await.unwrap(),
        expected,
        "only the kept tasks' steps remain"
    );
    assert_eq!(
        h.store
            .list_tasks(&TaskFilter::default())
            .await
            .unwrap()
            .len(),
        3
    );
    assert!(h.store.get_event("cl-done-ev").await.unwrap().is_some());
    assert!(h.store.get_event("cl-other-ev").await.unwrap().is_some());
    // The kept running step is unaffected.
    h.resolve(&run, Resolution::Completed(json!("ok"))).await;
    assert_eq!(h.task(running).await.state, TaskState::Completed);
    // Nothing was old enough at the first cutoff; a later cutoff takes the rest
    // except the still-unfinished task.
    assert_eq!(cleanup_all(&h, cutoff, 100).await, 0);
    h.advance(1);
    assert_eq!(cleanup_all(&h, h.now(), 100).await, 2);
    assert!(h.store.get_task(waiting).await.unwrap().is_some());
}

/// `cleanup` never removes a task while its parent task exists: a finished
/// child of a running parent is kept (with its group outcome); once the
/// parent has finished and been removed, the child goes in a later call.
pub async fn cleanup_keeps_children_of_unfinished_parents(factory: Factory) {
    let h = H::open(&factory).await;
    let parent = h.spawn_handler("clp_parent").await;
    let p = h.claim_one("clp_parent").await;
    let group = "clp-group";
    let child = h.spawn_child("clp_child", &p, Some(group), 0).await;
    h.suspend(&p, wait_group(group)).await;
    let c = h.claim_one("clp_child").await;
    h.resolve(&c, Resolution::Completed(json!("child done")))
        .await;
    assert_eq!(h.task(child).await.state, TaskState::Completed);

    h.advance(10_000);
    assert_eq!(cleanup_all(&h, h.now(), 100).await, 0);
    assert!(h.store.get_task(child).await.unwrap().is_some());
    let outcomes = h.store.group_outcomes(group).await.unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].result, Some(json!("child done")));

    // The parent's replay still sees its child; then the parent finishes.
    let p = h.claim_one("clp_parent").await;
    h.resolve(&p, Resolution::Completed(json!("parent done")))
        .await;
    h.advance(1);
    let now = h.now();
    assert_eq!(h.store.cleanup(now, 100).await.unwrap(), 1, "parent first");
    assert!(h.store.get_task(parent).await.unwrap().is_none());
    assert!(
        h.store.get_task(child).await.unwrap().is_some(),
        "a child outlives its parent's removal by one call"
    );
    assert_eq!(h.store.cleanup(now, 100).await.unwrap(), 1);
    assert!(h.store.get_task(child).await.unwrap().is_none());
    assert!(h.store.group_outcomes(group).await.unwrap().is_empty());
    assert_eq!(h.store.cleanup(now, 100).await.unwrap(), 0);
    assert!(h.store.count_steps().await.unwrap().is_empty());
}

/// `cleanup` removes at most `batch` tasks per call (callers loop until 0),
/// and the idempotency keys of removed tasks can be used again.
pub async fn cleanup_batches_and_frees_idempotency_keys(factory: Factory) {
    let h = H::open(&factory).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = h
            .spawn(NewTask::new("clb", json!(i)).idempotency_key(format!("clb-{i}")))
            .await;
        assert!(h.store.cancel_task(id, false).await.unwrap());
        ids.push(id);
    }
    h.advance(1_000);
    let now = h.now();
    assert_eq!(h.store.cleanup(now, 0).await.unwrap(), 0, "batch 0");
    let mut calls = Vec::new();
    loop {
        let n = h.store.cleanup(now, 2).await.unwrap();
        calls.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(calls, [2, 2, 1, 0]);
    for id in &ids {
        assert!(h.store.get_task(*id).await.unwrap().is_none());
    }
    let again = h
        .store
        .spawn(vec![
            NewTask::new("clb", json!("again")).idempotency_key("clb-0")
        ])
        .await
        .unwrap();
    assert!(again[0].created, "the key is free again");
    assert!(!ids.contains(&again[0].task_id));
    assert_eq!(h.task(again[0].task_id).await.input, json!("again"));
}
