//! The source end: `migrun migrate-out`.
//!
//! Pre-copy rounds while the container runs, then a short freeze: the last
//! dirty pages, the root filesystem's last changes, and CRIU's process state
//! dumped with `--lazy-pages` (CRIU copies no memory: the target already has
//! it). The source keeps the container, frozen, until the target says it
//! runs; any failure before that thaws it exactly as it was.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migrun_runtime::checkpoint::{self, CheckpointOptions};
use migrun_runtime::lifecycle::{self, container_pids, load_bundle_spec};
use migrun_runtime::StateRoot;
use migrun_wire::{MemoryTotals, Message, RoundStats, Sender, TreeId};

use crate::dirty::{self, DirtyTracker};
use crate::events::{Event, Events};
use crate::handover::{SourceCopy, SourceLink, SourceMachine};
use crate::interrupt::Interrupts;
use crate::journal::{Journal, Record, Role, Step};
use crate::liveness::with_heartbeats;
use crate::memory::{self, MemReader, Proc, PAGE};
use crate::rootfs::{self, Entry, Kind, Snapshot};
use crate::stats::{MigrationStats, RoundFigures};
use crate::tree::{self, Tree};
use crate::{docker, layers, MigrateError, Result};

/// Options of `migrate-out`.
#[derive(Debug, Clone)]
pub struct OutOptions {
    /// Container id.
    pub id: String,
    /// Target address.
    pub to: String,
    /// Shared key file.
    pub key: PathBuf,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Downtime to aim for, in milliseconds.
    pub max_downtime_ms: u64,
    /// Bandwidth cap in Mbit/s.
    pub bandwidth_mbit: Option<u64>,
    /// Stop-and-copy instead of pre-copy.
    pub no_precopy: bool,
    /// The CRIU binary asked for.
    pub criu: PathBuf,
    /// Where CRIU's images of the frozen state go (a tmpfs is best).
    pub work_dir: PathBuf,
    /// Docker mode: `id` is a container of the daemon at this address
    /// (`unix:///PATH`), which removes it after the migration.
    pub docker_host: Option<String>,
    /// The longest the target may stay silent (or take nothing we send)
    /// before it counts as lost.
    pub peer_timeout: Duration,
    /// Tests only: a fault to inject at a step (`--inject-fault`).
    pub fault: Option<crate::fault::Fault>,
    /// Where the migration's progress and notices go.
    pub events: Events,
}

/// Pages per message.
const RUN_PAGES: usize = 256;
/// Bytes per file chunk.
const FILE_CHUNK: usize = 4 << 20;

/// Progress of one migration on the source.
struct Source<'a> {
    root: &'a StateRoot,
    opts: &'a OutOptions,
    /// The connection: sends, and the target's answers read by a task.
    link: SourceLink,
    trackers: HashMap<i32, (Proc, Option<Box<dyn DirtyTracker>>)>,
    stats: MigrationStats,
    buf: Vec<u8>,
    /// The tree the rounds sync (the root filesystem, or an overlay's or
    /// Docker's upper directory), opened once it is known.
    rootfs: PathBuf,
    tree: Option<std::sync::Arc<Tree>>,
    /// What the last round sent of it; the first round's snapshot is
    /// taken before `Start`, which announces its size.
    snapshot: Snapshot,
    first: Option<Snapshot>,
    throttle: crate::throttle::Throttle,
    /// This round's progress: pages expected, pages sent so far.
    bar: Option<(u64, u64)>,
    /// This side's phases, journaled, from `Start` on.
    machine: Option<SourceMachine>,
}

/// Says that a round ended, with its figures.
fn progress(events: &Events, r: &RoundFigures, estimate_ms: f64) {
    events.emit(Event::Round {
        figures: r.clone(),
        estimate_ms,
    });
}

