//! The hand-over of the one running copy: the phases of both ends of a
//! migration as state machines, journaled at each transition, over an
//! injected transport (a TCP [`Channel`] in production, an in-memory
//! [`migrun_wire::pair`] in the unit tests below).
//!
//! ```text
//! source: Precopy -> Frozen -> Dumped -> Sent -> Committed -> Released
//! target: Receiving -> Acknowledged -> Continued -> Running
//! ```
//!
//! - Each transition is one method; it journals the new phase (written
//!   and fsynced) before acting on it, then fires a fault injected for it.
//! - The source never lets its copy go before the target has acknowledged
//!   a restored (stopped) copy, confirmed that it runs, and that all of its
//!   memory is in place. Before `Committed` any failure rolls back
//!   ([`SourceMachine::abort`]): the source's copy thaws.
//! - The target never runs its copy before the source's `Done` (sent only
//!   once `Committed` is journaled), and never deletes a copy it has
//!   acknowledged: a cut after `Acknowledged` leaves both copies as they
//!   are, *in doubt*, for `migrun migrate-recover` ([`crate::recover`],
//!   whose rule is [`crate::journal::decide`]).
//!
//! What is done to the copies themselves (freeze, thaw, restore, resume,
//! release) is behind [`SourceCopy`] and [`TargetCopy`], one implementation
//! per mode (plain migrun containers, Docker's): the machine never asks
//! which mode it runs in. What happens *between* transitions (the pre-copy
//! rounds, CRIU's dump, the files and pages) is the drivers' business
//! ([`crate::source`], [`crate::target`]).

use std::future::Future;
use std::time::Duration;

use migrun_wire::{Channel, Message, Sender};
use tokio::sync::mpsc;

use crate::events::{Events, Origin};
use crate::fault::{self, Fault, Then};
use crate::journal::{Journal, Step};
use crate::liveness::with_heartbeats;
use crate::{MigrateError, Result};

/// Whether a side may go from phase `from` to phase `to`.
pub fn allowed(from: Step, to: Step) -> bool {
    use Step::*;
    matches!(
        (from, to),
        (Precopy, Frozen)
            | (Frozen, Dumped)
            | (Dumped, Sent)
            | (Sent, Committed)
            | (Committed, Released)
            | (Precopy | Frozen | Dumped | Sent, Aborted)
            | (Receiving, Acknowledged)
            | (Acknowledged, Continued)
            | (Continued, Running)
            | (Receiving, Aborted)
    )
}

