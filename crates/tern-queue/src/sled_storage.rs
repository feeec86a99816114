//! [`Storage`] on sled 0.34.7 plus append-only segment files.
//!
//! # Layout
//!
//! * `<dir>/segments/<seq>.seg`: append-only segment files (format in [`crate::segment`]). Every
//!   message body lives here, in the `Insert` record that spooled it, and every change to the
//!   index (insert, new recipient states, removal) is appended here as a record too.
//! * The sled tree `spool`: the index. Key `i | QueueId (16 bytes)`, value: where the body is
//!   (segment, offset, length, CRC-32, record length) followed by the metadata as JSON. sled
//!   stays the queryable store (scan in id = arrival order, point lookups); the bodies never
//!   enter it.
//! * `<dir>/segments/checkpoint`: the segment position up to which sled's own files are known
//!   to hold every index change.
//!
//! # Why not sled alone
//!
//! Format 1 of this spool (tern before segment files) wrote each message as one sled batch and
//! made each group commit durable with `Db::flush()` plus `fdatasync`. It cost ≈ 80–100 µs of
//! CPU per message in `examples/sled_cost.rs`-style measurements: sled's `apply_batch` rolls its
//! IO buffer before and after the batch (`pagecache::pin_log`), so every batch was two log
//! writes with `sync_file_range` on sled's IO threads, and every byte of a body went through
//! sled's page cache and log. Appending the same records to a file of our own and syncing it
//! costs ≈ 10–25 µs per message; index inserts without a flush ≈ 10–30 µs more.
//!
//! # Durability
//!
//! A group commit ([`Storage::insert_many`] then [`Storage::sync`]) appends the batch's records
//! to the active segment with one `pwrite`, inserts the index entries into sled (not flushed),
//! and `sync` `fdatasync`s the segment (and any segment sealed since the last sync). The
//! segment is then the write-ahead log: an acknowledged message's record is on disk whatever
//! happened to sled's unflushed state.
//!
//! A **checkpoint** (every 10 s with changes, on every new segment, at open and at close) notes
//! the position P at the end of the active segment, `fdatasync`s the segments, then calls
//! `Db::flush()` and `fdatasync`s sled's log file `db` (sled's `flush` uses `sync_file_range`,
//! which persists neither the file size nor the drive's cache; see below), and only then
//! replaces the checkpoint file (write, `fsync`, rename, `fsync` the directory). Every change is
//! applied to sled and its record appended under one lock (an insert's record first, an
//! update's or removal's index change first), and P is read under that lock, so every record
//! before P is in sled's durable state once the flush returns.
//!
//! **Recovery** (at open) replays the records from the checkpoint on, in order, onto the index:
//! `Insert` sets the entry, `Update` replaces an existing entry's metadata, `Remove` deletes it.
//! A damaged or short record ends its segment (a torn tail after a crash) and replay goes on
//! with the next one. sled may have persisted index changes the segments never got (its
//! background flusher runs every 500 ms): an entry pointing at or after P whose record is not
//! whole where it points is a message that was never acknowledged, and is dropped (entries
//! replay did not reach, after a damaged record, are kept when their record is whole); a
//! removal or update sled kept but the segment lost only repeats a delivery attempt
//! (at-least-once).
//!
//! **Segments are deleted** once they lie before the checkpoint and no index entry points into
//! them (the live count per segment is kept in memory, counted from the index at open).
//!
//! About sled's files: `db` is sled's whole log (every tree's pages, the tree registry); `conf`
//! is written once without `fsync` at creation, so `open` `fsync`s it; `snap.<lsn>` files are
//! written and `fsync`ed by sled; `blobs/<lsn>` would hold a log message larger than a quarter
//! segment, written without `fsync`. Index values are a few hundred bytes, so sled never writes
//! blobs here; a checkpoint still `fsync`s any it finds.
//!
//! A failed `fdatasync` is not retried: the kernel may already have dropped the unwritten pages'
//! dirty state ("fsyncgate", PostgreSQL 2018), so the spool refuses all writes until a restart
//! recovers from the disk's real contents (`Inner::poison`).

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_message::{ClientInfo, Envelope, InboundMessage, QueueId};
use tracing::{debug, error, info, warn};

use crate::free_space::FreeSpaceGuard;
use crate::legacy;
use crate::prealloc::{self, Preallocator};
use crate::segment::{self, Kind};
use crate::storage::{io_is_disk_full, ScanIter, SpooledMeta, Storage, StorageError};

/// sled segment (and IO buffer) size. Fixed: sled refuses to reopen a database with a different
/// one.
pub const SEGMENT_SIZE: usize = 1 << 20;

/// A new segment file is started once the active one holds this many bytes. Smaller files are
/// freed sooner when most of their messages are gone; each new file costs a checkpoint.
pub const SEGMENT_FILE_BYTES: u64 = 32 << 20;

/// A checkpoint at least this often while anything changes.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// How often the maintenance thread looks for checkpoints to make and segments to delete.
const MAINTENANCE_TICK: Duration = Duration::from_millis(500);
/// A sealed segment is compacted (its remaining messages copied to the active segment, so the
/// file can go) once at most this fraction of its bytes is still needed...
const COMPACT_LIVE_FRACTION: f64 = 0.5;
/// ...and it has been sealed this long: most messages are delivered within seconds of arrival,
/// so copying them from a fresh segment would mostly copy messages about to go anyway.
const COMPACT_AFTER: Duration = Duration::from_secs(60);

const TREE: &str = "spool";
const INDEX: u8 = b'i';
const SEGMENTS_DIR: &str = "segments";
const CHECKPOINT_FILE: &str = "checkpoint";
const META_VERSION: u32 = 2;
/// Index value header: version, segment, body offset, body length, body CRC, record length.
const ENTRY_HEAD: usize = 1 + 8 + 8 + 8 + 4 + 8;
const ENTRY_VERSION: u8 = 2;

/// Options for [`SledStorage::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledOptions {
    /// sled's page cache size. sled's default (1 GiB) is far more than an index of message
    /// metadata needs.
    pub cache_bytes: u64,
    /// Refuse a message (with [`StorageError::DiskFull`]) if accepting it would leave fewer than
    /// this many bytes free on the spool's filesystem; 0 disables the check.
    pub min_free_bytes: u64,
    /// How long `open` keeps retrying while sled's lock on the log is held. sled 0.34's
    /// background threads can keep a just-dropped database's file (and its `flock`) alive for a
    /// moment, so a reopen in the same process can briefly fail; another process holding the
    /// spool fails after this long.
    pub lock_wait_ms: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            // Postfix suggests queue_minfree >= 1.5 x the message size limit; this leaves room for
            // a few large messages in flight plus a segment file's growth.
            min_free_bytes: 128 << 20,
            lock_wait_ms: 5_000,
        }
    }
}

/// The spool. See the module documentation for the layout and the durability argument.
pub struct SledStorage {
    inner: Arc<Inner>,
    maintenance: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    /// Handle on sled's log file, kept open so a checkpoint's `fdatasync` needs no `open`.
    log_file: File,
    dir: PathBuf,
    seg_dir: PathBuf,
    free_space: Arc<FreeSpaceGuard>,
    /// Zero-filled files for new segments.
    spare: Preallocator,
    /// Set when an `fsync`/`fdatasync` failed; see [`Inner::poison`].
    poisoned: Mutex<Option<String>>,
    /// The `blobs` directory's mtime after open; see [`Inner::sync_blobs`].
    blobs_mtime_at_open: Option<std::time::SystemTime>,
    blobs_seen: AtomicBool,
    /// Lock order: `writer`, then `segments`.
    writer: Mutex<Writer>,
    segments: Mutex<BTreeMap<u64, Segment>>,
    /// The last checkpoint; its lock also keeps two checkpoints from interleaving.
    checkpoint: Mutex<Checkpoint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    seq: u64,
    offset: u64,
}

