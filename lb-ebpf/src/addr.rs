//! The two address families, as one trait the pipeline is generic over: every stage is
//! written once and compiled for IPv4 (`u32`) and IPv6 (`[u32; 4]`), each address kept as it
//! sits in the packet (network order words). What differs between the families beyond the
//! address width lives here: the conntrack tables, the node's own addresses, the IP header's
//! layout, and how an address enters a hash or a map key.
use aya_ebpf::maps::{Array, HashMap};
use lb_common::{fold_v6, CtKey, CtValue, FAMILY_IPV4, FAMILY_IPV6};

use crate::maps::{Scratch, LB_CT4, LB_CT4_CACHE, LB_CT4_NEW, LB_CT6, LB_CT6_NEW, LB_SCRATCH6};

/// The node's address (network order) that external flows to remote backends are SNATed to,
/// so the backend's node sends replies back through us. Set by the agent at load time; zero
/// means unknown, and such flows then keep the client's address.
#[no_mangle]
static NODE_IP: u32 = 0;
/// The node's IPv6 address, as `NODE_IP`; all zero means unknown.
#[no_mangle]
static NODE_IP6: [u32; 4] = [0; 4];
/// Source given to hairpin flows (a pod reaching itself through a Service): the pod must see
/// another address than its own, or its reply never leaves it. 169.254.42.1, as Cilium uses.
#[no_mangle]
static HAIRPIN_IP: u32 = u32::from_ne_bytes([169, 254, 42, 1]);
/// The IPv6 hairpin source: fd00:6c62::1 (`lb` in a ULA prefix). Not link-local: the pod's
/// reply must leave through its default route, to the node, as an IPv4 hairpin reply does
/// towards 169.254.42.1.
#[no_mangle]
static HAIRPIN_IP6: [u32; 4] = [u32::from_ne_bytes([0xfd, 0x00, 0x6c, 0x62]), 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Whether IPv6 stages run as subprograms. Off: the IPv6 pipeline is cut into tail-called
/// programs instead (main.rs), each inlined whole, since a chain of subprogram frames must fit
/// the 512-byte stack together.
pub const OUTLINE_V6: bool = false;
/// The conntrack table moves (state changes) do run as subprograms for IPv6, with their key
/// and value copies (92 bytes a pair) in `maps::LB_SCRATCH6`: they would not fit beside the
/// rest of a stage.
pub const OUTLINE_V6_CT: bool = true;

pub type Ct<A> = HashMap<CtKey<A>, CtValue<A>>;
/// A new-flow table: an array of ways (`ct_table.rs`).
pub type CtWays<A> = aya_ebpf::maps::Array<lb_common::CtWay<A>>;
/// The cache of established flows (IPv4 only, `ct_cache.rs`).
pub type CtCache = aya_ebpf::maps::Array<lb_common::CtCacheSlot4>;

pub trait Addr: Copy + Default + PartialEq + 'static {
    const FAMILY: u8;
    /// `AF_INET` / `AF_INET6`, for the FIB lookup.
    const AF: u8;
    /// Length of the fixed IP header.
    const IP_LEN: usize;
    /// Length of an address.
    const ADDR_LEN: usize;
    /// Offsets of the source and destination address in the IP header.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// Offset of the TTL / hop limit in the IP header.
    const TTL_OFF: usize;

    /// The address as map keys hold it (`[u32; 4]`, IPv4 in the first word).
    fn words(self) -> [u32; 4];
    fn from_words(w: [u32; 4]) -> Self;
    /// 32 bits of the address for hashes (the pre-filter, the flow hash).
    fn fold(self) -> u32;
    /// What replacing `old` by `new` adds to a checksum covering the address, as a 32-bit
    /// ones' complement partial sum.
    fn csum_diff(old: Self, new: Self) -> u32;
    fn is_zero(self) -> bool;
    /// The address read from an IP header in the packet at `p`, a word at a time (`mem.rs`).
    ///
    /// # Safety
    /// `p` must point at `size_of::<Self>()` readable bytes of the packet, bounds-checked: the
    /// word loads are packet accesses, which may be unaligned (stack accesses may not).
    unsafe fn read(p: *const u8) -> Self;
    /// # Safety
    /// `p` must point at `size_of::<Self>()` writable bytes of the packet, as for `read`.
    unsafe fn write(self, p: *mut u8);

    fn ct() -> &'static Ct<Self>;
    /// The new-flow table.
    fn ct_ways() -> Option<&'static CtWays<Self>>;
    /// The cache of established flows in front of the assured table (`ct_cache.rs`); IPv4's
    /// only.
    fn ct_cache() -> Option<&'static CtCache>;
    fn node_ip() -> Self;
    fn hairpin_ip() -> Self;
    /// This CPU's scratch slot (`maps::LB_SCRATCH6`) for IPv6's temporaries (IPv4's fit its
    /// stack; IPv4's pipeline reaches the slot as IPv6's, `<[u32; 4] as Addr>::scratch`, only
    /// to hand a frontend to its new-flow stage). Null for IPv4, and never for IPv6 (a per-CPU
    /// array's slot 0 exists), but the verifier wants the check. A raw pointer: its users
    /// borrow one field each, never the whole slot, so that two of them may hold different
    /// fields at once.
    fn scratch() -> *mut Scratch<Self>;
}

