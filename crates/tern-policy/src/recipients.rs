//! Recipient validation for the domains we serve (`policy.recipients_file`, like Postfix's
//! `relay_recipient_maps`): RCPT to an address of a `relay.domains` domain that the file does not
//! list is refused at once with `550 5.1.1`, instead of being accepted and bounced later (a
//! bounce to a forged sender is backscatter).
//!
//! The file has one entry a line: `user@domain` (that address) or `@domain` (every user of the
//! domain). Blank lines and lines starting with `#` are skipped, and an entry may be followed by
//! whitespace and a `#` comment. Matching ignores case. A relay domain the file does not mention
//! accepts nobody (Postfix does the same): a domain forgotten in the file fails loudly at the
//! first message instead of silently accepting everything. `postmaster@` every domain is always
//! accepted (RFC 5321 §4.5.1).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::PolicyReply;

#[derive(Debug, thiserror::Error)]
pub enum RecipientsError {
    #[error("{}: cannot read the file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The known recipients, loaded once at start and read by every session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecipientMap {
    /// Lower-cased `user@domain`.
    addresses: HashSet<String>,
    /// Lower-cased domains listed as `@domain`.
    domains: HashSet<String>,
}

/// Lower-cased, without a trailing dot.
fn canonical_domain(domain: &str) -> String {
    domain.trim_end_matches('.').to_lowercase()
}

/// Checks one entry and returns it in canonical form (`@domain` or `user@domain`).
fn parse_entry(entry: &str) -> Result<String, String> {
    let Some((local, domain)) = entry.rsplit_once('@') else {
        return Err(format!(
            "{entry:?} is not an address (user@domain) or a domain (@domain)"
        ));
    };
    let domain = canonical_domain(domain);
    if domain.is_empty() || domain.starts_with('.') || domain.contains("..") {
        return Err(format!("{entry:?} has no valid domain"));
    }
    if entry.chars().any(|c| c.is_control()) {
        return Err(format!("{entry:?} contains control characters"));
    }
    Ok(format!("{}@{domain}", local.to_lowercase()))
}

impl RecipientMap {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, RecipientsError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipientsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| RecipientsError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parses the file's text; an error is (1-based line number, reason).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut map = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let entry = words.next().unwrap_or_default();
            if let Some(extra) = words.next() {
                if !extra.starts_with('#') {
                    return Err((
                        i + 1,
                        format!("one address a line, found {extra:?} after {entry:?}"),
                    ));
                }
            }
            let entry = parse_entry(entry).map_err(|reason| (i + 1, reason))?;
            match entry.strip_prefix('@') {
                Some(domain) => map.domains.insert(domain.to_string()),
                None => map.addresses.insert(entry),
            };
        }
        Ok(map)
    }

    /// Whether mail for `address` (`user@domain`, a domain we serve) is accepted.
    pub fn accepts(&self, address: &str) -> bool {
        let Some((local, domain)) = address.rsplit_once('@') else {
            // A bare `postmaster` (the only address without a domain the grammar lets through).
            return address.eq_ignore_ascii_case("postmaster");
        };
        let domain = canonical_domain(domain);
        local.eq_ignore_ascii_case("postmaster")
            || self.domains.contains(&domain)
            || self
                .addresses
                .contains(&format!("{}@{domain}", local.to_lowercase()))
    }

    /// Entries (addresses and domains) in the map.
    pub fn len(&self) -> usize {
        self.addresses.len() + self.domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The refusal for an unknown recipient (Postfix's wording, which operators grep for).
pub fn unknown_user(address: &str) -> PolicyReply {
    PolicyReply::new(
        550,
        (5, 1, 1),
        format!("<{address}>: Recipient address rejected: User unknown"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# Known users of example.org
alice@example.org
Bob@Example.ORG   # mixed case in the file
\t
@catchall.example.net
carol@example.org.
";

    #[test]
    fn listed_addresses_and_wildcard_domains_case_insensitively() {
        let map = RecipientMap::parse(FILE).unwrap();
        assert_eq!(map.len(), 4);
        assert!(map.accepts("alice@example.org"));
        assert!(map.accepts("ALICE@example.ORG"));
        assert!(map.accepts("bob@example.org"));
        assert!(map.accepts("carol@example.org"));
        assert!(map.accepts("carol@EXAMPLE.org."));
        assert!(map.accepts("anyone@catchall.example.net"));
        assert!(map.accepts("x@CatchAll.Example.Net"));
        assert!(!map.accepts("mallory@example.org"));
        // A subdomain is another domain.
        assert!(!map.accepts("x@sub.catchall.example.net"));
        // A domain the file never mentions accepts nobody.
        assert!(!map.accepts("alice@example.com"));
    }

    #[test]
    fn postmaster_is_always_accepted() {
        let map = RecipientMap::default();
        assert!(map.is_empty());
        assert!(map.accepts("postmaster"));
        assert!(map.accepts("PostMaster"));
        assert!(map.accepts("postmaster@example.org"));
        assert!(map.accepts("POSTMASTER@unlisted.example"));
        assert!(!map.accepts("webmaster@example.org"));
        assert!(!map.accepts("someone"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, line, needle) in [
            ("alice@example.org\nbob\n", 2, "not an address"),
            ("alice@\n", 1, "no valid domain"),
            ("a@b..c\n", 1, "no valid domain"),
            (
                "# c\n\nalice@example.org bob@example.org\n",
                3,
                "one address a line",
            ),
        ] {
            let (n, reason) = RecipientMap::parse(text).unwrap_err();
            assert_eq!(n, line, "{text:?}");
            assert!(reason.contains(needle), "{text:?}: {reason}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.txt");
        let e = RecipientMap::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.txt") && e.contains("cannot read"),
            "{e}"
        );
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "ok@example.org\nnot-an-address\n").unwrap();
        let e = RecipientMap::load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.txt: line 2:"), "{e}");
        let good = dir.path().join("good.txt");
        std::fs::write(&good, "ok@example.org\n").unwrap();
        assert!(RecipientMap::load(&good).unwrap().accepts("OK@example.org"));
    }

    #[test]
    fn the_refusal_is_550_5_1_1_naming_the_address() {
        let r = unknown_user("x@example.org");
        assert_eq!((r.code, r.enhanced), (550, (5, 1, 1)));
        assert_eq!(
            r.text,
            "<x@example.org>: Recipient address rejected: User unknown"
        );
    }
}
