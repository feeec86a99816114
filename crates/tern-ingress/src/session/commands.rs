//! The SMTP state machine of one session: what each command does and which reply it earns.
//! Replies are appended to `out`; the I/O loop flushes them when the client's pipelined input
//! is used up.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tern_message::{
    now_ms, BodyType, ClientInfo, Envelope, InboundMessage, QueueId, Recipient, SpoolError,
};
use tern_smtp::address::{ForwardPath, ReversePath};
use tern_smtp::command::{parse_command, Command, MailFrom, RcptTo};
use tern_smtp::data::{BdatReceiver, DataLimits, DataOutcome, DataReceiver};
use tern_smtp::line::LineTooLong;
use tern_smtp::reply::{EnhancedCode, Reply};
use tracing::{info, info_span, warn};

use super::Shared;
use crate::auth::{self, AuthStep, SaslError};
use crate::received::Trace;
use crate::settings::{canonical_ip, ListenerKind, Settings, VrfyPolicy};
use tern_policy::{CheckContent, CheckMail, CheckRcpt, CheckSpf, PolicyReply, SpfRecord, Verdict};

pub(crate) enum Mode {
    Command,
    Data(Box<DataReceiver>),
    Bdat(Box<BdatReceiver>, bool),
    Auth(AuthStep),
}

pub(crate) enum Flow {
    Continue,
    Enter(Mode),
    Close,
    StartTls,
}

struct Transaction {
    id: QueueId,
    sender: String,
    mail: MailFrom,
    recipients: Vec<Recipient>,
    /// Received header followed by the content as it arrives.
    body: Vec<u8>,
    /// Set once BDAT was used: DATA is then a sequence error (RFC 3030 §3).
    chunking: bool,
    /// A BDAT chunk broke a limit: later chunks are still read (the client sends them
    /// regardless) but the message will be refused with this reply.
    failed: Option<Reply>,
    /// Octets of content (excluding our Received header) across BDAT chunks.
    content_octets: u64,
    /// Recipients answered 250 but left out (suppressed, `suppression_action = "drop"`).
    dropped: usize,
    /// Length of our Received header at the start of `body`.
    trace_len: usize,
    /// What SPF said at MAIL FROM (strangers, when the check is on).
    spf: Option<SpfRecord>,
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    kind: ListenerKind,
    client: SocketAddr,
    local: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<String>,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    errors: u32,
    pub out: Vec<u8>,
}

