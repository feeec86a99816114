//! The validation stage: an actor that sessions consult at each SMTP step and that answers with
//! a [`Verdict`]. Requests and verdicts are plain serde data, so the actor can later run on
//! another node; sessions bound every request with a timeout and fall back to the documented
//! default verdict of that step (see [`PolicyClient`]).
//!
//! This first part covers the connection and envelope checks:
//! * connect: per-address connection rate (token bucket) → `421 4.7.0`; DNS blocklists →
//!   `554 5.7.1` naming the list; reverse DNS ([`rdns`]) → `550 5.7.25` / `450 4.7.25`;
//! * HELO: syntax, optionally a fully qualified name, and strangers claiming our own name;
//! * MAIL: per-sender and per-authenticated-user message rates → `450 4.7.1`;
//! * RCPT: relay control ([`relay`], a pure rule the session calls even with the stage off)
//!   and unknown users of the domains we serve ([`recipients`]) → `550 5.1.1`.
//!
//! Content checks, SPF/DKIM/DMARC, suppression and greylisting come with the rest of issue #4.

mod bucket;
mod checks;
pub mod headers;
pub mod rdns;
pub mod recipients;
pub mod relay;
pub mod suppression;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tern_dns::MxResolver;
use tracing::{debug, info};

pub use bucket::{Buckets, Rate, TokenBucket};
pub use checks::{check_helo, HeloPolicy};
pub use rdns::ReverseDns;
pub use suppression::{Suppressed, SuppressionError, SuppressionList};

/// What a check decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accept,
    /// RCPT only: answer 250 but leave the recipient out of the message (a suppressed address
    /// with `suppression_action = "drop"`); logged.
    Discard,
    /// Refuse with this reply (4xx: try later; 5xx: never). For a connection, the session
    /// sends it instead of the greeting and closes.
    Refuse(PolicyReply),
}

impl<A: Actor, M: Message<Result = Verdict>> actix::dev::MessageResponse<A, M> for Verdict {
    fn handle(self, _ctx: &mut A::Context, tx: Option<actix::dev::OneshotSender<Verdict>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

/// An SMTP reply chosen by policy: code, enhanced status code and text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReply {
    pub code: u16,
    pub enhanced: (u8, u16, u16),
    pub text: String,
}

impl PolicyReply {
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced,
            text: text.into(),
        }
    }

    /// The verdict when the policy stage does not answer in time: a temporary failure
    /// (451 4.4.3, "directory server failure" in RFC 3463's words for an unreachable helper),
    /// so the client retries and nothing is accepted unchecked.
    pub fn unavailable() -> Self {
        Self::new(
            451,
            (4, 4, 3),
            "Error: policy service unavailable, try again later",
        )
    }
}

/// Everything the policy stage is configured with (`[policy]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    /// Our host name (HELO check).
    pub hostname: String,
    /// New connections per client address; `None` is unlimited.
    pub connect_rate: Option<Rate>,
    /// DNS blocklist zones (`zen.spamhaus.org` style), checked at connect.
    pub dnsbl_zones: Vec<String>,
    pub helo: HeloPolicy,
    /// Messages per envelope sender (`MAIL FROM`), and per authenticated user.
    pub sender_rate: Option<Rate>,
    pub user_rate: Option<Rate>,
    /// Recipients per envelope sender (all its messages together).
    pub rcpt_rate: Option<Rate>,
    /// How long one DNS blocklist query may take before it counts as "not listed".
    pub dnsbl_timeout: Duration,
    /// What RCPT to a suppressed address from a submitter gets.
    pub suppression_action: SuppressionAction,
    /// The reverse-DNS requirement at connect, and how long its lookups may take together
    /// (must be above zero when it is on; the configuration checks).
    pub reverse_dns: ReverseDns,
    pub reverse_dns_timeout: Duration,
}

/// What happens to mail for a suppressed address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuppressionAction {
    /// `550 5.1.1`: the submitter learns at once (and can clean its list).
    #[default]
    Reject,
    /// `250`, and the recipient is silently left out (logged): for senders that cannot handle
    /// refusals.
    Drop,
}

