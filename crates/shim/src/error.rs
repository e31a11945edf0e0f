//! Errors of the shim, and how containerd sees them (ttrpc status codes,
//! which containerd maps to its errdefs: NotFound, FailedPrecondition...).

use containerd_shim::protos::ttrpc;
use migrun_runtime::RuntimeError;

/// Everything a task request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// An error of migrun's runtime library (its message names the problem).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// No such container or process in this shim.
    #[error("{0}")]
    NotFound(String),
    /// Something that already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not allowed in the current state of the process.
    #[error("{0}")]
    Precondition(String),
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the shim was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// Result type of the shim.
pub type Result<T> = std::result::Result<T, ShimError>;

/// Adds context to I/O and system errors.
pub trait Context<T> {
    /// Wraps the error with a message built lazily.
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| ShimError::Io {
            context: f(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| ShimError::Io {
            context: f(),
            source: std::io::Error::from(e),
        })
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(err: ShimError) -> Self {
        let code = match &err {
            ShimError::NotFound(_) | ShimError::Runtime(RuntimeError::NotFound(_)) => {
                ttrpc::Code::NOT_FOUND
            }
            ShimError::AlreadyExists(_) | ShimError::Runtime(RuntimeError::AlreadyExists(_)) => {
                ttrpc::Code::ALREADY_EXISTS
            }
            ShimError::Precondition(_) | ShimError::Runtime(RuntimeError::WrongStatus { .. }) => {
                ttrpc::Code::FAILED_PRECONDITION
            }
            ShimError::InvalidArgument(_)
            | ShimError::Runtime(
                RuntimeError::InvalidId(_)
                | RuntimeError::Bundle { .. }
                | RuntimeError::Config { .. }
                | RuntimeError::InvalidSignal(_)
                | RuntimeError::InvalidInput(_),
            ) => ttrpc::Code::INVALID_ARGUMENT,
            _ => ttrpc::Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, full_message(&err)))
    }
}

/// The error with its causes, on one line, without repeating a cause that
/// a message already includes.
pub fn full_message(err: &dyn std::error::Error) -> String {
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
