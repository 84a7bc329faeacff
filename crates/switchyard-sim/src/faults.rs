//! The fault injector: a [`Store`] that delegates every call to the shared
//! memory store, one method per trait method, after drawing a fault for it
//! (delay, transient failure before applying, reply lost after applying),
//! and that observes what the inner store accepted for the invariants.
//!
//! One `FaultStore` exists per simulated host (and one for the client), all
//! wrapping the same inner store, so faults can target one host: a crashed
//! host's calls never return, a stalled host's heartbeats fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use switchyard_core::{
    ChildOutcome, ClaimBatch, Completion, Error, EventRecord, HeartbeatReply, HostInfo, Lease,
    Millis, NewTask, Resolution, Result, RunRef, Signals, Spawned, StateCounts, StepId, StepState,
    Store, TaskDetail, TaskFilter, TaskId, TaskRecord,
};

use crate::world::{RunObs, World, RUN};

/// Who makes the calls through a wrapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The driver's client.
    Client,
    /// Simulated host number `n`.
    Host(usize),
}

/// The fault-injecting, observing store wrapper.
pub struct FaultStore {
    inner: Arc<dyn Store>,
    world: Arc<World>,
    who: Who,
}

/// What to do after applying a call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    Reply,
    LoseReply,
}

impl FaultStore {
    /// A wrapper of `inner` for `who`.
    pub fn new(inner: Arc<dyn Store>, world: Arc<World>, who: Who) -> Self {
        Self { inner, world, who }
    }

    fn name(&self) -> String {
        match self.who {
            Who::Client => "client".into(),
            Who::Host(i) => format!("h{i}"),
        }
    }

