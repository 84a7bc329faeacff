//! `Switchyard::Context`: the durable context of one step run. Every
//! operation waits for the core without the GVL; `lib/switchyard/context.rb`
//! adds the block forms (`checkpoint(name) { ... }`) on top of the
//! `_checkpoint_lookup` / `_checkpoint_save` pair, because the block is Ruby
//! code.

use std::time::Duration;

use magnus::{method, prelude::*, Error, RArray, RModule, Ruby, Value};
use switchyard_core::{ChildSpec, Context};

use crate::convert::{record_to_ruby, to_json, to_ruby};
use crate::{block_step, guard};

/// Seconds from Ruby for a durable operation, refused with
/// `Switchyard::InvalidInput` when negative, NaN, infinite or over the
/// core's maximum.
fn in_secs(ruby: &Ruby, what: &str, s: f64) -> Result<Duration, Error> {
    switchyard_core::client::duration_from_secs(what, s)
        .map_err(|e| crate::errors::core_err(ruby, e))
}

/// Durable context handle given to Ruby handlers.
#[magnus::wrap(class = "Switchyard::Context", free_immediately, size)]
pub struct RbContext {
    ctx: Context,
}

impl RbContext {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }

    fn task_id(&self) -> String {
        self.ctx.task_id().to_string()
    }
    fn step_id(&self) -> String {
        self.ctx.step_id().to_string()
    }
    fn step_name(&self) -> String {
        self.ctx.step_name().to_string()
    }
    fn handler(&self) -> String {
        self.ctx.handler().to_string()
    }
    fn attempt(&self) -> u32 {
        self.ctx.attempt()
    }
    fn run(&self) -> u64 {
        self.ctx.run()
    }
    fn priority(&self) -> i32 {
        self.ctx.priority()
    }
    fn headers(&self) -> std::collections::HashMap<String, String> {
        self.ctx.headers().clone().into_iter().collect()
    }
    /// Seconds left before the handler's timeout, or nil.
    fn time_left(&self) -> Option<f64> {
        self.ctx.time_left().map(|d| d.as_secs_f64())
    }
    fn is_cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    fn set_status(ruby: &Ruby, rb_self: &Self, status: String) -> Result<(), Error> {
        rb_self
            .ctx
            .set_status(&status)
            .map_err(|e| crate::errors::step_err(ruby, &rb_self.ctx, e))
    }

    /// `[key, found, value]` for checkpoint `name` (numbered by call order).
    fn checkpoint_lookup(ruby: &Ruby, rb_self: &Self, name: String) -> Result<RArray, Error> {
        guard(ruby, || {
            let ctx = rb_self.ctx.clone();
            let (key, v) = block_step(ruby, &rb_self.ctx, async move {
                ctx.checkpoint_lookup(&name).await
            })?;
            let out = ruby.ary_new_capa(3);
            out.push(key)?;
            match v {
                Some(v) => {
                    out.push(true)?;
                    out.push(to_ruby(ruby, &v)?)?;
                }
                None => {
                    out.push(false)?;
                    out.push(ruby.qnil())?;
                }
            }
            Ok(out)
        })
    }

    /// Stores the checkpoint and returns the value as a replay will see it
    /// (JSON round trip: string keys), so first runs and replays agree.
    fn checkpoint_save(
        ruby: &Ruby,
        rb_self: &Self,
        key: String,
        value: Value,
    ) -> Result<Value, Error> {
        guard(ruby, || {
            let v = to_json(ruby, value, &format!("checkpoint `{key}` value"))?;
            let back = to_ruby(ruby, &v)?;
            let ctx = rb_self.ctx.clone();
            block_step(ruby, &rb_self.ctx, async move {
                ctx.checkpoint_save(&key, v).await
            })?;
            Ok(back)
        })
    }

    fn await_event(
        ruby: &Ruby,
        rb_self: &Self,
        name: String,
        timeout: Option<f64>,
    ) -> Result<Value, Error> {
        guard(ruby, || {
            let t = match timeout {
                Some(s) => Some(in_secs(ruby, "await_event timeout", s)?),
                None => None,
            };
            let ctx = rb_self.ctx.clone();
            let v = block_step(ruby, &rb_self.ctx, async move {
                ctx.await_event(&name, t).await
            })?;
            to_ruby(ruby, &v)
        })
    }

    fn sleep(ruby: &Ruby, rb_self: &Self, seconds: f64) -> Result<(), Error> {
        guard(ruby, || {
            let d: Duration = in_secs(ruby, "sleep duration", seconds)?;
            let ctx = rb_self.ctx.clone();
            block_step(ruby, &rb_self.ctx, async move { ctx.sleep(d).await })
        })
    }

    fn sleep_until_ms(ruby: &Ruby, rb_self: &Self, at_ms: i64) -> Result<(), Error> {
        guard(ruby, || {
            let ctx = rb_self.ctx.clone();
            block_step(
                ruby,
                &rb_self.ctx,
                async move { ctx.sleep_until(at_ms).await },
            )
        })
    }

    fn emit_event(
        ruby: &Ruby,
        rb_self: &Self,
        name: String,
        payload: Value,
    ) -> Result<bool, Error> {
        guard(ruby, || {
            let p = to_json(ruby, payload, "event payload")?;
            let ctx = rb_self.ctx.clone();
            block_step(
                ruby,
                &rb_self.ctx,
                async move { ctx.emit_event(&name, p).await },
            )
        })
    }

    fn spawn(
        ruby: &Ruby,
        rb_self: &Self,
        handler: String,
        input: Value,
        response_event: Option<String>,
    ) -> Result<String, Error> {
        guard(ruby, || {
            let i = to_json(ruby, input, "child input")?;
            let ctx = rb_self.ctx.clone();
            let mut opts = switchyard_core::SpawnOptions::default();
            opts.response_event = response_event;
            let id = block_step(ruby, &rb_self.ctx, async move {
                ctx.spawn_with(&handler, i, opts).await
            })?;
            Ok(id.to_string())
        })
    }

    fn delegate(
        ruby: &Ruby,
        rb_self: &Self,
        handler: String,
        input: Value,
    ) -> Result<Value, Error> {
        guard(ruby, || {
            let i = to_json(ruby, input, "child input")?;
            let ctx = rb_self.ctx.clone();
            let v = block_step(ruby, &rb_self.ctx, async move {
                ctx.delegate(&handler, i).await
            })?;
            to_ruby(ruby, &v)
        })
    }

    /// `children`: `[[handler, input], ...]`. Returns one Hash per child
    /// (`task_id`, `state`, `result`, `error`), in order.
    fn delegate_parallel(ruby: &Ruby, rb_self: &Self, children: RArray) -> Result<Value, Error> {
        guard(ruby, || {
            let mut specs = Vec::with_capacity(children.len());
            for i in 0..children.len() {
                let pair: RArray = children.entry(i as isize)?;
                let handler: String = pair.entry(0)?;
                let input: Value = pair.entry(1)?;
                specs.push(ChildSpec::new(
                    handler,
                    to_json(ruby, input, &format!("child #{i} input"))?,
                ));
            }
            let ctx = rb_self.ctx.clone();
            let out = block_step(ruby, &rb_self.ctx, async move {
                ctx.delegate_parallel(specs).await
            })?;
            record_to_ruby(ruby, &out)
        })
    }

    fn heartbeat(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        guard(ruby, || {
            let ctx = rb_self.ctx.clone();
            block_step(ruby, &rb_self.ctx, async move { ctx.heartbeat().await })
        })
    }

    fn dependency_results(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        guard(ruby, || {
            let ctx = rb_self.ctx.clone();
            let v = block_step(
                ruby,
                &rb_self.ctx,
                async move { ctx.dependency_results().await },
            )?;
            record_to_ruby(ruby, &v)
        })
    }
}

