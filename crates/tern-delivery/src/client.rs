//! The outbound SMTP client: one connection to one remote server (RFC 5321 §3, §4).
//!
//! The grammar (commands, replies, EHLO keywords) comes from `tern-smtp`; this module only adds
//! the socket, the timeouts, STARTTLS and the order of the conversation.
//!
//! Lines longer than 998 octets (RFC 5321 §4.5.3.1.6) are broken before sending, as Postfix's
//! `smtp_line_length_limit` does (see [`crate::fold`]): CRLF is inserted before a space or tab
//! near the limit, or CRLF and a space at the limit when there is none. This changes the
//! content, so a DKIM signature covering such a line no longer verifies. BINARYMIME content
//! (sent with BDAT, which has no line structure) is never folded.
//!
//! Not done yet, on purpose:
//! - with CHUNKING (RFC 3030) the content goes as one `BDAT <size> LAST` chunk; splitting it
//!   into several chunks (to stream from the spool) is left for later;
//! - 8BITMIME content to a server without 8BITMIME is sent unchanged (Postfix does the same by
//!   default) instead of being downgraded to 7bit as RFC 6152 §3 would prefer;
//! - `AUTH=` on MAIL is never sent: it is only meaningful to a server we authenticated to
//!   (RFC 4954 §5), and this client does not authenticate yet;
//! - the rustls client configuration is built per connection; it could be cached.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tern_message::{BodyType, Envelope};
use tern_smtp::address::{Address, ForwardPath, ReversePath};
use tern_smtp::command::{Command, MailFrom, RcptTo};
use tern_smtp::reply::{Capabilities, EnhancedCode, Reply, ReplyParser};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, instrument, warn};

use crate::fold::{fold_long_lines, MAX_LINE};
use crate::DeliveryError;

/// When to use STARTTLS (RFC 3207).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Use STARTTLS when the server offers it, plaintext when it does not. The certificate is
    /// NOT verified, like Postfix's `smtp_tls_security_level = may`: without DANE or MTA-STS
    /// there is no name to check it against that an active attacker could not also change (the
    /// MX lookup is unauthenticated), and refusing unverifiable certificates would push mail
    /// back to plaintext, which is worse (RFC 7435 opportunistic security). Once STARTTLS is
    /// offered, a failed handshake is an error, not a reason to fall back to plaintext.
    #[default]
    Opportunistic,
    /// Require STARTTLS and verify the certificate against [`ClientConfig::tls_roots`] and the
    /// server name given to [`SmtpConnection::connect`].
    Required,
    /// Never use STARTTLS.
    None,
}

impl TlsPolicy {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::None => "none",
        }
    }
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown TLS policy {0:?} (expected \"opportunistic\", \"required\" or \"none\")")]
pub struct UnknownTlsPolicy(String);

impl FromStr for TlsPolicy {
    type Err = UnknownTlsPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "opportunistic" => Ok(TlsPolicy::Opportunistic),
            "required" => Ok(TlsPolicy::Required),
            "none" => Ok(TlsPolicy::None),
            other => Err(UnknownTlsPolicy(other.to_string())),
        }
    }
}

/// Settings for outbound connections.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The name we give in EHLO/HELO: our own host name.
    pub helo_name: String,
    pub connect_timeout: Duration,
    /// The wait for the greeting and for each command reply, and for each command write.
    pub command_timeout: Duration,
    /// The wait for writing the message content and for the reply after the final dot.
    pub data_timeout: Duration,
    pub tls: TlsPolicy,
    /// Trust anchors for [`TlsPolicy::Required`]. Empty by default: the webpki root list is not
    /// available offline, so the operator (or a test) supplies the roots to trust.
    pub tls_roots: Arc<RootCertStore>,
}

impl ClientConfig {
    /// Timeouts from RFC 5321 §4.5.3.2: 5 minutes per command, 10 minutes for the reply to the
    /// final dot (the server may do its delivery work before answering); 30 s to connect.
    pub fn new(helo_name: impl Into<String>) -> Self {
        Self {
            helo_name: helo_name.into(),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            tls: TlsPolicy::default(),
            tls_roots: Arc::new(RootCertStore::empty()),
        }
    }
}

/// What became of one recipient, with the reply that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipientOutcome {
    /// 2yz: the server took responsibility for the message.
    Delivered(Reply),
    /// 4yz (or anything unexpected): try again later.
    Deferred(Reply),
    /// 5yz: do not retry; bounce.
    Failed(Reply),
}

