//! Greylisting (postgrey, Postfix's policy servers): a stranger's first attempt to deliver a
//! given (client network, sender, recipient) triplet is refused with a temporary error; a real
//! MTA retries after a while and is then let through, and the triplet is remembered so later
//! mail passes at once. Much spamware never retries.
//!
//! The rules are the pure [`decide`] (the clock is passed in, so they are tested without
//! waiting); [`Greylist`] keeps the triplets in a sled database of its own
//! (`<data_dir>/greylist`).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[policy]` greylisting settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreylistSettings {
    pub enabled: bool,
    /// How long a new triplet must wait before a retry is accepted.
    pub delay: Duration,
    /// A retry later than this after the first attempt starts over (a new first attempt).
    pub retry_window: Duration,
    /// How long a passed triplet is remembered since it was last seen (postgrey's max-age).
    pub expiry: Duration,
}

impl Default for GreylistSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            delay: Duration::from_secs(5 * 60),
            retry_window: Duration::from_secs(2 * 24 * 3600),
            expiry: Duration::from_secs(35 * 24 * 3600),
        }
    }
}

/// What is remembered about one triplet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The first attempt of the current round (ms since the epoch).
    pub first_ms: u64,
    /// The latest attempt.
    pub last_ms: u64,
    /// A retry came after the delay: the triplet passes until it expires.
    pub passed: bool,
}

/// The answer for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Pass,
    /// Refuse for now; the triplet may pass in this many seconds (at least 1).
    Wait {
        seconds: u64,
    },
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One attempt of a triplet with what is stored about it (`None`: never seen, or forgotten) at
/// `now_ms`: the decision and the entry to store.
pub fn decide(entry: Option<Entry>, now_ms: u64, s: &GreylistSettings) -> (Decision, Entry) {
    let fresh = Entry {
        first_ms: now_ms,
        last_ms: now_ms,
        passed: false,
    };
    let wait = |first_ms: u64| {
        let left = (first_ms.saturating_add(ms(s.delay))).saturating_sub(now_ms);
        Decision::Wait {
            seconds: left.div_ceil(1000).max(1),
        }
    };
    let Some(e) = entry.filter(|e| !is_expired(e, now_ms, s)) else {
        return (wait(now_ms), fresh);
    };
    let next = Entry {
        last_ms: now_ms,
        ..e
    };
    if e.passed {
        return (Decision::Pass, next);
    }
    if now_ms.saturating_sub(e.first_ms) < ms(s.delay) {
        return (wait(e.first_ms), next);
    }
    (
        Decision::Pass,
        Entry {
            passed: true,
            ..next
        },
    )
}

/// Whether an entry is of no more use: a passed triplet not seen for `expiry`, or a waiting
/// one whose retry window is over (its next attempt starts over anyway).
pub fn is_expired(e: &Entry, now_ms: u64, s: &GreylistSettings) -> bool {
    if e.passed {
        now_ms.saturating_sub(e.last_ms) > ms(s.expiry)
    } else {
        now_ms.saturating_sub(e.first_ms) > ms(s.retry_window)
    }
}