struct Checkpoint {
    at: Position,
    when: Instant,
    /// `Writer::changes` when it was taken.
    changes: u64,
}

/// The active segment and what has not reached it yet.
struct Writer {
    seq: u64,
    file: Arc<File>,
    /// Bytes written to `file`.
    written: u64,
    /// How much of `file` the last `fdatasync` covered.
    synced: u64,
    /// Encoded `Update`/`Remove` records waiting for the next write.
    pending: Vec<u8>,
    /// Sealed segments written since the last sync.
    unsynced: Vec<Arc<File>>,
    /// Count of index changes, to tell whether a checkpoint has anything to do.
    changes: u64,
    /// `file` was zero-filled ahead (see [`crate::prealloc`]): its length says nothing about
    /// how much of it holds records.
    preallocated: bool,
}

impl Writer {
    fn end(&self) -> u64 {
        self.written + self.pending.len() as u64
    }

    fn position(&self) -> Position {
        Position {
            seq: self.seq,
            offset: self.end(),
        }
    }

    /// Appends an insert record for `id` to `pending`; returns where its body will be.
    fn append_insert(&mut self, id: QueueId, meta: &[u8], body: &[u8]) -> Pointer {
        let start = self.pending.len();
        let enc = segment::encode(&mut self.pending, Kind::Insert, id, meta, body);
        Pointer {
            seq: self.seq,
            body_offset: self.written + start as u64 + enc.body_offset,
            body_len: body.len() as u64,
            body_crc: enc.body_crc,
            record_len: (self.pending.len() - start) as u64,
        }
    }

    /// Writes `pending` to the file. On failure nothing of it counts as written: the file is cut
    /// back to where it was, and the records stay pending.
    fn write_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(&self.pending, self.written) {
            // A partial record at the end would not hurt recovery (it ends the segment), but
            // the next record must not land after it.
            if let Err(t) = self.file.set_len(self.written) {
                error!(error = %t, "cannot cut a failed segment write back");
            }
            return Err(e);
        }
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }
}

struct Segment {
    file: Arc<File>,
    /// Index entries pointing into this segment, and their records' bytes.
    live: u64,
    live_bytes: u64,
    /// Its size for compaction: the bytes of records when it was sealed in this run, else (a
    /// segment found at open) the file's length. For a zero-filled file that overstates it,
    /// which costs at most one early compaction; understating it could pin a 32 MiB file for
    /// as long as one message near its start stays queued.
    used: u64,
    /// When it stopped being the active segment (for segments found at open: the open).
    sealed: Option<Instant>,
}

impl Segment {
    fn new(file: Arc<File>, used: u64, sealed: Option<Instant>) -> Self {
        Self {
            file,
            live: 0,
            live_bytes: 0,
            used,
            sealed,
        }
    }
}

/// Where a message's body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pointer {
    seq: u64,
    body_offset: u64,
    body_len: u64,
    body_crc: u32,
    record_len: u64,
}

impl Pointer {
    fn decode(id: QueueId, v: &[u8]) -> Result<Self, StorageError> {
        if v.len() < ENTRY_HEAD || v[0] != ENTRY_VERSION {
            return Err(StorageError::corrupt(Some(id), "malformed index entry"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            seq: u64_at(1),
            body_offset: u64_at(9),
            body_len: u64_at(17),
            body_crc: u32::from_le_bytes(v[25..29].try_into().expect("4 bytes")),
            record_len: u64_at(29),
        })
    }

    fn entry(&self, meta: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(ENTRY_HEAD + meta.len());
        v.push(ENTRY_VERSION);
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.body_offset.to_le_bytes());
        v.extend_from_slice(&self.body_len.to_le_bytes());
        v.extend_from_slice(&self.body_crc.to_le_bytes());
        v.extend_from_slice(&self.record_len.to_le_bytes());
        v.extend_from_slice(meta);
        v
    }

    /// Offset of the record (not the body: an empty body's offset is the record's end).
    fn record_offset(&self) -> u64 {
        (self.body_offset + self.body_len).saturating_sub(self.record_len)
    }

    fn at_or_after(&self, p: Position) -> bool {
        self.seq > p.seq || (self.seq == p.seq && self.record_offset() >= p.offset)
    }
}

/// What the metadata holds, borrowed for writing.
#[derive(Serialize)]
struct MetaRef<'a> {
    v: u32,
    id: QueueId,
    envelope: &'a Envelope,
    client: &'a ClientInfo,
    arrived_ms: u64,
    body_len: u64,
}

/// What the metadata holds, owned for reading.
#[derive(Deserialize)]
struct MetaRecord {
    v: u32,
    id: QueueId,
    envelope: Envelope,
    client: ClientInfo,
    arrived_ms: u64,
    body_len: u64,
}

fn encode_meta(
    id: QueueId,
    envelope: &Envelope,
    client: &ClientInfo,
    arrived_ms: u64,
    body_len: u64,
) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(&MetaRef {
        v: META_VERSION,
        id,
        envelope,
        client,
        arrived_ms,
        body_len,
    })
    .map_err(|e| StorageError::Backend(format!("cannot encode metadata: {e}")))
}

impl MetaRecord {
    fn decode(id: QueueId, bytes: &[u8]) -> Result<Self, StorageError> {
        let rec: MetaRecord = serde_json::from_slice(bytes)
            .map_err(|e| StorageError::corrupt(Some(id), format!("undecodable metadata: {e}")))?;
        if rec.v != META_VERSION {
            return Err(StorageError::corrupt(
                Some(id),
                format!("unknown metadata version {}", rec.v),
            ));
        }
        if rec.id != id {
            return Err(StorageError::corrupt(
                Some(id),
                format!("metadata names another id ({})", rec.id),
            ));
        }
        Ok(rec)
    }

    fn into_meta(self) -> SpooledMeta {
        SpooledMeta {
            id: self.id,
            envelope: self.envelope,
            client: self.client,
            arrived_ms: self.arrived_ms,
            body_len: self.body_len,
        }
    }
}

/// Decodes an index entry into its pointer and metadata.
fn decode_entry(id: QueueId, v: &[u8]) -> Result<(Pointer, MetaRecord), StorageError> {
    let ptr = Pointer::decode(id, v)?;
    let meta = MetaRecord::decode(id, &v[ENTRY_HEAD..])?;
    if meta.body_len != ptr.body_len {
        return Err(StorageError::corrupt(
            Some(id),
            "metadata and index disagree on the body length",
        ));
    }
    Ok((ptr, meta))
}

pub(crate) fn index_key(id: QueueId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = INDEX;
    k[1..].copy_from_slice(&id.to_bytes());
    k
}

fn key_id(k: &[u8]) -> Option<QueueId> {
    (k.len() == 17 && k[0] == INDEX).then(|| QueueId::from_bytes(k[1..].try_into().expect("16")))
}

pub(crate) fn sled_err(e: sled::Error) -> StorageError {
    match e {
        sled::Error::Io(io) if io_is_disk_full(&io) => StorageError::DiskFull(io.to_string()),
        sled::Error::Io(io) => StorageError::Io(io),
        sled::Error::Corruption { at, bt: _ } => {
            StorageError::corrupt(None, format!("sled reports corruption at {at:?}"))
        }
        other => StorageError::Backend(other.to_string()),
    }
}

/// sled reports a held `flock` as an `Other` error with this text (`config.rs`, `try_lock`).
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Other && e.to_string().contains("could not acquire lock")
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves data that is still consistent enough to
    // read (counters, buffers); refusing every later operation would be worse.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_checkpoint(path: &Path) -> Result<Option<Position>, StorageError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut parts = text.split_whitespace();
    let parsed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("tern-spool-checkpoint"), Some(seq), Some(off), None) => {
            seq.parse().ok().zip(off.parse().ok())
        }
        _ => None,
    };
    match parsed {
        Some((seq, offset)) => Ok(Some(Position { seq, offset })),
        None => Err(StorageError::corrupt(
            None,
            format!(
                "unreadable checkpoint file {} (deleting it replays every segment, which may \
                 deliver some messages twice)",
                path.display()
            ),
        )),
    }
}

