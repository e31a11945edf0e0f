//! Dump and restore requests, sent to CRIU over its RPC (`criu swrk`).

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use rust_criu::rust_criu_protobuf::rpc::Criu_notify;
use rust_criu::CgMode;

use crate::binary::CriuBinary;
use crate::images::first_error_line;
use crate::{io_err, CriuError, Result};

/// Name of CRIU's log file for a dump.
pub const DUMP_LOG: &str = "dump.log";
/// Name of CRIU's log file for a restore.
pub const RESTORE_LOG: &str = "restore.log";
/// CRIU's log verbosity (4: debug, what runc uses).
const LOG_LEVEL: i32 = 4;

/// What to dump and how (runc's `checkpoint` flags).
#[derive(Debug, Clone, Default)]
pub struct DumpRequest {
    /// Root pid of the tree to dump.
    pub pid: i32,
    /// Where the images go.
    pub image_dir: PathBuf,
    /// Where logs and temporary files go (default: the image dir).
    pub work_dir: Option<PathBuf>,
    /// Images of a previous pre-dump, relative to `image_dir`.
    pub parent_path: Option<String>,
    /// Keep the processes running after the dump.
    pub leave_running: bool,
    /// Dump established TCP connections.
    pub tcp_established: bool,
    /// Allow external unix sockets.
    pub ext_unix_sk: bool,
    /// The tree is a shell job (has a controlling terminal outside).
    pub shell_job: bool,
    /// Dump file locks.
    pub file_locks: bool,
    /// Send pages to a page server at this address and port.
    pub page_server: Option<(String, i32)>,
    /// Leave memory to be fetched lazily on restore.
    pub lazy_pages: bool,
    /// A descriptor CRIU writes a byte to when it is ready for lazy pages.
    pub status_fd: Option<i32>,
    /// How to treat cgroups.
    pub cgroups_mode: Option<CgroupsMode>,
    /// Dump the network namespace empty.
    pub empty_net_ns: bool,
    /// Deduplicate pages against the parent images.
    pub auto_dedup: bool,
    /// Root of the tree's filesystem (the container rootfs).
    pub root: PathBuf,
    /// Mounts CRIU must treat as external: (mount point, key).
    pub external_mounts: Vec<(String, String)>,
    /// Other externals (`net[inode]:key` for external namespaces).
    pub externals: Vec<String>,
    /// Freezer cgroup CRIU freezes the tree with (faster than ptrace alone).
    pub freeze_cgroup: Option<String>,
    /// Skip CRIU's iptables network lock (safe when nothing outside can
    /// reach the tree's network namespace: it has only loopback).
    pub network_lock_skip: bool,
    /// Leave out connections still being set up (SYN received, not yet
    /// accepted) instead of failing the dump with "In-flight connection":
    /// their clients retry, as after a lost SYN.
    pub tcp_skip_in_flight: bool,
}

/// What to restore and how (runc's `restore` flags).
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    /// Where the images are.
    pub image_dir: PathBuf,
    /// Where logs and temporary files go (default: the image dir).
    pub work_dir: Option<PathBuf>,
    /// Root of the restored tree's filesystem.
    pub root: PathBuf,
    /// External mounts: (key as dumped, host path to mount).
    pub external_mounts: Vec<(String, String)>,
    /// Descriptors CRIU gives to the restored tree in place of dumped
    /// files (fd in this process, key such as `pipe:[1234]` or `extRootNetNS`).
    pub inherit_fds: Vec<(RawFd, String)>,
    /// Restore established TCP connections.
    pub tcp_established: bool,
    /// Allow external unix sockets.
    pub ext_unix_sk: bool,
    /// The tree is a shell job.
    pub shell_job: bool,
    /// Restore file locks.
    pub file_locks: bool,
    /// How to treat cgroups.
    pub cgroups_mode: Option<CgroupsMode>,
    /// Restore with memory fetched lazily.
    pub lazy_pages: bool,
    /// Restore the network namespace empty.
    pub empty_net_ns: bool,
    /// Deduplicate images while restoring.
    pub auto_dedup: bool,
    /// Make the restored root task a child of this process (runc does).
    pub rst_sibling: bool,
    /// Skip CRIU's network unlock (when the dump skipped the lock).
    pub network_lock_skip: bool,
    /// Leave the restored tasks stopped (SIGSTOP): the caller resumes them
    /// once it knows they may run (a migration's commit).
    pub leave_stopped: bool,
    /// Restore dumped TCP connections closed (CRIU's `--tcp-close`): their
    /// peers saw another address, so the programs get an error and reconnect.
    pub tcp_close: bool,
    /// External objects, e.g. `veth[eth0]:mrv1234abcd`: the outside end of
    /// a dumped veth, created under that name in CRIU's own namespace.
    pub externals: Vec<String>,
}

