//! ICMP errors built from the offending packet: the refusal of a connection to a service
//! without ready backends, and "fragmentation needed" for a packet too big for the way out.
//!
//! kube-proxy installs `REJECT` for such services, which answers with ICMP port unreachable;
//! for TCP the client's kernel turns that into ECONNREFUSED at once (`tcp_v4_err` treats
//! ICMP_PORT_UNREACH as a hard error in SYN-SENT), for UDP into ECONNREFUSED on the next
//! receive. We build the same ICMP message in place from the offending packet and send it back
//! out of the interface it came in on.
//!
//! A packet the datapath routes itself (a node port's flow SNATed to a remote backend, and its
//! replies) skips `ip_forward`, which answers one larger than the egress MTU with ICMP
//! "fragmentation needed" (IPv4 with DF) or ICMPv6 Packet Too Big and so drives the sender's
//! path MTU discovery; the same message is built here, from the packet before translation, so
//! the sender matches it to what it sent.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::{
    addr::Addr,
    parse::{ptr_at, Headers, ETH_LEN, IPV4_LEN, IPV6_LEN},
};

const ICMP_LEN: usize = 8;
const GROW: usize = IPV4_LEN + ICMP_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
/// How much of the L4 header to quote. RFC 792 asks for 8 bytes (the ports), RFC 1812 allows
/// more. For TCP we quote the whole 20-byte header: a locally sent TCP packet is usually
/// CHECKSUM_PARTIAL, and `bpf_skb_change_tail` refuses to cut such an skb before its checksum
/// field (`__bpf_skb_min_len` in net/core/filter.c), which sits at byte 16 of the TCP header.
/// UDP's checksum field is inside the first 8 bytes.
pub const QUOTE_L4_TCP: usize = 20;
pub const QUOTE_L4_UDP: usize = 8;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// IPv4's Don't Fragment flag, in the header's flags and fragment offset word (network order).
const IP_DF: u8 = 0x40;

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the packet into an ICMP port unreachable to its sender and returns the tc verdict
/// that sends it.
#[inline(always)]
pub fn port_unreachable<A: Addr>(ctx: &TcContext, h: &Headers<A>) -> i32 {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        return port_unreachable6(ctx, h.l4_off, h.flow.proto);
    }
    icmp4_error(ctx, h, [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0])
}

/// The ICMP error with header `head` about the IPv4 packet, in place (`build`), its IP
/// options stripped first so the quote has fixed offsets.
#[inline(always)]
fn icmp4_error<A: Addr>(ctx: &TcContext, h: &Headers<A>, head: [u8; ICMP_LEN]) -> i32 {
    if h.l4_off != ETH_LEN + IPV4_LEN && strip_options(ctx, h.l4_off).is_none() {
        return TC_ACT_SHOT as i32;
    }
    if h.flow.proto == lb_common::PROTO_TCP {
        build::<{ ETH_LEN + GROW + IPV4_LEN + QUOTE_L4_TCP }>(ctx, head)
    } else {
        build::<{ ETH_LEN + GROW + IPV4_LEN + QUOTE_L4_UDP }>(ctx, head)
    }
}

/// Turns a packet too big for an egress MTU of `mtu` into ICMP "fragmentation needed" (IPv4)
/// or Packet Too Big (IPv6) to its sender and returns the tc verdict that sends it; `None` for
/// an IPv4 packet without DF, which a router would fragment instead (the caller drops it).
#[inline(always)]
pub fn too_big<A: Addr>(ctx: &TcContext, h: &Headers<A>, mtu: u16) -> Option<i32> {
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        let head = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8];
        return Some(icmp6_error(ctx, h.l4_off, h.flow.proto, head));
    }
    let flags = ptr_at::<u8>(ctx.data(), ctx.data_end(), ETH_LEN + 6)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { *flags } & IP_DF == 0 {
        return None;
    }
    // RFC 1191: the next hop's MTU in the header's last two bytes.
    Some(icmp4_error(ctx, h, [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8]))
}

