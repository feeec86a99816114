pub mod auth_hash;
pub mod config;
pub mod tls;
