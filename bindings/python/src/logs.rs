//! Core log records (`tracing`) forwarded to Python's `logging` module.
//!
//! The tracing layer never touches Python: it queues records, and Python
//! threads that wake regularly anyway drain the queue with
//! `_native.take_logs()`. So a core thread never waits for the GIL (which
//! could deadlock against a Python thread waiting for the core).

use std::collections::VecDeque;
use std::fmt::{Debug, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

/// Records waiting for Python: (logging level, target, message).
type Record = (u8, String, String);

static QUEUE: Mutex<VecDeque<Record>> = Mutex::new(VecDeque::new());
static PENDING: AtomicBool = AtomicBool::new(false);
/// Oldest records are dropped beyond this (nobody is draining).
const MAX_QUEUED: usize = 10_000;

struct Forward;

fn queue() -> MutexGuard<'static, VecDeque<Record>> {
    // Every critical section is a push or a drain: a panic cannot leave the
    // queue inconsistent, so poisoning is ignored.
    QUEUE.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Message {
    text: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

fn python_level(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

impl<S: Subscriber> Layer<S> for Forward {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut m = Message::default();
        event.record(&mut m);
        let meta = event.metadata();
        let record = (
            python_level(meta.level()),
            meta.target().to_string(),
            format!("{}{}", m.text, m.fields),
        );
        let mut q = queue();
        if q.len() >= MAX_QUEUED {
            q.pop_front();
        }
        q.push_back(record);
        PENDING.store(true, Ordering::Release);
    }
}

/// Replaces the forwarding layer's filter (see [`apply`]); set once the
/// layer is the process's subscriber.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Installs the forwarding layer as the process's tracing subscriber (INFO
/// and above), unless another one is installed already.
pub fn install() {
    let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
    if tracing_subscriber::registry()
        .with(Forward.with_filter(filter))
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
}

/// Applies the configured `log.level` (`Worker.from_config`) to the records
/// forwarded from now on (the process has one subscriber: the last
/// configuration loaded wins). Python's `logging` levels filter them again.
/// Does nothing if another subscriber was installed before this module's.
pub fn apply(log: &switchyard_core::config::LogConfig) {
    let Some(reload) = RELOAD.get() else {
        return;
    };
    if let Ok(f) = EnvFilter::try_new(log.filter()) {
        let _ = reload(f);
    }
}

/// Takes the queued core log records: `(level, target, message)` tuples,
/// with `level` a `logging` level number.
#[pyfunction]
pub fn take_logs() -> Vec<Record> {
    if !PENDING.swap(false, Ordering::AcqRel) {
        return Vec::new();
    }
    queue().drain(..).collect()
}
