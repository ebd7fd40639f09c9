//! Closing the node's own connected UDP sockets whose backend left (`SOCK_DESTROY` over
//! `NETLINK_SOCK_DIAG`, `CONFIG_INET_DIAG_DESTROY`).
//!
//! The socket-level programs point a connected UDP socket at a backend once, at `connect()`;
//! no packet of it is ever translated again, so conntrack cleanup cannot move it. The socket is
//! aborted instead, as Cilium does with `bpf_sock_destroy`: `udp_abort` (net/ipv4/udp.c) leaves
//! `ECONNABORTED` for the next receive and disconnects the socket (a send without an address
//! then fails with `EDESTADDRREQ`), and a resolver that opens a new socket gets a live backend. Only sockets whose cookie the socket programs recorded for the departed
//! backend are touched; a socket a process connected to the pod address itself is left alone.
//! Netlink sockets see their own network namespace only, which is the agent's, as required.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr as IpSocketAddr},
};

use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("sock_diag netlink socket: {0}")]
    Socket(io::Error),
    #[error("sock_diag {what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error("sock_diag: kernel answered error {errno} to {what}")]
    Kernel { what: &'static str, errno: i32 },
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to and including the socket id.
const MSG_ID_END: usize = 4 + SOCKID_LEN;

/// One UDP socket of this namespace, as the kernel identifies it. An IPv6 socket's
/// IPv4-mapped peer (`::ffff:a.b.c.d`) reads as the IPv4 address it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSock {
    pub local: IpSocketAddr,
    pub remote: IpSocketAddr,
    pub cookie: u64,
    /// `AF_INET` or `AF_INET6`, and the raw `inet_diag_sockid`, sent back as is to destroy
    /// the socket.
    family: u8,
    id: [u8; SOCKID_LEN],
}

/// Parses the socket id of an `inet_diag_msg` payload of `family` (`AF_INET`: the addresses'
/// first 4 bytes, `AF_INET6`: all 16).
fn parse_sockid(family: u8, id: &[u8]) -> Option<UdpSock> {
    let id: [u8; SOCKID_LEN] = id.get(..SOCKID_LEN)?.try_into().ok()?;
    let port = |o: usize| u16::from_be_bytes([id[o], id[o + 1]]);
    let addr = |o: usize| -> IpAddr {
        if family == libc::AF_INET6 as u8 {
            let a: [u8; 16] = id[o..o + 16].try_into().expect("16 bytes");
            Ipv6Addr::from(a).to_canonical()
        } else {
            Ipv4Addr::new(id[o], id[o + 1], id[o + 2], id[o + 3]).into()
        }
    };
    let word = |o: usize| u32::from_ne_bytes([id[o], id[o + 1], id[o + 2], id[o + 3]]) as u64;
    Some(UdpSock {
        local: IpSocketAddr::new(addr(4), port(0)),
        remote: IpSocketAddr::new(addr(20), port(2)),
        // sock_diag_save_cookie: low word first.
        cookie: word(40) | (word(44) << 32),
        family,
        id,
    })
}

fn request(msg_type: u16, flags: u16, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&msg_type.to_ne_bytes());
    b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    b.push(family);
    b.push(libc::IPPROTO_UDP as u8);
    b.push(0); // no extensions
    b.push(0);
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    b.extend_from_slice(id);
    b
}

fn open() -> Result<Socket, SockDiagError> {
    let s = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)?;
    s.connect(&SocketAddr::new(0, 0)).map_err(SockDiagError::Socket)?;
    Ok(s)
}

fn send(fd: &Socket, msg: &[u8], what: &'static str) -> Result<(), SockDiagError> {
    fd.send(msg, 0).map_err(|source| SockDiagError::Io { what, source })?;
    Ok(())
}

/// Reads netlink messages until DONE or an error/ack, handing each payload of `want_type`
/// to `each`. Returns the errno of an NLMSG_ERROR (0 for an ack).
fn receive(fd: &Socket, what: &'static str, mut each: impl FnMut(&[u8])) -> Result<i32, SockDiagError> {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let n = fd.recv(&mut buf, 0).map_err(|source| SockDiagError::Io { what, source })?;
        let mut msgs = &buf[..n];
        while msgs.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
            let typ = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
            if len < NLMSG_HDR || len > msgs.len() {
                return Err(SockDiagError::Kernel { what, errno: libc::EBADMSG });
            }
            let payload = &msgs[NLMSG_HDR..len];
            match typ {
                NLMSG_DONE => return Ok(0),
                NLMSG_ERROR => {
                    let errno = payload.get(..4).map_or(0, |e| i32::from_ne_bytes(e.try_into().expect("4 bytes")));
                    return Ok(-errno);
                }
                SOCK_DIAG_BY_FAMILY => each(payload),
                _ => {}
            }
            // NLMSG_ALIGN(len)
            let step = (len + 3) & !3;
            msgs = &msgs[step.min(msgs.len())..];
        }
    }
}

