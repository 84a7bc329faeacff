//! `Switchyard::Native::Client`: spawn, emit, wait, cancel, retry, inspect.

use std::time::Duration;

use magnus::{function, method, prelude::*, Error, RArray, RHash, RModule, Ruby, Symbol, Value};
use serde_json::Value as Json;
use switchyard_core::bridge;
use switchyard_core::{Client, TaskFilter, TaskId, TaskState};

use crate::convert::{record_to_ruby, to_json, to_ruby};
use crate::errors::core_err;
use crate::{block, block_core, guard};

fn parse_id(ruby: &Ruby, id: &str) -> Result<TaskId, Error> {
    id.parse().map_err(|e| core_err(ruby, e))
}

/// Opens `url`, shared in the process with the other clients and workers
/// on the same URL (a forked child gets stores of its own: the registry is
/// per process).
pub(crate) fn open_store(ruby: &Ruby, url: &str) -> Result<switchyard_core::DynStore, Error> {
    crate::runtime(ruby)?;
    let url = url.trim().to_string();
    block_core(
        ruby,
        async move { switchyard_store::open_shared(&url).await },
    )
}

/// A task as JSON for the core's parser ([`bridge::new_task`]): a Hash
/// (symbol or string keys) converted as is, except a Time `run_at`, which
/// becomes epoch milliseconds. Anything else is converted as it is and the
/// core says what is wrong with it.
fn task_json(ruby: &Ruby, t: Value, what: &str) -> Result<Json, Error> {
    let Some(h) = RHash::from_value(t) else {
        return to_json(ruby, t, what);
    };
    let mut m = serde_json::Map::new();
    h.foreach(|k: Value, v: Value| {
        let key = match Symbol::from_value(k) {
            Some(s) => s.name()?.into_owned(),
            None => String::try_convert(k).map_err(|_| {
                Error::new(
                    ruby.exception_type_error(),
                    // SAFETY: the name is copied before any other Ruby call.
                    format!("{what}: keys must be strings or symbols, not {}", unsafe {
                        k.classname()
                    }),
                )
            })?,
        };
        let v = if key == "run_at" && v.is_kind_of(ruby.class_time()) {
            let secs: f64 = v.funcall::<_, _, Value>("to_r", ())?.funcall("to_f", ())?;
            Json::from((secs * 1000.0).floor() as i64)
        } else {
            to_json(ruby, v, &format!("{what}: `{key}`"))?
        };
        m.insert(key, v);
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    Ok(Json::Object(m))
}

fn timeout(ruby: &Ruby, t: f64) -> Result<Duration, Error> {
    switchyard_core::client::duration_from_secs("timeout", t).map_err(|e| core_err(ruby, e))
}

/// The client half of the API; thread-safe.
#[magnus::wrap(class = "Switchyard::Native::Client", free_immediately, size)]
pub struct RbClient {
    client: Client,
    /// The process that created it (see [`crate::check_owner`]).
    pid: u32,
}

impl Drop for RbClient {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Freed in a forked child: the store's threads are the parent's
            // and dropping it would wait for them forever. Leak it.
            std::mem::forget(self.client.clone());
        }
    }
}

impl RbClient {
    fn new(ruby: &Ruby, store: String, max_payload: Option<usize>) -> Result<Self, Error> {
        guard(ruby, || {
            let store = open_store(ruby, &store)?;
            let mut client = Client::new(store);
            if let Some(n) = max_payload {
                client = client.with_max_payload(n);
            }
            Ok(Self {
                client,
                pid: std::process::id(),
            })
        })
    }

    /// The client, refused in a process forked from the one that made it.
    fn client(&self, ruby: &Ruby) -> Result<Client, Error> {
        crate::check_owner(ruby, self.pid)?;
        Ok(self.client.clone())
    }

    fn store_url(&self) -> String {
        self.client.store().url()
    }

    /// `opts`: a task Hash ([`task_json`]) without the input, converted on
    /// its own so errors name it. Returns `[id, created]`.
    fn spawn(
        ruby: &Ruby,
        rb_self: &Self,
        opts: Value,
        input: Value,
    ) -> Result<(String, bool), Error> {
        guard(ruby, || {
            let mut o = task_json(ruby, opts, "task")?;
            let input = to_json(ruby, input, "input")?;
            if let Json::Object(m) = &mut o {
                m.insert("input".into(), input);
            }
            let t = bridge::new_task("task", o).map_err(|e| core_err(ruby, e))?;
            let c = rb_self.client(ruby)?;
            let s = block_core(ruby, async move { c.spawn_task(t).await })?;
            Ok((s.task_id.to_string(), s.created))
        })
    }

    /// `tasks`: Hashes with `handler`, `input` and optional `priority`,
    /// `idempotency_key`, `response_event`, `headers`, `run_at` (symbol or
    /// string keys; see [`task_json`]).
    fn spawn_many(ruby: &Ruby, rb_self: &Self, tasks: RArray) -> Result<Vec<String>, Error> {
        guard(ruby, || {
            let mut v = Vec::with_capacity(tasks.len());
            for i in 0..tasks.len() {
                let t: Value = tasks.entry(i as isize)?;
                v.push(task_json(ruby, t, &format!("task #{i}"))?);
            }
            let v = bridge::new_tasks(Json::Array(v)).map_err(|e| core_err(ruby, e))?;
            let c = rb_self.client(ruby)?;
            let out = block_core(ruby, async move { c.spawn_many(v).await })?;
            Ok(out.into_iter().map(|s| s.task_id.to_string()).collect())
        })
    }

