//! `update`.

use anyhow::Result;
use migrun_runtime::resources::{self, parse_size, LinuxResources, ResourceFlags};
use migrun_runtime::StateRoot;

use crate::cli::UpdateArgs;

/// Parses an optional size flag.
fn size(text: &Option<String>) -> Result<Option<i64>> {
    Ok(match text {
        Some(t) => Some(parse_size(t)?),
        None => None,
    })
}

/// `migrun update [-r FILE] [limits] ID`.
pub fn update(root: &StateRoot, args: &UpdateArgs) -> Result<i32> {
    let base = match &args.resources {
        Some(path) => resources::read_resources_file(path)?,
        None => LinuxResources::default(),
    };
    let flags = ResourceFlags {
        memory: size(&args.memory)?,
        memory_swap: size(&args.memory_swap)?,
        memory_reservation: size(&args.memory_reservation)?,
        cpu_quota: args.cpu_quota,
        cpu_period: args.cpu_period,
        cpu_shares: args.cpu_shares,
        cpuset_cpus: args.cpuset_cpus.clone(),
        cpuset_mems: args.cpuset_mems.clone(),
        pids_limit: args.pids_limit,
    };
    resources::update(root, &args.id, &resources::merge(base, &flags))?;
    Ok(0)
}
