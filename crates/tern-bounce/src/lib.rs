//! Delivery status notifications: the report a sender gets when mail fails, is delayed or (when
//! asked for) is delivered.
//!
//! A DSN is an RFC 6522 `multipart/report; report-type=delivery-status` message with three parts
//! (RFC 3464 §2): a human-readable explanation, the machine-readable `message/delivery-status`
//! fields, and the original message (`message/rfc822`) or only its headers
//! (`text/rfc822-headers`), as the sender chose with `RET=` (RFC 3461 §4.3).
//!
//! This crate only builds the bytes and decides who gets reported; the queue sends the result
//! from the null sender through the ordinary enqueue path, so a DSN that fails cannot bounce
//! again (RFC 5321 §4.5.5).

use std::fmt::Write as _;

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;
use tern_message::{Notify, Recipient, RecipientState, Ret};

/// The `Action` field values (RFC 3464 §2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }
}

/// One recipient's field group in the `message/delivery-status` part (RFC 3464 §2.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientReport {
    /// The recipient address as we tried it (RFC 3464 §2.3.2), without the address type.
    pub final_recipient: String,
    /// The `ORCPT=` address, xtext-decoded and without its `rfc822;` type (RFC 3461 §4.2); see
    /// [`original_recipient_from_orcpt`].
    pub original_recipient: Option<String>,
    pub action: Action,
    /// An RFC 3463 enhanced status code: `5.1.1`, `4.4.7`, `2.0.0`.
    pub status: String,
    /// `dns;mx.example.net` (RFC 3464 §2.3.5).
    pub remote_mta: Option<String>,
    /// `smtp;550 5.1.1 no such user` (RFC 3464 §2.3.6).
    pub diagnostic: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub last_attempt_ms: Option<u64>,
    /// Only written for [`Action::Delayed`] (RFC 3464 §2.3.9).
    pub will_retry_until_ms: Option<u64>,
}

impl RecipientReport {
    /// A report for `rcpt` from the last reply we have for it: an SMTP reply
    /// (`550 5.1.1 no such user`) or our own text for a failure before any reply (DNS, TLS).
    /// `remote_mta` and the dates are left for the caller.
    pub fn new(rcpt: &Recipient, action: Action, reply: &str) -> Self {
        let reply = reply.trim();
        let diagnostic = if reply.is_empty() {
            None
        } else if smtp_code(reply).is_some() {
            Some(format!("smtp;{reply}"))
        } else {
            // RFC 3464 §2.3.6: diagnostic types other than registered ones are `X-` names;
            // Postfix uses `X-Postfix` the same way.
            Some(format!("X-Tern;{reply}"))
        };
        Self {
            final_recipient: rcpt.address.clone(),
            original_recipient: rcpt
                .orcpt
                .as_deref()
                .and_then(original_recipient_from_orcpt),
            action,
            status: status_from_reply(reply, action),
            remote_mta: None,
            diagnostic,
            last_attempt_ms: None,
            will_retry_until_ms: None,
        }
    }

    /// The report a recipient's stored state calls for: delivered, failed, or delayed while it
    /// is deferred. `None` while it is pending or in flight (nothing to report yet).
    pub fn from_state(rcpt: &Recipient) -> Option<Self> {
        let (action, reply, at) = match &rcpt.state {
            RecipientState::Delivered { at_ms, reply } => (Action::Delivered, reply, Some(*at_ms)),
            RecipientState::Failed { at_ms, reply } => (Action::Failed, reply, Some(*at_ms)),
            RecipientState::Deferred { last_reply, .. } => (Action::Delayed, last_reply, None),
            RecipientState::Pending | RecipientState::InFlight { .. } => return None,
        };
        let mut report = Self::new(rcpt, action, reply);
        report.last_attempt_ms = at;
        Some(report)
    }
}

