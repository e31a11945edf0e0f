//! Syncing a container's file tree (its root filesystem, the upper
//! directory of an overlay one, or an image layer) in rounds.
//!
//! The source snapshots the tree (kind, mode, owner, size, mtime, inode per
//! path); round 0 sends every regular file's data, later rounds only the
//! files whose snapshot changed, and each round ends with a manifest of the
//! whole tree. From it the target creates directories, links and special
//! files, sets metadata, and removes what the source no longer has.
//!
//! Every file access goes through a [`Tree`] (confined: nothing is read or
//! written through a link, nothing leaves the tree). Files cross as data
//! and holes; FIFOs, sockets and device nodes cross as what they are and
//! are never opened; a hard-linked set stays one inode.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::tree::{
    self, decode_name, encode_name, join, parent_of, InodeKind, Node, Tree, TreeError,
};

/// Kinds of tree entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file (the first path of a hard-linked set).
    File,
    /// A symbolic link with its target (escaped as names are, see
    /// [`tree::encode_name`]).
    Symlink(String),
    /// An overlayfs whiteout (a 0:0 character device): the path is deleted
    /// from the layers below.
    Whiteout,
    /// Another name of the regular file at this path (which sorts before).
    HardLink(String),
    /// A named pipe.
    Fifo,
    /// A socket inode.
    Socket,
    /// A character device with its device number.
    CharDev(u64),
    /// A block device with its device number.
    BlockDev(u64),
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
    /// Size in bytes (apparent).
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Inode (changes when a file is replaced).
    pub ino: u64,
    /// An overlayfs opaque directory (hides the layers below).
    #[serde(default)]
    pub opaque: bool,
    /// 512-byte blocks the data takes (a sparse file's are few).
    #[serde(default)]
    pub blocks: u64,
}

impl Entry {
    /// The entry for an inode of `kind` with this `lstat`.
    pub fn of(kind: Kind, st: &nix::sys::stat::FileStat) -> Entry {
        Entry {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size.max(0) as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ino: st.st_ino,
            opaque: false,
            blocks: st.st_blocks.max(0) as u64,
        }
    }
}

/// The tree by relative path (escaped names, see [`tree::encode_name`]).
pub type Snapshot = std::collections::BTreeMap<String, Entry>;

/// Snapshots `tree`. What the container swaps while we look is taken as
/// it is found, or left out (the next round's snapshot sees it again).
pub fn snapshot(tree: &Tree) -> Result<Snapshot, TreeError> {
    let mut out = Snapshot::new();
    let mut linked: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let (entries, opaque) = match tree.list(&rel) {
            Ok(x) => x,
            // A directory swapped for something else since its parent
            // was listed.
            Err(e) if !rel.is_empty() && e.is_gone() => {
                out.remove(&rel);
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(e) = out.get_mut(&rel) {
            e.opaque = opaque;
        }
        for l in entries {
            let path = join(&rel, &l.name);
            let st = &l.stat;
            let kind = match InodeKind::of(st) {
                Some(InodeKind::Dir) => {
                    stack.push(path.clone());
                    Kind::Dir
                }
                Some(InodeKind::File) => {
                    if st.st_nlink > 1 {
                        linked.entry(st.st_ino).or_default().push(path.clone());
                    }
                    Kind::File
                }
                Some(InodeKind::Symlink) => match tree.readlink(&path) {
                    Ok(t) => Kind::Symlink(encode_name(&t)),
                    Err(e) if e.is_gone() || e.errno() == Some(nix::errno::Errno::EINVAL) => {
                        continue
                    }
                    Err(e) => return Err(e),
                },
                Some(InodeKind::Char) if st.st_rdev == 0 => Kind::Whiteout,
                Some(InodeKind::Char) => Kind::CharDev(st.st_rdev),
                Some(InodeKind::Block) => Kind::BlockDev(st.st_rdev),
                Some(InodeKind::Fifo) => Kind::Fifo,
                Some(InodeKind::Socket) => Kind::Socket,
                None => continue,
            };
            out.insert(path, Entry::of(kind, st));
        }
    }
    for (_, mut paths) in linked {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        let leader = paths[0].clone();
        for p in &paths[1..] {
            if let Some(e) = out.get_mut(p) {
                e.kind = Kind::HardLink(leader.clone());
            }
        }
    }
    Ok(out)
}

/// Regular files of `now` that are new or changed since `before` (the
/// first path of a hard-linked set only: the others are links to it).
pub fn changed_files<'a>(before: &Snapshot, now: &'a Snapshot) -> Vec<&'a str> {
    now.iter()
        .filter(|(_, e)| e.kind == Kind::File)
        .filter(|(p, e)| before.get(*p) != Some(*e))
        .map(|(p, _)| p.as_str())
        .collect()
}

