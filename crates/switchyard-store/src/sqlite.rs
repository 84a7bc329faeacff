//! The SQLite store: the embedded default (DESIGN.md §7).
//!
//! # How it works
//!
//! * **One writer thread per store.** Every write, claims included, is a
//!   command sent over a channel to a dedicated thread that owns the only
//!   write connection. The thread drains whatever is queued (up to
//!   [`WRITE_BATCH_CAP`] commands) and applies it in one `BEGIN IMMEDIATE`
//!   transaction: *group commit*, one WAL commit for many callers. Each
//!   command runs in its own `SAVEPOINT`, so a command that fails rolls back
//!   alone. Replies are sent, and [`Signals`] fire, only after `COMMIT`
//!   succeeded: nothing is acknowledged or announced that could still be lost.
//!   JSON is encoded before a command is queued and decoded after its reply,
//!   so the writer thread (the one serial part) does only SQL.
//! * **Reads** run on blocking threads with a small pool of read-only
//!   connections, so they never queue behind writes (WAL lets readers run
//!   during a write). Each read is one snapshot (a deferred transaction).
//! * **Several processes** may share one file: `BEGIN IMMEDIATE` takes the
//!   write lock up front (no lock upgrades that could deadlock), the busy
//!   timeout waits out the other process's transaction, and hosts poll every
//!   [`POLL_INTERVAL`] for work made elsewhere.
//! * **One store per file per process**: [`SqliteStore::open`] returns the live
//!   store when the same file (after canonicalisation) is already open, so a
//!   host and a client in one process share the writer and the wake-ups.
//! * **`:memory:`** opens a private in-memory database (never shared). A
//!   second connection would see a different database, so its reads go
//!   through the writer thread too.
//! * **Times** come from the store's clock only, never from SQLite.
//! * **Durability.** A write is acknowledged only after `COMMIT`, and by
//!   default (`PRAGMA synchronous = FULL`) a commit is on disk before that:
//!   an acknowledged write survives a power loss or an OS crash. The URL may
//!   trade this for speed with `sqlite:PATH?synchronous=normal`: in WAL mode
//!   commits are then synced only at checkpoints, so the last commits before
//!   a power loss (never an application crash) can be lost, though the
//!   database stays consistent. `?synchronous=extra` is also accepted (see
//!   [`Synchronous`]). Other query parameters are rejected.
//! * **A bounded WAL.** A separate thread runs passive checkpoints (they
//!   never block anyone), but a passive checkpoint cannot restart the WAL
//!   while readers or the writer keep using it, so under continuous load the
//!   `-wal` file would grow without end (1.29 GB after a million steps).
//!   Between two transactions, the writer therefore runs a
//!   `wal_checkpoint(RESTART)` once the WAL holds more than half of
//!   [`WAL_SIZE_LIMIT`] (it learns the WAL's length from SQLite's WAL hook
//!   after each commit). It holds off this store's new reads meanwhile (a
//!   stream of overlapping reads would otherwise keep the WAL in use
//!   forever), waits at most [`WAL_TRUNCATE_PATIENCE`] for readers, and
//!   tries again a second later if they stayed (another process's, say).
//!   The next transaction then writes the WAL from its start again, and
//!   `journal_size_limit` (half of the limit) cuts the file back to that
//!   size. A restart, unlike a truncation, leaves the file allocated, so
//!   the writer does not grow it again from zero each time: most pages
//!   were already copied back by the checkpoint thread, and the restart
//!   costs about a millisecond (a truncation cost 30–40 ms and 10% of the
//!   100,000-step bench's throughput).
//!
//! # Schema
//!
//! See [`MIGRATIONS`]. Ids are 16-byte UUID blobs; every table that is listed
//! in creation order also has an integer `seq` (the rowid), which is the
//! creation order (UUIDv7 order is only per process). JSON is stored as
//! TEXT. The hot path is served by partial indexes: ready steps by `(handler,
//! priority DESC, run_at, seq)`, running steps by lease expiry, suspended
//! steps by wake time, event and group; dependencies live in `step_deps`
//! with a pending counter on the blocked step, so unblocking is O(log n) per
//! dependant.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use rusqlite::types::{Type, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_core::{
    CheckpointRecord, ChildOutcome, ClaimBatch, ClaimedStep, Clock, Completion, Error, ErrorInfo,
    ErrorKind, EventRecord, HeartbeatReply, HostInfo, Lease, Millis, NewTask, ParentRef, Result,
    RunRef, Signals, Spawned, StateCounts, StepId, StepRecord, Store, TaskDetail, TaskFilter,
    TaskId, TaskRecord, TaskState, ENDED_HOST_RETENTION_MS, HOST_DEAD, HOST_STOPPED,
};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::prepared::{encode, prepare_completion, Prepared, PreparedStep, PreparedTask};
use crate::StoreOptions;

/// Most commands the writer applies in one transaction.
pub const WRITE_BATCH_CAP: usize = 1024;
/// How long a connection waits for another process's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often hosts look for work committed by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The most a `-wal` file holds on disk: the writer restarts the WAL once
/// it holds half of this, and `PRAGMA journal_size_limit` is that half.
pub const WAL_SIZE_LIMIT: u64 = 64 << 20;
/// How long the writer's restarting checkpoint waits for readers.
pub const WAL_TRUNCATE_PATIENCE: Duration = Duration::from_millis(500);
/// After a restarting checkpoint that readers kept from finishing, the
/// writer waits this long before the next attempt.
const WAL_TRUNCATE_RETRY: Duration = Duration::from_secs(1);
/// Idle read connections kept per store.
const READ_POOL_SIZE: usize = 4;
/// `limit` 0 means this many.
const DEFAULT_LIMIT: usize = 100;
/// Enough for every statement below, so `prepare_cached` never re-prepares.
const STATEMENT_CACHE: usize = 128;

/// The schema, one entry per version (version = index + 1). Never edit an
/// entry once released: add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
CREATE TABLE tasks (
    seq             INTEGER PRIMARY KEY,
    id              BLOB NOT NULL UNIQUE,
    handler         TEXT NOT NULL,
    input           TEXT NOT NULL,
    state           TEXT NOT NULL,
    result          TEXT,
    error           TEXT,
    headers         TEXT,            -- JSON object, NULL when empty
    priority        INTEGER NOT NULL,
    idempotency_key TEXT,
    response_event  TEXT,
    parent_task_id  BLOB,
    parent_step_id  BLOB,
    parent_group    TEXT,
    parent_index    INTEGER,
    final_step      TEXT NOT NULL,   -- the step whose completion completes the task
    has_deps        INTEGER NOT NULL DEFAULT 0, -- some step waits on another (skip step_deps otherwise)
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_state ON tasks(state, seq);
CREATE INDEX tasks_parent ON tasks(parent_task_id) WHERE parent_task_id IS NOT NULL;
CREATE INDEX tasks_group ON tasks(parent_group, state) WHERE parent_group IS NOT NULL;

CREATE TABLE steps (
    seq              INTEGER PRIMARY KEY,
    id               BLOB NOT NULL UNIQUE,
    task_id          BLOB NOT NULL,
    name             TEXT NOT NULL,
    handler          TEXT NOT NULL,
    input            TEXT NOT NULL,
    headers          TEXT,           -- the task's, copied so claims need no join
    state            TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    priority         INTEGER NOT NULL,
    run_at           INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    result           TEXT,
    error            TEXT,
    depends_on       TEXT,           -- JSON array, NULL when none
    pending_deps     INTEGER NOT NULL DEFAULT 0,
    wait             TEXT,           -- JSON WaitFor while suspended
    wait_event       TEXT,
    wait_group       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX steps_task_name ON steps(task_id, name);
CREATE INDEX steps_ready ON steps(handler, priority DESC, run_at, seq) WHERE state = 'ready';
CREATE INDEX steps_lease ON steps(lease_expires_at) WHERE state = 'running';
CREATE INDEX steps_wake ON steps(run_at) WHERE state = 'suspended' AND run_at IS NOT NULL;
CREATE INDEX steps_wake_handler ON steps(handler, run_at) WHERE state = 'suspended' AND run_at IS NOT NULL;
CREATE INDEX steps_wait_event ON steps(wait_event) WHERE state = 'suspended' AND wait_event IS NOT NULL;
CREATE INDEX steps_wait_group ON steps(wait_group) WHERE state = 'suspended' AND wait_group IS NOT NULL;

CREATE TABLE step_deps (
    task_id  BLOB NOT NULL,
    dep_name TEXT NOT NULL,
    step_seq INTEGER NOT NULL,
    PRIMARY KEY (task_id, dep_name, step_seq)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    task_id    BLOB NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    step_id    BLOB NOT NULL,
    attempt    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (task_id, key)
);

CREATE TABLE events (
    name       TEXT PRIMARY KEY,
    payload    TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE hosts (
    id             TEXT PRIMARY KEY,
    pid            INTEGER NOT NULL,
    hostname       TEXT NOT NULL,
    handlers       TEXT NOT NULL,
    started_at     INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL
);
"#,
    // 2: no index on task state. Every task went through it twice (spawn and
    // finish) for listings by state, which scan newest first and stop at
    // their limit anyway; cleanup walks the oldest tasks, which are finished.
    "DROP INDEX IF EXISTS tasks_state;",
    // 3: runs. `run` numbers every claim of a step and fences its writes
    // (`attempt` now counts attempts used, which suspensions give back);
    // checkpoints record the run that wrote them. Steps running during the
    // upgrade keep their fence: their run is their attempt.
    r#"
ALTER TABLE steps ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
UPDATE steps SET run = attempt;
ALTER TABLE checkpoints RENAME COLUMN attempt TO run;
"#,
    // 4: structural replay keys (`switchyard_core::keys`). The keys whose
    // names need escaping are rewritten by `upgrade_checkpoint_keys` in the
    // same transaction; this statement only records the step.
    "SELECT 1;",
    // 5: a host's configured name (`host.name`), shown in host listings.
    "ALTER TABLE hosts ADD COLUMN name TEXT;",
    // 6: indexes for task listings at scale. Without them a listing by a
    // handler, by a window of creation times or by a window of finish times
    // walked the whole table newest first until it had its page: at a
    // million tasks, a rare handler or an old window took a full scan per
    // page (measured with `bench/run --lang http`). `tasks_handler` is read
    // in listing order (its entries end with the rowid, `seq`), so a
    // handler's pages, after a cursor too, are range searches with no sort.
    // `tasks_finished` holds finished tasks only: a task enters it once, when
    // it finishes (running tasks' updates never touch it), and it is the
    // range that `finished_after`/`finished_before` (which imply
    // `state <> 'running'`) search.
    r#"
CREATE INDEX tasks_handler ON tasks(handler);
CREATE INDEX tasks_created ON tasks(created_at);
CREATE INDEX tasks_finished ON tasks(updated_at) WHERE state <> 'running';
"#,
    // 7: hosts listings show the language and slots of a host, and hosts
    // whose registration ended (stopped or found dead) for a day.
    r#"
ALTER TABLE hosts ADD COLUMN language TEXT;
ALTER TABLE hosts ADD COLUMN slots INTEGER;
ALTER TABLE hosts ADD COLUMN ended_at INTEGER;
ALTER TABLE hosts ADD COLUMN end_reason TEXT;
"#,
    // 8: routing on a step's status: the routes a decision declared for a
    // step (JSON, NULL when none) and the status it completed with.
    r#"
ALTER TABLE steps ADD COLUMN routes TEXT;
ALTER TABLE steps ADD COLUMN status TEXT;
"#,
    // 9: event retention (`cleanup_events`) deletes the oldest events first.
    "CREATE INDEX events_created ON events(created_at);",
];

/// The schema version whose migration rewrites checkpoint keys.
const KEYS_VERSION: usize = 4;

/// Rewrites the checkpoint keys of older versions into structural keys
/// (`switchyard_core::keys::upgrade_legacy`, which needs the name of the
/// step that wrote each one). Most keys are already in that form and are
/// left alone.
fn upgrade_checkpoint_keys(conn: &Connection) -> DbResult<()> {
    let rows: Vec<(i64, String, String)> = conn
        .prepare(
            "SELECT c.rowid, c.key, s.name FROM checkpoints c JOIN steps s ON s.id = c.step_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut update = conn.prepare("UPDATE checkpoints SET key = ?2 WHERE rowid = ?1")?;
    for (rowid, key, step) in rows {
        let new = switchyard_core::keys::upgrade_legacy(&key, &step);
        if new != key {
            update.execute(params![rowid, new])?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A failure inside a database closure: SQL errors get the operation's name
/// as context when they leave the store; `App` errors are passed as they are.
#[derive(Debug)]
enum Fail {
    Sql(rusqlite::Error),
    App(Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::App(e)
    }
}

impl Fail {
    fn into_error(self, op: &str) -> Error {
        match self {
            // The data was refused (a constraint, a value too big or of the
            // wrong type): writing it again cannot succeed, so it is not
            // reported as a (retryable) store error; see `pg_error` in the
            // PostgreSQL store.
            Fail::Sql(rusqlite::Error::SqliteFailure(f, m))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::ConstraintViolation
                        | rusqlite::ErrorCode::TooBig
                        | rusqlite::ErrorCode::TypeMismatch
                ) =>
            {
                let e = rusqlite::Error::SqliteFailure(f, m);
                Error::InvalidInput(format!("sqlite {op}: {e}"))
            }
            Fail::Sql(e) => Error::Store(format!("sqlite {op}: {e}")),
            Fail::App(e) => e,
        }
    }
}

type DbResult<T> = std::result::Result<T, Fail>;

fn decode<T: DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| Error::Store(format!("sqlite: stored {what} is not valid JSON: {e}")))
}

fn conversion(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, Type::Text, Box::new(e))
}

// ---------------------------------------------------------------------------
// Row helpers
// ---------------------------------------------------------------------------

fn uuid_col(r: &Row, i: usize) -> rusqlite::Result<Uuid> {
    Ok(Uuid::from_bytes(r.get::<_, [u8; 16]>(i)?))
}

fn json_col<T: DeserializeOwned>(r: &Row, i: usize) -> rusqlite::Result<T> {
    serde_json::from_str(r.get_ref(i)?.as_str()?).map_err(|e| conversion(i, e))
}

fn opt_json_col<T: DeserializeOwned>(r: &Row, i: usize) -> rusqlite::Result<Option<T>> {
    match r.get_ref(i)? {
        ValueRef::Null => Ok(None),
        v => serde_json::from_str(v.as_str()?)
            .map(Some)
            .map_err(|e| conversion(i, e)),
    }
}

fn parse_col<T: std::str::FromStr<Err = Error>>(r: &Row, i: usize) -> rusqlite::Result<T> {
    r.get_ref(i)?
        .as_str()?
        .parse()
        .map_err(|e| conversion(i, e))
}

macro_rules! task_cols {
    () => {
        "id, handler, input, state, result, error, headers, priority, idempotency_key, response_event, \
         parent_task_id, parent_step_id, parent_group, parent_index, created_at, updated_at"
    };
}

fn task_row(r: &Row) -> rusqlite::Result<TaskRecord> {
    let parent = match r.get::<_, Option<[u8; 16]>>(10)? {
        Some(parent_task) => Some(ParentRef {
            task_id: TaskId(Uuid::from_bytes(parent_task)),
            step_id: StepId(uuid_col(r, 11)?),
            group: r.get(12)?,
            index: r.get::<_, Option<u32>>(13)?.unwrap_or(0),
        }),
        None => None,
    };
    Ok(TaskRecord {
        id: TaskId(uuid_col(r, 0)?),
        handler: r.get(1)?,
        input: json_col(r, 2)?,
        state: parse_col(r, 3)?,
        result: opt_json_col(r, 4)?,
        error: opt_json_col(r, 5)?,
        headers: opt_json_col(r, 6)?.unwrap_or_default(),
        priority: r.get(7)?,
        idempotency_key: r.get(8)?,
        response_event: r.get(9)?,
        parent,
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
    })
}

macro_rules! step_cols {
    () => {
        "id, task_id, name, handler, input, state, attempt, priority, run_at, lease_owner, lease_expires_at, \
         result, error, depends_on, wait, created_at, updated_at, run, status, routes"
    };
}

fn step_row(r: &Row) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        id: StepId(uuid_col(r, 0)?),
        task_id: TaskId(uuid_col(r, 1)?),
        name: r.get(2)?,
        handler: r.get(3)?,
        input: json_col(r, 4)?,
        state: parse_col(r, 5)?,
        attempt: r.get(6)?,
        priority: r.get(7)?,
        run_at: r.get(8)?,
        lease_owner: r.get(9)?,
        lease_expires_at: r.get(10)?,
        result: opt_json_col(r, 11)?,
        error: opt_json_col(r, 12)?,
        depends_on: opt_json_col(r, 13)?.unwrap_or_default(),
        wait: opt_json_col(r, 14)?,
        created_at: r.get(15)?,
        updated_at: r.get(16)?,
        run: r.get::<_, i64>(17)? as u64,
        status: r.get(18)?,
        routes: opt_json_col(r, 19)?.unwrap_or_default(),
    })
}

