//! Outbound MX resolution for Tern (issue #3, delivery).
//!
//! [`MxResolver::resolve`] turns a recipient domain into an ordered list of
//! [`MxTarget`]s following RFC 5321 §5.1:
//!
//! * MX records are sorted by preference, lowest first; hosts of equal
//!   preference are shuffled so load spreads across them ("the sender-SMTP
//!   MUST randomize them to spread the load", RFC 5321 §5.1).
//! * A domain that exists but has no MX records gets an *implicit MX*: the
//!   domain itself, preference 0, with its own A/AAAA records.
//! * A null MX (`0 .`, RFC 7505) fails at once with [`DnsError::NullMx`].
//! * An MX host whose name has no address (or does not exist) is skipped and
//!   the rest are tried; CNAMEs behind an MX host are followed, as Postfix
//!   and Exim do, although RFC 2181 §10.3 says MX targets must not be aliases.
//! * Domain literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 §4.1.3)
//!   resolve to that single address without any DNS traffic.
//! * Loopback, private, link-local, unspecified and multicast addresses are
//!   dropped unless the resolver allows them (tests, lab setups).
//! * At most [`MAX_MX_HOSTS`] hosts are looked up.
//!
//! Caching is hickory's: answers are kept for their TTL (and NXDOMAIN/NODATA
//! for the SOA minimum, RFC 2308), so a queue retrying many messages for one
//! domain costs one round of queries per TTL.
//!
//! With the `test-server` feature (and always in this crate's own tests) the
//! [`testing`] module offers [`testing::TestDns`], an authoritative DNS server
//! on loopback that end-to-end tests can point an [`MxResolver`] at.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, Protocol, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::error::{ResolveError, ResolveErrorKind};
use hickory_resolver::lookup_ip::LookupIp;
use hickory_resolver::name_server::{NameServerPool, TokioConnectionProvider};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::xfer::{DnsHandle, DnsRequestOptions, FirstAnswer};
use hickory_resolver::{Name, TokioAsyncResolver};
use rand::seq::SliceRandom;

#[cfg(any(test, feature = "test-server"))]
pub mod testing;

#[cfg(test)]
mod tests;

/// How many MX hosts are looked up and returned at most.
///
/// Like Postfix's `smtp_mx_address_limit` (default 5) this bounds the work one
/// hostile or broken domain can cause: a domain publishing hundreds of MX
/// records would otherwise cost hundreds of address lookups per delivery
/// attempt. Hosts are cut after sorting, so the best ones are kept.
pub const MAX_MX_HOSTS: usize = 5;

/// Per-query timeout used by [`MxResolver::new`] for explicit name servers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts per query used by [`MxResolver::new`] for explicit name servers.
pub const DEFAULT_ATTEMPTS: usize = 2;

/// One host to deliver to, with the addresses to try in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxTarget {
    /// The MX exchange name without the trailing dot (`mx1.example.com`), the
    /// domain itself for an implicit MX, or the literal as given (`[192.0.2.1]`).
    /// This is the name to verify a TLS certificate against.
    pub host: String,
    /// MX preference; 0 for an implicit MX and for domain literals.
    pub preference: u16,
    /// Usable addresses, IPv4 (A) first, then IPv6 (AAAA); never empty.
    pub addrs: Vec<IpAddr>,
}

/// Why a domain has no delivery targets.
///
/// [`is_permanent`](DnsError::is_permanent) tells the queue whether to bounce
/// or retry; [`enhanced_code`](DnsError::enhanced_code) is the RFC 3463 status
/// for the DSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The domain publishes a null MX (`0 .`): it accepts no mail (RFC 7505).
    #[error("domain does not accept mail (null MX, RFC 7505)")]
    NullMx,
    /// The domain does not exist (NXDOMAIN).
    #[error("domain does not exist (NXDOMAIN)")]
    NoSuchDomain,
    /// The domain name or domain literal is not syntactically valid.
    #[error("invalid domain {0:?}")]
    InvalidDomain(String),
    /// No MX host (or the implicit MX) has an A/AAAA record.
    ///
    /// Temporary: this is often a zone being edited or a host being renamed,
    /// and the queue's retry schedule bounds how long we keep trying.
    #[error("no MX host has an address")]
    NoAddresses,
    /// SERVFAIL, REFUSED, timeout or another transient resolver failure.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// Every address found was loopback/private/link-local/unspecified and
    /// the resolver does not allow those.
    ///
    /// Permanent, like Postfix's "mail for X loops back to myself" (5.4.6):
    /// such a domain either points at us or into a network no public MTA
    /// should deliver into, and retrying only delays the bounce.
    #[error("every address of the domain is private or loopback")]
    OnlyPrivate,
    /// The resolver could not be set up (unreadable /etc/resolv.conf, empty
    /// name server list).
    #[error("DNS resolver configuration: {0}")]
    Config(String),
}

