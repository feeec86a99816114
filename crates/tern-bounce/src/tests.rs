//! Every report is parsed back with mail-parser and checked part by part.

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

use super::*;

const ORIGINAL: &[u8] = b"From: Alice <alice@example.org>\r\n\
To: bob@example.net, carol@example.net\r\n\
Subject: quarterly numbers\r\n\
Message-ID: <orig-1@example.org>\r\n\
\r\n\
The secret body line.\r\n";

const NOW: u64 = 1_700_000_000_000;
const ARRIVED: u64 = NOW - 3_600_000;

fn failed(addr: &str, orcpt: Option<&str>, diag: &str) -> RecipientReport {
    RecipientReport {
        final_recipient: addr.to_string(),
        original_recipient: orcpt.map(str::to_string),
        action: Action::Failed,
        status: "5.1.1".to_string(),
        remote_mta: Some("dns;mx.example.net".to_string()),
        diagnostic: Some(diag.to_string()),
        last_attempt_ms: Some(NOW),
        will_retry_until_ms: None,
    }
}

fn request(recipients: Vec<RecipientReport>, ret: Option<Ret>) -> DsnRequest<'static> {
    DsnRequest {
        reporting_mta: "mail.tern.test",
        postmaster: "MAILER-DAEMON@mail.tern.test".to_string(),
        original_sender: "alice@example.org",
        envid: Some("QQ314159"),
        arrived_ms: ARRIVED,
        queue_id: "01HZX3V6K2Q9T0ABCDEF123456",
        recipients,
        ret,
        original: ORIGINAL,
        now_ms: NOW,
    }
}

fn two_failures() -> Vec<RecipientReport> {
    vec![
        failed("bob@example.net", None, "smtp;550 5.1.1 no such user"),
        failed(
            "carol@example.net",
            Some("carol.old@example.com"),
            "smtp;550 5.1.1 mailbox unavailable",
        ),
    ]
}

/// The delivery-status part's content split into field groups: the per-message group first,
/// then one per recipient, each a list of (lower-cased name, value).
fn status_groups(body: &str) -> Vec<Vec<(String, String)>> {
    body.split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|g| {
            // Unfold (RFC 5322 §2.2.3): a line starting with white space continues the field.
            let mut lines: Vec<String> = Vec::new();
            for l in g.split("\r\n").filter(|l| !l.is_empty()) {
                match lines.last_mut() {
                    Some(last) if l.starts_with([' ', '\t']) => last.push_str(l),
                    _ => lines.push(l.to_string()),
                }
            }
            lines
                .iter()
                .map(|l| {
                    let (n, v) = l.split_once(':').expect("a field line");
                    (n.trim().to_ascii_lowercase(), v.trim().to_string())
                })
                .collect()
        })
        .collect()
}

fn field<'g>(group: &'g [(String, String)], name: &str) -> Option<&'g str> {
    group
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

struct Parsed<'a> {
    message: Message<'a>,
}

impl<'a> Parsed<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let message = MessageParser::default()
            .parse(bytes)
            .expect("the report parses");
        Self { message }
    }

    /// The root is multipart/report; report-type=delivery-status with exactly three parts; their
    /// content types, in order.
    fn part_types(&self) -> Vec<String> {
        let root = self.message.root_part();
        let ct = root.content_type().expect("a content type");
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        let PartType::Multipart(ids) = &root.body else {
            panic!("root is not multipart: {:?}", root.body);
        };
        ids.iter()
            .map(|&id| {
                let ct = self.message.parts[id as usize]
                    .content_type()
                    .expect("part content type");
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
            })
            .collect()
    }

    fn part(&self, n: usize) -> &mail_parser::MessagePart<'a> {
        let PartType::Multipart(ids) = &self.message.root_part().body else {
            panic!("root is not multipart");
        };
        &self.message.parts[ids[n] as usize]
    }

    fn text(&self, n: usize) -> String {
        let part = self.part(n);
        match &part.body {
            PartType::Text(t) => t.to_string(),
            _ => String::from_utf8(part.contents().to_vec()).expect("utf-8"),
        }
    }

    fn header_text(&self, name: &str) -> Option<String> {
        self.message.header_raw(name).map(|v| v.trim().to_string())
    }
}

