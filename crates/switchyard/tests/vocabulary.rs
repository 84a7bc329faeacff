//! The README's vocabulary table, Rust column: every name in it exists (each
//! is referenced below, so a rename breaks the build of this test) and the
//! column lists exactly these names (so the README cannot drift either).

use serde_json::Value;
use switchyard::{
    Client, Context, Error, HandlerOptions, RunningWorker, StepError, Worker, WorkerBuilder,
};

/// Each name of the Rust column, with a reference that only compiles while
/// the item exists.
fn names() -> Vec<&'static str> {
    let _ = Worker::builder;
    let _ = Worker::start;
    let _ = RunningWorker::stop;
    let _ = |b: WorkerBuilder, o: HandlerOptions| {
        b.step("s", o.clone(), |_, _| async { Ok(Value::Null) })
            .batch(
                "b",
                o.clone(),
                |items: Vec<switchyard::BatchItem>| async move {
                    items.iter().map(|_| Ok(Value::Null)).collect()
                },
            )
            .decision("d", o.clone(), |_, _| async {
                Ok(switchyard::Decision::Complete(Value::Null))
            })
            .api("a", o, |_, _| async { Ok(Value::Null) })
    };
    let _ = |c: Context| async move { c.checkpoint("c", || async { Ok(1) }).await };
    let _ = Context::await_event;
    let _ = Context::sleep;
    let _ = Context::emit_event;
    let _ = Context::spawn_with;
    let _ = Context::spawn;
    let _ = Context::delegate;
    let _ = Context::delegate_parallel;
    let _ = Context::set_status;
    let _ = Context::heartbeat;
    let _ = Context::is_cancelled;
    let _ = Context::step_name;
    let _ = Context::attempt;
    let _ = Context::run;
    let _ = Client::result;
    let _ = Client::await_event;
    let _ = RunningWorker::health_addr;
    let _ = |e: StepError| match e {
        StepError::Permanent { .. }
        | StepError::Retryable { .. }
        | StepError::InvalidInput(_)
        | StepError::AwaitTimeout { .. }
        | StepError::Cancelled
        | StepError::LeaseLost
        | StepError::Suspend(_) => (),
    };
    let _ = |e: Error| {
        matches!(
            e,
            Error::TaskFailed { .. } | Error::TaskCancelled { .. } | Error::Timeout(_)
        )
    };
    vec![
        "Worker::builder",
        "Worker::start",
        "RunningWorker::stop",
        "WorkerBuilder::step",
        "WorkerBuilder::batch",
        "WorkerBuilder::decision",
        "WorkerBuilder::api",
        "Context::checkpoint",
        "Context::await_event",
        "Context::sleep",
        "Context::emit_event",
        "Context::spawn_with",
        "Context::spawn",
        "Context::delegate",
        "Context::delegate_parallel",
        "Context::set_status",
        "Context::heartbeat",
        "Context::is_cancelled",
        "Context::step_name",
        "Context::attempt",
        "Context::run",
        "Client::result",
        "Client::await_event",
        "RunningWorker::health_addr",
        "StepError::Permanent",
        "StepError::Retryable",
        "StepError::InvalidInput",
        "StepError::AwaitTimeout",
        "StepError::Cancelled",
        "Error::TaskFailed",
        "Error::TaskCancelled",
        "StepError::LeaseLost",
        "Error::Timeout",
    ]
}

/// The code spans of one column of the README's vocabulary table.
pub fn readme_column(language: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let section = readme
        .split("## Vocabulary")
        .nth(1)
        .expect("README has a Vocabulary section");
    let mut rows = section.lines().filter(|l| l.starts_with('|'));
    let header: Vec<&str> = rows
        .next()
        .expect("a header row")
        .split('|')
        .map(str::trim)
        .collect();
    let col = header
        .iter()
        .position(|h| *h == language)
        .unwrap_or_else(|| panic!("no `{language}` column in {header:?}"));
    let mut names = Vec::new();
    for row in rows.skip(1) {
        let cell = row.split('|').nth(col).expect("a cell per column");
        names.extend(cell.split('`').skip(1).step_by(2).map(str::to_string));
    }
    names
}

#[test]
fn the_readme_rust_column_names_exactly_what_exists() {
    let mut readme = readme_column("Rust");
    let mut here: Vec<String> = names().into_iter().map(str::to_string).collect();
    readme.sort();
    here.sort();
    assert_eq!(
        readme, here,
        "the README's Rust column and this test disagree"
    );
}

#[test]
fn result_reports_a_failed_and_a_cancelled_task_with_what_was_recorded() {
    use std::time::Duration;
    use switchyard::ErrorKind;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = switchyard::open("memory:").await.unwrap();
        let worker = Worker::builder(store.clone())
            .step("fails", HandlerOptions::default(), |_, _| async {
                Err(StepError::Permanent {
                    message: "no such customer".into(),
                    trace: Some("at line 3".into()),
                })
            })
            .step(
                "waits",
                HandlerOptions::default(),
                |_, ctx: Context| async move { ctx.await_event("never", None).await },
            )
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let client = Client::new(store);
        let id = client.spawn("fails", serde_json::json!({})).await.unwrap();
        match client.result(id, Duration::from_secs(10)).await {
            Err(Error::TaskFailed { task, error }) => {
                assert_eq!(task, id);
                assert_eq!(error.kind, ErrorKind::Permanent);
                assert_eq!(error.message, "no such customer");
                assert_eq!(error.trace.as_deref(), Some("at line 3"));
                assert_eq!(error.attempt, 1);
            }
            other => panic!("expected TaskFailed, got {other:?}"),
        }
        let id = client.spawn("waits", serde_json::json!({})).await.unwrap();
        let _ = client.wait(id, Duration::from_millis(200)).await;
        assert!(client.cancel(id, false).await.unwrap());
        match client.result(id, Duration::from_secs(10)).await {
            Err(Error::TaskCancelled { task, .. }) => assert_eq!(task, id),
            other => panic!("expected TaskCancelled, got {other:?}"),
        }
        worker.stop().await;
    });
}
