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
use crate::events::{Event, Events, Origin};
use crate::fault::Fault;
use crate::handover::{TargetCopy, TargetMachine};
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
    /// Where what happens goes (listening, each migration's progress and
    /// end, notices).
    pub events: Events,
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
    /// This side's phases, journaled, from `Start` on.
    machine: Option<TargetMachine>,
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
    /// The layer store, whose unfinished layers a failure removes.
    layers: PathBuf,
    /// How the container is made here (from `Start` on).
    endpoint: Option<Endpoint>,
    /// Where notices go.
    events: Events,
}

/// How an incoming container is made on this side, and unmade on failure:
/// one variant per mode, chosen on `Start` from what the source sends and
/// what this side serves. The receiving flow asks it to prepare, take an
/// image, restore and hand over, or undo, never which mode it is in.
enum Endpoint {
    /// A migrun container under this side's state root.
    Plain(PlainIn),
    /// A Docker container in the daemon of `--docker-host`.
    Docker(DockerIn),
}

/// An incoming migrun container: its overlay, if its root filesystem is one.
struct PlainIn {
    /// The lower layers, uppermost first (an overlay root filesystem).
    layers: Option<Vec<String>>,
    /// Where the overlay is to be mounted on this host (unmounted on failure).
    merged: Option<PathBuf>,
}

impl Endpoint {
    /// On `Start` (`v`: its spec), after the bundle's config is written:
    /// checks that the source sends what this side serves, sets up the
    /// mode's container (Docker's, created in the daemon if it has the
    /// image) or the overlay's layers, tells the source which layers to
    /// send, checks space, and points `trees` at the directory the root
    /// filesystem is received into.
    async fn prepare(
        root: &StateRoot,
        opts: &InOptions,
        ch: &mut Channel,
        trees: &mut Trees,
        v: &serde_json::Value,
        (bundle, scratch): (&Path, &Path),
    ) -> Result<Endpoint> {
        let rootfs_bytes = data_bytes(&v["rootfs"]);
        match (v.get("docker").filter(|d| !d.is_null()), &opts.docker_host) {
            (Some(d), Some(host)) => {
                let (dock, upper) = docker_start(
                    host,
                    d,
                    ch,
                    rootfs_bytes,
                    &opts.work_dir,
                    root,
                    &opts.events,
                )
                .await?;
                match upper {
                    Some(upper) => trees.set_rootfs(&upper)?,
                    None => trees.want_image(&scratch.join("image.tar"))?,
                }
                Ok(Endpoint::Docker(dock))
            }
            (Some(_), None) => Err(MigrateError::Target(
                "the source sends a Docker container: run migrate-in with --docker-host".into(),
            )),
            (None, Some(_)) => Err(MigrateError::Target(
                "migrate-in --docker-host takes Docker containers (migrate-out --docker-host); the source sends a migrun container".into(),
            )),
            (None, None) => {
                let plain = PlainIn::prepare(root, opts, ch, trees, v, bundle).await?;
                Ok(Endpoint::Plain(plain))
            }
        }
    }

    /// `ImageDone`: the image the container needs has arrived (at `tar`).
    async fn image_arrived(
        &mut self,
        tar: &Path,
        opts: &InOptions,
        ch: &mut Channel,
        trees: &mut Trees,
    ) -> Result<()> {
        match self {
            Endpoint::Docker(dock) => dock.image_arrived(tar, opts, ch, trees).await,
            Endpoint::Plain(_) => Err(MigrateError::Protocol(
                "an image for a container that is not Docker's".into(),
            )),
        }
    }

    /// `Commit`: restores the container, stopped, and hands it over (see
    /// [`TargetMachine`]); returns its name once it runs here.
    async fn commit(
        &mut self,
        root: &StateRoot,
        opts: &InOptions,
        ch: &mut Channel,
        inc: &mut Incoming,
        (id, store): (String, PageStore),
    ) -> Result<String> {
        match self {
            Endpoint::Plain(plain) => commit(root, opts, ch, inc, plain, (id, store)).await,
            Endpoint::Docker(dock) => docker_commit(opts, store, ch, inc, dock).await,
        }
    }

