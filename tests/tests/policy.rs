//! The validation stage end to end: `tern serve` with `[policy]` checks, clients connecting
//! from other loopback addresses (127.0.0.2, …) so they are strangers (`relay.networks` is
//! narrowed to 127.0.0.1), and a real DNS server on loopback for the blocklist and reverse DNS.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tern_dns::testing::{TestDns, TestZone};
use tern_tests::{config_check, queued_id, tern_cmd, SmtpClient, TernServer, TernServerBuilder};

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
    server
        .wait_for_log(|l| l.contains("WARN") && l.contains("not listed") && l.contains("bl.test"));
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

#[test]
fn sender_and_recipient_rates_trip_and_recover() {
    let server = strangers_welcome()
        .set("policy.sender_rate", "2/s")
        .set("policy.rcpt_rate", "2/s")
        .start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    c.cmd("MAIL FROM:<burst@client.test>").expect_code(250);
    c.cmd("RCPT TO:<a@example.net>").expect_code(250);
    c.cmd("RCPT TO:<b@example.net>").expect_code(250);
    c.cmd("RCPT TO:<c@example.net>").expect("450", "4.7.1");
    c.cmd("RSET").expect_code(250);
    c.cmd("MAIL FROM:<burst@client.test>").expect_code(250);
    c.cmd("RSET").expect_code(250);
    c.cmd("MAIL FROM:<burst@client.test>")
        .expect("450", "4.7.1");
    // Both buckets refill completely within a second.
    std::thread::sleep(Duration::from_millis(1200));
    c.cmd("MAIL FROM:<burst@client.test>").expect_code(250);
    c.cmd("RCPT TO:<c@example.net>").expect_code(250);
}

/// Reverse DNS for the loopback clients: 127.0.0.2 is `mail.client.test` and that name points
/// back; 127.0.0.4 is `liar.client.test`, which points elsewhere; 127.0.0.5's reverse zone
/// fails (SERVFAIL); 127.0.0.3 has no PTR record.
fn reverse_zone() -> TestDns {
    TestDns::start(
        TestZone::new()
            .ptr(lo(2), "mail.client.test")
            .a("mail.client.test", Ipv4Addr::new(127, 0, 0, 2))
            .ptr(lo(4), "liar.client.test")
            .a("liar.client.test", Ipv4Addr::new(127, 0, 0, 99))
            .servfail_ptr(lo(5)),
    )
}

fn reverse_dns_server(dns: &TestDns, mode: &str) -> TernServer {
    strangers_welcome()
        .set_list("dns.nameservers", &[&dns.addr().to_string()])
        .set("dns.timeout", "1s")
        .set("policy.reverse_dns", mode)
        .start()
}

#[track_caller]
fn refused_at_connect(server: &TernServer, n: u8, code: &str, enhanced: &str) {
    let mut c = SmtpClient::connect_from(lo(n), server.smtp);
    let reply = c.read_reply();
    reply.expect(code, enhanced);
    assert!(reply.text().contains(&format!("[127.0.0.{n}]")), "{reply}");
    c.expect_closed(Duration::from_secs(2));
}

#[test]
fn reverse_dns_confirmed_greets_only_clients_whose_name_points_back() {
    let dns = reverse_zone();
    let server = reverse_dns_server(&dns, "confirmed");
    SmtpClient::connect_from(lo(2), server.smtp)
        .read_reply()
        .expect_code(220);
    // No PTR; a PTR name whose A record is another address.
    refused_at_connect(&server, 3, "550", "5.7.25");
    refused_at_connect(&server, 4, "550", "5.7.25");
    // DNS failed: try again later.
    refused_at_connect(&server, 5, "450", "4.7.25");
    // Trusted clients are not looked up (127.0.0.1 has no PTR here).
    SmtpClient::connect_from(lo(1), server.smtp)
        .read_reply()
        .expect_code(220);
    // Submission clients are judged by their credentials, not their reverse DNS.
    let mut sub = SmtpClient::connect_from(lo(3), server.submission);
    sub.read_reply().expect_code(220);
    // The verified name is logged.
    server.wait_for_log(|l| l.contains("reverse DNS verified") && l.contains("mail.client.test"));
}

