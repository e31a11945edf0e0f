//! `checkpoint` and `restore`: a container's process tree to CRIU images and back.
//!
//! libcontainer checkpoints but does not restore; migrun does both itself,
//! following runc: bind mounts and v1 cgroup mounts are CRIU externals,
//! namespaces given by path are external namespaces, stdio pipes are handed
//! back with inherit-fd, and the restored tree lands in the container's own
//! new cgroup.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use libcgroups::common::{
    AnyCgroupManager, AnyManagerError, CgroupConfig, CgroupManager, ControllerOpt,
};
use libcontainer::config::YoukiConfig;
use libcontainer::container::{Container, ContainerStatus};
use migrun_criu::{CgroupsMode, CriuBinary, DumpRequest, RestoreRequest};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{error_chain, Context, Result, RuntimeError};
use crate::lifecycle::{self, load_bundle_spec};
use crate::state::status_name;
use crate::store::{ContainerMeta, StateRoot};

impl From<migrun_criu::CriuError> for RuntimeError {
    fn from(err: migrun_criu::CriuError) -> Self {
        RuntimeError::Unsupported(error_chain(&err))
    }
}

/// runc's `checkpoint` flags.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// Container id.
    pub id: String,
    /// Where the images go.
    pub image_path: PathBuf,
    /// Where CRIU's log and work files go.
    pub work_path: Option<PathBuf>,
    /// Images of a previous pre-dump (relative to the image path).
    pub parent_path: Option<String>,
    /// Keep the container running.
    pub leave_running: bool,
    /// Allow established TCP connections.
    pub tcp_established: bool,
    /// Allow external unix sockets.
    pub ext_unix_sk: bool,
    /// Allow a shell job.
    pub shell_job: bool,
    /// Handle file locks.
    pub file_locks: bool,
    /// Dump memory only, keep running (needs soft-dirty tracking).
    pub pre_dump: bool,
    /// ADDR:PORT of a CRIU page server.
    pub page_server: Option<String>,
    /// Leave memory for lazy restore.
    pub lazy_pages: bool,
    /// Descriptor CRIU signals readiness on (lazy pages).
    pub status_fd: Option<i32>,
    /// CRIU's cgroups mode.
    pub manage_cgroups_mode: Option<String>,
    /// Namespaces to dump empty (only "network" is supported, as in runc).
    pub empty_ns: Vec<String>,
    /// Deduplicate against parent images.
    pub auto_dedup: bool,
    /// The CRIU binary asked for (`--criu`).
    pub criu: PathBuf,
}

/// runc's `restore` flags.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Id of the restored container (may differ from the checkpointed one).
    pub id: String,
    /// Bundle of the restored container.
    pub bundle: PathBuf,
    /// Where the images are.
    pub image_path: PathBuf,
    /// Where CRIU's log and work files go.
    pub work_path: Option<PathBuf>,
    /// Where to write the restored init's pid.
    pub pid_file: Option<PathBuf>,
    /// Allow established TCP connections.
    pub tcp_established: bool,
    /// Allow external unix sockets.
    pub ext_unix_sk: bool,
    /// Allow a shell job.
    pub shell_job: bool,
    /// Handle file locks.
    pub file_locks: bool,
    /// CRIU's cgroups mode.
    pub manage_cgroups_mode: Option<String>,
    /// Restore with lazy pages.
    pub lazy_pages: bool,
    /// Namespaces restored empty.
    pub empty_ns: Vec<String>,
    /// Deduplicate images.
    pub auto_dedup: bool,
    /// The CRIU binary asked for (`--criu`).
    pub criu: PathBuf,
    /// Leave the restored processes stopped until [`continue_container`].
    pub leave_stopped: bool,
    /// A bridge (in the caller's network namespace) that the outside ends
    /// of the container's restored veths become ports of, up, inside the
    /// restore (CRIU's `veth[IN]:OUT@BRIDGE` external): before the network
    /// is unlocked and the restored TCP connections send their first
    /// packet, which on a link still down would resolve its neighbour in
    /// vain and wait a second (`retrans_time`) for the next try.
    pub bridge: Option<String>,
}

/// A file in an image directory that makes [`restore`] leave the restored
/// processes stopped, as `leave_stopped` does: a migration into a Docker
/// daemon restores through Docker (containerd runs `migrun restore`), and
/// the target must still not run its copy before the source let go of its.
pub const LEAVE_STOPPED_MARKER: &str = "migrun-leave-stopped";

/// Resumes the processes of a container restored with `leave_stopped`.
pub fn continue_container(root: &StateRoot, id: &str) -> Result<()> {
    let container = root.load(id)?;
    for pid in lifecycle::container_pids(&container)? {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    }
    Ok(())
}

/// Whether the spec mounts cgroupfs inside the container.
fn mounts_cgroups(spec: &Spec) -> bool {
    spec.mounts()
        .iter()
        .flatten()
        .any(|m| m.typ().as_deref() == Some("cgroup"))
}

