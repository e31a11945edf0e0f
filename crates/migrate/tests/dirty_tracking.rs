//! Dirty tracking against real processes.
//!
//! The test binary re-executes itself as the tracked child (environment
//! variable `MIGRUN_DIRTY_CHILD`): the child maps memory and writes pages
//! on command (one command per line on stdin, one reply per line on
//! stdout), so the tests know exactly which pages were written and can
//! check that the child's memory is intact afterwards. The harness is our
//! own (`harness = false`): tests run one at a time, and a filter argument
//! selects tests by substring.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child as Process, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use migrun_migrate::dirty::inject::{inject_syscall, with_frozen, with_injector_timeout};
use migrun_migrate::dirty::uffd_wp::{RemoveEvents, UffdWpTracker};
use migrun_migrate::dirty::{self, Backend, DirtyError, DirtySet, DirtyTracker};

const CHILD_ENV: &str = "MIGRUN_DIRTY_CHILD";

fn page_size() -> u64 {
    dirty::page_size()
}

// ---------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------

mod child {
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    struct Region {
        addr: usize,
        pages: usize,
        /// What the first and the last 8 bytes of each page must hold.
        expected: Vec<(u64, u64)>,
    }

    fn ps() -> usize {
        super::page_size() as usize
    }

    fn map(pages: usize, fixed: Option<usize>) -> usize {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if fixed.is_some() {
            flags |= libc::MAP_FIXED;
        }
        // SAFETY: an anonymous mapping (at a fixed address only where this
        // child mapped before and nothing else lives).
        let p = unsafe {
            libc::mmap(
                fixed.unwrap_or(0) as *mut libc::c_void,
                pages * ps(),
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        p as usize
    }

    fn put(addr: usize, value: u64) {
        // SAFETY: callers pass addresses inside a writable region of this
        // child, 8-byte aligned.
        unsafe { std::ptr::write_volatile(addr as *mut u64, value) }
    }

    fn get(addr: usize) -> u64 {
        // SAFETY: callers pass addresses inside a readable region of this
        // child, 8-byte aligned.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    }

    impl Region {
        fn write(&mut self, gen: u64, idx: usize) {
            let base = self.addr + idx * ps();
            let head = (gen << 32) | idx as u64;
            let tail = !head;
            put(base, head);
            put(base + ps() - 8, tail);
            self.expected[idx] = (head, tail);
        }

        fn verify(&self) -> Result<(), String> {
            for (i, &(head, tail)) in self.expected.iter().enumerate() {
                let base = self.addr + i * ps();
                let (h, t) = (get(base), get(base + ps() - 8));
                if (h, t) != (head, tail) {
                    return Err(format!(
                        "page {i}: {h:#x}/{t:#x}, expected {head:#x}/{tail:#x}"
                    ));
                }
            }
            Ok(())
        }
    }

    static STOP: AtomicBool = AtomicBool::new(false);
    static CHURN_STOP: AtomicBool = AtomicBool::new(false);

    /// Writes random words at random places of `[addr, addr + pages)` until
    /// told to stop.
    fn churn_thread(seed: u64, addr: usize, pages: usize) {
        let mut x = seed | 1;
        let words = ps() / 8;
        while !CHURN_STOP.load(Ordering::Relaxed) {
            // Sparse enough that most pages stay clean in a round, so that
            // a write lost by the tracker is not hidden by a later one.
            std::thread::sleep(std::time::Duration::from_micros(50));
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = (x as usize >> 3) % pages;
                let word = (x as usize >> 29) % words;
                put(addr + page * ps() + word * 8, x);
            }
        }
    }
    static COUNTERS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

    fn busy_thread(i: usize) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        while !STOP.load(Ordering::Relaxed) {
            // clock_gettime runs in the vDSO, where the injector finds its
            // syscall instruction: this thread executes that code while the
            // main thread is borrowed.
            // SAFETY: clock_gettime writes into the valid local `ts`.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            COUNTERS[i].fetch_add(1, Ordering::Relaxed);
            if COUNTERS[i].load(Ordering::Relaxed).is_multiple_of(1024) {
                std::thread::yield_now();
            }
        }
    }

    fn install_seccomp(action: u32) -> Result<(), String> {
        let stmt = |code: u16, k: u32| libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
        let mut filter = [
            stmt(0x20, 4),
            jump(0x15, 0xc000_003e, 1, 0),
            stmt(0x06, 0x8000_0000),
            stmt(0x20, 0),
            jump(0x15, libc::SYS_userfaultfd as u32, 0, 1),
            stmt(0x06, action),
            stmt(0x06, 0x7fff_0000),
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err("prctl".into());
        }
        // SAFETY: `prog` points to a valid filter that outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog) };
        if r != 0 {
            return Err(format!("seccomp: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn indices(s: Option<&str>) -> Vec<usize> {
        s.unwrap_or("")
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().expect("index"))
            .collect()
    }

    pub(super) fn main() {
        let mut regions: Vec<Region> = Vec::new();
        let mut threads = Vec::new();
        let mut churners = Vec::new();
        let stdin = std::io::stdin();
        let mut out = std::io::stdout();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let mut w = line.split_whitespace();
            let cmd = w.next().unwrap_or("");
            let mut num = || -> usize { w.next().and_then(|x| x.parse().ok()).expect("number") };
            let reply = match cmd {
                "map" => {
                    let pages = num();
                    let addr = map(pages, None);
                    let mut r = Region {
                        addr,
                        pages,
                        expected: vec![(0, 0); pages],
                    };
                    for i in 0..pages {
                        r.write(0, i);
                    }
                    regions.push(r);
                    format!("ok {} {addr}", regions.len() - 1)
                }
                "write" | "kwrite" | "replace" => {
                    let id = num();
                    let gen = if cmd == "kwrite" { 0 } else { num() as u64 };
                    let list = indices(w.next());
                    let r = &mut regions[id];
                    if cmd == "replace" {
                        map(r.pages, Some(r.addr));
                        r.expected = vec![(0, 0); r.pages];
                    }
                    for i in list {
                        if cmd == "kwrite" {
                            // The kernel writes the page (copy_to_user).
                            let at = r.addr + i * ps();
                            // SAFETY: getrandom writes 8 bytes into this
                            // child's writable page.
                            let n = unsafe { libc::getrandom(at as *mut libc::c_void, 8, 0) };
                            assert_eq!(n, 8);
                            r.expected[i].0 = get(at);
                        } else {
                            r.write(gen.max(1), i);
                        }
                    }
                    "ok".to_string()
                }
                "dontneed" => {
                    let (id, first, count) = (num(), num(), num());
                    let r = &mut regions[id];
                    // SAFETY: the range is inside the region.
                    let rc = unsafe {
                        libc::madvise(
                            (r.addr + first * ps()) as *mut libc::c_void,
                            count * ps(),
                            libc::MADV_DONTNEED,
                        )
                    };
                    assert_eq!(rc, 0);
                    for e in &mut r.expected[first..first + count] {
                        *e = (0, 0);
                    }
                    "ok".to_string()
                }
                "protect" => {
                    let id = num();
                    let prot = match w.next() {
                        Some("ro") => libc::PROT_READ,
                        _ => libc::PROT_READ | libc::PROT_WRITE,
                    };
                    let r = &regions[id];
                    // SAFETY: the range is exactly the region.
                    let rc = unsafe {
                        libc::mprotect(r.addr as *mut libc::c_void, r.pages * ps(), prot)
                    };
                    assert_eq!(rc, 0);
                    "ok".to_string()
                }
                "verify" => {
                    let mut res = Ok(0);
                    for (id, r) in regions.iter().enumerate() {
                        if let Err(e) = r.verify() {
                            res = Err(format!("region {id} {e}"));
                            break;
                        }
                        res = res.map(|n| n + r.pages);
                    }
                    match res {
                        Ok(n) => format!("ok {n}"),
                        Err(e) => format!("bad {e}"),
                    }
                }
                "sleep" => {
                    let ms = num() as i64;
                    let req = libc::timespec {
                        tv_sec: ms / 1000,
                        tv_nsec: (ms % 1000) * 1_000_000,
                    };
                    let t0 = Instant::now();
                    // SAFETY: nanosleep reads `req`; no remainder wanted.
                    let rc = unsafe { libc::nanosleep(&req, std::ptr::null_mut()) };
                    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    format!(
                        "slept {} {rc} {}",
                        t0.elapsed().as_millis(),
                        if rc == 0 { 0 } else { errno }
                    )
                }
                "threads" => {
                    let n = num().min(COUNTERS.len());
                    for i in 0..n {
                        threads.push(std::thread::spawn(move || busy_thread(i)));
                    }
                    format!("ok {}", COUNTERS.as_ptr() as usize)
                }
                "churn" => {
                    let (id, n) = (num(), num());
                    let (addr, pages) = (regions[id].addr, regions[id].pages);
                    CHURN_STOP.store(false, Ordering::Relaxed);
                    for i in 0..n {
                        churners.push(std::thread::spawn(move || {
                            churn_thread(0x9e37_79b9 * (i as u64 + 1), addr, pages)
                        }));
                    }
                    "ok".to_string()
                }
                "quiesce" => {
                    CHURN_STOP.store(true, Ordering::Relaxed);
                    for t in churners.drain(..) {
                        let _ = t.join();
                    }
                    "ok".to_string()
                }
                "counters" => {
                    let sum: u64 = COUNTERS.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                    format!("ok {sum}")
                }
                "seccomp" => {
                    let action = match w.next() {
                        Some("kill") => 0x8000_0000,
                        _ => 0x0005_0000 | libc::EPERM as u32,
                    };
                    match install_seccomp(action) {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("bad {e}"),
                    }
                }
                "ping" => "pong".to_string(),
                "exit" => {
                    STOP.store(true, Ordering::Relaxed);
                    for t in threads.drain(..) {
                        let _ = t.join();
                    }
                    let _ = writeln!(out, "bye");
                    let _ = out.flush();
                    std::process::exit(0);
                }
                other => format!("bad unknown command {other:?}"),
            };
            let _ = writeln!(out, "{reply}");
            let _ = out.flush();
        }
        std::process::exit(3);
    }
}

// ---------------------------------------------------------------------------
// The parent's handle on a child.
// ---------------------------------------------------------------------------

struct Child {
    proc: Process,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
}

/// A mapping of the child: its id, address and size in pages.
#[derive(Debug, Clone, Copy)]
struct Region {
    id: usize,
    addr: u64,
    pages: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.addr + self.pages * page_size()
    }

    /// The page indices of `set` inside this region.
    fn indices(&self, set: &DirtySet) -> Vec<u64> {
        set.within(self.addr, self.end())
            .pages()
            .map(|a| (a - self.addr) / page_size())
            .collect()
    }
}

fn list(idx: &[u64]) -> String {
    idx.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Child {
    fn spawn() -> Child {
        let exe = std::env::current_exe().expect("current exe");
        let mut proc = Command::new(exe)
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdin = proc.stdin.take().expect("stdin");
        let stdout = BufReader::new(proc.stdout.take().expect("stdout"));
        let pid = proc.id() as i32;
        let mut c = Child {
            proc,
            stdin,
            stdout,
            pid,
        };
        assert_eq!(c.cmd("ping"), "pong");
        c
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to child");
        self.stdin.flush().expect("flush");
    }

    fn reply(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read from child");
        assert!(!s.is_empty(), "child closed its stdout");
        s.trim().to_string()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        let r = self.reply();
        assert!(!r.starts_with("bad"), "child: {line:?} -> {r}");
        r
    }

    fn map(&mut self, pages: u64) -> Region {
        let r = self.cmd(&format!("map {pages}"));
        let mut w = r.split_whitespace().skip(1);
        let id = w.next().and_then(|x| x.parse().ok()).expect("id");
        let addr = w.next().and_then(|x| x.parse().ok()).expect("addr");
        Region { id, addr, pages }
    }

    fn write(&mut self, r: Region, gen: u64, idx: &[u64]) {
        self.cmd(&format!("write {} {gen} {}", r.id, list(idx)));
    }

    fn verify(&mut self) {
        let r = self.cmd("verify");
        assert!(r.starts_with("ok"), "{r}");
    }

    fn exit(mut self) {
        self.send("exit");
        assert_eq!(self.reply(), "bye");
        let status = self.proc.wait().expect("wait child");
        assert!(status.success(), "child exited with {status}");
    }

    fn has_userfaultfd(&self) -> bool {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("fd dir")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|l| l.to_string_lossy().contains("userfaultfd"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn collect(t: &mut dyn DirtyTracker) -> DirtySet {
    t.collect().expect("collect")
}

// ---------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------

/// The whole contract on one backend: exact sets of written pages, kernel
/// writes, new mappings, madvise, mprotect, replaced mappings, stop, and
/// the child intact afterwards.
fn scenario(backend: Backend) {
    scenario_with(backend, |pid| {
        dirty::open(pid, backend).expect("open tracker")
    });
}

fn scenario_with(backend: Backend, open: impl Fn(i32) -> Box<dyn DirtyTracker>) {
    let mut c = Child::spawn();
    let r = c.map(256);
    let mut t = open(c.pid);
    assert_eq!(t.name(), backend.name());
    assert_eq!(t.pid(), c.pid);
    assert!(matches!(t.collect(), Err(DirtyError::NotStarted { .. })));
    t.start().expect("start");
    assert!(matches!(t.start(), Err(DirtyError::AlreadyStarted { .. })));

    assert_eq!(
        r.indices(&collect(&mut *t)),
        Vec::<u64>::new(),
        "nothing written yet"
    );

    let a = [1, 5, 6, 7, 100, 255];
    c.write(r, 1, &a);
    assert_eq!(r.indices(&collect(&mut *t)), a, "set A");

    let b = [0, 2, 5, 200];
    c.write(r, 2, &b);
    assert_eq!(r.indices(&collect(&mut *t)), b, "set B");

    assert_eq!(r.indices(&collect(&mut *t)), Vec::<u64>::new(), "no writes");

    // Written by the kernel on the child's behalf.
    c.cmd(&format!("kwrite {} 9,10", r.id));
    assert_eq!(r.indices(&collect(&mut *t)), [9, 10], "kernel writes");

    // A mapping created after start: all its (populated) pages are new.
    let r2 = c.map(32);
    let d = collect(&mut *t);
    assert_eq!(r.indices(&d), Vec::<u64>::new());
    assert_eq!(r2.indices(&d), (0..32).collect::<Vec<_>>(), "new mapping");
    c.write(r2, 3, &[3, 31]);
    c.write(r, 3, &[4]);
    let d = collect(&mut *t);
    assert_eq!(r2.indices(&d), [3, 31]);
    assert_eq!(r.indices(&d), [4]);

    // Zapped pages are zero now: they must be sent again.
    c.cmd(&format!("dontneed {} 40 8", r.id));
    assert_eq!(
        r.indices(&collect(&mut *t)),
        (40..48).collect::<Vec<_>>(),
        "madvise"
    );
    // Reporting them once more is allowed, anything else is not.
    let again = r.indices(&collect(&mut *t));
    assert!(again.iter().all(|i| (40..48).contains(i)), "{again:?}");

    // Written, then made read-only: still reported.
    c.write(r, 4, &[50, 51]);
    c.cmd(&format!("protect {} ro", r.id));
    assert_eq!(r.indices(&collect(&mut *t)), [50, 51], "mprotect");
    c.cmd(&format!("protect {} rw", r.id));
    assert_eq!(
        r.indices(&collect(&mut *t)),
        Vec::<u64>::new(),
        "mprotect back"
    );

    // Mapped again at the same place: every page changed, except the
    // zapped ones, which were zero before and are zero now (a backend
    // comparing contents may skip those).
    c.cmd(&format!("replace {} 9 1,2", r.id));
    let d = r.indices(&collect(&mut *t));
    let changed: Vec<u64> = (0..256).filter(|i| !(40..48).contains(i)).collect();
    assert!(changed.iter().all(|i| d.contains(i)), "replaced: {d:?}");
    assert!(d.len() <= 256);
    c.write(r, 5, &[77]);
    assert_eq!(
        r.indices(&collect(&mut *t)),
        [77],
        "replaced mapping tracked"
    );

    t.stop().expect("stop");
    c.verify();
    // The child still runs normally and exits cleanly.
    c.write(r, 6, &[8]);
    c.verify();
    c.exit();
}

fn test_uffd_wp_scenario() {
    scenario(Backend::UffdWp);
}

fn test_uffd_wp_scenario_with_remove_events() {
    scenario_with(Backend::UffdWp, |pid| {
        Box::new(UffdWpTracker::open_with(pid, RemoveEvents::On).expect("open tracker"))
    });
}

fn test_hash_scenario() {
    scenario(Backend::Hash);
}

fn test_soft_dirty_scenario() {
    match dirty::soft_dirty::probe() {
        Ok(()) => scenario(Backend::SoftDirty),
        Err(e) => {
            assert!(matches!(e, DirtyError::Unsupported { .. }));
            println!("    (soft-dirty unsupported here, skipped: {e})");
        }
    }
}

/// The target keeps no userfaultfd; after stop nothing of the tracking is
/// left, and tracking can start again.
fn test_uffd_wp_leaves_no_trace() {
    let mut c = Child::spawn();
    let r = c.map(16);
    let mut t = UffdWpTracker::open(c.pid).expect("open");
    assert!(
        !c.has_userfaultfd(),
        "the injected fd must be closed in the target"
    );
    t.start().expect("start");
    assert!(!t.registered_ranges().is_empty());
    c.write(r, 1, &[3]);
    assert_eq!(r.indices(&collect(&mut t)), [3]);
    t.stop().expect("stop");
    assert!(t.registered_ranges().is_empty());
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", c.pid)).expect("smaps");
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "a mapping is still registered for uffd write protection"
    );
    // Again, on the same tracker (injects a new userfaultfd).
    t.start().expect("restart");
    c.write(r, 2, &[5, 6]);
    assert_eq!(r.indices(&collect(&mut t)), [5, 6]);
    drop(t); // dropping tears down too
    assert!(!c.has_userfaultfd());
    c.verify();
    c.exit();
}

/// Injection while the target sleeps in nanosleep: the sleep continues
/// with the remaining time and returns 0 (not EINTR, not restarted from
/// scratch).
fn test_injection_during_nanosleep() {
    let mut c = Child::spawn();
    c.send("sleep 1000");
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let r = inject_syscall(c.pid, libc::SYS_getpid, [0; 6]).expect("inject getpid");
        assert_eq!(r, c.pid as i64);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut t = UffdWpTracker::open(c.pid).expect("open during sleep");
    t.start().expect("start during sleep");
    let reply = c.reply();
    let w: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"slept"), "{reply}");
    let ms: u64 = w[1].parse().expect("ms");
    assert_eq!(w[2], "0", "nanosleep failed: {reply}");
    assert!(
        (1000..1300).contains(&ms),
        "slept {ms} ms instead of 1000: {reply}"
    );
    t.stop().expect("stop");
    c.exit();
}

/// Injection into a thread blocked in read(2), with the result and the
/// arguments passed through; the child keeps working afterwards.
fn test_inject_syscall_results_and_errors() {
    let mut c = Child::spawn();
    let r = c.map(1);
    assert_eq!(
        inject_syscall(c.pid, libc::SYS_getpid, [0; 6]).expect("getpid"),
        c.pid as i64
    );
    assert_eq!(
        inject_syscall(c.pid, libc::SYS_getppid, [0; 6]).expect("getppid"),
        std::process::id() as i64
    );
    // close(-1) fails with EBADF, returned as -errno.
    assert_eq!(
        inject_syscall(c.pid, libc::SYS_close, [u64::MAX, 0, 0, 0, 0, 0]).expect("close"),
        -(libc::EBADF as i64)
    );
    // An argument-carrying call with a visible effect: madvise(DONTNEED).
    let ps = page_size();
    assert_eq!(
        inject_syscall(
            c.pid,
            libc::SYS_madvise,
            [r.addr, ps, libc::MADV_DONTNEED as u64, 0, 0, 0]
        )
        .expect("madvise"),
        0
    );
    c.send("verify");
    let v = c.reply();
    assert!(v.starts_with("bad region 0 page 0: 0x0/0x0,"), "{v}");
    c.write(r, 1, &[0]);
    c.verify();
    assert!(matches!(
        inject_syscall(i32::MAX, libc::SYS_getpid, [0; 6]),
        Err(DirtyError::ProcessGone { .. })
    ));
    c.exit();
}

/// A multi-threaded target whose other threads run the vDSO code the
/// injector borrows its syscall instruction from.
fn test_multithreaded_target() {
    let mut c = Child::spawn();
    let r = c.map(64);
    let counters: u64 = c
        .cmd("threads 3")
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .expect("addr");
    let sum = |c: &mut Child| -> u64 {
        c.cmd("counters")
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .expect("sum")
    };
    let ps = page_size();
    for round in 0..5 {
        let mut t = dirty::open(c.pid, Backend::UffdWp).expect("open");
        t.start().expect("start");
        c.write(r, round + 1, &[round, 63 - round]);
        let d = collect(&mut *t);
        let mut want = vec![round, 63 - round];
        want.sort();
        assert_eq!(r.indices(&d), want);
        // The busy threads' counters live in the binary's data: tracked,
        // and written all the time.
        std::thread::sleep(Duration::from_millis(5));
        let d = collect(&mut *t);
        assert!(
            d.contains(counters),
            "counters page {:#x} not reported",
            counters / ps * ps
        );
        t.stop().expect("stop");
    }
    // Frozen means frozen: the counters do not move.
    let read_counters = |pid: i32| -> u64 {
        let mut buf = [0u8; 64];
        let n = migrun_read(pid, counters, &mut buf);
        assert_eq!(n, 64);
        buf.chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .sum()
    };
    let pid = c.pid;
    let (a, b) = with_frozen(pid, move || {
        let a = read_counters(pid);
        std::thread::sleep(Duration::from_millis(50));
        Ok((a, read_counters(pid)))
    })
    .expect("freeze");
    assert_eq!(a, b, "threads ran while frozen");
    let before = sum(&mut c);
    std::thread::sleep(Duration::from_millis(50));
    assert!(sum(&mut c) > before, "threads did not resume");
    c.verify();
    c.exit();
}

fn migrun_read(pid: i32, addr: u64, buf: &mut [u8]) -> usize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, valid for writes of its length.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    n.max(0) as usize
}

fn proc_state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .expect("state")
}

