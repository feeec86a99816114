//! Size limits from the RFCs. Line lengths here count the terminating CRLF, as the RFCs do;
//! [`crate::line::LineReader`] takes its limit without the terminator, so a reader for command
//! lines is `LineReader::new(MAX_ANY_COMMAND_LINE - 2)` (or [`crate::line::LineReader::for_commands`]).

use crate::line::LineTooLong;

/// A command line, verb to CRLF inclusive: 512 octets (RFC 5321 §4.5.3.1.4).
pub const COMMAND_LINE: usize = 512;

/// Octets a `SIZE=` parameter may add to a MAIL line (RFC 1870 §3, item 5).
pub const SIZE_ALLOWANCE: usize = 26;

/// Octets the `RET=` and `ENVID=` parameters may add to a MAIL line (RFC 3461 §4).
pub const DSN_MAIL_ALLOWANCE: usize = 110;

/// Octets the `NOTIFY=` and `ORCPT=` parameters may add to a RCPT line (RFC 3461 §4).
pub const DSN_RCPT_ALLOWANCE: usize = 500;

/// Octets an `AUTH=` parameter may add to a MAIL line (RFC 4954 §3, item 5).
pub const AUTH_ALLOWANCE: usize = 500;

/// Octets the `SMTPUTF8` parameter may add to a MAIL line (RFC 6531 §3.1, item 5).
pub const SMTPUTF8_ALLOWANCE: usize = 10;

/// Room for `" BODY=BINARYMIME"` (16 octets). Neither RFC 6152 nor RFC 3030 grants an allowance
/// for `BODY=`, yet a client using every other allowance to the full may still add it; without
/// this a legal MAIL line could be refused for length.
pub const BODY_ALLOWANCE: usize = 16;

/// The longest MAIL line with every parameter this crate understands.
pub const MAX_MAIL_LINE: usize = max_command_line(true, false, COMMAND_LINE);

/// The longest RCPT line with `NOTIFY=` and `ORCPT=`.
pub const MAX_RCPT_LINE: usize = max_command_line(false, true, COMMAND_LINE);

/// The longest command line of any verb, CRLF included: what a reader must be able to buffer
/// before it has seen the verb.
pub const MAX_ANY_COMMAND_LINE: usize = max_any_command_line(COMMAND_LINE);

/// A line of message text, CRLF included: 1000 octets, not counting a stuffed leading dot
/// (RFC 5321 §4.5.3.1.6).
pub const TEXT_LINE: usize = 1000;

/// A reply line, CRLF included: 512 octets (RFC 5321 §4.5.3.1.5).
pub const REPLY_LINE: usize = 512;

/// A SASL response line during AUTH: RFC 4954 §4 calls 12288 octets sufficient for deployed
/// mechanisms and requires servers to take what their mechanisms produce.
pub const SASL_RESPONSE_LINE: usize = 12288;

/// A local part: 64 octets (RFC 5321 §4.5.3.1.1).
pub const LOCAL_PART: usize = 64;

/// A domain: 255 octets (RFC 5321 §4.5.3.1.2).
pub const DOMAIN: usize = 255;

/// A reverse- or forward-path, punctuation included: 256 octets (RFC 5321 §4.5.3.1.3).
pub const PATH: usize = 256;

/// The longest allowed line (CRLF included) for a verb, given the `base` limit for plain command
/// lines (normally [`COMMAND_LINE`]; a server may configure a larger one). MAIL and RCPT grow
/// by the allowances of the extensions whose parameters they may carry.
pub const fn max_command_line(verb_is_mail: bool, verb_is_rcpt: bool, base: usize) -> usize {
    if verb_is_mail {
        base + SIZE_ALLOWANCE
            + DSN_MAIL_ALLOWANCE
            + AUTH_ALLOWANCE
            + SMTPUTF8_ALLOWANCE
            + BODY_ALLOWANCE
    } else if verb_is_rcpt {
        base + DSN_RCPT_ALLOWANCE
    } else {
        base
    }
}

/// The largest of [`max_command_line`] over all verbs for a given `base`.
pub const fn max_any_command_line(base: usize) -> usize {
    let mail = max_command_line(true, false, base);
    let rcpt = max_command_line(false, true, base);
    if mail > rcpt {
        mail
    } else {
        rcpt
    }
}

/// [`max_command_line`] for a line (without its terminator) whose verb is not known yet: looks
/// at the first word only.
pub fn command_line_limit(line: &[u8], base: usize) -> usize {
    let verb = line.split(|&b| b == b' ').next().unwrap_or(&[]);
    max_command_line(
        verb.eq_ignore_ascii_case(b"MAIL"),
        verb.eq_ignore_ascii_case(b"RCPT"),
        base,
    )
}

/// Checks a command line (without its terminator) against its verb's limit, counting the CRLF
/// it came with as the RFCs do. A reader sized for [`MAX_ANY_COMMAND_LINE`] lets through a
/// 1000-octet NOOP; this is where such a line gets its `500 5.5.2`.
pub fn check_command_line(line: &[u8], base: usize) -> Result<(), LineTooLong> {
    if line.len() + 2 > command_line_limit(line, base) {
        Err(LineTooLong)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_line_allowance_adds_every_extension() {
        assert_eq!(MAX_MAIL_LINE, 512 + 26 + 110 + 500 + 10 + 16);
        assert_eq!(MAX_RCPT_LINE, 512 + 500);
        assert_eq!(MAX_ANY_COMMAND_LINE, MAX_MAIL_LINE);
    }

    #[test]
    fn configured_base_shifts_every_limit() {
        assert_eq!(max_command_line(false, false, 2048), 2048);
        assert_eq!(max_command_line(false, true, 2048), 2548);
        assert_eq!(max_any_command_line(2048), 2048 + MAX_MAIL_LINE - 512);
    }

    #[test]
    fn command_line_limit_sniffs_the_verb_case_insensitively() {
        assert_eq!(command_line_limit(b"mail FROM:<a@b>", 512), MAX_MAIL_LINE);
        assert_eq!(command_line_limit(b"Rcpt TO:<a@b>", 512), MAX_RCPT_LINE);
        assert_eq!(command_line_limit(b"NOOP", 512), 512);
        assert_eq!(command_line_limit(b"", 512), 512);
    }

    #[test]
    fn check_command_line_counts_the_crlf() {
        let noop = vec![b'N'; 510];
        assert!(check_command_line(&noop, COMMAND_LINE).is_ok());
        let noop = vec![b'N'; 511];
        assert_eq!(check_command_line(&noop, COMMAND_LINE), Err(LineTooLong));
        let mut mail = b"MAIL FROM:<a@b> ".to_vec();
        mail.resize(MAX_MAIL_LINE - 2, b'x');
        assert!(check_command_line(&mail, COMMAND_LINE).is_ok());
        mail.push(b'x');
        assert!(check_command_line(&mail, COMMAND_LINE).is_err());
    }
}
