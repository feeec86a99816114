//! Tern's ingress stage: SMTP listeners and one session actor per connection.
//!
//! A session speaks SMTP (grammar from `tern-smtp`), enforces limits and relay policy, and hands
//! each finished message to the queue stage through a `tern_queue::QueueClient` (straight to the
//! spool's committer in one process, an `Enqueue` message to the queue actor otherwise); it
//! answers `250` only when the queue confirms the message is durably stored.

pub mod auth;
pub mod limiter;
pub mod listener;
pub mod proxy;
pub mod received;
mod session;
pub mod settings;

pub use listener::{Ingress, IngressError};
pub use settings::{ListenerKind, ListenerSpec, Settings, VrfyPolicy};
