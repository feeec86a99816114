//! Delivery end to end: `tern serve` with delivery on, a real DNS server on loopback
//! (hickory-server, `tern_dns::testing`), and real receiving SMTP servers (the scripted sink,
//! Postfix's smtp-sink, a second Tern). Every message goes in over SMTP and comes out over SMTP.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mail_parser::{MessageParser, MimeHeaders};
use tern_dns::testing::{TestDns, TestZone};
use tern_tests::sink::{Received, Sink, SinkConfig};
use tern_tests::{queued_id, unique_token, TernServer, TernServerBuilder};

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A sink on `addr_ip` at a free port.
fn sink_on(addr_ip: &str, cfg: SinkConfig) -> Sink {
    Sink::start_on(SocketAddr::new(addr_ip.parse().unwrap(), 0), cfg).expect("bind sink")
}

/// A sink on `addr_ip` at exactly `port` (MX deliveries all use `delivery.port`).
fn sink_at(addr_ip: &str, port: u16, cfg: SinkConfig) -> Sink {
    Sink::start_on(SocketAddr::new(addr_ip.parse().unwrap(), port), cfg).expect("bind sink")
}

/// Sends one message over SMTP and returns its queue id.
fn submit(server: &TernServer, mail: &str, rcpts: &[&str], body: &str) -> String {
    let mut c = server.session();
    c.cmd(&format!("MAIL FROM:{mail}")).expect_code(250);
    for r in rcpts {
        c.cmd(&format!("RCPT TO:{r}")).expect_code(250);
    }
    c.cmd("DATA").expect_code(354);
    c.send(body.replace('\n', "\r\n"));
    c.send(b".\r\n");
    let id = queued_id(&c.read_reply());
    c.cmd("QUIT");
    id
}

/// One message from `a@client.test` to `rcpt`, with a fresh token; returns its queue id.
fn submit_one(server: &TernServer, rcpt: &str) -> String {
    submit(
        server,
        "<a@client.test>",
        &[&format!("<{rcpt}>")],
        &message("a@client.test", rcpt, &unique_token()),
    )
}

fn message(from: &str, to: &str, token: &str) -> String {
    format!(
        "From: <{from}>\nTo: <{to}>\nSubject: test {token}\nMessage-ID: <{token}@client.test>\n\nbody {token}\n"
    )
}

/// Submits `n` messages from a@client.test, one to each of r0@…r{n-1}@example.net; returns
/// their tokens (each message's body says `body <token>`).
fn submit_n(server: &TernServer, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let token = unique_token();
            submit(
                server,
                "<a@client.test>",
                &[&format!("<r{i}@example.net>")],
                &message("a@client.test", "r@example.net", &token),
            );
            token
        })
        .collect()
}

/// Submits one message from a@client.test to r0@…r{n-1}@example.net; returns its queue id and
/// its token (the body says `body <token>`).
fn submit_to_many(server: &TernServer, n: usize) -> (String, String) {
    let rcpts: Vec<String> = (0..n).map(|i| format!("<r{i}@example.net>")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let token = unique_token();
    let id = submit(
        server,
        "<a@client.test>",
        &refs,
        &message("a@client.test", "r0@example.net", &token),
    );
    (id, token)
}

/// The parsed `message/delivery-status` fields of a DSN: (per-message, per-recipient groups).
fn dsn_fields(raw: &[u8]) -> (String, Vec<HashMap<String, String>>) {
    let msg = MessageParser::default().parse(raw).expect("DSN parses");
    let ct = msg.content_type().expect("DSN has a content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let part = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.ctype() == "message" && c.subtype() == Some("delivery-status"))
        })
        .expect("a message/delivery-status part");
    let text = String::from_utf8_lossy(part.contents()).replace("\r\n", "\n");
    let mut groups = text.split("\n\n").filter(|g| !g.trim().is_empty());
    let per_message = groups.next().unwrap_or_default().to_string();
    let recipients = groups
        .map(|g| {
            // Unfold continuation lines (RFC 5322 §2.2.3) before splitting the fields.
            let unfolded = g.replace("\n ", " ").replace("\n\t", " ");
            unfolded
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect()
        })
        .collect();
    (per_message, recipients)
}

fn to_sink(server: TernServerBuilder, sink: &Sink) -> TernServerBuilder {
    server
        .set("delivery.enabled", true)
        .set("delivery.idle_timeout", "1s")
        .set_list("queue.retry_schedule", &["1s"])
        .route("*", Some(&sink.addr().to_string()), "none")
}

/// A Tern whose mail for `sender.test` goes to a `mailbox` sink (where DSNs land) and all other
/// mail to a `remote` sink scripted with `remote_cfg`; `tweak` adds settings.
fn with_mailbox(
    remote_cfg: SinkConfig,
    tweak: impl FnOnce(TernServerBuilder) -> TernServerBuilder,
) -> (Sink, Sink, TernServer) {
    let mailbox = Sink::start(SinkConfig::default());
    let remote = Sink::start(remote_cfg);
    let builder = tweak(TernServer::builder().set("delivery.enabled", true))
        .route("sender.test", Some(&mailbox.addr().to_string()), "none")
        .route("*", Some(&remote.addr().to_string()), "none");
    let server = builder.start();
    (mailbox, remote, server)
}

#[test]
fn smarthost_route_delivers_and_empties_the_queue() {
    let sink = Sink::start(SinkConfig::default());
    let server = to_sink(TernServer::builder(), &sink).start();
    let token = unique_token();
    let id = submit(
        &server,
        "<alice@client.test>",
        &["<bob@example.net>", "<carol@example.org>"],
        &message("alice@client.test", "bob@example.net", &token),
    );
    let got = sink.wait_for_messages(2, WAIT);
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["bob@example.net", "carol@example.org"]);
    for m in &got {
        assert_eq!(m.mail_from, "alice@client.test");
        let text = String::from_utf8_lossy(&m.data);
        assert!(text.contains(&format!("body {token}")), "{text}");
        assert!(
            text.starts_with("Received: "),
            "our Received header first: {text}"
        );
    }
    server.wait_queued(0, WAIT);
    let delivered = server.wait_event("delivered", "bob@example.net", WAIT);
    assert_eq!(delivered["queue_id"], id.as_str());
    assert_eq!(delivered["attempt"], 1);
    assert!(delivered["reply"].as_str().unwrap().starts_with("250"));
    assert_eq!(delivered["ip"], sink.addr().ip().to_string());
    assert!(server
        .delivery_log()
        .iter()
        .any(|e| e["event"] == "received" && e["queue_id"] == id.as_str()));
    let h = server.health();
    assert_eq!(h["delivered"], 2, "{h}");
}

