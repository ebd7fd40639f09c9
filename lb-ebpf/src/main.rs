//! Kernel side of `lb`: Kubernetes Service translation at tc ingress (every interface) and at
//! XDP (the node's external interfaces, ahead of the stack).
//!
//! The pipeline reads as what it is (Katran's `process_packet`, Cilium's `lb4_local`):
//! parse -> service lookup -> source ranges -> conntrack -> backend selection and SNAT choice
//! for new flows -> NAT; for packets not addressed to a service: conntrack -> reverse NAT of
//! replies. Both hooks run the same pipeline; `ctx::Packet` holds what differs between them.
#![no_std]
#![no_main]
// Inline asm on BPF: `mem.rs`, the packet's word loads and stores.
#![feature(asm_experimental_arch)]

mod addr;
mod conntrack;
mod ct_cache;
mod ct_live;
mod ct_table;
mod ctx;
mod frag;
mod icmp;
mod maps;
mod mem;
mod nat;
mod parse;
mod reject;
mod select;
mod service;
mod sock;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::{Counter, ServiceValue, SVC_FLAG_LOCAL_ONLY};

use crate::{
    addr::Addr,
    conntrack::{Forward, Translation},
    ctx::{Packet, Route, TcL3},
    nat::Snat,
    parse::{Flow, Frag, Headers, IcmpError, Parse, Parsed, ETH_P_IPV6_BE, ETH_P_IP_BE},
};

