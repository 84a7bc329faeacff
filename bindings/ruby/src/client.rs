//! `Switchyard::Native::Client`: spawn, emit, wait, cancel, retry, inspect.

use std::time::Duration;

use magnus::{function, method, prelude::*, Error, RArray, RModule, Ruby, Value};
use serde_json::Value as Json;
use switchyard_core::{Client, NewTask, TaskFilter, TaskId, TaskState};

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

fn invalid(ruby: &Ruby, msg: String) -> Error {
    crate::errors::error(ruby, "InvalidInput", msg)
}

/// Builds a task from a JSON object with `handler`, `input` and optional
/// `priority`, `idempotency_key`, `response_event`, `headers`, `run_at_ms`.
fn task_from(ruby: &Ruby, v: Json, what: &str) -> Result<NewTask, Error> {
    let Json::Object(mut m) = v else {
        return Err(invalid(ruby, format!("{what} must be a Hash")));
    };
    let handler = match m.remove("handler") {
        Some(Json::String(h)) => h,
        Some(_) => return Err(invalid(ruby, format!("{what}: `handler` must be a String"))),
        None => return Err(invalid(ruby, format!("{what} has no `handler`"))),
    };
    let mut t = NewTask::new(handler, m.remove("input").unwrap_or(Json::Null));
    let s = |m: &mut serde_json::Map<String, Json>, k: &str| -> Result<Option<String>, Error> {
        match m.remove(k) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(ruby, format!("{what}: `{k}` must be a String"))),
        }
    };
    t.idempotency_key = s(&mut m, "idempotency_key")?;
    t.response_event = s(&mut m, "response_event")?;
    match m.remove("priority") {
        None | Some(Json::Null) => {}
        Some(p) => {
            t.priority = p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| {
                    invalid(ruby, format!("{what}: `priority` must be a 32-bit Integer"))
                })?
        }
    }
    match m.remove("run_at_ms") {
        None | Some(Json::Null) => {}
        Some(p) => {
            t.run_at = Some(p.as_i64().ok_or_else(|| {
                invalid(
                    ruby,
                    format!("{what}: `run_at` must be a Time or epoch milliseconds"),
                )
            })?)
        }
    }
    match m.remove("headers") {
        None | Some(Json::Null) => {}
        Some(Json::Object(h)) => {
            for (k, v) in h {
                match v {
                    Json::String(s) => {
                        t.headers.insert(k, s);
                    }
                    _ => {
                        return Err(invalid(
                            ruby,
                            format!("{what}: header `{k}` must be a String"),
                        ))
                    }
                }
            }
        }
        Some(_) => return Err(invalid(ruby, format!("{what}: `headers` must be a Hash"))),
    }
    if let Some(k) = m.keys().next() {
        return Err(invalid(ruby, format!("{what}: unknown option `{k}`")));
    }
    Ok(t)
}

/// A task from its options and its input, each converted with its own name.
fn task_with_input(
    ruby: &Ruby,
    opts: Value,
    input: Value,
    what: &str,
    input_what: &str,
) -> Result<NewTask, Error> {
    let mut o = to_json(ruby, opts, what)?;
    let input = to_json(ruby, input, input_what)?;
    if let Json::Object(m) = &mut o {
        m.insert("input".into(), input);
    }
    task_from(ruby, o, what)
}

fn key_name(k: Value) -> Result<String, Error> {
    if let Some(s) = magnus::Symbol::from_value(k) {
        return Ok(s.name()?.into_owned());
    }
    String::try_convert(k)
}

fn arg(ruby: &Ruby, msg: String) -> Error {
    Error::new(ruby.exception_arg_error(), msg)
}

/// Milliseconds since the epoch from a Time or an Integer.
fn epoch_ms(ruby: &Ruby, v: Value, what: &str) -> Result<i64, Error> {
    if let Some(i) = magnus::Integer::from_value(v) {
        return i.to_i64();
    }
    if v.is_kind_of(ruby.class_time()) {
        let secs: f64 = v.funcall::<_, _, Value>("to_r", ())?.funcall("to_f", ())?;
        return Ok((secs * 1000.0).floor() as i64);
    }
    Err(arg(
        ruby,
        format!("{what}: `run_at` must be a Time or epoch milliseconds"),
    ))
}

