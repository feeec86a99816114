//! The messages that cross stage boundaries.
//!
//! Every type here is plain data that derives `Serialize`/`Deserialize`: a later stage of the
//! project carries the same messages between cluster nodes, so no stage may rely on its peer
//! living in the same process (no `Addr`, no channels, no file handles inside a message).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A queue id: a ULID, so ids sort by arrival time (the spool's key order is arrival order) and
/// are unique across nodes without coordination (80 random bits per millisecond).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(ulid::Ulid);

impl QueueId {
    pub fn new() -> Self {
        Self(ulid::Ulid::new())
    }

    /// Big-endian bytes: their lexicographic order is the id's time order, which makes them a
    /// good sled key.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(ulid::Ulid::from_bytes(bytes))
    }

    /// Milliseconds since the Unix epoch at which the id was minted.
    pub fn timestamp_ms(self) -> u64 {
        self.0.timestamp_ms()
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a queue id: {0:?}")]
pub struct BadQueueId(String);

impl FromStr for QueueId {
    type Err = BadQueueId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(Self)
            .map_err(|_| BadQueueId(s.to_string()))
    }
}

// The envelope parameter types belong to the SMTP grammar; re-exported so existing users of
// `tern_message::Notify` etc. keep working.
pub use tern_smtp::{BodyType, Notify, Ret};

/// Where one recipient stands. Only `Pending` exists at accept time; delivery fills in the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientState {
    #[default]
    Pending,
    /// Handed to a delivery worker; `attempts` counts the attempts before this one, so a crash
    /// mid-delivery resumes the retry schedule where it was.
    InFlight {
        attempts: u32,
    },
    Delivered {
        at_ms: u64,
        reply: String,
    },
    Deferred {
        next_attempt_ms: u64,
        attempts: u32,
        last_reply: String,
    },
    Failed {
        at_ms: u64,
        reply: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward-path as the client gave it, without angle brackets (`user@example.org`, or
    /// `postmaster`).
    pub address: String,
    pub notify: Option<Notify>,
    /// RFC 3461 `ORCPT=addr-type;xtext`, kept verbatim (still xtext-encoded).
    pub orcpt: Option<String>,
    pub state: RecipientState,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            notify: None,
            orcpt: None,
            state: RecipientState::Pending,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The reverse-path without angle brackets; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// RFC 3461 `ENVID=`, kept xtext-encoded.
    pub envid: Option<String>,
    /// RFC 4954 `AUTH=` on MAIL, kept xtext-encoded.
    pub auth: Option<String>,
    /// A delay warning (RFC 3464 `Action: delayed`) has been sent for this message; one is
    /// enough. Absent in records written before it existed, hence the default.
    #[serde(default)]
    pub delay_warned: bool,
    /// Why the message is on hold (quarantined by the validation stage, or put there by an
    /// operator); `None` for a message free to go. The queue dispatches nothing of a held
    /// message until an operator releases it. Absent in older records, hence the default.
    #[serde(default)]
    pub hold: Option<String>,
}

impl Envelope {
    /// An envelope without ESMTP parameters (`BODY=7BIT`, no SMTPUTF8, RET, ENVID or AUTH).
    pub fn new(sender: impl Into<String>, recipients: Vec<Recipient>) -> Self {
        Self {
            sender: sender.into(),
            recipients,
            body_type: BodyType::default(),
            smtputf8: false,
            ret: None,
            envid: None,
            auth: None,
            delay_warned: false,
            hold: None,
        }
    }

    /// The same envelope parameters with other recipients (a delivery job's share), without
    /// copying the recipients it replaces.
    pub fn with_recipients(&self, recipients: Vec<Recipient>) -> Envelope {
        Envelope {
            sender: self.sender.clone(),
            recipients,
            body_type: self.body_type,
            smtputf8: self.smtputf8,
            ret: self.ret,
            envid: self.envid.clone(),
            auth: self.auth.clone(),
            delay_warned: self.delay_warned,
            hold: self.hold.clone(),
        }
    }
}

/// Who handed us the message: kept with it for the Received header, logs, DSNs and policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The peer address, or the original client address from a PROXY protocol header.
    pub addr: SocketAddr,
    /// The listener that accepted the connection.
    pub local_addr: SocketAddr,
    pub helo: String,
    /// `"TLSv1.3 TLS_AES_256_GCM_SHA384"` style, when the session used TLS.
    pub tls: Option<String>,
    /// The SASL identity, when the client authenticated.
    pub auth_user: Option<String>,
}

impl ClientInfo {
    /// A plaintext, unauthenticated client.
    pub fn new(addr: SocketAddr, local_addr: SocketAddr, helo: impl Into<String>) -> Self {
        Self {
            addr,
            local_addr,
            helo: helo.into(),
            tls: None,
            auth_user: None,
        }
    }
}

/// A whole message as a session hands it to the next stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    pub client: ClientInfo,
    /// Milliseconds since the Unix epoch.
    pub arrived_ms: u64,
    /// The message content (headers and body), CRLF line endings, dot-unstuffed, Received header
    /// already prepended.
    pub body: Bytes,
}

