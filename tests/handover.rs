//! The hand-over never loses a container, nor leaves two: faults injected
//! at every step of both sides (crash, connection dropped), a real silent
//! partition at every step of both sides, SIGINT during the freeze, and
//! two migrations in a row into one target. After each, `migrate-recover` where the journals call for
//! it; then exactly one copy runs, its memory intact (the dirtier's
//! pattern check), and nothing is left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migrun_tests::{
    check_memory, counter_at, migrate_out, migrate_out_with, pair_key, path, unique_id, wait_until,
    Bundle, Migrun, Target, COUNTER,
};

/// `--peer-timeout` of both sides in these tests, in seconds.
const PEER_TIMEOUT: u64 = 2;
/// MiB the dirtier holds (and rewrites at 2 MiB/s).
const MIB: &str = "16";

fn peer_timeout_arg() -> String {
    PEER_TIMEOUT.to_string()
}

/// A running dirtier on a fresh source root, its memory checked once.
fn running_dirtier(name: &str) -> (Migrun, String, Bundle) {
    let src = Migrun::new();
    let id = unique_id(name);
    let b = Bundle::new(&["/dirtier", MIB, "2"]);
    b.install_program("dirtier");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert_eq!(
        check_memory(&b.rootfs(), "", Duration::from_secs(30)),
        format!("ok {MIB}")
    );
    (src, id, b)
}