/// Connect-stage check: the DNS blocklists and the reverse-DNS requirement (the connection
/// rate runs in the session, see [`LocalChecks`]).
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Verdict")]
pub struct CheckConnect {
    pub ip: IpAddr,
    /// Whether `policy.reverse_dns` applies: connections to the port-25 listener only, since
    /// submission clients (people on home and mobile lines, often without reverse DNS) are
    /// judged by their credentials.
    #[serde(default)]
    pub reverse_dns: bool,
}

/// MAIL FROM check.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Verdict")]
pub struct CheckMail {
    pub ip: IpAddr,
    /// The reverse-path without brackets; empty for `<>`.
    pub sender: String,
    pub auth_user: Option<String>,
}

/// RCPT check: recipients per sender (the suppression list is read in the session, see
/// [`LocalChecks::suppressed`]).
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Verdict")]
pub struct CheckRcpt {
    pub recipient: String,
    /// The transaction's reverse-path (empty for `<>`).
    pub sender: String,
}

/// Adds entries to the suppression list (an operator, an import, or delivery after a hard
/// bounce). Answers how many were added.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Result<usize, String>")]
pub struct Suppress(pub Vec<Suppressed>);

/// Removes an address; answers whether it was listed.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Result<bool, String>")]
pub struct Unsuppress(pub String);

/// The list, at most `limit` entries (0: all).
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Result<Vec<Suppressed>, String>")]
pub struct ListSuppressed {
    pub limit: usize,
}

/// The checks cheap enough to run in the session itself, without a round trip to the actor:
/// the HELO rules (pure) and the connection-rate buckets (shared state behind a mutex, held for
/// a hash-map lookup) and the suppression list (a sled lookup). The actor keeps a handle too, to
/// sweep idle buckets and to write the suppression list.
pub struct LocalChecks {
    settings: Arc<PolicySettings>,
    connect_buckets: std::sync::Mutex<Buckets<IpAddr>>,
    /// The suppression list, read directly (a sled lookup) at RCPT.
    suppression: std::sync::OnceLock<SuppressionList>,
    /// The known recipients of the domains we serve (`policy.recipients_file`); unset: all.
    recipients: std::sync::OnceLock<recipients::RecipientMap>,
}

impl LocalChecks {
    fn new(settings: Arc<PolicySettings>) -> Self {
        Self {
            connect_buckets: std::sync::Mutex::new(Buckets::new(settings.connect_rate)),
            suppression: std::sync::OnceLock::new(),
            recipients: std::sync::OnceLock::new(),
            settings,
        }
    }

    /// A recipient in one of the domains we serve against `policy.recipients_file`.
    pub fn known_recipient(&self, recipient: &str) -> Verdict {
        match self.recipients.get() {
            Some(map) if !map.accepts(recipient) => {
                info!(%recipient, "unknown recipient");
                Verdict::Refuse(recipients::unknown_user(recipient))
            }
            _ => Verdict::Accept,
        }
    }

    /// A submitter's recipient against the suppression list.
    pub fn suppressed(&self, recipient: &str) -> Verdict {
        let Some(list) = self.suppression.get() else {
            return Verdict::Accept;
        };
        if !list.contains(recipient) {
            return Verdict::Accept;
        }
        info!(%recipient, action = ?self.settings.suppression_action, "suppressed recipient");
        match self.settings.suppression_action {
            SuppressionAction::Reject => Verdict::Refuse(PolicyReply::new(
                550,
                (5, 1, 1),
                "Error: recipient address is on the suppression list",
            )),
            SuppressionAction::Drop => Verdict::Discard,
        }
    }

    /// One connection from `ip` against `policy.connect_rate`.
    pub fn connect(&self, ip: IpAddr) -> Verdict {
        let allowed = self
            .connect_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(ip, Instant::now());
        if allowed {
            return Verdict::Accept;
        }
        info!(%ip, "connection rate limit exceeded");
        Verdict::Refuse(PolicyReply::new(
            421,
            (4, 7, 0),
            "Error: too many connections from your address, slow down",
        ))
    }

