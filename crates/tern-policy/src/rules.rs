//! Content rules: a TOML file of scored tests on headers, body text and the authentication
//! results, summed into a message score (SpamAssassin's model, small). The policy stage compares
//! the score with `reject_score` (550 5.7.1) and `quarantine_score` (hold) and reports it in an
//! `X-Tern-Score:` field.
//!
//! ```toml
//! [[rule]]
//! name = "SUBJECT_LOTTERY"          # upper-case identifier, reported in X-Tern-Score
//! header = "Subject"                # every field of that name, unfolded and RFC 2047-decoded
//! pattern = "(?i)lottery|jackpot"   # Rust regex syntax
//! score = 2.5
//!
//! [[rule]]
//! name = "BODY_WIRE_TRANSFER"
//! body = "(?i)western union|wire transfer"   # text parts, decoded (QP, base64, charset)
//! score = 1.5
//!
//! [[rule]]
//! name = "SPF_FAIL"
//! check = "spf_fail"                # a named fact, see [`Check`]
//! score = 3.0
//! ```
//!
//! A negative score is allowed (a rule that vouches for mail). Without `policy.rules_file` the
//! built-in rules (`default-rules.toml`, checks only, no content guesses) apply.

use std::path::Path;

use mail_parser::{HeaderName, HeaderValue, MessageParser};
use regex::Regex;
use serde::Deserialize;

use crate::auth::{AuthReport, AuthStatus};

/// The built-in rule set.
pub const DEFAULT_RULES: &str = include_str!("default-rules.toml");

/// Body text beyond this many bytes per part is not scanned (SpamAssassin stops at 500 KB too):
/// a rule worth having fires early, and a 10 MB attachment-sized text part must not cost a
/// regex pass per rule.
pub const BODY_SCAN_LIMIT: usize = 512 * 1024;

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("rule {name}: {message}")]
    Rule { name: String, message: String },
}

/// Facts a rule can test by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    SpfFail,
    SpfSoftfail,
    SpfNone,
    /// A DKIM signature is present and none verified.
    DkimFail,
    /// No DKIM signature at all.
    DkimNone,
    DmarcFail,
    ArcFail,
    MissingDate,
    MissingMessageId,
    MissingSubject,
    /// Neither To nor Cc.
    MissingTo,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    score: f64,
    header: Option<String>,
    pattern: Option<String>,
    body: Option<String>,
    check: Option<Check>,
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug)]
enum Test {
    Header { name: String, pattern: Regex },
    Body(Regex),
    Check(Check),
}

#[derive(Debug)]
struct Rule {
    name: String,
    score: f64,
    test: Test,
}

/// A loaded rule set.
#[derive(Debug)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// A message's score and the rules that fired, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Score {
    pub total: f64,
    pub hits: Vec<(String, f64)>,
}

impl Score {
    /// The `X-Tern-Score:` field: `3.5 (SPF_FAIL=3, MISSING_DATE=0.5)`.
    pub fn header(&self) -> String {
        let hits: Vec<String> = self
            .hits
            .iter()
            .map(|(name, score)| format!("{name}={score}"))
            .collect();
        format!("X-Tern-Score: {:.1} ({})\r\n", self.total, hits.join(", "))
    }
}

