//! Binding the SMTP listeners and spreading sessions over one arbiter (thread) per core.
//!
//! Every arbiter accepts on its own registration of each listening socket, so accepted
//! connections are born on the thread that will run them: no hand-off between threads per
//! connection, and the kernel balances new connections across arbiters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Arbiter};
use tern_queue::QueueClient;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::limiter::ConnectionLimiter;
use crate::session::{Connection, SessionActor, Shared};
use crate::settings::{ListenerSpec, Settings};

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("cannot listen on {addr} ({kind}): {error}")]
    Bind {
        addr: SocketAddr,
        kind: &'static str,
        error: std::io::Error,
    },
    #[error("listener {addr} needs TLS (implicit TLS) but no TLS configuration was given")]
    NoTls { addr: SocketAddr },
}

/// The running ingress stage.
pub struct Ingress {
    /// Actual bound addresses, in the order of `Settings::listeners` (port 0 resolved).
    pub local_addrs: Vec<(ListenerSpec, SocketAddr)>,
    pub limiter: Arc<ConnectionLimiter>,
    /// The session threads this stage started (not one it was given: that one's owner stops it).
    arbiters: Vec<Arbiter>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Ingress {
    /// Binds every listener (failing fast with the address in the error) and starts accepting.
    /// Must be called from within a running actix System.
    pub fn start(settings: Settings, queue: QueueClient) -> Result<Self, IngressError> {
        Self::start_with(settings, queue, None)
    }

    /// [`Ingress::start`], with `first` as the first session thread: an arbiter that may run
    /// other actors too (the binary's queue actor).
    pub fn start_with(
        settings: Settings,
        queue: QueueClient,
        mut first: Option<Arbiter>,
    ) -> Result<Self, IngressError> {
        let mut bound = Vec::new();
        for spec in &settings.listeners {
            if spec.kind.implicit_tls() && settings.tls.is_none() {
                return Err(IngressError::NoTls { addr: spec.addr });
            }
            let listener = bind(spec.addr).map_err(|error| IngressError::Bind {
                addr: spec.addr,
                kind: spec.kind.name(),
                error,
            })?;
            let local = listener.local_addr().unwrap_or(spec.addr);
            info!(addr = %local, kind = spec.kind.name(), proxy_protocol = spec.proxy_protocol, "listening");
            bound.push((spec.clone(), local, listener));
        }

        let workers = match settings.workers {
            0 => default_workers(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        let limiter =
            ConnectionLimiter::new(settings.max_connections, settings.max_connections_per_ip);
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            tls: settings.tls.clone().map(TlsAcceptor::from),
            settings,
            limiter: limiter.clone(),
            queue,
            shutdown: shutdown_rx,
        });

        let mut arbiters = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (arbiter, owned) = match first.take() {
                Some(given) => (given, false),
                None => (Arbiter::new(), true),
            };
            for (spec, local, listener) in &bound {
                let listener = listener.try_clone().map_err(|error| IngressError::Bind {
                    addr: *local,
                    kind: spec.kind.name(),
                    error,
                })?;
                // The bound address (port 0 resolved): sessions take it as their own address.
                let spec = ListenerSpec {
                    addr: *local,
                    ..spec.clone()
                };
                let shared = shared.clone();
                arbiter.spawn(accept_loop(listener, spec, shared));
            }
            if owned {
                arbiters.push(arbiter);
            }
        }
        Ok(Self {
            local_addrs: bound.into_iter().map(|(s, a, _)| (s, a)).collect(),
            limiter,
            arbiters,
            shutdown,
        })
    }

    /// Graceful stop: no new connections; every session answers 421 4.3.2 at its next wait for
    /// input (a message being spooled finishes first and gets its reply); then, after at most
    /// `grace`, the arbiters this stage started stop and take whatever is left with them (the
    /// sessions on an arbiter given to [`Ingress::start_with`] end when its owner stops it).
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while self.limiter.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.limiter.active() > 0 {
            info!(
                sessions = self.limiter.active(),
                "grace period over; closing the rest"
            );
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

/// Session threads when `smtp.workers = 0`: one per core but one. The core left over runs the
/// spool's committer, the delivery arbiter and the kernel's share of loopback and
/// disk work; sessions spread over every core instead fought those for it. Measured on 2
/// cores (docs/benchmarks.md): one session thread against two, the same throughput accepting
/// and relaying, 12–15% less CPU per message.
fn default_workers(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    // A restarted server must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    // A deep backlog absorbs connection bursts from bulk senders.
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_loop(listener: std::net::TcpListener, spec: ListenerSpec, shared: Arc<Shared>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, addr = %spec.addr, "cannot register listener");
            return;
        }
    };
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        match accepted {
            Ok((stream, peer)) => match shared.limiter.acquire() {
                Some(slot) => {
                    SessionActor::new(Connection {
                        shared: shared.clone(),
                        stream,
                        peer,
                        listener: spec.clone(),
                        slot,
                    })
                    .start();
                }
                None => {
                    info!(%peer, "connection limit reached");
                    actix_rt::spawn(refuse(stream, shared.settings.hostname.clone()));
                }
            },
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning on a full process.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, hostname: String) {
    let reply = format!("421 4.7.0 {hostname} Error: too many connections, try again later\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(reply.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_workers_leave_a_core_for_the_rest() {
        assert_eq!(super::default_workers(1), 1);
        assert_eq!(super::default_workers(2), 1);
        assert_eq!(super::default_workers(8), 7);
    }
}
