//! The checks themselves, as plain functions the actor calls.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_dns::MxResolver;
use tracing::{info, warn};

use crate::{PolicyReply, Verdict};

/// HELO/EHLO rules. The syntax itself is the grammar's business (`tern-smtp` answers a name
/// that is neither a domain nor an address literal with 501 before policy sees it); these are
/// the rules about which valid names to accept from strangers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeloPolicy {
    /// Refuse names without a dot (`localhost`, `WIN-PC`), like Postfix's
    /// `reject_non_fqdn_helo_hostname`.
    pub require_fqdn: bool,
    /// Refuse clients that claim to be us (our host name): a common spammer trick.
    pub reject_own_hostname: bool,
}

impl HeloPolicy {
    pub fn enabled(&self) -> bool {
        self.require_fqdn || self.reject_own_hostname
    }
}

/// Checks a HELO name against `policy`.
pub fn check_helo(helo: &str, our_hostname: &str, policy: &HeloPolicy) -> Result<(), PolicyReply> {
    // An address literal (`[192.0.2.1]`) is fully qualified by nature.
    let literal = helo.starts_with('[');
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

/// Asks every zone at once; the first zone in configuration order listing `ip` (an answer in
/// 127.0.0.0/8, RFC 5782 §2.3) refuses the connection with 554 5.7.1 naming the list. A zone
/// that does not answer within `timeout`, or fails, counts as "not listed": a blocklist outage
/// must not stop mail (Postfix behaves the same), and it is logged.
pub async fn dnsbl(
    resolver: Arc<MxResolver>,
    ip: IpAddr,
    zones: Vec<String>,
    timeout: Duration,
) -> Verdict {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let mut lookups = tokio::task::JoinSet::new();
    for (index, zone) in zones.iter().enumerate() {
        let query = dnsbl_query(ip, zone);
        let resolver = resolver.clone();
        lookups.spawn(async move {
            let result = tokio::time::timeout(timeout, resolver.lookup_ipv4(&query)).await;
            (index, result)
        });
    }
    let mut listed: Option<(usize, std::net::Ipv4Addr)> = None;
    while let Some(joined) = lookups.join_next().await {
        let Ok((index, result)) = joined else {
            continue;
        };
        let zone = &zones[index];
        match result {
            Ok(Ok(answers)) => {
                if let Some(a) = answers.into_iter().find(|a| a.octets()[0] == 127) {
                    if listed.is_none_or(|(first, _)| index < first) {
                        listed = Some((index, a));
                    }
                }
            }
            Ok(Err(e)) => warn!(%zone, error = %e, "DNS blocklist lookup failed; not listed"),
            Err(_) => warn!(%zone, "DNS blocklist lookup timed out; not listed"),
        }
    }
    match listed {
        Some((index, answer)) => {
            let zone = &zones[index];
            info!(%ip, %zone, %answer, "client listed in DNS blocklist");
            Verdict::Refuse(PolicyReply::new(
                554,
                (5, 7, 1),
                format!("Service unavailable; client host [{ip}] blocked using {zone}"),
            ))
        }
        None => Verdict::Accept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helo_rules() {
        let all = HeloPolicy {
            require_fqdn: true,
            reject_own_hostname: true,
        };
        assert!(check_helo("mail.example.org", "mx.test", &all).is_ok());
        assert!(check_helo("[192.0.2.1]", "mx.test", &all).is_ok());
        assert!(check_helo("[IPv6:2001:db8::1]", "mx.test", &all).is_ok());
        // Syntax is the grammar's (tern_smtp answers 501 before policy runs): a bad name is
        // only judged by these rules.
        assert!(!tern_smtp::address::is_valid_helo_domain("bad name!"));
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
