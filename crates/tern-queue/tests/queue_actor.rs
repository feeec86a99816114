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

#[test]
fn held_messages_stay_out_of_the_schedule_until_released_even_across_recovery() {
    use tern_queue::admin::{
        DeleteMessage, Flush, HoldMessage, HoldOutcome, ListMessages, ShowMessage, Summarize,
    };
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
    System::new().block_on(async move {
        let queue = spawn_queue(storage.clone(), QueueConfig::default()).unwrap();
        // Quarantined by the validation stage at end of DATA: held from the start.
        let mut quarantined = message(10);
        quarantined.envelope.hold = Some("content score 7.5 >= quarantine_score 5".into());
        let quarantined = queue.send(Enqueue(quarantined)).await.unwrap().unwrap();
        let normal = queue.send(Enqueue(message(10))).await.unwrap().unwrap();
        let stats = queue.send(GetStats).await.unwrap();
        assert_eq!(stats.scheduled, 1, "only the free message is due");

        let hold = |id, hold| HoldMessage { id, hold };
        assert_eq!(
            queue.send(hold(normal, true)).await.unwrap(),
            HoldOutcome::Changed
        );
        assert_eq!(
            queue.send(hold(normal, true)).await.unwrap(),
            HoldOutcome::Unchanged
        );
        assert_eq!(
            queue.send(hold(QueueId::new(), true)).await.unwrap(),
            HoldOutcome::NotFound
        );
        assert_eq!(queue.send(GetStats).await.unwrap().scheduled, 0);
        assert_eq!(
            queue.send(Flush::default()).await.unwrap(),
            0,
            "a flush does not touch held mail"
        );
        assert_eq!(queue.send(GetStats).await.unwrap().scheduled, 0);

        let held = queue
            .send(ListMessages {
                state: Some("held".into()),
                ..ListMessages::default()
            })
            .await
            .unwrap();
        assert_eq!(held.len(), 2);
        assert!(held
            .iter()
            .all(|m| m.recipients.iter().all(|r| r.state == "held")));
        let summary = queue.send(Summarize).await.unwrap();
        assert_eq!(summary.held, 2);
        assert_eq!(summary.by_state.get("held"), Some(&4));
        let shown = queue.send(ShowMessage(normal)).await.unwrap().unwrap();
        assert_eq!(shown.summary.hold.as_deref(), Some("operator"));

        // A new actor on the same spool recovers what the first one wrote.
        let recovered = spawn_queue(storage.clone(), QueueConfig::default()).unwrap();
        let stats = recovered.send(GetStats).await.unwrap();
        assert_eq!((stats.recovered, stats.scheduled), (2, 0));
        assert_eq!(recovered.send(Summarize).await.unwrap().held, 2);
        let shown = recovered
            .send(ShowMessage(quarantined))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            shown.summary.hold.as_deref(),
            Some("content score 7.5 >= quarantine_score 5")
        );

        assert_eq!(
            recovered.send(hold(quarantined, false)).await.unwrap(),
            HoldOutcome::Changed
        );
        assert_eq!(
            recovered.send(hold(quarantined, false)).await.unwrap(),
            HoldOutcome::Unchanged
        );
        assert_eq!(recovered.send(GetStats).await.unwrap().scheduled, 1);
        let shown = recovered
            .send(ShowMessage(quarantined))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(shown.summary.hold, None);
        assert!(shown
            .summary
            .recipients
            .iter()
            .all(|r| r.state == "pending"));
        assert!(storage
            .get(quarantined)
            .unwrap()
            .unwrap()
            .envelope
            .hold
            .is_none());

        // Deleting works on held mail too.
        assert!(recovered
            .send(DeleteMessage {
                id: normal,
                bounce: false
            })
            .await
            .unwrap());
        assert!(storage.get(normal).unwrap().is_none());
    });
}

#[test]
fn both_queue_client_routes_spool_and_index_before_answering() {
    // The local route answers from the committer thread and the actor learns of the message
    // by `Committed`; the actor route goes through the mailbox. Either way, anything asked of
    // the actor after the answer must already see the message.
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
    let (ids, stats) = System::new().block_on({
        let storage = storage.clone();
        async move {
            let (addr, local) =
                tern_queue::spawn_queue_with_client(storage, QueueConfig::default()).unwrap();
            let remote = tern_queue::QueueClient::from(addr.clone().recipient::<Enqueue>());
            let mut ids = Vec::new();
            for i in 0..50 {
                let client = if i % 2 == 0 { &local } else { &remote };
                let msg = message(100 + i);
                let want = msg.id;
                let id = client.enqueue(msg).await.expect("spooled");
                assert_eq!(id, want);
                let stats = addr.send(GetStats).await.unwrap();
                assert_eq!(stats.messages, i as u64 + 1, "indexed before the answer");
                ids.push(id);
            }
            (ids, addr.send(GetStats).await.unwrap())
        }
    });
    assert_eq!(stats.committed, 50);
    for id in ids {
        assert!(storage.get(id).unwrap().is_some(), "{id} not in the spool");
    }
}

/// A delivery stage that has stopped: its mailbox is closed.
struct Gone;

impl actix::Actor for Gone {
    type Context = actix::Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        use actix::ActorContext;
        ctx.stop();
    }
}

impl actix::Handler<tern_message::DeliveryJob> for Gone {
    type Result = ();
    fn handle(&mut self, _: tern_message::DeliveryJob, _: &mut Self::Context) {}
}

#[test]
fn a_round_the_closed_delivery_stage_answered_ends_deferred_not_stuck_in_flight() {
    use actix::Actor;
    use tern_message::RecipientState;
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
    let (id, stats) = System::new().block_on({
        let storage = storage.clone();
        async move {
            let gone = Gone.start();
            while gone.connected() {
                actix_rt::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let (addr, client) =
                tern_queue::spawn_queue_with_client(storage, QueueConfig::default()).unwrap();
            addr.send(tern_queue::AttachDelivery(gone.recipient()))
                .await
                .unwrap();
            let id = client.enqueue(message(300)).await.expect("spooled");
            // The round is answered "4.3.0 delivery stage unavailable" at once; wait for its end.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let stats = addr.send(GetStats).await.unwrap();
                if stats.in_flight == 0 || std::time::Instant::now() > deadline {
                    break (id, stats);
                }
                actix_rt::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    });
    assert_eq!(stats.in_flight, 0, "the round never ended");
    let stored = storage.get(id).unwrap().expect("still queued");
    for r in &stored.envelope.recipients {
        match &r.state {
            RecipientState::Deferred { last_reply, .. } => {
                assert!(
                    last_reply.contains("delivery stage unavailable"),
                    "{last_reply}"
                )
            }
            other => panic!("{}: {other:?}", r.address),
        }
    }
}
