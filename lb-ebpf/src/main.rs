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
use lb_common::Counter;

use crate::{
    conntrack::Forward,
    nat::Side,
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
fn to_service(ctx: &TcContext, h: &Headers, svc: &lb_common::ServiceValue) -> i32 {
    let now = conntrack::now();
    let (addr, port, counter) = match conntrack::forward(&h.flow, h.tcp_flags, now) {
        Forward::Tracked { addr, port } => (addr, port, Counter::FwdTracked),
        Forward::New => {
            if svc.backend_count == 0 {
                count(Counter::RejectNoBackend);
                return reject::port_unreachable(ctx, h);
            }
            let Some(backend) = select::select(svc, &h.flow, now) else {
                count(Counter::DropSlotMissing);
                return TC_ACT_SHOT as i32;
            };
            if conntrack::create(&h.flow, h.tcp_flags, &backend, svc.id, now).is_err() {
                count(Counter::DropCtInsert);
                return TC_ACT_SHOT as i32;
            }
            (backend.addr[0], backend.port, Counter::FwdNewFlow)
        }
    };
    if nat::rewrite(ctx, h, Side::Dst, addr, port).is_err() {
        count(Counter::DropRewrite);
        return TC_ACT_SHOT as i32;
    }
    count(counter);
    TC_ACT_OK as i32
}

/// A packet not addressed to a service: a backend's reply needs its source restored.
#[inline(always)]
fn maybe_reply(ctx: &TcContext, h: &Headers) -> i32 {
    let Some((addr, port)) = conntrack::reply(&h.flow, h.tcp_flags) else {
        return pass(Counter::PassNotService);
    };
    if nat::rewrite(ctx, h, Side::Src, addr, port).is_err() {
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