fn assert_envelope_headers(p: &Parsed, subject: &str) {
    let from = p.message.from().and_then(|a| a.first()).expect("From");
    assert_eq!(from.address(), Some("MAILER-DAEMON@mail.tern.test"));
    assert_eq!(from.name(), Some("Mail Delivery System"));
    let to = p.message.to().and_then(|a| a.first()).expect("To");
    assert_eq!(to.address(), Some("alice@example.org"));
    assert_eq!(p.message.subject(), Some(subject));
    assert_eq!(
        p.header_text("Auto-Submitted").as_deref(),
        Some("auto-replied")
    );
    assert!(p.message.date().is_some());
    let id = p.message.message_id().expect("Message-ID");
    assert!(id.ends_with("@mail.tern.test"), "{id}");
}

#[test]
fn failure_report_with_headers_only() {
    let bytes = build(&request(two_failures(), Some(Ret::Hdrs))).unwrap();
    let p = Parsed::new(&bytes);
    assert_envelope_headers(&p, "Undelivered Mail Returned to Sender");
    assert_eq!(
        p.part_types(),
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ]
    );

    let human = p.text(0);
    assert!(human.contains("<bob@example.net>"), "{human}");
    assert!(human.contains("550 5.1.1 no such user"), "{human}");
    assert!(human.contains("<carol@example.net>"), "{human}");

    let groups = status_groups(&p.text(1));
    assert_eq!(groups.len(), 3, "{groups:?}");
    let msg = &groups[0];
    assert_eq!(field(msg, "reporting-mta"), Some("dns;mail.tern.test"));
    assert_eq!(field(msg, "original-envelope-id"), Some("QQ314159"));
    assert_eq!(
        field(msg, "arrival-date"),
        Some(rfc5322_date(ARRIVED).as_str())
    );

    let bob = &groups[1];
    assert_eq!(
        field(bob, "final-recipient"),
        Some("rfc822;bob@example.net")
    );
    assert_eq!(field(bob, "original-recipient"), None);
    assert_eq!(field(bob, "action"), Some("failed"));
    assert_eq!(field(bob, "status"), Some("5.1.1"));
    assert_eq!(field(bob, "remote-mta"), Some("dns;mx.example.net"));
    assert_eq!(
        field(bob, "diagnostic-code"),
        Some("smtp;550 5.1.1 no such user")
    );
    assert!(field(bob, "last-attempt-date").is_some());
    assert_eq!(field(bob, "will-retry-until"), None);

    let carol = &groups[2];
    assert_eq!(
        field(carol, "final-recipient"),
        Some("rfc822;carol@example.net")
    );
    assert_eq!(
        field(carol, "original-recipient"),
        Some("rfc822;carol.old@example.com")
    );
    assert_eq!(field(carol, "action"), Some("failed"));
    assert_eq!(
        field(carol, "diagnostic-code"),
        Some("smtp;550 5.1.1 mailbox unavailable")
    );

    // RET=HDRS: the original's header fields and nothing of its body.
    let headers = p.text(2);
    assert!(headers.contains("Subject: quarterly numbers"), "{headers}");
    assert!(headers.contains("Message-ID: <orig-1@example.org>"));
    assert!(!headers.contains("secret body"), "{headers}");
    assert!(!String::from_utf8_lossy(&bytes).contains("secret body"));
}

#[test]
fn no_ret_means_headers_only() {
    let bytes = build(&request(two_failures(), None)).unwrap();
    let p = Parsed::new(&bytes);
    assert_eq!(p.part_types()[2], "text/rfc822-headers");
    assert!(!String::from_utf8_lossy(&bytes).contains("secret body"));
}

#[test]
fn failure_report_with_full_message() {
    let bytes = build(&request(two_failures(), Some(Ret::Full))).unwrap();
    let p = Parsed::new(&bytes);
    assert_envelope_headers(&p, "Undelivered Mail Returned to Sender");
    assert_eq!(
        p.part_types(),
        ["text/plain", "message/delivery-status", "message/rfc822"]
    );
    let PartType::Message(original) = &p.part(2).body else {
        panic!(
            "the third part is not a nested message: {:?}",
            p.part(2).body
        );
    };
    assert_eq!(original.subject(), Some("quarterly numbers"));
    assert_eq!(original.message_id(), Some("orig-1@example.org"));
    let body = original.body_text(0).expect("the original body");
    assert_eq!(body.trim_end(), "The secret body line.");
    let groups = status_groups(&p.text(1));
    assert_eq!(groups.len(), 3);
}

