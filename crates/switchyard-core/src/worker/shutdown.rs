//! The bounded drain of a stopping host.

use super::*;

/// Waits for running steps up to the grace period, then cancels the rest
/// (they are handed back with `Released`).
pub(super) async fn drain(shared: &Arc<Shared>, deadline: tokio::time::Instant) {
    loop {
        let freed = shared.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if shared.inflight.load(Ordering::Acquire) == 0 {
            return;
        }
        tokio::select! {
            biased;
            _ = &mut freed => {},
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let left = shared.inflight.load(Ordering::Acquire);
    tracing::warn!(
        steps = left,
        "shutdown grace period over; cancelling running steps and handing them back"
    );
    shared.abort.cancel();
    for r in shared.running.lock().values() {
        r.token.cancel();
    }
    loop {
        let freed = shared.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if shared.inflight.load(Ordering::Acquire) == 0 {
            return;
        }
        freed.await;
    }
}
