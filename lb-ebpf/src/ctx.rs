//! What differs between the hooks the pipeline runs at.
//!
//! tc sees skbs: the L4 checksum goes through `bpf_l4_csum_replace` (right for
//! CHECKSUM_PARTIAL packets from local senders), and a refusal is built in place. XDP sees raw
//! frames from a wire, whose checksums are complete, so it patches them by hand; it leaves
//! refusals to the tc program behind it on the same interface, which builds the ICMP error
//! with skb helpers XDP does not have.
use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
};
use lb_common::Counter;

use crate::{
    nat::{csum_replace2, csum_replace4},
    parse::{ptr_at, Headers},
    reject,
    stats::count,
};

/// Stats are kept per hook: index `HOOK * COUNTER_MAX + counter`.
pub const HOOK_TC: u32 = 0;
pub const HOOK_XDP: u32 = 1;

pub trait Packet {
    const HOOK: u32;
    /// Verdict for a packet we leave alone.
    const UNTOUCHED: i32;
    /// Verdict for a packet we translated: on to the stack.
    const FORWARD: i32;
    const DROP: i32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;

    /// Updates the L4 checksum at `off` for an address change (part of the pseudo-header)
    /// and a port change. `udp`: a zero checksum means "none" and stays zero.
    fn l4_csum(&self, off: usize, addr: (u32, u32), port: (u16, u16), udp: bool) -> Result<(), i64>;

    /// Refuses a new connection to a frontend without backends; returns the verdict.
    fn refuse(&self, h: &Headers) -> i32;

    #[inline(always)]
    fn count(&self, c: Counter) {
        count(Self::HOOK, c);
    }
}

impl Packet for TcContext {
    const HOOK: u32 = HOOK_TC;
    /// TC_ACT_UNSPEC: "no opinion", so later programs in a TCX chain still run.
    const UNTOUCHED: i32 = -1;
    const FORWARD: i32 = TC_ACT_OK as i32;
    const DROP: i32 = TC_ACT_SHOT as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn l4_csum(&self, off: usize, addr: (u32, u32), port: (u16, u16), udp: bool) -> Result<(), i64> {
        let mangled0 = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        self.l4_csum_replace(off, addr.0 as u64, addr.1 as u64, BPF_F_PSEUDO_HDR as u64 | mangled0 | 4)?;
        if port.0 != port.1 {
            self.l4_csum_replace(off, port.0 as u64, port.1 as u64, mangled0 | 2)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn refuse(&self, h: &Headers) -> i32 {
        self.count(Counter::RejectNoBackend);
        reject::port_unreachable(self, h)
    }
}

impl Packet for XdpContext {
    const HOOK: u32 = HOOK_XDP;
    const UNTOUCHED: i32 = xdp_action::XDP_PASS as i32;
    const FORWARD: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn l4_csum(&self, off: usize, addr: (u32, u32), port: (u16, u16), udp: bool) -> Result<(), i64> {
        let field = ptr_at::<u16>(self.data(), self.data_end(), off).ok_or(-1i64)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let old = field.read_unaligned();
            if udp && old == 0 {
                return Ok(());
            }
            let mut c = csum_replace4(old, addr.0, addr.1);
            c = csum_replace2(c, port.0, port.1);
            if udp && c == 0 {
                // RFC 768: a computed zero is sent as all ones.
                c = 0xffff;
            }
            field.write_unaligned(c);
        }
        Ok(())
    }

    #[inline(always)]
    fn refuse(&self, _h: &Headers) -> i32 {
        // The tc program on this interface sees the untouched packet next and refuses it.
        Self::UNTOUCHED
    }
}
