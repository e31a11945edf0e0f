//! The container life cycle: create, start, kill, pause, resume, delete, exec.

use std::collections::HashMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::Spec;

use crate::error::{error_chain, Context, Result, RuntimeError};
use crate::state::status_name;
use crate::store::{ContainerMeta, StateRoot};
use crate::workload::DefaultSignals;
use crate::{id, signal};

/// What `create` (and `run`) take from the command line.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Container id.
    pub id: String,
    /// Bundle directory (holding config.json).
    pub bundle: PathBuf,
    /// Where to write the init pid.
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master when `terminal` is set.
    pub console_socket: Option<PathBuf>,
    /// Use chroot-like mount move instead of pivot_root.
    pub no_pivot: bool,
    /// Do not create a new session keyring (accepted for runc compatibility).
    pub no_new_keyring: bool,
    /// Extra file descriptors (3 onwards) passed into the container.
    pub preserve_fds: i32,
    /// Whether the caller detaches (always true for `create`).
    pub detach: bool,
}

/// Descriptors that become a new container process's stdin, stdout and
/// stderr, for programs that link this library (the containerd shim hands
/// its pipes over this way). `None` keeps the caller's own descriptor.
#[derive(Debug, Default)]
pub struct Stdio {
    /// The process's stdin.
    pub stdin: Option<OwnedFd>,
    /// The process's stdout.
    pub stdout: Option<OwnedFd>,
    /// The process's stderr.
    pub stderr: Option<OwnedFd>,
}

impl Stdio {
    /// Hands the descriptors to a libcontainer builder.
    fn apply(self, mut builder: ContainerBuilder) -> ContainerBuilder {
        if let Some(fd) = self.stdin {
            builder = builder.with_stdin(fd);
        }
        if let Some(fd) = self.stdout {
            builder = builder.with_stdout(fd);
        }
        if let Some(fd) = self.stderr {
            builder = builder.with_stderr(fd);
        }
        builder
    }
}

/// Loads and checks a bundle's config.json, with errors that name the problem.
pub fn load_bundle_spec(bundle: &Path) -> Result<Spec> {
    let bundle_err = |reason: String| RuntimeError::Bundle {
        path: bundle.to_path_buf(),
        reason,
    };
    if !bundle.is_dir() {
        return Err(bundle_err("no such directory".into()));
    }
    let config = bundle.join("config.json");
    if !config.is_file() {
        return Err(bundle_err("config.json not found".into()));
    }
    let text = fs::read_to_string(&config).ctx(|| format!("read {}", config.display()))?;
    let spec: Spec = serde_json::from_str(&text).map_err(|e| RuntimeError::Config {
        path: config.clone(),
        reason: error_chain(&e),
    })?;
    let root = spec.root().as_ref().ok_or_else(|| RuntimeError::Config {
        path: config.clone(),
        reason: "root is missing".into(),
    })?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    if !rootfs.is_dir() {
        return Err(RuntimeError::Config {
            path: config,
            reason: format!("root.path {} is not a directory", rootfs.display()),
        });
    }
    if spec.process().is_none() {
        return Err(RuntimeError::Config {
            path: config,
            reason: "process is missing".into(),
        });
    }
    Ok(spec)
}

/// Absolute rootfs of a bundle's spec.
pub(crate) fn rootfs_of(bundle: &Path, spec: &Spec) -> PathBuf {
    let path = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    let path = if path.is_absolute() {
        path
    } else {
        bundle.join(path)
    };
    fs::canonicalize(&path).unwrap_or(path)
}

/// Creates container `opts.id` from its bundle; the init process waits for `start`.
///
/// On failure nothing is left behind: no state directory, cgroup or process.
pub fn create(root: &StateRoot, opts: &CreateOptions) -> Result<Container> {
    create_with_stdio(root, opts, Stdio::default())
}

