//! Live migration between two migrun roots on this host, over loopback:
//! real containers, real memory, real faults.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use migrun_tests::{
    check_memory, counter_at, is_error_line, migrate_out, migrate_out_with, pair_key, path,
    target_rootfs, unique_id, wait_until, Bundle, Migrun, Target, Tmpfs, COUNTER,
};

fn counter(rootfs: &Path) -> u64 {
    counter_at(rootfs)
}

#[test]
fn counter_migrates_and_continues() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let id = unique_id("mig-counter");
    let b = Bundle::new(&["sh", "-c", COUNTER]);
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(5), || counter(&b.rootfs()) >= 10));
    let source_pid = src.state(&id)["pid"].as_i64().expect("pid");
    let mut target = Target::start(&key);
    let (ok, err, stats) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "migrate-in failed: {}", target.log());
    let at_source = counter(&b.rootfs());
    // Gone from the source, running on the target.
    src.fails(&["state", &id]);
    // Gone, or a zombie waiting for this machine's init to reap it.
    let alive = || {
        fs::read_to_string(format!("/proc/{source_pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('Z'))
                    != Some(true)
            })
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(5), || !alive()),
        "source process still running"
    );
    assert_eq!(target.m.status(&id), "running");
    let rootfs = target_rootfs(&target, &id);
    assert!(wait_until(Duration::from_secs(5), || counter(&rootfs) > at_source + 2));
    let first = counter(&rootfs);
    assert!(
        first >= at_source,
        "counter reset on the target: {at_source} then {first}"
    );
    assert_eq!(
        target
            .m
            .ok(&["exec", &id, "cat", "/count"])
            .trim()
            .parse::<u64>()
            .map(|v| v >= first)
            .ok(),
        Some(true)
    );
    let stats = stats.expect("stats json");
    for key in [
        "total_ms",
        "downtime_ms",
        "rounds",
        "bytes_total",
        "bytes_downtime",
        "dirty_tracking",
        "throttled",
    ] {
        assert!(stats.get(key).is_some(), "stats lack {key}: {stats}");
    }
    assert_eq!(stats["dirty_tracking"], "uffd-wp");
    assert!(err.contains("round"), "no progress lines: {err}");
    target.m.ok(&["delete", "-f", &id]);
}

#[test]
fn memory_of_512_mib_dirtied_container_arrives_with_little_downtime_traffic() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let id = unique_id("mig-512");
    let b = Bundle::new(&["/dirtier", "512", "4"]);
    b.install_program("dirtier");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(60), || b
        .read("ready")
        .is_some()));
    let mut target = Target::start(&key);
    let (ok, err, stats) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "{}", target.log());
    let stats = stats.expect("stats");
    let rounds = stats["precopy_rounds"].as_u64().unwrap_or(0);
    assert!(rounds >= 2, "only {rounds} pre-copy rounds: {stats}");
    let downtime_bytes = stats["bytes_downtime"].as_u64().unwrap_or(u64::MAX);
    assert!(
        downtime_bytes < (512u64 << 20) / 10,
        "{downtime_bytes} bytes during the downtime: {stats}"
    );
    // The memory is consistent on the target: every page matches its version.
    let rootfs = target_rootfs(&target, &id);
    assert_eq!(check_memory(&rootfs, "", Duration::from_secs(60)), "ok 512");
    target.m.ok(&["delete", "-f", &id]);
}

/// Issue 15: the hash backend (the one Docker containers get) must compare
/// each collect with what was sent, not with what its previous collect saw.
/// 256 pages flip between two contents at random, thousands of times a
/// second, so pages are sent as B and are A again by the next collect
/// (A→B→A). With hashing forced, the target's memory must be what the
/// program last wrote. Before the engine called `record_sent`, every run
/// failed here (11 of 11, about 63 of the 256 pages wrong).
#[test]
fn hash_tracking_resends_pages_changed_back_after_being_sent() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let id = unique_id("mig-flip");
    let b = Bundle::new(&["/flipper", "256", "32"]);
    b.install_program("flipper");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(30), || b
        .read("ready")
        .is_some()));
    // The program's own check holds on the source.
    assert_eq!(
        check_memory(&b.rootfs(), "", Duration::from_secs(30)),
        "ok 256"
    );
    let mut target = Target::start(&key);
    // dirty::BACKEND_ENV in crates/migrate.
    let env = [("MIGRUN_DIRTY_BACKEND", OsStr::new("hash"))];
    let (ok, err, stats) = migrate_out_with(
        &src,
        &id,
        &target,
        &key,
        &[],
        &env,
        Duration::from_secs(300),
    );
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "{}", target.log());
    let stats = stats.expect("stats");
    assert_eq!(stats["dirty_tracking"], "hash", "{stats}");
    let rootfs = target_rootfs(&target, &id);
    let result = check_memory(&rootfs, "", Duration::from_secs(30));
    target.m.ok(&["delete", "-f", &id]);
    assert_eq!(result, "ok 256", "memory differs on the target: {err}");
}

