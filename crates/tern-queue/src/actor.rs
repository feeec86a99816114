//! The queue actor: the stage sessions hand accepted messages to.
//!
//! `Enqueue` is answered only once the message is durable (see [`crate::committer`]); the actor
//! itself never touches the disk on its thread, it forwards the message to the committer and
//! awaits the committer's reply in a spawned actor future, so it keeps handling other messages
//! meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tern_message::{now_ms, InboundMessage, QueueId, SpoolError};
use tracing::{info, info_span, warn, Instrument};

use crate::committer::{gone, CommitConfig, Committer};
use crate::schedule::{self, DueIndex};
use crate::storage::{SpooledMeta, Storage, StorageError};

/// Hands a message to the queue. `Ok(id)` means it is durably spooled: only then may the session
/// answer `250 Ok: queued as <id>`.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Result<QueueId, SpoolError>")]
pub struct Enqueue(pub InboundMessage);

/// Asks for [`QueueStats`].
#[derive(Message, Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[rtype(result = "QueueStats")]
pub struct GetStats;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Messages in the spool (recovered at start-up + acknowledged since).
    pub messages: u64,
    /// Their total body size.
    pub bytes: u64,
    /// Messages found in the spool at start-up.
    pub recovered: u64,
    /// Messages with recipients still to deliver, in the due-time index.
    pub scheduled: u64,
    /// Records found damaged at start-up (logged and left in place for inspection).
    pub corrupt: u64,
    /// Group commits (storage syncs) performed since start-up.
    pub syncs: u64,
    /// Messages made durable since start-up.
    pub committed: u64,
    /// Messages refused since start-up (insert or sync failure).
    pub failed: u64,
}

/// Configuration of the queue actor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub commit: CommitConfig,
}

/// What the actor remembers about one spooled message. Only the size for now; the delivery
/// scheduler will add the per-recipient due times here (and a due-time ordered index next to
/// `by_id`), fed from the same two places: start-up recovery and acknowledged enqueues.
#[derive(Clone, Copy, Debug)]
struct IndexEntry {
    body_len: u64,
}

/// In-memory view of the spool, rebuilt from [`Storage::scan`] at start-up.
#[derive(Debug, Default)]
struct SpoolIndex {
    by_id: BTreeMap<QueueId, IndexEntry>,
    bytes: u64,
    /// When each message with undelivered recipients is next due (the delivery stage will take
    /// from it; see `docs/delivery.md`).
    due: DueIndex,
}

impl SpoolIndex {
    fn add(&mut self, id: QueueId, body_len: u64) {
        if let Some(old) = self.by_id.insert(id, IndexEntry { body_len }) {
            self.bytes -= old.body_len;
        }
        self.bytes += body_len;
    }

    fn add_meta(&mut self, meta: &SpooledMeta, now_ms: u64) {
        self.add(meta.id, meta.body_len);
        // Recipients left in flight by a crash are due at once (at-least-once delivery).
        if let Some(at) = schedule::next_due_ms(&meta.envelope, now_ms) {
            self.due.schedule(meta.id, at);
        }
    }
}

pub struct QueueActor {
    /// Kept for the delivery side (reads and removals), which will run on this actor too.
    storage: Arc<dyn Storage>,
    committer: Committer,
    index: SpoolIndex,
    recovered: u64,
    corrupt: u64,
}

impl QueueActor {
    /// Recovers the spool (scans it and indexes every message) and starts the committer thread.
    /// Damaged records are logged and counted but do not prevent start-up; an I/O error while
    /// scanning does, since the index would be incomplete.
    pub fn new(storage: Arc<dyn Storage>, config: QueueConfig) -> Result<Self, StorageError> {
        let span = info_span!("spool_recovery");
        let _entered = span.enter();
        let mut index = SpoolIndex::default();
        let mut corrupt = 0u64;
        let now = now_ms();
        for item in storage.scan() {
            match item {
                Ok(meta) => index.add_meta(&meta, now),
                Err(e @ StorageError::Corrupt { .. }) => {
                    warn!(error = %e, "skipping damaged spool record");
                    corrupt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        let recovered = index.by_id.len() as u64;
        info!(recovered, bytes = index.bytes, corrupt, "spool recovered");
        let committer = Committer::start(storage.clone(), config.commit)?;
        Ok(Self {
            storage,
            committer,
            index,
            recovered,
            corrupt,
        })
    }

    /// The spool this actor commits to.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn stats(&self) -> QueueStats {
        let c = &self.committer.counters;
        QueueStats {
            messages: self.index.by_id.len() as u64,
            bytes: self.index.bytes,
            recovered: self.recovered,
            scheduled: self.index.due.len() as u64,
            corrupt: self.corrupt,
            syncs: c.syncs.load(Ordering::Relaxed),
            committed: c.committed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

impl Actor for QueueActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Enqueue handling is quick (it hands off to the committer), but bursts of sessions
        // should not park on a 16-slot mailbox.
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<Enqueue> for QueueActor {
    type Result = ResponseActFuture<Self, Result<QueueId, SpoolError>>;

    fn handle(&mut self, Enqueue(msg): Enqueue, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.id;
        let body_len = msg.body.len() as u64;
        let span = info_span!("enqueue", queue_id = %id, bytes = body_len);
        let submitted = self.committer.submit(msg);
        let wait = async move {
            match submitted?.await {
                Ok(result) => result,
                // The committer dropped the reply unanswered: it is gone (panicked).
                Err(_) => Err(gone()),
            }
        }
        .instrument(span);
        Box::pin(wait.into_actor(self).map(move |result, act, _ctx| {
            // Index only what is durable, exactly what a restart would recover.
            result.map(|()| {
                act.index.add(id, body_len);
                act.index.due.schedule(id, now_ms());
                id
            })
        }))
    }
}

impl Handler<GetStats> for QueueActor {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.stats())
    }
}

/// Recovers the spool and starts a [`QueueActor`] on an arbiter (thread) of its own. Must be
/// called from within a running actix `System`.
pub fn spawn_queue(
    storage: Arc<dyn Storage>,
    config: QueueConfig,
) -> Result<Addr<QueueActor>, StorageError> {
    let actor = QueueActor::new(storage, config)?;
    let arbiter = Arbiter::new();
    let addr = QueueActor::start_in_arbiter(&arbiter.handle(), move |_| actor);
    // The arbiter keeps running after its handle is dropped; it stops with the System.
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled_storage::{key, SledOptions, SledStorage};
    use tern_message::{ClientInfo, Envelope};

    fn msg(body: &'static [u8]) -> InboundMessage {
        InboundMessage {
            id: QueueId::new(),
            envelope: Envelope::new("", vec![tern_message::Recipient::new("postmaster")]),
            client: ClientInfo::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:25".parse().unwrap(),
                "localhost",
            ),
            arrived_ms: 0,
            body: bytes::Bytes::from_static(body),
        }
    }

    #[test]
    fn recovery_skips_and_counts_damaged_records() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(
            dir.path(),
            SledOptions {
                min_free_bytes: 0,
                ..SledOptions::default()
            },
        )
        .unwrap();
        storage.insert(&msg(b"hello\r\n")).unwrap();
        storage.insert(&msg(b"")).unwrap();
        storage.put_raw(&key(b'm', QueueId::new(), 0), b"\xff garbage");
        let actor = QueueActor::new(Arc::new(storage), QueueConfig::default()).unwrap();
        let stats = actor.stats();
        assert_eq!((stats.recovered, stats.corrupt), (2, 1));
        assert_eq!((stats.messages, stats.bytes), (2, 7));
    }
}
