//! MX resolution against a real DNS server on loopback ([`TestDns`]): every
//! test sends real UDP (and TCP) queries through hickory's resolver.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::testing::{TestDns, TestZone};
use crate::{DnsError, MxResolver, MxTarget, MAX_MX_HOSTS};

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A resolver for `dns` with short timeouts, so failures cost little time.
fn resolver(dns: &TestDns, allow_private: bool) -> MxResolver {
    MxResolver::with_timeout(
        Some(vec![dns.addr()]),
        allow_private,
        Duration::from_secs(1),
        1,
    )
    .unwrap()
}

fn hosts(targets: &[MxTarget]) -> Vec<&str> {
    targets.iter().map(|t| t.host.as_str()).collect()
}

#[tokio::test]
async fn mx_sorted_by_preference() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("example.test", 30, "mx3.example.test")
            .mx("example.test", 10, "mx1.example.test")
            .mx("example.test", 20, "mx2.example.test")
            .a("mx1.example.test", v4("192.0.2.1"))
            .a("mx2.example.test", v4("192.0.2.2"))
            .a("mx3.example.test", v4("192.0.2.3")),
    );
    let targets = resolver(&dns, false).resolve("example.test").await.unwrap();
    assert_eq!(
        targets,
        vec![
            MxTarget {
                host: "mx1.example.test".into(),
                preference: 10,
                addrs: vec![IpAddr::V4(v4("192.0.2.1"))],
            },
            MxTarget {
                host: "mx2.example.test".into(),
                preference: 20,
                addrs: vec![IpAddr::V4(v4("192.0.2.2"))],
            },
            MxTarget {
                host: "mx3.example.test".into(),
                preference: 30,
                addrs: vec![IpAddr::V4(v4("192.0.2.3"))],
            },
        ]
    );
}

#[tokio::test]
async fn equal_preferences_come_in_random_order() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("example.test", 10, "a.example.test")
            .mx("example.test", 10, "b.example.test")
            .mx("example.test", 5, "first.example.test")
            .a("a.example.test", v4("192.0.2.1"))
            .a("b.example.test", v4("192.0.2.2"))
            .a("first.example.test", v4("192.0.2.3")),
    );
    let resolver = resolver(&dns, false);
    let mut orders = HashSet::new();
    // The chance of 64 draws all giving the same order is 2^-63.
    for _ in 0..64 {
        let targets = resolver.resolve("example.test").await.unwrap();
        assert_eq!(targets[0].host, "first.example.test");
        orders.insert(
            hosts(&targets)
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(orders.len(), 2, "{orders:?}");
}

#[tokio::test]
async fn implicit_mx_from_a_and_aaaa() {
    let dns = TestDns::start(
        TestZone::new()
            .a("plain.test", v4("192.0.2.7"))
            .aaaa("plain.test", "2001:db8::7".parse().unwrap()),
    );
    let targets = resolver(&dns, false).resolve("plain.test.").await.unwrap();
    assert_eq!(
        targets,
        vec![MxTarget {
            host: "plain.test".into(),
            preference: 0,
            addrs: vec![
                IpAddr::V4(v4("192.0.2.7")),
                IpAddr::V6("2001:db8::7".parse().unwrap()),
            ],
        }]
    );
}

#[tokio::test]
async fn aaaa_only_mx_host() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("six.test", 10, "mx.six.test")
            .aaaa("mx.six.test", "2001:db8::25".parse().unwrap()),
    );
    let targets = resolver(&dns, false).resolve("six.test").await.unwrap();
    assert_eq!(hosts(&targets), ["mx.six.test"]);
    assert_eq!(
        targets[0].addrs,
        [IpAddr::V6("2001:db8::25".parse::<Ipv6Addr>().unwrap())]
    );
}

#[tokio::test]
async fn null_mx_is_permanent() {
    let dns = TestDns::start(
        TestZone::new()
            .null_mx("nomail.test")
            .a("nomail.test", v4("192.0.2.9")),
    );
    let err = resolver(&dns, false)
        .resolve("nomail.test")
        .await
        .unwrap_err();
    assert_eq!(err, DnsError::NullMx);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.1.10");
}

#[tokio::test]
async fn nxdomain_is_no_such_domain() {
    let dns = TestDns::start(TestZone::new().a("other.test", v4("192.0.2.1")));
    let err = resolver(&dns, false)
        .resolve("missing.test")
        .await
        .unwrap_err();
    assert_eq!(err, DnsError::NoSuchDomain);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.1.2");
}

#[tokio::test]
async fn servfail_is_temporary() {
    let dns = TestDns::start(TestZone::new().servfail("broken.test"));
    let err = resolver(&dns, false)
        .resolve("broken.test")
        .await
        .unwrap_err();
    assert!(matches!(err, DnsError::Temporary(_)), "{err:?}");
    assert!(!err.is_permanent());
    assert_eq!(err.enhanced_code(), "4.4.3");
}

