//! Tern's queue: the durable spool behind `250 Ok: queued as <id>`.
//!
//! * [`Storage`] is the small storage interface; [`SledStorage`] implements it with message
//!   bodies in append-only segment files and the index in sled 0.34.7, with the durability
//!   argument in the [`sled_storage`] module documentation.
//! * Sessions hand messages to the spool through a [`QueueClient`]: straight to a committer
//!   thread that groups concurrent messages so they share one flush, answering only once the
//!   message is durable. The [`QueueActor`] indexes what was committed, schedules and drives
//!   delivery, and also takes [`Enqueue`] from callers that have only its address.
//! * [`schedule`] is the delivery scheduler's pure core (retry policy, recipient state
//!   transitions, the due-time index), for the delivery milestone to drive from the actor.
//!
//! Invariant: nothing acknowledged is ever lost. A message is acknowledged only after
//! [`Storage::sync`] returned `Ok` for a batch that contains its successful
//! [`Storage::insert`].

mod actor;
pub mod admin;
mod client;
mod committer;
mod delivery;
pub mod events;
mod free_space;
mod legacy;
mod prealloc;
pub mod schedule;
mod segment;
pub mod sled_storage;
mod storage;

pub use actor::{
    spawn_queue, spawn_queue_with_client, spawn_queue_with_client_on, DeliveryCounters, Enqueue,
    GetStats, QueueActor, QueueConfig, QueueStats, WriteOutNow,
};
pub use client::QueueClient;
pub use committer::CommitConfig;
pub use delivery::{AttachDelivery, AttachSuppression};
pub use sled_storage::{SledOptions, SledStorage};
pub use storage::{ScanIter, SpooledMeta, Storage, StorageError};