/// Bytes of data (not apparent size) the regular files of `snap` hold.
pub fn data_bytes(snap: &Snapshot) -> u64 {
    snap.values()
        .filter(|e| e.kind == Kind::File)
        .map(|e| e.blocks.saturating_mul(512))
        .fold(0u64, u64::saturating_add)
}

/// Drops from `snap` the hard links whose first path is no longer in it
/// (it vanished before it could be read: the next round sees them again).
pub fn drop_orphan_links(snap: &mut Snapshot) {
    let orphans: Vec<String> = snap
        .iter()
        .filter(|(_, e)| matches!(&e.kind, Kind::HardLink(l) if snap.get(l).map(|x| &x.kind) != Some(&Kind::File)))
        .map(|(p, _)| p.clone())
        .collect();
    for p in orphans {
        snap.remove(&p);
    }
}

/// Checks a manifest from the source: every path is a safe relative path
/// under a directory the manifest lists, every link target decodes, and
/// every hard link names a regular file listed before it.
pub fn check_manifest(m: &Snapshot) -> Result<(), String> {
    for (rel, e) in m {
        tree::check_rel(rel).map_err(|x| format!("manifest: {x}"))?;
        let parent = parent_of(rel);
        if !parent.is_empty() && m.get(parent).map(|p| &p.kind) != Some(&Kind::Dir) {
            return Err(format!(
                "manifest lists {rel:?} under {parent:?}, which is not a directory in it"
            ));
        }
        match &e.kind {
            Kind::Symlink(t) if decode_name(t).is_none_or(|t| t.is_empty() || t.contains(&0)) => {
                return Err(format!("manifest: bad link target for {rel:?}"));
            }
            Kind::HardLink(l) if l >= rel || m.get(l).map(|x| &x.kind) != Some(&Kind::File) => {
                return Err(format!(
                    "manifest: {rel:?} is a hard link to {l:?}, which is not a file listed before it"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The target's side of one synced tree across rounds: the manifest it
/// applied last, and the paths the current round wrote.
#[derive(Debug, Default)]
pub struct Applied {
    last: Option<Snapshot>,
    touched: BTreeSet<String>,
}

impl Applied {
    /// Notes that the round wrote (created or replaced) `rel` and possibly
    /// the directories on its way.
    pub fn touch(&mut self, rel: &str) {
        let mut p = rel;
        while !p.is_empty() && self.touched.insert(p.to_string()) {
            p = parent_of(p);
        }
    }

    /// Whether a manifest was applied.
    pub fn has_applied(&self) -> bool {
        self.last.is_some()
    }

    /// Applies a manifest to `tree`: creates directories, links and
    /// special files, removes what it does not list, and sets metadata.
    /// Only what changed since the last manifest, or what this round
    /// wrote, is looked at again: nobody but us writes the target's tree.
    pub fn apply(&mut self, tree: &Tree, manifest: Snapshot) -> Result<(), TreeError> {
        let touched = std::mem::take(&mut self.touched);
        let last = self.last.take();
        let dirty: Vec<&String> = manifest
            .iter()
            .filter(|(rel, e)| {
                touched.contains(*rel)
                    || last.as_ref().and_then(|l| l.get(*rel)) != Some(*e)
                    || matches!(&e.kind, Kind::HardLink(l) if touched.contains(l))
            })
            .map(|(rel, _)| rel)
            .collect();
        // Structure, parents first (sorted order), links after the files
        // they link to exist.
        for rel in &dirty {
            let e = &manifest[*rel];
            let node = match &e.kind {
                Kind::Dir => Some(Node::Dir(e.mode)),
                // Written this round: there. Otherwise it must be from an
                // earlier round.
                Kind::File if touched.contains(*rel) => None,
                Kind::File => {
                    let have = tree.stat(rel)?;
                    if have.as_ref().and_then(InodeKind::of) != Some(InodeKind::File) {
                        return Err(TreeError::Sys {
                            op: "the source never sent",
                            path: tree.show(rel),
                            errno: nix::errno::Errno::ENOENT,
                        });
                    }
                    None
                }
                Kind::Symlink(t) => Some(Node::Symlink(
                    decode_name(t).ok_or_else(|| TreeError::BadPath(t.clone()))?,
                )),
                Kind::Whiteout => Some(Node::Char(0)),
                Kind::HardLink(_) => None,
                Kind::Fifo => Some(Node::Fifo),
                Kind::Socket => Some(Node::Socket),
                Kind::CharDev(r) => Some(Node::Char(*r)),
                Kind::BlockDev(r) => Some(Node::Block(*r)),
            };
            if let Some(node) = node {
                tree.make(rel, &node)?;
            }
            if e.kind == Kind::Dir {
                let was = last
                    .as_ref()
                    .and_then(|l| l.get(*rel))
                    .is_some_and(|x| x.opaque);
                if e.opaque || was {
                    tree.set_opaque(rel, e.opaque)?;
                }
            }
        }
        for rel in &dirty {
            if let Kind::HardLink(leader) = &manifest[*rel].kind {
                tree.make(rel, &Node::HardLink(leader.clone()))?;
            }
        }
        // Removals, children first.
        let gone: BTreeSet<String> = match &last {
            None => snapshot(tree)?.into_keys().collect::<Vec<_>>(),
            Some(l) => l.keys().chain(touched.iter()).cloned().collect::<Vec<_>>(),
        }
        .into_iter()
        .filter(|rel| !manifest.contains_key(rel))
        .collect();
        for rel in gone.iter().rev() {
            tree.remove_all(rel)?;
        }
        // Metadata, children before parents so that directory times stick.
        let mut meta: BTreeSet<&str> = dirty.iter().map(|r| r.as_str()).collect();
        for rel in dirty
            .iter()
            .map(|r| r.as_str())
            .chain(gone.iter().map(String::as_str))
        {
            let p = parent_of(rel);
            if !p.is_empty() {
                meta.insert(p);
            }
        }
        let mut cache = None;
        for rel in meta.iter().rev() {
            let Some(e) = manifest.get(*rel) else {
                continue;
            };
            if matches!(e.kind, Kind::HardLink(_)) {
                continue; // the same inode as its first path
            }
            tree.set_meta(rel, e.uid, e.gid, e.mode, e.mtime, &mut cache)?;
        }
        self.last = Some(manifest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::FileExt;

    /// Copies what changed between two snapshots of `src` into `dst`, as
    /// the source and the target of a migration do.
    fn copy(
        src: &Tree,
        dst: &Tree,
        applied: &mut Applied,
        before: &Snapshot,
        now: &Snapshot,
    ) -> u64 {
        let mut bytes = 0;
        for rel in changed_files(before, now) {
            let (f, st) = src.open_regular(rel).expect("open").expect("file");
            let out = dst.begin_file(rel, st.st_size as u64).expect("begin");
            applied.touch(rel);
            for (off, len) in tree::data_extents(&f, st.st_size as u64).expect("extents") {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, off).expect("read");
                out.write_all_at(&buf, off).expect("write");
                bytes += len;
            }
        }
        check_manifest(now).expect("manifest");
        applied.apply(dst, now.clone()).expect("apply");
        bytes
    }

    #[test]
    fn tree_round_trip_with_changes_removals_links_and_special_files() {
        let s = tempfile::tempdir().expect("tmp");
        let d = tempfile::tempdir().expect("tmp");
        let (src, dst) = (
            Tree::open(s.path()).expect("t"),
            Tree::open(d.path()).expect("t"),
        );
        let sp = s.path();
        fs::create_dir_all(sp.join("a/b")).expect("mkdir");
        fs::write(sp.join("a/b/f"), "one").expect("w");
        fs::write(sp.join("gone"), "x").expect("w");
        fs::hard_link(sp.join("a/b/f"), sp.join("a/hard")).expect("link");
        std::os::unix::fs::symlink("a/b/f", sp.join("link")).expect("ln");
        nix::unistd::mkfifo(
            &sp.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .expect("fifo");
        let mut applied = Applied::default();
        let s0 = snapshot(&src).expect("snap");
        assert_eq!(s0["a/hard"].kind, Kind::HardLink("a/b/f".into()));
        copy(&src, &dst, &mut applied, &Snapshot::new(), &s0);
        let dp = d.path();
        assert_eq!(fs::read_to_string(dp.join("link")).expect("r"), "one");
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert_eq!(
            fs::metadata(dp.join("a/hard")).expect("s").ino(),
            fs::metadata(dp.join("a/b/f")).expect("s").ino()
        );
        let fifo = fs::symlink_metadata(dp.join("fifo")).expect("s");
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o777, 0o640);
        // Round 1: a changed file, a removal, a directory replaced by a link.
        fs::write(sp.join("a/b/f"), "two!").expect("w");
        fs::remove_file(sp.join("gone")).expect("rm");
        fs::remove_dir_all(sp.join("a/b")).expect("rm");
        fs::create_dir(sp.join("c")).expect("mkdir");
        fs::write(sp.join("c/f"), "three").expect("w");
        std::os::unix::fs::symlink("../c", sp.join("a/b")).expect("ln");
        let s1 = snapshot(&src).expect("snap");
        let changed = changed_files(&s0, &s1);
        assert_eq!(changed, vec!["a/hard", "c/f"]);
        copy(&src, &dst, &mut applied, &s0, &s1);
        assert_eq!(fs::read_to_string(dp.join("a/hard")).expect("r"), "two!");
        assert!(fs::symlink_metadata(dp.join("a/b"))
            .expect("s")
            .file_type()
            .is_symlink());
        assert!(!dp.join("gone").exists());
        assert_eq!(fs::read_to_string(dp.join("a/b/f")).expect("r"), "three");
        assert_eq!(
            fs::metadata(dp.join("c")).expect("s").mtime(),
            fs::metadata(sp.join("c")).expect("s").mtime()
        );
    }

    #[test]
    fn bad_manifests_are_refused() {
        let entry = |kind| Entry {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: (0, 0),
            ino: 1,
            opaque: false,
            blocks: 0,
        };
        let mut m = Snapshot::new();
        m.insert("a/f".into(), entry(Kind::File));
        assert!(
            check_manifest(&m).is_err(),
            "file under a missing directory"
        );
        m.insert("a".into(), entry(Kind::Symlink("/etc".into())));
        assert!(check_manifest(&m).is_err(), "file under a link");
        m.insert("a".into(), entry(Kind::Dir));
        check_manifest(&m).expect("fine");
        m.insert("a/z".into(), entry(Kind::HardLink("/etc/shadow".into())));
        assert!(check_manifest(&m).is_err(), "link out of the tree");
        m.insert("a/z".into(), entry(Kind::HardLink("a/f".into())));
        check_manifest(&m).expect("fine");
        m.insert("../x".into(), entry(Kind::File));
        assert!(check_manifest(&m).is_err(), "escape");
    }
}