/// The journal of `role` for `id` under `root`, if any.
fn journal(root: &Path, role: &str, id: &str) -> Option<serde_json::Value> {
    fs::read(root.join(".migrations").join(format!("{role}-{id}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The step `role`'s journal of `id` stands at ("" without one).
fn step_of(root: &Path, role: &str, id: &str) -> String {
    journal(root, role, id)
        .and_then(|j| j["step"].as_str().map(String::from))
        .unwrap_or_default()
}

/// Runs `migrate-recover` on both sides as a pair (the target listening,
/// the source asking); returns both outputs.
fn recover_both(src: &Migrun, target: &Target, id: &str, key: &Path) -> (String, String) {
    let addr = format!("127.0.0.1:{}", migrun_tests::port());
    let to = peer_timeout_arg();
    let listen = target
        .m
        .command()
        .args(["migrate-recover", id, "--listen", &addr, "--key"])
        .arg(key)
        .args(["--peer-timeout", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("migrate-recover --listen");
    let mut src_out = String::new();
    for _ in 0..50 {
        let out = src.run(&[
            "migrate-recover",
            id,
            "--peer",
            &addr,
            "--key",
            path(key),
            "--peer-timeout",
            &to,
        ]);
        src_out = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !src_out.contains("connect") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tgt = finish_within(listen, Duration::from_secs(15));
    (src_out, tgt)
}

/// Waits for `child` up to `limit` (killing it after), returns its output.
fn finish_within(mut child: Child, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child
        .wait_with_output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

/// The rules a migration may leave in the network namespace of `pid`:
/// CRIU's lock and migrun's hold on new connections.
fn leftover_rules(pid: i64) -> Vec<String> {
    let mut found = Vec::new();
    let run = |args: &[&str]| {
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n"])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let nft = run(&["nft", "list", "tables"]);
    let ipt = run(&["iptables-save"]);
    for (what, text) in [("nft", nft), ("iptables", ipt)] {
        for l in text.lines() {
            if l.contains("CRIU") || l.contains("MIGRUN-QUIESCE") {
                found.push(format!("{what}: {l}"));
            }
        }
    }
    found
}

/// CRIU processes still working for container `id` (their working
/// directory is the migration's image directory, named after it).
fn criu_left_for(id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != "criu" {
            continue;
        }
        let cwd = fs::read_link(e.path().join("cwd")).unwrap_or_default();
        if cwd.to_string_lossy().contains(id) {
            out.push(format!("criu {:?} in {}", e.file_name(), cwd.display()));
        }
    }
    out
}

/// What a case ended in, for the printed matrix.
struct Outcome {
    running_on: &'static str,
    memory: String,
    problems: Vec<String>,
}

/// Checks the rule after a migration of `id` that was cut somewhere:
/// exactly one copy runs, not frozen, its memory intact, nothing left.
/// The v1 freezer state of the cgroup of process `pid` ("" if none).
fn freezer_state(pid: i64) -> String {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    cgroups
        .lines()
        .find_map(|l| l.split_once(":freezer:").map(|(_, path)| path.to_string()))
        .and_then(|path| {
            fs::read_to_string(format!("/sys/fs/cgroup/freezer{path}/freezer.state")).ok()
        })
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn settle_and_check(
    src: &Migrun,
    target: &mut Target,
    id: &str,
    b: &Bundle,
    key: &Path,
) -> Outcome {
    let _ = target.finish();
    let mut problems = Vec::new();
    // In doubt or cut off after the freeze, the source's copy stays frozen
    // (its CRIU dump gone or not) until the hand-over is settled.
    let source_step = journal(src.root(), "source", id)
        .and_then(|j| j["step"].as_str().map(String::from))
        .unwrap_or_default();
    if ["frozen", "dumped", "sent", "committed"].contains(&source_step.as_str()) {
        let freezer = src.state(id)["pid"]
            .as_i64()
            .map(freezer_state)
            .unwrap_or_default();
        if freezer != "FROZEN" {
            problems.push(format!(
                "the source's copy, {source_step} and not settled, is {freezer:?}, not frozen"
            ));
        }
    }
    if journal(src.root(), "source", id).is_some()
        || journal(target.m.root(), "target", id).is_some()
    {
        let (s, t) = recover_both(src, target, id, key);
        if journal(src.root(), "source", id).is_some()
            || journal(target.m.root(), "target", id).is_some()
        {
            problems.push(format!("not settled: source said {s:?}, target said {t:?}"));
        }
    }
    let on_source = src.root().join(id).join("state.json").exists();
    let on_target = target.m.root().join(id).join("state.json").exists();
    let status = |m: &Migrun| m.status(id);
    let (running_on, m, rootfs): (&'static str, &Migrun, Option<PathBuf>) =
        match (on_source, on_target) {
            (true, false) => ("source", src, Some(b.rootfs())),
            (false, true) => (
                "target",
                &target.m,
                target.m.state(id)["rootfs"].as_str().map(PathBuf::from),
            ),
            (true, true) => {
                problems.push("two copies".into());
                ("both", src, None)
            }
            (false, false) => {
                problems.push("no copy".into());
                ("none", src, None)
            }
        };
    let mut memory = String::new();
    if let Some(rootfs) = rootfs {
        let st = status(m);
        if st != "running" {
            problems.push(format!("the {running_on}'s copy is {st}"));
        }
        memory = check_memory(&rootfs, "", Duration::from_secs(30));
        if memory != format!("ok {MIB}") {
            problems.push(format!("memory: {memory:?}"));
        }
        if let Some(pid) = m.state(id)["pid"].as_i64() {
            problems.extend(leftover_rules(pid));
        }
    }
    // Nothing left: journals, work and bundle dirs (the winner's bundle is its own).
    let mut left: Vec<String> = target
        .leftovers()
        .into_iter()
        .filter(|l| !(running_on == "target" && l == &format!(".bundles/{id}")))
        .collect();
    if let Ok(d) = fs::read_dir(src.root().join(".migrations")) {
        left.extend(
            d.flatten()
                .map(|e| format!("source journal {:?}", e.file_name())),
        );
    }
    left.extend(criu_left_for(id));
    if !left.is_empty() {
        problems.push(format!("left behind: {left:?}"));
    }
    // Clean up the copy that runs.
    if on_source {
        let _ = src.run(&["delete", "-f", id]);
    }
    if on_target {
        let _ = target.m.run(&["delete", "-f", id]);
    }
    Outcome {
        running_on,
        memory,
        problems,
    }
}

/// One migration of a fresh dirtier with `--inject-fault fault` on `side`.
fn fault_case(side: &str, fault: &str) -> (Outcome, String, f64) {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let (src, id, b) = running_dirtier("hand");
    let to = peer_timeout_arg();
    let mut in_args = vec!["--peer-timeout", &to];
    let mut out_args = vec!["--peer-timeout", &to];
    if side == "target" {
        in_args.extend(["--inject-fault", fault]);
    } else {
        out_args.extend(["--inject-fault", fault]);
    }
    let mut target = Target::start_full(Migrun::new(), &key, &[], &in_args, None);
    let t = Instant::now();
    let (ok, err, _) = migrate_out_with(
        &src,
        &id,
        &target,
        &key,
        &out_args,
        &[],
        Duration::from_secs(90),
    );
    let took = t.elapsed().as_secs_f64();
    let outcome = settle_and_check(&src, &mut target, &id, &b, &key);
    let how = if ok {
        "migrate-out ok".to_string()
    } else {
        err.lines()
            .rev()
            .find(|l| l.contains("migrun"))
            .unwrap_or("failed")
            .to_string()
    };
    (outcome, how, took)
}

#[test]
fn fault_matrix_every_step_of_both_sides_leaves_exactly_one_copy() {
    let source_steps = ["precopy", "frozen", "dumped", "sent", "committed"];
    let target_steps = ["receiving", "acknowledged", "continued", "running"];
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for action in ["crash", "drop"] {
        for (side, steps) in [("source", &source_steps[..]), ("target", &target_steps[..])] {
            for step in steps {
                let fault = format!("{action}@{step}");
                let (o, how, took) = fault_case(side, &fault);
                let row = format!(
                    "{side:<7} {fault:<20} runs on {:<7} memory {:<8} {:>5.1} s  {}{}",
                    o.running_on,
                    o.memory,
                    took,
                    if o.problems.is_empty() { "ok" } else { "FAIL " },
                    o.problems.join("; ")
                );
                if !o.problems.is_empty() {
                    failures.push(format!("{row}\n    ({how})"));
                }
                rows.push(row);
            }
        }
    }
    println!("fault matrix (crash = kill -9 of that side's process, drop = connection reset):");
    for r in &rows {
        println!("  {r}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Drops every packet of the connection to `port` on loopback (both
/// directions) until dropped.
struct Partition {
    port: String,
}

impl Partition {
    fn new(port: &str) -> Self {
        for dir in ["--dport", "--sport"] {
            let ok = Command::new("iptables")
                .args([
                    "-w", "-I", "INPUT", "-i", "lo", "-p", "tcp", dir, port, "-j", "DROP",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "iptables");
        }
        Self {
            port: port.to_string(),
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for dir in ["--dport", "--sport"] {
            let _ = Command::new("iptables")
                .args([
                    "-w", "-D", "INPUT", "-i", "lo", "-p", "tcp", dir, &self.port, "-j", "DROP",
                ])
                .status();
        }
    }
}

/// The file whose removal lets a side held by `--inject-fault hold@STEP`
/// go on (`hold_file` of crates/migrate/src/fault.rs): `$TMPDIR/migrun-hold-PID`,
/// PID the held process (its journal's `pid`).
fn hold_file(pid: u64) -> PathBuf {
    std::env::temp_dir().join(format!("migrun-hold-{pid}"))
}

/// The silent partitions: the side whose journal step cuts the network,
/// the step, and whether that side holds there (`--inject-fault
/// hold@STEP`) until the partition is in place. Every step of both sides
/// held: the cut falls right after the step is journaled, before the
/// message that follows it leaves (steps that pass in milliseconds can
/// only be caught so). The source's longer steps also unheld: the cut
/// falls somewhere in the step, messages on their way.
const PARTITIONS: [(&str, &str, bool); 14] = [
    ("source", "precopy", false),
    ("source", "precopy", true),
    ("source", "frozen", false),
    ("source", "frozen", true),
    ("source", "dumped", true),
    ("source", "sent", false),
    ("source", "sent", true),
    ("source", "committed", false),
    ("source", "committed", true),
    ("source", "released", true),
    ("target", "receiving", true),
    ("target", "acknowledged", true),
    ("target", "continued", true),
    ("target", "running", true),
];

/// Seconds after the partition by which each side must have given up (or
/// finished): the peer time-out, a few of its rounds, and slack.
const GIVES_UP_WITHIN: f64 = 3.0 * PEER_TIMEOUT as f64 + 6.0;

/// Waits up to `limit` for `child` to exit; when it did, if it did.
fn exited_within(child: &mut Child, limit: Duration) -> Option<Instant> {
    wait_until(limit, || matches!(child.try_wait(), Ok(Some(_)))).then(Instant::now)
}

#[test]
fn silent_partition_at_each_step_is_settled_and_during_the_freeze_rolls_back_in_time() {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (role, step, held) in PARTITIONS {
        let dir = tempfile::tempdir().expect("tmp");
        let key = pair_key(dir.path());
        let (src, id, b) = running_dirtier("part");
        let to = peer_timeout_arg();
        let hold = format!("hold@{step}");
        let mut in_args = vec!["--peer-timeout", &to];
        // Slow enough that each step lasts a while: 40 Mbit/s, and
        // stop-and-copy but for the pre-copy case. (A held side waits.)
        let mut out_args = vec!["--peer-timeout", &to];
        match (step, held) {
            ("precopy", false) => out_args.extend(["--bandwidth", "40"]),
            ("precopy", true) => {}
            (_, false) => out_args.extend(["--no-precopy", "--bandwidth", "40"]),
            (_, true) => out_args.push("--no-precopy"),
        }
        if held {
            let args = if role == "source" {
                &mut out_args
            } else {
                &mut in_args
            };
            args.extend(["--inject-fault", &hold]);
        }
        let mut target = Target::start_full(Migrun::new(), &key, &[], &in_args, None);
        let port = target
            .addr
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let watch_root = if role == "source" {
            src.root().to_path_buf()
        } else {
            target.m.root().to_path_buf()
        };
        let watch_id = id.clone();
        let step_s = step.to_string();
        let role_s = role.to_string();
        let watcher = std::thread::spawn(move || {
            let mut holder = None;
            let hit = wait_until(Duration::from_secs(60), || {
                let Some(j) = journal(&watch_root, &role_s, &watch_id) else {
                    return false;
                };
                holder = j["pid"].as_u64().filter(|_| held);
                j["step"].as_str() == Some(step_s.as_str())
                    && (!held || holder.is_some_and(|pid| hold_file(pid).exists()))
            });
            hit.then(|| {
                let partition = Partition::new(&port);
                let at = Instant::now();
                // Let the held side go on, into the dead network.
                if let Some(pid) = holder {
                    let _ = fs::remove_file(hold_file(pid));
                }
                (partition, at)
            })
        });
        let (ok, err, _) = migrate_out_with(
            &src,
            &id,
            &target,
            &key,
            &out_args,
            &[],
            Duration::from_secs(90),
        );
        let out_ended = Instant::now();
        let in_ended = exited_within(&mut target.child, Duration::from_secs(30));
        let partition = watcher.join().expect("watcher");
        let Some((partition, at)) = partition else {
            failures.push(format!(
                "{role} never reached {step}: {err}\n{}",
                target.log()
            ));
            continue;
        };
        let secs = |t: Instant| t.saturating_duration_since(at).as_secs_f64();
        let out_after = secs(out_ended);
        drop(partition);
        let o = settle_and_check(&src, &mut target, &id, &b, &key);
        let mut problems = o.problems;
        if out_after > GIVES_UP_WITHIN {
            problems.push(format!(
                "migrate-out hung: ended {out_after:.1} s after the partition"
            ));
        }
        let in_after = match in_ended {
            Some(t) if secs(t) <= GIVES_UP_WITHIN => format!("{:>4.1} s", secs(t)),
            Some(t) => {
                problems.push(format!(
                    "migrate-in hung: ended {:.1} s after the partition",
                    secs(t)
                ));
                format!("{:>4.1} s", secs(t))
            }
            None => {
                problems.push("migrate-in hung: still running 30 s after migrate-out ended".into());
                "never".into()
            }
        };
        if step == "frozen" {
            // Rolled back within the peer time-out and 5 s.
            if ok || out_after > PEER_TIMEOUT as f64 + 5.0 || o.running_on != "source" {
                problems.push(format!(
                    "partition during the freeze: migrate-out {} after {out_after:.1} s, runs on {}",
                    if ok { "succeeded" } else { "failed" },
                    o.running_on
                ));
            }
        }
        let at_step = format!("{step}{}", if held { " (held)" } else { "" });
        let row = format!(
            "partition at {role} {at_step:<19} migrate-out {:<6} after {out_after:>4.1} s, migrate-in after {in_after}, runs on {:<7} memory {:<8} {}{}",
            if ok { "ok" } else { "failed" },
            o.running_on,
            o.memory,
            if problems.is_empty() { "ok" } else { "FAIL " },
            problems.join("; ")
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{row}\n    (migrate-out: {err})\n    (migrate-in: {})",
                target.log()
            ));
        }
        rows.push(row);
    }
    println!("silent partitions (every packet dropped, peer time-out {PEER_TIMEOUT} s):");
    for r in &rows {
        println!("  {r}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sigint_during_the_freeze_rolls_back_and_the_source_runs_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let (src, id, b) = running_dirtier("sigint");
    let to = peer_timeout_arg();
    let mut target = Target::start_full(Migrun::new(), &key, &[], &["--peer-timeout", &to], None);
    let work = tempfile::tempdir().expect("tmp");
    let mut out = src
        .command()
        .args([
            "migrate-out",
            &id,
            "--to",
            &target.addr,
            "--key",
            path(&key),
        ])
        .args([
            "--no-precopy",
            "--bandwidth",
            "40",
            "--work-dir",
            path(work.path()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("migrate-out");
    // (Journaled before the freeze: the pause follows a moment later.)
    let frozen = || step_of(src.root(), "source", &id) == "frozen" && src.status(&id) == "paused";
    assert!(wait_until(Duration::from_secs(30), frozen), "never frozen");
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(out.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = loop {
        if let Ok(Some(st)) = out.try_wait() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "migrate-out still runs after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = out.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(!status.success(), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    let o = settle_and_check(&src, &mut target, &id, &b, &key);
    assert_eq!(o.running_on, "source");
    assert!(o.problems.is_empty(), "{:?}\n{err}", o.problems);
    let left: Vec<_> = fs::read_dir(work.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "migrate-out's work dir: {left:?}");
    println!(
        "SIGINT during the freeze: rolled back in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
}

#[test]
fn two_migrations_in_a_row_into_one_work_dir_both_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let src = Migrun::new();
    let mut target = Target::start(&key);
    let mut ids = Vec::new();
    let mut bundles = Vec::new();
    for n in 0..2 {
        let id = unique_id(&format!("row{n}"));
        let b = Bundle::new(&["sh", "-c", COUNTER]);
        src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
        assert!(wait_until(Duration::from_secs(5), || counter_at(
            &b.rootfs()
        ) >= 5));
        if n > 0 {
            target.again(&key, &[]);
        }
        let (ok, err, _) = migrate_out(&src, &id, &target, &key, &[]);
        assert!(ok, "migration {n}: {err}\n{}", target.log());
        assert!(target.finish(), "{}", target.log());
        ids.push(id);
        bundles.push(b);
    }
    // A third migrate-in on the same root and work dir: its start-up
    // cleanup must leave both alone too.
    target.again(&key, &[]);
    for id in &ids {
        assert_eq!(target.m.status(id), "running", "{id}\n{}", target.log());
        let rootfs = PathBuf::from(target.m.state(id)["rootfs"].as_str().expect("rootfs"));
        let at = counter_at(&rootfs);
        assert!(
            wait_until(Duration::from_secs(5), || counter_at(&rootfs) > at + 2),
            "{id} does not count on"
        );
        // Its bundle lives in the state root, not in the work dir.
        let bundle = target.m.state(id)["bundle"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            bundle.starts_with(path(target.m.root())),
            "bundle {bundle} outside the state root"
        );
    }
    // Removing the work dir touches neither.
    fs::remove_dir_all(target.work.path()).expect("rm work dir");
    for id in &ids {
        assert_eq!(target.m.status(id), "running");
        target.m.ok(&["delete", "-f", id]);
        assert!(
            !target.m.root().join(".bundles").join(id).exists(),
            "delete left the migrated bundle of {id}"
        );
    }
}