impl Rules {
    /// The built-in set.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_RULES).expect("the built-in rules are valid")
    }

    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let file: RuleFile = toml::from_str(text).map_err(|e| RulesError::Parse(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rule.len());
        for spec in file.rule {
            let bad = |message: &str| RulesError::Rule {
                name: spec.name.clone(),
                message: message.to_string(),
            };
            if spec.name.is_empty()
                || !spec
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(bad("name must be letters, digits and _"));
            }
            if !spec.score.is_finite() {
                return Err(bad("score must be a number"));
            }
            let regex = |p: &str| Regex::new(p).map_err(|e| bad(&format!("bad pattern: {e}")));
            let test = match (&spec.header, &spec.pattern, &spec.body, spec.check) {
                (Some(name), Some(pattern), None, None) => Test::Header {
                    name: name.to_ascii_lowercase(),
                    pattern: regex(pattern)?,
                },
                (None, None, Some(body), None) => Test::Body(regex(body)?),
                (None, None, None, Some(check)) => Test::Check(check),
                _ => return Err(bad("needs exactly one of: header + pattern, body, check")),
            };
            rules.push(Rule {
                name: spec.name,
                score: spec.score,
                test,
            });
        }
        Ok(Self { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Scores `message` (the content as received) given what authentication found.
    pub fn score(&self, message: &[u8], auth: &AuthReport) -> Score {
        let mut score = Score::default();
        if self.rules.is_empty() {
            return score;
        }
        // MIME fields to find the text parts; Subject decoded (RFC 2047); every other field
        // raw, so a pattern sees what the sender wrote.
        // Parsing is the expensive part; the fact checks need only the field names.
        let needs_parse = self.rules.iter().any(|r| !matches!(r.test, Test::Check(_)));
        let parsed = needs_parse
            .then(|| {
                MessageParser::new()
                    .with_mime_headers()
                    .header_text(HeaderName::Subject)
                    .parse(message)
            })
            .flatten();
        let needs_body = self.rules.iter().any(|r| matches!(r.test, Test::Body(_)));
        let mut texts: Vec<String> = Vec::new();
        if let (Some(m), true) = (&parsed, needs_body) {
            for part in m.text_bodies().chain(m.html_bodies()) {
                if let Some(text) = part.text_contents() {
                    let mut end = text.len().min(BODY_SCAN_LIMIT);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    texts.push(text[..end].to_string());
                }
            }
            texts.dedup();
        }
        let header = crate::headers::header_section(message);
        let has = |name: &str| crate::headers::count(header, name.as_bytes()) > 0;
        for rule in &self.rules {
            let fired = match &rule.test {
                Test::Check(check) => match check {
                    Check::SpfFail => auth.spf == AuthStatus::Fail,
                    Check::SpfSoftfail => auth.spf == AuthStatus::SoftFail,
                    Check::SpfNone => auth.spf == AuthStatus::None,
                    Check::DkimFail => !matches!(auth.dkim, AuthStatus::Pass | AuthStatus::None),
                    Check::DkimNone => auth.dkim == AuthStatus::None,
                    Check::DmarcFail => auth.dmarc == AuthStatus::Fail,
                    Check::ArcFail => auth.arc == AuthStatus::Fail,
                    Check::MissingDate => !has("date"),
                    Check::MissingMessageId => !has("message-id"),
                    Check::MissingSubject => !has("subject"),
                    Check::MissingTo => !has("to") && !has("cc"),
                },
                Test::Header { name, pattern } => parsed.as_ref().is_some_and(|m| {
                    m.headers()
                        .iter()
                        .filter(|h| h.name.as_str().eq_ignore_ascii_case(name))
                        .any(|h| {
                            let value = match h.value() {
                                HeaderValue::Text(t) => unfold(t.as_bytes()),
                                HeaderValue::TextList(l) => unfold(l.join(", ").as_bytes()),
                                _ => unfold(
                                    message
                                        .get(h.offset_start() as usize..h.offset_end() as usize)
                                        .unwrap_or_default(),
                                ),
                            };
                            pattern.is_match(&value)
                        })
                }),
                Test::Body(pattern) => texts.iter().any(|t| pattern.is_match(t)),
            };
            if fired {
                score.total += rule.score;
                score.hits.push((rule.name.clone(), rule.score));
            }
        }
        score
    }
}

/// A raw field value on one line (RFC 5322 §2.2.3 unfolding), surrounding space trimmed.
fn unfold(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.replace("\r\n", "")
        .replace('\n', "")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: =?utf-8?q?You_won_the_LOTTERY?=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nPlease send a wire=20transfer today.\r\n";

    fn auth(spf: AuthStatus) -> AuthReport {
        AuthReport {
            spf,
            ..AuthReport::default()
        }
    }

    #[test]
    fn header_body_and_check_rules_score() {
        let rules = Rules::parse(
            r#"
[[rule]]
name = "SUBJECT_LOTTERY"
header = "subject"
pattern = "(?i)lottery"
score = 2.5
[[rule]]
name = "BODY_WIRE"
body = "(?i)wire transfer"
score = 1.5
[[rule]]
name = "SPF_FAIL"
check = "spf_fail"
score = 3
[[rule]]
name = "NO_DATE"
check = "missing_date"
score = 0.5
[[rule]]
name = "GOOD_FROM"
header = "From"
pattern = "@example\\.org"
score = -1
"#,
        )
        .unwrap();
        let s = rules.score(MSG, &auth(AuthStatus::Fail));
        // The subject matched decoded (RFC 2047), the body decoded (quoted-printable).
        assert_eq!(
            s.hits.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            [
                "SUBJECT_LOTTERY",
                "BODY_WIRE",
                "SPF_FAIL",
                "NO_DATE",
                "GOOD_FROM"
            ]
        );
        assert_eq!(s.total, 6.5);
        assert_eq!(
            s.header(),
            "X-Tern-Score: 6.5 (SUBJECT_LOTTERY=2.5, BODY_WIRE=1.5, SPF_FAIL=3, NO_DATE=0.5, GOOD_FROM=-1)\r\n"
        );
        let s = rules.score(MSG, &auth(AuthStatus::Pass));
        assert_eq!(s.total, 3.5);
    }

    #[test]
    fn bad_rules_are_named() {
        for (text, want) in [
            (
                "[[rule]]\nname = \"A\"\nscore = 1\n",
                "rule A: needs exactly one",
            ),
            (
                "[[rule]]\nname = \"B\"\nbody = \"(\"\nscore = 1\n",
                "rule B: bad pattern",
            ),
            (
                "[[rule]]\nname = \"C\"\ncheck = \"spf_maybe\"\nscore = 1\n",
                "spf_maybe",
            ),
            (
                "[[rule]]\nname = \"bad name\"\nbody = \"x\"\nscore = 1\n",
                "rule bad name: name",
            ),
            ("[[rules]]\n", "unknown field"),
        ] {
            let e = Rules::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn builtin_rules_load() {
        let rules = Rules::builtin();
        assert!(!rules.is_empty());
        let s = rules.score(MSG, &auth(AuthStatus::None));
        assert!(s.hits.iter().any(|(n, _)| n == "MISSING_DATE"), "{s:?}");
    }
}