/// Replaces the checkpoint file atomically and durably.
fn write_checkpoint(seg_dir: &Path, at: Position) -> std::io::Result<()> {
    let tmp = seg_dir.join("checkpoint.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "tern-spool-checkpoint {} {}", at.seq, at.offset)?;
    f.sync_all()?;
    std::fs::rename(&tmp, seg_dir.join(CHECKPOINT_FILE))?;
    fsync_dir(seg_dir)
}

fn create_segment(seg_dir: &Path, seq: u64) -> std::io::Result<File> {
    let path = seg_dir.join(segment::file_name(seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // The new name must survive a crash as much as the records written into the file.
    durable_name(seg_dir, &path)?;
    Ok(file)
}

/// `fsync`s the directory holding the new file `path`. On failure the file is removed again:
/// nothing has been written into it, and its name would block the next attempt.
fn durable_name(seg_dir: &Path, path: &Path) -> std::io::Result<()> {
    fsync_dir(seg_dir).inspect_err(|_| {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(path = %path.display(), error = %e, "cannot remove a segment file whose name is not durable");
        }
    })
}

impl SledStorage {
    /// Opens (creating if needed) the spool in `dir`, replays the segments since the last
    /// checkpoint, and carries over a format-1 spool if it finds one.
    #[tracing::instrument(name = "spool_open", skip(opts), fields(dir = %dir.display()))]
    pub fn open(dir: &Path, opts: SledOptions) -> Result<Self, StorageError> {
        let inner = Arc::new(Inner::open(dir, opts)?);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tern-spool-maint".into())
            .spawn({
                let inner = inner.clone();
                move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(MAINTENANCE_TICK)
                    {
                        inner.maintain();
                    }
                }
            })?;
        Ok(Self {
            inner,
            maintenance: Some((stop, thread)),
        })
    }

    /// The directory the spool lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Makes the index durable in sled and records it, so a restart replays nothing; deletes
    /// the segments no message needs any more. The maintenance thread does this by itself;
    /// tests call it to get there at a known moment.
    #[cfg(test)]
    fn checkpoint(&self) -> Result<(), StorageError> {
        self.inner.checkpoint()?;
        self.inner.delete_unused_segments();
        Ok(())
    }

    #[cfg(test)]
    fn segment_count(&self) -> usize {
        lock(&self.inner.segments).len()
    }

    /// Test hook: write a raw index entry, bypassing encoding, to simulate on-disk damage.
    #[cfg(test)]
    pub(crate) fn put_raw(&self, k: &[u8], v: &[u8]) {
        self.inner.tree.insert(k, v).unwrap();
    }

    /// Test hook: compact whatever qualifies, however recently sealed.
    #[cfg(test)]
    fn compact_now(&self) {
        while let Some(seq) = self.inner.compaction_candidate(Duration::ZERO) {
            self.inner.compact(seq).unwrap();
        }
    }

    #[cfg(test)]
    fn poison(&self, cause: &StorageError) {
        self.inner.poison(cause)
    }
}

impl Drop for SledStorage {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.maintenance.take() {
            drop(stop);
            let _ = thread.join();
        }
        // A clean stop leaves nothing to replay.
        if self.inner.check_poisoned().is_ok() {
            if let Err(e) = self.inner.checkpoint() {
                warn!(error = %e, "spool checkpoint at close failed; the next start replays");
            }
        }
    }
}

