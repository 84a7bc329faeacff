//! The shared state of one simulated run: the seeded RNG, the clock, fault
//! switches, and the log of observations that handlers, the store wrapper
//! and the driver write and the invariants are checked against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;
use switchyard_core::{Millis, StepId, TaskId};

use crate::clock::SimClock;
use crate::rng::SplitMix64;

/// Which run of a step a store call comes from: set (as a tokio task-local)
/// around every handler body, so the wrapper can tell a handler's writes
/// (emit, spawn) from the worker's own.
#[derive(Clone, Debug)]
pub struct RunTag {
    /// The task.
    pub task: TaskId,
    /// The step.
    pub step: StepId,
    /// The attempt the run belongs to.
    pub attempt: u32,
    /// The run number (fencing token) the run was claimed with.
    pub run: u64,
    /// The host id the run's lease names.
    pub host_id: String,
}

tokio::task_local! {
    /// The run whose handler body is executing (see [`RunTag`]).
    pub static RUN: RunTag;
}

/// One invariant broken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Short invariant name, e.g. `checkpoint-collision`.
    pub invariant: &'static str,
    /// What was seen.
    pub message: String,
}

/// What a task is expected to end as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The workload lets it complete.
    Completed,
    /// The workload fails it permanently.
    Failed,
}

/// A task the run knows about (spawned by the driver or by a step).
#[derive(Clone, Debug)]
pub struct TaskInfo {
    /// Handler of its root step.
    pub handler: String,
    /// What it should end as (unless cancelled).
    pub expect: Expect,
    /// Parent task, for children.
    pub parent: Option<TaskId>,
    /// Cancelled by the driver (accepted by the store).
    pub cancelled: bool,
    /// Sequence number of an accepted cascade cancel of this task.
    pub cascade_at: Option<u64>,
    /// Sequence number of its creation.
    pub created_at: u64,
}

/// One claim of a step, as the store granted it.
#[derive(Clone, Debug)]
pub struct RunObs {
    /// Attempt number the claim carried.
    pub attempt: u32,
    /// Run number the claim carried.
    pub run: u64,
    /// Host id the lease was granted to.
    pub host_id: String,
    /// The accepted outcome (`completed`, `suspended`, `retry`, ...), if any.
    pub accepted: Option<&'static str>,
    /// The accepted outcome's error message (failures).
    pub accepted_error: Option<String>,
    /// A handler body of this run started.
    pub body_entered: bool,
}

/// Fault switches and the per-host fault state.
#[derive(Debug, Default)]
pub struct Faults {
    /// Store-call faults (delay, transient failure, lost reply) are drawn.
    pub on: bool,
    /// Probability that a store call is delayed.
    pub p_delay: f64,
    /// Probability that a store call fails before it is applied.
    pub p_fail: f64,
    /// Probability that a write is applied and its reply lost.
    pub p_lose: f64,
    /// Crashed hosts (by sim host index): their store calls never return.
    pub crashed: BTreeSet<usize>,
    /// Hosts whose heartbeats fail until this virtual time (ms since start).
    pub stalled_until: BTreeMap<usize, u64>,
}

/// Everything observed during a run.
#[derive(Debug, Default)]
pub struct Obs {
    /// Sequence counter (orders observations).
    pub seq: u64,
    /// Known tasks.
    pub tasks: BTreeMap<TaskId, TaskInfo>,
    /// Claims per step, in order.
    pub runs: HashMap<StepId, Vec<RunObs>>,
    /// Task of each claimed step.
    pub step_task: HashMap<StepId, TaskId>,
    /// Handler of each claimed step.
    pub step_handler: HashMap<StepId, String>,
    /// Accepted checkpoint writes by (task, logical checkpoint id) → seq.
    pub cp_commits: HashMap<(TaskId, String), u64>,
    /// Checkpoint bodies executed: (task, logical id, seq at start).
    pub cp_bodies: Vec<(TaskId, String, u64)>,
    /// Per-op execution counters (inject-once / inject-n-times faults).
    pub counters: HashMap<String, u32>,
    /// Handler bodies currently executing per step: (run, host id).
    pub active: HashMap<StepId, Vec<(u64, String)>>,
    /// Two bodies of one step overlapped (legitimate after a lost lease;
    /// counted, not a violation).
    pub overlaps: u64,
    /// Events the workload waits for (the driver emits each eventually).
    pub events: BTreeSet<String>,
    /// Sim host index → host id, once known.
    pub host_ids: BTreeMap<usize, String>,
}

/// The state shared by everything in one run.
pub struct World {
    /// The run's seed.
    pub seed: u64,
    /// The run's only RNG.
    pub rng: Mutex<SplitMix64>,
    /// The store clock.
    pub clock: Arc<SimClock>,
    /// Fault switches.
    pub faults: Mutex<Faults>,
    /// Observations.
    pub obs: Mutex<Obs>,
    violations: Mutex<Vec<Violation>>,
    trace: Option<Mutex<String>>,
}

impl World {
    /// A world for `seed`; `trace` keeps a readable log of the run.
    pub fn new(seed: u64, trace: bool) -> Self {
        Self {
            seed,
            rng: Mutex::new(SplitMix64::new(seed)),
            clock: Arc::new(SimClock::new()),
            faults: Mutex::new(Faults::default()),
            obs: Mutex::new(Obs::default()),
            violations: Mutex::new(Vec::new()),
            trace: trace.then(|| Mutex::new(String::new())),
        }
    }

