//! Breaking lines that are too long for SMTP (RFC 5321 §4.5.3.1.6: at most 1000 octets with the
//! CRLF, i.e. 998 before it; RFC 5322 §2.1.1 sets the same limit for the message itself).
//!
//! This does what Postfix's SMTP client does with `smtp_line_length_limit` (998 by default):
//! a line longer than the limit is broken by inserting CRLF followed by a space, so the
//! continuation line starts with whitespace. Postfix does this for header and body lines alike
//! (`smtp_text_out()` in `src/smtp/smtp_proto.c` writes `limit` octets, ends the line and
//! writes one space before the rest; postconf(5) gives the reason: to minimise the damage to
//! MIME-formatted mail, since a line starting with a space can be neither a MIME boundary nor a
//! header field). In a header this is a folded field (RFC 5322 §2.2.3); in the body it changes
//! the text, which cannot be helped.
//!
//! One refinement over Postfix: when the line has a space or tab in the last
//! [`WHITESPACE_WINDOW`] octets before the limit, the line is broken just before that
//! whitespace and nothing is inserted but the CRLF, so the continuation starts with the
//! original whitespace. That is exactly RFC 5322 folding: unfolding gives back the original
//! header field, and in the body no octet is added. Only without such whitespace is the line
//! hard-broken (Postfix's way), and then never inside a UTF-8 sequence when that can be
//! avoided.
//!
//! A line ends at LF; a CR just before it belongs to the line end and is not counted. Inserted
//! line ends are always CRLF.

use std::borrow::Cow;

/// The longest line RFC 5321 §4.5.3.1.6 allows, without its CRLF.
pub const MAX_LINE: usize = 998;

/// How far back from the limit a space or tab is looked for before a line is hard-broken.
pub const WHITESPACE_WINDOW: usize = 200;

/// Breaks every line of `content` longer than `max` octets (not counting its line end) so that
/// none is longer than `max`; see the module documentation for how. Returns the content
/// unchanged, without copying, when no line is too long (the usual case). A `max` below 2 is
/// taken as 2 (a hard break needs room for the inserted space and at least one octet).
pub fn fold_long_lines(content: &[u8], max: usize) -> Cow<'_, [u8]> {
    let max = max.max(2);
    // The usual answer is "no line is too long": find it with memchr, not byte by byte.
    let mut start = 0;
    let too_long = memchr::memchr_iter(b'\n', content)
        .chain(std::iter::once(content.len()))
        .any(|end| {
            let long = content_len(&content[start..end]) > max;
            start = end + 1;
            long
        });
    if !too_long {
        return Cow::Borrowed(content);
    }
    let mut out = Vec::with_capacity(content.len() + content.len() / max * 3 + 3);
    let mut rest = content;
    while !rest.is_empty() {
        let (line, end) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line_end = if i > 0 && rest[i - 1] == b'\r' {
                    i - 1
                } else {
                    i
                };
                (&rest[..line_end], &rest[line_end..=i])
            }
            None => (rest, &rest[rest.len()..]),
        };
        fold_line(line, max, &mut out);
        out.extend_from_slice(end);
        rest = &rest[line.len() + end.len()..];
    }
    Cow::Owned(out)
}

