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

/// Links and the addresses of both families: an IPv6 node address serves IPv6 node ports, so
/// it must not wait for the periodic look either.
const GROUPS: u32 = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;

/// A subscription to link and address changes.
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

    fn ip(args: &[&str]) -> bool {
        std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success())
    }

    /// Runs `f` on a thread inside a network namespace of the test's own (named after `name`),
    /// so the events it sees are only those the test causes; `None` when not root (outside CI).
    fn in_new_namespace<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> Option<R> {
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "privileged test skipped under CI");
            return None;
        }
        let ns = format!("lb-{name}-{}", std::process::id());
        assert!(ip(&["netns", "add", &ns]));
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                let f_ns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                // Only this thread moves, and the commands it starts inherit its namespace.
                nix::sched::setns(&f_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
        });
        assert!(ip(&["netns", "del", &ns]));
        Some(result.unwrap())
    }

    /// A veth pair added in a namespace of the test's own is reported.
    #[test]
    fn link_added_in_this_namespace_is_reported() {
        let Some(result) = in_new_namespace("links", || {
            let mut events = LinkEvents::subscribe().unwrap();
            ip(&["link", "add", "lbtest0", "type", "veth", "peer", "name", "lbtest1"]) && events.wait().unwrap()
        }) else {
            return;
        };
        assert!(result, "no link event");
    }

    /// An IPv6 address added is reported (an IPv6 node address serves node ports at once).
    #[test]
    fn ipv6_address_added_in_this_namespace_is_reported() {
        let Some(found) = in_new_namespace("links6", || {
            // Loopback up first: that brings its own address events, before the subscription.
            assert!(ip(&["link", "set", "lo", "up"]));
            let mut events = LinkEvents::subscribe().unwrap();
            assert!(ip(&["-6", "addr", "add", "fd00:6c62::7/128", "dev", "lo"]));
            // Polled, so a missing subscription fails the test rather than hanging it.
            events.socket.set_non_blocking(true).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                events.buf.clear();
                let Ok(n) = events.socket.recv(&mut events.buf, 0) else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                };
                let batch = &events.buf[..n];
                let ipv6_added = NetlinkMessage::<RouteNetlinkMessage>::deserialize(batch).is_ok_and(|m| {
                    matches!(
                        m.payload,
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a))
                            if a.header.family == netlink_packet_route::AddressFamily::Inet6
                    )
                });
                if ipv6_added {
                    return relevant(batch);
                }
            }
            false
        }) else {
            return;
        };
        assert!(found, "no IPv6 address event within 5 s");
    }
}
