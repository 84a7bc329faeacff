//! The `Store` trait: the only I/O the core does.
//!
//! Every implementation (memory, sqlite, postgres) must pass the same contract
//! suite (`crates/switchyard-store/tests/contract.rs`). The rules below are
//! that contract; each write method is atomic (all or nothing).
//!
//! # State transitions applied by [`Store::complete`]
//!
//! A completion is applied only if the step is `running`, its `lease_owner`
//! is `lease.host_id` and its `run` is `lease.run` (the fence); otherwise
//! that item is answered with [`Error::LeaseLost`](crate::Error::LeaseLost) and nothing changes.
//!
//! # Runs and attempts
//!
//! Every claim starts a run: `run + 1` (the fencing token, never reused
//! and never reset) and `attempt + 1`. `attempt` counts attempts used: a run
//! that ends in `Suspended` or `Released` gives its attempt back
//! (`attempt - 1`), so waiting never costs one; a run that fails
//! (`Retry`), or whose lease expires, keeps it. Every write made on behalf
//! of a run (completion, checkpoint, heartbeat, [`Store::spawn_fenced`],
//! [`Store::emit_event_fenced`]) is fenced by (step, run, host): it applies
//! only while that run is the step's current one. A fenced write refused
//! because the step (or its task) was cancelled answers
//! [`Error::Cancelled`](crate::Error::Cancelled); otherwise [`Error::LeaseLost`](crate::Error::LeaseLost).
//!
//! * `Completed(v)`: step `completed` with result `v`, lease cleared. Every
//!   `blocked` step of the same task depending on this step's name has one
//!   fewer pending dependency; at zero it becomes `ready` (run_at = now). If
//!   the step is the task's final step, the task becomes `completed` with
//!   result `v` (see *task finish*).
//! * `Decided { steps, final_step, result }`: the step completes with
//!   `result` and `steps` are created in the same transaction (state
//!   `blocked` if some dependency is not completed yet, else `ready`),
//!   inheriting the task's priority. Dependencies may name steps created in
//!   the same decision or existing steps of the task; an unknown name or a
//!   duplicate step name rejects the item with [`Error::InvalidInput`](crate::Error::InvalidInput) and
//!   changes nothing. If the step was the final step: with `final_step =
//!   Some(name)` the named created step becomes the final step; with no steps
//!   the task completes with `result`; with steps but no `final_step`, the
//!   last step in `steps` becomes the final step.
//! * `Retry { error, run_at }`: step `ready` at `run_at`, lease cleared,
//!   `error` recorded.
//! * `Failed(e)`: step `failed` with `e`; the task fails with `e` (task
//!   finish) and its other non-terminal steps become `cancelled`.
//! * `Suspended(wait)`: step `suspended`, lease cleared, `attempt - 1` (a
//!   suspension costs no attempt), `run_at = wait.wake_at`, wait recorded. If the wait is already satisfied (the
//!   event exists, every child of the group has finished, or `wake_at <=
//!   now`), the step becomes `ready` at once instead.
//! * `Released`: step `ready` (run_at = now), lease cleared, `attempt - 1`
//!   (a graceful shutdown does not cost an attempt).
//!
//! *Task finish* (completed, failed or cancelled): the task's state, result
//! or error and `updated_at` are set; if it has a `response_event`, that event
//! is emitted (first write wins) with payload `{"task_id", "state", "result",
//! "error"}`; if it belongs to a delegation group and every task of the group
//! has now finished, the parent step (if `suspended` waiting on that group)
//! becomes `ready`. [`Signals::finished`] is notified.
//!
//! # Wake-ups
//!
//! Whenever a step may have become ready (spawn, dependency completed, retry,
//! event emitted, group finished, release, lease recovery, task retry) the
//! store calls [`Signals::notify_ready`] after the change is durable.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{broadcast, Notify};

use crate::error::Result;
use crate::model::*;

