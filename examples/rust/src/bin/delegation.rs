//! Worker delegation with parallel sub-tasks and a response event.
//!
//! ```text
//! checkout (requester)  spawns order.process with response_event
//!   │                   order.processed:<checkout task>, then awaits that event
//!   └── order.process   delegates in parallel, suspends until both finish,
//!         ├── inventory.reserve     aggregates their results; when it
//!         └── payment.process       completes the core emits the response event
//! ```
//!
//! The client waits for `checkout`, and then reads the response event, still
//! cached in the store, on its own.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use serde_json::{json, Value};
use switchyard::{ChildSpec, Client, HandlerOptions, StepError, TaskState, Worker};
use switchyard_examples::children::{child_task, spawn_children, Response};
use switchyard_examples::setup::{finish, StoreArgs};
use switchyard_examples::timeline::{self, compact, say};

/// Delegation with parallel sub-tasks; the result comes back as a response event.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// Fail if the checkout has not finished after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    finish("delegation", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    timeline::start();
    let timeout = Duration::from_secs(args.timeout);
    let opened = args.store.open("delegation").await?;
    let store = opened.store.clone();
    say("demo", format!("store {}", opened.url));
    let client = Client::new(store.clone());
    let opts = HandlerOptions::default;

    let requester = client.clone();
    let worker = Worker::builder(store.clone())
        .step("checkout", opts(), move |input, ctx| {
            let client = requester.clone();
            async move {
                let response_event = format!("order.processed:{}", ctx.task_id());
                ctx.checkpoint("request", || async {
                    let task = child_task(&ctx, "order", "order.process", input.clone(), &response_event);
                    let ids = spawn_children(&client, vec![task]).await?;
                    say(ctx.step_name(), format!("requested order.process (task {}), answer on {response_event}", ids[0]));
                    Ok(ids[0])
                })
                .await?;
                let response: Response =
                    serde_json::from_value(timeline::await_event(&ctx, &response_event, Some(timeout)).await?)?;
                let processed = response.into_result()?;
                Ok(json!({"checkout": "accepted", "order": processed}))
            }
        })
        .step("order.process", opts(), |input, ctx| async move {
            let children = vec![
                ChildSpec::new("inventory.reserve", json!({"order": input["order"], "items": input["items"]})),
                ChildSpec::new("payment.process", json!({"order": input["order"], "amount": input["amount"]})),
            ];
            let outcomes = match ctx.delegate_parallel(children).await {
                Err(StepError::Suspend(wait)) => {
                    if timeline::once(format!("{}/delegated", ctx.task_id())) {
                        say(ctx.step_name(), "delegated inventory.reserve and payment.process; suspends until both finish");
                    }
                    return Err(StepError::Suspend(wait));
                }
                other => other?,
            };
            // Delegation collects every outcome; deciding what a failed child means is ours.
            let mut results = Vec::new();
            for o in outcomes {
                match o.state {
                    TaskState::Completed => results.push(o.result.unwrap_or(Value::Null)),
                    state => {
                        return Err(StepError::permanent(format!(
                            "sub-task {} {state}: {}",
                            o.task_id,
                            o.error.map(|e| e.message).unwrap_or_default()
                        )))
                    }
                }
            }
            say(ctx.step_name(), "both sub-tasks completed; aggregating");
            Ok(json!({"order": input["order"], "status": "processed", "inventory": results[0], "payment": results[1]}))
        })
        .step("inventory.reserve", opts(), |input, ctx| async move {
            ctx.checkpoint("reserve", || async {
                say(ctx.step_name(), "started");
                tokio::time::sleep(Duration::from_millis(300)).await;
                let r = json!({"warehouse": "DUB-1", "reserved": input["items"]});
                say(ctx.step_name(), format!("finished {}", compact(&r)));
                Ok(r)
            })
            .await
        })
        .step("payment.process", opts(), |input, ctx| async move {
            ctx.checkpoint("charge", || async {
                say(ctx.step_name(), "started");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let r = json!({"charged": input["amount"], "transaction": format!("TX-{}", input["order"].as_str().unwrap_or_default())});
                say(ctx.step_name(), format!("finished {}", compact(&r)));
                Ok(r)
            })
            .await
        })
        .build()?
        .start()
        .await?;

    let order = json!({"order": "B-7", "items": [{"sku": "DESK-02", "qty": 1}], "amount": 420.0});
    let id = client.spawn("checkout", order).await?;
    say("client", format!("spawned checkout (task {id})"));
    let task = client.wait(id, timeout).await?;
    worker.stop().await;
    if task.state != TaskState::Completed {
        bail!(
            "checkout {id} ended {}: {}",
            task.state,
            task.error.map(|e| e.message).unwrap_or_default()
        );
    }
    let result = task.result.unwrap_or_default();
    say("client", format!("checkout {id} completed; result:"));
    println!("{}", serde_json::to_string_pretty(&result)?);

    let name = format!("order.processed:{id}");
    match client.store().get_event(&name).await? {
        Some(ev) => say(
            "client",
            format!(
                "response event {name} stays cached: {}",
                compact(&ev.payload)
            ),
        ),
        None => bail!("response event {name} is missing from the store"),
    }
    Ok(())
}
