//! `Host`: the lifecycle every binding's worker shares — registration,
//! start and a bounded stop — so no binding keeps its own copy of the
//! "refuse registration once started", "start once", "stop the worker, then
//! close the inboxes" logic.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{HandlerSpec, HostPlan, Inbox, JobKind};
use crate::error::{Error, Result};
use crate::store::DynStore;
use crate::worker::RunningWorker;

/// The language of a foreign host's handlers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Language {
    /// Python (the `switchyard` wheel).
    Python,
    /// Ruby (the gem).
    Ruby,
    /// JavaScript or TypeScript on Node.js (the npm package).
    Node,
    /// C (the C ABI library).
    C,
}

impl Language {
    /// Its id in host listings and the `lang` label of metrics: `python`,
    /// `ruby`, `node`, `c` (Rust hosts are `rust`).
    pub fn id(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Ruby => "ruby",
            Self::Node => "node",
            Self::C => "c",
        }
    }

    /// Its name in error messages: `Python`, `Ruby`, `JavaScript`, `C`.
    pub fn display(self) -> &'static str {
        match self {
            Self::Python => "Python",
            Self::Ruby => "Ruby",
            Self::Node => "JavaScript",
            Self::C => "C",
        }
    }
}

/// A foreign-language host: its plan, the inboxes its handlers are served
/// through, and the running worker once started.
pub struct Host {
    lang: Language,
    plan: Mutex<HostPlan>,
    inboxes: Mutex<Vec<Arc<Inbox>>>,
    running: Mutex<Option<Arc<RunningWorker>>>,
}

impl Host {
    /// A host of `lang` handlers with `plan`'s settings.
    pub fn new(lang: Language, plan: HostPlan) -> Self {
        Self {
            lang,
            plan: Mutex::new(plan),
            inboxes: Mutex::new(Vec::new()),
            running: Mutex::new(None),
        }
    }

    /// Registers handler `name` of kind `kind`, served through `inbox`, with
    /// the options of `spec` (checked by [`HandlerSpec::build`]; `field`
    /// spells an option's name the way the binding's users write it).
    /// Returns the handler's id (see [`HostPlan::register`]). Refused once
    /// the host has started, and for a name registered before.
    pub fn register(
        &self,
        name: String,
        kind: JobKind,
        spec: &HandlerSpec,
        inbox: &Arc<Inbox>,
        field: impl Fn(&'static str) -> String,
    ) -> std::result::Result<usize, String> {
        if self.running.lock().is_some() {
            return Err(format!(
                "handler `{name}`: register handlers before the worker starts"
            ));
        }
        let mut plan = self.plan.lock();
        let opts = spec.build(&name, kind, plan.concurrency, field)?;
        let id = plan.register(name, kind, opts, inbox.clone())?;
        let mut inboxes = self.inboxes.lock();
        if !inboxes.iter().any(|i| Arc::ptr_eq(i, inbox)) {
            inboxes.push(inbox.clone());
        }
        Ok(id)
    }

    /// Starts the host on `store`; returns its host id. A second start is
    /// [`Error::Conflict`].
    pub async fn start(&self, store: DynStore) -> Result<String> {
        if self.running.lock().is_some() {
            return Err(Error::Conflict("the worker is already running".into()));
        }
        let worker = self.plan.lock().build(store, self.lang)?;
        let running = Arc::new(worker.start().await?);
        let id = running.host_id().to_string();
        let lost_race = {
            let mut slot = self.running.lock();
            let taken = slot.is_some();
            if !taken {
                *slot = Some(running.clone());
            }
            taken
        };
        if lost_race {
            // Started twice at once: keep the first, stop this one.
            running.stop().await;
            return Err(Error::Conflict("the worker is already running".into()));
        }
        Ok(id)
    }

    /// The host id, once started.
    pub fn host_id(&self) -> Option<String> {
        self.running
            .lock()
            .as_ref()
            .map(|r| r.host_id().to_string())
    }

    /// Steps run at once by the host (its plan's concurrency).
    pub fn concurrency(&self) -> usize {
        self.plan.lock().concurrency
    }

    /// How long running steps may finish during a graceful shutdown.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        self.plan.lock().shutdown_grace
    }

    /// Where the health/metrics endpoint listens, once started with one.
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.lock().as_ref().and_then(|r| r.health_addr())
    }

    /// Steps running in this host now (0 before a start).
    pub fn inflight(&self) -> usize {
        self.running.lock().as_ref().map_or(0, |r| r.inflight())
    }

    /// Waits until every outcome handed to the host so far is recorded in
    /// the store, or the host has stopped (see [`RunningWorker::flush`]);
    /// returns at once before a start.
    pub async fn flush(&self) {
        let running = self.running.lock().clone();
        if let Some(r) = running {
            r.flush().await;
        }
    }

    /// True between a start and the end of a stop.
    pub fn is_running(&self) -> bool {
        self.running.lock().is_some() && !self.inboxes.lock().iter().all(|i| i.is_closed())
    }

    /// Begins a graceful shutdown and returns at once.
    pub fn shutdown(&self) {
        if let Some(r) = self.running.lock().as_ref() {
            r.shutdown();
        }
    }

    /// Stops the host: no more claims, running steps get the shutdown
    /// grace, the rest are handed back (bounded: see
    /// [`RunningWorker::stop`]); then every inbox is closed, so the
    /// binding's serving threads or loop see `Closed` once drained. The
    /// binding's threads must keep serving jobs while this runs. Safe to
    /// call twice, and before a start (it only closes the inboxes).
    pub async fn stop(&self) {
        let running = self.running.lock().clone();
        if let Some(r) = running {
            r.stop().await;
        }
        for inbox in self.inboxes.lock().iter() {
            inbox.close();
        }
    }
}
