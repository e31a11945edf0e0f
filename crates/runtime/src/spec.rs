//! `spec`: a default config.json, as `runc spec` writes it.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::error::{Context, Result, RuntimeError};

/// Writes a default (or rootless) config.json into `bundle` and returns its path.
///
/// Like runc, it refuses to overwrite an existing config.json. The default
/// process is `sh` with a terminal, as in runc's template.
pub fn write_default(bundle: &Path, rootless: bool) -> Result<PathBuf> {
    let path = bundle.join("config.json");
    if path.exists() {
        return Err(RuntimeError::InvalidInput(format!(
            "{} exists: remove it first",
            path.display()
        )));
    }
    let mut spec = if rootless {
        Spec::rootless(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    } else {
        Spec::default()
    };
    if let Some(mut process) = spec.process().clone() {
        process.set_terminal(Some(true));
        spec.set_process(Some(process));
    }
    let text = serde_json::to_string_pretty(&spec)
        .map_err(|e| RuntimeError::InvalidInput(e.to_string()))?;
    fs::write(&path, text + "\n").ctx(|| format!("write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_once_then_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_default(dir.path(), false).expect("first write");
        let spec: Spec =
            serde_json::from_str(&fs::read_to_string(&path).expect("read")).expect("parse");
        assert_eq!(
            spec.process().as_ref().and_then(|p| p.args().clone()),
            Some(vec!["sh".to_string()])
        );
        assert!(write_default(dir.path(), false).is_err());
    }

    #[test]
    fn rootless_has_user_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_default(dir.path(), true).expect("write");
        let text = fs::read_to_string(path).expect("read");
        assert!(text.contains("\"user\""), "{text}");
        assert!(text.contains("uidMappings"), "{text}");
    }
}
