//! The `/api/v1` routes. Each handler is described for the OpenAPI document
//! by its `#[utoipa::path]` attribute ([`crate::openapi`]).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_core::client::poll_until;
use switchyard_core::{
    bridge, EventRecord, FailureGroup, FinishedBucket, HostInfo, Spawned, StepState, TaskCount,
    TaskDetail, TaskFilter, TaskId, TaskRecord, TaskState,
};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::query::{parse_duration, Params};
use crate::AppState;

/// Most tasks one list page holds.
pub const MAX_PAGE: usize = 1000;
/// Longest long-poll (`wait`, `timeout`).
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most tasks one bulk retry retries.
pub const MAX_BULK_RETRY: usize = 1000;

/// Every `/api/v1` route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/tasks", get(list_tasks).post(spawn_task))
        .route("/api/v1/tasks/batch", post(spawn_many))
        .route("/api/v1/tasks/retry", post(bulk_retry))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/result", get(task_result))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/tasks/{id}/retry", post(retry_task))
        .route("/api/v1/events", get(list_events).post(emit_event))
        .route("/api/v1/events/{name}", get(get_event))
        .route("/api/v1/events/{name}/await", get(await_event))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/handlers", get(list_handlers))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/failures", get(failure_groups))
        .route("/api/v1/cleanup", post(cleanup))
        .route("/metrics", get(crate::metrics::metrics))
}

/// Unknown paths: a JSON 404.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such route: {}", uri.path()))
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}

// --- helpers ---------------------------------------------------------------

fn params(
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    allowed: &[&str],
) -> ApiResult<Params> {
    let Query(pairs) =
        q.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    Params::new(pairs, allowed)
}

/// The request body as JSON: 413 over the limit, 400 if it is not JSON.
fn json_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "request body is larger than the limit of {} bytes",
                state.max_body_bytes
            ))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty: expected JSON",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))
}

fn typed<T: for<'de> Deserialize<'de>>(v: Value) -> ApiResult<T> {
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn task_id(text: &str) -> ApiResult<TaskId> {
    text.parse::<TaskId>()
        .map_err(|_| ApiError::bad_request(format!("`{text}` is not a task id")))
}

// --- schemas (documentation of the JSON the core's types serialize to) -----

/// A task as listed (`TaskRecord`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Task {
    /// Task id (UUIDv7).
    id: String,
    /// Handler of the root step.
    handler: String,
    /// Input of the root step.
    input: Value,
    /// `running`, `completed`, `failed` or `cancelled`.
    state: String,
    /// Result (completed tasks).
    result: Option<Value>,
    /// Error (failed or cancelled tasks): `kind`, `message`, `trace`, `attempt`.
    error: Option<Value>,
    /// Headers visible to every step.
    headers: std::collections::BTreeMap<String, String>,
    /// Higher runs first.
    priority: i32,
    /// Idempotency key.
    idempotency_key: Option<String>,
    /// Event emitted with the outcome.
    response_event: Option<String>,
    /// `task_id`, `step_id`, `group`, `index` for children.
    parent: Option<Value>,
    /// Creation time (ms since the Unix epoch).
    created_at: i64,
    /// Last change (ms since the Unix epoch); the finish time of finished tasks.
    updated_at: i64,
}

/// One page of tasks.
#[derive(Serialize, ToSchema)]
pub struct TaskPage {
    /// Newest first.
    #[schema(value_type = Vec<Task>)]
    pub tasks: Vec<TaskRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A task with its steps (state, attempt, run, error with trace, wait),
/// checkpoints and children (`TaskDetail`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TaskDetailDoc {
    #[schema(value_type = Task)]
    task: Value,
    /// Steps in creation order: `name`, `handler`, `state`, `attempt`,
    /// `run`, `error` (`kind`, `message`, `trace`, `attempt`), `wait`
    /// (`event`, `wake_at`, `group`), `depends_on`, `status` (the status
    /// it completed with, if routed or set), `routes` (status → the steps
    /// created when it ends with that status), ...
    steps: Vec<Value>,
    /// Checkpoints: `key`, `value`, `step_id`, `run`, `created_at`.
    checkpoints: Vec<Value>,
    /// Child tasks (their `parent.group` names their delegation group).
    #[schema(value_type = Vec<Task>)]
    children: Vec<Value>,
}

