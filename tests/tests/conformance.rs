//! The conformance suite (`tests/conformance/`): every scenario of
//! `scenarios.json` runs against a host process in each language, and each
//! outcome — final state, result, error kind and message, attempts, runs,
//! how often a checkpoint body ran — must be the one the scenario expects,
//! the same in every language.
//!
//! Languages: `SWITCHYARD_CONFORMANCE` (comma-separated; default `rust`):
//! `rust` (the `conformance_host` binary), `python-sync`, `python-async`
//! (`hosts/python_host.py`, run by `SWITCHYARD_PYTHON`, default `python3`,
//! with the wheel installed), `node` (`hosts/node_host.mjs`, copied into
//! `SWITCHYARD_NODE_DIR`, a project with the package installed), `ruby`
//! (`hosts/ruby_host.rb`, gems from `SWITCHYARD_RUBY_GEMS`), `c` (the
//! program built from `hosts/c_host.c`, at `SWITCHYARD_C_HOST`).
//! `make test-conformance` builds and installs each package the way users
//! do and runs all six.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use switchyard::{Client, TaskId, TaskState};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The command that starts `lang`'s host, with its language-specific
/// arguments (the driver adds `--store` and `--log`). `scratch` is a
/// directory the host may use.
fn host_command(lang: &str, scratch: &Path, file: &Value) -> anyhow::Result<Command> {
    let scenarios = dir().join("scenarios.json");
    let hosts = dir().join("hosts");
    let python = || env_or("SWITCHYARD_PYTHON", "python3");
    let mut c = match lang {
        "rust" => Command::new(env!("CARGO_BIN_EXE_conformance_host")),
        "python-sync" => {
            let mut c = Command::new(python());
            c.arg(hosts.join("python_host.py"));
            c
        }
        "python-async" => {
            let mut c = Command::new(python());
            c.arg(hosts.join("python_host.py")).arg("--async");
            c
        }
        "node" => {
            // ESM resolves `switchyard` from the script's own directory: the
            // host runs from the project the package is installed in.
            let project = PathBuf::from(std::env::var("SWITCHYARD_NODE_DIR").context(
                "SWITCHYARD_NODE_DIR (a project with the switchyard package installed)",
            )?);
            let script = project.join("conformance_host.mjs");
            std::fs::copy(hosts.join("node_host.mjs"), &script)?;
            let mut c = Command::new(env_or("SWITCHYARD_NODE", "node"));
            c.arg(script);
            c
        }
        "ruby" => {
            let mut c = Command::new(env_or("SWITCHYARD_RUBY", "ruby"));
            if let Ok(gems) = std::env::var("SWITCHYARD_RUBY_GEMS") {
                c.env_remove("GEM_PATH").env("GEM_HOME", gems);
            }
            c.arg(hosts.join("ruby_host.rb"));
            c
        }
        "c" => {
            // C reads no JSON: the handlers' options go in a line each.
            let list = scratch.join("handlers.txt");
            let ms = |v: &Value| v.as_f64().map_or(0, |s| (s * 1000.0).round() as u64);
            let mut text = String::new();
            for (name, o) in file["handlers"].as_object().context("handlers")? {
                text += &format!(
                    "{name} {} {} {} {} {} {} {} {}\n",
                    ms(&o["timeout"]),
                    o["max_attempts"].as_u64().unwrap_or(0),
                    ms(&o["initial_backoff"]),
                    ms(&o["max_backoff"]),
                    o["kind"].as_str().unwrap_or("step"),
                    o["max_batch"].as_u64().unwrap_or(0),
                    ms(&o["linger"]),
                    o["concurrency"].as_u64().unwrap_or(0)
                );
            }
            std::fs::write(&list, text)?;
            let mut c = Command::new(
                std::env::var("SWITCHYARD_C_HOST")
                    .context("SWITCHYARD_C_HOST (the built tests/conformance/hosts/c_host.c)")?,
            );
            c.arg("--handlers").arg(list);
            return Ok(c);
        }
        other => bail!("no conformance host for language `{other}`"),
    };
    c.arg("--scenarios").arg(scenarios);
    Ok(c)
}