/// What the source's hand-over does to its copy of the container.
pub trait SourceCopy: Send {
    /// Freezes the copy (the start of the downtime).
    fn freeze(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Rolls back: the copy runs again exactly as before the migration.
    fn undo(&mut self) -> impl Future<Output = ()> + Send;
    /// Lets the frozen copy go for good: the target's runs with all of its
    /// memory. A failure here leaves a dead copy behind, never a live one.
    fn release(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// What the target's hand-over does to its (restored, stopped) copy.
pub trait TargetCopy: Send {
    /// Lets the stopped copy run (after the source's commit).
    fn resume(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Waits until all of the running copy's memory is in place (at once
    /// when it was restored with all of it).
    fn memory_in_place(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Whether memory is still to come after the copy runs (from this
    /// process's page store: a copy cut off before it is complete has lost
    /// it, and can never win a recovery).
    fn lazy(&self) -> bool;
}

/// The source's end of the connection: a sender, and the target's messages
/// read by a task of their own (the target may report a failure at any
/// time, also while we send).
pub struct SourceLink {
    tx: Sender,
    replies: mpsc::UnboundedReceiver<migrun_wire::Result<Message>>,
    peer_timeout: Duration,
}

impl SourceLink {
    /// Splits `ch`, reads its receiving half in a task; sends and waits for
    /// answers with `peer_timeout` as their deadline.
    pub fn new(ch: Channel, peer_timeout: Duration) -> Self {
        let (mut tx, mut rx) = ch.split();
        tx.set_send_timeout(Some(peer_timeout));
        rx.set_recv_timeout(None);
        let (reply_tx, replies) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let m = rx.recv().await;
                let end = m.is_err();
                if reply_tx.send(m).is_err() || end {
                    break;
                }
            }
        });
        Self {
            tx,
            replies,
            peer_timeout,
        }
    }

    /// The sending half.
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.tx
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        Ok(self.tx.send(msg).await?)
    }

    /// The target's next answer that is not a heartbeat, within the peer
    /// time-out of silence; its `Error` or `Abort` as an error.
    pub async fn reply(&mut self, waiting_for: &str) -> Result<Message> {
        self.reply_within(waiting_for, self.peer_timeout).await
    }

    /// Like [`reply`](Self::reply), with `timeout` as the longest silence.
    pub async fn reply_within(&mut self, waiting_for: &str, timeout: Duration) -> Result<Message> {
        loop {
            let r = tokio::time::timeout(timeout, self.replies.recv()).await;
            match r {
                Ok(Some(Ok(Message::Heartbeat))) => continue,
                Ok(Some(Ok(Message::Error { message }))) => {
                    return Err(MigrateError::Peer(message))
                }
                Ok(Some(Ok(Message::Abort { reason }))) => return Err(MigrateError::Peer(reason)),
                Ok(Some(Ok(m))) => return Ok(m),
                Ok(Some(Err(e))) => {
                    return Err(MigrateError::Peer(format!(
                        "connection lost while waiting for {waiting_for}: {e}"
                    )))
                }
                Ok(None) => {
                    return Err(MigrateError::Peer(format!(
                        "connection lost while waiting for {waiting_for}"
                    )))
                }
                Err(_) => {
                    return Err(MigrateError::Peer(format!(
                        "no word from the target for {timeout:?} while waiting for {waiting_for}"
                    )))
                }
            }
        }
    }

    /// Waits for the target's `Ack` (see [`reply`](Self::reply)); any
    /// other message is a protocol error.
    pub async fn ack(&mut self, waiting_for: &str) -> Result<()> {
        match self.reply(waiting_for).await? {
            Message::Ack => Ok(()),
            other => Err(MigrateError::Protocol(format!(
                "expected Ack while waiting for {waiting_for}, got {other:?}"
            ))),
        }
    }

    /// After a failure to send, the target's own account of it if it sent
    /// one (a send fails with a broken pipe when the target gave up first).
    pub async fn peer_reason(&mut self, err: MigrateError) -> MigrateError {
        if !matches!(err, MigrateError::Wire(_)) {
            return err;
        }
        let wait = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(m) = self.replies.recv().await {
                match m {
                    Ok(Message::Error { message }) | Ok(Message::Abort { reason: message }) => {
                        return Some(message)
                    }
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
            None
        });
        match wait.await {
            Ok(Some(message)) => MigrateError::Peer(message),
            _ => err,
        }
    }
}

/// Journals `to` after checking that the journal's phase may go there.
fn enter(journal: &mut Journal, to: Step) -> Result<()> {
    let from = journal.step();
    if !allowed(from, to) {
        return Err(MigrateError::Journal(format!(
            "no transition from {} to {}",
            from.name(),
            to.name()
        )));
    }
    journal.set(to)
}

/// Drops the connection or stalls for good if a fault is injected at `step`.
async fn fire(fault: Option<Fault>, step: Step, tx: &mut Sender, events: &Events) -> Result<()> {
    match fault::at(fault, step, events) {
        Then::Go => Ok(()),
        Then::Drop => {
            let _ = tx.shutdown().await;
            Err(MigrateError::Peer(format!(
                "injected fault: connection dropped at {}",
                step.name()
            )))
        }
        Then::Stall => loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        },
    }
}

/// The source's phases. Created at `Precopy` (the journal begun by the
/// driver before anything touches the container).
pub struct SourceMachine {
    journal: Journal,
    fault: Option<Fault>,
    events: Events,
}

impl SourceMachine {
    /// The machine over `journal` (at `Precopy`), with a fault to inject,
    /// saying what it notices to `events`.
    pub fn new(journal: Journal, fault: Option<Fault>, events: Events) -> Self {
        Self {
            journal,
            fault,
            events,
        }
    }

