//! The validation stage: an actor that sessions consult at each SMTP step and that answers with
//! a [`Verdict`]. Requests and verdicts are plain serde data, so the actor can later run on
//! another node; sessions bound every request with a timeout and fall back to the documented
//! default verdict of that step (see [`PolicyClient`]).
//!
//! The checks, by step:
//! * connect: per-address connection rate (token bucket) → `421 4.7.0`; DNS blocklists →
//!   `554 5.7.1` naming the list; reverse DNS ([`rdns`]) → `550 5.7.25` / `450 4.7.25`;
//! * HELO: syntax, optionally a fully qualified name, and strangers claiming our own name;
//! * MAIL: per-sender and per-authenticated-user message rates → `450 4.7.1`;
//! * RCPT: relay control ([`relay`], a pure rule the session calls even with the stage off)
//!   and unknown users of the domains we serve ([`recipients`]) → `550 5.1.1`;
//! * RCPT: the suppression list (submitters), the recipient rate, and greylisting (strangers,
//!   off by default) → `451 4.7.1`;
//! * MAIL, for strangers: SPF ([`CheckSpf`]), recorded, and `550 5.7.23` on `fail` when
//!   `policy.spf = "reject"`;
//! * end of DATA, for strangers: DKIM, ARC and DMARC verification and the content rules
//!   ([`CheckContent`]), answered with the fields to prepend (`Authentication-Results:`,
//!   `X-Tern-Score:`), and a refusal or a hold when DMARC or the score says so.

pub mod auth;
mod bucket;
mod checks;
pub mod greylist;
pub mod headers;
pub mod rdns;
pub mod recipients;
pub mod relay;
pub mod rules;
pub mod suppression;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tern_dns::MxResolver;
use tracing::{debug, info, warn};

pub use auth::{AuthChecks, AuthReport, AuthStatus, Authenticator, DmarcPolicy, SpfRecord};
pub use bucket::{Buckets, Rate, TokenBucket};
pub use checks::{check_helo, HeloPolicy};
pub use greylist::{Greylist, GreylistError, GreylistSettings};
pub use rdns::ReverseDns;
pub use rules::{Rules, RulesError, Score};
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
    /// SPF at MAIL FROM (strangers).
    pub spf: SpfAction,
    /// DKIM and ARC verification at the end of DATA (strangers).
    pub dkim_verify: bool,
    pub arc_verify: bool,
    /// What a DMARC failure does (strangers).
    pub dmarc: DmarcAction,
    /// Greylisting of strangers at RCPT.
    pub greylist: GreylistSettings,
    /// The reverse-DNS requirement at connect, and how long its lookups may take together
    /// (must be above zero when it is on; the configuration checks).
    pub reverse_dns: ReverseDns,
    pub reverse_dns_timeout: Duration,
}

/// What SPF does at MAIL FROM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfAction {
    /// Not evaluated.
    Off,
    /// Evaluated and reported (Authentication-Results, content rules, DMARC); never refuses by
    /// itself. The default: RFC 7489 §10.1 warns that rejecting on SPF alone, before DMARC has
    /// looked at DKIM, loses forwarded mail that DKIM would have vouched for.
    #[default]
    Record,
    /// `fail` (`-all`) refuses MAIL FROM with `550 5.7.23` (RFC 7372).
    Reject,
}

/// What a DMARC failure does with the From domain's policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcAction {
    /// Not evaluated.
    Off,
    /// Evaluated and reported only.
    Record,
    /// `p=quarantine` and `p=reject` both hold the message (the override large receivers use
    /// to avoid bouncing mail a mailing list broke).
    Hold,
    /// `p=reject` refuses with `550 5.7.1`, `p=quarantine` holds.
    #[default]
    Enforce,
}

/// The content rules and their thresholds (`policy.rules_file`, `policy.reject_score`,
/// `policy.quarantine_score`).
#[derive(Debug)]
pub struct ContentSettings {
    pub rules: Rules,
    pub reject_score: f64,
    pub quarantine_score: f64,
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

/// RCPT check: recipients per sender, then greylisting (the suppression list is read in the
/// session, see [`LocalChecks::suppressed`]).
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "Verdict")]
pub struct CheckRcpt {
    pub recipient: String,
    /// The transaction's reverse-path (empty for `<>`).
    pub sender: String,
    /// The client's address when the session wants the triplet greylisted: a stranger (not
    /// in `relay.networks`, not authenticated); `None` skips greylisting.
    #[serde(default)]
    pub greylist_client: Option<IpAddr>,
}