fn event_row(r: &Row) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        name: r.get(0)?,
        payload: json_col(r, 1)?,
        created_at: r.get(2)?,
    })
}

// ---------------------------------------------------------------------------
// Connections and migrations
// ---------------------------------------------------------------------------

/// How hard a commit works to be durable (`PRAGMA synchronous`), chosen
/// with `?synchronous=` in the store URL (case-insensitive).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Synchronous {
    /// Commits are synced at checkpoints only (WAL): faster, but the last
    /// acknowledged commits can be lost on power loss or an OS crash.
    Normal,
    /// Every commit is synced before it is acknowledged (the default).
    #[default]
    Full,
    /// As `Full`, and the directory is synced too when a journal is deleted.
    Extra,
}

impl Synchronous {
    /// The URL (and pragma) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Full => "full",
            Self::Extra => "extra",
        }
    }
}

impl std::str::FromStr for Synchronous {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "full" => Ok(Self::Full),
            "extra" => Ok(Self::Extra),
            _ => Err(Error::Config(format!(
                "store URL parameter `synchronous`: unknown value `{s}` (expected full, normal or extra)"
            ))),
        }
    }
}

/// [`crate::check_url`] for SQLite (`spec` follows `sqlite:` in `url`): a
/// path, known parameters, and a directory that exists (a missing file is
/// created at open, a missing directory is not).
pub(crate) fn check_spec(url: &str, spec: &str) -> Result<()> {
    if spec.is_empty() {
        return Err(Error::Config(format!(
            "store URL `{}` names no file (use sqlite:PATH)",
            switchyard_core::redact_url(url)
        )));
    }
    let (path, _) = parse_path(spec)?;
    if path == ":memory:" || path.starts_with("file:") {
        return Ok(());
    }
    let dir = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "store URL `{}`: directory `{}` does not exist",
                switchyard_core::redact_url(url),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Splits `PATH?synchronous=...` (what follows `sqlite:`) into the path and
/// its settings. Only `synchronous` is known; any other parameter is an error.
fn parse_path(spec: &str) -> Result<(&str, Synchronous)> {
    let Some((path, query)) = spec.split_once('?') else {
        return Ok((spec, Synchronous::default()));
    };
    let mut synchronous = Synchronous::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "synchronous" => synchronous = v.parse()?,
            _ => {
                return Err(Error::Config(format!(
                    "store URL parameter `{k}` is not known to the SQLite store (it accepts synchronous=full|normal|extra)"
                )))
            }
        }
    }
    Ok((path, synchronous))
}

fn configure(conn: &Connection, writer: bool, sync: Synchronous) -> rusqlite::Result<()> {
    // The busy timeout must be set first: switching to WAL needs a lock
    // another process may be holding.
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if writer {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
            tracing::warn!(mode, "sqlite: could not switch the database to WAL mode");
        }
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -32768;",
        sync.as_str()
    ))?;
    if !writer {
        conn.execute_batch("PRAGMA query_only = ON;")?;
    }
    Ok(())
}

fn open_connection(path: &Path, writer: bool, sync: Synchronous) -> Result<Connection> {
    let conn = Connection::open(path)
        .and_then(|c| configure(&c, writer, sync).map(|()| c))
        .map_err(|e| {
            Error::Config(format!(
                "cannot open SQLite database `{}`: {e}",
                path.display()
            ))
        })?;
    Ok(conn)
}

/// The writer connection on a file that must exist already: opened without
/// SQLite's create flag, so a missing file is reported, never created.
fn open_existing(path: &Path, sync: Synchronous) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    match Connection::open_with_flags(path, flags) {
        Ok(c) => {
            configure(&c, true, sync).map_err(|e| {
                Error::Config(format!(
                    "cannot open SQLite database `{}`: {e}",
                    path.display()
                ))
            })?;
            Ok(c)
        }
        Err(_) if !path.exists() => Err(Error::NotFound(format!(
            "SQLite database file `{}` does not exist",
            path.display()
        ))),
        Err(e) => Err(Error::Config(format!(
            "cannot open SQLite database `{}`: {e}",
            path.display()
        ))),
    }
}

fn apply_migrations(conn: &Connection, now: Millis) -> DbResult<u32> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let current: u32 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let latest = MIGRATIONS.len() as u32;
    if current > latest {
        return Err(Fail::App(Error::Config(format!(
            "the database schema is at version {current}, newer than this build supports ({latest}); upgrade switchyard"
        ))));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        conn.execute_batch(sql)?;
        if i + 1 == KEYS_VERSION {
            upgrade_checkpoint_keys(conn)?;
        }
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![i as u32 + 1, now],
        )?;
    }
    Ok(latest)
}