    /// Where the migration stands.
    pub fn phase(&self) -> Step {
        self.journal.step()
    }

    /// The journal, for the driver's own notes in it (a throttle's limit).
    pub fn journal_mut(&mut self) -> &mut Journal {
        &mut self.journal
    }

    /// Fires a fault injected at `Precopy` (the journal already says so).
    pub async fn precopy(&mut self, link: &mut SourceLink) -> Result<()> {
        fire(self.fault, Step::Precopy, &mut link.tx, &self.events).await
    }

    /// `Precopy -> Frozen`: the copy freezes, the target is told.
    pub async fn freeze(
        &mut self,
        link: &mut SourceLink,
        copy: &mut impl SourceCopy,
    ) -> Result<()> {
        enter(&mut self.journal, Step::Frozen)?;
        copy.freeze().await?;
        fire(self.fault, Step::Frozen, &mut link.tx, &self.events).await?;
        link.send(&Message::Frozen).await
    }

    /// `Frozen -> Dumped`: CRIU's images of the frozen copy are ready.
    pub async fn dumped(&mut self, link: &mut SourceLink) -> Result<()> {
        enter(&mut self.journal, Step::Dumped)?;
        fire(self.fault, Step::Dumped, &mut link.tx, &self.events).await
    }

    /// `Dumped -> Sent`: everything has crossed; `Commit` asks the target
    /// to restore a stopped copy, whose acknowledgement this waits for
    /// (the first phase of the commit).
    pub async fn sent(&mut self, link: &mut SourceLink) -> Result<()> {
        enter(&mut self.journal, Step::Sent)?;
        fire(self.fault, Step::Sent, &mut link.tx, &self.events).await?;
        link.send(&Message::Commit).await?;
        link.ack("the target's restore").await
    }

    /// `Sent -> Committed`: the decision, journaled (this copy never runs
    /// again), then `Done`; returns once the target says its copy runs.
    /// From here on a failure is [`MigrateError::InDoubt`]: this copy stays
    /// frozen for `migrate-recover`.
    pub async fn commit(&mut self, link: &mut SourceLink, id: &str) -> Result<()> {
        let in_doubt = in_doubt(id);
        enter(&mut self.journal, Step::Committed).map_err(&in_doubt)?;
        fire(self.fault, Step::Committed, &mut link.tx, &self.events)
            .await
            .map_err(&in_doubt)?;
        link.send(&Message::Done).await.map_err(&in_doubt)?;
        link.ack("the target to run the container")
            .await
            .map_err(in_doubt)
    }

    /// `Committed -> Released`: once the target says all of its copy's
    /// memory is in place, this copy goes, and the journal with it.
    pub async fn release(
        &mut self,
        link: &mut SourceLink,
        copy: &mut impl SourceCopy,
        id: &str,
    ) -> Result<()> {
        // Its memory may still be arriving from its page store: ours stays
        // (frozen) until it is all there.
        link.ack("the target's memory to be in place")
            .await
            .map_err(in_doubt(id))?;
        if let Err(e) = copy.release().await {
            self.events.warn(
                Origin::MigrateOut,
                format!("the container {id} runs on the target; removing it here failed: {e}"),
            );
        }
        enter(&mut self.journal, Step::Released)?;
        fire(self.fault, Step::Released, &mut link.tx, &self.events).await?;
        self.journal.clone().remove();
        Ok(())
    }