#[test]
fn delay_report() {
    let mut r = failed("bob@example.net", None, "smtp;451 4.4.1 try later");
    r.action = Action::Delayed;
    r.status = "4.4.1".to_string();
    r.will_retry_until_ms = Some(NOW + 4 * 86_400_000);
    let mut req = request(vec![r], Some(Ret::Hdrs));
    req.envid = None;
    let bytes = build(&req).unwrap();
    let p = Parsed::new(&bytes);
    assert_envelope_headers(&p, "Delayed Mail (still being retried)");
    assert_eq!(
        p.part_types(),
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ]
    );
    let groups = status_groups(&p.text(1));
    assert_eq!(groups.len(), 2);
    assert_eq!(field(&groups[0], "original-envelope-id"), None);
    let bob = &groups[1];
    assert_eq!(field(bob, "action"), Some("delayed"));
    assert_eq!(field(bob, "status"), Some("4.4.1"));
    assert_eq!(
        field(bob, "will-retry-until"),
        Some(rfc5322_date(NOW + 4 * 86_400_000).as_str())
    );
    assert_eq!(
        field(bob, "diagnostic-code"),
        Some("smtp;451 4.4.1 try later")
    );
}

#[test]
fn success_report() {
    let r = RecipientReport {
        final_recipient: "bob@example.net".to_string(),
        original_recipient: Some("bob@example.net".to_string()),
        action: Action::Delivered,
        status: "2.0.0".to_string(),
        remote_mta: Some("dns;mx.example.net".to_string()),
        diagnostic: Some("smtp;250 2.0.0 Ok: queued as 4Xyz".to_string()),
        last_attempt_ms: Some(NOW),
        // Not a delayed recipient: the field must not appear (RFC 3464 §2.3.9).
        will_retry_until_ms: Some(NOW),
    };
    let bytes = build(&request(vec![r], Some(Ret::Hdrs))).unwrap();
    let p = Parsed::new(&bytes);
    assert_envelope_headers(&p, "Successful Mail Delivery Report");
    let groups = status_groups(&p.text(1));
    let bob = &groups[1];
    assert_eq!(field(bob, "action"), Some("delivered"));
    assert_eq!(field(bob, "status"), Some("2.0.0"));
    assert_eq!(
        field(bob, "original-recipient"),
        Some("rfc822;bob@example.net")
    );
    assert_eq!(field(bob, "will-retry-until"), None);
}

#[test]
fn a_failure_outweighs_a_delay_in_the_subject() {
    let mut delayed = failed("bob@example.net", None, "smtp;451 later");
    delayed.action = Action::Delayed;
    delayed.status = "4.0.0".to_string();
    let recipients = vec![delayed, failed("carol@example.net", None, "smtp;550 no")];
    let bytes = build(&request(recipients, None)).unwrap();
    let p = Parsed::new(&bytes);
    assert_eq!(
        p.message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
}

#[test]
fn diagnostic_cannot_inject_header_fields() {
    let evil = failed(
        "bob@example.net",
        None,
        "smtp;550 x\r\nBcc: evil@example.com",
    );
    let mut req = request(vec![evil], Some(Ret::Hdrs));
    req.envid = Some("id\r\nX-Evil: 1");
    let bytes = build(&req).unwrap();
    let p = Parsed::new(&bytes);
    assert!(p.message.bcc().is_none());
    assert!(p.message.header_raw("Bcc").is_none());

    let groups = status_groups(&p.text(1));
    assert_eq!(groups.len(), 2, "{groups:?}");
    for group in &groups {
        assert_eq!(field(group, "bcc"), None, "{group:?}");
        assert_eq!(field(group, "x-evil"), None, "{group:?}");
    }
    assert_eq!(
        field(&groups[0], "original-envelope-id"),
        Some("id X-Evil: 1")
    );
    assert_eq!(
        field(&groups[1], "diagnostic-code"),
        Some("smtp;550 x Bcc: evil@example.com")
    );
    // No line of the whole report starts a Bcc field.
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
        "{text}"
    );
}

#[test]
fn unusable_addresses_are_refused() {
    let mut req = request(two_failures(), None);
    req.original_sender = "alice@example.org>\r\nBcc: x@y";
    assert!(matches!(
        build(&req),
        Err(BounceError::BadHeaderValue { .. })
    ));
    req.original_sender = "";
    assert_eq!(build(&req), Err(BounceError::NullSender));
    req.original_sender = "alice@example.org";
    req.recipients.clear();
    assert_eq!(build(&req), Err(BounceError::NoRecipients));
    let mut bad = failed("bob@example.net", None, "smtp;550");
    bad.status = "550".to_string();
    req.recipients.push(bad);
    assert_eq!(build(&req), Err(BounceError::BadStatus("550".to_string())));
}

