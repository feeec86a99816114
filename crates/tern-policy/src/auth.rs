//! Sender authentication with mail-auth: SPF when the client names its sender (MAIL FROM), then
//! DKIM, ARC and DMARC once the message is in (end of DATA), summed up in an
//! `Authentication-Results:` field (RFC 8601) that names us as the authentication server.
//!
//! mail-auth brings its own resolver (hickory 0.25); it is pointed at the same name servers as the
//! rest of Tern (`dns.nameservers`) and relies on the resolver's TTL cache. The results travel
//! between stages as the plain serde types below ([`AuthStatus`], [`SpfRecord`]), never as
//! mail-auth's borrowed outputs, so the stage can run on another node.

use std::borrow::Borrow;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Alignment, Dmarc, Policy as DmarcRecordPolicy};
use mail_auth::hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::hickory_resolver::proto::xfer::Protocol;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcResult,
    MessageAuthenticator, Parameters, ResolverCache, SpfOutput, SpfResult, Txt,
};
use serde::{Deserialize, Serialize};

/// A check's result, with RFC 8601's names (`softfail` only for SPF).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthStatus {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    TempError,
    PermError,
    /// Nothing to check: no record, no signature.
    #[default]
    None,
}

impl AuthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthStatus::Pass => "pass",
            AuthStatus::Fail => "fail",
            AuthStatus::SoftFail => "softfail",
            AuthStatus::Neutral => "neutral",
            AuthStatus::TempError => "temperror",
            AuthStatus::PermError => "permerror",
            AuthStatus::None => "none",
        }
    }
}

impl fmt::Display for AuthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SpfResult> for AuthStatus {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => AuthStatus::Pass,
            SpfResult::Fail => AuthStatus::Fail,
            SpfResult::SoftFail => AuthStatus::SoftFail,
            SpfResult::Neutral => AuthStatus::Neutral,
            SpfResult::TempError => AuthStatus::TempError,
            SpfResult::PermError => AuthStatus::PermError,
            SpfResult::None => AuthStatus::None,
        }
    }
}

impl From<AuthStatus> for SpfResult {
    fn from(s: AuthStatus) -> Self {
        match s {
            AuthStatus::Pass => SpfResult::Pass,
            AuthStatus::Fail => SpfResult::Fail,
            AuthStatus::SoftFail => SpfResult::SoftFail,
            AuthStatus::Neutral => SpfResult::Neutral,
            AuthStatus::TempError => SpfResult::TempError,
            AuthStatus::PermError => SpfResult::PermError,
            AuthStatus::None => SpfResult::None,
        }
    }
}

fn dkim_status(r: &DkimResult) -> AuthStatus {
    match r {
        DkimResult::Pass => AuthStatus::Pass,
        DkimResult::Neutral(_) => AuthStatus::Neutral,
        DkimResult::Fail(_) => AuthStatus::Fail,
        DkimResult::PermError(_) => AuthStatus::PermError,
        DkimResult::TempError(_) => AuthStatus::TempError,
        DkimResult::None => AuthStatus::None,
    }
}

/// The SPF result for the MAIL FROM identity (the HELO identity for the null sender), kept
/// with the transaction until the message is in: DMARC needs it and Authentication-Results
/// reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpfRecord {
    pub status: AuthStatus,
    /// The domain whose record was evaluated.
    pub domain: String,
}

/// The domain SPF speaks for: the MAIL FROM domain, or the HELO name for the null sender
/// (RFC 7208 §2.4).
pub fn spf_domain<'a>(sender: &'a str, helo: &'a str) -> &'a str {
    sender.rsplit_once('@').map_or(helo, |(_, d)| d)
}

/// A domain's DMARC policy (`p=`, or `sp=` for a subdomain), after `pct=` sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    #[default]
    None,
    Quarantine,
    Reject,
}

impl fmt::Display for DmarcPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        })
    }
}

/// What the end-of-DATA checks found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthReport {
    pub spf: AuthStatus,
    /// Pass if any signature passed; otherwise the first signature's result; none without any.
    pub dkim: AuthStatus,
    pub arc: AuthStatus,
    pub dmarc: AuthStatus,
    /// The From domain's policy, meaningful when `dmarc` is `fail` or `temperror` (with a
    /// record).
    pub dmarc_policy: DmarcPolicy,
    /// The RFC 5322.From domain DMARC evaluated (empty when it could not: no or several).
    pub from_domain: String,
    /// The complete `Authentication-Results:` field, CRLF-terminated.
    pub header: String,
}

