//! Mailbox addresses and paths (RFC 5321 §4.1.2, internationalised by RFC 6531 §3.3).
//!
//! What is accepted:
//! - local parts as dot-strings or quoted strings; a quoted local part is kept unquoted in
//!   [`Address::local`] and quoted again by `Display` when it needs it;
//! - domains of LDH labels, and U-labels (UTF-8) as RFC 6531 allows. U-labels are checked only
//!   for the absence of controls, spaces and misplaced hyphens: full IDNA validation belongs
//!   to whoever resolves the domain;
//! - address literals `[192.0.2.1]` and `[IPv6:2001:db8::1]`. General address literals
//!   (`[tag:…]`, RFC 5321 §4.1.3) have no registered tag in use and are refused;
//! - source routes `<@a.example,@b.example:user@c.example>`, which RFC 5321 §3.3 and appendix C
//!   say to accept and ignore: the route is checked and dropped.
//!
//! Length limits are those of RFC 5321 §4.5.3.1.1-3, in octets as sent.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::limits::{DOMAIN, LOCAL_PART, PATH};

/// A mailbox `local@domain`. For an address literal, `domain` keeps its brackets
/// (`[192.0.2.1]`), so the two forms cannot be confused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    /// The local part, unquoted: `"john doe"@example.org` has local `john doe`.
    pub local: String,
    pub domain: String,
}

impl Address {
    pub fn new(local: impl Into<String>, domain: impl Into<String>) -> Self {
        Self {
            local: local.into(),
            domain: domain.into(),
        }
    }

    /// Parses a bare mailbox `local@domain` (no angle brackets, no source route).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let mut cur = Cursor::new(s);
        let mailbox = cur.mailbox()?;
        if !cur.at_end() {
            return Err(AddressError::Domain);
        }
        match mailbox {
            Mailbox::Full(address) => Ok(address),
            Mailbox::LocalOnly { .. } => Err(AddressError::MissingDomain),
        }
    }

    /// Whether the address is all ASCII. A non-ASCII address may only be used in a transaction
    /// that declared SMTPUTF8 (RFC 6531 §3.4).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// Whether the domain is an address literal (`[…]`).
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// The local part as it must be written on the wire: as is when it is a dot-string, else
    /// quoted with `\` before `"` and `\` (RFC 5321 §4.1.2 Quoted-string).
    pub fn quoted_local(&self) -> String {
        if is_dot_string(&self.local) {
            return self.local.clone();
        }
        let mut out = String::with_capacity(self.local.len() + 2);
        out.push('"');
        for c in self.local.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }
}

/// `local@domain`, the local part quoted if it needs to be.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.quoted_local(), self.domain)
    }
}

impl FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The MAIL FROM path. `<>` is the null reverse-path of bounces (RFC 5321 §4.5.5).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReversePath {
    #[default]
    Null,
    Address(Address),
}

impl ReversePath {
    pub fn address(&self) -> Option<&Address> {
        match self {
            ReversePath::Null => None,
            ReversePath::Address(a) => Some(a),
        }
    }

    pub fn is_ascii(&self) -> bool {
        self.address().is_none_or(Address::is_ascii)
    }
}

/// Without angle brackets; empty for the null path.
impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Address(a) => a.fmt(f),
        }
    }
}

/// The RCPT TO path. `<postmaster>` without a domain (any case) is the special address every
/// server must accept (RFC 5321 §4.5.1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardPath {
    Postmaster,
    Address(Address),
}

impl ForwardPath {
    pub fn address(&self) -> Option<&Address> {
        match self {
            ForwardPath::Postmaster => None,
            ForwardPath::Address(a) => Some(a),
        }
    }

    pub fn is_ascii(&self) -> bool {
        self.address().is_none_or(Address::is_ascii)
    }
}

/// Without angle brackets; `postmaster` for the bare postmaster.
impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("postmaster"),
            ForwardPath::Address(a) => a.fmt(f),
        }
    }
}

/// Why a path or address was refused. The messages carry no client input, so they are safe to
/// put in a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("angle brackets required")]
    MissingAngleBrackets,
    #[error("missing closing angle bracket")]
    Unterminated,
    #[error("empty address")]
    Empty,
    #[error("invalid local part")]
    LocalPart,
    #[error("domain missing")]
    MissingDomain,
    #[error("invalid domain")]
    Domain,
    #[error("invalid address literal")]
    AddressLiteral,
    #[error("invalid source route")]
    SourceRoute,
    #[error("local part longer than 64 octets")]
    LocalPartTooLong,
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    #[error("path longer than 256 octets")]
    PathTooLong,
}

