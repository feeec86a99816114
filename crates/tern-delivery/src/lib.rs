//! Tern's outbound side.
//!
//! This first piece is the SMTP client ([`client::SmtpConnection`]): one connection to one
//! remote server, reused for several transactions. Choosing the server (MX lookup), retry
//! scheduling and DSNs are built on top of it later.

pub mod client;
mod error;
pub mod fold;

pub use client::{ClientConfig, RecipientOutcome, SmtpConnection, TlsPolicy};
pub use error::DeliveryError;
pub use fold::fold_long_lines;
