//! Outbound DKIM signing (RFC 6376; Ed25519 per RFC 8463).
//!
//! [`DkimKey`] is one signing identity (domain, selector, private key read from a PEM file);
//! [`Signer`] signs a message with every key whose domain is the message's From: domain and
//! returns the `DKIM-Signature` header fields to prepend; [`keygen`] makes a new key and the DNS
//! TXT record that publishes it. Which mail gets signed (authenticated or trusted submitters) is
//! the caller's decision. The cryptography and the canonicalization are mail-auth's (ring
//! underneath); this crate picks the policy: relaxed/relaxed, the signed header list, From
//! oversigned, `t=` set and no `x=`.
//!
//! The only I/O is reading key files ([`DkimKey::load`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter as _, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivateKeyDer;

/// The header fields signed when present, in this order. From is always signed (a message
/// without one is not signed at all) and signed once more than it occurs ("oversigned"), so a
/// second From: added in transit breaks the signature.
pub const SIGNED_HEADERS: [&str; 13] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
];

/// The smallest RSA key [`keygen`] makes and [`DkimKey::load`] accepts: RFC 8301 allows
/// 1024, but ring (which signs) refuses keys under 2048 bits.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA key [`keygen`] makes.
pub const MAX_RSA_BITS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot read DKIM key file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("DKIM key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("invalid DKIM {what} {value:?}: {message}")]
    Invalid {
        what: &'static str,
        value: String,
        message: String,
    },
    #[error("DKIM signing failed for d={domain} s={selector}: {message}")]
    Sign {
        domain: String,
        selector: String,
        message: String,
    },
    #[error("DKIM key generation failed: {0}")]
    Keygen(String),
}

/// A DKIM signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    #[default]
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    /// The `a=` tag value: "rsa-sha256" or "ed25519-sha256".
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    /// The `k=` tag value of the DNS record: "rsa" or "ed25519".
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = DkimError;

    fn from_str(s: &str) -> Result<Self, DkimError> {
        match s.to_ascii_lowercase().as_str() {
            "rsa-sha256" => Ok(Algorithm::RsaSha256),
            "ed25519-sha256" => Ok(Algorithm::Ed25519Sha256),
            _ => Err(DkimError::Invalid {
                what: "algorithm",
                value: s.to_string(),
                message: "expected \"rsa-sha256\" or \"ed25519-sha256\"".into(),
            }),
        }
    }
}

enum KeyMaterial {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// The parsed private key, shared by every signature made with it (mail-auth's signer takes
/// its key by value; this hands it a cheap clone).
#[derive(Clone)]
struct SharedKey(Arc<KeyMaterial>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match &*self.0 {
            KeyMaterial::Rsa(key) => key.sign(input),
            KeyMaterial::Ed25519(key) => key.sign(input),
        }
    }

    fn algorithm(&self) -> mail_auth::common::crypto::Algorithm {
        match &*self.0 {
            KeyMaterial::Rsa(key) => key.algorithm(),
            KeyMaterial::Ed25519(key) => key.algorithm(),
        }
    }
}

/// One signing identity: `d=` domain, `s=` selector and the private key.
pub struct DkimKey {
    domain: String,
    selector: String,
    algorithm: Algorithm,
    path: PathBuf,
    key: SharedKey,
}

