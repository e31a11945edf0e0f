//! CRIU over its RPC: finding a usable CRIU, dumping and restoring process
//! trees, and the small image-directory files migrun itself reads and writes.
//!
//! The container-level logic (which mounts are external, where the cgroup
//! is, migrun's state) lives in the runtime crate; this crate only speaks
//! CRIU.

pub mod binary;
pub mod images;
pub mod request;

pub use binary::{resolve, CriuBinary};
pub use request::{
    dump, restore, restore_with_hook, CgroupsMode, DumpRequest, RestoreRequest, SetupNamespacesHook,
};

use std::path::PathBuf;

/// Errors of CRIU operations, each one line naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// No CRIU binary could be found.
    #[error(
        "criu not found (looked for {0}): install CRIU 4 or newer, e.g. with hack/install-deps.sh"
    )]
    NotFound(String),
    /// The CRIU found is older than migrun needs.
    #[error("criu at {path} is version {version}, migrun needs CRIU 4.0 or newer (hack/install-deps.sh builds 4.1.1)")]
    TooOld {
        /// The binary.
        path: PathBuf,
        /// Its version.
        version: String,
    },
    /// A feature this kernel or CRIU lacks.
    #[error("{0}")]
    Unsupported(String),
    /// The image directory has no (or broken) checkpoint images.
    #[error("{0}")]
    BadImages(String),
    /// CRIU itself failed; carries the first error line of its log.
    #[error("criu {action} failed: {detail} (log: {log})")]
    Failed {
        /// dump or restore.
        action: &'static str,
        /// The first error line of CRIU's log, or the RPC error.
        detail: String,
        /// Where the full log is.
        log: PathBuf,
    },
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CriuError>;

/// Wraps an I/O error with context.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CriuError {
    let context = context.into();
    move |source| CriuError::Io { context, source }
}
