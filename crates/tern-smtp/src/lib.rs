//! SMTP grammar with no I/O: no sockets, no runtime, no files.
//!
//! Everything here works on byte slices and [`bytes::BytesMut`] buffers that the caller filled,
//! so the same code serves the server's session actor, the delivery client and the fuzzers:
//!
//! - [`line::LineReader`] cuts command lines out of whatever bytes arrived;
//! - [`command::parse_command`] turns one line into a [`command::Command`], and
//!   [`command::Command::write_to`] does the reverse for the client side;
//! - [`address`] parses RFC 5321 / RFC 6531 paths;
//! - [`data::DataReceiver`] and [`data::BdatReceiver`] decode message content;
//! - [`reply`] builds server replies and parses them on the client side;
//! - [`limits`] holds the RFC line-length allowances.
//!
//! The envelope parameter types [`BodyType`], [`Ret`] and [`Notify`] live here (and are
//! re-exported by `tern-message`) because both the grammar and the stage messages need them.

pub mod address;
pub mod command;
pub mod data;
mod error;
pub mod limits;
pub mod line;
pub mod reply;
#[cfg(test)]
mod testutil;
pub mod xtext;

pub use error::ParseError;
pub use limits::*;

use serde::{Deserialize, Serialize};

/// RFC 6152 / RFC 3030 body type declared with `MAIL FROM:<…> BODY=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
    BinaryMime,
}

impl BodyType {
    /// The `BODY=` value as it goes on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }

    /// Parses a `BODY=` value; the keyword values are case-insensitive (RFC 5321 §2.4).
    pub fn from_param(value: &str) -> Option<Self> {
        if value.eq_ignore_ascii_case("7BIT") {
            Some(BodyType::SevenBit)
        } else if value.eq_ignore_ascii_case("8BITMIME") {
            Some(BodyType::EightBitMime)
        } else if value.eq_ignore_ascii_case("BINARYMIME") {
            Some(BodyType::BinaryMime)
        } else {
            None
        }
    }
}

/// RFC 3461 `RET=`: how much of the original message a failure DSN carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }

    pub fn from_param(value: &str) -> Option<Self> {
        if value.eq_ignore_ascii_case("FULL") {
            Some(Ret::Full)
        } else if value.eq_ignore_ascii_case("HDRS") {
            Some(Ret::Hdrs)
        } else {
            None
        }
    }
}

/// RFC 3461 `NOTIFY=`. `None` where a `Notify` is optional means the parameter was absent, which
/// RFC 3461 §4.1 says to treat as `FAILURE,DELAY` at the MTA's discretion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// Parses a `NOTIFY=` value: `NEVER` alone, or a comma list of `SUCCESS`, `FAILURE` and
    /// `DELAY` (RFC 3461 §4.1), case-insensitively. `None` for anything else, including `NEVER`
    /// combined with another keyword and an empty list element.
    pub fn from_param(value: &str) -> Option<Self> {
        if value.eq_ignore_ascii_case("NEVER") {
            return Some(Notify::NEVER);
        }
        let mut notify = Notify::NEVER;
        for item in value.split(',') {
            if item.eq_ignore_ascii_case("SUCCESS") {
                notify.success = true;
            } else if item.eq_ignore_ascii_case("FAILURE") {
                notify.failure = true;
            } else if item.eq_ignore_ascii_case("DELAY") {
                notify.delay = true;
            } else {
                return None;
            }
        }
        Some(notify)
    }

    /// The `NOTIFY=` value as it goes on the wire (`NEVER` when no flag is set).
    pub fn to_param(&self) -> String {
        let mut parts = Vec::with_capacity(3);
        if self.success {
            parts.push("SUCCESS");
        }
        if self.failure {
            parts.push("FAILURE");
        }
        if self.delay {
            parts.push("DELAY");
        }
        if parts.is_empty() {
            "NEVER".to_string()
        } else {
            parts.join(",")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_never_must_stand_alone() {
        assert_eq!(Notify::from_param("never"), Some(Notify::NEVER));
        assert_eq!(Notify::from_param("NEVER,SUCCESS"), None);
        assert_eq!(Notify::from_param("SUCCESS,NEVER"), None);
    }

    #[test]
    fn notify_list_is_case_insensitive_and_round_trips() {
        let n = Notify::from_param("success,Delay").unwrap();
        assert_eq!(
            n,
            Notify {
                success: true,
                failure: false,
                delay: true
            }
        );
        assert_eq!(Notify::from_param(&n.to_param()), Some(n));
        assert_eq!(Notify::NEVER.to_param(), "NEVER");
    }

    #[test]
    fn notify_rejects_empty_elements() {
        assert_eq!(Notify::from_param(""), None);
        assert_eq!(Notify::from_param("SUCCESS,"), None);
        assert_eq!(Notify::from_param("BOGUS"), None);
    }

    #[test]
    fn body_and_ret_values_are_case_insensitive() {
        assert_eq!(
            BodyType::from_param("8bitmime"),
            Some(BodyType::EightBitMime)
        );
        assert_eq!(
            BodyType::from_param("BinaryMIME"),
            Some(BodyType::BinaryMime)
        );
        assert_eq!(BodyType::from_param("7bit"), Some(BodyType::SevenBit));
        assert_eq!(BodyType::from_param("8bit"), None);
        assert_eq!(Ret::from_param("hdrs"), Some(Ret::Hdrs));
        assert_eq!(Ret::from_param("full"), Some(Ret::Full));
        assert_eq!(Ret::from_param("all"), None);
    }

    #[test]
    fn envelope_types_serialize_as_before_the_move() {
        // tern-message stored these with the same derives; the JSON shape must not change.
        assert_eq!(
            serde_json::to_string(&BodyType::EightBitMime).unwrap(),
            "\"EightBitMime\""
        );
        assert_eq!(serde_json::to_string(&Ret::Hdrs).unwrap(), "\"Hdrs\"");
        assert_eq!(
            serde_json::to_string(&Notify::NEVER).unwrap(),
            r#"{"success":false,"failure":false,"delay":false}"#
        );
    }
}
