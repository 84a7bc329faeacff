//! Shared pieces of the Switchyard reference scenarios.
//!
//! Each binary in `src/bin` is one scenario and reads top to bottom; what
//! they have in common lives here so that the scenarios show the workflow,
//! not the plumbing:
//!
//! * [`timeline`]: the `[elapsed ms] step  what happened` lines every
//!   scenario prints as things happen.
//! * [`setup`]: the `--store URL` option (or `SWITCHYARD_STORE`), defaulting
//!   to a fresh SQLite file in a temporary directory, and the exit status.
//! * [`orders`]: the order-fulfilment workflow of `demo` and `order_events`.
//! * [`emitter`]: emits an event from a second process (`switchyard emit`).
//! * [`children`]: spawns a child task with a `response_event`.
#![warn(missing_docs)]

pub mod children;
pub mod emitter;
pub mod orders;
pub mod setup;
pub mod timeline;
