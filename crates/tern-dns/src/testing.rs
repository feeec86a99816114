//! A real, authoritative DNS server on loopback for tests.
//!
//! Tests point an [`MxResolver`](crate::MxResolver) (or any resolver) at
//! [`TestDns::addr`] instead of mocking DNS, so the code under test sends real
//! queries over UDP and TCP and parses real answers.
//!
//! ```no_run
//! use tern_dns::testing::{TestDns, TestZone};
//! let dns = TestDns::start(
//!     TestZone::new()
//!         .mx("example.test", 10, "mx.example.test")
//!         .a("mx.example.test", "192.0.2.25".parse().unwrap()),
//! );
//! let resolver = tern_dns::MxResolver::new(Some(vec![dns.addr()]), true).unwrap();
//! ```
//!
//! The server is authoritative for the root zone, so every name not in the
//! zone gets NXDOMAIN (with an SOA, so resolvers cache the negative answer,
//! RFC 2308), and names marked with [`TestZone::servfail`] get SERVFAIL.
//! It runs on its own thread and Tokio runtime, so it works from sync tests,
//! `#[tokio::test]` and actix tests alike, and stops when dropped.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_server::authority::{Catalog, MessageResponseBuilder, ZoneType};
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, PTR, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryAuthority;
use hickory_server::ServerFuture;

/// TTL of every record in a [`TestZone`], and the SOA minimum (negative TTL).
///
/// Long enough that a test's second lookup is answered from the resolver's
/// cache, short enough to mean nothing outside a test.
pub const TEST_TTL: u32 = 300;

/// Records for a [`TestDns`]; names are taken as fully qualified.
#[derive(Debug, Clone, Default)]
pub struct TestZone {
    records: Vec<Record>,
    servfail: HashSet<LowerName>,
    /// Overrides [`TEST_TTL`] for every record (not the negative TTL).
    ttl: Option<u32>,
}

fn name(s: &str) -> Name {
    let mut n = Name::from_str(s).unwrap_or_else(|e| panic!("bad test DNS name {s:?}: {e}"));
    n.set_fqdn(true);
    n
}

impl TestZone {
    /// An empty zone: every name is NXDOMAIN.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves every record with this TTL instead of [`TEST_TTL`]; 0 keeps resolvers from
    /// caching, so [`TestDns::queries`] counts every lookup the code makes.
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = Some(ttl);
        self
    }

    fn record(mut self, owner: &str, rdata: RData) -> Self {
        self.records
            .push(Record::from_rdata(name(owner), TEST_TTL, rdata));
        self
    }

    /// An MX record `domain. MX pref host.`.
    pub fn mx(self, domain: &str, preference: u16, host: &str) -> Self {
        self.record(domain, RData::MX(MX::new(preference, name(host))))
    }

    /// A null MX (`domain. MX 0 .`, RFC 7505).
    pub fn null_mx(self, domain: &str) -> Self {
        self.record(domain, RData::MX(MX::new(0, Name::root())))
    }

    /// An A record.
    pub fn a(self, host: &str, ip: Ipv4Addr) -> Self {
        self.record(host, RData::A(A(ip)))
    }

    /// An AAAA record.
    pub fn aaaa(self, host: &str, ip: Ipv6Addr) -> Self {
        self.record(host, RData::AAAA(AAAA(ip)))
    }

    /// A CNAME record `alias. CNAME target.`.
    pub fn cname(self, alias: &str, target: &str) -> Self {
        self.record(
            alias,
            RData::CNAME(hickory_server::proto::rr::rdata::CNAME(name(target))),
        )
    }

    /// A TXT record with one character-string (SPF, DKIM, DMARC). Strings
    /// longer than 255 octets are split into 255-octet pieces, as RFC 7208
    /// §3.3 expects publishers to do.
    pub fn txt(self, owner: &str, text: &str) -> Self {
        let pieces = text
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>();
        self.record(owner, RData::TXT(TXT::new(pieces)))
    }

    /// Every query for `owner` (any type) gets SERVFAIL.
    pub fn servfail(mut self, owner: &str) -> Self {
        self.servfail.insert(LowerName::from(name(owner)));
        self
    }

    /// A PTR record for `ip` (its `in-addr.arpa` or `ip6.arpa` name) pointing at `host`.
    pub fn ptr(mut self, ip: IpAddr, host: &str) -> Self {
        self.records.push(Record::from_rdata(
            reverse_name(ip),
            TEST_TTL,
            RData::PTR(PTR(name(host))),
        ));
        self
    }

    /// Every reverse lookup of `ip` gets SERVFAIL.
    pub fn servfail_ptr(mut self, ip: IpAddr) -> Self {
        self.servfail.insert(LowerName::from(reverse_name(ip)));
        self
    }
}