/// The result of one delivery attempt for one recipient, as the delivery stage reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptResult {
    /// 2yz: the remote server took responsibility.
    Delivered { reply: String },
    /// 4yz, connection, TLS or DNS trouble: try again later.
    Temporary { reply: String },
    /// 5yz or a permanent DNS answer (NXDOMAIN, null MX): never again.
    Permanent { reply: String },
}

impl AttemptResult {
    pub fn reply(&self) -> &str {
        match self {
            AttemptResult::Delivered { reply }
            | AttemptResult::Temporary { reply }
            | AttemptResult::Permanent { reply } => reply,
        }
    }
}

/// Queue → delivery: deliver this message to these recipients, all of one destination domain.
/// The body travels with the job so the delivery stage never reads the spool (it may run on
/// another node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct DeliveryJob {
    pub id: QueueId,
    /// The recipients' domain, lowercased (the routing key).
    pub domain: String,
    /// The message's envelope with only this job's recipients.
    pub envelope: Envelope,
    /// For each recipient of `envelope`, its index in the spooled envelope (the report's key).
    pub rcpt_index: Vec<usize>,
    pub body: Bytes,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// The server a delivery attempt talked to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteHost {
    /// The MX or smarthost name (what a TLS certificate is checked against).
    pub host: String,
    pub addr: SocketAddr,
    /// `"TLSv1.3 TLS_AES_256_GCM_SHA384"` when the transaction used TLS.
    pub tls: Option<String>,
    /// The server announced DSN (RFC 3461): success notifications become its duty.
    pub dsn: bool,
}

/// Delivery → queue: what became of recipients of a [`DeliveryJob`]. A job is answered by one
/// report per SMTP transaction (more than one when its recipients are split), which together
/// name each of its recipients exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct DeliveryReport {
    pub id: QueueId,
    pub domain: String,
    /// (index in the spooled envelope, result), one per recipient this report answers.
    pub results: Vec<(usize, AttemptResult)>,
    /// The server that gave the results; `None` when no server was reached.
    pub remote: Option<RemoteHost>,
    /// When the attempt started (the job left the queue) and ended, ms since the epoch.
    pub started_ms: u64,
    pub finished_ms: u64,
}

impl DeliveryReport {
    /// One result for every recipient of `job` (nothing was connected to, or the stage could
    /// not take the job), the attempt ending now.
    pub fn for_every_recipient(job: &DeliveryJob, result: AttemptResult, started_ms: u64) -> Self {
        DeliveryReport {
            id: job.id,
            domain: job.domain.clone(),
            results: job
                .rcpt_index
                .iter()
                .map(|&i| (i, result.clone()))
                .collect(),
            remote: None,
            started_ms,
            finished_ms: now_ms(),
        }
    }
}

/// Queue → validation: delivery to this address failed permanently with a "no such mailbox"
/// class status (5.1.x): it goes on the suppression list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "()")]
pub struct HardBounce {
    pub address: String,
    /// The reply that decided it, for the list entry's reason.
    pub reply: String,
    pub at_ms: u64,
}

/// Why a stage could not take a message. The session maps each kind to an SMTP reply, so the
/// kinds follow what a client needs to know, not how the storage failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SpoolError {
    /// Out of disk space: 452 4.3.1.
    #[error("insufficient storage: {0}")]
    DiskFull(String),
    /// Any other storage failure: 451 4.3.0.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The queue is shutting down or unreachable: 421 4.3.2.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

/// A rate limit: at most `count` events per `per`. Written `"100/s"`, `"6000/m"`,
/// `"50000/h"` or `"1000000/d"` in configuration and in serialized form. Shared by the
/// configuration, the delivery stage (`max_message_rate`) and the policy stage (rate buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// At least 1 (checked with the rest of the configuration).
    pub count: u32,
    /// One second, minute, hour or day when parsed.
    pub per: std::time::Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            _ if self.per.subsec_nanos() != 0 => None,
            1 => Some("s"),
            60 => Some("m"),
            3600 => Some("h"),
            86_400 => Some("d"),
            _ => None,
        };
        match unit {
            Some(unit) => write!(f, "{}/{unit}", self.count),
            // Not produced by parsing; shown readably, though it cannot be read back.
            None => write!(f, "{}/{:?}", self.count, self.per),
        }
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const FORMS: &str = "expected COUNT/UNIT with unit s, m, h or d, e.g. 100/s or 6000/m";
        let (count, unit) = s.trim().split_once('/').ok_or_else(|| FORMS.to_string())?;
        let count = count
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("bad count {:?}; {FORMS}", count.trim()))?;
        let per = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => return Err(format!("bad unit {other:?}; {FORMS}")),
        };
        Ok(Self {
            count,
            per: std::time::Duration::from_secs(per),
        })
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Rate, E> {
                v.parse()
                    .map_err(|why| E::custom(format!("invalid rate {v:?}: {why}")))
            }
        }
        d.deserialize_str(V)
    }
}

/// Current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_sort_by_time_and_round_trip() {
        let a = QueueId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = QueueId::new();
        assert!(a.to_bytes() < b.to_bytes());
        assert_eq!(QueueId::from_bytes(a.to_bytes()), a);
        assert_eq!(a.to_string().parse::<QueueId>().unwrap(), a);
        assert!("not-an-id".parse::<QueueId>().is_err());
    }
}
