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
    Completion, Error, Lease, NewTask, Resolution, StepId, SystemClock, TaskFilter, TaskState,
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
                create: true,
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
    assert!(
        (db_now - before).abs() < 5_000,
        "db {db_now} vs local {before}"
    );
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
    let client = raw_client(&url).await;
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
                run: s.run,
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
                            run: s.run,
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
            ..TaskFilter::default()
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
    let started_before = postmaster_started(&url).await;
    // The run pauses once a quarter is done until the restart has begun, so
    // the restart always lands mid-run however fast the machine is (polling
    // the progress from another task could miss the window).
    let (quarter_tx, quarter_rx) = tokio::sync::oneshot::channel::<()>();
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let mut quarter = Some((quarter_tx, began_rx));
    let restarter = {
        let server = server.clone();
        let store = store.clone();
        tokio::spawn(async move {
            quarter_rx.await.unwrap();
            let before = store.count_steps().await.unwrap();
            let restart = tokio::task::spawn_blocking(move || server.restart());
            began_tx.send(()).unwrap();
            restart.await.unwrap();
            before.get("completed").copied().unwrap_or(0)
        })
    };
    let mut done = 0;
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
                    ..TaskFilter::default()
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
                    run: s.run,
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
        done += completions.len();
        if done >= N / 4 {
            if let Some((quarter_tx, began_rx)) = quarter.take() {
                quarter_tx.send(()).unwrap();
                began_rx.await.unwrap();
            }
        }
    }
    let completed_at_restart = restarter.await.unwrap();
    assert!(
        completed_at_restart < N as u64,
        "the restart happened mid-run ({completed_at_restart} of {N} done)"
    );
    assert_ne!(
        postmaster_started(&url).await,
        started_before,
        "the server was restarted"
    );
    for id in ids {
        let t = store.get_task(id).await.unwrap().expect("task kept");
        assert_eq!(t.state, TaskState::Completed, "task {id}");
    }
    eprintln!(
        "server_restart_mid_run: restarted after {completed_at_restart}/{N}; \
         {errors} errors surfaced to the caller"
    );
}

async fn postmaster_started(url: &str) -> String {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// With many finished steps in the table the claim is served by the partial
/// index on ready steps (no scan of the finished rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_uses_the_ready_index() {
    let url = pg_harness::database().await;
    let store = open(&url).await.unwrap();
    store
        .spawn((0..50).map(|i| NewTask::new("hot", json!(i))).collect())
        .await
        .unwrap();
    let client = raw_client(&url).await;
    add_finished_steps(&client, "hot", 200_000).await;
    let sql = format!(
        "EXPLAIN {}",
        switchyard_store::postgres::CLAIM
            .replace("$1::text[]", "ARRAY['hot']::text[]")
            .replace("$2::bigint[]", "ARRAY[10]::bigint[]")
            .replace("$3", "9223372036854775807")
            .replace("$4", "'h'")
            .replace("$5", "1")
    );
    let plan: Vec<String> = client
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    eprintln!("{plan}");
    // The planner normally picks `sy_steps_ready`; what matters is that the
    // finished rows are never scanned.
    assert!(plan.contains("Index"), "claim plan:\n{plan}");
    assert!(
        !plan.contains("Seq Scan on sy_steps"),
        "claim plan:\n{plan}"
    );
    let batch = store
        .claim("h", &[("hot".to_string(), 10)], 30_000)
        .await
        .unwrap();
    assert_eq!(batch.steps.len(), 10);
}