fn code(class: u8, subject: u16, detail: u16) -> Option<EnhancedCode> {
    Some(EnhancedCode::new(class, subject, detail))
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        kind: ListenerKind,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Self {
        Self {
            shared,
            kind,
            client,
            local,
            helo: None,
            esmtp: false,
            tls: None,
            auth_user: None,
            tx: None,
            errors: 0,
            out: Vec::with_capacity(256),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The longest line (without CRLF) the reader must buffer before it knows the verb: MAIL
    /// with every advertised extension's allowance.
    pub fn max_command_line(&self) -> usize {
        tern_smtp::max_any_command_line(self.settings().command_line) - 2
    }

    fn reply(&mut self, code: u16, enhanced: Option<EnhancedCode>, text: &str) {
        self.send(Reply::new(code, enhanced, text));
    }

    fn send(&mut self, reply: Reply) {
        if reply.code >= 400 {
            self.errors += 1;
        }
        reply.write_to(&mut self.out);
    }

    /// The error budget (Postfix's smtpd_hard_error_limit): a client that keeps getting errors
    /// is broken or probing, and gets disconnected.
    fn after_reply(&mut self) -> Flow {
        if self.errors >= self.settings().errors {
            info!(errors = self.errors, "too many errors; closing");
            let text = format!("{} Error: too many errors", self.settings().hostname);
            Reply::new(421, code(4, 7, 0), text).write_to(&mut self.out);
            return Flow::Close;
        }
        Flow::Continue
    }

    pub fn greet(&mut self) {
        // RFC 2034 §3: the greeting carries no enhanced code.
        let text = format!("{} ESMTP Tern", self.settings().hostname);
        Reply::new(220, None, text).write_to(&mut self.out);
    }

    pub fn tls_started(&mut self, description: String) {
        info!(tls = %description, "TLS established");
        self.tls = Some(description);
        // RFC 3207 §4.2: forget everything learnt before TLS; the client must EHLO again.
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
    }

    /// RFC 5321 §3.8: a server that must close answers 421 first, so the client retries later
    /// (elsewhere, behind a load balancer) instead of seeing a broken connection.
    pub fn shutting_down(&mut self) {
        let text = format!("{} Service shutting down", self.settings().hostname);
        Reply::new(421, code(4, 3, 2), text).write_to(&mut self.out);
    }

    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.shutdown.clone()
    }

    pub fn timed_out(&mut self) {
        let text = format!("{} Error: timeout exceeded", self.settings().hostname);
        Reply::new(421, code(4, 4, 2), text).write_to(&mut self.out);
    }

    pub async fn on_command_line(&mut self, line: Result<BytesMut, LineTooLong>) -> Flow {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                self.send(e.reply());
                return self.after_reply();
            }
        };
        if let Err(e) = tern_smtp::check_command_line(&line, self.settings().command_line) {
            self.send(e.reply());
            return self.after_reply();
        }
        let flow = match parse_command(&line) {
            Ok(command) => self.on_command(command).await,
            Err(e) => {
                self.send(e.reply());
                Flow::Continue
            }
        };
        match flow {
            Flow::Continue => self.after_reply(),
            other => other,
        }
    }

    async fn on_command(&mut self, command: Command) -> Flow {
        match command {
            Command::Ehlo(domain) => self.on_hello(domain, true).await,
            Command::Helo(domain) => self.on_hello(domain, false).await,
            Command::Mail(mail) => self.on_mail(mail).await,
            Command::Rcpt(rcpt) => self.on_rcpt(rcpt).await,
            Command::Data => self.on_data(),
            Command::Bdat { size, last } => self.on_bdat(size, last),
            Command::Rset => {
                self.tx = None;
                self.reply(250, code(2, 0, 0), "Ok");
                Flow::Continue
            }
            Command::Noop => {
                self.reply(250, code(2, 0, 0), "Ok");
                Flow::Continue
            }
            Command::Quit => {
                let text = format!("{} closing connection", self.settings().hostname);
                self.reply(221, code(2, 0, 0), &text);
                Flow::Close
            }
            Command::Vrfy(_) | Command::Expn(_) => {
                match self.settings().vrfy {
                    VrfyPolicy::Ambiguous => self.reply(
                        252,
                        code(2, 5, 0),
                        "Cannot VRFY user, but will accept message and attempt delivery",
                    ),
                    VrfyPolicy::Refuse => {
                        self.reply(502, code(5, 5, 1), "Error: command disabled by policy")
                    }
                }
                Flow::Continue
            }
            Command::Help(_) => {
                self.send(Reply::multiline(
                    214,
                    code(2, 0, 0),
                    vec![
                        "Tern SMTP server. Commands:".into(),
                        "HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT".into(),
                        "VRFY EXPN HELP STARTTLS AUTH VERB".into(),
                        "See RFC 5321; extensions are listed in the EHLO reply".into(),
                    ],
                ));
                Flow::Continue
            }
            Command::Verb(_) => {
                // Sendmail's VERB streams a delivery transcript to the client; Tern delivers
                // asynchronously and reports through DSNs and logs instead.
                self.reply(
                    502,
                    code(5, 5, 1),
                    "VERB not supported: delivery is asynchronous, use DSN NOTIFY=SUCCESS",
                );
                Flow::Continue
            }
            Command::StartTls => self.on_starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.on_auth(mechanism, initial_response).await,
        }
    }

    /// Sends the reply the policy stage chose (counted as an error like any refusal).
    fn send_policy(&mut self, r: PolicyReply) {
        let (class, subject, detail) = r.enhanced;
        self.reply(r.code, code(class, subject, detail), &r.text);
    }

    /// Trusted networks and authenticated clients skip the checks aimed at strangers.
    fn trusted(&self) -> bool {
        self.auth_user.is_some() || self.settings().is_trusted_network(self.client.ip())
    }

    async fn on_hello(&mut self, domain: String, esmtp: bool) -> Flow {
        // HELO checks are for strangers, and run here: no round trip.
        if !self.trusted() {
            if let Some(policy) = &self.shared.settings.policy {
                let ip = canonical_ip(self.client.ip());
                if let Verdict::Refuse(r) = policy.helo_local(ip, &domain) {
                    self.send_policy(r);
                    return Flow::Continue;
                }
            }
        }
        self.tx = None;
        self.helo = Some(domain);
        self.esmtp = esmtp;
        let hostname = self.settings().hostname.clone();
        if !esmtp {
            // RFC 2034 §3: no enhanced code on the HELO/EHLO reply.
            self.reply(250, None, &hostname);
            return Flow::Continue;
        }
        let mut lines = vec![
            hostname,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.settings().message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
            "DSN".to_string(),
        ];
        if self.tls.is_none() && self.shared.tls.is_some() {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        lines.push("HELP".to_string());
        self.send(Reply::multiline(250, None, lines));
        Flow::Continue
    }

    /// RFC 8314 / RFC 6409: credentials only over TLS, and only where users submit mail.
    fn auth_offered(&self) -> bool {
        self.kind.offers_auth()
            && self.tls.is_some()
            && self.auth_user.is_none()
            && !self.settings().users.is_empty()
    }

    async fn on_mail(&mut self, mail: MailFrom) -> Flow {
        if self.helo.is_none() {
            self.reply(503, code(5, 5, 1), "Error: send HELO/EHLO first");
            return Flow::Continue;
        }
        if self.tx.is_some() {
            self.reply(503, code(5, 5, 1), "Error: nested MAIL command");
            return Flow::Continue;
        }
        let has_params = mail.size.is_some()
            || mail.body.is_some()
            || mail.smtputf8
            || mail.ret.is_some()
            || mail.envid.is_some()
            || mail.auth.is_some();
        if has_params && !self.esmtp {
            // RFC 5321 §4.1.1.11: parameters need EHLO.
            self.reply(555, code(5, 5, 4), "Error: MAIL parameters require EHLO");
            return Flow::Continue;
        }
        let limit = self.settings().message_size as u64;
        if mail.size.is_some_and(|size| size > limit) {
            self.reply(
                552,
                code(5, 3, 4),
                "Error: message size exceeds fixed limit",
            );
            return Flow::Continue;
        }
        if mail.body == Some(BodyType::BinaryMime) {
            // We do not advertise BINARYMIME (RFC 3030 §3): our delivery side may meet servers
            // that cannot take it, and we would have to re-encode.
            self.reply(555, code(5, 5, 4), "Error: BODY=BINARYMIME not supported");
            return Flow::Continue;
        }
        let sender = match &mail.sender {
            ReversePath::Null => String::new(),
            ReversePath::Address(address) => {
                if !address.is_ascii() && !mail.smtputf8 {
                    self.reply(
                        553,
                        code(5, 6, 7),
                        "Error: non-ASCII address requires SMTPUTF8",
                    );
                    return Flow::Continue;
                }
                address.to_string()
            }
        };
        if let Some(policy) = self.shared.settings.policy.clone() {
            let check = CheckMail {
                ip: canonical_ip(self.client.ip()),
                sender: sender.clone(),
                auth_user: self.auth_user.clone(),
            };
            // A policy stage that does not answer in time must not let mail in unchecked.
            let unavailable = Verdict::Refuse(PolicyReply::unavailable());
            if let Verdict::Refuse(r) = Box::pin(policy.ask(&policy.mail, check, unavailable)).await
            {
                self.send_policy(r);
                return Flow::Continue;
            }
        }
        let mut spf = None;
        if let (Some(policy), false) = (self.shared.settings.policy.clone(), self.trusted()) {
            if policy.checks_spf() {
                let check = CheckSpf {
                    ip: canonical_ip(self.client.ip()),
                    helo: self.helo.clone().unwrap_or_default(),
                    sender: sender.clone(),
                };
                let answer = Box::pin(policy.spf(check)).await;
                if let Verdict::Refuse(r) = answer.verdict {
                    self.send_policy(r);
                    return Flow::Continue;
                }
                spf = Some(answer.spf);
            }
        }
        self.tx = Some(Transaction {
            id: QueueId::new(),
            sender,
            mail,
            recipients: Vec::new(),
            body: Vec::new(),
            chunking: false,
            failed: None,
            content_octets: 0,
            dropped: 0,
            trace_len: 0,
            spf,
        });
        self.reply(250, code(2, 1, 0), "Ok");
        Flow::Continue
    }

    async fn on_rcpt(&mut self, rcpt: RcptTo) -> Flow {
        let recipients_limit = self.settings().recipients;
        let Some(tx) = self.tx.as_ref() else {
            self.reply(503, code(5, 5, 1), "Error: need MAIL command");
            return Flow::Continue;
        };
        if tx.chunking {
            self.reply(503, code(5, 5, 1), "Error: RCPT after BDAT");
            return Flow::Continue;
        }
        if tx.recipients.len() >= recipients_limit {
            self.reply(452, code(4, 5, 3), "Error: too many recipients");
            return Flow::Continue;
        }
        let smtputf8 = tx.mail.smtputf8;
        if !self.esmtp && (rcpt.notify.is_some() || rcpt.orcpt.is_some()) {
            self.reply(555, code(5, 5, 4), "Error: RCPT parameters require EHLO");
            return Flow::Continue;
        }
        let mut orcpt = rcpt.orcpt;
        let address = match &rcpt.recipient {
            ForwardPath::Postmaster => match &self.settings().postmaster {
                // Like an alias: the envelope names the mailbox that is read, and DSNs
                // still show what the client wrote (RFC 3461 §4.2, ORCPT).
                Some(to) => {
                    orcpt.get_or_insert_with(|| "rfc822;postmaster".to_string());
                    to.clone()
                }
                None => "postmaster".to_string(),
            },
            ForwardPath::Address(address) => {
                if !address.is_ascii() && !smtputf8 {
                    self.reply(
                        553,
                        code(5, 6, 7),
                        "Error: non-ASCII address requires SMTPUTF8",
                    );
                    return Flow::Continue;
                }
                if !self.may_relay_to(&address.domain) {
                    info!(recipient = %address, "relay denied");
                    self.reply(554, code(5, 7, 1), "Error: relay access denied");
                    return Flow::Continue;
                }
                let address_text = address.to_string();
                // Unknown users of the domains we serve are refused now, from anyone, rather
                // than bounced later (to a sender who is often forged).
                if let (Some(policy), true) = (
                    &self.shared.settings.policy,
                    self.settings().relay.is_local_domain(&address.domain),
                ) {
                    if let Verdict::Refuse(r) = policy.known_recipient_local(&address_text) {
                        self.send_policy(r);
                        return Flow::Continue;
                    }
                }
                address_text
            }
        };
        // The suppression list guards what submitters send out (mail from strangers to the
        // domains we serve is not theirs to suppress); the recipient rate applies to all;
        // greylisting to strangers only.
        let submitter = self.trusted();
        if let Some(policy) = self.shared.settings.policy.clone() {
            if rcpt.recipient != ForwardPath::Postmaster {
                // The suppression list is read here (a sled lookup); only the recipient rate
                // needs the policy actor.
                let mut verdict = if submitter {
                    policy.suppressed_local(&address)
                } else {
                    Verdict::Accept
                };
                if verdict == Verdict::Accept && policy.checks_rcpt(!submitter) {
                    let check = CheckRcpt {
                        recipient: address.clone(),
                        sender: self
                            .tx
                            .as_ref()
                            .map(|t| t.sender.clone())
                            .unwrap_or_default(),
                        // Greylisting is for strangers: our own networks and users never
                        // wait.
                        greylist_client: policy
                            .greylists(!submitter)
                            .then(|| canonical_ip(self.client.ip())),
                    };
                    let unavailable = Verdict::Refuse(PolicyReply::unavailable());
                    verdict = Box::pin(policy.ask(&policy.rcpt, check, unavailable)).await;
                }
                match verdict {
                    Verdict::Accept => {}
                    Verdict::Discard => {
                        info!(recipient = %address, "suppressed recipient dropped");
                        if let Some(tx) = self.tx.as_mut() {
                            tx.dropped += 1;
                        }
                        self.reply(250, code(2, 1, 5), "Ok");
                        return Flow::Continue;
                    }
                    Verdict::Refuse(r) => {
                        self.send_policy(r);
                        return Flow::Continue;
                    }
                }
            }
        }
        let Some(tx) = self.tx.as_mut() else {
            return Flow::Continue;
        };
        tx.recipients.push(Recipient {
            address,
            notify: rcpt.notify,
            orcpt,
            state: Default::default(),
        });
        self.reply(250, code(2, 1, 5), "Ok");
        Flow::Continue
    }

    /// No open relay (`tern_policy::relay`); `postmaster` never gets this far.
    fn may_relay_to(&self, domain: &str) -> bool {
        self.settings()
            .relay
            .may_relay_to(self.client.ip(), self.auth_user.is_some(), domain)
    }

    fn check_ready_for_content(&mut self) -> bool {
        match &self.tx {
            None => {
                self.reply(503, code(5, 5, 1), "Error: need MAIL command");
                false
            }
            Some(tx) if tx.recipients.is_empty() && tx.dropped == 0 => {
                self.reply(503, code(5, 5, 1), "Error: need RCPT command");
                false
            }
            Some(_) => true,
        }
    }

    fn on_data(&mut self) -> Flow {
        if !self.check_ready_for_content() {
            return Flow::Continue;
        }
        if self.tx.as_ref().is_some_and(|tx| tx.chunking) {
            self.reply(503, code(5, 5, 1), "Error: DATA after BDAT");
            return Flow::Continue;
        }
        self.start_body();
        let limits = DataLimits {
            max_size: self.settings().message_size,
            max_line: self.settings().data_line,
            bare_line_endings: self.settings().bare_line_endings,
        };
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>");
        Flow::Enter(Mode::Data(Box::new(DataReceiver::new(limits))))
    }

    fn on_bdat(&mut self, size: u64, last: bool) -> Flow {
        // RFC 3030 §3: the chunk follows the command no matter what we answer, so even a
        // refused BDAT must read (and discard) its octets to stay in sync.
        let receiver = Box::new(BdatReceiver::new(size));
        let ready = match &self.tx {
            None => Some("Error: need MAIL command"),
            Some(tx) if tx.recipients.is_empty() => Some("Error: need RCPT command"),
            Some(_) => None,
        };
        if let Some(text) = ready {
            self.tx = None;
            self.reply(503, code(5, 5, 1), text);
            return Flow::Enter(Mode::Bdat(receiver, false));
        }
        if !self.tx.as_ref().is_some_and(|tx| tx.chunking) {
            self.start_body();
        }
        let limit = self.settings().message_size as u64;
        let tx = self.tx.as_mut().expect("checked above");
        tx.chunking = true;
        if tx.failed.is_none() && tx.content_octets + size > limit {
            tx.failed = Some(Reply::new(
                552,
                code(5, 3, 4),
                "Error: message size exceeds fixed limit",
            ));
        }
        Flow::Enter(Mode::Bdat(receiver, last))
    }

    /// Starts the message buffer with our Received header: everything it names is known now,
    /// and writing it first avoids copying the body later.
    fn start_body(&mut self) {
        let hostname = self.shared.settings.hostname.clone();
        let helo = self.helo.clone().unwrap_or_default();
        let tx = self.tx.as_mut().expect("caller checked the transaction");
        let expected = tx
            .mail
            .size
            .map(|s| s as usize)
            .unwrap_or(16 * 1024)
            .min(self.shared.settings.message_size);
        tx.body = Vec::with_capacity(expected + 512);
        let id = tx.id.to_string();
        Trace {
            helo: &helo,
            client_ip: self.client.ip(),
            hostname: &hostname,
            esmtp: self.esmtp,
            tls: self.tls.as_deref(),
            authenticated: self.auth_user.is_some(),
            smtputf8: tx.mail.smtputf8,
            id: &id,
            single_recipient: match tx.recipients.as_slice() {
                [only] => Some(only.address.as_str()),
                _ => None,
            },
            unix_secs: now_ms() / 1000,
        }
        .write_to(&mut tx.body);
        tx.trace_len = tx.body.len();
    }

    pub fn ingest_data(&mut self, receiver: &mut DataReceiver, input: &[u8]) -> (usize, bool) {
        let tx = self.tx.as_mut().expect("DATA mode without a transaction");
        receiver.ingest(input, &mut tx.body)
    }

    pub fn ingest_bdat(&mut self, receiver: &mut BdatReceiver, input: &[u8]) -> (usize, bool) {
        match self.tx.as_mut() {
            Some(tx) if tx.failed.is_none() => {
                let before = tx.body.len();
                let result = receiver.ingest(input, &mut tx.body);
                tx.content_octets += (tx.body.len() - before) as u64;
                result
            }
            // Refused chunk or failed message: read and drop.
            _ => receiver.ingest(input, &mut Vec::new()),
        }
    }

    pub async fn finish_data(&mut self, outcome: DataOutcome) -> Flow {
        let refusal = if outcome.bare_line_ending {
            Some((550, code(5, 6, 0), "Error: bare <CR> or <LF> in message data (SMTP smuggling protection); use <CR><LF>"))
        } else if outcome.line_too_long {
            Some((500, code(5, 5, 2), "Error: message line too long"))
        } else if outcome.size_exceeded {
            Some((
                552,
                code(5, 3, 4),
                "Error: message size exceeds fixed limit",
            ))
        } else {
            None
        };
        if let Some((c, e, text)) = refusal {
            if let Some(tx) = self.tx.take() {
                info!(id = %tx.id, reason = text, "message refused");
            }
            self.reply(c, e, text);
            return self.after_reply();
        }
        self.spool().await
    }

    pub async fn finish_chunk(&mut self, last: bool) -> Flow {
        let Some(tx) = self.tx.as_mut() else {
            // The chunk of a refused BDAT was drained; the 503 already went out.
            return self.after_reply();
        };
        if !last {
            if let Some(reply) = tx.failed.clone() {
                // Keep reading later chunks; answer each with the same refusal.
                self.send(reply);
                return self.after_reply();
            }
            let text = format!("Ok: {} octets received", tx.content_octets);
            self.reply(250, code(2, 0, 0), &text);
            return Flow::Continue;
        }
        if let Some(reply) = tx.failed.clone() {
            self.tx = None;
            self.send(reply);
            return self.after_reply();
        }
        self.spool().await
    }

    /// Hands the finished message to the queue stage and answers 250 only once the queue has
    /// confirmed a durable write.
    async fn spool(&mut self) -> Flow {
        let tx = self.tx.take().expect("spool without a transaction");
        if tx.recipients.is_empty() {
            // Every recipient was suppressed with the "drop" action: the client hears 250, as
            // that action promises, and nothing is stored.
            info!(id = %tx.id, dropped = tx.dropped, "message dropped: every recipient suppressed");
            let text = format!("Ok: queued as {}", tx.id);
            self.reply(250, code(2, 0, 0), &text);
            return self.after_reply();
        }
        let mut tx = tx;
        if self.shared.settings.policy.is_some() {
            let id = format!("{}@{}", tx.id, self.settings().hostname);
            let date = crate::received::rfc5322_date(now_ms() / 1000);
            let content = &tx.body[tx.trace_len..];
            // "Submission" as RFC 6409 means it: an authenticated client or the submission
            // ports. Trusted hosts relaying on port 25 (an application, a relay) get their
            // messages as they are, like Postfix's `always_add_missing_headers = no`.
            let submission = self.auth_user.is_some() || self.kind.offers_auth();
            match tern_policy::headers::check(content, submission, &id, &date) {
                Ok(fixes) if fixes.add.is_empty() => {}
                Ok(fixes) => {
                    // Right after our Received header, where the submission server's own
                    // fields belong.
                    let at = tx.trace_len;
                    tx.body.splice(at..at, fixes.add.into_bytes());
                }
                Err(r) => {
                    info!(id = %tx.id, reason = %r.text, "message refused: headers");
                    self.send_policy(r);
                    return self.after_reply();
                }
            }
        }
        let mut hold = None;
        if let (Some(policy), false) = (self.shared.settings.policy.clone(), self.trusted()) {
            if policy.checks_content() {
                let check = CheckContent {
                    ip: canonical_ip(self.client.ip()),
                    helo: self.helo.clone().unwrap_or_default(),
                    sender: tx.sender.clone(),
                    spf: tx.spf.clone(),
                    message: Bytes::copy_from_slice(&tx.body[tx.trace_len..]),
                };
                let verdict = Box::pin(policy.content(check)).await;
                if let Verdict::Refuse(r) = verdict.verdict {
                    info!(id = %tx.id, reason = %r.text, "message refused: content checks");
                    self.send_policy(r);
                    return self.after_reply();
                }
                // Fields a stranger wrote in our name (our Authentication-Results, any
                // X-Tern-Score) would be read as ours downstream (RFC 8601 §5): drop them.
                let hostname = &self.shared.settings.hostname;
                if let Some(clean) =
                    tern_policy::headers::strip_ours(&tx.body[tx.trace_len..], hostname)
                {
                    tx.body.truncate(tx.trace_len);
                    tx.body.extend_from_slice(&clean);
                }
                let at = tx.trace_len;
                tx.body.splice(at..at, verdict.headers.into_bytes());
                hold = verdict.hold;
            }
        }
        if let (Some(signer), true) = (self.settings().dkim.clone(), self.trusted()) {
            match Box::pin(sign(signer, std::mem::take(&mut tx.body), tx.trace_len)).await {
                Ok(body) => tx.body = body,
                Err(e) => {
                    // The body is gone with the failed task; the client may send again.
                    warn!(id = %tx.id, error = %e, "DKIM signing failed");
                    self.reply(451, code(4, 3, 0), "Error: signing failed, try again later");
                    return self.after_reply();
                }
            }
        }
        let hops = count_received(&tx.body);
        if hops > self.shared.settings.max_hops {
            // RFC 5321 §6.3: a loop is detected by counting Received fields.
            info!(id = %tx.id, hops, "message refused: too many hops");
            self.reply(554, code(5, 4, 6), "Error: too many hops (mail loop?)");
            return self.after_reply();
        }
        let span = info_span!("message", id = %tx.id);
        let _enter = span.enter();
        let size = tx.body.len();
        let nrcpt = tx.recipients.len();
        let sender = tx.sender.clone();
        let message = InboundMessage {
            id: tx.id,
            envelope: Envelope {
                sender: tx.sender,
                recipients: tx.recipients,
                body_type: tx.mail.body.unwrap_or_default(),
                smtputf8: tx.mail.smtputf8,
                ret: tx.mail.ret,
                envid: tx.mail.envid,
                auth: tx.mail.auth.filter(|_| self.auth_user.is_some()),
                delay_warned: false,
                hold,
            },
            client: ClientInfo {
                addr: self.client,
                local_addr: self.local,
                helo: self.helo.clone().unwrap_or_default(),
                tls: self.tls.clone(),
                auth_user: self.auth_user.clone(),
            },
            arrived_ms: now_ms(),
            body: Bytes::from(tx.body),
        };
        drop(_enter);
        let result = Box::pin(self.shared.queue.enqueue(message)).await;
        let _enter = span.enter();
        match result {
            Ok(id) => {
                // The one line per accepted message an operator greps for (like Postfix's
                // "queued"): who sent what, from where.
                info!(
                    client = %self.client,
                    helo = self.helo.as_deref().unwrap_or(""),
                    from = %sender,
                    size,
                    nrcpt,
                    tls = self.tls.is_some(),
                    user = self.auth_user.as_deref().unwrap_or(""),
                    "queued"
                );
                let text = format!("Ok: queued as {id}");
                self.reply(250, code(2, 0, 0), &text);
            }
            Err(SpoolError::DiskFull(reason)) => {
                warn!(%reason, "spool refused message: disk full");
                self.reply(452, code(4, 3, 1), "Error: insufficient system storage");
            }
            Err(SpoolError::Storage(reason)) => {
                warn!(%reason, "spool write failed");
                self.reply(451, code(4, 3, 0), "Error: queue file write error");
            }
            Err(SpoolError::Unavailable(reason)) => {
                warn!(%reason, "queue unavailable");
                self.reply(451, code(4, 3, 0), "Error: queue unavailable");
            }
        }
        self.after_reply()
    }

    fn on_starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            self.reply(503, code(5, 5, 1), "Error: TLS already active");
            return Flow::Continue;
        }
        if self.shared.tls.is_none() {
            self.reply(454, code(4, 7, 0), "TLS not available");
            return Flow::Continue;
        }
        self.reply(220, code(2, 0, 0), "Ready to start TLS");
        Flow::StartTls
    }

    async fn on_auth(&mut self, mechanism: String, initial: Option<String>) -> Flow {
        if !self.kind.offers_auth() || self.settings().users.is_empty() {
            self.reply(503, code(5, 5, 1), "Error: authentication not enabled");
            return Flow::Continue;
        }
        if self.tls.is_none() {
            self.reply(
                538,
                code(5, 7, 11),
                "Encryption required for requested authentication mechanism",
            );
            return Flow::Continue;
        }
        if self.auth_user.is_some() {
            self.reply(503, code(5, 5, 1), "Error: already authenticated");
            return Flow::Continue;
        }
        if self.tx.is_some() {
            self.reply(503, code(5, 5, 1), "Error: MAIL transaction in progress");
            return Flow::Continue;
        }
        if self.helo.is_none() {
            self.reply(503, code(5, 5, 1), "Error: send EHLO first");
            return Flow::Continue;
        }
        match (mechanism.as_str(), initial) {
            ("PLAIN", None) => {
                self.send(Reply::new(334, None, ""));
                Flow::Enter(Mode::Auth(AuthStep::PlainResponse))
            }
            ("PLAIN", Some(response)) => self.auth_plain(&response).await,
            ("LOGIN", None) => {
                // base64("Username:")
                self.send(Reply::new(334, None, "VXNlcm5hbWU6"));
                Flow::Enter(Mode::Auth(AuthStep::LoginUser))
            }
            ("LOGIN", Some(response)) => self.auth_login_user(&response),
            _ => {
                self.reply(
                    504,
                    code(5, 5, 4),
                    "Error: unsupported authentication mechanism",
                );
                Flow::Continue
            }
        }
    }

    pub async fn on_auth_line(
        &mut self,
        step: AuthStep,
        line: Result<BytesMut, LineTooLong>,
    ) -> Flow {
        let Ok(line) = line else {
            self.reply(
                500,
                code(5, 5, 6),
                "Error: authentication exchange line too long",
            );
            return self.after_reply();
        };
        let response = String::from_utf8_lossy(&line).into_owned();
        let flow = match step {
            AuthStep::PlainResponse => self.auth_plain(&response).await,
            AuthStep::LoginUser => self.auth_login_user(&response),
            AuthStep::LoginPassword(user) => match auth::decode(&response) {
                Ok(password) => self.check_credentials(user, password).await,
                Err(e) => self.sasl_error(e),
            },
        };
        match flow {
            Flow::Continue => self.after_reply(),
            other => other,
        }
    }

    fn sasl_error(&mut self, e: SaslError) -> Flow {
        match e {
            SaslError::Cancelled => self.reply(501, code(5, 0, 0), "Authentication aborted"),
            SaslError::Malformed => self.reply(501, code(5, 5, 2), "Error: cannot decode response"),
        }
        Flow::Continue
    }

    async fn auth_plain(&mut self, response: &str) -> Flow {
        match auth::decode(response) {
            Ok(message) => match auth::parse_plain(&message) {
                Some((user, password)) => self.check_credentials(user, password).await,
                None => {
                    self.reply(501, code(5, 5, 2), "Error: malformed PLAIN response");
                    Flow::Continue
                }
            },
            Err(e) => self.sasl_error(e),
        }
    }

    fn auth_login_user(&mut self, response: &str) -> Flow {
        match auth::decode(response) {
            Ok(user) => {
                // base64("Password:")
                self.send(Reply::new(334, None, "UGFzc3dvcmQ6"));
                Flow::Enter(Mode::Auth(AuthStep::LoginPassword(user)))
            }
            Err(e) => self.sasl_error(e),
        }
    }

    async fn check_credentials(&mut self, user: String, password: String) -> Flow {
        let shared = self.shared.clone();
        let name = user.clone();
        // argon2 is deliberately slow; run it off the session arbiter's thread.
        let ok = tokio::task::spawn_blocking(move || {
            auth::verify(&shared.settings.users, &name, &password)
        })
        .await
        .unwrap_or(false);
        if ok {
            info!(user = %user, "authenticated");
            self.auth_user = Some(user);
            self.reply(235, code(2, 7, 0), "Authentication successful");
        } else {
            info!(user = %user, "authentication failed");
            self.reply(
                535,
                code(5, 7, 8),
                "Error: authentication credentials invalid",
            );
        }
        Flow::Continue
    }
}

