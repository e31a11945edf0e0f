//! The target end: `migrun migrate-in`.
//!
//! Receives the root filesystem, the pages and CRIU's images of a container,
//! completes the images from its page store and restores the container under
//! its own `--root`. Until it acknowledges, any failure removes everything it
//! made for that migration.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migrun_runtime::checkpoint::{self, RestoreOptions};
use migrun_runtime::{lifecycle, StateRoot};
use migrun_wire::{Channel, Message};

use crate::docker::{self, Daemon};
use crate::fault::{self, Fault, Then};
use crate::inbound::{out_of_phase, Phase, Trees};
use crate::journal::{self, Journal, Record, Role, Step};
use crate::layers::{self, LayerStore};
use crate::lazy::{self, LazyPages};
use crate::store::PageStore;
use crate::{images, MigrateError, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::interrupt::Interrupts;

/// Options of `migrate-in`.
#[derive(Debug, Clone)]
pub struct InOptions {
    /// Address to listen on.
    pub listen: String,
    /// Shared key file.
    pub key: PathBuf,
    /// Exit after one migration, with its status.
    pub once: bool,
    /// Where bundles and images of incoming containers go.
    pub work_dir: PathBuf,
    /// The CRIU binary asked for.
    pub criu: PathBuf,
    /// Restore without memory and fill it in from the page store while the
    /// container runs (CRIU's lazy pages); false: CRIU copies all memory
    /// from complete images inside the downtime.
    pub lazy_restore: bool,
    /// Bridge (in migrate-in's network namespace) that the outside ends of
    /// a restored container's veths are attached to (see [`crate::netmove`]).
    pub bridge: Option<String>,
    /// Docker mode: rebuild incoming Docker containers in the daemon at
    /// this address (`unix:///PATH`) and restore them through it.
    pub docker_host: Option<String>,
    /// The longest silence taken from the source once it has started.
    pub peer_timeout: Duration,
    /// Tests only: a fault to inject at a step (`--inject-fault`).
    pub fault: Option<Fault>,
}

/// Where the bundles of containers migrated into `root` live: in the state
/// root, not in a work directory (removing that never touches a running
/// container); `migrun delete` removes a container's bundle with it.
pub fn bundle_dir(root: &StateRoot, id: &str) -> PathBuf {
    root.path()
        .join(migrun_runtime::lifecycle::MIGRATED_BUNDLES)
        .join(id)
}

/// What the target made for one migration, to undo on failure.
struct Incoming {
    /// The bundle's directory (set once `Start` named the container).
    dir: PathBuf,
    /// Scratch space (a Docker image on its way).
    scratch: PathBuf,
    /// The journal, from `Start` on.
    journal: Option<Journal>,
    /// Docker mode: the file listing what a daemon that was down could not remove.
    pending: PathBuf,
    /// Set once the source may have been told that the copy here is ready.
    acked: Arc<AtomicBool>,
    /// Set while CRIU restores (a signal then waits for it to end).
    restoring: Arc<AtomicBool>,
    /// Set by a signal that came during the restore: roll back after it.
    stop: Arc<AtomicBool>,
    images: PathBuf,
    id: Option<String>,
    restored: bool,
    /// The lazy-pages daemon filling the restored container's memory.
    lazy: Option<LazyPages>,
    /// Where an overlay root filesystem is (to be) mounted on this host.
    overlay: Option<PathBuf>,
    /// The layer store, whose unfinished layers a failure removes.
    layers: PathBuf,
    /// Docker mode: the daemon and what was made in it.
    docker: Option<DockerIn>,
}

/// An incoming Docker container: what the source said, and what this side
/// made in its daemon (removed again on failure).
struct DockerIn {
    daemon: Daemon,
    inspect: serde_json::Value,
    image: String,
    /// The container created here (not started until the restore).
    container: Option<String>,
    /// Whether the image was loaded for this migration.
    loaded_image: bool,
}

impl DockerIn {
    /// Creates the container in the daemon; returns its upper directory.
    async fn create(&mut self) -> Result<PathBuf> {
        let reference = self.inspect["Config"]["Image"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let image = self.daemon.reference_for(&self.image, &reference).await?;
        self.inspect["Config"]["Image"] = serde_json::Value::from(image);
        let id = self.daemon.create_like(&self.inspect).await?;
        self.container = Some(id.clone());
        let c = self.daemon.container(&id).await?;
        c["GraphDriver"]["Data"]["UpperDir"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| {
                MigrateError::Docker(format!("new container {id} has no upper directory"))
            })
    }

    /// Removes what this migration made in the daemon.
    async fn undo(&mut self, pending: &Path) {
        let mut left = Vec::new();
        if let Some(id) = self.container.take() {
            if let Err(e) = self.daemon.remove(&id).await {
                eprintln!("migrate-in: {e}: removing it when the daemon answers again");
                left.push(format!("container {id}"));
            }
        }
        if self.loaded_image {
            if let Err(e) = self.daemon.remove_image(&self.image).await {
                if !e.to_string().contains("conflict") {
                    left.push(format!("image {}", self.image));
                }
            }
        }
        if !left.is_empty() {
            let mut text = fs::read_to_string(pending).unwrap_or_default();
            for l in left {
                text.push_str(&l);
                text.push('\n');
            }
            let _ = fs::write(pending, text);
        }
    }
}

/// The file listing what failed Docker migrations left in a daemon that did
/// not answer (`container ID` / `image ID` lines), removed by the next
/// `migrate-in --docker-host` on this work directory.
fn docker_pending(opts: &InOptions) -> PathBuf {
    opts.work_dir.join("docker-pending-removal")
}

/// Removes what earlier failed Docker migrations could not (their daemon was
/// down then); keeps what still fails.
async fn clean_docker_pending(opts: &InOptions) {
    let (Some(host), Ok(text)) = (&opts.docker_host, fs::read_to_string(docker_pending(opts)))
    else {
        return;
    };
    let Ok(daemon) = Daemon::connect(host) else {
        return;
    };
    let mut left = String::new();
    for line in text.lines() {
        let done = match line.split_once(' ') {
            Some(("container", id)) => {
                daemon.remove(id).await.is_ok() || daemon.container(id).await.is_err()
            }
            Some(("image", id)) => {
                daemon.remove_image(id).await.is_ok()
                    || daemon.image_diff_ids(id).await.is_ok_and(|i| i.is_none())
            }
            _ => true,
        };
        if done {
            eprintln!("migrate-in: removed {line}, left by an earlier failed migration");
        } else {
            left.push_str(line);
            left.push('\n');
        }
    }
    if left.is_empty() {
        let _ = fs::remove_file(docker_pending(opts));
    } else {
        let _ = fs::write(docker_pending(opts), left);
    }
}

impl Incoming {
    /// Journals `step`, then fires an injected fault set for it.
    fn step(&mut self, step: Step, fault: Option<Fault>) -> Result<()> {
        if let Some(j) = self.journal.as_mut() {
            j.set(step)?;
        }
        match fault::at(fault, step) {
            Then::Go => Ok(()),
            Then::Drop | Then::Stall => Err(MigrateError::Source(format!(
                "injected fault at {}",
                step.name()
            ))),
        }
    }

    /// Whether the source may have been told this side's copy is ready:
    /// from then on only the source's decision (or migrate-recover)
    /// removes it.
    fn acknowledged(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.step() >= Step::Acknowledged && j.step() != Step::Aborted)
    }

    /// The hand-over was cut after this side acknowledged: its copy stays
    /// as it is, stopped. A copy whose memory was still to come from this
    /// process's page store cannot be whole any more: it is marked so, and
    /// recovery gives the source's copy the win.
    fn in_doubt(&mut self, why: &str) -> MigrateError {
        let id = self.id.clone().unwrap_or_default();
        if let Some(mut lazy) = self.lazy.take() {
            lazy.abort();
            if let Some(j) = self.journal.as_mut() {
                let _ = j.update(|r| r.incomplete = true);
            }
        }
        MigrateError::InDoubt(format!(
            "{why}: container {id} is restored here but stays stopped, and the source's copy frozen, until `migrun migrate-recover {id}` on both hosts"
        ))
    }

    async fn undo(&mut self, root: &StateRoot) {
        if let Some(mut d) = self.docker.take() {
            d.undo(&self.pending).await;
        }
        if let Some(mut lazy) = self.lazy.take() {
            lazy.abort();
        }
        if let (Some(id), true) = (&self.id, self.restored) {
            let _ = lifecycle::delete(root, id, true);
        }
        if let Some(merged) = self.overlay.take() {
            let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
        }
        LayerStore::new(self.layers.clone()).discard_incoming();
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        let _ = fs::remove_dir_all(&self.scratch);
        let _ = fs::remove_dir_all(&self.images);
        if let Some(mut j) = self.journal.take() {
            let _ = j.set(Step::Aborted);
            j.remove();
        }
    }
}

/// Whether process `pid` still runs.
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in an `incoming-<pid>-<nonce>` name.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("incoming-")
        .or_else(|| name.strip_prefix("migrun-incoming-"))
        .and_then(|rest| rest.split('-').next())
        .and_then(|p| p.parse().ok())
}

