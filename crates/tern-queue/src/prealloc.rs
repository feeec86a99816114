//! Zero-filled segment files, made ahead of need by a thread of their own.
//!
//! Why: on ext4 (and XFS), `fdatasync` after an append must also write the file's new size and
//! block allocation (through the journal where there is one; the development VM's ext4 has
//! none, and writes the inode and allocation blocks themselves). After an overwrite of blocks
//! that are already written, it flushes the data alone. Measured on the 2-core development VM
//! (ext4, virtio disk; `bench/fsync_probe.py`), a 7 KB write + `fdatasync`: append
//! ≈ 165–209 µs wall and 67–72 µs CPU in the caller; the same write into a zero-filled file
//! ≈ 108–115 µs and 52–54 µs. `fallocate` alone helps less (154–174 µs): its unwritten extents
//! still need converting, a metadata write, on the first write. Filling a 32 MiB file takes
//! ≈ 26 ms (6 ms of writes, 20 ms `fdatasync`), so it is done on this thread, never on the
//! committer's.
//!
//! The spare is prepared under a name no reader takes for a segment (`spare.tmp`), renamed
//! `spare.ready` once its zeros are synced, and renamed to its sequence number when the
//! committer starts a new segment: a crash mid-fill leaves only a temporary file, deleted at
//! the next open, and a finished spare is used by the next start as it is. Zeros read back as
//! "no record here", which ends a segment's replay exactly as the end of an appended file does.
//!
//! An idle spool does not prepare one: the first spare is asked for once the active segment
//! holds [`PREPARE_AFTER`] bytes, so a test or a quiet server never writes 32 MiB of zeros; from
//! then on each spare taken asks for the next. A spare must fit above the spool's free-space
//! reserve (`min_free_bytes`), like a message: a nearly full disk gets plain files, never a
//! fill that runs into ENOSPC. A ready spare stays on disk (32 MiB) until it is taken, across
//! restarts too.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::free_space::FreeSpaceGuard;
use crate::sled_storage::lock;

/// The spare's name while it is being filled.
pub(crate) const SPARE_NAME: &str = "spare.tmp";
/// Its name once it is complete and durable, until it is taken: a spare finished by an earlier
/// run is used as it is, not written again.
pub(crate) const READY_NAME: &str = "spare.ready";
/// The active segment holds this much before the first spare is asked for.
pub(crate) const PREPARE_AFTER: u64 = 1 << 20;
/// Zeros are written this much at a time, so a stop is noticed within one chunk.
const CHUNK: usize = 1 << 20;
/// After a failed fill (too little free space, say), requests are ignored this long: the
/// committer goes on appending to plain files meanwhile, which only costs speed.
const RETRY_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    ready: Option<File>,
    wanted: bool,
    stop: bool,
    failed_at: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    path: PathBuf,
    ready_path: PathBuf,
    size: u64,
    free_space: Arc<FreeSpaceGuard>,
}

