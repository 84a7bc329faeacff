//! The PostgreSQL store: many hosts on many machines share one database
//! (DESIGN.md §7).
//!
//! # How it works
//!
//! * **Connections.** A small pool ([`POOL_SIZE`]) of `tokio-postgres`
//!   clients, each with its own prepared-statement cache. A connection that
//!   is lost (server restart, network) is replaced on the next use; opening
//!   one retries with exponential backoff for up to [`CONNECT_PATIENCE`].
//!   Each connection turns JIT compilation off (see [`SESSION_SETUP`]).
//! * **Session timeouts.** So that nothing hangs on a stuck peer, every
//!   pooled connection sets `lock_timeout` ([`LOCK_TIMEOUT`], 30 s: a
//!   statement waiting longer for a row lock fails with `55P03
//!   lock_not_available`, reported as the transient [`Error::Store`], which
//!   workers retry) and `idle_in_transaction_session_timeout`
//!   ([`IDLE_IN_TRANSACTION_TIMEOUT`], 60 s: the server ends a session that
//!   leaves a transaction open that long, releasing its locks), and TCP
//!   keepalives are on ([`KEEPALIVES_IDLE`] idle, then a probe every
//!   [`KEEPALIVES_INTERVAL`]), so a dead server or network is noticed. The
//!   URL overrides them: `?lock_timeout=5s&idle_in_transaction_session_timeout=0`
//!   (a number with an optional unit `us`, `ms`, `s`, `min`, `h` or `d`;
//!   milliseconds without one; `0` disables), and tokio-postgres' own
//!   `keepalives`, `keepalives_idle`, `keepalives_interval` and
//!   `keepalives_retries` parameters (seconds). A setting given in the
//!   libpq-style `options` parameter (`options=-c%20lock_timeout%3D10s`)
//!   wins over both.
//! * **One transaction per call.** Every write method runs in one explicit
//!   transaction (`READ COMMITTED`), so a `complete(batch)`, a `spawn(batch)`
//!   or a heartbeat is group-committed: one commit for the whole batch. A
//!   transaction that hits a deadlock or serialization failure, or loses its
//!   connection *before* `COMMIT` was sent (the server then rolled it back),
//!   is re-run from the start on a fresh connection ([`MAX_TRIES`]); a
//!   connection lost *during* `COMMIT` is reported as an error (the outcome
//!   is unknown; a retried completion is then answered `LeaseLost` if it had
//!   been applied, so nothing is applied twice). [`Signals`] fire only after
//!   `COMMIT` succeeded.
//! * **Concurrency between hosts.** Claims and lease recovery lock rows with
//!   `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on each other
//!   and never take the same step. Everything that must see a consistent
//!   picture across transactions locks in one order: advisory transaction
//!   the task rows first (a `complete` batch locks all its tasks up front,
//!   in id order), then advisory transaction locks keyed by event name /
//!   delegation group (so that "suspend on X unless X already happened" and
//!   "X happens, wake whoever waits on X" cannot both miss each other), then
//!   step rows. A deadlock PostgreSQL still detects (rare orders across
//!   different tasks) aborts one transaction, which is re-run.
//!   Dependants are unblocked by `pending_deps - 1` on the blocked row, which
//!   PostgreSQL re-evaluates on the latest row version under concurrency.
//! * **Time.** With the default system clock ([`crate::StoreOptions`]), the
//!   **database clock is the only clock**: each transaction starts with
//!   `BEGIN; SELECT clock_timestamp()` in one round trip and uses that value
//!   for every time it writes, so hosts on different machines agree on
//!   leases and schedules. With any other clock (a test's
//!   [`switchyard_core::FakeClock`]) that clock is read instead and passed as
//!   a query parameter. The two are told apart by size: the system clock is
//!   stateless (zero-sized); a clock with state is a caller's own clock.
//! * **Wake-ups.** In-process waiters are woken after each commit. Across
//!   processes, a transaction that made a step ready (or finished a task)
//!   sends `NOTIFY switchyard, 'ready'` (or `'finished'`) in the same round
//!   trip as its `COMMIT`; every store keeps one extra connection that
//!   `LISTEN`s on the fixed channel [`CHANNEL`] and turns notifications into
//!   [`Signals`]. It reconnects with backoff and signals `ready` after each
//!   (re)connect, since notifications may have been missed meanwhile. The
//!   mode is chosen in the URL, `?wakeup=polling|event-driven|hybrid`
//!   (default `hybrid`), with an optional `poll_ms=N`:
//!   - `polling`: no LISTEN/NOTIFY; hosts poll every `poll_ms` (default 100).
//!   - `event-driven`: LISTEN/NOTIFY only; the poll interval is a 30 s
//!     safety net.
//!   - `hybrid`: LISTEN/NOTIFY plus a poll every `poll_ms` (default 1000).
//!
//!   These parameters (and `lock_timeout` and
//!   `idle_in_transaction_session_timeout`) are removed from the URL before
//!   connecting; the rest is handed to `tokio-postgres` (no TLS support in
//!   this build).
//! * **Migrations** ([`MIGRATIONS`]) are versioned in `sy_migrations` and
//!   applied at open (unless disabled) and by [`Store::migrate`] inside a
//!   transaction holding `pg_advisory_xact_lock(`[`MIGRATION_LOCK`]`)`, so
//!   several hosts starting at once apply each version exactly once.
//!
//! # Schema
//!
//! Tables are prefixed `sy_` so the store can share a database with an
//! application. Ids are `uuid`; times are `bigint` milliseconds since the
//! epoch; JSON is stored as `text` exactly as encoded (no `jsonb`
//! normalisation, any string content allowed). Creation order is a `bigint`
//! identity column `seq`. The claim is served by the partial index
//! `sy_steps_ready (handler, priority DESC, run_at, seq) WHERE state =
//! 'ready'`, so its cost does not depend on how many finished steps the
//! table holds; `next_due`, lease recovery, wake times, event and group
//! waits have their own partial indexes. Other statements find their rows
//! by key, and none of them implies the predicate of a partial index whose
//! columns it leaves unconstrained: the planner, misled by statistics a
//! queue outruns, would read such an index as a cheap list of "all rows in
//! this state" (migration 6). Step and task pages are filled to half on
//! insert, so the later versions of a row (claim, settle, finish) fit on
//! its page (migration 5). Checkpoint writes from many handlers are
//! group-committed by one writer task per store (`checkpoint_writer`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_core::{
    CheckpointRecord, ChildOutcome, ClaimBatch, ClaimedStep, Clock, Completion, Error, ErrorInfo,
    ErrorKind, EventRecord, HeartbeatReply, HostInfo, Lease, Millis, NewTask, ParentRef, Result,
    RunRef, Signals, Spawned, StateCounts, StepId, StepRecord, Store, TaskDetail, TaskFilter,
    TaskId, TaskRecord, TaskState, ENDED_HOST_RETENTION_MS, HOST_DEAD, HOST_STOPPED,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row, SimpleQueryMessage, Statement};
use uuid::Uuid;

use crate::prepared::{encode, prepare_completion, Prepared, PreparedStep, PreparedTask};
use crate::StoreOptions;

/// Connections per store (plus one for LISTEN).
pub const POOL_SIZE: usize = 8;
/// How long opening a connection keeps retrying before giving up.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How often one write is attempted (deadlocks, serialization failures and
/// connections lost before `COMMIT` are retried).
pub const MAX_TRIES: u32 = 8;
/// The fixed LISTEN/NOTIFY channel.
pub const CHANNEL: &str = "switchyard";
/// The advisory lock key held while migrating ("SYMIGR").
pub const MIGRATION_LOCK: i64 = 0x5359_4d49_4752;
/// `limit` 0 means this many.
const DEFAULT_LIMIT: usize = 100;
/// Default `lock_timeout` of pooled connections (see the module docs).
pub const LOCK_TIMEOUT: &str = "30s";
/// Default `idle_in_transaction_session_timeout` of pooled connections.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";
/// Default TCP keepalive idle time (unless the URL sets `keepalives_idle`).
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
/// Default TCP keepalive probe interval (unless the URL sets `keepalives_interval`).
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// Default unanswered probes before the connection is dropped.
pub const KEEPALIVES_RETRIES: u32 = 6;

/// The schema, one entry per version (version = index + 1). Never edit an
/// entry once released: add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
CREATE TABLE sy_tasks (
    id              uuid PRIMARY KEY,
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    handler         text NOT NULL,
    input           text NOT NULL,
    state           text NOT NULL,
    result          text,
    error           text,
    headers         text,
    priority        integer NOT NULL,
    idempotency_key text,
    response_event  text,
    parent_task_id  uuid,
    parent_step_id  uuid,
    parent_group    text,
    parent_index    integer,
    final_step      text NOT NULL,
    has_deps        boolean NOT NULL DEFAULT false,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL
);
CREATE UNIQUE INDEX sy_tasks_seq ON sy_tasks(seq);
CREATE UNIQUE INDEX sy_tasks_idempotency ON sy_tasks(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX sy_tasks_state ON sy_tasks(state, seq);
CREATE INDEX sy_tasks_handler ON sy_tasks(handler, seq);
CREATE INDEX sy_tasks_parent ON sy_tasks(parent_task_id) WHERE parent_task_id IS NOT NULL;
CREATE INDEX sy_tasks_group ON sy_tasks(parent_group, state) WHERE parent_group IS NOT NULL;

CREATE TABLE sy_steps (
    id               uuid PRIMARY KEY,
    seq              bigint GENERATED ALWAYS AS IDENTITY,
    task_id          uuid NOT NULL,
    name             text NOT NULL,
    handler          text NOT NULL,
    input            text NOT NULL,
    headers          text,
    state            text NOT NULL,
    attempt          integer NOT NULL DEFAULT 0,
    priority         integer NOT NULL,
    run_at           bigint,
    lease_owner      text,
    lease_expires_at bigint,
    result           text,
    error            text,
    depends_on       text,
    pending_deps     integer NOT NULL DEFAULT 0,
    wait             text,
    wait_event       text,
    wait_group       text,
    created_at       bigint NOT NULL,
    updated_at       bigint NOT NULL
);
CREATE UNIQUE INDEX sy_steps_task_name ON sy_steps(task_id, name);
CREATE INDEX sy_steps_ready ON sy_steps(handler, priority DESC, run_at, seq) WHERE state = 'ready';
CREATE INDEX sy_steps_due ON sy_steps(handler, run_at) WHERE state IN ('ready', 'suspended');
CREATE INDEX sy_steps_lease ON sy_steps(lease_expires_at) WHERE state = 'running';
CREATE INDEX sy_steps_wake ON sy_steps(run_at) WHERE state = 'suspended' AND run_at IS NOT NULL;
CREATE INDEX sy_steps_wait_event ON sy_steps(wait_event) WHERE state = 'suspended' AND wait_event IS NOT NULL;
CREATE INDEX sy_steps_wait_group ON sy_steps(wait_group) WHERE state = 'suspended' AND wait_group IS NOT NULL;
CREATE INDEX sy_steps_state ON sy_steps(state);

CREATE TABLE sy_step_deps (
    task_id  uuid NOT NULL,
    dep_name text NOT NULL,
    step_id  uuid NOT NULL,
    PRIMARY KEY (task_id, dep_name, step_id)
);

CREATE TABLE sy_checkpoints (
    task_id    uuid NOT NULL,
    key        text NOT NULL,
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    value      text NOT NULL,
    step_id    uuid NOT NULL,
    attempt    integer NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (task_id, key)
);

CREATE TABLE sy_events (
    name       text PRIMARY KEY,
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    payload    text NOT NULL,
    created_at bigint NOT NULL
);
CREATE INDEX sy_events_seq ON sy_events(seq);

CREATE TABLE sy_hosts (
    id             text PRIMARY KEY,
    pid            bigint NOT NULL,
    hostname       text NOT NULL,
    handlers       text NOT NULL,
    started_at     bigint NOT NULL,
    last_heartbeat bigint NOT NULL
);
"#,
    // 2: fewer index insertions per step. Every state change of a step is a
    // non-HOT update that inserts into every index of the row; `state` alone
    // served only `count_steps`, which scans the table instead.
    r#"
DROP INDEX IF EXISTS sy_steps_state;
"#,
    // 3: a task's finish becomes a HOT update (a new row version on the same
    // page and no index insertion at all): no index of sy_tasks has `state`
    // as a column any more (listings by state or handler walk sy_tasks_seq
    // newest first and stop at their limit; group checks filter the few
    // children of one group), and pages keep room for the new version.
    r#"
DROP INDEX IF EXISTS sy_tasks_state;
DROP INDEX IF EXISTS sy_tasks_handler;
DROP INDEX IF EXISTS sy_tasks_group;
CREATE INDEX sy_tasks_group ON sy_tasks(parent_group) WHERE parent_group IS NOT NULL;
ALTER TABLE sy_tasks SET (fillfactor = 70);
"#,
    // 4: a step spawned ready to run at once (the usual case) no longer
    // enters the index that finds the next due time: only steps whose
    // `run_at` lies after their creation (delayed spawns, retries after a
    // backoff, sleepers, woken and unblocked steps) can be due later. It
    // also keeps the claim off this index: with stale statistics (a queue
    // table grows from empty in seconds) the planner used to scan every
    // ready step through it and sort them, instead of walking
    // `sy_steps_ready` in claim order and stopping at the limit.
    r#"
DROP INDEX IF EXISTS sy_steps_due;
CREATE INDEX sy_steps_delayed ON sy_steps(handler, run_at)
    WHERE state IN ('ready', 'suspended') AND run_at > created_at;
"#,
    // 5: room on every page for the next version of each row. A step is
    // written three times (spawn, claim, settle) and a task twice (spawn,
    // finish); when the new version did not fit on the old one's page,
    // PostgreSQL first logged a row lock on the old version, then looked for
    // another page (and a task's finish could not be a HOT update): about
    // 2.4 extra WAL records and 0.6 index insertions per step. The price is
    // space: pages of both tables are filled to half on insert.
    r#"
ALTER TABLE sy_steps SET (fillfactor = 50);
ALTER TABLE sy_tasks SET (fillfactor = 50);
"#,
    // 6: the lease index no longer has `state = 'running'` as its
    // predicate. Any statement naming running steps by id (settling a batch,
    // cancelling a task's steps) implied that predicate, so the planner could
    // read the lease index as "every running step" and join it to the batch;
    // with statistics from a moment when no step ran (one row expected) it
    // did exactly that, and settling 500 steps compared every pair (60 ms
    // instead of 2). A step holds a lease exactly while it runs (every
    // statement that moves a step out of `running` clears
    // `lease_expires_at`), so the index keeps the same rows, but only a
    // statement about lease expiry (lease recovery) can use it.
    r#"
DROP INDEX IF EXISTS sy_steps_lease;
CREATE INDEX sy_steps_lease ON sy_steps(lease_expires_at) WHERE lease_expires_at IS NOT NULL;
"#,
    // 7: runs. `run` numbers every claim of a step and fences its writes
    // (`attempt` now counts attempts used, which suspensions give back);
    // checkpoints record the run that wrote them. Adding a column with a
    // constant default rewrites nothing; only steps running during the
    // upgrade are touched, so their leases keep their fence (run = attempt).
    r#"
ALTER TABLE sy_steps ADD COLUMN run bigint NOT NULL DEFAULT 0;
UPDATE sy_steps SET run = attempt WHERE state = 'running';
ALTER TABLE sy_checkpoints RENAME COLUMN attempt TO run;
"#,
    // 8: structural replay keys (`switchyard_core::keys`). The keys whose
    // names need escaping are rewritten by `upgrade_checkpoint_keys` in the
    // same transaction; this statement only records the step.
    "SELECT 1;",
    // 9: a host's configured name (`host.name`), shown in host listings.
    "ALTER TABLE sy_hosts ADD COLUMN name text;",
    // 10: indexes for task listings at scale. A listing by a rare handler or
    // by an old window of creation times walked sy_tasks_seq newest first
    // through the whole table (measured with `bench/run --lang http`).
    // Neither `handler`, `seq` nor `created_at` ever changes, so a task's
    // finish stays a HOT update (see 3). Finish times get no index: one on
    // `updated_at` (or with `state` in its predicate) would make every
    // finish a non-HOT update with an insertion into every index.
    r#"
CREATE INDEX sy_tasks_handler ON sy_tasks(handler, seq);
CREATE INDEX sy_tasks_created ON sy_tasks(created_at);
"#,
    // 11: hosts listings show the language and slots of a host, and hosts
    // whose registration ended (stopped or found dead) for a day.
    r#"
ALTER TABLE sy_hosts ADD COLUMN language text;
ALTER TABLE sy_hosts ADD COLUMN slots bigint;
ALTER TABLE sy_hosts ADD COLUMN ended_at bigint;
ALTER TABLE sy_hosts ADD COLUMN end_reason text;
"#,
    // 12: routing on a step's status: the routes a decision declared for a
    // step (JSON, NULL when none) and the status it completed with.
    r#"
ALTER TABLE sy_steps ADD COLUMN routes text;
ALTER TABLE sy_steps ADD COLUMN status text;
"#,
    // 13: event retention (`cleanup_events`) deletes the oldest events first.
    "CREATE INDEX sy_events_created ON sy_events(created_at);",
];

