//! A host process for the multi-process end-to-end tests.
//!
//! ```text
//! testhost --store sqlite:PATH --handlers work,noop --lease-ms 1000 \
//!          --concurrency 16 --log PATH [--grace-ms 5000] [--hold-ms 600000] \
//!          [--release-file PATH]
//! ```
//!
//! ```text
//! testhost --store URL --migrate
//! ```
//!
//! `--migrate` opens the store (which migrates it, as `switchyard migrate`
//! does), applies pending migrations once more explicitly, prints
//! `migrated <schema version>` and exits: several of these started at once
//! test concurrent migrations.
//!
//! Otherwise it prints `ready <host_id>` on stdout once the host is registered and
//! claiming, then runs until SIGTERM/SIGINT and shuts down gracefully
//! (exit 0). Diagnostics go to stderr (`RUST_LOG` filters them).
//!
//! Handlers:
//! * `work`: appends `<task_id> <attempt> <host_id> <pid> start` to the log,
//!   sleeps `input.sleep_ms` (and, when `input.hold` is true, in a host
//!   started with `--hold-ms N` another N ms, in one started with
//!   `--release-file PATH` until PATH exists: this keeps chosen steps in
//!   flight until the test kills, stops or releases the host), appends the
//!   same line with
//!   `end`, and returns `{"task", "attempt", "host", "pid"}` so a test can tie
//!   every stored result to the run that produced it.
//! * `noop`: returns its input.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde_json::{json, Value};
use switchyard::{Context, HandlerOptions, StepError, StepResult, Worker};

#[derive(Parser, Debug)]
#[command(about = "Switchyard host process for end-to-end tests")]
struct Args {
    /// Store URL (`sqlite:PATH`, `postgres://...`).
    #[arg(long)]
    store: String,
    /// Comma-separated handlers to register: `work`, `noop`.
    #[arg(long, value_delimiter = ',', default_value = "work")]
    handlers: Vec<String>,
    /// Lease length in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    lease_ms: u64,
    /// Host-wide (and per-handler) concurrency.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Run log the `work` handler appends to.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Graceful-shutdown grace period in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    grace_ms: u64,
    /// Extra sleep of `work` steps whose input has `"hold": true`.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// `work` steps whose input has `"hold": true` wait until this file exists.
    #[arg(long)]
    release_file: Option<PathBuf>,
    /// Migrate the store, print `migrated <version>` and exit.
    #[arg(long)]
    migrate: bool,
}

/// How a host holds `work` steps whose input has `"hold": true`.
#[derive(Clone, Debug, Default)]
struct Hold {
    sleep: Duration,
    until_file: Option<PathBuf>,
}

impl Hold {
    async fn apply(&self) {
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        if let Some(path) = &self.until_file {
            // The test creates the file from another process; there is no
            // notification to wait on, so check it often. The run's own
            // timeout and cancellation still bound this loop.
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The run log: one `write` per line on an `O_APPEND` file, so lines from
/// several processes never interleave and a line is in the file (page cache)
/// as soon as the call returns, even if the process is SIGKILLed next.
struct RunLog {
    file: Option<File>,
    pid: u32,
}

impl RunLog {
    fn line(&self, ctx: &Context, what: &str) -> StepResult<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let host = &ctx.lease().host_id;
        let line = format!(
            "{} {} {host} {} {what}\n",
            ctx.task_id(),
            ctx.attempt(),
            self.pid
        );
        // `&File` is `Write`; a single `write_all` of a short buffer is one
        // `write(2)` on a regular file.
        let mut f: &File = file;
        f.write_all(line.as_bytes())
            .map_err(|e| StepError::retryable(format!("run log: {e}")))
    }
}

async fn work(input: Value, ctx: Context, log: Arc<RunLog>, hold: Hold) -> StepResult {
    log.line(&ctx, "start")?;
    let sleep_ms = input.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0);
    if sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    }
    if input.get("hold").and_then(Value::as_bool).unwrap_or(false) {
        hold.apply().await;
    }
    log.line(&ctx, "end")?;
    Ok(json!({
        "task": ctx.task_id().to_string(),
        "attempt": ctx.attempt(),
        "host": ctx.lease().host_id,
        "pid": log.pid,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let store = switchyard::open(&args.store)
        .await
        .with_context(|| format!("opening {}", args.store))?;
    if args.migrate {
        let version = store
            .migrate()
            .await
            .with_context(|| format!("migrating {}", args.store))?;
        println!("migrated {version}");
        std::io::stdout().flush()?;
        return Ok(());
    }
    let file = match &args.log {
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };
    let log = Arc::new(RunLog {
        file,
        pid: std::process::id(),
    });
    let opts = HandlerOptions::default().concurrency(args.concurrency);
    let hold = Hold {
        sleep: Duration::from_millis(args.hold_ms),
        until_file: args.release_file.clone(),
    };
    let mut builder = Worker::builder(store.clone())
        .concurrency(args.concurrency)
        .lease(Duration::from_millis(args.lease_ms))
        .shutdown_grace(Duration::from_millis(args.grace_ms));
    for name in &args.handlers {
        builder = match name.as_str() {
            "work" => {
                let log = log.clone();
                let hold = hold.clone();
                builder.step("work", opts.clone(), move |input, ctx| {
                    work(input, ctx, log.clone(), hold.clone())
                })
            }
            "noop" => builder.step("noop", opts.clone(), |input, _ctx| async move { Ok(input) }),
            other => anyhow::bail!("unknown handler `{other}` (known: work, noop)"),
        };
    }
    // Listening first: a SIGTERM sent as soon as steps start must still
    // shut the host down gracefully.
    let mut signals = switchyard::ShutdownSignals::listen();
    let running = builder.build()?.start().await?;
    println!("ready {}", running.host_id());
    std::io::stdout().flush()?;
    signals.recv().await;
    tracing::info!("signal received, shutting down");
    running.stop().await;
    Ok(())
}