#[test]
fn mail_to_the_bare_postmaster_goes_to_server_postmaster() {
    let sink = Sink::start(SinkConfig::default());
    let server = to_sink(TernServer::builder(), &sink)
        .set("server.postmaster", "ops@example.net")
        .start();
    submit(
        &server,
        "<a@client.test>",
        &["<Postmaster>", "<b@example.org>"],
        &message("a@client.test", "postmaster", &unique_token()),
    );
    let got = sink.wait_for_messages(2, WAIT);
    let mut rcpts: Vec<(String, Vec<String>)> = got
        .iter()
        .flat_map(|m| m.rcpts.iter().cloned().zip(m.rcpt_params.iter().cloned()))
        .collect();
    rcpts.sort();
    // The original recipient travels as ORCPT (the sink offers DSN), so a DSN names it.
    assert_eq!(
        rcpts,
        [
            ("b@example.org".to_string(), vec![]),
            (
                "ops@example.net".to_string(),
                vec!["ORCPT=rfc822;postmaster".to_string()]
            ),
        ]
    );
    server.wait_queued(0, WAIT);
}

#[test]
fn connection_reused_for_many_messages_to_one_destination() {
    let sink = Sink::start(SinkConfig::default());
    let server = to_sink(TernServer::builder(), &sink)
        .set("delivery.max_connections", 1)
        .start();
    submit_n(&server, 10);
    sink.wait_for_messages(10, WAIT);
    server.wait_queued(0, WAIT);
    assert!(
        sink.connections() < 10,
        "expected connection reuse, got {} connections for 10 messages",
        sink.connections()
    );
}

#[test]
fn mx_preference_order_and_fallback_to_the_next_mx() {
    // mx1 (preference 10) is down: nothing listens on 127.0.0.2 at the port; mx2 (20) answers;
    // mx3 (30) must not be used while mx2 works.
    let mx2 = sink_on("127.0.0.3", SinkConfig::default());
    let port = mx2.addr().port();
    let mx3 = sink_at("127.0.0.4", port, SinkConfig::default());
    let dns = TestDns::start(
        TestZone::new()
            .mx("example.net", 10, "mx1.example.net")
            .mx("example.net", 20, "mx2.example.net")
            .mx("example.net", 30, "mx3.example.net")
            .a("mx1.example.net", ip("127.0.0.2"))
            .a("mx2.example.net", ip("127.0.0.3"))
            .a("mx3.example.net", ip("127.0.0.4")),
    );
    let server = TernServer::builder().deliver(dns.addr(), port).start();
    submit_one(&server, "bob@example.net");
    let got = mx2.wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.net"]);
    let e = server.wait_event("delivered", "bob@example.net", WAIT);
    assert_eq!(e["mx"], "mx2.example.net");
    assert_eq!(mx3.messages().len(), 0);
}

#[test]
fn implicit_mx_uses_the_domains_own_address() {
    let sink = sink_on("127.0.0.5", SinkConfig::default());
    let dns = TestDns::start(TestZone::new().a("implicit.test", ip("127.0.0.5")));
    let server = TernServer::builder()
        .deliver(dns.addr(), sink.addr().port())
        .start();
    submit_one(&server, "x@implicit.test");
    assert_eq!(
        sink.wait_for_messages(1, WAIT)[0].rcpts,
        ["x@implicit.test"]
    );
}

#[test]
fn each_job_looks_its_domain_up_once() {
    // TTL 0: no resolver caches the answers, so the server counts every lookup made. The
    // dispatcher's lookup (which finds the job's site) is the one the connection uses.
    let sink = sink_on("127.0.0.29", SinkConfig::default());
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            .mx("once.test", 10, "mx.once.test")
            .a("mx.once.test", ip("127.0.0.29")),
    );
    let server = TernServer::builder()
        .deliver(dns.addr(), sink.addr().port())
        .start();
    submit_one(&server, "x@once.test");
    assert_eq!(sink.wait_for_messages(1, WAIT)[0].rcpts, ["x@once.test"]);
    server.wait_queued(0, WAIT);
    assert_eq!(dns.queries("once.test", "MX"), 1, "MX lookups for one job");
}

#[test]
fn an_mx_answer_older_than_mx_max_age_is_looked_up_again() {
    // TTL 0, so the DNS server counts every lookup. One message per connection at 2 per
    // second: the 2nd and 3rd jobs wait about 0.5 s and 1 s in their destination's queue,
    // longer than mx_max_age, so each is looked up again before its connection. With the
    // default age, a job costs one lookup (each_job_looks_its_domain_up_once).
    let sink = sink_on("127.0.0.31", SinkConfig::default());
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            .mx("stale.test", 10, "mx.stale.test")
            .a("mx.stale.test", ip("127.0.0.31")),
    );
    let server = TernServer::builder()
        .deliver(dns.addr(), sink.addr().port())
        .set("delivery.max_message_rate", "2/s")
        .set("delivery.max_messages_per_connection", 1)
        .set("delivery.mx_max_age", "200ms")
        .start();
    for i in 0..3 {
        submit_one(&server, &format!("r{i}@stale.test"));
    }
    sink.wait_for_messages(3, WAIT);
    server.wait_queued(0, WAIT);
    let lookups = dns.queries("stale.test", "MX");
    // 3 by the dispatcher, one per job; at least the two throttled jobs again (the first
    // too if the machine was slow to connect for it).
    assert!(
        (5..=6).contains(&lookups),
        "{lookups} MX lookups for 3 jobs, 2 of them throttled past mx_max_age"
    );
}

/// DNS for a sender domain whose mail lands in `mailbox` (to collect DSNs) plus `extra`.
fn zone_with_sender_mailbox(mailbox: &Sink, extra: TestZone) -> TestZone {
    let ip = match mailbox.addr().ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("v4 sink expected"),
    };
    extra
        .mx("sender.test", 10, "mx.sender.test")
        .a("mx.sender.test", ip)
}

