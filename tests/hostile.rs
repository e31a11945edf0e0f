//! Hostile containers and hostile peers against live migration (issue 14):
//! a container that races the root filesystem sync with symlinks, sparse
//! and special files, huge trees, and a peer with the valid key that
//! breaks the protocol. Real containers, real migrations over loopback.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migrun_tests::{
    cgroups_named, contains_bytes, counter_at, is_error_line, migrate_out_with, pair_key, path,
    processes_mentioning, target_rootfs, unique_id, wait_until, Bundle, Migrun, Target, Tmpfs,
    COUNTER,
};
use migrun_wire::{Bytes, MemoryTotals, Message, PageRun, MAX_FRAME, PAGE_SIZE, TAG_LEN};
use serde_json::Value;

/// Options that make a migration last several pre-copy rounds: a slow
/// link, a downtime no round can meet, and a cap on the rounds.
const MANY_ROUNDS: &[&str] = &[
    "--bandwidth",
    "400",
    "--max-downtime",
    "1",
    "--max-rounds",
    "5",
];

/// The longest a migration of these tests may take before it counts as hung.
const MIGRATION_BOUND: Duration = Duration::from_secs(300);

/// 16 random bytes from the kernel, as hex: tokens no test input contains by chance.
fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Migrates container `id` from `from` to `target` (just started) with
/// `extra` options and `env` for migrate-out; asserts that both sides
/// succeed and that the container runs and goes on counting (`/count`) on
/// the target. Returns the target and the figures.
fn hop(
    mut target: Target,
    from: &Migrun,
    id: &str,
    key: &Path,
    extra: &[&str],
    env: &[(&str, &OsStr)],
) -> (Target, Value) {
    let (ok, err, stats) = migrate_out_with(from, id, &target, key, extra, env, MIGRATION_BOUND);
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "migrate-in failed: {}", target.log());
    assert_eq!(target.m.status(id), "running");
    let rootfs = target_rootfs(&target, id);
    let at = counter_at(&rootfs);
    assert!(
        wait_until(Duration::from_secs(10), || counter_at(&rootfs) > at + 2),
        "the container does not run on the target (counter stays at {at})"
    );
    (target, stats.expect("stats json"))
}

/// Migrates container `id` `hops` times, from `src` to a fresh target root
/// each time (A -> B -> C ...), each migration lasting several rounds
/// ([`MANY_ROUNDS`]), with `env` for migrate-out; `check(n, target)` after
/// the `n`th.
fn hop_around(
    src: &Migrun,
    id: &str,
    key: &Path,
    hops: usize,
    env: &[(&str, &OsStr)],
    mut check: impl FnMut(usize, &Target),
) {
    let mut holder: Option<Target> = None;
    for n in 1..=hops {
        eprintln!("migration {n} of {hops}");
        let from = holder.as_ref().map(|t| &t.m).unwrap_or(src);
        let (target, stats) = hop(Target::start(key), from, id, key, MANY_ROUNDS, env);
        let rounds = stats["rounds"].as_array().map(Vec::len).unwrap_or(0);
        assert!(
            rounds >= 3,
            "migration {n}: only {rounds} rounds, the test wants several: {stats}"
        );
        check(n, &target);
        holder = Some(target);
    }
}

/// A fresh directory of the host's, outside every container's tree.
fn host_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("migrun-hostile-{what}-"))
        .tempdir()
        .expect("tmp")
}

/// Runs the container of bundle `b` as `id` on `m`, detached, and waits
/// until it has counted to 3.
fn run_counting(m: &Migrun, b: &Bundle, id: &str) {
    m.ok_quiet(&["run", "-d", "-b", path(b.path()), id]);
    assert!(
        wait_until(Duration::from_secs(10), || counter_at(&b.rootfs()) >= 3),
        "the container did not start counting"
    );
}

/// The names in a directory with each file's content.
type DirState = BTreeMap<String, Vec<u8>>;

/// The names in `dir` and each file's content, to see what changed there.
fn dir_contents(dir: &Path) -> DirState {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let content = fs::read(e.path()).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), content)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Watches a host directory from a thread, every 2 ms, and remembers every
/// state of it that differs from the first: what a container escape
/// creates, changes or removes there, even if it goes again.
struct DirWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<DirState>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    initial: DirState,
}

