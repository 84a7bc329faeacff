//! The claim loop: claims within free slots, with backpressure on unrecorded outcomes.

use super::*;

pub(super) async fn claim_loop(shared: Arc<Shared>) {
    let store = shared.store().clone();
    let signals = store.signals().clone();
    let poll = store.poll_interval();
    let lease_ms = shared.env.lease_ms;
    let mut rotate = 0usize;
    let mut backoff = Duration::from_millis(10);
    let mut deferred = false;
    // Handlers offered slots since the last wait (see `left_out` below).
    let mut offered = 0usize;
    loop {
        if shared.stopping.is_cancelled() {
            return;
        }
        let ready = signals.ready.notified();
        let freed = shared.slot_freed.notified();
        tokio::pin!(ready, freed);
        ready.as_mut().enable();
        freed.as_mut().enable();

        let inflight = shared.inflight.load(Ordering::Acquire);
        let pending = shared.pending.load(Ordering::Acquire);
        let mut host_free = shared
            .opts
            .concurrency
            .saturating_sub(inflight)
            .min(shared.max_outstanding().saturating_sub(pending + inflight));
        // Under load every finished step frees a slot; claiming for each one
        // would defeat batching. While steps are running (so more slots will
        // free soon), wait until a worthwhile share of the host is free.
        // The deferral is short and happens once: a nearly full host still
        // claims for its last free slots within a millisecond.
        let low_water = (shared.opts.concurrency.min(shared.opts.claim_batch) / 8).max(1);
        let defer = inflight > 0 && host_free > 0 && host_free < low_water && !deferred;
        deferred = defer;
        if defer {
            host_free = 0;
        }
        let mut token_wait: Option<Duration> = None;
        let n = shared.order.len();
        // What each handler could take, in rotation order.
        let mut caps: Vec<(&str, usize)> = Vec::with_capacity(n);
        let mut positions: Vec<usize> = Vec::with_capacity(n);
        for i in 0..n {
            let reg = &shared.order[(rotate + i) % n];
            let (tokens, wait) = reg.tokens();
            if let Some(w) = wait {
                token_wait = Some(token_wait.map_or(w, |t: Duration| t.min(w)));
            }
            let cap = reg.free().min(tokens).min(shared.opts.claim_batch);
            if cap > 0 {
                caps.push((reg.name.as_str(), cap));
                positions.push(i);
            }
        }
        let wants = split_slots(&caps, host_free);
        // More handlers than free slots: some were offered nothing this
        // round. The next round starts with them.
        let left_out = caps.len() - wants.len();
        rotate = if left_out > 0 && !wants.is_empty() {
            rotate.wrapping_add(positions[wants.len() - 1] + 1)
        } else {
            rotate.wrapping_add(1)
        };

        let mut next_due = None;
        if !wants.is_empty() {
            let claimed = shared
                .metrics
                .store_call(
                    StoreCall::Claim,
                    store.claim(&shared.env.host.id, &wants, lease_ms),
                )
                .await;
            match claimed {
                Ok(batch) => {
                    if !batch.steps.is_empty() {
                        shared.metrics.claim_batch.observe(batch.steps.len() as f64);
                    }
                    tracing::trace!(?wants, got = batch.steps.len(), next_due = ?batch.next_due, "claimed");
                    backoff = Duration::from_millis(10);
                    next_due = batch.next_due;
                    let mut got: HashMap<&str, usize> = HashMap::new();
                    for step in &batch.steps {
                        *got.entry(step.handler.as_str()).or_default() += 1;
                    }
                    // A handler that got all it asked for may have more waiting.
                    let more = wants
                        .iter()
                        .any(|(h, w)| got.get(h.as_str()).copied().unwrap_or(0) >= *w);
                    let got_total = batch.steps.len();
                    for step in batch.steps {
                        dispatch(&shared, step);
                    }
                    if more {
                        continue;
                    }
                    // Slots stayed free while handlers were left out: offer
                    // them to those now, not at the next wake-up (which may
                    // be a poll interval away), until every handler has had
                    // an offer since the last wait.
                    offered += wants.len();
                    if left_out > 0 && got_total < host_free && offered < caps.len() {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying");
                    tokio::select! {
                        biased;
                        _ = shared.stopping.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {},
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let mut wait = poll;
        if let Some(due) = next_due {
            if let Ok(now) = store.now().await {
                wait = wait.min(Duration::from_millis(due.saturating_sub(now).max(0) as u64));
            }
        }
        if let Some(t) = token_wait {
            wait = wait.min(t);
        }
        if deferred {
            wait = wait.min(Duration::from_millis(1));
        }
        offered = 0;
        tokio::select! {
            biased;
            _ = shared.stopping.cancelled() => return,
            _ = &mut ready => shared.metrics.woke(Wake::Notify),
            _ = &mut freed => shared.metrics.woke(Wake::Slot),
            _ = tokio::time::sleep(wait) => shared.metrics.woke(Wake::Poll),
        }
    }
}

/// Shares `host_free` slots among handlers (each with its own cap, in
/// rotation order): first an equal share each, so a busy handler never takes
/// every slot from one whose step just became ready, then what is left in
/// rotation order.
pub(super) fn split_slots(caps: &[(&str, usize)], mut host_free: usize) -> Vec<(String, usize)> {
    let mut given = vec![0usize; caps.len()];
    if !caps.is_empty() {
        let share = (host_free / caps.len()).max(1);
        for (i, (_, cap)) in caps.iter().enumerate() {
            let g = share.min(*cap).min(host_free);
            given[i] = g;
            host_free -= g;
        }
        for (i, (_, cap)) in caps.iter().enumerate() {
            let g = (cap - given[i]).min(host_free);
            given[i] += g;
            host_free -= g;
        }
    }
    caps.iter()
        .zip(given)
        .filter(|(_, g)| *g > 0)
        .map(|((name, _), g)| (name.to_string(), g))
        .collect()
}

pub(super) fn dispatch(shared: &Arc<Shared>, step: ClaimedStep) {
    let Some(reg) = shared.regs.get(&step.handler).cloned() else {
        // The store returned a handler we did not ask for: hand it back.
        tracing::error!(handler = %step.handler, "claimed a step for an unregistered handler; releasing it");
        let lease = lease_of(shared, &step);
        shared.send_completion(Completion {
            lease,
            resolution: Resolution::Released,
        });
        return;
    };
    reg.inflight.fetch_add(1, Ordering::AcqRel);
    shared.inflight.fetch_add(1, Ordering::AcqRel);
    reg.take_tokens(1);
    reg.m.claimed.inc();
    // Claimed at (the store's clock) = lease end - lease length.
    let claimed_at = step.lease_expires_at.saturating_sub(shared.env.lease_ms);
    reg.m
        .queue_wait
        .observe(claimed_at.saturating_sub(step.ready_at).max(0) as f64 / 1000.0);
    if step.attempt > reg.opts.retry.max_attempts {
        // Only a lost lease uses an attempt without a recorded outcome: the
        // last attempt's host stopped renewing its lease.
        let max = reg.opts.retry.max_attempts;
        let mut error = ErrorInfo::new(
            ErrorKind::LeaseExpired,
            format!(
                "attempt {max} of {max} failed: the lease expired without a heartbeat from its host, and no attempts are left"
            ),
        );
        error.attempt = step.attempt;
        let lease = lease_of(shared, &step);
        let resolution = Resolution::Failed(error);
        shared.metrics.resolved(&reg.m, &resolution);
        shared.send_completion(Completion { lease, resolution });
        shared.release_slot(&reg, 1);
        return;
    }
    if let Capability::Batch(_) = reg.cap {
        let tx = reg.batch_tx.lock().clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::error::SendError(step)) = tx.send(step) {
                    release_unstarted(shared, &reg, step);
                }
            }
            None => release_unstarted(shared, &reg, step),
        }
        return;
    }
    tokio::spawn(run_one(shared.clone(), reg, step));
}

pub(super) fn release_unstarted(shared: &Arc<Shared>, reg: &Reg, step: ClaimedStep) {
    reg.m.released.inc();
    let lease = lease_of(shared, &step);
    shared.send_completion(Completion {
        lease,
        resolution: Resolution::Released,
    });
    shared.release_slot(reg, 1);
}

pub(super) fn run_ref(step: &ClaimedStep) -> RunRef {
    RunRef {
        step_id: step.step_id,
        run: step.run,
    }
}
