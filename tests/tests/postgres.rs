//! Multi-process tests on PostgreSQL: `testhost` processes share one
//! database on a throwaway server (`switchyard_store::pg_server`, started by
//! each test on 127.0.0.1 and a free port, in a temporary directory).
//!
//! * three hosts process a workload together: every task runs once, none is lost;
//! * a host is SIGKILLed mid-run: after its leases expire the surviving hosts
//!   take its steps over and every task completes exactly once;
//! * several processes migrate a fresh database at once (while hosts start
//!   on it, migrating at start too): one schema, every process succeeds.
//!
//! These tests fail (they do not skip) when PostgreSQL is not installed:
//! install `postgresql` or set `SWITCHYARD_PG_BIN`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard::{Client, DynStore, ErrorKind, StepState, TaskFilter, TaskState};
use switchyard_e2e::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testhost"))
}

/// Every task is completed with one step, whose result comes from a run in
/// the log that held the step's final attempt; no attempt started twice.
/// Returns the number of tasks that completed on attempt ≥ 2.
async fn check_exactly_once(
    store: &DynStore,
    runs: &RunLog,
    n: usize,
    hosts: &[&str],
) -> anyhow::Result<usize> {
    for ((task, attempt), starts) in runs.starts_by_attempt() {
        assert_eq!(
            starts.len(),
            1,
            "task {task} attempt {attempt} started {} times: {starts:?}",
            starts.len()
        );
    }
    let tasks = store
        .list_tasks(&TaskFilter {
            limit: n + 100,
            ..Default::default()
        })
        .await?;
    assert_eq!(tasks.len(), n, "tasks in the store");
    let by_task = runs.by_task();
    assert_eq!(by_task.len(), n, "tasks in the run log");
    let mut rerun = 0;
    for task in &tasks {
        let id = task.id.to_string();
        assert_eq!(
            task.state,
            TaskState::Completed,
            "task {id}: {:?}",
            task.error
        );
        let detail = store
            .task_detail(task.id)
            .await?
            .expect("listed task exists");
        assert_eq!(detail.steps.len(), 1, "task {id}: {:?}", detail.steps);
        let step = &detail.steps[0];
        assert_eq!(step.state, StepState::Completed, "task {id}");
        let result = task.result.clone().expect("completed task has a result");
        assert_eq!(step.result.as_ref(), Some(&result), "task {id}");
        assert_eq!(result["task"], json!(id));
        let attempt = result["attempt"].as_u64().expect("attempt in result") as u32;
        let host = result["host"].as_str().expect("host in result");
        assert_eq!(
            attempt, step.attempt,
            "task {id}: result from an old attempt"
        );
        assert!(hosts.contains(&host), "task {id}: unknown host {host}");
        assert!(
            runs.has(&id, attempt, host, Mark::Start) && runs.has(&id, attempt, host, Mark::End),
            "task {id}: the run in its result is not in the log"
        );
        let lines = by_task
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for l in lines {
            assert!(
                l.attempt <= attempt,
                "task {id}: run {l:?} after the completed attempt {attempt}"
            );
        }
        if attempt >= 2 {
            rerun += 1;
            if let Some(e) = &step.error {
                assert_eq!(e.kind, ErrorKind::LeaseExpired, "task {id}: {e:?}");
            }
        } else {
            assert_eq!(step.error, None, "task {id}: error on a clean run");
        }
    }
    Ok(rerun)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_share_a_postgres_workload() -> anyhow::Result<()> {
    const TASKS: usize = 2000;
    let (_server, url) = postgres_database().await?;
    let scratch = Scratch::with_store_url(url)?;
    let store = scratch.open().await?;
    let client = Client::new(store.clone());

    // A long lease: with no kills none may expire, so every step runs once.
    let host = |name: &str| {
        scratch
            .host(name)
            .lease_ms(20_000)
            .concurrency(8)
            .start(bin())
    };
    let (a, b, c) = tokio::join!(host("a"), host("b"), host("c"));
    let mut hosts = [a?, b?, c?];
    let ids: HashSet<String> = hosts.iter().map(|h| h.host_id.clone()).collect();
    assert_eq!(ids.len(), 3, "host ids must differ");

    spawn_work(&client, TASKS, json!({"sleep_ms": 3}), 0).await?;
    let counts = wait_all_completed(&store, TASKS as u64, Duration::from_secs(60)).await?;
    for h in &mut hosts {
        h.stop(Duration::from_secs(20)).await?;
    }
    assert_eq!(
        counts.get("completed").copied(),
        Some(TASKS as u64),
        "{counts:?}"
    );
    assert_eq!(counts.values().sum::<u64>(), TASKS as u64, "{counts:?}");

    let runs = scratch.runs()?;
    let per_host = runs.starts_per_host();
    eprintln!("postgres three hosts: runs per host: {per_host:?}");
    for h in &hosts {
        assert!(
            per_host.get(h.host_id.as_str()).copied().unwrap_or(0) > 0,
            "host {} did no work: {per_host:?}",
            h.config.name
        );
    }
    let names: Vec<&str> = hosts.iter().map(|h| h.host_id.as_str()).collect();
    let rerun = check_exactly_once(&store, &runs, TASKS, &names).await?;
    assert_eq!(rerun, 0, "tasks re-run with no kill");
    // One start and one end line per task: nothing ran twice.
    assert_eq!(runs.lines.len(), 2 * TASKS, "run log lines");

    let registered = store.list_hosts().await?;
    assert!(
        registered.iter().all(|h| !ids.contains(&h.id)),
        "hosts still registered after SIGTERM: {registered:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_host_steps_are_taken_over_on_postgres() -> anyhow::Result<()> {
    const TASKS: usize = 3000;
    // Held by the first host until it dies (high priority: claimed first).
    const HELD: usize = 8;
    let (_server, url) = postgres_database().await?;
    let scratch = Scratch::with_store_url(url)?;
    let store = scratch.open().await?;
    let (first, held, done_at_kill) =
        kill_first_host_midway(&scratch, &store, bin(), TASKS, HELD).await?;

    // Two survivors compete for the dead host's expired leases.
    let (second, third) = tokio::join!(
        scratch
            .host("second")
            .lease_ms(1000)
            .concurrency(16)
            .start(bin()),
        scratch
            .host("third")
            .lease_ms(1000)
            .concurrency(16)
            .start(bin()),
    );
    let (mut second, mut third) = (second?, third?);
    let counts = wait_all_completed(&store, TASKS as u64, Duration::from_secs(60)).await?;
    second.stop(Duration::from_secs(20)).await?;
    third.stop(Duration::from_secs(20)).await?;
    assert_eq!(
        counts.get("completed").copied(),
        Some(TASKS as u64),
        "{counts:?}"
    );
    assert_eq!(counts.values().sum::<u64>(), TASKS as u64, "{counts:?}");

    let runs = scratch.runs()?;
    let names = [
        first.host_id.as_str(),
        second.host_id.as_str(),
        third.host_id.as_str(),
    ];
    let rerun = check_exactly_once(&store, &runs, TASKS, &names).await?;
    assert!(rerun >= HELD, "only {rerun} tasks were re-run");
    let by_task = runs.by_task();
    for task in store
        .list_tasks(&TaskFilter {
            limit: TASKS + 100,
            ..Default::default()
        })
        .await?
    {
        let id = task.id.to_string();
        let result = task.result.expect("completed");
        let host = result["host"].as_str().unwrap_or_default();
        let attempt = result["attempt"].as_u64().unwrap_or(0) as u32;
        // Every run the killed host left unfinished was re-run later by a survivor.
        let lines = by_task
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for l in lines
            .iter()
            .filter(|l| l.host == first.host_id && l.mark == Mark::Start)
        {
            if host != first.host_id {
                assert!(
                    attempt > l.attempt,
                    "task {id}: killed run {l:?} not re-run"
                );
            }
        }
        if held.contains(&id) {
            assert!(
                attempt >= 2,
                "held task {id} completed on attempt {attempt}"
            );
            assert!(
                host == second.host_id || host == third.host_id,
                "held task {id} completed by {host}, not a survivor"
            );
            assert!(
                !runs.has(&id, 1, &first.host_id, Mark::End),
                "held task {id} ended on the killed host"
            );
        }
    }
    eprintln!(
        "postgres crash: {done_at_kill} completed before the kill, {rerun} tasks re-run; runs per host: {:?}",
        runs.starts_per_host()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_from_several_processes() -> anyhow::Result<()> {
    const MIGRATORS: usize = 5;
    const TASKS: usize = 300;
    let (_server, url) = postgres_database().await?;
    let scratch = Scratch::with_store_url(url.clone())?;

    // On a fresh database, five `--migrate` processes and two hosts (which
    // migrate at start) all start at once.
    let migrators: Vec<_> = (0..MIGRATORS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { migrate_process(bin(), &url).await })
        })
        .collect();
    let host = |name: &str| scratch.host(name).lease_ms(20_000).start(bin());
    let (a, b) = tokio::join!(host("a"), host("b"));
    let (mut a, mut b) = (a?, b?);
    let mut versions = Vec::new();
    for m in migrators {
        versions.push(m.await??);
    }
    let v = versions[0];
    assert!(v >= 1, "schema version {v}");
    assert!(
        versions.iter().all(|&x| x == v),
        "migrators disagree on the schema version: {versions:?}"
    );

    // One row per migration, each applied once, and nothing left to do.
    let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    let rows = pg
        .query("SELECT version FROM sy_migrations ORDER BY version", &[])
        .await?;
    let applied: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, (1..=v as i32).collect::<Vec<_>>(), "sy_migrations");
    drop(pg);
    let _ = conn.await;

    let store = scratch.open().await?;
    assert_eq!(store.migrate().await?, v, "a later migrate is a no-op");
    assert_eq!(migrate_process(bin(), &url).await?, v);

    // The schema works for the hosts that migrated concurrently.
    let client = Client::new(store.clone());
    spawn_work(&client, TASKS, json!({}), 0).await?;
    let counts = wait_all_completed(&store, TASKS as u64, Duration::from_secs(30)).await?;
    a.stop(Duration::from_secs(20)).await?;
    b.stop(Duration::from_secs(20)).await?;
    assert_eq!(counts.values().sum::<u64>(), TASKS as u64, "{counts:?}");
    let runs = scratch.runs()?;
    let names = [a.host_id.as_str(), b.host_id.as_str()];
    check_exactly_once(&store, &runs, TASKS, &names).await?;
    Ok(())
}