/// Settling a batch looks each step up by id even when the statistics were
/// taken while no step ran, planned under the settings the store's write
/// transactions run with ([`switchyard_store::postgres::BEGIN_WRITE`]).
/// With the lease index keyed on `state = 'running'` (schema v5), the
/// planner read that index as "every running step" and compared each with
/// each step of the batch: 60 ms for 500 steps instead of 2.
///
/// (On tables never analyzed, a new database's first minute, the planner
/// may still join a batch pair by pair, but then the table holds only a few
/// hundred rows and autovacuum's first analysis ends it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_looks_steps_up_by_id() {
    let url = pg_harness::database().await;
    let store = open(&url).await.unwrap();
    let client = raw_client(&url).await;
    add_finished_steps(&client, "busy", 200_000).await;
    let claimed = spawn_and_claim(&store, "busy", 500).await;
    let list = |f: &dyn Fn(&switchyard_core::ClaimedStep) -> String, ty: &str| {
        format!(
            "ARRAY[{}]::{ty}[]",
            claimed.iter().map(f).collect::<Vec<_>>().join(",")
        )
    };
    let sql = format!(
        "EXPLAIN {}",
        switchyard_store::postgres::SETTLE_AND_FINISH
            .replace(
                "$1::uuid[]",
                &list(&|s| format!("'{}'", s.step_id.0), "uuid")
            )
            .replace(
                "$2::uuid[]",
                &list(&|s| format!("'{}'", s.task_id.0), "uuid")
            )
            .replace("$3::text[]", &list(&|_| "'h'".to_string(), "text"))
            .replace("$4::int8[]", &list(&|s| s.run.to_string(), "int8"))
            .replace("$5::text[]", &list(&|_| "'null'".to_string(), "text"))
            .replace("$6", "1")
    );
    client
        .batch_execute(switchyard_store::postgres::BEGIN_WRITE)
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    client.batch_execute("ROLLBACK").await.unwrap();
    let plan = plan.join("\n");
    // One key lookup per step of the batch, never a scan of the running
    // steps joined pair by pair.
    assert!(
        plan.contains("using sy_steps_pkey") || plan.contains("using sy_steps_task_name"),
        "settle plan:\n{plan}"
    );
    assert!(!plan.contains("sy_steps_lease"), "settle plan:\n{plan}");
    assert!(!plan.contains("Join Filter"), "settle plan:\n{plan}");
    // The settle itself works, on every step.
    let done = store
        .complete(
            claimed
                .iter()
                .map(|s| Completion {
                    lease: lease_of(s, "h"),
                    resolution: Resolution::Completed(json!("ok")),
                })
                .collect(),
        )
        .await
        .unwrap();
    assert!(done.iter().all(|r| r.is_ok()), "{done:?}");
}

/// Checkpoints written at once by many handlers share transactions (group
/// commit): 300 writes from three steps land in a handful of transactions,
/// not 300. Within a batch each write is answered on its own: the writes of
/// a step whose lease is gone get `LeaseLost` and are not stored while the
/// others are, the later of two writes of one key wins, as two
/// transactions in that order would, and a key PostgreSQL cannot store is
/// refused on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkpoints_are_group_committed() {
    let url = pg_harness::database().await;
    let store = open(&url).await.unwrap();
    let steps = spawn_and_claim(&store, "cp", 3).await;
    let client = raw_client(&url).await;
    // The third step's lease is lost (another run holds it now).
    client
        .execute(
            "UPDATE sy_steps SET run = run + 1 WHERE id = $1",
            &[&steps[2].step_id.0],
        )
        .await
        .unwrap();
    // Keys k0..k98 per step, and k0 written again last; then one key
    // PostgreSQL cannot store, which must fail alone, not the batch.
    let mut jobs: Vec<(Lease, String, i64)> = steps
        .iter()
        .flat_map(|s| (0..100).map(|i| (lease_of(s, "h"), format!("k{}", i % 99), i)))
        .collect();
    jobs.push((lease_of(&steps[0], "h"), "bad\0key".to_string(), 0));
    let mut answers = futures::future::join_all(jobs.into_iter().map(|(lease, key, v)| {
        let store = store.clone();
        async move { store.put_checkpoint(&lease, &key, json!(v), 30_000).await }
    }))
    .await;
    let bad = answers.pop().unwrap();
    assert!(
        matches!(&bad, Err(Error::InvalidInput(m)) if m.contains("NUL")),
        "{bad:?}"
    );
    for (i, a) in answers.iter().enumerate() {
        if i < 200 {
            assert!(a.is_ok(), "write {i}: {a:?}");
        } else {
            assert!(
                matches!(a, Err(Error::LeaseLost(id)) if *id == steps[2].step_id),
                "write {i}: {a:?}"
            );
        }
    }
    for s in &steps[..2] {
        let cps = store.checkpoints(s.task_id).await.unwrap();
        assert_eq!(cps.len(), 99);
        assert_eq!(cps["k0"], json!(99), "the later write of k0 wins");
        assert_eq!(cps["k5"], json!(5));
    }
    assert!(store
        .checkpoints(steps[2].task_id)
        .await
        .unwrap()
        .is_empty());
    // Rows written by one transaction share its xmin.
    let transactions: i64 = client
        .query_one("SELECT count(DISTINCT xmin::text) FROM sy_checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        (1..=20).contains(&transactions),
        "200 checkpoints took {transactions} transactions"
    );
}

