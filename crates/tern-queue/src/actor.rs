//! The queue actor: the stage sessions hand accepted messages to.
//!
//! `Enqueue` is answered only once the message is durable (see [`crate::committer`]); the actor
//! itself never touches the disk on its thread, it forwards the message to the committer and
//! awaits the committer's reply in a spawned actor future, so it keeps handling other messages
//! meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tern_message::{now_ms, DeliveryJob, InboundMessage, QueueId, SpoolError};
use tracing::{info, info_span, warn, Instrument};

use crate::client::QueueClient;
use crate::committer::{durable, CommitConfig, Committed, Committer};
use crate::delivery::Flight;
use crate::events::{Event, EventLog};
use crate::schedule::{self, DueIndex, RetryPolicy};
use crate::storage::{SpooledMeta, Storage, StorageError};

/// Enqueue handling is quick (it hands off to the committer), but bursts of sessions should not
/// park on actix's default 16-slot mailbox.
const MAILBOX_CAPACITY: usize = 1024;

/// How soon after a change delivery state (results, removals) is made durable and the delivery
/// log's buffered lines are written out: everything that changes meanwhile shares one sync
/// request and one write.
const STATE_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

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
    /// Messages handed to delivery and not reported back yet.
    pub in_flight: u64,
    pub delivery: DeliveryCounters,
}

/// Configuration of the queue actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub commit: CommitConfig,
    pub retry: RetryPolicy,
    /// Our host name: `Reporting-MTA` and `MAILER-DAEMON@hostname` in notifications, and the
    /// domain of a bare `postmaster` recipient.
    pub hostname: String,
    /// The delivery log (`<data_dir>/delivery.log`) and the suspended-domain list live here;
    /// `None` keeps them in memory only (tests of the spool alone).
    pub data_dir: Option<PathBuf>,
    /// Bounds on the messages handed to delivery and not yet reported back: they hold their
    /// bodies in memory.
    pub max_in_flight: usize,
    pub max_in_flight_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            commit: CommitConfig::default(),
            retry: RetryPolicy::default(),
            hostname: "localhost".into(),
            data_dir: None,
            max_in_flight: 10_000,
            max_in_flight_bytes: 512 << 20,
        }
    }
}

/// What the actor remembers about one spooled message: little, so a million queued messages
/// fit in memory; the envelope is read from the spool when the message is due.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexEntry {
    pub(crate) body_len: u64,
}

/// In-memory view of the spool, rebuilt from [`Storage::scan`] at start-up.
#[derive(Debug, Default)]
pub(crate) struct SpoolIndex {
    pub(crate) by_id: BTreeMap<QueueId, IndexEntry>,
    pub(crate) bytes: u64,
    /// When each message with undelivered recipients is next due.
    pub(crate) due: DueIndex,
}

impl SpoolIndex {
    pub(crate) fn add(&mut self, id: QueueId, body_len: u64) {
        if let Some(old) = self.by_id.insert(id, IndexEntry { body_len }) {
            self.bytes -= old.body_len;
        }
        self.bytes += body_len;
    }

    pub(crate) fn remove(&mut self, id: QueueId) {
        if let Some(old) = self.by_id.remove(&id) {
            self.bytes -= old.body_len;
        }
        self.due.remove(id);
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
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) committer: Committer,
    pub(crate) index: SpoolIndex,
    pub(crate) config: QueueConfig,
    recovered: u64,
    corrupt: u64,
    /// Where due work goes; `None` until [`AttachDelivery`] (or never, with delivery off).
    pub(crate) delivery: Option<actix::Recipient<DeliveryJob>>,
    /// Messages handed to delivery, waiting for their reports.
    pub(crate) in_flight: HashMap<QueueId, Flight>,
    pub(crate) in_flight_bytes: u64,
    /// Domains whose recipients are held (`tern queue suspend`).
    pub(crate) suspended: BTreeSet<String>,
    /// Messages an operator flushed (`tern queue flush`): at their next dispatch, deferred
    /// recipients (in these domains; `None`: all) are due whatever their retry time. Kept in
    /// memory only: a flush followed by a restart before the dispatch is lost.
    pub(crate) flushed: HashMap<QueueId, Option<BTreeSet<String>>>,
    /// One spool scan (`list`, `stats`, `flush`) at a time: a poller on a deep queue must not
    /// stack full-spool reads.
    pub(crate) scans: Arc<tokio::sync::Semaphore>,
    pub(crate) events: EventLog,
    /// The armed wake-up for the next due message: (when, timer).
    pub(crate) timer: Option<(u64, SpawnHandle)>,
    pub(crate) counters: DeliveryCounters,
    /// Delivery state was written since the last sync request.
    pub(crate) state_changed: bool,
    /// A write-out ([`WriteOut`]) is on its way.
    write_out_armed: bool,
    /// The actor's own address, for the write-out timer; weak, so that it does not keep the
    /// actor alive. `None` until started.
    me: Option<actix::WeakAddr<QueueActor>>,
    /// Where hard bounces go (the suppression list).
    pub(crate) suppression: Option<actix::Recipient<tern_message::HardBounce>>,
}

