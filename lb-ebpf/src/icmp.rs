//! ICMP errors of translated flows, translated with them (netfilter's RELATED handling,
//! `nf_nat_icmp_reply_translation`): a "fragmentation needed", "port unreachable" or "time
//! exceeded" quotes the packet as the sender saw it, after our translation, so the client (or
//! backend) would not match it to its socket. The quote is put back into the other side's
//! view: the quoted addresses and ports, the quoted IP and L4 checksums, the ICMP checksum,
//! and the outer addresses where they are ours (the backend or the SNAT address).
//!
//! Both IP headers must be option-free (fixed offsets; parse.rs leaves others untouched).
use lb_common::{CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_ROUTE, CT_FLAG_SNAT, PROTO_TCP};

use crate::{
    conntrack::key,
    ctx::Packet,
    maps::LB_CONNTRACK,
    nat::{csum_replace2, csum_replace4, decrement_ttl, ttl_ok},
    parse::{ptr_at, IcmpError, ETH_LEN, ICMP_OFF, INNER_IP_OFF, INNER_L4_OFF},
};
use lb_common::Counter;

/// What the packet becomes. Every field is set (unchanged ones to their current value, which
/// rewrites as a no-op): `Option`s here let LLVM read an uninitialised register on the `None`
/// path, which the verifier rejects ("!read_ok").
#[derive(Clone, Copy)]
struct Rewrite {
    outer_src: u32,
    outer_dst: u32,
    inner_src: u32,
    inner_sport: u16,
    inner_dst: u32,
    inner_dport: u16,
    route: bool,
}

#[inline(always)]
fn entry(k: &lb_common::CtKey) -> Option<CtValue> {
    // SAFETY: the value is copied out at once.
    unsafe { LB_CONNTRACK.get(k).copied() }
}

/// Matches the quote against conntrack and says what to rewrite.
#[inline(always)]
fn plan(e: &IcmpError) -> Option<Rewrite> {
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
        w.inner_dst = r.nat_addr[0];
        w.inner_dport = r.nat_port;
        if r.flags & CT_FLAG_SNAT != 0 {
            w.inner_src = r.snat_addr[0];
            w.inner_sport = r.snat_port;
            w.outer_dst = r.snat_addr[0];
        }
        // From the backend itself: it must look as if from the frontend. A router on the way
        // keeps its own address, which a client accepts (it matches errors by the quote).
        if e.outer.src == q.dst {
            w.outer_src = r.nat_addr[0];
            w.route = r.flags & CT_FLAG_ROUTE != 0;
        }
        return Some(w);
    }
    // The quote is a translated reply (frontend -> client): the error travels to the backend,
    // like the client's packets do.
    let f = entry(&key(q.dst, q.src, q.dport, q.sport, q.proto, CT_DIR_FORWARD))?;
    w.inner_src = f.nat_addr[0];
    w.inner_sport = f.nat_port;
    w.outer_dst = f.nat_addr[0];
    if f.flags & CT_FLAG_SNAT != 0 {
        w.inner_dst = f.snat_addr[0];
        w.inner_dport = f.snat_port;
        if e.outer.src == q.dst {
            w.outer_src = f.snat_addr[0];
            w.route = f.flags & CT_FLAG_ROUTE != 0;
        }
    }
    Some(w)
}

/// Translates an ICMP error about a tracked flow; other ICMP errors pass.
#[inline(always)]
pub fn translate<P: Packet>(ctx: &P, e: &IcmpError) -> i32 {
    let Some(w) = plan(e) else {
        ctx.count(Counter::PassNotService);
        return P::UNTOUCHED;
    };
    let route = if w.route {
        let Some(r) = ctx.route(w.outer_src, w.outer_dst, crate::parse::PROTO_ICMP) else {
            return ctx.unroutable();
        };
        if !ttl_ok(ctx) {
            ctx.count(Counter::DropTtlExpired);
            return P::DROP;
        }
        Some(r)
    } else {
        None
    };
    if apply(ctx, e, &w).is_none() {
        ctx.count(Counter::DropRewrite);
        return P::DROP;
    }
    ctx.count(Counter::IcmpTranslated);
    match route {
        Some(r) => {
            decrement_ttl(ctx);
            ctx.send(&r)
        }
        None => P::FORWARD,
    }
}

