//! Shared helpers of migrun's end-to-end tests: the binary under test, busybox
//! bundles, a private state root per test, polling, and leftover checks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod migration;
pub use migration::{
    contains_bytes, migrate_out, migrate_out_with, path, port, processes_mentioning, target_rootfs,
    Target,
};

/// Top of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The migrun binary under test: `$MIGRUN_BIN`, else the release build, else the debug build.
pub fn migrun_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIGRUN_BIN") {
        return PathBuf::from(p);
    }
    let release = repo_root().join("target/release/migrun");
    let debug = repo_root().join("target/debug/migrun");
    match (fs::metadata(&release), fs::metadata(&debug)) {
        (Ok(r), Ok(d)) => {
            if r.modified().ok() >= d.modified().ok() {
                release
            } else {
                debug
            }
        }
        (Ok(_), Err(_)) => release,
        _ => debug,
    }
}

/// A shared key for a pair of hosts (`migrun keygen --out DIR/pair.key`).
pub fn pair_key(dir: &Path) -> PathBuf {
    let k = dir.join("pair.key");
    let out = std::process::Command::new(migrun_bin())
        .args(["keygen", "--out"])
        .arg(&k)
        .output()
        .expect("keygen");
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    k
}

/// A unique container id for this test process.
pub fn unique_id(name: &str) -> String {
    format!("t{}-{}", std::process::id(), name)
}

/// A busybox rootfs made once per test run by hack/mkbundle.sh; bundles copy it.
fn template_rootfs() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = repo_root().join("target/test-template");
        if !dir.join("rootfs/bin/busybox").exists() {
            let status = Command::new("bash")
                .arg(repo_root().join("hack/mkbundle.sh"))
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run hack/mkbundle.sh");
            assert!(status.success(), "hack/mkbundle.sh failed");
        }
        dir.join("rootfs")
    })
}

/// An OCI bundle in a temporary directory: a private busybox rootfs and a
/// config.json written by `migrun spec`, running `args`.
pub struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    /// Makes a bundle running `args` without a terminal.
    pub fn new(args: &[&str]) -> Self {
        Self::with(args, |_| {})
    }

    /// Makes a bundle running `args` and lets `edit` change the spec.
    pub fn with(args: &[&str], edit: impl FnOnce(&mut Value)) -> Self {
        Self::with_in(&std::env::temp_dir(), args, edit)
    }

    /// Makes a bundle in a new directory under `parent` (e.g. a [`Tmpfs`]).
    pub fn new_in(parent: &Path, args: &[&str]) -> Self {
        Self::with_in(parent, args, |_| {})
    }

    /// Makes a bundle under `parent` running `args`; `edit` changes the spec.
    pub fn with_in(parent: &Path, args: &[&str], edit: impl FnOnce(&mut Value)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("migrun-bundle-")
            .tempdir_in(parent)
            .expect("tempdir");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template_rootfs())
            .arg(dir.path().join("rootfs"))
            .status()
            .expect("cp rootfs");
        assert!(status.success());
        let out = Command::new(migrun_bin())
            .args(["spec", "--bundle"])
            .arg(dir.path())
            .output()
            .expect("migrun spec");
        assert!(
            out.status.success(),
            "migrun spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.path().join("config.json");
        let mut spec: Value =
            serde_json::from_str(&fs::read_to_string(&path).expect("read config")).expect("json");
        spec["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
        spec["process"]["terminal"] = Value::Bool(false);
        spec["root"]["readonly"] = Value::Bool(false);
        // A marker every process of the container inherits, to find them in /proc.
        if let Some(env) = spec["process"]["env"].as_array_mut() {
            env.push(Value::from(format!(
                "{MARKER_VAR}={}",
                dir.path().display()
            )));
        }
        edit(&mut spec);
        fs::write(&path, serde_json::to_vec_pretty(&spec).expect("ser")).expect("write config");
        Self { dir }
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The rootfs directory.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Reads a file inside the rootfs (e.g. a counter the container writes).
    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.rootfs().join(rel)).ok()
    }
}

/// migrun with a private `--root`; force-deletes what is left on drop.
///
/// [`Migrun::runc`] makes the same for runc, to run a test's cases against
/// both (`tests/runc_compat.rs`).
pub struct Migrun {
    root: tempfile::TempDir,
    bin: PathBuf,
    name: &'static str,
}

