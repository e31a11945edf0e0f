//! Checkpoint and restore through CRIU: real containers, real memory, real TCP.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use migrun_tests::{
    check_memory, counter_at, processes_rooted_at, unique_id, wait_until, Bundle, Migrun, NetPair,
    COUNTER,
};

fn counter(b: &Bundle) -> u64 {
    counter_at(&b.rootfs())
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf8 path")
}

#[test]
fn counter_continues_after_checkpoint_and_restore() {
    let m = Migrun::new();
    let id = unique_id("cr-counter");
    let b = Bundle::new(&["sh", "-c", COUNTER]);
    let images = tempfile::tempdir().expect("tmp");
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(5), || counter(&b) >= 10));

    m.ok_quiet(&["checkpoint", "--image-path", path(images.path()), &id]);
    // The container is gone and its processes with it.
    m.fails(&["state", &id]);
    assert!(processes_rooted_at(&b.rootfs()).is_empty());
    let at_checkpoint = counter(&b);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counter(&b),
        at_checkpoint,
        "counter moved while checkpointed"
    );

    m.ok_quiet(&[
        "restore",
        "-d",
        "--image-path",
        path(images.path()),
        "-b",
        path(b.path()),
        &id,
    ]);
    assert_eq!(m.status(&id), "running");
    assert!(wait_until(Duration::from_secs(5), || counter(&b) > at_checkpoint));
    let after = counter(&b);
    assert!(
        after > at_checkpoint && after < at_checkpoint + 40,
        "counter restarted instead of continuing: {at_checkpoint} then {after}"
    );
    // A restored container is an ordinary one: exec, ps, kill, delete.
    assert_eq!(
        m.ok(&["exec", &id, "cat", "/count"])
            .trim()
            .parse::<u64>()
            .ok()
            .map(|v| v > at_checkpoint),
        Some(true)
    );
    let pids: Vec<i64> = serde_json::from_str(&m.ok(&["ps", "-f", "json", &id])).expect("json");
    assert!(pids.contains(&m.state(&id)["pid"].as_i64().expect("pid")));
    m.ok(&["kill", &id, "KILL"]);
    assert!(wait_until(Duration::from_secs(5), || m.status(&id) == "stopped"));
    m.ok(&["delete", &id]);
    assert!(processes_rooted_at(&b.rootfs()).is_empty());
    assert!(!m.root().join(&id).exists());
}

