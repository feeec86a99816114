//! Self-tests of the scripted sink (`tern_tests::sink`), driven by the raw client and by lettre:
//! what it records, its scripted replies, STARTTLS, BDAT, and surviving clients that vanish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::client::Tls;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_tests::sink::{Sink, SinkConfig};
use tern_tests::SmtpClient;

const WAIT: Duration = Duration::from_secs(5);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn connect(sink: &Sink) -> SmtpClient {
    let mut c = SmtpClient::connect(sink.addr());
    c.read_reply().expect_code(220);
    c
}

#[test]
fn a_message_round_trips_with_dot_unstuffing() {
    let sink = Sink::start(SinkConfig::default());
    let mut c = connect(&sink);
    let ehlo = c.ehlo("client.test");
    ehlo.expect_code(250);
    assert!(ehlo.has_extension("PIPELINING") && ehlo.has_extension("DSN"));
    assert!(!ehlo.has_extension("STARTTLS") && !ehlo.has_extension("CHUNKING"));

    // SmtpClient::send_mail dot-stuffs; the sink must undo it.
    let body = "Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast\r\n";
    c.send_mail("from@a.example", &["to@b.example"], body)
        .expect("250", "2.0.0");

    // Pipelined: MAIL, RCPT, DATA in one write, with parameters; the null sender.
    c.send("MAIL FROM:<> BODY=8BITMIME SIZE=20\r\nRCPT TO:<x@c.example> NOTIFY=NEVER\r\nDATA\r\n");
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(250);
    c.read_reply().expect_code(354);
    c.send("second\r\n.\r\n");
    c.read_reply().expect_code(250);
    c.cmd("QUIT").expect_code(221);

    let m = sink.wait_for_messages(2, WAIT);
    assert_eq!(m[0].mail_from, "from@a.example");
    assert_eq!(m[0].rcpts, ["to@b.example"]);
    assert_eq!(m[0].data, body.as_bytes());
    assert_eq!(m[0].helo, "client.test");
    assert!(!m[0].tls);
    assert_eq!(m[1].mail_from, "");
    assert_eq!(m[1].mail_params, ["BODY=8BITMIME", "SIZE=20"]);
    assert_eq!(m[1].rcpts, ["x@c.example"]);
    assert_eq!(m[1].rcpt_params, [strings(&["NOTIFY=NEVER"])]);
    assert_eq!(m[1].data, b"second\r\n");
    assert_eq!(sink.connections(), 1);
}

#[test]
fn a_scripted_550_recipient_is_refused_and_not_received() {
    let sink = Sink::start(SinkConfig {
        rcpt_replies: vec![("bad@x.example".into(), strings(&["550 5.1.1 no such user"]))],
        ..SinkConfig::default()
    });
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.cmd("MAIL FROM:<a@a.example>").expect_code(250);
    // Compared case-insensitively.
    c.cmd("RCPT TO:<Bad@X.example>").expect("550", "5.1.1");
    c.cmd("RCPT TO:<good@x.example>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send("hi\r\n.\r\n");
    c.read_reply().expect_code(250);

    let m = sink.wait_for_messages(1, WAIT);
    assert_eq!(m[0].rcpts, ["good@x.example"]);
    let t = &sink.transactions()[0];
    assert_eq!(t.rcpts.len(), 2);
    assert_eq!(t.rcpts[0].address, "Bad@X.example");
    assert_eq!(t.rcpts[0].reply, "550 5.1.1 no such user");
    assert!(t.accepted());
}

#[test]
fn scripts_advance_across_transactions_and_connections() {
    let sink = Sink::start(SinkConfig {
        rcpt_replies: vec![(
            "later@x.example".into(),
            strings(&["451 4.3.0 try later", "250 2.1.5 ok"]),
        )],
        data_replies: strings(&["452 4.3.1 full", "250 2.0.0 queued"]),
        ..SinkConfig::default()
    });

    // First connection: the only recipient deferred; DATA then has no valid recipient.
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.cmd("MAIL FROM:<a@a.example>").expect_code(250);
    c.cmd("RCPT TO:<later@x.example>").expect("451", "4.3.0");
    c.cmd("DATA").expect("554", "5.5.1");
    c.cmd("RSET").expect_code(250);
    drop(c);

    // A retry on a new connection: the recipient is accepted, the content deferred.
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.send_mail("a@a.example", &["later@x.example"], "one\r\n")
        .expect("452", "4.3.1");
    // The next transaction on the same connection is accepted (the last reply repeats).
    c.send_mail("a@a.example", &["later@x.example"], "two\r\n")
        .expect("250", "2.0.0");
    c.send_mail("a@a.example", &["later@x.example"], "three\r\n")
        .expect("250", "2.0.0");

    let m = sink.wait_for_messages(2, WAIT);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].data, b"two\r\n");
    assert_eq!(m[1].data, b"three\r\n");
    let t = sink.transactions();
    assert_eq!(t.len(), 4, "{t:#?}");
    assert_eq!(t[0].connection, 1);
    assert_eq!(t[0].rcpts[0].reply, "451 4.3.0 try later");
    assert_eq!(t[0].data_reply, None);
    assert_eq!(t[1].connection, 2);
    assert_eq!(t[1].data_reply.as_deref(), Some("452 4.3.1 full"));
    assert!(!t[1].accepted());
    assert_eq!(sink.connections(), 2);
}

