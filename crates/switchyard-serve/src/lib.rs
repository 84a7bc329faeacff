//! `switchyard serve`: a JSON REST API over any store, versioned under
//! `/api/v1` and described by an OpenAPI 3.1 document generated from this
//! code ([`openapi`]) and served at `/api/v1/openapi.json`.
//!
//! * Auth ([`auth`]): bearer tokens with a `read` or `write` scope (write
//!   implies read); no valid token is 401, a read token on a mutation 403.
//!   Tokens are compared in constant time and never logged (their name is).
//!   Without tokens the server refuses a non-loopback address unless
//!   [`ServeSettings::insecure`].
//! * Errors ([`error`]): `{"error": {"code", "message"}}`, 4xx for the
//!   caller's mistakes (bad JSON, unknown ids, bad filters, oversize bodies),
//!   the message naming what was wrong. Each mutation is one store write or
//!   validated whole first, so nothing is half-applied.
//! * Routes ([`api`]): tasks (list with filters and a keyset cursor, detail,
//!   spawn, spawn many, cancel, retry, bulk retry, result long-poll),
//!   events (emit, get, list by prefix, await long-poll), hosts, handlers,
//!   cleanup, stats, failure groups; `/metrics` ([`metrics`]): store-wide
//!   gauges.
//! * Dashboard ([`dashboard`]): the web dashboard at `/`, embedded assets
//!   served without a token; its data comes from `/api/v1` with one.
//! * gRPC health ([`health`]): the standard `grpc.health.v1` service on
//!   [`ServeSettings::grpc_listen`], reporting whether the store answers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use switchyard_core::DynStore;
use tokio::net::TcpListener;

pub mod api;
pub mod auth;
pub mod dashboard;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod query;

/// What a token may do (`Write` implies `Read`): the configuration's
/// scope, `[[serve.tokens]] scope = "read" | "write"`.
pub use switchyard_core::config::Scope;

/// A bearer token (mirrors `[[serve.tokens]]` of `switchyard.toml`).
#[derive(Clone)]
pub struct ApiToken {
    /// Shown in logs instead of the secret.
    pub name: String,
    /// The secret the client sends as `Authorization: Bearer SECRET`.
    pub secret: String,
    /// What it allows.
    pub scope: Scope,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("secret", &"***")
            .field("scope", &self.scope)
            .finish()
    }
}

/// The server's settings (mirrors `[serve]` of `switchyard.toml`).
#[derive(Clone, Debug)]
pub struct ServeSettings {
    /// Where the REST API listens (port 0: any free port).
    pub listen: SocketAddr,
    /// Where the gRPC health service (`grpc.health.v1`) listens; `None`: off.
    pub grpc_listen: Option<SocketAddr>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Allow a non-loopback `listen` without tokens.
    pub insecure: bool,
    /// Bearer tokens; empty means no authentication (loopback only unless
    /// `insecure`).
    pub tokens: Vec<ApiToken>,
}

/// The default request body limit: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

impl ServeSettings {
    /// The settings of `[serve]` in `switchyard.toml` ([`ServeConfig`]),
    /// listening on `listen` (the configuration's `serve.listen` unless the
    /// command line says otherwise).
    ///
    /// [`ServeConfig`]: switchyard_core::config::ServeConfig
    pub fn from_config(listen: SocketAddr, c: &switchyard_core::config::ServeConfig) -> Self {
        Self {
            listen,
            grpc_listen: c.grpc_listen,
            max_body_bytes: c.max_body_bytes,
            insecure: c.insecure,
            tokens: c
                .tokens
                .iter()
                .map(|t| ApiToken {
                    name: t.name.clone(),
                    secret: t.secret.expose().to_string(),
                    scope: t.scope,
                })
                .collect(),
        }
    }

