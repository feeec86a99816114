//! xtext (RFC 3461 §4): the encoding of the `ENVID=`, `ORCPT=` and `AUTH=` values.
//!
//! ```text
//! xtext   = *( xchar / hexchar )
//! xchar   = any ASCII CHAR between "!" (33) and "~" (126) inclusive, except "+" and "="
//! hexchar = "+" 2(%x30-39 / %x41-46)   ; the octet's value in upper-case hex
//! ```

/// Whether `s` is well-formed xtext. Lower-case hex digits are accepted too: nothing is
/// ambiguous about them and refusing a DSN request over them would help nobody.
pub fn is_valid(s: &str) -> bool {
    decode_bytes(s).is_some()
}

/// Decodes xtext; `None` if it is malformed or does not decode to UTF-8.
pub fn decode(s: &str) -> Option<String> {
    String::from_utf8(decode_bytes(s)?).ok()
}

/// Decodes xtext to raw octets; `None` if it is malformed.
pub fn decode_bytes(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'=' => return None,
            b @ 33..=126 => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Encodes `s` as xtext: octets outside `!`..`~`, and `+` and `=`, become `+XX`.
pub fn encode(s: &str) -> String {
    encode_bytes(s.as_bytes())
}

/// [`encode`] for raw octets.
pub fn encode_bytes(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_escapes_plus_equals_space_and_non_ascii() {
        assert_eq!(encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(encode("ü"), "+C3+BC");
        assert_eq!(encode("plain@example.org"), "plain@example.org");
        assert_eq!(encode(""), "");
    }

    #[test]
    fn decode_reverses_encode() {
        for s in ["a+b=c d", "ü@bücher.example", "", "<>", "~!\t\r\n"] {
            assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn decode_accepts_lower_case_hex() {
        assert_eq!(decode("a+2bb").as_deref(), Some("a+b"));
    }

    #[test]
    fn decode_refuses_malformed_xtext() {
        for bad in ["a=b", "a b", "+2", "+", "+G0", "a\u{7f}", "ü"] {
            assert_eq!(decode(bad), None, "{bad:?}");
            assert!(!is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn decode_refuses_non_utf8_but_decode_bytes_takes_it() {
        assert_eq!(decode("+FF"), None);
        assert_eq!(decode_bytes("+FF"), Some(vec![0xFF]));
        assert!(is_valid("+FF"));
    }
}
