//! The target's reading of the protocol: which message it takes in which
//! phase ([`Phase`]), and where the file trees (the root filesystem, image
//! layers) and a Docker image that arrive go ([`Trees`]).
//!
//! The source may be buggy: it may send anything in any order. A message
//! out of its phase, a file chunk that does not follow its file's start or
//! lies outside the file, a tree the target did not ask for, a manifest
//! that does not describe a tree: each ends the migration with a one-line
//! protocol error, and the caller rolls back.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use migrun_wire::{Message, TreeId};

use crate::layers::LayerStore;
use crate::rootfs::{self, Applied, Snapshot};
use crate::tree::Tree;
use crate::{MigrateError, Result};

/// The largest manifest taken (about 3 million entries).
pub const MAX_MANIFEST: usize = 512 << 20;

/// Where the target is in one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected; the source's `Hello` comes first.
    Hello,
    /// Waiting for `Start`.
    Start,
    /// After `Start`: the layers or the image the target asked for.
    Setup,
    /// Pre-copy rounds: pages and root filesystem changes.
    Rounds,
    /// The source's container is frozen: the last pages and changes,
    /// CRIU's images, then `Commit`.
    Frozen,
}

impl Phase {
    /// How the phase reads in errors ("pages message while waiting for start").
    pub fn name(self) -> &'static str {
        match self {
            Phase::Hello => "waiting for hello",
            Phase::Start => "waiting for start",
            Phase::Setup => "setting up (layers and image)",
            Phase::Rounds => "in pre-copy rounds",
            Phase::Frozen => "frozen (final phase)",
        }
    }

    /// The phase after `msg` arrives in this one, or a protocol error
    /// naming the message and the phase. `Abort` is the caller's.
    pub fn next(self, msg: &Message) -> Result<Phase> {
        use Message as M;
        let rootfs = |tree: &TreeId| *tree == TreeId::Rootfs;
        let next = match (self, msg) {
            (Phase::Hello, M::Hello { .. }) => Some(Phase::Start),
            (Phase::Start, M::Start { .. }) => Some(Phase::Setup),
            (Phase::Setup, M::FileBegin { tree, .. } | M::Manifest { tree, .. })
                if !rootfs(tree) =>
            {
                Some(Phase::Setup)
            }
            (Phase::Setup, M::ImageChunk { .. } | M::ImageDone { .. }) => Some(Phase::Setup),
            (Phase::Setup | Phase::Rounds | Phase::Frozen, M::FileChunk { .. }) => Some(self),
            (Phase::Setup | Phase::Rounds, M::Pages(_) | M::RoundDone { .. }) => {
                Some(Phase::Rounds)
            }
            (
                Phase::Setup | Phase::Rounds,
                M::FileBegin { tree, .. } | M::Manifest { tree, .. },
            ) if rootfs(tree) => Some(Phase::Rounds),
            (Phase::Setup | Phase::Rounds, M::Frozen) => Some(Phase::Frozen),
            (Phase::Frozen, M::Pages(_) | M::CriuImages { .. } | M::Commit) => Some(Phase::Frozen),
            (Phase::Frozen, M::FileBegin { tree, .. } | M::Manifest { tree, .. })
                if rootfs(tree) =>
            {
                Some(Phase::Frozen)
            }
            _ => None,
        };
        next.ok_or_else(|| out_of_phase(msg, self))
    }
}

/// The protocol error for `msg` arriving in `phase`.
pub fn out_of_phase(msg: &Message, phase: Phase) -> MigrateError {
    let what = match msg {
        Message::FileBegin { tree, .. } | Message::Manifest { tree, .. } => {
            format!("{} message for the {tree}", msg.kind())
        }
        _ => format!("{} message", msg.kind()),
    };
    MigrateError::Protocol(format!("{what} while {}", phase.name()))
}

/// The file whose data is arriving.
struct OpenFile {
    tree: TreeId,
    path: String,
    file: File,
    size: u64,
}

/// The Docker image tarball arriving.
struct ImageIn {
    path: PathBuf,
    file: File,
    received: u64,
}

/// The trees a migration writes on the target: the synced root filesystem
/// (or upper directory), the image layers it asked for, and a Docker
/// image tarball.
pub struct Trees {
    rootfs: Option<(Tree, Applied)>,
    layers: HashMap<String, Tree>,
    store: LayerStore,
    manifests: HashMap<TreeId, Vec<u8>>,
    current: Option<OpenFile>,
    image: Option<ImageIn>,
}

impl Trees {
    /// Nothing yet; layers complete into `store`.
    pub fn new(store: LayerStore) -> Self {
        Trees {
            rootfs: None,
            layers: HashMap::new(),
            store,
            manifests: HashMap::new(),
            current: None,
            image: None,
        }
    }

    /// The root filesystem (or upper directory) is synced into `dir`.
    pub fn set_rootfs(&mut self, dir: &Path) -> Result<()> {
        self.rootfs = Some((Tree::create(dir)?, Applied::default()));
        Ok(())
    }

