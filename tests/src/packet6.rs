//! IPv6 frames for packet tests, and an independent parser that checks them (the IPv6 twin of
//! `packet.rs`). Checksums are recomputed from scratch here, over RFC 8200's 40-byte
//! pseudo-header (addresses, 32-bit upper-layer length, next header).
use std::net::Ipv6Addr;

use crate::packet::{fold, sum16, CLIENT_MAC, GW_MAC, L4};

pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DEST_OPTS: u8 = 60;
pub const PROTO_ICMPV6: u8 = 58;

/// The upper-layer checksum of `l4` (TCP, UDP, ICMPv6) between `src` and `dst`.
pub fn l4_checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    fold(sum16(&pseudo) + sum16(l4))
}

/// The TCP or UDP header and payload, with its checksum.
fn l4_bytes(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), l4: L4, payload: &[u8]) -> (u8, Vec<u8>) {
    let (proto, mut b) = match l4 {
        L4::Tcp { flags } => {
            let mut t = vec![0u8; 20];
            t[4..8].copy_from_slice(&1000u32.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t[14..16].copy_from_slice(&65535u16.to_be_bytes());
            (6u8, t)
        }
        L4::Udp { .. } => {
            let mut u = vec![0u8; 8];
            u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            (17u8, u)
        }
    };
    b[0..2].copy_from_slice(&src.1.to_be_bytes());
    b[2..4].copy_from_slice(&dst.1.to_be_bytes());
    b.extend_from_slice(payload);
    let csum = l4_checksum6(src.0, dst.0, proto, &b);
    match l4 {
        L4::Tcp { .. } => b[16..18].copy_from_slice(&csum.to_be_bytes()),
        L4::Udp { zero_csum: false } => b[6..8].copy_from_slice(&(if csum == 0 { 0xffff } else { csum }).to_be_bytes()),
        L4::Udp { zero_csum: true } => {}
    }
    (proto, b)
}

/// Ethernet + IPv6 header (+ `ext`, a chain of extension headers given as (type, length in
/// bytes, a multiple of 8)) + `next`/`body`.
pub fn ip6_frame(src: Ipv6Addr, dst: Ipv6Addr, ext: &[(u8, usize)], next: u8, body: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, &(_, len)) in ext.iter().enumerate() {
        assert!(len >= 8 && len % 8 == 0, "extension header length {len}");
        let nh = ext.get(i + 1).map_or(next, |e| e.0);
        let mut h = vec![0u8; len];
        h[0] = nh;
        h[1] = (len / 8 - 1) as u8;
        // PadN option filling the rest (harmless for every type we use here).
        h[2] = 1;
        h[3] = (len - 4) as u8;
        chain.extend_from_slice(&h);
    }
    let first = ext.first().map_or(next, |e| e.0);
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&((chain.len() + body.len()) as u16).to_be_bytes());
    ip[6] = first;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&chain);
    f.extend_from_slice(body);
    f
}

/// Builds Ethernet + IPv6 + TCP/UDP with a correct checksum.
pub fn frame6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), l4: L4, payload: &[u8]) -> Vec<u8> {
    frame6_ext(src, dst, &[], l4, payload)
}

/// As `frame6`, with extension headers in front of the L4 header.
pub fn frame6_ext(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), ext: &[(u8, usize)], l4: L4, payload: &[u8]) -> Vec<u8> {
    let (proto, b) = l4_bytes(src, dst, l4, payload);
    ip6_frame(src.0, dst.0, ext, proto, &b)
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Parsed6 {
    pub src: (Ipv6Addr, u16),
    pub dst: (Ipv6Addr, u16),
    pub proto: u8,
    pub l4_csum: u16,
    pub hop_limit: u8,
}

/// Walks the extension headers; returns (upper-layer protocol, its offset in the frame).
fn walk(f: &[u8]) -> (u8, usize) {
    let mut next = f[14 + 6];
    let mut off = 14 + 40;
    loop {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                next = f[off];
                off += (f[off + 1] as usize + 1) * 8;
            }
            NEXT_FRAGMENT => {
                next = f[off];
                off += 8;
            }
            _ => return (next, off),
        }
    }
}

fn addr(b: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))
}

