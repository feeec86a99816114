//! The reverse-DNS requirement at connect (`policy.reverse_dns`), like Postfix's
//! `reject_unknown_reverse_client_hostname` (`exists`) and `reject_unknown_client_hostname`
//! (`confirmed`). Mail servers worth talking to have a PTR record, and most have one whose name
//! points back at them; botnets on residential lines mostly do not.
//!
//! Refusals use RFC 7372's code for this case: `550 5.7.25` ("reverse DNS validation failed"),
//! or `450 4.7.25` when DNS itself failed (SERVFAIL, timeout), so a client is never refused
//! for good because of our resolver's bad moment.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_dns::{DnsError, MxResolver};
use tracing::{info, warn};

use crate::{PolicyReply, Verdict};

/// What `policy.reverse_dns` requires of a client address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReverseDns {
    /// No requirement.
    #[default]
    Off,
    /// A PTR record must exist.
    Exists,
    /// A PTR name must have an A/AAAA record that is the client's address (forward-confirmed
    /// reverse DNS).
    Confirmed,
}

/// How many PTR names are followed forward at most: a hostile reverse zone could otherwise list
/// hundreds and make every connection cost hundreds of lookups. Postfix stops at a handful too.
pub const MAX_PTR_NAMES: usize = 5;

/// What DNS said about one PTR name's addresses (only asked under `confirmed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The addresses of the name's client family (none: NXDOMAIN or no such record).
    Addrs(Vec<IpAddr>),
    /// SERVFAIL, timeout, …
    Failed(String),
}

/// What DNS said about a client address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No PTR record (NXDOMAIN or NODATA).
    NoPtr,
    /// The PTR lookup failed (SERVFAIL, timeout, …).
    Failed(String),
    /// The PTR names, each with its forward lookup when one was made.
    Names(Vec<(String, Option<Forward>)>),
}

/// The decision for `ip` under `mode` given what DNS said: the verified host name (the PTR name
/// that passed) or the refusal.
pub fn decide(
    mode: ReverseDns,
    ip: IpAddr,
    lookup: &Lookup,
) -> Result<Option<String>, PolicyReply> {
    let permanent = |what: &str| {
        PolicyReply::new(
            550,
            (5, 7, 25),
            format!("Client host rejected: {what} [{ip}] (reverse DNS validation failed)"),
        )
    };
    let temporary = || {
        PolicyReply::new(
            450,
            (4, 7, 25),
            format!("Client host rejected: cannot find your hostname [{ip}], try again later"),
        )
    };
    match (mode, lookup) {
        (ReverseDns::Off, _) => Ok(None),
        (_, Lookup::Failed(_)) => Err(temporary()),
        (_, Lookup::NoPtr) => Err(permanent("cannot find your reverse hostname")),
        (_, Lookup::Names(names)) if names.is_empty() => {
            Err(permanent("cannot find your reverse hostname"))
        }
        (ReverseDns::Exists, Lookup::Names(names)) => Ok(Some(names[0].0.clone())),
        (ReverseDns::Confirmed, Lookup::Names(names)) => {
            let confirmed = names.iter().find(|(_, forward)| {
                matches!(forward, Some(Forward::Addrs(addrs)) if addrs.contains(&ip))
            });
            if let Some((name, _)) = confirmed {
                return Ok(Some(name.clone()));
            }
            // A name we could not look up might have matched: not a verdict to give for good.
            if names
                .iter()
                .any(|(_, forward)| matches!(forward, Some(Forward::Failed(_)) | None))
            {
                return Err(temporary());
            }
            Err(permanent(
                "hostname does not resolve to your address (forward-confirmed reverse DNS failed)",
            ))
        }
    }
}

/// Asks DNS what [`decide`] needs: the PTR names of `ip` and, under `confirmed`, the addresses
/// of each (only the client's family: an IPv4 client cannot be confirmed by an AAAA record).
pub async fn lookup(resolver: &MxResolver, mode: ReverseDns, ip: IpAddr) -> Lookup {
    let names = match resolver.lookup_ptr(ip).await {
        Ok(names) if names.is_empty() => return Lookup::NoPtr,
        Ok(names) => names,
        Err(e) => return Lookup::Failed(e.to_string()),
    };
    let mut out = Vec::with_capacity(names.len().min(MAX_PTR_NAMES));
    for name in names.into_iter().take(MAX_PTR_NAMES) {
        let forward = match mode {
            ReverseDns::Confirmed => Some(forward(resolver, &name, ip).await),
            ReverseDns::Off | ReverseDns::Exists => None,
        };
        let done = matches!(&forward, Some(Forward::Addrs(a)) if a.contains(&ip));
        out.push((name, forward));
        if done {
            break;
        }
    }
    Lookup::Names(out)
}

