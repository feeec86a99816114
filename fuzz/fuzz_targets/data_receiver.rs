//! DATA decoding fed in random pieces must equal decoding the input whole, never panic, and
//! never append more than the size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_smtp::data::{BareLineEndings, DataLimits, DataReceiver};

fn feed(
    limits: DataLimits,
    pieces: &[&[u8]],
) -> (Vec<u8>, usize, bool, tern_smtp::data::DataOutcome) {
    let mut rx = DataReceiver::new(limits);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut done = false;
    for piece in pieces {
        let (n, d) = rx.ingest(piece, &mut out);
        assert!(n <= piece.len());
        consumed += n;
        assert!(out.len() <= limits.max_size);
        if d {
            done = true;
            break;
        }
        assert_eq!(n, piece.len());
    }
    (out, consumed, done, rx.outcome())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // The first four octets pick the limits, the mode and how to split the rest.
    let limits = DataLimits {
        max_size: usize::from(data[0]) * 4,
        max_line: usize::from(data[1]),
        bare_line_endings: if data[2] & 1 == 0 {
            BareLineEndings::Reject
        } else {
            BareLineEndings::Normalize
        },
    };
    let mut seed = u64::from(data[3]) | 1;
    let input = &data[4..];

    let whole = feed(limits, &[input]);
    let mut pieces = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed % (rest.len() as u64 + 1)) as usize;
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    assert_eq!(feed(limits, &pieces), whole);
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(feed(limits, &bytes), whole);
    if whole.2 {
        assert!(input[..whole.1].ends_with(b".\r\n"));
    }
});
