//! migrun's containerd shim (`containerd-shim-migrun-v1`, runtime
//! `io.containerd.migrun.v1`) driven by `ctr`, on the project's own
//! containerd (`hack/containerd.sh up`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use migrun_tests::{
    cgroups_named, counter_in, output_within, processes_report, tail_of, unique_id, wait_until,
    wait_within,
};

const RUNTIME: &str = "io.containerd.migrun.v1";
const IMAGE: &str = "docker.io/library/busybox:local";
/// Where the shim keeps its containers (namespace `default`).
const SHIM_STATE: &str = "/run/containerd/migrun/default";

/// The project's containerd socket: `$CONTAINERD_ADDRESS`, else hack/containerd.sh's default.
fn address() -> String {
    std::env::var("CONTAINERD_ADDRESS")
        .unwrap_or_else(|_| "/var/lib/migrun-containerd/containerd.sock".to_string())
}

fn ctr_command(args: &[&str]) -> Command {
    assert!(
        Path::new(&address()).exists(),
        "no containerd at {} (run hack/containerd.sh up)",
        address()
    );
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(address()).args(args);
    cmd
}

/// How long one `ctr` may take: it takes a second or two; past this it
/// hangs, and the test fails with a report instead of hanging CI.
const CTR_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `ctr args`; `Err` (with a report) if it had to be killed at `timeout`.
fn ctr_within(args: &[&str], timeout: Duration) -> Result<Output, String> {
    output_within(&mut ctr_command(args), timeout, hang_report).map_err(|(partial, report)| {
        format!(
            "ctr {args:?} did not exit within {timeout:?} (killed)\n\
             --- its stdout:\n{}\n--- its stderr:\n{}\n{report}",
            String::from_utf8_lossy(&partial.stdout),
            String::from_utf8_lossy(&partial.stderr),
        )
    })
}

/// What is going on while something hangs: the processes involved, and
/// containerd's log (where containerd 1.6 copies its shims' logs), also
/// for this test process's containers only.
fn hang_report() -> String {
    let log = Path::new(&address()).with_file_name("containerd.log");
    format!(
        "--- processes:\n{}\n--- last 40 lines of {log}:\n{}\n\
         --- last 40 lines there about this test's containers ({ids}*):\n{}",
        processes_report(&["containerd", "ctr ", "migrun", "criu"]),
        tail_of(&log, "", 40),
        tail_of(&log, &unique_id(""), 40),
        log = log.display(),
        ids = unique_id(""),
    )
}

fn ctr(args: &[&str]) -> Output {
    ctr_within(args, CTR_TIMEOUT).unwrap_or_else(|report| panic!("{report}"))
}

fn ctr_ok(args: &[&str]) -> String {
    let out = ctr(args);
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ctr task ls` row of `id`: (pid, status).
fn task(id: &str) -> Option<(i32, String)> {
    let out = ctr_ok(&["task", "ls"]);
    out.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| {
            (
                cols.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
                cols.get(2).unwrap_or(&"").to_string(),
            )
        })
    })
}

fn status(id: &str) -> String {
    task(id).map(|t| t.1).unwrap_or_default()
}

/// Pids of the shim serving container `id` (its command line names the id
/// and our containerd).
fn shim_pids(id: &str) -> Vec<i32> {
    let needle = format!("-id {id} -address {} ", address());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmd.contains("containerd-shim-migrun-v1") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` still runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Removes the task and container (and a checkpoint image) when the test
/// ends, whatever happened.
struct Cleanup {
    id: String,
    image: Option<String>,
}

impl Cleanup {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            image: None,
        }
    }
}

impl Cleanup {
    /// `ctr args`, whether it succeeded; a hang is reported (a panic,
    /// unless the test already panics: a second panic would abort).
    fn ctr(&self, args: &[&str]) -> bool {
        match ctr_within(args, CTR_TIMEOUT) {
            Ok(out) => out.status.success(),
            Err(report) if std::thread::panicking() => {
                eprintln!("cleanup of {}: {report}", self.id);
                false
            }
            Err(report) => panic!("cleanup of {}: {report}", self.id),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let id = self.id.as_str();
        self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = wait_until(Duration::from_secs(5), || {
            self.ctr(&["task", "delete", id])
                || ctr_within(&["task", "ls"], CTR_TIMEOUT).is_ok_and(|o| {
                    !String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l.split_whitespace().next() == Some(id))
                })
        });
        self.ctr(&["container", "delete", id]);
        if let Some(image) = &self.image {
            self.ctr(&["image", "rm", image]);
        }
    }
}

