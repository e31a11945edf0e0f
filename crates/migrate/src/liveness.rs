//! Deadlines and heartbeats: a peer that goes silent is found out within
//! the peer time-out, whatever step the migration is in.
//!
//! Every send has the time-out as its deadline (the wire's send time-out),
//! and so has every wait for an answer. A side that is busy without
//! anything to say (CRIU dumping, the memory being put in place) sends
//! [`Message::Heartbeat`] a few times per time-out; receivers take it in
//! any step and otherwise ignore it.

use std::future::Future;
use std::time::Duration;

use migrun_wire::{Message, Sender, WireError};

/// The default `--peer-timeout`.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a busy side says it is there: a third of the time-out.
pub fn heartbeat_interval(peer_timeout: Duration) -> Duration {
    (peer_timeout / 3).max(Duration::from_millis(50))
}

/// Runs `work` to its end, sending a heartbeat on `tx` every
/// [`heartbeat_interval`] meanwhile. A failed heartbeat is returned with
/// the work's result (the work still runs to its end: it may hold a child
/// that must not be left behind).
pub async fn with_heartbeats<T>(
    tx: &mut Sender,
    peer_timeout: Duration,
    work: impl Future<Output = T>,
) -> (T, Result<(), WireError>) {
    let every = heartbeat_interval(peer_timeout);
    tokio::pin!(work);
    let mut beat: Result<(), WireError> = Ok(());
    loop {
        tokio::select! {
            out = &mut work => return (out, beat),
            _ = tokio::time::sleep(every), if beat.is_ok() => {
                beat = tx.send(&Message::Heartbeat).await;
            }
        }
    }
}