/// Which end-of-DATA checks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthChecks {
    pub dkim: bool,
    pub arc: bool,
    pub dmarc: bool,
}

impl AuthChecks {
    pub fn any(&self) -> bool {
        self.dkim || self.arc || self.dmarc
    }
}

/// Parsed TXT records (SPF, DKIM keys, DMARC) until their TTL ends. hickory caches the raw
/// answers already; this keeps mail-auth from parsing the same SPF and DMARC records again for
/// every message of a busy sender.
#[derive(Default)]
struct TxtCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (Txt, Instant)>>,
}

/// Past this many records the cache drops what has expired, then everything if that is not
/// enough: a bound on memory, not an eviction policy (hickory's cache still answers).
const TXT_CACHE_MAX: usize = 4096;

impl ResolverCache<String, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(name) {
            Some((txt, until)) if *until > Instant::now() => Some(txt.clone()),
            _ => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(name).map(|(txt, _)| txt)
    }

    fn insert(&self, key: String, value: Txt, valid_until: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= TXT_CACHE_MAX {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= TXT_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (value, valid_until));
    }
}

/// mail-auth with our resolver settings and host name (the authserv-id).
#[derive(Clone)]
pub struct Authenticator {
    inner: MessageAuthenticator,
    hostname: String,
    txt: Arc<TxtCache>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// The organizational domain (RFC 7489 §3.2) from the public suffix list, for relaxed
/// alignment: `news.example.co.uk` and `example.co.uk` align, `a.co.uk` and `b.co.uk` do not.
fn organizational_domain(domain: &str) -> &str {
    psl::domain_str(domain).unwrap_or(domain)
}

impl Authenticator {
    /// `nameservers`: `dns.nameservers` (None: the system configuration). `timeout` bounds each
    /// DNS query, so a slow zone yields `temperror` rather than a stalled session.
    pub fn new(
        hostname: &str,
        nameservers: Option<&[SocketAddr]>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let inner = match nameservers {
            None => MessageAuthenticator::new_system_conf().map_err(|e| e.to_string())?,
            Some([]) => return Err("empty name server list".into()),
            Some(servers) => {
                let mut group = NameServerConfigGroup::with_capacity(servers.len() * 2);
                for addr in servers {
                    for protocol in [Protocol::Udp, Protocol::Tcp] {
                        group.push(NameServerConfig::new(*addr, protocol));
                    }
                }
                let mut opts = ResolverOpts::default();
                opts.timeout = timeout;
                opts.attempts = 2;
                // An explicit server list is deliberate (tests, split horizon).
                opts.use_hosts_file = ResolveHosts::Never;
                MessageAuthenticator::new(ResolverConfig::from_parts(None, vec![], group), opts)
                    .map_err(|e| e.to_string())?
            }
        };
        Ok(Self {
            inner,
            hostname: hostname.to_string(),
            txt: Arc::new(TxtCache::default()),
        })
    }

    /// SPF for `sender` (empty: the null sender, so the HELO identity, RFC 7208 §2.4).
    pub async fn spf(&self, ip: IpAddr, helo: &str, sender: &str) -> SpfRecord {
        let params = if sender.is_empty() {
            SpfParameters::verify_ehlo(ip, helo, &self.hostname)
        } else {
            SpfParameters::verify_mail_from(ip, helo, &self.hostname, sender)
        };
        let out: SpfOutput = self
            .inner
            .verify_spf(Parameters::new(params).with_txt_cache(self.txt.as_ref()))
            .await;
        let mut status: AuthStatus = out.result().into();
        if status == AuthStatus::None && self.lookup_failed(out.domain()).await {
            // mail-auth 0.7 reads any "no records" error as "no SPF record", SERVFAIL
            // included; RFC 7208 §4.4 makes a server failure or a timeout `temperror`.
            status = AuthStatus::TempError;
        }
        SpfRecord {
            status,
            domain: out.domain().to_string(),
        }
    }

