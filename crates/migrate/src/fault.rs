//! Fault injection for the tests of the hand-over: makes this side crash,
//! drop its connection or go silent right after it has journaled a named
//! step. Only the hidden `--inject-fault ACTION@STEP` flag of `migrate-out`
//! and `migrate-in` turns it on; nothing reads it otherwise.

use std::str::FromStr;

use crate::events::{Event, Events};
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
                "bad fault {s:?}: expected crash|drop|stall@STEP (STEP: a journal step such as frozen, sent, committed, acknowledged, continued)"
            ))
        };
        let (action, step) = s.split_once('@').ok_or_else(bad)?;
        let action = match action {
            "crash" => Action::Crash,
            "drop" => Action::Drop,
            "stall" => Action::Stall,
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
/// crashes the process here, or tells the caller to drop or stall.
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
            }
        }
        _ => Then::Go,
    }
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
        for bad in ["drop", "boom@sent", "crash@nowhere", ""] {
            let e = bad.parse::<Fault>().expect_err(bad);
            assert!(e.to_string().contains("bad fault"), "{e}");
        }
        assert_eq!(at(Some(f), Step::Sent, &Events::none()), Then::Go);
        assert_eq!(at(Some(f), Step::Committed, &Events::none()), Then::Drop);
    }
}