/// Asserts that nothing of container `id` is left: shim, state, cgroup.
fn assert_nothing_left(id: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || shim_pids(id).is_empty()),
        "shim of {id} still running: {:?}",
        shim_pids(id)
    );
    assert!(
        !Path::new(SHIM_STATE).join(id).exists(),
        "shim state of {id} left behind"
    );
    let cgroups = cgroups_named(id);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

#[test]
fn run_rm_prints_and_propagates_exit_codes() {
    let id = unique_id("ctr-echo");
    let _cleanup = Cleanup::new(&id);
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "echo",
        "hi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_nothing_left(&id);

    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));
    assert_nothing_left(&id);
}

#[test]
fn detached_exec_ps_pause_metrics_kill_delete() {
    let id = unique_id("ctr-life");
    let _cleanup = Cleanup::new(&id);
    let script =
        "trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done";
    ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        script,
    ]);
    assert!(wait_until(Duration::from_secs(5), || status(&id) == "RUNNING"));
    let (pid, _) = task(&id).expect("task listed");
    assert!(pid > 0 && alive(pid));
    let info = ctr_ok(&["container", "info", &id]);
    assert!(info.contains(RUNTIME), "{info}");

    // exec: output and exit code come back (`cat` may read /count between
    // its truncation and its write: then again).
    let count = |o: &Output| -> u64 {
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let mut out = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let o = ctr(&[
                "task",
                "exec",
                "--exec-id",
                "e1",
                &id,
                "sh",
                "-c",
                "cat /count; exit 4",
            ]);
            assert_eq!(o.status.code(), Some(4), "{o:?}");
            let counted = count(&o) > 0;
            out = Some(o);
            counted
        }),
        "{out:?}"
    );

    // ps: the init and the loop's children, all in the container.
    let ps = ctr_ok(&["task", "ps", &id]);
    let pids: Vec<i32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(pids.contains(&pid), "{ps}");

    // pause: frozen; resume: counting again.
    let read = || {
        count(&ctr(&[
            "task",
            "exec",
            "--exec-id",
            "r",
            &id,
            "cat",
            "/count",
        ]))
    };
    ctr_ok(&["task", "pause", &id]);
    assert_eq!(status(&id), "PAUSED");
    let frozen = std::fs::read_to_string(format!("/proc/{pid}/root/count")).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/root/count")).unwrap_or_default(),
        frozen,
        "counter advanced while paused"
    );
    ctr_ok(&["task", "resume", &id]);
    assert_eq!(status(&id), "RUNNING");
    let before = read();
    assert!(wait_until(Duration::from_secs(5), || read() > before + 2));

    // metrics: the container's cgroup.
    let metrics = ctr_ok(&["task", "metrics", &id]);
    assert!(metrics.contains("memory.usage_in_bytes"), "{metrics}");
    let pids_current = metrics
        .lines()
        .find(|l| l.starts_with("pids.current"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(pids_current >= 1, "{metrics}");

    // SIGTERM: the trap exits 0, the task stops.
    ctr_ok(&["task", "kill", "-s", "SIGTERM", &id]);
    assert!(
        wait_until(Duration::from_secs(5), || status(&id) == "STOPPED"),
        "task did not stop on SIGTERM: {}",
        status(&id)
    );
    assert!(!alive(pid));
    ctr_ok(&["task", "delete", &id]);
    assert!(task(&id).is_none());
    ctr_ok(&["container", "delete", &id]);
    assert_nothing_left(&id);
}

#[test]
fn run_with_terminal_through_a_pty() {
    let id = unique_id("ctr-tty");
    let _cleanup = Cleanup::new(&id);
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let mut child = ctr_command(&["run", "--rm", "-t", "--runtime", RUNTIME, IMAGE, &id, "sh"])
        .stdin(Stdio::from(
            slave.as_fd().try_clone_to_owned().expect("dup"),
        ))
        .stdout(Stdio::from(
            slave.as_fd().try_clone_to_owned().expect("dup"),
        ))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn ctr");
    let mut master = std::fs::File::from(pty.master);
    let mut writer = master.try_clone().expect("dup master");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last slave (ctr) is gone.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    std::thread::sleep(Duration::from_millis(500));
    writer
        .write_all(b"tty; echo typed-$((6*7)); exit 5\n")
        .expect("write to pty");
    let (status, hung) = wait_within(&mut child, Duration::from_secs(20), hang_report);
    drop(writer);
    if let Some(report) = hung {
        let shown = reader.join().unwrap_or_default();
        panic!(
            "ctr run -t did not end within 20 s (killed); the terminal showed: {shown}\n{report}"
        );
    }
    let out = reader.join().expect("reader");
    assert!(out.contains("/dev/pts/"), "no pty in the container: {out}");
    assert!(out.contains("typed-42"), "{out}");
    assert_eq!(status.code(), Some(5), "{out}");
    assert_nothing_left(&id);
}

/// The counter the container writes, read from the host (0 if it does not
/// read as a number: not written yet).
fn counter(pid: i32) -> u64 {
    counter_in(Path::new(&format!("/proc/{pid}/root/count"))).unwrap_or(0)
}

#[test]
fn checkpoint_then_restore_counter_goes_on() {
    let id = unique_id("ctr-ckpt");
    let image = format!("checkpoint/{id}:1");
    let mut cleanup = Cleanup::new(&id);
    cleanup.image = Some(image.clone());
    ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        migrun_tests::COUNTER,
    ]);
    let (pid, _) = task(&id).expect("task listed");
    assert!(wait_until(Duration::from_secs(5), || counter(pid) > 20));

    // A checkpoint of the running task (it keeps running), with its rw layer.
    ctr_ok(&["container", "checkpoint", "--task", "--rw", &id, &image]);
    let at_checkpoint = counter(pid);
    assert_eq!(status(&id), "RUNNING", "the task must keep running");
    let images = ctr_ok(&["image", "ls", "-q"]);
    assert!(images.lines().any(|l| l == image), "{images}");

    // Gone, then restored from the checkpoint under the same id.
    ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(wait_until(Duration::from_secs(5), || status(&id) == "STOPPED"));
    ctr_ok(&["task", "delete", &id]);
    ctr_ok(&["container", "delete", &id]);
    ctr_ok(&["container", "restore", "--live", "--rw", &id, &image]);
    assert!(wait_until(Duration::from_secs(10), || status(&id) == "RUNNING"));
    let (restored, _) = task(&id).expect("restored task listed");
    assert!(restored > 0);
    // The count goes on from the checkpoint: not from 1.
    let first = counter(restored);
    assert!(wait_until(Duration::from_secs(5), || counter(restored) > first));
    let now = counter(restored);
    assert!(
        now >= at_checkpoint.saturating_sub(5),
        "counter restarted: {now} after checkpoint at {at_checkpoint}"
    );
    // `cat` in the container may come between the counter's truncation and
    // its write, and read nothing: read until it finds a number.
    let mut out = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            out = ctr_ok(&["task", "exec", "--exec-id", "c", &id, "cat", "/count"]);
            out.trim().parse::<u64>().is_ok()
        }),
        "cat /count in the container read no number: {out:?}"
    );
    let seen = out.trim().parse::<u64>().unwrap_or(0);
    assert!(seen >= now, "exec read {seen}, the host read {now} before");
}