/// Delivery outcomes since start-up, for `/health` and `tern queue stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounters {
    pub delivered: u64,
    pub deferred: u64,
    pub failed: u64,
    pub expired: u64,
    pub dsn_sent: u64,
}

impl QueueActor {
    /// Recovers the spool (scans it and indexes every message) and starts the committer thread.
    /// Damaged records are logged and counted but do not prevent start-up; an I/O error while
    /// scanning does, since the index would be incomplete.
    ///
    /// `notify` is the actor's own mailbox, for the committer to hand it what it made durable.
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        config: QueueConfig,
        notify: Option<actix::Recipient<Committed>>,
    ) -> Result<Self, StorageError> {
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
        let committer = Committer::start(storage.clone(), config.commit, notify)?;
        let (events, suspended) = match &config.data_dir {
            Some(dir) => (
                EventLog::open(&dir.join("delivery.log"))?,
                crate::delivery::load_suspended(dir),
            ),
            None => (EventLog::disabled(), BTreeSet::new()),
        };
        Ok(Self {
            storage,
            committer,
            index,
            config,
            recovered,
            corrupt,
            delivery: None,
            in_flight: HashMap::new(),
            flushed: HashMap::new(),
            scans: Arc::new(tokio::sync::Semaphore::new(1)),
            in_flight_bytes: 0,
            suspended,
            events,
            timer: None,
            counters: DeliveryCounters::default(),
            state_changed: false,
            write_out_armed: false,
            me: None,
            suppression: None,
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
            in_flight: self.in_flight.len() as u64,
            delivery: self.counters,
        }
    }
}

impl Actor for QueueActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.me = Some(ctx.address().downgrade());
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // What changed in the last interval still reaches the committer, which finishes the
        // requests it has before it stops (an embedded queue; `tern serve` sends
        // [`WriteOutNow`] instead, as its queue's arbiter outlives the shutdown).
        self.sync_state();
        self.events.flush();
    }
}

/// Sent once at shutdown, after the sessions are gone: writes the delivery log out and makes
/// the latest delivery state durable before it answers. The process exits right after, so the
/// 20 ms write-out timer would be too late for what changed last.
#[derive(Message, Clone, Copy, Debug, Default)]
#[rtype(result = "()")]
pub struct WriteOutNow;

impl Handler<WriteOutNow> for QueueActor {
    type Result = ();

    fn handle(&mut self, _: WriteOutNow, _ctx: &mut Self::Context) {
        self.events.flush();
        self.state_changed = false;
        // Blocking, on purpose: nothing else is left for this thread to do.
        if let Err(e) = self.storage.sync() {
            warn!(error = %e, "final sync of the delivery state failed");
        }
    }
}

/// Time to hand the delivery state to the committer and write out the log lines.
#[derive(Message)]
#[rtype(result = "()")]
struct WriteOut;

impl Handler<WriteOut> for QueueActor {
    type Result = ();

    fn handle(&mut self, _: WriteOut, _ctx: &mut Self::Context) {
        self.write_out_armed = false;
        self.sync_state();
        self.events.flush();
    }
}

impl Handler<Enqueue> for QueueActor {
    type Result = ResponseActFuture<Self, Result<QueueId, SpoolError>>;

    fn handle(&mut self, Enqueue(msg): Enqueue, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.id;
        let body_len = msg.body.len() as u64;
        let span = info_span!("enqueue", queue_id = %id, bytes = body_len);
        // The committer indexes the message here by `Committed` once it is durable.
        let wait = durable(id, self.committer.submit(msg)).instrument(span);
        Box::pin(wait.into_actor(self))
    }
}

impl Handler<Committed> for QueueActor {
    type Result = ();

    /// Index only what is durable, exactly what a restart would recover. The messages come
    /// whole (the bodies are shared, not copied) so delivery can start without reading them
    /// back.
    fn handle(&mut self, Committed(msgs): Committed, ctx: &mut Self::Context) {
        for msg in msgs {
            self.accepted(msg, ctx);
        }
    }
}

