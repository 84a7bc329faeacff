//! What a binding collects before its host starts.

use std::sync::Arc;
use std::time::Duration;

use super::{Inbox, InboxHandler, JobKind};
use crate::handler::*;

/// What a language binding collects before its host starts: the host's
/// settings and the handlers registered so far, each served through an
/// inbox. One place for the checks and the worker set-up that the Python,
/// Ruby and Node glue each did on their own.
pub struct HostPlan {
    /// Steps run at once by the host (and the default per handler).
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// How long running steps may finish during a graceful shutdown.
    pub shutdown_grace: Duration,
    /// Largest accepted input/result, if limited.
    pub max_payload: Option<usize>,
    /// Heartbeat period (`None`: derived from the lease, see
    /// [`crate::WorkerBuilder::lease`]).
    pub heartbeat: Option<Duration>,
    /// The host's name in host listings, if any.
    pub name: Option<String>,
    /// Where the host serves `/healthz`, `/readyz` and `/metrics` (off
    /// when None; see [`crate::WorkerOptions::health_listen`]).
    pub health_listen: Option<std::net::SocketAddr>,
    regs: Vec<(String, JobKind, HandlerOptions, Arc<Inbox>)>,
}

impl HostPlan {
    /// A plan with no handlers yet.
    pub fn new(
        concurrency: usize,
        lease: Duration,
        shutdown_grace: Duration,
        max_payload: Option<usize>,
    ) -> Self {
        Self {
            concurrency,
            lease,
            shutdown_grace,
            max_payload,
            heartbeat: None,
            name: None,
            health_listen: None,
            regs: Vec::new(),
        }
    }

    /// A plan with the host settings of a configuration's `[host]` section
    /// ([`crate::config::HostConfig`]: concurrency, lease, heartbeat,
    /// shutdown grace, name, health_listen), the one mapping every
    /// binding's `Worker.from_config` uses.
    pub fn from_config(host: &crate::config::HostConfig) -> Self {
        let mut plan = Self::new(host.concurrency, host.lease, host.shutdown_grace, None);
        plan.heartbeat = host.heartbeat;
        plan.name = host.name.clone();
        plan.health_listen = host.health_listen;
        plan
    }

    /// Adds handler `name`, served through `inbox`, and returns its id:
    /// every [`super::Job`] for it carries that id ([`super::Job::handler_id`]),
    /// so a binding finds its function by index, never by name. Ids are
    /// 0, 1, 2… in registration order. A name registered before is refused
    /// at once (rather than when the host starts).
    pub fn register(
        &mut self,
        name: String,
        kind: JobKind,
        opts: HandlerOptions,
        inbox: Arc<Inbox>,
    ) -> Result<usize, String> {
        if self.regs.iter().any(|(n, ..)| *n == name) {
            return Err(format!("handler `{name}` is registered twice"));
        }
        self.regs.push((name, kind, opts, inbox));
        Ok(self.regs.len() - 1)
    }

    /// How many handlers are registered.
    pub fn len(&self) -> usize {
        self.regs.len()
    }

    /// True before the first registration.
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// The host on `store` with every registered handler, written in `lang`
    /// (its id in host listings and metrics, its name in error messages).
    pub fn build(
        &self,
        store: crate::DynStore,
        lang: super::Language,
    ) -> crate::Result<crate::Worker> {
        let mut b = crate::Worker::builder(store)
            .concurrency(self.concurrency)
            .lease(self.lease)
            .shutdown_grace(self.shutdown_grace)
            .language(lang.id());
        if let Some(h) = self.heartbeat {
            b = b.heartbeat(h);
        }
        if let Some(n) = &self.name {
            b = b.name(n.clone());
        }
        if let Some(a) = self.health_listen {
            b = b.health_listen(a);
        }
        if let Some(m) = self.max_payload {
            b = b.max_payload_bytes(m);
        }
        for (id, (name, kind, opts, inbox)) in self.regs.iter().enumerate() {
            b = b.handler(
                name.clone(),
                InboxHandler::capability(inbox.clone(), id, name, *kind, lang.display()),
                opts.clone(),
            );
        }
        b.build()
    }
}