/// Migrates outside the writer (at open). `BEGIN IMMEDIATE` around the check
/// and the apply makes two processes opening a new file at once safe: the
/// second waits, then finds nothing to do.
fn migrate_now(conn: &Connection, now: Millis) -> DbResult<u32> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match apply_migrations(conn, now)
        .and_then(|v| conn.execute_batch("COMMIT").map(|()| v).map_err(Fail::from))
    {
        Ok(v) => Ok(v),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// A file path made absolute and free of symlinks, also for a file that does
/// not exist yet, so that two spellings of one file share one store.
fn canonical_path(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if p.is_dir() {
        return Err(Error::Config(format!(
            "SQLite store path `{path}` is a directory, not a database file"
        )));
    }
    if p.exists() {
        return std::fs::canonicalize(p)
            .map_err(|e| Error::Config(format!("SQLite store path `{path}`: {e}")));
    }
    let name = p
        .file_name()
        .ok_or_else(|| Error::Config(format!("SQLite store path `{path}` names no file")))?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(parent).map_err(|e| {
        Error::Config(format!(
            "SQLite store path `{path}`: directory `{}` is not usable: {e}",
            parent.display()
        ))
    })?;
    Ok(dir.join(name))
}

fn is_memory(path: &str) -> bool {
    matches!(path.trim(), ":memory:" | "sqlite::memory:")
}

/// The stores open in this process, by (process, canonical path): keyed by
/// process too, since a forked child inherits the parent's entries, whose
/// stores it cannot use, and opens its own. A B-tree: its nodes are
/// reachable from their start, so leak checkers (valgrind, for the C ABI)
/// do not call the registry "possibly lost" at exit.
type Registry = Mutex<BTreeMap<(u32, PathBuf), Weak<SqliteStore>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

// ---------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------

/// What a committed command announces.
#[derive(Default)]
struct Effects {
    ready: bool,
    finished: bool,
    cancelled: Vec<StepId>,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.ready |= other.ready;
        self.finished |= other.finished;
        self.cancelled.extend(other.cancelled);
    }

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

/// Sends a command's answer; called with the commit's outcome.
type Finisher = Box<dyn FnOnce(Result<()>) + Send>;

/// A unit of work for the writer thread.
trait Command: Send {
    /// Runs inside the batch transaction; says whether to keep the changes,
    /// and returns the reply to send once the transaction's fate is known.
    fn run(self: Box<Self>, conn: &Connection, now: Millis, fx: &mut Effects) -> (bool, Finisher);
    /// Answers without running (the transaction could not start).
    fn fail(self: Box<Self>, error: Error);
}

struct Op<T, F> {
    op: &'static str,
    f: F,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Command for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, Millis, &mut Effects) -> DbResult<T> + Send,
{
    fn run(self: Box<Self>, conn: &Connection, now: Millis, fx: &mut Effects) -> (bool, Finisher) {
        let Op { op, f, reply } = *self;
        let result = f(conn, now, fx).map_err(|e| e.into_error(op));
        let keep = result.is_ok();
        (
            keep,
            Box::new(move |commit: Result<()>| {
                let _ = reply.send(commit.and(result));
            }),
        )
    }

    fn fail(self: Box<Self>, error: Error) {
        let _ = self.reply.send(Err(error));
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// How often the checkpointer copies committed WAL pages into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// When the WAL is due for a restart, the checkpointer copies until fewer
/// than this many frames are left for the writer's restart to copy.
const RESTART_LEFTOVER: i64 = 256;

/// What the writer and the checkpoint thread share about the WAL.
struct WalShared {
    /// Frames in the WAL after the writer's last commit, set by SQLite's
    /// WAL hook ([`wal_frames`]).
    frames: AtomicU32,
    /// The WAL is due for a restart once it holds more frames than this
    /// (half of the size limit).
    restart_at: u32,
    /// The writer restarts without waiting for [`WalShared::ready`] past
    /// this (three quarters of the size limit).
    force_at: u32,
    /// Set by the checkpointer when it has copied nearly all of a WAL that
    /// is due for a restart, so that the restart has little left to copy
    /// (the writer holds everyone up while it restarts).
    ready: AtomicBool,
    /// Held while checkpointing: SQLite lets one checkpoint run at a time
    /// and fails any other at once.
    turn: Mutex<()>,
}

impl WalShared {
    fn new(conn: &Connection, limit: u64) -> rusqlite::Result<Self> {
        let page: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        // A frame is a page plus its 24-byte header.
        let frames = |bytes: u64| (bytes / (page + 24)).clamp(1, u64::from(u32::MAX)) as u32;
        Ok(Self {
            frames: AtomicU32::new(0),
            restart_at: frames(limit / 2),
            force_at: frames(limit / 4 * 3),
            ready: AtomicBool::new(false),
            turn: Mutex::new(()),
        })
    }

    fn due(&self) -> bool {
        self.frames.load(Ordering::Relaxed) > self.restart_at
    }
}

/// Passive checkpoints (they never block the writer or readers) until the
/// store closes, then a last one. When the WAL is due for a restart (see
/// [`WalBound`]), it keeps copying until little is left and tells the
/// writer so.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>, wal: Arc<WalShared>) {
    // Frames in the WAL and frames copied back, as the checkpoint left them.
    let pass = || -> Option<(i64, i64)> {
        let _turn = wal.turn.lock();
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .map_err(|e| tracing::debug!(error = %e, "sqlite: checkpoint skipped"))
        .ok()
    };
    let checkpoint = || {
        let mut left = pass();
        if wal.due() {
            for _ in 0..8 {
                match left {
                    Some((log, copied)) if log - copied > RESTART_LEFTOVER => left = pass(),
                    _ => break,
                }
            }
            wal.ready.store(true, Ordering::Relaxed);
        }
    };
    loop {
        match stop.recv_timeout(CHECKPOINT_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => checkpoint(),
            _ => {
                checkpoint();
                return;
            }
        }
    }
}

/// Keeps the `-wal` file of a file database bounded (see the module docs):
/// checked by the writer between two transactions.
struct WalBound {
    /// The WAL hook holds a pointer to `shared.frames` until
    /// [`WalBound::detach`].
    shared: Arc<WalShared>,
    /// No attempt before this (after one that readers kept from finishing).
    retry_at: Option<std::time::Instant>,
    /// Held (shared) by this store's reads ([`ReadPool::gate`]).
    gate: Arc<RwLock<()>>,
}

/// SQLite's WAL hook: called after each commit of the writer with the
/// number of frames in the WAL.
extern "C" fn wal_frames(
    frames: *mut std::ffi::c_void,
    _db: *mut rusqlite::ffi::sqlite3,
    _schema: *const std::ffi::c_char,
    count: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: `frames` is the `AtomicU32` registered by `WalBound::attach`,
    // which outlives the registration (it is detached before being dropped).
    let frames = unsafe { &*(frames as *const AtomicU32) };
    frames.store(count.max(0) as u32, Ordering::Relaxed);
    rusqlite::ffi::SQLITE_OK
}

impl WalBound {
    /// Bounds the WAL of the writer's connection `conn`.
    fn attach(conn: &Connection, shared: Arc<WalShared>, gate: Arc<RwLock<()>>) -> Self {
        // SAFETY: the pointer stays valid until `detach` unregisters it
        // (`shared` is held by `self`, which `detach` consumes).
        unsafe {
            rusqlite::ffi::sqlite3_wal_hook(
                conn.handle(),
                Some(wal_frames),
                &shared.frames as *const AtomicU32 as *mut std::ffi::c_void,
            );
        }
        Self {
            shared,
            retry_at: None,
            gate,
        }
    }

    /// Unregisters the WAL hook; called before `self` or `conn` goes.
    fn detach(self, conn: &Connection) {
        // SAFETY: removes the hook installed by `attach` on this connection.
        unsafe {
            rusqlite::ffi::sqlite3_wal_hook(conn.handle(), None, std::ptr::null_mut());
        }
        drop(self);
    }

    fn check(&mut self, conn: &Connection) {
        let shared = &*self.shared;
        let frames = shared.frames.load(Ordering::Relaxed);
        if frames <= shared.restart_at {
            return;
        }
        // Wait for the checkpointer to have copied nearly everything,
        // unless the WAL is nearing its limit.
        if frames <= shared.force_at && !shared.ready.swap(false, Ordering::Relaxed) {
            return;
        }
        if self.retry_at.is_some_and(|t| std::time::Instant::now() < t) {
            return;
        }
        // Blocks this process's writes (we are the writer) and reads (the
        // gate: a stream of overlapping reads would keep the WAL in use
        // forever), and waits, for a bounded time, for readers still using
        // the WAL (other processes' ones too).
        let Some(_readers) = self.gate.try_write_for(WAL_TRUNCATE_PATIENCE) else {
            self.retry_at = Some(std::time::Instant::now() + WAL_TRUNCATE_RETRY);
            return;
        };
        let _turn = shared.turn.lock();
        let _ = conn.busy_timeout(WAL_TRUNCATE_PATIENCE);
        let outcome = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
        let _ = conn.busy_timeout(BUSY_TIMEOUT);
        match outcome {
            Ok(0) => {
                // The next commit writes from the WAL's start (and reports
                // its new length through the hook).
                shared.frames.store(0, Ordering::Relaxed);
                shared.ready.store(false, Ordering::Relaxed);
                self.retry_at = None;
            }
            Ok(_) => {
                tracing::debug!(
                    "sqlite: readers kept the WAL from being restarted; trying again later"
                );
                self.retry_at = Some(std::time::Instant::now() + WAL_TRUNCATE_RETRY);
            }
            Err(e) => {
                tracing::warn!(error = %e, "sqlite: restarting the WAL failed; trying again later");
                self.retry_at = Some(std::time::Instant::now() + WAL_TRUNCATE_RETRY);
            }
        }
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn Command>>,
    clock: Arc<dyn Clock>,
    signals: Arc<Signals>,
    mut wal: Option<WalBound>,
) {
    let mut batch: Vec<Box<dyn Command>> = Vec::with_capacity(WRITE_BATCH_CAP);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < WRITE_BATCH_CAP {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        run_batch(&conn, &mut batch, clock.as_ref(), &signals);
        if let Some(wal) = &mut wal {
            wal.check(&conn);
        }
    }
    if let Some(wal) = wal {
        wal.detach(&conn);
    }
}

/// Applies `batch` in one transaction (a new one is begun if SQLite aborts
/// the current one), then answers every command.
///
/// Each command runs in a savepoint, so a failing command leaves the others'
/// changes in place. A savepoint makes SQLite copy every page the command
/// touches into its sub-journal, so a command alone in its batch (the usual
/// case: the writer's commands are themselves batches) runs without one and
/// a failure rolls back the whole transaction instead.
fn run_batch(
    conn: &Connection,
    batch: &mut Vec<Box<dyn Command>>,
    clock: &dyn Clock,
    signals: &Signals,
) {
    let alone = batch.len() == 1;
    let mut pending: Vec<Finisher> = Vec::with_capacity(batch.len());
    let mut fx = Effects::default();
    let mut open = false;
    let mut cmds = batch.drain(..);
    while let Some(cmd) = cmds.next() {
        abort_check(conn, &mut open, &mut pending, &mut fx);
        if !open {
            if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
                let err = Error::Store(format!("sqlite: cannot begin a write transaction: {e}"));
                cmd.fail(err.clone());
                cmds.for_each(|c| c.fail(err.clone()));
                return;
            }
            open = true;
        }
        if !alone {
            if let Err(e) = exec(conn, "SAVEPOINT cmd") {
                cmd.fail(Error::Store(format!(
                    "sqlite: cannot open a savepoint: {e}"
                )));
                continue;
            }
        }
        // Undoes the command's changes: its savepoint, or the transaction.
        let undo = |open: &mut bool| {
            if alone {
                let _ = exec(conn, "ROLLBACK");
                *open = false;
            } else {
                rollback_savepoint(conn);
            }
        };
        let mut own = Effects::default();
        match catch_unwind(AssertUnwindSafe(|| cmd.run(conn, clock.now(), &mut own))) {
            Ok((true, fin)) => match if alone {
                Ok(())
            } else {
                exec(conn, "RELEASE cmd")
            } {
                Ok(()) => {
                    fx.merge(own);
                    pending.push(fin);
                }
                Err(e) => {
                    undo(&mut open);
                    fin(Err(Error::Store(format!(
                        "sqlite: cannot release a savepoint: {e}"
                    ))));
                }
            },
            Ok((false, fin)) => {
                undo(&mut open);
                // The command's own error is its answer; nothing was kept.
                if alone {
                    fin(Ok(()));
                } else {
                    pending.push(fin);
                }
            }
            Err(_) => {
                // The reply sender was dropped with the command: its caller
                // gets "stopped before answering".
                tracing::error!("sqlite writer: a command panicked; its changes were rolled back");
                undo(&mut open);
            }
        }
    }
    abort_check(conn, &mut open, &mut pending, &mut fx);
    if !open {
        return;
    }
    match exec(conn, "COMMIT") {
        Ok(()) => {
            pending.into_iter().for_each(|fin| fin(Ok(())));
            fx.fire(signals);
        }
        Err(e) => {
            let _ = exec(conn, "ROLLBACK");
            let err = Error::Store(format!("sqlite: commit failed: {e}"));
            pending.into_iter().for_each(|fin| fin(Err(err.clone())));
        }
    }
}

/// SQLite may abort the whole transaction on its own (I/O error, disk
/// full, ...): the commands already run in it are lost and must say so.
fn abort_check(conn: &Connection, open: &mut bool, pending: &mut Vec<Finisher>, fx: &mut Effects) {
    if *open && conn.is_autocommit() {
        *open = false;
        let err =
            Error::Store("sqlite: the write transaction was rolled back by the database".into());
        pending.drain(..).for_each(|fin| fin(Err(err.clone())));
        *fx = Effects::default();
    }
}

fn rollback_savepoint(conn: &Connection) {
    let _ = exec(conn, "ROLLBACK TO cmd");
    let _ = exec(conn, "RELEASE cmd");
}

// ---------------------------------------------------------------------------
// Read pool
// ---------------------------------------------------------------------------

struct ReadPool {
    path: PathBuf,
    synchronous: Synchronous,
    /// Held (shared) during each read; the writer takes it exclusively to
    /// truncate the WAL ([`WalBound`]).
    gate: Arc<RwLock<()>>,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn run<T>(&self, f: impl FnOnce(&Connection) -> DbResult<T>) -> DbResult<T> {
        let popped = self.idle.lock().pop();
        let conn = match popped {
            Some(c) => c,
            None => open_connection(&self.path, false, self.synchronous)?,
        };
        // One snapshot for reads that take several statements.
        let gate = self.gate.read();
        let result = conn
            .unchecked_transaction()
            .map_err(Fail::from)
            .and_then(|tx| f(&tx));
        drop(gate);
        let mut idle = self.idle.lock();
        if idle.len() < READ_POOL_SIZE {
            idle.push(conn);
        }
        result
    }
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

/// The SQLite store (see the module docs).
pub struct SqliteStore {
    url: String,
    synchronous: Synchronous,
    clock: Arc<dyn Clock>,
    signals: Arc<Signals>,
    sender: Option<mpsc::Sender<Box<dyn Command>>>,
    writer: Option<JoinHandle<()>>,
    /// `None` for `:memory:` (reads then go through the writer).
    readers: Option<Arc<ReadPool>>,
    /// Dropping it stops the checkpointer (after a last checkpoint).
    checkpointer: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// The process that opened it: its threads exist only there, so a
    /// forked child may not use it (see [`SqliteStore::owned`]).
    owner: u32,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, or a private
    /// in-memory database for `:memory:`. Runs pending migrations when
    /// `options.migrate` is set.
    ///
    /// While a store for the same file is alive in this process, that store
    /// is returned (and `options` are ignored), so everything in the process
    /// shares one writer and one set of [`Signals`].
    pub async fn open(path: &str, options: StoreOptions) -> Result<Arc<SqliteStore>> {
        let (path, synchronous) = parse_path(path)?;
        if is_memory(path) {
            return Self::open_unshared_with(path, synchronous, options).await;
        }
        let path = path.to_owned();
        blocking(move || {
            let canonical = canonical_path(&path)?;
            let key = (std::process::id(), canonical.clone());
            let mut reg = registry().lock();
            if let Some(store) = reg.get(&key).and_then(Weak::upgrade) {
                if store.synchronous != synchronous {
                    tracing::warn!(
                        url = %store.url,
                        asked = synchronous.as_str(),
                        "sqlite: the file is already open in this process; its synchronous mode stays"
                    );
                }
                return Ok(store);
            }
            reg.retain(|_, w| w.strong_count() > 0);
            let store = Arc::new(Self::open_blocking(
                Some(canonical.clone()),
                options,
                synchronous,
                WAL_SIZE_LIMIT,
            )?);
            reg.insert(key, Arc::downgrade(&store));
            Ok(store)
        })
        .await
    }

    /// Opens a store that is not shared through the process registry: a
    /// second writer on the same file, as another process would have. For
    /// tests of multi-process behaviour.
    #[doc(hidden)]
    pub async fn open_unshared(path: &str, options: StoreOptions) -> Result<Arc<SqliteStore>> {
        let (path, synchronous) = parse_path(path)?;
        Self::open_unshared_with(path, synchronous, options).await
    }

    async fn open_unshared_with(
        path: &str,
        synchronous: Synchronous,
        options: StoreOptions,
    ) -> Result<Arc<SqliteStore>> {
        let path = path.to_owned();
        blocking(move || {
            let file = if is_memory(&path) {
                None
            } else {
                Some(canonical_path(&path)?)
            };
            Ok(Arc::new(Self::open_blocking(
                file,
                options,
                synchronous,
                WAL_SIZE_LIMIT,
            )?))
        })
        .await
    }

    /// The synchronous mode its connections run with.
    pub fn synchronous(&self) -> Synchronous {
        self.synchronous
    }

    fn open_blocking(
        file: Option<PathBuf>,
        options: StoreOptions,
        synchronous: Synchronous,
        wal_limit: u64,
    ) -> Result<SqliteStore> {
        let (conn, url) = match &file {
            Some(p) => (
                if options.create {
                    open_connection(p, true, synchronous)?
                } else {
                    open_existing(p, synchronous)?
                },
                format!(
                    "sqlite:{}?synchronous={}",
                    p.display(),
                    synchronous.as_str()
                ),
            ),
            None => {
                let conn = Connection::open_in_memory()
                    .and_then(|c| configure(&c, true, synchronous).map(|()| c))
                    .map_err(|e| {
                        Error::Store(format!("sqlite: cannot open an in-memory database: {e}"))
                    })?;
                (conn, "sqlite::memory:".to_owned())
            }
        };
        if options.migrate {
            migrate_now(&conn, options.clock.now()).map_err(|e| match e {
                Fail::Sql(e) => Error::Store(format!("sqlite: migrating `{url}` failed: {e}")),
                Fail::App(e) => e,
            })?;
        }
        // WAL checkpoints run on their own thread and connection, so the
        // writer (the one serial part) never stalls copying pages back.
        let (checkpointer, wal) = match &file {
            Some(path) => {
                let configured = conn
                    .execute_batch(&format!(
                        "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {};",
                        wal_limit / 2
                    ))
                    .and_then(|()| WalShared::new(&conn, wal_limit));
                let shared = Arc::new(
                    configured
                        .map_err(|e| Error::Store(format!("sqlite: configuring `{url}`: {e}")))?,
                );
                let ck = open_connection(path, true, synchronous)?;
                let (stop, wait) = mpsc::channel::<()>();
                let handle = {
                    let shared = shared.clone();
                    std::thread::Builder::new()
                        .name("switchyard-sqlite-checkpoint".into())
                        .spawn(move || checkpoint_loop(ck, wait, shared))
                        .map_err(|e| {
                            Error::Store(format!("sqlite: cannot start the checkpoint thread: {e}"))
                        })?
                };
                (Some((stop, handle)), Some(shared))
            }
            None => (None, None),
        };
        let gate = Arc::new(RwLock::new(()));
        let wal = wal.map(|shared| WalBound::attach(&conn, shared, gate.clone()));
        let readers = match file {
            Some(path) => {
                // Open one reader now so a bad file fails here, not on first read.
                let first = open_connection(&path, false, synchronous)?;
                Some(Arc::new(ReadPool {
                    path,
                    synchronous,
                    gate,
                    idle: Mutex::new(vec![first]),
                }))
            }
            None => None,
        };
        let signals = Signals::new();
        let (sender, rx) = mpsc::channel();
        let writer = {
            let (clock, signals) = (options.clock.clone(), signals.clone());
            std::thread::Builder::new()
                .name("switchyard-sqlite-writer".into())
                .spawn(move || writer_loop(conn, rx, clock, signals, wal))
                .map_err(|e| Error::Store(format!("sqlite: cannot start the writer thread: {e}")))?
        };
        Ok(SqliteStore {
            url,
            synchronous,
            clock: options.clock,
            signals,
            sender: Some(sender),
            writer: Some(writer),
            readers,
            checkpointer,
            owner: std::process::id(),
        })
    }

    /// Refuses use from a forked child: the store's writer, reader and
    /// checkpoint threads exist only in the process that opened it (a call
    /// from the child would wait forever for them).
    fn owned(&self, op: &str) -> Result<()> {
        let here = std::process::id();
        if here == self.owner {
            return Ok(());
        }
        Err(Error::Config(format!(
            "sqlite {op}: this store was opened in process {} and cannot be used in a forked child ({here}); open stores, clients and workers after fork, in the child",
            self.owner
        )))
    }

    /// Runs `f` on the writer thread, inside the group-commit transaction;
    /// answers after the commit.
    async fn write<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Millis, &mut Effects) -> DbResult<T> + Send + 'static,
    {
        self.owned(op)?;
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.as_ref().ok_or(Error::Shutdown)?;
        sender
            .send(Box::new(Op { op, f, reply }))
            .map_err(|_| Error::Store(format!("sqlite {op}: the writer thread has stopped")))?;
        answer.await.map_err(|_| {
            Error::Store(format!("sqlite {op}: the writer stopped before answering"))
        })?
    }

    /// Runs `f` on a read connection (one snapshot).
    async fn read<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> DbResult<T> + Send + 'static,
    {
        self.owned(op)?;
        match &self.readers {
            None => self.write(op, move |conn, _, _| f(conn)).await,
            Some(pool) => {
                let pool = pool.clone();
                blocking(move || pool.run(f).map_err(|e| e.into_error(op))).await
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            // A forked child's copy: the threads to stop and join exist only
            // in the parent (joining would wait forever); the connections'
            // locks belong to the parent too. Leave it all alone.
            std::mem::forget(self.sender.take());
            std::mem::forget(self.writer.take());
            std::mem::forget(self.readers.take());
            std::mem::forget(self.checkpointer.take());
            return;
        }
        // Closing the channel ends the writer after its current batch; joining
        // makes "dropped" mean "closed", so a reopen sees everything.
        drop(self.sender.take());
        if let Some(writer) = self.writer.take() {
            if writer.thread().id() != std::thread::current().id() {
                let _ = writer.join();
            }
        }
        if let Some((stop, handle)) = self.checkpointer.take() {
            drop(stop);
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(format!("sqlite: blocking task failed: {e}")))?
}

// ---------------------------------------------------------------------------
// Prepared inputs (JSON encoded before reaching the writer)
// ---------------------------------------------------------------------------

/// A claimed step before its JSON is decoded (outside the writer).
struct RawClaim {
    step_id: Uuid,
    task_id: Uuid,
    name: String,
    handler: String,
    input: String,
    headers: Option<String>,
    attempt: u32,
    run: i64,
    priority: i32,
    run_at: Millis,
    seq: i64,
    has_dependencies: bool,
    routes: Option<String>,
}

// ---------------------------------------------------------------------------
// Statements of the write path (named so that a test can check their plans)
// ---------------------------------------------------------------------------

/// The lease a completion or checkpoint carries must be the current one.
macro_rules! lease_guard {
    () => {
        " WHERE id = ?1 AND task_id = ?2 AND state = 'running' AND lease_owner = ?3 AND run = ?4"
    };
}

const LEASE_CHECK: &str = concat!("SELECT name FROM steps", lease_guard!());
const SETTLE_RETRY: &str = concat!(
    "UPDATE steps SET state = 'ready', run_at = ?6, error = ?7, lease_owner = NULL, lease_expires_at = NULL, \
     updated_at = ?5",
    lease_guard!()
);
const SETTLE_FAILED: &str = concat!(
    "UPDATE steps SET state = 'failed', error = ?6, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5",
    lease_guard!()
);
const SETTLE_SUSPENDED: &str = concat!(
    "UPDATE steps SET state = ?6, run_at = ?7, wait = ?8, wait_event = ?9, wait_group = ?10, lease_owner = NULL, \
     lease_expires_at = NULL, attempt = max(attempt - 1, 0), updated_at = ?5",
    lease_guard!()
);
const SETTLE_RELEASED: &str = concat!(
    "UPDATE steps SET state = 'ready', run_at = ?5, attempt = max(attempt - 1, 0), lease_owner = NULL, \
     lease_expires_at = NULL, updated_at = ?5",
    lease_guard!()
);
/// No `RETURNING`: SQLite gathers returned rows in a temporary table first,
/// which cost more than the update itself here.
const SETTLE_COMPLETED: &str = concat!(
    "UPDATE steps SET state = 'completed', result = ?6, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5",
    lease_guard!()
);
/// A task with nothing else to do when its final step completes (no
/// dependants, no response event, no parent group) finishes in the same
/// breath; anything else goes the long way through [`TASK_META`].
const FINISH_SIMPLE_TASK: &str = "UPDATE tasks SET state = 'completed', result = ?3, updated_at = ?4 \
     WHERE id = ?1 AND state = 'running' AND has_deps = 0 AND response_event IS NULL AND parent_group IS NULL \
       AND final_step = (SELECT name FROM steps WHERE id = ?2)";
/// [`SETTLE_COMPLETED`] and [`FINISH_SIMPLE_TASK`] for a step whose row ids
/// the writer remembers from its spawn ([`RowIds`]): rowid lookups instead of
/// descents of the `id` indexes. The ids are still compared, so a stale memo
/// (a rolled-back spawn, a rowid reused after retention) matches nothing and
/// the caller takes the long way.
const SETTLE_COMPLETED_AT: &str = concat!(
    "UPDATE steps SET state = 'completed', result = ?6, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5",
    lease_guard!(),
    " AND seq = ?7"
);
const FINISH_SIMPLE_TASK_AT: &str = "UPDATE tasks SET state = 'completed', result = ?3, updated_at = ?4 \
     WHERE seq = ?5 AND id = ?1 AND state = 'running' AND has_deps = 0 AND response_event IS NULL \
       AND parent_group IS NULL AND final_step = (SELECT name FROM steps WHERE seq = ?6 AND id = ?2)";
const STEP_NAME: &str = "SELECT name FROM steps WHERE id = ?1";
const EXTEND_CHECKPOINT_LEASE: &str =
    concat!("UPDATE steps SET lease_expires_at = ?5", lease_guard!());
const EVENT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM events WHERE name = ?1)";
const GROUP_RUNNING: &str =
    "SELECT EXISTS (SELECT 1 FROM tasks WHERE parent_group = ?1 AND state = 'running')";
const RUNNING_STEPS_OF_TASK: &str = "SELECT id FROM steps WHERE task_id = ?1 AND state = 'running'";
const STEP_STATE_BY_NAME: &str = "SELECT state FROM steps WHERE task_id = ?1 AND name = ?2";
const FIND_IDEMPOTENT: &str = "SELECT id FROM tasks WHERE idempotency_key = ?1";
const PROMOTE: &str = "UPDATE steps SET state = 'ready', wait = NULL, wait_event = NULL, wait_group = NULL, updated_at = ?1 \
             WHERE state = 'suspended' AND run_at IS NOT NULL AND run_at <= ?1";
const NEXT_PRIORITY: &str =
    "SELECT priority FROM steps WHERE state = 'ready' AND handler = ?1 AND priority < ?2 \
         ORDER BY priority DESC LIMIT 1";
const NEXT_READY: &str = "SELECT run_at FROM steps WHERE state = 'ready' AND handler = ?1 AND priority = ?2 AND run_at > ?3 \
         ORDER BY run_at LIMIT 1";
const NEXT_WAKE: &str =
    "SELECT run_at FROM steps WHERE state = 'suspended' AND run_at IS NOT NULL AND handler = ?1 \
         ORDER BY run_at LIMIT 1";
const TASK_META: &str = "SELECT state, final_step, has_deps, response_event, parent_group, parent_step_id FROM tasks WHERE id = ?1";
const UNBLOCK: &str = "UPDATE steps SET pending_deps = pending_deps - 1, \
             state = CASE WHEN pending_deps <= 1 THEN 'ready' ELSE 'blocked' END, \
             run_at = CASE WHEN pending_deps <= 1 THEN ?3 ELSE NULL END, updated_at = ?3 \
         WHERE state = 'blocked' AND seq IN (SELECT step_seq FROM step_deps WHERE task_id = ?1 AND dep_name = ?2) \
         RETURNING state = 'ready'";
const CANCEL_STEPS: &str = "UPDATE steps SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, wait = NULL, \
         wait_event = NULL, wait_group = NULL, updated_at = ?2 \
         WHERE task_id = ?1 AND state IN ('blocked', 'ready', 'running', 'suspended')";
const FINISH_TASK: &str = "UPDATE tasks SET state = ?2, result = ?3, error = ?4, updated_at = ?5 WHERE id = ?1 AND state = 'running'";
const WAKE_GROUP_PARENT: &str = "UPDATE steps SET state = 'ready', run_at = ?3, wait = NULL, wait_event = NULL, \
                     wait_group = NULL, updated_at = ?3 WHERE id = ?1 AND state = 'suspended' AND wait_group = ?2";
const INSERT_EVENT: &str = "INSERT INTO events (name, payload, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING";
const WAKE_EVENT_WAITERS: &str = "UPDATE steps SET state = 'ready', run_at = ?2, wait = NULL, wait_event = NULL, wait_group = NULL, \
             updated_at = ?2 WHERE state = 'suspended' AND wait_event = ?1";
const RESET_STEP: &str = "UPDATE steps SET state = ?2, attempt = 0, run_at = ?3, pending_deps = ?4, lease_owner = NULL, \
         lease_expires_at = NULL, wait = NULL, wait_event = NULL, wait_group = NULL, updated_at = ?5 WHERE seq = ?1";
const UPSERT_HOST: &str = "INSERT INTO hosts (id, pid, hostname, handlers, started_at, last_heartbeat, name, language, slots) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, hostname = excluded.hostname, name = excluded.name, \
         handlers = excluded.handlers, started_at = excluded.started_at, last_heartbeat = excluded.last_heartbeat, \
         language = excluded.language, slots = excluded.slots, ended_at = NULL, end_reason = NULL";
/// Ends host `?1`'s registration at `?2` for reason `?3`.
const END_HOST: &str =
    "UPDATE hosts SET ended_at = ?2, end_reason = ?3 WHERE id = ?1 AND ended_at IS NULL";
/// Deletes the registrations that ended before `?1`.
const FORGET_ENDED_HOSTS: &str = "DELETE FROM hosts WHERE ended_at < ?1";
/// The columns [`host_row`] reads.
macro_rules! host_columns {
    () => {
        "id, pid, hostname, handlers, started_at, last_heartbeat, name, language, slots, ended_at, end_reason"
    };
}
const EXTEND_LEASE: &str = "UPDATE steps SET lease_expires_at = ?3 WHERE id = ?1 AND state = 'running' AND lease_owner = ?2 AND run = ?4";
const STEP_STATE: &str = "SELECT state FROM steps WHERE id = ?1";
const UPSERT_CHECKPOINT: &str = "INSERT INTO checkpoints (task_id, key, value, step_id, run, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT (task_id, key) DO UPDATE SET value = excluded.value, step_id = excluded.step_id, \
         run = excluded.run, created_at = excluded.created_at \
         WHERE checkpoints.step_id <> excluded.step_id OR checkpoints.run <= excluded.run";
const RECOVER_EXPIRED: &str = "UPDATE steps SET state = 'ready', run_at = ?1, lease_owner = NULL, lease_expires_at = NULL, \
             updated_at = ?1, error = json_object('kind', 'lease_expired', 'message', \
             'the lease of host ' || coalesce(lease_owner, '?') || ' expired without a heartbeat before the step finished', \
             'attempt', attempt) \
             WHERE state = 'running' AND lease_expires_at <= ?1";

const INSERT_TASK: &str = "INSERT INTO tasks (id, handler, input, state, headers, priority, idempotency_key, \
     response_event, parent_task_id, parent_step_id, parent_group, parent_index, final_step, created_at, updated_at) \
     VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?2, ?12, ?12)";

const INSERT_STEP: &str = "INSERT INTO steps (id, task_id, name, handler, input, headers, state, priority, run_at, \
     depends_on, pending_deps, created_at, updated_at, routes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13)";

/// The ready steps a claim takes, in claim order. Selected first and then
/// updated by [`CLAIM`] (the same rows: nothing else writes in between),
/// because an `UPDATE ... RETURNING` spools its rows into a temporary table.
const CLAIMABLE: &str = "SELECT id, task_id, name, handler, input, headers, attempt + 1, priority, run_at, seq, \
     depends_on IS NOT NULL, run + 1, routes FROM steps WHERE state = 'ready' AND handler = ?1 AND priority = ?2 AND run_at <= ?3 \
     ORDER BY run_at, seq LIMIT ?4";
const CLAIM: &str = "UPDATE steps SET state = 'running', attempt = attempt + 1, run = run + 1, lease_owner = ?1, \
     lease_expires_at = ?2, updated_at = ?3 \
     WHERE seq IN (SELECT seq FROM steps WHERE state = 'ready' AND handler = ?4 AND priority = ?5 AND run_at <= ?3 \
                   ORDER BY run_at, seq LIMIT ?6)";

// ---------------------------------------------------------------------------
// Write transactions (run on the writer thread)
// ---------------------------------------------------------------------------

/// Row ids of the root steps this writer spawned and their tasks, by step
/// id, until the step's completion is recorded: a plain completion then finds
/// both rows by rowid. Each writer thread has its own (one per database);
/// it is only a hint (see [`SETTLE_COMPLETED_AT`]), bounded by forgetting
/// everything when full (steps that never complete here: cancelled, run by
/// another process).
struct RowIds;

/// Most remembered steps (about 40 bytes each).
const ROW_IDS_CAP: usize = 1 << 18;

thread_local! {
    static ROW_IDS: std::cell::RefCell<HashMap<Uuid, (i64, i64)>> =
        std::cell::RefCell::new(HashMap::new());
}

impl RowIds {
    fn remember(step: Uuid, step_seq: i64, task_seq: i64) {
        ROW_IDS.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() >= ROW_IDS_CAP {
                m.clear();
            }
            m.insert(step, (step_seq, task_seq));
        });
    }

    fn take(step: Uuid) -> Option<(i64, i64)> {
        ROW_IDS.with(|m| m.borrow_mut().remove(&step))
    }
}

/// Tasks (and their root steps) per multi-row `INSERT` of a spawn: one
/// statement run (cursors opened on every index, parameters bound, the
/// program started and reset) for this many rows instead of one per row.
const SPAWN_CHUNK: usize = 32;

/// `head` followed by [`SPAWN_CHUNK`] rows of `row`, where `$k` (1-based)
/// names the row's `k`-th of `per_row` parameters; `?1` stays the shared
/// first parameter (the time).
fn chunk_sql(head: &str, row: &str, per_row: usize) -> String {
    let rows: Vec<String> = (0..SPAWN_CHUNK)
        .map(|r| {
            let mut out = String::with_capacity(row.len() + 32);
            let mut rest = row;
            while let Some(at) = rest.find('$') {
                out.push_str(&rest[..at]);
                let digits = rest[at + 1..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(rest.len() - at - 1, |n| n);
                let k: usize = rest[at + 1..at + 1 + digits].parse().expect("$k");
                out.push_str(&format!("?{}", 1 + r * per_row + k));
                rest = &rest[at + 1 + digits..];
            }
            out.push_str(rest);
            out
        })
        .collect();
    format!("{head} VALUES {}", rows.join(", "))
}

/// `INSERT INTO tasks` of [`SPAWN_CHUNK`] tasks without idempotency keys:
/// `?1` is the time, then 10 parameters per task.
fn insert_tasks_chunk() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        chunk_sql(
            "INSERT INTO tasks (id, handler, input, state, headers, priority, idempotency_key, response_event, \
             parent_task_id, parent_step_id, parent_group, parent_index, final_step, created_at, updated_at)",
            "($1, $2, $3, 'running', $4, $5, NULL, $6, $7, $8, $9, $10, $2, ?1, ?1)",
            10,
        )
    })
}