#[test]
fn reverse_dns_exists_needs_only_a_ptr_record() {
    let dns = reverse_zone();
    let server = reverse_dns_server(&dns, "exists");
    for n in [2, 4] {
        SmtpClient::connect_from(lo(n), server.smtp)
            .read_reply()
            .expect_code(220);
    }
    refused_at_connect(&server, 3, "550", "5.7.25");
    refused_at_connect(&server, 5, "450", "4.7.25");
}

#[test]
fn recipients_file_refuses_unknown_users_of_our_domains() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recipients");
    fs::write(
        &file,
        "# known users\nalice@example.net\nBob@Example.NET  # capitals\n@catchall.test\n",
    )
    .unwrap();
    let mut server = strangers_welcome()
        .relay_domains(&["example.net", "catchall.test", "unlisted.test"])
        .set("policy.recipients_file", file.display().to_string())
        .start();
    let mut c = SmtpClient::connect_from(lo(2), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    c.cmd("MAIL FROM:<a@client.test>").expect_code(250);
    c.cmd("RCPT TO:<alice@example.net>").expect_code(250);
    c.cmd("RCPT TO:<BOB@example.NET>").expect_code(250);
    let unknown = c.cmd("RCPT TO:<carol@example.net>");
    unknown.expect("550", "5.1.1");
    assert!(
        unknown
            .text()
            .contains("<carol@example.net>: Recipient address rejected: User unknown"),
        "{unknown}"
    );
    // `@domain`: every user.
    c.cmd("RCPT TO:<anyone@catchall.test>").expect_code(250);
    // A domain we serve that the file never mentions accepts nobody…
    c.cmd("RCPT TO:<x@unlisted.test>").expect("550", "5.1.1");
    // …except the postmaster, everywhere (RFC 5321 §4.5.1).
    c.cmd("RCPT TO:<postmaster@unlisted.test>").expect_code(250);
    c.cmd("RCPT TO:<Postmaster>").expect_code(250);
    // Other domains are still a relay question.
    c.cmd("RCPT TO:<x@elsewhere.test>").expect("554", "5.7.1");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: s\r\n\r\nx\r\n.\r\n");
    let id = queued_id(&c.read_reply());
    // Trusted clients meet the same list for our domains, and relay elsewhere as before.
    let mut t = SmtpClient::connect_from(lo(1), server.smtp);
    t.read_reply().expect_code(220);
    t.ehlo("app.test").expect_code(250);
    t.cmd("MAIL FROM:<app@client.test>").expect_code(250);
    t.cmd("RCPT TO:<carol@example.net>").expect("550", "5.1.1");
    t.cmd("RCPT TO:<x@elsewhere.test>").expect_code(250);
    drop((c, t));
    server.stop();
    let spooled = server.spool_list();
    let entry = spooled.iter().find(|e| e.id == id).expect("queued");
    let mut rcpts = entry.recipients.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "BOB@example.NET",
            "alice@example.net",
            "anyone@catchall.test",
            "postmaster",
            "postmaster@unlisted.test"
        ]
    );
}

#[test]
fn a_bad_recipients_file_stops_config_check_and_serve_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let recipients = dir.path().join("users.txt");
    fs::write(&recipients, "alice@example.net\nbob\n").unwrap();
    let config = dir.path().join("tern.toml");
    fs::write(
        &config,
        format!(
            "[policy]\nrecipients_file = {:?}\n",
            recipients.display().to_string()
        ),
    )
    .unwrap();
    let out = config_check(&config, &[]);
    assert!(!out.status.success(), "a bad line must fail the check");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["policy.recipients_file", "users.txt", "line 2"] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    let serve = tern_cmd(&["serve", "--config", &config.display().to_string()]);
    assert!(!serve.status.success());
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("policy.recipients_file"),
        "{}",
        String::from_utf8_lossy(&serve.stderr)
    );
    // A file that cannot be read is reported the same way.
    fs::remove_file(&recipients).unwrap();
    let out = config_check(&config, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.recipients_file") && err.contains("cannot read"),
        "{err}"
    );
}
