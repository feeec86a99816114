//! Group commit: one thread inserts whatever messages are waiting and makes them durable with a
//! single `sync`, so N concurrent sessions pay for one `fdatasync` instead of N.
//!
//! The thread is a plain `std::thread` because every step is blocking disk I/O; running it on
//! the actor's arbiter would stall every other message the actor handles for the length of a
//! sync. Batches form by themselves: while one sync runs, new requests queue in the channel and
//! become the next batch, so the batch size grows with the load and a lone message is never kept
//! waiting for company.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use actix::Recipient;

use serde::{Deserialize, Serialize};
use tern_message::{InboundMessage, QueueId, SpoolError};
use tokio::sync::oneshot;
use tracing::{debug, debug_span, warn};

use crate::storage::Storage;

/// Bounds on one group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitConfig {
    /// At most this many messages share one sync.
    pub max_batch_messages: usize,
    /// Stop adding messages to a batch once it holds this many body bytes (the first message is
    /// always taken, however large). Bounds the latency a huge batch would add to its first
    /// message.
    pub max_batch_bytes: usize,
}

impl Default for CommitConfig {
    fn default() -> Self {
        Self {
            max_batch_messages: 1024,
            max_batch_bytes: 32 << 20,
        }
    }
}

/// Counters kept by the committer thread, read by the actor for [`crate::QueueStats`].
#[derive(Debug, Default)]
pub(crate) struct CommitCounters {
    pub(crate) syncs: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) failed: AtomicU64,
}

type Reply = oneshot::Sender<Result<(), SpoolError>>;

// Inserts are the common case: boxing them to shrink `Sync` would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Request {
    Insert {
        msg: InboundMessage,
        reply: Reply,
    },
    /// Make earlier state changes (delivery results, removals) durable; no one waits for it.
    Sync,
}

/// Messages made durable by one group commit, for the queue actor to index and deliver. Sent
/// once per batch, before any of the batch's senders is answered, so anything a sender does
/// through the actor after its answer finds the message indexed (one mailbox, in order).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub(crate) struct Committed(pub(crate) Vec<InboundMessage>);

/// Handle on the committer thread. Dropping it lets the thread finish the requests already
/// queued, then waits for it.
pub(crate) struct Committer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    pub(crate) counters: Arc<CommitCounters>,
}

/// A cheap, cloneable way to submit messages from any thread (a session's arbiter).
#[derive(Clone)]
pub(crate) struct Submitter(mpsc::Sender<Request>);

impl Submitter {
    /// As [`Committer::submit`].
    pub(crate) fn submit(
        &self,
        msg: InboundMessage,
    ) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send(Request::Insert { msg, reply })
            .map_err(|_| gone())?;
        Ok(rx)
    }
}

impl Committer {
    /// Starts the thread; every batch it makes durable goes to `notify` (the queue actor's
    /// mailbox, which takes messages before the actor runs) before any sender is answered.
    /// `None` only for tests that commit nothing.
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        config: CommitConfig,
        notify: Option<Recipient<Committed>>,
    ) -> std::io::Result<Self> {
        // Unbounded on purpose: every request has a session awaiting its reply, so the number in
        // flight is bounded by the number of sessions, and a bounded channel would make the
        // sending actor block its thread when full.
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(CommitCounters::default());
        let thread = std::thread::Builder::new()
            .name("tern-spool-commit".into())
            .spawn({
                let counters = counters.clone();
                move || run(&*storage, rx, config, &counters, notify.as_ref())
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            counters,
        })
    }

    pub(crate) fn submitter(&self) -> Submitter {
        Submitter(
            self.tx
                .clone()
                .expect("the sender is only taken when dropped"),
        )
    }

    /// Queues `msg` for the next group commit. The receiver yields `Ok(())` once the message is
    /// durable (and [`Committed`] is on its way to the actor); if it is dropped unanswered, the
    /// committer died.
    pub(crate) fn submit(
        &self,
        msg: InboundMessage,
    ) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        self.submitter().submit(msg)
    }

    /// Asks for a sync soon, for writes made outside the committer (delivery state updates and
    /// removals): shares the next group commit, or makes one of its own when no message comes.
    pub(crate) fn request_sync(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Request::Sync);
        }
    }
}

/// What a session waits for: the committer's answer to a submitted message, as the message's
/// id once it is durable.
pub(crate) async fn durable(
    id: QueueId,
    submitted: Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError>,
) -> Result<QueueId, SpoolError> {
    match submitted?.await {
        Ok(result) => result.map(|()| id),
        // The committer dropped the reply unanswered: it is gone (panicked).
        Err(_) => Err(gone()),
    }
}

pub(crate) fn gone() -> SpoolError {
    SpoolError::Unavailable("spool committer is not running".into())
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            // The thread exits once the channel is empty and closed; at most one batch remains.
            if t.join().is_err() {
                warn!("spool committer thread panicked");
            }
        }
    }
}