    /// Whether a TXT query for `domain` fails for another reason than "no such record" (a
    /// SERVFAIL, REFUSED or timeout). Asked only after an SPF `none`, from the resolver's cache
    /// when the answer is still there.
    async fn lookup_failed(&self, domain: &str) -> bool {
        use mail_auth::hickory_resolver::proto::op::ResponseCode;
        use mail_auth::hickory_resolver::proto::ProtoErrorKind;
        use mail_auth::hickory_resolver::ResolveErrorKind;
        if domain.is_empty() {
            return false;
        }
        match self.inner.resolver().txt_lookup(format!("{domain}.")).await {
            Ok(_) => false,
            Err(e) => match e.kind() {
                ResolveErrorKind::Proto(p) => match p.kind() {
                    ProtoErrorKind::NoRecordsFound { response_code, .. } => !matches!(
                        *response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ),
                    _ => true,
                },
                _ => true,
            },
        }
    }

    /// Whether the DMARC record of `from_domain` (its own, or its organizational domain's)
    /// could not be looked up: mail-auth 0.7 reads a SERVFAIL there as "no record", which
    /// would take a broken zone's mail out of its own policy; RFC 7489 §6.6.3 makes a
    /// temporary DNS error a reason to stop with `temperror`. Asked only when no record was
    /// found; the resolver's negative cache answers for zones that have none.
    async fn dmarc_lookup_failed(&self, from_domain: &str) -> bool {
        if from_domain.is_empty() {
            return false;
        }
        let org = organizational_domain(from_domain);
        self.lookup_failed(&format!("_dmarc.{from_domain}")).await
            || (org != from_domain && self.lookup_failed(&format!("_dmarc.{org}")).await)
    }

    /// The policy for mail from `from_domain` under `record` (RFC 7489 §6.6.3): `p=` when the
    /// record is the From domain's own, `sp=` (which defaults to `p=`) when it was found above
    /// it (the organizational domain's, or a public suffix's, RFC 9091) because the From
    /// domain has none. mail-auth 0.7 takes `sp=` only when alignment passed through the
    /// organizational domain, so a failing message from a subdomain got `p=`. Its tree walk
    /// has just asked for this name: a record comes from the TXT cache, a "none" from the
    /// resolver's negative cache. The flag is true when the From domain's own record could
    /// not be looked up (SERVFAIL, timeout): the policy is then the stricter of the two, and
    /// a failure no better than `temperror` (`failed`: DMARC failed, so that matters).
    async fn record_policy(
        &self,
        from_domain: &str,
        record: &Dmarc,
        failed: bool,
    ) -> (DmarcRecordPolicy, bool) {
        // Most records have no sp= of their own (it defaults to p=): the policy is the same
        // either way, and only a failure needs to know whether the own name was readable.
        if record.sp == record.p && !failed {
            return (record.p, false);
        }
        let own = self
            .inner
            .txt_lookup::<Dmarc>(format!("_dmarc.{from_domain}."), Some(self.txt.as_ref()))
            .await;
        match own {
            Err(mail_auth::Error::DnsRecordNotFound(code)) if !is_no_such_record(code) => {
                (stricter(record.p, record.sp), true)
            }
            Err(mail_auth::Error::DnsRecordNotFound(_) | mail_auth::Error::InvalidRecordType) => {
                (record.sp, false)
            }
            Err(mail_auth::Error::DnsError(_)) => (stricter(record.p, record.sp), true),
            // Its own record (the tree walk found this one first, so it is that record).
            _ => (record.p, false),
        }
    }

