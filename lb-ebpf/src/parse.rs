//! Stage 1: find the IPv4 and L4 headers. Reads only; never changes the packet.
use core::mem::size_of;

use lb_common::{PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

pub const ETH_LEN: usize = size_of::<EthHdr>();
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset, in network order as they sit in the header.
const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// The 5-tuple of a packet, every field in network byte order as it sits in the packet.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

pub struct Headers {
    pub flow: Flow,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// TCP flags byte (zero for UDP).
    pub tcp_flags: u8,
    /// The UDP checksum is zero ("none"), which must stay zero after rewriting.
    pub udp_csum_zero: bool,
}

pub enum Parsed {
    NotIp,
    Malformed,
    Fragment,
    OtherProto,
    L4(Headers),
}

/// Bounds-checked pointer into the packet, in the form the verifier accepts.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Parsed::NotIp;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, ETH_LEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Parsed::Malformed;
    }
    if u16::from_ne_bytes(ip.frags) & IP_MF_OFFSET_MASK_BE != 0 {
        // Only the first fragment carries ports, and later ones cannot be matched to it
        // without reassembly; leave all of them to the kernel.
        return Parsed::Fragment;
    }
    let src = u32::from_ne_bytes(ip.src_addr);
    let dst = u32::from_ne_bytes(ip.dst_addr);
    let proto = ip.proto;
    let l4_off = ETH_LEN + ihl * 4;
    match proto {
        PROTO_TCP => {
            let Some(tcp) = ptr_at::<TcpHdr>(data, data_end, l4_off) else {
                return Parsed::Malformed;
            };
            // SAFETY: bounds checked by ptr_at.
            let tcp = unsafe { &*tcp };
            // The flags byte is the 14th of the header (after data offset/reserved).
            // SAFETY: within the TcpHdr checked above.
            let flags = unsafe { *((tcp as *const TcpHdr as *const u8).add(13)) };
            Parsed::L4(Headers {
                flow: Flow {
                    src,
                    dst,
                    sport: u16::from_ne_bytes(tcp.source),
                    dport: u16::from_ne_bytes(tcp.dest),
                    proto,
                },
                l4_off,
                tcp_flags: flags,
                udp_csum_zero: false,
            })
        }
        PROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(data, data_end, l4_off) else {
                return Parsed::Malformed;
            };
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            Parsed::L4(Headers {
                flow: Flow { src, dst, sport: u16::from_ne_bytes(udp.src), dport: u16::from_ne_bytes(udp.dst), proto },
                l4_off,
                tcp_flags: 0,
                udp_csum_zero: udp.check == [0, 0],
            })
        }
        _ => Parsed::OtherProto,
    }
}