/// Mounts CRIU must treat as external, as (mount point, key) pairs: the
/// spec's bind mounts and, on cgroup v1, every subsystem mount point.
fn external_mounts(spec: &Spec) -> Vec<(String, String)> {
    let mut ext = Vec::new();
    for m in spec.mounts().iter().flatten() {
        if libcontainer::rootfs::utils::is_bind(m) {
            let dest = m.destination().to_string_lossy().into_owned();
            ext.push((dest.clone(), dest));
        }
    }
    if mounts_cgroups(spec) {
        if let Ok(points) = libcgroups::v1::util::list_subsystem_mount_points() {
            for p in points {
                let p = p.to_string_lossy().into_owned();
                if p.starts_with(libcgroups::common::DEFAULT_CGROUP_ROOT) {
                    ext.push((p.clone(), p));
                }
            }
        }
    }
    ext
}

/// Host paths for the external bind mounts on restore: key -> source.
fn external_mount_sources(spec: &Spec) -> Vec<(String, String)> {
    let mut ext = Vec::new();
    for m in spec.mounts().iter().flatten() {
        if libcontainer::rootfs::utils::is_bind(m) {
            let dest = m.destination().to_string_lossy().into_owned();
            let src = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| dest.clone());
            ext.push((dest, src));
        }
    }
    if mounts_cgroups(spec) {
        ext.extend(
            external_mounts(spec)
                .into_iter()
                .filter(|(k, _)| k.starts_with(libcgroups::common::DEFAULT_CGROUP_ROOT)),
        );
    }
    ext
}

/// CRIU's short name and key of a namespace type.
fn ns_key(typ: LinuxNamespaceType) -> (&'static str, &'static str) {
    match typ {
        LinuxNamespaceType::Network => ("net", "extRootNetNS"),
        _ => ("pid", "extRootPidNS"),
    }
}

/// Namespaces the spec joins by path (network and pid): they are external to CRIU.
fn external_namespaces(spec: &Spec) -> Vec<(LinuxNamespaceType, PathBuf)> {
    let mut out = Vec::new();
    if let Some(nss) = spec.linux().as_ref().and_then(|l| l.namespaces().clone()) {
        for ns in nss {
            if matches!(
                ns.typ(),
                LinuxNamespaceType::Network | LinuxNamespaceType::Pid
            ) {
                if let Some(path) = ns.path() {
                    out.push((ns.typ(), path.clone()));
                }
            }
        }
    }
    out
}

/// Whether the spec has prestart or createRuntime hooks, which is how a
/// caller that manages the container's network itself sets it up (Docker's
/// `libnetwork-setkey`). runc leaves network namespaces to such callers
/// and always dumps them empty; migrun does so for these specs, and keeps
/// the namespace's configuration for the others (its own network move).
fn network_set_up_by_hooks(spec: &Spec) -> bool {
    spec.hooks().as_ref().is_some_and(|h| {
        #[allow(deprecated)]
        let prestart = h.prestart().as_ref().is_some_and(|v| !v.is_empty());
        prestart || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
    })
}

/// Marker in an image directory: the dump skipped CRIU's network lock.
const NETLOCK_SKIPPED: &str = "migrun-netlock-skipped";

/// Whether the network namespace of `pid` has no interface but loopback:
/// then nothing outside can send it packets and CRIU's network lock (two
/// iptables runs, ~150 ms of a migration's downtime) protects nothing.
fn loopback_only(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|dev| {
            dev.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .all(|name| name.trim() == "lo")
        })
        .unwrap_or(false)
}

/// A file in an image directory that makes [`restore`] restore the dumped
/// TCP connections closed (CRIU's `--tcp-close`). A container migrated into
/// a Docker daemon gets a new address there, so its connections cannot go
/// on; its programs see them fail and reconnect. Docker restores through
/// containerd, which passes no `--tcp-established`: without this, CRIU
/// refuses the images ("Connected TCP socket in image").
pub const TCP_CLOSE_MARKER: &str = "migrun-tcp-close";

/// A file in an image directory naming (as its content) the work directory
/// of a running `criu lazy-pages` daemon that serves these images' lazy
/// pages: [`restore`] then restores lazily (CRIU's `--lazy-pages`) with that
/// directory as its work directory, where the daemon's socket is. This is
/// how a migration into a Docker daemon restores without the memory in the
/// images: Docker and containerd copy the checkpoint around (a GiB of pages
/// several times) and pass runc's flags only, none of which asks for lazy
/// pages. Without the daemon's socket there the restore fails with a clear
/// error instead of restoring processes without their memory.
pub const LAZY_PAGES_MARKER: &str = "migrun-lazy-pages";

