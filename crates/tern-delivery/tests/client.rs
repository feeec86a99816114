//! The SMTP client against real peers on loopback: Postfix's `smtp-sink`, and a small scripted
//! server written here that answers from a script and records what it received.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_delivery::{ClientConfig, DeliveryError, RecipientOutcome, SmtpConnection, TlsPolicy};
use tern_message::{Envelope, Recipient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn config() -> ClientConfig {
    let mut cfg = ClientConfig::new("client.test");
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.command_timeout = Duration::from_secs(5);
    cfg.data_timeout = Duration::from_secs(5);
    cfg.tls = TlsPolicy::None;
    cfg
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope::new(
        "sender@example.org",
        rcpts.iter().map(|r| Recipient::new(*r)).collect(),
    )
}

const BODY: &[u8] = b"Subject: test\r\n\r\nhello\r\n";

// ---------------------------------------------------------------------------------------------
// The scripted server.

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// As a scripted reply: close the connection without answering.
const CLOSE: &str = "<close>";

/// What the server answers. Replies are complete wire text without the final CRLF.
#[derive(Clone)]
struct Script {
    greeting: &'static str,
    /// EHLO keywords after the greeting line.
    ehlo: Vec<&'static str>,
    /// (command prefix, reply): the first whose prefix matches the command line
    /// (case-insensitively) answers it instead of the default.
    overrides: Vec<(&'static str, &'static str)>,
    /// The reply after the final dot (or the BDAT chunk); empty for none at all.
    data_reply: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Script {
    fn new(ehlo: &[&'static str]) -> Self {
        Script {
            greeting: "220 scripted.test ESMTP",
            ehlo: ehlo.to_vec(),
            overrides: Vec::new(),
            data_reply: "250 2.0.0 queued",
            tls: None,
        }
    }

    fn answer(mut self, prefix: &'static str, reply: &'static str) -> Self {
        self.overrides.push((prefix, reply));
        self
    }
}

#[derive(Debug, Default)]
struct Record {
    /// Each command line, and whether more bytes had already arrived when it was answered
    /// (i.e. the client did not wait for this reply before sending the next command).
    commands: Vec<(String, bool)>,
    /// The raw bytes after each 354, terminator included, still dot-stuffed.
    data: Vec<Vec<u8>>,
    tls: bool,
}

impl Record {
    fn verbs(&self) -> Vec<String> {
        self.commands.iter().map(|(c, _)| c.clone()).collect()
    }
}

/// Starts the scripted server and connects the client to it (the common case).
async fn connected(script: Script) -> (SmtpConnection, Arc<Mutex<Record>>) {
    let (addr, record) = scripted(script).await;
    let conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    (conn, record)
}

/// Starts the server for one connection; returns its address and the record.
async fn scripted(script: Script) -> (SocketAddr, Arc<Mutex<Record>>) {
    scripted_on("127.0.0.1:0", script).await
}

async fn scripted_on(bind: &str, script: Script) -> (SocketAddr, Arc<Mutex<Record>>) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let rec = record.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve(Box::new(tcp), script, rec).await;
    });
    (addr, record)
}

async fn read_line(io: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            return Some(line);
        }
        let mut chunk = [0u8; 4096];
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn reply(io: &mut Box<dyn Io>, text: &str) {
    io.write_all(format!("{text}\r\n").as_bytes())
        .await
        .unwrap();
    io.flush().await.unwrap();
}

