//! The journals of the hand-over: what each side of a migration had done
//! when it last wrote, durable before the step is acted on.
//!
//! The hand-over is a two-phase commit with the source as coordinator:
//!
//! | source            | wire                 | target                        |
//! |-------------------|----------------------|-------------------------------|
//! | `Sent`            | `Commit` →           | `Receiving`, then restores    |
//! |                   | ← `Ack` (prepared)   | `Acknowledged` (stopped copy) |
//! | `Committed`       | `Done` →             |                               |
//! |                   | ← `Ack` (running)    | `Continued` (it runs)         |
//! |                   | ← `Ack` (memory)     | `Running` (memory in place)   |
//! | `Released`        |                      |                               |
//!
//! Rules that follow from it: the target never runs its copy before the
//! source has committed, and never deletes a copy it has acknowledged on
//! its own; the source never thaws once it has committed, and never kills
//! its copy before the target's copy is whole (`Running`). A side cut off
//! in between stays *in doubt* (source frozen, target stopped) until
//! `migrun migrate-recover` settles it with [`decide`].
//!
//! Journals live in the state root (`<root>/.migrations/`), one file per
//! container and side, written to a temporary file, fsynced, renamed over
//! the old one and the directory fsynced.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{MigrateError, Result};

/// The directory of the journals under a state root.
pub const DIR: &str = ".migrations";

/// Which end of a migration a journal belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `migrate-out`.
    Source,
    /// `migrate-in`.
    Target,
}

impl Role {
    /// The journal's file name prefix and the word in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

/// Where one side of a migration is. The order of the variants is the order
/// of the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Source: the rounds run; the container runs here.
    Precopy,
    /// Source: the container is frozen here.
    Frozen,
    /// Source: CRIU has dumped it.
    Dumped,
    /// Source: everything is sent, `Commit` asked.
    Sent,
    /// Source: the target acknowledged its stopped copy and this side
    /// decided that the target's copy wins. Never thawed from here on.
    Committed,
    /// Source: the target's copy runs with its memory whole; ours is gone.
    Released,
    /// Target: receiving; nothing here runs.
    Receiving,
    /// Target: restored, stopped, acknowledged to the source. Never deleted
    /// on this side's own say from here on.
    Acknowledged,
    /// Target: the source committed and the copy here was let run; its
    /// memory may still be arriving from the local page store (lazy).
    Continued,
    /// Target: runs with all of its memory in place. Done.
    Running,
    /// Either side: the migration was rolled back; the source's copy runs.
    Aborted,
}

impl Step {
    /// The word in messages and in the journal.
    pub fn name(self) -> &'static str {
        match self {
            Step::Precopy => "precopy",
            Step::Frozen => "frozen",
            Step::Dumped => "dumped",
            Step::Sent => "sent",
            Step::Committed => "committed",
            Step::Released => "released",
            Step::Receiving => "receiving",
            Step::Acknowledged => "acknowledged",
            Step::Continued => "continued",
            Step::Running => "running",
            Step::Aborted => "aborted",
        }
    }

    /// Whether a side at this step has finished (nothing left to settle).
    pub fn settled(self) -> bool {
        matches!(self, Step::Released | Step::Running | Step::Aborted)
    }
}

/// One side's record of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Which side wrote it.
    pub role: Role,
    /// The container (on this side: its id under this state root, or the
    /// Docker container's name in Docker mode).
    pub container: String,
    /// Where the migration stands.
    pub step: Step,
    /// The peer's address as this side knew it (source: the target's
    /// listen address; target: the address the source came from).
    pub peer: String,
    /// Target: the incoming directory (bundle, images) of this migration.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Target: CRIU's images directory of this migration.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Target: the memory was being filled in lazily by this `migrate-in`
    /// (it is incomplete if that process died before `Running`).
    #[serde(default)]
    pub lazy: bool,
    /// Target: its copy lost memory it cannot get back (a lazy restore cut
    /// off before `Running`); it can never win.
    #[serde(default)]
    pub incomplete: bool,
    /// Target: scratch space of this migration (a Docker image on its way).
    #[serde(default)]
    pub scratch: Option<PathBuf>,
    /// Source: the CPU limit (quota, period) in force before auto-converge
    /// throttled the container, to put back if this side dies meanwhile.
    #[serde(default)]
    pub cpu_limit: Option<(String, String)>,
    /// Docker mode: the daemon address.
    #[serde(default)]
    pub docker_host: Option<String>,
    /// Docker mode, target: the container this side's daemon made (its id
    /// there), which a recovery continues or removes.
    #[serde(default)]
    pub docker_container: Option<String>,
    /// The process that wrote the record.
    pub pid: u32,
    /// When that process started (clock ticks after boot): a pid alone is
    /// reused by another process soon enough on a busy host.
    #[serde(default)]
    pub pid_start: Option<u64>,
}

/// The journal of one side of one container's migration.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
    record: Record,
}

