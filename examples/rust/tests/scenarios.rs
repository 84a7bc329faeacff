//! Every reference scenario runs to the end, on its own SQLite file, and
//! exits 0 (each program checks its own result and exits 1 otherwise).

use std::process::Command;

fn run(bin: &str, path: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("scenario.db").display());
    let out = Command::new(path)
        .args(args)
        .args(["--store", &url])
        .env_remove("SWITCHYARD_STORE")
        .output()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{bin} exited {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_order_fulfilment() {
    let out = run("demo", env!("CARGO_BIN_EXE_demo"), &[]);
    assert!(out.contains("completed"), "{out}");
}

#[test]
fn order_events() {
    run(
        "order_events",
        env!("CARGO_BIN_EXE_order_events"),
        &["--auto"],
    );
}

#[test]
fn delegation() {
    run("delegation", env!("CARGO_BIN_EXE_delegation"), &[]);
}

#[test]
fn requester_worker() {
    run(
        "requester_worker",
        env!("CARGO_BIN_EXE_requester_worker"),
        &[],
    );
}

#[test]
fn fanout() {
    run(
        "fanout",
        env!("CARGO_BIN_EXE_fanout"),
        &["--items", "2000", "--batch-size", "250"],
    );
}