impl RecipientOutcome {
    /// Classifies a reply by its first digit (RFC 5321 §4.2.1). A 1yz or 3yz reply where a
    /// completion was expected is a protocol violation: treated as transient.
    pub fn from_reply(reply: Reply) -> Self {
        if reply.is_positive_completion() {
            RecipientOutcome::Delivered(reply)
        } else if reply.is_permanent() {
            RecipientOutcome::Failed(reply)
        } else {
            RecipientOutcome::Deferred(reply)
        }
    }

    pub fn reply(&self) -> &Reply {
        match self {
            RecipientOutcome::Delivered(r)
            | RecipientOutcome::Deferred(r)
            | RecipientOutcome::Failed(r) => r,
        }
    }
}

/// A stream that is either plain TCP or TLS over it; boxed so STARTTLS can swap it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection to a remote SMTP server, reusable for several transactions
/// ([`SmtpConnection::reset`] between them).
pub struct SmtpConnection {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    parser: ReplyParser,
    caps: Capabilities,
    tls: Option<String>,
    peer: SocketAddr,
    command_timeout: Duration,
    data_timeout: Duration,
    /// Set after any error: the server's idea of the session is unknown from then on.
    broken: bool,
    /// `reset` was asked for on a PIPELINING server: the RSET goes at the head of the next
    /// transaction's command group instead of costing a round trip of its own.
    reset_due: bool,
}