impl Source<'_> {
    /// Starts a round's progress (the pages it expects to send).
    fn start_bar(&mut self, expected_pages: u64) {
        self.bar = Some((expected_pages.max(1), 0));
    }

    /// Counts `pages` more sent this round and says so.
    fn advance_bar(&mut self, pages: u64) {
        if let Some((total, done)) = &mut self.bar {
            *done += pages;
            self.opts.events.emit(Event::RoundProgress {
                done: *done,
                total: *total,
            });
        }
    }

    /// The container's processes (thread-group leaders), with their container pids.
    fn processes(&self) -> Result<Vec<Proc>> {
        let container = self.root.load(&self.opts.id)?;
        let mut out = Vec::new();
        for pid in container_pids(&container)? {
            let host = pid.as_raw();
            // Only thread-group leaders: threads share their leader's memory.
            let tgid = fs::read_to_string(format!("/proc/{host}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Tgid:"))
                        .and_then(|v| v.trim().parse::<i32>().ok())
                });
            if tgid != Some(host) {
                continue;
            }
            out.push(Proc {
                host,
                ns: match memory::ns_pid(host) {
                    Ok(ns) => ns,
                    Err(_) if !alive(host) => continue,
                    Err(e) => return Err(e),
                },
            });
        }
        Ok(out)
    }

    /// Sends `pages` (sorted addresses) of `proc`; returns (data pages, zero pages).
    async fn send_pages(&mut self, proc: Proc, pages: &[u64]) -> Result<(u64, u64)> {
        let reader = match MemReader::open(proc.host) {
            Ok(r) => r,
            Err(_) => return Ok((0, 0)), // the process is gone
        };
        let (mut data, mut zero) = (0, 0);
        for (addr, n) in memory::runs(pages, RUN_PAGES) {
            self.advance_bar(n as u64);
            let mut buf = std::mem::take(&mut self.buf);
            if let Some(bytes) = reader.read(addr, n, &mut buf) {
                let s = self.link.sender().send_pages(proc.ns, addr, bytes).await?;
                self.record_sent(proc.host, addr, bytes);
                data += s.data_pages as u64;
                zero += s.zero_pages as u64;
            } else {
                // Part of the run is unmapped now: page by page.
                for i in 0..n as u64 {
                    let a = addr + i * PAGE;
                    if let Some(bytes) = reader.read(a, 1, &mut buf) {
                        let s = self.link.sender().send_pages(proc.ns, a, bytes).await?;
                        self.record_sent(proc.host, a, bytes);
                        data += s.data_pages as u64;
                        zero += s.zero_pages as u64;
                    }
                }
            }
            self.buf = buf;
        }
        Ok((data, zero))
    }

    /// Tells the tracker of `pid`, if it has one, the content sent of the
    /// pages from `addr` (`bytes`, whole pages, zero pages included): a
    /// tracker comparing contents (hash) must compare the next collect
    /// with what the target got, not with what its own collect saw, or a
    /// page changed back (A→B→A) after being read would be missed.
    fn record_sent(&mut self, pid: i32, addr: u64, bytes: &[u8]) {
        if let Some((_, Some(t))) = self.trackers.get_mut(&pid) {
            for (i, page) in bytes.chunks_exact(PAGE as usize).enumerate() {
                t.record_sent(addr + i as u64 * PAGE, page);
            }
        }
    }

    /// Sends every populated page of processes not seen before. With
    /// `track` (the container runs) their trackers start first, so no write
    /// is lost; frozen processes need none (and could not be injected into).
    async fn pick_up_new_processes(&mut self, track: bool) -> Result<(u64, u64)> {
        let (mut data, mut zero) = (0, 0);
        let live = self.processes()?;
        // Forget processes that exited.
        self.trackers
            .retain(|host, _| live.iter().any(|p| p.host == *host));
        for proc in live {
            if self.trackers.contains_key(&proc.host) {
                continue;
            }
            // A process may exit at any moment (a shell's short-lived
            // children do, many times a second): then it is simply skipped.
            let tracker = if track {
                let opened =
                    dirty::open_configured(proc.host).and_then(|mut t| t.start().map(|_| t));
                match opened {
                    Ok(t) => {
                        self.stats.dirty_tracking = t.name().to_string();
                        Some(t)
                    }
                    Err(_) if !alive(proc.host) => continue,
                    Err(e) => {
                        return Err(MigrateError::Source(format!(
                            "dirty tracking of process {}: {e}",
                            proc.host
                        )))
                    }
                }
            } else {
                None
            };
            let pages = match memory::populated_pages(proc.host) {
                Ok(p) => p,
                Err(_) if !alive(proc.host) => continue,
                Err(e) => return Err(e),
            };
            self.trackers.insert(proc.host, (proc, tracker));
            let (d, z) = self.send_pages(proc, &pages).await?;
            data += d;
            zero += z;
        }
        Ok((data, zero))
    }

    /// Collects and sends the dirty pages of every tracked process.
    ///
    /// A process whose tracked address space is gone is forgotten: it
    /// exited, or it called execve (a shell's child becoming `sleep`), and
    /// then the next [`Self::pick_up_new_processes`] takes it as a new
    /// process and sends all of its new memory.
    async fn send_dirty(&mut self) -> Result<(u64, u64, u64)> {
        let mut sets = Vec::new();
        let mut gone = Vec::new();
        for (host, (proc, tracker)) in self.trackers.iter_mut() {
            let Some(tracker) = tracker else { continue };
            match tracker.collect() {
                Ok(set) => sets.push((*proc, set.pages().collect::<Vec<u64>>())),
                Err(dirty::DirtyError::ProcessGone { .. }) => gone.push(*host),
                Err(_) if !alive(*host) => gone.push(*host),
                Err(e) => {
                    return Err(MigrateError::Source(format!(
                        "collect dirty pages of {host}: {e}"
                    )));
                }
            }
        }
        for host in gone {
            tracing::debug!(
                pid = host,
                "address space gone (exit or execve): tracked anew"
            );
            self.trackers.remove(&host);
        }
        let (mut dirtied, mut data, mut zero) = (0, 0, 0);
        self.start_bar(sets.iter().map(|(_, p)| p.len() as u64).sum());
        for (proc, pages) in sets {
            dirtied += pages.len() as u64;
            let (d, z) = self.send_pages(proc, &pages).await?;
            data += d;
            zero += z;
        }
        Ok((dirtied, data, zero))
    }

    /// The phases and the connection they use.
    fn phases(&mut self) -> Result<(&mut SourceMachine, &mut SourceLink)> {
        let m = self
            .machine
            .as_mut()
            .ok_or_else(|| MigrateError::Source("the migration has no journal".into()))?;
        Ok((m, &mut self.link))
    }

    /// Fires a fault injected at `Precopy` (journaled at the start).
    async fn precopy(&mut self) -> Result<()> {
        let (m, link) = self.phases()?;
        m.precopy(link).await
    }

    /// Opens the synced tree at `self.rootfs` and snapshots it (the first
    /// round's snapshot, taken before `Start`).
    fn open_rootfs(&mut self) -> Result<u64> {
        let tree = Tree::open(&self.rootfs)?;
        let first = rootfs::snapshot(&tree)?;
        let bytes = rootfs::data_bytes(&first);
        self.first = Some(first);
        self.tree = Some(std::sync::Arc::new(tree));
        Ok(bytes)
    }

    /// Sends the files of the root filesystem changed since the last snapshot, then the manifest.
    async fn sync_rootfs(&mut self) -> Result<u64> {
        let tree = self
            .tree
            .clone()
            .ok_or_else(|| MigrateError::Source("the root filesystem is not open".into()))?;
        let mut now = match self.first.take() {
            Some(s) => s,
            None => rootfs::snapshot(&tree)?,
        };
        let before = std::mem::take(&mut self.snapshot);
        let bytes = self
            .send_tree(&tree, TreeId::Rootfs, &before, &mut now)
            .await?;
        self.snapshot = now;
        self.stats.bytes_rootfs += bytes;
        Ok(bytes)
    }

    /// Sends the regular files of `now` (of `tree`) that changed since
    /// `before`, as data and holes, then the manifest of `now`. A file
    /// found not to be a regular file any more when it is opened (the
    /// container swapped it) is dropped from `now`, and the next round
    /// sees it again; the manifest describes the inode whose data was
    /// sent. Returns the file bytes sent.
    async fn send_tree(
        &mut self,
        tree: &Tree,
        id: TreeId,
        before: &Snapshot,
        now: &mut Snapshot,
    ) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let changed: Vec<String> = rootfs::changed_files(before, now)
            .into_iter()
            .map(String::from)
            .collect();
        let mut bytes = 0;
        let mut chunk = vec![0u8; FILE_CHUNK];
        for rel in changed {
            let Some((file, st)) = tree.open_regular(&rel)? else {
                now.remove(&rel);
                continue;
            };
            now.insert(rel.clone(), Entry::of(Kind::File, &st));
            let size = st.st_size.max(0) as u64;
            let read_err =
                |e: std::io::Error| MigrateError::Source(format!("read {}: {e}", tree.show(&rel)));
            self.link
                .send(&Message::FileBegin {
                    tree: id.clone(),
                    path: rel.clone(),
                    size,
                })
                .await?;
            for (offset, len) in tree::data_extents(&file, size).map_err(read_err)? {
                let end = offset + len;
                let mut pos = offset;
                while pos < end {
                    let want = FILE_CHUNK.min((end - pos) as usize);
                    let n = file.read_at(&mut chunk[..want], pos).map_err(read_err)?;
                    if n == 0 {
                        break; // shrunk meanwhile: the next round sees it
                    }
                    self.link
                        .send(&Message::FileChunk {
                            path: rel.clone(),
                            offset: pos,
                            data: migrun_wire::Bytes::copy_from_slice(&chunk[..n]),
                        })
                        .await?;
                    pos += n as u64;
                    bytes += n as u64;
                }
            }
        }
        rootfs::drop_orphan_links(now);
        let manifest = serde_json::to_vec(now).map_err(|e| MigrateError::Source(e.to_string()))?;
        let mut pieces = manifest.chunks(FILE_CHUNK).peekable();
        while let Some(piece) = pieces.next() {
            self.link
                .send(&Message::Manifest {
                    tree: id.clone(),
                    data: migrun_wire::Bytes::copy_from_slice(piece),
                    last: pieces.peek().is_none(),
                })
                .await?;
        }
        Ok(bytes)
    }

    /// Sends the Docker image as far as the target lacks it (after `Start`
    /// told it the image and its layers).
    async fn send_docker_image(&mut self, d: &DockerOut) -> Result<()> {
        let wanted = self.layers_wanted().await?;
        self.stats.layers_total = d.diff_ids.len();
        if !wanted.iter().any(|w| w == docker::WANT_IMAGE) {
            return Ok(());
        }
        let layers: Vec<String> = wanted
            .into_iter()
            .filter(|w| w != docker::WANT_IMAGE)
            .collect();
        if let Some(bad) = layers.iter().find(|l| !d.diff_ids.contains(l)) {
            return Err(MigrateError::Protocol(format!(
                "the target wants layer {bad}, which the image does not have"
            )));
        }
        let saved = self
            .opts
            .work_dir
            .join(format!("{}-save.tar", self.opts.id));
        let filtered = self
            .opts
            .work_dir
            .join(format!("{}-image.tar", self.opts.id));
        let result = async {
            d.daemon.save(&d.image, &saved).await?;
            let kept = docker::filter_save(&saved, &filtered, &d.diff_ids, &layers)?;
            let _ = fs::remove_file(&saved);
            self.send_image(&filtered).await?;
            // The target loads it and creates the container: wait, so that
            // its work does not overlap the freeze.
            // (It sends heartbeats while it loads.)
            self.link.ack("the target to load the image").await?;
            Ok::<u64, MigrateError>(kept)
        }
        .await;
        let _ = fs::remove_file(&saved);
        let _ = fs::remove_file(&filtered);
        self.stats.bytes_layers += result?;
        self.stats.layers_sent = layers.len();
        Ok(())
    }

    /// Waits for the target's `LayersWanted` (it may first have to ask its
    /// image store or daemon what it has: a minute at most).
    async fn layers_wanted(&mut self) -> Result<Vec<String>> {
        let waiting_for = "the answer to the layer offer";
        match self
            .link
            .reply_within(waiting_for, Duration::from_secs(60))
            .await?
        {
            Message::LayersWanted { digests } => Ok(digests),
            other => Err(MigrateError::Protocol(format!(
                "expected LayersWanted, got {other:?}"
            ))),
        }
    }

    /// Sends the Docker image tarball at `path`.
    async fn send_image(&mut self, path: &Path) -> Result<u64> {
        let err = |e: std::io::Error| MigrateError::Source(format!("read {}: {e}", path.display()));
        let mut file = fs::File::open(path).map_err(err)?;
        let mut offset = 0u64;
        let mut chunk = vec![0u8; FILE_CHUNK];
        loop {
            let n = file.read(&mut chunk).map_err(err)?;
            if n == 0 {
                break;
            }
            self.link
                .send(&Message::ImageChunk {
                    offset,
                    data: migrun_wire::Bytes::copy_from_slice(&chunk[..n]),
                })
                .await?;
            offset += n as u64;
        }
        self.link.send(&Message::ImageDone { size: offset }).await?;
        Ok(offset)
    }

    /// Sends the lower layers the target asked for (after `Start` offered
    /// them all); the others never cross the wire.
    async fn send_wanted_layers(&mut self, offered: &[(String, PathBuf)]) -> Result<()> {
        let wanted = self.layers_wanted().await?;
        self.stats.layers_total = offered.len();
        for digest in wanted {
            let Some((_, dir)) = offered.iter().find(|(d, _)| *d == digest) else {
                return Err(MigrateError::Protocol(format!(
                    "the target wants layer {digest}, which was not offered"
                )));
            };
            let tree = Tree::open(dir)?;
            let mut now = rootfs::snapshot(&tree)?;
            let bytes = self
                .send_tree(&tree, TreeId::Layer(digest), &Snapshot::new(), &mut now)
                .await?;
            self.stats.layers_sent += 1;
            self.stats.bytes_layers += bytes;
        }
        Ok(())
    }

    /// Tells the target a pre-copy round is complete, with its figures.
    async fn round_done(&mut self, fig: &RoundFigures) -> Result<()> {
        self.link
            .send(&Message::RoundDone {
                round: fig.round,
                stats: RoundStats {
                    pages_sent: fig.pages_sent,
                    zero_pages: fig.pages_zero,
                    bytes_sent: fig.bytes,
                    dirty_pages: fig.pages_dirtied,
                    duration_ms: fig.duration_ms as u64,
                },
            })
            .await?;
        Ok(())
    }

    /// Stops every tracker (before CRIU: it must not find our userfaultfd).
    fn stop_trackers(&mut self) {
        for (_, tracker) in self.trackers.values_mut() {
            if let Some(t) = tracker {
                let _ = t.stop();
            }
        }
    }
}

