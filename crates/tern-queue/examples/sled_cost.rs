//! CPU cost per message of the ways to make a group commit durable, without the queue actor:
//! why the spool keeps bodies in its own segment files (docs/benchmarks.md, "Spool format 2").
//!
//! `cargo run --release -p tern-queue --example sled_cost -- MODE [BATCH] [MESSAGES]`
//!
//! MODE:
//! * `sled-batch`: format 1: one `sled::Batch` (metadata + 5,000-byte body) per group, then
//!   `Db::flush` and `fdatasync` of sled's log.
//! * `sled-batch-noflush`: the same without the flush and sync (sled's own cost of a batch).
//! * `sled-single`: the records as single `insert`s, then flush and sync.
//! * `journal`: the records appended to a file of our own with one write, then `fdatasync`.
//! * `journal+index`: format 2: the records appended and synced as in `journal`, plus one
//!   unflushed sled insert of the metadata per message.
//!
//! Prints msg/s and the process's CPU time (user + system, all threads) per message.

use std::io::Write;
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "journal+index".into());
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let n: usize = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::Builder::new()
        .prefix("sled-cost")
        .tempdir_in(".")
        .unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .cache_capacity(64 << 20)
        .segment_size(1 << 20)
        .open()
        .unwrap();
    let tree = db.open_tree("spool").unwrap();
    let log = std::fs::File::open(dir.path().join("sled/db")).unwrap();
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("journal"))
        .unwrap();
    let body = vec![b'a'; 5000];
    let meta = vec![b'm'; 400];

    let (cpu0, start) = (cpu_seconds(), Instant::now());
    let mut buf = Vec::new();
    let mut i = 0u64;
    while (i as usize) < n {
        let mut sled_batch = sled::Batch::default();
        for _ in 0..batch {
            i += 1;
            let mut key = [0u8; 17];
            key[1..9].copy_from_slice(&i.to_be_bytes());
            key[0] = b'm';
            match mode.as_str() {
                "sled-batch" | "sled-batch-noflush" => {
                    sled_batch.insert(&key, &meta[..]);
                    key[0] = b'b';
                    sled_batch.insert(&key, &body[..]);
                }
                "sled-single" => {
                    tree.insert(key, &meta[..]).unwrap();
                    key[0] = b'b';
                    tree.insert(key, &body[..]).unwrap();
                }
                "journal+index" => {
                    tree.insert(key, &meta[..]).unwrap();
                }
                _ => {}
            }
            buf.extend_from_slice(&meta);
            buf.extend_from_slice(&body);
        }
        match mode.as_str() {
            "sled-batch" => {
                tree.apply_batch(sled_batch).unwrap();
                db.flush().unwrap();
                log.sync_data().unwrap();
            }
            "sled-batch-noflush" => tree.apply_batch(sled_batch).unwrap(),
            "sled-single" => {
                db.flush().unwrap();
                log.sync_data().unwrap();
            }
            "journal" | "journal+index" => {
                journal.write_all(&buf).unwrap();
                journal.sync_data().unwrap();
            }
            other => panic!("unknown mode {other}"),
        }
        buf.clear();
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{mode}, {batch} messages per commit: {:.0} msg/s, {:.1} µs CPU/msg",
        n as f64 / wall,
        cpu * 1e6 / n as f64
    );
}
