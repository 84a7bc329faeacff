//! Runs the store contract suite (`switchyard_store::contract`) against every
//! store, plus SQLite-file checks that need a real file.
//!
//! Run with `cargo test -p switchyard-store --features contract --test contract`.

use std::process::Command;

use serde_json::json;
use switchyard_core::{NewTask, StepState, TaskFilter, TaskState};
use switchyard_store::contract::{factory, Factory, Opened};
use switchyard_store::{contract_suite, open, open_with, StoreOptions};

/// A fresh in-memory store per test.
fn memory_store() -> Factory {
    factory(|clock| async move {
        let store = open_with(
            "memory",
            StoreOptions {
                clock,
                migrate: true,
                create: true,
            },
        )
        .await
        .expect("open memory store");
        Opened::new(store)
    })
}

/// A fresh SQLite file per test, in a temporary directory removed when the
/// test ends.
fn sqlite_store() -> Factory {
    factory(|clock| async move {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let url = format!("sqlite:{}", dir.path().join("switchyard.db").display());
        let store = open_with(
            &url,
            StoreOptions {
                clock,
                migrate: true,
                create: true,
            },
        )
        .await
        .expect("open sqlite store");
        Opened::with_guard(store, dir)
    })
}

contract_suite!(memory, memory_store());
contract_suite!(sqlite, sqlite_store());

/// Tells [`sqlite_child_process_writes`] which file to write.
const CHILD_DB: &str = "SWITCHYARD_CONTRACT_CHILD_DB";

/// What another process wrote to a SQLite file is there for a process that
/// opens the file afterwards: the task (and its idempotency key), its
/// checkpoint, the lease on its root step and a cached event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_shared_across_processes() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("shared.db");
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "sqlite_child_process_writes",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, &path)
        .output()
        .expect("run the child process");
    assert!(
        output.status.success(),
        "child process failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child test ran"
    );

    let store = open(&format!("sqlite:{}", path.display()))
        .await
        .expect("open the child's file");
    let again = store
        .spawn(vec![
            NewTask::new("durable", json!("second")).idempotency_key("durable-1")
        ])
        .await
        .expect("spawn");
    assert!(
        !again[0].created,
        "the idempotency key written by the other process is known"
    );
    let id = again[0].task_id;
    let task = store
        .get_task(id)
        .await
        .unwrap()
        .expect("task written by the other process");
    assert_eq!(task.state, TaskState::Running);
    assert_eq!(task.input, json!("first"));
    assert_eq!(
        store
            .list_tasks(&TaskFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );
    let detail = store.task_detail(id).await.unwrap().expect("detail");
    assert_eq!(detail.steps.len(), 1);
    assert_eq!(detail.steps[0].state, StepState::Running);
    assert_eq!(detail.steps[0].lease_owner.as_deref(), Some("child-host"));
    assert_eq!(
        store.checkpoints(id).await.unwrap().get("cp"),
        Some(&json!({ "n": 1 }))
    );
    let ev = store
        .get_event("durable-ev")
        .await
        .unwrap()
        .expect("event written by the other process");
    assert_eq!(ev.payload, json!(42));
    assert!(
        !store.emit_event("durable-ev", json!(43)).await.unwrap(),
        "first write wins across processes"
    );
}

/// The child half of [`sqlite_file_shared_across_processes`]: does nothing
/// unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by sqlite_file_shared_across_processes"]
async fn sqlite_child_process_writes() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let store = open(&format!("sqlite:{}", path.to_string_lossy()))
        .await
        .expect("open sqlite store");
    let out = store
        .spawn(vec![
            NewTask::new("durable", json!("first")).idempotency_key("durable-1")
        ])
        .await
        .expect("spawn");
    assert!(out[0].created);
    let claimed = store
        .claim("child-host", &[("durable".to_string(), 1)], 600_000)
        .await
        .expect("claim")
        .steps;
    assert_eq!(claimed.len(), 1);
    let s = &claimed[0];
    let lease = switchyard_core::Lease {
        step_id: s.step_id,
        task_id: s.task_id,
        attempt: s.attempt,
        run: s.run,
        host_id: "child-host".to_string(),
    };
    store
        .put_checkpoint(&lease, "cp", json!({ "n": 1 }), 600_000)
        .await
        .expect("checkpoint");
    assert!(store
        .emit_event("durable-ev", json!(42))
        .await
        .expect("emit"));
}
