//! Two host processes share one SQLite file and process a workload together:
//! cross-process claiming must hand each step to exactly one of them.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use switchyard::{Client, StepState, TaskFilter, TaskState};
use switchyard_e2e::*;

const TASKS: usize = 2000;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testhost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_a_workload_without_running_a_step_twice() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let store = scratch.open().await?;
    let client = Client::new(store.clone());

    // A long lease: with no kills no lease may expire, so every step must run
    // exactly once. Small concurrency and a few ms per step make the workload
    // long enough that both hosts take part.
    let (a, b) = tokio::join!(
        scratch
            .host("a")
            .lease_ms(20_000)
            .concurrency(8)
            .start(bin()),
        scratch
            .host("b")
            .lease_ms(20_000)
            .concurrency(8)
            .start(bin()),
    );
    let (mut a, mut b) = (a?, b?);
    assert_ne!(a.host_id, b.host_id);

    // Spawned only once both hosts are up, so neither gets a head start.
    spawn_work(&client, TASKS, json!({"sleep_ms": 2}), 0).await?;
    let counts = wait_all_completed(&store, TASKS as u64, Duration::from_secs(50)).await?;
    let (sa, sb) = tokio::join!(
        a.stop(Duration::from_secs(20)),
        b.stop(Duration::from_secs(20))
    );
    sa?;
    sb?;

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
    let per_host = runs.starts_per_host();
    eprintln!("two_hosts: runs per host: {per_host:?}");
    assert_eq!(per_host.len(), 2, "runs per host: {per_host:?}");
    assert!(
        per_host.get(a.host_id.as_str()).copied().unwrap_or(0) > 0,
        "host a did no work: {per_host:?}"
    );
    assert!(
        per_host.get(b.host_id.as_str()).copied().unwrap_or(0) > 0,
        "host b did no work: {per_host:?}"
    );

    // No (task, attempt) started twice (that would be one lease held by two
    // hosts); with no kills, each task ran exactly once, start to end.
    for ((task, attempt), starts) in runs.starts_by_attempt() {
        assert_eq!(
            starts.len(),
            1,
            "task {task} attempt {attempt} started {} times: {starts:?}",
            starts.len()
        );
    }
    let by_task = runs.by_task();
    assert_eq!(by_task.len(), TASKS, "tasks in the run log");

    let tasks = store
        .list_tasks(&TaskFilter {
            limit: TASKS + 100,
            ..Default::default()
        })
        .await?;
    assert_eq!(tasks.len(), TASKS);
    for task in &tasks {
        let id = task.id.to_string();
        assert_eq!(
            task.state,
            TaskState::Completed,
            "task {id}: {:?}",
            task.error
        );
        let lines = by_task
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert_eq!(
            lines.len(),
            2,
            "task {id} should have one start and one end line: {lines:?}"
        );
        assert_eq!(lines[0].mark, Mark::Start, "task {id}: {lines:?}");
        assert_eq!(lines[1].mark, Mark::End, "task {id}: {lines:?}");
        assert_eq!(lines[0].host, lines[1].host, "task {id}: {lines:?}");
        assert_eq!(
            lines[0].attempt, 1,
            "task {id} ran on attempt {} with no kill",
            lines[0].attempt
        );

        let result = task.result.clone().expect("completed task has a result");
        assert_eq!(
            result["host"],
            json!(lines[0].host),
            "task {id}: result from another run"
        );
        assert_eq!(result["attempt"], json!(1));

        let detail = store
            .task_detail(task.id)
            .await?
            .expect("listed task exists");
        assert_eq!(detail.steps.len(), 1);
        assert_eq!(detail.steps[0].state, StepState::Completed);
        assert_eq!(detail.steps[0].attempt, 1);
        assert_eq!(
            detail.steps[0].error, None,
            "task {id}: error on a clean run"
        );
    }

    // Both hosts deregistered on SIGTERM.
    let hosts = store.list_hosts().await?;
    assert!(
        hosts.iter().all(|h| h.id != a.host_id && h.id != b.host_id),
        "hosts still registered: {hosts:?}"
    );
    Ok(())
}