    /// Layer `digest` is to arrive: an empty incoming directory for it.
    pub fn want_layer(&mut self, digest: &str) -> Result<()> {
        let dir = self.store.incoming(digest)?;
        let _ = std::fs::remove_dir_all(&dir);
        self.layers.insert(digest.to_string(), Tree::create(&dir)?);
        Ok(())
    }

    /// The Docker image tarball is to arrive at `path`.
    pub fn want_image(&mut self, path: &Path) -> Result<()> {
        let file = File::create(path)
            .map_err(|e| MigrateError::Target(format!("create {}: {e}", path.display())))?;
        self.image = Some(ImageIn {
            path: path.to_path_buf(),
            file,
            received: 0,
        });
        Ok(())
    }

    fn tree(&self, id: &TreeId) -> Result<&Tree> {
        match id {
            TreeId::Rootfs => self.rootfs.as_ref().map(|(t, _)| t).ok_or_else(|| {
                MigrateError::Protocol("root filesystem data before the target has its tree".into())
            }),
            TreeId::Layer(d) => self.layers.get(d).ok_or_else(|| {
                MigrateError::Protocol(format!(
                    "data of layer {d}, which the target did not ask for or has complete"
                ))
            }),
        }
    }

    /// Any message but a file chunk ends the file being written.
    pub fn end_file(&mut self) {
        self.current = None;
    }

    /// `FileBegin`: the file starts afresh, `size` bytes of hole.
    pub fn begin(&mut self, tree: TreeId, path: String, size: u64) -> Result<()> {
        self.current = None;
        let file = self.tree(&tree)?.begin_file(&path, size)?;
        if let (TreeId::Rootfs, Some((_, applied))) = (&tree, self.rootfs.as_mut()) {
            applied.touch(&path);
        }
        self.current = Some(OpenFile {
            tree,
            path,
            file,
            size,
        });
        Ok(())
    }

    /// `FileChunk`: data of the file begun last, within its size.
    pub fn chunk(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<()> {
        let Some(f) = self.current.as_ref().filter(|f| f.path == path) else {
            return Err(MigrateError::Protocol(format!(
                "file data for {path:?} that does not follow its file-begin"
            )));
        };
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > f.size) {
            return Err(MigrateError::Protocol(format!(
                "file data for {path:?} at {offset}+{} beyond its size {}",
                data.len(),
                f.size
            )));
        }
        f.file.write_all_at(data, offset).map_err(|e| {
            MigrateError::Target(format!(
                "write {}: {e}",
                self.tree(&f.tree).map(|t| t.show(path)).unwrap_or_default()
            ))
        })
    }

    /// `Manifest`: one piece; the last one applies it to its tree. A
    /// layer's tree is then verified against its digest and goes into the
    /// layer store.
    pub fn manifest(&mut self, tree: TreeId, data: &[u8], last: bool) -> Result<()> {
        self.current = None;
        self.tree(&tree)?;
        let buf = self.manifests.entry(tree.clone()).or_default();
        if buf.len() + data.len() > MAX_MANIFEST {
            return Err(MigrateError::Protocol(format!(
                "manifest of the {tree} larger than {} MiB",
                MAX_MANIFEST >> 20
            )));
        }
        buf.extend_from_slice(data);
        if !last {
            return Ok(());
        }
        let bytes = self.manifests.remove(&tree).unwrap_or_default();
        let snap: Snapshot = serde_json::from_slice(&bytes)
            .map_err(|e| MigrateError::Protocol(format!("bad manifest of the {tree}: {e}")))?;
        rootfs::check_manifest(&snap).map_err(MigrateError::Protocol)?;
        match &tree {
            TreeId::Rootfs => {
                if let Some((t, applied)) = self.rootfs.as_mut() {
                    applied.apply(t, snap)?;
                }
            }
            TreeId::Layer(d) => {
                if let Some(t) = self.layers.remove(d) {
                    Applied::default().apply(&t, snap)?;
                    drop(t);
                    self.store.commit(d)?;
                }
            }
        }
        Ok(())
    }

    /// `ImageChunk`: the next piece of the Docker image.
    pub fn image_chunk(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let Some(img) = self.image.as_mut() else {
            return Err(MigrateError::Protocol(
                "image data the target did not ask for".into(),
            ));
        };
        if offset != img.received {
            return Err(MigrateError::Protocol(format!(
                "image data at {offset}, expected {}",
                img.received
            )));
        }
        img.file
            .write_all_at(data, offset)
            .map_err(|e| MigrateError::Target(format!("write {}: {e}", img.path.display())))?;
        img.received += data.len() as u64;
        Ok(())
    }

    /// `ImageDone`: the image is complete; returns where it is.
    pub fn image_done(&mut self, size: u64) -> Result<PathBuf> {
        let Some(img) = self.image.take() else {
            return Err(MigrateError::Protocol(
                "image end the target did not ask for".into(),
            ));
        };
        if size != img.received {
            return Err(MigrateError::Protocol(format!(
                "image of {size} bytes announced, {} received",
                img.received
            )));
        }
        Ok(img.path)
    }

