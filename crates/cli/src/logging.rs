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

/// One logrus line in `format` (without the newline): `time="..."
/// level=error msg="..."`, or `{"level":"error","msg":"...","time":"..."}`.
pub fn line(format: LogFormat, level: &Level, msg: &str) -> String {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    match format {
        LogFormat::Json => serde_json::json!({
            "level": level_name(level),
            "msg": msg,
            "time": time,
        })
        .to_string(),
        LogFormat::Text => format!("time={time:?} level={} msg={msg:?}", level_name(level)),
    }
}

/// Writes an error line in logrus' text format to standard error.
pub fn error_to_stderr(msg: &str) {
    let mut text = line(LogFormat::Text, &Level::ERROR, msg);
    text.push('\n');
    let _ = std::io::stderr().write_all(text.as_bytes());
}

impl LogLayer {
    /// Writes a line for `level` straight away.
    pub fn write(&self, level: &Level, msg: &str) {
        let mut line = line(self.format, level, msg);
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

    /// Reports a command's failure, as runc does, in a line that tools
    /// scraping standard error recognise by its `level=error`: without
    /// `--log`, standard error gets the line in `--log-format` (runc's
    /// output exactly); with `--log`, the file gets it in its format
    /// (containerd reads the last JSON error there) and standard error
    /// gets it in the text format (where runc prints the bare message).
    pub fn error(&self, msg: &str) {
        self.write(&Level::ERROR, msg);
        if !matches!(self.sink, Sink::Stderr) {
            error_to_stderr(msg);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_logrus_text_and_json() {
        let text = line(
            LogFormat::Text,
            &Level::ERROR,
            "container \"x\" does not exist",
        );
        assert!(text.starts_with("time=\""), "{text}");
        assert!(
            text.ends_with(r#"" level=error msg="container \"x\" does not exist""#),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&line(LogFormat::Json, &Level::WARN, "m")).expect("json");
        assert_eq!(json["level"], "warning");
        assert_eq!(json["msg"], "m");
        assert!(json["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
