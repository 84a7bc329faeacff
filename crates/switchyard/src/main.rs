//! The `switchyard` command line: migrate the store, spawn tasks, emit
//! events, inspect and repair tasks, list hosts, delete old finished tasks,
//! and benchmark.
//!
//! Exit codes: 0 on success, 2 for usage errors and invalid input (clap's own
//! errors included), 3 when the store is missing (read-only commands never
//! create one), unreachable or unavailable, 1 for every other failure (task
//! not found, conflicting state, timeouts).

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

mod cli {
    pub mod bench;
    pub mod bench_http;
    pub mod commands;
    pub mod dev;
    pub mod output;
    pub mod serve;
}

use cli::bench::BenchArgs;
use cli::commands::{CliError, Outcome};

/// Switchyard: a durable worker host.
#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about, propagate_version = true)]
struct Cli {
    /// Store URL: `memory`, `sqlite:PATH`, `postgres://...`. Overrides
    /// `store.url` of the configuration (file, $SWITCHYARD_STORE,
    /// $SWITCHYARD_STORE__URL; default `sqlite:switchyard.db`).
    #[arg(long, global = true, value_name = "URL")]
    store: Option<String>,
    /// Configuration file (TOML). Default: $SWITCHYARD_CONFIG, else none
    /// (defaults and `SWITCHYARD_<SECTION>__<KEY>` environment variables).
    #[arg(long, global = true, value_name = "PATH", env = "SWITCHYARD_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply pending schema migrations and print the schema version.
    Migrate,
    /// Spawn a task and print its id.
    Spawn(SpawnArgs),
    /// Emit an event (first write wins).
    Emit(EmitArgs),
    /// List or inspect tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// List cached events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Cancel a running task.
    Cancel(CancelArgs),
    /// Re-run a failed or cancelled task, or (--failed) every failed task
    /// matching a filter.
    Retry(RetryArgs),
    /// List registered hosts and the handlers they serve.
    Workers,
    /// Delete finished tasks (and their steps and checkpoints) older than a
    /// given age, in bounded batches. Cached events are kept.
    Cleanup(CleanupArgs),
    /// Serve the REST API (`/api/v1`, OpenAPI at `/api/v1/openapi.json`)
    /// over the store until Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// Measure throughput and latency with an in-process host.
    Bench(BenchArgs),
    /// Start a throwaway PostgreSQL server (initdb in a temporary directory,
    /// 127.0.0.1 on a free port, fsync off) and print a database URL; it is
    /// stopped and removed when stdin closes or on Ctrl-C/SIGTERM. For
    /// trying the PostgreSQL store and for tests, never for real data.
    DevPostgres,
    /// Print the effective configuration (file, environment and --store
    /// applied) as TOML, or JSON with --json; secrets are shown as `***`.
    Config,
    /// Print a shell completion script, e.g.
    /// `switchyard completions bash > /etc/bash_completion.d/switchyard` or
    /// `source <(switchyard completions zsh)`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff, from the same definitions as --help),
    /// e.g. `switchyard man | man -l -`; with --dir, write a page per
    /// command (switchyard.1, switchyard-spawn.1, switchyard-tasks-list.1,
    /// ...) into that directory.
    Man {
        /// Write every page into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// Arguments of `switchyard cleanup`.
#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// Delete tasks that finished longer ago than this: a whole number with
    /// a unit, `s`, `m`, `h` or `d` (e.g. `90m`, `7d`).
    #[arg(
        long,
        value_name = "DURATION",
        required_unless_present = "events_older_than",
        allow_hyphen_values = true
    )]
    pub older_than: Option<String>,
    /// Also delete cached events (response events included) emitted longer
    /// ago than this (opt-in: events are kept forever otherwise). A step
    /// that already received an event keeps it; a step that awaits a
    /// deleted name later waits for it to be emitted again; the name can
    /// be emitted anew.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub events_older_than: Option<String>,
    /// Tasks deleted per transaction.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub batch: usize,
}

/// Arguments of `switchyard serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the REST API (default: `serve.listen` of the
    /// configuration, else 127.0.0.1:8080). Without API tokens
    /// (`[[serve.tokens]]` in the configuration; never on the command line)
    /// it must be a loopback address unless --insecure is given.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the standard gRPC health service (`grpc.health.v1`),
    /// reporting whether the store answers (default: `serve.grpc_listen`;
    /// off unless given).
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// Allow a non-loopback --listen address without API tokens: anyone who
    /// can reach it may spawn and cancel tasks.
    #[arg(long)]
    pub insecure: bool,
}