/// Removes the IP options of the packet to be quoted, so the quote has fixed offsets: the base
/// header is copied to just before the L4 header, and `bpf_skb_adjust_room` then removes the
/// bytes in front of it (`BPF_ADJ_ROOM_MAC` shrinks right behind the Ethernet header). The
/// quoted header gets IHL 5 and its length and checksum to match. The receiver matches the
/// error by the quoted addresses and ports (`tcp_v4_err`, `__udp4_lib_err` read the quoted IHL),
/// which are unchanged.
#[inline(always)]
fn strip_options(ctx: &TcContext, l4_off: usize) -> Option<()> {
    let opt_len = l4_off.checked_sub(ETH_LEN + IPV4_LEN)?;
    // IHL is at most 15: 40 bytes of options.
    if opt_len == 0 || opt_len > 40 {
        return None;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let base = ptr_at::<[u8; IPV4_LEN]>(data, data_end, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ip = unsafe { *base };
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]).checked_sub(opt_len as u16)?;
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[10] = 0;
    ip[11] = 0;
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u16::from_ne_bytes([ip[i], ip[i + 1]]) as u32;
        i += 2;
    }
    ip[10..12].copy_from_slice(&fold(sum).to_ne_bytes());
    // One constant offset per option length: LLVM splits a variable packet offset from its
    // bounds check, and the verifier then refuses the write.
    match opt_len {
        4 => put::<4>(data, data_end, &ip)?,
        8 => put::<8>(data, data_end, &ip)?,
        12 => put::<12>(data, data_end, &ip)?,
        16 => put::<16>(data, data_end, &ip)?,
        20 => put::<20>(data, data_end, &ip)?,
        24 => put::<24>(data, data_end, &ip)?,
        28 => put::<28>(data, data_end, &ip)?,
        32 => put::<32>(data, data_end, &ip)?,
        36 => put::<36>(data, data_end, &ip)?,
        40 => put::<40>(data, data_end, &ip)?,
        _ => return None,
    }
    ctx.adjust_room(-(opt_len as i32), BPF_ADJ_ROOM_MAC, 0).ok()
}

/// Writes the base IP header `OPT_LEN` bytes further into the frame.
#[inline(always)]
fn put<const OPT_LEN: usize>(data: usize, data_end: usize, ip: &[u8; IPV4_LEN]) -> Option<()> {
    let dst = ptr_at::<[u8; IPV4_LEN]>(data, data_end, ETH_LEN + OPT_LEN)?;
    // SAFETY: bounds checked by ptr_at; the frame is ours to rewrite.
    unsafe { *dst = *ip };
    Some(())
}

/// Builds the reply in a frame of exactly `REPLY_LEN` bytes, its ICMP header `head` (the
/// checksum filled in here).
#[inline(always)]
fn build<const REPLY_LEN: usize>(ctx: &TcContext, head: [u8; ICMP_LEN]) -> i32 {
    const { assert!(REPLY_LEN >= ETH_LEN + GROW + IPV4_LEN + 8) };
    let quote_len = REPLY_LEN - ETH_LEN - GROW;
    // Make room for the new IP and ICMP headers between Ethernet and the original IP header,
    // then cut everything after the quoted 8 bytes.
    if ctx.adjust_room(GROW as i32, BPF_ADJ_ROOM_MAC, 0).is_err() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN as u32, 0) } != 0 {
        return TC_ACT_SHOT as i32;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(frame) = ptr_at::<[u8; REPLY_LEN]>(data, data_end, 0) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: bounds checked by ptr_at; the frame is ours to rewrite.
    let f = unsafe { &mut *frame };

    // Ethernet: back to the sender.
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&f[0..6]);
    f.copy_within(6..12, 0);
    f[6..12].copy_from_slice(&mac);

    // New IPv4 header from the service address to the client.
    let quote = ETH_LEN + GROW;
    let ip = ETH_LEN;
    f[ip] = 0x45;
    f[ip + 1] = 0xc0; // precedence "internetwork control", as the kernel's icmp_send uses
    f[ip + 2..ip + 4].copy_from_slice(&((IPV4_LEN + ICMP_LEN + quote_len) as u16).to_be_bytes());
    f[ip + 4..ip + 8].copy_from_slice(&[0, 0, 0x40, 0]); // id 0, DF
    f[ip + 8] = 64;
    f[ip + 9] = 1; // ICMP
    f[ip + 10] = 0;
    f[ip + 11] = 0;
    f.copy_within(quote + 16..quote + 20, ip + 12);
    f.copy_within(quote + 12..quote + 16, ip + 16);
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u16::from_ne_bytes([f[ip + i], f[ip + i + 1]]) as u32;
        i += 2;
    }
    f[ip + 10..ip + 12].copy_from_slice(&fold(sum).to_ne_bytes());

    // The ICMP header, checksum over header and quote.
    let icmp = ETH_LEN + IPV4_LEN;
    f[icmp..icmp + ICMP_LEN].copy_from_slice(&head);
    let mut sum = 0u32;
    let mut i = 0;
    while i < ICMP_LEN + quote_len {
        sum += u16::from_ne_bytes([f[icmp + i], f[icmp + i + 1]]) as u32;
        i += 2;
    }
    f[icmp + 2..icmp + 4].copy_from_slice(&fold(sum).to_ne_bytes());

    // SAFETY: reading the ifindex the skb arrived on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; egress of the arrival device delivers to the sender.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

const GROW6: usize = IPV6_LEN + ICMP_LEN;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const PROTO_ICMPV6: u8 = 58;