/// MAIL FROM from a stranger: SPF.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "SpfVerdict")]
pub struct CheckSpf {
    pub ip: IpAddr,
    pub helo: String,
    /// The reverse-path without brackets; empty for `<>`.
    pub sender: String,
}

/// The SPF result (kept with the transaction) and what it means for MAIL FROM.
#[derive(MessageResponse, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpfVerdict {
    pub spf: SpfRecord,
    pub verdict: Verdict,
}

impl SpfVerdict {
    /// SPF not evaluated.
    pub fn accept() -> Self {
        Self {
            spf: SpfRecord::default(),
            verdict: Verdict::Accept,
        }
    }

    /// When the stage does not answer in time: `temperror` recorded, mail goes on (an SPF
    /// outage must not stop mail; receivers treat temperror as "no opinion").
    pub fn unavailable(sender: &str, helo: &str) -> Self {
        Self {
            spf: SpfRecord {
                status: AuthStatus::TempError,
                domain: auth::spf_domain(sender, helo).to_string(),
            },
            verdict: Verdict::Accept,
        }
    }
}

/// A stranger's message at the end of DATA, before it is queued.
#[derive(Message, Clone, Debug, Serialize, Deserialize)]
#[rtype(result = "ContentVerdict")]
pub struct CheckContent {
    pub ip: IpAddr,
    pub helo: String,
    pub sender: String,
    /// What SPF said at MAIL FROM, if it ran.
    pub spf: Option<SpfRecord>,
    /// The content as the client sent it (without our Received field).
    pub message: bytes::Bytes,
}

/// What to do with the message: refuse, hold or accept, and the fields to prepend.
#[derive(MessageResponse, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContentVerdict {
    pub verdict: Verdict,
    /// Queue the message in the hold state, for this reason.
    pub hold: Option<String>,
    /// `Authentication-Results:` and `X-Tern-Score:` fields, CRLF-terminated.
    pub headers: String,
}

impl ContentVerdict {
    /// Nothing to say: queue it as it is.
    pub fn accept() -> Self {
        Self {
            verdict: Verdict::Accept,
            hold: None,
            headers: String::new(),
        }
    }

    /// The stage did not answer in time: try again later (nothing unchecked gets in).
    pub fn unavailable() -> Self {
        Self {
            verdict: Verdict::Refuse(PolicyReply::unavailable()),
            ..Self::accept()
        }
    }
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
    authenticator: Option<Arc<Authenticator>>,
    content: Option<Arc<ContentSettings>>,
    greylist: Option<Greylist>,
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

    /// What a [`PolicyClient`] for this actor needs to know, taken before the actor starts.
    pub fn steps(&self) -> Steps {
        Steps {
            local: self.local.clone(),
            spf: self.authenticator.is_some() && self.settings.spf != SpfAction::Off,
            content: self.checks_content(),
            messages: self.message_checks(),
        }
    }

    fn message_checks(&self) -> Arc<MessageChecks> {
        Arc::new(MessageChecks {
            authenticator: self.authenticator.clone(),
            content: self.content.clone(),
            checks: self.auth_checks(),
            spf_action: self.settings.spf,
            dmarc_action: self.settings.dmarc,
        })
    }

    /// With SPF/DKIM/ARC/DMARC (as `settings` enables them), through `authenticator`.
    pub fn with_authenticator(mut self, authenticator: Authenticator) -> Self {
        self.authenticator = Some(Arc::new(authenticator));
        self
    }

    /// With content rules.
    pub fn with_content(mut self, content: ContentSettings) -> Self {
        self.content = Some(Arc::new(content));
        self
    }

    /// Whether the end-of-DATA step has anything to do.
    pub fn checks_content(&self) -> bool {
        self.content.is_some() || (self.authenticator.is_some() && self.auth_checks().any())
    }

    fn auth_checks(&self) -> AuthChecks {
        AuthChecks {
            dkim: self.settings.dkim_verify,
            arc: self.settings.arc_verify,
            dmarc: self.settings.dmarc != DmarcAction::Off,
        }
    }

