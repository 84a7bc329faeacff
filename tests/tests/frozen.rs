//! A host that freezes (SIGSTOP: a long pause, not a crash) loses its leases;
//! another host takes the steps over and completes them. When the frozen
//! host resumes, whatever it still sends about the old attempts (late
//! completions, a release on shutdown) must be rejected: no step's
//! completion is applied twice and no completed step is re-opened.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard::{Client, DynStore, StepState, TaskState};
use switchyard_e2e::*;

const HELD: usize = 8;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testhost"))
}

/// SIGSTOPs `host` at a moment it holds no SQLite lock: a process frozen
/// inside a write transaction would block every other process on the file
/// (an SQLite property, not what this test is about). Checks by writing from
/// the test process; if that write cannot get through, thaws and tries again.
async fn freeze_outside_a_transaction(host: &Host, store: &DynStore) -> anyhow::Result<()> {
    for round in 0..5 {
        host.freeze()?;
        let name = format!("probe-{round}");
        let probe = store.emit_event(&name, json!(null));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), probe).await {
            return Ok(());
        }
        host.thaw()?;
        let name = format!("probe-{round}-thawed");
        let probe = store.emit_event(&name, json!(null));
        tokio::time::timeout(Duration::from_secs(20), probe).await??;
    }
    anyhow::bail!(
        "could not freeze {} outside a write transaction",
        host.config.name
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_host_cannot_complete_steps_taken_over_by_another() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let store = scratch.open().await?;
    let client = Client::new(store.clone());
    let release = scratch.dir.path().join("release");

    let ids: Vec<String> = spawn_work(&client, HELD, json!({"hold": true}), 0)
        .await?
        .iter()
        .map(|t| t.to_string())
        .collect();
    let mut first = scratch
        .host("first")
        .lease_ms(1000)
        .concurrency(HELD)
        .release_file(&release)
        .start(bin())
        .await?;
    wait_until(
        "every held step to start on the first host",
        Duration::from_secs(30),
        || {
            let scratch = &scratch;
            let ids = &ids;
            let first_id = first.host_id.clone();
            async move {
                let runs = scratch.runs()?;
                let started: HashSet<&str> = runs
                    .marked(Mark::Start)
                    .filter(|l| l.host == first_id)
                    .map(|l| l.task.as_str())
                    .collect();
                Ok(ids
                    .iter()
                    .all(|t| started.contains(t.as_str()))
                    .then_some(()))
            }
        },
    )
    .await?;

    freeze_outside_a_transaction(&first, &store).await?;
    let mut second = scratch
        .host("second")
        .lease_ms(1000)
        .concurrency(HELD)
        .start(bin())
        .await?;
    wait_all_completed(&store, HELD as u64, Duration::from_secs(30)).await?;

    let mut before = Vec::new();
    for id in &ids {
        let task = client.get(id.parse()?).await?;
        let result = task.result.clone().expect("completed task has a result");
        assert_eq!(result["host"], json!(second.host_id), "task {id}: {result}");
        assert_eq!(result["attempt"], json!(2), "task {id}: {result}");
        before.push(task);
    }

    // Let the frozen host's runs finish, resume it, and stop it gracefully:
    // by the time it exits it has sent everything it was going to send.
    std::fs::write(&release, b"")?;
    first.thaw()?;
    first.stop(Duration::from_secs(30)).await?;
    second.stop(Duration::from_secs(20)).await?;

    let counts = store.count_steps().await?;
    assert_eq!(
        counts.get("completed").copied(),
        Some(HELD as u64),
        "step counts: {counts:?}"
    );
    assert_eq!(
        counts.values().sum::<u64>(),
        HELD as u64,
        "a completed step was re-opened: {counts:?}"
    );
    for old in &before {
        let detail = client.inspect(old.id).await?;
        assert_eq!(detail.task.state, TaskState::Completed);
        assert_eq!(
            detail.task.result, old.result,
            "task {}: result changed by the frozen host",
            old.id
        );
        assert_eq!(detail.steps.len(), 1);
        assert_eq!(detail.steps[0].state, StepState::Completed);
        assert_eq!(detail.steps[0].attempt, 2);
        assert_eq!(detail.steps[0].result, old.result);
    }

    let runs = scratch.runs()?;
    for ((task, attempt), starts) in runs.starts_by_attempt() {
        assert_eq!(
            starts.len(),
            1,
            "task {task} attempt {attempt} started {} times",
            starts.len()
        );
    }
    let late_ends = runs
        .marked(Mark::End)
        .filter(|l| l.host == first.host_id)
        .count();
    let rejected = first.stderr().matches("completion rejected").count();
    eprintln!(
        "frozen: after resuming, the first host finished {late_ends} of its {HELD} stale runs; \
         the store rejected {rejected} late completions"
    );
    Ok(())
}
