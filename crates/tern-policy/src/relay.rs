//! Relay control: who may send mail where. Anyone may send to the domains we serve
//! (`relay.domains`); only clients in `relay.networks` and authenticated users may send anywhere
//! else. Nothing else stands between Tern and being an open relay.
//!
//! This is a pure rule on configuration, not a question for the policy actor: it is cheap, and it
//! must hold whether or not the validation stage is enabled or reachable, so the session calls it
//! in-process (a policy outage must never turn into an open relay).

use std::net::IpAddr;

use ipnet::IpNet;

/// The relay rule, built once from the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayRules {
    networks: Vec<IpNet>,
    /// Lower-cased, without a trailing dot.
    domains: Vec<String>,
}

/// An IPv4 client seen through an IPv6 socket arrives as `::ffff:a.b.c.d`; networks are written
/// in IPv4, so compare the IPv4 form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl RelayRules {
    /// `networks` may relay anywhere; mail for `domains` is accepted from anyone.
    pub fn new(networks: Vec<IpNet>, domains: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        Self {
            networks,
            domains: domains
                .into_iter()
                .map(|d| d.as_ref().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Is `ip` in `relay.networks`? Such clients are trusted: they relay anywhere and skip the
    /// checks aimed at strangers.
    pub fn is_trusted_network(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.networks.iter().any(|net| net.contains(&ip))
    }

    /// Is `domain` one we accept mail for from anyone (`relay.domains`)? Whole names only,
    /// case-insensitively: `sub.example.org` is not `example.org`.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// May a client at `ip` (authenticated or not) send to `domain`?
    pub fn may_relay_to(&self, ip: IpAddr, authenticated: bool, domain: &str) -> bool {
        self.is_local_domain(domain) || authenticated || self.is_trusted_network(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RelayRules {
        RelayRules::new(
            vec![
                "127.0.0.1/32".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ["Example.ORG.", "mail.example.net"],
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_domains_from_anyone_whole_names_only() {
        let r = rules();
        let stranger = ip("192.0.2.1");
        assert!(r.may_relay_to(stranger, false, "example.org"));
        assert!(r.may_relay_to(stranger, false, "EXAMPLE.org."));
        assert!(r.may_relay_to(stranger, false, "mail.example.net"));
        for foreign in [
            "elsewhere.test",
            "sub.example.org",
            "notexample.org",
            "example.org.evil.test",
            "example.net",
            "",
        ] {
            assert!(!r.may_relay_to(stranger, false, foreign), "{foreign}");
        }
    }

    #[test]
    fn trusted_networks_and_authenticated_clients_relay_anywhere() {
        let r = rules();
        assert!(r.may_relay_to(ip("127.0.0.1"), false, "elsewhere.test"));
        assert!(!r.may_relay_to(ip("127.0.0.2"), false, "elsewhere.test"));
        // An IPv4 client on an IPv6 socket matches the IPv4 network.
        assert!(r.is_trusted_network(ip("::ffff:127.0.0.1")));
        assert!(r.is_trusted_network(ip("2001:db8:1::25")));
        assert!(!r.is_trusted_network(ip("2001:db9::25")));
        assert!(r.may_relay_to(ip("192.0.2.1"), true, "elsewhere.test"));
    }

    #[test]
    fn no_configuration_is_no_relay() {
        let r = RelayRules::default();
        assert!(!r.may_relay_to(ip("127.0.0.1"), false, "example.org"));
        assert!(!r.is_trusted_network(ip("127.0.0.1")));
        assert!(r.may_relay_to(ip("127.0.0.1"), true, "example.org"));
    }
}
