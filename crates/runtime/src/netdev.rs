//! Network interfaces by ioctl: bringing one up, making it a bridge port,
//! reading its MAC; and running code inside another network namespace.
//!
//! Small and dependency-free on purpose: a restore uses these inside
//! CRIU's notifications, where every millisecond is downtime, and the
//! migration engine uses them after a restore.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SIOCBRADDIF` (linux/sockios.h): add an interface to a bridge.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Runs `f` in a thread of its own inside the network namespace `ns`
/// (setns changes the calling thread only).
pub fn in_netns<T: Send + 'static>(
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

/// A socket closed on drop, for interface ioctls and raw frames (of the
/// network namespace of the thread that made it).
pub struct Socket(OwnedFd);

impl Socket {
    /// `socket(domain, typ | SOCK_CLOEXEC, proto)`.
    pub fn new(domain: i32, typ: i32, proto: i32) -> std::io::Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let fd = unsafe { libc::socket(domain, typ | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A datagram socket for interface ioctls.
    pub fn for_ioctls() -> std::io::Result<Self> {
        Self::new(libc::AF_INET, libc::SOCK_DGRAM, 0)
    }

    /// The raw descriptor (for sendto of raw frames).
    pub fn raw_fd(&self) -> i32 {
        self.0.as_raw_fd()
    }

    /// An ifreq naming `name`.
    pub fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
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
    pub fn bridge_add(&self, bridge: &str, port: &str) -> std::io::Result<()> {
        let idx = ifindex(port).ok_or_else(|| std::io::Error::other(format!("no {port}")))?;
        let mut req = Self::ifreq(bridge)?;
        req.ifr_ifru.ifru_ifindex = idx as libc::c_int;
        match self.ioctl(SIOCBRADDIF, &mut req) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            other => other,
        }
    }

    /// Sets interface `name` up (no-op if it is).
    pub fn set_up(&self, name: &str) -> std::io::Result<()> {
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
    pub fn mac(&self, name: &str) -> std::io::Result<[u8; 6]> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_interface_names_are_refused() {
        assert!(Socket::ifreq("").is_err());
        assert!(Socket::ifreq("a-name-much-too-long").is_err());
        assert!(Socket::ifreq("eth0").is_ok());
    }

    #[test]
    fn loopback_has_an_index_and_a_missing_interface_none() {
        assert!(ifindex("lo").is_some());
        assert!(ifindex("no-such-if0").is_none());
    }
}
