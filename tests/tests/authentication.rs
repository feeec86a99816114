//! Sender authentication and content rules in the mail path, against real DNS answers (the
//! hickory-server test DNS on loopback) and signatures made by an independent implementation
//! (dkimpy, through tests/tools/dkimpy_tool.py): SPF at MAIL FROM, DKIM/ARC/DMARC at the end of
//! DATA, the Authentication-Results and X-Tern-Score fields, holds and refusals.
//!
//! The client is a stranger: it connects from 127.0.0.2 while only 127.0.0.1 is trusted, and
//! writes to a domain we serve (`mx.test`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use tern_dns::testing::{TestDns, TestZone};
use tern_tests::{queued_id, split_received, SmtpClient, TernServer, TernServerBuilder};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const RCPT: &str = "someone@mx.test";
const HOSTNAME: &str = "tern.test";

/// SPF and DMARC records for the cases below; `extra` adds more.
fn zone() -> TestZone {
    TestZone::new()
        .txt("spf-pass.test", "v=spf1 ip4:127.0.0.2 -all")
        .txt("spf-fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("spf-soft.test", "v=spf1 ip4:192.0.2.1 ~all")
        .servfail("spf-temp.test")
        // DMARC domains: SPF passes for reject.test (and its subdomain mail.reject.test), fails
        // for the others.
        .txt("reject.test", "v=spf1 ip4:127.0.0.2 -all")
        .txt("mail.reject.test", "v=spf1 ip4:127.0.0.2 -all")
        .txt("_dmarc.reject.test", "v=DMARC1; p=reject")
        .txt("quarantine.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
        .txt("none.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.none.test", "v=DMARC1; p=none")
}

fn server(dns: &TestDns, f: impl FnOnce(TernServerBuilder) -> TernServerBuilder) -> TernServer {
    f(TernServer::builder()
        .relay_networks(&["127.0.0.1/32"])
        .relay_domains(&["mx.test"])
        .set_list("dns.nameservers", &[&dns.addr().to_string()])
        .set("dns.timeout", "1s"))
    .start()
}

fn stranger(server: &TernServer) -> SmtpClient {
    let mut c = SmtpClient::connect_from(CLIENT, server.smtp);
    c.read_reply().expect_code(220);
    c.ehlo("mail.client.test").expect_code(250);
    c
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{}@client.test>\r\n\r\nHello.\r\n",
        tern_tests::unique_token()
    )
}

/// Sends `body` from `sender`; the reply to the final dot.
fn send(c: &mut SmtpClient, sender: &str, body: &str) -> tern_tests::Reply {
    c.send_mail(sender, &[RCPT], body)
}

/// The spooled content after our Received field: (Authentication-Results, X-Tern-Score,
/// the whole rest).
fn fields(server: &TernServer, id: &str) -> (String, String, String) {
    let text = server.spooled_text(id);
    let (_, rest) = split_received(&text);
    let unfolded = rest.replace("\r\n\t", " ").replace("\r\n ", " ");
    let field = |name: &str| {
        unfolded
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {rest}"))
            .to_string()
    };
    (
        field("Authentication-Results:"),
        field("X-Tern-Score:"),
        rest,
    )
}

#[test]
fn spf_results_are_recorded_and_fail_refuses_mail_from_when_configured() {
    let dns = TestDns::start(zone());
    let mut s = server(&dns, |b| b);
    let mut c = stranger(&s);
    let cases = [
        ("a@spf-pass.test", "spf=pass"),
        ("a@spf-fail.test", "spf=fail"),
        ("a@spf-soft.test", "spf=softfail"),
        ("a@spf-none.test", "spf=none"),
        ("a@spf-temp.test", "spf=temperror"),
    ];
    let ids: Vec<String> = cases
        .iter()
        .map(|(sender, _)| queued_id(&send(&mut c, sender, &message(sender, "spf"))))
        .collect();
    // The null sender is checked by its HELO name (RFC 7208 §2.4): none here.
    let bounce = queued_id(&send(
        &mut c,
        "",
        &message("mailer-daemon@x.test", "bounce"),
    ));
    s.stop();
    for ((sender, want), id) in cases.iter().zip(&ids) {
        let (ar, score, _) = fields(&s, id);
        assert!(
            ar.starts_with(&format!("Authentication-Results: {HOSTNAME};")),
            "{ar}"
        );
        assert!(ar.contains(want), "{sender}: want {want} in {ar}");
        assert!(ar.contains(&format!("smtp.mailfrom={sender}")), "{ar}");
        // The built-in rules score SPF failures.
        let fail_rule = match *want {
            "spf=fail" => Some("SPF_FAIL=3"),
            "spf=softfail" => Some("SPF_SOFTFAIL=1"),
            _ => None,
        };
        if let Some(rule) = fail_rule {
            assert!(score.contains(rule), "{score}");
        } else {
            assert!(!score.contains("SPF_"), "{score}");
        }
    }
    let (ar, _, _) = fields(&s, &bounce);
    assert!(
        ar.contains("spf=none") && ar.contains("smtp.helo=mail.client.test"),
        "{ar}"
    );

    // policy.spf = "reject": a fail refuses MAIL FROM, a softfail does not.
    let s = server(&dns, |b| b.set("policy.spf", "reject"));
    let mut c = stranger(&s);
    c.cmd("MAIL FROM:<a@spf-fail.test>").expect("550", "5.7.23");
    c.cmd("MAIL FROM:<a@spf-soft.test>").expect("250", "2.1.0");
    c.cmd("RSET").expect_code(250);
    // Trusted clients are not SPF-checked (their mail is ours to send).
    let mut t = s.session();
    t.cmd("MAIL FROM:<a@spf-fail.test>").expect("250", "2.1.0");
}

#[test]
fn dmarc_policies_with_aligned_and_unaligned_from() {
    let dns = TestDns::start(zone());
    let mut s = server(&dns, |b| b);
    let mut c = stranger(&s);
    // Aligned SPF pass: strict (same domain) and relaxed (a subdomain of the From domain).
    let aligned = queued_id(&send(
        &mut c,
        "a@reject.test",
        &message("a@reject.test", "aligned"),
    ));
    let relaxed = queued_id(&send(
        &mut c,
        "bounces@mail.reject.test",
        &message("a@reject.test", "relaxed"),
    ));
    // SPF passes for another domain: not aligned with From, and no DKIM: p=reject refuses.
    send(
        &mut c,
        "a@spf-pass.test",
        &message("a@reject.test", "unaligned"),
    )
    .expect("550", "5.7.1");
    // p=quarantine: accepted and held.
    let quarantined = queued_id(&send(
        &mut c,
        "a@quarantine.test",
        &message("a@quarantine.test", "quarantine"),
    ));
    // p=none: accepted, reported, scored.
    let none = queued_id(&send(
        &mut c,
        "a@none.test",
        &message("a@none.test", "none"),
    ));
    s.stop();

    for id in [&aligned, &relaxed] {
        let (ar, score, _) = fields(&s, id);
        assert!(
            ar.contains("dmarc=pass header.from=reject.test policy.dmarc=reject"),
            "{ar}"
        );
        assert!(!score.contains("DMARC"), "{score}");
        assert_eq!(s.spooled_message(id).envelope.hold, None);
    }
    let (ar, _, _) = fields(&s, &quarantined);
    assert!(
        ar.contains("dmarc=fail header.from=quarantine.test policy.dmarc=quarantine"),
        "{ar}"
    );
    assert_eq!(
        s.spooled_message(&quarantined).envelope.hold.as_deref(),
        Some("DMARC policy quarantine of quarantine.test")
    );
    let (ar, score, _) = fields(&s, &none);
    assert!(ar.contains("dmarc=fail header.from=none.test"), "{ar}");
    assert!(score.contains("DMARC_FAIL=2"), "{score}");
    assert_eq!(s.spooled_message(&none).envelope.hold, None);

    // policy.dmarc = "hold": p=reject holds instead of refusing.
    let mut s = server(&dns, |b| b.set("policy.dmarc", "hold"));
    let mut c = stranger(&s);
    let held = queued_id(&send(
        &mut c,
        "a@spf-pass.test",
        &message("a@reject.test", "unaligned"),
    ));
    s.stop();
    assert_eq!(
        s.spooled_message(&held).envelope.hold.as_deref(),
        Some("DMARC policy reject of reject.test")
    );
}

#[test]
fn failing_subdomain_mail_gets_the_organizational_sp_policy_unless_it_has_its_own_record() {
    // RFC 7489 §6.6.3: a record found at the organizational domain applies its sp= to mail
    // from a subdomain with no record of its own. SPF fails for every sender here and nothing
    // is signed, so DMARC fails for all of them.
    let fail = "v=spf1 ip4:192.0.2.1 -all";
    let dns = TestDns::start(
        zone()
            .txt("_dmarc.sp-none.test", "v=DMARC1; p=reject; sp=none")
            .txt("sp-none.test", fail)
            .txt("sub.sp-none.test", fail)
            .txt("_dmarc.sp-reject.test", "v=DMARC1; p=none; sp=reject")
            .txt("sp-reject.test", fail)
            .txt("sub.sp-reject.test", fail)
            .txt("own.sp-reject.test", fail)
            .txt("_dmarc.own.sp-reject.test", "v=DMARC1; p=none"),
    );
    let mut s = server(&dns, |b| b);
    let mut c = stranger(&s);
    let mut sent = |from: &str| send(&mut c, from, &message(from, "sp"));

    // p=reject at the organizational domain itself...
    sent("a@sp-none.test").expect("550", "5.7.1");
    // ...but sp=none for its subdomain: accepted, reported as none.
    let sub_none = queued_id(&sent("a@sub.sp-none.test"));
    // p=none; sp=reject: the domain's own mail passes, its subdomain's is refused...
    let org_none = queued_id(&sent("a@sp-reject.test"));
    sent("a@sub.sp-reject.test").expect("550", "5.7.1");
    // ...unless the subdomain publishes its own record, whose p= applies.
    let own = queued_id(&sent("a@own.sp-reject.test"));
    s.stop();

    for (id, domain) in [
        (&sub_none, "sub.sp-none.test"),
        (&org_none, "sp-reject.test"),
        (&own, "own.sp-reject.test"),
    ] {
        let (ar, _, _) = fields(&s, id);
        assert!(
            ar.contains(&format!(
                "dmarc=fail header.from={domain} policy.dmarc=none"
            )),
            "{ar}"
        );
        assert_eq!(s.spooled_message(id).envelope.hold, None, "{domain}");
    }
}

/// Runs tests/tools/dkimpy_tool.py.
fn dkimpy(args: &[&str], input: &[u8]) -> Vec<u8> {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/dkimpy_tool.py");
    let mut child = Command::new("python3")
        .arg(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs it with dkimpy)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dkimpy_tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn dkimpy_signatures_and_arc_seals_verify() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("example.pem");
    let arc_key = keys.path().join("forwarder.pem");
    let key = key.to_str().unwrap();
    let arc_key = arc_key.to_str().unwrap();
    let record = String::from_utf8(dkimpy(&["keygen", key], b"")).unwrap();
    let arc_record = String::from_utf8(dkimpy(&["keygen", arc_key], b"")).unwrap();
    // SPF fails for example.org from the client's address, so DMARC (p=reject) rests on DKIM.
    let dns = TestDns::start(
        zone()
            .txt("example.org", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.example.org", "v=DMARC1; p=reject")
            .txt("s1._domainkey.example.org", record.trim())
            .txt("arc._domainkey.forwarder.test", arc_record.trim()),
    );
    let mut s = server(&dns, |b| b);
    let mut c = stranger(&s);
    let plain = message("alice@example.org", "signed by dkimpy");
    let signed = String::from_utf8(dkimpy(
        &["sign", "s1", "example.org", key],
        plain.as_bytes(),
    ))
    .unwrap();
    assert!(signed.starts_with("DKIM-Signature:"), "{signed}");
    let good = queued_id(&send(&mut c, "alice@example.org", &signed));
    // A changed body breaks the signature; SPF fails too: DMARC p=reject refuses.
    send(
        &mut c,
        "alice@example.org",
        &signed.replace("Hello.", "Hello, forged."),
    )
    .expect("550", "5.7.1");

    // A forwarder verified a signature, wrote its Authentication-Results and sealed (ARC i=1).
    // (From a domain without DMARC, so a broken copy is still accepted and can be inspected.)
    let post = message("bob@lists.test", "signed by dkimpy");
    let post =
        String::from_utf8(dkimpy(&["sign", "s1", "example.org", key], post.as_bytes())).unwrap();
    let forwarded =
        format!("Authentication-Results: forwarder.test; dkim=pass header.d=example.org\r\n{post}");
    let sealed = String::from_utf8(dkimpy(
        &["arc", "arc", "forwarder.test", arc_key, "forwarder.test"],
        forwarded.as_bytes(),
    ))
    .unwrap();
    assert!(sealed.starts_with("ARC-Seal: i=1"), "{sealed}");
    let arc_ok = queued_id(&send(&mut c, "list@spf-pass.test", &sealed));
    let arc_broken = queued_id(&send(
        &mut c,
        "list@spf-pass.test",
        &sealed.replace(
            "Subject: signed by dkimpy",
            "Subject: [list] signed by dkimpy",
        ),
    ));
    s.stop();

    let (ar, score, _) = fields(&s, &good);
    assert!(
        ar.contains("dkim=pass header.i=@example.org header.s=s1"),
        "{ar}"
    );
    assert!(ar.contains("spf=fail"), "{ar}");
    assert!(ar.contains("dmarc=pass header.from=example.org"), "{ar}");
    assert!(!score.contains("DKIM_"), "{score}");

    let (ar, _, _) = fields(&s, &arc_ok);
    assert!(ar.contains("arc=pass"), "{ar}");
    assert!(ar.contains("dkim=pass"), "{ar}");
    let (ar, score, _) = fields(&s, &arc_broken);
    assert!(ar.contains("arc=fail"), "{ar}");
    assert!(ar.contains("dkim=fail"), "{ar}");
    assert!(
        score.contains("ARC_FAIL=1") && score.contains("DKIM_FAIL=2"),
        "{score}"
    );
}

#[test]
fn dns_failures_in_dkim_key_and_dmarc_lookups_are_temperror_not_fail() {
    // Every domain's SPF fails from the client's address, so DMARC rests on DKIM.
    // - dkim-temp.test (p=reject): its key's name, and a subdomain's a forger could pick,
    //   answer SERVFAIL;
    // - strict-temp.test (p=reject, adkim=s): a subdomain's key name answers SERVFAIL;
    // - dmarc-temp.test: its DMARC record's name answers SERVFAIL;
    // - sub.orgpol.test: its own DMARC name answers SERVFAIL, its organizational domain has
    //   p=none, sp=reject; sub.orgonly.test the same under p=reject (sp= the same);
    // - reject.test: a signature whose key does not exist (NXDOMAIN), the permanent case.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("k.pem");
    let key = key.to_str().unwrap();
    dkimpy(&["keygen", key], b"");
    let dns = TestDns::start(
        zone()
            .txt("dkim-temp.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.dkim-temp.test", "v=DMARC1; p=reject")
            .servfail("s1._domainkey.dkim-temp.test")
            .servfail("s1._domainkey.lame.dkim-temp.test")
            .txt("strict-temp.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.strict-temp.test", "v=DMARC1; p=reject; adkim=s")
            .servfail("s1._domainkey.sub.strict-temp.test")
            .txt("dmarc-temp.test", "v=spf1 ip4:192.0.2.1 -all")
            .servfail("_dmarc.dmarc-temp.test")
            .txt("sub.orgpol.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.orgpol.test", "v=DMARC1; p=none; sp=reject")
            .servfail("_dmarc.sub.orgpol.test")
            .txt("sub.orgonly.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.orgonly.test", "v=DMARC1; p=reject")
            .servfail("_dmarc.sub.orgonly.test"),
    );
    let sign = |from: &str, domain: &str| {
        let plain = message(from, "signed");
        String::from_utf8(dkimpy(&["sign", "s1", domain, key], plain.as_bytes())).unwrap()
    };
    let mut s = server(&dns, |b| b);
    let mut c = stranger(&s);
    // A key that cannot be fetched for now, under p=reject: neither refused for good (it may
    // be genuine) nor let through (it may be forged): the sender is asked to retry.
    send(
        &mut c,
        "alice@dkim-temp.test",
        &sign("alice@dkim-temp.test", "dkim-temp.test"),
    )
    .expect("451", "4.7.1");
    // The same from a signing domain a forger chose under the victim's.
    send(
        &mut c,
        "alice@dkim-temp.test",
        &sign("alice@dkim-temp.test", "lame.dkim-temp.test"),
    )
    .expect("451", "4.7.1");
    // adkim=s: a subdomain's signature could never align, whatever its key: a plain failure.
    send(
        &mut c,
        "a@strict-temp.test",
        &sign("a@strict-temp.test", "sub.strict-temp.test"),
    )
    .expect("550", "5.7.1");
    // The From domain's own record unknown for now: its organizational domain's sp=reject
    // might not be the one that applies.
    send(
        &mut c,
        "a@sub.orgpol.test",
        &message("a@sub.orgpol.test", "unsigned"),
    )
    .expect("451", "4.7.1");
    send(
        &mut c,
        "a@sub.orgonly.test",
        &message("a@sub.orgonly.test", "unsigned"),
    )
    .expect("451", "4.7.1");
    // A key that does not exist is a permanent error: DMARC fails, p=reject refuses.
    send(
        &mut c,
        "a@spf-pass.test",
        &sign("a@reject.test", "reject.test"),
    )
    .expect("550", "5.7.1");
    // No record could be read at all: no policy to apply; accepted, the result recorded.
    let record_servfail = queued_id(&send(
        &mut c,
        "a@dmarc-temp.test",
        &message("a@dmarc-temp.test", "unsigned"),
    ));
    s.stop();
    let (ar, _, _) = fields(&s, &record_servfail);
    assert!(
        ar.contains("dmarc=temperror header.from=dmarc-temp.test"),
        "{ar}"
    );

    // policy.dmarc = "hold": held for the operator instead, with the results recorded.
    let mut s = server(&dns, |b| b.set("policy.dmarc", "hold"));
    let mut c = stranger(&s);
    let held = queued_id(&send(
        &mut c,
        "alice@dkim-temp.test",
        &sign("alice@dkim-temp.test", "dkim-temp.test"),
    ));
    s.stop();
    let (ar, _, _) = fields(&s, &held);
    assert!(
        ar.contains("dkim=temperror") && ar.contains("header.i=@dkim-temp.test"),
        "{ar}"
    );
    assert!(
        ar.contains("dmarc=temperror header.from=dkim-temp.test policy.dmarc=reject"),
        "{ar}"
    );
    assert_eq!(
        s.spooled_message(&held).envelope.hold.as_deref(),
        Some("DMARC temperror under policy reject of dkim-temp.test")
    );
}

#[test]
fn content_rules_score_hold_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
name = "SUBJECT_LOTTERY"
header = "Subject"
pattern = "(?i)lottery"
score = 7

[[rule]]
name = "BODY_WIRE"
body = "(?i)wire transfer now"
score = 20

[[rule]]
name = "SPF_FAIL_SMALL"
check = "spf_fail"
score = 0.5
"#,
    )
    .unwrap();
    let dns = TestDns::start(zone());
    let mut s = server(&dns, |b| {
        b.set("policy.rules_file", rules.to_str().unwrap())
    });
    let mut c = stranger(&s);
    let clean = queued_id(&send(
        &mut c,
        "a@spf-pass.test",
        &message("a@spf-pass.test", "hello"),
    ));
    let held = queued_id(&send(
        &mut c,
        "a@spf-pass.test",
        &message("a@spf-pass.test", "You won the LOTTERY"),
    ));
    let spam = message("a@spf-pass.test", "hi").replace("Hello.", "Send a wire transfer now!");
    send(&mut c, "a@spf-pass.test", &spam).expect("550", "5.7.1");
    // Fields claiming to be ours are dropped; others' Authentication-Results stay.
    let spoof = format!(
        "Authentication-Results: {HOSTNAME}; dkim=pass header.d=bank.test\r\nAuthentication-Results: elsewhere.test; spf=pass\r\nX-Tern-Score: -100 (TRUST_ME=-100)\r\n{}",
        message("a@spf-pass.test", "spoof")
    );
    let spoofed = queued_id(&send(&mut c, "a@spf-pass.test", &spoof));
    // A trusted client's mail is not scored or annotated.
    let mut t = s.session();
    let trusted = queued_id(&t.send_mail(
        "a@spf-pass.test",
        &[RCPT],
        &message("a@spf-pass.test", "lottery"),
    ));
    s.stop();

    let (_, score, _) = fields(&s, &clean);
    assert_eq!(score, "X-Tern-Score: 0.0 ()");
    assert_eq!(s.spooled_message(&clean).envelope.hold, None);
    let (_, score, _) = fields(&s, &held);
    assert_eq!(score, "X-Tern-Score: 7.0 (SUBJECT_LOTTERY=7)");
    assert_eq!(
        s.spooled_message(&held).envelope.hold.as_deref(),
        Some("content score 7.0 >= quarantine_score 6")
    );
    let (_, _, rest) = fields(&s, &spoofed);
    assert_eq!(rest.matches("Authentication-Results:").count(), 2, "{rest}");
    assert!(!rest.contains("bank.test"), "{rest}");
    assert!(rest.contains("elsewhere.test"), "{rest}");
    assert!(!rest.contains("TRUST_ME"), "{rest}");
    let text = s.spooled_text(&trusted);
    assert!(
        !text.contains("X-Tern-Score") && !text.contains("Authentication-Results"),
        "{text}"
    );

    // A broken rules file stops `tern config check` with the key and the file named.
    std::fs::write(&rules, "[[rule]]\nname = \"X\"\nbody = \"(\"\nscore = 1\n").unwrap();
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        format!("[policy]\nrules_file = {:?}\n", rules.to_str().unwrap()),
    )
    .unwrap();
    let out = tern_tests::config_check(&config, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("policy.rules_file") && err.contains("rules.toml") && err.contains("rule X"),
        "{err}"
    );
}