/// How CRIU treats cgroups (runc's `--manage-cgroups-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupsMode {
    /// Leave cgroups alone: restored tasks stay in CRIU's own cgroup.
    Ignore,
    /// Restore properties only where cgroups are new.
    Soft,
    /// Restore all properties.
    Full,
    /// Fail when cgroups differ.
    Strict,
    /// Restore properties only.
    Props,
}

impl CgroupsMode {
    /// Parses runc's flag value.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "ignore" => Self::Ignore,
            "soft" => Self::Soft,
            "full" => Self::Full,
            "strict" => Self::Strict,
            "props" => Self::Props,
            other => {
                return Err(CriuError::Unsupported(format!(
                    "invalid --manage-cgroups-mode {other:?}: use ignore, soft, full or strict"
                )))
            }
        })
    }

    /// rust-criu's value.
    fn to_criu(self) -> CgMode {
        match self {
            Self::Ignore => CgMode::IGNORE,
            Self::Soft => CgMode::SOFT,
            Self::Full => CgMode::FULL,
            Self::Strict => CgMode::STRICT,
            Self::Props => CgMode::PROPS,
        }
    }
}

/// Name of the CRIU configuration file migrun writes next to the logs.
const CONFIG_FILE: &str = "migrun-criu.conf";

/// Passes CRIU options rust-criu's RPC request cannot carry, through
/// `CRIU_CONFIG_FILE` (which CRIU also reads in RPC mode; options the
/// request sets still win), or clears it when there are none.
fn configure(dir: &Path, lines: &[&str]) -> Result<()> {
    if lines.is_empty() {
        std::env::remove_var("CRIU_CONFIG_FILE");
        return Ok(());
    }
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, lines.join("\n") + "\n")
        .map_err(io_err(format!("write {}", path.display())))?;
    std::env::set_var("CRIU_CONFIG_FILE", &path);
    Ok(())
}

/// A file in an image directory saying its dump locked the network
/// namespace with nftables: the restore must unlock it the same way.
pub const NFTABLES_LOCK_MARKER: &str = "migrun-netlock-nftables";

/// The CRIU config line choosing how a dump locks a network namespace: not
/// at all when `skip` (nothing but loopback in it), with nftables where
/// this CRIU can (recorded in `image_dir` for the restore), else CRIU's
/// default (iptables).
fn dump_network_lock(
    bin: &CriuBinary,
    skip: bool,
    image_dir: &Path,
) -> Result<Option<&'static str>> {
    if skip {
        return Ok(Some("network-lock skip"));
    }
    if !bin.has_nftables_lock() {
        return Ok(None);
    }
    let marker = image_dir.join(NFTABLES_LOCK_MARKER);
    std::fs::write(&marker, b"").map_err(io_err(format!("write {}", marker.display())))?;
    Ok(Some("network-lock nftables"))
}

/// The restore's counterpart of [`dump_network_lock`]: the lock the dump
/// left in the namespace's rules is removed the way it was made.
fn restore_network_lock(skip: bool, image_dir: &Path) -> Option<&'static str> {
    if skip {
        Some("network-lock skip")
    } else if image_dir.join(NFTABLES_LOCK_MARKER).exists() {
        Some("network-lock nftables")
    } else {
        None
    }
}

/// Opens a directory for CRIU, keeping the file alive while CRIU runs.
fn open_dir(path: &Path) -> Result<File> {
    File::open(path).map_err(io_err(format!("open {}", path.display())))
}

/// Turns a CRIU failure into one line with the first error of its log.
fn failed(action: &'static str, log: PathBuf, err: rust_criu::CriuError) -> CriuError {
    let detail = first_error_line(&log).unwrap_or_else(|| err.to_string());
    CriuError::Failed {
        action,
        detail,
        log,
    }
}

