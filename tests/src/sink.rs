//! A scripted receiving SMTP server for end-to-end tests of Tern's delivery: Tern connects to it
//! over loopback, and the test looks at what arrived.
//!
//! [`Sink::start`] binds `127.0.0.1:0` ([`Sink::start_on`] a chosen address, e.g.
//! `127.0.0.2:port` for MX tests) and serves every connection on its own thread until the
//! `Sink` is dropped. It speaks EHLO/HELO, MAIL, RCPT, DATA, BDAT (when `CHUNKING` is among the
//! EHLO keywords), RSET, NOOP, QUIT and STARTTLS (when [`SinkConfig::starttls`] is set).
//! Commands are read line by line from a buffered reader and answered in order, so pipelined
//! commands (RFC 2920) just work.
//!
//! The replies to MAIL, RCPT and the end of the content are scripted ([`SinkConfig`]); their
//! counters are per `Sink`, shared by all connections, so "451 first, then 250" spans a
//! client's retries on new connections.
//!
//! It is a test peer, not a server: parsing is loose where that does not matter (parameters are
//! kept as the words they are), and it accepts any line length. A client that disconnects at
//! any point only ends its own connection; the transaction it left open is recorded with no
//! final reply.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a connection may stay silent before the sink closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the sink says. `Default` gives a server that accepts everything.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// The greeting, e.g. `"421 4.3.2 busy"` to refuse connections. After a 421 greeting the
    /// connection is closed; after another non-2yz greeting every command but QUIT gets 503.
    pub greeting: String,
    /// EHLO keywords after the first line of the EHLO reply. `STARTTLS` is added when
    /// [`SinkConfig::starttls`] is set (and removed once TLS is on); BDAT is accepted only
    /// when `CHUNKING` is listed.
    pub ehlo_keywords: Vec<String>,
    /// When set, STARTTLS is advertised and done with this configuration.
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    /// Recipient address (compared case-insensitively) → the replies to successive RCPTs for
    /// it, the last one repeating. Addresses not listed get `250 2.1.5 ok`.
    pub rcpt_replies: Vec<(String, Vec<String>)>,
    /// Replies to successive MAIL commands, the last repeating.
    pub mail_replies: Vec<String>,
    /// Replies after the content (the final dot, or `BDAT … LAST`) of successive transactions,
    /// the last repeating.
    pub data_replies: Vec<String>,
    /// A pause before answering the end of the content (a slow server).
    pub data_delay: Duration,
    /// When set, RSET gets this reply and the connection is then closed (a server that had
    /// dropped an idle connection; e.g. `"421 4.4.2 idle too long"`).
    pub rset_closes: Option<String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            greeting: "220 sink ESMTP".into(),
            ehlo_keywords: [
                "PIPELINING",
                "8BITMIME",
                "SMTPUTF8",
                "ENHANCEDSTATUSCODES",
                "DSN",
                "SIZE 100000000",
            ]
            .map(String::from)
            .to_vec(),
            starttls: None,
            rcpt_replies: Vec::new(),
            mail_replies: vec!["250 2.1.0 ok".into()],
            data_replies: vec!["250 2.0.0 queued".into()],
            data_delay: Duration::ZERO,
            rset_closes: None,
        }
    }
}

/// An accepted message: a transaction whose content got a 2yz reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The reverse-path without its angle brackets; empty for the null sender `<>`.
    pub mail_from: String,
    /// The MAIL parameters as sent (`SIZE=123`, `BODY=8BITMIME`, ...).
    pub mail_params: Vec<String>,
    /// The recipients the sink accepted, in order, without angle brackets.
    pub rcpts: Vec<String>,
    /// The parameters of each accepted recipient's RCPT (parallel to `rcpts`).
    pub rcpt_params: Vec<Vec<String>>,
    /// The content: dot-unstuffed, line ends as received, without the final dot line (with
    /// BDAT, the chunks concatenated).
    pub data: Vec<u8>,
    /// Whether the transaction happened over TLS.
    pub tls: bool,
    /// The name given in EHLO/HELO.
    pub helo: String,
}

