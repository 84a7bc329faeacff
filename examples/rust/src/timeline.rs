//! The timeline every scenario prints: `[  1234 ms] step  what happened`.
//!
//! Handlers run again from the top when a suspended step resumes (replay),
//! so a handler that printed unconditionally would repeat itself. The rule
//! the scenarios follow: print inside checkpoint closures (they run once per
//! task, ever), print each suspension, and print received events through
//! [`once`], which remembers what this process has already said.

use std::collections::HashSet;
use std::fmt::Display;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

static START: LazyLock<Instant> = LazyLock::new(Instant::now);
static SAID: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// Starts the clock (the first [`say`] starts it otherwise).
pub fn start() {
    LazyLock::force(&START);
}

/// Milliseconds since [`start`].
pub fn elapsed_ms() -> u128 {
    START.elapsed().as_millis()
}

/// Prints one timeline line.
pub fn say(who: &str, what: impl Display) {
    println!("[{:>6} ms] {who:<17} {what}", elapsed_ms());
}

/// Records `key`; true the first time this process sees it.
pub fn once(key: impl Into<String>) -> bool {
    SAID.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.into())
}

/// True if [`once`] has seen `key`.
pub fn seen(key: &str) -> bool {
    SAID.lock().unwrap_or_else(|e| e.into_inner()).contains(key)
}

/// Compact JSON for a timeline line.
pub fn compact(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
}

/// `ctx.await_event`, narrated: says when the step suspends (its host slot
/// is freed until the event arrives), and, once, whether the event woke the
/// step up or had already been cached before the step asked for it.
pub async fn await_event(
    ctx: &switchyard::Context,
    name: &str,
    timeout: Option<std::time::Duration>,
) -> switchyard::StepResult<serde_json::Value> {
    let key = format!("{}/await/{name}", ctx.task_id());
    let waited = format!("{key}/suspended");
    match ctx.await_event(name, timeout).await {
        Ok(payload) => {
            if once(key.clone()) {
                if seen(&waited) {
                    say(
                        ctx.step_name(),
                        format!("resumed: {name} arrived {}", compact(&payload)),
                    );
                } else {
                    say(
                        ctx.step_name(),
                        format!(
                            "{name} was already cached: delivered without waiting {}",
                            compact(&payload)
                        ),
                    );
                }
            }
            Ok(payload)
        }
        Err(switchyard::StepError::Suspend(wait)) => {
            if once(waited) {
                say(
                    ctx.step_name(),
                    format!("suspends until {name} arrives (its host slot is freed)"),
                );
            }
            Err(switchyard::StepError::Suspend(wait))
        }
        Err(e) => Err(e),
    }
}