impl fmt::Debug for SmtpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConnection")
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl SmtpConnection {
    /// Connects, reads the greeting, says EHLO (HELO if EHLO gets a 5yz), negotiates STARTTLS
    /// as `cfg.tls` says and says EHLO again over TLS.
    ///
    /// A greeting other than 220 is [`DeliveryError::Greeting`]; the caller tries the next MX.
    #[instrument(name = "smtp_connect", skip_all, fields(%addr, server = server_name))]
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        cfg: &ClientConfig,
    ) -> Result<Self, DeliveryError> {
        let tcp = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(DeliveryError::Timeout("connect")),
            Ok(Err(e)) => return Err(DeliveryError::Connect(e)),
            Ok(Ok(tcp)) => tcp,
        };
        // Commands are written whole (a pipelined group in one write); Nagle would only delay
        // the last segment of each.
        let _ = tcp.set_nodelay(true);
        let mut conn = SmtpConnection {
            io: Box::new(tcp),
            rbuf: BytesMut::with_capacity(4096),
            parser: ReplyParser::new(),
            caps: Capabilities::default(),
            tls: None,
            peer: addr,
            command_timeout: cfg.command_timeout,
            data_timeout: cfg.data_timeout,
            broken: false,
            reset_due: false,
        };

        let greeting = conn.read_reply(conn.command_timeout, "greeting").await?;
        if greeting.code != 220 {
            // RFC 5321 §3.1: after a 554 greeting the client should still send QUIT; a 421
            // server is closing anyway.
            if greeting.is_permanent() {
                conn.quit().await;
            }
            return Err(DeliveryError::Greeting(greeting));
        }
        conn.hello(&cfg.helo_name).await?;

        match cfg.tls {
            TlsPolicy::None => {}
            _ if conn.caps.has("STARTTLS") => conn.starttls(server_name, cfg).await?,
            TlsPolicy::Opportunistic => debug!("STARTTLS not offered; continuing in plaintext"),
            TlsPolicy::Required => {
                conn.quit().await;
                return Err(DeliveryError::TlsRequired);
            }
        }
        info!(tls = conn.tls.as_deref().unwrap_or("none"), "connected");
        Ok(conn)
    }

    /// The extensions the server announced (after STARTTLS, the ones announced over TLS).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// `"TLSv1.3 TLS_AES_256_GCM_SHA384"` when the connection uses TLS.
    pub fn tls(&self) -> Option<String> {
        self.tls.clone()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends one message: MAIL, RCPT for each recipient, DATA and the content. Returns one
    /// outcome per recipient, in the envelope's order. A refused MAIL or DATA applies to every
    /// recipient; the reply after the final dot applies to every recipient the server accepted.
    ///
    /// `body` is the message content with CRLF line endings, not dot-stuffed; lines over 998
    /// octets are folded before sending (except in BINARYMIME content). Call
    /// [`SmtpConnection::reset`] before the next message. An `Err` means the outcome of the
    /// transaction is unknown (treat every recipient as deferred) and the connection is
    /// unusable.
    #[instrument(name = "smtp_send", skip_all, fields(peer = %self.peer, rcpts = envelope.recipients.len()))]
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<Vec<RecipientOutcome>, DeliveryError> {
        if self.broken {
            return Err(DeliveryError::Broken);
        }
        let result = self.transaction(envelope, body).await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// RSET (RFC 5321 §4.1.1.5): clears any transaction so the connection can carry the next
    /// message. To a server with PIPELINING the RSET is sent with the next transaction's
    /// MAIL/RCPT/DATA group (RFC 2920 §3.1 lets it appear anywhere in a group), which saves a
    /// round trip per message on a reused connection; if it then fails, [`SmtpConnection::send`]
    /// answers [`DeliveryError::StaleConnection`] before anything of the transaction counted.
    /// Without PIPELINING it is sent now.
    pub async fn reset(&mut self) -> Result<(), DeliveryError> {
        if self.broken {
            return Err(DeliveryError::Broken);
        }
        if self.caps.has("PIPELINING") {
            self.reset_due = true;
            return Ok(());
        }
        let result = self.rset().await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// QUIT and close. Best effort: the messages are already settled, so errors are only
    /// logged, and the wait is short (at most 10 s) since nothing rides on the answer. After an
    /// error the connection is just closed: a server that stopped answering would only make
    /// us wait.
    pub async fn quit(mut self) {
        let t = self.command_timeout.min(Duration::from_secs(10));
        if !self.broken {
            match self.command(&Command::Quit, t, "QUIT").await {
                Ok(reply) => debug!(%reply, "QUIT"),
                Err(e) => debug!(error = %e, "QUIT failed"),
            }
        }
        let _ = tokio::time::timeout(t, self.io.shutdown()).await;
    }

    async fn transaction(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<Vec<RecipientOutcome>, DeliveryError> {
        // Before anything measures or stuffs it: SIZE, the BDAT count and dot-stuffing all see
        // the content as it goes on the wire. BINARYMIME content has no lines to fold.
        let folded;
        let body = if envelope.body_type == BodyType::BinaryMime {
            body
        } else {
            folded = fold_long_lines(body, MAX_LINE);
            if let Cow::Owned(_) = &folded {
                debug!(
                    before = body.len(),
                    after = folded.len(),
                    "folded lines over {MAX_LINE} octets"
                );
            }
            &*folded
        };
        let n = envelope.recipients.len();
        let all_failed =
            |reply: Reply| vec![RecipientOutcome::Failed(reply); envelope.recipients.len()];

        // Refusals decided before saying anything: the server could not take the message anyway.
        if envelope.smtputf8 && !self.caps.has("SMTPUTF8") {
            // RFC 6531 §3.2: a message that needs SMTPUTF8 must not go to a server without it.
            return Ok(all_failed(Reply::new(
                553,
                Some(EnhancedCode::new(5, 6, 7)),
                "message needs SMTPUTF8, which the server does not offer",
            )));
        }
        // RFC 3030 §3: BDAT sends the content as counted octets, no dot-stuffing, no line
        // structure needed; it is the only way to send BINARYMIME content.
        let chunking = self.caps.has("CHUNKING");
        if envelope.body_type == BodyType::BinaryMime && !(chunking && self.caps.has("BINARYMIME"))
        {
            // RFC 3030 §3: without BINARYMIME the content would need converting, which this
            // client does not do.
            return Ok(all_failed(Reply::new(
                554,
                Some(EnhancedCode::new(5, 6, 3)),
                "BINARYMIME content, and the server does not offer BINARYMIME with CHUNKING",
            )));
        }
        let size = body.len() as u64;
        if let Some(max) = self.caps.size().filter(|&max| max > 0) {
            if size > max {
                // RFC 1870 §6.1: the server announced a fixed limit; sending would only get 552.
                return Ok(all_failed(Reply::new(
                    552,
                    Some(EnhancedCode::new(5, 3, 4)),
                    format!("message size {size} exceeds the server's limit of {max}"),
                )));
            }
        }
        let sender = if envelope.sender.is_empty() {
            ReversePath::Null
        } else {
            match Address::parse(&envelope.sender) {
                Ok(a) => ReversePath::Address(a),
                Err(e) => {
                    return Ok(all_failed(Reply::new(
                        553,
                        Some(EnhancedCode::new(5, 1, 7)),
                        format!("bad sender address: {e}"),
                    )))
                }
            }
        };

        // DSN parameters only to a server that announced DSN (RFC 3461 §4): others reject them.
        let dsn = self.caps.has("DSN");
        let mail = Command::Mail(MailFrom {
            sender,
            size: self.caps.has("SIZE").then_some(size),
            body: match envelope.body_type {
                BodyType::EightBitMime if self.caps.has("8BITMIME") => Some(BodyType::EightBitMime),
                BodyType::BinaryMime => Some(BodyType::BinaryMime),
                _ => None,
            },
            smtputf8: envelope.smtputf8,
            ret: envelope.ret.filter(|_| dsn),
            envid: envelope.envid.clone().filter(|_| dsn),
            auth: None,
        });

        let mut outcomes: Vec<Option<RecipientOutcome>> = vec![None; n];
        let mut rcpts: Vec<(usize, Command)> = Vec::with_capacity(n);
        for (i, r) in envelope.recipients.iter().enumerate() {
            let path = if r.address.eq_ignore_ascii_case("postmaster") {
                Ok(ForwardPath::Postmaster)
            } else {
                Address::parse(&r.address).map(ForwardPath::Address)
            };
            match path {
                Ok(recipient) => rcpts.push((
                    i,
                    Command::Rcpt(RcptTo {
                        recipient,
                        notify: r.notify.filter(|_| dsn),
                        orcpt: r.orcpt.clone().filter(|_| dsn),
                    }),
                )),
                Err(e) => {
                    outcomes[i] = Some(RecipientOutcome::Failed(Reply::new(
                        553,
                        Some(EnhancedCode::new(5, 1, 3)),
                        format!("bad recipient address: {e}"),
                    )))
                }
            }
        }
        if rcpts.is_empty() {
            return Ok(outcomes.into_iter().flatten().collect());
        }

        let t = self.command_timeout;
        let (mail_reply, data_reply) = if self.caps.has("PIPELINING") {
            // RFC 2920 §3.1: MAIL, the RCPTs and DATA (which must end the group) in one write,
            // then the replies in the same order. With CHUNKING the group ends after the RCPTs:
            // the BDAT chunk follows only once a recipient was accepted, so a message nobody
            // takes is not sent for nothing.
            let mut out = Vec::new();
            let reset = std::mem::take(&mut self.reset_due);
            if reset {
                Command::Rset.write_to(&mut out);
            }
            mail.write_to(&mut out);
            for (_, rcpt) in &rcpts {
                rcpt.write_to(&mut out);
            }
            if !chunking {
                Command::Data.write_to(&mut out);
            }
            let written = self.write(&out, t, "MAIL/RCPT/DATA").await;
            if reset {
                // A reused connection the server has dropped (idle timeout) fails here, and a
                // refused RSET means the session is not what we think: either way nothing of
                // this transaction is settled, and the caller retries it on a new connection.
                // (After a refused RSET the server may go on with the pipelined MAIL/RCPT/DATA;
                // the connection is dropped mid-transaction, so nothing is delivered.)
                let stale = match written {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => match self.read_reply(t, "RSET").await {
                        Ok(r) if r.is_positive_completion() => None,
                        Ok(r) => Some(format!("RSET answered {r}")),
                        Err(e) => Some(e.to_string()),
                    },
                };
                if let Some(why) = stale {
                    return Err(DeliveryError::StaleConnection(why));
                }
            } else {
                written?;
            }
            let mail_reply = self.read_reply(t, "MAIL").await?;
            if mail_reply.code == 421 {
                return Ok(self.server_closing(mail_reply, outcomes));
            }
            for (i, _) in &rcpts {
                let reply = self.read_reply(t, "RCPT").await?;
                if reply.code == 421 {
                    return Ok(self.server_closing(reply, outcomes));
                }
                // After a refused MAIL the RCPT replies are only 503s: MAIL's reply decides.
                outcomes[*i] = Some(RecipientOutcome::from_reply(
                    if mail_reply.is_positive_completion() {
                        reply
                    } else {
                        mail_reply.clone()
                    },
                ));
            }
            if chunking {
                (mail_reply, None)
            } else {
                let data_reply = self.read_reply(t, "DATA").await?;
                if data_reply.code == 421 {
                    return Ok(self.server_closing(data_reply, outcomes));
                }
                (mail_reply, Some(data_reply))
            }
        } else {
            let mail_reply = self.command(&mail, t, "MAIL").await?;
            if mail_reply.code == 421 {
                return Ok(self.server_closing(mail_reply, outcomes));
            }
            if mail_reply.is_positive_completion() {
                for (i, rcpt) in &rcpts {
                    let reply = self.command(rcpt, t, "RCPT").await?;
                    if reply.code == 421 {
                        return Ok(self.server_closing(reply, outcomes));
                    }
                    outcomes[*i] = Some(RecipientOutcome::from_reply(reply));
                }
            } else {
                for (i, _) in &rcpts {
                    outcomes[*i] = Some(RecipientOutcome::from_reply(mail_reply.clone()));
                }
            }
            (mail_reply, None)
        };

        let accepted: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Some(RecipientOutcome::Delivered(_))))
            .map(|(i, _)| i)
            .collect();
        if !mail_reply.is_positive_completion() || accepted.is_empty() {
            debug!(mail = %mail_reply, "no recipient accepted");
            if let Some(data_reply) = &data_reply {
                if data_reply.code == 354 {
                    // RFC 2920 §3.1: a server that accepts DATA with no valid recipient gets an
                    // empty message, which it must then refuse.
                    self.write(b".\r\n", t, "DATA").await?;
                    self.read_reply(self.data_timeout, "end of data").await?;
                }
            }
            // A transaction may still be open (MAIL accepted): the caller's `reset` before the
            // next message clears it (with PIPELINING, in the next group), and QUIT needs none.
            // No RSET of our own: its failure would turn the refusals above into an `Err`.
            return Ok(outcomes.into_iter().flatten().collect());
        }

        if chunking {
            // The same final CRLF as with DATA (which needs it before the dot), so a message
            // reads the same whichever way it went.
            let tail = missing_line_end(body);
            let mut out = Vec::with_capacity(body.len() + 32);
            Command::Bdat {
                size: (body.len() + tail.len()) as u64,
                last: true,
            }
            .write_to(&mut out);
            out.extend_from_slice(body);
            out.extend_from_slice(tail);
            self.write(&out, self.data_timeout, "BDAT").await?;
            let reply = self.read_reply(self.data_timeout, "BDAT").await?;
            return Ok(self.settle(reply, &accepted, outcomes));
        }

        let data_reply = match data_reply {
            Some(reply) => reply,
            None => self.command(&Command::Data, t, "DATA").await?,
        };
        if data_reply.code == 421 {
            return Ok(self.server_closing(data_reply, outcomes));
        }
        let final_reply = if data_reply.code == 354 {
            let content = dot_stuff(body);
            self.write(&content, self.data_timeout, "message content")
                .await?;
            self.read_reply(self.data_timeout, "end of data").await?
        } else if data_reply.is_positive_completion() {
            return Err(DeliveryError::Protocol(format!(
                "DATA answered with {data_reply} instead of 354"
            )));
        } else {
            data_reply
        };
        Ok(self.settle(final_reply, &accepted, outcomes))
    }

    /// The reply to the content applies to every accepted recipient.
    fn settle(
        &mut self,
        final_reply: Reply,
        accepted: &[usize],
        mut outcomes: Vec<Option<RecipientOutcome>>,
    ) -> Vec<RecipientOutcome> {
        info!(reply = %final_reply, accepted = accepted.len(), "transaction done");
        if final_reply.code == 421 {
            // Deferred like any 4yz; the server is closing (RFC 5321 §3.8).
            self.broken = true;
        }
        for &i in accepted {
            outcomes[i] = Some(RecipientOutcome::from_reply(final_reply.clone()));
        }
        outcomes.into_iter().flatten().collect()
    }

    /// 421 (RFC 5321 §3.8): the server is closing the connection, whatever command it answers.
    /// Every recipient not settled yet, and every one accepted but not yet given the content,
    /// is deferred; the connection is done.
    fn server_closing(
        &mut self,
        reply: Reply,
        outcomes: Vec<Option<RecipientOutcome>>,
    ) -> Vec<RecipientOutcome> {
        warn!(%reply, "server is closing the connection");
        self.broken = true;
        outcomes
            .into_iter()
            .map(|o| match o {
                None | Some(RecipientOutcome::Delivered(_)) => {
                    RecipientOutcome::Deferred(reply.clone())
                }
                Some(settled) => settled,
            })
            .collect()
    }

    async fn hello(&mut self, helo_name: &str) -> Result<(), DeliveryError> {
        let t = self.command_timeout;
        let reply = self
            .command(&Command::Ehlo(helo_name.to_string()), t, "EHLO")
            .await?;
        if reply.is_positive_completion() {
            self.caps = Capabilities::from_ehlo_reply(&reply);
            return Ok(());
        }
        if !reply.is_permanent() {
            return Err(DeliveryError::Refused {
                command: "EHLO",
                reply,
            });
        }
        // RFC 5321 §3.2: a server that does not know EHLO answers 5yz; fall back to HELO, which
        // announces no extension.
        debug!(%reply, "EHLO refused; trying HELO");
        let reply = self
            .command(&Command::Helo(helo_name.to_string()), t, "HELO")
            .await?;
        if !reply.is_positive_completion() {
            return Err(DeliveryError::Refused {
                command: "HELO",
                reply,
            });
        }
        let mut caps = Capabilities::default();
        caps.greeting = reply.lines.first().cloned().unwrap_or_default();
        self.caps = caps;
        Ok(())
    }

    async fn starttls(
        &mut self,
        server_name: &str,
        cfg: &ClientConfig,
    ) -> Result<(), DeliveryError> {
        let t = self.command_timeout;
        let reply = self.command(&Command::StartTls, t, "STARTTLS").await?;
        if reply.code != 220 {
            return Err(DeliveryError::Refused {
                command: "STARTTLS",
                reply,
            });
        }
        if !self.rbuf.is_empty() {
            // Bytes after the 220 were sent in plaintext before the handshake: reading them as
            // if they came over TLS is the STARTTLS injection flaw (CVE-2011-0411, RFC 3207 §6).
            return Err(DeliveryError::Protocol(
                "data after the STARTTLS reply, before the handshake".into(),
            ));
        }
        let config = tls_client_config(cfg)?;
        let name = match ServerName::try_from(server_name.to_string()) {
            Ok(name) => name,
            // Opportunistic TLS checks no name; the peer's address will do for the handshake.
            Err(_) if cfg.tls != TlsPolicy::Required => {
                ServerName::IpAddress(self.peer.ip().into())
            }
            Err(e) => {
                return Err(DeliveryError::Tls(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad server name {server_name:?}: {e}"),
                )))
            }
        };
        // The placeholder is never used: on failure the connection is dropped.
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::duplex(1).0));
        let connector = TlsConnector::from(Arc::new(config));
        let stream = match tokio::time::timeout(t, connector.connect(name, plain)).await {
            Err(_) => return Err(DeliveryError::Timeout("TLS handshake")),
            Ok(Err(e)) => return Err(DeliveryError::Tls(e)),
            Ok(Ok(stream)) => stream,
        };
        self.tls = Some(tern_tls::describe(stream.get_ref().1));
        self.io = Box::new(stream);
        self.parser = ReplyParser::new();
        // RFC 3207 §4.2: forget what the server said before TLS and ask again.
        self.caps = Capabilities::default();
        self.hello(&cfg.helo_name).await
    }

    async fn rset(&mut self) -> Result<(), DeliveryError> {
        let reply = self
            .command(&Command::Rset, self.command_timeout, "RSET")
            .await?;
        if reply.is_positive_completion() {
            Ok(())
        } else {
            Err(DeliveryError::Refused {
                command: "RSET",
                reply,
            })
        }
    }

    async fn command(
        &mut self,
        command: &Command,
        t: Duration,
        stage: &'static str,
    ) -> Result<Reply, DeliveryError> {
        self.write(&command.to_bytes(), t, stage).await?;
        self.read_reply(t, stage).await
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        t: Duration,
        stage: &'static str,
    ) -> Result<(), DeliveryError> {
        let io = &mut self.io;
        with_timeout(t, stage, async {
            io.write_all(bytes).await?;
            // TLS buffers records until flushed.
            io.flush().await
        })
        .await
    }

    async fn read_reply(
        &mut self,
        t: Duration,
        stage: &'static str,
    ) -> Result<Reply, DeliveryError> {
        loop {
            if let Some(reply) = self.parser.ingest(&mut self.rbuf) {
                let reply = reply?;
                debug!(stage, %reply, "reply");
                return Ok(reply);
            }
            let n = with_timeout(t, stage, self.io.read_buf(&mut self.rbuf)).await?;
            if n == 0 {
                warn!(stage, "server closed the connection");
                return Err(DeliveryError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("server closed the connection during {stage}"),
                )));
            }
        }
    }
}

