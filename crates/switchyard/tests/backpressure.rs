//! A host whose store records outcomes slower than its handlers produce
//! them stops claiming: its claimed steps without a recorded outcome stay
//! bounded (twice the larger of its concurrency and claim batch) instead of
//! growing for as long as the store lags. Without the bound, every
//! heartbeat renewed the lease of every step in the backlog; on PostgreSQL
//! that held up the completions behind it and a 300,000-step run fell from
//! ~30,000 to ~1,700 steps/s.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use switchyard::{
    ClaimBatch, Client, Completion, DynStore, HandlerOptions, NewTask, Result, TaskId, TaskState,
    Worker,
};
use tokio::sync::Semaphore;

use common::{Hooked, Hooks, Tally};

/// Holds every `complete` until a permit of `gate` is added, and counts the
/// steps handed out.
struct Gate {
    gate: Semaphore,
    /// Steps handed out by `claim`.
    claimed: Arc<Tally>,
    /// Calls of `complete`.
    completing: Arc<Tally>,
}

#[async_trait]
impl Hooks for Gate {
    fn claimed(&self, batch: &ClaimBatch) {
        for _ in &batch.steps {
            self.claimed.bump();
        }
    }
    async fn complete(
        &self,
        inner: &DynStore,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<()>>> {
        self.completing.bump();
        let permit = self.gate.acquire().await.expect("gate open");
        permit.forget();
        inner.complete(completions).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_stop_while_outcomes_wait_to_be_recorded() {
    const CONCURRENCY: usize = 4;
    const OUTSTANDING: usize = 2 * CONCURRENCY;
    const TASKS: usize = 40;
    let gated = Hooked::memory(Gate {
        gate: Semaphore::new(0),
        claimed: Tally::new(),
        completing: Tally::new(),
    })
    .await;
    let store: DynStore = gated.clone();
    let client = Client::new(store.clone());
    let ids: Vec<TaskId> = client
        .spawn_many(
            (0..TASKS)
                .map(|i| NewTask::new("quick", json!(i)))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.task_id)
        .collect();
    let worker = Worker::builder(store.clone())
        .concurrency(CONCURRENCY)
        .claim_batch(CONCURRENCY)
        .step("quick", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    // The first outcomes reach the store and stay there; the host keeps
    // claiming only until OUTSTANDING steps lack a recorded outcome.
    // (Each wait fails the test after common::WAIT.)
    gated.hooks.completing.reach(1).await;
    gated.hooks.claimed.reach(OUTSTANDING).await;
    // Showing that something does not happen takes a wait: wake the claimer
    // repeatedly (as new work would) and check it still holds back.
    for _ in 0..20 {
        store.signals().notify_ready();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        gated.hooks.claimed.get(),
        OUTSTANDING,
        "the host claimed more steps while {OUTSTANDING} outcomes waited to be recorded"
    );

    // Once the store records again, everything finishes.
    gated.hooks.gate.add_permits(10_000);
    for id in ids {
        let task = client.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(task.state, TaskState::Completed);
    }
    assert_eq!(gated.hooks.claimed.get(), TASKS);
    worker.stop().await;
}
