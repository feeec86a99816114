//! RFC 5321 commands and their replies, one behaviour per test, over a raw socket to the real
//! binary. Reply codes and RFC 3463 enhanced codes are what the spec (docs/testing.md) asks for.

use std::time::Duration;

use tern_tests::{queued_id, simple_message, split_received, TernServer, FOREIGN_DOMAIN, HOSTNAME};

#[test]
fn greeting_is_220_and_names_the_host() {
    let server = TernServer::start();
    let mut c = server.connect();
    let greeting = c.read_reply();
    greeting.expect_code(220);
    assert!(
        greeting.lines[0].starts_with(HOSTNAME),
        "greeting should start with the configured hostname: {greeting}"
    );
}

#[test]
fn ehlo_reply_names_the_host_and_is_multiline() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    let r = c.ehlo("client.test");
    r.expect_code(250);
    assert!(r.lines[0].starts_with(HOSTNAME), "EHLO first line: {r}");
    assert!(r.lines.len() > 1, "EHLO lists extensions: {r}");
}

#[test]
fn helo_is_accepted_and_allows_a_transaction() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    let r = c.cmd("HELO client.test");
    r.expect_code(250);
    assert_eq!(r.lines.len(), 1, "HELO reply is a single line: {r}");
    let reply = c.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        &simple_message("a@client.test", "b@elsewhere.test", "helo"),
    );
    queued_id(&reply);
}

#[test]
fn ehlo_and_helo_without_a_domain_are_501_5_5_4() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.cmd("EHLO").expect("501", "5.5.4");
    c.cmd("HELO").expect("501", "5.5.4");
    c.cmd("EHLO client.test").expect_code(250);
}

#[test]
fn noop_is_250_2_0_0() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("NOOP").expect("250", "2.0.0");
    // NOOP may carry a parameter (RFC 5321 §4.1.1.9).
    c.cmd("NOOP ignored-argument").expect("250", "2.0.0");
}

#[test]
fn rset_is_250_2_0_0_and_clears_the_transaction() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd(&format!("RCPT TO:<b@{FOREIGN_DOMAIN}>"))
        .expect("250", "2");
    c.cmd("RSET").expect("250", "2.0.0");
    // The envelope is gone: DATA has no recipients now, and MAIL is allowed again.
    c.cmd("DATA").expect("503", "5.5.1");
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
}

#[test]
fn quit_is_221_2_0_0_and_closes() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("QUIT").expect("221", "2.0.0");
    c.expect_closed(Duration::from_secs(5));
}

#[test]
fn help_is_214() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("HELP").expect("214", "2");
}

#[test]
fn vrfy_and_expn_are_252_by_default() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("VRFY postmaster").expect("252", "2");
    c.cmd("EXPN staff").expect("252", "2");
}

#[test]
fn vrfy_refuse_policy_is_502_5_5_1() {
    let server = TernServer::builder().set("smtp.vrfy", "refuse").start();
    let mut c = server.session();
    c.cmd("VRFY postmaster").expect("502", "5.5.1");
}

#[test]
fn verb_gets_a_well_formed_reply_with_enhanced_code() {
    let server = TernServer::start();
    let mut c = server.session();
    let r = c.cmd("VERB");
    assert!(r.code / 100 == 2 || r.code / 100 == 5, "VERB → {r}");
    r.expect_enhanced();
    // The session is still usable afterwards.
    c.cmd("NOOP").expect("250", "2.0.0");
}

#[test]
fn unknown_command_is_500_5_5_1() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("FROBNICATE now").expect("500", "5.5.1");
    c.cmd("NOOP").expect("250", "2.0.0");
}

#[test]
fn commands_are_case_insensitive() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.cmd("ehlo client.test").expect_code(250);
    c.cmd("mail from:<a@client.test>").expect("250", "2");
    c.cmd(&format!("rCpT tO:<b@{FOREIGN_DOMAIN}>"))
        .expect("250", "2");
    c.cmd("noop").expect("250", "2.0.0");
}

#[test]
fn mail_before_helo_is_503_5_5_1() {
    let server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.cmd("MAIL FROM:<a@client.test>").expect("503", "5.5.1");
}