/// [`create`], with the init process's stdio taken from `stdio` instead of
/// the calling process's.
pub fn create_with_stdio(
    root: &StateRoot,
    opts: &CreateOptions,
    stdio: Stdio,
) -> Result<Container> {
    id::validate(&opts.id)?;
    if root.exists(&opts.id) || root.container_dir(&opts.id).exists() {
        return Err(RuntimeError::AlreadyExists(opts.id.clone()));
    }
    let bundle = fs::canonicalize(&opts.bundle).map_err(|e| RuntimeError::Bundle {
        path: opts.bundle.clone(),
        reason: error_chain(&e),
    })?;
    let spec = load_bundle_spec(&bundle)?;
    if root.systemd() && !Path::new("/run/systemd/system").exists() {
        return Err(RuntimeError::Unsupported(
            "--systemd-cgroup needs systemd, which is not running on this host".into(),
        ));
    }
    let built = ContainerBuilder::new(opts.id.clone(), SyscallType::default())
        .with_pid_file(opts.pid_file.as_ref())
        .and_then(|b| b.with_root_path(root.path()))
        .map(|b| {
            stdio.apply(
                b.with_console_socket(opts.console_socket.as_ref())
                    .with_preserved_fds(opts.preserve_fds)
                    .with_executor(DefaultSignals),
            )
        })
        .and_then(|b| b.validate_id())
        .and_then(|b| {
            b.as_init(&bundle)
                .with_systemd(root.systemd())
                .with_detach(opts.detach)
                .with_no_pivot(opts.no_pivot)
                .build()
        });
    match built {
        Ok(container) => {
            root.save_meta(
                &opts.id,
                &ContainerMeta {
                    rootfs: rootfs_of(&bundle, &spec),
                },
            )?;
            Ok(container)
        }
        Err(err) => {
            remove_leftovers(root, &opts.id, &spec);
            Err(RuntimeError::Container {
                context: format!("create container {}", opts.id),
                source: Box::new(err),
            })
        }
    }
}

/// Removes whatever a failed create left: processes, cgroup, state directory.
fn remove_leftovers(root: &StateRoot, id: &str, spec: &Spec) {
    let dir = root.container_dir(id);
    if let Ok(mut container) = Container::load(dir.clone()) {
        if let Some(pid) = container.pid() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
        let _ = container.delete(true);
    }
    let cgroups_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
    let cgroup_path = libcontainer::utils::get_cgroup_path(&cgroups_path, id);
    if let Ok(manager) = libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path,
        systemd_cgroup: root.systemd(),
        container_name: id.to_string(),
    }) {
        for pid in manager.get_all_pids().unwrap_or_default() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
        let _ = manager.remove();
    }
    let _ = fs::remove_dir_all(dir);
}

/// Error for an operation not allowed in the container's status.
fn wrong_status(container: &Container, action: &'static str) -> RuntimeError {
    RuntimeError::WrongStatus {
        id: container.id().to_string(),
        status: status_name(container.status()).to_string(),
        action,
    }
}

/// Starts a created container's user process.
pub fn start(root: &StateRoot, id: &str) -> Result<Container> {
    let mut container = root.load(id)?;
    if container.status() != ContainerStatus::Created {
        return Err(wrong_status(
            &container,
            "start (only a created container can start)",
        ));
    }
    container.start().ctx(|| format!("start container {id}"))?;
    Ok(container)
}

/// Sends `signal` (a name or number) to the init process, or to all processes.
pub fn kill(root: &StateRoot, id: &str, signal: &str, all: bool) -> Result<()> {
    let sig = signal::parse(signal)?;
    let mut container = root.load(id)?;
    if !(container.can_kill() || all && container.status() == ContainerStatus::Stopped) {
        return Err(wrong_status(&container, "kill"));
    }
    if all {
        for pid in container_pids(&container)? {
            let _ = nix::sys::signal::kill(pid, sig);
        }
        return Ok(());
    }
    container
        .kill(sig, false)
        .ctx(|| format!("kill container {id}"))
}

/// Freezes every process of the container.
pub fn pause(root: &StateRoot, id: &str) -> Result<()> {
    let mut container = root.load(id)?;
    if !container.can_pause() {
        return Err(wrong_status(&container, "pause"));
    }
    container.pause().ctx(|| format!("pause container {id}"))
}

/// Thaws a paused container.
pub fn resume(root: &StateRoot, id: &str) -> Result<()> {
    let mut container = root.load(id)?;
    if !container.can_resume() {
        return Err(wrong_status(&container, "resume"));
    }
    container.resume().ctx(|| format!("resume container {id}"))
}

/// Deletes a container; a running one only with `force` (it is killed first).
/// The bundle `migrate-in` kept for a migrated container in the state root
/// ([`MIGRATED_BUNDLES`]) goes with it.
pub fn delete(root: &StateRoot, id: &str, force: bool) -> Result<()> {
    delete_inner(root, id, force, true)
}

/// [`delete`], but a migrated container's bundle in the state root stays:
/// what `checkpoint` does when it ends the container (runc's), since the
/// checkpoint's restore needs that root filesystem.
pub fn delete_keep_bundle(root: &StateRoot, id: &str, force: bool) -> Result<()> {
    delete_inner(root, id, force, false)
}

