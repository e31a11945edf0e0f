//! SIGINT, SIGTERM and SIGHUP during a migration: before the commit they
//! roll it back, after it they are noted and the hand-over finishes.

use tokio::signal::unix::{signal, SignalKind};

use crate::{MigrateError, Result};

/// The signals that end a migration early, listened to from creation on
/// (their default action, ending the process, is replaced for good).
pub struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Starts listening.
    pub fn listen() -> Result<Self> {
        let on = |k: SignalKind| {
            signal(k).map_err(|e| MigrateError::Source(format!("listen for signals: {e}")))
        };
        Ok(Self {
            int: on(SignalKind::interrupt())?,
            term: on(SignalKind::terminate())?,
            hup: on(SignalKind::hangup())?,
        })
    }

    /// Resolves with the signal's name when one arrives.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