/// Arguments of `switchyard spawn`.
#[derive(Args, Debug)]
pub struct SpawnArgs {
    /// Handler of the task's root step.
    pub name: String,
    /// Input: JSON text, `@PATH` to read it from a file, or `-` to read it
    /// from standard input (at most the store's payload limit, 1 MiB).
    #[arg(long, value_name = "JSON|@PATH|-", default_value = "null")]
    pub input: String,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Spawning twice with the same key returns the first task.
    #[arg(long, value_name = "K")]
    pub idempotency_key: Option<String>,
    /// Event emitted with the outcome when the task finishes.
    #[arg(long, value_name = "E")]
    pub response_event: Option<String>,
    /// A header `k=v` visible to every step (repeatable).
    #[arg(long = "header", value_name = "K=V")]
    pub headers: Vec<String>,
    /// Wait up to SECS seconds for the task to finish and print its result.
    #[arg(long, value_name = "SECS")]
    pub wait: Option<f64>,
}

/// Arguments of `switchyard emit`.
#[derive(Args, Debug)]
pub struct EmitArgs {
    /// Event name.
    pub name: String,
    /// Payload: JSON text, `@PATH` to read it from a file, or `-` to read
    /// it from standard input (at most the store's payload limit, 1 MiB).
    #[arg(long, value_name = "JSON|@PATH|-", default_value = "null")]
    pub payload: String,
}

#[derive(Subcommand, Debug)]
enum TasksCommand {
    /// List tasks, newest first.
    List(TasksListArgs),
    /// Show one task: steps, checkpoints, waits, children, and why it may be stuck.
    Show(ShowArgs),
    /// Follow one task live until it ends: a line per change of the task or
    /// of one of its steps (state, attempt, status, what it waits for).
    /// Exits 0 if it completed, 1 if it failed or was cancelled.
    Watch(WatchArgs),
}

/// Arguments of `switchyard tasks watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The task id.
    pub id: String,
    /// Seconds between two looks at the store.
    #[arg(long, value_name = "SECS", default_value_t = 0.2)]
    pub interval: f64,
    /// Give up (exit 1) after this many seconds; default: never.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
}

/// Arguments of `switchyard tasks list`.
#[derive(Args, Debug)]
pub struct TasksListArgs {
    /// Only tasks in this state: running, completed, failed, cancelled, or
    /// suspended (running tasks with a step waiting on an event, a sleep or
    /// children).
    #[arg(long, value_name = "S")]
    pub state: Option<String>,
    /// Only tasks whose root handler is this.
    #[arg(long, value_name = "H")]
    pub handler: Option<String>,
    /// Only root tasks (spawned by a client, not by a step).
    #[arg(long, conflicts_with = "parent")]
    pub root: bool,
    /// Only children (spawned or delegated) of this task.
    #[arg(long, value_name = "ID")]
    pub parent: Option<String>,
    /// At most this many.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// List cached events, newest first.
    List {
        /// At most this many.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Only events whose name starts with this prefix.
        #[arg(long, value_name = "PREFIX")]
        name: Option<String>,
    },
}

/// Arguments of `switchyard cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The task id.
    pub id: String,
    /// Also cancel the task's unfinished descendants.
    #[arg(long)]
    pub cascade: bool,
}

/// A task id argument.
#[derive(Args, Debug)]
pub struct IdArg {
    /// The task id.
    pub id: String,
}

/// Arguments of `switchyard retry`.
#[derive(Args, Debug)]
pub struct RetryArgs {
    /// The task id (or --failed).
    #[arg(required_unless_present = "failed", conflicts_with = "failed")]
    pub id: Option<String>,
    /// Retry the failed tasks matching --handler and --message instead
    /// (newest first, at most --max), showing progress on a terminal.
    #[arg(long)]
    pub failed: bool,
    /// With --failed: only tasks whose root handler is this.
    #[arg(long, value_name = "H", requires = "failed")]
    pub handler: Option<String>,
    /// With --failed: only tasks whose recorded error message is exactly
    /// this (a failure group of the dashboard).
    #[arg(long, value_name = "TEXT", requires = "failed")]
    pub message: Option<String>,
    /// With --failed: at most this many tasks.
    #[arg(long, value_name = "N", default_value_t = 1000, requires = "failed")]
    pub max: usize,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The task id.
    pub id: String,
    /// Also list the context's internal entries (await deadlines, sleeps,
    /// spawns, delegation groups) among the checkpoints.
    #[arg(long)]
    pub internal: bool,
}

