//! Stage 1: find the IP (IPv4, or IPv6 behind its extension headers) and L4 headers. Reads
//! only; never changes the packet.
//!
//! Fragments: the first fragment of a datagram carries the L4 header and is parsed as any
//! packet; a later one carries none, so it comes back as `LaterFragment` for the pipeline to
//! give it its datagram's ports (`frag.rs`). ICMP errors come back with the header they quote,
//! so the flow they are about can be found (`icmp.rs`).
use core::mem::size_of;

use lb_common::{PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{addr::Addr, mem};

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// More-fragments flag and fragment offset, in network order as they sit in the header.
const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
/// Fragment offset alone.
const IP_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const IPV4_LEN: usize = 20;
pub const ICMP_LEN: usize = 8;

/// The 5-tuple of a packet, every field in network byte order as it sits in the packet; `A`
/// the address family (`addr::Addr`).
#[derive(Clone, Copy)]
pub struct Flow<A> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    Whole,
    /// The first fragment: it has the L4 header, and the later ones must follow it.
    First,
    /// A later fragment: no L4 header; its ports come from the first fragment.
    Later,
}

pub struct Headers<A> {
    pub flow: Flow<A>,
    /// Offset of the L4 header from the start of the frame (of the IP payload for `Later`).
    pub l4_off: usize,
    /// TCP flags byte (zero for UDP and for later fragments).
    pub tcp_flags: u8,
    /// The UDP checksum is zero ("none"), which must stay zero after rewriting.
    pub udp_csum_zero: bool,
    pub frag: Frag,
    /// The IP identification, network order (16 bits in IPv4, 32 in IPv6's fragment header):
    /// names the datagram of a fragment.
    pub ip_id: u32,
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) and the flow of
/// the packet it quotes: that packet went the other way, so its source is our destination.
/// Either IP header may carry options, so the offsets are the packet's own.
pub struct IcmpError<A> {
    /// The outer packet: its addresses (ports unused).
    pub outer: Flow<A>,
    /// The quoted packet's 5-tuple, as it sits in the quote.
    pub inner: Flow<A>,
    /// The quoted L4 header holds its checksum (UDP always, TCP when 18 bytes are quoted).
    pub inner_csum: bool,
    /// Offsets from the start of the frame: the ICMP header, the quoted IP header, the quoted
    /// L4 header.
    pub icmp_off: usize,
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
}

pub enum Parsed<A> {
    Malformed,
    OtherProto,
    /// IPv6 extension headers beyond the walk's bound (`MAX_EXT_HEADERS`).
    ExtHeaders,
    L4(Headers<A>),
    /// A later fragment; `flow` has no ports yet.
    LaterFragment(Headers<A>),
    Icmp(IcmpError<A>),
}

/// The frame's ethertype (network order), `None` when it is too short for an Ethernet header.
#[inline(always)]
pub fn ethertype(data: usize, data_end: usize) -> Option<u16> {
    let eth = ptr_at::<EthHdr>(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { (*eth).ether_type })
}