/// Whether process `pid` still exists with its memory: not a zombie, and
/// not in the middle of exiting (an exiting process has already dropped its
/// mm while /proc still shows it running; /proc/PID/status then has no VmSize).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            s.contains("\nVmSize:")
                && !s
                    .lines()
                    .find_map(|l| l.strip_prefix("State:"))
                    .is_some_and(|st| st.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(false)
}

/// Finds this process's CRIU child (`criu swrk`) to end a lazy dump.
fn criu_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let comm = stat
                .get(stat.find('(').map_or(0, |i| i + 1)..close)
                .unwrap_or_default();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .unwrap_or_default();
            if comm == "criu" && ppid == me {
                out.push(pid);
            }
        }
    }
    out
}

/// Kills a running lazy dump (its tasks stay, frozen by our freezer).
fn end_lazy_dump(thread: Option<std::thread::JoinHandle<()>>) {
    for pid in criu_children() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Some(t) = thread {
        let _ = t.join();
    }
}

/// A free TCP port on loopback for CRIU's (unused) lazy page server.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| MigrateError::Source(format!("find a free port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| MigrateError::Source(e.to_string()))?
        .port())
}

/// Migrates container `opts.id` to `opts.to`. On success the container is
/// gone here and runs there; on failure it runs here as before.
pub async fn migrate_out(root: &StateRoot, opts: &OutOptions) -> Result<MigrationStats> {
    match &opts.docker_host {
        Some(host) => docker_out(host, opts).await,
        None => {
            let mut copy = PlainCopy {
                root: root.clone(),
                id: opts.id.clone(),
                offered: Vec::new(),
            };
            migrate(root, opts, &mut copy).await
        }
    }
}

