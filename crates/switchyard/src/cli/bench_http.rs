//! `switchyard bench --lang http`: the REST API of a `switchyard serve`
//! child process (this same binary) on a free loopback port, measured with
//! keep-alive HTTP/1.1 connections.
//!
//! Phases, one JSON line on stdout at the end (progress goes to stderr):
//!
//! 1. **Spawn throughput** on the fresh store: `--spawns N` tasks, one
//!    `POST /api/v1/tasks` per request from `--clients C` concurrent clients
//!    (`spawn_per_sec`), then as many again through
//!    `POST /api/v1/tasks/batch`, 100 per request, from 8 clients
//!    (`spawn_many_per_sec`). Every answer must be a 201 / 200.
//! 2. **Load.** The server is stopped and the store filled directly (no
//!    HTTP) up to `--tasks N` tasks: ten common handlers, one rare handler
//!    (one task in 10,000), an idempotency key on one task in 100; the
//!    oldest 1% are cancelled, so finished tasks are old ones.
//! 3. **Latency**, with the server started again, one request after another:
//!    `GET /api/v1/tasks/{id}` of random ids, and listings of 50: by state
//!    and handler, by the rare handler, a narrow window of creation times,
//!    a window of creation times holding every task, the window in which
//!    the old tasks finished, an idempotency key, and
//!    pages after a cursor at a random depth (alone and with a handler).
//!    Each listing is sampled up to 200 times or for 10 s, whichever comes
//!    first (at least 5 samples).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Map, Value};
use switchyard::{Client, DynStore, NewTask, TaskId};

use super::bench::{percentile_ms, progress, round3, BenchArgs};
use super::commands::CliError;

/// Tasks per `spawn_many` call while loading the store.
const LOAD_BATCH: usize = 5_000;
/// Tasks per request of the spawn-many phase.
const HTTP_BATCH: usize = 100;
/// Clients of the spawn-many phase.
const HTTP_BATCH_CLIENTS: usize = 8;
/// `GET /api/v1/tasks/{id}` samples.
const GET_SAMPLES: usize = 2_000;
/// At most this many samples of one listing...
const LIST_SAMPLES: usize = 200;
/// ...or this long, whichever comes first...
const LIST_BUDGET: Duration = Duration::from_secs(10);
/// ...but at least this many.
const LIST_MIN_SAMPLES: usize = 5;
/// Page size of the listings.
const PAGE: usize = 50;

fn fail(what: impl std::fmt::Display) -> CliError {
    CliError::failure(format!("bench --lang http: {what}"))
}

/// A `switchyard serve` child process, stopped (SIGTERM, then waited for)
/// when dropped.
struct ServeChild {
    child: Child,
    base: String,
}

