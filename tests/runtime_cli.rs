//! End-to-end tests of migrun's runc-compatible command line on busybox bundles.

use std::fs;
use std::time::Duration;

use migrun_tests::{
    cgroups_of, counter_at, memory_cgroup_of, processes_rooted_at, unique_id, wait_until, Bundle,
    Migrun, COUNTER,
};

fn counter(b: &Bundle) -> u64 {
    counter_at(&b.rootfs())
}

#[test]
fn create_start_state_kill_delete() {
    let m = Migrun::new();
    let id = unique_id("life");
    let b = Bundle::new(&["sh", "-c", &format!("trap 'exit 0' TERM; {COUNTER}")]);
    let bundle = b.path().to_str().expect("utf8");
    m.ok(&["create", "--bundle", bundle, &id]);

    let st = m.state(&id);
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], id.as_str());
    assert_eq!(
        st["ociVersion"].as_str().map(|v| v.starts_with("1.")),
        Some(true)
    );
    assert!(st["pid"].as_i64().unwrap_or(0) > 0);
    assert_eq!(st["bundle"], bundle);
    assert_eq!(st["rootfs"], b.rootfs().to_str().expect("utf8"));
    assert!(st["created"].as_str().is_some_and(|c| c.contains('T')));
    assert!(st.get("owner").is_some() && st["annotations"].is_object());
    // Created: the user process has not run yet.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&b), 0, "process ran before start");

    m.ok(&["start", &id]);
    assert_eq!(m.status(&id), "running");
    assert!(wait_until(Duration::from_secs(5), || counter(&b) > 2));

    m.ok(&["kill", &id, "TERM"]);
    assert!(wait_until(Duration::from_secs(5), || m.status(&id) == "stopped"));
    assert_eq!(m.state(&id)["pid"], 0);
    m.ok(&["delete", &id]);
    assert!(!m.root().join(&id).exists());
    m.fails(&["state", &id]);
}