/// The schema version whose migration rewrites checkpoint keys.
const KEYS_VERSION: usize = 8;

/// Rewrites the checkpoint keys of older versions into structural keys
/// (`switchyard_core::keys::upgrade_legacy`, which needs the name of the
/// step that wrote each one). Only keys with a character that is escaped
/// now can change, so only those are read.
async fn upgrade_checkpoint_keys(c: &mut Conn) -> DbResult<()> {
    let rows = c
        .client
        .query(
            "SELECT c.task_id, c.key, s.name FROM sy_checkpoints c JOIN sy_steps s ON s.id = c.step_id \
             WHERE c.key ~ '[\\\\#:$]' OR s.name ~ '[\\\\#$]' OR c.key ~ '/.*/'",
            &[],
        )
        .await?;
    for r in rows {
        let (task, key, step): (Uuid, String, String) = (r.get(0), r.get(1), r.get(2));
        let new = switchyard_core::keys::upgrade_legacy(&key, &step);
        if new != key {
            c.client
                .execute(
                    "UPDATE sy_checkpoints SET key = $3 WHERE task_id = $1 AND key = $2",
                    &[&task, &key, &new],
                )
                .await?;
        }
    }
    Ok(())
}

/// Retention (see [`Store::cleanup`]): up to `$2` finished tasks older than
/// `$1` whose parent task is gone, with their steps, dependencies and
/// checkpoints; rows another transaction holds are skipped.
const CLEANUP: &str = "\
WITH doomed AS (
    DELETE FROM sy_tasks WHERE id IN (
        SELECT t.id FROM sy_tasks t
        WHERE t.state IN ('completed', 'failed', 'cancelled') AND t.updated_at < $1
          AND (t.parent_task_id IS NULL
               OR NOT EXISTS (SELECT 1 FROM sy_tasks p WHERE p.id = t.parent_task_id))
        ORDER BY t.seq LIMIT $2
        FOR UPDATE OF t SKIP LOCKED)
    RETURNING id),
del_steps AS (DELETE FROM sy_steps WHERE task_id IN (SELECT id FROM doomed)),
del_deps AS (DELETE FROM sy_step_deps WHERE task_id IN (SELECT id FROM doomed)),
del_checkpoints AS (DELETE FROM sy_checkpoints WHERE task_id IN (SELECT id FROM doomed))
SELECT count(*) FROM doomed";

// ---------------------------------------------------------------------------
// Errors and JSON
// ---------------------------------------------------------------------------

/// A failure inside a transaction: database errors (retried when
/// transient) or application errors (answered as they are).
#[derive(Debug)]
enum Fail {
    Pg(tokio_postgres::Error),
    App(Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::App(e)
    }
}

type DbResult<T> = std::result::Result<T, Fail>;

/// The error a failed statement leaves the store as. SQLSTATE classes 22
/// (data exception: a NUL in text, a value out of range), 23 (integrity
/// constraint violation) and 54 (program limit exceeded: a key too long to
/// index) mean the data written was refused and writing it again cannot
/// succeed: they become [`Error::InvalidInput`], so a caller writing a batch
/// (the worker's completer) can tell the batch holds a poison item and
/// write the items alone instead of retrying the batch. Everything else
/// (lost connections, serialization failures, deadlocks, lock timeouts,
/// shutdowns) stays [`Error::Store`], which callers retry.
fn pg_error(op: &str, e: &tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let msg = format!("postgres {op}: {} ({code})", db.message());
            if matches!(code.get(..2), Some("22" | "23" | "54")) {
                Error::InvalidInput(msg)
            } else {
                Error::Store(msg)
            }
        }
        None => Error::Store(format!("postgres {op}: {}", pg_cause(e))),
    }
}

/// What a `tokio_postgres` error says, with its cause: the server's
/// message and SQLSTATE for a database error (`database "x" does not
/// exist (SQLSTATE 3D000)`), else the error and its source chain
/// (`error connecting to server: Connection refused (os error 111)`), where
/// the error's own text alone is only `db error` or `error connecting to
/// server`. Never contains the password: neither the server nor the
/// socket error repeats it.
fn pg_cause(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// Whether a failure to connect means the server is missing, refuses us or
/// is unavailable (no server, unknown database or role, bad password, too
/// many connections, starting up or shutting down), rather than that our
/// session settings are wrong. The first is [`Error::Store`], the second
/// [`Error::Config`].
fn connect_unavailable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(c) => matches!(
            c.code().get(..2),
            Some("08" | "28" | "3D" | "53" | "57" | "58" | "XX")
        ),
    }
}

/// Worth running the whole transaction again. A `lock_timeout`
/// (`55P03 lock_not_available`) is not re-run here, which would make a
/// caller wait several timeouts: it is answered at once as
/// [`Error::Store`], which the caller (a worker) retries with its backoff.
fn transient(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
    )
}

fn decode<T: DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::Store(format!("postgres: stored {what} is not valid JSON: {e}")))
}

fn opt_decode<T: DeserializeOwned>(what: &str, s: Option<String>) -> Result<Option<T>> {
    s.map(|s| decode(what, &s)).transpose()
}

fn parse<T: FromStr<Err = Error>>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|e: Error| Error::Store(format!("postgres: stored value: {e}")))
}

fn int_u32(what: &str, v: i32) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Store(format!("postgres: stored {what} {v} is negative")))
}

// ---------------------------------------------------------------------------
// URL
// ---------------------------------------------------------------------------

/// How hosts learn about work made by other processes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wakeup {
    /// Poll only.
    Polling,
    /// LISTEN/NOTIFY only (with a long safety-net poll).
    EventDriven,
    /// LISTEN/NOTIFY plus a fallback poll (the default).
    Hybrid,
}

impl FromStr for Wakeup {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "polling" => Ok(Self::Polling),
            "event-driven" | "event_driven" => Ok(Self::EventDriven),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(Error::Config(format!(
                "store URL parameter `wakeup`: unknown mode `{other}` (expected polling, event-driven or hybrid)"
            ))),
        }
    }
}

impl Wakeup {
    fn as_str(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::EventDriven => "event-driven",
            Self::Hybrid => "hybrid",
        }
    }
}

/// A parsed `postgres://` store URL.
struct ParsedUrl {
    /// What is handed to tokio-postgres.
    connect: String,
    /// The URL without credentials.
    display: String,
    wakeup: Wakeup,
    poll: Duration,
    /// Session settings (name, value) for every pooled connection.
    session: Vec<(&'static str, String)>,
    /// The URL sets these tokio-postgres parameters itself.
    keepalives: bool,
    keepalives_idle: bool,
    keepalives_interval: bool,
    keepalives_retries: bool,
}

/// The session settings the URL may override, with their defaults.
const SESSION_TIMEOUTS: [(&str, &str); 2] = [
    ("lock_timeout", LOCK_TIMEOUT),
    (
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION_TIMEOUT,
    ),
];

/// A PostgreSQL time setting: digits and an optional unit.
fn valid_timeout(v: &str) -> bool {
    let unit = v.trim_start_matches(|c: char| c.is_ascii_digit());
    unit.len() < v.len() && ["", "us", "ms", "s", "min", "h", "d"].contains(&unit)
}

/// Whether a libpq-style `options` string (`-c name=value`, `-cname=value`
/// or `--name=value`) sets `name`.
fn options_set(options: Option<&str>, name: &str) -> bool {
    let Some(options) = options else {
        return false;
    };
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().unwrap_or("")
        } else if let Some(rest) = w.strip_prefix("--").or_else(|| w.strip_prefix("-c")) {
            rest
        } else {
            continue;
        };
        if let Some((k, _)) = setting.split_once('=') {
            if k.replace('-', "_").eq_ignore_ascii_case(name) {
                return true;
            }
        }
    }
    false
}

/// The `SET` statements for `session`, leaving out what `options` sets.
fn session_sql(session: &[(&'static str, String)], options: Option<&str>) -> String {
    session
        .iter()
        .filter(|(name, _)| !options_set(options, name))
        .map(|(name, value)| format!("SET {name} = '{value}'; "))
        .collect()
}

/// [`crate::check_url`] for PostgreSQL: the parameters and the connection
/// string parse.
pub(crate) fn check_url(url: &str) -> Result<()> {
    let parsed = parse_url(url)?;
    parsed
        .connect
        .parse::<Config>()
        .map_err(|e| Error::Config(format!("store URL `{}`: {e}", parsed.display)))?;
    Ok(())
}

fn parse_url(url: &str) -> Result<ParsedUrl> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut wakeup = Wakeup::Hybrid;
    let mut poll_ms: Option<u64> = None;
    let mut rest = Vec::new();
    let mut session: Vec<(&'static str, String)> = SESSION_TIMEOUTS
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    let mut overridden = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "wakeup" => wakeup = v.parse()?,
            "lock_timeout" | "idle_in_transaction_session_timeout" => {
                if !valid_timeout(v) {
                    return Err(Error::Config(format!(
                        "store URL parameter `{k}`: `{v}` is not a time (a number with an optional unit us, ms, s, min, h or d; 0 disables)"
                    )));
                }
                for (name, value) in session.iter_mut().filter(|(name, _)| *name == k) {
                    *value = v.to_string();
                    overridden.push(format!("{name}={v}"));
                }
            }
            "poll_ms" => {
                let ms: u64 = v.parse().map_err(|_| {
                    Error::Config(format!(
                        "store URL parameter `poll_ms`: `{v}` is not a number of milliseconds"
                    ))
                })?;
                if ms == 0 || ms > 3_600_000 {
                    return Err(Error::Config(format!(
                        "store URL parameter `poll_ms`: {ms} is out of range (1..=3600000)"
                    )));
                }
                poll_ms = Some(ms);
            }
            _ => rest.push(pair),
        }
    }
    let poll = Duration::from_millis(poll_ms.unwrap_or(match wakeup {
        Wakeup::Polling => 100,
        Wakeup::Hybrid => 1_000,
        Wakeup::EventDriven => 30_000,
    }));
    let mut connect = base.to_owned();
    if !rest.is_empty() {
        connect.push('?');
        connect.push_str(&rest.join("&"));
    }
    // The display form drops the password (user:password@host).
    let display_base = match base.split_once("://") {
        Some((scheme, after)) => match after.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                if user.is_empty() {
                    format!("{scheme}://{host}")
                } else {
                    format!("{scheme}://{user}@{host}")
                }
            }
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    let visible: Vec<&str> = rest
        .iter()
        .copied()
        .filter(|p| !p.starts_with("password="))
        .collect();
    let mut display = format!("{display_base}?wakeup={}", wakeup.as_str());
    for p in overridden.iter().map(String::as_str).chain(visible) {
        display.push('&');
        display.push_str(p);
    }
    let given = |key: &str| rest.iter().any(|p| p.split('=').next() == Some(key));
    // What is left of a secret (`sslpassword=`, a password given in an
    // unusual form) is masked too.
    let display = switchyard_core::redact_url(&display);
    Ok(ParsedUrl {
        display,
        wakeup,
        poll,
        session,
        keepalives: given("keepalives"),
        keepalives_idle: given("keepalives_idle"),
        keepalives_interval: given("keepalives_interval"),
        keepalives_retries: given("keepalives_retries"),
        connect,
    })
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// One client with its prepared statements.
struct Conn {
    client: Client,
    stmts: HashMap<&'static str, Statement>,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Conn {
    async fn prep(&mut self, sql: &'static str) -> std::result::Result<Statement, Fail> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    async fn query(&mut self, sql: &'static str, p: Params<'_>) -> DbResult<Vec<Row>> {
        let s = self.prep(sql).await?;
        Ok(self.client.query(&s, p).await?)
    }

    async fn opt(&mut self, sql: &'static str, p: Params<'_>) -> DbResult<Option<Row>> {
        let s = self.prep(sql).await?;
        Ok(self.client.query_opt(&s, p).await?)
    }

    async fn one(&mut self, sql: &'static str, p: Params<'_>) -> DbResult<Row> {
        let s = self.prep(sql).await?;
        Ok(self.client.query_one(&s, p).await?)
    }

    async fn exec(&mut self, sql: &'static str, p: Params<'_>) -> DbResult<u64> {
        let s = self.prep(sql).await?;
        Ok(self.client.execute(&s, p).await?)
    }
}

/// Session settings of every pooled connection. JIT compilation is off:
/// the store runs short index lookups, but once the statistics describe a
/// large backlog the planner costs a claim above `jit_above_cost` and
/// PostgreSQL spent ~10 ms compiling each one (0.1 ms to run it), on every
/// claim, from then on: idle spawn-to-start latency went from 1.5 to 28 ms
/// and a million-step run averaged 16,000 steps/s. (Servers before 11 have
/// no JIT and no such setting.)
pub const SESSION_SETUP: &str = "SET jit = off";

/// Connects and applies `session` (the URL's session settings, see
/// [`session_sql`]) and [`SESSION_SETUP`].
async fn connect_once(
    config: &Config,
    session: &str,
) -> std::result::Result<Conn, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("postgres connection closed: {e}");
        }
    });
    if !session.is_empty() {
        client.batch_execute(session).await?;
    }
    if let Err(e) = client.batch_execute(SESSION_SETUP).await {
        if e.code() != Some(&SqlState::UNDEFINED_OBJECT) {
            return Err(e);
        }
    }
    Ok(Conn {
        client,
        stmts: HashMap::new(),
    })
}