#[test]
fn shim_killed_while_container_runs_is_cleaned_up() {
    let id = unique_id("ctr-shimkill");
    let _cleanup = Cleanup::new(&id);
    ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        "while true; do sleep 0.1; done",
    ]);
    let (pid, _) = task(&id).expect("task listed");
    let shims = shim_pids(&id);
    assert_eq!(shims.len(), 1, "{shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill shim");
    // As with the Go runc shim: containerd runs `shim delete`, which kills
    // the container, and reports the task stopped (or gone).
    assert!(
        wait_until(Duration::from_secs(15), || !alive(pid)),
        "container process survived its shim"
    );
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            task(&id).map(|t| t.1).as_deref(),
            None | Some("STOPPED")
        )),
        "task is {:?}",
        task(&id)
    );
    let _ = ctr(&["task", "delete", &id]);
    ctr_ok(&["container", "delete", &id]);
    assert_nothing_left(&id);
}

#[test]
fn bad_spec_is_a_clear_error_and_leaves_nothing() {
    let id = unique_id("ctr-badspec");
    let _cleanup = Cleanup::new(&id);
    let mut spec: serde_json::Value =
        serde_json::from_str(&ctr_ok(&["oci", "spec"])).expect("ctr oci spec is JSON");
    // With --config, ctr takes no image: the root is a host directory.
    let bundle = migrun_tests::Bundle::new(&["true"]);
    spec["root"] = serde_json::json!({"path": bundle.rootfs(), "readonly": false});
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(serde_json::json!({"type": "bogus"}));
    let dir = tempfile::tempdir().expect("tempdir");
    let config: PathBuf = dir.path().join("config.json");
    std::fs::write(&config, spec.to_string()).expect("write config");
    let config = config.to_string_lossy().into_owned();
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--config",
        &config,
        &id,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("bogus"),
        "unclear error: {err}"
    );
    let _ = ctr(&["container", "delete", &id]);
    assert_nothing_left(&id);
    // No container process: nothing runs in a cgroup named after it, and
    // nothing is mounted in its bundle.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&id), "mounts left: {mounts}");
}
