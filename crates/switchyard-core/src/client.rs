//! The [`Client`]: spawn tasks, emit events, wait for results, cancel,
//! retry and inspect. Validation of everything that enters the store happens
//! here, so bad input never reaches it.

use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::*;
use crate::store::DynStore;

pub use crate::validate::*;

/// Spawns and inspects tasks.
#[derive(Clone)]
pub struct Client {
    store: DynStore,
    max_payload: usize,
}

impl Client {
    /// A client on `store` with the default payload limit.
    pub fn new(store: DynStore) -> Self {
        Self {
            store,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Sets the payload limit.
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// The store.
    pub fn store(&self) -> &DynStore {
        &self.store
    }

    fn validate(&self, t: &NewTask) -> Result<()> {
        validate_name("handler name", &t.handler)?;
        check_size("input", &t.input, self.max_payload)?;
        if let Some(k) = &t.idempotency_key {
            validate_name("idempotency key", k)?;
        }
        if let Some(e) = &t.response_event {
            validate_name("response event", e)?;
        }
        for (k, v) in &t.headers {
            validate_name("header name", k)?;
            if v.len() > 8192 {
                return Err(Error::InvalidInput(format!(
                    "header `{k}` is longer than 8192 bytes"
                )));
            }
            // Header values are stored as text: NUL (which PostgreSQL text
            // cannot hold) and other control characters are refused here,
            // tabs allowed as in HTTP header values.
            if v.chars().any(|c| c.is_control() && c != '\t') {
                return Err(Error::InvalidInput(format!(
                    "header `{k}` value `{}` contains control characters",
                    v.escape_debug()
                )));
            }
        }
        Ok(())
    }

    /// Spawns a task for `handler` with `input`.
    pub async fn spawn(&self, handler: &str, input: Value) -> Result<TaskId> {
        Ok(self.spawn_task(NewTask::new(handler, input)).await?.task_id)
    }

    /// Spawns one task with all options.
    pub async fn spawn_task(&self, task: NewTask) -> Result<Spawned> {
        self.validate(&task)?;
        let mut v = self.store.spawn(vec![task]).await?;
        v.pop()
            .ok_or_else(|| Error::Store("spawn returned no answer".into()))
    }

    /// Spawns many tasks in one write. Every task is validated first; if
    /// any is invalid nothing is spawned and the error names its index.
    pub async fn spawn_many(&self, tasks: Vec<NewTask>) -> Result<Vec<Spawned>> {
        for (i, t) in tasks.iter().enumerate() {
            self.validate(t).map_err(|e| match e {
                Error::InvalidInput(m) => Error::InvalidInput(format!("task #{i}: {m}")),
                Error::PayloadTooLarge { what, size, limit } => Error::PayloadTooLarge {
                    what: format!("task #{i} {what}"),
                    size,
                    limit,
                },
                other => other,
            })?;
        }
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.store.spawn(tasks).await
    }

    /// Emits an event (first write wins); returns true if this call stored it.
    pub async fn emit(&self, name: &str, payload: Value) -> Result<bool> {
        validate_name("event name", name)?;
        check_size("event payload", &payload, self.max_payload)?;
        self.store.emit_event(name, payload).await
    }

    /// A task.
    pub async fn get(&self, id: TaskId) -> Result<TaskRecord> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    /// A task with its steps, checkpoints and children.
    pub async fn inspect(&self, id: TaskId) -> Result<TaskDetail> {
        self.store
            .task_detail(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    /// Tasks, newest first.
    pub async fn list(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
        self.store.list_tasks(filter).await
    }

    /// Waits until the task finishes (or `timeout` passes) and returns it.
    /// In-process completions wake the wait at once; others are seen by
    /// polling the store.
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<TaskRecord> {
        let deadline = tokio::time::Instant::now() + check_duration("wait timeout", timeout)?;
        let signals = self.store.signals().clone();
        let finished = poll_until(
            &self.store,
            &signals.finished,
            deadline,
            move || async move {
                let t = self.get(id).await?;
                Ok(t.state.is_terminal().then_some(t))
            },
        )
        .await?;
        match finished {
            Some(t) => Ok(t),
            None => {
                let t = self.get(id).await?;
                Err(Error::Timeout(format!(
                    "task {id} is still {} after {} ms",
                    t.state,
                    timeout.as_millis()
                )))
            }
        }
    }

    /// Waits for the task and returns its result. A failed task is
    /// [`Error::TaskFailed`] (its recorded error), a cancelled one
    /// [`Error::TaskCancelled`].
    pub async fn result(&self, id: TaskId, timeout: Duration) -> Result<Value> {
        outcome(self.wait(id, timeout).await?)
    }

    /// Cancels a task (and, with `cascade`, its descendants). Returns false
    /// if it had already finished.
    pub async fn cancel(&self, id: TaskId, cascade: bool) -> Result<bool> {
        self.store.cancel_task(id, cascade).await
    }

    /// Re-runs a failed or cancelled task.
    pub async fn retry(&self, id: TaskId) -> Result<()> {
        self.store.retry_task(id).await
    }

    /// Retries the failed tasks `filter` matches (its `state` is taken as
    /// `failed`), newest first, at most `filter.limit`; with `message`, only
    /// those whose recorded error message is exactly that (a failure group).
    /// Each retry is its own atomic write: a task retried or deleted
    /// meanwhile by someone else is reported in `skipped`, not an error of
    /// the whole call. `progress(done, matched)` is called after each task.
    /// Used by `switchyard retry --failed` and `POST /api/v1/tasks/retry`.
    pub async fn retry_failed(
        &self,
        filter: &TaskFilter,
        message: Option<&str>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<BulkRetry> {
        let max = filter.limit;
        let mut filter = TaskFilter {
            state: Some(TaskState::Failed),
            ..filter.clone()
        };
        let tasks = match message {
            None => self.list(&filter).await?,
            Some(message) => {
                // Pages of failed tasks, keeping those with the message,
                // until `max` are found or none are left.
                let mut found = Vec::new();
                filter.limit = RETRY_SCAN_PAGE;
                loop {
                    let page = self.list(&filter).await?;
                    let last = page.last().map(|t| t.id);
                    let full = page.len() == filter.limit;
                    found.extend(
                        page.into_iter()
                            .filter(|t| t.error.as_ref().is_some_and(|e| e.message == message)),
                    );
                    if found.len() >= max || !full {
                        break;
                    }
                    filter.after = last;
                }
                found.truncate(max);
                found
            }
        };
        let mut out = BulkRetry {
            matched: tasks.len(),
            retried: 0,
            skipped: Vec::new(),
        };
        for (i, t) in tasks.iter().enumerate() {
            match self.retry(t.id).await {
                Ok(()) => out.retried += 1,
                Err(e @ (Error::Conflict(_) | Error::NotFound(_))) => {
                    out.skipped.push((t.id, e.to_string()))
                }
                Err(e) => return Err(e),
            }
            progress(i + 1, tasks.len());
        }
        Ok(out)
    }

    /// Registered hosts.
    pub async fn workers(&self) -> Result<Vec<HostInfo>> {
        self.store.list_hosts().await
    }

    /// Cached events, newest first.
    pub async fn events(&self, limit: usize) -> Result<Vec<EventRecord>> {
        self.store.list_events(limit).await
    }

    /// [`Self::events`] whose name starts with `prefix` (all of them for
    /// `None` or an empty prefix), as `switchyard events list --name` and
    /// the REST API's `name` filter: every language's `Client.events`
    /// takes it.
    pub async fn events_named(
        &self,
        prefix: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRecord>> {
        match prefix.filter(|p| !p.is_empty()) {
            None => self.store.list_events(limit).await,
            Some(p) => self.store.list_events_prefixed(p, limit).await,
        }
    }

    /// Waits, from outside any task, until event `name` has been emitted
    /// and returns its payload (at once if it already was: events are kept,
    /// first emit wins, as for `ctx.await_event`). A caller waits for a
    /// task's `response_event` this way without polling. Not emitted within
    /// `timeout`: [`Error::Timeout`]. Wakes on the store's signals (a
    /// PostgreSQL NOTIFY, an emit in this process) and polls at most every
    /// 100 ms otherwise.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting.
    pub async fn await_event(&self, name: &str, timeout: Duration) -> Result<Value> {
        validate_name("event name", name)?;
        let deadline =
            tokio::time::Instant::now() + check_duration("await_event timeout", timeout)?;
        let signals = self.store.signals().clone();
        // An in-process emit wakes the steps waiting for it through `ready`.
        let store = &self.store;
        let event = poll_until(store, &signals.ready, deadline, move || async move {
            Ok(store.get_event(name).await?.map(|e| e.payload))
        })
        .await?;
        event.ok_or_else(|| {
            Error::Timeout(format!(
                "event `{name}` was not emitted within {} ms",
                timeout.as_millis()
            ))
        })
    }
}

/// Reads `check` until it answers `Some`: again as soon as `wake` is
/// notified (a change made in this process) and at least every poll
/// interval (at most 100 ms: changes made by other processes), until
/// `deadline` (then `None`). The loop of every wait of the client
/// ([`Client::wait`], [`Client::await_event`]) and of the REST API's
/// long-polls.
pub async fn poll_until<T, F, Fut>(
    store: &DynStore,
    wake: &tokio::sync::Notify,
    deadline: tokio::time::Instant,
    mut check: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let poll = store.poll_interval().min(Duration::from_millis(100));
    loop {
        // Registered before the read, so a change between the read and the
        // sleep still wakes it.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if let Some(found) = check().await? {
            return Ok(Some(found));
        }
        // Biased (as every select in the core): no hidden random choice,
        // so the simulation replays a seed exactly.
        tokio::select! {
            biased;
            _ = &mut woken => {},
            _ = tokio::time::sleep(poll) => {},
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
        }
    }
}

/// A finished task's outcome: its result, or the error that ended it
/// ([`Error::TaskFailed`], [`Error::TaskCancelled`]). Every binding's
/// `result()` goes through this.
pub fn outcome(t: TaskRecord) -> Result<Value> {
    match t.state {
        TaskState::Completed => Ok(t.result.unwrap_or(Value::Null)),
        TaskState::Cancelled => Err(Error::TaskCancelled {
            task: t.id,
            message: t
                .error
                .map(|e| e.message)
                .unwrap_or_else(|| "cancelled".into()),
        }),
        TaskState::Failed => {
            Err(Error::TaskFailed {
                task: t.id,
                error: Box::new(t.error.unwrap_or_else(|| {
                    ErrorInfo::new(ErrorKind::Permanent, "no error was recorded")
                })),
            })
        }
        state => Err(Error::Conflict(format!(
            "task {} is still {state}: it has no outcome yet",
            t.id
        ))),
    }
}

/// Failed tasks read per page by [`Client::retry_failed`] when it looks for
/// a message.
const RETRY_SCAN_PAGE: usize = 1000;

/// What [`Client::retry_failed`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BulkRetry {
    /// Failed tasks found (at most the filter's limit).
    pub matched: usize,
    /// Of them, retried now.
    pub retried: usize,
    /// The others (retried or deleted meanwhile by someone else), with why.
    pub skipped: Vec<(TaskId, String)>,
}
