//! The suppression list: addresses that must not be mailed (hard bounces, complaints,
//! unsubscribes), in a sled database of its own under the data directory. Bulk senders need it:
//! mailing an address that bounced hard again and again is what gets a sender blocked.
//!
//! Keys are `tenant NUL lowercased-address`; one tenant (`default`) for now, so the layout is
//! ready for per-tenant lists.

use std::path::Path;

use serde::{Deserialize, Serialize};

const DEFAULT_TENANT: &str = "default";

/// One suppressed address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed {
    pub address: String,
    /// `bounce` (added by delivery after a 5.1.x failure), `manual` or `import`.
    pub source: String,
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub added_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("suppression list storage: {0}")]
    Storage(String),
    #[error("not an email address: {0:?}")]
    BadAddress(String),
}

fn storage(e: impl std::fmt::Display) -> SuppressionError {
    SuppressionError::Storage(e.to_string())
}

/// The list, backed by sled. Cloning is cheap and shares the database (sessions look up
/// recipients directly; the actor writes).
#[derive(Clone)]
pub struct SuppressionList {
    db: sled::Db,
}

/// The canonical form of an address for the list: trimmed, without angle brackets, lowercased
/// (local parts are case-sensitive in theory, never in practice at the providers that matter).
pub fn normalize(address: &str) -> Result<String, SuppressionError> {
    let a = address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    let ok = match a.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && !domain.is_empty(),
        None => false,
    } && !a.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(SuppressionError::BadAddress(address.to_string()));
    }
    Ok(a.to_lowercase())
}

fn key(address: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(DEFAULT_TENANT.len() + 1 + address.len());
    k.extend_from_slice(DEFAULT_TENANT.as_bytes());
    k.push(0);
    k.extend_from_slice(address.as_bytes());
    k
}

impl SuppressionList {
    /// Opens (creating) the list in `dir`.
    pub fn open(dir: &Path) -> Result<Self, SuppressionError> {
        let db = sled::Config::new().path(dir).open().map_err(storage)?;
        Ok(Self { db })
    }

    pub fn contains(&self, address: &str) -> bool {
        normalize(address)
            .ok()
            .and_then(|a| self.db.contains_key(key(&a)).ok())
            .unwrap_or(false)
    }

    /// Adds (or replaces) an entry; flushed to disk before returning, since an operator or a
    /// bounce expects it to stick.
    pub fn add(&self, entry: &Suppressed) -> Result<(), SuppressionError> {
        let address = normalize(&entry.address)?;
        let value = serde_json::to_vec(&Suppressed {
            address: address.clone(),
            ..entry.clone()
        })
        .map_err(storage)?;
        self.db.insert(key(&address), value).map_err(storage)?;
        self.db.flush().map_err(storage)?;
        Ok(())
    }

    /// Adds many entries with one flush; answers how many were added.
    pub fn add_many(&self, entries: &[Suppressed]) -> Result<usize, SuppressionError> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let address = normalize(&entry.address)?;
            let value = serde_json::to_vec(&Suppressed {
                address: address.clone(),
                ..entry.clone()
            })
            .map_err(storage)?;
            batch.insert(key(&address), value);
        }
        self.db.apply_batch(batch).map_err(storage)?;
        self.db.flush().map_err(storage)?;
        Ok(entries.len())
    }

    /// Removes an address; answers whether it was listed.
    pub fn remove(&self, address: &str) -> Result<bool, SuppressionError> {
        let address = normalize(address)?;
        let existed = self.db.remove(key(&address)).map_err(storage)?.is_some();
        self.db.flush().map_err(storage)?;
        Ok(existed)
    }

    /// Entries in address order, at most `limit` (0: all).
    pub fn list(&self, limit: usize) -> Vec<Suppressed> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut prefix = DEFAULT_TENANT.as_bytes().to_vec();
        prefix.push(0);
        self.db
            .scan_prefix(prefix)
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .take(limit)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.db.len()
    }

    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(address: &str) -> Suppressed {
        Suppressed {
            address: address.into(),
            source: "manual".into(),
            reason: "test".into(),
            added_ms: 1,
        }
    }

    #[test]
    fn add_contains_remove_list_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let list = SuppressionList::open(dir.path()).unwrap();
            list.add(&entry("<Bob@Example.NET>")).unwrap();
            assert!(list.contains("bob@example.net"));
            assert!(list.contains("BOB@example.net"));
            assert!(!list.contains("alice@example.net"));
            assert_eq!(
                list.add_many(&[entry("a@x.test"), entry("c@x.test")])
                    .unwrap(),
                2
            );
            let all: Vec<String> = list.list(0).into_iter().map(|e| e.address).collect();
            assert_eq!(all, ["a@x.test", "bob@example.net", "c@x.test"]);
            assert!(list.remove("A@x.test").unwrap());
            assert!(!list.remove("a@x.test").unwrap());
        }
        let list = SuppressionList::open(dir.path()).unwrap();
        assert_eq!(list.len(), 2, "kept across a reopen");
        assert!(matches!(
            list.add(&entry("not an address")),
            Err(SuppressionError::BadAddress(_))
        ));
    }
}
