//! The host's own HTTP endpoint (off unless [`WorkerOptions::health_listen`]
//! is set): `/healthz` (the host process answers), `/readyz` (it can work:
//! started and not stopping, its last heartbeat reached the store, and the
//! store answers now) and `/metrics` (Prometheus text format, see
//! [`super::metrics`]). Every binding's host gets it from the same code.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::*;

/// How long `/readyz` waits for the store before calling it unreachable.
pub const READY_STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` (an error naming it if that fails) and serves the
/// endpoints until the host stops. Returns the bound address (port 0 picks
/// a free port).
pub(super) async fn start(shared: Arc<Shared>, addr: SocketAddr) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("health_listen: cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("health_listen: {addr}: {e}")))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let stop = shared.serving_done.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the health endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "health and metrics endpoint listening");
    Ok(bound)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match not_ready(&shared).await {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Why the host cannot work now, or None.
async fn not_ready(shared: &Shared) -> Option<String> {
    if shared.stopping.is_cancelled() {
        return Some("the host is stopping".into());
    }
    if !shared.heartbeat_ok.load(Ordering::Acquire) {
        return Some("the last heartbeat did not reach the store".into());
    }
    match tokio::time::timeout(READY_STORE_TIMEOUT, shared.store().now()).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("the store does not answer: {e}")),
        Err(_) => Some(format!(
            "the store did not answer within {} s",
            READY_STORE_TIMEOUT.as_secs()
        )),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = shared.metrics.render(&shared);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
