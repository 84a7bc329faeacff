//! Prompt cancellation: polling the store for cancelled running steps.

use super::*;

/// Longest time a cancel made in another process takes to reach a running
/// handler (at most the store's poll interval, if shorter), once the
/// handler has run for [`CANCEL_POLL_AFTER`].
pub const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Runs younger than this are left out of the cancellation poll: most steps
/// end sooner, and asking the store about every one of thousands of short
/// runs ten times a second cost ~15% of a busy host's throughput.
pub const CANCEL_POLL_AFTER: Duration = Duration::from_millis(50);

/// Stops the runs of cancelled steps: at once for cancels made through this
/// process's store handle ([`Signals::cancelled`]), and within
/// [`CANCEL_POLL`] for cancels made elsewhere (another process, another
/// machine), by asking the store which running steps were cancelled. (The
/// heartbeat reports them too, but only once per heartbeat interval.)
pub(super) async fn cancel_listener(shared: Arc<Shared>) {
    let mut rx = shared.store().signals().cancelled.subscribe();
    // Nothing outside this process changes a memory store: no polling.
    let poll = match shared.store().kind() {
        "memory" => Duration::from_secs(24 * 3600),
        _ => shared.store().poll_interval().min(CANCEL_POLL),
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            m = rx.recv() => match m {
                Ok(ids) => shared.mark_cancelled(&ids),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let mut steps: Vec<StepId> = shared
                    .running
                    .lock()
                    .iter()
                    .filter(|(_, r)| now.duration_since(r.started) >= CANCEL_POLL_AFTER)
                    .map(|(k, _)| k.step_id)
                    .collect();
                if steps.is_empty() {
                    continue;
                }
                steps.sort_unstable();
                steps.dedup();
                let found = shared
                    .metrics
                    .store_call(StoreCall::CancelledSteps, shared.store().cancelled_steps(&steps))
                    .await;
                match found {
                    Ok(ids) => shared.mark_cancelled(&ids),
                    Err(e) => tracing::debug!(error = %e, "checking for cancelled steps failed"),
                }
            }
        }
    }
}
