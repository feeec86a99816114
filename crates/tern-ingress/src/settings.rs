//! Runtime settings of the ingress stage: the configuration file's values, already resolved
//! (certificates loaded, networks parsed), so a session never touches the file system or fails
//! on a setting.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use tern_policy::relay::{canonical_ip, RelayRules};
pub use tern_smtp::data::BareLineEndings;

/// What a listener is for; it decides which extensions a session offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 25 style: mail from other MTAs; no AUTH.
    Smtp,
    /// Port 587 style (RFC 6409): clients submit after STARTTLS + AUTH.
    Submission,
    /// Port 465 style (RFC 8314): TLS from the first byte, then AUTH.
    Submissions,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }

    pub fn implicit_tls(self) -> bool {
        self == ListenerKind::Submissions
    }

    pub fn offers_auth(self) -> bool {
        self != ListenerKind::Smtp
    }
}

#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    /// Expect a PROXY protocol v1/v2 header before SMTP (a load balancer fronts us).
    pub proxy_protocol: bool,
}

/// How VRFY and EXPN are answered (`smtp.vrfy` in the configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VrfyPolicy {
    /// 252: "cannot verify, but will try" (RFC 5321 §3.5.3) — leaks nothing.
    #[default]
    Ambiguous,
    /// 502 5.5.1: the commands are switched off.
    Refuse,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub hostname: String,
    /// The address mail to the bare `<postmaster>` is accepted for (`server.postmaster`);
    /// `None` keeps `postmaster`, which delivery treats as `postmaster@<hostname>`.
    pub postmaster: Option<String>,
    pub listeners: Vec<ListenerSpec>,
    /// Always present in practice: `tern serve` generates a self-signed certificate when none is
    /// configured, so STARTTLS works out of the box.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Who may send where (`relay.networks`, `relay.domains`); checked in the session whether or
    /// not the policy stage is enabled.
    pub relay: RelayRules,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub message_size: usize,
    pub recipients: usize,
    pub command_line: usize,
    pub data_line: usize,
    pub errors: u32,
    /// Most `Received:` header fields a message may carry (ours included) before it is refused
    /// as a mail loop (RFC 5321 §6.3; Postfix `hopcount_limit`).
    pub max_hops: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub bare_line_endings: BareLineEndings,
    pub vrfy: VrfyPolicy,
    /// SASL user name → PHC password hash (argon2id).
    pub users: HashMap<String, String>,
    /// Session arbiters (threads); 0 means one per CPU core but one (at least one).
    pub workers: usize,
    /// The validation stage; `None` runs without policy checks (tests of the SMTP layer).
    pub policy: Option<tern_policy::PolicyClient>,
    /// DKIM keys for mail from trusted and authenticated submitters; `None` signs nothing.
    pub dkim: Option<Arc<tern_dkim::Signer>>,
}

impl Settings {
    /// May this client relay to any domain (before authentication)?
    pub fn is_trusted_network(&self, ip: IpAddr) -> bool {
        self.relay.is_trusted_network(ip)
    }
}