impl Inner {
    fn open(dir: &Path, opts: SledOptions) -> Result<Self, StorageError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_bytes)
            .segment_size(SEGMENT_SIZE);
        let deadline = Instant::now() + Duration::from_millis(opts.lock_wait_ms);
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if is_lock_conflict(&e) && Instant::now() < deadline => {
                    debug!(error = %e, "spool locked, retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if is_lock_conflict(&e) => {
                    return Err(StorageError::Locked(dir.to_path_buf()))
                }
                Err(e) => return Err(sled_err(e)),
            }
        };
        let tree = db.open_tree(TREE).map_err(sled_err)?;

        let log_file = File::open(dir.join("db"))?;
        let seg_dir = dir.join(SEGMENTS_DIR);
        std::fs::create_dir_all(&seg_dir)?;
        // Make the files' existence durable: sled creates them without syncing the directory,
        // and never syncs `conf` at all.
        File::open(dir.join("conf"))?.sync_all()?;
        fsync_dir(&dir.join("blobs"))?;
        fsync_dir(&seg_dir)?;
        fsync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        let free_space = Arc::new(FreeSpaceGuard::new(dir, opts.min_free_bytes)?);
        let spare = Preallocator::start(&seg_dir, SEGMENT_FILE_BYTES, free_space.clone())?;
        let blobs = dir.join("blobs");
        let blobs_mtime_at_open = std::fs::metadata(&blobs).and_then(|m| m.modified()).ok();
        // Blobs left by an earlier run (they should not exist) keep every checkpoint scanning.
        let blobs_seen = std::fs::read_dir(&blobs).map_or(true, |mut d| d.next().is_some());

        let checkpoint = read_checkpoint(&seg_dir.join(CHECKPOINT_FILE))?;
        let found = segment::list(&seg_dir)?;
        let replayed = replay(&tree, &found, checkpoint)?;

        let mut segments = BTreeMap::new();
        for (seq, path) in &found {
            let file = File::open(path)?;
            let len = file.metadata()?.len();
            segments.insert(
                *seq,
                Segment::new(Arc::new(file), len, Some(Instant::now())),
            );
        }
        count_live(&tree, &mut segments, checkpoint, &replayed.seen)?;

        let seq = found.last().map_or(1, |(s, _)| s + 1);
        let file = Arc::new(create_segment(&seg_dir, seq)?);
        segments.insert(seq, Segment::new(file.clone(), 0, None));
        let inner = Inner {
            db,
            tree,
            log_file,
            dir: dir.to_path_buf(),
            seg_dir,
            free_space,
            spare,
            poisoned: Mutex::new(None),
            blobs_mtime_at_open,
            blobs_seen: AtomicBool::new(blobs_seen),
            writer: Mutex::new(Writer {
                seq,
                file,
                written: 0,
                synced: 0,
                pending: Vec::new(),
                unsynced: Vec::new(),
                changes: 1,
                preallocated: false,
            }),
            segments: Mutex::new(segments),
            checkpoint: Mutex::new(Checkpoint {
                at: checkpoint.unwrap_or(Position { seq: 0, offset: 0 }),
                when: Instant::now(),
                changes: 0,
            }),
        };
        inner.migrate_format_1()?;
        // Everything replayed is now made durable in sled, so the next start begins here.
        inner.checkpoint()?;
        inner.delete_unused_segments();
        info!(
            replayed = replayed.records,
            segments = lock(&inner.segments).len(),
            "spool opened"
        );
        Ok(inner)
    }

    /// Carries a format-1 spool over: each message is written as an insert record and indexed,
    /// then its old records go. A crash half-way repeats the carrying over of the messages not
    /// yet checkpointed, which is harmless (same ids).
    fn migrate_format_1(&self) -> Result<(), StorageError> {
        if !legacy::any(&self.tree) {
            return Ok(());
        }
        let ids = legacy::ids(&self.tree);
        info!(messages = ids.len(), "carrying over a spool in format 1");
        let mut moved = 0usize;
        for chunk in ids.chunks(256) {
            let mut msgs = Vec::with_capacity(chunk.len());
            for &id in chunk {
                match legacy::read(&self.tree, id) {
                    Ok(m) => msgs.push(m),
                    Err(e) => error!(queue_id = %id, error = %e, "format-1 message unreadable"),
                }
            }
            for r in self.insert_many(&msgs) {
                r?;
            }
            // The new records are durable before any old one goes: sled may persist the
            // removals on its own at any moment, and a removal must never outlive the copy.
            self.sync()?;
            for m in &msgs {
                legacy::remove(&self.tree, m.id)?;
                moved += 1;
            }
        }
        let left = legacy::clear(&self.tree)?;
        if left > 0 {
            warn!(records = left, "deleted unreadable format-1 records");
        }
        info!(messages = moved, "format-1 spool carried over");
        Ok(())
    }

    fn poison(&self, cause: &StorageError) {
        error!(error = %cause, "spool sync failed: refusing writes until restart");
        let mut p = lock(&self.poisoned);
        p.get_or_insert_with(|| cause.to_string());
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        match &*lock(&self.poisoned) {
            Some(cause) => Err(StorageError::Poisoned(cause.clone())),
            None => Ok(()),
        }
    }

    /// Moves the live count from the segment of `old` (an index value being replaced or
    /// removed) to that of `new`.
    fn account(&self, id: QueueId, old: Option<&[u8]>, new: Option<&Pointer>) {
        let old = old.and_then(|v| Pointer::decode(id, v).ok());
        let mut segs = lock(&self.segments);
        if let Some(p) = old {
            if let Some(s) = segs.get_mut(&p.seq) {
                s.live = s.live.saturating_sub(1);
                s.live_bytes = s.live_bytes.saturating_sub(p.record_len);
            }
        }
        if let Some(p) = new {
            if let Some(s) = segs.get_mut(&p.seq) {
                s.live += 1;
                s.live_bytes += p.record_len;
            }
        }
    }

    /// Starts a new segment once the active one is full, or as soon as a zero-filled file is
    /// ready while the active one is a plain file that has seen traffic (so a busy spool moves
    /// to the cheaper commits at once instead of after 32 MiB). Called with the writer locked
    /// and nothing pending, so a record never spans two files.
    fn rotate_if_full(&self, w: &mut Writer) -> Result<(), StorageError> {
        let full = w.end() >= SEGMENT_FILE_BYTES;
        if !full && (w.preallocated || w.end() < prealloc::PREPARE_AFTER) {
            return Ok(());
        }
        if !full && !self.spare.is_ready() {
            // A plain file with traffic and no spare yet: keep appending here meanwhile. (The
            // spare is only taken under the writer lock, held here, so a ready one cannot
            // vanish between the check and the take.)
            self.spare.want();
            return Ok(());
        }
        // Full, or a plain file with traffic: the next file is a zero-filled one if one is
        // ready (and the one after is asked for); else a plain one, only if this one is full.
        w.write_pending()?;
        let seq = w.seq + 1;
        let path = self.seg_dir.join(segment::file_name(seq));
        match self.spare.take_or_want(&path) {
            Some(file) => {
                // The new name must survive a crash as much as the records written into it.
                durable_name(&self.seg_dir, &path)?;
                self.rotate_into(w, seq, file, true);
            }
            None if full => {
                let file = create_segment(&self.seg_dir, seq)?;
                self.rotate_into(w, seq, file, false);
            }
            None => {}
        }
        Ok(())
    }

    /// Makes `file` (already named `seq`) the active segment; seals the previous one.
    fn rotate_into(&self, w: &mut Writer, seq: u64, file: File, preallocated: bool) {
        let file = Arc::new(file);
        let old = std::mem::replace(&mut w.file, file.clone());
        if w.synced < w.written {
            w.unsynced.push(old);
        }
        let sealed = w.seq;
        let used = w.written;
        w.seq = seq;
        w.written = 0;
        w.synced = 0;
        w.preallocated = preallocated;
        let mut segs = lock(&self.segments);
        if let Some(s) = segs.get_mut(&sealed) {
            s.sealed = Some(Instant::now());
            s.used = used;
        }
        segs.insert(seq, Segment::new(file, 0, None));
        debug!(segment = seq, preallocated, "new spool segment");
    }

    fn insert_many(&self, msgs: &[InboundMessage]) -> Vec<Result<(), StorageError>> {
        if let Err(e) = self.check_poisoned() {
            return msgs.iter().map(|_| Err(e.duplicate())).collect();
        }
        // Encode and admit outside the lock: only the append and the index update need it.
        let mut results: Vec<Result<(), StorageError>> = Vec::with_capacity(msgs.len());
        let mut metas: Vec<Option<Vec<u8>>> = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let meta = encode_meta(
                msg.id,
                &msg.envelope,
                &msg.client,
                msg.arrived_ms,
                msg.body.len() as u64,
            )
            .and_then(|meta| {
                self.free_space
                    .admit((meta.len() + msg.body.len() + segment::HEADER_LEN) as u64)?;
                Ok(meta)
            });
            match meta {
                Ok(m) => {
                    metas.push(Some(m));
                    results.push(Ok(()));
                }
                Err(e) => {
                    metas.push(None);
                    results.push(Err(e));
                }
            }
        }
        if metas.iter().all(Option::is_none) {
            return results;
        }

        let mut w = lock(&self.writer);
        if let Err(e) = self.rotate_if_full(&mut w) {
            return msgs.iter().map(|_| Err(e.duplicate())).collect();
        }
        let earlier = w.pending.len();
        let mut pointers: Vec<Option<Pointer>> = Vec::with_capacity(msgs.len());
        for (msg, meta) in msgs.iter().zip(&metas) {
            let Some(meta) = meta else {
                pointers.push(None);
                continue;
            };
            pointers.push(Some(w.append_insert(msg.id, meta, &msg.body)));
        }
        if let Err(e) = w.write_pending() {
            // The earlier update/remove records stay pending; this batch's are dropped.
            w.pending.truncate(earlier);
            let e = StorageError::from(e);
            warn!(error = %e, "spool segment write failed");
            for (r, p) in results.iter_mut().zip(&pointers) {
                if p.is_some() {
                    *r = Err(e.duplicate());
                }
            }
            return results;
        }
        for ((msg, meta), (ptr, result)) in msgs
            .iter()
            .zip(&metas)
            .zip(pointers.iter().zip(results.iter_mut()))
        {
            let (Some(meta), Some(ptr)) = (meta, ptr) else {
                continue;
            };
            match self.tree.insert(index_key(msg.id), ptr.entry(meta)) {
                Ok(old) => self.account(msg.id, old.as_deref(), Some(ptr)),
                Err(e) => {
                    // The record is in the segment: a removal record keeps a replay from
                    // spooling a message whose client was told it failed.
                    segment::encode(&mut w.pending, Kind::Remove, msg.id, b"", b"");
                    *result = Err(sled_err(e));
                }
            }
        }
        w.changes += 1;
        results
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let (files, seq, target) = {
            let mut w = lock(&self.writer);
            w.write_pending().map_err(|e| {
                let e = StorageError::from(e);
                self.poison(&e);
                e
            })?;
            let mut files = std::mem::take(&mut w.unsynced);
            if w.synced < w.written {
                files.push(w.file.clone());
            }
            (files, w.seq, w.written)
        };
        for f in &files {
            if let Err(e) = f.sync_data() {
                let e = StorageError::from(e);
                self.poison(&e);
                return Err(e);
            }
        }
        let mut w = lock(&self.writer);
        if w.seq == seq && w.synced < target {
            w.synced = target;
        }
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), StorageError> {
        let mut cp = lock(&self.checkpoint);
        self.check_poisoned()?;
        let (at, changes) = {
            let w = lock(&self.writer);
            (w.position(), w.changes)
        };
        if changes == cp.changes {
            return Ok(());
        }
        self.sync()?;
        self.db.flush().map_err(sled_err)?;
        let synced = self
            .sync_blobs()
            .and_then(|()| self.log_file.sync_data().map_err(StorageError::from))
            .and_then(|()| write_checkpoint(&self.seg_dir, at).map_err(StorageError::from));
        if let Err(e) = synced {
            self.poison(&e);
            return Err(e);
        }
        debug!(segment = at.seq, offset = at.offset, "spool checkpoint");
        *cp = Checkpoint {
            at,
            when: Instant::now(),
            changes,
        };
        Ok(())
    }

    /// Deletes the segments before the checkpoint that no index entry points into. A segment
    /// at or after it may still be needed by a replay, even when nothing points into it.
    fn delete_unused_segments(&self) {
        let before = lock(&self.checkpoint).at.seq;
        let unused: Vec<u64> = {
            let mut segs = lock(&self.segments);
            let unused: Vec<u64> = segs
                .range(..before)
                .filter(|(_, s)| s.live == 0)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in &unused {
                segs.remove(seq);
            }
            unused
        };
        for seq in unused {
            let path = self.seg_dir.join(segment::file_name(seq));
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(segment = seq, "deleted unused spool segment"),
                Err(e) => warn!(path = %path.display(), error = %e, "cannot delete spool segment"),
            }
        }
    }

    /// One tick of the maintenance thread.
    fn maintain(&self) {
        let (seq, changes) = {
            let w = lock(&self.writer);
            (w.seq, w.changes)
        };
        let due = {
            let cp = lock(&self.checkpoint);
            changes != cp.changes && (seq > cp.at.seq || cp.when.elapsed() >= CHECKPOINT_EVERY)
        };
        if due && self.check_poisoned().is_ok() {
            if let Err(e) = self.checkpoint() {
                warn!(error = %e, "spool checkpoint failed");
            }
        }
        self.delete_unused_segments();
        if let Some(seq) = self.compaction_candidate(COMPACT_AFTER) {
            if let Err(e) = self.compact(seq) {
                warn!(segment = seq, error = %e, "spool segment compaction failed");
            }
        }
    }

    /// The oldest sealed segment before the checkpoint that is mostly garbage.
    fn compaction_candidate(&self, sealed_for: Duration) -> Option<u64> {
        let before = lock(&self.checkpoint).at.seq;
        let segs = lock(&self.segments);
        segs.range(..before).find_map(|(seq, s)| {
            let sparse = (s.live_bytes as f64) <= s.used as f64 * COMPACT_LIVE_FRACTION;
            let old = s.sealed.is_some_and(|t| t.elapsed() >= sealed_for);
            (s.live > 0 && sparse && old).then_some(*seq)
        })
    }

    /// Copies the messages still indexed in segment `seq` to the active segment (metadata as
    /// indexed now, body as recorded), so `seq` can be deleted after the next checkpoint.
    fn compact(&self, seq: u64) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let path = self.seg_dir.join(segment::file_name(seq));
        let mut reader = segment::Reader::open(&path, 0)?;
        let mut body = Vec::new();
        let mut moved = 0u64;
        while let Some(rec) = reader.next_record(&mut body)? {
            if rec.kind == Kind::Insert && self.relocate(seq, &rec, &body)? {
                moved += 1;
            }
        }
        info!(segment = seq, messages = moved, "spool segment compacted");
        Ok(())
    }

    /// Re-appends one message if the index still points at this record of it.
    fn relocate(&self, seq: u64, rec: &segment::Record, body: &[u8]) -> Result<bool, StorageError> {
        let mut w = lock(&self.writer);
        let key = index_key(rec.id);
        let Some(v) = self.tree.get(key).map_err(sled_err)? else {
            return Ok(false);
        };
        let old = Pointer::decode(rec.id, &v)?;
        if old.seq != seq || old.record_offset() != rec.offset {
            return Ok(false);
        }
        self.rotate_if_full(&mut w)?;
        let meta = &v[ENTRY_HEAD..];
        let start = w.pending.len();
        let new = w.append_insert(rec.id, meta, body);
        if let Err(e) = w.write_pending() {
            w.pending.truncate(start);
            return Err(e.into());
        }
        self.tree.insert(key, new.entry(meta)).map_err(sled_err)?;
        w.changes += 1;
        drop(w);
        self.account(rec.id, Some(&v), Some(&new));
        Ok(true)
    }

    /// If blob files exist (they should not, see the module documentation), make them durable:
    /// sled writes them without `fsync`. While the `blobs` directory's mtime is what it was at
    /// open, no blob was ever created, and one `stat` proves it.
    fn sync_blobs(&self) -> Result<(), StorageError> {
        let blobs = self.dir.join("blobs");
        if !self.blobs_seen.load(Ordering::Acquire) {
            let mtime = std::fs::metadata(&blobs)?.modified()?;
            if Some(mtime) == self.blobs_mtime_at_open {
                return Ok(());
            }
            self.blobs_seen.store(true, Ordering::Release);
        }
        let mut any = false;
        for entry in std::fs::read_dir(&blobs)? {
            let entry = entry?;
            File::open(entry.path())?.sync_all()?;
            any = true;
        }
        if any {
            warn!("sled wrote blob files; they were fsynced, but index entries should be small");
            fsync_dir(&blobs)?;
        }
        Ok(())
    }

    fn read_body(&self, id: QueueId, ptr: &Pointer) -> Result<Bytes, StorageError> {
        let file = lock(&self.segments)
            .get(&ptr.seq)
            .map(|s| s.file.clone())
            .ok_or_else(|| {
                StorageError::corrupt(Some(id), format!("segment {} is missing", ptr.seq))
            })?;
        let len = usize::try_from(ptr.body_len)
            .map_err(|_| StorageError::corrupt(Some(id), "body length overflows usize"))?;
        let mut body = vec![0u8; len];
        file.read_exact_at(&mut body, ptr.body_offset)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    StorageError::corrupt(
                        Some(id),
                        format!("body past the end of segment {}", ptr.seq),
                    )
                } else {
                    StorageError::Io(e)
                }
            })?;
        if segment::body_crc(&body) != ptr.body_crc {
            return Err(StorageError::corrupt(Some(id), "body checksum mismatch"));
        }
        Ok(Bytes::from(body))
    }
}