#[test]
fn rcpt_before_mail_is_503_5_5_1() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd(&format!("RCPT TO:<b@{FOREIGN_DOMAIN}>"))
        .expect("503", "5.5.1");
}

#[test]
fn data_before_rcpt_is_503_5_5_1() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("DATA").expect("503", "5.5.1");
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("DATA").expect("503", "5.5.1");
}

#[test]
fn nested_mail_is_503_5_5_1() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("MAIL FROM:<other@client.test>")
        .expect("503", "5.5.1");
}

#[test]
fn mail_without_colon_or_brackets_is_501_5_5_4() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM a@client.test").expect("501", "5.5.4");
    c.cmd("MAIL").expect("501", "5.5.4");
}

#[test]
fn bad_sender_address_is_501_5_1_7() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<not an address>").expect("501", "5.1.7");
    c.cmd("MAIL FROM:<a@@client.test>").expect("501", "5.1.7");
}

#[test]
fn bad_recipient_address_is_501_5_1_3() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@>").expect("501", "5.1.3");
    c.cmd("RCPT TO:<two words@elsewhere.test>")
        .expect("501", "5.1.3");
}

#[test]
fn unknown_mail_parameter_is_555_5_5_4() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test> FROB=1")
        .expect("555", "5.5.4");
}

#[test]
fn unknown_rcpt_parameter_is_555_5_5_4() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd(&format!("RCPT TO:<b@{FOREIGN_DOMAIN}> FROB=1"))
        .expect("555", "5.5.4");
}

#[test]
fn null_sender_is_accepted() {
    let server = TernServer::start();
    let mut c = server.session();
    let reply = c.send_mail(
        "",
        &["b@elsewhere.test"],
        "From: <>\r\nSubject: bounce\r\n\r\nA bounce.\r\n",
    );
    queued_id(&reply);
}

#[test]
fn postmaster_is_always_accepted() {
    // A client outside relay.networks may still write to <postmaster> (RFC 5321 §4.5.1).
    let server = TernServer::builder()
        .relay_networks(&["192.0.2.0/24"])
        .start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<postmaster>").expect("250", "2");
    c.cmd("RCPT TO:<Postmaster>").expect("250", "2");
}

#[test]
fn data_reply_is_queued_as_id_and_the_message_is_spooled() {
    let mut server = TernServer::start();
    let mut c = server.session();
    let body = simple_message("a@client.test", "b@elsewhere.test", "spooled");
    let reply = c.send_mail(
        "a@client.test",
        &["b@elsewhere.test", "c@elsewhere.test"],
        &body,
    );
    let id = queued_id(&reply);
    c.cmd("QUIT").expect("221", "2.0.0");
    server.stop();
    let spool = server.spool_list();
    let entry = spool
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("id {id} not in spool: {spool:?}"));
    assert_eq!(entry.sender, "a@client.test");
    assert_eq!(
        entry.recipients,
        vec!["b@elsewhere.test", "c@elsewhere.test"]
    );
    // The stored message is the body plus the prepended Received header.
    assert!(
        entry.size > body.len() as u64,
        "stored size {} should exceed the {} bytes sent (Received header prepended)",
        entry.size,
        body.len()
    );
    assert_eq!(spool.len(), 1, "exactly one message: {spool:?}");
}

#[test]
fn two_transactions_on_one_connection_get_distinct_ids() {
    let server = TernServer::start();
    let mut c = server.session();
    let a = queued_id(&c.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        &simple_message("a@client.test", "b@elsewhere.test", "1"),
    ));
    let b = queued_id(&c.send_mail(
        "a@client.test",
        &["b@elsewhere.test"],
        &simple_message("a@client.test", "b@elsewhere.test", "2"),
    ));
    assert_ne!(a, b);
}

