//! The foreign-handler protocol (`bridge`): a handler served through an
//! inbox by a plain thread, the way every binding serves one. Durable
//! control flow raised by a context call comes back as the class of the
//! exception that ended the handler, and the core passes on the error it
//! kept (a suspension's wait included) without any conversion.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::bridge::{raise, Consumer, ErrorClass, HostPlan, Inbox, JobKind, Reply};
use switchyard::{Client, Error, HandlerOptions, StepError, StepState, TaskState};

/// What the "foreign" handler does with one job.
fn serve(inbox: Arc<Inbox>, rt: tokio::runtime::Handle) {
    let mut c = Consumer::new(inbox);
    while let Ok(jobs) = c.next(8, Duration::from_millis(50)) {
        for job in jobs {
            let replies = job
                .items
                .iter()
                .map(|item| {
                    let ctx = &item.ctx;
                    match job.handler.as_str() {
                        // Waits 50 times in a row, then returns the count.
                        "waits" => {
                            for i in 0..50 {
                                if let Err(e) =
                                    rt.block_on(ctx.await_event(&format!("go-{i}"), None))
                                {
                                    let r = raise(ctx, e);
                                    return Reply::error(r.class, r.message, None, None);
                                }
                            }
                            Reply::Value(json!(50))
                        }
                        // Raises Suspend by hand: no context call asked for it.
                        "fake" => Reply::error(ErrorClass::Suspend, "by hand".into(), None, None),
                        // Catches an await timeout and carries on.
                        "catches" => match rt
                            .block_on(ctx.await_event("never", Some(Duration::from_millis(10))))
                        {
                            Err(e) => {
                                let r = raise(ctx, e);
                                if r.class == ErrorClass::AwaitTimeout {
                                    Reply::Value(json!({"timed_out": r.event}))
                                } else {
                                    Reply::error(r.class, r.message, None, None)
                                }
                            }
                            Ok(v) => Reply::Value(v),
                        },
                        // Lets an await timeout escape: fails permanently.
                        "escapes" => match rt
                            .block_on(ctx.await_event("never", Some(Duration::from_millis(10))))
                        {
                            Err(e) => {
                                let r = raise(ctx, e);
                                Reply::error(r.class, r.message, Some("trace".into()), None)
                            }
                            Ok(v) => Reply::Value(v),
                        },
                        other => Reply::error(
                            ErrorClass::Permanent,
                            format!("no handler {other}"),
                            None,
                            None,
                        ),
                    }
                })
                .collect();
            job.complete(replies);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_flow_raised_into_a_foreign_handler_is_passed_on_unconverted() {
    let store = switchyard::open("memory:").await.unwrap();
    let inbox = Inbox::serial();
    let mut plan = HostPlan::new(4, Duration::from_secs(30), Duration::from_secs(1), None);
    for h in ["waits", "fake", "catches", "escapes"] {
        plan.register(
            h.into(),
            JobKind::Step,
            HandlerOptions::default(),
            inbox.clone(),
        )
        .unwrap();
    }
    let worker = plan
        .build(store.clone(), switchyard::bridge::Language::C)
        .unwrap()
        .start()
        .await
        .unwrap();
    let rt = tokio::runtime::Handle::current();
    let server = {
        let inbox = inbox.clone();
        std::thread::spawn(move || serve(inbox, rt))
    };
    let client = Client::new(store);

    let waits = client.spawn("waits", Value::Null).await.unwrap();
    for i in 0..50 {
        // Each event is emitted once the step's run i+1 has suspended on it.
        loop {
            let s = &client.inspect(waits).await.unwrap().steps[0];
            if s.state == StepState::Suspended && s.run == i + 1 {
                break;
            }
            assert!(!s.state.is_terminal(), "{s:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        client.emit(&format!("go-{i}"), Value::Null).await.unwrap();
    }
    assert_eq!(
        client.result(waits, Duration::from_secs(30)).await.unwrap(),
        json!(50)
    );
    let t = client.inspect(waits).await.unwrap();
    // 51 runs, all within the first attempt: suspensions cost none.
    assert_eq!(
        (t.steps[0].attempt, t.steps[0].run),
        (1, 51),
        "{:?}",
        t.steps[0]
    );

    let fake = client.spawn("fake", Value::Null).await.unwrap();
    match client.result(fake, Duration::from_secs(10)).await {
        Err(Error::TaskFailed { error, .. }) => {
            assert!(
                error.message.contains("raised Suspend but no context call"),
                "{error:?}"
            )
        }
        other => panic!("{other:?}"),
    }

    let catches = client.spawn("catches", Value::Null).await.unwrap();
    assert_eq!(
        client
            .result(catches, Duration::from_secs(10))
            .await
            .unwrap(),
        json!({"timed_out": "never"})
    );

    let escapes = client.spawn("escapes", Value::Null).await.unwrap();
    match client.result(escapes, Duration::from_secs(10)).await {
        Err(Error::TaskFailed { error, .. }) => {
            assert_eq!(error.message, "timed out waiting for event `never`");
            assert_eq!(client.get(escapes).await.unwrap().state, TaskState::Failed);
        }
        other => panic!("{other:?}"),
    }

    worker.stop().await;
    inbox.close();
    server.join().unwrap();
    let _ = StepError::LeaseLost;
}

/// One job at a time: takes it, waits (up to 10 s) for its cancellation
/// notice, reports (handler, noticed) and answers.
fn serve_until_noticed(inbox: Arc<Inbox>, report: std::sync::mpsc::Sender<(String, bool)>) {
    while let Ok(jobs) = inbox.recv_batch(1, Duration::from_millis(50)) {
        for job in jobs {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut noticed = false;
            while !noticed && std::time::Instant::now() < deadline {
                match inbox.recv_cancels(Duration::from_millis(50)) {
                    Ok(ids) => noticed = ids.contains(&job.id),
                    Err(_) => break,
                }
            }
            let _ = report.send((job.handler.clone(), noticed));
            job.complete(vec![Reply::Value(Value::Null)]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_told_through_the_inbox_when_cancelled_timed_out_or_stopped() {
    let store = switchyard::open("memory:").await.unwrap();
    let inbox = Inbox::new();
    inbox.watch_cancels();
    let mut plan = HostPlan::new(4, Duration::from_secs(30), Duration::from_millis(300), None);
    plan.register(
        "hold".into(),
        JobKind::Step,
        HandlerOptions::default(),
        inbox.clone(),
    )
    .unwrap();
    let slow = HandlerOptions {
        timeout: Some(Duration::from_millis(300)),
        retry: switchyard::RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        },
        ..HandlerOptions::default()
    };
    plan.register("slow".into(), JobKind::Step, slow, inbox.clone())
        .unwrap();
    let worker = plan
        .build(store.clone(), switchyard::bridge::Language::C)
        .unwrap()
        .start()
        .await
        .unwrap();
    let (tx, reports) = std::sync::mpsc::channel();
    let server = {
        let inbox = inbox.clone();
        std::thread::spawn(move || serve_until_noticed(inbox, tx))
    };
    let client = Client::new(store);
    let next = || {
        reports
            .recv_timeout(Duration::from_secs(20))
            .expect("a report")
    };

    // Cancelled by a client while the binding runs it.
    let held = client.spawn("hold", Value::Null).await.unwrap();
    loop {
        let s = &client.inspect(held).await.unwrap().steps[0];
        if s.state == StepState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(client.cancel(held, false).await.unwrap());
    assert_eq!(next(), ("hold".to_string(), true));

    // Timed out by the core.
    let slow = client.spawn("slow", Value::Null).await.unwrap();
    assert_eq!(next(), ("slow".to_string(), true));
    match client.result(slow, Duration::from_secs(10)).await {
        Err(Error::TaskFailed { error, .. }) => assert!(error.message.contains("timed out")),
        other => panic!("{other:?}"),
    }

    // Handed back at shutdown (grace 300 ms).
    let stopped = client.spawn("hold", Value::Null).await.unwrap();
    loop {
        let s = &client.inspect(stopped).await.unwrap().steps[0];
        if s.state == StepState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stop = tokio::spawn(async move { worker.stop().await });
    assert_eq!(next(), ("hold".to_string(), true));
    stop.await.unwrap();
    let s = &client.inspect(stopped).await.unwrap().steps[0];
    assert_eq!(
        (s.state, s.attempt),
        (StepState::Ready, 0),
        "handed back: {s:?}"
    );
    inbox.close();
    server.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_lifecycle_is_the_same_for_every_binding() {
    use switchyard::bridge::{HandlerSpec, Host};
    let store = switchyard::open("memory:").await.unwrap();
    let host = Host::new(
        switchyard::bridge::Language::C,
        HostPlan::new(2, Duration::from_secs(30), Duration::from_millis(200), None),
    );
    let (a, b) = (Inbox::new(), Inbox::new());
    let spec = HandlerSpec::default();
    assert_eq!(
        host.register("one".into(), JobKind::Step, &spec, &a, str::to_string),
        Ok(0)
    );
    assert_eq!(
        host.register("two".into(), JobKind::Step, &spec, &b, str::to_string),
        Ok(1)
    );
    let twice = host.register("one".into(), JobKind::Step, &spec, &a, str::to_string);
    assert!(twice.unwrap_err().contains("registered twice"));
    let bad = HandlerSpec {
        timeout: Some(f64::NAN),
        ..HandlerSpec::default()
    };
    let e = host.register("three".into(), JobKind::Step, &bad, &a, |f| {
        format!("<{f}>")
    });
    assert!(
        e.unwrap_err().contains("<timeout>"),
        "options are named the binding's way"
    );
    assert!(!host.is_running());

    let id = host.start(store.clone()).await.unwrap();
    assert_eq!(host.host_id().as_deref(), Some(id.as_str()));
    assert!(host.is_running());
    assert!(matches!(
        host.start(store.clone()).await,
        Err(Error::Conflict(_))
    ));
    let late = host.register("late".into(), JobKind::Step, &spec, &a, str::to_string);
    assert!(late.unwrap_err().contains("before the worker starts"));

    // A job for handler 1 carries its id.
    let client = Client::new(store);
    client.spawn("two", json!(7)).await.unwrap();
    let jobs = loop {
        let jobs = b.recv_batch(1, Duration::from_millis(100)).unwrap();
        if !jobs.is_empty() {
            break jobs;
        }
    };
    assert_eq!((jobs[0].handler_id, jobs[0].handler.as_str()), (1, "two"));
    drop(jobs); // dropped unanswered: handed back as a retryable failure

    host.stop().await;
    assert!(!host.is_running());
    assert!(
        a.recv_batch(1, Duration::from_millis(10)).is_err(),
        "inboxes closed"
    );
    assert!(
        b.recv_batch(1, Duration::from_millis(10)).is_err(),
        "inboxes closed"
    );
    host.stop().await; // twice is harmless
}