/// A CRIU client pointed at the image and work directories, logging to
/// `log_name`; returns it with the open directories (keep them until CRIU
/// is done) and the log's path.
fn session(
    bin: &CriuBinary,
    image_dir: &Path,
    work_dir: Option<&Path>,
    log_name: &str,
) -> Result<(rust_criu::Criu, (File, Option<File>), PathBuf)> {
    let mut criu = rust_criu::Criu::new_with_criu_path(bin.path.to_string_lossy().into_owned())
        .map_err(|e| CriuError::Unsupported(e.to_string()))?;
    let images = open_dir(image_dir)?;
    criu.set_images_dir_fd(images.as_raw_fd());
    let work = match work_dir {
        Some(w) => {
            crate::images::ensure_writable_dir(w)?;
            Some(open_dir(w)?)
        }
        None => None,
    };
    if let Some(w) = &work {
        criu.set_work_dir_fd(w.as_raw_fd());
    }
    criu.set_log_file(log_name.to_string());
    criu.set_log_level(LOG_LEVEL);
    let log = work_dir.unwrap_or(image_dir).join(log_name);
    Ok((criu, (images, work), log))
}

/// Dumps the process tree of `req.pid` with CRIU.
pub fn dump(bin: &CriuBinary, req: &DumpRequest) -> Result<()> {
    let _span = tracing::info_span!("criu_dump", pid = req.pid).entered();
    let (mut criu, _dirs, log) = session(bin, &req.image_dir, req.work_dir.as_deref(), DUMP_LOG)?;
    criu.set_pid(req.pid);
    criu.set_root(req.root.to_string_lossy().into_owned());
    criu.set_leave_running(req.leave_running);
    criu.set_tcp_established(req.tcp_established);
    if req.tcp_skip_in_flight {
        criu.set_tcp_skip_in_flight(true);
    }
    criu.set_ext_unix_sk(req.ext_unix_sk);
    criu.set_shell_job(req.shell_job);
    criu.set_file_locks(req.file_locks);
    criu.set_orphan_pts_master(true);
    criu.set_manage_cgroups(true);
    criu.cgroups_mode(req.cgroups_mode.unwrap_or(CgroupsMode::Soft).to_criu());
    criu.set_link_remap(true);
    if let Some(parent) = &req.parent_path {
        criu.set_parent_img(parent.clone());
    }
    if let Some((addr, port)) = &req.page_server {
        criu.set_page_server(addr.clone(), *port);
    }
    if req.lazy_pages {
        criu.set_lazy_pages(true);
    }
    if let Some(fd) = req.status_fd {
        criu.set_status_fd(fd);
    }
    if req.empty_net_ns {
        criu.set_empty_net_ns(true);
    }
    if req.auto_dedup {
        criu.set_auto_dedup(true);
    }
    if let Some(cg) = &req.freeze_cgroup {
        criu.set_freeze_cgroup(cg.clone());
    }
    for (key, val) in &req.external_mounts {
        criu.set_external_mount(key.clone(), val.clone());
    }
    for ext in &req.externals {
        criu.add_external(ext.clone());
    }
    let lines: Vec<&str> = dump_network_lock(bin, req.network_lock_skip, &req.image_dir)?
        .into_iter()
        .collect();
    configure(req.work_dir.as_ref().unwrap_or(&req.image_dir), &lines)?;
    criu.dump().map_err(|e| failed("dump", log, e))
}

/// Pid of the restored root task, reported by CRIU's post-restore notification.
static RESTORED_PID: AtomicI32 = AtomicI32::new(0);

/// What runs at CRIU's `setup-namespaces` notification of a restore, with
/// the restored root task's pid: its namespaces exist, nothing runs in them
/// yet. runc runs the OCI prestart and createRuntime hooks there (Docker's
/// network set-up is such a hook). An `Err` aborts the restore.
pub type SetupNamespacesHook = Box<dyn FnMut(i32) -> std::result::Result<(), String>>;

