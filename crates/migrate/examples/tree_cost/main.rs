//! The time cost of confined file access in the live-migration file sync:
//! the path-based code from before commit 192c4cc ([`old_rootfs`], a
//! labelled copy of it, used by nothing but this benchmark) against the
//! current [`migrun_migrate::tree`] / [`migrun_migrate::rootfs`], on the
//! same tree, in the same run, alternating old and new.
//!
//! ```text
//! cargo run --release -p migrun-migrate --example tree_cost -- \
//!     --tree DIR --work DIR [--runs 20] [--warmup 2] [--keep-copies] [--json FILE]
//! ```
//!
//! `--tree` is read only. `--work` must be an empty or new directory on
//! the file system the target side is to be timed on; the copies are made
//! there, and removed after each run, or with `--keep-copies` only at the
//! end (each run then writes into never used inodes: on ext4 without a
//! journal, inodes freed less than a minute ago make the allocation of new
//! ones slow, which would time our own clean-up rather than the code).
//! Run as root (owners are set, device nodes made).
//!
//! Phases, each timed on its own, per run and side:
//! - `snapshot`: the source walks the tree (old: `read_dir` +
//!   `symlink_metadata` by path; new: `rootfs::snapshot(&Tree)`, openat2 +
//!   `fstatat` per directory entry);
//! - `read`: the source reads every regular file of round 0 (old:
//!   `File::open(root.join(rel))` and `read` until end of file, as the old
//!   `Source::stream_file`; new: `Tree::open_regular` + `data_extents` +
//!   `read_at`, as `Source::send_tree`), 4 MiB pieces into one buffer;
//! - `read.shipped`: the same with each side's buffer as its source had it:
//!   old `Source::stream_file` allocated a zeroed 4 MiB buffer per file,
//!   new `Source::send_tree` one per round;
//! - `write`: the target writes every file into an empty directory, the
//!   data already in memory, in the pieces each source sends (old:
//!   `write_chunk` per piece + `finish_file`; new: `Tree::create` once,
//!   `Tree::begin_file` + `touch` + `write_all_at`, as `inbound::Trees`);
//! - `apply`: the target applies round 0's manifest (old: `apply_manifest`;
//!   new: `check_manifest` + `Applied::apply`);
//! - `round.source`: a later round with nothing changed, the source's part
//!   (snapshot + `changed_files`, and `drop_orphan_links` for new);
//! - `round.target`: the same round's manifest applied on the target.
//!
//! And two sums: `round` (`round.source` + `round.target`) and `total`
//! (every phase but `read.shipped`).
//!
//! Not timed: serialising the manifest (the same serde code on both
//! sides; its cost is printed apart), the wire, removing the copy (unless
//! `--keep-copies`) and a `sync` after each run of a side (so that no
//! writeback of one run lands in the next).
//! After the first warm-up run each copy is checked against the tree.

mod old_rootfs;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use migrun_migrate::rootfs::{self, Applied, Kind, Snapshot};
use migrun_migrate::tree::{self, Tree};

/// The pieces file data crosses the wire in (`FILE_CHUNK` of
/// crates/migrate/src/source.rs, the same before and after 192c4cc).
const FILE_CHUNK: usize = 4 << 20;

/// What to run, from the command line.
struct Args {
    tree: PathBuf,
    work: PathBuf,
    runs: usize,
    warmup: usize,
    json: Option<PathBuf>,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: tree_cost --tree DIR --work DIR [--runs N] [--warmup N] [--keep-copies] [--json FILE]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = std::env::args().skip(1);
    let (mut tree, mut work, mut runs, mut warmup, mut json) = (None, None, 20, 2, None);
    let mut keep = false;
    while let Some(k) = a.next() {
        let mut v = || a.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--tree" => tree = Some(PathBuf::from(v())),
            "--work" => work = Some(PathBuf::from(v())),
            "--runs" => runs = v().parse().unwrap_or_else(|_| usage()),
            "--warmup" => warmup = v().parse().unwrap_or_else(|_| usage()),
            "--json" => json = Some(PathBuf::from(v())),
            "--keep-copies" => keep = true,
            _ => usage(),
        }
    }
    match (tree, work) {
        (Some(tree), Some(work)) if runs >= 1 => Args {
            tree,
            work,
            runs,
            warmup,
            json,
            keep,
        },
        _ => usage(),
    }
}

/// The two implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Before 192c4cc: paths through the host's resolution.
    Old,
    /// Now: confined access through a `Tree`.
    New,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Old => "old",
            Side::New => "new",
        }
    }
}

