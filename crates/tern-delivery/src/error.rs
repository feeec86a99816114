use std::io;

use tern_smtp::reply::{Reply, ReplyError};

/// Why a connection or a transaction failed as a whole. Per-recipient refusals are not errors:
/// they come back as [`crate::RecipientOutcome`]s.
///
/// After any error the connection is unusable (its state with the server is unknown); the
/// caller drops it and, for connection-level errors, tries the next MX host.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The TCP connection could not be established.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// No reply (or no progress writing) within the configured timeout; names the stage.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The server greeted with something other than 220 (RFC 5321 §3.1: 554 means "no SMTP
    /// service here", 421 "try later"); the caller tries the next MX host.
    #[error("greeting refused: {0}")]
    Greeting(Reply),
    /// A connection-level command (EHLO/HELO, STARTTLS, RSET) was refused.
    #[error("{command} refused: {reply}")]
    Refused { command: &'static str, reply: Reply },
    /// The TLS handshake failed (certificate rejected, protocol error, …).
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The policy requires TLS and the server did not offer STARTTLS.
    #[error("TLS required but the server does not offer STARTTLS")]
    TlsRequired,
    /// The server's reply could not be parsed.
    #[error("malformed reply: {0}")]
    Reply(ReplyError),
    /// The server broke the protocol in some other way.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reading or writing failed, or the server closed the connection.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// A previous error left this connection in an unknown state.
    #[error("connection unusable after an earlier error")]
    Broken,
    /// The RSET that reopened a reused connection failed (the server had closed it, or
    /// refused RSET): the transaction it led was not settled, and may be retried elsewhere.
    #[error("reused connection failed at RSET: {0}")]
    StaleConnection(String),
}

// Manual rather than `#[from]`, which would also make the cause the error's `source()`: the
// message already includes it, and a reporter printing the chain would say it twice.
impl From<io::Error> for DeliveryError {
    fn from(e: io::Error) -> Self {
        DeliveryError::Io(e)
    }
}

impl From<ReplyError> for DeliveryError {
    fn from(e: ReplyError) -> Self {
        DeliveryError::Reply(e)
    }
}

impl DeliveryError {
    /// Whether the failure came with a 5yz reply, i.e. retrying the same server later with the
    /// same request is pointless (RFC 5321 §4.2.1). The caller should still try the other MX
    /// hosts before bouncing: a 5yz greeting or EHLO refusal speaks only for this host.
    /// Everything else (timeouts, I/O, TLS, malformed replies, TLS required but not offered) is
    /// transient: the message is retried later.
    pub fn is_permanent(&self) -> bool {
        match self {
            DeliveryError::Greeting(reply) | DeliveryError::Refused { reply, .. } => {
                reply.is_permanent()
            }
            _ => false,
        }
    }
}