/// `INSERT INTO steps` of the root steps of [`SPAWN_CHUNK`] tasks: `?1` is
/// the time, then 7 parameters per step.
fn insert_steps_chunk() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        chunk_sql(
            "INSERT INTO steps (id, task_id, name, handler, input, headers, state, priority, run_at, \
             depends_on, pending_deps, created_at, updated_at)",
            "($1, $2, $3, $3, $4, $5, 'ready', $6, $7, NULL, 0, ?1, ?1)",
            7,
        )
    })
}

/// Inserts [`SPAWN_CHUNK`] tasks without idempotency keys and their root
/// steps with two statements.
fn spawn_chunk(conn: &Connection, now: Millis, chunk: &[PreparedTask]) -> DbResult<()> {
    debug_assert_eq!(chunk.len(), SPAWN_CHUNK);
    struct Owned<'a> {
        task: [u8; 16],
        parent_group: Option<&'a str>,
        parent_index: Option<u32>,
        step: [u8; 16],
        parent_task: Option<[u8; 16]>,
        parent_step: Option<[u8; 16]>,
        run_at: Millis,
    }
    let owned: Vec<Owned> = chunk
        .iter()
        .map(|t| Owned {
            task: t.task_id.0.into_bytes(),
            step: t.step_id.0.into_bytes(),
            parent_task: t.parent.as_ref().map(|p| p.task_id.0.into_bytes()),
            parent_step: t.parent.as_ref().map(|p| p.step_id.0.into_bytes()),
            parent_group: t.parent.as_ref().and_then(|p| p.group.as_deref()),
            parent_index: t.parent.as_ref().map(|p| p.index),
            run_at: t.run_at.unwrap_or(now),
        })
        .collect();
    let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(1 + SPAWN_CHUNK * 10);
    values.push(&now);
    for (t, o) in chunk.iter().zip(&owned) {
        values.extend([
            &o.task as &dyn rusqlite::ToSql,
            &t.handler,
            &t.input,
            &t.headers,
            &t.priority,
            &t.response_event,
            &o.parent_task,
            &o.parent_step,
            &o.parent_group,
            &o.parent_index,
        ]);
    }
    conn.prepare_cached(insert_tasks_chunk())?
        .execute(values.as_slice())?;
    let last_task = conn.last_insert_rowid();
    values.truncate(1);
    for (t, o) in chunk.iter().zip(&owned) {
        values.extend([
            &o.step as &dyn rusqlite::ToSql,
            &o.task,
            &t.handler,
            &t.input,
            &t.headers,
            &t.priority,
            &o.run_at,
        ]);
    }
    conn.prepare_cached(insert_steps_chunk())?
        .execute(values.as_slice())?;
    let last_step = conn.last_insert_rowid();
    // Rows of one statement get consecutive rowids here (one writer, rowids
    // after the largest); the memo is checked against the ids anyway.
    let back = SPAWN_CHUNK as i64 - 1;
    for (i, o) in (0..).zip(&owned) {
        RowIds::remember(
            Uuid::from_bytes(o.step),
            last_step - back + i,
            last_task - back + i,
        );
    }
    Ok(())
}

