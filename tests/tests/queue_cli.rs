//! `tern queue …` end to end: the real binary's queue subcommands against a running
//! `tern serve` over its loopback admin API, with mail going in over SMTP and (when delivery is
//! on) out to scripted sinks.

use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tern_tests::sink::{Sink, SinkConfig};
use tern_tests::{free_port, queued_id, tern_cmd, unique_token, TernServer, TernServerBuilder};

const WAIT: Duration = Duration::from_secs(10);

/// Sends one message over SMTP and returns its queue id.
fn submit(server: &TernServer, from: &str, rcpts: &[&str], subject: &str) -> String {
    let mut c = server.session();
    c.cmd(&format!("MAIL FROM:<{from}>")).expect_code(250);
    for r in rcpts {
        c.cmd(&format!("RCPT TO:<{r}>")).expect_code(250);
    }
    c.cmd("DATA").expect_code(354);
    let body = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\nMessage-ID: <{}@client.test>\r\n\r\nbody\r\n",
        rcpts[0],
        unique_token()
    );
    c.send(body);
    c.send(b".\r\n");
    let id = queued_id(&c.read_reply());
    c.cmd("QUIT");
    id
}

/// `tern queue --http ADDR ARGS…`.
fn queue(server: &TernServer, args: &[&str]) -> Output {
    let http = server.http.to_string();
    let mut all = vec!["queue", "--http", &http];
    all.extend_from_slice(args);
    tern_cmd(&all)
}

