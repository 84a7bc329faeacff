//! The durable context (issue "Durable workflows"): checkpoints, events,
//! sleeps, spawn and delegation, fan-out with cursors, response events,
//! cancellation, heartbeats and crash replay. Every test runs against the
//! memory store, a real SQLite file and a real PostgreSQL database (a
//! throwaway server on 127.0.0.1); time is a fake clock.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::{
    ChildSpec, Decision, Error, ErrorKind, HandlerOptions, NewStep, NewTask, StepError, StepState,
    TaskId, TaskState,
};
use tokio::sync::Semaphore;

store_tests!(
    spawn_with_a_response_event_is_awaited_by_the_parent,
    checkpoint_runs_once_per_task,
    repeated_checkpoint_names_are_numbered,
    bad_checkpoint_names_fail_only_their_step,
    event_emitted_before_await_is_delivered,
    event_after_suspension_wakes_the_step_and_frees_the_slot,
    event_emitted_while_host_is_down,
    await_timeout_is_checkpointed,
    sleep_resumes_only_after_the_clock_passes,
    sleep_until_keeps_the_first_deadline_on_replay,
    absurd_durations_fail_the_step_without_panicking,
    emit_from_inside_a_handler,
    spawned_child_is_idempotent_on_replay,
    delegate_and_delegate_parallel,
    group_with_a_failing_child_reports_per_child,
    nested_delegation_three_deep,
    fan_out_resumes_from_checkpointed_cursor,
    response_event_carries_result_and_error,
    client_await_event_waits_for_a_response_event,
    cancel_stops_running_step,
    cancel_suspended_step,
    cancel_cascades_to_descendants,
    heartbeat_and_checkpoint_extend_the_lease,
    crash_between_checkpoints_replays_the_first,
    waiting_never_costs_an_attempt,
    a_cancelled_run_cannot_emit_spawn_or_heartbeat,
    same_host_reclaim_keeps_runs_apart,
    replay_keys_cannot_collide,
);