fn io_err(what: &Path, e: std::io::Error) -> MigrateError {
    MigrateError::Journal(format!("{}: {e}", what.display()))
}

/// The journal directory of `state_root`, created if missing.
fn dir_of(state_root: &Path) -> Result<PathBuf> {
    let dir = state_root.join(DIR);
    fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    Ok(dir)
}

/// The journal file of `container` on side `role` under `state_root`.
pub fn path_of(state_root: &Path, role: Role, container: &str) -> PathBuf {
    state_root
        .join(DIR)
        .join(format!("{}-{container}.json", role.name()))
}

impl Journal {
    /// Starts a journal at `record.step` (written before returning). An
    /// unsettled journal of the same container and side is refused: that
    /// migration must be settled first (`migrate-recover`).
    pub fn begin(state_root: &Path, record: Record) -> Result<Self> {
        dir_of(state_root)?;
        let path = path_of(state_root, record.role, &record.container);
        if let Some(old) = read(&path)? {
            if !old.step.settled() {
                return Err(MigrateError::InDoubt(format!(
                    "an earlier migration of {} is {} on this {} side: settle it first (migrun migrate-recover {})",
                    old.container,
                    old.step.name(),
                    old.role.name(),
                    old.container
                )));
            }
        }
        let mut journal = Self { path, record };
        journal.record.pid_start = start_time(journal.record.pid);
        journal.write()?;
        Ok(journal)
    }

    /// Opens an existing journal of `container` on side `role`.
    pub fn open(state_root: &Path, role: Role, container: &str) -> Result<Option<Self>> {
        let path = path_of(state_root, role, container);
        Ok(read(&path)?.map(|record| Self { path, record }))
    }

    /// The record as last written.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The step last written.
    pub fn step(&self) -> Step {
        self.record.step
    }

    /// Records `step`, durably, before the caller acts on it.
    pub fn set(&mut self, step: Step) -> Result<()> {
        self.record.step = step;
        self.record.pid = std::process::id();
        self.record.pid_start = start_time(self.record.pid);
        self.write()
    }

    /// Changes the record with `edit` and writes it.
    pub fn update(&mut self, edit: impl FnOnce(&mut Record)) -> Result<()> {
        edit(&mut self.record);
        self.write()
    }

    /// Whether the target's copy still has all of its memory: not when it
    /// was filled lazily by a `migrate-in` that is gone before `Running`
    /// (the pages it still held went with it).
    pub fn target_copy_whole(&self) -> bool {
        let r = &self.record;
        let cut_off = r.lazy && r.step != Step::Running && !writer_alive(r);
        !(r.role == Role::Target && (r.incomplete || cut_off))
    }

    /// Removes the journal (a settled migration whose record is no longer
    /// needed).
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }

    fn write(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.record)
            .map_err(|e| MigrateError::Journal(format!("encode journal: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, &self.path).map_err(|e| io_err(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(dir, e))?;
        }
        Ok(())
    }
}

/// Reads the record at `path`; `None` if there is none. A record that
/// does not parse is an error naming the file (never taken as "none": it
/// may guard a container in doubt).
fn read(path: &Path) -> Result<Option<Record>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| MigrateError::Journal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Whether the process that wrote record `r` still runs: its pid is there
/// and started when the record says (not another process that got the pid
/// since).
pub fn writer_alive(r: &Record) -> bool {
    match (start_time(r.pid), r.pid_start) {
        (Some(now), Some(then)) => now == then,
        (now, None) => now.is_some(),
        (None, Some(_)) => false,
    }
}

/// When process `pid` started, in clock ticks after boot (the 22nd field
/// of `/proc/PID/stat`); `None` if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Every journal under `state_root` (unreadable ones are reported to
/// `events` and skipped).
pub fn all(state_root: &Path, events: &crate::events::Events) -> Vec<Journal> {
    let dir = state_root.join(DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match read(&path) {
            Ok(Some(record)) => out.push(Journal { path, record }),
            Ok(None) => {}
            Err(e) => events.warn(
                crate::events::Origin::Migrun,
                format!("skipping journal: {e}"),
            ),
        }
    }
    out
}

/// Which copy wins a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// The source's copy is thawed; the target's is removed.
    Source,
    /// The target's copy runs; the source's is removed.
    Target,
}