impl DirWatch {
    fn new(dir: &Path) -> Self {
        let initial = dir_contents(dir);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (dir, stop, seen, initial) = (
                dir.to_path_buf(),
                stop.clone(),
                seen.clone(),
                initial.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = dir_contents(&dir);
                    if now != initial {
                        let mut seen = seen.lock().expect("lock");
                        if seen.last() != Some(&now) {
                            seen.push(now);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            stop,
            seen,
            thread: Some(thread),
            initial,
        }
    }

    /// The states seen that differ from the first (empty: untouched).
    fn changes(&self) -> Vec<DirState> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Shows directory states as names with the first bytes of each file.
fn show(states: &[DirState]) -> String {
    states
        .iter()
        .map(|s| {
            let files: Vec<String> = s
                .iter()
                .map(|(n, c)| format!("{n}={:?}", String::from_utf8_lossy(&c[..c.len().min(40)])))
                .collect();
            format!("{{{}}}", files.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" then ")
}

#[test]
fn symlink_swapping_container_changes_nothing_outside_its_tree() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // A directory of the host's, outside every container tree, with one file.
    let host = host_dir("hostdir");
    fs::write(host.path().join("canary"), "host data\n").expect("canary");
    let watch = DirWatch::new(host.path());
    // /swap flips between a directory holding a file and a symlink to the
    // host directory (an absolute host path: dangling inside the container).
    let script = format!(
        "i=0; while true; do i=$((i+1)); echo $i > /count; \
         rm -rf /swap; mkdir /swap; echo from-the-container > /swap/planted; sleep 0.02; \
         rm -rf /swap; ln -s {} /swap; sleep 0.02; done",
        host.path().display()
    );
    let b = Bundle::new(&["sh", "-c", &script]);
    let src = Migrun::new();
    let id = unique_id("hostile-swap");
    run_counting(&src, &b, &id);
    // On the landed code about 1 in 4 migrations escaped here, as in issue
    // 14, and a few failed instead: migrate-out's snapshot stumbled on a
    // directory the container had just removed.
    let hops = 20;
    hop_around(&src, &id, &key, hops, &[], |n, _| {
        let changes = watch.changes();
        assert!(
            changes.is_empty() && dir_contents(host.path()) == watch.initial,
            "migration {n} of {hops} changed the host directory {} outside the container: {}",
            host.path().display(),
            show(&changes)
        );
    });
}

/// Regular files under `dir` (symlinks not followed) whose content holds `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() && fs::read(e.path()).is_ok_and(|c| contains_bytes(&c, needle)) {
                found.push(e.path());
            }
        }
    }
    found
}

#[test]
fn host_file_swapped_in_by_the_container_is_never_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // A host file outside the container holding a token.
    let host = host_dir("secret");
    let token = format!("host-secret-{}", random_hex());
    let secret = host.path().join("secret");
    fs::write(&secret, &token).expect("secret");
    // What the capture must hold: a file of the container's that crosses as
    // file data only (the host writes it; no process of the container reads it).
    let marker = format!("container-marker-{}", random_hex());
    let capture = dir.path().join("capture");
    // /zz-leak (after everything else in the sync's sorted order, so a
    // round sends the whole tree between its snapshot and opening it)
    // flips between a file of its own and a symlink to the host file,
    // each put in place by rename.
    let script = format!(
        "i=0; while true; do i=$((i+1)); echo $i > /count; \
         echo own-$i > /zz-file.tmp; mv -f /zz-file.tmp /zz-leak; sleep 0.01; \
         ln -s {} /zz-link.tmp; mv -f /zz-link.tmp /zz-leak; sleep 0.01; done",
        secret.display()
    );
    let b = Bundle::new(&["sh", "-c", &script]);
    fs::write(b.rootfs().join("marker"), &marker).expect("marker");
    let src = Migrun::new();
    let id = unique_id("hostile-read");
    run_counting(&src, &b, &id);
    let env = [("MIGRUN_WIRE_CAPTURE", capture.as_os_str())];
    // On the landed code about 1 in 4 migrations read the host file here.
    let hops = 12;
    hop_around(&src, &id, &key, hops, &env, |n, target| {
        let rootfs = target_rootfs(target, &id);
        let mut leaks = files_containing(target.work.path(), token.as_bytes());
        if !rootfs.starts_with(target.work.path()) {
            leaks.extend(files_containing(&rootfs, token.as_bytes()));
        }
        assert!(
            leaks.is_empty(),
            "migration {n} of {hops}: the host file's token is in the migrated container: {leaks:?}"
        );
        assert_eq!(
            fs::read_to_string(&secret).ok().as_deref(),
            Some(token.as_str()),
            "migration {n} of {hops} changed the host file"
        );
        let sent = fs::read(&capture).unwrap_or_default();
        assert!(
            !contains_bytes(&sent, token.as_bytes()),
            "migration {n} of {hops}: the host file's token went over the wire ({} bytes captured)",
            sent.len()
        );
    });
    // The capture is real: it holds what the source sent, the marker file
    // too, and only root may read it.
    let mode = fs::metadata(&capture).expect("no capture written").mode();
    assert_eq!(mode & 0o777, 0o600, "capture file mode {mode:o}");
    let sent = fs::read(&capture).expect("read capture");
    assert!(
        contains_bytes(&sent, marker.as_bytes()),
        "the capture ({} bytes) lacks the marker file's content: it does not show what was sent",
        sent.len()
    );
}

