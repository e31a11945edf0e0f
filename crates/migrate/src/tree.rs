//! Confined access to a container's file tree.
//!
//! migrun reads and writes container trees as root on both hosts, and the
//! container controls every file in its tree: it may swap any directory for
//! a symbolic link to a host path, or a file for a FIFO, at any moment
//! between two of our system calls. So nothing here takes a path through
//! the host's normal resolution. A [`Tree`] holds a descriptor of the
//! tree's root, and every operation:
//! - resolves the directory part of a relative path from that descriptor
//!   with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`: no component may be a
//!   symbolic link or leave the tree, whatever the container swaps;
//! - acts on the last component with an `*at` call on that directory's
//!   descriptor that never follows it (`AT_SYMLINK_NOFOLLOW`,
//!   `O_NOFOLLOW`), or through a descriptor opened with `O_PATH` whose type
//!   was checked (a FIFO or a device is never opened for reading or
//!   writing).
//!
//! Symbolic links are created as links, never followed. Paths are checked
//! relative paths ([`check_rel`]); names that are not UTF-8 travel escaped
//! ([`encode_name`]).
//!
//! The kernel's `openat2` (Linux 5.6) does the confinement. We do not use
//! the `pathrs` crate: its resolver follows links inside the root
//! (`RESOLVE_IN_ROOT` semantics) where we must refuse them, it creates
//! files only with `O_EXCL`, and it has no socket inodes, extended
//! attributes or descriptor-based metadata, which the sync needs; each of
//! our operations is one `openat2` plus one `*at` call.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Errors of confined file access, one line each.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A relative path that could leave the tree or is not a path at all.
    #[error("unsafe path {0:?}")]
    BadPath(String),
    /// A system call failed on a path of the tree.
    #[error("{op} {path}: {errno}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The tree's root and the relative path.
        path: String,
        /// The error.
        errno: Errno,
    },
}

impl TreeError {
    /// The system error, if it is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            TreeError::Sys { errno, .. } => Some(*errno),
            TreeError::BadPath(_) => None,
        }
    }

    /// Whether the path (or one of its directories) does not exist as a
    /// directory any more: gone, or replaced by a link or a non-directory.
    pub fn is_gone(&self) -> bool {
        matches!(
            self.errno(),
            Some(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV)
        )
    }
}

/// Result of confined file access.
pub type Result<T> = std::result::Result<T, TreeError>;

/// The longest path handed to one `openat2` (the kernel refuses more than
/// `PATH_MAX`); longer ones are resolved in pieces.
const RESOLVE_CHUNK: usize = 3072;

/// Escapes a file name for the wire and manifests: UTF-8 stays as it is,
/// but `%` becomes `%25` and every byte that is not part of valid UTF-8
/// becomes `%XX`. [`decode_name`] reverses it exactly.
pub fn encode_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode_name`] for one component; `None` if it is malformed.
pub fn decode_name(name: &str) -> Option<Vec<u8>> {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Checks a relative path from the source, a manifest or the wire, and
/// returns its components as the raw names they stand for: not empty, no
/// leading `/`, no empty, `.` or `..` component, no NUL or `/` inside a
/// decoded name, no name over 255 bytes.
pub fn check_rel(rel: &str) -> Result<Vec<CString>> {
    let bad = || TreeError::BadPath(rel.chars().take(200).collect());
    if rel.is_empty() || rel.starts_with('/') {
        return Err(bad());
    }
    let mut out = Vec::new();
    for c in rel.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(bad());
        }
        let raw = decode_name(c).ok_or_else(bad)?;
        if raw.is_empty() || raw.len() > 255 || raw.contains(&b'/') || raw == b"." || raw == b".." {
            return Err(bad());
        }
        out.push(CString::new(raw).map_err(|_| bad())?);
    }
    Ok(out)
}

/// The parent of a checked relative path (`""` for a top-level entry).
pub fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map_or("", |(p, _)| p)
}

/// Joins a relative directory path and an encoded name.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The kinds of inode a tree holds, from `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// A socket inode.
    Socket,
}

impl InodeKind {
    /// The kind of a `stat`.
    pub fn of(st: &FileStat) -> Option<InodeKind> {
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Some(InodeKind::Dir),
            libc::S_IFREG => Some(InodeKind::File),
            libc::S_IFLNK => Some(InodeKind::Symlink),
            libc::S_IFCHR => Some(InodeKind::Char),
            libc::S_IFBLK => Some(InodeKind::Block),
            libc::S_IFIFO => Some(InodeKind::Fifo),
            libc::S_IFSOCK => Some(InodeKind::Socket),
            _ => None,
        }
    }
}

