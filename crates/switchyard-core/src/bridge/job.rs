//! A unit of work for a foreign handler and its answer.

use serde_json::Value;
use tokio::sync::oneshot;

use super::JobKind;
use crate::context::Context;
use crate::handler::*;

/// One step inside a job.
pub struct JobItem {
    /// Its input.
    pub input: Value,
    /// Its durable context.
    pub ctx: Context,
}

/// A foreign handler's answer for one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A value (plain, API and batch handlers).
    Value(Value),
    /// A decision (decision handlers).
    Decision(Decision),
    /// A step error (any handler).
    Error(StepError),
    /// An HTTP-shaped failure (API handlers).
    Api(ApiError),
    /// An exception of a control-flow class ended the handler: the core
    /// passes on the error the context kept (see
    /// [`super::protocol::raise`]). Built by [`Reply::error`].
    Raised {
        /// Its class.
        class: super::ErrorClass,
        /// The exception's message.
        message: String,
        /// The language's traceback.
        trace: Option<String>,
    },
}

/// Work for a foreign handler: one step, or a micro-batch for batch handlers.
pub struct Job {
    /// Unique within the process.
    pub id: u64,
    /// The handler's id, as [`super::HostPlan::register`] returned it.
    pub handler_id: usize,
    /// The handler's name.
    pub handler: String,
    /// Its capability.
    pub kind: JobKind,
    /// The steps (one unless `kind` is [`JobKind::Batch`]).
    pub items: Vec<JobItem>,
    pub(super) reply: oneshot::Sender<Vec<Reply>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("handler", &self.handler)
            .field("items", &self.items.len())
            .finish()
    }
}

impl Job {
    /// Answers the job: one reply per item, in order. Never blocks; may be
    /// called from any thread. If the core has already given up on the step
    /// (timeout, cancellation, shutdown), the answer is dropped.
    pub fn complete(self, replies: Vec<Reply>) {
        let _ = self.reply.send(replies);
    }

    /// True if the core no longer waits for this job (timed out, cancelled,
    /// handed back at shutdown): such a job is never started. (A job whose
    /// runs were asked to stop but are still within their cancel grace is
    /// not abandoned yet: dropping it then would record a failure; the
    /// binding learns of it from the cancellation notice and
    /// `Context::is_cancelled`.)
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}