/// The phases timed, in the order they run.
const PHASES: [&str; 7] = [
    "snapshot",
    "read",
    "read.shipped",
    "write",
    "apply",
    "round.source",
    "round.target",
];

/// One regular file as the target receives it: its path, size and the
/// pieces (offset, length) of its data the source sends.
struct Incoming {
    rel: String,
    size: u64,
    pieces: Vec<(u64, usize)>,
    data: Vec<u8>,
}

/// What each side's source would send in round 0, read once before the
/// timed runs (so that `write` times the target alone).
struct Prepared {
    old_snap: old_rootfs::Snapshot,
    old_files: Vec<Incoming>,
    new_snap: Snapshot,
    new_files: Vec<Incoming>,
}

/// Old: the pieces `Source::stream_file` sent before 192c4cc: `read`
/// until end of file, every piece, and one empty piece for an empty file.
fn old_pieces(data: &[u8]) -> Vec<(u64, usize)> {
    if data.is_empty() {
        return vec![(0, 0)];
    }
    (0..data.len())
        .step_by(FILE_CHUNK)
        .map(|o| (o as u64, FILE_CHUNK.min(data.len() - o)))
        .collect()
}

fn prepare(root: &Path, src: &Tree) -> Prepared {
    let old_snap = old_rootfs::snapshot(root).expect("old snapshot of the tree");
    let old_files = old_rootfs::changed_files(&old_rootfs::Snapshot::new(), &old_snap)
        .into_iter()
        .map(|rel| {
            let data = fs::read(root.join(rel)).expect("reading a file of the tree");
            Incoming {
                rel: rel.to_string(),
                size: data.len() as u64,
                pieces: old_pieces(&data),
                data,
            }
        })
        .collect();
    let new_snap = rootfs::snapshot(src).expect("new snapshot of the tree");
    let new_files = rootfs::changed_files(&Snapshot::new(), &new_snap)
        .into_iter()
        .map(|rel| {
            let (f, st) = src
                .open_regular(rel)
                .expect("open_regular")
                .expect("a regular file of the tree");
            let size = st.st_size as u64;
            let mut data = vec![0u8; size as usize];
            let mut pieces = Vec::new();
            for (off, len) in tree::data_extents(&f, size).expect("data extents") {
                let end = off + len;
                let mut pos = off;
                while pos < end {
                    let n = FILE_CHUNK.min((end - pos) as usize);
                    f.read_exact_at(&mut data[pos as usize..pos as usize + n], pos)
                        .expect("reading a file of the tree");
                    pieces.push((pos, n));
                    pos += n as u64;
                }
            }
            Incoming {
                rel: rel.to_string(),
                size,
                pieces,
                data,
            }
        })
        .collect();
    Prepared {
        old_snap,
        old_files,
        new_snap,
        new_files,
    }
}

/// Times `f`, in seconds.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

/// Old, source side, round 0: every file opened by path and read until
/// end of file (the loop of the old `Source::stream_file`, less the
/// sending), into `buf`, or with `per_file` into a zeroed 4 MiB buffer
/// allocated for each file as `stream_file` did. Returns the bytes read.
fn old_read(root: &Path, snap: &old_rootfs::Snapshot, buf: &mut [u8], per_file: bool) -> u64 {
    let mut bytes = 0;
    for rel in old_rootfs::changed_files(&old_rootfs::Snapshot::new(), snap) {
        let path = root.join(rel);
        let Ok(mut file) = File::open(&path) else {
            continue;
        };
        let mut own;
        let buf: &mut [u8] = if per_file {
            own = vec![0u8; FILE_CHUNK];
            &mut own
        } else {
            buf
        };
        let mut offset = 0u64;
        loop {
            let n = file.read(buf).expect("old read");
            std::hint::black_box(&buf[..n]);
            offset += n as u64;
            if n == 0 {
                break;
            }
        }
        bytes += offset;
    }
    bytes
}

/// New, source side, round 0: `Tree::open_regular`, the data extents and
/// `read_at` in pieces, as `Source::send_tree` (less the sending and the
/// snapshot bookkeeping). Returns the bytes read.
fn new_read(src: &Tree, snap: &Snapshot, buf: &mut [u8]) -> u64 {
    let mut bytes = 0;
    for rel in rootfs::changed_files(&Snapshot::new(), snap) {
        let Some((file, st)) = src.open_regular(rel).expect("open_regular") else {
            continue;
        };
        let size = st.st_size.max(0) as u64;
        for (offset, len) in tree::data_extents(&file, size).expect("data extents") {
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let want = FILE_CHUNK.min((end - pos) as usize);
                let n = file.read_at(&mut buf[..want], pos).expect("new read");
                if n == 0 {
                    break;
                }
                std::hint::black_box(&buf[..n]);
                pos += n as u64;
                bytes += n as u64;
            }
        }
    }
    bytes
}

