//! The shim: containerd's `start`/`delete` actions and the task service.
//!
//! Containers are driven in process through `migrun-runtime` (libcontainer
//! underneath); the shim forks nothing of its own except through it. The
//! container's init and exec processes are children of the shim, which is a
//! subreaper and reaps every child in one thread (see `reaper`).

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::api::{
    self, CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse,
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::oci::CheckpointOptions as RuncCheckpointOptions;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use libcgroups::common::CgroupManager;
use libcontainer::container::ContainerStatus;
use migrun_runtime::checkpoint::{self, CheckpointOptions, RestoreOptions};
use migrun_runtime::lifecycle::{self, CreateOptions, ExecOptions};
use migrun_runtime::{processes, resources, StateRoot};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::error::{full_message, Context, Result, ShimError};
use crate::io::{self, ConsoleSocket, Relay, StdioPaths};
use crate::{metrics, reaper};

/// Where the shim keeps container state: one state root per namespace,
/// beside runc's `/run/containerd/runc/<namespace>`.
pub const STATE_BASE: &str = "/run/containerd/migrun";

/// How long containerd's FIFOs get to drain when a process is deleted.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Exit status reported for a container whose shim died (as the Go shim).
const KILLED_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// State root of a namespace.
pub fn state_root_path(namespace: &str) -> PathBuf {
    Path::new(STATE_BASE).join(namespace)
}

/// Life cycle of one process as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

/// A container's init process or one of its exec processes.
struct Proc {
    pid: i32,
    status: Status,
    exit_status: u32,
    exited_at: Option<SystemTime>,
    stdio: StdioPaths,
    relay: Option<Relay>,
    console: Option<fs::File>,
    /// Reaped, its exit recorded, but its output still draining: not yet
    /// stopped for containerd.
    reaped: bool,
    /// Exec processes: the process spec, until started.
    spec: Option<Vec<u8>>,
}

impl Proc {
    fn new(stdio: StdioPaths) -> Self {
        Self {
            pid: 0,
            status: Status::Created,
            exit_status: 0,
            exited_at: None,
            stdio,
            relay: None,
            console: None,
            reaped: false,
            spec: None,
        }
    }

    fn exited(&mut self, code: i32) {
        self.status = Status::Stopped;
        self.exit_status = u32::try_from(code).unwrap_or(255);
        self.exited_at = Some(SystemTime::now());
    }
}

/// A container of this shim.
struct Entry {
    bundle: PathBuf,
    rootfs_mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// Created from a checkpoint: the image directory restored on start,
    /// and the process's ends of its stdio pipes until then.
    checkpoint: Option<(PathBuf, migrun_runtime::lifecycle::Stdio)>,
}

impl Entry {
    fn process(&self, exec_id: &str) -> Option<&Proc> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }
}