/// The ethertype (network order) of a packet that starts with its IP header (a device
/// without a link-layer header: tun, WireGuard, IPIP), from the IP version, as the kernel
/// does for such devices (`tun_get_user` without packet information, `ip_tunnel_rcv`).
#[inline(always)]
pub fn ethertype_of_ip(data: usize, data_end: usize) -> Option<u16> {
    // A whole IPv4 header's worth, not the one byte read: LLVM turns a one-byte bound into
    // `data >= data_end`, which it then compares in 32 bits, and the verifier learns packet
    // ranges from 64-bit compares only. Anything shorter is no IP packet either way.
    let b = ptr_at::<[u8; IPV4_LEN]>(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    match unsafe { (*b)[0] } >> 4 {
        4 => Some(ETH_P_IP_BE),
        6 => Some(ETH_P_IPV6_BE),
        _ => Some(0),
    }
}

/// The family-specific parser, so the pipeline can be written once. `l2`: the link-layer
/// header's length in front of the IP header (`Packet::L2`, a constant once inlined).
pub trait Parse: Addr {
    fn parse(data: usize, data_end: usize, l2: usize) -> Parsed<Self>;
}

impl Parse for u32 {
    #[inline(always)]
    fn parse(data: usize, data_end: usize, l2: usize) -> Parsed<u32> {
        parse4(data, data_end, l2)
    }
}

impl Parse for [u32; 4] {
    #[inline(always)]
    fn parse(data: usize, data_end: usize, l2: usize) -> Parsed<[u32; 4]> {
        parse6(data, data_end, l2)
    }
}

/// Bounds-checked pointer into the packet, in the form the verifier accepts.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// An IPv4 packet (the ethertype was checked).
#[inline(always)]
pub fn parse4(data: usize, data_end: usize, l2: usize) -> Parsed<u32> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, l2) else {
        return Parsed::Malformed;
    };
    let p = ip as usize;
    // SAFETY: bounds checked by ptr_at; the word loads stay inside the 20-byte header.
    let (ip, src, dst, id_frags) = unsafe { (&*ip, mem::load32::<12>(p), mem::load32::<16>(p), mem::load32::<4>(p)) };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Parsed::Malformed;
    }
    let proto = ip.proto;
    let l4_off = l2 + ihl * 4;
    // The identification and the flags with the fragment offset, each in network order.
    let ip_id = id_frags & 0xffff;
    let frags = (id_frags >> 16) as u16;
    let frag = if frags & IP_MF_OFFSET_MASK_BE == 0 {
        Frag::Whole
    } else if frags & IP_OFFSET_MASK_BE == 0 {
        Frag::First
    } else {
        Frag::Later
    };
    if frag == Frag::Later {
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Parsed::OtherProto;
        }
        return Parsed::LaterFragment(Headers {
            flow: Flow { src, dst, sport: 0, dport: 0, proto },
            l4_off,
            tcp_flags: 0,
            udp_csum_zero: false,
            frag,
            ip_id,
        });
    }
    match proto {
        PROTO_TCP | PROTO_UDP => l4(data, data_end, src, dst, proto, l4_off, frag, ip_id),
        PROTO_ICMP if frag == Frag::Whole => icmp_error(data, data_end, src, dst, l4_off),
        _ => Parsed::OtherProto,
    }
}

