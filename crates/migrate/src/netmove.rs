//! The network moves with the container: after a restore on the target,
//! the container's veths are plugged into this host's bridge and its
//! addresses announced, as a hypervisor does after a VM's live migration on
//! one L2 segment.
//!
//! CRIU dumps the container's network namespace with the inside end of each
//! veth (name, MAC, addresses, routes); the outside end was in the source
//! host's namespace and is not dumped. On restore, CRIU recreates each pair
//! with the outside end in the restoring process's network namespace (this
//! `migrate-in`'s), named by [`checkpoint::veth_outside_name`]. [`after_restore`]
//! then makes that end a port of the host's bridge, brings it up, and sends
//! a gratuitous ARP for every IPv4 address of the container from inside its
//! namespace, so that the switches between the hosts learn at once that the
//! container's MAC is now behind this host. The announcement is repeated a
//! few times in the background (the source's copy may answer an ARP request
//! in the few milliseconds before it is killed).
//!
//! On the source, [`quiesce`] runs just before the freeze: CRIU cannot dump
//! a connection that waits in a listening socket's accept queue, and one
//! that arrived while the container was frozen could only be dropped (its
//! client would see a reset). So new connections are held off first (their
//! SYNs dropped by an iptables chain in the container's namespace; clients
//! send them again a second later, by then to the target) and the accept
//! queues drain while the container still runs. The target empties that
//! chain after the restore. [`release`] undoes it, and the iptables lock a
//! killed CRIU dump leaves behind, for a source that takes its container
//! back after a failed migration.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use migrun_runtime::checkpoint;
use migrun_runtime::netdev::{ifindex, in_netns, Socket};
use migrun_runtime::StateRoot;

use crate::{MigrateError, Result};

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// When the background announcements go out, after the first one.
const REANNOUNCE: [u64; 4] = [100, 300, 700, 1500];
/// The iptables chain that holds off new connections during a migration.
const QUIESCE_CHAIN: &str = "MIGRUN-QUIESCE";
/// How long [`quiesce`] waits for the accept queues to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// What [`after_restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    /// (inside name, outside name) of each veth attached to the bridge.
    pub veths: Vec<(String, String)>,
    /// The IPv4 addresses announced.
    pub announced: Vec<Ipv4Addr>,
}

/// Attaches the outside ends of restored container `id`'s veths to
/// `bridge` (in this process's network namespace), brings them up and
/// announces the container's IPv4 addresses with gratuitous ARP. Without a
/// bridge it only says (to `events`) which outside ends were left unattached.
pub fn after_restore(
    root: &StateRoot,
    id: &str,
    bridge: Option<&str>,
    hold: QuiesceInImages,
    events: &crate::events::Events,
) -> Result<Moved> {
    let container = root.load(id)?;
    let pid = container
        .pid()
        .ok_or_else(|| MigrateError::Target(format!("restored container {id} has no pid")))?
        .as_raw();
    let mut moved = Moved::default();
    let ours: Vec<(String, String)> = interfaces(pid)
        .into_iter()
        .map(|inside| {
            let outside = checkpoint::veth_outside_name(root, id, &inside);
            (inside, outside)
        })
        .filter(|(_, outside)| ifindex(outside).is_some())
        .collect();
    if ours.is_empty() {
        return Ok(moved);
    }
    let Some(bridge) = bridge else {
        for (inside, outside) in &ours {
            events.emit(crate::events::Event::VethUnattached {
                container: id.to_string(),
                inside: inside.clone(),
                outside: outside.clone(),
            });
        }
        return Ok(moved);
    };
    if ifindex(bridge).is_none() {
        return Err(MigrateError::Target(format!(
            "bridge {bridge} (--bridge) does not exist in migrate-in's network namespace"
        )));
    }
    let sock = Socket::for_ioctls()
        .map_err(|e| MigrateError::Target(format!("socket for bridge {bridge}: {e}")))?;
    for (inside, outside) in ours {
        sock.bridge_add(bridge, &outside).map_err(|e| {
            MigrateError::Target(format!("attach {outside} ({id}:{inside}) to {bridge}: {e}"))
        })?;
        sock.set_up(&outside)
            .map_err(|e| MigrateError::Target(format!("bring {outside} up: {e}")))?;
        moved.veths.push((inside, outside));
    }
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| MigrateError::Target(format!("network namespace of {id}: {e}")))?;
    // The source's hold on new connections came along with its rules,
    // unless it was taken out of the images before the restore.
    if hold == QuiesceInImages::Unknown {
        in_netns(&ns, || {
            iptables_restore(&format!("*filter\n:{QUIESCE_CHAIN} - [0:0]\nCOMMIT\n"))
        })
        .map_err(|e| MigrateError::Target(format!("let connections into {id} again: {e}")))?;
    }
    let names: Vec<String> = moved.veths.iter().map(|(i, _)| i.clone()).collect();
    moved.announced = in_netns(&ns, {
        let names = names.clone();
        move || announce(&names)
    })
    .map_err(|e| MigrateError::Target(format!("announce the addresses of {id}: {e}")))?;
    // Again, in the background: best effort, nothing waits for it.
    std::thread::spawn(move || {
        for ms in REANNOUNCE {
            std::thread::sleep(Duration::from_millis(ms));
            let names = names.clone();
            if in_netns(&ns, move || announce(&names)).is_err() {
                break;
            }
        }
    });
    Ok(moved)
}