    /// With greylisting (see [`Greylist::open`]).
    pub fn with_greylist(mut self, list: Greylist) -> Self {
        self.greylist = Some(list);
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
            authenticator: None,
            content: None,
            greylist: None,
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

    fn sweep_greylist(&mut self) {
        let Some(list) = &self.greylist else {
            return;
        };
        match list.sweep(tern_message::now_ms()) {
            Ok(n) => debug!(removed = n, "greylist swept"),
            Err(e) => warn!(error = %e, "greylist sweep failed"),
        }
    }
}

/// How often idle rate buckets are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How often expired greylist triplets are removed: a walk over the whole database, and an
/// expired entry left a while longer costs nothing (it is judged expired when read).
const GREYLIST_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

impl Actor for PolicyActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(SWEEP_INTERVAL, |act, _| act.sweep());
        ctx.run_interval(GREYLIST_SWEEP_INTERVAL, |act, _| act.sweep_greylist());
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

/// The per-message checks (SPF at MAIL FROM; authentication and content rules at the end of
/// DATA). They keep no state between messages, so besides serving the actor's handlers they run
/// in the session itself (see [`PolicyClient::spf`]): two cross-thread round trips per message
/// cost more than the checks (docs/benchmarks.md, "Validation stage").
#[derive(Debug)]
pub struct MessageChecks {
    authenticator: Option<Arc<Authenticator>>,
    content: Option<Arc<ContentSettings>>,
    checks: AuthChecks,
    spf_action: SpfAction,
    dmarc_action: DmarcAction,
}

impl MessageChecks {
    /// SPF for a stranger's MAIL FROM.
    pub async fn spf(&self, req: CheckSpf) -> SpfVerdict {
        let action = self.spf_action;
        let Some(auth) = self
            .authenticator
            .as_ref()
            .filter(|_| action != SpfAction::Off)
        else {
            return SpfVerdict::accept();
        };
        let spf = auth.spf(req.ip, &req.helo, &req.sender).await;
        debug!(ip = %req.ip, sender = %req.sender, spf = %spf.status, domain = %spf.domain, "SPF");
        let verdict = if action == SpfAction::Reject && spf.status == AuthStatus::Fail {
            info!(ip = %req.ip, sender = %req.sender, "SPF fail: MAIL FROM refused");
            Verdict::Refuse(PolicyReply::new(
                550,
                (5, 7, 23),
                format!(
                    "Error: SPF check failed: {} does not designate {} as permitted sender",
                    spf.domain, req.ip
                ),
            ))
        } else {
            Verdict::Accept
        };
        SpfVerdict { spf, verdict }
    }

    /// DKIM, ARC, DMARC and the content rules for a stranger's message.
    pub async fn content(&self, req: CheckContent) -> ContentVerdict {
        let checks = self.checks;
        let report = match self.authenticator.as_ref().filter(|_| checks.any()) {
            Some(a) => Some(
                a.verify(
                    &req.message,
                    req.ip,
                    &req.helo,
                    &req.sender,
                    req.spf.as_ref(),
                    checks,
                )
                .await,
            ),
            None => None,
        };
        judge(&req, report, self.content.as_deref(), self.dmarc_action)
    }
}

impl Handler<CheckSpf> for PolicyActor {
    type Result = ResponseFuture<SpfVerdict>;

    fn handle(&mut self, req: CheckSpf, _ctx: &mut Self::Context) -> Self::Result {
        let checks = self.message_checks();
        Box::pin(async move { checks.spf(req).await })
    }
}

impl Handler<CheckContent> for PolicyActor {
    type Result = ResponseFuture<ContentVerdict>;

