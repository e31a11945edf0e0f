//! Where tools written for runc look (issue 16): each case runs against
//! migrun and, when runc is installed, against runc in the same test; the
//! output shows both results side by side, and the test fails when
//! migrun's does. runc's result is the reference, never a failure.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use migrun_tests::{unique_id, wait_until, Bundle, Migrun};
use serde_json::Value;

/// What a case found: `Ok` with a short summary, or `Err` with what was wrong.
type Verdict = Result<String, String>;

/// The runtimes under test: migrun, then runc if it is installed.
fn runtimes() -> Vec<Migrun> {
    let mut all = vec![Migrun::new()];
    all.extend(Migrun::runc());
    all
}

/// Writes straight to standard error, past the test harness's capture, so
/// that the comparison is in the output of a passing run too.
fn show(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Runs `case` against each runtime, prints the results side by side and
/// panics if migrun's is an `Err`.
fn compare(name: &str, case: impl Fn(&Migrun) -> Verdict) {
    let mut table = format!("runc-compat {name}:\n");
    let mut migrun = None;
    let all = runtimes();
    for rt in &all {
        let verdict = case(rt);
        let (mark, text) = match &verdict {
            Ok(s) => ("ok  ", s.as_str()),
            Err(e) => ("FAIL", e.as_str()),
        };
        table.push_str(&format!("  {:<6} {mark} {text}\n", rt.name()));
        if rt.name() == "migrun" {
            migrun = Some(verdict);
        }
    }
    if all.len() == 1 {
        table.push_str("  runc   (not installed: skipped)\n");
    }
    show(&table);
    if let Some(Err(e)) = migrun {
        panic!("{name}: migrun: {e}");
    }
}

/// `Err` with `what` and the output unless `out` succeeded.
fn succeeded(out: &Output, what: &str) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    if out.status.success() {
        return Ok(());
    }
    let how = match (out.status.code(), out.status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "failed".to_string(),
    };
    Err(format!(
        "{what}: {how}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// The state of `id`, or `Err`.
fn state(rt: &Migrun, id: &str) -> Result<Value, String> {
    let out = rt.run(&["state", id]);
    succeeded(&out, "state")?;
    serde_json::from_slice(&out.stdout).map_err(|e| format!("state json: {e}"))
}

/// The status of `id` ("" when it has none).
fn status(rt: &Migrun, id: &str) -> String {
    state(rt, id)
        .ok()
        .and_then(|s| s["status"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The base name of a bundle directory, to name it relatively from its parent.
fn base_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 bundle name")
}

/// The canonical path of `path`, as text.
fn canonical(path: &Path) -> String {
    fs::canonicalize(path)
        .expect("canonicalize")
        .to_string_lossy()
        .into_owned()
}

/// Checks a created container: status, its bundle recorded absolute, and
/// the pid file (at `pid_file`) naming its init.
fn check_created(rt: &Migrun, id: &str, bundle: &Path, pid_file: &Path) -> Verdict {
    let st = state(rt, id)?;
    if st["status"] != "created" {
        return Err(format!("status {} after create", st["status"]));
    }
    if st["bundle"] != canonical(bundle).as_str() {
        return Err(format!("bundle recorded as {}", st["bundle"]));
    }
    let pid = fs::read_to_string(pid_file)
        .map_err(|e| format!("pid file {}: {e}", pid_file.display()))?;
    if Some(pid.trim()) != st["pid"].as_i64().map(|p| p.to_string()).as_deref() {
        return Err(format!("pid file says {pid}, state {}", st["pid"]));
    }
    Ok(format!(
        "created, bundle {}, pid file {}",
        st["bundle"],
        pid_file.display()
    ))
}

#[test]
fn create_in_the_bundle_directory() {
    // runc's canonical use: `runc spec; runc create ID` inside the bundle.
    compare("create in the bundle (no -b), relative --pid-file", |rt| {
        let id = unique_id(&format!("{}-cwd", rt.name()));
        let b = Bundle::new(&["sleep", "60"]);
        let out = rt.run_in(b.path(), &["create", "--pid-file", "init.pid", &id]);
        succeeded(&out, "create")?;
        let verdict = check_created(rt, &id, b.path(), &b.path().join("init.pid"));
        let _ = rt.run(&["delete", "-f", &id]);
        verdict
    });
}

#[test]
fn create_and_run_with_a_relative_bundle() {
    compare("create -b DIR / run -b DIR relative", |rt| {
        let parent = tempfile::tempdir().expect("tmp");
        let b = Bundle::with_in(
            parent.path(),
            &["sh", "-c", "echo from $(hostname)"],
            |_| {},
        );
        let rel = base_name(b.path());
        let id = unique_id(&format!("{}-relb", rt.name()));
        let out = rt.run_in(
            parent.path(),
            &["create", "-b", rel, "--pid-file", "rel.pid", &id],
        );
        succeeded(&out, "create -b")?;
        let created = check_created(rt, &id, b.path(), &parent.path().join("rel.pid"));
        let _ = rt.run(&["delete", "-f", &id]);
        let created = created?;
        // `run` in the foreground: the container's output, then it is gone.
        let run_id = unique_id(&format!("{}-relrun", rt.name()));
        let out = rt.run_in(parent.path(), &["run", "-b", rel, &run_id]);
        succeeded(&out, "run -b")?;
        let said = String::from_utf8_lossy(&out.stdout);
        if !said.starts_with("from ") {
            return Err(format!("run printed {said:?}"));
        }
        // `run -d` keeps it running.
        let detached = unique_id(&format!("{}-reld", rt.name()));
        let b2 = Bundle::with_in(parent.path(), &["sleep", "60"], |_| {});
        let out = rt.run_in(
            parent.path(),
            &["run", "-d", "-b", base_name(b2.path()), &detached],
        );
        succeeded(&out, "run -d -b")?;
        let st = status(rt, &detached);
        let _ = rt.run(&["delete", "-f", &detached]);
        if st != "running" {
            return Err(format!("run -d -b: status {st:?}"));
        }
        Ok(format!(
            "{created}; run printed {:?}; run -d running",
            said.trim()
        ))
    });
}

/// The hook kinds of the runtime spec, as config.json names them.
const HOOK_KINDS: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// 20 create/start/delete rounds of a container whose `kind` hook is
/// `/bin/true`, which exits without reading the state on its stdin. Each
/// command must succeed and the container must have run and be gone.
fn hook_that_reads_nothing(kind: &str) {
    compare(&format!("{kind} hook /bin/true, 20 rounds"), |rt| {
        let b = Bundle::with(&["sh", "-c", "echo ran > /ran"], |spec| {
            spec["hooks"] = serde_json::json!({
                kind: [{"path": "/bin/true", "args": ["true"]}]
            });
        });
        for round in 1..=20 {
            let id = unique_id(&format!("{}-{}-{round}", rt.name(), kind.to_lowercase()));
            let _ = fs::remove_file(b.rootfs().join("ran"));
            let at = |what: &str| format!("round {round}: {what}");
            let bundle = b.path().to_str().expect("utf8");
            succeeded(&rt.run(&["create", "-b", bundle, &id]), &at("create"))?;
            let st = status(rt, &id);
            if st != "created" {
                return Err(at(&format!("status {st:?} after create")));
            }
            succeeded(&rt.run(&["start", &id]), &at("start"))?;
            if !wait_until(Duration::from_secs(10), || status(rt, &id) == "stopped") {
                return Err(at(&format!(
                    "status {:?} 10 s after start",
                    status(rt, &id)
                )));
            }
            if b.read("ran").as_deref() != Some("ran\n") {
                return Err(at("the container's process never ran"));
            }
            succeeded(&rt.run(&["delete", &id]), &at("delete"))?;
            if rt.root().join(&id).exists() {
                return Err(at("state left after delete"));
            }
        }
        Ok("20 of 20 rounds: created, ran, stopped, deleted".into())
    });
}

#[test]
fn prestart_hook_that_reads_nothing() {
    hook_that_reads_nothing(HOOK_KINDS[0]);
}

#[test]
fn create_runtime_hook_that_reads_nothing() {
    hook_that_reads_nothing(HOOK_KINDS[1]);
}

#[test]
fn create_container_hook_that_reads_nothing() {
    hook_that_reads_nothing(HOOK_KINDS[2]);
}

#[test]
fn start_container_hook_that_reads_nothing() {
    hook_that_reads_nothing(HOOK_KINDS[3]);
}

#[test]
fn poststart_hook_that_reads_nothing() {
    hook_that_reads_nothing(HOOK_KINDS[4]);
}

#[test]
fn poststop_hook_that_reads_nothing() {
    hook_that_reads_nothing(HOOK_KINDS[5]);
}

/// Whether a `/proc/PID/status` text (or its SigIgn line) says SIGPIPE is
/// ignored; `Err` when there is no SigIgn line.
fn sigpipe_ignored(status: &str) -> Result<bool, String> {
    let line = status
        .lines()
        .find(|l| l.starts_with("SigIgn:"))
        .ok_or_else(|| format!("no SigIgn line in {status:?}"))?;
    let mask = u64::from_str_radix(line.trim_start_matches("SigIgn:").trim(), 16)
        .map_err(|e| format!("{line:?}: {e}"))?;
    Ok(mask & (1 << (libc::SIGPIPE - 1)) != 0)
}

#[test]
fn container_processes_get_sigpipe_at_its_default() {
    // migrun ignores SIGPIPE while it runs hooks; what it starts must not.
    compare("SIGPIPE not ignored in init and exec'd processes", |rt| {
        let grep = ["grep", "SigIgn", "/proc/self/status"];
        let b = Bundle::with(&grep, |spec| {
            spec["hooks"] = serde_json::json!({
                "startContainer": [{"path": "/bin/true", "args": ["true"]}]
            });
        });
        let id = unique_id(&format!("{}-sigpipe", rt.name()));
        let out = rt.run(&["run", "-b", b.path().to_str().expect("utf8"), &id]);
        succeeded(&out, "run")?;
        let init = String::from_utf8_lossy(&out.stdout).into_owned();
        if sigpipe_ignored(&init)? {
            return Err(format!("init: SIGPIPE ignored ({})", init.trim()));
        }
        let b = Bundle::new(&["sleep", "60"]);
        let id = unique_id(&format!("{}-sigpipe-x", rt.name()));
        succeeded(
            &rt.run(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]),
            "run -d",
        )?;
        let mut args = vec!["exec", id.as_str()];
        args.extend(grep);
        let out = rt.run(&args);
        let _ = rt.run(&["delete", "-f", &id]);
        succeeded(&out, "exec")?;
        let exec = String::from_utf8_lossy(&out.stdout).into_owned();
        if sigpipe_ignored(&exec)? {
            return Err(format!("exec: SIGPIPE ignored ({})", exec.trim()));
        }
        Ok(format!("init {}, exec {}", init.trim(), exec.trim()))
    });
}

/// A failing command's stderr: non-zero exit, the word "error" and `reason`.
fn error_says(out: &Output, what: &str, reason: &str) -> Verdict {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        return Err(format!("{what}: succeeded"));
    }
    if !stderr.contains("error") || !stderr.contains(reason) {
        return Err(format!(
            "{what}: stderr lacks \"error\" or {reason:?}: {stderr:?}"
        ));
    }
    Ok(format!("{what}: {stderr}"))
}

#[test]
fn errors_say_error() {
    // Scrapers of a runtime's stderr look for "error" (runc: `level=error`).
    compare("delete/kill unknown, kill stopped, delete running", |rt| {
        let mut found = Vec::new();
        found.push(error_says(
            &rt.run(&["delete", "ghost"]),
            "delete unknown",
            "does not exist",
        )?);
        found.push(error_says(
            &rt.run(&["kill", "ghost", "KILL"]),
            "kill unknown",
            "does not exist",
        )?);
        let b = Bundle::new(&["sleep", "60"]);
        let id = unique_id(&format!("{}-errors", rt.name()));
        succeeded(
            &rt.run(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]),
            "run -d",
        )?;
        let running = error_says(&rt.run(&["delete", &id]), "delete running", "running");
        let _ = rt.run(&["kill", &id, "KILL"]);
        let stopped = if wait_until(Duration::from_secs(10), || status(rt, &id) == "stopped") {
            // runc: "container not running"; migrun: "... is stopped: cannot kill".
            let out = rt.run(&["kill", &id, "TERM"]);
            let reason = if rt.name() == "runc" {
                "not running"
            } else {
                "stopped"
            };
            error_says(&out, "kill stopped", reason)
        } else {
            Err("the container did not stop after SIGKILL".into())
        };
        let _ = rt.run(&["delete", "-f", &id]);
        found.push(running?);
        found.push(stopped?);
        Ok(found.join("\n                "))
    });
}

#[test]
fn errors_in_runc_log_formats() {
    // runc's own lines: logrus text by default, JSON with --log-format json;
    // with --log the file gets the line (containerd reads the JSON there).
    compare("error line formats (text, json, --log)", |rt| {
        let text = rt.run(&["delete", "ghost"]);
        let line = String::from_utf8_lossy(&text.stderr).trim().to_string();
        let text_ok = line.starts_with("time=\"")
            && line.contains(" level=error msg=\"")
            && line.ends_with('"')
            && line.lines().count() == 1;
        if !text_ok {
            return Err(format!("text format: {line:?}"));
        }
        let json = rt.run(&["--log-format", "json", "delete", "ghost"]);
        let jline = String::from_utf8_lossy(&json.stderr).trim().to_string();
        let parsed: Value =
            serde_json::from_str(&jline).map_err(|e| format!("json format {jline:?}: {e}"))?;
        if parsed["level"] != "error"
            || !parsed["msg"]
                .as_str()
                .is_some_and(|m| m.contains("does not exist"))
        {
            return Err(format!("json format: {jline:?}"));
        }
        let log = tempfile::NamedTempFile::new().expect("tmp");
        let log_path = log.path().to_str().expect("utf8");
        let out = rt.run(&["--log", log_path, "--log-format", "json", "delete", "ghost"]);
        if out.status.success() {
            return Err("delete ghost with --log succeeded".into());
        }
        let logged = fs::read_to_string(log.path()).unwrap_or_default();
        let last: Value = logged
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| format!("--log file: {logged:?}"))?;
        if last["level"] != "error" {
            return Err(format!("--log file: {logged:?}"));
        }
        Ok(format!(
            "text {line:?}; json {jline:?}; --log stderr {:?}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    });
}

#[test]
fn mount_onto_a_proc_symlink_names_the_cause() {
    compare("/proc a symlink in the rootfs: the cause", |rt| {
        let b = Bundle::new(&["true"]);
        let proc_dir = b.rootfs().join("proc");
        let _ = fs::remove_dir_all(&proc_dir);
        std::os::unix::fs::symlink("/tmp", &proc_dir).expect("symlink /proc");
        let id = unique_id(&format!("{}-procsym", rt.name()));
        let out = rt.run(&["run", "-b", b.path().to_str().expect("utf8"), &id]);
        let _ = rt.run(&["delete", "-f", &id]);
        error_says(&out, "run", "must be mounted on ordinary directory")
    });
}

#[test]
fn exec_refused_by_capabilities_names_the_cause() {
    // An effective capability outside the permitted set: capset(2) says EPERM.
    compare("exec with caps capset refuses: the cause", |rt| {
        let b = Bundle::new(&["sleep", "60"]);
        let id = unique_id(&format!("{}-capexec", rt.name()));
        succeeded(
            &rt.run(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]),
            "run -d",
        )?;
        let spec: Value =
            serde_json::from_str(&fs::read_to_string(b.path().join("config.json")).expect("read"))
                .expect("json");
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(["true"]);
        process["capabilities"] = serde_json::json!({
            "bounding": ["CAP_KILL"],
            "effective": ["CAP_SYS_ADMIN"],
            "permitted": ["CAP_KILL"],
            "inheritable": [],
            "ambient": []
        });
        let process_json = b.path().join("process.json");
        fs::write(&process_json, process.to_string()).expect("write process.json");
        let out = rt.run(&["exec", "-p", process_json.to_str().expect("utf8"), &id]);
        let _ = rt.run(&["delete", "-f", &id]);
        // Go's errno text is lower-case, Rust's capitalised.
        let mut lower = out.clone();
        lower.stderr = out.stderr.to_ascii_lowercase();
        error_says(&lower, "exec", "operation not permitted")
            .map(|_| format!("exec: {}", String::from_utf8_lossy(&out.stderr).trim()))
    });
}
