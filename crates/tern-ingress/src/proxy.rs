//! PROXY protocol v1/v2 (HAProxy): a load balancer in front of the cluster tells us who the real
//! client is, and that address — not the balancer's — drives relay checks, limits and the
//! Received header.

use std::net::SocketAddr;

use ppp::{v1, v2, HeaderResult, PartialResult};

/// v1 headers are at most 107 octets; v2 is 16 octets plus a length field, and nothing a
/// balancer sends before SMTP needs more than this.
pub const MAX_HEADER: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum ProxyParse {
    /// More bytes are needed.
    Incomplete,
    /// A header of `len` octets; `source` is `None` for LOCAL/UNKNOWN (health checks), in which
    /// case the TCP peer is the client.
    Complete {
        len: usize,
        source: Option<SocketAddr>,
    },
    Invalid(String),
}

pub fn parse(input: &[u8]) -> ProxyParse {
    if input.len() > MAX_HEADER {
        return ProxyParse::Invalid("header too long".into());
    }
    let result = HeaderResult::parse(input);
    if result.is_incomplete() {
        return ProxyParse::Incomplete;
    }
    match result {
        HeaderResult::V1(Ok(header)) => {
            let source = match header.addresses {
                v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v1::Addresses::Unknown => None,
            };
            ProxyParse::Complete {
                len: header.header.len(),
                source,
            }
        }
        HeaderResult::V2(Ok(header)) => {
            let source = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                _ => None,
            };
            ProxyParse::Complete {
                len: header.header.len(),
                source,
            }
        }
        HeaderResult::V1(Err(e)) => ProxyParse::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => ProxyParse::Invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_header_gives_the_source() {
        let input = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(input),
            ProxyParse::Complete {
                len: 44,
                source: Some("198.51.100.7:40000".parse().unwrap())
            }
        );
    }

    #[test]
    fn v1_partial_header_is_incomplete() {
        assert_eq!(parse(b"PROXY TCP4 198.51"), ProxyParse::Incomplete);
    }

    #[test]
    fn v1_unknown_uses_the_peer() {
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            ProxyParse::Complete {
                len: 15,
                source: None
            }
        );
    }

    #[test]
    fn v2_proxy_header_gives_the_source() {
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (
                "203.0.113.9:5555".parse::<SocketAddr>().unwrap(),
                "192.0.2.1:25".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut input = header.clone();
        input.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&input),
            ProxyParse::Complete {
                len: header.len(),
                source: Some("203.0.113.9:5555".parse().unwrap())
            }
        );
        assert_eq!(parse(&header[..10]), ProxyParse::Incomplete);
    }

    #[test]
    fn garbage_is_invalid() {
        assert!(matches!(
            parse(b"EHLO client.example\r\n"),
            ProxyParse::Invalid(_)
        ));
    }
}
