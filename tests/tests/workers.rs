//! Host registration across processes: a running host is listed with its
//! pid, hostname and handlers, keeps heartbeating, and is gone after SIGTERM.

use std::path::Path;
use std::time::Duration;

use switchyard_e2e::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testhost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_host_is_listed_and_deregistered_on_sigterm() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let store = scratch.open().await?;

    // A short lease makes the heartbeat frequent (a third of the lease).
    let mut host = scratch
        .host("host")
        .handlers(&["work", "noop"])
        .lease_ms(600)
        .start(bin())
        .await?;

    let hosts = store.list_hosts().await?;
    let me = hosts
        .iter()
        .find(|h| h.id == host.host_id)
        .unwrap_or_else(|| panic!("host not listed: {hosts:?}"));
    assert_eq!(me.pid, host.pid);
    assert_eq!(me.hostname, hostname());
    let mut handlers = me.handlers.clone();
    handlers.sort();
    assert_eq!(handlers, ["noop", "work"]);
    assert!(me.started_at <= me.last_heartbeat, "{me:?}");

    // Liveness is visible from another process: the heartbeat moves on.
    let first_beat = me.last_heartbeat;
    wait_until("a later heartbeat", Duration::from_secs(20), || {
        let store = store.clone();
        let id = host.host_id.clone();
        async move {
            let hosts = store.list_hosts().await?;
            Ok(hosts
                .iter()
                .find(|h| h.id == id)
                .filter(|h| h.last_heartbeat > first_beat)
                .map(|_| ()))
        }
    })
    .await?;

    host.stop(Duration::from_secs(20)).await?;
    let hosts = store.list_hosts().await?;
    assert!(
        hosts.iter().all(|h| h.id != host.host_id),
        "host still registered after SIGTERM: {hosts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_handler_is_a_startup_error() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let err = match scratch.host("bad").handlers(&["bogus"]).start(bin()).await {
        Ok(_) => panic!("a host with an unknown handler started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bogus"), "{err}");
    Ok(())
}
