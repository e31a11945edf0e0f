//! Finding a CRIU binary that is new enough, and asking it about features.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::{CriuError, Result};

/// Lowest CRIU major version migrun works with (3.x fails on this kernel's vDSO).
pub const MIN_MAJOR: u32 = 4;

/// A CRIU binary with its version.
#[derive(Debug, Clone)]
pub struct CriuBinary {
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// Its version as `criu --version` prints it (e.g. "4.1.1").
    pub version: String,
}

/// Parses "Version: 4.1.1" out of `criu --version`.
fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

/// Major number of a version string.
fn major(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// What identifies a binary file: path, device, inode, size and mtime.
type FileKey = (PathBuf, u64, u64, u64, i64);

fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (path.to_path_buf(), m.dev(), m.ino(), m.size(), m.mtime()))
}

/// Versions already asked in this process, by file identity: running
/// `criu --version` costs ~20 ms, which a migration must not pay inside
/// its downtime.
type VersionCache = Mutex<HashMap<FileKey, String>>;

fn version_cache() -> &'static VersionCache {
    static CACHE: OnceLock<VersionCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// `criu check --feature` answers already asked in this process, by file
/// identity and feature.
type FeatureCache = Mutex<HashMap<(FileKey, String), bool>>;

fn feature_cache() -> &'static FeatureCache {
    static CACHE: OnceLock<FeatureCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Version of the binary at `path`, if it runs.
fn version_of(path: &Path) -> Option<String> {
    let key = file_key(path);
    if let Some(k) = &key {
        if let Some(v) = version_cache().lock().ok().and_then(|c| c.get(k).cloned()) {
            return Some(v);
        }
    }
    let out = Command::new(path).arg("--version").output().ok()?;
    let version = parse_version(&String::from_utf8_lossy(&out.stdout))?;
    if let (Some(k), Ok(mut cache)) = (key, version_cache().lock()) {
        cache.insert(k, version.clone());
    }
    Some(version)
}

/// Candidate paths for `requested`: itself when it has a slash, else every
/// PATH entry and the usual sbin directories.
fn candidates(requested: &Path) -> Vec<PathBuf> {
    if requested.components().count() > 1 || requested.is_absolute() {
        return vec![requested.to_path_buf()];
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(extra));
    }
    let mut seen = Vec::new();
    for d in dirs {
        let p = d.join(requested);
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen
}

/// Finds the CRIU to use: `requested` (the global `--criu`, default "criu"),
/// searched in PATH and the sbin directories, preferring the first one whose
/// version is at least 4.
pub fn resolve(requested: &Path) -> Result<CriuBinary> {
    let mut too_old = None;
    for path in candidates(requested) {
        if !path.is_file() {
            continue;
        }
        match version_of(&path) {
            Some(version) if major(&version) >= MIN_MAJOR => {
                return Ok(CriuBinary { path, version });
            }
            Some(version) => {
                too_old.get_or_insert(CriuError::TooOld { path, version });
            }
            None => {}
        }
    }
    Err(too_old.unwrap_or_else(|| CriuError::NotFound(requested.display().to_string())))
}

impl CriuBinary {
    /// Whether `criu check --feature NAME` passes on this kernel.
    pub fn has_feature(&self, name: &str) -> bool {
        Command::new(&self.path)
            .args(["check", "--feature", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// [`has_feature`](Self::has_feature), asked once per binary in this
    /// process (a few ms each time otherwise).
    pub fn has_feature_cached(&self, name: &str) -> bool {
        let key = file_key(&self.path).map(|k| (k, name.to_string()));
        if let Some(k) = &key {
            if let Some(v) = feature_cache().lock().ok().and_then(|c| c.get(k).copied()) {
                return v;
            }
        }
        let has = self.has_feature(name);
        if let (Some(k), Ok(mut cache)) = (key, feature_cache().lock()) {
            cache.insert(k, has);
        }
        has
    }

    /// Whether CRIU can lock a network namespace with nftables (libnftables
    /// in process) instead of iptables-restore runs (a fork and exec of
    /// iptables- and ip6tables-restore on dump and again on restore: about
    /// 40 ms of a migration's downtime here).
    pub fn has_nftables_lock(&self) -> bool {
        self.has_feature_cached("network_lock_nftables")
    }

    /// Errors unless the kernel tracks dirty memory the way CRIU's pre-dump needs.
    pub fn require_dirty_tracking(&self) -> Result<()> {
        if self.has_feature("mem_dirty_track") {
            return Ok(());
        }
        Err(CriuError::Unsupported(
            "--pre-dump needs soft-dirty page tracking, which this kernel lacks: use `migrun migrate-out` for iterative pre-copy (it tracks dirty pages with userfaultfd)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_output() {
        assert_eq!(parse_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
        assert_eq!(
            parse_version("Version: 3.17\nGitID: x\n").as_deref(),
            Some("3.17")
        );
        assert_eq!(major("4.1.1"), 4);
        assert_eq!(major("3.17"), 3);
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = resolve(Path::new("/nonexistent/criu")).expect_err("must fail");
        assert!(err.to_string().contains("criu not found"), "{err}");
    }

    #[test]
    fn fake_old_criu_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let fake = dir.path().join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17'\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = resolve(&fake).expect_err("must fail");
        assert!(matches!(err, CriuError::TooOld { .. }), "{err}");
    }
}
