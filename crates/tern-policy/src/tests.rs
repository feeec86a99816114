//! The actor against a real DNS server on loopback for the blocklist checks.

use std::net::Ipv4Addr;
use std::time::Duration;

use actix::Actor;
use tern_dns::testing::{TestDns, TestZone};

use super::*;

fn resolver(dns: &TestDns) -> Arc<MxResolver> {
    Arc::new(
        MxResolver::with_timeout(Some(vec![dns.addr()]), true, Duration::from_millis(500), 1)
            .unwrap(),
    )
}

fn refused(v: &Verdict) -> &PolicyReply {
    match v {
        Verdict::Refuse(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[actix_rt::test]
async fn dnsbl_listed_unlisted_and_failing_zones() {
    let zone = TestZone::new()
        .a("2.0.0.127.listed.test", Ipv4Addr::new(127, 0, 0, 2))
        // A zone whose server fails (SERVFAIL): treated as "not listed".
        .servfail("2.0.0.127.broken.test");
    let dns = TestDns::start(zone);
    let settings = PolicySettings {
        dnsbl_zones: vec![
            "broken.test".into(),
            "clean.test".into(),
            "listed.test".into(),
        ],
        dnsbl_timeout: Duration::from_secs(2),
        ..PolicySettings::default()
    };
    let addr = PolicyActor::new(settings, Some(resolver(&dns))).start();
    let v = addr
        .send(CheckConnect {
            ip: "127.0.0.2".parse().unwrap(),
            reverse_dns: true,
        })
        .await
        .unwrap();
    let r = refused(&v);
    assert_eq!((r.code, r.enhanced), (554, (5, 7, 1)));
    assert!(r.text.contains("listed.test"), "{}", r.text);
    let v = addr
        .send(CheckConnect {
            ip: "127.0.0.3".parse().unwrap(),
            reverse_dns: true,
        })
        .await
        .unwrap();
    assert_eq!(v, Verdict::Accept);
}

#[actix_rt::test]
async fn dnsbl_timeout_counts_as_not_listed() {
    // Nothing answers on this port: every query times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = MxResolver::with_timeout(
        Some(vec![silent.local_addr().unwrap()]),
        true,
        Duration::from_millis(200),
        1,
    )
    .unwrap();
    let settings = PolicySettings {
        dnsbl_zones: vec!["slow.test".into()],
        dnsbl_timeout: Duration::from_millis(300),
        ..PolicySettings::default()
    };
    let addr = PolicyActor::new(settings, Some(Arc::new(resolver))).start();
    let started = std::time::Instant::now();
    let v = addr
        .send(CheckConnect {
            ip: "127.0.0.2".parse().unwrap(),
            reverse_dns: true,
        })
        .await
        .unwrap();
    assert_eq!(v, Verdict::Accept);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn connection_rate_trips_and_recovers() {
    let settings = PolicySettings {
        connect_rate: Some(Rate {
            count: 2,
            per: Duration::from_millis(400),
        }),
        ..PolicySettings::default()
    };
    let local = PolicyActor::new(settings, None).local_checks();
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    assert_eq!(local.connect(ip), Verdict::Accept);
    assert_eq!(local.connect(ip), Verdict::Accept);
    let v = local.connect(ip);
    assert_eq!((refused(&v).code, refused(&v).enhanced), (421, (4, 7, 0)));
    // Another address is not affected.
    assert_eq!(local.connect("192.0.2.2".parse().unwrap()), Verdict::Accept);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(local.connect(ip), Verdict::Accept, "refilled");
}

#[actix_rt::test]
async fn sender_and_user_rates() {
    let rate = Rate {
        count: 1,
        per: Duration::from_secs(60),
    };
    let settings = PolicySettings {
        sender_rate: Some(rate),
        user_rate: Some(rate),
        ..PolicySettings::default()
    };
    let addr = PolicyActor::new(settings, None).start();
    let mail = |sender: &str, user: Option<&str>| CheckMail {
        ip: "192.0.2.1".parse().unwrap(),
        sender: sender.into(),
        auth_user: user.map(str::to_string),
    };
    assert_eq!(
        addr.send(mail("a@x.test", None)).await.unwrap(),
        Verdict::Accept
    );
    let v = addr.send(mail("A@X.test", None)).await.unwrap();
    assert_eq!((refused(&v).code, refused(&v).enhanced), (450, (4, 7, 1)));
    // The null sender is never limited by address.
    for _ in 0..3 {
        assert_eq!(addr.send(mail("", None)).await.unwrap(), Verdict::Accept);
    }
    assert_eq!(
        addr.send(mail("b@x.test", Some("joe"))).await.unwrap(),
        Verdict::Accept
    );
    let v = addr.send(mail("c@x.test", Some("joe"))).await.unwrap();
    assert!(refused(&v).text.contains("account"));
}

#[actix_rt::test]
async fn client_timeout_gives_the_default_verdict() {
    // A policy actor that never answers in time: its thread is blocked.
    struct Stuck;
    impl Actor for Stuck {
        type Context = actix::Context<Self>;
    }
    impl actix::Handler<CheckMail> for Stuck {
        type Result = ResponseFuture<Verdict>;
        fn handle(&mut self, _: CheckMail, _: &mut Self::Context) -> Self::Result {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Verdict::Accept
            })
        }
    }
    let stuck = Stuck.start();
    let client = PolicyClient {
        connect: None,
        mail: Some(stuck.recipient()),
        rcpt: None,
        spf: None,
        content: None,
        messages: None,
        rcpt_suppression: false,
        rcpt_rate: false,
        rcpt_greylist: false,
        local: None,
        timeout: Duration::from_millis(100),
    };
    let v = client
        .ask(
            &client.mail,
            CheckMail {
                ip: "192.0.2.1".parse().unwrap(),
                sender: "a@x.test".into(),
                auth_user: None,
            },
            Verdict::Refuse(PolicyReply::unavailable()),
        )
        .await;
    assert_eq!(refused(&v).code, 451);
}

#[actix_rt::test]
async fn reverse_dns_at_connect_and_only_where_asked() {
    let dns = TestDns::start(
        TestZone::new()
            .ptr("192.0.2.7".parse().unwrap(), "mail.example.test")
            .a("mail.example.test", Ipv4Addr::new(192, 0, 2, 7))
            .ptr("192.0.2.8".parse().unwrap(), "other.example.test")
            .a("other.example.test", Ipv4Addr::new(192, 0, 2, 99)),
    );
    let settings = PolicySettings {
        reverse_dns: ReverseDns::Confirmed,
        reverse_dns_timeout: Duration::from_secs(2),
        ..PolicySettings::default()
    };
    let addr = PolicyActor::new(settings, Some(resolver(&dns))).start();
    let connect = |ip: &str, reverse_dns: bool| CheckConnect {
        ip: ip.parse().unwrap(),
        reverse_dns,
    };
    assert_eq!(
        addr.send(connect("192.0.2.7", true)).await.unwrap(),
        Verdict::Accept
    );
    for ip in ["192.0.2.8", "192.0.2.9"] {
        let v = addr.send(connect(ip, true)).await.unwrap();
        assert_eq!((refused(&v).code, refused(&v).enhanced), (550, (5, 7, 25)));
    }
    // Not asked for (a submission listener): nothing is looked up.
    assert_eq!(
        addr.send(connect("192.0.2.9", false)).await.unwrap(),
        Verdict::Accept
    );
}

#[actix_rt::test]
async fn reverse_dns_timeout_is_a_temporary_refusal() {
    // Nothing answers on this port: the lookups outlast reverse_dns_timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = MxResolver::with_timeout(
        Some(vec![silent.local_addr().unwrap()]),
        true,
        Duration::from_secs(5),
        1,
    )
    .unwrap();
    let settings = PolicySettings {
        reverse_dns: ReverseDns::Exists,
        reverse_dns_timeout: Duration::from_millis(300),
        ..PolicySettings::default()
    };
    let addr = PolicyActor::new(settings, Some(Arc::new(resolver))).start();
    let started = std::time::Instant::now();
    let v = addr
        .send(CheckConnect {
            ip: "192.0.2.7".parse().unwrap(),
            reverse_dns: true,
        })
        .await
        .unwrap();
    assert_eq!((refused(&v).code, refused(&v).enhanced), (450, (4, 7, 25)));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[actix_rt::test]
async fn greylisting_refuses_a_strangers_new_triplet_and_skips_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let settings = PolicySettings {
        greylist: GreylistSettings {
            enabled: true,
            ..GreylistSettings::default()
        },
        ..PolicySettings::default()
    };
    let list = Greylist::open(dir.path(), settings.greylist).unwrap();
    let actor = PolicyActor::new(settings, None)
        .with_greylist(list.clone())
        .start();
    let rcpt = |client: Option<&str>| CheckRcpt {
        recipient: "Bob@Example.NET".into(),
        sender: "alice@client.test".into(),
        greylist_client: client.map(|c| c.parse().unwrap()),
    };
    for attempt in ["first", "immediate retry"] {
        let v = actor.send(rcpt(Some("192.0.2.7"))).await.unwrap();
        let r = refused(&v);
        assert_eq!((r.code, r.enhanced), (451, (4, 7, 1)), "{attempt}");
        assert!(r.text.starts_with("Greylisted, try again in "), "{r:?}");
        assert!(r.text.ends_with(" seconds"), "{r:?}");
    }
    // The same network, another address: the same triplet.
    let v = actor.send(rcpt(Some("192.0.2.8"))).await.unwrap();
    assert!(refused(&v).text.contains("try again in"));
    assert_eq!(list.len(), 1);
    // A session that does not ask (trusted or authenticated client) is never greylisted.
    assert_eq!(actor.send(rcpt(None)).await.unwrap(), Verdict::Accept);
}

