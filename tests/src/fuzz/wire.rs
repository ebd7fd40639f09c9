//! Reading frames as the datapath's contract (README, "How it works") describes them, and the
//! ones' complement arithmetic the checks need. Written from that description, not from the
//! datapath's code: what counts as malformed, which fragment is which, which ICMP errors can
//! be matched to a flow.
use std::net::Ipv4Addr;

pub const ETH: usize = 14;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A flow's 5-tuple as it sits in a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    pub fn reversed(&self) -> Tuple {
        Tuple { src: self.dst, sport: self.dport, dst: self.src, dport: self.sport, proto: self.proto }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            TCP => "tcp",
            UDP => "udp",
            _ => "?",
        };
        write!(f, "{}:{} -> {}:{}/{p}", self.src, self.sport, self.dst, self.dport)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    Whole,
    /// Offset 0, more fragments: carries the L4 header.
    First,
    /// Offset above 0: no L4 header.
    Later,
}

/// The IPv4 header fields the checks use.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub ihl: usize,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
    pub ttl: u8,
    pub frag: Frag,
    pub tot_len: usize,
}

impl Ip {
    pub fn l4_off(&self) -> usize {
        ETH + self.ihl
    }
}

/// An ICMP error and the packet it quotes.
#[derive(Clone, Copy, Debug)]
pub struct IcmpErr {
    pub ip: Ip,
    pub icmp_off: usize,
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
    /// The quoted packet's tuple, as quoted.
    pub quote: Tuple,
    /// The quote holds the quoted L4 checksum (8 bytes of UDP, 18 of TCP).
    pub quote_csum: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    NotIp,
    Malformed,
    /// IPv4 the datapath does not translate: other protocols, ICMP that is no error it can
    /// match, fragmented ICMP.
    OtherProto,
    /// TCP or UDP with its header (unfragmented or a first fragment).
    L4 {
        ip: Ip,
        sport: u16,
        dport: u16,
        flags: u8,
        udp_zero: bool,
    },
    /// A later TCP or UDP fragment: addresses only; ports come from its first fragment.
    Later {
        ip: Ip,
    },
    Icmp(IcmpErr),
}

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub fn ip_at(b: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3])
}

/// What kind of frame this is, by the contract: Ethernet + IPv4 (version 4, IHL >= 5) with the
/// whole L4 header present, else malformed; ICMP errors (types 3, 11, 12) whose quote holds a
/// TCP or UDP packet's ports (and is not a later fragment) are matched; later fragments of
/// TCP or UDP follow their first fragment.
pub fn classify(f: &[u8]) -> Kind {
    if f.len() < ETH {
        return Kind::Malformed;
    }
    if f[12..14] != [0x08, 0x00] {
        return Kind::NotIp;
    }
    if f.len() < ETH + 20 {
        return Kind::Malformed;
    }
    let (vihl, ihl) = (f[ETH], (f[ETH] & 0x0f) as usize * 4);
    if vihl >> 4 != 4 || ihl < 20 {
        return Kind::Malformed;
    }
    let frag_field = be16(f, ETH + 6);
    let frag = if frag_field & 0x3fff == 0 {
        Frag::Whole
    } else if frag_field & 0x1fff == 0 {
        Frag::First
    } else {
        Frag::Later
    };
    let ip = Ip {
        ihl,
        src: ip_at(f, ETH + 12),
        dst: ip_at(f, ETH + 16),
        proto: f[ETH + 9],
        id: be16(f, ETH + 4),
        ttl: f[ETH + 8],
        frag,
        tot_len: be16(f, ETH + 2) as usize,
    };
    let l4 = ip.l4_off();
    if frag == Frag::Later {
        return if ip.proto == TCP || ip.proto == UDP { Kind::Later { ip } } else { Kind::OtherProto };
    }
    match ip.proto {
        TCP if f.len() >= l4 + 20 => {
            Kind::L4 { ip, sport: be16(f, l4), dport: be16(f, l4 + 2), flags: f[l4 + 13], udp_zero: false }
        }
        UDP if f.len() >= l4 + 8 => Kind::L4 {
            ip,
            sport: be16(f, l4),
            dport: be16(f, l4 + 2),
            flags: 0,
            udp_zero: f[l4 + 6] == 0 && f[l4 + 7] == 0,
        },
        TCP | UDP => Kind::Malformed,
        ICMP if frag == Frag::Whole => icmp(f, ip),
        _ => Kind::OtherProto,
    }
}

