//! `switchyard bench`: throughput and latency of one in-process host.
//!
//! Two phases, one JSON line on stdout at the end (progress goes to stderr):
//!
//! 1. **Throughput.** `--steps N` tasks are spawned with
//!    [`Client::spawn_many`] in batches of `--batch B` while one host
//!    processes them, `--concurrency C` at a time (the host has 8 more slots,
//!    reserved for the latency handler). The clock runs from the first
//!    spawn until the handler has counted N completions *and* the store
//!    confirms N more completed steps ([`Store::count_steps`]), so the
//!    figure includes recording the results durably.
//! 2. **Latency**, on the now idle host, `--trials` (≥ 200 by default)
//!    single measurements one after another; each trial waits for its task
//!    to finish so the next starts on an idle host:
//!    * `noop` / `checkpoints`: from the start of the spawn call to the
//!      start of the handler;
//!    * `events`: a task awaits event `bench.ev.<run>.<i>` and suspends; the
//!      figure runs from the start of the emit call until the replayed
//!      `await_event` returns in the resumed step.
//!
//! Workloads: `noop` (the handler returns at once), `checkpoints` (ten
//! `ctx.checkpoint` calls per task; adds `checkpoints_per_sec`), `events`
//! (each task awaits its own event, emitted by the benchmark as soon as the
//! task's batch is spawned; adds `events_per_sec`).
//!
//! Handler and event names carry a random run tag, so a benchmark pointed at
//! a store that already holds data neither picks up old steps nor finds old
//! events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use switchyard::{Client, DynStore, HandlerOptions, NewTask, RunningWorker, StepState, Worker};
use tokio::sync::{mpsc, Notify};

use switchyard_store::pg_server::PgServer;

use super::commands::{open_store, CliError, Outcome};

/// The languages whose handlers the benchmark can host today.
/// (`http` benchmarks the REST API instead: see [`super::bench_http`].)
const AVAILABLE_LANGS: &[&str] = &["rust", "http"];

/// Concurrency of the latency handler (the host gets this many slots on
/// top of `--concurrency`).
const LATENCY_SLOTS: usize = 8;

/// How long one latency trial may take before the benchmark gives up.
const TRIAL_DEADLINE: Duration = Duration::from_secs(30);

/// What each benchmark task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Return at once.
    Noop,
    /// Ten `ctx.checkpoint` calls per task.
    Checkpoints,
    /// Await an event (emitted by the benchmark), then return.
    Events,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::Checkpoints => "checkpoints",
            Self::Events => "events",
        }
    }
}

/// Arguments of `switchyard bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Language of the benchmark handlers (only `rust` is built so far), or
    /// `http`: the REST API of a `switchyard serve` child process.
    #[arg(long, default_value = "rust")]
    pub lang: String,
    /// Tasks to spawn and complete in the throughput phase.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub steps: usize,
    /// Concurrency of the throughput handler (the in-process host has 8
    /// more slots, for the latency handler).
    #[arg(long, value_name = "C", default_value_t = 512)]
    pub concurrency: usize,
    /// Tasks per `spawn_many` call.
    #[arg(long, value_name = "B", default_value_t = 1000)]
    pub batch: usize,
    /// What each task does.
    #[arg(long, value_enum, default_value_t = Workload::Noop)]
    pub workload: Workload,
    /// Latency measurements (one after another, on an idle host).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub trials: usize,
    /// `--lang http`: tasks in the store while GETs and listings are
    /// measured (loaded directly through the store).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub tasks: usize,
    /// `--lang http`: concurrent REST clients of the spawn phase.
    #[arg(long, value_name = "C", default_value_t = 64)]
    pub clients: usize,
    /// `--lang http`: tasks spawned one per request in the spawn phase
    /// (as many again through `POST /api/v1/tasks/batch`).
    #[arg(long, value_name = "N", default_value_t = 50_000)]
    pub spawns: usize,
}

/// Counts handler completions and wakes the benchmark at the target.
struct Finish {
    done: AtomicUsize,
    target: usize,
    reached: Notify,
}

