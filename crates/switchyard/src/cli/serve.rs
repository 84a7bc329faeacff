//! `switchyard serve`: the REST API (`switchyard_serve`) over the store.

use std::net::SocketAddr;

use super::commands::{open_store, CliError, CmdResult, Outcome};
use crate::ServeArgs;

/// Checks the settings before opening the store, so a refused address costs
/// nothing; then serves until Ctrl-C or SIGTERM.
pub async fn serve(url: &str, a: ServeArgs) -> CmdResult {
    let listen: SocketAddr = a.listen.parse().map_err(|_| {
        CliError::usage(format!(
            "--listen: `{}` is not an address like 127.0.0.1:8080",
            a.listen
        ))
    })?;
    let grpc_listen = match &a.grpc_listen {
        None => None,
        Some(g) => Some(g.parse::<SocketAddr>().map_err(|_| {
            CliError::usage(format!(
                "--grpc-listen: `{g}` is not an address like 127.0.0.1:50051"
            ))
        })?),
    };
    let settings = switchyard_serve::ServeSettings {
        grpc_listen,
        insecure: a.insecure,
        // Tokens come from the configuration file, never from the command
        // line; until it is wired in, `serve` runs without tokens.
        ..switchyard_serve::ServeSettings::new(listen)
    };
    settings
        .check()
        .map_err(|e| CliError::usage(e.to_string()))?;
    let store = open_store(url).await?;
    let server = switchyard_serve::Server::bind(store, settings)
        .await
        .map_err(|e| CliError::failure(e.to_string()))?;
    let addr = server
        .local_addr()
        .map_err(|e| CliError::failure(e.to_string()))?;
    eprintln!("switchyard serve: listening on http://{addr}");
    if let Some(g) = server
        .grpc_addr()
        .map_err(|e| CliError::failure(e.to_string()))?
    {
        eprintln!("switchyard serve: gRPC health on {g}");
    }
    server
        .run(switchyard::wait_for_signal())
        .await
        .map_err(|e| CliError::failure(e.to_string()))?;
    Ok(Outcome::Success)
}
