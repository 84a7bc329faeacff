//! `GET /metrics` of `switchyard serve`: store-wide gauges (steps by handler
//! and state, oldest ready age, live hosts and their slots) checked against
//! known contents of a real store, valid Prometheus text (Debian's
//! `promtool check metrics`), behind the read scope, no payload in labels.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use switchyard_core::HostInfo;

/// The samples of an exposition, by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

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

async fn scrape(api: &Api, token: Option<&str>) -> (StatusCode, String) {
    let mut req = api.http.get(format!("{}/metrics", api.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.expect("body");
    if status == StatusCode::OK {
        assert_eq!(
            ctype.as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
    }
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_wide_gauges() {
    let api = start(tokens(), 1 << 20).await.with_token(WRITE);
    let marker = "PAYLOAD-MARKER-7f3a";
    for _ in 0..3 {
        api.spawn(&format!(r#"{{"handler":"mail","input":"{marker}"}}"#))
            .await;
    }
    api.spawn(r#"{"handler":"bill"}"#).await;
    api.spawn(r#"{"handler":"bill"}"#).await;
    api.complete("bill", json!(1)).await;
    api.fail("mail", "boom").await;
    let now = api.store.now().await.unwrap();
    let host = |id: &str, slots: u64, last_heartbeat: i64| HostInfo {
        id: id.into(),
        pid: 1,
        hostname: "box".into(),
        name: None,
        handlers: vec!["mail".into()],
        started_at: now,
        last_heartbeat,
        language: Some("python".into()),
        slots: Some(slots),
        ended_at: None,
        end_reason: None,
    };
    for (id, slots) in [("h-1", 8), ("h-2", 4), ("h-3", 2)] {
        api.store
            .heartbeat(&host(id, slots, now), &[], 30_000)
            .await
            .unwrap();
    }
    api.store.deregister_host("h-3").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;

    let (s, text) = scrape(&api, Some(READ)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    promtool(&text);
    assert!(!text.contains(marker), "a payload leaked into the metrics");
    let m = samples(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample `{k}` in:\n{text}"))
    };
    assert_eq!(get("switchyard_store_up"), 1.0);
    assert_eq!(
        get(r#"switchyard_store_steps{handler="mail",state="ready"}"#),
        2.0
    );
    assert_eq!(
        get(r#"switchyard_store_steps{handler="mail",state="failed"}"#),
        1.0
    );
    assert_eq!(
        get(r#"switchyard_store_steps{handler="bill",state="completed"}"#),
        1.0
    );
    assert_eq!(
        get(r#"switchyard_store_steps{handler="bill",state="ready"}"#),
        1.0
    );
    let age = get(r#"switchyard_store_oldest_ready_age_seconds{handler="mail"}"#);
    assert!((0.02..60.0).contains(&age), "{age}");
    assert_eq!(
        get(r#"switchyard_store_hosts{state="live"}"#),
        2.0,
        "ended hosts are not counted"
    );
    assert_eq!(get(r#"switchyard_store_hosts{state="unresponsive"}"#), 0.0);
    assert_eq!(get("switchyard_store_live_host_slots"), 12.0);
    assert!(get("switchyard_store_scrape_seconds") >= 0.0);

    // The read scope is required when tokens are configured.
    let (s, _) = scrape(&api, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = scrape(&api, Some("not-a-token-0123456789")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
