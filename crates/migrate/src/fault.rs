//! Fault injection for the tests of the hand-over: makes this side crash,
//! drop its connection, go silent or hold still right after it has
//! journaled a named step. Only the hidden `--inject-fault ACTION@STEP`
//! flag of `migrate-out` and `migrate-in` turns it on; nothing reads it
//! otherwise.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::events::{Event, Events, Origin};
use crate::journal::Step;
use crate::{MigrateError, Result};

/// What happens at the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL to this process (as `kill -9` would).
    Crash,
    /// The connection is shut down (the peer sees it closed).
    Drop,
    /// Nothing more is sent or read: the peer sees a silent partition.
    /// (This side sees one too, once its own deadline passes.)
    Stall,
    /// This side stands still (nothing sent, read or done: the whole
    /// process waits) until the test removes its [`hold_file`], or
    /// [`HOLD_LIMIT`] passes; then it carries on. Lets a test act at a
    /// step too brief to catch from outside (cut the network, say).
    Hold,
}

/// The longest a [`Action::Hold`] lasts when nobody lets it go.
pub const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// The file whose removal ends the hold of process `pid`:
/// `$TMPDIR/migrun-hold-PID` (made by the holding process; it holds the
/// step's name). The journal's `pid` names the process.
pub fn hold_file(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("migrun-hold-{pid}"))
}

/// A fault to inject: `action` right after `step` is journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What happens.
    pub action: Action,
    /// After which step.
    pub step: Step,
}

impl FromStr for Fault {
    type Err = MigrateError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            MigrateError::Source(format!(
                "bad fault {s:?}: expected crash|drop|stall|hold@STEP (STEP: a journal step such as frozen, sent, committed, acknowledged, continued)"
            ))
        };
        let (action, step) = s.split_once('@').ok_or_else(bad)?;
        let action = match action {
            "crash" => Action::Crash,
            "drop" => Action::Drop,
            "stall" => Action::Stall,
            "hold" => Action::Hold,
            _ => return Err(bad()),
        };
        let step = serde_json::from_value(serde_json::Value::from(step)).map_err(|_| bad())?;
        Ok(Fault { action, step })
    }
}

/// What the caller must do after [`at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Carry on.
    Go,
    /// Shut the connection down and fail as a lost peer would.
    Drop,
    /// Stop talking (and listening) for good.
    Stall,
}

/// Fires `fault` if it is set for `step` (and says so to `events` first):
/// crashes the process here, holds it here (then tells the caller to go
/// on), or tells the caller to drop or stall.
pub fn at(fault: Option<Fault>, step: Step, events: &Events) -> Then {
    match fault {
        Some(f) if f.step == step => {
            events.emit(Event::FaultInjected { fault: f });
            match f.action {
                Action::Crash => {
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                    Then::Stall
                }
                Action::Drop => Then::Drop,
                Action::Stall => Then::Stall,
                Action::Hold => {
                    hold(&hold_file(std::process::id()), step, HOLD_LIMIT, events);
                    Then::Go
                }
            }
        }
        _ => Then::Go,
    }
}

/// Makes `file` (saying `step`) and blocks this thread until it is gone or
/// `limit` has passed. The caller's runtime is single-threaded: the whole
/// side stands still meanwhile, as a stopped process would.
fn hold(file: &Path, step: Step, limit: Duration, events: &Events) {
    if let Err(e) = std::fs::write(file, step.name()) {
        events.warn(
            Origin::Migrun,
            format!("injected hold at {}: {}: {e}", step.name(), file.display()),
        );
        return;
    }
    let until = Instant::now() + limit;
    while file.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(file);
    events.warn(
        Origin::Migrun,
        format!("injected hold at {} let go", step.name()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_name_the_problem() {
        let f: Fault = "drop@committed".parse().expect("parses");
        assert_eq!(
            f,
            Fault {
                action: Action::Drop,
                step: Step::Committed
            }
        );
        assert_eq!(
            "hold@continued".parse::<Fault>().expect("parses").action,
            Action::Hold
        );
        for bad in ["drop", "boom@sent", "crash@nowhere", "hold", ""] {
            let e = bad.parse::<Fault>().expect_err(bad);
            assert!(e.to_string().contains("bad fault"), "{e}");
        }
        assert_eq!(at(Some(f), Step::Sent, &Events::none()), Then::Go);
        assert_eq!(at(Some(f), Step::Committed, &Events::none()), Then::Drop);
    }

    #[test]
    fn a_hold_lasts_until_its_file_is_gone_or_the_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("hold");
        // Let go from outside.
        let watched = file.clone();
        let releaser = std::thread::spawn(move || {
            while !watched.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                std::fs::read_to_string(&watched).expect("read"),
                "acknowledged"
            );
            std::thread::sleep(Duration::from_millis(100));
            std::fs::remove_file(&watched).expect("remove");
        });
        let t = Instant::now();
        hold(
            &file,
            Step::Acknowledged,
            Duration::from_secs(20),
            &Events::none(),
        );
        releaser.join().expect("releaser");
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(10));
        // Nobody lets it go: the limit does, and the file is gone.
        let t = Instant::now();
        hold(
            &file,
            Step::Running,
            Duration::from_millis(200),
            &Events::none(),
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(!file.exists());
    }
}
