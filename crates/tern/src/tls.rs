//! TLS server configuration for STARTTLS and implicit-TLS listeners.
//!
//! With no certificate configured, a self-signed one is generated once into
//! `<data_dir>/tls/` and reused, so a fresh install can offer STARTTLS at
//! once (opportunistic TLS between MTAs does not verify certificates) and
//! keeps the same key across restarts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Tls;

/// File names of the generated certificate and key inside `<data_dir>/tls`.
pub const GENERATED_CERT: &str = "cert.pem";
pub const GENERATED_KEY: &str = "key.pem";

/// Why no TLS configuration could be built; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("TLS: cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("TLS: invalid PEM in {}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("TLS: no certificate in {} (expected a PEM \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "TLS: no supported private key in {} (expected an unencrypted PEM PKCS#8, \
         PKCS#1 RSA or SEC1 EC key)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    #[error(
        "TLS: cannot use certificate {} with private key {}: {error}",
        certificate.display(),
        private_key.display()
    )]
    Rejected {
        certificate: PathBuf,
        private_key: PathBuf,
        error: rustls::Error,
    },
    #[error("TLS: cannot generate a self-signed certificate for {hostname:?}: {message}")]
    Generate { hostname: String, message: String },
}

/// Loads the configured cert/key, or (both empty) generates a self-signed
/// certificate with rcgen for `hostname` (SANs: hostname, "localhost",
/// 127.0.0.1, ::1) into `<data_dir>/tls/cert.pem` + `key.pem` (key file
/// mode 0600) on first start and reuses them later.
pub fn server_config(
    tls: &Tls,
    data_dir: &Path,
    hostname: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert_path, key_path) =
        if tls.certificate.as_os_str().is_empty() && tls.private_key.as_os_str().is_empty() {
            ensure_self_signed(&data_dir.join("tls"), hostname)?
        } else {
            (tls.certificate.clone(), tls.private_key.clone())
        };

    let certs = load_certificates(&cert_path)?;
    let key = load_private_key(&key_path)?;

    // The provider is named rather than left to the process default, which
    // panics at first use when more than one provider is compiled in.
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| TlsError::Rejected {
        certificate: cert_path.clone(),
        private_key: key_path.clone(),
        error,
    })?;
    // with_single_cert also checks that the key belongs to the certificate.
    let config = builder
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| TlsError::Rejected {
            certificate: cert_path,
            private_key: key_path,
            error,
        })?;
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Every certificate in the file, leaf first, as the chain to send.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read here rather than with pem_file_iter so an unreadable file gets
    // the OS error, not a generic PEM one.
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in the file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        // Encrypted and unknown key types are skipped by the parser, so they
        // end up here too.
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// Returns the paths of the generated certificate and key, generating them
/// if either is missing.
fn ensure_self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join(GENERATED_CERT);
    let key_path = dir.join(GENERATED_KEY);
    if cert_path.is_file() && key_path.is_file() {
        // Reused even if the hostname changed: clients that pinned it keep
        // working. Delete the directory to get a new one.
        return Ok((cert_path, key_path));
    }

    let generate_error = |e: rcgen::Error| TlsError::Generate {
        hostname: hostname.to_string(),
        message: e.to_string(),
    };
    // A non-ASCII name cannot be a DNS SAN (IDNs must be in punycode); the
    // certificate is still useful for the loopback names.
    let mut names = Vec::new();
    if hostname.is_ascii() {
        names.push(hostname.to_string());
    }
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(extra)) {
            names.push(extra.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(generate_error)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let key_pair = rcgen::KeyPair::generate().map_err(generate_error)?;
    let cert = params.self_signed(&key_pair).map_err(generate_error)?;

    fs::create_dir_all(dir).map_err(|error| TlsError::Write {
        path: dir.to_path_buf(),
        error,
    })?;
    // The key first and the certificate last: a crash in between leaves
    // the certificate missing, which regenerates both next time.
    write_atomically(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Writes via a temporary file and rename so a crash never leaves a
/// truncated file behind; the file has `mode` from the start, so the key is
/// never readable by others, not even briefly.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_error = |error| TlsError::Write {
        path: path.to_path_buf(),
        error,
    };
    let tmp = path.with_extension("pem.tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    // A stale temporary file from a crash may have other permissions.
    let _ = fs::remove_file(&tmp);
    let mut file = options.open(&tmp).map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_error)?;
    Ok(())
}

/// The trust anchors for outbound `tls = "required"`: every certificate in the PEM bundle.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(load_certificates(path)?);
    if added == 0 {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_tls() -> Tls {
        Tls::default()
    }

    #[test]
    fn generates_on_first_call_and_reuses_later() {
        let dir = tempfile::tempdir().unwrap();
        server_config(&empty_tls(), dir.path(), "mx.example.org").unwrap();
        let cert = fs::read(dir.path().join("tls/cert.pem")).unwrap();
        let key = fs::read(dir.path().join("tls/key.pem")).unwrap();
        assert!(String::from_utf8_lossy(&cert).contains("BEGIN CERTIFICATE"));

        server_config(&empty_tls(), dir.path(), "mx.example.org").unwrap();
        assert_eq!(cert, fs::read(dir.path().join("tls/cert.pem")).unwrap());
        assert_eq!(key, fs::read(dir.path().join("tls/key.pem")).unwrap());
        assert!(!dir.path().join("tls/key.pem.tmp").exists());
    }

    #[cfg(unix)]
    #[test]
    fn generated_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        server_config(&empty_tls(), dir.path(), "localhost").unwrap();
        let mode = fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn non_ascii_hostname_still_gets_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        server_config(&empty_tls(), dir.path(), "почта.example").unwrap();
    }

    #[test]
    fn regenerates_when_half_missing() {
        let dir = tempfile::tempdir().unwrap();
        server_config(&empty_tls(), dir.path(), "a.example").unwrap();
        let key = fs::read(dir.path().join("tls/key.pem")).unwrap();
        fs::remove_file(dir.path().join("tls/cert.pem")).unwrap();
        server_config(&empty_tls(), dir.path(), "a.example").unwrap();
        assert_ne!(key, fs::read(dir.path().join("tls/key.pem")).unwrap());
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["mail.example.com".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        fs::write(&cert, ck.cert.pem()).unwrap();
        fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn loads_configured_files() {
        let dir = tempfile::tempdir().unwrap();
        let (certificate, private_key) = write_pair(dir.path(), "mail");
        let tls = Tls {
            certificate,
            private_key,
        };
        let data = dir.path().join("data");
        server_config(&tls, &data, "ignored").unwrap();
        // Nothing generated when files are configured.
        assert!(!data.join("tls").exists());
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (certificate, _) = write_pair(dir.path(), "one");
        let (_, private_key) = write_pair(dir.path(), "two");
        let tls = Tls {
            certificate,
            private_key,
        };
        let err = server_config(&tls, dir.path(), "x").unwrap_err();
        assert!(matches!(err, TlsError::Rejected { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("one.crt") && msg.contains("two.key"), "{msg}");
    }

    #[test]
    fn garbage_certificate_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, private_key) = write_pair(dir.path(), "mail");
        let certificate = dir.path().join("garbage.crt");
        fs::write(&certificate, "this is not a certificate\n").unwrap();
        let tls = Tls {
            certificate,
            private_key,
        };
        let err = server_config(&tls, dir.path(), "x").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("garbage.crt"), "{err}");
    }

    #[test]
    fn garbage_key_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (certificate, _) = write_pair(dir.path(), "mail");
        let private_key = dir.path().join("garbage.key");
        fs::write(
            &private_key,
            "-----BEGIN NONSENSE-----\nAAAA\n-----END NONSENSE-----\n",
        )
        .unwrap();
        let tls = Tls {
            certificate,
            private_key,
        };
        let err = server_config(&tls, dir.path(), "x").unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("garbage.key"), "{err}");
    }

    #[test]
    fn missing_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, private_key) = write_pair(dir.path(), "mail");
        let certificate = dir.path().join("nope.crt");
        let tls = Tls {
            certificate,
            private_key,
        };
        let err = server_config(&tls, dir.path(), "x").unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("nope.crt") && msg.contains("No such file"),
            "{msg}"
        );
    }

    #[test]
    fn negotiates_tls13_and_tls12() {
        // A loopback handshake in memory proves the config actually serves.
        let dir = tempfile::tempdir().unwrap();
        let server = server_config(&empty_tls(), dir.path(), "localhost").unwrap();
        let cert = load_certificates(&dir.path().join("tls/cert.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert[0].clone()).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            let mut c =
                rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap())
                    .unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            for _ in 0..10 {
                if !c.is_handshaking() && !s.is_handshaking() {
                    break;
                }
                let mut buf = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut buf).unwrap();
                }
                let mut rd = buf.as_slice();
                while !rd.is_empty() {
                    s.read_tls(&mut rd).unwrap();
                    s.process_new_packets().unwrap();
                }
                let mut buf = Vec::new();
                while s.wants_write() {
                    s.write_tls(&mut buf).unwrap();
                }
                let mut rd = buf.as_slice();
                while !rd.is_empty() {
                    c.read_tls(&mut rd).unwrap();
                    c.process_new_packets().unwrap();
                }
            }
            assert!(!c.is_handshaking(), "handshake did not finish");
            assert_eq!(c.protocol_version(), Some(version.version));
        }
    }
}