#[classifier]
// Inlined into the entry the macro generates: a tail call must sit in the main program,
// not a subprogram (which would need BTF function info the loader does not pass).
#[inline(always)]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    pipeline(&ctx, lb_common::TAIL_TC_INGRESS6)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_ingress6(ctx: TcContext) -> i32 {
    family::<[u32; 4], TcContext>(&ctx)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_fwd6(ctx: TcContext) -> i32 {
    forward_stage::<[u32; 4], TcContext>(&ctx)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_reply6(ctx: TcContext) -> i32 {
    reply_stage::<[u32; 4], TcContext>(&ctx)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_new6(ctx: TcContext) -> i32 {
    new_flow_stage::<[u32; 4], TcContext>(&ctx)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_new4(ctx: TcContext) -> i32 {
    new_flow4_stage(&ctx)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_icmp6(ctx: TcContext) -> i32 {
    icmp_stage::<[u32; 4], TcContext>(&ctx)
}

/// tc egress: backends' replies the stack forwards as they were sent (flows not SNATed, which
/// tc ingress leaves to it), replies of this node's own processes (host-network endpoints),
/// which never pass a tc ingress hook, and ICMP errors the node itself sends about a
/// translated packet (`host_reply_of`).
#[classifier]
// Inlined into the entry the macro generates: a tail call must sit in the main program,
// not a subprogram (which would need BTF function info the loader does not pass).
#[inline(always)]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    egress(&ctx, lb_common::TAIL_TC_EGRESS6)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_egress6(ctx: TcContext) -> i32 {
    host_reply_of::<[u32; 4], TcContext>(&ctx)
}

/// tc ingress on devices without a link-layer header (`ctx::TcL3`: tun, WireGuard, IPIP):
/// Service traffic arriving by a tunnel (a client behind a VPN, node addresses reached over
/// WireGuard) is served by the Ethernet program itself. A packet it may have work for is given
/// an Ethernet header (`TcL3::push_ethernet`) and tail-called into `lb_tc_ingress`; everything
/// else passes here, untouched, with no header pushed. The whole ingress pipeline compiled a
/// second time for packets starting at their IP header went past the verifier's budget of a
/// million instructions, which the Ethernet program nearly fills.
#[classifier]
#[inline(always)]
pub fn lb_tc_ingress_l3(ctx: TcContext) -> i32 {
    ingress_l3(&TcL3(ctx))
}

/// tc egress on devices without a link-layer header (`ctx::TcL3`): the same restoring of
/// replies, reading the IP header at the packet's start. Attached by the agent instead of
/// `lb_tc_egress` on such devices, so that a reply leaving by a tunnel to another node (Calico's
/// IPIP and WireGuard modes route other nodes' pods through one) is restored. Their ingress
/// gets `lb_tc_ingress_l3`.
#[classifier]
#[inline(always)]
pub fn lb_tc_egress_l3(ctx: TcContext) -> i32 {
    egress(&TcL3(ctx), lb_common::TAIL_TC_EGRESS6_L3)
}

#[classifier]
#[inline(always)]
pub fn lb_tc_egress6_l3(ctx: TcContext) -> i32 {
    host_reply_of::<[u32; 4], TcL3>(&TcL3(ctx))
}

#[classifier]
#[inline(always)]
pub fn lb_tc_icmp6_l3(ctx: TcContext) -> i32 {
    icmp_stage::<[u32; 4], TcL3>(&TcL3(ctx))
}

/// XDP: IPv4 here, IPv6 in the stages below, reached by tail calls as at tc.
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    pipeline(&ctx, lb_common::TAIL_XDP6) as u32
}

#[xdp]
#[inline(always)]
pub fn lb_xdp6(ctx: XdpContext) -> u32 {
    family::<[u32; 4], XdpContext>(&ctx) as u32
}

#[xdp]
#[inline(always)]
pub fn lb_xdp_fwd6(ctx: XdpContext) -> u32 {
    forward_stage::<[u32; 4], XdpContext>(&ctx) as u32
}

#[xdp]
#[inline(always)]
pub fn lb_xdp_reply6(ctx: XdpContext) -> u32 {
    reply_stage::<[u32; 4], XdpContext>(&ctx) as u32
}

#[xdp]
#[inline(always)]
pub fn lb_xdp_new6(ctx: XdpContext) -> u32 {
    new_flow_stage::<[u32; 4], XdpContext>(&ctx) as u32
}

#[xdp]
#[inline(always)]
pub fn lb_xdp_new4(ctx: XdpContext) -> u32 {
    new_flow4_stage(&ctx) as u32
}

#[xdp]
#[inline(always)]
pub fn lb_xdp_icmp6(ctx: XdpContext) -> u32 {
    icmp_stage::<[u32; 4], XdpContext>(&ctx) as u32
}

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend::<u32>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::to_backend::<[u32; 4]>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend::<u32>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_backend::<[u32; 4]>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend::<u32>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_frontend::<[u32; 4]>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend::<u32>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::to_frontend::<[u32; 4]>(&ctx)
}

/// The floor for `lb-bench`: an XDP program that does nothing. Never attached by the agent.
#[xdp]
pub fn lb_bench_empty_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// The floor for `lb-bench` at tc. Never attached by the agent.
#[classifier]
pub fn lb_bench_empty_tc(_ctx: TcContext) -> i32 {
    -1
}

/// IPv4 runs here; IPv6 in a program of its own, reached by a tail call (as Cilium splits its
/// families): the verifier then checks each family's paths apart, and each gets the whole
/// 512-byte stack. A missing tail (an agent that did not fill the table) passes the packet.
#[inline(always)]
fn pipeline<P: Packet>(ctx: &P, tail: u32) -> i32 {
    if ctx.vlan_tagged() {
        // A VLAN's packet on the VLAN's parent: translated here and sent elsewhere
        // (`bpf_redirect_neigh`), it would keep the client's tag on the way out. The VLAN
        // device, which the agent attaches too (every interface but `lo` by default), sees it
        // next, untagged, and serves it.
        return pass(ctx, Counter::PassNotIp);
    }
    match ctx.ethertype() {
        Some(ETH_P_IP_BE) => family::<u32, P>(ctx),
        Some(ETH_P_IPV6_BE) => {
            ctx.tail_call(tail);
            pass(ctx, Counter::PassNotIp)
        }
        Some(_) => pass(ctx, Counter::PassNotIp),
        None => pass(ctx, Counter::PassMalformed),
    }
}

/// The pipeline for one address family.
#[inline(always)]
fn family<A: Parse, P: Packet>(ctx: &P) -> i32 {
    let h = match A::parse(ctx.data(), ctx.data_end(), P::L2) {
        Parsed::L4(h) => {
            if h.frag == Frag::First {
                frag::record_first(&h);
            }
            h
        }
        Parsed::LaterFragment(mut h) => {
            if !frag::follow_first(&mut h) {
                return drop(ctx, Counter::DropFragNoFirst);
            }
            h
        }
        Parsed::Icmp(e) => return icmp_error(ctx, e, false).unwrap_or_else(|| pass(ctx, Counter::PassOtherProto)),
        Parsed::Malformed => return pass(ctx, Counter::PassMalformed),
        Parsed::ExtHeaders => return pass(ctx, Counter::PassExtHeaders),
        Parsed::OtherProto => return pass(ctx, Counter::PassOtherProto),
    };
    if A::FAMILY != lb_common::FAMILY_IPV4 {
        // IPv6 goes on in stage programs, each with a stack frame of its own.
        ctx.set_note(0);
        if service::maybe_frontend(&h.flow) {
            ctx.tail_call(P::TAIL_FWD6);
        } else if service::maybe_backend(&h.flow) {
            ctx.tail_call(P::TAIL_REPLY6);
        }
        return pass(ctx, if h.frag == Frag::Whole { Counter::PassNotService } else { Counter::PassFragment });
    }
    if service::maybe_frontend(&h.flow) {
        // A packet of a tracked flow needs its entry and nothing else: conntrack before the
        // service lookup, which only a new flow needs.
        if ctx.csum_unsure(&h) {
            return ctx.defer();
        }
        let now = conntrack::now();
        match conntrack::forward(&h.flow, h.tcp_flags, now, P::HOOK) {
            Forward::Tracked(t) => return forward(ctx, &h, &t, Counter::FwdTracked),
            Forward::New => {
                if let Some(svc) = service::lookup_cached(&h.flow) {
                    // IPv4 (IPv6 went to its own stages above): the new-flow stage is a program
                    // of its own (`new_flow4_stage`), given the frontend found here.
                    service::hand_over(&h.flow, &svc);
                    ctx.tail_call_new4();
                    return pass(ctx, Counter::PassNotService);
                }
            }
        }
    }
    if !service::maybe_backend(&h.flow) {
        return pass(ctx, if h.frag == Frag::Whole { Counter::PassNotService } else { Counter::PassFragment });
    }
    maybe_reply(ctx, &h)
}

/// `lb_tc_ingress_l3`: a packet the Ethernet program may have work for goes to it with an
/// Ethernet header; the rest passes, counted as that program would count it.
#[inline(always)]
fn ingress_l3(ctx: &TcL3) -> i32 {
    let ethertype = match ctx.ethertype() {
        Some(e) if e == ETH_P_IP_BE || e == ETH_P_IPV6_BE => e,
        Some(_) => return pass(ctx, Counter::PassNotIp),
        None => return pass(ctx, Counter::PassMalformed),
    };
    let passed = if ethertype == ETH_P_IP_BE {
        passed_as::<u32, TcL3>(ctx)
    } else if ctx::ipv6_on() {
        passed_as6(ctx)
    } else {
        Some(Counter::PassNotIp)
    };
    if let Some(counter) = passed {
        return pass(ctx, counter);
    }
    if ctx.push_ethernet(ethertype).is_err() {
        // Left to the stack untranslated; the kernel refused the room (see `push_ethernet`).
        return pass(ctx, Counter::PassMalformed);
    }
    ctx.tail_call_ingress();
    // No program in the slot: the header pushed is pulled again by the kernel (`mac_len`).
    pass(ctx, Counter::PassNotService)
}

/// IPv6's `passed_as`, from the fixed header: TCP and UDP right after it are checked against
/// the filters, extension headers, fragments and ICMPv6 go on to the Ethernet program, which
/// walks them. (Through `parse6` here, LLVM stored a register it had left unset on one path,
/// which the verifier refuses.)
#[inline(always)]
fn passed_as6<P: Packet>(ctx: &P) -> Option<Counter> {
    use parse::{ptr_at, NEXT_DEST_OPTS, NEXT_FRAGMENT, NEXT_HOP_BY_HOP, NEXT_ROUTING, PROTO_ICMPV6};
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(ip) = ptr_at::<[u8; 40]>(data, data_end, P::L2) else {
        return Some(Counter::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Some(Counter::PassMalformed);
    }
    let proto = ip[6];
    match proto {
        lb_common::PROTO_TCP | lb_common::PROTO_UDP => {
            // The whole L4 header, as `parse6` asks, so a truncated one counts as it would;
            // the ports are its first four bytes.
            let l4 = if proto == lb_common::PROTO_TCP {
                ptr_at::<[u8; 20]>(data, data_end, P::L2 + 40).map(|p| p as usize)
            } else {
                ptr_at::<[u8; 8]>(data, data_end, P::L2 + 40).map(|p| p as usize)
            };
            let Some(ports) = l4 else {
                return Some(Counter::PassMalformed);
            };
            // SAFETY: the addresses lie within the header checked above, the ports within
            // the bound just checked; loaded as `parse` loads them.
            let flow = unsafe {
                Flow {
                    src: <[u32; 4] as Addr>::read(ip.as_ptr().add(8)),
                    dst: <[u32; 4] as Addr>::read(ip.as_ptr().add(24)),
                    sport: mem::load16::<0>(ports),
                    dport: mem::load16::<2>(ports),
                    proto,
                }
            };
            if service::maybe_frontend(&flow)
                || (nat::to_snat_addr::<[u32; 4], P>(ctx) && service::maybe_backend(&flow))
            {
                None
            } else {
                Some(Counter::PassNotService)
            }
        }
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS | NEXT_FRAGMENT | PROTO_ICMPV6 => None,
        _ => Some(Counter::PassOtherProto),
    }
}

/// `None` if `family` may do anything with the packet but pass it: an address and port that
/// may be a frontend's (the filter it checks first), a backend's reply to the address flows
/// are SNATed to (a reply to its client's own address it leaves to the stack, for the egress
/// program of the way out: in a cluster that routes pods through tunnels, much of what
/// arrives by one), any fragment (it records every first fragment, and drops a later one
/// whose first it did not see), or an ICMP error (which may quote a translated packet). Else
/// the counter of its pass.
#[inline(always)]
fn passed_as<A: Parse, P: Packet>(ctx: &P) -> Option<Counter> {
    match A::parse(ctx.data(), ctx.data_end(), P::L2) {
        Parsed::L4(h) => {
            if h.frag != Frag::Whole
                || service::maybe_frontend(&h.flow)
                || (nat::to_snat_addr::<A, P>(ctx) && service::maybe_backend(&h.flow))
            {
                None
            } else {
                Some(Counter::PassNotService)
            }
        }
        Parsed::LaterFragment(_) | Parsed::Icmp(_) => None,
        Parsed::Malformed => Some(Counter::PassMalformed),
        Parsed::ExtHeaders => Some(Counter::PassExtHeaders),
        Parsed::OtherProto => Some(Counter::PassOtherProto),
    }
}

/// The headers of a TCP or UDP packet (a later fragment given its datagram's ports), for the
/// IPv6 stages after a tail call, which parse the packet again.
#[inline(always)]
fn reparse<A: Parse>(data: usize, data_end: usize, l2: usize) -> Option<Headers<A>> {
    match A::parse(data, data_end, l2) {
        Parsed::L4(h) => Some(h),
        Parsed::LaterFragment(mut h) => frag::follow_first(&mut h).then_some(h),
        _ => None,
    }
}

/// Translates an ICMP error: IPv4's here, IPv6's in the ICMP stage, which takes the parse from
/// the scratch slot (parsing again would put the quote's addresses on its stack a second
/// time) and `after_stack` in the note; `None` only if that stage is missing. Inlined: a tail
/// call must sit in the main program. `after_stack`: at tc egress (see `icmp::translate`).
#[inline(always)]
fn icmp_error<A: Parse, P: Packet>(ctx: &P, e: IcmpError<A>, after_stack: bool) -> Option<i32> {
    if A::FAMILY == lb_common::FAMILY_IPV4 {
        return Some(icmp::translate(ctx, &e, after_stack));
    }
    let s = A::scratch();
    if !s.is_null() {
        // SAFETY: this CPU's slot; only its `icmp` field, which the ICMP stage reads.
        unsafe { (*s).icmp = e };
        // Set either way: tc leaves `cb[0]` as it finds it.
        ctx.set_note(if after_stack { NOTE_AFTER_STACK } else { 0 });
        ctx.tail_call(P::TAIL_ICMP6);
    }
    None
}

/// `Packet::note` of an IPv6 packet whose flow the new-flow stage just created, so that the
/// forward stage counts it as a new flow.
const NOTE_NEW_FLOW: u32 = 1;

/// `Packet::note` of an IPv6 ICMP error handed to the ICMP stage by the tc egress program.
const NOTE_AFTER_STACK: u32 = 2;

/// IPv6's new-flow stage, tail-called by the forward stage for a packet that found no flow
/// but a frontend: it chooses the backend and records the flow, then hands the packet back
/// to the forward stage, which now finds it tracked. The stack frame of IPv6's pipeline would
/// not hold all of it, so each stage is a program with its own (as Cilium splits its
/// datapath into tail calls); a new IPv6 flow pays one more conntrack lookup for it.
#[inline(always)]
fn new_flow_stage<A: Parse, P: Packet>(ctx: &P) -> i32 {
    let Some(h) = reparse::<A>(ctx.data(), ctx.data_end(), P::L2) else {
        return pass(ctx, Counter::PassMalformed);
    };
    let Some(svc) = service::lookup(&h.flow, service::from_cluster) else {
        return pass(ctx, Counter::PassNotService);
    };
    if !service::source_allowed(&svc, &h.flow) {
        return drop(ctx, Counter::DropSourceRange);
    }
    if let Err(verdict) = new_flow(ctx, &h, &svc, conntrack::now()) {
        return verdict;
    }
    ctx.set_note(NOTE_NEW_FLOW);
    ctx.tail_call(P::TAIL_FWD6);
    pass(ctx, Counter::PassNotService)
}

/// IPv4's new-flow stage, tail-called by `family` for a packet that found no flow but a
/// frontend: it chooses the backend, records the flow and forwards the packet. A program of
/// its own, as Cilium splits its datapath into tail calls, so that the verifier checks backend
/// selection, the SNAT port search and the new-flow table apart from the tracked and reply
/// paths: with all of them inlined into one program, small changes of code shape took the
/// XDP program's count past the verifier's 1,000,000 instructions. The first packet of each
/// flow pays for it with the tail call and a second parse; the frontend comes along in the
/// scratch slot (`service::hand_over`).
#[inline(always)]
fn new_flow4_stage<P: Packet>(ctx: &P) -> i32 {
    let Some(h) = reparse::<u32>(ctx.data(), ctx.data_end(), P::L2) else {
        return pass(ctx, Counter::PassMalformed);
    };
    let Some(svc) = service::taken_over(&h.flow).or_else(|| service::lookup(&h.flow, service::from_cluster)) else {
        return pass(ctx, Counter::PassNotService);
    };
    to_service(ctx, &h, &svc, conntrack::now())
}

/// IPv6's stage for a packet to a possible frontend: its flow, or the new-flow stage, or (not
/// a frontend after all) the reply stage.
#[inline(always)]
fn forward_stage<A: Parse, P: Packet>(ctx: &P) -> i32 {
    let Some(h) = reparse::<A>(ctx.data(), ctx.data_end(), P::L2) else {
        return pass(ctx, Counter::PassMalformed);
    };
    if ctx.csum_unsure(&h) {
        return ctx.defer();
    }
    let now = conntrack::now();
    match conntrack::forward(&h.flow, h.tcp_flags, now, P::HOOK) {
        Forward::Tracked(t) => {
            let counter = if ctx.note() == NOTE_NEW_FLOW { Counter::FwdNewFlow } else { Counter::FwdTracked };
            return forward(ctx, &h, &t, counter);
        }
        Forward::New => {
            if ctx.note() == NOTE_NEW_FLOW {
                // Created and gone at once (another CPU's insert took its way): no second
                // round.
                return drop(ctx, Counter::DropCtInsert);
            }
            if service::lookup(&h.flow, service::from_cluster).is_some() {
                ctx.tail_call(P::TAIL_NEW6);
                return pass(ctx, Counter::PassNotService);
            }
        }
    }
    if service::maybe_backend(&h.flow) {
        ctx.tail_call(P::TAIL_REPLY6);
    }
    pass(ctx, if h.frag == Frag::Whole { Counter::PassNotService } else { Counter::PassFragment })
}

/// IPv6's stage for a packet that may be a backend's reply.
#[inline(always)]
fn reply_stage<A: Parse, P: Packet>(ctx: &P) -> i32 {
    let Some(h) = reparse::<A>(ctx.data(), ctx.data_end(), P::L2) else {
        return pass(ctx, Counter::PassMalformed);
    };
    // Here rather than in `maybe_reply_of` as IPv4's: inside that subprogram, LLVM's spills
    // for the compare made the verifier refuse it ("invalid size of register fill"), and as a
    // subprogram of its own it took the stack past 512 bytes.
    if !nat::to_snat_addr::<A, P>(ctx) {
        return pass_reply(ctx, &h);
    }
    maybe_reply(ctx, &h)
}

/// IPv6's ICMP error stage, tail-called by `icmp_error` (from `family` at ingress,
/// `host_reply_of` at egress) with the error's parse in the scratch slot, written right before.
#[inline(always)]
fn icmp_stage<A: Parse, P: Packet>(ctx: &P) -> i32 {
    let s = A::scratch();
    if s.is_null() {
        return pass(ctx, Counter::PassOtherProto);
    }
    // SAFETY: this CPU's slot; `icmp` is written by `icmp_error` just before the tail call
    // and by nothing else while this stage runs (the conntrack code uses the other fields).
    icmp::translate(ctx, unsafe { &(*s).icmp }, ctx.note() == NOTE_AFTER_STACK)
}

/// Counts a translated packet; a later fragment also as such.
#[inline(always)]
fn count_translated<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, counter: Counter) {
    ctx.count(counter);
    if h.frag == Frag::Later {
        ctx.count(Counter::FragTranslated);
    }
}

/// Checks, before any rewrite, that a packet the datapath forwards itself may be forwarded.
#[inline(always)]
fn forwardable<A: Addr, P: Packet>(ctx: &P) -> Result<(), i32> {
    if nat::ttl_ok::<A, P>(ctx) {
        Ok(())
    } else {
        Err(drop(ctx, Counter::DropTtlExpired))
    }
}

#[inline(always)]
fn pass<P: Packet>(ctx: &P, counter: Counter) -> i32 {
    ctx.count(counter);
    P::UNTOUCHED
}

#[inline(always)]
fn drop<P: Packet>(ctx: &P, counter: Counter) -> i32 {
    ctx.count(counter);
    P::DROP
}

/// A new flow to a service frontend.
#[inline(always)]
fn to_service<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, svc: &ServiceValue, now: u32) -> i32 {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6 {
        to_service_of(ctx, h, svc, now)
    } else {
        to_service_outlined(ctx, h, svc, now)
    }
}

