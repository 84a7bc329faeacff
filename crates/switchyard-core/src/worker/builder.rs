//! Building a host: `WorkerBuilder` (options and registrations) and `Worker`.

use super::*;

/// Builds a [`Worker`]: the store, host options and handler registrations.
pub struct WorkerBuilder {
    store: DynStore,
    opts: WorkerOptions,
    regs: Vec<(String, Capability, HandlerOptions)>,
}

impl WorkerBuilder {
    /// Host-wide concurrency.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.opts.concurrency = n.max(1);
        self
    }
    /// Lease length (heartbeat defaults to a third of it, at most 5 s).
    pub fn lease(mut self, d: Duration) -> Self {
        self.opts.lease = d;
        self.opts.heartbeat = (d / 3)
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(10));
        self
    }
    /// Heartbeat period.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.opts.heartbeat = d.max(Duration::from_millis(10));
        self
    }
    /// Graceful-shutdown deadline.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.opts.shutdown_grace = d;
        self
    }
    /// How long a stopping host keeps retrying to record its outcomes
    /// while the store fails ([`WorkerOptions::shutdown_flush`]).
    pub fn shutdown_flush(mut self, d: Duration) -> Self {
        self.opts.shutdown_flush = d;
        self
    }
    /// Most steps per claim per handler.
    pub fn claim_batch(mut self, n: usize) -> Self {
        self.opts.claim_batch = n.max(1);
        self
    }
    /// A name for the host, shown in host listings (`switchyard workers`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.opts.name = Some(name.into());
        self
    }
    /// Serves `/healthz`, `/readyz` and `/metrics` on `addr` (see
    /// [`WorkerOptions::health_listen`]).
    pub fn health_listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.opts.health_listen = Some(addr);
        self
    }
    /// The host's language in its metrics (`rust` unless a binding says).
    pub fn language(mut self, lang: &'static str) -> Self {
        self.opts.language = lang;
        self
    }
    /// Payload size limit.
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.opts.max_payload_bytes = n;
        self
    }
    /// The host settings of a configuration's `[host]` section
    /// ([`crate::config::HostConfig`]): concurrency, lease, heartbeat (when
    /// set; else derived from the lease), shutdown grace, name and
    /// health/metrics address.
    pub fn host_config(self, host: &crate::config::HostConfig) -> Self {
        let mut b = self
            .concurrency(host.concurrency)
            .lease(host.lease)
            .shutdown_grace(host.shutdown_grace);
        b.opts.name = host.name.clone();
        b.opts.health_listen = host.health_listen;
        match host.heartbeat {
            Some(h) => b.heartbeat(h),
            None => b,
        }
    }
    /// All options at once.
    pub fn options(mut self, o: WorkerOptions) -> Self {
        self.opts = o;
        self
    }

    /// Registers a handler with any capability.
    pub fn handler(
        mut self,
        name: impl Into<String>,
        cap: Capability,
        opts: HandlerOptions,
    ) -> Self {
        self.regs.push((name.into(), cap, opts));
        self
    }
    /// Registers a plain async closure `|input, ctx| async move { ... }`.
    pub fn step<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = StepResult> + Send + 'static,
    {
        self.handler(name, Capability::Plain(Arc::new(FnHandler(f))), opts)
    }
    /// Registers a batch closure `|items| async move { ... }`.
    pub fn batch<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Vec<BatchItem>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<StepResult>> + Send + 'static,
    {
        self.handler(name, Capability::Batch(Arc::new(FnBatch(f))), opts)
    }
    /// Registers a decision closure.
    pub fn decision<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = StepResult<Decision>> + Send + 'static,
    {
        self.handler(name, Capability::Decision(Arc::new(FnDecision(f))), opts)
    }
    /// Registers an API-shaped closure.
    pub fn api<F, Fut>(self, name: impl Into<String>, opts: HandlerOptions, f: F) -> Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        self.handler(name, Capability::Api(Arc::new(FnApi(f))), opts)
    }

    /// Validates the registrations and builds the worker.
    pub fn build(self) -> Result<Worker> {
        if self.regs.is_empty() {
            return Err(Error::Config("a worker needs at least one handler".into()));
        }
        let mut seen = HashMap::new();
        for (name, cap, opts) in &self.regs {
            crate::client::validate_name("handler name", name)?;
            if seen.insert(name.clone(), ()).is_some() {
                return Err(Error::Config(format!(
                    "handler `{name}` is registered twice"
                )));
            }
            if let Some(r) = opts.rate_limit {
                if !(r.per_second > 0.0 && r.per_second.is_finite()) {
                    return Err(Error::Config(format!(
                        "handler `{name}`: rate_limit.per_second must be a positive number"
                    )));
                }
            }
            if opts.concurrency == 0 {
                return Err(Error::Config(format!(
                    "handler `{name}`: concurrency must be at least 1"
                )));
            }
            let _ = cap;
        }
        if self.opts.lease < Duration::from_millis(50) {
            return Err(Error::Config("lease must be at least 50 ms".into()));
        }
        // Durations past the core's maximum would overflow millisecond
        // arithmetic (a lease of `Duration::MAX` wrapped to a negative one).
        let o = &self.opts;
        let too_long = |what: &str, d: Duration| {
            crate::client::check_duration(what, d)
                .map(|_| ())
                .map_err(|e| Error::Config(e.to_string()))
        };
        too_long("lease", o.lease)?;
        too_long("heartbeat", o.heartbeat)?;
        too_long("shutdown_grace", o.shutdown_grace)?;
        too_long("shutdown_flush", o.shutdown_flush)?;
        if o.concurrency == 0 || o.claim_batch == 0 {
            return Err(Error::Config(
                "concurrency and claim_batch must be at least 1".into(),
            ));
        }
        for (name, _, h) in &self.regs {
            if let Some(t) = h.timeout {
                too_long(&format!("handler `{name}`: timeout"), t)?;
            }
            too_long(&format!("handler `{name}`: linger"), h.linger)?;
            too_long(
                &format!("handler `{name}`: initial_backoff"),
                h.retry.initial_backoff,
            )?;
            too_long(
                &format!("handler `{name}`: max_backoff"),
                h.retry.max_backoff,
            )?;
        }
        Ok(Worker {
            store: self.store,
            opts: self.opts,
            regs: self.regs,
        })
    }
}