/// In-process wake-ups a store gives to hosts and clients sharing it.
/// (Cross-process changes are found by polling.)
#[derive(Debug)]
pub struct Signals {
    /// Some step may have become ready.
    pub ready: Notify,
    /// Some task finished.
    pub finished: Notify,
    /// Steps that were running and got cancelled (hosts stop their handlers).
    pub cancelled: broadcast::Sender<Vec<StepId>>,
}

impl Signals {
    /// Fresh signals.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: Notify::new(),
            finished: Notify::new(),
            cancelled: broadcast::channel(1024).0,
        })
    }
    /// Wakes every host waiting for ready steps.
    pub fn notify_ready(&self) {
        self.ready.notify_waiters();
    }
    /// Wakes every client waiting for a task to finish.
    pub fn notify_finished(&self) {
        self.finished.notify_waiters();
    }
    /// Tells in-process hosts these running steps were cancelled.
    pub fn notify_cancelled(&self, steps: Vec<StepId>) {
        if !steps.is_empty() {
            let _ = self.cancelled.send(steps);
        }
    }
}

/// Where tasks, steps, checkpoints, events and hosts live.
///
/// # Cancel safety
/// Dropping a returned future before it completes may or may not have
/// applied the write (as with any database call); every write is atomic, so
/// it was applied entirely or not at all.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `memory`, `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// The URL the store was opened with (without credentials).
    fn url(&self) -> String;
    /// In-process wake-ups.
    fn signals(&self) -> &Arc<Signals>;
    /// How often hosts should poll for work made by other processes.
    fn poll_interval(&self) -> std::time::Duration;
    /// The store's clock.
    async fn now(&self) -> Result<Millis>;
    /// Applies pending schema migrations; returns the schema version.
    async fn migrate(&self) -> Result<u32>;

    /// Creates tasks, each with a root step named after its handler (`ready`
    /// at `run_at`, default now). A task whose idempotency key already exists
    /// is not created: the existing id is returned with `created = false`.
    /// Answers in input order.
    async fn spawn(&self, tasks: Vec<NewTask>) -> Result<Vec<Spawned>>;

    /// Promotes `suspended` steps whose `run_at` has passed to `ready`, then
    /// leases up to `n` ready steps (run_at <= now) for each `(handler, n)`,
    /// highest priority first, then earliest `run_at`, then creation order:
    /// state `running`, `run + 1`, `attempt + 1`, `lease_owner = host_id`,
    /// `lease_expires_at = now + lease_ms`. Never returns more than asked.
    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<ClaimBatch>;

    /// Applies completions (see the module docs); one answer per item, in
    /// order. The outer error is for a failure of the whole batch.
    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>>;

    /// Registers or refreshes `host` (last_heartbeat = now) and extends to
    /// `now + lease_ms` the lease of each run in `running` that is still its
    /// step's current run under this host. Reports the others as `lost`,
    /// and those of them whose step was cancelled also as `cancelled`.
    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
    ) -> Result<HeartbeatReply>;

    /// Which of `steps` are `cancelled`, in any order. Hosts ask this for
    /// their running steps every poll interval (at most 100 ms), so a cancel
    /// made in another process reaches the handler promptly; it must be a
    /// cheap read.
    async fn cancelled_steps(&self, steps: &[StepId]) -> Result<Vec<StepId>>;

    /// A host known to be dead: the leases of every step running under
    /// `host_id` expire now (the next [`Store::recover_expired`] makes them
    /// ready, costing the attempt as any lost lease does) and its
    /// registration ends as [`HOST_DEAD`]. Returns
    /// how many leases were expired.
    async fn expire_host(&self, host_id: &str) -> Result<u64>;

    /// Ends a host registration (clean shutdown:
    /// [`HOST_STOPPED`]).
    async fn deregister_host(&self, host_id: &str) -> Result<()>;

    /// Makes every `running` step whose lease expired `ready` again (run_at
    /// = now, lease cleared, attempt kept, so the lost run costs an attempt,
    /// error `LeaseExpired` recorded). Returns how many.
    async fn recover_expired(&self) -> Result<u64>;

    /// Writes checkpoint `key` of the lease's task, and extends the lease to
    /// now + `lease_ms`. Rejected with [`Error::LeaseLost`](crate::Error::LeaseLost) unless the lease
    /// is current ([`Error::Cancelled`](crate::Error::Cancelled) if the step was cancelled). An
    /// existing checkpoint written by a newer run is never overwritten (the
    /// call then succeeds without writing).
    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> Result<()>;

    /// Every checkpoint of a task, by key.
    async fn checkpoints(&self, task_id: TaskId) -> Result<BTreeMap<String, Value>>;

    /// Emits an event: cached under `name` unless one exists (first write
    /// wins); every step `suspended` waiting on `name` becomes `ready`.
    /// Returns true if this call stored the payload.
    async fn emit_event(&self, name: &str, payload: Value) -> Result<bool>;

    /// [`Store::emit_event`] on behalf of a run: applied only if `fence` is
    /// its step's current lease, checked in the same transaction
    /// ([`Error::LeaseLost`](crate::Error::LeaseLost), or [`Error::Cancelled`](crate::Error::Cancelled) if the step was
    /// cancelled, and nothing emitted).
    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> Result<bool>;

    /// [`Store::spawn`] on behalf of a run (children of `ctx.spawn` and
    /// `ctx.delegate`): created only if `fence` is its step's current lease,
    /// checked in the same transaction, so a run that lost its lease or was
    /// cancelled (even by a cascade that has already finished) creates no
    /// children ([`Error::LeaseLost`](crate::Error::LeaseLost) or [`Error::Cancelled`](crate::Error::Cancelled)).
    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> Result<Vec<Spawned>>;

    /// A cached event.
    async fn get_event(&self, name: &str) -> Result<Option<EventRecord>>;

    /// Cached events, newest first (`limit` 0 = 100).
    async fn list_events(&self, limit: usize) -> Result<Vec<EventRecord>> {
        self.list_events_prefixed("", limit).await
    }

    /// Cached events whose name starts with `prefix` (plain text: no
    /// wildcards), newest first (`limit` 0 = 100).
    async fn list_events_prefixed(&self, prefix: &str, limit: usize) -> Result<Vec<EventRecord>>;

    /// Per handler: step counts by state and the oldest ready step, for
    /// every handler that has steps.
    async fn handler_stats(&self) -> Result<Vec<HandlerStats>>;

    /// Tasks counted by root handler and state (pairs with none are left
    /// out), ordered by handler then state. A full scan: for the admin API.
    async fn task_counts(&self) -> Result<Vec<TaskCount>>;

    /// Tasks that finished (`completed`, `failed`, `cancelled`) at or after
    /// `since`, counted per bucket of `bucket_ms` milliseconds (bucket `k`
    /// starts at `since + k * bucket_ms`) and per state; buckets with none
    /// are left out; ordered by start then state. `bucket_ms` must be at
    /// least 1 ([`crate::Error::InvalidInput`]).
    async fn finished_buckets(&self, since: Millis, bucket_ms: i64) -> Result<Vec<FinishedBucket>>;

    /// Failed tasks grouped by root handler and error message, the largest
    /// groups first (then by handler and message), at most `limit` groups
    /// (`limit` 0 = 100).
    async fn failure_groups(&self, limit: usize) -> Result<Vec<FailureGroup>>;

    /// Number of `running` steps leased by each host (hosts with none are
    /// left out): the steps in flight.
    async fn running_by_host(&self) -> Result<BTreeMap<String, u64>>;

    /// The children of a delegation group, ordered by their index.
    async fn group_outcomes(&self, group: &str) -> Result<Vec<ChildOutcome>>;

    /// Results of the named completed steps of a task (missing names are
    /// left out).
    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> Result<BTreeMap<String, Value>>;

    /// Cancels a running task: state `cancelled`, every non-terminal step
    /// `cancelled` (running ones are announced on [`Signals::cancelled`] and
    /// reported as lost by the next heartbeat), task finish applies. With
    /// `cascade`, unfinished descendants are cancelled too, also when the
    /// task itself had already finished. Returns false if the task had
    /// already finished; [`Error::NotFound`](crate::Error::NotFound) if it does not exist.
    async fn cancel_task(&self, id: TaskId, cascade: bool) -> Result<bool>;

    /// Re-runs a `failed` or `cancelled` task: state `running`, error
    /// cleared; each step that is not `completed` becomes `ready` (attempt 0;
    /// `run` is kept, so runs of the earlier tries stay fenced out)
    /// if all its dependencies are completed, else `blocked`. Completed steps
    /// and checkpoints are kept. [`Error::Conflict`](crate::Error::Conflict) if the task is running or
    /// completed; [`Error::NotFound`](crate::Error::NotFound) if it does not exist.
    async fn retry_task(&self, id: TaskId) -> Result<()>;

    /// Retention: deletes up to `batch` finished tasks (`completed`,
    /// `failed` or `cancelled`) whose `updated_at < finished_before`,
    /// together with everything that belongs to them (steps, step
    /// dependencies, checkpoints, group and children bookkeeping), in one
    /// short transaction. Returns how many tasks were deleted (never more
    /// than `batch`); callers loop until it returns 0, so a large backlog is
    /// removed in bounded batches.
    ///
    /// * Only tasks without a parent task are deleted: a root task, or a
    ///   child whose parent task has already been deleted. A child is
    ///   therefore never deleted while its parent exists (a parent's replay,
    ///   including after [`Store::retry_task`], reads its children's
    ///   outcomes), and never while its parent is unfinished. A finished
    ///   tree is removed parent first; its finished children become
    ///   eligible in the following calls.
    /// * Unfinished tasks are never deleted, whatever their age.
    /// * Cached events are not deleted (they are first-write-wins facts).
    /// * The idempotency keys of deleted tasks become free: a later spawn
    ///   with the same key creates a new task.
    async fn cleanup(&self, finished_before: Millis, batch: usize) -> Result<u64>;

    /// Deletes up to `batch` cached events created before `created_before`
    /// (oldest first) and returns how many were deleted; call until it
    /// returns 0. Opt-in retention (`switchyard cleanup
    /// --events-older-than`):
    ///
    /// * a step that already received the event keeps it (its
    ///   `await_event` checkpointed the payload), replays included;
    /// * a step that awaits the name afterwards waits for it to be emitted
    ///   again, as for an event never emitted;
    /// * the name is free again: the next emit stores a new event (first
    ///   write wins from then on), so a reused response-event name reports
    ///   the new task's outcome.
    async fn cleanup_events(&self, created_before: Millis, batch: usize) -> Result<u64>;

    /// One task.
    async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>>;

    /// One task with its steps, checkpoints and children.
    async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>>;

    /// Tasks, newest first.
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>>;

    /// Registered hosts, newest heartbeat first (hosts whose registration
    /// ended are left out: see [`Store::ended_hosts`]).
    async fn list_hosts(&self) -> Result<Vec<HostInfo>>;

    /// Hosts whose registration ended ([`Store::deregister_host`],
    /// [`Store::expire_host`]) at or after `since`, most recently ended
    /// first, with [`HostInfo::ended_at`] and [`HostInfo::end_reason`] set.
    /// Ended registrations are kept for
    /// [`ENDED_HOST_RETENTION_MS`];
    /// a host that heartbeats again is registered again.
    async fn ended_hosts(&self, since: Millis) -> Result<Vec<HostInfo>>;

    /// Number of steps in each state (states with none are left out).
    async fn count_steps(&self) -> Result<StateCounts>;
}

/// A shared store handle.
pub type DynStore = Arc<dyn Store>;