#[test]
fn null_mx_fails_at_once_and_the_sender_gets_a_5_1_10_dsn() {
    let mailbox = sink_on("127.0.0.6", SinkConfig::default());
    let dns = TestDns::start(zone_with_sender_mailbox(
        &mailbox,
        TestZone::new().null_mx("nomail.test"),
    ));
    let server = TernServer::builder()
        .deliver(dns.addr(), mailbox.addr().port())
        .start();
    let id = submit(
        &server,
        "<alice@sender.test>",
        &["<x@nomail.test>"],
        &message("alice@sender.test", "x@nomail.test", &unique_token()),
    );
    let dsn = mailbox.wait_for_messages(1, WAIT);
    assert_eq!(dsn[0].mail_from, "", "DSNs come from the null sender");
    assert_eq!(dsn[0].rcpts, ["alice@sender.test"]);
    let (per_message, rcpts) = dsn_fields(&dsn[0].data);
    assert!(
        per_message.contains("Reporting-MTA: dns;tern.test"),
        "{per_message}"
    );
    assert_eq!(rcpts.len(), 1);
    assert_eq!(rcpts[0]["action"], "failed");
    assert_eq!(rcpts[0]["status"], "5.1.10");
    assert!(rcpts[0]["final-recipient"].ends_with("x@nomail.test"));
    let failed = server.wait_event("failed", "x@nomail.test", WAIT);
    assert_eq!(failed["queue_id"], id.as_str());
    assert_eq!(failed["attempt"], 1);
    server.wait_queued(0, WAIT);
}

#[test]
fn nxdomain_fails_with_5_1_2_and_servfail_is_retried() {
    let mailbox = sink_on("127.0.0.7", SinkConfig::default());
    let dns = TestDns::start(zone_with_sender_mailbox(
        &mailbox,
        TestZone::new().servfail("broken.test"),
    ));
    let server = TernServer::builder()
        .deliver(dns.addr(), mailbox.addr().port())
        .start();
    submit(
        &server,
        "<alice@sender.test>",
        &["<x@missing.test>", "<y@broken.test>"],
        &message("alice@sender.test", "x@missing.test", &unique_token()),
    );
    let dsn = mailbox.wait_for_messages(1, WAIT);
    let (_, rcpts) = dsn_fields(&dsn[0].data);
    assert_eq!(
        rcpts.len(),
        1,
        "only the NXDOMAIN recipient is final: {rcpts:?}"
    );
    assert_eq!(rcpts[0]["status"], "5.1.2");
    let deferred = server.wait_event("deferred", "y@broken.test", WAIT);
    assert!(
        deferred["reply"].as_str().unwrap().starts_with("4.4.3"),
        "{deferred}"
    );
    // Retried on the schedule (1 s in tests), still temporary.
    let deadline = Instant::now() + WAIT;
    while !server
        .delivery_log()
        .iter()
        .any(|e| e["event"] == "deferred" && e["recipient"] == "y@broken.test" && e["attempt"] == 2)
    {
        assert!(
            Instant::now() < deadline,
            "no second attempt for y@broken.test"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.queued(), 1);
}

#[test]
fn temporary_failure_then_success_on_retry() {
    let sink = Sink::start(SinkConfig {
        rcpt_replies: vec![(
            "later@example.net".into(),
            vec!["451 4.3.0 try again later".into(), "250 2.1.5 ok".into()],
        )],
        ..SinkConfig::default()
    });
    let server = to_sink(TernServer::builder(), &sink).start();
    submit_one(&server, "later@example.net");
    let deferred = server.wait_event("deferred", "later@example.net", WAIT);
    assert_eq!(deferred["attempt"], 1);
    assert!(deferred["reply"].as_str().unwrap().starts_with("451"));
    let delivered = server.wait_event("delivered", "later@example.net", WAIT);
    assert_eq!(delivered["attempt"], 2);
    assert_eq!(sink.messages().len(), 1);
    server.wait_queued(0, WAIT);
}

#[test]
fn permanent_refusal_bounces_with_status_and_diagnostic_code() {
    let token = unique_token();
    let (mailbox, remote, server) = with_mailbox(
        SinkConfig {
            rcpt_replies: vec![(
                "nobody@example.net".into(),
                vec!["550 5.1.1 no such user here".into()],
            )],
            ..SinkConfig::default()
        },
        |b| b,
    );
    submit(
        &server,
        "<alice@sender.test> RET=HDRS ENVID=env-42",
        &[
            "<nobody@example.net> ORCPT=rfc822;nobody@example.net",
            "<bob@example.net>",
        ],
        &message("alice@sender.test", "nobody@example.net", &token),
    );
    let delivered = remote.wait_for_messages(1, WAIT);
    assert_eq!(delivered[0].rcpts, ["bob@example.net"]);
    let dsn = mailbox.wait_for_messages(1, WAIT);
    assert_eq!(dsn[0].mail_from, "");
    let (per_message, rcpts) = dsn_fields(&dsn[0].data);
    assert!(
        per_message.contains("Original-Envelope-Id: env-42"),
        "{per_message}"
    );
    assert_eq!(
        rcpts.len(),
        1,
        "one report for the refused recipient: {rcpts:?}"
    );
    let r = &rcpts[0];
    assert_eq!(r["action"], "failed");
    assert_eq!(r["status"], "5.1.1");
    assert!(
        r["diagnostic-code"].starts_with("smtp;550 5.1.1 no such user here"),
        "{r:?}"
    );
    assert!(
        r["original-recipient"].contains("nobody@example.net"),
        "{r:?}"
    );
    assert!(r["remote-mta"].contains("127.0.0.1"), "{r:?}");
    // RET=HDRS: the original's headers come back, not its body.
    let text = String::from_utf8_lossy(&dsn[0].data);
    assert!(text.contains(&format!("Subject: test {token}")));
    assert!(!text.contains(&format!("body {token}")));
    server.wait_queued(0, WAIT);
    let events = server.delivery_log_when(
        "a bounce-sent line and the DSN's received line",
        |log| {
            log.iter().any(|e| e["event"] == "bounce-sent")
                && log.iter().filter(|e| e["event"] == "received").count() >= 2
        },
        WAIT,
    );
    assert!(events.iter().any(|e| e["event"] == "bounce-sent"));
    // A second "received" line for the DSN would come at once with the first.
    std::thread::sleep(Duration::from_millis(200));
    let events = server.delivery_log();
    // One "received" line per spooled message, the DSN (from <>) included.
    let received: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "received")
        .filter_map(|e| e["queue_id"].as_str())
        .collect();
    let unique: std::collections::HashSet<&&str> = received.iter().collect();
    assert_eq!(received.len(), 2, "the message and its DSN: {received:?}");
    assert_eq!(unique.len(), 2, "{received:?}");
}

