//! Message content decoders: DATA (dot-stuffed, ended by `<CRLF>.<CRLF>`) and BDAT (counted
//! chunks).
//!
//! # Line endings and smuggling
//!
//! SMTP smuggling works by sending an end-of-data sequence that one server honours and
//! another does not (`<LF>.<LF>`, `<CR>.<CR>`, `<LF>.<CRLF>`, …): the second server then reads
//! the rest of the "message" as new commands. [`DataReceiver`] therefore ends the content ONLY
//! on a real `<CRLF>.<CRLF>` (RFC 5321 §4.1.1.4), whatever the mode, and handles a bare CR (not
//! followed by LF) or bare LF (not preceded by CR) according to [`BareLineEndings`]:
//!
//! - `Reject`: the first bare line ending sets [`DataOutcome::bare_line_ending`]; the session
//!   should refuse the message once the terminator arrives.
//! - `Normalize` (Postfix 3.9 `smtpd_forbid_bare_newline = normalize`): each bare CR or bare LF
//!   becomes CRLF in the output, and the line after it is dot-unstuffed like any other. But a
//!   `.` line reached through a bare line ending is content, never the end: `a<LF>.<CRLF>` puts
//!   the lines `a` and `.` into the message and reading goes on. What we pass on downstream is
//!   all CRLF and re-stuffed by our own client, so no later hop can see a terminator there.

use serde::{Deserialize, Serialize};

use crate::limits::TEXT_LINE;
use crate::reply::{EnhancedCode, Reply};

/// What to do with a bare CR or bare LF in DATA content (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    #[default]
    Reject,
    Normalize,
}

/// Limits for one DATA transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLimits {
    /// The most content octets (after unstuffing, CRLFs included) to accept.
    pub max_size: usize,
    /// The longest line, in content octets without the CRLF and without a stuffed dot.
    pub max_line: usize,
    pub bare_line_endings: BareLineEndings,
}

impl DataLimits {
    /// `max_size`, lines of RFC 5321 §4.5.3.1.6's 1000 octets (998 without CRLF), bare line
    /// endings rejected.
    pub fn new(max_size: usize) -> Self {
        Self {
            max_size,
            max_line: TEXT_LINE - 2,
            bare_line_endings: BareLineEndings::Reject,
        }
    }
}

/// What a DATA transfer turned out to be. When any flag is set, the output stopped growing at
/// that point and the message must be refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOutcome {
    /// Wire octets consumed, the terminator included.
    pub octets: usize,
    /// Content octets after unstuffing and normalisation, counted in full even past
    /// `max_size` (for the log line).
    pub content_octets: usize,
    pub size_exceeded: bool,
    pub line_too_long: bool,
    pub bare_line_ending: bool,
}

impl DataOutcome {
    /// Whether the content may be accepted.
    pub fn is_acceptable(&self) -> bool {
        !(self.size_exceeded || self.line_too_long || self.bare_line_ending)
    }

