//! The state root (`--root`): one directory per container.
//!
//! libcontainer keeps its `state.json` in each container's directory; migrun
//! adds `migrun.json` beside it with what runc's `state` prints and
//! libcontainer does not keep (the rootfs path and the owner).

use std::fs;
use std::path::{Path, PathBuf};

use libcontainer::container::state::StateError;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Result, RuntimeError};
use crate::id;

/// Name of migrun's own metadata file in a container directory.
const META_FILE: &str = "migrun.json";

/// Extra facts about a container that migrun records at create time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerMeta {
    /// Absolute path of the container's root filesystem.
    pub rootfs: PathBuf,
}

/// The directory holding all containers' state (runc's `--root`).
#[derive(Debug, Clone)]
pub struct StateRoot {
    path: PathBuf,
    systemd: bool,
}

impl StateRoot {
    /// Opens (and creates, mode 0700) the state root at `path`.
    pub fn open(path: &Path, systemd: bool) -> Result<Self> {
        fs::create_dir_all(path).ctx(|| format!("create state root {}", path.display()))?;
        let path =
            fs::canonicalize(path).ctx(|| format!("resolve state root {}", path.display()))?;
        Ok(Self { path, systemd })
    }

    /// Path of the state root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether cgroups are managed through systemd.
    pub fn systemd(&self) -> bool {
        self.systemd
    }

    /// Directory of container `id` (which may not exist).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.path.join(id)
    }

    /// Whether a container `id` exists.
    pub fn exists(&self, id: &str) -> bool {
        self.container_dir(id).join("state.json").exists()
    }

    /// Loads container `id`, refreshing its status from the live system.
    pub fn load(&self, id: &str) -> Result<Container> {
        id::validate(id)?;
        let dir = self.container_dir(id);
        if !dir.join("state.json").exists() {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        let mut container = load_whole(dir).ctx(|| format!("load state of container {id}"))?;
        container
            .refresh_status()
            .ctx(|| format!("refresh status of container {id}"))?;
        Ok(container)
    }

    /// Ids of all containers under the root, sorted.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let entries =
            fs::read_dir(&self.path).ctx(|| format!("read state root {}", self.path.display()))?;
        for entry in entries.flatten() {
            if entry.path().join("state.json").exists() {
                if let Some(name) = entry.file_name().to_str() {
                    ids.push(name.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Reads migrun's metadata for container `id` (empty when absent).
    pub fn meta(&self, id: &str) -> ContainerMeta {
        fs::read(self.container_dir(id).join(META_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Writes migrun's metadata for container `id`.
    pub fn save_meta(&self, id: &str, meta: &ContainerMeta) -> Result<()> {
        let path = self.container_dir(id).join(META_FILE);
        let bytes =
            serde_json::to_vec(meta).map_err(|e| RuntimeError::InvalidInput(e.to_string()))?;
        fs::write(&path, bytes).ctx(|| format!("write {}", path.display()))
    }
}

/// [`Container::load`], retried briefly while the state file does not parse.
///
/// libcontainer rewrites `state.json` in place (truncate, then write), so a
/// `state` racing a `create` or `start` can read it empty or half written.
/// A write takes microseconds: a reader that retries for up to 100 ms sees
/// the finished file, and a file still unparsable by then is reported.
fn load_whole(dir: PathBuf) -> std::result::Result<Container, LibcontainerError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    loop {
        match Container::load(dir.clone()) {
            Err(LibcontainerError::State(StateError::ParseStateFile { .. }))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            other => return other,
        }
    }
}