/// The `Status` for a reply: its RFC 3463 enhanced code when it has one whose class agrees
/// with the reply code (RFC 2034 §4 requires they agree), else `c.0.0` from the reply code's
/// class, else the action's generic class. A recipient that failed by expiry keeps its last
/// temporary (4.x.x) status, as Postfix reports it; RFC 3464 §2.3.4 only needs the code to
/// describe the last problem.
pub fn status_from_reply(reply: &str, action: Action) -> String {
    let reply = reply.trim();
    if let Some(code) = smtp_code(reply) {
        let class = &code[..1];
        let rest = reply[3..].trim_start_matches(['-', ' ']);
        let candidate = rest.split_whitespace().next().unwrap_or("");
        if candidate.starts_with(class) && check_status(candidate).is_ok() {
            return candidate.to_string();
        }
        if matches!(class, "2" | "4" | "5") {
            return format!("{class}.0.0");
        }
    } else if let Some(first) = reply.split_whitespace().next() {
        // Our own texts for failures without an SMTP reply (DNS, connection, expiry) start
        // with their enhanced code: "5.1.10 example.net: null MX", "4.4.7 message expired".
        if check_status(first).is_ok() {
            return first.to_string();
        }
    }
    match action {
        Action::Failed => "5.0.0",
        Action::Delayed => "4.0.0",
        Action::Delivered | Action::Relayed | Action::Expanded => "2.0.0",
    }
    .to_string()
}

/// The three-digit reply code an SMTP reply starts with (RFC 5321 §4.2).
fn smtp_code(reply: &str) -> Option<&str> {
    let code = reply.get(..3)?;
    let ok = code.bytes().all(|b| b.is_ascii_digit())
        && reply[3..]
            .chars()
            .next()
            .is_none_or(|c| c == ' ' || c == '-');
    ok.then_some(code)
}

