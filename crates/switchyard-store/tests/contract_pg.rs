//! Runs the store contract suite against PostgreSQL (a throwaway server
//! started by `pg_harness`, one fresh database per test), plus checks that
//! only PostgreSQL has: the database clock, concurrent migrations, several
//! stores (as several processes would) sharing one database, LISTEN/NOTIFY
//! wake-ups, URL validation and a server restart mid-run.
//!
//! Run with `cargo test -p switchyard-store --features contract --test contract_pg`.
//! Fails (does not skip) when PostgreSQL is not installed.

mod pg_harness;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard_core::{
    Completion, Error, Lease, NewTask, Resolution, StepId, Store, SystemClock, TaskFilter,
    TaskState,
};
use switchyard_store::contract::{factory, Factory, Opened};
use switchyard_store::{contract_suite, open, open_with, StoreOptions};

/// A fresh database per test, driven by the test's fake clock.
fn pg_store() -> Factory {
    factory(|clock| async move {
        let url = pg_harness::database().await;
        let store = open_with(
            &url,
            StoreOptions {
                clock,
                migrate: true,
            },
        )
        .await
        .expect("open postgres store");
        Opened::new(store)
    })
}

contract_suite!(postgres, pg_store());

fn millis_now() -> i64 {
    switchyard_core::Clock::now(&SystemClock)
}

/// With the default (system) clock the database clock is used: times come
/// from the server (same machine here, so close to ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_clock_means_database_clock() {
    let url = pg_harness::database().await;
    let store = open(&url).await.expect("open");
    assert_eq!(store.kind(), "postgres");
    let before = millis_now();
    let db_now = store.now().await.unwrap();
    assert!((db_now - before).abs() < 5_000, "db {db_now} vs local {before}");
    let id = store
        .spawn(vec![NewTask::new("clock", json!(1))])
        .await
        .unwrap()[0]
        .task_id;
    let task = store.get_task(id).await.unwrap().unwrap();
    assert!((task.created_at - before).abs() < 5_000);
    let batch = store
        .claim("h", &[("clock".to_string(), 1)], 10_000)
        .await
        .unwrap();
    assert_eq!(batch.steps.len(), 1);
    let s = &batch.steps[0];
    assert!(s.lease_expires_at >= task.created_at + 10_000);
}

/// Bad `wakeup`/`poll_ms` parameters are configuration errors naming the
/// field; valid ones set the poll interval; the password is not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_parameters() {
    let url = pg_harness::database().await;
    match open(&format!("{url}?wakeup=sometimes")).await {
        Err(Error::Config(m)) => assert!(m.contains("wakeup"), "{m}"),
        other => panic!("expected a config error, got {:?}", other.map(|s| s.url())),
    }
    match open(&format!("{url}?poll_ms=soon")).await {
        Err(Error::Config(m)) => assert!(m.contains("poll_ms"), "{m}"),
        other => panic!("expected a config error, got {:?}", other.map(|s| s.url())),
    }
    let polling = open(&format!("{url}?wakeup=polling&poll_ms=25"))
        .await
        .unwrap();
    assert_eq!(polling.poll_interval(), Duration::from_millis(25));
    assert!(polling.url().contains("wakeup=polling"));
    let hybrid = open(&url).await.unwrap();
    assert_eq!(hybrid.poll_interval(), Duration::from_secs(1));
    assert!(hybrid.url().contains("wakeup=hybrid"));
    let secret = url.replace("postgres@", "postgres:hunter2@");
    let s = open(&secret).await.unwrap();
    assert!(!s.url().contains("hunter2"), "{}", s.url());
}

/// Several stores migrating one new database at once: all succeed, each
/// version is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations() {
    let url = pg_harness::database().await;
    let mut joins = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        joins.push(tokio::spawn(async move {
            let store = open(&url).await.expect("open while others migrate");
            store.migrate().await.expect("migrate")
        }));
    }
    let mut versions = HashSet::new();
    for j in joins {
        versions.insert(j.await.unwrap());
    }
    assert_eq!(versions.len(), 1);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM sy_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as u32, *versions.iter().next().unwrap());
}

/// A spawn through one store wakes a host on another store of the same
/// database (LISTEN/NOTIFY), as it would across processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reaches_other_stores() {
    let url = pg_harness::database().await;
    let a = open(&format!("{url}?wakeup=event-driven")).await.unwrap();
    let b = open(&format!("{url}?wakeup=event-driven")).await.unwrap();
    // Let b's listener connect (it signals once connected).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for what in ["ready", "finished"] {
        let signals = b.signals().clone();
        let notify = if what == "ready" {
            &signals.ready
        } else {
            &signals.finished
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if what == "ready" {
            a.spawn(vec![NewTask::new("x", json!(1))]).await.unwrap();
        } else {
            let s = a
                .claim("h", &[("x".to_string(), 1)], 30_000)
                .await
                .unwrap()
                .steps
                .remove(0);
            let lease = Lease {
                step_id: s.step_id,
                task_id: s.task_id,
                attempt: s.attempt,
                host_id: "h".into(),
            };
            a.complete(vec![Completion {
                lease,
                resolution: Resolution::Completed(json!(2)),
            }])
            .await
            .unwrap()[0]
                .clone()
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), notified)
            .await
            .unwrap_or_else(|_| panic!("{what} did not reach the other store"));
    }
}

