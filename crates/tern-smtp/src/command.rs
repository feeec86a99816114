//! SMTP commands: parsing a line from a client (server side) and writing one (client side).

use serde::{Deserialize, Serialize};

use crate::address::{self, ForwardPath, ReversePath};
pub use crate::error::ParseError;
use crate::{xtext, BodyType, Notify, Ret};

/// One SMTP command (RFC 5321 §4.1 and the extensions this crate knows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    /// RFC 3030 CHUNKING.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Vrfy(String),
    Expn(String),
    Help(Option<String>),
    Noop,
    Quit,
    /// RFC 3207.
    StartTls,
    /// RFC 4954 §4. `initial_response` is the base64 text as sent (`=` for an empty response).
    Auth {
        /// Uppercased: SASL mechanism names are case-insensitive (RFC 4422 §3.1).
        mechanism: String,
        initial_response: Option<String>,
    },
    /// Sendmail's VERB, which some clients still send; servers answer it 502.
    Verb(Option<String>),
}

/// `MAIL FROM:<reverse-path> [params]` with the parameters this crate understands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailFrom {
    pub sender: ReversePath,
    /// RFC 1870 `SIZE=`.
    pub size: Option<u64>,
    /// RFC 6152 / RFC 3030 `BODY=`.
    pub body: Option<BodyType>,
    /// RFC 6531 `SMTPUTF8`.
    pub smtputf8: bool,
    /// RFC 3461 `RET=`.
    pub ret: Option<Ret>,
    /// RFC 3461 `ENVID=`, still xtext-encoded.
    pub envid: Option<String>,
    /// RFC 4954 `AUTH=`, still xtext-encoded (`<>` when the client does not vouch for the
    /// sender).
    pub auth: Option<String>,
}

/// `RCPT TO:<forward-path> [params]` with the parameters this crate understands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptTo {
    pub recipient: ForwardPath,
    /// RFC 3461 `NOTIFY=`.
    pub notify: Option<Notify>,
    /// RFC 3461 `ORCPT=addr-type;xtext`, verbatim.
    pub orcpt: Option<String>,
}

impl RcptTo {
    pub fn new(recipient: ForwardPath) -> Self {
        Self {
            recipient,
            notify: None,
            orcpt: None,
        }
    }
}

/// Parses one command line, without its CRLF or LF.
///
/// Verbs and parameter keywords are case-insensitive (RFC 5321 §2.4). Trailing spaces and tabs
/// are ignored (clients add them and nothing is lost). Leniencies beyond the grammar, each as
/// Postfix has them: a space between `FROM:`/`TO:` and `<`, several spaces between parameters.
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let line = trim_end(line);
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if verb.len() > 8 {
        return Err(ParseError::UnknownCommand);
    }
    let mut upper = [0u8; 8];
    let upper = &mut upper[..verb.len()];
    upper.copy_from_slice(verb);
    upper.make_ascii_uppercase();

    let text = |args: &[u8]| -> Result<String, ParseError> {
        std::str::from_utf8(args)
            .map(str::to_string)
            .map_err(|_| ParseError::Syntax("invalid UTF-8"))
    };
    let no_args = |cmd: Command| -> Result<Command, ParseError> {
        match args {
            None => Ok(cmd),
            Some(_) => Err(ParseError::Syntax("no arguments allowed")),
        }
    };
    let optional = |args: Option<&[u8]>| -> Result<Option<String>, ParseError> {
        match args.map(trim_start) {
            None | Some([]) => Ok(None),
            Some(a) => text(a).map(Some),
        }
    };
    let required = |args: Option<&[u8]>, what: &'static str| -> Result<String, ParseError> {
        optional(args)?.ok_or(ParseError::Syntax(what))
    };

    match &*upper {
        b"HELO" => parse_hello(args).map(Command::Helo),
        b"EHLO" => parse_hello(args).map(Command::Ehlo),
        b"MAIL" => parse_mail(args.unwrap_or_default()).map(Command::Mail),
        b"RCPT" => parse_rcpt(args.unwrap_or_default()).map(Command::Rcpt),
        b"DATA" => no_args(Command::Data),
        b"BDAT" => parse_bdat(args),
        b"RSET" => no_args(Command::Rset),
        b"VRFY" => required(args, "VRFY needs an argument").map(Command::Vrfy),
        b"EXPN" => required(args, "EXPN needs an argument").map(Command::Expn),
        b"HELP" => optional(args).map(Command::Help),
        // RFC 5321 §4.1.1.9: the NOOP argument has no meaning and is ignored.
        b"NOOP" => Ok(Command::Noop),
        b"QUIT" => no_args(Command::Quit),
        b"STARTTLS" => no_args(Command::StartTls),
        b"AUTH" => parse_auth(args),
        b"VERB" => optional(args).map(Command::Verb),
        _ => Err(ParseError::UnknownCommand),
    }
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    s
}

