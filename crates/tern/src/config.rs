//! Tern's configuration: built-in defaults, overridden by an optional TOML
//! file, overridden by `TERN_SECTION__KEY` environment variables.
//!
//! `tern serve` must work with no file at all, so every key has a default
//! and every section is `#[serde(default)]`. Every section also denies
//! unknown keys: a typo such as `lisen` silently falling back to the default
//! listener is the kind of mistake an operator only finds in production.
//!
//! The `config` crate does the layering, but its own error messages do not
//! reliably say which file or variable a bad value came from, so each layer
//! is checked before it is handed over: the file is parsed with `toml` and
//! deserialized through `serde_path_to_error`, and each environment variable
//! is matched against the known keys and typed from the defaults. Every
//! error therefore names the full key path and where it came from.
//!
//! The key reference lives in `docs/configuration.md`; keep both in step.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

pub use tern_ingress::auth::{hash_password, HashError};

/// Prefix of the environment variables that override configuration keys.
const ENV_PREFIX: &str = "tern_";
/// Separates the section from the key in an environment variable name
/// (`TERN_SMTP__LISTEN`): a single `_` cannot, because keys contain `_`.
const ENV_SEPARATOR: &str = "__";
/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 8] = [
    "smtp.listen",
    "smtp.submission_listen",
    "smtp.submissions_listen",
    "relay.networks",
    "relay.domains",
    "dns.nameservers",
    "queue.retry_schedule",
    "policy.dnsbl_zones",
];

/// The whole configuration. See `docs/configuration.md` for every key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub smtp: Smtp,
    pub tls: Tls,
    pub relay: Relay,
    pub limits: Limits,
    pub auth: Auth,
    pub http: Http,
    pub queue: Queue,
    /// `[[routes]]`: per-destination overrides, checked in order; the first match wins.
    pub routes: Vec<Route>,
    pub dns: Dns,
    pub delivery: Delivery,
    pub policy: Policy,
    /// `[[dkim]]`: signing keys; every key of a message's From: domain signs it.
    pub dkim: Vec<DkimEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Name used in the greeting, in `Received:` headers and in the
    /// self-signed certificate.
    pub hostname: String,
    /// Queue, spool and generated TLS material live here.
    pub data_dir: PathBuf,
    /// Where mail to the bare `<postmaster>` goes (an address whose mailbox someone reads):
    /// Tern has no local mailboxes. Empty: `postmaster@<hostname>`, delivered like any mail
    /// for the hostname's domain.
    pub postmaster: String,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            hostname: system_hostname(),
            data_dir: PathBuf::from("tern-data"),
            postmaster: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Smtp {
    /// Plain SMTP (port 25 style, STARTTLS offered).
    #[serde(deserialize_with = "de_list::<_, SocketAddr>")]
    pub listen: Vec<SocketAddr>,
    /// Message submission (port 587 style, STARTTLS offered).
    #[serde(deserialize_with = "de_list::<_, SocketAddr>")]
    pub submission_listen: Vec<SocketAddr>,
    /// Submission over implicit TLS (port 465 style).
    #[serde(deserialize_with = "de_list::<_, SocketAddr>")]
    pub submissions_listen: Vec<SocketAddr>,
    /// Expect a PROXY protocol header (v1 or v2) on every connection.
    pub proxy_protocol: bool,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    #[serde(deserialize_with = "de_parsed::<_, BareLineEndings>")]
    pub bare_line_endings: BareLineEndings,
    /// Session threads; 0 means one per CPU core but one (at least one).
    pub workers: usize,
    #[serde(deserialize_with = "de_parsed::<_, VrfyPolicy>")]
    pub vrfy: VrfyPolicy,
}

impl Default for Smtp {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            submission_listen: vec![SocketAddr::from(([127, 0, 0, 1], 2587))],
            submissions_listen: Vec::new(),
            proxy_protocol: false,
            max_connections: 10_000,
            max_connections_per_ip: 100,
            bare_line_endings: BareLineEndings::Reject,
            workers: 0,
            vrfy: VrfyPolicy::Ambiguous,
        }
    }
}

// The policy enums are the stages' own types (with their serde names), so the configuration
// and the code that acts on it cannot drift apart.
pub use tern_ingress::VrfyPolicy;
pub use tern_smtp::data::BareLineEndings;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain; empty together with `private_key` means a
    /// self-signed certificate generated in `data_dir`.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
}

/// 127.0.0.0/8, checked at compile time.
const LOOPBACK_V4: ipnet::Ipv4Net =
    ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::new(127, 0, 0, 0), 8);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relay {
    /// Clients in these networks may relay to any domain.
    #[serde(deserialize_with = "de_list::<_, IpNet>")]
    pub networks: Vec<IpNet>,
    /// Mail for these domains is accepted from anyone.
    pub domains: Vec<String>,
}

impl Default for Relay {
    fn default() -> Self {
        // Loopback only, so that a fresh install is never an open relay.
        Self {
            networks: vec![
                IpNet::V4(LOOPBACK_V4),
                IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            ],
            domains: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted message in bytes (advertised with SIZE).
    pub message_size: u64,
    /// Most RCPT TO per transaction.
    pub recipients: usize,
    /// Longest command line in bytes, CRLF included.
    pub command_line: usize,
    /// Longest DATA line in bytes, CRLF included.
    pub data_line: usize,
    /// Protocol errors before the connection is dropped.
    pub errors: u32,
    /// Most Received header fields before a message is refused as a loop.
    pub max_hops: usize,
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    #[serde(with = "duration")]
    pub data_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            message_size: 10_240_000,
            recipients: 1000,
            command_line: 512,
            data_line: 65_536,
            errors: 10,
            max_hops: 50,
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub users: Vec<AuthUser>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthUser {
    pub name: String,
    /// PHC string, `$argon2id$...`, as printed by `tern auth hash`.
    pub password_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    #[serde(deserialize_with = "de_parsed::<_, SocketAddr>")]
    pub listen: SocketAddr,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Queue {
    /// Bytes of page cache for the queue database.
    pub cache_size: u64,
    /// Below this many free bytes in `data_dir`, new mail gets
    /// `452 4.3.1` (like Postfix's `queue_minfree`); 0 disables the check.
    pub min_free_space: u64,
    /// Waits between delivery attempts of a deferred message; the last one
    /// repeats until `max_lifetime`.
    #[serde(
        serialize_with = "ser_durations",
        deserialize_with = "de_list::<_, Duration>"
    )]
    pub retry_schedule: Vec<Duration>,
    /// How long a message may stay queued before it bounces.
    #[serde(with = "duration")]
    pub max_lifetime: Duration,
    /// After this long in the queue the sender is told the message is
    /// delayed; `None` ("off", "0s", "0" or "" in the file) never warns.
    /// Written as "off" when `None`: omitting it would read back as the
    /// default.
    #[serde(
        serialize_with = "ser_delay_warning",
        deserialize_with = "de_delay_warning"
    )]
    pub delay_warning: Option<Duration>,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            cache_size: 64 * 1024 * 1024,
            min_free_space: 100 * 1024 * 1024,
            retry_schedule: vec![
                Duration::from_secs(60),
                Duration::from_secs(5 * 60),
                Duration::from_secs(15 * 60),
            ],
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            delay_warning: Some(Duration::from_secs(4 * 3600)),
        }
    }
}

pub use tern_delivery::TlsPolicy;

pub use tern_dkim::Algorithm as DkimAlgorithm;

/// One `[[dkim]]` entry: a key that signs mail whose From: domain is `domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimEntry {
    /// The `d=` domain, compared with the From: domain (case-insensitive).
    pub domain: String,
    /// The `s=` selector: the key is published at `SELECTOR._domainkey.DOMAIN`.
    pub selector: String,
    /// PEM file of the private key (PKCS#8, or PKCS#1 for RSA). Read when
    /// `tern serve` starts; a missing or unusable file stops it.
    pub private_key: PathBuf,
    #[serde(
        default,
        serialize_with = "ser_dkim_algorithm",
        deserialize_with = "de_parsed::<_, DkimAlgorithm>"
    )]
    pub algorithm: DkimAlgorithm,
}

/// One `[[routes]]` entry: how mail for the domains it matches is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// "example.net", "*.example.net" (any subdomain, not the domain
    /// itself) or "*". Stored lowercased, without a trailing dot.
    #[serde(deserialize_with = "de_route_domain")]
    pub domain: String,
    /// Smarthost to hand the mail to instead of looking up MX records.
    /// `None`: MX lookup as usual (the route only sets tls/limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayHost>,
    #[serde(
        default,
        serialize_with = "ser_tls_policy",
        deserialize_with = "de_parsed::<_, TlsPolicy>"
    )]
    pub tls: TlsPolicy,
    /// Overrides `delivery.max_connections` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Overrides `delivery.max_messages_per_connection` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages_per_connection: Option<usize>,
    /// Overrides `delivery.max_message_rate` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<Rate>,
    /// Overrides `delivery.max_recipients_per_transaction` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_recipients_per_transaction: Option<usize>,
}

impl Route {
    /// Whether mail for `domain` takes this route: case-insensitive, a
    /// trailing dot on either side ignored; "*" matches every domain and
    /// "*.example.net" every subdomain of example.net (at any depth) but
    /// not example.net itself.
    pub fn matches(&self, domain: &str) -> bool {
        let pattern = self.domain.strip_suffix('.').unwrap_or(&self.domain);
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if pattern == "*" {
            return true;
        }
        match pattern.strip_prefix('*') {
            // The suffix keeps its leading dot, so "xexample.net" does not
            // match "*.example.net".
            Some(suffix) if suffix.starts_with('.') => {
                let (d, s) = (domain.as_bytes(), suffix.as_bytes());
                d.len() > s.len() && d[d.len() - s.len()..].eq_ignore_ascii_case(s)
            }
            _ => domain.eq_ignore_ascii_case(pattern),
        }
    }
}

/// A smarthost: an IP literal or a DNS name, with an optional port
/// (`delivery.port` when absent). Written "host", "host:port",
/// "1.2.3.4:25", "[::1]:2526" or "[host]:port".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHost {
    /// An IP address (without brackets) or a DNS name.
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for RelayHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = self.host.parse::<std::net::Ipv6Addr>().is_ok();
        match (v6, self.port) {
            (true, Some(port)) => write!(f, "[{}]:{port}", self.host),
            (true, None) => write!(f, "[{}]", self.host),
            (false, Some(port)) => write!(f, "{}:{port}", self.host),
            (false, None) => f.write_str(&self.host),
        }
    }
}

impl std::str::FromStr for RelayHost {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as FromConfigStr>::parse(s)
    }
}

impl Serialize for RelayHost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RelayHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(d)
    }
}

/// A message rate (`"100/s"`): the one type the configuration, delivery and policy share.
pub use tern_message::Rate;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dns {
    /// Resolvers to ask; empty means the system's (/etc/resolv.conf).
    #[serde(deserialize_with = "de_nameservers")]
    pub nameservers: Vec<SocketAddr>,
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// false: accept and keep mail queued without delivering it (a global
    /// hold, like Postfix's `defer_transports`).
    pub enabled: bool,
    /// Port of the remote MX servers (and of relays given without one).
    pub port: u16,
    /// Allow delivery to loopback, private and other non-global addresses.
    pub allow_private_addresses: bool,
    /// Name given in EHLO; empty means `server.hostname`.
    pub helo_name: String,
    /// Simultaneous connections per destination.
    pub max_connections: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
    /// Messages per destination per time unit; `None` is unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<Rate>,
    /// Recipients per SMTP transaction (Postfix's
    /// `default_destination_recipient_limit`); more go in further
    /// transactions on the same connection.
    pub max_recipients_per_transaction: usize,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    #[serde(with = "duration")]
    pub data_timeout: Duration,
    /// How long an idle outbound connection waits for more mail before QUIT.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// How old the MX answer a job was routed with may be when a connection
    /// is opened for it; an older one is looked up again.
    #[serde(with = "duration")]
    pub mx_max_age: Duration,
    /// PEM bundle of the certificate authorities trusted for routes with
    /// `tls = "required"`. The default is Debian's system bundle; when it
    /// is missing (and the key was left at its default), required TLS
    /// cannot verify anything and fails closed.
    pub tls_ca_file: PathBuf,
}