    /// Virtual milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.clock.elapsed_ms()
    }

    /// The store clock (with jumps).
    pub fn store_now(&self) -> Millis {
        switchyard_core::Clock::now(&*self.clock)
    }

    /// Draws from the run's RNG.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut SplitMix64) -> T) -> T {
        f(&mut self.rng.lock())
    }

    /// True if tracing is on (callers skip formatting otherwise).
    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// Appends a trace line (formatted only when tracing).
    pub fn trace(&self, line: impl FnOnce() -> String) {
        if let Some(t) = &self.trace {
            let l = line();
            let mut t = t.lock();
            let _ = writeln!(t, "{:>9} {l}", self.now_ms());
        }
    }

    /// Records a broken invariant.
    pub fn violation(&self, invariant: &'static str, message: impl Into<String>) {
        let message = message.into();
        self.trace(|| format!("VIOLATION {invariant}: {message}"));
        let mut v = self.violations.lock();
        // The same message from a repeated replay is one violation.
        if !v
            .iter()
            .any(|x| x.invariant == invariant && x.message == message)
        {
            v.push(Violation { invariant, message });
        }
    }

    /// The violations so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.violations.lock().clone()
    }

    /// The trace so far.
    pub fn trace_text(&self) -> String {
        self.trace
            .as_ref()
            .map(|t| t.lock().clone())
            .unwrap_or_default()
    }

    /// Next observation sequence number.
    pub fn next_seq(&self) -> u64 {
        let mut o = self.obs.lock();
        o.seq += 1;
        o.seq
    }

    /// Increments and returns a named counter.
    pub fn bump(&self, key: String) -> u32 {
        let mut o = self.obs.lock();
        let c = o.counters.entry(key).or_insert(0);
        *c += 1;
        *c
    }

    /// Whether sim host `idx` has crashed.
    pub fn crashed(&self, idx: usize) -> bool {
        self.faults.lock().crashed.contains(&idx)
    }

    /// Sim host index of a host id, if known.
    pub fn host_index(&self, host_id: &str) -> Option<usize> {
        self.obs
            .lock()
            .host_ids
            .iter()
            .find(|(_, h)| h.as_str() == host_id)
            .map(|(i, _)| *i)
    }

    /// A readable name for a host id (`h3`), for traces and messages.
    pub fn host_name(&self, host_id: &str) -> String {
        match self.host_index(host_id) {
            Some(i) => format!("h{i}"),
            None => "h?".to_string(),
        }
    }

    /// A handler body of `tag`'s run starts.
    pub fn body_enter(&self, tag: &RunTag) {
        let mut o = self.obs.lock();
        if let Some(r) = o.runs.get_mut(&tag.step).and_then(|rs| {
            rs.iter_mut()
                .rev()
                .find(|r| r.run == tag.run && r.host_id == tag.host_id)
        }) {
            r.body_entered = true;
        }
        let a = o.active.entry(tag.step).or_default();
        a.push((tag.run, tag.host_id.clone()));
        if a.len() > 1 {
            o.overlaps += 1;
        }
    }

    /// A handler body of `tag`'s run ended (returned, panicked or was dropped).
    pub fn body_exit(&self, tag: &RunTag) {
        let mut o = self.obs.lock();
        if let Some(a) = o.active.get_mut(&tag.step) {
            if let Some(i) = a
                .iter()
                .position(|(r, h)| *r == tag.run && *h == tag.host_id)
            {
                a.remove(i);
            }
        }
    }

    /// A checkpoint body (logical id `lid` of `task`) is about to run: it
    /// must not have been committed already.
    pub fn cp_body(&self, task: TaskId, lid: &str) {
        let seq = self.next_seq();
        let committed = {
            let mut o = self.obs.lock();
            o.cp_bodies.push((task, lid.to_string(), seq));
            o.cp_commits.get(&(task, lid.to_string())).copied()
        };
        self.trace(|| format!("body  cp {lid} task {task}"));
        if let Some(at) = committed {
            self.violation(
                "checkpoint-once",
                format!("checkpoint body {lid} of task {task} runs again although it was committed (seq {at} < {seq})"),
            );
        }
    }

    /// A checkpoint write was accepted by the store: commits its logical id.
    pub fn cp_commit(&self, task: TaskId, value: &Value) {
        if let Some(lid) = value.get("cp").and_then(Value::as_str) {
            let seq = self.next_seq();
            self.obs
                .lock()
                .cp_commits
                .entry((task, lid.to_string()))
                .or_insert(seq);
        }
    }
}

/// Runs `fut` as handler body of `tag`, recording its start and end (also
/// when it panics or is dropped).
pub async fn body<F: std::future::Future>(world: &Arc<World>, tag: RunTag, fut: F) -> F::Output {
    struct Guard<'a>(&'a World, RunTag);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.body_exit(&self.1);
        }
    }
    world.body_enter(&tag);
    let _g = Guard(world, tag.clone());
    RUN.scope(tag, fut).await
}