/// Settles what earlier `migrate-in`s left, from their journals, never from
/// names: a migration cut off while receiving (its process gone) is undone;
/// one cut off after this side acknowledged is in doubt and kept as it is
/// for `migrun migrate-recover`; settled journals go. Scratch directories
/// of dead processes (`incoming-<pid>-…`) go too: they never hold a
/// container's bundle.
fn clean_stale(root: &StateRoot, opts: &InOptions) {
    for j in journal::all(root.path()) {
        let r = j.record().clone();
        if r.role != Role::Target {
            continue;
        }
        if r.step.settled() {
            j.remove();
        } else if journal::writer_alive(r.pid) {
            continue;
        } else if r.step == Step::Receiving {
            eprintln!(
                "migrate-in: undoing the migration of {} that was cut off while receiving",
                r.container
            );
            crate::recover::discard_target_copy(root, &r);
            j.remove();
        } else {
            eprintln!(
                "migrate-in: the migration of {} is in doubt ({}): its copy here stays stopped until `migrun migrate-recover {}`",
                r.container,
                r.step.name(),
                r.container
            );
        }
    }
    let stale = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        owner_pid(&e.file_name().to_string_lossy()).is_some_and(|p| !pid_alive(p))
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    // A restore that was interrupted: a state directory without state.json,
    // holding the bind mount CRIU restores the root from, or killed before
    // it made that (then at least a few seconds old: not a container that
    // another migrun is creating right now).
    let settled = |dir: &Path| {
        fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(2))
    };
    if let Ok(entries) = fs::read_dir(root.path()) {
        for e in entries.flatten() {
            let dir = e.path();
            let criu_root = dir.join("criu-root");
            if e.file_type().is_ok_and(|t| t.is_dir())
                && !dir.join("state.json").exists()
                && (criu_root.exists() || settled(&dir))
                && !e.file_name().to_string_lossy().starts_with('.')
            {
                let _ = nix::mount::umount2(&criu_root, nix::mount::MntFlags::MNT_DETACH);
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    for d in stale(&opts.work_dir)
        .into_iter()
        .chain(stale(Path::new("/dev/shm")))
    {
        let _ = fs::remove_dir_all(d);
    }
}

/// Serves migrations on `opts.listen`; returns after one with `--once`.
pub async fn migrate_in(root: &StateRoot, opts: &InOptions) -> Result<()> {
    let mut interrupts = Interrupts::listen()?;
    clean_stale(root, opts);
    clean_docker_pending(opts).await;
    let key = migrun_wire::load_key(&opts.key)?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| MigrateError::Target(format!("listen on {}: {e}", opts.listen)))?;
    eprintln!("migrate-in: listening on {}", opts.listen);
    // Before `Start` a source may be silent long (it hashes layers): its
    // host and the network still answer TCP keep-alive within this.
    let wire = migrun_wire::Config::default().with_keepalive(Some(opts.peer_timeout));
    loop {
        let accepted = tokio::select! {
            a = migrun_wire::accept_with(&listener, &key, &wire) => a,
            sig = interrupts.next() => {
                eprintln!("migrate-in: {sig}: no migration in progress; exiting");
                return Ok(());
            }
        };
        let mut ch = match accepted {
            Ok(ch) => ch,
            Err(e) => {
                eprintln!("migrate-in: refused a connection: {e}");
                if opts.once {
                    return Err(e.into());
                }
                continue;
            }
        };
        // Until the source has started, the wire's own (longer) time-out;
        // from `Start` on, the peer time-out (see receive_into).
        ch.set_send_timeout(Some(opts.peer_timeout));
        let result = receive(root, opts, ch, &mut interrupts).await;
        match &result {
            Ok(id) => eprintln!("migrate-in: container {id} restored and running"),
            Err(e) => eprintln!("migrate-in: migration failed: {e}"),
        }
        if opts.once {
            return result.map(|_| ());
        }
    }
}

/// Receives one migration; returns the container id once it runs here.
async fn receive(
    root: &StateRoot,
    opts: &InOptions,
    mut ch: Channel,
    interrupts: &mut Interrupts,
) -> Result<String> {
    let name = format!("incoming-{}-{}", std::process::id(), unique());
    // CRIU's images are read once, by the restore in the downtime: keep
    // them in memory when a tmpfs is at hand.
    let shm = Path::new("/dev/shm");
    let images = if shm.is_dir() {
        shm.join(format!("migrun-{name}"))
    } else {
        opts.work_dir.join(&name).join("images")
    };
    let acked = Arc::new(AtomicBool::new(false));
    let restoring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut inc = Incoming {
        dir: PathBuf::new(),
        scratch: opts.work_dir.join(&name),
        journal: None,
        pending: docker_pending(opts),
        acked: acked.clone(),
        restoring: restoring.clone(),
        stop: stop.clone(),
        images,
        id: None,
        restored: false,
        lazy: None,
        overlay: None,
        layers: opts.work_dir.join("layers"),
        docker: None,
    };
    let result = {
        let work = receive_into(root, opts, &mut ch, &mut inc);
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            sig = interrupts.next() => {
                if acked.load(Ordering::SeqCst) {
                    // The source may have committed: finish the hand-over.
                    eprintln!("migrate-in: {sig}: the container is acknowledged to the source; finishing the hand-over");
                    work.await
                } else if restoring.load(Ordering::SeqCst) {
                    // CRIU runs in another thread: let it end, then roll back.
                    stop.store(true, Ordering::SeqCst);
                    work.await.and(Err(MigrateError::Interrupted(sig)))
                } else {
                    Err(MigrateError::Interrupted(sig))
                }
            }
        }
    };
    match result {
        Ok(id) => Ok(id),
        Err(e) if inc.acknowledged() && !matches!(e, MigrateError::Aborted(_)) => {
            // Never undone on this side's own say once acknowledged.
            let e = match e {
                MigrateError::InDoubt(_) => e,
                other => inc.in_doubt(&other.to_string()),
            };
            let _ = ch
                .send(&Message::Error {
                    message: e.to_string(),
                })
                .await;
            Err(e)
        }
        Err(e) => {
            inc.undo(root).await;
            let _ = ch
                .send(&Message::Error {
                    message: e.to_string(),
                })
                .await;
            Err(e)
        }
    }
}

