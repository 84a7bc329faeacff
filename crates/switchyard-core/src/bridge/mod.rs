//! The bridge to foreign language runtimes (DESIGN.md §4): the core pushes,
//! foreign runtimes pull without holding their interpreter lock.
//!
//! Each language runtime owns one [`Inbox`]. Handlers registered from that
//! language are [`InboxHandler`]s: when the dispatcher runs one, it pushes a
//! [`Job`] into the inbox and awaits its reply, so the core's timers
//! (timeouts, leases, cancellation) keep running no matter what the foreign
//! side does. Foreign threads take jobs in batches — one interpreter-lock
//! acquisition (or one JS callback) per batch — and answer each job with
//! [`Job::complete`], which never blocks.
//!
//! Waiting:
//! * threads that run in parallel (C) call [`Inbox::recv_batch`], which
//!   blocks on a condition variable for at most the given time slice, so the
//!   caller can check for signals between slices; one wake-up is in flight at
//!   a time, and a woken thread that leaves jobs queued wakes the next, so a
//!   burst of jobs wakes threads as fast as they start work rather than one
//!   futex call and context switch per job;
//! * threads that take turns under an interpreter lock (Python's GIL, Ruby's
//!   GVL) read a [`Inbox::serial`] inbox through one [`Consumer`] each: a
//!   consumer that is running handlers keeps taking the queued jobs itself,
//!   and an idle thread is woken only when none is, or when the queue has
//!   stalled for [`STALL`] because every busy thread sits in a blocking
//!   handler. Waking a thread per job made the threads fight over the lock:
//!   measured with 32 Python threads, more CPU went to handing the GIL
//!   around than to running handlers;
//! * [`Inbox::interrupt`] wakes every waiter at once (Ruby's unblock
//!   function);
//! * event loops (Node) await [`Inbox::recv_batch_async`].

mod handler;
mod host;
mod inbox;
mod job;
mod options;
mod plan;
mod protocol;
mod runtime;

pub use handler::InboxHandler;
pub use host::{Host, Language};
pub use inbox::{CancelNotices, Closed, Consumer, Inbox, STALL};
pub use job::{Job, JobItem, Reply};
pub use options::{camel_case, listen_address, seconds, HandlerSpec, JobKind};
pub use plan::HostPlan;
pub use protocol::{
    child_specs, fan_out, new_task, new_tasks, raise, ErrorClass, Raised, MAX_FAN_OUT,
};
pub use runtime::{runtime, runtime_owner, ForkedChild};
