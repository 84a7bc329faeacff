//! Leases: the heartbeat, and the reaping of dead hosts on this machine.

use super::*;

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {},
        }
        let ids: Vec<RunRef> = shared.running.lock().keys().copied().collect();
        let mut host = shared.env.host.clone();
        host.last_heartbeat = shared.store().now().await.unwrap_or(host.last_heartbeat);
        let beat = shared
            .metrics
            .store_call(
                StoreCall::Heartbeat,
                shared.store().heartbeat(&host, &ids, shared.env.lease_ms),
            )
            .await;
        shared.heartbeat_ok.store(beat.is_ok(), Ordering::Release);
        match beat {
            Ok(reply) => shared.mark_lost(&reply.lost),
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        let recovered = shared
            .metrics
            .store_call(StoreCall::RecoverExpired, shared.store().recover_expired())
            .await;
        match recovered {
            Ok(0) => {}
            Ok(n) => tracing::info!(steps = n, "recovered steps whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "lease recovery failed"),
        }
    }
}

/// How often a host looks for dead hosts on its own machine.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// True if process `pid` of this machine has certainly ended: Linux has no
/// `/proc` entry for it, or it is a zombie. Anything uncertain (no `/proc`,
/// an unreadable entry, this very process) counts as alive.
pub(super) fn process_gone(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    if pid == 0 || pid == std::process::id() || !proc.join("self").exists() {
        return false;
    }
    match std::fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Recovers the steps of hosts known to be dead, without waiting for their
/// leases to expire: every [`REAP_INTERVAL`] a host lists the registered
/// hosts, and a host on the same machine (same hostname) whose process is
/// gone ([`process_gone`]) has its leases expired and recovered at once. A
/// host that is merely slow, or on another machine, is never judged this
/// way: its steps wait for their leases as before.
pub(super) async fn reap_dead_hosts(shared: Arc<Shared>) {
    let me = &shared.env.host;
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(hosts) = shared.store().list_hosts().await else {
            continue;
        };
        let mut expired = 0;
        for h in hosts {
            if h.id == me.id || h.hostname != me.hostname || !process_gone(h.pid) {
                continue;
            }
            match shared.store().expire_host(&h.id).await {
                Ok(n) => {
                    tracing::info!(host = %h.id, pid = h.pid, steps = n, "host process is gone; recovering its steps");
                    expired += n;
                }
                Err(e) => {
                    tracing::warn!(host = %h.id, error = %e, "expiring a dead host's leases failed")
                }
            }
        }
        if expired > 0 {
            if let Err(e) = shared.store().recover_expired().await {
                tracing::warn!(error = %e, "lease recovery failed");
            }
        }
    }
}
