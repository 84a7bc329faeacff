//! Crash recovery: a host is SIGKILLed in the middle of a workload; a second
//! host recovers its expired leases and finishes the work. Every task
//! completes exactly once, with the result of a run that really happened,
//! and the killed host's in-flight steps are re-run under a higher attempt.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard::{ErrorKind, StepState, TaskFilter, TaskState};
use switchyard_e2e::*;

const TASKS: usize = 3000;
/// Tasks that the first host holds until it dies (high priority, so it
/// claims them first): a kill is then guaranteed to catch steps in flight.
const HELD: usize = 8;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testhost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_host_steps_are_recovered_and_completed_exactly_once() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let store = scratch.open().await?;
    let (first, held, done_at_kill) =
        kill_first_host_midway(&scratch, &store, bin(), TASKS, HELD).await?;

    let mut second = scratch
        .host("second")
        .lease_ms(1000)
        .concurrency(16)
        .start(bin())
        .await?;
    let counts = wait_all_completed(&store, TASKS as u64, Duration::from_secs(45)).await?;
    second.stop(Duration::from_secs(20)).await?;

    // Nothing failed, nothing left behind, exactly one completed step per task.
    assert_eq!(
        counts.get("completed").copied(),
        Some(TASKS as u64),
        "step counts: {counts:?}"
    );
    assert_eq!(
        counts.values().sum::<u64>(),
        TASKS as u64,
        "every step must be completed: {counts:?}"
    );

    let runs = scratch.runs()?;
    let tasks = store
        .list_tasks(&TaskFilter {
            limit: TASKS + 100,
            ..Default::default()
        })
        .await?;
    assert_eq!(tasks.len(), TASKS);

    // No (task, attempt) was started twice: an attempt is one lease.
    for ((task, attempt), starts) in runs.starts_by_attempt() {
        assert_eq!(
            starts.len(),
            1,
            "task {task} attempt {attempt} started {} times: {starts:?}",
            starts.len()
        );
    }

    let by_task = runs.by_task();
    let mut rerun = 0;
    let mut lease_expired_seen = 0;
    for task in &tasks {
        let id = task.id.to_string();
        assert_eq!(
            task.state,
            TaskState::Completed,
            "task {id}: {:?}",
            task.error
        );
        let detail = store
            .task_detail(task.id)
            .await?
            .expect("listed task exists");
        assert_eq!(
            detail.steps.len(),
            1,
            "task {id} has {} steps",
            detail.steps.len()
        );
        let step = &detail.steps[0];
        assert_eq!(step.state, StepState::Completed);
        let result = task.result.clone().expect("completed task has a result");
        assert_eq!(
            step.result.as_ref(),
            Some(&result),
            "task {id}: step and task results differ"
        );

        // The result is the one produced by a run recorded in the log, and
        // that run held the step's final attempt (a late completion from an
        // older attempt would have been rejected).
        assert_eq!(result["task"], json!(id));
        let attempt = result["attempt"].as_u64().expect("attempt in result") as u32;
        let host = result["host"].as_str().expect("host in result");
        assert_eq!(
            attempt, step.attempt,
            "task {id}: result from attempt {attempt}, step is on {}",
            step.attempt
        );
        assert!(
            runs.has(&id, attempt, host, Mark::Start),
            "task {id}: no start line for the run in its result"
        );
        assert!(
            runs.has(&id, attempt, host, Mark::End),
            "task {id}: no end line for the run in its result"
        );
        assert!(
            host == first.host_id || host == second.host_id,
            "task {id}: result from unknown host {host}"
        );

        // No run began after the step completed.
        let lines = by_task
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for l in lines {
            assert!(
                l.attempt <= attempt,
                "task {id}: run {l:?} after the completed attempt {attempt}"
            );
        }
        // Every run the killed host left unfinished was re-run later.
        for l in lines
            .iter()
            .filter(|l| l.host == first.host_id && l.mark == Mark::Start)
        {
            if host != first.host_id {
                assert!(
                    attempt > l.attempt,
                    "task {id}: killed run {l:?} not re-run under a higher attempt"
                );
            }
        }
        if held.contains(&id) {
            assert!(
                attempt >= 2,
                "held task {id} completed on attempt {attempt}"
            );
            assert_eq!(
                host, second.host_id,
                "held task {id} completed by the killed host"
            );
            assert!(
                !runs.has(&id, 1, &first.host_id, Mark::End),
                "held task {id} ended on the first host"
            );
        }
        if attempt >= 2 {
            rerun += 1;
        }
        if let Some(e) = &step.error {
            assert_eq!(
                e.kind,
                ErrorKind::LeaseExpired,
                "task {id}: unexpected error {e:?}"
            );
            lease_expired_seen += 1;
        }
    }
    assert!(rerun >= HELD, "only {rerun} tasks were re-run");
    eprintln!(
        "crash: {done_at_kill} completed before the kill, {rerun} tasks re-run, {lease_expired_seen} completed \
         steps still show their LeaseExpired error; runs per host: {:?}",
        runs.starts_per_host()
    );
    Ok(())
}

/// Issue 20, item 9: the steps of a host whose process is gone are
/// recovered by a host on the same machine without waiting for their
/// leases. With two-minute leases, every task (the dead host's held steps
/// included) still completes within 45 s of the kill: only the dead-host
/// check can have recovered them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_on_this_machine_is_recovered_before_its_leases_expire() -> anyhow::Result<()> {
    const LEASE_MS: u64 = 120_000;
    let tasks = 300;
    let scratch = Scratch::new()?;
    let store = scratch.open().await?;
    let (_first, _held, _) =
        kill_first_host_midway_with_lease(&scratch, &store, bin(), tasks, HELD, LEASE_MS).await?;
    let killed_at = std::time::Instant::now();
    let mut second = scratch
        .host("second")
        .lease_ms(LEASE_MS)
        .concurrency(16)
        .start(bin())
        .await?;
    let counts = wait_all_completed(&store, tasks as u64, Duration::from_secs(45)).await?;
    eprintln!(
        "dead host: every task completed {:?} after the kill (leases: {LEASE_MS} ms)",
        killed_at.elapsed()
    );
    second.stop(Duration::from_secs(20)).await?;
    assert_eq!(
        counts.get("completed").copied(),
        Some(tasks as u64),
        "{counts:?}"
    );
    Ok(())
}
