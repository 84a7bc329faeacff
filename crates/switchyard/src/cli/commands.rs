//! The store-facing subcommands: migrate, spawn, emit, tasks, events,
//! cancel, retry, workers, cleanup.
//!
//! Every argument is validated before the store is opened, so a typo never
//! creates a database file or leaves anything behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use switchyard::client::{check_size, parse_json, validate_name, DEFAULT_MAX_PAYLOAD};
use switchyard::{
    Client, DynStore, Error, HostInfo, Millis, NewTask, StepState, TaskDetail, TaskFilter, TaskId,
    TaskRecord, TaskState,
};

use super::output::{opt_time, relative, short_json, time, Table};
use crate::{CleanupArgs, EmitArgs, RetryArgs, SpawnArgs, TasksListArgs, WatchArgs};

/// A failure to report on stderr (or as JSON with `--json`), with the
/// process exit code.
#[derive(Debug)]
pub struct CliError {
    /// 2 for usage errors and invalid input, 3 when the store is missing,
    /// unreachable or failing, 1 otherwise.
    pub code: u8,
    /// A stable identifier of the kind of failure for scripts (`usage`,
    /// `invalid_input`, `payload_too_large`, `store_unavailable`,
    /// `not_found`, `conflict`, `timeout`, `failure`, ...).
    pub kind: &'static str,
    /// What went wrong, naming the argument or resource.
    pub message: String,
}

impl CliError {
    /// Invalid input or usage (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            kind: "usage",
            message: message.into(),
        }
    }
    /// Any other failure (exit code 1).
    pub fn failure(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            kind: "failure",
            message: message.into(),
        }
    }
    /// The same error with another kind.
    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
    /// The `--json` form: `{"error":{"code":KIND,"message":...,"exit":N}}`.
    pub fn to_json(&self) -> Value {
        json!({ "error": { "code": self.kind, "message": self.message, "exit": self.code } })
    }
}

/// The kind of a core error, for [`CliError::kind`].
fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::InvalidInput(_) => "invalid_input",
        Error::PayloadTooLarge { .. } => "payload_too_large",
        Error::Config(_) => "config",
        Error::Store(_) => "store_unavailable",
        Error::NotFound(_) => "not_found",
        Error::Conflict(_) => "conflict",
        Error::Timeout(_) => "timeout",
        Error::LeaseLost(_) | Error::Cancelled(_) => "conflict",
        Error::Shutdown => "shutdown",
        Error::TaskFailed { .. } => "task_failed",
        Error::TaskCancelled { .. } => "task_cancelled",
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        let kind = error_kind(&e);
        let code = match e {
            Error::InvalidInput(_) | Error::PayloadTooLarge { .. } | Error::Config(_) => 2,
            Error::Store(_) => UNAVAILABLE,
            _ => 1,
        };
        Self {
            code,
            kind,
            message: e.to_string(),
        }
    }
}

/// How a command that ran to the end went: `Failure` exits 1 after its
/// output was printed (e.g. `spawn --wait` on a task that failed).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1.
    Failure,
}

pub type CmdResult = Result<Outcome, CliError>;

/// Whether opening a store may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Writing commands: a missing SQLite file is created (and migrated).
    Create,
    /// Read-only commands: a missing SQLite file is an error and is not
    /// created (the store opens it without SQLite's create flag).
    Existing,
}

/// Opens the store named by `url`, with an error naming the URL. A
/// directory given as an SQLite path is refused here because SQLite's own
/// message ("unable to open database file") does not say why.
pub async fn open_store(url: &str, mode: Open) -> Result<DynStore, CliError> {
    let trimmed = url.trim();
    // Every message below names the URL without its password.
    let shown = switchyard::redact_url(trimmed);
    if let Some(path) = trimmed
        .strip_prefix("sqlite://")
        .or_else(|| trimmed.strip_prefix("sqlite:"))
    {
        if std::path::Path::new(path).is_dir() {
            return Err(CliError::failure(format!(
                "cannot open store `{shown}`: `{path}` is a directory, not an SQLite database file"
            ))
            .kind("store_unavailable"));
        }
    }
    let options = switchyard::StoreOptions {
        create: mode == Open::Create,
        ..switchyard::StoreOptions::default()
    };
    switchyard::open_with(trimmed, options).await.map_err(|e| {
        let message = match &e {
            Error::NotFound(what) => format!(
                "cannot open store `{shown}`: {what}; this command only reads and does not \
                 create it: create it with `switchyard --store {shown} migrate` (or by \
                 starting a worker on it), or check the path"
            ),
            other => format!("cannot open store `{shown}`: {other}"),
        };
        CliError {
            code: open_exit_code(&e),
            kind: match &e {
                Error::NotFound(_) | Error::Store(_) => "store_unavailable",
                other => error_kind(other),
            },
            message: switchyard::redact_url(&message),
        }
    })
}