/// The validation stage's checks (`[policy]`). Clients in `relay.networks` and authenticated
/// clients are exempt from the connection rate and the HELO checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// false: sessions do not consult the stage at all (the suppression list and its commands
    /// still work, and hard bounces are still recorded).
    pub enabled: bool,
    /// The longest a session waits for one verdict before applying the step's default.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// New connections per client address; `None` is unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_rate: Option<Rate>,
    /// DNS blocklist zones checked at connect (`zen.spamhaus.org` style).
    pub dnsbl_zones: Vec<String>,
    #[serde(with = "duration")]
    pub dnsbl_timeout: Duration,
    pub helo_require_fqdn: bool,
    pub helo_reject_own_hostname: bool,
    /// Messages per envelope sender; `None` is unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_rate: Option<Rate>,
    /// Messages per authenticated user; `None` is unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_rate: Option<Rate>,
    /// Recipients per envelope sender; `None` is unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt_rate: Option<Rate>,
    /// Keep a suppression list (`<data_dir>/suppression`), checked at RCPT for submitters
    /// and fed by hard bounces.
    pub suppression: bool,
    /// `reject` (550 5.1.1) or `drop` (250, recipient left out, logged).
    #[serde(deserialize_with = "de_parsed::<_, SuppressionAction>")]
    pub suppression_action: SuppressionAction,
    /// SPF at MAIL FROM for strangers: `off`, `record` (reported and scored) or `reject`
    /// (`fail` → 550 5.7.23).
    #[serde(deserialize_with = "de_parsed::<_, SpfAction>")]
    pub spf: SpfAction,
    /// DKIM and ARC verification of strangers' mail (reported in Authentication-Results).
    pub dkim_verify: bool,
    pub arc_verify: bool,
    /// DMARC for strangers' mail: `off`, `record`, `hold` (reject and quarantine both hold) or
    /// `enforce` (reject → 550 5.7.1, quarantine → hold).
    #[serde(deserialize_with = "de_parsed::<_, DmarcAction>")]
    pub dmarc: DmarcAction,
    /// Score strangers' mail with the content rules.
    pub content_rules: bool,
    /// The rules file (TOML); empty: the built-in rules.
    pub rules_file: PathBuf,
    /// A score at or above this refuses the message (550 5.7.1).
    pub reject_score: f64,
    /// A score at or above this (and below reject_score) holds it.
    pub quarantine_score: f64,
    /// Greylist strangers at RCPT (triplets in `<data_dir>/greylist`).
    pub greylisting: bool,
    /// How long a new triplet must wait before a retry is accepted.
    #[serde(with = "duration")]
    pub greylist_delay: Duration,
    /// A retry later than this after the first attempt starts over.
    #[serde(with = "duration")]
    pub greylist_retry_window: Duration,
    /// How long a passed triplet is remembered since it was last seen.
    #[serde(with = "duration")]
    pub greylist_expiry: Duration,
    /// Reverse DNS required of clients at connect: `off`, `exists` (a PTR record) or
    /// `confirmed` (a PTR name whose A/AAAA is the client's address).
    #[serde(deserialize_with = "de_parsed::<_, ReverseDns>")]
    pub reverse_dns: ReverseDns,
    /// The most the reverse-DNS lookups of one connection may take (then 450 4.7.25).
    #[serde(with = "duration")]
    pub reverse_dns_timeout: Duration,
    /// The known recipients of `relay.domains` (one `user@domain` or `@domain` a line); empty:
    /// every address of those domains is accepted.
    pub recipients_file: PathBuf,
}

pub use tern_policy::{DmarcAction, ReverseDns, SpfAction, SuppressionAction};

impl Default for Policy {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout: Duration::from_secs(10),
            connect_rate: Some(Rate {
                count: 60,
                per: Duration::from_secs(60),
            }),
            dnsbl_zones: Vec::new(),
            dnsbl_timeout: Duration::from_secs(5),
            helo_require_fqdn: false,
            helo_reject_own_hostname: true,
            sender_rate: None,
            user_rate: None,
            rcpt_rate: None,
            suppression: true,
            suppression_action: SuppressionAction::Reject,
            spf: SpfAction::Record,
            dkim_verify: true,
            arc_verify: true,
            dmarc: DmarcAction::Enforce,
            content_rules: true,
            rules_file: PathBuf::new(),
            reject_score: 10.0,
            quarantine_score: 6.0,
            greylisting: false,
            greylist_delay: Duration::from_secs(5 * 60),
            greylist_retry_window: Duration::from_secs(2 * 24 * 3600),
            greylist_expiry: Duration::from_secs(35 * 24 * 3600),
            reverse_dns: ReverseDns::Off,
            reverse_dns_timeout: Duration::from_secs(5),
            recipients_file: PathBuf::new(),
        }
    }
}

/// Debian's (and Ubuntu's) bundle of the system's trusted authorities.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for Delivery {
    fn default() -> Self {
        Self {
            enabled: true,
            port: 25,
            allow_private_addresses: false,
            helo_name: String::new(),
            max_connections: 10,
            max_messages_per_connection: 100,
            max_message_rate: None,
            max_recipients_per_transaction: 50,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            idle_timeout: Duration::from_secs(5),
            mx_max_age: Duration::from_secs(60),
            tls_ca_file: PathBuf::from(SYSTEM_CA_FILE),
        }
    }
}

/// A configuration problem, worded for the operator: it always says where
/// the bad value came from and, when there is one, the full key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config error in {}: cannot read the file: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config error in {origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("config error in {origin}: unknown key `{key}` (expected one of {})", expected.join(", "))]
    UnknownKey {
        origin: String,
        key: String,
        expected: Vec<&'static str>,
    },
    #[error("config error in {origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The full key path the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::UnknownKey { key, .. } | Self::Invalid { key, .. } => Some(key),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }
}

/// Loads the configuration: defaults, then `file` (if any), then `TERN_*`
/// environment variables, then [`Config::validate`].
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        // `std::env::vars` would panic on non-UTF-8; skip foreign variables
        // and only complain about ones that are meant for us.
        let Ok(name) = name.into_string() else {
            continue;
        };
        match value.into_string() {
            Ok(value) => env.push((name, value)),
            Err(_) if env_key(&name).is_some() => {
                return Err(ConfigError::Invalid {
                    origin: format!("environment variable {name}"),
                    key: env_key(&name).unwrap_or_default(),
                    message: "the value is not valid UTF-8".into(),
                })
            }
            Err(_) => {}
        }
    }
    load_from_env_and(file, env)
}

/// [`load`] with the environment given explicitly, so tests need not touch
/// the process environment.
pub fn load_from_env_and(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let defaults = Config::default();
    let defaults_table = toml::Table::try_from(&defaults).map_err(|e| ConfigError::Syntax {
        origin: "the built-in defaults".into(),
        message: e.to_string(),
    })?;

    let mut builder = config::Config::builder().add_source(config::File::from_str(
        &toml::to_string(&defaults_table).unwrap_or_default(),
        config::FileFormat::Toml,
    ));

    let file_origin = file.map(|p| p.display().to_string());
    if let Some(path) = file {
        let content = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        check_file(&content, &path.display().to_string())?;
        // The content is handed over as read and checked, rather than
        // re-read by path, so what was checked is what gets used.
        builder = builder.add_source(config::File::from_str(&content, config::FileFormat::Toml));
    }

    let overrides = env_overrides(env, &defaults_table)?;
    let mut env_map = config::Map::new();
    let mut env_origin: BTreeMap<String, String> = BTreeMap::new();
    let mut env_source = config::Environment::with_prefix("TERN")
        .prefix_separator("_")
        .separator(ENV_SEPARATOR)
        .list_separator(",")
        .try_parsing(true);
    for key in LIST_KEYS {
        // Named explicitly so a single address still becomes a one-element
        // list instead of a string.
        env_source = env_source.with_list_parse_key(key);
    }
    for o in overrides {
        env_origin.insert(o.key.clone(), o.var.clone());
        match o.value {
            EnvValue::List(items) if items.is_empty() => {
                // `Environment` turns "" into [""], never into [].
                builder = builder
                    .set_override(o.key.as_str(), Vec::<String>::new())
                    .map_err(|e| env_error(&o.var, &o.key, describe(&e)))?;
            }
            EnvValue::List(items) => {
                env_map.insert(o.var, items.join(","));
            }
            EnvValue::Scalar(value) => {
                env_map.insert(o.var, value);
            }
        }
    }
    builder = builder.add_source(env_source.source(Some(env_map)));

    let origin_of = |key: &str| -> String {
        let leaf = leaf_key(key);
        match env_origin.get(&leaf) {
            Some(var) => format!("environment variable {var}"),
            None => file_origin
                .clone()
                .unwrap_or_else(|| "the built-in defaults".into()),
        }
    };

    let built = builder.build().map_err(|e| ConfigError::Syntax {
        origin: file_origin
            .clone()
            .unwrap_or_else(|| "the environment".into()),
        message: describe(&e),
    })?;
    let config: Config = serde_path_to_error::deserialize(built).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid {
            origin: origin_of(&key),
            message: describe(e.inner()),
            key,
        }
    })?;

    config
        .check()
        .map_err(|(key, message)| ConfigError::Invalid {
            origin: origin_of(&key),
            key,
            message,
        })?;
    Ok(config)
}