/// A task to spawn (as every language's client takes it).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct NewTaskDoc {
    /// Handler of the root step.
    handler: String,
    /// Input (any JSON; default null).
    input: Option<Value>,
    /// Headers visible to every step.
    headers: Option<std::collections::BTreeMap<String, String>>,
    /// Higher runs first.
    priority: Option<i32>,
    /// Spawning twice with the same key returns the first task.
    idempotency_key: Option<String>,
    /// Event emitted with the outcome when the task finishes.
    response_event: Option<String>,
    /// Do not start before this time (ms since the Unix epoch).
    run_at: Option<i64>,
}

/// The answer to a spawn.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SpawnedDoc {
    /// The task.
    task_id: String,
    /// False if the idempotency key matched an existing task.
    created: bool,
}

/// Many tasks to spawn: all or none.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SpawnManyBody {
    tasks: Vec<NewTaskDoc>,
}

/// The answer to a spawn of many, in input order.
#[derive(Serialize, ToSchema)]
pub struct SpawnedMany {
    #[schema(value_type = Vec<SpawnedDoc>)]
    tasks: Vec<Spawned>,
}

/// The answer to a cancel.
#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    /// False if the task had already finished.
    cancelled: bool,
}

/// The answer to a retry.
#[derive(Serialize, ToSchema)]
pub struct Retried {
    /// Always true (a task that cannot be retried is a 409).
    retried: bool,
}

/// A task's outcome, or that it has none yet.
#[derive(Serialize, ToSchema)]
pub struct TaskOutcome {
    /// The task.
    task_id: String,
    /// Its state when answered.
    state: String,
    /// True once completed, failed or cancelled.
    finished: bool,
    /// The result (completed).
    result: Option<Value>,
    /// The error (failed or cancelled): `kind`, `message`, `trace`, `attempt`.
    error: Option<Value>,
}

/// An event to emit.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitBody {
    /// Event name.
    name: String,
    /// Payload (any JSON; default null).
    #[serde(default)]
    payload: Value,
}

/// The answer to an emit.
#[derive(Serialize, ToSchema)]
pub struct Emitted {
    /// True if this call stored the payload (first write wins).
    stored: bool,
}

/// A cached event.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Event {
    /// Name.
    name: String,
    /// Payload of the first emit.
    payload: Value,
    /// When it was first emitted (ms since the Unix epoch).
    created_at: i64,
}

/// Cached events.
#[derive(Serialize, ToSchema)]
pub struct EventList {
    /// Newest first.
    #[schema(value_type = Vec<Event>)]
    events: Vec<EventRecord>,
}

/// The answer to an await: the event, or null if the timeout passed first.
#[derive(Serialize, ToSchema)]
pub struct AwaitedEvent {
    #[schema(value_type = Option<Event>)]
    event: Option<EventRecord>,
}

/// A registered host.
#[derive(Serialize, ToSchema)]
pub struct Host {
    /// Host id.
    id: String,
    /// Process id.
    pid: u32,
    /// Machine name.
    hostname: String,
    /// Its configured name (`host.name`), if any.
    name: Option<String>,
    /// `live` (registered), `stopped` (deregistered at shutdown) or `dead`
    /// (its process was found gone and its leases expired).
    state: String,
    /// The language of its handlers (`rust`, `python`, `ruby`, `node`, `c`).
    language: Option<String>,
    /// Steps it can run at once (its concurrency).
    slots: Option<u64>,
    /// Handlers it serves.
    handlers: Vec<String>,
    /// When it started (ms since the Unix epoch).
    started_at: i64,
    /// Its last heartbeat (ms since the Unix epoch).
    last_heartbeat: i64,
    /// Milliseconds since its last heartbeat, on the store's clock (a live
    /// host that stopped heartbeating is listed until it is found dead; its
    /// steps come back when their leases expire).
    heartbeat_age_ms: i64,
    /// When it stopped or was found dead (ms since the Unix epoch).
    ended_at: Option<i64>,
    /// Steps it is running now (leased to it).
    steps_in_flight: u64,
}

