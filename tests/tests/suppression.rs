//! The suppression list end to end: `tern suppress` over the admin API, RCPT refusals for
//! submitters, the "drop" action, and addresses added by a hard bounce during delivery.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Output;
use std::time::Duration;

use tern_tests::sink::{Sink, SinkConfig};
use tern_tests::{queued_id, tern_cmd, SmtpClient, TernServer};

const WAIT: Duration = Duration::from_secs(15);

fn suppress(server: &TernServer, args: &[&str]) -> Output {
    let http = server.http.to_string();
    let mut all = vec!["suppress", "--http", &http];
    all.extend_from_slice(args);
    tern_cmd(&all)
}

#[track_caller]
fn suppress_ok(server: &TernServer, args: &[&str]) -> String {
    let out = suppress(server, args);
    assert!(
        out.status.success(),
        "tern suppress {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rcpt(c: &mut SmtpClient, to: &str) -> tern_tests::Reply {
    c.cmd(&format!("RCPT TO:<{to}>"))
}

#[test]
fn suppressed_recipients_are_refused_for_submitters_only() {
    let server = TernServer::builder()
        .relay_networks(&["127.0.0.1/32"])
        .relay_domains(&["example.net"])
        .start();
    suppress_ok(
        &server,
        &["add", "Bob@Example.net", "--reason", "unsubscribed"],
    );
    let list = suppress_ok(&server, &["list"]);
    assert!(
        list.contains("bob@example.net\tmanual\tunsubscribed"),
        "{list}"
    );

    // A submitter (trusted network) is told at once.
    let mut c = server.session();
    c.cmd("MAIL FROM:<news@client.test>").expect_code(250);
    rcpt(&mut c, "BOB@example.net").expect("550", "5.1.1");
    rcpt(&mut c, "carol@example.net").expect_code(250);

    // Inbound mail from a stranger to a domain we serve is not the list's business.
    let mut s = SmtpClient::connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), server.smtp);
    s.read_reply().expect_code(220);
    s.ehlo("mail.other.test").expect_code(250);
    s.cmd("MAIL FROM:<friend@other.test>").expect_code(250);
    rcpt(&mut s, "bob@example.net").expect_code(250);

    suppress_ok(&server, &["remove", "bob@example.net"]);
    let mut c = server.session();
    c.cmd("MAIL FROM:<news@client.test>").expect_code(250);
    rcpt(&mut c, "bob@example.net").expect_code(250);
    let out = suppress(&server, &["remove", "bob@example.net"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on the suppression list"));
}

#[test]
fn import_adds_every_line_and_names_a_bad_one() {
    let server = TernServer::start();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("list.csv");
    std::fs::write(
        &good,
        "# exported from the old ESP\na@x.test,complaint\n\nb@x.test hard bounce\nc@x.test\n",
    )
    .unwrap();
    let out = suppress_ok(&server, &["import", good.to_str().unwrap()]);
    assert!(out.contains("3 address(es) imported"), "{out}");
    let list = suppress_ok(&server, &["list"]);
    assert!(list.contains("a@x.test\timport\tcomplaint"), "{list}");
    assert!(list.contains("b@x.test\timport\thard bounce"), "{list}");
    assert!(list.contains("c@x.test\timport\t"), "{list}");

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "d@x.test\nnot-an-address\n").unwrap();
    let out = suppress(&server, &["import", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("not-an-address"),
        "{err}"
    );
    assert!(
        !suppress_ok(&server, &["list"]).contains("d@x.test"),
        "nothing from a bad file"
    );
}

#[test]
fn drop_action_answers_250_and_leaves_the_recipient_out() {
    let server = TernServer::builder()
        .set("policy.suppression_action", "drop")
        .start();
    suppress_ok(&server, &["add", "gone@example.net"]);
    let mut c = server.session();
    // Only suppressed recipients: 250 all the way, nothing stored.
    c.cmd("MAIL FROM:<news@client.test>").expect_code(250);
    rcpt(&mut c, "gone@example.net").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send("Subject: x\r\n\r\nx\r\n.\r\n");
    queued_id(&c.read_reply());
    assert_eq!(server.queued(), 0);
    // Mixed: the message is stored for the others only.
    c.cmd("MAIL FROM:<news@client.test>").expect_code(250);
    rcpt(&mut c, "gone@example.net").expect_code(250);
    rcpt(&mut c, "here@example.net").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send("Subject: y\r\n\r\ny\r\n.\r\n");
    queued_id(&c.read_reply());
    assert_eq!(server.queued(), 1);
    let mut server = server;
    server.stop();
    let spooled = server.spool_list();
    assert_eq!(spooled[0].recipients, ["here@example.net"]);
}

#[test]
fn a_hard_bounce_puts_the_address_on_the_list() {
    let remote = Sink::start(SinkConfig {
        rcpt_replies: vec![(
            "nobody@example.net".into(),
            vec!["550 5.1.1 no such user".into()],
        )],
        ..SinkConfig::default()
    });
    let server = TernServer::builder()
        .set("delivery.enabled", true)
        .route("*", Some(&remote.addr().to_string()), "none")
        .start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<>").expect_code(250);
    rcpt(&mut c, "nobody@example.net").expect_code(250);
    c.cmd("DATA").expect_code(354);
    c.send("Subject: x\r\n\r\nx\r\n.\r\n");
    queued_id(&c.read_reply());
    server.wait_event("failed", "nobody@example.net", WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = suppress_ok(&server, &["list"]);
        if list.contains("nobody@example.net\tbounce\t550 5.1.1 no such user") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not suppressed: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = server.session();
    c.cmd("MAIL FROM:<news@client.test>").expect_code(250);
    rcpt(&mut c, "nobody@example.net").expect("550", "5.1.1");
}
