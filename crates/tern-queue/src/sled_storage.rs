//! [`Storage`] on sled 0.34.7.
//!
//! # Durability
//!
//! sled 0.34.7's `Db::flush()` writes its dirty log buffers with `pwrite` and then, on Linux,
//! calls `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on the written range
//! (`pagecache/iobuf.rs`, `IoBufs::write_to_log`). `sync_file_range` only pushes the page cache to
//! the device: it neither persists the file's metadata (its size, when the log grew) nor flushes
//! the drive's volatile write cache, so data "flushed" that way can vanish on power loss or an OS
//! crash. sled's own `fsync` calls (the 500 ms background flusher, snapshots, truncation) are not
//! tied to any `flush()` call. So [`SledStorage::sync`] calls `db.flush()` and then `fdatasync`s
//! the log through a handle on `<dir>/db` opened once at [`SledStorage::open`]: `fdatasync` covers
//! every dirty page of the inode whichever descriptor wrote it, includes the size change, and ends
//! with a cache flush.
//!
//! In sled 0.34.7 that one file is the whole write-ahead log: every tree's pages, the tree
//! registry and sled's batch manifests (which make an `apply_batch` all-or-nothing on recovery)
//! are messages in it. The other files in the directory are:
//! * `conf` (segment size, format version): written without `fsync` when the database is created
//!   and never rewritten; [`SledStorage::open`] `fsync`s it once.
//! * `snap.<lsn>`: written, `fsync`ed and renamed by sled itself. A snapshot only shortens
//!   recovery; sled rebuilds the page table by replaying the log from the newest snapshot found
//!   (or from the log's start), so the log is the source of truth.
//! * `blobs/<lsn>`: sled stores a log message as a separate blob file, written without `fsync`,
//!   when it exceeds `segment_size / MINIMUM_ITEMS_PER_SEGMENT - SEG_HEADER_LEN` bytes with its
//!   32-byte header (`pagecache/logger.rs`, `reserve_inner`). The limit applies to a whole page
//!   (a leaf with all its entries, written on every consolidation, split and merge), not to one
//!   value. Leaves split above 16 entries (`node.rs`, `should_split`) and a merge adds at most 3
//!   more, so with [`SEGMENT_SIZE`] = 1 MiB (limit 262,092 bytes) and [`CHUNK_SIZE`] = 8 KiB a
//!   leaf stays below ~170 KB: we never create blobs. [`SledStorage::sync`] still `fsync`s any
//!   blob file (and the `blobs` directory) it finds, so a blob could only cost speed, never
//!   durability.
//!
//! Directory entries: the directory, `db`, `conf` and `blobs` are created by the first open and
//! never renamed, so `open` `fsync`s the spool directory and its parent once.
//!
//! A failed `fdatasync` is not retried: the kernel may already have dropped the unwritten pages'
//! dirty state, so the spool refuses all writes until a restart recovers from the disk's real
//! contents (`SledStorage::poison`).
//!
//! # Layout
//!
//! One tree, `spool`. Keys are `kind (1 byte) | QueueId::to_bytes() (16) | chunk index (u32 BE)`:
//! `m` records hold the JSON-encoded metadata, `b` records the raw body, both cut into
//! [`CHUNK_SIZE`] pieces. Because the kind byte comes first, the metadata records form one
//! contiguous key range apart from the bodies, so a scan reads only metadata pages, in id
//! (= arrival) order. One `apply_batch` writes
//! every record of a message ([`Storage::insert`]) or of a whole group commit
//! ([`Storage::insert_many`]): sled logs a batch manifest holding the batch's last LSN, and
//! recovery stops before a batch whose end is not in the log (`pagecache/iterator.rs`, "torn
//! batch"), so neither a body without metadata nor metadata with a partial body can exist after
//! a crash. That cut never reaches an acknowledged message: `apply_batch` holds sled's global
//! write lock (`concurrency_control::write`) and every single-key write and `flush`
//! (`iobuf::flush`) take its read side, so batches never interleave with other writes and a
//! flush never ends inside a batch: a batch that returned before `sync` was called lies wholly
//! below the LSN that `sync`'s `flush` makes stable, and a torn batch can only come after it.
//!
//! The metadata is JSON (serde_json) because it is small next to the body and next to an
//! `fdatasync`, self-describing (fields can be added with `#[serde(default)]` without a migration,
//! and a spool can be inspected by hand), and already a dependency; the body is never encoded,
//! only cut into chunks.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tern_message::{ClientInfo, Envelope, InboundMessage, QueueId};
use tracing::{debug, error, info, warn};