#[test]
fn dot_stuffed_lines_are_accepted() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    // ".." is a stuffed "."; a lone "." only ends DATA at the start of a line.
    c.send("Subject: dots\r\n\r\n..leading dot\r\n...\r\nmid . dot\r\n.\r\n");
    queued_id(&c.read_reply());
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let server = TernServer::start();
    let mut c = server.session();
    c.send(
        "MAIL FROM:<a@client.test>\r\nRCPT TO:<b@elsewhere.test>\r\nRCPT TO:<c@elsewhere.test>\r\nDATA\r\n",
    );
    c.read_reply().expect("250", "2");
    c.read_reply().expect("250", "2");
    c.read_reply().expect("250", "2");
    c.read_reply().expect_code(354);
    c.send("Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n");
    queued_id(&c.read_reply());
    c.read_reply().expect("250", "2.0.0");
    c.read_reply().expect("221", "2.0.0");
}

#[test]
fn bdat_chunks_make_one_message() {
    let mut server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    let part1 = b"Subject: chunked\r\n\r\nfirst part, ";
    let part2 = b"second part\r\n";
    c.send([format!("BDAT {}\r\n", part1.len()).as_bytes(), part1].concat());
    c.read_reply().expect("250", "2");
    c.send([format!("BDAT {} LAST\r\n", part2.len()).as_bytes(), part2].concat());
    let id = queued_id(&c.read_reply());
    server.stop();
    let spool = server.spool_list();
    assert!(
        spool.iter().any(|e| e.id == id),
        "BDAT message {id} spooled: {spool:?}"
    );
}

#[test]
fn bdat_chunk_containing_a_lone_dot_line_is_data_not_an_end() {
    // BDAT counts octets: "\r\n.\r\n" inside a chunk is content (RFC 3030 §2).
    let mut server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    let chunk = b"Subject: dot\r\n\r\nline\r\n.\r\nafter the dot\r\n";
    c.send([format!("BDAT {} LAST\r\n", chunk.len()).as_bytes(), chunk].concat());
    let id = queued_id(&c.read_reply());
    c.cmd("NOOP").expect("250", "2.0.0");
    server.stop();
    let spool = server.spool_list();
    assert!(spool.iter().any(|e| e.id == id), "{spool:?}");
    let (_, rest) = split_received(&server.spooled_text(&id));
    assert_eq!(
        rest.as_bytes(),
        chunk,
        "BDAT content is stored verbatim, lone dot included"
    );
}

#[test]
fn bdat_0_last_ends_a_chunked_message_and_bdat_without_rcpt_is_drained() {
    // RFC 3030 §2: a zero-length LAST chunk is how a client ends a message it sent in chunks.
    let mut server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    let part = b"Subject: zero last\r\n\r\nbody\r\n";
    c.send([format!("BDAT {}\r\n", part.len()).as_bytes(), part].concat());
    c.read_reply().expect("250", "2.0.0");
    c.send("BDAT 0 LAST\r\n");
    let id = queued_id(&c.read_reply());
    // A BDAT without a transaction is refused, but its octets are still read (RFC 3030 §3):
    // the bytes "NOOP\r\n" inside the chunk must not run as a command.
    c.send("BDAT 6 LAST\r\nNOOP\r\n");
    c.read_reply().expect("503", "5.5.1");
    assert!(
        c.reply_within(std::time::Duration::from_millis(300))
            .is_none(),
        "the chunk's bytes were executed as a command"
    );
    c.cmd("NOOP").expect("250", "2.0.0");
    server.stop();
    let spool = server.spool_list();
    assert_eq!(spool.len(), 1, "{spool:?}");
    let (_, rest) = split_received(&server.spooled_text(&id));
    assert_eq!(rest.as_bytes(), part);
}

#[test]
fn body_binarymime_is_refused_because_it_is_not_advertised() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test> BODY=BINARYMIME")
        .expect("555", "5.5.4");
    // The session goes on without a transaction.
    c.cmd("MAIL FROM:<a@client.test> BODY=8BITMIME")
        .expect("250", "2.1.0");
}

#[test]
fn non_ascii_addresses_need_smtputf8() {
    // RFC 6531 §3.2: a UTF-8 address without the SMTPUTF8 parameter is refused with 553 5.6.7.
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<jörg@client.test>").expect("553", "5.6.7");
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2.1.0");
    c.cmd("RCPT TO:<ñandú@elsewhere.test>")
        .expect("553", "5.6.7");
    c.cmd("RSET").expect("250", "2.0.0");
    c.cmd("MAIL FROM:<jörg@client.test> SMTPUTF8")
        .expect("250", "2.1.0");
    c.cmd("RCPT TO:<ñandú@elsewhere.test>")
        .expect("250", "2.1.5");
}

