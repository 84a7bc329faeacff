//! The queue between the dispatcher and one foreign runtime (see the
//! module docs of `bridge`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::{Job, JobItem, JobKind, Reply};

/// How long queued jobs may sit untaken, while consumers are busy, before
/// an idle consumer of a [`Inbox::serial`] inbox takes them: the busy ones
/// are then taken to be blocked in their handlers (I/O, sleeping).
pub const STALL: Duration = Duration::from_millis(2);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    closed: bool,
    interrupts: u64,
    /// Consumers holding jobs (they take queued jobs before waiting again).
    busy: usize,
    /// Threads waiting on the condition variable ([`Consumer::next`],
    /// [`Inbox::recv_batch`]).
    waiting: usize,
    /// A waiter was woken and has not looked at the queue yet.
    wake_pending: bool,
    /// A waiter watches a queue that busy consumers are draining.
    sentinel: bool,
    /// When a consumer last took a job.
    last_take: Option<Instant>,
    /// Cancellation notices not yet taken (see [`Inbox::recv_cancels`]).
    cancels: VecDeque<u64>,
    /// Someone reads the notices ([`Inbox::watch_cancels`]).
    watched: bool,
    /// Batch-item notices not yet taken, `(job id, item index)` (see
    /// [`Inbox::watch_item_cancels`]).
    item_cancels: VecDeque<(u64, usize)>,
    /// Someone reads the batch-item notices.
    items_watched: bool,
}

impl State {
    /// Drops the queued jobs the core has given up on (see [`Inbox::take`]);
    /// true if any job is left.
    fn live(s: &mut Self) -> bool {
        s.queue.retain(|j| !j.abandoned());
        !s.queue.is_empty()
    }
}

/// Most cancellation notices kept unread; older ones are dropped (a notice
/// is advice: `Context::is_cancelled` and `Job::abandoned` stay true).
pub const MAX_CANCEL_NOTICES: usize = 65_536;

/// The queue between the dispatcher and one foreign runtime.
///
/// Besides jobs it carries **cancellation notices**, the one way every
/// binding learns that a job it runs should stop: when the runs of a taken
/// job are cancelled (task cancelled, timeout, lease lost, shutdown; for a
/// batch, all of its items') or the core stops waiting for the job, the job's id is queued for
/// [`Inbox::recv_cancels`] / [`Inbox::recv_cancels_async`] once a binding
/// asked for them with [`Inbox::watch_cancels`]. The binding then interrupts
/// that job its own way (cancels an asyncio task, raises into a Ruby
/// thread, aborts a JS signal, ...). A binding that can stop one item of a
/// batch on its own also asks for the items' notices
/// ([`Inbox::watch_item_cancels`]): item `i` of job `id` is named as soon as
/// its run alone is asked to stop.
pub struct Inbox {
    state: Mutex<State>,
    cond: Condvar,
    /// Wakes threads waiting for cancellation notices.
    cancel_cond: Condvar,
    notify: Notify,
    /// Wakes an event loop waiting for cancellation notices.
    cancel_notify: Notify,
    next_id: AtomicU64,
    /// Read through [`Consumer`]s, which wake each other (see the module docs).
    serial: bool,
    /// See [`STALL`].
    stall: Duration,
}

/// What [`Inbox::recv_cancel_notices_async`] returns: ids of jobs whose
/// runs were all asked to stop, and `(job id, item index)` of batch items
/// asked to stop alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CancelNotices {
    /// Jobs whose runs were all asked to stop.
    pub jobs: Vec<u64>,
    /// `(job id, item index)` of batch items asked to stop alone.
    pub items: Vec<(u64, usize)>,
}

/// The inbox was closed: the host is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the inbox is closed: the host is shutting down")]
pub struct Closed;

impl Inbox {
    /// An empty inbox for parallel threads ([`Self::recv_batch`]) or an
    /// event loop ([`Self::recv_batch_async`]).
    pub fn new() -> Arc<Self> {
        Self::with_mode(false, STALL)
    }

    /// An empty inbox for threads that take turns under an interpreter lock,
    /// read through one [`Consumer`] per thread.
    pub fn serial() -> Arc<Self> {
        Self::with_mode(true, STALL)
    }