#[test]
fn mail_replies_are_scripted_too() {
    let sink = Sink::start(SinkConfig {
        mail_replies: strings(&["421 4.3.2 closing", "250 2.1.0 ok"]),
        ..SinkConfig::default()
    });
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.cmd("MAIL FROM:<a@a.example>").expect("421", "4.3.2");
    // A refused MAIL leaves no transaction: RCPT needs MAIL first.
    c.cmd("RCPT TO:<b@b.example>").expect("503", "5.5.1");
    c.send_mail("a@a.example", &["b@b.example"], "x\r\n")
        .expect_code(250);
    let t = sink.transactions();
    assert_eq!(t[0].mail_reply, "421 4.3.2 closing");
    assert!(t[0].rcpts.is_empty());
    assert_eq!(sink.wait_for_messages(1, WAIT).len(), 1);
}

#[test]
fn a_421_greeting_refuses_the_connection() {
    let sink = Sink::start(SinkConfig {
        greeting: "421 4.3.2 busy".into(),
        ..SinkConfig::default()
    });
    let mut c = SmtpClient::connect(sink.addr());
    c.read_reply().expect("421", "4.3.2");
    c.expect_closed(WAIT);
    assert_eq!(sink.connections(), 1);
    assert!(sink.transactions().is_empty());
}

/// A self-signed certificate for "localhost" and a server config serving it.
fn tls_config() -> Arc<rustls::ServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(tern_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    Arc::new(config)
}

#[test]
fn starttls_then_the_message_arrives_over_tls() {
    let sink = Sink::start(SinkConfig {
        starttls: Some(tls_config()),
        ..SinkConfig::default()
    });
    let mut c = connect(&sink);
    assert!(c.ehlo("client.test").has_extension("STARTTLS"));
    c.starttls();
    // RFC 3207 §4.2: EHLO again; STARTTLS is no longer offered.
    let ehlo = c.ehlo("client.test");
    assert!(!ehlo.has_extension("STARTTLS"));
    assert!(ehlo.has_extension("PIPELINING"));
    c.send_mail("a@a.example", &["b@b.example"], "secret\r\n")
        .expect_code(250);
    let m = sink.wait_for_messages(1, WAIT);
    assert!(m[0].tls);
    assert_eq!(m[0].data, b"secret\r\n");

    // Without a TLS config STARTTLS is neither offered nor done.
    let plain = Sink::start(SinkConfig::default());
    let mut c = connect(&plain);
    c.ehlo("client.test");
    c.cmd("STARTTLS").expect("502", "5.5.1");
}

#[test]
fn bdat_chunks_are_concatenated_without_unstuffing() {
    let mut cfg = SinkConfig::default();
    cfg.ehlo_keywords.push("CHUNKING".into());
    let sink = Sink::start(cfg);
    let mut c = connect(&sink);
    assert!(c.ehlo("client.test").has_extension("CHUNKING"));
    c.cmd("MAIL FROM:<a@a.example>").expect_code(250);
    c.cmd("RCPT TO:<b@b.example>").expect_code(250);
    c.send("BDAT 7\r\n.first\n");
    c.read_reply().expect_code(250);
    // The last chunk pipelined with the next transaction's MAIL.
    c.send("BDAT 8 LAST\r\nsecond\r\nMAIL FROM:<c@a.example>\r\n");
    c.read_reply().expect("250", "2.0.0");
    c.read_reply().expect_code(250);
    c.cmd("RCPT TO:<b@b.example>").expect_code(250);
    c.cmd("BDAT 0 LAST").expect_code(250);

    let m = sink.wait_for_messages(2, WAIT);
    assert_eq!(m[0].data, b".first\nsecond\r\n");
    assert_eq!(m[1].data, b"");

    // Without CHUNKING advertised, BDAT is an unknown command.
    let plain = Sink::start(SinkConfig::default());
    let mut c = connect(&plain);
    c.ehlo("client.test");
    c.cmd("BDAT 0 LAST").expect_code(500);
}