impl Received {
    /// The content as text (lossy), for assertions and failure messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// One RCPT command of a transaction and the sink's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptCommand {
    pub address: String,
    pub params: Vec<String>,
    pub reply: String,
}

/// One transaction (from MAIL to its end), accepted or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Which connection it was on: 1 for the first the sink accepted.
    pub connection: usize,
    pub helo: String,
    pub tls: bool,
    pub mail_from: String,
    pub mail_params: Vec<String>,
    pub mail_reply: String,
    /// Every RCPT, accepted or refused, with its reply.
    pub rcpts: Vec<RcptCommand>,
    /// The content, when the client sent it all (dot-unstuffed, as in [`Received::data`]).
    pub data: Option<Vec<u8>>,
    /// The reply after the content; `None` when the transaction ended without one (refused
    /// MAIL, no accepted recipient, RSET, QUIT or a disconnect before the end of the content).
    pub data_reply: Option<String>,
}

impl Transaction {
    /// Whether the content got a 2yz reply.
    pub fn accepted(&self) -> bool {
        self.data_reply
            .as_deref()
            .is_some_and(|r| r.starts_with('2'))
    }

    fn received(&self) -> Option<Received> {
        if !self.accepted() {
            return None;
        }
        let accepted: Vec<&RcptCommand> = self
            .rcpts
            .iter()
            .filter(|r| r.reply.starts_with('2'))
            .collect();
        Some(Received {
            mail_from: self.mail_from.clone(),
            mail_params: self.mail_params.clone(),
            rcpts: accepted.iter().map(|r| r.address.clone()).collect(),
            rcpt_params: accepted.iter().map(|r| r.params.clone()).collect(),
            data: self.data.clone().unwrap_or_default(),
            tls: self.tls,
            helo: self.helo.clone(),
        })
    }
}

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conn {} MAIL <{}> -> {:?}",
            self.connection, self.mail_from, self.mail_reply
        )?;
        for r in &self.rcpts {
            write!(f, "; RCPT <{}> -> {:?}", r.address, r.reply)?;
        }
        match (&self.data, &self.data_reply) {
            (Some(d), Some(r)) => write!(f, "; {} octets -> {r:?}", d.len()),
            (None, Some(r)) => write!(f, "; content -> {r:?}"),
            _ => write!(f, "; no content reply"),
        }
    }
}

/// One command line the sink read (SMTP commands only, not message content), for tests of
/// what a client says and when: the idle QUIT, RSET between transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine {
    /// Which connection: 1 for the first the sink accepted.
    pub connection: usize,
    /// The verb, uppercased (`QUIT`, `RSET`, `MAIL`, ...).
    pub verb: String,
    /// When the sink read it.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    connections: usize,
    commands: Vec<CommandLine>,
    /// Connection → when it ended (the client closed it, or the sink after QUIT).
    closed: HashMap<usize, Instant>,
    mail_count: usize,
    data_count: usize,
    /// Lowercased recipient → RCPTs seen for it.
    rcpt_counts: HashMap<String, usize>,
    transactions: Vec<Transaction>,
    /// A handle on every open connection, to shut them down when the sink is dropped.
    streams: HashMap<usize, TcpStream>,
}

struct Shared {
    cfg: SinkConfig,
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    /// The state, even if a connection thread panicked while holding the lock: one broken
    /// connection must not fail every later call.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_mail_reply(&self) -> String {
        let mut st = self.state();
        let i = st.mail_count;
        st.mail_count += 1;
        pick(&self.cfg.mail_replies, i, "250 2.1.0 ok")
    }

    fn next_data_reply(&self) -> String {
        let mut st = self.state();
        let i = st.data_count;
        st.data_count += 1;
        pick(&self.cfg.data_replies, i, "250 2.0.0 queued")
    }

    fn next_rcpt_reply(&self, address: &str) -> String {
        let key = address.to_ascii_lowercase();
        let Some((_, replies)) = self
            .cfg
            .rcpt_replies
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(address))
        else {
            return "250 2.1.5 ok".into();
        };
        let mut st = self.state();
        let n = st.rcpt_counts.entry(key).or_insert(0);
        let i = *n;
        *n += 1;
        pick(replies, i, "250 2.1.5 ok")
    }

    fn record(&self, t: Transaction) {
        self.state().transactions.push(t);
    }
}