/// What replaying the segments found.
struct Replayed {
    records: u64,
    /// Every intact insert record from the checkpoint on, as (segment, record offset).
    seen: HashSet<(u64, u64)>,
}

/// Applies every record from the checkpoint on to the index, in order.
fn replay(
    tree: &sled::Tree,
    found: &[(u64, PathBuf)],
    checkpoint: Option<Position>,
) -> Result<Replayed, StorageError> {
    let from = checkpoint.unwrap_or(Position { seq: 0, offset: 0 });
    let mut out = Replayed {
        records: 0,
        seen: HashSet::new(),
    };
    let mut body = Vec::new();
    for (i, (seq, path)) in found.iter().enumerate() {
        if *seq < from.seq {
            continue;
        }
        let start = if *seq == from.seq { from.offset } else { 0 };
        let mut reader = segment::Reader::open(path, start)?;
        while let Some(rec) = reader.next_record(&mut body)? {
            out.records += 1;
            let key = index_key(rec.id);
            match rec.kind {
                Kind::Insert => {
                    let ptr = Pointer {
                        seq: *seq,
                        body_offset: rec.body_offset(),
                        body_len: rec.body_len,
                        body_crc: rec.body_crc,
                        record_len: rec.len,
                    };
                    out.seen.insert((ptr.seq, rec.offset));
                    tree.insert(key, ptr.entry(&rec.meta)).map_err(sled_err)?;
                }
                Kind::Update => {
                    if let Some(old) = tree.get(key).map_err(sled_err)? {
                        if let Ok(ptr) = Pointer::decode(rec.id, &old) {
                            tree.insert(key, ptr.entry(&rec.meta)).map_err(sled_err)?;
                        }
                    }
                }
                Kind::Remove => {
                    tree.remove(key).map_err(sled_err)?;
                }
            }
        }
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        if reader.stopped.is_none()
            && reader.offset() < len
            && !segment::zeros_ahead(path, reader.offset())
        {
            // Zeros ended the read but the file goes on with something else: a zeroed block
            // inside a segment, not the unwritten rest of a zero-filled one.
            reader.stopped = Some("a block of zeros before more data".into());
        }
        if let Some(why) = &reader.stopped {
            let last = i + 1 == found.len();
            let dropped = len.saturating_sub(reader.offset());
            if last {
                info!(segment = seq, bytes = dropped, reason = %why,
                    "spool segment ends in a torn record (a crash while writing); ignored");
            } else {
                warn!(segment = seq, bytes = dropped, reason = %why,
                    "damaged record in a spool segment; the rest of that segment is ignored");
            }
        }
    }
    Ok(out)
}