/// Everything [`build`] needs for one report about one message.
#[derive(Clone, Debug)]
pub struct DsnRequest<'a> {
    /// Our host name, for `Reporting-MTA: dns;…` and the Message-ID.
    pub reporting_mta: &'a str,
    /// The DSN's `From:` address, `MAILER-DAEMON@hostname`.
    pub postmaster: String,
    /// The original envelope sender, who gets the report. Never empty: see [`should_notify`].
    pub original_sender: &'a str,
    /// The `ENVID=` value, already xtext-decoded (RFC 3461 §4.4, RFC 3464 §2.2.1).
    pub envid: Option<&'a str>,
    pub arrived_ms: u64,
    pub queue_id: &'a str,
    pub recipients: Vec<RecipientReport>,
    /// `Full` returns the whole message; `Hdrs` or no `RET=` only its headers (RFC 3461 §4.3
    /// leaves the default to the MTA; headers only keeps reports small and avoids sending a
    /// large body back).
    pub ret: Option<Ret>,
    /// The original message, headers and body, CRLF line endings.
    pub original: &'a [u8],
    pub now_ms: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BounceError {
    /// RFC 3461 §6.2 / RFC 5321 §6.1: never report to the null sender (bounce loops).
    #[error("no delivery status notification is sent to the null sender")]
    NullSender,
    #[error("a delivery status notification needs at least one recipient")]
    NoRecipients,
    /// The value would not be a single safe token in a header (control characters, spaces,
    /// angle brackets).
    #[error("{field} is not usable in a header: {value:?}")]
    BadHeaderValue { field: &'static str, value: String },
    /// Not `class.subject.detail` with class 2, 4 or 5 (RFC 3463 §2).
    #[error("not an enhanced status code: {0:?}")]
    BadStatus(String),
    #[error("could not serialise the report: {0}")]
    Serialize(String),
}

/// Whether a recipient with this `NOTIFY=` gets a report for `action` (RFC 3461 §4.1).
///
/// * Never for the null sender: a report about a report could loop forever (RFC 3461 §6.2,
///   RFC 5321 §6.1).
/// * `NOTIFY=NEVER` means none at all.
/// * No `NOTIFY=` is taken as `FAILURE,DELAY`, the behaviour RFC 3461 §4.1 allows as default.
/// * Success-type reports (`delivered`, `relayed`, `expanded`) only with `NOTIFY=SUCCESS`
///   (RFC 3461 §4.1, §6.2.1).
pub fn should_notify(sender: &str, notify: Option<Notify>, action: Action) -> bool {
    if is_null_sender(sender) {
        return false;
    }
    match action {
        Action::Failed => notify.is_none_or(|n| n.failure),
        Action::Delayed => notify.is_none_or(|n| n.delay),
        Action::Delivered | Action::Relayed | Action::Expanded => notify.is_some_and(|n| n.success),
    }
}

fn is_null_sender(sender: &str) -> bool {
    let s = sender.trim();
    s.is_empty() || s == "<>"
}

/// The `Original-Recipient` address from a stored `ORCPT=addr-type;xtext` value: the xtext is
/// decoded (RFC 3461 §4.2). `None` when the value is malformed or its type is not `rfc822`
/// (the only type a [`RecipientReport`] can carry).
pub fn original_recipient_from_orcpt(orcpt: &str) -> Option<String> {
    let (kind, value) = orcpt.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("rfc822") {
        return None;
    }
    tern_smtp::xtext::decode(value.trim()).filter(|v| !v.is_empty())
}

/// Builds the DSN message: RFC 5322 bytes with CRLF line endings, ready to enqueue from the
/// null sender to `req.original_sender`.
pub fn build(req: &DsnRequest) -> Result<Vec<u8>, BounceError> {
    if is_null_sender(req.original_sender) {
        return Err(BounceError::NullSender);
    }
    if req.recipients.is_empty() {
        return Err(BounceError::NoRecipients);
    }
    check_token("original sender", req.original_sender)?;
    check_token("postmaster", &req.postmaster)?;
    check_token("reporting MTA", req.reporting_mta)?;
    check_token("queue id", req.queue_id)?;
    for r in &req.recipients {
        check_status(&r.status)?;
    }

    let kind = ReportKind::of(&req.recipients);
    let (headers, _) = split_header(req.original);
    let original_part = match req.ret {
        // RFC 3461 §4.3: RET=FULL returns the whole message. RFC 2046 §5.2.1 forbids base64
        // or quoted-printable for message/rfc822, so it goes as it came: 7bit or 8bit.
        Some(Ret::Full) => MimePart::new("message/rfc822", req.original.to_vec())
            .transfer_encoding(transfer_encoding(req.original)),
        // RFC 6522 §4 defines text/rfc822-headers for exactly this.
        Some(Ret::Hdrs) | None => MimePart::new("text/rfc822-headers", headers.to_vec())
            .transfer_encoding(transfer_encoding(headers)),
    };

    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new("text/plain", human_text(req, kind)),
            // Bytes rather than a string, so mail-builder adds no charset parameter: the part
            // is 7bit by construction (see `header_safe`).
            MimePart::new("message/delivery-status", delivery_status(req).into_bytes())
                .transfer_encoding("7bit"),
            original_part,
        ],
    );

    let message_id = format!("{}.{}.dsn@{}", req.queue_id, req.now_ms, req.reporting_mta);
    MessageBuilder::new()
        .from(Address::new_address(
            Some("Mail Delivery System"),
            req.postmaster.as_str(),
        ))
        .to(Address::new_address(None::<&str>, req.original_sender))
        .subject(kind.subject())
        .date(Date::new(secs(req.now_ms)))
        .message_id(MessageId::new(message_id))
        // RFC 3834 §5: marks the report as automatic, so responders do not answer it.
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header("MIME-Version", Raw::new("1.0"))
        .body(report)
        .write_to_vec()
        .map_err(|e| BounceError::Serialize(e.to_string()))
}

/// Which kind of report the message is, for its subject and opening text: a failure outweighs
/// a delay, which outweighs a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReportKind {
    Failure,
    Delay,
    Success,
}

