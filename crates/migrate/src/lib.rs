//! The live-migration engine.
//!
//! Live migration copies a running container's memory to the destination
//! while the container keeps running, then repeats the copy for the pages
//! written in the meantime until the remainder is small enough to stop the
//! container, send the rest and restore it on the other side.
//!
//! Layers:
//! - [`dirty`]: which pages of a process were written since the previous
//!   round (soft-dirty, userfaultfd write protection with `PAGEMAP_SCAN`,
//!   or page hashing), behind [`dirty::DirtyTracker`];
//! - [`memory`]: reading a live process's pages on the source;
//! - [`tree`]: confined access to a container's file tree (nothing read
//!   or written through a link, nothing outside the tree);
//! - [`rootfs`]: syncing the container's root filesystem in rounds;
//! - [`store`], [`lazy`] and [`images`]: the target's page store, serving
//!   it to CRIU's lazy-pages daemon after a restore without memory (or
//!   completing CRIU's images from it, the fallback);
//! - [`source`] and [`target`]: the two ends of one migration over
//!   `migrun-wire`, with rollback on any failure before the commit;
//! - [`journal`] and [`recover`]: the hand-over as a two-phase commit,
//!   journaled on both sides, and the settling of one cut in between;
//! - [`stats`]: the figures of a migration;
//! - [`events`]: what a migration says to its operator, as typed events
//!   handed to the caller (the engine prints nothing).

pub mod dirty;
pub mod docker;
pub mod events;
pub mod fault;
pub mod handover;
pub mod images;
pub mod inbound;
pub mod interrupt;
pub mod journal;
pub mod layers;
pub mod lazy;
pub mod liveness;
pub mod memory;
pub mod netmove;
pub mod recover;
pub mod rootfs;
pub mod source;
pub mod stats;
pub mod store;
pub mod target;
pub mod throttle;
pub mod tree;

/// Errors of a migration, one line each.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Something on the source side failed.
    #[error("{0}")]
    Source(String),
    /// Something on the target side failed.
    #[error("{0}")]
    Target(String),
    /// The peer reported a failure.
    #[error("target failed: {0}")]
    Peer(String),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// CRIU image handling failed.
    #[error("criu images: {0}")]
    Images(String),
    /// The connection failed.
    #[error("{0}")]
    Wire(#[from] migrun_wire::WireError),
    /// The runtime failed.
    #[error("{0}")]
    Runtime(#[from] migrun_runtime::RuntimeError),
    /// A confined file operation failed.
    #[error("{0}")]
    Tree(#[from] tree::TreeError),
    /// A Docker daemon refused or failed a request.
    #[error("docker: {0}")]
    Docker(String),
    /// A journal could not be read or written.
    #[error("journal: {0}")]
    Journal(String),
    /// The hand-over was cut and this side cannot tell alone who wins: its
    /// copy is kept as it is until `migrun migrate-recover` settles it.
    #[error("in doubt: {0}")]
    InDoubt(String),
    /// The source rolled the migration back and said so.
    #[error("the source rolled back: {0}")]
    Aborted(String),
    /// A signal ended the migration before its commit; it was rolled back.
    #[error("interrupted by {0}: rolled back, the container runs on the source")]
    Interrupted(&'static str),
}

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, MigrateError>;