    /// The HELO rules for a stranger.
    pub fn helo(&self, ip: IpAddr, helo: &str) -> Verdict {
        match check_helo(helo, &self.settings.hostname, &self.settings.helo) {
            Ok(()) => Verdict::Accept,
            Err(reply) => {
                debug!(%ip, %helo, reason = %reply.text, "HELO refused");
                Verdict::Refuse(reply)
            }
        }
    }

    fn sweep(&self, now: Instant) {
        self.connect_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sweep(now);
    }
}

/// The validation actor. State (rate buckets) lives here; buckets idle for longer than it
/// takes them to refill are dropped by a periodic sweep so memory stays bounded.
pub struct PolicyActor {
    settings: Arc<PolicySettings>,
    resolver: Option<Arc<MxResolver>>,
    local: Arc<LocalChecks>,
    sender_buckets: Buckets<String>,
    user_buckets: Buckets<String>,
    rcpt_buckets: Buckets<String>,
    suppression: Option<SuppressionList>,
}

impl PolicyActor {
    /// The checks sessions run themselves, sharing this actor's state.
    pub fn local_checks(&self) -> Arc<LocalChecks> {
        self.local.clone()
    }

    /// With a suppression list (see [`SuppressionList::open`]).
    pub fn with_suppression(mut self, list: SuppressionList) -> Self {
        let _ = self.local.suppression.set(list.clone());
        self.suppression = Some(list);
        self
    }

    /// With recipient validation for the domains we serve (see [`recipients::RecipientMap`]).
    pub fn with_recipients(self, map: recipients::RecipientMap) -> Self {
        let _ = self.local.recipients.set(map);
        self
    }

    /// `resolver` is needed only with DNS blocklists or the reverse-DNS requirement.
    pub fn new(settings: PolicySettings, resolver: Option<Arc<MxResolver>>) -> Self {
        let settings = Arc::new(settings);
        Self {
            local: Arc::new(LocalChecks::new(settings.clone())),
            resolver,
            sender_buckets: Buckets::new(settings.sender_rate),
            user_buckets: Buckets::new(settings.user_rate),
            rcpt_buckets: Buckets::new(settings.rcpt_rate),
            suppression: None,
            settings,
        }
    }

    /// Drops the buckets that have refilled: they hold nothing a new bucket would not.
    fn sweep(&mut self) {
        let now = Instant::now();
        self.local.sweep(now);
        self.sender_buckets.sweep(now);
        self.user_buckets.sweep(now);
        self.rcpt_buckets.sweep(now);
    }
}

/// How often idle rate buckets are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

impl Actor for PolicyActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(SWEEP_INTERVAL, |act, _| act.sweep());
    }
}

impl Handler<CheckConnect> for PolicyActor {
    type Result = ResponseFuture<Verdict>;

    fn handle(&mut self, req: CheckConnect, _ctx: &mut Self::Context) -> Self::Result {
        let Some(resolver) = self.resolver.clone() else {
            return Box::pin(async { Verdict::Accept });
        };
        let zones = self.settings.dnsbl_zones.clone();
        let dnsbl_timeout = self.settings.dnsbl_timeout;
        let rdns = if req.reverse_dns {
            self.settings.reverse_dns
        } else {
            ReverseDns::Off
        };
        let rdns_timeout = self.settings.reverse_dns_timeout;
        Box::pin(async move {
            // Both at once: the client waits for the slower, not for the sum.
            let blocklists = async {
                if zones.is_empty() {
                    Verdict::Accept
                } else {
                    checks::dnsbl(resolver.clone(), req.ip, zones, dnsbl_timeout).await
                }
            };
            let reverse = rdns::check(resolver.clone(), rdns, req.ip, rdns_timeout);
            match tokio::join!(blocklists, reverse) {
                // A listing is the stronger statement about the client.
                (Verdict::Accept, reverse) => reverse,
                (listed, _) => listed,
            }
        })
    }
}

