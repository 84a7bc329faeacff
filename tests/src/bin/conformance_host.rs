//! The Rust host of the conformance suite (`tests/conformance/`).
//!
//! ```text
//! conformance_host --store sqlite:PATH --scenarios tests/conformance/scenarios.json --log PATH
//! ```
//!
//! Registers every handler of the scenario file with the options the file
//! gives it, prints `ready` on stdout once claiming, and runs until SIGTERM.
//! Handlers append `<task_id> <label>` lines to the log where a scenario
//! counts how often something ran.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde_json::{json, Value};
use switchyard::bridge::{HandlerSpec, JobKind};
use switchyard::{
    ApiError, BatchItem, ChildSpec, Context, Decision, NewStep, StepError, StepResult, Worker,
};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    store: String,
    #[arg(long)]
    scenarios: PathBuf,
    #[arg(long)]
    log: PathBuf,
}

type Log = Arc<Mutex<std::fs::File>>;

/// The file whose existence releases `conf_hold` (`<log>.release`).
static RELEASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn note(log: &Log, ctx: &Context, label: &str) {
    let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(f, "{} {label}", ctx.task_id());
}

async fn body(name: &str, input: Value, ctx: Context, log: Log) -> StepResult {
    match name {
        "conf_value" => Ok(json!({ "echo": input })),
        "conf_permanent" => Err(StepError::permanent("nope")),
        "conf_flaky" => {
            if ctx.attempt() < 3 {
                Err(StepError::retryable(format!(
                    "flaky on attempt {}",
                    ctx.attempt()
                )))
            } else {
                Ok(json!({ "attempt": ctx.attempt() }))
            }
        }
        "conf_crash" => panic!("boom"),
        "conf_checkpoint_once" => {
            let charged = ctx
                .checkpoint("charge", || async {
                    note(&log, &ctx, "charge");
                    Ok(json!(42))
                })
                .await?;
            if ctx.attempt() == 1 {
                return Err(StepError::retryable("failed after the charge"));
            }
            Ok(json!({ "charged": charged }))
        }
        "conf_same_name" => {
            let a: Value = ctx
                .checkpoint("x", || async {
                    note(&log, &ctx, "first");
                    Ok(json!(1))
                })
                .await?;
            let b: Value = ctx
                .checkpoint("x", || async {
                    note(&log, &ctx, "second");
                    Ok(json!(2))
                })
                .await?;
            Ok(json!([a, b]))
        }
        "conf_await" => {
            let event = input["event"].as_str().unwrap_or_default().to_owned();
            let got = ctx
                .await_event(&event, Some(Duration::from_secs(60)))
                .await?;
            Ok(json!({ "got": got }))
        }
        "conf_await_timeout" => {
            ctx.await_event("never.sent", Some(Duration::from_millis(200)))
                .await?;
            Ok(json!("unreachable"))
        }
        "conf_suspensions" => {
            let n = input["n"].as_u64().unwrap_or(0);
            for _ in 0..n {
                ctx.sleep(Duration::from_millis(20)).await?;
            }
            Ok(json!({ "slept": n }))
        }
        "conf_timeout" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(json!("too late"))
        }
        // Holds its handler's only slot for `ms` milliseconds.
        "conf_queued_timeout" | "conf_queued_cancel" => {
            note(&log, &ctx, "started");
            let ms = input["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            note(&log, &ctx, "finished");
            Ok(json!({ "slept": ms }))
        }
        // The check conf_route routes on its status, and the routed steps.
        "conf_route_check" => {
            if let Some(s) = input["status"].as_str() {
                ctx.set_status(s)?;
            }
            Ok(json!({ "qty": input["qty"] }))
        }
        "conf_route_next" => Ok(json!({ "input": input, "saw": ctx.dependency_results().await? })),
        // The steps conf_plan plans: a part, and their sum.
        "conf_plan_part" => Ok(json!(input["n"].as_i64().unwrap_or(0) * 10)),
        "conf_plan_sum" => {
            let deps = ctx.dependency_results().await?;
            let sum: i64 = deps.values().filter_map(Value::as_i64).sum();
            Ok(json!({ "sum": sum, "from": deps.keys().collect::<Vec<_>>() }))
        }
        // A panic whose payload is neither a &str nor a String.
        "conf_unrenderable" => std::panic::panic_any(42_u8),
        "conf_hold" => {
            // Holds its slot until the driver's release file exists, or until
            // cancelled (shutdown), for at most 15 s.
            note(&log, &ctx, "start");
            let release = RELEASE.get().expect("set in main");
            for _ in 0..750 {
                if release.exists() {
                    return Ok(json!({ "released": true }));
                }
                if ctx.is_cancelled() {
                    note(&log, &ctx, "stopped");
                    return Ok(json!("stopped"));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Ok(json!("never released"))
        }
        // Rust's most hostile throw: a panic whose payload is no string.
        "conf_hostile" => std::panic::panic_any(vec![0_u8; 3]),
        "conf_invalid" => Err(StepError::invalid_input("missing field `amount`")),
        "conf_delegate_fails" => {
            let got = ctx.delegate("conf_permanent", json!({})).await?;
            Ok(json!({ "child": got }))
        }
        "conf_delegate_parallel_fails" => {
            let out = ctx
                .delegate_parallel(vec![
                    ChildSpec::new("conf_value", json!({ "i": 1 })),
                    ChildSpec::new("conf_permanent", json!({})),
                ])
                .await?;
            let states: Vec<String> = out
                .iter()
                .map(|o| format!("{:?}", o.state).to_lowercase())
                .collect();
            Ok(json!({
                "states": states,
                "first": out[0].result,
                "second_error": out[1].error.as_ref().map(|e| e.message.clone()),
            }))
        }
        "conf_cancel_running" => {
            note(&log, &ctx, "started");
            for _ in 0..500 {
                if ctx.is_cancelled() {
                    note(&log, &ctx, "saw cancel");
                    return Err(StepError::Cancelled);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(json!("never cancelled"))
        }
        "conf_cancel_suspended" => {
            note(&log, &ctx, "started");
            ctx.await_event("never.comes", Some(Duration::from_secs(60)))
                .await?;
            Ok(json!("unreachable"))
        }
        other => Err(StepError::permanent(format!(
            "the Rust conformance host has no handler `{other}`"
        ))),
    }
}

/// The decision handlers (`"kind": "decision"` in the scenario file).
async fn decision(name: &str, input: Value, _ctx: Context) -> StepResult<Decision> {
    match name {
        // One check, routed on its status.
        "conf_route" => Ok(Decision::steps(vec![NewStep::new(
            "check",
            "conf_route_check",
            input,
        )
        .route(
            "ok",
            vec![NewStep::new(
                "shipped",
                "conf_route_next",
                json!({ "route": "ok" }),
            )],
        )
        .route(
            "out_of_stock",
            vec![NewStep::new(
                "backordered",
                "conf_route_next",
                json!({ "route": "out_of_stock" }),
            )],
        )])),
        // Two parts, then their sum, which depends on both.
        "conf_plan" => Ok(Decision::Steps {
            steps: vec![
                NewStep {
                    name: "a".into(),
                    handler: "conf_plan_part".into(),
                    input: json!({ "n": 2 }),
                    depends_on: vec![],
                    routes: Default::default(),
                },
                NewStep {
                    name: "b".into(),
                    handler: "conf_plan_part".into(),
                    input: json!({ "n": 3 }),
                    depends_on: vec![],
                    routes: Default::default(),
                },
                NewStep {
                    name: "sum".into(),
                    handler: "conf_plan_sum".into(),
                    input: json!({}),
                    depends_on: vec!["a".into(), "b".into()],
                    routes: Default::default(),
                },
            ],
            final_step: Some("sum".into()),
        }),
        // Rust's types rule out returning something else than a Decision: the
        // nearest a Rust handler gets is a decision document built as JSON
        // that is not one.
        "conf_wrong_return" => Decision::from_json(json!(42))
            .map_err(|e| StepError::permanent(format!("the Rust decision handler `{name}`: {e}"))),
        other => Err(StepError::permanent(format!(
            "the Rust conformance host has no decision handler `{other}`"
        ))),
    }
}

/// The API-shaped handlers (`"kind": "api"`).
async fn api(name: &str, _input: Value, ctx: Context) -> Result<Value, ApiError> {
    match name {
        "conf_api_429" => {
            let now = || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
            };
            let t0: f64 = ctx
                .checkpoint("t0", || async move { Ok(now()) })
                .await
                .map_err(ApiError::Step)?;
            if ctx.attempt() == 1 {
                return Err(ApiError::Http {
                    status: 429,
                    retry_after: Some(Duration::from_secs(1)),
                    message: "slow down".into(),
                });
            }
            Ok(json!({ "attempt": ctx.attempt(), "waited": now() - t0 >= 900.0 }))
        }
        other => Err(ApiError::Step(StepError::permanent(format!(
            "the Rust conformance host has no API handler `{other}`"
        )))),
    }
}

/// The batch handlers (`"kind": "batch"`): one outcome per item.
async fn batch(name: &str, items: Vec<BatchItem>) -> Vec<StepResult> {
    items
        .into_iter()
        .map(|item| match name {
            // Rust's batch handlers answer per item and have no whole-call
            // error: the nearest is the same error for every item.
            "conf_batch_fails" => Err(StepError::permanent("the whole batch failed")),
            "conf_batch" => {
                let n = item.input["n"].as_i64().unwrap_or(0);
                if n < 0 {
                    Err(StepError::permanent(format!("negative: {n}")))
                } else {
                    Ok(json!({ "double": n * 2 }))
                }
            }
            other => Err(StepError::permanent(format!(
                "the Rust conformance host has no batch handler `{other}`"
            ))),
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file: Value = serde_json::from_slice(
        &std::fs::read(&args.scenarios).with_context(|| format!("{:?}", args.scenarios))?,
    )?;
    let _ = RELEASE.set(PathBuf::from(format!("{}.release", args.log.display())));
    let log: Log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)?,
    ));
    let store = switchyard::open(&args.store).await?;
    let mut b = Worker::builder(store)
        .concurrency(16)
        .shutdown_grace(std::time::Duration::from_secs(1));
    for (name, o) in file["handlers"].as_object().context("handlers")? {
        let spec = HandlerSpec {
            timeout: o["timeout"].as_f64(),
            max_attempts: o["max_attempts"].as_u64().map(|m| m as u32),
            initial_backoff: o["initial_backoff"].as_f64(),
            max_backoff: o["max_backoff"].as_f64(),
            max_batch: o["max_batch"].as_u64().map(|m| m as usize),
            linger: o["linger"].as_f64(),
            concurrency: o["concurrency"].as_u64().map(|c| c as usize),
            ..HandlerSpec::default()
        };
        let kind =
            JobKind::from_name(o["kind"].as_str().unwrap_or("step")).map_err(anyhow::Error::msg)?;
        let opts = spec
            .build(name, kind, 16, |f| f.to_string())
            .map_err(anyhow::Error::msg)?;
        let (name2, log) = (name.clone(), log.clone());
        b = match kind {
            JobKind::Decision => b.decision(name.clone(), opts, move |input, ctx| {
                let name = name2.clone();
                async move { decision(&name, input, ctx).await }
            }),
            JobKind::Batch => b.batch(name.clone(), opts, move |items| {
                let name = name2.clone();
                async move { batch(&name, items).await }
            }),
            JobKind::Api => b.api(name.clone(), opts, move |input, ctx| {
                let name = name2.clone();
                async move { api(&name, input, ctx).await }
            }),
            _ => b.step(name.clone(), opts, move |input, ctx| {
                let (name, log) = (name2.clone(), log.clone());
                async move { body(&name, input, ctx, log).await }
            }),
        };
    }
    let host = b.build()?.start().await?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    host.stop().await;
    Ok(())
}
