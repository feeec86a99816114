//! Throughput of the durable spool through the queue actor.
//!
//! `cargo run --release -p tern-queue --example spool_bench -- [messages] [senders] [body_bytes] [dir]`
//! (defaults: 20000 messages, 20 senders, 5000 bytes, a temporary directory under the current
//! one, so the spool lives on a real disk and not on a tmpfs /tmp).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use actix::System;
use bytes::Bytes;
use tern_message::{now_ms, ClientInfo, Envelope, InboundMessage, QueueId, Recipient};
use tern_queue::{spawn_queue, Enqueue, GetStats, QueueConfig, SledOptions, SledStorage};

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn message(body: Bytes) -> InboundMessage {
    InboundMessage {
        id: QueueId::new(),
        envelope: Envelope::new(
            "bench@example.org",
            vec![Recipient::new("sink@example.net")],
        ),
        client: ClientInfo::new(
            "192.0.2.1:40000".parse().unwrap(),
            "192.0.2.10:25".parse().unwrap(),
            "bench.example.org",
        ),
        arrived_ms: now_ms(),
        body,
    }
}

fn main() {
    let messages: usize = arg(1, 20_000);
    let senders: usize = arg(2, 20).max(1);
    let size: usize = arg(3, 5_000);
    let (_tmp, dir): (Option<tempfile::TempDir>, PathBuf) = match std::env::args().nth(4) {
        Some(d) => (None, PathBuf::from(d)),
        None => {
            let t = tempfile::Builder::new()
                .prefix("spool-bench")
                .tempdir_in(".")
                .unwrap();
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };

    let storage = Arc::new(SledStorage::open(&dir, SledOptions::default()).unwrap());
    let body = Bytes::from(
        (0..size)
            .map(|i| {
                if i % 78 == 77 {
                    b'\n'
                } else {
                    b'a' + (i % 26) as u8
                }
            })
            .collect::<Vec<_>>(),
    );

    System::new().block_on(async move {
        let addr = spawn_queue(storage, QueueConfig::default()).unwrap();
        let per_sender = messages / senders;
        let start = Instant::now();
        let workers: Vec<_> = (0..senders)
            .map(|_| {
                let addr = addr.clone();
                let body = body.clone();
                actix_rt::spawn(async move {
                    let mut worst = std::time::Duration::ZERO;
                    for _ in 0..per_sender {
                        let t = Instant::now();
                        addr.send(Enqueue(message(body.clone())))
                            .await
                            .unwrap()
                            .unwrap();
                        worst = worst.max(t.elapsed());
                    }
                    worst
                })
            })
            .collect();
        let mut worst = std::time::Duration::ZERO;
        for w in workers {
            worst = worst.max(w.await.unwrap());
        }
        let elapsed = start.elapsed();
        let stats = addr.send(GetStats).await.unwrap();
        let done = per_sender * senders;
        println!(
            "{done} x {size} B, {senders} senders: {:.0} msg/s, {:.1} MB/s, {} syncs \
             ({:.1} msg/sync), worst latency {:.1} ms, elapsed {:.2} s",
            done as f64 / elapsed.as_secs_f64(),
            (done * size) as f64 / elapsed.as_secs_f64() / 1e6,
            stats.syncs,
            done as f64 / stats.syncs.max(1) as f64,
            worst.as_secs_f64() * 1e3,
            elapsed.as_secs_f64(),
        );
    });
}
