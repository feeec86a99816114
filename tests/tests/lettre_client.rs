//! lettre (a real async Rust SMTP client, rustls with ring) against the real server: plain SMTP,
//! STARTTLS + AUTH on submission, implicit TLS on submissions, SMTPUTF8, failures.

use lettre::address::Envelope;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tern_tests::TernServer;

type Transport = AsyncSmtpTransport<Tokio1Executor>;

fn tls_params() -> TlsParameters {
    TlsParameters::builder("tern.test".to_string())
        .certificate_store(CertificateStore::None)
        .dangerous_accept_invalid_certs(true)
        .build_rustls()
        .expect("tls parameters")
}

fn transport(port: u16, tls: Tls, creds: Option<(&str, &str, Mechanism)>) -> Transport {
    let mut b = Transport::builder_dangerous("127.0.0.1")
        .port(port)
        .hello_name(ClientId::Domain("lettre.client.test".into()))
        .tls(tls)
        .timeout(Some(std::time::Duration::from_secs(30)));
    if let Some((user, pass, mech)) = creds {
        b = b
            .credentials(Credentials::new(user.into(), pass.into()))
            .authentication(vec![mech]);
    }
    b.build()
}

fn message(from: &str, to: &str, subject: &str) -> Message {
    Message::builder()
        .from(from.parse::<Mailbox>().unwrap())
        .to(to.parse::<Mailbox>().unwrap())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(String::from(
            "Sent by lettre from the Tern test suite.\nSecond line.\n",
        ))
        .unwrap()
}

fn assert_queued(resp: &lettre::transport::smtp::response::Response) -> String {
    assert!(resp.is_positive(), "{resp:?}");
    assert_eq!(resp.code().to_string(), "250");
    let text: Vec<&str> = resp.message().collect();
    let line = text.join(" ");
    assert!(line.starts_with("2.0.0"), "enhanced code in {line:?}");
    let id = line
        .split("queued as ")
        .nth(1)
        .unwrap_or_else(|| panic!("no queue id in {line:?}"));
    id.trim().to_string()
}

#[tokio::test]
async fn lettre_plain_smtp_send() {
    let mut server = TernServer::start();
    let t = transport(server.smtp.port(), Tls::None, None);
    assert!(t.test_connection().await.expect("test_connection"));
    let resp = t
        .send(message(
            "Lettre Sender <sender@client.test>",
            "Rcpt <rcpt@elsewhere.test>",
            "lettre plain",
        ))
        .await
        .expect("send");
    let id = assert_queued(&resp);
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == id).expect("spooled");
    assert_eq!(e.sender, "sender@client.test");
    assert_eq!(e.recipients, vec!["rcpt@elsewhere.test"]);
}

#[tokio::test]
async fn lettre_opportunistic_starttls_on_port_25_listener() {
    let server = TernServer::start();
    let t = transport(server.smtp.port(), Tls::Required(tls_params()), None);
    let resp = t
        .send(message(
            "sender@client.test",
            "rcpt@elsewhere.test",
            "lettre starttls",
        ))
        .await
        .expect("send over STARTTLS");
    assert_queued(&resp);
}

#[tokio::test]
async fn lettre_starttls_auth_plain_on_submission() {
    let server = TernServer::builder().user("alice", "s3cret pass").start();
    let t = transport(
        server.submission.port(),
        Tls::Required(tls_params()),
        Some(("alice", "s3cret pass", Mechanism::Plain)),
    );
    let resp = t
        .send(message(
            "alice@client.test",
            "bob@elsewhere.test",
            "lettre submission",
        ))
        .await
        .expect("send");
    assert_queued(&resp);
}

#[tokio::test]
async fn lettre_implicit_tls_auth_login_on_submissions() {
    let server = TernServer::builder().user("alice", "secret").start();
    let t = transport(
        server.submissions.port(),
        Tls::Wrapper(tls_params()),
        Some(("alice", "secret", Mechanism::Login)),
    );
    let resp = t
        .send(message(
            "alice@client.test",
            "bob@elsewhere.test",
            "lettre submissions",
        ))
        .await
        .expect("send");
    assert_queued(&resp);
}

#[tokio::test]
async fn lettre_wrong_password_is_a_permanent_error() {
    let server = TernServer::builder().user("alice", "secret").start();
    let t = transport(
        server.submission.port(),
        Tls::Required(tls_params()),
        Some(("alice", "wrong", Mechanism::Plain)),
    );
    let err = t
        .send(message("alice@client.test", "bob@elsewhere.test", "nope"))
        .await
        .expect_err("wrong password must fail");
    assert!(err.is_permanent(), "{err:?}");
    assert_eq!(
        err.status().map(|c| c.to_string()).as_deref(),
        Some("535"),
        "{err:?}"
    );
}

#[tokio::test]
async fn lettre_relay_denied_is_554() {
    let server = TernServer::builder()
        .relay_networks(&["192.0.2.0/24"])
        .start();
    let t = transport(server.smtp.port(), Tls::None, None);
    let err = t
        .send(message("a@client.test", "victim@elsewhere.test", "relay"))
        .await
        .expect_err("relay must be denied");
    assert!(err.is_permanent(), "{err:?}");
    assert_eq!(
        err.status().map(|c| c.to_string()).as_deref(),
        Some("554"),
        "{err:?}"
    );
}

#[tokio::test]
async fn lettre_many_recipients_and_utf8_subject() {
    let mut server = TernServer::start();
    let t = transport(server.smtp.port(), Tls::None, None);
    let mut b = Message::builder()
        .from("sender@client.test".parse::<Mailbox>().unwrap())
        .subject("Grüße — 多くの受信者");
    let rcpts: Vec<String> = (0..50).map(|i| format!("r{i}@elsewhere.test")).collect();
    for r in &rcpts {
        b = b.to(r.parse::<Mailbox>().unwrap());
    }
    let resp = t
        .send(b.body(String::from("ünïcödé body\n")).unwrap())
        .await
        .expect("send");
    let id = assert_queued(&resp);
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == id).expect("spooled");
    assert_eq!(e.recipients, rcpts);
}

#[tokio::test]
async fn lettre_smtputf8_envelope() {
    let mut server = TernServer::start();
    let t = transport(server.smtp.port(), Tls::None, None);
    let from: lettre::Address = "josé@client.test".parse().unwrap();
    let to: lettre::Address = "用户@elsewhere.test".parse().unwrap();
    let env = Envelope::new(Some(from), vec![to]).unwrap();
    let raw = "From: =?utf-8?q?jos=C3=A9?= <x@client.test>\r\nSubject: utf8\r\n\r\nbody\r\n";
    let resp = t.send_raw(&env, raw.as_bytes()).await.expect("send_raw");
    let id = assert_queued(&resp);
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == id).expect("spooled");
    assert_eq!(e.sender, "josé@client.test");
    assert_eq!(e.recipients, vec!["用户@elsewhere.test"]);
}
