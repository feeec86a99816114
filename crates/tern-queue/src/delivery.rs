//! The queue actor's delivery side: it takes due messages from the due-time index, hands their
//! recipients to the delivery stage grouped by domain, and applies the reports that come back
//! (retry schedule, removal when every recipient is final, delivery status notifications).
//!
//! State changes are written with [`Storage::update_envelope`] / [`Storage::remove`] and become
//! durable with the next group commit (or sled's own periodic flush): losing one in a crash only
//! repeats an attempt. The one ordering that matters is that a notification is durably spooled
//! before the state that caused it is written, so a crash can repeat a DSN but never lose it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use actix::prelude::*;
use bytes::Bytes;
use tern_bounce::{Action, DsnRequest, RecipientReport};
use tern_message::{
    now_ms, AttemptResult, BodyType, ClientInfo, DeliveryJob, DeliveryReport, Envelope, HardBounce,
    InboundMessage, Notify, QueueId, Recipient, RecipientState, Ret,
};
use tracing::{debug, info, warn};

use crate::actor::QueueActor;
use crate::committer::durable;
use crate::events::Event;
use crate::schedule::{self, Transition};
use crate::storage::StorageError;

/// Messages one [`QueueActor::pump`] turn dispatches at most (≈ 51,000 a second with the
/// timer's 5 ms floor, above what delivery takes).
const PUMP_TURN: usize = 256;

/// How long a message whose only due recipients are in suspended domains waits before it is
/// looked at again.
const SUSPENDED_RECHECK_MS: u64 = 60_000;

/// Gives the queue the delivery stage to send due work to. Until it arrives, messages are only
/// spooled (`delivery.enabled = false` never sends it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachDelivery(pub actix::Recipient<DeliveryJob>);

/// Gives the queue the stage that keeps the suppression list: permanent "bad mailbox"
/// failures (5.1.x) are reported to it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachSuppression(pub actix::Recipient<HardBounce>);

/// A message handed to delivery: its current envelope (recipient states are updated here as
/// reports come in) and body, until every job has reported.
pub(crate) struct Flight {
    arrived_ms: u64,
    client: ClientInfo,
    pub(crate) envelope: Envelope,
    body: Bytes,
    /// Recipients (indices) not reported yet. A job may be answered in several reports (one
    /// per SMTP transaction), so the round ends with the last recipient, not the last report.
    /// Empty while the message is still in flight: the round's notification is being spooled
    /// (it stays in flight until then, so an operator's hold or delete meanwhile lands on this
    /// copy, which is the one written).
    outstanding: BTreeSet<usize>,
    /// What happened to each recipient in this round, for the notification.
    transitions: Vec<(usize, Transition)>,
    /// Per recipient index: the remote host that answered, and whether it speaks DSN.
    remote: BTreeMap<usize, (String, bool)>,
    /// `tern queue delete` arrived while in flight: delete when the round ends (bounce?).
    pub(crate) delete: Option<bool>,
}

/// The domain a recipient is routed by: the part after the last `@`, lowercased; a bare
/// `postmaster` is ours (RFC 5321 §4.5.1).
pub(crate) fn domain_of(address: &str, hostname: &str) -> String {
    match address.rsplit_once('@') {
        Some((_, domain)) => domain.trim_end_matches('.').to_ascii_lowercase(),
        None => hostname.to_ascii_lowercase(),
    }
}

/// Attempts made before the current one.
fn attempts(state: &RecipientState) -> u32 {
    match state {
        RecipientState::InFlight { attempts } | RecipientState::Deferred { attempts, .. } => {
            *attempts
        }
        _ => 0,
    }
}

impl QueueActor {
    pub(crate) fn can_dispatch(&self) -> bool {
        self.delivery.is_some()
            && self.in_flight.len() < self.config.max_in_flight
            && self.in_flight_bytes < self.config.max_in_flight_bytes
    }

    /// Hands every due message to delivery, as far as the in-flight bounds allow, then arms the
    /// timer for the next due time.
    pub(crate) fn pump(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        // At most PUMP_TURN messages a turn (each a body read): the actor shares its thread
        // with SMTP sessions, and a deep queue after a restart or a flush has up to
        // `max_in_flight` due at once. The timer's floor brings the next turn in 5 ms.
        let mut left = PUMP_TURN;
        while left > 0 && self.can_dispatch() {
            let ids = self.index.due.take_due(now, left.min(64));
            if ids.is_empty() {
                break;
            }
            left -= ids.len();
            for id in ids {
                self.dispatch(id, None, now, ctx);
            }
        }
        self.arm_timer(ctx);
    }

