//! HAProxy PROXY protocol v1 (text) and v2 (binary) with `smtp.proxy_protocol = true`: the
//! header's source address is the client for every policy decision (here: relay permission).
//! The real peer is always 127.0.0.1, which the tests leave out of `relay.networks`, so an
//! accepted relay can only come from the header. Header addresses are documentation ranges
//! (RFC 5737, RFC 3849); they are only data, no packet goes to them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tern_tests::{queued_id, split_received, SmtpClient, TernServer, LOCAL_DOMAIN};

const TRUSTED_V4: &str = "198.51.100.0/24";
const TRUSTED_V6: &str = "2001:db8:1::/48";

fn server() -> TernServer {
    TernServer::builder()
        .proxy_protocol(true)
        .relay_networks(&[TRUSTED_V4, TRUSTED_V6])
        .relay_domains(&[LOCAL_DOMAIN])
        .start()
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// PROXY protocol v2, command PROXY, TCP over IPv4 or IPv6 (spec §2.2).
fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    let mut addrs = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(0x11); // AF_INET, STREAM
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            h.push(0x21); // AF_INET6, STREAM
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Connect, send the header (in `parts` writes), read the greeting, EHLO, MAIL.
fn proxied_session(server: &TernServer, header: &[u8], parts: usize) -> SmtpClient {
    let mut c = server.connect();
    let chunk = header.len().div_ceil(parts);
    let pieces: Vec<&[u8]> = header.chunks(chunk).collect();
    c.send_split(&pieces, Duration::from_millis(40));
    c.read_reply().expect_code(220);
    c.ehlo("proxied.test").expect_code(250);
    c.cmd("MAIL FROM:<a@proxied.test>").expect("250", "2");
    c
}

fn dst(server: &TernServer) -> SocketAddr {
    server.smtp
}

#[test]
fn v1_trusted_source_may_relay() {
    let server = server();
    let mut c = proxied_session(&server, &v1(sa("198.51.100.9:40000"), dst(&server)), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
}

#[test]
fn v1_untrusted_source_may_not_relay() {
    let server = server();
    let mut c = proxied_session(&server, &v1(sa("203.0.113.7:40000"), dst(&server)), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("554", "5.7.1");
    c.cmd(&format!("RCPT TO:<b@{LOCAL_DOMAIN}>"))
        .expect("250", "2");
}

#[test]
fn v1_tcp6_source_is_used() {
    let server = server();
    let d: SocketAddr = sa("[2001:db8:ffff::1]:25");
    let mut c = proxied_session(&server, &v1(sa("[2001:db8:1::5]:40000"), d), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    let mut c = proxied_session(&server, &v1(sa("[2001:db8:2::5]:40000"), d), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("554", "5.7.1");
}

#[test]
fn v1_header_split_across_writes() {
    let server = server();
    let mut c = proxied_session(&server, &v1(sa("198.51.100.9:40000"), dst(&server)), 3);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
}

#[test]
fn v2_ipv4_trusted_source_may_relay() {
    let server = server();
    let mut c = proxied_session(&server, &v2(sa("198.51.100.9:40000"), dst(&server)), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
}

#[test]
fn v2_ipv4_untrusted_source_may_not_relay() {
    let server = server();
    let mut c = proxied_session(&server, &v2(sa("203.0.113.7:40000"), dst(&server)), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("554", "5.7.1");
}

#[test]
fn v2_ipv6_source_is_used() {
    let server = server();
    let d = sa("[2001:db8:ffff::1]:25");
    let mut c = proxied_session(&server, &v2(sa("[2001:db8:1::5]:40000"), d), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    let mut c = proxied_session(&server, &v2(sa("[2001:db8:2::5]:40000"), d), 1);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("554", "5.7.1");
}

#[test]
fn v2_header_split_across_writes() {
    let server = server();
    let mut c = proxied_session(&server, &v2(sa("198.51.100.9:40000"), dst(&server)), 4);
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
}

#[test]
fn v2_header_followed_by_pipelined_smtp_in_the_same_write() {
    // The bytes after the header belong to the SMTP session and must not be lost.
    let server = server();
    let mut c = server.connect();
    let mut bytes = v2(sa("198.51.100.9:40000"), dst(&server));
    bytes.extend_from_slice(b"EHLO proxied.test\r\n");
    c.send(&bytes);
    c.read_reply().expect_code(220);
    c.read_reply().expect_code(250);
}

#[test]
fn missing_header_gets_no_session() {
    let server = server();
    let mut c = server.connect();
    c.send("EHLO sneaky.test\r\n");
    // Either the server closes, or it answers with an error; never a greeting plus a 250.
    c.set_timeout(Duration::from_secs(10));
    match c.try_read_reply() {
        Err(_) => {}
        Ok(r) => {
            assert!(r.code / 100 != 2, "session without a PROXY header: {r}");
            c.expect_closed(Duration::from_secs(10));
        }
    }
}

#[test]
fn proxy_line_is_an_unknown_command_when_disabled() {
    // With proxy_protocol off, a client cannot claim another address by sending a header.
    let server = TernServer::builder()
        .relay_networks(&[TRUSTED_V4])
        .relay_domains(&[LOCAL_DOMAIN])
        .start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    let r = c.cmd("PROXY TCP4 198.51.100.9 127.0.0.1 40000 25");
    r.expect("500", "5.5.1");
    c.ehlo("spoof.test").expect_code(250);
    c.cmd("MAIL FROM:<a@spoof.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("554", "5.7.1");
}

#[test]
fn per_address_connection_limit_counts_the_proxied_address() {
    // Behind a proxy every connection comes from the proxy's address; the limit must apply to
    // the original client from the header instead.
    let server = TernServer::builder()
        .proxy_protocol(true)
        .set("smtp.max_connections_per_ip", 1)
        .start();
    let open = |src: &str| {
        let mut c = server.connect();
        c.send(v1(sa(src), dst(&server)));
        let r = c.read_reply();
        (c, r)
    };
    let (_a, r) = open("198.51.100.1:40000");
    r.expect_code(220);
    let (_b, r) = open("198.51.100.2:40000");
    r.expect_code(220);
    let (mut c, r) = open("198.51.100.1:40001");
    r.expect("421", "4.7.0");
    c.expect_closed(Duration::from_secs(5));
}

#[test]
fn received_header_shows_the_proxied_client_address() {
    let mut server = server();
    let mut ids = Vec::new();
    for (header, ip) in [
        (v1(sa("198.51.100.9:40000"), dst(&server)), "198.51.100.9"),
        (
            v2(sa("[2001:db8:1::5]:40000"), sa("[2001:db8:ffff::1]:25")),
            "2001:db8:1::5",
        ),
    ] {
        let mut c = proxied_session(&server, &header, 1);
        c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
        c.cmd("DATA").expect_code(354);
        c.send("Subject: proxied\r\n\r\nbody\r\n.\r\n");
        ids.push((queued_id(&c.read_reply()), ip));
    }
    server.stop();
    for (id, ip) in ids {
        let (received, _) = split_received(&server.spooled_text(&id));
        assert!(
            received.contains(ip),
            "proxied address {ip} in {received:?}"
        );
        assert!(
            !received.contains("127.0.0.1"),
            "the proxy's own address leaked into {received:?}"
        );
        assert_eq!(server.spooled_message(&id).client.addr.ip().to_string(), ip);
    }
}