    /// A crashed host's calls never return (the process is gone; its
    /// futures are dropped with the runtime at the end of the run).
    async fn hang_if_crashed(&self) {
        if let Who::Host(i) = self.who {
            if self.world.crashed(i) {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Draws this call's fault: may delay, may fail it before it is
    /// applied; says whether to lose the reply after applying it.
    async fn pre(&self, op: &'static str, write: bool) -> Result<After> {
        self.hang_if_crashed().await;
        let (delay, fail, lose) = {
            let f = self.world.faults.lock();
            if !f.on {
                (0, false, false)
            } else {
                let (pd, pf, pl) = (f.p_delay, f.p_fail, f.p_lose);
                drop(f);
                self.world.with_rng(|r| {
                    let delay = if r.chance(pd) { r.range(1, 400) } else { 0 };
                    let fail = r.chance(pf);
                    let lose = write && !fail && r.chance(pl);
                    (delay, fail, lose)
                })
            }
        };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            self.hang_if_crashed().await;
        }
        if fail {
            self.world
                .trace(|| format!("fault {} {op}: transient failure", self.name()));
            return Err(Error::Store(format!("sim: injected failure of {op}")));
        }
        if lose {
            self.world
                .trace(|| format!("fault {} {op}: applied, reply lost", self.name()));
            return Ok(After::LoseReply);
        }
        Ok(After::Reply)
    }

    fn post<T>(&self, op: &str, after: After, r: Result<T>) -> Result<T> {
        match (after, r) {
            (After::LoseReply, Ok(_)) => Err(Error::Store(format!("sim: reply of {op} lost"))),
            (_, r) => r,
        }
    }

    fn note_host(&self, host_id: &str) {
        if let Who::Host(i) = self.who {
            self.world
                .obs
                .lock()
                .host_ids
                .entry(i)
                .or_insert_with(|| host_id.to_string());
        }
    }

    /// The store's view of a step: (state, run, lease owner).
    async fn step_state(
        &self,
        task: TaskId,
        step: StepId,
    ) -> Option<(StepState, u64, Option<String>)> {
        let d = self.inner.task_detail(task).await.ok()??;
        d.steps
            .into_iter()
            .find(|s| s.id == step)
            .map(|s| (s.state, s.run, s.lease_owner))
    }

    /// Fencing check for a handler's write that was accepted (emit, spawn):
    /// the run that made it must still be the step's current run.
    async fn check_fenced(&self, what: &str, invariant: &'static str) {
        let Ok(tag) = RUN.try_with(|t| t.clone()) else {
            return;
        };
        let current = self.step_state(tag.task, tag.step).await;
        let ok = matches!(&current, Some((StepState::Running, r, Some(h))) if *r == tag.run && *h == tag.host_id);
        if !ok {
            let now = match &current {
                Some((s, r, h)) => format!(
                    "step is {s}, run {r}, lease {}",
                    h.as_deref()
                        .map(|h| self.world.host_name(h))
                        .unwrap_or("-".into())
                ),
                None => "step not found".into(),
            };
            self.world.violation(
                invariant,
                format!(
                    "{what} accepted from run {} (attempt {}, {}) of step {} in task {} that is not current ({now})",
                    tag.run,
                    tag.attempt,
                    self.world.host_name(&tag.host_id),
                    tag.step,
                    tag.task
                ),
            );
        }
    }

    fn observe_completions(&self, items: &[Completion], results: &[Result<()>]) {
        for (c, r) in items.iter().zip(results) {
            let kind = resolution_kind(&c.resolution);
            let step = c.lease.step_id;
            self.world.trace(|| {
                format!(
                    "complete {} step {} run {} {kind}: {}",
                    self.name(),
                    step,
                    c.lease.run,
                    if r.is_ok() { "accepted" } else { "rejected" }
                )
            });
            if r.is_err() {
                continue;
            }
            let mut bad: Vec<(&'static str, String)> = Vec::new();
            {
                let mut o = self.world.obs.lock();
                let runs = o.runs.entry(step).or_default();
                let last = runs.len().checked_sub(1);
                match runs
                    .iter()
                    .rposition(|r| r.run == c.lease.run && r.host_id == c.lease.host_id)
                {
                    None => bad.push((
                        "stale-run-completion",
                        format!(
                            "completion ({kind}) of step {step} accepted for run {} that no claim granted",
                            c.lease.run
                        ),
                    )),
                    Some(j) => {
                        if Some(j) != last {
                            bad.push((
                                "stale-run-completion",
                                format!(
                                    "completion ({kind}) of step {step} accepted from run #{} (run {}) while run #{} is current",
                                    j + 1,
                                    c.lease.run,
                                    runs.len()
                                ),
                            ));
                        }
                        if let Some(prev) = runs[j].accepted {
                            bad.push((
                                "one-completion-per-run",
                                format!(
                                    "second accepted completion ({kind}, first was {prev}) for run #{} (run {}) of step {step}",
                                    j + 1,
                                    c.lease.run
                                ),
                            ));
                        }
                        runs[j].accepted = Some(kind);
                        if let Resolution::Failed(e) | Resolution::Retry { error: e, .. } =
                            &c.resolution
                        {
                            runs[j].accepted_error = Some(e.message.clone());
                        }
                    }
                }
            }
            for (inv, m) in bad {
                self.world.violation(inv, m);
            }
        }
    }
}

/// A short name for a resolution.
pub fn resolution_kind(r: &Resolution) -> &'static str {
    match r {
        Resolution::Completed(_) => "completed",
        Resolution::Decided { .. } => "decided",
        Resolution::Retry { .. } => "retry",
        Resolution::Failed(_) => "failed",
        Resolution::Suspended(_) => "suspended",
        Resolution::Released => "released",
    }
}

#[async_trait]
impl Store for FaultStore {
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
        // Never faulted: the worker falls back to the wall clock when the
        // store clock fails, which would make the run depend on real time.
        self.hang_if_crashed().await;
        self.inner.now().await
    }

    async fn migrate(&self) -> Result<u32> {
        self.inner.migrate().await
    }

    async fn spawn(&self, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        self.spawn_maybe_fenced(None, tasks).await
    }

    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        self.spawn_maybe_fenced(Some(fence), tasks).await
    }

    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> Result<bool> {
        self.emit_maybe_fenced(Some(fence), name, payload).await
    }