#[test]
fn non_ascii_recipient_uses_the_utf8_address_type() {
    let r = failed("jösé@exämple.net", None, "smtp;550 5.1.1 no");
    let bytes = build(&request(vec![r], None)).unwrap();
    let p = Parsed::new(&bytes);
    let groups = status_groups(&p.text(1));
    assert_eq!(
        field(&groups[1], "final-recipient"),
        Some("utf-8;j\\x{F6}s\\x{E9}@ex\\x{E4}mple.net")
    );
    assert!(p.text(0).contains("<jösé@exämple.net>"));
}

#[test]
fn orcpt_is_xtext_decoded() {
    assert_eq!(
        original_recipient_from_orcpt("rfc822;carol+2Bold@example.com").as_deref(),
        Some("carol+old@example.com")
    );
    assert_eq!(
        original_recipient_from_orcpt("RFC822;bob@example.net").as_deref(),
        Some("bob@example.net")
    );
    assert_eq!(original_recipient_from_orcpt("x400;whatever"), None);
    assert_eq!(original_recipient_from_orcpt("no-type"), None);
    assert_eq!(original_recipient_from_orcpt("rfc822;bad+zz"), None);
}

#[test]
fn should_notify_truth_table() {
    let never = Some(Notify::NEVER);
    let success = Some(Notify {
        success: true,
        failure: false,
        delay: false,
    });
    let failure = Some(Notify {
        success: false,
        failure: true,
        delay: false,
    });
    let all = Some(Notify {
        success: true,
        failure: true,
        delay: true,
    });
    let actions = [
        Action::Failed,
        Action::Delayed,
        Action::Delivered,
        Action::Relayed,
        Action::Expanded,
    ];

    for notify in [None, never, success, failure, all] {
        for action in actions {
            // The null sender never gets a report (RFC 3461 §6.2), whatever it asked for.
            assert!(!should_notify("", notify, action));
            assert!(!should_notify("<>", notify, action));
        }
    }
    for action in actions {
        assert!(!should_notify("a@example.org", never, action), "{action:?}");
        assert!(should_notify("a@example.org", all, action), "{action:?}");
    }
    // Default: failure and delay, no success.
    let s = "a@example.org";
    assert!(should_notify(s, None, Action::Failed));
    assert!(should_notify(s, None, Action::Delayed));
    assert!(!should_notify(s, None, Action::Delivered));
    assert!(!should_notify(s, None, Action::Relayed));
    assert!(!should_notify(s, None, Action::Expanded));
    // SUCCESS alone: only success-type reports.
    assert!(!should_notify(s, success, Action::Failed));
    assert!(!should_notify(s, success, Action::Delayed));
    assert!(should_notify(s, success, Action::Delivered));
    assert!(should_notify(s, success, Action::Relayed));
    // FAILURE alone: no delay warning.
    assert!(should_notify(s, failure, Action::Failed));
    assert!(!should_notify(s, failure, Action::Delayed));
    assert!(!should_notify(s, failure, Action::Delivered));
}

#[test]
fn long_diagnostics_are_folded_and_bounded() {
    let words = vec!["word"; 200].join(" ");
    let huge = "x".repeat(3000);
    let diag = format!("smtp;550 5.7.1 {words} {huge}");
    let bytes = build(&request(vec![failed("bob@example.net", None, &diag)], None)).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.split("\r\n").all(|l| l.len() <= 998),
        "a line is too long"
    );
    let p = Parsed::new(&bytes);
    let groups = status_groups(&p.text(1));
    let got = field(&groups[1], "diagnostic-code").unwrap();
    assert!(
        got.starts_with(&format!("smtp;550 5.7.1 {words} xxx")),
        "{got}"
    );
    assert_eq!(
        got.len(),
        "smtp;550 5.7.1 ".len() + words.len() + 1 + MAX_WORD
    );
    // Folded: the part has several physical lines for the one field.
    let raw = p.text(1);
    let diag_line = raw
        .lines()
        .position(|l| l.starts_with("Diagnostic-Code:"))
        .unwrap();
    assert!(raw.lines().nth(diag_line + 1).unwrap().starts_with(' '));
}

