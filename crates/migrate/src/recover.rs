//! `migrun migrate-recover`: settles a hand-over that was cut between the
//! two phases of its commit (see [`crate::journal`]).
//!
//! Each side reads its journal. Where one side's step decides alone (the
//! source never committed; the target never acknowledged, or lost part of
//! its copy's memory), that is applied at once. Otherwise the two sides
//! exchange their steps over the wire (`--peer` on one host, `--listen` or
//! a running `migrate-in` on the other) and both apply [`journal::decide`].
//! With the peer gone for good, `--winner source|target` names the side
//! that wins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use migrun_runtime::{checkpoint, lifecycle, StateRoot};
use migrun_wire::{Channel, Message};

use crate::docker::{self, Daemon};
use crate::events::{Event, Events, Origin};
use crate::journal::{self, Journal, Record, Role, Step, Winner};
use crate::{MigrateError, Result};

/// Options of `migrate-recover`.
#[derive(Debug, Clone)]
pub struct RecoverOptions {
    /// The container, as the source names it.
    pub id: String,
    /// The peer's `migrate-in` or `migrate-recover --listen`, to ask.
    pub peer: Option<String>,
    /// Wait here for the peer's `migrate-recover --peer`.
    pub listen: Option<String>,
    /// Shared key file (with `--peer` or `--listen`).
    pub key: Option<PathBuf>,
    /// The side that wins when the peer cannot be asked.
    pub winner: Option<Winner>,
    /// How long to wait for the peer.
    pub peer_timeout: Duration,
    /// Docker mode: `id` names a container of the daemon at this address
    /// (`unix:///PATH`), as `docker ps` shows it: on the source, its journal
    /// is under the state root of the daemon's migrun runtime; on the
    /// target, the migration that made it is found by the container.
    pub docker_host: Option<String>,
    /// Where notices of what is done go.
    pub events: Events,
}

/// What the peer said of its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its journal step, `None` when it has no journal of the migration.
    pub step: Option<Step>,
    /// Whether its copy is whole.
    pub whole: bool,
}

impl Peer {
    /// From a `Recover` message's fields.
    pub fn parse(step: &str, whole: bool) -> Result<Self> {
        let step = if step == "none" {
            None
        } else {
            Some(
                serde_json::from_value(serde_json::Value::from(step)).map_err(|_| {
                    MigrateError::Protocol(format!("recover: unknown step {step:?}"))
                })?,
            )
        };
        Ok(Self { step, whole })
    }
}

fn recover_message(id: &str, j: Option<&Journal>) -> Message {
    Message::Recover {
        container: id.to_string(),
        step: j.map_or("none", |j| j.step().name()).to_string(),
        whole: j.is_none_or(Journal::target_copy_whole),
    }
}

/// The target's answer to a source's `migrate-recover` that reached its
/// `migrate-in`: says where its side stands, then settles it the same way.
pub async fn answer(
    root: &StateRoot,
    ch: &mut Channel,
    id: &str,
    peer: Peer,
    events: &Events,
) -> Result<()> {
    let mine = Journal::open(root.path(), Role::Target, id)?;
    ch.send(&recover_message(id, mine.as_ref())).await?;
    let Some(j) = mine else {
        return Ok(());
    };
    let whole = j.target_copy_whole() && peer.whole;
    if let Some(w) = journal::decide(peer.step, Some(j.step()), whole) {
        settle(root, j, w, events).await?;
    }
    Ok(())
}

/// `migrun migrate-recover ID`: settles this host's side(s) of the
/// migration of `ID`; returns what was done, for the operator.
///
/// With `--peer` or `--listen`, the two sides always exchange their
/// steps first (a side that is settled, or could decide alone, still
/// tells the other, which may need it), and both decide the same way.
pub async fn recover(root: &StateRoot, opts: &RecoverOptions) -> Result<String> {
    let (root, opts) = match &opts.docker_host {
        Some(host) => {
            let (root, id) = docker_side(root, host, &opts.id).await?;
            (root, RecoverOptions { id, ..opts.clone() })
        }
        None => (root.clone(), opts.clone()),
    };
    let (root, opts) = (&root, &opts);
    let source = Journal::open(root.path(), Role::Source, &opts.id)?;
    let target = Journal::open(root.path(), Role::Target, &opts.id)?;
    let mut journals: Vec<Journal> = [source, target].into_iter().flatten().collect();
    for j in &journals {
        if !j.step().settled() && journal::writer_alive(j.record()) {
            return Err(MigrateError::Source(format!(
                "the migration of {} is still in progress here (process {}): let it finish or end it first",
                opts.id,
                j.record().pid
            )));
        }
    }
    let asks = opts.peer.is_some() || opts.listen.is_some();
    if journals.is_empty() {
        if asks {
            // Nothing here: say so to the peer, whose journal then decides.
            exchange(opts, None).await?;
            return Ok(format!("no migration of {} here (told the peer)", opts.id));
        }
        return Err(MigrateError::Source(format!(
            "no migration of {} to settle under {}",
            opts.id,
            root.path().display()
        )));
    }
    let mut peer = None;
    if asks && journals.len() == 1 {
        match exchange(opts, journals.first()).await {
            Ok(p) => peer = p,
            Err(e) => opts.events.emit(Event::PeerUnreachable {
                error: e.to_string(),
            }),
        }
    }
    let mut done = Vec::new();
    for j in journals.drain(..) {
        let role = j.record().role;
        if j.step().settled() {
            done.push(format!("{} side already {}", role.name(), j.step().name()));
            // What it had not yet removed when it was cut off.
            for dir in [&j.record().images, &j.record().scratch]
                .into_iter()
                .flatten()
            {
                let _ = std::fs::remove_dir_all(dir);
            }
            j.remove();
            continue;
        }
        let winner = peer
            .and_then(|p| decide_with(&j, p))
            .or_else(|| decide_alone(&j))
            .or(opts.winner)
            .ok_or_else(|| {
                MigrateError::InDoubt(format!(
                    "the {} side of {} is {} and the peer could not be asked: run again with --peer ADDR (or --listen ADDR), or name the side that wins with --winner source|target",
                    role.name(),
                    opts.id,
                    j.step().name()
                ))
            })?;
        done.push(settle(root, j, winner, &opts.events).await?);
    }
    Ok(done.join("; "))
}