    fn emit(ruby: &Ruby, rb_self: &Self, name: String, payload: Value) -> Result<bool, Error> {
        guard(ruby, || {
            let p = to_json(ruby, payload, "event payload")?;
            let c = rb_self.client(ruby)?;
            block_core(ruby, async move { c.emit(&name, p).await })
        })
    }

    fn get(ruby: &Ruby, rb_self: &Self, id: String) -> Result<Value, Error> {
        guard(ruby, || {
            let id = parse_id(ruby, &id)?;
            let c = rb_self.client(ruby)?;
            let t = block_core(ruby, async move { c.get(id).await })?;
            record_to_ruby(ruby, &t)
        })
    }

    fn inspect_task(ruby: &Ruby, rb_self: &Self, id: String) -> Result<Value, Error> {
        guard(ruby, || {
            let id = parse_id(ruby, &id)?;
            let c = rb_self.client(ruby)?;
            let t = block_core(ruby, async move { c.inspect(id).await })?;
            record_to_ruby(ruby, &t)
        })
    }

    fn list(
        ruby: &Ruby,
        rb_self: &Self,
        state: Option<String>,
        handler: Option<String>,
        limit: usize,
    ) -> Result<Value, Error> {
        guard(ruby, || {
            let state = match state {
                Some(s) => Some(s.parse::<TaskState>().map_err(|e| core_err(ruby, e))?),
                None => None,
            };
            let f = TaskFilter {
                state,
                handler,
                limit,
                ..TaskFilter::default()
            };
            let c = rb_self.client(ruby)?;
            let v = block_core(ruby, async move { c.list(&f).await })?;
            record_to_ruby(ruby, &v)
        })
    }

    fn wait(ruby: &Ruby, rb_self: &Self, id: String, t: f64) -> Result<Value, Error> {
        guard(ruby, || {
            let id = parse_id(ruby, &id)?;
            let d = timeout(ruby, t)?;
            let c = rb_self.client(ruby)?;
            let v = block_core(ruby, async move { c.wait(id, d).await })?;
            record_to_ruby(ruby, &v)
        })
    }

    fn result(ruby: &Ruby, rb_self: &Self, id: String, t: f64) -> Result<Value, Error> {
        guard(ruby, || {
            let id = parse_id(ruby, &id)?;
            let d = timeout(ruby, t)?;
            let c = rb_self.client(ruby)?;
            let v = block_core(ruby, async move { c.result(id, d).await })?;
            to_ruby(ruby, &v)
        })
    }

    fn await_event(ruby: &Ruby, rb_self: &Self, name: String, t: f64) -> Result<Value, Error> {
        guard(ruby, || {
            let d = timeout(ruby, t)?;
            let c = rb_self.client(ruby)?;
            let v = block_core(ruby, async move { c.await_event(&name, d).await })?;
            to_ruby(ruby, &v)
        })
    }

    fn cancel(ruby: &Ruby, rb_self: &Self, id: String, cascade: bool) -> Result<bool, Error> {
        guard(ruby, || {
            let id = parse_id(ruby, &id)?;
            let c = rb_self.client(ruby)?;
            block_core(ruby, async move { c.cancel(id, cascade).await })
        })
    }

    fn retry(ruby: &Ruby, rb_self: &Self, id: String) -> Result<(), Error> {
        guard(ruby, || {
            let id = parse_id(ruby, &id)?;
            let c = rb_self.client(ruby)?;
            block_core(ruby, async move { c.retry(id).await })
        })
    }

    fn workers(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        guard(ruby, || {
            let c = rb_self.client(ruby)?;
            let v = block_core(ruby, async move { c.workers().await })?;
            record_to_ruby(ruby, &v)
        })
    }

    fn events(
        ruby: &Ruby,
        rb_self: &Self,
        limit: usize,
        name: Option<String>,
    ) -> Result<Value, Error> {
        guard(ruby, || {
            let c = rb_self.client(ruby)?;
            let v = block_core(
                ruby,
                async move { c.events_named(name.as_deref(), limit).await },
            )?;
            record_to_ruby(ruby, &v)
        })
    }

    /// Number of steps per state (for progress and tests).
    fn count_steps(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        guard(ruby, || {
            let s = rb_self.client(ruby)?.store().clone();
            let v = block(ruby, async move { s.count_steps().await })?
                .map_err(|e| core_err(ruby, e))?;
            record_to_ruby(ruby, &v)
        })
    }
}

pub fn define(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let c = native.define_class("Client", ruby.class_object())?;
    c.define_singleton_method("new", function!(RbClient::new, 2))?;
    c.define_method("store_url", method!(RbClient::store_url, 0))?;
    c.define_method("spawn", method!(RbClient::spawn, 2))?;
    c.define_method("spawn_many", method!(RbClient::spawn_many, 1))?;
    c.define_method("emit", method!(RbClient::emit, 2))?;
    c.define_method("get", method!(RbClient::get, 1))?;
    c.define_method("inspect_task", method!(RbClient::inspect_task, 1))?;
    c.define_method("list", method!(RbClient::list, 3))?;
    c.define_method("wait", method!(RbClient::wait, 2))?;
    c.define_method("result", method!(RbClient::result, 2))?;
    c.define_method("await_event", method!(RbClient::await_event, 2))?;
    c.define_method("cancel", method!(RbClient::cancel, 2))?;
    c.define_method("retry", method!(RbClient::retry, 1))?;
    c.define_method("workers", method!(RbClient::workers, 0))?;
    c.define_method("events", method!(RbClient::events, 2))?;
    c.define_method("count_steps", method!(RbClient::count_steps, 0))?;
    Ok(())
}
