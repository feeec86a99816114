//! Crash safety for real: a child process enqueues messages through the queue actor and prints
//! each id only after its `Enqueue` returned `Ok`; the parent SIGKILLs it mid-stream, reopens the
//! spool and checks that every printed id is there, whole.
//!
//! The child is this test binary itself, re-run with `--exact crash_child` and the spool
//! directory in [`CHILD_ENV`].

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use actix::System;
use common::{body_for, client, envelope, message, opts};
use tern_message::QueueId;
use tern_queue::{spawn_queue, Enqueue, QueueConfig, SledStorage, Storage};

const CHILD_ENV: &str = "TERN_QUEUE_CRASH_CHILD_DIR";
const SENDERS: usize = 16;

/// Body sizes the child cycles through: small, typical, multi-chunk.
fn size_for(n: usize) -> usize {
    [300, 5_000, 70_000][n % 3]
}

/// The child's entry point; does nothing in a normal test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    System::new().block_on(async move {
        let storage = Arc::new(SledStorage::open(Path::new(&dir), opts()).unwrap());
        let addr = spawn_queue(storage, QueueConfig::default()).unwrap();
        let workers: Vec<_> = (0..SENDERS)
            .map(|w| {
                let addr = addr.clone();
                actix_rt::spawn(async move {
                    for n in w.. {
                        let msg = message(size_for(n));
                        let (id, len) = (msg.id, msg.body.len());
                        match addr.send(Enqueue(msg)).await {
                            // Printed only now: this is the "250 queued as" moment.
                            Ok(Ok(got)) if got == id => println!("QUEUED {id} {len}"),
                            other => {
                                eprintln!("crash child: enqueue failed: {other:?}");
                                std::process::exit(3);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
    });
}

/// Runs one child on `dir`, kills it with SIGKILL after `kill_after` acknowledgements, and
/// returns every id it acknowledged (including those printed between our read and its death).
fn run_child_and_kill(dir: &Path, kill_after: usize) -> HashMap<QueueId, usize> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("QUEUED ") {
                let (id, len) = rest.split_once(' ').unwrap();
                let entry = (
                    id.parse::<QueueId>().unwrap(),
                    len.parse::<usize>().unwrap(),
                );
                if tx.send(entry).is_err() {
                    break;
                }
            }
        }
    });

    let mut acked = HashMap::new();
    while acked.len() < kill_after {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok((id, len)) => {
                acked.insert(id, len);
            }
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "child stopped acknowledging after {} messages: {e}",
                    acked.len()
                );
            }
        }
    }
    // SIGKILL: no destructor, no sled flush-on-drop, no chance to finish the batch in flight.
    let pid = child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was supposed to die: {status:?}");
    // Lines the child printed before dying are still in the pipe: they were acknowledged too.
    reader.join().unwrap();
    for (id, len) in rx.try_iter() {
        acked.insert(id, len);
    }
    acked
}

#[test]
fn sigkill_never_loses_an_acknowledged_message() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acked = HashMap::new();
    // Two rounds: the second child starts by recovering the spool the first one left behind.
    for kill_after in [400, 700] {
        let round = run_child_and_kill(dir.path(), kill_after);
        assert!(round.len() >= kill_after);
        acked.extend(round);
    }

    let storage = SledStorage::open(dir.path(), opts()).unwrap();
    let (envelope, client) = (envelope(), client());
    for (&id, &len) in &acked {
        let msg = storage
            .get(id)
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged message {id} lost"));
        assert_eq!(msg.body.len(), len, "{id}: body length");
        assert!(msg.body == body_for(id, len), "{id}: body differs");
        assert_eq!(msg.envelope, envelope, "{id}: envelope");
        assert_eq!(msg.client, client, "{id}: client");
    }
    // Whatever else the children managed to write (unacknowledged) must be whole or absent.
    let mut spooled = 0;
    for meta in storage.scan() {
        let meta = meta.expect("corrupt record after crash");
        let msg = storage
            .get(meta.id)
            .unwrap()
            .expect("scanned but not gettable");
        assert_eq!(msg.body, body_for(meta.id, meta.body_len as usize));
        spooled += 1;
    }
    assert!(spooled >= acked.len());
    eprintln!(
        "{} acknowledged, {} spooled after two SIGKILLs",
        acked.len(),
        spooled
    );
}
