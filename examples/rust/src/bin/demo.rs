//! `make demo`: order fulfilment on the embedded SQLite store, with the
//! payment provider and the courier played by a second process.
//!
//! The payment confirmation is emitted while the parallel steps are still
//! running, before the workflow awaits it: the store caches it and the await
//! returns at once. The delivery confirmation is emitted a second after the
//! workflow has suspended on it: the step is parked, the host runs nothing,
//! and the event wakes it up.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use switchyard::{Client, NewTask, TaskState, Worker};
use switchyard_examples::emitter::{self, Via};
use switchyard_examples::orders::{self, OrderFlow};
use switchyard_examples::setup::{finish, StoreArgs};
use switchyard_examples::timeline::{self, say};
use tokio::sync::watch;

/// Order fulfilment with events from a second process.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// The order id (it names the events).
    #[arg(long, default_value = "A-1001")]
    order: String,
    /// Fail if the order has not been delivered after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Which program emits the events.
    #[arg(long, value_enum, default_value_t = Via::Auto)]
    emitter: Via,
    /// Serve `notify.customer` from a Python worker process run by this
    /// interpreter (which must have the `switchyard` wheel installed).
    #[arg(long, value_name = "PYTHON")]
    python: Option<std::path::PathBuf>,
    /// Emit one event and exit (the second process).
    #[arg(long, num_args = 2, value_names = ["NAME", "PAYLOAD"], hide = true)]
    emit: Option<Vec<String>>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(emit) = &args.emit {
        let url = args.store.store.clone().unwrap_or_default();
        return finish(
            "demo --emit",
            emitter::emit_here(&url, &emit[0], &emit[1]).await,
        );
    }
    finish("demo", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    timeline::start();
    if let Some(url) = &args.store.store {
        if StoreArgs::is_private(url) {
            bail!("store `{url}` lives inside this process, but the demo's events come from a second process: use sqlite:PATH");
        }
    }
    let opened = args.store.open("demo").await?;
    let (store, url) = (opened.store.clone(), opened.url.clone());
    let timeout = Duration::from_secs(args.timeout);
    say("demo", format!("store {url}"));

    let (open_gate, gate) = watch::channel(false);
    let flow = OrderFlow {
        await_timeout: Some(timeout),
        pack_gate: Some(gate),
        notify_here: args.python.is_none(),
    };
    let python = match &args.python {
        Some(py) => Some(python_worker(py, &url).await?),
        None => None,
    };
    let worker = orders::register(Worker::builder(store.clone()), flow)
        .build()?
        .start()
        .await?;
    say("demo", format!("host {} started", worker.host_id()));

    let client = Client::new(store.clone());
    let order = orders::sample_order(&args.order);
    let task = NewTask::new(orders::ROOT, serde_json::to_value(&order)?)
        .idempotency_key(format!("order:{}", order.order));
    let spawned = client.spawn_task(task).await?;
    let id = spawned.task_id;
    say(
        "client",
        format!(
            "spawned {} for order {} (task {id})",
            orders::ROOT,
            order.order
        ),
    );

    let payment = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let name = orders::payment_event(&order.order);
        say(
            "demo",
            format!("the payment provider confirms: emitting {name} before the workflow awaits it"),
        );
        let sent = emitter::emit(
            args.emitter,
            &store,
            &url,
            &name,
            &orders::payment_payload(&order),
        )
        .await;
        // Packing waits for this, so the await that follows finds the event cached.
        let _ = open_gate.send(true);
        sent
    };
    let delivery = async {
        let name = orders::delivery_event(&order.order);
        if !orders::suspended_on(&client, id, &name, timeout).await? {
            return Ok(());
        }
        say(
            "demo",
            format!(
                "task is suspended on {name}; steps running in this host: {}",
                worker.inflight()
            ),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        say("demo", format!("the courier delivers: emitting {name}"));
        emitter::emit(
            args.emitter,
            &store,
            &url,
            &name,
            &orders::delivery_payload(&order),
        )
        .await
    };
    let finished = async {
        client
            .wait(id, timeout)
            .await
            .context("waiting for the order")
    };
    let (_, _, task) = tokio::try_join!(payment, delivery, finished)?;

    worker.stop().await;
    if let Some(child) = python {
        stop_python_worker(child).await?;
    }
    match task.state {
        TaskState::Completed => {
            let result = task.result.unwrap_or_default();
            say(
                "client",
                format!(
                    "task {id} completed in {} ms; result:",
                    timeline::elapsed_ms()
                ),
            );
            println!("{}", serde_json::to_string_pretty(&result)?);
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

/// Starts `examples/python/notify_worker.py` and waits until its host has
/// registered `notify.customer`.
async fn python_worker(
    python: &std::path::Path,
    url: &str,
) -> anyhow::Result<tokio::process::Child> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/notify_worker.py");
    say(
        "demo",
        format!(
            "starting a Python worker for notify.customer: {} {}",
            python.display(),
            script.display()
        ),
    );
    let mut child = tokio::process::Command::new(python)
        .arg(&script)
        .args(["--store", url])
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let store = switchyard::open(url).await?;
    let client = Client::new(store);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the Python worker exited early ({status})");
        }
        let hosts = client.workers().await?;
        if let Some(h) = hosts
            .iter()
            .find(|h| h.handlers.iter().any(|x| x == "notify.customer"))
        {
            say(
                "demo",
                format!(
                    "Python host {} (pid {}) serves notify.customer",
                    h.id, h.pid
                ),
            );
            return Ok(child);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the Python worker did not register notify.customer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM (a graceful stop), then waits for the Python worker to exit.
async fn stop_python_worker(mut child: tokio::process::Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .context("the Python worker did not stop within 10 s of SIGTERM")??;
    say("demo", format!("Python worker stopped ({status})"));
    if !status.success() {
        bail!("the Python worker exited with {status}");
    }
    Ok(())
}
