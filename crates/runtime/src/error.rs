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

/// An error and its causes on one line ("a: b: c"), each cause once: for
/// errors kept as text, whose causes would otherwise be lost.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_keeps_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::EPERM);
        let err = RuntimeError::Io {
            context: "mount /proc".into(),
            source: io,
        };
        // The message already includes its source: not repeated.
        assert_eq!(
            error_chain(&err),
            "mount /proc: Operation not permitted (os error 1)"
        );
        let wrapped = RuntimeError::Container {
            context: "create container c".into(),
            source: Box::new(libcontainer::error::LibcontainerError::OtherIO(
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )),
        };
        let text = error_chain(&wrapped);
        assert!(text.starts_with("create container c: "), "{text}");
        assert!(
            text.ends_with("No such file or directory (os error 2)"),
            "{text}"
        );
    }
}
