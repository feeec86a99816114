pub mod admin;
pub mod config;
pub mod queue_cli;
pub mod tls;