fn delete_inner(root: &StateRoot, id: &str, force: bool, bundle_too: bool) -> Result<()> {
    let mut container = root.load(id)?;
    if !force && !container.can_delete() {
        return Err(wrong_status(
            &container,
            "delete (stop it first or use delete -f)",
        ));
    }
    if force && container.status() != ContainerStatus::Stopped {
        // Kill every process, including ones in a frozen cgroup.
        if let Ok(pids) = container_pids(&container) {
            for pid in pids {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
        }
        if container.status() == ContainerStatus::Paused {
            let _ = container.resume();
        }
        // A large process takes a moment to exit; its cgroup cannot be
        // removed before (rmdir fails with EBUSY).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while container_pids(&container).is_ok_and(|p| !p.is_empty())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let cgroup_path = container.spec().ok().map(|c| c.cgroup_path);
    // A killed process leaves its cgroups only once it has been reaped,
    // a moment after cgroup.procs stopped listing it (one holding a GiB
    // takes 100 ms and more to free it), and libcgroups gives up on the
    // rmdir after about 100 ms: try again, the state dir is still there
    // and the cgroups already removed stay removed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match container.delete(force) {
            Ok(()) => break,
            Err(libcontainer::error::LibcontainerError::CgroupManager(e))
                if force && std::time::Instant::now() < deadline =>
            {
                tracing::debug!("delete {id}: cgroup still busy ({e}), again");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e).ctx(|| format!("delete container {id}")),
        }
    }
    if let Some(path) = cgroup_path {
        remove_empty_migrun_parent(&path);
    }
    if bundle_too {
        remove_migrated_bundle(root, id, container.bundle());
    }
    Ok(())
}

/// The directory of a state root (`<root>/.bundles/<id>`) where
/// `migrate-in` keeps the bundles of the containers it brought here: owned
/// by the state root, so that removing a work directory never touches a
/// running container, and removed with its container.
pub const MIGRATED_BUNDLES: &str = ".bundles";

/// Removes the bundle of a migrated container `id` (only one that
/// `migrate-in` put in the state root: a user's bundle is never touched).
fn remove_migrated_bundle(root: &StateRoot, id: &str, bundle: &Path) {
    if bundle.starts_with(root.path().join(MIGRATED_BUNDLES).join(id)) {
        remove_migrated_bundle_dir(root, id);
    }
}

/// Removes `<root>/.bundles/<id>` (its overlay unmounted first), whether
/// or not a container still names it: what a migration that never
/// finished left there.
pub fn remove_migrated_bundle_dir(root: &StateRoot, id: &str) {
    let dir = root.path().join(MIGRATED_BUNDLES).join(id);
    let merged = dir.join("bundle").join("rootfs");
    let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("remove the bundle {} of {id}: {e}", dir.display());
        }
    }
}

/// Removes the `/migrun-<tag>` parent cgroup that `migrate-in` puts
/// containers under, once its last container is gone (rmdir fails while
/// it still has children, which is what keeps the others).
fn remove_empty_migrun_parent(cgroup_path: &Path) {
    let Some(parent) = cgroup_path.parent() else {
        return;
    };
    // Exactly `/migrun-` and 8 hex digits, as migrate-in names them.
    let is_ours = parent.file_name().is_some_and(|n| {
        n.to_string_lossy()
            .strip_prefix("migrun-")
            .is_some_and(|tag| tag.len() == 8 && tag.chars().all(|c| c.is_ascii_hexdigit()))
    }) && parent.parent() == Some(Path::new("/"));
    if !is_ours {
        return;
    }
    let rel = parent.to_string_lossy().trim_start_matches('/').to_string();
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let _ = fs::remove_dir(h.path().join(&rel));
        }
    }
}

/// The cgroup manager of a container.
pub fn cgroup_manager(container: &Container) -> Result<AnyCgroupManager> {
    let config = container
        .spec()
        .ctx(|| format!("read config of container {}", container.id()))?;
    libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: config.cgroup_path,
        systemd_cgroup: container.systemd(),
        container_name: container.id().to_string(),
    })
    .map_err(|e| RuntimeError::Cgroup {
        context: format!("open cgroup of container {}", container.id()),
        reason: error_chain(&e),
    })
}

/// Pids of every process in the container's cgroup.
pub fn container_pids(container: &Container) -> Result<Vec<Pid>> {
    cgroup_manager(container)?
        .get_all_pids()
        .map_err(|e| RuntimeError::Cgroup {
            context: format!("list processes of container {}", container.id()),
            reason: error_chain(&e),
        })
}