#[test]
fn notify_success_gets_a_relayed_dsn_from_a_server_without_dsn() {
    let (mailbox, remote, server) = with_mailbox(
        SinkConfig {
            ehlo_keywords: vec!["PIPELINING".into(), "8BITMIME".into()],
            ..SinkConfig::default()
        },
        |b| b,
    );
    submit(
        &server,
        "<alice@sender.test>",
        &[
            "<bob@example.net> NOTIFY=SUCCESS,FAILURE",
            "<carol@example.net>",
        ],
        &message("alice@sender.test", "bob@example.net", &unique_token()),
    );
    remote.wait_for_messages(1, WAIT);
    let dsn = mailbox.wait_for_messages(1, WAIT);
    let (_, rcpts) = dsn_fields(&dsn[0].data);
    assert_eq!(rcpts.len(), 1, "only bob asked for success: {rcpts:?}");
    assert_eq!(rcpts[0]["action"], "relayed");
    assert_eq!(rcpts[0]["status"], "2.0.0");
    assert!(rcpts[0]["final-recipient"].ends_with("bob@example.net"));
}

#[test]
fn expiry_bounces_with_4_4_7() {
    let (mailbox, _remote, server) = with_mailbox(
        SinkConfig {
            rcpt_replies: vec![(
                "slow@example.net".into(),
                vec!["451 4.2.0 mailbox busy".into()],
            )],
            ..SinkConfig::default()
        },
        |b| {
            b.set_list("queue.retry_schedule", &["500ms"])
                .set("queue.max_lifetime", "2s")
                .set("queue.delay_warning", "0s")
        },
    );
    submit(
        &server,
        "<alice@sender.test>",
        &["<slow@example.net>"],
        &message("alice@sender.test", "slow@example.net", &unique_token()),
    );
    let dsn = mailbox.wait_for_messages(1, WAIT);
    let (_, rcpts) = dsn_fields(&dsn[0].data);
    assert_eq!(rcpts[0]["action"], "failed");
    assert_eq!(rcpts[0]["status"], "4.4.7");
    assert!(
        rcpts[0]["diagnostic-code"].contains("451 4.2.0 mailbox busy"),
        "{rcpts:?}"
    );
    let expired = server.wait_event("expired", "slow@example.net", WAIT);
    assert!(expired["attempt"].as_u64().unwrap() >= 2, "{expired}");
    server.wait_queued(0, WAIT);
}

#[test]
fn delay_warning_is_sent_once() {
    let (mailbox, _remote, server) = with_mailbox(
        SinkConfig {
            rcpt_replies: vec![("slow@example.net".into(), vec!["451 4.2.0 busy".into()])],
            ..SinkConfig::default()
        },
        |b| {
            b.set_list("queue.retry_schedule", &["300ms"])
                .set("queue.delay_warning", "1s")
        },
    );
    submit(
        &server,
        "<alice@sender.test>",
        &["<slow@example.net>"],
        &message("alice@sender.test", "slow@example.net", &unique_token()),
    );
    let dsn = mailbox.wait_for_messages(1, WAIT);
    let (_, rcpts) = dsn_fields(&dsn[0].data);
    assert_eq!(rcpts[0]["action"], "delayed");
    assert_eq!(rcpts[0]["status"], "4.2.0");
    assert!(rcpts[0].contains_key("will-retry-until"), "{rcpts:?}");
    // More attempts fail, no second warning.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(mailbox.messages().len(), 1);
}