pub fn define(ruby: &Ruby, switchyard: RModule) -> Result<(), Error> {
    let c = switchyard.define_class("Context", ruby.class_object())?;
    c.define_method("task_id", method!(RbContext::task_id, 0))?;
    c.define_method("step_id", method!(RbContext::step_id, 0))?;
    c.define_method("step_name", method!(RbContext::step_name, 0))?;
    c.define_method("handler", method!(RbContext::handler, 0))?;
    c.define_method("attempt", method!(RbContext::attempt, 0))?;
    c.define_method("run", method!(RbContext::run, 0))?;
    c.define_method("priority", method!(RbContext::priority, 0))?;
    c.define_method("headers", method!(RbContext::headers, 0))?;
    c.define_method("time_left", method!(RbContext::time_left, 0))?;
    c.define_method("cancelled?", method!(RbContext::is_cancelled, 0))?;
    c.define_method("_set_status", method!(RbContext::set_status, 1))?;
    c.define_method(
        "_checkpoint_lookup",
        method!(RbContext::checkpoint_lookup, 1),
    )?;
    c.define_method("_checkpoint_save", method!(RbContext::checkpoint_save, 2))?;
    c.define_method("_await_event", method!(RbContext::await_event, 2))?;
    c.define_method("_sleep", method!(RbContext::sleep, 1))?;
    c.define_method("_sleep_until_ms", method!(RbContext::sleep_until_ms, 1))?;
    c.define_method("_emit_event", method!(RbContext::emit_event, 2))?;
    c.define_method("_spawn", method!(RbContext::spawn, 3))?;
    c.define_method("_delegate", method!(RbContext::delegate, 2))?;
    c.define_method(
        "_delegate_parallel",
        method!(RbContext::delegate_parallel, 1),
    )?;
    c.define_method("heartbeat", method!(RbContext::heartbeat, 0))?;
    c.define_method(
        "dependency_results",
        method!(RbContext::dependency_results, 0),
    )?;
    Ok(())
}
