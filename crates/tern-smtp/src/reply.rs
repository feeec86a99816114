//! SMTP replies: building them (server side) and parsing them as they arrive (client side).

use std::collections::BTreeMap;
use std::fmt;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::line::LineReader;

/// An enhanced status code `class.subject.detail` (RFC 3463 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }

    /// Parses `"5.1.1"`. RFC 3463 §2 limits the class to 2, 4 or 5 and subject and detail to 1 to
    /// 3 digits.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let class = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        let num = |p: &str| -> Option<u16> {
            if (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse().ok()
            } else {
                None
            }
        };
        Some(Self::new(class, num(subject)?, num(detail)?))
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    /// The text of each line, without code, separator or enhanced code.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply whose text is `text`. Line breaks in `text` (LF, CRLF or CR) start new reply lines,
    /// so no caller can inject a reply line of its own by putting CRLF into the text (RFC 5321
    /// §4.2.1 multi-line format).
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Self {
        let text = text.into();
        Self::multiline(code, enhanced, vec![text])
    }

    /// A reply with one entry per line. Entries containing line breaks are split further.
    pub fn multiline(code: u16, enhanced: Option<EnhancedCode>, lines: Vec<String>) -> Self {
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            if line.contains(['\r', '\n']) {
                out.extend(
                    line.replace("\r\n", "\n")
                        .split(['\r', '\n'])
                        .map(str::to_string),
                );
            } else {
                out.push(line);
            }
        }
        Self {
            code,
            enhanced,
            lines: out,
        }
    }

    /// Serialises the reply: `250-…` continuation lines and a last `250 …` line (RFC 5321
    /// §4.2.1), each with the enhanced code after the separator when set (RFC 2034 §4), CRLF.
    /// A reply with no text is written `250 ` (with the space, which RFC 4954 §4 requires of an
    /// empty `334 ` challenge and RFC 5321 allows everywhere).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = self.code.min(999);
        let last = self.lines.len().saturating_sub(1);
        let empty = [String::new()];
        let lines: &[String] = if self.lines.is_empty() {
            &empty
        } else {
            &self.lines
        };
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(format!("{code:03}").as_bytes());
            out.push(if i == last { b' ' } else { b'-' });
            if let Some(enhanced) = self.enhanced {
                out.extend_from_slice(enhanced.to_string().as_bytes());
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// 2yz (RFC 5321 §4.2.1).
    pub fn is_positive_completion(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3yz: the server waits for more (354 after DATA, 334 during AUTH).
    pub fn is_positive_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4yz: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5yz: do not try again as is.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The lines joined by a space, for logs and DSNs.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

/// One line: `550 5.1.1 no such user`, multi-line replies joined by a space.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03}", self.code)?;
        if let Some(enhanced) = self.enhanced {
            write!(f, " {enhanced}")?;
        }
        let text = self.text();
        if !text.is_empty() {
            write!(f, " {text}")?;
        }
        Ok(())
    }
}

/// Why a server's reply could not be parsed. The client's only sensible reaction to any of
/// these is to drop the connection and treat the attempt as a transient failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {0} octets")]
    LineTooLong(usize),
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    #[error("reply code changed within a multi-line reply: {first} then {then}")]
    InconsistentCode { first: u16, then: u16 },
    #[error("multi-line reply longer than {0} lines")]
    TooManyLines(usize),
}

/// Client side: parses server replies from bytes as they arrive.
///
/// Lenient where servers are sloppy: bare LF line ends, reply lines up to
/// [`ReplyParser::DEFAULT_MAX_LINE`] octets (RFC 5321 §4.5.3.1.5 says 512, but long EHLO lines
/// are common), non-UTF-8 text (replaced, as text is only for humans). Memory stays bounded:
/// at most `max_lines` lines of `max_line` octets each.
#[derive(Debug)]
pub struct ReplyParser {
    reader: LineReader,
    max_lines: usize,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    code: u16,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
}

