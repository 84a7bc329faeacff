//! The store and the host behind the dashboard's browser test
//! (`make test-dashboard`, `tests/dashboard/dashboard.test.mjs`).
//!
//! `dashboard_seed --store sqlite:PATH` starts a real Rust host on the store
//! and seeds tasks in every state: a decision with a fan-out and its
//! convergence (completed), a parent that checkpoints, spawns a child and
//! waits for the event `paid.1` (suspended), a step that fails with a
//! traceback the first time it runs (failed; a retry completes it), three
//! tasks failing with "card declined" (a failure group; a retry completes
//! them), a cancelled task, and 56 tasks of a handler nothing serves (more than a page). When all
//! are in place it prints one JSON line with their ids and keeps serving
//! until SIGTERM or SIGINT (or ten minutes).
//!
//! `dashboard_seed --store sqlite:PATH --bulk N` instead spawns N tasks of a
//! handler nobody serves, in batches, prints how long it took and exits (the
//! dashboard's 1,000,000-task measurement).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_core::{
    Decision, DynStore, HandlerOptions, NewStep, NewTask, StepError, TaskId, TaskState, Worker,
};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn bulk(store: DynStore, n: usize) {
    let started = Instant::now();
    let batch = 10_000;
    let mut done = 0;
    while done < n {
        let k = batch.min(n - done);
        let tasks = (done..done + k)
            .map(|i| NewTask::new("bulk.item", json!({ "i": i })))
            .collect();
        store.spawn(tasks).await.expect("spawn a batch");
        done += k;
        if done % 100_000 == 0 {
            eprintln!("seeded {done} tasks in {:.1?}", started.elapsed());
        }
    }
    println!(
        "{}",
        json!({ "seeded": n, "seconds": started.elapsed().as_secs_f64() })
    );
}

async fn spawn(store: &DynStore, handler: &str, input: Value, key: Option<&str>) -> TaskId {
    let mut t = NewTask::new(handler, input);
    if let Some(k) = key {
        t.idempotency_key = Some(k.to_string());
    }
    store.spawn(vec![t]).await.expect("spawn")[0].task_id
}

