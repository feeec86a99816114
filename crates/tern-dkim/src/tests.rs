//! Signatures are checked with mail-auth's verifier, which fetches the public key over real
//! DNS from a loopback server (`tern_dns::testing::TestDns`) serving keygen's TXT record.

use super::*;
use mail_auth::hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use tern_dns::testing::{TestDns, TestZone};

const MESSAGE: &str = "From: Alice Example <alice@Example.ORG>\r\n\
To: bob@example.net\r\n\
Subject: DKIM test\r\n\
Date: Sun, 22 Nov 2026 18:00:00 +0000\r\n\
Message-ID: <1@example.org>\r\n\
X-Unsigned: not in the list\r\n\
\r\n\
Hello,\r\n\
  with   some    spaces   \r\n\
\r\n\
\r\n";

fn key(domain: &str, selector: &str, algorithm: Algorithm) -> (DkimKey, GeneratedKey) {
    let generated = generate(domain, selector, algorithm, 2048).unwrap();
    let key = DkimKey::from_pem(
        domain,
        selector,
        algorithm,
        generated.private_key_pem.as_bytes(),
    )
    .unwrap();
    (key, generated)
}

/// mail-auth's verdict for each signature of `message`, keys looked up at `dns`.
fn verify(dns: &TestDns, message: &[u8]) -> Vec<(String, DkimResult)> {
    let addr = dns.addr();
    let config = ResolverConfig::from_parts(
        None,
        vec![],
        NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
    );
    let authenticator = MessageAuthenticator::new(config, ResolverOpts::default()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let parsed = AuthenticatedMessage::parse(message).expect("parsable message");
    runtime.block_on(async {
        authenticator
            .verify_dkim(&parsed)
            .await
            .into_iter()
            .map(|o| {
                let s = o.signature().expect("a signature");
                (format!("{}/{}", s.d, s.s), o.result().clone())
            })
            .collect()
    })
}

fn signed(signer: &Signer, message: &str) -> Vec<u8> {
    let mut out = signer.sign(message.as_bytes()).unwrap().expect("signed");
    out.extend_from_slice(message.as_bytes());
    out
}

#[test]
fn rsa_and_ed25519_signatures_verify_with_mail_auth() {
    let (rsa, rsa_pub) = key("example.org", "rsa1", Algorithm::RsaSha256);
    let (ed, ed_pub) = key("EXAMPLE.org.", "ed1", Algorithm::Ed25519Sha256);
    let dns = TestDns::start(
        TestZone::new()
            .txt(&rsa_pub.record_name, &rsa_pub.record_value)
            .txt(&ed_pub.record_name, &ed_pub.record_value),
    );
    let signer = Signer::new(vec![rsa, ed]);
    let message = signed(&signer, MESSAGE);
    let text = String::from_utf8(message.clone()).unwrap();
    assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
    assert!(text.contains("a=rsa-sha256") && text.contains("a=ed25519-sha256"));
    assert!(text.contains("c=relaxed/relaxed"));
    assert!(!text.contains(" x="), "no expiry by default: {text}");
    let results = verify(&dns, &message);
    assert_eq!(
        results,
        vec![
            ("example.org/rsa1".to_string(), DkimResult::Pass),
            ("example.org/ed1".to_string(), DkimResult::Pass),
        ]
    );
}

#[test]
fn header_lines_are_crlf_folded_and_list_only_present_headers_with_from_oversigned() {
    let (ed, _) = key("example.org", "ed1", Algorithm::Ed25519Sha256);
    let header = Signer::new(vec![ed])
        .sign(MESSAGE.as_bytes())
        .unwrap()
        .unwrap();
    let header = String::from_utf8(header).unwrap();
    assert!(header.starts_with("DKIM-Signature: v=1;"));
    assert!(header.ends_with("\r\n"));
    for line in header.split("\r\n").filter(|l| !l.is_empty()) {
        assert!(line.len() <= 78, "long line {line:?}");
    }
    assert_eq!(
        header.matches('\n').count(),
        header.matches("\r\n").count(),
        "bare LF"
    );
    assert_eq!(
        header.matches("\r\n").count(),
        header.matches("\r\n\t").count() + 1,
        "one field, continuation lines start with a tab"
    );
    let unfolded = header.replace("\r\n\t", "");
    let h = unfolded
        .split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix("h="))
        .unwrap();
    let mut names: Vec<String> = h.split(':').map(|n| n.to_ascii_lowercase()).collect();
    names.sort();
    assert_eq!(
        names,
        ["date", "from", "from", "message-id", "subject", "to"],
        "{h}"
    );
    let t = unfolded
        .split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix("t="))
        .expect("t= set");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(t.parse::<u64>().unwrap()) < 60);
}