/// Size of the sparse file: 20 GiB.
const SPARSE_SIZE: u64 = 20 << 30;

/// Where the sparse file holds data: 4 KiB at each offset (8 KiB in all).
const SPARSE_DATA: [u64; 2] = [5 << 30, 15 << 30];

/// Bytes allocated on disk to the files under `dir` (symlinks not followed).
fn allocated_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            }
            total += m.blocks() * 512;
        }
    }
    total
}

#[test]
fn sparse_file_crosses_as_its_data() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // The baseline: the same container without the sparse file. (Roots
    // are declared after bundles: dropped first, they delete their
    // containers before the bundles go.)
    let base = Bundle::new(&["sh", "-c", COUNTER]);
    let base_src = Migrun::new();
    let base_id = unique_id("hostile-sparse-base");
    run_counting(&base_src, &base, &base_id);
    let (base_target, base_stats) = hop(Target::start(&key), &base_src, &base_id, &key, &[], &[]);
    drop(base_target);
    let base_bytes = base_stats["bytes_rootfs"].as_u64().expect("bytes_rootfs");

    let b = Bundle::new(&["sh", "-c", COUNTER]);
    let sparse = b.rootfs().join("sparse");
    let f = fs::File::create(&sparse).expect("sparse");
    f.set_len(SPARSE_SIZE).expect("set_len");
    let block = |off: u64| -> Vec<u8> { (0..4096u64).map(|i| ((off >> 20) + i) as u8).collect() };
    for off in SPARSE_DATA {
        f.write_all_at(&block(off), off).expect("write data");
    }
    f.sync_all().expect("sync");
    drop(f);
    let blocks = fs::metadata(&sparse).expect("stat").blocks();
    assert!(blocks <= 64, "the file is not sparse here: {blocks} blocks");
    let src = Migrun::new();
    let id = unique_id("hostile-sparse");
    run_counting(&src, &b, &id);
    let mut target = Target::start(&key);
    // A copy that fills the holes in would write 20 GiB on this disk: the
    // guard stops the target once its work directory (a busybox tree and
    // the sparse file's 8 KiB) takes 256 MiB.
    let stop = Arc::new(AtomicBool::new(false));
    let guard = {
        let (work, stop) = (target.work.path().to_path_buf(), stop.clone());
        let pid = nix::unistd::Pid::from_raw(target.child.id() as i32);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let used = allocated_under(&work);
                if used > 256 << 20 {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    return Some(used);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        })
    };
    let (ok, err, stats) = migrate_out_with(&src, &id, &target, &key, &[], &[], MIGRATION_BOUND);
    stop.store(true, Ordering::Relaxed);
    let filled = guard.join().expect("guard");
    assert!(
        filled.is_none(),
        "the target's work directory took {} MiB on disk (the sparse file holds 8 KiB): stopped",
        filled.unwrap_or(0) >> 20
    );
    assert!(ok, "migrate-out failed: {err}\ntarget: {}", target.log());
    assert!(target.finish(), "migrate-in failed: {}", target.log());
    let stats = stats.expect("stats json");
    let bytes = stats["bytes_rootfs"].as_u64().expect("bytes_rootfs");
    assert!(
        bytes.saturating_sub(base_bytes) < 1 << 20,
        "the sparse file crossed as {} file bytes ({bytes} against {base_bytes} without it)",
        bytes.saturating_sub(base_bytes)
    );
    let copy = target_rootfs(&target, &id).join("sparse");
    let meta = fs::symlink_metadata(&copy).expect("the sparse file is missing on the target");
    assert!(meta.is_file());
    assert_eq!(meta.len(), SPARSE_SIZE, "size on the target");
    assert_eq!(meta.blocks(), blocks, "st_blocks on the target");
    let g = fs::File::open(&copy).expect("open copy");
    for off in SPARSE_DATA {
        let mut got = vec![0u8; 4096];
        g.read_exact_at(&mut got, off).expect("read copy");
        assert!(got == block(off), "data at offset {off} differs");
    }
}

