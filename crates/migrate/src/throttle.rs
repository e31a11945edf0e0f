//! Auto-converge: when a container dirties memory faster than the link can
//! carry it, its CPU is capped step by step through its cgroup (as QEMU
//! throttles vCPUs), and the original limit comes back afterwards.

use std::fs;
use std::path::PathBuf;

/// CPU shares of one CPU allowed at each step.
const LADDER: [f64; 8] = [0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002];
/// CFS period used while throttling, in microseconds.
const PERIOD_US: u64 = 500_000;

/// The CPU throttle of one container.
pub struct Throttle {
    cpu_dir: Option<PathBuf>,
    original: Option<(String, String)>,
    step: usize,
}

impl Throttle {
    /// The throttle of the container whose cgroup path (as in its config) is `cgroup_path`.
    pub fn new(cgroup_path: &std::path::Path) -> Self {
        let rel = cgroup_path
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string();
        let dir = PathBuf::from("/sys/fs/cgroup/cpu").join(rel);
        Self {
            cpu_dir: dir.join("cpu.cfs_quota_us").exists().then_some(dir),
            original: None,
            step: 0,
        }
    }

    /// Whether a limit is in force now.
    pub fn active(&self) -> bool {
        self.step > 0
    }

    /// The share of one CPU allowed now (1.0 when not throttled).
    pub fn share(&self) -> f64 {
        if self.step == 0 {
            1.0
        } else {
            LADDER[(self.step - 1).min(LADDER.len() - 1)]
        }
    }

    /// Tightens the cap by one step; returns the new share of one CPU, or
    /// `None` when the container's cgroup has no CPU controller.
    pub fn tighten(&mut self) -> Option<f64> {
        let dir = self.cpu_dir.as_ref()?;
        if self.original.is_none() {
            let quota = fs::read_to_string(dir.join("cpu.cfs_quota_us")).ok()?;
            let period = fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?;
            self.original = Some((quota.trim().to_string(), period.trim().to_string()));
        }
        self.step = (self.step + 1).min(LADDER.len());
        let share = self.share();
        let quota = ((PERIOD_US as f64 * share) as u64).max(1000);
        // Quota first when it shrinks below the old period's budget.
        let _ = fs::write(dir.join("cpu.cfs_quota_us"), "-1");
        let _ = fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string());
        fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).ok()?;
        Some(share)
    }

    /// The limit in force before the first step (quota, period), once
    /// throttled: what a recovery after a crash puts back.
    pub fn original(&self) -> Option<&(String, String)> {
        self.original.as_ref()
    }

    /// Puts `original` (quota, period) back on the container whose cgroup
    /// path is `cgroup_path`: [`release`](Self::release) for a throttle of
    /// a process that is gone.
    pub fn restore(cgroup_path: &std::path::Path, original: &(String, String)) {
        let mut t = Self::new(cgroup_path);
        t.original = Some(original.clone());
        t.release();
    }

    /// Puts the original limit back.
    pub fn release(&mut self) {
        if let (Some(dir), Some((quota, period))) = (&self.cpu_dir, self.original.take()) {
            let _ = fs::write(dir.join("cpu.cfs_quota_us"), "-1");
            let _ = fs::write(dir.join("cpu.cfs_period_us"), &period);
            let _ = fs::write(dir.join("cpu.cfs_quota_us"), &quota);
        }
        self.step = 0;
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.release();
    }
}
