//! The completer: group-recorded completions; a refused batch is split until the poison outcome is alone.

use super::*;

pub(super) async fn completer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<CompletionMsg>) {
    const MAX: usize = 2048;
    let mut buf = Vec::with_capacity(MAX);
    let mut flushes = Vec::new();
    loop {
        let Some(first) = rx.recv().await else { return };
        let push = |m: CompletionMsg,
                    buf: &mut Vec<Completion>,
                    flushes: &mut Vec<oneshot::Sender<()>>| match m {
            CompletionMsg::One(c) => buf.push(c),
            CompletionMsg::Flush(tx) => flushes.push(tx),
        };
        push(first, &mut buf, &mut flushes);
        while buf.len() < MAX {
            match rx.try_recv() {
                Ok(m) => push(m, &mut buf, &mut flushes),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            let taken = buf.len();
            let runs: Vec<RunRef> = buf.iter().map(|c| lease_run(&c.lease)).collect();
            record(&shared, std::mem::take(&mut buf)).await;
            {
                let mut running = shared.running.lock();
                for run in &runs {
                    running.remove(run);
                }
            }
            shared.pending.fetch_sub(taken, Ordering::AcqRel);
            // The claimer may be holding back for this (Shared::max_outstanding).
            shared.slot_freed.notify_waiters();
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }
}

/// Whether a failed `complete` is worth retrying with the same batch: the
/// store could not be reached or the transaction lost a race (deadlock,
/// serialization failure, lock timeout), reported as [`Error::Store`].
/// Anything else (the stores report refused data as
/// [`Error::InvalidInput`]) means some item of the batch cannot be written.
pub(super) fn transient(e: &Error) -> bool {
    matches!(e, Error::Store(_) | Error::Timeout(_) | Error::Shutdown)
}

/// Records one batch of outcomes.
///
/// * A transient failure retries the same batch with backoff, for as long
///   as it takes, until a stopping host's flush budget is spent
///   ([`Shared::give_up`]); then what is left is dropped and logged.
/// * A batch the store refuses outright is split in halves, each written
///   alone, so that only the outcome the store cannot take fails: alone, it
///   becomes a `Failed` resolution of its step with the store's reason.
/// * An item refused by the store (per-item error) with invalid input fails
///   its step the same way.
/// * A `Failed` resolution that is refused too is dropped and logged; the
///   step's lease expires and it runs again.
pub(super) async fn record(shared: &Shared, batch: Vec<Completion>) {
    // Parts still to write, the next one last (so the batch's order holds).
    let mut todo: Vec<Vec<Completion>> = vec![batch];
    let mut delay = Duration::from_millis(20);
    while let Some(part) = todo.pop() {
        let outcome = tokio::select! {
            biased;
            r = shared.metrics.store_call(StoreCall::Complete, async {
                shared.metrics.completion_batch.observe(part.len() as f64);
                shared.store().complete(part.clone()).await
            }) => Some(r),
            _ = shared.give_up.cancelled() => None,
        };
        let result = match outcome {
            Some(r) => r,
            None => {
                todo.push(part);
                log_dropped(&todo);
                return;
            }
        };
        match result {
            Ok(results) => {
                delay = Duration::from_millis(20);
                let mut refused = Vec::new();
                for (c, r) in part.iter().zip(results) {
                    match r {
                        // The outcome itself is invalid (a decision naming an
                        // unknown dependency, a result over the size limit):
                        // the step fails at once with the reason.
                        Err(e @ (Error::InvalidInput(_) | Error::PayloadTooLarge { .. }))
                            if !matches!(c.resolution, Resolution::Failed(_)) =>
                        {
                            tracing::warn!(step = %c.lease.step_id, error = %e, "outcome refused; failing the step");
                            refused.push(refused_outcome(c, &e));
                        }
                        Err(e) => {
                            tracing::warn!(step = %c.lease.step_id, error = %e, "completion rejected")
                        }
                        Ok(_) => {}
                    }
                }
                if !refused.is_empty() {
                    todo.push(refused);
                }
            }
            Err(e) if transient(&e) => {
                // Nothing acknowledged may be lost: keep the batch and retry
                // (until a stopping host's flush budget is spent).
                tracing::warn!(error = %e, n = part.len(), "recording completions failed; retrying");
                todo.push(part);
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.give_up.cancelled() => {
                        log_dropped(&todo);
                        return;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) if part.len() > 1 => {
                // Some item poisons the whole write: write the halves alone.
                tracing::warn!(error = %e, n = part.len(), "the store refused a batch of completions; recording its items in smaller batches");
                let mut first = part;
                let second = first.split_off(first.len() / 2);
                todo.push(second);
                todo.push(first);
            }
            Err(e) => {
                let c = &part[0];
                if matches!(c.resolution, Resolution::Failed(_)) {
                    tracing::error!(step = %c.lease.step_id, error = %e, "the store refused to record a step's failure; dropping it (the step runs again when its lease expires)");
                } else {
                    tracing::warn!(step = %c.lease.step_id, error = %e, "outcome refused; failing the step");
                    todo.push(vec![refused_outcome(c, &e)]);
                }
            }
        }
    }
}

/// The `Failed` resolution recorded instead of an outcome the store refused.
pub(super) fn refused_outcome(c: &Completion, e: &Error) -> Completion {
    Completion {
        lease: c.lease.clone(),
        resolution: Resolution::Failed(error_info(
            ErrorKind::InvalidInput,
            e.to_string(),
            None,
            c.lease.attempt,
        )),
    }
}

/// Logs the outcomes a stopping host drops once its flush budget is spent.
pub(super) fn log_dropped(left: &[Vec<Completion>]) {
    let steps: Vec<String> = left
        .iter()
        .flatten()
        .map(|c| c.lease.step_id.to_string())
        .collect();
    if !steps.is_empty() {
        tracing::error!(
            outcomes = steps.len(),
            steps = %steps.join(", "),
            "shutdown flush time spent and the store still fails; these outcomes were not recorded (their steps become ready again when their leases expire)"
        );
    }
}
