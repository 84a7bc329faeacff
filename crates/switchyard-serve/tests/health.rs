//! The gRPC health service (`grpc.health.v1`) on `grpc_listen`, asked by a
//! real gRPC client: SERVING while the store answers, NOT_SERVING while a
//! (real, throwaway) PostgreSQL server is stopped, SERVING again after it
//! restarts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchyard_core::DynStore;
use switchyard_serve::{ServeSettings, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn start(store: DynStore) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let settings = ServeSettings {
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServeSettings::new("127.0.0.1:0".parse().unwrap())
    };
    let server = Server::bind(store, settings).await.expect("bind");
    let grpc = server.grpc_addr().unwrap().expect("gRPC is on");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (grpc, tx)
}

async fn status(addr: SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    let r = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(r.into_inner().status())
}

async fn wait_for(addr: SocketAddr, want: ServingStatus, within: Duration) {
    let start = Instant::now();
    loop {
        let got = status(addr, "switchyard").await.expect("check");
        if got == want {
            assert_eq!(status(addr, "").await.unwrap(), want, "the overall status");
            return;
        }
        assert!(
            start.elapsed() < within,
            "still {got:?} after {within:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serving_over_sqlite_and_off_when_not_asked() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite:{}", dir.path().join("h.db").display());
    let store = switchyard_store::open(&url).await.unwrap();
    let (grpc, stop) = start(store.clone()).await;
    assert_eq!(status(grpc, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        status(grpc, "switchyard").await.unwrap(),
        ServingStatus::Serving
    );
    let unknown = status(grpc, "other").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // Shutdown stops the gRPC listener too.
    stop.send(()).unwrap();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(grpc).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "still listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without grpc_listen there is no gRPC address.
    let server = Server::bind(store, ServeSettings::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(server.grpc_addr().unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_postgres_reachability() {
    let pg = switchyard_store::pg_server::PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.create_database("health").await.expect("database");
    let store = switchyard_store::open(&url).await.expect("open postgres");
    let (grpc, _stop) = start(store).await;
    wait_for(grpc, ServingStatus::Serving, Duration::from_secs(5)).await;
    pg.stop();
    wait_for(grpc, ServingStatus::NotServing, Duration::from_secs(30)).await;
    pg.restart().expect("restart postgres");
    wait_for(grpc, ServingStatus::Serving, Duration::from_secs(30)).await;
}
