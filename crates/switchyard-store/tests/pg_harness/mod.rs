//! Throwaway PostgreSQL servers for tests, a thin wrapper over
//! [`switchyard_store::pg_server`] (which see for how servers are found,
//! started and tied to this process).
//!
//! [`shared`] is one server per test binary (started on first use), and
//! [`database`] makes a fresh database on it per call; [`Server::start`]
//! makes a private server (for tests that restart it), stopped on drop.
//! On a normal exit an `atexit` hook stops the shared server and removes its
//! directory. If PostgreSQL is not installed the tests **fail** with a
//! message saying so (install `postgresql` or set `SWITCHYARD_PG_BIN`).
#![allow(dead_code)]

use std::sync::OnceLock;

use switchyard_store::pg_server::PgServer;

static SHARED: OnceLock<Result<Server, String>> = OnceLock::new();

/// A running server with its own data directory.
pub struct Server {
    /// Port on 127.0.0.1.
    pub port: u16,
    inner: PgServer,
}

/// The server shared by the tests of this binary. Panics with a clear
/// message if PostgreSQL is not installed or does not start.
pub fn shared() -> &'static Server {
    let result = SHARED.get_or_init(|| {
        let server = Server::start()?;
        // SAFETY: registering a plain extern "C" fn.
        unsafe {
            libc::atexit(stop_shared);
        }
        Ok(server)
    });
    match result {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

extern "C" fn stop_shared() {
    if let Some(Ok(server)) = SHARED.get() {
        server.inner.stop_and_remove();
    }
}

/// A fresh, empty database on the shared server; returns its URL.
pub async fn database() -> String {
    shared().database().await
}

impl Server {
    /// initdb + start. Errors say what is missing.
    pub fn start() -> Result<Server, String> {
        let inner = PgServer::start().map_err(|e| e.to_string())?;
        Ok(Server {
            port: inner.port(),
            inner,
        })
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        self.inner.url_of(name)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn database(&self) -> String {
        self.inner
            .fresh_database()
            .await
            .expect("create a test database")
    }

    /// Fast shutdown (SIGINT), waiting for it.
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Kills the server the way a crash would (immediate shutdown), then
    /// starts it again on the same port and data (crash recovery).
    pub fn restart(&self) {
        self.inner.restart().expect("restart postgres");
    }
}
