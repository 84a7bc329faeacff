//! `switchyard dev-postgres`: a throwaway PostgreSQL server for trying the
//! PostgreSQL store and for the language test suites.

use switchyard_store::pg_server::PgServer;
use tokio::io::AsyncReadExt;

use super::commands::{CliError, Outcome};

/// Starts a throwaway server (see [`PgServer`]: `initdb` in a temporary
/// directory, 127.0.0.1 on a free port, `fsync=off`) with a fresh database
/// `db`; returns the server (stopped and removed when dropped) and the
/// database's URL.
pub async fn throwaway_postgres(db: &str) -> Result<(PgServer, String), CliError> {
    let server = tokio::task::spawn_blocking(PgServer::start)
        .await
        .map_err(|e| CliError::failure(format!("starting PostgreSQL: {e}")))?
        .map_err(|e| {
            CliError::failure(format!("cannot start a throwaway PostgreSQL server: {e}"))
        })?;
    let url = server
        .create_database(db)
        .await
        .map_err(|e| CliError::failure(format!("creating the database `{db}`: {e}")))?;
    Ok((server, url))
}

/// Prints the URL of a fresh database on its own line, then serves until
/// stdin reaches its end (the parent closed it or died) or SIGINT/SIGTERM
/// arrives; then stops the server and removes its directory.
pub async fn dev_postgres(json: bool) -> Result<Outcome, CliError> {
    let (server, url) = throwaway_postgres("switchyard").await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "url": url, "port": server.port() })
        );
    } else {
        println!("{url}");
    }
    eprintln!(
        "PostgreSQL on 127.0.0.1:{} (fsync off, removed on exit); close stdin or press Ctrl-C to stop",
        server.port()
    );
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::failure(format!("cannot watch for SIGTERM: {e}")))?;
    tokio::select! {
        _ = stdin_closed => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .map_err(|e| CliError::failure(format!("stopping PostgreSQL: {e}")))?;
    Ok(Outcome::Success)
}