/// The lazy-pages daemon's work directory named by `image_path`'s
/// [`LAZY_PAGES_MARKER`], if any.
fn lazy_pages_daemon(image_path: &Path) -> Result<Option<PathBuf>> {
    let marker = image_path.join(LAZY_PAGES_MARKER);
    let Ok(text) = fs::read_to_string(&marker) else {
        return Ok(None);
    };
    let dir = PathBuf::from(text.trim());
    if !dir.join("lazy-pages.socket").exists() {
        return Err(RuntimeError::InvalidInput(format!(
            "{}: the lazy-pages daemon of these images is gone (no socket in {}): its memory is not in the images",
            image_path.display(),
            dir.display()
        )));
    }
    Ok(Some(dir))
}

/// Marker in an image directory: the network namespace was dumped empty
/// (it had only loopback and no sockets, or `--empty-ns network` asked for
/// it); restore restores it empty, runs the prestart hooks and brings
/// loopback up.
const NETNS_EMPTIED: &str = "migrun-netns-emptied";

/// Whether the network namespace of `pid` holds no inet socket at all, so
/// that nothing in it depends on its (loopback-only) state.
fn no_inet_sockets(pid: i32) -> bool {
    ["tcp", "tcp6", "udp", "udp6", "raw", "raw6"]
        .iter()
        .all(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .map(|text| text.lines().skip(1).all(|l| l.trim().is_empty()))
                .unwrap_or(true)
        })
}

/// Marker in an image directory: the interfaces (besides loopback) of the
/// dumped network namespace, one name a line. A veth among them has its
/// peer outside the namespace (CRIU dumps only the inside end); restore
/// recreates the pair with the outside end named by [`veth_outside_name`]
/// in the restoring process's network namespace.
const NETDEVS: &str = "migrun-netdevs";

/// The interfaces of the network namespace of `pid`, loopback excepted.
fn interfaces(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|dev| {
            dev.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(|name| name.trim().to_string())
                .filter(|name| !name.is_empty() && name != "lo")
                .collect()
        })
        .unwrap_or_default()
}

/// Name of the outside end of veth `inside` of container `id` restored
/// under `root`: `mr` and 8 hex digits of a hash of the three (at most 15
/// characters, as interface names must be), unique per root, id and name.
pub fn veth_outside_name(root: &StateRoot, id: &str, inside: &str) -> String {
    let text = format!("{}/{id}/{inside}", root.path().display());
    let hash = text.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    format!("mr{hash:08x}")
}

/// The veths recorded in `image_path` as (inside name, outside name) of
/// container `id` restored under `root` (nothing when the namespace was
/// dumped without interfaces).
fn restored_veths(root: &StateRoot, id: &str, image_path: &Path) -> Vec<(String, String)> {
    fs::read_to_string(image_path.join(NETDEVS))
        .map(|names| {
            names
                .lines()
                .map(str::trim)
                .filter(|n| !n.is_empty() && !n.contains([']', ':', '@']))
                .map(|n| (n.to_string(), veth_outside_name(root, id, n)))
                .collect()
        })
        .unwrap_or_default()
}

/// The CRIU externals that name the outside ends of the veths recorded in
/// `image_path`, with `@bridge` when they are to become ports of `bridge`:
/// CRIU then plugs them in and brings them up itself, after making them
/// and before it unlocks the network (see [`RestoreOptions::bridge`]).
fn veth_externals(
    root: &StateRoot,
    id: &str,
    image_path: &Path,
    bridge: Option<&str>,
) -> Vec<String> {
    let on_bridge = bridge.map(|b| format!("@{b}")).unwrap_or_default();
    restored_veths(root, id, image_path)
        .into_iter()
        .map(|(inside, outside)| format!("veth[{inside}]:{outside}{on_bridge}"))
        .collect()
}

/// Sets loopback up in the network namespace of `pid` (what a fresh
/// namespace lacks and a loopback-only container had).
fn loopback_up(pid: i32) -> Result<()> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .ctx(|| format!("open network namespace of {pid}"))?;
    crate::netdev::in_netns(&ns, || crate::netdev::Socket::for_ioctls()?.set_up("lo"))
        .ctx(|| format!("set loopback up in the network namespace of {pid}"))
}