impl QueueActor {
    /// Something was written that must reach the disk soon: delivery state (a sync request to
    /// the committer) or delivery log lines (a write to the file). One timer, armed by the
    /// first change, writes out everything that changed within [`STATE_SYNC_INTERVAL`]; neither
    /// is worth a syscall per message on the accept path. Armed only by a change, so an idle
    /// queue sleeps (a fixed 20 ms tick woke the thread 50 times a second for nothing).
    pub(crate) fn changed(&mut self) {
        if self.write_out_armed {
            return;
        }
        let Some(me) = self.me.as_ref().and_then(actix::WeakAddr::upgrade) else {
            // Not started yet (recovery, unit tests): `stopped` or the next change writes out.
            return;
        };
        self.write_out_armed = true;
        actix::spawn(async move {
            tokio::time::sleep(STATE_SYNC_INTERVAL).await;
            me.do_send(WriteOut);
        });
    }

    /// A message is durable: index it, log it and start its delivery.
    pub(crate) fn accepted(&mut self, msg: InboundMessage, ctx: &mut Context<Self>) {
        let id = msg.id;
        self.index.add(id, msg.body.len() as u64);
        self.events.log(&Event {
            ts_ms: now_ms(),
            event: "received",
            queue_id: id.to_string(),
            sender: Some(&msg.envelope.sender),
            recipients: Some(msg.envelope.recipients.len()),
            size: Some(msg.body.len() as u64),
            ip: Some(msg.client.addr.ip().to_string()),
            ..Event::default()
        });
        self.changed();
        if let Some(reason) = msg.envelope.hold.as_deref() {
            self.events.log(&Event {
                ts_ms: now_ms(),
                event: "held",
                queue_id: id.to_string(),
                reason: Some(reason),
                ..Event::default()
            });
            self.changed();
        } else if self.can_dispatch() {
            self.dispatch(id, Some(msg), now_ms(), ctx);
        } else {
            self.index.due.schedule(id, now_ms());
            self.arm_timer(ctx);
        }
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
    spawn_queue_with_client(storage, config).map(|(addr, _)| addr)
}

/// [`spawn_queue`], plus a [`QueueClient`] that submits messages straight to the committer
/// thread: for sessions in the same process, two thread hand-offs per message fewer than
/// going through the actor's mailbox.
pub fn spawn_queue_with_client(
    storage: Arc<dyn Storage>,
    config: QueueConfig,
) -> Result<(Addr<QueueActor>, QueueClient), StorageError> {
    // The arbiter keeps running after its handle is dropped; it stops with the System.
    spawn_queue_with_client_on(storage, config, &Arbiter::new().handle())
}

/// [`spawn_queue_with_client`] on a given arbiter, one that may run other actors too (the
/// binary puts the queue on the first session thread: see docs/architecture.md).
pub fn spawn_queue_with_client_on(
    storage: Arc<dyn Storage>,
    config: QueueConfig,
    arbiter: &ArbiterHandle,
) -> Result<(Addr<QueueActor>, QueueClient), StorageError> {
    // The mailbox exists before the actor, so the committer is born knowing where commits go
    // (what `Actor::start_in_arbiter` does, with the address taken first); it takes them
    // until the actor runs on its thread.
    let (tx, rx) = actix::dev::channel::channel(MAILBOX_CAPACITY);
    let addr = Addr::new(tx);
    let actor = QueueActor::new(storage, config, Some(addr.clone().recipient()))?;
    let submitter = actor.committer.submitter();
    // Held here too, so that a closure the arbiter refuses does not drop the actor: its
    // committer would wait for its thread, which waits for `submitter` to go.
    let slot = Arc::new(std::sync::Mutex::new(Some(actor)));
    let started = arbiter.spawn_fn({
        let slot = slot.clone();
        move || {
            let actor = slot.lock().ok().and_then(|mut a| a.take());
            if let Some(actor) = actor {
                let ctx = Context::with_receiver(rx);
                actix::spawn(ctx.into_future(actor));
            }
        }
    });
    if !started {
        drop(submitter);
        drop(slot);
        return Err(StorageError::Io(std::io::Error::other(
            "the queue's arbiter is not running",
        )));
    }
    Ok((addr, QueueClient::local(submitter)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled_storage::index_key;
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
        let storage = crate::sled_storage::open_for_test(dir.path());
        storage.insert(&msg(b"hello\r\n")).unwrap();
        storage.insert(&msg(b"")).unwrap();
        storage.put_raw(&index_key(QueueId::new()), b"\xff garbage");
        let actor = QueueActor::new(Arc::new(storage), QueueConfig::default(), None).unwrap();
        let stats = actor.stats();
        assert_eq!((stats.recovered, stats.corrupt), (2, 1));
        assert_eq!((stats.messages, stats.bytes), (2, 7));
    }
}