impl Config {
    /// Checks what types alone cannot; `source` names where the
    /// configuration came from (a file path, say) for the error message.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        self.check().map_err(|(key, message)| ConfigError::Invalid {
            origin: source.to_string(),
            key,
            message,
        })
    }

    /// The effective configuration as TOML, for `tern config check`.
    pub fn to_toml(&self) -> String {
        // Durations, addresses and paths all serialize as strings, so this
        // cannot fail for a loaded configuration; still, never panic.
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }

    /// The first problem found, as (key path, message).
    fn check(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((key.to_string(), message));

        let hostname = &self.server.hostname;
        if hostname.is_empty() {
            return fail("server.hostname", "must not be empty".into());
        }
        if hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            // It goes verbatim into the 220 greeting and EHLO reply.
            return fail(
                "server.hostname",
                format!("{hostname:?} must not contain spaces or control characters"),
            );
        }
        if self.server.data_dir.as_os_str().is_empty() {
            return fail("server.data_dir", "must not be empty".into());
        }
        let postmaster = &self.server.postmaster;
        if !postmaster.is_empty() {
            if let Err(e) = tern_smtp::address::Address::parse(postmaster) {
                return fail(
                    "server.postmaster",
                    format!("{postmaster:?} is not a mailbox (user@domain): {e}"),
                );
            }
        }

        let smtp = &self.smtp;
        if smtp.listen.is_empty()
            && smtp.submission_listen.is_empty()
            && smtp.submissions_listen.is_empty()
        {
            return fail(
                "smtp.listen",
                "no SMTP listener configured: set at least one of smtp.listen, \
                 smtp.submission_listen, smtp.submissions_listen"
                    .into(),
            );
        }
        // Two listeners on one address would fail at bind time with a less
        // helpful message; port 0 (any free port) may repeat.
        let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let listeners = [
            ("smtp.listen", &smtp.listen),
            ("smtp.submission_listen", &smtp.submission_listen),
            ("smtp.submissions_listen", &smtp.submissions_listen),
        ];
        let http = [self.http.listen];
        let all = listeners
            .iter()
            .flat_map(|(name, addrs)| {
                addrs
                    .iter()
                    .enumerate()
                    .map(move |(i, a)| (format!("{name}[{i}]"), *a))
            })
            .chain(http.iter().map(|a| ("http.listen".to_string(), *a)));
        for (key, addr) in all {
            if addr.port() == 0 {
                continue;
            }
            if let Some(first) = seen.get(&addr) {
                return fail(&key, format!("{addr} is already used by {first}"));
            }
            seen.insert(addr, key);
        }
        if smtp.max_connections == 0 {
            return fail("smtp.max_connections", "must be greater than 0".into());
        }
        if smtp.max_connections_per_ip == 0 {
            return fail(
                "smtp.max_connections_per_ip",
                "must be greater than 0".into(),
            );
        }

        for (i, d) in self.relay.domains.iter().enumerate() {
            if d.trim().is_empty() || d.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return fail(
                    &format!("relay.domains[{i}]"),
                    format!("invalid domain {d:?}"),
                );
            }
        }

        let tls = &self.tls;
        match (
            tls.certificate.as_os_str().is_empty(),
            tls.private_key.as_os_str().is_empty(),
        ) {
            (false, true) => {
                return fail(
                    "tls.private_key",
                    "must be set when tls.certificate is set (or leave both empty for a \
                     self-signed certificate)"
                        .into(),
                )
            }
            (true, false) => {
                return fail(
                    "tls.certificate",
                    "must be set when tls.private_key is set (or leave both empty for a \
                     self-signed certificate)"
                        .into(),
                )
            }
            _ => {}
        }

        let l = &self.limits;
        if l.message_size == 0 {
            return fail("limits.message_size", "must be greater than 0".into());
        }
        if l.recipients == 0 {
            return fail("limits.recipients", "must be greater than 0".into());
        }
        if l.command_line < 512 {
            return fail(
                "limits.command_line",
                format!(
                    "{} is below 512, the minimum RFC 5321 section 4.5.3.1.4 requires",
                    l.command_line
                ),
            );
        }
        if l.data_line < 1000 {
            return fail(
                "limits.data_line",
                format!(
                    "{} is below 1000, the minimum RFC 5321 section 4.5.3.1.6 requires",
                    l.data_line
                ),
            );
        }
        if l.errors == 0 {
            return fail("limits.errors", "must be greater than 0".into());
        }
        if self.limits.max_hops == 0 {
            return fail("limits.max_hops", "must be greater than 0".into());
        }
        if l.command_timeout.is_zero() {
            return fail("limits.command_timeout", "must be greater than 0".into());
        }
        if l.data_timeout.is_zero() {
            return fail("limits.data_timeout", "must be greater than 0".into());
        }

        let mut names = HashSet::new();
        for (i, user) in self.auth.users.iter().enumerate() {
            if user.name.is_empty() {
                return fail(&format!("auth.users[{i}].name"), "must not be empty".into());
            }
            if !names.insert(user.name.as_str()) {
                return fail(
                    &format!("auth.users[{i}].name"),
                    format!("duplicate user {:?}", user.name),
                );
            }
            if let Err(message) = tern_ingress::auth::check_phc(&user.password_hash) {
                return fail(&format!("auth.users[{i}].password_hash"), message);
            }
        }

        let q = &self.queue;
        if q.cache_size == 0 {
            return fail("queue.cache_size", "must be greater than 0".into());
        }
        if q.retry_schedule.is_empty() {
            return fail(
                "queue.retry_schedule",
                "must list at least one wait, e.g. [\"1m\", \"5m\", \"15m\"]".into(),
            );
        }
        if let Some(i) = q.retry_schedule.iter().position(Duration::is_zero) {
            return fail(
                &format!("queue.retry_schedule[{i}]"),
                "must be greater than 0".into(),
            );
        }
        if q.max_lifetime.is_zero() {
            return fail("queue.max_lifetime", "must be greater than 0".into());
        }
        if let Some(warning) = q.delay_warning {
            if warning >= q.max_lifetime {
                return fail(
                    "queue.delay_warning",
                    format!(
                        "{} is not shorter than queue.max_lifetime ({}), so no warning would \
                         ever be sent; make it shorter or \"off\"",
                        humantime_serde::re::humantime::format_duration(warning),
                        humantime_serde::re::humantime::format_duration(q.max_lifetime)
                    ),
                );
            }
        }

        if self.dns.timeout.is_zero() {
            return fail("dns.timeout", "must be greater than 0".into());
        }

        let d = &self.delivery;
        if d.port == 0 {
            return fail("delivery.port", "must not be 0".into());
        }
        if d.helo_name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return fail(
                "delivery.helo_name",
                format!(
                    "{:?} must not contain spaces or control characters",
                    d.helo_name
                ),
            );
        }
        if d.max_connections == 0 {
            return fail("delivery.max_connections", "must be greater than 0".into());
        }
        if d.max_messages_per_connection == 0 {
            return fail(
                "delivery.max_messages_per_connection",
                "must be greater than 0".into(),
            );
        }
        if let Err(message) = check_rate(d.max_message_rate) {
            return fail("delivery.max_message_rate", message);
        }
        if d.max_recipients_per_transaction == 0 {
            return fail(
                "delivery.max_recipients_per_transaction",
                "must be greater than 0".into(),
            );
        }
        let p = &self.policy;
        if p.timeout.is_zero() {
            return fail("policy.timeout", "must be greater than 0".into());
        }
        if p.dnsbl_timeout.is_zero() {
            return fail("policy.dnsbl_timeout", "must be greater than 0".into());
        }
        if p.greylist_delay.is_zero() {
            return fail(
                "policy.greylist_delay",
                "must be greater than 0 (set greylisting = false to turn it off)".into(),
            );
        }
        if p.greylist_retry_window <= p.greylist_delay {
            return fail(
                "policy.greylist_retry_window",
                format!(
                    "must be longer than policy.greylist_delay ({}), or no retry could ever pass",
                    humantime_serde::re::humantime::format_duration(p.greylist_delay)
                ),
            );
        }
        if p.greylist_expiry.is_zero() {
            return fail("policy.greylist_expiry", "must be greater than 0".into());
        }
        if p.reverse_dns_timeout.is_zero() {
            return fail(
                "policy.reverse_dns_timeout",
                "must be greater than 0".into(),
            );
        }
        if !p.recipients_file.as_os_str().is_empty() {
            // Read here so `tern config check` and a start both report a bad file, by line.
            if let Err(e) = tern_policy::recipients::RecipientMap::load(&p.recipients_file) {
                return fail("policy.recipients_file", e.to_string());
            }
        }
        for (key, rate) in [
            ("policy.connect_rate", p.connect_rate),
            ("policy.sender_rate", p.sender_rate),
            ("policy.user_rate", p.user_rate),
            ("policy.rcpt_rate", p.rcpt_rate),
        ] {
            if let Err(message) = check_rate(rate) {
                return fail(key, message);
            }
        }
        for (key, score) in [
            ("policy.reject_score", p.reject_score),
            ("policy.quarantine_score", p.quarantine_score),
        ] {
            if !score.is_finite() {
                return fail(key, "must be a number".into());
            }
        }
        if p.quarantine_score > p.reject_score {
            return fail(
                "policy.quarantine_score",
                format!(
                    "{} is above policy.reject_score ({}): nothing could be held",
                    p.quarantine_score, p.reject_score
                ),
            );
        }
        if !p.rules_file.as_os_str().is_empty() {
            if let Err(e) = tern_policy::Rules::load(&p.rules_file) {
                return fail(
                    "policy.rules_file",
                    format!("{}: {e}", p.rules_file.display()),
                );
            }
        }
        for (i, zone) in p.dnsbl_zones.iter().enumerate() {
            if let Err(message) = check_route_domain(zone).and_then(|()| {
                if zone.contains('*') {
                    Err("a zone name, without wildcards".to_string())
                } else {
                    Ok(())
                }
            }) {
                return fail(&format!("policy.dnsbl_zones[{i}]"), message);
            }
        }
        for (key, t) in [
            ("delivery.connect_timeout", d.connect_timeout),
            ("delivery.command_timeout", d.command_timeout),
            ("delivery.data_timeout", d.data_timeout),
            ("delivery.idle_timeout", d.idle_timeout),
            ("delivery.mx_max_age", d.mx_max_age),
        ] {
            if t.is_zero() {
                return fail(key, "must be greater than 0".into());
            }
        }

        for (i, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            if let Err(message) = check_route_domain(&route.domain) {
                return fail(&key("domain"), message);
            }
            if let Some(relay) = &route.relay {
                if relay.host.is_empty() {
                    return fail(&key("relay"), "the host must not be empty".into());
                }
                if relay.port == Some(0) {
                    return fail(&key("relay"), format!("{relay}: the port must not be 0"));
                }
            }
            if route.max_connections == Some(0) {
                return fail(&key("max_connections"), "must be greater than 0".into());
            }
            if route.max_messages_per_connection == Some(0) {
                return fail(
                    &key("max_messages_per_connection"),
                    "must be greater than 0".into(),
                );
            }
            if let Err(message) = check_rate(route.max_message_rate) {
                return fail(&key("max_message_rate"), message);
            }
            if route.max_recipients_per_transaction == Some(0) {
                return fail(
                    &key("max_recipients_per_transaction"),
                    "must be greater than 0".into(),
                );
            }
        }

        for (i, entry) in self.dkim.iter().enumerate() {
            let key = |field: &str| format!("dkim[{i}].{field}");
            if let Err(e) = tern_dkim::check_domain(&entry.domain) {
                return fail(&key("domain"), e.to_string());
            }
            if let Err(e) = tern_dkim::check_selector(&entry.selector) {
                return fail(&key("selector"), e.to_string());
            }
            if entry.private_key.as_os_str().is_empty() {
                return fail(&key("private_key"), "must not be empty".into());
            }
            if let Some(j) = self.dkim[..i].iter().position(|e| {
                e.domain.eq_ignore_ascii_case(&entry.domain) && e.selector == entry.selector
            }) {
                return fail(
                    &key("selector"),
                    format!(
                        "{}/{} is already dkim[{j}]: one key per domain and selector",
                        entry.domain, entry.selector
                    ),
                );
            }
        }
        Ok(())
    }
}

fn check_rate(rate: Option<Rate>) -> Result<(), String> {
    match rate {
        Some(rate) if rate.count == 0 => Err(format!("{rate}: the count must be greater than 0")),
        Some(rate) if rate.per.is_zero() => Err("the time unit must not be 0".into()),
        _ => Ok(()),
    }
}

/// A route's `domain`: "*", "*." followed by a domain, or a domain.
fn check_route_domain(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("must not be empty; use \"*\" to match every domain".into());
    }
    if pattern == "*" {
        return Ok(());
    }
    let domain = pattern.strip_prefix("*.").unwrap_or(pattern);
    let why = if domain.len() > 253 {
        Some("longer than 253 characters")
    } else if domain.split('.').any(str::is_empty) {
        Some("empty label")
    } else if domain.split('.').any(|l| l.len() > 63) {
        Some("label longer than 63 characters")
    } else if !domain
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("only letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "invalid domain {pattern:?} ({why}); expected \"example.net\", \"*.example.net\" \
             or \"*\""
        )),
        None => Ok(()),
    }
}

/// The machine's hostname, or "localhost" if it cannot be found.
fn system_hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the pointer and length describe `buf`, which outlives the
        // call; gethostname writes at most `len` bytes.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            if let Ok(name) = std::str::from_utf8(&buf[..end]) {
                let name = name.trim();
                if !name.is_empty() {
                    return name.to_string();
                }
            }
        }
    }
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

// ---------------------------------------------------------------------------
// The file layer.