#[test]
fn parent_and_child_memory_both_arrive() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let id = unique_id("mig-fork");
    let b = Bundle::new(&["/pattern", "64", "fork"]);
    b.install_program("pattern");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(30), || b
        .read("ready-parent")
        .is_some()
        && b.read("ready-child").is_some()));
    let mut target = Target::start(&key);
    let (ok, err, _) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "{}", target.log());
    let rootfs = target_rootfs(&target, &id);
    for role in ["parent", "child"] {
        assert_eq!(
            check_memory(&rootfs, &format!("-{role}"), Duration::from_secs(30)),
            "ok 64",
            "{role} did not answer, or its memory differs"
        );
    }
    target.m.ok(&["delete", "-f", &id]);
}

/// Starts a counter container on a fresh source root.
fn running_counter(name: &str) -> (Migrun, String, Bundle) {
    let src = Migrun::new();
    let id = unique_id(name);
    let b = Bundle::new(&["sh", "-c", COUNTER]);
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(5), || counter(&b.rootfs()) >= 5));
    (src, id, b)
}

/// After a failed migration: the source container runs and counts as before.
fn assert_source_intact(src: &Migrun, id: &str, b: &Bundle) {
    assert_eq!(src.status(id), "running");
    let v = counter(&b.rootfs());
    assert!(
        wait_until(Duration::from_secs(5), || counter(&b.rootfs()) > v + 2),
        "counter stopped on the source"
    );
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().expect("tmp");
    let key_a = pair_key(dir.path());
    let other = tempfile::tempdir().expect("tmp");
    let key_b = pair_key(other.path());
    let (src, id, b) = running_counter("mig-key");
    let mut target = Target::start(&key_b);
    let (ok, err, _) = migrate_out(&src, &id, &target, &key_a, &[]);
    assert!(!ok);
    assert!(err.contains("key"), "{err}");
    assert!(!target.finish());
    assert!(target.log().contains("key"), "{}", target.log());
    assert_source_intact(&src, &id, &b);
    assert!(target.m.ok(&["list", "-q"]).is_empty());
    src.ok(&["delete", "-f", &id]);
}

#[test]
fn target_killed_during_precopy_leaves_source_running() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let id = unique_id("mig-kill");
    let b = Bundle::new(&["/dirtier", "256", "1"]);
    b.install_program("dirtier");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(60), || b
        .read("ready")
        .is_some()));
    let mut target = Target::start(&key);
    let pid = target.child.id();
    // A slow link keeps pre-copy busy for seconds; kill the target in the middle.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let (ok, err, _) = migrate_out(&src, &id, &target, &key, &["--bandwidth", "200"]);
    assert!(!ok, "migration succeeded although the target died");
    assert_eq!(
        err.trim_end().lines().last().map(is_error_line),
        Some(true),
        "{err}"
    );
    let _ = target.finish();
    assert_eq!(src.status(&id), "running");
    assert_eq!(
        check_memory(&b.rootfs(), "", Duration::from_secs(60)),
        "ok 256"
    );
    src.ok(&["delete", "-f", &id]);
}

#[test]
fn restore_failing_on_target_rolls_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // A CRIU on the target that passes the version check but cannot restore.
    let fake = dir.path().join("criu");
    fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Version: 4.2.1'; exit 0; }\nexit 1\n",
    )
    .expect("w");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (src, id, b) = running_counter("mig-criu");
    let mut target = Target::start_with(&key, &["--criu", path(&fake)], None);
    let (ok, err, _) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(!ok, "migration succeeded with a broken target CRIU");
    assert!(err.contains("target failed"), "{err}");
    assert!(!target.finish());
    assert_source_intact(&src, &id, &b);
    assert!(target.m.ok(&["list", "-q"]).is_empty());
    assert!(
        target.leftovers().is_empty(),
        "target left {:?}",
        target.leftovers()
    );
    src.ok(&["delete", "-f", &id]);
}

