//! SledStorage on a real sled database in a temporary directory.

mod common;

use common::{message, message_with_id, opts};
use tern_message::{QueueId, RecipientState, SpoolError};
use tern_queue::{SledOptions, SledStorage, Storage, StorageError};

#[test]
fn messages_survive_reopen_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [0usize, 1, 5_000, 200_000, 10_000_000];
    let msgs: Vec<_> = sizes.iter().map(|&n| message(n)).collect();
    {
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        for m in &msgs {
            s.insert(m).unwrap();
        }
        s.sync().unwrap();
        assert_eq!(s.len(), sizes.len());
    }
    let s = SledStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(s.len(), sizes.len());
    for m in &msgs {
        let got = s.get(m.id).unwrap().expect("message lost across reopen");
        assert_eq!(got.body.len(), m.body.len());
        assert!(got.body == m.body, "body of {} differs", m.body.len());
        assert_eq!(&got, m);
    }
    let metas: Vec<_> = s.scan().map(Result::unwrap).collect();
    assert_eq!(metas.len(), sizes.len());
    for meta in &metas {
        let m = msgs.iter().find(|m| m.id == meta.id).unwrap();
        assert_eq!(meta.envelope, m.envelope);
        assert_eq!(meta.client, m.client);
        assert_eq!(meta.arrived_ms, m.arrived_ms);
        assert_eq!(meta.body_len, m.body.len() as u64);
    }
    // No value may have been spilled to a sled blob file (those are written without fsync).
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert_eq!(blobs, 0, "sled wrote blob files");
}

#[test]
fn scan_is_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open(dir.path(), opts()).unwrap();
    let mut ids: Vec<QueueId> = (0..60).map(|_| QueueId::new()).collect();
    // Insert in reverse so key order, not insertion order, has to produce the result.
    for (i, id) in ids.iter().rev().enumerate() {
        s.insert(&message_with_id(*id, i * 300)).unwrap();
    }
    ids.sort();
    let scanned: Vec<_> = s.scan().map(|r| r.unwrap().id).collect();
    assert_eq!(scanned, ids);
}

#[test]
fn remove_deletes_meta_and_body_durably() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (message(100), message(100_000), message(0));
    {
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        for m in [&a, &b, &c] {
            s.insert(m).unwrap();
        }
        s.sync().unwrap();
        s.remove(b.id).unwrap();
        s.remove(QueueId::new()).unwrap(); // absent: not an error
        s.sync().unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(b.id).unwrap(), None);
    }
    let s = SledStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s.get(b.id).unwrap(), None);
    assert_eq!(s.get(a.id).unwrap().as_ref(), Some(&a));
    assert_eq!(s.get(c.id).unwrap().as_ref(), Some(&c));
    let ids: Vec<_> = s.scan().map(|r| r.unwrap().id).collect();
    assert!(!ids.contains(&b.id) && ids.len() == 2);
}

#[test]
fn reinsert_replaces_whole_message() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open(dir.path(), opts()).unwrap();
    let id = QueueId::new();
    s.insert(&message_with_id(id, 300_000)).unwrap();
    let small = message_with_id(id, 10);
    s.insert(&small).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s.get(id).unwrap().as_ref(), Some(&small));
}

#[test]
fn min_free_bytes_refuses_with_disk_full() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open(
        dir.path(),
        SledOptions {
            min_free_bytes: u64::MAX / 2,
            ..opts()
        },
    )
    .unwrap();
    let m = message(5_000);
    let err = s.insert(&m).unwrap_err();
    assert!(matches!(err, StorageError::DiskFull(_)), "{err:?}");
    assert!(matches!(SpoolError::from(err), SpoolError::DiskFull(_)));
    assert_eq!(s.len(), 0);
    assert_eq!(s.get(m.id).unwrap(), None);
}

#[test]
fn reopen_of_locked_spool_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let _s = SledStorage::open(dir.path(), opts()).unwrap();
    // sled holds an exclusive lock on its log: a second open must be an error, not a panic or
    // a second writer, once the lock wait is over.
    let start = std::time::Instant::now();
    let second = SledStorage::open(
        dir.path(),
        SledOptions {
            lock_wait_ms: 200,
            ..opts()
        },
    );
    assert!(second.is_err());
    assert!(start.elapsed() >= std::time::Duration::from_millis(200));
}

#[test]
fn insert_many_is_per_message_and_handles_repeated_ids() {
    let dir = tempfile::tempdir().unwrap();
    let a = message(300_000);
    let b = message(5_000);
    let a2 = message_with_id(a.id, 10);
    let group: Vec<_> = (0..40).map(|i| message(i * 1_000)).collect();
    {
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let results = s.insert_many(&[a.clone(), b.clone(), a2.clone()]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let results = s.insert_many(&group);
        assert_eq!(results.len(), group.len());
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        s.sync().unwrap();
    }
    let s = SledStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(s.len(), 2 + group.len());
    // The later copy of a repeated id wins, with none of the earlier copy's extra chunks.
    assert_eq!(s.get(a.id).unwrap().as_ref(), Some(&a2));
    assert_eq!(s.get(b.id).unwrap().as_ref(), Some(&b));
    for m in &group {
        assert_eq!(s.get(m.id).unwrap().as_ref(), Some(m));
    }
}

#[test]
fn insert_many_refuses_messages_individually() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStorage::open(
        dir.path(),
        SledOptions {
            min_free_bytes: u64::MAX / 2,
            ..opts()
        },
    )
    .unwrap();
    let results = s.insert_many(&[message(1), message(2)]);
    assert_eq!(results.len(), 2);
    assert!(results
        .iter()
        .all(|r| matches!(r, Err(StorageError::DiskFull(_)))));
    assert_eq!(s.len(), 0);
}

#[test]
fn update_envelope_keeps_the_body_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut msg = message(20_000);
    // Enough recipients that the metadata spans several chunks and then shrinks to one.
    msg.envelope.recipients = (0..400)
        .map(|i| tern_message::Recipient::new(format!("rcpt{i}@example.net")))
        .collect();
    {
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        s.insert(&msg).unwrap();
        s.sync().unwrap();

        let mut updated = msg.envelope.clone();
        updated.recipients.truncate(1);
        updated.recipients[0].state = RecipientState::Deferred {
            next_attempt_ms: 123,
            attempts: 2,
            last_reply: "451 4.7.1 try later".into(),
        };
        assert!(s.update_envelope(msg.id, &updated).unwrap());
        assert!(
            !s.update_envelope(QueueId::new(), &updated).unwrap(),
            "absent id"
        );
        s.sync().unwrap();
        msg.envelope = updated;
    }
    let s = SledStorage::open(dir.path(), opts()).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(
        s.get(msg.id).unwrap().as_ref(),
        Some(&msg),
        "body unchanged, envelope new"
    );
    let meta: Vec<_> = s.scan().map(|r| r.unwrap()).collect();
    assert_eq!(meta[0].envelope, msg.envelope);
    assert_eq!(meta[0].body_len, 20_000);
}