#[test]
fn leave_running_then_restore_a_copy_under_another_id() {
    let m = Migrun::new();
    let id = unique_id("cr-leave");
    let copy_id = unique_id("cr-copy");
    // A token only the process's memory holds, printed with the counter.
    let script = format!(
        "t=$$-$RANDOM$RANDOM; {}",
        COUNTER.replace("echo $i", "echo $t $i")
    );
    let b = Bundle::new(&["sh", "-c", &script]);
    let images = tempfile::tempdir().expect("tmp");
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(5), || b
        .read("count")
        .is_some_and(|c| c.split(' ').nth(1).is_some_and(|n| n
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            > 5))));
    m.ok_quiet(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        path(images.path()),
        &id,
    ]);
    assert_eq!(m.status(&id), "running");
    // The counter rewrites the file (truncate, then write): a read can find
    // it empty, so the token is the first non-empty one read.
    let token_of = |b: &Bundle| -> String {
        let mut token = String::new();
        wait_until(Duration::from_secs(5), || {
            token = b
                .read("count")
                .unwrap_or_default()
                .split(' ')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            !token.is_empty()
        });
        token
    };
    let token = token_of(&b);
    assert!(!token.is_empty(), "no token in the original's count file");

    // A second bundle with a copy of the rootfs taken now.
    let copy = Bundle::new(&["true"]);
    fs::remove_dir_all(copy.rootfs()).expect("rm");
    let st = Command::new("cp")
        .arg("-a")
        .arg(b.rootfs())
        .arg(copy.rootfs())
        .status()
        .expect("cp");
    assert!(st.success());
    fs::copy(
        b.path().join("config.json"),
        copy.path().join("config.json"),
    )
    .expect("config");
    let _ = fs::remove_file(copy.rootfs().join("count"));

    m.ok_quiet(&[
        "restore",
        "-d",
        "--image-path",
        path(images.path()),
        "-b",
        path(copy.path()),
        &copy_id,
    ]);
    assert_eq!(m.status(&copy_id), "running");
    assert_eq!(m.status(&id), "running");
    let copy_token = token_of(&copy);
    assert_eq!(
        copy_token, token,
        "the copy does not carry the original's memory"
    );
    // Two independent containers: killing the copy leaves the original.
    m.ok(&["delete", "-f", &copy_id]);
    assert_eq!(m.status(&id), "running");
    let before = b.read("count");
    assert!(wait_until(Duration::from_secs(5), || b.read("count") != before));
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn memory_pattern_of_256_mib_is_intact_after_restore() {
    let m = Migrun::new();
    let id = unique_id("cr-pattern");
    let b = Bundle::new(&["/pattern", "256"]);
    b.install_program("pattern");
    let images = tempfile::tempdir().expect("tmp");
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(30), || b
        .read("ready")
        .is_some()));
    let check = |b: &Bundle| check_memory(&b.rootfs(), "", Duration::from_secs(30));
    assert_eq!(check(&b), "ok 256", "pattern broken before checkpoint");
    m.ok_quiet(&["checkpoint", "--image-path", path(images.path()), &id]);
    m.ok_quiet(&[
        "restore",
        "-d",
        "--image-path",
        path(images.path()),
        "-b",
        path(b.path()),
        &id,
    ]);
    assert_eq!(check(&b), "ok 256");
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn established_tcp_connection_survives() {
    let m = Migrun::new();
    let id = unique_id("cr-tcp");
    let net = NetPair::new(1);
    // The peer outside the container: a listener whose stdio is this test.
    let mut peer = Command::new("ip")
        .args([
            "netns", "exec", &net.peer, "busybox", "nc", "-l", "-p", "5000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn peer");
    let ctr_ns = net.ctr_path();
    let b = Bundle::with(&["nc", &net.peer_ip, "5000", "-e", "/bin/cat"], |spec| {
        for ns in spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
        {
            if ns["type"] == "network" {
                ns["path"] = serde_json::Value::from(ctr_ns.clone());
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    let mut to_peer = peer.stdin.take().expect("stdin");
    let mut from_peer = BufReader::new(peer.stdout.take().expect("stdout"));
    let mut echo = |line: &str| -> String {
        to_peer
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        to_peer.flush().expect("flush");
        let mut got = String::new();
        from_peer.read_line(&mut got).expect("receive");
        got
    };
    assert_eq!(echo("before"), "before\n");
    let images = tempfile::tempdir().expect("tmp");
    m.ok_quiet(&[
        "checkpoint",
        "--tcp-established",
        "--image-path",
        path(images.path()),
        &id,
    ]);
    m.ok_quiet(&[
        "restore",
        "-d",
        "--tcp-established",
        "--image-path",
        path(images.path()),
        "-b",
        path(b.path()),
        &id,
    ]);
    assert_eq!(echo("after restore"), "after restore\n");
    assert_eq!(echo("and again"), "and again\n");
    m.ok(&["delete", "-f", &id]);
    let _ = peer.kill();
    let _ = peer.wait();
}

#[test]
fn bad_checkpoints_leave_the_container_running() {
    let m = Migrun::new();
    let id = unique_id("cr-bad");
    let b = Bundle::new(&["sh", "-c", COUNTER]);
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    let going = |b: &Bundle| {
        let v = counter(b);
        wait_until(Duration::from_secs(5), || counter(b) > v + 2)
    };
    assert!(going(&b));

    let err = m.fails(&["checkpoint", "--image-path", "/tmp/x", "ghost"]);
    assert!(err.contains("does not exist"), "{err}");

    let err = m.fails(&["checkpoint", "--image-path", "/etc/passwd/cp", &id]);
    assert!(err.contains("not writable"), "{err}");
    assert_eq!(m.status(&id), "running");
    assert!(going(&b));

    let err = m.fails(&[
        "--criu",
        "/nonexistent/criu",
        "checkpoint",
        "--image-path",
        "/tmp/x",
        &id,
    ]);
    assert!(err.contains("criu not found"), "{err}");
    assert_eq!(m.status(&id), "running");
    assert!(going(&b));

    let images = tempfile::tempdir().expect("tmp");
    let err = m.fails(&[
        "checkpoint",
        "--pre-dump",
        "--image-path",
        path(images.path()),
        &id,
    ]);
    assert!(err.contains("migrate-out"), "{err}");
    assert!(going(&b));

    // CRIU itself fails: the container's stdout is a host file it cannot dump.
    let id2 = unique_id("cr-bad2");
    let b2 = Bundle::new(&["sh", "-c", COUNTER]);
    m.ok(&["run", "-d", "-b", path(b2.path()), &id2]);
    let err = m.fails(&["checkpoint", "--image-path", path(images.path()), &id2]);
    assert!(err.contains("criu dump failed"), "{err}");
    assert_eq!(m.status(&id2), "running");
    assert!(going(&b2));

    // A stopped container cannot be checkpointed.
    m.ok(&["kill", &id2, "KILL"]);
    assert!(wait_until(Duration::from_secs(5), || m.status(&id2) == "stopped"));
    let err = m.fails(&["checkpoint", "--image-path", path(images.path()), &id2]);
    assert!(err.contains("stopped"), "{err}");
    m.ok(&["delete", "-f", &id]);
    m.ok(&["delete", &id2]);
}

#[test]
fn bad_images_restore_nothing() {
    let m = Migrun::new();
    let b = Bundle::new(&["sh", "-c", COUNTER]);
    let empty = tempfile::tempdir().expect("tmp");
    let id = unique_id("cr-empty");
    let err = m.fails(&[
        "restore",
        "-d",
        "--image-path",
        path(empty.path()),
        "-b",
        path(b.path()),
        &id,
    ]);
    assert!(err.contains("inventory.img"), "{err}");
    assert!(!m.root().join(&id).exists());

    // Real images with the memory pages cut short.
    let src = unique_id("cr-src");
    let images = tempfile::tempdir().expect("tmp");
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &src]);
    assert!(wait_until(Duration::from_secs(5), || counter(&b) > 3));
    m.ok_quiet(&["checkpoint", "--image-path", path(images.path()), &src]);
    for entry in fs::read_dir(images.path()).expect("ls").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("pages-") || name.starts_with("core-") {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(entry.path())
                .expect("open");
            f.set_len(10).expect("truncate");
        }
    }
    let id = unique_id("cr-corrupt");
    let err = m.fails(&[
        "restore",
        "-d",
        "--image-path",
        path(images.path()),
        "-b",
        path(b.path()),
        &id,
    ]);
    assert!(err.contains("criu restore failed"), "{err}");
    assert!(
        !m.root().join(&id).exists(),
        "state left after failed restore"
    );
    assert!(wait_until(Duration::from_secs(5), || processes_rooted_at(
        &b.rootfs()
    )
    .is_empty()));
    assert!(
        migrun_tests::cgroups_named(&id).is_empty(),
        "cgroup left after failed restore"
    );
}

/// `checkpoint` of a container with a SIGSTOPped process under a cgroup v1
/// freezer is refused at once, saying which process (CRIU's attach to it,
/// frozen, would wait for good); the container runs on, its process still
/// stopped.
#[test]
fn checkpoint_of_a_container_with_a_stopped_process_is_refused_at_once() {
    if !std::path::Path::new("/sys/fs/cgroup/freezer").is_dir() {
        println!("skipped: no cgroup v1 freezer on this host");
        return;
    }
    let m = Migrun::new();
    let id = unique_id("cr-stopped");
    let b = Bundle::new(&["sh", "-c", "sleep 600 & exec sleep 700"]);
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    let mut stopped = None;
    assert!(wait_until(Duration::from_secs(5), || {
        stopped = processes_rooted_at(&b.rootfs()).into_iter().find(|p| {
            fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == b"sleep\x00600\x00")
        });
        stopped.is_some()
    }));
    let pid = nix::unistd::Pid::from_raw(stopped.expect("sleep 600"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let state = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    };
    assert!(wait_until(Duration::from_secs(5), state));
    let images = tempfile::tempdir().expect("tmp");
    let t = std::time::Instant::now();
    let err = m.fails(&["checkpoint", "--image-path", path(images.path()), &id]);
    assert!(
        err.contains(&format!("process {pid} (sleep)")) && err.contains("is stopped"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(m.status(&id), "running");
    assert!(state(), "the stopped process was continued");
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    m.ok(&["delete", "-f", &id]);
}
