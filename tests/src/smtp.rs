//! A raw SMTP client over real sockets: it sends exactly the bytes a test gives it (TCP_NODELAY,
//! one `write` per call, so tests control how data is split across segments) and parses replies
//! strictly (RFC 5321 §4.2: `NNN-text` continuation lines, `NNN text` last line, same code).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// How long a client waits for a reply before failing the test.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One complete (possibly multi-line) SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// Parse the lines of one complete reply (each without CRLF).
    pub fn parse(raw_lines: &[String]) -> Result<Reply, String> {
        let mut code = None;
        let mut lines = Vec::new();
        for (i, l) in raw_lines.iter().enumerate() {
            let b = l.as_bytes();
            if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
                return Err(format!("reply line without a 3-digit code: {l:?}"));
            }
            let c: u16 = l[..3].parse().unwrap();
            if !(200..=599).contains(&c) {
                return Err(format!("reply code out of range: {l:?}"));
            }
            if *code.get_or_insert(c) != c {
                return Err(format!(
                    "code changes inside a multi-line reply: {raw_lines:?}"
                ));
            }
            let last = i + 1 == raw_lines.len();
            match b.get(3) {
                None if last => lines.push(String::new()),
                Some(b' ') if last => lines.push(l[4..].to_string()),
                Some(b'-') if !last => lines.push(l[4..].to_string()),
                _ => return Err(format!("bad continuation marker in {raw_lines:?}")),
            }
        }
        Ok(Reply {
            code: code.ok_or("empty reply")?,
            lines,
        })
    }

    /// The RFC 3463 enhanced status code at the start of the first line, if any (`"5.5.1"`).
    /// Its class must match the reply's first digit to count.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let tok = first.split_whitespace().next()?;
        let parts: Vec<&str> = tok.split('.').collect();
        let ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts[0].len() == 1
            && parts[0].as_bytes()[0] == b'0' + (self.code / 100) as u8;
        ok.then_some(tok)
    }

    pub fn last_line(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    /// All text, lines joined by '\n'.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// EHLO keywords: every line but the first, upper-cased keyword first.
    pub fn ehlo_keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .map(|l| l.to_ascii_uppercase())
            .collect()
    }

    /// Whether an EHLO reply advertises `keyword` (exact keyword, any parameters).
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.extension(keyword).is_some()
    }

    /// The parameters of an advertised EHLO extension (`Some("")` when it has none).
    pub fn extension(&self, keyword: &str) -> Option<String> {
        let kw = keyword.to_ascii_uppercase();
        self.lines.iter().skip(1).find_map(|l| {
            let mut it = l.splitn(2, ' ');
            let k = it.next()?.to_ascii_uppercase();
            (k == kw).then(|| it.next().unwrap_or("").to_string())
        })
    }

    /// Assert the reply code (as a pattern: `"250"`, `"5"`, `"55"`) and, if given, the enhanced
    /// status code (`"5.5.1"`; `"5.5"` matches any `5.5.x`).
    #[track_caller]
    pub fn expect(&self, code: &str, enhanced: &str) -> &Reply {
        assert!(
            self.code.to_string().starts_with(code),
            "expected reply {code}, got: {self}"
        );
        if !enhanced.is_empty() {
            let got = self
                .enhanced()
                .unwrap_or_else(|| panic!("expected enhanced code {enhanced}, got none: {self}"));
            let matches = got == enhanced
                || (enhanced.matches('.').count() < 2 && got.starts_with(&format!("{enhanced}.")));
            assert!(matches, "expected enhanced code {enhanced}, got: {self}");
        }
        self
    }

    /// Assert the exact reply code only.
    #[track_caller]
    pub fn expect_code(&self, code: u16) -> &Reply {
        assert_eq!(self.code, code, "unexpected reply: {self}");
        self
    }

    /// Assert the reply carries an RFC 3463 enhanced code of the right class (RFC 2034 §3: every
    /// 2xx/4xx/5xx reply except the greeting and the replies to HELO/EHLO).
    #[track_caller]
    pub fn expect_enhanced(&self) -> &Reply {
        assert!(
            self.enhanced().is_some(),
            "reply has no enhanced status code: {self}"
        );
        self
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{}{}{}", self.code, sep, l)?;
        }
        Ok(())
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Closed,
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
            Stream::Closed => panic!("stream moved"),
        }
    }
}

