//! SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) for submission, checked
//! against argon2 PHC hashes; and the hashing that `tern auth hash` and the config check use,
//! so one module owns what a valid password hash is.

use std::collections::HashMap;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
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
    verify_password(hash, password) && known
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("the password is empty")]
    Empty,
    // argon2's error type only implements std::error::Error with its "std"
    // feature, so its text is carried instead.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Hashes `password` with argon2id (default parameters, random salt) into
/// a PHC string (`$argon2id$v=19$...`) for `auth.users[].password_hash`.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    if password.is_empty() {
        return Err(HashError::Empty);
    }
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Hash(e.to_string()))
}

/// Whether `password` matches `phc`; false for a malformed hash too, so a
/// bad hash can never let anyone in.
pub fn verify_password(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        // Argon2::default() verifies with the parameters stored in the hash.
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Checks that `phc` is an argon2 PHC string, as the config check requires.
pub fn check_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| {
        format!("not a PHC password hash ({e}); generate one with `tern auth hash`")
    })?;
    match hash.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {}
        other => {
            return Err(format!(
                "unsupported algorithm {other:?}; generate an argon2id hash with `tern auth hash`"
            ))
        }
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(
            "the PHC string has no salt or no hash; generate one with `tern auth hash`".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(pw: &str) -> String {
        hash_password(pw).unwrap()
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

    #[test]
    fn hash_roundtrip() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(check_phc(&h).is_ok());
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "wrong"));
        // A random salt: hashing twice differs.
        assert_ne!(h, hash_password("s3cret").unwrap());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(hash_password(""), Err(HashError::Empty)));
        assert!(check_phc("plaintext").is_err());
        assert!(check_phc("$2b$12$abcdefghijklmnopqrstuv").is_err());
        assert!(!verify_password("garbage", "x"));
    }
}
