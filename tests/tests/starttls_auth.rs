//! STARTTLS (RFC 3207), implicit TLS (RFC 8314) and AUTH PLAIN/LOGIN (RFC 4954, 4616), with the
//! STARTTLS command-injection check (CVE-2011-0411).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tern_tests::{queued_id, simple_message, split_received, SmtpClient, TernServer};

fn server() -> TernServer {
    TernServer::builder().user("alice", "secret").start()
}

/// A submission session upgraded with STARTTLS, EHLO done again.
fn tls_submission(server: &TernServer) -> SmtpClient {
    let mut c = SmtpClient::connect(server.submission);
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    c.starttls();
    c.ehlo("client.test").expect_code(250);
    c
}

#[test]
fn starttls_is_220_2_0_0_and_negotiates_tls() {
    let server = server();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    c.starttls();
    let (version, cipher) = c.tls_info().expect("TLS is on");
    assert!(
        version.contains("TLSv1_2") || version.contains("TLSv1_3"),
        "{version} {cipher}"
    );
    c.ehlo("client.test").expect_code(250);
    let reply = c.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        &simple_message("a@client.test", "b@elsewhere.test", "over tls"),
    );
    queued_id(&reply);
}

#[test]
fn starttls_injection_is_not_answered_after_the_handshake() {
    // CVE-2011-0411: a man in the middle appends a plaintext command to STARTTLS in the same
    // packet. The server must discard it, so the first reply over TLS belongs to the client's
    // first encrypted command.
    let server = server();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    c.send("STARTTLS\r\nRSET\r\n");
    c.read_reply().expect("220", "2.0.0");
    // No plaintext answer to RSET may have been sent before the handshake either.
    if let Some(r) = c.reply_within(Duration::from_millis(300)) {
        panic!("server answered the injected plaintext command: {r}");
    }
    c.tls_handshake();
    let r = c.ehlo("client.test");
    r.expect_code(250);
    assert!(
        r.lines.len() > 1 && r.lines[0].starts_with(tern_tests::HOSTNAME),
        "first reply over TLS must be the EHLO reply, not the injected RSET's: {r}"
    );
    c.cmd("NOOP").expect("250", "2.0.0");
    assert!(
        c.reply_within(Duration::from_millis(300)).is_none(),
        "stray reply over TLS"
    );
}

#[test]
fn starttls_injection_with_a_whole_transaction_is_not_executed() {
    let mut server = server();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    c.send(
        "STARTTLS\r\nMAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n",
    );
    c.read_reply().expect("220", "2.0.0");
    if let Some(r) = c.reply_within(Duration::from_millis(300)) {
        panic!("server answered injected plaintext: {r}");
    }
    c.tls_handshake();
    c.ehlo("client.test").expect_code(250);
    // No transaction is open: the injected MAIL was dropped.
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("503", "5.5.1");
    c.cmd("QUIT").expect("221", "2.0.0");
    server.stop();
    assert!(server.spool_list().is_empty(), "injected message spooled");
}

#[test]
fn starttls_twice_is_refused() {
    let server = server();
    let mut c = tls_submission(&server);
    let r = c.cmd("STARTTLS");
    assert_eq!(r.code / 100, 5, "STARTTLS over TLS: {r}");
    r.expect_enhanced();
}

#[test]
fn starttls_with_an_argument_is_501() {
    let server = server();
    let mut c = server.session();
    c.cmd("STARTTLS now").expect("501", "5.5.4");
}

#[test]
fn auth_plain_succeeds_with_235_2_7_0() {
    let server = server();
    let mut c = tls_submission(&server);
    let token = B64.encode(b"\0alice\0secret");
    c.cmd(&format!("AUTH PLAIN {token}")).expect("235", "2.7.0");
    // A second AUTH in the same session is a sequence error (RFC 4954 §4).
    c.cmd(&format!("AUTH PLAIN {token}")).expect("503", "5.5.1");
}

#[test]
fn auth_plain_with_initial_response_on_the_next_line() {
    let server = server();
    let mut c = tls_submission(&server);
    c.cmd("AUTH PLAIN").expect_code(334);
    c.cmd(&B64.encode(b"\0alice\0secret"))
        .expect("235", "2.7.0");
}

#[test]
fn auth_login_succeeds() {
    let server = server();
    let mut c = tls_submission(&server);
    c.cmd("AUTH LOGIN").expect_code(334);
    c.cmd(&B64.encode("alice")).expect_code(334);
    c.cmd(&B64.encode("secret")).expect("235", "2.7.0");
}

#[test]
fn wrong_password_is_535_5_7_8() {
    let server = server();
    let mut c = tls_submission(&server);
    c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0nope")))
        .expect("535", "5.7.8");
    c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0mallory\0secret")))
        .expect("535", "5.7.8");
    // Still usable, and the right password works afterwards.
    c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0secret")))
        .expect("235", "2.7.0");
}

#[test]
fn auth_cancelled_with_star_is_501() {
    let server = server();
    let mut c = tls_submission(&server);
    c.cmd("AUTH LOGIN").expect_code(334);
    c.cmd("*").expect("501", "5");
    c.cmd("NOOP").expect("250", "2.0.0");
}

#[test]
fn auth_with_bad_base64_is_501() {
    let server = server();
    let mut c = tls_submission(&server);
    c.cmd("AUTH PLAIN !!!notbase64!!!").expect("501", "5.5.2");
}

