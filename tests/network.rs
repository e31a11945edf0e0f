//! The network moves with the container, on the test bed of
//! `hack/testbed.sh` (hosts A and B and a client as network namespaces on
//! one bridge): a busybox httpd container with a service address on host A
//! (`hack/netctr.sh attach`) is live-migrated to host B
//! (`migrate-in --bridge mrbr`) while a client in the client namespace keeps
//! requesting from it, and an established TCP connection carries on.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migrun_tests::{migrun_bin, pair_key, repo_root, unique_id, wait_until, Bundle, Migrun};

const HOST_A: &str = "mr-host-a";
const HOST_B: &str = "mr-host-b";
const CLIENT: &str = "mr-client";
const ADDR_B: &str = "10.77.0.2";
const HOST_BRIDGE: &str = "mrbr";
/// The port of the echo server in the container.
const ECHO_PORT: u16 = 7000;

/// Brings the test bed up unless it is (with the host bridges), once per
/// test process.
fn testbed() {
    static UP: Mutex<bool> = Mutex::new(false);
    let mut up = UP.lock().unwrap_or_else(|e| e.into_inner());
    if *up {
        return;
    }
    let ready = [HOST_A, HOST_B, CLIENT]
        .iter()
        .all(|ns| Path::new("/run/netns").join(ns).exists())
        && [HOST_A, HOST_B].iter().all(|ns| {
            Command::new("ip")
                .args(["-n", ns, "link", "show", HOST_BRIDGE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !ready {
        let out = Command::new("bash")
            .arg(repo_root().join("hack/testbed.sh"))
            .arg("up")
            .output()
            .expect("run hack/testbed.sh up");
        assert!(
            out.status.success(),
            "hack/testbed.sh up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *up = true;
}

/// Runs `f` in a thread that has entered network namespace `ns`; sockets
/// made there stay in `ns` wherever they are used afterwards.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = fs::File::open(Path::new("/run/netns").join(ns)).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// `nsenter --net=/run/netns/NS -- migrun --root ROOT`.
fn migrun_in(ns: &str, m: &Migrun) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(migrun_bin())
        .arg("--root")
        .arg(m.root());
    cmd
}

/// A service address (10.77.0.100-199) and a migration port of this test
/// process's own; `slot` (0 or 1) keeps the tests of one process apart.
fn service_addr(slot: u32) -> (String, u16) {
    let n = std::process::id();
    (
        format!("10.77.0.{}", 100 + slot * 50 + n % 50),
        (7400 + slot * 500 + n % 500) as u16,
    )
}

/// One HTTP/1.0 GET of `/` from `addr`; the body.
fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: service\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .unwrap_or_default())
}

/// `hack/netctr.sh attach`: container `id` of `m` (on host A) gets service
/// address `ip`/24 on the test bed.
fn attach_service_addr(m: &Migrun, id: &str, ip: &str) {
    let attach = Command::new("bash")
        .arg(repo_root().join("hack/netctr.sh"))
        .arg("attach")
        .arg(m.root())
        .arg(id)
        .arg(format!("{ip}/24"))
        .arg(HOST_A)
        .env("MIGRUN_BIN", migrun_bin())
        .output()
        .expect("netctr.sh");
    assert!(
        attach.status.success(),
        "netctr.sh attach: {}",
        String::from_utf8_lossy(&attach.stderr)
    );
}

/// An established TCP connection from the client namespace to an echo
/// server (`nc -l -e cat`).
struct EchoConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl EchoConn {
    /// Connects from the client namespace, retrying while the server starts.
    fn connect(addr: SocketAddr) -> Self {
        let conn = in_netns(CLIENT, move || {
            let mut last = None;
            for _ in 0..50 {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => return s,
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("connect to the echo server: {last:?}");
        });
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Self {
            reader: BufReader::new(conn.try_clone().expect("clone")),
            writer: conn,
        }
    }

    /// Sends `text` as a line; the line that comes back, without its newline.
    fn echo(&mut self, text: &str) -> String {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("echo");
        line.trim_end_matches('\n').to_string()
    }
}

/// The ports of `bridge` in network namespace `ns` (`ip -o link show master`).
fn bridge_ports(ns: &str, bridge: &str) -> String {
    let ports = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "master", bridge])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&ports.stdout).into_owned()
}

/// What the client loop saw.
#[derive(Debug, Default)]
struct ClientView {
    requests: u64,
    failures: Vec<String>,
    /// Longest time between two answers (or the start and the first one).
    longest_stall: Duration,
}

/// A client in the client namespace requesting from the service in a loop
/// until stopped.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<ClientView>>,
}