/// A plain connection to the test database, beside the store's own.
async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Inserts `n` completed steps of `handler` (a large history) and analyzes
/// the tables, so the planner's statistics describe that history.
async fn add_finished_steps(client: &tokio_postgres::Client, handler: &str, n: i32) {
    client
        .execute(
            "INSERT INTO sy_steps (id, task_id, name, handler, input, state, priority, run_at, created_at, updated_at) \
             SELECT gen_random_uuid(), gen_random_uuid(), $1, $1, 'null', 'completed', 0, 0, 0, 0 \
             FROM generate_series(1, $2)",
            &[&handler, &n],
        )
        .await
        .unwrap();
    client
        .batch_execute("ANALYZE sy_steps; ANALYZE sy_tasks;")
        .await
        .unwrap();
}

/// Spawns `n` tasks of `handler` and claims all their steps as host `h`.
async fn spawn_and_claim(
    store: &switchyard_core::DynStore,
    handler: &str,
    n: usize,
) -> Vec<switchyard_core::ClaimedStep> {
    store
        .spawn((0..n).map(|i| NewTask::new(handler, json!(i))).collect())
        .await
        .unwrap();
    let steps = store
        .claim("h", &[(handler.to_string(), n)], 30_000)
        .await
        .unwrap()
        .steps;
    assert_eq!(steps.len(), n);
    steps
}

fn lease_of(s: &switchyard_core::ClaimedStep, host: &str) -> Lease {
    Lease {
        step_id: s.step_id,
        task_id: s.task_id,
        attempt: s.attempt,
        run: s.run,
        host_id: host.to_string(),
    }
}

/// Suspending on an event while another store emits it at the same moment:
/// the step always ends up ready (no lost wake-up between transactions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_emit_race() {
    let url = pg_harness::database().await;
    let a = open(&url).await.unwrap();
    let b = open(&url).await.unwrap();
    for round in 0..40 {
        let id = a
            .spawn(vec![NewTask::new("race", json!(round))])
            .await
            .unwrap()[0]
            .task_id;
        let s = a
            .claim("h", &[("race".to_string(), 1)], 30_000)
            .await
            .unwrap()
            .steps
            .remove(0);
        let event = format!("ev-{round}");
        let wait = switchyard_core::WaitFor {
            event: Some(event.clone()),
            ..Default::default()
        };
        let suspend = a.complete(vec![Completion {
            lease: lease_of(&s, "h"),
            resolution: Resolution::Suspended(wait),
        }]);
        let emit = b.emit_event(&event, json!(round));
        let (done, emitted) = tokio::join!(suspend, emit);
        done.unwrap()[0].clone().unwrap();
        assert!(emitted.unwrap());
        let detail = a.task_detail(id).await.unwrap().unwrap();
        assert_eq!(
            detail.steps[0].state,
            switchyard_core::StepState::Ready,
            "round {round}: the waiter missed the event"
        );
    }
}