/// Live hosts, then the hosts that ended recently.
#[derive(Serialize, ToSchema)]
pub struct HostList {
    /// Live hosts, newest heartbeat first.
    hosts: Vec<Host>,
    /// Hosts that stopped or were found dead within `ended_within`, most
    /// recently ended first.
    ended: Vec<Host>,
}

/// One handler.
#[derive(Serialize, ToSchema)]
pub struct Handler {
    /// Handler name.
    name: String,
    /// Ids of the registered hosts serving it.
    hosts: Vec<String>,
    /// Steps ready to run (including those due later after a backoff).
    ready: u64,
    /// Steps running.
    running: u64,
    /// Steps waiting on an event, a sleep or children.
    suspended: u64,
    /// Steps failed permanently.
    failed: u64,
    /// Step counts by every state.
    steps: std::collections::BTreeMap<String, u64>,
    /// How long its oldest ready step has been due (ms), if it has one.
    oldest_ready_age_ms: Option<i64>,
}

/// Every handler known to the store.
#[derive(Serialize, ToSchema)]
pub struct HandlerList {
    /// By name.
    handlers: Vec<Handler>,
}

/// Which tasks to retry: failed tasks matching the filter, at most `max`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRetryBody {
    /// Only tasks of this root handler.
    handler: Option<String>,
    /// Only tasks without a parent.
    #[serde(default)]
    root: bool,
    /// Only children of this task.
    parent: Option<String>,
    /// Only tasks created at or after this time (ms since the Unix epoch).
    created_after: Option<i64>,
    /// Only tasks created before this time.
    created_before: Option<i64>,
    /// Only tasks that failed at or after this time.
    finished_after: Option<i64>,
    /// Only tasks that failed before this time.
    finished_before: Option<i64>,
    /// Only tasks whose error message is exactly this (a group of
    /// `GET /api/v1/failures`, with `handler`).
    message: Option<String>,
    /// Retry at most this many (1 to 1000; default 100), newest first.
    max: Option<usize>,
}

/// What a bulk retry did.
#[derive(Serialize, ToSchema)]
pub struct BulkRetried {
    /// Failed tasks found (at most `max`).
    matched: usize,
    /// Of them, retried now.
    retried: usize,
    /// The others (e.g. retried meanwhile by someone else), with why.
    skipped: Vec<Skipped>,
}

/// A task a bulk retry did not retry.
#[derive(Serialize, ToSchema)]
pub struct Skipped {
    task_id: String,
    reason: String,
}

/// Cleanup: delete finished tasks older than `older_than` and/or events
/// older than `events_older_than` (at least one of the two).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanupBody {
    /// `90m`, `7d`, ...: tasks that finished longer ago than this.
    older_than: Option<String>,
    /// `30d`, ...: also delete cached events emitted longer ago than this
    /// (opt-in; see `switchyard cleanup --events-older-than`).
    events_older_than: Option<String>,
    /// Tasks (or events) deleted per transaction (default 1000).
    batch: Option<usize>,
}

/// What a cleanup deleted.
#[derive(Serialize, ToSchema)]
pub struct CleanedUp {
    /// Tasks deleted.
    deleted: u64,
    /// Events deleted (only when `events_older_than` was given).
    #[serde(skip_serializing_if = "Option::is_none")]
    events_deleted: Option<u64>,
}

// --- tasks -----------------------------------------------------------------

const LIST_PARAMS: &[&str] = &[
    "state",
    "handler",
    "root",
    "parent",
    "idempotency_key",
    "created_after",
    "created_before",
    "finished_after",
    "finished_before",
    "limit",
    "cursor",
];