#[test]
fn target_work_dir_too_small_rolls_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let small = Tmpfs::new("512k");
    let work = tempfile::tempdir_in(small.path()).expect("tmp");
    let (src, id, b) = running_counter("mig-full");
    // A migrated container's files go to its state root.
    let mut target = Target::start_on(Migrun::new_in(small.path()), &key, &[], Some(work));
    let (ok, err, _) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(!ok, "migration succeeded into a full disk");
    // The target checks the space the files need before it writes any.
    assert!(
        err.contains("target failed: not enough space for the container's files"),
        "{err}"
    );
    assert!(!target.finish());
    assert_source_intact(&src, &id, &b);
    assert!(
        target.leftovers().is_empty(),
        "target left {:?}",
        target.leftovers()
    );
    src.ok(&["delete", "-f", &id]);
}

#[test]
fn workload_dirtying_faster_than_the_link_is_throttled_and_completes() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let id = unique_id("mig-throttle");
    // A CPU-bound dirtier rewriting 32 MiB as fast as it can, over a 100 Mbit/s cap.
    let b = Bundle::new(&["/dirtier", "32", "0"]);
    b.install_program("dirtier");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(wait_until(Duration::from_secs(30), || b
        .read("ready")
        .is_some()));
    let mut target = Target::start(&key);
    let (ok, err, stats) = migrate_out(
        &src,
        &id,
        &target,
        &key,
        &["--bandwidth", "100", "--max-rounds", "4"],
    );
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "{}", target.log());
    let stats = stats.expect("stats");
    assert_eq!(stats["throttled"], true, "{stats}");
    assert!(
        err.contains("throttled"),
        "the progress does not say so: {err}"
    );
    let rootfs = target_rootfs(&target, &id);
    assert_eq!(check_memory(&rootfs, "", Duration::from_secs(60)), "ok 32");
    target.m.ok(&["delete", "-f", &id]);
}

#[test]
fn target_killed_during_the_final_phase_leaves_source_running() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // A CRIU on the target that is slow to start restoring: time to kill the target then.
    let slow = dir.path().join("criu");
    fs::write(
        &slow,
        "#!/bin/sh\n[ \"$1\" = swrk ] && sleep 3\nexec /usr/local/sbin/criu \"$@\"\n",
    )
    .expect("w");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (src, id, b) = running_counter("mig-final");
    let work = tempfile::tempdir().expect("tmp");
    let work_path = work.path().to_path_buf();
    let mut target = Target::start_with(&key, &["--criu", path(&slow)], Some(work));
    let pid = target.child.id();
    let log = target.log.clone();
    let killer = std::thread::spawn(move || {
        let restoring = wait_until(Duration::from_secs(60), || {
            fs::read_to_string(&log)
                .map(|l| l.contains("restoring"))
                .unwrap_or(false)
        });
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        restoring
    });
    let (ok, err, _) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(
        killer.join().expect("killer"),
        "the target never reached the final phase: {}",
        target.log()
    );
    assert!(
        !ok,
        "migration succeeded although the target died in the final phase"
    );
    assert!(err.lines().any(is_error_line), "{err}");
    let _ = target.finish();
    assert_source_intact(&src, &id, &b);
    // A new migrate-in on the same root and work directory removes what the killed one left.
    std::thread::sleep(Duration::from_secs(3));
    let again_log = dir.path().join("again.log");
    let mut again = target
        .m
        .command()
        .args(["migrate-in", "--listen", "127.0.0.1:0", "--once", "--key"])
        .arg(&key)
        .arg("--work-dir")
        .arg(&work_path)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&again_log).expect("log"))
        .spawn()
        .expect("migrate-in");
    // It cleans up before it listens.
    let listening = wait_until(Duration::from_secs(10), || {
        fs::read_to_string(&again_log)
            .map(|l| l.contains("listening"))
            .unwrap_or(false)
    });
    let _ = again.kill();
    let _ = again.wait();
    assert!(
        listening,
        "{}",
        fs::read_to_string(&again_log).unwrap_or_default()
    );
    assert!(target.m.ok(&["list", "-q"]).is_empty());
    let left: Vec<_> = fs::read_dir(&work_path)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "target left {left:?}");
    let left_root: Vec<_> = fs::read_dir(target.m.root())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| n != ".migrun-exe" && n != ".bundles" && n != ".migrations")
                .collect()
        })
        .unwrap_or_default();
    assert!(left_root.is_empty(), "target root left {left_root:?}");
    assert!(
        target.leftovers().is_empty(),
        "target left {:?}",
        target.leftovers()
    );
    src.ok(&["delete", "-f", &id]);
}

