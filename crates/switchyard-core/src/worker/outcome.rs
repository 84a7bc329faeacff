//! How a run ended → the completion the store records (retry policy, payload limits).

use super::*;

/// Turns how a run ended into the resolution the store records.
pub(super) async fn finish(
    shared: &Arc<Shared>,
    reg: &Reg,
    step: &ClaimedStep,
    running: &Running,
    end: RunEnd,
    status: Option<String>,
) {
    let lease = lease_of(shared, step);
    let resolution = match end {
        RunEnd::Cancelled => {
            if running.lost.load(Ordering::Acquire) {
                // Cancelled or taken over: the store already moved on.
                shared.running.lock().remove(&run_ref(step));
                return;
            }
            Some(Resolution::Released)
        }
        RunEnd::Finished(Ok(Output::Value(v))) => Some(match check_payload(shared, "result", &v) {
            Ok(()) => route(step, status, v),
            Err(e) => Resolution::Failed(error_info(
                ErrorKind::Permanent,
                e.to_string(),
                None,
                step.attempt,
            )),
        }),
        RunEnd::Finished(Ok(Output::Decision(_))) if status.is_some() => {
            Some(Resolution::Failed(error_info(
                ErrorKind::InvalidInput,
                format!(
                    "decision handler `{}` set status `{}`: a status routes a step that returns \
                     a value; a decision plans its steps itself",
                    reg.name,
                    status.unwrap_or_default()
                ),
                None,
                step.attempt,
            )))
        }
        RunEnd::Finished(Ok(Output::Decision(Decision::Complete(v)))) => {
            Some(Resolution::Decided {
                steps: vec![],
                final_step: None,
                result: v,
                status: None,
            })
        }
        RunEnd::Finished(Ok(Output::Decision(d @ Decision::Steps { .. }))) => {
            // A name no store can key on fails this step alone, before it
            // reaches a write batch shared with other steps' outcomes.
            if let Err(e) = d.validate_names() {
                Some(Resolution::Failed(error_info(
                    ErrorKind::InvalidInput,
                    e.to_string(),
                    None,
                    step.attempt,
                )))
            } else {
                let Decision::Steps { steps, final_step } = d else {
                    unreachable!("matched above")
                };
                let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                let result = json!({ "created": names });
                Some(Resolution::Decided {
                    steps,
                    final_step,
                    result,
                    status: None,
                })
            }
        }
        RunEnd::Finished(Err(StepError::Suspend(wait))) => Some(Resolution::Suspended(wait)),
        RunEnd::Finished(Err(StepError::LeaseLost)) => None,
        RunEnd::Finished(Err(StepError::Retryable {
            message,
            retry_after,
            trace,
        })) => Some(
            retry_or_fail(
                shared,
                reg,
                step,
                ErrorKind::Retryable,
                message,
                trace,
                retry_after,
            )
            .await,
        ),
        RunEnd::Finished(Err(e)) => {
            let trace = match &e {
                StepError::Permanent { trace, .. } => trace.clone(),
                _ => None,
            };
            let message = match &e {
                StepError::Permanent { message, .. } => message.clone(),
                other => other.to_string(),
            };
            Some(Resolution::Failed(error_info(
                e.kind(),
                message,
                trace,
                step.attempt,
            )))
        }
        RunEnd::Panicked(msg) => Some(
            retry_or_fail(
                shared,
                reg,
                step,
                // A panic is an unexpected failure, recorded as every
                // language records an unexpected exception: retryable.
                ErrorKind::Retryable,
                format!("handler panicked: {msg}"),
                None,
                None,
            )
            .await,
        ),
        RunEnd::TimedOut(t) => Some({
            // Tell cooperative (and foreign) code still running that the core gave up.
            running.token.cancel();
            retry_or_fail(
                shared,
                reg,
                step,
                ErrorKind::Timeout,
                format!(
                    "handler `{}` timed out after {} ms",
                    reg.name,
                    t.as_millis()
                ),
                None,
                None,
            )
            .await
        }),
    };
    match resolution {
        Some(resolution) => {
            shared.metrics.resolved(&reg.m, &resolution);
            shared.send_completion(Completion { lease, resolution })
        }
        None => {
            shared.running.lock().remove(&run_ref(step));
        }
    }
}

/// A value outcome with the status its handler set: plain `Completed` for an
/// unrouted step with no status; otherwise the steps routed from the
/// status (`ok` when none was set) are created with the step's completion,
/// and the status is recorded. A status the step has no route for fails it.
fn route(step: &ClaimedStep, status: Option<String>, v: Value) -> Resolution {
    if step.routes.is_empty() {
        return match status {
            None => Resolution::Completed(v),
            status @ Some(_) => Resolution::Decided {
                steps: vec![],
                final_step: None,
                result: v,
                status,
            },
        };
    }
    let status = status.unwrap_or_else(|| DEFAULT_STATUS.to_owned());
    let Some(routed) = step.routes.get(&status) else {
        let known: Vec<String> = step.routes.keys().map(|k| format!("`{k}`")).collect();
        return Resolution::Failed(error_info(
            ErrorKind::InvalidInput,
            format!(
                "step `{}` ended with status `{status}`, which has no route (its routes: {})",
                step.name,
                known.join(", ")
            ),
            None,
            step.attempt,
        ));
    };
    let steps = routed
        .iter()
        .cloned()
        .map(|mut s| {
            if s.depends_on.is_empty() {
                s.depends_on.push(step.name.clone());
            }
            s
        })
        .collect();
    Resolution::Decided {
        steps,
        final_step: None,
        result: v,
        status: Some(status),
    }
}

pub(super) fn error_info(
    kind: ErrorKind,
    message: String,
    trace: Option<String>,
    attempt: u32,
) -> ErrorInfo {
    ErrorInfo {
        kind,
        message,
        trace,
        attempt,
    }
}

pub(super) async fn retry_or_fail(
    shared: &Shared,
    reg: &Reg,
    step: &ClaimedStep,
    kind: ErrorKind,
    message: String,
    trace: Option<String>,
    retry_after: Option<Duration>,
) -> Resolution {
    let policy = &reg.opts.retry;
    if step.attempt >= policy.max_attempts {
        let message = format!(
            "attempt {} of {} failed: {message}",
            step.attempt, policy.max_attempts
        );
        return Resolution::Failed(error_info(kind, message, trace, step.attempt));
    }
    let delay = policy
        .backoff(step.attempt)
        .max(retry_after.unwrap_or_default());
    let now = match shared.store().now().await {
        Ok(n) => n,
        Err(_) => crate::clock::Clock::now(&crate::clock::SystemClock),
    };
    // A `retry_after` of `Duration::MAX` from Rust code must not wrap.
    let delay = delay.min(crate::client::MAX_DURATION).as_millis() as i64;
    Resolution::Retry {
        error: error_info(kind, message, trace, step.attempt),
        run_at: now.saturating_add(delay),
    }
}

pub(crate) fn check_payload(shared: &Shared, what: &str, v: &Value) -> Result<()> {
    crate::client::check_size(what, v, shared.env.max_payload)
}