    /// Writes what this mode made that a recovery must find (the Docker
    /// container's id in the daemon here) into the journal's record.
    fn note(&self, r: &mut Record) {
        if let Endpoint::Docker(dock) = self {
            r.docker_container = dock.container.clone();
        }
    }

    /// Removes what this mode made for a migration that failed before its
    /// acknowledgement.
    async fn undo(&mut self, pending: &Path, events: &Events) {
        match self {
            Endpoint::Plain(plain) => {
                if let Some(merged) = plain.merged.take() {
                    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
                }
            }
            Endpoint::Docker(dock) => dock.undo(pending, events).await,
        }
    }
}

impl PlainIn {
    /// On `Start`: an overlay root filesystem's layers asked for as far as
    /// the layer store lacks them (the upper directory is what is received),
    /// or the whole tree received into the bundle's `rootfs`; space checked.
    async fn prepare(
        root: &StateRoot,
        opts: &InOptions,
        ch: &mut Channel,
        trees: &mut Trees,
        v: &serde_json::Value,
        bundle: &Path,
    ) -> Result<PlainIn> {
        let rootfs_bytes = data_bytes(&v["rootfs"]);
        let Some(offer) = v["overlay"]["layers"].as_array() else {
            check_space(&[(bundle, rootfs_bytes)], root.path())?;
            trees.set_rootfs(&bundle.join("rootfs"))?;
            return Ok(PlainIn {
                layers: None,
                merged: None,
            });
        };
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
            &[(bundle, rootfs_bytes), (&opts.work_dir, layer_bytes)],
            root.path(),
        )?;
        for d in &wanted {
            trees.want_layer(d)?;
        }
        opts.events.emit(Event::Overlay {
            layers: digests.len(),
            to_receive: wanted.len(),
        });
        ch.send(&Message::LayersWanted { digests: wanted }).await?;
        trees.set_rootfs(&bundle.join("upper"))?;
        Ok(PlainIn {
            layers: Some(digests),
            merged: Some(bundle.join("rootfs")),
        })
    }
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

    /// The image has arrived (at `tar`): loaded into the daemon (with
    /// heartbeats meanwhile), the container created from it, the source told.
    async fn image_arrived(
        &mut self,
        tar: &Path,
        opts: &InOptions,
        ch: &mut Channel,
        trees: &mut Trees,
    ) -> Result<()> {
        let (loaded, beat) =
            crate::liveness::with_heartbeats(ch.sender(), opts.peer_timeout, self.daemon.load(tar))
                .await;
        loaded?;
        beat?;
        self.loaded_image = true;
        let _ = fs::remove_file(tar);
        opts.events.emit(Event::ImageLoaded {
            image: self.image.clone(),
        });
        let upper = self.create().await?;
        trees.set_rootfs(&upper)?;
        // The source waits for this before its rounds: a load still
        // running here must not end up in the downtime.
        ch.send(&Message::Ack).await?;
        Ok(())
    }

    /// Removes what this migration made in the daemon.
    async fn undo(&mut self, pending: &Path, events: &Events) {
        let mut left = Vec::new();
        if let Some(id) = self.container.take() {
            if let Err(e) = self.daemon.remove(&id).await {
                events.warn(
                    Origin::MigrateIn,
                    format!("{e}: removing it when the daemon answers again"),
                );
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
            opts.events.emit(Event::LeftoverRemoved {
                what: line.to_string(),
            });
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
    /// Whether the source may have been told this side's copy is ready:
    /// from then on only the source's decision (or migrate-recover)
    /// removes it.
    fn acknowledged(&self) -> bool {
        self.machine.as_ref().is_some_and(|m| m.acknowledged())
    }

    /// The memory still to come into the restored container `name` (the
    /// lazy-pages daemon moves into it).
    fn memory(&mut self, name: &str, events: &Events) -> Memory {
        Memory {
            name: name.to_string(),
            lazy: self.lazy.take(),
            events: events.clone(),
        }
    }

    /// The phases, once `Start` has begun them.
    fn machine(&mut self) -> Result<&mut TargetMachine> {
        self.machine
            .as_mut()
            .ok_or_else(|| MigrateError::Protocol("commit before start".into()))
    }

    /// `Receiving -> Acknowledged -> Continued -> Running` of the restored,
    /// stopped `copy` (see [`TargetMachine`]); the images and scratch space
    /// go once it runs with all of its memory.
    async fn hand_over<C: TargetCopy>(
        &mut self,
        opts: &InOptions,
        ch: &mut Channel,
        copy: &mut C,
        take_lazy: impl FnOnce(&mut C) -> Option<LazyPages>,
    ) -> Result<()> {
        self.acked.store(true, Ordering::SeqCst);
        let machine = self.machine()?;
        let mut handed = machine.acknowledge(ch, copy).await;
        if handed.is_ok() {
            handed = machine.hand_over(ch, copy, opts.peer_timeout).await;
        }
        // What of the memory is still to come is this side's to end if
        // the hand-over was cut (see in_doubt).
        self.lazy = take_lazy(copy);
        handed?;
        let _ = fs::remove_dir_all(&self.images);
        let _ = fs::remove_dir_all(&self.scratch);
        Ok(())
    }

    /// The hand-over was cut after this side acknowledged: its copy stays
    /// as it is, stopped. A copy whose memory was still to come from this
    /// process's page store cannot be whole any more: it is marked so, and
    /// recovery gives the source's copy the win.
    fn in_doubt(&mut self, why: &str) -> MigrateError {
        let id = self.id.clone().unwrap_or_default();
        if let Some(mut lazy) = self.lazy.take() {
            lazy.abort();
            if let Some(m) = self.machine.as_mut() {
                m.mark_incomplete();
            }
        }
        MigrateError::InDoubt(format!(
            "{why}: container {id} is restored here but stays stopped, and the source's copy frozen, until `migrun migrate-recover {id}` on both hosts"
        ))
    }

    async fn undo(&mut self, root: &StateRoot) {
        if let Some(mut e) = self.endpoint.take() {
            e.undo(&self.pending, &self.events).await;
        }
        if let Some(mut lazy) = self.lazy.take() {
            lazy.abort();
        }
        if let (Some(id), true) = (&self.id, self.restored) {
            let _ = lifecycle::delete(root, id, true);
        }
        LayerStore::new(self.layers.clone()).discard_incoming();
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        let _ = fs::remove_dir_all(&self.scratch);
        let _ = fs::remove_dir_all(&self.images);
        if let Some(mut m) = self.machine.take() {
            m.abort();
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
async fn clean_stale(root: &StateRoot, opts: &InOptions) {
    for j in journal::all(root.path(), &opts.events) {
        let r = j.record().clone();
        if r.role != Role::Target {
            continue;
        }
        if r.step.settled() {
            j.remove();
        } else if journal::writer_alive(&r) {
            continue;
        } else if r.step == Step::Receiving {
            opts.events.emit(Event::StaleUndone {
                container: r.container.clone(),
            });
            crate::recover::discard_target_copy(root, &r, &opts.events).await;
            j.remove();
        } else {
            opts.events.emit(Event::StaleInDoubt {
                container: r.container.clone(),
                step: r.step,
            });
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
    clean_stale(root, opts).await;
    clean_docker_pending(opts).await;
    let key = migrun_wire::load_key(&opts.key)?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| MigrateError::Target(format!("listen on {}: {e}", opts.listen)))?;
    opts.events.emit(Event::Listening {
        addr: opts.listen.clone(),
    });
    // Before `Start` a source may be silent long (it hashes layers): its
    // host and the network still answer TCP keep-alive within this.
    let wire = migrun_wire::Config::default().with_keepalive(Some(opts.peer_timeout));
    loop {
        let accepted = tokio::select! {
            a = migrun_wire::accept_with(&listener, &key, &wire) => a,
            sig = interrupts.next() => {
                opts.events.emit(Event::InterruptedIdle { signal: sig });
                return Ok(());
            }
        };
        let mut ch = match accepted {
            Ok(ch) => ch,
            Err(e) => {
                opts.events.emit(Event::ConnectionRefused {
                    error: e.to_string(),
                });
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
            Ok(id) => opts.events.emit(Event::MigrationDone {
                container: id.clone(),
            }),
            Err(e) => opts.events.emit(Event::MigrationFailed {
                error: e.to_string(),
            }),
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
        machine: None,
        pending: docker_pending(opts),
        acked: acked.clone(),
        restoring: restoring.clone(),
        stop: stop.clone(),
        images,
        id: None,
        restored: false,
        lazy: None,
        layers: opts.work_dir.join("layers"),
        endpoint: None,
        events: opts.events.clone(),
    };
    let result = {
        let work = receive_into(root, opts, &mut ch, &mut inc);
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            sig = interrupts.next() => {
                if acked.load(Ordering::SeqCst) {
                    // The source may have committed: finish the hand-over.
                    opts.events.emit(Event::InterruptedAcknowledged { signal: sig });
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
    let journal = Journal::begin(
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
            docker_container: None,
            pid: std::process::id(),
            pid_start: None,
        },
    )?;
    inc.id = Some(container_id.clone());
    inc.machine = Some(TargetMachine::new(
        journal,
        opts.fault,
        opts.events.clone(),
    )?);
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
    fs::create_dir_all(bundle.join("rootfs"))
        .map_err(|e| MigrateError::Target(format!("{}: {e}", bundle.display())))?;
    let endpoint = Endpoint::prepare(root, opts, ch, trees, &v, (&bundle, &inc.scratch)).await?;
    let noted = inc.machine()?.journal_mut().update(|r| endpoint.note(r));
    inc.endpoint = Some(endpoint);
    noted?;
    let rootfs_bytes = data_bytes(&v["rootfs"]);
    opts.events.emit(Event::Receiving {
        container: container_id.clone(),
        processes: memory.processes,
        resident_pages: memory.resident_pages,
        rootfs_bytes,
    });
    Ok(Started { id: container_id })
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
            crate::recover::answer(root, ch, container, peer, &opts.events).await?;
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
                let mut endpoint = inc
                    .endpoint
                    .take()
                    .ok_or_else(|| MigrateError::Protocol("an image before start".into()))?;
                let arrived = endpoint.image_arrived(&tar, opts, ch, &mut trees).await;
                let noted = inc.machine()?.journal_mut().update(|r| endpoint.note(r));
                inc.endpoint = Some(endpoint);
                arrived?;
                noted?;
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
                let Some(Started { id }) = started.take() else {
                    return Err(MigrateError::Protocol("commit before start".into()));
                };
                trees.check_complete()?;
                drop(trees);
                let mut endpoint = inc
                    .endpoint
                    .take()
                    .ok_or_else(|| MigrateError::Protocol("commit before start".into()))?;
                let handed = endpoint.commit(root, opts, ch, inc, (id, store)).await;
                // Until acknowledged, a failure undoes what it made.
                inc.endpoint = Some(endpoint);
                return handed;
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
    plain: &mut PlainIn,
    (id, mut store): (String, PageStore),
) -> Result<String> {
    let t = Instant::now();
    opts.events.emit(Event::Restoring {
        container: id.clone(),
    });
    let bundle = &inc.dir.join("bundle");
    let image_dir = &inc.images.clone();
    if let Some(digests) = &plain.layers {
        mount_overlay(&LayerStore::new(inc.layers.clone()), digests, bundle)?;
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
    crate::netmove::after_restore(root, &id, opts.bridge.as_deref(), hold, &opts.events)?;
    inc.lazy = lazy;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    opts.events.emit(Event::Restored {
        container: id.clone(),
        total_ms: ms(t.elapsed()),
        overlay_ms: ms(t_overlay),
        memory_setup_ms: ms(t_lazy - t_overlay),
        criu_ms: ms(t_criu - t_lazy),
        network_ms: ms(t.elapsed() - t_criu),
        lazy: inc.lazy.is_some(),
    });
    if let Some(merged) = plain.merged.take() {
        // The container's mount namespace holds the overlay now; it goes
        // away with the container (an unmount costs milliseconds: not in
        // the downtime). The bundle stays: it is the container's.
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    }
    let mut copy = PlainTarget {
        root: root.clone(),
        id: id.clone(),
        memory: inc.memory(&id, &opts.events),
    };
    inc.hand_over(opts, ch, &mut copy, |c| c.memory.lazy.take())
        .await?;
    Ok(id)
}

/// The memory still to come into a restored copy (both modes).
struct Memory {
    /// The container's name, for what is said of it.
    name: String,
    /// The lazy-pages daemon filling it, if it was restored without it.
    lazy: Option<LazyPages>,
    /// Where it says that the memory is in place.
    events: Events,
}

impl Memory {
    /// Waits until all of it is in place (at once without a daemon).
    async fn in_place(&mut self) -> Result<()> {
        match self.lazy.take() {
            Some(lazy) => memory_in_place(&self.name, lazy, &self.events).await,
            None => Ok(()),
        }
    }
}

/// A migrun container restored (stopped) under this side's state root.
struct PlainTarget {
    root: StateRoot,
    id: String,
    memory: Memory,
}

impl TargetCopy for PlainTarget {
    async fn resume(&mut self) -> Result<()> {
        Ok(checkpoint::continue_container(&self.root, &self.id)?)
    }

    async fn memory_in_place(&mut self) -> Result<()> {
        self.memory.in_place().await
    }

    fn lazy(&self) -> bool {
        self.memory.lazy.is_some()
    }
}

/// A Docker container started (stopped) from a checkpoint by this side's
/// daemon.
struct DockerTarget<'a> {
    dock: &'a mut DockerIn,
    /// Its id in the daemon.
    cid: String,
    /// The checkpoint directory it was started from.
    checkpoint: PathBuf,
    memory: Memory,
}

impl TargetCopy for DockerTarget<'_> {
    async fn resume(&mut self) -> Result<()> {
        docker::continue_restored(&self.dock.daemon, &self.cid).await?;
        let _ = fs::remove_dir_all(&self.checkpoint);
        // It runs: it is Docker's now, nothing to undo.
        self.dock.container = None;
        self.dock.loaded_image = false;
        Ok(())
    }

    async fn memory_in_place(&mut self) -> Result<()> {
        self.memory.in_place().await
    }

    fn lazy(&self) -> bool {
        self.memory.lazy.is_some()
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
            opts.events.warn(
                Origin::MigrateIn,
                format!("{e}: restoring with complete images instead"),
            );
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
    events: &Events,
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
    events.emit(Event::DockerContainer {
        name: name.clone(),
        image_present: wanted.is_empty(),
        layers_to_receive: wanted.len().saturating_sub(1),
        layers: diff_ids.len(),
    });
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
    mut store: PageStore,
    ch: &mut Channel,
    inc: &mut Incoming,
    dock: &mut DockerIn,
) -> Result<String> {
    let t = Instant::now();
    let image_dir = &inc.images.clone();
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
    opts.events.emit(Event::DockerRestored {
        name: name.clone(),
        container_id: cid.clone(),
        total_ms: t.elapsed().as_secs_f64() * 1000.0,
        lazy: inc.lazy.is_some(),
    });
    let mut copy = DockerTarget {
        dock,
        cid,
        checkpoint: dir,
        memory: inc.memory(&name, &opts.events),
    };
    inc.hand_over(opts, ch, &mut copy, |c| c.memory.lazy.take())
        .await?;
    Ok(name)
}

/// Waits until the lazy-pages daemon has put all of the memory of the
/// running container `id` in place (and says so to `events`). Nothing may
/// end this process before.
async fn memory_in_place(id: &str, lazy: LazyPages, events: &Events) -> Result<()> {
    match tokio::task::spawn_blocking(move || lazy.finish()).await {
        Ok(Ok((pages, took))) => {
            events.emit(Event::MemoryInPlace {
                container: id.to_string(),
                pages,
                ms: took.as_secs_f64() * 1000.0,
            });
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
