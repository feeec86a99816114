//! SMTP commands: parsing a line from a client (server side) and writing one (client side).

use serde::{Deserialize, Serialize};

use crate::address::{self, ForwardPath, ReversePath};
use crate::{xtext, BodyType, Notify, ParseError, Ret};

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
