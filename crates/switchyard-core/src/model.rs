//! The durable model: tasks, steps, checkpoints, events and hosts.
//!
//! Times are milliseconds since the Unix epoch, always read from the store's
//! clock ([`crate::Clock`]) so that a fake clock can drive sleeps and retries
//! in tests, and so that PostgreSQL can use the database clock as the only one.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Milliseconds since the Unix epoch, on the store's clock.
pub type Millis = i64;

/// Request headers carried by a task and visible to every step (`ctx.headers`).
pub type Headers = BTreeMap<String, String>;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                Self(crate::ids::new_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim())
                    .map(Self)
                    .map_err(|e| crate::Error::InvalidInput(format!("`{s}` is not a valid id: {e}")))
            }
        }
    };
}

id_type!(
    /// Identifies a task (one durable workflow instance).
    TaskId
);
id_type!(
    /// Identifies a step (the unit dispatched to a handler).
    StepId
);

macro_rules! state_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The lowercase name used in the store and on the command line.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(crate::Error::InvalidInput(format!(
                        "unknown {} `{other}` (expected one of: {})",
                        stringify!($name),
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}

state_enum!(
    /// Where a step is in its lifecycle (DESIGN.md §3).
    StepState {
        /// Waiting for the steps it depends on.
        Blocked => "blocked",
        /// Runnable once `run_at` is reached.
        Ready => "ready",
        /// Leased by one host.
        Running => "running",
        /// Result stored.
        Completed => "completed",
        /// Permanent error, invalid input or attempts exhausted.
        Failed => "failed",
        /// Awaiting an event, a sleep or child tasks; no host holds it.
        Suspended => "suspended",
        /// Cancelled with its task.
        Cancelled => "cancelled",
    }
);

impl StepState {
    /// True for states a step never leaves (except through an explicit retry).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

state_enum!(
    /// The state of a whole task.
    TaskState {
        /// Some step has not finished.
        Running => "running",
        /// The final step completed; `result` holds its result.
        Completed => "completed",
        /// A step failed permanently.
        Failed => "failed",
        /// Cancelled by a client.
        Cancelled => "cancelled",
    }
);

impl TaskState {
    /// True once the task has finished, one way or another.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Running)
    }
}

/// How an error is classified; decides whether the core retries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Worth another attempt (default for unexpected exceptions).
    Retryable,
    /// Never retried.
    Permanent,
    /// The input was rejected by the handler or the core; never retried.
    InvalidInput,
    /// The handler exceeded its timeout (retryable).
    Timeout,
    /// Recorded for a panicking handler by versions before 0.1's issue 21;
    /// a panic is now `Retryable` (as an unexpected exception is in every
    /// language), with a message starting `handler panicked:`. Kept so
    /// stores written by those versions still read.
    Panic,
    /// The host's lease expired before the step finished (retryable).
    LeaseExpired,
    /// The step was cancelled.
    Cancelled,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: &'static [ErrorKind] = &[
        Self::Retryable,
        Self::Permanent,
        Self::InvalidInput,
        Self::Timeout,
        Self::Panic,
        Self::LeaseExpired,
        Self::Cancelled,
    ];

    /// The snake_case name used in the store, in JSON and in every language.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
            Self::InvalidInput => "invalid_input",
            Self::Timeout => "timeout",
            Self::Panic => "panic",
            Self::LeaseExpired => "lease_expired",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error recorded on a step or task: what happened, where, and the
/// language's own trace (Python traceback, JS stack, Ruby backtrace).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The classification.
    pub kind: ErrorKind,
    /// A human-readable message.
    pub message: String,
    /// Optional traceback or backtrace text from the handler's language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// The attempt on which it happened.
    #[serde(default)]
    pub attempt: u32,
}

impl ErrorInfo {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            trace: None,
            attempt: 0,
        }
    }
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// Links a child task to the step that spawned or delegated it.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent task.
    pub task_id: TaskId,
    /// The parent step (it is woken when the group finishes).
    pub step_id: StepId,
    /// The delegation group, if the parent awaits the child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Position within the group.
    #[serde(default)]
    pub index: u32,
}

