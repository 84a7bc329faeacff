//! `make demo`: order fulfilment on the embedded SQLite store, with the
//! payment provider and the courier played by a second process. With
//! `--python`, `--node-worker` and `--ruby-gem-home`, worker processes in
//! those languages serve `notify.customer`, `charge.payment` and an extra
//! `invoice.issue` step of the same workflow, on the same file.
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
    /// Serve `charge.payment` from a Node worker: this copy of
    /// `examples/typescript/demo_worker.mjs`, placed where `import
    /// "switchyard"` finds the installed npm package.
    #[arg(long, value_name = "SCRIPT")]
    node_worker: Option<std::path::PathBuf>,
    /// Add an `invoice.issue` step served by a Ruby worker
    /// (`examples/ruby/demo_worker.rb`) with the gem installed in this
    /// GEM_HOME.
    #[arg(long, value_name = "GEM_HOME")]
    ruby_gem_home: Option<std::path::PathBuf>,
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
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let examples = examples.canonicalize().unwrap_or(examples);
    let mut foreign = Vec::new();
    if let Some(py) = &args.python {
        let mut cmd = tokio::process::Command::new(py);
        cmd.arg(examples.join("python/notify_worker.py"));
        foreign.push(Foreign::start("Python", "notify.customer", cmd, &url).await?);
    }
    if let Some(script) = &args.node_worker {
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(script);
        foreign.push(Foreign::start("Node", "charge.payment", cmd, &url).await?);
    }
    if let Some(home) = &args.ruby_gem_home {
        let mut cmd = tokio::process::Command::new("ruby");
        cmd.arg(examples.join("ruby/demo_worker.rb"))
            .env_remove("GEM_PATH")
            .env("GEM_HOME", home);
        foreign.push(Foreign::start("Ruby", "invoice.issue", cmd, &url).await?);
    }
    let flow = OrderFlow {
        await_timeout: Some(timeout),
        pack_gate: Some(gate),
        elsewhere: foreign.iter().map(|f| f.handler.to_string()).collect(),
        invoice: args.ruby_gem_home.is_some(),
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
    for f in foreign {
        f.stop().await?;
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

/// A worker process in another language serving one handler of the
/// workflow on the same store.
struct Foreign {
    lang: &'static str,
    handler: &'static str,
    child: tokio::process::Child,
}

impl Foreign {
    /// Starts `cmd --store URL` and waits until its host has registered
    /// `handler`.
    async fn start(
        lang: &'static str,
        handler: &'static str,
        mut cmd: tokio::process::Command,
        url: &str,
    ) -> anyhow::Result<Self> {
        let shown = format!("{:?}", cmd.as_std());
        say(
            "demo",
            format!("starting a {lang} worker for {handler}: {shown}"),
        );
        let mut child = cmd
            .args(["--store", url])
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {lang} worker: {shown}"))?;
        let client = Client::new(switchyard::open(url).await?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the {lang} worker exited early ({status})");
            }
            let hosts = client.workers().await?;
            if let Some(h) = hosts
                .iter()
                .find(|h| h.handlers.iter().any(|x| x == handler))
            {
                say(
                    "demo",
                    format!("{lang} host {} (pid {}) serves {handler}", h.id, h.pid),
                );
                return Ok(Self {
                    lang,
                    handler,
                    child,
                });
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the {lang} worker did not register {handler} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (a graceful stop), then waits for the worker to exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let lang = self.lang;
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .with_context(|| format!("the {lang} worker did not stop within 10 s of SIGTERM"))??;
        say("demo", format!("{lang} worker stopped ({status})"));
        if !status.success() {
            bail!("the {lang} worker exited with {status}");
        }
        Ok(())
    }
}
