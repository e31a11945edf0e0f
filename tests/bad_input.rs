//! Bad input gives one clear error line, a non-zero exit, and leaves nothing behind.

use std::fs;
use std::time::Duration;

use migrun_tests::{cgroups_named, processes_rooted_at, unique_id, wait_until, Bundle, Migrun};

/// Asserts that nothing of container `id` is left: state dir, cgroup, processes.
fn assert_no_leftovers(m: &Migrun, id: &str, bundle: Option<&Bundle>) {
    assert!(
        !m.root().join(id).exists(),
        "state directory of {id} left behind"
    );
    assert!(
        cgroups_named(id).is_empty(),
        "cgroups left: {:?}",
        cgroups_named(id)
    );
    if let Some(b) = bundle {
        assert!(
            processes_rooted_at(&b.rootfs()).is_empty(),
            "processes left behind"
        );
    }
}

#[test]
fn missing_bundle() {
    let m = Migrun::new();
    let id = unique_id("nobundle");
    let err = m.fails(&["create", "--bundle", "/nonexistent/bundle", &id]);
    assert!(err.contains("/nonexistent/bundle"), "{err}");
    assert_no_leftovers(&m, &id, None);
}

#[test]
fn malformed_config_json() {
    let m = Migrun::new();
    let id = unique_id("badjson");
    let b = Bundle::new(&["true"]);
    fs::write(
        b.path().join("config.json"),
        "{ \"ociVersion\": \"1.0.2\", \"process\": ",
    )
    .expect("write");
    let err = m.fails(&["create", "--bundle", b.path().to_str().expect("utf8"), &id]);
    assert!(err.contains("config.json"), "{err}");
    assert_no_leftovers(&m, &id, Some(&b));
}

#[test]
fn config_with_missing_binary_leaves_nothing() {
    let m = Migrun::new();
    let id = unique_id("nobin");
    let b = Bundle::new(&["/no/such/program"]);
    let out = m.run(&["run", "--bundle", b.path().to_str().expect("utf8"), &id]);
    assert!(!out.status.success());
    assert!(wait_until(Duration::from_secs(5), || processes_rooted_at(
        &b.rootfs()
    )
    .is_empty()));
    assert_no_leftovers(&m, &id, Some(&b));
}

#[test]
fn unknown_id() {
    let m = Migrun::new();
    for args in [
        vec!["state", "ghost"],
        vec!["start", "ghost"],
        vec!["kill", "ghost", "KILL"],
        vec!["delete", "ghost"],
        vec!["pause", "ghost"],
        vec!["exec", "ghost", "true"],
        vec!["ps", "ghost"],
    ] {
        let err = m.fails(&args);
        assert!(
            err.contains("ghost") && err.contains("does not exist"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn duplicate_id_keeps_the_first() {
    let m = Migrun::new();
    let id = unique_id("dup");
    let b1 = Bundle::new(&["sleep", "60"]);
    let b2 = Bundle::new(&["sleep", "60"]);
    m.ok(&["run", "-d", "-b", b1.path().to_str().expect("utf8"), &id]);
    let pid = m.state(&id)["pid"].clone();
    let err = m.fails(&["create", "-b", b2.path().to_str().expect("utf8"), &id]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(m.status(&id), "running");
    assert_eq!(m.state(&id)["pid"], pid);
    assert!(processes_rooted_at(&b2.rootfs()).is_empty());
    m.ok(&["delete", "-f", &id]);
}

#[test]
fn start_twice_and_delete_running() {
    let m = Migrun::new();
    let id = unique_id("twice");
    let b = Bundle::new(&["sleep", "60"]);
    m.ok(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    let err = m.fails(&["start", &id]);
    assert!(err.contains("running"), "{err}");
    let err = m.fails(&["delete", &id]);
    assert!(err.contains("running") && err.contains("-f"), "{err}");
    assert_eq!(m.status(&id), "running");
    assert_eq!(processes_rooted_at(&b.rootfs()).len(), 1);
    m.ok(&["delete", "-f", &id]);
    assert_no_leftovers(&m, &id, Some(&b));
}

#[test]
fn invalid_id_is_refused() {
    let m = Migrun::new();
    let b = Bundle::new(&["true"]);
    let err = m.fails(&[
        "create",
        "-b",
        b.path().to_str().expect("utf8"),
        "../escape",
    ]);
    assert!(err.contains("invalid container id"), "{err}");
}

#[test]
fn systemd_cgroup_without_systemd() {
    let m = Migrun::new();
    let id = unique_id("systemd");
    let b = Bundle::new(&["true"]);
    let out = m
        .command()
        .args([
            "--systemd-cgroup",
            "create",
            "-b",
            b.path().to_str().expect("utf8"),
            &id,
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("systemd"));
    assert_no_leftovers(&m, &id, Some(&b));
}
