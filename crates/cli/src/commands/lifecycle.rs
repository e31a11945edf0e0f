//! `start`, `kill`, `delete`, `pause`, `resume`.

use anyhow::Result;
use migrun_runtime::{lifecycle, StateRoot};

/// `migrun start ID`.
pub fn start(root: &StateRoot, id: &str) -> Result<i32> {
    lifecycle::start(root, id)?;
    Ok(0)
}

/// `migrun kill [--all] ID [SIGNAL]`.
pub fn kill(root: &StateRoot, id: &str, signal: &str, all: bool) -> Result<i32> {
    lifecycle::kill(root, id, signal, all)?;
    Ok(0)
}

/// `migrun delete [-f] ID...`: deletes each, reports the first failure.
pub fn delete(root: &StateRoot, ids: &[String], force: bool) -> Result<i32> {
    let mut first_err = None;
    for id in ids {
        if let Err(err) = lifecycle::delete(root, id, force) {
            if force && matches!(err, migrun_runtime::RuntimeError::NotFound(_)) {
                continue;
            }
            first_err.get_or_insert(err);
        }
    }
    match first_err {
        Some(err) => Err(err.into()),
        None => Ok(0),
    }
}

/// `migrun pause ID`.
pub fn pause(root: &StateRoot, id: &str) -> Result<i32> {
    lifecycle::pause(root, id)?;
    Ok(0)
}

/// `migrun resume ID`.
pub fn resume(root: &StateRoot, id: &str) -> Result<i32> {
    lifecycle::resume(root, id)?;
    Ok(0)
}