/// The TCP or UDP header at `l4_off`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn l4<A: Addr>(
    data: usize,
    data_end: usize,
    src: A,
    dst: A,
    proto: u8,
    l4_off: usize,
    frag: Frag,
    ip_id: u32,
) -> Parsed<A> {
    match proto {
        PROTO_TCP => {
            let Some(tcp) = ptr_at::<TcpHdr>(data, data_end, l4_off) else {
                return Parsed::Malformed;
            };
            // SAFETY: bounds checked by ptr_at. The flags byte is the 14th of the header
            // (after data offset/reserved).
            let (sport, dport, flags) = unsafe {
                (mem::load16::<0>(tcp as usize), mem::load16::<2>(tcp as usize), *((tcp as *const u8).add(13)))
            };
            Parsed::L4(Headers {
                flow: Flow { src, dst, sport, dport, proto },
                l4_off,
                tcp_flags: flags,
                udp_csum_zero: false,
                frag,
                ip_id,
            })
        }
        PROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(data, data_end, l4_off) else {
                return Parsed::Malformed;
            };
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, check) = unsafe {
                (mem::load16::<0>(udp as usize), mem::load16::<2>(udp as usize), mem::load16::<6>(udp as usize))
            };
            Parsed::L4(Headers {
                flow: Flow { src, dst, sport, dport, proto },
                l4_off,
                tcp_flags: 0,
                udp_csum_zero: check == 0,
                frag,
                ip_id,
            })
        }
        _ => Parsed::OtherProto,
    }
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// An ICMP error quoting a TCP or UDP packet, else `OtherProto` (echo, and errors we cannot
/// match, pass untouched). `icmp_off`: where the ICMP header starts, behind any IP options.
#[inline(always)]
fn icmp_error(data: usize, data_end: usize, src: u32, dst: u32, icmp_off: usize) -> Parsed<u32> {
    // The ICMP header and the quoted IP header without its options.
    let Some(b) = ptr_at::<[u8; ICMP_LEN + IPV4_LEN]>(data, data_end, icmp_off) else {
        return Parsed::OtherProto;
    };
    // SAFETY: bounds checked by ptr_at.
    let b = unsafe { &*b };
    if !matches!(b[0], ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB) {
        return Parsed::OtherProto;
    }
    let ip = ICMP_LEN;
    let inner_ihl = (b[ip] & 0x0f) as usize;
    // A quoted later fragment has no ports to match.
    if b[ip] >> 4 != 4 || inner_ihl < 5 || u16::from_ne_bytes([b[ip + 6], b[ip + 7]]) & IP_OFFSET_MASK_BE != 0 {
        return Parsed::OtherProto;
    }
    let proto = b[ip + 9];
    let inner_ip_off = icmp_off + ICMP_LEN;
    let inner_l4_off = inner_ip_off + inner_ihl * 4;
    let Some(ports) = ptr_at::<[u8; 4]>(data, data_end, inner_l4_off) else {
        return Parsed::OtherProto;
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    let inner_csum = match proto {
        PROTO_UDP => ptr_at::<[u8; 8]>(data, data_end, inner_l4_off).is_some(),
        PROTO_TCP => ptr_at::<[u8; 18]>(data, data_end, inner_l4_off).is_some(),
        _ => return Parsed::OtherProto,
    };
    Parsed::Icmp(IcmpError {
        outer: Flow { src, dst, sport: 0, dport: 0, proto: PROTO_ICMP },
        inner: Flow {
            src: u32::from_ne_bytes([b[ip + 12], b[ip + 13], b[ip + 14], b[ip + 15]]),
            dst: u32::from_ne_bytes([b[ip + 16], b[ip + 17], b[ip + 18], b[ip + 19]]),
            sport: u16::from_ne_bytes([ports[0], ports[1]]),
            dport: u16::from_ne_bytes([ports[2], ports[3]]),
            proto,
        },
        inner_csum,
        icmp_off,
        inner_ip_off,
        inner_l4_off,
    })
}

pub const IPV6_LEN: usize = 40;
/// Extension headers walked before the L4 header: hop-by-hop, routing, destination options
/// and fragment, each at most once in order (RFC 8200 4.1) but for a second destination
/// options header. A chain longer than this is passed and counted, never misparsed.
pub const MAX_EXT_HEADERS: usize = 4;
pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DEST_OPTS: u8 = 60;
/// Largest extension header (an 8-bit length in 8-octet units, plus the first 8).
const EXT_MAX_LEN: usize = 256 * 8;

/// An IPv6 packet (the ethertype was checked): the fixed header, then a bounded walk of the
/// extension headers to the upper-layer header.
#[inline(always)]
pub fn parse6(data: usize, data_end: usize, l2: usize) -> Parsed<[u32; 4]> {
    let Some(ip) = ptr_at::<[u8; IPV6_LEN]>(data, data_end, l2) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    // SAFETY: the address fields lie within the header checked above.
    let (src, dst) = unsafe { (<[u32; 4]>::read(ip.as_ptr().add(8)), <[u32; 4]>::read(ip.as_ptr().add(24))) };
    let mut next = ip[6];
    let mut off = l2 + IPV6_LEN;
    let mut frag = Frag::Whole;
    let mut ip_id = 0u32;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                let Some(h) = ptr_at::<[u8; 2]>(data, data_end, off) else {
                    return Parsed::Malformed;
                };
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXT_FRAGMENT => {
                let Some(h) = ptr_at::<[u8; 8]>(data, data_end, off) else {
                    return Parsed::Malformed;
                };
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { *h };
                next = h[0];
                // Offset (13 bits, in 8-octet units) and the M flag in the low bit.
                let offset_m = u16::from_be_bytes([h[2], h[3]]);
                frag = if offset_m & 0xfff8 != 0 {
                    Frag::Later
                } else if offset_m & 1 != 0 {
                    Frag::First
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    frag
                };
                ip_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    if matches!(next, NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS | NEXT_FRAGMENT) {
        return Parsed::ExtHeaders;
    }
    // Tells the verifier the offset's range (each step adds at most EXT_MAX_LEN).
    if off > l2 + IPV6_LEN + MAX_EXT_HEADERS * EXT_MAX_LEN {
        return Parsed::ExtHeaders;
    }
    if frag == Frag::Later {
        if next != PROTO_TCP && next != PROTO_UDP {
            return Parsed::OtherProto;
        }
        return Parsed::LaterFragment(Headers {
            flow: Flow { src, dst, sport: 0, dport: 0, proto: next },
            l4_off: off,
            tcp_flags: 0,
            udp_csum_zero: false,
            frag,
            ip_id,
        });
    }
    match next {
        PROTO_TCP | PROTO_UDP => l4(data, data_end, src, dst, next, off, frag, ip_id),
        PROTO_ICMPV6 if frag == Frag::Whole => icmp6_error(data, data_end, src, dst, off),
        _ => Parsed::OtherProto,
    }
}

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

/// An ICMPv6 error (destination unreachable, packet too big, time exceeded, parameter
/// problem) quoting a TCP or UDP packet, else `OtherProto`: neighbour discovery, echo and
/// every informational message pass untouched, as do quotes with extension headers (the
/// kernel sends none for the TCP and UDP it quotes unless the original carried them).
#[inline(always)]
fn icmp6_error(data: usize, data_end: usize, src: [u32; 4], dst: [u32; 4], icmp_off: usize) -> Parsed<[u32; 4]> {
    let Some(b) = ptr_at::<[u8; ICMP_LEN + IPV6_LEN]>(data, data_end, icmp_off) else {
        return Parsed::OtherProto;
    };
    // SAFETY: bounds checked by ptr_at.
    let b = unsafe { &*b };
    if !matches!(b[0], ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB) {
        return Parsed::OtherProto;
    }
    let ip = ICMP_LEN;
    let proto = b[ip + 6];
    if b[ip] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Parsed::OtherProto;
    }
    let inner_ip_off = icmp_off + ICMP_LEN;
    let inner_l4_off = inner_ip_off + IPV6_LEN;
    let Some(ports) = ptr_at::<[u8; 4]>(data, data_end, inner_l4_off) else {
        return Parsed::OtherProto;
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    let inner_csum = match proto {
        PROTO_UDP => ptr_at::<[u8; 8]>(data, data_end, inner_l4_off).is_some(),
        _ => ptr_at::<[u8; 18]>(data, data_end, inner_l4_off).is_some(),
    };
    // SAFETY: the address fields lie within the quote checked above.
    let (qsrc, qdst) = unsafe { (<[u32; 4]>::read(b.as_ptr().add(ip + 8)), <[u32; 4]>::read(b.as_ptr().add(ip + 24))) };
    Parsed::Icmp(IcmpError {
        outer: Flow { src, dst, sport: 0, dport: 0, proto: PROTO_ICMPV6 },
        inner: Flow {
            src: qsrc,
            dst: qdst,
            sport: u16::from_ne_bytes([ports[0], ports[1]]),
            dport: u16::from_ne_bytes([ports[2], ports[3]]),
            proto,
        },
        inner_csum,
        icmp_off,
        inner_ip_off,
        inner_l4_off,
    })
}