/// List tasks, newest first, with filters that combine and a cursor.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks",
    params(
        ("state" = Option<String>, Query, description = "running, completed, failed, cancelled, or suspended (running tasks with a step waiting on an event, a sleep or children)"),
        ("handler" = Option<String>, Query, description = "root handler"),
        ("root" = Option<bool>, Query, description = "true: only tasks without a parent"),
        ("parent" = Option<String>, Query, description = "only children of this task"),
        ("idempotency_key" = Option<String>, Query, description = "only the task with this key"),
        ("created_after" = Option<i64>, Query, description = "ms since the Unix epoch, inclusive"),
        ("created_before" = Option<i64>, Query, description = "ms since the Unix epoch, exclusive"),
        ("finished_after" = Option<i64>, Query, description = "finished tasks only; inclusive"),
        ("finished_before" = Option<i64>, Query, description = "finished tasks only; exclusive"),
        ("limit" = Option<usize>, Query, description = "1 to 1000, default 100"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses(
        (status = 200, body = TaskPage),
        (status = 400, description = "a bad filter, named", body = ErrorBody),
        (status = 401, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_tasks(
    State(state): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<TaskPage>> {
    let p = params(q, LIST_PARAMS)?;
    let mut filter = TaskFilter {
        limit: p.number("limit", 1, MAX_PAGE)?.unwrap_or(100),
        handler: p.string("handler")?,
        root_only: p.bool("root")?.unwrap_or(false),
        parent: p.task_id("parent")?,
        idempotency_key: p.string("idempotency_key")?,
        created_after: p.millis("created_after")?,
        created_before: p.millis("created_before")?,
        finished_after: p.millis("finished_after")?,
        finished_before: p.millis("finished_before")?,
        after: p.task_id("cursor")?,
        ..TaskFilter::default()
    };
    match p.get("state") {
        None => {}
        Some("suspended") => filter.step_state = Some(StepState::Suspended),
        Some(s) => {
            filter.state = Some(s.parse::<TaskState>().map_err(|_| {
                ApiError::bad_request(format!(
                    "query parameter `state`: unknown state `{s}` (expected one of: running, \
                     completed, failed, cancelled, suspended)"
                ))
            })?)
        }
    }
    let tasks = state.client.list(&filter).await.map_err(|e| match e {
        switchyard_core::Error::NotFound(_) => ApiError::bad_request(format!(
            "query parameter `cursor`: no task `{}` (it may have been cleaned up)",
            p.get("cursor").unwrap_or_default()
        )),
        e => e.into(),
    })?;
    let next_cursor = if tasks.len() == filter.limit {
        tasks.last().map(|t| t.id.to_string())
    } else {
        None
    };
    Ok(Json(TaskPage { tasks, next_cursor }))
}

/// One task with its steps, attempts and runs, errors with traces,
/// checkpoints, waits and children.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, body = TaskDetailDoc),
        (status = 400, description = "not a task id", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskDetail>> {
    Ok(Json(state.client.inspect(task_id(&id)?).await?))
}

/// Spawn a task. 201 when created, 200 when the idempotency key matched
/// an existing task.
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks",
    request_body = NewTaskDoc,
    responses(
        (status = 201, body = SpawnedDoc),
        (status = 200, description = "an existing task with the same idempotency key", body = SpawnedDoc),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn spawn_task(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Spawned>)> {
    let task = bridge::new_task("task", json_body(&state, body)?)?;
    let spawned = state.client.spawn_task(task).await?;
    let status = if spawned.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(spawned)))
}

/// Spawn many tasks in one write: all are validated first, and if any is
/// invalid none is spawned (the error names its index).
#[utoipa::path(post, path = "/api/v1/tasks/batch", tag = "tasks",
    request_body = SpawnManyBody,
    responses(
        (status = 200, body = SpawnedMany),
        (status = 400, description = "names the bad task: `task #i: ...`", body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn spawn_many(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SpawnedMany>> {
    let v = json_body(&state, body)?;
    let Value::Object(mut m) = v else {
        return Err(ApiError::bad_request(
            "request body must be an object `{\"tasks\": [...]}`",
        ));
    };
    let tasks = m
        .remove("tasks")
        .ok_or_else(|| ApiError::bad_request("request body: `tasks` is missing"))?;
    if let Some(k) = m.keys().next() {
        return Err(ApiError::bad_request(format!(
            "request body: unknown field `{k}` (expected `tasks`)"
        )));
    }
    let tasks = bridge::new_tasks(tasks)?;
    Ok(Json(SpawnedMany {
        tasks: state.client.spawn_many(tasks).await?,
    }))
}

/// Cancel a running task; `cascade=true` also cancels its unfinished
/// descendants.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "task id"),
           ("cascade" = Option<bool>, Query, description = "also cancel unfinished descendants")),
    responses(
        (status = 200, body = Cancelled),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<Cancelled>> {
    let p = params(q, &["cascade"])?;
    let id = task_id(&id)?;
    let cascade = p.bool("cascade")?.unwrap_or(false);
    Ok(Json(Cancelled {
        cancelled: state.client.cancel(id, cascade).await?,
    }))
}

/// Re-run a failed or cancelled task (409 if it is running or completed).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/retry", tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, body = Retried),
        (status = 404, body = ErrorBody),
        (status = 409, description = "the task is running or completed", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn retry_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Retried>> {
    state.client.retry(task_id(&id)?).await?;
    Ok(Json(Retried { retried: true }))
}

/// Retry failed tasks matching a filter, at most `max` (newest first);
/// reports how many.
#[utoipa::path(post, path = "/api/v1/tasks/retry", tag = "tasks",
    request_body = BulkRetryBody,
    responses(
        (status = 200, body = BulkRetried),
        (status = 400, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn bulk_retry(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BulkRetried>> {
    let b: BulkRetryBody = typed(json_body(&state, body)?)?;
    let max = b.max.unwrap_or(100);
    if !(1..=MAX_BULK_RETRY).contains(&max) {
        return Err(ApiError::bad_request(format!(
            "request body: `max` must be from 1 to {MAX_BULK_RETRY}, not {max}"
        )));
    }
    let parent = match &b.parent {
        None => None,
        Some(p) => Some(p.parse::<TaskId>().map_err(|_| {
            ApiError::bad_request(format!("request body: `parent`: `{p}` is not a task id"))
        })?),
    };
    let filter = TaskFilter {
        state: Some(TaskState::Failed),
        handler: b.handler,
        root_only: b.root,
        parent,
        created_after: b.created_after,
        created_before: b.created_before,
        finished_after: b.finished_after,
        finished_before: b.finished_before,
        limit: max,
        ..TaskFilter::default()
    };
    let done = state
        .client
        .retry_failed(&filter, b.message.as_deref(), |_, _| ())
        .await?;
    Ok(Json(BulkRetried {
        matched: done.matched,
        retried: done.retried,
        skipped: done
            .skipped
            .into_iter()
            .map(|(id, reason)| Skipped {
                task_id: id.to_string(),
                reason,
            })
            .collect(),
    }))
}

/// Long-poll for a task's outcome: answers as soon as the task finishes, or
/// after `wait` (default 0: at once) or when the server stops, with
/// `finished: false`.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/result", tag = "tasks",
    params(("id" = String, Path, description = "task id"),
           ("wait" = Option<String>, Query, description = "how long to wait: `30s`, `500ms`, ... (at most 300s)")),
    responses(
        (status = 200, body = TaskOutcome),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn task_result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<TaskOutcome>> {
    let p = params(q, &["wait"])?;
    let id = task_id(&id)?;
    let wait = p.duration("wait", MAX_WAIT)?.unwrap_or_default();
    let t = if wait.is_zero() {
        state.client.get(id).await?
    } else {
        let waited = tokio::select! {
            biased;
            _ = state.stopping.cancelled() => Err(switchyard_core::Error::Shutdown),
            r = state.client.wait(id, wait) => r,
        };
        match waited {
            Ok(t) => t,
            // Out of time, or the server is stopping: the state as it is.
            Err(switchyard_core::Error::Timeout(_) | switchyard_core::Error::Shutdown) => {
                state.client.get(id).await?
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(Json(TaskOutcome {
        task_id: t.id.to_string(),
        state: t.state.to_string(),
        finished: t.state.is_terminal(),
        result: t.result,
        error: t
            .error
            .map(|e| serde_json::to_value(e).unwrap_or(Value::Null)),
    }))
}

// --- events ----------------------------------------------------------------

/// Emit an event (first write wins).
#[utoipa::path(post, path = "/api/v1/events", tag = "events",
    request_body = EmitBody,
    responses(
        (status = 200, body = Emitted),
        (status = 400, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn emit_event(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Emitted>> {
    let b: EmitBody = typed(json_body(&state, body)?)?;
    Ok(Json(Emitted {
        stored: state.client.emit(&b.name, b.payload).await?,
    }))
}

/// Cached events, newest first; `prefix` keeps those whose name starts
/// with it (plain text, no wildcards).
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("prefix" = Option<String>, Query, description = "only names starting with this"),
           ("limit" = Option<usize>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, body = EventList), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_events(
    State(state): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<EventList>> {
    let p = params(q, &["prefix", "limit"])?;
    let limit = p.number("limit", 1, MAX_PAGE)?.unwrap_or(100);
    let events = match p.string("prefix")? {
        None => state.client.events(limit).await?,
        Some(prefix) => state.store.list_events_prefixed(&prefix, limit).await?,
    };
    Ok(Json(EventList { events }))
}

/// One cached event (404 if it was never emitted).
#[utoipa::path(get, path = "/api/v1/events/{name}", tag = "events",
    params(("name" = String, Path, description = "event name")),
    responses((status = 200, body = Event), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_event(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<EventRecord>> {
    state
        .store
        .get_event(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no event `{name}` has been emitted")))
}

/// Long-poll for an event from outside any task: answers as soon as it is
/// emitted (or at once if it was), or after `timeout` (or when the server
/// stops) with `event: null`.
#[utoipa::path(get, path = "/api/v1/events/{name}/await", tag = "events",
    params(("name" = String, Path, description = "event name"),
           ("timeout" = Option<String>, Query, description = "`30s`, `500ms`, ... (default 30s, at most 300s)")),
    responses((status = 200, body = AwaitedEvent), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn await_event(
    State(state): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<AwaitedEvent>> {
    let p = params(q, &["timeout"])?;
    switchyard_core::validate::validate_name("event name", &name)?;
    let timeout = p
        .duration("timeout", MAX_WAIT)?
        .unwrap_or(Duration::from_secs(30));
    let deadline = tokio::time::Instant::now() + timeout;
    let signals = state.store.signals().clone();
    let (store, name) = (&state.store, name.as_str());
    // An in-process emit wakes waiting steps through `ready`; other
    // processes' emits are seen by polling. A stopping server answers at once.
    let event = tokio::select! {
        biased;
        _ = state.stopping.cancelled() => None,
        found = poll_until(store, &signals.ready, deadline, move || async move {
            store.get_event(name).await
        }) => found?,
    };
    Ok(Json(AwaitedEvent { event }))
}

// --- hosts and cleanup -----------------------------------------------------

/// Live hosts (language, slots, handlers, steps in flight, last heartbeat)
/// and the hosts that stopped or were found dead within `ended_within`.
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    params(("ended_within" = Option<String>, Query, description = "how far back to list ended hosts: `1h` (default), `10m`, ... at most `24h`; `0s` for none")),
    responses((status = 200, body = HostList), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_hosts(
    State(state): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<HostList>> {
    let p = params(q, &["ended_within"])?;
    let retention = Duration::from_millis(switchyard_core::ENDED_HOST_RETENTION_MS as u64);
    let within = p
        .duration("ended_within", retention)?
        .unwrap_or(Duration::from_secs(3600));
    let now = state.store.now().await?;
    let hosts = state.client.workers().await?;
    let ended = if within.is_zero() {
        Vec::new()
    } else {
        let since = now.saturating_sub(i64::try_from(within.as_millis()).unwrap_or(i64::MAX));
        state.store.ended_hosts(since).await?
    };
    let running = state.store.running_by_host().await?;
    let show = |h: HostInfo| Host {
        heartbeat_age_ms: now.saturating_sub(h.last_heartbeat).max(0),
        steps_in_flight: running.get(&h.id).copied().unwrap_or(0),
        state: h.end_reason.clone().unwrap_or_else(|| "live".to_string()),
        id: h.id,
        pid: h.pid,
        hostname: h.hostname,
        name: h.name,
        language: h.language,
        slots: h.slots,
        handlers: h.handlers,
        started_at: h.started_at,
        last_heartbeat: h.last_heartbeat,
        ended_at: h.ended_at,
    };
    Ok(Json(HostList {
        hosts: hosts.into_iter().map(show).collect(),
        ended: ended.into_iter().map(show).collect(),
    }))
}

/// Every handler known to the store (it has steps, or a registered host
/// serves it): the hosts serving it, its step counts by state and how long
/// its oldest ready step has been due.
#[utoipa::path(get, path = "/api/v1/handlers", tag = "hosts",
    responses((status = 200, body = HandlerList)),
    security(("bearer" = [])))]
pub async fn list_handlers(State(state): State<AppState>) -> ApiResult<Json<HandlerList>> {
    let now = state.store.now().await?;
    let hosts = state.client.workers().await?;
    let stats = state.store.handler_stats().await?;
    let mut by: std::collections::BTreeMap<String, Handler> = std::collections::BTreeMap::new();
    fn entry<'a>(
        by: &'a mut std::collections::BTreeMap<String, Handler>,
        name: &str,
    ) -> &'a mut Handler {
        by.entry(name.to_string()).or_insert_with(|| Handler {
            name: name.to_string(),
            hosts: Vec::new(),
            ready: 0,
            running: 0,
            suspended: 0,
            failed: 0,
            steps: Default::default(),
            oldest_ready_age_ms: None,
        })
    }
    for s in stats {
        let h = entry(&mut by, &s.handler);
        let n = |k: &str| s.steps.get(k).copied().unwrap_or(0);
        h.ready = n("ready");
        h.running = n("running");
        h.suspended = n("suspended");
        h.failed = n("failed");
        h.oldest_ready_age_ms = s.oldest_ready_at.map(|at| now.saturating_sub(at).max(0));
        h.steps = s.steps;
    }
    for host in &hosts {
        for name in &host.handlers {
            entry(&mut by, name).hosts.push(host.id.clone());
        }
    }
    Ok(Json(HandlerList {
        handlers: by.into_values().collect(),
    }))
}

/// Tasks of one root handler in one state.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TaskCountDoc {
    /// Root handler.
    handler: String,
    /// `running`, `completed`, `failed` or `cancelled`.
    state: String,
    /// How many.
    count: u64,
}

/// Tasks that finished in one bucket with one outcome.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FinishedBucketDoc {
    /// Start of the bucket (ms since the Unix epoch).
    start: i64,
    /// `completed`, `failed` or `cancelled`.
    state: String,
    /// How many.
    count: u64,
}

/// Task counts and throughput.
#[derive(Serialize, ToSchema)]
pub struct Stats {
    /// The store's clock when answered (ms since the Unix epoch).
    now: i64,
    /// Start of the first bucket: `now - window`.
    since: i64,
    /// Length of a bucket (ms).
    bucket_ms: i64,
    /// Tasks by root handler and state (pairs with none left out).
    #[schema(value_type = Vec<TaskCountDoc>)]
    tasks: Vec<TaskCount>,
    /// Tasks finished since `since`, per bucket and state (buckets with none
    /// left out), oldest first.
    #[schema(value_type = Vec<FinishedBucketDoc>)]
    finished: Vec<FinishedBucket>,
}

/// Counts of tasks by root handler and state, and the tasks that completed,
/// failed or were cancelled per bucket (default one minute) over the last
/// `window` (default one hour).
#[utoipa::path(get, path = "/api/v1/stats", tag = "tasks",
    params(("window" = Option<String>, Query, description = "how far back: `1h` (default), `10m`, ... at most `24h`"),
           ("bucket" = Option<String>, Query, description = "bucket length: `1m` (default), `10s`, ... at least `1s`, at most 1440 buckets per window")),
    responses((status = 200, body = Stats), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stats(
    State(state): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<Stats>> {
    let p = params(q, &["window", "bucket"])?;
    let window = p
        .duration("window", Duration::from_secs(86_400))?
        .unwrap_or(Duration::from_secs(3600));
    let bucket = p
        .duration("bucket", Duration::from_secs(86_400))?
        .unwrap_or(Duration::from_secs(60));
    if bucket < Duration::from_secs(1) {
        return Err(ApiError::bad_request(
            "query parameter `bucket`: must be at least 1s",
        ));
    }
    if window.as_millis() / bucket.as_millis() > 1440 {
        return Err(ApiError::bad_request(
            "query parameters `window` and `bucket`: more than 1440 buckets",
        ));
    }
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let bucket_ms = i64::try_from(bucket.as_millis()).unwrap_or(i64::MAX);
    let now = state.store.now().await?;
    let since = now.saturating_sub(window_ms);
    Ok(Json(Stats {
        now,
        since,
        bucket_ms,
        tasks: state.store.task_counts().await?,
        finished: state.store.finished_buckets(since, bucket_ms).await?,
    }))
}

/// Failed tasks of one root handler with one error message.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FailureGroupDoc {
    /// Root handler.
    handler: String,
    /// The error message (empty if none).
    message: String,
    /// How many failed tasks.
    count: u64,
    /// When the latest failed (ms since the Unix epoch).
    last_failed_at: i64,
}

/// Failure groups, largest first.
#[derive(Serialize, ToSchema)]
pub struct FailureGroups {
    #[schema(value_type = Vec<FailureGroupDoc>)]
    groups: Vec<FailureGroup>,
}

/// Failed tasks grouped by root handler and error message, the largest
/// groups first; retry a group with `POST /api/v1/tasks/retry` and its
/// `handler` and `message`.
#[utoipa::path(get, path = "/api/v1/failures", tag = "tasks",
    params(("limit" = Option<usize>, Query, description = "most groups, 1 to 1000, default 100")),
    responses((status = 200, body = FailureGroups), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn failure_groups(
    State(state): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<FailureGroups>> {
    let p = params(q, &["limit"])?;
    let limit = p.number("limit", 1, MAX_PAGE)?.unwrap_or(100);
    Ok(Json(FailureGroups {
        groups: state.store.failure_groups(limit).await?,
    }))
}

/// Delete finished tasks (with their steps and checkpoints) that finished
/// longer ago than `older_than`, in batches, as `switchyard cleanup` does.
/// Unfinished tasks are kept; cached events too, unless `events_older_than`
/// is given.
#[utoipa::path(post, path = "/api/v1/cleanup", tag = "maintenance",
    request_body = CleanupBody,
    responses((status = 200, body = CleanedUp), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cleanup(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<CleanedUp>> {
    let b: CleanupBody = typed(json_body(&state, body)?)?;
    let age_of = |field: &str, v: &Option<String>| -> ApiResult<Option<i64>> {
        v.as_deref()
            .map(|t| {
                parse_duration(t)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .map_err(|m| ApiError::bad_request(format!("request body: `{field}`: {m}")))
            })
            .transpose()
    };
    let task_age = age_of("older_than", &b.older_than)?;
    let event_age = age_of("events_older_than", &b.events_older_than)?;
    if task_age.is_none() && event_age.is_none() {
        return Err(ApiError::bad_request(
            "request body: give `older_than` (tasks), `events_older_than` (events) or both",
        ));
    }
    let batch = b.batch.unwrap_or(1000);
    if !(1..=100_000).contains(&batch) {
        return Err(ApiError::bad_request(format!(
            "request body: `batch` must be from 1 to 100000, not {batch}"
        )));
    }
    let now = state.store.now().await?;
    let mut deleted = 0;
    if let Some(age) = task_age {
        let before = now.saturating_sub(age);
        loop {
            let n = state.store.cleanup(before, batch).await?;
            if n == 0 {
                break;
            }
            deleted += n;
        }
    }
    let mut events_deleted = None;
    if let Some(age) = event_age {
        let before = now.saturating_sub(age);
        let mut total = 0;
        loop {
            let n = state.store.cleanup_events(before, batch).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        events_deleted = Some(total);
    }
    Ok(Json(CleanedUp {
        deleted,
        events_deleted,
    }))
}
