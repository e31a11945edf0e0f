//! Live migration between two migrun state roots on this host, over
//! loopback: the target (`migrate-in --once` under a root of its own),
//! `migrate-out`, and what the tests read back from both.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use crate::{wait_until, Migrun};

static PORT: AtomicU16 = AtomicU16::new(0);

/// A port for this test's target (distinct per test and per test process).
pub fn port() -> u16 {
    // 100 ports per test process (hostile.rs alone starts about 45 targets).
    let base = 20000 + (std::process::id() % 400) as u16 * 100;
    base + PORT.fetch_add(1, Ordering::SeqCst) % 100
}

/// `p` as a `&str`, for argument lists (test paths are UTF-8).
pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The target: `migrate-in --once` under its own root; killed on drop.
pub struct Target {
    /// The target's state root.
    pub m: Migrun,
    /// The `migrate-in` process.
    pub child: Child,
    /// The address it listens on.
    pub addr: String,
    /// Its `--work-dir`.
    pub work: tempfile::TempDir,
    /// Its stderr.
    pub log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Target {
    /// Starts `migrate-in` on a fresh root and work directory.
    pub fn start(key: &Path) -> Self {
        Self::start_with(key, &[], None)
    }

    /// Starts `migrate-in` with `extra` global arguments (before the
    /// command) on a fresh root, and on `work` if given.
    pub fn start_with(key: &Path, extra: &[&str], work: Option<tempfile::TempDir>) -> Self {
        Self::start_on(Migrun::new(), key, extra, work)
    }

    /// [`start_with`](Self::start_with) on the state root of `m`.
    pub fn start_on(
        m: Migrun,
        key: &Path,
        extra: &[&str],
        work: Option<tempfile::TempDir>,
    ) -> Self {
        Self::start_full(m, key, extra, &[], work)
    }

    /// [`start_on`](Self::start_on) with `in_args` for migrate-in itself
    /// (after the command: `--peer-timeout`, `--inject-fault`).
    pub fn start_full(
        m: Migrun,
        key: &Path,
        extra: &[&str],
        in_args: &[&str],
        work: Option<tempfile::TempDir>,
    ) -> Self {
        let work = work.unwrap_or_else(|| tempfile::tempdir().expect("tmp"));
        // The log lives outside the work directory, whose contents the tests check.
        let log_dir = tempfile::tempdir().expect("tmp");
        let log = log_dir.path().join("migrate-in.log");
        let addr = format!("127.0.0.1:{}", port());
        let child = spawn_in(&m, key, extra, in_args, &addr, work.path(), &log);
        Self {
            m,
            child,
            addr,
            work,
            log,
            _log_dir: log_dir,
        }
    }

    /// Starts a new `migrate-in --once` on the same root and work
    /// directory (and a new port), after the last one ended.
    pub fn again(&mut self, key: &Path, in_args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.addr = format!("127.0.0.1:{}", port());
        self.child = spawn_in(
            &self.m,
            key,
            &[],
            in_args,
            &self.addr,
            self.work.path(),
            &self.log,
        );
    }

    /// What migrate-in wrote on stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (30 s at most, then kills it) for migrate-in to exit; returns its success.
    pub fn finish(&mut self) -> bool {
        for _ in 0..300 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        false
    }

    /// Files left in the target's work directory.
    pub fn leftovers(&self) -> Vec<String> {
        let list = |dir: &Path, prefix: &str| -> Vec<String> {
            fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| format!("{prefix}{}", e.file_name().to_string_lossy()))
                        .collect()
                })
                .unwrap_or_default()
        };
        // The work dir, and the migrated bundles and journals in the state root.
        let mut out = list(self.work.path(), "");
        for sub in [".bundles", ".migrations"] {
            out.extend(list(&self.m.root().join(sub), &format!("{sub}/")));
        }
        out
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs migrate-out; returns (success, stderr, stats JSON if written).
pub fn migrate_out(
    src: &Migrun,
    id: &str,
    target: &Target,
    key: &Path,
    extra: &[&str],
) -> (bool, String, Option<serde_json::Value>) {
    migrate_out_with(src, id, target, key, extra, &[], Duration::from_secs(600))
}

/// Runs migrate-out with `env` added to its environment, killing it after
/// `timeout` (then the stderr returned ends with a line saying so);
/// returns (success, stderr, stats JSON if written).
pub fn migrate_out_with(
    src: &Migrun,
    id: &str,
    target: &Target,
    key: &Path,
    extra: &[&str],
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> (bool, String, Option<serde_json::Value>) {
    let stats = tempfile::NamedTempFile::new().expect("tmp");
    let work = tempfile::tempdir().expect("tmp");
    // stderr through a file: no pipe to drain while waiting with a bound.
    let err = tempfile::NamedTempFile::new().expect("tmp");
    let mut child = src
        .command()
        .args(["migrate-out", id, "--to", &target.addr, "--key"])
        .arg(key)
        .arg("--stats-json")
        .arg(stats.path())
        .arg("--work-dir")
        .arg(work.path())
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.reopen().expect("reopen"))
        .spawn()
        .expect("spawn migrate-out");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait migrate-out") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = fs::read_to_string(err.path()).unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!("test: migrate-out killed after {timeout:?}\n"));
    }
    let json = fs::read_to_string(stats.path())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    (status.is_some_and(|s| s.success()), stderr, json)
}

/// The target-side rootfs of a migrated container.
pub fn target_rootfs(target: &Target, id: &str) -> PathBuf {
    PathBuf::from(
        target.m.state(id)["rootfs"]
            .as_str()
            .expect("rootfs")
            .to_string(),
    )
}

/// Pids of the processes whose command line or environment mentions
/// `needle` (a state root, a work directory): what a migration left running.
pub fn processes_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let mentions = ["cmdline", "environ"].iter().any(|f| {
            fs::read(entry.path().join(f)).is_ok_and(|text| contains_bytes(&text, needle))
        });
        if mentions {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `haystack` contains `needle` (byte strings).
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Spawns `migrate-in --once` on `m`'s root and waits until it listens
/// (its stderr appended to `log`).
fn spawn_in(
    m: &Migrun,
    key: &Path,
    extra: &[&str],
    in_args: &[&str],
    addr: &str,
    work: &Path,
    log: &Path,
) -> Child {
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let before = fs::read_to_string(log).map(|l| l.len()).unwrap_or(0);
    let child = m
        .command()
        .args(extra)
        .args(["migrate-in", "--listen", addr, "--once", "--key"])
        .arg(key)
        .arg("--work-dir")
        .arg(work)
        .args(in_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn migrate-in");
    // Not a probe connection: with --once it would be the one migration.
    assert!(wait_until(Duration::from_secs(5), || fs::read_to_string(
        log
    )
    .map(|l| l.get(before..).unwrap_or_default().contains("listening"))
    .unwrap_or(false)));
    child
}
