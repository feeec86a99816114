//! Server replies fed in random pieces must parse the same as fed whole, and never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern_smtp::reply::{Capabilities, Reply, ReplyError, ReplyParser};

fn parse(pieces: &[&[u8]]) -> Vec<Result<Reply, ReplyError>> {
    let mut parser = ReplyParser::with_limits(64, 8);
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        while let Some(r) = parser.ingest(&mut buf) {
            replies.push(r);
        }
        assert!(
            buf.len() <= 66,
            "parser let the buffer grow to {}",
            buf.len()
        );
    }
    replies
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let mut seed = u64::from(data[0]) | 1;
    let input = &data[1..];
    let whole = parse(&[input]);
    let mut pieces = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed % (rest.len().min(80) as u64 + 1)) as usize;
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    assert_eq!(parse(&pieces), whole);
    for reply in whole.into_iter().flatten() {
        let _ = Capabilities::from_ehlo_reply(&reply);
        let _ = reply.to_bytes();
        let _ = reply.to_string();
    }
});