/// Freezes the cgroup of the paused container `id` again while a CRIU dump
/// holds its tasks, and waits until the freezer says so.
///
/// CRIU's `--freeze-cgroup` on cgroup v1 seizes the tasks of a frozen
/// cgroup and then *thaws* it: the tasks wait in its ptrace stop, and run
/// on the moment CRIU lets them go (when it is ended after a lazy dump, or
/// dies). Frozen again, they stay as they are until the container is
/// resumed or killed.
pub fn refreeze(root: &StateRoot, id: &str) -> Result<()> {
    let container = root.load(id)?;
    let Some(dir) = freezer_dir(&container) else {
        return Err(RuntimeError::InvalidInput(format!(
            "container {id} has no freezer cgroup to hold it in"
        )));
    };
    let state = Path::new(&dir).join("freezer.state");
    fs::write(&state, "FROZEN").ctx(|| format!("freeze {}", state.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = fs::read_to_string(&state).ctx(|| format!("read {}", state.display()))?;
        if now.trim() == "FROZEN" {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(RuntimeError::InvalidInput(format!(
                "container {id} did not freeze in 5 s ({} says {})",
                state.display(),
                now.trim()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Freezer cgroup directory of a container (cgroup v1).
fn freezer_dir(container: &Container) -> Option<String> {
    let config = container.spec().ok()?;
    let rel = config
        .cgroup_path
        .to_string_lossy()
        .trim_start_matches('/')
        .to_string();
    let dir = Path::new(libcgroups::common::DEFAULT_CGROUP_ROOT)
        .join("freezer")
        .join(rel);
    dir.is_dir().then(|| dir.to_string_lossy().into_owned())
}

/// Parses "ADDR:PORT".
fn parse_page_server(text: &str) -> Result<(String, i32)> {
    let (addr, port) = text.rsplit_once(':').ok_or_else(|| {
        RuntimeError::InvalidInput(format!(
            "invalid --page-server {text:?}: expected ADDR:PORT"
        ))
    })?;
    let port = port.parse().map_err(|_| {
        RuntimeError::InvalidInput(format!("invalid --page-server port in {text:?}"))
    })?;
    Ok((addr.to_string(), port))
}

/// Parses `--empty-ns` values: only the network namespace can be left empty.
fn empty_net_ns(values: &[String]) -> Result<bool> {
    let mut net = false;
    for v in values {
        match v.as_str() {
            "network" | "net" => net = true,
            other => {
                return Err(RuntimeError::InvalidInput(format!(
                    "--empty-ns {other:?} is not supported: only network"
                )))
            }
        }
    }
    Ok(net)
}

/// Parses an optional `--manage-cgroups-mode`.
fn cgroups_mode(text: &Option<String>) -> Result<Option<CgroupsMode>> {
    Ok(match text {
        Some(t) => Some(CgroupsMode::parse(t)?),
        None => None,
    })
}

/// Finds CRIU (version 4 or newer) as asked.
pub fn criu_binary(requested: &Path) -> Result<CriuBinary> {
    Ok(migrun_criu::resolve(requested)?)
}

/// Checkpoints container `opts.id` into `opts.image_path`.
///
/// Without `--leave-running` the container is gone afterwards, as with runc.
/// A failed checkpoint leaves the container running as it was.
pub fn checkpoint(root: &StateRoot, opts: &CheckpointOptions) -> Result<()> {
    let _span = tracing::info_span!("checkpoint", id = %opts.id).entered();
    let mut container = root.load(&opts.id)?;
    if !matches!(
        container.status(),
        ContainerStatus::Running | ContainerStatus::Paused
    ) {
        return Err(RuntimeError::WrongStatus {
            id: opts.id.clone(),
            status: status_name(container.status()).to_string(),
            action: "checkpoint (only a running container can)",
        });
    }
    let pid = container
        .pid()
        .ok_or_else(|| RuntimeError::InvalidInput(format!("container {} has no pid", opts.id)))?;
    let bin = criu_binary(&opts.criu)?;
    if opts.pre_dump {
        bin.require_dirty_tracking()?;
    }
    migrun_criu::images::ensure_writable_dir(&opts.image_path)?;
    let image_path = fs::canonicalize(&opts.image_path)
        .ctx(|| format!("resolve {}", opts.image_path.display()))?;
    let spec = load_bundle_spec(container.bundle())?;
    if opts.pre_dump {
        return pre_dump(&bin, pid, &image_path, opts);
    }
    let req = dump_request(root, &container, &spec, &image_path, opts)?;
    // Freeze first: CRIU freezes a cgroup by polling its state every 100 ms,
    // the freezer itself takes microseconds. CRIU leaves a cgroup it found
    // frozen as it was, so thawing is ours.
    let was_running = container.status() == ContainerStatus::Running;
    if was_running {
        lifecycle::pause(root, &opts.id)?;
    }
    // Stopped since `dump_request` looked: frozen, none can stop any more.
    let dumped = refuse_stopped_processes(&container)
        .and_then(|()| migrun_criu::dump(&bin, &req).map_err(RuntimeError::from));
    if was_running && (dumped.is_err() || opts.leave_running) {
        lifecycle::resume(root, &opts.id)?;
    }
    dumped?;
    if !opts.leave_running {
        // The processes are gone; remove the container as runc does (its
        // bundle stays: the checkpoint is restored from it).
        container
            .refresh_status()
            .ctx(|| "refresh status".to_string())?;
        lifecycle::delete_keep_bundle(root, &opts.id, true)?;
    }
    Ok(())
}

/// Refuses a container with a stopped process (SIGSTOP, SIGTSTP) whose
/// freezer is cgroup v1. Its dump runs frozen, and ptrace's attach to a
/// stopped task of a v1-frozen cgroup waits for the task to leave its
/// stop, which it cannot do frozen: CRIU would hang for good, the
/// container frozen. (The v2 freezer lets the task trap for ptrace: CRIU
/// dumps it, stopped.)
pub fn refuse_stopped_processes(container: &Container) -> Result<()> {
    if freezer_dir(container).is_none() {
        return Ok(());
    }
    for pid in lifecycle::container_pids(container)? {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue; // gone meanwhile
        };
        if tasks.flatten().any(|t| task_stopped(&t.path())) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            return Err(RuntimeError::Unsupported(format!(
                "process {pid} ({}) of container {} is stopped (SIGSTOP or SIGTSTP): CRIU cannot dump a stopped process in a cgroup v1 freezer (it would wait for it for good); let it continue (kill -CONT {pid}) and try again",
                comm.trim(),
                container.id()
            )));
        }
    }
    Ok(())
}

/// Whether the task at `/proc/PID/task/TID` is in a group stop: state `T`,
/// or, frozen by a v1 freezer (which reports every frozen task as `D`
/// where it sleeps), sleeping in the kernel's `do_signal_stop`.
fn task_stopped(task: &Path) -> bool {
    let state = fs::read_to_string(task.join("stat")).ok().and_then(|stat| {
        // The state follows the command, which ends at the last ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.trim_start().chars().next()
    });
    match state {
        Some('T') => true,
        Some('D') => {
            fs::read_to_string(task.join("wchan")).is_ok_and(|w| w.trim() == "do_signal_stop")
        }
        _ => false,
    }
}

/// The CRIU dump request for `container` with runc's `checkpoint` options;
/// also records the container's stdio in the image directory. Refuses a
/// container with a stopped process ([`refuse_stopped_processes`]).
pub fn dump_request(
    root: &StateRoot,
    container: &Container,
    spec: &Spec,
    image_path: &Path,
    opts: &CheckpointOptions,
) -> Result<DumpRequest> {
    let pid = container.pid().ok_or_else(|| {
        RuntimeError::InvalidInput(format!("container {} has no pid", container.id()))
    })?;
    refuse_stopped_processes(container)?;
    migrun_criu::images::save_descriptors(image_path, pid.as_raw())?;
    let network_lock_skip = loopback_only(pid.as_raw());
    if network_lock_skip {
        fs::write(image_path.join(NETLOCK_SKIPPED), b"")
            .ctx(|| format!("write {}", image_path.display()))?;
    }
    // A private loopback-only namespace without sockets carries no state
    // worth dumping (runc always dumps it empty): dump it empty, and have
    // restore bring loopback up. Saves CRIU's ip/iptables/nft runs.
    let own_netns = !external_namespaces(spec)
        .iter()
        .any(|(t, _)| *t == LinuxNamespaceType::Network);
    let empty_netns = network_lock_skip && own_netns && no_inet_sockets(pid.as_raw());
    // A namespace that the caller's hooks set up (Docker: libnetwork's
    // prestart hook moves its veth in) is theirs to set up again on
    // restore, wherever that is: dumped empty, as runc always does.
    let empty_asked = empty_net_ns(&opts.empty_ns)? || network_set_up_by_hooks(spec);
    // Dumped empty on request too (`--empty-ns network`, a migration into
    // another Docker daemon): whoever restores it, even without the flag
    // (containerd), must restore it empty and let the hooks set it up.
    if empty_netns || (own_netns && empty_asked) {
        fs::write(image_path.join(NETNS_EMPTIED), b"")
            .ctx(|| format!("write {}", image_path.display()))?;
    }
    if own_netns && !network_lock_skip {
        let devs = interfaces(pid.as_raw());
        if !devs.is_empty() {
            fs::write(image_path.join(NETDEVS), devs.join("\n") + "\n")
                .ctx(|| format!("write {}", image_path.display()))?;
        }
    }
    let mut externals = Vec::new();
    for (typ, path) in external_namespaces(spec) {
        let meta = fs::metadata(&path).ctx(|| format!("stat namespace {}", path.display()))?;
        let (name, key) = ns_key(typ);
        use std::os::unix::fs::MetadataExt;
        externals.push(format!("{name}[{}]:{key}", meta.ino()));
    }
    Ok(DumpRequest {
        pid: pid.as_raw(),
        image_dir: image_path.to_path_buf(),
        work_dir: opts.work_path.clone(),
        parent_path: opts.parent_path.clone(),
        leave_running: opts.leave_running,
        tcp_established: opts.tcp_established,
        ext_unix_sk: opts.ext_unix_sk,
        shell_job: opts.shell_job,
        file_locks: opts.file_locks,
        page_server: opts
            .page_server
            .as_deref()
            .map(parse_page_server)
            .transpose()?,
        lazy_pages: opts.lazy_pages,
        status_fd: opts.status_fd,
        cgroups_mode: cgroups_mode(&opts.manage_cgroups_mode)?,
        empty_net_ns: empty_asked || empty_netns,
        auto_dedup: opts.auto_dedup,
        root: root.meta(container.id()).rootfs,
        external_mounts: external_mounts(spec),
        externals,
        freeze_cgroup: freezer_dir(container),
        network_lock_skip,
        tcp_skip_in_flight: false,
    })
}

/// `checkpoint --pre-dump` on a kernel that has soft-dirty tracking.
fn pre_dump(bin: &CriuBinary, pid: Pid, image_path: &Path, opts: &CheckpointOptions) -> Result<()> {
    let mut cmd = std::process::Command::new(&bin.path);
    cmd.args(["pre-dump", "--track-mem", "-v4", "-o", "pre-dump.log", "-t"])
        .arg(pid.as_raw().to_string())
        .arg("-D")
        .arg(image_path);
    if let Some(parent) = &opts.parent_path {
        cmd.arg("--prev-images-dir").arg(parent);
    }
    if let Some(work) = &opts.work_path {
        cmd.arg("-W").arg(work);
    }
    let out = cmd.output().ctx(|| format!("run {}", bin.path.display()))?;
    if !out.status.success() {
        let log = opts
            .work_path
            .as_deref()
            .unwrap_or(image_path)
            .join("pre-dump.log");
        return Err(RuntimeError::Unsupported(format!(
            "criu pre-dump failed: {} (log: {})",
            migrun_criu::images::first_error_line(&log).unwrap_or_default(),
            log.display()
        )));
    }
    Ok(())
}

/// The spec's prestart and createRuntime hooks, to run when CRIU has set up
/// the restored tree's namespaces, as runc's restore does. Docker configures
/// a container's network in such a hook (`libnetwork-setkey`), so without
/// them a container migrated into another Docker daemon has no network.
fn prestart_hooks(
    spec: &Spec,
    id: &str,
    bundle: &Path,
    state_dir: &Path,
) -> Option<migrun_criu::SetupNamespacesHook> {
    let hooks = spec.hooks().as_ref()?;
    let to_run: Vec<_> = [hooks.prestart(), hooks.create_runtime()]
        .into_iter()
        .flatten()
        .flatten()
        .cloned()
        .collect();
    if to_run.is_empty() {
        return None;
    }
    let mut state = libcontainer::container::State::new(
        id,
        ContainerStatus::Creating,
        None,
        bundle.to_path_buf(),
    );
    state.annotations = spec.annotations().clone();
    let cwd = state_dir.to_path_buf();
    Some(Box::new(move |pid| {
        state.pid = Some(pid);
        libcontainer::hooks::run_hooks(Some(&to_run), Some(&state), Some(&cwd), None, None)
            .map_err(|e| format!("prestart hook: {}", error_chain(&e)))
    }))
}

/// Moves the calling thread into `manager`'s cgroups for a restore: CRIU,
/// forked from this thread, and the tree it restores inherit them.
///
/// On cgroup v1 only this thread moves, by writing `0` to `tasks`: the
/// kernel then skips its RCU-synchronised global lock, about 10 ms of a
/// migration's downtime, even when the process has other threads (the
/// lazy-page server of `migrate-in`). Elsewhere the whole process moves.
fn enter_cgroup(manager: &AnyCgroupManager) -> std::result::Result<(), AnyManagerError> {
    match manager {
        AnyCgroupManager::V1(v1) => v1.add_calling_thread().map_err(AnyManagerError::from),
        other => other.add_task(nix::unistd::getpid()),
    }
}

/// The calling thread's cgroup memberships, to return to after a restore.
struct CgroupReturn {
    lines: String,
}

impl CgroupReturn {
    /// Records where this thread is now.
    fn save() -> Self {
        Self {
            lines: fs::read_to_string("/proc/thread-self/cgroup").unwrap_or_default(),
        }
    }

    /// Moves this thread back into every cgroup it was in: on v1 by writing
    /// `0` to `tasks` (this thread, no global lock, see [`enter_cgroup`]),
    /// on v2 (which has no `tasks`) by writing the pid to `cgroup.procs`.
    fn restore(&self) {
        let pid = std::process::id().to_string();
        let now = fs::read_to_string("/proc/thread-self/cgroup").unwrap_or_default();
        // Only the hierarchies this thread left: a write that moves nothing
        // still takes the kernel's lock on v2.
        for line in self.lines.lines().filter(|l| !now.lines().any(|n| n == *l)) {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let path = path.trim_start_matches('/');
            let mounts: Vec<PathBuf> = if controllers.is_empty() {
                vec![
                    PathBuf::from("/sys/fs/cgroup/unified"),
                    PathBuf::from("/sys/fs/cgroup"),
                ]
            } else {
                controllers
                    .split(',')
                    .map(|c| PathBuf::from("/sys/fs/cgroup").join(c.trim_start_matches("name=")))
                    .collect()
            };
            for mp in mounts {
                let dir = mp.join(path);
                let tasks = dir.join("tasks");
                if tasks.exists() && fs::write(&tasks, "0").is_ok() {
                    break;
                }
                let procs = dir.join("cgroup.procs");
                if procs.exists() && fs::write(&procs, &pid).is_ok() {
                    break;
                }
            }
        }
    }
}

/// Creates the spec's missing mount points under `rootfs` before a restore,
/// as runc does: directories, or empty files for bind mounts of files.
/// Never follows a symbolic link inside the rootfs (such a mount point is
/// left alone, and CRIU reports it).
fn create_mountpoints(rootfs: &Path, spec: &Spec) {
    for m in spec.mounts().iter().flatten() {
        let rel: PathBuf = m
            .destination()
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        let mut path = rootfs.to_path_buf();
        let mut safe = true;
        let count = rel.components().count();
        for (i, part) in rel.components().enumerate() {
            path.push(part);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    safe = false;
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    let file = i + 1 == count
                        && libcontainer::rootfs::utils::is_bind(m)
                        && m.source().as_ref().is_some_and(|s| s.is_file());
                    let made = if file {
                        fs::write(&path, b"")
                    } else {
                        fs::create_dir(&path)
                    };
                    if made.is_err() {
                        safe = false;
                        break;
                    }
                }
            }
        }
        if !safe {
            tracing::debug!("mount point {} not created", m.destination().display());
        }
    }
}

/// Undoes a failed restore: rootfs bind mount, cgroup, state directory.
fn abandon_restore(dir: &Path, criu_root: &Path, cgroup: Option<&dyn Fn()>) {
    let _ = umount2(criu_root, MntFlags::MNT_DETACH);
    if let Some(remove) = cgroup {
        remove();
    }
    let _ = fs::remove_dir_all(dir);
}

/// Restores a container from CRIU images into a new container `opts.id`.
pub fn restore(root: &StateRoot, opts: &RestoreOptions) -> Result<Container> {
    restore_with_stdio(root, opts, [0, 1, 2])
}

/// [`restore`], with the checkpointed stdio pipes bound to `stdio` (the
/// descriptors that become the restored process's fds 0, 1 and 2) instead
/// of the calling process's own stdio. CRIU inherits them, so they must not
/// be close-on-exec.
pub fn restore_with_stdio(
    root: &StateRoot,
    opts: &RestoreOptions,
    stdio: [RawFd; 3],
) -> Result<Container> {
    let _span = tracing::info_span!("restore", id = %opts.id).entered();
    crate::id::validate(&opts.id)?;
    if root.container_dir(&opts.id).exists() {
        return Err(RuntimeError::AlreadyExists(opts.id.clone()));
    }
    let bundle = fs::canonicalize(&opts.bundle).map_err(|e| RuntimeError::Bundle {
        path: opts.bundle.clone(),
        reason: error_chain(&e),
    })?;
    let spec = load_bundle_spec(&bundle)?;
    migrun_criu::images::check_image_dir(&opts.image_path)?;
    let image_path = fs::canonicalize(&opts.image_path)
        .ctx(|| format!("resolve {}", opts.image_path.display()))?;
    let descriptors = migrun_criu::images::load_descriptors(&image_path)?;
    let bin = criu_binary(&opts.criu)?;
    let mode = cgroups_mode(&opts.manage_cgroups_mode)?;
    let emptied = migrun_criu::images::check_image_dir(&opts.image_path).is_ok()
        && opts.image_path.join(NETNS_EMPTIED).exists();
    let empty_net = empty_net_ns(&opts.empty_ns)? || emptied;
    let lazy_daemon = lazy_pages_daemon(&image_path)?;
    if let Some(bridge) = &opts.bridge {
        if crate::netdev::ifindex(bridge).is_none() {
            return Err(RuntimeError::InvalidInput(format!(
                "bridge {bridge} (--bridge) does not exist in this network namespace"
            )));
        }
    }

    let dir = root.container_dir(&opts.id);
    fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let config = YoukiConfig::from_spec(&spec, &opts.id)
        .and_then(|c| c.save(&dir).map(|_| c))
        .map_err(|e| RuntimeError::InvalidInput(format!("save config of {}: {e}", opts.id)));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
    };

    // CRIU mounts the root from a private bind mount of the rootfs (as runc does).
    let rootfs = lifecycle::rootfs_of(&bundle, &spec);
    // CRIU mounts the checkpointed mounts on their mount points: a fresh
    // rootfs (containerd's new snapshot) may lack them, e.g. /run.
    create_mountpoints(&rootfs, &spec);
    let criu_root = dir.join("criu-root");
    let bound = fs::create_dir_all(&criu_root)
        .ctx(|| format!("create {}", criu_root.display()))
        .and_then(|_| {
            mount(
                Some(&rootfs),
                &criu_root,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(|| format!("bind mount {}", rootfs.display()))
        });
    if let Err(e) = bound {
        abandon_restore(&dir, &criu_root, None);
        return Err(e);
    }

    // The restored tree inherits CRIU's cgroups, and CRIU inherits ours: enter
    // the container's new cgroup for the duration of the restore.
    let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: config.cgroup_path.clone(),
        systemd_cgroup: root.systemd(),
        container_name: opts.id.clone(),
    })
    .map_err(|e| RuntimeError::Cgroup {
        context: format!("create cgroup of {}", opts.id),
        reason: error_chain(&e),
    });
    let manager = match manager {
        Ok(m) => m,
        Err(e) => {
            abandon_restore(&dir, &criu_root, None);
            return Err(e);
        }
    };
    let remove_cgroup = || {
        let _ = manager.remove();
    };
    let back = CgroupReturn::save();
    let entered = enter_cgroup(&manager)
        .and_then(
            |_| match spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
                Some(resources) => manager.apply(&ControllerOpt {
                    resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                }),
                None => Ok(()),
            },
        )
        .map_err(|e| RuntimeError::Cgroup {
            context: format!("enter cgroup of {}", opts.id),
            reason: error_chain(&e),
        });
    if let Err(e) = entered {
        back.restore();
        abandon_restore(&dir, &criu_root, Some(&remove_cgroup));
        return Err(e);
    }

    // Namespaces joined by path come back as the same namespaces.
    let mut keep_open: Vec<OwnedFd> = Vec::new();
    let mut inherit = Vec::new();
    for (typ, path) in external_namespaces(&spec) {
        match nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => {
                // SAFETY: `open` returned a fresh descriptor that nothing else owns.
                let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                inherit.push((owned.as_raw_fd(), ns_key(typ).1.to_string()));
                keep_open.push(owned);
            }
            Err(e) => {
                back.restore();
                abandon_restore(&dir, &criu_root, Some(&remove_cgroup));
                return Err(e).ctx(|| format!("open namespace {}", path.display()));
            }
        }
    }
    // The checkpointed stdio pipes become this process's stdio (as runc does).
    for (fd, target) in descriptors.iter().enumerate() {
        if target.contains("pipe:") {
            inherit.push((stdio.get(fd).copied().unwrap_or(fd as i32), target.clone()));
        }
    }
    let req = RestoreRequest {
        image_dir: image_path.clone(),
        work_dir: lazy_daemon.clone().or_else(|| opts.work_path.clone()),
        root: criu_root.clone(),
        external_mounts: external_mount_sources(&spec),
        inherit_fds: inherit,
        tcp_established: opts.tcp_established,
        ext_unix_sk: opts.ext_unix_sk,
        shell_job: opts.shell_job,
        file_locks: opts.file_locks,
        cgroups_mode: mode,
        lazy_pages: opts.lazy_pages || lazy_daemon.is_some(),
        empty_net_ns: empty_net,
        auto_dedup: opts.auto_dedup,
        rst_sibling: true,
        network_lock_skip: image_path.join(NETLOCK_SKIPPED).exists(),
        externals: if empty_net {
            Vec::new()
        } else {
            veth_externals(root, &opts.id, &image_path, opts.bridge.as_deref())
        },
        leave_stopped: opts.leave_stopped || opts.image_path.join(LEAVE_STOPPED_MARKER).exists(),
        tcp_close: opts.image_path.join(TCP_CLOSE_MARKER).exists(),
    };
    // runc runs the hooks at every restore; here only when the network
    // namespace comes back empty: otherwise CRIU recreates its interfaces
    // after the hooks ran, and Docker's hook has put its own there already
    // (CRIU fails with "File exists").
    let hook = if empty_net {
        prestart_hooks(&spec, &opts.id, &bundle, &dir)
    } else {
        None
    };
    let restored = migrun_criu::restore_with_hook(&bin, &req, hook);
    back.restore();
    drop(keep_open);
    let pid = match restored {
        Ok(pid) => pid,
        Err(e) => {
            abandon_restore(&dir, &criu_root, Some(&remove_cgroup));
            return Err(e.into());
        }
    };
    let _ = umount2(&criu_root, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&criu_root);
    if emptied {
        if let Err(e) = loopback_up(pid) {
            tracing::warn!("{e}");
        }
    }

    let mut container =
        Container::new(&opts.id, ContainerStatus::Running, Some(pid), &bundle, &dir)
            .ctx(|| format!("record state of {}", opts.id))?;
    container
        .set_annotations(spec.annotations().clone())
        .set_systemd(root.systemd())
        .set_creator(nix::unistd::geteuid().as_raw());
    container.state.created = Some(chrono::Utc::now());
    container
        .save()
        .ctx(|| format!("save state of {}", opts.id))?;
    root.save_meta(&opts.id, &ContainerMeta { rootfs })?;
    if let Some(pid_file) = &opts.pid_file {
        fs::write(pid_file, pid.to_string()).ctx(|| format!("write {}", pid_file.display()))?;
    }
    Ok(container)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_task_is_told_from_a_running_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32);
        let task = PathBuf::from(format!("/proc/{pid}/task/{pid}"));
        let waited = |want: bool| {
            (0..200).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                task_stopped(&task) == want
            })
        };
        assert!(waited(false), "a sleeping task counts as stopped");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        assert!(waited(true), "a SIGSTOPped task does not count as stopped");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        assert!(waited(false), "a continued task still counts as stopped");
        let _ = child.kill();
        let _ = child.wait();
    }
}