/// The type of a file as a word.
fn kind(t: fs::FileType) -> &'static str {
    if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "directory"
    } else {
        "file"
    }
}

#[test]
fn fifo_socket_and_device_node_cross_as_themselves() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // The default bundle has no CAP_MKNOD (runc's default set); this
    // container gets it, to make its own device node.
    let script = format!(
        "mkfifo /special/fifo && mknod /special/null c 1 3 && echo made > /special/ready && {COUNTER}"
    );
    let b = Bundle::with(&["sh", "-c", &script], |spec| {
        for set in ["bounding", "effective", "permitted"] {
            if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
                caps.push(Value::from("CAP_MKNOD"));
            }
        }
    });
    fs::create_dir(b.rootfs().join("special")).expect("mkdir");
    // busybox makes no socket files: this one comes from the host, bound
    // and closed (no process listens on it).
    drop(std::os::unix::net::UnixListener::bind(b.rootfs().join("special/sock")).expect("bind"));
    let src = Migrun::new();
    let id = unique_id("hostile-special");
    src.ok_quiet(&["run", "-d", "-b", path(b.path()), &id]);
    assert!(
        wait_until(Duration::from_secs(10), || b
            .read("special/ready")
            .is_some()
            && counter_at(&b.rootfs()) >= 3),
        "the container did not make its special files"
    );
    let names = ["fifo", "sock", "null"];
    let at_source: Vec<(&str, u64)> = names
        .iter()
        .map(|n| {
            let m = fs::symlink_metadata(b.rootfs().join("special").join(n)).expect("stat");
            (kind(m.file_type()), m.rdev())
        })
        .collect();
    assert_eq!(
        at_source.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        ["fifo", "socket", "char device"]
    );
    // Nothing ever opens the FIFO's other end: a sync that opens it would
    // block, so the migration is bounded.
    let mut target = Target::start(&key);
    let t = Instant::now();
    let (ok, err, _) =
        migrate_out_with(&src, &id, &target, &key, &[], &[], Duration::from_secs(120));
    assert!(
        ok,
        "migrate-out failed after {:?}: {err}\ntarget: {}",
        t.elapsed(),
        target.log()
    );
    assert!(target.finish(), "migrate-in failed: {}", target.log());
    assert_eq!(target.m.status(&id), "running");
    let rootfs = target_rootfs(&target, &id);
    let mut wrong = Vec::new();
    for (n, (want_kind, want_rdev)) in names.iter().zip(&at_source) {
        match fs::symlink_metadata(rootfs.join("special").join(n)) {
            Err(e) => wrong.push(format!("/special/{n} ({want_kind}) is missing: {e}")),
            Ok(m) if kind(m.file_type()) != *want_kind => wrong.push(format!(
                "/special/{n} is a {}, not a {want_kind}",
                kind(m.file_type())
            )),
            Ok(m) if *want_kind == "char device" && m.rdev() != *want_rdev => wrong.push(format!(
                "/special/{n} is device {:#x}, not {want_rdev:#x}",
                m.rdev()
            )),
            Ok(_) => {}
        }
    }
    assert!(wrong.is_empty(), "on the target: {}", wrong.join("; "));
}

/// One tree entry as the comparison sees it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    size: u64,
    /// A hash of the content (regular files) or of the link's target.
    hash: u64,
}