/// Docker mode: where the migration of the daemon's container `name` is
/// journaled on this host, and the id both sides know it by (the source's).
/// On the source that is the state root of the daemon's migrun runtime;
/// on the target, `root` (migrate-in's), whose journal names the container.
async fn docker_side(root: &StateRoot, host: &str, name: &str) -> Result<(StateRoot, String)> {
    let daemon = Daemon::connect(host)?;
    let c = daemon.container(name).await?;
    let id = c["Id"].as_str().unwrap_or(name).to_string();
    let pid = c["State"]["Pid"].as_i64().unwrap_or(0);
    if pid > 0 {
        let runtime = StateRoot::open(&docker::runtime_root(pid)?, false)?;
        if Journal::open(runtime.path(), Role::Source, &id)?.is_some() {
            return Ok((runtime, id));
        }
    }
    let made_here = journal::all(root.path(), &Events::none())
        .into_iter()
        .find(|j| {
            j.record().role == Role::Target && j.record().docker_container == Some(id.clone())
        });
    match made_here {
        Some(j) => Ok((root.clone(), j.record().container.clone())),
        None => Err(MigrateError::Source(format!(
            "no migration of Docker container {name} to settle (neither under its daemon's migrun runtime nor under {})",
            root.path().display()
        ))),
    }
}

/// The decision one side's journal makes alone, if any.
fn decide_alone(j: &Journal) -> Option<Winner> {
    match j.record().role {
        Role::Source => {
            journal::decide(Some(j.step()), None, true).filter(|w| *w == Winner::Source)
        }
        Role::Target => journal::decide(None, Some(j.step()), j.target_copy_whole()),
    }
}

/// What this side's journal and the peer's answer decide together.
fn decide_with(j: &Journal, peer: Peer) -> Option<Winner> {
    match j.record().role {
        Role::Source => journal::decide(Some(j.step()), peer.step, peer.whole),
        Role::Target => {
            // A source that answers with no journal has settled: before
            // this side ran, that can only have been a roll-back (it lets
            // its copy go only once this one is Running).
            let source = peer
                .step
                .or((j.step() < Step::Continued).then_some(Step::Aborted));
            journal::decide(source, Some(j.step()), j.target_copy_whole())
        }
    }
}

/// Tells the peer where this side stands (`j`, or nothing) and returns
/// what it says of its own; `None` without `--peer`/`--listen`.
async fn exchange(opts: &RecoverOptions, j: Option<&Journal>) -> Result<Option<Peer>> {
    let (Some(key), true) = (&opts.key, opts.peer.is_some() || opts.listen.is_some()) else {
        return Ok(None);
    };
    let key = migrun_wire::load_key(key)?;
    let mut ch = if let Some(peer) = &opts.peer {
        migrun_wire::connect(peer.as_str(), &key).await?
    } else {
        let addr = opts.listen.as_deref().unwrap_or_default();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| MigrateError::Source(format!("listen on {addr}: {e}")))?;
        opts.events.emit(Event::WaitingForPeer {
            addr: addr.to_string(),
        });
        migrun_wire::accept(&listener, &key).await?
    };
    ch.set_timeouts(Some(opts.peer_timeout));
    let theirs = if opts.peer.is_some() {
        ch.send(&recover_message(&opts.id, j)).await?;
        ch.recv().await?
    } else {
        let m = ch.recv().await?;
        ch.send(&recover_message(&opts.id, j)).await?;
        m
    };
    let Message::Recover {
        container,
        step,
        whole,
    } = theirs
    else {
        return Err(MigrateError::Protocol(format!(
            "{} message instead of the peer's recover",
            theirs.kind()
        )));
    };
    if container != opts.id {
        return Err(MigrateError::Protocol(format!(
            "the peer settles {container}, not {}",
            opts.id
        )));
    }
    Peer::parse(&step, whole).map(Some)
}