async fn serve(mut io: Box<dyn Io>, script: Script, record: Arc<Mutex<Record>>) {
    reply(&mut io, script.greeting).await;
    if !script.greeting.starts_with('2') {
        return;
    }
    let mut buf = Vec::new();
    while let Some(line) = read_line(&mut io, &mut buf).await {
        // Give a client that does not wait for replies the time to send more, then look
        // whether it did.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut chunk = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), io.read(&mut chunk)).await
        {
            buf.extend_from_slice(&chunk[..n]);
        }
        record
            .lock()
            .unwrap()
            .commands
            .push((line.clone(), !buf.is_empty()));
        let upper = line.to_ascii_uppercase();
        if let Some((_, r)) = script
            .overrides
            .iter()
            .find(|(p, _)| upper.starts_with(&p.to_ascii_uppercase()))
        {
            if *r == CLOSE {
                return;
            }
            reply(&mut io, r).await;
            continue;
        }
        let verb = upper.split([' ', ':']).next().unwrap_or("").to_string();
        match verb.as_str() {
            "EHLO" => {
                let mut lines = vec!["scripted.test".to_string()];
                lines.extend(script.ehlo.iter().map(|k| k.to_string()));
                let last = lines.len() - 1;
                let text: Vec<String> = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                    .collect();
                reply(&mut io, &text.join("\r\n")).await;
            }
            "HELO" | "RSET" | "NOOP" => reply(&mut io, "250 2.0.0 ok").await,
            "MAIL" => reply(&mut io, "250 2.1.0 ok").await,
            "RCPT" => reply(&mut io, "250 2.1.5 ok").await,
            "DATA" => {
                reply(&mut io, "354 go ahead").await;
                loop {
                    if buf.starts_with(b".\r\n") {
                        record.lock().unwrap().data.push(buf.drain(..3).collect());
                        break;
                    }
                    if let Some(pos) = buf.windows(5).position(|w| w == b"\r\n.\r\n") {
                        let data: Vec<u8> = buf.drain(..pos + 5).collect();
                        record.lock().unwrap().data.push(data);
                        break;
                    }
                    let n = io.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed during DATA");
                    buf.extend_from_slice(&chunk[..n]);
                }
                if !script.data_reply.is_empty() {
                    reply(&mut io, script.data_reply).await;
                }
            }
            "BDAT" => {
                // RFC 3030: exactly <size> octets follow the command line.
                let size: usize = upper.split(' ').nth(1).unwrap().parse().unwrap();
                while buf.len() < size {
                    let n = io.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed during BDAT");
                    buf.extend_from_slice(&chunk[..n]);
                }
                record
                    .lock()
                    .unwrap()
                    .data
                    .push(buf.drain(..size).collect());
                reply(&mut io, script.data_reply).await;
            }
            "STARTTLS" => {
                let Some(tls) = script.tls.clone() else {
                    reply(&mut io, "502 5.5.1 no TLS here").await;
                    continue;
                };
                reply(&mut io, "220 2.0.0 ready").await;
                let stream = TlsAcceptor::from(tls).accept(io).await.unwrap();
                record.lock().unwrap().tls = true;
                io = Box::new(stream);
            }
            "QUIT" => {
                reply(&mut io, "221 2.0.0 bye").await;
                return;
            }
            _ => reply(&mut io, "500 5.5.2 unknown command").await,
        }
    }
}

fn delivered(o: &RecipientOutcome) -> bool {
    matches!(o, RecipientOutcome::Delivered(_))
}

// ---------------------------------------------------------------------------------------------
// Scripted server tests.

