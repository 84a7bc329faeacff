//! `switchyard-sim`: runs seeds of the deterministic simulation.
//!
//! ```text
//! switchyard-sim [--seeds N] [--start S]   run seeds S..S+N (default 0..1000)
//! switchyard-sim --seed N                  replay one seed: trace, violations,
//!                                          and a second run to confirm replay
//! options: --no-collisions --no-many-waits (skip the known-bug triggers)
//!          --quiet (only the summary)
//!          --check-replay (run every seed twice with a trace and report
//!          seeds whose second run differs)
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use switchyard_sim::workload::Knobs;
use switchyard_sim::{replay_command, run_seed, Options};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut seeds = 1000u64;
    let mut start = 0u64;
    let mut one: Option<u64> = None;
    let mut knobs = Knobs::default();
    let mut quiet = false;
    let mut check_replay = false;
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--seeds" => seeds = num("--seeds"),
            "--start" => start = num("--start"),
            "--seed" => one = Some(num("--seed")),
            "--no-collisions" => knobs.collisions = false,
            "--no-many-waits" => knobs.many_waits = false,
            "--quiet" => quiet = true,
            "--check-replay" => check_replay = true,
            "-h" | "--help" => {
                println!("usage: switchyard-sim [--seeds N] [--start S] [--seed N] [--no-collisions] [--no-many-waits] [--quiet]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seed) = one {
        let opts = Options { trace: true, knobs };
        let a = run_seed(seed, &opts);
        print!("{}", a.trace);
        println!(
            "seed {seed}: {} tasks, {} claims, {} virtual ms, {} violations",
            a.tasks,
            a.claims,
            a.virtual_ms,
            a.violations.len()
        );
        for v in &a.violations {
            println!("  {}: {}", v.invariant, v.message);
        }
        let b = run_seed(seed, &opts);
        if a.trace == b.trace {
            println!("replayed: identical trace");
        } else {
            let at = a
                .trace
                .lines()
                .zip(b.trace.lines())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            println!("REPLAY DIFFERS from trace line {}", at + 1);
        }
        return if a.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let opts = Options {
        trace: check_replay,
        knobs,
    };
    let t0 = Instant::now();
    let mut diverged = Vec::new();
    let mut by_invariant: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut failed = 0u64;
    for seed in start..start + seeds {
        let r = run_seed(seed, &opts);
        if check_replay && run_seed(seed, &opts).trace != r.trace {
            println!("seed {seed}: REPLAY DIFFERS");
            diverged.push(seed);
        }
        if r.violations.is_empty() {
            continue;
        }
        failed += 1;
        for v in &r.violations {
            let e = by_invariant.entry(v.invariant).or_default();
            if e.last() != Some(&seed) {
                e.push(seed);
            }
        }
        if !quiet {
            println!(
                "seed {seed} FAILED ({} violations), replay: {}",
                r.violations.len(),
                replay_command(seed, knobs)
            );
            for v in r.violations.iter().take(5) {
                println!("  {}: {}", v.invariant, v.message);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds ({start}..{}) in {secs:.1} s ({:.1} seeds/s): {failed} failed",
        start + seeds,
        seeds as f64 / secs
    );
    for (inv, s) in &by_invariant {
        let shown: Vec<String> = s.iter().take(8).map(u64::to_string).collect();
        println!("  {inv}: {} seeds, e.g. {}", s.len(), shown.join(", "));
    }
    if check_replay {
        println!(
            "replay: {} of {seeds} seeds diverged {diverged:?}",
            diverged.len()
        );
    }
    if failed == 0 && diverged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
