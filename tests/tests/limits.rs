//! Limits and error handling: line lengths, message size, recipient count, error count, timeouts
//! and connection limits. Each test configures the limit it checks and watches the reply.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tern_tests::{queued_id, SmtpClient, TernServer};

fn lo(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

#[test]
fn command_line_over_512_is_500_5_5_2_and_the_session_survives() {
    let server = TernServer::start();
    let mut c = server.session();
    let long = format!("NOOP {}", "x".repeat(600));
    c.cmd(&long).expect("500", "5.5.2");
    c.cmd("NOOP").expect("250", "2.0.0");
}

#[test]
fn a_huge_line_without_crlf_is_500_5_5_2_not_buffered_forever() {
    let server = TernServer::start();
    let mut c = server.session();
    // 1 MiB with no line end, then the line end: the server must not keep it all, and must
    // answer the over-long line with 500 5.5.2 (and may close).
    let big = vec![b'x'; 1 << 20];
    let _ = c.try_send(&big);
    let _ = c.try_send(b"\r\n");
    let r = c.read_reply();
    r.expect("500", "5.5.2");
    if let Ok(r) = c.try_send(b"NOOP\r\n").and_then(|_| c.try_read_reply()) {
        // If the session goes on, it is in sync again.
        r.expect("250", "2.0.0");
    }
}

#[test]
fn command_line_of_512_octets_is_fine() {
    let server = TernServer::start();
    let mut c = server.session();
    // 512 octets including CRLF (RFC 5321 §4.5.3.1.4).
    let line = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert_eq!(line.len() + 2, 512);
    c.cmd(&line).expect("250", "2.0.0");
}

/// A mailbox of maximal legal size (RFC 5321 §4.5.3.1: local part 64, path 256 octets).
fn longest_mailbox(c: char) -> String {
    let domain = format!(
        "{}.{}.{}.test",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(50)
    );
    format!("{}@{domain}", c.to_string().repeat(64))
}

#[test]
fn maximal_mail_command_with_every_parameter_is_accepted() {
    // Longest legal path plus SIZE, BODY, RET and a 100-character ENVID (RFC 3461 §4.4).
    let server = TernServer::start();
    let mut c = server.session();
    let mail = format!(
        "MAIL FROM:<{}> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID={}",
        longest_mailbox('s'),
        "E".repeat(100)
    );
    c.cmd(&mail).expect("250", "2");
}

#[test]
fn rcpt_with_dsn_parameters_may_exceed_512() {
    // RFC 5321 §4.5.3.1.4 / RFC 3461 §5: extension parameters add to the 512-octet limit;
    // ORCPT alone may be 500 characters.
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    let orcpt = format!("rfc822;{}", longest_mailbox('o'));
    let rcpt = format!(
        "RCPT TO:<{}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}",
        longest_mailbox('r')
    );
    assert!(rcpt.len() + 2 > 512, "{}", rcpt.len());
    c.cmd(&rcpt).expect("250", "2");
}

#[test]
fn mail_line_beyond_the_parameter_allowance_is_500_5_5_2() {
    let server = TernServer::start();
    let mut c = server.session();
    let line = format!("MAIL FROM:<a@client.test> ENVID={}", "E".repeat(2000));
    c.cmd(&line).expect("500", "5.5.2");
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
}

#[test]
fn a_command_trickled_byte_by_byte_still_times_out() {
    // The command timeout bounds the whole line, not each read: a client sending one byte per
    // second cannot hold the session (slowloris).
    let server = TernServer::builder()
        .set("limits.command_timeout", "2s")
        .start();
    let mut c = server.session();
    let t0 = Instant::now();
    let mut answered = None;
    for b in b"NOOP but very slowly ...........".iter() {
        if c.try_send(&[*b]).is_err() {
            break;
        }
        if let Some(r) = c.reply_within(Duration::from_millis(500)) {
            answered = Some(r);
            break;
        }
        if t0.elapsed() > Duration::from_secs(12) {
            break;
        }
    }
    let r = answered.unwrap_or_else(|| panic!("no reply while trickling for {:?}", t0.elapsed()));
    r.expect("421", "4.4.2");
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "timed out only after {:?}",
        t0.elapsed()
    );
}