/// A number unique enough for work directory names.
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Makes an image name safe to join to the image directory.
fn safe_name(name: &str) -> Result<&str> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(MigrateError::Protocol(format!("bad image name {name:?}")));
    }
    Ok(name)
}

/// The config the container runs with here: a cgroup of this host's own
/// (on one kernel, source and target must not share the source's cgroup).
fn local_config(config: &str, id: &str, root: &StateRoot) -> Result<String> {
    let mut spec: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| MigrateError::Protocol(format!("bad config.json from the source: {e}")))?;
    let tag: u32 = root
        .path()
        .to_string_lossy()
        .bytes()
        .fold(2166136261u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(16777619)
        });
    spec["linux"]["cgroupsPath"] = serde_json::Value::from(format!("/migrun-{tag:08x}/{id}"));
    spec["root"]["path"] = serde_json::Value::from("rootfs");
    serde_json::to_string_pretty(&spec).map_err(|e| MigrateError::Target(e.to_string()))
}

/// A receive failure: the source went away, or broke the protocol.
fn recv_error(e: migrun_wire::WireError) -> MigrateError {
    use migrun_wire::WireError as W;
    match e {
        W::UnknownMessage(t) => MigrateError::Protocol(format!("unknown message type {t}")),
        W::Malformed(_) | W::FrameTooLarge { .. } | W::FrameTooShort(_) | W::Decrypt => {
            MigrateError::Protocol(e.to_string())
        }
        other => MigrateError::Source(format!("source gone: {other}")),
    }
}

/// Free bytes of the file system holding `path`, and its device.
fn free_space(path: &Path) -> Result<(u64, u64)> {
    let err = |e: nix::errno::Errno| MigrateError::Target(format!("{}: {e}", path.display()));
    let v = nix::sys::statvfs::statvfs(path).map_err(err)?;
    let st = nix::sys::stat::stat(path).map_err(err)?;
    Ok((
        (v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64),
        st.st_dev,
    ))
}

