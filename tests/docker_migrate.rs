//! Docker to Docker live migration: two of the project's dockerds on this
//! host (`hack/docker.sh up`, and a second one, `make docker-up-b`), a
//! `--runtime=migrun` container moving from one to the other and back.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use migrun_tests::{migrun_bin, pair_key, unique_id, wait_until};

/// The tests here share daemon B, and one of them stops it: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const A: &str = "unix:///var/lib/migrun-docker/docker.sock";
const B: &str = "unix:///var/lib/migrun-docker-b/docker.sock";

fn docker(host: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .env("DOCKER_HOST", host)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker (are hack/docker.sh up and make docker-up-b done?)")
}

fn docker_ok(host: &str, args: &[&str]) -> String {
    let out = docker(host, args);
    assert!(
        out.status.success(),
        "docker {args:?} on {host} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes containers and images by name on both daemons when dropped.
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for host in [A, B] {
            for c in &self.containers {
                let _ = docker(host, &["rm", "-f", c]);
            }
            for i in &self.images {
                let _ = docker(host, &["rmi", "-f", i]);
            }
        }
    }
}

/// The numbers a counter container printed, in order.
fn numbers(host: &str, name: &str) -> Vec<u64> {
    String::from_utf8_lossy(&docker(host, &["logs", name]).stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// migrate-in --once into daemon `to`; the log in `dir`.
fn migrate_in(to: &str, key: &Path, port: u16, dir: &Path) -> Child {
    migrate_in_with(to, key, port, dir, &[])
}

/// [`migrate_in`] with `extra` arguments.
fn migrate_in_with(to: &str, key: &Path, port: u16, dir: &Path, extra: &[&str]) -> Child {
    let log = fs::File::create(dir.join(format!("in-{port}.log"))).expect("log");
    let child = Command::new(migrun_bin())
        .arg("--root")
        .arg(dir.join(format!("root-{port}")))
        .args([
            "migrate-in",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--once",
            "--key",
        ])
        .arg(key)
        .arg("--work-dir")
        .arg(dir.join("in"))
        .args(["--docker-host", to])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("migrate-in");
    let path = dir.join(format!("in-{port}.log"));
    assert!(wait_until(Duration::from_secs(10), || fs::read_to_string(
        &path
    )
    .map(|l| l.contains("listening"))
    .unwrap_or(false)));
    child
}

/// The migrate-out command for container `name` of daemon `from` to the
/// migrate-in listening on `port`.
fn migrate_out_cmd(from: &str, name: &str, key: &Path, port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new(migrun_bin());
    cmd.args(["migrate-out", "--docker-host", from, name, "--to"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--key")
        .arg(key)
        .arg("--work-dir")
        .arg(dir.join(format!("out-{port}")))
        .stdin(Stdio::null());
    cmd
}

/// Runs a counter container `name` of `image` on A, printing a number
/// every 0.1 s (after `prelude`), until it printed three.
fn start_counter(name: &str, image: &str, prelude: &str) {
    let script = format!("{prelude}i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done");
    docker_ok(
        A,
        &[
            "run",
            "-d",
            "--name",
            name,
            "--runtime=migrun",
            image,
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || numbers(A, name)
        .len()
        >= 3));
}

/// Checks that container `name` runs on A and counts on.
fn assert_counting_on_a(name: &str) {
    let before = numbers(A, name).last().copied().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(5), || numbers(A, name)
            .last()
            .is_some_and(|n| *n > before + 2)),
        "{name} does not count on on A"
    );
    assert_eq!(
        docker_ok(A, &["inspect", "-f", "{{.State.Running}}", name]),
        "true"
    );
}

/// migrate-out of container `name` of daemon `from`; returns the figures.
fn migrate_out(from: &str, name: &str, key: &Path, port: u16, dir: &Path) -> serde_json::Value {
    let stats = dir.join(format!("stats-{port}.json"));
    let out = migrate_out_cmd(from, name, key, port, dir)
        .arg("--stats-json")
        .arg(&stats)
        .output()
        .expect("migrate-out");
    let log = fs::read_to_string(dir.join(format!("in-{port}.log"))).unwrap_or_default();
    assert!(
        out.status.success(),
        "migrate-out failed: {}\nmigrate-in: {log}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&fs::read_to_string(&stats).expect("stats")).expect("json")
}

fn finish(mut child: Child) {
    for _ in 0..300 {
        if let Ok(Some(st)) = child.try_wait() {
            assert!(st.success(), "migrate-in failed");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("migrate-in did not finish");
}

fn port(n: u16) -> u16 {
    26000 + (std::process::id() % 1000) as u16 * 4 + n
}

#[test]
fn docker_container_moves_between_daemons_with_its_layers_and_back() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig");
    let img1 = format!("{}-img:1", unique_id("dmig"));
    let img2 = format!("{}-img:2", unique_id("dmig"));
    let _cleanup = Cleanup {
        containers: vec![name.clone(), format!("{name}-build")],
        images: vec![img1.clone(), img2.clone()],
    };
    // An image of two layers on A only: busybox (A's own import) plus one.
    docker_ok(
        A,
        &[
            "run",
            "--name",
            &format!("{name}-build"),
            "busybox:local",
            "sh",
            "-c",
            "echo one > /layer-one",
        ],
    );
    docker_ok(A, &["commit", &format!("{name}-build"), &img1]);
    docker_ok(A, &["rm", &format!("{name}-build")]);
    let id_a = docker_ok(A, &["image", "inspect", "-f", "{{.Id}}", &img1]);

    docker_ok(
        A,
        &[
            "run", "-d", "--name", &name, "--runtime=migrun", "--label", "team=migrun",
            "-e", "GREETING=hello", "--restart", "on-failure:3", &img1, "sh", "-c",
            "rm /bin/vi; echo before > /before; i=0; while true; do i=$((i+1)); echo $i; echo $i > /count; sleep 0.1; done",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || numbers(A, &name)
        .len()
        >= 5));

    // A -> B, B lacking the image entirely: both layers travel.
    let child = migrate_in(B, &key, port(0), dir.path());
    let last_on_a = numbers(A, &name).last().copied().unwrap_or(0);
    let stats = migrate_out(A, &name, &key, port(0), dir.path());
    finish(child);
    assert_eq!(stats["layers_total"], 2, "{stats}");
    assert_eq!(stats["layers_sent"], 2, "{stats}");
    assert!(
        stats["bytes_layers"].as_u64().unwrap_or(0) > 1_000_000,
        "{stats}"
    );
    // Gone from A, running on B under the same name, image, config.
    assert!(
        !docker(A, &["inspect", &name]).status.success(),
        "still on A"
    );
    assert_eq!(
        docker_ok(B, &["inspect", "-f", "{{.State.Running}}", &name]),
        "true"
    );
    assert_eq!(docker_ok(B, &["inspect", "-f", "{{.Image}}", &name]), id_a);
    assert_eq!(
        docker_ok(B, &["image", "inspect", "-f", "{{.Id}}", &img1]),
        id_a
    );
    assert_eq!(
        docker_ok(B, &["inspect", "-f", "{{index .Config.Labels \"team\"}} {{.HostConfig.RestartPolicy.Name}} {{.HostConfig.Runtime}}", &name]),
        "migrun on-failure migrun"
    );
    assert_eq!(
        docker_ok(B, &["exec", &name, "sh", "-c", "echo $GREETING"]),
        "hello"
    );
    // The writable layer: what it wrote (before the migration, and /count,
    // rewritten every 0.1 s, so also after the last pre-copy round) and
    // what it deleted; the counter goes on.
    let count: u64 = docker_ok(B, &["exec", &name, "cat", "/count"])
        .parse()
        .unwrap_or(0);
    assert!(
        count >= last_on_a,
        "/count on B is {count}, A was at {last_on_a}"
    );
    assert_eq!(docker_ok(B, &["exec", &name, "cat", "/before"]), "before");
    assert_eq!(docker_ok(B, &["exec", &name, "cat", "/layer-one"]), "one");
    assert!(!docker(B, &["exec", &name, "test", "-e", "/bin/vi"])
        .status
        .success());
    assert!(wait_until(Duration::from_secs(10), || numbers(B, &name)
        .last()
        .is_some_and(|n| *n > last_on_a + 3)));
    let on_b = numbers(B, &name);
    // B's log begins where the restored counter went on, not at 1.
    assert!(
        on_b.first().is_some_and(|n| *n >= last_on_a),
        "counter restarted on B: A was at {last_on_a}, B began at {:?}",
        on_b.first()
    );

    // B -> A: A has the image: no layer bytes.
    let child = migrate_in(A, &key, port(1), dir.path());
    let stats = migrate_out(B, &name, &key, port(1), dir.path());
    finish(child);
    assert_eq!(stats["layers_sent"], 0, "{stats}");
    assert_eq!(stats["bytes_layers"], 0, "{stats}");
    assert_eq!(
        docker_ok(A, &["inspect", "-f", "{{.State.Running}}", &name]),
        "true"
    );
    assert!(
        !docker(B, &["inspect", &name]).status.success(),
        "still on B"
    );

    // A third layer on A: B has the first two, only the top one travels.
    docker_ok(A, &["commit", &name, &img2]);
    docker_ok(A, &["rm", "-f", &name]);
    docker_ok(
        A,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime=migrun",
            &img2,
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || numbers(A, &name)
        .len()
        >= 3));
    let child = migrate_in(B, &key, port(2), dir.path());
    let stats = migrate_out(A, &name, &key, port(2), dir.path());
    finish(child);
    assert_eq!(stats["layers_total"], 3, "{stats}");
    assert_eq!(stats["layers_sent"], 1, "{stats}");
    assert_eq!(
        docker_ok(B, &["image", "inspect", "-f", "{{.Id}}", &img2]),
        docker_ok(A, &["image", "inspect", "-f", "{{.Id}}", &img2])
    );
    assert_eq!(
        docker_ok(B, &["inspect", "-f", "{{.State.Running}}", &name]),
        "true"
    );
}

#[test]
fn a_failed_docker_migration_leaves_the_source_running_and_the_target_clean() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig-fail");
    let _cleanup = Cleanup {
        containers: vec![name.clone()],
        images: vec![],
    };
    start_counter(&name, "busybox:local", "");
    // B already has a container of that name: the target refuses.
    docker_ok(B, &["create", "--name", &name, "busybox:local", "true"]);
    let child = migrate_in(B, &key, port(3), dir.path());
    let out = migrate_out_cmd(A, &name, &key, port(3), dir.path())
        .output()
        .expect("migrate-out");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    let _ = child.wait_with_output();
    // Still running on A, counting on.
    assert_counting_on_a(&name);
    // B holds only the container it had.
    assert_eq!(
        docker_ok(B, &["inspect", "-f", "{{.State.Status}}", &name]),
        "created"
    );
    docker_ok(B, &["rm", &name]);
}

/// The answer of the web server at `addr` (HTTP/1.0 GET /), or why none came.
fn http_get(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    Ok(body)
}

#[test]
fn docker_container_with_an_open_connection_moves_and_gets_the_targets_network() {
    // A server holding an established connection: the dump carries it, and
    // the restore through Docker (containerd passes no --tcp-established)
    // must take it (closed: the container gets a new address on B). On B
    // the container must sit in the network B's Docker made for it
    // (Docker sets it up in an OCI prestart hook, which the restore runs).
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig-net");
    // A tag of its own: removing it afterwards removes the image from B
    // (other tests need B without it) and only the tag from A.
    let image = format!("{name}-img:1");
    let _cleanup = Cleanup {
        containers: vec![name.clone()],
        images: vec![image.clone()],
    };
    docker_ok(A, &["tag", "busybox:local", &image]);
    docker_ok(
        A,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime=migrun",
            &image,
            "sh",
            "-c",
            "echo hello from the container > /hello.txt; exec httpd -f -p 8080 -h /",
        ],
    );
    let ip_on = |host: &str| {
        docker_ok(
            host,
            &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name],
        )
    };
    // Waits until the server answers at `ip`; the last answer otherwise.
    let answers = |ip: &str| {
        let mut body = Err(String::new());
        let ok = wait_until(Duration::from_secs(10), || {
            body = http_get(&format!("{ip}:8080"));
            body.as_ref()
                .is_ok_and(|b| b.contains("hello from the container"))
        });
        if ok {
            Ok(())
        } else {
            Err(body)
        }
    };
    let ip_a = ip_on(A);
    assert!(!ip_a.is_empty(), "no address on A");
    if let Err(body) = answers(&ip_a) {
        panic!("the server does not answer on A: {body:?}");
    }
    // Established, and idle during the migration (httpd waits for a request).
    let open = std::net::TcpStream::connect(format!("{ip_a}:8080")).expect("connect");

    let child = migrate_in(B, &key, port(2), dir.path());
    let stats = migrate_out(A, &name, &key, port(2), dir.path());
    finish(child);
    assert!(stats["downtime_ms"].as_f64().is_some(), "{stats}");
    drop(open);

    assert_eq!(
        docker_ok(B, &["inspect", "-f", "{{.State.Running}}", &name]),
        "true"
    );
    let ip_b = ip_on(B);
    assert!(!ip_b.is_empty(), "no address on B");
    let addrs = docker_ok(B, &["exec", &name, "ip", "-4", "addr", "show"]);
    assert!(
        addrs.contains(&format!("inet {ip_b}/")),
        "the container is not in the network B made for it ({ip_b}): {addrs}"
    );
    if let Err(body) = answers(&ip_b) {
        panic!("the server does not answer on B at {ip_b}: {body:?}");
    }
}