#[test]
fn data_lines_over_998_are_accepted_up_to_the_data_line_limit() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send(format!(
        "Subject: long line\r\n\r\n{}\r\n{}\r\n.\r\n",
        "a".repeat(2000),
        "b".repeat(60000)
    ));
    queued_id(&c.read_reply());
}

#[test]
fn data_line_over_the_limit_rejects_the_message_with_500_5_5_2() {
    let mut server = TernServer::builder().set("limits.data_line", 4096).start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send(format!(
        "Subject: too long\r\n\r\n{}\r\nafter\r\n.\r\n",
        "z".repeat(5000)
    ));
    // One reply, at the real end of the data.
    c.read_reply().expect("500", "5.5.2");
    c.cmd("NOOP").expect("250", "2.0.0");
    c.cmd("QUIT").expect("221", "2.0.0");
    server.stop();
    assert!(
        server.spool_list().is_empty(),
        "rejected message must not be spooled"
    );
}

#[test]
fn declared_size_over_the_limit_is_552_5_3_4() {
    let server = TernServer::builder()
        .set("limits.message_size", 10000)
        .start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test> SIZE=20000")
        .expect("552", "5.3.4");
    c.cmd("MAIL FROM:<a@client.test> SIZE=9000")
        .expect("250", "2");
}

#[test]
fn actual_size_over_the_limit_is_552_5_3_4() {
    let mut server = TernServer::builder()
        .set("limits.message_size", 10000)
        .start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    let mut body = String::from("Subject: big\r\n\r\n");
    for _ in 0..300 {
        body.push_str(&"y".repeat(78));
        body.push_str("\r\n");
    }
    c.send(format!("{body}.\r\n"));
    c.read_reply().expect("552", "5.3.4");
    c.cmd("NOOP").expect("250", "2.0.0");
    server.stop();
    assert!(
        server.spool_list().is_empty(),
        "oversized message must not be spooled"
    );
}

#[test]
fn bdat_over_the_size_limit_is_552_5_3_4() {
    let server = TernServer::builder()
        .set("limits.message_size", 10000)
        .start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    let chunk = vec![b'x'; 20000];
    c.send([b"BDAT 20000 LAST\r\n".as_slice(), &chunk].concat());
    c.read_reply().expect("552", "5.3.4");
}

#[test]
fn too_many_recipients_is_452_4_5_3_and_the_rest_are_kept() {
    let mut server = TernServer::builder().set("limits.recipients", 3).start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    for i in 0..3 {
        c.cmd(&format!("RCPT TO:<r{i}@elsewhere.test>"))
            .expect("250", "2");
    }
    c.cmd("RCPT TO:<r3@elsewhere.test>").expect("452", "4.5.3");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: three\r\n\r\nbody\r\n.\r\n");
    let id = queued_id(&c.read_reply());
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == id).expect("spooled");
    assert_eq!(
        e.recipients,
        vec![
            "r0@elsewhere.test",
            "r1@elsewhere.test",
            "r2@elsewhere.test"
        ]
    );
}

#[test]
fn too_many_errors_is_421_4_7_0_and_close() {
    let errors = 3;
    let server = TernServer::builder().set("limits.errors", errors).start();
    let mut c = server.session();
    let mut got_421_at = None;
    for i in 1..=errors + 1 {
        let r = match c.try_read_reply_after(&format!("BOGUS{i}")) {
            Some(r) => r,
            None => break,
        };
        if r.code == 421 {
            r.expect("421", "4.7.0");
            got_421_at = Some(i);
            break;
        }
        r.expect("500", "5.5.1");
    }
    let at = got_421_at.unwrap_or_else(|| {
        panic!(
            "no 421 after {} bad commands: {:?}",
            errors + 1,
            c.transcript
        )
    });
    assert!(
        at >= errors,
        "421 after only {at} bad commands (limit {errors})"
    );
    c.expect_closed(Duration::from_secs(5));
}