/// The `i`th reply of a script, the last repeating; `default` for an empty script.
fn pick(script: &[String], i: usize, default: &str) -> String {
    script
        .get(i)
        .or(script.last())
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// A running sink; stops (and closes its connections) when dropped.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink").field("addr", &self.addr).finish()
    }
}

impl Sink {
    /// Starts a sink on `127.0.0.1` and a free port. Panics if that fails.
    pub fn start(cfg: SinkConfig) -> Sink {
        Self::start_on("127.0.0.1:0".parse().unwrap(), cfg)
            .unwrap_or_else(|e| panic!("sink: bind 127.0.0.1:0: {e}"))
    }

    /// Starts a sink on `addr` (port 0 for a free one).
    pub fn start_on(addr: SocketAddr, cfg: SinkConfig) -> io::Result<Sink> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        // Polled, so the accept thread sees `stop` without a wake-up connection.
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("sink-accept-{addr}"))
            .spawn(move || accept_loop(listener, sh))?;
        Ok(Sink {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accepted messages (content answered with 2yz), in the order they were answered.
    pub fn messages(&self) -> Vec<Received> {
        self.shared
            .state()
            .transactions
            .iter()
            .filter_map(Transaction::received)
            .collect()
    }

    /// Every transaction so far, refused or unfinished ones included, in the order they ended.
    pub fn transactions(&self) -> Vec<Transaction> {
        self.shared.state().transactions.clone()
    }

    /// Every command line read so far, on all connections, in order.
    pub fn commands(&self) -> Vec<CommandLine> {
        self.shared.state().commands.clone()
    }

    /// When connection `connection` (1 for the first) ended; `None` while it is open.
    pub fn closed_at(&self, connection: usize) -> Option<Instant> {
        self.shared.state().closed.get(&connection).copied()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.state().connections
    }

    /// Waits until at least `n` transactions ended (accepted or not; one left open ends with
    /// the client's RSET, next MAIL or QUIT) and returns them all. Panics after `timeout`.
    #[track_caller]
    pub fn wait_for_transactions(&self, n: usize, timeout: Duration) -> Vec<Transaction> {
        let deadline = Instant::now() + timeout;
        loop {
            let transactions = self.transactions();
            if transactions.len() >= n {
                return transactions;
            }
            assert!(
                Instant::now() < deadline,
                "sink {}: expected {n} transaction(s) within {timeout:?}, got {}",
                self.addr,
                transactions.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` messages were accepted and returns them all. Panics after
    /// `timeout` with what did arrive (every transaction) if fewer did.
    #[track_caller]
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            if Instant::now() >= deadline {
                let transactions = self.transactions();
                let mut report = format!(
                    "sink {}: expected {n} message(s) within {timeout:?}, got {} \
                     ({} connection(s), {} transaction(s))",
                    self.addr,
                    messages.len(),
                    self.connections(),
                    transactions.len()
                );
                for t in &transactions {
                    report.push_str(&format!("\n  {t}"));
                }
                panic!("{report}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Wakes the connection threads out of their reads; they end on the error.
        for (_, s) in self.shared.state().streams.drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, _)) => {
                let id = {
                    let mut st = shared.state();
                    st.connections += 1;
                    let id = st.connections;
                    if let Ok(clone) = tcp.try_clone() {
                        st.streams.insert(id, clone);
                    }
                    id
                };
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("sink-conn-{id}"))
                    .spawn(move || {
                        // Errors (mostly the client going away) just end the connection.
                        let _ = serve(tcp, id, &sh);
                        // Closes the connection: this handle kept the socket open.
                        let mut st = sh.state();
                        if let Some(s) = st.streams.remove(&id) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        st.closed.insert(id, Instant::now());
                    });
                if spawned.is_err() {
                    // Out of threads: the connection is dropped, as an overloaded server would.
                    continue;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The transaction in progress on a connection.
struct Open {
    mail_from: String,
    mail_params: Vec<String>,
    mail_reply: String,
    rcpts: Vec<RcptCommand>,
    /// BDAT chunks so far.
    chunks: Vec<u8>,
}

impl Open {
    fn has_accepted_rcpt(&self) -> bool {
        self.rcpts.iter().any(|r| r.reply.starts_with('2'))
    }
}

struct Session<'a> {
    shared: &'a Shared,
    reader: BufReader<Stream>,
    connection: usize,
    helo: String,
    tls: bool,
    open: Option<Open>,
}

impl Session<'_> {
    /// Writes a reply; `text` may hold several lines separated by `\n`, each with its code.
    fn reply(&mut self, text: &str) -> io::Result<()> {
        let lines: Vec<&str> = text.lines().collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let more = i + 1 < lines.len();
            match (more, line.get(..3), line.get(4..)) {
                (true, Some(code), Some(rest)) => out.push_str(&format!("{code}-{rest}\r\n")),
                (true, Some(code), None) => out.push_str(&format!("{code}-\r\n")),
                _ => out.push_str(&format!("{line}\r\n")),
            }
        }
        let w = self.reader.get_mut();
        w.write_all(out.as_bytes())?;
        w.flush()
    }

    /// Ends the open transaction (if any) and records it.
    fn finish(&mut self, data: Option<Vec<u8>>, data_reply: Option<String>) {
        if let Some(open) = self.open.take() {
            self.shared.record(Transaction {
                connection: self.connection,
                helo: self.helo.clone(),
                tls: self.tls,
                mail_from: open.mail_from,
                mail_params: open.mail_params,
                mail_reply: open.mail_reply,
                rcpts: open.rcpts,
                data,
                data_reply,
            });
        }
    }

    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(line))
    }

    fn ehlo_reply(&self) -> String {
        let mut lines = vec!["250 sink".to_string()];
        for k in &self.shared.cfg.ehlo_keywords {
            if k.eq_ignore_ascii_case("STARTTLS") {
                continue;
            }
            lines.push(format!("250 {k}"));
        }
        if self.shared.cfg.starttls.is_some() && !self.tls {
            lines.push("250 STARTTLS".into());
        }
        lines.join("\n")
    }

    fn has_keyword(&self, keyword: &str) -> bool {
        self.shared.cfg.ehlo_keywords.iter().any(|k| {
            k.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }

    /// Runs the session until QUIT, EOF or an error.
    fn run(&mut self) -> io::Result<()> {
        let greeting = self.shared.cfg.greeting.clone();
        self.reply(&greeting)?;
        if greeting.starts_with("421") {
            return Ok(());
        }
        let refusing = !greeting.starts_with('2');
        while let Some(raw) = self.read_line()? {
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let (verb, arg) = match line.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
                None => (line.to_ascii_uppercase(), String::new()),
            };
            self.shared.state().commands.push(CommandLine {
                connection: self.connection,
                verb: verb.clone(),
                at: Instant::now(),
            });
            if refusing && verb != "QUIT" {
                self.reply("503 5.5.1 no service here")?;
                continue;
            }
            match verb.as_str() {
                "EHLO" | "HELO" => {
                    self.finish(None, None);
                    self.helo = arg;
                    if verb == "EHLO" {
                        let r = self.ehlo_reply();
                        self.reply(&r)?;
                    } else {
                        self.reply("250 sink")?;
                    }
                }
                "MAIL" => self.mail(&arg)?,
                "RCPT" => self.rcpt(&arg)?,
                "DATA" => self.data()?,
                "BDAT" => self.bdat(&arg)?,
                "RSET" => {
                    self.finish(None, None);
                    if let Some(r) = self.shared.cfg.rset_closes.clone() {
                        self.reply(&r)?;
                        return Ok(());
                    }
                    self.reply("250 2.0.0 ok")?;
                }
                "NOOP" => self.reply("250 2.0.0 ok")?,
                "QUIT" => {
                    self.finish(None, None);
                    self.reply("221 2.0.0 bye")?;
                    return Ok(());
                }
                "STARTTLS" => {
                    if !self.starttls()? {
                        return Ok(());
                    }
                }
                _ => self.reply("500 5.5.2 command not recognized")?,
            }
        }
        Ok(())
    }

    fn mail(&mut self, arg: &str) -> io::Result<()> {
        if self.helo.is_empty() {
            return self.reply("503 5.5.1 EHLO or HELO first");
        }
        if self.open.is_some() {
            return self.reply("503 5.5.1 nested MAIL command");
        }
        let Some((mail_from, mail_params)) = parse_path(arg, "FROM:") else {
            return self.reply("501 5.5.4 syntax: MAIL FROM:<address>");
        };
        let reply = self.shared.next_mail_reply();
        self.open = Some(Open {
            mail_from,
            mail_params,
            mail_reply: reply.clone(),
            rcpts: Vec::new(),
            chunks: Vec::new(),
        });
        if !reply.starts_with('2') {
            // A refused MAIL is a whole (refused) transaction.
            self.finish(None, None);
        }
        self.reply(&reply)
    }

    fn rcpt(&mut self, arg: &str) -> io::Result<()> {
        if self.open.is_none() {
            return self.reply("503 5.5.1 MAIL first");
        }
        let Some((address, params)) = parse_path(arg, "TO:") else {
            return self.reply("501 5.5.4 syntax: RCPT TO:<address>");
        };
        let reply = self.shared.next_rcpt_reply(&address);
        if let Some(open) = &mut self.open {
            open.rcpts.push(RcptCommand {
                address,
                params,
                reply: reply.clone(),
            });
        }
        self.reply(&reply)
    }

    /// Whether content may follow; if not, answers why.
    fn content_allowed(&mut self) -> io::Result<bool> {
        match &self.open {
            None => self.reply("503 5.5.1 MAIL first").map(|_| false),
            Some(open) if !open.has_accepted_rcpt() => {
                // RFC 2920 §3.1: DATA pipelined after refused recipients.
                self.reply("554 5.5.1 no valid recipients").map(|_| false)
            }
            Some(_) => Ok(true),
        }
    }

    /// The end of the content: the scripted pause and reply, and the transaction is done.
    fn end_of_content(&mut self, data: Vec<u8>) -> io::Result<()> {
        let delay = self.shared.cfg.data_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let reply = self.shared.next_data_reply();
        self.finish(Some(data), Some(reply.clone()));
        self.reply(&reply)
    }

    fn data(&mut self) -> io::Result<()> {
        if !self.content_allowed()? {
            return Ok(());
        }
        self.reply("354 end data with <CR><LF>.<CR><LF>")?;
        let mut data = Vec::new();
        loop {
            let Some(line) = self.read_line()? else {
                // Disconnected mid-content: recorded without content or reply.
                self.finish(None, None);
                return Ok(());
            };
            if line == b".\r\n" || line == b".\n" {
                break;
            }
            let unstuffed = if line.starts_with(b".") {
                &line[1..]
            } else {
                &line[..]
            };
            data.extend_from_slice(unstuffed);
        }
        self.end_of_content(data)
    }

    fn bdat(&mut self, arg: &str) -> io::Result<()> {
        if !self.has_keyword("CHUNKING") {
            return self.reply("500 5.5.1 BDAT without CHUNKING");
        }
        let mut words = arg.split_whitespace();
        let size = words.next().and_then(|s| s.parse::<u64>().ok());
        let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
        let Some(size) = size else {
            // The chunk size is unknown, so the stream cannot be followed any further.
            self.reply("501 5.5.4 syntax: BDAT <size> [LAST]")?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad BDAT"));
        };
        // RFC 3030 §3: the chunk follows whether or not it will be accepted.
        let mut chunk = Vec::new();
        (&mut self.reader).take(size).read_to_end(&mut chunk)?;
        if chunk.len() as u64 != size {
            self.finish(None, None);
            return Ok(());
        }
        if !self.content_allowed()? {
            return Ok(());
        }
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        open.chunks.extend_from_slice(&chunk);
        if last {
            let data = std::mem::take(&mut open.chunks);
            self.end_of_content(data)
        } else {
            self.reply(&format!("250 2.0.0 {size} octets received"))
        }
    }

    /// STARTTLS; returns false when the connection is done (a failed handshake).
    fn starttls(&mut self) -> io::Result<bool> {
        let Some(config) = self.shared.cfg.starttls.clone() else {
            self.reply("502 5.5.1 STARTTLS not offered")?;
            return Ok(true);
        };
        if self.tls {
            self.reply("503 5.5.1 already under TLS")?;
            return Ok(true);
        }
        self.reply("220 2.0.0 ready to start TLS")?;
        // Anything pipelined after STARTTLS came in plaintext: dropped (RFC 3207 §6).
        let placeholder = BufReader::new(Stream::Plain(self.plain_clone()?));
        let reader = std::mem::replace(&mut self.reader, placeholder);
        let Stream::Plain(mut tcp) = reader.into_inner() else {
            return Ok(false);
        };
        let mut conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                return Ok(false);
            }
        }
        self.reader = BufReader::new(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))));
        self.tls = true;
        // RFC 3207 §4.2: back to the state after the greeting.
        self.finish(None, None);
        self.helo.clear();
        Ok(true)
    }

    /// A second handle on the plain TCP stream (a placeholder while the real one is moved).
    fn plain_clone(&self) -> io::Result<TcpStream> {
        match self.reader.get_ref() {
            Stream::Plain(s) => s.try_clone(),
            Stream::Tls(s) => s.get_ref().try_clone(),
        }
    }
}

fn serve(tcp: TcpStream, connection: usize, shared: &Shared) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(IDLE_TIMEOUT))?;
    tcp.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let _ = tcp.set_nodelay(true);
    let mut session = Session {
        shared,
        reader: BufReader::new(Stream::Plain(tcp)),
        connection,
        helo: String::new(),
        tls: false,
        open: None,
    };
    let result = session.run();
    // Whatever ended the session, a transaction it left open is recorded.
    session.finish(None, None);
    result
}

/// Parses `FROM:<addr> PARAMS` (or `TO:`): the address without brackets (empty for `<>`) and
/// the parameters as words. Loose: spaces after the colon and a path without brackets are
/// accepted; a quoted local part may contain `>` or spaces.
fn parse_path(arg: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    let (address, params) = if let Some(inner) = rest.strip_prefix('<') {
        let mut quoted = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '>' if !quoted => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        (&inner[..end], &inner[end + 1..])
    } else {
        rest.split_once(' ').unwrap_or((rest, ""))
    };
    // A source route (`<@a,@b:user@c>`, RFC 5321 §4.1.2) is dropped, as servers do.
    let address = match address.strip_prefix('@') {
        Some(_) => address.split_once(':').map_or(address, |(_, a)| a),
        None => address,
    };
    Some((
        address.to_string(),
        params.split_whitespace().map(String::from).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_parameters() {
        let p = |a: &str, pre: &str| parse_path(a, pre);
        assert_eq!(
            p("FROM:<a@b.example> SIZE=10 BODY=8BITMIME", "FROM:"),
            Some((
                "a@b.example".into(),
                vec!["SIZE=10".into(), "BODY=8BITMIME".into()]
            ))
        );
        assert_eq!(p("from:<>", "FROM:"), Some((String::new(), vec![])));
        assert_eq!(
            p("TO: <\"x> y\"@c.example> NOTIFY=NEVER", "TO:"),
            Some(("\"x> y\"@c.example".into(), vec!["NOTIFY=NEVER".into()]))
        );
        assert_eq!(
            p("TO:<@relay.example:u@d.example>", "TO:"),
            Some(("u@d.example".into(), vec![]))
        );
        assert_eq!(
            p("TO:bare@e.example", "TO:"),
            Some(("bare@e.example".into(), vec![]))
        );
        assert_eq!(p("TO:<unterminated", "TO:"), None);
        assert_eq!(p("FROM:<a@b>", "TO:"), None);
    }

    #[test]
    fn scripts_repeat_their_last_reply() {
        let s = vec!["451 a".to_string(), "250 b".to_string()];
        assert_eq!(pick(&s, 0, "x"), "451 a");
        assert_eq!(pick(&s, 1, "x"), "250 b");
        assert_eq!(pick(&s, 7, "x"), "250 b");
        assert_eq!(pick(&[], 0, "x"), "x");
    }
}
