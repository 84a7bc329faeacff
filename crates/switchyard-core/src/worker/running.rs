//! A started host (`RunningWorker`) and the signals that stop it.

use super::*;

/// SIGINT and SIGTERM, caught from the moment [`ShutdownSignals::listen`]
/// returns (their default action, ending the process, no longer applies).
/// Listen before starting a host: a signal that arrives between the start
/// and a later listen would end the process without a graceful shutdown.
pub struct ShutdownSignals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                _ => None,
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        match &mut self.streams {
            Some((int, term)) => {
                tokio::select! {
                    biased;
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for SIGINT or SIGTERM (handlers installed at the first poll; see
/// [`ShutdownSignals`] to install them earlier).
pub async fn wait_for_signal() {
    ShutdownSignals::listen().recv().await
}

/// A started host.
pub struct RunningWorker {
    pub(super) shared: Arc<Shared>,
    pub(super) main: Mutex<Option<JoinHandle<()>>>,
    pub(super) health_addr: Option<std::net::SocketAddr>,
}

impl RunningWorker {
    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.shared.env.host.id
    }
    /// Where `/healthz`, `/readyz` and `/metrics` are served (None unless
    /// [`WorkerOptions::health_listen`] was set).
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self.health_addr
    }
    /// This host's metrics in the Prometheus text format (what `/metrics`
    /// serves), also without the endpoint.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render(&self.shared)
    }
    /// Steps running now.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }
    /// Waits until every outcome that finished steps handed to the host so
    /// far is recorded in the store (or the host has stopped).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .shared
            .completions
            .send(CompletionMsg::Flush(tx))
            .is_ok()
        {
            let _ = rx.await;
        }
    }
    /// Asks the host to stop (returns at once): no more claims; running steps
    /// get the grace period, then are cancelled and handed back.
    pub fn shutdown(&self) {
        self.shared.stopping.cancel();
    }
    /// Stops and waits until the host has drained and deregistered.
    pub async fn stop(&self) {
        self.shutdown();
        self.wait().await;
    }
    /// Waits until the host has stopped (after [`Self::shutdown`]).
    pub async fn wait(&self) {
        let handle = self.main.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shared.stopping.cancel();
        self.shared.serving_done.cancel();
    }
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}
