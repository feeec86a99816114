//! DKIM signing in the mail path: mail from trusted or authenticated submitters is signed with
//! the keys of its From domain before it is queued; mail from strangers is not. The signature is
//! checked with `tern dkim verify` (mail-auth); tests/python/test_dkim.py checks the signer
//! against dkimpy.

use std::net::{IpAddr, Ipv4Addr};

use tern_tests::{queued_id, tern_cmd, SmtpClient, TernServer};

/// `tern dkim keygen` into `dir`: (key path, TXT record name, record value).
fn keygen(dir: &std::path::Path, algorithm: &str) -> (String, String, String) {
    let key = dir.join(format!("{algorithm}.pem"));
    let out = tern_cmd(&[
        "dkim",
        "keygen",
        "example.org",
        "s1",
        "--algorithm",
        algorithm,
        "--out",
        key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find(|l| l.contains("IN TXT"))
        .unwrap_or_else(|| panic!("no TXT record in {stdout}"));
    let name = line
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('.')
        .to_string();
    let value: String = line
        .split('"')
        .skip(1)
        .step_by(2)
        .collect::<Vec<_>>()
        .concat();
    (key.to_str().unwrap().to_string(), name, value)
}

fn verify(message: &str, name: &str, value: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msg.eml");
    std::fs::write(&path, message).unwrap();
    let out = std::process::Command::new(tern_tests::tern_bin())
        .args(["dkim", "verify", "--txt", &format!("{name}={value}")])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn submitted_mail_is_signed_and_verifies_strangers_mail_is_not_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (key, name, value) = keygen(dir.path(), "ed25519-sha256");
    let mut dkim = toml::Table::new();
    dkim.insert("domain".into(), "example.org".into());
    dkim.insert("selector".into(), "s1".into());
    dkim.insert("private_key".into(), key.into());
    dkim.insert("algorithm".into(), "ed25519-sha256".into());
    let mut server = TernServer::builder()
        .relay_networks(&["127.0.0.1/32"])
        .relay_domains(&["example.net"])
        .set("dkim", toml::Value::Array(vec![toml::Value::Table(dkim)]))
        .start();
    let body = "From: Alice <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: signed\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nHello, signed world.\r\n";
    let mut c = server.session();
    let signed_id = queued_id(&c.send_mail("alice@example.org", &["bob@example.net"], body));
    // Another From domain: no key, no signature.
    let other = body.replace("alice@example.org", "carol@example.com");
    let other_id = queued_id(&c.send_mail("carol@example.com", &["bob@example.net"], &other));
    // A stranger (not in relay.networks, not authenticated) sending to a domain we serve.
    let mut s = SmtpClient::connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), server.smtp);
    s.read_reply().expect_code(220);
    s.ehlo("mail.other.test").expect_code(250);
    let stranger_id = queued_id(&s.send_mail("alice@example.org", &["bob@example.net"], body));
    server.stop();

    let signed = server.spooled_text(&signed_id);
    let (received, rest) = tern_tests::split_received(&signed);
    assert!(received.starts_with("Received:"), "{signed}");
    assert!(
        rest.starts_with("DKIM-Signature:"),
        "right after Received: {rest}"
    );
    assert!(
        rest.contains("d=example.org") && rest.contains("s=s1"),
        "{rest}"
    );
    let (ok, report) = verify(&signed, &name, &value);
    assert!(ok, "the spooled message must verify: {report}");
    // A changed body no longer verifies.
    let (ok, _) = verify(
        &signed.replace("signed world", "forged world"),
        &name,
        &value,
    );
    assert!(!ok);

    assert!(!server.spooled_text(&other_id).contains("DKIM-Signature"));
    assert!(!server.spooled_text(&stranger_id).contains("DKIM-Signature"));
}
