//! cgroup statistics in the message containerd expects from `Stats`:
//! `io.containerd.cgroups.v1.Metrics` (what `ctr task metrics` decodes).

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, HugetlbStat, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use libcgroups::stats::{MemoryData, Stats};

/// A memory counter of libcgroups as containerd's entry.
fn entry(data: &MemoryData) -> MemoryEntry {
    MemoryEntry {
        limit: data.limit,
        usage: data.usage,
        max: data.max_usage,
        failcnt: data.fail_count,
        ..Default::default()
    }
}

/// Converts libcgroups' statistics.
pub fn from_stats(stats: &Stats) -> Metrics {
    let mem = &stats.memory;
    let get = |key: &str| mem.stats.get(key).copied().unwrap_or(0);
    let memory = MemoryStat {
        cache: get("cache"),
        rss: get("rss"),
        rss_huge: get("rss_huge"),
        mapped_file: get("mapped_file"),
        dirty: get("dirty"),
        writeback: get("writeback"),
        pg_pg_in: get("pgpgin"),
        pg_pg_out: get("pgpgout"),
        pg_fault: get("pgfault"),
        pg_maj_fault: get("pgmajfault"),
        inactive_anon: get("inactive_anon"),
        active_anon: get("active_anon"),
        inactive_file: get("inactive_file"),
        active_file: get("active_file"),
        unevictable: get("unevictable"),
        hierarchical_memory_limit: get("hierarchical_memory_limit"),
        hierarchical_swap_limit: get("hierarchical_memsw_limit"),
        total_cache: get("total_cache"),
        total_rss: get("total_rss"),
        total_rss_huge: get("total_rss_huge"),
        total_mapped_file: get("total_mapped_file"),
        total_dirty: get("total_dirty"),
        total_writeback: get("total_writeback"),
        total_pg_pg_in: get("total_pgpgin"),
        total_pg_pg_out: get("total_pgpgout"),
        total_pg_fault: get("total_pgfault"),
        total_pg_maj_fault: get("total_pgmajfault"),
        total_inactive_anon: get("total_inactive_anon"),
        total_active_anon: get("total_active_anon"),
        total_inactive_file: get("total_inactive_file"),
        total_active_file: get("total_active_file"),
        total_unevictable: get("total_unevictable"),
        usage: Some(entry(&mem.memory)).into(),
        swap: Some(entry(&mem.memswap)).into(),
        kernel: Some(entry(&mem.kernel)).into(),
        kernel_tcp: Some(entry(&mem.kernel_tcp)).into(),
        ..Default::default()
    };
    let cpu = CPUStat {
        usage: Some(CPUUsage {
            total: stats.cpu.usage.usage_total,
            kernel: stats.cpu.usage.usage_kernel,
            user: stats.cpu.usage.usage_user,
            per_cpu: stats.cpu.usage.per_core_usage_total.clone(),
            ..Default::default()
        })
        .into(),
        throttling: Some(Throttle {
            periods: stats.cpu.throttling.periods,
            throttled_periods: stats.cpu.throttling.throttled_periods,
            throttled_time: stats.cpu.throttling.throttled_time,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let mut hugetlb: Vec<HugetlbStat> = stats
        .hugetlb
        .iter()
        .map(|(size, h)| HugetlbStat {
            usage: h.usage,
            max: h.max_usage,
            failcnt: h.fail_count,
            pagesize: size.clone(),
            ..Default::default()
        })
        .collect();
    hugetlb.sort_by(|a, b| a.pagesize.cmp(&b.pagesize));
    Metrics {
        hugetlb,
        pids: Some(PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(cpu).into(),
        memory: Some(memory).into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_pids_are_carried_over() {
        let mut stats = Stats::default();
        stats.memory.memory.usage = 4096;
        stats.memory.memory.limit = 1 << 20;
        stats.memory.stats.insert("total_rss".into(), 123);
        stats.pids.current = 3;
        stats.cpu.usage.usage_total = 99;
        let m = from_stats(&stats);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 1 << 20);
        assert_eq!(m.memory.total_rss, 123);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.cpu.usage.total, 99);
    }
}
