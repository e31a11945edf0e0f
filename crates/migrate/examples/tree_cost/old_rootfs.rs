//! BASELINE ONLY, NOT USED BY MIGRUN: the path-based file sync of the
//! live-migration engine as it was before commit 192c4cc ("migrate:
//! confined file access ..."), i.e. `crates/migrate/src/rootfs.rs` at
//! commit dcaa4ff, kept here verbatim but for these changes, so that the
//! `tree_cost` benchmark can time it against the confined access of
//! `migrun_migrate::tree` on the same tree in the same run:
//! - `crate::{MigrateError, Result}` is `migrun_migrate::{...}`;
//! - the wire name of the manifest (`MANIFEST`) and the unit test are left
//!   out (nothing here sends anything).
//!
//! It follows links and takes paths through the host's resolution: it is
//! what 192c4cc replaced, and must not come back into the engine.
//!
//! The original module documentation follows.
//!
//! > Syncing a container's root filesystem (a plain directory) in rounds.
//! >
//! > The source snapshots the tree (kind, mode, owner, size, mtime, inode per
//! > path); round 0 sends every regular file's content, later rounds only the
//! > files whose snapshot changed, and each round ends with a manifest of the
//! > whole tree, from which the target creates directories and links, sets
//! > metadata, and removes what the source no longer has.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use migrun_migrate::{MigrateError, Result};

/// Kinds of tree entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link with its target.
    Symlink(String),
    /// An overlayfs whiteout (a 0:0 character device): the path is deleted
    /// from the layers below.
    Whiteout,
}

/// What the source knows of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Kind.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Inode (changes when a file is replaced).
    pub ino: u64,
    /// An overlayfs opaque directory (hides the layers below).
    #[serde(default)]
    pub opaque: bool,
}

/// The xattr overlayfs marks an opaque directory with.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Whether the directory at `path` carries overlayfs's opaque mark.
fn is_opaque(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let name = c"trusted.overlay.opaque";
    let mut v = [0u8; 2];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    n == 1 && v[0] == b'y'
}

/// Marks the directory at `path` opaque for overlayfs.
fn set_opaque(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let name = std::ffi::CString::new(OPAQUE_XATTR)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid NUL-terminated strings and a one-byte value.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tree by relative path.
pub type Snapshot = BTreeMap<String, Entry>;

/// Snapshots the tree at `root` (device nodes, sockets and fifos are left
/// out: the container's /dev is a tmpfs CRIU restores itself).
pub fn snapshot(root: &Path) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = fs::read_dir(&dir)
            .map_err(|e| MigrateError::Source(format!("read {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            let ft = meta.file_type();
            let mut opaque = false;
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                opaque = is_opaque(&entry.path());
                Kind::Dir
            } else if std::os::unix::fs::FileTypeExt::is_char_device(&ft) && meta.rdev() == 0 {
                Kind::Whiteout
            } else if ft.is_file() {
                Kind::File
            } else if ft.is_symlink() {
                Kind::Symlink(
                    fs::read_link(entry.path())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            } else {
                continue;
            };
            out.insert(
                path,
                Entry {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: meta.size(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    ino: meta.ino(),
                    opaque,
                },
            );
        }
    }
    Ok(out)
}

/// Regular files of `now` that are new or changed since `before`.
pub fn changed_files<'a>(before: &Snapshot, now: &'a Snapshot) -> Vec<&'a str> {
    now.iter()
        .filter(|(_, e)| e.kind == Kind::File)
        .filter(|(p, e)| before.get(*p) != Some(*e))
        .map(|(p, _)| p.as_str())
        .collect()
}

/// Makes sure `rel` stays inside the tree.
fn safe_rel(rel: &str) -> Result<&str> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(MigrateError::Protocol(format!(
            "unsafe path {rel:?} from the source"
        )));
    }
    Ok(rel)
}

/// Writes a chunk of file `rel` under `root` (the target side).
pub fn write_chunk(root: &Path, rel: &str, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = root.join(safe_rel(rel)?);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| MigrateError::Target(format!("create {}: {e}", parent.display())))?;
    }
    if offset == 0 {
        // A replaced file starts afresh (and a symlink in the way goes).
        let _ = fs::remove_file(&path);
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| MigrateError::Target(format!("open {}: {e}", path.display())))?;
    file.write_all_at(data, offset)
        .map_err(|e| MigrateError::Target(format!("write {}: {e}", path.display())))
}

/// Sets a finished file's size (the target side).
pub fn finish_file(root: &Path, rel: &str, size: u64) -> Result<()> {
    let path = root.join(safe_rel(rel)?);
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| MigrateError::Target(format!("open {}: {e}", path.display())))?;
    file.set_len(size)
        .map_err(|e| MigrateError::Target(format!("truncate {}: {e}", path.display())))
}

/// Applies a manifest to the tree at `root`: creates directories and links,
/// sets metadata, removes what is not listed.
pub fn apply_manifest(root: &Path, manifest: &Snapshot) -> Result<()> {
    let err = |what: String, e: std::io::Error| MigrateError::Target(format!("{what}: {e}"));
    fs::create_dir_all(root).map_err(|e| err(format!("create {}", root.display()), e))?;
    // Directories first (sorted order puts parents before children).
    for (rel, e) in manifest {
        let path = root.join(safe_rel(rel)?);
        match &e.kind {
            Kind::Dir => {
                if fs::symlink_metadata(&path)
                    .map(|m| !m.is_dir())
                    .unwrap_or(false)
                {
                    let _ = fs::remove_file(&path);
                }
                fs::create_dir_all(&path)
                    .map_err(|x| err(format!("create {}", path.display()), x))?;
                if e.opaque && !is_opaque(&path) {
                    set_opaque(&path)
                        .map_err(|x| err(format!("mark {} opaque", path.display()), x))?;
                }
            }
            Kind::Whiteout => {
                let is_whiteout = fs::symlink_metadata(&path)
                    .map(|m| {
                        std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())
                            && m.rdev() == 0
                    })
                    .unwrap_or(false);
                if !is_whiteout {
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_dir_all(&path);
                    nix::sys::stat::mknod(
                        &path,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::from_bits_truncate(0o000),
                        0,
                    )
                    .map_err(|x| err(format!("whiteout {}", path.display()), x.into()))?;
                }
            }
            Kind::Symlink(target) => {
                let current = fs::read_link(&path).ok();
                if current.as_deref().map(|c| c.to_string_lossy().into_owned())
                    != Some(target.clone())
                {
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_dir_all(&path);
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(|x| err(format!("link {}", path.display()), x))?;
                }
            }
            Kind::File => {}
        }
    }
    // Removals: whatever the target has that the source no longer does.
    let have = snapshot(root).map_err(|e| MigrateError::Target(e.to_string()))?;
    for rel in have.keys().rev() {
        if !manifest.contains_key(rel) {
            let path = root.join(rel);
            let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
        }
    }
    // Metadata, children before parents so directory mtimes stick.
    for (rel, e) in manifest.iter().rev() {
        let path = root.join(rel);
        let _ = nix::unistd::fchownat(
            None,
            &path,
            Some(nix::unistd::Uid::from_raw(e.uid)),
            Some(nix::unistd::Gid::from_raw(e.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        if !matches!(e.kind, Kind::Symlink(_)) {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(e.mode));
        }
        let ts = nix::sys::time::TimeSpec::new(e.mtime.0, e.mtime.1);
        let _ = nix::sys::stat::utimensat(
            None,
            &path,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
    Ok(())
}