/// Parses and type-checks the file on its own, so that its errors name the
/// file, the key path and the line.
fn check_file(content: &str, origin: &str) -> Result<(), ConfigError> {
    let table: toml::Table = content
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_string(),
            message: with_line(content, &friendly(e.message()), e.span()),
        })?;
    check_known_keys(&table, origin)?;
    serde_path_to_error::deserialize::<_, Config>(toml::Deserializer::new(content)).map_err(
        |e| ConfigError::Invalid {
            origin: origin.to_string(),
            key: e.path().to_string(),
            message: with_line(content, &friendly(e.inner().message()), e.inner().span()),
        },
    )?;
    Ok(())
}

/// Walks the file's tables against the known keys. serde would reject an
/// unknown key too, but without saying which section it was in.
fn check_known_keys(table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    let unknown = |key: String, expected: &'static [&'static str]| ConfigError::UnknownKey {
        origin: origin.to_string(),
        key,
        expected: expected.to_vec(),
    };
    let top = fields_of::<Config>();
    for (section, value) in table {
        if !top.contains(&section.as_str()) {
            return Err(unknown(section.clone(), top));
        }
        if section == "routes" || section == "dkim" {
            let entry_fields = section_fields(section);
            for (i, entry) in value.as_array().into_iter().flatten().enumerate() {
                for field in entry.as_table().into_iter().flat_map(|t| t.keys()) {
                    if !entry_fields.contains(&field.as_str()) {
                        return Err(unknown(format!("{section}[{i}].{field}"), entry_fields));
                    }
                }
            }
            continue;
        }
        let Some(keys) = value.as_table() else {
            continue; // a type error, reported by serde
        };
        let expected = section_fields(section);
        for (key, value) in keys {
            if !expected.contains(&key.as_str()) {
                return Err(unknown(format!("{section}.{key}"), expected));
            }
            if section == "auth" && key == "users" {
                let user_fields = fields_of::<AuthUser>();
                for (i, user) in value.as_array().into_iter().flatten().enumerate() {
                    for field in user.as_table().into_iter().flat_map(|t| t.keys()) {
                        if !user_fields.contains(&field.as_str()) {
                            return Err(unknown(format!("auth.users[{i}].{field}"), user_fields));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn section_fields(section: &str) -> &'static [&'static str] {
    match section {
        "server" => fields_of::<Server>(),
        "smtp" => fields_of::<Smtp>(),
        "tls" => fields_of::<Tls>(),
        "relay" => fields_of::<Relay>(),
        "limits" => fields_of::<Limits>(),
        "auth" => fields_of::<Auth>(),
        "http" => fields_of::<Http>(),
        "queue" => fields_of::<Queue>(),
        "routes" => fields_of::<Route>(),
        "dkim" => fields_of::<DkimEntry>(),
        "dns" => fields_of::<Dns>(),
        "delivery" => fields_of::<Delivery>(),
        "policy" => fields_of::<Policy>(),
        _ => &[],
    }
}

/// The field names of a derived struct, in declaration order, taken from
/// what serde's derive passes to `deserialize_struct` — so the list of
/// expected keys can never drift from the structs.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Captured(&'static [&'static str]);
    impl fmt::Display for Captured {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("fields captured")
        }
    }
    impl std::error::Error for Captured {}
    impl de::Error for Captured {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Captured(&[])
        }
    }
    struct Probe;
    impl<'de> Deserializer<'de> for Probe {
        type Error = Captured;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
            Err(Captured(&[]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Captured> {
            Err(Captured(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(Captured(fields)) => fields,
        Ok(_) => &[],
    }
}

/// Appends " (line N)" when the error has a position in the file.
fn with_line(content: &str, message: &str, span: Option<std::ops::Range<usize>>) -> String {
    let message = message.trim_end();
    match span {
        Some(span) => {
            let start = span.start.min(content.len());
            let line = content.as_bytes()[..start]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            format!("{message} (line {line})")
        }
        None => message.to_string(),
    }
}

/// serde's messages name Rust types ("expected usize"); operators should
/// not need to know them.
fn friendly(message: &str) -> String {
    message
        .replace("expected u32", "expected an integer from 0 to 4294967295")
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        // Multi-line TOML messages would break the one-line error.
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The message of a `config` crate error without its own location, which
/// [`ConfigError`] supplies.
fn describe(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::At { error, .. } => describe(error),
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("invalid value {unexpected}, expected {expected}"),
        config::ConfigError::Message(m) => friendly(m),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------
// The environment layer.

struct EnvOverride {
    var: String,
    key: String,
    value: EnvValue,
}

enum EnvValue {
    Scalar(String),
    List(Vec<String>),
}

/// The key path a `TERN_SECTION__KEY` variable names, if it is one.
///
/// Variables without `__` (`TERN_CONFIG`, `TERN_LOG`) are not configuration
/// keys and are left alone, so the command line may use them freely.
fn env_key(name: &str) -> Option<String> {
    let lower = name.to_lowercase();
    let rest = lower.strip_prefix(ENV_PREFIX)?;
    rest.contains(ENV_SEPARATOR)
        .then(|| rest.replace(ENV_SEPARATOR, "."))
}

fn env_error(var: &str, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        origin: format!("environment variable {var}"),
        key: key.to_string(),
        message,
    }
}

/// Matches each variable against the known keys and checks its value's
/// type against the default's, so bad values are blamed on the variable.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
    defaults: &toml::Table,
) -> Result<Vec<EnvOverride>, ConfigError> {
    let mut out = Vec::new();
    for (var, raw) in env {
        let Some(key) = env_key(&var) else {
            continue;
        };
        let origin = format!("environment variable {var}");
        let unknown = |key: String, expected: &'static [&'static str]| ConfigError::UnknownKey {
            origin: origin.clone(),
            key,
            expected: expected.to_vec(),
        };
        let parts: Vec<&str> = key.split('.').collect();
        let top = fields_of::<Config>();
        if !top.contains(&parts[0]) {
            return Err(unknown(parts[0].to_string(), top));
        }
        if parts[0] == "routes" || parts[0] == "dkim" {
            return Err(env_error(
                &var,
                &key,
                format!(
                    "{} cannot be set from the environment; list them in the config file",
                    parts[0]
                ),
            ));
        }
        let fields = section_fields(parts[0]);
        if parts.len() != 2 || !fields.contains(&parts[1]) {
            return Err(unknown(key.clone(), fields));
        }
        if key == "auth.users" {
            return Err(env_error(
                &var,
                &key,
                "users cannot be set from the environment; list them in the config file".into(),
            ));
        }
        let value = raw.trim();
        let default = defaults.get(parts[0]).and_then(|s| s.get(parts[1]));
        let value = match default {
            _ if LIST_KEYS.contains(&key.as_str()) => EnvValue::List(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            Some(toml::Value::Integer(_)) => match value.parse::<i64>() {
                // i64 because that is what `config` stores; larger values
                // would silently become floats.
                Ok(n) if n >= 0 => EnvValue::Scalar(n.to_string()),
                _ => {
                    return Err(env_error(
                        &var,
                        &key,
                        format!("invalid value {value:?}, expected a non-negative integer"),
                    ))
                }
            },
            Some(toml::Value::Boolean(_)) => match value.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => EnvValue::Scalar("true".into()),
                "false" | "no" | "off" | "0" => EnvValue::Scalar("false".into()),
                _ => {
                    return Err(env_error(
                        &var,
                        &key,
                        format!("invalid value {value:?}, expected true or false"),
                    ))
                }
            },
            _ => EnvValue::Scalar(value.to_string()),
        };
        out.push(EnvOverride { var, key, value });
    }
    Ok(out)
}

/// "smtp.listen[0]" -> "smtp.listen": the granularity at which a layer
/// overrides a value.
fn leaf_key(path: &str) -> String {
    let mut parts = path.split('.');
    let section = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let key = key.split('[').next().unwrap_or_default();
    if key.is_empty() {
        section.to_string()
    } else {
        format!("{section}.{key}")
    }
}

// ---------------------------------------------------------------------------
// Deserializers for values parsed from strings, with messages that quote
// the offending value (the standard ones say only "invalid IP address
// syntax").

trait FromConfigStr: Sized {
    const WHAT: &'static str;
    fn parse(s: &str) -> Result<Self, String>;
}

/// `FromConfigStr` for an enum written as one of a few keywords; the error lists them all.
macro_rules! config_keywords {
    ($ty:ty, $what:literal, { $($kw:literal => $variant:ident),+ $(,)? }) => {
        impl FromConfigStr for $ty {
            const WHAT: &'static str = $what;
            fn parse(s: &str) -> Result<Self, String> {
                match s.trim() {
                    $($kw => Ok(Self::$variant),)+
                    _ => Err(expected_one_of(&[$($kw),+])),
                }
            }
        }
    };
}

/// `expected "a", "b" or "c"`.
fn expected_one_of(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("expected {} or {last}", rest.join(", "))
        }
        _ => format!("expected {}", quoted.join("")),
    }
}

config_keywords!(SpfAction, "SPF action", { "off" => Off, "record" => Record, "reject" => Reject });
config_keywords!(DmarcAction, "DMARC action", {
    "off" => Off, "record" => Record, "hold" => Hold, "enforce" => Enforce,
});
config_keywords!(ReverseDns, "reverse DNS requirement", {
    "off" => Off, "exists" => Exists, "confirmed" => Confirmed,
});
config_keywords!(SuppressionAction, "suppression action", { "reject" => Reject, "drop" => Drop });
config_keywords!(BareLineEndings, "bare line ending policy", {
    "reject" => Reject, "normalize" => Normalize,
});
config_keywords!(VrfyPolicy, "VRFY policy", { "ambiguous" => Ambiguous, "refuse" => Refuse });

impl FromConfigStr for SocketAddr {
    const WHAT: &'static str = "socket address";
    fn parse(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map_err(|_| "expected IP:port, e.g. 0.0.0.0:25 or [::]:25".to_string())
    }
}

impl FromConfigStr for IpNet {
    const WHAT: &'static str = "IP network";
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // A bare address is accepted as a single-host network.
        if let Ok(addr) = s.parse::<IpAddr>() {
            return Ok(IpNet::from(addr));
        }
        s.parse()
            .map_err(|_| "expected address/prefix, e.g. 10.0.0.0/8 or fd00::/8".to_string())
    }
}

impl FromConfigStr for Duration {
    const WHAT: &'static str = "duration";
    fn parse(s: &str) -> Result<Self, String> {
        use humantime_serde::re::humantime::{parse_duration, DurationError};
        parse_duration(s.trim()).map_err(|e| match e {
            // This one already lists the units.
            DurationError::UnknownUnit { .. } => e.to_string(),
            _ => format!("{e}; use e.g. 30s, 5m or 1h30m"),
        })
    }
}

impl FromConfigStr for TlsPolicy {
    const WHAT: &'static str = "TLS policy";
    fn parse(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map_err(|_| "expected \"opportunistic\", \"required\" or \"none\"".to_string())
    }
}

impl FromConfigStr for DkimAlgorithm {
    const WHAT: &'static str = "DKIM algorithm";
    fn parse(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map_err(|_| "expected \"rsa-sha256\" or \"ed25519-sha256\"".to_string())
    }
}

impl FromConfigStr for RelayHost {
    const WHAT: &'static str = "relay host";
    fn parse(s: &str) -> Result<Self, String> {
        const FORMS: &str = "expected host, host:port, IP:port or [IPv6]:port, e.g. \
                             smtp.example.net:587 or [::1]:2526";
        let s = s.trim();
        if s.is_empty() {
            return Err(format!("empty; {FORMS}"));
        }
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("bad port {p:?}; {FORMS}"))
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("missing ']'; {FORMS}"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(port(p)?)),
                    None => return Err(format!("unexpected {after:?} after ']'; {FORMS}")),
                },
            }
        } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
            // A bare IPv6 address: its colons are not a port separator.
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(format!("IPv6 addresses need brackets; {FORMS}"))
                }
                Some((host, p)) => (host, Some(port(p)?)),
                None => (s, None),
            }
        };
        let is_ip = host.parse::<IpAddr>().is_ok();
        let is_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !is_ip && !is_name {
            return Err(format!(
                "{host:?} is neither an IP address nor a host name; {FORMS}"
            ));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl FromConfigStr for Rate {
    const WHAT: &'static str = "rate";
    fn parse(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

/// A nameserver address; the port defaults to 53.
struct Nameserver(SocketAddr);

impl FromConfigStr for Nameserver {
    const WHAT: &'static str = "nameserver address";
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self(SocketAddr::new(ip, 53)));
        }
        s.parse().map(Self).map_err(|_| {
            "expected IP or IP:port, e.g. 127.0.0.1, 127.0.0.1:5353 or [::1]:53".to_string()
        })
    }
}

