//! Operator requests to the queue (`tern queue …` over the HTTP admin API): list, show, flush,
//! delete, hold/release a message, suspend/resume a domain, and counts by domain and state.
//! Like Postfix's `mailq`, `postqueue -f`, `postsuper -d/-h/-H` and KumoMTA's `kcli`.
//!
//! Listing reads the spool's metadata (not the bodies), so it costs a scan, made on a blocking
//! thread (the actor shares its thread with sessions); the in-memory state of messages in
//! flight takes precedence over what is stored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tern_message::{now_ms, ClientInfo, Envelope, QueueId, RecipientState};
use tracing::{info, warn};

use crate::actor::{DeliveryCounters, QueueActor};
use crate::delivery::{domain_of, save_suspended, Original};
use crate::events::Event;
use crate::schedule;
use crate::storage::{SpooledMeta, Storage};

/// One recipient as `tern queue list/show` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientSummary {
    pub address: String,
    pub domain: String,
    /// `pending`, `held`, `in-flight`, `deferred`, `delivered`, `failed`.
    pub state: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_attempt_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_reply: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSummary {
    pub id: String,
    pub sender: String,
    pub arrived_ms: u64,
    pub size: u64,
    /// Why the message is on hold, when it is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hold: Option<String>,
    pub recipients: Vec<RecipientSummary>,
}

/// `tern queue list`: messages with a recipient in `domain` and/or in `state`.
#[derive(Message, Clone, Debug, Default, Serialize, Deserialize)]
#[rtype(result = "Vec<MessageSummary>")]
pub struct ListMessages {
    pub domain: Option<String>,
    pub state: Option<String>,
    /// At most this many (0: no limit).
    pub limit: usize,
}

/// `tern queue show ID`: the summary, the client, and the header section.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Option<MessageDetail>")]
pub struct ShowMessage(pub QueueId);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDetail {
    #[serde(flatten)]
    pub summary: MessageSummary,
    pub client: ClientInfo,
    pub headers: String,
}

/// `tern queue flush [--domain D]`: everything deferred (in `domain`) is due now. Answers the
/// number of messages rescheduled.
#[derive(Message, Clone, Debug, Default, Serialize, Deserialize)]
#[rtype(result = "usize")]
pub struct Flush {
    pub domain: Option<String>,
}

/// `tern queue delete ID [--bounce]`. Answers whether the message was there.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "bool")]
pub struct DeleteMessage {
    pub id: QueueId,
    pub bounce: bool,
}

/// `tern queue hold ID` (`hold: true`, reason "operator") / `tern queue release ID`.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "HoldOutcome")]
pub struct HoldMessage {
    pub id: QueueId,
    pub hold: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldOutcome {
    /// Held, or released (and due now).
    Changed,
    /// Already in the state asked for (a held message keeps its first reason).
    Unchanged,
    NotFound,
    /// The new state could not be written; nothing changed.
    Failed,
}

/// `tern queue suspend DOMAIN` (`suspend: true`) / `resume DOMAIN`. Answers the suspended list.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Result<Vec<String>, String>")]
pub struct SuspendDomain {
    pub domain: String,
    pub suspend: bool,
}

/// `tern queue stats`.
#[derive(Message, Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[rtype(result = "QueueSummary")]
pub struct Summarize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSummary {
    pub messages: u64,
    pub bytes: u64,
    /// Recipients by state over the whole queue.
    pub by_state: BTreeMap<String, u64>,
    /// Recipients by domain, then state.
    pub by_domain: BTreeMap<String, BTreeMap<String, u64>>,
    pub suspended: Vec<String>,
    pub in_flight: u64,
    /// Messages on hold.
    #[serde(default)]
    pub held: u64,
    /// Outcomes since start-up.
    pub since_start: DeliveryCounters,
}

/// The recipient state names `list --state` accepts, in the order of a message's life.
pub const STATE_NAMES: [&str; 6] = [
    "pending",
    "held",
    "in-flight",
    "deferred",
    "delivered",
    "failed",
];

/// A recipient's state as operators see it: the waiting recipients of a held message are
/// `held`, whatever their retry state, since nothing will happen to them until a release.
fn state_name(state: &RecipientState, held: bool) -> &'static str {
    match state {
        RecipientState::Pending | RecipientState::Deferred { .. } if held => "held",
        RecipientState::Pending => "pending",
        RecipientState::InFlight { .. } => "in-flight",
        RecipientState::Deferred { .. } => "deferred",
        RecipientState::Delivered { .. } => "delivered",
        RecipientState::Failed { .. } => "failed",
    }
}