thread_local! {
    /// The hook of the restore running on this thread (CRIU's notifications
    /// arrive on the thread that sent the request).
    static SETUP_NAMESPACES: RefCell<Option<SetupNamespacesHook>> = const { RefCell::new(None) };
    /// Why that hook failed, for the restore's error.
    static HOOK_FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// CRIU notification callback: records the restored pid and runs the
/// setup-namespaces hook.
fn on_notify(script: &str, notify: &Criu_notify, _fd: Option<RawFd>) -> i32 {
    match script {
        "post-restore" => RESTORED_PID.store(notify.pid(), Ordering::SeqCst),
        "setup-namespaces" => {
            let ran = SETUP_NAMESPACES.with(|h| h.borrow_mut().as_mut().map(|f| f(notify.pid())));
            if let Some(Err(why)) = ran {
                HOOK_FAILURE.with(|f| *f.borrow_mut() = Some(why));
                return 1;
            }
        }
        _ => {}
    }
    0
}

/// Restores a process tree with CRIU and returns the pid of its root task.
pub fn restore(bin: &CriuBinary, req: &RestoreRequest) -> Result<i32> {
    restore_with_hook(bin, req, None)
}

/// [`restore`], running `hook` at CRIU's setup-namespaces notification.
pub fn restore_with_hook(
    bin: &CriuBinary,
    req: &RestoreRequest,
    hook: Option<SetupNamespacesHook>,
) -> Result<i32> {
    SETUP_NAMESPACES.with(|h| *h.borrow_mut() = hook);
    HOOK_FAILURE.with(|f| *f.borrow_mut() = None);
    let restored = restore_inner(bin, req);
    SETUP_NAMESPACES.with(|h| *h.borrow_mut() = None);
    match (restored, HOOK_FAILURE.with(|f| f.borrow_mut().take())) {
        (Err(CriuError::Failed { log, .. }), Some(why)) => Err(CriuError::Failed {
            action: "restore",
            detail: format!("a setup-namespaces hook failed: {why}"),
            log,
        }),
        (restored, _) => restored,
    }
}

fn restore_inner(bin: &CriuBinary, req: &RestoreRequest) -> Result<i32> {
    let _span = tracing::info_span!("criu_restore").entered();
    let (mut criu, _dirs, log) =
        session(bin, &req.image_dir, req.work_dir.as_deref(), RESTORE_LOG)?;
    criu.set_root(req.root.to_string_lossy().into_owned());
    criu.set_tcp_established(req.tcp_established);
    criu.set_ext_unix_sk(req.ext_unix_sk);
    criu.set_shell_job(req.shell_job);
    criu.set_file_locks(req.file_locks);
    criu.set_orphan_pts_master(true);
    criu.set_manage_cgroups(true);
    criu.cgroups_mode(req.cgroups_mode.unwrap_or(CgroupsMode::Ignore).to_criu());
    criu.set_rst_sibling(req.rst_sibling);
    criu.set_notify_scripts(true);
    criu.set_notify_cb(on_notify);
    if req.lazy_pages {
        criu.set_lazy_pages(true);
    }
    if req.empty_net_ns {
        criu.set_empty_net_ns(true);
    }
    if req.auto_dedup {
        criu.set_auto_dedup(true);
    }
    for (key, val) in &req.external_mounts {
        criu.set_external_mount(key.clone(), val.clone());
    }
    for ext in &req.externals {
        criu.add_external(ext.clone());
    }
    for (fd, key) in &req.inherit_fds {
        criu.add_inherit_fd(*fd, key.clone())
            .map_err(|e| CriuError::Unsupported(e.to_string()))?;
    }
    let mut lines: Vec<&str> = restore_network_lock(req.network_lock_skip, &req.image_dir)
        .into_iter()
        .collect();
    if req.leave_stopped {
        lines.push("leave-stopped");
    }
    if req.tcp_close {
        lines.push("tcp-close");
    }
    configure(req.work_dir.as_ref().unwrap_or(&req.image_dir), &lines)?;
    RESTORED_PID.store(0, Ordering::SeqCst);
    criu.restore()
        .map_err(|e| failed("restore", log.clone(), e))?;
    match RESTORED_PID.load(Ordering::SeqCst) {
        0 => Err(CriuError::Failed {
            action: "restore",
            detail: "criu did not report the restored pid".into(),
            log,
        }),
        pid => Ok(pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_unlocks_the_network_the_way_the_dump_locked_it() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(
            restore_network_lock(true, dir.path()),
            Some("network-lock skip")
        );
        // An image of before, or of a CRIU without nftables: iptables.
        assert_eq!(restore_network_lock(false, dir.path()), None);
        std::fs::write(dir.path().join(NFTABLES_LOCK_MARKER), b"").expect("marker");
        assert_eq!(
            restore_network_lock(false, dir.path()),
            Some("network-lock nftables")
        );
    }
}