/// Every entry under `root` by relative path, symlinks not followed, as
/// far as `keep` keeps it (a directory not kept is not entered).
fn listing(root: &Path, keep: impl Fn(&str) -> bool) -> BTreeMap<String, Seen> {
    let hash = |bytes: &[u8]| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    };
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let entries = fs::read_dir(root.join(&rel))
            .unwrap_or_else(|e| panic!("read {}: {e}", root.join(&rel).display()));
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if !keep(&rel) {
                continue;
            }
            let m = fs::symlink_metadata(e.path()).expect("stat");
            let t = m.file_type();
            let content = if t.is_file() {
                fs::read(e.path()).expect("read")
            } else if t.is_symlink() {
                fs::read_link(e.path())
                    .expect("readlink")
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            if t.is_dir() {
                stack.push(rel.clone());
            }
            out.insert(
                rel,
                Seen {
                    kind: kind(t),
                    mode: m.mode() & 0o7777,
                    // A directory's size is the file system's business.
                    size: if t.is_dir() { 0 } else { m.len() },
                    hash: hash(&content),
                },
            );
        }
    }
    out
}

/// Files of the big tree: 100 directories of 1,000.
const MANY_DIRS: usize = 100;
const MANY_PER_DIR: usize = 1000;

/// Depth of the deep path.
const DEPTH: usize = 200;

#[test]
fn hundred_thousand_files_and_a_path_200_deep_arrive_intact() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    // Both trees on a tmpfs: on this machine's disk, making and removing
    // 100,000 files takes minutes of the test's time and nothing of the
    // migration's.
    let tmpfs = Tmpfs::new("4g");
    let b = Bundle::new_in(tmpfs.path(), &["sh", "-c", COUNTER]);
    let many = b.rootfs().join("many");
    for d in 0..MANY_DIRS {
        let sub = many.join(format!("d{d:03}"));
        fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..MANY_PER_DIR {
            let n = d * MANY_PER_DIR + f;
            fs::write(sub.join(format!("f{n:06}")), format!("file {n}\n")).expect("write");
        }
    }
    // 200 components of 10 characters: a path of about 2,200 bytes.
    let mut deep = b.rootfs().join("deep");
    for level in 0..DEPTH {
        deep.push(format!("level-{level:04}"));
    }
    fs::create_dir_all(&deep).expect("mkdir deep");
    fs::write(deep.join("leaf"), "at the bottom\n").expect("leaf");
    let made = started.elapsed();
    let src = Migrun::new();
    let id = unique_id("hostile-big");
    run_counting(&src, &b, &id);
    let t = Instant::now();
    let work = tempfile::tempdir_in(tmpfs.path()).expect("tmp");
    let (target, stats) = hop(
        Target::start_with(&key, &[], Some(work)),
        &src,
        &id,
        &key,
        &[],
        &[],
    );
    let migrated = t.elapsed();
    eprintln!(
        "big tree: made in {made:?}, migrated in {migrated:?} (total {} ms, downtime {} ms, {} rootfs bytes)",
        stats["total_ms"], stats["downtime_ms"], stats["bytes_rootfs"]
    );
    let t = Instant::now();
    // Not compared: the counter the container keeps writing, and what is
    // below the mounts of the container's own /dev, /proc and /sys (on the
    // target, the restore leaves its mount points there: dev/pts, sys/fs...).
    let keep =
        |rel: &str| rel != "count" && !["dev/", "proc/", "sys/"].iter().any(|m| rel.starts_with(m));
    let want = listing(&b.rootfs(), keep);
    let got = listing(&target_rootfs(&target, &id), keep);
    assert!(want.len() > MANY_DIRS * MANY_PER_DIR + DEPTH);
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<(&String, &Seen, &Seen)> = want
        .iter()
        .filter_map(|(k, w)| got.get(k).filter(|g| *g != w).map(|g| (k, w, g)))
        .collect();
    eprintln!(
        "big tree: {} entries compared in {:?}",
        want.len(),
        t.elapsed()
    );
    let cut = |v: String| v.chars().take(2000).collect::<String>();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "the trees differ: {} missing on the target (e.g. {}), {} extra (e.g. {}), {} differ (e.g. {})",
        missing.len(),
        cut(format!("{:?}", missing.iter().take(3).collect::<Vec<_>>())),
        extra.len(),
        cut(format!("{:?}", extra.iter().take(8).collect::<Vec<_>>())),
        differ.len(),
        cut(format!("{:?}", differ.iter().take(3).collect::<Vec<_>>())),
    );
}