fn spawn_tx(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    tasks: &[PreparedTask],
) -> DbResult<Vec<Spawned>> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut rest = tasks;
    while !rest.is_empty() {
        let plain = rest
            .iter()
            .take(SPAWN_CHUNK)
            .take_while(|t| t.idempotency_key.is_none())
            .count();
        let n = if plain == SPAWN_CHUNK {
            spawn_chunk(conn, now, &rest[..SPAWN_CHUNK])?;
            out.extend(rest[..SPAWN_CHUNK].iter().map(|t| Spawned {
                task_id: t.task_id,
                created: true,
            }));
            SPAWN_CHUNK
        } else {
            out.push(spawn_one(conn, now, &rest[0])?);
            1
        };
        rest = &rest[n..];
    }
    fx.ready = true;
    Ok(out)
}

/// One task and its root step (or the task an idempotency key names).
fn spawn_one(conn: &Connection, now: Millis, t: &PreparedTask) -> DbResult<Spawned> {
    if let Some(key) = &t.idempotency_key {
        if let Some(id) = conn
            .prepare_cached(FIND_IDEMPOTENT)?
            .query_row([key], |r| r.get::<_, [u8; 16]>(0))
            .optional()?
        {
            return Ok(Spawned {
                task_id: TaskId(Uuid::from_bytes(id)),
                created: false,
            });
        }
    }
    let parent = t.parent.as_ref();
    conn.prepare_cached(INSERT_TASK)?.execute(params![
        t.task_id.0.as_bytes(),
        t.handler,
        t.input,
        t.headers,
        t.priority,
        t.idempotency_key,
        t.response_event,
        parent.map(|p| p.task_id.0.into_bytes()),
        parent.map(|p| p.step_id.0.into_bytes()),
        parent.and_then(|p| p.group.as_deref()),
        parent.map(|p| p.index),
        now,
    ])?;
    let task_seq = conn.last_insert_rowid();
    conn.prepare_cached(INSERT_STEP)?.execute(params![
        t.step_id.0.as_bytes(),
        t.task_id.0.as_bytes(),
        t.handler,
        t.handler,
        t.input,
        t.headers,
        "ready",
        t.priority,
        t.run_at.unwrap_or(now),
        None::<String>,
        0,
        now,
        None::<String>,
    ])?;
    RowIds::remember(t.step_id.0, conn.last_insert_rowid(), task_seq);
    Ok(Spawned {
        task_id: t.task_id,
        created: true,
    })
}

fn claim_tx(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    host_id: &str,
    wants: &[(String, usize)],
    lease_ms: i64,
) -> DbResult<(Vec<RawClaim>, Option<Millis>, Millis)> {
    let promoted = conn.prepare_cached(PROMOTE)?.execute([now])?;
    if promoted > 0 {
        fx.ready = true;
    }
    let expires = now.saturating_add(lease_ms);
    // Walking the priorities present (usually few) keeps each query an index
    // range scan: a single `ORDER BY priority DESC, run_at` scan would step
    // over every not-yet-due step of a higher priority.
    let mut next_priority = conn.prepare_cached(NEXT_PRIORITY)?;
    let mut next_ready = conn.prepare_cached(NEXT_READY)?;
    let mut next_wake = conn.prepare_cached(NEXT_WAKE)?;
    let mut claimable = conn.prepare_cached(CLAIMABLE)?;
    let mut claim = conn.prepare_cached(CLAIM)?;
    let mut claimed = Vec::new();
    let mut next_due: Option<Millis> = None;
    let mut due = |at: Option<Millis>| {
        if let Some(at) = at {
            next_due = Some(next_due.map_or(at, |d| d.min(at)));
        }
    };
    for (handler, n) in wants {
        let mut remaining = i64::try_from(*n).unwrap_or(i64::MAX);
        let mut below = i64::MAX;
        while let Some(priority) = next_priority
            .query_row(params![handler, below], |r| r.get::<_, i64>(0))
            .optional()?
        {
            if remaining > 0 {
                let before = claimed.len();
                let rows =
                    claimable.query_map(params![handler, priority, now, remaining], |r| {
                        Ok(RawClaim {
                            step_id: uuid_col(r, 0)?,
                            task_id: uuid_col(r, 1)?,
                            name: r.get(2)?,
                            handler: r.get(3)?,
                            input: r.get(4)?,
                            headers: r.get(5)?,
                            attempt: r.get(6)?,
                            priority: r.get(7)?,
                            run_at: r.get(8)?,
                            seq: r.get(9)?,
                            has_dependencies: r.get(10)?,
                            run: r.get(11)?,
                            routes: r.get(12)?,
                        })
                    })?;
                for row in rows {
                    claimed.push(row?);
                    remaining -= 1;
                }
                let updated = claim.execute(params![
                    host_id,
                    expires,
                    now,
                    handler,
                    priority,
                    claimed.len() - before
                ])?;
                debug_assert_eq!(updated, claimed.len() - before);
            }
            due(next_ready
                .query_row(params![handler, priority, now], |r| r.get(0))
                .optional()?);
            below = priority;
        }
        due(next_wake.query_row([handler], |r| r.get(0)).optional()?);
    }
    Ok((claimed, next_due, expires))
}

/// What a completion needs to know about the step's task.
struct TaskMeta {
    running: bool,
    final_step: String,
    has_deps: bool,
    response_event: Option<String>,
    parent_group: Option<String>,
    parent_step_id: Option<[u8; 16]>,
}

fn task_meta(conn: &Connection, task_id: TaskId) -> DbResult<Option<TaskMeta>> {
    Ok(conn
        .prepare_cached(TASK_META)?
        .query_row([task_id.0.as_bytes()], |r| {
            Ok(TaskMeta {
                running: r.get_ref(0)?.as_str()? == "running",
                final_step: r.get(1)?,
                has_deps: r.get(2)?,
                response_event: r.get(3)?,
                parent_group: r.get(4)?,
                parent_step_id: r.get(5)?,
            })
        })
        .optional()?)
}

/// A `Completed` step that is settled but did not finish its task in the
/// same breath: unblocks its dependants and finishes the task if it was the
/// final step (response event, parent group).
fn complete_settled(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    lease: &Lease,
    result: &str,
) -> DbResult<Result<()>> {
    let name: String = conn
        .prepare_cached(STEP_NAME)?
        .query_row([lease.step_id.0.as_bytes()], |r| r.get(0))?;
    if let Some(meta) = task_meta(conn, lease.task_id)? {
        if meta.has_deps {
            unblock(conn, now, fx, lease.task_id, &name)?;
        }
        if meta.running && meta.final_step == name {
            finish_task(
                conn,
                now,
                fx,
                lease.task_id,
                &meta,
                TaskState::Completed,
                Some(result),
                None,
            )?;
        }
    }
    Ok(Ok(()))
}

