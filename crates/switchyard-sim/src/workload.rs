//! The workload: scripted handlers (one interpreter runs a JSON list of
//! durable operations), a decision handler with fan-out and convergence,
//! and the generator of scripts from the run's RNG.
//!
//! Every checkpoint body returns `{"cp": "<step>/<op index>"}`, unique per
//! (task, step, call site), so a replay that hands a step another
//! checkpoint's value is caught by comparing it with its own id, and the
//! store wrapper can tell which body a committed value belongs to.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_core::{
    ChildSpec, Context, Decision, DynStore, HandlerOptions, NewStep, RetryPolicy, StepError,
    StepResult, TaskState, Worker,
};

use crate::rng::SplitMix64;
use crate::world::{body, Expect, RunTag, World};

/// Which workload features that provoke known bugs to generate (all on by
/// default; switch one off to look for other failures behind it).
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// Checkpoint and event names that collide under `{step}/{name}#n`
    /// replay keys (`x` twice then `x#2`, steps `s` + `a/b` vs `s/a` + `b`,
    /// `await(e, timeout)` then `await(e:deadline)`).
    pub collisions: bool,
    /// Steps on the default retry policy (5 attempts) that suspend more
    /// than 5 times in sequence.
    pub many_waits: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            collisions: true,
            many_waits: true,
        }
    }
}

/// Attempts of the handlers on the generous policy (`wf`, `decide`, `join`).
pub const GENEROUS_ATTEMPTS: u32 = 40;

/// The retry budget of a handler.
pub fn max_attempts(handler: &str) -> u32 {
    if handler == "wf5" {
        RetryPolicy::default().max_attempts
    } else {
        GENEROUS_ATTEMPTS
    }
}

fn ops(v: &Value) -> &[Value] {
    v.get("ops").and_then(Value::as_array).map_or(&[], |a| a)
}

fn fails(script: &Value) -> bool {
    ops(script)
        .iter()
        .any(|o| o["op"].as_str() == Some("fail_perm"))
}

/// What a task with this root handler and input should end as.
pub fn expect_of(handler: &str, input: &Value) -> Expect {
    let failing = match handler {
        "decide" => input["branches"]
            .as_array()
            .is_some_and(|b| b.iter().any(fails)),
        _ => fails(input),
    };
    if failing {
        Expect::Failed
    } else {
        Expect::Completed
    }
}

/// Generates scripts, collecting every event name they wait for.
pub struct Gen<'a> {
    /// The run's RNG.
    pub r: &'a mut SplitMix64,
    /// Feature switches.
    pub knobs: Knobs,
    /// Events the generated scripts wait for.
    pub events: BTreeSet<String>,
}

const EVENTS: &[&str] = &["e0", "e1", "e2", "e3", "e4", "e5"];

impl Gen<'_> {
    fn event(&mut self) -> String {
        let e = self.r.pick(EVENTS).to_string();
        self.events.insert(e.clone());
        e
    }

    /// A random script for `wf`; children only while `depth < 2`.
    pub fn script(&mut self, depth: u32) -> Value {
        let n = self.r.range(1, 6);
        let mut ops = Vec::new();
        for _ in 0..n {
            let k = self.r.below(100);
            let op = match k {
                0..=21 => {
                    let names: &[&str] = if self.knobs.collisions {
                        &["x", "x", "y", "a/b", "x#2", "z"]
                    } else {
                        &["x", "x", "y", "z"]
                    };
                    json!({"op": "cp", "name": self.r.pick(names)})
                }
                22..=31 => json!({"op": "emit", "event": self.event()}),
                32..=43 => {
                    let ev = self.event();
                    if self.r.chance(0.5) {
                        json!({"op": "await", "event": ev, "timeout_ms": self.r.range(100, 5000)})
                    } else {
                        json!({"op": "await", "event": ev})
                    }
                }
                44..=51 => json!({"op": "sleep", "ms": self.r.range(10, 3000)}),
                52..=57 if depth < 2 => json!({"op": "spawn", "child": self.script(depth + 1)}),
                58..=63 if depth < 2 => json!({"op": "delegate", "child": self.script(depth + 1)}),
                64..=67 if depth < 2 => {
                    let k = self.r.range(2, 3);
                    let children: Vec<Value> = (0..k).map(|_| self.script(depth + 1)).collect();
                    json!({"op": "delegate_par", "children": children})
                }
                68..=75 => json!({"op": "fail_retry", "times": self.r.range(1, 3)}),
                76..=79 => json!({"op": "panic_once"}),
                80..=82 => json!({"op": "fail_perm"}),
                _ => json!({"op": "work", "ms": self.r.range(0, 4000)}),
            };
            ops.push(op);
        }
        if self.knobs.collisions && self.r.chance(0.15) {
            // The same name twice, then a name that looks like its repeat key.
            ops.push(json!({"op": "cp", "name": "x"}));
            ops.push(json!({"op": "cp", "name": "x"}));
            ops.push(json!({"op": "cp", "name": "x#2"}));
        }
        if self.knobs.collisions && self.r.chance(0.15) {
            // An await with a timeout, then one for an event named like its
            // deadline entry.
            let ev = self.event();
            let dl = format!("{ev}:deadline");
            self.events.insert(dl.clone());
            ops.push(json!({"op": "await", "event": ev, "timeout_ms": self.r.range(100, 3000)}));
            ops.push(json!({"op": "await", "event": dl}));
        }
        json!({ "ops": ops })
    }

    /// A `wf5` script: waits (events and sleeps) in sequence, more than the
    /// default 5 attempts when `many_waits`.
    pub fn waits(&mut self) -> Value {
        let n = if self.knobs.many_waits {
            self.r.range(6, 9)
        } else {
            self.r.range(1, 4)
        };
        let mut ops = Vec::new();
        for i in 0..n {
            if i % 2 == 0 {
                let ev = self.event();
                ops.push(json!({"op": "await", "event": ev}));
            } else {
                ops.push(json!({"op": "sleep", "ms": self.r.range(50, 2000)}));
            }
            if self.r.chance(0.3) {
                ops.push(json!({"op": "cp", "name": "w"}));
            }
        }
        json!({ "ops": ops })
    }

    /// Input of a `decide` root: branches run in parallel, then `join`.
    pub fn decision(&mut self) -> Value {
        let k = self.r.range(2, 4);
        let branches: Vec<Value> = (0..k).map(|_| self.script(1)).collect();
        let tricky = self.knobs.collisions && self.r.chance(0.4);
        json!({"branches": branches, "tricky": tricky})
    }
}

