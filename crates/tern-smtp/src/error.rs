//! Why a command line could not be parsed, and the reply each reason earns.

use crate::address::AddressError;
use crate::reply::{EnhancedCode, Reply};

/// Why [`crate::command::parse_command`] refused a line. Each kind maps to the reply RFC 5321
/// §4.2 and RFC 3463 prescribe; see [`ParseError::reply`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The verb is not one we know: `500 5.5.1`.
    #[error("unrecognized command")]
    UnknownCommand,
    /// General syntax error (missing `FROM:`/`TO:`, bad EHLO domain, missing or extra argument,
    /// bad BDAT size, …): `501 5.5.4`.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// The MAIL reverse-path is malformed: `501 5.1.7` (RFC 3463: bad sender's mailbox address
    /// syntax).
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    /// The RCPT forward-path is malformed: `501 5.1.3` (RFC 3463: bad destination mailbox
    /// address syntax).
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    /// A MAIL/RCPT parameter we do not implement: `555 5.5.4` (RFC 5321 §4.1.1.11, §4.2.3).
    #[error("unsupported parameter {0}")]
    UnknownParameter(String),
    /// A parameter we know with a bad or duplicate value: `501 5.5.4`.
    #[error("bad {keyword} parameter: {reason}")]
    BadParameter {
        keyword: &'static str,
        reason: &'static str,
    },
}

impl ParseError {
    pub fn reply(&self) -> Reply {
        const E551: Option<EnhancedCode> = Some(EnhancedCode::new(5, 5, 1));
        const E554: Option<EnhancedCode> = Some(EnhancedCode::new(5, 5, 4));
        match self {
            ParseError::UnknownCommand => Reply::new(500, E551, "Command unrecognized"),
            ParseError::Syntax(what) => Reply::new(501, E554, format!("Syntax error: {what}")),
            ParseError::BadSender(e) => Reply::new(
                501,
                Some(EnhancedCode::new(5, 1, 7)),
                format!("Bad sender address syntax: {e}"),
            ),
            ParseError::BadRecipient(e) => Reply::new(
                501,
                Some(EnhancedCode::new(5, 1, 3)),
                format!("Bad recipient address syntax: {e}"),
            ),
            ParseError::UnknownParameter(keyword) => {
                // The keyword is the client's; keep the reply printable and short.
                let keyword: String = keyword
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(32)
                    .collect();
                Reply::new(555, E554, format!("Unsupported parameter {keyword}"))
            }
            ParseError::BadParameter { keyword, reason } => {
                Reply::new(501, E554, format!("Bad {keyword} parameter: {reason}"))
            }
        }
    }
}
