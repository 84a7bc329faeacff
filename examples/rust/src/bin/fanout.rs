//! Fan-out over cursor ranges with a convergence step.
//!
//! `sum.numbers` decides `Decision::fan_out`: the items 1..=N are split into
//! ranges of `--batch-size`, each summed by a parallel `sum.range` step, and
//! `sum.converge` receives every range's result through
//! `ctx.dependency_results()` and adds them up. `sum.range` is a batchable
//! handler, so the host hands it several ranges per call.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure};
use clap::Parser;
use serde_json::json;
use switchyard::{Client, Decision, HandlerOptions, StepError, TaskState, Worker};
use switchyard_examples::setup::{finish, StoreArgs};
use switchyard_examples::timeline::{self, say};

/// Sums 1..=N by fanning out over cursor ranges.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// How many items.
    #[arg(long, default_value_t = 10_000)]
    items: u64,
    /// Items per range.
    #[arg(long, default_value_t = 500)]
    batch_size: u64,
    /// Fail if the sum is not done after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    finish("fanout", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    timeline::start();
    ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let opened = args.store.open("fanout").await?;
    let store = opened.store.clone();
    say("demo", format!("store {}", opened.url));

    let worker = Worker::builder(store.clone())
        .decision(
            "sum.numbers",
            HandlerOptions::default(),
            |input, ctx| async move {
                let items = input["items"]
                    .as_u64()
                    .ok_or_else(|| StepError::invalid_input("`items` must be a count"))?;
                let batch = input["batch_size"]
                    .as_u64()
                    .filter(|b| *b > 0)
                    .unwrap_or(500);
                let decision =
                    Decision::fan_out("sum.range", items, batch, json!({}), "sum.converge");
                if let Decision::Steps { steps, .. } = &decision {
                    say(
                        ctx.step_name(),
                        format!(
                            "fan-out: {} ranges of up to {batch} items, then sum.converge",
                            steps.len() - 1
                        ),
                    );
                }
                Ok(decision)
            },
        )
        .batch(
            "sum.range",
            HandlerOptions::default()
                .max_batch(8)
                .linger(Duration::from_millis(20)),
            |batch| async move {
                say(
                    "sum.range",
                    format!("micro-batch of {} ranges", batch.len()),
                );
                batch
                    .into_iter()
                    .map(|item| {
                        // The cursor range is [start, end) over item indexes; item k is the number k + 1.
                        let start = item.input["start"]
                            .as_u64()
                            .ok_or_else(|| StepError::invalid_input("no `start`"))?;
                        let end = item.input["end"]
                            .as_u64()
                            .ok_or_else(|| StepError::invalid_input("no `end`"))?;
                        let sum: u64 = (start + 1..=end).sum();
                        Ok(json!({"count": end - start, "sum": sum}))
                    })
                    .collect()
            },
        )
        .step(
            "sum.converge",
            HandlerOptions::default(),
            |_input, ctx| async move {
                let ranges = ctx.dependency_results().await?;
                let count: u64 = ranges.values().filter_map(|r| r["count"].as_u64()).sum();
                let sum: u64 = ranges.values().filter_map(|r| r["sum"].as_u64()).sum();
                say(
                    ctx.step_name(),
                    format!("converged {} range results", ranges.len()),
                );
                Ok(json!({"ranges": ranges.len(), "count": count, "sum": sum}))
            },
        )
        .build()?
        .start()
        .await?;

    let client = Client::new(store);
    let id = client
        .spawn(
            "sum.numbers",
            json!({"items": args.items, "batch_size": args.batch_size}),
        )
        .await?;
    say(
        "client",
        format!("spawned sum.numbers over {} items (task {id})", args.items),
    );
    let task = client.wait(id, Duration::from_secs(args.timeout)).await?;
    worker.stop().await;
    if task.state != TaskState::Completed {
        bail!(
            "task {id} ended {}: {}",
            task.state,
            task.error.map(|e| e.message).unwrap_or_default()
        );
    }
    let result = task.result.unwrap_or_default();
    say("client", format!("task {id} completed: {result}"));
    let expected = args.items * (args.items + 1) / 2;
    ensure!(
        result["sum"].as_u64() == Some(expected),
        "expected the sum {expected}, got {}",
        result["sum"]
    );
    ensure!(
        result["count"].as_u64() == Some(args.items),
        "expected {} items, got {}",
        args.items,
        result["count"]
    );
    say(
        "client",
        format!("sum of 1..={} is {expected}: correct", args.items),
    );
    Ok(())
}
