//! What EHLO advertises, and how that changes with TLS and the listener (RFC 5321 §4.1.1.1,
//! RFC 3207 for STARTTLS, RFC 4954 for AUTH, RFC 8314 for implicit TLS).

use tern_tests::{Reply, SmtpClient, TernServer};

fn ehlo(c: &mut SmtpClient) -> Reply {
    let r = c.ehlo("client.test");
    r.expect_code(250);
    r
}

fn auth_mechanisms(r: &Reply) -> Vec<String> {
    r.extension("AUTH")
        .map(|p| {
            p.split_whitespace()
                .map(|m| m.to_ascii_uppercase())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ehlo_advertises_the_required_extensions() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    let r = ehlo(&mut c);
    for ext in [
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
        "STARTTLS",
    ] {
        assert!(r.has_extension(ext), "EHLO lacks {ext}: {r}");
    }
}

#[test]
fn size_advertises_the_default_limit() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    let r = ehlo(&mut c);
    assert_eq!(r.extension("SIZE").as_deref(), Some("10240000"), "{r}");
}

#[test]
fn size_follows_limits_message_size() {
    let server = TernServer::builder()
        .set("limits.message_size", 12345)
        .start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    let r = ehlo(&mut c);
    assert_eq!(r.extension("SIZE").as_deref(), Some("12345"), "{r}");
}

#[test]
fn no_auth_before_tls_on_any_listener() {
    let server = TernServer::builder().user("alice", "secret").start();
    for addr in [server.smtp, server.submission] {
        let mut c = SmtpClient::connect(addr);
        c.read_reply().expect_code(220);
        let r = ehlo(&mut c);
        assert!(
            !r.has_extension("AUTH"),
            "AUTH offered in clear on {addr}: {r}"
        );
        assert!(r.has_extension("STARTTLS"), "{addr}: {r}");
    }
}

#[test]
fn submission_offers_auth_plain_login_after_starttls_and_no_starttls() {
    let server = TernServer::builder().user("alice", "secret").start();
    let mut c = SmtpClient::connect(server.submission);
    c.read_reply().expect_code(220);
    ehlo(&mut c);
    c.starttls();
    let r = ehlo(&mut c);
    assert!(
        !r.has_extension("STARTTLS"),
        "STARTTLS offered again over TLS: {r}"
    );
    let mechs = auth_mechanisms(&r);
    assert!(
        mechs.contains(&"PLAIN".to_string()),
        "AUTH lacks PLAIN: {r}"
    );
    assert!(
        mechs.contains(&"LOGIN".to_string()),
        "AUTH lacks LOGIN: {r}"
    );
}

#[test]
fn relay_listener_offers_no_auth_even_over_tls() {
    let server = TernServer::builder().user("alice", "secret").start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    ehlo(&mut c);
    c.starttls();
    let r = ehlo(&mut c);
    assert!(
        !r.has_extension("AUTH"),
        "AUTH on the port-25 listener: {r}"
    );
    assert!(!r.has_extension("STARTTLS"), "{r}");
    // The other extensions survive the upgrade.
    for ext in [
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ] {
        assert!(r.has_extension(ext), "EHLO over TLS lacks {ext}: {r}");
    }
}

#[test]
fn submissions_is_implicit_tls_with_auth_and_without_starttls() {
    let server = TernServer::builder().user("alice", "secret").start();
    let mut c = SmtpClient::connect_tls(server.submissions);
    assert!(c.tls_info().is_some());
    c.read_reply().expect_code(220);
    let r = ehlo(&mut c);
    assert!(!r.has_extension("STARTTLS"), "{r}");
    let mechs = auth_mechanisms(&r);
    assert!(
        mechs.contains(&"PLAIN".to_string()) && mechs.contains(&"LOGIN".to_string()),
        "{r}"
    );
}

#[test]
fn ehlo_resets_a_transaction() {
    // RFC 5321 §4.1.4: EHLO in the middle of a transaction clears it, like RSET.
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    ehlo(&mut c);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("503", "5.5.1");
}
