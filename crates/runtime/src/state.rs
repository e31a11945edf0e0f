//! runc's view of a container: the JSON of `runc state` and rows of `runc list`.

use std::collections::HashMap;
use std::path::PathBuf;

use libcontainer::container::{Container, ContainerStatus};
use serde::{Deserialize, Serialize};

use crate::store::StateRoot;

/// The OCI runtime-spec version migrun implements.
pub const OCI_VERSION: &str = "1.2.0";

/// A container's state in the exact shape `runc state` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerState {
    /// OCI runtime-spec version.
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// Pid of the container's init process (0 once stopped).
    pub pid: i32,
    /// One of creating, created, running, paused, stopped.
    pub status: String,
    /// Absolute path of the bundle.
    pub bundle: PathBuf,
    /// Absolute path of the root filesystem.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339 with nanoseconds.
    pub created: String,
    /// User that created the container.
    pub owner: String,
    /// The spec's annotations.
    pub annotations: HashMap<String, String>,
}

/// runc's lower-case name of a status.
pub fn status_name(status: ContainerStatus) -> &'static str {
    match status {
        ContainerStatus::Creating => "creating",
        ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Stopped => "stopped",
        ContainerStatus::Paused => "paused",
    }
}

/// Name of user `uid`, or the number when it has no passwd entry.
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

impl ContainerState {
    /// Builds runc's state of `container`, with migrun's metadata from `root`.
    pub fn of(root: &StateRoot, container: &Container) -> Self {
        let status = container.status();
        let pid = match status {
            ContainerStatus::Stopped => 0,
            _ => container.pid().map(|p| p.as_raw()).unwrap_or(0),
        };
        let meta = root.meta(container.id());
        Self {
            oci_version: OCI_VERSION.to_string(),
            id: container.id().to_string(),
            pid,
            status: status_name(status).to_string(),
            bundle: container.bundle().clone(),
            rootfs: meta.rootfs,
            created: container
                .created()
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
                .unwrap_or_default(),
            owner: container.state.creator.map(user_name).unwrap_or_default(),
            annotations: container.state.annotations.clone().unwrap_or_default(),
        }
    }
}

/// Renders `runc list`'s table (tab-aligned columns).
pub fn render_table(states: &[ContainerState]) -> String {
    let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"];
    let rows: Vec<[String; 6]> = states
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.pid.to_string(),
                s.status.clone(),
                s.bundle.display().to_string(),
                s.created.clone(),
                s.owner.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &[&str]| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{:<width$}   ", cell, width = widths[i]));
            }
        }
        out.push('\n');
    };
    push_row(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        push_row(&cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, pid: i32) -> ContainerState {
        ContainerState {
            oci_version: OCI_VERSION.into(),
            id: id.into(),
            pid,
            status: "running".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00.000000000Z".into(),
            owner: "root".into(),
            annotations: HashMap::new(),
        }
    }

    #[test]
    fn json_has_runc_field_names() {
        let v = serde_json::to_value(sample("x", 5)).expect("serialize");
        for key in [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "owner",
            "annotations",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
    }

    #[test]
    fn table_aligns_columns() {
        let t = render_table(&[sample("a", 1), sample("longer-id", 12345)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("PID").expect("PID column");
        assert_eq!(&lines[2][col..col + 5], "12345");
        assert!(lines[1].starts_with("a "));
    }
}