/// An event on its way to containerd.
type Event = (&'static str, Box<dyn MessageDyn + Send>);

/// State shared by the task service's threads.
pub struct Inner {
    namespace: String,
    root: StateRoot,
    containers: Mutex<HashMap<String, Entry>>,
    /// Signalled whenever a process exits.
    exits: Condvar,
    /// Held by every operation that forks or waits for children of its own
    /// (libcontainer, CRIU, hooks) and by the reaper while it reaps, so the
    /// reaper never takes a child someone else waits for, and an exit is
    /// never published before the start it follows.
    pub reap_lock: Mutex<()>,
    /// Signalled when a child was created (the reaper sleeps without children).
    pub spawned: Condvar,
    events: Mutex<mpsc::Sender<Event>>,
    exit: Arc<ExitSignal>,
    sockets: AtomicU64,
}

/// Locks a mutex, recovering it if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A protobuf timestamp.
fn timestamp(t: Option<SystemTime>) -> Timestamp {
    let d = t
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

impl Inner {
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn + Send>) {
        if lock(&self.events).send((topic, event)).is_err() {
            log::warn!("event forwarder gone: {topic} not published");
        }
    }

    /// Records the exit of child `pid` (called by the reaper, which holds
    /// the reap lock). The process counts as stopped, and its exit is
    /// published, only once the relay has copied all it wrote to
    /// containerd's FIFOs and closed them (as containerd's Go shim waits
    /// for its I/O copy): a client that sees the exit and then stops
    /// reading would lose the last output otherwise. The wait is bounded,
    /// and happens on a thread of its own so that reaping goes on.
    pub fn on_exit(self: &Arc<Self>, pid: i32, code: i32) {
        let (id, exec_id, drained) = {
            let mut containers = lock(&self.containers);
            let mut hit = None;
            for (id, entry) in containers.iter_mut() {
                let live = |p: &Proc| p.pid == pid && p.status != Status::Stopped && !p.reaped;
                if live(&entry.init) {
                    hit = Some((id.clone(), String::new(), &mut entry.init));
                } else if let Some((exec_id, p)) = entry.execs.iter_mut().find(|(_, p)| live(p)) {
                    hit = Some((id.clone(), exec_id.clone(), p));
                }
                if hit.is_some() {
                    break;
                }
            }
            let Some((id, exec_id, p)) = hit else {
                return;
            };
            p.reaped = true;
            p.exit_status = u32::try_from(code).unwrap_or(255);
            p.exited_at = Some(SystemTime::now());
            let drained = p.relay.as_ref().map(Relay::drained);
            (id, exec_id, drained)
        };
        let proc_id = if exec_id.is_empty() { &id } else { &exec_id };
        log::info!("container {id}: process {proc_id} (pid {pid}) exited with {code}");
        let Some(drained) = drained else {
            self.exit_published(&id, &exec_id, pid);
            return;
        };
        let inner = Arc::clone(self);
        let (id2, exec_id2) = (id.clone(), exec_id.clone());
        let spawned = std::thread::Builder::new()
            .name("exit".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if !drained.wait(DRAIN_TIMEOUT) {
                    log::warn!(
                        "container {id2}: output of pid {pid} still open {DRAIN_TIMEOUT:?} after its exit"
                    );
                }
                inner.exit_published(&id2, &exec_id2, pid);
            });
        if let Err(e) = spawned {
            log::warn!("start exit thread: {e}");
            self.exit_published(&id, &exec_id, pid);
        }
    }

    /// Marks the reaped process `pid` (`exec_id` of container `id`, "" for
    /// its init) stopped, publishes its exit and wakes its waiters.
    fn exit_published(&self, id: &str, exec_id: &str, pid: i32) {
        let mut containers = lock(&self.containers);
        let Some(p) = containers.get_mut(id).and_then(|e| {
            if exec_id.is_empty() {
                Some(&mut e.init)
            } else {
                e.execs.get_mut(exec_id)
            }
        }) else {
            return;
        };
        if p.pid != pid || !p.reaped || p.status == Status::Stopped {
            return;
        }
        p.status = Status::Stopped;
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid: u32::try_from(pid).unwrap_or(0),
                exit_status: p.exit_status,
                exited_at: Some(timestamp(p.exited_at)).into(),
                ..Default::default()
            }),
        );
        drop(containers);
        self.exits.notify_all();
    }
}

/// The shim instance containerd runs.
pub struct MigrunShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for MigrunShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(
        &mut self,
        opts: StartOpts,
    ) -> std::result::Result<String, containerd_shim::Error> {
        // One shim per container.
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> std::result::Result<DeleteResponse, containerd_shim::Error> {
        // containerd runs this when the shim is gone (killed, crashed):
        // remove what is left, killing the container as the Go shim does.
        let bundle = std::env::current_dir().unwrap_or_default();
        if let Ok(root) = StateRoot::open(&state_root_path(&self.namespace), false) {
            if root.exists(&self.id) {
                if let Err(e) = lifecycle::delete(&root, &self.id, true) {
                    log::warn!("delete leftover container {}: {e}", self.id);
                }
            }
        }
        unmount_rootfs(&bundle);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: KILLED_STATUS,
            exited_at: Some(timestamp(Some(SystemTime::now()))).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let root = match StateRoot::open(&state_root_path(&self.namespace), false) {
            Ok(r) => r,
            Err(e) => {
                log::error!("open state root: {e}");
                std::process::exit(1);
            }
        };
        let (tx, rx) = mpsc::channel::<Event>();
        let namespace = self.namespace.clone();
        let forwarder = std::thread::Builder::new()
            .name("events".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                for (topic, event) in rx {
                    let ctx = containerd_shim::Context::default();
                    if let Err(e) = publisher.publish(ctx, topic, &namespace, event) {
                        log::warn!("publish {topic}: {e}");
                    }
                }
            });
        if let Err(e) = forwarder {
            log::error!("start event forwarder: {e}");
        }
        let inner = Arc::new(Inner {
            namespace: self.namespace.clone(),
            root,
            containers: Mutex::new(HashMap::new()),
            exits: Condvar::new(),
            reap_lock: Mutex::new(()),
            spawned: Condvar::new(),
            events: Mutex::new(tx),
            exit: Arc::clone(&self.exit),
            sockets: AtomicU64::new(0),
        });
        reaper::start(Arc::clone(&inner));
        Service { inner }
    }
}