/// What a scan of the spool needs, taken from the actor so that the scan runs on a blocking
/// thread: on a deep queue it reads every message's metadata (seconds for a million), and the
/// actor shares its thread with SMTP sessions.
struct ScanView {
    storage: Arc<dyn Storage>,
    /// The envelopes of the messages in flight, which take precedence over the stored ones.
    in_flight: HashMap<QueueId, Envelope>,
    hostname: String,
}

impl QueueActor {
    fn scan_view(&self) -> ScanView {
        ScanView {
            storage: self.storage.clone(),
            in_flight: self
                .in_flight
                .iter()
                .map(|(id, flight)| (*id, flight.envelope.clone()))
                .collect(),
            hostname: self.config.hostname.clone(),
        }
    }

    /// Marks `id` flushed, for `domain` or (`None`) all, adding to an earlier mark.
    fn mark_flushed(&mut self, id: QueueId, domain: Option<&str>) {
        let mark = self
            .flushed
            .entry(id)
            .or_insert_with(|| Some(BTreeSet::new()));
        match (domain, mark.as_mut()) {
            (None, _) => *mark = None,
            (Some(d), Some(domains)) => {
                domains.insert(d.to_string());
            }
            (Some(_), None) => {}
        }
    }
}

impl ScanView {
    /// Every spooled message's metadata with the in-flight envelope in place of the stored one.
    fn current(&self) -> impl Iterator<Item = SpooledMeta> + '_ {
        self.storage.scan().filter_map(|item| match item {
            Ok(mut meta) => {
                if let Some(envelope) = self.in_flight.get(&meta.id) {
                    meta.envelope = envelope.clone();
                }
                Some(meta)
            }
            Err(e) => {
                warn!(error = %e, "skipping damaged spool record");
                None
            }
        })
    }
}

/// Runs a scan on tokio's blocking pool once it has its turn (see `QueueActor::scans`); a scan
/// that panicked answers `fallback`.
async fn off_thread<T: Send + 'static>(
    turns: Arc<tokio::sync::Semaphore>,
    scan: impl FnOnce() -> T + Send + 'static,
    fallback: T,
) -> T {
    let _turn = turns.acquire_owned().await;
    match tokio::task::spawn_blocking(scan).await {
        Ok(result) => result,
        Err(e) => {
            warn!(error = %e, "queue scan failed");
            fallback
        }
    }
}

fn summarize(meta: &SpooledMeta, hostname: &str) -> MessageSummary {
    let held = meta.envelope.hold.is_some();
    let recipients =
        meta.envelope
            .recipients
            .iter()
            .map(|r| {
                let (attempts, next, last) = match &r.state {
                    RecipientState::InFlight { attempts } => (*attempts, None, None),
                    RecipientState::Deferred {
                        next_attempt_ms,
                        attempts,
                        last_reply,
                    } => (*attempts, Some(*next_attempt_ms), Some(last_reply.clone())),
                    RecipientState::Delivered { reply, .. }
                    | RecipientState::Failed { reply, .. } => (0, None, Some(reply.clone())),
                    RecipientState::Pending => (0, None, None),
                };
                RecipientSummary {
                    address: r.address.clone(),
                    domain: domain_of(&r.address, hostname),
                    state: state_name(&r.state, held).to_string(),
                    attempts,
                    next_attempt_ms: next.filter(|_| !held),
                    last_reply: last,
                }
            })
            .collect();
    MessageSummary {
        id: meta.id.to_string(),
        sender: meta.envelope.sender.clone(),
        arrived_ms: meta.arrived_ms,
        size: meta.body_len,
        hold: meta.envelope.hold.clone(),
        recipients,
    }
}

fn wanted(summary: &MessageSummary, domain: Option<&str>, state: Option<&str>) -> bool {
    summary.recipients.iter().any(|r| {
        domain.is_none_or(|d| r.domain.eq_ignore_ascii_case(d.trim_end_matches('.')))
            && state.is_none_or(|s| r.state.eq_ignore_ascii_case(s))
    })
}

impl Handler<ListMessages> for QueueActor {
    type Result = ResponseFuture<Vec<MessageSummary>>;

    fn handle(&mut self, req: ListMessages, _ctx: &mut Self::Context) -> Self::Result {
        let view = self.scan_view();
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit
        };
        Box::pin(off_thread(
            self.scans.clone(),
            move || {
                view.current()
                    .map(|meta| summarize(&meta, &view.hostname))
                    .filter(|s| wanted(s, req.domain.as_deref(), req.state.as_deref()))
                    .take(limit)
                    .collect()
            },
            Vec::new(),
        ))
    }
}

impl Handler<ShowMessage> for QueueActor {
    type Result = Option<MessageDetail>;

