//! `NativeClient`: spawn, emit, wait, cancel, retry, inspect. Every method is
//! async and resolves to an envelope (see [`crate::errors`]).

use std::time::Duration;

use napi_derive::napi;
use switchyard_core::bridge::{new_task, new_tasks};
use switchyard_core::{Client, DynStore, Error, NewTask, TaskFilter, TaskId, TaskState};

use crate::errors::{core, core_err, parse_env};

/// Opens (or reuses) the store at `url`.
pub(crate) async fn open_store(url: &str) -> switchyard_core::Result<DynStore> {
    switchyard_store::open_shared(url).await
}

fn parse_id(id: &str) -> Result<TaskId, String> {
    id.parse().map_err(|e: Error| core_err(&e))
}

/// One task from the TypeScript side (snake_case keys), checked by the
/// core's one parser (unknown keys and `parent` refused).
fn parse_task(what: &str, json: &str) -> Result<NewTask, String> {
    new_task(what, parse_env(what, json)?).map_err(|e| core_err(&e))
}

fn either(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| e)
}

/// The client half of the API.
#[napi]
pub struct NativeClient {
    client: Client,
}

#[napi]
impl NativeClient {
    /// Opens the store at `url`; resolves to an envelope whose `ok` is null
    /// (the client is usable once this resolved without error).
    #[napi(factory)]
    pub async fn open(url: String, max_payload_bytes: Option<u32>) -> napi::Result<NativeClient> {
        let store = open_store(&url)
            .await
            .map_err(|e| napi::Error::from_reason(core_err(&e)))?;
        let mut client = Client::new(store);
        if let Some(n) = max_payload_bytes {
            client = client.with_max_payload(n as usize);
        }
        Ok(NativeClient { client })
    }

    /// The store URL.
    #[napi(getter)]
    pub fn store_url(&self) -> String {
        self.client.store().url()
    }

    /// `task`: a task as JSON (see [`new_task`]). Resolves to `{task_id, created}`.
    #[napi]
    pub async fn spawn(&self, task: String) -> String {
        let c = self.client.clone();
        either(
            async move {
                let t = parse_task("spawn", &task)?;
                Ok(core(c.spawn_task(t).await))
            }
            .await,
        )
    }

    /// `tasks`: a JSON array of tasks (one string: one crossing and one
    /// parse for the whole batch). Resolves to `[{task_id, created}]`.
    #[napi]
    pub async fn spawn_many(&self, tasks: String) -> String {
        let c = self.client.clone();
        either(
            async move {
                let v = parse_env("spawnMany tasks", &tasks)?;
                let out = new_tasks(v).map_err(|e| core_err(&e))?;
                Ok(core(c.spawn_many(out).await))
            }
            .await,
        )
    }

    /// Emits an event; resolves to true if this call stored it.
    #[napi]
    pub async fn emit(&self, name: String, payload: String) -> String {
        let c = self.client.clone();
        either(
            async move {
                let p = parse_env("event payload", &payload)?;
                Ok(core(c.emit(&name, p).await))
            }
            .await,
        )
    }

    /// The task record.
    #[napi]
    pub async fn get(&self, id: String) -> String {
        let c = self.client.clone();
        either(async move { Ok(core(c.get(parse_id(&id)?).await)) }.await)
    }

    /// The task with its steps, attempts, checkpoints, waits and children.
    #[napi]
    pub async fn inspect(&self, id: String) -> String {
        let c = self.client.clone();
        either(async move { Ok(core(c.inspect(parse_id(&id)?).await)) }.await)
    }

    /// Task records, newest first.
    #[napi]
    pub async fn list(&self, state: Option<String>, handler: Option<String>, limit: u32) -> String {
        let c = self.client.clone();
        either(
            async move {
                let state = match state {
                    Some(s) => Some(s.parse::<TaskState>().map_err(|e| core_err(&e))?),
                    None => None,
                };
                let f = TaskFilter {
                    state,
                    handler,
                    limit: limit as usize,
                    ..TaskFilter::default()
                };
                Ok(core(c.list(&f).await))
            }
            .await,
        )
    }

    /// Waits until the task finished; resolves to its record.
    #[napi]
    pub async fn wait(&self, id: String, timeout_secs: f64) -> String {
        let c = self.client.clone();
        either(
            async move {
                let id = parse_id(&id)?;
                let timeout = match secs("timeout", timeout_secs) {
                    Ok(t) => t,
                    Err(e) => return Ok(core::<()>(Err(e))),
                };
                Ok(core(c.wait(id, timeout).await))
            }
            .await,
        )
    }

    /// Waits until the task finished; resolves to its result, or an error
    /// if it failed, was cancelled or did not finish in time.
    #[napi]
    pub async fn result(&self, id: String, timeout_secs: f64) -> String {
        let c = self.client.clone();
        either(
            async move {
                let id = parse_id(&id)?;
                let timeout = match secs("timeout", timeout_secs) {
                    Ok(t) => t,
                    Err(e) => return Ok(core::<()>(Err(e))),
                };
                Ok(core(c.result(id, timeout).await))
            }
            .await,
        )
    }

    /// Waits, from outside any task, until event `name` is emitted; its
    /// payload (see [`switchyard_core::Client::await_event`]).
    #[napi]
    pub async fn await_event(&self, name: String, timeout_secs: f64) -> String {
        let c = self.client.clone();
        either(
            async move {
                let timeout = match secs("timeout", timeout_secs) {
                    Ok(t) => t,
                    Err(e) => return Ok(core::<()>(Err(e))),
                };
                Ok(core(c.await_event(&name, timeout).await))
            }
            .await,
        )
    }

    /// Cancels a task (and its children with `cascade`).
    #[napi]
    pub async fn cancel(&self, id: String, cascade: bool) -> String {
        let c = self.client.clone();
        either(async move { Ok(core(c.cancel(parse_id(&id)?, cascade).await)) }.await)
    }

    /// Makes a failed or cancelled task run again.
    #[napi]
    pub async fn retry(&self, id: String) -> String {
        let c = self.client.clone();
        either(async move { Ok(core(c.retry(parse_id(&id)?).await)) }.await)
    }

    /// Hosts seen by the store.
    #[napi]
    pub async fn workers(&self) -> String {
        let c = self.client.clone();
        core(c.workers().await)
    }

    /// Recent events.
    #[napi]
    pub async fn events(&self, limit: u32, name: Option<String>) -> String {
        let c = self.client.clone();
        core(c.events_named(name.as_deref(), limit as usize).await)
    }

    /// Number of steps per state.
    #[napi]
    pub async fn count_steps(&self) -> String {
        let s = self.client.store().clone();
        core(s.count_steps().await)
    }
}

/// Seconds from JS, refused (InvalidInput naming `what`) when negative,
/// NaN, infinite or over the core's maximum.
pub(crate) fn secs(what: &str, s: f64) -> switchyard_core::Result<Duration> {
    switchyard_core::client::duration_from_secs(what, s)
}
