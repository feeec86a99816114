//! The delivery scheduler's pure core: when a recipient is tried again, what an attempt's result
//! does to its state, and which messages are due. No I/O and no clock — every function takes
//! `now_ms` — so the queue actor stays a thin shell around it and the rules are tested here.
//!
//! The rules follow the operators' expectations set by Postfix and the project's brief:
//! * a temporary failure is retried on a schedule (`["1m", "5m", "15m"]`, the last interval
//!   repeating), for at most `max_lifetime` (5 days) since arrival, with one last attempt at
//!   that boundary; a temporary failure after it turns the recipient into a failure ("expired");
//! * a permanent failure is final at once;
//! * a recipient found in flight after a crash is due again at once (at-least-once delivery:
//!   the remote server may already have it, so a duplicate is possible, a loss is not);
//! * a held message (`Envelope::hold`) is never due, so it is never attempted and therefore
//!   never expires while held (Postfix's rule for its hold queue). Once released it is due at
//!   once and the lifetime counts from arrival again: a message held past `max_lifetime` gets
//!   one attempt, and a temporary failure of that attempt expires it.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_message::{Envelope, QueueId, Recipient, RecipientState};

/// Retry schedule and lifetime limits (`[queue]` in the configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Wait after the 1st, 2nd, … failed attempt; the last entry repeats. Never empty.
    pub intervals: Vec<Duration>,
    /// Give up (and bounce) once a message is this old (Postfix `maximal_queue_lifetime`).
    pub max_lifetime: Duration,
    /// Tell the sender about the delay once a message is this old, if it is still pending.
    pub delay_warning: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            intervals: vec![
                Duration::from_secs(60),
                Duration::from_secs(5 * 60),
                Duration::from_secs(15 * 60),
            ],
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            delay_warning: Some(Duration::from_secs(4 * 3600)),
        }
    }
}

/// What to do after a temporary failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    RetryAt(u64),
    Expire,
}

impl RetryPolicy {
    /// The wait after the `attempts`-th failed attempt (1-based).
    pub fn interval(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.intervals.len().saturating_sub(1));
        self.intervals
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(15 * 60))
    }

    fn deadline_ms(&self, arrived_ms: u64) -> u64 {
        arrived_ms.saturating_add(self.max_lifetime.as_millis() as u64)
    }

    /// After a temporary failure at `now_ms` (the `attempts`-th attempt in all): the next
    /// attempt's time, never later than the lifetime's end (one last try there), or expiry once
    /// the lifetime is over.
    pub fn after_temporary_failure(&self, arrived_ms: u64, attempts: u32, now_ms: u64) -> NextStep {
        let deadline = self.deadline_ms(arrived_ms);
        if now_ms >= deadline {
            return NextStep::Expire;
        }
        let next = now_ms.saturating_add(self.interval(attempts).as_millis() as u64);
        NextStep::RetryAt(next.min(deadline))
    }

    /// Whether a message still pending at `now_ms` is old enough for a delay warning.
    pub fn delay_warning_due(&self, arrived_ms: u64, now_ms: u64) -> bool {
        self.delay_warning
            .is_some_and(|d| now_ms >= arrived_ms.saturating_add(d.as_millis() as u64))
    }
}

pub use tern_message::AttemptResult;

/// How one recipient's state changed, for logs, DSNs and the suppression list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Delivered,
    Deferred {
        next_attempt_ms: u64,
    },
    Failed,
    /// Temporary failures went on past the lifetime: a failure for the sender's DSN.
    Expired,
}

/// Number of attempts made before the current one, whatever the state.
fn attempts_so_far(state: &RecipientState) -> u32 {
    match state {
        RecipientState::InFlight { attempts } => *attempts,
        RecipientState::Deferred { attempts, .. } => *attempts,
        _ => 0,
    }
}

/// Marks a recipient as handed to a delivery worker.
pub fn start_attempt(rcpt: &mut Recipient) {
    let attempts = attempts_so_far(&rcpt.state);
    rcpt.state = RecipientState::InFlight { attempts };
}

