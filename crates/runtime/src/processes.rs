//! `ps`: the processes of a container.

use std::collections::HashSet;
use std::process::Command;

use crate::error::{Context, Result, RuntimeError};
use crate::lifecycle::container_pids;
use crate::store::StateRoot;

/// Pids of every process of container `id`.
pub fn pids(root: &StateRoot, id: &str) -> Result<Vec<i32>> {
    let container = root.load(id)?;
    let mut pids: Vec<i32> = container_pids(&container)?
        .into_iter()
        .map(|p| p.as_raw())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// Runs `ps` with `ps_args` (default `-ef`) and keeps the header and the
/// lines of the container's processes, as `runc ps` does.
pub fn table(root: &StateRoot, id: &str, ps_args: &[String]) -> Result<String> {
    let wanted: HashSet<i32> = pids(root, id)?.into_iter().collect();
    let args: Vec<String> = if ps_args.is_empty() {
        vec!["-ef".into()]
    } else {
        ps_args.to_vec()
    };
    let output = Command::new("ps")
        .args(&args)
        .output()
        .ctx(|| "run ps".to_string())?;
    if !output.status.success() {
        return Err(RuntimeError::InvalidInput(format!(
            "ps {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let pid_col = header
        .split_whitespace()
        .position(|h| h == "PID")
        .ok_or_else(|| RuntimeError::InvalidInput("ps output has no PID column".into()))?;
    let mut out = format!("{header}\n");
    for line in lines {
        let pid = line
            .split_whitespace()
            .nth(pid_col)
            .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|p| wanted.contains(&p)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}
