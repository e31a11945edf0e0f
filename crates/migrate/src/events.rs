//! What a migration has to say to its operator, as typed events.
//!
//! The engine prints nothing: it hands each [`Event`] to the [`Events`]
//! sink it was given (in [`OutOptions`](crate::source::OutOptions),
//! [`InOptions`](crate::target::InOptions) and
//! [`RecoverOptions`](crate::recover::RecoverOptions)), and the caller
//! decides what to show and how (the `migrun` command line renders them on
//! stderr). Logs for debugging stay with `tracing`.

use std::fmt;
use std::sync::Arc;

use crate::fault::Fault;
use crate::journal::Step;
use crate::stats::RoundFigures;

/// Which part of migrun a [`Event::Warning`] comes from (the command line
/// shows it as the line's prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The source end, `migrun migrate-out`.
    MigrateOut,
    /// The target end, `migrun migrate-in`.
    MigrateIn,
    /// The settling of a cut hand-over, `migrun migrate-recover`.
    MigrateRecover,
    /// Migrun in general (code shared by several commands).
    Migrun,
}

impl Origin {
    /// The command's name: `migrate-out`, `migrate-in`, `migrate-recover`
    /// or `migrun`.
    pub fn name(self) -> &'static str {
        match self {
            Origin::MigrateOut => "migrate-out",
            Origin::MigrateIn => "migrate-in",
            Origin::MigrateRecover => "migrate-recover",
            Origin::Migrun => "migrun",
        }
    }
}

/// Something a migration (or a recovery) did or noticed, for the operator.
#[derive(Debug, Clone)]
pub enum Event {
    // --- the source (`migrate-out`) ---
    /// Source: a round ended (round 0 sends everything; the frozen one,
    /// `figures.frozen`, the remainder inside the downtime).
    Round {
        /// What the round moved.
        figures: RoundFigures,
        /// The downtime the pages it saw dirtied would cost at the
        /// measured bandwidth, in milliseconds (0 for the first and the
        /// frozen round).
        estimate_ms: f64,
    },
    /// Source: pages of the current round sent so far (many per round;
    /// the next [`Event::Round`] ends it).
    RoundProgress {
        /// Pages sent so far this round.
        done: u64,
        /// Pages the round expects to send (at least 1).
        total: u64,
    },
    /// Source: the container dirties memory faster than the link carries
    /// it, and its CPU was capped one step more to converge.
    Throttled {
        /// The round after which it was throttled.
        round: u32,
        /// Its CPU cap now, as a share of one CPU.
        cpu_share: f64,
    },

    // --- the target (`migrate-in`) ---
    /// Target: listening for migrations.
    Listening {
        /// The address it listens on, as given.
        addr: String,
    },
    /// Target: a signal came while no migration was in progress; it exits.
    InterruptedIdle {
        /// The signal's name (`SIGINT`, ...).
        signal: &'static str,
    },
    /// Target: a signal came after the container was acknowledged to the
    /// source; the hand-over is finished all the same.
    InterruptedAcknowledged {
        /// The signal's name.
        signal: &'static str,
    },
    /// Target: a connection was refused (bad key, not migrun, ...).
    ConnectionRefused {
        /// Why.
        error: String,
    },
    /// Target: the root filesystem comes as an overlay of layers.
    Overlay {
        /// Lower layers of the overlay.
        layers: usize,
        /// Of them, the ones not in this host's layer store yet.
        to_receive: usize,
    },
    /// Target: a Docker container comes.
    DockerContainer {
        /// Its name.
        name: String,
        /// Whether the target's daemon has its image already.
        image_present: bool,
        /// Layers of the image that the source sends.
        layers_to_receive: usize,
        /// Layers of the image.
        layers: usize,
    },
    /// Target: the source started sending a container.
    Receiving {
        /// Its id.
        container: String,
        /// Its processes.
        processes: u32,
        /// Its resident memory in pages.
        resident_pages: u64,
        /// Bytes of its files to come.
        rootfs_bytes: u64,
    },
    /// Target: a Docker image that the daemon lacked is loaded into it.
    ImageLoaded {
        /// The image.
        image: String,
    },
    /// Target: everything is here; the restore begins (in the downtime).
    Restoring {
        /// The container's id.
        container: String,
    },
    /// Target: the container is restored (stopped until the source lets go).
    Restored {
        /// The container's id.
        container: String,
        /// From the start of the restore, in milliseconds.
        total_ms: f64,
        /// Mounting an overlay root filesystem.
        overlay_ms: f64,
        /// Setting the memory up (lazy pages, or complete images).
        memory_setup_ms: f64,
        /// CRIU's restore.
        criu_ms: f64,
        /// Moving the network (veths onto the bridge, announcements).
        network_ms: f64,
        /// Whether the memory still follows from the page store.
        lazy: bool,
    },
    /// Target: a Docker container is restored through its daemon.
    DockerRestored {
        /// The container's name.
        name: String,
        /// Its id in the daemon.
        container_id: String,
        /// From the start of the restore, in milliseconds.
        total_ms: f64,
        /// Whether the memory still follows from the page store.
        lazy: bool,
    },
    /// Target: all the memory of a container restored lazily is in place.
    MemoryInPlace {
        /// The container (its id, or a Docker container's name).
        container: String,
        /// Pages the lazy-pages daemon put in place.
        pages: u64,
        /// How long after the restore that took, in milliseconds.
        ms: f64,
    },
    /// Target: an outside end of a restored container's veth stays
    /// unattached, for want of a bridge.
    VethUnattached {
        /// The container's id.
        container: String,
        /// The interface's name inside the container.
        inside: String,
        /// The outside end's name.
        outside: String,
    },
    /// Target: one incoming migration ended well; the container runs here.
    MigrationDone {
        /// The container (or, for a recovery asked through `migrate-in`,
        /// what was settled).
        container: String,
    },
    /// Target: one incoming migration failed (and what it made is undone,
    /// unless it is in doubt).
    MigrationFailed {
        /// Why.
        error: String,
    },
    /// Target: an earlier `migrate-in`'s migration, cut off while
    /// receiving, is undone.
    StaleUndone {
        /// The container.
        container: String,
    },
    /// Target: an earlier `migrate-in`'s migration was cut off after it
    /// acknowledged: its copy is kept, stopped, for `migrate-recover`.
    StaleInDoubt {
        /// The container.
        container: String,
        /// The step its journal stopped at.
        step: Step,
    },
    /// Target: something in the Docker daemon that an earlier failed
    /// migration could not remove is removed now.
    LeftoverRemoved {
        /// What (`container ID` or `image ID`).
        what: String,
    },