/// Every UDP socket of this network namespace, IPv4 and IPv6. A kernel without IPv6 has no
/// IPv6 sockets to list.
pub fn udp_sockets() -> Result<Vec<UdpSock>, SockDiagError> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let fd = open()?;
        send(&fd, &request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, family, &[0; SOCKID_LEN]), "dump request")?;
        let errno = receive(&fd, "dump", |payload| {
            if let Some(s) = payload.get(4..MSG_ID_END).and_then(|id| parse_sockid(family, id)) {
                out.push(s);
            }
        })?;
        match errno {
            0 => {}
            e if family == libc::AF_INET6 as u8 && e == libc::ENOENT => {}
            errno => return Err(SockDiagError::Kernel { what: "dump", errno }),
        }
    }
    Ok(out)
}

/// Aborts one socket. `Ok(false)`: it was already gone.
pub fn destroy(sock: &UdpSock) -> Result<bool, SockDiagError> {
    let fd = open()?;
    send(&fd, &request(SOCK_DESTROY, NLM_F_ACK, sock.family, &sock.id), "destroy request")?;
    match receive(&fd, "destroy", |_| {})? {
        0 => Ok(true),
        e if e == libc::ENOENT => Ok(false),
        errno => Err(SockDiagError::Kernel { what: "destroy", errno }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_parse_as_the_kernel_lays_them_out() {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&5353u16.to_be_bytes());
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[4..8].copy_from_slice(&[10, 0, 0, 1]);
        id[20..24].copy_from_slice(&[10, 244, 1, 11]);
        let cookie: u64 = 0x1122_3344_5566_7788;
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        let s = parse_sockid(libc::AF_INET as u8, &id).unwrap();
        assert_eq!(s.local, "10.0.0.1:5353".parse().unwrap());
        assert_eq!(s.remote, "10.244.1.11:53".parse().unwrap());
        assert_eq!(s.cookie, cookie);
        let req = request(SOCK_DESTROY, NLM_F_ACK, s.family, &s.id);
        assert_eq!(req.len(), 72);
        assert_eq!(req[NLMSG_HDR], libc::AF_INET as u8);
        assert_eq!(&req[NLMSG_HDR + 8..], &id[..]);

        // IPv6: 16-byte addresses; an IPv4-mapped peer reads as IPv4.
        id[4..20].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        id[20..36].copy_from_slice(&"::ffff:10.244.1.11".parse::<Ipv6Addr>().unwrap().octets());
        let s = parse_sockid(libc::AF_INET6 as u8, &id).unwrap();
        assert_eq!(s.local, "[fd00::1]:5353".parse().unwrap());
        assert_eq!(s.remote, "10.244.1.11:53".parse().unwrap());
        assert_eq!(request(SOCK_DESTROY, NLM_F_ACK, s.family, &s.id)[NLMSG_HDR], libc::AF_INET6 as u8);
    }

    #[test]
    fn a_connected_socket_of_this_process_is_listed_with_its_cookie() {
        use std::os::fd::AsRawFd as _;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "SOCK_DESTROY needs root; CI runs as root");
            return;
        }
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt with a valid out-buffer of the right size.
        let rc = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let socks = udp_sockets().unwrap();
        let me = socks.iter().find(|s| s.cookie == cookie).expect("listed");
        assert_eq!(me.remote, server.local_addr().unwrap());
        assert!(destroy(me).unwrap());
        // udp_abort: a pending ECONNABORTED for the next receive, and the socket is
        // disconnected, so a send without an address fails too.
        client.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        let err = client.recv(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED));
        let err = client.send(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDESTADDRREQ));

        // An IPv6 socket is listed and aborted the same way.
        let (Ok(server), Ok(client)) = (std::net::UdpSocket::bind("[::1]:0"), std::net::UdpSocket::bind("[::1]:0"))
        else {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI machines have IPv6");
            return;
        };
        client.connect(server.local_addr().unwrap()).unwrap();
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: as above.
        let rc = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let socks = udp_sockets().unwrap();
        let me = socks.iter().find(|s| s.cookie == cookie).expect("the IPv6 socket listed");
        assert_eq!(me.remote, server.local_addr().unwrap());
        assert!(destroy(me).unwrap());
        client.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        assert_eq!(client.recv(&mut [0u8; 16]).unwrap_err().raw_os_error(), Some(libc::ECONNABORTED));
    }
}