impl ReportKind {
    fn of(recipients: &[RecipientReport]) -> Self {
        if recipients.iter().any(|r| r.action == Action::Failed) {
            ReportKind::Failure
        } else if recipients.iter().any(|r| r.action == Action::Delayed) {
            ReportKind::Delay
        } else {
            ReportKind::Success
        }
    }

    fn subject(self) -> &'static str {
        match self {
            ReportKind::Failure => "Undelivered Mail Returned to Sender",
            ReportKind::Delay => "Delayed Mail (still being retried)",
            ReportKind::Success => "Successful Mail Delivery Report",
        }
    }
}

fn human_text(req: &DsnRequest, kind: ReportKind) -> String {
    let mut text = String::new();
    let _ = write!(
        text,
        "This is the mail system at host {}.\r\n\r\n",
        header_safe(req.reporting_mta)
    );
    text.push_str(match kind {
        ReportKind::Failure => {
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n"
        }
        ReportKind::Delay => {
            "Your message could not be delivered yet to one or more recipients.\r\n\
             It will be tried again; you do not need to send it again.\r\n"
        }
        ReportKind::Success => {
            "Your message was successfully delivered to the destination(s)\r\n\
             listed below.\r\n"
        }
    });
    let _ = write!(text, "\r\nQueue id: {}\r\n", header_safe(req.queue_id));
    for r in &req.recipients {
        let _ = write!(
            text,
            "\r\n<{}>: {}",
            text_safe(&r.final_recipient),
            r.action.as_str()
        );
        if let Some(d) = &r.diagnostic {
            // The diagnostic's type prefix (`smtp;`) means nothing to a person.
            let d = d.split_once(';').map_or(d.as_str(), |(_, v)| v);
            let _ = write!(text, ": {}", text_safe(d.trim()));
        }
        text.push_str("\r\n");
    }
    text
}

/// The `message/delivery-status` body (RFC 3464 §2.1): the per-message fields, then one field
/// group per recipient, each group preceded by a blank line.
fn delivery_status(req: &DsnRequest) -> String {
    let mut out = String::new();
    // §2.2: the fields go in the grammar's order.
    if let Some(envid) = req.envid {
        push_field(&mut out, "Original-Envelope-Id", &header_safe(envid));
    }
    push_field(
        &mut out,
        "Reporting-MTA",
        &format!("dns;{}", header_safe(req.reporting_mta)),
    );
    push_field(&mut out, "Arrival-Date", &rfc5322_date(req.arrived_ms));
    for r in &req.recipients {
        out.push_str("\r\n");
        if let Some(orig) = &r.original_recipient {
            push_field(&mut out, "Original-Recipient", &typed_address(orig));
        }
        push_field(
            &mut out,
            "Final-Recipient",
            &typed_address(&r.final_recipient),
        );
        push_field(&mut out, "Action", r.action.as_str());
        push_field(&mut out, "Status", &r.status);
        if let Some(mta) = &r.remote_mta {
            push_field(&mut out, "Remote-MTA", &header_safe(mta));
        }
        if let Some(d) = &r.diagnostic {
            push_field(&mut out, "Diagnostic-Code", &header_safe(d));
        }
        if let Some(ms) = r.last_attempt_ms {
            push_field(&mut out, "Last-Attempt-Date", &rfc5322_date(ms));
        }
        // §2.3.9: only meaningful for a delayed recipient.
        if let (Action::Delayed, Some(ms)) = (r.action, r.will_retry_until_ms) {
            push_field(&mut out, "Will-Retry-Until", &rfc5322_date(ms));
        }
    }
    out
}

/// Longest word kept whole in a field; longer ones are cut, so no line can pass RFC 5322
/// §2.1.1's 998-octet limit (a remote server's reply text is not bounded by anything we trust).
const MAX_WORD: usize = 900;
/// RFC 5322 §2.1.1's recommended line length, where folding starts.
const FOLD_AT: usize = 78;

