//! DKIM signatures per second on one thread, for a 5 KB message, with an rsa-2048 and an
//! ed25519 key: `Signer::sign` as Tern calls it (From: parsing, header selection,
//! canonicalization, hashing, signing, folding).
//!
//!     cargo run --release -p tern-dkim --example sign_bench [SECONDS_PER_KEY]

use std::time::{Duration, Instant};

use tern_dkim::{generate, Algorithm, DkimKey, Signer};

fn message(size: usize) -> Vec<u8> {
    let mut m = String::from(
        "From: Alice Example <alice@example.org>\r\n\
         To: Bob <bob@example.net>\r\n\
         Cc: carol@example.net\r\n\
         Subject: A benchmark message of about five kilobytes\r\n\
         Date: Sun, 22 Nov 2026 18:00:00 +0000\r\n\
         Message-ID: <bench-1@example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         Received: from client.example.org (client.example.org [192.0.2.1]) by mx.example.org\r\n\
         \r\n",
    );
    let line = "The quick brown fox jumps over the lazy dog;  again and   again.\r\n";
    while m.len() + line.len() <= size {
        m.push_str(line);
    }
    m.into_bytes()
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS_PER_KEY"))
        .unwrap_or(3.0);
    let msg = message(5 * 1024);
    println!(
        "message: {} bytes; {seconds} s per key, one thread",
        msg.len()
    );
    for (algorithm, label) in [
        (Algorithm::RsaSha256, "rsa-sha256 (2048 bits)"),
        (Algorithm::Ed25519Sha256, "ed25519-sha256"),
    ] {
        let key = generate("example.org", "bench", algorithm, 2048).unwrap();
        let key = DkimKey::from_pem(
            "example.org",
            "bench",
            algorithm,
            key.private_key_pem.as_bytes(),
        )
        .unwrap();
        let signer = Signer::new(vec![key]);
        // Warm up.
        for _ in 0..10 {
            signer.sign(&msg).unwrap().unwrap();
        }
        let budget = Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget {
            for _ in 0..10 {
                std::hint::black_box(signer.sign(std::hint::black_box(&msg)).unwrap());
            }
            n += 10;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "{label:<24} {:>8.0} signatures/s  ({:.1} µs each, {n} in {elapsed:.2} s)",
            n as f64 / elapsed,
            elapsed * 1e6 / n as f64
        );
    }
}