impl fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkimKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DkimKey {
    /// Reads the private key for `algorithm` from the PEM file at `path`: PKCS#8 ("BEGIN
    /// PRIVATE KEY") or PKCS#1 ("BEGIN RSA PRIVATE KEY") for RSA, PKCS#8 for Ed25519. Every
    /// error names the file.
    pub fn load(
        domain: &str,
        selector: &str,
        algorithm: Algorithm,
        path: &Path,
    ) -> Result<DkimKey, DkimError> {
        let pem = std::fs::read(path).map_err(|error| DkimError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_pem(domain, selector, algorithm, &pem)
            .map_err(|e| match e {
                DkimError::Key { message, .. } => DkimError::Key {
                    path: path.to_path_buf(),
                    message,
                },
                other => other,
            })
            .map(|mut key| {
                key.path = path.to_path_buf();
                key
            })
    }

    /// [`DkimKey::load`] from PEM text already in memory.
    pub fn from_pem(
        domain: &str,
        selector: &str,
        algorithm: Algorithm,
        pem: &[u8],
    ) -> Result<DkimKey, DkimError> {
        let domain = check_domain(domain)?;
        let selector = check_selector(selector)?;
        let key_error = |message: String| DkimError::Key {
            path: PathBuf::from("(PEM in memory)"),
            message,
        };
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| key_error(format!("no PEM private key found ({e})")))?;
        let material = match (algorithm, &der) {
            (Algorithm::RsaSha256, PrivateKeyDer::Pkcs8(der)) => KeyMaterial::Rsa(
                RsaKey::<Sha256>::from_pkcs8_der(der.secret_pkcs8_der())
                    .map_err(|e| key_error(rsa_key_error("PKCS#8", e)))?,
            ),
            (Algorithm::RsaSha256, PrivateKeyDer::Pkcs1(der)) => KeyMaterial::Rsa(
                RsaKey::<Sha256>::from_der(der.secret_pkcs1_der())
                    .map_err(|e| key_error(rsa_key_error("PKCS#1", e)))?,
            ),
            (Algorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(der)) => KeyMaterial::Ed25519(
                Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der())
                    .map_err(|e| key_error(format!("not a usable PKCS#8 Ed25519 key: {e}")))?,
            ),
            (Algorithm::Ed25519Sha256, _) => {
                return Err(key_error(
                    "an ed25519-sha256 key must be PKCS#8 (\"BEGIN PRIVATE KEY\")".into(),
                ))
            }
            (Algorithm::RsaSha256, _) => {
                return Err(key_error(
                    "an rsa-sha256 key must be PKCS#8 (\"BEGIN PRIVATE KEY\") or PKCS#1 \
                     (\"BEGIN RSA PRIVATE KEY\")"
                        .into(),
                ))
            }
        };
        Ok(DkimKey {
            domain,
            selector,
            algorithm,
            path: PathBuf::new(),
            key: SharedKey(Arc::new(material)),
        })
    }

    /// The `d=` domain, lowercased, without a trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn selector(&self) -> &str {
        &self.selector
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The file the key was read from (empty for [`DkimKey::from_pem`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `DKIM-Signature` header field (CRLF-terminated, folded) for `message` signed
    /// with this key, whatever its From: says. `headers` are the field names to sign.
    fn sign_with(&self, message: &[u8], headers: &[&str]) -> Result<String, DkimError> {
        let signature = DkimSigner::from_key(self.key.clone())
            .domain(self.domain.clone())
            .selector(self.selector.clone())
            .headers(headers.iter().copied())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed)
            .sign(message)
            .map_err(|e| DkimError::Sign {
                domain: self.domain.clone(),
                selector: self.selector.clone(),
                message: e.to_string(),
            })?;
        Ok(fold(&signature.to_header()))
    }
}

/// Signs outgoing mail with the keys of the From: domain.
#[derive(Debug, Default)]
pub struct Signer {
    keys: Vec<DkimKey>,
}

impl Signer {
    pub fn new(keys: Vec<DkimKey>) -> Signer {
        Signer { keys }
    }

    pub fn keys(&self) -> &[DkimKey] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `DKIM-Signature` header field(s) to prepend to `message` (CRLF line ends, folded,
    /// one per key whose domain is the From: domain, in configuration order), or `None` when
    /// the message has no From: address or no key is for its domain.
    pub fn sign(&self, message: &[u8]) -> Result<Option<Vec<u8>>, DkimError> {
        let Some(from_domain) = from_domain(message) else {
            return Ok(None);
        };
        let mut matching = self
            .keys
            .iter()
            .filter(|k| k.domain == from_domain)
            .peekable();
        if matching.peek().is_none() {
            return Ok(None);
        }
        let headers = headers_to_sign(message);
        let mut out = Vec::new();
        for key in matching {
            out.extend_from_slice(key.sign_with(message, &headers)?.as_bytes());
        }
        Ok(Some(out))
    }
}

/// The domain of the first From: address, lowercased, without a trailing dot.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

/// The `h=` list for `message`: the [`SIGNED_HEADERS`] it has (mail-auth signs every
/// instance of each), plus one extra From, which mail-auth, finding no further instance,
/// signs as absent: the oversigning.
fn headers_to_sign(message: &[u8]) -> Vec<&'static str> {
    let present = header_names(message);
    let mut headers: Vec<&'static str> = SIGNED_HEADERS
        .iter()
        .copied()
        .filter(|h| *h == "From" || present.iter().any(|p| p.eq_ignore_ascii_case(h.as_bytes())))
        .collect();
    headers.push("From");
    headers
}

/// The field names of the header section (up to the first empty line).
fn header_names(message: &[u8]) -> Vec<&[u8]> {
    let mut names = Vec::new();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue; // a continuation line
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = &line[..colon];
            let name = name.strip_suffix(b" ").unwrap_or(name);
            names.push(name);
        }
    }
    names
}

fn rsa_key_error(format: &str, e: mail_auth::Error) -> String {
    let e = e.to_string();
    if e.contains("TooSmall") {
        format!("the RSA key is too small: at least {MIN_RSA_BITS} bits are needed")
    } else {
        format!("not a usable {format} RSA key: {e}")
    }
}