impl DnsError {
    /// Whether the message should bounce (true) or stay queued for a retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            DnsError::NullMx
            | DnsError::NoSuchDomain
            | DnsError::InvalidDomain(_)
            | DnsError::OnlyPrivate => true,
            DnsError::NoAddresses | DnsError::Temporary(_) | DnsError::Config(_) => false,
        }
    }

    /// RFC 3463 enhanced status code for a DSN or log line.
    pub fn enhanced_code(&self) -> &'static str {
        match self {
            // RFC 7505 §4.2: "5.1.10 Recipient address has null MX".
            DnsError::NullMx => "5.1.10",
            // RFC 3463 X.1.2: bad destination system address.
            DnsError::NoSuchDomain | DnsError::InvalidDomain(_) => "5.1.2",
            // RFC 3463 X.4.4: unable to route.
            DnsError::NoAddresses => "4.4.4",
            // RFC 3463 X.4.3: directory server failure (Postfix uses it for
            // "Name service error ... try again").
            DnsError::Temporary(_) => "4.4.3",
            // RFC 3463 X.4.6: routing loop detected.
            DnsError::OnlyPrivate => "5.4.6",
            // RFC 3463 X.3.5: system incorrectly configured.
            DnsError::Config(_) => "4.3.5",
        }
    }
}

/// MX resolver for outbound delivery; cheap to share behind an `Arc`.
///
/// Wraps a hickory [`TokioAsyncResolver`], whose cache honours record TTLs.
/// Must be used from within a Tokio runtime.
pub struct MxResolver {
    resolver: TokioAsyncResolver,
    /// The same name servers without hickory's cache and special-use rules, for PTR queries:
    /// hickory answers every `127.in-addr.arpa` and `::1` PTR query itself with `localhost`
    /// (RFC 6761 §6.3), so the reverse DNS of a loopback client could never be looked up, nor
    /// tested. Postfix asks the name servers too; a recursive resolver there caches.
    direct: NameServerPool<TokioConnectionProvider>,
    allow_private: bool,
}

/// How one resolver answer is read.
enum Answer {
    /// The name exists but has no record of the asked type (NOERROR/NODATA).
    NoData,
    /// The name does not exist (NXDOMAIN).
    NxDomain,
    /// Anything else: SERVFAIL, REFUSED, timeout, I/O error.
    Failed(String),
}

fn classify(err: &ResolveError) -> Answer {
    match err.kind() {
        ResolveErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
            ResponseCode::NXDomain => Answer::NxDomain,
            ResponseCode::NoError => Answer::NoData,
            _ => Answer::Failed(err.to_string()),
        },
        _ => Answer::Failed(err.to_string()),
    }
}

impl MxResolver {
    /// A resolver using `nameservers`, or the system configuration
    /// (`/etc/resolv.conf`) when `None`.
    ///
    /// Explicit name servers are asked over UDP, falling back to TCP for
    /// truncated answers (RFC 7766), with [`DEFAULT_TIMEOUT`] and
    /// [`DEFAULT_ATTEMPTS`]. `allow_private` keeps loopback/private addresses
    /// in the results (tests, lab networks).
    pub fn new(
        nameservers: Option<Vec<SocketAddr>>,
        allow_private: bool,
    ) -> Result<Self, DnsError> {
        Self::with_timeout(
            nameservers,
            allow_private,
            DEFAULT_TIMEOUT,
            DEFAULT_ATTEMPTS,
        )
    }

