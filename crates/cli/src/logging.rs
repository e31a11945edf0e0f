//! Logs where `--log` says, in the format `--log-format` says.
//!
//! containerd reads a failed runtime command's log file and shows the last
//! `"level":"error"` entry's `msg`; the JSON lines here follow runc's (logrus)
//! shape for that reason: `{"level":"error","msg":"...","time":"..."}`.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use crate::cli::LogFormat;

/// Where log lines go.
enum Sink {
    File(Mutex<File>),
    Stderr,
}

/// A tracing layer writing logrus-shaped lines.
pub struct LogLayer {
    sink: Sink,
    format: LogFormat,
    max_level: Level,
}

/// Collects an event's message and fields into one string.
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

/// logrus' name of a level.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

impl LogLayer {
    /// Formats one line (without the newline).
    fn line(&self, level: &Level, msg: &str) -> String {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        match self.format {
            LogFormat::Json => serde_json::json!({
                "level": level_name(level),
                "msg": msg,
                "time": time,
            })
            .to_string(),
            LogFormat::Text => format!("time={time:?} level={} msg={msg:?}", level_name(level)),
        }
    }

    /// Writes a line for `level` straight away (used for the final error).
    pub fn write(&self, level: &Level, msg: &str) {
        let mut line = self.line(level, msg);
        line.push('\n');
        match &self.sink {
            Sink::File(file) => {
                if let Ok(mut f) = file.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            Sink::Stderr => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    /// Whether the sink is standard error.
    pub fn is_stderr(&self) -> bool {
        matches!(self.sink, Sink::Stderr)
    }
}

impl<S: Subscriber> Layer<S> for LogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = event.metadata().level();
        if *level > self.max_level {
            return;
        }
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        let msg = format!("{}{}", visitor.message, visitor.fields);
        self.write(level, &msg);
    }
}

/// Opens the log sink, installs the layer as the global subscriber and
/// returns a second handle for writing the final error line.
pub fn init(log: Option<&Path>, format: LogFormat, debug: bool) -> std::io::Result<LogLayer> {
    let open = |path: &Path| -> std::io::Result<Sink> {
        Ok(Sink::File(Mutex::new(
            OpenOptions::new().create(true).append(true).open(path)?,
        )))
    };
    // On standard error only --debug shows library events: a failing command
    // prints exactly one error line there. A log file records warnings too.
    let (sink, sink2, max_level) = match log {
        Some(path) => (
            open(path)?,
            open(path)?,
            if debug { Level::DEBUG } else { Level::WARN },
        ),
        None if debug => (Sink::Stderr, Sink::Stderr, Level::DEBUG),
        None => {
            return Ok(LogLayer {
                sink: Sink::Stderr,
                format,
                max_level: Level::ERROR,
            })
        }
    };
    let layer = LogLayer {
        sink,
        format,
        max_level,
    };
    let subscriber = tracing_subscriber::registry().with(layer);
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(LogLayer {
        sink: sink2,
        format,
        max_level,
    })
}