/// Keeps (at most) one zero-filled file of `size` bytes ready in a directory.
pub(crate) struct Preallocator {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Preallocator {
    /// Starts the filling thread for `dir`, deleting a spare an earlier run left half filled;
    /// one it finished is ready at once.
    pub(crate) fn start(
        dir: &Path,
        size: u64,
        free_space: Arc<FreeSpaceGuard>,
    ) -> std::io::Result<Self> {
        let path = dir.join(SPARE_NAME);
        match std::fs::remove_file(&path) {
            Ok(()) => debug!("removed a half-filled spare segment left by an earlier run"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let ready_path = dir.join(READY_NAME);
        let ready = match std::fs::metadata(&ready_path) {
            // Renamed only after its zeros were synced, so whole and durable; a different
            // size means another SEGMENT_FILE_BYTES made it.
            Ok(m) if m.len() == size => Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&ready_path)?,
            ),
            Ok(_) => {
                std::fs::remove_file(&ready_path)?;
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ready,
                ..State::default()
            }),
            wake: Condvar::new(),
            path,
            ready_path,
            size,
            free_space,
        });
        let thread = std::thread::Builder::new()
            .name("tern-spool-prep".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Takes the ready spare, renamed to `to`, and asks for the next one; `None` when none is
    /// ready (then one is asked for, unless a fill failed a short while ago) or the rename
    /// failed (logged). The caller makes the new name durable (`fsync` of the directory), as
    /// for a created file.
    pub(crate) fn take_or_want(&self, to: &Path) -> Option<File> {
        let mut st = lock(&self.shared.state);
        let taken =
            st.ready
                .take()
                .and_then(|file| match std::fs::rename(&self.shared.ready_path, to) {
                    Ok(()) => Some(file),
                    Err(e) => {
                        warn!(error = %e, to = %to.display(), "cannot rename the spare segment");
                        None
                    }
                });
        self.want_locked(&mut st);
        taken
    }

    /// Asks for a spare unless one is ready, being filled, or a fill failed a short while ago.
    pub(crate) fn want(&self) {
        let mut st = lock(&self.shared.state);
        if st.ready.is_none() {
            self.want_locked(&mut st);
        }
    }

    fn want_locked(&self, st: &mut State) {
        let backing_off = st.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER);
        if !st.wanted && !backing_off {
            st.wanted = true;
            self.shared.wake.notify_one();
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        lock(&self.shared.state).ready.is_some()
    }
}

impl Drop for Preallocator {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared) {
    loop {
        {
            let mut st = lock(&shared.state);
            while !st.wanted && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
        }
        let started = Instant::now();
        let filled = fill(shared);
        let mut st = lock(&shared.state);
        st.wanted = false;
        match filled {
            Ok(Some(file)) => {
                st.ready = Some(file);
                st.failed_at = None;
                debug!(
                    ms = started.elapsed().as_millis() as u64,
                    "spare segment ready"
                );
            }
            Ok(None) => return, // stopping
            Err(e) => {
                warn!(error = %e, path = %shared.path.display(), "cannot prepare a spare segment; new segments are plain files for now");
                let _ = std::fs::remove_file(&shared.path);
                st.failed_at = Some(Instant::now());
            }
        }
    }
}

/// Writes the zero-filled file and makes it durable. `Ok(None)` if asked to stop meanwhile.
fn fill(shared: &Shared) -> std::io::Result<Option<File>> {
    shared
        .free_space
        .admit(shared.size)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&shared.path)?;
    let zeros = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < shared.size {
        if lock(&shared.state).stop {
            drop(file);
            let _ = std::fs::remove_file(&shared.path);
            return Ok(None);
        }
        let n = (shared.size - at).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    // The blocks must be allocated and written on disk, not merely in the page cache, or the
    // first commit into them would pay for the allocation after all.
    file.sync_all()?;
    // Only now may the next start take it as it is. (Whether the rename itself survives a
    // crash does not matter: without it, the next start fills a new one.)
    std::fs::rename(&shared.path, &shared.ready_path)?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_reserve(dir: &Path) -> Arc<FreeSpaceGuard> {
        Arc::new(FreeSpaceGuard::new(dir, 0).unwrap())
    }

    fn wait_ready(p: &Preallocator) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.is_ready() {
            assert!(Instant::now() < deadline, "no spare after 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_spare_is_made_only_when_wanted_and_is_all_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p =
            Preallocator::start(dir.path(), 3 * CHUNK as u64 + 17, no_reserve(dir.path())).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!p.is_ready());
        assert!(
            !dir.path().join(SPARE_NAME).exists(),
            "made without a request"
        );

        // Nothing ready: no file, but a request.
        let to = dir.path().join("0000000000000007.seg");
        assert!(p.take_or_want(&to).is_none());
        wait_ready(&p);
        let file = p.take_or_want(&to).expect("a spare was ready");
        let bytes = std::fs::read(&to).unwrap();
        assert_eq!(bytes.len() as u64, 3 * CHUNK as u64 + 17);
        assert!(bytes.iter().all(|&b| b == 0));
        // The handle taken is the renamed file.
        file.write_all_at(b"x", 0).unwrap();
        assert_eq!(std::fs::read(&to).unwrap()[0], b'x');

        // Taking one asked for the next.
        wait_ready(&p);
        assert!(p
            .take_or_want(&dir.path().join("0000000000000008.seg"))
            .is_some());
    }

    #[test]
    fn a_spare_left_by_an_earlier_run_is_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SPARE_NAME), b"half a fill").unwrap();
        let p = Preallocator::start(dir.path(), CHUNK as u64, no_reserve(dir.path())).unwrap();
        assert!(!dir.path().join(SPARE_NAME).exists());
        assert!(!p.is_ready());
    }

    #[test]
    fn a_finished_spare_is_used_by_the_next_start_without_a_new_fill() {
        let dir = tempfile::tempdir().unwrap();
        let size = CHUNK as u64 + 5;
        let p = Preallocator::start(dir.path(), size, no_reserve(dir.path())).unwrap();
        assert!(p.take_or_want(&dir.path().join("a.seg")).is_none());
        wait_ready(&p);
        drop(p);
        let ready = dir.path().join(READY_NAME);
        assert_eq!(std::fs::metadata(&ready).unwrap().len(), size);

        let p = Preallocator::start(dir.path(), size, no_reserve(dir.path())).unwrap();
        assert!(p.is_ready(), "the finished spare is ready at once");
        assert!(!lock(&p.shared.state).wanted, "and no fill was asked for");
        let to = dir.path().join("0000000000000003.seg");
        p.take_or_want(&to).expect("taken");
        assert!(!ready.exists());
        let bytes = std::fs::read(&to).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert!(bytes.iter().all(|&b| b == 0));
        drop(p);

        // One of another size (SEGMENT_FILE_BYTES changed) is not used.
        std::fs::write(&ready, b"short").unwrap();
        let p = Preallocator::start(dir.path(), size, no_reserve(dir.path())).unwrap();
        assert!(!p.is_ready());
        assert!(!ready.exists());
    }

    #[test]
    fn no_spare_when_it_would_cut_into_the_free_space_reserve() {
        let dir = tempfile::tempdir().unwrap();
        // A reserve larger than any disk: the fill is refused before a byte is written.
        let guard = Arc::new(FreeSpaceGuard::new(dir.path(), u64::MAX / 2).unwrap());
        let p = Preallocator::start(dir.path(), CHUNK as u64, guard).unwrap();
        let to = dir.path().join("0000000000000002.seg");
        assert!(p.take_or_want(&to).is_none());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!p.is_ready());
        assert!(!dir.path().join(SPARE_NAME).exists());
        // Backing off: a new request is not even taken.
        assert!(p.take_or_want(&to).is_none());
        assert!(!lock(&p.shared.state).wanted);
    }

    #[test]
    fn stopping_mid_fill_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let spare = dir.path().join(SPARE_NAME);
        // 256 MiB: a fill that ignored the stop would finish and leave the file behind.
        let p = Preallocator::start(dir.path(), 256 << 20, no_reserve(dir.path())).unwrap();
        assert!(p.take_or_want(&dir.path().join("x.seg")).is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !spare.exists() {
            assert!(Instant::now() < deadline, "the fill never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(p);
        assert!(!spare.exists());
    }
}