    /// Like [`new`](Self::new) with an explicit per-query timeout and attempt
    /// count (for explicit name servers; the system configuration keeps its
    /// own `options timeout:`/`attempts:`).
    pub fn with_timeout(
        nameservers: Option<Vec<SocketAddr>>,
        allow_private: bool,
        timeout: Duration,
        attempts: usize,
    ) -> Result<Self, DnsError> {
        let (config, mut opts) = match nameservers {
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| DnsError::Config(e.to_string()))?,
            Some(servers) => {
                if servers.is_empty() {
                    return Err(DnsError::Config("empty name server list".into()));
                }
                let mut group = NameServerConfigGroup::with_capacity(servers.len() * 2);
                for addr in &servers {
                    for protocol in [Protocol::Udp, Protocol::Tcp] {
                        let mut ns = NameServerConfig::new(*addr, protocol);
                        // Mail routing must not be bounced on one server's word
                        // if others are configured: try the rest on NXDOMAIN.
                        ns.trust_negative_responses = servers.len() == 1;
                        group.push(ns);
                    }
                }
                let mut opts = ResolverOpts::default();
                opts.timeout = timeout;
                opts.attempts = attempts;
                // An explicit server list is a deliberate routing choice
                // (tests, split-horizon setups): /etc/hosts must not override it.
                opts.use_hosts_file = false;
                (ResolverConfig::from_parts(None, vec![], group), opts)
            }
        };
        // Both families: the queue decides which to try; the default
        // strategy only asks AAAA when A is empty.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let direct = NameServerPool::from_config(
            NameServerConfigGroup::from(config.name_servers().to_vec()),
            opts.clone(),
            TokioConnectionProvider::default(),
        );
        Ok(MxResolver {
            resolver: TokioAsyncResolver::tokio(config, opts),
            direct,
            allow_private,
        })
    }

    /// Delivery targets for a recipient domain, best first.
    ///
    /// `domain` is the part after the `@`: a host name (trailing dot
    /// optional, IDNs are converted to A-labels) or a domain literal.
    pub async fn resolve(&self, domain: &str) -> Result<Vec<MxTarget>, DnsError> {
        let domain = domain.trim();
        if domain.starts_with('[') {
            return self.literal(domain);
        }
        let mut name =
            Name::from_utf8(domain).map_err(|_| DnsError::InvalidDomain(domain.to_string()))?;
        if name.is_root() || name.num_labels() == 0 {
            return Err(DnsError::InvalidDomain(domain.to_string()));
        }
        // Fully qualified: a recipient domain is never relative, and resolv.conf
        // `search` domains must not turn example.com into example.com.corp.lan.
        name.set_fqdn(true);

        let hosts: Vec<(u16, Name)> = match self.resolver.mx_lookup(name.clone()).await {
            Ok(lookup) => lookup
                .iter()
                .map(|mx| (mx.preference(), mx.exchange().clone()))
                .collect(),
            Err(e) => match classify(&e) {
                Answer::NoData => Vec::new(),
                Answer::NxDomain => return Err(DnsError::NoSuchDomain),
                Answer::Failed(msg) => {
                    tracing::debug!(%domain, error = %msg, "MX lookup failed");
                    return Err(DnsError::Temporary(msg));
                }
            },
        };

        // RFC 7505 §3: a null MX is the single record "0 .". A domain that
        // publishes it next to real MX records is broken; we honour the
        // explicit "no mail" rather than guess (RFC 7505 §4.1: senders
        // SHOULD NOT attempt delivery).
        if hosts.iter().any(|(_, exchange)| exchange.is_root()) {
            return Err(DnsError::NullMx);
        }

        let hosts = if hosts.is_empty() {
            // RFC 5321 §5.1: no MX records → the domain is its own MX,
            // "with a preference of 0".
            vec![(0, name)]
        } else {
            order_mx(hosts)
        };
        self.addresses(domain, hosts).await
    }

    /// The addresses of one host, without an MX lookup: for a configured smarthost
    /// (`relay = "smtp.example.net:587"`, Postfix's `[host]` form). The operator chose it,
    /// so private and loopback addresses are kept (a smarthost on the LAN is normal).
    /// An IP literal (bare or in brackets) is returned as it is.
    pub async fn resolve_host(&self, host: &str) -> Result<MxTarget, DnsError> {
        let bare = host.trim().trim_start_matches('[').trim_end_matches(']');
        if let Ok(addr) = bare.parse::<IpAddr>() {
            return Ok(MxTarget {
                host: bare.to_string(),
                preference: 0,
                addrs: vec![addr],
            });
        }
        let mut name =
            Name::from_utf8(bare).map_err(|_| DnsError::InvalidDomain(host.to_string()))?;
        if name.is_root() || name.num_labels() == 0 {
            return Err(DnsError::InvalidDomain(host.to_string()));
        }
        name.set_fqdn(true);
        match self.resolver.lookup_ip(name.clone()).await {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = Vec::new();
                for a in lookup.iter() {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if addrs.is_empty() {
                    return Err(DnsError::NoAddresses);
                }
                Ok(MxTarget {
                    host: host_string(&name),
                    preference: 0,
                    addrs,
                })
            }
            Err(e) => Err(match classify(&e) {
                // A smarthost name that does not resolve is a configuration problem or an
                // outage, never the recipient's fault: retry rather than bounce.
                Answer::NoData | Answer::NxDomain => DnsError::NoAddresses,
                Answer::Failed(msg) => DnsError::Temporary(msg),
            }),
        }
    }

    /// The A records of `name`, for DNS blocklist queries (`2.0.0.127.zen.example`): an empty
    /// list when the name does not exist (not listed), an error when the lookup failed.
    pub async fn lookup_ipv4(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let mut name =
            Name::from_utf8(name.trim()).map_err(|_| DnsError::InvalidDomain(name.to_string()))?;
        name.set_fqdn(true);
        match self.resolver.ipv4_lookup(name).await {
            Ok(lookup) => Ok(lookup.iter().map(|a| a.0).collect()),
            Err(e) => match classify(&e) {
                Answer::NoData | Answer::NxDomain => Ok(Vec::new()),
                Answer::Failed(msg) => Err(DnsError::Temporary(msg)),
            },
        }
    }

    /// The AAAA records of `name` (forward confirmation of an IPv6 client's PTR name): empty
    /// when there is none, an error when the lookup failed.
    pub async fn lookup_ipv6(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        let mut name =
            Name::from_utf8(name.trim()).map_err(|_| DnsError::InvalidDomain(name.to_string()))?;
        name.set_fqdn(true);
        match self.resolver.ipv6_lookup(name).await {
            Ok(lookup) => Ok(lookup.iter().map(|a| a.0).collect()),
            Err(e) => match classify(&e) {
                Answer::NoData | Answer::NxDomain => Ok(Vec::new()),
                Answer::Failed(msg) => Err(DnsError::Temporary(msg)),
            },
        }
    }

    /// The PTR names of `ip` (`in-addr.arpa`/`ip6.arpa`, RFC 1035 §3.5, RFC 3596 §2.5), without
    /// the trailing dot: empty when there is none (NXDOMAIN or NODATA), an error when the lookup
    /// failed, so a caller can tell "no reverse DNS" from "DNS is down".
    pub async fn lookup_ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let query = Query::query(Name::from(ip), RecordType::PTR);
        let answer = self
            .direct
            .lookup(query, DnsRequestOptions::default())
            .first_answer()
            .await;
        match answer {
            Ok(response) => Ok(response
                .answers()
                .iter()
                .filter_map(|record| match record.data() {
                    Some(RData::PTR(ptr)) => Some(host_string(&ptr.0)),
                    _ => None,
                })
                .collect()),
            Err(e) => match classify(&e) {
                Answer::NoData | Answer::NxDomain => Ok(Vec::new()),
                Answer::Failed(msg) => Err(DnsError::Temporary(msg)),
            },
        }
    }

    /// Looks up the addresses of already ordered MX hosts.
    async fn addresses(
        &self,
        domain: &str,
        hosts: Vec<(u16, Name)>,
    ) -> Result<Vec<MxTarget>, DnsError> {
        // All hosts are looked up at once: done one after the other, five
        // hosts behind a slow or dead name server would cost five timeouts.
        // The JoinSet aborts the lookups if this future is dropped.
        let mut lookups = tokio::task::JoinSet::new();
        for (index, (_, host)) in hosts.iter().enumerate() {
            let resolver = self.resolver.clone();
            let host = host.clone();
            lookups.spawn(async move { (index, resolver.lookup_ip(host).await) });
        }
        let mut results: Vec<Option<Result<LookupIp, ResolveError>>> =
            hosts.iter().map(|_| None).collect();
        while let Some(joined) = lookups.join_next().await {
            match joined {
                Ok((index, result)) => results[index] = Some(result),
                // Only a panic inside hickory gets here; the host's slot stays
                // None and counts as a failed lookup below.
                Err(e) => tracing::warn!(%domain, error = %e, "MX host lookup task failed"),
            }
        }

        let mut targets = Vec::with_capacity(hosts.len());
        let mut temporary: Option<String> = None;
        let mut dropped_private = false;
        for ((preference, host), result) in hosts.into_iter().zip(results) {
            let result =
                result.unwrap_or_else(|| Err(ResolveError::from("address lookup task failed")));
            let addrs: Vec<IpAddr> = match result {
                Ok(lookup) => lookup.iter().collect(),
                Err(e) => match classify(&e) {
                    // A host without A/AAAA (or a dangling name) is skipped:
                    // the other MX hosts may still work (RFC 5321 §5.1).
                    Answer::NoData | Answer::NxDomain => {
                        tracing::debug!(%domain, %host, "MX host has no address, skipped");
                        Vec::new()
                    }
                    Answer::Failed(msg) => {
                        tracing::debug!(%domain, %host, error = %msg, "MX host lookup failed");
                        temporary.get_or_insert(msg);
                        Vec::new()
                    }
                },
            };
            let found = !addrs.is_empty();
            let mut usable: Vec<IpAddr> = Vec::with_capacity(addrs.len());
            for addr in addrs {
                if (self.allow_private || !is_private(addr)) && !usable.contains(&addr) {
                    usable.push(addr);
                }
            }
            if usable.is_empty() {
                dropped_private |= found;
                continue;
            }
            targets.push(MxTarget {
                host: host_string(&host),
                preference,
                addrs: usable,
            });
        }
        if !targets.is_empty() {
            return Ok(targets);
        }
        // Order matters: a failed lookup might have found a public address,
        // so it outranks the private/no-address verdicts.
        Err(if let Some(msg) = temporary {
            DnsError::Temporary(msg)
        } else if dropped_private {
            DnsError::OnlyPrivate
        } else {
            DnsError::NoAddresses
        })
    }

    /// A domain literal (RFC 5321 §4.1.3): `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    fn literal(&self, literal: &str) -> Result<Vec<MxTarget>, DnsError> {
        let invalid = || DnsError::InvalidDomain(literal.to_string());
        let inner = literal
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(invalid)?;
        let addr = match inner.get(..5) {
            // The "IPv6:" tag is matched case-insensitively, like all ABNF
            // literals (RFC 5234 §2.3).
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                IpAddr::V6(inner[5..].parse::<Ipv6Addr>().map_err(|_| invalid())?)
            }
            _ => IpAddr::V4(inner.parse::<Ipv4Addr>().map_err(|_| invalid())?),
        };
        if !self.allow_private && is_private(addr) {
            return Err(DnsError::OnlyPrivate);
        }
        Ok(vec![MxTarget {
            host: literal.to_string(),
            preference: 0,
            addrs: vec![addr],
        }])
    }
}

