//! Real command-line SMTP clients against the real server: swaks (plain, pipelined, STARTTLS +
//! AUTH, implicit TLS, failures) and Postfix's smtp-source (many messages over parallel
//! sessions). scripts/test.sh installs both; a missing tool skips the test with a printed reason,
//! except under CI (CI=true), where a missing tool is a failure.

use std::process::{Command, Output, Stdio};

use tern_tests::TernServer;

fn tool(name: &str) -> Option<String> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = format!("{dir}/{name}");
        if std::path::Path::new(&p).is_file() {
            return Some(p);
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is not installed (scripts/test.sh installs it); CI requires it");
    }
    eprintln!(
        "SKIPPED: {name} is not installed (apt-get install {}); run scripts/test.sh",
        if name == "swaks" { "swaks" } else { "postfix" }
    );
    None
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn swaks(bin: &str, port: u16, extra: &[&str]) -> (Output, String) {
    let port = port.to_string();
    let mut cmd = Command::new(bin);
    cmd.args([
        "--server",
        "127.0.0.1",
        "--port",
        &port,
        "--helo",
        "swaks.client.test",
    ])
    .args(["--from", "swaks@client.test", "--to", "rcpt@elsewhere.test"])
    .args(["--timeout", "30"])
    .args(extra);
    run(&mut cmd)
}

fn queued_ids(transcript: &str) -> Vec<String> {
    transcript
        .lines()
        .filter_map(|l| l.split("250 2.0.0 Ok: queued as ").nth(1))
        .map(|id| id.trim().to_string())
        .collect()
}

#[test]
fn swaks_plain_send() {
    let Some(bin) = tool("swaks") else { return };
    let mut server = TernServer::start();
    let (out, text) = swaks(
        &bin,
        server.smtp.port(),
        &["--header", "Subject: swaks plain"],
    );
    assert!(out.status.success(), "swaks failed: {text}");
    let ids = queued_ids(&text);
    assert_eq!(ids.len(), 1, "{text}");
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == ids[0]).expect("spooled");
    assert_eq!(e.sender, "swaks@client.test");
    assert_eq!(e.recipients, vec!["rcpt@elsewhere.test"]);
}

#[test]
fn swaks_pipelined_send_with_several_recipients() {
    let Some(bin) = tool("swaks") else { return };
    let mut server = TernServer::start();
    let (out, text) = swaks(
        &bin,
        server.smtp.port(),
        &[
            "--pipeline",
            "--to",
            "a@elsewhere.test,b@elsewhere.test,c@elsewhere.test",
        ],
    );
    assert!(out.status.success(), "swaks --pipeline failed: {text}");
    let ids = queued_ids(&text);
    assert_eq!(ids.len(), 1, "{text}");
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == ids[0]).expect("spooled");
    assert_eq!(
        e.recipients,
        vec!["a@elsewhere.test", "b@elsewhere.test", "c@elsewhere.test"]
    );
}

#[test]
fn swaks_starttls_auth_plain_and_login_on_submission() {
    let Some(bin) = tool("swaks") else { return };
    let server = TernServer::builder().user("alice", "secret").start();
    for mech in ["PLAIN", "LOGIN"] {
        let (out, text) = swaks(
            &bin,
            server.submission.port(),
            &[
                "--tls",
                "--auth",
                mech,
                "--auth-user",
                "alice",
                "--auth-password",
                "secret",
            ],
        );
        assert!(
            out.status.success(),
            "swaks --tls --auth {mech} failed: {text}"
        );
        assert!(text.contains("235 2.7.0"), "{mech}: {text}");
        assert_eq!(queued_ids(&text).len(), 1, "{text}");
    }
}

#[test]
fn swaks_tls_on_connect_to_submissions() {
    let Some(bin) = tool("swaks") else { return };
    let server = TernServer::builder().user("alice", "secret").start();
    let (out, text) = swaks(
        &bin,
        server.submissions.port(),
        &[
            "--tls-on-connect",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "secret",
        ],
    );
    assert!(
        out.status.success(),
        "swaks --tls-on-connect failed: {text}"
    );
    assert_eq!(queued_ids(&text).len(), 1, "{text}");
}

#[test]
fn swaks_wrong_password_fails_with_535() {
    let Some(bin) = tool("swaks") else { return };
    let server = TernServer::builder().user("alice", "secret").start();
    let (out, text) = swaks(
        &bin,
        server.submission.port(),
        &[
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "wrong",
        ],
    );
    assert!(!out.status.success(), "swaks should fail: {text}");
    assert!(text.contains("535 5.7.8"), "{text}");
    assert!(queued_ids(&text).is_empty());
}

#[test]
fn swaks_relay_denied_from_outside_networks() {
    let Some(bin) = tool("swaks") else { return };
    let server = TernServer::builder()
        .relay_networks(&["127.0.0.1/32"])
        .start();
    let (out, text) = swaks(
        &bin,
        server.smtp.port(),
        &["--local-interface", "127.0.0.3"],
    );
    assert!(
        !out.status.success(),
        "relay from 127.0.0.3 must fail: {text}"
    );
    assert!(text.contains("554 5.7.1"), "{text}");
}

#[test]
fn smtp_source_parallel_sessions_all_spooled() {
    let Some(bin) = tool("smtp-source") else {
        return;
    };
    let mut server = TernServer::start();
    let target = format!("127.0.0.1:{}", server.smtp.port());
    let (out, text) = run(Command::new(&bin).args([
        "-s",
        "5",
        "-m",
        "100",
        "-l",
        "2000",
        "-f",
        "source@client.test",
        "-t",
        "sink@elsewhere.test",
        "-M",
        "source.client.test",
        &target,
    ]));
    assert!(out.status.success(), "smtp-source failed: {text}");
    let (out, text) = run(Command::new(&bin).args([
        "-d",
        "-s",
        "2",
        "-m",
        "50",
        "-l",
        "500",
        "-f",
        "source@client.test",
        "-t",
        "sink@elsewhere.test",
        "-M",
        "source.client.test",
        &target,
    ]));
    assert!(out.status.success(), "smtp-source -d failed: {text}");
    assert_eq!(server.queued(), 150);
    server.stop();
    let spool = server.spool_list();
    assert_eq!(spool.len(), 150);
    assert!(spool
        .iter()
        .all(|e| e.sender == "source@client.test" && e.recipients == ["sink@elsewhere.test"]));
}