/// A Docker container on its way out.
struct DockerOut {
    daemon: docker::Daemon,
    inspect: serde_json::Value,
    image: String,
    diff_ids: Vec<String>,
    upper: PathBuf,
}

/// `migrate-out --docker-host`: the container `opts.id` (a name or id) of
/// that daemon; removed from it after success.
async fn docker_out(host: &str, opts: &OutOptions) -> Result<MigrationStats> {
    let daemon = docker::Daemon::connect(host)?;
    daemon.check_driver().await?;
    let inspect = daemon.container(&opts.id).await?;
    let id = inspect["Id"].as_str().unwrap_or_default().to_string();
    if inspect["State"]["Running"] != serde_json::Value::Bool(true)
        || inspect["State"]["Paused"] == serde_json::Value::Bool(true)
    {
        return Err(MigrateError::Source(format!(
            "container {} is not running",
            opts.id
        )));
    }
    if inspect["HostConfig"]["Runtime"].as_str() != Some("migrun") {
        return Err(MigrateError::Source(format!(
            "container {} runs with runtime {}, not migrun (docker run --runtime=migrun)",
            opts.id,
            inspect["HostConfig"]["Runtime"].as_str().unwrap_or("runc")
        )));
    }
    let pid = inspect["State"]["Pid"].as_i64().unwrap_or(0);
    let root = StateRoot::open(&docker::runtime_root(pid)?, false)?;
    let upper = inspect["GraphDriver"]["Data"]["UpperDir"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| {
            MigrateError::Source(format!("container {} has no upper directory", opts.id))
        })?;
    let image = inspect["Image"].as_str().unwrap_or_default().to_string();
    let diff_ids = daemon
        .image_diff_ids(&image)
        .await?
        .ok_or_else(|| MigrateError::Source(format!("image {image} is gone")))?;
    let ctx = DockerOut {
        daemon,
        inspect,
        image,
        diff_ids,
        upper,
    };
    let mut o = opts.clone();
    o.id = id.clone();
    let mut copy = DockerCopy {
        runtime: PlainCopy {
            root: root.clone(),
            id,
            offered: Vec::new(),
        },
        out: ctx,
    };
    migrate(&root, &o, &mut copy).await
}

