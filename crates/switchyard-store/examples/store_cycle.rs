//! The store's own cost per step, without a worker: spawn a batch of
//! single-step tasks, claim them, complete them, repeat. One caller, so the
//! figure is the store's latency per step, not a throughput under load.
//!
//!     cargo run --release -p switchyard-store --example store_cycle -- [url] [steps] [batch]
//!
//! `url` defaults to a fresh temporary SQLite file. Prints one JSON line with
//! the microseconds each phase takes per step.

use std::time::Instant;

use serde_json::json;
use switchyard_core::{Completion, Lease, NewTask, Resolution};

#[tokio::main(flavor = "current_thread")]
async fn main() -> switchyard_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = match args.first().map(String::as_str) {
        None | Some("sqlite") => format!("sqlite:{}", dir.path().join("cycle.db").display()),
        Some(u) => u.to_owned(),
    };
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(500);
    let store = switchyard_store::open(&url).await?;
    let handler = "cycle.noop".to_owned();
    let (mut spawn_s, mut claim_s, mut complete_s) = (0.0, 0.0, 0.0);
    let mut done = 0;
    while done < steps {
        let n = batch.min(steps - done);
        let t = Instant::now();
        let tasks = (0..n)
            .map(|i| NewTask::new(handler.clone(), json!({ "i": done + i })))
            .collect();
        store.spawn(tasks).await?;
        spawn_s += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let claimed = store
            .claim("cycle-host", &[(handler.clone(), n)], 60_000)
            .await?;
        claim_s += t.elapsed().as_secs_f64();
        assert_eq!(claimed.steps.len(), n, "every spawned step is claimed");

        let t = Instant::now();
        let completions = claimed
            .steps
            .into_iter()
            .map(|s| Completion {
                lease: Lease {
                    step_id: s.step_id,
                    task_id: s.task_id,
                    attempt: s.attempt,
                    run: s.run,
                    host_id: "cycle-host".into(),
                },
                resolution: Resolution::Completed(json!({ "ok": true })),
            })
            .collect();
        for r in store.complete(completions).await? {
            r?;
        }
        complete_s += t.elapsed().as_secs_f64();
        done += n;
    }
    let us = |s: f64| (s * 1e6 / steps as f64 * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "store": store.kind(), "steps": steps, "batch": batch,
            "spawn_us": us(spawn_s), "claim_us": us(claim_s), "complete_us": us(complete_s),
            "total_us": us(spawn_s + claim_s + complete_s),
        })
    );
    Ok(())
}