#[tokio::test]
async fn greeting_421_is_a_greeting_error() {
    let mut script = Script::new(&[]);
    script.greeting = "421 4.3.2 busy, try later";
    let (addr, _) = scripted(script).await;
    let err = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap_err();
    match &err {
        DeliveryError::Greeting(reply) => assert_eq!(reply.code, 421),
        other => panic!("expected a greeting error, got {other:?}"),
    }
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn pipelined_transaction_with_one_refused_recipient() {
    let script = Script::new(&["PIPELINING", "SIZE 1000000", "8BITMIME"])
        .answer("RCPT TO:<bad@", "550 5.1.1 no such user");
    let (mut conn, record) = connected(script).await;
    let outcomes = conn
        .send(
            &envelope(&["a@example.net", "bad@example.net", "c@example.net"]),
            BODY,
        )
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    match &outcomes[1] {
        RecipientOutcome::Failed(r) => assert_eq!(r.code, 550),
        other => panic!("{other:?}"),
    }
    assert!(delivered(&outcomes[2]), "{outcomes:?}");
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert_eq!(
        rec.verbs(),
        [
            "EHLO client.test",
            &format!("MAIL FROM:<sender@example.org> SIZE={}", BODY.len()),
            "RCPT TO:<a@example.net>",
            "RCPT TO:<bad@example.net>",
            "RCPT TO:<c@example.net>",
            "DATA",
            "QUIT",
        ]
    );
    // One write: when MAIL was answered, the RCPTs and DATA were already there.
    assert!(rec.commands[1].1 && rec.commands[2].1, "{:?}", rec.commands);
}

#[tokio::test]
async fn without_pipelining_each_command_waits_for_its_reply() {
    let (addr, record) = scripted(Script::new(&["8BITMIME"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let outcomes = conn
        .send(&envelope(&["a@example.net", "b@example.net"]), BODY)
        .await
        .unwrap();
    assert!(outcomes.iter().all(delivered), "{outcomes:?}");
    conn.reset().await.unwrap();
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert_eq!(
        rec.verbs(),
        [
            "EHLO client.test",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<a@example.net>",
            "RCPT TO:<b@example.net>",
            "DATA",
            "RSET",
            "QUIT",
        ]
    );
    // Nothing had arrived beyond each command when it was answered: the client waited.
    assert!(
        rec.commands.iter().all(|(_, early)| !early),
        "{:?}",
        rec.commands
    );
    assert_eq!(rec.data, [b"Subject: test\r\n\r\nhello\r\n.\r\n".to_vec()]);
}

#[tokio::test]
async fn mail_451_defers_every_recipient() {
    for pipelining in [true, false] {
        let ehlo: &[&str] = if pipelining { &["PIPELINING"] } else { &[] };
        let script = Script::new(ehlo)
            .answer("MAIL", "451 4.3.0 try later")
            .answer("RCPT", "503 5.5.1 need MAIL")
            .answer("DATA", "503 5.5.1 need RCPT");
        let (mut conn, record) = connected(script).await;
        let outcomes = conn
            .send(&envelope(&["a@example.net", "b@example.net"]), BODY)
            .await
            .unwrap();
        assert_eq!(outcomes.len(), 2);
        for o in &outcomes {
            match o {
                RecipientOutcome::Deferred(r) => assert_eq!(r.code, 451),
                other => panic!("pipelining={pipelining}: {other:?}"),
            }
        }
        conn.quit().await;
        let rec = record.lock().unwrap();
        assert!(rec.data.is_empty());
        if !pipelining {
            // No RCPT after a refused MAIL.
            assert!(!rec.verbs().iter().any(|c| c.starts_with("RCPT")));
        }
    }
}

#[tokio::test]
async fn no_accepted_recipient_means_no_data() {
    let script = Script::new(&[]).answer("RCPT", "550 5.1.1 no such user");
    let (mut conn, record) = connected(script).await;
    let outcomes = conn
        .send(&envelope(&["x@example.net"]), BODY)
        .await
        .unwrap();
    assert!(matches!(outcomes[0], RecipientOutcome::Failed(_)));
    conn.quit().await;
    let verbs = record.lock().unwrap().verbs();
    // QUIT ends the transaction MAIL opened; no RSET is needed before it.
    assert_eq!(verbs[2..], ["RCPT TO:<x@example.net>", "QUIT"]);
}

/// A refused message, `reset` (as the delivery worker does before reusing a connection), then
/// an accepted one; returns the commands the server saw and whether more input had already
/// arrived when each was answered.
async fn refused_then_accepted(ehlo: &[&'static str]) -> Vec<(String, bool)> {
    let script = Script::new(ehlo).answer("RCPT TO:<bad@", "550 5.1.1 no such user");
    let (mut conn, record) = connected(script).await;
    let refused = conn
        .send(&envelope(&["bad@example.net"]), BODY)
        .await
        .unwrap();
    assert!(
        matches!(&refused[0], RecipientOutcome::Failed(r) if r.code == 550),
        "{refused:?}"
    );
    conn.reset().await.unwrap();
    let sent = conn
        .send(&envelope(&["good@example.net"]), BODY)
        .await
        .unwrap();
    assert!(delivered(&sent[0]), "{sent:?}");
    conn.quit().await;
    let commands = record.lock().unwrap().commands.clone();
    commands
}

#[tokio::test]
async fn after_a_transaction_with_no_recipient_one_rset_clears_it() {
    let mail = "MAIL FROM:<sender@example.org>";
    // With PIPELINING the RSET rides with the next transaction: MAIL was already there when
    // it was answered. The refused transaction's pipelined DATA got 354 and an empty message.
    let pipelined = refused_then_accepted(&["PIPELINING"]).await;
    let verbs: Vec<&str> = pipelined.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        verbs,
        [
            "EHLO client.test",
            mail,
            "RCPT TO:<bad@example.net>",
            "DATA",
            "RSET",
            mail,
            "RCPT TO:<good@example.net>",
            "DATA",
            "QUIT",
        ]
    );
    assert!(pipelined[4].1, "{pipelined:?}");
    // Without it, RSET is a round trip of its own, and no DATA goes with the refused one.
    let plain = refused_then_accepted(&[]).await;
    let verbs: Vec<&str> = plain.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        verbs,
        [
            "EHLO client.test",
            mail,
            "RCPT TO:<bad@example.net>",
            "RSET",
            mail,
            "RCPT TO:<good@example.net>",
            "DATA",
            "QUIT",
        ]
    );
    assert!(!plain[3].1, "{plain:?}");
}

#[tokio::test]
async fn reply_554_after_data_fails_every_accepted_recipient() {
    let mut script = Script::new(&["PIPELINING"]).answer("RCPT TO:<b@", "450 4.2.1 mailbox busy");
    script.data_reply = "554 5.7.1 content rejected";
    let (mut conn, _) = connected(script).await;
    let outcomes = conn
        .send(
            &envelope(&["a@example.net", "b@example.net", "c@example.net"]),
            BODY,
        )
        .await
        .unwrap();
    for i in [0, 2] {
        match &outcomes[i] {
            RecipientOutcome::Failed(r) => assert_eq!(r.code, 554),
            other => panic!("{other:?}"),
        }
    }
    // The recipient refused at RCPT keeps its own reply.
    match &outcomes[1] {
        RecipientOutcome::Deferred(r) => assert_eq!(r.code, 450),
        other => panic!("{other:?}"),
    }
    conn.quit().await;
}

#[tokio::test]
async fn content_is_dot_stuffed_on_the_wire() {
    let (addr, record) = scripted(Script::new(&["PIPELINING"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let body = b".starts with a dot\r\nmiddle\r\n.\r\n..two\r\nno final line end";
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), body)
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
    assert_eq!(
        record.lock().unwrap().data,
        [b"..starts with a dot\r\nmiddle\r\n..\r\n...two\r\nno final line end\r\n.\r\n".to_vec()]
    );
}

/// Every line of `wire` (split after each LF), CRLF included, is at most 1000 octets.
fn assert_smtp_line_lengths(wire: &[u8]) {
    for line in wire.split_inclusive(|&b| b == b'\n') {
        assert!(
            line.len() <= 1000,
            "a line of {} octets reached the server",
            line.len()
        );
    }
}

#[tokio::test]
async fn long_lines_are_folded_on_the_wire() {
    // 5000 octets of words on one body line, and one of 5000 octets without whitespace.
    let words: String = "0123456789 ".repeat(455);
    let solid = "x".repeat(5000);
    let body = format!("Subject: long\r\n\r\n{words}\r\n{solid}\r\nend\r\n");
    assert!(words.len() >= 5000);

    // DATA.
    let (mut conn, record) = connected(Script::new(&["PIPELINING"])).await;
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), body.as_bytes())
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
    let data = record.lock().unwrap().data[0].clone();
    assert_smtp_line_lengths(&data);
    let text = String::from_utf8(data).unwrap();
    assert!(text.starts_with("Subject: long\r\n\r\n0123456789 "));
    assert!(text.ends_with("\r\nend\r\n.\r\n"));
    // Nothing lost: without the inserted breaks (CRLF before whitespace, and CRLF SP at hard
    // breaks) the content is the original.
    assert_eq!(
        text.trim_end_matches(".\r\n").replace("\r\n ", " ").len(),
        // One inserted space per hard break of the solid line: 998 octets, then 997 after
        // each inserted space, so 5 breaks for 5000 octets.
        body.len() + 5
    );

    // BDAT: the same folding, and the chunk size counts the folded content.
    let (mut conn, record) = connected(Script::new(&["PIPELINING", "CHUNKING"])).await;
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), body.as_bytes())
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert_smtp_line_lengths(&rec.data[0]);
    assert_eq!(
        rec.verbs()[3],
        format!("BDAT {} LAST", rec.data[0].len()),
        "BDAT counts the folded content"
    );
    assert!(rec.data[0].len() > body.len());
}

