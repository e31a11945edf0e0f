//! A manifest from the source (`Message::Manifest`, JSON) as the target
//! takes it: `rootfs::check_manifest`, then, like a round, every file it
//! lists begun in a scratch tree and the manifest applied there
//! (`rootfs::Applied::apply`, through the confined `tree::Tree`).
//!
//! Checks: no panic; errors are one line; whatever the manifest says, and
//! whatever links it makes, nothing outside the scratch tree changes (a
//! canary file and directory beside it stay as they were, and the scratch
//! tree's parent holds nothing else); every path accepted decodes to
//! components that cannot leave a tree. Also: the name escape is exact.

#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use migrun_migrate::rootfs::{self, Applied, Kind, Snapshot};
use migrun_migrate::tree::{self, Tree};

/// This process's sandbox: `base/tree` is written, `base/canary` and
/// `base/canary-dir/` must never change.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        // libFuzzer ends a process without unwinding: sandboxes of earlier
        // processes that are gone are removed here.
        let tmp = std::env::temp_dir();
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("migrun-fuzz-manifest-") {
                if !std::path::Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let base = tmp.join(format!("migrun-fuzz-manifest-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("canary-dir")).expect("create the sandbox");
        fs::write(base.join("canary"), b"canary").expect("write the canary");
        base
    })
}

fn one_line(e: impl std::fmt::Display) {
    let line = e.to_string();
    assert!(
        !line.contains('\n'),
        "error of more than one line: {line:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    // The escape of names that are not UTF-8 is exact.
    let enc = tree::encode_name(data);
    assert_eq!(tree::decode_name(&enc).as_deref(), Some(data), "{enc:?}");

    let Ok(manifest) = serde_json::from_slice::<Snapshot>(data) else {
        return;
    };
    if let Err(e) = rootfs::check_manifest(&manifest) {
        one_line(e);
        return;
    }
    for rel in manifest.keys() {
        let names = tree::check_rel(rel).expect("check_manifest accepted an unsafe path");
        for n in names {
            let b = n.as_bytes();
            assert!(!b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/'));
        }
    }
    if manifest.len() > 64 {
        return; // keeps an execution short; the checks above ran
    }
    let base = base();
    let scratch = base.join("tree");
    let _ = fs::remove_dir_all(&scratch);
    let t = Tree::create(&scratch).expect("create the scratch tree");
    let mut applied = Applied::default();
    // A round's data: every file the manifest lists begins, small.
    for (rel, e) in &manifest {
        if e.kind == Kind::File {
            match t.begin_file(rel, e.size.min(4096)) {
                Ok(_) => applied.touch(rel),
                Err(err) => one_line(err),
            }
        }
    }
    if let Err(e) = applied.apply(&t, manifest) {
        one_line(e);
    }
    drop(t);
    // Nothing outside the scratch tree changed.
    assert_eq!(fs::read(base.join("canary")).expect("canary"), b"canary");
    assert!(
        fs::read_dir(base.join("canary-dir"))
            .expect("canary-dir")
            .next()
            .is_none(),
        "something was written into the canary directory"
    );
    let mut names: Vec<String> = fs::read_dir(base)
        .expect("sandbox")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["canary", "canary-dir", "tree"],
        "something was made beside the tree"
    );
    fs::remove_dir_all(&scratch).expect("remove the scratch tree");
});