#[test]
fn oversigned_from_breaks_when_a_from_is_added() {
    let (rsa, rsa_pub) = key("example.org", "rsa1", Algorithm::RsaSha256);
    let dns = TestDns::start(TestZone::new().txt(&rsa_pub.record_name, &rsa_pub.record_value));
    let signer = Signer::new(vec![rsa]);
    let message = signed(&signer, MESSAGE);
    assert_eq!(verify(&dns, &message)[0].1, DkimResult::Pass);
    // A second From: added below the signature (where an attacker would) must fail it.
    let text = String::from_utf8(message).unwrap();
    let tampered = text.replacen("To: ", "From: mallory@evil.example\r\nTo: ", 1);
    assert!(matches!(
        verify(&dns, tampered.as_bytes())[0].1,
        DkimResult::Fail(_)
    ));
    // And so must a changed body (mail-auth reports a body hash mismatch as neutral).
    let tampered = text.replacen("Hello", "Hullo", 1);
    assert_eq!(
        verify(&dns, tampered.as_bytes())[0].1,
        DkimResult::Neutral(mail_auth::Error::FailedBodyHashMatch)
    );
}

#[test]
fn only_keys_of_the_from_domain_sign() {
    let (other, _) = key("example.net", "s1", Algorithm::Ed25519Sha256);
    let signer = Signer::new(vec![other]);
    assert!(signer.sign(MESSAGE.as_bytes()).unwrap().is_none());
    let no_from = "To: bob@example.net\r\nSubject: x\r\n\r\nbody\r\n";
    assert!(signer.sign(no_from.as_bytes()).unwrap().is_none());
    assert!(Signer::default()
        .sign(MESSAGE.as_bytes())
        .unwrap()
        .is_none());
    assert_eq!(
        from_domain(MESSAGE.as_bytes()).as_deref(),
        Some("example.org")
    );
}

#[test]
fn keygen_record_is_a_zone_line_split_into_255_char_strings() {
    let (pem, txt) = keygen("example.org", "s1", Algorithm::RsaSha256, 2048).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert!(txt.starts_with("s1._domainkey.example.org. IN TXT ( \"v=DKIM1; k=rsa; p=MII"));
    assert!(txt.ends_with("\" )"));
    let inner = txt.split_once("( ").unwrap().1.strip_suffix(" )").unwrap();
    let strings: Vec<&str> = inner.split("\" \"").map(|s| s.trim_matches('"')).collect();
    assert!(
        strings.len() >= 2,
        "a 2048-bit key needs two strings: {txt}"
    );
    assert!(strings.iter().all(|s| s.len() <= 255));
    let (pem, txt) = keygen("example.org", "e1", Algorithm::Ed25519Sha256, 0).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert!(txt.starts_with("e1._domainkey.example.org. IN TXT ( \"v=DKIM1; k=ed25519; p="));
    assert!(keygen("example.org", "s1", Algorithm::RsaSha256, 1024).is_err());
    assert!(keygen("bad domain", "s1", Algorithm::Ed25519Sha256, 0).is_err());
    assert!(keygen("example.org", "s 1", Algorithm::Ed25519Sha256, 0).is_err());
}

#[test]
fn keys_load_from_pkcs8_and_pkcs1_files_and_errors_name_the_file() {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    let dir = tempfile::tempdir().unwrap();
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pkcs1 = private.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
    let pkcs1_path = dir.path().join("pkcs1.pem");
    std::fs::write(&pkcs1_path, pkcs1.as_bytes()).unwrap();
    let key = DkimKey::load("example.org", "s1", Algorithm::RsaSha256, &pkcs1_path).unwrap();
    assert_eq!(key.path(), pkcs1_path);
    let (ed_pem, _) = keygen("example.org", "e1", Algorithm::Ed25519Sha256, 0).unwrap();
    let ed_path = dir.path().join("ed.pem");
    std::fs::write(&ed_path, &ed_pem).unwrap();
    DkimKey::load("example.org", "e1", Algorithm::Ed25519Sha256, &ed_path).unwrap();

    // An RSA PKCS#1 key is not an Ed25519 key, and an Ed25519 key is not an RSA key.
    let err = DkimKey::load("example.org", "s1", Algorithm::Ed25519Sha256, &pkcs1_path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pkcs1.pem") && err.contains("PKCS#8"), "{err}");
    let err = DkimKey::load("example.org", "s1", Algorithm::RsaSha256, &ed_path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ed.pem"), "{err}");
    let missing = dir.path().join("missing.pem");
    let err = DkimKey::load("example.org", "s1", Algorithm::RsaSha256, &missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    // ring signs with RSA keys of 2048 bits and more only.
    let small = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
    let small_path = dir.path().join("small.pem");
    let small_pem = small.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
    std::fs::write(&small_path, small_pem.as_bytes()).unwrap();
    let err = DkimKey::load("example.org", "s1", Algorithm::RsaSha256, &small_path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("small.pem") && err.contains("2048"), "{err}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let err = DkimKey::load("example.org", "s1", Algorithm::RsaSha256, &junk)
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk.pem"), "{err}");
}