#[test]
fn idle_client_gets_421_4_4_2_and_is_closed() {
    let server = TernServer::builder()
        .set("limits.command_timeout", "2s")
        .start();
    let mut c = server.session();
    let t0 = Instant::now();
    c.set_timeout(Duration::from_secs(20));
    let r = c.read_reply();
    r.expect("421", "4.4.2");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "timed out too early: {waited:?}"
    );
    c.expect_closed(Duration::from_secs(5));
}

#[test]
fn stalled_data_gets_421_4_4_2() {
    let server = TernServer::builder()
        .set("limits.data_timeout", "2s")
        .start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: stall\r\n\r\npartial");
    c.set_timeout(Duration::from_secs(20));
    c.read_reply().expect("421", "4.4.2");
    c.expect_closed(Duration::from_secs(5));
}

#[test]
fn max_connections_turns_away_the_next_client_with_421_4_7_0() {
    let server = TernServer::builder().set("smtp.max_connections", 3).start();
    let mut held: Vec<SmtpClient> = (0..3)
        .map(|i| {
            let mut c = SmtpClient::connect_from(lo(10 + i), server.smtp);
            c.read_reply().expect_code(220);
            c
        })
        .collect();
    let mut extra = SmtpClient::connect_from(lo(20), server.smtp);
    extra.read_reply().expect("421", "4.7.0");
    extra.expect_closed(Duration::from_secs(5));
    // Closing one session frees its slot.
    held.pop().unwrap().cmd("QUIT").expect("221", "2.0.0");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = SmtpClient::connect_from(lo(21), server.smtp);
        let r = c.read_reply();
        if r.code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn max_connections_per_ip_counts_each_source_address() {
    let server = TernServer::builder()
        .set("smtp.max_connections_per_ip", 2)
        .start();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = SmtpClient::connect_from(lo(30), server.smtp);
        c.read_reply().expect_code(220);
        held.push(c);
    }
    let mut third = SmtpClient::connect_from(lo(30), server.smtp);
    third.read_reply().expect("421", "4.7.0");
    third.expect_closed(Duration::from_secs(5));
    // Another address is not affected.
    let mut other = SmtpClient::connect_from(lo(31), server.smtp);
    other.read_reply().expect_code(220);
    other.cmd("EHLO other.test").expect_code(250);
}

/// Extension for the error-count test: send a command, read one reply, `None` on EOF.
trait SendRead {
    fn try_read_reply_after(&mut self, line: &str) -> Option<tern_tests::Reply>;
}

impl SendRead for SmtpClient {
    fn try_read_reply_after(&mut self, line: &str) -> Option<tern_tests::Reply> {
        self.try_send(format!("{line}\r\n").as_bytes()).ok()?;
        self.try_read_reply().ok()
    }
}

/// A message that already carries `n` Received fields (ours makes it n + 1).
fn with_hops(c: &mut SmtpClient, n: usize) -> tern_tests::Reply {
    c.cmd("MAIL FROM:<a@client.test>").expect_code(250);
    c.cmd("RCPT TO:<b@example.net>").expect_code(250);
    c.cmd("DATA").expect_code(354);
    let mut msg = String::new();
    for i in 0..n {
        msg.push_str(&format!(
            "Received: from hop{i}.test by hop{}.test; Sun, 22 Nov 2026 10:00:00 +0000\r\n",
            i + 1
        ));
    }
    msg.push_str("Subject: loop\r\n\r\nbody\r\n.\r\n");
    c.send(msg);
    c.read_reply()
}

#[test]
fn a_message_over_the_hop_limit_is_refused_as_a_loop() {
    let server = TernServer::start();
    let mut c = server.session();
    // 49 + ours = 50: at the limit, accepted.
    queued_id(&with_hops(&mut c, 49));
    // 50 + ours = 51: a loop.
    with_hops(&mut c, 50).expect("554", "5.4.6");
    // The session goes on.
    c.cmd("NOOP").expect_code(250);
    assert_eq!(server.queued(), 1);
}
