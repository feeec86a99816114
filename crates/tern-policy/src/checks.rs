//! The checks themselves, as plain functions the actor calls.

use std::net::IpAddr;
use std::time::Duration;

use tern_dns::MxResolver;
use tracing::{info, warn};

use crate::{PolicyReply, Verdict};

/// HELO/EHLO rules (`[policy.helo]`-style keys). All off by default: plenty of legitimate
/// servers announce odd names, and Postfix's defaults do not check HELO either.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeloPolicy {
    /// Refuse names that are not syntactically valid domains or address literals.
    pub reject_invalid: bool,
    /// Refuse names without a dot (`localhost`, `WIN-PC`), like Postfix's
    /// `reject_non_fqdn_helo_hostname`.
    pub require_fqdn: bool,
    /// Refuse clients that claim to be us (our host name): a common spammer trick.
    pub reject_own_hostname: bool,
}

impl HeloPolicy {
    pub fn enabled(&self) -> bool {
        self.reject_invalid || self.require_fqdn || self.reject_own_hostname
    }
}

fn valid_domain(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        })
}

fn address_literal(name: &str) -> bool {
    let Some(inner) = name.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            inner[5..].parse::<std::net::Ipv6Addr>().is_ok()
        }
        _ => inner.parse::<std::net::Ipv4Addr>().is_ok(),
    }
}

/// Checks a HELO name against `policy`.
pub fn check_helo(helo: &str, our_hostname: &str, policy: &HeloPolicy) -> Result<(), PolicyReply> {
    let literal = address_literal(helo);
    if policy.reject_invalid && !literal && !valid_domain(helo) {
        return Err(PolicyReply::new(
            501,
            (5, 5, 2),
            format!("Error: invalid HELO name {helo:?}"),
        ));
    }
    if policy.require_fqdn && !literal && !helo.trim_end_matches('.').contains('.') {
        return Err(PolicyReply::new(
            504,
            (5, 5, 2),
            format!("Error: HELO name {helo:?} is not a fully qualified domain name"),
        ));
    }
    if policy.reject_own_hostname
        && helo
            .trim_end_matches('.')
            .eq_ignore_ascii_case(our_hostname.trim_end_matches('.'))
    {
        return Err(PolicyReply::new(
            550,
            (5, 7, 1),
            "Error: you are not me (HELO with our own host name)",
        ));
    }
    Ok(())
}

/// The blocklist query name for `ip` in `zone`: reversed octets (IPv4) or reversed nibbles
/// (IPv6), RFC 5782 §2.1 and §2.4.
pub fn dnsbl_query(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name.push_str(zone);
            name
        }
    }
}

/// Asks every zone at once; the first one listing `ip` (an answer in 127.0.0.0/8, RFC 5782
/// §2.3) refuses the connection with 554 5.7.1 naming the list. A zone that does not answer
/// within `timeout`, or fails, counts as "not listed": a blocklist outage must not stop mail
/// (Postfix behaves the same), and it is logged.
pub async fn dnsbl(
    resolver: &MxResolver,
    ip: IpAddr,
    zones: &[String],
    timeout: Duration,
) -> Verdict {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let lookups = zones.iter().map(|zone| {
        let query = dnsbl_query(ip, zone);
        async move {
            let result = tokio::time::timeout(timeout, resolver.lookup_ipv4(&query)).await;
            (zone, result)
        }
    });
    for (zone, result) in futures_join_all(lookups).await {
        match result {
            Ok(Ok(answers)) => {
                if let Some(a) = answers.iter().find(|a| a.octets()[0] == 127) {
                    info!(%ip, %zone, answer = %a, "client listed in DNS blocklist");
                    return Verdict::Refuse(PolicyReply::new(
                        554,
                        (5, 7, 1),
                        format!("Service unavailable; client host [{ip}] blocked using {zone}"),
                    ));
                }
            }
            Ok(Err(e)) => warn!(%zone, error = %e, "DNS blocklist lookup failed; not listed"),
            Err(_) => warn!(%zone, "DNS blocklist lookup timed out; not listed"),
        }
    }
    Verdict::Accept
}

/// Runs the futures concurrently on the current task and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helo_rules() {
        let all = HeloPolicy {
            reject_invalid: true,
            require_fqdn: true,
            reject_own_hostname: true,
        };
        assert!(check_helo("mail.example.org", "mx.test", &all).is_ok());
        assert!(check_helo("[192.0.2.1]", "mx.test", &all).is_ok());
        assert!(check_helo("[IPv6:2001:db8::1]", "mx.test", &all).is_ok());
        assert_eq!(
            check_helo("bad name!", "mx.test", &all).unwrap_err().code,
            501
        );
        assert_eq!(check_helo("WIN-PC", "mx.test", &all).unwrap_err().code, 504);
        let own = check_helo("MX.test.", "mx.test", &all).unwrap_err();
        assert_eq!((own.code, own.enhanced), (550, (5, 7, 1)));
        assert!(check_helo("WIN-PC", "mx.test", &HeloPolicy::default()).is_ok());
    }

    #[test]
    fn blocklist_query_names() {
        assert_eq!(
            dnsbl_query("192.0.2.99".parse().unwrap(), "bl.test."),
            "99.2.0.192.bl.test"
        );
        let v6 = dnsbl_query("2001:db8:1:2:3:4:567:89ab".parse().unwrap(), "bl.test");
        // RFC 5782 §2.4's example.
        assert_eq!(
            v6,
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"
        );
    }
}