#[tokio::main]
async fn main() {
    let url = arg("--store").expect("--store URL");
    let store = switchyard_store::open(&url).await.expect("open the store");
    if let Some(n) = arg("--bulk") {
        bulk(store, n.parse().expect("--bulk N")).await;
        return;
    }
    // Tasks that have failed once (their next run completes).
    let failed_once: Arc<Mutex<HashSet<TaskId>>> = Arc::default();
    let (f1, f2) = (failed_once.clone(), failed_once.clone());
    let worker = Worker::builder(store.clone())
        .name("dashboard-seed")
        .concurrency(8)
        .shutdown_grace(Duration::from_millis(300))
        .decision(
            "order.fulfil",
            HandlerOptions::default(),
            |input, _ctx| async move { Ok(Decision::fan_out("order.pack", 12, 2, input, "order.ship")) },
        )
        .decision("stock.order", HandlerOptions::default(), |input, _ctx| async move {
            Ok(Decision::steps(vec![NewStep::new("check", "stock.check", input)
                .route("ok", vec![NewStep::new("ship", "order.pack", json!({ "size": 1 }))])
                .route(
                    "out_of_stock",
                    vec![NewStep::new("backorder", "order.pack", json!({ "size": 0 }))],
                )]))
        })
        .step("stock.check", HandlerOptions::default(), |_input, ctx| async move {
            ctx.set_status("out_of_stock")?;
            Ok(json!({ "missing": 2 }))
        })
        .step("order.pack", HandlerOptions::default(), |input, _ctx| async move {
            Ok(json!({ "packed": input["size"] }))
        })
        .step("order.ship", HandlerOptions::default(), |_input, ctx| async move {
            let parts = ctx.dependency_results().await?;
            Ok(json!({ "shipped_batches": parts.len() }))
        })
        .step("invoice.parent", HandlerOptions::default(), |input, ctx| async move {
            let n: i64 = ctx.checkpoint("lines", || async { Ok(3) }).await?;
            ctx.spawn("invoice.line", json!({ "n": n })).await?;
            let paid = ctx.await_event("paid.1", None).await?;
            Ok(json!({ "input": input, "paid": paid }))
        })
        .step("invoice.line", HandlerOptions::default(), |input, _ctx| async move {
            Ok(input)
        })
        .step("report.build", HandlerOptions::default(), move |input, ctx| {
            let f = f1.clone();
            async move {
                if f.lock().unwrap().insert(ctx.task_id()) {
                    return Err(StepError::Permanent {
                        message: "report template missing".into(),
                        trace: Some(
                            "Traceback (most recent call last):\n  File \"report.py\", line 42, in build\n    render(template)\nKeyError: 'template'"
                                .into(),
                        ),
                    });
                }
                Ok(json!({ "report": input, "pages": 2 }))
            }
        })
        .step("payment.charge", HandlerOptions::default(), move |input, ctx| {
            let f = f2.clone();
            async move {
                if f.lock().unwrap().insert(ctx.task_id()) {
                    return Err(StepError::permanent("card declined"));
                }
                Ok(json!({ "charged": input }))
            }
        })
        .step("mail.wait", HandlerOptions::default(), |_input, ctx| async move {
            ctx.await_event("never.sent", None).await
        })
        .build()
        .expect("build the host")
        .start()
        .await
        .expect("start the host");

    let order = spawn(
        &store,
        "order.fulfil",
        json!({ "order": 7 }),
        Some("order-7"),
    )
    .await;
    let parent = spawn(&store, "invoice.parent", json!({ "invoice": 1 }), None).await;
    let routed = spawn(&store, "stock.order", json!({ "sku": "bolt" }), None).await;
    let report = spawn(&store, "report.build", json!({ "month": "2026-11" }), None).await;
    let mut charges = Vec::new();
    for i in 0..3 {
        charges.push(spawn(&store, "payment.charge", json!({ "amount": 10 + i }), None).await);
    }
    let cancelled = spawn(&store, "mail.wait", json!({ "to": "x@example.com" }), None).await;
    let orphan = spawn(&store, "legacy.export", json!({}), None).await;
    // More than one page of tasks (the dashboard lists 50 a page).
    store
        .spawn(
            (0..55)
                .map(|i| NewTask::new("legacy.export", json!({ "batch": i })))
                .collect(),
        )
        .await
        .expect("spawn a page's worth");

    let deadline = Instant::now() + Duration::from_secs(60);
    let state = |id| {
        let store = store.clone();
        async move { store.get_task(id).await.unwrap().unwrap() }
    };
    let mut cancelled_done = false;
    loop {
        let d = store.task_detail(parent).await.unwrap().unwrap();
        let waiting = d
            .steps
            .iter()
            .any(|s| s.wait.as_ref().is_some_and(|w| w.event.is_some()))
            && d.children.iter().all(|c| c.state == TaskState::Completed)
            && !d.children.is_empty();
        if !cancelled_done {
            let m = store.task_detail(cancelled).await.unwrap().unwrap();
            if m.steps.iter().any(|s| s.wait.is_some()) {
                store.cancel_task(cancelled, false).await.unwrap();
                cancelled_done = true;
            }
        }
        let mut failed = state(report).await.state == TaskState::Failed;
        for c in &charges {
            failed &= state(*c).await.state == TaskState::Failed;
        }
        let shipped = state(order).await.state == TaskState::Completed
            && state(routed).await.state == TaskState::Completed;
        if waiting && failed && shipped && cancelled_done {
            break;
        }
        assert!(Instant::now() < deadline, "the seed tasks did not settle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{}",
        json!({
            "ready": true,
            "order": order.to_string(),
            "parent": parent.to_string(),
            "routed": routed.to_string(),
            "report": report.to_string(),
            "charges": charges.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "cancelled": cancelled.to_string(),
            "orphan": orphan.to_string(),
        })
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = tokio::time::sleep(Duration::from_secs(600)) => {}
    }
    worker.stop().await;
}