use crate::free_space::FreeSpaceGuard;
use crate::storage::{io_is_disk_full, ScanIter, SpooledMeta, Storage, StorageError};

/// sled segment (and IO buffer) size. Fixed: sled refuses to reopen a database with a different
/// one. Sets the blob threshold, see the module documentation.
pub const SEGMENT_SIZE: usize = 1 << 20;

/// Size of a body or metadata chunk. See the module documentation for why it must stay well
/// below `SEGMENT_SIZE / 4 / 20`.
pub const CHUNK_SIZE: usize = 8 << 10;

const TREE: &str = "spool";
const META: u8 = b'm';
const BODY: u8 = b'b';
const KEY_LEN: usize = 1 + 16 + 4;
const META_VERSION: u32 = 1;

/// Options for [`SledStorage::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledOptions {
    /// sled's page cache size. sled's default (1 GiB) is far more than a spool, whose messages
    /// are read about once each, benefits from.
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
            // a few large messages in flight plus sled's own segment preallocation.
            min_free_bytes: 128 << 20,
            lock_wait_ms: 5_000,
        }
    }
}

/// The spool on sled. See the module documentation for the durability argument.
pub struct SledStorage {
    db: sled::Db,
    tree: sled::Tree,
    /// Handle on sled's log file, kept open so `sync` is one `fdatasync` and no `open`.
    log_file: File,
    dir: PathBuf,
    free_space: FreeSpaceGuard,
    /// Spooled messages; maintained by insert/remove so `len` needs no scan.
    /// Set when an `fsync`/`fdatasync` failed; see [`SledStorage::poison`].
    poisoned: Mutex<Option<String>>,
    /// The `blobs` directory's mtime after open; see [`SledStorage::sync_blobs`].
    blobs_mtime_at_open: Option<std::time::SystemTime>,
    /// Once the directory changed, every sync scans it.
    blobs_seen: AtomicBool,
}

/// What a metadata record holds, borrowed for writing.
#[derive(Serialize)]
struct MetaRef<'a> {
    v: u32,
    id: QueueId,
    envelope: &'a Envelope,
    client: &'a ClientInfo,
    arrived_ms: u64,
    body_len: u64,
    body_chunks: u32,
}

