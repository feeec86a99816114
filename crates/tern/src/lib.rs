pub mod admin;
pub mod config;
pub mod dkim;
pub mod logging;
pub mod queue_cli;
pub mod tls;