impl Finish {
    fn one(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            // notify_one keeps a permit, so a waiter arriving late still wakes.
            self.reached.notify_one();
        }
    }
}

pub(super) fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
pub(super) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    round3(sorted[i].as_secs_f64() * 1000.0)
}

/// Runs the benchmark against `url`: `sqlite` alone means a fresh temporary
/// file, deleted afterwards; `postgres` alone means a throwaway PostgreSQL
/// server ([`PgServer`], `fsync=off`) with a fresh database, stopped and
/// removed afterwards; any other URL is used as given.
pub async fn run(args: BenchArgs, url: String) -> Result<Outcome, CliError> {
    if !AVAILABLE_LANGS.contains(&args.lang.as_str()) {
        return Err(CliError::usage(format!(
            "language `{}` is not available yet (bindings not built)",
            args.lang
        )));
    }
    for (name, v) in [
        ("--steps", args.steps),
        ("--concurrency", args.concurrency),
        ("--batch", args.batch),
    ] {
        if v == 0 {
            return Err(CliError::usage(format!("{name} must be at least 1")));
        }
    }
    if args.trials == 0 {
        return Err(CliError::usage("--trials must be at least 1"));
    }
    let trimmed = url.trim();
    let mut pg: Option<PgServer> = None;
    let (url, tmp) = if trimmed == "postgres" || trimmed == "postgresql" {
        progress("starting a throwaway PostgreSQL server (fsync off)");
        let (server, db) = super::dev::throwaway_postgres("switchyard_bench").await?;
        // Stopped (and its directory removed) when `pg` is dropped, also on error.
        let server = pg.insert(server);
        progress(format!("PostgreSQL on 127.0.0.1:{}", server.port()));
        (db, None)
    } else if trimmed == "sqlite" || trimmed == "sqlite:" {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-bench-")
            .tempdir()
            .map_err(|e| {
                CliError::failure(format!(
                    "creating a temporary directory for the SQLite file: {e}"
                ))
            })?;
        (
            format!("sqlite:{}", dir.path().join("bench.db").display()),
            Some(dir),
        )
    } else {
        (trimmed.to_string(), None)
    };
    let result = match open_store(&url, super::commands::Open::Create).await {
        Ok(store) if args.lang == "http" => super::bench_http::bench(&args, store, &url).await,
        Ok(store) => bench(&args, store).await,
        Err(e) => Err(e),
    };
    // The temporary database goes only after the store is dropped.
    drop(tmp);
    if let Some(server) = pg {
        let _ = tokio::task::spawn_blocking(move || drop(server)).await;
    }
    let line = result?;
    println!("{line}");
    Ok(Outcome::Success)
}

async fn completed_steps(store: &DynStore) -> Result<u64, CliError> {
    Ok(store
        .count_steps()
        .await?
        .get(StepState::Completed.as_str())
        .copied()
        .unwrap_or(0))
}