async fn with_timeout<T>(
    t: Duration,
    stage: &'static str,
    f: impl Future<Output = io::Result<T>>,
) -> Result<T, DeliveryError> {
    match tokio::time::timeout(t, f).await {
        Err(_) => Err(DeliveryError::Timeout(stage)),
        Ok(r) => Ok(r?),
    }
}

/// The message content as it goes after DATA: a dot at the start of a line doubled (RFC 5321
/// §4.5.2), a final CRLF added if missing, then the `.CRLF` that ends the data. A dot after a
/// bare LF is doubled too, in case the server counts bare LF as a line end.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    // Copies whole runs between the dots to double (memchr for the line ends): relaying spends
    // its CPU per byte here, and byte-by-byte pushing cost several percent of it.
    let mut from = 0;
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    for nl in memchr::memchr_iter(b'\n', body) {
        if body.get(nl + 1) == Some(&b'.') {
            out.extend_from_slice(&body[from..=nl]);
            out.push(b'.');
            from = nl + 1;
        }
    }
    out.extend_from_slice(&body[from..]);
    out.extend_from_slice(missing_line_end(body));
    out.extend_from_slice(b".\r\n");
    out
}

/// What completes the last line of `body`: nothing when it ends with CRLF (or is empty), LF
/// after a trailing CR, else CRLF.
fn missing_line_end(body: &[u8]) -> &'static [u8] {
    if body.is_empty() || body.ends_with(b"\r\n") {
        b""
    } else if body.ends_with(b"\r") {
        b"\n"
    } else {
        b"\r\n"
    }
}