/// Runs hack/docker.sh for daemon B (`up` or `down`), as `make docker-up-b`.
fn daemon_b(action: &str) {
    let st = Command::new("bash")
        .arg(migrun_tests::repo_root().join("hack/docker.sh"))
        .arg(action)
        .env("MIGRUN_DOCKER_DIR", "/var/lib/migrun-docker-b")
        .env("MIGRUN_DOCKER_BRIDGE", "mr-docker1")
        .env("MIGRUN_DOCKER_CIDR", "172.31.251.1/24")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("hack/docker.sh");
    assert!(st.success(), "hack/docker.sh {action} for daemon B failed");
}

/// Removes an image from daemon B only (A keeps it), whatever happened.
struct RemoveImageOnB(String);

impl Drop for RemoveImageOnB {
    fn drop(&mut self) {
        let _ = docker(B, &["rmi", "-f", &self.0]);
    }
}

/// Starts daemon B again if a test stopped it, whatever happened.
struct RestartB;

impl Drop for RestartB {
    fn drop(&mut self) {
        if !docker(B, &["version"]).status.success() {
            daemon_b("up");
        }
    }
}

#[test]
fn daemon_b_stopped_mid_migration_leaves_a_running_and_b_clean() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig-down");
    let _cleanup = Cleanup {
        containers: vec![name.clone()],
        images: vec![],
    };
    let _restart = RestartB;
    // B has A's busybox (so the container is created on B at once); the
    // container holds ~1.3 MiB in its shell, which --bandwidth 1 takes
    // about 10 s to send: B goes down meanwhile.
    let base = docker_ok(A, &["image", "inspect", "-f", "{{.Id}}", "busybox:local"]);
    // By id: B's own busybox:local keeps its tag; removed from B at the end.
    let _unload = RemoveImageOnB(base.clone());
    let save = Command::new("sh")
        .arg("-c")
        .arg(format!("docker -H {A} save {base} | docker -H {B} load -q"))
        .stdout(Stdio::null())
        .status()
        .expect("save | load");
    assert!(save.success());
    start_counter(&name, &base, "x=$(head -c 1000000 /dev/urandom | base64); ");
    let child = migrate_in(B, &key, port(4), dir.path());
    let out = migrate_out_cmd(A, &name, &key, port(4), dir.path())
        .args(["--bandwidth", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("migrate-out");
    let inlog = dir.path().join(format!("in-{}.log", port(4)));
    assert!(wait_until(Duration::from_secs(20), || fs::read_to_string(
        &inlog
    )
    .map(|l| l.contains("receiving container"))
    .unwrap_or(false)));
    std::thread::sleep(Duration::from_secs(1));
    daemon_b("down");
    let out = out.wait_with_output().expect("migrate-out");
    assert!(!out.status.success(), "the migration succeeded with B down");
    let _ = child.wait_with_output();
    // A: running, counting on.
    assert_counting_on_a(&name);
    // B, back: the next migrate-in removes what the failed one made there.
    daemon_b("up");
    let mut child = migrate_in(B, &key, port(5), dir.path());
    let _ = child.kill();
    let _ = child.wait();
    let log = dir.path().join(format!("in-{}.log", port(5)));
    assert!(
        !docker(B, &["inspect", &name]).status.success(),
        "B still holds {name}: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Unmounts a mount point when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn target_without_space_for_the_layers_refuses_and_holds_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig-full");
    let _cleanup = Cleanup {
        containers: vec![name.clone()],
        images: vec![],
    };
    // migrate-in's work dir, where the layers arrive: a 512 KiB tmpfs for
    // a 2 MiB layer.
    let work = dir.path().join("in");
    fs::create_dir_all(&work).expect("mkdir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&work)
        .status()
        .expect("mount");
    assert!(st.success());
    let _unmount = Unmount(work);
    let base = docker_ok(A, &["image", "inspect", "-f", "{{.Id}}", "busybox:local"]);
    assert!(
        !docker(B, &["image", "inspect", &base]).status.success(),
        "B already has A's busybox image"
    );
    start_counter(&name, "busybox:local", "");
    let child = migrate_in(B, &key, port(6), dir.path());
    let out = migrate_out_cmd(A, &name, &key, port(6), dir.path())
        .output()
        .expect("migrate-out");
    let _ = child.wait_with_output();
    assert!(!out.status.success(), "the migration succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    // Refused before anything is written, with the figures.
    assert!(
        err.contains("not enough space for the container's files"),
        "{err}"
    );
    // A runs on, B holds neither the container nor the image.
    assert_counting_on_a(&name);
    assert!(!docker(B, &["inspect", &name]).status.success());
    assert!(!docker(B, &["image", "inspect", &base]).status.success());
}

/// `migrun --root ROOT migrate-recover NAME --docker-host HOST ARGS…`.
fn recover_cmd(root: &Path, name: &str, host: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(migrun_bin());
    cmd.arg("--root")
        .arg(root)
        .args(["migrate-recover", name, "--docker-host", host])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// The journals left under the state root `root`.
fn journals(root: &Path) -> Vec<String> {
    fs::read_dir(root.join(".migrations"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_docker_hand_over_cut_after_the_commit_is_settled_by_migrate_recover_on_the_target() {
    // The source committed and the connection dropped before `Done`: the
    // source's copy stays frozen, the target's restored but stopped. The
    // two migrate-recovers (the target's waiting, the source's asking)
    // agree that the target's wins: it runs on from where it was, in
    // daemon B, and daemon A's copy is gone. Until then neither runs.
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig-cut");
    let _cleanup = Cleanup {
        containers: vec![name.clone()],
        images: vec![],
    };
    start_counter(&name, "busybox:local", "");
    // With all of its memory restored at once: a copy whose memory was
    // still to come from migrate-in's page store (gone with it) could not
    // win.
    let child = migrate_in_with(B, &key, port(7), dir.path(), &["--no-lazy-restore"]);
    let out = migrate_out_cmd(A, &name, &key, port(7), dir.path())
        .args(["--inject-fault", "drop@committed"])
        .output()
        .expect("migrate-out");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in doubt"), "{err}");
    let _ = child.wait_with_output();
    // Neither copy runs.
    let last_on_a = numbers(A, &name).last().copied().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(numbers(A, &name).last().copied().unwrap_or(0), last_on_a);
    let target_root = dir.path().join(format!("root-{}", port(7)));
    let listen = format!("127.0.0.1:{}", port(8));
    let key_s = key.to_string_lossy().to_string();
    let target = recover_cmd(
        &target_root,
        &name,
        B,
        &["--listen", &listen, "--key", &key_s, "--peer-timeout", "30"],
    )
    .stderr(Stdio::piped())
    .spawn()
    .expect("migrate-recover on the target");
    // The source's, once the target's listens.
    let mut source_err = String::new();
    let settled = wait_until(Duration::from_secs(20), || {
        let out = recover_cmd(
            Path::new("/run/migrun"),
            &name,
            A,
            &["--peer", &listen, "--key", &key_s],
        )
        .output()
        .expect("migrate-recover on the source");
        source_err = String::from_utf8_lossy(&out.stderr).to_string();
        out.status.success()
    });
    let target = target.wait_with_output().expect("target recover");
    let target_err = String::from_utf8_lossy(&target.stderr);
    assert!(settled, "source: {source_err}\ntarget: {target_err}");
    assert!(target.status.success(), "target: {target_err}");
    assert!(
        wait_until(Duration::from_secs(10), || numbers(B, &name)
            .last()
            .is_some_and(|n| *n > last_on_a + 2)),
        "{name} does not count on on B from {last_on_a}: {:?}",
        numbers(B, &name)
    );
    assert!(
        !docker(A, &["inspect", &name]).status.success(),
        "A still holds {name}"
    );
    assert!(
        journals(&target_root).is_empty(),
        "{:?}",
        journals(&target_root)
    );
}

#[test]
fn a_docker_target_cut_off_after_acknowledging_is_removed_by_migrate_recover() {
    // migrate-in dies right after it acknowledged its restored copy: the
    // source never committed and runs on; the target's copy (stopped in
    // daemon B) goes when migrate-recover there names the source the
    // winner.
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(dir.path());
    let name = unique_id("dmig-ack");
    let _cleanup = Cleanup {
        containers: vec![name.clone()],
        images: vec![],
    };
    start_counter(&name, "busybox:local", "");
    let child = migrate_in_with(
        B,
        &key,
        port(9),
        dir.path(),
        &["--inject-fault", "crash@acknowledged"],
    );
    let out = migrate_out_cmd(A, &name, &key, port(9), dir.path())
        .output()
        .expect("migrate-out");
    assert!(!out.status.success());
    let _ = child.wait_with_output();
    assert_counting_on_a(&name);
    assert!(docker(B, &["inspect", &name]).status.success());
    let target_root = dir.path().join(format!("root-{}", port(9)));
    let out = recover_cmd(&target_root, &name, B, &["--winner", "source"])
        .output()
        .expect("migrate-recover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !docker(B, &["inspect", &name]).status.success(),
        "B still holds {name}: {err}"
    );
    assert_counting_on_a(&name);
    assert!(
        journals(&target_root).is_empty(),
        "{:?}",
        journals(&target_root)
    );
}