impl Default for ReplyParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplyParser {
    pub const DEFAULT_MAX_LINE: usize = 4096;
    pub const DEFAULT_MAX_LINES: usize = 256;

    pub fn new() -> Self {
        Self::with_limits(Self::DEFAULT_MAX_LINE, Self::DEFAULT_MAX_LINES)
    }

    /// `max_line` counts the octets of a line without its terminator.
    pub fn with_limits(max_line: usize, max_lines: usize) -> Self {
        Self {
            reader: LineReader::new(max_line),
            max_lines: max_lines.max(1),
            pending: None,
        }
    }

    /// Takes one complete reply off the front of `buf`, or `None` if more bytes are needed.
    /// After an error the partial reply is dropped and parsing resumes at the next line.
    pub fn ingest(&mut self, buf: &mut BytesMut) -> Option<Result<Reply, ReplyError>> {
        loop {
            let line = match self.reader.read_line(buf)? {
                Ok(line) => line,
                Err(_) => {
                    self.pending = None;
                    return Some(Err(ReplyError::LineTooLong(self.reader.max_len())));
                }
            };
            match self.take_line(&line) {
                Ok(Some(reply)) => return Some(Ok(reply)),
                Ok(None) => continue,
                Err(e) => {
                    self.pending = None;
                    return Some(Err(e));
                }
            }
        }
    }

    fn take_line(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        // Reply-line = *( Reply-code "-" [ textstring ] CRLF )
        //              Reply-code [ SP textstring ] CRLF           (RFC 5321 §4.2)
        let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(malformed());
        }
        let code = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(2..=5).contains(&(code / 100)) {
            return Err(malformed());
        }
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(malformed()),
        };
        let text = String::from_utf8_lossy(text);
        let (enhanced, text) = split_enhanced(code, &text);

        let pending = self.pending.get_or_insert_with(|| Pending {
            code,
            enhanced,
            lines: Vec::new(),
        });
        if pending.code != code {
            return Err(ReplyError::InconsistentCode {
                first: pending.code,
                then: code,
            });
        }
        if pending.lines.len() >= self.max_lines {
            return Err(ReplyError::TooManyLines(self.max_lines));
        }
        pending.lines.push(text.to_string());
        if !last {
            return Ok(None);
        }
        let pending = self.pending.take().expect("pending reply was just filled");
        Ok(Some(Reply {
            code: pending.code,
            enhanced: pending.enhanced,
            lines: pending.lines,
        }))
    }
}

/// Splits a leading enhanced code off a reply line's text, if there is one whose class matches
/// the reply code's first digit (RFC 2034 §4 requires they agree; a mismatch means the text
/// merely starts with something that looks like a code).
fn split_enhanced(code: u16, text: &str) -> (Option<EnhancedCode>, &str) {
    let (word, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    match EnhancedCode::parse(word) {
        Some(enhanced) if u16::from(enhanced.class) == code / 100 => (Some(enhanced), rest),
        _ => (None, text),
    }
}

/// The extensions a server announced in its EHLO reply (RFC 5321 §4.1.1.1): keyword, uppercased,
/// to its parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The first line of the reply: the server's domain and greeting.
    pub greeting: String,
    keywords: BTreeMap<String, Vec<String>>,
}