/// `ehlo = "EHLO" SP ( Domain / address-literal )` (RFC 5321 §4.1.1.1); HELO alike.
fn parse_hello(args: Option<&[u8]>) -> Result<String, ParseError> {
    let args = trim_start(args.unwrap_or_default());
    let domain =
        std::str::from_utf8(args).map_err(|_| ParseError::Syntax("invalid EHLO/HELO domain"))?;
    if domain.is_empty() {
        return Err(ParseError::Syntax("EHLO/HELO needs a domain"));
    }
    if !address::is_valid_helo_domain(domain) {
        return Err(ParseError::Syntax("invalid EHLO/HELO domain"));
    }
    Ok(domain.to_string())
}

/// Strips `keyword` (`FROM:` or `TO:`) case-insensitively, then any spaces before the path.
fn after_keyword<'a>(args: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let args = trim_start(args);
    if args.len() < keyword.len() || !args[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(trim_start(&args[keyword.len()..]))
}

/// The `esmtp-param`s after a path: `*(SP esmtp-param)` (RFC 5321 §4.1.2), each
/// `esmtp-keyword ["=" esmtp-value]`.
fn params(rest: &str) -> Result<Vec<(&str, Option<&str>)>, ParseError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(ParseError::Syntax("space required after the path"));
    }
    let mut out = Vec::new();
    for word in rest.split(' ').filter(|w| !w.is_empty()) {
        let (keyword, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        let kw = keyword.as_bytes();
        if kw.is_empty()
            || !kw[0].is_ascii_alphanumeric()
            || !kw.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        {
            return Err(ParseError::Syntax("malformed parameter"));
        }
        // esmtp-value = 1*(%d33-60 / %d62-126), plus UTF-8 under RFC 6531 §3.3. Our split on
        // SP and on the first "=" already excludes SP; a later "=" or a control is refused.
        if let Some(v) = value {
            if v.bytes().any(|b| b == b'=' || b < 33 || b == 127) {
                return Err(ParseError::Syntax("malformed parameter value"));
            }
        }
        out.push((keyword, value));
    }
    Ok(out)
}

/// The value of a keyword that requires one; a duplicate is refused.
fn value<'a, T>(
    slot: &Option<T>,
    keyword: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, ParseError> {
    if slot.is_some() {
        return Err(ParseError::BadParameter {
            keyword,
            reason: "given twice",
        });
    }
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ParseError::BadParameter {
            keyword,
            reason: "value required",
        }),
    }
}

fn bad(keyword: &'static str, reason: &'static str) -> ParseError {
    ParseError::BadParameter { keyword, reason }
}

fn parse_mail(args: &[u8]) -> Result<MailFrom, ParseError> {
    let path = after_keyword(args, b"FROM:").ok_or(ParseError::Syntax("FROM: expected"))?;
    let path = std::str::from_utf8(path)
        .map_err(|_| ParseError::BadSender(address::AddressError::LocalPart))?;
    let (sender, rest) = address::parse_reverse_path(path).map_err(ParseError::BadSender)?;
    let mut mail = MailFrom {
        sender,
        ..Default::default()
    };
    for (keyword, v) in params(rest)? {
        if keyword.eq_ignore_ascii_case("SIZE") {
            // size-value = 1*20DIGIT (RFC 1870 §3); beyond u64 is no size we could accept.
            let v = value(&mail.size, "SIZE", v)?;
            if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("SIZE", "not a number"));
            }
            mail.size = Some(v.parse().map_err(|_| bad("SIZE", "too large"))?);
        } else if keyword.eq_ignore_ascii_case("BODY") {
            let v = value(&mail.body, "BODY", v)?;
            mail.body = Some(BodyType::from_param(v).ok_or(bad("BODY", "unknown body type"))?);
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            // RFC 6531 §3.4: the parameter takes no value.
            if v.is_some() {
                return Err(bad("SMTPUTF8", "takes no value"));
            }
            if mail.smtputf8 {
                return Err(bad("SMTPUTF8", "given twice"));
            }
            mail.smtputf8 = true;
        } else if keyword.eq_ignore_ascii_case("RET") {
            let v = value(&mail.ret, "RET", v)?;
            mail.ret = Some(Ret::from_param(v).ok_or(bad("RET", "must be FULL or HDRS"))?);
        } else if keyword.eq_ignore_ascii_case("ENVID") {
            let v = value(&mail.envid, "ENVID", v)?;
            if !xtext::is_valid(v) {
                return Err(bad("ENVID", "invalid xtext"));
            }
            // RFC 3461 §4.4: at most 100 characters.
            if v.len() > 100 {
                return Err(bad("ENVID", "longer than 100 characters"));
            }
            mail.envid = Some(v.to_string());
        } else if keyword.eq_ignore_ascii_case("AUTH") {
            let v = value(&mail.auth, "AUTH", v)?;
            if !xtext::is_valid(v) {
                return Err(bad("AUTH", "invalid xtext"));
            }
            mail.auth = Some(v.to_string());
        } else {
            return Err(ParseError::UnknownParameter(keyword.to_string()));
        }
    }
    Ok(mail)
}