/// Holds off new TCP connections into container `id`'s network namespace
/// (their SYNs are dropped; clients retry) and waits up to half a second
/// for its accept queues to drain while it still runs. Does nothing for a
/// container without interfaces besides loopback or without a listening
/// TCP socket. IPv4 only. Returns whether connections are held off.
pub fn quiesce(root: &StateRoot, id: &str) -> bool {
    let Some(pid) = root.load(id).ok().and_then(|c| c.pid()).map(|p| p.as_raw()) else {
        return false;
    };
    if interfaces(pid).is_empty() || !tcp_sockets(pid).iter().any(|s| s.listening) {
        return false;
    }
    let Ok(ns) = File::open(format!("/proc/{pid}/ns/net")) else {
        return false;
    };
    let rules = format!(
        "*filter\n:{QUIESCE_CHAIN} - [0:0]\n-I INPUT -j {QUIESCE_CHAIN}\n\
         -A {QUIESCE_CHAIN} -p tcp --syn -j DROP\nCOMMIT\n"
    );
    if let Err(e) = in_netns(&ns, move || iptables_restore(&rules)) {
        tracing::warn!("hold off new connections into {id}: {e}");
        return false;
    }
    let t = std::time::Instant::now();
    while t.elapsed() < DRAIN_TIMEOUT {
        let socks = tcp_sockets(pid);
        if socks.iter().all(|s| !s.half_open && s.queued == 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::info!(
        id,
        drained_ms = t.elapsed().as_secs_f64() * 1000.0,
        "new connections held off"
    );
    true
}

/// Undoes [`quiesce`] and removes the iptables network lock that a CRIU
/// dump put in container `id`'s network namespace and never took away
/// (the dump was ended early): for a container that runs on after a failed
/// migration. Nothing happens when neither is there.
pub fn release(root: &StateRoot, id: &str) {
    let Some(pid) = root.load(id).ok().and_then(|c| c.pid()).map(|p| p.as_raw()) else {
        return;
    };
    let Ok(ns) = File::open(format!("/proc/{pid}/ns/net")) else {
        return;
    };
    let _ = in_netns(&ns, move || {
        for tool in ["iptables", "ip6tables"] {
            for chain in [QUIESCE_CHAIN, "CRIU"] {
                let has_chain = std::process::Command::new(tool)
                    .args(["-w", "-n", "-L", chain])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !has_chain {
                    continue;
                }
                for args in [
                    &["-D", "INPUT", "-j", chain][..],
                    &["-D", "OUTPUT", "-j", chain],
                    &["-F", chain],
                    &["-X", chain],
                ] {
                    let _ = std::process::Command::new(tool)
                        .arg("-w")
                        .args(args)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status();
                }
                tracing::info!(pid, tool, chain, "iptables chain removed");
            }
        }
        // CRIU's nftables lock: a table `inet CRIU-<id>`.
        let tables = std::process::Command::new("nft")
            .args(["list", "tables", "inet"])
            .stderr(std::process::Stdio::null())
            .output();
        if let Ok(out) = tables {
            for table in criu_lock_tables(&String::from_utf8_lossy(&out.stdout)) {
                let _ = std::process::Command::new("nft")
                    .args(["delete", "table", "inet", &table])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                tracing::info!(pid, table, "nftables lock table removed");
            }
        }
        Ok(())
    });
}

/// What the images of a network namespace held of the source's hold on
/// new connections ([`quiesce`]), after [`unquiesce_images`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuiesceInImages {
    /// No hold in the images (nothing listened, or no namespace of its own).
    NotHeld,
    /// The hold's rules were taken out: the restored namespace lets new
    /// connections in at once (the kernel queues them while the restored
    /// processes are stopped), and nothing is left to run after the restore.
    Released,
    /// The chain is in the images in a form not recognised: empty it in the
    /// restored namespace (an iptables-restore run).
    Unknown,
}

/// Takes the rules of the source's hold on new connections out of the
/// netfilter images in `image_dir` (CRIU keeps nftables as `nft list
/// ruleset` text and legacy iptables as `iptables-save` text), leaving the
/// chain empty: before the restore, for the cost of a string edit, instead
/// of an iptables-restore run in the downtime after it.
pub fn unquiesce_images(image_dir: &Path) -> Result<QuiesceInImages> {
    let mut seen = false;
    let mut released = false;
    let entries = fs::read_dir(image_dir)
        .map_err(|e| MigrateError::Target(format!("read {}: {e}", image_dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let netfilter = ["nftables-", "iptables-", "ip6tables-"]
            .iter()
            .any(|p| name.starts_with(p))
            && name.ends_with(".img");
        if !netfilter {
            continue;
        }
        let path = entry.path();
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        if !text.contains(QUIESCE_CHAIN) {
            continue;
        }
        seen = true;
        if let Some(edited) = drop_quiesce_rules(&text) {
            fs::write(&path, edited)
                .map_err(|e| MigrateError::Target(format!("write {}: {e}", path.display())))?;
            released = true;
        }
    }
    Ok(match (seen, released) {
        (false, _) => QuiesceInImages::NotHeld,
        (true, true) => QuiesceInImages::Released,
        (true, false) => QuiesceInImages::Unknown,
    })
}

/// `text` without the rules of [`QUIESCE_CHAIN`] (the chain and the jumps
/// to it stay, empty chains let everything through), or None when it has
/// none in a form recognised here.
fn drop_quiesce_rules(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut dropped = false;
    let mut in_chain = false;
    let rule_prefix = format!("-A {QUIESCE_CHAIN} ");
    let chain_head = format!("chain {QUIESCE_CHAIN} {{");
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if in_chain {
            if t == "}" {
                in_chain = false;
            } else {
                dropped |= !t.is_empty();
                continue;
            }
        } else if t == chain_head {
            in_chain = true;
        } else if t.starts_with(&rule_prefix) {
            dropped = true;
            continue;
        }
        out.push_str(line);
    }
    dropped.then_some(out)
}

/// The names of CRIU's lock tables in `nft list tables inet` output.
fn criu_lock_tables(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|name| name.starts_with("CRIU-"))
        .map(str::to_string)
        .collect()
}

/// Feeds `rules` to `iptables-restore --noflush` (the calling thread's
/// network namespace).
fn iptables_restore(rules: &str) -> std::io::Result<()> {
    let mut child = std::process::Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, rules.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "iptables-restore: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A TCP socket of a network namespace, as `/proc/PID/net/tcp` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpSocket {
    /// In LISTEN state.
    listening: bool,
    /// A connection still in its handshake (SYN_RECV).
    half_open: bool,
    /// Connections waiting in the accept queue (listening sockets).
    queued: u64,
}

/// Parses one line of `/proc/net/tcp{,6}` (after the header).
fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let mut fields = line.split_whitespace();
    let state = fields.nth(3)?;
    let queues = fields.next()?;
    let (_, rx) = queues.split_once(':')?;
    let state = u8::from_str_radix(state, 16).ok()?;
    let rx = u64::from_str_radix(rx, 16).ok()?;
    Some(TcpSocket {
        listening: state == 0x0a,
        half_open: state == 0x03,
        queued: if state == 0x0a { rx } else { 0 },
    })
}

