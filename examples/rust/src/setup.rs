//! Store selection and the exit status shared by every scenario.

use std::process::ExitCode;

use switchyard::DynStore;
use tempfile::TempDir;

/// The `--store` option.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Store URL, e.g. `sqlite:orders.db` [default: a fresh SQLite file in a
    /// temporary directory, removed at exit]
    #[arg(long, env = "SWITCHYARD_STORE", value_name = "URL")]
    pub store: Option<String>,
}

/// An open store, and the temporary directory holding it (if any).
pub struct OpenedStore {
    /// The store.
    pub store: DynStore,
    /// Its URL, for second processes and for the user.
    pub url: String,
    // Held so the SQLite file outlives the scenario and is removed after it.
    _dir: Option<TempDir>,
}

impl OpenedStore {
    /// True if the store is the temporary default (gone when the program exits).
    pub fn is_temporary(&self) -> bool {
        self._dir.is_some()
    }
}

impl StoreArgs {
    /// Opens the chosen store, or a fresh SQLite file named `{name}.db`.
    pub async fn open(&self, name: &str) -> anyhow::Result<OpenedStore> {
        let (url, dir) = match self
            .store
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(url) => (url.to_string(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("switchyard-{name}-"))
                    .tempdir()?;
                let url = format!("sqlite:{}", dir.path().join(format!("{name}.db")).display());
                (url, Some(dir))
            }
        };
        let store = switchyard::open(&url)
            .await
            .map_err(|e| anyhow::anyhow!("opening store `{url}`: {e}"))?;
        Ok(OpenedStore {
            store,
            url,
            _dir: dir,
        })
    }

    /// True if the store cannot be shared with another process.
    pub fn is_private(url: &str) -> bool {
        let url = url.trim();
        url.starts_with("memory") || url == "sqlite::memory:"
    }
}

/// Turns a scenario's outcome into the process exit status, printing the
/// error chain on failure.
pub fn finish(scenario: &str, outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{scenario} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