    async fn emit_event(&self, name: &str, payload: Value) -> Result<bool> {
        self.emit_maybe_fenced(None, name, payload).await
    }

    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<ClaimBatch> {
        self.note_host(host_id);
        let after = self.pre("claim", true).await?;
        let r = self.inner.claim(host_id, wants, lease_ms).await;
        if let Ok(b) = &r {
            let mut o = self.world.obs.lock();
            for s in &b.steps {
                o.step_task.insert(s.step_id, s.task_id);
                o.step_handler.insert(s.step_id, s.handler.clone());
                o.runs.entry(s.step_id).or_default().push(RunObs {
                    attempt: s.attempt,
                    run: s.run,
                    host_id: host_id.to_string(),
                    accepted: None,
                    accepted_error: None,
                    body_entered: false,
                });
            }
            drop(o);
            for s in &b.steps {
                self.world.trace(|| {
                    format!(
                        "claim {} step {} `{}` of task {} attempt {} run {}",
                        self.name(),
                        s.step_id,
                        s.name,
                        s.task_id,
                        s.attempt,
                        s.run
                    )
                });
            }
        }
        self.post("claim", after, r)
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>> {
        let after = self.pre("complete", true).await?;
        let r = self.inner.complete(completions.clone()).await;
        if let Ok(results) = &r {
            self.observe_completions(&completions, results);
        }
        self.post("complete", after, r)
    }

    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
    ) -> Result<HeartbeatReply> {
        self.note_host(&host.id);
        self.hang_if_crashed().await;
        self.check_heartbeat_covers(&host.id, running).await;
        if let Who::Host(i) = self.who {
            let until = self.world.faults.lock().stalled_until.get(&i).copied();
            if let Some(until) = until {
                if self.world.now_ms() < until {
                    self.world.trace(|| format!("fault h{i} heartbeat stalled"));
                    tokio::time::sleep(Duration::from_millis(lease_ms as u64 / 4)).await;
                    return Err(Error::Store("sim: heartbeat stalled".into()));
                }
            }
        }
        // Sorted: the worker lists its running steps from a HashMap, and the
        // order of the `lost` answer decides the order handlers are woken.
        let mut ids = running.to_vec();
        ids.sort();
        let after = self.pre("heartbeat", true).await?;
        let r = self.inner.heartbeat(host, &ids, lease_ms).await;
        if let Ok(reply) = &r {
            if !reply.lost.is_empty() {
                self.world
                    .trace(|| format!("heartbeat {} lost {:?}", self.name(), reply.lost));
            }
        }
        self.post("heartbeat", after, r)
    }

    async fn cancelled_steps(&self, steps: &[StepId]) -> Result<Vec<StepId>> {
        let after = self.pre("cancelled_steps", false).await?;
        let r = self.inner.cancelled_steps(steps).await;
        self.post("cancelled_steps", after, r)
    }

    async fn expire_host(&self, host_id: &str) -> Result<u64> {
        let after = self.pre("expire_host", true).await?;
        let r = self.inner.expire_host(host_id).await;
        self.post("expire_host", after, r)
    }

    async fn deregister_host(&self, host_id: &str) -> Result<()> {
        let after = self.pre("deregister_host", true).await?;
        let r = self.inner.deregister_host(host_id).await;
        self.post("deregister_host", after, r)
    }

    async fn recover_expired(&self) -> Result<u64> {
        let after = self.pre("recover_expired", true).await?;
        let r = self.inner.recover_expired().await;
        if let Ok(n) = r {
            if n > 0 {
                self.world
                    .trace(|| format!("recover {} {n} expired leases", self.name()));
            }
        }
        self.post("recover_expired", after, r)
    }

    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> Result<()> {
        let after = self.pre("put_checkpoint", true).await?;
        let r = self
            .inner
            .put_checkpoint(lease, key, value.clone(), lease_ms)
            .await;
        if r.is_ok() {
            self.world.trace(|| {
                format!(
                    "checkpoint {} task {} key {key:?} = {value}",
                    self.name(),
                    lease.task_id
                )
            });
            self.world.cp_commit(lease.task_id, &value);
        }
        self.post("put_checkpoint", after, r)
    }

