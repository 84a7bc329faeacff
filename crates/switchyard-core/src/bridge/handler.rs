//! `InboxHandler`: a capability that round-trips through an inbox.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{Inbox, JobItem, JobKind, Reply};
use crate::context::Context;
use crate::handler::*;

/// A handler implemented in a foreign language: runs by pushing jobs into
/// its runtime's inbox.
pub struct InboxHandler {
    inbox: Arc<Inbox>,
    id: usize,
    name: String,
    lang: &'static str,
}

impl InboxHandler {
    /// The capability for handler `name` (id `id`, see
    /// [`super::HostPlan::register`]) of kind `kind`, served by `inbox`;
    /// `lang` names the language in error messages.
    pub fn capability(
        inbox: Arc<Inbox>,
        id: usize,
        name: &str,
        kind: JobKind,
        lang: &'static str,
    ) -> Capability {
        let h = Arc::new(Self {
            inbox,
            id,
            name: name.to_string(),
            lang,
        });
        match kind {
            JobKind::Step => Capability::Plain(h),
            JobKind::Decision => Capability::Decision(h),
            JobKind::Api => Capability::Api(h),
            JobKind::Batch => Capability::Batch(h),
        }
    }

    async fn roundtrip(&self, kind: JobKind, items: Vec<JobItem>) -> Result<Vec<Reply>, StepError> {
        let n = items.len();
        let ctxs: Vec<Context> = items.iter().map(|i| i.ctx.clone()).collect();
        let (id, mut rx) = self
            .inbox
            .push(self.id, &self.name, kind, items)
            .map_err(|_| StepError::Cancelled)?;
        // Until the job is answered, a cancelled run (or this future being
        // dropped: timeout, cancel grace over, shutdown) sends the binding a
        // cancellation notice for it.
        let mut notice = Notice {
            inbox: &self.inbox,
            id,
            armed: true,
        };
        // Every run of the job asked to stop (a batch is not interrupted
        // for one cancelled item; its item fails alone, and a binding that
        // watches item notices hears of it, see `Inbox::watch_item_cancels`).
        let answered = if kind == JobKind::Batch && n > 1 {
            let mut each: futures::stream::FuturesUnordered<_> = ctxs
                .iter()
                .enumerate()
                .map(|(i, c)| async move {
                    c.cancelled().await;
                    i
                })
                .collect();
            let mut left = n;
            loop {
                tokio::select! {
                    biased;
                    r = &mut rx => break r,
                    Some(i) = futures::StreamExt::next(&mut each), if left > 0 => {
                        left -= 1;
                        if left == 0 {
                            notice.fire();
                            break rx.await;
                        }
                        self.inbox.notice_item_cancel(id, i);
                    }
                }
            }
        } else {
            let cancelled = futures::future::join_all(ctxs.iter().map(|c| c.cancelled()));
            tokio::select! {
                biased;
                r = &mut rx => r,
                _ = cancelled => {
                    notice.fire();
                    rx.await
                }
            }
        };
        notice.armed = false;
        let replies = answered.map_err(|_| {
            StepError::retryable(format!(
                "the {} handler `{}` dropped the step without answering",
                self.lang, self.name
            ))
        })?;
        if replies.len() != n {
            return Err(StepError::permanent(format!(
                "the {} handler `{}` answered {} outcomes for {n} steps",
                self.lang,
                self.name,
                replies.len()
            )));
        }
        Ok(replies
            .into_iter()
            .zip(&ctxs)
            .map(|(r, ctx)| r.resolve(ctx))
            .collect())
    }

    async fn one(&self, kind: JobKind, input: Value, ctx: Context) -> Result<Reply, StepError> {
        let mut r = self.roundtrip(kind, vec![JobItem { input, ctx }]).await?;
        Ok(r.pop().expect("roundtrip checked the count"))
    }

    fn wrong(&self, what: &str) -> StepError {
        StepError::permanent(format!(
            "the {} handler `{}` returned {what}",
            self.lang, self.name
        ))
    }
}

/// Sends job `id`'s cancellation notice once, when fired or dropped armed.
struct Notice<'a> {
    inbox: &'a Inbox,
    id: u64,
    armed: bool,
}

impl Notice<'_> {
    fn fire(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.inbox.notice_cancel(self.id);
        }
    }
}

impl Drop for Notice<'_> {
    fn drop(&mut self) {
        self.fire();
    }
}

/// [`InboxHandler::roundtrip`] resolves every `Raised`; should one slip
/// through anyway, it fails its step rather than the host.
fn unresolved(r: Reply) -> StepError {
    StepError::permanent(format!("an unresolved control-flow answer: {r:?}"))
}

#[async_trait]
impl Handler for InboxHandler {
    async fn run(&self, input: Value, ctx: Context) -> StepResult {
        match self.one(JobKind::Step, input, ctx).await? {
            Reply::Value(v) => Ok(v),
            Reply::Error(e) => Err(e),
            Reply::Api(e) => Err(e.classify()),
            Reply::Decision(_) => {
                Err(self.wrong("a decision, but it is registered as a plain step"))
            }
            r @ Reply::Raised { .. } => Err(unresolved(r)),
        }
    }
}

#[async_trait]
impl DecisionCapable for InboxHandler {
    async fn decide(&self, input: Value, ctx: Context) -> StepResult<Decision> {
        match self.one(JobKind::Decision, input, ctx).await? {
            Reply::Decision(d) => Ok(d),
            Reply::Error(e) => Err(e),
            Reply::Api(e) => Err(e.classify()),
            Reply::Value(_) => {
                Err(self.wrong("a plain value, but a decision handler must return a decision"))
            }
            r @ Reply::Raised { .. } => Err(unresolved(r)),
        }
    }
}

#[async_trait]
impl APICapable for InboxHandler {
    async fn call(&self, input: Value, ctx: Context) -> Result<Value, ApiError> {
        match self.one(JobKind::Api, input, ctx).await? {
            Reply::Value(v) => Ok(v),
            Reply::Api(e) => Err(e),
            Reply::Error(e) => Err(ApiError::Step(e)),
            Reply::Decision(_) => Err(ApiError::Step(self.wrong("a decision from an API handler"))),
            r @ Reply::Raised { .. } => Err(ApiError::Step(unresolved(r))),
        }
    }
}

#[async_trait]
impl BatchableCapable for InboxHandler {
    async fn run_batch(&self, items: Vec<BatchItem>) -> Vec<StepResult> {
        let n = items.len();
        let items = items
            .into_iter()
            .map(|i| JobItem {
                input: i.input,
                ctx: i.ctx,
            })
            .collect();
        match self.roundtrip(JobKind::Batch, items).await {
            Ok(replies) => replies
                .into_iter()
                .map(|r| match r {
                    Reply::Value(v) => Ok(v),
                    Reply::Error(e) => Err(e),
                    Reply::Api(e) => Err(e.classify()),
                    Reply::Decision(_) => Err(self.wrong("a decision from a batch handler")),
                    r @ Reply::Raised { .. } => Err(unresolved(r)),
                })
                .collect(),
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }
}