/// The exit code of a failure to open a store: 2 for an invalid URL or
/// option, 3 when the store is missing or unreachable, 1 otherwise.
fn open_exit_code(e: &Error) -> u8 {
    match e {
        Error::Config(_) | Error::InvalidInput(_) => 2,
        Error::NotFound(_) | Error::Store(_) => UNAVAILABLE,
        _ => 1,
    }
}

/// Exit code for a store that is missing, unreachable or unavailable.
pub const UNAVAILABLE: u8 = 3;

fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<(), CliError> {
    let text = serde_json::to_string(v)
        .map_err(|e| CliError::failure(format!("encoding JSON output: {e}")))?;
    print_text(&format!("{text}\n"))
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_text(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::failure(format!("writing to stdout: {e}"))),
    }
}

/// A JSON argument: the text itself, `@PATH` for a file's contents or `-`
/// for standard input; parsed and checked against the store's payload limit
/// before the store is opened.
fn json_arg(flag: &str, what: &str, arg: &str) -> Result<Value, CliError> {
    let (text, from) = if arg == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut buf)
            .map_err(|e| CliError::usage(format!("{flag} -: cannot read standard input: {e}")))?;
        (buf, " (from standard input)".to_string())
    } else if let Some(path) = arg.strip_prefix('@') {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("{flag} @{path}: cannot read `{path}`: {e}")))?;
        (text, format!(" (from `{path}`)"))
    } else {
        (arg.to_string(), String::new())
    };
    let value = parse_json(&format!("{flag}{from}"), &text)?;
    match check_size(what, &value, DEFAULT_MAX_PAYLOAD) {
        Ok(()) => Ok(value),
        Err(Error::PayloadTooLarge { size, limit, .. }) => Err(CliError::usage(format!(
            "{flag}{from}: the {what} is {size} bytes, over the store's payload limit of \
             {limit} bytes ({} KiB); nothing was stored",
            limit / 1024
        ))
        .kind("payload_too_large")),
        Err(e) => Err(e.into()),
    }
}

fn parse_id(text: &str) -> Result<TaskId, CliError> {
    TaskId::from_str(text)
        .map_err(|_| CliError::usage(format!("`{text}` is not a valid task id (expected a UUID)")))
}

/// `switchyard config`: the effective configuration, secrets as `***`.
pub fn show_config(config: &switchyard::Config, json: bool) -> CmdResult {
    if json {
        print_json(&config.redacted())?;
    } else {
        print_text(&config.to_toml_redacted())?;
    }
    Ok(Outcome::Success)
}

/// `switchyard migrate`.
pub async fn migrate(url: &str, json: bool) -> CmdResult {
    let store = open_store(url, Open::Create).await?;
    let version = store.migrate().await?;
    if json {
        print_json(&json!({ "store": store.url(), "schema_version": version }))?;
    } else {
        print_text(&format!("schema version {version}\n"))?;
    }
    Ok(Outcome::Success)
}