    async fn checkpoints(&self, task_id: TaskId) -> Result<BTreeMap<String, Value>> {
        let after = self.pre("checkpoints", false).await?;
        let r = self.inner.checkpoints(task_id).await;
        self.post("checkpoints", after, r)
    }

    async fn get_event(&self, name: &str) -> Result<Option<EventRecord>> {
        let after = self.pre("get_event", false).await?;
        let r = self.inner.get_event(name).await;
        self.post("get_event", after, r)
    }

    async fn list_events(&self, limit: usize) -> Result<Vec<EventRecord>> {
        self.inner.list_events(limit).await
    }

    async fn list_events_prefixed(&self, prefix: &str, limit: usize) -> Result<Vec<EventRecord>> {
        self.inner.list_events_prefixed(prefix, limit).await
    }

    async fn handler_stats(&self) -> Result<Vec<switchyard_core::HandlerStats>> {
        self.inner.handler_stats().await
    }

    async fn task_counts(&self) -> Result<Vec<switchyard_core::TaskCount>> {
        self.inner.task_counts().await
    }

    async fn finished_buckets(
        &self,
        since: Millis,
        bucket_ms: i64,
    ) -> Result<Vec<switchyard_core::FinishedBucket>> {
        self.inner.finished_buckets(since, bucket_ms).await
    }

    async fn failure_groups(&self, limit: usize) -> Result<Vec<switchyard_core::FailureGroup>> {
        self.inner.failure_groups(limit).await
    }

    async fn running_by_host(&self) -> Result<BTreeMap<String, u64>> {
        self.inner.running_by_host().await
    }

    async fn group_outcomes(&self, group: &str) -> Result<Vec<ChildOutcome>> {
        let after = self.pre("group_outcomes", false).await?;
        let r = self.inner.group_outcomes(group).await;
        self.post("group_outcomes", after, r)
    }

    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> Result<BTreeMap<String, Value>> {
        let after = self.pre("step_results", false).await?;
        let r = self.inner.step_results(task_id, names).await;
        self.post("step_results", after, r)
    }

    async fn cancel_task(&self, id: TaskId, cascade: bool) -> Result<bool> {
        let after = self.pre("cancel_task", true).await?;
        let r = self.inner.cancel_task(id, cascade).await;
        if let Ok(done) = r {
            self.world
                .trace(|| format!("cancel task {id} cascade={cascade}: {done}"));
            let seq = self.world.next_seq();
            let mut o = self.world.obs.lock();
            if let Some(t) = o.tasks.get_mut(&id) {
                if done {
                    t.cancelled = true;
                }
                // A cascade reaches the descendants even when the task
                // itself had already finished.
                if cascade && t.cascade_at.is_none() {
                    t.cascade_at = Some(seq);
                }
            }
        }
        self.post("cancel_task", after, r)
    }

    async fn retry_task(&self, id: TaskId) -> Result<()> {
        self.inner.retry_task(id).await
    }

    async fn cleanup(&self, finished_before: Millis, batch: usize) -> Result<u64> {
        self.inner.cleanup(finished_before, batch).await
    }

    async fn cleanup_events(&self, created_before: Millis, batch: usize) -> Result<u64> {
        self.inner.cleanup_events(created_before, batch).await
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        let after = self.pre("get_task", false).await?;
        let r = self.inner.get_task(id).await;
        self.post("get_task", after, r)
    }

    async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        let after = self.pre("task_detail", false).await?;
        let r = self.inner.task_detail(id).await;
        self.post("task_detail", after, r)
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        self.inner.list_tasks(filter).await
    }

    async fn list_hosts(&self) -> Result<Vec<HostInfo>> {
        self.inner.list_hosts().await
    }

    async fn ended_hosts(&self, since: Millis) -> Result<Vec<HostInfo>> {
        self.inner.ended_hosts(since).await
    }

    async fn count_steps(&self) -> Result<StateCounts> {
        self.inner.count_steps().await
    }
}

