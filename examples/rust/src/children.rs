//! Child tasks that answer with a `response_event`.
//!
//! `ctx.spawn` creates a fire-and-forget child and `ctx.delegate` makes the
//! parent step wait for the child's whole group; neither lets the caller
//! name a `response_event`. The requester/worker pattern needs exactly that
//! (the worker's outcome arrives as an event the requester awaits), so the
//! scenarios spawn such children through a [`Client`] and give them the same
//! idempotency, parent link, headers and priority that `ctx.spawn` would.

use serde_json::Value;
use switchyard::{Client, Context, NewTask, ParentRef, StepResult, TaskId};

/// A child task of the step running `ctx`, answering with `response_event`.
///
/// `name` must be unique within the step: it makes the spawn idempotent, so
/// the replay of a step that suspended after spawning finds the same child
/// instead of creating another one.
pub fn child_task(
    ctx: &Context,
    name: &str,
    handler: &str,
    input: Value,
    response_event: &str,
) -> NewTask {
    let mut task = NewTask::new(handler, input)
        .response_event(response_event)
        .idempotency_key(format!("{}/{}/{name}", ctx.task_id(), ctx.step_name()))
        .priority(ctx.priority());
    task.headers = ctx.headers().clone();
    // Without a group the parent is not woken by the child; the link only
    // makes the child show up under the parent (`switchyard tasks show`).
    task.parent = Some(ParentRef {
        task_id: ctx.task_id(),
        step_id: ctx.step_id(),
        group: None,
        index: 0,
    });
    task
}

/// Spawns [`child_task`]s in one write; answers their ids in order.
pub async fn spawn_children(client: &Client, tasks: Vec<NewTask>) -> StepResult<Vec<TaskId>> {
    let spawned = client.spawn_many(tasks).await?;
    Ok(spawned.into_iter().map(|s| s.task_id).collect())
}

/// The payload of a response event: how the child ended.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Response {
    /// The child task.
    pub task_id: TaskId,
    /// `completed`, `failed` or `cancelled`.
    pub state: switchyard::TaskState,
    /// The child's result, if it completed.
    #[serde(default)]
    pub result: Option<Value>,
    /// The child's error, if it failed or was cancelled.
    #[serde(default)]
    pub error: Option<switchyard::ErrorInfo>,
}

impl Response {
    /// The child's result, or a permanent error naming how it ended.
    pub fn into_result(self) -> StepResult<Value> {
        match self.state {
            switchyard::TaskState::Completed => Ok(self.result.unwrap_or(Value::Null)),
            state => Err(switchyard::StepError::permanent(format!(
                "child task {} {state}: {}",
                self.task_id,
                self.error.map(|e| e.message).unwrap_or_default()
            ))),
        }
    }
}
