//! Many sessions at once: 1,000 concurrent clients each send one message; every one must get
//! `250 … queued as <ID>` and every id must be in the spool afterwards. Sessions come from 20
//! loopback source addresses (50 each), inside the default per-address limit of 100.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tern_tests::{queued_id, raise_nofile_limit, AsyncSmtpClient, TernServer};

const SESSIONS: usize = 1000;
const SOURCES: usize = 20;

async fn one_session(
    addr: SocketAddr,
    src: IpAddr,
    n: usize,
    barrier: Arc<tokio::sync::Barrier>,
) -> Result<String, String> {
    let ctx = |e: std::io::Error| format!("session {n} from {src}: {e}");
    let greeted = async {
        let mut c = AsyncSmtpClient::connect(addr, Some(src))
            .await
            .map_err(ctx)?;
        let greet = c.read_reply().await.map_err(ctx)?;
        if greet.code != 220 {
            return Err(format!("session {n}: greeting {greet}"));
        }
        Ok(c)
    }
    .await;
    // Everyone is connected and greeted before anyone sends, so the sessions really overlap.
    // A session that failed still reaches the barrier, or the others would wait forever.
    barrier.wait().await;
    let mut c = greeted?;
    let steps = [
        (format!("EHLO c{n}.client.test"), 250),
        (format!("MAIL FROM:<s{n}@client.test>"), 250),
        (format!("RCPT TO:<r{n}@elsewhere.test>"), 250),
        ("DATA".to_string(), 354),
    ];
    for (cmd, want) in steps {
        let r = c.cmd(&cmd).await.map_err(ctx)?;
        if r.code != want {
            return Err(format!("session {n}: {cmd} → {r}"));
        }
    }
    let body = format!("From: <s{n}@client.test>\r\nTo: <r{n}@elsewhere.test>\r\nSubject: concurrent {n}\r\n\r\nmessage {n}\r\n.\r\n");
    c.send(body.as_bytes()).await.map_err(ctx)?;
    let r = c.read_reply().await.map_err(ctx)?;
    if r.code != 250 {
        return Err(format!("session {n}: end of data → {r}"));
    }
    let id = std::panic::catch_unwind(|| queued_id(&r)).map_err(|_| format!("session {n}: {r}"))?;
    let _ = c.cmd("QUIT").await;
    Ok(id)
}

#[tokio::test]
async fn a_thousand_concurrent_sessions_each_queue_a_message() {
    raise_nofile_limit();
    let mut server = TernServer::start();
    let addr = server.smtp;
    let barrier = Arc::new(tokio::sync::Barrier::new(SESSIONS));
    let mut tasks = Vec::with_capacity(SESSIONS);
    for n in 0..SESSIONS {
        let src = IpAddr::from([127, 0, 1, (n % SOURCES) as u8 + 1]);
        tasks.push(tokio::spawn(one_session(addr, src, n, barrier.clone())));
    }
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(id) => ids.push(id),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {SESSIONS} sessions failed; first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), SESSIONS, "queue ids must be unique");

    assert_eq!(server.queued(), SESSIONS as u64, "/health queued count");
    server.stop();
    let spool = server.spool_list();
    let spooled: HashSet<&str> = spool.iter().map(|e| e.id.as_str()).collect();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !spooled.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged ids missing from the spool, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(spool.len(), SESSIONS);
    // Envelopes are kept per message, not mixed between sessions.
    for e in &spool {
        let n = e
            .sender
            .trim_start_matches('s')
            .trim_end_matches("@client.test");
        assert_eq!(e.recipients, vec![format!("r{n}@elsewhere.test")], "{e:?}");
    }
}

#[test]
fn many_messages_on_one_pipelined_connection() {
    let mut server = TernServer::start();
    let mut c = server.session();
    let n = 200;
    // RFC 2920: MAIL, RCPT and DATA go in one write; the content waits for 354 and is then sent
    // together with the next transaction's commands.
    let cmds = |i: usize| {
        format!("MAIL FROM:<p{i}@client.test>\r\nRCPT TO:<q{i}@elsewhere.test>\r\nDATA\r\n")
    };
    c.send(cmds(0));
    let mut ids = HashSet::new();
    for i in 0..n {
        c.read_reply().expect("250", "2");
        c.read_reply().expect("250", "2");
        c.read_reply().expect_code(354);
        let next = if i + 1 < n {
            cmds(i + 1)
        } else {
            String::new()
        };
        c.send(format!("Subject: {i}\r\n\r\nbody {i}\r\n.\r\n{next}"));
        let r = c.read_reply();
        assert!(ids.insert(queued_id(&r)), "duplicate id at {i}");
    }
    c.cmd("QUIT").expect("221", "2.0.0");
    server.stop();
    let spool = server.spool_list();
    assert_eq!(spool.len(), n);
    assert!(spool.iter().all(|e| ids.contains(&e.id)));
}