/// A host: registered handlers plus the loops that feed them.
pub struct Worker {
    store: DynStore,
    opts: WorkerOptions,
    regs: Vec<(String, Capability, HandlerOptions)>,
}

impl Worker {
    /// Starts building a worker on `store`.
    pub fn builder(store: DynStore) -> WorkerBuilder {
        WorkerBuilder {
            store,
            opts: WorkerOptions::default(),
            regs: Vec::new(),
        }
    }

    /// The host-wide options it will run with.
    pub fn options(&self) -> &WorkerOptions {
        &self.opts
    }

    /// Starts the host on the current tokio runtime and returns a handle.
    pub async fn start(self) -> Result<RunningWorker> {
        let now = self.store.now().await?;
        let host = HostInfo {
            id: uuid::Uuid::now_v7().to_string(),
            pid: std::process::id(),
            hostname: hostname(),
            name: self.opts.name.clone(),
            handlers: self.regs.iter().map(|r| r.0.clone()).collect(),
            started_at: now,
            last_heartbeat: now,
            language: Some(self.opts.language.to_string()),
            slots: Some(self.opts.concurrency as u64),
            ended_at: None,
            end_reason: None,
        };
        let lease_ms = self.opts.lease.as_millis() as i64;
        // Register before claiming so `switchyard workers` and unknown-handler
        // diagnostics see this host as soon as it runs anything.
        self.store.heartbeat(&host, &[], lease_ms).await?;
        let env = Arc::new(CtxEnv {
            store: self.store.clone(),
            host,
            lease_ms,
            max_payload: self.opts.max_payload_bytes,
        });
        let (ctx_tx, ctx_rx) = mpsc::unbounded_channel();
        let metrics = HostMetrics::new(&env.host.id, self.opts.language);
        let regs: Vec<Arc<Reg>> = self
            .regs
            .into_iter()
            .map(|(name, cap, opts)| {
                let bucket = opts.rate_limit.map(|r| {
                    Mutex::new(Bucket {
                        tokens: r.burst as f64,
                        last: Instant::now(),
                    })
                });
                Arc::new(Reg {
                    m: metrics.handler(&name),
                    name,
                    cap,
                    opts,
                    inflight: AtomicUsize::new(0),
                    bucket,
                    batch_tx: Mutex::new(None),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            env,
            regs: regs.iter().map(|r| (r.name.clone(), r.clone())).collect(),
            order: regs,
            opts: self.opts,
            inflight: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            running: Mutex::new(HashMap::new()),
            completions: ctx_tx,
            slot_freed: Notify::new(),
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            give_up: CancellationToken::new(),
            metrics,
            heartbeat_ok: AtomicBool::new(true),
            serving_done: CancellationToken::new(),
        });
        let health_addr = match shared.opts.health_listen {
            Some(addr) => match health::start(shared.clone(), addr).await {
                Ok(a) => Some(a),
                Err(e) => {
                    // Nothing runs yet: leave the store as if never started.
                    let _ = shared.store().deregister_host(&shared.env.host.id).await;
                    return Err(e);
                }
            },
            None => None,
        };
        for reg in &shared.order {
            if let Capability::Batch(_) = reg.cap {
                let (tx, rx) = mpsc::unbounded_channel();
                *reg.batch_tx.lock() = Some(tx);
                tokio::spawn(batcher(shared.clone(), reg.clone(), rx));
            }
        }
        let completer = tokio::spawn(completer(shared.clone(), ctx_rx));
        let beat_stop = CancellationToken::new();
        let heart = tokio::spawn(heartbeat_loop(shared.clone(), beat_stop.clone()));
        let cancels = tokio::spawn(cancel_listener(shared.clone()));
        let reaper = tokio::spawn(reap_dead_hosts(shared.clone()));
        let claimer = tokio::spawn(claim_loop(shared.clone()));
        tracing::info!(host = %shared.env.host.id, handlers = ?shared.env.host.handlers, "host started");
        let s = shared.clone();
        let main = tokio::spawn(async move {
            s.stopping.cancelled().await;
            let grace_end = tokio::time::Instant::now() + s.opts.shutdown_grace;
            // The claimer returns as soon as it sees `stopping`, unless it
            // is inside a claim that a failing store does not answer.
            let mut claimer = claimer;
            if tokio::time::timeout_at(grace_end, &mut claimer)
                .await
                .is_err()
            {
                tracing::warn!("a claim did not return within the shutdown grace period; abandoning it (its steps return when their leases expire)");
                claimer.abort();
            }
            drain(&s, grace_end).await;
            // Record what the handlers produced, for at most `shutdown_flush`
            // (the completer retries a failing store until then).
            let flush_end = tokio::time::Instant::now() + s.opts.shutdown_flush;
            let (tx, rx) = oneshot::channel();
            let _ = s.completions.send(CompletionMsg::Flush(tx));
            if tokio::time::timeout_at(flush_end, rx).await.is_err() {
                s.give_up.cancel();
            }
            beat_stop.cancel();
            // The last heartbeat and the deregistration are best effort: a
            // store that does not answer gets until the flush deadline (at
            // least a second) before the host stops without them.
            let best_effort_end =
                flush_end.max(tokio::time::Instant::now() + Duration::from_secs(1));
            let mut heart = heart;
            if tokio::time::timeout_at(best_effort_end, &mut heart)
                .await
                .is_err()
            {
                heart.abort();
            }
            cancels.abort();
            reaper.abort();
            for reg in &s.order {
                reg.batch_tx.lock().take();
            }
            match tokio::time::timeout_at(
                best_effort_end,
                s.store().deregister_host(&s.env.host.id),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not deregister host"),
                Err(_) => tracing::warn!("could not deregister host: the store did not answer"),
            }
            s.give_up.cancel();
            completer.abort();
            s.serving_done.cancel();
            tracing::info!(host = %s.env.host.id, "host stopped");
        });
        Ok(RunningWorker {
            shared,
            main: Mutex::new(Some(main)),
            health_addr,
        })
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully. The signal
    /// handlers are installed before the host starts, so a signal that
    /// arrives while it starts still shuts it down gracefully.
    pub async fn run(self) -> Result<()> {
        let mut signals = ShutdownSignals::listen();
        let running = self.start().await?;
        signals.recv().await;
        tracing::info!("signal received, shutting down");
        running.stop().await;
        Ok(())
    }
}
