//! Graceful shutdown: on SIGTERM, sessions waiting for a command are told 421 4.3.2 (RFC 5321
//! §3.8) instead of seeing the connection drop, and the server exits without waiting out the
//! grace period when nobody is busy.

use std::time::{Duration, Instant};

use tern_tests::{queued_id, simple_message, TernServer};

#[test]
fn sigterm_tells_idle_sessions_421_4_3_2_and_exits_promptly() {
    let mut server = TernServer::start();
    let mut idle: Vec<_> = (0..5).map(|_| server.session()).collect();
    // One session mid-transaction: its open transaction is abandoned (never acknowledged).
    let mut mid = server.session();
    mid.cmd("MAIL FROM:<a@client.test>").expect("250", "2.1.0");
    // One that completed a message first: that one stays acknowledged.
    let mut done = server.session();
    let reply = done.send_mail(
        "b@client.test",
        &["c@elsewhere.test"],
        &simple_message("b@client.test", "c@elsewhere.test", "before shutdown"),
    );
    let id = queued_id(&reply);

    let started = Instant::now();
    server.stop();
    let took = started.elapsed();
    for c in idle.iter_mut().chain([&mut mid, &mut done]) {
        c.read_reply().expect("421", "4.3.2");
        c.expect_closed(Duration::from_secs(5));
    }
    assert!(
        took < Duration::from_secs(8),
        "idle sessions must not hold the shutdown for the grace period (took {took:?})"
    );
    let spool = server.spool_list();
    assert_eq!(spool.len(), 1, "{spool:?}");
    assert_eq!(spool[0].id, id);
    // Its log line was written out before the exit, even if within the last 20 ms.
    let log = server.delivery_log();
    assert!(
        log.iter()
            .any(|e| e["event"] == "received" && e["queue_id"] == id.as_str()),
        "{log:#?}"
    );
}