/// The tree a run works on: its path, the same opened as a `Tree`, and
/// what its sources send.
struct On<'a> {
    root: &'a Path,
    src: &'a Tree,
    prep: &'a Prepared,
}

/// One run of one side: every phase, timed; `check` compares the copy
/// with the tree afterwards; the copy is removed unless `keep`.
fn run_side(side: Side, on: &On, dst: &Path, buf: &mut [u8], check: bool, keep: bool) -> [f64; 7] {
    let (root, src, prep) = (on.root, on.src, on.prep);
    fs::create_dir(dst).expect("creating the empty target directory");
    let mut t = [0.0; 7];
    match side {
        Side::Old => {
            let (snap, s) = timed(|| old_rootfs::snapshot(root).expect("old snapshot"));
            t[0] = s;
            assert_eq!(snap, prep.old_snap, "the tree changed during the benchmark");
            t[1] = timed(|| old_read(root, &snap, buf, false)).1;
            t[2] = timed(|| old_read(root, &snap, buf, true)).1;
            t[3] = timed(|| {
                for f in &prep.old_files {
                    for &(off, len) in &f.pieces {
                        let data = &f.data[off as usize..off as usize + len];
                        old_rootfs::write_chunk(dst, &f.rel, off, data).expect("old write_chunk");
                    }
                    old_rootfs::finish_file(dst, &f.rel, f.size).expect("old finish_file");
                }
            })
            .1;
            t[4] = timed(|| old_rootfs::apply_manifest(dst, &snap).expect("old apply_manifest")).1;
            let (changed, s) = timed(|| {
                let now = old_rootfs::snapshot(root).expect("old snapshot");
                let n = old_rootfs::changed_files(&snap, &now).len();
                (now, n)
            });
            t[5] = s;
            assert_eq!(changed.1, 0, "the tree changed during the benchmark");
            t[6] = timed(|| old_rootfs::apply_manifest(dst, &changed.0).expect("old apply")).1;
        }
        Side::New => {
            let (snap, s) = timed(|| rootfs::snapshot(src).expect("new snapshot"));
            t[0] = s;
            assert_eq!(snap, prep.new_snap, "the tree changed during the benchmark");
            t[1] = timed(|| new_read(src, &snap, buf)).1;
            t[2] = timed(|| new_read(src, &snap, &mut vec![0u8; FILE_CHUNK])).1;
            let ((target, mut applied), s) = timed(|| {
                let target = Tree::create(dst).expect("Tree::create");
                let mut applied = Applied::default();
                for f in &prep.new_files {
                    let out = target.begin_file(&f.rel, f.size).expect("begin_file");
                    applied.touch(&f.rel);
                    for &(off, len) in &f.pieces {
                        out.write_all_at(&f.data[off as usize..off as usize + len], off)
                            .expect("new write");
                    }
                }
                (target, applied)
            });
            t[3] = s;
            // The target owns the manifest it decoded: a copy, not timed.
            let manifest = snap.clone();
            t[4] = timed(|| {
                rootfs::check_manifest(&manifest).expect("check_manifest");
                applied.apply(&target, manifest).expect("Applied::apply");
            })
            .1;
            let (mut now, s) = timed(|| {
                let mut now = rootfs::snapshot(src).expect("new snapshot");
                let n = rootfs::changed_files(&snap, &now).len();
                rootfs::drop_orphan_links(&mut now);
                assert_eq!(n, 0, "the tree changed during the benchmark");
                now
            });
            t[5] = s;
            now = std::hint::black_box(now);
            t[6] = timed(|| {
                rootfs::check_manifest(&now).expect("check_manifest");
                applied.apply(&target, now).expect("Applied::apply");
            })
            .1;
        }
    }
    if check {
        check_copy(side, root, dst);
    }
    if !keep {
        fs::remove_dir_all(dst).expect("removing the copy");
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    t
}

/// Compares the copy at `dst` with the tree at `root` (kind, mode, owner,
/// size but a directory's, mtime and file contents per path) and fails loudly if they
/// differ. Device nodes, FIFOs and sockets are compared only when `side`
/// copies them (the old code left them out).
fn check_copy(side: Side, root: &Path, dst: &Path) {
    let a = old_rootfs::snapshot(root).expect("snapshot of the tree");
    let b = old_rootfs::snapshot(dst).expect("snapshot of the copy");
    // A directory's size is its file system's business, not the copy's.
    let key = |e: &old_rootfs::Entry| {
        let size = if e.kind == old_rootfs::Kind::Dir {
            0
        } else {
            e.size
        };
        (e.kind.clone(), e.mode, e.uid, e.gid, size, e.mtime)
    };
    assert_eq!(
        a.len(),
        b.len(),
        "{}: entries differ in number",
        side.name()
    );
    for (rel, e) in &a {
        let c = b
            .get(rel)
            .unwrap_or_else(|| panic!("{}: {rel} missing in the copy", side.name()));
        assert_eq!(key(e), key(c), "{}: {rel} differs", side.name());
        if e.kind == old_rootfs::Kind::File {
            let x = fs::read(root.join(rel)).expect("read");
            let y = fs::read(dst.join(rel)).expect("read");
            assert!(x == y, "{}: {rel} has other contents", side.name());
        }
    }
    if side == Side::New {
        let specials = |p: &Path| {
            walk_specials(p)
                .into_iter()
                .collect::<BTreeMap<String, (u32, u64)>>()
        };
        assert_eq!(
            specials(root),
            specials(dst),
            "new: device nodes, FIFOs or sockets differ"
        );
    }
}

/// Device nodes, FIFOs and sockets under `root`: relative path, mode, rdev.
fn walk_specials(root: &Path) -> Vec<(String, (u32, u64))> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let m = fs::symlink_metadata(e.path()).expect("lstat");
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(e.path());
            } else if !ft.is_file() && !ft.is_symlink() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .expect("under the root")
                    .display()
                    .to_string();
                out.push((rel, (m.mode(), m.rdev())));
            }
        }
    }
    out
}