/// Runs `tern queue …`, asserts success and returns stdout.
#[track_caller]
fn queue_ok(server: &TernServer, args: &[&str]) -> String {
    let out = queue(server, args);
    assert!(
        out.status.success(),
        "tern queue {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `tern queue --json …` and parses stdout.
#[track_caller]
fn queue_json(server: &TernServer, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = queue_ok(server, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Runs `tern queue …`, asserts failure and returns stderr.
#[track_caller]
fn queue_err(server: &TernServer, args: &[&str]) -> String {
    let out = queue(server, args);
    assert!(
        !out.status.success(),
        "tern queue {args:?} should fail, printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Delivery on, everything routed to `sink`, retries an hour apart (a deferral stays put).
fn to_sink(b: TernServerBuilder, sink: &Sink) -> TernServerBuilder {
    b.set("delivery.enabled", true)
        .set("delivery.idle_timeout", "1s")
        .set_list("queue.retry_schedule", &["1h"])
        .route("*", Some(&sink.addr().to_string()), "none")
}

fn deferring_sink(address: &str, replies: &[&str]) -> Sink {
    Sink::start(SinkConfig {
        rcpt_replies: vec![(
            address.into(),
            replies.iter().map(|s| s.to_string()).collect(),
        )],
        ..SinkConfig::default()
    })
}

/// The message `id` in a `--json list` answer.
fn find<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array()
        .expect("list is an array")
        .iter()
        .find(|m| m["id"] == id)
}

#[test]
fn list_shows_deferred_recipient_with_attempts_and_reply_and_filters() {
    let sink = deferring_sink("bob@example.net", &["451 4.3.0 later"]);
    let server = to_sink(TernServer::builder(), &sink).start();
    let id = submit(
        &server,
        "alice@client.test",
        &["bob@example.net", "carol@example.org"],
        "deferred",
    );
    server.wait_event("deferred", "bob@example.net", WAIT);
    server.wait_event("delivered", "carol@example.org", WAIT);

    // Text: the message line, then one line per recipient with its state and last reply.
    let text = queue_ok(&server, &["list"]);
    assert!(text.contains(&id), "{text}");
    assert!(text.contains("<alice@client.test>"), "{text}");
    let bob = text
        .lines()
        .find(|l| l.contains("bob@example.net"))
        .unwrap_or_else(|| panic!("no line for bob: {text}"));
    assert!(bob.trim_start().starts_with("deferred"), "{bob}");
    assert!(bob.contains("attempts=1"), "{bob}");
    assert!(bob.contains("next="), "{bob}");
    assert!(text.contains("(451 4.3.0 later)"), "{text}");
    let carol = text
        .lines()
        .find(|l| l.contains("carol@example.org"))
        .unwrap_or_else(|| panic!("no line for carol: {text}"));
    assert!(carol.trim_start().starts_with("delivered"), "{carol}");
    assert!(text.contains("-- 1 message(s)"), "{text}");

    // JSON: the same facts, machine-readable.
    let list = queue_json(&server, &["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let m = find(&list, &id).unwrap_or_else(|| panic!("{id} not listed: {list}"));
    assert_eq!(m["sender"], "alice@client.test");
    assert!(m["size"].as_u64().unwrap() > 0, "{m}");
    assert!(m["arrived_ms"].as_u64().unwrap() <= now_ms(), "{m}");
    let rcpts = m["recipients"].as_array().unwrap();
    let bob = rcpts
        .iter()
        .find(|r| r["address"] == "bob@example.net")
        .expect("bob");
    assert_eq!(bob["domain"], "example.net");
    assert_eq!(bob["state"], "deferred");
    assert_eq!(bob["attempts"], 1);
    assert_eq!(bob["last_reply"], "451 4.3.0 later");
    let next = bob["next_attempt_ms"].as_u64().expect("next_attempt_ms");
    assert!(
        next > now_ms() + 30 * 60 * 1000,
        "next attempt an hour away: {bob}"
    );
    let carol = rcpts
        .iter()
        .find(|r| r["address"] == "carol@example.org")
        .expect("carol");
    assert_eq!(carol["state"], "delivered");
    assert!(
        carol["last_reply"].as_str().unwrap().starts_with("250"),
        "{carol}"
    );

    // Filters: a message is listed when one of its recipients matches both.
    let has = |args: &[&str]| find(&queue_json(&server, args), &id).is_some();
    assert!(has(&["list", "--domain", "example.net"]));
    assert!(has(&["list", "--domain", "EXAMPLE.ORG"]));
    assert!(!has(&["list", "--domain", "example.com"]));
    assert!(has(&["list", "--state", "deferred"]));
    assert!(has(&["list", "--state", "delivered"]));
    assert!(!has(&["list", "--state", "pending"]));
    assert!(!has(&["list", "--state", "failed"]));
    assert!(has(&[
        "list",
        "--domain",
        "example.net",
        "--state",
        "deferred"
    ]));
    assert!(!has(&[
        "list",
        "--domain",
        "example.org",
        "--state",
        "deferred"
    ]));
    let none = queue_ok(&server, &["list", "--domain", "example.com"]);
    assert!(!none.contains(&id), "{none}");
    assert!(none.contains("-- 0 message(s)"), "{none}");
}

#[test]
fn show_prints_envelope_client_and_headers() {
    let server = TernServer::start();
    let subject = format!("show me {}", unique_token());
    let id = submit(
        &server,
        "alice@client.test",
        &["bob@example.net", "dave@example.org"],
        &subject,
    );

    let text = queue_ok(&server, &["show", &id]);
    assert!(text.starts_with(&id), "{text}");
    assert!(text.contains("<alice@client.test>"), "{text}");
    for r in ["bob@example.net", "dave@example.org"] {
        let line = text
            .lines()
            .find(|l| l.contains(r))
            .unwrap_or_else(|| panic!("no line for {r}: {text}"));
        assert!(line.trim_start().starts_with("pending"), "{line}");
    }
    assert!(text.contains("client: 127.0.0.1"), "{text}");
    assert!(text.contains("helo=client.test"), "{text}");
    assert!(text.contains("tls=none auth=none"), "{text}");
    assert!(text.contains(&format!("Subject: {subject}")), "{text}");
    assert!(text.contains("Received: "), "our Received header: {text}");
    assert!(!text.contains("body\r\n"), "headers only: {text}");

    let v = queue_json(&server, &["show", &id]);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["sender"], "alice@client.test");
    assert_eq!(v["recipients"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["client"]["helo"], "client.test", "{v}");
    let headers = v["headers"].as_str().unwrap();
    assert!(
        headers.contains(&format!("Subject: {subject}")),
        "{headers}"
    );
    assert!(
        headers.ends_with("\r\n") && !headers.contains("body"),
        "{headers:?}"
    );

    // --config finds the admin API through http.listen.
    let config = server.config_path().display().to_string();
    let out = tern_cmd(&["queue", "--config", &config, "show", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&subject));
}

#[test]
fn flush_retries_a_deferred_message_now() {
    let sink = deferring_sink("bob@example.net", &["451 4.3.0 later", "250 2.1.5 ok"]);
    let server = to_sink(TernServer::builder(), &sink).start();
    let id = submit(&server, "alice@client.test", &["bob@example.net"], "flush");
    server.wait_event("deferred", "bob@example.net", WAIT);
    assert!(sink.messages().is_empty());
    let list = queue_json(&server, &["list", "--state", "deferred"]);
    assert!(find(&list, &id).is_some(), "{list}");

    let out = queue_ok(&server, &["flush"]);
    assert_eq!(out.trim(), "1 message(s) scheduled for immediate delivery");
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.net"]);
    let delivered = server.wait_event("delivered", "bob@example.net", WAIT);
    assert_eq!(delivered["queue_id"], id.as_str());
    assert_eq!(delivered["attempt"], 2);
    server.wait_queued(0, WAIT);
    let after = queue_ok(&server, &["list"]);
    assert!(after.contains("-- 0 message(s)"), "{after}");
    // Nothing left to flush.
    let out = queue_ok(&server, &["flush", "--domain", "example.net"]);
    assert_eq!(out.trim(), "0 message(s) scheduled for immediate delivery");
}

#[test]
fn a_domain_flush_hurries_only_that_domains_recipients() {
    let later_then_ok = || vec!["451 4.3.0 later".to_string(), "250 2.1.5 ok".to_string()];
    let sink = Sink::start(SinkConfig {
        rcpt_replies: vec![
            ("bob@example.net".into(), later_then_ok()),
            ("carol@example.org".into(), later_then_ok()),
        ],
        ..SinkConfig::default()
    });
    let server = to_sink(TernServer::builder(), &sink).start();
    let id = submit(
        &server,
        "alice@client.test",
        &["bob@example.net", "carol@example.org"],
        "domain flush",
    );
    server.wait_event("deferred", "bob@example.net", WAIT);
    server.wait_event("deferred", "carol@example.org", WAIT);

    let out = queue_ok(&server, &["flush", "--domain", "example.net"]);
    assert_eq!(out.trim(), "1 message(s) scheduled for immediate delivery");
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.net"]);
    server.wait_event("delivered", "bob@example.net", WAIT);
    // carol keeps her retry time (an hour away).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.messages().len(), 1);
    let list = queue_json(&server, &["list"]);
    let m = find(&list, &id).unwrap_or_else(|| panic!("{id} not listed: {list}"));
    let states: Vec<(&str, &str)> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["address"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("bob@example.net", "delivered"),
            ("carol@example.org", "deferred")
        ]
    );
}

#[test]
fn suspend_holds_a_domain_across_restarts_and_resume_delivers() {
    let sink = Sink::start(SinkConfig::default());
    let mut server = to_sink(TernServer::builder(), &sink).start();
    let out = queue_ok(&server, &["suspend", "held.test"]);
    assert_eq!(out.trim(), "suspended: held.test");
    let held = submit(&server, "alice@client.test", &["bob@held.test"], "held");
    let other = submit(&server, "alice@client.test", &["carol@other.test"], "other");

    // Other domains are delivered; the held one stays pending.
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, ["carol@other.test"]);
    server.wait_event("delivered", "carol@other.test", WAIT);
    server.wait_queued(1, WAIT);
    let list = queue_json(&server, &["list"]);
    assert!(find(&list, &other).is_none(), "{list}");
    let m = find(&list, &held).unwrap_or_else(|| panic!("{held} not listed: {list}"));
    assert_eq!(m["recipients"][0]["state"], "pending", "{m}");

    let stats = queue_json(&server, &["stats"]);
    assert_eq!(
        stats["suspended"],
        serde_json::json!(["held.test"]),
        "{stats}"
    );
    assert_eq!(stats["messages"], 1, "{stats}");
    assert_eq!(stats["by_state"]["pending"], 1, "{stats}");
    assert_eq!(stats["by_domain"]["held.test"]["pending"], 1, "{stats}");
    assert!(stats["by_domain"].get("other.test").is_none(), "{stats}");
    assert_eq!(stats["since_start"]["delivered"], 1, "{stats}");
    let text = queue_ok(&server, &["stats"]);
    assert!(text.contains("messages: 1 "), "{text}");
    assert!(text.contains("recipients: pending=1"), "{text}");
    assert!(text.contains("suspended: held.test"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("held.test") && l.ends_with("pending=1")),
        "{text}"
    );

    // The suspension is on disk and survives a restart.
    let saved =
        std::fs::read_to_string(server.data_dir().join("suspended-domains.json")).expect("saved");
    assert!(saved.contains("held.test"), "{saved}");
    // A graceful stop: after SIGKILL the delivered message may come back and be sent again
    // (at-least-once), which is not what this test is about.
    server.stop();
    server.restart();
    let stats = queue_json(&server, &["stats"]);
    assert_eq!(
        stats["suspended"],
        serde_json::json!(["held.test"]),
        "{stats}"
    );
    assert_eq!(stats["by_domain"]["held.test"]["pending"], 1, "{stats}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sink.messages()
            .iter()
            .all(|m| m.rcpts.iter().all(|r| r != "bob@held.test")),
        "held mail left after restart"
    );

    // Resume sends it at once.
    let out = queue_ok(&server, &["resume", "held.test"]);
    assert_eq!(out.trim(), "suspended: none");
    let deadline = Instant::now() + WAIT;
    while !sink.messages().iter().any(|m| m.rcpts == ["bob@held.test"]) {
        assert!(
            Instant::now() < deadline,
            "held mail not delivered after resume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.wait_event("delivered", "bob@held.test", WAIT)["queue_id"],
        held.as_str()
    );
    server.wait_queued(0, WAIT);
    let stats = queue_json(&server, &["stats"]);
    assert_eq!(stats["suspended"], serde_json::json!([]), "{stats}");
    let saved = std::fs::read_to_string(server.data_dir().join("suspended-domains.json"))
        .unwrap_or_default();
    assert!(!saved.contains("held.test"), "{saved}");
}

/// Whether the sink got a message for `rcpt`.
fn sink_has(sink: &Sink, rcpt: &str) -> bool {
    sink.messages()
        .iter()
        .any(|m| m.rcpts.iter().any(|r| r == rcpt))
}

#[test]
fn a_held_message_stays_queued_across_flush_and_restart_until_released() {
    let sink = Sink::start(SinkConfig::default());
    let mut server = to_sink(TernServer::builder(), &sink).start();
    // Suspension keeps the messages pending (due at once) until they are on hold.
    queue_ok(&server, &["suspend", "example.net"]);
    let held = submit(&server, "alice@client.test", &["bob@example.net"], "held");
    let doomed = submit(
        &server,
        "alice@client.test",
        &["dave@example.net"],
        "doomed",
    );
    for id in [&held, &doomed] {
        let out = queue_ok(&server, &["hold", id]);
        assert_eq!(out.trim(), format!("{id} held"));
    }
    let out = queue_ok(&server, &["hold", &held]);
    assert_eq!(out.trim(), format!("{held} was already held"));
    // Resuming the domain flushes its mail, which would deliver both at once if they were
    // not held; so would an explicit flush.
    queue_ok(&server, &["resume", "example.net"]);
    let out = queue_ok(&server, &["flush"]);
    assert_eq!(out.trim(), "0 message(s) scheduled for immediate delivery");
    std::thread::sleep(Duration::from_millis(500));
    assert!(sink.messages().is_empty(), "held mail was delivered");

    let list = queue_json(&server, &["list", "--state", "held"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let m = find(&list, &held).unwrap_or_else(|| panic!("{held} not listed: {list}"));
    assert_eq!(m["hold"], "operator", "{m}");
    assert_eq!(m["recipients"][0]["state"], "held", "{m}");
    let pending = queue_json(&server, &["list", "--state", "pending"]);
    assert!(find(&pending, &held).is_none(), "{pending}");
    let text = queue_ok(&server, &["show", &held]);
    assert!(text.contains("on hold: operator"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("bob@example.net"))
        .unwrap_or_else(|| panic!("no line for bob: {text}"));
    assert!(line.trim_start().starts_with("held"), "{line}");
    let stats = queue_json(&server, &["stats"]);
    assert_eq!(stats["held"], 2, "{stats}");
    assert_eq!(stats["by_state"]["held"], 2, "{stats}");
    assert!(
        queue_ok(&server, &["stats"]).contains("held: 2"),
        "text stats count held messages"
    );
    let events = server.delivery_log_when(
        "the held lines",
        |l| l.iter().filter(|e| e["event"] == "held").count() == 2,
        WAIT,
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "held" && e["queue_id"] == held.as_str()),
        "{events:?}"
    );

    // A restart recovers the pending recipients due at once, except held ones.
    server.stop();
    server.restart();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sink.messages().is_empty(), "held mail left after restart");
    let list = queue_json(&server, &["list", "--state", "held"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(find(&list, &held).unwrap()["hold"], "operator");

    // Deleting works on held mail.
    let out = queue_ok(&server, &["delete", &doomed]);
    assert_eq!(out.trim(), format!("{doomed} deleted"));

    let out = queue_ok(&server, &["release", &held]);
    assert_eq!(out.trim(), format!("{held} released, due now"));
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.net"]);
    assert_eq!(
        server.wait_event("delivered", "bob@example.net", WAIT)["queue_id"],
        held.as_str()
    );
    server.wait_queued(0, WAIT);
    assert!(
        !sink_has(&sink, "dave@example.net"),
        "deleted mail delivered"
    );
    let err = queue_err(&server, &["release", &held]);
    assert!(
        err.contains(&format!("no message {held}")) && err.contains("HTTP 404"),
        "{err}"
    );
    let stats = queue_json(&server, &["stats"]);
    assert_eq!(stats["held"], 0, "{stats}");
}

#[test]
fn a_message_held_in_flight_finishes_its_attempt_and_is_not_retried_until_released() {
    // The first attempt is slow and ends with a 451; with a 1 s retry schedule a free message
    // would be tried again at once.
    let sink = Sink::start(SinkConfig {
        data_replies: vec!["451 4.3.0 later".into(), "250 2.0.0 queued".into()],
        data_delay: Duration::from_millis(1_500),
        ..SinkConfig::default()
    });
    let server = to_sink(TernServer::builder(), &sink)
        .set_list("queue.retry_schedule", &["1s"])
        .start();
    let id = submit(&server, "alice@client.test", &["bob@example.net"], "slow");
    let deadline = Instant::now() + WAIT;
    loop {
        let list = queue_json(&server, &["list", "--state", "in-flight"]);
        if find(&list, &id).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "never in flight: {list}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = queue_ok(&server, &["hold", &id]);
    assert_eq!(out.trim(), format!("{id} held"));
    server.wait_event("deferred", "bob@example.net", WAIT);
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(sink.transactions().len(), 1, "retried while held");
    let list = queue_json(&server, &["list", "--state", "held"]);
    let m = find(&list, &id).unwrap_or_else(|| panic!("{id} not held: {list}"));
    assert_eq!(m["recipients"][0]["attempts"], 1, "{m}");
    assert_eq!(m["recipients"][0]["last_reply"], "451 4.3.0 later", "{m}");

    queue_ok(&server, &["release", &id]);
    let delivered = server.wait_event("delivered", "bob@example.net", WAIT);
    assert_eq!(delivered["attempt"], 2);
    server.wait_queued(0, WAIT);
}

#[test]
fn a_hold_placed_in_flight_survives_a_crash_before_the_attempt_ends() {
    // The attempt never ends before the crash: the sink holds the DATA reply for a minute.
    let sink = Sink::start(SinkConfig {
        data_delay: Duration::from_secs(60),
        ..SinkConfig::default()
    });
    let mut server = to_sink(TernServer::builder(), &sink)
        .set_list("queue.retry_schedule", &["1s"])
        .start();
    let id = submit(&server, "alice@client.test", &["bob@example.net"], "slow");
    let deadline = Instant::now() + WAIT;
    while find(&queue_json(&server, &["list", "--state", "in-flight"]), &id).is_none() {
        assert!(Instant::now() < deadline, "never in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = queue_ok(&server, &["hold", &id]);
    assert_eq!(out.trim(), format!("{id} held"));
    // The state sync runs within 20 ms of the hold; then a crash while the attempt is still open.
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    server.restart();

    let list = queue_json(&server, &["list", "--state", "held"]);
    let m = find(&list, &id).unwrap_or_else(|| panic!("hold lost in the crash: {list}"));
    assert_eq!(m["hold"], "operator", "{m}");
    // Held means not tried again: the crashed attempt is the only one the sink ever saw.
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(sink.connections(), 1, "retried while held");
}

#[test]
fn delete_removes_a_message_and_unknown_ids_fail() {
    let server = TernServer::start();
    let keep = submit(&server, "alice@client.test", &["bob@example.net"], "keep");
    let gone = submit(&server, "alice@client.test", &["bob@example.net"], "gone");
    assert_eq!(server.queued(), 2);

    let out = queue_ok(&server, &["delete", &gone]);
    assert_eq!(out.trim(), format!("{gone} deleted"));
    assert_eq!(server.queued(), 1);
    let list = queue_json(&server, &["list"]);
    assert!(find(&list, &gone).is_none(), "{list}");
    assert!(find(&list, &keep).is_some(), "{list}");
    let deleted = server
        .delivery_log_when(
            "a deleted line",
            |l| l.iter().any(|e| e["event"] == "deleted"),
            WAIT,
        )
        .into_iter()
        .find(|e| e["event"] == "deleted")
        .expect("a deleted event");
    assert_eq!(deleted["queue_id"], gone.as_str());
    assert_eq!(deleted["sender"], "alice@client.test");

    // Deleting or showing it again: a clear "no message" and a failing exit status.
    let err = queue_err(&server, &["delete", &gone]);
    assert!(
        err.contains(&format!("no message {gone}")) && err.contains("HTTP 404"),
        "{err}"
    );
    let err = queue_err(&server, &["show", &gone]);
    assert!(err.contains(&format!("no message {gone}")), "{err}");
    let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let err = queue_err(&server, &["delete", unknown, "--bounce"]);
    assert!(err.contains(&format!("no message {unknown}")), "{err}");
    assert_eq!(server.queued(), 1);
}

#[test]
fn delete_with_bounce_sends_a_dsn_to_the_sender() {
    let remote = deferring_sink("bob@example.net", &["451 4.3.0 later"]);
    let sender_mx = Sink::start(SinkConfig::default());
    // First matching route wins: the sender's domain goes to its own sink.
    let server = to_sink(
        TernServer::builder().route("client.test", Some(&sender_mx.addr().to_string()), "none"),
        &remote,
    )
    .start();
    let id = submit(
        &server,
        "alice@client.test",
        &["bob@example.net"],
        "bounce me",
    );
    server.wait_event("deferred", "bob@example.net", WAIT);

    let out = queue_ok(&server, &["delete", &id, "--bounce"]);
    assert_eq!(out.trim(), format!("{id} deleted (sender notified)"));
    let dsn = &sender_mx.wait_for_messages(1, WAIT)[0];
    assert_eq!(dsn.mail_from, "", "DSNs come from the null sender");
    assert_eq!(dsn.rcpts, ["alice@client.test"]);
    let text = dsn.text();
    assert!(text.contains("deleted"), "{text}");
    assert!(text.contains("5.0.0"), "{text}");
    assert!(text.contains("bob@example.net"), "{text}");
    server.wait_queued(0, WAIT);
    let events = server.delivery_log_when(
        "the deleted and bounce-sent lines",
        |l| {
            ["deleted", "bounce-sent"].iter().all(|ev| {
                l.iter()
                    .any(|e| e["event"] == *ev && e["queue_id"] == id.as_str())
            })
        },
        WAIT,
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "deleted" && e["queue_id"] == id.as_str()),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "bounce-sent" && e["queue_id"] == id.as_str()),
        "{events:?}"
    );
    assert!(remote.messages().is_empty());
}

#[test]
fn malformed_id_is_a_clear_error() {
    let server = TernServer::start();
    for cmd in ["show", "delete", "hold", "release"] {
        let err = queue_err(&server, &[cmd, "not-a-queue-id"]);
        assert!(err.contains("not-a-queue-id"), "{err}");
        assert!(err.contains("HTTP 400"), "{err}");
        assert!(!err.contains("no details"), "{err}");
    }
}

#[test]
fn unknown_state_filter_is_a_clear_error() {
    let server = TernServer::start();
    submit(&server, "alice@client.test", &["bob@example.net"], "state");
    let err = queue_err(&server, &["list", "--state", "bogus"]);
    assert!(
        err.contains("unknown state \"bogus\"")
            && err.contains("deferred")
            && err.contains("HTTP 400"),
        "{err}"
    );
    // Known names are case-insensitive.
    let out = queue_ok(&server, &["list", "--state", "PENDING"]);
    assert!(out.contains("-- 1 message(s)"), "{out}");
}

#[test]
fn every_command_fails_clearly_without_a_server() {
    let addr = format!("127.0.0.1:{}", free_port());
    let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let commands: [&[&str]; 11] = [
        &["list"],
        &["list", "--domain", "example.net"],
        &["show", id],
        &["flush"],
        &["delete", id],
        &["delete", id, "--bounce"],
        &["hold", id],
        &["release", id],
        &["suspend", "example.net"],
        &["resume", "example.net"],
        &["stats"],
    ];
    for cmd in commands {
        let mut args = vec!["queue", "--http", &addr];
        args.extend_from_slice(cmd);
        let out = tern_cmd(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} succeeded without a server");
        assert!(out.stdout.is_empty(), "{cmd:?} printed output");
        assert!(
            err.contains("cannot reach the server's admin API") && err.contains("tern serve"),
            "{cmd:?}: {err}"
        );
        assert!(err.contains(&addr), "{cmd:?} names the address: {err}");
    }
}