fn parse_rcpt(args: &[u8]) -> Result<RcptTo, ParseError> {
    let path = after_keyword(args, b"TO:").ok_or(ParseError::Syntax("TO: expected"))?;
    let path = std::str::from_utf8(path)
        .map_err(|_| ParseError::BadRecipient(address::AddressError::LocalPart))?;
    let (recipient, rest) = address::parse_forward_path(path).map_err(ParseError::BadRecipient)?;
    let mut rcpt = RcptTo::new(recipient);
    for (keyword, v) in params(rest)? {
        if keyword.eq_ignore_ascii_case("NOTIFY") {
            let v = value(&rcpt.notify, "NOTIFY", v)?;
            rcpt.notify = Some(Notify::from_param(v).ok_or(bad(
                "NOTIFY",
                "must be NEVER or a list of SUCCESS, FAILURE, DELAY",
            ))?);
        } else if keyword.eq_ignore_ascii_case("ORCPT") {
            // orcpt-parameter = "ORCPT=" original-recipient-address
            // original-recipient-address = addr-type ";" xtext   (RFC 3461 §4.2)
            let v = value(&rcpt.orcpt, "ORCPT", v)?;
            let (addr_type, addr) = v
                .split_once(';')
                .ok_or(bad("ORCPT", "addr-type; required"))?;
            if addr_type.is_empty() || !addr_type.bytes().all(is_atom_char) {
                return Err(bad("ORCPT", "invalid addr-type"));
            }
            if addr.is_empty() || !xtext::is_valid(addr) {
                return Err(bad("ORCPT", "invalid xtext"));
            }
            rcpt.orcpt = Some(v.to_string());
        } else {
            return Err(ParseError::UnknownParameter(keyword.to_string()));
        }
    }
    Ok(rcpt)
}

/// atext without UTF-8: what an `addr-type` atom may hold (RFC 3461 §4.2, RFC 5322 §3.2.3).
fn is_atom_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// `bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ]`, `chunk-size = 1*DIGIT`,
/// `end-marker = "LAST"` (RFC 3030 §2).
fn parse_bdat(args: Option<&[u8]>) -> Result<Command, ParseError> {
    let args = args.ok_or(ParseError::Syntax("BDAT needs a chunk size"))?;
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .ok_or(ParseError::Syntax("BDAT needs a chunk size"))?;
    if size.len() > 20 || !size.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Syntax("bad BDAT chunk size"));
    }
    let size = std::str::from_utf8(size)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ParseError::Syntax("bad BDAT chunk size"))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(ParseError::Syntax("BDAT end marker must be LAST")),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax("too many BDAT arguments"));
    }
    Ok(Command::Bdat { size, last })
}

/// `"AUTH" SP sasl-mech [SP initial-response]` (RFC 4954 §4).
fn parse_auth(args: Option<&[u8]>) -> Result<Command, ParseError> {
    let args = args.ok_or(ParseError::Syntax("AUTH needs a mechanism"))?;
    let args = std::str::from_utf8(args).map_err(|_| ParseError::Syntax("invalid UTF-8"))?;
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .ok_or(ParseError::Syntax("AUTH needs a mechanism"))?;
    // sasl-mech = 1*20mech-char, mech-char = UPPER-ALPHA / DIGIT / HYPHEN / UNDERSCORE
    // (RFC 4422 §3.1); lower case is taken and uppercased.
    if mechanism.len() > 20
        || !mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ParseError::Syntax("invalid SASL mechanism name"));
    }
    let initial_response = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(ParseError::Syntax("too many AUTH arguments"));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response,
    })
}