/// The log filter: `RUST_LOG`, else `SWITCHYARD_LOG`, else the configured
/// `log.level` (`warn` for the commands that read no configuration).
fn init_tracing(log: Option<&switchyard::config::LogConfig>) {
    const OVERRIDES: [&str; 2] = ["RUST_LOG", "SWITCHYARD_LOG"];
    let directives = match log {
        Some(log) => log.effective_filter(&OVERRIDES),
        None => switchyard::config::LogConfig {
            level: "warn".into(),
        }
        .effective_filter(&OVERRIDES),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prints a failure: one JSON object on stdout with `--json`, else a line
/// on stderr.
fn report(e: &CliError, json: bool) {
    if json {
        println!("{}", e.to_json());
    } else {
        eprintln!("error: {}", e.message);
    }
}

const STORE_SOURCES: &str = "Overrides `store.url` of the configuration (file, \
     $SWITCHYARD_STORE, $SWITCHYARD_STORE__URL; default `sqlite:switchyard.db`)";

/// A subcommand's own `--store`: the same option as the global one (clap
/// does not propagate a global option to a subcommand that defines it),
/// with help that says what this command does with the store.
fn store_arg(help: String) -> clap::Arg {
    clap::Arg::new("store")
        .long("store")
        .value_name("URL")
        .value_parser(clap::value_parser!(String))
        .help(help)
}

/// `--config` for the subcommands that read no configuration: accepted
/// (and ignored) but not offered in their help.
fn unused_config() -> clap::Arg {
    clap::Arg::new("config")
        .long("config")
        .value_name("PATH")
        .value_parser(clap::value_parser!(std::path::PathBuf))
        .hide(true)
}

/// The command line with each subcommand's own help for `--store`, which
/// clap would otherwise show alike everywhere.
fn command() -> clap::Command {
    let reads = |what: &str| {
        store_arg(format!(
            "Store to read {what} from: `memory`, `sqlite:PATH`, `postgres://...`. \
             {STORE_SOURCES}. Never created: a missing SQLite file is an error (exit 3)"
        ))
    };
    let writes = |what: &str| {
        store_arg(format!(
            "Store to {what}: `memory`, `sqlite:PATH`, `postgres://...`. {STORE_SOURCES}. \
             A missing SQLite file is created"
        ))
    };
    Cli::command()
        .mut_subcommand("migrate", |c| c.arg(writes("create or migrate")))
        .mut_subcommand("spawn", |c| c.arg(writes("spawn the task in")))
        .mut_subcommand("emit", |c| c.arg(writes("emit the event in")))
        .mut_subcommand("tasks", |t| {
            t.mut_subcommand("list", |c| c.arg(reads("tasks")))
                .mut_subcommand("show", |c| c.arg(reads("the task")))
        })
        .mut_subcommand("events", |t| {
            t.mut_subcommand("list", |c| c.arg(reads("events")))
        })
        .mut_subcommand("cancel", |c| c.arg(writes("cancel the task in")))
        .mut_subcommand("retry", |c| c.arg(writes("retry the task in")))
        .mut_subcommand("workers", |c| c.arg(reads("registered hosts")))
        .mut_subcommand("cleanup", |c| {
            c.arg(writes("delete old finished tasks from"))
        })
        .mut_subcommand("serve", |c| c.arg(writes("serve")))
        .mut_subcommand("config", |c| {
            c.arg(store_arg(format!(
                "Store URL to show in place of `store.url`. {STORE_SOURCES}. Nothing is opened"
            )))
        })
        .mut_subcommand("bench", |c| {
            c.arg(unused_config()).arg(store_arg(
                "Store to benchmark: `sqlite` (the default) or `postgres` alone means a \
                 throwaway database made for the run; `memory`, `sqlite:PATH` or \
                 `postgres://...` an existing one. Default: $SWITCHYARD_STORE, else `sqlite`; \
                 the configuration's `store.url` is not used"
                    .into(),
            ))
        })
        .mut_subcommand("completions", |c| {
            c.arg(store_arg(String::new()).hide(true))
                .arg(unused_config())
        })
        .mut_subcommand("dev-postgres", |c| {
            c.arg(store_arg(String::new()).hide(true))
                .arg(unused_config())
        })
}

fn main() -> ExitCode {
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            // `--json` usage errors are JSON too; help and version are not errors.
            let wants_json = std::env::args_os().skip(1).any(|a| a == "--json");
            if wants_json && e.use_stderr() {
                let message = e.render().to_string();
                let message = message.trim().trim_start_matches("error: ").to_string();
                report(&CliError::usage(message), true);
                return ExitCode::from(2);
            }
            e.exit();
        }
    };
    let json = cli.json;
    cli::output::init_style();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(
                &CliError::failure(format!("cannot start the async runtime: {e}")),
                json,
            );
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    // Hosts and stores may still hold background tasks; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failure) => ExitCode::from(1),
        Err(e) => {
            report(&e, json);
            ExitCode::from(e.code)
        }
    }
}

