//! The end-of-run invariants (the ones checked during the run live where
//! the observation is made: the store wrapper and the handlers).

use std::sync::Arc;

use switchyard_core::{StepState, Store, TaskId, TaskState};

use crate::workload::max_attempts;
use crate::world::{Expect, World};

/// True once every task the run knows about has finished.
pub async fn all_finished(inner: &Arc<dyn Store>, world: &World) -> bool {
    let ids: Vec<TaskId> = world.obs.lock().tasks.keys().copied().collect();
    for id in ids {
        match inner.get_task(id).await {
            Ok(Some(t)) if t.state.is_terminal() => {}
            _ => return false,
        }
    }
    true
}

/// The nearest ancestor (or the task itself) cancelled by the driver with
/// cascade, or the task itself if it was cancelled.
fn cancelled_by_driver(world: &World, id: TaskId) -> bool {
    let o = world.obs.lock();
    let Some(t) = o.tasks.get(&id) else {
        return false;
    };
    if t.cancelled {
        return true;
    }
    let mut cur = t.parent;
    while let Some(p) = cur {
        let Some(pt) = o.tasks.get(&p) else { break };
        if pt.cascade_at.is_some() {
            return true;
        }
        cur = pt.parent;
    }
    false
}

/// Runs of a step that cost an attempt: every claim except those whose
/// accepted outcome was a suspension, a release or a success, and except
/// the final "attempts exhausted" verdict itself. Returns (costly runs,
/// suspensions, all runs).
fn attempt_costs(world: &World, step: switchyard_core::StepId) -> (usize, usize, usize) {
    let o = world.obs.lock();
    let Some(runs) = o.runs.get(&step) else {
        return (0, 0, 0);
    };
    let mut costly = runs
        .iter()
        .filter(|r| {
            !matches!(
                r.accepted,
                Some("suspended" | "released" | "completed" | "decided")
            )
        })
        .count();
    if let Some(last) = runs.last() {
        if last.accepted == Some("failed")
            && last
                .accepted_error
                .as_deref()
                .is_some_and(|m| m.contains("no attempts are left"))
        {
            costly -= 1;
        }
    }
    let suspended = runs
        .iter()
        .filter(|r| r.accepted == Some("suspended"))
        .count();
    (costly, suspended, runs.len())
}

/// Checks made once every task has finished (or the run gave up waiting).
pub async fn final_checks(inner: &Arc<dyn Store>, world: &World) {
    let tasks: Vec<(TaskId, crate::world::TaskInfo)> = world
        .obs
        .lock()
        .tasks
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    for (id, info) in tasks {
        let Ok(Some(d)) = inner.task_detail(id).await else {
            world.violation(
                "no-task-lost",
                format!("task {id} ({}) disappeared", info.handler),
            );
            continue;
        };
        if !d.task.state.is_terminal() {
            let steps: Vec<String> = d
                .steps
                .iter()
                .map(|s| {
                    format!(
                        "{}={} attempt {} wait {:?} run_at {:?}",
                        s.name,
                        s.state,
                        s.attempt,
                        s.wait,
                        s.run_at.map(|t| t - world.store_now())
                    )
                })
                .collect();
            world.violation(
                "no-task-lost",
                format!(
                    "task {id} ({}) is still {} after the calm phase: steps [{}]",
                    info.handler,
                    d.task.state,
                    steps.join("; ")
                ),
            );
            continue;
        }
        // Attempts exhausted although suspensions do not cost attempts.
        let mut exhausted_legitimately = false;
        for s in &d.steps {
            let msg = s
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default();
            let max = max_attempts(&s.handler);
            if s.state != StepState::Failed
                || !msg.starts_with(&format!("attempt {max} of {max} failed: "))
            {
                continue;
            }
            let (costly, suspended, runs) = attempt_costs(world, s.id);
            if (costly as u32) < max {
                world.violation(
                    "suspension-costs-attempt",
                    format!(
                        "step `{}` ({}) of task {id} failed with \"{msg}\" after {costly} failed runs of {max} allowed ({suspended} suspensions, {runs} runs)",
                        s.name, s.handler
                    ),
                );
            } else {
                exhausted_legitimately = true;
            }
        }
        if cancelled_by_driver(world, id) {
            continue;
        }
        let err = d
            .task
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        match (info.expect, d.task.state) {
            (Expect::Completed, TaskState::Completed) | (Expect::Failed, TaskState::Failed) => {}
            (Expect::Completed, TaskState::Failed) if exhausted_legitimately => {}
            (expect, state) => world.violation(
                "expected-outcome",
                format!(
                    "task {id} ({}) ended {state} but the workload makes it {expect:?}: {err}",
                    info.handler
                ),
            ),
        }
    }
}
