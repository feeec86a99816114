//! A free-space guard in the spirit of Postfix's `queue_minfree`: refuse new messages while the
//! spool's filesystem still has some room, so the session answers `452 4.3.1` and the disk never
//! actually fills up (a full disk would also break sled's own log writes at a checkpoint, after
//! which sled refuses every operation until restarted).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sled_storage::lock;
use crate::storage::StorageError;

/// How long a `statvfs` reading is trusted. One call costs a few microseconds, but the committer
/// may insert tens of thousands of messages a second, so it is not made per message.
const REFRESH: Duration = Duration::from_millis(100);

pub(crate) struct FreeSpaceGuard {
    path: CString,
    min_free_bytes: u64,
    state: Mutex<State>,
}

struct State {
    checked_at: Option<Instant>,
    /// Bytes available to unprivileged users at the last reading.
    available: u64,
    /// Bytes admitted since that reading: subtracted from `available` so that a burst between two
    /// readings cannot overshoot the reserve by much more than one reading's worth.
    admitted_since: u64,
}

impl FreeSpaceGuard {
    pub(crate) fn new(dir: &Path, min_free_bytes: u64) -> Result<Self, StorageError> {
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
            StorageError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "spool path contains a NUL byte",
            ))
        })?;
        let guard = Self {
            path,
            min_free_bytes,
            state: Mutex::new(State {
                checked_at: None,
                available: 0,
                admitted_since: 0,
            }),
        };
        // Fail at open, not at the first message, if the path cannot be statvfs'ed.
        guard.available_bytes()?;
        Ok(guard)
    }

    /// Admits a write of `bytes`, or refuses it with [`StorageError::DiskFull`] if it would leave
    /// less than `min_free_bytes` free.
    pub(crate) fn admit(&self, bytes: u64) -> Result<(), StorageError> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let mut state = lock(&self.state);
        let stale = state.checked_at.is_none_or(|t| t.elapsed() >= REFRESH);
        if stale {
            state.available = self.available_bytes()?;
            state.checked_at = Some(Instant::now());
            state.admitted_since = 0;
        }
        let available = state.available.saturating_sub(state.admitted_since);
        let needed = self.min_free_bytes.saturating_add(bytes);
        if available < needed {
            return Err(StorageError::DiskFull(format!(
                "{available} bytes free on the spool filesystem, {needed} needed \
                 ({bytes} for the message + {} reserve)",
                self.min_free_bytes
            )));
        }
        state.admitted_since = state.admitted_since.saturating_add(bytes);
        Ok(())
    }

    fn available_bytes(&self) -> Result<u64, StorageError> {
        // SAFETY: statvfs only writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(self.path.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(StorageError::Io(io::Error::last_os_error()));
        }
        // f_bavail, not f_bfree: the blocks reserved for root are not ours to use.
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_what_would_cut_into_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let probe = FreeSpaceGuard::new(dir.path(), 1).unwrap();
        let avail = probe.available_bytes().unwrap();
        assert!(avail > 200 << 20, "test needs 200 MB free, has {avail}");
        // Leave ~100 MB above the reserve: small writes fit, a 10 GB one does not.
        let guard = FreeSpaceGuard::new(dir.path(), avail - (100 << 20)).unwrap();
        guard.admit(1_000).unwrap();
        let err = guard.admit(10 << 30).unwrap_err();
        assert!(matches!(err, StorageError::DiskFull(_)), "{err:?}");
        guard.admit(1_000).unwrap();
        // Admitted bytes count against the cached reading until the next statvfs.
        guard.admit(60 << 20).unwrap();
        assert!(guard.admit(60 << 20).is_err());
        // A zero reserve disables the check entirely.
        FreeSpaceGuard::new(dir.path(), 0)
            .unwrap()
            .admit(u64::MAX)
            .unwrap();
    }
}