    /// Makes sure the actor wakes up when the next message is due.
    pub(crate) fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        if self.delivery.is_none() {
            return;
        }
        let Some(next) = self.index.due.next_due_ms() else {
            return;
        };
        if let Some((at, handle)) = self.timer {
            if at <= next {
                return;
            }
            ctx.cancel_future(handle);
        }
        // Reports wake the pump when in-flight bounds were the limit, so the timer only
        // handles time; the floor keeps a busy queue from spinning.
        let delay = next.saturating_sub(now_ms()).max(5);
        let handle = ctx.run_later(std::time::Duration::from_millis(delay), |act, ctx| {
            act.timer = None;
            act.pump(ctx);
        });
        self.timer = Some((next, handle));
    }

    /// Starts a delivery round for one message: its due recipients, grouped by domain, one job
    /// per domain. `msg` is the message when the caller has it in memory (just enqueued).
    pub(crate) fn dispatch(
        &mut self,
        id: QueueId,
        msg: Option<InboundMessage>,
        now: u64,
        ctx: &mut Context<Self>,
    ) {
        if self.in_flight.contains_key(&id) {
            return;
        }
        let flushed = self.flushed.remove(&id);
        let msg = match msg {
            Some(msg) => msg,
            None => match self.storage.get(id) {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    // Deleted meanwhile.
                    self.index.remove(id);
                    return;
                }
                Err(e) => {
                    // Left in the spool for inspection (`tern spool list`), not retried.
                    warn!(queue_id = %id, error = %e, "cannot read a due message; skipped");
                    return;
                }
            },
        };
        if msg.envelope.hold.is_some() {
            // Held after it was scheduled (or a stale entry): it waits for `release`, not for
            // a time, so it leaves the due index altogether.
            self.index.due.remove(id);
            return;
        }
        let Some(delivery) = self.delivery.clone() else {
            self.index.due.schedule(id, now);
            return;
        };
        let InboundMessage {
            envelope,
            body,
            arrived_ms,
            client,
            ..
        } = msg;
        let mut envelope = envelope;

        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut held = false;
        for (i, rcpt) in envelope.recipients.iter().enumerate() {
            let due = match &rcpt.state {
                RecipientState::Pending | RecipientState::InFlight { .. } => true,
                RecipientState::Deferred {
                    next_attempt_ms, ..
                } => {
                    *next_attempt_ms <= now
                        || flushed.as_ref().is_some_and(|only| {
                            only.as_ref().is_none_or(|domains| {
                                domains.contains(&domain_of(&rcpt.address, &self.config.hostname))
                            })
                        })
                }
                RecipientState::Delivered { .. } | RecipientState::Failed { .. } => false,
            };
            if !due {
                continue;
            }
            let domain = domain_of(&rcpt.address, &self.config.hostname);
            if self.suspended.contains(&domain) {
                held = true;
                continue;
            }
            groups.entry(domain).or_default().push(i);
        }
        if groups.is_empty() {
            // Nothing to do now: wait for the next deferred recipient, or look again later at
            // the suspended ones.
            let next = schedule::next_due_ms(&envelope, now)
                .filter(|&t| t > now || !held)
                .map(|t| {
                    if held {
                        t.min(now + SUSPENDED_RECHECK_MS)
                    } else {
                        t
                    }
                })
                .or(held.then_some(now + SUSPENDED_RECHECK_MS));
            match next {
                Some(at) => self.index.due.schedule(id, at.max(now + 1)),
                None => debug!(queue_id = %id, "nothing left to deliver"),
            }
            return;
        }

        let mut jobs = Vec::with_capacity(groups.len());
        for (domain, indices) in groups {
            let mut attempt = 1;
            let mut recipients: Vec<Recipient> = Vec::with_capacity(indices.len());
            for &i in &indices {
                let rcpt = &mut envelope.recipients[i];
                attempt = attempt.max(attempts(&rcpt.state) + 1);
                schedule::start_attempt(rcpt);
                recipients.push(rcpt.clone());
            }
            jobs.push(DeliveryJob {
                id,
                domain,
                envelope: envelope.with_recipients(recipients),
                rcpt_index: indices,
                body: body.clone(),
                attempt,
            });
        }
        self.in_flight_bytes += body.len() as u64;
        self.in_flight.insert(
            id,
            Flight {
                arrived_ms,
                client,
                envelope,
                body,
                outstanding: jobs
                    .iter()
                    .flat_map(|j| j.rcpt_index.iter().copied())
                    .collect(),
                transitions: Vec::new(),
                remote: BTreeMap::new(),
                delete: None,
            },
        );
        for job in jobs {
            if let Err(e) = delivery.try_send(job) {
                let job = match e {
                    SendError::Full(job) => {
                        // A burst: queue it anyway; the in-flight bound limits the backlog.
                        delivery.do_send(job);
                        continue;
                    }
                    SendError::Closed(job) => job,
                };
                warn!(queue_id = %id, "delivery stage unavailable; deferring");
                let unavailable = AttemptResult::Temporary {
                    reply: "4.3.0 delivery stage unavailable".into(),
                };
                let report = DeliveryReport::for_every_recipient(&job, unavailable, now_ms());
                // The last job answered this way ends the round like any report would.
                if let Some(id) = self.apply_report(report) {
                    self.finish(id, ctx);
                }
            }
        }
    }

    /// Applies a report's results; returns the id when its round is complete.
    fn apply_report(&mut self, report: DeliveryReport) -> Option<QueueId> {
        let Some(flight) = self
            .in_flight
            .get_mut(&report.id)
            .filter(|f| !f.outstanding.is_empty())
        else {
            warn!(queue_id = %report.id, "report for a message not in flight; ignored");
            return None;
        };
        let now = now_ms();
        let latency = report.finished_ms.saturating_sub(report.started_ms);
        let ip = report.remote.as_ref().map(|r| r.addr.ip().to_string());
        for (i, result) in report.results {
            if !flight.outstanding.remove(&i) {
                // Only one answer per recipient and round counts.
                warn!(queue_id = %report.id, index = i,
                    "report for a recipient not in flight (or already reported); ignored");
                continue;
            }
            let Some(rcpt) = flight.envelope.recipients.get_mut(i) else {
                warn!(queue_id = %report.id, index = i, "report for an unknown recipient");
                continue;
            };
            let attempt = attempts(&rcpt.state) + 1;
            let reply = result.reply().to_string();
            let transition =
                schedule::record_attempt(rcpt, result, flight.arrived_ms, now, &self.config.retry);
            let (event, next) = match &transition {
                Transition::Delivered => {
                    self.counters.delivered += 1;
                    ("delivered", None)
                }
                Transition::Deferred { next_attempt_ms } => {
                    self.counters.deferred += 1;
                    ("deferred", Some(*next_attempt_ms))
                }
                Transition::Failed => {
                    self.counters.failed += 1;
                    // RFC 3463 X.1.x: the address itself is bad (no such user, bad domain,
                    // null MX): mailing it again is pointless and hurts the sender's name.
                    let status =
                        tern_bounce::status_from_reply(&reply, tern_bounce::Action::Failed);
                    if status.starts_with("5.1.") {
                        if let Some(to) = &self.suppression {
                            to.do_send(HardBounce {
                                address: rcpt.address.clone(),
                                reply: reply.clone(),
                                at_ms: now,
                            });
                        }
                    }
                    ("failed", None)
                }
                Transition::Expired => {
                    self.counters.expired += 1;
                    ("expired", None)
                }
            };
            self.events.log(&Event {
                ts_ms: now,
                event,
                queue_id: report.id.to_string(),
                recipient: Some(&rcpt.address),
                domain: Some(&report.domain),
                mx: report.remote.as_ref().map(|r| r.host.as_str()),
                ip: ip.clone(),
                tls: report.remote.as_ref().and_then(|r| r.tls.as_deref()),
                reply: Some(&reply),
                attempt: Some(attempt),
                latency_ms: Some(latency),
                next_attempt_ms: next,
                ..Event::default()
            });
            if let Some(remote) = &report.remote {
                flight.remote.insert(i, (remote.host.clone(), remote.dsn));
            }
            flight.transitions.push((i, transition));
        }
        let done = flight.outstanding.is_empty();
        // The lines logged above.
        self.changed();
        done.then_some(report.id)
    }

    /// A round is over: notify the sender if needed, then write the new state.
    fn finish(&mut self, id: QueueId, ctx: &mut Context<Self>) {
        let Some(mut flight) = self.in_flight.remove(&id) else {
            return;
        };
        let now = now_ms();
        let dsn = match flight.delete {
            Some(_) => None,
            None => self.notification(id, &mut flight, now),
        };
        let Some(dsn) = dsn else {
            self.land(id, flight, true, ctx);
            return;
        };
        self.in_flight.insert(id, flight);
        self.send_dsn(dsn, ctx, move |act, ok, ctx| {
            if let Some(flight) = act.in_flight.remove(&id) {
                act.land(id, flight, ok, ctx);
            }
        });
    }

    /// The end of a round, out of flight: the deletion asked for meanwhile, or the new state
    /// written (`notified`: the round's notification, if it needed one, is spooled).
    fn land(&mut self, id: QueueId, flight: Flight, notified: bool, ctx: &mut Context<Self>) {
        self.in_flight_bytes -= flight.body.len() as u64;
        if let Some(bounce) = flight.delete {
            let original = Original {
                id,
                envelope: &flight.envelope,
                client: &flight.client,
                arrived_ms: flight.arrived_ms,
                body: &flight.body,
            };
            self.delete_now(original, bounce, ctx);
        } else if notified {
            self.persist(id, &flight.envelope, now_ms());
        } else {
            // The stored state still has these recipients due: they are tried (and
            // reported) again instead of being final without a notification.
            self.index.due.schedule(id, now_ms() + SUSPENDED_RECHECK_MS);
        }
    }

    /// Spools a notification (through the group committer like any message), then runs `then`
    /// with whether it is durable.
    pub(crate) fn send_dsn<F>(&mut self, dsn: InboundMessage, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, bool, &mut Context<Self>) + 'static,
    {
        // Indexed and dispatched by the committer's `Committed`, like any message.
        let wait = durable(dsn.id, self.committer.submit(dsn));
        ctx.spawn(wait.into_actor(self).map(move |result, act, ctx| {
            let ok = match result {
                Ok(_) => {
                    act.counters.dsn_sent += 1;
                    true
                }
                Err(e) => {
                    warn!(error = %e, "cannot spool a delivery status notification");
                    false
                }
            };
            then(act, ok, ctx);
            act.pump(ctx);
        }));
    }

    /// Writes a message's state after a round: removed when every recipient is final, else
    /// updated and rescheduled.
    pub(crate) fn persist(&mut self, id: QueueId, envelope: &Envelope, now: u64) {
        let result: Result<(), StorageError> = if schedule::is_complete(envelope) {
            self.index.remove(id);
            self.storage.remove(id)
        } else {
            match schedule::next_due_ms(envelope, now) {
                Some(at) => self.index.due.schedule(id, at),
                None => self.index.due.remove(id),
            }
            self.storage.update_envelope(id, envelope).map(|_| ())
        };
        if let Err(e) = result {
            // The spool keeps the earlier state: the attempt is repeated after a restart.
            warn!(queue_id = %id, error = %e, "cannot write delivery state");
        }
        self.state_changed = true;
        self.changed();
    }

    /// Makes the state changes of the last few milliseconds durable together: a removal that
    /// is not durable makes a crash deliver the message again. Batched so a busy queue pays
    /// one sync per 20 ms, not one per message; called by the timer a change arms
    /// (`changed`) and when the actor stops.
    pub(crate) fn sync_state(&mut self) {
        if std::mem::take(&mut self.state_changed) {
            self.committer.request_sync();
        }
    }

    /// The notification this round calls for, if any: failures and expiries (unless
    /// NOTIFY=NEVER or the sender is null), successes with NOTIFY=SUCCESS to a server that
    /// does not speak DSN (one that does takes the duty over: RFC 3461 §6.2.1), and one delay
    /// warning once the message is older than `delay_warning`.
    fn notification(
        &mut self,
        id: QueueId,
        flight: &mut Flight,
        now: u64,
    ) -> Option<InboundMessage> {
        let sender = flight.envelope.sender.clone();
        let mut reports = Vec::new();
        let mut actions: BTreeSet<&'static str> = BTreeSet::new();
        for (i, transition) in &flight.transitions {
            let rcpt = &flight.envelope.recipients[*i];
            let action = match transition {
                Transition::Failed | Transition::Expired => Action::Failed,
                Transition::Delivered => match flight.remote.get(i) {
                    Some((_, true)) => continue,
                    _ => Action::Relayed,
                },
                Transition::Deferred { .. } => continue,
            };
            if !tern_bounce::should_notify(&sender, rcpt.notify, action) {
                continue;
            }
            let Some(mut report) = RecipientReport::from_state(rcpt) else {
                continue;
            };
            report.action = action;
            report.remote_mta = flight.remote.get(i).map(|(host, _)| host.clone());
            actions.insert(action.as_str());
            reports.push(report);
        }
        let retry = &self.config.retry;
        if !flight.envelope.delay_warned && retry.delay_warning_due(flight.arrived_ms, now) {
            let until = flight.arrived_ms + retry.max_lifetime.as_millis() as u64;
            let mut warned = false;
            for (i, rcpt) in flight.envelope.recipients.iter().enumerate() {
                if !matches!(rcpt.state, RecipientState::Deferred { .. })
                    || !tern_bounce::should_notify(&sender, rcpt.notify, Action::Delayed)
                {
                    continue;
                }
                let Some(mut report) = RecipientReport::from_state(rcpt) else {
                    continue;
                };
                report.will_retry_until_ms = Some(until);
                report.remote_mta = flight.remote.get(&i).map(|(host, _)| host.clone());
                actions.insert(Action::Delayed.as_str());
                reports.push(report);
                warned = true;
            }
            if warned {
                flight.envelope.delay_warned = true;
            }
        }
        if reports.is_empty() {
            return None;
        }
        let action = actions.into_iter().collect::<Vec<_>>().join(",");
        let original = Original {
            id,
            envelope: &flight.envelope,
            client: &flight.client,
            arrived_ms: flight.arrived_ms,
            body: &flight.body,
        };
        self.build_dsn(&original, reports, &action, now)
    }

    /// One notification about `original` for `reports`: the RFC 3464 report (tern-bounce), its
    /// envelope from `<>`, and the `bounce-sent` log line. `None` (logged) when the report
    /// cannot be built.
    fn build_dsn(
        &mut self,
        original: &Original<'_>,
        reports: Vec<RecipientReport>,
        action: &str,
        now: u64,
    ) -> Option<InboundMessage> {
        let id = original.id;
        let queue_id = id.to_string();
        let envid = original
            .envelope
            .envid
            .as_deref()
            .and_then(tern_smtp::xtext::decode);
        let request = DsnRequest {
            reporting_mta: &self.config.hostname,
            postmaster: format!("MAILER-DAEMON@{}", self.config.hostname),
            original_sender: &original.envelope.sender,
            envid: envid.as_deref(),
            arrived_ms: original.arrived_ms,
            queue_id: &queue_id,
            recipients: reports,
            ret: original.envelope.ret,
            original: original.body,
            now_ms: now,
        };
        let content = match tern_bounce::build(&request) {
            Ok(content) => content,
            Err(e) => {
                warn!(queue_id = %id, error = %e, "cannot build a delivery status notification");
                return None;
            }
        };
        let dsn = self.dsn_message(original.envelope, original.client, content, now);
        info!(queue_id = %id, dsn_id = %dsn.id, %action, "delivery status notification");
        self.events.log(&Event {
            ts_ms: now,
            event: "bounce-sent",
            queue_id,
            recipient: Some(&original.envelope.sender),
            dsn_id: Some(dsn.id.to_string()),
            action: Some(action),
            ..Event::default()
        });
        self.changed();
        Some(dsn)
    }

    /// The envelope of a notification about `original`: from the null sender (so it can never
    /// bounce again, RFC 5321 §4.5.5) to the original sender.
    pub(crate) fn dsn_message(
        &self,
        original: &Envelope,
        client: &ClientInfo,
        content: Vec<u8>,
        now: u64,
    ) -> InboundMessage {
        let mut rcpt = Recipient::new(original.sender.clone());
        rcpt.notify = Some(Notify::NEVER);
        let mut envelope = Envelope::new("", vec![rcpt]);
        // A returned 8-bit original (RET=FULL) keeps the report 8-bit; the address may need
        // SMTPUTF8 like the original did.
        if original.ret == Some(Ret::Full) && original.body_type != BodyType::SevenBit {
            envelope.body_type = BodyType::EightBitMime;
        }
        envelope.smtputf8 = original.smtputf8;
        InboundMessage {
            id: QueueId::new(),
            envelope,
            client: ClientInfo {
                helo: self.config.hostname.clone(),
                tls: None,
                auth_user: None,
                ..client.clone()
            },
            arrived_ms: now,
            body: Bytes::from(content),
        }
    }

    /// Removes a message on the operator's word; with `bounce`, the sender is told about the
    /// recipients not yet final (5.0.0, "deleted by the operator").
    pub(crate) fn delete_now(
        &mut self,
        original: Original<'_>,
        bounce: bool,
        ctx: &mut Context<Self>,
    ) {
        let now = now_ms();
        let id = original.id;
        self.index.remove(id);
        self.flushed.remove(&id);
        if let Err(e) = self.storage.remove(id) {
            warn!(queue_id = %id, error = %e, "cannot delete message");
            return;
        }
        self.state_changed = true;
        self.changed();
        self.events.log(&Event {
            ts_ms: now,
            event: "deleted",
            queue_id: id.to_string(),
            sender: Some(&original.envelope.sender),
            ..Event::default()
        });
        if !bounce {
            return;
        }
        let sender = &original.envelope.sender;
        let reports: Vec<RecipientReport> = original
            .envelope
            .recipients
            .iter()
            .filter(|r| {
                !matches!(
                    r.state,
                    RecipientState::Delivered { .. } | RecipientState::Failed { .. }
                ) && tern_bounce::should_notify(sender, r.notify, Action::Failed)
            })
            .map(|r| {
                let mut report = RecipientReport::new(
                    r,
                    Action::Failed,
                    "5.0.0 message deleted from the queue by the operator",
                );
                report.last_attempt_ms = Some(now);
                report
            })
            .collect();
        if reports.is_empty() {
            return;
        }
        if let Some(dsn) = self.build_dsn(&original, reports, Action::Failed.as_str(), now) {
            self.send_dsn(dsn, ctx, |_, _, _| {});
        }
    }
}