/// Refuses a migration whose files do not fit: each `(dir, bytes)` is data
/// to write under `dir` (with room for metadata on top); the state root
/// needs a little room too.
fn check_space(needs: &[(&Path, u64)], state_root: &Path) -> Result<()> {
    let mut per_fs: Vec<(u64, u64, u64, &Path)> = Vec::new(); // dev, free, need, shown
    for (dir, bytes) in needs {
        let (free, dev) = free_space(dir)?;
        let need = bytes.saturating_add(bytes / 20).saturating_add(8 << 20);
        match per_fs.iter_mut().find(|f| f.0 == dev) {
            Some(f) => f.2 = f.2.saturating_add(need),
            None => per_fs.push((dev, free, need, dir)),
        }
    }
    for (_, free, need, dir) in per_fs {
        if need > free {
            return Err(MigrateError::Target(format!(
                "not enough space for the container's files: {} MiB needed in {}, {} MiB free",
                need >> 20,
                dir.display(),
                free >> 20
            )));
        }
    }
    let (free, _) = free_space(state_root)?;
    if free < 1 << 20 {
        return Err(MigrateError::Target(format!(
            "no space left for container state in {}",
            state_root.display()
        )));
    }
    Ok(())
}

/// The `data_bytes` figure of a JSON object of the start message.
fn data_bytes(v: &serde_json::Value) -> u64 {
    v["data_bytes"].as_u64().unwrap_or(0)
}

/// What the source's `Start` says, acted on: the config written, the
/// Docker container or the overlay layers set up, space checked.
struct Started {
    id: String,
    overlay_layers: Option<Vec<String>>,
}

