//! Crash safety: a 250 reply to DATA means the message is on disk. SIGKILL the server (no
//! graceful shutdown), and every acknowledged id must be in the spool — read offline with
//! `tern spool list` — and counted by `/health` after a restart.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_tests::{queued_id, simple_message, SmtpClient, TernServer};

#[test]
fn acknowledged_messages_survive_sigkill() {
    let n = 100;
    let mut server = TernServer::start();
    let mut ids = Vec::new();
    // A few connections, several messages each.
    for conn in 0..4 {
        let mut c = server.session();
        for i in 0..n / 4 {
            let from = format!("k{conn}x{i}@client.test");
            let reply = c.send_mail(
                &from,
                &["crash@elsewhere.test"],
                &simple_message(&from, "crash@elsewhere.test", "crash"),
            );
            ids.push((queued_id(&reply), from));
        }
    }
    server.kill();

    let spool = server.spool_list();
    for (id, from) in &ids {
        let e = spool.iter().find(|e| &e.id == id).unwrap_or_else(|| {
            panic!(
                "acknowledged id {id} lost after SIGKILL ({} of {n} in spool)",
                spool.len()
            )
        });
        assert_eq!(&e.sender, from);
        assert_eq!(e.recipients, vec!["crash@elsewhere.test"]);
    }
    assert_eq!(spool.len(), n, "no extra or duplicate records");

    server.restart();
    assert_eq!(server.queued(), n as u64, "/health after restart");
    // And the restarted server takes new mail.
    let mut c = server.session();
    queued_id(&c.send_mail(
        "after@client.test",
        &["x@elsewhere.test"],
        "Subject: after\r\n\r\nafter restart\r\n",
    ));
    assert_eq!(server.queued(), n as u64 + 1);
}

#[test]
fn sigkill_during_a_burst_loses_no_acknowledged_message() {
    // Senders keep going while the server is killed; whatever got a 250 must be on disk.
    let mut server = TernServer::start();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.smtp;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let acked = acked.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let Ok(mut c) = SmtpClient::try_connect(addr, None) else {
                    return;
                };
                if c.try_read_reply().is_err()
                    || c.try_send(b"EHLO burst.test\r\n").is_err()
                    || c.try_read_reply().is_err()
                {
                    return;
                }
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let data = format!(
                        "MAIL FROM:<w{w}n{i}@client.test>\r\nRCPT TO:<b@elsewhere.test>\r\nDATA\r\n"
                    );
                    if c.try_send(data.as_bytes()).is_err() {
                        return;
                    }
                    for _ in 0..3 {
                        if c.try_read_reply().is_err() {
                            return;
                        }
                    }
                    if c.try_send(format!("Subject: {i}\r\n\r\nburst\r\n.\r\n").as_bytes())
                        .is_err()
                    {
                        return;
                    }
                    match c.try_read_reply() {
                        Ok(r) if r.code == 250 => acked.lock().unwrap().push(queued_id(&r)),
                        _ => return,
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty(),
        "no message was acknowledged before the kill"
    );
    let spool = server.spool_list();
    let spooled: HashSet<&str> = spool.iter().map(|e| e.id.as_str()).collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !spooled.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    server.restart();
    assert!(server.queued() >= acked.len() as u64);
}

#[test]
fn a_message_cut_off_mid_data_is_not_spooled() {
    let mut server = TernServer::start();
    let mut done = server.session();
    let kept = queued_id(&done.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        "Subject: whole\r\n\r\nwhole\r\n",
    ));
    let mut c = server.session();
    c.cmd("MAIL FROM:<partial@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: partial\r\n\r\nthis message never ends");
    std::thread::sleep(Duration::from_millis(200));
    server.kill();
    let spool = server.spool_list();
    assert_eq!(spool.len(), 1, "{spool:?}");
    assert_eq!(spool[0].id, kept);
    server.restart();
    assert_eq!(server.queued(), 1);
}

#[test]
fn client_disconnect_mid_data_queues_nothing() {
    let mut server = TernServer::start();
    {
        let mut c = server.session();
        c.cmd("MAIL FROM:<partial@client.test>").expect("250", "2");
        c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
        c.cmd("DATA").expect_code(354);
        c.send("Subject: partial\r\n\r\ncut");
    } // dropped: the client vanishes without the final dot
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.queued(), 0);
    server.stop();
    assert!(server.spool_list().is_empty());
}

#[test]
fn large_messages_across_segment_files_survive_sigkill_byte_for_byte() {
    // 12 messages of together 2.2 segment files, so the spool starts new files (and a
    // checkpoint may or may not follow) before the kill: recovery has to find every body
    // whichever file it went to, and the index entries whichever state sled's files were in.
    // Whether the first file is a short plain one (the spool moves to a zero-filled file once
    // one is ready) or a full one, the rest fills a file to the end: a rotation at full size.
    let mut server = TernServer::start();
    let mut c = server.session();
    let mut sent = Vec::new();
    let line_len = format!("message 11 line 00000 {}\r\n", "x".repeat(50)).len() as u64;
    let lines = tern_queue::sled_storage::SEGMENT_FILE_BYTES * 22 / 10 / 12 / line_len;
    for k in 0..12 {
        let mut body = format!("Subject: big {k}\r\n\r\n");
        for j in 0..lines {
            body.push_str(&format!(
                "message {k:02} line {j:05} {}\r\n",
                "x".repeat(50)
            ));
        }
        let reply = c.send_mail("big@client.test", &["crash@elsewhere.test"], &body);
        sent.push((queued_id(&reply), body));
    }
    server.kill();
    for round in ["after SIGKILL", "after a restart and a clean stop"] {
        for (id, body) in &sent {
            let stored = server.spooled_message(id).body;
            assert!(
                stored.ends_with(body.as_bytes()),
                "{round}: {id} differs ({} bytes stored, {} sent)",
                stored.len(),
                body.len()
            );
        }
        if round == "after SIGKILL" {
            server.restart();
            assert_eq!(server.queued(), sent.len() as u64);
            server.stop();
        }
    }
    // Files that hold records, in order, with their lengths (a zero-filled segment is 32 MiB
    // from the start, records or not): at most 32 MiB of the 2.2 files can be in the first.
    let mut with_records: Vec<(String, u64)> =
        std::fs::read_dir(server.data_dir().join("spool/segments"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .filter(|e| {
                let mut magic = [0u8; 4];
                std::fs::File::open(e.path())
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                    .is_ok()
                    && &magic == b"TRN1"
            })
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().len())
            })
            .collect();
    with_records.sort();
    assert!(
        with_records.len() >= 3,
        "the bodies should span a full segment file, found {with_records:?}"
    );
}