/// Puts the calling thread under `SCHED_BATCH`, whose wakeups do not preempt the running
/// thread. The committer wakes once per request and once or twice per sync (I/O completion);
/// at the normal policy each wakeup preempted the session thread in the middle of its work
/// (0.7 preemptions per message with a new connection per message). As a batch thread it
/// runs on an idle core at once, or when the session thread waits; meanwhile more messages
/// join the next commit (0.46 instead of 1.1 committer sleeps per message). Measured with
/// smtp-source, a new connection per message: +14 % accepted per second, six alternating
/// runs out of six faster (docs/benchmarks.md, "Session 7"). Best effort: a refusal
/// (a seccomp profile, another OS) leaves the normal policy.
fn yield_on_wakeup() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` outlives the call.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            debug!(error = %std::io::Error::last_os_error(), "SCHED_BATCH refused; normal policy kept");
        }
    }
}

fn run(
    storage: &dyn Storage,
    rx: mpsc::Receiver<Request>,
    config: CommitConfig,
    counters: &CommitCounters,
    notify: Option<&Recipient<Committed>>,
) {
    let _span = debug_span!("spool_committer").entered();
    yield_on_wakeup();
    let max_messages = config.max_batch_messages.max(1);
    let mut batch: Vec<(InboundMessage, Reply)> = Vec::with_capacity(max_messages);
    let mut inserted: Vec<(InboundMessage, Reply)> = Vec::with_capacity(max_messages);

    // Blocks for the first request of each batch; ends when every sender is gone.
    while let Ok(first) = rx.recv() {
        let mut bytes = 0;
        let mut sync_requested = false;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Insert { msg, reply } => {
                    bytes += msg.body.len();
                    batch.push((msg, reply));
                }
                Request::Sync => sync_requested = true,
            }
            if batch.len() < max_messages && bytes < config.max_batch_bytes {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            if sync_requested {
                counters.syncs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = storage.sync() {
                    warn!(error = %e, "spool sync of delivery state failed");
                }
            }
            continue;
        }

        let span = debug_span!("group_commit", messages = batch.len(), bytes).entered();
        let (msgs, replies): (Vec<InboundMessage>, Vec<Reply>) = batch.drain(..).unzip();
        let results = storage.insert_many(&msgs);
        debug_assert_eq!(results.len(), msgs.len());
        for ((msg, reply), result) in msgs.into_iter().zip(replies).zip(results) {
            match result {
                Ok(()) => inserted.push((msg, reply)),
                Err(e) => {
                    // Only this message fails; the rest of the batch goes on.
                    warn!(queue_id = %msg.id, error = %e, "spool insert failed");
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        if inserted.is_empty() {
            continue;
        }

        // One sync covers every insert above; nobody is answered before it returns.
        let result = storage.sync();
        counters.syncs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                counters
                    .committed
                    .fetch_add(inserted.len() as u64, Ordering::Relaxed);
                debug!(committed = inserted.len(), "group commit done");
                let (msgs, replies): (Vec<InboundMessage>, Vec<Reply>) = inserted.drain(..).unzip();
                match notify {
                    Some(to) => to.do_send(Committed(msgs)),
                    None => warn!("committed messages with no queue actor to index them"),
                }
                for reply in replies {
                    // A dropped receiver means the session went away; the message stays
                    // spooled and will be delivered anyway.
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                // The inserts may or may not be on disk: none of them may be acknowledged.
                warn!(error = %e, messages = inserted.len(), "spool sync failed");
                counters
                    .failed
                    .fetch_add(inserted.len() as u64, Ordering::Relaxed);
                let err = SpoolError::from(e);
                for (msg, reply) in inserted.drain(..) {
                    debug!(queue_id = %msg.id, "not acknowledged: sync failed");
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
        drop(span);
    }
    debug!("spool committer stopped");
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The policy of every thread of this process named like the committer (other tests may
    /// run committers of their own; all of them switch).
    fn committer_policies() -> Vec<i32> {
        let mut policies = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            // The kernel keeps 15 bytes of a thread's name.
            if comm.trim_end() == "tern-spool-comm" {
                let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
                // SAFETY: plain query of another thread's policy by id.
                policies.push(unsafe { libc::sched_getscheduler(tid) });
            }
        }
        policies
    }

    #[test]
    fn the_committer_thread_does_not_preempt_on_wakeup() {
        // Where the policy is refused (a seccomp profile), the committer keeps the normal one
        // by design; this test is about the normal case. A thread of its own asks, so the test
        // harness's thread keeps its policy.
        let allowed = std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; `param` outlives the call.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) == 0 }
        })
        .join()
        .unwrap();
        if !allowed {
            eprintln!("SCHED_BATCH refused here; nothing to check");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(crate::sled_storage::open_for_test(dir.path()));
        let committer = Committer::start(storage, CommitConfig::default(), None).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let policies = committer_policies();
            if !policies.is_empty() && policies.iter().all(|&p| p == libc::SCHED_BATCH) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "committer thread policies {policies:?}, expected SCHED_BATCH ({})",
                libc::SCHED_BATCH
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(committer);
    }
}