async fn on_start(
    root: &StateRoot,
    opts: &InOptions,
    ch: &mut Channel,
    inc: &mut Incoming,
    trees: &mut Trees,
    (container_id, spec_json, memory): (String, String, migrun_wire::MemoryTotals),
) -> Result<Started> {
    migrun_runtime::id::validate(&container_id)
        .map_err(|e| MigrateError::Protocol(format!("start: {e}")))?;
    if opts.docker_host.is_none() {
        crate_id_check(root, &container_id)?;
    }
    // Found (and its version asked) now, not inside the downtime.
    checkpoint::criu_binary(&opts.criu)?;
    let v: serde_json::Value = serde_json::from_str(&spec_json)
        .map_err(|e| MigrateError::Protocol(format!("bad start message: {e}")))?;
    let config = v["config"]
        .as_str()
        .ok_or_else(|| MigrateError::Protocol("start without config".into()))?;
    // The journal first: it is what names everything made from here on
    // (and refuses a container whose earlier migration is in doubt here).
    let dir = bundle_dir(root, &container_id);
    inc.journal = Some(Journal::begin(
        root.path(),
        Record {
            role: Role::Target,
            container: container_id.clone(),
            step: Step::Receiving,
            peer: ch
                .info()
                .peer_addr
                .map(|a| a.to_string())
                .unwrap_or_default(),
            dir: Some(dir.clone()),
            images: Some(inc.images.clone()),
            lazy: false,
            incomplete: false,
            scratch: Some(inc.scratch.clone()),
            cpu_limit: None,
            docker_host: opts.docker_host.clone(),
            pid: std::process::id(),
        },
    )?);
    inc.id = Some(container_id.clone());
    inc.step(Step::Receiving, opts.fault)?;
    // Left by a migration of this id that failed before its journal:
    // no container owns it (checked above).
    if opts.docker_host.is_none() && dir.exists() {
        let _ = fs::remove_dir_all(&dir);
    }
    inc.dir = dir;
    let bundle = inc.dir.join("bundle");
    fs::create_dir_all(&bundle)
        .map_err(|e| MigrateError::Target(format!("{}: {e}", bundle.display())))?;
    fs::create_dir_all(&inc.scratch)
        .map_err(|e| MigrateError::Target(format!("{}: {e}", inc.scratch.display())))?;
    let path = bundle.join("config.json");
    fs::write(&path, local_config(config, &container_id, root)?)
        .map_err(|e| MigrateError::Target(format!("{}: {e}", path.display())))?;
    let rootfs_bytes = data_bytes(&v["rootfs"]);
    let mut rootfs_dir = Some(bundle.join("rootfs"));
    match (v.get("docker").filter(|d| !d.is_null()), &opts.docker_host) {
        (Some(d), Some(host)) => {
            let (dock, upper) = docker_start(host, d, ch, rootfs_bytes, &opts.work_dir, root).await?;
            inc.docker = Some(dock);
            rootfs_dir = upper;
            if rootfs_dir.is_none() {
                trees.want_image(&inc.scratch.join("image.tar"))?;
            }
        }
        (Some(_), None) => {
            return Err(MigrateError::Target(
                "the source sends a Docker container: run migrate-in with --docker-host".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(MigrateError::Target(
                "migrate-in --docker-host takes Docker containers (migrate-out --docker-host); the source sends a migrun container".into(),
            ))
        }
        (None, None) => {}
    }
    let mut overlay_layers = None;
    if let Some(offer) = v["overlay"]["layers"].as_array() {
        let sizes = v["overlay"]["data_bytes"].as_array();
        let store = LayerStore::new(opts.work_dir.join("layers"));
        let mut digests = Vec::new();
        let mut wanted = Vec::new();
        let mut layer_bytes = 0u64;
        for (i, d) in offer.iter().enumerate() {
            let d = d
                .as_str()
                .ok_or_else(|| {
                    MigrateError::Protocol("start: a layer digest is not a string".into())
                })?
                .to_string();
            // A malformed digest is not "had": want_layer refuses it below.
            if !store.has(&d) {
                layer_bytes = layer_bytes.saturating_add(
                    sizes
                        .and_then(|s| s.get(i))
                        .and_then(|b| b.as_u64())
                        .unwrap_or(0),
                );
                if !wanted.contains(&d) {
                    wanted.push(d.clone());
                }
            }
            digests.push(d);
        }
        check_space(
            &[(&bundle, rootfs_bytes), (&opts.work_dir, layer_bytes)],
            root.path(),
        )?;
        for d in &wanted {
            trees.want_layer(d)?;
        }
        eprintln!(
            "migrate-in: overlay root filesystem: {} layers, {} to receive",
            digests.len(),
            wanted.len()
        );
        ch.send(&Message::LayersWanted { digests: wanted }).await?;
        rootfs_dir = Some(bundle.join("upper"));
        overlay_layers = Some(digests);
        inc.overlay = Some(bundle.join("rootfs"));
    } else if inc.docker.is_none() {
        check_space(&[(&bundle, rootfs_bytes)], root.path())?;
    }
    fs::create_dir_all(bundle.join("rootfs"))
        .map_err(|e| MigrateError::Target(format!("{}: {e}", bundle.display())))?;
    if let Some(dir) = rootfs_dir {
        trees.set_rootfs(&dir)?;
    }
    eprintln!(
        "migrate-in: receiving container {container_id}: {} processes, {} resident pages, {} MiB of files",
        memory.processes,
        memory.resident_pages,
        rootfs_bytes >> 20
    );
    Ok(Started {
        id: container_id,
        overlay_layers,
    })
}

async fn receive_into(
    root: &StateRoot,
    opts: &InOptions,
    ch: &mut Channel,
    inc: &mut Incoming,
) -> Result<String> {
    let layer_store = LayerStore::new(opts.work_dir.join("layers"));
    let image_dir = inc.images.clone();
    let io =
        |what: &Path, e: std::io::Error| MigrateError::Target(format!("{}: {e}", what.display()));
    let mut store = PageStore::default();
    let mut trees = Trees::new(layer_store.clone());
    let mut phase = Phase::Hello;
    let mut started: Option<Started> = None;
    loop {
        let msg = ch.recv().await.map_err(recv_error)?;
        if let Message::Abort { reason } = &msg {
            return Err(MigrateError::Aborted(reason.clone()));
        }
        if matches!(msg, Message::Heartbeat) {
            continue;
        }
        if let (
            Phase::Hello,
            Message::Recover {
                container,
                step,
                whole,
            },
        ) = (phase, &msg)
        {
            // Not a migration: the source's migrate-recover asking.
            let peer = crate::recover::Peer::parse(step, *whole)?;
            crate::recover::answer(root, ch, container, peer).await?;
            return Ok(format!("{container} (settled with the source)"));
        }
        phase = phase.next(&msg)?;
        if !matches!(msg, Message::FileChunk { .. }) {
            trees.end_file();
        }
        match msg {
            Message::Hello { agent } => tracing::info!("migration from {agent}"),
            Message::Start {
                container_id,
                spec_json,
                memory,
            } => {
                // From here on the source is busy with this migration: a
                // silence longer than the peer time-out is a lost source.
                ch.set_recv_timeout(Some(opts.peer_timeout));
                fs::create_dir_all(&image_dir).map_err(|e| io(&image_dir, e))?;
                started = Some(
                    on_start(
                        root,
                        opts,
                        ch,
                        inc,
                        &mut trees,
                        (container_id, spec_json, memory),
                    )
                    .await?,
                );
            }
            Message::Pages(run) => {
                run.validate().map_err(MigrateError::Protocol)?;
                for (addr, data) in run.pages() {
                    store.insert(run.pid, addr, data);
                }
            }
            Message::FileBegin { tree, path, size } => trees.begin(tree, path, size)?,
            Message::FileChunk { path, offset, data } => trees.chunk(&path, offset, &data)?,
            Message::Manifest { tree, data, last } if last => {
                // Applying a whole tree's manifest can take seconds (a
                // hundred thousand entries): off this thread, with
                // heartbeats meanwhile.
                let mut moved = std::mem::replace(&mut trees, Trees::new(layer_store.clone()));
                let (joined, beat) = crate::liveness::with_heartbeats(
                    ch.sender(),
                    opts.peer_timeout,
                    tokio::task::spawn_blocking(move || {
                        let r = moved.manifest(tree, &data, true);
                        (moved, r)
                    }),
                )
                .await;
                let (back, applied) =
                    joined.map_err(|e| MigrateError::Target(format!("apply a manifest: {e}")))?;
                trees = back;
                applied?;
                beat?;
            }
            Message::Manifest { tree, data, last } => trees.manifest(tree, &data, last)?,
            Message::ImageChunk { offset, data } => trees.image_chunk(offset, &data)?,
            Message::ImageDone { size } => {
                let tar = trees.image_done(size)?;
                let dock = inc.docker.as_mut().ok_or_else(|| {
                    MigrateError::Protocol("an image for a container that is not Docker's".into())
                })?;
                let (loaded, beat) = crate::liveness::with_heartbeats(
                    ch.sender(),
                    opts.peer_timeout,
                    dock.daemon.load(&tar),
                )
                .await;
                loaded?;
                beat?;
                dock.loaded_image = true;
                let _ = fs::remove_file(&tar);
                eprintln!("migrate-in: image {} loaded", dock.image);
                let upper = dock.create().await?;
                trees.set_rootfs(&upper)?;
                // The source waits for this before its rounds: a load
                // still running here must not end up in the downtime.
                ch.send(&Message::Ack).await?;
            }
            Message::RoundDone { round, stats } => {
                tracing::info!(round, pages = stats.pages_sent, "round done");
            }
            Message::Frozen => tracing::info!("source frozen"),
            Message::CriuImages { name, offset, data } => {
                use std::os::unix::fs::FileExt;
                let path = image_dir.join(safe_name(&name)?);
                let f = fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| io(&path, e))?;
                f.write_all_at(&data, offset).map_err(|e| io(&path, e))?;
            }
            Message::Commit => {
                let Some(Started { id, overlay_layers }) = started.take() else {
                    return Err(MigrateError::Protocol("commit before start".into()));
                };
                trees.check_complete()?;
                drop(trees);
                if inc.docker.is_some() {
                    return docker_commit(opts, &image_dir, store, ch, inc).await;
                }
                let bundle = inc.dir.join("bundle");
                return commit(
                    root,
                    opts,
                    ch,
                    inc,
                    (id, overlay_layers, &layer_store, &bundle, &image_dir),
                    store,
                )
                .await;
            }
            other => return Err(out_of_phase(&other, phase)),
        }
    }
}

/// `Commit` of a migrun container: restores it, stopped, acknowledges,
/// and lets it run once the source has released its copy.
async fn commit(
    root: &StateRoot,
    opts: &InOptions,
    ch: &mut Channel,
    inc: &mut Incoming,
    (id, overlay_layers, layer_store, bundle, image_dir): (
        String,
        Option<Vec<String>>,
        &LayerStore,
        &Path,
        &Path,
    ),
    mut store: PageStore,
) -> Result<String> {
    let t = Instant::now();
    eprintln!("migrate-in: restoring {id}");
    if let Some(digests) = &overlay_layers {
        mount_overlay(layer_store, digests, bundle)?;
    }
    let t_overlay = t.elapsed();
    let lazy = start_lazy_pages(opts, image_dir, &mut store)?;
    let hold = crate::netmove::unquiesce_images(image_dir)?;
    let restore_opts = RestoreOptions {
        id: id.clone(),
        bundle: bundle.to_path_buf(),
        image_path: image_dir.to_path_buf(),
        work_path: Some(image_dir.to_path_buf()),
        tcp_established: true,
        criu: opts.criu.clone(),
        lazy_pages: lazy.is_some(),
        // Stopped until the source has let go of its copy:
        // never two running copies.
        leave_stopped: true,
        // The network moves along: the veths go onto the
        // host's bridge before the first packet.
        bridge: opts.bridge.clone(),
        ..Default::default()
    };
    // Completing the images and the restore take seconds for a big
    // container: off this thread, with heartbeats meanwhile (a signal
    // now waits for them: see receive).
    let lazily = lazy.is_some();
    let images_dir = image_dir.to_path_buf();
    let on = root.clone();
    inc.restoring.store(true, Ordering::SeqCst);
    let (joined, beat) = crate::liveness::with_heartbeats(
        ch.sender(),
        opts.peer_timeout,
        tokio::task::spawn_blocking(move || -> Result<Duration> {
            if !lazily {
                let filled = images::complete_images(&images_dir, &store)?;
                tracing::info!(filled, "images completed");
            }
            drop(store);
            let t_lazy = t.elapsed();
            checkpoint::restore(&on, &restore_opts)?;
            Ok(t_lazy)
        }),
    )
    .await;
    inc.restoring.store(false, Ordering::SeqCst);
    let restored = joined
        .map_err(|e| MigrateError::Target(format!("restore: {e}")))
        .and_then(|r| r);
    inc.restored = root.exists(&id);
    let t_lazy = match (restored, beat) {
        (Ok(t_lazy), Ok(())) => t_lazy,
        (Err(e), _) => {
            if let Some(mut lazy) = lazy {
                lazy.abort();
            }
            return Err(e);
        }
        (Ok(_), Err(e)) => {
            if let Some(mut lazy) = lazy {
                lazy.abort();
            }
            return Err(e.into());
        }
    };
    if inc.stop.load(Ordering::SeqCst) {
        return Err(MigrateError::Interrupted("a signal"));
    }
    let t_criu = t.elapsed();
    crate::netmove::after_restore(root, &id, opts.bridge.as_deref(), hold)?;
    inc.lazy = lazy;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "migrate-in: restored {id} in {:.0} ms (overlay {:.0}, memory set-up {:.0}, criu restore {:.0}, network {:.0} ms){}",
        ms(t.elapsed()),
        ms(t_overlay),
        ms(t_lazy - t_overlay),
        ms(t_criu - t_lazy),
        ms(t.elapsed() - t_criu),
        if inc.lazy.is_some() {
            " (memory follows from the page store)"
        } else {
            ""
        }
    );
    acknowledge(opts, ch, inc).await?;
    if let Some(merged) = inc.overlay.take() {
        // The container's mount namespace holds the overlay now;
        // it goes away with the container (an unmount costs
        // milliseconds: not in the downtime).
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    }
    // The source commits, then says Done: only then does ours run.
    // Without Done this copy is in doubt and stays stopped.
    expect_done(ch).await?;
    inc.step(Step::Continued, opts.fault)?;
    checkpoint::continue_container(root, &id)?;
    ch.send(&Message::Ack).await?;
    // The images are no longer needed; the bundle stays: it is the container's.
    if let Some(lazy) = inc.lazy.take() {
        let filled = memory_in_place(ch, opts.peer_timeout, &id, lazy).await;
        if let Err(e) = filled {
            // What of the memory was still to come is gone: this copy
            // must not win (the source keeps its frozen one until Running).
            if let Some(j) = inc.journal.as_mut() {
                let _ = j.update(|r| r.incomplete = true);
            }
            return Err(e);
        }
    }
    let _ = fs::remove_dir_all(image_dir);
    finish(opts, ch, inc).await?;
    Ok(id)
}