/// Applies `winner` to this side of the migration and settles its journal.
async fn settle(
    root: &StateRoot,
    mut j: Journal,
    winner: Winner,
    events: &Events,
) -> Result<String> {
    let r = j.record().clone();
    let what = match (r.role, winner) {
        (Role::Source, Winner::Source) => {
            take_back(root, &r, events);
            j.set(Step::Aborted)?;
            format!("{} runs on here again (the source)", r.container)
        }
        (Role::Source, Winner::Target) => {
            let _ = crate::source::kill_frozen(root, &r.container);
            if root.exists(&r.container) {
                lifecycle::delete(root, &r.container, true)?;
            }
            if let Some(host) = &r.docker_host {
                // Its daemon's record of it goes too.
                let removed = match Daemon::connect(host) {
                    Ok(daemon) => daemon.remove(&r.container).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = removed {
                    events.warn(Origin::MigrateRecover, e.to_string());
                }
            }
            j.set(Step::Released)?;
            format!(
                "{} runs on the target; the copy here is removed",
                r.container
            )
        }
        (Role::Target, Winner::Source) => {
            discard_target_copy(root, &r, events).await;
            j.set(Step::Aborted)?;
            format!(
                "{} stays with the source; the copy here is removed",
                r.container
            )
        }
        (Role::Target, Winner::Target) => {
            if !j.target_copy_whole() {
                return Err(MigrateError::InDoubt(format!(
                    "the copy of {} here lost memory that was still to come: it cannot win",
                    r.container
                )));
            }
            match docker_copy(&r)? {
                Some((daemon, cid)) => docker::continue_restored(&daemon, &cid).await?,
                None => checkpoint::continue_container(root, &r.container)?,
            }
            j.set(Step::Running)?;
            format!("{} runs here (the target)", r.container)
        }
    };
    events.emit(Event::Settled { what: what.clone() });
    j.remove();
    Ok(what)
}

/// The source takes its container back: thawed, its connections let in,
/// CRIU's network lock gone, its CPU limit back.
pub fn take_back(root: &StateRoot, r: &Record, events: &Events) {
    end_orphan_dump(root, &r.container, events);
    crate::netmove::release(root, &r.container);
    if let Ok(c) = root.load(&r.container) {
        if let (Some(limit), Some(cfg)) = (&r.cpu_limit, c.spec().ok()) {
            crate::throttle::Throttle::restore(&cfg.cgroup_path, limit);
        }
        if c.status() == libcontainer::container::ContainerStatus::Paused {
            let _ = lifecycle::resume(root, &r.container);
        }
    }
}

/// Kills a CRIU dump that a dead `migrate-out` left behind for the
/// container (`criu: dump --rpc -t <its init pid>`, reparented to init,
/// still serving lazy pages or holding the tasks): its tasks stay frozen
/// by the freezer, as when a live migrate-out ends its dump.
fn end_orphan_dump(root: &StateRoot, id: &str, events: &Events) {
    let Some(init) = root.load(id).ok().and_then(|c| c.pid()) else {
        return;
    };
    let wanted = format!("-t {init}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != "criu" {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let words: Vec<&str> = cmdline.split_whitespace().collect();
        let is_dump = words.contains(&"dump");
        let of_it = words
            .windows(2)
            .any(|w| format!("{} {}", w[0], w[1]) == wanted);
        if !(is_dump && of_it) {
            continue;
        }
        events.emit(Event::OrphanDumpEnded { pid });
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// The Docker daemon and the container it made for a Docker-mode target's
/// record; `None` for a migrun container (or a Docker migration cut off
/// before the container was made).
fn docker_copy(r: &Record) -> Result<Option<(Daemon, String)>> {
    match (&r.docker_host, &r.docker_container) {
        (Some(host), Some(cid)) => Ok(Some((Daemon::connect(host)?, cid.clone()))),
        _ => Ok(None),
    }
}

/// Removes the target's copy of a migration and everything made for it.
pub async fn discard_target_copy(root: &StateRoot, r: &Record, events: &Events) {
    let in_docker = match docker_copy(r) {
        Ok(Some((daemon, cid))) => daemon.remove(&cid).await,
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = in_docker {
        events.warn(Origin::Migrun, e.to_string());
    }
    if r.docker_host.is_none() && root.exists(&r.container) {
        if let Err(e) = lifecycle::delete(root, &r.container, true) {
            events.warn(
                Origin::Migrun,
                format!("remove container {}: {e}", r.container),
            );
        }
    }
    let criu_root = root.container_dir(&r.container).join("criu-root");
    let _ = nix::mount::umount2(&criu_root, nix::mount::MntFlags::MNT_DETACH);
    for dir in [&r.images, &r.scratch].into_iter().flatten() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if r.docker_host.is_none() && r.dir.is_some() {
        lifecycle::remove_migrated_bundle_dir(root, &r.container);
    }
}