    /// Rolls back a migration that has not committed: the copy runs again,
    /// the target is told, the journal goes. Returns the error to report
    /// (the target's own account of it when it gave one).
    pub async fn abort(
        &mut self,
        link: &mut SourceLink,
        copy: &mut impl SourceCopy,
        err: MigrateError,
    ) -> MigrateError {
        let err = link.peer_reason(err).await;
        if !allowed(self.journal.step(), Step::Aborted) {
            // Committed: never thawed on this side's own say.
            return err;
        }
        copy.undo().await;
        let _ = link
            .send(&Message::Abort {
                reason: err.to_string(),
            })
            .await;
        let _ = self.journal.set(Step::Aborted);
        self.journal.clone().remove();
        err
    }
}

/// Turns an error after the commit into an in-doubt one for container `id`.
fn in_doubt(id: &str) -> impl Fn(MigrateError) -> MigrateError + '_ {
    move |e| {
        match e {
        MigrateError::InDoubt(_) => e,
        e => MigrateError::InDoubt(format!(
            "{e}: container {id} stays frozen here until `migrun migrate-recover {id}` settles whether the target's copy runs"
        )),
    }
    }
}

/// The target's phases. Created at `Receiving` (the journal begun when the
/// source's `Start` named the container).
pub struct TargetMachine {
    journal: Journal,
    fault: Option<Fault>,
    events: Events,
}

impl TargetMachine {
    /// The machine over `journal` (at `Receiving`), with a fault to inject;
    /// fires a fault injected at `Receiving`.
    pub fn new(journal: Journal, fault: Option<Fault>, events: Events) -> Result<Self> {
        let machine = Self {
            journal,
            fault,
            events,
        };
        machine.fire_here(Step::Receiving)?;
        Ok(machine)
    }

    /// Where the migration stands.
    pub fn phase(&self) -> Step {
        self.journal.step()
    }

    /// The journal, for the driver's own notes in it.
    pub fn journal_mut(&mut self) -> &mut Journal {
        &mut self.journal
    }

    /// Whether the source may have been told this side's copy is ready:
    /// from then on only the source's decision (or migrate-recover)
    /// removes it.
    pub fn acknowledged(&self) -> bool {
        self.journal.step() >= Step::Acknowledged && self.journal.step() != Step::Aborted
    }

    /// The target's faults (no heartbeat to stop: a drop or stall is a
    /// failure of this side, which the caller handles as one).
    fn fire_here(&self, step: Step) -> Result<()> {
        match fault::at(self.fault, step, &self.events) {
            Then::Go => Ok(()),
            Then::Drop | Then::Stall => Err(MigrateError::Target(format!(
                "injected fault at {}",
                step.name()
            ))),
        }
    }

    /// Journals `to`, then fires a fault injected there.
    fn step(&mut self, to: Step) -> Result<()> {
        enter(&mut self.journal, to)?;
        self.fire_here(to)
    }

    /// `Receiving -> Acknowledged`: the copy here is restored and stopped;
    /// journaled (with whether its memory follows lazily), then the source
    /// is told.
    pub async fn acknowledge(&mut self, ch: &mut Channel, copy: &impl TargetCopy) -> Result<()> {
        let lazy = copy.lazy();
        self.journal.update(|r| r.lazy = lazy)?;
        self.step(Step::Acknowledged)?;
        ch.send(&Message::Ack).await?;
        Ok(())
    }

    /// `Acknowledged -> Continued -> Running`: waits for the source's
    /// commit (`Done`), lets the copy run and says so, waits (with
    /// heartbeats) until all of its memory is in place and says so, and
    /// settles the journal. A copy whose memory could not be completed is
    /// journaled as incomplete: it can never win a recovery.
    pub async fn hand_over(
        &mut self,
        ch: &mut Channel,
        copy: &mut impl TargetCopy,
        peer_timeout: Duration,
    ) -> Result<()> {
        expect_done(ch).await?;
        self.step(Step::Continued)?;
        copy.resume().await?;
        ch.send(&Message::Ack).await?;
        let (filled, _) = with_heartbeats(ch.sender(), peer_timeout, copy.memory_in_place()).await;
        if let Err(e) = filled {
            self.mark_incomplete();
            return Err(e);
        }
        self.step(Step::Running)?;
        // The source may be gone by now: this side is done either way.
        let _ = ch.send(&Message::Ack).await;
        self.journal.clone().remove();
        Ok(())
    }