/// As `forward_outlined`: the SNAT port search and both new conntrack entries.
#[inline(never)]
fn to_service_outlined<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, svc: &ServiceValue, now: u32) -> i32 {
    to_service_of(ctx, h, svc, now)
}

#[inline(always)]
fn to_service_of<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, svc: &ServiceValue, now: u32) -> i32 {
    if !service::source_allowed(svc, &h.flow) {
        return drop(ctx, Counter::DropSourceRange);
    }
    match new_flow(ctx, h, svc, now) {
        Ok(t) => forward(ctx, h, &t, Counter::FwdNewFlow),
        Err(verdict) => verdict,
    }
}

/// Sends a client's packet on to its backend: routed by the datapath when its new source is
/// a node address, else on to the stack.
#[inline(always)]
fn forward<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, t: &Translation<A>, counter: Counter) -> i32 {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6 {
        forward_of(ctx, h, t, counter)
    } else {
        forward_outlined(ctx, h, t, counter)
    }
}

/// IPv6 stages are subprograms where IPv4's are inlined: their 16-byte addresses would take
/// the pipeline's frame past the 512-byte stack.
#[inline(never)]
fn forward_outlined<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, t: &Translation<A>, counter: Counter) -> i32 {
    forward_of(ctx, h, t, counter)
}