/// One task of `spawn_many` from a Ruby Hash.
fn task_from_hash(ruby: &Ruby, t: Value, i: usize) -> Result<NewTask, Error> {
    let what = format!("task #{i}");
    let h = magnus::RHash::from_value(t).ok_or_else(|| {
        arg(
            ruby,
            format!("{what} must be a Hash, not {}", unsafe { t.classname() }),
        )
    })?;
    let mut task = NewTask::new("", Json::Null);
    let mut handler = None;
    let opt_s = |v: Value, k: &str| -> Result<Option<String>, Error> {
        if v.is_nil() {
            Ok(None)
        } else {
            String::try_convert(v)
                .map(Some)
                .map_err(|_| arg(ruby, format!("{what}: `{k}` must be a String")))
        }
    };
    h.foreach(|k: Value, v: Value| {
        let key = key_name(k)?;
        match key.as_str() {
            "handler" => {
                handler = Some(match magnus::Symbol::from_value(v) {
                    Some(s) => s.name()?.into_owned(),
                    None => String::try_convert(v)
                        .map_err(|_| arg(ruby, format!("{what}: `handler` must be a String")))?,
                })
            }
            "input" => task.input = to_json(ruby, v, &format!("{what} input"))?,
            "priority" => {
                if !v.is_nil() {
                    task.priority = i32::try_convert(v).map_err(|_| {
                        arg(ruby, format!("{what}: `priority` must be a 32-bit Integer"))
                    })?
                }
            }
            "idempotency_key" => task.idempotency_key = opt_s(v, "idempotency_key")?,
            "response_event" => task.response_event = opt_s(v, "response_event")?,
            "run_at" => {
                if !v.is_nil() {
                    task.run_at = Some(epoch_ms(ruby, v, &what)?)
                }
            }
            "headers" => {
                if !v.is_nil() {
                    let Json::Object(m) = to_json(ruby, v, &format!("{what} headers"))? else {
                        return Err(arg(ruby, format!("{what}: `headers` must be a Hash")));
                    };
                    for (k, x) in m {
                        let Json::String(x) = x else {
                            return Err(arg(
                                ruby,
                                format!("{what}: header `{k}` must be a String"),
                            ));
                        };
                        task.headers.insert(k, x);
                    }
                }
            }
            other => return Err(arg(ruby, format!("{what}: unknown option `{other}`"))),
        }
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    task.handler = handler.ok_or_else(|| arg(ruby, format!("{what} has no `handler`")))?;
    Ok(task)
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

    /// `opts`: a Hash as for [`task_from`] without the input, converted on
    /// its own so errors name it. Returns `[id, created]`.
    fn spawn(
        ruby: &Ruby,
        rb_self: &Self,
        opts: Value,
        input: Value,
    ) -> Result<(String, bool), Error> {
        guard(ruby, || {
            let t = task_with_input(ruby, opts, input, "task", "input")?;
            let c = rb_self.client(ruby)?;
            let s = block_core(ruby, async move { c.spawn_task(t).await })?;
            Ok((s.task_id.to_string(), s.created))
        })
    }

    /// `tasks`: Hashes with `handler`, `input` and optional `priority`,
    /// `idempotency_key`, `response_event`, `headers`, `run_at` (symbol or
    /// string keys), read directly: spawning many tasks is a hot path.
    fn spawn_many(ruby: &Ruby, rb_self: &Self, tasks: RArray) -> Result<Vec<String>, Error> {
        guard(ruby, || {
            let mut v = Vec::with_capacity(tasks.len());
            for i in 0..tasks.len() {
                let t: Value = tasks.entry(i as isize)?;
                v.push(task_from_hash(ruby, t, i)?);
            }
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

    fn events(ruby: &Ruby, rb_self: &Self, limit: usize) -> Result<Value, Error> {
        guard(ruby, || {
            let c = rb_self.client(ruby)?;
            let v = block_core(ruby, async move { c.events(limit).await })?;
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
    c.define_method("cancel", method!(RbClient::cancel, 2))?;
    c.define_method("retry", method!(RbClient::retry, 1))?;
    c.define_method("workers", method!(RbClient::workers, 0))?;
    c.define_method("events", method!(RbClient::events, 1))?;
    c.define_method("count_steps", method!(RbClient::count_steps, 0))?;
    Ok(())
}
