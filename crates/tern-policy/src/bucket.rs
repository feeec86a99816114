//! Token buckets for rate limits: `count` tokens per `per`, refilled continuously, with a
//! burst of `count` (a client may use its whole allowance at once, then waits for the refill).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

pub use tern_message::Rate;

#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.count as f64,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let per = self.rate.per.as_secs_f64().max(f64::MIN_POSITIVE);
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let capacity = self.rate.count as f64;
        self.tokens = (self.tokens + elapsed * capacity / per).min(capacity);
        self.updated = now;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely (it can be forgotten).
    pub fn is_full(&self, now: Instant) -> bool {
        let mut copy = self.clone();
        copy.refill(now);
        copy.tokens >= self.rate.count as f64
    }
}

/// One bucket per key (client address, sender, user) for one rate; `None` is unlimited.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: Option<Rate>,
    map: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq> Buckets<K> {
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            rate,
            map: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate.is_some()
    }

    /// Takes a token for `key`: false when its bucket is empty (over the rate).
    pub fn take(&mut self, key: K, now: Instant) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        self.map
            .entry(key)
            .or_insert_with(|| TokenBucket::new(rate, now))
            .take(now)
    }

    /// Drops the buckets that have refilled: they hold nothing a new bucket would not.
    pub fn sweep(&mut self, now: Instant) {
        self.map.retain(|_, b| !b.is_full(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let rate = Rate {
            count: 3,
            per: Duration::from_secs(3),
        };
        let mut b = TokenBucket::new(rate, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0), "burst used up");
        assert!(!b.take(t0 + Duration::from_millis(900)));
        assert!(
            b.take(t0 + Duration::from_millis(1000)),
            "one token per second"
        );
        assert!(!b.is_full(t0 + Duration::from_secs(2)));
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }
}