impl Default for Migrun {
    fn default() -> Self {
        Self::new()
    }
}

/// `name` found in `$PATH`, if it is there.
pub fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

impl Migrun {
    /// A fresh state root.
    pub fn new() -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("migrun-root-")
                .tempdir()
                .expect("tempdir"),
            bin: migrun_bin(),
            name: "migrun",
        }
    }

    /// A fresh state root inside `parent` (a small file system, say).
    pub fn new_in(parent: &Path) -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("migrun-root-")
                .tempdir_in(parent)
                .expect("tempdir"),
            bin: migrun_bin(),
            name: "migrun",
        }
    }

    /// runc (from `$PATH`) with a fresh state root, if runc is installed.
    pub fn runc() -> Option<Self> {
        Some(Self {
            root: tempfile::Builder::new()
                .prefix("runc-root-")
                .tempdir()
                .expect("tempdir"),
            bin: in_path("runc")?,
            name: "runc",
        })
    }

    /// Which runtime this is: "migrun" or "runc".
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// A command with `--root` set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root").arg(self.root.path());
        cmd
    }

    /// Runs migrun with `args`, stdin closed, and returns its output.
    ///
    /// Output goes through files, not pipes: a detached container inherits
    /// migrun's stdio and would hold a pipe open long after migrun exits.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(self.command(), args)
    }

    /// [`Migrun::run`] in the working directory `cwd`.
    pub fn run_in(&self, cwd: &Path, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.current_dir(cwd);
        self.run_with(cmd, args)
    }

    fn run_with(&self, mut cmd: Command, args: &[&str]) -> Output {
        let mut out = tempfile::tempfile().expect("tmp");
        let mut err = tempfile::tempfile().expect("tmp");
        let status = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(err.try_clone().expect("dup"))
            .status()
            .expect("spawn migrun");
        let read = |f: &mut fs::File| {
            use std::io::{Read, Seek};
            let mut buf = Vec::new();
            f.rewind().expect("rewind");
            f.read_to_end(&mut buf).expect("read");
            buf
        };
        Output {
            status,
            stdout: read(&mut out),
            stderr: read(&mut err),
        }
    }

    /// Runs migrun and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "migrun {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs migrun and asserts failure with a one-line error; returns it.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "migrun {args:?} succeeded unexpectedly: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "migrun {args:?}: expected one error line, got: {stderr:?}"
        );
        stderr
    }

    /// The state JSON of container `id`.
    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state json")
    }

    /// The status field of container `id`.
    pub fn status(&self, id: &str) -> String {
        self.state(id)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Migrun {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(self.root.path()) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let _ = self.command().args(["delete", "-f", &id]).output();
            }
        }
    }
}

/// Whether `line` is the error line a failing migrun command ends with on
/// standard error: runc's logrus text form, `time="..." level=error msg="..."`.
pub fn is_error_line(line: &str) -> bool {
    line.starts_with("time=\"") && line.contains(" level=error msg=")
}

