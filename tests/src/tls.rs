//! TLS client configuration for tests. The fixture server uses a self-signed certificate it
//! generates in its data dir, so the tests accept any certificate: they check what the server
//! does over TLS, not its PKI. Signatures are still verified (the handshake is real).

/// A ring-based client config that accepts the server's self-signed certificate.
pub fn insecure_client_config() -> rustls::ClientConfig {
    tern_tls::accept_any_client_config()
}