#[test]
fn no_bounce_to_the_null_sender() {
    let remote = Sink::start(SinkConfig {
        rcpt_replies: vec![(
            "nobody@example.net".into(),
            vec!["550 5.1.1 unknown".into()],
        )],
        ..SinkConfig::default()
    });
    let server = to_sink(TernServer::builder(), &remote).start();
    submit(
        &server,
        "<>",
        &["<nobody@example.net>"],
        &message(
            "mailer-daemon@client.test",
            "nobody@example.net",
            &unique_token(),
        ),
    );
    server.wait_event("failed", "nobody@example.net", WAIT);
    server.wait_queued(0, WAIT);
    // The refused transaction ends with the QUIT after the idle timeout (1 s here).
    remote.wait_for_transactions(1, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    // Nothing else was sent: no DSN went anywhere (the `*` route would have taken it here).
    assert_eq!(
        remote.transactions().len(),
        1,
        "{:?}",
        remote.transactions().len()
    );
    assert!(!server
        .delivery_log()
        .iter()
        .any(|e| e["event"] == "bounce-sent"));
}

#[test]
fn tls_required_to_a_server_without_starttls_defers_instead_of_plaintext() {
    let sink = Sink::start(SinkConfig::default());
    let server = TernServer::builder()
        .set("delivery.enabled", true)
        .route("*", Some(&sink.addr().to_string()), "required")
        .start();
    submit_one(&server, "b@example.net");
    let e = server.wait_event("deferred", "b@example.net", WAIT);
    assert!(e["reply"].as_str().unwrap().starts_with("4.7.4"), "{e}");
    assert_eq!(sink.messages().len(), 0, "nothing may go in plaintext");
}

#[test]
fn greeting_421_moves_on_to_the_next_mx() {
    let busy = sink_on(
        "127.0.0.8",
        SinkConfig {
            greeting: "421 4.3.2 too busy".into(),
            ..SinkConfig::default()
        },
    );
    let port = busy.addr().port();
    let good = sink_at("127.0.0.9", port, SinkConfig::default());
    let dns = TestDns::start(
        TestZone::new()
            .mx("busy.test", 10, "mx1.busy.test")
            .mx("busy.test", 20, "mx2.busy.test")
            .a("mx1.busy.test", ip("127.0.0.8"))
            .a("mx2.busy.test", ip("127.0.0.9")),
    );
    let server = TernServer::builder().deliver(dns.addr(), port).start();
    submit_one(&server, "b@busy.test");
    good.wait_for_messages(1, WAIT);
    assert!(busy.connections() >= 1);
}

#[test]
fn a_second_tern_receives_relayed_mail() {
    let receiver = TernServer::builder()
        .relay_domains(&["example.net"])
        .start();
    let sender = TernServer::builder()
        .set("delivery.enabled", true)
        .route("*", Some(&receiver.smtp.to_string()), "opportunistic")
        .start();
    let token = unique_token();
    submit(
        &sender,
        "<a@client.test>",
        &["<b@example.net>"],
        &message("a@client.test", "b@example.net", &token),
    );
    let e = sender.wait_event("delivered", "b@example.net", WAIT);
    // Opportunistic TLS with the receiver's self-signed certificate.
    assert!(
        e["tls"].as_str().is_some_and(|t| t.starts_with("TLS")),
        "{e}"
    );
    sender.wait_queued(0, WAIT);
    assert_eq!(receiver.queued(), 1);
}

#[test]
fn sigkill_during_delivery_loses_nothing() {
    let sink = Sink::start(SinkConfig {
        data_delay: Duration::from_millis(200),
        ..SinkConfig::default()
    });
    let mut server = to_sink(TernServer::builder(), &sink)
        .set("delivery.max_connections", 2)
        .start();
    let tokens = submit_n(&server, 20);
    // Some are delivered, the rest queued or in flight.
    sink.wait_for_messages(2, WAIT);
    server.kill();
    let before = sink.messages().len();
    assert!(before < tokens.len(), "killed too late to test anything");
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(40);
    let delivered_tokens = |got: &[Received]| -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for m in got {
            let text = String::from_utf8_lossy(&m.data);
            for t in &tokens {
                if text.contains(&format!("body {t}")) {
                    *seen.entry(t.clone()).or_insert(0) += 1;
                }
            }
        }
        seen
    };
    loop {
        let seen = delivered_tokens(&sink.messages());
        if seen.len() == tokens.len() {
            let duplicates: usize = seen.values().map(|n| n - 1).sum();
            eprintln!("killed after {before} deliveries; duplicates after restart: {duplicates}");
            // Only what was delivered (or being delivered) before the kill can repeat: the
            // removal of a delivered message is durable with the next group commit.
            assert!(
                duplicates <= before + 2,
                "{duplicates} duplicates, but only {before} deliveries before the kill"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} messages delivered after restart",
            seen.len(),
            tokens.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    server.wait_queued(0, WAIT);
}

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// Postfix's smtp-sink on a free loopback port, dumping what it receives into `dump`.
struct PostfixSink {
    child: std::process::Child,
    addr: SocketAddr,
    dump: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn postfix_sink() -> Option<PostfixSink> {
    if !std::path::Path::new(SMTP_SINK).exists() {
        // scripts/test.sh installs postfix; under CI a missing peer is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "{SMTP_SINK} is not installed (scripts/test.sh installs postfix); CI requires it"
        );
        eprintln!("SKIPPED: {SMTP_SINK} not installed (apt-get install postfix)");
        return None;
    }
    use std::os::unix::fs::PermissionsExt;
    let port = tern_tests::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // smtp-sink drops privileges to `nobody` when run as root: the dump must be writable.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let dump = dir.path().join("dump");
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = std::process::Command::new(SMTP_SINK);
    if root {
        cmd.args(["-u", "nobody"]);
    }
    cmd.arg("-D")
        .arg(&dump)
        .arg(addr.to_string())
        .arg("100")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let sink = PostfixSink {
        child: cmd.spawn().expect("start smtp-sink"),
        addr,
        dump,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "smtp-sink did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(sink)
}

#[test]
fn postfix_smtp_sink_receives_relayed_mail() {
    let Some(sink) = postfix_sink() else {
        return;
    };
    let server = TernServer::builder()
        .set("delivery.enabled", true)
        .route("*", Some(&sink.addr.to_string()), "none")
        .start();
    let tokens = submit_n(&server, 3);
    server.wait_queued(0, WAIT);
    let delivered_lines =
        |log: &[serde_json::Value]| log.iter().filter(|e| e["event"] == "delivered").count();
    let log = server.delivery_log_when("3 delivered lines", |l| delivered_lines(l) >= 3, WAIT);
    assert_eq!(delivered_lines(&log), 3);
    let dump = std::fs::read_to_string(&sink.dump).unwrap_or_default();
    for t in &tokens {
        assert!(
            dump.contains(&format!("body {t}")),
            "{t} not in smtp-sink's dump:\n{dump}"
        );
    }
}

#[test]
fn smtputf8_mail_to_a_server_without_smtputf8_fails_with_5_6_7() {
    let remote = Sink::start(SinkConfig {
        ehlo_keywords: vec!["PIPELINING".into(), "8BITMIME".into()],
        ..SinkConfig::default()
    });
    let server = to_sink(TernServer::builder(), &remote).start();
    submit(
        &server,
        "<jörg@client.test> SMTPUTF8",
        &["<b@example.net>"],
        &message("jörg@client.test", "b@example.net", &unique_token()),
    );
    let e = server.wait_event("failed", "b@example.net", WAIT);
    assert!(e["reply"].as_str().unwrap().contains("5.6.7"), "{e}");
    assert_eq!(remote.messages().len(), 0);
}

#[test]
fn max_message_rate_spaces_deliveries_to_a_destination() {
    let sink = Sink::start(SinkConfig::default());
    let server = TernServer::builder()
        .set("delivery.enabled", true)
        .set("delivery.max_message_rate", "4/s")
        .route("*", Some(&sink.addr().to_string()), "none")
        .start();
    submit_n(&server, 6);
    server.wait_queued(0, WAIT);
    let log = server.delivery_log_when(
        "6 delivered lines",
        |l| l.iter().filter(|e| e["event"] == "delivered").count() >= 6,
        WAIT,
    );
    let mut starts: Vec<u64> = log
        .iter()
        .filter(|e| e["event"] == "delivered")
        .map(|e| e["ts_ms"].as_u64().unwrap() - e["latency_ms"].as_u64().unwrap())
        .collect();
    starts.sort();
    assert_eq!(starts.len(), 6);
    // 4 per second: the 6th start is at least 5 × 250 ms after the 1st (a lower bound only:
    // the machine may be slower, never faster).
    let span = starts[5] - starts[0];
    assert!(span >= 1200, "6 deliveries started within {span} ms at 4/s");
}

/// A server that accepts connections and never says anything; counts them.
fn silent_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(conn);
        }
    });
    (addr, count)
}

