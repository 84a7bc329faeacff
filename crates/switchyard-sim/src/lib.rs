//! Deterministic simulation of the Switchyard core.
//!
//! One run (one seed) starts real [`switchyard_core::Worker`] hosts and a
//! [`switchyard_core::Client`] on the memory store behind a fault injector
//! ([`faults::FaultStore`]), on a single-threaded tokio runtime with paused
//! time, and drives a random workload ([`workload`]) with random faults:
//! store calls delayed, failing before they apply or applied with the reply
//! lost, heartbeats stalled past the lease, store clock jumps, hosts that
//! crash (their store calls never return) or shut down gracefully and are
//! replaced, two hosts on one store. Then faults stop, every awaited event
//! is emitted, and the hosts run until every task has finished; the
//! invariants ([`check`]) are checked during the run and at its end.
//!
//! Every random choice comes from one RNG seeded with the seed, the store
//! clock follows tokio's paused clock from a fixed epoch, and the core's own
//! random bits (ids, retry jitter) come from a generator seeded through
//! `switchyard_core::ids::seed_thread_rng`, so a seed replays its run. Every
//! `select!` in the core is `biased;`, so tokio's random branch order
//! (seeded only when built with `--cfg tokio_unstable`) plays no part (see
//! the crate README).
#![warn(missing_docs)]

use std::sync::{Arc, Once};
use std::time::Duration;

use serde_json::json;
use switchyard_core::{Client, DynStore, NewTask, RunningWorker, Store, TaskId};
use switchyard_store::memory::MemoryStore;

pub mod check;
pub mod clock;
pub mod faults;
pub mod rng;
pub mod workload;
pub mod world;

use faults::{FaultStore, Who};
use workload::{Gen, HostCfg, Knobs};
use world::{Violation, World};

/// How to run a seed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Keep a readable trace of the run.
    pub trace: bool,
    /// Which known-bug triggers the workload generates.
    pub knobs: Knobs,
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Broken invariants, in the order they were seen.
    pub violations: Vec<Violation>,
    /// The trace (empty unless asked for).
    pub trace: String,
    /// Tasks the run created.
    pub tasks: usize,
    /// Step claims the store granted.
    pub claims: usize,
    /// Virtual time the run took, in ms.
    pub virtual_ms: u64,
}

/// The command that replays `seed` with a trace.
pub fn replay_command(seed: u64, knobs: Knobs) -> String {
    let mut s = format!("cargo run -p switchyard-sim --release -- --seed {seed}");
    if !knobs.collisions {
        s.push_str(" --no-collisions");
    }
    if !knobs.many_waits {
        s.push_str(" --no-many-waits");
    }
    s
}

fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() == Some(&workload::PANIC_MSG) {
                return;
            }
            default(info);
        }));
    });
}

/// Runs one seed to the end and checks the invariants.
pub fn run_seed(seed: u64, opts: &Options) -> Report {
    quiet_injected_panics();
    #[allow(unused_mut)]
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let rt = builder.build().expect("a current-thread runtime");
    switchyard_core::ids::seed_thread_rng(Some(seed));
    let opts2 = opts.clone();
    let report = rt.block_on(async move {
        let world = Arc::new(World::new(seed, opts2.trace));
        scenario(world.clone(), &opts2).await;
        let o = world.obs.lock();
        let (tasks, claims) = (o.tasks.len(), o.runs.values().map(Vec::len).sum());
        drop(o);
        Report {
            seed,
            violations: world.violations(),
            trace: world.trace_text(),
            tasks,
            claims,
            virtual_ms: world.now_ms(),
        }
    });
    drop(rt);
    switchyard_core::ids::seed_thread_rng(None);
    report
}

enum Action {
    Spawn(usize, String, serde_json::Value),
    Emit(String),
    Cancel(usize, bool),
    Stall(usize, u64),
    Jump(i64),
    Crash(usize),
    Restart(usize),
    Start(usize),
}

