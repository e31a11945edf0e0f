//! `update`: changing a running container's cgroup limits.

use std::io::Read;
use std::path::Path;

use libcgroups::common::{CgroupManager, ControllerOpt};
use oci_spec::runtime::LinuxPids;
pub use oci_spec::runtime::LinuxResources;

use crate::error::{error_chain, Context, Result, RuntimeError};
use crate::lifecycle::cgroup_manager;
use crate::store::StateRoot;

/// Limits given as flags to `update` (each overrides the resources file).
#[derive(Debug, Clone, Default)]
pub struct ResourceFlags {
    /// Memory limit in bytes (-1 for unlimited).
    pub memory: Option<i64>,
    /// Memory plus swap limit in bytes.
    pub memory_swap: Option<i64>,
    /// Memory soft limit in bytes.
    pub memory_reservation: Option<i64>,
    /// CFS quota in microseconds.
    pub cpu_quota: Option<i64>,
    /// CFS period in microseconds.
    pub cpu_period: Option<u64>,
    /// CPU shares.
    pub cpu_shares: Option<u64>,
    /// CPUs allowed (cpuset syntax).
    pub cpuset_cpus: Option<String>,
    /// Memory nodes allowed (cpuset syntax).
    pub cpuset_mems: Option<String>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
}

/// Parses a size like runc does: a number with an optional k/m/g/t suffix
/// (binary units, case-insensitive, optional trailing "b"); "-1" is unlimited.
pub fn parse_size(text: &str) -> Result<i64> {
    let bad = || RuntimeError::InvalidInput(format!("invalid size {text:?}"));
    let t = text.trim().to_ascii_lowercase();
    if t == "-1" {
        return Ok(-1);
    }
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(0.0..=9.2e18).contains(&n) {
        return Err(bad());
    }
    Ok((n * mult as f64) as i64)
}

/// Reads a LinuxResources JSON from `path` (`-` for standard input).
pub fn read_resources_file(path: &Path) -> Result<LinuxResources> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .ctx(|| "read resources from standard input".to_string())?;
    } else {
        text = std::fs::read_to_string(path).ctx(|| format!("read {}", path.display()))?;
    }
    serde_json::from_str(&text).map_err(|e| {
        RuntimeError::InvalidInput(format!("invalid resources in {}: {e}", path.display()))
    })
}

/// Merges `flags` into `base`.
pub fn merge(mut base: LinuxResources, flags: &ResourceFlags) -> LinuxResources {
    if flags.memory.is_some() || flags.memory_swap.is_some() || flags.memory_reservation.is_some() {
        let mut mem = base.memory().unwrap_or_default();
        if let Some(v) = flags.memory {
            mem.set_limit(Some(v));
        }
        if let Some(v) = flags.memory_swap {
            mem.set_swap(Some(v));
        }
        if let Some(v) = flags.memory_reservation {
            mem.set_reservation(Some(v));
        }
        base.set_memory(Some(mem));
    }
    if flags.cpu_quota.is_some()
        || flags.cpu_period.is_some()
        || flags.cpu_shares.is_some()
        || flags.cpuset_cpus.is_some()
        || flags.cpuset_mems.is_some()
    {
        let mut cpu = base.cpu().clone().unwrap_or_default();
        if let Some(v) = flags.cpu_quota {
            cpu.set_quota(Some(v));
        }
        if let Some(v) = flags.cpu_period {
            cpu.set_period(Some(v));
        }
        if let Some(v) = flags.cpu_shares {
            cpu.set_shares(Some(v));
        }
        if let Some(v) = &flags.cpuset_cpus {
            cpu.set_cpus(Some(v.clone()));
        }
        if let Some(v) = &flags.cpuset_mems {
            cpu.set_mems(Some(v.clone()));
        }
        base.set_cpu(Some(cpu));
    }
    if let Some(limit) = flags.pids_limit {
        let mut pids = LinuxPids::default();
        pids.set_limit(limit);
        base.set_pids(Some(pids));
    }
    base
}

/// Applies `resources` to the cgroup of container `id`.
pub fn update(root: &StateRoot, id: &str, resources: &LinuxResources) -> Result<()> {
    let container = root.load(id)?;
    if container.status() == libcontainer::container::ContainerStatus::Stopped {
        return Err(RuntimeError::WrongStatus {
            id: id.to_string(),
            status: "stopped".into(),
            action: "update",
        });
    }
    let manager = cgroup_manager(&container)?;
    manager
        .apply(&ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| RuntimeError::Cgroup {
            context: format!("update container {id}"),
            reason: error_chain(&e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").ok(), Some(1024));
        assert_eq!(parse_size("256m").ok(), Some(256 << 20));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("4kb").ok(), Some(4096));
        assert_eq!(parse_size("-1").ok(), Some(-1));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn flags_override_file() {
        let base: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":100},"pids":{"limit":5}}"#).expect("json");
        let merged = merge(
            base,
            &ResourceFlags {
                memory: Some(200),
                ..Default::default()
            },
        );
        assert_eq!(merged.memory().and_then(|m| m.limit()), Some(200));
        assert_eq!(merged.pids().map(|p| p.limit()), Some(5));
    }
}
