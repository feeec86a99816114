//! The connection loop: PROXY header, greeting, reading commands and message data, STARTTLS.
//! All protocol decisions are in `commands.rs`; this file only moves bytes and keeps time.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tern_smtp::line::LineReader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, info_span, Instrument};

use super::commands::{Flow, Mode, Session};
use super::Connection;
use crate::proxy::{self, ProxyParse};
use crate::settings::canonical_ip;
use tern_policy::Verdict;

/// Idle sessions keep only this much read buffer, so 10,000 of them stay small; DATA grows it.
const IDLE_READ_RESERVE: usize = 2048;
const DATA_READ_RESERVE: usize = 64 * 1024;

pub(super) async fn run(connection: Connection) {
    let span = info_span!(
        "session",
        peer = %connection.peer,
        listener = connection.listener.kind.name()
    );
    serve(connection).instrument(span).await
}

async fn serve(connection: Connection) {
    let Connection {
        shared,
        mut stream,
        peer,
        listener,
        mut slot,
    } = connection;
    let _ = stream.set_nodelay(true);
    // A listener on a wildcard address is the only case where the connection's own address
    // says more than the listener's bound one (a getsockname per connection otherwise).
    let local = if listener.addr.ip().is_unspecified() {
        stream.local_addr().unwrap_or(listener.addr)
    } else {
        listener.addr
    };
    let settings = &shared.settings;
    let mut rbuf = BytesMut::new();

    let mut client = peer;
    if listener.proxy_protocol {
        match read_proxy_header(&mut stream, &mut rbuf, settings.command_timeout).await {
            Ok(Some(source)) => client = source,
            Ok(None) => {}
            Err(reason) => {
                info!(%reason, "bad PROXY protocol header; closing");
                return;
            }
        }
    }
    if !shared.limiter.bind_ip(&mut slot, canonical_ip(client.ip())) {
        info!(client = %client, "per-address connection limit reached");
        let reply = format!(
            "421 4.7.0 {} Error: too many connections from your address\r\n",
            settings.hostname
        );
        let _ = stream.write_all(reply.as_bytes()).await;
        return;
    }
    debug!(client = %client, "connected");
    // Connect-stage policy (rate, blocklists) for strangers on plaintext listeners; an implicit
    // TLS listener could only send the refusal before the handshake, which the client cannot
    // read, so its clients meet the policy at HELO and MAIL.
    if let Some(policy) = &settings.policy {
        let ip = canonical_ip(client.ip());
        if !listener.kind.implicit_tls() && !settings.is_trusted_network(ip) {
            // The rate in the session (no round trip), then the blocklists in the stage. A
            // stage that does not answer in time: go on; MAIL and RCPT still ask.
            let mut verdict = policy.connect_local(ip);
            if verdict == Verdict::Accept {
                let check = tern_policy::CheckConnect {
                    ip,
                    reverse_dns: listener.kind == crate::settings::ListenerKind::Smtp,
                };
                verdict = policy.ask(&policy.connect, check, Verdict::Accept).await;
            }
            if let Verdict::Refuse(r) = verdict {
                let (c, s, d) = r.enhanced;
                let reply = format!(
                    "{} {c}.{s}.{d} {} {}\r\n",
                    r.code, settings.hostname, r.text
                );
                let _ = stream.write_all(reply.as_bytes()).await;
                return;
            }
        }
    }

    let mut session = Session::new(shared.clone(), listener.kind, client, local);
    if listener.kind.implicit_tls() {
        let Some(acceptor) = shared.tls.clone() else {
            return;
        };
        match timeout(settings.command_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                session.tls_started(tern_tls::describe(tls.get_ref().1));
                session.greet();
                drive(&mut session, tls, &mut rbuf).await;
            }
            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
            Err(_) => debug!("TLS handshake timed out"),
        }
        return;
    }

    session.greet();
    let Some(plain) = drive(&mut session, stream, &mut rbuf).await else {
        return;
    };
    // STARTTLS injection (CVE-2011-0411): whatever the client pipelined after STARTTLS arrived
    // in plaintext and must not be executed as if it came over TLS.
    rbuf.clear();
    let Some(acceptor) = shared.tls.clone() else {
        return;
    };
    match timeout(settings.command_timeout, acceptor.accept(plain)).await {
        Ok(Ok(tls)) => {
            session.tls_started(tern_tls::describe(tls.get_ref().1));
            drive(&mut session, tls, &mut rbuf).await;
        }
        Ok(Err(e)) => debug!(error = %e, "STARTTLS handshake failed"),
        Err(_) => debug!("STARTTLS handshake timed out"),
    }
}