fn de_nameservers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    de_list::<_, Nameserver>(d).map(|v| v.into_iter().map(|n| n.0).collect())
}

/// A route's domain pattern, lowercased and without a trailing dot; its
/// syntax is checked with the rest of the configuration.
fn de_route_domain<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let s = s.trim();
    Ok(s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase())
}

/// `queue.delay_warning`: a duration, or "off" / "" / "0" / "0s" (or the
/// integer 0) for none.
fn de_delay_warning<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string or \"off\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v.trim() {
                "" | "off" => Ok(None),
                s => <Duration as FromConfigStr>::parse(s)
                    .map(|d| Some(d).filter(|d| !d.is_zero()))
                    .map_err(|why| E::custom(format!("invalid duration {v:?}: {why}, or \"off\""))),
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            match v {
                0 => Ok(None),
                _ => Err(E::custom(format!(
                    "invalid duration {v}: a number needs a unit, e.g. \"4h\""
                ))),
            }
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!("invalid duration {v}"))),
            }
        }
    }
    d.deserialize_any(V)
}

fn ser_delay_warning<S: serde::Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => humantime_serde::serialize(d, s),
        None => s.serialize_str("off"),
    }
}

fn ser_durations<S: serde::Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        v.iter()
            .map(|d| humantime_serde::re::humantime::format_duration(*d).to_string()),
    )
}

fn ser_dkim_algorithm<S: serde::Serializer>(v: &DkimAlgorithm, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

fn ser_tls_policy<S: serde::Serializer>(v: &TlsPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

struct ParsedVisitor<T>(PhantomData<T>);

impl<T: FromConfigStr> Visitor<'_> for ParsedVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} string", T::WHAT)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        T::parse(v).map_err(|why| E::custom(format!("invalid {} {v:?}: {why}", T::WHAT)))
    }
}

struct Parsed<T>(T);

impl<'de, T: FromConfigStr> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedVisitor(PhantomData)).map(Parsed)
    }
}

/// A duration key: written as `30s`/`5m`/`1h30m` (humantime), read through [`FromConfigStr`]
/// so a bad value's error names the key.
mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::de_parsed(d)
    }
}

fn de_parsed<'de, D: Deserializer<'de>, T: FromConfigStr>(d: D) -> Result<T, D::Error> {
    Parsed::<T>::deserialize(d).map(|p| p.0)
}