#[test]
fn run_returns_exit_code() {
    let m = Migrun::new();
    let b = Bundle::new(&["sh", "-c", "echo hello; exit 7"]);
    let out = m.run(&[
        "run",
        "-b",
        b.path().to_str().expect("utf8"),
        &unique_id("exit7"),
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    // The container is deleted after a foreground run.
    assert_eq!(m.ok(&["list", "-q"]), "");
}

#[test]
fn run_true_exits_at_once() {
    let m = Migrun::new();
    let b = Bundle::new(&["true"]);
    let out = m
        .command()
        .args([
            "run",
            "-b",
            b.path().to_str().expect("utf8"),
            &unique_id("true"),
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn runtime_binary_cannot_be_overwritten_through_proc_exe() {
    // CVE-2019-5736: grab /proc/PID/exe of the runtime while it runs, then
    // reopen it for writing once the runtime has exited.
    use std::os::unix::fs::OpenOptionsExt;
    let m = Migrun::new();
    let b = Bundle::new(&["sleep", "5"]);
    let id = unique_id("cve");
    let mut child = m
        .command()
        .args(["run", "-b", b.path().to_str().expect("utf8"), &id])
        .spawn()
        .expect("spawn");
    let pid = child.id();
    assert!(wait_until(Duration::from_secs(5), || {
        m.root().join(&id).join("state.json").exists() && m.status(&id) == "running"
    }));
    let handle = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(format!("/proc/{pid}/exe"))
        .expect("open O_PATH");
    m.ok(&["kill", &id, "KILL"]);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + 9));
    use std::os::fd::AsRawFd;
    let reopened = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    assert!(
        reopened.is_err(),
        "the runtime binary could be reopened for writing after the runtime exited"
    );
}

#[test]
fn exec_output_and_exit_code() {
    let m = Migrun::new();
    let id = unique_id("exec");
    let b = Bundle::new(&["sleep", "60"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    let out = m.run(&[
        "exec",
        "-e",
        "GREETING=hi",
        &id,
        "sh",
        "-c",
        "echo $GREETING from $(hostname); exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("hi from "), "{text}");
    // Exec really runs inside the container: it sees the container's rootfs.
    fs::write(b.rootfs().join("marker"), "inside").expect("write marker");
    assert_eq!(m.ok(&["exec", &id, "cat", "/marker"]), "inside");
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn init_and_exec_processes_join_every_cgroup_hierarchy() {
    // migrun's libcgroups moves a process into v1 cgroups by writing `0` to
    // `tasks` (third_party/README.md): the init and an exec'd process must
    // still land in the container's cgroup in every hierarchy.
    let m = Migrun::new();
    let id = unique_id("cgjoin");
    let b = Bundle::new(&["sleep", "60"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    let init = m.state(&id)["pid"].as_i64().expect("pid") as i32;
    let exec_pid_file = b.path().join("exec.pid");
    m.ok(&[
        "exec",
        "-d",
        "--pid-file",
        exec_pid_file.to_str().expect("utf8"),
        &id,
        "sleep",
        "61",
    ]);
    let exec_pid: i32 = fs::read_to_string(&exec_pid_file)
        .expect("exec pid file")
        .trim()
        .parse()
        .expect("pid");
    // A pure cgroup v2 host has nothing v1 to check.
    let v1_host = cgroups_of(std::process::id() as i32)
        .iter()
        .any(|(c, _)| !c.is_empty());
    for pid in [init, exec_pid].into_iter().filter(|_| v1_host) {
        let theirs = cgroups_of(pid);
        let v1: Vec<_> = theirs
            .iter()
            .filter(|(c, _)| {
                c.split(',')
                    .any(|c| ["cpu", "memory", "pids", "freezer", "devices", "blkio"].contains(&c))
            })
            .collect();
        assert!(v1.len() >= 5, "pid {pid}: {theirs:?}");
        for (controllers, path) in v1 {
            assert!(
                path.contains(&id),
                "pid {pid} is not in the container's {controllers} cgroup: {path}"
            );
        }
    }
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn ps_lists_container_processes() {
    let m = Migrun::new();
    let id = unique_id("ps");
    let b = Bundle::new(&["sh", "-c", "sleep 61 & sleep 62 & wait"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    let init = m.state(&id)["pid"].as_i64().expect("pid");
    let mut pids: Vec<i64> = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            pids = serde_json::from_str(&m.ok(&["ps", "-f", "json", &id])).expect("json");
            pids.len() == 3
        }),
        "{pids:?}"
    );
    assert!(pids.contains(&init));
    let table = m.ok(&["ps", &id]);
    assert!(table.lines().next().is_some_and(|h| h.contains("PID")));
    assert!(
        table.contains("sleep 61") && table.contains("sleep 62"),
        "{table}"
    );
    let custom = m.ok(&["ps", &id, "-o", "pid,comm"]);
    assert_eq!(custom.lines().count(), 4, "{custom}");
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn pause_stops_counter_and_resume_continues() {
    let m = Migrun::new();
    let id = unique_id("pause");
    let b = Bundle::new(&["sh", "-c", COUNTER]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    assert!(wait_until(Duration::from_secs(5), || counter(&b) > 2));
    m.ok(&["pause", &id]);
    assert_eq!(m.status(&id), "paused");
    let frozen = counter(&b);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(counter(&b), frozen, "counter advanced while paused");
    m.ok(&["resume", &id]);
    assert_eq!(m.status(&id), "running");
    assert!(wait_until(Duration::from_secs(5), || counter(&b) > frozen + 2));
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn update_memory_changes_cgroup_limit() {
    let m = Migrun::new();
    let id = unique_id("update");
    let b = Bundle::new(&["sleep", "60"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    let pid = m.state(&id)["pid"].as_i64().expect("pid") as i32;
    let cg = memory_cgroup_of(pid).expect("memory cgroup");
    let limit_file = if cg.join("memory.limit_in_bytes").exists() {
        cg.join("memory.limit_in_bytes")
    } else {
        cg.join("memory.max")
    };
    m.ok(&["update", "--memory", "64m", &id]);
    assert_eq!(
        fs::read_to_string(&limit_file).expect("read limit").trim(),
        (64u64 << 20).to_string()
    );
    // The resources file form, from standard input as containerd sends it.
    let mut child = m
        .command()
        .args(["update", "-r", "-", &id])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(br#"{"memory":{"limit":100663296}}"#)
        .expect("write");
    assert!(child.wait().expect("wait").success());
    assert_eq!(
        fs::read_to_string(&limit_file).expect("read limit").trim(),
        "100663296"
    );
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn events_stats_prints_json() {
    let m = Migrun::new();
    let id = unique_id("events");
    let b = Bundle::new(&["sleep", "60"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    let ev: serde_json::Value =
        serde_json::from_str(m.ok(&["events", "--stats", &id]).trim()).expect("json");
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], id.as_str());
    assert!(ev["data"]["memory"].is_object(), "{ev}");
    assert!(
        ev["data"]["pids"]["current"].as_u64().unwrap_or(0) >= 1,
        "{ev}"
    );
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn kill_accepts_names_and_numbers() {
    let m = Migrun::new();
    let id = unique_id("kill");
    let b = Bundle::new(&[
        "sh",
        "-c",
        // USR2, not HUP: a shell cannot trap a signal ignored when it
        // started, and the container inherits ignored signals from the
        // runtime's caller (as with runc and crun): under nohup, HUP is.
        "trap 'echo usr1 >> /got' USR1; trap 'echo usr2 >> /got' USR2; while true; do sleep 0.05; done",
    ]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    std::thread::sleep(Duration::from_millis(200));
    // Each trap appends a line; a loaded CI machine can take a while to
    // schedule the shell, so wait generously and show what arrived.
    let got = |n: usize| {
        let arrived = wait_until(Duration::from_secs(15), || {
            b.read("got").map(|s| s.lines().count()) == Some(n)
        });
        assert!(
            arrived,
            "expected {n} trap lines, got {:?}",
            b.read("got").unwrap_or_default()
        );
    };
    m.ok(&["kill", &id, "SIGUSR1"]);
    got(1);
    m.ok(&["kill", &id, "USR1"]);
    got(2);
    m.ok(&["kill", &id, "10"]);
    got(3);
    m.ok(&["kill", &id, "usr2"]);
    got(4);
    assert_eq!(
        b.read("got").unwrap_or_default(),
        "usr1\nusr1\nusr1\nusr2\n"
    );
    m.fails(&["kill", &id, "SIGNOPE"]);
    m.ok(&["kill", "--all", &id, "9"]);
    assert!(wait_until(Duration::from_secs(5), || m.status(&id) == "stopped"));
    m.ok(&["delete", &id]);
}

#[test]
fn delete_force_kills_running_container() {
    let m = Migrun::new();
    let id = unique_id("delf");
    let b = Bundle::new(&["sh", "-c", "sleep 60 & sleep 60 & wait"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    assert!(wait_until(Duration::from_secs(5), || processes_rooted_at(
        &b.rootfs()
    )
    .len()
        == 3));
    m.ok(&["delete", "-f", &id]);
    assert!(wait_until(Duration::from_secs(5), || processes_rooted_at(
        &b.rootfs()
    )
    .is_empty()));
    assert!(!m.root().join(&id).exists());
}

#[test]
fn list_shows_all_and_quiet_ids() {
    let m = Migrun::new();
    let b1 = Bundle::new(&["sleep", "60"]);
    let b2 = Bundle::new(&["sleep", "60"]);
    let (a, c) = (unique_id("list-a"), unique_id("list-b"));
    m.ok(&["run", "-d", "-b", b1.path().to_str().expect("utf8"), &a]);
    m.ok(&["create", "-b", b2.path().to_str().expect("utf8"), &c]);
    assert_eq!(m.ok(&["list", "-q"]), format!("{a}\n{c}\n"));
    let table = m.ok(&["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATUS"));
    assert!(lines[1].starts_with(&a) && lines[1].contains("running"));
    assert!(lines[2].starts_with(&c) && lines[2].contains("created"));
    let json: serde_json::Value =
        serde_json::from_str(&m.ok(&["list", "-f", "json"])).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(2));
    assert_eq!(json[1]["status"], "created");
}

#[test]
fn log_file_gets_json_errors() {
    let m = Migrun::new();
    let log = tempfile::NamedTempFile::new().expect("tmp");
    let out = m
        .command()
        .args(["--log"])
        .arg(log.path())
        .args(["--log-format", "json", "state", "no-such-container"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let text = fs::read_to_string(log.path()).expect("read log");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a log line")).expect("json line");
    assert_eq!(last["level"], "error");
    assert!(last["msg"]
        .as_str()
        .is_some_and(|m| m.contains("no-such-container")));
    assert!(last["time"].as_str().is_some());
}

#[test]
fn spec_writes_runc_default() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = Migrun::new();
    m.ok(&["spec", "--bundle", dir.path().to_str().expect("utf8")]);
    let spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).expect("read"))
            .expect("json");
    assert_eq!(spec["process"]["args"][0], "sh");
    assert_eq!(spec["root"]["path"], "rootfs");
    m.fails(&["spec", "--bundle", dir.path().to_str().expect("utf8")]);
    let features: serde_json::Value = serde_json::from_str(&m.ok(&["features"])).expect("json");
    assert!(features["linux"]["namespaces"]
        .as_array()
        .is_some_and(|n| n.len() >= 7));
}