/// `switchyard spawn`.
pub async fn spawn(url: &str, json: bool, a: SpawnArgs) -> CmdResult {
    validate_name("handler name", &a.name)?;
    let input = json_arg("--input", "input", &a.input)?;
    let mut task = NewTask::new(&a.name, input).priority(a.priority);
    if let Some(k) = &a.idempotency_key {
        validate_name("--idempotency-key", k)?;
        task = task.idempotency_key(k);
    }
    if let Some(e) = &a.response_event {
        validate_name("--response-event", e)?;
        task = task.response_event(e);
    }
    for h in &a.headers {
        let Some((k, v)) = h.split_once('=') else {
            return Err(CliError::usage(format!(
                "--header `{h}` is not of the form key=value"
            )));
        };
        validate_name("--header name", k)?;
        task = task.header(k, v);
    }
    let wait = match a.wait {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            return Err(CliError::usage(format!(
                "--wait {s} is not a number of seconds >= 0"
            )));
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };

    let store = open_store(url, Open::Create).await?;
    let client = Client::new(store.clone());
    let spawned = client.spawn_task(task).await?;
    let id = spawned.task_id;
    // Not an error: a worker may start later. But say so now rather than
    // leave the task waiting silently.
    let unserved = match (client.workers().await, store.now().await) {
        (Ok(hosts), Ok(now)) => !hosts
            .iter()
            .any(|h| h.is_live(now) && h.handlers.contains(&a.name)),
        _ => false,
    };
    let unserved_note = format!(
        "no live host serves handler `{}` (none heartbeated within {} s listing it); \
         the task waits until a worker that registers `{}` starts",
        a.name,
        switchyard::LIVE_HOST_WINDOW_MS / 1000,
        a.name
    );
    if unserved {
        eprintln!("warning: {unserved_note}");
    }
    let Some(wait) = wait else {
        if json {
            print_json(&spawned)?;
        } else if spawned.created {
            print_text(&format!("{id}\n"))?;
        } else {
            print_text(&format!(
                "{id}\ncreated: false (idempotency key matched an existing task)\n"
            ))?;
        }
        return Ok(Outcome::Success);
    };

    let t = match client.wait(id, wait).await {
        Ok(t) => t,
        Err(Error::Timeout(_)) => {
            let state = client
                .get(id)
                .await
                .map(|t| t.state.to_string())
                .unwrap_or_else(|_| "unknown".into());
            let mut message = format!(
                "timed out after {} s waiting for task {id} (handler `{}`) to finish; it is still {state}",
                a.wait.unwrap_or_default(),
                a.name
            );
            if unserved {
                let _ = write!(message, ": {unserved_note}");
            }
            let _ = write!(message, " (see `switchyard tasks show {id}`)");
            return Err(CliError::failure(message).kind("timeout"));
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        print_json(&json!({
            "task_id": id,
            "created": spawned.created,
            "state": t.state,
            "result": t.result,
            "error": t.error,
        }))?;
    } else {
        let mut s = format!("{id}\n");
        if !spawned.created {
            s.push_str("created: false (idempotency key matched an existing task)\n");
        }
        let _ = writeln!(s, "state: {}", t.state);
        match (&t.result, &t.error) {
            (Some(r), _) => {
                let _ = writeln!(s, "result: {r}");
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "error: {e}");
            }
            (None, None) => {}
        }
        print_text(&s)?;
    }
    Ok(if t.state == TaskState::Completed {
        Outcome::Success
    } else {
        Outcome::Failure
    })
}

/// `switchyard emit`.
pub async fn emit(url: &str, json: bool, a: EmitArgs) -> CmdResult {
    validate_name("event name", &a.name)?;
    let payload = json_arg("--payload", "event payload", &a.payload)?;
    let store = open_store(url, Open::Create).await?;
    let stored = Client::new(store).emit(&a.name, payload).await?;
    if json {
        print_json(&json!({ "name": a.name, "stored": stored }))?;
    } else if stored {
        print_text(&format!("emitted event `{}`\n", a.name))?;
    } else {
        print_text(&format!(
            "event `{}` was already emitted; the first payload is kept (first write wins)\n",
            a.name
        ))?;
    }
    Ok(Outcome::Success)
}