    /// Settings listening on `listen`, no tokens, default body limit.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            grpc_listen: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            insecure: false,
            tokens: Vec::new(),
        }
    }

    /// Checks the settings: a non-loopback address needs tokens (or
    /// `insecure`), token names and secrets must be non-empty and distinct.
    pub fn check(&self) -> Result<(), ServeError> {
        if self.tokens.is_empty() && !self.insecure && !self.listen.ip().is_loopback() {
            return Err(ServeError::Config(format!(
                "refusing to listen on {} without API tokens: anyone who can reach it could \
                 spawn and cancel tasks. Configure [[serve.tokens]], listen on a loopback \
                 address (127.0.0.1), or pass --insecure",
                self.listen
            )));
        }
        if self.max_body_bytes == 0 {
            return Err(ServeError::Config(
                "max_body_bytes must be at least 1".into(),
            ));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(ServeError::Config(format!("token #{i}: `name` is empty")));
            }
            if t.secret.len() < 16 {
                return Err(ServeError::Config(format!(
                    "token `{}`: the secret is shorter than 16 characters",
                    t.name
                )));
            }
            if self.tokens[..i].iter().any(|o| o.secret == t.secret) {
                return Err(ServeError::Config(format!(
                    "token `{}`: the same secret is configured twice",
                    t.name
                )));
            }
        }
        Ok(())
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The settings are not acceptable; the message says which.
    #[error("{0}")]
    Config(String),
    /// The address could not be bound or the server failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Shared by every request.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: DynStore,
    /// Client over the store (validation of everything written).
    pub client: switchyard_core::Client,
    /// Tokens (empty: no authentication).
    pub tokens: Arc<Vec<ApiToken>>,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Cancelled when the server stops: long-polls answer at once.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// The complete router: `/api/v1/...` behind authentication, the dashboard
/// (`/`, `/assets/...`) without, with the body limit applied.
/// `stopping` ends the long-polls in flight when cancelled.
pub fn router(
    store: DynStore,
    settings: &ServeSettings,
    stopping: tokio_util::sync::CancellationToken,
) -> Router {
    let state = AppState {
        client: switchyard_core::Client::new(store.clone()),
        store,
        tokens: Arc::new(settings.tokens.clone()),
        max_body_bytes: settings.max_body_bytes,
        stopping,
    };
    // The dashboard's assets hold no data: served without a token (the
    // page sends one with each API call).
    let api = api::routes()
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    dashboard::routes()
        .merge(api)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .with_state(state)
}

/// A bound server, not yet serving: [`Server::local_addr`] tells the port
/// when `listen` asked for port 0.
pub struct Server {
    listener: TcpListener,
    grpc: Option<TcpListener>,
    store: DynStore,
    app: Router,
    stopping: tokio_util::sync::CancellationToken,
}

impl Server {
    /// Checks the settings and binds the address.
    pub async fn bind(store: DynStore, settings: ServeSettings) -> Result<Self, ServeError> {
        settings.check()?;
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
            ServeError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", settings.listen),
            ))
        })?;
        let grpc = match settings.grpc_listen {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                ServeError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (--grpc-listen): {e}"),
                ))
            })?),
        };
        let stopping = tokio_util::sync::CancellationToken::new();
        let app = router(store.clone(), &settings, stopping.clone());
        Ok(Self {
            listener,
            grpc,
            store,
            app,
            stopping,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        Ok(self.listener.local_addr()?)
    }

    /// The bound address of the gRPC health service, if it is on.
    pub fn grpc_addr(&self) -> Result<Option<SocketAddr>, ServeError> {
        Ok(match &self.grpc {
            None => None,
            Some(l) => Some(l.local_addr()?),
        })
    }

    /// Serves until `shutdown` resolves, then finishes the requests in
    /// flight; long-polls answer at once with what they have.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Long-polls in flight answer now; then both servers stop.
            stopping.cancel();
        });
        let grpc = self.grpc.map(|listener| {
            tokio::spawn(health::serve(
                self.store.clone(),
                listener,
                self.stopping.clone().cancelled_owned(),
            ))
        });
        let http = axum::serve(self.listener, self.app)
            .with_graceful_shutdown(self.stopping.clone().cancelled_owned())
            .await;
        // The shutdown future may be dropped unfinished (an error): stop
        // the gRPC service too.
        self.stopping.cancel();
        if let Some(g) = grpc {
            match g.await {
                Ok(r) => r?,
                Err(e) => {
                    return Err(ServeError::Io(std::io::Error::other(format!(
                        "the gRPC health service failed: {e}"
                    ))))
                }
            }
        }
        http?;
        Ok(())
    }
}

/// Binds `settings.listen` and serves the API over `store` until
/// `shutdown` resolves.
pub async fn serve(
    store: DynStore,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let server = Server::bind(store, settings).await?;
    tracing::info!(
        "switchyard serve: listening on http://{}",
        server.local_addr()?
    );
    server.run(shutdown).await
}
