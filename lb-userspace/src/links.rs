//! Link and address events of this network namespace (rtnetlink multicast groups), so a new
//! interface is attached, and a new node address serves node ports, as soon as it appears
//! rather than at the next poll: a pod's veth carries translated traffic from its first
//! packet.
use std::io;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("rtnetlink socket: {0}")]
    Socket(io::Error),
}

/// `RTMGRP_LINK` and `RTMGRP_IPV4_IFADDR` (linux/rtnetlink.h).
const GROUPS: u32 = 0x1 | 0x10;

/// A subscription to link and IPv4 address changes.
pub struct LinkEvents {
    socket: Socket,
    buf: Vec<u8>,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self, LinksError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(LinksError::Socket)?;
        socket.bind(&SocketAddr::new(0, GROUPS)).map_err(LinksError::Socket)?;
        Ok(Self { socket, buf: Vec::with_capacity(64 * 1024) })
    }

    /// Blocks until the kernel reports something; `true` when it is a link or address being
    /// added, changed or removed (or when events were lost, so the caller must look anyway).
    pub fn wait(&mut self) -> Result<bool, LinksError> {
        self.buf.clear();
        let n = match self.socket.recv(&mut self.buf, 0) {
            Ok(n) => n,
            // The socket's buffer overran: events were dropped.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(LinksError::Socket(e)),
        };
        Ok(relevant(&self.buf[..n]))
    }
}

/// Whether a batch of rtnetlink messages holds a link or address change. Undecodable messages
/// count as changes: looking costs a little, missing one costs an unattached interface.
fn relevant(mut buf: &[u8]) -> bool {
    let mut any = false;
    while !buf.is_empty() {
        let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) else { return true };
        let len = m.header.length as usize;
        any |= matches!(
            m.payload,
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(_)
                    | RouteNetlinkMessage::DelLink(_)
                    | RouteNetlinkMessage::NewAddress(_)
                    | RouteNetlinkMessage::DelAddress(_)
            )
        );
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        if len == 0 || next > buf.len() {
            break;
        }
        buf = &buf[next..];
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A veth pair added in a namespace of the test's own is reported.
    #[test]
    fn link_added_in_this_namespace_is_reported() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "privileged test skipped under CI");
            return;
        }
        let ns = format!("lb-links-{}", std::process::id());
        let run = |args: &[&str]| std::process::Command::new("ip").args(args).status().map(|s| s.success());
        assert!(run(&["netns", "add", &ns]).unwrap());
        let result = std::thread::scope(|s| {
            s.spawn(|| -> bool {
                let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                // SAFETY: setns on this thread only, with a valid namespace fd.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
                    return false;
                }
                let mut events = LinkEvents::subscribe().unwrap();
                let added = std::process::Command::new("ip")
                    .args(["link", "add", "lbtest0", "type", "veth", "peer", "name", "lbtest1"])
                    .status()
                    .is_ok_and(|s| s.success());
                added && events.wait().unwrap()
            })
            .join()
            .unwrap()
        });
        let _ = run(&["netns", "del", &ns]);
        assert!(result, "no link event");
    }
}