/// What `exec` takes from the command line.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Container id.
    pub id: String,
    /// Command and arguments (unless `process` is given).
    pub args: Vec<String>,
    /// A process.json describing the process.
    pub process: Option<PathBuf>,
    /// Extra environment variables (KEY=VALUE).
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// User id.
    pub uid: Option<u32>,
    /// Group id.
    pub gid: Option<u32>,
    /// Additional group ids.
    pub additional_gids: Vec<u32>,
    /// Extra capabilities.
    pub caps: Vec<String>,
    /// Set no_new_privs.
    pub no_new_privs: bool,
    /// Allocate a terminal (needs `console_socket` when detached).
    pub tty: bool,
    /// Socket receiving the pty master.
    pub console_socket: Option<PathBuf>,
    /// Where to write the process pid.
    pub pid_file: Option<PathBuf>,
    /// Extra file descriptors passed in.
    pub preserve_fds: i32,
    /// Do not wait for the process.
    pub detach: bool,
}

/// Parses `KEY=VALUE` pairs into a map.
fn env_map(env: &[String]) -> Result<HashMap<String, String>> {
    env.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    RuntimeError::InvalidInput(format!(
                        "invalid environment {kv:?}: expected KEY=VALUE"
                    ))
                })
        })
        .collect()
}

/// Starts a new process inside a running container and returns its pid.
pub fn exec(root: &StateRoot, opts: &ExecOptions) -> Result<Pid> {
    exec_with_stdio(root, opts, Stdio::default())
}

/// [`exec`], with the new process's stdio taken from `stdio` instead of the
/// calling process's.
pub fn exec_with_stdio(root: &StateRoot, opts: &ExecOptions, stdio: Stdio) -> Result<Pid> {
    let container = root.load(&opts.id)?;
    if container.status() != ContainerStatus::Running {
        return Err(wrong_status(&container, "exec"));
    }
    if opts.args.is_empty() && opts.process.is_none() {
        return Err(RuntimeError::InvalidInput(
            "exec needs a command or --process".into(),
        ));
    }
    if opts.tty && opts.detach && opts.console_socket.is_none() {
        return Err(RuntimeError::InvalidInput(
            "exec -t with -d needs --console-socket".into(),
        ));
    }
    let env = env_map(&opts.env)?;
    // libcontainer builds a terminal-less process from the arguments; for `-t`
    // migrun writes the process out with `terminal` set, as runc does.
    let tty_process = if opts.tty && opts.process.is_none() {
        Some(write_tty_process(root, &container, opts)?)
    } else {
        None
    };
    let process = tty_process.clone().or_else(|| opts.process.clone());
    let result = build_tenant(root, opts, env, process, stdio);
    if let Some(path) = tty_process {
        let _ = fs::remove_file(path);
    }
    result
}

/// Builds and starts the tenant process of `exec`.
fn build_tenant(
    root: &StateRoot,
    opts: &ExecOptions,
    env: HashMap<String, String>,
    process: Option<PathBuf>,
    stdio: Stdio,
) -> Result<Pid> {
    ContainerBuilder::new(opts.id.clone(), SyscallType::default())
        .with_root_path(root.path())
        .and_then(|b| {
            b.with_console_socket(opts.console_socket.as_ref())
                .with_pid_file(opts.pid_file.as_ref())
        })
        .map(|b| {
            stdio.apply(
                b.with_preserved_fds(opts.preserve_fds)
                    .with_executor(DefaultSignals),
            )
        })
        .and_then(|b| b.validate_id())
        .and_then(|b| {
            b.as_tenant()
                .with_detach(opts.detach)
                .with_cwd(opts.cwd.as_ref())
                .with_env(env)
                .with_process(process.as_ref())
                .with_no_new_privs(opts.no_new_privs)
                .with_container_args(opts.args.clone())
                .with_additional_gids(opts.additional_gids.clone())
                .with_user(opts.uid)
                .with_group(opts.gid)
                .with_capabilities(opts.caps.clone())
                .build()
        })
        .ctx(|| format!("exec in container {}", opts.id))
}

/// Writes a process.json for `exec -t`: the container's process with the
/// given arguments, environment, working directory and user, and a terminal.
fn write_tty_process(
    root: &StateRoot,
    container: &Container,
    opts: &ExecOptions,
) -> Result<PathBuf> {
    let spec = load_bundle_spec(container.bundle())?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(opts.args.clone()));
    process.set_terminal(Some(true));
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(opts.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(cwd) = &opts.cwd {
        process.set_cwd(cwd.clone());
    }
    let mut user = process.user().clone();
    if let Some(uid) = opts.uid {
        user.set_uid(uid);
    }
    if let Some(gid) = opts.gid {
        user.set_gid(gid);
    }
    process.set_user(user);
    let path = root
        .container_dir(&opts.id)
        .join(format!("exec-tty-{}.json", std::process::id()));
    let text =
        serde_json::to_vec(&process).map_err(|e| RuntimeError::InvalidInput(e.to_string()))?;
    fs::write(&path, text).ctx(|| format!("write {}", path.display()))?;
    Ok(path)
}
