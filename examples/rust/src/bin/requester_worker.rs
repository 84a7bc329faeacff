//! Requester and worker actors talking through response events.
//!
//! A requester task sends five work requests: child tasks of `work.item`,
//! each answering on `work.result:<requester>:<i>`. It then awaits the five
//! answers in order. The items finish in reverse order, so most answers
//! arrive before they are awaited: the store caches them and each await
//! returns at once, while the requester suspends only for answers not yet in.
//! The requester and the workers run in two separate hosts (two `Worker`s
//! sharing the store), the way they would in two processes.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use serde_json::{json, Value};
use switchyard::{Client, HandlerOptions, TaskState, Worker};
use switchyard_examples::children::{child_task, spawn_children, Response};
use switchyard_examples::setup::{finish, StoreArgs};
use switchyard_examples::timeline::{self, say};

/// A requester task collecting five results from worker tasks.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// How many work requests to send.
    #[arg(long, default_value_t = 5)]
    requests: u32,
    /// Fail if the requester has not finished after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    finish("requester_worker", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    timeline::start();
    let timeout = Duration::from_secs(args.timeout);
    let opened = args.store.open("requester").await?;
    let store = opened.store.clone();
    say("demo", format!("store {}", opened.url));
    let client = Client::new(store.clone());

    let spawner = client.clone();
    let requester = Worker::builder(store.clone())
        .step(
            "work.requester",
            HandlerOptions::default(),
            move |input, ctx| {
                let client = spawner.clone();
                async move {
                    let n = input["requests"].as_u64().unwrap_or(5);
                    let answer = |i: u64| format!("work.result:{}:{i}", ctx.task_id());
                    ctx.checkpoint("send-requests", || async {
                        let tasks = (0..n)
                            .map(|i| {
                                child_task(
                                    &ctx,
                                    &i.to_string(),
                                    "work.item",
                                    json!({"i": i, "of": n}),
                                    &answer(i),
                                )
                            })
                            .collect();
                        let ids = spawn_children(&client, tasks).await?;
                        say(
                            ctx.step_name(),
                            format!(
                                "sent {} work requests, answers on work.result:<requester>:<i>",
                                ids.len()
                            ),
                        );
                        Ok(ids)
                    })
                    .await?;
                    let mut results = Vec::new();
                    for i in 0..n {
                        let payload =
                            timeline::await_event(&ctx, &answer(i), Some(timeout)).await?;
                        let response: Response = serde_json::from_value(payload)?;
                        results.push(response.into_result()?);
                    }
                    let total: u64 = results.iter().filter_map(|r| r["square"].as_u64()).sum();
                    say(
                        ctx.step_name(),
                        format!("collected {} results", results.len()),
                    );
                    Ok(json!({"results": results, "sum_of_squares": total}))
                }
            },
        )
        .build()?
        .start()
        .await?;
    let workers = Worker::builder(store.clone())
        .step(
            "work.item",
            HandlerOptions::default().concurrency(8),
            |input, ctx| async move {
                let i = input["i"].as_u64().unwrap_or_default();
                let of = input["of"].as_u64().unwrap_or(1);
                ctx.checkpoint("work", || async {
                    // Later requests are quicker, so answers arrive out of order.
                    tokio::time::sleep(Duration::from_millis(100 * (of - i))).await;
                    say(
                        ctx.step_name(),
                        format!("request {i} done: {i}² = {}", i * i),
                    );
                    Ok::<Value, _>(json!({"i": i, "square": i * i}))
                })
                .await
            },
        )
        .build()?
        .start()
        .await?;
    say(
        "demo",
        format!(
            "requester host {} and worker host {} started",
            requester.host_id(),
            workers.host_id()
        ),
    );

    let id = client
        .spawn("work.requester", json!({"requests": args.requests}))
        .await?;
    say("client", format!("spawned work.requester (task {id})"));
    let task = client.wait(id, timeout).await?;
    requester.stop().await;
    workers.stop().await;
    if task.state != TaskState::Completed {
        bail!(
            "requester {id} ended {}: {}",
            task.state,
            task.error.map(|e| e.message).unwrap_or_default()
        );
    }
    say("client", format!("requester {id} completed; result:"));
    println!(
        "{}",
        serde_json::to_string_pretty(&task.result.unwrap_or_default())?
    );
    Ok(())
}
