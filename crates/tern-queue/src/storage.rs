//! The storage abstraction the queue is written against.
//!
//! The trait is deliberately small: the queue needs "write a whole message", "make everything
//! written so far durable", "read / delete one message" and "list what is spooled". Keeping
//! durability (`sync`) separate from `insert` is what makes group commit possible: the committer
//! inserts a batch of messages and pays for one flush.

use std::io;

use serde::{Deserialize, Serialize};
use tern_message::{ClientInfo, Envelope, InboundMessage, QueueId, SpoolError};

/// A message's spooled metadata without its body: what start-up recovery and (later) the
/// delivery scheduler need, and cheap to read because the body is stored separately.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpooledMeta {
    pub id: QueueId,
    pub envelope: Envelope,
    pub client: ClientInfo,
    /// Milliseconds since the Unix epoch.
    pub arrived_ms: u64,
    /// Length of the body in bytes.
    pub body_len: u64,
}

/// Iterator returned by [`Storage::scan`]: one item per spooled message, in id (arrival) order.
/// A damaged record yields `Err(StorageError::Corrupt { .. })` and the scan goes on with the
/// next message, so one bad record never keeps the rest of the spool from being recovered.
pub type ScanIter<'a> = Box<dyn Iterator<Item = Result<SpooledMeta, StorageError>> + Send + 'a>;

/// A durable message store.
pub trait Storage: Send + Sync + 'static {
    /// Writes the message atomically (metadata + body as one unit): after a crash it is either
    /// whole or absent. Not yet durable: see [`Storage::sync`]. Inserting an id that is already
    /// spooled replaces that message.
    fn insert(&self, msg: &InboundMessage) -> Result<(), StorageError>;

    /// Inserts several messages, each one atomically as [`Storage::insert`] does, and returns one
    /// result per message, in order. A backend may write them all as one unit (the segment
    /// store: one `pwrite` of all their records); then a failure of that write fails every
    /// message in it, while a message refused on its own (e.g. by the free-space guard) fails
    /// alone.
    fn insert_many(&self, msgs: &[InboundMessage]) -> Vec<Result<(), StorageError>> {
        msgs.iter().map(|m| self.insert(m)).collect()
    }

    /// Makes everything inserted (or removed) before this call durable: it survives a process
    /// crash, an OS crash and power loss. After a failure nothing since the last successful sync
    /// may be assumed durable, and an implementation may refuse all further writes
    /// ([`StorageError::Poisoned`]).
    fn sync(&self) -> Result<(), StorageError>;

    /// The whole message, or `None` if it is not spooled. A message whose body does not match
    /// its metadata is reported as [`StorageError::Corrupt`].
    fn get(&self, id: QueueId) -> Result<Option<InboundMessage>, StorageError>;

    /// Replaces a spooled message's envelope (recipient states after a delivery attempt),
    /// leaving its body alone; `Ok(false)` if the message is not spooled. Atomic like `insert`,
    /// and not durable until the next `sync`: an update lost in a crash only repeats an attempt
    /// (at-least-once delivery), it never loses a recipient.
    fn update_envelope(&self, id: QueueId, envelope: &Envelope) -> Result<bool, StorageError>;

    /// Removes the message (metadata and body) if present. Not durable until the next `sync`:
    /// a removal lost in a crash makes the message reappear, i.e. at worst a duplicate delivery,
    /// never a loss.
    fn remove(&self, id: QueueId) -> Result<(), StorageError>;

    /// Every spooled message's metadata (without the body), in id order.
    fn scan(&self) -> ScanIter<'_>;

    /// Number of spooled messages. May walk the whole spool (O(n)): for tools and tests; the
    /// queue actor keeps its own count.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Not enough free space: either the free-space guard refused the write before the disk was
    /// exhausted, or the OS reported ENOSPC / EDQUOT.
    #[error("insufficient storage: {0}")]
    DiskFull(String),
    #[error("spool I/O error: {0}")]
    Io(io::Error),
    /// Another process holds the spool (sled locks its index): two servers on one `data_dir`.
    #[error(
        "the spool in {0} is in use by another process (another tern with the same data_dir?)"
    )]
    Locked(std::path::PathBuf),
    /// A record that cannot be decoded, or a body that does not match its metadata.
    #[error("corrupt spool record{}: {reason}", id.map(|id| format!(" {id}")).unwrap_or_default())]
    Corrupt { id: Option<QueueId>, reason: String },
    /// An earlier `fsync` failed, so the spool refuses writes until the process restarts and
    /// recovers from what is really on disk (see `SledStorage::poison`).
    #[error("spool refuses writes after a failed fsync ({0}); restart to recover")]
    Poisoned(String),
    /// Any other failure of the storage engine (a bug or an unsupported configuration).
    #[error("storage engine error: {0}")]
    Backend(String),
}

// Manual rather than `#[from]`, which would also make the I/O error the `source()`: the
// message already includes it, and a reporter printing the chain would say it twice.
impl From<io::Error> for StorageError {
    fn from(e: io::Error) -> Self {
        StorageError::Io(e)
    }
}

impl StorageError {
    pub(crate) fn corrupt(id: Option<QueueId>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            id,
            reason: reason.into(),
        }
    }

    /// A copy of this error for each of several messages it applies to (`io::Error` is not
    /// `Clone`, so an I/O error is copied as its kind, OS code and text).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            StorageError::DiskFull(s) => StorageError::DiskFull(s.clone()),
            StorageError::Io(e) => StorageError::Io(match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            }),
            StorageError::Corrupt { id, reason } => StorageError::Corrupt {
                id: *id,
                reason: reason.clone(),
            },
            StorageError::Poisoned(s) => StorageError::Poisoned(s.clone()),
            StorageError::Locked(p) => StorageError::Locked(p.clone()),
            StorageError::Backend(s) => StorageError::Backend(s.clone()),
        }
    }

    /// Whether this error means "out of space", however it was reported.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::DiskFull(_) => true,
            StorageError::Io(e) => io_is_disk_full(e),
            _ => false,
        }
    }
}

/// ENOSPC and EDQUOT both mean the client should retry later elsewhere or after cleanup, which is
/// what 452 says; std maps them to `StorageFull` and `QuotaExceeded`.
pub(crate) fn io_is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl From<StorageError> for SpoolError {
    fn from(e: StorageError) -> Self {
        if e.is_disk_full() {
            SpoolError::DiskFull(e.to_string())
        } else {
            SpoolError::Storage(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_maps_to_spool_disk_full() {
        let cases = [
            StorageError::DiskFull("guard".into()),
            StorageError::Io(io::Error::from_raw_os_error(libc::ENOSPC)),
            StorageError::Io(io::Error::from_raw_os_error(libc::EDQUOT)),
            StorageError::Io(io::Error::from(io::ErrorKind::StorageFull)),
        ];
        for e in cases {
            assert!(
                matches!(SpoolError::from(e), SpoolError::DiskFull(_)),
                "should be DiskFull"
            );
        }
        let other = StorageError::Io(io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(SpoolError::from(other), SpoolError::Storage(_)));
        let corrupt = StorageError::corrupt(None, "x");
        assert!(matches!(SpoolError::from(corrupt), SpoolError::Storage(_)));
    }
}