/// The number of `Received:` fields in the header section of `message` (CRLF line ends).
fn count_received(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

/// Signs the content after our Received header (`trace_len` octets) with every key of its From
/// domain and inserts the DKIM-Signature fields right after the Received header. On a blocking
/// thread: an RSA-2048 signature costs about half a millisecond, which would stall every session
/// of this arbiter.
async fn sign(
    signer: Arc<tern_dkim::Signer>,
    mut body: Vec<u8>,
    trace_len: usize,
) -> Result<Vec<u8>, String> {
    tokio::task::spawn_blocking(move || {
        match signer.sign(&body[trace_len..]) {
            Ok(Some(fields)) => {
                body.splice(trace_len..trace_len, fields);
            }
            Ok(None) => {}
            // A message the signer cannot parse goes out unsigned rather than not at all.
            Err(e) => tracing::info!(error = %e, "message not DKIM-signed"),
        }
        body
    })
    .await
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod hop_tests {
    use super::count_received;

    #[test]
    fn counts_received_fields_in_the_header_only() {
        let msg =
            b"Received: from a\r\n\tby b\r\nRECEIVED: x\r\nSubject: s\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received(msg), 2);
        assert_eq!(count_received(b"Subject: none\r\n\r\n"), 0);
        assert_eq!(count_received(b"Received-SPF: pass\r\n\r\n"), 0);
    }
}