/// Counts the index entries per segment, and drops the entries that point past the checkpoint
/// at a record that is not there (sled persisted the entry, the segment lost the record: the
/// message was never acknowledged).
fn count_live(
    tree: &sled::Tree,
    segments: &mut BTreeMap<u64, Segment>,
    checkpoint: Option<Position>,
    seen: &HashSet<(u64, u64)>,
) -> Result<(), StorageError> {
    let from = checkpoint.unwrap_or(Position { seq: 0, offset: 0 });
    let mut dangling = Vec::new();
    let mut missing = 0u64;
    for item in tree.scan_prefix([INDEX]) {
        let (k, v) = item.map_err(sled_err)?;
        let Some(id) = key_id(&k) else { continue };
        let Ok(ptr) = Pointer::decode(id, &v) else {
            continue; // reported by scan and get
        };
        // Past the checkpoint, an entry needs its record. Replay saw most of them; the others
        // (after a damaged record that ended a segment's replay, or never written at all)
        // are read where they point.
        let unseen = ptr.at_or_after(from) && !seen.contains(&(ptr.seq, ptr.record_offset()));
        if unseen
            && !segments
                .get(&ptr.seq)
                .is_some_and(|s| record_intact(&s.file, id, &ptr))
        {
            dangling.push(id);
            continue;
        }
        match segments.get_mut(&ptr.seq) {
            Some(s) => {
                s.live += 1;
                s.live_bytes += ptr.record_len;
            }
            None => missing += 1,
        }
    }
    for id in &dangling {
        warn!(queue_id = %id, "index entry without its segment record (never acknowledged); dropped");
        tree.remove(index_key(*id)).map_err(sled_err)?;
    }
    if missing > 0 {
        error!(
            messages = missing,
            "index entries point at missing segment files"
        );
    }
    Ok(())
}

/// Whether the insert record `ptr` points at is there, for `id`, with its body intact.
fn record_intact(file: &File, id: QueueId, ptr: &Pointer) -> bool {
    let mut head = [0u8; segment::HEADER_LEN];
    if file.read_exact_at(&mut head, ptr.record_offset()).is_err() {
        return false;
    }
    let parsed = segment::parse_header(&head);
    if !parsed.is_some_and(|h| h.kind == Kind::Insert && h.id == id && h.body_len == ptr.body_len) {
        return false;
    }
    let Ok(len) = usize::try_from(ptr.body_len) else {
        return false;
    };
    let mut body = vec![0u8; len];
    file.read_exact_at(&mut body, ptr.body_offset).is_ok()
        && segment::body_crc(&body) == ptr.body_crc
}

impl Storage for SledStorage {
    fn insert(&self, msg: &InboundMessage) -> Result<(), StorageError> {
        self.insert_many(std::slice::from_ref(msg))
            .pop()
            .expect("one result per message")
    }

    /// One `pwrite` of all the batch's records, then one index insert per message.
    fn insert_many(&self, msgs: &[InboundMessage]) -> Vec<Result<(), StorageError>> {
        self.inner.insert_many(msgs)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.inner.sync()
    }