#[tokio::test]
async fn servfail_on_one_mx_host_skips_it() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("half.test", 10, "bad.half.test")
            .mx("half.test", 20, "good.half.test")
            .servfail("bad.half.test")
            .a("good.half.test", v4("192.0.2.20")),
    );
    let targets = resolver(&dns, false).resolve("half.test").await.unwrap();
    assert_eq!(hosts(&targets), ["good.half.test"]);
}

#[tokio::test]
async fn mx_host_without_address_is_skipped() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("skip.test", 10, "noaddr.skip.test")
            .mx("skip.test", 20, "dangling.elsewhere.test")
            .mx("skip.test", 30, "alias.skip.test")
            .mx("skip.test", 40, "good.skip.test")
            // Exists (has a TXT) but has no A/AAAA: NODATA.
            .txt("noaddr.skip.test", "v=spf1 -all")
            // A CNAME to a name with an address is followed.
            .cname("alias.skip.test", "good.skip.test")
            .a("good.skip.test", v4("192.0.2.40")),
    );
    let targets = resolver(&dns, false).resolve("skip.test").await.unwrap();
    assert_eq!(hosts(&targets), ["alias.skip.test", "good.skip.test"]);
    assert_eq!(targets[0].addrs, [IpAddr::V4(v4("192.0.2.40"))]);
}

#[tokio::test]
async fn no_addresses_anywhere_is_temporary() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("empty.test", 10, "gone.empty.test")
            .txt("bare.test", "exists, but no address"),
    );
    let resolver = resolver(&dns, false);
    let err = resolver.resolve("empty.test").await.unwrap_err();
    assert_eq!(err, DnsError::NoAddresses);
    assert!(!err.is_permanent());
    // Implicit MX without A/AAAA.
    assert_eq!(
        resolver.resolve("bare.test").await.unwrap_err(),
        DnsError::NoAddresses
    );
}