/// Children of a delegation group finishing on several stores at once,
/// while the parent suspends on the group: the parent is always woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_children_finish_concurrently() {
    const K: usize = 12;
    let url = pg_harness::database().await;
    let stores = [
        open(&url).await.unwrap(),
        open(&url).await.unwrap(),
        open(&url).await.unwrap(),
    ];
    for round in 0..8 {
        let parent_id = stores[0]
            .spawn(vec![NewTask::new("parent", json!(round))])
            .await
            .unwrap()[0]
            .task_id;
        let p = stores[0]
            .claim("h", &[("parent".to_string(), 1)], 30_000)
            .await
            .unwrap()
            .steps
            .remove(0);
        let group = format!("g-{round}");
        let children = (0..K)
            .map(|i| {
                let mut t = NewTask::new("child", json!(i));
                t.parent = Some(switchyard_core::ParentRef {
                    task_id: p.task_id,
                    step_id: p.step_id,
                    group: Some(group.clone()),
                    index: i as u32,
                });
                t
            })
            .collect();
        stores[0].spawn(children).await.unwrap();
        let mut joins = Vec::new();
        for (n, store) in stores.iter().enumerate() {
            let store = store.clone();
            joins.push(tokio::spawn(async move {
                let host = format!("w{n}");
                loop {
                    let batch = store
                        .claim(&host, &[("child".to_string(), 1)], 30_000)
                        .await
                        .unwrap();
                    let Some(s) = batch.steps.into_iter().next() else {
                        break;
                    };
                    store
                        .complete(vec![Completion {
                            lease: lease_of(&s, &host),
                            resolution: Resolution::Completed(json!("ok")),
                        }])
                        .await
                        .unwrap()[0]
                        .clone()
                        .unwrap();
                }
            }));
        }
        let wait = switchyard_core::WaitFor {
            group: Some(group.clone()),
            ..Default::default()
        };
        stores[1]
            .complete(vec![Completion {
                lease: lease_of(&p, "h"),
                resolution: Resolution::Suspended(wait),
            }])
            .await
            .unwrap()[0]
            .clone()
            .unwrap();
        for j in joins {
            j.await.unwrap();
        }
        let outcomes = stores[2].group_outcomes(&group).await.unwrap();
        assert_eq!(outcomes.len(), K);
        assert!(outcomes.iter().all(|o| o.state == TaskState::Completed));
        let detail = stores[2].task_detail(parent_id).await.unwrap().unwrap();
        assert_eq!(
            detail.steps[0].state,
            switchyard_core::StepState::Ready,
            "round {round}: the parent was not woken"
        );
    }
}

/// A rough throughput figure (not a benchmark: `cargo test --release ...
/// throughput_smoke -- --ignored --nocapture`): one store, spawn in batches,
/// then claim and complete in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints a throughput figure; run by hand"]
async fn throughput_smoke() {
    const N: usize = 20_000;
    let url = pg_harness::database().await;
    let store = open(&url).await.unwrap();
    let t0 = std::time::Instant::now();
    for chunk in 0..N / 500 {
        store
            .spawn(
                (0..500)
                    .map(|i| NewTask::new("tp", json!(chunk * 500 + i)))
                    .collect(),
            )
            .await
            .unwrap();
    }
    let spawn_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut done = 0;
    while done < N {
        let batch = store
            .claim("h", &[("tp".to_string(), 256)], 30_000)
            .await
            .unwrap();
        done += batch.steps.len();
        let completions = batch
            .steps
            .iter()
            .map(|s| Completion {
                lease: lease_of(s, "h"),
                resolution: Resolution::Completed(json!(1)),
            })
            .collect();
        store.complete(completions).await.unwrap();
    }
    let run_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "spawn: {:.0} tasks/s; claim+complete: {:.0} steps/s",
        N as f64 / spawn_s,
        N as f64 / run_s
    );
}

