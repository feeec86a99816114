//! Tern's outbound side.
//!
//! * [`client::SmtpConnection`]: one connection to one remote server, reused for several
//!   transactions (pipelining, STARTTLS, DSN parameters, BDAT, long-line folding).
//! * [`stage`]: the delivery stage's actors: a dispatcher routing queue jobs to one actor per
//!   destination (a site, i.e. a set of MX hosts, or a smarthost), each with a bounded pool of
//!   connections, MX lookup and fallback, and reports back to the queue (one per
//!   transaction).

pub mod client;
mod error;
pub mod fold;
pub mod stage;

pub use client::{ClientConfig, RecipientOutcome, SmtpConnection, TlsPolicy};
pub use error::DeliveryError;
pub use fold::fold_long_lines;
pub use stage::{
    domain_matches, spawn_delivery, DeliverySettings, DestinationLimits, Dispatcher, Route,
};
