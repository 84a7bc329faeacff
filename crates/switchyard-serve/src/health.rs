//! The standard gRPC health service (`grpc.health.v1.Health`, from
//! `tonic-health`) on `--grpc-listen`. Both the overall service (`""`) and
//! `switchyard` report `SERVING` while the store answers a cheap indexed
//! read within [`PROBE_TIMEOUT`], `NOT_SERVING` otherwise; the store is
//! probed every [`PROBE_EVERY`].

use std::future::Future;
use std::time::Duration;

use switchyard_core::{DynStore, TaskId};
use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::ServeError;

/// How often the store is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe slower than this counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The service name reported besides the overall `""`.
pub const SERVICE: &str = "switchyard";

/// Whether the store answers: a read of a task that does not exist (an
/// index lookup, no scan).
pub async fn store_reachable(store: &DynStore) -> bool {
    let probe = store.get_task(TaskId(uuid::Uuid::nil()));
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(_)))
}

async fn report(reporter: &HealthReporter, up: bool) {
    let status = if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE, status).await;
}

/// Serves the health service on `listener` until `shutdown` resolves.
pub async fn serve(
    store: DynStore,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let mut up = store_reachable(&store).await;
    report(&reporter, up).await;
    let prober = tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let now_up = store_reachable(&store).await;
            if now_up != up {
                if now_up {
                    tracing::info!("gRPC health: the store answers again: SERVING");
                } else {
                    tracing::warn!("gRPC health: the store does not answer: NOT_SERVING");
                }
                up = now_up;
            }
            report(&reporter, up).await;
        }
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    prober.abort();
    served.map_err(|e| ServeError::Io(std::io::Error::other(format!("gRPC health service: {e}"))))
}