/// One migration of container `opts.id` under `root`.
async fn migrate(
    root: &StateRoot,
    opts: &OutOptions,
    copy: &mut impl Outgoing,
) -> Result<MigrationStats> {
    let started = Instant::now();
    let container = root.load(&opts.id)?;
    if container.status() != libcontainer::container::ContainerStatus::Running {
        return Err(MigrateError::Source(format!(
            "container {} is not running",
            opts.id
        )));
    }
    // A stopped process its dump would refuse (v1 freezer): now, not after the pre-copy.
    checkpoint::refuse_stopped_processes(&container)?;
    let bundle = container.bundle().clone();
    let spec = load_bundle_spec(&bundle)?;
    let config = fs::read_to_string(bundle.join("config.json"))
        .map_err(|e| MigrateError::Source(format!("read config.json: {e}")))?;
    // Found (its version and network lock asked) now, not in the downtime.
    checkpoint::criu_binary(&opts.criu)?.has_nftables_lock();
    let mut interrupts = Interrupts::listen()?;
    let key = migrun_wire::load_key(&opts.key)?;
    let ch = migrun_wire::connect(opts.to.as_str(), &key).await?;
    if let Some(mbit) = opts.bandwidth_mbit {
        ch.bandwidth().set_mbit(Some(mbit));
    }
    let traffic = ch.traffic();
    // The target may report a failure at any time: the link reads it
    // while we send.
    let mut link = SourceLink::new(ch, opts.peer_timeout);
    link.send(&Message::Hello {
        agent: format!("migrun {}", env!("CARGO_PKG_VERSION")),
    })
    .await?;
    let mut src = Source {
        root,
        opts,
        link,
        trackers: HashMap::new(),
        stats: MigrationStats {
            container: opts.id.clone(),
            precopy: !opts.no_precopy,
            dirty_tracking: "none".into(),
            ..Default::default()
        },
        buf: Vec::new(),
        rootfs: root.meta(&opts.id).rootfs,
        tree: None,
        snapshot: Snapshot::new(),
        first: None,
        bar: None,
        throttle: crate::throttle::Throttle::new(
            &container.spec().map(|c| c.cgroup_path).unwrap_or_default(),
        ),
        machine: None,
    };
    let (tree, described) = copy.prepare(&src.rootfs, &bundle)?;
    src.rootfs = tree;
    let rootfs_bytes = src.open_rootfs()?;
    let procs = src.processes()?;
    // The journal before anything touches the container (trackers,
    // throttle, freeze); an earlier migration of it in doubt refuses this one.
    let journal = Journal::begin(
        root.path(),
        Record {
            role: Role::Source,
            container: opts.id.clone(),
            step: Step::Precopy,
            peer: opts.to.clone(),
            dir: None,
            images: None,
            lazy: false,
            incomplete: false,
            scratch: None,
            cpu_limit: None,
            docker_host: opts.docker_host.clone(),
            docker_container: None,
            pid: std::process::id(),
            pid_start: None,
        },
    )?;
    src.machine = Some(SourceMachine::new(journal, opts.fault, opts.events.clone()));
    let resident: u64 = procs
        .iter()
        .map(|p| {
            memory::populated_pages(p.host)
                .map(|v| v.len() as u64)
                .unwrap_or(0)
        })
        .sum();
    let start = Message::Start {
        container_id: opts.id.clone(),
        spec_json: {
            let mut spec = described;
            spec.insert("config".into(), config.into());
            spec.insert(
                "rootfs".into(),
                serde_json::json!({ "data_bytes": rootfs_bytes }),
            );
            serde_json::Value::Object(spec).to_string()
        },
        memory: MemoryTotals {
            processes: procs.len() as u32,
            mapped_bytes: resident * PAGE,
            resident_pages: resident,
        },
    };

    src.start_bar(resident);
    // Up to the commit, any failure or signal rolls back.
    let result = {
        let work = async {
            src.precopy().await.map_err(|e| (e, None))?;
            src.link.send(&start).await.map_err(|e| (e, None))?;
            copy.send_base(&mut src).await.map_err(|e| (e, None))?;
            run_source(&mut src, &spec, copy).await
        };
        tokio::select! {
            r = work => r,
            sig = interrupts.next() => Err((MigrateError::Interrupted(sig), None)),
        }
    };
    let mut machine = src
        .machine
        .take()
        .ok_or_else(|| MigrateError::Source("the migration has no journal".into()))?;
    match result {
        Ok((thread, _images, freeze)) => {
            // Signals from here on are noted by the listener and ignored:
            // the hand-over finishes.
            end_lazy_dump(thread);
            src.stats.phase("criu dump ended", freeze);
            src.throttle.release();
            // The second phase: the decision journaled (`Committed`: from
            // here on this copy never runs again), `Done` sent, and this
            // copy let go once the target's runs with all of its memory. A
            // cut in between leaves it frozen, in doubt, for
            // `migrate-recover`.
            machine.commit(&mut src.link, &opts.id).await?;
            src.stats.phase("running on the target", freeze);
            src.stats.downtime_ms = freeze.elapsed().as_secs_f64() * 1000.0;
            machine.release(&mut src.link, copy, &opts.id).await?;
            src.stats.total_ms = started.elapsed().as_secs_f64() * 1000.0;
            src.stats.bytes_total = traffic.bytes_total();
            let _ = fs::remove_dir_all(opts.work_dir.join(&opts.id));
            Ok(src.stats)
        }
        Err((err, thread)) => {
            if thread.is_none() {
                // A cancelled dump's thread is gone with its future: end
                // its CRIU anyway.
                end_lazy_dump(None);
            }
            end_lazy_dump(thread);
            src.throttle.release();
            src.stop_trackers();
            let err = machine.abort(&mut src.link, copy, err).await;
            let _ = fs::remove_dir_all(opts.work_dir.join(&opts.id));
            Err(err)
        }
    }
}