#[tokio::test]
async fn size_limit_fails_without_sending_the_message() {
    let (addr, record) = scripted(Script::new(&["PIPELINING", "SIZE 10"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let outcomes = conn
        .send(&envelope(&["a@example.net", "b@example.net"]), BODY)
        .await
        .unwrap();
    for o in &outcomes {
        match o {
            RecipientOutcome::Failed(r) => {
                assert_eq!(r.code, 552);
                assert_eq!(r.enhanced.unwrap().to_string(), "5.3.4");
            }
            other => panic!("{other:?}"),
        }
    }
    conn.quit().await;
    assert_eq!(record.lock().unwrap().verbs(), ["EHLO client.test", "QUIT"]);
}

#[tokio::test]
async fn smtputf8_needed_but_not_offered_fails_with_5_6_7() {
    let (addr, record) = scripted(Script::new(&["PIPELINING", "8BITMIME"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let mut env = envelope(&["jösé@example.net"]);
    env.smtputf8 = true;
    let outcomes = conn.send(&env, BODY).await.unwrap();
    match &outcomes[0] {
        RecipientOutcome::Failed(r) => assert_eq!(r.enhanced.unwrap().to_string(), "5.6.7"),
        other => panic!("{other:?}"),
    }
    conn.quit().await;
    assert_eq!(record.lock().unwrap().verbs(), ["EHLO client.test", "QUIT"]);
}

#[tokio::test]
async fn esmtp_parameters_follow_the_servers_extensions() {
    let (addr, record) =
        scripted(Script::new(&["PIPELINING", "8BITMIME", "SMTPUTF8", "DSN"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let mut env = envelope(&["jösé@example.net"]);
    env.smtputf8 = true;
    env.body_type = tern_message::BodyType::EightBitMime;
    env.ret = Some(tern_message::Ret::Hdrs);
    env.envid = Some("abc".into());
    env.recipients[0].notify = Some(tern_message::Notify {
        success: false,
        failure: true,
        delay: false,
    });
    env.recipients[0].orcpt = Some("rfc822;x@example.net".into());
    let outcomes = conn.send(&env, BODY).await.unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
    let verbs = record.lock().unwrap().verbs();
    assert_eq!(
        verbs[1..3],
        [
            "MAIL FROM:<sender@example.org> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=abc",
            "RCPT TO:<jösé@example.net> NOTIFY=FAILURE ORCPT=rfc822;x@example.net",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// STARTTLS.

/// A self-signed certificate for "localhost" and a server config serving it.
fn tls_server() -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .unwrap();
    (Arc::new(config), cert)
}

#[tokio::test]
async fn opportunistic_starttls_with_an_unverified_certificate() {
    let (server, _) = tls_server();
    let mut script = Script::new(&["PIPELINING", "STARTTLS"]);
    script.tls = Some(server);
    let (addr, record) = scripted(script).await;
    let mut cfg = config();
    cfg.tls = TlsPolicy::Opportunistic;
    // The certificate names "localhost", not this name, and no root trusts it: accepted anyway.
    let mut conn = SmtpConnection::connect(addr, "mx.elsewhere.test", &cfg)
        .await
        .unwrap();
    let tls = conn.tls().expect("TLS negotiated");
    assert!(tls.starts_with("TLSv1."), "{tls}");
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert!(rec.tls);
    // EHLO again after the handshake (RFC 3207 §4.2).
    assert_eq!(
        rec.verbs()[..3],
        ["EHLO client.test", "STARTTLS", "EHLO client.test"]
    );
    assert_eq!(rec.data.len(), 1);
}

#[tokio::test]
async fn opportunistic_without_starttls_stays_plaintext() {
    let (addr, _) = scripted(Script::new(&["PIPELINING"])).await;
    let mut cfg = config();
    cfg.tls = TlsPolicy::Opportunistic;
    let conn = SmtpConnection::connect(addr, "scripted.test", &cfg)
        .await
        .unwrap();
    assert_eq!(conn.tls(), None);
    conn.quit().await;
}

#[tokio::test]
async fn required_tls_verifies_against_the_configured_roots() {
    let (server, cert) = tls_server();
    let mut script = Script::new(&["STARTTLS"]);
    script.tls = Some(server.clone());
    let (addr, _) = scripted(script).await;
    let mut cfg = config();
    cfg.tls = TlsPolicy::Required;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    cfg.tls_roots = Arc::new(roots);
    let conn = SmtpConnection::connect(addr, "localhost", &cfg)
        .await
        .unwrap();
    assert!(conn.tls().is_some());
    conn.quit().await;

    // Same server, no root for it: the handshake fails, and there is no plaintext fallback.
    let mut script = Script::new(&["STARTTLS"]);
    script.tls = Some(server);
    let (addr, _) = scripted(script).await;
    cfg.tls_roots = Arc::new(rustls::RootCertStore::empty());
    let err = SmtpConnection::connect(addr, "localhost", &cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn required_tls_without_starttls_offered_is_tls_required() {
    let (addr, record) = scripted(Script::new(&["PIPELINING"])).await;
    let mut cfg = config();
    cfg.tls = TlsPolicy::Required;
    let err = SmtpConnection::connect(addr, "scripted.test", &cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::TlsRequired), "{err:?}");
    assert!(!err.is_permanent());
    assert!(!record
        .lock()
        .unwrap()
        .verbs()
        .iter()
        .any(|c| c.starts_with("MAIL")));
}

// ---------------------------------------------------------------------------------------------
// Postfix smtp-sink.

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// Kills smtp-sink when the test ends, pass or fail, and removes its dump directory.
struct Sink {
    child: Child,
    dir: PathBuf,
}

impl Sink {
    /// Everything smtp-sink captured so far (its `-D` dump, one file for all transactions).
    fn dump(&self) -> String {
        std::fs::read_to_string(self.dir.join("dump")).unwrap_or_default()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_smtp_sink() -> Option<(Sink, SocketAddr)> {
    if !std::path::Path::new(SMTP_SINK).exists() {
        // scripts/test.sh installs postfix; under CI a missing peer is a failure, not a skip, so
        // a green run cannot hide a missing install step.
        assert!(
            std::env::var_os("CI").is_none(),
            "{SMTP_SINK} is not installed (scripts/test.sh installs postfix); CI requires it"
        );
        eprintln!("SKIPPED: {SMTP_SINK} not installed (apt-get install postfix)");
        return None;
    }
    // A free port: bind, read it, release it for smtp-sink.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let root = Process::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    // The dump directory must be writable by the user smtp-sink switches to.
    let dir =
        std::env::temp_dir().join(format!("tern-delivery-sink-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = Process::new(SMTP_SINK);
    // As root smtp-sink insists on dropping privileges (`-u`), see smtp-sink(1).
    if root {
        cmd.args(["-u", "nobody"]);
    }
    cmd.arg("-D")
        .arg(dir.join("dump"))
        .arg(format!("127.0.0.1:{port}"))
        .arg("100")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = Sink {
        child: cmd.spawn().unwrap(),
        dir,
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Some((child, addr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("smtp-sink did not start listening on {addr}");
}

#[tokio::test]
async fn smtp_sink_takes_two_pipelined_messages_on_one_connection() {
    let Some((sink, addr)) = start_smtp_sink().await else {
        return;
    };
    let mut conn = SmtpConnection::connect(addr, "localhost", &config())
        .await
        .unwrap();
    assert!(conn.capabilities().has("PIPELINING"));
    let outcomes = conn
        .send(
            &envelope(&["a@example.net", "b@example.net", "c@example.net"]),
            b"Subject: one\r\n\r\n.dot\r\n",
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes.iter().all(delivered), "{outcomes:?}");
    conn.reset().await.unwrap();
    // smtp-sink offers DSN: the second message carries its parameters.
    let mut env = envelope(&["d@example.net"]);
    env.ret = Some(tern_message::Ret::Hdrs);
    env.envid = Some("id2".into());
    env.recipients[0].notify = Some(tern_message::Notify {
        success: true,
        failure: true,
        delay: false,
    });
    let outcomes = conn
        .send(&env, b"Subject: two\r\n\r\nbody\r\n")
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    conn.quit().await;
    // smtp-sink writes the dump as it goes; give it a moment to finish the second message.
    let mut dump = sink.dump();
    for _ in 0..40 {
        if dump.contains("body\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        dump = sink.dump();
    }
    assert!(
        dump.contains(
            "X-Mail-Args: <sender@example.org>\n\
             X-Rcpt-Args: <a@example.net>\n\
             X-Rcpt-Args: <b@example.net>\n\
             X-Rcpt-Args: <c@example.net>\n"
        ),
        "{dump}"
    );
    // smtp-sink removed the stuffed dot again: the line arrived as "..dot".
    assert!(dump.contains("Subject: one\n\n.dot\n"), "{dump}");
    assert!(
        dump.contains(
            "X-Mail-Args: <sender@example.org> RET=HDRS ENVID=id2\n\
             X-Rcpt-Args: <d@example.net> NOTIFY=SUCCESS,FAILURE\n"
        ),
        "{dump}"
    );
    assert!(dump.contains("Subject: two\n\nbody\n"), "{dump}");
}

#[tokio::test]
async fn reply_421_mid_transaction_defers_the_rest_and_ends_the_connection() {
    for pipelining in [true, false] {
        let ehlo: &[&str] = if pipelining { &["PIPELINING"] } else { &[] };
        let script = Script::new(ehlo)
            .answer("RCPT TO:<a@", "550 5.1.1 no such user")
            .answer("RCPT TO:<c@", "421 4.3.2 shutting down");
        let (mut conn, _) = connected(script).await;
        let outcomes = conn
            .send(
                &envelope(&["a@example.net", "b@example.net", "c@example.net"]),
                BODY,
            )
            .await
            .unwrap();
        assert!(
            matches!(&outcomes[0], RecipientOutcome::Failed(r) if r.code == 550),
            "{outcomes:?}"
        );
        // b was accepted but never got the content; c got the 421 itself.
        for o in &outcomes[1..] {
            assert!(
                matches!(o, RecipientOutcome::Deferred(r) if r.code == 421),
                "pipelining={pipelining}: {outcomes:?}"
            );
        }
        assert!(matches!(conn.reset().await, Err(DeliveryError::Broken)));
    }
}

#[tokio::test]
async fn greeting_554_is_a_permanent_greeting_error() {
    let mut script = Script::new(&[]);
    script.greeting = "554 5.3.2 no SMTP service here";
    let (addr, _) = scripted(script).await;
    let err = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeliveryError::Greeting(r) if r.code == 554),
        "{err:?}"
    );
    assert!(err.is_permanent());
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo_without_extensions() {
    let script = Script::new(&["PIPELINING"]).answer("EHLO", "502 5.5.1 what is EHLO");
    let (mut conn, record) = connected(script).await;
    assert!(!conn.capabilities().has("PIPELINING"));
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert_eq!(rec.verbs()[..2], ["EHLO client.test", "HELO client.test"]);
    assert!(rec.commands.iter().all(|(_, early)| !early));
}

#[tokio::test]
async fn bytes_after_the_starttls_reply_are_refused() {
    // Plaintext sent right behind the 220 would be read as if it came over TLS
    // (CVE-2011-0411): the client must not go on.
    let script = Script::new(&["STARTTLS"]).answer("STARTTLS", "220 2.0.0 go\r\n250 injected");
    let (addr, _) = scripted(script).await;
    let mut cfg = config();
    cfg.tls = TlsPolicy::Opportunistic;
    let err = SmtpConnection::connect(addr, "scripted.test", &cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn chunking_sends_one_bdat_last_chunk_without_stuffing() {
    let (addr, record) = scripted(Script::new(&["PIPELINING", "CHUNKING", "8BITMIME"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let body = b"Subject: x\r\n\r\n.dot\r\nno final line end";
    let outcomes = conn
        .send(&envelope(&["a@example.net", "b@example.net"]), body)
        .await
        .unwrap();
    assert!(outcomes.iter().all(delivered), "{outcomes:?}");
    conn.quit().await;
    let rec = record.lock().unwrap();
    let wire = b"Subject: x\r\n\r\n.dot\r\nno final line end\r\n".to_vec();
    assert_eq!(
        rec.verbs(),
        [
            "EHLO client.test",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<a@example.net>",
            "RCPT TO:<b@example.net>",
            &format!("BDAT {} LAST", wire.len()),
            "QUIT",
        ]
    );
    assert_eq!(rec.data, [wire]);
}

#[tokio::test]
async fn chunking_with_no_accepted_recipient_sends_no_content() {
    let script = Script::new(&["PIPELINING", "CHUNKING"]).answer("RCPT", "550 5.1.1 no");
    let (mut conn, record) = connected(script).await;
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    assert!(matches!(outcomes[0], RecipientOutcome::Failed(_)));
    conn.quit().await;
    let rec = record.lock().unwrap();
    // The RSET would ride with a next transaction; QUIT ends the open one anyway.
    assert_eq!(rec.verbs()[2..], ["RCPT TO:<a@example.net>", "QUIT"]);
    assert!(rec.data.is_empty());
}

#[tokio::test]
async fn binarymime_needs_chunking_and_binarymime() {
    let body = b"Subject: bin\r\n\r\n\x00\xff\r\n";
    let mut env = envelope(&["a@example.net"]);
    env.body_type = tern_message::BodyType::BinaryMime;

    let (addr, record) = scripted(Script::new(&["CHUNKING", "BINARYMIME"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let outcomes = conn.send(&env, body).await.unwrap();
    assert!(delivered(&outcomes[0]), "{outcomes:?}");
    conn.quit().await;
    {
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.verbs()[1],
            "MAIL FROM:<sender@example.org> BODY=BINARYMIME"
        );
        assert_eq!(rec.data, [body.to_vec()]);
    }

    // Without BINARYMIME the content cannot go as is: 5.6.3, nothing sent.
    let (addr, record) = scripted(Script::new(&["CHUNKING", "8BITMIME"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    let outcomes = conn.send(&env, body).await.unwrap();
    assert!(
        matches!(&outcomes[0], RecipientOutcome::Failed(r) if r.enhanced.unwrap().to_string() == "5.6.3"),
        "{outcomes:?}"
    );
    conn.quit().await;
    assert_eq!(record.lock().unwrap().verbs(), ["EHLO client.test", "QUIT"]);
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts the connection and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(tcp);
    });
    let mut cfg = config();
    cfg.command_timeout = Duration::from_millis(200);
    let started = std::time::Instant::now();
    let err = SmtpConnection::connect(addr, "scripted.test", &cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Timeout("greeting")), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    hold.abort();
}

#[tokio::test]
async fn a_server_silent_after_data_times_out_and_the_connection_is_done() {
    let mut script = Script::new(&["PIPELINING"]);
    script.data_reply = "";
    let (addr, _) = scripted(script).await;
    let mut cfg = config();
    cfg.data_timeout = Duration::from_millis(300);
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &cfg)
        .await
        .unwrap();
    let err = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeliveryError::Timeout("end of data")),
        "{err:?}"
    );
    assert!(matches!(
        conn.send(&envelope(&["a@example.net"]), BODY).await,
        Err(DeliveryError::Broken)
    ));
    let started = std::time::Instant::now();
    conn.quit().await;
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn pipelined_data_accepted_without_recipients_gets_an_empty_message() {
    // A sloppy server answers the pipelined DATA with 354 although it refused every RCPT:
    // RFC 2920 §3.1 has the client send just the terminating dot.
    let script = Script::new(&["PIPELINING"]).answer("RCPT", "550 5.1.1 no such user");
    let (mut conn, record) = connected(script).await;
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], RecipientOutcome::Failed(r) if r.code == 550),
        "{outcomes:?}"
    );
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert_eq!(rec.data, [b".\r\n".to_vec()]);
    // The RSET would ride with a next transaction; QUIT ends the open one anyway.
    assert_eq!(rec.verbs()[3..], ["DATA", "QUIT"]);
}

#[tokio::test]
async fn connects_over_ipv6_loopback() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    drop(probe);
    let (addr, _) = scripted_on("[::1]:0", Script::new(&["PIPELINING"])).await;
    let mut conn = SmtpConnection::connect(addr, "scripted.test", &config())
        .await
        .unwrap();
    assert_eq!(conn.peer(), addr);
    let outcomes = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    assert!(delivered(&outcomes[0]));
    conn.quit().await;
}

#[tokio::test]
async fn with_pipelining_the_rset_before_a_reused_transaction_rides_in_its_group() {
    let script = Script::new(&["PIPELINING", "8BITMIME"]);
    let (mut conn, record) = connected(script).await;
    for rcpt in ["a@example.net", "b@example.net"] {
        conn.reset().await.unwrap();
        let outcomes = conn.send(&envelope(&[rcpt]), BODY).await.unwrap();
        assert!(outcomes.iter().all(delivered), "{outcomes:?}");
    }
    conn.quit().await;
    let rec = record.lock().unwrap();
    assert_eq!(
        rec.verbs(),
        [
            "EHLO client.test",
            "RSET",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<a@example.net>",
            "DATA",
            "RSET",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<b@example.net>",
            "DATA",
            "QUIT",
        ]
    );
    // Each RSET was answered with its group's MAIL already there: no round trip of its own.
    assert!(rec.commands[1].1 && rec.commands[5].1, "{:?}", rec.commands);
    assert_eq!(rec.data.len(), 2);
}

#[tokio::test]
async fn a_refused_pipelined_rset_is_a_stale_connection_with_nothing_settled() {
    let script = Script::new(&["PIPELINING"]).answer("RSET", "421 4.4.2 idle too long");
    let (mut conn, record) = connected(script).await;
    let first = conn
        .send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    assert!(first.iter().all(delivered), "{first:?}");
    conn.reset().await.unwrap();
    match conn.send(&envelope(&["b@example.net"]), BODY).await {
        Err(DeliveryError::StaleConnection(why)) => assert!(why.contains("421"), "{why}"),
        other => panic!("expected a stale connection, got {other:?}"),
    }
    // The connection is done with.
    assert!(matches!(
        conn.send(&envelope(&["b@example.net"]), BODY).await,
        Err(DeliveryError::Broken)
    ));
    // No content went after the refused RSET: only the first message's.
    assert_eq!(record.lock().unwrap().data.len(), 1);
}

#[tokio::test]
async fn a_closed_connection_found_at_the_pipelined_rset_is_stale() {
    // The server answers one message, then closes (as one with a short idle timeout would).
    let script = Script::new(&["PIPELINING"]).answer("RSET", CLOSE);
    let (mut conn, _record) = connected(script).await;
    conn.send(&envelope(&["a@example.net"]), BODY)
        .await
        .unwrap();
    conn.reset().await.unwrap();
    assert!(matches!(
        conn.send(&envelope(&["b@example.net"]), BODY).await,
        Err(DeliveryError::StaleConnection(_))
    ));
}