/// Everything needed to create a task (and its root step).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NewTask {
    /// Handler of the root step.
    pub handler: String,
    /// Input of the root step.
    pub input: Value,
    /// Headers visible to every step.
    #[serde(default)]
    pub headers: Headers,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Spawning twice with the same key returns the first task.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// An event emitted with the outcome when the task finishes.
    #[serde(default)]
    pub response_event: Option<String>,
    /// Do not start before this time (default: now).
    #[serde(default)]
    pub run_at: Option<Millis>,
    /// Set by `ctx.spawn`/`ctx.delegate`.
    #[serde(default)]
    pub parent: Option<ParentRef>,
}

impl NewTask {
    /// A task for `handler` with `input` and defaults for everything else.
    pub fn new(handler: impl Into<String>, input: Value) -> Self {
        Self {
            handler: handler.into(),
            input,
            headers: Headers::new(),
            priority: 0,
            idempotency_key: None,
            response_event: None,
            run_at: None,
            parent: None,
        }
    }
    /// Sets the priority (higher runs first).
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }
    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, k: impl Into<String>) -> Self {
        self.idempotency_key = Some(k.into());
        self
    }
    /// Sets the response event.
    pub fn response_event(mut self, e: impl Into<String>) -> Self {
        self.response_event = Some(e.into());
        self
    }
    /// Adds a header.
    pub fn header(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.headers.insert(k.into(), v.into());
        self
    }
    /// Delays the start.
    pub fn run_at(mut self, at: Millis) -> Self {
        self.run_at = Some(at);
        self
    }
}

/// The answer to a spawn: the task id and whether it was created now
/// (`false` when an existing task with the same idempotency key was returned).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Spawned {
    /// The task.
    pub task_id: TaskId,
    /// False if the idempotency key matched an existing task.
    pub created: bool,
}

/// The payload of a task's response event (`response_event` of a spawn),
/// emitted when the task finishes: read it with
/// `serde_json::from_value::<ResponseEvent>(payload)`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ResponseEvent {
    /// The task that finished.
    pub task_id: TaskId,
    /// `completed`, `failed` or `cancelled`.
    pub state: TaskState,
    /// Its result (completed), else null.
    pub result: Option<Value>,
    /// Its error (failed or cancelled), else null.
    pub error: Option<ErrorInfo>,
}

/// A step created by a decision (or fan-out) inside an existing task.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NewStep {
    /// Unique name within the task.
    pub name: String,
    /// The handler that runs it.
    pub handler: String,
    /// Its input.
    pub input: Value,
    /// Names of steps of the same task (created in the same decision or
    /// already existing) that must complete first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Routing on the step's status: when the step completes with status
    /// `S` (set by its handler with `ctx.set_status`; `ok` when it sets
    /// none), the steps under `S` are created, as a decision would create
    /// them. A routed step with no `depends_on` depends on this step, so it
    /// reads this step's result through `dependency_results`. A status with
    /// no route fails the step. Empty: the step is not routed.
    #[serde(default, skip_serializing_if = "Routes::is_empty")]
    pub routes: Routes,
}

/// Steps to create per status (see [`NewStep::routes`]).
pub type Routes = std::collections::BTreeMap<String, Vec<NewStep>>;

/// The status a routed step ends with when its handler sets none.
pub const DEFAULT_STATUS: &str = "ok";

impl NewStep {
    /// A step running `handler` on `input`, with no dependencies or routes.
    pub fn new(name: impl Into<String>, handler: impl Into<String>, input: Value) -> Self {
        Self {
            name: name.into(),
            handler: handler.into(),
            input,
            depends_on: Vec::new(),
            routes: Routes::new(),
        }
    }

    /// Runs after these steps of the same task.
    pub fn after<I, S>(mut self, deps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.depends_on.extend(deps.into_iter().map(Into::into));
        self
    }

    /// When this step ends with `status`, `steps` are created (see
    /// [`NewStep::routes`]).
    pub fn route(mut self, status: impl Into<String>, steps: Vec<NewStep>) -> Self {
        self.routes.insert(status.into(), steps);
        self
    }
}