/// The client's network as greylisting sees it: a /24 for IPv4, a /64 for IPv6, since big
/// senders retry from another address of the same pool (postgrey does the same for IPv4).
pub fn network(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

/// The stored key of a triplet: network, sender and recipient (both lowercased), NUL-separated.
pub fn triplet_key(ip: IpAddr, sender: &str, recipient: &str) -> Vec<u8> {
    let mut k = network(ip).into_bytes();
    k.push(0);
    k.extend_from_slice(sender.to_lowercase().as_bytes());
    k.push(0);
    k.extend_from_slice(recipient.to_lowercase().as_bytes());
    k
}

#[derive(Debug, thiserror::Error)]
pub enum GreylistError {
    #[error("greylist storage: {0}")]
    Storage(String),
}

fn storage(e: impl std::fmt::Display) -> GreylistError {
    GreylistError::Storage(e.to_string())
}

/// The triplets, in sled. Written from the policy actor only.
#[derive(Clone)]
pub struct Greylist {
    db: sled::Db,
    settings: GreylistSettings,
}

impl Greylist {
    /// Opens (creating) the database in `dir`.
    pub fn open(dir: &Path, settings: GreylistSettings) -> Result<Self, GreylistError> {
        let db = sled::Config::new().path(dir).open().map_err(storage)?;
        Ok(Self { db, settings })
    }

    /// One attempt at `now_ms`; records it.
    pub fn check(
        &self,
        ip: IpAddr,
        sender: &str,
        recipient: &str,
        now_ms: u64,
    ) -> Result<Decision, GreylistError> {
        let key = triplet_key(ip, sender, recipient);
        let old = match self.db.get(&key).map_err(storage)? {
            // A record that does not decode is treated as never seen: it is overwritten.
            Some(v) => serde_json::from_slice::<Entry>(&v).ok(),
            None => None,
        };
        let (decision, entry) = decide(old, now_ms, &self.settings);
        let value = serde_json::to_vec(&entry).map_err(storage)?;
        // Not flushed: a triplet lost in a crash only greylists a sender once more.
        self.db.insert(key, value).map_err(storage)?;
        Ok(decision)
    }

    /// Removes the entries [`is_expired`] at `now_ms`; answers how many.
    pub fn sweep(&self, now_ms: u64) -> Result<usize, GreylistError> {
        let mut gone = 0;
        for item in self.db.iter() {
            let (k, v) = item.map_err(storage)?;
            let expired = serde_json::from_slice::<Entry>(&v)
                .map_or(true, |e| is_expired(&e, now_ms, &self.settings));
            if expired {
                self.db.remove(k).map_err(storage)?;
                gone += 1;
            }
        }
        Ok(gone)
    }

    /// Number of triplets stored (walks the database: for tests and tools).
    pub fn len(&self) -> usize {
        self.db.len()
    }

    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;
    const DAY: u64 = 24 * 3600 * S;

    fn settings() -> GreylistSettings {
        GreylistSettings {
            enabled: true,
            ..GreylistSettings::default()
        }
    }

    #[test]
    fn a_new_triplet_waits_the_delay_then_passes_and_is_remembered() {
        let s = settings();
        let t0 = 1_000_000_000;
        let (d, e) = decide(None, t0, &s);
        assert_eq!(d, Decision::Wait { seconds: 300 });
        // An early retry is refused with the time left, and does not restart the clock.
        let (d, e) = decide(Some(e), t0 + 60 * S + 500, &s);
        assert_eq!(d, Decision::Wait { seconds: 240 });
        assert_eq!(e.first_ms, t0);
        let (d, e) = decide(Some(e), t0 + 300 * S - 1, &s);
        assert_eq!(d, Decision::Wait { seconds: 1 });
        let (d, e) = decide(Some(e), t0 + 300 * S, &s);
        assert_eq!(d, Decision::Pass);
        assert!(e.passed);
        // Passed: later mail goes through at once, and each pass renews the memory.
        let (d, e) = decide(Some(e), t0 + 30 * DAY, &s);
        assert_eq!(d, Decision::Pass);
        assert_eq!(e.last_ms, t0 + 30 * DAY);
        let (d, _) = decide(Some(e), t0 + 64 * DAY, &s);
        assert_eq!(
            d,
            Decision::Pass,
            "35 days since last seen, not since first"
        );
    }

    #[test]
    fn a_retry_after_the_window_starts_over_and_passed_triplets_expire() {
        let s = settings();
        let t0 = 5 * DAY;
        let (_, e) = decide(None, t0, &s);
        let late = t0 + 2 * DAY + 1;
        assert!(is_expired(&e, late, &s));
        let (d, e) = decide(Some(e), late, &s);
        assert_eq!(d, Decision::Wait { seconds: 300 });
        assert_eq!(e.first_ms, late, "a new first attempt");

        let passed = Entry {
            first_ms: t0,
            last_ms: t0,
            passed: true,
        };
        assert!(!is_expired(&passed, t0 + 35 * DAY, &s));
        assert!(is_expired(&passed, t0 + 35 * DAY + 1, &s));
        let (d, e) = decide(Some(passed), t0 + 36 * DAY, &s);
        assert_eq!(d, Decision::Wait { seconds: 300 });
        assert!(!e.passed);
    }

    #[test]
    fn triplets_are_per_network_and_case_insensitive() {
        let a = |ip: &str, from: &str, to: &str| triplet_key(ip.parse().unwrap(), from, to);
        assert_eq!(
            a("192.0.2.7", "Alice@Example.ORG", "Bob@example.net"),
            a("192.0.2.200", "alice@example.org", "BOB@EXAMPLE.NET")
        );
        assert_ne!(
            a("192.0.2.7", "a@x.test", "b@y.test"),
            a("192.0.3.7", "a@x.test", "b@y.test")
        );
        assert_eq!(
            a("::ffff:192.0.2.9", "a@x.test", "b@y.test"),
            a("192.0.2.1", "a@x.test", "b@y.test"),
            "IPv4-mapped addresses are IPv4"
        );
        assert_eq!(
            network("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
        assert_ne!(
            a("2001:db8:1:2::1", "a@x.test", "b@y.test"),
            a("2001:db8:1:3::1", "a@x.test", "b@y.test")
        );
        assert_ne!(
            a("192.0.2.7", "a@x.test", "b@y.test"),
            a("192.0.2.7", "c@x.test", "b@y.test")
        );
    }

    #[test]
    fn the_store_remembers_and_sweeps() {
        let dir = tempfile::tempdir().unwrap();
        let list = Greylist::open(dir.path(), settings()).unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = 10 * DAY;
        assert!(matches!(
            list.check(ip, "a@x.test", "b@y.test", t0).unwrap(),
            Decision::Wait { .. }
        ));
        assert_eq!(
            list.check(ip, "a@x.test", "b@y.test", t0 + 301 * S)
                .unwrap(),
            Decision::Pass
        );
        assert!(matches!(
            list.check(ip, "c@x.test", "b@y.test", t0 + 302 * S)
                .unwrap(),
            Decision::Wait { .. }
        ));
        assert_eq!(list.len(), 2);
        assert_eq!(list.sweep(t0 + 3 * DAY).unwrap(), 1, "the unpassed one");
        assert_eq!(list.sweep(t0 + 40 * DAY).unwrap(), 1, "the passed one");
        assert!(list.is_empty());
    }
}