    fn get(&self, id: QueueId) -> Result<Option<InboundMessage>, StorageError> {
        let inner = &self.inner;
        let mut entry = inner.tree.get(index_key(id)).map_err(sled_err)?;
        loop {
            let Some(v) = entry else {
                return Ok(None);
            };
            let (ptr, meta) = decode_entry(id, &v)?;
            match inner.read_body(id, &ptr) {
                Ok(body) => {
                    return Ok(Some(InboundMessage {
                        id,
                        envelope: meta.envelope,
                        client: meta.client,
                        arrived_ms: meta.arrived_ms,
                        body,
                    }))
                }
                Err(e) => {
                    // Removed, or moved by a compaction whose old segment is already gone,
                    // between the lookup and the read: look again. The same entry twice is a
                    // real error.
                    entry = inner.tree.get(index_key(id)).map_err(sled_err)?;
                    if entry.as_ref() == Some(&v) {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn update_envelope(&self, id: QueueId, envelope: &Envelope) -> Result<bool, StorageError> {
        let inner = &self.inner;
        inner.check_poisoned()?;
        let mut w = lock(&inner.writer);
        let key = index_key(id);
        let Some(old) = inner.tree.get(key).map_err(sled_err)? else {
            return Ok(false);
        };
        let (ptr, rec) = decode_entry(id, &old)?;
        let meta = encode_meta(id, envelope, &rec.client, rec.arrived_ms, rec.body_len)?;
        inner.tree.insert(key, ptr.entry(&meta)).map_err(sled_err)?;
        segment::encode(&mut w.pending, Kind::Update, id, &meta, b"");
        w.changes += 1;
        Ok(true)
    }

    fn remove(&self, id: QueueId) -> Result<(), StorageError> {
        let inner = &self.inner;
        let mut w = lock(&inner.writer);
        if let Some(old) = inner.tree.remove(index_key(id)).map_err(sled_err)? {
            segment::encode(&mut w.pending, Kind::Remove, id, b"", b"");
            w.changes += 1;
            drop(w);
            inner.account(id, Some(&old), None);
            debug!(queue_id = %id, "removed from spool");
        }
        Ok(())
    }

    fn scan(&self) -> ScanIter<'_> {
        Box::new(self.inner.tree.scan_prefix([INDEX]).map(|item| {
            let (k, v) = item.map_err(sled_err)?;
            let id = key_id(&k).ok_or_else(|| {
                StorageError::corrupt(None, format!("malformed index key {:02x?}", &k[..]))
            })?;
            decode_entry(id, &v).map(|(_, meta)| meta.into_meta())
        }))
    }

    fn len(&self) -> usize {
        self.inner.tree.scan_prefix([INDEX]).count()
    }
}

/// A spool in `dir` for unit tests elsewhere in the crate: no free-space reserve.
#[cfg(test)]
pub(crate) fn open_for_test(dir: &Path) -> SledStorage {
    SledStorage::open(dir, tests::opts()).expect("open a test spool")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn opts() -> SledOptions {
        SledOptions {
            cache_bytes: 8 << 20,
            min_free_bytes: 0,
            ..SledOptions::default()
        }
    }

    fn msg(body: &[u8]) -> InboundMessage {
        InboundMessage {
            id: QueueId::new(),
            envelope: Envelope::new("a@example.org", vec![]),
            client: ClientInfo::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:25".parse().unwrap(),
                "",
            ),
            arrived_ms: 0,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn failed_fsync_poisons_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        s.sync().unwrap();
        s.poison(&StorageError::Io(std::io::Error::from_raw_os_error(
            libc::EIO,
        )));
        let m = msg(b"");
        assert!(matches!(s.insert(&m), Err(StorageError::Poisoned(_))));
        assert!(matches!(s.sync(), Err(StorageError::Poisoned(_))));
        assert!(matches!(
            s.insert_many(std::slice::from_ref(&m)).pop(),
            Some(Err(StorageError::Poisoned(_)))
        ));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn corrupt_index_entries_are_reported_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let good = msg(b"fine\r\n");
        s.insert(&good).unwrap();
        let (short, json, version) = (QueueId::new(), QueueId::new(), QueueId::new());
        s.put_raw(&index_key(short), b"\x02abc");
        let ptr = Pointer {
            seq: 1,
            body_offset: 0,
            body_len: 0,
            body_crc: 0,
            record_len: 0,
        };
        s.put_raw(&index_key(json), &ptr.entry(b"{not json"));
        s.put_raw(
            &index_key(version),
            &ptr.entry(format!(r#"{{"v":99,"id":"{version}"}}"#).as_bytes()),
        );
        // A key that is not ours at all.
        s.put_raw(&[INDEX, 1, 2, 3], b"x");

        let results: Vec<_> = s.scan().collect();
        assert_eq!(results.len(), 5, "{results:?}");
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        for id in [short, json, version] {
            assert!(
                matches!(s.get(id), Err(StorageError::Corrupt { .. })),
                "{id}"
            );
        }
        assert_eq!(s.get(good.id).unwrap().as_ref(), Some(&good));
    }

    #[test]
    fn a_damaged_body_is_corrupt_not_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let m = msg(b"a body that will be damaged on disk\r\n");
        s.insert(&m).unwrap();
        s.sync().unwrap();
        let v = s.inner.tree.get(index_key(m.id)).unwrap().unwrap();
        let ptr = Pointer::decode(m.id, &v).unwrap();
        let path = s.inner.seg_dir.join(segment::file_name(ptr.seq));
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"X", ptr.body_offset + 3).unwrap();
        assert!(matches!(s.get(m.id), Err(StorageError::Corrupt { .. })));
    }

    /// Copies sled's files (not the segments) of an open spool whose index was just flushed:
    /// what a crash at that moment leaves of sled.
    fn copy_sled_files(from: &Path, to: &Path) {
        std::fs::create_dir_all(to.join("blobs")).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    fn copy_segments(from: &Path, to: &Path) {
        let (from, to) = (from.join(SEGMENTS_DIR), to.join(SEGMENTS_DIR));
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    #[test]
    fn replay_after_a_crash_applies_what_sled_lost() {
        let live = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        let (a, b, c, d) = (msg(b"a\r\n"), msg(b"b\r\n"), msg(&[b'c'; 9000]), msg(b""));
        let s = SledStorage::open(live.path(), opts()).unwrap();
        s.insert_many(&[a.clone(), b.clone()]);
        s.sync().unwrap();
        s.checkpoint().unwrap();
        // The crash image's sled and checkpoint file: as of this checkpoint.
        copy_sled_files(live.path(), image.path());
        copy_segments(live.path(), image.path());

        // After the checkpoint: a new message, new states for one, a removal; all synced, none
        // in sled's durable state (the image keeps the old sled files).
        s.insert_many(&[c.clone(), d.clone()]);
        let mut env = a.envelope.clone();
        env.delay_warned = true;
        assert!(s.update_envelope(a.id, &env).unwrap());
        s.remove(b.id).unwrap();
        s.sync().unwrap();
        for f in std::fs::read_dir(live.path().join(SEGMENTS_DIR)).unwrap() {
            let f = f.unwrap();
            if f.file_name() != CHECKPOINT_FILE {
                std::fs::copy(
                    f.path(),
                    image.path().join(SEGMENTS_DIR).join(f.file_name()),
                )
                .unwrap();
            }
        }
        drop(s);

        let r = SledStorage::open(image.path(), opts()).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(b.id).unwrap(), None, "removal replayed");
        assert_eq!(
            r.get(a.id).unwrap().unwrap().envelope,
            env,
            "update replayed"
        );
        assert_eq!(r.get(c.id).unwrap().as_ref(), Some(&c));
        assert_eq!(r.get(d.id).unwrap().as_ref(), Some(&d));
        drop(r);
        // The open checkpointed the replay: a second open replays nothing and agrees.
        let r = SledStorage::open(image.path(), opts()).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(c.id).unwrap().as_ref(), Some(&c));
    }

    #[test]
    fn a_busy_spool_moves_to_a_zero_filled_segment_and_replays_from_it() {
        let live = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        let s = SledStorage::open(live.path(), opts()).unwrap();
        let (a, b) = (msg(&[b'a'; 600 << 10]), msg(&[b'b'; 600 << 10]));
        s.insert_many(&[a.clone(), b.clone()]);
        s.sync().unwrap();
        assert!(!lock(&s.inner.writer).preallocated);
        // Past PREPARE_AFTER a spare is asked for at the next commit...
        let (c, d) = (msg(b"c\r\n"), msg(&[b'd'; 9000]));
        s.insert(&c).unwrap();
        s.sync().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.inner.spare.is_ready() {
            assert!(Instant::now() < deadline, "no spare segment after 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        // ...and the commit after it is ready goes to it.
        s.insert(&d).unwrap();
        s.sync().unwrap();
        let (seq, file_len) = {
            let w = lock(&s.inner.writer);
            assert!(w.preallocated);
            (w.seq, w.file.metadata().unwrap().len())
        };
        assert_eq!(seq, 2);
        assert_eq!(file_len, SEGMENT_FILE_BYTES, "zero-filled to its full size");
        s.checkpoint().unwrap();
        copy_sled_files(live.path(), image.path());
        copy_segments(live.path(), image.path());

        // After the checkpoint, into the zero-filled file: a new message, new states, a
        // removal; synced, and only in the segment (the image keeps the old sled files).
        let e = msg(b"e\r\n");
        s.insert(&e).unwrap();
        let mut env = a.envelope.clone();
        env.delay_warned = true;
        assert!(s.update_envelope(a.id, &env).unwrap());
        s.remove(b.id).unwrap();
        s.sync().unwrap();
        std::fs::copy(
            live.path().join(SEGMENTS_DIR).join(segment::file_name(seq)),
            image
                .path()
                .join(SEGMENTS_DIR)
                .join(segment::file_name(seq)),
        )
        .unwrap();
        drop(s);

        let r = SledStorage::open(image.path(), opts()).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r.get(b.id).unwrap(), None, "removal replayed");
        assert_eq!(
            r.get(a.id).unwrap().unwrap().envelope,
            env,
            "update replayed"
        );
        for m in [&c, &d, &e] {
            assert_eq!(r.get(m.id).unwrap().as_ref(), Some(m));
        }
        // The zero-filled segment was read to its last record, not beyond: the new active
        // segment follows it.
        assert_eq!(lock(&r.inner.writer).seq, seq + 1);
        assert!(!image
            .path()
            .join(SEGMENTS_DIR)
            .join(prealloc::SPARE_NAME)
            .exists());
    }

    #[test]
    fn an_index_entry_whose_record_was_lost_is_dropped() {
        let live = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        let (a, b) = (msg(b"kept\r\n"), msg(b"never acknowledged\r\n"));
        let s = SledStorage::open(live.path(), opts()).unwrap();
        s.insert(&a).unwrap();
        s.sync().unwrap();
        s.checkpoint().unwrap();
        copy_segments(live.path(), image.path());
        // b's index entry reaches sled's files (its background flush could do this), but the
        // crash takes b's record: the image has the segments as they were before it.
        s.insert(&b).unwrap();
        s.inner.db.flush().unwrap();
        copy_sled_files(live.path(), image.path());
        drop(s);

        let r = SledStorage::open(image.path(), opts()).unwrap();
        assert_eq!(r.get(b.id).unwrap(), None);
        assert_eq!(r.get(a.id).unwrap().as_ref(), Some(&a));
        let ids: Vec<_> = r.scan().map(|m| m.unwrap().id).collect();
        assert_eq!(ids, vec![a.id]);
    }

    #[test]
    fn a_damaged_record_past_the_checkpoint_costs_only_its_own_message() {
        let live = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        let (a, b, c) = (msg(b"first\r\n"), msg(b"second\r\n"), msg(b"third\r\n"));
        let s = SledStorage::open(live.path(), opts()).unwrap();
        s.sync().unwrap();
        s.checkpoint().unwrap();
        s.insert_many(&[a.clone(), b.clone(), c.clone()]);
        s.sync().unwrap();
        // sled's files have all three entries (as after its background flush); the segment's
        // first record then loses a bit of its body.
        s.inner.db.flush().unwrap();
        copy_sled_files(live.path(), image.path());
        copy_segments(live.path(), image.path());
        let v = s.inner.tree.get(index_key(a.id)).unwrap().unwrap();
        let ptr = Pointer::decode(a.id, &v).unwrap();
        drop(s);
        let path = image
            .path()
            .join(SEGMENTS_DIR)
            .join(segment::file_name(ptr.seq));
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"#", ptr.body_offset).unwrap();

        // Replay stops at the damaged record; the two after it are still whole where the
        // index points, so only the damaged one goes.
        let r = SledStorage::open(image.path(), opts()).unwrap();
        assert_eq!(r.get(a.id).unwrap(), None);
        assert_eq!(r.get(b.id).unwrap().as_ref(), Some(&b));
        assert_eq!(r.get(c.id).unwrap().as_ref(), Some(&c));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn full_segments_rotate_and_empty_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let big = vec![b'x'; 1 << 20];
        let msgs: Vec<_> = (0..80).map(|_| msg(&big)).collect();
        for chunk in msgs.chunks(8) {
            for r in s.insert_many(chunk) {
                r.unwrap();
            }
            s.sync().unwrap();
        }
        assert!(s.segment_count() >= 3, "{} segments", s.segment_count());
        let keep = &msgs[79];
        for m in &msgs[..79] {
            s.remove(m.id).unwrap();
        }
        s.sync().unwrap();
        // The first checkpoint moves past the old segments; the next tick deletes them.
        s.checkpoint().unwrap();
        assert!(
            s.segment_count() <= 2,
            "{} segments left",
            s.segment_count()
        );
        assert_eq!(s.get(keep.id).unwrap().as_ref(), Some(keep));
        drop(s);
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(keep.id).unwrap().as_ref(), Some(keep));
        let files = segment::list(&dir.path().join(SEGMENTS_DIR)).unwrap();
        assert!(files.len() <= 3, "{files:?}");
    }

    #[test]
    fn sparse_segments_are_compacted_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let big = vec![b'y'; 1 << 20];
        // 35 MiB per segment: a batch never spans two.
        let msgs: Vec<_> = (0..70).map(|_| msg(&big)).collect();
        for chunk in msgs.chunks(5) {
            s.insert_many(chunk);
            s.sync().unwrap();
        }
        // The next insert finds the second segment full too.
        let tail = msg(b"tail\r\n");
        s.insert(&tail).unwrap();
        // Keep one in ten, with new recipient states on one of them.
        let kept: Vec<_> = msgs.iter().step_by(10).collect();
        for m in &msgs {
            if !kept.iter().any(|k| k.id == m.id) {
                s.remove(m.id).unwrap();
            }
        }
        let mut env = kept[0].envelope.clone();
        env.delay_warned = true;
        s.update_envelope(kept[0].id, &env).unwrap();
        s.checkpoint().unwrap();
        let before = s.segment_count();
        assert!(before >= 3, "{before} segments");
        s.compact_now();
        s.checkpoint().unwrap();
        assert!(
            s.segment_count() < before,
            "{} segments after compaction, {before} before",
            s.segment_count()
        );
        assert_eq!(s.get(kept[0].id).unwrap().unwrap().envelope, env);
        for k in &kept[1..] {
            assert_eq!(s.get(k.id).unwrap().as_ref(), Some(*k));
        }
        drop(s);
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        assert_eq!(s.len(), kept.len() + 1);
        assert_eq!(s.get(tail.id).unwrap().as_ref(), Some(&tail));
        assert_eq!(s.get(kept[0].id).unwrap().unwrap().envelope, env);
        for k in &kept[1..] {
            assert_eq!(s.get(k.id).unwrap().as_ref(), Some(*k));
        }
    }

    #[test]
    fn concurrent_writers_checkpoints_and_compaction_agree_with_a_model() {
        // Four threads insert, update and remove their own messages while the main thread
        // checkpoints and compacts; afterwards (and after a reopen) the spool holds exactly
        // what each thread's model says, bodies and envelopes included.
        use std::collections::HashMap;
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SledStorage::open(dir.path(), opts()).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut model: HashMap<QueueId, InboundMessage> = HashMap::new();
                    // A small deterministic generator, so a failure can be replayed.
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for i in 0..600u64 {
                        let r = next();
                        let ids: Vec<QueueId> = model.keys().copied().collect();
                        // Half inserts, a fifth updates, the rest removals: old segments thin
                        // out, so compaction has work while the writers run.
                        match r % 10 {
                            0..=4 => {
                                let size = (r >> 8) as usize % 300_000;
                                let mut m = msg(&vec![b'a' + (i % 26) as u8; size]);
                                m.envelope.sender = format!("t{t}i{i}@example.org");
                                s.insert_many(std::slice::from_ref(&m))
                                    .pop()
                                    .unwrap()
                                    .unwrap();
                                model.insert(m.id, m);
                            }
                            5 | 6 if !ids.is_empty() => {
                                let id = ids[(r >> 8) as usize % ids.len()];
                                let m = model.get_mut(&id).unwrap();
                                m.envelope.sender = format!("updated{i}@example.org");
                                assert!(s.update_envelope(id, &m.envelope).unwrap());
                            }
                            _ if !ids.is_empty() => {
                                let id = ids[(r >> 8) as usize % ids.len()];
                                s.remove(id).unwrap();
                                model.remove(&id);
                            }
                            _ => {}
                        }
                        if i % 25 == 0 {
                            s.sync().unwrap();
                        }
                    }
                    s.sync().unwrap();
                    model
                })
            })
            .collect();
        let maint = {
            let s = s.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    s.checkpoint().unwrap();
                    s.compact_now();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let mut model = HashMap::new();
        for w in workers {
            model.extend(w.join().unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        maint.join().unwrap();

        let check = |s: &SledStorage| {
            assert_eq!(s.len(), model.len());
            for (id, m) in &model {
                assert_eq!(s.get(*id).unwrap().as_ref(), Some(m), "{id}");
            }
        };
        check(&s);
        drop(Arc::try_unwrap(s).ok().expect("only reference"));
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        check(&s);
    }

    #[test]
    fn format_1_spool_is_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (msg(&[b'x'; 20_000]), msg(b"small\r\n"));
        {
            // A format-1 spool: what tern before segment files left behind.
            let db = sled::Config::new()
                .path(dir.path())
                .segment_size(SEGMENT_SIZE)
                .open()
                .unwrap();
            let tree = db.open_tree(TREE).unwrap();
            legacy::write(&tree, &a);
            legacy::write(&tree, &b);
            // A damaged one: metadata without its body chunks is dropped with an error.
            let mut broken = msg(b"");
            broken.body = Bytes::from_static(b"gone");
            legacy::write(&tree, &broken);
            tree.remove(legacy::key(legacy::BODY, broken.id, 0))
                .unwrap();
            db.flush().unwrap();
        }
        {
            let s = SledStorage::open(dir.path(), opts()).unwrap();
            assert_eq!(s.len(), 2);
            assert_eq!(s.get(a.id).unwrap().as_ref(), Some(&a));
            assert!(!legacy::any(&s.inner.tree));
        }
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get(b.id).unwrap().as_ref(), Some(&b));
    }
}
