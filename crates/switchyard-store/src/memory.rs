//! The in-memory store: tests and non-durable runs.
//!
//! Nothing outside this process can change it, so it needs no polling and no
//! transactions: all state sits behind one `parking_lot::Mutex`, every
//! operation is one short critical section that never awaits (which is what
//! makes each write atomic), and [`Signals`] are fired only after the lock is
//! released so a woken host never contends with the writer that woke it.
//!
//! # Indexes
//!
//! The hot path (spawn, claim, complete) must cost a few hundred nanoseconds
//! per step, so it never scans:
//!
//! * **Ready index**, per handler: a `BTreeSet` of `(Reverse(priority),
//!   run_at, creation seq, step)` holding exactly the steps that are `ready`
//!   *and due*. Claiming is `pop_first`. Entries are removed eagerly whenever
//!   a step leaves `ready` (the key is recomputable from the step), so the
//!   set never holds stale entries.
//! * **Delay heap**, per handler: future work (a `ready` step whose `run_at`
//!   is ahead, or a `suspended` step with a `wake_at`). Entries are
//!   invalidated lazily: each push gets a fresh generation number recorded on
//!   the step, and a popped entry whose generation no longer matches is
//!   dropped. `claim` drains due entries of every handler into the ready
//!   index (that is the "promote suspended steps" of the contract), and
//!   `next_due` is the earliest valid entry of the requested handlers.
//! * **Waiters**: event name → steps suspended on it; **running**: the set of
//!   leased steps, so `recover_expired` scans only those; **groups**: the
//!   children of each delegation group with a count of unfinished ones, so a
//!   child finishing does not rescan its siblings.
//! * Per task: dependants by dependency name with a pending counter on each
//!   blocked step, so a completion unblocks in O(dependants).
//!
//! Rows are boxed so that growing the big maps moves pointers, not records
//! (no multi-hundred-megabyte memcpy pauses in long benchmarks). A task's
//! input lives only on its root step and a completed task's result only on
//! its final step (they are always the same values); records are assembled
//! when read.
//!
//! Ids are UUIDv7 built from the store's clock by a small generator inside the
//! lock (monotonic, no system call per id).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::{json, Value};
use switchyard_core::ids::IdGen;
use switchyard_core::{
    CheckpointRecord, ChildOutcome, ClaimBatch, ClaimedStep, Clock, Completion, Error, ErrorInfo,
    ErrorKind, EventRecord, HeartbeatReply, HostInfo, Lease, Millis, NewStep, NewTask, Resolution,
    Result, RunRef, Signals, Spawned, StateCounts, StepId, StepRecord, StepState, Store,
    SystemClock, TaskDetail, TaskFilter, TaskId, TaskRecord, TaskState, WaitFor,
    ENDED_HOST_RETENTION_MS, HOST_DEAD, HOST_STOPPED,
};

/// Default page size of the list calls when the caller passes 0.
const DEFAULT_LIMIT: usize = 100;

/// A multiply-fold hasher for the id- and handler-keyed maps on the hot path:
/// SipHash would cost more than the rest of a claim. The keys are UUIDs with
/// random low bits and handler names chosen by the program, so HashDoS
/// resistance buys nothing here.
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        let m = u128::from(self.0 ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(c);
            self.mix(u64::from_le_bytes(buf));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n) | 0x100);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// Claim order: highest priority, then earliest run_at, then creation order.
type ReadyKey = (Reverse<i32>, Millis, u64, StepId);

/// A delay-heap entry: (due time, generation, step).
type DelayEntry = Reverse<(Millis, u64, StepId)>;

/// Where a step currently sits in the dispatch indexes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    /// In no index (blocked, running, terminal, or suspended without wake_at).
    Unindexed,
    /// In its handler's ready index, under [`ready_key`].
    Ready,
    /// In its handler's delay heap with this generation.
    Delayed(u64),
}

struct StepRow {
    rec: StepRecord,
    /// Creation order, the last claim tie-breaker.
    seq: u64,
    slot: Slot,
    /// Distinct dependencies not completed yet (meaningful while `blocked`).
    pending: u32,
}

struct TaskRow {
    /// `input` is kept on the root step and `result` on the final step.
    rec: TaskRecord,
    root: StepId,
    /// The step whose completion completes the task.
    final_step: StepId,
    /// Steps other than the root, in creation order.
    steps: Vec<StepId>,
    /// Steps other than the root (whose name is `rec.handler`), by name.
    names: HashMap<String, StepId>,
    /// Dependency name → steps created while it was not completed.
    dependants: HashMap<String, Vec<StepId>>,
    children: Vec<TaskId>,
    /// key → (creation seq, record).
    checkpoints: BTreeMap<String, (u64, CheckpointRecord)>,
}

impl TaskRow {
    fn find_step(&self, name: &str) -> Option<StepId> {
        if name == self.rec.handler {
            Some(self.root)
        } else {
            self.names.get(name).copied()
        }
    }

    fn all_steps(&self) -> impl Iterator<Item = StepId> + '_ {
        std::iter::once(self.root).chain(self.steps.iter().copied())
    }
}

#[derive(Default)]
struct Queue {
    ready: BTreeSet<ReadyKey>,
    delayed: BinaryHeap<DelayEntry>,
}

#[derive(Default)]
struct Group {
    /// (index, child) in spawn order.
    children: Vec<(u32, TaskId)>,
    unfinished: usize,
}

/// What to announce once the lock is released.
#[derive(Default)]
struct Effects {
    ready: bool,
    finished: bool,
    cancelled: Vec<StepId>,
}

fn ready_key(s: &StepRow) -> ReadyKey {
    (
        Reverse(s.rec.priority),
        s.rec.run_at.unwrap_or(0),
        s.seq,
        s.rec.id,
    )
}

fn lease_is_current(s: &StepRow, lease: &Lease) -> bool {
    s.rec.state == StepState::Running
        && s.rec.run == lease.run
        && s.rec.lease_owner.as_deref() == Some(lease.host_id.as_str())
}

/// The fence of a run's write: `Ok` while `lease` is its step's current
/// lease; otherwise why not (the step was cancelled, or the run is over).
fn fence(steps: &FastMap<StepId, Box<StepRow>>, lease: &Lease) -> Result<()> {
    match steps.get(&lease.step_id) {
        Some(s) if lease_is_current(s, lease) => Ok(()),
        Some(s) if s.rec.state == StepState::Cancelled => Err(Error::Cancelled(lease.step_id)),
        _ => Err(Error::LeaseLost(lease.step_id)),
    }
}

fn clear_lease(s: &mut StepRow) {
    s.rec.lease_owner = None;
    s.rec.lease_expires_at = None;
}

/// Distinct names, in first-seen order.
fn distinct(names: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::with_capacity(names.len());
    if names.len() <= 8 {
        for n in names {
            if !out.contains(&n.as_str()) {
                out.push(n);
            }
        }
    } else {
        let mut seen = HashSet::with_capacity(names.len());
        for n in names {
            if seen.insert(n.as_str()) {
                out.push(n);
            }
        }
    }
    out
}

/// Checks a decision against its task before anything changes, so a bad one
/// is rejected whole: the shared shape checks, then names and dependencies
/// against the task's existing steps.
fn validate_decision(task: &TaskRow, steps: &[NewStep], final_step: Option<&str>) -> Result<()> {
    crate::decision::check_shape(steps, final_step)?;
    let new: HashSet<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    for (i, s) in steps.iter().enumerate() {
        if task.find_step(&s.name).is_some() {
            return Err(Error::InvalidInput(format!(
                "steps[{i}].name: duplicate step name `{}` in task {}",
                s.name, task.rec.id
            )));
        }
        for d in distinct(&s.depends_on) {
            if !new.contains(d) && task.find_step(d).is_none() {
                return Err(Error::InvalidInput(format!(
                    "steps[{i}].depends_on: unknown step `{d}` (step `{}`)",
                    s.name
                )));
            }
        }
    }
    Ok(())
}

struct Inner {
    tasks: FastMap<TaskId, Box<TaskRow>>,
    /// Creation order, for newest-first listing.
    task_order: Vec<TaskId>,
    steps: FastMap<StepId, Box<StepRow>>,
    idempotency: HashMap<String, TaskId>,
    queues: FastMap<String, Queue>,
    waiters: HashMap<String, FastSet<StepId>>,
    running: FastSet<StepId>,
    events: HashMap<String, EventRecord>,
    event_order: Vec<String>,
    groups: HashMap<String, Group>,
    hosts: HashMap<String, HostInfo>,
    /// Steps per state, indexed by `StepState as usize`.
    counts: [u64; 7],
    seq: u64,
    generation: u64,
    ids: IdGen,
}

impl Inner {
    fn new() -> Self {
        Self {
            tasks: FastMap::default(),
            task_order: Vec::new(),
            steps: FastMap::default(),
            idempotency: HashMap::new(),
            queues: FastMap::default(),
            waiters: HashMap::new(),
            running: FastSet::default(),
            events: HashMap::new(),
            event_order: Vec::new(),
            groups: HashMap::new(),
            hosts: HashMap::new(),
            counts: [0; 7],
            seq: 0,
            generation: 0,
            ids: IdGen::new(),
        }
    }

    fn step_mut(&mut self, id: StepId) -> &mut StepRow {
        self.steps
            .get_mut(&id)
            .expect("memory store: step index out of sync")
    }

    fn task_mut(&mut self, id: TaskId) -> &mut TaskRow {
        self.tasks
            .get_mut(&id)
            .expect("memory store: task index out of sync")
    }

    fn queue_mut(&mut self, handler: &str) -> &mut Queue {
        if !self.queues.contains_key(handler) {
            self.queues.insert(handler.to_owned(), Queue::default());
        }
        self.queues.get_mut(handler).expect("just inserted")
    }

    fn insert_step(&mut self, rec: StepRecord, pending: u32) -> StepId {
        let id = rec.id;
        self.seq += 1;
        self.counts[rec.state as usize] += 1;
        self.steps.insert(
            id,
            Box::new(StepRow {
                rec,
                seq: self.seq,
                slot: Slot::Unindexed,
                pending,
            }),
        );
        id
    }

