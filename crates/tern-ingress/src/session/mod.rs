//! One actor per SMTP connection.
//!
//! The actor lives on one of the ingress arbiters (`smtp.workers`) and owns the connection for its
//! whole life; the protocol loop runs as a future inside the actor's context, so everything it
//! touches is single-threaded and needs no locks. The only cross-stage traffic is the finished
//! message handed to the queue stage through a [`QueueClient`]: straight to the spool's
//! committer in one process, or the typed, serializable `Enqueue` message to the queue actor's
//! address when the queue is elsewhere.

mod commands;
mod io;

use std::net::SocketAddr;
use std::sync::Arc;

use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, WrapFuture};
use tern_queue::QueueClient;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::limiter::{ConnectionLimiter, ConnectionSlot};
use crate::settings::{ListenerSpec, Settings};

/// What every session on every arbiter shares, read-only.
pub(crate) struct Shared {
    pub settings: Settings,
    pub limiter: Arc<ConnectionLimiter>,
    pub queue: QueueClient,
    pub tls: Option<TlsAcceptor>,
    /// Flips to `true` once: stop accepting, and answer every idle session 421 4.3.2.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

pub(crate) struct SessionActor {
    connection: Option<Connection>,
}

/// Everything a session needs to start; moved into the protocol future on start.
pub(crate) struct Connection {
    pub shared: Arc<Shared>,
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub listener: ListenerSpec,
    pub slot: ConnectionSlot,
}

impl SessionActor {
    pub fn new(connection: Connection) -> Self {
        Self {
            connection: Some(connection),
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(connection) = self.connection.take() {
            ctx.spawn(
                io::run(connection)
                    .into_actor(self)
                    .map(|_, _, ctx| ctx.stop()),
            );
        }
    }
}