#[test]
fn status_comes_from_the_reply() {
    use Action::*;
    assert_eq!(status_from_reply("550 5.1.1 no such user", Failed), "5.1.1");
    assert_eq!(status_from_reply("550-5.7.1 policy", Failed), "5.7.1");
    assert_eq!(status_from_reply("451 4.4.1 try later", Delayed), "4.4.1");
    // An enhanced code whose class disagrees with the reply is not trusted.
    assert_eq!(status_from_reply("550 4.1.1 odd", Failed), "5.0.0");
    assert_eq!(status_from_reply("554 no enhanced code", Failed), "5.0.0");
    assert_eq!(status_from_reply("250 2.0.0 Ok", Delivered), "2.0.0");
    // Expired: the last temporary status stays.
    assert_eq!(status_from_reply("421 4.4.2 timeout", Failed), "4.4.2");
    // No SMTP reply at all (a DNS failure, say): the action's class.
    assert_eq!(status_from_reply("host not found", Failed), "5.0.0");
    assert_eq!(
        status_from_reply("5.1.10 example.net: null MX", Failed),
        "5.1.10"
    );
    assert_eq!(status_from_reply("4.4.7 message expired", Failed), "4.4.7");
    assert_eq!(status_from_reply("4.4 not a code", Failed), "5.0.0");
    assert_eq!(status_from_reply("", Delayed), "4.0.0");
    assert_eq!(status_from_reply("12", Delivered), "2.0.0");
}

#[test]
fn reports_from_recipient_state() {
    let mut rcpt = tern_message::Recipient::new("carol@example.net");
    rcpt.orcpt = Some("rfc822;carol+2Bold@example.com".to_string());
    assert_eq!(RecipientReport::from_state(&rcpt), None);

    rcpt.state = RecipientState::Failed {
        at_ms: NOW,
        reply: "550 5.1.1 no such user".to_string(),
    };
    let r = RecipientReport::from_state(&rcpt).unwrap();
    assert_eq!(r.final_recipient, "carol@example.net");
    assert_eq!(
        r.original_recipient.as_deref(),
        Some("carol+old@example.com")
    );
    assert_eq!(r.action, Action::Failed);
    assert_eq!(r.status, "5.1.1");
    assert_eq!(r.diagnostic.as_deref(), Some("smtp;550 5.1.1 no such user"));
    assert_eq!(r.last_attempt_ms, Some(NOW));

    rcpt.state = RecipientState::Deferred {
        next_attempt_ms: NOW + 60_000,
        attempts: 2,
        last_reply: "connection refused".to_string(),
    };
    let r = RecipientReport::from_state(&rcpt).unwrap();
    assert_eq!(r.action, Action::Delayed);
    assert_eq!(r.status, "4.0.0");
    assert_eq!(r.diagnostic.as_deref(), Some("X-Tern;connection refused"));

    rcpt.state = RecipientState::Delivered {
        at_ms: NOW,
        reply: "250 2.0.0 Ok".to_string(),
    };
    let r = RecipientReport::from_state(&rcpt).unwrap();
    assert_eq!((r.action, r.status.as_str()), (Action::Delivered, "2.0.0"));

    // And such a report goes into a DSN that parses.
    let bytes = build(&request(vec![r], Some(Ret::Hdrs))).unwrap();
    let p = Parsed::new(&bytes);
    let groups = status_groups(&p.text(1));
    assert_eq!(
        field(&groups[1], "original-recipient"),
        Some("rfc822;carol+old@example.com")
    );
    assert_eq!(
        field(&groups[1], "diagnostic-code"),
        Some("smtp;250 2.0.0 Ok")
    );
}

#[test]
fn eight_bit_original_is_returned_unencoded() {
    let original = "Subject: caf\u{e9}\r\nFrom: a@example.org\r\n\r\nd\u{e9}j\u{e0} vu\r\n";
    let mut req = request(two_failures(), Some(Ret::Full));
    req.original = original.as_bytes();
    let bytes = build(&req).unwrap();
    let p = Parsed::new(&bytes);
    let part = p.part(2);
    // RFC 2046 §5.2.1: message/rfc822 is never base64 or quoted-printable.
    assert_eq!(part.content_transfer_encoding(), Some("8bit"));
    let PartType::Message(inner) = &part.body else {
        panic!("not a nested message: {:?}", part.body);
    };
    assert_eq!(inner.subject(), Some("caf\u{e9}"));
    assert_eq!(inner.body_text(0).unwrap().trim_end(), "d\u{e9}j\u{e0} vu");
    // Only the part that needs it is 8bit; the report's own parts stay 7bit.
    assert_eq!(p.part(1).content_transfer_encoding(), Some("7bit"));
}

#[test]
fn original_without_body_is_all_headers() {
    let mut req = request(two_failures(), Some(Ret::Hdrs));
    req.original = b"Subject: only headers\r\nFrom: a@example.org\r\n";
    let bytes = build(&req).unwrap();
    let p = Parsed::new(&bytes);
    let headers = p.text(2);
    assert!(headers.contains("Subject: only headers"), "{headers}");
    assert!(headers.contains("From: a@example.org"), "{headers}");
    assert_eq!(
        split_header(b"\r\nbody only"),
        (&b""[..], &b"body only"[..])
    );
}
