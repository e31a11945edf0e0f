//! The figures of one migration, printed at the end and written as JSON.

use serde::Serialize;

/// What one round moved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundFigures {
    /// Round number (0: everything; the last: the frozen remainder).
    pub round: u32,
    /// Pages sent with data.
    pub pages_sent: u64,
    /// Pages sent as zero markers (skipped: no data on the wire).
    pub pages_zero: u64,
    /// Pages the round had to resend because they were written (dirtied) during the previous round.
    pub pages_dirtied: u64,
    /// Bytes this round put on the wire.
    pub bytes: u64,
    /// Round duration in milliseconds.
    pub duration_ms: f64,
    /// Pages dirtied per second during the round.
    pub dirty_rate_pages_per_s: f64,
    /// Measured bandwidth in Mbit/s.
    pub bandwidth_mbit: f64,
    /// Whether this round ran with the container frozen.
    pub frozen: bool,
}

/// One step of the downtime, as a point in time after the freeze.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// What had just ended ("paused", "last dirty pages sent", ...).
    pub name: String,
    /// Milliseconds from the freeze until it ended.
    pub at_ms: f64,
}

/// The figures of a migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStats {
    /// Container id.
    pub container: String,
    /// Pre-copy (true) or stop-and-copy (`--no-precopy`).
    pub precopy: bool,
    /// Dirty-tracking backend used ("none" for stop-and-copy).
    pub dirty_tracking: String,
    /// Processes migrated.
    pub processes: usize,
    /// From start to the target's acknowledgement, in milliseconds.
    pub total_ms: f64,
    /// From freezing the source to the container running on the target.
    pub downtime_ms: f64,
    /// Time CRIU took to dump the frozen state (inside the downtime).
    pub criu_dump_ms: f64,
    /// The downtime step by step, in the order the steps ended.
    pub downtime_phases: Vec<Phase>,
    /// Pre-copy rounds (not counting the final frozen round).
    pub precopy_rounds: u32,
    /// Every round, the final one last.
    pub rounds: Vec<RoundFigures>,
    /// Bytes on the wire in total (both directions).
    pub bytes_total: u64,
    /// Bytes on the wire during the downtime.
    pub bytes_downtime: u64,
    /// Bytes of CRIU's images (process state without memory).
    pub bytes_criu_images: u64,
    /// Bytes of root filesystem files sent (the upper directory of an
    /// overlay root filesystem).
    pub bytes_rootfs: u64,
    /// Lower layers of an overlay root filesystem (0: a plain directory).
    pub layers_total: usize,
    /// Lower layers sent (the target lacked them).
    pub layers_sent: usize,
    /// Bytes of lower-layer files sent.
    pub bytes_layers: u64,
    /// Whether the container was throttled to converge.
    pub throttled: bool,
    /// The tightest CPU cap applied, as a share of one CPU (0 when not throttled).
    pub throttle_cpu_share: f64,
}

impl MigrationStats {
    /// Records that `name` ended now, `freeze` being when the downtime began.
    pub fn phase(&mut self, name: &str, freeze: std::time::Instant) {
        let at_ms = freeze.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(phase = name, at_ms, "downtime phase");
        self.downtime_phases.push(Phase {
            name: name.to_string(),
            at_ms,
        });
    }
}
