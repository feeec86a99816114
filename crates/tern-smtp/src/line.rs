//! Cutting command lines out of a read buffer.

use bytes::{Buf, BytesMut};

use crate::reply::{EnhancedCode, Reply};

/// A line exceeded the reader's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line too long")]
pub struct LineTooLong;

impl LineTooLong {
    /// `500 5.5.2`: RFC 5321 §4.5.3.1.10 lists 500 for a line too long; RFC 3463 X.5.2 is a
    /// command that could not be interpreted.
    pub fn reply(&self) -> Reply {
        Reply::new(500, Some(EnhancedCode::new(5, 5, 2)), "Line too long")
    }
}

/// Splits a read buffer into command lines.
///
/// Accepts CRLF or a bare LF as the terminator of a command line, as Postfix does: the bare-LF
/// smuggling problem (a line end the receiver sees and a relay does not) only matters inside
/// DATA, which [`crate::data::DataReceiver`] handles strictly. A CR before the LF is stripped;
/// any other CR stays in the line for the parser to refuse.
///
/// The reader holds no bytes itself: it takes lines off the caller's buffer, so the caller can
/// hand the remainder to a DATA or BDAT receiver at any point and back again.
#[derive(Clone, Debug)]
pub struct LineReader {
    max_len: usize,
    discarding: bool,
}