#[test]
fn an_unreachable_destination_answers_every_queued_job_at_once() {
    // One connection allowed; it hangs until the greeting times out (1 s). The messages queued
    // behind it meanwhile get the same answer without a connection attempt each.
    let (addr, connections) = silent_server();
    let server = TernServer::builder()
        .set("delivery.enabled", true)
        .set("delivery.max_connections", 1)
        .set("delivery.command_timeout", "1s")
        .set_list("queue.retry_schedule", &["1h"])
        .route("*", Some(&addr.to_string()), "none")
        .start();
    submit_n(&server, 5);
    let log = server.delivery_log_when(
        "5 deferred lines",
        |l| l.iter().filter(|e| e["event"] == "deferred").count() >= 5,
        WAIT,
    );
    let deferred: Vec<&serde_json::Value> =
        log.iter().filter(|e| e["event"] == "deferred").collect();
    assert_eq!(deferred.len(), 5, "{log:#?}");
    for e in &deferred {
        assert_eq!(e["attempt"], 1, "{e}");
        // The queued jobs' attempt began when the stage took them, not when the answer came.
        assert!(e["latency_ms"].as_u64().unwrap() > 0, "{e}");
        assert!(
            e["reply"]
                .as_str()
                .unwrap()
                .contains("timed out during greeting"),
            "{e}"
        );
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one connection attempt for the whole queue"
    );
    // Each waited for the 1 s greeting timeout; the last submitted the least.
    let waited: Vec<u64> = deferred
        .iter()
        .map(|e| e["latency_ms"].as_u64().unwrap())
        .collect();
    assert!(
        waited.iter().filter(|&&ms| ms >= 500).count() >= 4,
        "latencies {waited:?}"
    );
}

#[test]
fn max_messages_per_connection_opens_a_new_connection() {
    let sink = Sink::start(SinkConfig::default());
    let server = to_sink(TernServer::builder(), &sink)
        .set("delivery.max_connections", 1)
        .set("delivery.max_messages_per_connection", 2)
        .start();
    submit_n(&server, 6);
    sink.wait_for_messages(6, WAIT);
    // Two messages per connection at most: at least three connections for six messages.
    assert!(
        sink.connections() >= 3,
        "{} connections for 6 messages with max_messages_per_connection = 2",
        sink.connections()
    );
}

#[test]
fn recipients_refused_with_452_too_many_go_in_the_next_transaction_at_once() {
    // The server takes three recipients per transaction: the 4th and 5th get
    // "452 4.5.3 too many recipients" the first time (RFC 5321 §4.5.3.1.10). They go in a second
    // transaction on the same connection, in the same attempt, not an hour later (the retry
    // schedule here is 1h). A 452 for insufficient storage (4.3.1) is an ordinary deferral.
    let too_many = "452 4.5.3 Error: too many recipients";
    let sink = Sink::start(SinkConfig {
        rcpt_replies: vec![
            (
                "r3@example.net".into(),
                vec![too_many.into(), "250 2.1.5 ok".into()],
            ),
            (
                "r4@example.net".into(),
                vec![too_many.into(), "250 2.1.5 ok".into()],
            ),
            (
                "full@example.net".into(),
                vec!["452 4.3.1 Insufficient system storage".into()],
            ),
        ],
        ..SinkConfig::default()
    });
    let mut server = to_sink(TernServer::builder(), &sink)
        .set_list("queue.retry_schedule", &["1h"])
        .start();
    submit_to_many(&server, 5);
    let got = sink.wait_for_messages(2, WAIT);
    let sets: Vec<Vec<String>> = got.iter().map(|m| m.rcpts.clone()).collect();
    assert_eq!(
        sets,
        [
            vec!["r0@example.net", "r1@example.net", "r2@example.net"],
            vec!["r3@example.net", "r4@example.net"]
        ]
    );
    assert_eq!(sink.connections(), 1);
    server.wait_queued(0, WAIT);
    for r in ["r3@example.net", "r4@example.net"] {
        assert_eq!(server.wait_event("delivered", r, WAIT)["attempt"], 1, "{r}");
    }

    // Insufficient storage: deferred to the next attempt, no second transaction.
    let token = unique_token();
    submit(
        &server,
        "<a@client.test>",
        &["<full@example.net>", "<r0@example.net>"],
        &message("a@client.test", "r0@example.net", &token),
    );
    let deferred = server.wait_event("deferred", "full@example.net", WAIT);
    assert!(
        deferred["reply"].as_str().unwrap_or("").contains("4.3.1"),
        "{deferred}"
    );
    let got = sink.wait_for_messages(3, WAIT);
    assert_eq!(got[2].rcpts, ["r0@example.net"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.messages().len(), 3, "no extra transaction for a 4.3.1");
    // A refused retry would not show as a message: count the transactions that tried it.
    let tried_full = sink
        .transactions()
        .iter()
        .filter(|t| t.rcpts.iter().any(|r| r.address == "full@example.net"))
        .count();
    assert_eq!(tried_full, 1, "full@ tried once, then deferred");
    server.stop();
}

#[test]
fn recipients_over_the_limit_go_in_transactions_of_50_on_one_connection() {
    let sink = Sink::start(SinkConfig::default());
    let mut server = to_sink(TernServer::builder(), &sink).start();
    let (id, token) = submit_to_many(&server, 120);
    let got = sink.wait_for_messages(3, WAIT);
    server.wait_queued(0, WAIT);
    let sizes: Vec<usize> = got.iter().map(|m| m.rcpts.len()).collect();
    assert_eq!(sizes, [50, 50, 20]);
    let delivered: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    let expected: Vec<String> = (0..120).map(|i| format!("r{i}@example.net")).collect();
    assert_eq!(delivered, expected, "each recipient exactly once, in order");
    for m in &got {
        assert_eq!(m.mail_from, "a@client.test");
        assert!(m.text().contains(&format!("body {token}")), "{}", m.text());
    }
    // Three transactions, one connection, RSET between them.
    assert_eq!(sink.transactions().len(), 3);
    assert_eq!(sink.connections(), 1);
    let verbs: Vec<String> = sink.commands().into_iter().map(|c| c.verb).collect();
    assert_eq!(
        verbs.iter().filter(|v| *v == "MAIL").count(),
        3,
        "{verbs:?}"
    );
    assert_eq!(
        verbs.iter().filter(|v| *v == "RSET").count(),
        2,
        "{verbs:?}"
    );
    let log = server.delivery_log_when(
        "120 delivered lines",
        |l| l.iter().filter(|e| e["event"] == "delivered").count() >= 120,
        WAIT,
    );
    assert!(log
        .iter()
        .filter(|e| e["event"] == "delivered")
        .all(|e| e["queue_id"] == id.as_str()));
    server.stop();
    assert!(
        server.spool_list().is_empty(),
        "the message is removed once all 120 are delivered"
    );
}

#[test]
fn a_refused_transaction_defers_only_its_own_recipients() {
    // The second of three transactions gets 451 to MAIL: its 50 recipients are deferred and
    // retried; the other 70 are delivered at once and not sent again.
    let sink = Sink::start(SinkConfig {
        mail_replies: vec![
            "250 2.1.0 ok".into(),
            "451 4.3.0 try later".into(),
            "250 2.1.0 ok".into(),
        ],
        ..SinkConfig::default()
    });
    let server = to_sink(TernServer::builder(), &sink).start();
    submit_to_many(&server, 120);
    let got = sink.wait_for_messages(3, WAIT);
    server.wait_queued(0, WAIT);
    let sizes: Vec<usize> = got.iter().map(|m| m.rcpts.len()).collect();
    assert_eq!(sizes, [50, 20, 50]);
    assert_eq!(got[2].rcpts, got_range(50..100));
    let log = server.delivery_log_when(
        "120 delivered lines",
        |l| l.iter().filter(|e| e["event"] == "delivered").count() >= 120,
        WAIT,
    );
    let deferred: Vec<&serde_json::Value> =
        log.iter().filter(|e| e["event"] == "deferred").collect();
    assert_eq!(deferred.len(), 50, "{deferred:#?}");
    assert!(deferred
        .iter()
        .all(|e| e["reply"].as_str().unwrap().contains("451 4.3.0")));
    let retried: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e["event"] == "delivered" && e["attempt"] == 2)
        .collect();
    assert_eq!(retried.len(), 50, "only the deferred 50 are tried again");
}