/// `switchyard tasks list`.
pub async fn tasks_list(url: &str, json: bool, a: TasksListArgs) -> CmdResult {
    let mut filter = TaskFilter {
        handler: a.handler.clone(),
        limit: a.limit,
        root_only: a.root,
        ..TaskFilter::default()
    };
    match a.state.as_deref() {
        None => {}
        Some("suspended") => filter.step_state = Some(StepState::Suspended),
        Some(s) => {
            filter.state = Some(TaskState::from_str(s).map_err(|_| {
                CliError::usage(format!(
                    "--state `{s}` is not a task state (expected one of: {}, suspended)",
                    TaskState::ALL
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?)
        }
    }
    if let Some(p) = &a.parent {
        filter.parent = Some(TaskId::from_str(p).map_err(|_| {
            CliError::usage(format!("--parent `{p}` is not a task id (expected a UUID)"))
        })?);
    }
    if a.limit == 0 {
        return Err(CliError::usage("--limit must be at least 1"));
    }
    let store = open_store(url, Open::Existing).await?;
    let tasks = Client::new(store).list(&filter).await?;
    if json {
        print_json(&tasks)?;
        return Ok(Outcome::Success);
    }
    let mut t = Table::new(&[
        "ID", "STATE", "HANDLER", "PARENT", "PRIORITY", "CREATED", "UPDATED",
    ]);
    for task in &tasks {
        t.row(vec![
            task.id.to_string(),
            task.state.to_string(),
            task.handler.clone(),
            task.parent
                .as_ref()
                .map_or_else(|| "-".into(), |p| p.task_id.to_string()),
            task.priority.to_string(),
            time(task.created_at),
            time(task.updated_at),
        ]);
    }
    print_text(&t.render())?;
    Ok(Outcome::Success)
}

/// What `tasks show` derives from a task's detail and the registered hosts.
#[derive(Serialize)]
struct ShowDoc<'a> {
    #[serde(flatten)]
    detail: &'a TaskDetail,
    waits: Vec<Value>,
    groups: Vec<Value>,
    unserved: Vec<Value>,
}

fn build_show<'a>(detail: &'a TaskDetail, hosts: &[HostInfo], now: Millis) -> ShowDoc<'a> {
    let waits = detail
        .steps
        .iter()
        .filter(|s| s.state == StepState::Suspended)
        .map(|s| {
            let w = s.wait.clone().unwrap_or_default();
            json!({ "step": s.name, "event": w.event, "wake_at": w.wake_at, "group": w.group })
        })
        .collect();
    let mut by_group: BTreeMap<&str, Vec<&TaskRecord>> = BTreeMap::new();
    for c in &detail.children {
        if let Some(g) = c.parent.as_ref().and_then(|p| p.group.as_deref()) {
            by_group.entry(g).or_default().push(c);
        }
    }
    let groups = by_group
        .into_iter()
        .map(|(g, mut kids)| {
            kids.sort_by_key(|k| k.parent.as_ref().map(|p| p.index).unwrap_or(0));
            let finished = kids.iter().filter(|k| k.state.is_terminal()).count();
            let children: Vec<Value> = kids
                .iter()
                .map(|k| json!({ "task_id": k.id, "state": k.state }))
                .collect();
            json!({ "group": g, "size": kids.len(), "finished": finished, "children": children })
        })
        .collect();
    let unserved = detail
        .steps
        .iter()
        .filter(|s| s.state == StepState::Ready)
        .filter(|s| !hosts.iter().any(|h| h.is_live(now) && h.handlers.contains(&s.handler)))
        .map(|s| {
            json!({
                "step": s.name,
                "handler": s.handler,
                "message": format!(
                    "step `{}` is ready but no live host serves handler `{}` (no host heartbeated within {} s lists it); start a worker that registers `{}`",
                    s.name, s.handler, switchyard::LIVE_HOST_WINDOW_MS / 1000, s.handler
                ),
            })
        })
        .collect();
    ShowDoc {
        detail,
        waits,
        groups,
        unserved,
    }
}

/// `switchyard tasks show`.
pub async fn tasks_show(url: &str, json: bool, id: &str, internal: bool) -> CmdResult {
    let id = parse_id(id)?;
    let store = open_store(url, Open::Existing).await?;
    let client = Client::new(store.clone());
    let mut detail = client.inspect(id).await?;
    if !internal {
        detail
            .checkpoints
            .retain(|c| !switchyard::keys::is_internal(&c.key));
    }
    let hosts = client.workers().await?;
    let now = store.now().await?;
    let doc = build_show(&detail, &hosts, now);
    if json {
        print_json(&doc)?;
    } else {
        print_text(&render_show(&doc, now))?;
    }
    Ok(Outcome::Success)
}

/// What `tasks watch` compares between two looks: per step, its state,
/// attempt, run, status and wait; and the task's state.
/// The steps come first, so a task's end is the last line.
fn watch_view(d: &switchyard::TaskDetail) -> Vec<(String, Value)> {
    let mut v = Vec::with_capacity(d.steps.len() + 1);
    for s in &d.steps {
        v.push((
            s.name.clone(),
            json!({
                "state": s.state.to_string(),
                "attempt": s.attempt,
                "run": s.run,
                "status": s.status,
                "wait": s.wait,
            }),
        ));
    }
    v.push((String::new(), json!({ "state": d.task.state.to_string() })));
    v
}

/// `switchyard tasks watch`.
pub async fn tasks_watch(url: &str, json: bool, a: WatchArgs) -> CmdResult {
    let id = parse_id(&a.id)?;
    let interval = switchyard::client::duration_from_secs("--interval", a.interval)
        .map_err(|e| CliError::usage(e.to_string()))?
        .max(Duration::from_millis(10));
    let deadline = match a.timeout {
        Some(t) => Some(
            std::time::Instant::now()
                + switchyard::client::duration_from_secs("--timeout", t)
                    .map_err(|e| CliError::usage(e.to_string()))?,
        ),
        None => None,
    };
    let store = open_store(url, Open::Existing).await?;
    let client = Client::new(store.clone());
    let mut seen: std::collections::HashMap<String, Value> = Default::default();
    loop {
        let d = client.inspect(id).await?;
        let now = store.now().await?;
        for (name, view) in watch_view(&d) {
            if seen.get(&name) == Some(&view) {
                continue;
            }
            if json {
                let mut line = json!({ "at": now, "task_id": id.to_string() });
                if name.is_empty() {
                    line["task"] = view.clone();
                } else {
                    line["step"] = json!(name);
                    line["change"] = view.clone();
                }
                print_json(&line)?;
            } else {
                let what = if name.is_empty() {
                    format!("task {}", view["state"].as_str().unwrap_or("?"))
                } else {
                    let mut w = format!(
                        "step `{name}` {} (attempt {}, run {})",
                        view["state"].as_str().unwrap_or("?"),
                        view["attempt"],
                        view["run"]
                    );
                    if let Some(st) = view["status"].as_str() {
                        let _ = write!(w, " status `{st}`");
                    }
                    if let Some(e) = view["wait"]["event"].as_str() {
                        let _ = write!(w, " waiting for event `{e}`");
                    }
                    if let Some(t) = view["wait"]["wake_at"].as_i64() {
                        let _ = write!(w, " until {}", super::output::time(t));
                    }
                    if view["wait"]["group"].is_string() {
                        w.push_str(" waiting for its children");
                    }
                    w
                };
                print_text(&format!("{}  {what}\n", super::output::time(now)))?;
            }
            seen.insert(name, view);
        }
        if d.task.state.is_terminal() {
            if !json {
                if let Some(e) = &d.task.error {
                    print_text(&format!("error: {e}\n"))?;
                }
            }
            return Ok(if d.task.state == switchyard::TaskState::Completed {
                Outcome::Success
            } else {
                Outcome::Failure
            });
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Err(CliError::failure(format!(
                "task {id} is still {} after --timeout {}s",
                d.task.state,
                a.timeout.unwrap_or_default()
            )));
        }
        tokio::time::sleep(interval).await;
    }
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}\n")).collect()
}