fn tls_client_config(cfg: &ClientConfig) -> Result<rustls::ClientConfig, DeliveryError> {
    let provider = tern_tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DeliveryError::Tls(io::Error::other(e)))?;
    Ok(match cfg.tls {
        TlsPolicy::Required => builder
            .with_root_certificates(cfg.tls_roots.clone())
            .with_no_client_auth(),
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(tern_tls::AcceptAnyCertificate::new(provider))
            .with_no_client_auth(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_terminates() {
        assert_eq!(
            dot_stuff(b"a\r\n.b\r\n..c\r\n"),
            b"a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(dot_stuff(b"no final crlf"), b"no final crlf\r\n.\r\n");
        assert_eq!(dot_stuff(b"cr\r"), b"cr\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"a.b\r\n"), b"a.b\r\n.\r\n");
        assert_eq!(dot_stuff(b"a\n.b\n."), b"a\n..b\n..\r\n.\r\n");
    }

    #[test]
    fn dot_stuffing_matches_the_byte_by_byte_definition() {
        fn reference(body: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut line_start = true;
            for &b in body {
                if line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                line_start = b == b'\n';
            }
            out.extend_from_slice(missing_line_end(body));
            out.extend_from_slice(b".\r\n");
            out
        }
        // Every string of up to 6 octets over the alphabet that matters.
        let alphabet = [b'.', b'\r', b'\n', b'x'];
        for len in 0..=6u32 {
            for n in 0..4usize.pow(len) {
                let body: Vec<u8> = (0..len).map(|i| alphabet[n / 4usize.pow(i) % 4]).collect();
                assert_eq!(dot_stuff(&body), reference(&body), "{body:?}");
            }
        }
    }

    #[test]
    fn tls_policy_names_round_trip() {
        for p in [
            TlsPolicy::Opportunistic,
            TlsPolicy::Required,
            TlsPolicy::None,
        ] {
            assert_eq!(p.as_str().parse::<TlsPolicy>().unwrap(), p);
        }
        assert!("may".parse::<TlsPolicy>().is_err());
    }

    #[test]
    fn outcomes_follow_the_first_digit() {
        let r = |code| Reply::new(code, None, "x");
        assert!(matches!(
            RecipientOutcome::from_reply(r(250)),
            RecipientOutcome::Delivered(_)
        ));
        assert!(matches!(
            RecipientOutcome::from_reply(r(451)),
            RecipientOutcome::Deferred(_)
        ));
        assert!(matches!(
            RecipientOutcome::from_reply(r(550)),
            RecipientOutcome::Failed(_)
        ));
        assert!(matches!(
            RecipientOutcome::from_reply(r(354)),
            RecipientOutcome::Deferred(_)
        ));
    }
}