fn tag_of(ctx: &Context) -> RunTag {
    RunTag {
        task: ctx.task_id(),
        step: ctx.step_id(),
        attempt: ctx.attempt(),
        run: ctx.run(),
        host_id: ctx.lease().host_id.clone(),
    }
}

/// A crashed host runs nothing more.
async fn alive(w: &World, host: usize) {
    if w.crashed(host) {
        std::future::pending::<()>().await;
    }
}

/// The script interpreter behind `wf` and `wf5`.
async fn interpret(w: Arc<World>, host: usize, input: Value, ctx: Context) -> StepResult {
    let step = ctx.step_name().to_string();
    let task = ctx.task_id();
    for (i, op) in ops(&input).iter().enumerate() {
        alive(&w, host).await;
        let site = format!("{task}/{step}/{i}");
        match op["op"].as_str().unwrap_or("") {
            "cp" => {
                let name = op["name"].as_str().unwrap_or("x");
                let lid = format!("{step}/{i}");
                let (w2, lid2) = (w.clone(), lid.clone());
                let v: Value = ctx
                    .checkpoint(name, || async move {
                        w2.cp_body(task, &lid2);
                        Ok(json!({ "cp": lid2 }))
                    })
                    .await?;
                if v != json!({ "cp": lid }) {
                    w.violation(
                        "checkpoint-collision",
                        format!("checkpoint `{name}` (call site {lid}) of task {task} returned another checkpoint's value {v}"),
                    );
                }
            }
            "emit" => {
                let ev = op["event"].as_str().unwrap_or("e0");
                ctx.emit_event(ev, json!({ "event": ev })).await?;
            }
            "await" => {
                let ev = op["event"].as_str().unwrap_or("e0");
                let timeout = op["timeout_ms"].as_u64().map(Duration::from_millis);
                match ctx.await_event(ev, timeout).await {
                    Ok(p) => {
                        if p != json!({ "event": ev }) {
                            w.violation(
                                "await-collision",
                                format!("await_event(`{ev}`) at {step}/{i} of task {task} returned {p}, the payload of another event"),
                            );
                        }
                    }
                    Err(StepError::AwaitTimeout { .. }) if timeout.is_some() => {}
                    Err(StepError::AwaitTimeout { .. }) => {
                        w.violation(
                            "await-collision",
                            format!("await_event(`{ev}`) without a timeout at {step}/{i} of task {task} timed out (it read another wait's entry)"),
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
            "sleep" => {
                ctx.sleep(Duration::from_millis(op["ms"].as_u64().unwrap_or(10)))
                    .await?;
            }
            "spawn" => {
                ctx.spawn("wf", op["child"].clone()).await?;
            }
            "delegate" => match ctx.delegate("wf", op["child"].clone()).await {
                Ok(_) | Err(StepError::Permanent { .. }) => {}
                Err(e) => return Err(e),
            },
            "delegate_par" => {
                let children: Vec<ChildSpec> = op["children"]
                    .as_array()
                    .map(|cs| cs.iter().map(|c| ChildSpec::new("wf", c.clone())).collect())
                    .unwrap_or_default();
                let n = children.len();
                let outs = ctx.delegate_parallel(children).await?;
                if outs.len() != n || outs.iter().any(|o| o.state == TaskState::Running) {
                    w.violation(
                        "parent-woken",
                        format!("delegate_parallel at {step}/{i} of task {task} returned {} outcomes for {n} children, some unfinished", outs.len()),
                    );
                }
            }
            "fail_retry" => {
                if w.bump(site) <= op["times"].as_u64().unwrap_or(1) as u32 {
                    return Err(StepError::retryable("sim: injected retryable failure"));
                }
            }
            "panic_once" => {
                if w.bump(site) == 1 {
                    std::panic::panic_any(PANIC_MSG);
                }
            }
            "fail_perm" => return Err(StepError::permanent("sim: injected permanent failure")),
            "work" => {
                tokio::time::sleep(Duration::from_millis(op["ms"].as_u64().unwrap_or(0))).await
            }
            other => return Err(StepError::permanent(format!("unknown op {other}"))),
        }
    }
    Ok(json!({ "done": step }))
}

/// The payload of injected panics (the panic hook keeps them quiet).
pub const PANIC_MSG: &str = "sim: injected panic";

async fn decide(w: Arc<World>, host: usize, input: Value, ctx: Context) -> StepResult<Decision> {
    alive(&w, host).await;
    let _ = ctx;
    let mut steps = Vec::new();
    let mut names = Vec::new();
    for (i, b) in input["branches"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = format!("b{i}");
        steps.push(NewStep {
            name: name.clone(),
            handler: "wf".into(),
            input: b.clone(),
            depends_on: vec![],
            routes: Default::default(),
        });
        names.push(name);
    }
    if input["tricky"].as_bool() == Some(true) {
        // Step `s` with checkpoint `a/b` and step `s/a` with checkpoint `b`.
        for (name, cp) in [("s", "a/b"), ("s/a", "b")] {
            steps.push(NewStep {
                name: name.into(),
                handler: "wf".into(),
                input: json!({"ops": [{"op": "cp", "name": cp}]}),
                depends_on: vec![],
                routes: Default::default(),
            });
            names.push(name.into());
        }
    }
    steps.push(NewStep {
        name: "join".into(),
        handler: "join".into(),
        input: json!({ "deps": names }),
        depends_on: names.clone(),
        routes: Default::default(),
    });
    Ok(Decision::Steps {
        steps,
        final_step: Some("join".into()),
    })
}

async fn join(w: Arc<World>, host: usize, input: Value, ctx: Context) -> StepResult {
    alive(&w, host).await;
    let results = ctx.dependency_results().await?;
    for d in input["deps"].as_array().into_iter().flatten() {
        let d = d.as_str().unwrap_or("");
        if results.get(d) != Some(&json!({ "done": d })) {
            w.violation(
                "convergence",
                format!(
                    "join of task {} got {:?} for dependency `{d}`",
                    ctx.task_id(),
                    results.get(d)
                ),
            );
        }
    }
    Ok(json!({ "joined": results.len() }))
}

/// Host configuration drawn per run.
#[derive(Clone, Debug)]
pub struct HostCfg {
    /// Lease length.
    pub lease: Duration,
    /// Host concurrency.
    pub concurrency: usize,
    /// Claim batch.
    pub claim_batch: usize,
    /// Shutdown grace.
    pub grace: Duration,
}

/// A worker for sim host `host` with every workload handler.
pub fn worker(store: DynStore, w: &Arc<World>, host: usize, cfg: &HostCfg) -> Worker {
    let generous = HandlerOptions::default()
        .timeout(Duration::from_secs(20))
        .retry(RetryPolicy {
            max_attempts: GENEROUS_ATTEMPTS,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.2,
        });
    let default5 = HandlerOptions::default().timeout(Duration::from_secs(20));
    let (w1, w2, w3, w4) = (w.clone(), w.clone(), w.clone(), w.clone());
    Worker::builder(store)
        .lease(cfg.lease)
        .concurrency(cfg.concurrency)
        .claim_batch(cfg.claim_batch)
        .shutdown_grace(cfg.grace)
        .step("wf", generous.clone(), move |input, ctx| {
            let w = w1.clone();
            async move { body(&w.clone(), tag_of(&ctx), interpret(w, host, input, ctx)).await }
        })
        .step("wf5", default5, move |input, ctx| {
            let w = w2.clone();
            async move { body(&w.clone(), tag_of(&ctx), interpret(w, host, input, ctx)).await }
        })
        .decision("decide", generous.clone(), move |input, ctx| {
            let w = w3.clone();
            async move { body(&w.clone(), tag_of(&ctx), decide(w, host, input, ctx)).await }
        })
        .step("join", generous, move |input, ctx| {
            let w = w4.clone();
            async move { body(&w.clone(), tag_of(&ctx), join(w, host, input, ctx)).await }
        })
        .build()
        .expect("the workload's worker configuration is valid")
}