fn render_show(doc: &ShowDoc<'_>, now: Millis) -> String {
    let d = doc.detail;
    let t = &d.task;
    let mut s = String::new();
    let mut field = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<16}{v}");
    };
    field("task", t.id.to_string());
    field("handler", t.handler.clone());
    field("state", t.state.to_string());
    field("priority", t.priority.to_string());
    if let Some(k) = &t.idempotency_key {
        field("idempotency key", k.clone());
    }
    if let Some(e) = &t.response_event {
        field("response event", e.clone());
    }
    if !t.headers.is_empty() {
        field(
            "headers",
            t.headers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    if let Some(p) = &t.parent {
        let g = p
            .group
            .as_ref()
            .map(|g| format!(" (group {g} #{})", p.index))
            .unwrap_or_default();
        field("parent", format!("{} step {}{g}", p.task_id, p.step_id));
    }
    field(
        "created",
        format!("{} ({})", time(t.created_at), relative(t.created_at, now)),
    );
    field(
        "updated",
        format!("{} ({})", time(t.updated_at), relative(t.updated_at, now)),
    );
    field("input", t.input.to_string());
    if let Some(r) = &t.result {
        field("result", r.to_string());
    }
    if let Some(e) = &t.error {
        field("error", format!("{e} (attempt {})", e.attempt));
        if let Some(tr) = &e.trace {
            s.push_str(&indent(tr, "    "));
        }
    }

    let _ = writeln!(s, "\nsteps ({}):", d.steps.len());
    let mut st = Table::new(&[
        "NAME",
        "HANDLER",
        "STATE",
        "STATUS",
        "ATTEMPT",
        "RUN",
        "RUN AT",
        "LEASE OWNER",
        "DEPENDS ON",
    ]);
    for step in &d.steps {
        st.row(vec![
            step.name.clone(),
            step.handler.clone(),
            step.state.to_string(),
            step.status.clone().unwrap_or_else(|| "-".into()),
            step.attempt.to_string(),
            step.run.to_string(),
            opt_time(step.run_at),
            step.lease_owner.clone().unwrap_or_else(|| "-".into()),
            if step.depends_on.is_empty() {
                "-".into()
            } else {
                step.depends_on.join(",")
            },
        ]);
    }
    s.push_str(&indent(&st.render(), "  "));
    for step in &d.steps {
        for (status, routed) in &step.routes {
            let names: Vec<&str> = routed.iter().map(|r| r.name.as_str()).collect();
            let _ = writeln!(
                s,
                "  step `{}` routes `{status}` to: {}",
                step.name,
                if names.is_empty() {
                    "(nothing)".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
    }
    for step in &d.steps {
        if let Some(e) = &step.error {
            let _ = writeln!(
                s,
                "  step `{}` error (attempt {}): {e}",
                step.name, e.attempt
            );
            if let Some(tr) = &e.trace {
                s.push_str(&indent(tr, "      "));
            }
        }
    }

    if !d.checkpoints.is_empty() {
        let _ = writeln!(s, "\ncheckpoints ({}):", d.checkpoints.len());
        let mut ct = Table::new(&["KEY", "RUN", "CREATED", "VALUE"]);
        for c in &d.checkpoints {
            ct.row(vec![
                c.key.clone(),
                c.run.to_string(),
                time(c.created_at),
                short_json(&c.value, 60),
            ]);
        }
        s.push_str(&indent(&ct.render(), "  "));
    }

    if !doc.waits.is_empty() {
        let _ = writeln!(s, "\nwaits:");
        let mut wt = Table::new(&["STEP", "EVENT", "WAKE AT", "GROUP"]);
        for w in &doc.waits {
            let text = |k: &str| {
                w[k].as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| "-".into())
            };
            let wake = w["wake_at"]
                .as_i64()
                .map(|m| format!("{} ({})", time(m), relative(m, now)));
            wt.row(vec![
                text("step"),
                text("event"),
                wake.unwrap_or_else(|| "-".into()),
                text("group"),
            ]);
        }
        s.push_str(&indent(&wt.render(), "  "));
    }

    if !d.children.is_empty() {
        let _ = writeln!(s, "\nchildren ({}):", d.children.len());
        let mut kt = Table::new(&["ID", "HANDLER", "STATE", "GROUP"]);
        for c in &d.children {
            let g = c
                .parent
                .as_ref()
                .and_then(|p| p.group.as_ref().map(|g| format!("{g} #{}", p.index)))
                .unwrap_or_else(|| "-".into());
            kt.row(vec![
                c.id.to_string(),
                c.handler.clone(),
                c.state.to_string(),
                g,
            ]);
        }
        s.push_str(&indent(&kt.render(), "  "));
    }

    if !doc.groups.is_empty() {
        let _ = writeln!(s, "\ndelegation groups:");
        let mut gt = Table::new(&["GROUP", "CHILDREN", "FINISHED"]);
        for g in &doc.groups {
            gt.row(vec![
                g["group"].as_str().unwrap_or("").to_string(),
                g["size"].to_string(),
                g["finished"].to_string(),
            ]);
        }
        s.push_str(&indent(&gt.render(), "  "));
    }

    if !doc.unserved.is_empty() {
        s.push('\n');
        for u in &doc.unserved {
            let _ = writeln!(s, "warning: {}", u["message"].as_str().unwrap_or(""));
        }
    }
    s
}

/// `switchyard events list`.
pub async fn events_list(url: &str, json: bool, limit: usize, prefix: Option<&str>) -> CmdResult {
    if limit == 0 {
        return Err(CliError::usage("--limit must be at least 1"));
    }
    let store = open_store(url, Open::Existing).await?;
    let events = store
        .list_events_prefixed(prefix.unwrap_or(""), limit)
        .await?;
    if json {
        print_json(&events)?;
        return Ok(Outcome::Success);
    }
    let mut t = Table::new(&["NAME", "CREATED", "PAYLOAD"]);
    for e in &events {
        t.row(vec![
            e.name.clone(),
            time(e.created_at),
            short_json(&e.payload, 80),
        ]);
    }
    print_text(&t.render())?;
    Ok(Outcome::Success)
}

/// `switchyard cancel`.
pub async fn cancel(url: &str, json: bool, id: &str, cascade: bool) -> CmdResult {
    let id = parse_id(id)?;
    let store = open_store(url, Open::Create).await?;
    let client = Client::new(store);
    let cancelled = client.cancel(id, cascade).await?;
    if json {
        print_json(&json!({ "task_id": id, "cancelled": cancelled }))?;
    } else if cancelled {
        print_text(&format!(
            "cancelled task {id}{}\n",
            if cascade {
                " and its unfinished descendants"
            } else {
                ""
            }
        ))?;
    } else {
        let state = client
            .get(id)
            .await
            .map(|t| t.state.to_string())
            .unwrap_or_else(|_| "finished".into());
        print_text(&format!(
            "task {id} had already finished ({state}); nothing was cancelled\n"
        ))?;
    }
    Ok(Outcome::Success)
}

/// `switchyard retry`.
pub async fn retry(url: &str, json: bool, a: RetryArgs) -> CmdResult {
    let Some(id) = a.id.as_deref() else {
        return retry_failed(url, json, a).await;
    };
    let id = parse_id(id)?;
    let store = open_store(url, Open::Create).await?;
    Client::new(store).retry(id).await?;
    if json {
        print_json(&json!({ "task_id": id, "retried": true }))?;
    } else {
        print_text(&format!(
            "task {id} will run again (completed steps and checkpoints are kept)\n"
        ))?;
    }
    Ok(Outcome::Success)
}

/// `switchyard retry --failed`: every failed task matching the filter, with
/// a progress bar on a terminal's stderr.
async fn retry_failed(url: &str, json: bool, a: RetryArgs) -> CmdResult {
    use std::io::IsTerminal as _;
    if a.max == 0 {
        return Err(CliError::usage("--max: must be at least 1"));
    }
    let store = open_store(url, Open::Existing).await?;
    let filter = switchyard::TaskFilter {
        handler: a.handler.clone(),
        limit: a.max,
        ..Default::default()
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("retrying {bar:30} {pos}/{len} tasks")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let done = Client::new(store)
        .retry_failed(&filter, a.message.as_deref(), |n, total| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(n as u64);
            }
        })
        .await?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if json {
        let skipped: Vec<Value> = done
            .skipped
            .iter()
            .map(|(id, why)| json!({ "task_id": id.to_string(), "reason": why }))
            .collect();
        print_json(&json!({
            "matched": done.matched,
            "retried": done.retried,
            "skipped": skipped,
        }))?;
    } else {
        let mut text = format!(
            "retried {} of {} failed task{}\n",
            done.retried,
            done.matched,
            if done.matched == 1 { "" } else { "s" }
        );
        for (id, why) in &done.skipped {
            let _ = writeln!(text, "skipped {id}: {why}");
        }
        print_text(&text)?;
    }
    Ok(Outcome::Success)
}

/// `switchyard workers`.
pub async fn workers(url: &str, json: bool) -> CmdResult {
    let store = open_store(url, Open::Existing).await?;
    let hosts = Client::new(store.clone()).workers().await?;
    let now = store.now().await?;
    if json {
        let docs: Vec<Value> = hosts
            .iter()
            .map(|h| {
                let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
                v["live"] = json!(h.is_live(now));
                v
            })
            .collect();
        print_json(&docs)?;
        return Ok(Outcome::Success);
    }
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "PID",
        "HOSTNAME",
        "LANG",
        "SLOTS",
        "LIVE",
        "LAST HEARTBEAT",
        "STARTED",
        "HANDLERS",
    ]);
    for h in &hosts {
        t.row(vec![
            h.id.clone(),
            h.name.clone().unwrap_or_else(|| "-".into()),
            h.pid.to_string(),
            h.hostname.clone(),
            h.language.clone().unwrap_or_else(|| "-".into()),
            h.slots.map_or_else(|| "-".into(), |n| n.to_string()),
            if h.is_live(now) { "yes" } else { "no" }.into(),
            relative(h.last_heartbeat, now),
            time(h.started_at),
            h.handlers.join(","),
        ]);
    }
    print_text(&t.render())?;
    Ok(Outcome::Success)
}

