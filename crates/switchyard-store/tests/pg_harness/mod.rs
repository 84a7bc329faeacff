//! Throwaway PostgreSQL servers for tests, a thin wrapper over
//! [`switchyard_store::pg_server`] (which see for how servers are found,
//! started and tied to this process).
//!
//! [`database`] makes a fresh database per call on the one server of this
//! test binary ([`PgServer::shared`], stopped at exit); [`Server::start`]
//! makes a private server (for tests that restart it), stopped on drop.
//! If PostgreSQL is not installed the tests **fail** with a message saying
//! so (install `postgresql` or set `SWITCHYARD_PG_BIN`).
#![allow(dead_code)]

use switchyard_store::pg_server::PgServer;

/// A running server with its own data directory.
pub struct Server {
    /// Port on 127.0.0.1.
    pub port: u16,
    inner: PgServer,
}

/// A fresh, empty database on the server shared by the tests of this
/// binary ([`PgServer::shared`]); returns its URL. Panics with what is
/// missing if PostgreSQL is not installed or does not start.
pub async fn database() -> String {
    PgServer::shared()
        .unwrap_or_else(|e| panic!("{e}"))
        .fresh_database()
        .await
        .expect("create a test database")
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