/// What the two sides' steps say about who wins; `None` if they cannot
/// tell (one side is unknown and the other's step does not decide).
///
/// `target_copy_whole`: whether the target's copy still has all of its
/// memory (false when it restored lazily and its `migrate-in` died before
/// `Running`: the pages it had not yet received are gone with it).
pub fn decide(
    source: Option<Step>,
    target: Option<Step>,
    target_copy_whole: bool,
) -> Option<Winner> {
    use Step::*;
    // A target that lost part of its memory can never win; the source's
    // copy is frozen (it is only killed once the target is Running).
    if !target_copy_whole && target != Some(Running) {
        return match source {
            Some(Released) => None,
            _ => Some(Winner::Source),
        };
    }
    match (source, target) {
        (_, Some(Running)) | (Some(Released), _) => Some(Winner::Target),
        (_, Some(Continued)) => Some(Winner::Target),
        (Some(Committed), _) => Some(Winner::Target),
        (Some(Aborted), _) | (_, Some(Aborted)) => Some(Winner::Source),
        // The source never committed: the target never ran.
        (Some(Precopy | Frozen | Dumped | Sent), _) => Some(Winner::Source),
        // The target never acknowledged: the source cannot have committed.
        (_, Some(Receiving)) => Some(Winner::Source),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A record of container `c1` for tests.
    pub(crate) fn record(role: Role, step: Step) -> Record {
        Record {
            role,
            container: "c1".into(),
            step,
            peer: "127.0.0.1:1".into(),
            dir: None,
            images: None,
            lazy: false,
            incomplete: false,
            scratch: None,
            cpu_limit: None,
            docker_host: None,
            docker_container: None,
            pid: 1,
            pid_start: None,
        }
    }

    #[test]
    fn a_writer_is_alive_only_as_the_process_that_started_then() {
        let me = std::process::id();
        let started = start_time(me).expect("own start time");
        let mine = Record {
            pid: me,
            pid_start: Some(started),
            ..record(Role::Target, Step::Acknowledged)
        };
        assert!(writer_alive(&mine));
        // The pid reused by another process (another start time).
        let reused = Record {
            pid_start: Some(started + 1),
            ..mine.clone()
        };
        assert!(!writer_alive(&reused));
        // A process that is gone.
        let gone = Record {
            pid: u32::MAX - 1,
            ..mine
        };
        assert!(!writer_alive(&gone));
        // A journal begun here records when this process started.
        let dir = tempfile::tempdir().expect("tmp");
        let j = Journal::begin(dir.path(), record(Role::Source, Step::Precopy)).expect("begin");
        assert_eq!(j.record().pid_start, start_time(1));
    }

    #[test]
    fn a_journal_is_durable_and_an_unsettled_one_blocks_a_new_migration() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut j = Journal::begin(dir.path(), record(Role::Source, Step::Precopy)).expect("begin");
        j.set(Step::Committed).expect("set");
        let again = Journal::open(dir.path(), Role::Source, "c1")
            .expect("open")
            .expect("there");
        assert_eq!(again.step(), Step::Committed);
        let refused =
            Journal::begin(dir.path(), record(Role::Source, Step::Precopy)).expect_err("in doubt");
        assert!(
            refused.to_string().contains("migrate-recover c1"),
            "{refused}"
        );
        // The other side's journal of the same container is its own.
        Journal::begin(dir.path(), record(Role::Target, Step::Receiving)).expect("target");
        j.set(Step::Released).expect("set");
        Journal::begin(dir.path(), record(Role::Source, Step::Precopy)).expect("settled");
        assert_eq!(all(dir.path(), &crate::events::Events::none()).len(), 2);
    }

    #[test]
    fn a_broken_journal_is_an_error_not_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(dir.path().join(DIR)).expect("dir");
        fs::write(path_of(dir.path(), Role::Target, "c1"), b"{").expect("write");
        let e = Journal::open(dir.path(), Role::Target, "c1").expect_err("broken");
        assert!(e.to_string().contains("target-c1.json"), "{e}");
    }

    #[test]
    fn never_two_copies_never_none() {
        use Step::*;
        let sources = [
            None,
            Some(Precopy),
            Some(Frozen),
            Some(Dumped),
            Some(Sent),
            Some(Committed),
            Some(Released),
            Some(Aborted),
        ];
        let targets = [
            None,
            Some(Receiving),
            Some(Acknowledged),
            Some(Continued),
            Some(Running),
            Some(Aborted),
        ];
        for s in sources {
            for t in targets {
                for whole in [true, false] {
                    let w = decide(s, t, whole);
                    // The target can only have run after the source committed.
                    let target_ran = matches!(t, Some(Continued | Running));
                    let source_committed = matches!(s, Some(Committed | Released));
                    if target_ran && s.is_some() && !source_committed {
                        continue; // not a reachable pair
                    }
                    if matches!(s, Some(Released)) {
                        assert_ne!(
                            w,
                            Some(Winner::Source),
                            "{s:?} {t:?}: the source copy is gone"
                        );
                    }
                    if source_committed && whole {
                        assert_eq!(w, Some(Winner::Target), "{s:?} {t:?}");
                    }
                    if !whole && !matches!(t, Some(Running)) && !matches!(s, Some(Released)) {
                        assert_eq!(
                            w,
                            Some(Winner::Source),
                            "{s:?} {t:?}: target copy incomplete"
                        );
                    }
                    if matches!(s, Some(Precopy | Frozen | Dumped | Sent | Aborted)) {
                        assert_eq!(w, Some(Winner::Source), "{s:?} {t:?}");
                    }
                }
            }
        }
        assert_eq!(decide(None, Some(Acknowledged), true), None);
        assert_eq!(decide(None, None, true), None);
    }
}
