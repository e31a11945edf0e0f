//! Signal names and numbers as `runc kill` accepts them.

use nix::sys::signal::Signal;

use crate::error::{Result, RuntimeError};

/// Parses `KILL`, `SIGKILL`, `kill` or `9` into a signal.
pub fn parse(text: &str) -> Result<Signal> {
    let bad = || RuntimeError::InvalidSignal(text.to_string());
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("KILL").ok(), Some(Signal::SIGKILL));
        assert_eq!(parse("SIGTERM").ok(), Some(Signal::SIGTERM));
        assert_eq!(parse("term").ok(), Some(Signal::SIGTERM));
        assert_eq!(parse("9").ok(), Some(Signal::SIGKILL));
        assert_eq!(parse("10").ok(), Some(Signal::SIGUSR1));
        assert!(parse("NOPE").is_err());
        assert!(parse("99").is_err());
    }
}