/// Reads a PROXY v1/v2 header; `Ok(None)` for LOCAL/UNKNOWN headers (balancer health checks).
/// Bytes after the header stay in `rbuf` for the SMTP loop.
async fn read_proxy_header(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    limit: Duration,
) -> Result<Option<SocketAddr>, String> {
    let deadline = Instant::now() + limit;
    loop {
        match proxy::parse(rbuf) {
            ProxyParse::Complete { len, source } => {
                rbuf.advance(len);
                return Ok(source);
            }
            ProxyParse::Invalid(reason) => return Err(reason),
            ProxyParse::Incomplete => {}
        }
        rbuf.reserve(512);
        match timeout_at(deadline, stream.read_buf(rbuf)).await {
            Ok(Ok(0)) => return Err("connection closed".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        }
    }
}

/// Runs the SMTP dialogue on `stream` until the client leaves or the session ends it. Returns
/// the stream when the client asked for STARTTLS (after the 220 went out), so the caller can
/// wrap it and call `drive` again.
async fn drive<S>(session: &mut Session, mut stream: S, rbuf: &mut BytesMut) -> Option<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let command_timeout = session.settings().command_timeout;
    let data_timeout = session.settings().data_timeout;
    let mut lines = LineReader::new(session.max_command_line());
    let mut mode = Mode::Command;
    // Slowloris: the whole command must arrive within the timeout, not each byte of it.
    let mut deadline = Instant::now() + command_timeout;
    let mut shutdown = session.shutdown_signal();

    loop {
        // Answer everything already buffered (PIPELINING, RFC 2920), then flush once.
        let flow = loop {
            let flow = match &mut mode {
                Mode::Command | Mode::Auth(_) => match lines.read_line(rbuf) {
                    None => break Flow::Continue,
                    Some(line) => {
                        deadline = Instant::now() + command_timeout;
                        // Awaited inline: the kilobyte-sized futures inside (policy checks,
                        // signing, the spool's answer) are boxed where they are awaited, so
                        // these stay about 1 KB and an idle session's future stays small
                        // without an 8 KB allocation per command.
                        match std::mem::replace(&mut mode, Mode::Command) {
                            Mode::Auth(step) => session.on_auth_line(step, line).await,
                            _ => session.on_command_line(line).await,
                        }
                    }
                },
                Mode::Data(receiver) => {
                    let (consumed, done) = session.ingest_data(receiver, rbuf);
                    rbuf.advance(consumed);
                    if !done {
                        break Flow::Continue;
                    }
                    let outcome = receiver.outcome();
                    mode = Mode::Command;
                    deadline = Instant::now() + command_timeout;
                    session.finish_data(outcome).await
                }
                Mode::Bdat(receiver, last) => {
                    let last = *last;
                    let (consumed, done) = session.ingest_bdat(receiver, rbuf);
                    rbuf.advance(consumed);
                    if !done {
                        break Flow::Continue;
                    }
                    mode = Mode::Command;
                    deadline = Instant::now() + command_timeout;
                    session.finish_chunk(last).await
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Enter(next) => mode = next,
                Flow::Close | Flow::StartTls => break flow,
            }
        };

        if !session.out.is_empty() {
            let written = stream.write_all(&session.out).await;
            session.out.clear();
            if written.is_err() || stream.flush().await.is_err() {
                return None;
            }
        }
        match flow {
            Flow::Close => {
                let _ = stream.shutdown().await;
                return None;
            }
            Flow::StartTls => return Some(stream),
            _ => {}
        }

        let in_data = matches!(mode, Mode::Data(_) | Mode::Bdat(..));
        if in_data {
            deadline = Instant::now() + data_timeout;
        }
        let reserve = if in_data {
            DATA_READ_RESERVE
        } else {
            IDLE_READ_RESERVE
        };
        if rbuf.capacity() - rbuf.len() < reserve / 2 {
            rbuf.reserve(reserve);
        }
        let read = tokio::select! {
            read = timeout_at(deadline, stream.read_buf(rbuf)) => read,
            // Only ever waited on between commands or reads, never while a message is being
            // spooled, so an acknowledged message is never cut off.
            _ = shutdown.wait_for(|stopping| *stopping) => {
                info!("shutting down; closing session");
                session.shutting_down();
                let _ = stream.write_all(&session.out).await;
                let _ = stream.shutdown().await;
                return None;
            }
        };
        match read {
            Ok(Ok(0)) => {
                debug!("client closed the connection");
                return None;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "read failed");
                return None;
            }
            Err(_) => {
                info!("timeout; closing");
                session.timed_out();
                let _ = stream.write_all(&session.out).await;
                let _ = stream.shutdown().await;
                return None;
            }
        }
    }
}
