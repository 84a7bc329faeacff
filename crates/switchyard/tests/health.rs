//! Every host's own endpoint (issue 22): `/healthz`, `/readyz` and
//! `/metrics` on `health_listen`, over real HTTP on 127.0.0.1. The metrics
//! count what the host did (checked against known work), are valid
//! Prometheus text (checked by Debian's `promtool check metrics`), and carry
//! no user payload; `/readyz` turns unready while PostgreSQL is down and
//! ready again when it returns.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::{HandlerOptions, StepError, Worker};
use switchyard_store::{open, pg_server::PgServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over a fresh connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// The value of every sample line, by `name{labels}` as printed.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample `{key}` in the metrics:\n{s:#?}"))
}

/// Runs `promtool check metrics` on `text`; panics with its output if it
/// finds a problem.
fn promtool(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's `prometheus` package; `make test` installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- the text:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_host_did_and_pass_promtool() {
    let env = Env::new(StoreKind::Sqlite).await;
    run_limited(async {
        let w = env
            .worker()
            .health_listen(loopback())
            .step("ok", HandlerOptions::default(), |v, _| async move { Ok(v) })
            .step("fails", HandlerOptions::default(), |_, _| async {
                Err(StepError::permanent("no such order"))
            })
            .step(
                "flaky",
                HandlerOptions {
                    retry: fast_retry(2),
                    ..Default::default()
                },
                |_, ctx| async move {
                    if ctx.attempt() == 1 {
                        Err(StepError::retryable("try again"))
                    } else {
                        Ok(json!("done"))
                    }
                },
            )
            .step("waits", HandlerOptions::default(), |_, ctx| async move {
                let v = ctx
                    .await_event("metrics.go", Some(Duration::from_secs(60)))
                    .await?;
                Ok(v)
            })
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let addr = w.health_addr().expect("the endpoint is on");
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        assert_ne!(addr.port(), 0, "port 0 is replaced by the bound port");

        // A payload must never become a label value.
        let marker = "PAYLOAD-MARKER-5f1c";
        let mut oks = Vec::new();
        for i in 0..5 {
            oks.push(
                env.client
                    .spawn("ok", json!({ "m": marker, "i": i }))
                    .await
                    .unwrap(),
            );
        }
        let failed = env.client.spawn("fails", json!(marker)).await.unwrap();
        let flaky = env.client.spawn("flaky", json!(null)).await.unwrap();
        let waits = env.client.spawn("waits", json!(null)).await.unwrap();
        for id in oks {
            env.result(id).await;
        }
        env.finished(failed).await;
        env.wait_step(waits, "waits", switchyard::StepState::Suspended)
            .await;
        // Retried at once (no backoff).
        assert_eq!(env.result(flaky).await, json!("done"));
        env.client.emit("metrics.go", json!(1)).await.unwrap();
        assert_eq!(env.result(waits).await, json!(1));
        w.flush().await;

        let (code, text) = get(addr, "/metrics").await.unwrap();
        assert_eq!(code, 200, "{text}");
        assert!(!text.contains(marker), "a payload leaked into the metrics");
        promtool(&text);
        let s = samples(&text);
        assert_eq!(
            sample(&s, r#"switchyard_steps_completed_total{handler="ok"}"#),
            5.0
        );
        assert_eq!(
            sample(&s, r#"switchyard_steps_claimed_total{handler="ok"}"#),
            5.0
        );
        assert_eq!(
            sample(&s, r#"switchyard_steps_started_total{handler="ok"}"#),
            5.0
        );
        assert_eq!(
            sample(
                &s,
                r#"switchyard_steps_failed_total{handler="fails",kind="permanent"}"#
            ),
            1.0
        );
        assert_eq!(
            sample(
                &s,
                r#"switchyard_steps_retried_total{handler="flaky",kind="retryable"}"#
            ),
            1.0
        );
        assert_eq!(
            sample(&s, r#"switchyard_steps_completed_total{handler="flaky"}"#),
            1.0
        );
        // Suspended once, then claimed again and completed.
        assert_eq!(
            sample(&s, r#"switchyard_steps_suspended_total{handler="waits"}"#),
            1.0
        );
        assert_eq!(
            sample(&s, r#"switchyard_steps_claimed_total{handler="waits"}"#),
            2.0
        );
        assert_eq!(
            sample(&s, r#"switchyard_step_run_seconds_count{handler="ok"}"#),
            5.0
        );
        assert_eq!(
            sample(
                &s,
                r#"switchyard_step_queue_wait_seconds_count{handler="ok"}"#
            ),
            5.0
        );
        assert!(sample(&s, r#"switchyard_store_call_seconds_count{call="claim"}"#) >= 1.0);
        assert!(
            sample(
                &s,
                r#"switchyard_store_call_seconds_count{call="complete"}"#
            ) >= 1.0
        );
        assert_eq!(
            sample(&s, r#"switchyard_store_errors_total{call="claim"}"#),
            0.0
        );
        assert!(sample(&s, "switchyard_completion_batch_size_count") >= 1.0);
        assert!(sample(&s, "switchyard_claim_batch_size_sum") >= 9.0);
        assert_eq!(sample(&s, r#"switchyard_slots_in_use{handler="ok"}"#), 0.0);
        assert_eq!(sample(&s, "switchyard_outcomes_pending"), 0.0);
        assert!(
            s.keys().any(|k| k.starts_with("switchyard_host_info{")
                && k.contains(&format!("host_id=\"{}\"", w.host_id()))
                && k.contains("lang=\"rust\"")),
            "{text}"
        );
        assert!(sample(&s, r#"switchyard_claim_wakeups_total{source="notify"}"#) >= 1.0);

        assert_eq!(get(addr, "/healthz").await.unwrap(), (200, "ok\n".into()));
        assert_eq!(get(addr, "/readyz").await.unwrap(), (200, "ready\n".into()));
        assert_eq!(get(addr, "/nope").await.unwrap().0, 404);
        w.stop().await;
        eventually("the endpoint closes with the host", || async {
            get(addr, "/healthz").await.is_err().then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_in_use_show_running_steps() {
    let env = Env::new(StoreKind::Memory).await;
    run_limited(async {
        let gate = std::sync::Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let w = env
            .worker()
            .concurrency(8)
            .health_listen(loopback())
            .step(
                "slow",
                HandlerOptions {
                    concurrency: 3,
                    ..Default::default()
                },
                move |_, _| {
                    let g = g.clone();
                    async move {
                        g.notified().await;
                        Ok(Value::Null)
                    }
                },
            )
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let addr = w.health_addr().unwrap();
        for _ in 0..5 {
            env.client.spawn("slow", json!(null)).await.unwrap();
        }
        let s = eventually("three steps run", || async {
            let (_, text) = get(addr, "/metrics").await.ok()?;
            let s = samples(&text);
            (s.get(r#"switchyard_slots_in_use{handler="slow"}"#) == Some(&3.0)).then_some(s)
        })
        .await;
        assert_eq!(sample(&s, r#"switchyard_slots_free{handler="slow"}"#), 0.0);
        assert_eq!(sample(&s, "switchyard_host_slots_in_use"), 3.0);
        assert_eq!(sample(&s, "switchyard_host_slots_free"), 5.0);
        gate.notify_waiters();
        drop(w);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_fails_the_start_naming_it() {
    let env = Env::new(StoreKind::Memory).await;
    run_limited(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = env
            .worker()
            .health_listen(addr)
            .build()
            .unwrap()
            .start()
            .await
            .err()
            .expect("the start fails");
        let msg = err.to_string();
        assert!(
            msg.contains("health_listen") && msg.contains(&addr.to_string()),
            "{msg}"
        );
        // Nothing was left registered.
        assert!(env.store.list_hosts().await.unwrap().is_empty());
    })
    .await;
}

/// `/readyz` follows the store: unready (503, saying why) while PostgreSQL
/// is down, ready again once it is back; `/healthz` stays 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_postgres_down_and_back() {
    let server = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = server.fresh_database().await.unwrap();
    let store = open(&url).await.unwrap();
    let w = Worker::builder(store)
        .heartbeat(Duration::from_millis(100))
        .shutdown_grace(Duration::from_millis(100))
        .shutdown_flush(Duration::from_millis(500))
        .health_listen(loopback())
        .step(
            "noop",
            HandlerOptions::default(),
            |v, _| async move { Ok(v) },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = w.health_addr().unwrap();
    let limit = Duration::from_secs(60);
    tokio::time::timeout(limit, async {
        assert_eq!(get(addr, "/readyz").await.unwrap().0, 200);
        server.stop();
        let (code, body) = eventually("/readyz turns unready", || async {
            let r = get(addr, "/readyz").await.ok()?;
            (r.0 == 503).then_some(r)
        })
        .await;
        assert_eq!(code, 503);
        assert!(body.starts_with("not ready: "), "{body}");
        assert_eq!(get(addr, "/healthz").await.unwrap().0, 200);
        server.restart().unwrap();
        eventually("/readyz is ready again", || async {
            (get(addr, "/readyz").await.ok()?.0 == 200).then_some(())
        })
        .await;
    })
    .await
    .expect("within 60 s");
    w.stop().await;
    server.stop_and_remove();
}