impl FaultStore {
    async fn spawn_maybe_fenced(
        &self,
        fence: Option<&Lease>,
        tasks: Vec<NewTask>,
    ) -> Result<Vec<Spawned>> {
        let after = self.pre("spawn", true).await?;
        let r = match fence {
            Some(f) => self.inner.spawn_fenced(f, tasks.clone()).await,
            None => self.inner.spawn(tasks.clone()).await,
        };

        if let Ok(spawned) = &r {
            for (t, s) in tasks.iter().zip(spawned) {
                if !s.created {
                    continue;
                }
                let seq = self.world.next_seq();
                let parent = t.parent.as_ref().map(|p| p.task_id);
                let expect = crate::workload::expect_of(&t.handler, &t.input);
                self.world.trace(|| {
                    format!(
                        "spawn {} task {} ({}) parent {:?}",
                        self.name(),
                        s.task_id,
                        t.handler,
                        parent
                    )
                });
                let cascaded = {
                    let mut o = self.world.obs.lock();
                    o.tasks.insert(
                        s.task_id,
                        crate::world::TaskInfo {
                            handler: t.handler.clone(),
                            expect,
                            parent,
                            cancelled: false,
                            cascade_at: None,
                            created_at: seq,
                        },
                    );
                    // The nearest ancestor cancelled with cascade, if any.
                    let mut cur = parent;
                    let mut found = None;
                    while let Some(id) = cur {
                        let Some(info) = o.tasks.get(&id) else { break };
                        if info.cascade_at.is_some() {
                            found = Some(id);
                            break;
                        }
                        cur = info.parent;
                    }
                    found
                };
                if let Some(a) = cascaded {
                    self.world.violation(
                        "cascade-cancel",
                        format!(
                            "child task {} ({}) created after its ancestor {a} was cancelled with cascade",
                            s.task_id, t.handler
                        ),
                    );
                }
            }
            if tasks
                .iter()
                .zip(spawned)
                .any(|(t, s)| s.created && t.parent.is_some())
            {
                self.check_fenced("spawn of a child task", "fenced-spawn")
                    .await;
            }
        }
        self.post("spawn", after, r)
    }

    async fn emit_maybe_fenced(
        &self,
        fence: Option<&Lease>,
        name: &str,
        payload: Value,
    ) -> Result<bool> {
        let after = self.pre("emit_event", true).await?;
        let r = match fence {
            Some(f) => self.inner.emit_event_fenced(f, name, payload).await,
            None => self.inner.emit_event(name, payload).await,
        };
        if let Ok(stored) = r {
            self.world
                .trace(|| format!("emit {} {name:?} stored={stored}", self.name()));
            self.check_fenced(&format!("emit of event `{name}`"), "fenced-emit")
                .await;
        }
        self.post("emit_event", after, r)
    }

    /// A host's heartbeat must list every step it holds a live lease for
    /// whose handler body has started: otherwise the host lost track of a
    /// run it still owns (its lease will lapse although the host is alive).
    async fn check_heartbeat_covers(&self, host_id: &str, running: &[RunRef]) {
        // `ctx.heartbeat()` from a handler lists only its own step.
        if RUN.try_with(|_| ()).is_ok() || self.world.obs.lock().runs.is_empty() {
            return;
        }
        let cands: Vec<(TaskId, StepId, u64)> = {
            let o = self.world.obs.lock();
            o.runs
                .iter()
                .filter_map(|(step, rs)| {
                    let r = rs.last()?;
                    (r.host_id == host_id && r.body_entered && r.accepted.is_none())
                        .then(|| Some((*o.step_task.get(step)?, *step, r.run)))
                        .flatten()
                })
                .collect()
        };
        let mut cands = cands;
        cands.sort();
        for (task, step, run) in cands {
            if running.contains(&RunRef { step_id: step, run }) {
                continue;
            }
            if let Some((StepState::Running, r, Some(h))) = self.step_state(task, step).await {
                if r == run && h == host_id {
                    self.world.violation(
                        "heartbeat-tracks-runs",
                        format!(
                            "{} heartbeats without step {step} of task {task} although it holds the step's lease (run {run}) and the run's handler started: the host lost track of the run and its lease will lapse",
                            self.world.host_name(host_id)
                        ),
                    );
                }
            }
        }
    }
}