    /// Checks, at `Commit`, that every tree is complete: the root
    /// filesystem's manifest applied, each layer asked for verified and
    /// stored, no manifest half received.
    pub fn check_complete(&self) -> Result<()> {
        if let Some(d) = self.layers.keys().next() {
            return Err(MigrateError::Protocol(format!(
                "commit before layer {d} arrived"
            )));
        }
        if let Some(t) = self.manifests.keys().next() {
            return Err(MigrateError::Protocol(format!(
                "commit with the manifest of the {t} incomplete"
            )));
        }
        if self.image.is_some() {
            return Err(MigrateError::Protocol(
                "commit before the image arrived".into(),
            ));
        }
        match &self.rootfs {
            Some((_, applied)) if applied.has_applied() => Ok(()),
            _ => Err(MigrateError::Protocol(
                "commit before the root filesystem's manifest".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrun_wire::{Bytes, MemoryTotals, PageRun, RoundStats};

    fn start() -> Message {
        Message::Start {
            container_id: "c".into(),
            spec_json: "{}".into(),
            memory: MemoryTotals::default(),
        }
    }

    #[test]
    fn each_message_only_in_its_phase() {
        let pages = Message::Pages(PageRun::default());
        let hello = Message::Hello { agent: "t".into() };
        let err = |p: Phase, m: &Message| p.next(m).expect_err("accepted").to_string();
        assert_eq!(
            err(Phase::Start, &pages),
            "protocol error: pages message while waiting for start"
        );
        assert!(err(Phase::Setup, &start()).contains("start message while setting up"));
        assert!(err(Phase::Hello, &start()).contains("while waiting for hello"));
        assert!(err(Phase::Rounds, &hello).contains("hello message"));
        let layer = Message::FileBegin {
            tree: TreeId::Layer("sha256:x".into()),
            path: "f".into(),
            size: 0,
        };
        assert!(err(Phase::Rounds, &layer).contains("layer sha256:x"));
        assert!(err(Phase::Rounds, &Message::Commit).contains("commit message while in pre-copy"));
        assert!(err(
            Phase::Rounds,
            &Message::CriuImages {
                name: "x".into(),
                offset: 0,
                data: Bytes::new()
            }
        )
        .contains("criu-images"));
        assert!(err(Phase::Frozen, &Message::Frozen).contains("frozen message"));
        assert!(err(Phase::Frozen, &layer).contains("layer"));
        assert!(err(Phase::Frozen, &Message::Done).contains("done message"));
        // The whole dialogue of a migration goes through.
        let dialogue = [
            hello.clone(),
            start(),
            layer.clone(),
            Message::ImageChunk {
                offset: 0,
                data: Bytes::new(),
            },
            pages.clone(),
            Message::RoundDone {
                round: 0,
                stats: RoundStats::default(),
            },
            Message::FileBegin {
                tree: TreeId::Rootfs,
                path: "f".into(),
                size: 1,
            },
            Message::FileChunk {
                path: "f".into(),
                offset: 0,
                data: Bytes::new(),
            },
            Message::Frozen,
            pages,
            Message::CriuImages {
                name: "x".into(),
                offset: 0,
                data: Bytes::new(),
            },
            Message::Commit,
        ];
        let mut p = Phase::Hello;
        for m in &dialogue {
            p = p.next(m).expect("in phase");
        }
        assert_eq!(p, Phase::Frozen);
    }

    #[test]
    fn file_data_must_follow_its_begin_and_stay_inside() {
        let work = tempfile::tempdir().expect("tmp");
        let mut t = Trees::new(LayerStore::new(work.path().join("layers")));
        t.set_rootfs(&work.path().join("rootfs")).expect("rootfs");
        assert!(t.chunk("f", 0, b"x").is_err(), "chunk without begin");
        t.begin(TreeId::Rootfs, "f".into(), 4).expect("begin");
        t.chunk("f", 0, b"abcd").expect("chunk");
        assert!(t.chunk("g", 0, b"x").is_err(), "another file's chunk");
        assert!(t.chunk("f", 2, b"xyz").is_err(), "beyond the size");
        assert!(t.chunk("f", u64::MAX, b"x").is_err(), "overflow");
        t.end_file();
        assert!(t.chunk("f", 0, b"x").is_err(), "after another message");
        assert!(t
            .begin(
                TreeId::Layer(format!("sha256:{}", "a".repeat(64))),
                "f".into(),
                1
            )
            .is_err());
        assert!(t.check_complete().is_err(), "no manifest yet");
        let mut m = Snapshot::new();
        let st = nix::sys::stat::stat(&work.path().join("rootfs/f")).expect("stat");
        m.insert("f".into(), rootfs::Entry::of(rootfs::Kind::File, &st));
        let json = serde_json::to_vec(&m).expect("json");
        t.manifest(TreeId::Rootfs, &json[..3], false)
            .expect("piece");
        assert!(t.check_complete().is_err(), "half a manifest");
        t.manifest(TreeId::Rootfs, &json[3..], true).expect("rest");
        t.check_complete().expect("complete");
        assert!(t.manifest(TreeId::Rootfs, b"{\"../x\":1}", true).is_err());
        assert!(t.image_chunk(0, b"x").is_err(), "image not asked for");
    }
}