/// `7.2.0.192.in-addr.arpa.` for 192.0.2.7; nibbles under `ip6.arpa.` for IPv6.
fn reverse_name(ip: IpAddr) -> Name {
    let mut n = Name::from(ip);
    n.set_fqdn(true);
    n
}

/// Catalog plus the SERVFAIL list and the log of questions asked.
struct Handler {
    catalog: Catalog,
    servfail: HashSet<LowerName>,
    asked: Arc<Mutex<Vec<(LowerName, RecordType)>>>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let query = request.query();
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((query.name().clone(), query.query_type()));
        if self.servfail.contains(request.query().name()) {
            let response = MessageResponseBuilder::from_message_request(request)
                .error_msg(request.header(), ResponseCode::ServFail);
            return match response_handle.send_response(response).await {
                Ok(info) => info,
                Err(e) => {
                    tracing::debug!(error = %e, "test DNS: sending SERVFAIL failed");
                    let mut header = Header::response_from_request(request.header());
                    header.set_response_code(ResponseCode::ServFail);
                    header.into()
                }
            };
        }
        self.catalog.handle_request(request, response_handle).await
    }
}

/// A running test DNS server on `127.0.0.1:<ephemeral>` (UDP and TCP on the
/// same port). Stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<(LowerName, RecordType)>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds UDP and TCP on the same free loopback port.
fn bind_pair() -> (UdpSocket, TcpListener) {
    // The ephemeral UDP port may be taken for TCP by someone else; retry a
    // few times rather than fail a test on an unlucky draw.
    let mut last_err = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind test DNS UDP socket");
        let addr = udp.local_addr().expect("test DNS UDP address");
        match TcpListener::bind(addr) {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last_err = Some(e),
        }
    }
    panic!("no free port for the test DNS server: {last_err:?}");
}

impl TestDns {
    /// Starts serving `zone`; returns once the sockets are bound, so queries
    /// may be sent right away.
    pub fn start(zone: TestZone) -> TestDns {
        let origin = Name::root();
        let mut authority = InMemoryAuthority::empty(origin.clone(), ZoneType::Primary, false);
        let serial = 1;
        // The SOA makes NXDOMAIN/NODATA answers authoritative and cacheable
        // (RFC 2308 §3: negative TTL = min(SOA TTL, SOA minimum)).
        authority.upsert_mut(
            Record::from_rdata(
                origin.clone(),
                TEST_TTL,
                RData::SOA(SOA::new(
                    name("ns.test"),
                    name("hostmaster.test"),
                    serial,
                    3600,
                    600,
                    86400,
                    TEST_TTL,
                )),
            ),
            serial,
        );
        for mut record in zone.records {
            if let Some(ttl) = zone.ttl {
                record.set_ttl(ttl);
            }
            authority.upsert_mut(record, serial);
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(origin), Box::new(Arc::new(authority)));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let handler = Handler {
            catalog,
            servfail: zone.servfail,
            asked: asked.clone(),
        };

        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("test DNS address");
        udp.set_nonblocking(true).expect("nonblocking UDP");
        tcp.set_nonblocking(true).expect("nonblocking TCP");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tern-test-dns".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("test DNS runtime");
                runtime.block_on(async move {
                    let mut server = ServerFuture::new(handler);
                    server.register_socket(
                        tokio::net::UdpSocket::from_std(udp).expect("tokio UDP socket"),
                    );
                    server.register_listener(
                        tokio::net::TcpListener::from_std(tcp).expect("tokio TCP listener"),
                        Duration::from_secs(5),
                    );
                    // Either a stop request or the TestDns being dropped.
                    let _ = stop_rx.await;
                    let _ = server.shutdown_gracefully().await;
                });
                // Dropping the runtime drops the server tasks and closes the
                // sockets, so later queries see "connection refused".
            })
            .expect("spawn test DNS thread");
        tracing::debug!(%addr, "test DNS server started");
        TestDns {
            addr,
            asked,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many queries for `owner` of type `rtype` (e.g. `"MX"`) the server has answered.
    pub fn queries(&self, owner: &str, rtype: &str) -> usize {
        let owner = LowerName::from(name(owner));
        let rtype = RecordType::from_str(rtype)
            .unwrap_or_else(|e| panic!("bad record type {rtype:?}: {e}"));
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(n, t)| *n == owner && *t == rtype)
            .count()
    }

    /// Stops the server and waits until its sockets are closed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.shutdown();
    }
}
