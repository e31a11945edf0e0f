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
//! [`release_network_lock`] removes the iptables lock a killed CRIU dump
//! leaves in a container's namespace, for a source that takes its container
//! back after a failed migration.

use std::ffi::CString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use migrun_runtime::checkpoint;
use migrun_runtime::StateRoot;

use crate::{MigrateError, Result};

/// `SIOCBRADDIF` (linux/sockios.h): add an interface to a bridge.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// When the background announcements go out, after the first one.
const REANNOUNCE: [u64; 4] = [100, 300, 700, 1500];

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
/// bridge it only says which outside ends were left unattached.
pub fn after_restore(root: &StateRoot, id: &str, bridge: Option<&str>) -> Result<Moved> {
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
            eprintln!(
                "migrate-in: {id}: outside end {outside} of {inside} left unattached (no --bridge)"
            );
        }
        return Ok(moved);
    };
    if ifindex(bridge).is_none() {
        return Err(MigrateError::Target(format!(
            "bridge {bridge} (--bridge) does not exist in migrate-in's network namespace"
        )));
    }
    let sock = Socket::new(libc::AF_INET, libc::SOCK_DGRAM, 0)
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

/// Removes the iptables network lock that a CRIU dump put in the network
/// namespace of `pid` (chain `CRIU`, jumped to from INPUT and OUTPUT) and
/// never took away because the dump was ended early. Nothing happens when
/// there is no such lock.
pub fn release_network_lock(pid: i32) {
    let ns = format!("--net=/proc/{pid}/ns/net");
    for tool in ["iptables", "ip6tables"] {
        let has_chain = std::process::Command::new("nsenter")
            .args([ns.as_str(), "--", tool, "-w", "-n", "-L", "CRIU"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_chain {
            continue;
        }
        for args in [
            &["-D", "INPUT", "-j", "CRIU"][..],
            &["-D", "OUTPUT", "-j", "CRIU"],
            &["-F", "CRIU"],
            &["-X", "CRIU"],
        ] {
            let _ = std::process::Command::new("nsenter")
                .args([ns.as_str(), "--", tool, "-w"])
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        tracing::info!(pid, tool, "CRIU's network lock released");
    }
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

/// The index of interface `name` in the calling thread's network namespace.
fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Runs `f` in a thread of its own inside the network namespace `ns`
/// (setns changes the calling thread only).
fn in_netns<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("network namespace thread panicked"))?
}

/// A socket closed on drop, for interface ioctls and raw frames.
struct Socket(OwnedFd);

impl Socket {
    fn new(domain: i32, typ: i32, proto: i32) -> std::io::Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let fd = unsafe { libc::socket(domain, typ | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// An ifreq naming `name`.
    fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(std::io::Error::other(format!(
                "bad interface name {name:?}"
            )));
        }
        // SAFETY: ifreq is plain old data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    /// ioctl `op` with `req`.
    fn ioctl(&self, op: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
        // SAFETY: the socket is valid and `req` a valid ifreq for the
        // interface ioctls this is used with.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), op as _, req as *mut libc::ifreq) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes `port` a port of `bridge` (no-op if it is already).
    fn bridge_add(&self, bridge: &str, port: &str) -> std::io::Result<()> {
        let idx = ifindex(port).ok_or_else(|| std::io::Error::other(format!("no {port}")))?;
        let mut req = Self::ifreq(bridge)?;
        req.ifr_ifru.ifru_ifindex = idx as libc::c_int;
        match self.ioctl(SIOCBRADDIF, &mut req) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            other => other,
        }
    }

    /// Sets interface `name` up.
    fn set_up(&self, name: &str) -> std::io::Result<()> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    /// The MAC address of interface `name`.
    fn mac(&self, name: &str) -> std::io::Result<[u8; 6]> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(libc::SIOCGIFHWADDR, &mut req)?;
        // SAFETY: SIOCGIFHWADDR filled in the hwaddr member of the union.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        Ok(mac)
    }
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
    let ioctl_sock = Socket::new(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
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
                    raw.0.as_raw_fd(),
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
    fn bad_interface_names_are_refused() {
        assert!(Socket::ifreq("").is_err());
        assert!(Socket::ifreq("a-name-much-too-long").is_err());
        assert!(Socket::ifreq("eth0").is_ok());
    }
}
