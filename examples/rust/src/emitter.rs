//! Emits an event from a second process, the way a payment provider's
//! webhook or a courier's scanner would reach a running workflow.
//!
//! The preferred second process is the real CLI, `switchyard emit NAME
//! --payload JSON --store URL`, found next to the running executable (cargo
//! puts every binary of the workspace in the same directory). When it is
//! not there, or it did not store the event, the running executable is
//! started again in its hidden `--emit NAME PAYLOAD` mode, which always
//! works. Emitting twice is harmless: the first write wins.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use switchyard::{Client, DynStore};

use crate::timeline::{compact, say};

/// Which program plays the second process.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Via {
    /// The `switchyard` CLI if it sits next to this executable, else this executable.
    #[default]
    Auto,
    /// Only the `switchyard` CLI.
    Cli,
    /// Only this executable (hidden `--emit` mode).
    #[value(name = "self")]
    SelfExe,
}

/// Longest a second process may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// The `switchyard` CLI next to the running executable, if it is there.
pub fn cli_next_to_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let cli = exe
        .parent()?
        .join(format!("switchyard{}", std::env::consts::EXE_SUFFIX));
    cli.is_file().then_some(cli)
}

/// Emits `name` with `payload` from a second process on the store at `url`,
/// then checks through `store` that the event is there.
pub async fn emit(
    via: Via,
    store: &DynStore,
    url: &str,
    name: &str,
    payload: &Value,
) -> anyhow::Result<()> {
    let json = compact(payload);
    let cli = match via {
        Via::SelfExe => None,
        Via::Auto => cli_next_to_exe(),
        Via::Cli => Some(cli_next_to_exe().context(
            "the `switchyard` CLI is not next to this executable (build it: cargo build -p switchyard)",
        )?),
    };
    if let Some(cli) = cli {
        let args = ["emit", name, "--payload", &json, "--store", url];
        match run(&cli, &args).await {
            Ok(()) if is_stored(store, name).await? => return Ok(()),
            Ok(()) => say(
                "emitter",
                format!("{} exited 0 but did not store {name}", cli.display()),
            ),
            Err(e) => say("emitter", format!("{e:#}")),
        }
        if via == Via::Cli {
            bail!("`switchyard emit {name}` did not store the event");
        }
        say("emitter", "falling back to this executable's --emit mode");
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    run(&exe, &["--emit", name, &json, "--store", url]).await?;
    if !is_stored(store, name).await? {
        bail!("the second process exited 0 but event {name} is not in the store");
    }
    Ok(())
}

/// The hidden `--emit NAME PAYLOAD` mode: what the second process runs when
/// it is this executable.
pub async fn emit_here(url: &str, name: &str, payload: &str) -> anyhow::Result<()> {
    let payload: Value = serde_json::from_str(payload)
        .with_context(|| format!("the payload of {name} is not valid JSON"))?;
    let store = switchyard::open(url).await?;
    let stored = Client::new(store).emit(name, payload).await?;
    if stored {
        println!("emitted {name}");
    } else {
        println!("{name} was already emitted; the first payload stays");
    }
    Ok(())
}

async fn is_stored(store: &DynStore, name: &str) -> anyhow::Result<bool> {
    Ok(store.get_event(name).await?.is_some())
}

/// Runs a second process, relaying its output to the timeline.
async fn run(program: &Path, args: &[&str]) -> anyhow::Result<()> {
    let shown = program
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    say(
        "emitter",
        format!("second process: {shown} {}", shell_words(args)),
    );
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A child that outlives the timeout is killed with its handle.
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id().unwrap_or_default();
    let out = tokio::time::timeout(CHILD_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| {
            format!(
                "{shown} (pid {pid}) did not finish within {} s",
                CHILD_TIMEOUT.as_secs()
            )
        })??;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        say("emitter", format!("  pid {pid} | {line}"));
    }
    if !out.status.success() {
        bail!("{shown} (pid {pid}) failed: {}", out.status);
    }
    say("emitter", format!("pid {pid} exited 0"));
    Ok(())
}

/// The arguments as one would type them in a shell (for the timeline).
pub fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/=@%+,".contains(c))
            {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
