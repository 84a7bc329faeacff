//! The `switchyard` binary against a real SQLite file: every subcommand,
//! `--json` output, exit codes and the messages for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::{Client, HandlerOptions, StepError, TaskState, Worker};

struct Cli {
    _dir: tempfile::TempDir,
    db: PathBuf,
}

impl Cli {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cli.db");
        Self { _dir: dir, db }
    }
    fn url(&self) -> String {
        format!("sqlite:{}", self.db.display())
    }
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("SWITCHYARD_STORE", self.url())
            .env_remove("RUST_LOG")
            .output()
            .expect("run switchyard")
    }
    /// Runs with `--json`, expects success and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {}", text(&out.stdout)))
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

#[test]
fn bad_input_exits_non_zero_naming_the_problem() {
    let cli = Cli::new();
    let out = cli.run(&["spawn", "greet", "--input", "{not json"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("--input"),
        "{}",
        text(&out.stderr)
    );
    assert!(!cli.db.exists(), "invalid input never creates the store");

    let out = cli.run(&["emit", "ev", "--payload", "[1,"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("--payload"),
        "{}",
        text(&out.stderr)
    );

    let out = cli.run(&["frobnicate"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("frobnicate"),
        "{}",
        text(&out.stderr)
    );

    let out = cli.run(&["tasks", "show", "not-a-uuid"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("not-a-uuid"),
        "{}",
        text(&out.stderr)
    );

    let out = cli.run(&["tasks", "list", "--state", "sleeping"]);
    assert_ne!(code(&out), 0);
    assert!(
        text(&out.stderr).contains("sleeping"),
        "{}",
        text(&out.stderr)
    );

    // A directory is not a database file.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().display());
    let out = cli.run(&["--store", &url, "tasks", "list"]);
    assert_eq!(code(&out), 1);
    assert!(
        text(&out.stderr).contains("directory"),
        "{}",
        text(&out.stderr)
    );

    let out = cli.run(&["--store", "mysql://x", "tasks", "list"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("mysql://x"),
        "{}",
        text(&out.stderr)
    );

    // An unknown task id is a failure, not a crash.
    assert_eq!(code(&cli.run(&["migrate"])), 0);
    let out = cli.run(&["tasks", "show", "01a20000-0000-7000-8000-000000000000"]);
    assert_eq!(code(&out), 1);
    assert!(!text(&out.stderr).is_empty());
}

#[test]
fn spawn_list_show_emit_events_idempotency() {
    let cli = Cli::new();
    let v = cli.json(&["migrate"]);
    assert!(v["schema_version"].as_u64().unwrap() >= 1);

    let a = cli.json(&[
        "spawn",
        "nobody.serves",
        "--input",
        r#"{"n":1}"#,
        "--priority",
        "7",
        "--idempotency-key",
        "k-1",
    ]);
    let id = a["task_id"].as_str().expect("task_id").to_string();
    let again = cli.json(&[
        "spawn",
        "nobody.serves",
        "--input",
        r#"{"n":2}"#,
        "--idempotency-key",
        "k-1",
    ]);
    assert_eq!(
        again["task_id"], a["task_id"],
        "same idempotency key, same task"
    );

    let list = cli.json(&["tasks", "list"]);
    let tasks = list.as_array().expect("a JSON array");
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["priority"], 7);

    // No live host serves the handler: the step stays ready and `show` says why.
    let show = cli.json(&["tasks", "show", &id]);
    assert_eq!(show["steps"][0]["state"], "ready");
    let unserved = show["unserved"].as_array().unwrap();
    assert_eq!(unserved.len(), 1);
    assert!(unserved[0]["message"]
        .as_str()
        .unwrap()
        .contains("no live host serves handler `nobody.serves`"));
    let out = cli.run(&["tasks", "show", &id]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("no live host serves handler"),
        "{}",
        text(&out.stdout)
    );

    let e = cli.json(&["emit", "order.paid", "--payload", r#"{"amount":3}"#]);
    assert_eq!(e["stored"], true);
    let e = cli.json(&["emit", "order.paid", "--payload", r#"{"amount":4}"#]);
    assert_eq!(e["stored"], false, "first write wins");
    let events = cli.json(&["events", "list"]);
    assert_eq!(events[0]["name"], "order.paid");
    assert_eq!(events[0]["payload"], json!({"amount": 3}));

    let c = cli.json(&["cancel", &id]);
    assert_eq!(c["cancelled"], true);
    let list = cli.json(&["tasks", "list", "--state", "cancelled"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let r = cli.json(&["retry", &id]);
    assert_eq!(r["retried"], true);
    let show = cli.json(&["tasks", "show", &id]);
    assert_eq!(show["task"]["state"], "running", "{show}");
}

/// A worker in this process; the CLI in another sees its work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_attempts_errors_checkpoints_waits_and_workers() {
    let cli = Cli::new();
    let store = switchyard::open(&cli.url()).await.unwrap();
    let worker = Worker::builder(store.clone())
        .step(
            "flaky",
            HandlerOptions::default().retry(switchyard::RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
                multiplier: 1.0,
                jitter: 0.0,
            }),
            |_, ctx| async move {
                let _: u32 = ctx.checkpoint("fetched", || async { Ok(41) }).await?;
                Err(StepError::retryable("upstream said no"))
            },
        )
        .step("waiter", HandlerOptions::default(), |_, ctx| async move {
            ctx.await_event("never.comes", Some(Duration::from_secs(3600)))
                .await
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(store.clone());
    let flaky = client.spawn("flaky", json!({})).await.unwrap();
    let t = client.wait(flaky, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    let waiter = client.spawn("waiter", json!({})).await.unwrap();
    for _ in 0..200 {
        let d = client.inspect(waiter).await.unwrap();
        if d.steps[0].state == switchyard::StepState::Suspended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let run = |args: Vec<String>| {
        let cli_url = cli.url();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                    .args(&args)
                    .args(["--store", &cli_url])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
                text(&out.stdout)
            })
            .await
            .unwrap()
        }
    };
    let show: Value = serde_json::from_str(
        &run(vec![
            "tasks".into(),
            "show".into(),
            flaky.to_string(),
            "--json".into(),
        ])
        .await,
    )
    .unwrap();
    assert_eq!(show["task"]["state"], "failed");
    assert_eq!(show["steps"][0]["attempt"], 2);
    assert!(show["task"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("upstream said no"));
    let cp = show["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "flaky/fetched");
    assert_eq!(cp.expect("checkpoint listed")["value"], 41, "{show}");
    let human = run(vec!["tasks".into(), "show".into(), flaky.to_string()]).await;
    assert!(
        human.contains("upstream said no") && human.contains("fetched"),
        "{human}"
    );

    let show: Value = serde_json::from_str(
        &run(vec![
            "tasks".into(),
            "show".into(),
            waiter.to_string(),
            "--json".into(),
        ])
        .await,
    )
    .unwrap();
    assert_eq!(show["waits"][0]["event"], "never.comes", "{show}");
    assert!(show["waits"][0]["wake_at"].is_i64());

    let workers: Value =
        serde_json::from_str(&run(vec!["workers".into(), "--json".into()]).await).unwrap();
    let hosts = workers.as_array().unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["pid"], std::process::id());
    let handlers: Vec<&str> = hosts[0]["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(handlers.contains(&"flaky") && handlers.contains(&"waiter"));
    assert_eq!(hosts[0]["language"], "rust");
    assert!(
        hosts[0]["slots"].as_u64().is_some_and(|n| n >= 1),
        "{}",
        hosts[0]
    );
    let table = run(vec!["workers".into()]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let lang = header
        .iter()
        .position(|c| *c == "LANG")
        .expect("a LANG column");
    assert_eq!(row[lang], "rust", "{table}");
    worker.stop().await;
}

#[test]
fn spawn_wait_reports_the_result() {
    let cli = Cli::new();
    let out = cli.run(&["spawn", "nobody", "--wait", "0.2"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), 1, "times out: {err}");
    let p = Path::new(&cli.db);
    assert!(p.exists());
    // It says what it waited for: the task, its handler, its state, and
    // that nothing serves the handler (also warned at spawn time).
    let listed = cli.json(&["tasks", "list"]);
    let id = listed[0]["id"].as_str().unwrap();
    assert!(
        err.contains("warning: no live host serves handler `nobody`"),
        "{err}"
    );
    assert!(err.contains("timed out after 0.2 s"), "{err}");
    assert!(err.contains(id), "{err}");
    assert!(err.contains("handler `nobody`"), "{err}");
    assert!(err.contains("still running"), "{err}");
    assert!(err.matches("no live host serves").count() == 2, "{err}");

    // Without --wait: the warning on stderr, the id alone on stdout, exit 0.
    let out = cli.run(&["spawn", "nobody"]);
    assert_eq!(code(&out), 0);
    assert!(
        text(&out.stderr).contains("no live host serves handler `nobody`"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim().len(), 36, "{}", text(&out.stdout));
}

/// A live host that serves the handler: no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_does_not_warn_when_a_live_host_serves_the_handler() {
    let cli = Cli::new();
    let store = switchyard::open(&cli.url()).await.unwrap();
    let worker = Worker::builder(store.clone())
        .step("served", HandlerOptions::default(), |input, _| async move {
            Ok(input)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let url = cli.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "spawn", "served", "--input", "7", "--wait", "10", "--store", &url,
            ])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("result: 7"),
        "{}",
        text(&out.stdout)
    );
    worker.stop().await;
}

#[test]
fn cleanup_deletes_old_finished_tasks_in_batches() {
    let cli = Cli::new();
    for bad in ["7x", "5", "d", "-1d", "1.5h", ""] {
        let out = cli.run(&["cleanup", "--older-than", bad]);
        assert_eq!(code(&out), 2, "--older-than {bad:?}");
        assert!(
            text(&out.stderr).contains("--older-than"),
            "{bad:?}: {}",
            text(&out.stderr)
        );
    }
    let out = cli.run(&["cleanup", "--older-than", "1d", "--batch", "0"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("--batch"),
        "{}",
        text(&out.stderr)
    );

    let a = cli.json(&["spawn", "nobody.serves", "--idempotency-key", "cl-k"]);
    let b = cli.json(&["spawn", "nobody.serves"]);
    let kept = cli.json(&["spawn", "nobody.serves"]);
    for t in [&a, &b] {
        let id = t["task_id"].as_str().unwrap();
        assert_eq!(cli.json(&["cancel", id])["cancelled"], true);
    }
    cli.json(&["emit", "cl.fact"]);

    assert_eq!(
        cli.json(&["cleanup", "--older-than", "7d"]),
        json!({ "deleted": 0 }),
        "nothing finished a week ago"
    );
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(
        cli.json(&["cleanup", "--older-than", "0s", "--batch", "1"]),
        json!({ "deleted": 2 })
    );
    let list = cli.json(&["tasks", "list"]);
    let ids: Vec<&Value> = list.as_array().unwrap().iter().map(|t| &t["id"]).collect();
    assert_eq!(ids, [&kept["task_id"]], "the running task is kept");
    let events = cli.json(&["events", "list"]);
    assert_eq!(events[0]["name"], "cl.fact", "events are kept");
    let again = cli.json(&["spawn", "nobody.serves", "--idempotency-key", "cl-k"]);
    assert_ne!(again["task_id"], a["task_id"], "the key is free again");

    let out = cli.run(&["cleanup", "--older-than", "12h"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "deleted 0 finished tasks older than 12h\n"
    );

    // Event retention is opt-in, and either kind of cleanup may come alone.
    let out = cli.run(&["cleanup"]);
    assert_eq!(
        code(&out),
        2,
        "cleanup needs --older-than or --events-older-than"
    );
    let out = cli.run(&["cleanup", "--events-older-than", "7x"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("--events-older-than"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        cli.json(&["cleanup", "--events-older-than", "7d"]),
        json!({ "deleted": 0, "events_deleted": 0 })
    );
    cli.json(&["emit", "cl.later"]);
    std::thread::sleep(Duration::from_millis(5));
    let out = cli.run(&["cleanup", "--events-older-than", "0s", "--batch", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "deleted 2 events older than 0s\n");
    assert_eq!(cli.json(&["events", "list"]), json!([]));
    assert_eq!(
        cli.json(&["emit", "cl.fact", "--payload", "2"])["stored"],
        true,
        "a deleted event's name can be emitted anew"
    );
}

/// `dev-postgres` prints a URL other commands can use, and stops the server
/// (removing its data directory) when stdin closes or on SIGTERM.
#[test]
fn dev_postgres_serves_until_stdin_closes_or_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    for stop in ["stdin", "sigterm"] {
        let mut server = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["dev-postgres", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run switchyard dev-postgres");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let doc: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("dev-postgres printed {line:?}: {e}"));
        let url = doc["url"].as_str().expect("a url").to_owned();
        assert!(
            url.starts_with("postgres://127.0.0.1:")
                || url.starts_with("postgres://postgres@127.0.0.1:"),
            "{url}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["--store", &url, "migrate"])
            .output()
            .unwrap();
        assert!(out.status.success(), "migrate: {}", text(&out.stderr));
        match stop {
            "stdin" => drop(server.stdin.take()),
            _ => {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
            }
        }
        let status = server.wait().unwrap();
        assert!(
            status.success(),
            "{stop}: dev-postgres exited with {status}"
        );
        let port = doc["port"].as_u64().unwrap();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port as u16)).is_err(),
            "{stop}: the server still listens on {port}"
        );
    }
}

/// `switchyard serve` without API tokens refuses a non-loopback address
/// (exit 2, before opening the store), unless `--insecure`; on loopback it
/// serves the API until killed.
#[test]
fn serve_refuses_non_loopback_without_tokens() {
    let cli = Cli::new();
    let out = cli.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without API tokens")
            && err.contains("--insecure"),
        "{err}"
    );
    assert!(!cli.db.exists(), "the store was not opened");
    let out = cli.run(&["serve", "--listen", "localhost"]);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("--listen must be an address like 127.0.0.1:9464 (an IP address and a port), not \"localhost\""));
    let out = cli.run(&["serve", "--grpc-listen", "nowhere"]);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("--grpc-listen must be an address like 127.0.0.1:9464 (an IP address and a port), not \"nowhere\""));

    // On loopback (and with --insecure anywhere) it starts and answers.
    for args in [
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ][..],
        &["serve", "--listen", "0.0.0.0:0", "--insecure"][..],
    ] {
        use std::io::{BufRead, BufReader, Read, Write};
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("SWITCHYARD_STORE", cli.url())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start serve");
        let mut line = String::new();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        stderr.read_line(&mut line).unwrap();
        if args.contains(&"--grpc-listen") {
            let mut grpc = String::new();
            stderr.read_line(&mut grpc).unwrap();
            let g = grpc
                .trim()
                .strip_prefix("switchyard serve: gRPC health on ")
                .unwrap_or_else(|| panic!("unexpected second line `{grpc}`"));
            std::net::TcpStream::connect(g).expect("the gRPC port listens");
        }
        let addr = line
            .trim()
            .strip_prefix("switchyard serve: listening on http://")
            .unwrap_or_else(|| panic!("{args:?}: unexpected first line `{line}`"))
            .replace("0.0.0.0", "127.0.0.1");
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.write_all(b"GET /api/v1/tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains(r#"{"tasks":[],"next_cursor":null}"#),
            "{answer}"
        );
    }
}

/// `serve` takes its tokens, addresses and body limit from the
/// configuration file (never from the command line): no token is 401, a read
/// token on a mutation 403, a write token spawns; the secrets never appear
/// in its output; with tokens configured a non-loopback address is allowed.
#[test]
fn serve_takes_tokens_from_the_configuration() {
    use std::io::{BufRead, BufReader, Read, Write};
    let cli = Cli::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    let (read, write) = ("read-secret-0123456789", "write-secret-0123456789");
    std::fs::write(
        &config,
        format!(
            "[serve]\nlisten = \"0.0.0.0:0\"\nmax_body_bytes = 4096\n\n\
             [[serve.tokens]]\nname = \"dashboard\"\nsecret = \"{read}\"\nscope = \"read\"\n\n\
             [[serve.tokens]]\nname = \"ci\"\nsecret = \"{write}\"\nscope = \"write\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("SWITCHYARD_STORE", cli.url())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start serve");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = String::new();
    let mut addr = None;
    for _ in 0..3 {
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        lines.push_str(&line);
        if let Some(a) = line
            .trim()
            .strip_prefix("switchyard serve: listening on http://")
        {
            addr = Some(a.replace("0.0.0.0", "127.0.0.1"));
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no address in:\n{lines}"));
    let call = |method: &str, path: &str, token: Option<&str>, body: &str| {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let spawn = r#"{"handler":"h","input":1}"#;
    let a = call("GET", "/api/v1/tasks", None, "");
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    let a = call("GET", "/api/v1/tasks", Some(read), "");
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let a = call("POST", "/api/v1/tasks", Some(read), spawn);
    assert!(a.starts_with("HTTP/1.1 403"), "{a}");
    let a = call("POST", "/api/v1/tasks", Some(write), spawn);
    assert!(a.starts_with("HTTP/1.1 201"), "{a}");
    let big = format!(r#"{{"handler":"h","input":"{}"}}"#, "x".repeat(5000));
    let a = call("POST", "/api/v1/tasks", Some(write), &big);
    assert!(
        a.starts_with("HTTP/1.1 413"),
        "max_body_bytes from the file: {a}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    lines.push_str(&rest);
    assert!(
        lines.contains("dashboard") && lines.contains("ci"),
        "{lines}"
    );
    assert!(
        !lines.contains(read) && !lines.contains(write),
        "a secret leaked:\n{lines}"
    );
}

#[test]
fn read_only_commands_never_create_the_store() {
    let cli = Cli::new();
    let id = "01a20000-0000-7000-8000-000000000000";
    for args in [
        vec!["tasks", "list"],
        vec!["tasks", "show", id],
        vec!["events", "list"],
        vec!["workers"],
    ] {
        let out = cli.run(&args);
        let err = text(&out.stderr);
        assert_eq!(code(&out), 3, "{args:?}: {err}");
        assert!(
            err.contains(&cli.db.display().to_string()),
            "{args:?}: {err}"
        );
        assert!(err.contains("does not exist"), "{args:?}: {err}");
        assert!(err.contains("switchyard"), "{args:?}: {err}");
        assert!(err.contains("migrate"), "{args:?}: {err}");
        assert!(!cli.db.exists(), "{args:?} created {}", cli.db.display());
    }
    // Writing commands still create it; then reading works.
    let out = cli.run(&["migrate"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(cli.db.exists());
    let out = cli.run(&["tasks", "list"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let other = Cli::new();
    let out = other.run(&["emit", "ev"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(other.db.exists());
}

/// A store that cannot be reached or refuses us exits 3 with the cause:
/// the server's message and SQLSTATE, or the socket error.
#[test]
fn unreachable_postgres_exits_3_with_the_cause() {
    let server = switchyard_store::pg_server::PgServer::shared().unwrap_or_else(|e| panic!("{e}"));
    let cli = Cli::new();
    let unknown = server.url_of("no_such_database_here");
    let out = cli.run(&["--store", &unknown, "tasks", "list"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains("database \"no_such_database_here\" does not exist"),
        "{err}"
    );
    assert!(err.contains("3D000"), "{err}");
    assert!(!err.contains("configuration error"), "{err}");

    // An unknown role: the server's text and 28000.
    let role = format!(
        "postgres://nobody_here:pw_x@127.0.0.1:{}/postgres",
        server.port()
    );
    let out = cli.run(&["--store", &role, "migrate"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), 3, "{role}: {err}");
    assert!(err.contains("nobody_here"), "{err}");
    assert!(err.contains("SQLSTATE 28"), "{err}");
    assert!(!err.contains("pw_x"), "{err}");

    // Nothing listens on a port just freed: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://u:secret_pw@127.0.0.1:{port}/db");
    let out = cli.run(&["--store", &url, "workers"]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), 3, "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("secret_pw"), "{err}");
    assert!(!err.contains("configuration error"), "{err}");
}

/// Runs the binary on `url` (blocking; for async tests via spawn_blocking)
/// and returns stdout, asserting success.
fn run_ok(url: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .args(["--store", url])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

async fn run_json(url: &str, args: &[&str]) -> Value {
    let url = url.to_string();
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.push("--json".into());
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&run_ok(&url, &a)).unwrap()
    })
    .await
    .unwrap()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// `tasks list --state suspended | --root | --parent`, the PARENT column,
/// and `events list --name PREFIX`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_what_waits_roots_children_and_events_by_prefix() {
    let cli = Cli::new();
    let url = cli.url();
    let store = switchyard::open(&url).await.unwrap();
    let worker = Worker::builder(store.clone())
        .step("parent", HandlerOptions::default(), |_, ctx| async move {
            ctx.spawn("unserved.child", json!({})).await?;
            ctx.await_event("never.comes", Some(Duration::from_secs(3600)))
                .await
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(store.clone());
    let parent = client.spawn("parent", json!({})).await.unwrap();
    let plain = client.spawn("unserved.root", json!({})).await.unwrap();
    let mut child = None;
    for _ in 0..500 {
        let d = client.inspect(parent).await.unwrap();
        if d.steps[0].state == switchyard::StepState::Suspended && !d.children.is_empty() {
            child = Some(d.children[0].id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let child = child.expect("the parent suspends after spawning its child");
    let (parent_s, child_s, plain_s) = (parent.to_string(), child.to_string(), plain.to_string());

    let suspended = run_json(&url, &["tasks", "list", "--state", "suspended"]).await;
    assert_eq!(ids(&suspended), vec![parent_s.clone()], "{suspended}");
    let roots = run_json(&url, &["tasks", "list", "--root"]).await;
    let mut r = ids(&roots);
    r.sort();
    let mut want = vec![parent_s.clone(), plain_s.clone()];
    want.sort();
    assert_eq!(r, want, "{roots}");
    let kids = run_json(&url, &["tasks", "list", "--parent", &parent_s]).await;
    assert_eq!(ids(&kids), vec![child_s.clone()], "{kids}");
    assert_eq!(kids[0]["parent"]["task_id"], parent_s, "{kids}");

    let u = url.clone();
    let table = tokio::task::spawn_blocking(move || run_ok(&u, &["tasks", "list"]))
        .await
        .unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let col = header
        .iter()
        .position(|c| *c == "PARENT")
        .expect("a PARENT column");
    let row = table
        .lines()
        .find(|l| l.starts_with(&child_s))
        .expect("the child is listed");
    assert_eq!(
        row.split_whitespace().nth(col),
        Some(parent_s.as_str()),
        "{table}"
    );

    client.emit("order.a", json!(1)).await.unwrap();
    client.emit("order.b", json!(2)).await.unwrap();
    client.emit("other.c", json!(3)).await.unwrap();
    let ev = run_json(&url, &["events", "list", "--name", "order."]).await;
    let mut names: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["order.a", "order.b"], "{ev}");
    worker.stop().await;
}

/// `tasks watch` follows a task until it ends: a line per change (the step
/// suspended on its event, woken, completed; the task's end), exit 0 for a
/// completed task and 1 for a failed one; `--json` prints one object per
/// change; `--timeout` gives up with exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_watch_follows_a_task_until_it_ends() {
    let cli = Cli::new();
    let url = cli.url();
    let store = switchyard::open(&url).await.unwrap();
    let worker = Worker::builder(store.clone())
        .step("waits", HandlerOptions::default(), |_, ctx| async move {
            let v = ctx.await_event("watch.go", None).await?;
            ctx.set_status("went")?;
            Ok(v)
        })
        .step("fails", HandlerOptions::default(), |_, ctx| async move {
            ctx.await_event("watch.fail", None).await?;
            Err::<serde_json::Value, _>(StepError::permanent("no way"))
        })
        .step("never", HandlerOptions::default(), |_, ctx| async move {
            ctx.await_event("watch.never", None).await
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(store.clone());
    let id = client.spawn("waits", json!({})).await.unwrap();
    let failing = client.spawn("fails", json!({})).await.unwrap();
    let spawn_watch = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .env("SWITCHYARD_STORE", &url)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let text_watch = spawn_watch(vec!["tasks".into(), "watch".into(), id.to_string()]);
    let json_watch = spawn_watch(vec![
        "tasks".into(),
        "watch".into(),
        failing.to_string(),
        "--json".into(),
    ]);
    // Let both see the waiting state before the events arrive.
    for _ in 0..500 {
        let d = client.inspect(id).await.unwrap();
        let f = client.inspect(failing).await.unwrap();
        if d.steps[0].state == switchyard::StepState::Suspended
            && f.steps[0].state == switchyard::StepState::Suspended
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.emit("watch.go", json!("ok")).await.unwrap();
    client.emit("watch.fail", json!(null)).await.unwrap();
    let out = tokio::task::spawn_blocking(move || text_watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("task running"), "{stdout}");
    assert!(
        stdout.contains("step `waits` suspended (attempt 0, run 1) waiting for event `watch.go`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("step `waits` completed (attempt 1, run 2) status `went`"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("task completed"), "{stdout}");

    let out = tokio::task::spawn_blocking(move || json_watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        code(&out),
        1,
        "a failed task exits 1: {}",
        text(&out.stderr)
    );
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(
        lines.iter().all(|l| l["task_id"] == failing.to_string()),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["step"] == "fails" && l["change"]["state"] == "suspended"),
        "{lines:?}"
    );
    assert_eq!(
        lines.last().unwrap()["task"]["state"],
        "failed",
        "{lines:?}"
    );

    let still = client.spawn("never", json!({})).await.unwrap();
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["tasks", "watch", &still.to_string(), "--timeout", "0.3"])
            .env("SWITCHYARD_STORE", &u)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code(&out), 1);
    assert!(
        text(&out.stderr).contains("after --timeout"),
        "{}",
        text(&out.stderr)
    );
    worker.stop().await;
}

/// `retry --failed` retries the failed tasks of a handler, or only those of
/// one failure message, and reports what it did; an id and --failed
/// exclude each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_retries_a_failure_group() {
    let cli = Cli::new();
    let url = cli.url();
    let store = switchyard::open(&url).await.unwrap();
    let healed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healed.clone();
    let worker = Worker::builder(store.clone())
        .step(
            "flaky",
            HandlerOptions::default().retry(switchyard::RetryPolicy {
                max_attempts: 1,
                ..Default::default()
            }),
            move |input, _| {
                let h = h.clone();
                async move {
                    if h.load(std::sync::atomic::Ordering::SeqCst) {
                        return Ok(input);
                    }
                    let why = input["why"].as_str().unwrap_or("?").to_string();
                    Err(StepError::permanent(why))
                }
            },
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(store.clone());
    let mut no_stock = Vec::new();
    for _ in 0..3 {
        no_stock.push(
            client
                .spawn("flaky", json!({ "why": "no stock" }))
                .await
                .unwrap(),
        );
    }
    let other = client
        .spawn("flaky", json!({ "why": "bad address" }))
        .await
        .unwrap();
    for id in no_stock.iter().chain([&other]) {
        assert_eq!(
            client
                .wait(*id, Duration::from_secs(30))
                .await
                .unwrap()
                .state,
            TaskState::Failed
        );
    }
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["retry", "--failed", "--message", "no stock", "--json"])
            .env("SWITCHYARD_STORE", &u)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({ "matched": 3, "retried": 3, "skipped": [] }));
    for id in &no_stock {
        assert_eq!(
            client
                .wait(*id, Duration::from_secs(30))
                .await
                .unwrap()
                .state,
            TaskState::Completed
        );
    }
    assert_eq!(
        client.get(other).await.unwrap().state,
        TaskState::Failed,
        "another failure group is left alone"
    );
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["retry", "--failed", "--handler", "flaky"])
            .env("SWITCHYARD_STORE", &u)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        text(&out.stdout),
        "retried 1 of 1 failed task\n",
        "{}",
        text(&out.stderr)
    );
    let out = cli.run(&["retry", &other.to_string(), "--failed"]);
    assert_eq!(code(&out), 2, "an id and --failed exclude each other");
    worker.stop().await;
}

/// On a terminal (a pseudo-terminal made by util-linux `script`) tables have
/// box lines and coloured states; `NO_COLOR` keeps the lines and drops the
/// colour; through a pipe the same command prints plain columns.
#[test]
fn tables_are_styled_only_on_a_terminal_and_no_color_is_honoured() {
    let cli = Cli::new();
    let id = cli.json(&["spawn", "nobody.serves"])["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(cli.json(&["cancel", &id])["cancelled"], true);
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let on_tty = |no_color: bool| {
        let mut c = Command::new("script");
        c.args(["-qec", &format!("{bin} tasks list"), "/dev/null"])
            .env("SWITCHYARD_STORE", cli.url())
            .env("TERM", "xterm")
            .env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c
            .output()
            .expect("util-linux `script` runs the CLI on a pseudo-terminal");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let colored = on_tty(false);
    assert!(
        colored.contains('─'),
        "box lines on a terminal: {colored:?}"
    );
    assert!(
        colored.contains("\u{1b}["),
        "colour on a terminal: {colored:?}"
    );
    assert!(colored.contains("cancelled"), "{colored:?}");
    let plain_tty = on_tty(true);
    assert!(plain_tty.contains('─'), "{plain_tty:?}");
    assert!(
        !plain_tty.contains('\u{1b}'),
        "NO_COLOR: no escape codes: {plain_tty:?}"
    );
    let piped = text(&cli.run(&["tasks", "list"]).stdout);
    assert!(
        piped.starts_with("ID "),
        "plain columns through a pipe: {piped:?}"
    );
    assert!(
        !piped.contains('─') && !piped.contains('\u{1b}'),
        "{piped:?}"
    );
}

/// `switchyard man` prints the manual page; `--dir` writes one per command.
#[test]
fn man_pages_come_from_the_command_definitions() {
    let cli = Cli::new();
    let out = cli.run(&["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH switchyard 1"), "{page}");
    for sub in ["spawn", "tasks", "cleanup", "serve", "completions"] {
        assert!(page.contains(sub), "the page names `{sub}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = cli.run(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "switchyard.1",
        "switchyard-spawn.1",
        "switchyard-tasks-watch.1",
        "switchyard-cleanup.1",
    ] {
        let p = dir.path().join(f);
        let body = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(body.contains(".TH"), "{f}");
    }
    let cleanup = std::fs::read_to_string(dir.path().join("switchyard-cleanup.1")).unwrap();
    assert!(cleanup.contains("events\\-older\\-than"), "{cleanup}");
}

/// `tasks show` gives each step's status (STATUS column, `status` in
/// `--json`) and says where its routes lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_show_gives_statuses_and_routes() {
    let cli = Cli::new();
    let url = cli.url();
    let store = switchyard::open(&url).await.unwrap();
    let worker = Worker::builder(store.clone())
        .decision("order", HandlerOptions::default(), |_, _| async move {
            Ok(switchyard::Decision::steps(vec![switchyard::NewStep::new(
                "check",
                "check",
                json!({}),
            )
            .route("ok", vec![])
            .route(
                "out_of_stock",
                vec![switchyard::NewStep::new("backorder", "noop", json!({}))],
            )]))
        })
        .step("check", HandlerOptions::default(), |_, ctx| async move {
            ctx.set_status("out_of_stock")?;
            Ok(json!({ "missing": 2 }))
        })
        .step("noop", HandlerOptions::default(), |_, _| async move {
            Ok(json!(null))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(store.clone());
    let id = client.spawn("order", json!({})).await.unwrap();
    client.wait(id, Duration::from_secs(30)).await.unwrap();
    let id_s = id.to_string();
    let shown = run_json(&url, &["tasks", "show", &id_s]).await;
    let steps = shown["steps"].as_array().unwrap();
    assert_eq!(steps[1]["name"], "check", "{shown}");
    assert_eq!(steps[1]["status"], "out_of_stock", "{shown}");
    assert_eq!(
        steps[1]["routes"]["out_of_stock"][0]["name"], "backorder",
        "{shown}"
    );
    assert_eq!(steps[2]["name"], "backorder", "{shown}");

    let u = url.clone();
    let text = tokio::task::spawn_blocking(move || run_ok(&u, &["tasks", "show", &id_s]))
        .await
        .unwrap();
    let header = text
        .lines()
        .find(|l| l.trim_start().starts_with("NAME"))
        .expect("a steps table");
    let cols: Vec<&str> = header.split_whitespace().collect();
    let col = cols
        .iter()
        .position(|c| *c == "STATUS")
        .expect("a STATUS column");
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("check "))
        .expect("the check step is listed");
    assert_eq!(
        row.split_whitespace().nth(col),
        Some("out_of_stock"),
        "{text}"
    );
    assert!(
        text.contains("step `check` routes `out_of_stock` to: backorder"),
        "{text}"
    );
    assert!(
        text.contains("step `check` routes `ok` to: (nothing)"),
        "{text}"
    );
    worker.stop().await;
}

/// `--input @file`, `--input -`, `--payload @file`, and a payload over the
/// limit refused with the limit named, before the store is created.
#[test]
fn inputs_from_files_and_stdin_and_the_payload_limit() {
    use std::io::Write;
    let cli = Cli::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.json");
    std::fs::write(&file, r#"{"order": "A-1", "lines": [1, 2, 3]}"#).unwrap();
    let arg = format!("@{}", file.display());
    let out = cli.json(&["spawn", "h", "--input", &arg]);
    let id = out["task_id"].as_str().unwrap().to_string();
    let shown = cli.json(&["tasks", "show", &id]);
    assert_eq!(shown["task"]["input"]["order"], "A-1", "{shown}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["spawn", "h", "--input", "-", "--json"])
        .env("SWITCHYARD_STORE", cli.url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"from": "stdin"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = cli.json(&["tasks", "show", v["task_id"].as_str().unwrap()]);
    assert_eq!(shown["task"]["input"]["from"], "stdin", "{shown}");

    std::fs::write(&file, r#"{"amount": 63}"#).unwrap();
    cli.json(&["emit", "paid", "--payload", &arg]);
    let ev = cli.json(&["events", "list", "--name", "paid"]);
    assert_eq!(ev[0]["payload"]["amount"], 63, "{ev}");

    // Missing file: exit 2 naming it.
    let out = cli.run(&["spawn", "h", "--input", "@/no/such/file.json"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("/no/such/file.json"),
        "{}",
        text(&out.stderr)
    );

    // Over the limit: exit 2, names the limit, nothing created.
    let fresh = Cli::new();
    let big = format!("\"{}\"", "x".repeat(2 << 20));
    std::fs::write(&file, &big).unwrap();
    for args in [
        vec!["spawn", "h", "--input", arg.as_str()],
        vec!["emit", "e", "--payload", arg.as_str()],
    ] {
        let out = fresh.run(&args);
        let err = text(&out.stderr);
        assert_eq!(code(&out), 2, "{args:?}: {err}");
        assert!(err.contains("1048576 bytes"), "{args:?}: {err}");
        assert!(err.contains("limit"), "{args:?}: {err}");
        assert!(err.contains(&file.display().to_string()), "{args:?}: {err}");
        assert!(!fresh.db.exists(), "{args:?}");
    }
}

/// With `--json`, a failure is one JSON object on stdout:
/// `{"error":{"code":KIND,"message":...,"exit":N}}`, and the exit code is
/// unchanged.
#[test]
fn json_errors_are_one_json_object() {
    let cli = Cli::new();
    let cases: Vec<(Vec<&str>, i32, &str, &str)> = vec![
        (
            vec!["spawn", "h", "--input", "{bad", "--json"],
            2,
            "invalid_input",
            "--input",
        ),
        (
            vec!["tasks", "list", "--json"],
            3,
            "store_unavailable",
            "does not exist",
        ),
        (
            vec!["--json", "tasks", "list", "--state", "sleeping"],
            2,
            "usage",
            "sleeping",
        ),
        (vec!["frobnicate", "--json"], 2, "usage", "frobnicate"),
    ];
    for (args, exit, kind, needle) in cases {
        let out = cli.run(&args);
        assert_eq!(code(&out), exit, "{args:?}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out.stdout)));
        assert_eq!(v["error"]["code"], kind, "{args:?}: {v}");
        assert_eq!(v["error"]["exit"], exit, "{args:?}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{args:?}: {v}"
        );
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        assert!(
            text(&out.stdout).trim().lines().count() == 1,
            "{}",
            text(&out.stdout)
        );
    }
    assert_eq!(code(&cli.run(&["migrate"])), 0);
    let out = cli.run(&[
        "tasks",
        "show",
        "01a20000-0000-7000-8000-000000000000",
        "--json",
    ]);
    assert_eq!(code(&out), 1);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    // Without --json: text on stderr, nothing on stdout.
    let out = cli.run(&["tasks", "show", "01a20000-0000-7000-8000-000000000000"]);
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).starts_with("error: "),
        "{}",
        text(&out.stderr)
    );
}

/// Each subcommand's help describes its own use of the shared options.
#[test]
fn each_subcommand_help_describes_its_own_options() {
    let cli = Cli::new();
    let help = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--help");
        let out = cli.run(&all);
        assert_eq!(code(&out), 0, "{args:?}");
        text(&out.stdout)
    };
    let dev = help(&["dev-postgres"]);
    assert!(
        !dev.contains("--store") && !dev.contains("--config"),
        "{dev}"
    );
    let bench = help(&["bench"]);
    assert!(bench.contains("throwaway"), "{bench}");
    assert!(!bench.contains("--config"), "{bench}");
    for args in [
        vec!["tasks", "list"],
        vec!["tasks", "show"],
        vec!["events", "list"],
        vec!["workers"],
    ] {
        let h = help(&args);
        assert!(!h.contains("bench"), "{args:?}: {h}");
        assert!(h.contains("Never created"), "{args:?}: {h}");
    }
    for args in [vec!["spawn"], vec!["emit"], vec!["migrate"], vec!["cancel"]] {
        let h = help(&args);
        assert!(!h.contains("bench"), "{args:?}: {h}");
        assert!(h.contains("is created"), "{args:?}: {h}");
    }
    // The option still works before or after the subcommand.
    let url = cli.url();
    assert_eq!(code(&cli.run(&["--store", &url, "migrate"])), 0);
    assert_eq!(code(&cli.run(&["tasks", "list", "--store", &url])), 0);
    let out = cli.run(&["dev-postgres", "--store", &url]);
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
}

/// `switchyard completions SHELL` prints a completion script and touches
/// no store.
#[test]
fn completions_for_each_shell() {
    let cli = Cli::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = cli.run(&["completions", shell]);
        assert_eq!(code(&out), 0, "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("switchyard"), "{shell}");
        assert!(script.contains("dev-postgres"), "{shell}");
    }
    let bash = text(&cli.run(&["completions", "bash"]).stdout);
    assert!(bash.contains("--state"), "{bash}");
    let out = cli.run(&["completions", "tcsh-ish"]);
    assert_eq!(code(&out), 2);
    assert!(!cli.db.exists());
}
