//! `GET /metrics`: store-wide gauges in the Prometheus text format, read
//! from the store at each scrape (hosts expose their own counters on their
//! `health_listen` address; this is the view of the whole store).
//!
//! * `switchyard_store_steps{handler,state}`: steps of each handler in each
//!   state (states with none are left out);
//! * `switchyard_store_oldest_ready_age_seconds{handler}`: how long the
//!   oldest ready step of the handler has been due (handlers with ready
//!   steps only);
//! * `switchyard_store_hosts{state}`: registered hosts, `live` (heartbeat
//!   within [`LIVE_HOST_WINDOW_MS`], [`HostInfo::is_live`]) or `unresponsive`;
//! * `switchyard_store_live_host_slots`: the slots of the live hosts;
//! * `switchyard_store_up`: 1 if the store answered this scrape, else 0 (and
//!   nothing else is reported);
//! * `switchyard_store_scrape_seconds`: how long the store took to answer.
//!
//! Label values are handler names and fixed states: no payload becomes a
//! label, and cardinality is bounded by the handlers. Reading the step
//! counts scans the steps, so scrape at the usual intervals (15 s or more),
//! not in a loop.
//!
//! [`LIVE_HOST_WINDOW_MS`]: switchyard_core::LIVE_HOST_WINDOW_MS

use std::time::Instant;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus::{Gauge, GaugeVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use switchyard_core::{HandlerStats, HostInfo, Millis};

use crate::AppState;

/// What one scrape read from the store.
struct Snapshot {
    now: Millis,
    handlers: Vec<HandlerStats>,
    hosts: Vec<HostInfo>,
}

async fn snapshot(state: &AppState) -> switchyard_core::Result<Snapshot> {
    Ok(Snapshot {
        now: state.store.now().await?,
        handlers: state.store.handler_stats().await?,
        hosts: state.store.list_hosts().await?,
    })
}

fn int_gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

/// The exposition of `snap` (or of a store that did not answer).
fn render(snap: Option<&Snapshot>, took: f64) -> String {
    let r = Registry::new();
    let up = int_gauge(
        &r,
        "switchyard_store_up",
        "1 if the store answered this scrape, 0 if not.",
    );
    let scrape = gauge(
        &r,
        "switchyard_store_scrape_seconds",
        "How long the store took to answer this scrape.",
    );
    scrape.set(took);
    if let Some(s) = snap {
        up.set(1);
        let steps = int_gauges(
            &r,
            "switchyard_store_steps",
            "Steps in the store by handler and state.",
            &["handler", "state"],
        );
        let oldest = GaugeVec::new(
            Opts::new(
                "switchyard_store_oldest_ready_age_seconds",
                "How long the oldest ready step of each handler has been due.",
            ),
            &["handler"],
        )
        .expect("valid metric");
        r.register(Box::new(oldest.clone()))
            .expect("registered once");
        for h in &s.handlers {
            for (state, n) in &h.steps {
                steps
                    .with_label_values(&[h.handler.as_str(), state.as_str()])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            if let Some(at) = h.oldest_ready_at {
                oldest
                    .with_label_values(&[h.handler.as_str()])
                    .set(s.now.saturating_sub(at).max(0) as f64 / 1000.0);
            }
        }
        let hosts = int_gauges(
            &r,
            "switchyard_store_hosts",
            "Registered hosts: live (heartbeat within 30 s) or unresponsive.",
            &["state"],
        );
        let slots = int_gauge(
            &r,
            "switchyard_store_live_host_slots",
            "Steps the live hosts can run at once (the sum of their slots).",
        );
        let (mut live, mut unresponsive, mut live_slots) = (0i64, 0i64, 0u64);
        for h in &s.hosts {
            if h.is_live(s.now) {
                live += 1;
                live_slots = live_slots.saturating_add(h.slots.unwrap_or(0));
            } else {
                unresponsive += 1;
            }
        }
        hosts.with_label_values(&["live"]).set(live);
        hosts.with_label_values(&["unresponsive"]).set(unresponsive);
        slots.set(i64::try_from(live_slots).unwrap_or(i64::MAX));
    }
    let mut out = String::new();
    TextEncoder::new()
        .encode_utf8(&r.gather(), &mut out)
        .expect("text encoding does not fail");
    out
}

/// `GET /metrics` (scope `read` when tokens are configured).
pub async fn metrics(State(state): State<AppState>) -> Response {
    let started = Instant::now();
    let snap = match snapshot(&state).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the store did not answer");
            None
        }
    };
    let body = render(snap.as_ref(), started.elapsed().as_secs_f64());
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::LIVE_HOST_WINDOW_MS;

    fn host(id: &str, slots: Option<u64>, last_heartbeat: Millis) -> HostInfo {
        HostInfo {
            id: id.into(),
            pid: 1,
            hostname: "box".into(),
            name: None,
            handlers: Vec::new(),
            started_at: 0,
            last_heartbeat,
            language: None,
            slots,
            ended_at: None,
            end_reason: None,
        }
    }

    #[test]
    fn hosts_past_the_live_window_are_unresponsive_and_their_slots_not_counted() {
        let now = 1_000_000;
        let snap = Snapshot {
            now,
            handlers: Vec::new(),
            hosts: vec![
                host("a", Some(8), now),
                host("b", Some(4), now - LIVE_HOST_WINDOW_MS),
                host("c", Some(16), now - LIVE_HOST_WINDOW_MS - 1),
                host("d", None, now),
            ],
        };
        let text = render(Some(&snap), 0.5);
        for line in [
            "switchyard_store_hosts{state=\"live\"} 3",
            "switchyard_store_hosts{state=\"unresponsive\"} 1",
            "switchyard_store_live_host_slots 12",
            "switchyard_store_up 1",
            "switchyard_store_scrape_seconds 0.5",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_store_that_does_not_answer_reports_only_up_0() {
        let text = render(None, 5.0);
        assert!(text.lines().any(|l| l == "switchyard_store_up 0"), "{text}");
        assert!(!text.contains("switchyard_store_steps"), "{text}");
        assert!(!text.contains("switchyard_store_hosts"), "{text}");
    }
}
