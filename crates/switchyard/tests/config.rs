//! The `switchyard` binary's configuration: `--config` / `SWITCHYARD_CONFIG`,
//! `SWITCHYARD_<SECTION>__<KEY>` overrides, `--store`, `switchyard config`,
//! the errors for unknown keys and wrong types, and secrets (store
//! passwords, tokens) kept out of every output. Each run starts from an
//! empty environment so the caller's `SWITCHYARD_*` variables do not leak in.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const PASSWORD: &str = "s3cr3tpw";
const TOKEN: &str = "tok-7f3a9c-SECRET";

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    /// Runs the binary in this directory with only `env` set.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .output()
            .expect("run switchyard")
    }
    /// `switchyard config --json` (plus `args`), expected to succeed.
    fn config(&self, args: &[&str], env: &[(&str, &str)]) -> Value {
        let mut all = vec!["config", "--json"];
        all.extend_from_slice(args);
        let out = self.run(&all, env);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn the_file_and_environment_overrides_reach_every_command() {
    let d = Dir::new();
    let db = d.path("from-file.db");
    let file = d.write(
        "switchyard.toml",
        &format!(
            "[store]\nurl = \"sqlite:{}\"\n\n[host]\nconcurrency = 8\nlease = \"1m\"\n\n[log]\nlevel = \"debug\"\n",
            db.display()
        ),
    );
    let c = d.config(&["--config", p(&file)], &[]);
    assert_eq!(c["store"]["url"], format!("sqlite:{}", db.display()));
    assert_eq!(c["host"]["concurrency"], 8);
    assert_eq!(c["host"]["lease"], "60s");
    assert_eq!(c["log"]["level"], "debug");

    // SWITCHYARD_CONFIG names the file when --config does not.
    let c = d.config(&[], &[("SWITCHYARD_CONFIG", p(&file))]);
    assert_eq!(c["host"]["concurrency"], 8);

    // SWITCHYARD_<SECTION>__<KEY> overrides the file.
    let c = d.config(
        &["--config", p(&file)],
        &[
            ("SWITCHYARD_HOST__CONCURRENCY", "3"),
            ("SWITCHYARD_SERVE__LISTEN", "127.0.0.1:18080"),
        ],
    );
    assert_eq!(c["host"]["concurrency"], 3);
    assert_eq!(c["host"]["lease"], "60s");
    assert_eq!(c["serve"]["listen"], "127.0.0.1:18080");

    // SWITCHYARD_STORE and then --store override store.url.
    let c = d.config(&["--config", p(&file)], &[("SWITCHYARD_STORE", "memory")]);
    assert_eq!(c["store"]["url"], "memory");
    let c = d.config(
        &["--config", p(&file), "--store", "sqlite:flag.db"],
        &[("SWITCHYARD_STORE", "memory")],
    );
    assert_eq!(c["store"]["url"], "sqlite:flag.db");

    // Commands open the configured store.
    let out = d.run(&["--config", p(&file), "migrate", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(db.exists(), "migrate created the file named in the config");
    assert!(!d.path("switchyard.db").exists());

    // Without any file: the defaults.
    let c = d.config(&[], &[]);
    assert_eq!(c["store"]["url"], "sqlite:switchyard.db");
    assert_eq!(c["host"]["concurrency"], 64);
}

#[test]
fn config_prints_toml_by_default() {
    let d = Dir::new();
    let file = d.write(
        "c.toml",
        "[host]\nname = \"orders-1\"\nshutdown_grace = 2.5\n",
    );
    let out = d.run(&["--config", p(&file), "config"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[host]"), "{stdout}");
    assert!(stdout.contains("name = \"orders-1\""), "{stdout}");
    assert!(stdout.contains("shutdown_grace = \"2500ms\""), "{stdout}");
}

#[test]
fn unknown_keys_and_wrong_types_are_refused_naming_the_key_and_the_file() {
    let d = Dir::new();
    let file = d.write("bad-key.toml", "[host]\nconcurrency = 8\nconcurency = 9\n");
    for args in [vec!["config"], vec!["tasks", "list"]] {
        let mut all = vec!["--config", p(&file)];
        all.extend(args);
        let out = d.run(&all, &[]);
        assert_eq!(code(&out), 2, "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("`host.concurency`"), "{err}");
        assert!(err.contains("bad-key.toml"), "{err}");
        assert!(err.contains("unknown key"), "{err}");
    }
    assert!(!d.path("switchyard.db").exists(), "no store opened");

    let file = d.write("bad-type.toml", "[host]\nconcurrency = \"lots\"\n");
    let out = d.run(&["--config", p(&file), "config"], &[]);
    assert_eq!(code(&out), 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("`host.concurrency`") && err.contains("bad-type.toml") && err.contains("lots"),
        "{err}"
    );

    let out = d.run(&["config"], &[("SWITCHYARD_HOST__LEASE", "whenever")]);
    assert_eq!(code(&out), 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("`host.lease`") && err.contains("SWITCHYARD_HOST__LEASE"),
        "{err}"
    );

    let out = d.run(&["--config", p(&d.path("missing.toml")), "config"], &[]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("missing.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_never_prints_secrets() {
    let d = Dir::new();
    let file = d.write(
        "secret.toml",
        &format!(
            "[store]\nurl = \"postgres://alice:{PASSWORD}@127.0.0.1:1/jobs?sslpassword={PASSWORD}\"\n\n[serve]\nlisten = \"127.0.0.1:8080\"\n\n[[serve.tokens]]\nname = \"ci\"\nsecret = \"{TOKEN}\"\nscope = \"read\"\n"
        ),
    );
    for fmt in [vec![], vec!["--json"]] {
        let mut args = vec!["--config", p(&file), "config"];
        args.extend(fmt.iter().copied());
        let out = d.run(&args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!all.contains(PASSWORD), "{all}");
        assert!(!all.contains(TOKEN), "{all}");
        assert!(all.contains("alice:***@127.0.0.1:1"), "{all}");
        assert!(all.contains("ci"), "{all}");
    }
    // The same through the environment.
    let out = d.run(
        &["config"],
        &[(
            "SWITCHYARD_STORE",
            &format!("postgres://bob:{PASSWORD}@h/db"),
        )],
    );
    assert!(out.status.success());
    assert!(
        !text(&out.stdout).contains(PASSWORD),
        "{}",
        text(&out.stdout)
    );
}

/// Issue 22's example: a store that refuses the connection must not print
/// the password in its error, whichever way the URL was given.
#[test]
fn store_passwords_never_appear_in_errors() {
    let d = Dir::new();
    let url = format!("postgres://alice:{PASSWORD}@127.0.0.1:1/nope");
    let file = d.write("pg.toml", &format!("[store]\nurl = \"{url}\"\n"));
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let runs: Vec<(Vec<&str>, Env)> = vec![
        (vec!["--store", &url, "tasks", "list"], vec![]),
        (vec!["--store", &url, "workers", "--json"], vec![]),
        (vec!["tasks", "list"], vec![("SWITCHYARD_STORE", &url)]),
        (vec!["--config", p(&file), "migrate"], vec![]),
    ];
    for (args, env) in runs {
        let out = d.run(&args, &env);
        assert_ne!(code(&out), 0, "{args:?}");
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!all.contains(PASSWORD), "{args:?}: {all}");
        assert!(all.contains("alice:***@127.0.0.1:1"), "{args:?}: {all}");
        assert!(all.contains("cannot connect"), "{args:?}: {all}");
    }
    // Passwords as URL parameters, and in a URL no store recognises.
    for url in [
        format!("postgres://alice@127.0.0.1:1/nope?password={PASSWORD}"),
        format!("mysql://alice:{PASSWORD}@127.0.0.1:1/nope"),
    ] {
        let out = d.run(&["--store", &url, "tasks", "list"], &[]);
        assert_ne!(code(&out), 0, "{url}");
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!all.contains(PASSWORD), "{url}: {all}");
        assert!(all.contains("cannot open store"), "{url}: {all}");
    }
    // Nor with debug logging on.
    let out = d.run(
        &["--store", &url, "tasks", "list"],
        &[("RUST_LOG", "trace")],
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!all.contains(PASSWORD), "{all}");
}

/// The Rust API: `worker_from_config` opens the configured store and
/// applies `[host]`; the host runs a task there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_from_config_uses_the_store_and_host_settings() {
    use std::time::Duration;
    let d = Dir::new();
    let db = d.path("rust.db");
    let file = d.write(
        "host.toml",
        &format!(
            "[store]\nurl = \"sqlite:{}\"\n[host]\nname = \"orders-1\"\nconcurrency = 3\nlease = \"2s\"\nheartbeat = \"250ms\"\nshutdown_grace = \"1s\"\nhealth_listen = \"127.0.0.1:0\"\n",
            db.display()
        ),
    );
    let config = switchyard::Config::load(Some(&file)).unwrap();
    let worker = switchyard::worker_from_config(&config)
        .await
        .unwrap()
        .step(
            "double",
            switchyard::HandlerOptions::default(),
            |input, _ctx| async move { Ok(serde_json::json!(input.as_i64().unwrap_or(0) * 2)) },
        )
        .build()
        .unwrap();
    let o = worker.options();
    assert_eq!(o.concurrency, 3);
    assert_eq!(o.lease, Duration::from_secs(2));
    assert_eq!(o.heartbeat, Duration::from_millis(250));
    assert_eq!(o.shutdown_grace, Duration::from_secs(1));
    assert_eq!(o.health_listen, Some("127.0.0.1:0".parse().unwrap()));
    let running = worker.start().await.unwrap();
    // host.health_listen is served (port 0: a free one).
    let health = running.health_addr().expect("health endpoint started");
    assert_ne!(health.port(), 0);
    let client = switchyard::Client::new(switchyard::open(&config.store.url).await.unwrap());
    let id = client.spawn("double", serde_json::json!(21)).await.unwrap();
    let out = client.result(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, serde_json::json!(42));
    // The host's name is listed by `switchyard workers`.
    let url = config.store.url.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let d = Dir::new();
        let json = d.run(&["--store", &url, "workers", "--json"], &[]);
        let table = d.run(&["--store", &url, "workers"], &[]);
        (json, table)
    })
    .await
    .unwrap();
    assert!(listed.0.status.success(), "{}", text(&listed.0.stderr));
    let hosts: Value = serde_json::from_slice(&listed.0.stdout).unwrap();
    assert_eq!(hosts[0]["name"], "orders-1", "{hosts}");
    let table = text(&listed.1.stdout);
    assert!(
        table.contains("NAME") && table.contains("orders-1"),
        "{table}"
    );
    running.stop().await;
    assert!(db.exists());
}

#[test]
fn log_level_from_the_configuration_sets_the_cli_log_filter() {
    let d = Dir::new();
    let db = d.path("log.db");
    let with_level = |name: &str, level: &str| {
        d.write(
            name,
            &format!(
                "[store]\nurl = \"sqlite:{}\"\n\n[log]\nlevel = \"{level}\"\n",
                db.display()
            ),
        )
    };
    let debug = with_level("debug.toml", "debug");
    let plain = d.write(
        "plain.toml",
        &format!("[store]\nurl = \"sqlite:{}\"\n", db.display()),
    );
    let line = "switchyard: configuration loaded";
    // `tasks list` only reads: the store must exist.
    let out = d.run(&["--config", p(&plain), "migrate"], &[]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));

    // log.level = "debug": the CLI's debug lines reach stderr.
    let out = d.run(&["--config", p(&debug), "tasks", "list"], &[]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(line), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("DEBUG"), "{}", text(&out.stderr));

    // The default level (info) shows none.
    let out = d.run(&["--config", p(&plain), "tasks", "list"], &[]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(line), "{}", text(&out.stderr));

    // RUST_LOG and SWITCHYARD_LOG win over the file.
    for var in ["RUST_LOG", "SWITCHYARD_LOG"] {
        let out = d.run(&["--config", p(&debug), "tasks", "list"], &[(var, "warn")]);
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        assert!(
            !text(&out.stderr).contains(line),
            "{var}: {}",
            text(&out.stderr)
        );
    }
    // ...and the environment's SWITCHYARD_LOG__LEVEL is the configuration's.
    let out = d.run(
        &["--config", p(&plain), "tasks", "list"],
        &[("SWITCHYARD_LOG__LEVEL", "debug")],
    );
    assert!(text(&out.stderr).contains(line), "{}", text(&out.stderr));

    // An invalid level is refused, naming log.level and the file.
    let bad = with_level("bad.toml", "loud");
    let out = d.run(&["--config", p(&bad), "tasks", "list"], &[]);
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("log.level"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("not a log level"), "{err}");
}