/// Parses an age such as `30s`, `15m`, `12h` or `7d` into milliseconds.
fn parse_age(flag: &str, text: &str) -> Result<Millis, CliError> {
    let bad = || {
        CliError::usage(format!(
            "{flag}: `{text}` is not a duration (expected a whole number with a unit \
             s, m, h or d, e.g. `7d`)"
        ))
    };
    let t = text.trim();
    let split = t.len().checked_sub(1).ok_or_else(bad)?;
    if !t.is_char_boundary(split) {
        return Err(bad());
    }
    let (number, unit) = t.split_at(split);
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(unit_ms).ok_or_else(bad)
}

/// How often a long cleanup reports progress on stderr.
const CLEANUP_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Calls `delete` (one batch of `what`) until it deletes nothing; returns
/// the total. Progress goes to stderr: a live spinner with the count when
/// stderr is a terminal, else a line every [`CLEANUP_PROGRESS_EVERY`].
async fn delete_all<F, Fut>(what: &str, mut delete: F) -> Result<u64, CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = switchyard::Result<u64>>,
{
    use std::io::IsTerminal as _;
    let started = std::time::Instant::now();
    let mut last_report = started;
    let mut deleted: u64 = 0;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let p = indicatif::ProgressBar::new_spinner();
        p.set_message(format!("deleting {what}"));
        p.enable_steady_tick(Duration::from_millis(120));
        p
    });
    loop {
        let n = delete().await.map_err(|e| {
            if let Some(p) = &spinner {
                p.finish_and_clear();
            }
            CliError::failure(format!(
                "cleanup failed after deleting {deleted} {what}: {e}"
            ))
        })?;
        if n == 0 {
            if let Some(p) = &spinner {
                p.finish_and_clear();
            }
            return Ok(deleted);
        }
        deleted += n;
        if let Some(p) = &spinner {
            p.set_message(format!(
                "{deleted} {what} deleted ({:.0?})",
                started.elapsed()
            ));
        } else if last_report.elapsed() >= CLEANUP_PROGRESS_EVERY {
            last_report = std::time::Instant::now();
            eprintln!(
                "cleanup: {deleted} {what} deleted so far ({:.0?})",
                started.elapsed()
            );
        }
    }
}