/// The TCP sockets of the network namespace of `pid`.
fn tcp_sockets(pid: i32) -> Vec<TcpSocket> {
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .map(|text| {
                    text.lines()
                        .skip(1)
                        .filter_map(parse_tcp_line)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// The interfaces of the network namespace of `pid`, loopback excepted.
fn interfaces(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|dev| {
            dev.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty() && n != "lo")
                .collect()
        })
        .unwrap_or_default()
}

/// The IPv4 addresses of interface `name` (calling thread's namespace).
fn ipv4_addresses(name: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr points to a sockaddr of at least its family's size.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if ifname.to_bytes() != name.as_bytes() || i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// A gratuitous ARP frame: a broadcast request for `ip` from `ip` at `mac`.
fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address: zero; target protocol address: ip
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends a gratuitous ARP for every IPv4 address of the interfaces `names`
/// (calling thread's namespace); returns the addresses announced.
fn announce(names: &[String]) -> std::io::Result<Vec<Ipv4Addr>> {
    let ioctl_sock = Socket::for_ioctls()?;
    let raw = Socket::new(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from(ETH_P_ARP.to_be()),
    )?;
    let mut announced = Vec::new();
    for name in names {
        let addrs = ipv4_addresses(name)?;
        if addrs.is_empty() {
            continue;
        }
        let idx = ifindex(name).ok_or_else(|| std::io::Error::other(format!("no {name}")))?;
        let mac = ioctl_sock.mac(name)?;
        for ip in addrs {
            let frame = garp_frame(mac, ip);
            // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
            let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_protocol = ETH_P_ARP.to_be();
            to.sll_ifindex = idx as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            // SAFETY: the frame and the address are valid for the lengths given.
            let sent = unsafe {
                libc::sendto(
                    raw.raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if sent < 0 {
                return Err(std::io::Error::last_os_error());
            }
            announced.push(ip);
        }
    }
    Ok(announced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_is_a_broadcast_request_for_its_own_address() {
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        let ip = Ipv4Addr::new(10, 77, 0, 100);
        let f = garp_frame(mac, ip);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &ip.octets());
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &ip.octets());
    }

    #[test]
    fn tcp_lines_give_state_and_accept_queue() {
        let listen = "   0: 00000000:0050 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0";
        let syn = "   1: 6400500A:0050 0A00500A:D431 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0";
        let est = "   2: 6400500A:1B58 0A00500A:D432 01 00000000:00000010 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        let l = parse_tcp_line(listen).expect("listen");
        assert!(l.listening && !l.half_open);
        assert_eq!(l.queued, 2);
        let s = parse_tcp_line(syn).expect("syn");
        assert!(s.half_open && !s.listening);
        let e = parse_tcp_line(est).expect("est");
        assert_eq!(e.queued, 0);
        assert!(parse_tcp_line("garbage").is_none());
    }

    #[test]
    fn quiesce_rules_leave_nft_and_iptables_save_text() {
        let nft = "table ip filter {\n\tchain MIGRUN-QUIESCE {\n\t\ttcp flags syn / fin,syn,rst,ack counter packets 0 bytes 0 drop\n\t}\n\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tcounter packets 0 bytes 0 jump MIGRUN-QUIESCE\n\t}\n}\n";
        let edited = drop_quiesce_rules(nft).expect("nft rules dropped");
        assert!(!edited.contains("drop"), "{edited}");
        assert!(edited.contains("chain MIGRUN-QUIESCE {\n\t}"), "{edited}");
        assert!(edited.contains("jump MIGRUN-QUIESCE"), "{edited}");
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:MIGRUN-QUIESCE - [0:0]\n-A INPUT -j MIGRUN-QUIESCE\n-A MIGRUN-QUIESCE -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j DROP\nCOMMIT\n";
        let edited = drop_quiesce_rules(save).expect("iptables rules dropped");
        assert!(!edited.contains("DROP"), "{edited}");
        assert!(
            edited.contains(":MIGRUN-QUIESCE - [0:0]\n-A INPUT -j MIGRUN-QUIESCE\nCOMMIT"),
            "{edited}"
        );
        assert!(drop_quiesce_rules("table inet other {\n}\n").is_none());
    }

    #[test]
    fn only_criu_lock_tables_are_picked() {
        let listing = "table inet filter\ntable inet CRIU-4242\ntable inet CRIUX\n";
        assert_eq!(criu_lock_tables(listing), vec!["CRIU-4242".to_string()]);
    }
}
