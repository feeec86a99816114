//! A loopback DNS server for the benchmark scripts (which must never reach a resolver off
//! loopback): serves the records named on the command line until killed, and prints its
//! address (UDP and TCP) on the first line of stdout.
//!
//!     cargo run --release -p tern-dns --features test-server --example bench_dns -- \
//!         'TXT=client.bench.test=v=spf1 ip4:127.0.0.1 -all' 'A=mx.bench.test=127.0.0.1'
//!
//! Every other name is answered NXDOMAIN.

use std::io::Write;

use tern_dns::testing::{TestDns, TestZone};

fn main() {
    let mut zone = TestZone::new();
    for arg in std::env::args().skip(1) {
        let parts: Vec<&str> = arg.splitn(3, '=').collect();
        zone = match parts.as_slice() {
            ["TXT", name, value] => zone.txt(name, value),
            ["A", name, ip] => zone.a(name, ip.parse().expect("an IPv4 address")),
            ["MX", name, host] => zone.mx(name, 10, host),
            _ => {
                eprintln!("bench_dns: {arg:?}: expected TXT=name=value, A=name=ip or MX=name=host");
                std::process::exit(2);
            }
        };
    }
    let dns = TestDns::start(zone);
    println!("{}", dns.addr());
    std::io::stdout().flush().expect("stdout");
    loop {
        std::thread::park();
    }
}
