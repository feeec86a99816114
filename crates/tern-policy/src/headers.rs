//! Header sanity at the end of DATA (RFC 5322 §3.6): exactly one `From:` for everyone (a
//! second one is the classic way to show one author and have DMARC check another), and, on
//! submission (an authenticated client or the submission ports), a `From:` at all plus the
//! `Date:` and `Message-ID:` a message must carry (RFC 6409 §8.2–8.3 lets a submission server
//! add them; an MSA that does not leaves them to every later hop).

use crate::PolicyReply;

/// What to do with a message's header section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderFixes {
    /// Fields to add (each `Name: value\r\n`), in order.
    pub add: String,
}

/// Counts the fields named `name` at the start of a line in the header section.
pub(crate) fn count(header: &[u8], name: &[u8]) -> usize {
    header
        .split(|&b| b == b'\n')
        .filter(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name)
                && line[name.len()] == b':'
        })
        .count()
}

/// The header section of `message`: everything before the first empty line.
pub fn header_section(message: &[u8]) -> &[u8] {
    let mut start = 0;
    for (i, &b) in message.iter().enumerate() {
        if b == b'\n' {
            let line = &message[start..i];
            if line.is_empty() || line == b"\r" {
                return &message[..start];
            }
            start = i + 1;
        }
    }
    message
}

/// The fields of `message`'s header section that claim to come from us — an
/// `Authentication-Results:` whose authserv-id is `hostname`, or any `X-Tern-Score:` — removed
/// (with their continuation lines). `None` when there are none, the usual case, so nothing is
/// copied.
pub fn strip_ours(message: &[u8], hostname: &str) -> Option<Vec<u8>> {
    let header = header_section(message);
    let ours = |field: &[u8]| -> bool {
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return false;
        };
        let name = &field[..colon];
        if name.eq_ignore_ascii_case(b"x-tern-score") {
            return true;
        }
        if !name.eq_ignore_ascii_case(b"authentication-results") {
            return false;
        }
        // authserv-id: the value's first token, before `;` (RFC 8601 §2.2), possibly after
        // folding whitespace or a comment we do not try to parse.
        let value = String::from_utf8_lossy(&field[colon + 1..]);
        let id = value
            .split(';')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        id.trim_end_matches('.')
            .eq_ignore_ascii_case(hostname.trim_end_matches('.'))
    };
    // Split the section into fields: a line starting with space or tab continues the field.
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    while start < header.len() {
        let end = header[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(header.len(), |i| start + i + 1);
        match header[start] {
            b' ' | b'\t' if !fields.is_empty() => fields.last_mut().expect("not empty").1 = end,
            _ => fields.push((start, end)),
        }
        start = end;
    }
    if !fields.iter().any(|&(a, b)| ours(&header[a..b])) {
        return None;
    }
    let mut out = Vec::with_capacity(message.len());
    for &(a, b) in &fields {
        if !ours(&header[a..b]) {
            out.extend_from_slice(&header[a..b]);
        }
    }
    out.extend_from_slice(&message[header.len()..]);
    Some(out)
}

/// Checks `message` (headers and body, CRLF) and says which fields to add.
/// `message_id` is the id to use when a submitter's message lacks one (`<id@hostname>`),
/// `date` the RFC 5322 date for a missing `Date:`.
pub fn check(
    message: &[u8],
    submitter: bool,
    message_id: &str,
    date: &str,
) -> Result<HeaderFixes, PolicyReply> {
    let header = header_section(message);
    let from = count(header, b"from");
    if from > 1 {
        return Err(PolicyReply::new(
            550,
            (5, 6, 0),
            "Error: more than one From header (RFC 5322 §3.6)",
        ));
    }
    let mut fixes = HeaderFixes::default();
    if !submitter {
        return Ok(fixes);
    }
    if from == 0 {
        return Err(PolicyReply::new(
            550,
            (5, 6, 0),
            "Error: message has no From header (RFC 5322 §3.6)",
        ));
    }
    if count(header, b"date") == 0 {
        fixes.add.push_str(&format!("Date: {date}\r\n"));
    }
    if count(header, b"message-id") == 0 {
        fixes
            .add
            .push_str(&format!("Message-ID: <{message_id}>\r\n"));
    }
    Ok(fixes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "Sun, 22 Nov 2026 10:00:00 +0000";

    #[test]
    fn strips_fields_claiming_to_be_ours() {
        let msg = b"Authentication-Results: mx.test;\r\n\tspf=pass smtp.mailfrom=a@x\r\nAuthentication-Results: other.example; dkim=pass\r\nX-Tern-Score: -100\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.test; in the body\r\n";
        let out = strip_ours(msg, "MX.test").unwrap();
        assert_eq!(
            out,
            b"Authentication-Results: other.example; dkim=pass\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.test; in the body\r\n"
        );
        assert_eq!(strip_ours(&out, "mx.test"), None);
    }

    #[test]
    fn one_from_and_submission_fields() {
        let full = b"From: a@x.test\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\nFrom: in body\r\n";
        assert_eq!(check(full, true, "id@h", DATE).unwrap().add, "");
        let bare = b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n";
        assert_eq!(
            check(bare, true, "id@h", DATE).unwrap().add,
            format!("Date: {DATE}\r\nMessage-ID: <id@h>\r\n")
        );
        // Strangers' mail is not completed (that is the sending MSA's job).
        assert_eq!(check(bare, false, "id@h", DATE).unwrap().add, "");
        let two = b"From: a@x.test\r\nFROM: b@y.test\r\n\r\n";
        assert_eq!(check(two, false, "id@h", DATE).unwrap_err().code, 550);
        let none = b"Subject: s\r\n\r\n";
        assert!(check(none, true, "id@h", DATE).is_err());
        assert!(check(none, false, "id@h", DATE).is_ok());
        // A field named like another one's prefix does not count.
        let fromx = b"From-X: 1\r\nFrom: a@x\r\nDated: 1\r\n\r\n";
        assert!(check(fromx, true, "id@h", DATE)
            .unwrap()
            .add
            .starts_with("Date:"));
    }
}