/// What differs between the modes on the source beside the hand-over:
/// which tree the rounds sync, what `Start` says of the container's base,
/// and how the part of the base the target lacks gets there.
trait Outgoing: SourceCopy {
    /// Given the container's root filesystem and bundle: the tree the
    /// rounds sync, and what `Start` says of the mode (JSON fields).
    fn prepare(
        &mut self,
        rootfs: &Path,
        bundle: &Path,
    ) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>)>;
    /// After `Start`: sends what the target lacks of the base (the lower
    /// layers of an overlay, a Docker image), before the rounds.
    async fn send_base(&mut self, src: &mut Source<'_>) -> Result<()>;
    /// The namespaces CRIU dumps as empty (made anew on the target).
    fn empty_namespaces(&self) -> Vec<String>;
}

/// A migrun container's copy on the source.
struct PlainCopy {
    root: StateRoot,
    id: String,
    /// An overlay root filesystem's lower layers, by digest.
    offered: Vec<(String, PathBuf)>,
}

impl Outgoing for PlainCopy {
    /// An overlay root filesystem: its lower layers are offered by digest,
    /// its upper directory is what the rounds sync. Otherwise the whole tree.
    fn prepare(
        &mut self,
        rootfs: &Path,
        bundle: &Path,
    ) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>)> {
        let mut described = serde_json::Map::new();
        let Some(overlay) = layers::overlay_of(rootfs, bundle) else {
            return Ok((rootfs.to_path_buf(), described));
        };
        let mut layer_bytes = Vec::new();
        for dir in &overlay.lower {
            let (digest, bytes) = layers::layer_digest(dir)?;
            self.offered.push((digest, dir.clone()));
            layer_bytes.push(bytes);
        }
        described.insert(
            "overlay".into(),
            serde_json::json!({
                "layers": self.offered.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
                "data_bytes": layer_bytes,
            }),
        );
        Ok((overlay.upper, described))
    }

    async fn send_base(&mut self, src: &mut Source<'_>) -> Result<()> {
        if self.offered.is_empty() {
            return Ok(());
        }
        src.send_wanted_layers(&self.offered).await
    }

    fn empty_namespaces(&self) -> Vec<String> {
        Vec::new()
    }
}

impl SourceCopy for PlainCopy {
    async fn freeze(&mut self) -> Result<()> {
        Ok(lifecycle::pause(&self.root, &self.id)?)
    }

    async fn undo(&mut self) {
        crate::netmove::release(&self.root, &self.id);
        // Thaw the container exactly as it was.
        if let Ok(c) = self.root.load(&self.id) {
            if c.status() == libcontainer::container::ContainerStatus::Paused {
                let _ = lifecycle::resume(&self.root, &self.id);
            }
        }
    }

    async fn release(&mut self) -> Result<()> {
        // SIGKILL while frozen: a frozen task dies on thaw without running
        // a single instruction of its own.
        let _ = kill_frozen(&self.root, &self.id);
        Ok(lifecycle::delete(&self.root, &self.id, true)?)
    }
}

/// A Docker container's copy on the source: frozen and thawed through the
/// migrun runtime under it, removed from its daemon once released.
struct DockerCopy {
    runtime: PlainCopy,
    out: DockerOut,
}

impl Outgoing for DockerCopy {
    /// Docker's image layers go through Docker; its upper dir is synced.
    fn prepare(
        &mut self,
        _rootfs: &Path,
        _bundle: &Path,
    ) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>)> {
        let mut described = serde_json::Map::new();
        described.insert(
            "docker".into(),
            serde_json::json!({
                "inspect": self.out.inspect,
                "image": self.out.image,
                "diff_ids": self.out.diff_ids,
            }),
        );
        Ok((self.out.upper.clone(), described))
    }

    async fn send_base(&mut self, src: &mut Source<'_>) -> Result<()> {
        src.send_docker_image(&self.out).await
    }

    /// A Docker container's network is Docker's: the target daemon sets up
    /// the new one (its own address) as for any container it starts.
    fn empty_namespaces(&self) -> Vec<String> {
        vec!["network".into()]
    }
}

impl SourceCopy for DockerCopy {
    async fn freeze(&mut self) -> Result<()> {
        self.runtime.freeze().await
    }

    async fn undo(&mut self) {
        self.runtime.undo().await
    }

    async fn release(&mut self) -> Result<()> {
        let killed = self.runtime.release().await;
        self.out.daemon.remove(&self.runtime.id).await?;
        killed
    }
}

/// Sends SIGKILL to every process of the (frozen) container `id`; false if
/// any could not be signalled (the caller then deletes it before going on).
pub(crate) fn kill_frozen(root: &StateRoot, id: &str) -> bool {
    let Ok(container) = root.load(id) else {
        return false;
    };
    let Ok(pids) = lifecycle::container_pids(&container) else {
        return false;
    };
    pids.into_iter().all(|pid| {
        matches!(
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL),
            Ok(()) | Err(nix::errno::Errno::ESRCH)
        )
    })
}

type DumpThread = Option<std::thread::JoinHandle<()>>;

