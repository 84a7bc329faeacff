//! Switchyard core: the durable model, the [`Store`] contract, handler
//! capabilities, the dispatcher ([`Worker`]), the durable context ([`Context`])
//! and the [`Client`].
//!
//! See `DESIGN.md` in the repository for the vocabulary.
#![warn(missing_docs)]

pub mod clock;
pub mod error;
pub mod model;
pub mod store;

pub use clock::{Clock, FakeClock, SystemClock};
pub use error::{Error, Result};
pub use model::*;
pub use store::{DynStore, Signals, Store};
