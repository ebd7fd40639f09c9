//! Kernel side of `lb`: Kubernetes Service translation at tc ingress.
//!
//! The entry point reads as the pipeline it is (Katran's `process_packet`, Cilium's
//! `lb4_local`): parse -> service lookup -> conntrack -> backend selection for new flows ->
//! NAT; and for packets that are not to a service, conntrack -> reverse NAT of replies.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod service;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{Counter, ServiceValue, SVC_FLAG_LOCAL_ONLY};

use crate::{
    conntrack::{Forward, Translation},
    nat::{Side, Snat},
    parse::{Headers, Parsed},
    stats::count,
};

/// "No opinion": lets later programs in a TCX chain (or the default action) decide. Used for
/// every packet we leave alone, so we compose with other tc users.
const TC_ACT_UNSPEC: i32 = -1;

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let h = match parse::parse(ctx.data(), ctx.data_end()) {
        Parsed::L4(h) => h,
        Parsed::NotIp => return pass(Counter::PassNotIp),
        Parsed::Malformed => return pass(Counter::PassMalformed),
        Parsed::Fragment => return pass(Counter::PassFragment),
        Parsed::OtherProto => return pass(Counter::PassOtherProto),
    };
    match service::lookup(&h.flow) {
        Some(svc) => to_service(&ctx, &h, &svc),
        None => maybe_reply(&ctx, &h),
    }
}

#[inline(always)]
fn pass(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_UNSPEC
}

/// A packet addressed to a service frontend.
#[inline(always)]
fn to_service(ctx: &TcContext, h: &Headers, svc: &ServiceValue) -> i32 {
    if !service::source_allowed(svc, &h.flow) {
        count(Counter::DropSourceRange);
        return TC_ACT_SHOT as i32;
    }
    let now = conntrack::now();
    let (t, counter) = match conntrack::forward(&h.flow, h.tcp_flags, now) {
        Forward::Tracked(t) => (t, Counter::FwdTracked),
        Forward::New => match new_flow(ctx, h, svc, now) {
            Ok(t) => (t, Counter::FwdNewFlow),
            Err(verdict) => return verdict,
        },
    };
    let rewritten = nat::rewrite(ctx, h, Side::Dst, t.backend_addr, t.backend_port).and_then(|()| match t.snat {
        Some((addr, port)) => nat::rewrite(ctx, h, Side::Src, addr, port),
        None => Ok(()),
    });
    if rewritten.is_err() {
        count(Counter::DropRewrite);
        return TC_ACT_SHOT as i32;
    }
    count(counter);
    TC_ACT_OK as i32
}

/// Chooses and records the translation of a new flow; `Err` carries the verdict for a flow
/// that must not be forwarded.
#[inline(always)]
fn new_flow(ctx: &TcContext, h: &Headers, svc: &ServiceValue, now: u64) -> Result<Translation, i32> {
    if svc.backend_count == 0 {
        if svc.flags & SVC_FLAG_LOCAL_ONLY != 0 {
            // kube-proxy drops rather than rejects when a Local policy has no local endpoint,
            // so that a load balancer health-checking nodes moves traffic elsewhere.
            count(Counter::DropNoLocalBackend);
            return Err(TC_ACT_SHOT as i32);
        }
        count(Counter::RejectNoBackend);
        return Err(reject::port_unreachable(ctx, h));
    }
    let Some(backend) = select::select(svc, &h.flow, now) else {
        count(Counter::DropSlotMissing);
        return Err(TC_ACT_SHOT as i32);
    };
    let snat = match nat::snat_for(svc, &backend, &h.flow, now) {
        Snat::No => None,
        Snat::To(addr, port) => {
            count(Counter::FwdSnat);
            Some((addr, port))
        }
        Snat::Exhausted => {
            count(Counter::DropSnatPorts);
            return Err(TC_ACT_SHOT as i32);
        }
    };
    let t = Translation { backend_addr: backend.addr[0], backend_port: backend.port, snat };
    if conntrack::create(&h.flow, h.tcp_flags, &t, svc.id, now).is_err() {
        count(Counter::DropCtInsert);
        return Err(TC_ACT_SHOT as i32);
    }
    Ok(t)
}

/// A packet not addressed to a service: a backend's reply needs its source (and, if the flow
/// was SNATed, its destination) restored.
#[inline(always)]
fn maybe_reply(ctx: &TcContext, h: &Headers) -> i32 {
    let Some(r) = conntrack::reply(&h.flow, h.tcp_flags) else {
        return pass(Counter::PassNotService);
    };
    let rewritten = nat::rewrite(ctx, h, Side::Src, r.src.0, r.src.1).and_then(|()| match r.dst {
        Some((addr, port)) => nat::rewrite(ctx, h, Side::Dst, addr, port),
        None => Ok(()),
    });
    if rewritten.is_err() {
        count(Counter::DropRewrite);
        return TC_ACT_SHOT as i32;
    }
    count(Counter::ReplyTranslated);
    TC_ACT_OK as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
