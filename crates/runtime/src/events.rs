//! `events`: resource statistics of a container in runc's event envelope.

use libcgroups::common::CgroupManager;
use serde::Serialize;

use crate::error::{error_chain, Result, RuntimeError};
use crate::lifecycle::cgroup_manager;
use crate::store::StateRoot;

/// One event as `runc events` prints it.
#[derive(Debug, Serialize)]
pub struct Event {
    /// Event type: `stats`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Container id.
    pub id: String,
    /// The cgroup statistics.
    pub data: serde_json::Value,
}

/// Reads the current statistics of container `id` as a `stats` event.
pub fn stats(root: &StateRoot, id: &str) -> Result<Event> {
    let container = root.load(id)?;
    if !matches!(
        container.status(),
        libcontainer::container::ContainerStatus::Running
            | libcontainer::container::ContainerStatus::Paused
            | libcontainer::container::ContainerStatus::Created
    ) {
        return Err(RuntimeError::WrongStatus {
            id: id.to_string(),
            status: crate::state::status_name(container.status()).to_string(),
            action: "read stats",
        });
    }
    let stats = cgroup_manager(&container)?
        .stats()
        .map_err(|e| RuntimeError::Cgroup {
            context: format!("read stats of container {id}"),
            reason: error_chain(&e),
        })?;
    let data =
        serde_json::to_value(&stats).map_err(|e| RuntimeError::InvalidInput(e.to_string()))?;
    Ok(Event {
        kind: "stats",
        id: id.to_string(),
        data,
    })
}
