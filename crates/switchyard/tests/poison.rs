//! A poison outcome fails only itself, and a failing store cannot hold up
//! shutdown (issue item 4). A wrapper store injects the failures into
//! `complete`: a non-transient refusal of any batch holding one particular
//! outcome (validation in the core now stops the real poison, NUL and
//! over-long names, before it reaches a store), or a transient failure of
//! every batch.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard::{
    Client, Completion, DynStore, Error, ErrorKind, HandlerOptions, NewTask, Resolution, Result,
    StepState, TaskId, TaskState, Worker,
};
use tokio::sync::Semaphore;

use common::{eventually, Hooked, Hooks, Tally};

type Fault = Box<dyn Fn(&[Completion]) -> Option<Error> + Send + Sync>;

/// Holds every `complete` until a permit of `gate` is added, then fails
/// it with what `fault` returns for the batch (if anything).
struct Refuse {
    gate: Semaphore,
    fault: Fault,
    /// Calls of `complete`.
    completing: Arc<Tally>,
    /// Batches of more than one outcome that `fault` refused.
    refused_batches: Arc<Tally>,
}

async fn faulty(permits: usize, fault: Fault) -> Arc<Hooked<Refuse>> {
    Hooked::memory(Refuse {
        gate: Semaphore::new(permits),
        fault,
        completing: Tally::new(),
        refused_batches: Tally::new(),
    })
    .await
}

#[async_trait]
impl Hooks for Refuse {
    async fn complete(
        &self,
        inner: &DynStore,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<()>>> {
        self.completing.bump();
        let permit = self.gate.acquire().await.expect("gate open");
        permit.forget();
        if let Some(e) = (self.fault)(&completions) {
            if completions.len() > 1 {
                self.refused_batches.bump();
            }
            return Err(e);
        }
        inner.complete(completions).await
    }
}

/// The outcome the wrapper refuses: a step completing with this value.
const POISON: &str = "poison";

/// A batch holding an outcome the store refuses outright (not a transient
/// error) is split until that outcome is alone; it fails its step with the
/// store's reason and every other outcome of the batch is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_outcome_fails_only_its_step() {
    let faulty = faulty(
        0,
        Box::new(|batch: &[Completion]| {
            batch
                .iter()
                .any(|c| c.resolution == Resolution::Completed(json!(POISON)))
                .then(|| Error::InvalidInput("simulated: the store cannot hold this value".into()))
        }),
    )
    .await;
    let store: DynStore = faulty.clone();
    let client = Client::new(store.clone());
    // Steps `early` finish first, then the poison one, then `late` ones, so
    // that the poison outcome shares a batch whichever way the completer
    // cuts them.
    let early_done = Tally::new();
    let poison_done = Tally::new();
    let (early, late) = (5, 3);
    let (e, p) = (early_done.clone(), poison_done.clone());
    let worker = Worker::builder(store.clone())
        .shutdown_grace(Duration::from_millis(200))
        .step("echo", HandlerOptions::default(), move |input, _| {
            let (e, p) = (e.clone(), p.clone());
            async move {
                match input["kind"].as_str().unwrap() {
                    "early" => {
                        e.bump();
                    }
                    "poison" => {
                        e.reach(early).await;
                        p.bump();
                    }
                    _ => {
                        p.reach(1).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(input["value"].clone())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let spawn =
        |kind: &str, value: Value| NewTask::new("echo", json!({ "kind": kind, "value": value }));
    let mut tasks = Vec::new();
    for i in 0..early {
        tasks.push(spawn("early", json!(i)));
    }
    tasks.push(spawn("poison", json!(POISON)));
    for i in 0..late {
        tasks.push(spawn("late", json!(100 + i)));
    }
    let ids: Vec<TaskId> = client
        .spawn_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.task_id)
        .collect();
    // Hold the first write until every outcome has reached the completer.
    faulty.hooks.completing.reach(1).await;
    eventually("every handler to return", || async {
        (worker.inflight() == 0).then_some(())
    })
    .await;
    faulty.hooks.gate.add_permits(10_000);
    for (i, id) in ids.iter().enumerate() {
        let t = client.wait(*id, Duration::from_secs(10)).await.unwrap();
        if i == early {
            assert_eq!(t.state, TaskState::Failed);
            let e = t.error.unwrap();
            assert_eq!(e.kind, ErrorKind::InvalidInput);
            assert!(
                e.message
                    .contains("simulated: the store cannot hold this value"),
                "{}",
                e.message
            );
        } else {
            assert_eq!(t.state, TaskState::Completed, "task #{i}: {:?}", t.error);
        }
    }
    assert!(
        faulty.hooks.refused_batches.get() >= 1,
        "the poison outcome was never refused together with others"
    );
    tokio::time::timeout(Duration::from_secs(60), worker.stop())
        .await
        .expect("stop() returned");
}

/// With a store whose every `complete` fails transiently, `stop()` still
/// returns: after the grace period the host retries recording for at most
/// `shutdown_flush`, then drops the outcomes (their steps stay `running`
/// until their leases expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_when_the_store_never_records() {
    let faulty = faulty(
        usize::MAX >> 4,
        Box::new(|_: &[Completion]| Some(Error::Store("simulated: connection refused".into()))),
    )
    .await;
    let store: DynStore = faulty.clone();
    let client = Client::new(store.clone());
    let ran = Tally::new();
    let r = ran.clone();
    let worker = Worker::builder(store.clone())
        .shutdown_grace(Duration::from_secs(1))
        .shutdown_flush(Duration::from_secs(2))
        .step("quick", HandlerOptions::default(), move |input, _| {
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
    let id = client.spawn("quick", json!(1)).await.unwrap();
    ran.reach(1).await;
    faulty.hooks.completing.reach(2).await;
    // Generous: the bound is 1 s grace + 2 s flush + about a second.
    tokio::time::timeout(Duration::from_secs(60), worker.stop())
        .await
        .expect("stop() did not return with a store that never records");
    let d = client.inspect(id).await.unwrap();
    assert_eq!(
        d.steps[0].state,
        StepState::Running,
        "the outcome was not recorded"
    );
}