/// Blocking raw SMTP client (see the module docs).
pub struct SmtpClient {
    stream: Stream,
    buf: Vec<u8>,
    pub peer: SocketAddr,
    /// Every reply received, for failure messages.
    pub transcript: Vec<String>,
}

impl SmtpClient {
    /// Connect from the default source address.
    pub fn connect(addr: SocketAddr) -> SmtpClient {
        Self::try_connect(addr, None).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    /// Connect from a chosen local address (`127.0.0.2` …) — loopback is a whole /8.
    pub fn connect_from(src: IpAddr, addr: SocketAddr) -> SmtpClient {
        Self::try_connect(addr, Some(src))
            .unwrap_or_else(|e| panic!("connect {addr} from {src}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<SmtpClient> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(src) = src {
            sock.bind(&SocketAddr::new(src, 0).into())?;
        }
        sock.connect_timeout(&addr.into(), Duration::from_secs(10))?;
        let tcp: TcpStream = sock.into();
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(SmtpClient {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            peer: addr,
            transcript: Vec::new(),
        })
    }

    /// Connect with implicit TLS (the `submissions` listener, RFC 8314).
    pub fn connect_tls(addr: SocketAddr) -> SmtpClient {
        let mut c = Self::connect(addr);
        c.tls_handshake();
        c
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.stream.tcp().set_read_timeout(Some(t)).unwrap();
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.tcp().local_addr().unwrap()
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The negotiated TLS version and cipher suite (`("TLSv1_3", "TLS13_AES_256_GCM_SHA384")`).
    pub fn tls_info(&self) -> Option<(String, String)> {
        match &self.stream {
            Stream::Tls(s) => Some((
                format!("{:?}", s.conn.protocol_version()?),
                format!("{:?}", s.conn.negotiated_cipher_suite()?.suite()),
            )),
            _ => None,
        }
    }

    /// Write these exact bytes in one `write_all` (with TCP_NODELAY: one segment when small).
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.try_send(bytes.as_ref())
            .unwrap_or_else(|e| panic!("send: {e}; transcript: {:?}", self.transcript));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => {
                s.write_all(bytes)?;
                s.flush()
            }
            Stream::Tls(s) => {
                s.write_all(bytes)?;
                s.flush()
            }
            Stream::Closed => Err(io::Error::other("closed")),
        }
    }

    /// Send the pieces as separate writes with a pause between them, so they reach the server
    /// as separate segments/reads.
    pub fn send_split(&mut self, pieces: &[&[u8]], pause: Duration) {
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(pause);
            }
            self.send(p);
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = match &mut self.stream {
            Stream::Plain(s) => s.read(&mut tmp)?,
            Stream::Tls(s) => s.read(&mut tmp)?,
            Stream::Closed => 0,
        };
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn take_line(&mut self) -> Option<String> {
        let pos = self.buf.windows(2).position(|w| w == b"\r\n")?;
        let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
        Some(String::from_utf8_lossy(&line).into_owned())
    }

    /// Read one full reply. Errors: timeout (WouldBlock/TimedOut), EOF (UnexpectedEof), or a
    /// malformed reply (InvalidData).
    pub fn try_read_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            while let Some(l) = self.take_line() {
                let last = l.len() < 4 || l.as_bytes()[3] != b'-';
                lines.push(l);
                if last {
                    let r = Reply::parse(&lines)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.transcript.push(r.to_string());
                    return Ok(r);
                }
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "reply line over 1 MiB",
                ));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed; partial reply {lines:?} {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Read one full reply or fail the test.
    #[track_caller]
    pub fn read_reply(&mut self) -> Reply {
        match self.try_read_reply() {
            Ok(r) => r,
            Err(e) => panic!(
                "reading reply: {e}; transcript so far: {:?}",
                self.transcript
            ),
        }
    }

    /// Wait up to `wait` for a reply; `None` if none arrived (the connection stays usable).
    pub fn reply_within(&mut self, wait: Duration) -> Option<Reply> {
        self.set_timeout(wait);
        let r = self.try_read_reply();
        self.set_timeout(REPLY_TIMEOUT);
        match r {
            Ok(r) => Some(r),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("waiting for a reply: {e}"),
        }
    }

    /// Send a command line (CRLF appended) and read its reply.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n"));
        self.read_reply()
    }

