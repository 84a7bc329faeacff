//! Helpers for the multi-process end-to-end tests: start `testhost` child
//! processes (killed when dropped), read the run log they append to, and wait
//! for conditions with a deadline.
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::json;
use switchyard::{Client, DynStore, NewTask, StateCounts, TaskId};
pub use switchyard_store::pg_server::PgServer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Some`, or fails once `timeout` has passed.
/// `what` names the condition in the error.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A test's scratch directory with its store (an SQLite file in it, or a
/// PostgreSQL database) and run log.
pub struct Scratch {
    /// Removed when dropped.
    pub dir: tempfile::TempDir,
    /// `sqlite:<dir>/switchyard.db` (or the URL given to [`Scratch::with_store_url`]).
    pub store_url: String,
    /// `<dir>/runs.log`, appended to by every `testhost`.
    pub log: PathBuf,
}

impl Scratch {
    /// A fresh directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-e2e-")
            .tempdir()?;
        let store_url = format!("sqlite:{}", dir.path().join("switchyard.db").display());
        let log = dir.path().join("runs.log");
        Ok(Self {
            dir,
            store_url,
            log,
        })
    }

    /// A fresh directory for the run log and host output, with the store at
    /// `store_url` (e.g. a PostgreSQL database from [`postgres_database`]).
    pub fn with_store_url(store_url: impl Into<String>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-e2e-")
            .tempdir()?;
        let log = dir.path().join("runs.log");
        Ok(Self {
            dir,
            store_url: store_url.into(),
            log,
        })
    }

    /// Opens the store from the test process (this also migrates the file
    /// before any host opens it).
    pub async fn open(&self) -> anyhow::Result<DynStore> {
        switchyard::open(&self.store_url)
            .await
            .with_context(|| format!("opening {}", self.store_url))
    }

    /// Options for a host on this scratch directory's store and log.
    pub fn host(&self, name: &str) -> HostConfig {
        HostConfig {
            name: name.to_string(),
            store_url: self.store_url.clone(),
            log: self.log.clone(),
            stderr: self.dir.path().join(format!("{name}.stderr")),
            handlers: vec!["work".into()],
            lease_ms: 30_000,
            concurrency: 16,
            grace_ms: 5_000,
            hold_ms: 0,
            release_file: None,
        }
    }

    /// Parses the run log as it is now.
    pub fn runs(&self) -> anyhow::Result<RunLog> {
        RunLog::read(&self.log)
    }
}

/// Command line of one `testhost`.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Label used in file names and messages.
    pub name: String,
    /// `--store`.
    pub store_url: String,
    /// `--log`.
    pub log: PathBuf,
    /// Where the child's stderr goes.
    pub stderr: PathBuf,
    /// `--handlers`.
    pub handlers: Vec<String>,
    /// `--lease-ms`.
    pub lease_ms: u64,
    /// `--concurrency`.
    pub concurrency: usize,
    /// `--grace-ms`.
    pub grace_ms: u64,
    /// `--hold-ms`.
    pub hold_ms: u64,
    /// `--release-file`.
    pub release_file: Option<PathBuf>,
}

impl HostConfig {
    /// Sets `--lease-ms`.
    pub fn lease_ms(mut self, ms: u64) -> Self {
        self.lease_ms = ms;
        self
    }
    /// Sets `--concurrency`.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
    /// Sets `--grace-ms`.
    pub fn grace_ms(mut self, ms: u64) -> Self {
        self.grace_ms = ms;
        self
    }
    /// Sets `--hold-ms`.
    pub fn hold_ms(mut self, ms: u64) -> Self {
        self.hold_ms = ms;
        self
    }
    /// Sets `--release-file`.
    pub fn release_file(mut self, path: &Path) -> Self {
        self.release_file = Some(path.to_path_buf());
        self
    }
    /// Sets `--handlers`.
    pub fn handlers(mut self, h: &[&str]) -> Self {
        self.handlers = h.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts the host and waits (up to 30 s) for its `ready <host_id>` line.
    pub async fn start(self, bin: &Path) -> anyhow::Result<Host> {
        let stderr = std::fs::File::create(&self.stderr)?;
        let mut cmd = Command::new(bin);
        if let Some(f) = &self.release_file {
            cmd.arg("--release-file").arg(f);
        }
        let mut child = cmd
            .arg("--store")
            .arg(&self.store_url)
            .arg("--handlers")
            .arg(self.handlers.join(","))
            .arg("--lease-ms")
            .arg(self.lease_ms.to_string())
            .arg("--concurrency")
            .arg(self.concurrency.to_string())
            .arg("--log")
            .arg(&self.log)
            .arg("--grace-ms")
            .arg(self.grace_ms.to_string())
            .arg("--hold-ms")
            .arg(self.hold_ms.to_string())
            .env(
                "RUST_LOG",
                std::env::var("E2E_HOST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{} exited at once", self.name))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut host = Host {
            child,
            host_id: String::new(),
            pid,
            config: self,
        };
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        match first {
            Ok(Ok(Some(line))) if line.starts_with("ready ") => {
                host.host_id = line["ready ".len()..].trim().to_string();
                Ok(host)
            }
            Ok(Ok(other)) => bail!(
                "{} did not start: stdout {other:?}; stderr:\n{}",
                host.config.name,
                host.stderr()
            ),
            Ok(Err(e)) => bail!("{}: reading stdout: {e}", host.config.name),
            Err(_) => bail!(
                "{} not ready after 30 s; stderr:\n{}",
                host.config.name,
                host.stderr()
            ),
        }
    }
}

/// A running `testhost` child process. Dropping it SIGKILLs the process (so
/// a failing test leaves nothing behind) and, if the test is panicking,
/// prints the host's stderr.
pub struct Host {
    child: Child,
    /// The id the host registered under.
    pub host_id: String,
    /// The child's process id.
    pub pid: u32,
    /// How it was started.
    pub config: HostConfig,
}

impl Host {
    /// The host's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.config.stderr).unwrap_or_default()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: libc::c_int) -> anyhow::Result<()> {
        // `id()` is `None` once the child has been reaped, so the pid cannot
        // have been reused by another process.
        let Some(pid) = self.child.id() else {
            bail!("{} has already exited", self.config.name)
        };
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        if rc != 0 {
            bail!("kill -{sig} {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Freezes the process (SIGSTOP): it stops heartbeating, as a host
    /// stuck in a long GC pause or swapped out would.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// SIGKILLs the host and reaps it. Fails if it had already exited.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited on its own before the kill ({status}); stderr:\n{}",
                self.config.name,
                self.stderr()
            );
        }
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Waits (up to `timeout`) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "{} still running after {timeout:?}; stderr:\n{}",
                self.config.name,
                self.stderr()
            ),
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.terminate()?;
        let status = self.wait_exit(timeout).await?;
        if !status.success() {
            bail!(
                "{} exited with {status} after SIGTERM; stderr:\n{}",
                self.config.name,
                self.stderr()
            );
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
        if std::thread::panicking() {
            let err = self.stderr();
            let tail: Vec<&str> = err.lines().rev().take(40).collect();
            eprintln!(
                "--- {} ({}) stderr, last lines ---",
                self.config.name, self.host_id
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Start or end of one run, as logged by the `work` handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mark {
    /// The handler began.
    Start,
    /// The handler finished (its completion may not have been recorded).
    End,
}

/// One run log line: `<task_id> <attempt> <host_id> <pid> start|end`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LogLine {
    /// The task.
    pub task: String,
    /// The attempt the run held.
    pub attempt: u32,
    /// The host that ran it.
    pub host: String,
    /// That host's pid.
    pub pid: u32,
    /// Start or end.
    pub mark: Mark,
}

/// The parsed run log.
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    /// Every complete line, in file order.
    pub lines: Vec<LogLine>,
}

impl RunLog {
    /// Reads and parses the log; a trailing partial line (a write in
    /// progress) is ignored, a malformed complete line is an error.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        let mut lines = Vec::new();
        for (n, l) in complete.lines().enumerate() {
            let f: Vec<&str> = l.split(' ').collect();
            let parsed = (|| -> Option<LogLine> {
                if f.len() != 5 {
                    return None;
                }
                let mark = match f[4] {
                    "start" => Mark::Start,
                    "end" => Mark::End,
                    _ => return None,
                };
                Some(LogLine {
                    task: f[0].to_string(),
                    attempt: f[1].parse().ok()?,
                    host: f[2].to_string(),
                    pid: f[3].parse().ok()?,
                    mark,
                })
            })();
            lines.push(parsed.ok_or_else(|| anyhow!("run log line {}: malformed: {l:?}", n + 1))?);
        }
        Ok(Self { lines })
    }

    /// Lines with this mark.
    pub fn marked(&self, mark: Mark) -> impl Iterator<Item = &LogLine> {
        self.lines.iter().filter(move |l| l.mark == mark)
    }

    /// Start lines per `(task, attempt)`.
    pub fn starts_by_attempt(&self) -> HashMap<(String, u32), Vec<&LogLine>> {
        let mut m: HashMap<(String, u32), Vec<&LogLine>> = HashMap::new();
        for l in self.marked(Mark::Start) {
            m.entry((l.task.clone(), l.attempt)).or_default().push(l);
        }
        m
    }

    /// Lines per task, in file order.
    pub fn by_task(&self) -> HashMap<&str, Vec<&LogLine>> {
        let mut m: HashMap<&str, Vec<&LogLine>> = HashMap::new();
        for l in &self.lines {
            m.entry(l.task.as_str()).or_default().push(l);
        }
        m
    }

    /// True if the log has this exact line.
    pub fn has(&self, task: &str, attempt: u32, host: &str, mark: Mark) -> bool {
        self.lines
            .iter()
            .any(|l| l.task == task && l.attempt == attempt && l.host == host && l.mark == mark)
    }

    /// Number of start lines per host.
    pub fn starts_per_host(&self) -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for l in self.marked(Mark::Start) {
            *m.entry(l.host.as_str()).or_default() += 1;
        }
        m
    }
}

/// Number of steps in `state` (0 if none).
pub fn count(counts: &StateCounts, state: &str) -> u64 {
    counts.get(state).copied().unwrap_or(0)
}

/// Spawns `n` `work` tasks with `input` (plus `"i": index`) and `priority`,
/// in chunks so no single write transaction is huge.
pub async fn spawn_work(
    client: &Client,
    n: usize,
    input: serde_json::Value,
    priority: i32,
) -> anyhow::Result<Vec<TaskId>> {
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let chunk: Vec<NewTask> = (i..(i + 500).min(n))
            .map(|k| {
                let mut v = input.clone();
                v["i"] = json!(k);
                NewTask::new("work", v).priority(priority)
            })
            .collect();
        i += chunk.len();
        for s in client.spawn_many(chunk).await? {
            ids.push(s.task_id);
        }
    }
    Ok(ids)
}

/// The first half of a crash test: spawns `held` tasks that a host holds
/// until it dies (high priority, so it claims them first) and `tasks - held`
/// short ones, starts host `first` (1 s leases, 16 slots), waits until a
/// tenth of the work is done and every held task has started on it, then
/// SIGKILLs it. Checks that the kill caught work in flight and returns the
/// dead host, the held task ids and the completed count seen before the kill.
pub async fn kill_first_host_midway(
    scratch: &Scratch,
    store: &DynStore,
    bin: &Path,
    tasks: usize,
    held: usize,
) -> anyhow::Result<(Host, HashSet<String>, u64)> {
    kill_first_host_midway_with_lease(scratch, store, bin, tasks, held, 1000).await
}

/// [`kill_first_host_midway`] with the first host's lease.
pub async fn kill_first_host_midway_with_lease(
    scratch: &Scratch,
    store: &DynStore,
    bin: &Path,
    tasks: usize,
    held: usize,
    lease_ms: u64,
) -> anyhow::Result<(Host, HashSet<String>, u64)> {
    let client = Client::new(store.clone());
    let held_ids: HashSet<String> = spawn_work(&client, held, json!({"hold": true}), 10)
        .await?
        .iter()
        .map(|t| t.to_string())
        .collect();
    spawn_work(&client, tasks - held, json!({"sleep_ms": 2}), 0).await?;

    let mut first = scratch
        .host("first")
        .lease_ms(lease_ms)
        .concurrency(16)
        .hold_ms(600_000)
        .start(bin)
        .await?;

    // Kill once some work is done and every held step has started.
    let first_id = first.host_id.clone();
    let done_at_kill = wait_until("first host to be mid-way", Duration::from_secs(40), || {
        let (held_ids, first_id) = (&held_ids, &first_id);
        async move {
            let done = count(&store.count_steps().await?, "completed");
            if done < (tasks / 10) as u64 {
                return Ok(None);
            }
            let runs = scratch.runs()?;
            let started: HashSet<&str> = runs
                .marked(Mark::Start)
                .filter(|l| &l.host == first_id)
                .map(|l| l.task.as_str())
                .collect();
            Ok(held_ids
                .iter()
                .all(|t| started.contains(t.as_str()))
                .then_some(done))
        }
    })
    .await?;
    first.kill().await?;

    let at_kill = store.count_steps().await?;
    anyhow::ensure!(
        count(&at_kill, "completed") < tasks as u64,
        "the first host finished everything before it was killed: {at_kill:?}"
    );
    anyhow::ensure!(
        count(&at_kill, "running") >= held as u64,
        "the killed host's held steps should still be leased to it: {at_kill:?}"
    );
    anyhow::ensure!(count(&at_kill, "completed") >= done_at_kill);
    Ok((first, held_ids, done_at_kill))
}

/// Waits until `n` steps are `completed` and none is `ready`, `running` or
/// `blocked`, or fails with the counts once `timeout` has passed.
pub async fn wait_all_completed(
    store: &DynStore,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<StateCounts> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let c = store.count_steps().await?;
        let busy = ["ready", "running", "blocked"]
            .iter()
            .any(|s| count(&c, s) > 0);
        if count(&c, "completed") >= n && !busy {
            return Ok(c);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {n} completed steps; step counts: {c:?}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// This machine's name, as hosts report it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Starts a throwaway PostgreSQL server (see
/// [`switchyard_store::pg_server`]; it stops when dropped and dies with the
/// test process) and creates a fresh database on it. Returns the server and
/// the database URL. Fails, saying to install `postgresql`, when the server
/// binaries are missing.
pub async fn postgres_database() -> anyhow::Result<(PgServer, String)> {
    let server = tokio::task::spawn_blocking(PgServer::start)
        .await
        .context("starting PostgreSQL")??;
    let url = server.fresh_database().await?;
    Ok((server, url))
}

/// Runs `testhost --store URL --migrate` and returns the schema version it
/// printed; fails with its stderr if it did not succeed.
pub async fn migrate_process(bin: &Path, store_url: &str) -> anyhow::Result<u32> {
    let out = Command::new(bin)
        .arg("--store")
        .arg(store_url)
        .arg("--migrate")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "migrate exited with {}: stdout {stdout:?}; stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .trim()
        .strip_prefix("migrated ")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("migrate printed {stdout:?}"))
}