/// Sorts MX hosts by preference, shuffling equal preferences (RFC 5321 §5.1),
/// and keeps the best [`MAX_MX_HOSTS`].
fn order_mx(mut hosts: Vec<(u16, Name)>) -> Vec<(u16, Name)> {
    // Shuffle, then a stable sort: equal preferences keep the random order.
    hosts.shuffle(&mut rand::thread_rng());
    hosts.sort_by_key(|(preference, _)| *preference);
    // The same name listed twice (at different preferences) is looked up once,
    // at its best preference.
    let mut seen: Vec<Name> = Vec::new();
    hosts.retain(|(_, name)| {
        if seen.contains(name) {
            false
        } else {
            seen.push(name.clone());
            true
        }
    });
    hosts.truncate(MAX_MX_HOSTS);
    hosts
}

fn host_string(name: &Name) -> String {
    let mut s = name.to_ascii();
    if s.len() > 1 && s.ends_with('.') {
        s.pop();
    }
    s
}

/// Addresses a public MTA must not deliver to: loopback, RFC 1918 private,
/// link-local, unspecified, broadcast, multicast, "this network" (RFC 1122
/// §3.2.1.3), and their IPv6 counterparts (unique local RFC 4193, link-local
/// RFC 4291, IPv4-mapped forms of the above).
pub fn is_private(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xffc0) == 0xfe80
                || (first & 0xfe00) == 0xfc00
        }
    }
}
