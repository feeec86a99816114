//! TLS pieces that more than one stage needs: the ingress and the delivery client describe a
//! session's TLS the same way (logs, Received headers), and the delivery client (opportunistic
//! TLS) and the test harness (self-signed test servers) both accept any certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CommonState, DigitallySignedStruct, SignatureScheme};

/// `"TLSv1.3 TLS13_AES_256_GCM_SHA384"`: version and cipher as Postfix and Exim print them, for
/// either side of a connection (client and server connections both deref to `CommonState`).
pub fn describe(state: &CommonState) -> String {
    let version = state
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("TLS");
    let cipher = state
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or("unknown");
    format!("{version} {cipher}").replace("TLSv1_", "TLSv1.")
}

/// The crypto provider named explicitly: the process default panics at first use when more than
/// one provider is compiled in.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate, still checking the handshake signatures so the session is
/// bound to the key the server presented. For opportunistic TLS between MTAs (RFC 7435, Postfix
/// `smtp_tls_security_level = may`), where refusing an unverifiable certificate would only push
/// the mail to plaintext; and for tests against self-signed servers.
#[derive(Debug)]
pub struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl AcceptAnyCertificate {
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(Self(provider))
    }
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration that accepts any certificate (see [`AcceptAnyCertificate`]).
pub fn accept_any_client_config() -> rustls::ClientConfig {
    let provider = provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyCertificate::new(provider))
        .with_no_client_auth()
}