async fn run(cli: Cli) -> Result<Outcome, CliError> {
    use cli::commands as c;
    let json = cli.json;
    // The benchmark never touches the user's default store: without an
    // explicit --store it runs on a fresh temporary SQLite file.
    if let Command::Bench(args) = cli.command {
        let url = cli.store.or_else(|| {
            std::env::var("SWITCHYARD_STORE")
                .ok()
                .filter(|s| !s.trim().is_empty())
        });
        init_tracing(None);
        return cli::bench::run(args, url.unwrap_or_else(|| "sqlite".into())).await;
    }
    if let Command::Man { dir } = cli.command {
        let failed =
            |e: std::io::Error| CliError::failure(format!("writing the manual pages: {e}"));
        if let Some(dir) = dir {
            std::fs::create_dir_all(&dir).map_err(failed)?;
            clap_mangen::generate_to(command(), &dir).map_err(failed)?;
            if !json {
                println!("manual pages written to {}", dir.display());
            }
            return Ok(Outcome::Success);
        }
        let mut out = Vec::new();
        clap_mangen::Man::new(command())
            .render(&mut out)
            .map_err(failed)?;
        use std::io::Write as _;
        return match std::io::stdout().write_all(&out) {
            Ok(()) => Ok(Outcome::Success),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Outcome::Success),
            Err(e) => Err(CliError::failure(format!("writing to stdout: {e}"))),
        };
    }
    if let Command::Completions { shell } = cli.command {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command(), "switchyard", &mut out);
        use std::io::Write as _;
        return match std::io::stdout().write_all(&out) {
            Ok(()) => Ok(Outcome::Success),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Outcome::Success),
            Err(e) => Err(CliError::failure(format!("writing to stdout: {e}"))),
        };
    }
    if let Command::DevPostgres = cli.command {
        if cli.store.is_some() {
            return Err(CliError::usage(
                "dev-postgres starts its own server and takes no --store",
            ));
        }
        init_tracing(None);
        return cli::dev::dev_postgres(json).await;
    }
    let config = switchyard::Config::load(cli.config.as_deref());
    // Set once per process, before anything logs: the configured level
    // when the configuration loads, else the default.
    init_tracing(config.as_ref().ok().map(|c| &c.log));
    let mut config = config.map_err(|e| CliError::usage(e.to_string()))?;
    tracing::debug!(
        file = ?cli.config,
        log = %config.log.filter(),
        "switchyard: configuration loaded"
    );
    if let Some(url) = cli.store {
        config.store.url = url;
    }
    if let Command::Config = cli.command {
        return c::show_config(&config, json);
    }
    let url = config
        .store
        .open_url()
        .map_err(|e| CliError::usage(e.to_string()))?;
    match cli.command {
        Command::Migrate => c::migrate(&url, json).await,
        Command::Spawn(a) => c::spawn(&url, json, a).await,
        Command::Emit(a) => c::emit(&url, json, a).await,
        Command::Tasks(TasksCommand::List(a)) => c::tasks_list(&url, json, a).await,
        Command::Tasks(TasksCommand::Show(a)) => c::tasks_show(&url, json, &a.id, a.internal).await,
        Command::Tasks(TasksCommand::Watch(a)) => c::tasks_watch(&url, json, a).await,
        Command::Events(EventsCommand::List { limit, name }) => {
            c::events_list(&url, json, limit, name.as_deref()).await
        }
        Command::Cancel(a) => c::cancel(&url, json, &a.id, a.cascade).await,
        Command::Retry(a) => c::retry(&url, json, a).await,
        Command::Workers => c::workers(&url, json).await,
        Command::Cleanup(a) => c::cleanup(&url, json, a).await,
        Command::Serve(a) => cli::serve::serve(&url, a, &config.serve).await,
        Command::Bench(_)
        | Command::DevPostgres
        | Command::Config
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("handled above")
        }
    }
}