/// The message a notification is about.
pub(crate) struct Original<'a> {
    pub(crate) id: QueueId,
    pub(crate) envelope: &'a Envelope,
    pub(crate) client: &'a ClientInfo,
    pub(crate) arrived_ms: u64,
    pub(crate) body: &'a [u8],
}

impl Handler<AttachDelivery> for QueueActor {
    type Result = ();

    fn handle(&mut self, AttachDelivery(delivery): AttachDelivery, ctx: &mut Self::Context) {
        self.delivery = Some(delivery);
        self.pump(ctx);
    }
}

impl Handler<AttachSuppression> for QueueActor {
    type Result = ();

    fn handle(&mut self, AttachSuppression(to): AttachSuppression, _ctx: &mut Self::Context) {
        self.suppression = Some(to);
    }
}

impl Handler<DeliveryReport> for QueueActor {
    type Result = ();

    fn handle(&mut self, report: DeliveryReport, ctx: &mut Self::Context) {
        if let Some(id) = self.apply_report(report) {
            self.finish(id, ctx);
        }
        // A finished round may have made room in flight.
        self.pump(ctx);
    }
}

const SUSPENDED_FILE: &str = "suspended-domains.json";

pub(crate) fn load_suspended(dir: &Path) -> BTreeSet<String> {
    let path = dir.join(SUSPENDED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "unreadable suspended-domain list; ignored");
            BTreeSet::new()
        }),
        Err(_) => BTreeSet::new(),
    }
}

pub(crate) fn save_suspended(dir: &Path, domains: &BTreeSet<String>) -> std::io::Result<()> {
    let path = dir.join(SUSPENDED_FILE);
    let tmp = dir.join(format!("{SUSPENDED_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(domains)?)?;
    std::fs::rename(tmp, path)
}