impl ServeChild {
    fn start(url: &str) -> Result<Self, CliError> {
        let exe = std::env::current_exe().map_err(|e| fail(format!("current_exe: {e}")))?;
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--store", url])
            .env_remove("SWITCHYARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("starting `switchyard serve`: {e}")))?;
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut base = None;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.split("listening on ").nth(1) {
                base = Some(addr.trim().to_string());
                break;
            }
            eprintln!("serve: {line}");
        }
        // Keep draining (and showing) the server's stderr.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("serve: {line}");
            }
        });
        let Some(base) = base else {
            let _ = child.kill();
            let status = child.wait().ok();
            return Err(fail(format!(
                "`switchyard serve` exited before listening ({status:?})"
            )));
        };
        progress(format!("switchyard serve on {base} (pid {})", child.id()));
        Ok(Self { child, base })
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        // SIGTERM: the server shuts down gracefully and closes the store.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own child's pid, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_client(pool: usize) -> Result<reqwest::Client, CliError> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| fail(format!("HTTP client: {e}")))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `clients` concurrent loops sending `requests` requests in all; request
/// `i` is `make(i)`, and must answer with one of `ok`. Returns the seconds.
async fn hammer<F>(
    http: &reqwest::Client,
    clients: usize,
    requests: usize,
    ok: &'static [u16],
    make: F,
) -> Result<f64, CliError>
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (http, next, make) = (http.clone(), next.clone(), make.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return Ok::<_, String>(());
                }
                let resp = make(&http, i).send().await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if !ok.contains(&status) {
                    return Err(format!(
                        "request {i}: HTTP {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(fail)?.map_err(fail)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Sequential GETs of `path(i)`; every answer must be a 200.
async fn sample<F>(
    http: &reqwest::Client,
    base: &str,
    max: usize,
    budget: Duration,
    mut path: F,
) -> Result<Vec<Duration>, CliError>
where
    F: FnMut(usize) -> String,
{
    let mut out = Vec::with_capacity(max);
    let began = Instant::now();
    for i in 0..max {
        if i >= LIST_MIN_SAMPLES && began.elapsed() > budget {
            break;
        }
        let url = format!("{base}{}", path(i));
        let t0 = Instant::now();
        let resp = http
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(format!("GET {url}: {e}")))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| fail(format!("GET {url}: {e}")))?;
        out.push(t0.elapsed());
        if status != 200 {
            return Err(fail(format!(
                "GET {url}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
    }
    out.sort();
    Ok(out)
}

/// The path of a listing's `i`-th sample.
type PathFn<'a> = Box<dyn FnMut(usize) -> String + 'a>;

/// What the load phase left for the latency phase.
struct Loaded {
    ids: Vec<TaskId>,
    created_window: (i64, i64),
    finished_window: (i64, i64),
    keys: Vec<String>,
}

/// Fills the store up to `total` tasks directly (no HTTP).
async fn load(store: DynStore, run: &str, total: usize) -> Result<Loaded, CliError> {
    let client = Client::new(store);
    let mut ids = Vec::with_capacity(total);
    let mut keys = Vec::new();
    let mut created_window = (0, 0);
    let started = Instant::now();
    let mid = total / 2 / LOAD_BATCH;
    for (b, from) in (0..total).step_by(LOAD_BATCH).enumerate() {
        let to = (from + LOAD_BATCH).min(total);
        let tasks: Vec<NewTask> = (from..to)
            .map(|i| {
                let handler = if i % 10_000 == 5_000 {
                    format!("bench.{run}.rare")
                } else {
                    format!("bench.{run}.h{}", i % 10)
                };
                let t = NewTask::new(handler, json!({ "i": i }));
                if i % 100 == 7 {
                    let k = format!("bench.{run}.k{i}");
                    keys.push(k.clone());
                    t.idempotency_key(k)
                } else {
                    t
                }
            })
            .collect();
        let t0 = now_ms();
        let spawned = client.spawn_many(tasks).await?;
        if b == mid {
            created_window = (t0, now_ms() + 1);
        }
        ids.extend(spawned.into_iter().map(|s| s.task_id));
        if (b + 1) % 40 == 0 {
            progress(format!(
                "loaded {} tasks ({:.0}/s)",
                ids.len(),
                ids.len() as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }
    // The oldest 1% finish (cancelled), 32 at a time.
    let cancel: Vec<TaskId> = ids.iter().take(total / 100).copied().collect();
    let f0 = now_ms();
    let cancel = Arc::new(cancel);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, cancel, next) = (client.clone(), cancel.clone(), next.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = cancel.get(i) else {
                    return Ok::<_, switchyard::Error>(());
                };
                client.cancel(*id, false).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(fail)??;
    }
    let finished_window = (f0, now_ms() + 1);
    progress(format!(
        "loaded {} tasks and cancelled the oldest {} in {:.1} s",
        ids.len(),
        cancel.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Loaded {
        ids,
        created_window,
        finished_window,
        keys,
    })
}

/// Runs the three phases against `url` (already prepared by
/// [`super::bench::run`]; `store` is open on it and migrated).
pub async fn bench(args: &BenchArgs, store: DynStore, url: &str) -> Result<String, CliError> {
    for (name, v) in [("--clients", args.clients), ("--spawns", args.spawns)] {
        if v == 0 {
            return Err(CliError::usage(format!("{name} must be at least 1")));
        }
    }
    let kind = store.kind();
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = run[run.len() - 8..].to_string();
    let http = http_client(args.clients.max(HTTP_BATCH_CLIENTS) + 8)?;
    let mut out = Map::new();
    out.insert("lang".into(), json!("http"));
    out.insert("store".into(), json!(kind));
    out.insert("clients".into(), json!(args.clients));

    // 1. Spawn throughput on the fresh store.
    let server = ServeChild::start(url)?;
    let base = server.base.clone();
    let n = args.spawns;
    progress(format!(
        "spawn: {n} x POST /api/v1/tasks from {} clients",
        args.clients
    ));
    let spawn_url = format!("{base}/api/v1/tasks");
    let handler = format!("bench.{run}.spawn");
    let secs = hammer(&http, args.clients, n, &[201], move |c, i| {
        c.post(&spawn_url)
            .header("content-type", "application/json")
            .body(json!({ "handler": handler, "input": { "i": i } }).to_string())
    })
    .await?;
    let spawn_per_sec = n as f64 / secs.max(1e-9);
    progress(format!("spawn: {n} in {secs:.3} s = {spawn_per_sec:.0}/s"));
    out.insert("spawns".into(), json!(n));
    out.insert("spawn_per_sec".into(), json!(spawn_per_sec.round()));

    let requests = n.div_ceil(HTTP_BATCH);
    progress(format!(
        "spawn many: {requests} x POST /api/v1/tasks/batch ({HTTP_BATCH} each) from \
         {HTTP_BATCH_CLIENTS} clients"
    ));
    let batch_url = format!("{base}/api/v1/tasks/batch");
    let handler = format!("bench.{run}.batch");
    let secs = hammer(&http, HTTP_BATCH_CLIENTS, requests, &[200], move |c, r| {
        let tasks: Vec<Value> = (0..HTTP_BATCH)
            .map(|j| json!({ "handler": handler, "input": { "i": r * HTTP_BATCH + j } }))
            .collect();
        c.post(&batch_url)
            .header("content-type", "application/json")
            .body(json!({ "tasks": tasks }).to_string())
    })
    .await?;
    let many_per_sec = (requests * HTTP_BATCH) as f64 / secs.max(1e-9);
    progress(format!(
        "spawn many: {} in {secs:.3} s = {many_per_sec:.0}/s",
        requests * HTTP_BATCH
    ));
    out.insert("spawn_many_per_sec".into(), json!(many_per_sec.round()));
    drop(server);

    // 2. Load the store directly (the server is stopped meanwhile).
    let already = n + requests * HTTP_BATCH;
    let total = args.tasks.saturating_sub(already).max(LOAD_BATCH);
    progress(format!("loading {total} more tasks through the store"));
    let loaded = load(store.clone(), &run, total).await?;
    drop(store);
    out.insert("tasks".into(), json!(already + loaded.ids.len()));

    // 3. Latency, one request after another.
    let server = ServeChild::start(url)?;
    let base = server.base.clone();
    let mut rng = rand::thread_rng();
    let ids = &loaded.ids;
    let mut pick = move || ids[rng.gen_range(0..ids.len())];
    let mut record = |name: &str, samples: &[Duration]| {
        let (p50, p99) = (percentile_ms(samples, 50.0), percentile_ms(samples, 99.0));
        progress(format!(
            "{name}: {} samples, p50 {p50} ms, p99 {p99} ms, max {} ms",
            samples.len(),
            round3(samples.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0))
        ));
        out.insert(format!("{name}_p50_ms"), json!(p50));
        out.insert(format!("{name}_p99_ms"), json!(p99));
    };
    // Warm-up: connections, statement caches.
    sample(&http, &base, 100, LIST_BUDGET, |_| {
        format!("/api/v1/tasks/{}", pick())
    })
    .await?;
    let s = sample(&http, &base, GET_SAMPLES, Duration::from_secs(60), |_| {
        format!("/api/v1/tasks/{}", pick())
    })
    .await?;
    record("get", &s);

    let h = |k: usize| format!("bench.{run}.h{k}");
    let lists: Vec<(&str, PathFn<'_>)> = vec![
        (
            "list_handler",
            Box::new(|i| {
                format!(
                    "/api/v1/tasks?state=running&handler={}&limit={PAGE}",
                    h(i % 10)
                )
            }),
        ),
        (
            "list_rare_handler",
            Box::new(|_| format!("/api/v1/tasks?handler=bench.{run}.rare&limit={PAGE}")),
        ),
        (
            "list_created",
            Box::new(|_| {
                let (a, b) = loaded.created_window;
                format!("/api/v1/tasks?created_after={a}&created_before={b}&limit={PAGE}")
            }),
        ),
        (
            "list_created_wide",
            Box::new(|_| {
                format!(
                    "/api/v1/tasks?created_after=0&created_before={}&limit={PAGE}",
                    now_ms() + 1
                )
            }),
        ),
        (
            "list_finished",
            Box::new(|_| {
                let (a, b) = loaded.finished_window;
                format!("/api/v1/tasks?finished_after={a}&finished_before={b}&limit={PAGE}")
            }),
        ),
        (
            "list_idempotency_key",
            Box::new(|i| {
                format!(
                    "/api/v1/tasks?idempotency_key={}&limit={PAGE}",
                    loaded.keys[(i * 7919) % loaded.keys.len()]
                )
            }),
        ),
        (
            "list_cursor",
            Box::new(|i| {
                let id = ids[(i * 104_729) % ids.len()];
                format!("/api/v1/tasks?cursor={id}&limit={PAGE}")
            }),
        ),
        (
            "list_handler_cursor",
            Box::new(|i| {
                let id = ids[(i * 104_729) % ids.len()];
                format!(
                    "/api/v1/tasks?handler={}&cursor={id}&limit={PAGE}",
                    h(i % 10)
                )
            }),
        ),
    ];
    for (name, path) in lists {
        let s = sample(&http, &base, LIST_SAMPLES, LIST_BUDGET, path).await?;
        record(name, &s);
    }
    drop(server);
    Ok(Value::Object(out).to_string())
}