/// The per-message checks through the actor, as a session on another node would ask them (a
/// local session runs the same `MessageChecks` in place).
#[actix_rt::test]
async fn the_actor_serves_spf_and_content_checks_for_remote_sessions() {
    let rules = Rules::parse(
        "[[rule]]\nname = \"SUBJECT_LOTTERY\"\nheader = \"Subject\"\npattern = \"(?i)lottery\"\nscore = 7\n",
    )
    .unwrap();
    let actor = PolicyActor::new(PolicySettings::default(), None)
        .with_content(ContentSettings {
            rules,
            reject_score: 10.0,
            quarantine_score: 6.0,
        })
        .start();
    let check = |subject: &str| CheckContent {
        ip: "192.0.2.7".parse().unwrap(),
        helo: "mail.client.test".into(),
        sender: "a@client.test".into(),
        spf: None,
        message: bytes::Bytes::from(format!(
            "From: a@client.test\r\nSubject: {subject}\r\n\r\nhi\r\n"
        )),
    };
    let held = actor.send(check("You won the LOTTERY")).await.unwrap();
    assert_eq!(held.verdict, Verdict::Accept);
    assert_eq!(
        held.hold.as_deref(),
        Some("content score 7.0 >= quarantine_score 6")
    );
    assert_eq!(held.headers, "X-Tern-Score: 7.0 (SUBJECT_LOTTERY=7)\r\n");
    let clean = actor.send(check("hello")).await.unwrap();
    assert_eq!((clean.verdict, clean.hold), (Verdict::Accept, None));
    // Without an authenticator there is no SPF to evaluate: accepted, nothing recorded.
    let spf = actor
        .send(CheckSpf {
            ip: "192.0.2.7".parse().unwrap(),
            helo: "mail.client.test".into(),
            sender: "a@client.test".into(),
        })
        .await
        .unwrap();
    assert_eq!(spf, SpfVerdict::accept());
}