/// Ones' complement addition of 32-bit partial sums (the kernel's `csum_add`).
#[inline(always)]
pub fn wsum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

impl Addr for u32 {
    const FAMILY: u8 = FAMILY_IPV4;
    const AF: u8 = 2;
    const IP_LEN: usize = 20;
    const ADDR_LEN: usize = 4;
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;
    const TTL_OFF: usize = 8;

    #[inline(always)]
    fn words(self) -> [u32; 4] {
        [self, 0, 0, 0]
    }
    #[inline(always)]
    fn from_words(w: [u32; 4]) -> Self {
        w[0]
    }
    #[inline(always)]
    fn fold(self) -> u32 {
        self
    }
    #[inline(always)]
    fn csum_diff(old: Self, new: Self) -> u32 {
        wsum_add(!old, new)
    }
    #[inline(always)]
    fn is_zero(self) -> bool {
        self == 0
    }
    #[inline(always)]
    unsafe fn read(p: *const u8) -> Self {
        // SAFETY: the caller's contract.
        unsafe { crate::mem::load32::<0>(p as usize) }
    }
    #[inline(always)]
    unsafe fn write(self, p: *mut u8) {
        // SAFETY: the caller's contract.
        unsafe { crate::mem::store32::<0>(p as usize, self) }
    }
    #[inline(always)]
    fn ct() -> &'static Ct<Self> {
        &LB_CT4
    }
    #[inline(always)]
    fn ct_ways() -> Option<&'static CtWays<Self>> {
        Some(&LB_CT4_NEW)
    }
    #[inline(always)]
    fn ct_cache() -> Option<&'static CtCache> {
        Some(&LB_CT4_CACHE)
    }
    #[inline(always)]
    fn node_ip() -> Self {
        // SAFETY: reading a static; volatile so the compiler keeps the load the loader patches.
        unsafe { core::ptr::read_volatile(&NODE_IP) }
    }
    #[inline(always)]
    fn hairpin_ip() -> Self {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&HAIRPIN_IP) }
    }
    #[inline(always)]
    fn scratch() -> *mut Scratch<Self> {
        core::ptr::null_mut()
    }
}

impl Addr for [u32; 4] {
    const FAMILY: u8 = FAMILY_IPV6;
    const AF: u8 = 10;
    const IP_LEN: usize = 40;
    const ADDR_LEN: usize = 16;
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;
    const TTL_OFF: usize = 7;

    #[inline(always)]
    fn words(self) -> [u32; 4] {
        self
    }
    #[inline(always)]
    fn from_words(w: [u32; 4]) -> Self {
        w
    }
    #[inline(always)]
    fn fold(self) -> u32 {
        fold_v6(self)
    }
    #[inline(always)]
    fn csum_diff(old: Self, new: Self) -> u32 {
        let mut s = 0;
        let mut i = 0;
        while i < 4 {
            s = wsum_add(s, wsum_add(!old[i], new[i]));
            i += 1;
        }
        s
    }
    #[inline(always)]
    fn is_zero(self) -> bool {
        self[0] | self[1] | self[2] | self[3] == 0
    }
    #[inline(always)]
    unsafe fn read(p: *const u8) -> Self {
        let p = p as usize;
        // SAFETY: the caller's contract: 16 readable bytes.
        unsafe {
            [
                crate::mem::load32::<0>(p),
                crate::mem::load32::<4>(p),
                crate::mem::load32::<8>(p),
                crate::mem::load32::<12>(p),
            ]
        }
    }
    #[inline(always)]
    unsafe fn write(self, p: *mut u8) {
        let p = p as usize;
        // SAFETY: the caller's contract: 16 writable bytes.
        unsafe {
            crate::mem::store32::<0>(p, self[0]);
            crate::mem::store32::<4>(p, self[1]);
            crate::mem::store32::<8>(p, self[2]);
            crate::mem::store32::<12>(p, self[3]);
        }
    }
    #[inline(always)]
    fn ct() -> &'static Ct<Self> {
        &LB_CT6
    }
    #[inline(always)]
    fn ct_ways() -> Option<&'static CtWays<Self>> {
        Some(&LB_CT6_NEW)
    }
    #[inline(always)]
    fn ct_cache() -> Option<&'static CtCache> {
        None
    }
    #[inline(always)]
    fn node_ip() -> Self {
        // SAFETY: as for IPv4.
        unsafe { core::ptr::read_volatile(&NODE_IP6) }
    }
    #[inline(always)]
    fn hairpin_ip() -> Self {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&HAIRPIN_IP6) }
    }
    #[inline(always)]
    fn scratch() -> *mut Scratch<Self> {
        LB_SCRATCH6.get_ptr_mut(0).unwrap_or(core::ptr::null_mut())
    }
}