/// Parses a path `<…>` at the start of `input`: `Ok((None, rest))` for `<>`, else the mailbox.
/// `rest` is what follows the closing `>` (the ESMTP parameters, for MAIL and RCPT).
pub fn parse_path(input: &str) -> Result<(Option<Address>, &str), AddressError> {
    let (path, rest) = parse_raw_path(input)?;
    match path {
        RawPath::Null => Ok((None, rest)),
        RawPath::Mailbox(Mailbox::Full(a)) => Ok((Some(a), rest)),
        RawPath::Mailbox(Mailbox::LocalOnly { .. }) => Err(AddressError::MissingDomain),
    }
}

/// Parses a MAIL FROM reverse-path at the start of `input`; returns it and what follows `>`.
pub fn parse_reverse_path(input: &str) -> Result<(ReversePath, &str), AddressError> {
    let (path, rest) = parse_path(input)?;
    Ok((path.map_or(ReversePath::Null, ReversePath::Address), rest))
}

/// Parses a RCPT TO forward-path at the start of `input`; returns it and what follows `>`.
pub fn parse_forward_path(input: &str) -> Result<(ForwardPath, &str), AddressError> {
    let (path, rest) = parse_raw_path(input)?;
    match path {
        RawPath::Null => Err(AddressError::Empty),
        RawPath::Mailbox(Mailbox::Full(a)) => Ok((ForwardPath::Address(a), rest)),
        RawPath::Mailbox(Mailbox::LocalOnly {
            local,
            quoted,
            routed,
        }) if !quoted && !routed && local.eq_ignore_ascii_case("postmaster") => {
            Ok((ForwardPath::Postmaster, rest))
        }
        RawPath::Mailbox(Mailbox::LocalOnly { .. }) => Err(AddressError::MissingDomain),
    }
}

/// Whether `domain` is a syntactically valid domain or address literal for a path (RFC 5321
/// §4.1.2 with RFC 6531 U-labels).
pub fn is_valid_domain(domain: &str) -> bool {
    let mut cur = Cursor::new(domain);
    cur.domain(false).is_ok() && cur.at_end()
}

/// The looser check for the EHLO/HELO argument: a domain or address literal, where labels may
/// also contain `_` because many Windows hosts announce such names and refusing them gains
/// nothing (the name is only logged and put in the Received header).
pub fn is_valid_helo_domain(domain: &str) -> bool {
    let mut cur = Cursor::new(domain);
    cur.domain(true).is_ok() && cur.at_end()
}

enum RawPath {
    Null,
    Mailbox(Mailbox),
}

enum Mailbox {
    Full(Address),
    /// A local part with no `@domain`: only `<postmaster>` may be like this.
    LocalOnly {
        local: String,
        quoted: bool,
        routed: bool,
    },
}