    /// The reply refusing the message, if it must be refused. RFC 5321 §4.3.2 lists 552 and
    /// 554/550 after the end of data:
    /// - too big: `552 5.3.4` (RFC 1870 §6, RFC 3463 X.3.4);
    /// - bare CR/LF: `550 5.5.2`, as Postfix answers with `smtpd_forbid_bare_newline`;
    /// - line too long: `554 5.6.0` (RFC 3463 X.6.0, a content problem).
    pub fn error_reply(&self) -> Option<Reply> {
        if self.size_exceeded {
            Some(Reply::new(
                552,
                Some(EnhancedCode::new(5, 3, 4)),
                "Message size exceeds fixed maximum message size",
            ))
        } else if self.bare_line_ending {
            Some(Reply::new(
                550,
                Some(EnhancedCode::new(5, 5, 2)),
                "Bare CR or LF in message content (see RFC 5321 section 2.3.8)",
            ))
        } else if self.line_too_long {
            Some(Reply::new(
                554,
                Some(EnhancedCode::new(5, 6, 0)),
                "Message line too long (see RFC 5321 section 4.5.3.1.6)",
            ))
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// After a real CRLF, or at the very start (the DATA command's CRLF precedes us).
    LineStart,
    /// After a normalised bare line ending: a dot here is unstuffed but cannot end the data.
    SoftLineStart,
    /// Inside a line.
    Text,
    /// After a CR that may or may not be followed by LF.
    Cr,
    /// After a dot at the start of a line; `real` when that start came from a real CRLF.
    Dot {
        real: bool,
    },
    /// After `<CRLF>.<CR>`: one LF away from the end.
    DotCr,
    Done,
}

/// DATA content decoder: dot-unstuffing (RFC 5321 §4.5.2), ends only on `<CRLF>.<CRLF>`.
///
/// The state starts at the beginning of a line (the DATA command's CRLF precedes it), so an
/// immediate `.<CRLF>` is an empty message. Per RFC 5321 §4.5.2 the first character of a line
/// that starts with a dot and has more characters is deleted (`..x` becomes `.x`, `.x`
/// becomes `x`).
///
/// Memory stays bounded for hostile clients: once the size limit, the line limit or (in
/// `Reject` mode) a bare line ending is hit, nothing more is appended, but input is still
/// consumed until the real terminator. The output is the same however the input is split.
#[derive(Clone, Debug)]
pub struct DataReceiver {
    limits: DataLimits,
    state: State,
    line_len: usize,
    stopped: bool,
    outcome: DataOutcome,
}

impl DataReceiver {
    pub fn new(limits: DataLimits) -> Self {
        Self {
            limits,
            state: State::LineStart,
            line_len: 0,
            stopped: false,
            outcome: DataOutcome::default(),
        }
    }

    /// Consumes bytes from `input` and appends decoded content to `out`; returns
    /// `(consumed, done)`. When done, `input[consumed..]` is the next pipelined command; calls
    /// after that consume nothing.
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => break,
                State::Text => {
                    let end = input[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .map_or(input.len(), |p| i + p);
                    if end > i {
                        self.push(&input[i..end], true, out);
                        i = end;
                        continue;
                    }
                    i += 1;
                    if b == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.bare_line_ending(out);
                    }
                }
                State::LineStart | State::SoftLineStart => {
                    if b == b'.' {
                        i += 1;
                        self.state = State::Dot {
                            real: self.state == State::LineStart,
                        };
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot { real } => match b {
                    b'.' => {
                        // A stuffed dot: the first is deleted, the second is content.
                        i += 1;
                        self.push(b".", true, out);
                        self.state = State::Text;
                    }
                    b'\r' if real => {
                        i += 1;
                        self.state = State::DotCr;
                    }
                    b'\r' | b'\n' => {
                        // A "." line that cannot be the terminator: it is content, and the
                        // line ending is dealt with in Text.
                        self.push(b".", true, out);
                        self.state = State::Text;
                    }
                    _ => {
                        // A leading dot with more on the line is deleted (RFC 5321 §4.5.2).
                        self.state = State::Text;
                    }
                },
                State::DotCr => {
                    if b == b'\n' {
                        i += 1;
                        self.state = State::Done;
                        break;
                    }
                    // ".<CR>" then something else: the line "." ended by a bare CR.
                    self.push(b".", true, out);
                    self.state = State::Cr;
                }
                State::Cr => {
                    if b == b'\n' {
                        i += 1;
                        self.push(b"\r\n", false, out);
                        self.line_len = 0;
                        self.state = State::LineStart;
                    } else {
                        // A bare CR; `b` is looked at again in the new state.
                        self.bare_line_ending(out);
                    }
                }
            }
        }
        self.outcome.octets = self.outcome.octets.saturating_add(i);
        (i, self.state == State::Done)
    }

    pub fn outcome(&self) -> DataOutcome {
        self.outcome
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn bare_line_ending(&mut self, out: &mut Vec<u8>) {
        match self.limits.bare_line_endings {
            BareLineEndings::Reject => {
                self.outcome.bare_line_ending = true;
                self.stopped = true;
                self.state = State::Text;
            }
            BareLineEndings::Normalize => {
                self.push(b"\r\n", false, out);
                self.line_len = 0;
                self.state = State::SoftLineStart;
            }
        }
    }

    /// Appends content, truncated exactly at whichever limit it crosses first, so the output
    /// does not depend on how the input was split.
    fn push(&mut self, bytes: &[u8], in_line: bool, out: &mut Vec<u8>) {
        let mut n = bytes.len();
        if in_line {
            let room = self.limits.max_line.saturating_sub(self.line_len);
            self.line_len = self.line_len.saturating_add(bytes.len());
            if bytes.len() > room {
                self.outcome.line_too_long = true;
                n = n.min(room);
            }
        }
        let room = self
            .limits
            .max_size
            .saturating_sub(self.outcome.content_octets);
        self.outcome.content_octets = self.outcome.content_octets.saturating_add(bytes.len());
        if bytes.len() > room {
            self.outcome.size_exceeded = true;
            n = n.min(room);
        }
        if !self.stopped {
            out.extend_from_slice(&bytes[..n]);
        }
        if self.outcome.line_too_long || self.outcome.size_exceeded {
            self.stopped = true;
        }
    }
}

/// Counts exactly `size` octets of a BDAT chunk (RFC 3030 §2): no unstuffing, no line endings
/// to look at (BINARYMIME content is arbitrary octets).
#[derive(Clone, Debug)]
pub struct BdatReceiver {
    remaining: u64,
    appending: bool,
    exceeded: bool,
}

impl BdatReceiver {
    /// Takes the whole chunk.
    pub fn new(size: u64) -> Self {
        Self {
            remaining: size,
            appending: true,
            exceeded: false,
        }
    }

    /// Takes the chunk only if it fits in `room` octets (what is left of the message size
    /// limit); otherwise consumes it without appending anything and reports
    /// [`BdatReceiver::exceeded`]. RFC 3030 §2 has the server read the whole chunk before it
    /// replies 552, so the client stays in step.
    pub fn with_limit(size: u64, room: usize) -> Self {
        let fits = usize::try_from(size).is_ok_and(|s| s <= room);
        Self {
            remaining: size,
            appending: fits,
            exceeded: !fits,
        }
    }

    /// Consumes the chunk without appending (after an earlier chunk failed, or a refused
    /// transaction: the octets must still be read to find the next command).
    pub fn discard(size: u64) -> Self {
        Self {
            remaining: size,
            appending: false,
            exceeded: false,
        }
    }

    /// Stops appending from here on; the rest of the chunk is still consumed.
    pub fn stop_appending(&mut self) {
        self.appending = false;
    }

    /// Consumes up to the rest of the chunk from `input`, appending it to `out` unless
    /// appending stopped; returns `(consumed, done)`. `input[consumed..]` belongs to whatever
    /// follows the chunk.
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(input.len());
        if self.appending {
            out.extend_from_slice(&input[..n]);
        }
        self.remaining -= n as u64;
        (n, self.remaining == 0)
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    /// Whether the chunk did not fit the room given to [`BdatReceiver::with_limit`].
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{every_split, Splitter};

    #[derive(Debug, PartialEq, Eq)]
    struct Decoded {
        out: Vec<u8>,
        consumed: usize,
        done: bool,
        outcome: DataOutcome,
    }

    fn feed(limits: DataLimits, pieces: &[&[u8]]) -> Decoded {
        let mut rx = DataReceiver::new(limits);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut done = false;
        for piece in pieces {
            let (n, d) = rx.ingest(piece, &mut out);
            consumed += n;
            if d {
                done = true;
                break;
            }
            assert_eq!(
                n,
                piece.len(),
                "a receiver that is not done consumes everything"
            );
        }
        Decoded {
            out,
            consumed,
            done,
            outcome: rx.outcome(),
        }
    }

    /// Feeds `input` whole, one byte at a time, in two pieces cut at every position and in
    /// random pieces; every feed must decode the same. Returns the decoding.
    fn decode_every_way(limits: DataLimits, input: &[u8]) -> Decoded {
        let whole = feed(limits, &[input]);
        assert_eq!(whole.outcome.octets, whole.consumed);
        for pieces in every_split(input) {
            assert_eq!(feed(limits, &pieces), whole, "split {pieces:?}");
        }
        let mut rng = Splitter::new(input.len() as u64 ^ 0xD47A);
        for _ in 0..100 {
            let pieces = rng.random_split(input);
            assert_eq!(feed(limits, &pieces), whole, "split {pieces:?}");
        }
        whole
    }

    fn reject() -> DataLimits {
        DataLimits::new(1 << 20)
    }

    fn normalize() -> DataLimits {
        DataLimits {
            bare_line_endings: BareLineEndings::Normalize,
            ..DataLimits::new(1 << 20)
        }
    }

    struct Case {
        name: &'static str,
        input: &'static [u8],
        out: &'static [u8],
        /// Where the terminator ends, or None if the data is not over.
        end: Option<usize>,
        bare: bool,
    }

    fn check(limits: DataLimits, cases: &[Case]) {
        for case in cases {
            let d = decode_every_way(limits, case.input);
            assert_eq!(
                String::from_utf8_lossy(&d.out),
                String::from_utf8_lossy(case.out),
                "{}",
                case.name
            );
            match case.end {
                Some(end) => {
                    assert!(d.done, "{}: not done", case.name);
                    assert_eq!(d.consumed, end, "{}", case.name);
                }
                None => {
                    assert!(!d.done, "{}: ended early", case.name);
                    assert_eq!(d.consumed, case.input.len(), "{}", case.name);
                }
            }
            assert_eq!(d.outcome.bare_line_ending, case.bare, "{}", case.name);
            assert!(
                !d.outcome.size_exceeded && !d.outcome.line_too_long,
                "{}",
                case.name
            );
        }
    }

    const fn ends(input: &'static [u8], out: &'static [u8], name: &'static str) -> Case {
        Case {
            name,
            input,
            out,
            end: Some(input.len()),
            bare: false,
        }
    }

    #[test]
    fn immediate_terminator_is_an_empty_message() {
        check(reject(), &[ends(b".\r\n", b"", "empty")]);
        check(normalize(), &[ends(b".\r\n", b"", "empty")]);
    }

    #[test]
    fn plain_message_ends_on_crlf_dot_crlf() {
        check(
            reject(),
            &[
                ends(
                    b"Subject: hi\r\n\r\nbody\r\n.\r\n",
                    b"Subject: hi\r\n\r\nbody\r\n",
                    "plain",
                ),
                ends(b"\r\n.\r\n", b"\r\n", "one empty line"),
                ends(b"a.b\r\n.\r\n", b"a.b\r\n", "dot inside a line"),
                ends(b"a\r\n.\r\n", b"a\r\n", "one line"),
            ],
        );
    }

    #[test]
    fn dot_stuffing_is_removed() {
        check(
            reject(),
            &[
                ends(b"..leading\r\n.\r\n", b".leading\r\n", "stuffed line"),
                ends(b"..\r\n.\r\n", b".\r\n", "stuffed lone dot"),
                ends(b"...\r\n.\r\n", b"..\r\n", "stuffed double dot"),
                ends(
                    b"a\r\n..\r\nb\r\n.\r\n",
                    b"a\r\n.\r\nb\r\n",
                    "stuffed mid message",
                ),
                ends(
                    b".x\r\n.\r\n",
                    b"x\r\n",
                    "unstuffed leading dot deleted (RFC 5321 4.5.2)",
                ),
            ],
        );
    }

    #[test]
    fn incomplete_data_is_not_done() {
        check(
            reject(),
            &[
                Case {
                    name: "no terminator",
                    input: b"a\r\nb\r\n",
                    out: b"a\r\nb\r\n",
                    end: None,
                    bare: false,
                },
                Case {
                    name: "dot without CRLF before",
                    input: b"a.\r\n",
                    out: b"a.\r\n",
                    end: None,
                    bare: false,
                },
                Case {
                    name: "terminator cut short",
                    input: b"a\r\n.\r",
                    out: b"a\r\n",
                    end: None,
                    bare: false,
                },
            ],
        );
    }

    #[test]
    fn pipelined_command_after_terminator_is_left_unconsumed() {
        let input = b"a\r\n.\r\nQUIT\r\n";
        let d = decode_every_way(reject(), input);
        assert!(d.done);
        assert_eq!(d.out, b"a\r\n");
        assert_eq!(&input[d.consumed..], b"QUIT\r\n");
        assert_eq!(d.outcome.octets, 6);
    }

    #[test]
    fn ingest_after_done_consumes_nothing() {
        let mut rx = DataReceiver::new(reject());
        let mut out = Vec::new();
        assert_eq!(rx.ingest(b".\r\nNOOP\r\n", &mut out), (3, true));
        assert_eq!(rx.ingest(b"NOOP\r\n", &mut out), (0, true));
        assert!(rx.is_done());
    }

    #[test]
    fn binary_octets_pass_through() {
        check(
            reject(),
            &[ends(
                b"\x00\xff\x80\x7f\t\x1b\r\n.\r\n",
                b"\x00\xff\x80\x7f\t\x1b\r\n",
                "binary",
            )],
        );
    }

    /// Each smuggling variant, followed by a smuggled command and then the real terminator:
    /// the data must end only at the real terminator.
    const SMUGGLING: &[(&str, &[u8])] = &[
        ("LF.LF", b"a\n.\nMAIL FROM:<x@y.example>\r\n.\r\n"),
        ("LF.CRLF", b"a\n.\r\nMAIL FROM:<x@y.example>\r\n.\r\n"),
        ("CR.CRLF", b"a\r.\r\nMAIL FROM:<x@y.example>\r\n.\r\n"),
        ("CR.CR", b"a\r.\rMAIL FROM:<x@y.example>\r\n.\r\n"),
        ("CRLF.LF", b"a\r\n.\nMAIL FROM:<x@y.example>\r\n.\r\n"),
        ("CRLF.CR", b"a\r\n.\rMAIL FROM:<x@y.example>\r\n.\r\n"),
        ("CR.LF", b"a\r.\nMAIL FROM:<x@y.example>\r\n.\r\n"),
        (
            "CRLF.CRCRLF",
            b"a\r\n.\r\r\nMAIL FROM:<x@y.example>\r\n.\r\n",
        ),
        ("LF at start", b"\n.\nMAIL FROM:<x@y.example>\r\n.\r\n"),
    ];

    #[test]
    fn smuggling_variants_do_not_end_data_in_reject_mode() {
        for (name, input) in SMUGGLING {
            let d = decode_every_way(reject(), input);
            assert!(d.done, "{name}");
            assert_eq!(d.consumed, input.len(), "{name}: ended early");
            assert!(d.outcome.bare_line_ending, "{name}");
            assert!(!d.outcome.is_acceptable(), "{name}");
            // At most "a\r\n." got out before the bare line ending stopped appending.
            assert!(
                d.out.len() <= 4,
                "{name}: appended after the bare line ending"
            );
        }
    }

    #[test]
    fn smuggling_variants_do_not_end_data_in_normalize_mode() {
        for (name, input) in SMUGGLING {
            let d = decode_every_way(normalize(), input);
            assert!(d.done, "{name}");
            assert_eq!(d.consumed, input.len(), "{name}: ended early");
            assert!(d.outcome.is_acceptable(), "{name}");
            // The smuggled command became content, and every line ending in it is CRLF.
            assert!(
                d.out.windows(4).any(|w| w == b"MAIL"),
                "{name}: {:?}",
                String::from_utf8_lossy(&d.out)
            );
            assert_crlf_only(&d.out, name);
        }
    }

    fn assert_crlf_only(out: &[u8], name: &str) {
        for (i, &b) in out.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "{name}: bare CR at {i}");
            }
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r', "{name}: bare LF at {i}");
            }
        }
    }

    #[test]
    fn reject_mode_flags_bare_lf_and_bare_cr_and_stops_appending() {
        check(
            reject(),
            &[
                Case {
                    name: "bare LF",
                    input: b"ab\ncd\r\n.\r\n",
                    out: b"ab",
                    end: Some(10),
                    bare: true,
                },
                Case {
                    name: "bare CR",
                    input: b"ab\rcd\r\n.\r\n",
                    out: b"ab",
                    end: Some(10),
                    bare: true,
                },
                Case {
                    name: "bare CR before CRLF",
                    input: b"ab\r\r\n.\r\n",
                    out: b"ab",
                    end: Some(8),
                    bare: true,
                },
                Case {
                    name: "bare CR right after a CRLF",
                    input: b"ok\r\n\r.\r\n",
                    out: b"ok\r\n",
                    end: None,
                    bare: true,
                },
            ],
        );
    }

    #[test]
    fn normalize_mode_turns_bare_line_endings_into_crlf() {
        check(
            normalize(),
            &[
                ends(b"a\nb\r\n.\r\n", b"a\r\nb\r\n", "bare LF"),
                ends(b"a\rb\r\n.\r\n", b"a\r\nb\r\n", "bare CR"),
                ends(b"a\r\r\n.\r\n", b"a\r\n\r\n", "bare CR then CRLF"),
                ends(
                    b"a\n\n.\r\n.\r\n",
                    b"a\r\n\r\n.\r\n",
                    "dot line after bare LF is content",
                ),
                ends(b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", "LF.LF is content"),
                ends(b"a\r.\r\n.\r\n", b"a\r\n.\r\n", "CR.CRLF is content"),
                ends(
                    b"\r\n.\nb\r\n.\r\n",
                    b"\r\n.\r\nb\r\n",
                    "CRLF.LF is content",
                ),
                ends(b".\rx\r\n.\r\n", b".\r\nx\r\n", "dot then bare CR"),
                ends(
                    b"a\n..x\r\n.\r\n",
                    b"a\r\n.x\r\n",
                    "stuffing removed after bare LF",
                ),
                ends(
                    b"a\n.x\r\n.\r\n",
                    b"a\r\nx\r\n",
                    "leading dot deleted after bare LF",
                ),
            ],
        );
    }

    #[test]
    fn line_at_the_limit_is_accepted() {
        let limits = DataLimits {
            max_line: 10,
            ..reject()
        };
        let d = decode_every_way(limits, b"0123456789\r\n..23456789\r\n.\r\n");
        assert!(d.outcome.is_acceptable());
        assert_eq!(d.out, b"0123456789\r\n.23456789\r\n");
    }

    #[test]
    fn line_over_the_limit_is_flagged_and_output_stops_at_the_limit() {
        let limits = DataLimits {
            max_line: 10,
            ..reject()
        };
        let d = decode_every_way(limits, b"ok\r\n0123456789X\r\nmore\r\n.\r\nQUIT\r\n");
        assert!(d.done);
        assert!(d.outcome.line_too_long);
        assert!(!d.outcome.size_exceeded);
        assert_eq!(d.out, b"ok\r\n0123456789");
        assert_eq!(d.consumed, 26);
        assert_eq!(
            d.outcome.error_reply().unwrap().to_bytes(),
            b"554 5.6.0 Message line too long (see RFC 5321 section 4.5.3.1.6)\r\n"
        );
    }

    #[test]
    fn line_limit_applies_after_normalized_line_endings() {
        let limits = DataLimits {
            max_line: 4,
            ..normalize()
        };
        let d = decode_every_way(limits, b"abcd\nabcd\r\n.\r\n");
        assert!(d.outcome.is_acceptable());
        let d = decode_every_way(limits, b"abcd\rabcde\r\n.\r\n");
        assert!(d.outcome.line_too_long);
        assert_eq!(d.out, b"abcd\r\nabcd");
    }

    #[test]
    fn message_at_the_size_limit_is_accepted() {
        let d = decode_every_way(DataLimits::new(5), b"abc\r\n.\r\n");
        assert!(d.outcome.is_acceptable());
        assert_eq!(d.outcome.content_octets, 5);
        assert_eq!(d.out, b"abc\r\n");
    }

    #[test]
    fn message_over_the_size_limit_is_flagged_and_output_stops_at_the_limit() {
        let d = decode_every_way(DataLimits::new(5), b"abcd\r\nefgh\r\n.\r\nQUIT\r\n");
        assert!(d.done);
        assert!(d.outcome.size_exceeded);
        assert_eq!(d.outcome.content_octets, 12);
        assert_eq!(d.out, b"abcd\r");
        assert_eq!(d.consumed, 15);
        assert_eq!(
            d.outcome.error_reply().unwrap().to_bytes(),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
    }

    #[test]
    fn zero_size_limit_accepts_only_the_empty_message() {
        assert!(decode_every_way(DataLimits::new(0), b".\r\n")
            .outcome
            .is_acceptable());
        let d = decode_every_way(DataLimits::new(0), b"\r\n.\r\n");
        assert!(d.outcome.size_exceeded);
        assert!(d.out.is_empty());
    }

    #[test]
    fn hostile_stream_keeps_output_bounded() {
        let limits = DataLimits {
            max_size: 1000,
            max_line: 100,
            bare_line_endings: BareLineEndings::Normalize,
        };
        let mut rx = DataReceiver::new(limits);
        let mut out = Vec::new();
        let chunk: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..1000 {
            let (n, done) = rx.ingest(&chunk, &mut out);
            if done {
                break;
            }
            assert_eq!(n, chunk.len());
            assert!(out.len() <= 1000);
        }
        assert!(out.len() <= 1000);
        assert!(!rx.outcome().is_acceptable());
    }

    #[test]
    fn outcome_reply_prefers_size_then_bare_line_ending() {
        let mut o = DataOutcome {
            size_exceeded: true,
            bare_line_ending: true,
            line_too_long: true,
            ..Default::default()
        };
        assert_eq!(o.error_reply().unwrap().code, 552);
        o.size_exceeded = false;
        assert_eq!(
            o.error_reply().unwrap().to_string(),
            "550 5.5.2 Bare CR or LF in message content (see RFC 5321 section 2.3.8)"
        );
        o.bare_line_ending = false;
        assert_eq!(o.error_reply().unwrap().code, 554);
        o.line_too_long = false;
        assert_eq!(o.error_reply(), None);
    }

    #[test]
    fn bare_line_endings_config_values_are_lowercase() {
        assert_eq!(
            serde_json::to_string(&BareLineEndings::Reject).unwrap(),
            "\"reject\""
        );
        assert_eq!(
            serde_json::from_str::<BareLineEndings>("\"normalize\"").unwrap(),
            BareLineEndings::Normalize
        );
        assert!(serde_json::from_str::<BareLineEndings>("\"Normalize\"").is_err());
    }

    /// Dot-stuffs `lines` the way a client must (RFC 5321 §4.5.2) and adds the terminator.
    fn encode(lines: &[Vec<u8>]) -> Vec<u8> {
        let mut wire = Vec::new();
        for line in lines {
            if line.first() == Some(&b'.') {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
        wire
    }

    #[test]
    fn random_messages_round_trip_through_stuffing() {
        let mut rng = Splitter::new(7);
        for _ in 0..300 {
            let lines: Vec<Vec<u8>> = (0..rng.next() % 6)
                .map(|_| {
                    (0..rng.next() % 5)
                        .map(|_| b"a.x\x00\xff"[(rng.next() % 5) as usize])
                        .collect()
                })
                .collect();
            let mut wire = encode(&lines);
            let end = wire.len();
            wire.extend_from_slice(b"RSET\r\n");
            let content: Vec<u8> = lines
                .iter()
                .flat_map(|l| l.iter().copied().chain(*b"\r\n"))
                .collect();
            for limits in [reject(), normalize()] {
                let d = decode_every_way(limits, &wire);
                assert!(d.done && d.outcome.is_acceptable());
                assert_eq!(d.consumed, end);
                assert_eq!(d.out, content);
            }
        }
    }

    #[test]
    fn random_line_ending_soup_decodes_the_same_however_split() {
        let mut rng = Splitter::new(11);
        for _ in 0..300 {
            let input: Vec<u8> = (0..rng.next() % 24)
                .map(|_| b"a.\r\n"[(rng.next() % 4) as usize])
                .collect();
            for limits in [
                reject(),
                normalize(),
                DataLimits {
                    max_size: 6,
                    max_line: 3,
                    bare_line_endings: BareLineEndings::Normalize,
                },
            ] {
                let d = decode_every_way(limits, &input);
                assert!(d.out.len() <= limits.max_size);
                if d.done {
                    assert!(input[..d.consumed].ends_with(b"\r\n.\r\n") || d.consumed == 3);
                }
                // (Truncation at the size limit may cut a CRLF in half.)
                if limits.bare_line_endings == BareLineEndings::Normalize
                    && !d.outcome.size_exceeded
                {
                    assert_crlf_only(&d.out, "soup");
                }
            }
        }
    }

    fn bdat_feed(mut rx: BdatReceiver, pieces: &[&[u8]]) -> (Vec<u8>, usize, bool) {
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            let (n, done) = rx.ingest(piece, &mut out);
            consumed += n;
            if done {
                return (out, consumed, true);
            }
        }
        (out, consumed, rx.is_done())
    }

    #[test]
    fn bdat_takes_exactly_size_octets_however_split() {
        let input = b"abc\r\n.\r\n\nxyzNOOP\r\n";
        for pieces in every_split(input) {
            let (out, consumed, done) = bdat_feed(BdatReceiver::new(12), &pieces);
            assert!(done);
            assert_eq!(consumed, 12);
            assert_eq!(
                out, b"abc\r\n.\r\n\nxyz",
                "no unstuffing, no line-ending checks"
            );
        }
    }

    #[test]
    fn bdat_zero_size_is_done_at_once() {
        let mut rx = BdatReceiver::new(0);
        assert!(rx.is_done());
        assert_eq!(rx.ingest(b"NOOP\r\n", &mut Vec::new()), (0, true));
    }

    #[test]
    fn bdat_incomplete_chunk_waits_for_more() {
        let (out, consumed, done) = bdat_feed(BdatReceiver::new(10), &[b"abc", b"de"]);
        assert!(!done);
        assert_eq!((out.as_slice(), consumed), (&b"abcde"[..], 5));
    }

    #[test]
    fn bdat_over_limit_consumes_without_appending() {
        let rx = BdatReceiver::with_limit(10, 9);
        assert!(rx.exceeded());
        let (out, consumed, done) = bdat_feed(rx, &[b"0123456789QUIT\r\n"]);
        assert!(done);
        assert_eq!(consumed, 10);
        assert!(out.is_empty());
        let rx = BdatReceiver::with_limit(10, 10);
        assert!(!rx.exceeded());
        assert_eq!(bdat_feed(rx, &[b"0123456789"]).0, b"0123456789");
    }

    #[test]
    fn bdat_discard_and_stop_appending() {
        let (out, consumed, done) = bdat_feed(BdatReceiver::discard(4), &[b"abcdef"]);
        assert!(done && out.is_empty() && consumed == 4);
        let mut rx = BdatReceiver::new(6);
        let mut out = Vec::new();
        assert_eq!(rx.ingest(b"abc", &mut out), (3, false));
        rx.stop_appending();
        assert_eq!(rx.ingest(b"defgh", &mut out), (3, true));
        assert_eq!(out, b"abc");
        assert_eq!(rx.remaining(), 0);
    }
}