impl Command {
    /// Serialises the command as a client sends it, CRLF included. MAIL and RCPT carry their
    /// parameters; paths are written with their local parts quoted as needed.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let line = match self {
            Command::Helo(d) => format!("HELO {d}"),
            Command::Ehlo(d) => format!("EHLO {d}"),
            Command::Mail(m) => {
                let mut s = format!("MAIL FROM:<{}>", m.sender);
                if let Some(size) = m.size {
                    s.push_str(&format!(" SIZE={size}"));
                }
                if let Some(body) = m.body {
                    s.push_str(" BODY=");
                    s.push_str(body.as_str());
                }
                if m.smtputf8 {
                    s.push_str(" SMTPUTF8");
                }
                if let Some(ret) = m.ret {
                    s.push_str(" RET=");
                    s.push_str(ret.as_str());
                }
                if let Some(envid) = &m.envid {
                    s.push_str(&format!(" ENVID={envid}"));
                }
                if let Some(auth) = &m.auth {
                    s.push_str(&format!(" AUTH={auth}"));
                }
                s
            }
            Command::Rcpt(r) => {
                let mut s = match &r.recipient {
                    ForwardPath::Postmaster => "RCPT TO:<Postmaster>".to_string(),
                    ForwardPath::Address(a) => format!("RCPT TO:<{a}>"),
                };
                if let Some(notify) = r.notify {
                    s.push_str(" NOTIFY=");
                    s.push_str(&notify.to_param());
                }
                if let Some(orcpt) = &r.orcpt {
                    s.push_str(&format!(" ORCPT={orcpt}"));
                }
                s
            }
            Command::Data => "DATA".to_string(),
            Command::Bdat { size, last: false } => format!("BDAT {size}"),
            Command::Bdat { size, last: true } => format!("BDAT {size} LAST"),
            Command::Rset => "RSET".to_string(),
            Command::Vrfy(s) => format!("VRFY {s}"),
            Command::Expn(s) => format!("EXPN {s}"),
            Command::Help(None) => "HELP".to_string(),
            Command::Help(Some(s)) => format!("HELP {s}"),
            Command::Noop => "NOOP".to_string(),
            Command::Quit => "QUIT".to_string(),
            Command::StartTls => "STARTTLS".to_string(),
            Command::Auth {
                mechanism,
                initial_response: None,
            } => format!("AUTH {mechanism}"),
            Command::Auth {
                mechanism,
                initial_response: Some(r),
            } => format!("AUTH {mechanism} {r}"),
            Command::Verb(None) => "VERB".to_string(),
            Command::Verb(Some(s)) => format!("VERB {s}"),
        };
        // A value smuggled in through a pub field must not end the line early and inject a
        // second command: CR and LF are dropped.
        out.extend(line.bytes().filter(|&b| b != b'\r' && b != b'\n'));
        out.extend_from_slice(b"\r\n");
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// The verb, uppercased, for logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Helo(_) => "HELO",
            Command::Ehlo(_) => "EHLO",
            Command::Mail(_) => "MAIL",
            Command::Rcpt(_) => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Vrfy(_) => "VRFY",
            Command::Expn(_) => "EXPN",
            Command::Help(_) => "HELP",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
            Command::Verb(_) => "VERB",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{Address, AddressError};

    fn parse(line: &str) -> Result<Command, ParseError> {
        parse_command(line.as_bytes())
    }

    fn mail(line: &str) -> MailFrom {
        match parse(line) {
            Ok(Command::Mail(m)) => m,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn rcpt(line: &str) -> RcptTo {
        match parse(line) {
            Ok(Command::Rcpt(r)) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    /// The reply code and enhanced code a line earns.
    fn reply_of(line: &str) -> String {
        let reply = parse(line).expect_err(line).reply();
        format!("{} {}", reply.code, reply.enhanced.unwrap())
    }

    fn sender(local: &str, domain: &str) -> ReversePath {
        ReversePath::Address(Address::new(local, domain))
    }

    fn recipient(local: &str, domain: &str) -> ForwardPath {
        ForwardPath::Address(Address::new(local, domain))
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(parse("QuIt"), Ok(Command::Quit));
        assert_eq!(parse("starttls"), Ok(Command::StartTls));
        assert_eq!(
            parse("ehlo x.example"),
            Ok(Command::Ehlo("x.example".into()))
        );
        assert_eq!(
            mail("mail from:<a@b.example>").sender,
            sender("a", "b.example")
        );
    }

    #[test]
    fn every_verb_without_arguments() {
        for (line, cmd) in [
            ("DATA", Command::Data),
            ("RSET", Command::Rset),
            ("NOOP", Command::Noop),
            ("QUIT", Command::Quit),
            ("STARTTLS", Command::StartTls),
            ("HELP", Command::Help(None)),
            ("VERB", Command::Verb(None)),
        ] {
            assert_eq!(parse(line), Ok(cmd), "{line}");
        }
    }

    #[test]
    fn unknown_verb_is_500_5_5_1() {
        for line in [
            "FOO",
            "",
            " QUIT",
            "MAILFROM:<a@b.example>",
            "XEXCH50",
            "GET / HTTP/1.1",
        ] {
            assert_eq!(parse(line), Err(ParseError::UnknownCommand), "{line:?}");
        }
        assert_eq!(reply_of("FOO"), "500 5.5.1");
    }

    #[test]
    fn trailing_whitespace_is_ignored() {
        assert_eq!(parse("QUIT "), Ok(Command::Quit));
        assert_eq!(parse("DATA\t"), Ok(Command::Data));
        assert_eq!(
            mail("MAIL FROM:<a@b.example>  ").sender,
            sender("a", "b.example")
        );
    }

    #[test]
    fn argument_where_none_is_allowed_is_501_5_5_4() {
        for line in ["QUIT now", "RSET x", "DATA x", "STARTTLS x"] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line}");
        }
    }

    #[test]
    fn noop_argument_is_ignored() {
        assert_eq!(parse("NOOP anything at all"), Ok(Command::Noop));
    }

    #[test]
    fn help_vrfy_expn_verb_take_an_argument() {
        assert_eq!(parse("HELP MAIL"), Ok(Command::Help(Some("MAIL".into()))));
        assert_eq!(parse("VRFY Smith"), Ok(Command::Vrfy("Smith".into())));
        assert_eq!(
            parse("EXPN list SMTPUTF8"),
            Ok(Command::Expn("list SMTPUTF8".into()))
        );
        assert_eq!(parse("VERB on"), Ok(Command::Verb(Some("on".into()))));
    }

    #[test]
    fn vrfy_and_expn_need_an_argument() {
        assert_eq!(reply_of("VRFY"), "501 5.5.4");
        assert_eq!(reply_of("EXPN "), "501 5.5.4");
    }

    #[test]
    fn ehlo_and_helo_take_a_domain_or_address_literal() {
        assert_eq!(
            parse("EHLO mx.example.org"),
            Ok(Command::Ehlo("mx.example.org".into()))
        );
        assert_eq!(
            parse("HELO [192.0.2.1]"),
            Ok(Command::Helo("[192.0.2.1]".into()))
        );
        assert_eq!(
            parse("EHLO [IPv6:2001:db8::1]"),
            Ok(Command::Ehlo("[IPv6:2001:db8::1]".into()))
        );
        assert_eq!(
            parse("EHLO bücher.example"),
            Ok(Command::Ehlo("bücher.example".into()))
        );
        assert_eq!(parse("EHLO my_pc"), Ok(Command::Ehlo("my_pc".into())));
    }

    #[test]
    fn bad_ehlo_domain_is_501_5_5_4() {
        for line in [
            "EHLO",
            "EHLO ",
            "HELO",
            "EHLO a b",
            "EHLO -x.example",
            "EHLO [1.2.3]",
            "EHLO a..b",
        ] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line:?}");
        }
        assert_eq!(
            parse_command(b"EHLO \xff.example"),
            Err(ParseError::Syntax("invalid EHLO/HELO domain"))
        );
    }

    #[test]
    fn mail_with_plain_sender() {
        assert_eq!(
            mail("MAIL FROM:<a@b.example>"),
            MailFrom {
                sender: sender("a", "b.example"),
                ..Default::default()
            }
        );
    }

    #[test]
    fn mail_with_null_sender() {
        assert_eq!(mail("MAIL FROM:<>").sender, ReversePath::Null);
    }

    #[test]
    fn space_before_the_path_is_tolerated() {
        assert_eq!(
            mail("MAIL FROM: <a@b.example>").sender,
            sender("a", "b.example")
        );
        assert_eq!(
            rcpt("RCPT TO: <a@b.example>").recipient,
            recipient("a", "b.example")
        );
        assert_eq!(
            mail("MAIL  from:<a@b.example>").sender,
            sender("a", "b.example")
        );
    }

    #[test]
    fn missing_from_or_to_is_501_5_5_4() {
        for line in [
            "MAIL",
            "MAIL <a@b.example>",
            "MAIL TO:<a@b.example>",
            "RCPT",
            "RCPT FROM:<a@b.example>",
            "MAIL FROM<a@b.example>",
        ] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line}");
        }
    }

    #[test]
    fn malformed_sender_is_501_5_1_7() {
        for line in [
            "MAIL FROM:a@b.example",
            "MAIL FROM:<a@b.example",
            "MAIL FROM:<a@>",
            "MAIL FROM:<a..b@c.example>",
            "MAIL FROM:<postmaster>",
            "MAIL FROM:",
        ] {
            assert_eq!(reply_of(line), "501 5.1.7", "{line}");
        }
        assert!(matches!(
            parse_command(b"MAIL FROM:<\xff@b.example>"),
            Err(ParseError::BadSender(_))
        ));
    }

    #[test]
    fn malformed_recipient_is_501_5_1_3() {
        for line in [
            "RCPT TO:a@b.example",
            "RCPT TO:<>",
            "RCPT TO:<abuse>",
            "RCPT TO:<a b@c.example>",
            "RCPT TO:<a@[300.1.1.1]>",
        ] {
            assert_eq!(reply_of(line), "501 5.1.3", "{line}");
        }
    }

    #[test]
    fn rcpt_to_postmaster_in_any_case() {
        assert_eq!(
            rcpt("RCPT TO:<Postmaster>").recipient,
            ForwardPath::Postmaster
        );
        assert_eq!(
            rcpt("rcpt to:<POSTMASTER>").recipient,
            ForwardPath::Postmaster
        );
    }

    #[test]
    fn source_route_is_accepted_and_dropped() {
        assert_eq!(
            rcpt("RCPT TO:<@a.example,@b.example:user@c.example>").recipient,
            recipient("user", "c.example")
        );
    }

    #[test]
    fn quoted_local_part_with_spaces_and_params() {
        let m = mail(r#"MAIL FROM:<"john q. doe"@b.example> SIZE=10"#);
        assert_eq!(m.sender, sender("john q. doe", "b.example"));
        assert_eq!(m.size, Some(10));
    }

    #[test]
    fn utf8_addresses_parse() {
        let m = mail("MAIL FROM:<用户@例子.广告> SMTPUTF8");
        assert!(m.smtputf8);
        assert!(!m.sender.is_ascii());
    }

    #[test]
    fn every_mail_parameter() {
        let m = mail("MAIL FROM:<a@b.example> SIZE=12345 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159 AUTH=e+3Dmc2@example.com");
        assert_eq!(
            m,
            MailFrom {
                sender: sender("a", "b.example"),
                size: Some(12345),
                body: Some(BodyType::EightBitMime),
                smtputf8: true,
                ret: Some(Ret::Hdrs),
                envid: Some("QQ314159".into()),
                auth: Some("e+3Dmc2@example.com".into()),
            }
        );
    }

    #[test]
    fn parameter_keywords_and_values_are_case_insensitive() {
        let m = mail("MAIL FROM:<a@b.example> size=1 body=binarymime smtputf8 ret=full");
        assert_eq!(m.size, Some(1));
        assert_eq!(m.body, Some(BodyType::BinaryMime));
        assert!(m.smtputf8);
        assert_eq!(m.ret, Some(Ret::Full));
        let r = rcpt("RCPT TO:<a@b.example> notify=success,failure orcpt=rfc822;a@b.example");
        assert_eq!(
            r.notify,
            Some(Notify {
                success: true,
                failure: true,
                delay: false
            })
        );
    }

    #[test]
    fn several_spaces_between_parameters_are_tolerated() {
        let m = mail("MAIL FROM:<a@b.example>   SIZE=1   BODY=7BIT");
        assert_eq!((m.size, m.body), (Some(1), Some(BodyType::SevenBit)));
    }

    #[test]
    fn auth_parameter_may_be_null() {
        assert_eq!(
            mail("MAIL FROM:<a@b.example> AUTH=<>").auth.as_deref(),
            Some("<>")
        );
    }

    #[test]
    fn unknown_parameter_is_555_5_5_4() {
        assert_eq!(reply_of("MAIL FROM:<a@b.example> FOO=bar"), "555 5.5.4");
        assert_eq!(reply_of("MAIL FROM:<a@b.example> XFOO"), "555 5.5.4");
        assert_eq!(reply_of("RCPT TO:<a@b.example> SIZE=10"), "555 5.5.4");
        assert_eq!(reply_of("RCPT TO:<a@b.example> SMTPUTF8"), "555 5.5.4");
        assert_eq!(
            parse("MAIL FROM:<a@b.example> X-Thing=1"),
            Err(ParseError::UnknownParameter("X-Thing".into()))
        );
    }

    #[test]
    fn known_parameter_with_bad_value_is_501_5_5_4() {
        for line in [
            "MAIL FROM:<a@b.example> SIZE=abc",
            "MAIL FROM:<a@b.example> SIZE=",
            "MAIL FROM:<a@b.example> SIZE",
            "MAIL FROM:<a@b.example> SIZE=-1",
            "MAIL FROM:<a@b.example> SIZE=99999999999999999999",
            "MAIL FROM:<a@b.example> SIZE=123456789012345678901",
            "MAIL FROM:<a@b.example> BODY=foo",
            "MAIL FROM:<a@b.example> BODY",
            "MAIL FROM:<a@b.example> SMTPUTF8=yes",
            "MAIL FROM:<a@b.example> RET=ALL",
            "MAIL FROM:<a@b.example> ENVID=a+b",
            "MAIL FROM:<a@b.example> AUTH=a+zz",
            "RCPT TO:<a@b.example> NOTIFY=NEVER,SUCCESS",
            "RCPT TO:<a@b.example> NOTIFY=SOMETIMES",
            "RCPT TO:<a@b.example> NOTIFY=",
            "RCPT TO:<a@b.example> ORCPT=a@b.example",
            "RCPT TO:<a@b.example> ORCPT=;a@b.example",
            "RCPT TO:<a@b.example> ORCPT=rfc822;",
            "RCPT TO:<a@b.example> ORCPT=rfc822;a+b",
            "RCPT TO:<a@b.example> ORCPT=rfc 822;a",
        ] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line}");
        }
    }

    #[test]
    fn duplicate_parameter_is_501_5_5_4() {
        for line in [
            "MAIL FROM:<a@b.example> SIZE=1 SIZE=1",
            "MAIL FROM:<a@b.example> BODY=7BIT BODY=8BITMIME",
            "MAIL FROM:<a@b.example> SMTPUTF8 SMTPUTF8",
            "MAIL FROM:<a@b.example> RET=FULL ret=HDRS",
            "MAIL FROM:<a@b.example> ENVID=a ENVID=b",
            "MAIL FROM:<a@b.example> AUTH=<> AUTH=<>",
            "RCPT TO:<a@b.example> NOTIFY=NEVER NOTIFY=NEVER",
            "RCPT TO:<a@b.example> ORCPT=rfc822;a ORCPT=rfc822;a",
        ] {
            assert!(
                matches!(
                    parse(line),
                    Err(ParseError::BadParameter {
                        reason: "given twice",
                        ..
                    })
                ),
                "{line}"
            );
            assert_eq!(reply_of(line), "501 5.5.4", "{line}");
        }
    }

    #[test]
    fn envid_longer_than_100_characters_is_refused() {
        let ok = format!("MAIL FROM:<a@b.example> ENVID={}", "x".repeat(100));
        assert_eq!(mail(&ok).envid.unwrap().len(), 100);
        let long = format!("MAIL FROM:<a@b.example> ENVID={}", "x".repeat(101));
        assert_eq!(reply_of(&long), "501 5.5.4");
    }

    #[test]
    fn malformed_parameter_syntax_is_501_5_5_4() {
        for line in [
            "MAIL FROM:<a@b.example>SIZE=1",
            "MAIL FROM:<a@b.example> =1",
            "MAIL FROM:<a@b.example> -X=1",
            "MAIL FROM:<a@b.example> SI_ZE=1",
            "MAIL FROM:<a@b.example> SIZE=1=2",
            "RCPT TO:<a@b.example> NOTIFY=NEVER\x01",
        ] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line:?}");
        }
    }

    #[test]
    fn rcpt_parameters() {
        let r = rcpt("RCPT TO:<a@b.example> NOTIFY=NEVER ORCPT=rfc822;a+2Bb@b.example");
        assert_eq!(r.recipient, recipient("a", "b.example"));
        assert_eq!(r.notify, Some(Notify::NEVER));
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;a+2Bb@b.example"));
        let r = rcpt("RCPT TO:<a@b.example> ORCPT=utf-8;a@b.example");
        assert_eq!(r.orcpt.as_deref(), Some("utf-8;a@b.example"));
    }

    #[test]
    fn bdat_size_and_last() {
        assert_eq!(
            parse("BDAT 1000"),
            Ok(Command::Bdat {
                size: 1000,
                last: false
            })
        );
        assert_eq!(
            parse("bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        assert_eq!(
            parse("BDAT 18446744073709551615 LAST"),
            Ok(Command::Bdat {
                size: u64::MAX,
                last: true
            })
        );
    }

    #[test]
    fn bad_bdat_is_501_5_5_4() {
        for line in [
            "BDAT",
            "BDAT ",
            "BDAT x",
            "BDAT -1",
            "BDAT 18446744073709551616",
            "BDAT 10 FIRST",
            "BDAT 10 LAST x",
        ] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line:?}");
        }
    }

    #[test]
    fn auth_mechanism_is_uppercased() {
        assert_eq!(
            parse("AUTH plain dGVzdAB0ZXN0ADEyMzQ="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some("dGVzdAB0ZXN0ADEyMzQ=".into())
            })
        );
        assert_eq!(
            parse("AUTH login"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None
            })
        );
        assert_eq!(
            parse("AUTH EXTERNAL ="),
            Ok(Command::Auth {
                mechanism: "EXTERNAL".into(),
                initial_response: Some("=".into())
            })
        );
    }

    #[test]
    fn bad_auth_is_501_5_5_4() {
        for line in [
            "AUTH",
            "AUTH ",
            "AUTH PL@IN",
            "AUTH PLAIN a b",
            "AUTH ABCDEFGHIJKLMNOPQRSTU",
        ] {
            assert_eq!(reply_of(line), "501 5.5.4", "{line:?}");
        }
    }

    #[test]
    fn non_utf8_argument_is_501_5_5_4() {
        assert_eq!(
            parse_command(b"VRFY \xff"),
            Err(ParseError::Syntax("invalid UTF-8"))
        );
    }

    #[test]
    fn error_replies_carry_printable_text() {
        let r = parse("MAIL FROM:<a@b.example> X\u{7}Y=1")
            .unwrap_err()
            .reply();
        assert!(r
            .to_bytes()
            .iter()
            .all(|&b| b >= 32 || b == b'\r' || b == b'\n'));
        let r = ParseError::UnknownParameter("AB\r\nCD".into()).reply();
        assert_eq!(r.to_bytes(), b"555 5.5.4 Unsupported parameter ABCD\r\n");
        assert_eq!(
            parse("MAIL FROM:a@b").unwrap_err().reply().to_bytes(),
            b"501 5.1.7 Bad sender address syntax: angle brackets required\r\n"
        );
    }

    #[test]
    fn write_to_serialises_mail_with_its_parameters() {
        let cmd = Command::Mail(MailFrom {
            sender: sender("john doe", "b.example"),
            size: Some(10),
            body: Some(BodyType::EightBitMime),
            smtputf8: true,
            ret: Some(Ret::Full),
            envid: Some("x+2By".into()),
            auth: Some("<>".into()),
        });
        assert_eq!(
            cmd.to_bytes(),
            b"MAIL FROM:<\"john doe\"@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=x+2By AUTH=<>\r\n"
        );
        assert_eq!(
            Command::Mail(MailFrom::default()).to_bytes(),
            b"MAIL FROM:<>\r\n"
        );
    }

    #[test]
    fn write_to_serialises_rcpt_with_its_parameters() {
        let cmd = Command::Rcpt(RcptTo {
            recipient: recipient("a", "b.example"),
            notify: Some(Notify {
                success: true,
                failure: false,
                delay: true,
            }),
            orcpt: Some("rfc822;a@b.example".into()),
        });
        assert_eq!(
            cmd.to_bytes(),
            b"RCPT TO:<a@b.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a@b.example\r\n"
        );
        assert_eq!(
            Command::Rcpt(RcptTo::new(ForwardPath::Postmaster)).to_bytes(),
            b"RCPT TO:<Postmaster>\r\n"
        );
    }

    #[test]
    fn write_to_cannot_inject_a_second_command() {
        let cmd = Command::Helo("x.example\r\nMAIL FROM:<evil@x.example>".into());
        assert_eq!(
            cmd.to_bytes(),
            b"HELO x.exampleMAIL FROM:<evil@x.example>\r\n"
        );
    }

    #[test]
    fn every_command_round_trips_through_write_and_parse() {
        let commands = vec![
            Command::Helo("x.example".into()),
            Command::Ehlo("[192.0.2.1]".into()),
            Command::Mail(MailFrom::default()),
            Command::Mail(MailFrom {
                sender: sender("a\"b", "ü.example"),
                size: Some(u64::MAX),
                body: Some(BodyType::BinaryMime),
                smtputf8: true,
                ret: Some(Ret::Hdrs),
                envid: Some("id".into()),
                auth: Some("a@b.example".into()),
            }),
            Command::Rcpt(RcptTo::new(ForwardPath::Postmaster)),
            Command::Rcpt(RcptTo {
                recipient: recipient("a", "b.example"),
                notify: Some(Notify::NEVER),
                orcpt: Some("rfc822;a@b.example".into()),
            }),
            Command::Data,
            Command::Bdat {
                size: 0,
                last: true,
            },
            Command::Bdat {
                size: 42,
                last: false,
            },
            Command::Rset,
            Command::Vrfy("user".into()),
            Command::Expn("list".into()),
            Command::Help(None),
            Command::Help(Some("MAIL".into())),
            Command::Noop,
            Command::Quit,
            Command::StartTls,
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some("AGEAYg==".into()),
            },
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None,
            },
            Command::Verb(None),
            Command::Verb(Some("on".into())),
        ];
        for cmd in commands {
            let bytes = cmd.to_bytes();
            assert!(bytes.ends_with(b"\r\n"));
            assert_eq!(
                parse_command(&bytes[..bytes.len() - 2]),
                Ok(cmd.clone()),
                "{cmd:?}"
            );
        }
    }

    #[test]
    fn verb_names_for_logs() {
        assert_eq!(parse("mail from:<>").unwrap().verb(), "MAIL");
        assert_eq!(Command::StartTls.verb(), "STARTTLS");
    }

    #[test]
    fn address_error_kinds_are_kept() {
        assert_eq!(
            parse("MAIL FROM:<a@b.example"),
            Err(ParseError::BadSender(AddressError::Unterminated))
        );
        assert_eq!(
            parse("RCPT TO:<>"),
            Err(ParseError::BadRecipient(AddressError::Empty))
        );
    }
}