/// What one scenario ended as, in the terms scenarios expect.
fn observe(
    detail: &switchyard::TaskDetail,
    log: &str,
    expect: &serde_json::Map<String, Value>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    let task = &detail.task;
    let state = format!("{:?}", task.state).to_lowercase();
    if let Some(want) = expect.get("state").and_then(Value::as_str) {
        if state != want {
            wrong.push(format!(
                "state {state} (want {want}); error: {:?}",
                task.error.as_ref().map(|e| &e.message)
            ));
        }
    }
    if let Some(want) = expect.get("result") {
        if task.result.as_ref() != Some(want) {
            wrong.push(format!("result {:?} (want {want})", task.result));
        }
    }
    let step = detail.steps.first();
    let error = step.and_then(|s| s.error.as_ref()).or(task.error.as_ref());
    if let Some(want) = expect.get("error_kind").and_then(Value::as_str) {
        // The kind as the store spells it (`invalid_input`, not `InvalidInput`).
        let got = error.map(|e| match serde_json::to_value(e.kind) {
            Ok(Value::String(k)) => k,
            _ => format!("{:?}", e.kind),
        });
        if got.as_deref() != Some(want) {
            wrong.push(format!("error kind {got:?} (want {want})"));
        }
    }
    if let Some(want) = expect.get("error_contains").and_then(Value::as_str) {
        let got = error.map(|e| e.message.as_str()).unwrap_or("");
        if !got.contains(want) {
            wrong.push(format!(
                "error message {got:?} (want it to contain {want:?})"
            ));
        }
    }
    if let Some(want) = expect.get("attempts").and_then(Value::as_u64) {
        let got = step.map(|s| u64::from(s.attempt));
        if got != Some(want) {
            wrong.push(format!("attempts {got:?} (want {want})"));
        }
    }
    if let Some(want) = expect.get("runs").and_then(Value::as_u64) {
        let got = step.map(|s| s.run);
        if got != Some(want) {
            wrong.push(format!("runs {got:?} (want {want})"));
        }
    }
    if let Some(want) = expect.get("log").and_then(Value::as_object) {
        let prefix = format!("{} ", task.id);
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for line in log.lines() {
            if let Some(label) = line.strip_prefix(&prefix) {
                *counts.entry(label).or_default() += 1;
            }
        }
        for (label, n) in want {
            let got = counts.get(label.as_str()).copied().unwrap_or(0);
            if Some(got) != n.as_u64() {
                wrong.push(format!("`{label}` ran {got} times (want {n})"));
            }
        }
    }
    wrong
}

