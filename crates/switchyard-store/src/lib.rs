//! Switchyard stores: [`memory::MemoryStore`] (tests, non-durable runs) and
//! [`sqlite::SqliteStore`] (the embedded default) and
//! [`postgres::PostgresStore`] (hosts on many machines). Every store passes the same contract suite (`contract`, behind the
//! feature of that name).
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use switchyard_core::{Clock, DynStore, Error, Result, Store, SystemClock};

#[cfg(feature = "contract")]
pub mod contract;
pub mod decision;
pub mod memory;
#[cfg(feature = "pg-server")]
pub mod pg_server;
pub mod postgres;
mod prepared;
pub mod sqlite;

/// Options shared by every store.
#[derive(Clone)]
pub struct StoreOptions {
    /// The clock (default: the system clock). Tests pass a [`switchyard_core::FakeClock`].
    pub clock: Arc<dyn Clock>,
    /// Run migrations on open (default true).
    pub migrate: bool,
    /// Create the SQLite database file if it does not exist (default true).
    /// When false, opening a missing file fails with [`Error::NotFound`]
    /// naming the path and nothing is created: the file is opened without
    /// SQLite's create flag, so no check races with a concurrent creation.
    /// Other stores ignore it.
    pub create: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            migrate: true,
            create: true,
        }
    }
}

/// Opens a store from a URL: `memory`, `sqlite:PATH` / `sqlite://PATH`
/// (`sqlite::memory:` for a private in-memory database; optional
/// `?synchronous=full|normal|extra`, default `full`, see [`sqlite`]), or
/// `postgres://...` / `postgresql://...` (optional `?wakeup=polling|event-driven|hybrid`
/// and `poll_ms=N`, see [`postgres`]).
///
/// Opening the same SQLite file twice in one process returns the same store,
/// so hosts and clients in the process share one writer and its wake-ups.
pub async fn open(url: &str) -> Result<DynStore> {
    open_with(url, StoreOptions::default()).await
}

/// [`open`], shared within the process by URL: while a store opened this
/// way is alive, opening the same URL again returns it. The language
/// bindings open through this, so a client and a worker on one URL share one
/// store: `memory` then means one store (not one per object), and
/// in-process completions wake waiting clients at once instead of being
/// found by polling.
///
/// Shared within one process only: a forked child inherits the parent's
/// entries, whose stores it cannot use, and opens its own.
pub async fn open_shared(url: &str) -> Result<DynStore> {
    static STORES: Mutex<BTreeMap<(u32, String), Weak<dyn Store>>> = Mutex::new(BTreeMap::new());
    let url = url.trim().to_string();
    let key = (std::process::id(), url.clone());
    if let Some(s) = STORES.lock().get(&key).and_then(Weak::upgrade) {
        return Ok(s);
    }
    let store = open(&url).await?;
    let mut stores = STORES.lock();
    stores.retain(|_, w| w.strong_count() > 0);
    // Another caller may have opened the same URL meanwhile: keep the first.
    if let Some(s) = stores.get(&key).and_then(Weak::upgrade) {
        return Ok(s);
    }
    stores.insert(key, Arc::downgrade(&store));
    Ok(store)
}

/// Checks a store URL without opening the store: the scheme, the SQLite
/// path (not empty; its directory exists) and parameters, the PostgreSQL
/// connection string and parameters. What [`open`] would refuse before
/// touching a file or the network is refused here with the same message, so
/// a worker can fail when it is made rather than when it starts. (Whether a
/// server answers, or a file can be written, is known only at open.)
pub fn check_url(url: &str) -> Result<()> {
    let url = url.trim();
    if url == "memory" || url == "memory:" {
        return Ok(());
    }
    if let Some(spec) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        return sqlite::check_spec(url, spec);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return postgres::check_url(url);
    }
    Err(unrecognised(url))
}

fn unrecognised(url: &str) -> Error {
    Error::Config(format!(
        "unrecognised store URL `{}` (expected `memory`, `sqlite:PATH` or `postgres://...`)",
        switchyard_core::redact_url(url)
    ))
}

/// [`open`] with options.
pub async fn open_with(url: &str, options: StoreOptions) -> Result<DynStore> {
    let url = url.trim();
    if url == "memory" || url == "memory:" {
        return Ok(Arc::new(memory::MemoryStore::with_clock(options.clock)));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(Error::Config(format!(
                "store URL `{}` names no file (use sqlite:PATH)",
                switchyard_core::redact_url(url)
            )));
        }
        let store = sqlite::SqliteStore::open(path, options).await?;
        return Ok(store);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PostgresStore::open(url, options).await?;
        return Ok(store);
    }
    Err(unrecognised(url))
}

#[cfg(test)]
mod tests {
    /// A URL no store recognises is named in the error without its password.
    #[tokio::test]
    async fn open_errors_never_show_a_password() {
        for url in [
            "mysql://alice:s3cr3tpw@127.0.0.1:1/db",
            "redis://h?password=s3cr3tpw",
        ] {
            let e = match crate::open(url).await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{url} opened"),
            };
            assert!(e.contains("unrecognised store URL"), "{e}");
            assert!(!e.contains("s3cr3tpw"), "{e}");
            assert!(e.contains("***"), "{e}");
        }
    }

    /// `create: false` opens an existing SQLite file and never creates a
    /// missing one: the error names the path.
    #[tokio::test]
    async fn sqlite_without_create_never_creates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.db");
        let url = format!("sqlite:{}", path.display());
        let options = || crate::StoreOptions {
            create: false,
            ..crate::StoreOptions::default()
        };
        match crate::open_with(&url, options()).await {
            Err(switchyard_core::Error::NotFound(m)) => {
                assert!(
                    m.contains("missing.db") && m.contains("does not exist"),
                    "{m}"
                )
            }
            Err(e) => panic!("expected NotFound, got {e}"),
            Ok(_) => panic!("opened a missing file"),
        }
        assert!(!path.exists());
        drop(crate::open(&url).await.unwrap());
        assert!(path.exists());
        crate::open_with(&url, options()).await.unwrap();
    }
}