/// The copy here is restored and stopped: journaled as acknowledged (from
/// now on only the source's decision removes it), then the source is told.
async fn acknowledge(opts: &InOptions, ch: &mut Channel, inc: &mut Incoming) -> Result<()> {
    let lazy = inc.lazy.is_some();
    if let Some(j) = inc.journal.as_mut() {
        j.update(|r| r.lazy = lazy)?;
    }
    inc.acked.store(true, Ordering::SeqCst);
    inc.step(Step::Acknowledged, opts.fault)?;
    ch.send(&Message::Ack).await?;
    Ok(())
}

/// The copy here runs with all of its memory: journaled, the source told
/// (it lets its frozen copy go then), and the journal settled.
async fn finish(opts: &InOptions, ch: &mut Channel, inc: &mut Incoming) -> Result<()> {
    inc.step(Step::Running, opts.fault)?;
    // The source may be gone by now: this side is done either way.
    let _ = ch.send(&Message::Ack).await;
    if let Some(j) = inc.journal.take() {
        j.remove();
    }
    let _ = fs::remove_dir_all(&inc.scratch);
    Ok(())
}

/// Waits for the source's `Done` (its commit) after our first `Ack`.
async fn expect_done(ch: &mut Channel) -> Result<()> {
    loop {
        match ch.recv().await {
            Ok(Message::Heartbeat) => continue,
            Ok(Message::Done) => return Ok(()),
            Ok(Message::Abort { reason }) => return Err(MigrateError::Aborted(reason)),
            Ok(other) => {
                return Err(MigrateError::Protocol(format!(
                    "{} message while waiting for done",
                    other.kind()
                )))
            }
            Err(e) => {
                return Err(MigrateError::Source(format!(
                    "source gone before it committed: {e}"
                )))
            }
        }
    }
}