/// A heartbeat never waits on a step row another transaction holds (a
/// completion batch being recorded, say): it renews the leases it can lock
/// at once and still counts the held step as its own. It used to wait, and
/// a completion batch waiting in turn on rows the heartbeat had locked
/// deadlocked with it; under load every such wait stalled the host's
/// completions behind a heartbeat renewing its whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_skips_rows_held_by_another_transaction() {
    let url = pg_harness::database().await;
    let store = open(&url).await.unwrap();
    let steps = spawn_and_claim(&store, "beat", 3).await;
    let mut client = raw_client(&url).await;
    let before: Vec<i64> = expiries(&client, &steps).await;
    // Another transaction holds the first step's row.
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM sy_steps WHERE id = $1 FOR UPDATE",
        &[&steps[0].step_id.0],
    )
    .await
    .unwrap();
    let host = switchyard_core::HostInfo {
        id: "h".to_string(),
        pid: 1,
        hostname: "box".to_string(),
        name: None,
        handlers: vec!["beat".to_string()],
        started_at: 0,
        last_heartbeat: 0,
        language: None,
        slots: None,
        ended_at: None,
        end_reason: None,
    };
    let ids: Vec<switchyard_core::RunRef> = steps
        .iter()
        .map(|s| switchyard_core::RunRef {
            step_id: s.step_id,
            run: s.run,
        })
        .collect();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        store.heartbeat(&host, &ids, 600_000),
    )
    .await
    .expect("the heartbeat waited on a row held by another transaction")
    .unwrap();
    assert!(reply.lost.is_empty(), "lost: {:?}", reply.lost);
    tx.rollback().await.unwrap();
    let after: Vec<i64> = expiries(&client, &steps).await;
    assert_eq!(after[0], before[0], "the held row is left as it was");
    for i in 1..3 {
        assert!(after[i] > before[i], "step {i}: lease not renewed");
    }
    // Once the row is free again the next heartbeat renews it too.
    let reply = store.heartbeat(&host, &ids, 600_000).await.unwrap();
    assert!(reply.lost.is_empty());
    let again: Vec<i64> = expiries(&client, &steps).await;
    assert!(again[0] > before[0]);
}

async fn expiries(c: &tokio_postgres::Client, steps: &[switchyard_core::ClaimedStep]) -> Vec<i64> {
    let mut out = Vec::new();
    for s in steps {
        let row = c
            .query_one(
                "SELECT lease_expires_at FROM sy_steps WHERE id = $1",
                &[&s.step_id.0],
            )
            .await
            .unwrap();
        out.push(row.get(0));
    }
    out
}

/// Every pooled connection gets `lock_timeout` and
/// `idle_in_transaction_session_timeout`; the URL overrides them, and a
/// setting in libpq-style `options` wins over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_timeouts() {
    use switchyard_store::postgres::PostgresStore;
    let url = pg_harness::database().await;
    for (query, lock, idle) in [
        ("", "30s", "1min"),
        (
            "?lock_timeout=5s&idle_in_transaction_session_timeout=0",
            "5s",
            "0",
        ),
        ("?lock_timeout=250", "250ms", "1min"),
        (
            "?lock_timeout=5s&options=-c%20lock_timeout%3D7s",
            "7s",
            "1min",
        ),
    ] {
        let store = PostgresStore::open(&format!("{url}{query}"), StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        // More than one pooled connection: each is set up.
        let (a, b) = tokio::join!(
            store.session_setting("lock_timeout"),
            store.session_setting("lock_timeout")
        );
        assert_eq!(
            (a.unwrap().as_str(), b.unwrap().as_str()),
            (lock, lock),
            "{query}"
        );
        assert_eq!(
            store
                .session_setting("idle_in_transaction_session_timeout")
                .await
                .unwrap(),
            idle,
            "{query}"
        );
    }
    match open(&format!("{url}?lock_timeout=forever")).await {
        Err(Error::Config(m)) => assert!(m.contains("`lock_timeout`"), "{m}"),
        other => panic!("expected a config error, got {:?}", other.map(|s| s.url())),
    }
}

/// A row lock held elsewhere makes a write fail after `lock_timeout` with
/// the transient `Error::Store` (55P03) instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_row_lock_fails_a_write_after_lock_timeout() {
    let url = pg_harness::database().await;
    let store = open(&format!("{url}?lock_timeout=300ms")).await.unwrap();
    let id = store
        .spawn(vec![NewTask::new("locked", json!(1))])
        .await
        .unwrap()[0]
        .task_id;
    let holder = raw_client(&url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("SELECT 1 FROM sy_tasks WHERE id = $1 FOR UPDATE", &[&id.0])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), store.cancel_task(id, false))
        .await
        .expect("the write must give up, not wait for the lock");
    match outcome {
        Err(Error::Store(m)) => assert!(m.contains("55P03"), "{m}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}",
        started.elapsed()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        store.cancel_task(id, false).await.unwrap(),
        "works once the lock is gone"
    );
}