    #[track_caller]
    pub fn ehlo(&mut self, name: &str) -> Reply {
        self.cmd(&format!("EHLO {name}"))
    }

    /// Assert the server closes the connection within `wait` (EOF or reset), with nothing more
    /// to read than the replies already consumed.
    #[track_caller]
    pub fn expect_closed(&mut self, wait: Duration) {
        self.set_timeout(wait);
        let deadline = Instant::now() + wait;
        loop {
            match self.fill() {
                Ok(0) => break,
                Ok(_) => {
                    if Instant::now() > deadline {
                        panic!(
                            "server kept sending instead of closing: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "connection not closed within {wait:?}: {e}; transcript {:?}",
                    self.transcript
                ),
            }
        }
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before close: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// Bytes received but not yet parsed into a reply.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// `STARTTLS` → expect 220 → TLS handshake. Returns the 220 reply.
    #[track_caller]
    pub fn starttls(&mut self) -> Reply {
        let r = self.cmd("STARTTLS");
        r.expect("220", "2.0.0");
        self.tls_handshake();
        r
    }

    /// Run the TLS handshake on the current TCP stream. Panics if plaintext bytes are still
    /// buffered: they would be a reply sent before TLS, which a test must look at first.
    #[track_caller]
    pub fn tls_handshake(&mut self) {
        assert!(
            self.buf.is_empty(),
            "plaintext bytes buffered before the TLS handshake: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let tcp = match std::mem::replace(&mut self.stream, Stream::Closed) {
            Stream::Plain(s) => s,
            _ => panic!("already TLS"),
        };
        let name = rustls::pki_types::ServerName::try_from("tern.test").unwrap();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(crate::tls::insecure_client_config()), name)
                .expect("client connection");
        let mut tcp = tcp;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut tcp) {
                panic!("TLS handshake failed: {e}");
            }
        }
        self.stream = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)));
    }

    /// A full transaction: MAIL, RCPTs, DATA, body (dot-stuffed here), final dot. Returns the
    /// reply to the final dot. Panics if MAIL, any RCPT or DATA is refused.
    #[track_caller]
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        self.cmd(&format!("MAIL FROM:<{from}>")).expect("250", "2");
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>")).expect("250", "2");
        }
        self.cmd("DATA").expect_code(354);
        self.send(dot_stuff(body));
        self.send(".\r\n");
        self.read_reply()
    }
}

/// Dot-stuff a CRLF body (RFC 5321 §4.5.2) and make sure it ends with CRLF.
pub fn dot_stuff(body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 16);
    for line in body.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    if !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out
}

/// A small async SMTP client for the tests that hold hundreds of sessions open at once.
pub struct AsyncSmtpClient {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl AsyncSmtpClient {
    pub async fn connect(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<AsyncSmtpClient> {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(src) = src {
            sock.bind(SocketAddr::new(src, 0))?;
        }
        let s = tokio::time::timeout(REPLY_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect {addr}")))??;
        s.set_nodelay(true)?;
        Ok(AsyncSmtpClient {
            stream: tokio::io::BufReader::new(s),
        })
    }

    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        use tokio::io::AsyncBufReadExt;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_line(&mut l))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("no reply after {lines:?}"))
                })??;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {lines:?}"),
                ));
            }
            let l = l.trim_end_matches(['\r', '\n']).to_string();
            let last = l.len() < 4 || l.as_bytes()[3] != b'-';
            lines.push(l);
            if last {
                return Reply::parse(&lines)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.get_mut().write_all(bytes).await
    }

    pub async fn cmd(&mut self, line: &str) -> io::Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.read_reply().await
    }
}
