//! Shows the migration engine's events on stderr: one line each, worded as
//! scripts and tests expect them (`round  3: ...`, `migrate-in: listening
//! on ...`, `migrate-in: restored ...`), and on a terminal a progress bar
//! for the round under way, redrawn in place and cleared by the next line.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use migrun_migrate::events::{Event, Events};

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 40;
/// Clears a terminal's current line (carriage return, erase line).
const CLEAR_LINE: &str = "\r\x1b[2K";

/// Events rendered on this process's stderr (with the progress bar when
/// stderr is a terminal).
pub fn stderr_events() -> Events {
    let terminal = std::io::stderr().is_terminal();
    let renderer = Mutex::new(Renderer::new(std::io::stderr(), terminal));
    Events::new(move |e| {
        renderer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .render(e);
    })
}

/// Writes events to `out` as text.
pub struct Renderer<W> {
    out: W,
    /// Whether `out` is a terminal: then progress is drawn as a bar.
    terminal: bool,
    /// Whether a bar is on the current line (to be cleared first).
    bar_drawn: bool,
}

impl<W: Write> Renderer<W> {
    /// A renderer writing to `out`, a terminal or not.
    pub fn new(out: W, terminal: bool) -> Self {
        Self {
            out,
            terminal,
            bar_drawn: false,
        }
    }

    /// Writes `e`: its line, or (on a terminal) the progress bar redrawn.
    /// Write errors are ignored: there is nowhere left to report them.
    pub fn render(&mut self, e: &Event) {
        let text = match e {
            Event::RoundProgress { done, total } => {
                if !self.terminal {
                    return;
                }
                self.bar_drawn = true;
                bar(*done, *total)
            }
            _ => {
                // A round's line always starts by clearing the line on a
                // terminal (its bar is there); any other line when a bar is.
                let clear = self.terminal && (self.bar_drawn || matches!(e, Event::Round { .. }));
                self.bar_drawn = false;
                let Some(line) = line(e) else {
                    return;
                };
                format!("{}{line}\n", if clear { CLEAR_LINE } else { "" })
            }
        };
        // One write for the whole line: lines of threads do not mix.
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }

    /// What was written (tests).
    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }
}

