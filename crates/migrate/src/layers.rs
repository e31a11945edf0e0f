//! Overlay root filesystems: their read-only lower layers travel by content
//! digest, once per target, and only the upper (writable) directory is
//! synced in rounds.
//!
//! A layer's digest is a SHA-256 over its tree: every path in sorted order
//! with its kind, permission bits, owner, size, the SHA-256 of its content
//! (regular files) or its target (symbolic links). Modification times do
//! not count, so the same layer unpacked on two hosts has the same digest.
//! The target keeps the layers it received under `<work-dir>/layers/<digest>`
//! and verifies each one's digest before it uses it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::rootfs::{self, Kind};
use crate::tree::Tree;
use crate::{MigrateError, Result};

/// An overlay mount: lower directories (uppermost first, as in `lowerdir=`)
/// and the upper directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The read-only layers, uppermost first.
    pub lower: Vec<PathBuf>,
    /// The writable layer.
    pub upper: PathBuf,
}

/// Unescapes a mountinfo field (`\040` for a space and so on).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The overlay mounted at `mount_point` according to the mountinfo text
/// `mountinfo`, if there is one with both `lowerdir` and `upperdir`.
pub fn overlay_in(mountinfo: &str, mount_point: &Path) -> Option<Overlay> {
    let mut found = None;
    for line in mountinfo.lines() {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        if fields.len() < 5 || Path::new(&unescape(fields[4])) != mount_point {
            continue;
        }
        let right: Vec<&str> = right.split(' ').collect();
        if right.first() != Some(&"overlay") || right.len() < 3 {
            // A later mount on the same point hides an earlier overlay.
            found = None;
            continue;
        }
        let mut lower = Vec::new();
        let mut upper = None;
        for opt in right[2].split(',') {
            if let Some(v) = opt.strip_prefix("lowerdir=") {
                lower = v
                    .split(':')
                    .filter(|p| !p.is_empty())
                    .map(|p| PathBuf::from(unescape(p)))
                    .collect();
            } else if let Some(v) = opt.strip_prefix("upperdir=") {
                upper = Some(PathBuf::from(unescape(v)));
            }
        }
        found = match upper {
            Some(upper) if !lower.is_empty() => Some(Overlay { lower, upper }),
            _ => None,
        };
    }
    found
}

/// The file in a bundle where migrate-in records the overlay it mounted
/// for the container (lower directories uppermost first, then the upper).
pub const OVERLAY_RECORD: &str = "migrun-overlay.json";

/// Records `overlay` in `bundle` (see [`OVERLAY_RECORD`]).
pub fn record_overlay(bundle: &Path, overlay: &Overlay) -> Result<()> {
    let json = serde_json::json!({ "lower": overlay.lower, "upper": overlay.upper });
    let path = bundle.join(OVERLAY_RECORD);
    fs::write(&path, json.to_string())
        .map_err(|e| MigrateError::Target(format!("write {}: {e}", path.display())))
}

/// The overlay a container's root filesystem is: the mount at `rootfs` in
/// this host's mount table, or else the one migrate-in recorded in the
/// bundle when it restored the container (it leaves the overlay mounted
/// only in the container's mount namespace).
///
/// The container's own mount table is never asked: a container that may
/// mount could name any host directory there as a lower layer, and the
/// source would read it and send it.
pub fn overlay_of(rootfs: &Path, bundle: &Path) -> Option<Overlay> {
    let host = fs::canonicalize(rootfs).ok().and_then(|p| {
        fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| overlay_in(&m, &p))
    });
    host.or_else(|| {
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(bundle.join(OVERLAY_RECORD)).ok()?).ok()?;
        let lower: Vec<PathBuf> = v["lower"]
            .as_array()?
            .iter()
            .filter_map(|p| p.as_str().map(PathBuf::from))
            .collect();
        let upper = PathBuf::from(v["upper"].as_str()?);
        (!lower.is_empty()).then_some(Overlay { lower, upper })
    })
}

