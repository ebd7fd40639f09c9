//! Word access to packet bytes, and the one atomic swap of a map word the datapath uses.
//!
//! Header fields sit at offsets LLVM cannot prove aligned (an IPv4 address 26 bytes into a
//! frame), and LLVM's BPF target assumes no unaligned access: `read_unaligned` of a `u32`
//! becomes four byte loads, three shifts and three ors, a store four byte stores. The kernel
//! itself has no such rule for packet data: the verifier checks packet pointer alignment only
//! under strict alignment (`check_pkt_ptr_alignment`, off on x86-64 and arm64, which have
//! efficient unaligned access), and even then counts the IP header as aligned (it adds a fixed
//! 2, the usual `NET_IP_ALIGN`, to the offset), and every field accessed here is at its natural
//! alignment from the IP header. The JITs emit one machine load or store for each.
//!
//! LLVM's `allows-misaligned-mem-access` feature would give the same code without this
//! module, but it applies to the stack too, where it merges stores into 8-byte stores at
//! 4-byte aligned slots, and the verifier always refuses misaligned stack access. So the
//! packet accesses alone are written as the single BPF instruction each is.
//!
//! The programs are built for little-endian BPF (`bpfel`): a word loaded from two 16-bit
//! fields holds the first in its low half.
//!
//! Every function takes an address the caller has bounds-checked against `data_end` (for the
//! access's full width), as the verifier requires of any packet access.

/// The `u16` at `p + OFF`, in memory order (network order for a header field). The offset is
/// the instruction's own, as LLVM would fold it into a plain load.
///
/// # Safety
/// `p + OFF` must point at 2 readable bytes of the packet.
#[inline(always)]
pub unsafe fn load16<const OFF: i16>(p: usize) -> u16 {
    let v: u32;
    // SAFETY: the caller's contract; one 2-byte load, zero-extended.
    unsafe {
        core::arch::asm!("{v} = *(u16 *)({p} + {off})", p = in(reg) p, off = const OFF, v = lateout(reg) v,
            options(readonly, nostack, preserves_flags));
    }
    v as u16
}

/// The `u32` at `p + OFF`, in memory order.
///
/// # Safety
/// `p + OFF` must point at 4 readable bytes of the packet.
#[inline(always)]
pub unsafe fn load32<const OFF: i16>(p: usize) -> u32 {
    let v: u32;
    // SAFETY: the caller's contract; one 4-byte load.
    unsafe {
        core::arch::asm!("{v} = *(u32 *)({p} + {off})", p = in(reg) p, off = const OFF, v = lateout(reg) v,
            options(readonly, nostack, preserves_flags));
    }
    v
}

/// Writes `v` (memory order) at `p + OFF`.
///
/// # Safety
/// `p + OFF` must point at 2 writable bytes of the packet.
#[inline(always)]
pub unsafe fn store16<const OFF: i16>(p: usize, v: u16) {
    // SAFETY: the caller's contract; one 2-byte store.
    unsafe {
        core::arch::asm!("*(u16 *)({p} + {off}) = {v}", p = in(reg) p, off = const OFF, v = in(reg) v as u32,
            options(nostack, preserves_flags));
    }
}

/// Writes `v` (memory order) at `p + OFF`.
///
/// # Safety
/// `p + OFF` must point at 4 writable bytes of the packet.
#[inline(always)]
pub unsafe fn store32<const OFF: i16>(p: usize, v: u32) {
    // SAFETY: the caller's contract; one 4-byte store.
    unsafe {
        core::arch::asm!("*(u32 *)({p} + {off}) = {v}", p = in(reg) p, off = const OFF, v = in(reg) v,
            options(nostack, preserves_flags));
    }
}

/// Swaps `*p` from `seen` to `new` if it still holds `seen`, atomically, and says whether it
/// did: BPF's `cmpxchg_64`, as inline asm since Rust's BPF target offers no
/// compare-and-exchange (its atomics are loads and stores). The verifier accepts it on a map
/// value, aligned.
///
/// # Safety
/// `p` must be an 8-byte aligned u64 of a map value.
#[inline(always)]
pub unsafe fn compare_exchange64(p: *mut u64, seen: u64, new: u64) -> bool {
    let mut r0 = seen;
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("r0 = cmpxchg_64({p} + 0, r0, {new})", p = in(reg) p, new = in(reg) new,
            inout("r0") r0, options(nostack, preserves_flags));
    }
    r0 == seen
}

/// `diff` with the difference (xor) of the `u32`s at `a + OFF` and `b + OFF` or-ed in: one
/// word of a comparison folded into a single test at its end. In assembly so that LLVM can
/// neither turn the fold back into a compare and a branch per word nor load every word first
/// and spill them (`ct_table.rs`, `key_eq`).
///
/// # Safety
/// `a + OFF` and `b + OFF` must point at 4 readable, 4-aligned bytes (of a map value or the
/// stack).
#[inline(always)]
pub unsafe fn diff32<const OFF: i16>(a: usize, b: usize, diff: u32) -> u32 {
    let mut d = diff;
    // SAFETY: the caller's contract; two loads and register arithmetic.
    unsafe {
        core::arch::asm!("{t} = *(u32 *)({a} + {off})", "{u} = *(u32 *)({b} + {off})", "{t} ^= {u}", "{d} |= {t}",
            a = in(reg) a, b = in(reg) b, off = const OFF, d = inout(reg) d, t = out(reg) _, u = out(reg) _,
            options(readonly, nostack, preserves_flags));
    }
    d
}

/// 1 if `v` (at most 0xffff) is not 0, else 0, computed without a jump: BPF has no
/// set-on-compare, so a compare becomes a branch, and the verifier walks everything after a
/// branch once for each way it went (`lb_tc_ingress` is near its 1,000,000 instructions). In
/// assembly so that LLVM cannot turn the arithmetic back into a compare.
#[inline(always)]
pub fn nonzero16(v: u16) -> u64 {
    let mut r = v as u64;
    // SAFETY: register arithmetic only.
    unsafe {
        core::arch::asm!("{r} += 65535", "{r} >>= 16", r = inout(reg) r, options(pure, nomem, nostack, preserves_flags));
    }
    r
}