#[test]
fn rset_clears_the_transaction_and_the_connection_is_reused() {
    let sink = Sink::start(SinkConfig::default());
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.cmd("MAIL FROM:<a@a.example>").expect_code(250);
    c.cmd("RCPT TO:<b@b.example>").expect_code(250);
    c.cmd("RSET").expect_code(250);
    c.cmd("NOOP").expect_code(250);
    c.cmd("DATA").expect("503", "5.5.1");
    c.send_mail("c@a.example", &["d@b.example"], "after rset\r\n")
        .expect_code(250);
    let m = sink.wait_for_messages(1, WAIT);
    assert_eq!(m[0].mail_from, "c@a.example");
    let t = sink.transactions();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].data_reply, None);
}

#[test]
fn a_client_vanishing_mid_transaction_harms_nothing() {
    let sink = Sink::start(SinkConfig::default());
    for cut in [
        "MAIL FROM:<a@a.example>\r\nRCPT TO:<b",
        "DATA\r\npartial content\r\n",
    ] {
        let mut c = connect(&sink);
        c.ehlo("client.test");
        if cut.starts_with("DATA") {
            c.cmd("MAIL FROM:<a@a.example>").expect_code(250);
            c.cmd("RCPT TO:<b@b.example>").expect_code(250);
        }
        c.send(cut);
        drop(c);
    }
    // Later clients are served, and the aborted transactions are on record.
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.send_mail("a@a.example", &["b@b.example"], "whole\r\n")
        .expect_code(250);
    let m = sink.wait_for_messages(1, WAIT);
    assert_eq!(m.len(), 1);
    let deadline = Instant::now() + WAIT;
    while sink.transactions().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = sink.transactions();
    assert_eq!(t.len(), 3, "{t:#?}");
    assert_eq!(t.iter().filter(|t| t.data_reply.is_none()).count(), 2);
    assert_eq!(sink.connections(), 3);
}

#[test]
fn data_delay_slows_the_final_reply() {
    let sink = Sink::start(SinkConfig {
        data_delay: Duration::from_millis(300),
        ..SinkConfig::default()
    });
    let mut c = connect(&sink);
    c.ehlo("client.test");
    let start = Instant::now();
    c.send_mail("a@a.example", &["b@b.example"], "slow\r\n")
        .expect_code(250);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[test]
#[should_panic(expected = "expected 1 message(s) within")]
fn waiting_for_messages_that_never_come_fails_with_what_arrived() {
    let sink = Sink::start(SinkConfig {
        data_replies: strings(&["554 5.7.1 rejected"]),
        ..SinkConfig::default()
    });
    let mut c = connect(&sink);
    c.ehlo("client.test");
    c.send_mail("a@a.example", &["b@b.example"], "no\r\n")
        .expect_code(554);
    sink.wait_for_messages(1, Duration::from_millis(100));
}

#[test]
fn start_on_a_chosen_loopback_address() {
    let sink = Sink::start_on("127.0.0.2:0".parse().unwrap(), SinkConfig::default()).unwrap();
    assert_eq!(sink.addr().ip().to_string(), "127.0.0.2");
    let mut c = connect(&sink);
    c.cmd("QUIT").expect_code(221);
}

#[tokio::test]
async fn lettre_delivers_through_the_sink() {
    let sink = Sink::start(SinkConfig::default());
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.addr().port())
        .hello_name(ClientId::Domain("lettre.test".into()))
        .tls(Tls::None)
        .timeout(Some(WAIT))
        .build();
    let envelope = Envelope::new(
        Some("from@a.example".parse().unwrap()),
        vec!["to@b.example".parse().unwrap()],
    )
    .unwrap();
    // lettre always writes CRLF before the final dot, so a content ending with CRLF would
    // arrive with an empty line added: this one has no final line end.
    let raw = b"Subject: via lettre\r\n\r\n.dot line\r\nend";
    let resp = transport.send_raw(&envelope, raw).await.unwrap();
    assert!(resp.is_positive());
    let m = sink.wait_for_messages(1, WAIT);
    assert_eq!(m[0].helo, "lettre.test");
    assert_eq!(m[0].rcpts, ["to@b.example"]);
    assert_eq!(
        m[0].data,
        b"Subject: via lettre\r\n\r\n.dot line\r\nend\r\n"
    );
}