struct Pool {
    config: Config,
    /// `SET` statements run on each new connection ([`session_sql`]).
    session: String,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    /// The process that opened the store: its connections (sockets shared
    /// with the parent after a fork) and tasks exist only there.
    owner: u32,
}

impl Pool {
    async fn get(self: &Arc<Self>) -> Result<Pooled> {
        let here = std::process::id();
        if here != self.owner {
            return Err(Error::Config(format!(
                "postgres: this store was opened in process {} and cannot be used in a forked child ({here}); open stores, clients and workers after fork, in the child",
                self.owner
            )));
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Shutdown)?;
        loop {
            let popped = self.idle.lock().pop();
            match popped {
                Some(c) if !c.client.is_closed() => {
                    return Ok(Pooled {
                        pool: self.clone(),
                        conn: Some(c),
                        clean: false,
                        _permit: permit,
                    })
                }
                Some(_) => continue,
                None => break,
            }
        }
        let conn = self.connect().await?;
        Ok(Pooled {
            pool: self.clone(),
            conn: Some(conn),
            clean: false,
            _permit: permit,
        })
    }

    /// Opens a connection, retrying with exponential backoff.
    async fn connect(&self) -> Result<Conn> {
        let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
        let mut delay = Duration::from_millis(25);
        loop {
            match connect_once(&self.config, &self.session).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    let cause = pg_cause(&e);
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(Error::Store(format!(
                            "postgres: cannot connect (gave up after {CONNECT_PATIENCE:?}): {cause}"
                        )));
                    }
                    tracing::warn!("postgres: cannot connect, retrying in {delay:?}: {cause}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// A connection on loan. It goes back to the pool only if the operation
/// using it finished cleanly (no transaction left open by a dropped future).
struct Pooled {
    pool: Arc<Pool>,
    conn: Option<Conn>,
    clean: bool,
    _permit: OwnedSemaphorePermit,
}

impl Pooled {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.clean && !c.client.is_closed() {
                self.pool.idle.lock().push(c);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Effects
// ---------------------------------------------------------------------------

/// What a committed transaction announces.
#[derive(Default)]
struct Effects {
    ready: bool,
    finished: bool,
    cancelled: Vec<StepId>,
}

impl Effects {
    fn fire(self, signals: &Signals) {
        if self.ready {
            signals.notify_ready();
        }
        if self.finished {
            signals.notify_finished();
        }
        signals.notify_cancelled(self.cancelled);
    }
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

/// The PostgreSQL store (see the module docs).
pub struct PostgresStore {
    url: String,
    /// `None`: the database clock.
    clock: Option<Arc<dyn Clock>>,
    signals: Arc<Signals>,
    pool: Arc<Pool>,
    wakeup: Wakeup,
    poll: Duration,
    listener: Option<tokio::task::JoinHandle<()>>,
    /// Checkpoint writes waiting for the [`checkpoint_writer`].
    checkpoints: mpsc::UnboundedSender<CheckpointWrite>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .field("wakeup", &self.wakeup)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(l) = self.listener.take() {
            l.abort();
        }
    }
}

/// Runs a write transaction (see the module docs for retries). The body is
/// an expression evaluating to a `DbResult<T>` future that may be run more
/// than once; `$c` is the `&mut Conn`, `$now` the transaction's time and
/// `$fx` the `&mut Effects`.
macro_rules! write_tx {
    ($self:ident, $op:expr, |$c:ident, $now:ident, $fx:ident| $body:expr) => {{
        let op: &str = $op;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let mut pooled = $self.pool.get().await?;
            let conn = pooled.conn();
            let outcome: DbResult<_> = async {
                let $now = $self.begin(conn).await?;
                let mut effects = Effects::default();
                let value = {
                    let $c: &mut Conn = &mut *conn;
                    let $fx: &mut Effects = &mut effects;
                    $body.await?
                };
                Ok((value, effects))
            }
            .await;
            match outcome {
                Ok((value, effects)) => match $self.commit(conn, &effects).await {
                    Ok(()) => {
                        pooled.clean = true;
                        effects.fire(&$self.signals);
                        break Ok(value);
                    }
                    Err(e) => {
                        if !conn.client.is_closed() && transient(&e) && tries < MAX_TRIES {
                            let _ = conn.client.batch_execute("ROLLBACK").await;
                            pooled.clean = true;
                            continue;
                        }
                        break Err(Error::Store(format!(
                            "postgres {op}: commit failed, the outcome is unknown: {e}"
                        )));
                    }
                },
                Err(Fail::App(e)) => {
                    if conn.client.batch_execute("ROLLBACK").await.is_ok() {
                        pooled.clean = true;
                    }
                    break Err(e);
                }
                Err(Fail::Pg(e)) => {
                    let lost = conn.client.is_closed();
                    if !lost && conn.client.batch_execute("ROLLBACK").await.is_ok() {
                        pooled.clean = true;
                    }
                    drop(pooled);
                    if (lost || transient(&e)) && tries < MAX_TRIES {
                        tracing::debug!("postgres {op}: retrying after {e}");
                        tokio::time::sleep(Duration::from_millis(10 * u64::from(tries))).await;
                        continue;
                    }
                    break Err(pg_error(op, &e));
                }
            }
        }
    }};
}

/// Runs a read (retried on a lost connection); `$snapshot` makes it one
/// repeatable-read snapshot.
macro_rules! read_op {
    ($self:ident, $op:expr, $snapshot:expr, |$c:ident| $body:expr) => {{
        let op: &str = $op;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let mut pooled = $self.pool.get().await?;
            let conn = pooled.conn();
            let snapshot: bool = $snapshot;
            let outcome: DbResult<_> = async {
                if snapshot {
                    conn.client
                        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        .await?;
                }
                let value = {
                    let $c: &mut Conn = &mut *conn;
                    $body.await?
                };
                if snapshot {
                    conn.client.batch_execute("COMMIT").await?;
                }
                Ok(value)
            }
            .await;
            match outcome {
                Ok(v) => {
                    pooled.clean = true;
                    break Ok(v);
                }
                Err(Fail::App(e)) => {
                    if !snapshot || conn.client.batch_execute("ROLLBACK").await.is_ok() {
                        pooled.clean = true;
                    }
                    break Err(e);
                }
                Err(Fail::Pg(e)) => {
                    let lost = conn.client.is_closed();
                    drop(pooled);
                    if (lost || transient(&e)) && tries < MAX_TRIES {
                        tokio::time::sleep(Duration::from_millis(10 * u64::from(tries))).await;
                        continue;
                    }
                    break Err(pg_error(op, &e));
                }
            }
        }
    }};
}

/// Starts a write transaction. Every statement a write runs is an index
/// lookup or a bounded index range scan by design, but the planner costs
/// plans with table statistics that a queue outruns: tables grow from empty
/// to a hundred thousand rows between two autovacuum analyses, and with
/// the old statistics it picked sequential scans of every task (to lock a
/// batch), bitmap scans of every running step (to settle one) and hash
/// joins. Within the write only, those plan shapes are discouraged
/// (`enable_*` adds a cost penalty; a statement with no other plan still
/// gets one).
macro_rules! begin_write {
    () => {
        "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
         SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
    };
}
/// `begin_write!` as a constant (public so tests can plan statements
/// under the same settings).
pub const BEGIN_WRITE: &str = begin_write!();

const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
const SELECT_DB_NOW: &str = "SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint";

impl PostgresStore {
    /// Opens a store for a `postgres://` or `postgresql://` URL (see the
    /// module docs for the `wakeup` and `poll_ms` parameters). Runs pending
    /// migrations when `options.migrate` is set.
    pub async fn open(url: &str, options: StoreOptions) -> Result<Arc<PostgresStore>> {
        let parsed = parse_url(url)?;
        let mut config: Config = parsed
            .connect
            .parse()
            .map_err(|e| Error::Config(format!("store URL `{}`: {e}", parsed.display)))?;
        if config.get_application_name().is_none() {
            config.application_name("switchyard");
        }
        if !parsed.keepalives {
            config.keepalives(true);
        }
        if !parsed.keepalives_idle {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if !parsed.keepalives_interval {
            config.keepalives_interval(KEEPALIVES_INTERVAL);
        }
        if !parsed.keepalives_retries {
            config.keepalives_retries(KEEPALIVES_RETRIES);
        }
        let session = session_sql(&parsed.session, config.get_options());
        // The wall clock defers to the database server clock; test clocks are used as given.
        let clock = if options.clock.is_wall_clock() {
            None
        } else {
            Some(options.clock.clone())
        };
        let pool = Arc::new(Pool {
            config: config.clone(),
            session: session.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(POOL_SIZE)),
            owner: std::process::id(),
        });
        // Fail fast on a bad URL or an unreachable server at open.
        let first = connect_once(&config, &session).await.map_err(|e| {
            let message = format!(
                "cannot connect to PostgreSQL at `{}`: {}",
                parsed.display,
                pg_cause(&e)
            );
            if connect_unavailable(&e) {
                Error::Store(message)
            } else {
                Error::Config(message)
            }
        })?;
        pool.idle.lock().push(first);
        let signals = Signals::new();
        let (checkpoints, checkpoint_rx) = mpsc::unbounded_channel();
        let mut store = PostgresStore {
            url: parsed.display,
            clock,
            signals: signals.clone(),
            pool,
            wakeup: parsed.wakeup,
            poll: parsed.poll,
            listener: None,
            checkpoints,
        };
        if options.migrate {
            store.migrate_now().await?;
        }
        if store.wakeup != Wakeup::Polling {
            store.listener = Some(tokio::spawn(listen_loop(config, signals)));
        }
        let store = Arc::new(store);
        tokio::spawn(checkpoint_writer(Arc::downgrade(&store), checkpoint_rx));
        Ok(store)
    }

    /// The configured wake-up mode.
    pub fn wakeup(&self) -> Wakeup {
        self.wakeup
    }

    /// `current_setting(name)` on a pooled connection (for tests of the
    /// session setup).
    #[doc(hidden)]
    pub async fn session_setting(&self, name: &str) -> Result<String> {
        read_op!(self, "session_setting", false, |c| async {
            let row = c
                .client
                .query_one("SELECT current_setting($1)", &[&name])
                .await?;
            Ok::<String, Fail>(row.get(0))
        })
    }

    /// One transaction for a batch of checkpoint writes ([`checkpoints_tx`]).
    async fn write_checkpoints(&self, writes: &[CheckpointWrite]) -> Result<Vec<Result<()>>> {
        write_tx!(self, "put_checkpoint", |c, now, _fx| checkpoints_tx(
            c, now, writes
        ))
    }

    async fn begin(&self, c: &mut Conn) -> DbResult<Millis> {
        match &self.clock {
            Some(clock) => {
                c.client.batch_execute(BEGIN_WRITE).await?;
                Ok(clock.now())
            }
            None => {
                const SQL: &str = concat!(
                    begin_write!(),
                    "; SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint"
                );
                let msgs = c.client.simple_query(SQL).await?;
                for m in msgs {
                    if let SimpleQueryMessage::Row(r) = m {
                        if let Some(v) = r.get(0).and_then(|s| s.parse().ok()) {
                            return Ok(v);
                        }
                    }
                }
                Err(Fail::App(Error::Store(
                    "postgres: the server did not report its clock".into(),
                )))
            }
        }
    }

    async fn commit(
        &self,
        c: &mut Conn,
        fx: &Effects,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        let notify = self.wakeup != Wakeup::Polling;
        let sql = match (notify && fx.ready, notify && fx.finished) {
            (true, true) => "NOTIFY switchyard, 'ready'; NOTIFY switchyard, 'finished'; COMMIT",
            (true, false) => "NOTIFY switchyard, 'ready'; COMMIT",
            (false, true) => "NOTIFY switchyard, 'finished'; COMMIT",
            (false, false) => "COMMIT",
        };
        c.client.batch_execute(sql).await
    }

    async fn migrate_now(&self) -> Result<u32> {
        let now = self.clock.as_ref().map(|c| c.now());
        read_op!(self, "migrate", false, |c| apply_migrations(c, now))
    }
}

async fn apply_migrations(c: &mut Conn, now: Option<Millis>) -> DbResult<u32> {
    c.client.batch_execute("BEGIN").await?;
    let result: DbResult<u32> = async {
        c.client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        c.client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS sy_migrations (version integer PRIMARY KEY, applied_at bigint NOT NULL)",
            )
            .await?;
        let current: i32 = c
            .client
            .query_one("SELECT coalesce(max(version), 0) FROM sy_migrations", &[])
            .await?
            .get(0);
        let latest = MIGRATIONS.len() as i32;
        if current > latest {
            return Err(Fail::App(Error::Config(format!(
                "the database schema is at version {current}, newer than this build supports ({latest}); upgrade switchyard"
            ))));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            c.client.batch_execute(sql).await?;
            if i + 1 == KEYS_VERSION {
                upgrade_checkpoint_keys(c).await?;
            }
            c.client
                .execute(
                    &format!(
                        "INSERT INTO sy_migrations (version, applied_at) VALUES ($1, coalesce($2, {DB_NOW}))"
                    ),
                    &[&(i as i32 + 1), &now],
                )
                .await?;
        }
        Ok(latest as u32)
    }
    .await;
    match result {
        Ok(v) => {
            c.client.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Keeps one connection LISTENing on [`CHANNEL`] and turns notifications
/// into signals; reconnects with backoff.
async fn listen_loop(config: Config, signals: Arc<Signals>) {
    let mut delay = Duration::from_millis(50);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    while let Some(msg) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => {
                                if tx.send(n.payload().to_owned()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!("postgres listener connection: {e}");
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute("LISTEN switchyard").await {
                    Ok(()) => {
                        delay = Duration::from_millis(50);
                        // Anything may have happened while we were not listening.
                        signals.notify_ready();
                        signals.notify_finished();
                        while let Some(payload) = rx.recv().await {
                            match payload.as_str() {
                                "ready" => signals.notify_ready(),
                                "finished" => signals.notify_finished(),
                                _ => {}
                            }
                        }
                    }
                    Err(e) => tracing::warn!("postgres: LISTEN failed: {e}"),
                }
                drop(client);
                driver.abort();
                tracing::warn!("postgres: the LISTEN connection was lost; reconnecting");
            }
            Err(e) => tracing::warn!("postgres: cannot open the LISTEN connection: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// Prepared inputs
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// SQL
// ---------------------------------------------------------------------------

macro_rules! lease_guard {
    () => {
        " WHERE id = $1 AND task_id = $2 AND state = 'running' AND lease_owner = $3 AND run = $4"
    };
}

const LEASE_CHECK: &str = concat!("SELECT name FROM sy_steps", lease_guard!(), " FOR UPDATE");
const SETTLE_COMPLETED: &str = concat!(
    "UPDATE sy_steps SET state = 'completed', result = $6, lease_owner = NULL, lease_expires_at = NULL, updated_at = $5",
    lease_guard!(),
    " RETURNING name"
);
const SETTLE_RETRY: &str = concat!(
    "UPDATE sy_steps SET state = 'ready', run_at = $6, error = $7, lease_owner = NULL, lease_expires_at = NULL, \
     updated_at = $5",
    lease_guard!()
);
const SETTLE_FAILED: &str = concat!(
    "UPDATE sy_steps SET state = 'failed', error = $6, lease_owner = NULL, lease_expires_at = NULL, updated_at = $5",
    lease_guard!()
);
const SETTLE_SUSPENDED: &str = concat!(
    "UPDATE sy_steps SET state = $6, run_at = $7, wait = $8, wait_event = $9, wait_group = $10, lease_owner = NULL, \
     lease_expires_at = NULL, attempt = greatest(attempt - 1, 0), updated_at = $5",
    lease_guard!()
);
const SETTLE_RELEASED: &str = concat!(
    "UPDATE sy_steps SET state = 'ready', run_at = $5, attempt = greatest(attempt - 1, 0), lease_owner = NULL, \
     lease_expires_at = NULL, updated_at = $5",
    lease_guard!()
);
const LOCK_TASKS: &str =
    "SELECT id, state, final_step, has_deps, response_event, parent_group, parent_step_id, \
       priority, headers FROM sy_tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const LOCK_EVENT: &str = "SELECT pg_advisory_xact_lock(1, hashtext($1))";
const LOCK_GROUP: &str = "SELECT pg_advisory_xact_lock(2, hashtext($1))";
const EVENT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM sy_events WHERE name = $1)";
const GROUP_RUNNING: &str =
    "SELECT EXISTS (SELECT 1 FROM sy_tasks WHERE parent_group = $1 AND state = 'running')";
const STEP_STATE_BY_NAME: &str = "SELECT state FROM sy_steps WHERE task_id = $1 AND name = $2";
const PROMOTE: &str = "UPDATE sy_steps SET state = 'ready', wait = NULL, wait_event = NULL, wait_group = NULL, updated_at = $1 \
     WHERE id IN (SELECT id FROM sy_steps WHERE state = 'suspended' AND run_at IS NOT NULL AND run_at <= $1 \
                  FOR UPDATE SKIP LOCKED)";
/// The claim statement (public so tests can check its plan): `$1` handlers,
/// `$2` how many of each, `$3` now, `$4` host, `$5` lease expiry. The
/// locked rows are updated by their `ctid` (a TID scan), not looked up
/// again through the primary key: the row lock keeps that version current
/// until this statement updates it.
pub const CLAIM: &str = "WITH picked AS ( \
       SELECT s.tid FROM unnest($1::text[], $2::bigint[]) AS w(handler, n) \
       CROSS JOIN LATERAL ( \
         SELECT ctid AS tid FROM sy_steps \
         WHERE state = 'ready' AND handler = w.handler AND run_at <= $3 \
         ORDER BY priority DESC, run_at, seq LIMIT w.n \
         FOR UPDATE SKIP LOCKED) s) \
     UPDATE sy_steps SET state = 'running', attempt = attempt + 1, run = run + 1, lease_owner = $4, \
       lease_expires_at = $5, updated_at = $3 \
     FROM picked WHERE sy_steps.ctid = picked.tid \
     RETURNING sy_steps.id, task_id, name, handler, input, headers, attempt, priority, run_at, seq, \
       depends_on IS NOT NULL, run, routes";
/// A step whose `run_at` is not after its creation was due when it was
/// made, so it is never due after `$2` (see migration 4).
const NEXT_DUE: &str =
    "SELECT min(run_at) FROM sy_steps WHERE handler = ANY($1) AND state IN ('ready', 'suspended') \
     AND run_at > created_at AND run_at > $2";
const TASK_META: &str = "SELECT state, final_step, has_deps, response_event, parent_group, parent_step_id, priority, headers \
     FROM sy_tasks WHERE id = $1 FOR UPDATE";
const UNBLOCK: &str = "UPDATE sy_steps SET pending_deps = pending_deps - 1, \
       state = CASE WHEN pending_deps <= 1 THEN 'ready' ELSE 'blocked' END, \
       run_at = CASE WHEN pending_deps <= 1 THEN $3::bigint ELSE NULL END, updated_at = $3 \
     WHERE state = 'blocked' AND id IN (SELECT step_id FROM sy_step_deps WHERE task_id = $1 AND dep_name = $2) \
     RETURNING state = 'ready'";
const FINISH_TASK: &str =
    "UPDATE sy_tasks SET state = $2, result = $3, error = $4, updated_at = $5 \
     WHERE id = $1 AND state = 'running'";
const WAKE_GROUP_PARENT: &str = "UPDATE sy_steps SET state = 'ready', run_at = $3, wait = NULL, wait_event = NULL, \
       wait_group = NULL, updated_at = $3 WHERE id = $1 AND state = 'suspended' AND wait_group = $2";
const INSERT_EVENT: &str = "INSERT INTO sy_events (name, payload, created_at) VALUES ($1, $2, $3) \
     ON CONFLICT (name) DO NOTHING";
const WAKE_EVENT_WAITERS: &str =
    "UPDATE sy_steps SET state = 'ready', run_at = $2, wait = NULL, wait_event = NULL, \
       wait_group = NULL, updated_at = $2 WHERE state = 'suspended' AND wait_event = $1";
const RESET_STEP: &str = "UPDATE sy_steps SET state = $2, attempt = 0, run_at = $3, pending_deps = $4, lease_owner = NULL, \
       lease_expires_at = NULL, wait = NULL, wait_event = NULL, wait_group = NULL, updated_at = $5 WHERE id = $1";
const UPSERT_HOST: &str = "INSERT INTO sy_hosts (id, pid, hostname, handlers, started_at, last_heartbeat, name, language, slots) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, hostname = excluded.hostname, name = excluded.name, \
       handlers = excluded.handlers, started_at = excluded.started_at, last_heartbeat = excluded.last_heartbeat, \
       language = excluded.language, slots = excluded.slots, ended_at = NULL, end_reason = NULL";
/// Ends host `$1`'s registration at `$2` for reason `$3`.
const END_HOST: &str =
    "UPDATE sy_hosts SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL";
/// Deletes the registrations that ended before `$1`.
const FORGET_ENDED_HOSTS: &str = "DELETE FROM sy_hosts WHERE ended_at < $1";
/// The columns [`host_row`] reads.
macro_rules! host_columns {
    () => {
        "id, pid, hostname, handlers, started_at, last_heartbeat, name, language, slots, ended_at, end_reason"
    };
}
/// Renews the leases `$1` of host `$2` until `$3` and answers which of them
/// the host still holds. Rows another transaction has locked (a completion
/// of the same steps being recorded, a takeover) are skipped, not waited
/// for: a heartbeat that waited on a completion batch while that batch
/// waited on rows the heartbeat had already locked deadlocked, and a
/// heartbeat renewing a large backlog held up every completion behind it.
/// A skipped step counts as held if it was running under this host's lease
/// when the statement began; if it is being taken over, the next heartbeat
/// reports it lost. Answers each held step with its current run: a run the
/// host reported that is not the current one is lost (renewing the step's
/// lease is still right then: the current run is this host's too).
const EXTEND_LEASES: &str = "WITH locked AS ( \
       SELECT id FROM sy_steps WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2 \
       FOR UPDATE SKIP LOCKED), \
     extended AS ( \
       UPDATE sy_steps s SET lease_expires_at = $3 FROM locked WHERE s.id = locked.id) \
     SELECT id, run FROM sy_steps WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2";
/// Which of the steps `$1` were cancelled (why a fenced write or a lease
/// was refused).
const CANCELLED_AMONG: &str = "SELECT id FROM sy_steps WHERE id = ANY($1) AND state = 'cancelled'";
const RECOVER_EXPIRED: &str = "UPDATE sy_steps SET state = 'ready', run_at = $1, lease_owner = NULL, lease_expires_at = NULL, \
       updated_at = $1, error = json_build_object('kind', 'lease_expired', 'message', \
         'the lease of host ' || coalesce(lease_owner, '') || ' expired without a heartbeat before the step finished', \
         'attempt', attempt)::text \
     WHERE id IN (SELECT id FROM sy_steps WHERE state = 'running' AND lease_expires_at <= $1 \
                  FOR UPDATE SKIP LOCKED)";
const INSERT_TASKS: &str = "INSERT INTO sy_tasks (id, handler, input, state, headers, priority, idempotency_key, \
       response_event, parent_task_id, parent_step_id, parent_group, parent_index, final_step, created_at, updated_at) \
     SELECT u.id, u.handler, u.input, 'running', u.headers, u.priority, u.key, u.response_event, u.pt, u.ps, u.pg, \
       u.pi, u.handler, $12, $12 \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::text[], $8::uuid[], \
       $9::uuid[], $10::text[], $11::int4[]) \
       AS u(id, handler, input, headers, priority, key, response_event, pt, ps, pg, pi) \
     ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
     RETURNING id";
/// [`INSERT_TASKS`] for a batch without idempotency keys: a plain insert
/// (an `ON CONFLICT` clause makes every row a speculative insertion, with
/// its own token, arbiter check and WAL record).
const INSERT_TASKS_PLAIN: &str = "INSERT INTO sy_tasks (id, handler, input, state, headers, priority, idempotency_key, \
       response_event, parent_task_id, parent_step_id, parent_group, parent_index, final_step, created_at, updated_at) \
     SELECT u.id, u.handler, u.input, 'running', u.headers, u.priority, u.key, u.response_event, u.pt, u.ps, u.pg, \
       u.pi, u.handler, $12, $12 \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::text[], $8::uuid[], \
       $9::uuid[], $10::text[], $11::int4[]) \
       AS u(id, handler, input, headers, priority, key, response_event, pt, ps, pg, pi)";
const FIND_IDEMPOTENT_MANY: &str =
    "SELECT idempotency_key, id FROM sy_tasks WHERE idempotency_key = ANY($1)";
const INSERT_ROOT_STEPS: &str = "INSERT INTO sy_steps (id, task_id, name, handler, input, headers, state, priority, \
       run_at, pending_deps, created_at, updated_at) \
     SELECT u.sid, u.tid, u.handler, u.handler, u.input, u.headers, 'ready', u.priority, u.run_at, 0, $8, $8 \
     FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::int8[]) \
       AS u(sid, tid, handler, input, headers, priority, run_at)";
/// Settles many `Completed` steps (`$1..$5`: step ids, task ids, lease
/// owners, attempts, results; `$6` now) and, in the same statement,
/// finishes the tasks that have nothing else to do once that step is done
/// (its final step, no dependants, no response event, no group). Rows:
/// `(true, step id, task id, step name)` per settled step and `(false, task
/// id, NULL, final step)` per finished task. Steps are locked before their
/// tasks here, unlike the batches that lock tasks first; a cancel racing the
/// same task can deadlock, which the server detects and the write retries.
pub const SETTLE_AND_FINISH: &str = "WITH settled AS ( \
       UPDATE sy_steps s SET state = 'completed', result = u.result, lease_owner = NULL, \
         lease_expires_at = NULL, updated_at = $6 \
       FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::text[]) \
         AS u(id, task_id, owner, run, result) \
       WHERE s.id = u.id AND s.task_id = u.task_id AND s.state = 'running' AND s.lease_owner = u.owner \
         AND s.run = u.run \
       RETURNING s.id, s.task_id, s.name, u.result), \
     finished AS ( \
       UPDATE sy_tasks t SET state = 'completed', result = settled.result, updated_at = $6 \
       FROM settled WHERE t.id = settled.task_id AND t.state = 'running' AND t.final_step = settled.name \
         AND NOT t.has_deps AND t.response_event IS NULL AND t.parent_group IS NULL \
       RETURNING t.id, t.final_step) \
     SELECT true, id, task_id, name FROM settled \
     UNION ALL SELECT false, id, NULL, final_step FROM finished";
const INSERT_STEP: &str =
    "INSERT INTO sy_steps (id, task_id, name, handler, input, headers, state, priority, run_at, \
       depends_on, pending_deps, created_at, updated_at, routes) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)";
const INSERT_DEP: &str =
    "INSERT INTO sy_step_deps (task_id, dep_name, step_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

macro_rules! task_select {
    ($tail:literal) => {
        concat!(
            "SELECT id, handler, input, state, result, error, headers, priority, idempotency_key, \
             response_event, parent_task_id, parent_step_id, parent_group, parent_index, created_at, updated_at \
             FROM sy_tasks ",
            $tail
        )
    };
}

fn task_row(r: &Row) -> Result<TaskRecord> {
    let g = |e: tokio_postgres::Error| pg_error("reading a task", &e);
    let parent = match r.try_get::<_, Option<Uuid>>(10).map_err(g)? {
        Some(parent_task) => Some(ParentRef {
            task_id: TaskId(parent_task),
            step_id: StepId(
                r.try_get::<_, Option<Uuid>>(11)
                    .map_err(g)?
                    .unwrap_or_default(),
            ),
            group: r.try_get(12).map_err(g)?,
            index: int_u32(
                "parent_index",
                r.try_get::<_, Option<i32>>(13).map_err(g)?.unwrap_or(0),
            )?,
        }),
        None => None,
    };
    Ok(TaskRecord {
        id: TaskId(r.try_get(0).map_err(g)?),
        handler: r.try_get(1).map_err(g)?,
        input: decode("task input", r.try_get(2).map_err(g)?)?,
        state: parse(r.try_get(3).map_err(g)?)?,
        result: opt_decode("task result", r.try_get(4).map_err(g)?)?,
        error: opt_decode("task error", r.try_get(5).map_err(g)?)?,
        headers: opt_decode("task headers", r.try_get(6).map_err(g)?)?.unwrap_or_default(),
        priority: r.try_get(7).map_err(g)?,
        idempotency_key: r.try_get(8).map_err(g)?,
        response_event: r.try_get(9).map_err(g)?,
        parent,
        created_at: r.try_get(14).map_err(g)?,
        updated_at: r.try_get(15).map_err(g)?,
    })
}

const STEP_SELECT: &str =
    "SELECT id, task_id, name, handler, input, state, attempt, priority, run_at, lease_owner, \
     lease_expires_at, result, error, depends_on, wait, created_at, updated_at, run, status, routes FROM sy_steps \
     WHERE task_id = $1 ORDER BY seq";

fn step_row(r: &Row) -> Result<StepRecord> {
    let g = |e: tokio_postgres::Error| pg_error("reading a step", &e);
    Ok(StepRecord {
        id: StepId(r.try_get(0).map_err(g)?),
        task_id: TaskId(r.try_get(1).map_err(g)?),
        name: r.try_get(2).map_err(g)?,
        handler: r.try_get(3).map_err(g)?,
        input: decode("step input", r.try_get(4).map_err(g)?)?,
        state: parse(r.try_get(5).map_err(g)?)?,
        attempt: int_u32("attempt", r.try_get(6).map_err(g)?)?,
        priority: r.try_get(7).map_err(g)?,
        run_at: r.try_get(8).map_err(g)?,
        lease_owner: r.try_get(9).map_err(g)?,
        lease_expires_at: r.try_get(10).map_err(g)?,
        result: opt_decode("step result", r.try_get(11).map_err(g)?)?,
        error: opt_decode("step error", r.try_get(12).map_err(g)?)?,
        depends_on: opt_decode("depends_on", r.try_get(13).map_err(g)?)?.unwrap_or_default(),
        wait: opt_decode("wait", r.try_get(14).map_err(g)?)?,
        created_at: r.try_get(15).map_err(g)?,
        updated_at: r.try_get(16).map_err(g)?,
        run: r.try_get::<_, i64>(17).map_err(g)? as u64,
        status: r.try_get(18).map_err(g)?,
        routes: opt_decode("step routes", r.try_get(19).map_err(g)?)?.unwrap_or_default(),
    })
}

fn event_row(r: &Row) -> Result<EventRecord> {
    let g = |e: tokio_postgres::Error| pg_error("reading an event", &e);
    Ok(EventRecord {
        name: r.try_get(0).map_err(g)?,
        payload: decode("event payload", r.try_get(1).map_err(g)?)?,
        created_at: r.try_get(2).map_err(g)?,
    })
}

// ---------------------------------------------------------------------------
// Write transactions
// ---------------------------------------------------------------------------

/// Spawns a batch in a fixed number of statements: one multi-row insert of
/// the tasks (`ON CONFLICT DO NOTHING` on the idempotency key), one lookup
/// of the keys that already existed, one multi-row insert of the root steps.
async fn spawn_tx(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    tasks: &[PreparedTask],
) -> DbResult<Vec<Spawned>> {
    // A key repeated inside the batch: later items answer with the first's id.
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let mut dup_of: Vec<Option<usize>> = vec![None; tasks.len()];
    for (i, t) in tasks.iter().enumerate() {
        if let Some(k) = t.idempotency_key.as_deref() {
            match first_with_key.get(k) {
                Some(&j) => dup_of[i] = Some(j),
                None => {
                    first_with_key.insert(k, i);
                }
            }
        }
    }
    let rows: Vec<&PreparedTask> = tasks
        .iter()
        .zip(&dup_of)
        .filter(|(_, d)| d.is_none())
        .map(|(t, _)| t)
        .collect();
    let ids: Vec<Uuid> = rows.iter().map(|t| t.task_id.0).collect();
    let handlers: Vec<&str> = rows.iter().map(|t| t.handler.as_str()).collect();
    let inputs: Vec<&str> = rows.iter().map(|t| t.input.as_str()).collect();
    let headers: Vec<Option<&str>> = rows.iter().map(|t| t.headers.as_deref()).collect();
    let priorities: Vec<i32> = rows.iter().map(|t| t.priority).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|t| t.idempotency_key.as_deref()).collect();
    let events: Vec<Option<&str>> = rows.iter().map(|t| t.response_event.as_deref()).collect();
    let parent_tasks: Vec<Option<Uuid>> = rows
        .iter()
        .map(|t| t.parent.as_ref().map(|p| p.task_id.0))
        .collect();
    let parent_steps: Vec<Option<Uuid>> = rows
        .iter()
        .map(|t| t.parent.as_ref().map(|p| p.step_id.0))
        .collect();
    let parent_groups: Vec<Option<&str>> = rows
        .iter()
        .map(|t| t.parent.as_ref().and_then(|p| p.group.as_deref()))
        .collect();
    let parent_indexes: Vec<Option<i32>> = rows
        .iter()
        .map(|t| t.parent.as_ref().map(|p| p.index as i32))
        .collect();
    let params: [&(dyn ToSql + Sync); 12] = [
        &ids,
        &handlers,
        &inputs,
        &headers,
        &priorities,
        &keys,
        &events,
        &parent_tasks,
        &parent_steps,
        &parent_groups,
        &parent_indexes,
        &now,
    ];
    let created: HashSet<Uuid> = if keys.iter().all(Option::is_none) {
        c.exec(INSERT_TASKS_PLAIN, &params).await?;
        ids.iter().copied().collect()
    } else {
        c.query(INSERT_TASKS, &params)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // Keys that existed before this batch (committed by anyone).
    let missing: Vec<&str> = rows
        .iter()
        .filter(|t| !created.contains(&t.task_id.0))
        .filter_map(|t| t.idempotency_key.as_deref())
        .collect();
    let mut existing: HashMap<String, Uuid> = HashMap::new();
    if !missing.is_empty() {
        for r in c.query(FIND_IDEMPOTENT_MANY, &[&missing]).await? {
            existing.insert(r.get(0), r.get(1));
        }
    }
    let new_rows: Vec<&&PreparedTask> = rows
        .iter()
        .filter(|t| created.contains(&t.task_id.0))
        .collect();
    if !new_rows.is_empty() {
        let step_ids: Vec<Uuid> = new_rows.iter().map(|t| t.step_id.0).collect();
        let task_ids: Vec<Uuid> = new_rows.iter().map(|t| t.task_id.0).collect();
        let handlers: Vec<&str> = new_rows.iter().map(|t| t.handler.as_str()).collect();
        let inputs: Vec<&str> = new_rows.iter().map(|t| t.input.as_str()).collect();
        let headers: Vec<Option<&str>> = new_rows.iter().map(|t| t.headers.as_deref()).collect();
        let priorities: Vec<i32> = new_rows.iter().map(|t| t.priority).collect();
        let run_ats: Vec<i64> = new_rows.iter().map(|t| t.run_at.unwrap_or(now)).collect();
        c.exec(
            INSERT_ROOT_STEPS,
            &[
                &step_ids,
                &task_ids,
                &handlers,
                &inputs,
                &headers,
                &priorities,
                &run_ats,
                &now,
            ],
        )
        .await?;
        fx.ready = true;
    }
    let mut out: Vec<Spawned> = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        let answer = match dup_of[i] {
            Some(j) => Spawned {
                task_id: out[j].task_id,
                created: false,
            },
            None if created.contains(&t.task_id.0) => Spawned {
                task_id: t.task_id,
                created: true,
            },
            None => {
                let key = t.idempotency_key.as_deref().unwrap_or_default();
                let id = existing.get(key).copied().ok_or_else(|| {
                    Fail::App(Error::Store(format!(
                        "postgres spawn: task with idempotency key `{key}` was neither created nor found"
                    )))
                })?;
                Spawned {
                    task_id: TaskId(id),
                    created: false,
                }
            }
        };
        out.push(answer);
    }
    Ok(out)
}

struct RawClaim {
    step: ClaimedStep,
    run_at: Millis,
    seq: i64,
}

async fn claim_tx(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    host_id: &str,
    wants: &[(String, i64)],
    lease_ms: i64,
) -> DbResult<(Vec<RawClaim>, Option<Millis>)> {
    if c.exec(PROMOTE, &[&now]).await? > 0 {
        fx.ready = true;
    }
    let expires = now.saturating_add(lease_ms);
    let handlers: Vec<&str> = wants.iter().map(|(h, _)| h.as_str()).collect();
    let counts: Vec<i64> = wants.iter().map(|(_, n)| *n).collect();
    let mut claimed = Vec::new();
    if counts.iter().any(|n| *n > 0) {
        let rows = c
            .query(CLAIM, &[&handlers, &counts, &now, &host_id, &expires])
            .await?;
        for r in rows {
            let headers: Option<String> = r.get(5);
            let run_at = r.get::<_, Option<i64>>(8).unwrap_or(now);
            claimed.push(RawClaim {
                step: ClaimedStep {
                    step_id: StepId(r.get(0)),
                    task_id: TaskId(r.get(1)),
                    name: r.get(2),
                    handler: r.get(3),
                    input: decode("step input", r.get(4))?,
                    headers: opt_decode("task headers", headers)?.unwrap_or_default(),
                    attempt: int_u32("attempt", r.get(6))?,
                    run: r.get::<_, i64>(11) as u64,
                    priority: r.get(7),
                    lease_expires_at: expires,
                    has_dependencies: r.get(10),
                    ready_at: run_at,
                    routes: opt_decode("step routes", r.get(12))?.unwrap_or_default(),
                },
                run_at,
                seq: r.get(9),
            });
        }
    }
    let next_due: Option<Millis> = c.one(NEXT_DUE, &[&handlers, &now]).await?.get(0);
    Ok((claimed, next_due))
}

/// What a completion needs to know about the step's task (row locked).
struct TaskMeta {
    running: bool,
    final_step: String,
    has_deps: bool,
    response_event: Option<String>,
    parent_group: Option<String>,
    parent_step_id: Option<Uuid>,
    priority: i32,
    headers: Option<String>,
}

async fn task_meta(c: &mut Conn, task_id: Uuid) -> DbResult<Option<TaskMeta>> {
    Ok(c.opt(TASK_META, &[&task_id])
        .await?
        .map(|r| meta_row(&r, 0)))
}

/// A [`TaskMeta`] from the columns of [`TASK_META`] starting at `at`.
fn meta_row(r: &Row, at: usize) -> TaskMeta {
    TaskMeta {
        running: r.get::<_, &str>(at) == "running",
        final_step: r.get(at + 1),
        has_deps: r.get(at + 2),
        response_event: r.get(at + 3),
        parent_group: r.get(at + 4),
        parent_step_id: r.get(at + 5),
        priority: r.get(at + 6),
        headers: r.get(at + 7),
    }
}

/// Applies one completion. The outer error fails the whole batch (a
/// database failure); the inner one answers this item only and is always
/// detected before anything is written.
async fn complete_one(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    lease: &Lease,
    item: &Prepared,
) -> DbResult<Result<()>> {
    let sid = lease.step_id.0;
    let tid = lease.task_id.0;
    let host = lease.host_id.as_str();
    // `attempt` binds the fence: the run number.
    let attempt = lease.run as i64;
    let lost = || Ok(Err(Error::LeaseLost(lease.step_id)));
    match item {
        Prepared::Completed { result } => {
            let Some(meta) = task_meta(c, tid).await? else {
                return lost();
            };
            let Some(row) = c
                .opt(
                    SETTLE_COMPLETED,
                    &[&sid, &tid, &host, &attempt, &now, result],
                )
                .await?
            else {
                return lost();
            };
            let name: String = row.get(0);
            if meta.has_deps {
                unblock(c, now, fx, tid, &name).await?;
            }
            if meta.running && meta.final_step == name {
                finish_task(
                    c,
                    now,
                    fx,
                    tid,
                    &meta,
                    TaskState::Completed,
                    Some(result),
                    None,
                )
                .await?;
            }
        }
        Prepared::Decided {
            steps,
            final_step,
            result,
            status,
        } => {
            let Some(meta) = task_meta(c, tid).await? else {
                return lost();
            };
            let Some(row) = c.opt(LEASE_CHECK, &[&sid, &tid, &host, &attempt]).await? else {
                return lost();
            };
            let decider: String = row.get(0);
            let completed = match check_decision(c, tid, &decider, steps).await? {
                Ok(done) => done,
                Err(e) => return Ok(Err(e)),
            };
            c.opt(
                SETTLE_COMPLETED,
                &[&sid, &tid, &host, &attempt, &now, result],
            )
            .await?;
            if status.is_some() {
                c.exec(
                    "UPDATE sy_steps SET status = $2 WHERE id = $1",
                    &[&sid, status],
                )
                .await?;
            }
            if meta.has_deps {
                unblock(c, now, fx, tid, &decider).await?;
            }
            if !steps.is_empty() {
                insert_decided(c, now, fx, tid, &meta, steps, &completed).await?;
            }
            if meta.running && meta.final_step == decider {
                match steps.last() {
                    None => {
                        finish_task(
                            c,
                            now,
                            fx,
                            tid,
                            &meta,
                            TaskState::Completed,
                            Some(result),
                            None,
                        )
                        .await?;
                    }
                    Some(last) => {
                        let new_final = final_step.as_deref().unwrap_or(&last.name);
                        c.exec(
                            "UPDATE sy_tasks SET final_step = $2, updated_at = $3 WHERE id = $1",
                            &[&tid, &new_final, &now],
                        )
                        .await?;
                    }
                }
            }
        }
        Prepared::Retry { error, run_at } => {
            let changed = c
                .exec(
                    SETTLE_RETRY,
                    &[&sid, &tid, &host, &attempt, &now, run_at, error],
                )
                .await?;
            if changed == 0 {
                return lost();
            }
            fx.ready = true;
        }
        Prepared::Failed { error } => {
            let Some(meta) = task_meta(c, tid).await? else {
                return lost();
            };
            let changed = c
                .exec(SETTLE_FAILED, &[&sid, &tid, &host, &attempt, &now, error])
                .await?;
            if changed == 0 {
                return lost();
            }
            if meta.running {
                cancel_live_steps(c, now, fx, tid).await?;
                finish_task(c, now, fx, tid, &meta, TaskState::Failed, None, Some(error)).await?;
            }
        }
        Prepared::Suspended { wait, json } => {
            // Lock order: (task), event/group lock, then the step. The checks
            // below then see every commit made by whoever held the lock before.
            if let Some(name) = &wait.event {
                c.exec(LOCK_EVENT, &[name]).await?;
            }
            if let Some(group) = &wait.group {
                c.exec(LOCK_GROUP, &[group]).await?;
            }
            if c.opt(LEASE_CHECK, &[&sid, &tid, &host, &attempt])
                .await?
                .is_none()
            {
                return lost();
            }
            let mut satisfied = wait.wake_at.is_some_and(|at| at <= now);
            if !satisfied {
                if let Some(name) = &wait.event {
                    satisfied = c.one(EVENT_EXISTS, &[name]).await?.get(0);
                }
            }
            if !satisfied {
                if let Some(group) = &wait.group {
                    satisfied = !c.one(GROUP_RUNNING, &[group]).await?.get::<_, bool>(0);
                }
            }
            let state = if satisfied { "ready" } else { "suspended" };
            let run_at = if satisfied { Some(now) } else { wait.wake_at };
            let wait_json = (!satisfied).then_some(json.as_str());
            let wait_event = wait.event.as_deref().filter(|_| !satisfied);
            let wait_group = wait.group.as_deref().filter(|_| !satisfied);
            c.exec(
                SETTLE_SUSPENDED,
                &[
                    &sid,
                    &tid,
                    &host,
                    &attempt,
                    &now,
                    &state,
                    &run_at,
                    &wait_json,
                    &wait_event,
                    &wait_group,
                ],
            )
            .await?;
            fx.ready |= satisfied;
        }
        Prepared::Released => {
            let changed = c
                .exec(SETTLE_RELEASED, &[&sid, &tid, &host, &attempt, &now])
                .await?;
            if changed == 0 {
                return lost();
            }
            fx.ready = true;
        }
    }
    Ok(Ok(()))
}

/// The checks of a decision against the task's existing steps (the task row
/// is locked, so they cannot change meanwhile). Answers, for each existing
/// step named as a dependency, whether it is completed.
async fn check_decision(
    c: &mut Conn,
    task_id: Uuid,
    decider: &str,
    steps: &[PreparedStep],
) -> DbResult<Result<HashMap<String, bool>>> {
    let new_names: HashSet<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    let mut existing: HashMap<String, bool> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if c.opt(STEP_STATE_BY_NAME, &[&task_id, &s.name])
            .await?
            .is_some()
        {
            return Ok(Err(Error::InvalidInput(format!(
                "steps[{i}].name: the task already has a step named `{}`",
                s.name
            ))));
        }
        for d in &s.deps {
            if new_names.contains(d.as_str()) || existing.contains_key(d) {
                continue;
            }
            match c.opt(STEP_STATE_BY_NAME, &[&task_id, d]).await? {
                Some(row) => {
                    let state: &str = row.get(0);
                    existing.insert(d.clone(), d == decider || state == "completed");
                }
                None => {
                    return Ok(Err(Error::InvalidInput(format!(
                        "steps[{i}].depends_on: unknown step `{d}` (neither in this decision nor in the task)"
                    ))))
                }
            }
        }
    }
    Ok(Ok(existing))
}

async fn insert_decided(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    task_id: Uuid,
    meta: &TaskMeta,
    steps: &[PreparedStep],
    completed: &HashMap<String, bool>,
) -> DbResult<()> {
    let mut any_deps = false;
    for s in steps {
        let pending = s
            .deps
            .iter()
            .filter(|d| !completed.get(*d).copied().unwrap_or(false))
            .count() as i32;
        let state = if pending > 0 { "blocked" } else { "ready" };
        let run_at = if pending > 0 { None } else { Some(now) };
        c.exec(
            INSERT_STEP,
            &[
                &s.id.0,
                &task_id,
                &s.name,
                &s.handler,
                &s.input,
                &meta.headers,
                &state,
                &meta.priority,
                &run_at,
                &s.deps_json,
                &pending,
                &now,
                &s.routes_json,
            ],
        )
        .await?;
        for d in &s.deps {
            c.exec(INSERT_DEP, &[&task_id, d, &s.id.0]).await?;
            any_deps = true;
        }
        fx.ready |= pending == 0;
    }
    if any_deps && !meta.has_deps {
        c.exec(
            "UPDATE sy_tasks SET has_deps = true WHERE id = $1",
            &[&task_id],
        )
        .await?;
    }
    Ok(())
}

async fn unblock(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    task_id: Uuid,
    name: &str,
) -> DbResult<()> {
    for r in c.query(UNBLOCK, &[&task_id, &name, &now]).await? {
        fx.ready |= r.get::<_, bool>(0);
    }
    Ok(())
}

/// Cancels every non-terminal step of a task; running ones are announced.
async fn cancel_live_steps(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    task_id: Uuid,
) -> DbResult<()> {
    let running = c
        .query(
            "SELECT id FROM sy_steps WHERE task_id = $1 AND state = 'running' FOR UPDATE",
            &[&task_id],
        )
        .await?;
    fx.cancelled
        .extend(running.iter().map(|r| StepId(r.get::<_, Uuid>(0))));
    c.exec(CANCEL_STEPS_PLAIN, &[&task_id, &now]).await?;
    Ok(())
}

const CANCEL_STEPS_PLAIN: &str =
    "UPDATE sy_steps SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, \
       wait = NULL, wait_event = NULL, wait_group = NULL, updated_at = $2 \
     WHERE task_id = $1 AND state IN ('blocked', 'ready', 'running', 'suspended')";

/// *Task finish* (see the `Store` docs). `result` and `error` are JSON.
#[allow(clippy::too_many_arguments)]
async fn finish_task(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    task_id: Uuid,
    meta: &TaskMeta,
    state: TaskState,
    result: Option<&str>,
    error: Option<&str>,
) -> DbResult<()> {
    let changed = c
        .exec(
            FINISH_TASK,
            &[&task_id, &state.as_str(), &result, &error, &now],
        )
        .await?;
    if changed == 0 {
        return Ok(());
    }
    fx.finished = true;
    if let Some(event) = &meta.response_event {
        let payload = format!(
            r#"{{"task_id":"{task_id}","state":"{}","result":{},"error":{}}}"#,
            state.as_str(),
            result.unwrap_or("null"),
            error.unwrap_or("null"),
        );
        emit_tx(c, now, fx, event, &payload).await?;
    }
    if let (Some(group), Some(parent_step)) = (&meta.parent_group, &meta.parent_step_id) {
        c.exec(LOCK_GROUP, &[group]).await?;
        let running: bool = c.one(GROUP_RUNNING, &[group]).await?.get(0);
        if !running {
            let woke = c
                .exec(WAKE_GROUP_PARENT, &[parent_step, group, &now])
                .await?;
            fx.ready |= woke > 0;
        }
    }
    Ok(())
}

async fn emit_tx(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    name: &str,
    payload: &str,
) -> DbResult<bool> {
    c.exec(LOCK_EVENT, &[&name]).await?;
    let stored = c.exec(INSERT_EVENT, &[&name, &payload, &now]).await? > 0;
    let woke = c.exec(WAKE_EVENT_WAITERS, &[&name, &now]).await?;
    fx.ready |= woke > 0;
    Ok(stored)
}

fn cancelled_error() -> String {
    serde_json::to_string(&ErrorInfo::new(ErrorKind::Cancelled, "task cancelled"))
        .unwrap_or_default()
}

async fn cancel_tx(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    id: TaskId,
    cascade: bool,
) -> DbResult<bool> {
    let meta = task_meta(c, id.0)
        .await?
        .ok_or_else(|| Fail::App(Error::NotFound(format!("task {id}"))))?;
    if !meta.running && !cascade {
        return Ok(false);
    }
    let error = cancelled_error();
    if meta.running {
        cancel_live_steps(c, now, fx, id.0).await?;
        finish_task(
            c,
            now,
            fx,
            id.0,
            &meta,
            TaskState::Cancelled,
            None,
            Some(&error),
        )
        .await?;
    }
    // A cascade reaches the unfinished descendants of a finished task too.
    if cascade {
        let mut queue = vec![id.0];
        // Finished children are walked too: they may have unfinished children.
        while let Some(parent) = queue.pop() {
            let children = c
                .query(
                    "SELECT id FROM sy_tasks WHERE parent_task_id = $1 ORDER BY seq",
                    &[&parent],
                )
                .await?;
            for row in children {
                let child: Uuid = row.get(0);
                if let Some(meta) = task_meta(c, child).await? {
                    if meta.running {
                        cancel_live_steps(c, now, fx, child).await?;
                        finish_task(
                            c,
                            now,
                            fx,
                            child,
                            &meta,
                            TaskState::Cancelled,
                            None,
                            Some(&error),
                        )
                        .await?;
                    }
                }
                queue.push(child);
            }
        }
    }
    Ok(meta.running)
}

async fn retry_tx(c: &mut Conn, now: Millis, fx: &mut Effects, id: TaskId) -> DbResult<()> {
    let tid = id.0;
    let state: Option<String> = c
        .opt(
            "SELECT state FROM sy_tasks WHERE id = $1 FOR UPDATE",
            &[&tid],
        )
        .await?
        .map(|r| r.get(0));
    match state.as_deref() {
        None => return Err(Fail::App(Error::NotFound(format!("task {id}")))),
        Some("failed" | "cancelled") => {}
        Some(other) => {
            return Err(Fail::App(Error::Conflict(format!(
                "task {id} is {other}; only failed or cancelled tasks can be retried"
            ))))
        }
    }
    c.exec(
        "UPDATE sy_tasks SET state = 'running', result = NULL, error = NULL, updated_at = $2 WHERE id = $1",
        &[&tid, &now],
    )
    .await?;
    let rows = c
        .query(
            "SELECT id, name, state, depends_on FROM sy_steps WHERE task_id = $1 FOR UPDATE",
            &[&tid],
        )
        .await?;
    let mut steps = Vec::with_capacity(rows.len());
    for r in &rows {
        let deps: Option<Vec<String>> = opt_decode("depends_on", r.get(3))?;
        steps.push((
            r.get::<_, Uuid>(0),
            r.get::<_, String>(1),
            r.get::<_, &str>(2) == "completed",
            deps.unwrap_or_default(),
        ));
    }
    let done: HashSet<&str> = steps.iter().filter(|s| s.2).map(|s| s.1.as_str()).collect();
    for (sid, _, completed, deps) in &steps {
        if *completed {
            continue;
        }
        let deps: HashSet<&str> = deps.iter().map(String::as_str).collect();
        let pending = deps.iter().filter(|d| !done.contains(*d)).count() as i32;
        let (state, run_at) = if pending == 0 {
            ("ready", Some(now))
        } else {
            ("blocked", None)
        };
        c.exec(RESET_STEP, &[sid, &state, &run_at, &pending, &now])
            .await?;
    }
    fx.ready = true;
    Ok(())
}

/// Ends host `id`'s registration (kept for `ended_hosts`) and forgets the
/// registrations that ended longer ago than the retention.
async fn end_host(c: &mut Conn, id: &str, reason: &str, now: Millis) -> DbResult<()> {
    c.exec(END_HOST, &[&id, &now, &reason]).await?;
    c.exec(
        FORGET_ENDED_HOSTS,
        &[&now.saturating_sub(ENDED_HOST_RETENTION_MS)],
    )
    .await?;
    Ok(())
}

/// A row of `host_columns!()`.
fn host_row(r: &tokio_postgres::Row) -> std::result::Result<HostInfo, Fail> {
    Ok(HostInfo {
        id: r.get(0),
        pid: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
        hostname: r.get(2),
        handlers: decode("host handlers", r.get(3))?,
        started_at: r.get(4),
        last_heartbeat: r.get(5),
        name: r.get(6),
        language: r.get(7),
        slots: r
            .get::<_, Option<i64>>(8)
            .map(|n| u64::try_from(n).unwrap_or(0)),
        ended_at: r.get(9),
        end_reason: r.get(10),
    })
}

async fn heartbeat_tx(
    c: &mut Conn,
    now: Millis,
    host: &HostInfo,
    handlers: &str,
    running: &[RunRef],
    lease_ms: i64,
) -> DbResult<HeartbeatReply> {
    c.exec(
        UPSERT_HOST,
        &[
            &host.id,
            &i64::from(host.pid),
            &host.hostname,
            &handlers,
            &host.started_at,
            &now,
            &host.name,
            &host.language,
            &host.slots.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        ],
    )
    .await?;
    let mut reply = HeartbeatReply::default();
    if !running.is_empty() {
        let expires = now.saturating_add(lease_ms);
        let ids: Vec<Uuid> = running.iter().map(|r| r.step_id.0).collect();
        let kept: HashSet<(Uuid, i64)> = c
            .query(EXTEND_LEASES, &[&ids, &host.id, &expires])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        reply.lost = running
            .iter()
            .filter(|r| !kept.contains(&(r.step_id.0, r.run as i64)))
            .copied()
            .collect();
        let cancelled = cancelled_among(c, reply.lost.iter().map(|r| r.step_id.0)).await?;
        reply.cancelled = reply
            .lost
            .iter()
            .filter(|r| cancelled.contains(&r.step_id.0))
            .copied()
            .collect();
    }
    Ok(reply)
}

/// Which of `steps` were cancelled.
async fn cancelled_among(
    c: &mut Conn,
    steps: impl Iterator<Item = Uuid>,
) -> DbResult<HashSet<Uuid>> {
    let ids: Vec<Uuid> = steps.collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(c.query(CANCELLED_AMONG, &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Checks in the write's transaction that `lease` is its step's current
/// lease, and locks the step row so that a cancel (and its cascade) waits
/// for this write: [`Error::Cancelled`] if the step was cancelled, else
/// [`Error::LeaseLost`].
async fn fence_tx(c: &mut Conn, lease: &Lease) -> DbResult<()> {
    let run = lease.run as i64;
    let current = c
        .opt(
            LEASE_CHECK,
            &[&lease.step_id.0, &lease.task_id.0, &lease.host_id, &run],
        )
        .await?;
    if current.is_some() {
        return Ok(());
    }
    let cancelled = cancelled_among(c, std::iter::once(lease.step_id.0)).await?;
    Err(Fail::App(if cancelled.is_empty() {
        Error::LeaseLost(lease.step_id)
    } else {
        Error::Cancelled(lease.step_id)
    }))
}

/// One `put_checkpoint` call waiting to be written.
struct CheckpointWrite {
    lease: Lease,
    key: String,
    value: String,
    lease_ms: i64,
    reply: oneshot::Sender<Result<()>>,
}

/// Most checkpoint writes in one transaction.
const CHECKPOINT_BATCH: usize = 1024;

/// Longest checkpoint key (the primary key of `sy_checkpoints` must fit a
/// b-tree entry, at most ~2,700 bytes; keys made by the context are at most
/// a step name, a checkpoint name and a counter).
const MAX_CHECKPOINT_KEY: usize = 2048;

/// Group-commits checkpoint writes: takes every write queued when it wakes
/// (up to [`CHECKPOINT_BATCH`]) and writes them in one transaction, so the
/// many handlers of a host checkpointing at once share commits instead of
/// queueing for the pool's connections one transaction each (10 checkpoints
/// per step ran at ~6,000/s that way). A lone write goes out at once. The
/// writer holds the store weakly and ends when the store is dropped.
async fn checkpoint_writer(
    store: std::sync::Weak<PostgresStore>,
    mut queue: mpsc::UnboundedReceiver<CheckpointWrite>,
) {
    let mut batch = Vec::with_capacity(CHECKPOINT_BATCH);
    while queue.recv_many(&mut batch, CHECKPOINT_BATCH).await > 0 {
        let answers = match store.upgrade() {
            Some(store) => store.write_checkpoints(&batch).await,
            None => Err(Error::Store(
                "postgres put_checkpoint: the store was closed".into(),
            )),
        };
        match answers {
            Ok(answers) => {
                for (w, a) in batch.drain(..).zip(answers) {
                    let _ = w.reply.send(a);
                }
            }
            Err(e) => {
                for w in batch.drain(..) {
                    let _ = w.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Extends the lease of every step in `$1..$4` (ids, task ids, owners,
/// runs) that still holds it, to `$5` (per step); answers the steps
/// extended with the lease they matched.
const EXTEND_CHECKPOINT_LEASES: &str = "UPDATE sy_steps s SET lease_expires_at = u.expires \
     FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::int8[]) \
       AS u(id, task_id, owner, run, expires) \
     WHERE s.id = u.id AND s.task_id = u.task_id AND s.state = 'running' AND s.lease_owner = u.owner \
       AND s.run = u.run \
     RETURNING s.id, s.task_id, s.lease_owner, s.run";
/// Writes checkpoints `$1..$5` (task ids, keys, values, step ids, runs)
/// at `$6`; an existing checkpoint written by a newer run of the same step
/// is kept.
const UPSERT_CHECKPOINTS: &str =
    "INSERT INTO sy_checkpoints (task_id, key, value, step_id, run, created_at) \
     SELECT u.task_id, u.key, u.value, u.step_id, u.run, $6 \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::int4[]) \
       AS u(task_id, key, value, step_id, run) \
     ON CONFLICT (task_id, key) DO UPDATE SET value = excluded.value, step_id = excluded.step_id, \
       run = excluded.run, created_at = excluded.created_at \
     WHERE sy_checkpoints.step_id <> excluded.step_id OR sy_checkpoints.run <= excluded.run";

/// A batch of checkpoint writes in one transaction: one statement extends
/// the leases (each step once), one writes the checkpoints whose lease
/// held. Answers per write, in order: `LeaseLost` for a write whose lease
/// is no longer current, without failing the others. Two writes of the same
/// key of a task in one batch keep the later one, as two transactions in
/// that order would.
async fn checkpoints_tx(
    c: &mut Conn,
    now: Millis,
    writes: &[CheckpointWrite],
) -> DbResult<Vec<Result<()>>> {
    let run_of = |l: &Lease| l.run as i64;
    // The checkpoint table's column is 32-bit; runs of one step stay far below.
    let stored_run = |l: &Lease| i32::try_from(l.run).unwrap_or(i32::MAX);
    // Each lease once, with the furthest expiry asked for.
    let mut leases: BTreeMap<(Uuid, Uuid, &str, i64), i64> = BTreeMap::new();
    for w in writes {
        let l = &w.lease;
        let expires = now.saturating_add(w.lease_ms);
        let e = leases
            .entry((l.step_id.0, l.task_id.0, l.host_id.as_str(), run_of(l)))
            .or_insert(expires);
        *e = (*e).max(expires);
    }
    let (mut ids, mut tids, mut owners, mut attempts, mut expiries) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((id, tid, owner, attempt), expires) in &leases {
        ids.push(*id);
        tids.push(*tid);
        owners.push(*owner);
        attempts.push(*attempt);
        expiries.push(*expires);
    }
    let held: HashSet<(Uuid, Uuid, String, i64)> = c
        .query(
            EXTEND_CHECKPOINT_LEASES,
            &[&ids, &tids, &owners, &attempts, &expiries],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let holds: Vec<bool> = writes
        .iter()
        .map(|w| {
            let l = &w.lease;
            held.contains(&(l.step_id.0, l.task_id.0, l.host_id.clone(), run_of(l)))
        })
        .collect();
    // The last write of each (task, key) whose lease held, in call order.
    let mut last: HashMap<(Uuid, &str), usize> = HashMap::new();
    for (i, w) in writes.iter().enumerate().filter(|(i, _)| holds[*i]) {
        last.insert((w.lease.task_id.0, w.key.as_str()), i);
    }
    let mut order: Vec<usize> = last.into_values().collect();
    order.sort_unstable();
    if !order.is_empty() {
        let (mut task_ids, mut keys, mut values, mut step_ids, mut attempts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for w in order.iter().map(|&i| &writes[i]) {
            task_ids.push(w.lease.task_id.0);
            keys.push(w.key.as_str());
            values.push(w.value.as_str());
            step_ids.push(w.lease.step_id.0);
            attempts.push(stored_run(&w.lease));
        }
        c.exec(
            UPSERT_CHECKPOINTS,
            &[&task_ids, &keys, &values, &step_ids, &attempts, &now],
        )
        .await?;
    }
    let refused = writes
        .iter()
        .zip(&holds)
        .filter(|(_, held)| !**held)
        .map(|(w, _)| w.lease.step_id.0);
    let cancelled = cancelled_among(c, refused).await?;
    Ok(writes
        .iter()
        .zip(holds)
        .map(|(w, held)| match held {
            true => Ok(()),
            false if cancelled.contains(&w.lease.step_id.0) => {
                Err(Error::Cancelled(w.lease.step_id))
            }
            false => Err(Error::LeaseLost(w.lease.step_id)),
        })
        .collect())
}

async fn complete_tx(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    items: &[Result<(Lease, Prepared)>],
) -> DbResult<Vec<Result<()>>> {
    // The common case (plain results for distinct steps) is set-based.
    let mut steps = HashSet::new();
    let fast = items.iter().all(
        |i| matches!(i, Ok((lease, Prepared::Completed { .. })) if steps.insert(lease.step_id)),
    );
    if fast {
        return complete_fast(c, now, fx, items).await;
    }
    // Lock every task of the batch up front, in id order, so that batches
    // touching the same tasks queue up instead of deadlocking.
    let tasks: Vec<Uuid> = items
        .iter()
        .filter_map(|i| i.as_ref().ok().map(|(l, _)| l.task_id.0))
        .collect();
    lock_tasks(c, tasks).await?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok((lease, prepared)) => out.push(complete_one(c, now, fx, lease, prepared).await?),
            Err(e) => out.push(Err(e.clone())),
        }
    }
    Ok(out)
}

/// Locks the tasks (in id order) and reads what completing their steps
/// needs to know.
async fn lock_tasks(c: &mut Conn, mut tasks: Vec<Uuid>) -> DbResult<HashMap<Uuid, TaskMeta>> {
    tasks.sort_unstable();
    tasks.dedup();
    let mut metas = HashMap::new();
    if !tasks.is_empty() {
        for r in c.query(LOCK_TASKS, &[&tasks]).await? {
            metas.insert(r.get(0), meta_row(&r, 1));
        }
    }
    Ok(metas)
}

/// `Completed` items of distinct steps: one statement settles every step
/// and finishes the tasks with nothing else to do ([`SETTLE_AND_FINISH`]);
/// only the steps of other tasks (dependants to unblock, a response event
/// or a group to tell) take the long way, one task at a time.
async fn complete_fast(
    c: &mut Conn,
    now: Millis,
    fx: &mut Effects,
    items: &[Result<(Lease, Prepared)>],
) -> DbResult<Vec<Result<()>>> {
    let mut ids = Vec::with_capacity(items.len());
    let mut tids = Vec::with_capacity(items.len());
    let mut owners: Vec<&str> = Vec::with_capacity(items.len());
    let mut runs: Vec<i64> = Vec::with_capacity(items.len());
    let mut results: Vec<&str> = Vec::with_capacity(items.len());
    for (lease, prepared) in items.iter().flatten() {
        let Prepared::Completed { result } = prepared else {
            continue;
        };
        ids.push(lease.step_id.0);
        tids.push(lease.task_id.0);
        owners.push(lease.host_id.as_str());
        runs.push(lease.run as i64);
        results.push(result.as_str());
    }
    let mut settled: HashMap<Uuid, String> = HashMap::new();
    let mut finished: HashSet<Uuid> = HashSet::new();
    for r in c
        .query(
            SETTLE_AND_FINISH,
            &[&ids, &tids, &owners, &runs, &results, &now],
        )
        .await?
    {
        if r.get::<_, bool>(0) {
            settled.insert(r.get(1), r.get(3));
        } else {
            finished.insert(r.get(1));
        }
    }
    fx.finished |= !finished.is_empty();
    let rest: Vec<Uuid> = items
        .iter()
        .flatten()
        .filter(|(l, _)| settled.contains_key(&l.step_id.0) && !finished.contains(&l.task_id.0))
        .map(|(l, _)| l.task_id.0)
        .collect();
    let metas = lock_tasks(c, rest).await?;
    let mut out = Vec::with_capacity(items.len());
    for (lease, prepared) in items.iter().flatten() {
        let Prepared::Completed { result } = prepared else {
            continue;
        };
        let Some(name) = settled.get(&lease.step_id.0) else {
            out.push(Err(Error::LeaseLost(lease.step_id)));
            continue;
        };
        out.push(Ok(()));
        let tid = lease.task_id.0;
        let Some(meta) = metas.get(&tid) else {
            // Finished above (or the task is gone).
            continue;
        };
        if meta.has_deps {
            unblock(c, now, fx, tid, name).await?;
        }
        if meta.running && &meta.final_step == name {
            finish_task(
                c,
                now,
                fx,
                tid,
                meta,
                TaskState::Completed,
                Some(result),
                None,
            )
            .await?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------

async fn get_task_q(c: &mut Conn, id: Uuid) -> DbResult<Option<TaskRecord>> {
    match c.opt(task_select!("WHERE id = $1"), &[&id]).await? {
        Some(r) => Ok(Some(task_row(&r)?)),
        None => Ok(None),
    }
}

async fn task_detail_q(c: &mut Conn, id: Uuid) -> DbResult<Option<TaskDetail>> {
    let Some(task) = get_task_q(c, id).await? else {
        return Ok(None);
    };
    let steps = c
        .query(STEP_SELECT, &[&id])
        .await?
        .iter()
        .map(step_row)
        .collect::<Result<Vec<_>>>()?;
    let mut checkpoints = Vec::new();
    for r in c
        .query(
            "SELECT key, value, step_id, run, created_at FROM sy_checkpoints WHERE task_id = $1 ORDER BY seq",
            &[&id],
        )
        .await?
    {
        checkpoints.push(CheckpointRecord {
            task_id: TaskId(id),
            key: r.get(0),
            value: decode("checkpoint value", r.get(1))?,
            step_id: StepId(r.get(2)),
            run: u64::from(int_u32("run", r.get(3))?),
            created_at: r.get(4),
        });
    }
    let children = c
        .query(
            task_select!("WHERE parent_task_id = $1 ORDER BY seq"),
            &[&id],
        )
        .await?
        .iter()
        .map(task_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(TaskDetail {
        task,
        steps,
        checkpoints,
        children,
    }))
}

async fn list_tasks_q(c: &mut Conn, filter: &TaskFilter) -> DbResult<Vec<TaskRecord>> {
    let limit = if filter.limit == 0 {
        DEFAULT_LIMIT
    } else {
        filter.limit
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // Only the conditions that are set go into the statement; the cursor is
    // a keyset on `seq` (the listing order), never an offset.
    let mut conds: Vec<String> = Vec::new();
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut arg = |conds: &mut Vec<String>, cond: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        conds.push(cond.replace('?', &format!("${}", args.len())));
    };
    if let Some(after) = filter.after {
        let row = c
            .opt("SELECT seq FROM sy_tasks WHERE id = $1", &[&after.0])
            .await?;
        let Some(row) = row else {
            return Err(Error::NotFound(format!("cursor task {after}")).into());
        };
        let seq: i64 = row.get(0);
        arg(&mut conds, "seq < ?", Box::new(seq));
    }
    if let Some(state) = filter.state {
        arg(&mut conds, "state = ?", Box::new(state.as_str()));
    }
    if let Some(h) = &filter.handler {
        arg(&mut conds, "handler = ?", Box::new(h.clone()));
    }
    if filter.root_only {
        conds.push("parent_task_id IS NULL".into());
    }
    if let Some(p) = filter.parent {
        arg(&mut conds, "parent_task_id = ?", Box::new(p.0));
    }
    if let Some(k) = &filter.idempotency_key {
        arg(&mut conds, "idempotency_key = ?", Box::new(k.clone()));
    }
    if let Some(t) = filter.created_after {
        arg(&mut conds, "created_at >= ?", Box::new(t));
    }
    if let Some(t) = filter.created_before {
        arg(&mut conds, "created_at < ?", Box::new(t));
    }
    if filter.wants_finished() {
        conds.push("state <> 'running'".into());
    }
    if let Some(t) = filter.finished_after {
        arg(&mut conds, "updated_at >= ?", Box::new(t));
    }
    if let Some(t) = filter.finished_before {
        arg(&mut conds, "updated_at < ?", Box::new(t));
    }
    if let Some(st) = filter.step_state {
        arg(
            &mut conds,
            "state = 'running' AND EXISTS (SELECT 1 FROM sy_steps s WHERE s.task_id = sy_tasks.id \
             AND s.state = ?)",
            Box::new(st.as_str()),
        );
    }
    let mut sql = String::from(task_select!(""));
    if !conds.is_empty() {
        sql.push_str("WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    args.push(Box::new(limit));
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", args.len()));
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = c.client.query(sql.as_str(), &params).await?;
    Ok(rows.iter().map(task_row).collect::<Result<Vec<_>>>()?)
}

// ---------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    fn poll_interval(&self) -> Duration {
        self.poll
    }

    async fn now(&self) -> Result<Millis> {
        match &self.clock {
            Some(clock) => Ok(clock.now()),
            None => read_op!(self, "now", false, |c| async {
                Ok::<Millis, Fail>(c.one(SELECT_DB_NOW, &[]).await?.get(0))
            }),
        }
    }

    async fn migrate(&self) -> Result<u32> {
        self.migrate_now().await
    }

    async fn spawn(&self, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| PreparedTask::new(i, t))
            .collect::<Result<Vec<_>>>()?;
        write_tx!(self, "spawn", |c, now, fx| spawn_tx(c, now, fx, &tasks))
    }

    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<ClaimBatch> {
        if wants.is_empty() {
            return Ok(ClaimBatch::default());
        }
        // One entry per handler (a repeated handler adds up).
        let mut merged: Vec<(String, i64)> = Vec::with_capacity(wants.len());
        for (h, n) in wants {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            match merged.iter_mut().find(|(m, _)| m == h) {
                Some(e) => e.1 = e.1.saturating_add(n),
                None => merged.push((h.clone(), n)),
            }
        }
        let (mut raw, next_due) = write_tx!(self, "claim", |c, now, fx| claim_tx(
            c, now, fx, host_id, &merged, lease_ms
        ))?;
        raw.sort_by(|a, b| {
            b.step
                .priority
                .cmp(&a.step.priority)
                .then(a.run_at.cmp(&b.run_at))
                .then(a.seq.cmp(&b.seq))
        });
        Ok(ClaimBatch {
            steps: raw.into_iter().map(|r| r.step).collect(),
            next_due,
        })
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let items: Vec<Result<(Lease, Prepared)>> =
            completions.into_iter().map(prepare_completion).collect();
        write_tx!(self, "complete", |c, now, fx| complete_tx(
            c, now, fx, &items
        ))
    }

    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
    ) -> Result<HeartbeatReply> {
        let handlers = encode("handlers", &host.handlers)?;
        write_tx!(self, "heartbeat", |c, now, _fx| heartbeat_tx(
            c, now, host, &handlers, running, lease_ms
        ))
    }

    async fn cancelled_steps(&self, steps: &[StepId]) -> Result<Vec<StepId>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = steps.iter().map(|s| s.0).collect();
        read_op!(self, "cancelled_steps", false, |c| async {
            Ok::<_, Fail>(
                c.query(CANCELLED_AMONG, &[&ids])
                    .await?
                    .iter()
                    .map(|r| StepId(r.get(0)))
                    .collect(),
            )
        })
    }

    async fn expire_host(&self, host_id: &str) -> Result<u64> {
        write_tx!(self, "expire_host", |c, now, _fx| async {
            // `lease_expires_at IS NOT NULL` is "running" for the lease index.
            let n = c
                .exec(
                    "UPDATE sy_steps SET lease_expires_at = $2 \
                     WHERE lease_expires_at IS NOT NULL AND lease_owner = $1",
                    &[&host_id, &now],
                )
                .await?;
            end_host(c, host_id, HOST_DEAD, now).await?;
            Ok::<u64, Fail>(n)
        })
    }

    async fn deregister_host(&self, host_id: &str) -> Result<()> {
        write_tx!(self, "deregister_host", |c, now, _fx| async {
            end_host(c, host_id, HOST_STOPPED, now).await
        })
    }

    async fn recover_expired(&self) -> Result<u64> {
        write_tx!(self, "recover_expired", |c, now, fx| async {
            let n = c.exec(RECOVER_EXPIRED, &[&now]).await?;
            fx.ready |= n > 0;
            Ok::<u64, Fail>(n)
        })
    }

    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> Result<()> {
        let value = encode("checkpoint value", &value)?;
        // A key PostgreSQL refuses would fail the whole write batch, other
        // steps' checkpoints included: refuse it here, alone.
        if key.contains('\0') || key.len() > MAX_CHECKPOINT_KEY {
            return Err(Error::InvalidInput(format!(
                "checkpoint key `{}` cannot be stored: it must hold no NUL character and at most \
                 {MAX_CHECKPOINT_KEY} bytes ({} given)",
                key.escape_debug(),
                key.len()
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.checkpoints
            .send(CheckpointWrite {
                lease: lease.clone(),
                key: key.to_string(),
                value,
                lease_ms,
                reply,
            })
            .map_err(|_| Error::Store("postgres put_checkpoint: the store is closing".into()))?;
        answer.await.unwrap_or_else(|_| {
            Err(Error::Store(
                "postgres put_checkpoint: the store closed before the write".into(),
            ))
        })
    }

    async fn checkpoints(&self, task_id: TaskId) -> Result<BTreeMap<String, Value>> {
        read_op!(self, "checkpoints", false, |c| async {
            let mut out = BTreeMap::new();
            for r in c
                .query(
                    "SELECT key, value FROM sy_checkpoints WHERE task_id = $1",
                    &[&task_id.0],
                )
                .await?
            {
                out.insert(r.get::<_, String>(0), decode("checkpoint value", r.get(1))?);
            }
            Ok::<_, Fail>(out)
        })
    }

    async fn emit_event(&self, name: &str, payload: Value) -> Result<bool> {
        if name.trim().is_empty() {
            return Err(Error::InvalidInput("event name: must not be empty".into()));
        }
        let payload = encode("event payload", &payload)?;
        write_tx!(self, "emit_event", |c, now, fx| emit_tx(
            c, now, fx, name, &payload
        ))
    }

    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> Result<bool> {
        if name.trim().is_empty() {
            return Err(Error::InvalidInput("event name: must not be empty".into()));
        }
        let payload = encode("event payload", &payload)?;
        write_tx!(self, "emit_event", |c, now, fx| async {
            fence_tx(c, fence).await?;
            emit_tx(c, now, fx, name, &payload).await
        })
    }

    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| PreparedTask::new(i, t))
            .collect::<Result<Vec<_>>>()?;
        write_tx!(self, "spawn", |c, now, fx| async {
            fence_tx(c, fence).await?;
            spawn_tx(c, now, fx, &tasks).await
        })
    }

    async fn get_event(&self, name: &str) -> Result<Option<EventRecord>> {
        read_op!(self, "get_event", false, |c| async {
            match c
                .opt(
                    "SELECT name, payload, created_at FROM sy_events WHERE name = $1",
                    &[&name],
                )
                .await?
            {
                Some(r) => Ok::<_, Fail>(Some(event_row(&r)?)),
                None => Ok(None),
            }
        })
    }

    async fn list_events_prefixed(&self, prefix: &str, limit: usize) -> Result<Vec<EventRecord>> {
        let limit =
            i64::try_from(if limit == 0 { DEFAULT_LIMIT } else { limit }).unwrap_or(i64::MAX);
        read_op!(self, "list_events_prefixed", false, |c| async {
            // left(), not LIKE: the prefix is plain text (`%` and `_` too).
            let rows = c
                .query(
                    "SELECT name, payload, created_at FROM sy_events \
                     WHERE left(name, length($1)) = $1 ORDER BY seq DESC LIMIT $2",
                    &[&prefix, &limit],
                )
                .await?;
            Ok::<_, Fail>(rows.iter().map(event_row).collect::<Result<Vec<_>>>()?)
        })
    }

    async fn running_by_host(&self) -> Result<BTreeMap<String, u64>> {
        read_op!(self, "running_by_host", false, |c| async {
            let mut by = BTreeMap::new();
            for r in c
                .query(
                    "SELECT lease_owner, count(*) FROM sy_steps \
                     WHERE state = 'running' AND lease_owner IS NOT NULL GROUP BY lease_owner",
                    &[],
                )
                .await?
            {
                let n: i64 = r.get(1);
                by.insert(r.get::<_, String>(0), u64::try_from(n).unwrap_or(0));
            }
            Ok::<_, Fail>(by)
        })
    }

    async fn handler_stats(&self) -> Result<Vec<switchyard_core::HandlerStats>> {
        // A full scan: for the admin API, not for a hot path.
        read_op!(self, "handler_stats", false, |c| async {
            let mut by: BTreeMap<String, switchyard_core::HandlerStats> = BTreeMap::new();
            for r in c
                .query(
                    "SELECT handler, state, count(*), \
                     min(CASE WHEN state = 'ready' THEN coalesce(run_at, created_at) END) \
                     FROM sy_steps GROUP BY handler, state",
                    &[],
                )
                .await?
            {
                let handler: String = r.get(0);
                let state: String = r.get(1);
                let n: i64 = r.get(2);
                let oldest: Option<i64> = r.get(3);
                let h =
                    by.entry(handler.clone())
                        .or_insert_with(|| switchyard_core::HandlerStats {
                            handler,
                            ..Default::default()
                        });
                h.steps.insert(state, u64::try_from(n).unwrap_or(0));
                if oldest.is_some() {
                    h.oldest_ready_at = oldest;
                }
            }
            Ok::<_, Fail>(by.into_values().collect::<Vec<_>>())
        })
    }

    async fn task_counts(&self) -> Result<Vec<switchyard_core::TaskCount>> {
        // A full scan: for the admin API, not for a hot path.
        read_op!(self, "task_counts", false, |c| async {
            let mut out = Vec::new();
            for r in c
                .query(
                    "SELECT handler, state, count(*) FROM sy_tasks \
                     GROUP BY handler, state ORDER BY handler, state",
                    &[],
                )
                .await?
            {
                out.push(switchyard_core::TaskCount {
                    handler: r.get(0),
                    state: r.get(1),
                    count: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                });
            }
            Ok::<_, Fail>(out)
        })
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
        read_op!(self, "finished_buckets", false, |c| async {
            let mut out = Vec::new();
            for r in c
                .query(
                    "SELECT $1::bigint + ((updated_at - $1::bigint) / $2::bigint) * $2::bigint AS b, \
                     state, count(*) FROM sy_tasks \
                     WHERE state <> 'running' AND updated_at >= $1::bigint \
                     GROUP BY b, state ORDER BY b, state",
                    &[&since, &bucket_ms],
                )
                .await?
            {
                out.push(switchyard_core::FinishedBucket {
                    start: r.get(0),
                    state: r.get(1),
                    count: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                });
            }
            Ok::<_, Fail>(out)
        })
    }

    async fn failure_groups(&self, limit: usize) -> Result<Vec<switchyard_core::FailureGroup>> {
        let limit =
            i64::try_from(if limit == 0 { DEFAULT_LIMIT } else { limit }).unwrap_or(i64::MAX);
        read_op!(self, "failure_groups", false, |c| async {
            let mut out = Vec::new();
            for r in c
                .query(
                    "SELECT handler, coalesce(error::jsonb ->> 'message', '') AS m, \
                     count(*) AS n, max(updated_at) FROM sy_tasks WHERE state = 'failed' \
                     GROUP BY handler, m ORDER BY n DESC, handler, m LIMIT $1",
                    &[&limit],
                )
                .await?
            {
                out.push(switchyard_core::FailureGroup {
                    handler: r.get(0),
                    message: r.get(1),
                    count: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    last_failed_at: r.get(3),
                });
            }
            Ok::<_, Fail>(out)
        })
    }

    async fn group_outcomes(&self, group: &str) -> Result<Vec<ChildOutcome>> {
        read_op!(self, "group_outcomes", false, |c| async {
            let mut out = Vec::new();
            for r in c
                .query(
                    "SELECT id, state, result, error FROM sy_tasks WHERE parent_group = $1 \
                     ORDER BY parent_index, seq",
                    &[&group],
                )
                .await?
            {
                out.push(ChildOutcome {
                    task_id: TaskId(r.get(0)),
                    state: parse(r.get(1))?,
                    result: opt_decode("task result", r.get(2))?,
                    error: opt_decode("task error", r.get(3))?,
                });
            }
            Ok::<_, Fail>(out)
        })
    }

    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> Result<BTreeMap<String, Value>> {
        read_op!(self, "step_results", false, |c| async {
            let mut out = BTreeMap::new();
            for r in c
                .query(
                    "SELECT name, result FROM sy_steps WHERE task_id = $1 AND name = ANY($2) \
                     AND state = 'completed'",
                    &[&task_id.0, &names],
                )
                .await?
            {
                let value = match r.get::<_, Option<String>>(1) {
                    Some(s) => decode("step result", &s)?,
                    None => Value::Null,
                };
                out.insert(r.get::<_, String>(0), value);
            }
            Ok::<_, Fail>(out)
        })
    }

    async fn cancel_task(&self, id: TaskId, cascade: bool) -> Result<bool> {
        write_tx!(self, "cancel_task", |c, now, fx| cancel_tx(
            c, now, fx, id, cascade
        ))
    }

    async fn cleanup(&self, finished_before: Millis, batch: usize) -> Result<u64> {
        if batch == 0 {
            return Ok(0);
        }
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        write_tx!(self, "cleanup", |c, _now, _fx| async {
            let row = c.one(CLEANUP, &[&finished_before, &limit]).await?;
            Ok::<u64, Fail>(row.get::<_, i64>(0) as u64)
        })
    }

    async fn cleanup_events(&self, created_before: Millis, batch: usize) -> Result<u64> {
        if batch == 0 {
            return Ok(0);
        }
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        write_tx!(self, "cleanup_events", |c, _now, _fx| async {
            let n = c
                .exec(
                    "DELETE FROM sy_events WHERE name IN \
                     (SELECT name FROM sy_events WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
                    &[&created_before, &limit],
                )
                .await?;
            Ok::<u64, Fail>(n)
        })
    }

    async fn retry_task(&self, id: TaskId) -> Result<()> {
        write_tx!(self, "retry_task", |c, now, fx| retry_tx(c, now, fx, id))
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        read_op!(self, "get_task", false, |c| get_task_q(c, id.0))
    }

    async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        read_op!(self, "task_detail", true, |c| task_detail_q(c, id.0))
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        read_op!(self, "list_tasks", false, |c| list_tasks_q(c, filter))
    }

    async fn list_hosts(&self) -> Result<Vec<HostInfo>> {
        read_op!(self, "list_hosts", false, |c| async {
            let rows = c
                .query(
                    concat!(
                        "SELECT ",
                        host_columns!(),
                        " FROM sy_hosts WHERE ended_at IS NULL ORDER BY last_heartbeat DESC, id"
                    ),
                    &[],
                )
                .await?;
            rows.iter()
                .map(host_row)
                .collect::<std::result::Result<Vec<_>, Fail>>()
        })
    }

    async fn ended_hosts(&self, since: Millis) -> Result<Vec<HostInfo>> {
        read_op!(self, "ended_hosts", false, |c| async {
            let rows = c
                .query(
                    concat!(
                        "SELECT ",
                        host_columns!(),
                        " FROM sy_hosts WHERE ended_at >= $1 ORDER BY ended_at DESC, id"
                    ),
                    &[&since],
                )
                .await?;
            rows.iter()
                .map(host_row)
                .collect::<std::result::Result<Vec<_>, Fail>>()
        })
    }

    async fn count_steps(&self) -> Result<StateCounts> {
        read_op!(self, "count_steps", false, |c| async {
            let mut out = StateCounts::new();
            for r in c
                .query("SELECT state, count(*) FROM sy_steps GROUP BY state", &[])
                .await?
            {
                out.insert(r.get::<_, String>(0), r.get::<_, i64>(1) as u64);
            }
            Ok::<_, Fail>(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_validated_and_stripped() {
        let p =
            parse_url("postgres://u:secret@h:5432/db?wakeup=polling&poll_ms=20&sslmode=disable")
                .unwrap();
        assert_eq!(p.wakeup, Wakeup::Polling);
        assert_eq!(p.poll, Duration::from_millis(20));
        assert_eq!(p.connect, "postgres://u:secret@h:5432/db?sslmode=disable");
        assert!(!p.display.contains("secret"), "{}", p.display);
        let p = parse_url("postgres://h/db?sslpassword=keypw&password=plainpw").unwrap();
        assert!(
            !p.display.contains("keypw") && !p.display.contains("plainpw"),
            "{}",
            p.display
        );
        assert!(p.display.contains("sslpassword=***"), "{}", p.display);
        let p = parse_url("postgresql://h/db").unwrap();
        assert_eq!(p.wakeup, Wakeup::Hybrid);
        assert!(matches!(
            parse_url("postgres://h/db?wakeup=sometimes"),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            parse_url("postgres://h/db?poll_ms=x"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn session_timeouts_have_defaults_and_url_overrides() {
        let p = parse_url("postgres://h/db").unwrap();
        assert_eq!(
            session_sql(&p.session, None),
            "SET lock_timeout = '30s'; SET idle_in_transaction_session_timeout = '60s'; "
        );
        assert!(!p.keepalives_idle);
        let p = parse_url(
            "postgres://h/db?lock_timeout=5s&keepalives_idle=7&idle_in_transaction_session_timeout=0&sslmode=disable",
        )
        .unwrap();
        assert_eq!(
            p.connect,
            "postgres://h/db?keepalives_idle=7&sslmode=disable"
        );
        assert!(p.keepalives_idle && !p.keepalives_interval);
        assert_eq!(
            session_sql(&p.session, None),
            "SET lock_timeout = '5s'; SET idle_in_transaction_session_timeout = '0'; "
        );
        assert!(p.display.contains("lock_timeout=5s"), "{}", p.display);
        // What libpq-style `options` sets is left to it.
        for options in [
            "-c lock_timeout=1s",
            "-clock_timeout=1s",
            "--lock-timeout=1s -c geqo=off",
        ] {
            assert_eq!(
                session_sql(&p.session, Some(options)),
                "SET idle_in_transaction_session_timeout = '0'; ",
                "{options}"
            );
        }
        assert_eq!(
            session_sql(&p.session, Some("-c deadlock_timeout=1s")),
            "SET lock_timeout = '5s'; SET idle_in_transaction_session_timeout = '0'; "
        );
        for bad in [
            "lock_timeout=soon",
            "lock_timeout=",
            "idle_in_transaction_session_timeout=1s';DROP",
        ] {
            match parse_url(&format!("postgres://h/db?{bad}")) {
                Err(Error::Config(m)) => assert!(m.contains(bad.split('=').next().unwrap()), "{m}"),
                other => panic!(
                    "{bad}: expected a config error, got {:?}",
                    other.map(|p| p.display)
                ),
            }
        }
    }
}