/// Hosts on several stores claiming and completing one workload together:
/// every task done, no step handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_stores_share_a_workload() {
    const N: usize = 600;
    let url = pg_harness::database().await;
    let seed = open(&url).await.unwrap();
    let tasks = (0..N).map(|i| NewTask::new("work", json!(i))).collect();
    seed.spawn(tasks).await.unwrap();
    let mut joins = Vec::new();
    for h in 0..4 {
        let url = url.clone();
        joins.push(tokio::spawn(async move {
            let store = open(&url).await.unwrap();
            let host = format!("host-{h}");
            let mut seen = Vec::new();
            loop {
                let batch = store
                    .claim(&host, &[("work".to_string(), 25)], 30_000)
                    .await
                    .unwrap();
                if batch.steps.is_empty() {
                    break;
                }
                let completions = batch
                    .steps
                    .iter()
                    .map(|s| Completion {
                        lease: Lease {
                            step_id: s.step_id,
                            task_id: s.task_id,
                            attempt: s.attempt,
                            host_id: host.clone(),
                        },
                        resolution: Resolution::Completed(s.input.clone()),
                    })
                    .collect();
                for r in store.complete(completions).await.unwrap() {
                    r.unwrap();
                }
                seen.extend(batch.steps.iter().map(|s| s.step_id));
            }
            seen
        }));
    }
    let mut all: Vec<StepId> = Vec::new();
    for j in joins {
        all.extend(j.await.unwrap());
    }
    let distinct: HashSet<StepId> = all.iter().copied().collect();
    assert_eq!(all.len(), N, "every step claimed once");
    assert_eq!(distinct.len(), N);
    let done = seed
        .list_tasks(&TaskFilter {
            state: Some(TaskState::Completed),
            handler: None,
            limit: N + 10,
        })
        .await
        .unwrap();
    assert_eq!(done.len(), N);
}

/// PostgreSQL is killed (immediate shutdown) and restarted in the middle of
/// a run: the store reconnects, the run finishes, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run() {
    const N: usize = 400;
    let server = Arc::new(pg_harness::Server::start().expect("private server"));
    let url = server.database().await;
    let store = open(&format!("{url}?wakeup=hybrid")).await.unwrap();
    let ids: Vec<_> = store
        .spawn((0..N).map(|i| NewTask::new("r", json!(i))).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.task_id)
        .collect();
    let restarter = {
        let server = server.clone();
        let store = store.clone();
        tokio::spawn(async move {
            // Restart once some work is done.
            loop {
                let counts = store.count_steps().await.unwrap();
                if counts.get("completed").copied().unwrap_or(0) >= (N / 4) as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::task::spawn_blocking(move || server.restart())
                .await
                .unwrap();
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut errors = 0;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "run did not finish");
        let batch = match store.claim("h", &[("r".to_string(), 10)], 1_000).await {
            Ok(b) => b,
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        if batch.steps.is_empty() {
            // Steps whose claim was lost with the connection come back after
            // their (short) lease expires.
            let left = store
                .list_tasks(&TaskFilter {
                    state: Some(TaskState::Running),
                    handler: None,
                    limit: 1,
                })
                .await;
            match left {
                Ok(l) if l.is_empty() => break,
                _ => {}
            }
            let _ = store.recover_expired().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let completions: Vec<Completion> = batch
            .steps
            .iter()
            .map(|s| Completion {
                lease: Lease {
                    step_id: s.step_id,
                    task_id: s.task_id,
                    attempt: s.attempt,
                    host_id: "h".into(),
                },
                resolution: Resolution::Completed(s.input.clone()),
            })
            .collect();
        // A failed batch is retried as a core would; an item answered
        // LeaseLost on a retry had been applied (or its lease expired).
        for _ in 0..20 {
            match store.complete(completions.clone()).await {
                Ok(_) => break,
                Err(_) => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    restarter.await.unwrap();
    for id in ids {
        let t = store.get_task(id).await.unwrap().expect("task kept");
        assert_eq!(t.state, TaskState::Completed, "task {id}");
    }
    eprintln!("server_restart_mid_run: {errors} transient errors seen by the caller");
}