/// The length of `line` (which may end with the CR of its CRLF) without that CR.
fn content_len(line: &[u8]) -> usize {
    line.len() - usize::from(line.ends_with(b"\r"))
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Writes `line` (no line end) to `out` as one or more lines of at most `max` octets, joined by
/// CRLF; every line after the first starts with whitespace.
fn fold_line(line: &[u8], max: usize, out: &mut Vec<u8>) {
    let mut pos = 0;
    // Whether the current output line starts with a space we inserted.
    let mut inserted_space = false;
    loop {
        let budget = max - usize::from(inserted_space);
        if line.len() - pos <= budget {
            out.extend_from_slice(&line[pos..]);
            return;
        }
        // Break before whitespace at `p` (the output line is line[pos..p], at most `budget`
        // octets) when there is some in the window and the part before it is not only
        // whitespace (a whitespace-only line is not a valid folded header line).
        let first_text = line[pos..]
            .iter()
            .position(|&b| !is_wsp(b))
            .map(|i| pos + i);
        let lowest = (pos + budget)
            .saturating_sub(WHITESPACE_WINDOW)
            .max(pos + 1);
        let at_space = first_text.and_then(|f| {
            let from = lowest.max(f + 1);
            (from..=pos + budget).rev().find(|&p| is_wsp(line[p]))
        });
        match at_space {
            Some(p) => {
                out.extend_from_slice(&line[pos..p]);
                out.extend_from_slice(b"\r\n");
                pos = p;
                inserted_space = false;
            }
            None => {
                // Hard break, not inside a UTF-8 sequence: back up over continuation octets
                // (at most 3, the longest tail of a UTF-8 sequence).
                let mut p = pos + budget;
                let mut backed = 0;
                while backed < 3 && p > pos + 1 && line[p] & 0xC0 == 0x80 {
                    p -= 1;
                    backed += 1;
                }
                if line[p] & 0xC0 == 0x80 {
                    // Not UTF-8 after all (too many continuation octets): break at the limit.
                    p = pos + budget;
                }
                out.extend_from_slice(&line[pos..p]);
                out.extend_from_slice(b"\r\n ");
                pos = p;
                inserted_space = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `out`, without its CRLF, is at most `max` octets; every line ends with
    /// CRLF except perhaps the last.
    fn assert_lines_fit(out: &[u8], max: usize) {
        for line in out.split(|&b| b == b'\n') {
            assert!(
                content_len(line) <= max,
                "line of {} octets: {:?}...",
                content_len(line),
                String::from_utf8_lossy(&line[..line.len().min(40)])
            );
        }
    }

    /// The lines of `out`, each with its CR if it had one (split at LF).
    fn lines(out: &[u8]) -> Vec<&[u8]> {
        out.split(|&b| b == b'\n').collect()
    }

    #[test]
    fn short_lines_are_borrowed_unchanged() {
        let content = b"Subject: hi\r\n\r\nshort body\r\nno final line end";
        assert!(matches!(
            fold_long_lines(content, MAX_LINE),
            Cow::Borrowed(c) if c == content
        ));
        assert!(matches!(fold_long_lines(b"", MAX_LINE), Cow::Borrowed(b"")));
    }

    #[test]
    fn exactly_998_is_unchanged_and_999_is_folded() {
        let mut content = vec![b'a'; 998];
        content.extend_from_slice(b"\r\n");
        assert!(matches!(
            fold_long_lines(&content, MAX_LINE),
            Cow::Borrowed(_)
        ));

        let mut content = vec![b'a'; 999];
        content.extend_from_slice(b"\r\n");
        let out = fold_long_lines(&content, MAX_LINE);
        assert!(matches!(out, Cow::Owned(_)));
        let mut expected = vec![b'a'; 998];
        expected.extend_from_slice(b"\r\n a\r\n");
        assert_eq!(&*out, &expected[..]);
    }

    #[test]
    fn a_very_long_line_is_broken_into_lines_that_fit() {
        // 200 KB of words: every break falls on whitespace.
        let words: Vec<u8> = b"lorem ipsum dolor sit amet "
            .iter()
            .copied()
            .cycle()
            .take(200 * 1024)
            .collect();
        let mut content = b"Subject: long\r\n\r\n".to_vec();
        content.extend_from_slice(&words);
        content.extend_from_slice(b"\r\nend\r\n");
        let out = fold_long_lines(&content, MAX_LINE);
        assert_lines_fit(&out, MAX_LINE);
        assert!(out.ends_with(b"\r\nend\r\n"));
        // Breaks before existing whitespace add only the CRLFs: removing them gives the
        // original back.
        let rejoined = String::from_utf8(out.to_vec())
            .unwrap()
            .replace("\r\n ", " ");
        assert_eq!(rejoined.as_bytes(), &content[..]);

        // 200 KB with no whitespace at all: hard breaks.
        let mut content = vec![b'x'; 200 * 1024];
        content.extend_from_slice(b"\r\n");
        let out = fold_long_lines(&content, MAX_LINE);
        assert_lines_fit(&out, MAX_LINE);
        let ls = lines(&out);
        assert_eq!(ls[0].len(), 998 + 1); // with the CR
        assert!(ls[1..ls.len() - 1].iter().all(|l| l.starts_with(b" ")));
    }

    #[test]
    fn a_header_line_is_folded_at_whitespace() {
        let mut to = b"To: ".to_vec();
        for i in 0..100 {
            to.extend_from_slice(format!("user{i:03}@example.org, ").as_bytes());
        }
        to.truncate(to.len() - 2);
        let mut content = to.clone();
        content.extend_from_slice(b"\r\nSubject: x\r\n\r\nbody\r\n");
        let out = fold_long_lines(&content, MAX_LINE);
        assert_lines_fit(&out, MAX_LINE);
        let ls = lines(&out);
        assert!(ls[0].starts_with(b"To: user000@example.org,"));
        // The continuation starts with the field's own space; each line ends after a comma.
        assert!(
            ls[1].starts_with(b" user"),
            "{:?}",
            String::from_utf8_lossy(ls[1])
        );
        assert!(ls[0].ends_with(b",\r"));
        // RFC 5322 §2.2.3 unfolding (remove CRLF before WSP) gives the original field back.
        let text = String::from_utf8(out.to_vec()).unwrap();
        let unfolded = text.replace("\r\n ", " ");
        assert_eq!(unfolded.as_bytes(), &content[..]);
        assert!(text.ends_with("\r\nSubject: x\r\n\r\nbody\r\n"));
    }

    #[test]
    fn whitespace_too_far_back_is_not_used() {
        // One space early, then 1500 octets without whitespace: the space is more than 200
        // octets before the limit, so the line is hard-broken at 998.
        let mut content = b"word ".to_vec();
        content.extend(std::iter::repeat_n(b'y', 1500));
        let out = fold_long_lines(&content, MAX_LINE);
        let ls = lines(&out);
        assert_eq!(ls.len(), 2);
        assert_eq!(ls[0].len(), 998 + 1);
        assert_eq!(ls[1].len(), 1 + 1505 - 998);
        assert!(ls[1].starts_with(b" y"));
    }

    #[test]
    fn non_whitespace_is_hard_broken_with_crlf_space() {
        let content = b"abcdefghij\r\n";
        let out = fold_long_lines(content, 4);
        assert_eq!(&*out, b"abcd\r\n efg\r\n hij\r\n");
    }

    #[test]
    fn crlf_and_short_lines_are_preserved_around_a_folded_one() {
        let content = b"ab\r\nabcdefgh ijkl\r\n\r\nx\ny\r\n";
        let out = fold_long_lines(content, 10);
        assert_eq!(&*out, b"ab\r\nabcdefgh\r\n ijkl\r\n\r\nx\ny\r\n");
    }

    #[test]
    fn content_without_a_final_line_end() {
        let out = fold_long_lines(b"abcdefgh", 5);
        assert_eq!(&*out, b"abcde\r\n fgh");
        let out = fold_long_lines(b"ok\r\nabcdefgh", 5);
        assert_eq!(&*out, b"ok\r\nabcde\r\n fgh");
    }

    #[test]
    fn leading_whitespace_alone_is_not_a_line() {
        // Breaking at the second space would leave a whitespace-only line.
        let out = fold_long_lines(b"   abcdefghijk", 6);
        assert_lines_fit(&out, 6);
        assert!(!lines(&out)
            .iter()
            .any(|l| l.iter().all(|&b| is_wsp(b) || b == b'\r')));
    }

    #[test]
    fn utf8_sequences_are_not_split_by_hard_breaks() {
        // "é" is two octets; with max 5, "aaaaé" would split it after 'a'x4 + first octet.
        let content = "aaaaééé".as_bytes();
        let out = fold_long_lines(content, 5);
        let text = std::str::from_utf8(&out).expect("still UTF-8");
        assert_eq!(text, "aaaa\r\n éé\r\n é");
    }
}
