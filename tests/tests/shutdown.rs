//! Graceful shutdown: SIGTERM lets short steps finish within the grace
//! period and hands long ones back (`Released`: ready again, the attempt not
//! consumed); the process exits 0 and a second host completes the rest.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard::{Client, StepState, TaskState};
use switchyard_e2e::*;

const LONG: usize = 4;
const SHORT: usize = 2;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testhost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_unfinished_steps_without_consuming_an_attempt() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let store = scratch.open().await?;
    let client = Client::new(store.clone());

    // Long steps block (10 min) only in the first host; short ones take 1 s,
    // well inside the grace period.
    let long: Vec<String> = spawn_work(&client, LONG, json!({"hold": true}), 0)
        .await?
        .iter()
        .map(|t| t.to_string())
        .collect();
    let short: Vec<String> = spawn_work(&client, SHORT, json!({"sleep_ms": 1000}), 0)
        .await?
        .iter()
        .map(|t| t.to_string())
        .collect();

    let mut first = scratch
        .host("first")
        .concurrency(8)
        .grace_ms(5_000)
        .hold_ms(600_000)
        .start(bin())
        .await?;
    wait_until(
        "every step to start on the first host",
        Duration::from_secs(30),
        || {
            let scratch = &scratch;
            let first_id = first.host_id.clone();
            let all: Vec<String> = long.iter().chain(&short).cloned().collect();
            async move {
                let runs = scratch.runs()?;
                let started: HashSet<&str> = runs
                    .marked(Mark::Start)
                    .filter(|l| l.host == first_id)
                    .map(|l| l.task.as_str())
                    .collect();
                Ok(all
                    .iter()
                    .all(|t| started.contains(t.as_str()))
                    .then_some(()))
            }
        },
    )
    .await?;

    // Exits 0 once the grace period has cancelled the long steps (they would
    // otherwise run for 10 minutes, far past this deadline).
    first.stop(Duration::from_secs(30)).await?;

    let hosts = store.list_hosts().await?;
    assert!(
        hosts.iter().all(|h| h.id != first.host_id),
        "the stopped host is still registered: {hosts:?}"
    );

    let runs = scratch.runs()?;
    for id in &short {
        let task = client.get(id.parse()?).await?;
        assert_eq!(
            task.state,
            TaskState::Completed,
            "short task {id} did not finish within the grace period"
        );
        let result = task.result.expect("completed task has a result");
        assert_eq!(result["host"], json!(first.host_id));
        assert_eq!(result["attempt"], json!(1));
    }
    for id in &long {
        let detail = client.inspect(id.parse()?).await?;
        assert_eq!(
            detail.task.state,
            TaskState::Running,
            "long task {id}: {:?}",
            detail.task.error
        );
        let step = &detail.steps[0];
        assert_eq!(
            step.state,
            StepState::Ready,
            "long task {id}'s step should be handed back ready: {step:?}"
        );
        assert_eq!(
            step.attempt, 0,
            "a released step does not consume an attempt: {step:?}"
        );
        assert_eq!(
            step.lease_owner, None,
            "released step still leased: {step:?}"
        );
        assert!(
            !runs.has(id, 1, &first.host_id, Mark::End),
            "long task {id} ended on the stopped host"
        );
    }

    let mut second = scratch.host("second").concurrency(8).start(bin()).await?;
    let counts = wait_all_completed(&store, (LONG + SHORT) as u64, Duration::from_secs(30)).await?;
    second.stop(Duration::from_secs(20)).await?;
    assert_eq!(
        counts.values().sum::<u64>(),
        (LONG + SHORT) as u64,
        "step counts: {counts:?}"
    );

    let runs = scratch.runs()?;
    for id in &long {
        let detail = client.inspect(id.parse()?).await?;
        assert_eq!(detail.task.state, TaskState::Completed);
        let result = detail.task.result.expect("completed task has a result");
        // The released attempt was given back, so the second host runs
        // attempt 1 again.
        assert_eq!(
            result["host"],
            json!(second.host_id),
            "long task {id}: {result}"
        );
        assert_eq!(result["attempt"], json!(1), "long task {id}: {result}");
        assert_eq!(detail.steps[0].attempt, 1);
        assert!(runs.has(id, 1, &second.host_id, Mark::End));
    }
    for id in &short {
        let starts = runs.marked(Mark::Start).filter(|l| &l.task == id).count();
        assert_eq!(starts, 1, "short task {id} ran again after it completed");
    }
    Ok(())
}
