//! An idle server sleeps: after the last message, no thread of it wakes on a short timer. The
//! queue used to write out delivery state and log lines on a fixed 20 ms tick, 50 wakeups a
//! second of an idle server (85–87 in all, 0.7 % of a core); the write-out is now armed by a
//! change.

use std::collections::HashMap;
use std::time::Duration;

use tern_tests::{queued_id, TernServer};

/// Voluntary context switches (sleeps) so far of each thread of `pid`, by thread id.
fn sleeps(pid: u32) -> HashMap<String, u64> {
    let mut by_thread = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(n) = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        {
            let tid = task.file_name().to_string_lossy().into_owned();
            by_thread.insert(tid, n.trim().parse::<u64>().unwrap());
        }
    }
    by_thread
}

#[test]
fn an_idle_server_does_not_wake_up_on_a_short_timer() {
    let server = TernServer::builder().set("delivery.enabled", false).start();
    let pid = server.pid().expect("server running");
    // A message first, so the queue has changed state, logged and written out.
    let mut c = server.session();
    let reply = c.send_mail(
        "a@client.test",
        &["b@example.net"],
        "Subject: idle\r\n\r\nbody\r\n",
    );
    queued_id(&reply);
    c.cmd("QUIT");
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let before = sleeps(pid);
    let secs = 3;
    std::thread::sleep(Duration::from_secs(secs));
    // Per thread, so that a thread that ends meanwhile (an idle pool worker) neither makes
    // the total go down nor hides the others' sleeps; one that starts counts in full.
    let after = sleeps(pid);
    let total: u64 = after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    let per_second = total / secs;
    // What remains is sled's (its flusher every 500 ms, its I/O pool's idle timeouts) and
    // second-scale housekeeping: about 20 a second here.
    assert!(
        per_second < 45,
        "an idle server slept and woke {per_second} times a second"
    );
}