/// What a test peer sends.
enum Send {
    /// A message, as migrate-out would send it.
    Msg(Message),
    /// A sealed frame of any plaintext, with a length header that may lie.
    Raw(Vec<u8>, Option<u32>),
}

/// What the target did after the test peer's last frame.
#[derive(Debug)]
enum Reaction {
    /// It sent an error message.
    Error(String),
    /// It sent something else.
    Other(String),
    /// It closed the connection.
    Closed(String),
    /// It said nothing for the whole wait (still waiting for more).
    Waited(Duration),
    /// The peer closed at once, not waiting.
    NotAsked,
}

impl std::fmt::Display for Reaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reaction::Error(m) => write!(f, "an error message: {m:?}"),
            Reaction::Other(m) => write!(f, "another message: {m}"),
            Reaction::Closed(e) => write!(f, "the connection closed: {e}"),
            Reaction::Waited(d) => write!(f, "nothing for {d:?}: the target waited for more"),
            Reaction::NotAsked => f.write_str("nothing (the peer closed at once)"),
        }
    }
}

/// How long a test peer waits for the target to refuse.
const PEER_WAIT: Duration = Duration::from_secs(10);

/// Connects to `addr` with the valid key and sends `sends`; then closes
/// at once if `close_at_once`, else waits (up to [`PEER_WAIT`]) for the
/// target's reaction before closing. Send errors after the target closed
/// are part of the reaction, not failures.
fn bad_peer(addr: &str, key: &Path, sends: Vec<Send>, close_at_once: bool) -> Reaction {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let key = migrun_wire::load_key(key).expect("load key");
        let ch = migrun_wire::connect(addr, &key)
            .await
            .expect("the test peer could not connect and authenticate");
        let (mut tx, mut rx) = ch.split();
        for s in sends {
            let sent = match s {
                Send::Msg(m) => tx.send(&m).await,
                Send::Raw(plain, claimed) => tx.send_raw_for_tests(&plain, claimed).await,
            };
            if let Err(e) = sent {
                return Reaction::Closed(format!("while the peer was sending: {e}"));
            }
        }
        if close_at_once {
            let _ = tx.shutdown().await;
            return Reaction::NotAsked;
        }
        match tokio::time::timeout(PEER_WAIT, rx.recv()).await {
            Ok(Ok(Message::Error { message })) => Reaction::Error(message),
            Ok(Ok(other)) => Reaction::Other(format!("{other:?}")),
            Ok(Err(e)) => Reaction::Closed(e.to_string()),
            Err(_) => Reaction::Waited(PEER_WAIT),
        }
    })
}

/// A valid `Start` for container `id` (a busybox bundle's config).
fn start(id: &str) -> Message {
    let b = Bundle::new(&["true"]);
    let config = fs::read_to_string(b.path().join("config.json")).expect("config");
    Message::Start {
        container_id: id.to_string(),
        spec_json: serde_json::json!({ "config": config }).to_string(),
        memory: MemoryTotals::default(),
    }
}

fn hello() -> Message {
    Message::Hello {
        agent: "migrun-hostile-test".into(),
    }
}

/// One page of process 1 at 4 MiB.
fn pages() -> Message {
    Message::Pages(PageRun {
        pid: 1,
        addr: 0x40_0000,
        zero_pages: Vec::new(),
        data: Bytes::from(vec![0xab; PAGE_SIZE]),
    })
}

/// Runs a test peer against a fresh `migrate-in --once` and checks that
/// migrate-in refused: exit status non-zero, one error line (returned),
/// nothing left of containers `ids`: no state, cgroup, process or file.
fn refused(sends: Vec<Send>, close_at_once: bool, ids: &[&str]) -> (String, Reaction) {
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let mut target = Target::start(&key);
    let pid = target.child.id();
    let reaction = bad_peer(&target.addr, &key, sends, close_at_once);
    let finished = target.finish();
    let log = target.log();
    assert!(!finished, "migrate-in succeeded: {log}");
    // One error line, the last; what comes before it is progress.
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| is_error_line(l)).collect();
    assert!(
        errors.len() == 1 && lines.last().is_some_and(|l| is_error_line(l)),
        "migrate-in did not end with one error line (the peer saw {reaction}): {log}"
    );
    let error = errors[0].to_string();
    eprintln!("migrate-in: {error} (the peer saw {reaction})");
    // Nothing left.
    assert_eq!(target.m.ok(&["list", "-q"]).trim(), "", "containers left");
    for id in ids {
        assert!(
            !target.m.root().join(id).exists(),
            "state directory of {id} left"
        );
        assert!(
            cgroups_named(id).is_empty(),
            "cgroups left: {:?}",
            cgroups_named(id)
        );
    }
    for p in [target.m.root(), target.work.path()] {
        let left = processes_mentioning(p);
        assert!(
            left.is_empty(),
            "processes left using {}: {left:?}",
            p.display()
        );
    }
    assert!(
        target.leftovers().is_empty(),
        "work directory left {:?}",
        target.leftovers()
    );
    let shm: Vec<String> = fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("migrun-incoming-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(shm.is_empty(), "images left in /dev/shm: {shm:?}");
    (error, reaction)
}