/// A scenario's `cancel`: waits (up to 30 s) until the handler logged
/// `after_log` (a label) and the task's step is in `step_state`, whichever
/// of the two are given, then `after_ms` more, then cancels the task, which
/// must still be running then.
async fn cancel_when(client: &Client, log: &Path, id: TaskId, c: &Value) -> anyhow::Result<()> {
    let label = c["after_log"].as_str().map(|l| format!("{id} {l}"));
    let step_state = c["step_state"].as_str();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let logged = match &label {
            Some(l) => std::fs::read_to_string(log)?.lines().any(|line| line == l),
            None => true,
        };
        let in_state = match step_state {
            Some(want) => {
                let detail = client.inspect(id).await?;
                let got = detail
                    .steps
                    .first()
                    .map(|s| format!("{:?}", s.state).to_lowercase());
                got.as_deref() == Some(want)
            }
            None => true,
        };
        if logged && in_state {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the task never got there (after_log {label:?}, step_state {step_state:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms = c["after_ms"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if !client.cancel(id, false).await? {
        bail!("the task had already finished when cancelled");
    }
    Ok(())
}

/// A scenario's `spawn_after`: waits (up to 30 s) until the task of the
/// earlier scenario named `scenario` logged `log` (a label).
async fn spawn_after(
    started: &[(String, TaskId)],
    log: &Path,
    after: &Value,
) -> anyhow::Result<()> {
    let name = after["scenario"].as_str().context("spawn_after.scenario")?;
    let (_, id) = started
        .iter()
        .find(|(n, _)| n == name)
        .with_context(|| format!("spawn_after: no earlier scenario `{name}`"))?;
    let line = format!("{id} {}", after["log"].as_str().context("spawn_after.log")?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log)?.lines().any(|l| l == line) {
        if tokio::time::Instant::now() > deadline {
            bail!("spawn_after: `{name}` never logged {line:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Starts `lang`'s host on `store_url` and waits (up to 120 s) until it
/// prints `ready`.
async fn start_host(
    lang: &str,
    scratch: &Path,
    file: &Value,
    store_url: &str,
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = host_command(lang, scratch, file)?;
    cmd.arg("--store")
        .arg(store_url)
        .arg("--log")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut host = cmd
        .spawn()
        .with_context(|| format!("starting the {lang} host"))?;
    let stdout = host.stdout.take().context("host stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await;
    match ready {
        Ok(Ok(Some(l))) if l.trim() == "ready" => Ok(host),
        other => {
            let _ = host.start_kill();
            let out = host.wait_with_output().await?;
            bail!(
                "the {lang} host did not start ({other:?}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Stops the host with SIGTERM; it must exit 0 within 30 s. A mismatch is
/// returned as a line.
async fn stop_host(lang: &str, host: tokio::process::Child) -> anyhow::Result<Option<String>> {
    let pid = host
        .id()
        .ok_or_else(|| anyhow!("the {lang} host already exited"))?;
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = tokio::time::timeout(Duration::from_secs(30), host.wait_with_output())
        .await
        .with_context(|| format!("the {lang} host did not stop on SIGTERM within 30 s"))??;
    Ok((!out.status.success()).then(|| {
        format!(
            "{lang}: the host exited with {} on SIGTERM: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    }))
}

/// The `shutdown` phase: spawns `tasks` tasks of `handler` (whose
/// concurrency is below that, so some run and the rest wait), stops the host
/// once `running` of them logged `start`, creates the release file the
/// handler looks for (`<log>.release`), starts a new host and checks that
/// every task completes with `expect`, that each task that had started in
/// the first host ran again (`start` twice) and each that had not ran once.
#[allow(clippy::too_many_arguments)]
async fn shutdown_phase(
    lang: &str,
    scratch: &Path,
    file: &Value,
    sh: &Value,
    client: &Client,
    store_url: &str,
    log: &Path,
    host: tokio::process::Child,
) -> anyhow::Result<(tokio::process::Child, Vec<String>)> {
    let handler = sh["handler"].as_str().context("shutdown.handler")?;
    let n = sh["tasks"].as_u64().context("shutdown.tasks")? as usize;
    let running = sh["running"].as_u64().context("shutdown.running")? as usize;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(client.spawn(handler, serde_json::json!({ "i": i })).await?);
    }
    let started = |text: &str, id: &TaskId| {
        let line = format!("{id} start");
        text.lines().filter(|l| *l == line).count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log)?;
        if ids.iter().filter(|id| started(&text, id) > 0).count() >= running {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{running} of the {n} tasks never started");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut wrong = Vec::new();
    if let Some(w) = stop_host(lang, host).await? {
        wrong.push(w);
    }
    let text = std::fs::read_to_string(log)?;
    let ran_before: Vec<bool> = ids.iter().map(|id| started(&text, id) > 0).collect();
    std::fs::write(log.with_extension("log.release"), "")?;
    let host = start_host(lang, scratch, file, store_url, log).await?;
    let expect = sh["expect"].as_object().context("shutdown.expect")?;
    for (i, id) in ids.iter().enumerate() {
        if let Err(e) = client.wait(*id, Duration::from_secs(60)).await {
            wrong.push(format!("task {i} did not finish: {e}"));
            continue;
        }
        let detail = client.inspect(*id).await?;
        let text = std::fs::read_to_string(log)?;
        for w in observe(&detail, &text, expect) {
            wrong.push(format!("task {i}: {w}"));
        }
        let want = if ran_before[i] { 2 } else { 1 };
        let got = started(&text, id);
        if got != want {
            wrong.push(format!(
                "task {i} started {got} times (want {want}: {} the first host)",
                if ran_before[i] {
                    "it had started in"
                } else {
                    "it had not started in"
                }
            ));
        }
    }
    Ok((host, wrong))
}

/// Runs every scenario against `lang`'s host; one line per mismatch.
async fn run_language(lang: &str, file: &Value) -> anyhow::Result<Vec<String>> {
    let scratch = tempfile::tempdir()?;
    let db = scratch.path().join("conformance.db");
    let store_url = format!("sqlite:{}", db.display());
    let log = scratch.path().join("conformance.log");
    std::fs::write(&log, "")?;
    let store = switchyard::open(&store_url).await?;
    let client = Client::new(store);

    let mut host = start_host(lang, scratch.path(), file, &store_url, &log).await?;

    // `skip`: languages a scenario does not apply to (its `note` says why).
    let scenarios: Vec<&Value> = file["scenarios"]
        .as_array()
        .context("scenarios")?
        .iter()
        .filter(|s| {
            !s["skip"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l.as_str() == Some(lang)))
        })
        .collect();
    println!("{lang}: {} scenarios", scenarios.len());
    let mut started: Vec<(String, TaskId)> = Vec::new();
    for s in &scenarios {
        let name = s["name"].as_str().context("scenario name")?.to_owned();
        for (event, payload) in s["emit_before"].as_object().into_iter().flatten() {
            client.emit(event, payload.clone()).await?;
        }
        if let Some(after) = s.get("spawn_after").filter(|a| a.is_object()) {
            spawn_after(&started, &log, after).await?;
        }
        let handler = s["handler"].as_str().context("scenario handler")?;
        let id = client.spawn(handler, s["input"].clone()).await?;
        started.push((name, id));
    }
    // `cancel` scenarios: once the handler logged `after_log` and/or the
    // step reached `step_state`, wait `after_ms` more and cancel the task.
    let mut cancels = BTreeMap::new();
    for (s, (_, id)) in scenarios.iter().zip(&started) {
        if let Some(c) = s.get("cancel").filter(|c| c.is_object()) {
            let (client, log, id, c) = (client.clone(), log.clone(), *id, c.clone());
            cancels.insert(
                id,
                tokio::spawn(async move { cancel_when(&client, &log, id, &c).await }),
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in &scenarios {
        for (event, payload) in s["emit_after"].as_object().into_iter().flatten() {
            client.emit(event, payload.clone()).await?;
        }
    }
    let mut wrong = Vec::new();
    let mut eventually = Vec::new();
    for ((name, id), s) in started.iter().zip(&scenarios) {
        if let Some(cancel) = cancels.remove(id) {
            match cancel.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    wrong.push(format!("{lang}: {name}: could not cancel: {e:#}"));
                    continue;
                }
                Err(e) => {
                    wrong.push(format!("{lang}: {name}: the cancelling task died: {e}"));
                    continue;
                }
            }
        }
        let done = client.wait(*id, Duration::from_secs(60)).await;
        if let Err(e) = done {
            wrong.push(format!("{lang}: {name}: did not finish: {e}"));
            continue;
        }
        let detail = client.inspect(*id).await?;
        if !matches!(
            detail.task.state,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        ) {
            wrong.push(format!("{lang}: {name}: ended {:?}", detail.task.state));
            continue;
        }
        let logged = std::fs::read_to_string(&log)?;
        let expect = s["expect"].as_object().context("expect")?;
        for w in observe(&detail, &logged, expect) {
            wrong.push(format!("{lang}: {name}: {w}"));
        }
        if let Some(want) = s["expect"].get("log_eventually") {
            eventually.push((name, detail, want));
        }
    }
    // `log_eventually`: log lines a handler may write after its task was
    // recorded finished (e.g. once it noticed the cancellation), given up
    // to 5 s more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for (name, detail, want) in eventually {
        let mut expect = serde_json::Map::new();
        expect.insert("log".into(), want.clone());
        loop {
            let logged = std::fs::read_to_string(&log)?;
            let w = observe(&detail, &logged, &expect);
            if w.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                wrong.extend(
                    w.into_iter()
                        .map(|w| format!("{lang}: {name}: eventually: {w}")),
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Shutdown with work in flight and queued (`shutdown`): stop the host
    // while some steps run and others wait, start a new one, and every task
    // completes without the shutdown costing an attempt.
    if let Some(sh) = file.get("shutdown").filter(|s| s.is_object()) {
        match shutdown_phase(
            lang,
            scratch.path(),
            file,
            sh,
            &client,
            &store_url,
            &log,
            host,
        )
        .await
        {
            Ok((h, w)) => {
                host = h;
                wrong.extend(w.into_iter().map(|w| format!("{lang}: shutdown: {w}")));
            }
            Err(e) => {
                wrong.push(format!("{lang}: shutdown: {e:#}"));
                return Ok(wrong);
            }
        }
    }

    if let Some(w) = stop_host(lang, host).await? {
        wrong.push(w);
    }
    Ok(wrong)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_language_passes_every_scenario() {
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir().join("scenarios.json")).unwrap()).unwrap();
    let langs = std::env::var("SWITCHYARD_CONFORMANCE").unwrap_or_else(|_| "rust".into());
    let mut wrong = Vec::new();
    for lang in langs.split(',').map(str::trim).filter(|l| !l.is_empty()) {
        match run_language(lang, &file).await {
            Ok(w) => {
                println!("{lang}: {} mismatches", w.len());
                wrong.extend(w);
            }
            Err(e) => wrong.push(format!("{lang}: {e:#}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "conformance mismatches:\n{}",
        wrong.join("\n")
    );
}