fn parse_raw_path(input: &str) -> Result<(RawPath, &str), AddressError> {
    let mut cur = Cursor::new(input);
    if !cur.eat(b'<') {
        return Err(AddressError::MissingAngleBrackets);
    }
    if cur.eat(b'>') {
        return Ok((RawPath::Null, &input[cur.pos..]));
    }
    // A-d-l ":" (RFC 5321 §4.1.2): checked, then ignored (RFC 5321 appendix C).
    let routed = cur.peek() == Some(b'@');
    if routed {
        loop {
            if !cur.eat(b'@') {
                return Err(AddressError::SourceRoute);
            }
            cur.domain(false).map_err(|_| AddressError::SourceRoute)?;
            if cur.eat(b':') {
                break;
            }
            if !cur.eat(b',') {
                return Err(AddressError::SourceRoute);
            }
        }
    }
    let mut mailbox = cur.mailbox()?;
    if let Mailbox::LocalOnly { routed: r, .. } = &mut mailbox {
        *r = routed;
    }
    match cur.peek() {
        Some(b'>') => {}
        None => return Err(AddressError::Unterminated),
        Some(_) => {
            return Err(match mailbox {
                Mailbox::Full(_) => AddressError::Domain,
                Mailbox::LocalOnly { .. } => AddressError::LocalPart,
            })
        }
    }
    cur.pos += 1;
    if cur.pos > PATH {
        return Err(AddressError::PathTooLong);
    }
    Ok((RawPath::Mailbox(mailbox), &input[cur.pos..]))
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn at_end(&self) -> bool {
        self.pos == self.s.len()
    }

    /// Mailbox = Local-part "@" ( Domain / address-literal ), or a lone local part.
    fn mailbox(&mut self) -> Result<Mailbox, AddressError> {
        let start = self.pos;
        let quoted = self.peek() == Some(b'"');
        let local = if quoted {
            self.quoted_string()?
        } else {
            self.dot_string()?
        };
        if self.pos - start > LOCAL_PART {
            return Err(AddressError::LocalPartTooLong);
        }
        if !self.eat(b'@') {
            return Ok(Mailbox::LocalOnly {
                local,
                quoted,
                routed: false,
            });
        }
        if local.is_empty() && !quoted {
            return Err(AddressError::LocalPart);
        }
        let domain = self.domain(false)?;
        Ok(Mailbox::Full(Address {
            local,
            domain: domain.to_string(),
        }))
    }

    /// Dot-string = Atom *("." Atom), atext widened to UTF-8 by RFC 6531 §3.3. Stops at the
    /// first octet that cannot continue it; the caller decides whether that octet is allowed.
    fn dot_string(&mut self) -> Result<String, AddressError> {
        let start = self.pos;
        let bytes = self.s.as_bytes();
        while self.pos < bytes.len() && (is_atext(bytes[self.pos]) || bytes[self.pos] == b'.') {
            self.pos += 1;
        }
        let local = &self.s[start..self.pos];
        // An empty dot-string is reported by the caller (it may be `<>`-like garbage or `@`).
        if !local.is_empty() && !is_dot_string(local) {
            return Err(AddressError::LocalPart);
        }
        Ok(local.to_string())
    }

    /// Quoted-string = DQUOTE *QcontentSMTP DQUOTE (RFC 5321 §4.1.2), qtextSMTP widened to UTF-8
    /// by RFC 6531 §3.3. Returns the content without quotes and escapes.
    fn quoted_string(&mut self) -> Result<String, AddressError> {
        let bytes = self.s.as_bytes();
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match bytes.get(self.pos) {
                None => return Err(AddressError::LocalPart),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => match bytes.get(self.pos + 1) {
                    // quoted-pairSMTP = %d92 %d32-126
                    Some(&c @ 32..=126) => {
                        out.push(c);
                        self.pos += 2;
                    }
                    _ => return Err(AddressError::LocalPart),
                },
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii
                Some(&c) if (32..=126).contains(&c) || c >= 0x80 => {
                    out.push(c);
                    self.pos += 1;
                }
                Some(_) => return Err(AddressError::LocalPart),
            }
        }
        // Only whole UTF-8 sequences were copied out of a &str, so this cannot fail.
        String::from_utf8(out).map_err(|_| AddressError::LocalPart)
    }

    /// Domain / address-literal. Stops at the first octet that cannot be part of it.
    fn domain(&mut self, helo: bool) -> Result<&'a str, AddressError> {
        let start = self.pos;
        let bytes = self.s.as_bytes();
        if self.peek() == Some(b'[') {
            let end = bytes[start..]
                .iter()
                .position(|&b| b == b']')
                .ok_or(AddressError::AddressLiteral)?;
            let literal = &self.s[start + 1..start + end];
            if !is_address_literal(literal) {
                return Err(AddressError::AddressLiteral);
            }
            self.pos = start + end + 1;
            return Ok(&self.s[start..self.pos]);
        }
        while self.pos < bytes.len() {
            let b = bytes[self.pos];
            if b.is_ascii_alphanumeric()
                || b == b'-'
                || b == b'.'
                || b >= 0x80
                || (helo && b == b'_')
            {
                self.pos += 1;
            } else {
                break;
            }
        }
        let domain = &self.s[start..self.pos];
        if domain.is_empty() {
            return Err(AddressError::Domain);
        }
        if domain.len() > DOMAIN {
            return Err(AddressError::DomainTooLong);
        }
        if !domain.split('.').all(|label| is_label(label, helo)) {
            return Err(AddressError::Domain);
        }
        Ok(domain)
    }
}

/// atext (RFC 5322 §3.2.3) plus the UTF-8 octets RFC 6531 §3.3 adds.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// Whether `s` is a Dot-string, i.e. needs no quoting.
fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

