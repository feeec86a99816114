//! SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) for submission, checked
//! against argon2 PHC hashes.

use std::collections::HashMap;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine;

/// The SASL exchange state between the 334 challenges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// PLAIN sent without an initial response: waiting for it.
    PlainResponse,
    /// LOGIN: waiting for the user name.
    LoginUser,
    /// LOGIN: waiting for the password of this user.
    LoginPassword(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("the client cancelled the exchange")]
    Cancelled,
    #[error("the response is not valid base64 or UTF-8")]
    Malformed,
}

pub fn decode(response: &str) -> Result<String, SaslError> {
    let response = response.trim();
    if response == "*" {
        return Err(SaslError::Cancelled);
    }
    // RFC 4954 §4: "=" is an empty initial response.
    if response == "=" {
        return Ok(String::new());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response)
        .map_err(|_| SaslError::Malformed)?;
    String::from_utf8(bytes).map_err(|_| SaslError::Malformed)
}

/// Splits a decoded PLAIN message `authzid NUL authcid NUL passwd` into (user, password).
/// An authzid different from the authcid would be a request to act as someone else, which we
/// do not grant.
pub fn parse_plain(message: &str) -> Option<(String, String)> {
    let mut parts = message.split('\0');
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let passwd = parts.next()?;
    if parts.next().is_some() || authcid.is_empty() {
        return None;
    }
    if !authzid.is_empty() && authzid != authcid {
        return None;
    }
    Some((authcid.to_string(), passwd.to_string()))
}

/// A fixed hash verified when the user does not exist, so a failed login costs the same time
/// whether or not the name is known (no user enumeration by timing).
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Gr3aa2bhEtq6y4XOWgLJRj6JkmL9bd1Wk/5VN4vOSS8";

/// CPU-heavy by design (argon2): call it off the session's thread.
pub fn verify(users: &HashMap<String, String>, user: &str, password: &str) -> bool {
    let (hash, known) = match users.get(user) {
        Some(h) => (h.as_str(), true),
        None => (DUMMY_HASH, false),
    };
    let ok = PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false);
    ok && known
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};

    fn hash(pw: &str) -> String {
        Argon2::default()
            .hash_password(pw.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    #[test]
    fn plain_message_is_split() {
        assert_eq!(
            parse_plain("\0alice\0secret"),
            Some(("alice".into(), "secret".into()))
        );
        assert_eq!(
            parse_plain("alice\0alice\0secret"),
            Some(("alice".into(), "secret".into()))
        );
        assert_eq!(parse_plain("bob\0alice\0secret"), None);
        assert_eq!(parse_plain("alice secret"), None);
    }

    #[test]
    fn responses_decode_and_cancel() {
        assert_eq!(decode("YWxpY2U="), Ok("alice".into()));
        assert_eq!(decode("="), Ok(String::new()));
        assert_eq!(decode("*"), Err(SaslError::Cancelled));
        assert_eq!(decode("%%%"), Err(SaslError::Malformed));
    }

    #[test]
    fn passwords_are_verified_against_argon2_hashes() {
        let users = HashMap::from([("alice".to_string(), hash("secret"))]);
        assert!(verify(&users, "alice", "secret"));
        assert!(!verify(&users, "alice", "wrong"));
        assert!(!verify(&users, "mallory", "secret"));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