#[test]
fn mail_with_size_and_body_parameters_is_accepted() {
    let server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<a@client.test> SIZE=1000 BODY=8BITMIME")
        .expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@elsewhere.test")
        .expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: 8bit\r\n\r\nGr\u{fc}\u{df}e aus M\u{fc}nchen\r\n.\r\n");
    queued_id(&c.read_reply());
}

#[test]
fn smtputf8_addresses_are_accepted_with_the_parameter() {
    let mut server = TernServer::start();
    let mut c = server.session();
    c.cmd("MAIL FROM:<jos\u{e9}@client.test> SMTPUTF8")
        .expect("250", "2");
    c.cmd("RCPT TO:<\u{7528}\u{6237}@elsewhere.test>")
        .expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: utf8\r\n\r\nhi\r\n.\r\n");
    let id = queued_id(&c.read_reply());
    server.stop();
    let spool = server.spool_list();
    let e = spool.iter().find(|e| e.id == id).expect("spooled");
    assert_eq!(e.sender, "jos\u{e9}@client.test");
    assert_eq!(e.recipients, vec!["\u{7528}\u{6237}@elsewhere.test"]);
}

#[test]
fn every_non_greeting_reply_has_an_enhanced_code() {
    // RFC 2034 §3: all 2xx/4xx/5xx replies except the greeting and HELO/EHLO.
    let server = TernServer::start();
    let mut c = server.session();
    for cmd in [
        "NOOP",
        "HELP",
        "VRFY someone",
        "EXPN list",
        "RSET",
        "DATA",
        "RCPT TO:<b@elsewhere.test>",
        "FROB",
        "MAIL FROM:<bad address>",
        "MAIL FROM:<a@client.test>",
        "RCPT TO:<b@elsewhere.test>",
        "RCPT TO:<>",
        "MAIL FROM:<a@client.test>",
        "RSET",
    ] {
        let r = c.cmd(cmd);
        assert!(
            r.enhanced().is_some(),
            "reply to {cmd:?} lacks an enhanced code: {r}"
        );
    }
    c.cmd("QUIT").expect("221", "2.0.0");
}

#[test]
fn stored_message_is_a_received_header_plus_the_exact_body() {
    // RFC 5321 §4.4 (Received prepended) and §4.5.2 (the server removes the stuffed dots).
    let mut server = TernServer::start();
    let mut c = server.connect();
    c.read_reply().expect_code(220);
    c.cmd("EHLO exact.client.test").expect_code(250);
    c.cmd("MAIL FROM:<a@client.test>").expect("250", "2");
    c.cmd("RCPT TO:<b@elsewhere.test>").expect("250", "2");
    c.cmd("DATA").expect_code(354);
    c.send("Subject: exact\r\n\r\n..one dot\r\n...\r\nplain\r\n\r\n.\r\n");
    let id = queued_id(&c.read_reply());
    c.cmd("QUIT").expect("221", "2.0.0");
    server.stop();
    let msg = server.spooled_message(&id);
    let text = String::from_utf8(msg.body.to_vec()).expect("utf-8");
    let (received, rest) = split_received(&text);
    assert_eq!(
        rest, "Subject: exact\r\n\r\n.one dot\r\n..\r\nplain\r\n\r\n",
        "stored body"
    );
    assert!(
        received.contains("exact.client.test"),
        "HELO name in {received:?}"
    );
    assert!(
        received.contains("127.0.0.1"),
        "client address in {received:?}"
    );
    assert!(
        received.contains(&format!("by {HOSTNAME}")),
        "our hostname in {received:?}"
    );
    assert!(received.contains(&id), "queue id in {received:?}");
    assert!(received.contains("ESMTP"), "protocol in {received:?}");
    assert_eq!(msg.envelope.sender, "a@client.test");
    assert_eq!(msg.client.helo, "exact.client.test");
    // The size `tern spool list` reports is the stored content's.
    let listed = server.spool_list();
    assert_eq!(listed[0].size, msg.body.len() as u64);
}
