//! The dispatcher (issue "Foundation"): every capability and outcome, retries
//! and backoff on a fake clock, limits, priority, idempotency, cancellation,
//! payload limits, shutdown and lease loss. Every test runs against the
//! memory store, a real SQLite file and a real PostgreSQL database (a
//! throwaway server on 127.0.0.1).

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::{
    ApiError, Completion, Context, Decision, Error, ErrorKind, HandlerOptions, HostInfo, Lease,
    NewStep, NewTask, Resolution, RetryPolicy, StepError, StepResult, StepState, TaskFilter,
    TaskState, Worker,
};
use tokio::sync::Semaphore;

store_tests!(
    plain_ok,
    retryable_backs_off_on_the_fake_clock,
    retryable_exhausts_max_attempts,
    retry_after_is_honoured,
    permanent_and_invalid_input_fail_at_once,
    panic_fails_only_its_step,
    handler_timeout_is_enforced,
    batches_respect_max_batch_and_answer_per_item,
    decision_creates_steps_and_converges,
    decision_complete_finishes_the_task,
    decision_fan_out,
    routing_on_status_creates_the_routed_steps,
    routing_failures_are_named,
    invalid_decision_fails_with_invalid_input,
    unstorable_decision_names_fail_only_their_step,
    api_classification,
    api_rate_limit_all_complete,
    api_rate_limit_holds_back_when_bucket_is_empty,
    per_handler_concurrency_is_respected,
    host_concurrency_is_respected,
    nearly_full_host_still_starts_ready_steps,
    priority_then_run_at_order,
    idempotency_key_returns_the_first_task,
    cancellation_reaches_a_running_handler,
    unknown_handler_stays_ready,
    result_over_payload_limit_fails_permanently,
    spawn_over_payload_limit_stores_nothing,
    bad_input_is_rejected,
    shutdown_hands_back_running_steps,
    shutdown_lets_short_steps_finish,
    late_completion_after_lease_loss_is_rejected,
    late_run_after_lease_recovery_is_rejected,
);