/// Asserts that migrate-in ended the connection on its own (an error
/// message, or closing it) while the test peer stayed connected.
fn assert_refused_while_connected(reaction: &Reaction) {
    assert!(
        matches!(reaction, Reaction::Error(_) | Reaction::Closed(_)),
        "migrate-in did not refuse while the peer stayed connected; the peer saw {reaction}"
    );
}

/// Asserts that migrate-in's error is a protocol error naming `kind`, and
/// that it refused on its own, the peer still connected.
fn assert_protocol_error(error: &str, reaction: &Reaction, kind: &str) {
    assert!(
        error.contains("protocol error") && error.contains(kind),
        "migrate-in's error is not a protocol error about the {kind:?} message: {error:?} \
         (what the peer saw while still connected: {reaction})"
    );
    assert_refused_while_connected(reaction);
}

/// A valid beginning (hello, start of a container `name`), then `bad`;
/// see [`refused`].
fn bad_after_start(name: &str, bad: Send, close_at_once: bool) -> (String, Reaction) {
    let id = unique_id(name);
    refused(
        vec![Send::Msg(hello()), Send::Msg(start(&id)), bad],
        close_at_once,
        &[&id],
    )
}

#[test]
fn bad_peer_pages_before_start_are_refused() {
    let (error, reaction) = refused(vec![Send::Msg(hello()), Send::Msg(pages())], false, &[]);
    assert_protocol_error(&error, &reaction, "pages");
}

#[test]
fn bad_peer_second_start_is_refused() {
    let (one, two) = (unique_id("hostile-start-1"), unique_id("hostile-start-2"));
    let (error, reaction) = refused(
        vec![
            Send::Msg(hello()),
            Send::Msg(start(&one)),
            Send::Msg(start(&two)),
        ],
        false,
        &[&one, &two],
    );
    assert_protocol_error(&error, &reaction, "start");
}

#[test]
fn bad_peer_unknown_message_type_is_refused() {
    // A sealed frame whose type byte no version uses.
    let bad = Send::Raw(vec![200, 1, 2, 3], None);
    let (error, reaction) = bad_after_start("hostile-unknown", bad, false);
    assert_protocol_error(&error, &reaction, "unknown message type 200");
}

/// Sends, after a valid start, a sealed `Pages` message whose length header
/// says `claimed(true length)`; the peer closes at once if `close_at_once`.
/// Asserts that migrate-in's one error line is about the frame, and that it
/// refused on its own unless the peer closed.
fn lying_frame(name: &str, claimed: impl FnOnce(u32) -> u32, close_at_once: bool) {
    let mut plain = Vec::new();
    pages().encode(&mut plain).expect("encode");
    let sealed = (plain.len() + TAG_LEN) as u32;
    let bad = Send::Raw(plain, Some(claimed(sealed)));
    let (error, reaction) = bad_after_start(name, bad, close_at_once);
    assert!(
        error.contains("frame"),
        "migrate-in's error does not mention the frame: {error:?}"
    );
    if !close_at_once {
        assert_refused_while_connected(&reaction);
    }
}

#[test]
fn bad_peer_frame_claiming_more_than_it_sends_is_refused() {
    lying_frame("hostile-long", |len| len + 4096, true);
}

#[test]
fn bad_peer_frame_claiming_less_than_it_sends_is_refused() {
    lying_frame("hostile-short", |len| len / 2, false);
}

#[test]
fn bad_peer_frame_over_the_limit_is_refused() {
    lying_frame("hostile-huge", |_| MAX_FRAME as u32 + 1, false);
}
