//! `keygen`, `migrate-in`, `migrate-out`.

use std::path::Path;

use anyhow::{Context, Result};
use migrun_migrate::stats::MigrationStats;
use migrun_migrate::{source, target};
use migrun_runtime::StateRoot;

/// A single-threaded async runtime for one migration.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start async runtime")
}

/// A duration flag given in seconds.
pub fn seconds(value: f64, flag: &str) -> Result<std::time::Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
        anyhow::bail!("{flag} {value}: expected seconds between 0 and 86400");
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

/// The hidden `--inject-fault` flag of the tests.
pub fn fault(value: Option<&str>) -> Result<Option<migrun_migrate::fault::Fault>> {
    Ok(value.map(str::parse).transpose()?)
}

/// `migrun migrate-recover ID ...`.
pub fn migrate_recover(
    root: &StateRoot,
    opts: migrun_migrate::recover::RecoverOptions,
) -> Result<i32> {
    let done = runtime()?.block_on(migrun_migrate::recover::recover(root, &opts))?;
    println!("{done}");
    Ok(0)
}

/// `migrun keygen --out FILE`.
pub fn keygen(out: &Path) -> Result<i32> {
    migrun_wire::generate_key_file(out)?;
    println!("wrote a new key to {}", out.display());
    Ok(0)
}

/// `migrun migrate-in ...`.
pub fn migrate_in(root: &StateRoot, opts: target::InOptions) -> Result<i32> {
    std::fs::create_dir_all(&opts.work_dir)
        .with_context(|| format!("create {}", opts.work_dir.display()))?;
    runtime()?.block_on(target::migrate_in(root, &opts))?;
    Ok(0)
}

/// Prints the figures of a migration.
fn print_summary(s: &MigrationStats) {
    eprintln!(
        "migrated {} ({}): total {:.0} ms, downtime {:.0} ms (criu dump {:.0} ms), {} pre-copy rounds, {:.1} MiB on the wire ({:.1} MiB during downtime), dirty tracking: {}, throttled: {}",
        s.container,
        if s.precopy { "pre-copy" } else { "stop-and-copy" },
        s.total_ms,
        s.downtime_ms,
        s.criu_dump_ms,
        s.precopy_rounds,
        s.bytes_total as f64 / 1048576.0,
        s.bytes_downtime as f64 / 1048576.0,
        s.dirty_tracking,
        s.throttled
    );
}

/// `migrun migrate-out ID --to ... --key ...`.
pub fn migrate_out(
    root: &StateRoot,
    opts: source::OutOptions,
    stats_json: Option<&Path>,
) -> Result<i32> {
    std::fs::create_dir_all(&opts.work_dir)
        .with_context(|| format!("create {}", opts.work_dir.display()))?;
    let stats = runtime()?.block_on(source::migrate_out(root, &opts))?;
    print_summary(&stats);
    if let Some(path) = stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(0)
}
