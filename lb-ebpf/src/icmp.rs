//! ICMP errors of translated flows, translated with them (netfilter's RELATED handling,
//! `nf_nat_icmp_reply_translation`): a "fragmentation needed", "port unreachable" or "time
//! exceeded" quotes the packet as the sender saw it, after our translation, so the client (or
//! backend) would not match it to its socket. The quote is put back into the other side's
//! view: the quoted addresses and ports, the quoted IP and L4 checksums, the ICMP checksum,
//! and the outer addresses where they are ours (the backend or the SNAT address).
//!
use lb_common::{CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_ROUTE, CT_FLAG_SNAT, FAMILY_IPV4, PROTO_TCP};

use crate::{
    addr::{wsum_add, Addr},
    conntrack::{self, key},
    ctx::Packet,
    nat::{csum_replace2, csum_replace4, decrement_ttl, fold, ttl_ok},
    parse::{IcmpError, IPV4_LEN, PROTO_ICMP, PROTO_ICMPV6},
};
use lb_common::Counter;

/// What the packet becomes. Every field is set (unchanged ones to their current value, which
/// rewrites as a no-op): `Option`s here let LLVM read an uninitialised register on the `None`
/// path, which the verifier rejects ("!read_ok").
#[derive(Clone, Copy, Default)]
struct Rewrite<A> {
    outer_src: A,
    outer_dst: A,
    inner_src: A,
    inner_sport: u16,
    inner_dst: A,
    inner_dport: u16,
    route: bool,
}

#[inline(always)]
fn entry<A: Addr>(k: &CtKey<A>) -> Option<&'static CtValue<A>> {
    conntrack::peek(k)
}

/// Matches the quote against conntrack and says what to rewrite (`None`: leave it as it is).
#[inline(always)]
fn plan<A: Addr>(e: &IcmpError<A>, after_stack: bool) -> Option<Rewrite<A>> {
    if A::FAMILY == FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        plan_of(e, after_stack)
    } else {
        let mut w = Rewrite::<A>::default();
        plan_outlined(e, after_stack, &mut w).then_some(w)
    }
}