/// Writes `Name: value` with CRLF, folding at spaces (RFC 5322 §2.2.3; the RFC 3464 §2.1
/// fields use the same header syntax). `value` must already be single-line ([`header_safe`]).
fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut column = name.len() + 1;
    for (i, word) in value.split(' ').filter(|w| !w.is_empty()).enumerate() {
        let word = truncate_word(word);
        if i > 0 && column + 1 + word.len() > FOLD_AT {
            out.push_str("\r\n");
            column = 0;
        }
        out.push(' ');
        out.push_str(word);
        column += 1 + word.len();
    }
    out.push_str("\r\n");
}

fn truncate_word(word: &str) -> &str {
    if word.len() <= MAX_WORD {
        return word;
    }
    let mut end = MAX_WORD;
    while !word.is_char_boundary(end) {
        end -= 1;
    }
    &word[..end]
}

/// `rfc822;addr` for an ASCII address (RFC 3464 §2.3.2), or the RFC 6533 §3 `utf-8` address
/// type in its 7-bit `utf-8-addr-xtext` form (non-ASCII and `+`, `=`, `\` as `\x{HEX}`), since
/// this part is `message/delivery-status`, not `message/global-delivery-status`.
fn typed_address(addr: &str) -> String {
    let addr = strip_controls(addr);
    if addr.is_ascii() {
        return format!("rfc822;{}", header_safe(&addr));
    }
    let mut out = String::from("utf-8;");
    for c in addr.chars() {
        match c {
            '!'..='*' | ','..='<' | '>'..='[' | ']'..='~' => out.push(c),
            _ => {
                let _ = write!(out, "\\x{{{:X}}}", u32::from(c));
            }
        }
    }
    out
}

/// A value for a header-like field line: control characters (CR and LF above all, which would
/// start a new field — header injection from a remote server's reply) become spaces, non-ASCII
/// becomes `?` (RFC 3464 §2.1: the part is 7-bit), runs of spaces collapse.
fn header_safe(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let c = if c.is_ascii_control() || c.is_whitespace() {
            ' '
        } else if !c.is_ascii() {
            '?'
        } else {
            c
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out
}

/// For the human-readable part: one line, no control characters; UTF-8 is fine there.
fn text_safe(value: &str) -> String {
    strip_controls(value).trim().to_string()
}

fn strip_controls(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A value that goes into a structured header (address, Message-ID) must be one token.
fn check_token(field: &'static str, value: &str) -> Result<(), BounceError> {
    let bad = value.is_empty()
        || value
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"' | ','));
    if bad {
        Err(BounceError::BadHeaderValue {
            field,
            value: value.to_string(),
        })
    } else {
        Ok(())
    }
}

fn check_status(status: &str) -> Result<(), BounceError> {
    let mut parts = status.split('.');
    let ok = matches!(parts.next(), Some("2" | "4" | "5"))
        && parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts
            .next()
            .is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none();
    if ok {
        Ok(())
    } else {
        Err(BounceError::BadStatus(status.to_string()))
    }
}

/// The header section (through the CRLF ending its last field, without the blank line) and the
/// body. A message without a blank line is all header (RFC 5322 §2.1: the body is optional).
fn split_header(message: &[u8]) -> (&[u8], &[u8]) {
    if message.starts_with(b"\r\n") {
        return (&[], &message[2..]);
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&message[..i + 2], &message[i + 4..]),
        None => (message, &[]),
    }
}

/// RFC 2045 §2.7/§2.8: 7bit when every octet is ASCII, 8bit otherwise. (A BINARYMIME original
/// would need `binary` and a BINARYMIME-capable path for the DSN; not handled yet.)
fn transfer_encoding(data: &[u8]) -> &'static str {
    if data.is_ascii() {
        "7bit"
    } else {
        "8bit"
    }
}

fn secs(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

/// RFC 5322 §3.3 date-time, as RFC 3464 §2.2.5 and §2.3.7 require.
fn rfc5322_date(ms: u64) -> String {
    Date::new(secs(ms)).to_rfc822()
}

#[cfg(test)]
mod tests;