/// Parses an IPv6 frame and checks its L4 checksum from scratch; panics with a reason if the
/// frame is invalid (a UDP checksum of zero is invalid in IPv6, RFC 8200 8.1).
pub fn parse6_checked(f: &[u8]) -> Parsed6 {
    assert!(f.len() >= 54, "frame too short: {}", f.len());
    assert_eq!(&f[12..14], &[0x86, 0xdd], "not IPv6");
    assert_eq!(f[14] >> 4, 6, "IP version");
    let payload = u16::from_be_bytes([f[18], f[19]]) as usize;
    assert_eq!(f.len(), 54 + payload, "payload length");
    let (src, dst) = (addr(&f[22..38]), addr(&f[38..54]));
    let (proto, off) = walk(f);
    let l4 = &f[off..];
    let csum_off = if proto == 6 { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    assert!(!(proto == 17 && l4_csum == 0), "IPv6 UDP checksum zero");
    assert_eq!(l4_checksum6(src, dst, proto, l4), 0, "L4 checksum invalid");
    Parsed6 {
        src: (src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: (dst, u16::from_be_bytes([l4[2], l4[3]])),
        proto,
        l4_csum,
        hop_limit: f[21],
    }
}

/// An ICMPv6 error from `src` to `dst` quoting `quote` (an IPv6 packet without Ethernet).
pub fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quote);
    let c = l4_checksum6(src, dst, PROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ip6_frame(src, dst, &[], PROTO_ICMPV6, &m)
}

/// Checks an ICMPv6 message's checksum; returns (outer source, outer destination, type, code,
/// the quote).
pub fn parse_icmp6_checked(f: &[u8]) -> (Ipv6Addr, Ipv6Addr, u8, u8, Vec<u8>) {
    assert_eq!(&f[12..14], &[0x86, 0xdd], "not IPv6");
    let payload = u16::from_be_bytes([f[18], f[19]]) as usize;
    assert_eq!(f.len(), 54 + payload, "payload length");
    let (src, dst) = (addr(&f[22..38]), addr(&f[38..54]));
    let (proto, off) = walk(f);
    assert_eq!(proto, PROTO_ICMPV6, "not ICMPv6");
    let m = &f[off..];
    assert_eq!(l4_checksum6(src, dst, PROTO_ICMPV6, m), 0, "ICMPv6 checksum invalid");
    (src, dst, m[0], m[1], m[8..].to_vec())
}

/// Splits an IPv6 frame without extension headers into fragments (a fragment header each)
/// of at most `payload` bytes of the fragmentable part (a multiple of 8), identification `id`.
pub fn fragment6(f: &[u8], payload: usize, id: u32) -> Vec<Vec<u8>> {
    assert_eq!(payload % 8, 0);
    let next = f[14 + 6];
    let (src, dst) = (addr(&f[22..38]), addr(&f[38..54]));
    let data = &f[54..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let end = (off + payload).min(data.len());
        let more = end < data.len();
        let mut h = vec![next, 0, 0, 0];
        let offset_m = ((off / 8) as u16) << 3 | u16::from(more);
        h[2..4].copy_from_slice(&offset_m.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&data[off..end]);
        let mut frame = ip6_frame(src, dst, &[], NEXT_FRAGMENT, &h);
        frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        out.push(frame);
        off = end;
    }
    out
}

/// Puts fragments (in any order) back together; checks they agree on addresses.
pub fn reassemble6(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, u8, &[u8])> = frags
        .iter()
        .map(|f| {
            assert_eq!(f[14 + 6], NEXT_FRAGMENT, "not a fragment");
            assert_eq!(&f[22..54], &frags[0][22..54], "fragments disagree on addresses");
            let h = &f[54..62];
            let offset = (u16::from_be_bytes([h[2], h[3]]) >> 3) as usize * 8;
            (offset, h[0], &f[62..])
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let mut data = Vec::new();
    for (offset, _, d) in &parts {
        assert_eq!(*offset, data.len(), "gap or overlap in fragments");
        data.extend_from_slice(d);
    }
    ip6_frame(addr(&frags[0][22..38]), addr(&frags[0][38..54]), &[], parts[0].1, &data)
}