fn got_range(r: std::ops::Range<usize>) -> Vec<String> {
    r.map(|i| format!("r{i}@example.net")).collect()
}

#[test]
fn a_route_sets_its_own_max_recipients_per_transaction() {
    let sink = Sink::start(SinkConfig::default());
    let server = to_sink(TernServer::builder(), &sink)
        .route_set("max_recipients_per_transaction", 2)
        .start();
    submit_to_many(&server, 5);
    let got = sink.wait_for_messages(3, WAIT);
    server.wait_queued(0, WAIT);
    let sizes: Vec<usize> = got.iter().map(|m| m.rcpts.len()).collect();
    assert_eq!(sizes, [2, 2, 1]);
}

#[test]
fn at_most_five_addresses_are_tried_then_the_recipient_is_deferred() {
    // Three MX hosts with seven addresses between them, each a server that refuses with a 421
    // greeting (and counts the connection). Only the first five addresses in MX preference
    // order are tried (Postfix's smtp_mx_address_limit): all of mx1's, two of mx2's, none of
    // mx3's.
    let busy = SinkConfig {
        greeting: "421 4.3.2 busy".into(),
        ..SinkConfig::default()
    };
    let first = sink_on("127.0.0.20", busy.clone());
    let port = first.addr().port();
    let mut sinks = vec![first];
    for i in 21..=26 {
        sinks.push(sink_at(&format!("127.0.0.{i}"), port, busy.clone()));
    }
    let dns = TestDns::start(
        TestZone::new()
            .mx("many.test", 10, "mx1.many.test")
            .mx("many.test", 20, "mx2.many.test")
            .mx("many.test", 30, "mx3.many.test")
            .a("mx1.many.test", ip("127.0.0.20"))
            .a("mx1.many.test", ip("127.0.0.21"))
            .a("mx1.many.test", ip("127.0.0.22"))
            .a("mx2.many.test", ip("127.0.0.23"))
            .a("mx2.many.test", ip("127.0.0.24"))
            .a("mx2.many.test", ip("127.0.0.25"))
            .a("mx3.many.test", ip("127.0.0.26")),
    );
    let server = TernServer::builder()
        .deliver(dns.addr(), port)
        .set_list("queue.retry_schedule", &["1h"])
        .start();
    submit_one(&server, "x@many.test");
    let e = server.wait_event("deferred", "x@many.test", WAIT);
    let reply = e["reply"].as_str().unwrap();
    assert!(
        reply.contains("421 4.3.2 busy") && reply.contains("mx2.many.test"),
        "{e}"
    );
    let counts: Vec<usize> = sinks.iter().map(Sink::connections).collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        5,
        "connections per address: {counts:?}"
    );
    assert_eq!(counts[..3], [1, 1, 1], "every mx1 address: {counts:?}");
    assert_eq!(
        counts[3..6].iter().sum::<usize>(),
        2,
        "two of mx2's: {counts:?}"
    );
    assert_eq!(counts[6], 0, "mx3 is past the cap: {counts:?}");
}