    fn handle(&mut self, req: CheckContent, _ctx: &mut Self::Context) -> Self::Result {
        let checks = self.message_checks();
        Box::pin(async move { checks.content(req).await })
    }
}

/// The end-of-DATA decision from what authentication found and the content score.
fn judge(
    req: &CheckContent,
    report: Option<AuthReport>,
    content: Option<&ContentSettings>,
    dmarc_action: DmarcAction,
) -> ContentVerdict {
    let mut out = ContentVerdict::accept();
    let fallback;
    let report = match report {
        Some(r) => {
            out.headers.push_str(&r.header);
            fallback = r;
            &fallback
        }
        None => {
            fallback = AuthReport {
                spf: req.spf.as_ref().map_or(AuthStatus::None, |s| s.status),
                ..AuthReport::default()
            };
            &fallback
        }
    };
    if report.dmarc == AuthStatus::Fail {
        let domain = &report.from_domain;
        let policy = report.dmarc_policy;
        match (dmarc_action, policy) {
            (DmarcAction::Enforce, DmarcPolicy::Reject) => {
                info!(sender = %req.sender, %domain, "DMARC fail, p=reject: message refused");
                out.verdict = Verdict::Refuse(PolicyReply::new(
                    550,
                    (5, 7, 1),
                    format!("Error: message rejected by the DMARC policy of {domain}"),
                ));
            }
            (
                DmarcAction::Enforce | DmarcAction::Hold,
                DmarcPolicy::Reject | DmarcPolicy::Quarantine,
            ) => {
                info!(sender = %req.sender, %domain, %policy, "DMARC fail: message held");
                out.hold = Some(format!("DMARC policy {policy} of {domain}"));
            }
            _ => {}
        }
    }
    // A DMARC check that failed for a DNS error under p=reject or quarantine: the mail may be
    // a forgery relying on a broken name under the domain, or genuine mail whose check would
    // pass with the DNS back. Asking the sender to retry serves both (RFC 7489 §6.6.3 lets a
    // receiver defer); a genuine sender's retry gets through once the DNS answers.
    if report.dmarc == AuthStatus::TempError
        && matches!(
            report.dmarc_policy,
            DmarcPolicy::Reject | DmarcPolicy::Quarantine
        )
    {
        let domain = &report.from_domain;
        let policy = report.dmarc_policy;
        match dmarc_action {
            DmarcAction::Enforce => {
                info!(sender = %req.sender, %domain, %policy, "DMARC temperror: message deferred");
                out.verdict = Verdict::Refuse(PolicyReply::new(
                    451,
                    (4, 7, 1),
                    format!(
                        "Try again later: the DMARC check of {domain} failed temporarily (DNS)"
                    ),
                ));
            }
            DmarcAction::Hold => {
                info!(sender = %req.sender, %domain, %policy, "DMARC temperror: message held");
                out.hold = Some(format!("DMARC temperror under policy {policy} of {domain}"));
            }
            _ => {}
        }
    }
    // A message DMARC already refused is not worth a MIME parse and the rules.
    if let Some(content) = content.filter(|_| out.verdict == Verdict::Accept) {
        let score = content.rules.score(&req.message, report);
        out.headers.push_str(&score.header());
        if out.verdict == Verdict::Accept {
            if score.total >= content.reject_score {
                info!(sender = %req.sender, score = score.total, "content score: message refused");
                out.verdict = Verdict::Refuse(PolicyReply::new(
                    550,
                    (5, 7, 1),
                    format!(
                        "Error: message content rejected as spam (score {:.1})",
                        score.total
                    ),
                ));
            } else if score.total >= content.quarantine_score && out.hold.is_none() {
                info!(sender = %req.sender, score = score.total, "content score: message held");
                out.hold = Some(format!(
                    "content score {:.1} >= quarantine_score {}",
                    score.total, content.quarantine_score
                ));
            }
        }
    }
    out
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
        if let (Some(ip), Some(list)) = (req.greylist_client, &self.greylist) {
            match list.check(ip, &req.sender, &req.recipient, tern_message::now_ms()) {
                Ok(greylist::Decision::Pass) => {}
                Ok(greylist::Decision::Wait { seconds }) => {
                    info!(%ip, sender = %req.sender, recipient = %req.recipient, seconds, "greylisted");
                    return Verdict::Refuse(PolicyReply::new(
                        451,
                        (4, 7, 1),
                        format!("Greylisted, try again in {seconds} seconds"),
                    ));
                }
                // Like a blocklist outage: a broken greylist database must not stop mail.
                Err(e) => warn!(error = %e, "greylist unavailable; recipient accepted"),
            }
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

/// Which steps an actor has work for (see [`PolicyActor::steps`]).
pub struct Steps {
    pub local: Arc<LocalChecks>,
    pub spf: bool,
    pub content: bool,
    /// The per-message checks, to run in the session.
    pub messages: Arc<MessageChecks>,
}

/// What a session holds to consult the policy stage: the addresses, which checks are on (so a
/// session skips the round trip for a step with nothing to check) and the time limit.
#[derive(Clone)]
pub struct PolicyClient {
    pub connect: Option<Recipient<CheckConnect>>,
    pub mail: Option<Recipient<CheckMail>>,
    pub rcpt: Option<Recipient<CheckRcpt>>,
    /// SPF at MAIL FROM and the end-of-DATA checks, for strangers.
    pub spf: Option<Recipient<CheckSpf>>,
    pub content: Option<Recipient<CheckContent>>,
    /// When set, SPF and the end-of-DATA checks run in the session with this instead of a
    /// round trip to `spf`/`content` (same code, same time limit).
    pub messages: Option<Arc<MessageChecks>>,
    /// What RCPT checks: the suppression list (submitters only), the recipient rate (all),
    /// greylisting (strangers only).
    pub rcpt_suppression: bool,
    pub rcpt_rate: bool,
    pub rcpt_greylist: bool,
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
            .field("spf", &self.spf.is_some())
            .field("content", &self.content.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PolicyClient {
    /// A client for `addr` with only the steps `settings` has checks for; the connection rate
    /// and the HELO rules run locally on `local` (from [`PolicyActor::local_checks`]).
    pub fn new(
        addr: &Addr<PolicyActor>,
        steps: Steps,
        suppression: bool,
        timeout: Duration,
    ) -> Self {
        let Steps {
            local,
            spf,
            content,
            messages,
        } = steps;
        let settings = local.settings.clone();
        let mail = settings.sender_rate.is_some() || settings.user_rate.is_some();
        // The suppression list is read in the session; the recipient rate and greylisting need
        // the actor.
        let rcpt = settings.rcpt_rate.is_some() || settings.greylist.enabled;
        Self {
            // Only the blocklists and reverse DNS need the actor at connect.
            connect: (!settings.dnsbl_zones.is_empty() || settings.reverse_dns != ReverseDns::Off)
                .then(|| addr.clone().recipient()),
            mail: mail.then(|| addr.clone().recipient()),
            rcpt: rcpt.then(|| addr.clone().recipient()),
            spf: spf.then(|| addr.clone().recipient()),
            content: content.then(|| addr.clone().recipient()),
            messages: (spf || content).then_some(messages),
            rcpt_suppression: suppression,
            rcpt_rate: settings.rcpt_rate.is_some(),
            rcpt_greylist: settings.greylist.enabled,
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

    /// Whether RCPT needs a round trip to the actor: the recipient rate, or greylisting for a
    /// `stranger`.
    pub fn checks_rcpt(&self, stranger: bool) -> bool {
        self.rcpt.is_some() && (self.rcpt_rate || self.greylists(stranger))
    }

    /// Whether this client's recipients are greylisted.
    pub fn greylists(&self, stranger: bool) -> bool {
        stranger && self.rcpt_greylist
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
        match to {
            Some(to) => self.ask_for(to, msg, on_timeout).await,
            None => Verdict::Accept,
        }
    }

    /// Whether MAIL FROM has an SPF check to make (strangers).
    pub fn checks_spf(&self) -> bool {
        self.spf.is_some()
    }

    /// Whether the end of DATA has checks to make (strangers).
    pub fn checks_content(&self) -> bool {
        self.content.is_some()
    }

    /// SPF for a stranger's MAIL FROM, in the session when it can, within the time limit;
    /// `temperror` and go on when it does not answer in time.
    pub async fn spf(&self, check: CheckSpf) -> SpfVerdict {
        let unavailable = SpfVerdict::unavailable(&check.sender, &check.helo);
        match (&self.messages, &self.spf) {
            (Some(m), _) => self.within(m.spf(check), unavailable).await,
            (None, Some(to)) => self.ask_for(to, check, unavailable).await,
            (None, None) => SpfVerdict::accept(),
        }
    }

    /// The end-of-DATA checks of a stranger's message, in the session when it can, within the
    /// time limit; `451 4.4.3` when they do not finish in time.
    pub async fn content(&self, check: CheckContent) -> ContentVerdict {
        match (&self.messages, &self.content) {
            (Some(m), _) => {
                self.within(m.content(check), ContentVerdict::unavailable())
                    .await
            }
            (None, Some(to)) => self.ask_for(to, check, ContentVerdict::unavailable()).await,
            (None, None) => ContentVerdict::accept(),
        }
    }

    async fn within<R>(&self, work: impl std::future::Future<Output = R>, on_timeout: R) -> R {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "policy check timed out; default verdict");
                on_timeout
            }
        }
    }

    /// [`ask`](Self::ask) for any answer type.
    pub async fn ask_for<M, R>(&self, to: &Recipient<M>, msg: M, on_timeout: R) -> R
    where
        M: Message<Result = R> + Send + 'static,
        R: Send + 'static,
    {
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