async fn bench(args: &BenchArgs, store: DynStore) -> Result<String, CliError> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = &run[run.len() - 8..];
    let tp_handler = format!("bench.{run}.{}", args.workload.name());
    let lat_handler = format!("bench.{run}.latency");
    let n = args.steps;

    let finish = Arc::new(Finish {
        done: AtomicUsize::new(0),
        target: n,
        reached: Notify::new(),
    });
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<(u64, Instant)>();

    let workload = args.workload;
    let fin = finish.clone();
    let tp_prefix = format!("bench.tp.{run}");
    let ev_prefix = format!("bench.ev.{run}");
    // The host has room for both handlers at full concurrency: were the
    // throughput handler able to fill every host slot, a claim round that
    // asks for it first would ask nothing for the latency handler, and a
    // latency trial whose wake-up fell on such a round would wait for the
    // next poll.
    let builder = Worker::builder(store.clone())
        .concurrency(args.concurrency + LATENCY_SLOTS)
        .claim_batch(args.concurrency)
        .step(
            &tp_handler,
            HandlerOptions::default().concurrency(args.concurrency),
            move |input, ctx| {
                let fin = fin.clone();
                let tp_prefix = tp_prefix.clone();
                async move {
                    match workload {
                        Workload::Noop => {}
                        Workload::Checkpoints => {
                            for k in 0..10u32 {
                                ctx.checkpoint(&format!("c{k}"), || async move { Ok(k) })
                                    .await?;
                            }
                        }
                        Workload::Events => {
                            let i = input["i"].as_u64().unwrap_or(0);
                            ctx.await_event(&format!("{tp_prefix}.{i}"), None).await?;
                        }
                    }
                    fin.one();
                    Ok(Value::Null)
                }
            },
        );
    let lat_workload = args.workload;
    let builder = builder.step(
        &lat_handler,
        HandlerOptions::default().concurrency(LATENCY_SLOTS),
        move |input, ctx| {
            let tx = lat_tx.clone();
            let ev_prefix = ev_prefix.clone();
            async move {
                let i = input["i"].as_u64().unwrap_or(0);
                if lat_workload == Workload::Events {
                    // The first run suspends here; the replay after the emit
                    // returns, and that is the moment being measured.
                    ctx.await_event(&format!("{ev_prefix}.{i}"), None).await?;
                }
                let _ = tx.send((i, Instant::now()));
                Ok(Value::Null)
            }
        },
    );
    let worker = builder.build()?.start().await?;
    let client = Client::new(store.clone());

    let result = async {
        let (seconds, steps_per_sec) =
            throughput(args, &store, &client, &worker, &tp_handler, &finish, run).await?;
        progress(format!(
            "throughput: {n} {} steps in {seconds:.3} s = {steps_per_sec:.0} steps/s",
            args.workload.name()
        ));
        progress(format!("latency: {} trials on an idle host", args.trials));
        let mut samples = latency(args, &store, &client, &lat_handler, &mut lat_rx, run).await?;
        samples.sort();
        Ok::<_, CliError>((seconds, steps_per_sec, samples))
    }
    .await;
    worker.stop().await;
    let (seconds, steps_per_sec, samples) = result?;

    let mut out = Map::new();
    out.insert("lang".into(), json!(args.lang));
    out.insert("store".into(), json!(store.kind()));
    if store.kind() == "sqlite" {
        // The SQLite store reports its mode in its URL (`...?synchronous=full`).
        let url = store.url();
        let mode = url
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("synchronous=")))
            .unwrap_or("n/a");
        out.insert("sqlite_synchronous".into(), json!(mode));
    }
    out.insert("workload".into(), json!(args.workload.name()));
    out.insert("steps".into(), json!(n));
    out.insert("concurrency".into(), json!(args.concurrency));
    out.insert("batch".into(), json!(args.batch));
    out.insert("seconds".into(), json!(round3(seconds)));
    out.insert("steps_per_sec".into(), json!(steps_per_sec.round()));
    match args.workload {
        Workload::Noop => {}
        Workload::Checkpoints => {
            out.insert(
                "checkpoints_per_sec".into(),
                json!((steps_per_sec * 10.0).round()),
            );
        }
        Workload::Events => {
            out.insert("events_per_sec".into(), json!(steps_per_sec.round()));
        }
    }
    out.insert("trials".into(), json!(samples.len()));
    out.insert("p50_ms".into(), json!(percentile_ms(&samples, 50.0)));
    out.insert("p99_ms".into(), json!(percentile_ms(&samples, 99.0)));
    Ok(Value::Object(out).to_string())
}