async fn forward(resolver: &MxResolver, name: &str, ip: IpAddr) -> Forward {
    let result: Result<Vec<IpAddr>, DnsError> = match ip {
        IpAddr::V4(_) => resolver
            .lookup_ipv4(name)
            .await
            .map(|a| a.into_iter().map(IpAddr::V4).collect()),
        IpAddr::V6(_) => resolver
            .lookup_ipv6(name)
            .await
            .map(|a| a.into_iter().map(IpAddr::V6).collect()),
    };
    match result {
        Ok(addrs) => Forward::Addrs(addrs),
        // A PTR name that is not even a valid domain name cannot confirm anything.
        Err(DnsError::InvalidDomain(_)) => Forward::Addrs(Vec::new()),
        Err(e) => Forward::Failed(e.to_string()),
    }
}

/// The whole check, bounded by `timeout` (a lookup that runs out of time is a temporary
/// failure: 450). Logs the verified host name.
pub async fn check(
    resolver: Arc<MxResolver>,
    mode: ReverseDns,
    ip: IpAddr,
    timeout: Duration,
) -> Verdict {
    if mode == ReverseDns::Off {
        return Verdict::Accept;
    }
    let lookup = match tokio::time::timeout(timeout, lookup(&resolver, mode, ip)).await {
        Ok(lookup) => lookup,
        Err(_) => Lookup::Failed(format!("no answer within {timeout:?}")),
    };
    if let Lookup::Failed(error) = &lookup {
        warn!(%ip, %error, "reverse DNS lookup failed");
    }
    match decide(mode, ip, &lookup) {
        Ok(name) => {
            info!(%ip, hostname = name.as_deref().unwrap_or(""), ?mode, "client reverse DNS verified");
            Verdict::Accept
        }
        Err(reply) => {
            info!(%ip, ?mode, reason = %reply.text, "client refused: reverse DNS");
            Verdict::Refuse(reply)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    fn names(list: &[(&str, Option<Forward>)]) -> Lookup {
        Lookup::Names(
            list.iter()
                .map(|(n, f)| (n.to_string(), f.clone()))
                .collect(),
        )
    }

    fn code(r: Result<Option<String>, PolicyReply>) -> (u16, (u8, u16, u16)) {
        let r = r.expect_err("a refusal");
        (r.code, r.enhanced)
    }

    #[test]
    fn off_accepts_anything() {
        for lookup in [Lookup::NoPtr, Lookup::Failed("x".into())] {
            assert_eq!(decide(ReverseDns::Off, ip(), &lookup), Ok(None));
        }
    }

    #[test]
    fn no_ptr_is_550_5_7_25_and_a_failure_450_4_7_25() {
        for mode in [ReverseDns::Exists, ReverseDns::Confirmed] {
            assert_eq!(code(decide(mode, ip(), &Lookup::NoPtr)), (550, (5, 7, 25)));
            assert_eq!(code(decide(mode, ip(), &names(&[]))), (550, (5, 7, 25)));
            let failed = Lookup::Failed("SERVFAIL".into());
            assert_eq!(code(decide(mode, ip(), &failed)), (450, (4, 7, 25)));
        }
        let r = decide(ReverseDns::Exists, ip(), &Lookup::NoPtr).unwrap_err();
        assert!(r.text.contains("[192.0.2.7]"), "{}", r.text);
    }

    #[test]
    fn exists_needs_only_a_name() {
        let lookup = names(&[("mail.example.org", None)]);
        assert_eq!(
            decide(ReverseDns::Exists, ip(), &lookup),
            Ok(Some("mail.example.org".into()))
        );
    }

    #[test]
    fn confirmed_needs_a_name_pointing_back() {
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let back = names(&[
            ("a.example.org", Some(Forward::Addrs(vec![other]))),
            ("b.example.org", Some(Forward::Addrs(vec![other, ip()]))),
        ]);
        assert_eq!(
            decide(ReverseDns::Confirmed, ip(), &back),
            Ok(Some("b.example.org".into()))
        );
        let mismatch = names(&[
            ("a.example.org", Some(Forward::Addrs(vec![other]))),
            ("b.example.org", Some(Forward::Addrs(vec![]))),
        ]);
        assert_eq!(
            code(decide(ReverseDns::Confirmed, ip(), &mismatch)),
            (550, (5, 7, 25))
        );
        // The same names pass `exists`.
        assert!(decide(ReverseDns::Exists, ip(), &mismatch).is_ok());
        // A forward lookup that failed might have matched: try again later.
        let failed = names(&[
            ("a.example.org", Some(Forward::Addrs(vec![other]))),
            ("b.example.org", Some(Forward::Failed("SERVFAIL".into()))),
        ]);
        assert_eq!(
            code(decide(ReverseDns::Confirmed, ip(), &failed)),
            (450, (4, 7, 25))
        );
    }
}
