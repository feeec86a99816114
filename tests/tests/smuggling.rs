//! SMTP smuggling (CVE-2023-51764/5/6): only <CRLF>.<CRLF> ends DATA. Each variant of a fake
//! end-of-data is followed by a smuggled transaction; it must never be executed. With the default
//! `bare_line_endings = "reject"` the whole message is refused with 550 5.6.0 at the real end;
//! with `"normalize"` it is accepted as one message whose lines end in CRLF.
//!
//! The data goes out in several TCP writes (TCP_NODELAY, pauses between writes) split in
//! different places, so the server sees the fake terminator inside one read, at a read boundary,
//! and byte by byte.

use std::time::Duration;

use tern_tests::{queued_id, split_received, SmtpClient, TernServer};

const PAUSE: Duration = Duration::from_millis(40);

/// The smuggled transaction that follows a fake end-of-data.
const SMUGGLED: &str = "MAIL FROM:<admin@client.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n";

/// Ways to cut `head | fake | tail` into writes.
#[derive(Clone, Copy, Debug)]
enum Split {
    /// Everything in one write.
    OneWrite,
    /// A write boundary right before and right after the fake terminator.
    AroundFake,
    /// The fake terminator itself split after its first byte.
    InsideFake,
    /// The fake terminator and its neighbours one byte per write.
    ByteByByte,
}

const SPLITS: [Split; 4] = [
    Split::OneWrite,
    Split::AroundFake,
    Split::InsideFake,
    Split::ByteByByte,
];

fn pieces(head: &[u8], fake: &[u8], tail: &[u8], split: Split) -> Vec<Vec<u8>> {
    match split {
        Split::OneWrite => vec![[head, fake, tail].concat()],
        Split::AroundFake => vec![head.to_vec(), fake.to_vec(), tail.to_vec()],
        Split::InsideFake => vec![[head, &fake[..1]].concat(), [&fake[1..], tail].concat()],
        Split::ByteByByte => {
            let (h1, h2) = head.split_at(head.len() - 2);
            let (t1, t2) = tail.split_at(2);
            let mut v = vec![h1.to_vec()];
            v.extend(h2.iter().chain(fake).chain(t1).map(|b| vec![*b]));
            v.push(t2.to_vec());
            v
        }
    }
}

fn open_data(server: &TernServer) -> SmtpClient {
    let mut c = server.session();
    c.cmd("MAIL FROM:<alice@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<bob@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c
}

fn send_pieces(c: &mut SmtpClient, pieces: &[Vec<u8>]) {
    let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    c.send_split(&refs, PAUSE);
}

/// Default policy: the message with a bare line ending is refused once, at the real end, and
/// nothing of the smuggled transaction runs.
fn rejects(fake: &[u8]) {
    let mut server = TernServer::start();
    for split in SPLITS {
        let mut c = open_data(&server);
        let head = b"Subject: legit\r\n\r\nlegit body";
        let tail = [SMUGGLED.as_bytes(), b"\r\n.\r\n"].concat();
        send_pieces(&mut c, &pieces(head, fake, &tail, split));
        let r = c.read_reply();
        assert!(
            r.code == 550,
            "{split:?} {fake:?}: expected one 550 5.6.0 at the real end, got {r} (transcript {:?})",
            c.transcript
        );
        r.expect("550", "5.6.0");
        // Nothing else is pending: no reply to a smuggled MAIL/RCPT/DATA.
        if let Some(extra) = c.reply_within(Duration::from_millis(300)) {
            panic!("{split:?} {fake:?}: extra reply after the 550 — smuggled command executed? {extra}");
        }
        // The session is back in the command state, with no transaction open.
        c.cmd("NOOP").expect("250", "2.0.0");
        c.cmd("RCPT TO:<x@elsewhere.test>").expect("503", "5.5.1");
        c.cmd("QUIT").expect("221", "2.0.0");
    }
    server.stop();
    let spool = server.spool_list();
    assert!(
        spool.is_empty(),
        "{fake:?}: nothing may be spooled: {spool:?}"
    );
}

/// `normalize`: the bare line ending becomes CRLF, the fake terminator and the smuggled commands
/// are plain message content, and exactly one message (the legit one) is queued per attempt.
fn normalizes(fake: &[u8]) {
    let mut server = TernServer::builder()
        .set("smtp.bare_line_endings", "normalize")
        .start();
    let mut ids = Vec::new();
    for split in SPLITS {
        let mut c = open_data(&server);
        let head = b"Subject: legit\r\n\r\nlegit body";
        let tail = [SMUGGLED.as_bytes(), b"\r\n.\r\n"].concat();
        send_pieces(&mut c, &pieces(head, fake, &tail, split));
        let r = c.read_reply();
        let id = queued_id(&r);
        if let Some(extra) = c.reply_within(Duration::from_millis(300)) {
            panic!("{split:?} {fake:?}: extra reply after the 250 — smuggled command executed? {extra}");
        }
        c.cmd("NOOP").expect("250", "2.0.0");
        c.cmd("QUIT").expect("221", "2.0.0");
        ids.push(id);
    }
    server.stop();
    let spool = server.spool_list();
    assert_eq!(
        spool.len(),
        SPLITS.len(),
        "{fake:?}: one message per attempt: {spool:?}"
    );
    for e in &spool {
        assert!(ids.contains(&e.id), "unexpected spooled message {e:?}");
        assert_eq!(
            e.sender, "alice@client.test",
            "smuggled sender spooled: {e:?}"
        );
        assert_eq!(
            e.recipients,
            vec!["bob@elsewhere.test"],
            "smuggled recipient spooled: {e:?}"
        );
        // The smuggled commands are message content, and every line ends in CRLF.
        let (_, body) = split_received(&server.spooled_text(&e.id));
        assert!(
            body.contains("\r\nMAIL FROM:<admin@client.test>\r\n"),
            "{fake:?}: {body:?}"
        );
        assert!(
            body.ends_with("smuggled body\r\n\r\n"),
            "{fake:?}: {body:?}"
        );
        let bytes = body.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            match b {
                b'\n' => assert!(
                    i > 0 && bytes[i - 1] == b'\r',
                    "{fake:?}: bare LF at {i} in {body:?}"
                ),
                b'\r' => assert!(
                    bytes.get(i + 1) == Some(&b'\n'),
                    "{fake:?}: bare CR at {i} in {body:?}"
                ),
                _ => {}
            }
        }
    }
}