/// A step handed to a host by [`crate::Store::claim`].
#[derive(Clone, PartialEq, Debug)]
pub struct ClaimedStep {
    /// The step.
    pub step_id: StepId,
    /// Its task.
    pub task_id: TaskId,
    /// Step name (the root step is named after its handler).
    pub name: String,
    /// Handler name.
    pub handler: String,
    /// Input.
    pub input: Value,
    /// Task headers.
    pub headers: Headers,
    /// The attempt this run belongs to: 1 until a run fails (an error, a
    /// timeout or a lost lease); a resume after a suspension continues the
    /// same attempt.
    pub attempt: u32,
    /// This run's number (fencing token): every claim of the step takes the
    /// next one, and numbers are never reused (not after a retry, a release
    /// or a recovery). Every write of the run carries it.
    pub run: u64,
    /// Priority (higher first).
    pub priority: i32,
    /// When the lease runs out unless renewed.
    pub lease_expires_at: Millis,
    /// Whether the step has dependencies (convergence steps).
    pub has_dependencies: bool,
    /// When the step was due to run (its `run_at`), so a host can tell how
    /// long it waited to be claimed (the queue-wait metric).
    pub ready_at: Millis,
    /// The step's routes (see [`NewStep::routes`]); empty if not routed.
    pub routes: Routes,
}

/// Identifies one lease: the step, the run and the host holding it.
/// Writes carrying a lease that is no longer current (the step is not
/// `running`, or is running under another run number or host) are rejected.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Lease {
    /// The step.
    pub step_id: StepId,
    /// Its task.
    pub task_id: TaskId,
    /// The attempt the run belongs to (for error reports; not a fence).
    pub attempt: u32,
    /// The run the lease was granted for: the fencing token.
    pub run: u64,
    /// The host holding the lease.
    pub host_id: String,
}

/// What a wait is waiting for (several conditions: whichever comes first).
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize)]
pub struct WaitFor {
    /// Wake at this time (sleep, or an await timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<Millis>,
    /// Wake when this event is emitted (or was already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Wake when every child task of this delegation group has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The resolved outcome of one run of a step, as the store applies it. The
/// core has already applied the retry policy: the store only records.
#[derive(Clone, PartialEq, Debug)]
pub enum Resolution {
    /// Store the result; unblock dependants; finish the task if this is its final step.
    Completed(Value),
    /// Create these steps atomically (a decision); the step completes with
    /// `result`. `final_step` names the created step whose result becomes the
    /// task's result (`None` with no steps: the task completes with `result`).
    Decided {
        /// The steps to create.
        steps: Vec<NewStep>,
        /// Which created step carries the task's result.
        final_step: Option<String>,
        /// The decision step's own result.
        result: Value,
        /// The status the step ended with, when it is routed or its handler
        /// set one (see [`NewStep::routes`]); recorded with the step.
        status: Option<String>,
    },
    /// Back to `ready` at `run_at`.
    Retry {
        /// What went wrong.
        error: ErrorInfo,
        /// When to try again.
        run_at: Millis,
    },
    /// Permanently failed: the task fails, its other steps are cancelled.
    Failed(ErrorInfo),
    /// Suspended until the wait is satisfied; the host is free meanwhile.
    /// If the condition already holds when this is applied, the step goes
    /// straight back to `ready` (no lost wake-up).
    Suspended(WaitFor),
    /// Handed back without costing an attempt (graceful shutdown).
    Released,
}

/// One completion: the lease it was run under and its resolution.
#[derive(Clone, PartialEq, Debug)]
pub struct Completion {
    /// The lease.
    pub lease: Lease,
    /// What to record.
    pub resolution: Resolution,
}

/// What a claim returns.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ClaimBatch {
    /// The claimed steps, highest priority first, then earliest `run_at`.
    pub steps: Vec<ClaimedStep>,
    /// The earliest future time at which a step for one of the requested
    /// handlers becomes due (a retry backoff, a scheduled spawn, a sleep or
    /// an await timeout); `None` if nothing is scheduled.
    pub next_due: Option<Millis>,
}

/// A host registration (`switchyard workers`).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host id (UUIDv7 text).
    pub id: String,
    /// Process id.
    pub pid: u32,
    /// Machine name.
    pub hostname: String,
    /// The host's configured name (`host.name`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Handlers registered in this host.
    pub handlers: Vec<String>,
    /// When it started.
    pub started_at: Millis,
    /// Last heartbeat.
    pub last_heartbeat: Millis,
    /// The language its handlers are written in (`rust`, `python`, `ruby`,
    /// `node`, `c`); `None` for registrations older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Steps it runs at once (its concurrency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u64>,
    /// When its registration ended; `None` while it is registered.
    /// [`Store::list_hosts`](crate::Store::list_hosts) lists registered hosts
    /// only, [`Store::ended_hosts`](crate::Store::ended_hosts) the ended ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Millis>,
    /// How it ended: [`HOST_STOPPED`] (it deregistered at shutdown) or
    /// [`HOST_DEAD`] (another host found its process gone and expired its
    /// leases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

