//! Switchyard core: the durable model, the [`Store`] contract, handler
//! capabilities, the dispatcher ([`Worker`]), the durable context ([`Context`])
//! and the [`Client`].
//!
//! See `DESIGN.md` in the repository for the vocabulary.
#![warn(missing_docs)]

pub mod clock;
pub mod config;
pub mod error;
pub mod ids;
pub mod keys;
pub mod model;
pub mod store;

pub use clock::{Clock, FakeClock, SystemClock};
pub use config::{redact_url, Config, Secret};
pub use error::{Error, Result};
pub use model::*;
pub use store::{DynStore, Signals, Store};
pub mod bridge;
pub mod client;
pub mod context;
pub mod handler;
pub mod outcome;
pub mod validate;
pub mod worker;

pub use client::Client;
pub use context::{ChildSpec, Context, SpawnOptions};
pub use handler::{
    APICapable, ApiError, BatchItem, BatchableCapable, Capability, Decision, DecisionCapable,
    Handler, HandlerOptions, RateLimit, ResultExt, RetryPolicy, StepError, StepResult,
};
pub use worker::{
    wait_for_signal, RunningWorker, ShutdownSignals, Worker, WorkerBuilder, WorkerOptions,
    DEFAULT_SHUTDOWN_FLUSH,
};