#[inline(always)]
fn forward_of<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, t: &Translation<A>, counter: Counter) -> i32 {
    let src = if t.snat { t.snat_addr } else { h.flow.src };
    let route = if t.route {
        let r = match ctx.route(src, t.backend_addr, h.flow.proto) {
            Ok(r) => r,
            Err(e) => return ctx.unroutable_for(h, e),
        };
        if let Err(verdict) = forwardable::<A, P>(ctx) {
            return verdict;
        }
        Some(r)
    } else {
        None
    };
    let dst = (t.backend_addr, t.backend_port);
    // Most flows are a DNAT alone (`nat::rewrite_dst`: no work for the unchanged source).
    let rewritten =
        if t.snat { nat::rewrite(ctx, h, (t.snat_addr, t.snat_port), dst) } else { nat::rewrite_dst(ctx, h, dst) };
    if rewritten.is_err() {
        return drop(ctx, Counter::DropRewrite);
    }
    count_translated(ctx, h, counter);
    stats::count_service(t.service_id, ctx.packet_len());
    match route {
        Some(r) => {
            nat::decrement_ttl::<A, P>(ctx);
            ctx.send(&r)
        }
        None => P::FORWARD,
    }
}

/// Chooses and records the translation of a new flow; `Err` carries the verdict for a flow
/// that must not be forwarded.
#[inline(always)]
fn new_flow<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, svc: &ServiceValue, now: u32) -> Result<Translation<A>, i32> {
    if svc.backend_count == 0 {
        if svc.flags & SVC_FLAG_LOCAL_ONLY != 0 {
            // kube-proxy drops rather than rejects when a Local policy has no local endpoint,
            // so that a load balancer health-checking nodes moves traffic elsewhere.
            return Err(drop(ctx, Counter::DropNoLocalBackend));
        }
        if h.frag == Frag::Later {
            // Its first fragment was refused already; this one has nothing to quote.
            return Err(drop(ctx, Counter::RejectNoBackend));
        }
        return Err(ctx.refuse(h));
    }
    let Some(backend) = select::select(P::HOOK, svc, &h.flow) else {
        return Err(drop(ctx, Counter::DropSlotMissing));
    };
    let mut t = Translation {
        backend_addr: A::from_words(backend.addr),
        backend_port: backend.port,
        snat: false,
        snat_addr: A::default(),
        snat_port: 0,
        route: false,
        service_id: svc.id,
    };
    match nat::snat_for(svc, &backend, &h.flow, now) {
        Snat::No => {}
        Snat::To(addr, port, routed) => {
            ctx.count(Counter::FwdSnat);
            (t.snat, t.snat_addr, t.snat_port, t.route) = (true, addr, port, routed);
        }
        Snat::Exhausted => return Err(drop(ctx, Counter::DropSnatPorts)),
    }
    // Replies are routed here when the flow's packets are (SNATed to the node, hairpin):
    // they left past the node's own netfilter, whose conntrack would call the first reply
    // INVALID (a SYN-ACK it never saw the SYN of) and a FORWARD rule dropping such packets
    // would drop it. The other flows' replies go through the stack and are restored at egress
    // (`maybe_reply_of`), a node port's among them: its source is then the node's on the way
    // out only, after the stack's source check.
    let reply_route = t.route;
    if conntrack::create(&h.flow, h.tcp_flags, &t, svc.id, now, reply_route, P::HOOK).is_err() {
        return Err(drop(ctx, Counter::DropCtInsert));
    }
    Ok(t)
}