    /// Takes a step out of every index its current state put it in.
    fn detach(&mut self, id: StepId) {
        let Some(step) = self.steps.get_mut(&id) else {
            return;
        };
        if step.slot == Slot::Ready {
            if let Some(q) = self.queues.get_mut(step.rec.handler.as_str()) {
                q.ready.remove(&ready_key(step));
            }
        }
        // A delay-heap entry goes stale by itself once the slot changes.
        step.slot = Slot::Unindexed;
        match step.rec.state {
            StepState::Running => {
                self.running.remove(&id);
            }
            StepState::Suspended => {
                if let Some(ev) = step.rec.wait.as_ref().and_then(|w| w.event.as_ref()) {
                    if let Some(set) = self.waiters.get_mut(ev) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.waiters.remove(ev);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Moves a step to `to`, out of its old indexes; the caller sets the new
    /// fields and then calls [`Inner::enqueue`] if the state needs an index.
    fn move_to(&mut self, id: StepId, to: StepState, now: Millis) -> &mut StepRow {
        self.detach(id);
        let counts = &mut self.counts;
        let step = self
            .steps
            .get_mut(&id)
            .expect("memory store: step index out of sync");
        counts[step.rec.state as usize] -= 1;
        counts[to as usize] += 1;
        step.rec.state = to;
        step.rec.updated_at = now;
        step
    }

    /// Indexes a `ready` step (ready index if due, else delay heap), a
    /// `suspended` step with a wake time (delay heap) or a `running` one.
    fn enqueue(&mut self, id: StepId, now: Millis) {
        let (state, run_at, handler_known) = {
            let s = &self.steps[&id];
            (
                s.rec.state,
                s.rec.run_at,
                self.queues.contains_key(s.rec.handler.as_str()),
            )
        };
        if !handler_known {
            let h = self.steps[&id].rec.handler.clone();
            self.queue_mut(&h);
        }
        let step = self
            .steps
            .get_mut(&id)
            .expect("memory store: step index out of sync");
        let q = self
            .queues
            .get_mut(step.rec.handler.as_str())
            .expect("queue exists");
        match (state, run_at) {
            (StepState::Ready, at) if !matches!(at, Some(t) if t > now) => {
                if step.rec.run_at.is_none() {
                    step.rec.run_at = Some(now);
                }
                q.ready.insert(ready_key(step));
                step.slot = Slot::Ready;
            }
            (StepState::Ready | StepState::Suspended, Some(at)) => {
                self.generation += 1;
                q.delayed.push(Reverse((at, self.generation, id)));
                step.slot = Slot::Delayed(self.generation);
            }
            (StepState::Running, _) => {
                self.running.insert(id);
            }
            _ => {}
        }
    }

    /// Moves every due delay-heap entry (of every handler) into the ready
    /// index, turning due `suspended` steps `ready`.
    fn promote_due(&mut self, now: Millis) {
        let Self {
            queues,
            steps,
            waiters,
            counts,
            ..
        } = self;
        for q in queues.values_mut() {
            while let Some(&Reverse((at, generation, id))) = q.delayed.peek() {
                if at > now {
                    break;
                }
                q.delayed.pop();
                let Some(step) = steps.get_mut(&id) else {
                    continue;
                };
                if step.slot != Slot::Delayed(generation) {
                    continue;
                }
                match step.rec.state {
                    StepState::Ready => {}
                    StepState::Suspended => {
                        if let Some(ev) = step.rec.wait.as_ref().and_then(|w| w.event.as_ref()) {
                            if let Some(set) = waiters.get_mut(ev) {
                                set.remove(&id);
                                if set.is_empty() {
                                    waiters.remove(ev);
                                }
                            }
                        }
                        counts[StepState::Suspended as usize] -= 1;
                        counts[StepState::Ready as usize] += 1;
                        step.rec.state = StepState::Ready;
                        step.rec.updated_at = now;
                    }
                    _ => {
                        step.slot = Slot::Unindexed;
                        continue;
                    }
                }
                q.ready.insert(ready_key(step));
                step.slot = Slot::Ready;
            }
        }
    }

    /// Earliest valid future entry of one handler's delay heap.
    fn next_due(&mut self, handler: &str) -> Option<Millis> {
        let Self { queues, steps, .. } = self;
        let q = queues.get_mut(handler)?;
        while let Some(&Reverse((at, generation, id))) = q.delayed.peek() {
            if steps
                .get(&id)
                .is_some_and(|s| s.slot == Slot::Delayed(generation))
            {
                return Some(at);
            }
            q.delayed.pop();
        }
        None
    }

    fn spawn(
        &mut self,
        tasks: Vec<NewTask>,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<Vec<Spawned>> {
        for (i, t) in tasks.iter().enumerate() {
            if t.handler.trim().is_empty() {
                return Err(Error::InvalidInput(format!(
                    "tasks[{i}].handler: must not be empty"
                )));
            }
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            if let Some(key) = &t.idempotency_key {
                if let Some(&task_id) = self.idempotency.get(key) {
                    out.push(Spawned {
                        task_id,
                        created: false,
                    });
                    continue;
                }
            }
            let task_id = TaskId(self.ids.next(now));
            let step_id = StepId(self.ids.next(now));
            if let Some(key) = &t.idempotency_key {
                self.idempotency.insert(key.clone(), task_id);
            }
            if let Some(p) = &t.parent {
                if let Some(parent) = self.tasks.get_mut(&p.task_id) {
                    parent.children.push(task_id);
                }
                if let Some(g) = &p.group {
                    let group = self.groups.entry(g.clone()).or_default();
                    group.children.push((p.index, task_id));
                    group.unfinished += 1;
                }
            }
            self.insert_step(
                StepRecord {
                    id: step_id,
                    task_id,
                    name: t.handler.clone(),
                    handler: t.handler.clone(),
                    input: t.input,
                    state: StepState::Ready,
                    attempt: 0,
                    run: 0,
                    priority: t.priority,
                    run_at: Some(t.run_at.unwrap_or(now)),
                    lease_owner: None,
                    lease_expires_at: None,
                    result: None,
                    error: None,
                    depends_on: Vec::new(),
                    wait: None,
                    created_at: now,
                    updated_at: now,
                    status: None,
                    routes: Default::default(),
                },
                0,
            );
            let rec = TaskRecord {
                id: task_id,
                handler: t.handler,
                input: Value::Null,
                state: TaskState::Running,
                result: None,
                error: None,
                headers: t.headers,
                priority: t.priority,
                idempotency_key: t.idempotency_key,
                response_event: t.response_event,
                parent: t.parent,
                created_at: now,
                updated_at: now,
            };
            self.tasks.insert(
                task_id,
                Box::new(TaskRow {
                    rec,
                    root: step_id,
                    final_step: step_id,
                    steps: Vec::new(),
                    names: HashMap::new(),
                    dependants: HashMap::new(),
                    children: Vec::new(),
                    checkpoints: BTreeMap::new(),
                }),
            );
            self.task_order.push(task_id);
            self.enqueue(step_id, now);
            fx.ready = true;
            out.push(Spawned {
                task_id,
                created: true,
            });
        }
        Ok(out)
    }

    fn claim(
        &mut self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
        now: Millis,
    ) -> ClaimBatch {
        self.promote_due(now);
        let mut claimed: Vec<(ReadyKey, ClaimedStep)> = Vec::new();
        let expires = now.saturating_add(lease_ms);
        {
            let Self {
                queues,
                steps,
                tasks,
                running,
                counts,
                ..
            } = self;
            for (handler, n) in wants {
                let Some(q) = queues.get_mut(handler.as_str()) else {
                    continue;
                };
                for _ in 0..*n {
                    let Some(key) = q.ready.pop_first() else {
                        break;
                    };
                    let id = key.3;
                    let step = steps
                        .get_mut(&id)
                        .expect("memory store: ready index out of sync");
                    counts[StepState::Ready as usize] -= 1;
                    counts[StepState::Running as usize] += 1;
                    step.slot = Slot::Unindexed;
                    let r = &mut step.rec;
                    r.state = StepState::Running;
                    r.attempt += 1;
                    r.run += 1;
                    r.lease_owner = Some(host_id.to_owned());
                    r.lease_expires_at = Some(expires);
                    r.updated_at = now;
                    running.insert(id);
                    let headers = tasks
                        .get(&r.task_id)
                        .map(|t| t.rec.headers.clone())
                        .unwrap_or_default();
                    claimed.push((
                        key,
                        ClaimedStep {
                            step_id: id,
                            task_id: r.task_id,
                            name: r.name.clone(),
                            handler: r.handler.clone(),
                            input: r.input.clone(),
                            headers,
                            attempt: r.attempt,
                            run: r.run,
                            priority: r.priority,
                            lease_expires_at: expires,
                            has_dependencies: !r.depends_on.is_empty(),
                            ready_at: r.run_at.unwrap_or(r.created_at),
                            routes: r.routes.clone(),
                        },
                    ));
                }
            }
        }
        if wants.len() > 1 {
            claimed.sort_by_key(|a| a.0);
        }
        let mut next_due: Option<Millis> = None;
        for (handler, _) in wants {
            if let Some(at) = self.next_due(handler) {
                next_due = Some(next_due.map_or(at, |d| d.min(at)));
            }
        }
        ClaimBatch {
            steps: claimed.into_iter().map(|(_, s)| s).collect(),
            next_due,
        }
    }

    fn complete(&mut self, c: Completion, now: Millis, fx: &mut Effects) -> Result<()> {
        let id = c.lease.step_id;
        if !self
            .steps
            .get(&id)
            .is_some_and(|s| lease_is_current(s, &c.lease))
        {
            return Err(Error::LeaseLost(id));
        }
        match c.resolution {
            Resolution::Completed(v) => {
                self.mark_completed(id, v, now);
                self.release_dependants(id, now, fx);
                let task_id = self.steps[&id].rec.task_id;
                let task = &self.tasks[&task_id];
                if task.rec.state == TaskState::Running && task.final_step == id {
                    self.finish_task(task_id, TaskState::Completed, None, now, fx);
                }
            }
            Resolution::Decided {
                steps,
                final_step,
                result,
                status,
            } => {
                self.decide(id, steps, final_step, result, now, fx)?;
                if let Some(s) = self.steps.get_mut(&id) {
                    s.rec.status = status;
                }
            }
            Resolution::Retry { error, run_at } => {
                let s = self.move_to(id, StepState::Ready, now);
                clear_lease(s);
                s.rec.run_at = Some(run_at);
                s.rec.error = Some(error);
                self.enqueue(id, now);
                // Even a future retry matters: idle hosts must learn the new next_due.
                fx.ready = true;
            }
            Resolution::Failed(e) => {
                let s = self.move_to(id, StepState::Failed, now);
                clear_lease(s);
                s.rec.error = Some(e.clone());
                let task_id = s.rec.task_id;
                if self.tasks[&task_id].rec.state == TaskState::Running {
                    self.cancel_open_steps(task_id, now, fx);
                    self.finish_task(task_id, TaskState::Failed, Some(e), now, fx);
                }
            }
            Resolution::Suspended(wait) => self.suspend(id, wait, now, fx),
            Resolution::Released => {
                let s = self.move_to(id, StepState::Ready, now);
                clear_lease(s);
                s.rec.run_at = Some(now);
                s.rec.attempt = s.rec.attempt.saturating_sub(1);
                self.enqueue(id, now);
                fx.ready = true;
            }
        }
        Ok(())
    }

    fn mark_completed(&mut self, id: StepId, v: Value, now: Millis) {
        let s = self.move_to(id, StepState::Completed, now);
        clear_lease(s);
        s.rec.result = Some(v);
    }

    /// One fewer pending dependency for each blocked step waiting on the
    /// (just completed) step `id`; those reaching zero become ready.
    fn release_dependants(&mut self, id: StepId, now: Millis, fx: &mut Effects) {
        let (task_id, name) = {
            let s = &self.steps[&id];
            let task = &self.tasks[&s.rec.task_id];
            if task.dependants.is_empty() || !task.dependants.contains_key(s.rec.name.as_str()) {
                return;
            }
            (s.rec.task_id, s.rec.name.clone())
        };
        let Some(list) = self.task_mut(task_id).dependants.remove(&name) else {
            return;
        };
        for d in list {
            let s = self.step_mut(d);
            if s.rec.state != StepState::Blocked {
                continue;
            }
            s.pending = s.pending.saturating_sub(1);
            if s.pending == 0 {
                let s = self.move_to(d, StepState::Ready, now);
                s.rec.run_at = Some(now);
                self.enqueue(d, now);
                fx.ready = true;
            }
        }
    }

    fn decide(
        &mut self,
        id: StepId,
        steps: Vec<NewStep>,
        final_step: Option<String>,
        result: Value,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<()> {
        let task_id = self.steps[&id].rec.task_id;
        validate_decision(&self.tasks[&task_id], &steps, final_step.as_deref())?;

        // The decider completes first so that new steps depending on it start unblocked.
        self.mark_completed(id, result, now);
        self.release_dependants(id, now, fx);

        let priority = self.tasks[&task_id].rec.priority;
        let mut created = Vec::with_capacity(steps.len());
        for s in steps {
            let new_id = StepId(self.ids.next(now));
            let mut pending = 0u32;
            {
                let Self {
                    tasks, steps: rows, ..
                } = &mut *self;
                let task = tasks
                    .get_mut(&task_id)
                    .expect("memory store: task index out of sync");
                for d in distinct(&s.depends_on) {
                    let done = task
                        .find_step(d)
                        .is_some_and(|sid| rows[&sid].rec.state == StepState::Completed);
                    if !done {
                        pending += 1;
                        task.dependants
                            .entry(d.to_owned())
                            .or_default()
                            .push(new_id);
                    }
                }
                task.names.insert(s.name.clone(), new_id);
                task.steps.push(new_id);
            }
            let state = if pending == 0 {
                StepState::Ready
            } else {
                StepState::Blocked
            };
            self.insert_step(
                StepRecord {
                    id: new_id,
                    task_id,
                    name: s.name.clone(),
                    handler: s.handler,
                    input: s.input,
                    state,
                    attempt: 0,
                    run: 0,
                    priority,
                    run_at: (pending == 0).then_some(now),
                    lease_owner: None,
                    lease_expires_at: None,
                    result: None,
                    error: None,
                    depends_on: s.depends_on,
                    wait: None,
                    created_at: now,
                    updated_at: now,
                    status: None,
                    routes: s.routes,
                },
                pending,
            );
            if pending == 0 {
                self.enqueue(new_id, now);
                fx.ready = true;
            }
            created.push((s.name, new_id));
        }

        let task = self.task_mut(task_id);
        if task.rec.state == TaskState::Running && task.final_step == id {
            match (final_step, created.last()) {
                (_, None) => self.finish_task(task_id, TaskState::Completed, None, now, fx),
                (Some(f), Some(_)) => {
                    let (_, sid) = created
                        .iter()
                        .find(|(n, _)| *n == f)
                        .expect("validated final_step");
                    task.final_step = *sid;
                }
                (None, Some(&(_, sid))) => task.final_step = sid,
            }
        }
        Ok(())
    }

    fn suspend(&mut self, id: StepId, wait: WaitFor, now: Millis, fx: &mut Effects) {
        // A suspension gives its attempt back: waiting never costs one.
        let r = &mut self.step_mut(id).rec;
        r.attempt = r.attempt.saturating_sub(1);
        let satisfied = wait.wake_at.is_some_and(|t| t <= now)
            || wait
                .event
                .as_ref()
                .is_some_and(|e| self.events.contains_key(e))
            || wait
                .group
                .as_ref()
                .is_some_and(|g| match self.groups.get(g) {
                    // A group with no children has vacuously finished.
                    None => true,
                    Some(g) => g.unfinished == 0,
                });
        if satisfied {
            let s = self.move_to(id, StepState::Ready, now);
            clear_lease(s);
            s.rec.run_at = Some(now);
            s.rec.wait = Some(wait);
            self.enqueue(id, now);
            fx.ready = true;
            return;
        }
        let s = self.move_to(id, StepState::Suspended, now);
        clear_lease(s);
        s.rec.run_at = wait.wake_at;
        if wait.wake_at.is_some() {
            // Idle hosts must learn the new next_due.
            fx.ready = true;
        }
        if let Some(ev) = &wait.event {
            self.waiters.entry(ev.clone()).or_default().insert(id);
        }
        self.step_mut(id).rec.wait = Some(wait);
        self.enqueue(id, now);
    }

    /// A suspended step becomes ready now (its event came or its group finished).
    fn wake(&mut self, id: StepId, now: Millis, fx: &mut Effects) {
        if !self
            .steps
            .get(&id)
            .is_some_and(|s| s.rec.state == StepState::Suspended)
        {
            return;
        }
        let s = self.move_to(id, StepState::Ready, now);
        s.rec.run_at = Some(now);
        self.enqueue(id, now);
        fx.ready = true;
    }

    fn emit(&mut self, name: &str, payload: Value, now: Millis, fx: &mut Effects) -> bool {
        let stored = if self.events.contains_key(name) {
            false
        } else {
            self.events.insert(
                name.to_owned(),
                EventRecord {
                    name: name.to_owned(),
                    payload,
                    created_at: now,
                },
            );
            self.event_order.push(name.to_owned());
            true
        };
        if let Some(set) = self.waiters.remove(name) {
            for id in set {
                self.wake(id, now, fx);
            }
        }
        stored
    }

    /// Cancels every non-terminal step of a task.
    fn cancel_open_steps(&mut self, task_id: TaskId, now: Millis, fx: &mut Effects) {
        let ids: Vec<StepId> = self.tasks[&task_id].all_steps().collect();
        for id in ids {
            let state = self.steps[&id].rec.state;
            if state.is_terminal() {
                continue;
            }
            let s = self.move_to(id, StepState::Cancelled, now);
            clear_lease(s);
            if state == StepState::Running {
                fx.cancelled.push(id);
            }
        }
    }

    /// *Task finish* from the module docs of `switchyard_core::store`.
    fn finish_task(
        &mut self,
        task_id: TaskId,
        state: TaskState,
        error: Option<ErrorInfo>,
        now: Millis,
        fx: &mut Effects,
    ) {
        let task = self.task_mut(task_id);
        task.rec.state = state;
        task.rec.error = error;
        task.rec.updated_at = now;
        let final_step = task.final_step;
        let response = task.rec.response_event.clone();
        let group = task
            .rec
            .parent
            .as_ref()
            .and_then(|p| p.group.clone().map(|g| (g, p.step_id)));
        if let Some(ev) = response {
            let result = match state {
                TaskState::Completed => self
                    .steps
                    .get(&final_step)
                    .and_then(|s| s.rec.result.clone()),
                _ => None,
            };
            let error = self.tasks[&task_id]
                .rec
                .error
                .as_ref()
                .and_then(|e| serde_json::to_value(e).ok());
            let payload = json!({
                "task_id": task_id.to_string(),
                "state": state.as_str(),
                "result": result.unwrap_or(Value::Null),
                "error": error.unwrap_or(Value::Null),
            });
            self.emit(&ev, payload, now, fx);
        }
        if let Some((g, parent_step)) = group {
            if let Some(group) = self.groups.get_mut(&g) {
                group.unfinished = group.unfinished.saturating_sub(1);
                let suspended_on_group = group.unfinished == 0
                    && self.steps.get(&parent_step).is_some_and(|s| {
                        s.rec.state == StepState::Suspended
                            && s.rec
                                .wait
                                .as_ref()
                                .is_some_and(|w| w.group.as_deref() == Some(g.as_str()))
                    });
                if suspended_on_group {
                    self.wake(parent_step, now, fx);
                }
            }
        }
        fx.finished = true;
    }

    fn cancel_one(&mut self, task_id: TaskId, now: Millis, fx: &mut Effects) {
        self.cancel_open_steps(task_id, now, fx);
        let error = ErrorInfo::new(ErrorKind::Cancelled, "task cancelled");
        self.finish_task(task_id, TaskState::Cancelled, Some(error), now, fx);
    }

    fn cancel_task(
        &mut self,
        id: TaskId,
        cascade: bool,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<bool> {
        let task = self
            .tasks
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let running = !task.rec.state.is_terminal();
        if running {
            self.cancel_one(id, now, fx);
        }
        // A cascade reaches the unfinished descendants of a finished task too.
        if cascade {
            let mut stack = self.tasks[&id].children.clone();
            while let Some(child) = stack.pop() {
                let Some(t) = self.tasks.get(&child) else {
                    continue;
                };
                stack.extend_from_slice(&t.children);
                if !t.rec.state.is_terminal() {
                    self.cancel_one(child, now, fx);
                }
            }
        }
        Ok(running)
    }

    fn retry_task(&mut self, id: TaskId, now: Millis, fx: &mut Effects) -> Result<()> {
        let task = self
            .tasks
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        match task.rec.state {
            TaskState::Failed | TaskState::Cancelled => {}
            s => {
                return Err(Error::Conflict(format!(
                    "task {id} is {s}; only failed or cancelled tasks can be retried"
                )))
            }
        }
        let ids: Vec<StepId> = task.all_steps().collect();
        let task = self.task_mut(id);
        task.rec.state = TaskState::Running;
        task.rec.error = None;
        task.rec.result = None;
        task.rec.updated_at = now;
        if let Some(g) = task.rec.parent.as_ref().and_then(|p| p.group.clone()) {
            if let Some(group) = self.groups.get_mut(&g) {
                group.unfinished += 1;
            }
        }
        for sid in ids {
            if self.steps[&sid].rec.state == StepState::Completed {
                continue;
            }
            let pending = {
                let s = &self.steps[&sid];
                let task = &self.tasks[&id];
                distinct(&s.rec.depends_on)
                    .into_iter()
                    .filter(|d| {
                        !task
                            .find_step(d)
                            .is_some_and(|dep| self.steps[&dep].rec.state == StepState::Completed)
                    })
                    .count() as u32
            };
            let state = if pending == 0 {
                StepState::Ready
            } else {
                StepState::Blocked
            };
            let s = self.move_to(sid, state, now);
            clear_lease(s);
            s.rec.attempt = 0;
            s.pending = pending;
            s.rec.run_at = (pending == 0).then_some(now);
            self.enqueue(sid, now);
        }
        fx.ready = true;
        Ok(())
    }

    /// Retention (see [`Store::cleanup`]): deletes up to `batch` finished
    /// tasks older than `before` whose parent task is gone, oldest created
    /// first, with their steps and checkpoints, and unlinks them from the
    /// idempotency map, their group and the task order.
    fn cleanup(&mut self, before: Millis, batch: usize) -> u64 {
        if batch == 0 {
            return 0;
        }
        let doomed: Vec<TaskId> = self
            .task_order
            .iter()
            .copied()
            .filter(|id| {
                let t = &self.tasks[id];
                t.rec.state.is_terminal()
                    && t.rec.updated_at < before
                    && t.rec
                        .parent
                        .as_ref()
                        .is_none_or(|p| !self.tasks.contains_key(&p.task_id))
            })
            .take(batch)
            .collect();
        if doomed.is_empty() {
            return 0;
        }
        for &id in &doomed {
            let task = self
                .tasks
                .remove(&id)
                .expect("memory store: task index out of sync");
            for sid in task.all_steps() {
                self.detach(sid);
                if let Some(step) = self.steps.remove(&sid) {
                    self.counts[step.rec.state as usize] -= 1;
                }
            }
            if let Some(key) = &task.rec.idempotency_key {
                if self.idempotency.get(key) == Some(&id) {
                    self.idempotency.remove(key);
                }
            }
            if let Some(g) = task.rec.parent.as_ref().and_then(|p| p.group.as_ref()) {
                if let Some(group) = self.groups.get_mut(g) {
                    group.children.retain(|(_, c)| *c != id);
                    if group.children.is_empty() {
                        self.groups.remove(g);
                    }
                }
            }
        }
        let gone: FastSet<TaskId> = doomed.iter().copied().collect();
        self.task_order.retain(|id| !gone.contains(id));
        doomed.len() as u64
    }

    fn recover_expired(&mut self, now: Millis, fx: &mut Effects) -> u64 {
        let expired: Vec<StepId> = self
            .running
            .iter()
            .copied()
            .filter(|id| {
                self.steps
                    .get(id)
                    .is_some_and(|s| s.rec.lease_expires_at.is_some_and(|t| t <= now))
            })
            .collect();
        for &id in &expired {
            let s = self.move_to(id, StepState::Ready, now);
            let owner = s.rec.lease_owner.take().unwrap_or_default();
            s.rec.lease_expires_at = None;
            s.rec.run_at = Some(now);
            s.rec.error = Some(ErrorInfo {
                kind: ErrorKind::LeaseExpired,
                message: format!(
                    "the lease of host {owner} expired without a heartbeat before the step finished"
                ),
                trace: None,
                attempt: s.rec.attempt,
            });
            self.enqueue(id, now);
        }
        if !expired.is_empty() {
            fx.ready = true;
        }
        expired.len() as u64
    }

    /// Ends host `id`'s registration (kept for `ended_hosts`) and deletes
    /// the ended registrations older than the retention.
    fn end_host(&mut self, id: &str, reason: &str, now: Millis) {
        if let Some(h) = self.hosts.get_mut(id) {
            if h.ended_at.is_none() {
                h.ended_at = Some(now);
                h.end_reason = Some(reason.to_owned());
            }
        }
        let horizon = now.saturating_sub(ENDED_HOST_RETENTION_MS);
        self.hosts
            .retain(|_, h| h.ended_at.is_none_or(|at| at >= horizon));
    }

    fn heartbeat(
        &mut self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
        now: Millis,
    ) -> HeartbeatReply {
        let mut info = host.clone();
        info.last_heartbeat = now;
        info.ended_at = None;
        info.end_reason = None;
        self.hosts.insert(host.id.clone(), info);
        let expires = now.saturating_add(lease_ms);
        let mut reply = HeartbeatReply::default();
        for run in running {
            match self.steps.get_mut(&run.step_id) {
                Some(s)
                    if s.rec.state == StepState::Running
                        && s.rec.run == run.run
                        && s.rec.lease_owner.as_deref() == Some(host.id.as_str()) =>
                {
                    s.rec.lease_expires_at = Some(expires);
                }
                other => {
                    if other.is_some_and(|s| s.rec.state == StepState::Cancelled) {
                        reply.cancelled.push(*run);
                    }
                    reply.lost.push(*run);
                }
            }
        }
        reply
    }

    fn put_checkpoint(
        &mut self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
        now: Millis,
    ) -> Result<()> {
        fence(&self.steps, lease)?;
        let s = self.step_mut(lease.step_id);
        s.rec.lease_expires_at = Some(now.saturating_add(lease_ms));
        let task_id = s.rec.task_id;
        self.seq += 1;
        let seq = self.seq;
        let task = self.task_mut(task_id);
        match task.checkpoints.get_mut(key) {
            Some((_, cp)) if cp.run > lease.run && cp.step_id == lease.step_id => {}
            Some((_, cp)) => {
                cp.value = value;
                cp.step_id = lease.step_id;
                cp.run = lease.run;
                cp.created_at = now;
            }
            None => {
                let cp = CheckpointRecord {
                    task_id,
                    key: key.to_owned(),
                    value,
                    step_id: lease.step_id,
                    run: lease.run,
                    created_at: now,
                };
                task.checkpoints.insert(key.to_owned(), (seq, cp));
            }
        }
        Ok(())
    }

    fn task_record(&self, t: &TaskRow) -> TaskRecord {
        let mut rec = t.rec.clone();
        rec.input = self
            .steps
            .get(&t.root)
            .map(|s| s.rec.input.clone())
            .unwrap_or(Value::Null);
        if rec.state == TaskState::Completed {
            rec.result = self
                .steps
                .get(&t.final_step)
                .and_then(|s| s.rec.result.clone());
        }
        rec
    }
}

/// The in-memory [`Store`]: fast, exact to the contract, and gone when the
/// process exits. Open it with `memory` as the store URL, or directly.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    signals: Arc<Signals>,
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store on `clock` (tests pass a [`switchyard_core::FakeClock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Mutex::new(Inner::new()),
            clock,
            signals: Signals::new(),
        }
    }

    /// Runs `f` under the lock with the current time, then announces its effects.
    fn write<T>(&self, f: impl FnOnce(&mut Inner, Millis, &mut Effects) -> T) -> T {
        let mut fx = Effects::default();
        let out = {
            let mut inner = self.inner.lock();
            let now = self.clock.now();
            f(&mut inner, now, &mut fx)
        };
        if fx.ready {
            self.signals.notify_ready();
        }
        if fx.finished {
            self.signals.notify_finished();
        }
        if !fx.cancelled.is_empty() {
            self.signals.notify_cancelled(fx.cancelled);
        }
        out
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn url(&self) -> String {
        "memory".into()
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    fn poll_interval(&self) -> Duration {
        // Nothing outside the process changes this store; the poll only
        // covers fake-clock moves and bugs.
        Duration::from_secs(1)
    }

    async fn now(&self) -> Result<Millis> {
        Ok(self.clock.now())
    }

    async fn migrate(&self) -> Result<u32> {
        Ok(1)
    }

    async fn spawn(&self, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        self.write(|inner, now, fx| inner.spawn(tasks, now, fx))
    }

    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<ClaimBatch> {
        Ok(self.write(|inner, now, _| inner.claim(host_id, wants, lease_ms, now)))
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>> {
        Ok(self.write(|inner, now, fx| {
            completions
                .into_iter()
                .map(|c| inner.complete(c, now, fx))
                .collect()
        }))
    }

    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
    ) -> Result<HeartbeatReply> {
        Ok(self.write(|inner, now, _| inner.heartbeat(host, running, lease_ms, now)))
    }

    async fn cancelled_steps(&self, steps: &[StepId]) -> Result<Vec<StepId>> {
        let inner = self.inner.lock();
        Ok(steps
            .iter()
            .filter(|id| {
                inner
                    .steps
                    .get(id)
                    .is_some_and(|s| s.rec.state == StepState::Cancelled)
            })
            .copied()
            .collect())
    }

    async fn expire_host(&self, host_id: &str) -> Result<u64> {
        Ok(self.write(|inner, now, _| {
            inner.end_host(host_id, HOST_DEAD, now);
            let mut n = 0;
            let Inner { running, steps, .. } = inner;
            for id in running.iter() {
                if let Some(s) = steps.get_mut(id) {
                    if s.rec.lease_owner.as_deref() == Some(host_id) {
                        s.rec.lease_expires_at = Some(now);
                        n += 1;
                    }
                }
            }
            n
        }))
    }

    async fn deregister_host(&self, host_id: &str) -> Result<()> {
        self.write(|inner, now, _| inner.end_host(host_id, HOST_STOPPED, now));
        Ok(())
    }

    async fn recover_expired(&self) -> Result<u64> {
        Ok(self.write(|inner, now, fx| inner.recover_expired(now, fx)))
    }

    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> Result<()> {
        self.write(|inner, now, _| inner.put_checkpoint(lease, key, value, lease_ms, now))
    }

    async fn checkpoints(&self, task_id: TaskId) -> Result<BTreeMap<String, Value>> {
        let inner = self.inner.lock();
        Ok(inner
            .tasks
            .get(&task_id)
            .map(|t| {
                t.checkpoints
                    .iter()
                    .map(|(k, (_, cp))| (k.clone(), cp.value.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn emit_event(&self, name: &str, payload: Value) -> Result<bool> {
        Ok(self.write(|inner, now, fx| inner.emit(name, payload, now, fx)))
    }

    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> Result<bool> {
        self.write(|inner, now, fx| {
            self::fence(&inner.steps, fence)?;
            Ok(inner.emit(name, payload, now, fx))
        })
    }

    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        self.write(|inner, now, fx| {
            self::fence(&inner.steps, fence)?;
            inner.spawn(tasks, now, fx)
        })
    }

    async fn get_event(&self, name: &str) -> Result<Option<EventRecord>> {
        Ok(self.inner.lock().events.get(name).cloned())
    }

    async fn list_events_prefixed(&self, prefix: &str, limit: usize) -> Result<Vec<EventRecord>> {
        let limit = if limit == 0 { DEFAULT_LIMIT } else { limit };
        let inner = self.inner.lock();
        Ok(inner
            .event_order
            .iter()
            .rev()
            .filter(|n| n.starts_with(prefix))
            .take(limit)
            .filter_map(|n| inner.events.get(n).cloned())
            .collect())
    }

    async fn running_by_host(&self) -> Result<BTreeMap<String, u64>> {
        let inner = self.inner.lock();
        let mut by = BTreeMap::new();
        for s in inner.steps.values() {
            if s.rec.state == StepState::Running {
                if let Some(host) = &s.rec.lease_owner {
                    *by.entry(host.clone()).or_insert(0) += 1;
                }
            }
        }
        Ok(by)
    }

    async fn handler_stats(&self) -> Result<Vec<switchyard_core::HandlerStats>> {
        let inner = self.inner.lock();
        let mut by: BTreeMap<String, switchyard_core::HandlerStats> = BTreeMap::new();
        for s in inner.steps.values() {
            let h =
                by.entry(s.rec.handler.clone())
                    .or_insert_with(|| switchyard_core::HandlerStats {
                        handler: s.rec.handler.clone(),
                        ..Default::default()
                    });
            *h.steps.entry(s.rec.state.as_str().to_string()).or_insert(0) += 1;
            if s.rec.state == StepState::Ready {
                let at = s.rec.run_at.unwrap_or(s.rec.created_at);
                h.oldest_ready_at = Some(h.oldest_ready_at.map_or(at, |o| o.min(at)));
            }
        }
        Ok(by.into_values().collect())
    }

    async fn task_counts(&self) -> Result<Vec<switchyard_core::TaskCount>> {
        let inner = self.inner.lock();
        let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
        for t in inner.tasks.values() {
            let rec = inner.task_record(t);
            *by.entry((rec.handler, rec.state.as_str().to_string()))
                .or_insert(0) += 1;
        }
        Ok(by
            .into_iter()
            .map(|((handler, state), count)| switchyard_core::TaskCount {
                handler,
                state,
                count,
            })
            .collect())
    }

    async fn finished_buckets(
        &self,
        since: Millis,
        bucket_ms: i64,
    ) -> Result<Vec<switchyard_core::FinishedBucket>> {
        if bucket_ms < 1 {
            return Err(Error::InvalidInput(format!(
                "bucket_ms must be at least 1, not {bucket_ms}"
            )));
        }
        let inner = self.inner.lock();
        let mut by: BTreeMap<(Millis, String), u64> = BTreeMap::new();
        for t in inner.tasks.values() {
            let rec = inner.task_record(t);
            if rec.state.is_terminal() && rec.updated_at >= since {
                let start = since + (rec.updated_at - since) / bucket_ms * bucket_ms;
                *by.entry((start, rec.state.as_str().to_string()))
                    .or_insert(0) += 1;
            }
        }
        Ok(by
            .into_iter()
            .map(|((start, state), count)| switchyard_core::FinishedBucket {
                start,
                state,
                count,
            })
            .collect())
    }

    async fn failure_groups(&self, limit: usize) -> Result<Vec<switchyard_core::FailureGroup>> {
        let limit = if limit == 0 { 100 } else { limit };
        let inner = self.inner.lock();
        let mut by: BTreeMap<(String, String), (u64, Millis)> = BTreeMap::new();
        for t in inner.tasks.values() {
            let rec = inner.task_record(t);
            if rec.state == TaskState::Failed {
                let message = rec.error.map(|e| e.message).unwrap_or_default();
                let e = by
                    .entry((rec.handler, message))
                    .or_insert((0, rec.updated_at));
                e.0 += 1;
                e.1 = e.1.max(rec.updated_at);
            }
        }
        let mut groups: Vec<_> = by
            .into_iter()
            .map(
                |((handler, message), (count, last_failed_at))| switchyard_core::FailureGroup {
                    handler,
                    message,
                    count,
                    last_failed_at,
                },
            )
            .collect();
        groups.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (&a.handler, &a.message).cmp(&(&b.handler, &b.message)))
        });
        groups.truncate(limit);
        Ok(groups)
    }

    async fn group_outcomes(&self, group: &str) -> Result<Vec<ChildOutcome>> {
        let inner = self.inner.lock();
        let Some(g) = inner.groups.get(group) else {
            return Ok(Vec::new());
        };
        let mut children = g.children.clone();
        children.sort_by_key(|&(index, _)| index);
        Ok(children
            .into_iter()
            .filter_map(|(_, id)| inner.tasks.get(&id))
            .map(|t| {
                let rec = inner.task_record(t);
                ChildOutcome {
                    task_id: rec.id,
                    state: rec.state,
                    result: rec.result,
                    error: rec.error,
                }
            })
            .collect())
    }

    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> Result<BTreeMap<String, Value>> {
        let inner = self.inner.lock();
        let Some(task) = inner.tasks.get(&task_id) else {
            return Ok(BTreeMap::new());
        };
        Ok(names
            .iter()
            .filter_map(|n| {
                let s = &inner.steps[&task.find_step(n)?];
                match (&s.rec.state, &s.rec.result) {
                    (StepState::Completed, Some(v)) => Some((n.clone(), v.clone())),
                    _ => None,
                }
            })
            .collect())
    }

    async fn cancel_task(&self, id: TaskId, cascade: bool) -> Result<bool> {
        self.write(|inner, now, fx| inner.cancel_task(id, cascade, now, fx))
    }

    async fn cleanup(&self, finished_before: Millis, batch: usize) -> Result<u64> {
        Ok(self.write(|inner, _, _| inner.cleanup(finished_before, batch)))
    }

    async fn cleanup_events(&self, created_before: Millis, batch: usize) -> Result<u64> {
        Ok(self.write(|inner, _, _| {
            let mut old: Vec<(Millis, String)> = inner
                .events
                .values()
                .filter(|e| e.created_at < created_before)
                .map(|e| (e.created_at, e.name.clone()))
                .collect();
            old.sort();
            old.truncate(batch);
            for (_, name) in &old {
                inner.events.remove(name);
            }
            old.len() as u64
        }))
    }

    async fn retry_task(&self, id: TaskId) -> Result<()> {
        self.write(|inner, now, fx| inner.retry_task(id, now, fx))
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        let inner = self.inner.lock();
        Ok(inner.tasks.get(&id).map(|t| inner.task_record(t)))
    }

    async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        let inner = self.inner.lock();
        let Some(t) = inner.tasks.get(&id) else {
            return Ok(None);
        };
        let steps = t
            .all_steps()
            .filter_map(|s| inner.steps.get(&s))
            .map(|s| s.rec.clone())
            .collect();
        let mut cps: Vec<&(u64, CheckpointRecord)> = t.checkpoints.values().collect();
        cps.sort_by_key(|(seq, _)| *seq);
        let children = t
            .children
            .iter()
            .filter_map(|c| inner.tasks.get(c))
            .map(|c| inner.task_record(c))
            .collect();
        Ok(Some(TaskDetail {
            task: inner.task_record(t),
            steps,
            checkpoints: cps.into_iter().map(|(_, cp)| cp.clone()).collect(),
            children,
        }))
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        let limit = if filter.limit == 0 {
            DEFAULT_LIMIT
        } else {
            filter.limit
        };
        let inner = self.inner.lock();
        // Keyset pagination: start after the cursor task's position.
        let end = match filter.after {
            None => inner.task_order.len(),
            Some(after) => inner
                .task_order
                .iter()
                .rposition(|id| *id == after)
                .ok_or_else(|| Error::NotFound(format!("cursor task {after}")))?,
        };
        let has_step_in = |t: &TaskRow, state: StepState| {
            std::iter::once(&t.root)
                .chain(t.steps.iter())
                .filter_map(|sid| inner.steps.get(sid))
                .any(|s| s.rec.state == state)
        };
        Ok(inner.task_order[..end]
            .iter()
            .rev()
            .filter_map(|id| inner.tasks.get(id))
            .filter(|t| filter.state.is_none() || filter.state == Some(t.rec.state))
            .filter(|t| {
                filter.handler.as_ref().is_none() || filter.handler.as_ref() == Some(&t.rec.handler)
            })
            .filter(|t| !filter.root_only || t.rec.parent.is_none())
            .filter(|t| {
                filter.parent.is_none() || t.rec.parent.as_ref().map(|p| p.task_id) == filter.parent
            })
            .filter(|t| {
                filter.idempotency_key.is_none() || t.rec.idempotency_key == filter.idempotency_key
            })
            .filter(|t| filter.created_after.is_none_or(|a| t.rec.created_at >= a))
            .filter(|t| filter.created_before.is_none_or(|b| t.rec.created_at < b))
            .filter(|t| !filter.wants_finished() || t.rec.state.is_terminal())
            .filter(|t| filter.finished_after.is_none_or(|a| t.rec.updated_at >= a))
            .filter(|t| filter.finished_before.is_none_or(|b| t.rec.updated_at < b))
            .filter(|t| {
                filter
                    .step_state
                    .is_none_or(|st| t.rec.state == TaskState::Running && has_step_in(t, st))
            })
            .take(limit)
            .map(|t| inner.task_record(t))
            .collect())
    }

    async fn list_hosts(&self) -> Result<Vec<HostInfo>> {
        let inner = self.inner.lock();
        let mut hosts: Vec<HostInfo> = inner
            .hosts
            .values()
            .filter(|h| h.ended_at.is_none())
            .cloned()
            .collect();
        hosts.sort_by(|a, b| {
            b.last_heartbeat
                .cmp(&a.last_heartbeat)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(hosts)
    }

    async fn ended_hosts(&self, since: Millis) -> Result<Vec<HostInfo>> {
        let inner = self.inner.lock();
        let mut hosts: Vec<HostInfo> = inner
            .hosts
            .values()
            .filter(|h| h.ended_at.is_some_and(|at| at >= since))
            .cloned()
            .collect();
        hosts.sort_by(|a, b| b.ended_at.cmp(&a.ended_at).then_with(|| a.id.cmp(&b.id)));
        Ok(hosts)
    }

    async fn count_steps(&self) -> Result<StateCounts> {
        let inner = self.inner.lock();
        Ok(StepState::ALL
            .iter()
            .filter(|s| inner.counts[**s as usize] > 0)
            .map(|s| (s.as_str().to_owned(), inner.counts[*s as usize]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_core::{FakeClock, ParentRef};

    const HOST: &str = "host-a";
    const LEASE: i64 = 30_000;

    /// A small seeded generator, so a failing random run can be replayed.
    struct Wyrand(u64);

    impl Wyrand {
        fn random(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
            let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
            (t as u64) ^ ((t >> 64) as u64)
        }
    }

    fn store() -> (MemoryStore, Arc<FakeClock>) {
        let clock = Arc::new(FakeClock::new());
        (MemoryStore::with_clock(clock.clone()), clock)
    }

    fn wants(h: &str, n: usize) -> Vec<(String, usize)> {
        vec![(h.to_owned(), n)]
    }

    async fn claim(s: &MemoryStore, h: &str, n: usize) -> ClaimBatch {
        s.claim(HOST, &wants(h, n), LEASE).await.unwrap()
    }

    fn lease(c: &ClaimedStep) -> Lease {
        Lease {
            step_id: c.step_id,
            task_id: c.task_id,
            attempt: c.attempt,
            run: c.run,
            host_id: HOST.into(),
        }
    }

    fn run_of(c: &ClaimedStep) -> RunRef {
        RunRef {
            step_id: c.step_id,
            run: c.run,
        }
    }

    async fn complete(s: &MemoryStore, c: &ClaimedStep, r: Resolution) -> Result<()> {
        s.complete(vec![Completion {
            lease: lease(c),
            resolution: r,
        }])
        .await
        .unwrap()
        .remove(0)
    }

    async fn spawn1(s: &MemoryStore, t: NewTask) -> TaskId {
        s.spawn(vec![t]).await.unwrap()[0].task_id
    }

    async fn task_state(s: &MemoryStore, id: TaskId) -> TaskState {
        s.get_task(id).await.unwrap().unwrap().state
    }

    async fn step_state(s: &MemoryStore, id: TaskId, name: &str) -> StepState {
        let d = s.task_detail(id).await.unwrap().unwrap();
        d.steps.iter().find(|st| st.name == name).unwrap().state
    }

    #[tokio::test]
    async fn claims_by_priority_then_run_at_then_creation() {
        let (s, clock) = store();
        let now = clock.now();
        let low = spawn1(&s, NewTask::new("h", json!(1))).await;
        let high = spawn1(&s, NewTask::new("h", json!(2)).priority(5)).await;
        let early = spawn1(&s, NewTask::new("h", json!(3)).run_at(now - 10)).await;
        let low2 = spawn1(&s, NewTask::new("h", json!(4))).await;
        let b = claim(&s, "h", 3).await;
        let got: Vec<TaskId> = b.steps.iter().map(|c| c.task_id).collect();
        assert_eq!(got, vec![high, early, low]);
        assert_eq!(b.steps[0].attempt, 1);
        assert_eq!(b.steps[0].lease_expires_at, now + LEASE);
        let b = claim(&s, "h", 10).await;
        assert_eq!(
            b.steps.iter().map(|c| c.task_id).collect::<Vec<_>>(),
            vec![low2]
        );
        assert!(claim(&s, "h", 10).await.steps.is_empty());
        assert!(claim(&s, "other", 10).await.steps.is_empty());
        let counts = s.count_steps().await.unwrap();
        assert_eq!(counts.get("running"), Some(&4));
        assert_eq!(counts.len(), 1);
    }

    #[tokio::test]
    async fn claims_across_handlers_are_merged_in_order() {
        let (s, _) = store();
        let a = spawn1(&s, NewTask::new("a", json!(null))).await;
        let b = spawn1(&s, NewTask::new("b", json!(null)).priority(1)).await;
        let w = vec![("a".to_owned(), 5), ("b".to_owned(), 5)];
        let got: Vec<TaskId> = s
            .claim(HOST, &w, LEASE)
            .await
            .unwrap()
            .steps
            .iter()
            .map(|c| c.task_id)
            .collect();
        assert_eq!(got, vec![b, a]);
    }

    #[tokio::test]
    async fn idempotency_key_returns_the_first_task() {
        let (s, _) = store();
        let out = s
            .spawn(vec![
                NewTask::new("h", json!(1)).idempotency_key("k"),
                NewTask::new("h", json!(2)).idempotency_key("k"),
            ])
            .await
            .unwrap();
        assert!(out[0].created);
        assert!(!out[1].created);
        assert_eq!(out[0].task_id, out[1].task_id);
        let again = s
            .spawn(vec![NewTask::new("h", json!(3)).idempotency_key("k")])
            .await
            .unwrap();
        assert_eq!(
            again[0],
            Spawned {
                task_id: out[0].task_id,
                created: false
            }
        );
        assert_eq!(s.list_tasks(&TaskFilter::default()).await.unwrap().len(), 1);
        let t = s.get_task(out[0].task_id).await.unwrap().unwrap();
        assert_eq!(t.input, json!(1));
        assert!(s.spawn(vec![NewTask::new("", json!(1))]).await.is_err());
    }

    #[tokio::test]
    async fn delayed_spawn_and_retry_are_promoted_when_due() {
        let (s, clock) = store();
        let now = clock.now();
        let id = spawn1(&s, NewTask::new("h", json!(null)).run_at(now + 1_000)).await;
        let b = claim(&s, "h", 10).await;
        assert!(b.steps.is_empty());
        assert_eq!(b.next_due, Some(now + 1_000));
        assert_eq!(claim(&s, "other", 10).await.next_due, None);
        clock.advance(1_000);
        let b = claim(&s, "h", 10).await;
        assert_eq!(b.steps.len(), 1);
        assert_eq!(b.next_due, None);
        let err = ErrorInfo::new(ErrorKind::Retryable, "boom");
        complete(
            &s,
            &b.steps[0],
            Resolution::Retry {
                error: err.clone(),
                run_at: now + 5_000,
            },
        )
        .await
        .unwrap();
        let b2 = claim(&s, "h", 10).await;
        assert!(b2.steps.is_empty());
        assert_eq!(b2.next_due, Some(now + 5_000));
        let d = s.task_detail(id).await.unwrap().unwrap();
        assert_eq!(d.steps[0].state, StepState::Ready);
        assert_eq!(d.steps[0].error, Some(err));
        clock.set(now + 5_000);
        let b3 = claim(&s, "h", 10).await;
        assert_eq!(b3.steps.len(), 1);
        assert_eq!(b3.steps[0].attempt, 2);
    }

    #[tokio::test]
    async fn suspended_sleep_wakes_at_claim_after_wake_at() {
        let (s, clock) = store();
        let now = clock.now();
        let id = spawn1(&s, NewTask::new("h", json!(null))).await;
        let c = claim(&s, "h", 1).await.steps.remove(0);
        let wait = WaitFor {
            wake_at: Some(now + 500),
            ..Default::default()
        };
        complete(&s, &c, Resolution::Suspended(wait)).await.unwrap();
        assert_eq!(step_state(&s, id, "h").await, StepState::Suspended);
        let b = claim(&s, "h", 1).await;
        assert!(b.steps.is_empty());
        assert_eq!(b.next_due, Some(now + 500));
        clock.advance(500);
        let b = claim(&s, "h", 1).await;
        assert_eq!(b.steps.len(), 1);
        assert_eq!(
            (b.steps[0].attempt, b.steps[0].run),
            (1, 2),
            "a resume continues the attempt in a new run"
        );
    }

    #[tokio::test]
    async fn suspended_with_satisfied_wait_goes_ready() {
        let (s, clock) = store();
        let now = clock.now();
        assert!(s.emit_event("e", json!({"x": 1})).await.unwrap());
        assert!(!s.emit_event("e", json!({"x": 2})).await.unwrap());
        assert_eq!(
            s.get_event("e").await.unwrap().unwrap().payload,
            json!({"x": 1})
        );
        for wait in [
            WaitFor {
                event: Some("e".into()),
                wake_at: Some(now + 60_000),
                group: None,
            },
            WaitFor {
                wake_at: Some(now),
                ..Default::default()
            },
            WaitFor {
                group: Some("empty".into()),
                ..Default::default()
            },
        ] {
            let id = spawn1(&s, NewTask::new("h", json!(null))).await;
            let c = claim(&s, "h", 1).await.steps.remove(0);
            complete(&s, &c, Resolution::Suspended(wait.clone()))
                .await
                .unwrap();
            assert_eq!(step_state(&s, id, "h").await, StepState::Ready, "{wait:?}");
            let again = claim(&s, "h", 1).await.steps.remove(0);
            assert_eq!(again.step_id, c.step_id);
            complete(&s, &again, Resolution::Completed(json!("ok")))
                .await
                .unwrap();
            assert_eq!(task_state(&s, id).await, TaskState::Completed);
        }
        // The stale delay-heap entry from the first wait must not resurface.
        clock.advance(120_000);
        assert!(claim(&s, "h", 10).await.steps.is_empty());
    }

    #[tokio::test]
    async fn event_wakes_waiters() {
        let (s, clock) = store();
        let id = spawn1(&s, NewTask::new("h", json!(null))).await;
        let c = claim(&s, "h", 1).await.steps.remove(0);
        let wait = WaitFor {
            event: Some("go".into()),
            wake_at: Some(clock.now() + 10_000),
            group: None,
        };
        complete(&s, &c, Resolution::Suspended(wait)).await.unwrap();
        assert!(claim(&s, "h", 1).await.steps.is_empty());
        assert!(s.emit_event("go", json!(1)).await.unwrap());
        assert_eq!(step_state(&s, id, "h").await, StepState::Ready);
        let c = claim(&s, "h", 1).await.steps.remove(0);
        complete(&s, &c, Resolution::Completed(json!(2)))
            .await
            .unwrap();
        // The superseded wake_at entry is stale.
        clock.advance(20_000);
        let b = claim(&s, "h", 1).await;
        assert!(b.steps.is_empty());
        assert_eq!(b.next_due, None);
    }

    #[tokio::test]
    async fn stale_leases_are_rejected() {
        let (s, clock) = store();
        let id = spawn1(&s, NewTask::new("h", json!(null))).await;
        let c = claim(&s, "h", 1).await.steps.remove(0);
        let mut wrong_host = lease(&c);
        wrong_host.host_id = "other".into();
        let mut wrong_run = lease(&c);
        wrong_run.run += 1;
        for l in [wrong_host.clone(), wrong_run] {
            let r = s
                .complete(vec![Completion {
                    lease: l,
                    resolution: Resolution::Completed(json!(1)),
                }])
                .await;
            assert_eq!(r.unwrap()[0], Err(Error::LeaseLost(c.step_id)));
        }
        assert_eq!(
            s.put_checkpoint(&wrong_host, "k", json!(1), LEASE).await,
            Err(Error::LeaseLost(c.step_id))
        );
        clock.advance(LEASE);
        assert_eq!(s.recover_expired().await.unwrap(), 1);
        let d = s.task_detail(id).await.unwrap().unwrap();
        assert_eq!(d.steps[0].state, StepState::Ready);
        assert_eq!(d.steps[0].attempt, 1);
        assert_eq!(
            d.steps[0].error.as_ref().unwrap().kind,
            ErrorKind::LeaseExpired
        );
        let host = HostInfo {
            id: HOST.into(),
            pid: 1,
            hostname: "x".into(),
            name: None,
            handlers: vec!["h".into()],
            started_at: 0,
            last_heartbeat: 0,
            language: None,
            slots: None,
            ended_at: None,
            end_reason: None,
        };
        assert_eq!(
            s.heartbeat(&host, &[run_of(&c)], LEASE).await.unwrap().lost,
            vec![run_of(&c)]
        );
        assert_eq!(
            complete(&s, &c, Resolution::Completed(json!(1))).await,
            Err(Error::LeaseLost(c.step_id))
        );
        let c2 = claim(&s, "h", 1).await.steps.remove(0);
        assert_eq!(c2.attempt, 2);
        assert!(s
            .heartbeat(&host, &[run_of(&c2)], LEASE)
            .await
            .unwrap()
            .lost
            .is_empty());
        assert_eq!(s.list_hosts().await.unwrap()[0].last_heartbeat, clock.now());
        complete(&s, &c2, Resolution::Completed(json!(7)))
            .await
            .unwrap();
        let t = s.get_task(id).await.unwrap().unwrap();
        assert_eq!((t.state, t.result), (TaskState::Completed, Some(json!(7))));
        assert_eq!(
            complete(&s, &c2, Resolution::Completed(json!(8))).await,
            Err(Error::LeaseLost(c2.step_id))
        );
    }

    #[tokio::test]
    async fn released_costs_no_attempt() {
        let (s, _) = store();
        spawn1(&s, NewTask::new("h", json!(null))).await;
        let c = claim(&s, "h", 1).await.steps.remove(0);
        complete(&s, &c, Resolution::Released).await.unwrap();
        assert_eq!(claim(&s, "h", 1).await.steps[0].attempt, 1);
    }

    #[tokio::test]
    async fn checkpoints_keep_newer_attempts() {
        let (s, clock) = store();
        let id = spawn1(&s, NewTask::new("h", json!(null))).await;
        let c1 = claim(&s, "h", 1).await.steps.remove(0);
        s.put_checkpoint(&lease(&c1), "a", json!(1), LEASE)
            .await
            .unwrap();
        s.put_checkpoint(&lease(&c1), "a", json!(2), LEASE)
            .await
            .unwrap();
        complete(
            &s,
            &c1,
            Resolution::Retry {
                error: ErrorInfo::new(ErrorKind::Retryable, "x"),
                run_at: clock.now(),
            },
        )
        .await
        .unwrap();
        let c2 = claim(&s, "h", 1).await.steps.remove(0);
        s.put_checkpoint(&lease(&c2), "b", json!(3), LEASE)
            .await
            .unwrap();
        let cps = s.checkpoints(id).await.unwrap();
        assert_eq!(cps.get("a"), Some(&json!(2)));
        assert_eq!(cps.get("b"), Some(&json!(3)));
        let d = s.task_detail(id).await.unwrap().unwrap();
        assert_eq!(
            d.checkpoints
                .iter()
                .map(|c| c.key.as_str())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
    }

    fn new_step(name: &str, deps: &[&str]) -> NewStep {
        NewStep {
            name: name.into(),
            handler: "w".into(),
            input: json!(name),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            routes: Default::default(),
        }
    }

    #[tokio::test]
    async fn decisions_create_steps_and_move_the_final_step() {
        let (s, _) = store();
        let id = spawn1(&s, NewTask::new("d", json!(null)).priority(3)).await;
        let c = claim(&s, "d", 1).await.steps.remove(0);
        let bad = [
            vec![new_step("a", &[]), new_step("a", &[])],
            vec![new_step("d", &[])],
            vec![new_step("a", &["nope"])],
            vec![new_step("a", &["b"]), new_step("b", &["a"])],
        ];
        for steps in bad {
            let r = Resolution::Decided {
                steps,
                final_step: None,
                result: json!(null),
                status: None,
            };
            assert!(matches!(
                complete(&s, &c, r).await,
                Err(Error::InvalidInput(_))
            ));
        }
        let r = Resolution::Decided {
            steps: vec![
                new_step("a", &["d"]),
                new_step("b", &[]),
                new_step("join", &["a", "b", "a"]),
            ],
            final_step: Some("join".into()),
            result: json!("decided"),
            status: None,
        };
        complete(&s, &c, r).await.unwrap();
        assert_eq!(step_state(&s, id, "join").await, StepState::Blocked);
        let ws = claim(&s, "w", 10).await.steps;
        assert_eq!(
            ws.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert!(ws.iter().all(|c| c.priority == 3));
        complete(&s, &ws[0], Resolution::Completed(json!("A")))
            .await
            .unwrap();
        assert_eq!(step_state(&s, id, "join").await, StepState::Blocked);
        complete(&s, &ws[1], Resolution::Completed(json!("B")))
            .await
            .unwrap();
        let join = claim(&s, "w", 10).await.steps.remove(0);
        assert_eq!(join.name, "join");
        assert!(join.has_dependencies);
        let res = s
            .step_results(id, &["a".into(), "b".into(), "zz".into()])
            .await
            .unwrap();
        assert_eq!(res.len(), 2);
        assert_eq!(task_state(&s, id).await, TaskState::Running);
        complete(&s, &join, Resolution::Completed(json!("J")))
            .await
            .unwrap();
        let t = s.get_task(id).await.unwrap().unwrap();
        assert_eq!(
            (t.state, t.result),
            (TaskState::Completed, Some(json!("J")))
        );
    }

    #[tokio::test]
    async fn empty_decision_completes_and_default_final_is_last() {
        let (s, _) = store();
        let id = spawn1(&s, NewTask::new("d", json!(null))).await;
        let c = claim(&s, "d", 1).await.steps.remove(0);
        let r = Resolution::Decided {
            steps: vec![],
            final_step: None,
            result: json!(5),
            status: None,
        };
        complete(&s, &c, r).await.unwrap();
        assert_eq!(
            s.get_task(id).await.unwrap().unwrap().result,
            Some(json!(5))
        );

        let id = spawn1(&s, NewTask::new("d", json!(null))).await;
        let c = claim(&s, "d", 1).await.steps.remove(0);
        let r = Resolution::Decided {
            steps: vec![new_step("x", &[]), new_step("y", &[])],
            final_step: None,
            result: json!(0),
            status: None,
        };
        complete(&s, &c, r).await.unwrap();
        let ws = claim(&s, "w", 10).await.steps;
        complete(&s, &ws[1], Resolution::Completed(json!("Y")))
            .await
            .unwrap();
        assert_eq!(task_state(&s, id).await, TaskState::Completed);
        assert_eq!(
            s.get_task(id).await.unwrap().unwrap().result,
            Some(json!("Y"))
        );
    }

    #[tokio::test]
    async fn failure_cancels_siblings_and_retry_task_resumes() {
        let (s, _) = store();
        let mut cancelled = s.signals().cancelled.subscribe();
        let id = spawn1(&s, NewTask::new("d", json!(null)).response_event("done")).await;
        let c = claim(&s, "d", 1).await.steps.remove(0);
        let steps = vec![
            new_step("a", &[]),
            new_step("b", &[]),
            new_step("c", &["a", "b"]),
        ];
        complete(
            &s,
            &c,
            Resolution::Decided {
                steps,
                final_step: None,
                result: json!(null),
                status: None,
            },
        )
        .await
        .unwrap();
        let ws = claim(&s, "w", 10).await.steps;
        complete(&s, &ws[0], Resolution::Completed(json!("A")))
            .await
            .unwrap();
        let b2 = claim(&s, "w", 10).await.steps;
        assert!(b2.is_empty());
        let e = ErrorInfo::new(ErrorKind::Permanent, "bad");
        complete(&s, &ws[1], Resolution::Failed(e.clone()))
            .await
            .unwrap();
        let t = s.get_task(id).await.unwrap().unwrap();
        assert_eq!(
            (t.state, t.error.clone()),
            (TaskState::Failed, Some(e.clone()))
        );
        assert_eq!(step_state(&s, id, "c").await, StepState::Cancelled);
        assert!(
            cancelled.try_recv().is_err(),
            "no running sibling was cancelled"
        );
        let ev = s.get_event("done").await.unwrap().unwrap();
        assert_eq!(
            ev.payload,
            json!({"task_id": id.to_string(), "state": "failed", "result": null, "error": serde_json::to_value(&e).unwrap()})
        );
        assert!(matches!(
            s.retry_task(TaskId::new()).await,
            Err(Error::NotFound(_))
        ));
        s.retry_task(id).await.unwrap();
        assert!(matches!(s.retry_task(id).await, Err(Error::Conflict(_))));
        let t = s.get_task(id).await.unwrap().unwrap();
        assert_eq!((t.state, t.error), (TaskState::Running, None));
        assert_eq!(step_state(&s, id, "a").await, StepState::Completed);
        assert_eq!(step_state(&s, id, "c").await, StepState::Blocked);
        let b = claim(&s, "w", 10).await.steps;
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].name.as_str(), b[0].attempt), ("b", 1));
        complete(&s, &b[0], Resolution::Completed(json!("B")))
            .await
            .unwrap();
        let c = claim(&s, "w", 10).await.steps.remove(0);
        complete(&s, &c, Resolution::Completed(json!("C")))
            .await
            .unwrap();
        assert_eq!(task_state(&s, id).await, TaskState::Completed);
    }

    #[tokio::test]
    async fn cancel_cascades_and_announces_running_steps() {
        let (s, _) = store();
        let mut cancelled = s.signals().cancelled.subscribe();
        let parent = spawn1(&s, NewTask::new("p", json!(null))).await;
        let pc = claim(&s, "p", 1).await.steps.remove(0);
        let mut child = NewTask::new("c", json!(null));
        child.parent = Some(ParentRef {
            task_id: parent,
            step_id: pc.step_id,
            group: None,
            index: 0,
        });
        let child = spawn1(&s, child).await;
        let mut grandchild = NewTask::new("g", json!(null));
        grandchild.parent = Some(ParentRef {
            task_id: child,
            step_id: StepId::new(),
            group: None,
            index: 0,
        });
        let grandchild = spawn1(&s, grandchild).await;
        assert!(matches!(
            s.cancel_task(TaskId::new(), true).await,
            Err(Error::NotFound(_))
        ));
        assert!(s.cancel_task(parent, true).await.unwrap());
        assert!(!s.cancel_task(parent, true).await.unwrap());
        assert_eq!(cancelled.try_recv().unwrap(), vec![pc.step_id]);
        for id in [parent, child, grandchild] {
            let t = s.get_task(id).await.unwrap().unwrap();
            assert_eq!(t.state, TaskState::Cancelled);
            assert_eq!(t.error.unwrap().kind, ErrorKind::Cancelled);
        }
        assert_eq!(
            complete(&s, &pc, Resolution::Completed(json!(1))).await,
            Err(Error::LeaseLost(pc.step_id))
        );
        assert!(claim(&s, "c", 10).await.steps.is_empty());
        let d = s.task_detail(parent).await.unwrap().unwrap();
        assert_eq!(d.children.len(), 1);
        assert_eq!(s.count_steps().await.unwrap().get("cancelled"), Some(&3));
    }

    #[tokio::test]
    async fn group_finish_wakes_the_parent_step() {
        let (s, _) = store();
        let parent = spawn1(&s, NewTask::new("p", json!(null))).await;
        let pc = claim(&s, "p", 1).await.steps.remove(0);
        let kids: Vec<NewTask> = (0..3)
            .map(|i| {
                let mut t = NewTask::new("c", json!(i));
                t.parent = Some(ParentRef {
                    task_id: parent,
                    step_id: pc.step_id,
                    group: Some("g1".into()),
                    index: 2 - i,
                });
                t
            })
            .collect();
        s.spawn(kids).await.unwrap();
        let wait = WaitFor {
            group: Some("g1".into()),
            ..Default::default()
        };
        complete(&s, &pc, Resolution::Suspended(wait))
            .await
            .unwrap();
        assert_eq!(step_state(&s, parent, "p").await, StepState::Suspended);
        let cs = claim(&s, "c", 10).await.steps;
        complete(&s, &cs[0], Resolution::Completed(json!("r0")))
            .await
            .unwrap();
        complete(
            &s,
            &cs[1],
            Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "x")),
        )
        .await
        .unwrap();
        assert_eq!(step_state(&s, parent, "p").await, StepState::Suspended);
        assert!(s.cancel_task(cs[2].task_id, false).await.unwrap());
        assert_eq!(step_state(&s, parent, "p").await, StepState::Ready);
        let out = s.group_outcomes("g1").await.unwrap();
        let states: Vec<TaskState> = out.iter().map(|o| o.state).collect();
        assert_eq!(
            states,
            vec![
                TaskState::Cancelled,
                TaskState::Failed,
                TaskState::Completed
            ]
        );
        assert_eq!(out[2].result, Some(json!("r0")));
        assert!(s.group_outcomes("nope").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn response_event_wakes_a_waiting_step() {
        let (s, _) = store();
        let waiter = spawn1(&s, NewTask::new("w", json!(null))).await;
        let wc = claim(&s, "w", 1).await.steps.remove(0);
        complete(
            &s,
            &wc,
            Resolution::Suspended(WaitFor {
                event: Some("reply".into()),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        let id = spawn1(&s, NewTask::new("h", json!(null)).response_event("reply")).await;
        let c = claim(&s, "h", 1).await.steps.remove(0);
        complete(&s, &c, Resolution::Completed(json!({"v": 1})))
            .await
            .unwrap();
        assert_eq!(step_state(&s, waiter, "w").await, StepState::Ready);
        let ev = s.get_event("reply").await.unwrap().unwrap();
        assert_eq!(
            ev.payload,
            json!({"task_id": id.to_string(), "state": "completed", "result": {"v": 1}, "error": null})
        );
        assert_eq!(s.list_events(0).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn listing_is_newest_first_and_filtered() {
        let (s, _) = store();
        let a = spawn1(&s, NewTask::new("a", json!(null))).await;
        let b = spawn1(&s, NewTask::new("b", json!(null))).await;
        let c = spawn1(&s, NewTask::new("a", json!(null))).await;
        let all: Vec<TaskId> = s
            .list_tasks(&TaskFilter::default())
            .await
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(all, vec![c, b, a]);
        let f = TaskFilter {
            handler: Some("a".into()),
            limit: 1,
            ..Default::default()
        };
        assert_eq!(s.list_tasks(&f).await.unwrap()[0].id, c);
        let f = TaskFilter {
            state: Some(TaskState::Completed),
            ..Default::default()
        };
        assert!(s.list_tasks(&f).await.unwrap().is_empty());
        assert!(a.0 < b.0 && b.0 < c.0, "ids are time-ordered");
    }

    /// Recomputes every index from the rows and compares.
    fn check_invariants(inner: &Inner) {
        let mut counts = [0u64; 7];
        let mut ready_slots = 0;
        for (id, s) in &inner.steps {
            counts[s.rec.state as usize] += 1;
            assert_eq!(*id, s.rec.id);
            match s.slot {
                Slot::Ready => {
                    ready_slots += 1;
                    assert_eq!(s.rec.state, StepState::Ready);
                    assert!(inner.queues[s.rec.handler.as_str()]
                        .ready
                        .contains(&ready_key(s)));
                }
                Slot::Delayed(g) => {
                    assert!(matches!(
                        s.rec.state,
                        StepState::Ready | StepState::Suspended
                    ));
                    let q = &inner.queues[s.rec.handler.as_str()];
                    assert!(q.delayed.iter().any(|Reverse((at, gen, sid))| *gen == g
                        && sid == id
                        && Some(*at) == s.rec.run_at));
                }
                Slot::Unindexed => {
                    assert_ne!(
                        s.rec.state,
                        StepState::Ready,
                        "a ready step must be indexed"
                    );
                }
            }
            assert_eq!(
                s.rec.state == StepState::Running,
                inner.running.contains(id)
            );
            if s.rec.state == StepState::Running {
                assert!(s.rec.lease_owner.is_some() && s.rec.lease_expires_at.is_some());
            }
            if s.rec.state == StepState::Suspended {
                if let Some(ev) = s.rec.wait.as_ref().and_then(|w| w.event.as_ref()) {
                    assert!(inner.waiters[ev].contains(id));
                    assert!(!inner.events.contains_key(ev));
                }
            }
            let task = &inner.tasks[&s.rec.task_id];
            if s.rec.state == StepState::Blocked {
                let pending = distinct(&s.rec.depends_on)
                    .into_iter()
                    .filter(|d| {
                        task.find_step(d)
                            .is_none_or(|x| inner.steps[&x].rec.state != StepState::Completed)
                    })
                    .count() as u32;
                assert_eq!(pending, s.pending);
                assert!(pending > 0);
            }
            if matches!(task.rec.state, TaskState::Failed | TaskState::Cancelled) {
                assert!(s.rec.state.is_terminal());
            }
        }
        assert_eq!(counts, inner.counts);
        let in_ready: usize = inner.queues.values().map(|q| q.ready.len()).sum();
        assert_eq!(in_ready, ready_slots);
        for (name, set) in &inner.waiters {
            assert!(!set.is_empty());
            for id in set {
                let s = &inner.steps[id];
                assert_eq!(s.rec.state, StepState::Suspended);
                assert_eq!(
                    s.rec.wait.as_ref().and_then(|w| w.event.as_deref()),
                    Some(name.as_str())
                );
            }
        }
        for g in inner.groups.values() {
            let open = g
                .children
                .iter()
                .filter(|(_, t)| !inner.tasks[t].rec.state.is_terminal())
                .count();
            assert_eq!(open, g.unfinished);
        }
        assert_eq!(inner.task_order.len(), inner.tasks.len());
    }

    #[tokio::test]
    async fn random_operations_keep_the_indexes_consistent() {
        let (s, clock) = store();
        let mut rng = Wyrand(0x5eed_1234_abcd_0042);
        let mut held: Vec<ClaimedStep> = Vec::new();
        let mut tasks: Vec<TaskId> = Vec::new();
        let handlers = ["a", "b", "d"];
        for round in 0..4000 {
            let r = rng.random();
            let pick = |n: usize, x: u64| (x % n as u64) as usize;
            match r % 13 {
                0..=2 => {
                    let n = 1 + pick(4, r >> 8);
                    let batch = (0..n)
                        .map(|i| {
                            let x = rng.random();
                            let mut t = NewTask::new(handlers[pick(3, x)], json!(i))
                                .priority(pick(3, x >> 4) as i32);
                            if x & 0x100 != 0 {
                                t.run_at = Some(clock.now() + pick(50, x >> 12) as i64 - 10);
                            }
                            if x & 0x200 != 0 {
                                t.idempotency_key = Some(format!("k{}", pick(200, x >> 20)));
                            }
                            if x & 0x400 != 0 {
                                t.response_event = Some(format!("ev{}", pick(20, x >> 28)));
                            }
                            if x & 0x800 != 0 && !held.is_empty() {
                                let p = &held[pick(held.len(), x >> 36)];
                                t.parent = Some(ParentRef {
                                    task_id: p.task_id,
                                    step_id: p.step_id,
                                    group: Some(format!("g-{}", p.step_id)),
                                    index: i as u32,
                                });
                            }
                            t
                        })
                        .collect();
                    tasks.extend(s.spawn(batch).await.unwrap().iter().map(|x| x.task_id));
                }
                3..=5 => {
                    let w: Vec<(String, usize)> = handlers
                        .iter()
                        .map(|h| (h.to_string(), pick(4, r >> 8)))
                        .collect();
                    held.extend(s.claim(HOST, &w, 100).await.unwrap().steps);
                }
                6..=9 if !held.is_empty() => {
                    let c = held.swap_remove(pick(held.len(), r >> 8));
                    let now = clock.now();
                    let x = rng.random();
                    let res = match pick(8, x) {
                        0 | 1 => Resolution::Completed(json!(round)),
                        2 => {
                            let k = 1 + pick(3, x >> 8);
                            let steps = (0..k)
                                .map(|i| NewStep {
                                    name: format!("s{round}-{i}"),
                                    handler: handlers[pick(3, x >> (12 + i))].into(),
                                    input: json!(null),
                                    depends_on: (0..i)
                                        .filter(|j| (x >> (20 + j)) & 1 == 1)
                                        .map(|j| format!("s{round}-{j}"))
                                        .collect(),
                                    routes: Default::default(),
                                })
                                .collect();
                            Resolution::Decided {
                                steps,
                                final_step: None,
                                result: json!(null),
                                status: None,
                            }
                        }
                        3 => Resolution::Retry {
                            error: ErrorInfo::new(ErrorKind::Retryable, "r"),
                            run_at: now + pick(30, x >> 8) as i64 - 5,
                        },
                        4 => Resolution::Failed(ErrorInfo::new(ErrorKind::Permanent, "f")),
                        5 => Resolution::Released,
                        _ => Resolution::Suspended(WaitFor {
                            wake_at: (x & 0x100 != 0).then(|| now + pick(40, x >> 12) as i64),
                            event: (x & 0x200 != 0).then(|| format!("ev{}", pick(20, x >> 20))),
                            group: (x & 0x400 != 0).then(|| format!("g-{}", c.step_id)),
                        }),
                    };
                    let _ = complete(&s, &c, res).await;
                }
                10 => {
                    let _ = s
                        .emit_event(&format!("ev{}", pick(20, r >> 8)), json!(round))
                        .await
                        .unwrap();
                }
                11 if !tasks.is_empty() => {
                    let id = tasks[pick(tasks.len(), r >> 8)];
                    if r & 0x10000 != 0 {
                        // A task removed by `cleanup` is no longer found.
                        match s.cancel_task(id, r & 0x20000 != 0).await {
                            Ok(_) | Err(Error::NotFound(_)) => {}
                            Err(e) => panic!("cancel_task: {e}"),
                        }
                    } else {
                        let _ = s.retry_task(id).await;
                    }
                }
                _ => {
                    clock.advance(pick(20, r >> 8) as i64);
                    s.recover_expired().await.unwrap();
                    if r & 0x40000 != 0 {
                        let before = clock.now() - pick(40, r >> 20) as i64;
                        let n = s.cleanup(before, 1 + pick(4, r >> 28)).await.unwrap();
                        assert!(n <= 4);
                    }
                }
            }
            check_invariants(&s.inner.lock());
        }
        let counts = s.count_steps().await.unwrap();
        let (groups, events) = {
            let inner = s.inner.lock();
            (inner.groups.len(), inner.events.len())
        };
        eprintln!("{counts:?} groups={groups} events={events}");
        assert!(
            counts.get("completed").copied().unwrap_or(0) > 0,
            "{counts:?}"
        );
    }
}