/// A container bundle whose rootfs is an overlay: `lower` below, a fresh
/// upper directory above; unmounted when dropped.
struct OverlayBundle {
    bundle: Bundle,
    _layers: tempfile::TempDir,
}

impl OverlayBundle {
    fn new(lower: &Path, args: &[&str]) -> Self {
        let bundle = Bundle::new(args);
        let layers = tempfile::tempdir().expect("tmp");
        let (upper, work) = (layers.path().join("upper"), layers.path().join("work"));
        for d in [&upper, &work] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let merged = bundle.rootfs();
        fs::remove_dir_all(&merged).expect("rm rootfs");
        fs::create_dir_all(&merged).expect("mkdir rootfs");
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged)
            .status()
            .expect("mount");
        assert!(st.success(), "mount overlay failed");
        Self {
            bundle,
            _layers: layers,
        }
    }
}

impl Drop for OverlayBundle {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.bundle.rootfs())
            .status();
    }
}

#[test]
fn overlay_rootfs_syncs_its_upper_dir_and_sends_each_layer_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    // The lower layer: a busybox tree, the same for both containers.
    let base = Bundle::new(&["true"]);
    let script = format!("rm -f /bin/vi; mkdir -p /data; echo before > /data/f; {COUNTER}");
    let one = OverlayBundle::new(&base.rootfs(), &["sh", "-c", &script]);
    let id = unique_id("mig-overlay");
    src.ok_quiet(&["run", "-d", "-b", path(one.bundle.path()), &id]);
    assert!(wait_until(Duration::from_secs(5), || counter(
        &one.bundle.rootfs()
    ) >= 5));
    let mut target = Target::start(&key);
    let (ok, err, stats) = migrate_out(&src, &id, &target, &key, &[]);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "migrate-in failed: {}", target.log());
    let at_source = counter(&one.bundle.rootfs());
    let stats = stats.expect("stats");
    assert_eq!(stats["layers_total"], 1, "{stats}");
    assert_eq!(stats["layers_sent"], 1, "{stats}");
    assert!(
        stats["bytes_layers"].as_u64().unwrap_or(0) > 100_000,
        "{stats}"
    );
    // On the target: what the container wrote, without what it deleted
    // from the layer below, over the layer's files; the counter goes on.
    let t = &target.m;
    assert_eq!(t.ok(&["exec", &id, "cat", "/data/f"]).trim(), "before");
    assert!(
        !t.run(&["exec", &id, "test", "-e", "/bin/vi"])
            .status
            .success(),
        "/bin/vi deleted on the source is back on the target"
    );
    assert!(t
        .run(&["exec", &id, "test", "-x", "/bin/busybox"])
        .status
        .success());
    let count = || {
        t.ok(&["exec", &id, "cat", "/count"])
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    assert!(wait_until(Duration::from_secs(5), || count() > at_source + 2));

    // The first container moves on from the target: its overlay is mounted
    // only in its own mount namespace now, and its layers come from the
    // record migrate-in left in its bundle (never from the container's own
    // mount table).
    let mut target3 = Target::start(&key);
    let (ok, err, stats) = migrate_out(t, &id, &target3, &key, &[]);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target3.log());
    assert!(target3.finish(), "migrate-in failed: {}", target3.log());
    let stats = stats.expect("stats");
    assert_eq!(stats["layers_total"], 1, "{stats}");
    assert_eq!(stats["layers_sent"], 1, "{stats}");
    let t3 = &target3.m;
    assert_eq!(t3.ok(&["exec", &id, "cat", "/data/f"]).trim(), "before");
    assert!(
        !t3.run(&["exec", &id, "test", "-e", "/bin/vi"])
            .status
            .success(),
        "/bin/vi deleted on the first host is back on the third"
    );
    t3.ok(&["delete", "-f", &id]);

    // A second container over the same layer: the target has it, nothing
    // of the layer crosses the wire.
    let two = OverlayBundle::new(&base.rootfs(), &["sh", "-c", COUNTER]);
    let id2 = unique_id("mig-overlay2");
    src.ok_quiet(&["run", "-d", "-b", path(two.bundle.path()), &id2]);
    assert!(wait_until(Duration::from_secs(5), || counter(
        &two.bundle.rootfs()
    ) >= 3));
    let work = std::mem::replace(&mut target.work, tempfile::tempdir().expect("tmp"));
    let mut target2 = Target::start_with(&key, &[], Some(work));
    let (ok, err, stats) = migrate_out(&src, &id2, &target2, &key, &[]);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target2.log());
    assert!(target2.finish(), "migrate-in failed: {}", target2.log());
    let stats = stats.expect("stats");
    assert_eq!(stats["layers_total"], 1, "{stats}");
    assert_eq!(stats["layers_sent"], 0, "{stats}");
    assert_eq!(stats["bytes_layers"], 0, "{stats}");
    assert_eq!(target2.m.status(&id2), "running");
    target2.m.ok(&["delete", "-f", &id2]);
}

