//! The validation stage end to end: `tern serve` with `[policy]` checks, clients connecting
//! from other loopback addresses (127.0.0.2, …) so they are strangers (`relay.networks` is
//! narrowed to 127.0.0.1), and a real DNS server on loopback for the blocklist.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tern_dns::testing::{TestDns, TestZone};
use tern_tests::{SmtpClient, TernServer, TernServerBuilder};

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Only 127.0.0.1 is trusted; mail for example.net is ours, so strangers can send.
fn strangers_welcome() -> TernServerBuilder {
    TernServer::builder()
        .relay_networks(&["127.0.0.1/32"])
        .relay_domains(&["example.net"])
}

#[test]
fn connection_rate_per_address_trips_with_421_and_recovers() {
    let server = strangers_welcome()
        .set("policy.connect_rate", "3/s")
        .start();
    for _ in 0..3 {
        let mut c = SmtpClient::connect_from(lo(2), server.smtp);
        c.read_reply().expect_code(220);
    }
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect("421", "4.7.0");
    c.expect_closed(Duration::from_secs(2));
    // Another address has its own allowance; a trusted one has no limit.
    SmtpClient::connect_from(lo(3), server.smtp)
        .read_reply()
        .expect_code(220);
    for _ in 0..5 {
        SmtpClient::connect_from(lo(1), server.smtp)
            .read_reply()
            .expect_code(220);
    }
    // The bucket refills: one connection per 1/3 s.
    std::thread::sleep(Duration::from_millis(700));
    SmtpClient::connect_from(lo(2), server.smtp)
        .read_reply()
        .expect_code(220);
}

#[test]
fn a_client_on_a_dns_blocklist_gets_554_naming_the_list() {
    let dns = TestDns::start(
        TestZone::new()
            .a("2.0.0.127.bl.test", Ipv4Addr::new(127, 0, 0, 2))
            .a("4.0.0.127.other.test", Ipv4Addr::new(127, 0, 0, 10)),
    );
    let server = strangers_welcome()
        .set_list("dns.nameservers", &[&dns.addr().to_string()])
        .set_list("policy.dnsbl_zones", &["other.test", "bl.test"])
        .start();
    let mut listed = SmtpClient::connect_from(lo(2), server.smtp);
    let reply = listed.read_reply();
    reply.expect("554", "5.7.1");
    assert!(reply.text().contains("bl.test"), "{reply}");
    assert!(reply.text().contains("127.0.0.2"), "{reply}");
    listed.expect_closed(Duration::from_secs(2));
    // Not listed anywhere.
    SmtpClient::connect_from(lo(3), server.smtp)
        .read_reply()
        .expect_code(220);
    // Trusted clients are not looked up.
    SmtpClient::connect_from(lo(1), server.smtp)
        .read_reply()
        .expect_code(220);
}

#[test]
fn a_dead_blocklist_does_not_stop_mail() {
    // Nothing answers DNS here: the lookup times out and counts as "not listed".
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = strangers_welcome()
        .set_list(
            "dns.nameservers",
            &[&silent.local_addr().unwrap().to_string()],
        )
        .set("dns.timeout", "200ms")
        .set_list("policy.dnsbl_zones", &["bl.test"])
        .set("policy.dnsbl_timeout", "500ms")
        .start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.set_timeout(Duration::from_secs(5));
    c.read_reply().expect_code(220);
}

#[test]
fn helo_checks_for_strangers() {
    let server = strangers_welcome()
        .set("policy.helo_require_fqdn", true)
        .start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("WIN-PC").expect("504", "5.5.2");
    // Our own name (the fixture's server.hostname is tern.test).
    c.ehlo("tern.test").expect("550", "5.7.1");
    // No MAIL before an accepted HELO.
    c.cmd("MAIL FROM:<a@client.test>").expect("503", "5.5.1");
    c.ehlo("mail.client.test").expect_code(250);
    c.cmd("MAIL FROM:<a@client.test>").expect_code(250);
    // Trusted clients may say what they like.
    let mut t = SmtpClient::connect_from(lo(1), server.smtp);
    t.read_reply().expect_code(220);
    t.ehlo("localhost").expect_code(250);
}

#[test]
fn sender_rate_limit_gives_450_4_7_1() {
    let server = strangers_welcome().set("policy.sender_rate", "2/h").start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    for _ in 0..2 {
        c.cmd("MAIL FROM:<bulk@client.test>").expect_code(250);
        c.cmd("RSET").expect_code(250);
    }
    c.cmd("MAIL FROM:<BULK@client.test>").expect("450", "4.7.1");
    c.cmd("MAIL FROM:<other@client.test>").expect_code(250);
    c.cmd("RSET").expect_code(250);
    // Bounces (the null sender) are never limited.
    for _ in 0..3 {
        c.cmd("MAIL FROM:<>").expect_code(250);
        c.cmd("RSET").expect_code(250);
    }
}