/// The rounds, the freeze, the dump and the commit. On error, returns the
/// dump thread (if any) so the caller can end it before thawing.
async fn run_source(
    src: &mut Source<'_>,
    spec: &oci_spec::runtime::Spec,
    copy: &mut impl Outgoing,
) -> std::result::Result<(DumpThread, PathBuf, Instant), (MigrateError, DumpThread)> {
    let traffic = src.link.sender().traffic();
    let precopy = !src.opts.no_precopy;
    let mut round = 0u32;
    let mut bandwidth_bps = src
        .opts
        .bandwidth_mbit
        .map(|m| m as f64 * 1e6 / 8.0)
        .unwrap_or(125e6);
    if precopy {
        // Round 0: everything, then the root filesystem.
        let t = Instant::now();
        let mut last_collect = t;
        let b0 = traffic.bytes_sent();
        let (data, zero) = src
            .pick_up_new_processes(true)
            .await
            .map_err(|e| (e, None))?;
        src.sync_rootfs().await.map_err(|e| (e, None))?;
        let fig = figures(
            0,
            (data, zero),
            0,
            traffic.bytes_sent() - b0,
            t.elapsed(),
            Duration::ZERO,
            false,
        );
        bandwidth_bps = measured(bandwidth_bps, &fig);
        progress(&src.opts.events, &fig, 0.0);
        src.round_done(&fig).await.map_err(|e| (e, None))?;
        src.stats.rounds.push(fig);
        // Later rounds: only what was written meanwhile.
        loop {
            round += 1;
            let t = Instant::now();
            let window = t - last_collect;
            last_collect = t;
            let b0 = traffic.bytes_sent();
            let (dirtied, data, zero) = src.send_dirty().await.map_err(|e| (e, None))?;
            let (nd, nz) = src
                .pick_up_new_processes(true)
                .await
                .map_err(|e| (e, None))?;
            let fig = figures(
                round,
                (data + nd, zero + nz),
                dirtied,
                traffic.bytes_sent() - b0,
                t.elapsed(),
                window,
                false,
            );
            bandwidth_bps = measured(bandwidth_bps, &fig);
            let estimate_ms = fig.pages_dirtied as f64 * PAGE as f64 / bandwidth_bps * 1000.0;
            progress(&src.opts.events, &fig, estimate_ms);
            let dirty_bps = fig.dirty_rate_pages_per_s * PAGE as f64;
            let previous_dirtied = src.stats.rounds.last().map(|r| r.pages_dirtied);
            src.round_done(&fig).await.map_err(|e| (e, None))?;
            src.stats.rounds.push(fig);
            if estimate_ms <= src.opts.max_downtime_ms as f64 / 4.0 || round >= src.opts.max_rounds
            {
                break;
            }
            // Not converging: the workload dirties about as fast as the link
            // carries (or faster). Cap its CPU one step more.
            let not_shrinking = previous_dirtied.is_some_and(|p| {
                round >= 2
                    && src
                        .stats
                        .rounds
                        .last()
                        .is_some_and(|r| r.pages_dirtied * 10 >= p * 9)
            });
            if dirty_bps > 0.5 * bandwidth_bps || not_shrinking {
                if let Some(share) = src.throttle.tighten() {
                    let limit = src.throttle.original().cloned();
                    if let Some(m) = src.machine.as_mut() {
                        let j = m.journal_mut();
                        if j.record().cpu_limit.is_none() {
                            j.update(|r| r.cpu_limit = limit).map_err(|e| (e, None))?;
                        }
                    }
                    src.stats.throttled = true;
                    src.stats.throttle_cpu_share = share;
                    src.opts.events.emit(Event::Throttled {
                        round,
                        cpu_share: share,
                    });
                }
            }
        }
        src.stats.precopy_rounds = round + 1;
    }

    // CRIU cannot dump a connection not yet accepted: hold new ones off and
    // let the accept queues drain while the container still runs.
    crate::netmove::quiesce(src.root, &src.opts.id);
    // The freeze. A throttled container is let go first: under a CPU cap
    // of a fraction of a percent its tasks take long to reach the freezer,
    // and CRIU's dump of them would crawl too. It is frozen microseconds
    // later, so the burst of dirtying this allows is nil.
    src.throttle.release();
    let freeze = Instant::now();
    let at_freeze = traffic.bytes_total();
    {
        let (m, link) = src.phases().map_err(|e| (e, None))?;
        m.freeze(link, copy).await.map_err(|e| (e, None))?;
    }
    src.stats.phase("frozen", freeze);
    let t = Instant::now();
    let b0 = traffic.bytes_sent();
    let (dirtied, data, zero) = if precopy {
        let (dirtied, d, z) = src.send_dirty().await.map_err(|e| (e, None))?;
        src.stop_trackers();
        let (nd, nz) = src
            .pick_up_new_processes(false)
            .await
            .map_err(|e| (e, None))?;
        (dirtied, d + nd, z + nz)
    } else {
        let (d, z) = src
            .pick_up_new_processes(false)
            .await
            .map_err(|e| (e, None))?;
        (0, d, z)
    };
    src.stats.phase("last memory sent", freeze);
    src.sync_rootfs().await.map_err(|e| (e, None))?;
    src.stats.phase("last rootfs changes sent", freeze);
    let fig = figures(
        round + u32::from(precopy),
        (data, zero),
        dirtied,
        traffic.bytes_sent() - b0,
        t.elapsed(),
        t.elapsed(),
        true,
    );
    progress(&src.opts.events, &fig, 0.0);
    src.stats.rounds.push(fig);
    src.stats.processes = src.trackers.len();

    // CRIU: the process state, no memory (--lazy-pages).
    let images = src.opts.work_dir.join(&src.opts.id);
    let _ = fs::remove_dir_all(&images);
    fs::create_dir_all(&images).map_err(|e| {
        (
            MigrateError::Source(format!("create {}: {e}", images.display())),
            None,
        )
    })?;
    let dump_started = Instant::now();
    let (thread, ready) =
        start_lazy_dump(src, spec, &images, copy.empty_namespaces()).map_err(|e| (e, None))?;
    let (ready, beat) = with_heartbeats(
        src.link.sender(),
        src.opts.peer_timeout,
        tokio::task::spawn_blocking(move || wait_ready(ready)),
    )
    .await;
    let ready = match (ready, beat) {
        (Ok(r), Ok(())) => r,
        (_, Err(e)) => Err(MigrateError::Peer(format!(
            "target lost during the dump: {e}"
        ))),
        (Err(e), _) => Err(MigrateError::Source(format!("wait for criu: {e}"))),
    };
    if let Err(e) = ready {
        let detail =
            migrun_criu::images::first_error_line(&images.join("dump.log")).unwrap_or_default();
        return Err((
            MigrateError::Source(format!("criu dump failed: {e} {detail}")),
            Some(thread),
        ));
    }
    // CRIU holds the tasks in its ptrace stop and has thawed their cgroup:
    // frozen again, they stay frozen when it goes (see refreeze).
    if let Err(e) = checkpoint::refreeze(src.root, &src.opts.id) {
        return Err((e.into(), Some(thread)));
    }
    src.stats.criu_dump_ms = dump_started.elapsed().as_secs_f64() * 1000.0;
    src.stats.phase("criu dump ready", freeze);
    let sent = async {
        let (m, link) = src.phases()?;
        m.dumped(link).await?;
        send_images(link.sender(), &images).await
    }
    .await;
    match sent {
        Ok(n) => src.stats.bytes_criu_images = n,
        Err(e) => return Err((e, Some(thread))),
    }
    src.stats.phase("criu images sent", freeze);
    // `Commit`: the target restores, stopped, and acknowledges (the first
    // phase).
    let acknowledged = async {
        let (m, link) = src.phases()?;
        m.sent(link).await
    }
    .await;
    if let Err(e) = acknowledged {
        return Err((e, Some(thread)));
    }
    src.stats.phase("restored on the target", freeze);
    src.stats.downtime_ms = freeze.elapsed().as_secs_f64() * 1000.0;
    src.stats.bytes_downtime = traffic.bytes_total() - at_freeze;
    Ok((Some(thread), images, freeze))
}