impl Handler<CheckMail> for PolicyActor {
    type Result = Verdict;

    fn handle(&mut self, req: CheckMail, _ctx: &mut Self::Context) -> Verdict {
        let now = Instant::now();
        if let Some(user) = req.auth_user.as_deref() {
            if !self.user_buckets.take(user.to_ascii_lowercase(), now) {
                info!(user, "message rate limit exceeded for authenticated user");
                return Verdict::Refuse(PolicyReply::new(
                    450,
                    (4, 7, 1),
                    "Error: message rate limit exceeded for your account, try again later",
                ));
            }
        }
        // The null sender is every bounce in the world: rate-limiting it by address would
        // throttle unrelated mail.
        if !req.sender.is_empty()
            && !self
                .sender_buckets
                .take(req.sender.to_ascii_lowercase(), now)
        {
            info!(sender = %req.sender, "message rate limit exceeded for sender");
            return Verdict::Refuse(PolicyReply::new(
                450,
                (4, 7, 1),
                "Error: message rate limit exceeded for this sender, try again later",
            ));
        }
        Verdict::Accept
    }
}

impl Handler<CheckRcpt> for PolicyActor {
    type Result = Verdict;

    fn handle(&mut self, req: CheckRcpt, _ctx: &mut Self::Context) -> Verdict {
        if !req.sender.is_empty()
            && !self
                .rcpt_buckets
                .take(req.sender.to_ascii_lowercase(), Instant::now())
        {
            info!(sender = %req.sender, recipient = %req.recipient, "recipient rate limit exceeded for sender");
            return Verdict::Refuse(PolicyReply::new(
                450,
                (4, 7, 1),
                "Error: recipient rate limit exceeded for this sender, try again later",
            ));
        }
        Verdict::Accept
    }
}

impl Handler<tern_message::HardBounce> for PolicyActor {
    type Result = ();

    fn handle(&mut self, b: tern_message::HardBounce, _ctx: &mut Self::Context) {
        let Some(list) = &self.suppression else {
            return;
        };
        let entry = Suppressed {
            address: b.address.clone(),
            source: "bounce".into(),
            reason: b.reply,
            added_ms: b.at_ms,
        };
        match list.add(&entry) {
            Ok(()) => info!(address = %b.address, "hard bounce: address suppressed"),
            // Postmaster and odd addresses (no domain) cannot be listed; nothing to do.
            Err(e) => debug!(address = %b.address, error = %e, "hard bounce not suppressed"),
        }
    }
}

fn no_list() -> String {
    "the suppression list is not enabled (policy.suppression = false)".into()
}

impl Handler<Suppress> for PolicyActor {
    type Result = Result<usize, String>;

    fn handle(&mut self, Suppress(entries): Suppress, _ctx: &mut Self::Context) -> Self::Result {
        let list = self.suppression.as_ref().ok_or_else(no_list)?;
        let n = list.add_many(&entries).map_err(|e| e.to_string())?;
        for e in &entries {
            info!(address = %e.address, source = %e.source, reason = %e.reason, "address suppressed");
        }
        Ok(n)
    }
}

impl Handler<Unsuppress> for PolicyActor {
    type Result = Result<bool, String>;

    fn handle(
        &mut self,
        Unsuppress(address): Unsuppress,
        _ctx: &mut Self::Context,
    ) -> Self::Result {
        let list = self.suppression.as_ref().ok_or_else(no_list)?;
        list.remove(&address).map_err(|e| e.to_string())
    }
}

impl Handler<ListSuppressed> for PolicyActor {
    type Result = Result<Vec<Suppressed>, String>;

    fn handle(&mut self, req: ListSuppressed, _ctx: &mut Self::Context) -> Self::Result {
        let list = self.suppression.as_ref().ok_or_else(no_list)?;
        Ok(list.list(req.limit))
    }
}

/// Starts a configured policy actor on an arbiter of its own.
pub fn spawn(actor: PolicyActor) -> Addr<PolicyActor> {
    let arbiter = Arbiter::new();
    PolicyActor::start_in_arbiter(&arbiter.handle(), move |_| actor)
}