async fn checkpoint_runs_once_per_task(env: Env) {
    let effects = Tally::new();
    let e = effects.clone();
    let w = env
        .worker()
        .step(
            "charge",
            HandlerOptions::default().retry(fast_retry(3)),
            move |_, ctx| {
                let e = e.clone();
                async move {
                    let receipt: String = ctx
                        .checkpoint("charge-card", || async {
                            e.bump();
                            Ok(format!("receipt-{}", ctx.attempt()))
                        })
                        .await?;
                    if ctx.attempt() == 1 {
                        return Err(StepError::retryable("network blip after charging"));
                    }
                    Ok(json!({ "receipt": receipt, "attempt": ctx.attempt() }))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("charge", json!({})).await.unwrap();
    assert_eq!(
        env.result(id).await,
        json!({ "receipt": "receipt-1", "attempt": 2 })
    );
    assert_eq!(effects.get(), 1, "the side effect ran once");
    let d = env.detail(id).await;
    let cp: Vec<(&str, &Value)> = d
        .checkpoints
        .iter()
        .map(|c| (c.key.as_str(), &c.value))
        .collect();
    assert_eq!(cp, [("charge/charge-card", &json!("receipt-1"))]);
    assert_eq!(d.checkpoints[0].run, 1);
    w.stop().await;
}

/// A checkpoint name no store could key on (control characters such as
/// NUL, which PostgreSQL text cannot hold, or over the name limit) fails its
/// step with `InvalidInput` naming the problem, before anything is written;
/// other steps checkpoint as usual.
async fn bad_checkpoint_names_fail_only_their_step(env: Env) {
    let w = env
        .worker()
        .step(
            "named",
            HandlerOptions::default(),
            |input, ctx| async move {
                let name = input["name"].as_str().unwrap_or_default().to_string();
                let v: i64 = ctx.checkpoint(&name, || async { Ok(7) }).await?;
                Ok(json!(v))
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let long = "n".repeat(switchyard::client::MAX_NAME_LEN + 1);
    let bad = [
        ("nul\0name", "control characters"),
        (long.as_str(), "bytes long"),
    ];
    let mut ids = Vec::new();
    for (name, _) in &bad {
        ids.push(
            env.client
                .spawn("named", json!({ "name": name }))
                .await
                .unwrap(),
        );
    }
    let good = env
        .client
        .spawn("named", json!({ "name": "fine" }))
        .await
        .unwrap();
    for (id, (_, why)) in ids.iter().zip(bad) {
        let t = env.finished(*id).await;
        assert_eq!(t.state, TaskState::Failed);
        let e = t.error.unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.message.contains("checkpoint name") && e.message.contains(why),
            "{}",
            e.message
        );
        assert!(env.detail(*id).await.checkpoints.is_empty());
    }
    assert_eq!(env.result(good).await, json!(7));
    w.stop().await;
}

async fn repeated_checkpoint_names_are_numbered(env: Env) {
    let effects = Tally::new();
    let e = effects.clone();
    let w = env
        .worker()
        .step(
            "repeat",
            HandlerOptions::default().retry(fast_retry(3)),
            move |_, ctx| {
                let e = e.clone();
                async move {
                    let mut got = Vec::new();
                    for i in 1..=3i64 {
                        let scale = if ctx.attempt() == 1 { 1 } else { 100 };
                        let v: i64 = ctx
                            .checkpoint("x", || async {
                                e.bump();
                                Ok(i * scale)
                            })
                            .await?;
                        got.push(v);
                    }
                    if ctx.attempt() == 1 {
                        return Err(StepError::retryable("replay me"));
                    }
                    Ok(json!(got))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("repeat", json!({})).await.unwrap();
    assert_eq!(
        env.result(id).await,
        json!([1, 2, 3]),
        "replay returns values by call order"
    );
    assert_eq!(effects.get(), 3);
    let d = env.detail(id).await;
    let mut cp: Vec<(String, Value)> = d
        .checkpoints
        .iter()
        .map(|c| (c.key.clone(), c.value.clone()))
        .collect();
    cp.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        cp,
        [
            ("repeat/x".to_string(), json!(1)),
            ("repeat/x#2".to_string(), json!(2)),
            ("repeat/x#3".to_string(), json!(3))
        ]
    );
    w.stop().await;
}

/// A handler that waits for the event named in its input and returns the payload.
fn awaiter(
    runs: Arc<Tally>,
) -> impl Fn(
    Value,
    switchyard::Context,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = switchyard::StepResult> + Send>>
       + Send
       + Sync
       + 'static {
    move |input, ctx| {
        let runs = runs.clone();
        Box::pin(async move {
            runs.bump();
            let payload = ctx
                .await_event(input["event"].as_str().unwrap(), None)
                .await?;
            Ok(json!({ "got": payload }))
        })
    }
}

async fn event_emitted_before_await_is_delivered(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .step("wait", HandlerOptions::default(), awaiter(runs.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(env
        .client
        .emit("paid-1", json!({ "amount": 5 }))
        .await
        .unwrap());
    assert!(
        !env.client
            .emit("paid-1", json!({ "amount": 99 }))
            .await
            .unwrap(),
        "first write wins"
    );
    let id = env
        .client
        .spawn("wait", json!({ "event": "paid-1" }))
        .await
        .unwrap();
    assert_eq!(env.result(id).await, json!({ "got": { "amount": 5 } }));
    assert_eq!(runs.get(), 1, "no suspension was needed");
    w.stop().await;
}

async fn event_after_suspension_wakes_the_step_and_frees_the_slot(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .concurrency(1)
        .step("wait", HandlerOptions::default(), awaiter(runs.clone()))
        .step("other", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("wait", json!({ "event": "paid-2" }))
        .await
        .unwrap();
    let s = env.wait_step(id, "wait", StepState::Suspended).await;
    assert_eq!(
        s.wait.as_ref().and_then(|w| w.event.as_deref()),
        Some("paid-2")
    );
    assert_eq!(s.lease_owner, None, "no host holds a suspended step");
    // The only slot is free: another task runs while the first waits.
    let other = env.client.spawn("other", json!("meanwhile")).await.unwrap();
    assert_eq!(env.result(other).await, json!("meanwhile"));
    assert_eq!(env.step(id, "wait").await.state, StepState::Suspended);
    assert!(env.client.emit("paid-2", json!("yes")).await.unwrap());
    assert_eq!(env.result(id).await, json!({ "got": "yes" }));
    assert_eq!(runs.get(), 2, "one run to suspend, one replay");
    w.stop().await;
}

async fn event_emitted_while_host_is_down(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .step("wait", HandlerOptions::default(), awaiter(runs.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("wait", json!({ "event": "paid-3" }))
        .await
        .unwrap();
    env.wait_step(id, "wait", StepState::Suspended).await;
    w.stop().await;
    assert!(env.client.emit("paid-3", json!(3)).await.unwrap());
    assert_eq!(
        env.step(id, "wait").await.state,
        StepState::Ready,
        "the event made the step ready"
    );
    let w2 = env
        .worker()
        .step("wait", HandlerOptions::default(), awaiter(runs.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert_eq!(env.result(id).await, json!({ "got": 3 }));
    w2.stop().await;
}

async fn await_timeout_is_checkpointed(env: Env) {
    let paths = Log::<String>::new();
    let p = paths.clone();
    let w = env
        .worker()
        .step("approve", HandlerOptions::default(), move |_, ctx| {
            let p = p.clone();
            async move {
                let path = match ctx
                    .await_event("approval", Some(Duration::from_secs(60)))
                    .await
                {
                    Ok(v) => format!("approved {v}"),
                    Err(StepError::AwaitTimeout { event }) => format!("timed out on {event}"),
                    Err(e) => return Err(e),
                };
                p.push(path.clone());
                // Forces one more replay after the timeout.
                ctx.sleep(Duration::from_secs(10)).await?;
                Ok(json!(path))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    let id = env.client.spawn("approve", json!({})).await.unwrap();
    let s = env.wait_step(id, "approve", StepState::Suspended).await;
    assert_eq!(s.run_at, Some(t0 + 60_000));

    env.advance(59_999);
    env.barrier().await;
    assert_eq!(
        env.step(id, "approve").await.state,
        StepState::Suspended,
        "resumed before the timeout"
    );
    assert!(paths.all().is_empty());

    env.advance(1);
    let s = eventually("the timeout path then the sleep", || async {
        let s = env.step(id, "approve").await;
        (s.state == StepState::Suspended && s.wait.as_ref().is_some_and(|w| w.event.is_none()))
            .then_some(s)
    })
    .await;
    assert_eq!(s.run_at, Some(t0 + 70_000));
    assert_eq!(paths.all(), ["timed out on approval"]);

    // The event arrives late; the replay still takes the timeout path.
    env.client
        .emit("approval", json!("late yes"))
        .await
        .unwrap();
    env.advance(10_000);
    assert_eq!(env.result(id).await, json!("timed out on approval"));
    assert_eq!(
        paths.all(),
        ["timed out on approval", "timed out on approval"]
    );
    w.stop().await;
}

async fn sleep_resumes_only_after_the_clock_passes(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let w = env
        .worker()
        .step("nap", HandlerOptions::default(), move |_, ctx| {
            let r = r.clone();
            async move {
                r.bump();
                ctx.sleep(Duration::from_secs(30)).await?;
                Ok(json!("rested"))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    let id = env.client.spawn("nap", json!({})).await.unwrap();
    let s = env.wait_step(id, "nap", StepState::Suspended).await;
    assert_eq!(s.run_at, Some(t0 + 30_000));
    env.advance(29_999);
    env.barrier().await;
    assert_eq!(env.step(id, "nap").await.state, StepState::Suspended);
    assert_eq!(runs.get(), 1);
    env.advance(1);
    assert_eq!(env.result(id).await, json!("rested"));
    assert_eq!(runs.get(), 2);
    w.stop().await;
}

async fn sleep_until_keeps_the_first_deadline_on_replay(env: Env) {
    // A handler that computes its deadline afresh on every run (as one
    // reading the wall clock would) still wakes at the first deadline.
    let at = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let a = at.clone();
    let w = env
        .worker()
        .step("alarm", HandlerOptions::default(), move |_, ctx| {
            let a = a.clone();
            async move {
                ctx.sleep_until(a.load(std::sync::atomic::Ordering::SeqCst))
                    .await?;
                Ok(json!("rang"))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    at.store(t0 + 30_000, std::sync::atomic::Ordering::SeqCst);
    let id = env.client.spawn("alarm", json!({})).await.unwrap();
    let s = env.wait_step(id, "alarm", StepState::Suspended).await;
    assert_eq!(s.run_at, Some(t0 + 30_000));
    at.store(t0 + 60_000, std::sync::atomic::Ordering::SeqCst);
    env.advance(30_000);
    assert_eq!(env.result(id).await, json!("rang"));
    w.stop().await;
}

/// Issue item 5: await timeouts and sleeps that are negative, NaN,
/// infinite or absurdly long (1e17 s overflowed the stored deadline; 1e20 s
/// and `Duration::MAX` panicked) fail the step with `InvalidInput` naming
/// the argument; nothing panics. Seconds go through
/// `client::duration_from_secs`, the function every binding uses.
async fn absurd_durations_fail_the_step_without_panicking(env: Env) {
    use switchyard::client::duration_from_secs;
    let cases: Vec<&str> = vec![
        "await -1",
        "await NaN",
        "await inf",
        "await 1e17",
        "await 1e20",
        "await MAX",
        "sleep -1",
        "sleep NaN",
        "sleep inf",
        "sleep 1e17",
        "sleep 1e20",
        "sleep MAX",
        "sleep_until i64::MAX",
    ];
    let w = env
        .worker()
        .step("wait", HandlerOptions::default(), |input, ctx| async move {
            let case = input.as_str().unwrap().to_string();
            let (op, arg) = case.split_once(' ').unwrap();
            let d = match arg {
                "MAX" => Duration::MAX,
                "1e17" => Duration::from_secs(100_000_000_000_000_000),
                "i64::MAX" => return ctx.sleep_until(i64::MAX).await.map(|()| json!("woke")),
                n => duration_from_secs(&format!("{op} duration"), n.parse().unwrap())?,
            };
            match op {
                "await" => ctx.await_event("never", Some(d)).await,
                _ => ctx.sleep(d).await.map(|()| json!("woke")),
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for case in &cases {
        ids.push(env.client.spawn("wait", json!(case)).await.unwrap());
    }
    for (id, case) in ids.into_iter().zip(&cases) {
        let t = env.finished(id).await;
        assert_eq!(t.state, TaskState::Failed, "{case}");
        let e = t.error.unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{case}: {}", e.message);
        let (op, arg) = case.split_once(' ').unwrap();
        let what = match (op, arg) {
            ("sleep_until", _) => "sleep_until",
            ("await", "1e17" | "MAX") => "await_event timeout",
            ("sleep", "1e17" | "MAX") => "sleep duration",
            _ => op,
        };
        assert!(e.message.contains(what), "{case}: {}", e.message);
        let why = match arg {
            "-1" | "NaN" | "inf" => "must be a non-negative number of seconds",
            "sleep_until" | "i64::MAX" => "more than 100 years",
            _ => "at most 100 years",
        };
        assert!(e.message.contains(why), "{case}: {}", e.message);
    }
    w.stop().await;
}

async fn emit_from_inside_a_handler(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .step("wait", HandlerOptions::default(), awaiter(runs))
        .step(
            "announce",
            HandlerOptions::default(),
            |input, ctx| async move {
                let stored = ctx
                    .emit_event("shipped-1", json!({ "parcel": input }))
                    .await?;
                Ok(json!(stored))
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let waiter = env
        .client
        .spawn("wait", json!({ "event": "shipped-1" }))
        .await
        .unwrap();
    env.wait_step(waiter, "wait", StepState::Suspended).await;
    let a = env.client.spawn("announce", json!("p-1")).await.unwrap();
    assert_eq!(env.result(a).await, json!(true));
    assert_eq!(
        env.result(waiter).await,
        json!({ "got": { "parcel": "p-1" } })
    );
    let events = env.client.events(0).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.name == "shipped-1" && e.payload == json!({ "parcel": "p-1" })));
    w.stop().await;
}

async fn spawned_child_is_idempotent_on_replay(env: Env) {
    let children = Tally::new();
    let c = children.clone();
    let w = env
        .worker()
        .step(
            "parent",
            HandlerOptions::default().retry(fast_retry(3)),
            |_, ctx| async move {
                let child = ctx.spawn("child", json!({ "from": "parent" })).await?;
                if ctx.attempt() < 3 {
                    return Err(StepError::retryable("replay after spawning"));
                }
                Ok(json!(child.to_string()))
            },
        )
        .step("child", HandlerOptions::default(), move |input, _| {
            let c = c.clone();
            async move {
                c.bump();
                Ok(input)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("parent", json!({})).await.unwrap();
    let child: TaskId = env.result(id).await.as_str().unwrap().parse().unwrap();
    let d = env.detail(id).await;
    assert_eq!(d.children.len(), 1, "one child over three attempts");
    assert_eq!(d.children[0].id, child);
    assert_eq!(d.children[0].parent.as_ref().map(|p| p.task_id), Some(id));
    assert_eq!(env.result(child).await, json!({ "from": "parent" }));
    assert_eq!(children.get(), 1);
    w.stop().await;
}

async fn delegate_and_delegate_parallel(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let w = env
        .worker()
        .step("one", HandlerOptions::default(), |input, ctx| async move {
            ctx.delegate("double", input).await
        })
        .step("many", HandlerOptions::default(), |input, ctx| async move {
            let specs = input
                .as_array()
                .unwrap()
                .iter()
                .map(|v| ChildSpec::new("double", v.clone()))
                .collect();
            let outcomes = ctx.delegate_parallel(specs).await?;
            let mut ids: Vec<TaskId> = outcomes.iter().map(|o| o.task_id).collect();
            ids.dedup();
            assert_eq!(ids.len(), outcomes.len(), "distinct children");
            assert!(outcomes.iter().all(|o| o.state == TaskState::Completed));
            Ok(json!(outcomes
                .into_iter()
                .map(|o| o.result.unwrap())
                .collect::<Vec<_>>()))
        })
        .step("double", HandlerOptions::default(), move |input, _| {
            let r = r.clone();
            async move {
                r.bump();
                Ok(json!(input.as_i64().unwrap() * 2))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let one = env.client.spawn("one", json!(21)).await.unwrap();
    assert_eq!(env.result(one).await, json!(42));
    let many = env
        .client
        .spawn("many", json!([1, 2, 3, 4, 5]))
        .await
        .unwrap();
    assert_eq!(
        env.result(many).await,
        json!([2, 4, 6, 8, 10]),
        "results in order"
    );
    assert_eq!(runs.get(), 6);
    assert_eq!(env.detail(many).await.children.len(), 5);
    w.stop().await;
}

async fn group_with_a_failing_child_reports_per_child(env: Env) {
    let w = env
        .worker()
        .step("collect", HandlerOptions::default(), |input, ctx| async move {
            let specs = input.as_array().unwrap().iter().map(|v| ChildSpec::new("check", v.clone())).collect();
            let outcomes = ctx.delegate_parallel(specs).await?;
            // The parent decides: keep the good ones, report the bad ones.
            let summary: Vec<Value> = outcomes
                .iter()
                .map(|o| match o.state {
                    TaskState::Completed => json!({ "ok": o.result }),
                    state => json!({ "state": state.as_str(), "error": o.error.as_ref().map(|e| e.message.clone()) }),
                })
                .collect();
            Ok(json!(summary))
        })
        .step("strict", HandlerOptions::default(), |input, ctx| async move {
            // `delegate` (one child) turns a failed child into a permanent error.
            ctx.delegate("check", input).await
        })
        .step("check", HandlerOptions::default().retry(fast_retry(1)), |input, _| async move {
            let n = input.as_i64().unwrap();
            if n < 0 {
                return Err(StepError::permanent(format!("{n} is negative")));
            }
            Ok(json!(n))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("collect", json!([1, -2, 3]))
        .await
        .unwrap();
    assert_eq!(
        env.result(id).await,
        json!([{ "ok": 1 }, { "state": "failed", "error": "-2 is negative" }, { "ok": 3 }])
    );
    let strict = env.client.spawn("strict", json!(-7)).await.unwrap();
    let t = env.finished(strict).await;
    assert_eq!(t.state, TaskState::Failed);
    let e = t.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("-7 is negative"), "{}", e.message);
    w.stop().await;
}

async fn nested_delegation_three_deep(env: Env) {
    let w = env
        .worker()
        .step("a", HandlerOptions::default(), |input, ctx| async move {
            let b = ctx.delegate("b", input).await?;
            Ok(json!({ "a": b }))
        })
        .step("b", HandlerOptions::default(), |input, ctx| async move {
            let c = ctx
                .delegate("c", json!(input.as_i64().unwrap() + 1))
                .await?;
            Ok(json!({ "b": c }))
        })
        .step("c", HandlerOptions::default(), |input, _| async move {
            Ok(json!({ "c": input.as_i64().unwrap() * 10 }))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("a", json!(4)).await.unwrap();
    assert_eq!(env.result(id).await, json!({ "a": { "b": { "c": 50 } } }));
    let d = env.detail(id).await;
    assert_eq!(d.children.len(), 1);
    let b = env.detail(d.children[0].id).await;
    assert_eq!(b.task.handler, "b");
    assert_eq!(b.children.len(), 1);
    assert_eq!(b.children[0].handler, "c");
    assert_eq!(b.children[0].state, TaskState::Completed);
    w.stop().await;
}

/// Fan-out ranges checkpoint one cursor per item; the range that fails
/// midway continues from its cursor on the next attempt.
async fn fan_out_resumes_from_checkpointed_cursor(env: Env) {
    let processed: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let failed_once = Tally::new();
    let (p, f) = (processed.clone(), failed_once.clone());
    let w = env
        .worker()
        .decision("plan", HandlerOptions::default(), |input, _| async move {
            Ok(Decision::fan_out(
                "range",
                input["total"].as_u64().unwrap(),
                5,
                json!({ "fail_at": 7 }),
                "total",
            ))
        })
        .step(
            "range",
            HandlerOptions::default().retry(fast_retry(3)),
            move |input, ctx| {
                let (p, f) = (p.clone(), f.clone());
                async move {
                    let (start, end) = (
                        input["start"].as_u64().unwrap(),
                        input["end"].as_u64().unwrap(),
                    );
                    let fail_at = input["input"]["fail_at"].as_u64().unwrap();
                    let mut sum = 0;
                    for i in start..end {
                        if i == fail_at && f.get() == 0 {
                            f.bump();
                            return Err(StepError::retryable(format!(
                                "item {i} hit a transient error"
                            )));
                        }
                        let squared: u64 = ctx
                            .checkpoint("cursor", || async {
                                *p.lock().unwrap().entry(i).or_default() += 1;
                                Ok(i * i)
                            })
                            .await?;
                        sum += squared;
                    }
                    Ok(json!(sum))
                }
            },
        )
        .step("total", HandlerOptions::default(), |_, ctx| async move {
            let parts = ctx.dependency_results().await?;
            Ok(json!(parts
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>()))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("plan", json!({ "total": 12 }))
        .await
        .unwrap();
    assert_eq!(
        env.result(id).await,
        json!((0..12u64).map(|i| i * i).sum::<u64>())
    );
    assert_eq!(failed_once.get(), 1);
    let processed = processed.lock().unwrap().clone();
    assert_eq!(processed.len(), 12, "every item processed: {processed:?}");
    assert!(
        processed.values().all(|&n| n == 1),
        "no item before the cursor was redone: {processed:?}"
    );
    let d = env.detail(id).await;
    let range1 = d.steps.iter().find(|s| s.name == "range#1").unwrap();
    assert_eq!(range1.attempt, 2, "the failing range ran twice");
    assert!(d
        .steps
        .iter()
        .filter(|s| s.name != "range#1")
        .all(|s| s.attempt == 1));
    w.stop().await;
}

async fn response_event_carries_result_and_error(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .step("wait", HandlerOptions::default(), awaiter(runs))
        .step(
            "answer",
            HandlerOptions::default().retry(fast_retry(1)),
            |input, _| async move {
                if input["fail"] == true {
                    return Err(StepError::permanent("cannot answer"));
                }
                Ok(json!({ "answer": input["q"] }))
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // The requester waits first; the responder's outcome is its event.
    let requester = env
        .client
        .spawn("wait", json!({ "event": "reply-1" }))
        .await
        .unwrap();
    env.wait_step(requester, "wait", StepState::Suspended).await;
    let ok = env
        .client
        .spawn_task(NewTask::new("answer", json!({ "q": 42 })).response_event("reply-1"))
        .await
        .unwrap()
        .task_id;
    let got = env.result(requester).await;
    assert_eq!(got["got"]["task_id"], json!(ok.to_string()));
    assert_eq!(got["got"]["state"], json!("completed"));
    assert_eq!(got["got"]["result"], json!({ "answer": 42 }));
    assert!(got["got"]["error"].is_null());

    let bad = env
        .client
        .spawn_task(NewTask::new("answer", json!({ "fail": true })).response_event("reply-2"))
        .await
        .unwrap()
        .task_id;
    assert_eq!(env.finished(bad).await.state, TaskState::Failed);
    // Awaited after the fact: the event was cached.
    let late = env
        .client
        .spawn("wait", json!({ "event": "reply-2" }))
        .await
        .unwrap();
    let got = env.result(late).await;
    assert_eq!(got["got"]["task_id"], json!(bad.to_string()));
    assert_eq!(got["got"]["state"], json!("failed"));
    assert!(got["got"]["result"].is_null());
    assert_eq!(got["got"]["error"]["message"], json!("cannot answer"));
    w.stop().await;
}

async fn client_await_event_waits_for_a_response_event(env: Env) {
    let w = env
        .worker()
        .step("answer", HandlerOptions::default(), |input, _| async move {
            Ok(json!({ "answer": input["q"] }))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let long = Duration::from_secs(20);
    // Waiting first: the caller is woken when the task's response lands.
    let c = env.client.clone();
    let waiter = tokio::spawn(async move { c.await_event("reply-a", long).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id = env
        .client
        .spawn_task(NewTask::new("answer", json!({ "q": 7 })).response_event("reply-a"))
        .await
        .unwrap()
        .task_id;
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got["task_id"], json!(id.to_string()));
    assert_eq!(got["state"], json!("completed"));
    assert_eq!(got["result"], json!({ "answer": 7 }));
    // Emitted before the wait: returned at once; the first emit wins.
    env.client.emit("plain", json!(1)).await.unwrap();
    env.client.emit("plain", json!(2)).await.unwrap();
    assert_eq!(
        env.client.await_event("plain", long).await.unwrap(),
        json!(1)
    );
    // Never emitted: a timeout naming the event.
    let err = env
        .client
        .await_event("never", Duration::from_millis(150))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("`never`"), "{err}");
    // A name no store keys on: invalid input, not a wait.
    let err = env.client.await_event("", long).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    let err = env
        .client
        .await_event("x", Duration::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    w.stop().await;
}

async fn cancel_stops_running_step(env: Env) {
    let (started, observed) = (Tally::new(), Log::<bool>::new());
    let (s, o) = (started.clone(), observed.clone());
    let w = env
        .worker()
        .step("work", HandlerOptions::default(), move |_, ctx| {
            let (s, o) = (s.clone(), o.clone());
            async move {
                o.push(ctx.is_cancelled());
                s.bump();
                ctx.cancelled().await;
                o.push(ctx.is_cancelled());
                Err(StepError::Cancelled)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("work", json!({})).await.unwrap();
    started.reach(1).await;
    assert!(env.client.cancel(id, false).await.unwrap());
    assert_eq!(env.finished(id).await.state, TaskState::Cancelled);
    eventually("the handler to observe the cancellation", || async {
        (observed.all().len() == 2).then_some(())
    })
    .await;
    assert_eq!(observed.all(), [false, true]);
    let s = env.step(id, "work").await;
    assert_eq!(s.state, StepState::Cancelled);
    w.stop().await;
}

async fn cancel_suspended_step(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .step("wait", HandlerOptions::default(), awaiter(runs.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("wait", json!({ "event": "never-1" }))
        .await
        .unwrap();
    env.wait_step(id, "wait", StepState::Suspended).await;
    assert!(env.client.cancel(id, false).await.unwrap());
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Cancelled);
    assert_eq!(env.step(id, "wait").await.state, StepState::Cancelled);
    env.client.emit("never-1", json!(1)).await.unwrap();
    env.barrier().await;
    assert_eq!(runs.get(), 1, "a cancelled step is not woken");
    assert_eq!(
        env.client.get(id).await.unwrap().state,
        TaskState::Cancelled
    );
    w.stop().await;
}

async fn cancel_cascades_to_descendants(env: Env) {
    let runs = Tally::new();
    let w = env
        .worker()
        .step("top", HandlerOptions::default(), |input, ctx| async move {
            ctx.delegate("middle", input).await
        })
        .step(
            "middle",
            HandlerOptions::default(),
            |input, ctx| async move {
                ctx.spawn(
                    "wait",
                    json!({ "event": format!("{}-side", input["event"].as_str().unwrap()) }),
                )
                .await?;
                ctx.delegate("wait", input).await
            },
        )
        .step("wait", HandlerOptions::default(), awaiter(runs))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    // Without cascade only the task itself is cancelled.
    let alone = env
        .client
        .spawn("top", json!({ "event": "never-2" }))
        .await
        .unwrap();
    let middle_alone = wait_for_child(&env, alone).await;
    assert!(env.client.cancel(alone, false).await.unwrap());
    assert_eq!(env.finished(alone).await.state, TaskState::Cancelled);
    assert_eq!(
        env.client.get(middle_alone).await.unwrap().state,
        TaskState::Running
    );

    // With cascade every unfinished descendant is cancelled too.
    let top = env
        .client
        .spawn("top", json!({ "event": "never-3" }))
        .await
        .unwrap();
    let middle = wait_for_child(&env, top).await;
    let leaves = eventually("middle's two children to be suspended", || async {
        let d = env.detail(middle).await;
        let mut suspended = Vec::new();
        for c in &d.children {
            if env.detail(c.id).await.steps[0].state == StepState::Suspended {
                suspended.push(c.id);
            }
        }
        (suspended.len() == 2).then_some(suspended)
    })
    .await;
    assert!(env.client.cancel(top, true).await.unwrap());
    for id in [top, middle].into_iter().chain(leaves) {
        let t = env.finished(id).await;
        assert_eq!(t.state, TaskState::Cancelled, "task {} ({})", id, t.handler);
        assert!(env
            .detail(id)
            .await
            .steps
            .iter()
            .all(|s| s.state == StepState::Cancelled));
    }
    w.stop().await;
}

/// Waits until `parent`'s root step is suspended on its delegation and returns its child.
async fn wait_for_child(env: &Env, parent: TaskId) -> TaskId {
    eventually("the parent to suspend on its child", || async {
        let d = env.detail(parent).await;
        (d.steps[0].state == StepState::Suspended && d.children.len() == 1)
            .then(|| d.children[0].id)
    })
    .await
}

async fn heartbeat_and_checkpoint_extend_the_lease(env: Env) {
    let (progress, gate) = (Tally::new(), Arc::new(Semaphore::new(0)));
    let (p, g) = (progress.clone(), gate.clone());
    let w = env
        .worker()
        .lease(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(3600))
        .step("long", HandlerOptions::default(), move |_, ctx| {
            let (p, g) = (p.clone(), g.clone());
            async move {
                p.bump(); // 1: started
                g.acquire().await.expect("gate").forget();
                ctx.heartbeat().await?;
                p.bump(); // 2: heartbeat done
                g.acquire().await.expect("gate").forget();
                ctx.checkpoint("part", || async { Ok(1) }).await?;
                p.bump(); // 3: checkpoint written
                g.acquire().await.expect("gate").forget();
                Ok(json!("done"))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    let id = env.client.spawn("long", json!({})).await.unwrap();
    progress.reach(1).await;
    let lease = |s: switchyard::StepRecord| s.lease_expires_at.expect("a running step has a lease");
    assert_eq!(lease(env.step(id, "long").await), t0 + 30_000);

    env.clock.advance(10_000);
    gate.add_permits(1);
    progress.reach(2).await;
    assert_eq!(
        lease(env.step(id, "long").await),
        t0 + 40_000,
        "ctx.heartbeat() extended the lease"
    );

    env.clock.advance(10_000);
    gate.add_permits(1);
    progress.reach(3).await;
    assert_eq!(
        lease(env.step(id, "long").await),
        t0 + 50_000,
        "the checkpoint write extended the lease"
    );

    // 49 s after the start the lease still holds, so nothing is recovered.
    env.clock.advance(29_000);
    assert_eq!(env.store.recover_expired().await.unwrap(), 0);
    gate.add_permits(1);
    assert_eq!(env.result(id).await, json!("done"));
    assert_eq!(env.step(id, "long").await.attempt, 1);
    w.stop().await;
}

/// In-process stand-in for a crash between two checkpoints: attempt 1
/// panics after the first; the replay skips the first and runs the second.
async fn crash_between_checkpoints_replays_the_first(env: Env) {
    let (first, second) = (Tally::new(), Tally::new());
    let (f, s) = (first.clone(), second.clone());
    let w = env
        .worker()
        .step(
            "two-phase",
            HandlerOptions::default().retry(fast_retry(3)),
            move |_, ctx| {
                let (f, s) = (f.clone(), s.clone());
                async move {
                    let a: u32 = ctx
                        .checkpoint("reserve", || async {
                            f.bump();
                            Ok(ctx.attempt())
                        })
                        .await?;
                    if ctx.attempt() == 1 {
                        panic!("simulated crash between checkpoints");
                    }
                    let b: u32 = ctx
                        .checkpoint("commit", || async {
                            s.bump();
                            Ok(ctx.attempt())
                        })
                        .await?;
                    Ok(json!([a, b]))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("two-phase", json!({})).await.unwrap();
    assert_eq!(env.result(id).await, json!([1, 2]));
    assert_eq!((first.get(), second.get()), (1, 1));
    let s = env.step(id, "two-phase").await;
    assert_eq!(s.attempt, 2);
    w.stop().await;
}

/// Issue 20, item 1: a resume after `await_event`, `sleep` or `delegate`
/// continues the same attempt in a new run. With the default policy (5
/// attempts), one step that awaits 100 events, sleeps 50 times and delegates
/// 20 children one after another completes, on attempt 1.
async fn waiting_never_costs_an_attempt(env: Env) {
    const EVENTS: usize = 100;
    const SLEEPS: usize = 50;
    const CHILDREN: usize = 20;
    let w = env
        .worker()
        .step("patient", HandlerOptions::default(), |_, ctx| async move {
            let mut sum = 0;
            for i in 0..EVENTS {
                let v = ctx
                    .await_event(&format!("approval-{}-{i}", ctx.task_id()), None)
                    .await?;
                sum += v.as_i64().unwrap_or(0);
            }
            for _ in 0..SLEEPS {
                ctx.sleep(Duration::from_secs(1)).await?;
            }
            for i in 0..CHILDREN {
                sum += ctx.delegate("child", json!(i)).await?.as_i64().unwrap_or(0);
            }
            Ok(json!({ "sum": sum, "attempt": ctx.attempt(), "run": ctx.run() }))
        })
        .step("child", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("patient", json!({})).await.unwrap();
    for i in 0..EVENTS {
        let s = env.wait_step(id, "patient", StepState::Suspended).await;
        assert_eq!(s.attempt, 0, "a suspended step has used no attempt");
        assert_eq!(s.run, i as u64 + 1);
        env.client
            .emit(&format!("approval-{id}-{i}"), json!(1))
            .await
            .unwrap();
    }
    for j in 0..SLEEPS {
        let run = (EVENTS + j + 1) as u64;
        eventually(&format!("sleep {j} to suspend run {run}"), || async {
            let s = env.step(id, "patient").await;
            (s.state == StepState::Suspended && s.run == run).then_some(())
        })
        .await;
        env.advance(1_000);
    }
    // A delegation suspends unless its child has already finished.
    let most = (EVENTS + SLEEPS + CHILDREN + 1) as u64;
    let least = (EVENTS + SLEEPS + 1) as u64;
    let expected_sum = EVENTS + (0..CHILDREN).sum::<usize>();
    let out = env.result(id).await;
    assert_eq!(out["sum"], json!(expected_sum));
    assert_eq!(out["attempt"], json!(1), "{out}");
    let s = env.step(id, "patient").await;
    assert_eq!(out["run"], json!(s.run));
    assert_eq!(s.attempt, 1);
    assert!((least..=most).contains(&s.run), "{} runs", s.run);
    assert!(s.error.is_none(), "{:?}", s.error);
    w.stop().await;
}

/// Issue 20, items 6 and 8: once a task is cancelled (with cascade), a
/// handler still running gets the cancellation (not `LeaseLost`) from every
/// write it tries, and creates no child and no event.
async fn a_cancelled_run_cannot_emit_spawn_or_heartbeat(env: Env) {
    let (started, go) = (Tally::new(), Arc::new(Semaphore::new(0)));
    let seen = Log::<String>::new();
    let (s, g, o) = (started.clone(), go.clone(), seen.clone());
    let w = env
        .worker()
        .step("stubborn", HandlerOptions::default(), move |_, ctx| {
            let (s, g, o) = (s.clone(), g.clone(), o.clone());
            async move {
                s.bump();
                // Ignores the cancellation token on purpose.
                g.acquire().await.unwrap().forget();
                let show = |r: Result<String, StepError>| match r {
                    Ok(v) => format!("ok {v}"),
                    Err(e) => format!("{e:?}"),
                };
                o.push(show(
                    ctx.spawn("orphan", json!({}))
                        .await
                        .map(|id| id.to_string()),
                ));
                o.push(show(
                    ctx.emit_event("from-the-dead", json!(1))
                        .await
                        .map(|b| b.to_string()),
                ));
                o.push(show(
                    ctx.delegate("orphan", json!({}))
                        .await
                        .map(|v| v.to_string()),
                ));
                o.push(show(ctx.heartbeat().await.map(|()| String::new())));
                Err(StepError::Cancelled)
            }
        })
        .step("orphan", HandlerOptions::default(), |_, _| async {
            Ok(json!("should never run"))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("stubborn", json!({})).await.unwrap();
    started.reach(1).await;
    assert!(env.client.cancel(id, true).await.unwrap());
    go.add_permits(1);
    eventually("the handler to try its writes", || async {
        (seen.all().len() == 4).then_some(())
    })
    .await;
    assert_eq!(seen.all(), vec!["Cancelled".to_string(); 4]);
    assert!(env.detail(id).await.children.is_empty(), "no child created");
    assert!(env
        .client
        .events(0)
        .await
        .unwrap()
        .iter()
        .all(|e| e.name != "from-the-dead"));
    env.barrier().await;
    assert_eq!(env.finished(id).await.state, TaskState::Cancelled);
    w.stop().await;
}

/// Issue 20, item 2: a host whose lease lapsed (a pause past the lease) and
/// that claims the same step again runs two runs of one step. They never
/// share state: run 1 finishing late is rejected and does not remove run
/// 2's bookkeeping, so run 2 is still cancellable, and no third run starts.
async fn same_host_reclaim_keeps_runs_apart(env: Env) {
    let (started, release_first) = (Log::<u64>::new(), Arc::new(Semaphore::new(0)));
    let cancelled = Log::<u64>::new();
    let (s, r, c) = (started.clone(), release_first.clone(), cancelled.clone());
    let w = env
        .worker()
        .concurrency(4)
        .lease(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(3600))
        .step("twice", HandlerOptions::default(), move |_, ctx| {
            let (s, r, c) = (s.clone(), r.clone(), c.clone());
            async move {
                s.push(ctx.run());
                if ctx.run() == 1 {
                    // Run 1 outlives its lease, then finishes as if nothing happened.
                    r.acquire().await.unwrap().forget();
                    return Ok(json!("late run 1"));
                }
                ctx.cancelled().await;
                c.push(ctx.run());
                Err(StepError::Cancelled)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("twice", json!({})).await.unwrap();
    eventually("run 1 to start", || async {
        (started.all() == [1]).then_some(())
    })
    .await;
    env.advance(30_001);
    assert_eq!(env.store.recover_expired().await.unwrap(), 1);
    env.advance(0);
    eventually("run 2 to start on the same host", || async {
        (started.all() == [1, 2]).then_some(())
    })
    .await;
    release_first.add_permits(1);
    // Run 1's outcome is rejected; the step stays with run 2.
    env.barrier().await;
    let s = env.step(id, "twice").await;
    assert_eq!((s.state, s.run), (StepState::Running, 2));
    assert!(env.client.cancel(id, false).await.unwrap());
    eventually("run 2 to see the cancellation", || async {
        (cancelled.all() == [2]).then_some(())
    })
    .await;
    assert_eq!(env.finished(id).await.state, TaskState::Cancelled);
    env.barrier().await;
    assert_eq!(started.all(), [1, 2], "no third run");
    w.stop().await;
}

/// Issue 20, item 3: a checkpoint named `x#2` is not the second `x`, step
/// `s` with checkpoint `a/b` is not step `s/a` with checkpoint `b`, and
/// `await_event("e:deadline")` after a timed `await_event("e")` waits for
/// its own event instead of reading the first wait's deadline. Every body
/// runs once and returns its own value, also on replay.
async fn replay_keys_cannot_collide(env: Env) {
    let bodies = Log::<String>::new();
    let b = bodies.clone();
    let w = env
        .worker()
        .decision("plan", HandlerOptions::default(), |_, _| async {
            let step = |name: &str, input: &str, deps: &[&str]| NewStep {
                name: name.into(),
                handler: "keyed".into(),
                input: json!(input),
                depends_on: deps.iter().map(|d| d.to_string()).collect(),
                routes: Default::default(),
            };
            Ok(Decision::steps(vec![
                step("s", "a/b", &[]),
                step("s/a", "b", &["s"]),
            ]))
        })
        .step("keyed", HandlerOptions::default(), move |input, ctx| {
            let b = b.clone();
            async move {
                let name = input.as_str().unwrap_or_default().to_string();
                let mut got = Vec::new();
                for cp in [name.as_str(), "x", "x", "x#2"] {
                    let label = format!("{}:{cp}", ctx.step_name());
                    let b = b.clone();
                    let v: String = ctx
                        .checkpoint(cp, || async move {
                            b.push(label.clone());
                            Ok(label)
                        })
                        .await?;
                    got.push(v);
                }
                // The timeout is a value here; the suspension must still propagate.
                let first = match ctx
                    .await_event(
                        &format!("{}-e", ctx.task_id()),
                        Some(Duration::from_secs(60)),
                    )
                    .await
                {
                    Err(StepError::Suspend(w)) => return Err(StepError::Suspend(w)),
                    other => other,
                };
                let second = ctx
                    .await_event(&format!("{}-e:deadline", ctx.task_id()), None)
                    .await?;
                got.push(format!("{first:?}"));
                got.push(second.to_string());
                Ok(json!(got))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("plan", json!({})).await.unwrap();
    // Step `s`: its first wait times out, the second waits for its own event.
    env.wait_step(id, "s", StepState::Suspended).await;
    env.advance(60_001);
    eventually("`s` to wait for its second event", || async {
        let s = env.step(id, "s").await;
        eprintln!(
            "s: {:?} run {} attempt {} wait {:?} err {:?}",
            s.state, s.run, s.attempt, s.wait, s.error
        );
        (s.state == StepState::Suspended && s.run == 2).then_some(())
    })
    .await;
    env.client
        .emit(&format!("{id}-e:deadline"), json!("own event"))
        .await
        .unwrap();
    // Step `s/a`: both events exist by now.
    env.client
        .emit(&format!("{id}-e"), json!("first"))
        .await
        .unwrap();
    let out = env.result(id).await;
    let mut ran = bodies.all();
    ran.sort();
    assert_eq!(
        ran,
        ["s/a:b", "s/a:x", "s/a:x", "s/a:x#2", "s:a/b", "s:x", "s:x", "s:x#2"],
        "every checkpoint body ran exactly once"
    );
    assert_eq!(
        out,
        json!([
            "s/a:b",
            "s/a:x",
            "s/a:x",
            "s/a:x#2",
            "Ok(String(\"first\"))",
            "\"own event\""
        ])
    );
    let s = env.step(id, "s").await;
    assert_eq!(s.state, StepState::Completed);
    assert_eq!(
        s.result,
        Some(json!([
            "s:a/b",
            "s:x",
            "s:x",
            "s:x#2",
            format!(
                "{:?}",
                Err::<Value, _>(StepError::AwaitTimeout {
                    event: format!("{id}-e")
                })
            ),
            "\"own event\""
        ]))
    );
    w.stop().await;
}

/// Issue 20, item 8: a cancel made in another process (here a second store
/// handle, which shares no in-process signal with the host's) reaches the
/// running handler through the store within its poll interval, not at the
/// next heartbeat (an hour here), and the handler sees a cancellation.
async fn cancel_from_another_process_reaches_the_handler(
    host: switchyard::DynStore,
    other: switchyard::DynStore,
) {
    let started = Tally::new();
    let seen = Log::<std::time::Instant>::new();
    let (s, o) = (started.clone(), seen.clone());
    let w = switchyard::Worker::builder(host.clone())
        .heartbeat(Duration::from_secs(3600))
        .shutdown_grace(Duration::from_millis(200))
        .step("long", HandlerOptions::default(), move |_, ctx| {
            let (s, o) = (s.clone(), o.clone());
            async move {
                s.bump();
                ctx.cancelled().await;
                o.push(std::time::Instant::now());
                Err(StepError::Cancelled)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = switchyard::Client::new(other);
    let id = client.spawn("long", json!({})).await.unwrap();
    started.reach(1).await;
    let t0 = std::time::Instant::now();
    assert!(client.cancel(id, false).await.unwrap());
    eventually("the handler to see the cancellation", || async {
        seen.all().first().copied()
    })
    .await;
    eprintln!(
        "{}: cancel reached the handler after {:?}",
        host.kind(),
        seen.all()[0].duration_since(t0)
    );
    assert_eq!(
        client
            .wait(id, Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        TaskState::Cancelled
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_another_process_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db").display().to_string();
    let host = switchyard::open(&format!("sqlite:{path}")).await.unwrap();
    let other = switchyard_store::sqlite::SqliteStore::open_unshared(
        &path,
        switchyard::StoreOptions::default(),
    )
    .await
    .unwrap();
    cancel_from_another_process_reaches_the_handler(host, other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_another_process_postgres() {
    let url = switchyard_store::pg_server::PgServer::shared()
        .unwrap_or_else(|e| panic!("{e}"))
        .fresh_database()
        .await
        .unwrap();
    let host = switchyard::open(&url).await.unwrap();
    let other = switchyard::open(&url).await.unwrap();
    cancel_from_another_process_reaches_the_handler(host, other).await;
}

/// `Context::spawn_with` and a response event: the parent awaits its
/// child's outcome as an event, whose payload reads as a `ResponseEvent`;
/// a response event that is no name fails the spawning step.
async fn spawn_with_a_response_event_is_awaited_by_the_parent(env: Env) {
    let w = env
        .worker()
        .step(
            "child",
            HandlerOptions::default().retry(fast_retry(1)),
            |input, _| async move {
                if input["fail"] == true {
                    return Err(StepError::permanent("child says no"));
                }
                Ok(json!(input["x"].as_i64().unwrap_or(0) * 2))
            },
        )
        .step(
            "parent",
            HandlerOptions::default(),
            |input, ctx| async move {
                let name = format!("child.done:{}", ctx.task_id());
                let opts = switchyard::SpawnOptions::default().response_event(&name);
                let child = ctx.spawn_with("child", input, opts).await?;
                let ev = ctx
                    .await_event(&name, Some(Duration::from_secs(30)))
                    .await?;
                let ev: switchyard::ResponseEvent = serde_json::from_value(ev)?;
                Ok(json!({ "child": child, "event": ev }))
            },
        )
        .step("bad_name", HandlerOptions::default(), |_, ctx| async move {
            let opts = switchyard::SpawnOptions::default().response_event("");
            ctx.spawn_with("child", json!({}), opts).await?;
            Ok(json!("accepted"))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let r = env
        .result(
            env.client
                .spawn("parent", json!({ "x": 21 }))
                .await
                .unwrap(),
        )
        .await;
    assert_eq!(
        r["event"],
        json!({ "task_id": r["child"], "state": "completed", "result": 42, "error": null })
    );
    let r = env
        .result(
            env.client
                .spawn("parent", json!({ "fail": true }))
                .await
                .unwrap(),
        )
        .await;
    assert_eq!(r["event"]["task_id"], r["child"]);
    assert_eq!(r["event"]["state"], "failed");
    assert_eq!(r["event"]["error"]["message"], "child says no");
    let t = env
        .finished(env.client.spawn("bad_name", json!({})).await.unwrap())
        .await;
    assert_eq!(t.state, switchyard::TaskState::Failed);
    let e = t.error.unwrap();
    assert_eq!(e.kind, switchyard::ErrorKind::InvalidInput);
    assert!(e.message.contains("response_event"), "{}", e.message);
    w.stop().await;
}