/// SHA-256 of the regular file `rel` of `tree`, in hex (read through the
/// confined tree: never through a link).
fn file_digest(tree: &Tree, rel: &str) -> Result<String> {
    let shown = || tree.show(rel);
    let (mut f, _) = tree.open_regular(rel)?.ok_or_else(|| {
        MigrateError::Source(format!("{} is not a regular file any more", shown()))
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| MigrateError::Source(format!("read {}: {e}", shown())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The content digest of the tree at `dir` (see the module documentation).
pub fn tree_digest(dir: &Path) -> Result<String> {
    layer_digest(dir).map(|(d, _)| d)
}

/// The content digest of the layer at `dir`, and the bytes of data its
/// files hold.
pub fn layer_digest(dir: &Path) -> Result<(String, u64)> {
    let tree = Tree::open(dir)?;
    let snap = rootfs::snapshot(&tree)?;
    let mut h = Sha256::new();
    for (rel, e) in &snap {
        let what = match &e.kind {
            Kind::Dir => format!("d{}", u8::from(e.opaque)),
            Kind::File => format!("f{}:{}", e.size, file_digest(&tree, rel)?),
            Kind::Symlink(t) => format!("l{t}"),
            Kind::Whiteout => "w".to_string(),
            Kind::HardLink(l) => format!("h{l}"),
            Kind::Fifo => "p".to_string(),
            Kind::Socket => "s".to_string(),
            Kind::CharDev(r) => format!("c{r}"),
            Kind::BlockDev(r) => format!("b{r}"),
        };
        h.update(format!("{rel}\0{what}\0{:o}\0{}\0{}\n", e.mode, e.uid, e.gid).as_bytes());
    }
    Ok((
        format!("sha256:{}", hex(&h.finalize())),
        rootfs::data_bytes(&snap),
    ))
}

/// Checks that `digest` is one of ours (and safe as a directory name).
fn valid_digest(digest: &str) -> Result<&str> {
    let hexpart = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    match hexpart {
        Some(h) => Ok(h),
        None => Err(MigrateError::Protocol(format!(
            "bad layer digest {digest:?}"
        ))),
    }
}

/// The target's layers, by digest.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
}

impl LayerStore {
    /// The store in `root` (created when needed).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the layer `digest` lives once complete.
    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join(valid_digest(digest)?))
    }

    /// Whether layer `digest` is here.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.is_dir()).unwrap_or(false)
    }

    /// Where layer `digest` is put together while it arrives.
    pub fn incoming(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join(format!(".incoming-{}", valid_digest(digest)?)))
    }

    /// Verifies the arrived layer `digest` and moves it into the store.
    pub fn commit(&self, digest: &str) -> Result<PathBuf> {
        let incoming = self.incoming(digest)?;
        let got = tree_digest(&incoming).map_err(|e| MigrateError::Target(e.to_string()))?;
        if got != digest {
            let _ = fs::remove_dir_all(&incoming);
            return Err(MigrateError::Target(format!(
                "layer {digest} arrived with digest {got}"
            )));
        }
        let path = self.path(digest)?;
        if path.exists() {
            // Another migration brought it meanwhile.
            let _ = fs::remove_dir_all(&incoming);
        } else {
            fs::rename(&incoming, &path).map_err(|e| {
                MigrateError::Target(format!("store layer {}: {e}", path.display()))
            })?;
        }
        Ok(path)
    }

    /// Removes layers that never completed.
    pub fn discard_incoming(&self) {
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".incoming-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_is_found_in_mountinfo_and_a_later_mount_hides_it() {
        let info = "36 25 0:32 / /merged rw,relatime shared:1 - overlay overlay rw,lowerdir=/l/a:/l/b,upperdir=/u,workdir=/w\n";
        let o = overlay_in(info, Path::new("/merged")).expect("overlay");
        assert_eq!(o.lower, vec![PathBuf::from("/l/a"), PathBuf::from("/l/b")]);
        assert_eq!(o.upper, PathBuf::from("/u"));
        assert!(overlay_in(info, Path::new("/other")).is_none());
        let hidden = format!("{info}40 36 0:33 / /merged rw - tmpfs tmpfs rw\n");
        assert!(overlay_in(&hidden, Path::new("/merged")).is_none());
        let escaped = "36 25 0:32 / /my\\040root rw - overlay overlay rw,lowerdir=/l\\040x,upperdir=/u,workdir=/w\n";
        let o = overlay_in(escaped, Path::new("/my root")).expect("overlay");
        assert_eq!(o.lower, vec![PathBuf::from("/l x")]);
    }

    #[test]
    fn digest_follows_content_not_mtime_and_the_store_verifies_it() {
        let a = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(a.path().join("bin")).expect("mkdir");
        fs::write(a.path().join("bin/sh"), "#!").expect("w");
        let d1 = tree_digest(a.path()).expect("digest");
        let ts = nix::sys::time::TimeSpec::new(1, 0);
        nix::sys::stat::utimensat(
            None,
            &a.path().join("bin/sh"),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .expect("touch");
        assert_eq!(tree_digest(a.path()).expect("digest"), d1);
        fs::write(a.path().join("bin/sh"), "#?").expect("w");
        let d2 = tree_digest(a.path()).expect("digest");
        assert_ne!(d1, d2);

        let root = tempfile::tempdir().expect("tmp");
        let store = LayerStore::new(root.path().to_path_buf());
        assert!(!store.has(&d2));
        let inc = store.incoming(&d2).expect("incoming");
        fs::create_dir_all(inc.join("bin")).expect("mkdir");
        fs::write(inc.join("bin/sh"), "#!").expect("w");
        // Wrong content: refused and thrown away.
        assert!(store.commit(&d2).is_err());
        assert!(!inc.exists());
        fs::create_dir_all(inc.join("bin")).expect("mkdir");
        fs::write(inc.join("bin/sh"), "#?").expect("w");
        let p = store.commit(&d2).expect("commit");
        assert!(store.has(&d2));
        assert_eq!(fs::read_to_string(p.join("bin/sh")).expect("r"), "#?");
        assert!(store.path("../etc").is_err());
    }
}