/// `switchyard cleanup`.
pub async fn cleanup(url: &str, json: bool, a: CleanupArgs) -> CmdResult {
    let task_age = a
        .older_than
        .as_deref()
        .map(|t| parse_age("--older-than", t))
        .transpose()?;
    let event_age = a
        .events_older_than
        .as_deref()
        .map(|t| parse_age("--events-older-than", t))
        .transpose()?;
    if a.batch == 0 {
        return Err(CliError::usage("--batch: must be at least 1"));
    }
    let store = open_store(url, Open::Create).await?;
    // The store's clock is the only clock.
    let now = store.now().await?;
    let deleted = match task_age {
        Some(age) => {
            let before = now.saturating_sub(age);
            delete_all("tasks", || store.cleanup(before, a.batch)).await?
        }
        None => 0,
    };
    let events = match event_age {
        Some(age) => {
            let before = now.saturating_sub(age);
            delete_all("events", || store.cleanup_events(before, a.batch)).await?
        }
        None => 0,
    };
    if json {
        let mut out = json!({ "deleted": deleted });
        if event_age.is_some() {
            out["events_deleted"] = json!(events);
        }
        print_json(&out)?;
    } else {
        let mut text = String::new();
        if let Some(age) = &a.older_than {
            text.push_str(&format!(
                "deleted {deleted} finished task{} older than {}\n",
                if deleted == 1 { "" } else { "s" },
                age.trim()
            ));
        }
        if let Some(age) = &a.events_older_than {
            text.push_str(&format!(
                "deleted {events} event{} older than {}\n",
                if events == 1 { "" } else { "s" },
                age.trim()
            ));
        }
        print_text(&text)?;
    }
    Ok(Outcome::Success)
}