fn icmp(f: &[u8], ip: Ip) -> Kind {
    let icmp_off = ip.l4_off();
    if f.len() < icmp_off + 8 + 20 || !matches!(f[icmp_off], 3 | 11 | 12) {
        return Kind::OtherProto;
    }
    let q = icmp_off + 8;
    let (qvihl, qihl) = (f[q], (f[q] & 0x0f) as usize * 4);
    if qvihl >> 4 != 4 || qihl < 20 || be16(f, q + 6) & 0x1fff != 0 {
        return Kind::OtherProto;
    }
    let proto = f[q + 9];
    let ql4 = q + qihl;
    if f.len() < ql4 + 4 {
        return Kind::OtherProto;
    }
    let quote_csum = match proto {
        UDP => f.len() >= ql4 + 8,
        TCP => f.len() >= ql4 + 18,
        _ => return Kind::OtherProto,
    };
    Kind::Icmp(IcmpErr {
        ip,
        icmp_off,
        inner_ip_off: q,
        inner_l4_off: ql4,
        quote: Tuple {
            src: ip_at(f, q + 12),
            sport: be16(f, ql4),
            dst: ip_at(f, q + 16),
            dport: be16(f, ql4 + 2),
            proto,
        },
        quote_csum,
    })
}

/// Sum of big-endian 16-bit words (an odd last byte padded with zero), not folded.
pub fn sum(data: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        s += (*last as u64) << 8;
    }
    s
}

/// The ones' complement value of a sum, in 0..0xffff: 0 and 0xffff are the same number, so
/// 0xffff maps to 0. A valid checksummed region folds to 0.
pub fn ones(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    (s % 0xffff) as u16
}

/// The pseudo-header sum of an L4 checksum.
pub fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    sum(&src.octets()) + sum(&dst.octets()) + proto as u64 + (len as u64 & 0xffff)
}

/// Ones' complement residue of the IPv4 header of `f` (0: valid).
pub fn ip_residue(f: &[u8], ihl: usize) -> u16 {
    ones(sum(&f[ETH..(ETH + ihl).min(f.len())]))
}

/// The bytes of a frame's IP datagram that are present: up to the total length, or to the end
/// of the frame if it is shorter (truncated) or the length is nonsense.
pub fn datagram_end(f: &[u8], ip: &Ip) -> usize {
    let end = ETH + ip.tot_len;
    if ip.tot_len >= ip.ihl && end <= f.len() {
        end
    } else {
        f.len()
    }
}

/// Ones' complement residue of the L4 checksum over the present part of the segment, with the
/// pseudo-header built from `src`/`dst` and `len` (0 for a complete, valid segment). A NAT that
/// updates the checksum correctly keeps this residue, whatever the rest of the packet holds.
pub fn l4_residue(f: &[u8], l4_off: usize, end: usize, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u16 {
    ones(pseudo(src, dst, proto, len) + sum(&f[l4_off.min(end)..end]))
}

/// Recomputes the IPv4 header checksum and, when the whole segment is present and it is not a
/// fragment, the TCP/UDP/ICMP checksum (a zero UDP checksum stays zero).
pub fn fix_checksums(f: &mut [u8]) {
    if f.len() < ETH + 20 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = (f[ETH] & 0x0f) as usize * 4;
    if ihl < 20 || f.len() < ETH + ihl {
        return;
    }
    f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = !ones(sum(&f[ETH..ETH + ihl]));
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    let tot = be16(f, ETH + 2) as usize;
    if tot < ihl || ETH + tot > f.len() || be16(f, ETH + 6) & 0x3fff != 0 {
        return;
    }
    let (l4, end, proto) = (ETH + ihl, ETH + tot, f[ETH + 9]);
    let off = match proto {
        TCP => 16,
        UDP => 6,
        ICMP => 2,
        _ => return,
    };
    if end < l4 + off + 2 || (proto == UDP && f[l4 + 6..l4 + 8] == [0, 0]) {
        return;
    }
    f[l4 + off..l4 + off + 2].copy_from_slice(&[0, 0]);
    let p = if proto == ICMP { 0 } else { pseudo(ip_at(f, ETH + 12), ip_at(f, ETH + 16), proto, end - l4) };
    let mut c = !ones(p + sum(&f[l4..end]));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
