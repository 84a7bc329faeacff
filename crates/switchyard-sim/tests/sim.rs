//! `cargo test -p switchyard-sim`: many seeds of the simulation (2,000 by
//! default; `SWITCHYARD_SIM_SEEDS` and `SWITCHYARD_SIM_START` change the
//! range). A failure names each failing seed and the command replaying it.

use switchyard_sim::{replay_command, run_seed, Options};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeds_keep_every_invariant() {
    let n = env("SWITCHYARD_SIM_SEEDS", 2000);
    let start = env("SWITCHYARD_SIM_START", 0);
    let opts = Options::default();
    let mut failures = Vec::new();
    for seed in start..start + n {
        let r = run_seed(seed, &opts);
        if let Some(v) = r.violations.first() {
            failures.push(format!(
                "seed {seed}: {}: {}\n    replay: {}",
                v.invariant,
                v.message,
                replay_command(seed, opts.knobs)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} seeds broke an invariant:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_seed_replays_exactly() {
    let opts = Options {
        trace: true,
        ..Options::default()
    };
    for seed in [1, 2, 3] {
        let a = run_seed(seed, &opts);
        let b = run_seed(seed, &opts);
        assert_eq!(a.violations, b.violations, "seed {seed}");
        assert!(
            a.trace == b.trace,
            "seed {seed}: the trace differs between two runs"
        );
    }
}
