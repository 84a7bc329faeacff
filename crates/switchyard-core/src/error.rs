//! The public error type.

use crate::model::{ErrorInfo, StepId, TaskId};

/// Errors returned by the core, the stores and the clients.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum Error {
    /// The caller passed something malformed; the message names the field.
    /// Fix the input and call again; nothing was stored.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No task, step or event with that id or name exists. Check the id.
    #[error("not found: {0}")]
    NotFound(String),
    /// The step's lease is no longer held by this host (expired and taken
    /// over, or the task was cancelled): the write was rejected. Stop working
    /// on the step; another attempt owns it now.
    #[error("lease lost for step {0}: the write was rejected")]
    LeaseLost(StepId),
    /// The step's task was cancelled: the write was rejected. Stop working
    /// on the step (handlers see their language's cancellation error).
    #[error("step {0} was cancelled: the write was rejected")]
    Cancelled(StepId),
    /// A payload exceeds the configured limit. Send less data (or raise
    /// `max_payload_bytes`); nothing was stored.
    #[error("payload too large: {what} is {size} bytes, the limit is {limit} bytes")]
    PayloadTooLarge {
        /// Which payload (e.g. `input`, `result`, `event payload`).
        what: String,
        /// Its size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The operation is not allowed in the current state (e.g. retrying a
    /// task that is still running). Inspect the task first.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A wait ran out of time. Wait longer or check the task.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The configuration (store URL, options) is invalid; the message says which.
    #[error("configuration error: {0}")]
    Config(String),
    /// The underlying database failed. Usually transient: retry; if it
    /// persists, check the database file or server.
    #[error("store error: {0}")]
    Store(String),
    /// The host or client is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// The task waited for failed: `Client::result` and every helper that
    /// waits for a task's outcome report it with what the store recorded
    /// (kind, message, traceback, the attempt it happened on).
    #[error("task {task} failed on attempt {}: {}: {}", error.attempt, error.kind, error.message)]
    TaskFailed {
        /// The task.
        task: TaskId,
        /// Its recorded error.
        error: Box<ErrorInfo>,
    },
    /// The task waited for was cancelled.
    #[error("task {task} was cancelled: {message}")]
    TaskCancelled {
        /// The task.
        task: TaskId,
        /// Why, as recorded (e.g. "cancelled by a client").
        message: String,
    },
}

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