/// What a metadata record holds, owned for reading.
#[derive(Deserialize)]
struct MetaRecord {
    v: u32,
    id: QueueId,
    envelope: Envelope,
    client: ClientInfo,
    arrived_ms: u64,
    body_len: u64,
    body_chunks: u32,
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

/// Splits a key into (kind, id, chunk).
fn parse_key(k: &[u8]) -> Option<(u8, QueueId, u32)> {
    if k.len() != KEY_LEN {
        return None;
    }
    let id = QueueId::from_bytes(k[1..17].try_into().ok()?);
    let chunk = u32::from_be_bytes(k[17..].try_into().ok()?);
    Some((k[0], id, chunk))
}

fn chunk_count(len: usize) -> u32 {
    // An empty body still gets no chunk: its metadata says body_len 0 and body_chunks 0.
    u32::try_from(len.div_ceil(CHUNK_SIZE)).unwrap_or(u32::MAX)
}

fn sled_err(e: sled::Error) -> StorageError {
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

impl SledStorage {
    /// Opens (creating if needed) the spool in `dir`.
    #[tracing::instrument(name = "spool_open", skip(opts), fields(dir = %dir.display()))]
    pub fn open(dir: &Path, opts: SledOptions) -> Result<Self, StorageError> {
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
        // Make the files' existence durable: sled creates them without syncing the directory, and
        // never syncs `conf` at all (see the module documentation).
        File::open(dir.join("conf"))?.sync_all()?;
        fsync_dir(&dir.join("blobs"))?;
        fsync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        // The tree registry entry for `spool` may be new: make it durable before anything is
        // inserted so a later `sync` only has to cover messages.
        db.flush().map_err(sled_err)?;
        log_file.sync_data()?;

        let free_space = FreeSpaceGuard::new(dir, opts.min_free_bytes)?;

        // No count of the messages here: with a million queued, walking the keys costs about
        // a second of start-up, and the queue actor's recovery scan counts them anyway.
        info!("spool opened");
        let blobs = dir.join("blobs");
        let blobs_mtime_at_open = std::fs::metadata(&blobs).and_then(|m| m.modified()).ok();
        // Blobs left by an earlier run (they should not exist) keep every sync scanning.
        let blobs_seen = std::fs::read_dir(&blobs).map_or(true, |mut d| d.next().is_some());

        Ok(Self {
            db,
            tree,
            log_file,
            dir: dir.to_path_buf(),
            free_space,
            poisoned: Mutex::new(None),
            blobs_mtime_at_open,
            blobs_seen: AtomicBool::new(blobs_seen),
        })
    }

    /// The directory the spool lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All records under `prefix`, in key order, as (chunk index, value).
    fn chunks(
        &self,
        kind: u8,
        id: QueueId,
    ) -> impl Iterator<Item = Result<(u32, sled::IVec), StorageError>> {
        self.tree.scan_prefix(prefix(kind, id)).map(move |item| {
            let (k, v) = item.map_err(sled_err)?;
            let (_, _, chunk) =
                parse_key(&k).ok_or_else(|| StorageError::corrupt(Some(id), "bad key"))?;
            Ok((chunk, v))
        })
    }

    fn read_meta(&self, id: QueueId) -> Result<Option<MetaRecord>, StorageError> {
        let mut buf = Vec::new();
        let mut n = 0u32;
        for item in self.chunks(META, id) {
            let (chunk, v) = item?;
            if chunk != n {
                return Err(StorageError::corrupt(
                    Some(id),
                    format!("metadata chunk {n} missing"),
                ));
            }
            buf.extend_from_slice(&v);
            n += 1;
        }
        if n == 0 {
            return Ok(None);
        }
        MetaRecord::decode(id, &buf).map(Some)
    }

    /// If blob files exist (they should not, see the module documentation), make them durable:
    /// sled writes them without `fsync`. While the `blobs` directory's mtime is what it was at
    /// open, no blob was ever created, and one `stat` proves it; this runs on every group
    /// commit, where a `readdir` (open, getdents twice, close) was measurable.
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
            warn!("sled wrote blob files; they were fsynced, but chunk sizing should prevent them");
            fsync_dir(&blobs)?;
        }
        Ok(())
    }

    /// Adds every record of `msg` to `batch`, after the checks that can refuse it alone.
    /// Returns whether the message replaces one already spooled.
    fn prepare(&self, msg: &InboundMessage, batch: &mut sled::Batch) -> Result<bool, StorageError> {
        // Inserting into a poisoned spool would only fail at the sync; fail fast instead.
        self.check_poisoned()?;
        let id = msg.id;
        let body_chunks = chunk_count(msg.body.len());
        let meta = serde_json::to_vec(&MetaRef {
            v: META_VERSION,
            id,
            envelope: &msg.envelope,
            client: &msg.client,
            arrived_ms: msg.arrived_ms,
            body_len: msg.body.len() as u64,
            body_chunks,
        })
        .map_err(|e| StorageError::Backend(format!("cannot encode metadata: {e}")))?;

        self.free_space
            .admit((meta.len() + msg.body.len()) as u64)?;

        // Replacing a message: delete its old records in the same batch; the inserts below
        // override the deletes of the keys that are reused.
        let existed = self.tree.contains_key(key(META, id, 0)).map_err(sled_err)?;
        if existed {
            for kind in [META, BODY] {
                for k in self.tree.scan_prefix(prefix(kind, id)).keys() {
                    batch.remove(k.map_err(sled_err)?);
                }
            }
        }
        for (i, piece) in meta.chunks(CHUNK_SIZE).enumerate() {
            batch.insert(&key(META, id, i as u32), piece);
        }
        for (i, piece) in msg.body.chunks(CHUNK_SIZE).enumerate() {
            batch.insert(&key(BODY, id, i as u32), piece);
        }
        Ok(existed)
    }