/// IPv6: an ICMPv6 destination unreachable (port unreachable), what ip6tables' REJECT sends
/// (`icmp6-port-unreachable`); the client's kernel reports ECONNREFUSED for it as for IPv4
/// (`tcp_v6_err` via `icmpv6_err_convert`). A packet with extension headers is dropped
/// instead: its quote would have no fixed length.
#[inline(always)]
fn port_unreachable6(ctx: &TcContext, l4_off: usize, proto: u8) -> i32 {
    icmp6_error(ctx, l4_off, proto, [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0, 0, 0, 0, 0])
}

/// The ICMPv6 error with header `head` about the packet, in place (`build6`).
#[inline(never)]
fn icmp6_error(ctx: &TcContext, l4_off: usize, proto: u8, head: [u8; ICMP_LEN]) -> i32 {
    if l4_off != ETH_LEN + IPV6_LEN {
        return TC_ACT_SHOT as i32;
    }
    if proto == lb_common::PROTO_TCP {
        build6::<{ ETH_LEN + GROW6 + IPV6_LEN + QUOTE_L4_TCP }>(ctx, head)
    } else {
        build6::<{ ETH_LEN + GROW6 + IPV6_LEN + QUOTE_L4_UDP }>(ctx, head)
    }
}

/// Builds the ICMPv6 reply in a frame of exactly `REPLY_LEN` bytes, as `build` does for IPv4.
#[inline(always)]
fn build6<const REPLY_LEN: usize>(ctx: &TcContext, head: [u8; ICMP_LEN]) -> i32 {
    const { assert!(REPLY_LEN >= ETH_LEN + GROW6 + IPV6_LEN + 8) };
    let icmp_len = REPLY_LEN - ETH_LEN - IPV6_LEN;
    if ctx.adjust_room(GROW6 as i32, BPF_ADJ_ROOM_MAC, 0).is_err() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN as u32, 0) } != 0 {
        return TC_ACT_SHOT as i32;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(frame) = ptr_at::<[u8; REPLY_LEN]>(data, data_end, 0) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: bounds checked by ptr_at; the frame is ours to rewrite.
    let f = unsafe { &mut *frame };

    // Words through registers, not `copy_within`: LLVM lowers that memmove through a stack
    // buffer, and this runs beside a whole stage's frame.
    // SAFETY: every offset below is inside the REPLY_LEN bytes checked above.
    unsafe {
        let p = f.as_mut_ptr();
        let (dst_mac, src_mac) =
            ((p as *const [u8; 6]).read_unaligned(), (p.add(6) as *const [u8; 6]).read_unaligned());
        (p as *mut [u8; 6]).write_unaligned(src_mac);
        (p.add(6) as *mut [u8; 6]).write_unaligned(dst_mac);
        // New IPv6 header from the service address (the quote's destination) to the client.
        let quote = ETH_LEN + GROW6;
        let (client, service) =
            (<[u32; 4] as Addr>::read(p.add(quote + 8)), <[u32; 4] as Addr>::read(p.add(quote + 24)));
        service.write(p.add(ETH_LEN + 8));
        client.write(p.add(ETH_LEN + 24));
    }
    let ip = ETH_LEN;
    f[ip..ip + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    f[ip + 4..ip + 6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    f[ip + 6] = PROTO_ICMPV6;
    f[ip + 7] = 64;

    // The ICMPv6 header; the checksum covers the pseudo-header (addresses, length, next
    // header) as well as the message.
    let icmp = ETH_LEN + IPV6_LEN;
    f[icmp..icmp + ICMP_LEN].copy_from_slice(&head);
    // Everything is summed in memory order (ones' complement sums do not care), so the
    // length and next header enter as they would sit in the pseudo-header. The kernel sums
    // the addresses and the message (`bpf_csum_diff`): an unrolled loop here spills most of
    // its loads to the stack, which a stage's frame leaves no room for; rejects are rare.
    let seed =
        u16::from_ne_bytes((icmp_len as u16).to_be_bytes()) as u32 + u16::from_ne_bytes([0, PROTO_ICMPV6]) as u32;
    // SAFETY: both ranges lie in the frame checked above; their lengths are multiples of 4.
    let sum = unsafe {
        let p = f.as_mut_ptr();
        let s = bpf_csum_diff(core::ptr::null_mut(), 0, p.add(ip + 8) as *mut u32, 32, seed);
        bpf_csum_diff(core::ptr::null_mut(), 0, p.add(icmp) as *mut u32, icmp_len as u32, s as u32)
    };
    if sum < 0 {
        return TC_ACT_SHOT as i32;
    }
    let sum = sum as u32;
    f[icmp + 2..icmp + 4].copy_from_slice(&fold(sum).to_ne_bytes());

    // SAFETY: reading the ifindex the skb arrived on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; egress of the arrival device delivers to the sender.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