    fn handle(&mut self, ShowMessage(id): ShowMessage, _ctx: &mut Self::Context) -> Self::Result {
        let msg = match self.storage.get(id) {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            Err(e) => {
                warn!(queue_id = %id, error = %e, "cannot read message");
                return None;
            }
        };
        let envelope = match self.in_flight.get(&id) {
            Some(flight) => flight.envelope.clone(),
            None => msg.envelope,
        };
        let meta = SpooledMeta {
            id,
            envelope,
            client: msg.client.clone(),
            arrived_ms: msg.arrived_ms,
            body_len: msg.body.len() as u64,
        };
        let end = msg
            .body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(msg.body.len(), |p| p + 2);
        Some(MessageDetail {
            summary: summarize(&meta, &self.config.hostname),
            client: msg.client,
            headers: String::from_utf8_lossy(&msg.body[..end]).into_owned(),
        })
    }
}

impl Handler<Flush> for QueueActor {
    type Result = ResponseActFuture<Self, usize>;

    /// Finds the waiting messages off the actor's thread, then marks them flushed and due now
    /// (dispatch treats their deferred recipients as due). Stored retry times are left alone:
    /// the attempt rewrites them anyway.
    fn handle(&mut self, req: Flush, _ctx: &mut Self::Context) -> Self::Result {
        let domain = req
            .domain
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        let view = self.scan_view();
        let wanted_domain = domain.clone();
        let scan = off_thread(
            self.scans.clone(),
            move || {
                view.current()
                    // A held message waits for `release`, not for a flush; one in flight is
                    // being tried right now.
                    .filter(|meta| {
                        meta.envelope.hold.is_none() && !view.in_flight.contains_key(&meta.id)
                    })
                    .filter(|meta| {
                        meta.envelope.recipients.iter().any(|r| {
                            matches!(
                                r.state,
                                RecipientState::Pending | RecipientState::Deferred { .. }
                            ) && wanted_domain
                                .as_deref()
                                .is_none_or(|d| domain_of(&r.address, &view.hostname) == d)
                        })
                    })
                    .map(|meta| meta.id)
                    .collect::<Vec<_>>()
            },
            Vec::new(),
        );
        Box::pin(scan.into_actor(self).map(move |ids, act, ctx| {
            let now = now_ms();
            let mut flushed = 0;
            for id in ids {
                // Delivered, deleted or dispatched since the scan: nothing to hurry.
                if act.in_flight.contains_key(&id) || !act.index.by_id.contains_key(&id) {
                    continue;
                }
                act.mark_flushed(id, domain.as_deref());
                act.index.due.schedule(id, now);
                flushed += 1;
            }
            info!(messages = flushed, domain = ?domain, "queue flushed");
            act.pump(ctx);
            flushed
        }))
    }
}

impl Handler<DeleteMessage> for QueueActor {
    type Result = bool;

    fn handle(&mut self, req: DeleteMessage, ctx: &mut Self::Context) -> bool {
        if let Some(flight) = self.in_flight.get_mut(&req.id) {
            // Deleted when its round ends: the remote servers may be taking it right now.
            flight.delete = Some(req.bounce);
            return true;
        }
        let msg = match self.storage.get(req.id) {
            Ok(Some(msg)) => msg,
            Ok(None) => return false,
            Err(e) => {
                warn!(queue_id = %req.id, error = %e, "cannot read message to delete");
                // Still removable: the operator may be deleting it because it is damaged.
                self.index.remove(req.id);
                self.flushed.remove(&req.id);
                let removed = self.storage.remove(req.id).is_ok();
                self.state_changed = true;
                self.changed();
                return removed;
            }
        };
        let original = Original {
            id: req.id,
            envelope: &msg.envelope,
            client: &msg.client,
            arrived_ms: msg.arrived_ms,
            body: &msg.body,
        };
        self.delete_now(original, req.bounce, ctx);
        true
    }
}

impl Handler<SuspendDomain> for QueueActor {
    type Result = Result<Vec<String>, String>;

    fn handle(&mut self, req: SuspendDomain, ctx: &mut Self::Context) -> Self::Result {
        let domain = req.domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() {
            return Err("empty domain".into());
        }
        let changed = if req.suspend {
            self.suspended.insert(domain.clone())
        } else {
            self.suspended.remove(&domain)
        };
        if changed {
            if let Some(dir) = &self.config.data_dir {
                save_suspended(dir, &self.suspended)
                    .map_err(|e| format!("cannot save the suspended-domain list: {e}"))?;
            }
            info!(%domain, suspended = req.suspend, "domain delivery suspension changed");
            if !req.suspend {
                // Its mail waited; send it now.
                ctx.notify(Flush {
                    domain: Some(domain),
                });
            }
        }
        Ok(self.suspended.iter().cloned().collect())
    }
}

impl Handler<Summarize> for QueueActor {
    type Result = ResponseFuture<QueueSummary>;

