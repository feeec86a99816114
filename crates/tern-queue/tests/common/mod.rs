//! Message builders shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use bytes::Bytes;
use tern_message::{
    now_ms, BodyType, ClientInfo, Envelope, InboundMessage, Notify, QueueId, Recipient, Ret,
};
use tern_queue::SledOptions;

/// Options for tests: a small cache and no free-space reserve, so the tests pass on a nearly full
/// disk too (the guard has its own test).
pub fn opts() -> SledOptions {
    SledOptions {
        cache_bytes: 16 << 20,
        min_free_bytes: 0,
        ..SledOptions::default()
    }
}

/// An envelope that uses every optional field, so a round trip checks them all.
pub fn envelope() -> Envelope {
    Envelope {
        sender: "alice@example.org".into(),
        recipients: vec![
            Recipient::new("bob@example.net"),
            Recipient {
                address: "carol@exämple.com".into(),
                notify: Some(Notify {
                    success: true,
                    failure: true,
                    delay: false,
                }),
                orcpt: Some("rfc822;carol+2Bx@example.com".into()),
                state: Default::default(),
            },
        ],
        body_type: BodyType::EightBitMime,
        smtputf8: true,
        ret: Some(Ret::Hdrs),
        envid: Some("QQ314159".into()),
        auth: Some("<>".into()),
        delay_warned: false,
        hold: None,
    }
}

pub fn client() -> ClientInfo {
    ClientInfo {
        addr: "[2001:db8::25]:54321".parse().unwrap(),
        local_addr: "192.0.2.10:25".parse().unwrap(),
        helo: "mx.example.org".into(),
        tls: Some("TLSv1.3 TLS_AES_256_GCM_SHA384".into()),
        auth_user: Some("alice".into()),
    }
}

/// Deterministic pseudo-random body for `id`: every byte value occurs (CR, LF, NUL, 0xff), and
/// a body can be regenerated from its id and length to check it byte for byte.
pub fn body_for(id: QueueId, len: usize) -> Bytes {
    let seed = u128::from_be_bytes(id.to_bytes());
    let mut x = (seed as u64) ^ ((seed >> 64) as u64) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&v.to_le_bytes()[..take]);
    }
    Bytes::from(out)
}

pub fn message_with_id(id: QueueId, body_len: usize) -> InboundMessage {
    InboundMessage {
        id,
        envelope: envelope(),
        client: client(),
        arrived_ms: now_ms(),
        body: body_for(id, body_len),
    }
}

pub fn message(body_len: usize) -> InboundMessage {
    message_with_id(QueueId::new(), body_len)
}