/// An inode to create with [`Tree::make`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with these permission bits.
    Dir(u32),
    /// A symbolic link to this target (never resolved by us).
    Symlink(Vec<u8>),
    /// A named pipe.
    Fifo,
    /// A socket inode (no one listens on it).
    Socket,
    /// A character device with this device number.
    Char(u64),
    /// A block device with this device number.
    Block(u64),
    /// A hard link to this other regular file of the tree.
    HardLink(String),
}

/// One entry of a directory listing.
#[derive(Debug)]
pub struct Listed {
    /// The name, encoded ([`encode_name`]).
    pub name: String,
    /// Its `lstat`.
    pub stat: FileStat,
}

/// A directory tree that every operation stays inside of.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    shown: PathBuf,
    dev: u64,
}

fn sys(op: &'static str, path: String) -> impl FnOnce(Errno) -> TreeError {
    move |errno| TreeError::Sys { op, path, errno }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open call and nothing
    // else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The flags every confined resolution uses.
fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

impl Tree {
    /// Opens the existing directory `path` as a tree. `path` itself is
    /// ours (a bundle, an upper directory Docker named, a work
    /// directory), not the container's.
    pub fn open(path: &Path) -> Result<Tree> {
        let shown = path.to_path_buf();
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys("open", shown.display().to_string()))?;
        let root = owned(fd);
        let st = nix::sys::stat::fstat(root.as_raw_fd())
            .map_err(sys("stat", shown.display().to_string()))?;
        Ok(Tree {
            root,
            shown,
            dev: st.st_dev,
        })
    }

    /// Creates the directory `path` (and its parents) if needed, and opens it.
    pub fn create(path: &Path) -> Result<Tree> {
        std::fs::create_dir_all(path).map_err(|e| TreeError::Sys {
            op: "create",
            path: path.display().to_string(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        Tree::open(path)
    }

    /// Where the tree is on this host (for messages).
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// `root/rel`, for messages.
    pub fn show(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.shown.display().to_string()
        } else {
            format!("{}/{rel}", self.shown.display())
        }
    }

    /// Resolves the directory `rel` (`""`: the root) with `openat2`, in
    /// pieces when it is long; no component may be a link or another
    /// mount. `flags` are the open flags of the last piece.
    fn resolve_dir(&self, rel: &str, flags: OFlag) -> Result<OwnedFd> {
        let how = |f: OFlag| {
            OpenHow::new()
                .flags(f | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                .resolve(resolve_flags())
        };
        if rel.is_empty() {
            let fd = nix::fcntl::openat2(self.root.as_raw_fd(), ".", how(flags))
                .map_err(sys("open", self.show(rel)))?;
            return Ok(owned(fd));
        }
        let names = check_rel(rel)?;
        let mut cur: Option<OwnedFd> = None;
        let mut piece: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < names.len() {
            piece.clear();
            while i < names.len() && (piece.is_empty() || piece.len() < RESOLVE_CHUNK) {
                if !piece.is_empty() {
                    piece.push(b'/');
                }
                piece.extend_from_slice(names[i].as_bytes());
                i += 1;
            }
            let last = i == names.len();
            let f = if last { flags } else { OFlag::O_PATH };
            let at = cur
                .as_ref()
                .map_or(self.root.as_raw_fd(), |c| c.as_raw_fd());
            let fd = nix::fcntl::openat2(at, OsStr::from_bytes(&piece), how(f))
                .map_err(sys("open", self.show(rel)))?;
            cur = Some(owned(fd));
        }
        cur.ok_or_else(|| TreeError::BadPath(rel.to_string()))
    }

    /// The directory `rel` opened for listing.
    fn open_dir(&self, rel: &str) -> Result<OwnedFd> {
        self.resolve_dir(rel, OFlag::O_RDONLY)
    }

    /// The parent directory of `rel` (an `O_PATH` descriptor) and the last
    /// component's raw name.
    pub fn parent(&self, rel: &str) -> Result<(OwnedFd, CString)> {
        let mut names = check_rel(rel)?;
        let name = names
            .pop()
            .ok_or_else(|| TreeError::BadPath(rel.to_string()))?;
        let fd = self.resolve_dir(parent_of(rel), OFlag::O_PATH)?;
        Ok((fd, name))
    }

    /// Like [`Tree::parent`], but makes missing directories on the way
    /// (mode 0755 until a manifest says otherwise), and replaces whatever
    /// is in their place (a link, a file) by a directory: the source says
    /// a directory is there. Never follows a link.
    pub fn parent_or_create(&self, rel: &str) -> Result<(OwnedFd, CString)> {
        match self.parent(rel) {
            Ok(p) => return Ok(p),
            Err(e) if e.is_gone() => {}
            Err(e) => return Err(e),
        }
        let mut names = check_rel(rel)?;
        let name = names
            .pop()
            .ok_or_else(|| TreeError::BadPath(rel.to_string()))?;
        let mut cur =
            owned(nix::unistd::dup(self.root.as_raw_fd()).map_err(sys("dup", self.show("")))?);
        for (i, n) in names.iter().enumerate() {
            let shown = || {
                self.show(
                    &names[..=i]
                        .iter()
                        .map(|c| encode_name(c.as_bytes()))
                        .collect::<Vec<_>>()
                        .join("/"),
                )
            };
            let open = |at: RawFd| {
                nix::fcntl::openat(
                    Some(at),
                    n.as_c_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
            };
            let fd = match open(cur.as_raw_fd()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    mkdir_or_exists(cur.as_raw_fd(), n).map_err(sys("mkdir", shown()))?;
                    open(cur.as_raw_fd()).map_err(sys("open", shown()))?
                }
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    remove_at(cur.as_raw_fd(), n, &shown())?;
                    mkdir_or_exists(cur.as_raw_fd(), n).map_err(sys("mkdir", shown()))?;
                    open(cur.as_raw_fd()).map_err(sys("open", shown()))?
                }
                Err(e) => return Err(sys("open", shown())(e)),
            };
            cur = owned(fd);
        }
        Ok((cur, name))
    }

    /// `lstat` of `rel`; `None` if it does not exist (or a directory on
    /// the way is gone or was replaced).
    pub fn stat(&self, rel: &str) -> Result<Option<FileStat>> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.is_gone() => return Ok(None),
            Err(e) => return Err(e),
        };
        stat_at(dir.as_raw_fd(), &name, &self.show(rel))
    }

    /// Lists the directory `rel` (`""`: the root): each entry with its
    /// `lstat`, and whether `rel` carries overlayfs's opaque mark. Entries
    /// on another file system (a mount point inside the tree) and entries
    /// that vanish while we look are left out.
    pub fn list(&self, rel: &str) -> Result<(Vec<Listed>, bool)> {
        let fd = self.open_dir(rel)?;
        let opaque = get_opaque(fd.as_raw_fd());
        let dup = nix::unistd::dup(fd.as_raw_fd()).map_err(sys("dup", self.show(rel)))?;
        let mut dir = nix::dir::Dir::from_fd(dup).map_err(sys("read", self.show(rel)))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(sys("read", self.show(rel)))?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let Some(stat) = stat_at(fd.as_raw_fd(), name, &self.show(rel))? else {
                continue;
            };
            // Another file system mounted inside the tree is not the
            // container's tree (st_dev alone cannot tell: an overlay's
            // files carry their layer's device).
            if stat.st_dev != self.dev && is_mount_root(fd.as_raw_fd(), name) {
                continue;
            }
            out.push(Listed {
                name: encode_name(name.to_bytes()),
                stat,
            });
        }
        Ok((out, opaque))
    }

    /// The target of the link `rel`.
    pub fn readlink(&self, rel: &str) -> Result<Vec<u8>> {
        let (dir, name) = self.parent(rel)?;
        nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name.as_c_str())
            .map(|t| t.as_bytes().to_vec())
            .map_err(sys("readlink", self.show(rel)))
    }

    /// Opens the regular file `rel` for reading, with its `fstat`; `None`
    /// when it is not a regular file any more, or gone. The file is first
    /// opened with `O_PATH` (no side effect whatever it is), its type
    /// checked, and only then reopened for reading through that very
    /// descriptor: a FIFO or a device swapped in is never opened.
    pub fn open_regular(&self, rel: &str) -> Result<Option<(File, FileStat)>> {
        let names = check_rel(rel)?;
        let opened = if rel.len() <= RESOLVE_CHUNK {
            // One openat2 for the whole path; a link as the last component
            // fails like one on the way (RESOLVE_NO_SYMLINKS).
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(resolve_flags());
            let raw: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
            nix::fcntl::openat2(
                self.root.as_raw_fd(),
                OsStr::from_bytes(&raw.join(&b'/')),
                how,
            )
        } else {
            match self.parent(rel) {
                Ok((dir, name)) => nix::fcntl::openat(
                    Some(dir.as_raw_fd()),
                    name.as_c_str(),
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ),
                Err(e) => Err(e.errno().unwrap_or(Errno::EINVAL)),
            }
        };
        let fd = match opened {
            Ok(fd) => owned(fd),
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => return Ok(None),
            Err(e) => return Err(sys("open", self.show(rel))(e)),
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(sys("stat", self.show(rel)))?;
        if InodeKind::of(&st) != Some(InodeKind::File) {
            return Ok(None);
        }
        let file = reopen(&fd, OFlag::O_RDONLY | OFlag::O_NOATIME)
            .or_else(|_| reopen(&fd, OFlag::O_RDONLY))
            .map_err(sys("open", self.show(rel)))?;
        Ok(Some((file, st)))
    }

    /// Starts the regular file `rel` afresh, `size` bytes long and all hole:
    /// whatever was at `rel` goes (a new inode, so no hard link of the old
    /// one changes), and the directories on the way are made. Returns the
    /// file, open for writing.
    pub fn begin_file(&self, rel: &str, size: u64) -> Result<File> {
        let (dir, name) = self.parent_or_create(rel)?;
        let shown = self.show(rel);
        if stat_at(dir.as_raw_fd(), &name, &shown)?.is_some() {
            remove_at(dir.as_raw_fd(), &name, &shown)?;
        }
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(sys("create", shown.clone()))?;
        let file = File::from(owned(fd));
        file.set_len(size).map_err(|e| TreeError::Sys {
            op: "truncate",
            path: shown,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        Ok(file)
    }

    /// Makes `node` at `rel`, replacing whatever is there unless it already
    /// is that node (same kind, device number, link target or inode);
    /// returns whether anything changed.
    pub fn make(&self, rel: &str, node: &Node) -> Result<bool> {
        let (dir, name) = self.parent_or_create(rel)?;
        let d = dir.as_raw_fd();
        let shown = self.show(rel);
        let have = stat_at(d, &name, &shown)?;
        let wanted_link = match node {
            Node::HardLink(leader) => {
                let (ldir, lname) = self.parent(leader)?;
                let lst =
                    stat_at(ldir.as_raw_fd(), &lname, &self.show(leader))?.ok_or_else(|| {
                        TreeError::Sys {
                            op: "link to",
                            path: self.show(leader),
                            errno: Errno::ENOENT,
                        }
                    })?;
                if InodeKind::of(&lst) != Some(InodeKind::File) {
                    return Err(TreeError::Sys {
                        op: "link to",
                        path: self.show(leader),
                        errno: Errno::EINVAL,
                    });
                }
                Some((ldir, lname, lst))
            }
            _ => None,
        };
        if let Some(st) = &have {
            let same = match (node, InodeKind::of(st)) {
                (Node::Dir(_), Some(InodeKind::Dir)) => true,
                (Node::Fifo, Some(InodeKind::Fifo)) => true,
                (Node::Socket, Some(InodeKind::Socket)) => true,
                (Node::Char(r), Some(InodeKind::Char)) => st.st_rdev == *r,
                (Node::Block(r), Some(InodeKind::Block)) => st.st_rdev == *r,
                (Node::Symlink(t), Some(InodeKind::Symlink)) => {
                    nix::fcntl::readlinkat(Some(d), name.as_c_str())
                        .map(|cur| cur.as_bytes() == t.as_slice())
                        .unwrap_or(false)
                }
                (Node::HardLink(_), Some(InodeKind::File)) => wanted_link
                    .as_ref()
                    .is_some_and(|(_, _, l)| l.st_ino == st.st_ino && l.st_dev == st.st_dev),
                _ => false,
            };
            if same {
                return Ok(false);
            }
            remove_at(d, &name, &shown)?;
        }
        let n = name.as_c_str();
        let made = match node {
            Node::Dir(mode) => {
                nix::sys::stat::mkdirat(Some(d), n, Mode::from_bits_truncate(*mode & 0o777 | 0o700))
            }
            Node::Symlink(t) => nix::unistd::symlinkat(OsStr::from_bytes(t), Some(d), n),
            Node::Fifo => nix::unistd::mkfifoat(Some(d), n, Mode::from_bits_truncate(0o600)),
            Node::Socket => mknod_at(d, n, SFlag::S_IFSOCK, 0),
            Node::Char(r) => mknod_at(d, n, SFlag::S_IFCHR, *r),
            Node::Block(r) => mknod_at(d, n, SFlag::S_IFBLK, *r),
            Node::HardLink(_) => match &wanted_link {
                // linkat without AT_SYMLINK_FOLLOW: the leader, a regular
                // file, is linked as it is.
                Some((ldir, lname, _)) => nix::unistd::linkat(
                    Some(ldir.as_raw_fd()),
                    lname.as_c_str(),
                    Some(d),
                    n,
                    AtFlags::empty(),
                ),
                None => Err(Errno::EINVAL),
            },
        };
        made.map_err(sys("create", shown))?;
        Ok(true)
    }

    /// Sets owner, permission bits and modification time of `rel` without
    /// following it; `dir` caches the last parent looked up (entries come
    /// in sorted order, so siblings follow each other).
    pub fn set_meta(
        &self,
        rel: &str,
        uid: u32,
        gid: u32,
        mode: u32,
        mtime: (i64, i64),
        dir: &mut Option<(String, OwnedFd)>,
    ) -> Result<()> {
        let parent = parent_of(rel);
        if dir.as_ref().map(|(p, _)| p.as_str()) != Some(parent) {
            *dir = Some((parent.to_string(), self.resolve_dir(parent, OFlag::O_PATH)?));
        }
        let Some((_, pfd)) = dir.as_ref() else {
            return Err(TreeError::BadPath(rel.to_string()));
        };
        let d = pfd.as_raw_fd();
        let names = check_rel(rel)?;
        let Some(name) = names.last() else {
            return Err(TreeError::BadPath(rel.to_string()));
        };
        let shown = || self.show(rel);
        nix::unistd::fchownat(
            Some(d),
            name.as_c_str(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(sys("chown", shown()))?;
        // After chown, which clears set-id bits. Links have no mode of
        // their own: fchmodat2 refuses them (EOPNOTSUPP), and that is fine.
        match fchmodat2_nofollow(d, name, mode & 0o7777) {
            Ok(()) | Err(Errno::EOPNOTSUPP) => return self.set_time(d, name, mtime, rel),
            Err(Errno::ENOSYS) => {}
            Err(e) => return Err(sys("chmod", shown())(e)),
        }
        // Before Linux 6.6 chmod has no "do not follow": go through an
        // O_PATH descriptor of the inode itself, checked not to be a link.
        let fd = owned(
            nix::fcntl::openat(
                Some(d),
                name.as_c_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys("open", shown()))?,
        );
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(sys("stat", shown()))?;
        if InodeKind::of(&st) != Some(InodeKind::Symlink) {
            let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
            nix::sys::stat::fchmodat(
                None,
                proc.as_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(sys("chmod", shown()))?;
        }
        self.set_time(d, name, mtime, rel)
    }

    /// Sets the times of `name` in `dir` without following it.
    fn set_time(&self, dir: RawFd, name: &CStr, mtime: (i64, i64), rel: &str) -> Result<()> {
        let ts = nix::sys::time::TimeSpec::new(mtime.0, mtime.1);
        nix::sys::stat::utimensat(
            Some(dir),
            name,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(sys("set times of", self.show(rel)))
    }

    /// Marks the directory `rel` opaque for overlayfs, or clears the mark.
    pub fn set_opaque(&self, rel: &str, opaque: bool) -> Result<()> {
        let fd = self.open_dir(rel)?;
        if get_opaque(fd.as_raw_fd()) == opaque {
            return Ok(());
        }
        // SAFETY: a valid descriptor, NUL-terminated name, and a one-byte
        // value of the given length.
        let r = unsafe {
            if opaque {
                libc::fsetxattr(
                    fd.as_raw_fd(),
                    OPAQUE_XATTR.as_ptr(),
                    b"y".as_ptr().cast(),
                    1,
                    0,
                )
            } else {
                libc::fremovexattr(fd.as_raw_fd(), OPAQUE_XATTR.as_ptr())
            }
        };
        if r == 0 {
            Ok(())
        } else {
            Err(sys("mark opaque", self.show(rel))(Errno::last()))
        }
    }

    /// Removes `rel` and, for a directory, everything under it; nothing if
    /// it does not exist. Never follows a link.
    pub fn remove_all(&self, rel: &str) -> Result<()> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.is_gone() => return Ok(()),
            Err(e) => return Err(e),
        };
        if stat_at(dir.as_raw_fd(), &name, &self.show(rel))?.is_none() {
            return Ok(());
        }
        remove_at(dir.as_raw_fd(), &name, &self.show(rel))
    }
}

/// The xattr overlayfs marks an opaque directory with.
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

/// Whether the directory open at `fd` carries overlayfs's opaque mark.
fn get_opaque(fd: RawFd) -> bool {
    let mut v = [0u8; 2];
    // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of the
    // given size.
    let n = unsafe { libc::fgetxattr(fd, OPAQUE_XATTR.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    n == 1 && v[0] == b'y'
}

/// `fchmodat2(dir, name, mode, AT_SYMLINK_NOFOLLOW)` (Linux 6.6): ENOSYS
/// before, EOPNOTSUPP for a link.
fn fchmodat2_nofollow(dir: RawFd, name: &CStr, mode: u32) -> nix::Result<()> {
    // SAFETY: a valid descriptor and NUL-terminated name; the kernel reads
    // nothing else.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir,
            name.as_ptr(),
            mode as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    Errno::result(r).map(drop)
}

/// Whether `name` in `dir` is the root of a mount (statx's
/// `STATX_ATTR_MOUNT_ROOT`, Linux 5.8); when the kernel cannot tell, a
/// device different from its directory's is taken as one.
fn is_mount_root(dir: RawFd, name: &CStr) -> bool {
    // SAFETY: statx is plain data, valid when zeroed.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of the
    // right type.
    let r = unsafe {
        libc::statx(
            dir,
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC,
            0,
            &mut stx,
        )
    };
    let attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    r != 0 || stx.stx_attributes_mask & attr == 0 || stx.stx_attributes & attr != 0
}

/// `lstat` of `name` in the directory `dir`; `None` if it does not exist.
fn stat_at(dir: RawFd, name: &CStr, shown: &str) -> Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(sys("stat", shown.to_string())(e)),
    }
}

fn mkdir_or_exists(dir: RawFd, name: &CStr) -> nix::Result<()> {
    match nix::sys::stat::mkdirat(Some(dir), name, Mode::from_bits_truncate(0o755)) {
        Err(Errno::EEXIST) => Ok(()),
        other => other,
    }
}

fn mknod_at(dir: RawFd, name: &CStr, kind: SFlag, rdev: u64) -> nix::Result<()> {
    nix::sys::stat::mknodat(Some(dir), name, kind, Mode::from_bits_truncate(0o600), rdev)
}

/// Reopens the inode behind the `O_PATH` descriptor `fd` with `flags`
/// (through its /proc/self/fd entry, which names that inode and nothing
/// else).
fn reopen(fd: &OwnedFd, flags: OFlag) -> nix::Result<File> {
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::fcntl::open(proc.as_str(), flags | OFlag::O_CLOEXEC, Mode::empty())
        .map(|f| File::from(owned(f)))
}

/// Removes `name` in `dir`, a whole directory tree if it is one, without
/// ever following a link. Deep trees are taken apart level by level with
/// one descriptor per level of the current path.
fn remove_at(dir: RawFd, name: &CStr, shown: &str) -> Result<()> {
    match nix::unistd::unlinkat(Some(dir), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(sys("remove", shown.to_string())(e)),
    }
    // A directory: empty it, one level at a time.
    let open = |at: RawFd, n: &CStr| {
        nix::fcntl::openat(
            Some(at),
            n,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(owned)
    };
    // Stack of open directories below `dir`, with their names in their parents.
    let mut stack: Vec<(OwnedFd, CString)> = vec![(
        open(dir, name).map_err(sys("open", shown.to_string()))?,
        name.to_owned(),
    )];
    while let Some((fd, _)) = stack.last() {
        let raw = fd.as_raw_fd();
        let dup = nix::unistd::dup(raw).map_err(sys("dup", shown.to_string()))?;
        let mut d = nix::dir::Dir::from_fd(dup).map_err(sys("read", shown.to_string()))?;
        let mut subdir = None;
        for entry in d.iter() {
            let entry = entry.map_err(sys("read", shown.to_string()))?;
            let n = entry.file_name();
            if n.to_bytes() == b"." || n.to_bytes() == b".." {
                continue;
            }
            match nix::unistd::unlinkat(Some(raw), n, nix::unistd::UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::EISDIR) => {
                    subdir = Some(n.to_owned());
                    break;
                }
                Err(e) => return Err(sys("remove", shown.to_string())(e)),
            }
        }
        match subdir {
            Some(n) => {
                let fd = open(raw, &n).map_err(sys("open", shown.to_string()))?;
                stack.push((fd, n));
            }
            None => {
                // Empty now: remove it from its parent.
                let Some((_, n)) = stack.pop() else { break };
                let parent = stack.last().map_or(dir, |(f, _)| f.as_raw_fd());
                match nix::unistd::unlinkat(
                    Some(parent),
                    n.as_c_str(),
                    nix::unistd::UnlinkatFlags::RemoveDir,
                ) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(sys("remove", shown.to_string())(e)),
                }
            }
        }
    }
    Ok(())
}

/// The data ranges (offset, length) of `file` up to `size`, from
/// `SEEK_DATA`/`SEEK_HOLE`: holes are left out, so a sparse file costs
/// what it holds. A file system without hole support reports one range.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(fd, pos as libc::off_t, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, start as libc::off_t, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        out.push((start, end - start));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::FileExt;

    #[test]
    fn names_round_trip_through_the_escape() {
        for raw in [
            b"plain".to_vec(),
            b"100%".to_vec(),
            b"%41".to_vec(),
            vec![0xff, b'a', 0xc3],
            "h\u{e9}llo".as_bytes().to_vec(),
        ] {
            let enc = encode_name(&raw);
            assert_eq!(decode_name(&enc).as_deref(), Some(raw.as_slice()), "{enc}");
        }
        assert_eq!(encode_name(b"%41"), "%2541");
        for bad in [
            "", "/abs", "a//b", "a/../b", "..", "a/.", "a/%2F", "a/%00", "%zz", "%4",
        ] {
            assert!(check_rel(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_rel("a/b%2Ec").expect("ok").len(), 2);
    }

    #[test]
    fn writes_never_go_through_a_link_in_the_way() {
        let host = tempfile::tempdir().expect("tmp");
        let root = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(host.path(), root.path().join("d")).expect("ln");
        let t = Tree::open(root.path()).expect("tree");
        let f = t.begin_file("d/f", 3).expect("begin");
        f.write_all_at(b"abc", 0).expect("write");
        // The link was replaced by a directory; the host directory is untouched.
        assert!(fs::read_dir(host.path()).expect("ls").next().is_none());
        assert!(root.path().join("d").is_dir());
        assert_eq!(fs::read(root.path().join("d/f")).expect("r"), b"abc");
        // A link as the last component is replaced, not written through.
        let target = host.path().join("victim");
        fs::write(&target, "keep").expect("w");
        std::os::unix::fs::symlink(&target, root.path().join("l")).expect("ln");
        t.begin_file("l", 0).expect("begin");
        assert_eq!(fs::read_to_string(&target).expect("r"), "keep");
        assert!(!fs::symlink_metadata(root.path().join("l"))
            .expect("stat")
            .file_type()
            .is_symlink());
        // Metadata is never set through a link either.
        std::os::unix::fs::symlink(&target, root.path().join("l2")).expect("ln");
        let mut cache = None;
        t.set_meta("l2", 0, 0, 0o777, (1, 0), &mut cache)
            .expect("meta");
        use std::os::unix::fs::PermissionsExt;
        assert_ne!(
            fs::metadata(&target).expect("stat").permissions().mode() & 0o777,
            0o777
        );
        // Removal does not follow a link into the host.
        t.remove_all("l2").expect("rm");
        assert!(target.exists());
        std::os::unix::fs::symlink(host.path(), root.path().join("dl")).expect("ln");
        t.remove_all("dl").expect("rm");
        assert!(target.exists());
        assert!(t.stat("../x").is_err());
    }

    #[test]
    fn reads_never_follow_a_link_and_never_open_a_fifo() {
        let host = tempfile::tempdir().expect("tmp");
        let root = tempfile::tempdir().expect("tmp");
        fs::write(host.path().join("secret"), "token").expect("w");
        std::os::unix::fs::symlink(host.path().join("secret"), root.path().join("f")).expect("ln");
        std::os::unix::fs::symlink(host.path(), root.path().join("d")).expect("ln");
        nix::unistd::mkfifo(&root.path().join("p"), Mode::from_bits_truncate(0o600)).expect("fifo");
        let t = Tree::open(root.path()).expect("tree");
        assert!(t.open_regular("f").expect("open").is_none());
        assert!(t.open_regular("d/secret").expect("open").is_none());
        // Would block forever if it opened the FIFO for reading.
        assert!(t.open_regular("p").expect("open").is_none());
        assert!(t.list("d").is_err());
        fs::write(root.path().join("real"), "data").expect("w");
        let (mut f, st) = t.open_regular("real").expect("open").expect("file");
        assert_eq!(st.st_size, 4);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).expect("read");
        assert_eq!(s, "data");
    }

    #[test]
    fn special_nodes_hard_links_and_deep_removal() {
        let root = tempfile::tempdir().expect("tmp");
        let t = Tree::open(root.path()).expect("tree");
        assert!(t.make("a/fifo", &Node::Fifo).expect("fifo"));
        assert!(!t.make("a/fifo", &Node::Fifo).expect("again"));
        t.make("a/sock", &Node::Socket).expect("sock");
        let rdev = nix::sys::stat::makedev(1, 3);
        t.make("a/null", &Node::Char(rdev)).expect("char");
        let st = t.stat("a/null").expect("stat").expect("there");
        assert_eq!(InodeKind::of(&st), Some(InodeKind::Char));
        assert_eq!(st.st_rdev, rdev);
        assert_eq!(
            InodeKind::of(&t.stat("a/sock").expect("s").expect("x")),
            Some(InodeKind::Socket)
        );
        t.begin_file("a/f", 0).expect("file");
        t.make("b/link", &Node::HardLink("a/f".into()))
            .expect("link");
        let (a, b) = (
            t.stat("a/f").expect("s").expect("x"),
            t.stat("b/link").expect("s").expect("x"),
        );
        assert_eq!(a.st_ino, b.st_ino);
        assert!(!t
            .make("b/link", &Node::HardLink("a/f".into()))
            .expect("again"));
        // A directory chain deeper than PATH_MAX in one piece.
        let deep: Vec<String> = (0..300).map(|i| format!("directory{i:04}")).collect();
        let rel = deep.join("/");
        assert!(rel.len() > 4096);
        t.begin_file(&format!("{rel}/leaf"), 0).expect("deep file");
        assert!(t.stat(&format!("{rel}/leaf")).expect("s").is_some());
        t.remove_all(&deep[0]).expect("rm deep");
        assert!(t.stat(&deep[0]).expect("s").is_none());
    }

    /// Mounts a tmpfs at `at` (unmounted when the guard drops).
    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    fn mount(source: &str, fstype: &str, at: &Path, data: Option<&str>) -> Mounted {
        nix::mount::mount(
            Some(source),
            at,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            data,
        )
        .expect("mount (the unit tests run as root)");
        Mounted(at.to_path_buf())
    }

    #[test]
    fn mounts_inside_are_left_out_but_an_overlays_files_are_not() {
        let root = tempfile::tempdir().expect("tmp");
        fs::create_dir(root.path().join("m")).expect("mkdir");
        fs::write(root.path().join("f"), "x").expect("w");
        let _m = mount("tmpfs", "tmpfs", &root.path().join("m"), None);
        fs::write(root.path().join("m/inside"), "host").expect("w");
        let t = Tree::open(root.path()).expect("tree");
        let (names, _) = t.list("").expect("list");
        let names: Vec<&str> = names.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, vec!["f"]);
        assert!(t.open_regular("m/inside").expect("open").is_none());
        // A merged overlay: the lower layer's files carry the lower file
        // system's device, and are the tree's all the same.
        let base = tempfile::tempdir().expect("tmp");
        let (lower, upper, work, merged) = (
            base.path().join("l"),
            base.path().join("u"),
            base.path().join("w"),
            base.path().join("m"),
        );
        for d in [&lower, &upper, &work, &merged] {
            fs::create_dir(d).expect("mkdir");
        }
        let _l = mount("tmpfs", "tmpfs", &lower, None);
        fs::write(lower.join("from-lower"), "l").expect("w");
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let _o = mount("overlay", "overlay", &merged, Some(&data));
        fs::write(merged.join("from-upper"), "u").expect("w");
        let t = Tree::open(&merged).expect("tree");
        let (names, _) = t.list("").expect("list");
        let mut names: Vec<&str> = names.iter().map(|l| l.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["from-lower", "from-upper"]);
    }

    #[test]
    fn sparse_files_report_only_their_data() {
        let root = tempfile::tempdir().expect("tmp");
        let t = Tree::open(root.path()).expect("tree");
        let size = 1u64 << 30;
        let f = t.begin_file("sparse", size).expect("begin");
        f.write_all_at(&[7u8; 8192], 512 << 20).expect("w");
        f.sync_all().expect("sync");
        let (f, st) = t.open_regular("sparse").expect("open").expect("file");
        let ext = data_extents(&f, st.st_size as u64).expect("extents");
        let total: u64 = ext.iter().map(|(_, l)| l).sum();
        assert!(total < 1 << 20, "{ext:?}");
        assert!(ext
            .iter()
            .any(|(o, _)| *o <= 512 << 20 && 512 << 20 < o + total));
    }
}