/// A registered host counts as live if it heartbeated within this window
/// (`switchyard workers`, the live-hosts gauge of `switchyard serve`): three
/// default heartbeats (5 s) plus slack for a slow store.
pub const LIVE_HOST_WINDOW_MS: Millis = 30_000;

impl HostInfo {
    /// Whether it heartbeated within [`LIVE_HOST_WINDOW_MS`] of `now`.
    pub fn is_live(&self, now: Millis) -> bool {
        now.saturating_sub(self.last_heartbeat) <= LIVE_HOST_WINDOW_MS
    }
}

/// [`HostInfo::end_reason`] of a host that stopped cleanly.
pub const HOST_STOPPED: &str = "stopped";
/// [`HostInfo::end_reason`] of a host whose process was found gone.
pub const HOST_DEAD: &str = "dead";
/// How long stores keep the registration of an ended host (24 hours) for
/// [`Store::ended_hosts`](crate::Store::ended_hosts); older ones are deleted
/// when another host ends.
pub const ENDED_HOST_RETENTION_MS: Millis = 24 * 60 * 60 * 1000;

/// One run of a step, as a host reports it in a heartbeat.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct RunRef {
    /// The step.
    pub step_id: StepId,
    /// The run number ([`ClaimedStep::run`]).
    pub run: u64,
}

/// The answer to a heartbeat.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct HeartbeatReply {
    /// Runs this host reported whose lease is no longer theirs (the step was
    /// cancelled or finished, or its lease expired and another run took it):
    /// stop them.
    pub lost: Vec<RunRef>,
    /// Of `lost`, the runs whose step was cancelled (the handler gets a
    /// cancellation, not a lost lease).
    pub cancelled: Vec<RunRef>,
}

/// A task as stored.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Id.
    pub id: TaskId,
    /// Handler of the root step.
    pub handler: String,
    /// Input of the root step.
    pub input: Value,
    /// State.
    pub state: TaskState,
    /// Result (completed tasks).
    pub result: Option<Value>,
    /// Error (failed or cancelled tasks).
    pub error: Option<ErrorInfo>,
    /// Headers.
    pub headers: Headers,
    /// Priority.
    pub priority: i32,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Response event.
    pub response_event: Option<String>,
    /// Parent link, for children.
    pub parent: Option<ParentRef>,
    /// Creation time.
    pub created_at: Millis,
    /// Last change.
    pub updated_at: Millis,
}

/// A step as stored.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    /// Id.
    pub id: StepId,
    /// Task.
    pub task_id: TaskId,
    /// Name, unique in the task.
    pub name: String,
    /// Handler.
    pub handler: String,
    /// Input.
    pub input: Value,
    /// State.
    pub state: StepState,
    /// Attempts used: failed runs so far, plus the current run while
    /// running. Suspensions cost none.
    pub attempt: u32,
    /// Runs so far (the last run's number); never decreases.
    #[serde(default)]
    pub run: u64,
    /// Priority.
    pub priority: i32,
    /// Not before this time (ready), or wake time (suspended).
    pub run_at: Option<Millis>,
    /// Host holding the lease (running).
    pub lease_owner: Option<String>,
    /// Lease expiry (running).
    pub lease_expires_at: Option<Millis>,
    /// Result (completed).
    pub result: Option<Value>,
    /// Last error (retrying or failed).
    pub error: Option<ErrorInfo>,
    /// Dependencies by name.
    pub depends_on: Vec<String>,
    /// What a suspended step waits for.
    pub wait: Option<WaitFor>,
    /// The status it completed with (routed steps, or a handler that set
    /// one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Its routes (see [`NewStep::routes`]).
    #[serde(default, skip_serializing_if = "Routes::is_empty")]
    pub routes: Routes,
    /// Creation time.
    pub created_at: Millis,
    /// Last change.
    pub updated_at: Millis,
}