/// A target stopped by SIGSTOP can be injected into, and is stopped again
/// afterwards; tracking works on it.
fn test_sigstopped_target() {
    let mut c = Child::spawn();
    let r = c.map(8);
    // SAFETY: kill with plain integers.
    assert_eq!(unsafe { libc::kill(c.pid, libc::SIGSTOP) }, 0);
    while proc_state(c.pid) != 'T' {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        inject_syscall(c.pid, libc::SYS_getpid, [0; 6]).expect("inject"),
        c.pid as i64
    );
    let mut t = UffdWpTracker::open(c.pid).expect("open");
    t.start().expect("start");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(proc_state(c.pid), 'T', "no longer stopped");
    // SAFETY: kill with plain integers.
    assert_eq!(unsafe { libc::kill(c.pid, libc::SIGCONT) }, 0);
    c.write(r, 1, &[6]);
    assert_eq!(r.indices(&collect(&mut t)), [6]);
    t.stop().expect("stop");
    c.verify();
    c.exit();
}

/// A target frozen by the cgroup-v1 freezer never reaches a ptrace stop:
/// injection times out, and after thawing the target runs normally (it is
/// not left in a ptrace stop). Skipped without a v1 freezer.
fn test_frozen_cgroup_v1_target() {
    let root = std::path::Path::new("/sys/fs/cgroup/freezer");
    if !root.join("freezer.state").exists() && !root.join("tasks").exists() {
        println!("    (no cgroup-v1 freezer, skipped)");
        return;
    }
    let mut c = Child::spawn();
    let cg = root.join(format!("migrun-dirty-test-{}", c.pid));
    std::fs::create_dir(&cg).expect("create freezer cgroup");
    let cleanup = |cg: &std::path::Path| {
        let _ = std::fs::write(cg.join("freezer.state"), "THAWED");
        let _ = std::fs::write(root.join("tasks"), format!("{}", std::process::id()));
    };
    std::fs::write(cg.join("tasks"), c.pid.to_string()).expect("join cgroup");
    std::fs::write(cg.join("freezer.state"), "FROZEN").expect("freeze");
    while std::fs::read_to_string(cg.join("freezer.state"))
        .expect("state")
        .trim()
        != "FROZEN"
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    let r = with_injector_timeout(c.pid, Duration::from_millis(300), |inj| {
        inj.syscall(libc::SYS_getpid, [0; 6])
    });
    let waited = t0.elapsed();
    std::fs::write(cg.join("freezer.state"), "THAWED").expect("thaw");
    assert!(matches!(r, Err(DirtyError::Timeout { .. })), "{r:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(c.cmd("ping"), "pong");
    std::thread::sleep(Duration::from_millis(20));
    assert_ne!(proc_state(c.pid), 't', "left in a ptrace stop");
    // And it can be injected into again once thawed.
    assert_eq!(
        inject_syscall(c.pid, libc::SYS_getpid, [0; 6]).expect("inject"),
        c.pid as i64
    );
    let pid = c.pid;
    c.exit();
    cleanup(&cg);
    let _ = pid;
    let _ = std::fs::remove_dir(&cg);
}

/// A target whose seccomp filter kills on userfaultfd: the injection is
/// refused before anything runs, the target survives, and open_best falls
/// back to hashing.
fn test_seccomp_refusal() {
    for mode in ["kill", "errno"] {
        let mut c = Child::spawn();
        let r = c.map(8);
        c.cmd(&format!("seccomp {mode}"));
        match UffdWpTracker::open(c.pid) {
            Err(DirtyError::SeccompDenied { nr, .. }) => assert_eq!(nr, libc::SYS_userfaultfd),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("uffd-wp opened despite the seccomp filter"),
        }
        assert_eq!(c.cmd("ping"), "pong");
        let mut t = dirty::open_best(c.pid).expect("open_best");
        assert_eq!(t.name(), "hash");
        t.start().expect("start");
        c.write(r, 1, &[2]);
        assert_eq!(r.indices(&collect(&mut *t)), [2]);
        t.stop().expect("stop");
        c.verify();
        c.exit();
    }
}

/// open_best picks uffd-wp on this kernel (no soft-dirty here).
fn test_open_best_picks_uffd_wp() {
    let mut c = Child::spawn();
    let t = dirty::open_best(c.pid).expect("open_best");
    let expected = if dirty::soft_dirty::probe().is_ok() {
        "soft-dirty"
    } else {
        "uffd-wp"
    };
    assert_eq!(t.name(), expected);
    drop(t);
    assert_eq!(c.cmd("ping"), "pong");
    c.exit();
}

/// madvise(MADV_DONTNEED) over whole page tables: with CONFIG_PT_RECLAIM
/// the kernel frees the tables. Seen by the scan itself on this kernel
/// (unprotected = written) and by the remove events; both ways are tested.
fn test_uffd_wp_dontneed_whole_page_table() {
    for events in [RemoveEvents::Off, RemoveEvents::On, RemoveEvents::Auto] {
        let mut c = Child::spawn();
        let r = c.map(2048);
        let ps = page_size();
        let huge = 2 << 20;
        let first = (r.addr.div_ceil(huge) * huge - r.addr) / ps;
        let mut t = UffdWpTracker::open_with(c.pid, events).expect("open");
        t.start().expect("start");
        assert_eq!(
            t.listens_for_remove_events(),
            events == RemoveEvents::On,
            "{events:?}"
        );
        c.cmd(&format!("dontneed {} {first} 1024", r.id));
        c.cmd(&format!("dontneed {} {} 3", r.id, first + 1100));
        let mut want: Vec<u64> = (first..first + 1024).collect();
        want.extend(first + 1100..first + 1103);
        assert_eq!(r.indices(&collect(&mut t)), want, "{events:?}");
        // Events are reported twice, the scan once.
        let again = r.indices(&collect(&mut t));
        assert!(
            again.iter().all(|i| want.contains(i)),
            "{events:?}: {again:?}"
        );
        assert_eq!(r.indices(&collect(&mut t)), Vec::<u64>::new(), "{events:?}");
        t.stop().expect("stop");
        c.verify();
        c.exit();
    }
}

/// A tracked process that calls execve has a new address space, which a
/// tracker of the old one cannot see: collect says the process (as far as
/// its memory goes) is gone, so that the engine starts over on it, instead
/// of failing or reporting nothing. A shell's children do this all the
/// time (fork, then exec `sleep`).
fn test_execve_after_start_reports_process_gone() {
    let mut backends = vec![Backend::UffdWp, Backend::Hash];
    if dirty::soft_dirty::probe().is_ok() {
        backends.push(Backend::SoftDirty);
    }
    for backend in backends {
        let mut sh = Command::new("/bin/sh")
            .args(["-c", "read x; exec sleep 30"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = sh.id() as i32;
        let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let before = exe(pid);
        let mut t = dirty::open(pid, backend).expect("open tracker");
        t.start().expect("start");
        collect(&mut *t);
        writeln!(sh.stdin.as_mut().expect("stdin"), "go").expect("write");
        let deadline = Instant::now() + Duration::from_secs(10);
        while exe(pid) == before {
            assert!(Instant::now() < deadline, "{backend:?}: sh did not exec");
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = t.collect();
        assert!(
            matches!(got, Err(DirtyError::ProcessGone { pid: p }) if p == pid),
            "{backend:?}: collect after execve gave {got:?}"
        );
        drop(t);
        // The process itself goes on, untouched.
        assert!(sh.try_wait().expect("try_wait").is_none(), "{backend:?}");
        sh.kill().expect("kill");
        sh.wait().expect("wait");
    }
}

/// The A→B→A problem of hashing and how record_sent solves it.
fn test_hash_record_sent() {
    let mut c = Child::spawn();
    let r = c.map(4);
    let mut t = dirty::open(c.pid, Backend::Hash).expect("open");
    t.start().expect("start");
    c.write(r, 1, &[1]);
    assert_eq!(r.indices(&collect(&mut *t)), [1]);
    // The engine copies page 1 while it holds B...
    c.write(r, 2, &[1]);
    let mut page = vec![0u8; page_size() as usize];
    let addr = r.addr + page_size();
    assert_eq!(migrun_read(c.pid, addr, &mut page), page.len());
    t.record_sent(addr, &page);
    // ...then it changes back to A before the next collect.
    c.write(r, 1, &[1]);
    assert_eq!(
        r.indices(&collect(&mut *t)),
        [1],
        "A->B->A must be reported"
    );
    t.stop().expect("stop");
    c.exit();
}

/// A page of a mapping made after the last snapshot, sent while it held
/// data and zapped since (zero again, as it was before it was written):
/// the next collect compares with what was sent, so it is reported,
/// although a never-seen zero page is otherwise no news.
fn test_hash_record_sent_untracked() {
    let mut c = Child::spawn();
    let mut t = dirty::open(c.pid, Backend::Hash).expect("open");
    t.start().expect("start");
    // The child writes every page of a new mapping: all are sent.
    let r = c.map(4);
    c.write(r, 1, &[1, 2]);
    let ps = page_size() as usize;
    let mut pages = vec![0u8; 4 * ps];
    assert_eq!(migrun_read(c.pid, r.addr, &mut pages), pages.len());
    for (i, page) in pages.chunks_exact(ps).enumerate() {
        t.record_sent(r.addr + (i * ps) as u64, page);
    }
    c.cmd(&format!("dontneed {} 1 1", r.id));
    assert_eq!(
        r.indices(&collect(&mut *t)),
        [1],
        "a sent page zeroed since must be reported, an unchanged one not"
    );
    // Compared once: after this collect the mapping is tracked as usual.
    assert_eq!(r.indices(&collect(&mut *t)), Vec::<u64>::new());
    t.stop().expect("stop");
    c.exit();
}

/// Pre-copy as the engine does it, against a child writing from two
/// threads all the time: copy everything, then repeatedly collect and copy
/// the dirty pages; stop the writers, collect and copy once more. The copy
/// must then equal the child's memory exactly: a single lost write fails.
fn precopy(backend: Backend, n_rounds: usize) {
    let mut c = Child::spawn();
    let pages = 16384u64;
    let r = c.map(pages);
    let ps = page_size() as usize;
    let mut t = dirty::open(c.pid, backend).expect("open");
    t.start().expect("start");
    let mut mirror = vec![0u8; pages as usize * ps];
    assert_eq!(migrun_read(c.pid, r.addr, &mut mirror), mirror.len());
    let copy = |t: &mut dyn DirtyTracker, mirror: &mut [u8], d: &DirtySet| -> usize {
        let mut n = 0;
        for addr in d.within(r.addr, r.end()).pages() {
            let off = (addr - r.addr) as usize;
            let page = &mut mirror[off..off + ps];
            assert_eq!(migrun_read(t.pid(), addr, page), ps);
            t.record_sent(addr, page);
            n += 1;
        }
        n
    };
    c.cmd(&format!("churn {} 2", r.id));
    let mut rounds = Vec::new();
    for _ in 0..n_rounds {
        std::thread::sleep(Duration::from_millis(5));
        let d = collect(&mut *t);
        rounds.push(copy(&mut *t, &mut mirror, &d));
    }
    c.cmd("quiesce");
    let d = collect(&mut *t);
    let last = copy(&mut *t, &mut mirror, &d);
    t.stop().expect("stop");
    let mut now = vec![0u8; mirror.len()];
    assert_eq!(migrun_read(c.pid, r.addr, &mut now), now.len());
    let wrong: Vec<usize> = (0..pages as usize)
        .filter(|&i| mirror[i * ps..(i + 1) * ps] != now[i * ps..(i + 1) * ps])
        .collect();
    println!(
        "    {}: pages copied per round {rounds:?}, final round {last}",
        backend.name()
    );
    assert!(
        rounds.iter().all(|&n| n > 0),
        "the writers were not seen: {rounds:?}"
    );
    assert!(
        wrong.is_empty(),
        "{} pages differ from the copy, first {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(8)]
    );
    c.exit();
}

fn test_precopy_uffd_wp() {
    precopy(Backend::UffdWp, 15);
}

fn test_precopy_hash() {
    // Hashing 64 MiB per round is slow in unoptimized test builds.
    precopy(Backend::Hash, 4);
}

/// Timings on a 256 MiB region with 1% of its pages written per round.
fn test_timing_256mib() {
    {
        let mut c = Child::spawn();
        let mut times: Vec<Duration> = (0..20)
            .map(|_| {
                let t = Instant::now();
                inject_syscall(c.pid, libc::SYS_getpid, [0; 6]).expect("inject");
                t.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "    inject_syscall(getpid): median {:.2?}, max {:.2?}",
            times[10], times[19]
        );
        assert_eq!(c.cmd("ping"), "pong");
        c.exit();
    }
    let pages = 65536u64;
    let dirty_pages: Vec<u64> = (0..pages).step_by(100).take(655).collect();
    for backend in [Backend::UffdWp, Backend::Hash] {
        let mut c = Child::spawn();
        let r = c.map(pages);
        let t0 = Instant::now();
        let mut t = dirty::open(c.pid, backend).expect("open");
        let open = t0.elapsed();
        let t1 = Instant::now();
        t.start().expect("start");
        let start = t1.elapsed();
        let mut collects = Vec::new();
        for round in 0..5u64 {
            let idx: Vec<u64> = dirty_pages.iter().map(|i| (i + round) % pages).collect();
            c.write(r, round + 1, &idx);
            let t2 = Instant::now();
            let d = collect(&mut *t);
            collects.push(t2.elapsed());
            let mut want = idx.clone();
            want.sort();
            assert_eq!(r.indices(&d), want);
        }
        let t3 = Instant::now();
        let idle = collect(&mut *t);
        let idle_t = t3.elapsed();
        assert!(r.indices(&idle).is_empty());
        let t4 = Instant::now();
        t.stop().expect("stop");
        let stop = t4.elapsed();
        collects.sort();
        println!(
            "    {:>8}: open {:>8.2?}  start {:>8.2?}  collect(655 of 65536 dirty) median {:>8.2?} max {:>8.2?}  collect(idle) {:>8.2?}  stop {:>8.2?}",
            backend.name(),
            open,
            start,
            collects[collects.len() / 2],
            collects[collects.len() - 1],
            idle_t,
            stop
        );
        c.verify();
        c.exit();
    }
}

// ---------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    ("uffd_wp_scenario", test_uffd_wp_scenario),
    (
        "uffd_wp_scenario_with_remove_events",
        test_uffd_wp_scenario_with_remove_events,
    ),
    ("hash_scenario", test_hash_scenario),
    ("soft_dirty_scenario", test_soft_dirty_scenario),
    ("uffd_wp_leaves_no_trace", test_uffd_wp_leaves_no_trace),
    (
        "injection_during_nanosleep",
        test_injection_during_nanosleep,
    ),
    (
        "inject_syscall_results_and_errors",
        test_inject_syscall_results_and_errors,
    ),
    ("multithreaded_target", test_multithreaded_target),
    ("sigstopped_target", test_sigstopped_target),
    ("frozen_cgroup_v1_target", test_frozen_cgroup_v1_target),
    ("seccomp_refusal", test_seccomp_refusal),
    ("open_best_picks_uffd_wp", test_open_best_picks_uffd_wp),
    (
        "uffd_wp_dontneed_whole_page_table",
        test_uffd_wp_dontneed_whole_page_table,
    ),
    ("hash_record_sent", test_hash_record_sent),
    (
        "hash_record_sent_untracked",
        test_hash_record_sent_untracked,
    ),
    (
        "execve_after_start_reports_process_gone",
        test_execve_after_start_reports_process_gone,
    ),
    ("precopy_uffd_wp", test_precopy_uffd_wp),
    ("precopy_hash", test_precopy_hash),
    ("timing_256mib", test_timing_256mib),
];

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child::main();
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return;
    }
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let selected: Vec<&Test> = TESTS
        .iter()
        .filter(|(name, _)| filter.is_none_or(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, f) in selected.iter().copied() {
        println!("test {name} ...");
        let t = Instant::now();
        match std::panic::catch_unwind(f) {
            Ok(()) => println!("test {name} ... ok ({:.2?})", t.elapsed()),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        for name in &failed {
            println!("    {name}");
        }
        std::process::exit(101);
    }
}
