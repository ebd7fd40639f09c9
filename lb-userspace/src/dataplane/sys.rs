//! System calls the dataplane needs that aya does not make: bpffs, the network namespace's
//! cookie, addresses and interfaces.
use std::{
    ffi::CStr,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::{DataplaneError, Result};

/// statfs magic of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub(super) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs with a valid C string and a zeroed out-struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

pub(super) fn mount_bpffs(path: &Path) -> Result<()> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DataplaneError::Io {
            what: "mounting bpffs at",
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14).
pub(super) fn netns_cookie() -> Result<u64> {
    let err =
        |source| DataplaneError::Io { what: "reading the cookie of", path: "this network namespace".into(), source };
    // SAFETY: a throwaway socket queried with getsockopt into a u64, then closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie as *mut u64 as *mut _, &mut len);
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err(e));
        }
        Ok(cookie)
    }
}

/// An error and all its causes on one line: aya's errors keep the OS error in `source()`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// IPv4 addresses of the current network namespace (`getifaddrs(3)`).
pub fn local_ipv4_addresses() -> Result<Vec<Ipv4Addr>> {
    Ok(local_ipv4_by_interface()?.into_iter().map(|(_, ip)| ip).collect())
}

/// (interface, IPv4 address) pairs of the current network namespace.
pub fn local_ipv4_by_interface() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(DataplaneError::Io {
                what: "listing addresses of",
                path: PathBuf::from("this network namespace"),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                out.push((CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned(), ip));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// Interfaces of the current network namespace, by name and index (`if_nameindex(3)`, which
/// asks netlink, so it is right inside `ip netns exec` or `nsenter --net`).
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(DataplaneError::Io {
                what: "listing interfaces of",
                path: PathBuf::from("this network namespace"),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 {
            out.push((CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(), (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// Removes everything an agent pinned: links (detaching the programs) and maps.
pub fn cleanup(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    fs::remove_dir_all(pin_dir).map_err(|source| DataplaneError::Io {
        what: "removing",
        path: pin_dir.to_owned(),
        source,
    })
}
