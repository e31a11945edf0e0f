//! Mounting containerd's rootfs mounts (overlay from the overlayfs
//! snapshotter, bind from the native one) on `<bundle>/rootfs`.
//!
//! containerd-shim's own helper forks a child for each mount and waits for
//! it through that crate's reaper; this shim reaps its children itself, so
//! it mounts directly (the shim's working directory never changes).

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::error::{Result, ShimError};

/// How an option changes the mount flags: set them, or clear them.
fn flag(option: &str) -> Option<(bool, MsFlags)> {
    Some(match option {
        "defaults" => (true, MsFlags::empty()),
        "ro" => (true, MsFlags::MS_RDONLY),
        "rw" => (false, MsFlags::MS_RDONLY),
        "nosuid" => (true, MsFlags::MS_NOSUID),
        "suid" => (false, MsFlags::MS_NOSUID),
        "nodev" => (true, MsFlags::MS_NODEV),
        "dev" => (false, MsFlags::MS_NODEV),
        "noexec" => (true, MsFlags::MS_NOEXEC),
        "exec" => (false, MsFlags::MS_NOEXEC),
        "sync" => (true, MsFlags::MS_SYNCHRONOUS),
        "async" => (false, MsFlags::MS_SYNCHRONOUS),
        "noatime" => (true, MsFlags::MS_NOATIME),
        "atime" => (false, MsFlags::MS_NOATIME),
        "nodiratime" => (true, MsFlags::MS_NODIRATIME),
        "diratime" => (false, MsFlags::MS_NODIRATIME),
        "relatime" => (true, MsFlags::MS_RELATIME),
        "norelatime" => (false, MsFlags::MS_RELATIME),
        "strictatime" => (true, MsFlags::MS_STRICTATIME),
        "bind" => (true, MsFlags::MS_BIND),
        "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
        "private" => (true, MsFlags::MS_PRIVATE),
        "rprivate" => (true, MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "slave" => (true, MsFlags::MS_SLAVE),
        "rslave" => (true, MsFlags::MS_SLAVE | MsFlags::MS_REC),
        _ => return None,
    })
}

/// Splits mount options into flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match flag(o) {
            Some((true, f)) => flags |= f,
            Some((false, f)) => flags &= !f,
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// Mounts one of containerd's mounts on `target`.
pub fn mount_one(typ: &str, source: &str, options: &[String], target: &Path) -> Result<()> {
    let (flags, data) = parse_options(options);
    let err = |e: nix::Error| {
        ShimError::Internal(format!("mount {typ} {source} on {}: {e}", target.display()))
    };
    let propagation =
        MsFlags::MS_SHARED | MsFlags::MS_PRIVATE | MsFlags::MS_SLAVE | MsFlags::MS_UNBINDABLE;
    let base = flags & !propagation;
    let typ_opt = Some(typ).filter(|t| !t.is_empty() && *t != "bind");
    let data_opt = Some(data.as_str()).filter(|d| !d.is_empty());
    mount(Some(source), target, typ_opt, base, data_opt).map_err(err)?;
    // A bind mount takes read-only (and the like) only on a remount.
    if flags.contains(MsFlags::MS_BIND)
        && flags.intersects(
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )
    {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            base | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(err)?;
    }
    let prop = flags & (propagation | MsFlags::MS_REC);
    if prop.intersects(propagation) {
        mount(None::<&str>, target, None::<&str>, prop, None::<&str>).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_go_to_data() {
        let opts: Vec<String> = [
            "index=off",
            "ro",
            "lowerdir=/a:/b",
            "upperdir=/u",
            "workdir=/w",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_RDONLY);
        assert_eq!(data, "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w");
    }

    #[test]
    fn rw_clears_ro_and_rbind_is_recursive() {
        let opts: Vec<String> = ["ro", "rw", "rbind"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(data.is_empty());
    }
}