fn de_list<'de, D: Deserializer<'de>, T: FromConfigStr>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Parsed<T>>::deserialize(d).map(|v| v.into_iter().map(|p| p.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Writes `content` to `<tmp>/tern.toml` and loads it with `vars`.
    fn load_file(content: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.toml");
        std::fs::write(&path, content).unwrap();
        load_from_env_and(Some(&path), env(vars))
    }

    /// The error message for a file that must not load; asserts it names
    /// the file and every `needles`.
    fn file_error(content: &str, needles: &[&str]) -> String {
        let err = load_file(content, &[]).expect_err("config should be rejected");
        let msg = err.to_string();
        assert!(msg.starts_with("config error in "), "{msg}");
        assert!(msg.contains("tern.toml"), "no file name in: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in: {msg}");
        }
        msg
    }

    fn env_error_msg(vars: &[(&str, &str)], needles: &[&str]) -> String {
        let err = load_from_env_and(None, env(vars)).expect_err("env should be rejected");
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in: {msg}");
        }
        msg
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = load_from_env_and(None, no_env()).unwrap();
        assert_eq!(c, Config::default());
        assert!(!c.server.hostname.is_empty());
        assert_eq!(c.server.data_dir, PathBuf::from("tern-data"));
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(
            c.smtp.submission_listen,
            vec!["127.0.0.1:2587".parse().unwrap()]
        );
        assert!(c.smtp.submissions_listen.is_empty());
        assert!(!c.smtp.proxy_protocol);
        assert_eq!(c.smtp.max_connections, 10_000);
        assert_eq!(c.smtp.max_connections_per_ip, 100);
        assert_eq!(c.smtp.bare_line_endings, BareLineEndings::Reject);
        assert_eq!(c.smtp.workers, 0);
        assert_eq!(c.smtp.vrfy, VrfyPolicy::Ambiguous);
        assert_eq!(c.tls, Tls::default());
        assert!(c.tls.certificate.as_os_str().is_empty());
        assert_eq!(
            c.relay.networks,
            vec![
                "127.0.0.0/8".parse::<IpNet>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert!(c.relay.domains.is_empty());
        assert_eq!(c.limits.message_size, 10_240_000);
        assert_eq!(c.limits.recipients, 1000);
        assert_eq!(c.limits.command_line, 512);
        assert_eq!(c.limits.data_line, 65_536);
        assert_eq!(c.limits.errors, 10);
        assert_eq!(c.limits.command_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.data_timeout, Duration::from_secs(600));
        assert!(c.auth.users.is_empty());
        assert_eq!(c.http.listen, "127.0.0.1:8025".parse().unwrap());
        assert_eq!(c.queue.cache_size, 67_108_864);
        assert_eq!(c.queue.min_free_space, 104_857_600);
        assert_eq!(
            c.queue.retry_schedule,
            [
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(900)
            ]
        );
        assert_eq!(c.queue.max_lifetime, Duration::from_secs(5 * 86_400));
        assert_eq!(c.queue.delay_warning, Some(Duration::from_secs(4 * 3600)));
        assert!(c.routes.is_empty());
        assert!(c.dns.nameservers.is_empty());
        assert_eq!(c.dns.timeout, Duration::from_secs(5));
        let d = &c.delivery;
        assert!(d.enabled);
        assert_eq!(d.port, 25);
        assert!(!d.allow_private_addresses);
        assert_eq!(d.helo_name, "");
        assert_eq!(d.max_connections, 10);
        assert_eq!(d.max_messages_per_connection, 100);
        assert_eq!(d.max_message_rate, None);
        assert_eq!(d.mx_max_age, Duration::from_secs(60));
        assert_eq!(d.connect_timeout, Duration::from_secs(30));
        assert_eq!(d.command_timeout, Duration::from_secs(300));
        assert_eq!(d.data_timeout, Duration::from_secs(600));
        assert_eq!(d.idle_timeout, Duration::from_secs(5));
        c.validate("defaults").unwrap();
    }

    #[test]
    fn load_without_file_uses_process_env() {
        // Only meaningful when nobody set TERN_*__* for the test run.
        if std::env::vars_os().any(|(k, _)| k.to_str().and_then(env_key).is_some()) {
            return;
        }
        assert_eq!(load(None).unwrap(), Config::default());
    }

    #[test]
    fn field_lists_follow_declaration_order() {
        assert_eq!(
            fields_of::<Config>(),
            [
                "server", "smtp", "tls", "relay", "limits", "auth", "http", "queue", "routes",
                "dns", "delivery", "policy", "dkim"
            ]
        );
        assert_eq!(&fields_of::<Smtp>()[..2], ["listen", "submission_listen"]);
        assert_eq!(fields_of::<AuthUser>(), ["name", "password_hash"]);
    }

    #[test]
    fn file_overrides_defaults() {
        let c = load_file(
            r#"
            [server]
            hostname = "mx.example.org"

            [smtp]
            listen = ["0.0.0.0:25"]
            submissions_listen = ["[::]:465", "0.0.0.0:465"]
            proxy_protocol = true
            bare_line_endings = "normalize"
            vrfy = "refuse"

            [relay]
            networks = ["10.0.0.0/8", "192.0.2.7"]
            domains = ["example.org"]

            [limits]
            command_timeout = "30s"
            data_timeout = "1h 30m"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(c.server.hostname, "mx.example.org");
        // Lists replace the default rather than merging with it.
        assert_eq!(c.smtp.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert_eq!(c.smtp.submissions_listen.len(), 2);
        assert_eq!(c.smtp.submission_listen, Smtp::default().submission_listen);
        assert!(c.smtp.proxy_protocol);
        assert_eq!(c.smtp.bare_line_endings, BareLineEndings::Normalize);
        assert_eq!(c.smtp.vrfy, VrfyPolicy::Refuse);
        assert_eq!(
            c.relay.networks,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.0.2.7/32".parse().unwrap()
            ]
        );
        assert_eq!(c.relay.domains, ["example.org"]);
        assert_eq!(c.limits.command_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.data_timeout, Duration::from_secs(5400));
        // Untouched keys keep their defaults.
        assert_eq!(c.limits.data_line, 65_536);
        assert_eq!(c.queue, Queue::default());
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(load_file("", &[]).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named_with_its_section() {
        let msg = file_error(
            "[smtp]\nlisen = [\"0.0.0.0:25\"]\n",
            &[
                "unknown key `smtp.lisen`",
                "expected one of listen, submission_listen",
            ],
        );
        assert!(!msg.contains('\n'), "{msg}");
        file_error(
            "[smpt]\nlisten = []\n",
            &["unknown key `smpt`", "expected one of server, smtp, tls"],
        );
        file_error(
            "[[auth.users]]\nname = \"a\"\npassword = \"x\"\n",
            &[
                "unknown key `auth.users[0].password`",
                "name, password_hash",
            ],
        );
    }

    #[test]
    fn bad_integer_names_key_and_value() {
        file_error(
            "[smtp]\nmax_connections = \"lots\"\n",
            &["smtp.max_connections:", "\"lots\"", "integer", "(line 2)"],
        );
        file_error("[limits]\nerrors = -1\n", &["limits.errors:", "-1"]);
    }

    #[test]
    fn reverse_dns_and_recipients_file() {
        let c = load_file("[policy]\nreverse_dns = \"confirmed\"\n", &[]).unwrap();
        assert_eq!(c.policy.reverse_dns, ReverseDns::Confirmed);
        assert_eq!(Config::default().policy.reverse_dns, ReverseDns::Off);
        file_error(
            "[policy]\nreverse_dns = \"yes\"\n",
            &[
                "policy.reverse_dns:",
                "\"off\", \"exists\" or \"confirmed\"",
            ],
        );
        file_error(
            "[policy]\nreverse_dns_timeout = \"0s\"\n",
            &["policy.reverse_dns_timeout:", "greater than 0"],
        );
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("rcpts");
        std::fs::write(&list, "a@example.org\nnobody\n").unwrap();
        file_error(
            &format!(
                "[policy]\nrecipients_file = {:?}\n",
                list.display().to_string()
            ),
            &["policy.recipients_file:", "rcpts: line 2:"],
        );
        std::fs::write(&list, "a@example.org\n@example.net\n").unwrap();
        let text = format!(
            "[policy]\nrecipients_file = {:?}\n",
            list.display().to_string()
        );
        assert_eq!(load_file(&text, &[]).unwrap().policy.recipients_file, list);
    }

    #[test]
    fn bad_duration_names_key_and_value() {
        file_error(
            "[limits]\ncommand_timeout = \"5 parsecs\"\n",
            &["limits.command_timeout:", "invalid duration \"5 parsecs\""],
        );
    }

    #[test]
    fn bad_network_names_element() {
        file_error(
            "[relay]\nnetworks = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
            &["relay.networks[1]:", "invalid IP network \"10.0.0.0/33\""],
        );
    }

    #[test]
    fn bad_socket_address_names_element() {
        file_error(
            "[smtp]\nsubmission_listen = [\"localhost\"]\n",
            &[
                "smtp.submission_listen[0]:",
                "invalid socket address \"localhost\"",
            ],
        );
        file_error(
            "[http]\nlisten = \"8025\"\n",
            &["http.listen:", "invalid socket address \"8025\""],
        );
    }

    #[test]
    fn bad_enum_lists_choices() {
        file_error(
            "[smtp]\nbare_line_endings = \"fix\"\n",
            &[
                "smtp.bare_line_endings:",
                "invalid bare line ending policy \"fix\"",
                "\"reject\" or \"normalize\"",
            ],
        );
        file_error(
            "[smtp]\nvrfy = 252\n",
            &["smtp.vrfy:", "252", "VRFY policy"],
        );
    }

    #[test]
    fn wrong_shape_is_reported() {
        file_error("smtp = 5\n", &["smtp:"]);
        file_error(
            "[smtp]\nlisten = \"0.0.0.0:25\"\n",
            &["smtp.listen:", "sequence"],
        );
    }

    #[test]
    fn toml_syntax_error_names_file_and_line() {
        file_error(
            "[smtp]\nlisten = [\"0.0.0.0:25\"\nworkers = 2\n",
            &["invalid TOML", "line"],
        );
    }

    #[test]
    fn missing_file_names_file_and_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let msg = load_from_env_and(Some(&path), no_env())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("absent.toml"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn env_overrides_defaults_and_file() {
        let c = load_file(
            "[server]\nhostname = \"from-file\"\n[smtp]\nworkers = 3\n",
            &[
                ("TERN_SERVER__HOSTNAME", "from-env"),
                ("TERN_SMTP__LISTEN", "127.0.0.1:2600"),
                ("TERN_SMTP__SUBMISSION_LISTEN", "127.0.0.1:2601, [::1]:2601"),
                ("TERN_SMTP__MAX_CONNECTIONS", "5"),
                ("TERN_SMTP__PROXY_PROTOCOL", "true"),
                ("TERN_SMTP__VRFY", "refuse"),
                ("TERN_RELAY__NETWORKS", "10.0.0.0/8"),
                ("TERN_RELAY__DOMAINS", "example.org"),
                ("TERN_LIMITS__COMMAND_TIMEOUT", "30s"),
                ("TERN_QUEUE__MIN_FREE_SPACE", "0"),
                ("TERN_TLS__CERTIFICATE", "/etc/ssl/x.pem"),
                ("TERN_TLS__PRIVATE_KEY", "/etc/ssl/x.key"),
                // Not configuration keys: no `__`, or not ours.
                ("TERN_CONFIG", "/elsewhere.toml"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.hostname, "from-env");
        // A single element is still a list.
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2600".parse().unwrap()]);
        assert_eq!(
            c.smtp.submission_listen,
            vec![
                "127.0.0.1:2601".parse().unwrap(),
                "[::1]:2601".parse().unwrap()
            ]
        );
        assert_eq!(c.smtp.workers, 3, "file value kept");
        assert_eq!(c.smtp.max_connections, 5);
        assert!(c.smtp.proxy_protocol);
        assert_eq!(c.smtp.vrfy, VrfyPolicy::Refuse);
        assert_eq!(
            c.relay.networks,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(c.relay.domains, ["example.org"]);
        assert_eq!(c.limits.command_timeout, Duration::from_secs(30));
        assert_eq!(c.queue.min_free_space, 0);
        assert_eq!(c.tls.certificate, PathBuf::from("/etc/ssl/x.pem"));
    }

    #[test]
    fn env_empty_list_clears_it() {
        let c = load_from_env_and(
            None,
            env(&[
                ("TERN_SMTP__SUBMISSION_LISTEN", ""),
                ("TERN_RELAY__NETWORKS", " "),
            ]),
        )
        .unwrap();
        assert!(c.smtp.submission_listen.is_empty());
        assert!(c.relay.networks.is_empty());
        assert_eq!(c.smtp.listen, Smtp::default().listen);
    }

    #[test]
    fn env_errors_name_the_variable() {
        env_error_msg(
            &[("TERN_SMTP__MAX_CONNECTIONS", "lots")],
            &[
                "config error in environment variable TERN_SMTP__MAX_CONNECTIONS",
                "smtp.max_connections",
                "\"lots\"",
            ],
        );
        env_error_msg(
            &[("TERN_SMTP__LISEN", "127.0.0.1:25")],
            &[
                "environment variable TERN_SMTP__LISEN",
                "unknown key `smtp.lisen`",
                "listen",
            ],
        );
        env_error_msg(
            &[("TERN_SMPT__LISTEN", "127.0.0.1:25")],
            &["TERN_SMPT__LISTEN", "unknown key `smpt`"],
        );
        env_error_msg(
            &[("TERN_SMTP__LISTEN__X", "1")],
            &["TERN_SMTP__LISTEN__X", "unknown key `smtp.listen.x`"],
        );
        env_error_msg(
            &[
                ("TERN_SERVER__HOSTNAME", "fine"),
                ("TERN_SMTP__LISTEN", "127.0.0.1:25,nonsense"),
            ],
            &[
                "config error in environment variable TERN_SMTP__LISTEN",
                "smtp.listen[1]",
                "invalid socket address \"nonsense\"",
            ],
        );
        env_error_msg(
            &[("TERN_LIMITS__DATA_TIMEOUT", "forever")],
            &[
                "TERN_LIMITS__DATA_TIMEOUT",
                "limits.data_timeout",
                "invalid duration",
            ],
        );
        env_error_msg(
            &[("TERN_SMTP__PROXY_PROTOCOL", "maybe")],
            &["TERN_SMTP__PROXY_PROTOCOL", "expected true or false"],
        );
        env_error_msg(
            &[("TERN_LIMITS__ERRORS", "99999999999")],
            &["TERN_LIMITS__ERRORS", "limits.errors"],
        );
        env_error_msg(
            &[("TERN_AUTH__USERS", "bob")],
            &["TERN_AUTH__USERS", "config file"],
        );
    }

    #[test]
    fn env_is_blamed_for_validation_errors_it_caused() {
        let err = load_file(
            "[limits]\ndata_line = 2000\n",
            &[("TERN_LIMITS__COMMAND_LINE", "100")],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("environment variable TERN_LIMITS__COMMAND_LINE")
                && msg.contains("limits.command_line"),
            "{msg}"
        );
        assert_eq!(err.key(), Some("limits.command_line"));
    }

    const HASH: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

    #[test]
    fn validation_errors_name_key_and_file() {
        file_error(
            "[smtp]\nlisten = []\nsubmission_listen = []\n",
            &["smtp.listen:", "no SMTP listener"],
        );
        file_error(
            "[smtp]\nlisten = []\nsubmission_listen = []\nsubmissions_listen = [\"0.0.0.0:465\"]\n[server]\nhostname = \"\"\n",
            &["server.hostname:", "empty"],
        );
        file_error(
            "[server]\npostmaster = \"root\"\n",
            &["server.postmaster:", "\"root\" is not a mailbox"],
        );
        file_error(
            "[limits]\ncommand_line = 100\n",
            &["limits.command_line:", "512"],
        );
        file_error(
            "[limits]\ndata_line = 999\n",
            &["limits.data_line:", "1000"],
        );
        file_error("[limits]\nmessage_size = 0\n", &["limits.message_size:"]);
        file_error("[limits]\nrecipients = 0\n", &["limits.recipients:"]);
        file_error("[limits]\nerrors = 0\n", &["limits.errors:"]);
        file_error(
            "[limits]\ndata_timeout = \"0s\"\n",
            &["limits.data_timeout:"],
        );
        file_error("[smtp]\nmax_connections = 0\n", &["smtp.max_connections:"]);
        file_error(
            "[tls]\ncertificate = \"/etc/ssl/cert.pem\"\n",
            &["tls.private_key:", "tls.certificate"],
        );
        file_error(
            "[tls]\nprivate_key = \"/etc/ssl/key.pem\"\n",
            &["tls.certificate:"],
        );
        file_error(
            "[http]\nlisten = \"127.0.0.1:2525\"\n",
            &["http.listen:", "already used by smtp.listen[0]"],
        );
        file_error(
            "[relay]\ndomains = [\"example.org\", \"\"]\n",
            &["relay.domains[1]:"],
        );
        let users = format!(
            "[[auth.users]]\nname = \"a\"\npassword_hash = \"{HASH}\"\n\
             [[auth.users]]\nname = \"b\"\npassword_hash = \"{HASH}\"\n\
             [[auth.users]]\nname = \"c\"\npassword_hash = \"hunter2\"\n"
        );
        file_error(&users, &["auth.users[2].password_hash:", "tern auth hash"]);
        let dup = format!(
            "[[auth.users]]\nname = \"a\"\npassword_hash = \"{HASH}\"\n\
             [[auth.users]]\nname = \"a\"\npassword_hash = \"{HASH}\"\n"
        );
        file_error(&dup, &["auth.users[1].name:", "duplicate"]);
        file_error(
            "[policy]\ngreylist_delay = \"0s\"\n",
            &["policy.greylist_delay:", "greater than 0"],
        );
        file_error(
            "[policy]\ngreylist_delay = \"1h\"\ngreylist_retry_window = \"30m\"\n",
            &[
                "policy.greylist_retry_window:",
                "longer than policy.greylist_delay (1h)",
            ],
        );
        file_error(
            "[policy]\ngreylist_expiry = \"0s\"\n",
            &["policy.greylist_expiry:"],
        );
        file_error(
            "[policy]\ngreylist_delay = \"soon\"\n",
            &["policy.greylist_delay"],
        );
    }

    #[test]
    fn port_zero_may_repeat() {
        load_file(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission_listen = [\"127.0.0.1:0\"]\n[http]\nlisten = \"127.0.0.1:0\"\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn validate_uses_given_source() {
        let mut c = Config::default();
        c.limits.data_line = 10;
        let msg = c.validate("/etc/tern.toml").unwrap_err().to_string();
        assert!(
            msg.starts_with("config error in /etc/tern.toml: limits.data_line:"),
            "{msg}"
        );
    }

    const DOC: &str = include_str!("../../../docs/configuration.md");

    #[test]
    fn documented_example_loads() {
        let start = DOC
            .find("## Complete example")
            .and_then(|i| DOC[i..].find("```toml\n").map(|j| i + j + 8))
            .expect("example block in docs/configuration.md");
        let end = start + DOC[start..].find("```").unwrap();
        let c = load_file(&DOC[start..end], &[]).unwrap();
        assert_eq!(c.server.hostname, "mx.example.org");
        assert_eq!(c.auth.users.len(), 2);
    }

    #[test]
    fn keyword_errors_list_every_choice() {
        assert_eq!(expected_one_of(&["a", "b"]), r#"expected "a" or "b""#);
        assert_eq!(
            expected_one_of(&["off", "record", "hold", "enforce"]),
            r#"expected "off", "record", "hold" or "enforce""#
        );
        assert_eq!(
            DmarcAction::parse(" hold ").unwrap(),
            DmarcAction::Hold,
            "surrounding space is ignored"
        );
    }

    #[test]
    fn every_key_is_documented() {
        for section in fields_of::<Config>() {
            let heading = if *section == "auth" {
                "## `[[auth.users]]`".to_string()
            } else if *section == "routes" || *section == "dkim" {
                format!("## `[[{section}]]`")
            } else {
                format!("## `[{section}]`")
            };
            assert!(DOC.contains(&heading), "{heading} missing from the docs");
            let keys = if *section == "auth" {
                fields_of::<AuthUser>()
            } else {
                section_fields(section)
            };
            for key in keys {
                assert!(
                    DOC.contains(&format!("| `{key}` |")),
                    "{section}.{key} missing from the docs"
                );
            }
        }
    }

    #[test]
    fn to_toml_round_trips() {
        let mut c = Config::default();
        c.server.hostname = "mx.example.org".into();
        c.smtp.submissions_listen = vec!["[::]:465".parse().unwrap()];
        c.limits.data_timeout = Duration::from_secs(90);
        c.relay.domains = vec!["example.org".into()];
        c.auth.users = vec![AuthUser {
            name: "alice".into(),
            password_hash: hash_password("pw").unwrap(),
        }];
        let text = c.to_toml();
        assert!(text.contains("data_timeout = \"1m 30s\""), "{text}");
        assert!(text.contains("[[auth.users]]"), "{text}");
        assert_eq!(load_file(&text, &[]).unwrap(), c);
    }

    fn route(domain: &str) -> Route {
        Route {
            domain: domain.into(),
            relay: None,
            tls: TlsPolicy::default(),
            max_connections: None,
            max_messages_per_connection: None,
            max_message_rate: None,
            max_recipients_per_transaction: None,
        }
    }

    #[test]
    fn delivery_sections_parse() {
        let c = load_file(
            r#"
            [[routes]]
            domain = "Example.NET."
            relay = "[::1]:2526"
            tls = "required"
            max_connections = 2
            max_messages_per_connection = 50
            max_message_rate = "100/m"

            [[routes]]
            domain = "*.example.org"
            max_message_rate = "5/s"

            [[routes]]
            domain = "*"
            relay = "smarthost.example.com"
            tls = "none"

            [dns]
            nameservers = ["127.0.0.1:5353", "::1", "10.0.0.1"]
            timeout = "2s"

            [delivery]
            enabled = false
            port = 2525
            allow_private_addresses = true
            helo_name = "out.example.org"
            max_connections = 20
            max_messages_per_connection = 1000
            max_message_rate = "50000/h"
            connect_timeout = "10s"
            command_timeout = "2m"
            data_timeout = "20m"
            idle_timeout = "1s"

            [queue]
            retry_schedule = ["30s", "10m", "1h"]
            max_lifetime = "3d"
            delay_warning = "1d"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(c.routes.len(), 3);
        let r = &c.routes[0];
        assert_eq!(r.domain, "example.net", "lowercased, trailing dot dropped");
        assert_eq!(
            r.relay,
            Some(RelayHost {
                host: "::1".into(),
                port: Some(2526)
            })
        );
        assert_eq!(r.tls, TlsPolicy::Required);
        assert_eq!(r.max_connections, Some(2));
        assert_eq!(r.max_messages_per_connection, Some(50));
        assert_eq!(
            r.max_message_rate,
            Some(Rate {
                count: 100,
                per: Duration::from_secs(60)
            })
        );
        let r = &c.routes[1];
        assert_eq!(r.domain, "*.example.org");
        assert_eq!(r.relay, None, "no relay: MX lookup");
        assert_eq!(r.tls, TlsPolicy::Opportunistic, "default");
        assert_eq!(r.max_connections, None);
        assert_eq!(r.max_message_rate.unwrap().count, 5);
        let r = &c.routes[2];
        assert_eq!(
            r.relay,
            Some(RelayHost {
                host: "smarthost.example.com".into(),
                port: None
            })
        );
        assert_eq!(r.tls, TlsPolicy::None);
        assert_eq!(
            c.dns.nameservers,
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap(),
                "10.0.0.1:53".parse().unwrap()
            ]
        );
        assert_eq!(c.dns.timeout, Duration::from_secs(2));
        let d = &c.delivery;
        assert!(!d.enabled);
        assert_eq!(d.port, 2525);
        assert!(d.allow_private_addresses);
        assert_eq!(d.helo_name, "out.example.org");
        assert_eq!(d.max_connections, 20);
        assert_eq!(d.max_messages_per_connection, 1000);
        assert_eq!(
            d.max_message_rate,
            Some(Rate {
                count: 50_000,
                per: Duration::from_secs(3600)
            })
        );
        assert_eq!(d.connect_timeout, Duration::from_secs(10));
        assert_eq!(d.command_timeout, Duration::from_secs(120));
        assert_eq!(d.data_timeout, Duration::from_secs(1200));
        assert_eq!(d.idle_timeout, Duration::from_secs(1));
        assert_eq!(
            c.queue.retry_schedule,
            [
                Duration::from_secs(30),
                Duration::from_secs(600),
                Duration::from_secs(3600)
            ]
        );
        assert_eq!(c.queue.max_lifetime, Duration::from_secs(3 * 86_400));
        assert_eq!(c.queue.delay_warning, Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn route_matching() {
        let any = route("*");
        assert!(any.matches("example.net"));
        assert!(any.matches("a.b.c"));
        assert!(any.matches(""));

        let exact = route("example.net");
        assert!(exact.matches("example.net"));
        assert!(exact.matches("EXAMPLE.Net"));
        assert!(exact.matches("example.net."));
        assert!(!exact.matches("a.example.net"));
        assert!(!exact.matches("example.org"));
        assert!(!exact.matches("xexample.net"));

        let sub = route("*.example.net");
        assert!(sub.matches("a.example.net"));
        assert!(sub.matches("a.b.example.net"));
        assert!(sub.matches("Mail.EXAMPLE.net."));
        assert!(!sub.matches("example.net"));
        assert!(!sub.matches("example.net."));
        assert!(!sub.matches("xexample.net"));
        assert!(!sub.matches(".example.net"), "empty label");
        assert!(!sub.matches("a.example.org"));

        // Patterns built in code rather than loaded are compared the same way.
        assert!(route("Example.NET.").matches("example.net"));
        assert!(route("*.Example.NET").matches("x.example.net"));
        // Non-ASCII input does not panic.
        assert!(!sub.matches("é.example.ne"));
        assert!(!sub.matches("é"));
    }

    #[test]
    fn relay_host_forms() {
        let p = |s: &str| s.parse::<RelayHost>();
        let h = |host: &str, port: Option<u16>| RelayHost {
            host: host.into(),
            port,
        };
        assert_eq!(
            p("smtp.example.net:587"),
            Ok(h("smtp.example.net", Some(587)))
        );
        assert_eq!(p("smtp.example.net"), Ok(h("smtp.example.net", None)));
        assert_eq!(p("localhost"), Ok(h("localhost", None)));
        assert_eq!(p("1.2.3.4:25"), Ok(h("1.2.3.4", Some(25))));
        assert_eq!(p("1.2.3.4"), Ok(h("1.2.3.4", None)));
        assert_eq!(p("[::1]:2526"), Ok(h("::1", Some(2526))));
        assert_eq!(p("[::1]"), Ok(h("::1", None)));
        assert_eq!(p("::1"), Ok(h("::1", None)));
        assert_eq!(p("[2001:db8::1]:25"), Ok(h("2001:db8::1", Some(25))));
        assert_eq!(p("[1.2.3.4]:25"), Ok(h("1.2.3.4", Some(25))));
        assert_eq!(p("[mx.example.net]:25"), Ok(h("mx.example.net", Some(25))));
        assert_eq!(
            p(" relay_1.example.net:25 "),
            Ok(h("relay_1.example.net", Some(25)))
        );
        for bad in [
            "",
            ":25",
            "host:",
            "host:port",
            "host:70000",
            "[::1",
            "[::1]x",
            "[::1]:",
            "2001:db8::1:25:x",
            "a b",
            "a..b",
            "[]:25",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted: {:?}", p(bad));
        }
        // Display gives back a form that parses to the same value.
        for s in [
            "smtp.example.net:587",
            "smtp.example.net",
            "1.2.3.4:25",
            "[::1]:2526",
            "[::1]",
        ] {
            let host = p(s).unwrap();
            assert_eq!(host.to_string(), s);
            assert_eq!(p(&host.to_string()), Ok(host));
        }
        assert_eq!(p("::1").unwrap().to_string(), "[::1]");
    }

    #[test]
    fn rates() {
        let r = |count, secs| {
            Ok(Rate {
                count,
                per: Duration::from_secs(secs),
            })
        };
        assert_eq!("100/s".parse::<Rate>(), r(100, 1));
        assert_eq!("6000/m".parse::<Rate>(), r(6000, 60));
        assert_eq!(" 50000 / h ".parse::<Rate>(), r(50_000, 3600));
        assert_eq!("1/d".parse::<Rate>(), r(1, 86_400));
        for bad in [
            "100", "100/", "/s", "100/1s", "100/min", "-1/s", "1.5/s", "x/s",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} accepted");
        }
        for s in ["100/s", "6000/m", "50000/h", "1/d"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
        file_error(
            "[delivery]\nmax_message_rate = \"100/fortnight\"\n",
            &[
                "delivery.max_message_rate:",
                "invalid rate \"100/fortnight\"",
                "(line 2)",
            ],
        );
        file_error(
            "[[routes]]\ndomain = \"*\"\nmax_message_rate = 100\n",
            &["routes[0].max_message_rate:", "rate string"],
        );
    }

    #[test]
    fn delay_warning_can_be_off() {
        for off in ["\"0s\"", "\"0\"", "\"off\"", "\"\"", "0"] {
            let c = load_file(&format!("[queue]\ndelay_warning = {off}\n"), &[]).unwrap();
            assert_eq!(c.queue.delay_warning, None, "{off}");
        }
        let c = load_file("", &[("TERN_QUEUE__DELAY_WARNING", "off")]).unwrap();
        assert_eq!(c.queue.delay_warning, None);
        let c = load_file("", &[("TERN_QUEUE__DELAY_WARNING", "0")]).unwrap();
        assert_eq!(c.queue.delay_warning, None);
        let c = load_file("", &[("TERN_QUEUE__DELAY_WARNING", "2h")]).unwrap();
        assert_eq!(c.queue.delay_warning, Some(Duration::from_secs(7200)));
        file_error(
            "[queue]\ndelay_warning = \"soon\"\n",
            &[
                "queue.delay_warning:",
                "invalid duration \"soon\"",
                "\"off\"",
            ],
        );
        file_error(
            "[queue]\ndelay_warning = 5\n",
            &["queue.delay_warning:", "unit"],
        );
    }

    #[test]
    fn delivery_validation_errors_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("[[routes]]\ndomain = \"\"\n", "routes[0].domain:"),
            (
                "[[routes]]\ndomain = \"a.example\"\n[[routes]]\ndomain = \"bad domain\"\n",
                "routes[1].domain:",
            ),
            (
                "[[routes]]\ndomain = \"*example.net\"\n",
                "routes[0].domain:",
            ),
            ("[[routes]]\ndomain = \"*..\"\n", "routes[0].domain:"),
            ("[[routes]]\ndomain = \"a.*.b\"\n", "routes[0].domain:"),
            ("[[routes]]\ndomain = \"a..b\"\n", "routes[0].domain:"),
            ("[[routes]]\ndomain = \"**\"\n", "routes[0].domain:"),
            (
                "[[routes]]\ndomain = \"*\"\nrelay = \"mx.example.net:0\"\n",
                "routes[0].relay:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\nrelay = \"mx.example.net:x\"\n",
                "routes[0].relay:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\nrelay = \"\"\n",
                "routes[0].relay:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\ntls = \"may\"\n",
                "routes[0].tls:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\nmax_connections = 0\n",
                "routes[0].max_connections:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\nmax_messages_per_connection = 0\n",
                "routes[0].max_messages_per_connection:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\nmax_message_rate = \"0/s\"\n",
                "routes[0].max_message_rate:",
            ),
            (
                "[[routes]]\ndomain = \"*\"\nmax_recipients_per_transaction = 0\n",
                "routes[0].max_recipients_per_transaction:",
            ),
            ("[[routes]]\nrelay = \"a:25\"\n", "routes[0]"),
            ("[dns]\ntimeout = \"0s\"\n", "dns.timeout:"),
            (
                "[dns]\nnameservers = [\"dns.google\"]\n",
                "dns.nameservers[0]:",
            ),
            ("[delivery]\nport = 0\n", "delivery.port:"),
            ("[delivery]\nport = 65536\n", "delivery.port:"),
            ("[delivery]\nhelo_name = \"a b\"\n", "delivery.helo_name:"),
            (
                "[delivery]\nmax_connections = 0\n",
                "delivery.max_connections:",
            ),
            (
                "[delivery]\nmax_messages_per_connection = 0\n",
                "delivery.max_messages_per_connection:",
            ),
            (
                "[delivery]\nmax_message_rate = \"0/h\"\n",
                "delivery.max_message_rate:",
            ),
            (
                "[delivery]\nmax_recipients_per_transaction = 0\n",
                "delivery.max_recipients_per_transaction:",
            ),
            (
                "[delivery]\nconnect_timeout = \"0s\"\n",
                "delivery.connect_timeout:",
            ),
            (
                "[delivery]\ncommand_timeout = \"0s\"\n",
                "delivery.command_timeout:",
            ),
            (
                "[delivery]\ndata_timeout = \"0s\"\n",
                "delivery.data_timeout:",
            ),
            (
                "[delivery]\nidle_timeout = \"0s\"\n",
                "delivery.idle_timeout:",
            ),
            ("[delivery]\nmx_max_age = \"0s\"\n", "delivery.mx_max_age:"),
            ("[queue]\nretry_schedule = []\n", "queue.retry_schedule:"),
            (
                "[queue]\nretry_schedule = [\"1m\", \"0s\"]\n",
                "queue.retry_schedule[1]:",
            ),
            (
                "[queue]\nretry_schedule = [\"1m\", \"later\"]\n",
                "queue.retry_schedule[1]:",
            ),
            ("[queue]\nmax_lifetime = \"0s\"\n", "queue.max_lifetime:"),
            (
                "[queue]\nmax_lifetime = \"1h\"\ndelay_warning = \"1h\"\n",
                "queue.delay_warning:",
            ),
        ];
        for (content, key) in cases {
            let msg = file_error(content, &[key]);
            assert!(!msg.contains('\n'), "{msg}");
        }
        // A warning shorter than the lifetime is fine, and "off" always is.
        load_file(
            "[queue]\nmax_lifetime = \"1h\"\ndelay_warning = \"59m\"\n",
            &[],
        )
        .unwrap();
        load_file(
            "[queue]\nmax_lifetime = \"1h\"\ndelay_warning = \"off\"\n",
            &[],
        )
        .unwrap();
        // Underscores and digits are allowed in route domains.
        load_file(
            "[[routes]]\ndomain = \"*._dmarc.ex-ample1.net\"\n[[routes]]\ndomain = \"*\"\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn unknown_key_in_a_route_is_named() {
        file_error(
            "[[routes]]\ndomain = \"*\"\nrelya = \"a:25\"\n",
            &["unknown key `routes[0].relya`", "domain, relay, tls"],
        );
        file_error(
            "[[routes]]\ndomain = \"a.example\"\n[[routes]]\ndomain = \"*\"\nmax_conections = 1\n",
            &["unknown key `routes[1].max_conections`"],
        );
        file_error(
            "[dns]\nnameserver = []\n",
            &["unknown key `dns.nameserver`"],
        );
        file_error(
            "[delivery]\nenable = false\n",
            &["unknown key `delivery.enable`", "enabled"],
        );
        file_error("routes = 5\n", &["routes:"]);
    }

    #[test]
    fn env_overrides_delivery_keys() {
        let c = load_file(
            "[delivery]\nport = 25\n[queue]\nretry_schedule = [\"1m\"]\n",
            &[
                ("TERN_DELIVERY__PORT", "2526"),
                ("TERN_DNS__NAMESERVERS", "127.0.0.1:5353,127.0.0.1:5354"),
                ("TERN_QUEUE__RETRY_SCHEDULE", "1s,2s"),
                ("TERN_DELIVERY__ALLOW_PRIVATE_ADDRESSES", "true"),
                ("TERN_DELIVERY__ENABLED", "no"),
                ("TERN_DELIVERY__MAX_MESSAGE_RATE", "10/s"),
                ("TERN_DNS__TIMEOUT", "1s"),
            ],
        )
        .unwrap();
        assert_eq!(c.delivery.port, 2526);
        assert_eq!(
            c.dns.nameservers,
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:5354".parse().unwrap()
            ]
        );
        assert_eq!(
            c.queue.retry_schedule,
            [Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert!(c.delivery.allow_private_addresses);
        assert!(!c.delivery.enabled);
        assert_eq!(c.delivery.max_message_rate.unwrap().count, 10);
        assert_eq!(c.dns.timeout, Duration::from_secs(1));

        // A single entry is a one-element list.
        let c = load_file("", &[("TERN_QUEUE__RETRY_SCHEDULE", "30s")]).unwrap();
        assert_eq!(c.queue.retry_schedule, [Duration::from_secs(30)]);
        let c = load_file("", &[("TERN_DNS__NAMESERVERS", "10.0.0.1")]).unwrap();
        assert_eq!(c.dns.nameservers, vec!["10.0.0.1:53".parse().unwrap()]);

        env_error_msg(
            &[("TERN_DELIVERY__PORT", "0")],
            &["environment variable TERN_DELIVERY__PORT", "delivery.port"],
        );
        env_error_msg(
            &[("TERN_QUEUE__RETRY_SCHEDULE", "")],
            &[
                "environment variable TERN_QUEUE__RETRY_SCHEDULE",
                "queue.retry_schedule",
            ],
        );
        env_error_msg(
            &[("TERN_QUEUE__RETRY_SCHEDULE", "1m,soon")],
            &[
                "environment variable TERN_QUEUE__RETRY_SCHEDULE",
                "queue.retry_schedule[1]",
                "invalid duration",
            ],
        );
        env_error_msg(
            &[("TERN_DNS__NAMESERVERS", "127.0.0.1:53,resolver")],
            &["TERN_DNS__NAMESERVERS", "dns.nameservers[1]"],
        );
        env_error_msg(
            &[("TERN_ROUTES__DOMAIN", "*")],
            &["TERN_ROUTES__DOMAIN", "config file"],
        );
        env_error_msg(
            &[("TERN_DELIVERY__PROT", "25")],
            &["unknown key `delivery.prot`", "port"],
        );
    }

    #[test]
    fn to_toml_round_trips_delivery_settings() {
        let mut c = Config::default();
        c.server.hostname = "mx.example.org".into();
        c.routes = vec![
            Route {
                domain: "example.net".into(),
                relay: None,
                tls: TlsPolicy::Required,
                max_connections: Some(3),
                max_messages_per_connection: None,
                max_message_rate: Some(Rate {
                    count: 6000,
                    per: Duration::from_secs(60),
                }),
                max_recipients_per_transaction: Some(20),
            },
            Route {
                domain: "*.example.org".into(),
                relay: Some(RelayHost {
                    host: "2001:db8::25".into(),
                    port: Some(2526),
                }),
                ..route("")
            },
            Route {
                domain: "*".into(),
                relay: Some(RelayHost {
                    host: "127.0.0.1".into(),
                    port: None,
                }),
                tls: TlsPolicy::None,
                max_connections: None,
                max_messages_per_connection: Some(10),
                max_message_rate: None,
                max_recipients_per_transaction: None,
            },
        ];
        c.dns.nameservers = vec!["[::1]:5353".parse().unwrap()];
        c.delivery.max_message_rate = Some(Rate {
            count: 1,
            per: Duration::from_secs(86_400),
        });
        c.delivery.helo_name = "out.example.org".into();
        c.queue.retry_schedule = vec![Duration::from_secs(90), Duration::from_secs(7200)];
        c.queue.delay_warning = None;
        let text = c.to_toml();
        assert!(text.contains("[[routes]]"), "{text}");
        assert!(text.contains("relay = \"[2001:db8::25]:2526\""), "{text}");
        assert!(text.contains("max_message_rate = \"6000/m\""), "{text}");
        assert!(text.contains("tls = \"required\""), "{text}");
        assert!(
            text.contains("retry_schedule = [\"1m 30s\", \"2h\"]"),
            "{text}"
        );
        assert!(text.contains("delay_warning = \"off\""), "{text}");
        assert!(!text.contains("null"), "{text}");
        assert_eq!(load_file(&text, &[]).unwrap(), c);

        // None rate, default delay warning.
        let c = Config {
            routes: vec![route("*")],
            ..Config::default()
        };
        let text = c.to_toml();
        assert!(!text.contains("max_message_rate"), "{text}");
        assert!(text.contains("max_lifetime = \"5days\""), "{text}");
        assert_eq!(load_file(&text, &[]).unwrap(), c);
        // And the defaults alone.
        let text = Config::default().to_toml();
        assert_eq!(load_file(&text, &[]).unwrap(), Config::default());
    }

    #[test]
    fn dkim_entries_load_in_order_with_the_default_algorithm() {
        let c = load_file(
            r#"
            [[dkim]]
            domain = "Example.ORG."
            selector = "s2026"
            private_key = "/etc/tern/dkim/rsa.pem"

            [[dkim]]
            domain = "example.org"
            selector = "e2026"
            private_key = "/etc/tern/dkim/ed.pem"
            algorithm = "ed25519-sha256"
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(c.dkim.len(), 2);
        assert_eq!(c.dkim[0].domain, "Example.ORG.");
        assert_eq!(c.dkim[0].algorithm, DkimAlgorithm::RsaSha256);
        assert_eq!(c.dkim[1].selector, "e2026");
        assert_eq!(
            c.dkim[1].private_key,
            PathBuf::from("/etc/tern/dkim/ed.pem")
        );
        assert_eq!(c.dkim[1].algorithm, DkimAlgorithm::Ed25519Sha256);
        // The effective configuration round-trips, algorithm included.
        assert_eq!(load_file(&c.to_toml(), &[]).unwrap(), c);
        assert!(Config::default().dkim.is_empty());
    }

    #[test]
    fn dkim_errors_name_their_key() {
        let entry =
            "[[dkim]]\ndomain = \"example.org\"\nselector = \"s1\"\nprivate_key = \"k.pem\"\n";
        let msg = file_error(
            &format!("{entry}[[dkim]]\ndomain = \"example.org\"\nselektor = \"s2\"\n"),
            &["dkim[1].selektor"],
        );
        assert!(msg.contains("selector"), "expected keys listed: {msg}");
        file_error(
            &format!("{entry}algorithm = \"rsa-sha1\"\n"),
            &["dkim[0].algorithm:", "\"ed25519-sha256\""],
        );
        file_error(
            "[[dkim]]\nselector = \"s1\"\nprivate_key = \"k.pem\"\n",
            &["dkim[0]", "domain"],
        );
        let cases: &[(&str, &str)] = &[
            (
                "[[dkim]]\ndomain = \"bad domain\"\nselector = \"s1\"\nprivate_key = \"k\"\n",
                "dkim[0].domain:",
            ),
            (
                "[[dkim]]\ndomain = \"*.example.org\"\nselector = \"s1\"\nprivate_key = \"k\"\n",
                "dkim[0].domain:",
            ),
            (
                "[[dkim]]\ndomain = \"example.org\"\nselector = \"s 1\"\nprivate_key = \"k\"\n",
                "dkim[0].selector:",
            ),
            (
                "[[dkim]]\ndomain = \"example.org\"\nselector = \"s1\"\nprivate_key = \"\"\n",
                "dkim[0].private_key:",
            ),
        ];
        for (content, needle) in cases {
            file_error(content, &[needle]);
        }
        file_error(
            &format!("{entry}{}", entry.replace("example.org", "EXAMPLE.org")),
            &["dkim[1].selector:", "already dkim[0]"],
        );
        env_error_msg(
            &[("TERN_DKIM__DOMAIN", "example.org")],
            &[
                "TERN_DKIM__DOMAIN",
                "dkim cannot be set from the environment",
            ],
        );
    }
}