/// The progress bar after `done` of `total` pages, drawn over the current
/// line: `\r[#####-----]  42% 420/1000 pages`.
pub fn bar(done: u64, total: u64) -> String {
    let frac = (done as f64 / total.max(1) as f64).min(1.0);
    let filled = ((frac * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    format!(
        "\r[{}{}] {:>3.0}% {}/{} pages",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        frac * 100.0,
        done,
        total
    )
}

/// The line that shows `e`, without its newline; `None` for progress,
/// which is drawn as a bar (see [`bar`]).
pub fn line(e: &Event) -> Option<String> {
    let memory_follows = |lazy: bool| {
        if lazy {
            " (memory follows from the page store)"
        } else {
            ""
        }
    };
    Some(match e {
        Event::Round {
            figures: r,
            estimate_ms,
        } => format!(
            "round {:>2}{}: sent {} pages ({} zero), dirtied {} pages, {:.0} pages/s dirty rate, {:.0} Mbit/s, est. downtime {:.0} ms",
            r.round,
            if r.frozen { " (frozen)" } else { "" },
            r.pages_sent,
            r.pages_zero,
            r.pages_dirtied,
            r.dirty_rate_pages_per_s,
            r.bandwidth_mbit,
            estimate_ms
        ),
        Event::RoundProgress { .. } => return None,
        Event::Throttled { round, cpu_share } => format!(
            "round {round:>2}: dirtying faster than the link carries: container throttled to {:.1}% of a CPU",
            cpu_share * 100.0
        ),
        Event::Listening { addr } => format!("migrate-in: listening on {addr}"),
        Event::InterruptedIdle { signal } => {
            format!("migrate-in: {signal}: no migration in progress; exiting")
        }
        Event::InterruptedAcknowledged { signal } => format!(
            "migrate-in: {signal}: the container is acknowledged to the source; finishing the hand-over"
        ),
        Event::ConnectionRefused { error } => {
            format!("migrate-in: refused a connection: {error}")
        }
        Event::Overlay { layers, to_receive } => format!(
            "migrate-in: overlay root filesystem: {layers} layers, {to_receive} to receive"
        ),
        Event::DockerContainer {
            name,
            image_present,
            layers_to_receive,
            layers,
        } => format!(
            "migrate-in: Docker container {name}: image {}, {layers_to_receive} of {layers} layers to receive",
            if *image_present { "present" } else { "missing" }
        ),
        Event::Receiving {
            container,
            processes,
            resident_pages,
            rootfs_bytes,
        } => format!(
            "migrate-in: receiving container {container}: {processes} processes, {resident_pages} resident pages, {} MiB of files",
            rootfs_bytes >> 20
        ),
        Event::ImageLoaded { image } => format!("migrate-in: image {image} loaded"),
        Event::Restoring { container } => format!("migrate-in: restoring {container}"),
        Event::Restored {
            container,
            total_ms,
            overlay_ms,
            memory_setup_ms,
            criu_ms,
            network_ms,
            lazy,
        } => format!(
            "migrate-in: restored {container} in {total_ms:.0} ms (overlay {overlay_ms:.0}, memory set-up {memory_setup_ms:.0}, criu restore {criu_ms:.0}, network {network_ms:.0} ms){}",
            memory_follows(*lazy)
        ),
        Event::DockerRestored {
            name,
            container_id,
            total_ms,
            lazy,
        } => format!(
            "migrate-in: restored {name} ({container_id:.12}) through Docker in {total_ms:.0} ms{}",
            memory_follows(*lazy)
        ),
        Event::MemoryInPlace {
            container,
            pages,
            ms,
        } => format!(
            "migrate-in: memory of {container} in place: {pages} pages in {ms:.0} ms after the restore"
        ),
        Event::VethUnattached {
            container,
            inside,
            outside,
        } => format!(
            "migrate-in: {container}: outside end {outside} of {inside} left unattached (no --bridge)"
        ),
        Event::MigrationDone { container } => {
            format!("migrate-in: container {container} restored and running")
        }
        Event::MigrationFailed { error } => format!("migrate-in: migration failed: {error}"),
        Event::StaleUndone { container } => format!(
            "migrate-in: undoing the migration of {container} that was cut off while receiving"
        ),
        Event::StaleInDoubt { container, step } => format!(
            "migrate-in: the migration of {container} is in doubt ({}): its copy here stays stopped until `migrun migrate-recover {container}`",
            step.name()
        ),
        Event::LeftoverRemoved { what } => {
            format!("migrate-in: removed {what}, left by an earlier failed migration")
        }
        Event::WaitingForPeer { addr } => {
            format!("migrate-recover: waiting for the peer on {addr}")
        }
        Event::PeerUnreachable { error } => {
            format!("migrate-recover: could not ask the peer: {error}")
        }
        Event::OrphanDumpEnded { pid } => format!(
            "migrate-recover: ending the CRIU dump ({pid}) left by the dead migrate-out"
        ),
        Event::Settled { what } => format!("migrate-recover: {what}"),
        Event::FaultInjected { fault } => format!(
            "migrun: injected fault: {:?} at {}",
            fault.action,
            fault.step.name()
        ),
        Event::Warning { origin, message } => format!("{}: {message}", origin.name()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrun_migrate::events::Origin;
    use migrun_migrate::fault::{Action, Fault};
    use migrun_migrate::journal::Step;
    use migrun_migrate::stats::RoundFigures;

    /// What a renderer writes for `events`, to a terminal or not.
    fn rendered(terminal: bool, events: &[Event]) -> String {
        let mut r = Renderer::new(Vec::new(), terminal);
        for e in events {
            r.render(e);
        }
        String::from_utf8(r.into_inner()).expect("utf-8")
    }

    fn round(n: u32, frozen: bool) -> Event {
        Event::Round {
            figures: RoundFigures {
                round: n,
                pages_sent: 1200,
                pages_zero: 34,
                pages_dirtied: 560,
                bytes: 0,
                duration_ms: 0.0,
                dirty_rate_pages_per_s: 1234.4,
                bandwidth_mbit: 941.6,
                frozen,
            },
            estimate_ms: 12.4,
        }
    }

    #[test]
    fn rounds_and_throttling_read_as_before() {
        let out = rendered(
            false,
            &[
                round(3, false),
                Event::RoundProgress { done: 5, total: 10 },
                Event::Throttled {
                    round: 3,
                    cpu_share: 0.125,
                },
                round(12, true),
            ],
        );
        assert_eq!(
            out,
            "round  3: sent 1200 pages (34 zero), dirtied 560 pages, 1234 pages/s dirty rate, 942 Mbit/s, est. downtime 12 ms\n\
             round  3: dirtying faster than the link carries: container throttled to 12.5% of a CPU\n\
             round 12 (frozen): sent 1200 pages (34 zero), dirtied 560 pages, 1234 pages/s dirty rate, 942 Mbit/s, est. downtime 12 ms\n"
        );
    }

    #[test]
    fn a_terminal_gets_a_bar_that_the_next_line_clears() {
        let out = rendered(
            true,
            &[
                round(0, false),
                Event::RoundProgress {
                    done: 256,
                    total: 1024,
                },
                Event::RoundProgress {
                    done: 1100,
                    total: 1024,
                },
                round(1, false),
                Event::RoundProgress { done: 1, total: 2 },
                Event::FaultInjected {
                    fault: Fault {
                        action: Action::Crash,
                        step: Step::Frozen,
                    },
                },
                Event::Settled { what: "x".into() },
            ],
        );
        let line0 = line(&round(0, false)).expect("a line");
        let line1 = line(&round(1, false)).expect("a line");
        assert_eq!(
            out,
            format!(
                "\r\x1b[2K{line0}\n\
                 \r[##########------------------------------]  25% 256/1024 pages\
                 \r[########################################] 100% 1100/1024 pages\
                 \r\x1b[2K{line1}\n\
                 \r[####################--------------------]  50% 1/2 pages\
                 \r\x1b[2Kmigrun: injected fault: Crash at frozen\n\
                 migrate-recover: x\n"
            )
        );
    }

    #[test]
    fn no_bar_when_not_a_terminal() {
        let out = rendered(false, &[Event::RoundProgress { done: 1, total: 0 }]);
        assert_eq!(out, "");
        assert_eq!(
            bar(0, 0),
            format!("\r[{}]   0% 0/0 pages", "-".repeat(BAR_WIDTH))
        );
    }

    #[test]
    fn target_lines_read_as_before() {
        let cases = [
            (
                Event::Listening {
                    addr: "10.0.0.2:7000".into(),
                },
                "migrate-in: listening on 10.0.0.2:7000",
            ),
            (
                Event::Receiving {
                    container: "c1".into(),
                    processes: 3,
                    resident_pages: 4096,
                    rootfs_bytes: (5 << 20) + 17,
                },
                "migrate-in: receiving container c1: 3 processes, 4096 resident pages, 5 MiB of files",
            ),
            (
                Event::Overlay {
                    layers: 4,
                    to_receive: 1,
                },
                "migrate-in: overlay root filesystem: 4 layers, 1 to receive",
            ),
            (
                Event::DockerContainer {
                    name: "web".into(),
                    image_present: false,
                    layers_to_receive: 2,
                    layers: 5,
                },
                "migrate-in: Docker container web: image missing, 2 of 5 layers to receive",
            ),
            (
                Event::DockerContainer {
                    name: "web".into(),
                    image_present: true,
                    layers_to_receive: 0,
                    layers: 5,
                },
                "migrate-in: Docker container web: image present, 0 of 5 layers to receive",
            ),
            (
                Event::ImageLoaded {
                    image: "sha256:ab".into(),
                },
                "migrate-in: image sha256:ab loaded",
            ),
            (
                Event::Restoring {
                    container: "c1".into(),
                },
                "migrate-in: restoring c1",
            ),
            (
                Event::Restored {
                    container: "c1".into(),
                    total_ms: 181.6,
                    overlay_ms: 0.2,
                    memory_setup_ms: 20.4,
                    criu_ms: 150.4,
                    network_ms: 10.4,
                    lazy: true,
                },
                "migrate-in: restored c1 in 182 ms (overlay 0, memory set-up 20, criu restore 150, network 10 ms) (memory follows from the page store)",
            ),
            (
                Event::Restored {
                    container: "c1".into(),
                    total_ms: 99.0,
                    overlay_ms: 1.0,
                    memory_setup_ms: 2.0,
                    criu_ms: 3.0,
                    network_ms: 4.0,
                    lazy: false,
                },
                "migrate-in: restored c1 in 99 ms (overlay 1, memory set-up 2, criu restore 3, network 4 ms)",
            ),
            (
                Event::DockerRestored {
                    name: "web".into(),
                    container_id: "0123456789abcdef0123".into(),
                    total_ms: 420.4,
                    lazy: false,
                },
                "migrate-in: restored web (0123456789ab) through Docker in 420 ms",
            ),
            (
                Event::MemoryInPlace {
                    container: "c1".into(),
                    pages: 65536,
                    ms: 1234.4,
                },
                "migrate-in: memory of c1 in place: 65536 pages in 1234 ms after the restore",
            ),
            (
                Event::VethUnattached {
                    container: "c1".into(),
                    inside: "eth0".into(),
                    outside: "mr1234".into(),
                },
                "migrate-in: c1: outside end mr1234 of eth0 left unattached (no --bridge)",
            ),
            (
                Event::MigrationDone {
                    container: "c1".into(),
                },
                "migrate-in: container c1 restored and running",
            ),
            (
                Event::MigrationFailed {
                    error: "boom".into(),
                },
                "migrate-in: migration failed: boom",
            ),
            (
                Event::InterruptedIdle { signal: "SIGTERM" },
                "migrate-in: SIGTERM: no migration in progress; exiting",
            ),
            (
                Event::InterruptedAcknowledged { signal: "SIGINT" },
                "migrate-in: SIGINT: the container is acknowledged to the source; finishing the hand-over",
            ),
            (
                Event::ConnectionRefused {
                    error: "bad key".into(),
                },
                "migrate-in: refused a connection: bad key",
            ),
            (
                Event::StaleUndone {
                    container: "c1".into(),
                },
                "migrate-in: undoing the migration of c1 that was cut off while receiving",
            ),
            (
                Event::StaleInDoubt {
                    container: "c1".into(),
                    step: Step::Acknowledged,
                },
                "migrate-in: the migration of c1 is in doubt (acknowledged): its copy here stays stopped until `migrun migrate-recover c1`",
            ),
            (
                Event::LeftoverRemoved {
                    what: "image sha256:ab".into(),
                },
                "migrate-in: removed image sha256:ab, left by an earlier failed migration",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(rendered(false, &[e]), format!("{want}\n"));
        }
    }

    #[test]
    fn recovery_and_notices_read_as_before() {
        let cases = [
            (
                Event::WaitingForPeer {
                    addr: "0.0.0.0:7001".into(),
                },
                "migrate-recover: waiting for the peer on 0.0.0.0:7001",
            ),
            (
                Event::PeerUnreachable {
                    error: "refused".into(),
                },
                "migrate-recover: could not ask the peer: refused",
            ),
            (
                Event::OrphanDumpEnded { pid: 4242 },
                "migrate-recover: ending the CRIU dump (4242) left by the dead migrate-out",
            ),
            (
                Event::Settled {
                    what: "c1 runs here (the target)".into(),
                },
                "migrate-recover: c1 runs here (the target)",
            ),
            (
                Event::FaultInjected {
                    fault: Fault {
                        action: Action::Drop,
                        step: Step::Committed,
                    },
                },
                "migrun: injected fault: Drop at committed",
            ),
            (
                Event::Warning {
                    origin: Origin::MigrateOut,
                    message: "the container runs on the target; removing it here failed: x".into(),
                },
                "migrate-out: the container runs on the target; removing it here failed: x",
            ),
            (
                Event::Warning {
                    origin: Origin::MigrateIn,
                    message: "e: restoring with complete images instead".into(),
                },
                "migrate-in: e: restoring with complete images instead",
            ),
            (
                Event::Warning {
                    origin: Origin::Migrun,
                    message: "skipping journal: bad".into(),
                },
                "migrun: skipping journal: bad",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(rendered(false, &[e]), format!("{want}\n"));
        }
    }
}