struct Hosts {
    inner: Arc<dyn Store>,
    world: Arc<World>,
    cfg: HostCfg,
    slots: Vec<Option<(usize, RunningWorker)>>,
    next: usize,
    graveyard: Vec<RunningWorker>,
}

impl Hosts {
    async fn start(&mut self, slot: usize) {
        if self.slots[slot].is_some() {
            return;
        }
        for _ in 0..50 {
            let idx = self.next;
            self.next += 1;
            let store: DynStore = Arc::new(FaultStore::new(
                self.inner.clone(),
                self.world.clone(),
                Who::Host(idx),
            ));
            let w = workload::worker(store, &self.world, idx, &self.cfg);
            match w.start().await {
                Ok(rw) => {
                    self.world
                        .obs
                        .lock()
                        .host_ids
                        .insert(idx, rw.host_id().to_string());
                    self.world
                        .trace(|| format!("host h{idx} started in slot {slot}"));
                    self.slots[slot] = Some((idx, rw));
                    return;
                }
                Err(e) => {
                    self.world
                        .trace(|| format!("host h{idx} failed to start: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn idx(&self, slot: usize) -> Option<usize> {
        self.slots[slot].as_ref().map(|(i, _)| *i)
    }
}

async fn with_retries<T, F, Fut>(what: &str, world: &World, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = switchyard_core::Result<T>>,
{
    for _ in 0..30 {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                world.trace(|| format!("driver {what}: {e}; retrying"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    None
}

const CHAOS_MS: u64 = 20_000;
const CALM_LIMIT_MS: u64 = 3_600_000;

async fn scenario(world: Arc<World>, opts: &Options) {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::with_clock(world.clock.clone()));
    let (cfg, n_hosts, p, n_roots) = world.with_rng(|r| {
        let cfg = HostCfg {
            lease: Duration::from_millis(*r.pick(&[1000, 2000, 3000])),
            concurrency: r.range(2, 16) as usize,
            claim_batch: r.range(1, 8) as usize,
            grace: Duration::from_millis(r.range(0, 3000)),
        };
        (
            cfg,
            r.range(1, 2) as usize,
            *r.pick(&[0.0, 0.01, 0.03, 0.06]),
            r.range(3, 10) as usize,
        )
    });
    {
        let mut f = world.faults.lock();
        f.on = true;
        f.p_delay = 2.0 * p;
        f.p_fail = p;
        f.p_lose = p;
    }
    world.trace(|| {
        format!(
            "seed {} cfg {cfg:?} hosts {n_hosts} fault p {p} roots {n_roots}",
            world.seed
        )
    });
    let lease_ms = cfg.lease.as_millis() as u64;
    let client = Client::new(Arc::new(FaultStore::new(
        inner.clone(),
        world.clone(),
        Who::Client,
    )));
    let mut hosts = Hosts {
        inner: inner.clone(),
        world: world.clone(),
        cfg,
        slots: vec![None, None],
        next: 0,
        graveyard: Vec::new(),
    };
    for s in 0..n_hosts {
        hosts.start(s).await;
    }

    // The plan: (virtual ms, action), drawn up front.
    let mut plan: Vec<(u64, Action)> = Vec::new();
    let events = world.with_rng(|r| {
        let mut g = Gen {
            r,
            knobs: opts.knobs,
            events: Default::default(),
        };
        for i in 0..n_roots {
            let t = g.r.range(0, 15_000);
            let k = g.r.below(10);
            let (h, input) = match k {
                0..=4 => ("wf", g.script(0)),
                5..=6 => ("wf5", g.waits()),
                _ => ("decide", g.decision()),
            };
            plan.push((t, Action::Spawn(i, h.to_string(), input)));
            if g.r.chance(0.2) {
                let t = g.r.range(t, CHAOS_MS);
                let cascade = g.r.chance(0.5);
                plan.push((t, Action::Cancel(i, cascade)));
            }
        }
        for e in g.events.clone() {
            if g.r.chance(0.7) {
                plan.push((g.r.range(0, CHAOS_MS), Action::Emit(e)));
            }
        }
        let episodes = g.r.range(0, 4);
        for _ in 0..episodes {
            let t = g.r.range(1000, CHAOS_MS - 2000);
            let slot = g.r.below(2) as usize;
            match g.r.below(5) {
                0 => plan.push((
                    t,
                    Action::Stall(slot, g.r.range(lease_ms * 3 / 2, lease_ms * 3)),
                )),
                1 => plan.push((t, Action::Jump(g.r.range(lease_ms, 2 * lease_ms) as i64))),
                2 => {
                    plan.push((t, Action::Crash(slot)));
                    plan.push((t + g.r.range(0, 3000), Action::Start(slot)));
                }
                3 => plan.push((t, Action::Restart(slot))),
                _ => plan.push((t, Action::Start(1 - slot))),
            }
        }
        g.events
    });
    world.obs.lock().events.extend(events);
    plan.sort_by_key(|(t, _)| *t);

    let mut roots: Vec<Option<TaskId>> = vec![None; n_roots];
    for (t, action) in plan {
        let now = world.now_ms();
        if t > now {
            tokio::time::sleep(Duration::from_millis(t - now)).await;
        }
        match action {
            Action::Spawn(i, h, input) => {
                let task =
                    NewTask::new(h.clone(), input.clone()).idempotency_key(format!("root-{i}"));
                roots[i] = with_retries("spawn", &world, || client.spawn_task(task.clone()))
                    .await
                    .map(|s| s.task_id);
            }
            Action::Emit(e) => {
                let payload = json!({ "event": e });
                with_retries("emit", &world, || client.emit(&e, payload.clone())).await;
            }
            Action::Cancel(i, cascade) => {
                if let Some(id) = roots[i] {
                    with_retries("cancel", &world, || client.cancel(id, cascade)).await;
                }
            }
            Action::Stall(slot, ms) => {
                if let Some(idx) = hosts.idx(slot) {
                    world.trace(|| format!("driver: stall heartbeats of h{idx} for {ms} ms"));
                    world
                        .faults
                        .lock()
                        .stalled_until
                        .insert(idx, world.now_ms() + ms);
                }
            }
            Action::Jump(ms) => {
                world.trace(|| format!("driver: store clock jumps {ms} ms"));
                world.clock.jump(ms);
                inner.signals().notify_ready();
            }
            Action::Crash(slot) => {
                if let Some((idx, rw)) = hosts.slots[slot].take() {
                    world.trace(|| format!("driver: h{idx} crashes"));
                    world.faults.lock().crashed.insert(idx);
                    hosts.graveyard.push(rw);
                }
            }
            Action::Restart(slot) => {
                if let Some((idx, rw)) = hosts.slots[slot].take() {
                    world.trace(|| format!("driver: h{idx} shuts down gracefully"));
                    tokio::spawn(async move { rw.stop().await });
                    hosts.start(slot).await;
                }
            }
            Action::Start(slot) => hosts.start(slot).await,
        }
    }
    let now = world.now_ms();
    if now < CHAOS_MS {
        tokio::time::sleep(Duration::from_millis(CHAOS_MS - now)).await;
    }

    // Calm: no more faults; a live host; every awaited event emitted.
    world.trace(|| "driver: faults off".to_string());
    {
        let mut f = world.faults.lock();
        f.on = false;
        f.stalled_until.clear();
    }
    if hosts.slots.iter().all(Option::is_none) {
        hosts.start(0).await;
    }
    let events: Vec<String> = world.obs.lock().events.iter().cloned().collect();
    for e in events {
        let payload = json!({ "event": e });
        with_retries("emit", &world, || client.emit(&e, payload.clone())).await;
    }
    let start = world.now_ms();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if check::all_finished(&inner, &world).await || world.now_ms() - start > CALM_LIMIT_MS {
            break;
        }
    }
    world.trace(|| "driver: final checks".to_string());
    check::final_checks(&inner, &world).await;
    drop(hosts);
}