/// Figures of one round.
fn figures(
    round: u32,
    (data, zero): (u64, u64),
    dirtied: u64,
    bytes: u64,
    took: Duration,
    dirty_window: Duration,
    frozen: bool,
) -> RoundFigures {
    let secs = took.as_secs_f64().max(1e-6);
    let window = dirty_window.as_secs_f64().max(1e-6);
    RoundFigures {
        round,
        pages_sent: data,
        pages_zero: zero,
        pages_dirtied: dirtied,
        bytes,
        duration_ms: secs * 1000.0,
        // Pages dirtied since the previous collect, over that time.
        dirty_rate_pages_per_s: dirtied as f64 / window,
        bandwidth_mbit: bytes as f64 * 8.0 / secs / 1e6,
        frozen,
    }
}

/// Bandwidth estimate after a round (only rounds that moved enough data count).
fn measured(previous: f64, fig: &RoundFigures) -> f64 {
    if fig.bytes > (4 << 20) {
        fig.bytes as f64 / (fig.duration_ms / 1000.0)
    } else {
        previous
    }
}

/// Starts CRIU's lazy dump in a thread; returns it and the read end of its status pipe.
fn start_lazy_dump(
    src: &Source<'_>,
    spec: &oci_spec::runtime::Spec,
    images: &Path,
    empty_ns: Vec<String>,
) -> Result<(std::thread::JoinHandle<()>, OwnedFd)> {
    let (read, write) =
        nix::unistd::pipe().map_err(|e| MigrateError::Source(format!("pipe: {e}")))?;
    // The write end must survive into criu (no close-on-exec).
    let container = src.root.load(&src.opts.id)?;
    let opts = CheckpointOptions {
        id: src.opts.id.clone(),
        image_path: images.to_path_buf(),
        tcp_established: true,
        lazy_pages: true,
        page_server: Some(format!("127.0.0.1:{}", free_port()?)),
        status_fd: Some(write.as_raw_fd()),
        criu: src.opts.criu.clone(),
        // The target puts the restored tree in a cgroup of its own making:
        // the source's cgroup properties would only cost dump time.
        manage_cgroups_mode: Some("ignore".into()),
        empty_ns,
        ..Default::default()
    };
    let mut req = checkpoint::dump_request(src.root, &container, spec, images, &opts)?;
    // Nobody asks this dump for its lazy pages: the target's page store has
    // them. CRIU need not copy them into its pipes.
    fs::write(images.join(migrun_criu::images::LAZY_NO_DRAIN_MARKER), b"")
        .map_err(|e| MigrateError::Source(format!("write to {}: {e}", images.display())))?;
    // A server under load has connections half set up at any moment: the
    // clients retry them, as after a lost SYN, on the target.
    req.tcp_skip_in_flight = true;
    let bin = checkpoint::criu_binary(&src.opts.criu)?;
    let thread = std::thread::spawn(move || {
        let _keep = write;
        if let Err(e) = migrun_criu::dump(&bin, &req) {
            tracing::debug!("lazy dump ended: {e}");
        }
    });
    Ok((thread, read))
}

/// Waits for CRIU's "ready" byte on the status pipe.
fn wait_ready(read: OwnedFd) -> Result<()> {
    let mut f = fs::File::from(read);
    let mut b = [0u8; 1];
    match f.read(&mut b) {
        Ok(1) => Ok(()),
        _ => Err(MigrateError::Source(
            "criu dump ended before it was ready".into(),
        )),
    }
}

/// Sends every file of the image directory; returns the bytes sent.
async fn send_images(ch: &mut Sender, dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| MigrateError::Source(format!("read {}: {e}", dir.display())))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type().map(|t| t.is_file()).unwrap_or(false) || name.ends_with(".log") {
            continue;
        }
        let data =
            fs::read(e.path()).map_err(|x| MigrateError::Source(format!("read {name}: {x}")))?;
        let mut offset = 0usize;
        loop {
            let end = (offset + FILE_CHUNK).min(data.len());
            ch.send(&Message::CriuImages {
                name: name.clone(),
                offset: offset as u64,
                data: migrun_wire::Bytes::copy_from_slice(&data[offset..end]),
            })
            .await?;
            total += (end - offset) as u64;
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
    }
    Ok(total)
}
