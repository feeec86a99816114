//! Password hashes for SMTP AUTH users: what `tern auth hash` prints and
//! what the config check accepts.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

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
pub(crate) fn check_phc(phc: &str) -> Result<(), String> {
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