/// The state letter of process `pid` (`T` stopped), from /proc.
fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// SIGSTOPs the one `sleep` of the container of `rootfs`; returns its pid.
fn stop_the_sleep(rootfs: &Path) -> i32 {
    let sleeps: Vec<i32> = migrun_tests::processes_rooted_at(rootfs)
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
        .collect();
    let [sleep] = sleeps[..] else {
        panic!("expected one sleep in the container, found {sleeps:?}");
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleep),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    assert!(wait_until(Duration::from_secs(5), || proc_state(sleep) == Some('T')));
    sleep
}

/// A container with a SIGSTOPped process cannot be dumped frozen by a
/// cgroup v1 freezer (ptrace's attach to a stopped task of a v1-frozen
/// cgroup waits for good; CRIU hung, and migrate-out with it): stopped
/// before migrate-out, it is refused at once; stopped during the pre-copy,
/// the dump refuses it and the migration rolls back. Either way quickly,
/// with an error that says why, and the source runs on as it was (its
/// stopped process still stopped, its memory intact), nothing left on the
/// target. (A v2 freezer lets ptrace take the stopped task: not refused.)
#[test]
fn container_with_a_stopped_process_is_refused_quickly_and_runs_on() {
    if !Path::new("/sys/fs/cgroup/freezer").is_dir() {
        println!("skipped: no cgroup v1 freezer on this host");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    for when in ["before", "during the pre-copy"] {
        let src = Migrun::new();
        let id = unique_id("mig-stopped");
        let b = Bundle::new(&["sh", "-c", "sleep 600 & exec /dirtier 16 2"]);
        b.install_program("dirtier");
        src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
        assert_eq!(
            check_memory(&b.rootfs(), "", Duration::from_secs(30)),
            "ok 16"
        );
        let mut target = Target::start(&key);
        let stopper = (when != "before").then(|| {
            let journal = src
                .root()
                .join(".migrations")
                .join(format!("source-{id}.json"));
            let rootfs = b.rootfs();
            std::thread::spawn(move || {
                assert!(
                    wait_until(Duration::from_secs(30), || journal.exists()),
                    "migrate-out never started"
                );
                stop_the_sleep(&rootfs)
            })
        });
        let stopped_before = (when == "before").then(|| stop_the_sleep(&b.rootfs()));
        let t = std::time::Instant::now();
        let (ok, err, _) = migrate_out_with(
            &src,
            &id,
            &target,
            &key,
            &["--bandwidth", "40"],
            &[],
            Duration::from_secs(60),
        );
        let took = t.elapsed();
        let sleep = stopped_before
            .or_else(|| stopper.map(|s| s.join().expect("stopper")))
            .expect("a stopped sleep");
        println!(
            "stopped {when}: migrate-out failed in {took:.1?}: {}",
            err.trim_end().lines().last().unwrap_or_default()
        );
        assert!(!ok, "stopped {when}: migrate-out succeeded: {err}");
        assert!(
            err.contains(&format!("process {sleep} (sleep)")) && err.contains("is stopped"),
            "stopped {when}: {err}"
        );
        assert!(
            took < Duration::from_secs(20),
            "stopped {when}: took {took:?}: {err}"
        );
        // The source runs on, as it was.
        assert_eq!(src.status(&id), "running", "stopped {when}");
        assert_eq!(proc_state(sleep), Some('T'), "stopped {when}: the sleep");
        assert_eq!(
            check_memory(&b.rootfs(), "", Duration::from_secs(30)),
            "ok 16",
            "stopped {when}"
        );
        assert!(
            !src.root()
                .join(".migrations")
                .join(format!("source-{id}.json"))
                .exists(),
            "stopped {when}: a source journal is left"
        );
        // Nothing on the target: its migrate-in undid what it had made
        // (refused before, migrate-out never connected).
        if stopped_before.is_some() {
            let _ = target.child.kill();
            let _ = target.child.wait();
        } else {
            target.finish();
        }
        assert!(
            target.leftovers().is_empty(),
            "stopped {when}: left on the target: {:?}\n{}",
            target.leftovers(),
            target.log()
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleep),
            nix::sys::signal::Signal::SIGCONT,
        );
        src.ok(&["delete", "-f", &id]);
    }
}