/// Applies one attempt's result to a recipient.
pub fn record_attempt(
    rcpt: &mut Recipient,
    result: AttemptResult,
    arrived_ms: u64,
    now_ms: u64,
    policy: &RetryPolicy,
) -> Transition {
    let attempts = attempts_so_far(&rcpt.state) + 1;
    match result {
        AttemptResult::Delivered { reply } => {
            rcpt.state = RecipientState::Delivered {
                at_ms: now_ms,
                reply,
            };
            Transition::Delivered
        }
        AttemptResult::Permanent { reply } => {
            rcpt.state = RecipientState::Failed {
                at_ms: now_ms,
                reply,
            };
            Transition::Failed
        }
        AttemptResult::Temporary { reply } => {
            match policy.after_temporary_failure(arrived_ms, attempts, now_ms) {
                NextStep::RetryAt(next_attempt_ms) => {
                    rcpt.state = RecipientState::Deferred {
                        next_attempt_ms,
                        attempts,
                        last_reply: reply,
                    };
                    Transition::Deferred { next_attempt_ms }
                }
                NextStep::Expire => {
                    rcpt.state = RecipientState::Failed {
                        at_ms: now_ms,
                        reply: format!(
                            "4.4.7 message expired after {attempts} attempts; last: {reply}"
                        ),
                    };
                    Transition::Expired
                }
            }
        }
    }
}

/// True when every recipient is delivered or failed: the message can leave the spool.
pub fn is_complete(envelope: &Envelope) -> bool {
    envelope.recipients.iter().all(|r| {
        matches!(
            r.state,
            RecipientState::Delivered { .. } | RecipientState::Failed { .. }
        )
    })
}

/// When the message next needs a delivery attempt: the earliest due recipient. Pending and
/// in-flight recipients (in flight only survives a crash, see the module docs) are due at once.
/// A held message is never due: it waits for an operator, not for a time.
pub fn next_due_ms(envelope: &Envelope, now_ms: u64) -> Option<u64> {
    if envelope.hold.is_some() {
        return None;
    }
    envelope
        .recipients
        .iter()
        .filter_map(|r| match &r.state {
            RecipientState::Pending | RecipientState::InFlight { .. } => Some(now_ms),
            RecipientState::Deferred {
                next_attempt_ms, ..
            } => Some(*next_attempt_ms),
            RecipientState::Delivered { .. } | RecipientState::Failed { .. } => None,
        })
        .min()
}

/// Takes a message off hold: its waiting recipients are due at `now_ms` (a deferred one does
/// not wait out the rest of an interval it spent on hold). False if it was not held.
pub fn release(envelope: &mut Envelope, now_ms: u64) -> bool {
    if envelope.hold.take().is_none() {
        return false;
    }
    for r in &mut envelope.recipients {
        if let RecipientState::Deferred {
            next_attempt_ms, ..
        } = &mut r.state
        {
            *next_attempt_ms = (*next_attempt_ms).min(now_ms);
        }
    }
    true
}

/// Messages ordered by when they are next due, so finding due work is O(log n), not a scan.
#[derive(Debug, Default)]
pub struct DueIndex {
    by_due: BTreeSet<(u64, QueueId)>,
    due_of: HashMap<QueueId, u64>,
}

impl DueIndex {
    /// (Re)schedules a message; it replaces any earlier time for the same id.
    pub fn schedule(&mut self, id: QueueId, at_ms: u64) {
        if let Some(old) = self.due_of.insert(id, at_ms) {
            self.by_due.remove(&(old, id));
        }
        self.by_due.insert((at_ms, id));
    }

    pub fn remove(&mut self, id: QueueId) {
        if let Some(old) = self.due_of.remove(&id) {
            self.by_due.remove(&(old, id));
        }
    }

    /// Takes up to `max` messages due at `now_ms`, earliest first, out of the index: they are in
    /// flight until rescheduled or removed.
    pub fn take_due(&mut self, now_ms: u64, max: usize) -> Vec<QueueId> {
        let mut taken = Vec::new();
        while taken.len() < max {
            match self.by_due.first() {
                Some(&(at, id)) if at <= now_ms => {
                    self.by_due.pop_first();
                    self.due_of.remove(&id);
                    taken.push(id);
                }
                _ => break,
            }
        }
        taken
    }