/// The throughput phase; returns (seconds, steps per second).
async fn throughput(
    args: &BenchArgs,
    store: &DynStore,
    client: &Client,
    worker: &RunningWorker,
    handler: &str,
    finish: &Finish,
    run: &str,
) -> Result<(f64, f64), CliError> {
    let n = args.steps;
    let before = completed_steps(store).await?;
    progress(format!(
        "spawning {n} {} tasks on {} in batches of {} (host concurrency {})",
        args.workload.name(),
        store.kind(),
        args.batch,
        args.concurrency
    ));
    let start = Instant::now();
    let mut emitters = Vec::new();
    let mut next = 0usize;
    while next < n {
        let end = (next + args.batch).min(n);
        let tasks: Vec<NewTask> = (next..end)
            .map(|i| {
                let input = if args.workload == Workload::Events {
                    json!({ "i": i })
                } else {
                    Value::Null
                };
                NewTask::new(handler, input)
            })
            .collect();
        client.spawn_many(tasks).await?;
        if args.workload == Workload::Events {
            let client = client.clone();
            let prefix = format!("bench.tp.{run}");
            emitters.push(tokio::spawn(async move {
                for i in next..end {
                    client.emit(&format!("{prefix}.{i}"), json!(i)).await?;
                }
                Ok::<_, switchyard::Error>(())
            }));
        }
        next = end;
    }
    for e in emitters {
        e.await
            .map_err(|e| CliError::failure(format!("event emitter crashed: {e}")))??;
    }
    let spawned_in = start.elapsed();
    finish.reached.notified().await;
    let handled_in = start.elapsed();
    // Results are recorded by the host's completer after the handler
    // returns; the run counts only once the store has them all. Counting
    // steps scans the step table (tens of milliseconds on PostgreSQL with a
    // run's rows), so the host's completer is flushed first and the count
    // made once the outcomes are in.
    let target = before + n as u64;
    loop {
        worker.flush().await;
        if completed_steps(store).await? >= target {
            break;
        }
        // The last handlers have counted but not yet returned.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress(format!(
        "spawned in {:.3} s, handlers done at {:.3} s, store confirmed at {elapsed:.3} s",
        spawned_in.as_secs_f64(),
        handled_in.as_secs_f64()
    ));
    Ok((elapsed, n as f64 / elapsed.max(1e-9)))
}

/// The latency phase; returns one sample per trial.
async fn latency(
    args: &BenchArgs,
    store: &DynStore,
    client: &Client,
    handler: &str,
    rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    run: &str,
) -> Result<Vec<Duration>, CliError> {
    let mut samples = Vec::with_capacity(args.trials);
    // Handler start times keyed by trial, should one ever arrive out of turn.
    let mut early: HashMap<u64, Instant> = HashMap::new();
    for i in 0..args.trials as u64 {
        let t0;
        let id;
        if args.workload == Workload::Events {
            id = client.spawn(handler, json!({ "i": i })).await?;
            wait_suspended(store, id).await?;
            t0 = Instant::now();
            client
                .emit(&format!("bench.ev.{run}.{i}"), json!(i))
                .await?;
        } else {
            t0 = Instant::now();
            id = client.spawn(handler, json!({ "i": i })).await?;
        }
        let t1 = loop {
            if let Some(t) = early.remove(&i) {
                break t;
            }
            match tokio::time::timeout(TRIAL_DEADLINE, rx.recv()).await {
                Ok(Some((j, t))) if j == i => break t,
                Ok(Some((j, t))) => {
                    early.insert(j, t);
                }
                Ok(None) => return Err(CliError::failure("the latency handler stopped")),
                Err(_) => {
                    return Err(CliError::failure(format!(
                        "latency trial {i}: the handler did not start within {} s",
                        TRIAL_DEADLINE.as_secs()
                    )))
                }
            }
        };
        samples.push(t1.saturating_duration_since(t0));
        client.wait(id, TRIAL_DEADLINE).await?;
    }
    Ok(samples)
}

/// Waits until the task's root step is recorded as suspended, so the emit
/// that follows measures a real wake-up rather than a cached event.
async fn wait_suspended(store: &DynStore, id: switchyard::TaskId) -> Result<(), CliError> {
    let deadline = Instant::now() + TRIAL_DEADLINE;
    loop {
        let detail = store.task_detail(id).await?;
        if let Some(d) = detail {
            if d.steps.iter().any(|s| s.state == StepState::Suspended) {
                return Ok(());
            }
            if d.task.state.is_terminal() {
                return Err(CliError::failure(format!(
                    "latency task {id} finished before its event was emitted"
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(CliError::failure(format!(
                "latency task {id} did not suspend within {} s",
                TRIAL_DEADLINE.as_secs()
            )));
        }
        // Suspension is recorded by the host's completer with no signal to
        // wait on; a short pause keeps this poll from hogging a core.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}