/// Median, quartiles, extremes of `xs` (seconds), in milliseconds.
#[derive(serde::Serialize)]
struct Stats {
    median_ms: f64,
    p25_ms: f64,
    p75_ms: f64,
    min_ms: f64,
    max_ms: f64,
    samples_ms: Vec<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn stats(xs: &[f64]) -> Stats {
    let ms: Vec<f64> = xs.iter().map(|x| x * 1e3).collect();
    let mut s = ms.clone();
    s.sort_by(f64::total_cmp);
    Stats {
        median_ms: quantile(&s, 0.5),
        p25_ms: quantile(&s, 0.25),
        p75_ms: quantile(&s, 0.75),
        min_ms: s[0],
        max_ms: s[s.len() - 1],
        samples_ms: ms,
    }
}

/// Counts of a snapshot's entries by kind, and its file bytes.
fn describe_old(s: &old_rootfs::Snapshot) -> serde_json::Value {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for e in s.values() {
        let k = match e.kind {
            old_rootfs::Kind::Dir => "dir",
            old_rootfs::Kind::File => "file",
            old_rootfs::Kind::Symlink(_) => "symlink",
            old_rootfs::Kind::Whiteout => "whiteout",
        };
        *kinds.entry(k).or_default() += 1;
    }
    serde_json::json!({ "entries": s.len(), "kinds": kinds })
}

fn describe_new(s: &Snapshot) -> serde_json::Value {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for e in s.values() {
        let k = match e.kind {
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink(_) => "symlink",
            Kind::Whiteout => "whiteout",
            Kind::HardLink(_) => "hardlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDev(_) => "chardev",
            Kind::BlockDev(_) => "blockdev",
        };
        *kinds.entry(k).or_default() += 1;
    }
    serde_json::json!({ "entries": s.len(), "kinds": kinds })
}

fn main() {
    let args = parse_args();
    let root = fs::canonicalize(&args.tree).expect("the --tree directory");
    let src = Tree::open(&root).expect("opening --tree");
    fs::create_dir_all(&args.work).expect("creating --work");
    assert!(
        fs::read_dir(&args.work)
            .expect("listing --work")
            .next()
            .is_none(),
        "--work {} is not empty",
        args.work.display()
    );
    let prep = prepare(&root, &src);
    let bytes = |fs: &[Incoming]| fs.iter().map(|f| f.data.len() as u64).sum::<u64>();
    eprintln!(
        "tree_cost: {}: old sees {} entries ({} files, {} bytes), new {} entries ({} files, {} bytes); {} runs after {} warm-up",
        root.display(),
        prep.old_snap.len(),
        prep.old_files.len(),
        bytes(&prep.old_files),
        prep.new_snap.len(),
        prep.new_files.len(),
        bytes(&prep.new_files),
        args.runs,
        args.warmup
    );

    // Manifest encode + decode (not timed in the phases: the same serde
    // code both sides), for scale.
    let (json_old, json_new) = {
        let mut o = Vec::new();
        let mut n = Vec::new();
        for _ in 0..5 {
            o.push(
                timed(|| {
                    let v = serde_json::to_vec(&prep.old_snap).expect("json");
                    let _: old_rootfs::Snapshot = serde_json::from_slice(&v).expect("json");
                })
                .1,
            );
            n.push(
                timed(|| {
                    let v = serde_json::to_vec(&prep.new_snap).expect("json");
                    let _: Snapshot = serde_json::from_slice(&v).expect("json");
                })
                .1,
            );
        }
        (stats(&o), stats(&n))
    };

    let mut buf = vec![0u8; FILE_CHUNK];
    let on = On {
        root: &root,
        src: &src,
        prep: &prep,
    };
    let mut samples: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for i in 0..args.warmup + args.runs {
        // Alternate which side goes first, so that drift hits both alike.
        let order = if i % 2 == 0 {
            [Side::Old, Side::New]
        } else {
            [Side::New, Side::Old]
        };
        for side in order {
            let dst = args.work.join(format!("copy-{}-{i}", side.name()));
            let t = run_side(side, &on, &dst, &mut buf, i == 0, args.keep);
            if i >= args.warmup {
                for (p, x) in PHASES.iter().zip(t) {
                    samples.entry((side.name(), p)).or_default().push(x);
                }
                let total = t.iter().sum::<f64>() - t[2];
                samples
                    .entry((side.name(), "total"))
                    .or_default()
                    .push(total);
                samples
                    .entry((side.name(), "round"))
                    .or_default()
                    .push(t[5] + t[6]);
            }
        }
        if i == 0 {
            eprintln!("tree_cost: both copies checked against the tree");
        }
    }

    if args.keep {
        for e in fs::read_dir(&args.work).expect("listing --work").flatten() {
            fs::remove_dir_all(e.path()).expect("removing a copy");
        }
    }

    let phases: Vec<&str> = PHASES.iter().copied().chain(["round", "total"]).collect();
    let mut rows = Vec::new();
    println!("| phase | old median ms (p25-p75) | new median ms (p25-p75) | new/old (medians) | new/old per run, median (min-max) |");
    println!("|---|---|---|---|---|");
    for p in &phases {
        let o = &samples[&("old", *p)];
        let n = &samples[&("new", *p)];
        let (so, sn) = (stats(o), stats(n));
        // Per-run ratios pair the two sides of one run (measured back to back).
        let paired: Vec<f64> = o.iter().zip(n).map(|(a, b)| b / a).collect();
        let mut ps = paired.clone();
        ps.sort_by(f64::total_cmp);
        let ratio = sn.median_ms / so.median_ms;
        println!(
            "| {p} | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) | {:.2} | {:.2} ({:.2}-{:.2}) |",
            so.median_ms,
            so.p25_ms,
            so.p75_ms,
            sn.median_ms,
            sn.p25_ms,
            sn.p75_ms,
            ratio,
            quantile(&ps, 0.5),
            ps[0],
            ps[ps.len() - 1]
        );
        rows.push(serde_json::json!({
            "phase": p,
            "old": so,
            "new": sn,
            "ratio_new_over_old": ratio,
            "ratio_per_run": { "median": quantile(&ps, 0.5), "min": ps[0], "max": ps[ps.len() - 1], "samples": paired },
        }));
    }
    println!(
        "\nmanifest JSON encode + decode (not in the phases), median of 5: old {:.2} ms, new {:.2} ms",
        json_old.median_ms, json_new.median_ms
    );

    if let Some(path) = &args.json {
        let out = serde_json::json!({
            "tree": root.display().to_string(),
            "work": args.work.display().to_string(),
            "runs": args.runs,
            "warmup": args.warmup,
            "keep_copies": args.keep,
            "file_chunk": FILE_CHUNK,
            "old": {
                "snapshot": describe_old(&prep.old_snap),
                "files_read": prep.old_files.len(),
                "bytes_read": bytes(&prep.old_files),
            },
            "new": {
                "snapshot": describe_new(&prep.new_snap),
                "files_read": prep.new_files.len(),
                "bytes_read": bytes(&prep.new_files),
            },
            "manifest_json_ms": { "old": json_old, "new": json_new },
            "phases": rows,
        });
        let text = serde_json::to_string_pretty(&out).expect("json");
        fs::write(path, text + "\n").expect("writing --json");
    }
}