#[test]
fn an_idle_connection_is_closed_with_quit_after_idle_timeout() {
    let sink = Sink::start(SinkConfig::default());
    let server = to_sink(TernServer::builder(), &sink)
        .set("delivery.idle_timeout", "2s")
        .start();
    submit_n(&server, 1);
    sink.wait_for_messages(1, WAIT);
    let deadline = Instant::now() + WAIT;
    while sink.closed_at(1).is_none() {
        assert!(
            Instant::now() < deadline,
            "connection still open: {:?}",
            sink.commands()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let commands = sink.commands();
    let data = commands
        .iter()
        .rfind(|c| c.verb == "DATA")
        .expect("DATA was sent");
    let last = commands.last().unwrap();
    assert_eq!(
        last.verb, "QUIT",
        "the connection ends with QUIT: {commands:?}"
    );
    let idle = last.at - data.at;
    // A lower bound only: the wait starts after the reply to the content, after DATA.
    assert!(
        idle >= Duration::from_millis(1950),
        "QUIT {idle:?} after the last transaction, idle_timeout is 2s"
    );
    assert!(sink.closed_at(1).unwrap() >= last.at);
    assert_eq!(sink.connections(), 1);
}

/// How many lines of the server's log say `text` about `dest`.
fn log_lines(server: &TernServer, text: &str, dest: &str) -> usize {
    server
        .stderr()
        .lines()
        .filter(|l| l.contains(text) && l.contains(dest))
        .count()
}

#[test]
fn an_idle_destination_is_retired_and_created_again_for_new_mail() {
    let sink = Sink::start(SinkConfig::default());
    let dns = TestDns::start(
        TestZone::new()
            .mx("retire.test", 10, "mx.retire.test")
            .a("mx.retire.test", ip("127.0.0.1")),
    );
    let server = TernServer::builder()
        .deliver(dns.addr(), sink.addr().port())
        .start();
    let retired = |n: usize| {
        let deadline = Instant::now() + WAIT;
        while log_lines(&server, "idle destination retired", "retire.test") < n {
            assert!(
                Instant::now() < deadline,
                "retire.test not retired {n} time(s): {}",
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    submit_one(&server, "one@retire.test");
    sink.wait_for_messages(1, WAIT);
    retired(1);
    // Retired only once its connection was closed (after idle_timeout, 1 s).
    assert!(sink.closed_at(1).is_some());
    submit_one(&server, "two@retire.test");
    let got = sink.wait_for_messages(2, WAIT);
    assert_eq!(got[1].rcpts, ["two@retire.test"]);
    server.wait_event("delivered", "two@retire.test", WAIT);
    assert_eq!(
        sink.connections(),
        2,
        "a new destination opens a new connection"
    );
    retired(2);
}

#[test]
fn domains_with_the_same_mx_hosts_share_one_connection() {
    // a.test and b.test have the same two MX hosts (in a different preference order): one
    // site, one destination. With one connection per destination, their mail goes over a
    // single connection, one transaction per domain. c.test has MX hosts of its own and its
    // own connection.
    let site = sink_on("127.0.0.27", SinkConfig::default());
    let port = site.addr().port();
    let other = sink_at("127.0.0.28", port, SinkConfig::default());
    let dns = TestDns::start(
        TestZone::new()
            .mx("a.test", 10, "mx1.site.test")
            .mx("a.test", 20, "mx2.site.test")
            .mx("b.test", 10, "mx2.site.test")
            .mx("b.test", 20, "mx1.site.test")
            .a("mx1.site.test", ip("127.0.0.27"))
            .a("mx2.site.test", ip("127.0.0.27"))
            .mx("c.test", 10, "mx.other.test")
            .a("mx.other.test", ip("127.0.0.28")),
    );
    let server = TernServer::builder()
        .deliver(dns.addr(), port)
        .set("delivery.max_connections", 1)
        .start();
    submit(
        &server,
        "<s@client.test>",
        &["<x@a.test>", "<y@b.test>", "<z@c.test>"],
        &message("s@client.test", "x@a.test", &unique_token()),
    );
    let got = site.wait_for_messages(2, WAIT);
    let mut rcpts: Vec<Vec<String>> = got.iter().map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [["x@a.test"], ["y@b.test"]],
        "one transaction per domain"
    );
    assert_eq!(other.wait_for_messages(1, WAIT)[0].rcpts, ["z@c.test"]);
    server.wait_queued(0, WAIT);
    assert_eq!(
        site.connections(),
        1,
        "a.test and b.test share the connection"
    );
    assert_eq!(other.connections(), 1);
    for rcpt in ["x@a.test", "y@b.test"] {
        let e = server.wait_event("delivered", rcpt, WAIT);
        assert!(e["mx"].as_str().unwrap().ends_with(".site.test"), "{e}");
    }
}

#[test]
fn a_reused_connection_the_server_dropped_is_replaced_without_deferring() {
    // The sink answers every RSET with 421 and hangs up, as a server that closed an idle
    // connection would look. tern's RSET rides in the next transaction's pipelined group, so
    // it learns that only then: the transaction must go again on a new connection, at once,
    // with nothing deferred.
    let sink = Sink::start(SinkConfig {
        rset_closes: Some("421 4.4.2 idle too long".into()),
        ..SinkConfig::default()
    });
    let mut server = to_sink(TernServer::builder(), &sink).start();
    submit_to_many(&server, 120);
    let got = sink.wait_for_messages(3, WAIT);
    server.wait_queued(0, WAIT);
    let sizes: Vec<usize> = got.iter().map(|m| m.rcpts.len()).collect();
    assert_eq!(sizes, [50, 50, 20]);
    assert_eq!(sink.connections(), 3, "one new connection per dropped one");
    // Each dropped connection was one tern tried to reuse: an RSET ended it.
    let rsets: Vec<usize> = sink
        .commands()
        .iter()
        .filter(|c| c.verb == "RSET")
        .map(|c| c.connection)
        .collect();
    assert_eq!(rsets, [1, 2], "{rsets:?}");
    let log = server.delivery_log_when(
        "120 delivered lines",
        |l| l.iter().filter(|e| e["event"] == "delivered").count() >= 120,
        WAIT,
    );
    assert!(
        log.iter().all(|e| e["event"] != "deferred"),
        "nothing deferred: {:?}",
        log.iter().find(|e| e["event"] == "deferred")
    );
    assert!(log
        .iter()
        .filter(|e| e["event"] == "delivered")
        .all(|e| e["attempt"] == 1));
    server.stop();
}