    /// Applies a group's batch and settles the results of the messages in it.
    fn apply_group(
        &self,
        batch: sled::Batch,
        in_batch: &mut Vec<(usize, bool)>,
        results: &mut [Result<(), StorageError>],
    ) {
        if in_batch.is_empty() {
            return;
        }
        match self.tree.apply_batch(batch) {
            Ok(()) => {}
            Err(e) => {
                let e = sled_err(e);
                for &(i, _) in in_batch.iter() {
                    results[i] = Err(e.duplicate());
                }
            }
        }
        in_batch.clear();
    }

    /// After a failed `fdatasync`, Linux may already have marked the pages that failed to reach
    /// the disk clean, so a retry can report success for data that is not there ("fsyncgate",
    /// PostgreSQL 2018). sled would go on building on a log with holes, and recovery would cut it
    /// at the first hole, taking later, acknowledged messages with it. So the spool refuses every
    /// write from then on; a restart recovers from what is really on disk. Messages acknowledged
    /// before the failure were covered by earlier, successful syncs.
    fn poison(&self, cause: &StorageError) {
        error!(error = %cause, "spool sync failed: refusing writes until restart");
        let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        p.get_or_insert_with(|| cause.to_string());
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        match &*self.poisoned.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(cause) => Err(StorageError::Poisoned(cause.clone())),
            None => Ok(()),
        }
    }

    /// Test hook: write a raw record, bypassing encoding, to simulate on-disk damage.
    #[cfg(test)]
    pub(crate) fn put_raw(&self, k: &[u8], v: &[u8]) {
        self.tree.insert(k, v).unwrap();
    }
}