impl LineReader {
    /// `max_len` is the longest line accepted, not counting its terminator.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            discarding: false,
        }
    }

    /// A reader for SMTP commands: room for the longest command line of any verb
    /// ([`crate::MAX_ANY_COMMAND_LINE`]); check each line against its own verb's limit with
    /// [`crate::check_command_line`].
    pub fn for_commands() -> Self {
        Self::new(crate::MAX_ANY_COMMAND_LINE - 2)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether the reader is dropping the rest of an over-long line.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Takes one complete line (without terminator) off the front of `buf`, or `None` if more
    /// bytes are needed.
    ///
    /// A line longer than `max_len` yields `Some(Err(LineTooLong))` once, then its bytes are
    /// discarded up to and including the next LF, possibly across calls, so `buf` never has to
    /// hold more than `max_len + 1` octets of it. The same input yields the same lines and
    /// errors however it is split across calls.
    pub fn read_line(&mut self, buf: &mut BytesMut) -> Option<Result<BytesMut, LineTooLong>> {
        if self.discarding {
            match buf.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    buf.advance(pos + 1);
                    self.discarding = false;
                }
                None => {
                    buf.clear();
                    return None;
                }
            }
        }
        // A legal line is at most max_len octets, a CR and the LF: look no further than that,
        // which also keeps each call O(max_len) when the client dribbles bytes.
        let window = buf.len().min(self.max_len.saturating_add(2));
        match buf[..window].iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let mut line = buf.split_to(pos + 1);
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(pos - 1);
                }
                if line.len() > self.max_len {
                    Some(Err(LineTooLong))
                } else {
                    Some(Ok(line))
                }
            }
            None => {
                // Without an LF in sight the line is too long once it has more than max_len
                // octets, except for a final CR that may yet turn out to be part of CRLF.
                let too_long = buf.len() > self.max_len.saturating_add(1)
                    || (buf.len() == self.max_len.saturating_add(1) && buf.last() != Some(&b'\r'));
                if too_long {
                    // Drop the line now, up to its LF if it already arrived (what follows is
                    // the next command), else everything, remembering to go on dropping.
                    match buf.iter().position(|&b| b == b'\n') {
                        Some(pos) => buf.advance(pos + 1),
                        None => {
                            buf.clear();
                            self.discarding = true;
                        }
                    }
                    Some(Err(LineTooLong))
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{every_split, Splitter};

    type Event = Result<Vec<u8>, LineTooLong>;

    fn read_all(max_len: usize, pieces: &[&[u8]]) -> (Vec<Event>, usize) {
        let mut reader = LineReader::new(max_len);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let mut high_water = 0;
        for piece in pieces {
            buf.extend_from_slice(piece);
            high_water = high_water.max(buf.len());
            while let Some(r) = reader.read_line(&mut buf) {
                events.push(r.map(|l| l.to_vec()));
            }
        }
        (events, high_water)
    }

    /// Feeds `input` whole, byte by byte, split in two at every position and in random pieces;
    /// asserts every feed gives the same events and returns them.
    fn lines_every_way(max_len: usize, input: &[u8]) -> Vec<Event> {
        let (whole, _) = read_all(max_len, &[input]);
        for pieces in every_split(input) {
            let (events, high_water) = read_all(max_len, &pieces);
            assert_eq!(events, whole, "split {pieces:?}");
            // Byte-at-a-time feeding shows the reader never needs more than a line's worth.
            if pieces.iter().all(|p| p.len() <= 1) {
                assert!(high_water <= max_len + 2, "held {high_water} octets");
            }
        }
        let mut rng = Splitter::new(input.len() as u64);
        for _ in 0..50 {
            let pieces = rng.random_split(input);
            assert_eq!(read_all(max_len, &pieces).0, whole, "split {pieces:?}");
        }
        whole
    }

    fn ok(s: &[u8]) -> Event {
        Ok(s.to_vec())
    }

    #[test]
    fn crlf_terminated_lines() {
        assert_eq!(
            lines_every_way(64, b"EHLO a\r\nNOOP\r\n"),
            vec![ok(b"EHLO a"), ok(b"NOOP")]
        );
    }

    #[test]
    fn bare_lf_terminates_a_command_line() {
        assert_eq!(
            lines_every_way(64, b"EHLO a\nNOOP\r\nQUIT\n"),
            vec![ok(b"EHLO a"), ok(b"NOOP"), ok(b"QUIT")]
        );
    }

    #[test]
    fn incomplete_line_waits_for_more() {
        assert_eq!(lines_every_way(64, b"EHLO a\r\nNOO"), vec![ok(b"EHLO a")]);
        assert_eq!(lines_every_way(64, b"NOOP\r"), vec![]);
    }

    #[test]
    fn empty_lines_are_lines() {
        assert_eq!(lines_every_way(64, b"\r\n\n"), vec![ok(b""), ok(b"")]);
    }

    #[test]
    fn only_the_cr_right_before_lf_is_stripped() {
        assert_eq!(lines_every_way(64, b"a\rb\r\r\n"), vec![ok(b"a\rb\r")]);
    }

    #[test]
    fn line_of_exactly_max_len_is_accepted() {
        assert_eq!(
            lines_every_way(4, b"abcd\r\nabcd\nx\r\n"),
            vec![ok(b"abcd"), ok(b"abcd"), ok(b"x")]
        );
    }

    #[test]
    fn line_over_max_len_errors_once_and_is_discarded() {
        assert_eq!(
            lines_every_way(4, b"abcde\r\nok\r\n"),
            vec![Err(LineTooLong), ok(b"ok")]
        );
        assert_eq!(
            lines_every_way(4, b"abcdefghijklmnopqrstuvwxyz\r\nok\r\n"),
            vec![Err(LineTooLong), ok(b"ok")]
        );
    }

    #[test]
    fn over_long_line_with_bare_lf_is_discarded_to_that_lf() {
        assert_eq!(
            lines_every_way(4, b"abcdefgh\nok\n"),
            vec![Err(LineTooLong), ok(b"ok")]
        );
    }

    #[test]
    fn over_long_lines_back_to_back_each_error_once() {
        assert_eq!(
            lines_every_way(3, b"aaaaaa\r\nbbbbbb\r\ncc\r\n"),
            vec![Err(LineTooLong), Err(LineTooLong), ok(b"cc")]
        );
    }

    #[test]
    fn over_long_line_without_end_keeps_buffer_bounded() {
        let mut reader = LineReader::new(8);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[b'x'; 100]);
        assert_eq!(reader.read_line(&mut buf), Some(Err(LineTooLong)));
        assert!(buf.is_empty());
        assert!(reader.is_discarding());
        for _ in 0..10 {
            buf.extend_from_slice(&[b'x'; 100]);
            assert_eq!(reader.read_line(&mut buf), None);
            assert!(buf.is_empty());
        }
        buf.extend_from_slice(b"xx\r\nQUIT\r\n");
        assert_eq!(
            reader.read_line(&mut buf),
            Some(Ok(BytesMut::from(&b"QUIT"[..])))
        );
        assert!(!reader.is_discarding());
    }

    #[test]
    fn trailing_cr_at_the_limit_waits_for_lf() {
        let mut reader = LineReader::new(4);
        let mut buf = BytesMut::from(&b"abcd\r"[..]);
        assert_eq!(reader.read_line(&mut buf), None);
        buf.extend_from_slice(b"\n");
        assert_eq!(
            reader.read_line(&mut buf),
            Some(Ok(BytesMut::from(&b"abcd"[..])))
        );
    }

    #[test]
    fn line_too_long_replies_500_5_5_2() {
        assert_eq!(
            LineTooLong.reply().to_bytes(),
            b"500 5.5.2 Line too long\r\n"
        );
    }

    #[test]
    fn remainder_stays_in_the_buffer_for_a_data_receiver() {
        let mut reader = LineReader::new(64);
        let mut buf = BytesMut::from(&b"DATA\r\nSubject: x\r\n"[..]);
        assert_eq!(
            reader.read_line(&mut buf),
            Some(Ok(BytesMut::from(&b"DATA"[..])))
        );
        assert_eq!(&buf[..], b"Subject: x\r\n");
    }
}