async fn plain_ok(env: Env) {
    let w = env
        .worker()
        .step("greet", HandlerOptions::default(), |input, ctx| async move {
            Ok(json!({ "hello": input["name"], "attempt": ctx.attempt(), "step": ctx.step_name() }))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("greet", json!({ "name": "ada" }))
        .await
        .unwrap();
    assert_eq!(
        env.result(id).await,
        json!({ "hello": "ada", "attempt": 1, "step": "greet" })
    );
    let d = env.detail(id).await;
    assert_eq!(d.steps.len(), 1);
    assert_eq!(d.steps[0].state, StepState::Completed);
    assert_eq!(d.steps[0].attempt, 1);
    assert_eq!(
        d.steps[0].result,
        Some(json!({ "hello": "ada", "attempt": 1, "step": "greet" }))
    );
    w.stop().await;
}

async fn retryable_backs_off_on_the_fake_clock(env: Env) {
    let runs = Tally::new();
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
    };
    let r = runs.clone();
    let w = env
        .worker()
        .step(
            "flaky",
            HandlerOptions::default().retry(policy),
            move |_, ctx| {
                let r = r.clone();
                async move {
                    r.bump();
                    if ctx.attempt() < 3 {
                        return Err(StepError::retryable(format!("boom {}", ctx.attempt())));
                    }
                    Ok(json!(ctx.attempt()))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    let id = env.client.spawn("flaky", json!({})).await.unwrap();

    runs.reach(1).await;
    let s = env.wait_step(id, "flaky", StepState::Ready).await;
    assert_eq!(s.attempt, 1);
    assert_eq!(
        s.run_at,
        Some(t0 + 10_000),
        "first backoff is initial_backoff"
    );
    let err = s.error.expect("the retryable error is recorded");
    assert_eq!(err.kind, ErrorKind::Retryable);
    assert_eq!(err.message, "boom 1");

    env.advance(9_999);
    env.barrier().await;
    assert_eq!(runs.get(), 1, "re-run before run_at");

    env.advance(1);
    runs.reach(2).await;
    let s = env.wait_step(id, "flaky", StepState::Ready).await;
    // The step may be observed `ready` between the claim and the handler; wait for attempt 2's record.
    let s = if s.attempt == 2 {
        s
    } else {
        eventually("attempt 2 recorded", || async {
            let s = env.step(id, "flaky").await;
            (s.state == StepState::Ready && s.attempt == 2).then_some(s)
        })
        .await
    };
    assert_eq!(
        s.run_at,
        Some(t0 + 10_000 + 20_000),
        "second backoff doubles"
    );

    env.advance(19_999);
    env.barrier().await;
    assert_eq!(runs.get(), 2, "re-run before run_at");
    env.advance(1);
    assert_eq!(env.result(id).await, json!(3));
    assert_eq!(runs.get(), 3);
    w.stop().await;
}

async fn retryable_exhausts_max_attempts(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let w = env
        .worker()
        .step(
            "always",
            HandlerOptions::default().retry(fast_retry(3)),
            move |_, ctx| {
                let r = r.clone();
                async move {
                    r.bump();
                    Err(StepError::retryable(format!(
                        "nope on attempt {}",
                        ctx.attempt()
                    )))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("always", json!({})).await.unwrap();
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Failed);
    let err = t.error.expect("task error");
    assert_eq!(err.kind, ErrorKind::Retryable);
    assert_eq!(err.attempt, 3);
    assert!(err.message.contains("nope on attempt 3"), "{}", err.message);
    assert_eq!(runs.get(), 3);
    let s = env.step(id, "always").await;
    assert_eq!(s.state, StepState::Failed);
    assert_eq!(s.attempt, 3);
    assert_eq!(s.error.map(|e| e.kind), Some(ErrorKind::Retryable));
    w.stop().await;
}

async fn retry_after_is_honoured(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let policy = RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let w = env
        .worker()
        .step(
            "slow-down",
            HandlerOptions::default().retry(policy),
            move |_, ctx| {
                let r = r.clone();
                async move {
                    r.bump();
                    if ctx.attempt() == 1 {
                        return Err(StepError::retry_after(
                            "come back later",
                            Duration::from_secs(120),
                        ));
                    }
                    Ok(json!("ok"))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    let id = env.client.spawn("slow-down", json!({})).await.unwrap();
    let s = env.wait_step(id, "slow-down", StepState::Ready).await;
    let s = if s.attempt == 1 {
        s
    } else {
        eventually("attempt 1 recorded", || async {
            let s = env.step(id, "slow-down").await;
            (s.state == StepState::Ready && s.attempt == 1).then_some(s)
        })
        .await
    };
    assert_eq!(
        s.run_at,
        Some(t0 + 120_000),
        "retry_after beats the shorter backoff"
    );
    env.advance(119_999);
    env.barrier().await;
    assert_eq!(runs.get(), 1);
    env.advance(1);
    assert_eq!(env.result(id).await, json!("ok"));
    assert_eq!(runs.get(), 2);
    w.stop().await;
}

async fn permanent_and_invalid_input_fail_at_once(env: Env) {
    let runs = Tally::new();
    let (r1, r2) = (runs.clone(), runs.clone());
    let w = env
        .worker()
        .step(
            "perm",
            HandlerOptions::default().retry(fast_retry(5)),
            move |_, _| {
                let r = r1.clone();
                async move {
                    r.bump();
                    Err(StepError::permanent("card declined"))
                }
            },
        )
        .step(
            "picky",
            HandlerOptions::default().retry(fast_retry(5)),
            move |input, _| {
                let r = r2.clone();
                async move {
                    r.bump();
                    let _: u64 = serde_json::from_value(input["n"].clone())?;
                    Ok(json!("unreachable"))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let a = env.client.spawn("perm", json!({})).await.unwrap();
    let b = env
        .client
        .spawn("picky", json!({ "n": "not a number" }))
        .await
        .unwrap();
    let ta = env.finished(a).await;
    let tb = env.finished(b).await;
    assert_eq!(ta.state, TaskState::Failed);
    assert_eq!(tb.state, TaskState::Failed);
    let ea = ta.error.unwrap();
    let eb = tb.error.unwrap();
    assert_eq!((ea.kind, ea.attempt), (ErrorKind::Permanent, 1));
    assert_eq!(ea.message, "card declined");
    assert_eq!((eb.kind, eb.attempt), (ErrorKind::InvalidInput, 1));
    assert_eq!(runs.get(), 2, "neither was retried");
    assert_eq!(env.step(a, "perm").await.attempt, 1);
    assert_eq!(env.step(b, "picky").await.attempt, 1);
    w.stop().await;
}

async fn panic_fails_only_its_step(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let w = env
        .worker()
        .step(
            "bomb",
            HandlerOptions::default().retry(fast_retry(2)),
            move |_, _| {
                let r = r.clone();
                async move {
                    r.bump();
                    if r.get() < 100 {
                        panic!("kaboom in the handler");
                    }
                    Ok(Value::Null)
                }
            },
        )
        .step("fine", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let bomb = env.client.spawn("bomb", json!({})).await.unwrap();
    let mut fine = Vec::new();
    for i in 0..5 {
        fine.push(env.client.spawn("fine", json!(i)).await.unwrap());
    }
    for (i, id) in fine.into_iter().enumerate() {
        assert_eq!(env.result(id).await, json!(i));
    }
    let t = env.finished(bomb).await;
    assert_eq!(t.state, TaskState::Failed);
    let err = t.error.unwrap();
    assert_eq!(err.kind, ErrorKind::Retryable);
    assert!(
        err.message.contains("failed: handler panicked: "),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("kaboom in the handler"),
        "{}",
        err.message
    );
    assert_eq!(err.attempt, 2);
    assert_eq!(runs.get(), 2, "retried once, then failed");
    // The host survived: it still runs work.
    let again = env.client.spawn("fine", json!("after")).await.unwrap();
    assert_eq!(env.result(again).await, json!("after"));
    w.stop().await;
}

async fn handler_timeout_is_enforced(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let opts = HandlerOptions::default()
        .timeout(Duration::from_millis(50))
        .retry(fast_retry(2));
    let w = env
        .worker()
        .step("hang", opts, move |_, _| {
            let r = r.clone();
            async move {
                r.bump();
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("hang", json!({})).await.unwrap();
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Failed);
    let err = t.error.unwrap();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(err.message.contains("timed out"), "{}", err.message);
    assert_eq!(err.attempt, 2);
    assert_eq!(runs.get(), 2);
    w.stop().await;
}

async fn batches_respect_max_batch_and_answer_per_item(env: Env) {
    let sizes = Log::<usize>::new();
    let s = sizes.clone();
    let opts = HandlerOptions::default()
        .max_batch(3)
        .linger(Duration::from_millis(20))
        .retry(fast_retry(1));
    // Spawn first, so the first claim sees all ten and the batcher has to split them.
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(env.client.spawn("square", json!(i)).await.unwrap());
    }
    let w = env
        .worker()
        .batch("square", opts, move |items| {
            let s = s.clone();
            async move {
                s.push(items.len());
                items
                    .into_iter()
                    .map(|it| {
                        let n = it.input.as_i64().unwrap();
                        if n % 3 == 0 {
                            Err(StepError::permanent(format!("{n} is a multiple of three")))
                        } else {
                            Ok(json!(n * n))
                        }
                    })
                    .collect()
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        let t = env.finished(*id).await;
        if i % 3 == 0 {
            assert_eq!(t.state, TaskState::Failed, "item {i}");
            assert_eq!(
                t.error.unwrap().message,
                format!("{i} is a multiple of three")
            );
        } else {
            assert_eq!(t.state, TaskState::Completed, "item {i}");
            assert_eq!(t.result, Some(json!(i * i)));
        }
    }
    let sizes = sizes.all();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        10,
        "every step ran exactly once: {sizes:?}"
    );
    assert!(
        sizes.iter().all(|&n| (1..=3).contains(&n)),
        "batch over max_batch: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&n| n > 1),
        "steps were never batched: {sizes:?}"
    );
    w.stop().await;
}

fn step(name: &str, handler: &str, input: Value, deps: &[&str]) -> NewStep {
    NewStep {
        name: name.into(),
        handler: handler.into(),
        input,
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        routes: Default::default(),
    }
}

async fn decision_creates_steps_and_converges(env: Env) {
    let order = Log::<String>::new();
    let (o1, o2) = (order.clone(), order.clone());
    let w = env
        .worker()
        .decision("plan", HandlerOptions::default(), |input, _| async move {
            let n = input["n"].as_i64().unwrap();
            Ok(Decision::steps(vec![
                step("a", "work", json!(n), &[]),
                step("b", "work", json!(n * 10), &[]),
                step("sum", "sum", json!({ "label": "total" }), &["a", "b"]),
            ]))
        })
        .step("work", HandlerOptions::default(), move |input, ctx| {
            let o = o1.clone();
            async move {
                o.push(ctx.step_name().to_string());
                Ok(json!(input.as_i64().unwrap() + 1))
            }
        })
        .step("sum", HandlerOptions::default(), move |input, ctx| {
            let o = o2.clone();
            async move {
                o.push(ctx.step_name().to_string());
                let deps = ctx.dependency_results().await?;
                let total: i64 = deps.values().map(|v| v.as_i64().unwrap()).sum();
                Ok(json!({ "label": input["label"], "deps": deps, "total": total }))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("plan", json!({ "n": 2 })).await.unwrap();
    let r = env.result(id).await;
    assert_eq!(
        r,
        json!({ "label": "total", "deps": { "a": 3, "b": 21 }, "total": 24 })
    );
    let order = order.all();
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order[2], "sum", "the convergence step ran last: {order:?}");
    let d = env.detail(id).await;
    let names: Vec<&str> = d.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["plan", "a", "b", "sum"]);
    assert!(d.steps.iter().all(|s| s.state == StepState::Completed));
    assert_eq!(d.steps[3].depends_on, ["a", "b"]);
    w.stop().await;
}

async fn decision_complete_finishes_the_task(env: Env) {
    let w = env
        .worker()
        .decision("maybe", HandlerOptions::default(), |input, _| async move {
            Ok(Decision::Complete(json!({ "nothing to do for": input })))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("maybe", json!("x")).await.unwrap();
    assert_eq!(env.result(id).await, json!({ "nothing to do for": "x" }));
    assert_eq!(env.detail(id).await.steps.len(), 1);
    w.stop().await;
}

async fn decision_fan_out(env: Env) {
    let w = env
        .worker()
        .decision("split", HandlerOptions::default(), |input, _| async move {
            Ok(Decision::fan_out("part", input["total"].as_u64().unwrap(), 4, json!({ "tag": "t" }), "join"))
        })
        .step("part", HandlerOptions::default(), |input, _| async move {
            assert_eq!(input["input"], json!({ "tag": "t" }));
            let (start, end) = (input["start"].as_u64().unwrap(), input["end"].as_u64().unwrap());
            assert_eq!(input["size"].as_u64().unwrap(), end - start);
            Ok(json!((start..end).sum::<u64>()))
        })
        .step("join", HandlerOptions::default(), |input, ctx| async move {
            let deps = ctx.dependency_results().await?;
            let names: Vec<String> = deps.keys().cloned().collect();
            let total: u64 = deps.values().map(|v| v.as_u64().unwrap()).sum();
            Ok(json!({ "names": names, "sum": total, "batches": input["batches"], "total": input["total"] }))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env
        .client
        .spawn("split", json!({ "total": 10 }))
        .await
        .unwrap();
    assert_eq!(
        env.result(id).await,
        json!({ "names": ["part#0", "part#1", "part#2"], "sum": 45, "batches": 3, "total": 10 })
    );
    assert_eq!(env.detail(id).await.steps.len(), 5);
    w.stop().await;
}

/// Issue item 4: a decision naming a step, handler or dependency with a NUL
/// or a 3 KB name (which PostgreSQL refuses for the whole completion batch)
/// fails only its own step with `InvalidInput` naming the field; the other
/// decisions finishing at the same time (so recorded in the same batches)
/// create their steps.
async fn unstorable_decision_names_fail_only_their_step(env: Env) {
    let long = "n".repeat(3000);
    // (name, handler, dependency of the second step, expected message parts)
    let cases: Vec<(String, String, String, [&str; 2])> = vec![
        (
            "a\0b".into(),
            "noop".into(),
            "x".into(),
            ["decision step #0 `name`", "control characters"],
        ),
        (
            long.clone(),
            "noop".into(),
            "x".into(),
            ["decision step #0 `name`", "3000 bytes long"],
        ),
        (
            "x".into(),
            "no\0op".into(),
            "x".into(),
            ["decision step #0 (`x`) `handler`", "control characters"],
        ),
        (
            "x".into(),
            long.clone(),
            "x".into(),
            ["decision step #0 (`x`) `handler`", "3000 bytes long"],
        ),
        (
            "x".into(),
            "noop".into(),
            "gh\0st".into(),
            [
                "decision step #1 (`y`) `depends_on[0]`",
                "control characters",
            ],
        ),
        (
            "x".into(),
            "noop".into(),
            long.clone(),
            ["decision step #1 (`y`) `depends_on[0]`", "3000 bytes long"],
        ),
    ];
    let good = 6;
    let all = cases.len() + good;
    let decided = Arc::new(tokio::sync::Barrier::new(all));
    let w = env
        .worker()
        .decision("plan", HandlerOptions::default(), move |input, _| {
            let decided = decided.clone();
            async move {
                let s = |k: &str| input[k].as_str().unwrap().to_string();
                // Every decision returns at once, so outcomes share batches.
                decided.wait().await;
                Ok(Decision::steps(vec![
                    NewStep {
                        name: s("name"),
                        handler: s("handler"),
                        input: json!(1),
                        depends_on: vec![],
                        routes: Default::default(),
                    },
                    NewStep {
                        name: "y".into(),
                        handler: "noop".into(),
                        input: json!(2),
                        depends_on: vec![s("dep")],
                        routes: Default::default(),
                    },
                ]))
            }
        })
        .step("noop", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut bad = Vec::new();
    for (name, handler, dep, _) in &cases {
        let input = json!({ "name": name, "handler": handler, "dep": dep });
        bad.push(env.client.spawn("plan", input).await.unwrap());
    }
    let mut fine = Vec::new();
    for _ in 0..good {
        let input = json!({ "name": "x", "handler": "noop", "dep": "x" });
        fine.push(env.client.spawn("plan", input).await.unwrap());
    }
    for (id, (.., want)) in bad.iter().zip(&cases) {
        let t = env.finished(*id).await;
        assert_eq!(t.state, TaskState::Failed, "{want:?}");
        let e = t.error.unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{want:?}: {}", e.message);
        for part in want {
            assert!(
                e.message.contains(part),
                "`{}` should mention `{part}`",
                e.message
            );
        }
        let d = env.detail(*id).await;
        assert_eq!(d.steps.len(), 1, "nothing of the decision was written");
        assert_eq!(d.steps[0].state, StepState::Failed);
    }
    for id in fine {
        assert_eq!(env.result(id).await, json!(2));
        assert_eq!(env.detail(id).await.steps.len(), 3);
    }
    w.stop().await;
}

/// An order plans one `check` step routed on its status: `ok` ships,
/// `out_of_stock` backorders, and the backorder is itself routed. The routed
/// steps read the check's result, the last routed step's result is the
/// task's, and the status and routes are recorded with the step. The status
/// belongs to a run: a first run that set one and then failed does not leak
/// it into the retry.
async fn routing_on_status_creates_the_routed_steps(env: Env) {
    let w = env
        .worker()
        .decision("order", HandlerOptions::default(), |input, _| async move {
            let notify = NewStep::new("notify", "echo", json!("customer told"));
            Ok(Decision::steps(vec![NewStep::new(
                "check",
                "inventory.check",
                input,
            )
            .route("ok", vec![NewStep::new("ship", "echo", json!("shipped"))])
            .route(
                "out_of_stock",
                vec![NewStep::new("backorder", "echo", json!("backordered"))
                    .route("ok", vec![notify])],
            )]))
        })
        .step(
            "inventory.check",
            HandlerOptions::default().retry(fast_retry(3)),
            |input, ctx| async move {
                if input["flaky"] == true && ctx.attempt() == 1 {
                    ctx.set_status("out_of_stock")?;
                    return Err(StepError::retryable("warehouse timed out"));
                }
                let qty = input["qty"].as_i64().unwrap();
                if qty > 5 {
                    ctx.set_status("out_of_stock")?;
                    return Ok(json!({ "missing": qty - 5 }));
                }
                Ok(json!({ "reserved": qty }))
            },
        )
        .step("echo", HandlerOptions::default(), |input, ctx| async move {
            let deps = ctx.dependency_results().await?;
            Ok(json!({ "said": input, "saw": deps }))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    let in_stock = env
        .client
        .spawn("order", json!({ "qty": 2 }))
        .await
        .unwrap();
    assert_eq!(
        env.result(in_stock).await,
        json!({ "said": "shipped", "saw": { "check": { "reserved": 2 } } })
    );
    let d = env.detail(in_stock).await;
    let names: Vec<&str> = d.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["order", "check", "ship"], "only the `ok` route ran");
    let check = &d.steps[1];
    assert_eq!(check.status.as_deref(), Some("ok"));
    assert_eq!(
        check.routes.keys().collect::<Vec<_>>(),
        ["ok", "out_of_stock"],
        "the routes are stored with the step"
    );
    assert_eq!(d.steps[2].depends_on, ["check"]);

    let short = env
        .client
        .spawn("order", json!({ "qty": 9 }))
        .await
        .unwrap();
    assert_eq!(
        env.result(short).await,
        json!({ "said": "customer told", "saw": { "backorder": { "said": "backordered", "saw": { "check": { "missing": 4 } } } } }),
        "a routed step's own routes run too"
    );
    let d = env.detail(short).await;
    let names: Vec<&str> = d.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["order", "check", "backorder", "notify"]);
    assert_eq!(d.steps[1].status.as_deref(), Some("out_of_stock"));
    assert_eq!(d.steps[2].status.as_deref(), Some("ok"));
    assert_eq!(
        d.steps[3].status, None,
        "an unrouted step that set no status has none"
    );

    let flaky = env
        .client
        .spawn("order", json!({ "qty": 1, "flaky": true }))
        .await
        .unwrap();
    assert_eq!(
        env.result(flaky).await["said"],
        json!("shipped"),
        "the failed first run's status did not carry over to the retry"
    );
    assert_eq!(env.step(flaky, "check").await.status.as_deref(), Some("ok"));
    w.stop().await;
}

/// A status the step has no route for, a status that is no name, and a
/// decision handler setting a status each fail their step with a message
/// naming what was wrong; a status on an unrouted step is only recorded.
async fn routing_failures_are_named(env: Env) {
    let w = env
        .worker()
        .decision("plan", HandlerOptions::default(), |input, _| async move {
            Ok(Decision::steps(vec![NewStep::new(
                "check", "status", input,
            )
            .route("ok", vec![NewStep::new("next", "status", json!({}))])]))
        })
        .decision("deciding", HandlerOptions::default(), |_, ctx| async move {
            ctx.set_status("ok")?;
            Ok(Decision::Complete(json!(1)))
        })
        .step(
            "status",
            HandlerOptions::default(),
            |input, ctx| async move {
                if let Some(s) = input["set"].as_str() {
                    ctx.set_status(s)?;
                }
                Ok(json!("done"))
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    let id = env
        .client
        .spawn("plan", json!({ "set": "mystery" }))
        .await
        .unwrap();
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Failed);
    let e = t.error.unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert_eq!(
        e.message,
        "step `check` ended with status `mystery`, which has no route (its routes: `ok`)"
    );
    assert_eq!(env.detail(id).await.steps.len(), 2, "nothing was routed");

    let id = env
        .client
        .spawn("plan", json!({ "set": "" }))
        .await
        .unwrap();
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Failed);
    let e = t.error.unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("status"), "{}", e.message);

    let id = env.client.spawn("deciding", json!({})).await.unwrap();
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.error
            .unwrap()
            .message
            .contains("decision handler `deciding` set status `ok`"),
        "a decision cannot be routed"
    );

    let id = env
        .client
        .spawn("status", json!({ "set": "checked" }))
        .await
        .unwrap();
    assert_eq!(env.result(id).await, json!("done"));
    assert_eq!(
        env.step(id, "status").await.status.as_deref(),
        Some("checked"),
        "an unrouted step's status is recorded"
    );
    w.stop().await;
}

async fn invalid_decision_fails_with_invalid_input(env: Env) {
    let w = env
        .worker()
        .decision(
            "bad-plan",
            HandlerOptions::default().retry(fast_retry(2)),
            |input, _| async move {
                let steps = if input["kind"] == "duplicate" {
                    vec![
                        step("x", "noop", json!(1), &[]),
                        step("x", "noop", json!(2), &[]),
                    ]
                } else {
                    vec![step("x", "noop", json!(1), &["ghost"])]
                };
                Ok(Decision::steps(steps))
            },
        )
        .step("noop", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for kind in ["duplicate", "unknown-dependency"] {
        let id = env
            .client
            .spawn("bad-plan", json!({ "kind": kind }))
            .await
            .unwrap();
        let t = env.finished(id).await;
        assert_eq!(t.state, TaskState::Failed, "{kind}");
        assert_eq!(t.error.unwrap().kind, ErrorKind::InvalidInput, "{kind}");
        let d = env.detail(id).await;
        assert_eq!(
            d.steps.len(),
            1,
            "{kind}: no step of an invalid decision was created"
        );
        assert_eq!(d.steps[0].state, StepState::Failed);
        assert_eq!(
            d.steps[0].attempt, 1,
            "{kind}: an invalid decision is not retried"
        );
    }
    w.stop().await;
}

async fn api_classification(env: Env) {
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::ZERO,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let w = env
        .worker()
        .api(
            "remote",
            HandlerOptions::default().retry(policy),
            |input, ctx| async move {
                let mode = input["mode"].as_str().unwrap().to_string();
                if ctx.attempt() == 1 {
                    let http = |status, retry_after| ApiError::Http {
                        status,
                        retry_after,
                        message: "nope".into(),
                    };
                    match mode.as_str() {
                        "429" => return Err(http(429, ApiError::parse_retry_after("30"))),
                        "404" => return Err(http(404, None)),
                        "503" => return Err(http(503, None)),
                        "network" => return Err(ApiError::Network("connection reset".into())),
                        _ => {}
                    }
                }
                Ok(json!({ "mode": mode, "attempt": ctx.attempt() }))
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let t0 = env.now().await;
    let spawn = |mode: &str| env.client.spawn("remote", json!({ "mode": mode }));
    let ok = spawn("200").await.unwrap();
    let throttled = spawn("429").await.unwrap();
    let missing = spawn("404").await.unwrap();
    let unavailable = spawn("503").await.unwrap();
    let network = spawn("network").await.unwrap();

    assert_eq!(env.result(ok).await, json!({ "mode": "200", "attempt": 1 }));
    assert_eq!(
        env.result(unavailable).await,
        json!({ "mode": "503", "attempt": 2 })
    );
    assert_eq!(
        env.result(network).await,
        json!({ "mode": "network", "attempt": 2 })
    );
    let m = env.finished(missing).await;
    assert_eq!(m.state, TaskState::Failed);
    let e = m.error.unwrap();
    assert_eq!((e.kind, e.attempt), (ErrorKind::Permanent, 1));
    assert!(e.message.contains("HTTP 404"), "{}", e.message);

    let s = eventually("the 429 to be recorded", || async {
        let s = env.step(throttled, "remote").await;
        (s.state == StepState::Ready && s.attempt == 1).then_some(s)
    })
    .await;
    assert_eq!(s.run_at, Some(t0 + 30_000), "Retry-After honoured");
    assert!(s.error.unwrap().message.contains("HTTP 429"));
    env.advance(29_999);
    env.barrier().await;
    assert_eq!(env.step(throttled, "remote").await.attempt, 1);
    env.advance(1);
    assert_eq!(
        env.result(throttled).await,
        json!({ "mode": "429", "attempt": 2 })
    );
    w.stop().await;
}

async fn api_rate_limit_all_complete(env: Env) {
    let w = env
        .worker()
        .api(
            "limited",
            HandlerOptions::default().rate_limit(1000.0, 5),
            |input, _| async move { Ok(input) },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(env.client.spawn("limited", json!(i)).await.unwrap());
    }
    for (i, id) in ids.into_iter().enumerate() {
        assert_eq!(env.result(id).await, json!(i));
    }
    w.stop().await;
}

/// A bucket that refills once in 1000 s: exactly `burst` steps start, the
/// rest stay ready (asserting behaviour, not timing).
async fn api_rate_limit_holds_back_when_bucket_is_empty(env: Env) {
    let starts = Tally::new();
    let s = starts.clone();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(env.client.spawn("scarce", json!(i)).await.unwrap());
    }
    let w = env
        .worker()
        .api(
            "scarce",
            HandlerOptions::default().rate_limit(0.001, 3),
            move |input, _| {
                let s = s.clone();
                async move {
                    s.bump();
                    Ok(input)
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    starts.reach(3).await;
    eventually("three tasks to complete", || async {
        let done = env
            .client
            .list(&TaskFilter {
                state: Some(TaskState::Completed),
                handler: Some("scarce".into()),
                limit: 0,
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        (done.len() == 3).then_some(())
    })
    .await;
    env.barrier().await;
    assert_eq!(starts.get(), 3, "the bucket was empty");
    let mut ready = 0;
    for id in ids {
        if env.step(id, "scarce").await.state == StepState::Ready {
            ready += 1;
        }
    }
    assert_eq!(ready, 2);
    w.stop().await;
}

type BoxStep = Pin<Box<dyn Future<Output = StepResult> + Send>>;

/// A handler whose runs block until the test hands out permits; `gauge`
/// sees how many run at once, `started` counts starts.
fn blocking(
    gauge: Arc<Gauge>,
    started: Arc<Tally>,
    permits: Arc<Semaphore>,
) -> impl Fn(Value, Context) -> BoxStep + Send + Sync + 'static {
    move |input, _ctx| {
        let (g, s, p) = (gauge.clone(), started.clone(), permits.clone());
        Box::pin(async move {
            g.enter();
            s.bump();
            p.acquire().await.expect("semaphore open").forget();
            g.leave();
            Ok(input)
        })
    }
}

async fn per_handler_concurrency_is_respected(env: Env) {
    let (gauge, started, permits) = (Gauge::new(), Tally::new(), Arc::new(Semaphore::new(0)));
    let w = env
        .worker()
        .step(
            "narrow",
            HandlerOptions::default().concurrency(3),
            blocking(gauge.clone(), started.clone(), permits.clone()),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(env.client.spawn("narrow", json!(i)).await.unwrap());
    }
    started.reach(3).await;
    // Other handlers still run, and meanwhile no fourth `narrow` started.
    env.barrier().await;
    assert_eq!(started.get(), 3);
    for k in 4..=10 {
        permits.add_permits(1);
        started.reach(k).await;
    }
    permits.add_permits(3);
    for (i, id) in ids.into_iter().enumerate() {
        assert_eq!(env.result(id).await, json!(i));
    }
    assert_eq!(
        gauge.max(),
        3,
        "at most 3 ran at once, and the limit was used"
    );
    w.stop().await;
}

async fn host_concurrency_is_respected(env: Env) {
    let (gauge, started, permits) = (Gauge::new(), Tally::new(), Arc::new(Semaphore::new(0)));
    let w = Worker::builder(env.store.clone())
        .concurrency(2)
        .step(
            "left",
            HandlerOptions::default().concurrency(10),
            blocking(gauge.clone(), started.clone(), permits.clone()),
        )
        .step(
            "right",
            HandlerOptions::default().concurrency(10),
            blocking(gauge.clone(), started.clone(), permits.clone()),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(env.client.spawn("left", json!(i)).await.unwrap());
        ids.push(env.client.spawn("right", json!(i)).await.unwrap());
    }
    started.reach(2).await;
    for k in 3..=6 {
        permits.add_permits(1);
        started.reach(k).await;
    }
    permits.add_permits(2);
    for id in ids {
        env.finished(id).await;
    }
    assert_eq!(gauge.max(), 2, "at most 2 ran at once over both handlers");
    w.stop().await;
}

/// With 15 of 16 host slots busy with long steps, the free slot still takes
/// a ready step of another handler.
async fn nearly_full_host_still_starts_ready_steps(env: Env) {
    let (gauge, started, permits) = (Gauge::new(), Tally::new(), Arc::new(Semaphore::new(0)));
    let w = Worker::builder(env.store.clone())
        .concurrency(16)
        .shutdown_grace(Duration::from_millis(200))
        .step(
            "long",
            HandlerOptions::default().concurrency(15),
            blocking(gauge, started.clone(), permits.clone()),
        )
        .step("quick", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for i in 0..15 {
        env.client.spawn("long", json!(i)).await.unwrap();
    }
    started.reach(15).await;
    let quick = env.client.spawn("quick", json!("now")).await.unwrap();
    let t = env.client.wait(quick, Duration::from_secs(5)).await;
    permits.add_permits(15);
    let t = t.expect("a ready step waited although the host had a free slot");
    assert_eq!(t.result, Some(json!("now")));
    w.stop().await;
}

async fn priority_then_run_at_order(env: Env) {
    let order = Log::<String>::new();
    let o = order.clone();
    let t0 = env.now().await;
    let tasks = [
        NewTask::new("ordered", json!("A")).priority(0),
        NewTask::new("ordered", json!("B"))
            .priority(5)
            .run_at(t0 - 1_000),
        NewTask::new("ordered", json!("C")).priority(1),
        NewTask::new("ordered", json!("D"))
            .priority(5)
            .run_at(t0 - 2_000),
        NewTask::new("ordered", json!("E"))
            .priority(0)
            .run_at(t0 - 5_000),
    ];
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(env.client.spawn_task(t).await.unwrap().task_id);
    }
    let w = Worker::builder(env.store.clone())
        .concurrency(1)
        .step("ordered", HandlerOptions::default(), move |input, _| {
            let o = o.clone();
            async move {
                o.push(input.as_str().unwrap().to_string());
                Ok(input)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for id in ids {
        env.finished(id).await;
    }
    assert_eq!(order.all(), ["D", "B", "C", "E", "A"]);
    w.stop().await;
}

async fn idempotency_key_returns_the_first_task(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let w = env
        .worker()
        .step("once", HandlerOptions::default(), move |input, _| {
            let r = r.clone();
            async move {
                r.bump();
                Ok(input)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let a = env
        .client
        .spawn_task(NewTask::new("once", json!(1)).idempotency_key("order-42"))
        .await
        .unwrap();
    let b = env
        .client
        .spawn_task(NewTask::new("once", json!(2)).idempotency_key("order-42"))
        .await
        .unwrap();
    assert!(a.created);
    assert!(!b.created);
    assert_eq!(a.task_id, b.task_id);
    assert_eq!(env.result(a.task_id).await, json!(1));
    // Also after the task finished.
    let c = env
        .client
        .spawn_task(NewTask::new("once", json!(3)).idempotency_key("order-42"))
        .await
        .unwrap();
    assert_eq!((c.task_id, c.created), (a.task_id, false));
    env.barrier().await;
    assert_eq!(runs.get(), 1);
    let all = env
        .client
        .list(&TaskFilter {
            handler: Some("once".into()),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    w.stop().await;
}

async fn cancellation_reaches_a_running_handler(env: Env) {
    let (started, seen) = (Tally::new(), Tally::new());
    let (s1, s2) = (started.clone(), seen.clone());
    let w = env
        .worker()
        .step("long", HandlerOptions::default(), move |_, ctx| {
            let (started, seen) = (s1.clone(), s2.clone());
            async move {
                assert!(!ctx.is_cancelled());
                started.bump();
                ctx.cancelled().await;
                assert!(ctx.is_cancelled());
                seen.bump();
                Err(StepError::Cancelled)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("long", json!({})).await.unwrap();
    started.reach(1).await;
    assert!(env.client.cancel(id, false).await.unwrap());
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Cancelled);
    assert_eq!(env.step(id, "long").await.state, StepState::Cancelled);
    assert!(
        !env.client.cancel(id, false).await.unwrap(),
        "already finished"
    );
    // The handler saw the token fire and returned on its own.
    seen.reach(1).await;
    w.stop().await;
    let t = env.client.get(id).await.unwrap();
    assert_eq!(
        t.state,
        TaskState::Cancelled,
        "the handler's end did not overwrite the cancellation"
    );
}

async fn unknown_handler_stays_ready(env: Env) {
    let w = env
        .worker()
        .step("known", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let orphan = env
        .client
        .spawn("nobody-serves-this", json!({}))
        .await
        .unwrap();
    let known = env.client.spawn("known", json!(7)).await.unwrap();
    assert_eq!(env.result(known).await, json!(7));
    env.barrier().await;
    let d = env.detail(orphan).await;
    assert_eq!(d.task.state, TaskState::Running);
    assert_eq!(d.steps[0].state, StepState::Ready);
    assert_eq!(d.steps[0].attempt, 0);
    w.stop().await;
}

async fn result_over_payload_limit_fails_permanently(env: Env) {
    let runs = Tally::new();
    let r = runs.clone();
    let w = env
        .worker()
        .max_payload_bytes(100)
        .step(
            "big",
            HandlerOptions::default().retry(fast_retry(5)),
            move |_, _| {
                let r = r.clone();
                async move {
                    r.bump();
                    Ok(json!("x".repeat(1000)))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("big", json!({})).await.unwrap();
    let t = env.finished(id).await;
    assert_eq!(t.state, TaskState::Failed);
    let e = t.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Permanent);
    let size = switchyard::client::json_size(&json!("x".repeat(1000)));
    assert!(
        e.message.contains(&size.to_string()) && e.message.contains("100"),
        "{}",
        e.message
    );
    assert!(e.message.contains("result"), "{}", e.message);
    assert_eq!(runs.get(), 1, "not retried");
    assert_eq!(env.step(id, "big").await.result, None);
    w.stop().await;
}

async fn spawn_over_payload_limit_stores_nothing(env: Env) {
    let client = env.client.clone().with_max_payload(100);
    let big = json!({ "blob": "y".repeat(500) });
    match client.spawn("h", big.clone()).await {
        Err(Error::PayloadTooLarge { what, size, limit }) => {
            assert_eq!(what, "input");
            assert_eq!(size, switchyard::client::json_size(&big));
            assert_eq!(limit, 100);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let batch = vec![NewTask::new("h", json!(1)), NewTask::new("h", big.clone())];
    match client.spawn_many(batch).await {
        Err(Error::PayloadTooLarge { what, .. }) => assert!(what.contains("#1"), "{what}"),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert!(matches!(
        client.emit("ev", big).await,
        Err(Error::PayloadTooLarge { .. })
    ));
    assert!(
        env.client
            .list(&TaskFilter::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing stored"
    );
    assert!(env.client.events(0).await.unwrap().is_empty());
}

async fn bad_input_is_rejected(env: Env) {
    for name in ["", "   ", "a\nb"] {
        match env.client.spawn(name, json!({})).await {
            Err(Error::InvalidInput(m)) => assert!(m.contains("handler name"), "{m}"),
            other => panic!("handler name {name:?}: expected InvalidInput, got {other:?}"),
        }
    }
    let t = NewTask::new("h", json!({})).response_event("");
    assert!(matches!(
        env.client.spawn_task(t).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        env.client.emit("", json!(1)).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(
        env.client
            .list(&TaskFilter::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing stored"
    );
    let built = Worker::builder(env.store.clone())
        .step("", HandlerOptions::default(), |i, _| async move { Ok(i) })
        .build();
    assert!(
        matches!(built, Err(Error::InvalidInput(_))),
        "empty handler name registered"
    );
    assert!(matches!(
        Worker::builder(env.store.clone()).build(),
        Err(Error::Config(_))
    ));
    let twice = Worker::builder(env.store.clone())
        .step("h", HandlerOptions::default(), |i, _| async move { Ok(i) })
        .step("h", HandlerOptions::default(), |i, _| async move { Ok(i) })
        .build();
    assert!(matches!(twice, Err(Error::Config(_))));
}

async fn shutdown_hands_back_running_steps(env: Env) {
    let started = Tally::new();
    let s = started.clone();
    let w = env
        .worker()
        .shutdown_grace(Duration::from_millis(50))
        .step("long", HandlerOptions::default(), move |_, _| {
            let s = s.clone();
            async move {
                s.bump();
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("long", json!({})).await.unwrap();
    started.reach(1).await;
    assert_eq!(env.step(id, "long").await.state, StepState::Running);
    w.stop().await;
    let s = env.step(id, "long").await;
    assert_eq!(s.state, StepState::Ready, "handed back");
    assert_eq!(s.attempt, 0, "the interrupted run did not cost an attempt");
    assert_eq!(env.client.get(id).await.unwrap().state, TaskState::Running);
    assert!(
        env.client.workers().await.unwrap().is_empty(),
        "the host deregistered"
    );

    let w2 = env
        .worker()
        .step("long", HandlerOptions::default(), |_, ctx| async move {
            Ok(json!(ctx.attempt()))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert_eq!(env.result(id).await, json!(1));
    w2.stop().await;
}

async fn shutdown_lets_short_steps_finish(env: Env) {
    let (gauge, started, permits) = (Gauge::new(), Tally::new(), Arc::new(Semaphore::new(0)));
    let w = env
        .worker()
        .shutdown_grace(Duration::from_secs(30))
        .step(
            "short",
            HandlerOptions::default(),
            blocking(gauge, started.clone(), permits.clone()),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("short", json!("done")).await.unwrap();
    started.reach(1).await;
    w.shutdown();
    permits.add_permits(1);
    w.wait().await;
    assert_eq!(env.result(id).await, json!("done"));
    // A stopped host claims nothing.
    let later = env.client.spawn("short", json!("later")).await.unwrap();
    assert_eq!(env.step(later, "short").await.state, StepState::Ready);
    assert_eq!(started.get(), 1);
}

fn host(id: &str) -> HostInfo {
    HostInfo {
        id: id.into(),
        pid: std::process::id(),
        hostname: "test".into(),
        name: None,
        handlers: vec!["manual".into()],
        started_at: 0,
        last_heartbeat: 0,
        language: None,
        slots: None,
        ended_at: None,
        end_reason: None,
    }
}

/// Straight on the store: a host whose lease expired cannot complete,
/// checkpoint or heartbeat the step any more, before or after another host
/// took it over.
async fn late_completion_after_lease_loss_is_rejected(env: Env) {
    let store = &env.store;
    let id = env.client.spawn("manual", json!({})).await.unwrap();
    let wants = [("manual".to_string(), 1)];
    let a = store.claim("host-a", &wants, 1_000).await.unwrap();
    assert_eq!(a.steps.len(), 1);
    let step_id = a.steps[0].step_id;
    let lease_a = Lease {
        step_id,
        task_id: id,
        attempt: a.steps[0].attempt,
        run: a.steps[0].run,
        host_id: "host-a".into(),
    };
    assert_eq!(lease_a.attempt, 1);

    env.clock.advance(1_001);
    assert_eq!(store.recover_expired().await.unwrap(), 1);
    let s = env.step(id, "manual").await;
    assert_eq!(s.state, StepState::Ready);
    assert_eq!(s.attempt, 1, "the lost run cost an attempt");
    assert_eq!(s.error.map(|e| e.kind), Some(ErrorKind::LeaseExpired));

    let late = |lease: &Lease, v: &str| {
        vec![Completion {
            lease: lease.clone(),
            resolution: Resolution::Completed(json!(v)),
        }]
    };
    let r = store.complete(late(&lease_a, "late a")).await.unwrap();
    assert!(
        matches!(r[0], Err(Error::LeaseLost(s)) if s == step_id),
        "{r:?}"
    );
    assert!(matches!(
        store
            .put_checkpoint(&lease_a, "manual/x", json!(1), 1_000)
            .await,
        Err(Error::LeaseLost(_))
    ));
    let run_a = switchyard::RunRef {
        step_id,
        run: lease_a.run,
    };
    let beat = store
        .heartbeat(&host("host-a"), &[run_a], 1_000)
        .await
        .unwrap();
    assert_eq!(beat.lost, [run_a]);

    let b = store.claim("host-b", &wants, 1_000).await.unwrap();
    assert_eq!(b.steps.len(), 1);
    let lease_b = Lease {
        step_id,
        task_id: id,
        attempt: b.steps[0].attempt,
        run: b.steps[0].run,
        host_id: "host-b".into(),
    };
    assert_eq!(lease_b.attempt, 2);
    let r = store.complete(late(&lease_a, "late a")).await.unwrap();
    assert!(matches!(r[0], Err(Error::LeaseLost(_))), "{r:?}");
    let r = store.complete(late(&lease_b, "from b")).await.unwrap();
    assert!(r[0].is_ok(), "{r:?}");
    let r = store.complete(late(&lease_b, "twice")).await.unwrap();
    assert!(
        matches!(r[0], Err(Error::LeaseLost(_))),
        "a second completion is rejected: {r:?}"
    );
    assert_eq!(env.result(id).await, json!("from b"));
}

/// Through a worker: attempt 1 outlives its lease; the store makes the step
/// ready again, attempt 2 completes; attempt 1's late checkpoint and result
/// are rejected.
async fn late_run_after_lease_recovery_is_rejected(env: Env) {
    let (started, gate, outcomes) = (
        Tally::new(),
        Arc::new(Semaphore::new(0)),
        Log::<String>::new(),
    );
    let (s, g, o) = (started.clone(), gate.clone(), outcomes.clone());
    let w = env
        .worker()
        .lease(Duration::from_secs(30))
        // No heartbeat during the test: the test expires the lease itself.
        .heartbeat(Duration::from_secs(3600))
        .step("outlive", HandlerOptions::default(), move |_, ctx| {
            let (s, g, o) = (s.clone(), g.clone(), o.clone());
            async move {
                if ctx.attempt() == 1 {
                    s.bump();
                    g.acquire().await.expect("gate").forget();
                    let r = ctx.checkpoint("late", || async { Ok(1) }).await;
                    o.push(format!("{r:?}"));
                    return Ok(json!("from attempt 1"));
                }
                Ok(json!("from attempt 2"))
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let id = env.client.spawn("outlive", json!({})).await.unwrap();
    started.reach(1).await;
    env.clock.advance(30_001);
    assert_eq!(env.store.recover_expired().await.unwrap(), 1);
    env.store.signals().notify_ready();
    assert_eq!(env.result(id).await, json!("from attempt 2"));
    gate.add_permits(1);
    let seen = eventually("attempt 1 to finish", || async { outcomes.all().pop() }).await;
    assert_eq!(seen, format!("{:?}", Err::<i32, _>(StepError::LeaseLost)));
    w.stop().await; // flushes attempt 1's (rejected) completion
    let d = env.detail(id).await;
    assert_eq!(d.task.result, Some(json!("from attempt 2")));
    assert_eq!(d.steps[0].attempt, 2);
    assert!(
        d.checkpoints.is_empty(),
        "the late checkpoint was not written: {:?}",
        d.checkpoints
    );
}