    /// Marks the copy here incomplete (its lazy memory is lost).
    pub fn mark_incomplete(&mut self) {
        let _ = self.journal.update(|r| r.incomplete = true);
    }

    /// Ends a migration that never got acknowledged: journaled as aborted,
    /// then removed (the caller has undone what it made).
    pub fn abort(&mut self) {
        if allowed(self.journal.step(), Step::Aborted) {
            let _ = self.journal.set(Step::Aborted);
            self.journal.clone().remove();
        }
    }
}

/// Waits for the source's `Done` (its commit) after our first `Ack`.
async fn expect_done(ch: &mut Channel) -> Result<()> {
    loop {
        match ch.recv().await {
            Ok(Message::Heartbeat) => continue,
            Ok(Message::Done) => return Ok(()),
            Ok(Message::Abort { reason }) => return Err(MigrateError::Aborted(reason)),
            Ok(other) => {
                return Err(MigrateError::Protocol(format!(
                    "{} message while waiting for done",
                    other.kind()
                )))
            }
            Err(e) => {
                return Err(MigrateError::Source(format!(
                    "source gone before it committed: {e}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Both machines over an in-memory connection, with copies that only
    //! write down what was done to them.

    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use super::*;
    use crate::journal::{self, Record, Role, Winner};

    const ID: &str = "c1";
    const TIMEOUT: Duration = Duration::from_millis(300);

    type Log = Arc<Mutex<Vec<&'static str>>>;

    fn note(log: &Log, what: &'static str) {
        log.lock().expect("log").push(what);
    }

    fn seen(log: &Log) -> Vec<&'static str> {
        log.lock().expect("log").clone()
    }

    struct FakeSource(Log);

    impl SourceCopy for FakeSource {
        async fn freeze(&mut self) -> Result<()> {
            note(&self.0, "source frozen");
            Ok(())
        }
        async fn undo(&mut self) {
            note(&self.0, "source thawed");
        }
        async fn release(&mut self) -> Result<()> {
            note(&self.0, "source released");
            Ok(())
        }
    }

    struct FakeTarget(Log);

    impl TargetCopy for FakeTarget {
        async fn resume(&mut self) -> Result<()> {
            note(&self.0, "target runs");
            Ok(())
        }
        async fn memory_in_place(&mut self) -> Result<()> {
            note(&self.0, "target memory in place");
            Ok(())
        }
        fn lazy(&self) -> bool {
            true
        }
    }

    /// A record of container [`ID`] written by this process.
    fn record(role: Role, step: Step) -> Record {
        Record {
            pid: std::process::id(),
            ..journal::tests::record(role, step)
        }
    }

    /// The step of `role`'s journal under `root`, `None` once settled and gone.
    fn step_in(root: &Path, role: Role) -> Option<Step> {
        Journal::open(root, role, ID)
            .expect("read journal")
            .map(|j| j.step())
    }

    /// How the test's target behaves.
    #[derive(Clone, Copy, PartialEq)]
    enum Target {
        /// Restores, acknowledges, runs.
        Works,
        /// Its restore fails: it says so and undoes.
        RestoreFails,
        /// Acknowledges, then says nothing more (a silent partition).
        SilentAfterAck,
    }

    async fn target_side(mut ch: Channel, root: PathBuf, log: Log, how: Target) -> Result<()> {
        let journal = Journal::begin(&root, record(Role::Target, Step::Receiving))?;
        let mut m = TargetMachine::new(journal, None, Events::none())?;
        loop {
            match ch.recv().await {
                Ok(Message::Commit) => break,
                Ok(Message::Abort { reason }) => {
                    m.abort();
                    return Err(MigrateError::Aborted(reason));
                }
                Ok(_) => continue,
                Err(e) => {
                    // Not acknowledged: undone on this side's own say.
                    m.abort();
                    return Err(e.into());
                }
            }
        }
        if how == Target::RestoreFails {
            let message = "restore failed".to_string();
            let _ = ch.send(&Message::Error { message }).await;
            m.abort();
            return Err(MigrateError::Target("restore failed".into()));
        }
        let mut copy = FakeTarget(log);
        m.acknowledge(&mut ch, &copy).await?;
        if how == Target::SilentAfterAck {
            tokio::time::sleep(TIMEOUT * 10).await;
            return Err(MigrateError::Target("went silent".into()));
        }
        m.hand_over(&mut ch, &mut copy, TIMEOUT).await
    }

    async fn source_side(ch: Channel, root: PathBuf, log: Log, fault: Option<Fault>) -> Result<()> {
        let journal = Journal::begin(&root, record(Role::Source, Step::Precopy))?;
        let mut m = SourceMachine::new(journal, fault, Events::none());
        let mut link = SourceLink::new(ch, TIMEOUT);
        let mut copy = FakeSource(log);
        let before_commit = async {
            m.precopy(&mut link).await?;
            m.freeze(&mut link, &mut copy).await?;
            m.dumped(&mut link).await?;
            m.sent(&mut link).await
        }
        .await;
        if let Err(e) = before_commit {
            return Err(m.abort(&mut link, &mut copy, e).await);
        }
        m.commit(&mut link, ID).await?;
        m.release(&mut link, &mut copy, ID).await
    }

    struct Run {
        source: Result<()>,
        target: Result<()>,
        log: Vec<&'static str>,
        source_root: tempfile::TempDir,
        target_root: tempfile::TempDir,
    }

    async fn run(fault: Option<Fault>, how: Target) -> Run {
        let key = migrun_wire::Key::generate().expect("key");
        let (a, b) = migrun_wire::pair(&key).await.expect("in-memory pair");
        let source_root = tempfile::tempdir().expect("tmp");
        let target_root = tempfile::tempdir().expect("tmp");
        let log = Log::default();
        let target = tokio::spawn(target_side(
            b,
            target_root.path().to_path_buf(),
            log.clone(),
            how,
        ));
        let source = source_side(a, source_root.path().to_path_buf(), log.clone(), fault).await;
        let target = target.await.expect("target task");
        Run {
            source,
            target,
            log: seen(&log),
            source_root,
            target_root,
        }
    }

    #[tokio::test]
    async fn a_whole_hand_over_runs_the_target_before_the_source_lets_go() {
        let r = run(None, Target::Works).await;
        assert!(r.source.is_ok(), "{:?}", r.source);
        assert!(r.target.is_ok(), "{:?}", r.target);
        assert_eq!(
            r.log,
            [
                "source frozen",
                "target runs",
                "target memory in place",
                "source released"
            ]
        );
        assert_eq!(step_in(r.source_root.path(), Role::Source), None);
        assert_eq!(step_in(r.target_root.path(), Role::Target), None);
    }

    #[tokio::test]
    async fn a_failed_restore_thaws_the_source_and_leaves_no_journal() {
        let r = run(None, Target::RestoreFails).await;
        let err = r.source.expect_err("the source must fail").to_string();
        assert!(err.contains("restore failed"), "{err}");
        assert!(r.target.is_err());
        assert_eq!(r.log, ["source frozen", "source thawed"]);
        assert_eq!(step_in(r.source_root.path(), Role::Source), None);
        assert_eq!(step_in(r.target_root.path(), Role::Target), None);
    }

    #[tokio::test]
    async fn a_connection_dropped_before_the_commit_rolls_back_and_the_target_never_runs() {
        for step in [Step::Precopy, Step::Frozen, Step::Dumped, Step::Sent] {
            let fault = Fault {
                action: fault::Action::Drop,
                step,
            };
            let r = run(Some(fault), Target::Works).await;
            assert!(r.source.is_err() && r.target.is_err(), "at {}", step.name());
            assert!(
                r.log.ends_with(&["source thawed"]) && !r.log.contains(&"target runs"),
                "at {}: {:?}",
                step.name(),
                r.log
            );
            assert_eq!(step_in(r.source_root.path(), Role::Source), None);
            assert_eq!(step_in(r.target_root.path(), Role::Target), None);
        }
    }

    #[tokio::test]
    async fn a_connection_dropped_at_the_commit_leaves_both_copies_in_doubt_and_the_target_wins() {
        let fault = Fault {
            action: fault::Action::Drop,
            step: Step::Committed,
        };
        let r = run(Some(fault), Target::Works).await;
        let err = r.source.expect_err("in doubt");
        assert!(matches!(err, MigrateError::InDoubt(_)), "{err}");
        assert!(r.target.is_err());
        // Neither copy runs, neither is gone: the source's stays frozen,
        // the target's stopped.
        assert_eq!(r.log, ["source frozen"]);
        let source = step_in(r.source_root.path(), Role::Source);
        let target = Journal::open(r.target_root.path(), Role::Target, ID)
            .expect("read")
            .expect("the target's journal stays");
        assert_eq!(source, Some(Step::Committed));
        assert_eq!(target.step(), Step::Acknowledged);
        assert!(target.record().lazy, "the lazy restore is journaled");
        assert_eq!(
            journal::decide(source, Some(target.step()), true),
            Some(Winner::Target)
        );
    }

    #[tokio::test]
    async fn a_target_silent_after_its_acknowledgement_is_found_out_within_the_peer_timeout() {
        let started = Instant::now();
        let r = run(None, Target::SilentAfterAck).await;
        let source_took = started.elapsed();
        let err = r.source.expect_err("in doubt");
        assert!(matches!(err, MigrateError::InDoubt(_)), "{err}");
        assert!(err.to_string().contains("no word from the target"), "{err}");
        // The run waits for the silent target's own end too (ten time-outs).
        assert!(source_took >= TIMEOUT, "{source_took:?}");
        assert_eq!(r.log, ["source frozen"]);
        assert_eq!(
            step_in(r.source_root.path(), Role::Source),
            Some(Step::Committed)
        );
        assert_eq!(
            step_in(r.target_root.path(), Role::Target),
            Some(Step::Acknowledged)
        );
    }

    #[tokio::test]
    async fn phases_only_move_forward() {
        let root = tempfile::tempdir().expect("tmp");
        let journal = Journal::begin(root.path(), record(Role::Source, Step::Precopy)).expect("j");
        let mut m = SourceMachine::new(journal, None, Events::none());
        let key = migrun_wire::Key::generate().expect("key");
        let (a, _b) = migrun_wire::pair(&key).await.expect("pair");
        let mut link = SourceLink::new(a, TIMEOUT);
        let err = m.dumped(&mut link).await.expect_err("precopy to dumped");
        assert!(
            err.to_string()
                .contains("no transition from precopy to dumped"),
            "{err}"
        );
        assert_eq!(m.phase(), Step::Precopy);
        // Once committed, there is no way back to a thaw.
        for from in [
            Step::Committed,
            Step::Released,
            Step::Acknowledged,
            Step::Running,
        ] {
            assert!(!allowed(from, Step::Aborted), "{}", from.name());
        }
        for to in [Step::Precopy, Step::Receiving, Step::Aborted] {
            assert!(!allowed(Step::Released, to) && !allowed(Step::Running, to));
        }
    }
}