/// Applies one completion. The outer error fails the whole batch (a database
/// failure); the inner one answers this item only, and is always detected
/// before anything is written, so a rejected item changes nothing.
fn complete_one(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    lease: &Lease,
    c: Prepared,
) -> DbResult<Result<()>> {
    // `attempt` binds the fence: the run number.
    let (sid, tid, host, attempt) = (
        lease.step_id.0.as_bytes(),
        lease.task_id.0.as_bytes(),
        &lease.host_id,
        lease.run as i64,
    );
    let lost = || Ok(Err(Error::LeaseLost(lease.step_id)));
    let settle_completed = |result: &str| -> DbResult<bool> {
        Ok(conn
            .prepare_cached(SETTLE_COMPLETED)?
            .execute(params![sid, tid, host, attempt, now, result])?
            > 0)
    };
    let memo = RowIds::take(lease.step_id.0);
    match c {
        Prepared::Completed { result } => {
            // By rowid when the memo holds (and still matches), else by id.
            let settled_at = match memo {
                Some((step_seq, task_seq))
                    if conn
                        .prepare_cached(SETTLE_COMPLETED_AT)?
                        .execute(params![sid, tid, host, attempt, now, result, step_seq])?
                        > 0 =>
                {
                    Some((step_seq, task_seq))
                }
                _ => None,
            };
            let finished = match settled_at {
                Some((step_seq, task_seq)) => conn
                    .prepare_cached(FINISH_SIMPLE_TASK_AT)?
                    .execute(params![tid, sid, result, now, task_seq, step_seq])?,
                None => {
                    if !settle_completed(&result)? {
                        return lost();
                    }
                    conn.prepare_cached(FINISH_SIMPLE_TASK)?
                        .execute(params![tid, sid, result, now])?
                }
            } > 0;
            if finished {
                fx.finished = true;
                return Ok(Ok(()));
            }
            return complete_settled(conn, now, fx, lease, &result);
        }
        Prepared::Decided {
            steps,
            final_step,
            result,
            status,
        } => {
            let decider: Option<String> = conn
                .prepare_cached(LEASE_CHECK)?
                .query_row(params![sid, tid, host, attempt], |r| r.get(0))
                .optional()?;
            let Some(decider) = decider else {
                return lost();
            };
            let completed = match check_decision(conn, lease.task_id, &decider, &steps)? {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            settle_completed(&result)?;
            if status.is_some() {
                conn.prepare_cached("UPDATE steps SET status = ?2 WHERE id = ?1")?
                    .execute(params![sid, status])?;
            }
            let Some(meta) = task_meta(conn, lease.task_id)? else {
                return Ok(Ok(()));
            };
            if meta.has_deps {
                unblock(conn, now, fx, lease.task_id, &decider)?;
            }
            if !steps.is_empty() {
                insert_decided(
                    conn,
                    now,
                    fx,
                    lease.task_id,
                    &steps,
                    &completed,
                    meta.has_deps,
                )?;
            }
            if meta.running && meta.final_step == decider {
                match steps.last() {
                    None => {
                        finish_task(
                            conn,
                            now,
                            fx,
                            lease.task_id,
                            &meta,
                            TaskState::Completed,
                            Some(&result),
                            None,
                        )?;
                    }
                    Some(last) => {
                        let new_final = final_step.as_deref().unwrap_or(&last.name);
                        conn.prepare_cached(
                            "UPDATE tasks SET final_step = ?2, updated_at = ?3 WHERE id = ?1",
                        )?
                        .execute(params![tid, new_final, now])?;
                    }
                }
            }
        }
        Prepared::Retry { error, run_at } => {
            let changed = conn
                .prepare_cached(SETTLE_RETRY)?
                .execute(params![sid, tid, host, attempt, now, run_at, error])?;
            if changed == 0 {
                return lost();
            }
            fx.ready = true;
        }
        Prepared::Failed { error } => {
            let changed = conn
                .prepare_cached(SETTLE_FAILED)?
                .execute(params![sid, tid, host, attempt, now, error])?;
            if changed == 0 {
                return lost();
            }
            if let Some(meta) = task_meta(conn, lease.task_id)? {
                if meta.running {
                    cancel_live_steps(conn, now, fx, lease.task_id)?;
                    finish_task(
                        conn,
                        now,
                        fx,
                        lease.task_id,
                        &meta,
                        TaskState::Failed,
                        None,
                        Some(&error),
                    )?;
                }
            }
        }
        Prepared::Suspended { wait, json } => {
            // Checked in the same transaction as the suspension, so an event
            // or a child finishing in between cannot be missed.
            let satisfied = wait.wake_at.is_some_and(|at| at <= now)
                || match &wait.event {
                    Some(name) => conn
                        .prepare_cached(EVENT_EXISTS)?
                        .query_row([name], |r| r.get(0))?,
                    None => false,
                }
                || match &wait.group {
                    Some(group) => !group_has_running(conn, group)?,
                    None => false,
                };
            let changed = conn.prepare_cached(SETTLE_SUSPENDED)?.execute(params![
                sid,
                tid,
                host,
                attempt,
                now,
                if satisfied { "ready" } else { "suspended" },
                if satisfied { Some(now) } else { wait.wake_at },
                (!satisfied).then_some(&json),
                wait.event.as_ref().filter(|_| !satisfied),
                wait.group.as_ref().filter(|_| !satisfied),
            ])?;
            if changed == 0 {
                return lost();
            }
            fx.ready |= satisfied;
        }
        Prepared::Released => {
            let changed = conn
                .prepare_cached(SETTLE_RELEASED)?
                .execute(params![sid, tid, host, attempt, now])?;
            if changed == 0 {
                return lost();
            }
            fx.ready = true;
        }
    }
    Ok(Ok(()))
}

/// The checks of a decision against the task's existing steps. Answers, for
/// each existing step named as a dependency, whether it is completed (the
/// deciding step counts as completed: it is, once the decision applies).
fn check_decision(
    conn: &Connection,
    task_id: TaskId,
    decider: &str,
    steps: &[PreparedStep],
) -> DbResult<Result<HashMap<String, bool>>> {
    let mut state_of = conn.prepare_cached(STEP_STATE_BY_NAME)?;
    let mut lookup = |name: &str| -> DbResult<Option<String>> {
        Ok(state_of
            .query_row(params![task_id.0.as_bytes(), name], |r| r.get(0))
            .optional()?)
    };
    let new_names: HashSet<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    let mut existing: HashMap<String, bool> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if lookup(&s.name)?.is_some() {
            return Ok(Err(Error::InvalidInput(format!(
                "steps[{i}].name: the task already has a step named `{}`",
                s.name
            ))));
        }
        for d in &s.deps {
            if new_names.contains(d.as_str()) || existing.contains_key(d) {
                continue;
            }
            match lookup(d)? {
                Some(state) => {
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

fn insert_decided(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    task_id: TaskId,
    steps: &[PreparedStep],
    completed: &HashMap<String, bool>,
    task_has_deps: bool,
) -> DbResult<()> {
    let tid = task_id.0.as_bytes();
    let (priority, headers): (i32, Option<String>) = conn
        .prepare_cached("SELECT priority, headers FROM tasks WHERE id = ?1")?
        .query_row([tid], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut insert_step = conn.prepare_cached(INSERT_STEP)?;
    let mut insert_dep = conn.prepare_cached(
        "INSERT INTO step_deps (task_id, dep_name, step_seq) VALUES (?1, ?2, ?3)",
    )?;
    let mut any_deps = false;
    for s in steps {
        let pending = s
            .deps
            .iter()
            .filter(|d| !completed.get(*d).copied().unwrap_or(false))
            .count();
        let state = if pending > 0 { "blocked" } else { "ready" };
        insert_step.execute(params![
            s.id.0.as_bytes(),
            tid,
            s.name,
            s.handler,
            s.input,
            headers,
            state,
            priority,
            if pending > 0 { None } else { Some(now) },
            s.deps_json,
            pending,
            now,
            s.routes_json,
        ])?;
        let seq = conn.last_insert_rowid();
        for d in &s.deps {
            insert_dep.execute(params![tid, d, seq])?;
            any_deps = true;
        }
        fx.ready |= pending == 0;
    }
    if any_deps && !task_has_deps {
        conn.prepare_cached("UPDATE tasks SET has_deps = 1 WHERE id = ?1")?
            .execute([tid])?;
    }
    Ok(())
}

/// One fewer pending dependency for each blocked step waiting on `name`.
fn unblock(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    task_id: TaskId,
    name: &str,
) -> DbResult<()> {
    let mut stmt = conn.prepare_cached(UNBLOCK)?;
    let rows = stmt.query_map(params![task_id.0.as_bytes(), name, now], |r| {
        r.get::<_, bool>(0)
    })?;
    for ready in rows {
        fx.ready |= ready?;
    }
    Ok(())
}

fn group_has_running(conn: &Connection, group: &str) -> DbResult<bool> {
    Ok(conn
        .prepare_cached(GROUP_RUNNING)?
        .query_row([group], |r| r.get(0))?)
}

/// Cancels every non-terminal step of a task; running ones are announced.
fn cancel_live_steps(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    task_id: TaskId,
) -> DbResult<()> {
    let tid = task_id.0.as_bytes();
    let mut running = conn.prepare_cached(RUNNING_STEPS_OF_TASK)?;
    for id in running.query_map([tid], |r| uuid_col(r, 0))? {
        fx.cancelled.push(StepId(id?));
    }
    conn.prepare_cached(CANCEL_STEPS)?
        .execute(params![tid, now])?;
    Ok(())
}

/// *Task finish* (see the `Store` docs). `result` and `error` are JSON.
#[allow(clippy::too_many_arguments)]
fn finish_task(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    task_id: TaskId,
    meta: &TaskMeta,
    state: TaskState,
    result: Option<&str>,
    error: Option<&str>,
) -> DbResult<()> {
    let changed = conn.prepare_cached(FINISH_TASK)?.execute(params![
        task_id.0.as_bytes(),
        state.as_str(),
        result,
        error,
        now
    ])?;
    if changed == 0 {
        return Ok(());
    }
    fx.finished = true;
    if let Some(event) = &meta.response_event {
        // Both fragments are JSON already; splicing them avoids a decode and
        // re-encode on the writer thread.
        let payload = format!(
            r#"{{"task_id":"{task_id}","state":"{}","result":{},"error":{}}}"#,
            state.as_str(),
            result.unwrap_or("null"),
            error.unwrap_or("null"),
        );
        emit_tx(conn, now, fx, event, &payload)?;
    }
    if let (Some(group), Some(parent_step)) = (&meta.parent_group, &meta.parent_step_id) {
        if !group_has_running(conn, group)? {
            let woke = conn.prepare_cached(WAKE_GROUP_PARENT)?.execute(params![
                parent_step,
                group,
                now
            ])?;
            fx.ready |= woke > 0;
        }
    }
    Ok(())
}

fn emit_tx(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    name: &str,
    payload: &str,
) -> DbResult<bool> {
    let stored = conn
        .prepare_cached(INSERT_EVENT)?
        .execute(params![name, payload, now])?
        > 0;
    let woke = conn
        .prepare_cached(WAKE_EVENT_WAITERS)?
        .execute(params![name, now])?;
    fx.ready |= woke > 0;
    Ok(stored)
}

fn cancelled_error() -> String {
    serde_json::to_string(&ErrorInfo::new(ErrorKind::Cancelled, "task cancelled"))
        .unwrap_or_default()
}

fn cancel_tx(
    conn: &Connection,
    now: Millis,
    fx: &mut Effects,
    id: TaskId,
    cascade: bool,
) -> DbResult<bool> {
    let meta =
        task_meta(conn, id)?.ok_or_else(|| Fail::App(Error::NotFound(format!("task {id}"))))?;
    if !meta.running && !cascade {
        return Ok(false);
    }
    let error = cancelled_error();
    if meta.running {
        cancel_live_steps(conn, now, fx, id)?;
        finish_task(
            conn,
            now,
            fx,
            id,
            &meta,
            TaskState::Cancelled,
            None,
            Some(&error),
        )?;
    }
    // A cascade reaches the unfinished descendants of a finished task too.
    if cascade {
        let mut children = conn.prepare_cached("SELECT id FROM tasks WHERE parent_task_id = ?1")?;
        let mut queue = vec![id];
        // Finished children are walked too: they may have unfinished children.
        while let Some(parent) = queue.pop() {
            let ids = children.query_map([parent.0.as_bytes()], |r| uuid_col(r, 0))?;
            for child in ids.collect::<rusqlite::Result<Vec<_>>>()? {
                let child = TaskId(child);
                if let Some(meta) = task_meta(conn, child)? {
                    if meta.running {
                        cancel_live_steps(conn, now, fx, child)?;
                        finish_task(
                            conn,
                            now,
                            fx,
                            child,
                            &meta,
                            TaskState::Cancelled,
                            None,
                            Some(&error),
                        )?;
                    }
                }
                queue.push(child);
            }
        }
    }
    Ok(meta.running)
}

/// Deletes up to `batch` finished tasks older than `before` whose parent task
/// is gone (or that never had one), with their steps, dependencies and
/// checkpoints. Events are kept.
fn cleanup_tx(conn: &Connection, before: Millis, batch: usize) -> DbResult<u64> {
    let ids = conn
        .prepare_cached(
            "SELECT t.id FROM tasks t \
             WHERE t.state IN ('completed', 'failed', 'cancelled') AND t.updated_at < ?1 \
               AND (t.parent_task_id IS NULL \
                    OR NOT EXISTS (SELECT 1 FROM tasks p WHERE p.id = t.parent_task_id)) \
             ORDER BY t.seq LIMIT ?2",
        )?
        .query_map(params![before, batch as i64], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for id in &ids {
        conn.prepare_cached("DELETE FROM step_deps WHERE task_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM checkpoints WHERE task_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM steps WHERE task_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM tasks WHERE id = ?1")?
            .execute([id])?;
    }
    Ok(ids.len() as u64)
}

fn retry_tx(conn: &Connection, now: Millis, fx: &mut Effects, id: TaskId) -> DbResult<()> {
    let tid = id.0.as_bytes();
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM tasks WHERE id = ?1")?
        .query_row([tid], |r| r.get(0))
        .optional()?;
    match state.as_deref() {
        None => return Err(Fail::App(Error::NotFound(format!("task {id}")))),
        Some("failed" | "cancelled") => {}
        Some(other) => {
            return Err(Fail::App(Error::Conflict(format!(
                "task {id} is {other}; only failed or cancelled tasks can be retried"
            ))))
        }
    }
    conn.prepare_cached("UPDATE tasks SET state = 'running', result = NULL, error = NULL, updated_at = ?2 WHERE id = ?1")?
        .execute(params![tid, now])?;
    let mut steps =
        conn.prepare_cached("SELECT seq, name, state, depends_on FROM steps WHERE task_id = ?1")?;
    let rows = steps
        .query_map([tid], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)? == "completed",
                opt_json_col::<Vec<String>>(r, 3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let done: HashSet<&str> = rows.iter().filter(|r| r.2).map(|r| r.1.as_str()).collect();
    let mut reset = conn.prepare_cached(RESET_STEP)?;
    for (seq, _, completed, deps) in &rows {
        if *completed {
            continue;
        }
        let deps: HashSet<&str> = deps.iter().flatten().map(String::as_str).collect();
        let pending = deps.iter().filter(|d| !done.contains(*d)).count();
        let (state, run_at) = if pending == 0 {
            ("ready", Some(now))
        } else {
            ("blocked", None)
        };
        reset.execute(params![seq, state, run_at, pending, now])?;
    }
    fx.ready = true;
    Ok(())
}

/// Ends host `id`'s registration (kept for `ended_hosts`) and forgets the
/// registrations that ended longer ago than the retention.
fn end_host(conn: &Connection, id: &str, reason: &str, now: Millis) -> DbResult<()> {
    conn.prepare_cached(END_HOST)?
        .execute(params![id, now, reason])?;
    conn.prepare_cached(FORGET_ENDED_HOSTS)?
        .execute([now.saturating_sub(ENDED_HOST_RETENTION_MS)])?;
    Ok(())
}

/// A row of `host_columns!()`.
fn host_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostInfo> {
    Ok(HostInfo {
        id: r.get(0)?,
        pid: r.get(1)?,
        hostname: r.get(2)?,
        handlers: json_col(r, 3)?,
        started_at: r.get(4)?,
        last_heartbeat: r.get(5)?,
        name: r.get(6)?,
        language: r.get(7)?,
        slots: r
            .get::<_, Option<i64>>(8)?
            .map(|n| u64::try_from(n).unwrap_or(0)),
        ended_at: r.get(9)?,
        end_reason: r.get(10)?,
    })
}

fn heartbeat_tx(
    conn: &Connection,
    now: Millis,
    host: &HostInfo,
    handlers: &str,
    running: &[RunRef],
    lease_ms: i64,
) -> DbResult<HeartbeatReply> {
    conn.prepare_cached(UPSERT_HOST)?.execute(params![
        host.id,
        host.pid,
        host.hostname,
        handlers,
        host.started_at,
        now,
        host.name,
        host.language,
        host.slots.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
    ])?;
    let mut extend = conn.prepare_cached(EXTEND_LEASE)?;
    let expires = now.saturating_add(lease_ms);
    let mut reply = HeartbeatReply::default();
    for run in running {
        let id = run.step_id.0.as_bytes();
        if extend.execute(params![id, host.id, expires, run.run as i64])? == 0 {
            if step_cancelled(conn, run.step_id)? {
                reply.cancelled.push(*run);
            }
            reply.lost.push(*run);
        }
    }
    Ok(reply)
}

fn step_cancelled(conn: &Connection, step: StepId) -> DbResult<bool> {
    let state: Option<String> = conn
        .prepare_cached(STEP_STATE)?
        .query_row([step.0.as_bytes()], |r| r.get(0))
        .optional()?;
    Ok(state.as_deref() == Some("cancelled"))
}

/// Checks that `lease` is its step's current lease (a run's write is
/// fenced): [`Error::Cancelled`] if the step was cancelled, else
/// [`Error::LeaseLost`].
fn fence_tx(conn: &Connection, lease: &Lease) -> DbResult<()> {
    let current = conn
        .prepare_cached(LEASE_CHECK)?
        .query_row(
            params![
                lease.step_id.0.as_bytes(),
                lease.task_id.0.as_bytes(),
                lease.host_id,
                lease.run as i64
            ],
            |_| Ok(()),
        )
        .optional()?;
    match current {
        Some(()) => Ok(()),
        None => Err(Fail::App(fence_error(conn, lease)?)),
    }
}

fn fence_error(conn: &Connection, lease: &Lease) -> DbResult<Error> {
    Ok(if step_cancelled(conn, lease.step_id)? {
        Error::Cancelled(lease.step_id)
    } else {
        Error::LeaseLost(lease.step_id)
    })
}

fn checkpoint_tx(
    conn: &Connection,
    now: Millis,
    lease: &Lease,
    key: &str,
    value: &str,
    lease_ms: i64,
) -> DbResult<()> {
    let extended = conn
        .prepare_cached(EXTEND_CHECKPOINT_LEASE)?
        .execute(params![
            lease.step_id.0.as_bytes(),
            lease.task_id.0.as_bytes(),
            lease.host_id,
            lease.run as i64,
            now.saturating_add(lease_ms)
        ])?;
    if extended == 0 {
        return Err(Fail::App(fence_error(conn, lease)?));
    }
    conn.prepare_cached(UPSERT_CHECKPOINT)?.execute(params![
        lease.task_id.0.as_bytes(),
        key,
        value,
        lease.step_id.0.as_bytes(),
        lease.run as i64,
        now
    ])?;
    Ok(())
}

fn recover_tx(conn: &Connection, now: Millis, fx: &mut Effects) -> DbResult<u64> {
    let n = conn.prepare_cached(RECOVER_EXPIRED)?.execute([now])?;
    fx.ready |= n > 0;
    Ok(n as u64)
}

// ---------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------

fn get_task_tx(conn: &Connection, id: TaskId) -> DbResult<Option<TaskRecord>> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT ",
            task_cols!(),
            " FROM tasks WHERE id = ?1"
        ))?
        .query_row([id.0.as_bytes()], task_row)
        .optional()?)
}

fn task_detail_tx(conn: &Connection, id: TaskId) -> DbResult<Option<TaskDetail>> {
    let Some(task) = get_task_tx(conn, id)? else {
        return Ok(None);
    };
    let tid = id.0.as_bytes();
    let steps = conn
        .prepare_cached(concat!(
            "SELECT ",
            step_cols!(),
            " FROM steps WHERE task_id = ?1 ORDER BY seq"
        ))?
        .query_map([tid], step_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let checkpoints = conn
        .prepare_cached(
            "SELECT key, value, step_id, run, created_at FROM checkpoints WHERE task_id = ?1 ORDER BY rowid",
        )?
        .query_map([tid], |r| {
            Ok(CheckpointRecord {
                task_id: id,
                key: r.get(0)?,
                value: json_col(r, 1)?,
                step_id: StepId(uuid_col(r, 2)?),
                run: r.get::<_, i64>(3)? as u64,
                created_at: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let children = conn
        .prepare_cached(concat!(
            "SELECT ",
            task_cols!(),
            " FROM tasks WHERE parent_task_id = ?1 ORDER BY seq"
        ))?
        .query_map([tid], task_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(TaskDetail {
        task,
        steps,
        checkpoints,
        children,
    }))
}

fn list_tasks_tx(conn: &Connection, filter: &TaskFilter) -> DbResult<Vec<TaskRecord>> {
    let (sql, args) = list_tasks_sql(conn, filter)?;
    let rows = conn
        .prepare_cached(&sql)?
        .query_map(rusqlite::params_from_iter(args), task_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// The statement and arguments of a task listing.
fn list_tasks_sql(
    conn: &Connection,
    filter: &TaskFilter,
) -> DbResult<(String, Vec<rusqlite::types::Value>)> {
    use rusqlite::types::Value as Sql;
    let limit = if filter.limit == 0 {
        DEFAULT_LIMIT
    } else {
        filter.limit
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // Only the conditions that are set go into the statement, so each
    // combination is planned with the indexes it can use; the cursor is a
    // keyset on `seq` (the listing order), never an offset.
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<Sql> = Vec::new();
    if let Some(after) = filter.after {
        let seq: Option<i64> = conn
            .prepare_cached("SELECT seq FROM tasks WHERE id = ?1")?
            .query_row([after.0.as_bytes()], |r| r.get(0))
            .optional()?;
        let Some(seq) = seq else {
            return Err(Error::NotFound(format!("cursor task {after}")).into());
        };
        conds.push("seq < ?");
        args.push(Sql::Integer(seq));
    }
    if let Some(state) = filter.state {
        conds.push("state = ?");
        args.push(Sql::Text(state.as_str().into()));
    }
    if let Some(h) = &filter.handler {
        conds.push("handler = ?");
        args.push(Sql::Text(h.clone()));
    }
    if filter.root_only {
        conds.push("parent_task_id IS NULL");
    }
    if let Some(p) = filter.parent {
        conds.push("parent_task_id = ?");
        args.push(Sql::Blob(p.0.as_bytes().to_vec()));
    }
    if let Some(k) = &filter.idempotency_key {
        conds.push("idempotency_key = ?");
        args.push(Sql::Text(k.clone()));
    }
    let window = time_window_index(conn, filter)?;
    // A `+` keeps the planner off a time index (see `time_window_index`).
    let plus = |index: &str| if window == Some(index) { "" } else { "+" };
    let created = plus("tasks_created");
    let finished = plus("tasks_finished");
    let created_after = format!("{created}created_at >= ?");
    let created_before = format!("{created}created_at < ?");
    let finished_after = format!("{finished}updated_at >= ?");
    let finished_before = format!("{finished}updated_at < ?");
    if let Some(t) = filter.created_after {
        conds.push(&created_after);
        args.push(Sql::Integer(t));
    }
    if let Some(t) = filter.created_before {
        conds.push(&created_before);
        args.push(Sql::Integer(t));
    }
    if filter.wants_finished() {
        conds.push("state <> 'running'");
    }
    if let Some(t) = filter.finished_after {
        conds.push(&finished_after);
        args.push(Sql::Integer(t));
    }
    if let Some(t) = filter.finished_before {
        conds.push(&finished_before);
        args.push(Sql::Integer(t));
    }
    if let Some(st) = filter.step_state {
        conds.push(
            "state = 'running' AND EXISTS (SELECT 1 FROM steps s WHERE s.task_id = tasks.id \
             AND s.state = ?)",
        );
        args.push(Sql::Text(st.as_str().into()));
    }
    let mut sql = String::from(concat!("SELECT ", task_cols!(), " FROM tasks"));
    if let Some(index) = window {
        sql.push_str(" INDEXED BY ");
        sql.push_str(index);
    }
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(" ORDER BY seq DESC LIMIT ?");
    args.push(Sql::Integer(limit));
    Ok((sql, args))
}

/// A window of creation or finish times holding fewer tasks than this is
/// read through its index and sorted; a wider one in listing order.
const NARROW_WINDOW: i64 = 10_000;

/// The time index a listing should read, if any: `tasks_created` or
/// `tasks_finished` when the filter has a window of creation (else finish)
/// times holding fewer than [`NARROW_WINDOW`] tasks, and no handler,
/// parent or idempotency key (whose indexes are equality searches).
///
/// Without statistics SQLite plans any range as selective, so it would
/// read a window covering most of the table through the index and sort
/// all of it for one page (seconds at a million tasks, where walking the
/// table newest first finds the page at once). A count through the index,
/// stopped at [`NARROW_WINDOW`], tells the two apart; a wide window is then
/// read in listing order, as before the indexes existed.
fn time_window_index(conn: &Connection, filter: &TaskFilter) -> DbResult<Option<&'static str>> {
    if filter.handler.is_some() || filter.parent.is_some() || filter.idempotency_key.is_some() {
        return Ok(None);
    }
    let (index, probe, lo, hi) =
        if filter.created_after.is_some() || filter.created_before.is_some() {
            (
                "tasks_created",
                "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_created \
             WHERE created_at >= ?1 AND created_at < ?2 LIMIT ?3)",
                filter.created_after,
                filter.created_before,
            )
        } else if filter.finished_after.is_some() || filter.finished_before.is_some() {
            (
                "tasks_finished",
                "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_finished \
             WHERE state <> 'running' AND updated_at >= ?1 AND updated_at < ?2 LIMIT ?3)",
                filter.finished_after,
                filter.finished_before,
            )
        } else {
            return Ok(None);
        };
    let n: i64 = conn.prepare_cached(probe)?.query_row(
        params![
            lo.unwrap_or(i64::MIN),
            hi.unwrap_or(i64::MAX),
            NARROW_WINDOW
        ],
        |r| r.get(0),
    )?;
    Ok((n < NARROW_WINDOW).then_some(index))
}

// ---------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    fn poll_interval(&self) -> Duration {
        POLL_INTERVAL
    }

    async fn now(&self) -> Result<Millis> {
        Ok(self.clock.now())
    }

    async fn migrate(&self) -> Result<u32> {
        self.write("migrate", |conn, now, _| apply_migrations(conn, now))
            .await
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
        self.write("spawn", move |conn, now, fx| {
            spawn_tx(conn, now, fx, &tasks)
        })
        .await
    }

    async fn claim(
        &self,
        host_id: &str,
        wants: &[(String, usize)],
        lease_ms: i64,
    ) -> Result<ClaimBatch> {
        let host = host_id.to_owned();
        let wants = wants.to_vec();
        let (mut raw, next_due, lease_expires_at) = self
            .write("claim", move |conn, now, fx| {
                claim_tx(conn, now, fx, &host, &wants, lease_ms)
            })
            .await?;
        raw.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.run_at.cmp(&b.run_at))
                .then(a.seq.cmp(&b.seq))
        });
        let steps = raw
            .into_iter()
            .map(|c| {
                Ok(ClaimedStep {
                    step_id: StepId(c.step_id),
                    task_id: TaskId(c.task_id),
                    input: decode("step input", &c.input)?,
                    headers: match &c.headers {
                        Some(h) => decode("task headers", h)?,
                        None => Default::default(),
                    },
                    name: c.name,
                    handler: c.handler,
                    attempt: c.attempt,
                    run: c.run as u64,
                    priority: c.priority,
                    lease_expires_at,
                    has_dependencies: c.has_dependencies,
                    ready_at: c.run_at,
                    routes: match &c.routes {
                        Some(r) => decode("step routes", r)?,
                        None => Default::default(),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClaimBatch { steps, next_due })
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<Vec<Result<()>>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let items: Vec<Result<(Lease, Prepared)>> =
            completions.into_iter().map(prepare_completion).collect();
        self.write("complete", move |conn, now, fx| {
            items
                .into_iter()
                .map(|item| match item {
                    Ok((lease, prepared)) => complete_one(conn, now, fx, &lease, prepared),
                    Err(e) => Ok(Err(e)),
                })
                .collect()
        })
        .await
    }

    async fn heartbeat(
        &self,
        host: &HostInfo,
        running: &[RunRef],
        lease_ms: i64,
    ) -> Result<HeartbeatReply> {
        let handlers = encode("handlers", &host.handlers)?;
        let host = host.clone();
        let running = running.to_vec();
        self.write("heartbeat", move |conn, now, _| {
            heartbeat_tx(conn, now, &host, &handlers, &running, lease_ms)
        })
        .await
    }

    async fn cancelled_steps(&self, steps: &[StepId]) -> Result<Vec<StepId>> {
        let steps = steps.to_vec();
        self.read("cancelled_steps", move |conn| {
            let mut state = conn.prepare_cached(STEP_STATE)?;
            let mut out = Vec::new();
            for id in steps {
                let s: Option<String> = state
                    .query_row([id.0.as_bytes()], |r| r.get(0))
                    .optional()?;
                if s.as_deref() == Some("cancelled") {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn expire_host(&self, host_id: &str) -> Result<u64> {
        let host = host_id.to_owned();
        self.write("expire_host", move |conn, now, _| {
            let n = conn
                .prepare_cached(
                    "UPDATE steps SET lease_expires_at = ?2 WHERE state = 'running' AND lease_owner = ?1",
                )?
                .execute(params![host, now])?;
            end_host(conn, &host, HOST_DEAD, now)?;
            Ok(n as u64)
        })
        .await
    }

    async fn deregister_host(&self, host_id: &str) -> Result<()> {
        let host = host_id.to_owned();
        self.write("deregister_host", move |conn, now, _| {
            end_host(conn, &host, HOST_STOPPED, now)
        })
        .await
    }

    async fn recover_expired(&self) -> Result<u64> {
        self.write("recover_expired", recover_tx).await
    }

    async fn put_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        value: Value,
        lease_ms: i64,
    ) -> Result<()> {
        let value = encode("checkpoint value", &value)?;
        let (lease, key) = (lease.clone(), key.to_owned());
        self.write("put_checkpoint", move |conn, now, _| {
            checkpoint_tx(conn, now, &lease, &key, &value, lease_ms)
        })
        .await
    }

    async fn checkpoints(&self, task_id: TaskId) -> Result<BTreeMap<String, Value>> {
        self.read("checkpoints", move |conn| {
            let rows = conn
                .prepare_cached("SELECT key, value FROM checkpoints WHERE task_id = ?1")?
                .query_map([task_id.0.as_bytes()], |r| Ok((r.get(0)?, json_col(r, 1)?)))?
                .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn emit_event(&self, name: &str, payload: Value) -> Result<bool> {
        if name.trim().is_empty() {
            return Err(Error::InvalidInput("event name: must not be empty".into()));
        }
        let payload = encode("event payload", &payload)?;
        let name = name.to_owned();
        self.write("emit_event", move |conn, now, fx| {
            emit_tx(conn, now, fx, &name, &payload)
        })
        .await
    }

    async fn emit_event_fenced(&self, fence: &Lease, name: &str, payload: Value) -> Result<bool> {
        if name.trim().is_empty() {
            return Err(Error::InvalidInput("event name: must not be empty".into()));
        }
        let payload = encode("event payload", &payload)?;
        let (fence, name) = (fence.clone(), name.to_owned());
        self.write("emit_event", move |conn, now, fx| {
            fence_tx(conn, &fence)?;
            emit_tx(conn, now, fx, &name, &payload)
        })
        .await
    }

    async fn spawn_fenced(&self, fence: &Lease, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| PreparedTask::new(i, t))
            .collect::<Result<Vec<_>>>()?;
        let fence = fence.clone();
        self.write("spawn", move |conn, now, fx| {
            fence_tx(conn, &fence)?;
            spawn_tx(conn, now, fx, &tasks)
        })
        .await
    }

    async fn get_event(&self, name: &str) -> Result<Option<EventRecord>> {
        let name = name.to_owned();
        self.read("get_event", move |conn| {
            Ok(conn
                .prepare_cached("SELECT name, payload, created_at FROM events WHERE name = ?1")?
                .query_row([name], event_row)
                .optional()?)
        })
        .await
    }

    async fn list_events_prefixed(&self, prefix: &str, limit: usize) -> Result<Vec<EventRecord>> {
        let limit =
            i64::try_from(if limit == 0 { DEFAULT_LIMIT } else { limit }).unwrap_or(i64::MAX);
        let prefix = prefix.to_owned();
        self.read("list_events_prefixed", move |conn| {
            // substr, not LIKE: the prefix is plain text (`%` and `_` too).
            Ok(conn
                .prepare_cached(
                    "SELECT name, payload, created_at FROM events \
                     WHERE substr(name, 1, length(?1)) = ?1 ORDER BY rowid DESC LIMIT ?2",
                )?
                .query_map(params![prefix, limit], event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn running_by_host(&self) -> Result<BTreeMap<String, u64>> {
        self.read("running_by_host", |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT lease_owner, count(*) FROM steps \
                     WHERE state = 'running' AND lease_owner IS NOT NULL GROUP BY lease_owner",
                )?
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?
                .collect::<rusqlite::Result<BTreeMap<_, _>>>()?)
        })
        .await
    }

    async fn handler_stats(&self) -> Result<Vec<switchyard_core::HandlerStats>> {
        // A full scan: for the admin API, not for a hot path.
        self.read("handler_stats", |conn| {
            let mut by: BTreeMap<String, switchyard_core::HandlerStats> = BTreeMap::new();
            let mut stmt = conn.prepare_cached(
                "SELECT handler, state, count(*), \
                 min(CASE WHEN state = 'ready' THEN coalesce(run_at, created_at) END) \
                 FROM steps GROUP BY handler, state",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })?;
            for row in rows {
                let (handler, state, n, oldest) = row?;
                let h =
                    by.entry(handler.clone())
                        .or_insert_with(|| switchyard_core::HandlerStats {
                            handler,
                            ..Default::default()
                        });
                h.steps.insert(state, n);
                if oldest.is_some() {
                    h.oldest_ready_at = oldest;
                }
            }
            Ok(by.into_values().collect())
        })
        .await
    }

    async fn task_counts(&self) -> Result<Vec<switchyard_core::TaskCount>> {
        // A full scan: for the admin API, not for a hot path.
        self.read("task_counts", |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT handler, state, count(*) FROM tasks \
                     GROUP BY handler, state ORDER BY handler, state",
                )?
                .query_map([], |r| {
                    Ok(switchyard_core::TaskCount {
                        handler: r.get(0)?,
                        state: r.get(1)?,
                        count: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
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
        // The partial index tasks_finished (updated_at, state <> 'running').
        self.read("finished_buckets", move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT ?1 + ((updated_at - ?1) / ?2) * ?2 AS b, state, count(*) FROM tasks \
                     WHERE state <> 'running' AND updated_at >= ?1 \
                     GROUP BY b, state ORDER BY b, state",
                )?
                .query_map(params![since, bucket_ms], |r| {
                    Ok(switchyard_core::FinishedBucket {
                        start: r.get(0)?,
                        state: r.get(1)?,
                        count: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn failure_groups(&self, limit: usize) -> Result<Vec<switchyard_core::FailureGroup>> {
        let limit =
            i64::try_from(if limit == 0 { DEFAULT_LIMIT } else { limit }).unwrap_or(i64::MAX);
        // The index tasks_state (state, seq) narrows to the failed tasks.
        self.read("failure_groups", move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT handler, coalesce(json_extract(error, '$.message'), '') AS m, \
                     count(*) AS n, max(updated_at) FROM tasks WHERE state = 'failed' \
                     GROUP BY handler, m ORDER BY n DESC, handler, m LIMIT ?1",
                )?
                .query_map([limit], |r| {
                    Ok(switchyard_core::FailureGroup {
                        handler: r.get(0)?,
                        message: r.get(1)?,
                        count: r.get(2)?,
                        last_failed_at: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn group_outcomes(&self, group: &str) -> Result<Vec<ChildOutcome>> {
        let group = group.to_owned();
        self.read("group_outcomes", move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, state, result, error FROM tasks WHERE parent_group = ?1 ORDER BY parent_index, seq",
                )?
                .query_map([group], |r| {
                    Ok(ChildOutcome {
                        task_id: TaskId(uuid_col(r, 0)?),
                        state: parse_col(r, 1)?,
                        result: opt_json_col(r, 2)?,
                        error: opt_json_col(r, 3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn step_results(
        &self,
        task_id: TaskId,
        names: &[String],
    ) -> Result<BTreeMap<String, Value>> {
        let names = names.to_vec();
        self.read("step_results", move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT result FROM steps WHERE task_id = ?1 AND name = ?2 AND state = 'completed'",
            )?;
            let mut out = BTreeMap::new();
            for name in names {
                let result: Option<Option<String>> = stmt
                    .query_row(params![task_id.0.as_bytes(), name], |r| r.get(0))
                    .optional()?;
                if let Some(result) = result {
                    let value = match result {
                        Some(s) => decode("step result", &s)?,
                        None => Value::Null,
                    };
                    out.insert(name, value);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn cancel_task(&self, id: TaskId, cascade: bool) -> Result<bool> {
        self.write("cancel_task", move |conn, now, fx| {
            cancel_tx(conn, now, fx, id, cascade)
        })
        .await
    }

    async fn cleanup(&self, finished_before: Millis, batch: usize) -> Result<u64> {
        if batch == 0 {
            return Ok(0);
        }
        self.write("cleanup", move |conn, _, _| {
            cleanup_tx(conn, finished_before, batch)
        })
        .await
    }

    async fn cleanup_events(&self, created_before: Millis, batch: usize) -> Result<u64> {
        if batch == 0 {
            return Ok(0);
        }
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        self.write("cleanup_events", move |conn, _, _| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM events WHERE rowid IN \
                     (SELECT rowid FROM events WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
                )?
                .execute(params![created_before, limit])?;
            Ok(n as u64)
        })
        .await
    }

    async fn retry_task(&self, id: TaskId) -> Result<()> {
        self.write("retry_task", move |conn, now, fx| {
            retry_tx(conn, now, fx, id)
        })
        .await
    }

    async fn get_task(&self, id: TaskId) -> Result<Option<TaskRecord>> {
        self.read("get_task", move |conn| get_task_tx(conn, id))
            .await
    }

    async fn task_detail(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        self.read("task_detail", move |conn| task_detail_tx(conn, id))
            .await
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        let filter = filter.clone();
        self.read("list_tasks", move |conn| list_tasks_tx(conn, &filter))
            .await
    }

    async fn list_hosts(&self) -> Result<Vec<HostInfo>> {
        self.read("list_hosts", |conn| {
            Ok(conn
                .prepare_cached(concat!(
                    "SELECT ",
                    host_columns!(),
                    " FROM hosts WHERE ended_at IS NULL ORDER BY last_heartbeat DESC, id"
                ))?
                .query_map([], host_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn ended_hosts(&self, since: Millis) -> Result<Vec<HostInfo>> {
        self.read("ended_hosts", move |conn| {
            Ok(conn
                .prepare_cached(concat!(
                    "SELECT ",
                    host_columns!(),
                    " FROM hosts WHERE ended_at >= ?1 ORDER BY ended_at DESC, id"
                ))?
                .query_map([since], host_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn count_steps(&self) -> Result<StateCounts> {
        // A full scan: fine for progress and metrics, not for a hot path.
        self.read("count_steps", |conn| {
            Ok(conn
                .prepare_cached("SELECT state, count(*) FROM steps GROUP BY state")?
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?
                .collect::<rusqlite::Result<StateCounts>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod check_url_tests {
    use crate::check_url;

    /// What `open` would refuse before touching anything is refused by
    /// `check_url`, naming the problem; good URLs pass.
    #[test]
    fn check_url_refuses_what_open_would() {
        let dir = tempfile::tempdir().unwrap();
        let good = format!("sqlite:{}", dir.path().join("x.db").display());
        for ok in [
            "memory",
            "sqlite:x.db",
            "sqlite::memory:",
            good.as_str(),
            "postgres://u:pw@127.0.0.1:1/db?wakeup=polling",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}: {:?}", check_url(ok));
        }
        let missing = format!("sqlite:{}/no/such/dir/x.db", dir.path().display());
        for (bad, says) in [
            ("mysql://u:s3cr3t@h/db", "unrecognised store URL"),
            ("sqlite:", "names no file"),
            (missing.as_str(), "does not exist"),
            ("sqlite:x.db?synchronous=sometimes", "synchronous"),
            ("sqlite:x.db?mode=ro", "not known to the SQLite store"),
            ("postgres://h/db?wakeup=never", "wakeup"),
            ("postgres://u:s3cr3t@h/db?sslmode=maybe", "store URL"),
        ] {
            let e = check_url(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("s3cr3t"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::SystemClock;

    /// A command that records a host row named `id`, then fails if asked to
    /// (after writing) or panics.
    fn put_host(id: &str, then: &'static str) -> (Box<dyn Command>, oneshot::Receiver<Result<()>>) {
        let (reply, answer) = oneshot::channel();
        let id = id.to_owned();
        let f = move |conn: &Connection, now: Millis, _: &mut Effects| -> DbResult<()> {
            conn.execute(
                UPSERT_HOST,
                params![
                    id,
                    1,
                    "h",
                    "[]",
                    now,
                    now,
                    None::<String>,
                    None::<String>,
                    None::<i64>
                ],
            )?;
            match then {
                "fail" => Err(Fail::App(Error::InvalidInput(format!("{id} refused")))),
                "panic" => panic!("{id} panicked"),
                _ => Ok(()),
            }
        };
        (
            Box::new(Op {
                op: "put_host",
                f,
                reply,
            }),
            answer,
        )
    }

    fn hosts(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare("SELECT id FROM hosts ORDER BY id").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn writer() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        migrate_now(&conn, 0).map_err(|_| "migrate").unwrap();
        conn
    }

    fn answer(rx: oneshot::Receiver<Result<()>>) -> std::result::Result<Result<()>, &'static str> {
        rx.blocking_recv().map_err(|_| "no answer")
    }

    /// A page after a cursor is a keyset search on the primary key, never
    /// a scan from the start or a sort: it costs the same at any depth.
    #[test]
    fn task_pages_after_a_cursor_search_the_primary_key() {
        let conn = writer();
        let id = TaskId::new();
        conn.execute(
            "INSERT INTO tasks (id, handler, input, state, priority, final_step, created_at, \
             updated_at) VALUES (?1, 'h', 'null', 'running', 0, 'h', 0, 0)",
            [id.0.as_bytes()],
        )
        .unwrap();
        for filter in [
            TaskFilter {
                after: Some(id),
                ..TaskFilter::default()
            },
            TaskFilter {
                after: Some(id),
                state: Some(TaskState::Failed),
                handler: Some("h".into()),
                root_only: true,
                ..TaskFilter::default()
            },
        ] {
            let plan = plan(&conn, &filter);
            assert!(
                plan.contains("rowid<?)") || plan.contains("seq<?"),
                "{filter:?}: the cursor is not a keyset search: {plan}"
            );
            assert!(
                !plan.contains("TEMP B-TREE"),
                "{filter:?}: the page is sorted, not read in order: {plan}"
            );
        }
    }

    fn plan(conn: &Connection, filter: &TaskFilter) -> String {
        let (sql, args) = list_tasks_sql(conn, filter).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        plan.join("; ")
    }

    /// Listings by handler, creation window and finish window search an
    /// index (migration 6) instead of walking the table newest first until
    /// the page is full, which at a million tasks meant a full scan for a
    /// rare handler or an old window; a handler's pages, after a cursor too,
    /// are read in listing order with no sort.
    #[test]
    fn task_listings_by_handler_and_time_search_an_index() {
        let conn = writer();
        let id = TaskId::new();
        conn.execute(
            "INSERT INTO tasks (id, handler, input, state, priority, final_step, created_at, \
             updated_at) VALUES (?1, 'h', 'null', 'running', 0, 'h', 0, 0)",
            [id.0.as_bytes()],
        )
        .unwrap();
        let by_handler = [
            TaskFilter {
                handler: Some("h".into()),
                ..TaskFilter::default()
            },
            TaskFilter {
                handler: Some("h".into()),
                state: Some(TaskState::Running),
                after: Some(id),
                ..TaskFilter::default()
            },
        ];
        for filter in &by_handler {
            let plan = plan(&conn, filter);
            assert!(
                plan.contains("USING INDEX tasks_handler (handler=?"),
                "{filter:?}: the handler index is not searched: {plan}"
            );
            assert!(
                !plan.contains("TEMP B-TREE"),
                "{filter:?}: the page is sorted, not read in order: {plan}"
            );
        }
        let by_time = [
            (
                TaskFilter {
                    created_after: Some(1),
                    created_before: Some(2),
                    ..TaskFilter::default()
                },
                "USING INDEX tasks_created (created_at>? AND created_at<?)",
            ),
            (
                TaskFilter {
                    finished_after: Some(1),
                    finished_before: Some(2),
                    ..TaskFilter::default()
                },
                "USING INDEX tasks_finished (updated_at>? AND updated_at<?)",
            ),
        ];
        for (filter, index) in &by_time {
            let plan = plan(&conn, filter);
            assert!(
                plan.contains(index),
                "{filter:?}: `{index}` is not searched: {plan}"
            );
        }
        // A window holding most of the table is read newest first, in
        // listing order, not through the index and sorted whole.
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO tasks (id, handler, input, state, priority, final_step, created_at, \
             updated_at) SELECT randomblob(16), 'h', 'null', 'cancelled', 0, 'h', 1, 1 FROM n",
            [NARROW_WINDOW],
        )
        .unwrap();
        for (filter, index) in &by_time {
            let plan = plan(&conn, filter);
            assert!(
                !plan.contains(index) && !plan.contains("TEMP B-TREE"),
                "{filter:?}: a wide window is sorted whole: {plan}"
            );
        }
    }

    #[test]
    fn a_failing_command_alone_rolls_back_its_transaction() {
        let conn = writer();
        let signals = Signals::new();
        for then in ["fail", "panic"] {
            let (cmd, rx) = put_host(then, then);
            run_batch(&conn, &mut vec![cmd], &SystemClock, &signals);
            match answer(rx) {
                Ok(Err(Error::InvalidInput(m))) => assert_eq!(then, "fail", "{m}"),
                Err(_) => assert_eq!(then, "panic", "a panicking command drops its reply"),
                other => panic!("unexpected answer for {then}: {other:?}"),
            }
            assert!(conn.is_autocommit(), "no transaction is left open");
            assert!(hosts(&conn).is_empty(), "nothing of `{then}` was kept");
        }
        let (cmd, rx) = put_host("ok", "ok");
        run_batch(&conn, &mut vec![cmd], &SystemClock, &signals);
        assert!(matches!(answer(rx), Ok(Ok(()))));
        assert_eq!(hosts(&conn), ["ok"]);
    }

    #[test]
    fn a_failing_command_in_a_batch_leaves_the_others_in_place() {
        let conn = writer();
        let signals = Signals::new();
        let (a, ra) = put_host("a", "ok");
        let (b, rb) = put_host("b", "fail");
        let (c, rc) = put_host("c", "panic");
        let (d, rd) = put_host("d", "ok");
        run_batch(&conn, &mut vec![a, b, c, d], &SystemClock, &signals);
        assert!(matches!(answer(ra), Ok(Ok(()))));
        assert!(matches!(answer(rb), Ok(Err(Error::InvalidInput(_)))));
        assert!(answer(rc).is_err());
        assert!(matches!(answer(rd), Ok(Ok(()))));
        assert!(conn.is_autocommit());
        assert_eq!(hosts(&conn), ["a", "d"]);
    }

    /// `PRAGMA synchronous` of the writer's and of a reader's connection.
    async fn synchronous_of(store: &SqliteStore) -> (i64, i64) {
        let q = |conn: &Connection| -> DbResult<i64> {
            Ok(conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
        };
        let w = store.write("pragma", move |c, _, _| q(c)).await.unwrap();
        let r = store.read("pragma", q).await.unwrap();
        (w, r)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn synchronous_is_full_unless_the_url_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        // PRAGMA synchronous: 1 NORMAL, 2 FULL, 3 EXTRA.
        for (query, expected, name) in [
            ("", 2, "full"),
            ("?synchronous=normal", 1, "normal"),
            ("?synchronous=NORMAL", 1, "normal"),
            ("?synchronous=Full", 2, "full"),
            ("?synchronous=extra", 3, "extra"),
        ] {
            let file = path(&format!("s{expected}{}.db", query.len()));
            let store = SqliteStore::open(&format!("{file}{query}"), StoreOptions::default())
                .await
                .unwrap();
            assert_eq!(
                synchronous_of(&store).await,
                (expected, expected),
                "{query}"
            );
            assert_eq!(store.synchronous().as_str(), name);
            assert!(
                store.url().ends_with(&format!("?synchronous={name}")),
                "{}",
                store.url()
            );
        }
        // Through the public URL form too.
        let store = crate::open(&format!("sqlite:{}?synchronous=normal", path("u.db")))
            .await
            .unwrap();
        assert!(
            store.url().ends_with("u.db?synchronous=normal"),
            "{}",
            store.url()
        );
        for (query, names) in [
            ("?synchronous=off", ["`synchronous`", "`off`"]),
            ("?synchronous=", ["`synchronous`", "full, normal or extra"]),
            ("?sync=full", ["`sync`", "synchronous=full|normal|extra"]),
        ] {
            match SqliteStore::open(
                &format!("{}{query}", path("bad.db")),
                StoreOptions::default(),
            )
            .await
            {
                Err(Error::Config(m)) => {
                    for n in names {
                        assert!(m.contains(n), "{query}: {m}");
                    }
                }
                other => panic!("{query}: expected a config error, got {other:?}"),
            }
        }
        assert!(
            !dir.path().join("bad.db").exists(),
            "a bad URL creates no file"
        );
    }

    /// A store seen from a process other than the one that opened it (a
    /// forked child) refuses reads and writes with a clear error instead of
    /// waiting forever for threads that do not exist there, and dropping it
    /// there does not try to join them; that process opens a store of its
    /// own for the same file. (The fork itself is exercised by the Python
    /// and Ruby suites; here the store is told it was opened elsewhere.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_from_another_process_refuses_to_work_and_is_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("{}", dir.path().join("fork.db").display());
        let parent = SqliteStore::open(&url, StoreOptions::default())
            .await
            .unwrap();
        parent
            .spawn(vec![NewTask::new("h", serde_json::json!(1))])
            .await
            .unwrap();
        let mut copy = SqliteStore::open_unshared(&url, StoreOptions::default())
            .await
            .unwrap();
        let real_owner = std::mem::replace(&mut Arc::get_mut(&mut copy).unwrap().owner, 1);
        for e in [
            copy.count_steps().await.map(|_| ()).unwrap_err(),
            copy.spawn(vec![NewTask::new("h", serde_json::json!(2))])
                .await
                .map(|_| ())
                .unwrap_err(),
        ] {
            assert!(
                matches!(&e, Error::Config(m) if m.contains("forked child") && m.contains("process 1 ")),
                "{e:?}"
            );
        }
        // Dropped "in the child": its threads are left alone (no hang).
        let t = std::time::Instant::now();
        drop(copy);
        assert!(t.elapsed() < Duration::from_secs(5));
        let _ = real_owner;
        // The registry is per process: another pid never gets this one.
        let key = (std::process::id() + 1, canonical_path(&url).unwrap());
        assert!(registry().lock().get(&key).is_none());
        assert_eq!(parent.count_steps().await.unwrap()["ready"], 1);
    }

    /// A steady load of spawns, claims, completions and reads, several at a
    /// time: the `-wal` file must stay within its bound throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_continuous_load() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        const LIMIT: u64 = 2 << 20;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("wal.db");
        let store = {
            let db = db.clone();
            blocking(move || {
                SqliteStore::open_blocking(
                    Some(db),
                    StoreOptions::default(),
                    Synchronous::Normal,
                    LIMIT,
                )
            })
            .await
            .map(Arc::new)
            .unwrap()
        };
        let wal = dir.path().join("wal.db-wal");
        let stop = Arc::new(AtomicBool::new(false));
        let largest = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (stop, largest, wal) = (stop.clone(), largest.clone(), wal.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::metadata(&wal) {
                        largest.fetch_max(m.len(), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let reader = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    store.count_steps().await.unwrap();
                }
            })
        };
        let workers: Vec<_> = (0..6)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let host = format!("host-{w}");
                    let handler = format!("h{w}");
                    let payload = "x".repeat(400);
                    for i in 0..300 {
                        let tasks = (0..4)
                            .map(|k| {
                                NewTask::new(
                                    &handler,
                                    serde_json::json!({ "i": i, "k": k, "p": payload }),
                                )
                            })
                            .collect();
                        store.spawn(tasks).await.unwrap();
                        let claimed = store
                            .claim(&host, &[(handler.clone(), 4)], 60_000)
                            .await
                            .unwrap();
                        let done = claimed
                            .steps
                            .iter()
                            .map(|s| Completion {
                                lease: Lease {
                                    step_id: s.step_id,
                                    task_id: s.task_id,
                                    attempt: s.attempt,
                                    run: s.run,
                                    host_id: host.clone(),
                                },
                                resolution: switchyard_core::Resolution::Completed(
                                    serde_json::json!({ "out": payload }),
                                ),
                            })
                            .collect();
                        store.complete(done).await.unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.await.unwrap();
        sampler.join().unwrap();
        let end = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let largest = largest.load(Ordering::Relaxed).max(end);
        let completed = store.count_steps().await.unwrap()["completed"];
        assert_eq!(completed, 6 * 300 * 4);
        assert!(
            largest <= LIMIT,
            "the WAL reached {largest} bytes (bound {LIMIT}), {end} at the end"
        );
    }
}