#[test]
fn lf_dot_lf_is_not_end_of_data_and_is_rejected() {
    rejects(b"\n.\n");
}

#[test]
fn lf_dot_crlf_is_not_end_of_data_and_is_rejected() {
    rejects(b"\n.\r\n");
}

#[test]
fn cr_dot_crlf_is_not_end_of_data_and_is_rejected() {
    rejects(b"\r.\r\n");
}

#[test]
fn cr_dot_cr_is_not_end_of_data_and_is_rejected() {
    rejects(b"\r.\r");
}

#[test]
fn crlf_dot_lf_is_not_end_of_data_and_is_rejected() {
    rejects(b"\r\n.\n");
}

#[test]
fn lf_dot_lf_is_normalized_into_the_message() {
    normalizes(b"\n.\n");
}

#[test]
fn lf_dot_crlf_is_normalized_into_the_message() {
    normalizes(b"\n.\r\n");
}

#[test]
fn cr_dot_crlf_is_normalized_into_the_message() {
    normalizes(b"\r.\r\n");
}

#[test]
fn cr_dot_cr_is_normalized_into_the_message() {
    normalizes(b"\r.\r");
}

#[test]
fn bare_lf_in_an_ordinary_line_is_550_5_6_0() {
    let mut server = TernServer::start();
    let mut c = open_data(&server);
    c.send("Subject: bare lf\r\n\r\nline one\nline two\r\n.\r\n");
    c.read_reply().expect("550", "5.6.0");
    c.cmd("NOOP").expect("250", "2.0.0");
    let mut c = open_data(&server);
    c.send("Subject: bare cr\r\n\r\nline one\rline two\r\n.\r\n");
    c.read_reply().expect("550", "5.6.0");
    server.stop();
    assert!(server.spool_list().is_empty());
}

#[test]
fn bare_lf_in_an_ordinary_line_is_normalized() {
    let mut server = TernServer::builder()
        .set("smtp.bare_line_endings", "normalize")
        .start();
    let mut c = open_data(&server);
    c.send("Subject: bare lf\r\n\r\nline one\nline two\r\n.\r\n");
    let id = queued_id(&c.read_reply());
    server.stop();
    let spool = server.spool_list();
    assert!(spool.iter().any(|e| e.id == id), "{spool:?}");
    let (_, stored) = split_received(&server.spooled_text(&id));
    assert_eq!(stored, "Subject: bare lf\r\n\r\nline one\r\nline two\r\n");
}

#[test]
fn a_real_end_of_data_followed_by_pipelined_commands_runs_them() {
    // Control for the tests above: after a genuine <CRLF>.<CRLF> the next transaction in the
    // same write is legitimate pipelining and must be executed.
    let mut server = TernServer::start();
    let mut c = open_data(&server);
    c.send("Subject: first\r\n\r\nbody\r\n.\r\nMAIL FROM:<admin@client.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n");
    let first = queued_id(&c.read_reply());
    c.read_reply().expect("250", "2");
    c.read_reply().expect("250", "2");
    c.read_reply().expect_code(354);
    c.send("Subject: second\r\n\r\nsecond body\r\n.\r\n");
    let second = queued_id(&c.read_reply());
    assert_ne!(first, second);
    server.stop();
    assert_eq!(server.spool_list().len(), 2);
}