    /// When the next message is due (for the scheduler's timer).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.by_due.first().map(|&(at, _)| at)
    }

    pub fn len(&self) -> usize {
        self.due_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due_of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;

    fn temp(reply: &str) -> AttemptResult {
        AttemptResult::Temporary {
            reply: reply.into(),
        }
    }

    #[test]
    fn default_schedule_is_1m_5m_15m_then_every_15m_for_5_days() {
        let p = RetryPolicy::default();
        assert_eq!(p.interval(1), Duration::from_secs(60));
        assert_eq!(p.interval(2), Duration::from_secs(300));
        assert_eq!(p.interval(3), Duration::from_secs(900));
        assert_eq!(p.interval(40), Duration::from_secs(900));
        assert_eq!(p.max_lifetime, Duration::from_secs(5 * 24 * 3600));
        assert_eq!(p.delay_warning, Some(Duration::from_secs(4 * 3600)));
    }

    #[test]
    fn temporary_failures_walk_the_schedule() {
        let p = RetryPolicy::default();
        let mut r = Recipient::new("a@example.net");
        let t0 = 1_000_000;
        start_attempt(&mut r);
        assert_eq!(
            record_attempt(&mut r, temp("451 4.3.0 busy"), t0, t0, &p),
            Transition::Deferred {
                next_attempt_ms: t0 + MIN
            }
        );
        start_attempt(&mut r);
        assert_eq!(r.state, RecipientState::InFlight { attempts: 1 });
        let t1 = t0 + MIN;
        assert_eq!(
            record_attempt(&mut r, temp("451"), t0, t1, &p),
            Transition::Deferred {
                next_attempt_ms: t1 + 5 * MIN
            }
        );
        let t2 = t1 + 5 * MIN;
        assert_eq!(
            record_attempt(&mut r, temp("451"), t0, t2, &p),
            Transition::Deferred {
                next_attempt_ms: t2 + 15 * MIN
            }
        );
        let t3 = t2 + 15 * MIN;
        assert_eq!(
            record_attempt(&mut r, temp("451"), t0, t3, &p),
            Transition::Deferred {
                next_attempt_ms: t3 + 15 * MIN
            }
        );
        match &r.state {
            RecipientState::Deferred {
                attempts,
                last_reply,
                ..
            } => {
                assert_eq!(*attempts, 4);
                assert_eq!(last_reply, "451");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_last_retry_is_at_the_lifetime_boundary_then_the_recipient_expires() {
        let p = RetryPolicy::default();
        let arrived = 0;
        let mut r = Recipient::new("a@example.net");
        let near_end = 5 * DAY - 5 * MIN;
        r.state = RecipientState::Deferred {
            next_attempt_ms: near_end,
            attempts: 400,
            last_reply: "451".into(),
        };
        assert_eq!(
            record_attempt(&mut r, temp("451 again"), arrived, near_end, &p),
            Transition::Deferred {
                next_attempt_ms: 5 * DAY
            },
            "one last attempt exactly at the end of the lifetime"
        );
        assert_eq!(
            record_attempt(&mut r, temp("451 still"), arrived, 5 * DAY, &p),
            Transition::Expired
        );
        match &r.state {
            RecipientState::Failed { reply, .. } => {
                assert!(reply.contains("expired after 402 attempts"), "{reply}");
                assert!(reply.contains("451 still"), "{reply}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn permanent_failures_and_deliveries_are_final() {
        let p = RetryPolicy::default();
        let mut env = Envelope::new(
            "s@example.org",
            vec![Recipient::new("a@x.test"), Recipient::new("b@x.test")],
        );
        assert!(!is_complete(&env));
        assert_eq!(
            record_attempt(
                &mut env.recipients[0],
                AttemptResult::Delivered {
                    reply: "250 ok".into()
                },
                0,
                10,
                &p
            ),
            Transition::Delivered
        );
        assert!(!is_complete(&env));
        assert_eq!(next_due_ms(&env, 10), Some(10), "b is still pending");
        assert_eq!(
            record_attempt(
                &mut env.recipients[1],
                AttemptResult::Permanent {
                    reply: "550 5.1.1 no such user".into()
                },
                0,
                11,
                &p
            ),
            Transition::Failed
        );
        assert!(is_complete(&env));
        assert_eq!(next_due_ms(&env, 12), None);
    }

    #[test]
    fn a_message_is_due_at_its_earliest_recipient_and_in_flight_after_a_crash_is_due_now() {
        let mut env = Envelope::new(
            "",
            vec![Recipient::new("a@x.test"), Recipient::new("b@x.test")],
        );
        env.recipients[0].state = RecipientState::Deferred {
            next_attempt_ms: 500,
            attempts: 1,
            last_reply: String::new(),
        };
        env.recipients[1].state = RecipientState::Deferred {
            next_attempt_ms: 300,
            attempts: 2,
            last_reply: String::new(),
        };
        assert_eq!(next_due_ms(&env, 100), Some(300));
        env.recipients[0].state = RecipientState::InFlight { attempts: 1 };
        assert_eq!(next_due_ms(&env, 100), Some(100));
    }

    #[test]
    fn a_held_message_is_never_due_and_does_not_expire_until_released() {
        let p = RetryPolicy::default();
        let arrived = 0;
        let mut env = Envelope::new(
            "s@example.org",
            vec![Recipient::new("a@x.test"), Recipient::new("b@x.test")],
        );
        env.recipients[1].state = RecipientState::Deferred {
            next_attempt_ms: 10 * DAY,
            attempts: 3,
            last_reply: "451 busy".into(),
        };
        env.hold = Some("operator".into());
        assert_eq!(next_due_ms(&env, 6 * DAY), None, "held past the lifetime");
        assert!(!release(&mut Envelope::new("", vec![]), 0), "not held");

        let now = 6 * DAY;
        assert!(release(&mut env, now));
        assert_eq!(env.hold, None);
        assert_eq!(next_due_ms(&env, now), Some(now), "due at once");
        assert!(matches!(
            env.recipients[1].state,
            RecipientState::Deferred { next_attempt_ms, attempts: 3, .. } if next_attempt_ms == now
        ));
        // After release the lifetime counts from arrival: one attempt, which may still deliver,
        // and a temporary failure expires the recipient.
        start_attempt(&mut env.recipients[0]);
        assert_eq!(
            record_attempt(
                &mut env.recipients[0],
                AttemptResult::Delivered {
                    reply: "250 ok".into()
                },
                arrived,
                now,
                &p
            ),
            Transition::Delivered
        );
        start_attempt(&mut env.recipients[1]);
        assert_eq!(
            record_attempt(&mut env.recipients[1], temp("451 again"), arrived, now, &p),
            Transition::Expired
        );
    }

    #[test]
    fn delay_warning_is_due_after_four_hours() {
        let p = RetryPolicy::default();
        assert!(!p.delay_warning_due(0, 4 * HOUR - 1));
        assert!(p.delay_warning_due(0, 4 * HOUR));
        let off = RetryPolicy {
            delay_warning: None,
            ..RetryPolicy::default()
        };
        assert!(!off.delay_warning_due(0, 10 * DAY));
    }

    #[test]
    fn due_index_takes_due_work_in_time_order_and_reschedules() {
        let mut idx = DueIndex::default();
        let (a, b, c) = (QueueId::new(), QueueId::new(), QueueId::new());
        idx.schedule(a, 300);
        idx.schedule(b, 100);
        idx.schedule(c, 200);
        idx.schedule(a, 50); // rescheduling replaces the old time
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.next_due_ms(), Some(50));
        assert_eq!(idx.take_due(150, 10), vec![a, b]);
        assert_eq!(
            idx.take_due(150, 10),
            Vec::<QueueId>::new(),
            "taken work is in flight"
        );
        assert_eq!(idx.next_due_ms(), Some(200));
        idx.remove(c);
        assert!(idx.is_empty());
        assert_eq!(idx.next_due_ms(), None);
    }

    #[test]
    fn due_index_respects_the_batch_limit() {
        let mut idx = DueIndex::default();
        let ids: Vec<_> = (0..5).map(|_| QueueId::new()).collect();
        for (i, id) in ids.iter().enumerate() {
            idx.schedule(*id, i as u64);
        }
        assert_eq!(idx.take_due(100, 2), ids[..2].to_vec());
        assert_eq!(idx.take_due(100, 10), ids[2..].to_vec());
    }
}