/// IPv6: a subprogram, for the stack's sake (two 40-byte keys and the rewrite beside a stage's
/// frame). No enum in its signature (see `conntrack::forward_outlined`).
#[inline(never)]
fn plan_outlined<A: Addr>(e: &IcmpError<A>, after_stack: bool, out: &mut Rewrite<A>) -> bool {
    match plan_of(e, after_stack) {
        Some(w) => {
            *out = w;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn plan_of<A: Addr>(e: &IcmpError<A>, after_stack: bool) -> Option<Rewrite<A>> {
    let q = &e.inner;
    let mut w = Rewrite {
        outer_src: e.outer.src,
        outer_dst: e.outer.dst,
        inner_src: q.src,
        inner_sport: q.sport,
        inner_dst: q.dst,
        inner_dport: q.dport,
        route: false,
    };
    // The quote is a packet towards a backend (client -> backend after our DNAT, maybe SNAT):
    // the error travels to the client, like the backend's replies do.
    if let Some(r) = entry(&key(q.dst, q.src, q.dport, q.sport, q.proto, CT_DIR_REPLY)) {
        let snat = r.flags & CT_FLAG_SNAT != 0;
        if !snat && !after_stack {
            // To the client's own address: it goes through the stack as the flow's replies do
            // (`maybe_reply_of`), so that the node's netfilter finds it RELATED to the flow it
            // saw, and is translated at the egress it leaves by.
            return None;
        }
        w.inner_dst = r.nat_addr;
        w.inner_dport = r.nat_port;
        if snat {
            w.inner_src = r.snat_addr;
            w.inner_sport = r.snat_port;
            w.outer_dst = r.snat_addr;
        }
        // From the backend itself: it must look as if from the frontend. A router on the way
        // keeps its own address, which a client accepts (it matches errors by the quote).
        if e.outer.src == q.dst {
            w.outer_src = r.nat_addr;
        }
        // Routed as the flow's replies are, whoever sent it: a flow SNATed to the node passed
        // the node's netfilter by, which would find the error related to nothing (INVALID).
        // (An unSNATed node port's entry written before replies went through the stack may
        // carry the flag: not routed, as its replies no longer are.)
        w.route = snat && r.flags & CT_FLAG_ROUTE != 0;
        return Some(w);
    }
    // The quote is a translated reply (frontend -> client): the error travels to the backend,
    // like the client's packets do. Translated wherever it is found: it is addressed to the
    // frontend, which the stack cannot take to the backend.
    let f = entry(&key(q.dst, q.src, q.dport, q.sport, q.proto, CT_DIR_FORWARD))?;
    w.inner_src = f.nat_addr;
    w.inner_sport = f.nat_port;
    w.outer_dst = f.nat_addr;
    if f.flags & CT_FLAG_SNAT != 0 {
        w.inner_dst = f.snat_addr;
        w.inner_dport = f.snat_port;
        if e.outer.src == q.dst {
            w.outer_src = f.snat_addr;
        }
        // As above: routed as the flow's packets are (a router's "fragmentation needed" about a
        // large reply, on its way to the backend, among them).
        w.route = f.flags & CT_FLAG_ROUTE != 0;
    }
    Some(w)
}

/// Translates an ICMP error about a tracked flow; other ICMP errors pass.
/// `after_stack`: at tc egress, where errors about flows whose replies the stack forwards
/// (not SNATed) are translated; at ingress they are left to it.
#[inline(always)]
pub fn translate<A: Addr, P: Packet>(ctx: &P, e: &IcmpError<A>, after_stack: bool) -> i32 {
    if A::FAMILY == FAMILY_IPV4 || !crate::addr::OUTLINE_V6_CT {
        translate_of(ctx, e, after_stack)
    } else {
        translate_outlined(ctx, e, after_stack)
    }
}

/// IPv6: a subprogram, so that the route lookup's buffers and the plan's do not share one
/// frame.
#[inline(never)]
fn translate_outlined<A: Addr, P: Packet>(ctx: &P, e: &IcmpError<A>, after_stack: bool) -> i32 {
    translate_of(ctx, e, after_stack)
}

#[inline(always)]
fn translate_of<A: Addr, P: Packet>(ctx: &P, e: &IcmpError<A>, after_stack: bool) -> i32 {
    let Some(w) = plan(e, after_stack) else {
        ctx.count(Counter::PassNotService);
        return P::UNTOUCHED;
    };
    if w.route && A::FAMILY != FAMILY_IPV4 && P::HOOK == crate::ctx::HOOK_XDP {
        // An IPv6 error that must be routed (from a remote backend of a SNATed node port)
        // goes on to tc's ICMP stage, which routes it: compiled for XDP, LLVM spilled half of
        // the route's stack address here, which the verifier refuses. Such errors are rare.
        return ctx.defer();
    }
    let route = if w.route {
        let proto = if A::FAMILY == FAMILY_IPV4 { PROTO_ICMP } else { PROTO_ICMPV6 };
        // An error too big for the way out is dropped (no error about an error, RFC 1122).
        match ctx.route(w.outer_src, w.outer_dst, proto) {
            Ok(r) => {
                if !ttl_ok::<A, P>(ctx) {
                    ctx.count(Counter::DropTtlExpired);
                    return P::DROP;
                }
                Some(r)
            }
            // As a reply's (`maybe_reply_of`): routed only to pass the node's netfilter by,
            // its source no node address, it goes to the stack where tc finds no way.
            Err(_) if P::HOOK == crate::ctx::HOOK_TC && !crate::service::is_node_source(&w.outer_src) => None,
            Err(_) => return ctx.unroutable(),
        }
    } else {
        None
    };
    let applied = if A::FAMILY == FAMILY_IPV4 { apply(ctx, e, &w) } else { apply6(ctx, e, &w) };
    if applied.is_none() {
        ctx.count(Counter::DropRewrite);
        return P::DROP;
    }
    ctx.count(Counter::IcmpTranslated);
    match route {
        Some(r) => {
            decrement_ttl::<A, P>(ctx);
            ctx.send(&r)
        }
        None => P::FORWARD,
    }
}

/// Offsets in the IPv4 header.
const IP_CSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;

#[inline(always)]
fn be32(b: &[u8; IPV4_LEN], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
fn set32(b: &mut [u8; IPV4_LEN], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

#[inline(always)]
fn set16(b: &mut [u8; IPV4_LEN], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_ne_bytes());
}

/// Writes the rewrite, every checksum updated incrementally (RFC 1624). ICMP errors come
/// from a kernel or a router with complete checksums, so the hand update is right at both hooks.
/// Either IP header may carry options, so the offsets vary with the packet: the headers are
/// read and written with the load/store helpers (ICMP errors are rare; the verifier needs no
/// bounds for a helper's offset).
#[inline(always)]
fn apply<A: Addr, P: Packet>(ctx: &P, e: &IcmpError<A>, w: &Rewrite<A>) -> Option<()> {
    let w = Rewrite::<u32> {
        outer_src: w.outer_src.words()[0],
        outer_dst: w.outer_dst.words()[0],
        inner_src: w.inner_src.words()[0],
        inner_sport: w.inner_sport,
        inner_dst: w.inner_dst.words()[0],
        inner_dport: w.inner_dport,
        route: w.route,
    };
    let mut outer: [u8; IPV4_LEN] = ctx.load(P::L2)?;
    let mut inner: [u8; IPV4_LEN] = ctx.load(e.inner_ip_off)?;
    let ports: [u8; 4] = ctx.load(e.inner_l4_off)?;
    let icmp_csum_off = e.icmp_off + 2;
    let mut icmp_csum = u16::from_ne_bytes(ctx.load(icmp_csum_off)?);
    let inner_l4_csum_off = e.inner_l4_off + if e.inner.proto == PROTO_TCP { 16 } else { 6 };
    // The quoted L4 checksum, when quoted and not UDP's "none" (zero, which stays zero).
    let old_l4 = if e.inner_csum { u16::from_ne_bytes(ctx.load(inner_l4_csum_off)?) } else { 0 };
    let update_l4 = old_l4 != 0 || (e.inner_csum && e.inner.proto == PROTO_TCP);
    let mut l4 = old_l4;

    let mut outer_csum = u16::from_ne_bytes([outer[IP_CSUM], outer[IP_CSUM + 1]]);
    outer_csum = csum_replace4(outer_csum, be32(&outer, IP_SRC), w.outer_src);
    outer_csum = csum_replace4(outer_csum, be32(&outer, IP_DST), w.outer_dst);
    set32(&mut outer, IP_SRC, w.outer_src);
    set32(&mut outer, IP_DST, w.outer_dst);
    set16(&mut outer, IP_CSUM, outer_csum);

    // The quoted addresses and ports: each change moves the quoted IP checksum (addresses),
    // the quoted L4 checksum (addresses via the pseudo-header, and ports) and the ICMP
    // checksum (every byte of the quote).
    let old_inner_csum = u16::from_ne_bytes([inner[IP_CSUM], inner[IP_CSUM + 1]]);
    let mut inner_csum = old_inner_csum;
    let (old_src, old_dst) = (be32(&inner, IP_SRC), be32(&inner, IP_DST));
    let old_sport = u16::from_ne_bytes([ports[0], ports[1]]);
    let old_dport = u16::from_ne_bytes([ports[2], ports[3]]);
    inner_csum = csum_replace4(csum_replace4(inner_csum, old_src, w.inner_src), old_dst, w.inner_dst);
    icmp_csum = csum_replace4(csum_replace4(icmp_csum, old_src, w.inner_src), old_dst, w.inner_dst);
    icmp_csum = csum_replace2(csum_replace2(icmp_csum, old_sport, w.inner_sport), old_dport, w.inner_dport);
    l4 = csum_replace4(csum_replace4(l4, old_src, w.inner_src), old_dst, w.inner_dst);
    l4 = csum_replace2(csum_replace2(l4, old_sport, w.inner_sport), old_dport, w.inner_dport);
    icmp_csum = csum_replace2(icmp_csum, old_inner_csum, inner_csum);
    set32(&mut inner, IP_SRC, w.inner_src);
    set32(&mut inner, IP_DST, w.inner_dst);
    set16(&mut inner, IP_CSUM, inner_csum);
    let mut new_ports = [0u8; 4];
    new_ports[..2].copy_from_slice(&w.inner_sport.to_ne_bytes());
    new_ports[2..].copy_from_slice(&w.inner_dport.to_ne_bytes());

    ctx.store(P::L2, &outer)?;
    ctx.store(e.inner_ip_off, &inner)?;
    ctx.store(e.inner_l4_off, &new_ports)?;
    if update_l4 {
        let new = if l4 == 0 && e.inner.proto != PROTO_TCP { 0xffff } else { l4 };
        icmp_csum = csum_replace2(icmp_csum, old_l4, new);
        ctx.store(inner_l4_csum_off, &new.to_ne_bytes())?;
    }
    ctx.store(icmp_csum_off, &icmp_csum.to_ne_bytes())
}

/// `apply` for ICMPv6: no IP header checksums, but the ICMPv6 checksum covers a pseudo-header
/// with the outer addresses, so a change of those moves it too. The quote is a fixed IPv6
/// header (the parser took only quotes without extension headers). The addresses are read one
/// at a time into two running sums and written from `w` as they are: holding all four old
/// and four new addresses at once took 400 bytes of spills, beside a stage's frame.
#[inline(never)]
fn apply6<A: Addr, P: Packet>(ctx: &P, e: &IcmpError<A>, w: &Rewrite<A>) -> Option<()> {
    let icmp_csum_off = e.icmp_off + 2;
    let inner_l4_csum_off = e.inner_l4_off + if e.inner.proto == PROTO_TCP { 16 } else { 6 };
    let old_l4 = if e.inner_csum { u16::from_ne_bytes(ctx.load(inner_l4_csum_off)?) } else { 0 };
    let update_l4 = old_l4 != 0 || (e.inner_csum && e.inner.proto == PROTO_TCP);
    let ports: [u8; 4] = ctx.load(e.inner_l4_off)?;
    let old_sport = u16::from_ne_bytes([ports[0], ports[1]]);
    let old_dport = u16::from_ne_bytes([ports[2], ports[3]]);
    // What changes inside the quote, which both the quoted L4 checksum and the ICMPv6
    // checksum cover; then the outer addresses, which only the ICMPv6 one does.
    let mut quote =
        wsum_add(wsum_add(!old_sport as u32, w.inner_sport as u32), wsum_add(!old_dport as u32, w.inner_dport as u32));
    quote = wsum_add(quote, A::csum_diff(load_addr(ctx, e.inner_ip_off + 8)?, w.inner_src));
    quote = wsum_add(quote, A::csum_diff(load_addr(ctx, e.inner_ip_off + 24)?, w.inner_dst));
    let mut outer = A::csum_diff(load_addr(ctx, P::L2 + 8)?, w.outer_src);
    outer = wsum_add(outer, A::csum_diff(load_addr(ctx, P::L2 + 24)?, w.outer_dst));
    let mut icmp_csum = u16::from_ne_bytes(ctx.load(icmp_csum_off)?);
    icmp_csum = !fold(wsum_add(wsum_add(!icmp_csum as u32, quote), outer));
    let l4 = !fold(wsum_add(!old_l4 as u32, quote));

    store_addr(ctx, P::L2 + 8, w.outer_src)?;
    store_addr(ctx, P::L2 + 24, w.outer_dst)?;
    store_addr(ctx, e.inner_ip_off + 8, w.inner_src)?;
    store_addr(ctx, e.inner_ip_off + 24, w.inner_dst)?;
    let mut new_ports = [0u8; 4];
    new_ports[..2].copy_from_slice(&w.inner_sport.to_ne_bytes());
    new_ports[2..].copy_from_slice(&w.inner_dport.to_ne_bytes());
    ctx.store(e.inner_l4_off, &new_ports)?;
    if update_l4 {
        // IPv6 UDP checksums are mandatory: a computed zero is sent as all ones.
        let new = if l4 == 0 && e.inner.proto != PROTO_TCP { 0xffff } else { l4 };
        icmp_csum = csum_replace2(icmp_csum, old_l4, new);
        ctx.store(inner_l4_csum_off, &new.to_ne_bytes())?;
    }
    ctx.store(icmp_csum_off, &icmp_csum.to_ne_bytes())
}

/// An IPv6 address at `off` (IPv6 only: an IPv4 one is not 16 bytes).
#[inline(always)]
fn load_addr<A: Addr, P: Packet>(ctx: &P, off: usize) -> Option<A> {
    ctx.load_words(off).map(A::from_words)
}

#[inline(always)]
fn store_addr<A: Addr, P: Packet>(ctx: &P, off: usize, a: A) -> Option<()> {
    ctx.store_words(off, &a.words())
}
