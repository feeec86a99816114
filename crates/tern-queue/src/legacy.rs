//! Reading the spool format of tern before segment files (format 1), so a spool written by an
//! older build is carried over at start instead of stranded.
//!
//! Format 1 kept everything in sled: keys `kind | id (16) | chunk (u32 BE)`, `m` records holding
//! the JSON metadata and `b` records the body, both cut into 8 KiB chunks.

use bytes::BytesMut;
use serde::Deserialize;
use tern_message::{ClientInfo, Envelope, InboundMessage, QueueId};

use crate::storage::StorageError;

pub(crate) const META: u8 = b'm';
pub(crate) const BODY: u8 = b'b';
const KEY_LEN: usize = 1 + 16 + 4;

#[derive(Deserialize)]
struct MetaV1 {
    v: u32,
    id: QueueId,
    envelope: Envelope,
    client: ClientInfo,
    arrived_ms: u64,
    body_len: u64,
    body_chunks: u32,
}

/// A format-1 key, for tests that build such a spool.
#[cfg(test)]
pub(crate) fn key(kind: u8, id: QueueId, chunk: u32) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0] = kind;
    k[1..17].copy_from_slice(&id.to_bytes());
    k[17..].copy_from_slice(&chunk.to_be_bytes());
    k
}

fn prefix(kind: u8, id: QueueId) -> [u8; 17] {
    let mut p = [0u8; 17];
    p[0] = kind;
    p[1..].copy_from_slice(&id.to_bytes());
    p
}

fn parse_key(k: &[u8]) -> Option<(QueueId, u32)> {
    if k.len() != KEY_LEN {
        return None;
    }
    let id = QueueId::from_bytes(k[1..17].try_into().ok()?);
    let chunk = u32::from_be_bytes(k[17..].try_into().ok()?);
    Some((id, chunk))
}

fn concat(
    tree: &sled::Tree,
    kind: u8,
    id: QueueId,
    what: &str,
) -> Result<(BytesMut, u32), StorageError> {
    let mut buf = BytesMut::new();
    let mut n = 0u32;
    for item in tree.scan_prefix(prefix(kind, id)) {
        let (k, v) = item.map_err(crate::sled_storage::sled_err)?;
        match parse_key(&k) {
            Some((_, chunk)) if chunk == n => {}
            _ => {
                return Err(StorageError::corrupt(
                    Some(id),
                    format!("format-1 {what} chunk {n} missing"),
                ))
            }
        }
        buf.extend_from_slice(&v);
        n += 1;
    }
    Ok((buf, n))
}

/// The ids of every format-1 message, in id order (one per metadata record's first chunk).
pub(crate) fn ids(tree: &sled::Tree) -> Vec<QueueId> {
    tree.scan_prefix([META])
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| parse_key(&k))
        .filter(|(_, chunk)| *chunk == 0)
        .map(|(id, _)| id)
        .collect()
}

/// Whether any format-1 record (metadata or body) is left.
pub(crate) fn any(tree: &sled::Tree) -> bool {
    [META, BODY]
        .iter()
        .any(|k| tree.scan_prefix([*k]).next().is_some())
}

/// One format-1 message, whole.
pub(crate) fn read(tree: &sled::Tree, id: QueueId) -> Result<InboundMessage, StorageError> {
    let (meta, _) = concat(tree, META, id, "metadata")?;
    let meta: MetaV1 = serde_json::from_slice(&meta).map_err(|e| {
        StorageError::corrupt(Some(id), format!("undecodable format-1 metadata: {e}"))
    })?;
    if meta.v != 1 || meta.id != id {
        return Err(StorageError::corrupt(
            Some(id),
            "format-1 metadata of another version or id",
        ));
    }
    let (body, n) = concat(tree, BODY, id, "body")?;
    if n != meta.body_chunks || body.len() as u64 != meta.body_len {
        return Err(StorageError::corrupt(
            Some(id),
            "format-1 body does not match its metadata",
        ));
    }
    Ok(InboundMessage {
        id,
        envelope: meta.envelope,
        client: meta.client,
        arrived_ms: meta.arrived_ms,
        body: body.freeze(),
    })
}

/// Deletes every format-1 record of `id` (not durable until the next sled flush).
pub(crate) fn remove(tree: &sled::Tree, id: QueueId) -> Result<(), StorageError> {
    for kind in [META, BODY] {
        for k in tree.scan_prefix(prefix(kind, id)).keys() {
            tree.remove(k.map_err(crate::sled_storage::sled_err)?)
                .map_err(crate::sled_storage::sled_err)?;
        }
    }
    Ok(())
}

/// Deletes every format-1 record whatever its state (after the readable ones were carried over,
/// what is left is damaged and was reported).
pub(crate) fn clear(tree: &sled::Tree) -> Result<usize, StorageError> {
    let mut n = 0;
    for kind in [META, BODY] {
        for k in tree.scan_prefix([kind]).keys() {
            tree.remove(k.map_err(crate::sled_storage::sled_err)?)
                .map_err(crate::sled_storage::sled_err)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Writes `msg` in format 1, for the migration test.
#[cfg(test)]
pub(crate) fn write(tree: &sled::Tree, msg: &InboundMessage) {
    let meta = serde_json::json!({
        "v": 1,
        "id": msg.id,
        "envelope": msg.envelope,
        "client": msg.client,
        "arrived_ms": msg.arrived_ms,
        "body_len": msg.body.len(),
        "body_chunks": msg.body.len().div_ceil(8 << 10),
    });
    let meta = serde_json::to_vec(&meta).unwrap();
    for (i, piece) in meta.chunks(8 << 10).enumerate() {
        tree.insert(key(META, msg.id, i as u32), piece).unwrap();
    }
    for (i, piece) in msg.body.chunks(8 << 10).enumerate() {
        tree.insert(key(BODY, msg.id, i as u32), piece).unwrap();
    }
}
