//! `switchyard serve`: the REST API (`switchyard_serve`) over the store.

use std::net::SocketAddr;

use super::commands::{open_store, CliError, CmdResult, Outcome};
use crate::ServeArgs;

/// Checks the settings before opening the store, so a refused address costs
/// nothing; then serves until Ctrl-C or SIGTERM.
pub async fn serve(url: &str, a: ServeArgs, config: &switchyard::config::ServeConfig) -> CmdResult {
    let listen: SocketAddr = match &a.listen {
        Some(l) => switchyard::bridge::listen_address("--listen", l).map_err(CliError::usage)?,
        None => config
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
    };
    let mut settings = switchyard_serve::ServeSettings::from_config(listen, config);
    if let Some(g) = &a.grpc_listen {
        settings.grpc_listen =
            Some(switchyard::bridge::listen_address("--grpc-listen", g).map_err(CliError::usage)?);
    }
    settings.insecure |= a.insecure;
    if !settings.tokens.is_empty() {
        let names: Vec<&str> = settings.tokens.iter().map(|t| t.name.as_str()).collect();
        eprintln!("switchyard serve: API tokens: {}", names.join(", "));
    }
    settings
        .check()
        .map_err(|e| CliError::usage(e.to_string()))?;
    let store = open_store(url, super::commands::Open::Create).await?;
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