/// tc egress: IPv4 here, IPv6 in a program of its own (`tail`), as at ingress.
#[inline(always)]
fn egress<P: Packet>(ctx: &P, tail: u32) -> i32 {
    match ctx.ethertype() {
        Some(ETH_P_IP_BE) => host_reply_of::<u32, P>(ctx),
        Some(ETH_P_IPV6_BE) => {
            ctx.tail_call(tail);
            P::UNTOUCHED
        }
        _ => P::UNTOUCHED,
    }
}

/// A packet this node sends: if it is a host-network endpoint's reply, restore the frontend
/// (and, for SNATed flows, the client); if it is an ICMP error about a translated packet,
/// translate it. It is on its way out already, so it is never routed here, and a later
/// fragment without its first is left alone (it is the node's own).
#[inline(always)]
fn host_reply_of<A: Parse, P: Packet>(ctx: &P) -> i32 {
    const { assert!(P::HOOK == crate::ctx::HOOK_TC) };
    let h = match A::parse(ctx.data(), ctx.data_end(), P::L2) {
        Parsed::L4(h) => {
            if h.frag == Frag::First && service::maybe_backend(&h.flow) {
                frag::record_first(&h);
            }
            h
        }
        Parsed::LaterFragment(mut h) => {
            if !frag::follow_first(&mut h) {
                return P::UNTOUCHED;
            }
            h
        }
        // An error the node sends about a packet it was forwarding after our translation
        // ("fragmentation needed" from `ip_forward` towards a pod whose veth has a smaller MTU,
        // port unreachable from a host-network endpoint) quotes the backend's side, which the
        // client cannot match: translated as errors from elsewhere are at ingress. An error
        // translated at ingress already quotes the client's view, which matches no entry.
        Parsed::Icmp(e) => return icmp_error(ctx, e, true).unwrap_or(P::UNTOUCHED),
        _ => return P::UNTOUCHED,
    };
    if !service::maybe_backend(&h.flow) {
        return P::UNTOUCHED;
    }
    let Some(r) = conntrack::reply(&h.flow, h.tcp_flags, P::HOOK) else {
        return P::UNTOUCHED;
    };
    let rewritten = restore(ctx, &h, &r);
    if rewritten.is_err() {
        return drop(ctx, Counter::DropRewrite);
    }
    count_translated(ctx, &h, Counter::ReplyTranslated);
    P::FORWARD
}