#[tokio::test]
async fn private_addresses_dropped_unless_allowed() {
    let zone = TestZone::new()
        .mx("lan.test", 10, "loop.lan.test")
        .mx("lan.test", 20, "rfc1918.lan.test")
        .a("loop.lan.test", v4("127.0.0.1"))
        .a("rfc1918.lan.test", v4("10.1.2.3"))
        .aaaa("rfc1918.lan.test", "fe80::1".parse().unwrap())
        .mx("mixed.test", 10, "mx.mixed.test")
        .a("mx.mixed.test", v4("192.168.1.1"))
        .a("mx.mixed.test", v4("192.0.2.50"));
    let dns = TestDns::start(zone);

    let strict = resolver(&dns, false);
    let err = strict.resolve("lan.test").await.unwrap_err();
    assert_eq!(err, DnsError::OnlyPrivate);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.4.6");
    let mixed = strict.resolve("mixed.test").await.unwrap();
    assert_eq!(mixed[0].addrs, [IpAddr::V4(v4("192.0.2.50"))]);

    let lax = resolver(&dns, true);
    let targets = lax.resolve("lan.test").await.unwrap();
    assert_eq!(hosts(&targets), ["loop.lan.test", "rfc1918.lan.test"]);
    assert_eq!(targets[0].addrs, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    assert_eq!(targets[1].addrs.len(), 2);
}

#[tokio::test]
async fn at_most_max_mx_hosts() {
    let mut zone = TestZone::new();
    for i in 0..(MAX_MX_HOSTS as u16 + 3) {
        let host = format!("mx{i}.many.test");
        zone = zone
            .mx("many.test", i, &host)
            .a(&host, Ipv4Addr::new(192, 0, 2, i as u8 + 1));
    }
    let dns = TestDns::start(zone);
    let targets = resolver(&dns, false).resolve("many.test").await.unwrap();
    assert_eq!(targets.len(), MAX_MX_HOSTS);
    assert_eq!(targets.last().unwrap().preference, MAX_MX_HOSTS as u16 - 1);
}

#[tokio::test]
async fn domain_literals_need_no_dns() {
    // Nothing listens on this server: a DNS query would fail.
    let dns = TestDns::start(TestZone::new());
    let addr = dns.addr();
    dns.stop();
    let strict =
        MxResolver::with_timeout(Some(vec![addr]), false, Duration::from_secs(1), 1).unwrap();
    let targets = strict.resolve("[192.0.2.1]").await.unwrap();
    assert_eq!(
        targets,
        vec![MxTarget {
            host: "[192.0.2.1]".into(),
            preference: 0,
            addrs: vec![IpAddr::V4(v4("192.0.2.1"))],
        }]
    );
    let targets = strict.resolve("[IPv6:2001:db8::1]").await.unwrap();
    assert_eq!(
        targets[0].addrs,
        [IpAddr::V6("2001:db8::1".parse().unwrap())]
    );
    assert_eq!(
        strict.resolve("[127.0.0.1]").await.unwrap_err(),
        DnsError::OnlyPrivate
    );
    for bad in ["[192.0.2.1", "[300.1.1.1]", "[IPv6:192.0.2.1]", "[]"] {
        assert!(
            matches!(strict.resolve(bad).await, Err(DnsError::InvalidDomain(_))),
            "{bad}"
        );
    }
    let lax = MxResolver::with_timeout(Some(vec![addr]), true, Duration::from_secs(1), 1).unwrap();
    assert_eq!(
        lax.resolve("[ipv6:::1]").await.unwrap()[0].addrs,
        [IpAddr::V6(Ipv6Addr::LOCALHOST)]
    );
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let dns = TestDns::start(
        TestZone::new()
            .mx("cached.test", 10, "mx.cached.test")
            .a("mx.cached.test", v4("192.0.2.60")),
    );
    let resolver = resolver(&dns, false);
    let first = resolver.resolve("cached.test").await.unwrap();
    let missing = resolver.resolve("gone.test").await.unwrap_err();
    assert_eq!(missing, DnsError::NoSuchDomain);

    // With the server gone, only the cache can answer.
    dns.stop();
    assert_eq!(resolver.resolve("cached.test").await.unwrap(), first);
    // NXDOMAIN is cached too (RFC 2308, SOA minimum).
    assert_eq!(
        resolver.resolve("gone.test").await.unwrap_err(),
        DnsError::NoSuchDomain
    );
    // A name never asked is not: proof the server really is gone.
    assert!(matches!(
        resolver.resolve("fresh.test").await.unwrap_err(),
        DnsError::Temporary(_)
    ));
}

#[tokio::test]
async fn txt_records_are_served() {
    let long = "x".repeat(300);
    let dns = TestDns::start(
        TestZone::new()
            .txt("example.test", "v=spf1 ip4:192.0.2.0/24 -all")
            .txt("long.example.test", &long),
    );
    let resolver = hickory_resolver::TokioAsyncResolver::tokio(
        hickory_resolver::config::ResolverConfig::from_parts(
            None,
            vec![],
            hickory_resolver::config::NameServerConfigGroup::from(vec![
                hickory_resolver::config::NameServerConfig::new(
                    dns.addr(),
                    hickory_resolver::config::Protocol::Tcp,
                ),
            ]),
        ),
        hickory_resolver::config::ResolverOpts::default(),
    );
    let txt = resolver.txt_lookup("example.test.").await.unwrap();
    let texts: Vec<String> = txt.iter().map(|t| t.to_string()).collect();
    assert_eq!(texts, ["v=spf1 ip4:192.0.2.0/24 -all"]);
    // Over TCP, and split into 255-octet character-strings.
    let txt = resolver.txt_lookup("long.example.test.").await.unwrap();
    let record = txt.iter().next().unwrap();
    assert_eq!(record.txt_data().len(), 2);
    assert_eq!(record.to_string(), long);
}

#[tokio::test]
async fn second_name_server_answers_when_first_is_down() {
    let down = TestDns::start(TestZone::new());
    let down_addr = down.addr();
    down.stop();
    let up = TestDns::start(
        TestZone::new()
            .mx("failover.test", 10, "mx.failover.test")
            .a("mx.failover.test", v4("192.0.2.70")),
    );
    let resolver = MxResolver::with_timeout(
        Some(vec![down_addr, up.addr()]),
        false,
        Duration::from_secs(1),
        1,
    )
    .unwrap();
    let targets = resolver.resolve("failover.test").await.unwrap();
    assert_eq!(hosts(&targets), ["mx.failover.test"]);
    // Negative answers are not trusted from one server when several are
    // configured, but the last word still is NXDOMAIN.
    assert_eq!(
        resolver.resolve("nowhere.test").await.unwrap_err(),
        DnsError::NoSuchDomain
    );
}

#[tokio::test]
async fn names_are_normalised() {
    let dns = TestDns::start(
        TestZone::new()
            // "bücher.test" in A-labels (RFC 5890).
            .mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test")
            .a("mx.xn--bcher-kva.test", v4("192.0.2.80")),
    );
    let resolver = resolver(&dns, false);
    for domain in ["bücher.test", "XN--BCHER-KVA.TEST.", " xn--bcher-kva.test "] {
        let targets = resolver.resolve(domain).await.unwrap();
        assert_eq!(hosts(&targets), ["mx.xn--bcher-kva.test"], "{domain}");
    }
    for bad in ["", ".", "a..b"] {
        assert!(
            matches!(resolver.resolve(bad).await, Err(DnsError::InvalidDomain(_))),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn system_configuration_builds() {
    // Only builds the resolver from /etc/resolv.conf; a domain literal
    // needs no query, so no packet leaves the machine.
    match MxResolver::new(None, false) {
        Ok(resolver) => {
            let targets = resolver.resolve("[192.0.2.1]").await.unwrap();
            assert_eq!(targets[0].addrs, [IpAddr::V4(v4("192.0.2.1"))]);
        }
        Err(e) => assert!(matches!(e, DnsError::Config(_)), "{e:?}"),
    }
}

#[test]
fn error_classification() {
    assert!(!DnsError::Config("x".into()).is_permanent());
    assert!(DnsError::InvalidDomain("x".into()).is_permanent());
    assert_eq!(DnsError::NoAddresses.enhanced_code(), "4.4.4");
    assert!(MxResolver::new(Some(vec![]), false).is_err());
}

#[tokio::test]
async fn resolver_and_its_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let resolver = MxResolver::new(Some(vec!["127.0.0.1:9".parse().unwrap()]), false).unwrap();
    send_sync(&resolver);
    // Built, not polled: no query is sent.
    send(&resolver.resolve("example.test"));
}

#[tokio::test]
async fn smarthost_names_resolve_without_mx_and_keep_private_addresses() {
    let zone = TestZone::new()
        // The MX must be ignored: a smarthost is a host, not a mail domain.
        .mx("relay.test", 10, "elsewhere.test")
        .a("relay.test", v4("10.0.0.25"))
        .a("elsewhere.test", v4("192.0.2.9"));
    let dns = TestDns::start(zone);
    let strict = resolver(&dns, false);
    let target = strict.resolve_host("relay.test").await.unwrap();
    assert_eq!(target.host, "relay.test");
    assert_eq!(target.addrs, [IpAddr::V4(v4("10.0.0.25"))]);

    let literal = strict.resolve_host("[127.0.0.1]").await.unwrap();
    assert_eq!(literal.addrs, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let v6 = strict.resolve_host("::1").await.unwrap();
    assert_eq!(v6.addrs, [IpAddr::V6(Ipv6Addr::LOCALHOST)]);

    let missing = strict.resolve_host("missing.test").await.unwrap_err();
    assert!(!missing.is_permanent(), "{missing:?}");
}

#[tokio::test]
async fn blocklist_style_a_lookups() {
    let zone = TestZone::new()
        .a("2.0.0.127.bl.test", v4("127.0.0.2"))
        .servfail("3.0.0.127.bl.test");
    let dns = TestDns::start(zone);
    let r = resolver(&dns, false);
    assert_eq!(
        r.lookup_ipv4("2.0.0.127.bl.test").await.unwrap(),
        [v4("127.0.0.2")]
    );
    assert!(r.lookup_ipv4("1.0.0.127.bl.test").await.unwrap().is_empty());
    assert!(r.lookup_ipv4("3.0.0.127.bl.test").await.is_err());
}

#[tokio::test]
async fn ptr_lookups_tell_none_from_failure() {
    let v6: IpAddr = "2001:db8::25".parse().unwrap();
    let dns = TestDns::start(
        TestZone::new()
            .ptr(IpAddr::V4(v4("192.0.2.7")), "mail.example.test")
            .ptr(v6, "mail6.example.test")
            .aaaa("mail6.example.test", "2001:db8::25".parse().unwrap())
            .servfail_ptr(IpAddr::V4(v4("192.0.2.9")))
            .ptr(IpAddr::V4(v4("127.0.0.2")), "loop.example.test"),
    );
    let r = resolver(&dns, true);
    // Loopback reverse names are asked of the server, not answered "localhost" by hickory.
    assert_eq!(
        r.lookup_ptr(IpAddr::V4(v4("127.0.0.2"))).await.unwrap(),
        ["loop.example.test"]
    );
    assert!(r
        .lookup_ptr(IpAddr::V4(v4("127.0.0.3")))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        r.lookup_ptr(IpAddr::V4(v4("192.0.2.7"))).await.unwrap(),
        ["mail.example.test"]
    );
    assert_eq!(r.lookup_ptr(v6).await.unwrap(), ["mail6.example.test"]);
    assert!(r
        .lookup_ptr(IpAddr::V4(v4("192.0.2.8")))
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        r.lookup_ptr(IpAddr::V4(v4("192.0.2.9"))).await,
        Err(DnsError::Temporary(_))
    ));
    assert_eq!(
        r.lookup_ipv6("mail6.example.test").await.unwrap(),
        ["2001:db8::25".parse::<Ipv6Addr>().unwrap()]
    );
    assert!(r.lookup_ipv6("mail.example.test").await.unwrap().is_empty());
}