/// A stored checkpoint.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Task.
    pub task_id: TaskId,
    /// Key (`name`, `name#2`, ... and `$`-prefixed keys for internal use).
    pub key: String,
    /// Value.
    pub value: Value,
    /// Step that wrote it.
    pub step_id: StepId,
    /// Run that wrote it.
    pub run: u64,
    /// When.
    pub created_at: Millis,
}

/// A cached event.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    /// Name (the queue).
    pub name: String,
    /// Payload of the first emit.
    pub payload: Value,
    /// When it was first emitted.
    pub created_at: Millis,
}

/// A task with everything `switchyard tasks show` displays.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct TaskDetail {
    /// The task.
    pub task: TaskRecord,
    /// Its steps, in creation order.
    pub steps: Vec<StepRecord>,
    /// Its checkpoints, in creation order.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Child tasks (spawned or delegated), in creation order.
    pub children: Vec<TaskRecord>,
}

/// Filter for [`crate::Store::list_tasks`].
#[derive(Clone, PartialEq, Debug, Default)]
pub struct TaskFilter {
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only tasks whose root handler is this.
    pub handler: Option<String>,
    /// At most this many (newest first); 0 means the store's default of 100.
    pub limit: usize,
    /// Only running tasks with at least one step in this state (e.g.
    /// `suspended`: tasks waiting on an event, a sleep or children).
    pub step_state: Option<StepState>,
    /// Only tasks without a parent (spawned by a client, not by a step).
    pub root_only: bool,
    /// Only children (spawned or delegated) of this task.
    pub parent: Option<TaskId>,
    /// Only the task with this idempotency key.
    pub idempotency_key: Option<String>,
    /// Only tasks created at or after this time.
    pub created_after: Option<Millis>,
    /// Only tasks created before this time.
    pub created_before: Option<Millis>,
    /// Only finished tasks that finished (`updated_at`) at or after this time.
    pub finished_after: Option<Millis>,
    /// Only finished tasks that finished before this time.
    pub finished_before: Option<Millis>,
    /// Keyset pagination: only tasks that come after this one in the
    /// listing order (older ones). The task must exist
    /// ([`crate::Error::NotFound`] otherwise). Never an offset: each page
    /// costs the same however deep it is.
    pub after: Option<TaskId>,
}

impl TaskFilter {
    /// True if a finished-time bound is set (only finished tasks match).
    pub fn wants_finished(&self) -> bool {
        self.finished_after.is_some() || self.finished_before.is_some()
    }
}

/// How a child of a delegation group ended.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ChildOutcome {
    /// The child task.
    pub task_id: TaskId,
    /// Its final state (`running` if not finished yet).
    pub state: TaskState,
    /// Its result, if completed.
    pub result: Option<Value>,
    /// Its error, if failed or cancelled.
    pub error: Option<ErrorInfo>,
}

/// Steps of one handler, for `GET /api/v1/handlers`
/// ([`crate::Store::handler_stats`]).
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize)]
pub struct HandlerStats {
    /// The handler.
    pub handler: String,
    /// Number of its steps in each state (states with none are left out).
    pub steps: StateCounts,
    /// The earliest `run_at` of its `ready` steps (how long the oldest
    /// ready step has been due), if it has any.
    pub oldest_ready_at: Option<Millis>,
}

/// Tasks of one root handler in one state ([`crate::Store::task_counts`]).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct TaskCount {
    /// The root handler.
    pub handler: String,
    /// `running`, `completed`, `failed` or `cancelled`.
    pub state: String,
    /// How many.
    pub count: u64,
}

/// Tasks that finished in one time bucket with one outcome
/// ([`crate::Store::finished_buckets`]).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct FinishedBucket {
    /// Start of the bucket (ms since the Unix epoch).
    pub start: Millis,
    /// `completed`, `failed` or `cancelled`.
    pub state: String,
    /// How many tasks finished so in the bucket.
    pub count: u64,
}

/// Failed tasks of one root handler with the same error message
/// ([`crate::Store::failure_groups`]).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct FailureGroup {
    /// The root handler.
    pub handler: String,
    /// The task's error message (empty if it has none).
    pub message: String,
    /// How many failed tasks.
    pub count: u64,
    /// When the latest of them failed (ms since the Unix epoch).
    pub last_failed_at: Millis,
}

/// Counts of steps by state, for progress and metrics.
pub type StateCounts = BTreeMap<String, u64>;