/// Starts CRIU's lazy-pages daemon over the page store when every lazy page
/// is there; `None` (a complete-images restore) when the daemon cannot run
/// here. The store moves into the daemon's page server.
fn start_lazy_pages(
    opts: &InOptions,
    image_dir: &Path,
    store: &mut PageStore,
) -> Result<Option<LazyPages>> {
    if !opts.lazy_restore {
        return Ok(None);
    }
    let pages = lazy::check_complete(image_dir, store)?;
    if pages == 0 {
        return Ok(None);
    }
    let bin = checkpoint::criu_binary(&opts.criu)?;
    let shared = Arc::new(std::mem::take(store));
    match LazyPages::start(&bin.path, image_dir, shared.clone()) {
        Ok(lazy) => Ok(Some(lazy)),
        Err(e) => {
            eprintln!("migrate-in: {e}: restoring with complete images instead");
            // The server thread is gone: the store is ours again.
            *store = Arc::try_unwrap(shared).map_err(|_| {
                MigrateError::Target("page store still shared after lazy-pages failed".into())
            })?;
            Ok(None)
        }
    }
}

/// Docker mode, on `Start`: checks the daemon, asks the source for what of
/// the image it lacks, and creates the container at once if it has the
/// image. Returns the container's upper directory once it exists.
async fn docker_start(
    host: &str,
    d: &serde_json::Value,
    ch: &mut Channel,
    rootfs_bytes: u64,
    work_dir: &Path,
    root: &StateRoot,
) -> Result<(DockerIn, Option<PathBuf>)> {
    let daemon = Daemon::connect(host)?;
    daemon.check_driver().await?;
    // The writable layer goes into the daemon's storage.
    let storage = daemon.root_dir().await?;
    check_space(&[(&storage, rootfs_bytes), (work_dir, 0)], root.path())?;
    let inspect = d["inspect"].clone();
    let name = inspect["Name"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string();
    if daemon.container(&name).await.is_ok() {
        return Err(MigrateError::Target(format!(
            "a container named {name} already exists on the target daemon"
        )));
    }
    let image = d["image"].as_str().unwrap_or_default().to_string();
    let diff_ids: Vec<String> = d["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let wanted = if daemon.image_diff_ids(&image).await?.is_some() {
        Vec::new()
    } else {
        let have = daemon.chain_ids().await?;
        let mut w = vec![docker::WANT_IMAGE.to_string()];
        w.extend(docker::missing_layers(&diff_ids, &have));
        w
    };
    eprintln!(
        "migrate-in: Docker container {name}: image {}, {} of {} layers to receive",
        if wanted.is_empty() {
            "present"
        } else {
            "missing"
        },
        wanted.len().saturating_sub(1),
        diff_ids.len()
    );
    let need_image = !wanted.is_empty();
    ch.send(&Message::LayersWanted { digests: wanted }).await?;
    let mut dock = DockerIn {
        daemon,
        inspect,
        image,
        container: None,
        loaded_image: false,
    };
    let upper = if need_image {
        None
    } else {
        Some(dock.create().await?)
    };
    Ok((dock, upper))
}

/// Docker mode, on `Commit`: completes CRIU's images, puts them in the new
/// container's checkpoint directory and starts it from there through the
/// daemon (stopped until the source let go: see LEAVE_STOPPED_MARKER).
async fn docker_commit(
    opts: &InOptions,
    image_dir: &Path,
    mut store: PageStore,
    ch: &mut Channel,
    inc: &mut Incoming,
) -> Result<String> {
    let t = Instant::now();
    let dock = inc
        .docker
        .as_mut()
        .ok_or_else(|| MigrateError::Target("not a Docker migration".into()))?;
    let cid = dock
        .container
        .clone()
        .ok_or_else(|| MigrateError::Protocol("commit before the image arrived".into()))?;
    let name = dock.inspect["Name"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string();
    // The memory stays out of the checkpoint that Docker and containerd
    // copy around: a lazy-pages daemon here serves it to the restore that
    // Docker runs (LAZY_PAGES_MARKER), from the page store.
    let image_dir = fs::canonicalize(image_dir)
        .map_err(|e| MigrateError::Target(format!("{}: {e}", image_dir.display())))?;
    let image_dir = image_dir.as_path();
    let lazy = start_lazy_pages(opts, image_dir, &mut store)?;
    if lazy.is_none() {
        images::complete_images(image_dir, &store)?;
    }
    drop(store);
    inc.lazy = lazy;
    let checkpoint = format!("migrun-{}", unique());
    let dir = dock
        .daemon
        .root_dir()
        .await?
        .join("containers")
        .join(&cid)
        .join("checkpoints")
        .join(&checkpoint);
    let io = |p: &Path, e: std::io::Error| MigrateError::Target(format!("{}: {e}", p.display()));
    fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    for entry in fs::read_dir(image_dir)
        .map_err(|e| io(image_dir, e))?
        .flatten()
    {
        // The images only: not the daemon's socket and log.
        if !entry.file_type().is_ok_and(|t| t.is_file())
            || entry
                .file_name()
                .to_string_lossy()
                .starts_with("lazy-pages.")
        {
            continue;
        }
        let to = dir.join(entry.file_name());
        fs::copy(entry.path(), &to).map_err(|e| io(&to, e))?;
    }
    for name in [docker::LEAVE_STOPPED_MARKER, docker::TCP_CLOSE_MARKER] {
        let marker = dir.join(name);
        fs::write(&marker, b"").map_err(|e| io(&marker, e))?;
    }
    if inc.lazy.is_some() {
        let marker = dir.join(checkpoint::LAZY_PAGES_MARKER);
        fs::write(&marker, image_dir.as_os_str().as_encoded_bytes()).map_err(|e| io(&marker, e))?;
    }
    dock.daemon.start_from_checkpoint(&cid, &checkpoint).await?;
    inc.restored = true;
    eprintln!(
        "migrate-in: restored {name} ({cid:.12}) through Docker in {:.0} ms{}",
        t.elapsed().as_secs_f64() * 1000.0,
        if inc.lazy.is_some() {
            " (memory follows from the page store)"
        } else {
            ""
        }
    );
    acknowledge(opts, ch, inc).await?;
    expect_done(ch).await?;
    inc.step(Step::Continued, opts.fault)?;
    let dock = inc
        .docker
        .as_mut()
        .ok_or_else(|| MigrateError::Target("not a Docker migration".into()))?;
    let running = dock.daemon.container(&cid).await?;
    let pid = running["State"]["Pid"].as_i64().unwrap_or(0);
    let runtime = StateRoot::open(&docker::runtime_root(pid)?, false)?;
    checkpoint::continue_container(&runtime, &cid)?;
    ch.send(&Message::Ack).await?;
    let _ = fs::remove_dir_all(&dir);
    // It is Docker's now: nothing to undo.
    dock.container = None;
    dock.loaded_image = false;
    if let Some(lazy) = inc.lazy.take() {
        if let Err(e) = memory_in_place(ch, opts.peer_timeout, &name, lazy).await {
            if let Some(j) = inc.journal.as_mut() {
                let _ = j.update(|r| r.incomplete = true);
            }
            return Err(e);
        }
    }
    let _ = fs::remove_dir_all(image_dir);
    finish(opts, ch, inc).await?;
    Ok(name)
}

/// Waits until the lazy-pages daemon has put all of the memory of the
/// running container `id` in place. Nothing may end this process before.
async fn memory_in_place(
    ch: &mut Channel,
    peer_timeout: Duration,
    id: &str,
    lazy: LazyPages,
) -> Result<()> {
    let (filled, _) = crate::liveness::with_heartbeats(
        ch.sender(),
        peer_timeout,
        tokio::task::spawn_blocking(move || lazy.finish()),
    )
    .await;
    match filled {
        Ok(Ok((pages, took))) => {
            eprintln!(
                "migrate-in: memory of {id} in place: {pages} pages in {:.0} ms after the restore",
                took.as_secs_f64() * 1000.0
            );
            Ok(())
        }
        Ok(Err(e)) => Err(MigrateError::Target(format!(
            "container {id} runs but its memory could not be completed: {e}"
        ))),
        Err(e) => Err(MigrateError::Target(format!(
            "waiting for the memory of {id}: {e}"
        ))),
    }
}

/// Mounts the overlay of `digests` (uppermost first) with `bundle/upper` as
/// its upper directory on `bundle/rootfs`.
fn mount_overlay(store: &LayerStore, digests: &[String], bundle: &Path) -> Result<()> {
    let mut lower = Vec::new();
    for d in digests {
        if !store.has(d) {
            return Err(MigrateError::Target(format!("layer {d} never arrived")));
        }
        lower.push(store.path(d)?.to_string_lossy().into_owned());
    }
    let (upper, work, merged) = (
        bundle.join("upper"),
        bundle.join("work"),
        bundle.join("rootfs"),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d)
            .map_err(|e| MigrateError::Target(format!("create {}: {e}", d.display())))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    // What the next migration of this container offers (the overlay will
    // be mounted in the container's mount namespace only).
    layers::record_overlay(
        bundle,
        &layers::Overlay {
            lower: lower.iter().map(PathBuf::from).collect(),
            upper: upper.clone(),
        },
    )?;
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| MigrateError::Target(format!("mount overlay on {}: {e}", merged.display())))
}

/// Refuses a container id that already exists here.
fn crate_id_check(root: &StateRoot, id: &str) -> Result<()> {
    if root.exists(id) {
        return Err(MigrateError::Target(format!(
            "container {id} already exists on the target"
        )));
    }
    Ok(())
}
