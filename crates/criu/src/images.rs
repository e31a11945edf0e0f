//! The files of an image directory that migrun itself reads and writes.

use std::fs;
use std::path::Path;

use crate::{io_err, CriuError, Result};

/// File recording where the checkpointed init's stdio pointed (runc's name).
pub const DESCRIPTORS_FILE: &str = "descriptors.json";

/// A file that makes a lazy dump by migrun's CRIU build
/// (hack/criu-patches/0002) leave the lazy pages out of its page pipes:
/// for a dump whose lazy pages nobody will ask CRIU for (migrun's page
/// store serves them), that copy is pure downtime, about 150 ms per GiB.
/// Another CRIU ignores the file.
pub const LAZY_NO_DRAIN_MARKER: &str = "migrun-lazy-no-drain";

/// Records what fds 0, 1 and 2 of `pid` point to.
pub fn save_descriptors(image_dir: &Path, pid: i32) -> Result<()> {
    let descriptors: Vec<String> = (0..3)
        .map(|fd| {
            fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/dev/null".to_string())
        })
        .collect();
    let path = image_dir.join(DESCRIPTORS_FILE);
    let text = serde_json::to_string(&descriptors).unwrap_or_else(|_| "[]".into());
    fs::write(&path, text).map_err(io_err(format!("write {}", path.display())))
}

/// Reads the recorded stdio targets (empty when the file is absent).
pub fn load_descriptors(image_dir: &Path) -> Result<Vec<String>> {
    let path = image_dir.join(DESCRIPTORS_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| CriuError::BadImages(format!("corrupted {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
    }
}

/// Checks that `image_dir` holds a checkpoint before CRIU is asked to restore it.
pub fn check_image_dir(image_dir: &Path) -> Result<()> {
    if !image_dir.is_dir() {
        return Err(CriuError::BadImages(format!(
            "image directory {} does not exist",
            image_dir.display()
        )));
    }
    let inventory = image_dir.join("inventory.img");
    let meta = fs::metadata(&inventory).map_err(|_| {
        CriuError::BadImages(format!(
            "no checkpoint in {}: inventory.img is missing",
            image_dir.display()
        ))
    })?;
    // CRIU images start with a 4-byte magic pair; an inventory shorter than
    // its header cannot be a checkpoint.
    if meta.len() < 12 {
        return Err(CriuError::BadImages(format!(
            "corrupted checkpoint in {}: inventory.img is truncated",
            image_dir.display()
        )));
    }
    Ok(())
}

/// Checks that `dir` can be created and written, before anything is frozen.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Err(e) = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(CriuError::Io {
            context: format!("image path {} is not writable", dir.display()),
            source: e,
        });
    }
    let probe = dir.join(".migrun-write-probe");
    fs::write(&probe, b"x").map_err(|e| CriuError::Io {
        context: format!("image path {} is not writable", dir.display()),
        source: e,
    })?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// The first line of a CRIU log that reports an error, if any.
pub fn first_error_line(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    text.lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        // CRIU reports failing to raise its own descriptor limit as an
        // error but carries on: it is never the cause. Nor is `ip addr
        // restore` finding loopback's addresses already there (the kernel
        // adds them when lo comes up): "Error: ipv4: Address already
        // assigned." is in the log of every restore of a namespace with lo up.
        .find(|l| {
            !l.contains("rlimit:") && !l.to_ascii_lowercase().contains("address already assigned")
        })
        .map(|l| {
            // Drop the "(00.012345) " timestamp prefix.
            let l = l.trim();
            match l.find(") ") {
                Some(i) if l.starts_with('(') => l[i + 2..].to_string(),
                _ => l.to_string(),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_corrupt_dirs_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = check_image_dir(dir.path()).expect_err("empty");
        assert!(
            err.to_string().contains("inventory.img is missing"),
            "{err}"
        );
        fs::write(dir.path().join("inventory.img"), b"junk").expect("write");
        let err = check_image_dir(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(check_image_dir(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn descriptors_round_trip() {
        let dir = tempfile::tempdir().expect("tmp");
        save_descriptors(dir.path(), std::process::id() as i32).expect("save");
        assert_eq!(load_descriptors(dir.path()).expect("load").len(), 3);
    }

    #[test]
    fn error_line_is_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("dump.log");
        fs::write(
            &log,
            "(00.001) ok\n(00.002) Error (criu/mount.c:1): mnt: boom\n",
        )
        .expect("w");
        assert_eq!(
            first_error_line(&log).as_deref(),
            Some("Error (criu/mount.c:1): mnt: boom")
        );
    }

    #[test]
    fn harmless_errors_are_passed_over() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("restore.log");
        fs::write(
            &log,
            "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self
             Error: ipv4: Address already assigned.
             Error: ipv6: address already assigned.
             (00.050) Error (criu/files-reg.c:1): Can't open file x
",
        )
        .expect("w");
        assert_eq!(
            first_error_line(&log).as_deref(),
            Some("Error (criu/files-reg.c:1): Can't open file x")
        );
    }
}
