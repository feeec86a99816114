//! No open relay: mail for `relay.domains` is accepted from anyone; mail for other domains only
//! from `relay.networks` or authenticated submission clients. Everyone else gets 554 5.7.1.
//!
//! Loopback is a whole /8, so a test can be "outside" the relay networks by connecting from
//! 127.0.0.2 when only 127.0.0.1/32 is trusted.

use std::net::IpAddr;

use base64::Engine;
use tern_tests::{queued_id, simple_message, SmtpClient, TernServer, LOCAL_DOMAIN};

const TRUSTED: &str = "127.0.0.1/32";

fn outsider() -> IpAddr {
    IpAddr::from([127, 0, 0, 2])
}

fn server() -> TernServer {
    TernServer::builder()
        .relay_networks(&[TRUSTED])
        .relay_domains(&[LOCAL_DOMAIN])
        .user("alice", "secret")
        .start()
}

fn outsider_session(server: &TernServer) -> SmtpClient {
    let mut c = SmtpClient::connect_from(outsider(), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("outsider.test").expect_code(250);
    c.cmd("MAIL FROM:<a@outsider.test>").expect("250", "2");
    c
}

#[test]
fn outsider_cannot_relay_to_a_foreign_domain() {
    let server = server();
    let mut c = outsider_session(&server);
    c.cmd("RCPT TO:<victim@elsewhere.test>")
        .expect("554", "5.7.1");
    c.cmd("DATA").expect("503", "5.5.1");
}

#[test]
fn outsider_can_send_to_a_relay_domain() {
    let mut server = server();
    let mut c = outsider_session(&server);
    c.cmd(&format!("RCPT TO:<user@{LOCAL_DOMAIN}>"))
        .expect("250", "2");
    // Domains compare case-insensitively.
    c.cmd(&format!("RCPT TO:<other@{}>", LOCAL_DOMAIN.to_uppercase()))
        .expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: inbound\r\n\r\nhello\r\n.\r\n");
    let id = queued_id(&c.read_reply());
    server.stop();
    let spool = server.spool_list();
    assert!(spool.iter().any(|e| e.id == id), "{spool:?}");
}

#[test]
fn relay_domains_do_not_match_lookalikes() {
    let server = server();
    let mut c = outsider_session(&server);
    for rcpt in [
        format!("x@sub.{LOCAL_DOMAIN}.elsewhere.test"),
        format!("x@not{LOCAL_DOMAIN}"),
        format!("x@{LOCAL_DOMAIN}.evil.test"),
    ] {
        c.cmd(&format!("RCPT TO:<{rcpt}>")).expect("554", "5.7.1");
    }
}

#[test]
fn source_routes_and_unqualified_recipients_do_not_open_a_relay() {
    let server = server();
    let mut c = outsider_session(&server);
    // A source route through the local domain to a foreign one (RFC 5321 §C: ignore the route,
    // the mailbox is what counts), and a mailbox with no domain at all.
    let r = c.cmd(&format!("RCPT TO:<@{LOCAL_DOMAIN}:victim@elsewhere.test>"));
    assert_eq!(r.code / 100, 5, "source-routed relay attempt accepted: {r}");
    r.expect_enhanced();
    let r = c.cmd("RCPT TO:<victim>");
    assert_eq!(
        r.code / 100,
        5,
        "unqualified recipient accepted from outsider: {r}"
    );
    r.expect_enhanced();
}

#[test]
fn trusted_network_can_relay() {
    let server = server();
    let mut c = SmtpClient::connect_from(IpAddr::from([127, 0, 0, 1]), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("trusted.test").expect_code(250);
    let reply = c.send_mail(
        "a@trusted.test",
        &["b@elsewhere.test"],
        &simple_message("a@trusted.test", "b@elsewhere.test", "relay"),
    );
    queued_id(&reply);
}

#[test]
fn default_networks_trust_all_of_loopback() {
    let server = TernServer::start();
    let mut c = SmtpClient::connect_from(IpAddr::from([127, 0, 0, 9]), server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("lo.test").expect_code(250);
    c.cmd("MAIL FROM:<a@lo.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
}

#[test]
fn authenticated_submission_can_relay_from_outside() {
    let server = server();
    let mut c = SmtpClient::connect_from(outsider(), server.submission);
    c.read_reply().expect_code(220);
    c.ehlo("outsider.test").expect_code(250);
    c.starttls();
    c.ehlo("outsider.test").expect_code(250);
    let token = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0secret");
    c.cmd(&format!("AUTH PLAIN {token}")).expect("235", "2.7.0");
    let reply = c.send_mail(
        "alice@client.test",
        &["b@elsewhere.test"],
        &simple_message(
            "alice@client.test",
            "b@elsewhere.test",
            "authenticated relay",
        ),
    );
    queued_id(&reply);
}

#[test]
fn unauthenticated_submission_cannot_relay_from_outside() {
    let server = server();
    let mut c = SmtpClient::connect_from(outsider(), server.submission);
    c.read_reply().expect_code(220);
    c.ehlo("outsider.test").expect_code(250);
    c.starttls();
    c.ehlo("outsider.test").expect_code(250);
    let bad = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0wrong");
    c.cmd(&format!("AUTH PLAIN {bad}")).expect("535", "5.7.8");
    c.cmd("MAIL FROM:<alice@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("554", "5.7.1");
}

#[test]
fn ipv6_loopback_is_trusted_by_default() {
    let port = tern_tests::free_port();
    let server = TernServer::builder()
        .set_list("smtp.listen", &[&format!("[::1]:{port}")])
        .start();
    assert!(server.smtp.is_ipv6());
    let mut c = SmtpClient::connect(server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("v6.test").expect_code(250);
    c.cmd("MAIL FROM:<a@v6.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
}
