//! Switchyard: a durable worker host.
//!
//! A Rust core owns dispatch, batching, retries, leases and durable workflow
//! state; handlers register under a name with one capability (plain,
//! batchable, decision, API) and run inside the same process. Tasks live in
//! an embedded SQLite file by default (`sqlite:switchyard.db`).
//!
//! ```no_run
//! use switchyard::{open, Client, HandlerOptions, Worker};
//! use serde_json::json;
//!
//! # async fn demo() -> switchyard::Result<()> {
//! let store = open("sqlite:switchyard.db").await?;
//! let worker = Worker::builder(store.clone())
//!     .step("greet", HandlerOptions::default(), |input, ctx| async move {
//!         let name = ctx.checkpoint("lookup", || async { Ok(input["name"].clone()) }).await?;
//!         Ok(json!({ "greeting": format!("hello {name}") }))
//!     })
//!     .build()?
//!     .start()
//!     .await?;
//! let client = Client::new(store);
//! let id = client.spawn("greet", json!({"name": "ada"})).await?;
//! println!("{}", client.result(id, std::time::Duration::from_secs(5)).await?);
//! worker.stop().await;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub use switchyard_core::*;
pub use switchyard_store::{open, open_with, StoreOptions};

/// The default store URL: an SQLite file in the working directory.
pub const DEFAULT_STORE: &str = "sqlite:switchyard.db";

/// The store URL from `SWITCHYARD_STORE`, or [`DEFAULT_STORE`].
pub fn store_url_from_env() -> String {
    std::env::var("SWITCHYARD_STORE")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_STORE.into())
}

/// A worker on the configuration's store, with its `[host]` settings
/// (concurrency, lease, heartbeat, shutdown grace): register handlers on
/// it, then build and start it.
///
/// ```no_run
/// # async fn demo() -> switchyard::Result<()> {
/// let config = switchyard::Config::load(None)?; // --config, SWITCHYARD_CONFIG, SWITCHYARD_*
/// let worker = switchyard::worker_from_config(&config)
///     .await?
///     .step("greet", switchyard::HandlerOptions::default(), |input, _ctx| async move { Ok(input) })
///     .build()?
///     .start()
///     .await?;
/// # worker.stop().await; Ok(()) }
/// ```
pub async fn worker_from_config(config: &Config) -> Result<WorkerBuilder> {
    let store = open(&config.store.open_url()?).await?;
    Ok(Worker::builder(store).host_config(&config.host))
}