/// Folds the lines of a header field longer than 78 characters at "; " tag boundaries
/// (mail-auth folds inside h= and b= but not its first line). Only whitespace between tags
/// changes, which relaxed header canonicalization ignores.
fn fold(header: &str) -> String {
    let mut out = String::with_capacity(header.len() + 8);
    for (i, line) in header.split("\r\n").enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        let mut rest = line;
        while rest.len() > 78 {
            match rest[..78].rfind("; ") {
                Some(cut) if cut > 1 => {
                    out.push_str(&rest[..=cut]);
                    out.push_str("\r\n\t");
                    rest = &rest[cut + 2..];
                }
                _ => break,
            }
        }
        out.push_str(rest);
    }
    out
}

/// Non-empty, dot-separated labels of 1–63 letters, digits, '-' and '_': what a `d=` domain
/// and an `s=` selector are made of (RFC 6376 §3.1, §3.5).
fn dns_labels(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `domain` as a `d=` value: lowercased, without a trailing dot; an error unless it is a
/// domain name (letters, digits, '-', '_', dot-separated labels).
pub fn check_domain(domain: &str) -> Result<String, DkimError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let ok = d.len() <= 253 && dns_labels(&d);
    if ok {
        Ok(d)
    } else {
        Err(DkimError::Invalid {
            what: "domain",
            value: domain.to_string(),
            message: "expected a domain name such as example.org".into(),
        })
    }
}

/// `selector` as an `s=` value; an error unless it is dot-separated labels of letters,
/// digits, '-' and '_' (RFC 6376 §3.1).
pub fn check_selector(selector: &str) -> Result<String, DkimError> {
    // RFC 6376 §3.1: a selector is one or more dot-separated sub-domain labels.
    let ok = dns_labels(selector);
    if ok {
        Ok(selector.to_string())
    } else {
        Err(DkimError::Invalid {
            what: "selector",
            value: selector.to_string(),
            message: "expected letters, digits, '-' or '_' (dot-separated labels)".into(),
        })
    }
}

/// A freshly generated key: the private key as PEM and how to publish the public one.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// PKCS#8 PEM ("BEGIN PRIVATE KEY"), for `private_key` in `[[dkim]]`.
    pub private_key_pem: String,
    /// The DNS record's name: `SELECTOR._domainkey.DOMAIN.`
    pub record_name: String,
    /// The TXT record's value: `v=DKIM1; k=rsa; p=...`
    pub record_value: String,
    /// The whole zone-file line, the value split into strings of at most 255 characters:
    /// `s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=..." "..." )`
    pub dns_txt: String,
}

/// Generates a key for `domain`/`selector` and returns `(private_key_pem, dns_txt)`:
/// the PKCS#8 PEM private key and the zone-file line that publishes the public key.
/// `rsa_bits` is ignored for Ed25519.
pub fn keygen(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    rsa_bits: usize,
) -> Result<(String, String), DkimError> {
    let key = generate(domain, selector, algorithm, rsa_bits)?;
    Ok((key.private_key_pem, key.dns_txt))
}

/// [`keygen`] with the record's name and value also given separately.
pub fn generate(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    rsa_bits: usize,
) -> Result<GeneratedKey, DkimError> {
    let domain = check_domain(domain)?;
    let selector = check_selector(selector)?;
    let (pkcs8_der, public_key) = match algorithm {
        Algorithm::RsaSha256 => {
            use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&rsa_bits) {
                return Err(DkimError::Invalid {
                    what: "RSA key size",
                    value: rsa_bits.to_string(),
                    message: format!("must be {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"),
                });
            }
            let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), rsa_bits)
                .map_err(|e| DkimError::Keygen(e.to_string()))?;
            let der = private
                .to_pkcs8_der()
                .map_err(|e| DkimError::Keygen(e.to_string()))?;
            // RFC 6376 §3.6.1: p= is the SubjectPublicKeyInfo, base64.
            let public = private
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| DkimError::Keygen(e.to_string()))?;
            (der.as_bytes().to_vec(), public.as_bytes().to_vec())
        }
        Algorithm::Ed25519Sha256 => {
            let der = Ed25519Key::generate_pkcs8().map_err(|e| DkimError::Keygen(e.to_string()))?;
            // RFC 8463 §4.2: p= is the raw 32-byte public key, base64.
            let public = Ed25519Key::from_pkcs8_der(&der)
                .map_err(|e| DkimError::Keygen(e.to_string()))?
                .public_key();
            (der, public)
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let private_key_pem = pem("PRIVATE KEY", &b64.encode(&pkcs8_der));
    let record_name = format!("{selector}._domainkey.{domain}.");
    let record_value = format!(
        "v=DKIM1; k={}; p={}",
        algorithm.key_type(),
        b64.encode(&public_key)
    );
    let strings: Vec<String> = record_value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let dns_txt = format!("{record_name} IN TXT ( {} )", strings.join(" "));
    Ok(GeneratedKey {
        private_key_pem,
        record_name,
        record_value,
        dns_txt,
    })
}

fn pem(label: &str, b64: &str) -> String {
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests;