impl Storage for SledStorage {
    fn insert(&self, msg: &InboundMessage) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        self.prepare(msg, &mut batch)?;
        self.tree.apply_batch(batch).map_err(sled_err)?;
        Ok(())
    }

    /// One `apply_batch` for the whole group: sled's `apply_batch` rolls the IO buffer and so
    /// issues a log write (with `sync_file_range`) per call, which made per-message batches cost
    /// more than the group's `fdatasync`. The batch is still all-or-nothing on recovery, so each
    /// message in it is too.
    fn insert_many(&self, msgs: &[InboundMessage]) -> Vec<Result<(), StorageError>> {
        let mut results: Vec<Result<(), StorageError>> = Vec::with_capacity(msgs.len());
        let mut batch = sled::Batch::default();
        // Indexes of the messages in `batch` and whether each replaces a spooled message.
        let mut in_batch: Vec<(usize, bool)> = Vec::with_capacity(msgs.len());
        let mut ids = HashSet::with_capacity(msgs.len());
        for (i, msg) in msgs.iter().enumerate() {
            if !ids.insert(msg.id) {
                // The same id twice in one group: apply the first before preparing the second,
                // whose removal of stale chunks has to see the first's records.
                self.apply_group(std::mem::take(&mut batch), &mut in_batch, &mut results);
                ids.clear();
                ids.insert(msg.id);
            }
            match self.prepare(msg, &mut batch) {
                Ok(existed) => {
                    in_batch.push((i, existed));
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        self.apply_group(batch, &mut in_batch, &mut results);
        results
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        // A sled write error poisons sled itself (its global error fails every later call).
        self.db.flush().map_err(sled_err)?;
        let synced = self
            .sync_blobs()
            .and_then(|()| self.log_file.sync_data().map_err(StorageError::from));
        if let Err(e) = synced {
            self.poison(&e);
            return Err(e);
        }
        Ok(())
    }

    fn get(&self, id: QueueId) -> Result<Option<InboundMessage>, StorageError> {
        let Some(meta) = self.read_meta(id)? else {
            return Ok(None);
        };
        let body_len = usize::try_from(meta.body_len)
            .map_err(|_| StorageError::corrupt(Some(id), "body length overflows usize"))?;
        let mut body = BytesMut::with_capacity(body_len);
        let mut n = 0u32;
        for item in self.chunks(BODY, id) {
            let (chunk, v) = item?;
            if chunk != n {
                return Err(StorageError::corrupt(
                    Some(id),
                    format!("body chunk {n} missing"),
                ));
            }
            body.extend_from_slice(&v);
            n += 1;
        }
        if n != meta.body_chunks || body.len() != body_len {
            return Err(StorageError::corrupt(
                Some(id),
                format!(
                    "body has {n} chunks / {} bytes, metadata says {} / {body_len}",
                    body.len(),
                    meta.body_chunks
                ),
            ));
        }
        Ok(Some(InboundMessage {
            id,
            envelope: meta.envelope,
            client: meta.client,
            arrived_ms: meta.arrived_ms,
            body: body.freeze(),
        }))
    }

    fn update_envelope(&self, id: QueueId, envelope: &Envelope) -> Result<bool, StorageError> {
        self.check_poisoned()?;
        let Some(old) = self.read_meta(id)? else {
            return Ok(false);
        };
        let meta = serde_json::to_vec(&MetaRef {
            v: META_VERSION,
            id,
            envelope,
            client: &old.client,
            arrived_ms: old.arrived_ms,
            body_len: old.body_len,
            body_chunks: old.body_chunks,
        })
        .map_err(|e| StorageError::Backend(format!("cannot encode metadata: {e}")))?;
        // One batch: the old metadata chunks go and the new ones come together, so a crash
        // leaves either version whole (the record may shrink or grow by chunks).
        let mut batch = sled::Batch::default();
        for k in self.tree.scan_prefix(prefix(META, id)).keys() {
            batch.remove(k.map_err(sled_err)?);
        }
        for (i, piece) in meta.chunks(CHUNK_SIZE).enumerate() {
            batch.insert(&key(META, id, i as u32), piece);
        }
        self.tree.apply_batch(batch).map_err(sled_err)?;
        Ok(true)
    }

    fn remove(&self, id: QueueId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for kind in [META, BODY] {
            for k in self.tree.scan_prefix(prefix(kind, id)).keys() {
                batch.remove(k.map_err(sled_err)?);
            }
        }
        self.tree.apply_batch(batch).map_err(sled_err)?;
        debug!(queue_id = %id, "removed from spool");
        Ok(())
    }

    fn scan(&self) -> ScanIter<'_> {
        Box::new(MetaScan {
            inner: self.tree.scan_prefix([META]),
            pending: None,
        })
    }

    fn len(&self) -> usize {
        self.tree
            .scan_prefix([META])
            .keys()
            .filter_map(Result::ok)
            .filter(|k| matches!(parse_key(k), Some((META, _, 0))))
            .count()
    }
}

/// Reassembles metadata chunks into [`SpooledMeta`]s while walking the `m` prefix once.
struct MetaScan {
    inner: sled::Iter,
    pending: Option<Pending>,
}

struct Pending {
    id: QueueId,
    buf: Vec<u8>,
    next_chunk: u32,
    /// Why the record is unusable, found while collecting its chunks.
    broken: Option<String>,
}

impl Pending {
    fn start(id: QueueId, chunk: u32, v: &[u8]) -> Self {
        let mut p = Pending {
            id,
            buf: Vec::new(),
            next_chunk: 0,
            broken: None,
        };
        p.push(chunk, v);
        p
    }

    fn push(&mut self, chunk: u32, v: &[u8]) {
        if chunk != self.next_chunk && self.broken.is_none() {
            self.broken = Some(format!("metadata chunk {} missing", self.next_chunk));
        }
        self.buf.extend_from_slice(v);
        self.next_chunk = chunk.saturating_add(1);
    }

    fn finish(self) -> Result<SpooledMeta, StorageError> {
        if let Some(reason) = self.broken {
            return Err(StorageError::corrupt(Some(self.id), reason));
        }
        MetaRecord::decode(self.id, &self.buf).map(MetaRecord::into_meta)
    }
}

impl Iterator for MetaScan {
    type Item = Result<SpooledMeta, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some(item) = self.inner.next() else {
                return self.pending.take().map(Pending::finish);
            };
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(sled_err(e))),
            };
            let Some((_, id, chunk)) = parse_key(&k) else {
                return Some(Err(StorageError::corrupt(
                    None,
                    format!("malformed metadata key {:02x?}", &k[..]),
                )));
            };
            match &mut self.pending {
                Some(p) if p.id == id => p.push(chunk, &v),
                _ => {
                    let done = self.pending.replace(Pending::start(id, chunk, &v));
                    if let Some(done) = done {
                        return Some(done.finish());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SledOptions {
        SledOptions {
            cache_bytes: 8 << 20,
            min_free_bytes: 0,
            ..SledOptions::default()
        }
    }

    #[test]
    fn key_order_is_kind_then_time_then_chunk() {
        let a = QueueId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = QueueId::new();
        assert!(key(META, a, 0) < key(META, a, 1));
        assert!(key(META, a, u32::MAX) < key(META, b, 0));
        // All of one kind is contiguous, whatever the ids.
        assert!(key(BODY, b, u32::MAX) < key(META, a, 0));
        assert_eq!(parse_key(&key(BODY, b, 7)), Some((BODY, b, 7)));
    }

    #[test]
    fn chunk_sizing_stays_below_blob_threshold() {
        // sled's blob threshold for a whole page (see the module docs): a leaf of 20 full chunks
        // plus generous per-entry overhead must fit.
        let threshold = SEGMENT_SIZE / 4 - 20 - 32;
        assert!(20 * (CHUNK_SIZE + 64) < threshold);
    }

    #[test]
    fn failed_fsync_poisons_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        s.sync().unwrap();
        s.poison(&StorageError::Io(std::io::Error::from_raw_os_error(
            libc::EIO,
        )));
        let m = InboundMessage {
            id: QueueId::new(),
            envelope: Envelope::new("", vec![]),
            client: ClientInfo::new(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:25".parse().unwrap(),
                "",
            ),
            arrived_ms: 0,
            body: Default::default(),
        };
        assert!(matches!(s.insert(&m), Err(StorageError::Poisoned(_))));
        assert!(matches!(s.sync(), Err(StorageError::Poisoned(_))));
        assert!(matches!(
            s.insert_many(std::slice::from_ref(&m)).pop(),
            Some(Err(StorageError::Poisoned(_)))
        ));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn corrupt_meta_is_reported_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), opts()).unwrap();
        let bad = QueueId::new();
        let gap = QueueId::new();
        let tail = QueueId::new();
        s.put_raw(&key(META, bad, 0), b"{not json");
        // A second chunk without a first one.
        s.put_raw(&key(META, gap, 1), b"}");
        // A key that is not ours at all.
        s.put_raw(&[META, 1, 2, 3], b"x");
        s.put_raw(
            &key(META, tail, 0),
            br#"{"v":99,"id":"01ARZ3NDEKTSV4RRFFQ69G5FAV"}"#,
        );

        let results: Vec<_> = s.scan().collect();
        assert_eq!(results.len(), 4, "{results:?}");
        assert!(results
            .iter()
            .all(|r| matches!(r, Err(StorageError::Corrupt { .. }))));
        let ids: Vec<_> = results
            .iter()
            .filter_map(|r| match r {
                Err(StorageError::Corrupt { id, .. }) => *id,
                _ => None,
            })
            .collect();
        assert!(ids.contains(&bad) && ids.contains(&gap) && ids.contains(&tail));
        assert!(matches!(s.get(bad), Err(StorageError::Corrupt { .. })));
        assert!(matches!(s.get(gap), Err(StorageError::Corrupt { .. })));
    }
}