/// sub-domain = Let-dig [Ldh-str] (RFC 5321 §4.1.2), or a U-label (RFC 6531 §3.3); at most 63
/// octets (RFC 1035 §2.3.4).
fn is_label(label: &str, helo: bool) -> bool {
    if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
        return false;
    }
    label.chars().all(|c| {
        if c.is_ascii() {
            c.is_ascii_alphanumeric() || c == '-' || (helo && c == '_')
        } else {
            !c.is_control() && !c.is_whitespace()
        }
    })
}

/// The content of an address literal (RFC 5321 §4.1.3): IPv4 or `IPv6:` followed by an IPv6
/// address.
fn is_address_literal(literal: &str) -> bool {
    if let Some(tag) = literal.get(..5) {
        if tag.eq_ignore_ascii_case("IPv6:") {
            return Ipv6Addr::from_str(&literal[5..]).is_ok();
        }
    }
    is_ipv4_literal(literal)
}

/// IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT with a value of 0-255. Written out
/// rather than using `Ipv4Addr::from_str`, which refuses the leading zeros the grammar allows.
fn is_ipv4_literal(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            (1..=3).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n <= 255)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(local: &str, domain: &str) -> Address {
        Address::new(local, domain)
    }

    fn rev(input: &str) -> Result<(ReversePath, &str), AddressError> {
        parse_reverse_path(input)
    }

    fn fwd(input: &str) -> Result<(ForwardPath, &str), AddressError> {
        parse_forward_path(input)
    }

    #[test]
    fn plain_mailbox() {
        assert_eq!(
            rev("<user@example.org>"),
            Ok((ReversePath::Address(addr("user", "example.org")), ""))
        );
    }

    #[test]
    fn rest_after_the_path_is_returned() {
        assert_eq!(
            rev("<a@b.example> SIZE=10"),
            Ok((ReversePath::Address(addr("a", "b.example")), " SIZE=10"))
        );
    }

    #[test]
    fn null_reverse_path() {
        assert_eq!(rev("<>"), Ok((ReversePath::Null, "")));
        assert_eq!(
            rev("<> BODY=8BITMIME"),
            Ok((ReversePath::Null, " BODY=8BITMIME"))
        );
    }

    #[test]
    fn null_forward_path_is_refused() {
        assert_eq!(fwd("<>"), Err(AddressError::Empty));
    }

    #[test]
    fn postmaster_without_domain_in_any_case() {
        assert_eq!(fwd("<postmaster>"), Ok((ForwardPath::Postmaster, "")));
        assert_eq!(fwd("<PostMaster>"), Ok((ForwardPath::Postmaster, "")));
        assert_eq!(
            fwd("<postmaster@example.org>"),
            Ok((ForwardPath::Address(addr("postmaster", "example.org")), ""))
        );
    }

    #[test]
    fn other_local_part_without_domain_is_refused() {
        assert_eq!(fwd("<abuse>"), Err(AddressError::MissingDomain));
        assert_eq!(rev("<postmaster>"), Err(AddressError::MissingDomain));
        assert_eq!(fwd("<\"postmaster\">"), Err(AddressError::MissingDomain));
        assert_eq!(
            fwd("<@a.example:postmaster>"),
            Err(AddressError::MissingDomain)
        );
    }

    #[test]
    fn angle_brackets_are_required() {
        assert_eq!(
            rev("user@example.org"),
            Err(AddressError::MissingAngleBrackets)
        );
        assert_eq!(rev(""), Err(AddressError::MissingAngleBrackets));
        assert_eq!(rev("<user@example.org"), Err(AddressError::Unterminated));
    }

    #[test]
    fn quoted_local_part_is_kept_unquoted() {
        let (path, _) = rev(r#"<"john doe"@example.org>"#).unwrap();
        assert_eq!(path, ReversePath::Address(addr("john doe", "example.org")));
        let (path, _) = rev(r#"<"a\"b\\c"@example.org>"#).unwrap();
        assert_eq!(path, ReversePath::Address(addr(r#"a"b\c"#, "example.org")));
    }

    #[test]
    fn quoted_local_part_may_hold_angle_bracket_and_at() {
        let (path, rest) = rev(r#"<"a>b@c"@example.org> X"#).unwrap();
        assert_eq!(path, ReversePath::Address(addr("a>b@c", "example.org")));
        assert_eq!(rest, " X");
    }

    #[test]
    fn needlessly_quoted_local_part_displays_unquoted() {
        let (path, _) = rev(r#"<"user"@example.org>"#).unwrap();
        assert_eq!(path.to_string(), "user@example.org");
    }

    #[test]
    fn display_requotes_when_needed() {
        assert_eq!(
            addr("john doe", "x.example").to_string(),
            r#""john doe"@x.example"#
        );
        assert_eq!(
            addr(r#"a"b\c"#, "x.example").to_string(),
            r#""a\"b\\c"@x.example"#
        );
        assert_eq!(addr("a..b", "x.example").to_string(), r#""a..b"@x.example"#);
        assert_eq!(addr("", "x.example").to_string(), r#"""@x.example"#);
        assert_eq!(
            addr("first.last+tag", "x.example").to_string(),
            "first.last+tag@x.example"
        );
    }

    #[test]
    fn display_round_trips_through_the_parser() {
        for a in [
            addr("john doe", "x.example"),
            addr(r#"a"b\c"#, "x.example"),
            addr(".dot", "x.example"),
            addr("", "x.example"),
            addr("ü", "bücher.example"),
            addr("u", "[192.0.2.1]"),
        ] {
            assert_eq!(Address::parse(&a.to_string()), Ok(a.clone()), "{a}");
        }
    }

    #[test]
    fn empty_quoted_local_part_is_allowed() {
        assert_eq!(
            Address::parse(r#"""@example.org"#),
            Ok(addr("", "example.org"))
        );
    }

    #[test]
    fn bad_dot_strings_are_refused() {
        for bad in [
            "<.a@x.example>",
            "<a.@x.example>",
            "<a..b@x.example>",
            "<@x.example>",
        ] {
            assert!(rev(bad).is_err(), "{bad}");
        }
        assert_eq!(rev("<a b@x.example>"), Err(AddressError::LocalPart));
        assert_eq!(rev("<a(b)@x.example>"), Err(AddressError::LocalPart));
    }

    #[test]
    fn bad_quoted_strings_are_refused() {
        assert_eq!(rev("<\"abc@x.example>"), Err(AddressError::LocalPart));
        assert_eq!(rev("<\"a\tb\"@x.example>"), Err(AddressError::LocalPart));
        assert_eq!(rev("<\"a\\\tb\"@x.example>"), Err(AddressError::LocalPart));
    }

    #[test]
    fn utf8_local_part_and_domain() {
        let (path, _) = rev("<用户@例子.广告>").unwrap();
        let a = path.address().unwrap().clone();
        assert_eq!(a, addr("用户", "例子.广告"));
        assert!(!a.is_ascii());
        assert!(addr("user", "example.org").is_ascii());
        assert!(!addr("user", "bücher.example").is_ascii());
    }

    #[test]
    fn domain_labels_follow_ldh_rules() {
        assert!(is_valid_domain("a-b.example"));
        assert!(is_valid_domain("123.example"));
        assert!(!is_valid_domain("-a.example"));
        assert!(!is_valid_domain("a-.example"));
        assert!(!is_valid_domain("a..example"));
        assert!(!is_valid_domain("example.org."));
        assert!(!is_valid_domain(".example.org"));
        assert!(!is_valid_domain("a_b.example"));
        assert!(!is_valid_domain(&format!("{}.example", "a".repeat(64))));
        assert!(is_valid_domain(&format!("{}.example", "a".repeat(63))));
        assert!(!is_valid_domain(""));
        assert!(!is_valid_domain("exa mple.org"));
        assert_eq!(rev("<a@exa_mple.org>"), Err(AddressError::Domain));
    }

    #[test]
    fn u_labels_refuse_controls_and_spaces() {
        assert!(is_valid_domain("bücher.example"));
        assert!(!is_valid_domain("b\u{a0}cher.example"));
        assert!(!is_valid_domain("b\u{85}cher.example"));
    }

    #[test]
    fn helo_domains_may_have_underscores() {
        assert!(is_valid_helo_domain("my_pc.lan"));
        assert!(is_valid_helo_domain("[192.0.2.1]"));
        assert!(!is_valid_helo_domain("my pc"));
        assert!(!is_valid_domain("my_pc.lan"));
    }

    #[test]
    fn ipv4_address_literal() {
        assert_eq!(
            rev("<u@[192.0.2.1]>"),
            Ok((ReversePath::Address(addr("u", "[192.0.2.1]")), ""))
        );
        assert!(addr("u", "[192.0.2.1]").is_address_literal());
        assert!(is_valid_domain("[010.000.002.001]"));
        for bad in [
            "[256.0.0.1]",
            "[1.2.3]",
            "[1.2.3.4.5]",
            "[1.2.3.a]",
            "[1.2.3.4",
            "[]",
            "[1.2.3.0001]",
        ] {
            assert!(!is_valid_domain(bad), "{bad}");
        }
    }

    #[test]
    fn ipv6_address_literal() {
        assert!(is_valid_domain("[IPv6:2001:db8::1]"));
        assert!(is_valid_domain("[ipv6:::1]"));
        assert!(is_valid_domain("[IPv6:::ffff:192.0.2.1]"));
        assert!(!is_valid_domain("[IPv6:2001:db8::g]"));
        assert!(!is_valid_domain("[2001:db8::1]"));
        assert!(!is_valid_domain("[IPv6:]"));
    }

    #[test]
    fn general_address_literal_is_refused() {
        assert_eq!(rev("<u@[x-tag:stuff]>"), Err(AddressError::AddressLiteral));
    }

    #[test]
    fn source_route_is_dropped() {
        assert_eq!(
            rev("<@a.example,@b.example:user@c.example>"),
            Ok((ReversePath::Address(addr("user", "c.example")), ""))
        );
        assert_eq!(
            fwd("<@a.example:user@c.example>"),
            Ok((ForwardPath::Address(addr("user", "c.example")), ""))
        );
    }

    #[test]
    fn malformed_source_route_is_refused() {
        for bad in [
            "<@a.example user@c.example>",
            "<@:user@c.example>",
            "<@a.example,b.example:user@c.example>",
            "<@a.example,:user@c.example>",
            "<@a_b.example:user@c.example>",
        ] {
            assert_eq!(rev(bad), Err(AddressError::SourceRoute), "{bad}");
        }
    }

    #[test]
    fn local_part_over_64_octets_is_refused() {
        let ok = format!("<{}@x.example>", "a".repeat(64));
        assert!(rev(&ok).is_ok());
        let long = format!("<{}@x.example>", "a".repeat(65));
        assert_eq!(rev(&long), Err(AddressError::LocalPartTooLong));
        // Octets, not characters: 33 two-octet characters are 66 octets.
        let long = format!("<{}@x.example>", "ü".repeat(33));
        assert_eq!(rev(&long), Err(AddressError::LocalPartTooLong));
    }

    #[test]
    fn domain_over_255_octets_is_refused() {
        let label = "a".repeat(63);
        let domain = format!("{label}.{label}.{label}.{label}"); // 255 octets
        assert_eq!(domain.len(), 255);
        assert!(is_valid_domain(&domain));
        let domain = format!("{domain}a");
        let mut cur = Cursor::new(&domain);
        assert_eq!(cur.domain(false), Err(AddressError::DomainTooLong));
    }

    #[test]
    fn path_over_256_octets_is_refused() {
        let label = "a".repeat(60);
        // <64 @ 190> = 1 + 64 + 1 + 189 + 1 = 256.
        let domain = format!("{label}.{label}.{label}.{}", "b".repeat(6));
        assert_eq!(domain.len(), 189);
        let ok = format!("<{}@{domain}>", "l".repeat(64));
        assert_eq!(ok.len(), 256);
        assert!(rev(&ok).is_ok());
        let long = format!("<{}@{domain}b>", "l".repeat(64));
        assert_eq!(rev(&long), Err(AddressError::PathTooLong));
    }

    #[test]
    fn garbage_after_domain_is_refused() {
        assert_eq!(rev("<a@b.example x>"), Err(AddressError::Domain));
        assert_eq!(rev("<a@>"), Err(AddressError::Domain));
        assert_eq!(Address::parse("a@b.example "), Err(AddressError::Domain));
        assert_eq!(
            Address::parse("ab.example"),
            Err(AddressError::MissingDomain)
        );
    }

    #[test]
    fn paths_display_without_brackets() {
        assert_eq!(ReversePath::Null.to_string(), "");
        assert_eq!(ForwardPath::Postmaster.to_string(), "postmaster");
        assert_eq!(
            ForwardPath::Address(addr("a", "b.example")).to_string(),
            "a@b.example"
        );
        assert!(ReversePath::Null.is_ascii());
        assert!(ForwardPath::Postmaster.is_ascii());
    }

    #[test]
    fn address_serializes_as_local_and_domain() {
        let a = addr("a", "b.example");
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"local":"a","domain":"b.example"}"#);
        assert_eq!(serde_json::from_str::<Address>(&json).unwrap(), a);
    }
}
