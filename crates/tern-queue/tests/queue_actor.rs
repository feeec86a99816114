//! The queue actor and its group commit, on a real sled spool.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::System;
use common::{message, opts};
use tern_message::{InboundMessage, QueueId, SpoolError};
use tern_queue::{
    spawn_queue, Enqueue, GetStats, QueueConfig, ScanIter, SledOptions, SledStorage, Storage,
    StorageError,
};

#[test]
fn concurrent_enqueues_share_syncs() {
    const N: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
    let ids = System::new().block_on({
        let storage = storage.clone();
        async move {
            let addr = spawn_queue(storage, QueueConfig::default()).unwrap();
            let handles: Vec<_> = (0..N)
                .map(|i| {
                    let addr = addr.clone();
                    let msg = message(200 + i % 7 * 1_000);
                    actix_rt::spawn(async move {
                        let id = msg.id;
                        let got = addr.send(Enqueue(msg)).await.unwrap().unwrap();
                        assert_eq!(got, id);
                        id
                    })
                })
                .collect();
            let mut ids = Vec::with_capacity(N);
            for h in handles {
                ids.push(h.await.unwrap());
            }
            let stats = addr.send(GetStats).await.unwrap();
            assert_eq!(stats.messages, N as u64);
            assert_eq!(stats.committed, N as u64);
            assert_eq!(stats.failed, 0);
            assert!(
                stats.syncs < (N / 4) as u64,
                "group commit did not group: {} syncs for {N} messages",
                stats.syncs
            );
            eprintln!("{N} messages in {} syncs", stats.syncs);
            ids
        }
    });
    assert_eq!(storage.len(), N);
    for id in ids.iter().step_by(97) {
        assert!(storage.get(*id).unwrap().is_some());
    }
}

#[test]
fn recovered_messages_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [10usize, 20_000, 0];
    {
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        for n in sizes {
            s.insert(&message(n)).unwrap();
        }
        s.sync().unwrap();
    }
    let storage = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
    let stats = System::new().block_on(async move {
        let addr = spawn_queue(storage, QueueConfig::default()).unwrap();
        addr.send(Enqueue(message(5))).await.unwrap().unwrap();
        addr.send(GetStats).await.unwrap()
    });
    assert_eq!(stats.recovered, 3);
    assert_eq!(stats.corrupt, 0);
    assert_eq!(stats.messages, 4);
    assert_eq!(stats.bytes, 20_015);
}

#[test]
fn disk_full_reaches_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(
        SledStorage::open(
            dir.path(),
            SledOptions {
                min_free_bytes: u64::MAX / 2,
                ..opts()
            },
        )
        .unwrap(),
    );
    let (res, stats) = System::new().block_on(async move {
        let addr = spawn_queue(storage, QueueConfig::default()).unwrap();
        let res = addr.send(Enqueue(message(5_000))).await.unwrap();
        (res, addr.send(GetStats).await.unwrap())
    });
    assert!(matches!(res, Err(SpoolError::DiskFull(_))), "{res:?}");
    assert_eq!(stats.messages, 0);
    assert_eq!(stats.failed, 1);
    assert_eq!(stats.syncs, 0);
}

/// Real sled storage whose `sync` can be made to fail or panic, to drive the committer's error
/// paths; everything else is the real thing.
struct FaultySync {
    inner: SledStorage,
    fail: AtomicBool,
    panic: AtomicBool,
}

impl Storage for FaultySync {
    fn insert(&self, msg: &InboundMessage) -> Result<(), StorageError> {
        self.inner.insert(msg)
    }
    fn sync(&self) -> Result<(), StorageError> {
        if self.panic.load(Ordering::SeqCst) {
            panic!("injected committer crash");
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Io(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        self.inner.sync()
    }
    fn get(&self, id: QueueId) -> Result<Option<InboundMessage>, StorageError> {
        self.inner.get(id)
    }
    fn update_envelope(
        &self,
        id: QueueId,
        envelope: &tern_message::Envelope,
    ) -> Result<bool, StorageError> {
        self.inner.update_envelope(id, envelope)
    }
    fn remove(&self, id: QueueId) -> Result<(), StorageError> {
        self.inner.remove(id)
    }
    fn scan(&self) -> ScanIter<'_> {
        self.inner.scan()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

#[test]
fn failed_sync_acknowledges_nobody_and_dead_committer_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(FaultySync {
        inner: SledStorage::open(dir.path(), opts()).unwrap(),
        fail: AtomicBool::new(true),
        panic: AtomicBool::new(false),
    });
    System::new().block_on(async move {
        let addr = spawn_queue(storage.clone(), QueueConfig::default()).unwrap();
        let handles: Vec<_> = (0..50)
            .map(|_| {
                let addr = addr.clone();
                actix_rt::spawn(async move { addr.send(Enqueue(message(100))).await.unwrap() })
            })
            .collect();
        for h in handles {
            let res = h.await.unwrap();
            assert!(matches!(res, Err(SpoolError::Storage(_))), "{res:?}");
        }
        let stats = addr.send(GetStats).await.unwrap();
        assert_eq!((stats.messages, stats.committed, stats.failed), (0, 0, 50));

        // Recovery of the storage: acknowledgements resume.
        storage.fail.store(false, Ordering::SeqCst);
        addr.send(Enqueue(message(100))).await.unwrap().unwrap();

        // A committer that died answers Unavailable, for the message in flight and after.
        storage.panic.store(true, Ordering::SeqCst);
        let res = addr.send(Enqueue(message(100))).await.unwrap();
        assert!(matches!(res, Err(SpoolError::Unavailable(_))), "{res:?}");
        let res = addr.send(Enqueue(message(100))).await.unwrap();
        assert!(matches!(res, Err(SpoolError::Unavailable(_))), "{res:?}");
    });
}

#[test]
fn recovery_schedules_messages_with_work_left_including_in_flight_ones() {
    use tern_message::RecipientState;
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let pending = message(10);
        let mut in_flight = message(10);
        in_flight.envelope.recipients[0].state = RecipientState::InFlight { attempts: 3 };
        let mut done = message(10);
        for r in &mut done.envelope.recipients {
            r.state = RecipientState::Delivered {
                at_ms: 1,
                reply: "250 ok".into(),
            };
        }
        for m in [&pending, &in_flight, &done] {
            s.insert(m).unwrap();
        }
        s.sync().unwrap();
    }
    let storage = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
    let stats = System::new().block_on(async move {
        let addr = spawn_queue(storage, QueueConfig::default()).unwrap();
        let before = addr.send(GetStats).await.unwrap();
        addr.send(Enqueue(message(5))).await.unwrap().unwrap();
        (before, addr.send(GetStats).await.unwrap())
    });
    // The delivered one has nothing left to do; the pending and the in-flight one are due.
    assert_eq!(stats.0.recovered, 3);
    assert_eq!(stats.0.scheduled, 2);
    assert_eq!(
        stats.1.scheduled, 3,
        "an acknowledged enqueue is due at once"
    );
}