/// Runs `tern queue ARGS` against `server`; stdout, asserting success.
fn queue(server: &TernServer, args: &[&str]) -> String {
    let http = server.http.to_string();
    let mut all = vec!["queue", "--http", &http];
    all.extend_from_slice(args);
    let out = tern_tests::tern_cmd(&all);
    assert!(
        out.status.success(),
        "tern queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_quarantined_message_waits_in_the_hold_state_until_released() {
    use std::time::Duration;
    use tern_tests::sink::{Sink, SinkConfig};
    let wait = Duration::from_secs(20);
    let sink = Sink::start(SinkConfig::default());
    let dns = TestDns::start(zone());
    let server = server(&dns, |b| {
        b.set("delivery.enabled", true)
            .set("delivery.idle_timeout", "1s")
            .route("*", Some(&sink.addr().to_string()), "none")
    });
    let mut c = stranger(&server);
    // p=quarantine and SPF fails: held. A clean message goes straight through.
    let held = queued_id(&send(
        &mut c,
        "a@quarantine.test",
        &message("a@quarantine.test", "quarantined"),
    ));
    let clean = queued_id(&send(
        &mut c,
        "a@spf-pass.test",
        &message("a@spf-pass.test", "clean"),
    ));
    assert_eq!(
        server.wait_event("delivered", RCPT, wait)["queue_id"],
        clean.as_str()
    );
    let list: serde_json::Value =
        serde_json::from_str(&queue(&server, &["list", "--state", "held", "--json"])).unwrap();
    let listed = list.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(listed[0]["id"], held.as_str());
    assert_eq!(
        listed[0]["hold"],
        "DMARC policy quarantine of quarantine.test"
    );
    assert_eq!(sink.messages().len(), 1, "only the clean message left");

    queue(&server, &["release", &held]);
    let got = sink.wait_for_messages(2, wait);
    let released = String::from_utf8_lossy(&got[1].data).into_owned();
    assert!(released.contains("Subject: quarantined"), "{released}");
    assert!(
        released.contains("dmarc=fail header.from=quarantine.test"),
        "the annotation travels with the message: {released}"
    );
    server.wait_queued(0, wait);
}