#[test]
fn recipients_per_sender_rate_gives_450_at_rcpt() {
    let server = strangers_welcome().set("policy.rcpt_rate", "3/h").start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    c.cmd("MAIL FROM:<list@client.test>").expect_code(250);
    for i in 0..3 {
        c.cmd(&format!("RCPT TO:<r{i}@example.net>"))
            .expect_code(250);
    }
    c.cmd("RCPT TO:<r3@example.net>").expect("450", "4.7.1");
    c.cmd("RSET").expect_code(250);
    // Across messages too; another sender has its own allowance.
    c.cmd("MAIL FROM:<list@client.test>").expect_code(250);
    c.cmd("RCPT TO:<r4@example.net>").expect("450", "4.7.1");
    c.cmd("RSET").expect_code(250);
    c.cmd("MAIL FROM:<someone@client.test>").expect_code(250);
    c.cmd("RCPT TO:<r5@example.net>").expect_code(250);
}

#[test]
fn policy_enabled_false_consults_nothing() {
    let server = strangers_welcome()
        .set("policy.enabled", false)
        .set("policy.connect_rate", "1/h")
        .set("policy.helo_require_fqdn", true)
        .start();
    for _ in 0..3 {
        let mut c = SmtpClient::connect_from(lo(2), server.smtp);
        c.read_reply().expect_code(220);
        c.ehlo("WIN-PC").expect_code(250);
    }
}

#[test]
fn two_from_headers_are_refused_from_anyone() {
    let server = strangers_welcome().start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    c.send_mail(
        "a@client.test",
        &["b@example.net"],
        "From: <a@client.test>\r\nFrom: <ceo@bank.test>\r\n\r\nx\r\n",
    )
    .expect("550", "5.6.0");
    // Mail from an MTA is not completed: no From is its business (and DMARC's).
    tern_tests::queued_id(&c.send_mail(
        "a@client.test",
        &["b@example.net"],
        "Subject: s\r\n\r\nx\r\n",
    ));
}

#[test]
fn greylisting_makes_a_strangers_new_triplet_wait_and_never_a_trusted_or_authenticated_client() {
    let server = strangers_welcome()
        .set("policy.greylisting", true)
        .set("policy.greylist_delay", "1s")
        .user("alice", "secret")
        .start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    c.cmd("MAIL FROM:<alice@client.test>").expect_code(250);
    let first = c.cmd("RCPT TO:<bob@example.net>");
    first.expect("451", "4.7.1");
    assert!(
        first.text().contains("Greylisted, try again in 1 seconds"),
        "{first}"
    );
    // Too early: still refused, and the message cannot go on without a recipient.
    c.cmd("RCPT TO:<bob@example.net>").expect("451", "4.7.1");
    c.cmd("DATA").expect("503", "5.5.1");
    c.cmd("RSET").expect_code(250);

    std::thread::sleep(Duration::from_millis(1_200));
    // The retry after the delay passes, from another address of the same /24 too (big senders
    // retry from another host of their pool), and the whole message goes through.
    let mut retry = SmtpClient::connect_from(lo(3), server.smtp);
    retry.read_reply().expect_code(220);
    retry.ehlo("mail2.client.test").expect_code(250);
    tern_tests::queued_id(&retry.send_mail(
        "ALICE@client.test",
        &["Bob@Example.NET"],
        "From: <alice@client.test>\r\nSubject: greylisted\r\n\r\nx\r\n",
    ));
    // Remembered: later mail of the triplet is not delayed again.
    c.cmd("MAIL FROM:<alice@client.test>").expect_code(250);
    c.cmd("RCPT TO:<bob@example.net>").expect_code(250);
    c.cmd("RSET").expect_code(250);
    // Another sender is a new triplet.
    c.cmd("MAIL FROM:<carol@client.test>").expect_code(250);
    c.cmd("RCPT TO:<bob@example.net>").expect("451", "4.7.1");
    c.cmd("RSET").expect_code(250);

    // A trusted client never waits.
    let mut t = SmtpClient::connect_from(lo(1), server.smtp);
    t.read_reply().expect_code(220);
    t.ehlo("localhost").expect_code(250);
    t.cmd("MAIL FROM:<dave@client.test>").expect_code(250);
    t.cmd("RCPT TO:<erin@example.net>").expect_code(250);
    // Nor does an authenticated one, from a stranger's address.
    let mut a = SmtpClient::connect_from(lo(4), server.submission);
    a.read_reply().expect_code(220);
    a.ehlo("laptop.client.test").expect_code(250);
    a.starttls();
    a.ehlo("laptop.client.test").expect_code(250);
    let token = B64.encode(b"\0alice\0secret");
    a.cmd(&format!("AUTH PLAIN {token}")).expect("235", "2.7.0");
    a.cmd("MAIL FROM:<alice@client.test>").expect_code(250);
    a.cmd("RCPT TO:<frank@example.net>").expect_code(250);
    assert!(
        server.data_dir().join("greylist").is_dir(),
        "triplets are kept in <data_dir>/greylist"
    );
}