    fn handle(&mut self, _: Summarize, _ctx: &mut Self::Context) -> Self::Result {
        let mut summary = QueueSummary {
            messages: self.index.by_id.len() as u64,
            bytes: self.index.bytes,
            suspended: self.suspended.iter().cloned().collect(),
            in_flight: self.in_flight.len() as u64,
            since_start: self.counters,
            ..QueueSummary::default()
        };
        let view = self.scan_view();
        let fallback = summary.clone();
        Box::pin(off_thread(
            self.scans.clone(),
            move || {
                for meta in view.current() {
                    let held = meta.envelope.hold.is_some();
                    summary.held += u64::from(held);
                    for r in &meta.envelope.recipients {
                        let state = state_name(&r.state, held).to_string();
                        *summary.by_state.entry(state.clone()).or_default() += 1;
                        *summary
                            .by_domain
                            .entry(domain_of(&r.address, &view.hostname))
                            .or_default()
                            .entry(state)
                            .or_default() += 1;
                    }
                }
                summary
            },
            fallback,
        ))
    }
}

impl Handler<HoldMessage> for QueueActor {
    type Result = MessageResult<HoldMessage>;

    fn handle(&mut self, req: HoldMessage, ctx: &mut Self::Context) -> Self::Result {
        let now = now_ms();
        let id = req.id;
        let mut stored = match self.storage.get(id) {
            Ok(Some(msg)) => msg.envelope,
            Ok(None) => return MessageResult(HoldOutcome::NotFound),
            Err(e) => {
                warn!(queue_id = %id, error = %e, "cannot read message to hold or release");
                return MessageResult(HoldOutcome::Failed);
            }
        };
        // A round under way works on its own copy of the envelope (recipients marked in
        // flight); that copy says whether anything changes, and the state written at the
        // round's end carries the change (a held message is not rescheduled).
        let mut flight = self.in_flight.get(&id).map(|f| f.envelope.clone());
        let changed = match flight.as_mut() {
            Some(live) => set_hold(live, req.hold, now),
            None => set_hold(&mut stored, req.hold, now),
        };
        if !changed {
            return MessageResult(HoldOutcome::Unchanged);
        }
        if flight.is_some() {
            // The stored copy too, with its recipient states as they were: a crash before the
            // round ends must not lose the operator's hold.
            set_hold(&mut stored, req.hold, now);
        }
        if let Err(e) = self.storage.update_envelope(id, &stored) {
            warn!(queue_id = %id, error = %e, "cannot write the hold state");
            return MessageResult(HoldOutcome::Failed);
        }
        // Made durable by the next state sync (within 20 ms), like any delivery state.
        self.state_changed = true;
        self.changed();
        self.log_hold(id, req.hold, now);
        match flight {
            Some(live) => {
                if let Some(f) = self.in_flight.get_mut(&id) {
                    f.envelope = live;
                }
            }
            None => {
                match schedule::next_due_ms(&stored, now) {
                    Some(at) => self.index.due.schedule(id, at),
                    None => self.index.due.remove(id),
                }
                self.pump(ctx);
            }
        }
        MessageResult(HoldOutcome::Changed)
    }
}

/// The operator's hold (or release) applied to `envelope`; whether it changed anything.
fn set_hold(envelope: &mut Envelope, hold: bool, now: u64) -> bool {
    if hold {
        if envelope.hold.is_some() {
            return false;
        }
        envelope.hold = Some("operator".into());
        true
    } else {
        schedule::release(envelope, now)
    }
}

impl QueueActor {
    fn log_hold(&mut self, id: QueueId, hold: bool, now: u64) {
        info!(queue_id = %id, hold, "message hold changed by the operator");
        self.events.log(&Event {
            ts_ms: now,
            event: if hold { "held" } else { "released" },
            queue_id: id.to_string(),
            reason: hold.then_some("operator"),
            ..Event::default()
        });
        self.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::QueueConfig;

    #[test]
    fn flush_marks_add_up_and_all_domains_wins() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::sled_storage::open_for_test(dir.path());
        let mut actor = QueueActor::new(Arc::new(storage), QueueConfig::default(), None).unwrap();
        let (a, b) = (QueueId::new(), QueueId::new());
        actor.mark_flushed(a, Some("one.test"));
        actor.mark_flushed(a, Some("two.test"));
        let domains: BTreeSet<String> = ["one.test", "two.test"].map(String::from).into();
        assert_eq!(actor.flushed[&a], Some(domains));
        // A flush of everything, then of one domain (a `resume`): still everything.
        actor.mark_flushed(b, None);
        actor.mark_flushed(b, Some("one.test"));
        assert_eq!(actor.flushed[&b], None);
        actor.mark_flushed(a, None);
        assert_eq!(actor.flushed[&a], None);
    }
}
