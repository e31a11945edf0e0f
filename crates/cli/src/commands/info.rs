//! `spec`, `state`, `list`, `events`, `features`: commands that print.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use migrun_runtime::state::{render_table, ContainerState};
use migrun_runtime::{
    events as stats_events, features as feature_doc, spec as spec_file, StateRoot,
};

use crate::cli::TableOrJson;

/// Prints `value` as pretty JSON.
fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `migrun spec [--bundle DIR] [--rootless]`.
pub fn spec(bundle: &Path, rootless: bool) -> Result<i32> {
    spec_file::write_default(bundle, rootless)?;
    Ok(0)
}

/// `migrun state ID`.
pub fn state(root: &StateRoot, id: &str) -> Result<i32> {
    let container = root.load(id)?;
    print_json(&ContainerState::of(root, &container))?;
    Ok(0)
}

/// `migrun list [-f table|json] [-q]`.
pub fn list(root: &StateRoot, format: TableOrJson, quiet: bool) -> Result<i32> {
    let mut states = Vec::new();
    for id in root.ids()? {
        // A container removed while listing is skipped, as runc does.
        if let Ok(container) = root.load(&id) {
            states.push(ContainerState::of(root, &container));
        }
    }
    if quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(0);
    }
    match format {
        TableOrJson::Table => print!("{}", render_table(&states)),
        TableOrJson::Json => println!("{}", serde_json::to_string(&states)?),
    }
    Ok(0)
}

/// Parses runc's interval ("5s", "500ms", "1m", or plain seconds).
fn parse_interval(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| t.split_at(i))
        .unwrap_or((t, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid interval {text:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("invalid interval {text:?}"),
    };
    if secs <= 0.0 {
        bail!("invalid interval {text:?}: must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `migrun events [--stats] [--interval D] ID`.
pub fn events(root: &StateRoot, id: &str, once: bool, interval: &str) -> Result<i32> {
    let interval = parse_interval(interval)?;
    loop {
        let event = stats_events::stats(root, id)?;
        println!("{}", serde_json::to_string(&event)?);
        if once {
            return Ok(0);
        }
        std::thread::sleep(interval);
    }
}

/// `migrun features`.
pub fn features() -> Result<i32> {
    print_json(&feature_doc::document())?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_interval;
    use std::time::Duration;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5s").ok(), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_interval("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_interval("2").ok(), Some(Duration::from_secs(2)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("fast").is_err());
    }
}