#[test]
fn auth_unknown_mechanism_is_504() {
    let server = server();
    let mut c = tls_submission(&server);
    c.cmd("AUTH CRAM-MD5").expect("504", "5.5.4");
}

#[test]
fn auth_before_tls_is_refused() {
    let server = server();
    let mut c = SmtpClient::connect(server.submission);
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    let r = c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0secret")));
    assert_eq!(r.code / 100, 5, "AUTH in clear text accepted: {r}");
    // RFC 4954 §4: "538 5.7.11 Encryption required for requested authentication mechanism".
    r.expect("538", "5.7.11");
}

#[test]
fn auth_on_the_relay_listener_is_refused_even_over_tls() {
    let server = server();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    c.starttls();
    c.ehlo("client.test").expect_code(250);
    let r = c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0secret")));
    assert_eq!(r.code / 100, 5, "AUTH on port-25 listener: {r}");
    r.expect("503", "5.5.1");
}

#[test]
fn submissions_implicit_tls_send_with_auth() {
    let mut server = server();
    let mut c = SmtpClient::connect_tls(server.submissions);
    c.read_reply().expect_code(220);
    c.ehlo("client.test").expect_code(250);
    c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0secret")))
        .expect("235", "2.7.0");
    let reply = c.send_mail(
        "alice@client.test",
        &["bob@elsewhere.test"],
        &simple_message("alice@client.test", "bob@elsewhere.test", "implicit tls"),
    );
    let id = queued_id(&reply);
    c.cmd("QUIT").expect("221", "2.0.0");
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == id).expect("spooled");
    assert_eq!(e.sender, "alice@client.test");
}

#[test]
fn received_header_records_tls_version_and_cipher() {
    let mut server = server();
    let mut plain = server.session();
    let id_plain = queued_id(&plain.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        "Subject: p\r\n\r\nx\r\n",
    ));
    let mut tls = server.connect();
    tls.read_reply().expect_code(220);
    tls.ehlo("client.test").expect_code(250);
    tls.starttls();
    let (version, cipher) = tls.tls_info().expect("tls");
    tls.ehlo("client.test").expect_code(250);
    let id_tls = queued_id(&tls.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        "Subject: t\r\n\r\nx\r\n",
    ));
    server.stop();
    // rustls says "TLSv1_3" / "TLS13_AES_256_GCM_SHA384"; headers use "TLSv1.3" and the IANA
    // name "TLS_AES_256_GCM_SHA384". Accept either spelling of the cipher.
    let version = version.replace('_', ".");
    let iana = cipher.replace("TLS13_", "TLS_");
    let (received, _) = split_received(&server.spooled_text(&id_tls));
    assert!(
        received.contains(&version),
        "TLS version {version} in {received:?}"
    );
    assert!(
        received.contains(&cipher) || received.contains(&iana),
        "cipher {iana} in {received:?}"
    );
    assert!(
        received.contains("ESMTPS"),
        "RFC 3848 protocol ESMTPS in {received:?}"
    );
    let (received, _) = split_received(&server.spooled_text(&id_plain));
    assert!(
        !received.contains(&version) && !received.contains("ESMTPS"),
        "plain session: {received:?}"
    );
}

#[test]
fn received_header_of_an_authenticated_session_says_esmtpsa() {
    let mut server = server();
    let mut c = tls_submission(&server);
    c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0secret")))
        .expect("235", "2.7.0");
    let id = queued_id(&c.send_mail(
        "alice@client.test",
        &["b@elsewhere.test"],
        "From: <alice@client.test>\r\nSubject: a\r\n\r\nx\r\n",
    ));
    server.stop();
    let (received, _) = split_received(&server.spooled_text(&id));
    assert!(
        received.contains("ESMTPSA"),
        "RFC 3848 protocol ESMTPSA in {received:?}"
    );
    let msg = server.spooled_message(&id);
    assert_eq!(msg.client.auth_user.as_deref(), Some("alice"));
}

#[test]
fn submission_gets_date_and_message_id_added_and_needs_one_from() {
    let mut server = server();
    let mut c = tls_submission(&server);
    c.cmd(&format!("AUTH PLAIN {}", B64.encode(b"\0alice\0secret")))
        .expect("235", "2.7.0");
    let id = queued_id(&c.send_mail(
        "alice@client.test",
        &["b@elsewhere.test"],
        "From: <alice@client.test>\r\nSubject: bare\r\n\r\nx\r\n",
    ));
    // No From at all, or two of them: refused.
    c.send_mail(
        "alice@client.test",
        &["b@elsewhere.test"],
        "Subject: anonymous\r\n\r\nx\r\n",
    )
    .expect("550", "5.6.0");
    c.send_mail(
        "alice@client.test",
        &["b@elsewhere.test"],
        "From: <alice@client.test>\r\nFrom: <ceo@bank.test>\r\nSubject: two\r\n\r\nx\r\n",
    )
    .expect("550", "5.6.0");
    server.stop();
    let text = server.spooled_text(&id);
    let (received, rest) = split_received(&text);
    assert!(received.contains("ESMTPSA"), "{received}");
    let header = rest.split("\r\n\r\n").next().unwrap();
    assert!(
        header.starts_with("Date: "),
        "added right after Received: {rest:?}"
    );
    assert!(
        header.contains(&format!("Message-ID: <{id}@")),
        "Message-ID from the queue id: {header:?}"
    );
    assert!(header.contains("Subject: bare"), "{header}");
}
