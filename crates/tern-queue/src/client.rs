//! How a session hands a finished message to the queue stage.

use actix::Recipient;
use tern_message::{InboundMessage, QueueId, SpoolError};

use crate::actor::Enqueue;
use crate::committer::{durable, Submitter};

/// The queue stage as a session sees it: `enqueue` resolves once the message is durable (the
/// moment to answer `250`), or with the reason it is not.
///
/// Two routes, one contract. `tern serve` uses the first: the message goes straight to the
/// spool's committer thread, and the queue actor learns of it with the rest of its group
/// commit. The second sends an [`Enqueue`] to the queue actor's address, for a caller that has
/// only that address (a plain serde message: the route a remote session stage would take once
/// messages cross nodes; nothing does yet).
#[derive(Clone)]
pub struct QueueClient {
    route: Route,
}

#[derive(Clone)]
enum Route {
    Local(Submitter),
    Actor(Recipient<Enqueue>),
}

impl QueueClient {
    pub(crate) fn local(submitter: Submitter) -> Self {
        Self {
            route: Route::Local(submitter),
        }
    }

    /// Spools `msg`; `Ok` only once it is durable.
    pub async fn enqueue(&self, msg: InboundMessage) -> Result<QueueId, SpoolError> {
        let id = msg.id;
        match &self.route {
            Route::Local(s) => durable(id, s.submit(msg)).await,
            Route::Actor(r) => r
                .send(Enqueue(msg))
                .await
                .map_err(|e| SpoolError::Unavailable(format!("queue stage unreachable: {e}")))?,
        }
    }
}

impl From<Recipient<Enqueue>> for QueueClient {
    fn from(r: Recipient<Enqueue>) -> Self {
        Self {
            route: Route::Actor(r),
        }
    }
}