/// Rewrites a reply back to what the client expects.
#[inline(always)]
fn restore<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>, r: &conntrack::Reply<A>) -> Result<(), i64> {
    let dst = if r.dst { (r.dst_addr, r.dst_port) } else { (h.flow.dst, h.flow.dport) };
    nat::rewrite(ctx, h, (r.src_addr, r.src_port), dst)
}

/// A backend's reply left to the stack and the egress program (`maybe_reply_of`).
#[inline(always)]
fn pass_reply<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>) -> i32 {
    pass(ctx, if h.frag == Frag::Whole { Counter::PassNotService } else { Counter::PassFragment })
}

/// A packet not addressed to a service: a backend's reply needs its source (and, if the flow
/// was SNATed, its destination) restored.
#[inline(always)]
fn maybe_reply<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>) -> i32 {
    if A::FAMILY == lb_common::FAMILY_IPV4 || !crate::addr::OUTLINE_V6 {
        maybe_reply_of(ctx, h)
    } else {
        maybe_reply_outlined(ctx, h)
    }
}

/// As `forward_outlined`.
#[inline(never)]
fn maybe_reply_outlined<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>) -> i32 {
    maybe_reply_of(ctx, h)
}

#[inline(always)]
fn maybe_reply_of<A: Addr, P: Packet>(ctx: &P, h: &Headers<A>) -> i32 {
    if A::FAMILY == lb_common::FAMILY_IPV4 && !nat::to_snat_addr::<A, P>(ctx) {
        // (IPv6's: in `reply_stage`.) A reply to the client's own address (its flow was not
        // SNATed) goes on untranslated: the stack forwards it as the backend sent it, so the
        // node's netfilter sees the flow
        // as it saw the client's translated packets (client -> backend both ways, where
        // translating here made the SYN-ACK one it never saw the SYN of: INVALID, dropped by
        // Calico's policy chains and many firewalls), and the tc egress program of the
        // interface it leaves by restores the frontend (`host_reply_of`), as Cilium's
        // `to-container` and netfilter's own reverse NAT do after routing.
        return pass_reply(ctx, h);
    }
    let Some(r) = conntrack::reply(&h.flow, h.tcp_flags, P::HOOK) else {
        return pass(ctx, if h.frag == Frag::Whole { Counter::PassNotService } else { Counter::PassFragment });
    };
    if ctx.csum_unsure(h) {
        return ctx.defer();
    }
    // Not an `Option<Route>`: its `None` leaves the route's bytes undefined, and LLVM may
    // store them anyway where the two paths join, which the verifier refuses (a read of an
    // uninitialised register).
    let (routed, route) = if r.route {
        match ctx.route(r.src_addr, if r.dst { r.dst_addr } else { h.flow.dst }, h.flow.proto) {
            Ok(route) => {
                if let Err(verdict) = forwardable::<A, P>(ctx) {
                    return verdict;
                }
                (true, route)
            }
            // The reply of a flow SNATed to the node whose frontend is no node address is
            // routed here only to pass the node's netfilter by (`reply_route` in `new_flow`):
            // where the FIB lookup finds no way (a client that is an address of this node, a
            // route with encapsulation, a policy route) the stack may, so tc hands it on
            // translated. XDP leaves it to tc, as any packet it cannot route.
            Err(e) if P::HOOK == crate::ctx::HOOK_TC && e.mtu == 0 && !service::is_node_source(&r.src_addr) => {
                (false, Route::NONE)
            }
            Err(e) => return ctx.unroutable_for(h, e),
        }
    } else {
        (false, Route::NONE)
    };
    let rewritten = restore(ctx, h, &r);
    if rewritten.is_err() {
        return drop(ctx, Counter::DropRewrite);
    }
    count_translated(ctx, h, Counter::ReplyTranslated);
    if routed {
        nat::decrement_ttl::<A, P>(ctx);
        return ctx.send(&route);
    }
    P::FORWARD
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