impl Capabilities {
    /// Reads the capabilities out of a 250 reply to EHLO. Lines after the first are
    /// `keyword *(SP param)`; the pre-standard `AUTH=LOGIN PLAIN` form some old servers still
    /// send is read as `AUTH LOGIN PLAIN` when no standard `AUTH` line is present.
    pub fn from_ehlo_reply(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            greeting: reply.lines.first().cloned().unwrap_or_default(),
            keywords: BTreeMap::new(),
        };
        let mut legacy = Vec::new();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let params: Vec<String> = words.map(str::to_string).collect();
            if let Some((name, first)) = keyword.split_once('=') {
                let mut args = vec![first.to_string()];
                args.extend(params);
                legacy.push((name.to_ascii_uppercase(), args));
            } else {
                caps.keywords.insert(keyword.to_ascii_uppercase(), params);
            }
        }
        for (name, args) in legacy {
            caps.keywords.entry(name).or_insert(args);
        }
        caps
    }

    /// Whether the server announced `keyword` (case-insensitive).
    pub fn has(&self, keyword: &str) -> bool {
        self.params(keyword).is_some()
    }

    /// The parameters announced with `keyword`, if it was announced.
    pub fn params(&self, keyword: &str) -> Option<&[String]> {
        // A dozen keywords at most: a scan, not an uppercased copy of `keyword` per question
        // (the delivery client asks several per message).
        self.keywords
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(keyword))
            .map(|(_, v)| v.as_slice())
    }

    /// The announced keywords, uppercased, in order.
    pub fn keywords(&self) -> impl Iterator<Item = &str> {
        self.keywords.keys().map(String::as_str)
    }

    /// `SIZE n` (RFC 1870 §4): `Some(0)` means the server announced no fixed limit; `None` that
    /// it did not announce SIZE (or announced garbage).
    pub fn size(&self) -> Option<u64> {
        let params = self.params("SIZE")?;
        match params.first() {
            None => Some(0),
            Some(n) => n.parse().ok(),
        }
    }

    /// The SASL mechanisms of the `AUTH` line (RFC 4954 §3), uppercased.
    pub fn auth_mechanisms(&self) -> Vec<String> {
        self.params("AUTH")
            .unwrap_or_default()
            .iter()
            .map(|m| m.to_ascii_uppercase())
            .collect()
    }

    /// Adds a keyword (for building an EHLO reply).
    pub fn insert(&mut self, keyword: &str, params: Vec<String>) {
        self.keywords.insert(keyword.to_ascii_uppercase(), params);
    }

    /// A 250 EHLO reply announcing these capabilities, greeting first. EHLO replies carry no
    /// enhanced code: the keyword lines would not parse with one (RFC 2034 §3).
    pub fn to_ehlo_reply(&self) -> Reply {
        let mut lines = vec![self.greeting.clone()];
        for (keyword, params) in &self.keywords {
            let mut line = keyword.clone();
            for p in params {
                line.push(' ');
                line.push_str(p);
            }
            lines.push(line);
        }
        Reply::multiline(250, None, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{every_split, Splitter};

    const E511: EnhancedCode = EnhancedCode::new(5, 1, 1);

    #[test]
    fn enhanced_code_displays_dotted() {
        assert_eq!(E511.to_string(), "5.1.1");
        assert_eq!(EnhancedCode::new(2, 0, 0).to_string(), "2.0.0");
        assert_eq!(
            EnhancedCode::parse("4.7.26"),
            Some(EnhancedCode::new(4, 7, 26))
        );
        assert_eq!(EnhancedCode::parse("3.1.1"), None);
        assert_eq!(EnhancedCode::parse("5.1"), None);
        assert_eq!(EnhancedCode::parse("5.1.1.1"), None);
        assert_eq!(EnhancedCode::parse("5.1234.1"), None);
    }

    #[test]
    fn single_line_reply_with_enhanced_code() {
        let r = Reply::new(550, Some(E511), "no such user");
        assert_eq!(r.to_bytes(), b"550 5.1.1 no such user\r\n");
    }

    #[test]
    fn multiline_reply_uses_dash_until_the_last_line() {
        let r = Reply::multiline(
            250,
            Some(EnhancedCode::new(2, 0, 0)),
            vec!["one".into(), "two".into(), "three".into()],
        );
        assert_eq!(
            r.to_bytes(),
            b"250-2.0.0 one\r\n250-2.0.0 two\r\n250 2.0.0 three\r\n"
        );
    }

    #[test]
    fn empty_text_keeps_the_space_after_the_code() {
        assert_eq!(Reply::new(334, None, "").to_bytes(), b"334 \r\n");
        assert_eq!(Reply::multiline(250, None, vec![]).to_bytes(), b"250 \r\n");
        assert_eq!(
            Reply::new(250, Some(EnhancedCode::new(2, 0, 0)), "").to_bytes(),
            b"250 2.0.0\r\n"
        );
    }

    #[test]
    fn line_breaks_in_text_cannot_inject_reply_lines() {
        let r = Reply::new(250, None, "a\r\n250 injected\nb\rc");
        assert_eq!(r.lines, vec!["a", "250 injected", "b", "c"]);
        assert_eq!(
            r.to_bytes(),
            b"250-a\r\n250-250 injected\r\n250-b\r\n250 c\r\n"
        );
    }

    #[test]
    fn reply_classes() {
        assert!(Reply::new(250, None, "").is_positive_completion());
        assert!(Reply::new(354, None, "").is_positive_intermediate());
        assert!(Reply::new(421, None, "").is_transient());
        assert!(Reply::new(554, None, "").is_permanent());
        assert!(!Reply::new(554, None, "").is_transient());
    }

    #[test]
    fn reply_display_is_one_line() {
        let r = Reply::multiline(550, Some(E511), vec!["a".into(), "b".into()]);
        assert_eq!(r.to_string(), "550 5.1.1 a b");
        assert_eq!(Reply::new(221, None, "bye").to_string(), "221 bye");
    }

    /// Parses everything in `input` fed in `pieces`, collecting replies and errors.
    fn parse_all(pieces: &[&[u8]]) -> Vec<Result<Reply, ReplyError>> {
        let mut parser = ReplyParser::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(r) = parser.ingest(&mut buf) {
                out.push(r);
            }
        }
        out
    }

    /// Feeds `input` whole, byte by byte, cut in two at every position and in random pieces;
    /// every feed must parse the same.
    fn parse_every_way(input: &[u8]) -> Vec<Result<Reply, ReplyError>> {
        let whole = parse_all(&[input]);
        for pieces in every_split(input) {
            assert_eq!(parse_all(&pieces), whole, "split {pieces:?}");
        }
        let mut rng = Splitter::new(input.len() as u64);
        for _ in 0..50 {
            let pieces = rng.random_split(input);
            assert_eq!(parse_all(&pieces), whole, "split {pieces:?}");
        }
        whole
    }

    #[test]
    fn parser_reads_a_multiline_ehlo_reply() {
        let input = b"250-mx.example.org hello\r\n250-SIZE 10240000\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n";
        let replies = parse_every_way(input);
        assert_eq!(replies.len(), 1);
        let r = replies[0].clone().unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.enhanced, None);
        assert_eq!(
            r.lines,
            vec![
                "mx.example.org hello",
                "SIZE 10240000",
                "AUTH PLAIN LOGIN",
                "PIPELINING"
            ]
        );
    }

    #[test]
    fn parser_strips_enhanced_codes() {
        let replies = parse_every_way(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n");
        assert_eq!(
            replies,
            vec![Ok(Reply::multiline(
                550,
                Some(E511),
                vec!["no such".into(), "user".into()]
            ))]
        );
    }

    #[test]
    fn parser_ignores_enhanced_code_of_another_class() {
        let replies = parse_every_way(b"250 5.1.1 odd\r\n");
        assert_eq!(replies, vec![Ok(Reply::new(250, None, "5.1.1 odd"))]);
    }

    #[test]
    fn parser_accepts_bare_code_and_bare_lf() {
        let replies = parse_every_way(b"250\n354 go ahead\n");
        assert_eq!(
            replies,
            vec![
                Ok(Reply::new(250, None, "")),
                Ok(Reply::new(354, None, "go ahead"))
            ]
        );
    }

    #[test]
    fn parser_returns_pipelined_replies_one_by_one() {
        let replies = parse_every_way(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n");
        let codes: Vec<_> = replies.iter().map(|r| r.as_ref().unwrap().code).collect();
        assert_eq!(codes, vec![250, 250, 354]);
    }

    #[test]
    fn parser_rejects_garbage_lines() {
        for bad in [
            &b"hello\r\n"[..],
            b"25\r\n",
            b"2500 x\r\n",
            b"250x\r\n",
            b"150 x\r\n",
        ] {
            let replies = parse_every_way(bad);
            assert!(
                matches!(replies.as_slice(), [Err(ReplyError::Malformed(_))]),
                "{bad:?}: {replies:?}"
            );
        }
    }

    #[test]
    fn parser_rejects_code_change_within_a_reply() {
        let replies = parse_every_way(b"250-a\r\n251 b\r\n220 next\r\n");
        assert_eq!(
            replies,
            vec![
                Err(ReplyError::InconsistentCode {
                    first: 250,
                    then: 251
                }),
                Ok(Reply::new(220, None, "next"))
            ]
        );
    }

    #[test]
    fn parser_bounds_line_length_and_line_count() {
        let mut p = ReplyParser::with_limits(10, 2);
        let mut buf = BytesMut::from(&b"250 0123456789abc\r\n250 ok\r\n"[..]);
        assert_eq!(p.ingest(&mut buf), Some(Err(ReplyError::LineTooLong(10))));
        assert_eq!(p.ingest(&mut buf), Some(Ok(Reply::new(250, None, "ok"))));
        let mut buf = BytesMut::from(&b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n"[..]);
        assert_eq!(p.ingest(&mut buf), Some(Err(ReplyError::TooManyLines(2))));
    }

    #[test]
    fn parser_round_trips_written_replies() {
        let r = Reply::multiline(
            451,
            Some(EnhancedCode::new(4, 3, 0)),
            vec!["try".into(), "later".into()],
        );
        assert_eq!(parse_every_way(&r.to_bytes()), vec![Ok(r)]);
    }

    #[test]
    fn capabilities_from_ehlo_reply() {
        let reply = Reply::multiline(
            250,
            None,
            vec![
                "mx.example.org at your service".into(),
                "size 10240000".into(),
                "AUTH plain LOGIN".into(),
                "8BITMIME".into(),
                "PIPELINING".into(),
            ],
        );
        let caps = Capabilities::from_ehlo_reply(&reply);
        assert_eq!(caps.greeting, "mx.example.org at your service");
        assert_eq!(caps.size(), Some(10_240_000));
        assert_eq!(caps.auth_mechanisms(), vec!["PLAIN", "LOGIN"]);
        assert!(caps.has("8bitmime"));
        assert!(caps.has("PIPELINING"));
        assert!(!caps.has("STARTTLS"));
        assert_eq!(caps.params("pipelining"), Some(&[][..]));
    }

    #[test]
    fn capabilities_size_without_value_means_no_limit() {
        let reply = Reply::multiline(250, None, vec!["x".into(), "SIZE".into()]);
        assert_eq!(Capabilities::from_ehlo_reply(&reply).size(), Some(0));
        let reply = Reply::multiline(250, None, vec!["x".into()]);
        assert_eq!(Capabilities::from_ehlo_reply(&reply).size(), None);
    }

    #[test]
    fn capabilities_read_legacy_auth_equals_form() {
        let reply = Reply::multiline(250, None, vec!["x".into(), "AUTH=LOGIN PLAIN".into()]);
        let caps = Capabilities::from_ehlo_reply(&reply);
        assert_eq!(caps.auth_mechanisms(), vec!["LOGIN", "PLAIN"]);
        let reply = Reply::multiline(
            250,
            None,
            vec!["x".into(), "AUTH CRAM-MD5".into(), "AUTH=LOGIN".into()],
        );
        let caps = Capabilities::from_ehlo_reply(&reply);
        assert_eq!(caps.auth_mechanisms(), vec!["CRAM-MD5"]);
    }

    #[test]
    fn capabilities_build_an_ehlo_reply() {
        let mut caps = Capabilities {
            greeting: "mx.example.org".into(),
            ..Default::default()
        };
        caps.insert("size", vec!["1000".into()]);
        caps.insert("PIPELINING", vec![]);
        let reply = caps.to_ehlo_reply();
        assert_eq!(
            reply.to_bytes(),
            b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
        );
        assert_eq!(Capabilities::from_ehlo_reply(&reply), caps);
    }
}
