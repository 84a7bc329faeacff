//! Running a claimed step or batch: one task per step, under the `guarded` timeout/cancel/panic wrapper.

use super::*;

pub(super) fn lease_run(lease: &Lease) -> RunRef {
    RunRef {
        step_id: lease.step_id,
        run: lease.run,
    }
}

pub(super) fn lease_of(shared: &Shared, step: &ClaimedStep) -> Lease {
    Lease {
        step_id: step.step_id,
        task_id: step.task_id,
        attempt: step.attempt,
        run: step.run,
        host_id: shared.env.host.id.clone(),
    }
}

pub(super) enum Output {
    Value(Value),
    Decision(Decision),
}

pub(super) enum RunEnd {
    Finished(StepResult<Output>),
    Panicked(String),
    TimedOut(Duration),
    Cancelled,
}

pub(super) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// How long a cancelled run may take to notice (`ctx.cancelled()`,
/// `ctx.is_cancelled()`) and return before its future is dropped.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Runs `fut` under the handler's timeout and the step's cancellation token,
/// catching panics. When `token` fires the run gets [`CANCEL_GRACE`] to end
/// cooperatively; when `hard` fires (shutdown gave up waiting) it is dropped.
pub(super) async fn guarded<T>(
    fut: impl std::future::Future<Output = T>,
    timeout: Option<Duration>,
    token: &CancellationToken,
    hard: &CancellationToken,
) -> std::result::Result<T, RunEnd> {
    let fut = AssertUnwindSafe(fut).catch_unwind();
    let timed = async {
        match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| RunEnd::TimedOut(t)),
            None => Ok(fut.await),
        }
    };
    tokio::pin!(timed);
    let settle = |r: std::result::Result<std::thread::Result<T>, RunEnd>| match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(p)) => Err(RunEnd::Panicked(panic_message(p))),
        Err(e) => Err(e),
    };
    tokio::select! {
        biased;
        _ = hard.cancelled() => return Err(RunEnd::Cancelled),
        r = &mut timed => return settle(r),
        _ = token.cancelled() => {},
    }
    tokio::select! {
        biased;
        _ = hard.cancelled() => Err(RunEnd::Cancelled),
        r = &mut timed => settle(r),
        _ = tokio::time::sleep(CANCEL_GRACE) => Err(RunEnd::Cancelled),
    }
}

pub(super) fn begin(
    shared: &Arc<Shared>,
    reg: &Arc<Reg>,
    step: &ClaimedStep,
) -> (Context, Arc<Running>) {
    reg.m.started.inc();
    let token = CancellationToken::new();
    let running = Arc::new(Running {
        reg: reg.clone(),
        token: token.clone(),
        lost: AtomicBool::new(false),
        started: tokio::time::Instant::now(),
    });
    shared.running.lock().insert(run_ref(step), running.clone());
    let deadline = reg.opts.timeout.map(|t| Instant::now() + t);
    let ctx = Context::new(
        shared.env.clone(),
        step.clone(),
        lease_of(shared, step),
        token,
        deadline,
    );
    (ctx, running)
}

pub(super) async fn run_one(shared: Arc<Shared>, reg: Arc<Reg>, step: ClaimedStep) {
    let (ctx, running) = begin(&shared, &reg, &step);
    // Kept to read the status the handler set (routing) once it returned.
    let probe = ctx.clone();
    let input = step.input.clone();
    let token = running.token.clone();
    let end: std::result::Result<StepResult<Output>, RunEnd> = match &reg.cap {
        Capability::Plain(h) => guarded(h.run(input, ctx), reg.opts.timeout, &token, &shared.abort)
            .await
            .map(|r| r.map(Output::Value)),
        Capability::Decision(h) => guarded(
            h.decide(input, ctx),
            reg.opts.timeout,
            &token,
            &shared.abort,
        )
        .await
        .map(|r| r.map(Output::Decision)),
        Capability::Api(h) => guarded(h.call(input, ctx), reg.opts.timeout, &token, &shared.abort)
            .await
            .map(|r| r.map(Output::Value).map_err(ApiError::classify)),
        Capability::Batch(_) => unreachable!("batch steps go through the batcher"),
    };
    reg.m
        .run_time
        .observe(running.started.elapsed().as_secs_f64());
    let end = end.map_or_else(|e| e, RunEnd::Finished);
    // A run that ended after its step was cancelled or taken over has nothing to record.
    let end = if running.lost.load(Ordering::Acquire) {
        RunEnd::Cancelled
    } else {
        end
    };
    finish(&shared, &reg, &step, &running, end, probe.status()).await;
    shared.release_slot(&reg, 1);
}

pub(super) async fn batcher(
    shared: Arc<Shared>,
    reg: Arc<Reg>,
    mut rx: mpsc::UnboundedReceiver<ClaimedStep>,
) {
    let max = reg.opts.max_batch.max(1);
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < max {
            match rx.try_recv() {
                Ok(s) => items.push(s),
                Err(_) => break,
            }
        }
        if items.len() < max && !reg.opts.linger.is_zero() {
            let deadline = tokio::time::Instant::now() + reg.opts.linger;
            while items.len() < max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => items.push(s),
                    _ => break,
                }
            }
        }
        tokio::spawn(run_batch(shared.clone(), reg.clone(), items));
    }
}

pub(super) async fn run_batch(shared: Arc<Shared>, reg: Arc<Reg>, steps: Vec<ClaimedStep>) {
    let Capability::Batch(h) = &reg.cap else {
        unreachable!("batcher only runs batch handlers")
    };
    let mut items = Vec::with_capacity(steps.len());
    let mut runs = Vec::with_capacity(steps.len());
    let mut probes = Vec::with_capacity(steps.len());
    for step in &steps {
        let (ctx, running) = begin(&shared, &reg, step);
        probes.push(ctx.clone());
        items.push(BatchItem {
            input: step.input.clone(),
            ctx,
        });
        runs.push(running);
    }
    // The batch as a whole is cancelled only by shutdown; a cancelled item's
    // outcome is dropped (its lease is gone).
    let batch_token = shared.abort.child_token();
    let n = steps.len();
    let result = guarded(
        h.run_batch(items),
        reg.opts.timeout,
        &batch_token,
        &shared.abort,
    )
    .await;
    if let Some(first) = runs.first() {
        let took = first.started.elapsed().as_secs_f64();
        for _ in 0..n {
            reg.m.run_time.observe(took);
        }
    }
    let ends: Vec<RunEnd> = match result {
        Ok(outcomes) if outcomes.len() == n => outcomes
            .into_iter()
            .map(|r| RunEnd::Finished(r.map(Output::Value)))
            .collect(),
        Ok(outcomes) => {
            let msg = format!(
                "batch handler `{}` returned {} outcomes for {n} steps",
                reg.name,
                outcomes.len()
            );
            (0..n)
                .map(|_| RunEnd::Finished(Err(StepError::permanent(&msg))))
                .collect()
        }
        Err(RunEnd::Panicked(m)) => (0..n).map(|_| RunEnd::Panicked(m.clone())).collect(),
        Err(RunEnd::TimedOut(t)) => (0..n).map(|_| RunEnd::TimedOut(t)).collect(),
        Err(_) => (0..n).map(|_| RunEnd::Cancelled).collect(),
    };
    for (((step, running), end), probe) in steps.iter().zip(&runs).zip(ends).zip(&probes) {
        let end = if running.lost.load(Ordering::Acquire) {
            RunEnd::Cancelled
        } else {
            end
        };
        finish(&shared, &reg, step, running, end, probe.status()).await;
    }
    shared.release_slot(&reg, n);
}