    fn with_mode(serial: bool, stall: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            cond: Condvar::new(),
            cancel_cond: Condvar::new(),
            notify: Notify::new(),
            cancel_notify: Notify::new(),
            next_id: AtomicU64::new(1),
            serial,
            stall,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every critical section is a single push/drain), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn push(
        &self,
        handler_id: usize,
        handler: &str,
        kind: JobKind,
        items: Vec<JobItem>,
    ) -> Result<(u64, oneshot::Receiver<Vec<Reply>>), Closed> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            handler_id,
            handler: handler.to_string(),
            kind,
            items,
            reply: tx,
        };
        let wake = {
            let mut s = self.lock();
            if s.closed {
                return Err(Closed);
            }
            s.queue.push_back(job);
            // A serial inbox wakes one waiter when nobody is taking jobs, or
            // to watch for a stall while busy consumers drain the queue.
            // Only threads need the condition variable (a notify is a
            // system call even with nobody waiting; Node waits on `notify`).
            // One wake-up in flight at a time: the woken thread wakes the
            // next if it leaves jobs behind (see `recv_batch`), so a burst
            // of jobs does not wake a thread per job.
            let wake =
                s.waiting > 0 && !s.wake_pending && (!self.serial || s.busy == 0 || !s.sentinel);
            if wake {
                s.wake_pending = true;
            }
            wake
        };
        if wake {
            self.cond.notify_one();
        }
        self.notify.notify_one();
        Ok((id, rx))
    }

    /// Starts keeping cancellation notices for [`Self::recv_cancels`] (off
    /// by default, so a binding that never reads them keeps none).
    pub fn watch_cancels(&self) {
        self.lock().watched = true;
    }

    /// Also keeps a notice per **batch item** whose run was asked to stop
    /// while other items of its job still run, read with
    /// [`Self::recv_cancel_notices_async`] (or [`Self::try_recv_item_cancels`]).
    /// Off by default: a binding that only interrupts whole jobs keeps none,
    /// and the job's own notice (once every item was asked to stop) is sent
    /// either way.
    pub fn watch_item_cancels(&self) {
        self.lock().items_watched = true;
    }

    /// Queues the notice that item `index` of batch job `id` should stop
    /// (see [`Self::watch_item_cancels`]).
    pub(super) fn notice_item_cancel(&self, id: u64, index: usize) {
        {
            let mut s = self.lock();
            if !s.items_watched || s.closed {
                return;
            }
            if s.item_cancels.len() >= MAX_CANCEL_NOTICES {
                s.item_cancels.pop_front();
            }
            s.item_cancels.push_back((id, index));
        }
        self.cancel_cond.notify_all();
        self.cancel_notify.notify_one();
    }

    /// The batch-item notices already queued, `(job id, item index)`,
    /// without waiting.
    pub fn try_recv_item_cancels(&self) -> Vec<(u64, usize)> {
        self.lock().item_cancels.drain(..).collect()
    }

    /// [`Self::recv_cancels_async`] with the batch-item notices too (see
    /// [`Self::watch_item_cancels`]): the next job notices and item notices
    /// (either may be empty, not both), or `None` once the inbox is closed.
    pub async fn recv_cancel_notices_async(&self) -> Option<CancelNotices> {
        loop {
            let notified = self.cancel_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if !s.cancels.is_empty() || !s.item_cancels.is_empty() {
                    return Some(CancelNotices {
                        jobs: s.cancels.drain(..).collect(),
                        items: s.item_cancels.drain(..).collect(),
                    });
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Queues the notice that job `id` should stop (see the type's docs).
    pub(super) fn notice_cancel(&self, id: u64) {
        {
            let mut s = self.lock();
            if !s.watched || s.closed {
                return;
            }
            if s.cancels.len() >= MAX_CANCEL_NOTICES {
                s.cancels.pop_front();
            }
            s.cancels.push_back(id);
        }
        self.cancel_cond.notify_all();
        self.cancel_notify.notify_one();
    }

    /// The ids of jobs that should stop, waiting at most `slice` for one;
    /// none after `slice` or [`Self::interrupt`]; `Err(Closed)` once the
    /// inbox is closed. Ids of jobs a binding is not running can be ignored.
    /// Thread affinity as [`Self::recv_batch`].
    pub fn recv_cancels(&self, slice: Duration) -> Result<Vec<u64>, Closed> {
        let deadline = Instant::now() + slice;
        let mut s = self.lock();
        let seen = s.interrupts;
        loop {
            if !s.cancels.is_empty() {
                return Ok(s.cancels.drain(..).collect());
            }
            if s.closed {
                return Err(Closed);
            }
            let now = Instant::now();
            if now >= deadline || s.interrupts != seen {
                return Ok(Vec::new());
            }
            s = self
                .cancel_cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The notices already queued, without waiting.
    pub fn try_recv_cancels(&self) -> Vec<u64> {
        self.lock().cancels.drain(..).collect()
    }

    /// [`Self::recv_cancels`] for an event loop: the next notices, or
    /// `None` once the inbox is closed.
    pub async fn recv_cancels_async(&self) -> Option<Vec<u64>> {
        loop {
            let notified = self.cancel_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if !s.cancels.is_empty() {
                    return Some(s.cancels.drain(..).collect());
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Up to `max` jobs from the front of the queue, leaving out (and
    /// dropping) the ones the core has given up on while they were queued
    /// (timed out, cancelled, handed back at shutdown): no binding ever
    /// starts those. A binding that holds taken jobs a while before running
    /// them (a batch) checks [`Job::abandoned`] again just before each.
    fn take(s: &mut State, max: usize) -> Vec<Job> {
        let max = max.max(1);
        let mut jobs = Vec::with_capacity(max.min(s.queue.len()));
        while jobs.len() < max {
            match s.queue.pop_front() {
                Some(job) if job.abandoned() => drop(job),
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        jobs
    }

    /// Blocks the calling thread until jobs are available (returns up to
    /// `max`), `slice` has passed (returns none), [`Self::interrupt`] was
    /// called (returns none), or the inbox is closed (`Err(Closed)` once the
    /// queue is empty). Not for [`Self::serial`] inboxes (use a
    /// [`Consumer`]): their jobs do not wake every waiter.
    ///
    /// Thread affinity: any thread that is not a tokio runtime worker. Call
    /// it with the interpreter lock released.
    pub fn recv_batch(&self, max: usize, slice: Duration) -> Result<Vec<Job>, Closed> {
        let deadline = Instant::now() + slice;
        let mut s = self.lock();
        let seen = s.interrupts;
        loop {
            if State::live(&mut s) {
                let jobs = Self::take(&mut s, max);
                if !s.queue.is_empty() && s.waiting > 0 && !s.wake_pending {
                    // More work than this thread took: wake the next one.
                    s.wake_pending = true;
                    self.cond.notify_one();
                }
                return Ok(jobs);
            }
            if s.closed {
                return Err(Closed);
            }
            if s.interrupts != seen {
                return Ok(Vec::new());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            s.waiting += 1;
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            s.waiting -= 1;
            s.wake_pending = false;
        }
    }

    /// Non-blocking: up to `max` jobs now.
    pub fn try_recv_batch(&self, max: usize) -> Result<Vec<Job>, Closed> {
        let mut s = self.lock();
        if !State::live(&mut s) && s.closed {
            return Err(Closed);
        }
        Ok(Self::take(&mut s, max))
    }

    /// Waits for up to `max` jobs; `None` once closed and drained.
    ///
    /// # Cancel safety
    /// Cancel safe: no job is taken unless the future completes.
    pub async fn recv_batch_async(&self, max: usize) -> Option<Vec<Job>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if State::live(&mut s) {
                    return Some(Self::take(&mut s, max));
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Wakes every thread blocked in [`Self::recv_batch`] (they return no
    /// jobs). This is the unblock function for Ruby's
    /// `rb_thread_call_without_gvl`; safe from any thread and from signal
    /// handling contexts that may take a mutex.
    pub fn interrupt(&self) {
        self.lock().interrupts += 1;
        self.cond.notify_all();
        self.cancel_cond.notify_all();
        self.notify.notify_waiters();
        self.cancel_notify.notify_waiters();
    }

    /// Closes the inbox: waiters return `Closed` once the queue is drained,
    /// and new jobs are refused (their steps are handed back).
    pub fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
        self.cancel_cond.notify_all();
        self.notify.notify_waiters();
        self.cancel_notify.notify_waiters();
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True if no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One thread's handle on a [`Inbox::serial`] inbox (see the module docs).
/// Dropping it (the thread stopped serving) gives up its busy mark.
pub struct Consumer {
    inbox: Arc<Inbox>,
    busy: bool,
}

impl Consumer {
    /// A consumer of `inbox` (a [`Inbox::serial`] one), not yet busy.
    pub fn new(inbox: Arc<Inbox>) -> Self {
        Self { inbox, busy: false }
    }

    fn take(&mut self, s: &mut State, max: usize) -> Vec<Job> {
        s.last_take = Some(Instant::now());
        if !self.busy {
            self.busy = true;
            s.busy += 1;
        }
        let jobs = Inbox::take(s, max);
        if s.closed && s.queue.is_empty() {
            // The last job of a closed inbox: the waiters can leave now.
            self.inbox.cond.notify_all();
        }
        jobs
    }

    /// Up to `max` jobs already queued, without waiting (call it while
    /// holding the interpreter lock: it never blocks). Empty when none are.
    pub fn try_next(&mut self, max: usize) -> Result<Vec<Job>, Closed> {
        let inbox = self.inbox.clone();
        let mut s = inbox.lock();
        if !State::live(&mut s) {
            return if s.closed {
                Err(Closed)
            } else {
                Ok(Vec::new())
            };
        }
        Ok(self.take(&mut s, max))
    }

    /// Waits until this thread should take jobs (returns up to `max`),
    /// `slice` has passed or [`Inbox::interrupt`] was called (returns none),
    /// or the inbox is closed and drained (`Err(Closed)`). Call it with the
    /// interpreter lock released; it first gives up the busy mark.
    pub fn next(&mut self, max: usize, slice: Duration) -> Result<Vec<Job>, Closed> {
        let inbox = self.inbox.clone();
        let deadline = Instant::now() + slice;
        let mut s = inbox.lock();
        if self.busy {
            self.busy = false;
            s.busy -= 1;
        }
        let seen = s.interrupts;
        s.waiting += 1;
        let mut sentinel = false;
        let outcome = loop {
            let now = Instant::now();
            if State::live(&mut s) {
                let stalled = s.last_take.is_none_or(|t| now >= t + inbox.stall);
                if s.busy == 0 || stalled {
                    break Ok(self.take(&mut s, max));
                }
            }
            if s.closed && s.queue.is_empty() {
                break Err(Closed);
            }
            if s.interrupts != seen || now >= deadline {
                break Ok(Vec::new());
            }
            // Busy consumers are draining the queue: one waiter watches the
            // clock for a stall, the others sleep until woken.
            let mut until = deadline;
            if !s.queue.is_empty() && (sentinel || !s.sentinel) {
                sentinel = true;
                s.sentinel = true;
                if let Some(t) = s.last_take {
                    until = until.min(t + inbox.stall);
                }
            } else if sentinel {
                sentinel = false;
                s.sentinel = false;
            }
            s = inbox
                .cond
                .wait_timeout(s, until.saturating_duration_since(now))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            s.wake_pending = false;
        };
        s.waiting -= 1;
        if sentinel {
            s.sentinel = false;
            // Hand the watch on if there is still something to watch.
            if !s.queue.is_empty() && s.waiting > 0 && !s.wake_pending {
                s.wake_pending = true;
                inbox.cond.notify_one();
            }
        }
        outcome
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.busy {
            let mut s = self.inbox.lock();
            s.busy -= 1;
            // It may have left jobs for others to take.
            if !s.queue.is_empty() && s.waiting > 0 {
                s.wake_pending = true;
                self.inbox.cond.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(inbox: &Inbox) -> oneshot::Receiver<Vec<Reply>> {
        inbox
            .push(0, "h", JobKind::Step, Vec::new())
            .expect("open inbox")
            .1
    }

    /// Runs `next` on another thread; its result arrives on the channel.
    fn wait_on_thread(
        inbox: &Arc<Inbox>,
        slice: Duration,
    ) -> std::sync::mpsc::Receiver<(Result<usize, Closed>, Duration)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let inbox = inbox.clone();
        std::thread::spawn(move || {
            let mut c = Consumer::new(inbox);
            let t = Instant::now();
            let r = c.next(4, slice).map(|j| j.len());
            let _ = tx.send((r, t.elapsed()));
        });
        rx
    }

    /// Until `n` threads wait on `inbox` (a test fails rather than hangs).
    fn until_waiting(inbox: &Inbox, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while inbox.lock().waiting < n {
            assert!(Instant::now() < deadline, "{n} waiters never showed up");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn batch_item_notices_are_kept_only_when_watched_and_come_with_the_job_notices() {
        let inbox = Inbox::new();
        inbox.watch_cancels();
        inbox.notice_item_cancel(7, 1);
        assert!(inbox.try_recv_item_cancels().is_empty(), "not watched");
        inbox.watch_item_cancels();
        inbox.notice_item_cancel(7, 1);
        inbox.notice_cancel(8);
        inbox.notice_item_cancel(9, 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(inbox.recv_cancel_notices_async());
        assert_eq!(
            got,
            Some(CancelNotices {
                jobs: vec![8],
                items: vec![(7, 1), (9, 0)],
            })
        );
        inbox.close();
        assert_eq!(rt.block_on(inbox.recv_cancel_notices_async()), None);
        inbox.notice_item_cancel(7, 2);
        assert!(inbox.try_recv_item_cancels().is_empty(), "closed");
    }

    #[test]
    fn an_idle_consumer_takes_a_job_at_once_when_nobody_is_busy() {
        let inbox = Inbox::serial();
        let got = wait_on_thread(&inbox, Duration::from_secs(10));
        until_waiting(&inbox, 1);
        let _r = job(&inbox);
        let (n, waited) = got.recv_timeout(Duration::from_secs(20)).expect("woken");
        assert_eq!(n, Ok(1));
        assert!(waited < Duration::from_secs(5));
    }

    #[test]
    fn a_busy_consumer_keeps_the_jobs_and_an_idle_one_takes_over_after_a_stall() {
        let inbox = Inbox::serial();
        let mut busy = Consumer::new(inbox.clone());
        let (_a, _b) = (job(&inbox), job(&inbox));
        assert_eq!(
            busy.try_next(1).unwrap().len(),
            1,
            "queued jobs are taken without waiting"
        );
        let took = Instant::now();

        // `busy` is inside a handler now. The job left in the queue waits for
        // it at first; once the queue has stalled for STALL, an idle thread
        // takes it.
        let idle = wait_on_thread(&inbox, Duration::from_secs(10));
        let (n, _) = idle
            .recv_timeout(Duration::from_secs(20))
            .expect("taken over");
        assert_eq!(n, Ok(1));
        assert!(
            took.elapsed() >= STALL,
            "the idle thread waited for a stall first"
        );

        // While a busy consumer keeps taking jobs, an idle one stays asleep
        // (a long stall time, so that a slow test machine cannot fake one).
        let patient = Inbox::with_mode(true, Duration::from_secs(60));
        let mut worker = Consumer::new(patient.clone());
        let _c = job(&patient);
        assert_eq!(worker.try_next(1).unwrap().len(), 1);
        let idle = wait_on_thread(&patient, Duration::from_secs(2));
        until_waiting(&patient, 1);
        for _ in 0..100 {
            let _r = job(&patient);
            assert_eq!(worker.try_next(4).unwrap().len(), 1);
        }
        let (n, _) = idle
            .recv_timeout(Duration::from_secs(20))
            .expect("slice ends");
        assert_eq!(n, Ok(0), "the idle thread was not needed");

        // A consumer that stops serving while busy lets the others take over at once.
        let idle = wait_on_thread(&inbox, Duration::from_secs(10));
        until_waiting(&inbox, 1);
        let _c = job(&inbox);
        drop(busy);
        let (n, waited) = idle.recv_timeout(Duration::from_secs(20)).expect("woken");
        assert_eq!(n, Ok(1));
        assert!(waited < Duration::from_secs(5));
    }

    #[test]
    fn consumers_leave_on_interrupt_and_on_close_once_the_queue_is_drained() {
        let inbox = Inbox::serial();
        let waiters: Vec<_> = (0..3)
            .map(|_| wait_on_thread(&inbox, Duration::from_secs(30)))
            .collect();
        until_waiting(&inbox, 3);
        inbox.interrupt();
        for w in &waiters {
            let (n, waited) = w
                .recv_timeout(Duration::from_secs(20))
                .expect("interrupted");
            assert_eq!(n, Ok(0));
            assert!(waited < Duration::from_secs(5));
        }

        // Closed while a job is still queued behind a busy consumer: it is
        // still handed out, then every waiter leaves. (A long stall time, so
        // that no waiter takes the job over on a slow machine first.)
        let patient = Inbox::with_mode(true, Duration::from_secs(60));
        let mut busy = Consumer::new(patient.clone());
        let (_a, _b) = (job(&patient), job(&patient));
        assert_eq!(busy.try_next(1).unwrap().len(), 1);
        let waiters: Vec<_> = (0..2)
            .map(|_| wait_on_thread(&patient, Duration::from_secs(30)))
            .collect();
        until_waiting(&patient, 2);
        patient.close();
        assert!(job_refused(&patient), "a closed inbox takes no new jobs");
        assert_eq!(busy.try_next(1).map(|j| j.len()), Ok(1));
        for w in &waiters {
            let (n, waited) = w.recv_timeout(Duration::from_secs(20)).expect("left");
            assert_eq!(n, Err(Closed));
            assert!(waited < Duration::from_secs(20));
        }
        assert_eq!(busy.try_next(1).map(|j| j.len()), Err(Closed));
    }

    /// A job the core gave up on while it was queued (its reply receiver
    /// is gone: timeout, cancellation, shutdown) is never handed to a
    /// binding, whichever way the binding takes jobs.
    #[test]
    fn abandoned_jobs_are_never_handed_out() {
        fn ids(jobs: Vec<Job>) -> Vec<u64> {
            jobs.into_iter().map(|j| j.id).collect()
        }
        let inbox = Inbox::serial();
        let (a, b, c) = (job(&inbox), job(&inbox), job(&inbox));
        drop(a);
        drop(c);
        let mut consumer = Consumer::new(inbox.clone());
        assert_eq!(ids(consumer.try_next(8).unwrap()), vec![2]);
        drop(b);

        let dropped = job(&inbox);
        drop(dropped);
        let got = wait_on_thread(&inbox, Duration::from_millis(300));
        let (n, _) = got
            .recv_timeout(Duration::from_secs(20))
            .expect("slice ends");
        assert_eq!(
            n,
            Ok(0),
            "a consumer waiting on an abandoned job gets nothing"
        );

        let inbox = Inbox::new();
        let (d, _e) = (job(&inbox), job(&inbox));
        drop(d);
        assert_eq!(
            ids(inbox.recv_batch(8, Duration::from_secs(5)).unwrap()),
            vec![2]
        );
        let f = job(&inbox);
        drop(f);
        assert!(inbox.try_recv_batch(8).unwrap().is_empty());
        let (g, _h) = (job(&inbox), job(&inbox));
        drop(g);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(inbox.recv_batch_async(8)).unwrap();
        assert_eq!(ids(got), vec![5]);
        inbox.close();
        assert!(rt.block_on(inbox.recv_batch_async(8)).is_none());
    }

    fn job_refused(inbox: &Inbox) -> bool {
        inbox.push(0, "h", JobKind::Step, Vec::new()).is_err()
    }

    #[test]
    fn recv_batch_times_out_and_interrupts() {
        let inbox = Inbox::new();
        assert!(inbox
            .recv_batch(8, Duration::from_millis(5))
            .unwrap()
            .is_empty());
        let i2 = inbox.clone();
        let t = std::thread::spawn(move || i2.recv_batch(8, Duration::from_secs(30)));
        // Interrupt until the blocked thread has observed it (it may not be
        // waiting yet when the first interrupt fires).
        while !t.is_finished() {
            inbox.interrupt();
            std::thread::yield_now();
        }
        assert!(t.join().unwrap().unwrap().is_empty());
        inbox.close();
        assert_eq!(
            inbox.recv_batch(8, Duration::from_secs(30)).unwrap_err(),
            Closed
        );
    }
}
