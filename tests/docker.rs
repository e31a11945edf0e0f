//! migrun as a Docker runtime, on the project's own dockerd (`hack/docker.sh up`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use migrun_tests::{unique_id, wait_until};

/// The project's dockerd socket: `$DOCKER_HOST`, else hack/docker.sh's default.
fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .unwrap_or_else(|_| "unix:///var/lib/migrun-docker/docker.sock".to_string())
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker (is hack/docker.sh up?)")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs containerd's garbage collector now, in the containerd that the
/// project's dockerd manages (hack/docker.sh keeps it under `exec/` beside
/// the socket).
///
/// `docker checkpoint create` leaves the checkpoint tarball in containerd's
/// content store as garbage (the checkpoint image is deleted, its blobs are
/// collected whenever the collector next runs). `docker start --checkpoint`
/// uploads the very same tarball again and fails with "content ...: already
/// exists" if the collector has not run yet (moby/moby#42900; runc hits it
/// too). A synchronous lease deletion collects the garbage first.
fn collect_containerd_garbage() {
    let host = docker_host();
    let socket = std::path::Path::new(host.trim_start_matches("unix://"))
        .with_file_name("exec/containerd/containerd.sock");
    let ctr = |args: &[&str]| {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", "moby"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let lease = unique_id("gc");
    ctr(&["leases", "create", "--id", &lease]);
    ctr(&["leases", "delete", "--sync", &lease]);
}

/// Removes the container when the test ends, whatever happened.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

#[test]
fn run_rm_prints_and_propagates_exit_code() {
    let out = docker(&[
        "run",
        "--rm",
        "--runtime=migrun",
        "busybox:local",
        "echo",
        "hi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let out = docker(&[
        "run",
        "--rm",
        "--runtime=migrun",
        "busybox:local",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn detached_container_exec_logs_top_pause_stop_rm() {
    let name = unique_id("docker-life");
    let _cleanup = Cleanup(name.clone());
    let script = "trap 'echo got-term; exit 0' TERM; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done";
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--runtime=migrun",
        "busybox:local",
        "sh",
        "-c",
        script,
    ]);
    let inspect = docker_ok(&["inspect", "-f", "{{.HostConfig.Runtime}}", &name]);
    assert_eq!(inspect.trim(), "migrun");

    let ticks = || {
        String::from_utf8_lossy(&docker(&["logs", &name]).stdout)
            .lines()
            .filter(|l| l.starts_with("tick "))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || ticks() >= 3),
        "no ticks in docker logs"
    );

    let out = docker(&["exec", &name, "sh", "-c", "echo exec-ok; exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-ok\n");

    let top = docker_ok(&["top", &name]);
    assert!(top.contains("PID") && top.contains("trap"), "{top}");

    docker_ok(&["pause", &name]);
    let state = docker_ok(&["inspect", "-f", "{{.State.Status}}", &name]);
    assert_eq!(state.trim(), "paused");
    std::thread::sleep(Duration::from_millis(300));
    let frozen = ticks();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(), frozen, "counter advanced while paused");
    docker_ok(&["unpause", &name]);
    assert!(wait_until(Duration::from_secs(5), || ticks() > frozen + 2));

    let started = Instant::now();
    docker_ok(&["stop", "-t", "10", &name]);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "stop waited for the timeout: SIGTERM not delivered"
    );
    let logs = String::from_utf8_lossy(&docker(&["logs", &name]).stdout).into_owned();
    assert!(
        logs.contains("got-term"),
        "container did not see SIGTERM: {logs}"
    );
    let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &name]);
    assert_eq!(code.trim(), "0");
    docker_ok(&["rm", &name]);
    assert!(!docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .any(|n| n == name));
}

#[test]
fn run_interactive_through_a_pty() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let mut child = Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args([
            "run",
            "-it",
            "--rm",
            "--runtime=migrun",
            "busybox:local",
            "sh",
        ])
        .stdin(Stdio::from(
            slave.as_fd().try_clone_to_owned().expect("dup"),
        ))
        .stdout(Stdio::from(
            slave.as_fd().try_clone_to_owned().expect("dup"),
        ))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn docker");
    let mut master = std::fs::File::from(pty.master);
    master
        .write_all(b"tty; echo typed-$((6*7))\nexit 2\n")
        .expect("write to pty");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last slave closes: the normal end of a pty.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains("typed-42") && out.len() > 4096 * 16 {
                break;
            }
        }
        out
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("docker run -it did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = String::from_utf8_lossy(&reader.join().expect("reader")).into_owned();
    assert!(text.contains("typed-42"), "{text}");
    assert!(
        text.contains("/dev/pts/"),
        "no terminal inside the container: {text}"
    );
    assert_eq!(status.code(), Some(2), "{text}");
}

#[test]
fn docker_checkpoint_and_start_from_it() {
    let name = unique_id("docker-cp");
    let _cleanup = Cleanup(name.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--runtime=migrun",
        "busybox:local",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
    ]);
    let numbers = || -> Vec<u64> {
        String::from_utf8_lossy(&docker(&["logs", &name]).stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    assert!(wait_until(Duration::from_secs(10), || numbers().len() >= 5));
    docker_ok(&["checkpoint", "create", &name, "cp1"]);
    let state = docker_ok(&["inspect", "-f", "{{.State.Running}}", &name]);
    assert_eq!(
        state.trim(),
        "false",
        "checkpoint create did not stop the container"
    );
    let at_checkpoint = numbers().last().copied().unwrap_or(0);
    collect_containerd_garbage();
    docker_ok(&["start", "--checkpoint", "cp1", &name]);
    assert!(wait_until(Duration::from_secs(10), || numbers()
        .last()
        .copied()
        .unwrap_or(0)
        > at_checkpoint + 3));
    let all = numbers();
    // One unbroken sequence 1, 2, 3, ...: the counter went on, it did not restart.
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(
        all, expected,
        "counter did not continue across checkpoint/restore"
    );
    let out = docker(&["exec", &name, "echo", "exec-ok"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-ok\n");
    // The network is the daemon's, as with runc: the restored processes
    // live in the namespace Docker made for the new task (its SandboxKey),
    // which holds the address Docker gave it, and reach the bridge.
    let inspect = docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Pid}} {{.NetworkSettings.SandboxKey}} {{.NetworkSettings.IPAddress}} {{.NetworkSettings.Gateway}}",
        &name,
    ]);
    let f: Vec<&str> = inspect.split_whitespace().collect();
    assert_eq!(f.len(), 4, "inspect: {inspect}");
    use std::os::unix::fs::MetadataExt;
    let ino = |p: String| std::fs::metadata(&p).map(|m| m.ino()).unwrap_or(0);
    assert_eq!(
        ino(format!("/proc/{}/ns/net", f[0])),
        ino(f[1].to_string()),
        "restored container is not in the daemon's network namespace {}",
        f[1]
    );
    let addrs = docker_ok(&["exec", &name, "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(
        addrs.contains(&format!("{}/", f[2])),
        "eth0 lacks Docker's address {}: {addrs}",
        f[2]
    );
    docker_ok(&["exec", &name, "ping", "-c", "1", "-W", "2", f[3]]);
}