    /// DKIM, ARC and DMARC over `message` (the content as received), and the
    /// Authentication-Results field reporting them and `spf`.
    pub async fn verify(
        &self,
        message: &[u8],
        ip: IpAddr,
        helo: &str,
        sender: &str,
        spf: Option<&SpfRecord>,
        checks: AuthChecks,
    ) -> AuthReport {
        let mut report = AuthReport {
            spf: spf.map_or(AuthStatus::None, |s| s.status),
            ..AuthReport::default()
        };
        let Some(msg) = AuthenticatedMessage::parse(message) else {
            // mail-auth found no header at all; nothing to authenticate.
            report.header = format!(
                "Authentication-Results: {}; none (no header section)\r\n",
                self.hostname
            );
            return report;
        };
        let verified = if checks.dkim {
            self.inner
                .verify_dkim(Parameters::new(&msg).with_txt_cache(self.txt.as_ref()))
                .await
        } else {
            Vec::new()
        };
        let dkim: Vec<DkimOutput<'_>> = verified
            .iter()
            .map(key_lookup_failure_is_temporary)
            .collect();
        report.dkim = if dkim.iter().any(|o| o.result() == &DkimResult::Pass) {
            AuthStatus::Pass
        } else {
            dkim.first()
                .map_or(AuthStatus::None, |o| dkim_status(o.result()))
        };
        let mut results = AuthenticationResults::new(&self.hostname);
        if !dkim.is_empty() {
            results = results.with_dkim_results(&dkim, msg.from());
        }
        let spf_output = spf.map(|s| SpfOutput::new(s.domain.clone()).with_result(s.status.into()));
        if let Some(out) = &spf_output {
            results = if sender.is_empty() {
                results.with_spf_ehlo_result(out, ip, helo)
            } else {
                results.with_spf_mailfrom_result(out, ip, sender, helo)
            };
        }
        if checks.arc {
            let arc = self
                .inner
                .verify_arc(Parameters::new(&msg).with_txt_cache(self.txt.as_ref()))
                .await;
            report.arc = dkim_status(arc.result());
            if report.arc != AuthStatus::None {
                results = results.with_arc_result(&arc, ip);
            }
        }
        let mut dmarc_clause = String::new();
        if checks.dmarc {
            let none = SpfOutput::new(String::new());
            let mail_from_domain = spf_domain(sender, helo);
            let params = DmarcParameters::new(
                &msg,
                &dkim,
                mail_from_domain,
                spf_output.as_ref().unwrap_or(&none),
            )
            .with_domain_suffix_fn(organizational_domain);
            let out = self
                .inner
                .verify_dmarc(Parameters::new(params).with_txt_cache(self.txt.as_ref()))
                .await;
            let (spf_r, dkim_r) = (out.spf_result(), out.dkim_result());
            let is = |f: fn(&DmarcResult) -> bool| f(spf_r) || f(dkim_r);
            // mail-auth leaves both results at "none" when a record exists but neither SPF nor
            // DKIM passed; that is a DMARC failure (RFC 7489 §6.6.2).
            report.dmarc = if is(|r| *r == DmarcResult::Pass) {
                AuthStatus::Pass
            } else if is(|r| matches!(r, DmarcResult::TempError(_))) {
                AuthStatus::TempError
            } else if is(|r| matches!(r, DmarcResult::PermError(_))) {
                AuthStatus::PermError
            } else if let Some(record) = out.dmarc_record() {
                if aligned_temperror(out.domain(), record, &dkim, spf, mail_from_domain) {
                    AuthStatus::TempError
                } else {
                    AuthStatus::Fail
                }
            } else if self.dmarc_lookup_failed(out.domain()).await {
                AuthStatus::TempError
            } else {
                AuthStatus::None
            };
            report.from_domain = out.domain().to_string();
            let mut policy = out.policy();
            if let Some(record) = out.dmarc_record() {
                let own_lookup_failed;
                let failed = report.dmarc == AuthStatus::Fail;
                (policy, own_lookup_failed) =
                    self.record_policy(out.domain(), record, failed).await;
                if own_lookup_failed && failed {
                    report.dmarc = AuthStatus::TempError;
                }
                report.dmarc_policy = sampled(policy, record.pct);
            }
            if !report.from_domain.is_empty() {
                dmarc_clause = format!(
                    ";\r\n\tdmarc={} header.from={} policy.dmarc={}",
                    report.dmarc, report.from_domain, policy
                );
            }
        }
        let mut header = results.to_header();
        if !dmarc_clause.is_empty() {
            // mail-auth's own DMARC clause says "none" for a failure (see above); ours goes
            // before the field's final CRLF.
            let end = header.len() - 2;
            header.insert_str(end, &dmarc_clause);
        }
        report.header = header;
        report
    }
}

/// mail-auth 0.7 reads a SERVFAIL (or REFUSED) for a signature's key record as a missing key,
/// a permanent error; RFC 6376 §6.1.2 makes a key that cannot be retrieved for a temporary
/// reason TEMPFAIL. Other results are kept as they are.
fn key_lookup_failure_is_temporary<'x>(out: &'x DkimOutput<'x>) -> DkimOutput<'x> {
    match out.result() {
        DkimResult::PermError(mail_auth::Error::DnsRecordNotFound(code))
            if !is_no_such_record(*code) =>
        {
            let temp =
                DkimOutput::temp_err(mail_auth::Error::DnsError(format!("key lookup: {code}")));
            match out.signature() {
                Some(signature) => temp.with_signature(signature),
                None => temp,
            }
        }
        _ => out.clone(),
    }
}

/// Whether a DMARC failure may be only a DNS outage: a DKIM signature or the SPF check that
/// would align with the From domain under `record`'s modes (`adkim=`/`aspf=`: relaxed, the same
/// organizational domain; strict, the same domain) ended in `temperror`, so with the DNS back
/// it might have passed. Such mail gets `dmarc=temperror` rather than `fail`; under `p=reject`
/// or `quarantine` the sender is asked to try again later (see `judge`), never let through,
/// since a forger can name a signing domain under the victim's that fails to resolve.
fn aligned_temperror(
    from_domain: &str,
    record: &Dmarc,
    dkim: &[DkimOutput<'_>],
    spf: Option<&SpfRecord>,
    mail_from_domain: &str,
) -> bool {
    let from = from_domain.trim_end_matches('.').to_ascii_lowercase();
    let org = organizational_domain(&from);
    let aligned = |mode: &Alignment, d: &str| {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        match mode {
            Alignment::Strict => d == from,
            Alignment::Relaxed => organizational_domain(&d) == org,
        }
    };
    dkim.iter().any(|o| {
        matches!(o.result(), DkimResult::TempError(_))
            && o.signature().is_some_and(|s| aligned(&record.adkim, &s.d))
    }) || spf.is_some_and(|s| {
        s.status == AuthStatus::TempError && aligned(&record.aspf, mail_from_domain)
    })
}

/// A "no such record" answer (the name does not exist, or has no record of the type), as
/// opposed to a failed lookup.
fn is_no_such_record(code: ResponseCode) -> bool {
    matches!(code, ResponseCode::NoError | ResponseCode::NXDomain)
}

/// The stricter of two DMARC policies.
fn stricter(a: DmarcRecordPolicy, b: DmarcRecordPolicy) -> DmarcRecordPolicy {
    let rank = |p: DmarcRecordPolicy| match p {
        DmarcRecordPolicy::Reject => 2,
        DmarcRecordPolicy::Quarantine => 1,
        _ => 0,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// RFC 7489 §6.6.4: `pct=` below 100 applies the policy to that share of failing mail; the
/// rest is treated one step more leniently (reject as quarantine, quarantine as none).
fn sampled(policy: DmarcRecordPolicy, pct: u8) -> DmarcPolicy {
    // Uniform over 0..100: `random::<u8>() % 100` would favour 0..56 (256 = 2 × 100 + 56).
    let applies = pct >= 100 || rand::Rng::gen_range(&mut rand::thread_rng(), 0..100u8) < pct;
    match (policy, applies) {
        (DmarcRecordPolicy::Reject, true) => DmarcPolicy::Reject,
        (DmarcRecordPolicy::Reject, false) | (DmarcRecordPolicy::Quarantine, true) => {
            DmarcPolicy::Quarantine
        }
        _ => DmarcPolicy::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organizational_domains_follow_the_public_suffix_list() {
        assert_eq!(organizational_domain("news.example.co.uk"), "example.co.uk");
        assert_eq!(organizational_domain("a.b.example.org"), "example.org");
        assert_eq!(organizational_domain("example.org"), "example.org");
    }

    #[test]
    fn pct_sampling() {
        assert_eq!(sampled(DmarcRecordPolicy::Reject, 100), DmarcPolicy::Reject);
        assert_eq!(
            sampled(DmarcRecordPolicy::Reject, 0),
            DmarcPolicy::Quarantine
        );
        assert_eq!(sampled(DmarcRecordPolicy::Quarantine, 0), DmarcPolicy::None);
        assert_eq!(sampled(DmarcRecordPolicy::None, 100), DmarcPolicy::None);
        // The share is pct: 10,000 draws at pct=50 and pct=10 land within ±5 points (about
        // ten standard deviations; a biased draw gives 58.6% and 11.7%).
        for (pct, want) in [(50u8, 5_000i32), (10, 1_000)] {
            let hits = (0..10_000)
                .filter(|_| sampled(DmarcRecordPolicy::Reject, pct) == DmarcPolicy::Reject)
                .count() as i32;
            assert!((hits - want).abs() < 500, "pct={pct}: {hits} of 10,000");
        }
    }

    #[test]
    fn status_names_are_rfc_8601s() {
        assert_eq!(AuthStatus::SoftFail.to_string(), "softfail");
        assert_eq!(
            serde_json::to_string(&AuthStatus::TempError).unwrap(),
            "\"temperror\""
        );
    }
}