/// What a session holds to consult the policy stage: the addresses, which checks are on (so a
/// session skips the round trip for a step with nothing to check) and the time limit.
#[derive(Clone)]
pub struct PolicyClient {
    pub connect: Option<Recipient<CheckConnect>>,
    pub mail: Option<Recipient<CheckMail>>,
    pub rcpt: Option<Recipient<CheckRcpt>>,
    /// What RCPT checks: the suppression list (submitters only) and/or the recipient rate (all).
    pub rcpt_suppression: bool,
    pub rcpt_rate: bool,
    /// Connection rate and HELO rules, run in the session.
    pub local: Option<Arc<LocalChecks>>,
    /// The most a session waits for a verdict before using the step's default.
    pub timeout: Duration,
}

impl std::fmt::Debug for PolicyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyClient")
            .field("connect", &self.connect.is_some())
            .field("mail", &self.mail.is_some())
            .field("rcpt", &self.rcpt.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PolicyClient {
    /// A client for `addr` with only the steps `settings` has checks for; the connection rate
    /// and the HELO rules run locally on `local` (from [`PolicyActor::local_checks`]).
    pub fn new(
        addr: &Addr<PolicyActor>,
        local: Arc<LocalChecks>,
        suppression: bool,
        timeout: Duration,
    ) -> Self {
        let settings = local.settings.clone();
        let mail = settings.sender_rate.is_some() || settings.user_rate.is_some();
        // The suppression list is read in the session; only the recipient rate needs the actor.
        let rcpt = settings.rcpt_rate.is_some();
        Self {
            // Only the blocklists and reverse DNS need the actor at connect.
            connect: (!settings.dnsbl_zones.is_empty() || settings.reverse_dns != ReverseDns::Off)
                .then(|| addr.clone().recipient()),
            mail: mail.then(|| addr.clone().recipient()),
            rcpt: rcpt.then(|| addr.clone().recipient()),
            rcpt_suppression: suppression,
            rcpt_rate: settings.rcpt_rate.is_some(),
            local: Some(local),
            timeout,
        }
    }

    /// The connection rate, in the session.
    pub fn connect_local(&self, ip: IpAddr) -> Verdict {
        self.local
            .as_ref()
            .map_or(Verdict::Accept, |l| l.connect(ip))
    }

    /// The HELO rules, in the session.
    pub fn helo_local(&self, ip: IpAddr, helo: &str) -> Verdict {
        match &self.local {
            Some(l) if l.settings.helo.enabled() => l.helo(ip, helo),
            _ => Verdict::Accept,
        }
    }

    /// Whether RCPT needs a round trip to the actor (the recipient rate).
    pub fn checks_rcpt(&self) -> bool {
        self.rcpt.is_some() && self.rcpt_rate
    }

    /// A submitter's recipient against the suppression list, in the session.
    pub fn suppressed_local(&self, recipient: &str) -> Verdict {
        match &self.local {
            Some(l) if self.rcpt_suppression => l.suppressed(recipient),
            _ => Verdict::Accept,
        }
    }

    /// A recipient in one of the domains we serve (`relay.domains`) against the recipients
    /// file, in the session; from anyone, trusted or not.
    pub fn known_recipient_local(&self, recipient: &str) -> Verdict {
        self.local
            .as_ref()
            .map_or(Verdict::Accept, |l| l.known_recipient(recipient))
    }

    /// Asks `to` with the time limit; `on_timeout` when the stage does not answer in time (or
    /// is gone).
    pub async fn ask<M>(&self, to: &Option<Recipient<M>>, msg: M, on_timeout: Verdict) -> Verdict
    where
        M: Message<Result = Verdict> + Send + 'static,
    {
        let Some(to) = to else {
            return Verdict::Accept;
        };
        match tokio::time::timeout(self.timeout, to.send(msg)).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "policy stage unreachable; default verdict");
                on_timeout
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "policy check timed out; default verdict");
                on_timeout
            }
        }
    }
}

#[cfg(test)]
mod tests;
