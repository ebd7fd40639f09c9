//! Refusal of a connection to a service without ready backends.
//!
//! kube-proxy installs `REJECT` for such services, which answers with ICMP port unreachable;
//! for TCP the client's kernel turns that into ECONNREFUSED at once (`tcp_v4_err` treats
//! ICMP_PORT_UNREACH as a hard error in SYN-SENT), for UDP into ECONNREFUSED on the next
//! receive. We build the same ICMP message in place from the offending packet and send it back
//! out of the interface it came in on.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::parse::{ptr_at, Headers, ETH_LEN};

const IPV4_LEN: usize = 20;
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

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the packet into an ICMP port unreachable to its sender and returns the tc verdict
/// that sends it. Packets with IP options are dropped instead (the quote would need a
/// variable-length copy; a client still fails fast on its retransmission timer).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, h: &Headers) -> i32 {
    if h.flow.proto == lb_common::PROTO_TCP {
        build::<{ ETH_LEN + GROW + IPV4_LEN + QUOTE_L4_TCP }>(ctx, h)
    } else {
        build::<{ ETH_LEN + GROW + IPV4_LEN + QUOTE_L4_UDP }>(ctx, h)
    }
}

/// Builds the reply in a frame of exactly `REPLY_LEN` bytes.
#[inline(always)]
fn build<const REPLY_LEN: usize>(ctx: &TcContext, h: &Headers) -> i32 {
    const { assert!(REPLY_LEN >= ETH_LEN + GROW + IPV4_LEN + 8) };
    let quote_len = REPLY_LEN - ETH_LEN - GROW;
    if h.l4_off != ETH_LEN + IPV4_LEN {
        return TC_ACT_SHOT as i32;
    }
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

    // ICMP destination unreachable / port unreachable, checksum over header and quote.
    let icmp = ETH_LEN + IPV4_LEN;
    f[icmp..icmp + ICMP_LEN].copy_from_slice(&[ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0]);
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