impl ClientLoop {
    fn start(addr: SocketAddr, expect: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let file = fs::File::open(Path::new("/run/netns").join(CLIENT)).expect("open netns");
        let (st, an) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut view = ClientView::default();
            let mut last = Instant::now();
            while !st.load(Ordering::SeqCst) {
                view.requests += 1;
                match http_get(addr) {
                    Ok(body) if body.contains(expect) => {
                        view.longest_stall = view.longest_stall.max(last.elapsed());
                        last = Instant::now();
                        an.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(body) => view.failures.push(format!("unexpected body {body:?}")),
                    Err(e) => view.failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            view
        });
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> ClientView {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("client thread")
            .join()
            .expect("client loop")
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// migrate-in --once in host B's namespace, killed on drop.
struct Target {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Target {
    fn start(m: &Migrun, listen: &str, key: &Path, bridge: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("migrate-in.log");
        let child = migrun_in(HOST_B, m)
            .args(["migrate-in", "--listen", listen, "--once", "--bridge"])
            .arg(bridge)
            .arg("--key")
            .arg(key)
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn migrate-in");
        let t = Self {
            child,
            log,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || t.log().contains("listening")),
            "migrate-in does not listen: {}",
            t.log()
        );
        t
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn finish(&mut self) -> bool {
        let mut done = None;
        wait_until(Duration::from_secs(60), || {
            done = self.child.try_wait().ok().flatten();
            done.is_some()
        });
        done.is_some_and(|s| s.success())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn service_address_answers_from_the_target_and_tcp_connections_carry_on() {
    testbed();
    let (ip, port) = service_addr(0);
    let (src, dst) = (Migrun::new(), Migrun::new());
    let id = unique_id("net");
    let b = Bundle::new(&[
        "sh",
        "-c",
        &format!(
            "mkdir -p /www && echo served-from-the-container > /www/index.html \
             && httpd -p 80 -h /www && exec nc -l -p {ECHO_PORT} -e cat"
        ),
    ]);
    src.ok_quiet(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    attach_service_addr(&src, &id, &ip);
    let http: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let echo: SocketAddr = format!("{ip}:{ECHO_PORT}").parse().expect("addr");

    // An established connection, from the client, before the migration.
    let mut conn = EchoConn::connect(echo);
    assert_eq!(conn.echo("before the migration"), "before the migration");

    let client = ClientLoop::start(http, "served-from-the-container");
    assert!(
        wait_until(Duration::from_secs(10), || client.answered() >= 10),
        "the service does not answer on host A"
    );

    let key_dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(key_dir.path());
    let listen = format!("{ADDR_B}:{port}");
    let mut target = Target::start(&dst, &listen, &key, HOST_BRIDGE);
    let stats = key_dir.path().join("stats.json");
    let out = migrun_in(HOST_A, &src)
        .args(["migrate-out", &id, "--to", &listen, "--key"])
        .arg(&key)
        .arg("--stats-json")
        .arg(&stats)
        .arg("--work-dir")
        .arg(key_dir.path().join("out"))
        .stdin(Stdio::null())
        .output()
        .expect("migrate-out");
    let out_err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "migrate-out failed: {out_err}\nmigrate-in: {}",
        target.log()
    );
    assert!(target.finish(), "migrate-in failed: {}", target.log());
    let answered_at_migration = client.answered();

    // Where it runs now: on B, attached to B's bridge; gone from A.
    assert_eq!(dst.status(&id), "running");
    src.fails(&["state", &id]);
    let ports = bridge_ports(HOST_B, HOST_BRIDGE);
    assert!(
        ports.contains("mr") && ports.contains("state UP"),
        "no container veth on {HOST_B}/{HOST_BRIDGE}: {ports}"
    );

    // The established connection carries on.
    assert_eq!(conn.echo("after the migration"), "after the migration");

    // The client goes on being served, by B's copy.
    assert!(
        wait_until(Duration::from_secs(30), || client.answered()
            >= answered_at_migration + 20),
        "the service stopped answering after the migration"
    );
    let view = client.finish();
    let changed = dst.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "echo now-served-on-b > /www/index.html",
    ]);
    assert!(changed.status.success());
    let body = in_netns(CLIENT, move || http_get(http)).expect("GET after the change");
    assert_eq!(body, "now-served-on-b");

    let figures: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&stats).unwrap_or_default()).unwrap_or_default();
    println!(
        "client view: {} requests, {} failed, longest stall {:.0} ms; migration downtime {} ms, total {} ms",
        view.requests,
        view.failures.len(),
        view.longest_stall.as_secs_f64() * 1000.0,
        figures["downtime_ms"],
        figures["total_ms"],
    );
    assert!(
        view.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        view.failures.len(),
        view.requests,
        view.failures
    );
}

#[test]
fn failed_network_move_leaves_the_source_serving() {
    testbed();
    let (ip, port) = service_addr(1);
    let (src, dst) = (Migrun::new(), Migrun::new());
    let id = unique_id("net-fail");
    let b = Bundle::new(&[
        "sh",
        "-c",
        "mkdir -p /www && echo still-on-a > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    src.ok_quiet(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    attach_service_addr(&src, &id, &ip);
    let http: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let get = move || in_netns(CLIENT, move || http_get(http));
    assert!(wait_until(Duration::from_secs(10), || get()
        .is_ok_and(|b| b == "still-on-a")));

    let key_dir = tempfile::tempdir().expect("tmp");
    let key = pair_key(key_dir.path());
    let listen = format!("{ADDR_B}:{port}");
    // The target cannot plug the container into B's network: no such bridge.
    let mut target = Target::start(&dst, &listen, &key, "nosuchbridge");
    let out = migrun_in(HOST_A, &src)
        .args(["migrate-out", &id, "--to", &listen, "--key"])
        .arg(&key)
        .arg("--work-dir")
        .arg(key_dir.path().join("out"))
        .stdin(Stdio::null())
        .output()
        .expect("migrate-out");
    assert!(!out.status.success(), "migrate-out succeeded");
    assert!(!target.finish(), "migrate-in succeeded: {}", target.log());
    assert!(
        target.log().contains("nosuchbridge"),
        "migrate-in: {}",
        target.log()
    );

    // The source runs and serves on its address, without CRIU's network
    // lock or the hold on new connections; B has nothing.
    assert_eq!(src.status(&id), "running");
    assert_eq!(get().expect("GET after the failed migration"), "still-on-a");
    let pid = src.state(&id)["pid"].as_i64().expect("pid");
    let rules = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", "iptables", "-S"])
        .output()
        .expect("iptables -S");
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(
        !rules.contains("CRIU") && !rules.contains("MIGRUN"),
        "rules left in the source container: {rules}"
    );
    let tables = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", "nft", "list", "tables"])
        .output()
        .expect("nft list tables");
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    assert!(
        !tables.contains("CRIU"),
        "nftables lock left in the source container: {tables}"
    );
    assert!(dst.run(&["list", "-q"]).stdout.is_empty());
}

#[test]
fn checkpoint_on_a_restore_with_bridge_on_b_keeps_the_address_and_connection() {
    testbed();
    let (ip, _) = service_addr(2);
    let (src, dst) = (Migrun::new(), Migrun::new());
    let id = unique_id("net-hand");
    let b = Bundle::new(&["nc", "-l", "-p", &ECHO_PORT.to_string(), "-e", "cat"]);
    src.ok_quiet(&["run", "-d", "-b", b.path().to_str().expect("utf8"), &id]);
    attach_service_addr(&src, &id, &ip);
    let echo: SocketAddr = format!("{ip}:{ECHO_PORT}").parse().expect("addr");
    let mut conn = EchoConn::connect(echo);
    assert_eq!(conn.echo("on a"), "on a");

    let images = tempfile::tempdir().expect("tmp");
    let img = images.path().to_str().expect("utf8");
    let out = migrun_in(HOST_A, &src)
        .args(["checkpoint", "--tcp-established", "--image-path", img, &id])
        .output()
        .expect("checkpoint");
    assert!(
        out.status.success(),
        "checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    src.fails(&["state", &id]);

    // A bridge that B lacks: refused before anything is restored.
    let out = migrun_in(HOST_B, &dst)
        .args([
            "restore",
            "-d",
            "--tcp-established",
            "--bridge",
            "nosuchbridge",
        ])
        .args([
            "--image-path",
            img,
            "-b",
            b.path().to_str().expect("utf8"),
            &id,
        ])
        .output()
        .expect("restore");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "restore onto nosuchbridge succeeded");
    assert!(err.contains("nosuchbridge"), "{err}");
    assert!(dst.run(&["list", "-q"]).stdout.is_empty());

    let out = migrun_in(HOST_B, &dst)
        .args([
            "restore",
            "-d",
            "--tcp-established",
            "--bridge",
            HOST_BRIDGE,
        ])
        .args([
            "--image-path",
            img,
            "-b",
            b.path().to_str().expect("utf8"),
            &id,
        ])
        .output()
        .expect("restore");
    assert!(
        out.status.success(),
        "restore --bridge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dst.status(&id), "running");
    // The restore itself plugged the veth in, up, before it returned.
    let ports = bridge_ports(HOST_B, HOST_BRIDGE);
    assert!(
        ports.contains("mr") && ports.contains("state UP"),
        "no container veth on {HOST_B}/{HOST_BRIDGE}: {ports}"
    );
    // Tell the switch where the MAC is now (migrate-in does this itself).
    let pid = dst.state(&id)["pid"].as_i64().expect("pid");
    let garp = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args([
            "--", "busybox", "arping", "-U", "-c", "1", "-I", "eth0", &ip,
        ])
        .output()
        .expect("arping");
    assert!(garp.status.success(), "arping: {garp:?}");
    assert_eq!(conn.echo("on b"), "on b");
    dst.ok_quiet(&["delete", "-f", &id]);
}
