//! Order fulfilment that waits for events you send.
//!
//! Run it, then, from another terminal, send the two events it prints with
//! `switchyard emit`. The workflow suspends on each await (the host runs
//! nothing meanwhile) and resumes when the event arrives. With `--auto` it
//! emits them itself, through the client, once the task waits for each.
//!
//! The task is spawned with the idempotency key `order:<id>`: stop the
//! program while it waits and run it again with the same `--store` and
//! `--order`, and it picks the same task up where it was.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use switchyard::{Client, NewTask, TaskState, Worker};
use switchyard_examples::emitter::shell_words;
use switchyard_examples::orders::{self, OrderFlow};
use switchyard_examples::setup::{finish, StoreArgs};
use switchyard_examples::timeline::{self, compact, say};

/// Order fulfilment waiting for `payment.confirmed:<order>` and `shipment.delivered:<order>`.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// The order id (it names the events).
    #[arg(long, default_value = "A-2001")]
    order: String,
    /// Emit the events from this program instead of waiting for you.
    #[arg(long)]
    auto: bool,
    /// Fail if the order has not been delivered after this many seconds
    /// [default: 60 with --auto, else 3600].
    #[arg(long)]
    timeout: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    finish("order_events", run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    timeline::start();
    let timeout = Duration::from_secs(args.timeout.unwrap_or(if args.auto { 60 } else { 3600 }));
    let opened = args.store.open("orders").await?;
    let (store, url) = (opened.store.clone(), opened.url.clone());
    if !args.auto && StoreArgs::is_private(&url) {
        bail!("store `{url}` cannot be reached from another terminal: use sqlite:PATH, or --auto");
    }
    say("demo", format!("store {url}"));

    let flow = OrderFlow {
        await_timeout: Some(timeout),
        pack_gate: None,
        elsewhere: Vec::new(),
        invoice: false,
    };
    let worker = orders::register(Worker::builder(store.clone()), flow)
        .build()?
        .start()
        .await?;
    let client = Client::new(store);
    let order = orders::sample_order(&args.order);
    let task = NewTask::new(orders::ROOT, serde_json::to_value(&order)?)
        .idempotency_key(format!("order:{}", order.order));
    let spawned = client.spawn_task(task).await?;
    let id = spawned.task_id;
    if spawned.created {
        say(
            "client",
            format!(
                "spawned {} for order {} (task {id})",
                orders::ROOT,
                order.order
            ),
        );
    } else {
        say(
            "client",
            format!("order {} already has task {id}: resuming it", order.order),
        );
    }

    let events = [
        (
            orders::payment_event(&order.order),
            orders::payment_payload(&order),
        ),
        (
            orders::delivery_event(&order.order),
            orders::delivery_payload(&order),
        ),
    ];
    if !args.auto {
        println!("\nSend the events from another terminal (in any order, now or later):\n");
        for (name, payload) in &events {
            println!(
                "  switchyard emit {}",
                shell_words(&[name, "--payload", &compact(payload), "--store", &url])
            );
        }
        println!("\n(without the CLI installed: cargo run -p switchyard -- emit ...)\n");
    }

    let auto_emit = async {
        if !args.auto {
            return Ok(());
        }
        for (name, payload) in &events {
            if !orders::suspended_on(&client, id, name, timeout).await? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            say("client", format!("emitting {name}"));
            client.emit(name, payload.clone()).await?;
        }
        anyhow::Ok(())
    };
    let finished = async {
        client
            .wait(id, timeout)
            .await
            .context("waiting for the order")
    };
    let task = tokio::select! {
        joined = async { tokio::try_join!(auto_emit, finished) } => joined?.1,
        _ = switchyard::wait_for_signal() => {
            worker.stop().await;
            if opened.is_temporary() {
                say("demo", "stopped; the temporary store goes with this program (pass --store sqlite:PATH to keep it)");
            } else {
                say("demo", format!("stopped; the task waits in the store. Resume with: --store {url} --order {}", order.order));
            }
            return Ok(());
        }
    };

    worker.stop().await;
    match task.state {
        TaskState::Completed => {
            say("client", format!("task {id} completed; result:"));
            println!(
                "{}",
                serde_json::to_string_pretty(&task.result.unwrap_or_default())?
            );
            Ok(())
        }
        state => bail!(
            "task {id} ended {state}: {}",
            task.error
                .map(|e| e.message)
                .unwrap_or_else(|| "no error recorded".into())
        ),
    }
}
