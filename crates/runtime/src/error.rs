//! Errors of the runtime library.

use std::path::PathBuf;

/// Everything that can go wrong while managing containers on this host.
///
/// Messages are lower-case, one line, and name the thing that is wrong, so the
/// CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No container with this id under the state root.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// A container with this id already exists under the state root.
    #[error("container {0} already exists")]
    AlreadyExists(String),
    /// The id contains characters runc does not accept.
    #[error("invalid container id {0:?}: only letters, digits, '_', '+', '-' and '.' are allowed")]
    InvalidId(String),
    /// The bundle directory is missing or unreadable.
    #[error("bundle {path}: {reason}")]
    Bundle {
        /// The bundle path as given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// config.json exists but cannot be parsed or is invalid.
    #[error("invalid config.json in {path}: {reason}")]
    Config {
        /// Path of the config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The operation is not allowed in the container's current status.
    #[error("container {id} is {status}: cannot {action}")]
    WrongStatus {
        /// The container id.
        id: String,
        /// Its current status.
        status: String,
        /// What was asked.
        action: &'static str,
    },
    /// A signal name or number that does not exist.
    #[error("unknown signal {0:?}")]
    InvalidSignal(String),
    /// Bad user input other than the above.
    #[error("{0}")]
    InvalidInput(String),
    /// A feature that this host cannot provide.
    #[error("{0}")]
    Unsupported(String),
    /// An error reported by libcontainer.
    #[error("{context}: {source}")]
    Container {
        /// What migrun was doing.
        context: String,
        /// The underlying error (boxed: it is large).
        #[source]
        source: Box<libcontainer::error::LibcontainerError>,
    },
    /// A cgroup operation failed.
    #[error("{context}: {reason}")]
    Cgroup {
        /// What migrun was doing.
        context: String,
        /// The underlying error, rendered.
        reason: String,
    },
    /// An I/O error with the path it concerned.
    #[error("{context}: {source}")]
    Io {
        /// What migrun was doing, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        /// What migrun was doing.
        context: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, RuntimeError>;

/// Adds context to I/O and system errors.
pub(crate) trait Context<T> {
    /// Wraps the error with a message built lazily.
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| RuntimeError::Io {
            context: f(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| RuntimeError::Sys {
            context: f(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, libcontainer::error::LibcontainerError> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| RuntimeError::Container {
            context: f(),
            source: Box::new(source),
        })
    }
}