const OUTER_CSUM: usize = ETH_LEN + 10;
const OUTER_SRC: usize = ETH_LEN + 12;
const OUTER_DST: usize = ETH_LEN + 16;
const ICMP_CSUM: usize = ICMP_OFF + 2;
const INNER_CSUM: usize = INNER_IP_OFF + 10;
const INNER_SRC: usize = INNER_IP_OFF + 12;
const INNER_DST: usize = INNER_IP_OFF + 16;

#[inline(always)]
fn write32(data: usize, data_end: usize, off: usize, v: u32) -> Option<u32> {
    let p = ptr_at::<u32>(data, data_end, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let old = p.read_unaligned();
        p.write_unaligned(v);
        Some(old)
    }
}

#[inline(always)]
fn write16(data: usize, data_end: usize, off: usize, v: u16) -> Option<u16> {
    let p = ptr_at::<u16>(data, data_end, off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let old = p.read_unaligned();
        p.write_unaligned(v);
        Some(old)
    }
}

#[inline(always)]
fn read16(data: usize, data_end: usize, off: usize) -> Option<u16> {
    // SAFETY: bounds checked by ptr_at.
    ptr_at::<u16>(data, data_end, off).map(|p| unsafe { p.read_unaligned() })
}

/// Writes the rewrite, every checksum updated incrementally (RFC 1624). ICMP errors come
/// from a kernel or a router with complete checksums, so the hand update is right at both hooks.
#[inline(always)]
fn apply<P: Packet>(ctx: &P, e: &IcmpError, w: &Rewrite) -> Option<()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let mut outer_csum = read16(data, data_end, OUTER_CSUM)?;
    let mut icmp_csum = read16(data, data_end, ICMP_CSUM)?;
    let mut inner_csum = read16(data, data_end, INNER_CSUM)?;
    let inner_l4_csum_off = INNER_L4_OFF + if e.inner.proto == PROTO_TCP { 16 } else { 6 };
    // The quoted L4 checksum, when quoted and not UDP's "none" (zero, which stays zero).
    let old_l4 = if e.inner_csum { read16(data, data_end, inner_l4_csum_off).unwrap_or(0) } else { 0 };
    let update_l4 = old_l4 != 0 || (e.inner_csum && e.inner.proto == PROTO_TCP);
    let mut l4 = old_l4;
    let old_inner_csum = inner_csum;

    let old = write32(data, data_end, OUTER_SRC, w.outer_src)?;
    outer_csum = csum_replace4(outer_csum, old, w.outer_src);
    let old = write32(data, data_end, OUTER_DST, w.outer_dst)?;
    outer_csum = csum_replace4(outer_csum, old, w.outer_dst);
    // The quoted addresses and ports: each change moves the quoted IP checksum (addresses),
    // the quoted L4 checksum (addresses via the pseudo-header, and ports) and the ICMP
    // checksum (every byte of the quote).
    let old = write32(data, data_end, INNER_SRC, w.inner_src)?;
    let old_p = write16(data, data_end, INNER_L4_OFF, w.inner_sport)?;
    inner_csum = csum_replace4(inner_csum, old, w.inner_src);
    icmp_csum = csum_replace2(csum_replace4(icmp_csum, old, w.inner_src), old_p, w.inner_sport);
    l4 = csum_replace2(csum_replace4(l4, old, w.inner_src), old_p, w.inner_sport);
    let old = write32(data, data_end, INNER_DST, w.inner_dst)?;
    let old_p = write16(data, data_end, INNER_L4_OFF + 2, w.inner_dport)?;
    inner_csum = csum_replace4(inner_csum, old, w.inner_dst);
    icmp_csum = csum_replace2(csum_replace4(icmp_csum, old, w.inner_dst), old_p, w.inner_dport);
    l4 = csum_replace2(csum_replace4(l4, old, w.inner_dst), old_p, w.inner_dport);
    icmp_csum = csum_replace2(icmp_csum, old_inner_csum, inner_csum);
    write16(data, data_end, INNER_CSUM, inner_csum)?;
    if update_l4 {
        let new = if l4 == 0 && e.inner.proto != PROTO_TCP { 0xffff } else { l4 };
        icmp_csum = csum_replace2(icmp_csum, old_l4, new);
        write16(data, data_end, inner_l4_csum_off, new)?;
    }
    write16(data, data_end, ICMP_CSUM, icmp_csum)?;
    write16(data, data_end, OUTER_CSUM, outer_csum)?;
    Some(())
}