    // --- recovery (`migrate-recover`, or its answer in `migrate-in`) ---
    /// Recovery: waiting for the peer's `migrate-recover --peer`.
    WaitingForPeer {
        /// The address listened on.
        addr: String,
    },
    /// Recovery: the peer could not be asked; this side decides alone.
    PeerUnreachable {
        /// Why.
        error: String,
    },
    /// Recovery: a CRIU dump that a dead `migrate-out` left is ended.
    OrphanDumpEnded {
        /// The dump's process id.
        pid: i32,
    },
    /// Recovery: one side of a migration is settled.
    Settled {
        /// What was done, in a few words.
        what: String,
    },

    // --- anywhere ---
    /// A fault injected by the tests (`--inject-fault`) fires.
    FaultInjected {
        /// The fault.
        fault: Fault,
    },
    /// A notice that needs no figures: something that failed without
    /// failing the migration, or a fallback taken.
    Warning {
        /// Which part of migrun says it.
        origin: Origin,
        /// What, in one line.
        message: String,
    },
}

/// The function events go to.
type Sink = dyn Fn(&Event) + Send + Sync;

/// Where a migration's [`Event`]s go: a function shared by every clone
/// (cheap to clone, usable from any thread), or nowhere.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<Sink>>);

impl Events {
    /// Events that go nowhere (tests, and callers that want silence).
    pub fn none() -> Self {
        Self(None)
    }

    /// Events that go to `f`, on whichever thread emits them; `f` should
    /// return quickly (progress events come many times a round).
    pub fn new(f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Hands `event` to the sink, if there is one.
    pub fn emit(&self, event: Event) {
        if let Some(f) = &self.0 {
            f(&event);
        }
    }

    /// A [`Event::Warning`] from `origin`.
    pub fn warn(&self, origin: Origin, message: impl Into<String>) {
        if self.0.is_some() {
            self.emit(Event::Warning {
                origin,
                message: message.into(),
            });
        }
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Events(sink)"
        } else {
            "Events(none)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn events_reach_the_sink_from_every_clone_and_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let events = Events::new({
            let seen = seen.clone();
            move |e: &Event| seen.lock().expect("not poisoned").push(e.clone())
        });
        events.emit(Event::Listening {
            addr: "127.0.0.1:1".into(),
        });
        let other = events.clone();
        std::thread::spawn(move || {
            other.emit(Event::RoundProgress { done: 3, total: 9 });
            other.warn(Origin::MigrateIn, "odd");
        })
        .join()
        .expect("thread");
        let seen = seen.lock().expect("not poisoned");
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(matches!(&seen[0], Event::Listening { addr } if addr == "127.0.0.1:1"));
        assert!(matches!(
            seen[1],
            Event::RoundProgress { done: 3, total: 9 }
        ));
        assert!(matches!(
            &seen[2],
            Event::Warning { origin: Origin::MigrateIn, message } if message == "odd"
        ));
    }

    #[test]
    fn no_sink_is_silent_and_says_so() {
        let events = Events::none();
        events.emit(Event::Settled { what: "x".into() });
        events.warn(Origin::Migrun, "y");
        assert_eq!(format!("{events:?}"), "Events(none)");
        assert_eq!(format!("{:?}", Events::new(|_| {})), "Events(sink)");
        assert_eq!(format!("{:?}", Events::default()), "Events(none)");
    }
}