/// Mounts containerd's rootfs mounts on `<bundle>/rootfs`.
fn mount_rootfs(
    bundle: &Path,
    mounts: &[containerd_shim::protos::types::mount::Mount],
) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    fs::create_dir_all(&target).ctx(|| format!("create {}", target.display()))?;
    for m in mounts {
        crate::mount::mount_one(&m.type_, &m.source, &m.options, &target)?;
    }
    Ok(true)
}

/// Unmounts `<bundle>/rootfs` (and whatever is mounted below it).
fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    for _ in 0..8 {
        if nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// The task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    fn not_found(id: &str, exec_id: &str) -> ShimError {
        if exec_id.is_empty() {
            ShimError::NotFound(format!("container {id} not found in this shim"))
        } else {
            ShimError::NotFound(format!("process {exec_id} of container {id} not found"))
        }
    }

    /// A short console socket path (sun_path holds 108 bytes).
    fn console_socket_path(&self) -> PathBuf {
        let n = self.inner.sockets.fetch_add(1, Ordering::Relaxed);
        Path::new(STATE_BASE).join(format!(".console-{}-{n}.sock", std::process::id()))
    }

    fn do_create(&self, req: &CreateTaskRequest) -> Result<CreateTaskResponse> {
        let inner = &self.inner;
        if lock(&inner.containers).contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!(
                "container {} already exists in this shim",
                req.id
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let _reap = lock(&inner.reap_lock);
        let mounted = mount_rootfs(&bundle, &req.rootfs)?;
        let result = if req.checkpoint.is_empty() {
            self.create_container(&req.id, &bundle, &stdio)
        } else {
            self.prepare_restore(&req.id, &bundle, &stdio, Path::new(&req.checkpoint))
        };
        let mut entry = match result {
            Ok(e) => e,
            Err(e) => {
                if mounted {
                    unmount_rootfs(&bundle);
                }
                return Err(e);
            }
        };
        entry.rootfs_mounted = mounted;
        let pid = entry.init.pid;
        lock(&inner.containers).insert(req.id.clone(), entry);
        inner.spawned.notify_all();
        inner.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid: u32::try_from(pid).unwrap_or(0),
                ..Default::default()
            }),
        );
        Ok(CreateTaskResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    /// Creates the container with libcontainer; its init waits for start.
    fn create_container(&self, id: &str, bundle: &Path, stdio: &StdioPaths) -> Result<Entry> {
        let mut proc = Proc::new(stdio.clone());
        let mut opts = CreateOptions {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            detach: true,
            ..Default::default()
        };
        let container = if stdio.terminal {
            let socket = ConsoleSocket::bind(&self.console_socket_path())?;
            opts.console_socket = Some(socket.path().to_path_buf());
            let container =
                lifecycle::create_with_stdio(&self.inner.root, &opts, Default::default())?;
            match socket
                .receive(Duration::from_secs(10))
                .and_then(|master| io::console(master, stdio))
            {
                Ok((plumbing, master)) => {
                    proc.relay = Some(Relay::start(plumbing)?);
                    proc.console = Some(master);
                }
                Err(e) => {
                    let _ = lifecycle::delete(&self.inner.root, id, true);
                    return Err(e);
                }
            }
            container
        } else {
            let prepared = io::pipes(stdio)?;
            let container = lifecycle::create_with_stdio(&self.inner.root, &opts, prepared.stdio)?;
            proc.relay = Some(Relay::start(prepared.plumbing)?);
            container
        };
        proc.pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
        Ok(Entry {
            bundle: bundle.to_path_buf(),
            rootfs_mounted: false,
            init: proc,
            execs: HashMap::new(),
            checkpoint: None,
        })
    }

    /// A container to be restored from `image` on start: its stdio is set
    /// up now, the restore happens in `start` (as containerd's Go shim does).
    fn prepare_restore(
        &self,
        id: &str,
        bundle: &Path,
        stdio: &StdioPaths,
        image: &Path,
    ) -> Result<Entry> {
        if stdio.terminal {
            return Err(ShimError::InvalidArgument(
                "a container with a terminal cannot be restored from a checkpoint".into(),
            ));
        }
        if self.inner.root.container_dir(id).exists() {
            return Err(ShimError::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        lifecycle::load_bundle_spec(bundle)?;
        let prepared = io::pipes(stdio)?;
        let mut proc = Proc::new(stdio.clone());
        proc.relay = Some(Relay::start(prepared.plumbing)?);
        Ok(Entry {
            bundle: bundle.to_path_buf(),
            rootfs_mounted: false,
            init: proc,
            execs: HashMap::new(),
            checkpoint: Some((image.to_path_buf(), prepared.stdio)),
        })
    }

    fn do_start(&self, req: &StartRequest) -> Result<StartResponse> {
        let inner = &self.inner;
        let _reap = lock(&inner.reap_lock);
        let pid = if req.exec_id.is_empty() {
            self.start_init(&req.id)?
        } else {
            self.start_exec(&req.id, &req.exec_id)?
        };
        inner.spawned.notify_all();
        let pid_u = u32::try_from(pid).unwrap_or(0);
        if req.exec_id.is_empty() {
            inner.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid: pid_u,
                    ..Default::default()
                }),
            );
        } else {
            inner.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: pid_u,
                    ..Default::default()
                }),
            );
        }
        Ok(StartResponse {
            pid: pid_u,
            ..Default::default()
        })
    }

    /// Starts (or restores) the init process; the reap lock is held.
    fn start_init(&self, id: &str) -> Result<i32> {
        let inner = &self.inner;
        let (checkpoint, bundle) = {
            let mut containers = lock(&inner.containers);
            let entry = containers
                .get_mut(id)
                .ok_or_else(|| Self::not_found(id, ""))?;
            if entry.init.status != Status::Created {
                return Err(ShimError::Precondition(format!(
                    "container {id} was already started"
                )));
            }
            (entry.checkpoint.take(), entry.bundle.clone())
        };
        let pid = match checkpoint {
            None => {
                let container = lifecycle::start(&inner.root, id)?;
                container.pid().map(|p| p.as_raw()).unwrap_or(0)
            }
            Some((image, stdio)) => {
                let fds = [&stdio.stdin, &stdio.stdout, &stdio.stderr]
                    .map(|fd| fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1));
                for fd in fds {
                    io::inheritable(fd)?;
                }
                let opts = RestoreOptions {
                    id: id.to_string(),
                    bundle,
                    image_path: image,
                    criu: PathBuf::from("criu"),
                    ..Default::default()
                };
                let restored = checkpoint::restore_with_stdio(&inner.root, &opts, fds);
                drop(stdio);
                let container = restored?;
                container.pid().map(|p| p.as_raw()).unwrap_or(0)
            }
        };
        let mut containers = lock(&inner.containers);
        if let Some(entry) = containers.get_mut(id) {
            entry.init.pid = pid;
            entry.init.status = Status::Running;
        }
        Ok(pid)
    }

    /// Starts an exec process; the reap lock is held.
    fn start_exec(&self, id: &str, exec_id: &str) -> Result<i32> {
        let inner = &self.inner;
        let (spec, stdio) = {
            let mut containers = lock(&inner.containers);
            let entry = containers
                .get_mut(id)
                .ok_or_else(|| Self::not_found(id, ""))?;
            if entry.init.status != Status::Running {
                return Err(ShimError::Precondition(format!(
                    "container {id} is not running: cannot start exec {exec_id}"
                )));
            }
            let p = entry
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| Self::not_found(id, exec_id))?;
            if p.status != Status::Created {
                return Err(ShimError::Precondition(format!(
                    "exec {exec_id} was already started"
                )));
            }
            (p.spec.take().unwrap_or_default(), p.stdio.clone())
        };
        let spec_path = inner
            .root
            .container_dir(id)
            .join(format!("exec-{exec_id}.json"));
        fs::write(&spec_path, &spec).ctx(|| format!("write {}", spec_path.display()))?;
        let mut opts = ExecOptions {
            id: id.to_string(),
            process: Some(spec_path.clone()),
            detach: true,
            ..Default::default()
        };
        let result = (|| -> Result<(i32, Option<Relay>, Option<fs::File>)> {
            if stdio.terminal {
                let socket = ConsoleSocket::bind(&self.console_socket_path())?;
                opts.console_socket = Some(socket.path().to_path_buf());
                let pid = lifecycle::exec_with_stdio(&inner.root, &opts, Default::default())?;
                let (plumbing, master) = socket
                    .receive(Duration::from_secs(10))
                    .and_then(|m| io::console(m, &stdio))
                    .inspect_err(|_| {
                        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    })?;
                Ok((pid.as_raw(), Some(Relay::start(plumbing)?), Some(master)))
            } else {
                let prepared = io::pipes(&stdio)?;
                let pid = lifecycle::exec_with_stdio(&inner.root, &opts, prepared.stdio)?;
                Ok((pid.as_raw(), Some(Relay::start(prepared.plumbing)?), None))
            }
        })();
        let _ = fs::remove_file(&spec_path);
        let (pid, relay, console) = result?;
        let mut containers = lock(&inner.containers);
        if let Some(p) = containers
            .get_mut(id)
            .and_then(|e| e.execs.get_mut(exec_id))
        {
            p.pid = pid;
            p.status = Status::Running;
            p.relay = relay;
            p.console = console;
        }
        Ok(pid)
    }

    fn do_state(&self, req: &StateRequest) -> Result<StateResponse> {
        let (status, pid, stdio, bundle, exit_status, exited_at) = {
            let containers = lock(&self.inner.containers);
            let entry = containers
                .get(&req.id)
                .ok_or_else(|| Self::not_found(&req.id, ""))?;
            let p = entry
                .process(&req.exec_id)
                .ok_or_else(|| Self::not_found(&req.id, &req.exec_id))?;
            (
                p.status,
                p.pid,
                p.stdio.clone(),
                entry.bundle.clone(),
                p.exit_status,
                p.exited_at,
            )
        };
        let status = match status {
            Status::Created => api::Status::CREATED,
            Status::Stopped => api::Status::STOPPED,
            Status::Running => {
                let paused = self
                    .inner
                    .root
                    .load(&req.id)
                    .map(|c| c.status() == ContainerStatus::Paused)
                    .unwrap_or(false);
                if paused {
                    api::Status::PAUSED
                } else {
                    api::Status::RUNNING
                }
            }
        };
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: bundle.to_string_lossy().into_owned(),
            pid: u32::try_from(pid).unwrap_or(0),
            status: status.into(),
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            terminal: stdio.terminal,
            exit_status,
            exited_at: exited_at.map(|t| timestamp(Some(t))).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn do_kill(&self, req: &KillRequest) -> Result<()> {
        let sig = Signal::try_from(i32::try_from(req.signal).unwrap_or(-1))
            .map_err(|_| ShimError::InvalidArgument(format!("invalid signal {}", req.signal)))?;
        let (pid, status, reaped) = {
            let containers = lock(&self.inner.containers);
            let entry = containers
                .get(&req.id)
                .ok_or_else(|| Self::not_found(&req.id, ""))?;
            let p = entry
                .process(&req.exec_id)
                .ok_or_else(|| Self::not_found(&req.id, &req.exec_id))?;
            (p.pid, p.status, p.reaped)
        };
        if req.all && req.exec_id.is_empty() {
            let container = self.inner.root.load(&req.id)?;
            for p in lifecycle::container_pids(&container).unwrap_or_default() {
                let _ = nix::sys::signal::kill(p, sig);
            }
            return Ok(());
        }
        // Reaped (its output still draining): the pid may be another's now.
        if status == Status::Stopped || reaped || pid <= 0 {
            return Err(ShimError::NotFound("process already finished".into()));
        }
        nix::sys::signal::kill(Pid::from_raw(pid), sig).map_err(|e| {
            if e == nix::errno::Errno::ESRCH {
                ShimError::NotFound("process already finished".into())
            } else {
                ShimError::Internal(format!("kill {pid}: {e}"))
            }
        })
    }

    /// Waits until process `exec_id` of `id` has stopped.
    fn wait_stopped(
        &self,
        id: &str,
        exec_id: &str,
        timeout: Option<Duration>,
    ) -> Result<(u32, u32, Option<SystemTime>)> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut containers = lock(&self.inner.containers);
        loop {
            let entry = containers.get(id).ok_or_else(|| Self::not_found(id, ""))?;
            let p = entry
                .process(exec_id)
                .ok_or_else(|| Self::not_found(id, exec_id))?;
            if p.status == Status::Stopped {
                return Ok((
                    u32::try_from(p.pid).unwrap_or(0),
                    p.exit_status,
                    p.exited_at,
                ));
            }
            containers = match deadline {
                None => self
                    .inner
                    .exits
                    .wait(containers)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(ShimError::Precondition(format!(
                            "process {} of container {id} did not exit",
                            if exec_id.is_empty() { id } else { exec_id }
                        )));
                    }
                    self.inner
                        .exits
                        .wait_timeout(containers, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let inner = &self.inner;
        if !req.exec_id.is_empty() {
            let mut containers = lock(&inner.containers);
            let entry = containers
                .get_mut(&req.id)
                .ok_or_else(|| Self::not_found(&req.id, ""))?;
            let p = entry
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Self::not_found(&req.id, &req.exec_id))?;
            if p.status == Status::Running {
                return Err(ShimError::Precondition(format!(
                    "exec {} is running: cannot delete it",
                    req.exec_id
                )));
            }
            let p = entry.execs.remove(&req.exec_id);
            drop(containers);
            let p = p.ok_or_else(|| Self::not_found(&req.id, &req.exec_id))?;
            if let Some(relay) = &p.relay {
                relay.finish(DRAIN_TIMEOUT);
            }
            return Ok(api::DeleteResponse {
                pid: u32::try_from(p.pid).unwrap_or(0),
                exit_status: p.exit_status,
                exited_at: Some(timestamp(p.exited_at)).into(),
                ..Default::default()
            });
        }
        let (status, pid) = {
            let containers = lock(&inner.containers);
            let entry = containers
                .get(&req.id)
                .ok_or_else(|| Self::not_found(&req.id, ""))?;
            (entry.init.status, entry.init.pid)
        };
        match status {
            Status::Running => {
                return Err(ShimError::Precondition(format!(
                    "container {} is running: kill it before deleting it",
                    req.id
                )))
            }
            Status::Created if pid > 0 => {
                // Never started: kill its waiting init first.
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                self.wait_stopped(&req.id, "", Some(Duration::from_secs(10)))?;
            }
            _ => {}
        }
        {
            let _reap = lock(&inner.reap_lock);
            match lifecycle::delete(&inner.root, &req.id, true) {
                Ok(()) | Err(migrun_runtime::RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let entry = lock(&inner.containers).remove(&req.id);
        // Waiters on a process of the removed container end (not found).
        inner.exits.notify_all();
        let Some(mut entry) = entry else {
            return Err(Self::not_found(&req.id, ""));
        };
        if let Some(relay) = &entry.init.relay {
            relay.finish(DRAIN_TIMEOUT);
        }
        entry.init.relay = None;
        entry.checkpoint = None;
        if entry.rootfs_mounted {
            unmount_rootfs(&entry.bundle);
        }
        if entry.init.status != Status::Stopped {
            entry.init.exited(KILLED_STATUS as i32);
        }
        let p = &entry.init;
        inner.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: u32::try_from(p.pid).unwrap_or(0),
                exit_status: p.exit_status,
                exited_at: Some(timestamp(p.exited_at)).into(),
                id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: u32::try_from(p.pid).unwrap_or(0),
            exit_status: p.exit_status,
            exited_at: Some(timestamp(p.exited_at)).into(),
            ..Default::default()
        })
    }

    fn do_exec(&self, req: &ExecProcessRequest) -> Result<()> {
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        // Checked now, so that a bad spec fails `exec`, not `start`.
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            ShimError::InvalidArgument(format!("invalid process spec of exec {}: {e}", req.exec_id))
        })?;
        {
            let mut containers = lock(&self.inner.containers);
            let entry = containers
                .get_mut(&req.id)
                .ok_or_else(|| Self::not_found(&req.id, ""))?;
            if entry.execs.contains_key(&req.exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {} already exists",
                    req.exec_id
                )));
            }
            let mut p = Proc::new(StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            });
            p.spec = Some(spec);
            entry.execs.insert(req.exec_id.clone(), p);
        }
        self.inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        if !lock(&self.inner.containers).contains_key(&req.id) {
            return Err(Self::not_found(&req.id, ""));
        }
        let pids = processes::pids(&self.inner.root, &req.id)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: u32::try_from(pid).unwrap_or(0),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn do_checkpoint(&self, req: &CheckpointTaskRequest) -> Result<()> {
        if !lock(&self.inner.containers).contains_key(&req.id) {
            return Err(Self::not_found(&req.id, ""));
        }
        let mut opts = RuncCheckpointOptions::default();
        if let Some(any) = req.options.as_ref() {
            if any.type_url.ends_with("CheckpointOptions") {
                opts = RuncCheckpointOptions::parse_from_bytes(&any.value).map_err(|e| {
                    ShimError::InvalidArgument(format!("invalid checkpoint options: {e}"))
                })?;
            }
        }
        let image_path = if opts.image_path.is_empty() {
            PathBuf::from(&req.path)
        } else {
            PathBuf::from(&opts.image_path)
        };
        let copts = CheckpointOptions {
            id: req.id.clone(),
            image_path: image_path.clone(),
            work_path: Some(opts.work_path.clone())
                .filter(|w| !w.is_empty())
                .map(PathBuf::from),
            leave_running: !opts.exit,
            tcp_established: opts.open_tcp,
            ext_unix_sk: opts.external_unix_sockets,
            shell_job: opts.terminal,
            file_locks: opts.file_locks,
            manage_cgroups_mode: Some(opts.cgroups_mode.clone()).filter(|m| !m.is_empty()),
            empty_ns: opts.empty_namespaces.clone(),
            criu: PathBuf::from("criu"),
            ..Default::default()
        };
        {
            let _reap = lock(&self.inner.reap_lock);
            checkpoint::checkpoint(&self.inner.root, &copts)?;
        }
        self.inner.publish(
            topics::TASK_CHECKPOINTED_EVENT_TOPIC,
            Box::new(TaskCheckpointed {
                container_id: req.id.clone(),
                checkpoint: image_path.to_string_lossy().into_owned(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    fn do_update(&self, req: &UpdateTaskRequest) -> Result<()> {
        if !lock(&self.inner.containers).contains_key(&req.id) {
            return Err(Self::not_found(&req.id, ""));
        }
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| ShimError::InvalidArgument(format!("invalid resources: {e}")))?;
        resources::update(&self.inner.root, &req.id, &res)?;
        Ok(())
    }

    fn do_stats(&self, req: &StatsRequest) -> Result<StatsResponse> {
        if !lock(&self.inner.containers).contains_key(&req.id) {
            return Err(Self::not_found(&req.id, ""));
        }
        let container = self.inner.root.load(&req.id)?;
        let stats = lifecycle::cgroup_manager(&container)?
            .stats()
            .map_err(|e| ShimError::Internal(format!("read cgroup stats of {}: {e}", req.id)))?;
        let m = metrics::from_stats(&stats);
        let value = m
            .write_to_bytes()
            .map_err(|e| ShimError::Internal(format!("encode metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(Any {
                type_url: "io.containerd.cgroups.v1.Metrics".into(),
                value,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        if !lock(&self.inner.containers).contains_key(id) {
            return Err(Self::not_found(id, ""));
        }
        if pause {
            lifecycle::pause(&self.inner.root, id)?;
            self.inner.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            );
        } else {
            lifecycle::resume(&self.inner.root, id)?;
            self.inner.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }
}

/// Logs a failed request with its full message, and converts it for ttrpc.
fn reply<T>(what: &str, id: &str, result: Result<T>) -> TtrpcResult<T> {
    result.map_err(|e| {
        log::warn!("{what} {id}: {}", full_message(&e));
        e.into()
    })
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        reply("create", &req.id, self.do_create(&req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        reply("start", &req.id, self.do_start(&req))
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        reply("state", &req.id, self.do_state(&req))
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        reply("delete", &req.id, self.do_delete(&req))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        reply("pids", &req.id, self.do_pids(&req))
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<api::Empty> {
        reply("pause", &req.id, self.do_pause(&req.id, true)).map(|_| api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<api::Empty> {
        reply("resume", &req.id, self.do_pause(&req.id, false)).map(|_| api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        reply("checkpoint", &req.id, self.do_checkpoint(&req)).map(|_| api::Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<api::Empty> {
        reply("kill", &req.id, self.do_kill(&req)).map(|_| api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<api::Empty> {
        reply("exec", &req.id, self.do_exec(&req)).map(|_| api::Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let result = {
            let containers = lock(&self.inner.containers);
            containers
                .get(&req.id)
                .and_then(|e| e.process(&req.exec_id))
                .ok_or_else(|| Self::not_found(&req.id, &req.exec_id))
                .and_then(|p| match &p.console {
                    Some(master) => io::resize(master, req.width, req.height),
                    None => Err(ShimError::Precondition(
                        "the process has no terminal".into(),
                    )),
                })
        };
        reply("resize_pty", &req.id, result).map(|_| api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<api::Empty> {
        let result = {
            let containers = lock(&self.inner.containers);
            containers
                .get(&req.id)
                .and_then(|e| e.process(&req.exec_id))
                .ok_or_else(|| Self::not_found(&req.id, &req.exec_id))
                .map(|p| {
                    if req.stdin {
                        if let Some(relay) = &p.relay {
                            relay.close_stdin();
                        }
                    }
                })
        };
        reply("close_io", &req.id, result).map(|_| api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        reply("update", &req.id, self.do_update(&req)).map(|_| api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let result = self
            .wait_stopped(&req.id, &req.exec_id, None)
            .map(|(_, status, at)| WaitResponse {
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            });
        reply("wait", &req.id, result)
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        reply("stats", &req.id, self.do_stats(&req))
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = lock(&self.inner.containers)
            .get(&req.id)
            .map(|e| e.init.pid)
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: u32::try_from(task_pid).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !req.now && !lock(&self.inner.containers).is_empty() {
            return Ok(api::Empty::new());
        }
        log::info!("shutdown ({} namespace)", self.inner.namespace);
        self.inner.exit.signal();
        // The ttrpc server waits for its handlers when it shuts down; a
        // handler blocked for good (a Wait nobody will end) must not keep a
        // dead shim, whose socket containerd would reuse, around.
        let _ = std::thread::Builder::new()
            .name("exit".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                std::thread::sleep(Duration::from_secs(3));
                log::warn!("shim still alive 3 s after shutdown: exiting");
                if let Ok(address) = containerd_shim::util::read_address() {
                    let _ = fs::remove_file(address.trim_start_matches("unix://"));
                }
                std::process::exit(0);
            });
        Ok(api::Empty::new())
    }
}