/// A tmpfs mounted on a fresh temporary directory; unmounted (lazily) on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's `size=` option: `512k`, `2g`).
    pub fn new(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("migrun-tmpfs-")
            .tempdir()
            .expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", dir.path().display());
        Self { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with stdin closed and returns its output, or, if it has not
/// exited after `timeout`, takes `report()` (while it still runs), kills it
/// and returns `Err` with what it wrote and the report.
///
/// Output goes through files, not pipes, as in [`Migrun::run`]: nothing
/// the command leaves behind can keep the caller reading.
pub fn output_within(
    cmd: &mut Command,
    timeout: Duration,
    report: impl FnOnce() -> String,
) -> Result<Output, (Output, String)> {
    let mut out = tempfile::tempfile().expect("tmp");
    let mut err = tempfile::tempfile().expect("tmp");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let (status, hung) = wait_within(&mut child, timeout, report);
    let read = |f: &mut fs::File| {
        use std::io::{Read, Seek};
        let mut buf = Vec::new();
        f.rewind().expect("rewind");
        f.read_to_end(&mut buf).expect("read");
        buf
    };
    let output = Output {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    };
    match hung {
        None => Ok(output),
        Some(report) => Err((output, report)),
    }
}

/// Waits for `child` up to `timeout`; when the time is up, takes
/// `report()` and kills it. Returns its status, and the report if it had
/// to be killed.
pub fn wait_within(
    child: &mut std::process::Child,
    timeout: Duration,
    report: impl FnOnce() -> String,
) -> (ExitStatus, Option<String>) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, None);
        }
        if Instant::now() > deadline {
            let report = report();
            let _ = child.kill();
            return (child.wait().expect("wait after kill"), Some(report));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the processes whose command line mentions one of `names` are
/// doing: `ps --forest` rows (with the kernel function each waits in) and
/// the kernel stacks of those processes, for a report on a hang.
pub fn processes_report(names: &[&str]) -> String {
    let ps = Command::new("ps")
        .args(["-eo", "pid,ppid,stat,wchan:32,etime,args", "--forest"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ps: {e}\n"));
    let mut report = String::new();
    let mut pids = Vec::new();
    for (i, line) in ps.lines().enumerate() {
        if i == 0 || names.iter().any(|n| line.contains(n)) {
            report.push_str(line);
            report.push('\n');
            if i > 0 {
                pids.extend(
                    line.split_whitespace()
                        .next()
                        .and_then(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    let me = std::process::id() as i32;
    for pid in pids.into_iter().filter(|&p| p != me) {
        for task in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = task.path();
            let stack = fs::read_to_string(dir.join("stack")).unwrap_or_default();
            let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
            // Threads idle in a futex or an epoll loop (every daemon has
            // plenty) say nothing.
            if stack.trim().is_empty() || stack.contains("futex_") || stack.contains("epoll_wait") {
                continue;
            }
            report.push_str(&format!(
                "-- {pid}/{} ({}):\n{stack}",
                task.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    report
}

/// The last `n` lines of the file at `path` that contain `needle` (all
/// lines for an empty needle), for a report.
pub fn tail_of(path: &Path, needle: &str, n: usize) -> String {
    let text = match fs::read(path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) => return format!("({}: {e})\n", path.display()),
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && l.contains(needle))
        .collect();
    let mut tail = lines[lines.len().saturating_sub(n)..].join("\n");
    tail.push('\n');
    tail
}

/// Environment variable that marks the processes of a test bundle.
const MARKER_VAR: &str = "MIGRUN_TEST_BUNDLE";

/// Pids of the processes of the container made from the bundle whose rootfs
/// is `rootfs` (found by the marker in their environment).
pub fn processes_rooted_at(rootfs: &Path) -> Vec<i32> {
    let Some(bundle) = rootfs.parent() else {
        return Vec::new();
    };
    let marker = format!("{MARKER_VAR}={}", bundle.display());
    let mut pids = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(environ) = fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// cgroup directories (in any v1 hierarchy or v2) whose name contains `id`.
pub fn cgroups_named(id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if entry.file_name().to_string_lossy().contains(id) {
                found.push(path.clone());
            }
            if depth < 3 {
                stack.push((path, depth + 1));
            }
        }
    }
    found
}

/// The cgroups of process `pid`, from /proc/PID/cgroup: (controllers, path)
/// for each hierarchy (empty controllers: the v2 one); empty when unreadable.
pub fn cgroups_of(pid: i32) -> Vec<(String, String)> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers.to_string(), path.to_string()))
        })
        .collect()
}

/// The memory cgroup directory of process `pid` (cgroup v1 or v2).
pub fn memory_cgroup_of(pid: i32) -> Option<PathBuf> {
    let cgroups = cgroups_of(pid);
    if let Some((_, path)) = cgroups
        .iter()
        .find(|(c, _)| c.split(',').any(|c| c == "memory"))
    {
        return Some(PathBuf::from(format!("/sys/fs/cgroup/memory{path}")));
    }
    cgroups
        .iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| PathBuf::from(format!("/sys/fs/cgroup/unified{p}")))
}

/// Compiles `tests/programs/NAME.c` statically (once per run) and returns the binary.
pub fn test_program(name: &str) -> PathBuf {
    // Tests of one binary run in threads: one compiles, the others wait
    // (they shared a temporary name, and a rename lost the race).
    static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
    let out_dir = repo_root().join("target/test-programs");
    let out = out_dir.join(name);
    let src = repo_root().join(format!("tests/programs/{name}.c"));
    let fresh = match (fs::metadata(&out), fs::metadata(&src)) {
        (Ok(o), Ok(s)) => o.modified().ok() >= s.modified().ok(),
        _ => false,
    };
    if !fresh {
        fs::create_dir_all(&out_dir).expect("mkdir test-programs");
        let tmp = out_dir.join(format!("{name}.{}", std::process::id()));
        let status = Command::new("gcc")
            .args(["-O2", "-static", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc {name}.c failed");
        fs::rename(&tmp, &out).expect("rename program");
    }
    out
}

impl Bundle {
    /// Copies a static test program into the rootfs as `/NAME`.
    pub fn install_program(&self, name: &str) {
        let dest = self.rootfs().join(name);
        fs::copy(test_program(name), &dest).expect("copy program");
    }
}

impl Migrun {
    /// Runs migrun with its stdio on /dev/null, so that a container it starts
    /// can be checkpointed (CRIU cannot dump host files); errors are read
    /// back from a `--log` file. Panics on failure.
    pub fn ok_quiet(&self, args: &[&str]) {
        let log = tempfile::NamedTempFile::new().expect("tmp");
        let status = self
            .command()
            .arg("--log")
            .arg(log.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn migrun");
        assert!(
            status.success(),
            "migrun {args:?} failed: {}",
            fs::read_to_string(log.path()).unwrap_or_default()
        );
    }
}

/// Two network namespaces joined by a veth pair: `peer` (10.231.X.1) and
/// `ctr` (10.231.X.2). The addresses exist only inside these namespaces.
pub struct NetPair {
    /// Name of the peer namespace.
    pub peer: String,
    /// Name of the container namespace.
    pub ctr: String,
    /// Address of the peer.
    pub peer_ip: String,
}

impl NetPair {
    /// Creates the pair; `n` (0..=255) makes names and addresses unique.
    pub fn new(n: u8) -> Self {
        let tag = format!("{}-{n}", std::process::id());
        let peer = format!("mrt-p{tag}");
        let ctr = format!("mrt-c{tag}");
        let (vp, vc) = (
            format!("mrp{n}x{}", std::process::id() % 10000),
            format!("mrc{n}x{}", std::process::id() % 10000),
        );
        let subnet = format!("10.231.{n}");
        let sh = |cmd: String| {
            let st = Command::new("sh").arg("-c").arg(&cmd).status().expect("sh");
            assert!(st.success(), "{cmd}");
        };
        sh(format!("ip netns add {peer} && ip netns add {ctr}"));
        sh(format!("ip link add {vp} type veth peer name {vc}"));
        sh(format!(
            "ip link set {vp} netns {peer} && ip link set {vc} netns {ctr}"
        ));
        sh(format!("ip -n {peer} addr add {subnet}.1/24 dev {vp} && ip -n {peer} link set {vp} up && ip -n {peer} link set lo up"));
        sh(format!("ip -n {ctr} addr add {subnet}.2/24 dev {vc} && ip -n {ctr} link set {vc} up && ip -n {ctr} link set lo up"));
        Self {
            peer,
            ctr,
            peer_ip: format!("{subnet}.1"),
        }
    }

    /// Path of the container namespace, for config.json.
    pub fn ctr_path(&self) -> String {
        format!("/var/run/netns/{}", self.ctr)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ctr])
            .status();
    }
}

/// A shell loop writing an increasing counter to /count every 50 ms.
pub const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done";

/// The counter that [`COUNTER`] keeps in `rootfs`/count (0 before the first write).
pub fn counter_at(rootfs: &Path) -> u64 {
    fs::read_to_string(rootfs.join("count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The counter that [`COUNTER`] keeps in the file `path`, once a read finds
/// a number: the loop truncates and rewrites the file, so a read can come
/// between the two and find it empty. Polls up to 2 s; `None` if no read parsed.
pub fn counter_in(path: &Path) -> Option<u64> {
    let mut value = None;
    wait_until(Duration::from_secs(2), || {
        value = fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        value.is_some()
    });
    value
}

/// Asks a test program in a container (`programs/pattern.c`,
/// `programs/dirtier.c`) to verify its memory: writes `check{suffix}` in
/// `rootfs`, waits up to `timeout` for `result{suffix}` and returns it
/// ("ok MIB" or "bad OFFSET"; empty when no answer came).
pub fn check_memory(rootfs: &Path, suffix: &str, timeout: Duration) -> String {
    let result = rootfs.join(format!("result{suffix}"));
    let _ = fs::remove_file(&result);
    fs::write(rootfs.join(format!("check{suffix}")), "").expect("request a memory check");
    wait_until(timeout, || result.exists());
    fs::read_to_string(&result).unwrap_or_default()
}
