pub mod admin;
pub mod config;
pub mod dkim;
pub mod queue_cli;
pub mod tls;
