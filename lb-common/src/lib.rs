//! Map keys and values shared by the kernel programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte, and the
//! padding is always written as zero: hash maps compare keys as raw bytes. Addresses are stored in
//! 16 bytes with a family tag, so IPv6 can be added without changing the IPv4 layout; an IPv4
//! address lives in `addr[0]` (network byte order) with the other words zero.
#![cfg_attr(not(any(test, feature = "user")), no_std)]

/// Address family tags, stored in keys and values next to the 16-byte address.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers we translate.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// How a service entry is looked up. Frontends with their own address (ClusterIP,
/// LoadBalancer ingress IPs, external IPs) are found by exact address; node ports are keyed on
/// address 0 and only looked up for packets addressed to one of the node's own addresses.
pub const SCOPE_EXACT: u8 = 0;
pub const SCOPE_NODEPORT: u8 = 1;
/// Or'ed into the scope of the entry that traffic from the cluster itself (pods, the node)
/// gets at an external frontend of an `externalTrafficPolicy: Local` Service: kube-proxy's
/// short-circuit to cluster-wide endpoints (only traffic from outside is kept local).
pub const SCOPE_FROM_CLUSTER: u8 = 0x80;

/// Largest backend set a single service port may have (kube-proxy's endpoint cut, applied by
/// the translation); its Maglev table then has 65,537 slots.
pub const MAX_BACKENDS_PER_SERVICE: u16 = 4096;

/// Default map capacities (entries). The agent may override them at load time.
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
/// Distinct backends (address, port) over all frontends: `LB_BACKENDS` is an array.
pub const BACKENDS_MAX_ENTRIES: u32 = 262_144;
/// Maglev table slots over all frontends (about 16 per backend of each frontend).
pub const MAGLEV_MAX_ENTRIES: u32 = 4_194_304;
/// Backend memberships (service, backend) over all frontends.
pub const BACKEND_MEMBERS_MAX_ENTRIES: u32 = 1_048_576;
/// Assured flows (two entries each); the table of new and finished flows has its own size.
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
/// Entries of the new-flow tables (sets of `CT_WAYS`, `CtWay`).
pub const CONNTRACK_NEW_MAX_ENTRIES: u32 = 131_072;
pub const SERVICE_NAMES_MAX_ENTRIES: u32 = 262_144;
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;

/// Names of the maps, as declared in `lb-ebpf` and pinned under the agent's pin directory.
pub const MAP_SERVICES: &str = "LB_SERVICES";
/// Backend id -> backend: what a Maglev table slot names.
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
/// Every frontend's Maglev table, one after another: slot -> backend id.
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
/// Assured IPv4 flows: a preallocated hash that never evicts.
pub const MAP_CT4: &str = "LB_CT4";
/// New and finished IPv4 flows: a set-associative array of `CtWay4` (`ct_set_hash`).
pub const MAP_CT4_NEW: &str = "LB_CT4_NEW";
/// Copies of established IPv4 flows' assured entries, read first: a two-way array of
/// `CtCacheSlot4` (`ct_cache_pair`), half as many slots as `LB_CT4` has entries. Not pinned.
pub const MAP_CT4_CACHE: &str = "LB_CT4_CACHE";
/// Which forward keys may have an entry in `LB_CT4` or `LB_CT6` (one map for both families,
/// IPv6's addresses folded as for `ct_set_hash`; sized for `LB_CT4`, so a dual-stack node's
/// flows of both share its words, and with both tables full a key that is not there counts
/// about once in 11, not once in 80): after an 8-byte generation word,
/// words of stamps, a key's stamp two bits in each of two words (`ct_live_place`) in each of
/// three generations (the generation word names the one stamps go into). Read by a SYN, which
/// then skips the assured table's lookup unless each of its words holds its two bits of some
/// generation (`ct_live_counts`). Not pinned: the agent's first two passes stamp every live
/// flow into a new one, and each collection again.
pub const MAP_CT4_LIVE: &str = "LB_CT4_LIVE";
/// Entries of `LB_CT4` per word of `LB_CT4_LIVE`: at most half of them are forward keys, each
/// stamped into two words, so a full table puts four stamps in a word on average, and a key
/// that is not there finds its bits of a generation set in both its words about once in 80
/// (`ct_live_place`). 512 KiB at the default sizes, which the caches keep beside the new-flow
/// table a SYN reads too (a byte per key's slot made it 2 MiB, and a SYN paid a miss there).
pub const CT_LIVE_ENTRIES_PER_WORD: u32 = 4;
/// Generations of stamps in `LB_CT4_LIVE`, one bit each at every position of a word: a stamp
/// counts until its generation comes round again, two of the agent's passes later, so a flow
/// one walk of the assured table misses (the kernel's hash iteration can, under concurrent
/// deletes) keeps counting until the next walk finds it.
pub const CT_LIVE_GENERATIONS: u64 = 3;

/// Words of stamps in `LB_CT4_LIVE` (after its generation word) for an assured table of `entries`.
pub const fn ct_live_words(entries: u32) -> u32 {
    let w = entries.div_ceil(CT_LIVE_ENTRIES_PER_WORD);
    if w == 0 {
        1
    } else {
        w
    }
}
/// The same for IPv6 flows (same capacities).
pub const MAP_CT6: &str = "LB_CT6";
pub const MAP_CT6_NEW: &str = "LB_CT6_NEW";
/// The conntrack map of layout version 4 and before (both directions, 16-byte addresses):
/// migrated into `LB_CT4`/`LB_CT4_NEW` and removed.
pub const MAP_CONNTRACK_V4: &str = "LB_CONNTRACK";
pub const MAP_STATS: &str = "LB_STATS";
pub const MAP_SERVICE_STATS: &str = "LB_SERVICE_STATS";
pub const MAP_SERVICE_NAMES: &str = "LB_SERVICE_NAMES";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
pub const MAP_BACKEND_MEMBERS: &str = "LB_BACKEND_MEMBERS";
pub const MAP_NODE_ADDRS: &str = "LB_NODE_ADDRS";
/// The frontend maps' generation (`LB_SERVICES`, `LB_NODE_ADDRS`): one `u32` the agent moves
/// on after each change to either, so that the datapath's per-CPU copy of the frontend it
/// last found (`lb-ebpf/src/service.rs`, `lookup_cached`) is taken only while nothing changed.
pub const MAP_SERVICES_GEN: &str = "LB_SERVICES_GEN";

/// The pre-filter ahead of every hash lookup: two bitmaps of `FILTER_BITS` bits each, in one
/// array of u64 words. A frontend (address, port, protocol) sets its bit in the first, a
/// backend (address, port, protocol) its bit in the second; a packet whose destination has no
/// frontend bit and whose source has no backend bit is none of ours, and costs two array
/// loads (which the verifier inlines), however many Services exist. A set bit may be another
/// key's (a false positive only costs the lookups it would have cost anyway).
pub const MAP_FILTER: &str = "LB_FILTER";
pub const FILTER_BITS_LOG2: u32 = 21;
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);
/// Word offset of the frontend bitmap and of the backend bitmap.
pub const FILTER_FRONTENDS: u32 = 0;
pub const FILTER_BACKENDS: u32 = FILTER_WORDS;

/// An IPv6 address folded to 32 bits for `filter_bit` (as in the packet).
#[inline(always)]
pub fn fold_v6(a: [u32; 4]) -> u32 {
    a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24)
}

/// The filter bit of an (address, port, protocol), all as in the packet (network order). An
/// IPv6 address is folded into `addr` first (`fold_v6`). Every packet pays for this bit, and
/// non-service traffic for little else: one 64-bit multiply of the three packed into one word,
/// whose top bits depend on every bit below them (multiplicative hashing), where a 32-bit mix of
/// three chained multiplies measured 2 ns more per pass-through packet at both hooks (layout 9).
/// A false hit only costs the lookups the bit guards, so what matters is spread: 10,000
/// ClusterIPs in a row on one port take 10,000 bits, and unrelated traffic lands on a set bit
/// about as often as the bitmap's fill (`filter_bit_spreads_service_sets_and_misses_other_traffic`).
#[inline(always)]
pub fn filter_bit(addr: u32, port: u16, proto: u8) -> u32 {
    let k = (addr as u64) << 32 | (port as u64) << 8 | proto as u64;
    (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILTER_BITS_LOG2)) as u32
}

pub const MAP_SOURCE_RANGES: &str = "LB_SOURCE_RANGES";

pub const NODE_ADDRS_MAX_ENTRIES: u32 = 1024;
/// Sources that count as the cluster's own for the short-circuit (`SCOPE_FROM_CLUSTER`): the
/// cluster's pod CIDRs (`--cluster-cidr`), this node's pod CIDRs, its addresses.
pub const MAP_LOCAL_SOURCES: &str = "LB_LOCAL_SOURCES";
pub const LOCAL_SOURCES_MAX_ENTRIES: u32 = 1024;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;

/// Source ports the datapath picks when it must SNAT a flow to the node's address: above
/// Linux's default `ip_local_port_range` (32768-60999), so they never collide with the node's
/// own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// SNAT ports being handed out at this instant: a port a CPU picked as free is claimed here,
/// with a compare-and-exchange, before its flow's entries are written, so that two CPUs
/// creating flows to one backend at once cannot both take it (the probe that found it free
/// and the insert that makes it taken are not one step). A slot holds the claiming flow's tag
/// (high half) and the jiffy of the claim (low half); a claim is good for
/// `SNAT_CLAIM_JIFFIES`, by when the flow's reply entry holds the port. Slots are shared by
/// hash: a clash costs the later flow one more probe, never a port.
pub const MAP_SNAT_CLAIMS: &str = "LB_SNAT_CLAIMS";
pub const SNAT_CLAIM_SLOTS: u32 = 8192;
pub const SNAT_CLAIM_JIFFIES: u32 = 2;

/// The slot of `MAP_SNAT_CLAIMS` for SNAT port `port` (network order) from the node address
/// `addr` (folded) to `backend:backend_port` (`backend` folded, port in network order). The
/// SNAT range is smaller than the slots, so one backend's ports never share a slot.
#[inline(always)]
pub fn snat_claim_slot(addr: u32, backend: u32, backend_port: u16, port: u16, proto: u8) -> u32 {
    let base = (addr ^ backend).wrapping_add((backend_port as u32) << 8 | proto as u32).wrapping_mul(0x9e37_79b1);
    ((base >> 19).wrapping_add(u16::from_be(port) as u32)) % SNAT_CLAIM_SLOTS
}

/// Whether a claim made at jiffy `stamp` still holds at `now`: up to `SNAT_CLAIM_JIFFIES`
/// old, or as far ahead (another CPU read the clock a little later than this one).
#[inline(always)]
pub fn snat_claim_fresh(stamp: u32, now: u32) -> bool {
    let age = now.wrapping_sub(stamp);
    age <= SNAT_CLAIM_JIFFIES || age >= SNAT_CLAIM_JIFFIES.wrapping_neg()
}

/// Names of the programs in the object file.
pub const PROG_TC_INGRESS: &str = "lb_tc_ingress";
/// tc egress, beside every tc ingress: replies of host-network endpoints on this node.
pub const PROG_TC_EGRESS: &str = "lb_tc_egress";
pub const PROG_XDP: &str = "lb_xdp";
/// Empty programs, the floor `lb-bench` measures against.
pub const PROG_BENCH_EMPTY_XDP: &str = "lb_bench_empty_xdp";
pub const PROG_BENCH_EMPTY_TC: &str = "lb_bench_empty_tc";
/// Socket-level programs for the node's own processes: (program, cgroup attach point).
/// The IPv6 programs, reached by tail calls from the tc ones through `MAP_TAILS_TC` at these
/// indices.
pub const PROG_TC_INGRESS6: &str = "lb_tc_ingress6";
pub const PROG_TC_EGRESS6: &str = "lb_tc_egress6";
/// The IPv6 new-flow and ICMP-error stages, tail-called by the IPv6 programs.
pub const PROG_TC_NEW6: &str = "lb_tc_new6";
pub const PROG_TC_ICMP6: &str = "lb_tc_icmp6";
pub const PROG_TC_FWD6: &str = "lb_tc_fwd6";
pub const PROG_TC_REPLY6: &str = "lb_tc_reply6";

pub const MAP_TAILS_TC: &str = "LB_TAILS_TC";
pub const TAIL_TC_INGRESS6: u32 = 0;
pub const TAIL_TC_EGRESS6: u32 = 1;
pub const TAIL_TC_NEW6: u32 = 2;
pub const TAIL_TC_ICMP6: u32 = 3;
pub const TAIL_TC_FWD6: u32 = 4;
pub const TAIL_TC_REPLY6: u32 = 5;
/// tc egress for devices without a link-layer header (tun, WireGuard, IP tunnels), which see
/// packets start with their IP header, with its IPv6 program and ICMPv6 stage in
/// `MAP_TAILS_TC` (a program array serves one program type, and these are tc programs).
pub const PROG_TC_EGRESS_L3: &str = "lb_tc_egress_l3";
pub const PROG_TC_EGRESS6_L3: &str = "lb_tc_egress6_l3";
pub const PROG_TC_ICMP6_L3: &str = "lb_tc_icmp6_l3";
pub const TAIL_TC_EGRESS6_L3: u32 = 6;
pub const TAIL_TC_ICMP6_L3: u32 = 7;
/// Slots of `MAP_TAILS_TC`.
pub const TAILS_TC: u32 = 8;
/// The XDP program's IPv6 stages, through `MAP_TAILS_XDP` (a program array serves one
/// program type, so XDP has its own).
pub const PROG_XDP6: &str = "lb_xdp6";
pub const PROG_XDP_NEW6: &str = "lb_xdp_new6";
pub const PROG_XDP_ICMP6: &str = "lb_xdp_icmp6";
pub const PROG_XDP_FWD6: &str = "lb_xdp_fwd6";
pub const PROG_XDP_REPLY6: &str = "lb_xdp_reply6";
pub const MAP_TAILS_XDP: &str = "LB_TAILS_XDP";
/// IPv4's new-flow stage at each hook, tail-called by the IPv4 programs through a one-slot
/// program array of its own: the IPv6 arrays above stay empty when IPv6 is off, this one is
/// always filled. Each agent load pins all four arrays under names of its own (`<name>-<ns>`).
pub const PROG_TC_NEW4: &str = "lb_tc_new4";
pub const PROG_XDP_NEW4: &str = "lb_xdp_new4";
pub const MAP_TAILS4_TC: &str = "LB_TAILS4_TC";
pub const MAP_TAILS4_XDP: &str = "LB_TAILS4_XDP";
/// Slots of `MAP_TAILS4_TC`: the new-flow stage (0), and `PROG_TC_INGRESS` itself (1), which
/// `PROG_TC_INGRESS_L3` hands a tunnel's packets to once it has given them an Ethernet header.
pub const TAIL4_TC_NEW4: u32 = 0;
pub const TAIL4_TC_INGRESS: u32 = 1;
pub const TAILS4_TC: u32 = 2;
/// tc ingress for devices without a link-layer header (tun, WireGuard, IP tunnels).
pub const PROG_TC_INGRESS_L3: &str = "lb_tc_ingress_l3";
pub const TAIL_XDP6: u32 = 0;
pub const TAIL_XDP_NEW6: u32 = 1;
pub const TAIL_XDP_ICMP6: u32 = 2;
pub const TAIL_XDP_FWD6: u32 = 3;
pub const TAIL_XDP_REPLY6: u32 = 4;

pub const PROGS_SOCK: [&str; 8] = [
    "lb_sock_connect4",
    "lb_sock_sendmsg4",
    "lb_sock_recvmsg4",
    "lb_sock_getpeername4",
    "lb_sock_connect6",
    "lb_sock_sendmsg6",
    "lb_sock_recvmsg6",
    "lb_sock_getpeername6",
];
pub const MAP_SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
pub const SOCK_REVNAT_MAX_ENTRIES: u32 = 65_536;
/// Interfaces (ifindex) whose driver transmits native XDP frames (`XDP_TX`, or the target of a
/// redirect): the agent reads the kernel's `xdp-features` (`ndo-xmit`) for each. The XDP program
/// leaves a packet it would send elsewhere to tc.
pub const MAP_XDP_TARGETS: &str = "LB_XDP_TARGETS";
pub const XDP_TARGETS_MAX_ENTRIES: u32 = 4096;
/// IP fragments in flight: (source, destination, protocol, IP id) -> the ports of the
/// datagram's first fragment, so later fragments follow its translation.
pub const MAP_FRAGMENTS: &str = "LB_FRAGMENTS";
pub const FRAGMENTS_MAX_ENTRIES: u32 = 16_384;

/// Version of the map layout. Bumped whenever a key or value changes shape, so an agent can
/// tell that the pinned maps were made by an incompatible build.
/// 8: `LB_CT4_NEW`'s sets are chosen by the flow's client side (`ct_set_hash`); an agent
/// finding a table of an earlier version moves its flows into the sets they now belong to.
/// 9: the pre-filter's hash (`filter_bit`) changed: `LB_FILTER` is rebuilt with the other
/// service maps, as on every version change, before the new programs take the links.
/// 10: IPv6's new-flow table (`LB_CT6_NEW`) is an array of ways as IPv4's, no longer an LRU
/// hash: a pinned LRU moves into it with its flows.
pub const MAP_LAYOUT_VERSION: u32 = 10;

/// A service frontend: the address, port and protocol clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub scope: u8,
    pub _pad: [u8; 3],
}

/// `ServiceValue::flags`: `sessionAffinity: ClientIP`.
pub const SVC_FLAG_AFFINITY: u32 = 1 << 0;
/// Reached from outside the cluster network (node port, LoadBalancer IP, external IP): a flow
/// to a backend on another node is SNATed to the node's address, so replies come back here.
pub const SVC_FLAG_EXTERNAL: u32 = 1 << 1;
/// Only node-local backends (`externalTrafficPolicy: Local` or `internalTrafficPolicy: Local`):
/// never SNAT, and with no backend the packet is dropped, not rejected, as kube-proxy does.
pub const SVC_FLAG_LOCAL_ONLY: u32 = 1 << 2;
/// `loadBalancerSourceRanges` apply: clients outside `LB_SOURCE_RANGES` are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u32 = 1 << 3;

/// `Backend::flags`: the endpoint runs on this node.
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// What the datapath needs to pick a backend for a new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Stable identifier of this frontend; keys the names, the counters and the memberships.
    pub id: u32,
    /// Number of ready backends; zero means "reject new connections".
    pub backend_count: u16,
    /// Bumped whenever the backend set changes: an affinity pin made under another generation
    /// has its backend's membership checked once.
    pub generation: u16,
    /// `SVC_FLAG_*`.
    pub flags: u32,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, when `SVC_FLAG_AFFINITY` is set.
    pub affinity_timeout_s: u32,
    /// The frontend's Maglev table: `LB_MAGLEV[table_off .. table_off + table_size]`. A new
    /// backend set gets a new table beside the old, and this entry flips to it in one update,
    /// so a packet never sees a half-written table.
    pub table_off: u32,
    pub table_size: u32,
}

/// A backend endpoint, `LB_BACKENDS[id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
    pub _pad: u32,
}

/// Membership of a backend in a service's current set, checked when an affinity entry was
/// made under an older slot generation. The value is the slot, for inspection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendMemberKey {
    pub service_id: u32,
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    pub addr: [u32; 4],
}

/// Session affinity is per client address and per service frontend, as kube-proxy's `recent`
/// lists are per service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub client: [u32; 4],
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The backend a client is pinned to and when a new connection last used the pin.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend: Backend,
    /// Slot generation the backend was last known to be part of; when the service's generation
    /// moves on, membership is checked once in `LB_BACKEND_MEMBERS`.
    pub generation: u16,
    pub _pad: [u8; 6],
    /// `bpf_ktime_get_ns` time of the last new connection that used this entry.
    pub last_used_ns: u64,
}

/// Connection tracking direction, part of [`CtKey4`].
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// A flow as seen on the wire, `A` its address type (`u32` for IPv4, `[u32; 4]` for IPv6, both
/// in network byte order as in the packet). Forward entries are keyed on the client's packet
/// (destination = the service frontend), reply entries on the backend's reply (source = the
/// backend). 16 bytes for IPv4, so the table's hash reads four words; 40 for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey<A> {
    pub src: A,
    pub dst: A,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

pub type CtKey4 = CtKey<u32>;
pub type CtKey6 = CtKey<[u32; 4]>;

/// `CtValue4::flags`.
/// The flow's source is translated too (`snat_addr:snat_port`).
pub const CT_FLAG_SNAT: u8 = 1 << 0;
/// After translation the packet's source is one of this node's own addresses (SNAT to the
/// node, or a reply from a node port). The stack drops a received packet with a local source
/// as a martian (`fib_validate_source`), so the datapath routes it itself (FIB lookup, then
/// `bpf_redirect_neigh` at tc or `XDP_TX`/redirect at XDP) instead of passing it up.
pub const CT_FLAG_ROUTE: u8 = 1 << 1;
/// The other direction's `CT_FLAG_ROUTE`, so either entry can rebuild its peer.
pub const CT_FLAG_PEER_ROUTE: u8 = 1 << 2;
/// A packet of the reply direction was seen.
pub const CT_FLAG_REPLIED: u8 = 1 << 3;
/// The client side (forward direction) sent a FIN.
pub const CT_FLAG_FIN_FORWARD: u8 = 1 << 4;
/// The backend side (reply direction) sent a FIN.
pub const CT_FLAG_FIN_REPLY: u8 = 1 << 5;
/// The entry lives in the assured table (`LB_CT4`), whose entries are never evicted; others
/// live in the new-flow table (`LB_CT4_NEW`). netfilter's `IPS_ASSURED`.
pub const CT_FLAG_ASSURED: u8 = 1 << 6;

/// TCP states, as netfilter's `nf_conntrack_proto_tcp.c` names them; UDP flows stay `NONE`.
pub const CT_NONE: u8 = 0;
pub const CT_SYN_SENT: u8 = 1;
pub const CT_SYN_RECV: u8 = 2;
pub const CT_ESTABLISHED: u8 = 3;
/// One side sent a FIN that was not acknowledged yet.
pub const CT_FIN_WAIT: u8 = 4;
/// One side's FIN was acknowledged; the other side still sends.
pub const CT_CLOSE_WAIT: u8 = 5;
/// Both sides sent a FIN; the last one awaits its ACK.
pub const CT_LAST_ACK: u8 = 6;
pub const CT_TIME_WAIT: u8 = 7;
/// A RST was seen.
pub const CT_CLOSE: u8 = 8;
/// UDP (and other datagram) flows: one state, lifetime from the UDP timeout.
pub const CT_UDP: u8 = 9;
/// Number of states: the size of the timeout table.
pub const CT_STATES: usize = 10;

/// The state's readable name, for `lb list`.
pub const fn ct_state_name(state: u8) -> &'static str {
    match state {
        CT_NONE => "NONE",
        CT_SYN_SENT => "SYN_SENT",
        CT_SYN_RECV => "SYN_RECV",
        CT_ESTABLISHED => "ESTABLISHED",
        CT_FIN_WAIT => "FIN_WAIT",
        CT_CLOSE_WAIT => "CLOSE_WAIT",
        CT_LAST_ACK => "LAST_ACK",
        CT_TIME_WAIT => "TIME_WAIT",
        CT_CLOSE => "CLOSE",
        CT_UDP => "UDP",
        _ => "?",
    }
}

/// The translation and state of a tracked flow (`A` as in [`CtKey`]); both entries of a flow carry the same
/// state and flags (but their own `ROUTE` bit).
///
/// Forward entry: destination becomes `nat_addr:nat_port` (the backend); with `CT_FLAG_SNAT`
/// the source becomes `snat_addr:snat_port` (the node or hairpin address).
/// Reply entry: source becomes `nat_addr:nat_port` (the frontend the client used); with
/// `CT_FLAG_SNAT` the destination becomes `snat_addr:snat_port` (the original client).
/// Times are the kernel's jiffies, low 32 bits (`bpf_jiffies64`, which the verifier inlines
/// into a plain load): ages are compared with wrapping arithmetic, right for any age below
/// 2^31 jiffies (24 days at HZ=1000), far above every lifetime.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue<A> {
    /// Network byte order.
    pub nat_addr: A,
    /// Network byte order.
    pub snat_addr: A,
    /// Network byte order.
    pub nat_port: u16,
    /// Network byte order.
    pub snat_port: u16,
    /// `CT_*` state.
    pub state: u8,
    /// `CT_FLAG_*`.
    pub flags: u8,
    /// The tag of the entry's own key as the datapath writes it (`ct_tag`; IPv6 of its
    /// addresses' last words, `lb-ebpf/src/conntrack.rs`, `tag`), or 0 (entries written by
    /// userspace, or by a datapath from before tags): what a state change written in place
    /// checks, together with the state it changes from, before it swaps in the new state and
    /// flags ([`CtStateWord`]). An entry found by its key can be another flow's by the time the
    /// change is written: the new-flow array's ways are rewritten in place and the kernel's
    /// hash maps reuse a freed element at once, while a packet on another CPU may still hold it.
    pub tag: u16,
    pub service_id: u32,
    /// When a packet last refreshed the entry (at most every `CT_REFRESH` jiffies).
    pub last_seen: u32,
    /// When the flow was created.
    pub created: u32,
}

pub type CtValue4 = CtValue<u32>;
pub type CtValue6 = CtValue<[u32; 4]>;

/// The aligned 8 bytes of a [`CtValue`] from `nat_port` to `tag`, which the datapath swaps
/// with one compare-and-exchange to change a flow's state in place (`lb-ebpf/src/conntrack.rs`,
/// `swap_state`): the state and flags change only if the word still holds the tag of the key
/// the entry was found by and the state they were computed from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtStateWord {
    pub nat_port: u16,
    pub snat_port: u16,
    pub state: u8,
    pub flags: u8,
    pub tag: u16,
}

impl CtStateWord {
    /// Byte offset of the word in a `CtValue<A>`: after the two addresses, so 8-aligned for
    /// both families (the maps' values are).
    pub const fn offset<A>() -> usize {
        2 * core::mem::size_of::<A>()
    }

    pub fn from_u64(w: u64) -> Self {
        let b = w.to_ne_bytes();
        Self {
            nat_port: u16::from_ne_bytes([b[0], b[1]]),
            snat_port: u16::from_ne_bytes([b[2], b[3]]),
            state: b[4],
            flags: b[5],
            tag: u16::from_ne_bytes([b[6], b[7]]),
        }
    }

    pub fn to_u64(self) -> u64 {
        let (n, s, t) = (self.nat_port.to_ne_bytes(), self.snat_port.to_ne_bytes(), self.tag.to_ne_bytes());
        u64::from_ne_bytes([n[0], n[1], s[0], s[1], self.state, self.flags, t[0], t[1]])
    }

    /// Whether an entry whose word this is may take a state change computed from `state` and
    /// `flags` for a key whose tag is `tag`: the entry is untagged or the key's, and still in
    /// that state.
    pub fn admits(self, tag: u16, state: u8, flags: u8) -> bool {
        (self.tag == 0 || self.tag == tag) && self.state == state && self.flags == flags
    }
}

/// The tag of a conntrack key with these fields (addresses folded to 32 bits, as
/// `ct_set_hash` takes them), never 0: 15 bits of a multiply, a fold and a second multiply, so
/// two flows that take turns in one entry share it about once in 32,768 (the fold carries the
/// fields that vary most, high in their words in network order, into the bits taken).
#[inline(always)]
pub fn ct_tag(src: u32, dst: u32, sport: u16, dport: u16) -> u16 {
    let x = (src ^ dst.rotate_left(16)) as u64 ^ ((sport as u64) << 48 | (dport as u64) << 32);
    let h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (((h ^ h >> 29).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 49) as u16) | 0x8000
}

/// Entries in a set of the new-flow tables (`LB_CT4_NEW`, `LB_CT6_NEW`).
pub const CT_WAYS: usize = 4;
// The victim choice takes a candidate's partner as `i ^ CT_WAYS / 2` (`ct_set_victim_by`).
const _: () = assert!(CT_WAYS.is_power_of_two() && CT_WAYS >= 2);

/// One entry of a new-flow table (`LB_CT4_NEW`, `LB_CT6_NEW`): an array whose elements
/// `CT_WAYS * s .. CT_WAYS * (s + 1)` are the ways of set `s`, the set a key's `ct_set_hash`
/// selects. The new flows of a flood are written into it with plain stores: no hash insert,
/// no LRU list, no lock, no allocation (the kernel LRU's eviction, `bpf_lru_pop_free`, was
/// most of a new flow's cost with a full table). A full set gives up a live entry: every entry
/// here is unassured or finished, the ones netfilter's `early_drop` may drop. Each way is an
/// element of its own, not a set one element, so that a lookup's result is the same kind of
/// pointer whichever way holds the key: the verifier then follows one path after a hit, not
/// one per way. A way whose `key.proto` is 0 is empty (every tracked protocol is non-zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtWay<A> {
    pub key: CtKey<A>,
    pub value: CtValue<A>,
}

pub type CtWay4 = CtWay<u32>;
pub type CtWay6 = CtWay<[u32; 4]>;

/// A slot of `LB_CT4_CACHE`: an IPv4 way padded to 64 bytes. The map is mmapable, which the
/// kernel allocates with its elements from a page boundary (`array_map_alloc`), so each slot
/// is one cache line, and the two slots of a pair (`ct_cache_pair`) one aligned 128-byte block,
/// which x86's adjacent-line prefetch fetches together. With 48-byte elements after the
/// array's 312-byte header, three slots in four straddled two lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtCacheSlot4 {
    pub way: CtWay4,
    pub _pad: [u32; 5],
}

/// The hash that places a key in a new-flow table (addresses folded to 32 bits, as
/// `fold_v6`): of its client side alone, a forward key's source or a reply key's destination,
/// and its protocol, so both entries of a flow that is not SNATed share a set and a new flow
/// reads one set where it read two (the second set's first read was a sixth of a new flow's
/// cost at XDP with full tables, a miss in a table no cache holds). A reply key to a port of
/// the SNAT range mixes in its source too (the backend): its destination is a node address and
/// one of 4,536 ports whichever backend answers, and alone would crowd every SNATed flow's
/// reply entry into that many sets. The set is `select_slot(hash, sets)`, from the high bits;
/// the low bits and the key's direction pick the ways a full set may give up
/// (`ct_set_victim`, `ct_set_pair`). Three 64-bit multiplies, where `flow_hash` chains ten
/// 32-bit ones. (A client whose own port lies in the SNAT range, as macOS and Windows
/// ephemeral ports above 61,000 do, has its reply entry hashed like a SNATed one: the flow
/// works the same, and pays for a second set.)
#[inline(always)]
pub fn ct_set_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> u32 {
    let reply = dir == CT_DIR_REPLY;
    let (client, port) = if reply { (dst, dport) } else { (src, sport) };
    let other = if reply && u16::from_be(dport) >= SNAT_PORT_MIN { (src as u64) << 16 | sport as u64 } else { 0 };
    let h = ((client as u64) << 32 | (port as u64) << 16 | proto as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let h = h ^ h >> 29 ^ other.wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) >> 32) as u32
}

/// The slot of `LB_CT4_CACHE`, of `slots`, that caches the entry of a key with these fields
/// (`ct_key_hash`'s high half).
#[inline(always)]
pub fn ct_cache_slot(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, slots: u32) -> u32 {
    select_slot((ct_key_hash(src, dst, sport, dport, proto) >> 32) as u32, slots)
}

/// The hash that places a key's copy in `LB_CT4_CACHE` and its stamp in `LB_CT4_LIVE` (whose
/// second word takes a fourth multiply, `ct_live_place`). Three 64-bit multiplies, two of them
/// side by side, not `flow_hash`'s ten dependent 32-bit ones: on the established path this
/// hash is most of what a hit costs (`flow_hash` here took about 10 ns of a +45 ns packet at
/// XDP).
///
/// A product carries its factor's bits only upwards, and the fields that vary most between
/// flows sit high in their words (the last bytes of addresses, ports in network order). So the
/// addresses' product is folded down (`>> 29`) and the ports get a product of their own before
/// the last multiply mixes everything into the high half that picks the slot. Without the
/// fold, clients of one subnet on a few ports each all shared slots in pairs or worse (none in
/// 32,768 had a slot to itself, `cache_slots_spread_clients_times_ports`) and took turns in
/// them, each turn a miss. Keys that share a slot only cost what the cache saves, so crafted
/// collisions gain nothing more.
#[inline(always)]
fn ct_key_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u64 {
    let a = ((src as u64) << 32 | dst as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let p = ((sport as u64) << 16 | dport as u64 | (proto as u64) << 32).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (a ^ a >> 29 ^ p).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// The first of the two slots of `LB_CT4_CACHE`, of `slots`, either of which may cache the
/// entry of a key with these fields: a pair per `ct_cache_slot` of half as many slots. Two
/// ways where one was: a direct-mapped cache of 32,768 flows in 131,072 slots left about a
/// quarter of them sharing a slot, each taking turns with the other and missing on every
/// packet (the assured table's lookup and a copy, 2-3 times a hit's cost).
#[inline(always)]
pub fn ct_cache_pair(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, slots: u32) -> u32 {
    2 * ct_cache_slot(src, dst, sport, dport, proto, slots / 2)
}

/// Where the stamp of a key with these fields lies in `LB_CT4_LIVE`, of `words` words after
/// the generation word: two elements, and the key's bits of generation 0 in each (generation
/// `g`'s are each `g` bits up). Two of a word's 21 positions (three bits each, one per
/// generation) in each of two words, a Bloom filter of four bits blocked to two words. Each
/// stamp that counts for a key that is not there costs the assured table's lookup that misses
/// (some 500 ns with the table full), and a second word makes that rarer than more bits in one
/// would; a SYN still reads one word, and the second only when the first holds its bits
/// (`ct_live_counts`). The first word comes from the high half of `ct_key_hash`, its positions
/// from the bits below; the second word and its positions the same way from a second hash, the
/// first remixed by one multiply.
#[inline(always)]
pub fn ct_live_place(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, words: u32) -> [(u32, u64); 2] {
    let h = ct_key_hash(src, dst, sport, dport, proto);
    let g = (h ^ h >> 32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    [ct_live_word(h, words), ct_live_word(g, words)]
}

/// The element and the generation-0 bits a 64-bit hash picks in `LB_CT4_LIVE`.
#[inline(always)]
fn ct_live_word(h: u64, words: u32) -> (u32, u64) {
    let (p, q) = ((((h >> 22) & 0x3ff) * 21) >> 10, (((h >> 12) & 0x3ff) * 21) >> 10);
    (1 + select_slot((h >> 32) as u32, words), 1 << (3 * p) | 1 << (3 * q))
}

/// Whether a key whose stamp lies at `places` (`ct_live_place`) may stand for a live flow,
/// `read` giving a word of `LB_CT4_LIVE` (`None`: unreadable, which counts): a stamp in each of
/// its two words, the second read only when the first has one. Each word may hold the key's
/// bits of any generation, not necessarily the same in both: the two reads are no snapshot,
/// and a generation cleared between them (the key holding another's stamp too) must not lose
/// the key.
#[inline(always)]
pub fn ct_live_counts(places: [(u32, u64); 2], mut read: impl FnMut(u32) -> Option<u64>) -> bool {
    let [(a, mask_a), (b, mask_b)] = places;
    read(a).is_none_or(|w| ct_live_present(w, mask_a)) && read(b).is_none_or(|w| ct_live_present(w, mask_b))
}

/// Whether a key whose generation-0 bits are `mask` may stand for a live flow, its word being
/// `word`: a stamp of some generation (all of the key's bits of one). Stamps are only ever
/// added, by an atomic OR, and a generation is cleared only by the agent, before it turns to
/// it again, once the two others hold a stamp of every flow
/// (`lb-userspace/src/dataplane/live.rs`).
#[inline(always)]
pub fn ct_live_present(word: u64, mask: u64) -> bool {
    word & mask == mask || word & mask << 1 == mask << 1 || word & mask << 2 == mask << 2
}

/// The bits a stamp of a key whose generation-0 bits are `mask` sets in generation `g` (the
/// generation word; any value names one of the three).
#[inline(always)]
pub fn ct_live_stamp(mask: u64, g: u64) -> u64 {
    mask << (g % CT_LIVE_GENERATIONS)
}

/// Every bit of generation `g` in a word of `LB_CT4_LIVE` (bit 63 belongs to none).
pub fn ct_live_generation(g: u64) -> u64 {
    0x1249_2492_4924_9249 << (g % CT_LIVE_GENERATIONS)
}

/// The way of a set holding `k`; `way(i)` reads way `i` of the set (the kernel side looks
/// it up anew each time: a pointer in a register, no array of them on the 512-byte stack).
#[inline(always)]
pub fn ct_set_find<'a, A: 'a>(way: impl Fn(usize) -> Option<&'a CtWay<A>>, k: &CtKey<A>) -> Option<usize> {
    ct_set_find_by(way, k, ct_key_eq)
}

/// `ct_set_find` with keys compared by `eq` (a way's key, then `k`), which must be
/// `ct_key_eq`'s equality: the datapath compares IPv6 keys its own way (`lb-ebpf`'s
/// `ct_table.rs`, `key_eq`).
#[inline(always)]
pub fn ct_set_find_by<'a, A: 'a>(
    way: impl Fn(usize) -> Option<&'a CtWay<A>>,
    k: &CtKey<A>,
    eq: impl Fn(&CtKey<A>, &CtKey<A>) -> bool,
) -> Option<usize> {
    let mut i = 0;
    while i < CT_WAYS {
        if eq(&way(i)?.key, k) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether two keys are equal, compared as 32-bit words folded into one difference: one
/// branch per way where a field-by-field comparison takes seven, each a path the verifier
/// follows. Keys have no implicit padding (their size asserts below), and an emptied way
/// (`proto` 0) never equals a lookup key.
#[inline(always)]
pub fn ct_key_eq<A>(a: &CtKey<A>, b: &CtKey<A>) -> bool {
    let (pa, pb) = (a as *const CtKey<A> as *const u32, b as *const CtKey<A> as *const u32);
    let mut diff = 0;
    let mut i = 0;
    while i < core::mem::size_of::<CtKey<A>>() / 4 {
        // SAFETY: in bounds of both keys, whose alignment (their address fields') is at
        // least a u32's.
        diff |= unsafe { pa.add(i).read() ^ pb.add(i).read() };
        i += 1;
    }
    diff == 0
}

/// The way a new entry for `k` (whose `ct_set_hash` is `hash`) takes in a set (`way` as for
/// `ct_set_find`; `None` if a way cannot be read): its own, else
/// the first one empty or that `stale` says has expired, else the less recently seen at `now`
/// (jiffies) of two ways the hash picks; true in that last case, a live entry pushed out.
/// Two candidates, not the oldest of all: the verifier follows every path through this code,
/// and a running minimum over the ways multiplies the paths it must tell apart at each way.
/// The choice of two is the "power of two choices": nearly as good as the oldest of four.
#[inline(always)]
pub fn ct_set_victim<'a, A: 'a>(
    way: impl Fn(usize) -> Option<&'a CtWay<A>>,
    k: &CtKey<A>,
    hash: u32,
    now: u32,
    stale: impl Fn(&CtValue<A>) -> bool,
) -> Option<(usize, bool)> {
    ct_set_victim_by(way, k, hash, now, stale, ct_key_eq, CT_WAYS)
}

/// `ct_set_victim` with keys compared by `eq`, as `ct_set_find_by` says, and never evicting
/// way `avoid` (`CT_WAYS` or more: none): the way the other entry of the flow was just
/// written to, when a flow's two entries go in one at a time (a flow moved between the
/// tables). Without it, an entry that took a free way which is one of its peer's candidates
/// could be pushed out by its peer on a tie (both written the same jiffy, a flood's usual
/// case): a lost forward entry is only written again by the flow's next packet, but a SNATed
/// flow whose reply entry went first and lost it to its forward entry would keep its forward
/// entry alone, its SNAT port looking free to the port search (`lb-ebpf`'s `ct_table::write`
/// removes a pushed-out reply's forward key, not yet written then).
#[inline(always)]
pub fn ct_set_victim_by<'a, A: 'a>(
    way: impl Fn(usize) -> Option<&'a CtWay<A>>,
    k: &CtKey<A>,
    hash: u32,
    now: u32,
    stale: impl Fn(&CtValue<A>) -> bool,
    eq: impl Fn(&CtKey<A>, &CtKey<A>) -> bool,
    avoid: usize,
) -> Option<(usize, bool)> {
    if let Some(i) = ct_set_find_by(&way, k, eq) {
        return Some((i, false));
    }
    let mut i = 0;
    while i < CT_WAYS {
        let w = way(i)?;
        if w.key.proto == 0 || stale(&w.value) {
            return Some((i, false));
        }
        i += 1;
    }
    // The two entries of a flow not SNATed share a set (`ct_set_hash`) and its hash: each direction has
    // its own pair of candidates, so a reply entry written after its forward entry does not
    // push it out by a tie (both written the same jiffy) between the candidates the hash
    // picks for both; should the forward entry have taken a free way that is one of the
    // reply's candidates, a tie may still take it, which `ct_set_pair` (a new flow's
    // placement) and `avoid` (a flow's entries written one at a time) rule out.
    let a = (hash as usize + k.dir as usize) % CT_WAYS;
    let b = (a + CT_WAYS / 2) % CT_WAYS;
    // Seen after `now` (another CPU refreshed it meanwhile) reads as age 0.
    let age = |w: &CtWay<A>| {
        let age = now.wrapping_sub(w.value.last_seen);
        if (age as i32) < 0 {
            0
        } else {
            age
        }
    };
    let v = if age(way(b)?) > age(way(a)?) { b } else { a };
    // `avoid` turns the choice to the other candidate (`v ^ CT_WAYS / 2`, as `b` is `a`'s),
    // in arithmetic rather than a branch: the verifier follows both sides of every branch on
    // values it cannot know, and this choice is inlined into the main programs: with two
    // more branches here, lb_tc_ingress took 827,131 of its 1,000,000 instructions (666,706
    // before `avoid`; 704,379 this way).
    let d = (v ^ avoid) as u64;
    let same = ((d | d.wrapping_neg()) >> 63) ^ 1;
    Some((v ^ (same as usize * (CT_WAYS / 2)), true))
}

/// The ways a new flow's two entries take in the set they share (`k` its forward key, `pk` its
/// reply key, both of `ct_set_hash` `hash`; `way` as for `ct_set_find`): each entry its own way
/// if the set holds it, else the first way empty or `stale`, else the less recently seen of its
/// direction's two candidates (`ct_set_victim`'s), and never the way the other entry keeps or
/// takes; true beside a way whose live entry is pushed out. Of copies of a key in two ways (two
/// CPUs writing one flow at once), the first is its own, as `ct_set_find` reads it. One pass
/// over the set, where `ct_set_victim` for each entry made two each: with full tables, the two
/// inserts were over half of the XDP new-flow stage's profile samples.
#[inline(always)]
pub fn ct_set_pair<'a, A: 'a>(
    way: impl Fn(usize) -> Option<&'a CtWay<A>>,
    k: &CtKey<A>,
    pk: &CtKey<A>,
    hash: u32,
    now: u32,
    stale: impl Fn(&CtValue<A>) -> bool,
) -> Option<[(usize, bool); 2]> {
    ct_set_pair_by(way, k, pk, hash, now, stale, ct_key_eq)
}

/// `ct_set_pair` with keys compared by `eq`, as `ct_set_find_by` says.
#[inline(always)]
pub fn ct_set_pair_by<'a, A: 'a>(
    way: impl Fn(usize) -> Option<&'a CtWay<A>>,
    k: &CtKey<A>,
    pk: &CtKey<A>,
    hash: u32,
    now: u32,
    stale: impl Fn(&CtValue<A>) -> bool,
    eq: impl Fn(&CtKey<A>, &CtKey<A>) -> bool,
) -> Option<[(usize, bool); 2]> {
    // `CT_WAYS` stands for none. The first two free ways, not a mask: BPF has no instruction
    // to find a mask's lowest bit, and LLVM's expansion of one reads a table from .rodata.
    let (mut own, mut peer_own, mut free0, mut free1) = (CT_WAYS, CT_WAYS, CT_WAYS, CT_WAYS);
    let mut i = 0;
    while i < CT_WAYS {
        let w = way(i)?;
        if own == CT_WAYS && eq(&w.key, k) {
            own = i;
        } else if peer_own == CT_WAYS && eq(&w.key, pk) {
            peer_own = i;
        } else if w.key.proto == 0 || stale(&w.value) {
            if free0 == CT_WAYS {
                free0 = i;
            } else if free1 == CT_WAYS {
                free1 = i;
            }
        }
        i += 1;
    }
    // As in `ct_set_victim`: seen after `now` reads as age 0.
    let age = |i: usize| {
        let age = now.wrapping_sub(way(i)?.value.last_seen);
        Some(if (age as i32) < 0 { 0 } else { age })
    };
    // A free way other than `taken`, else the older of `dir`'s two candidates other than it.
    let pick = |dir: u8, taken: usize| -> Option<(usize, bool)> {
        if free0 != CT_WAYS && free0 != taken {
            return Some((free0, false));
        }
        if free1 != CT_WAYS && free1 != taken {
            return Some((free1, false));
        }
        let a = (hash as usize + dir as usize) % CT_WAYS;
        let b = (a + CT_WAYS / 2) % CT_WAYS;
        if a == taken {
            return Some((b, true));
        }
        if b == taken {
            return Some((a, true));
        }
        Some((if age(b)? > age(a)? { b } else { a }, true))
    };
    let first = if own != CT_WAYS { (own, false) } else { pick(k.dir, peer_own)? };
    let second = if peer_own != CT_WAYS { (peer_own, false) } else { pick(pk.dir, first.0)? };
    Some([first, second])
}

/// What a packet of a tracked flow does to its state, netfilter's TCP state table reduced to
/// what a translator needs (no sequence-window tracking). Pure, so the datapath, the agent
/// and the tests share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtStep {
    /// Keep the flow, with this state and flags.
    To(u8, u8),
    /// A new connection on the tuple of a finished one (a SYN in TIME_WAIT or CLOSE): a fresh
    /// flow, with a fresh backend choice (netfilter's port reuse).
    Restart,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The next state of a TCP flow in `state` with `flags`, for a packet of direction `dir`
/// carrying `tcp`, the TCP flags byte.
#[inline(always)]
pub fn tcp_step(state: u8, flags: u8, dir: u8, tcp: u8) -> CtStep {
    let reply = dir == CT_DIR_REPLY;
    let flags = if reply { flags | CT_FLAG_REPLIED } else { flags };
    if tcp & TCP_RST != 0 {
        return CtStep::To(CT_CLOSE, flags);
    }
    if tcp & TCP_SYN != 0 {
        let ack = tcp & TCP_ACK != 0;
        return match (state, reply, ack) {
            (CT_TIME_WAIT | CT_CLOSE, false, false) => CtStep::Restart,
            (CT_SYN_SENT, true, true) => CtStep::To(CT_SYN_RECV, flags),
            (CT_NONE, false, false) => CtStep::To(CT_SYN_SENT, flags),
            // Retransmissions, and SYNs inside a live connection: no change.
            _ => CtStep::To(state, flags),
        };
    }
    if tcp & TCP_FIN != 0 {
        let fin = if reply { CT_FLAG_FIN_REPLY } else { CT_FLAG_FIN_FORWARD };
        let flags = flags | fin;
        if state >= CT_TIME_WAIT {
            return CtStep::To(state, flags);
        }
        let both = flags & (CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY) == CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY;
        return CtStep::To(if both { CT_LAST_ACK } else { CT_FIN_WAIT }, flags);
    }
    if tcp & TCP_ACK == 0 {
        return CtStep::To(state, flags);
    }
    // A plain ACK (or data).
    let fin_of_other = if reply { CT_FLAG_FIN_FORWARD } else { CT_FLAG_FIN_REPLY };
    let next = match state {
        CT_SYN_RECV if !reply => CT_ESTABLISHED,
        // Picked up mid-stream (its entry was lost, or it predates us): it is established.
        CT_NONE => CT_ESTABLISHED,
        CT_FIN_WAIT if flags & fin_of_other != 0 => CT_CLOSE_WAIT,
        CT_LAST_ACK => CT_TIME_WAIT,
        s => s,
    };
    CtStep::To(next, flags)
}

/// Whether a flow in `state` with `flags` belongs in the assured table: a TCP connection whose
/// handshake completed (or that was picked up mid-stream and answered) and has not finished,
/// or a UDP flow that has been answered for a while (`udp_stream`, netfilter's UDP "stream").
#[inline(always)]
pub fn ct_assured(state: u8, flags: u8, udp_stream: bool) -> bool {
    match state {
        CT_ESTABLISHED | CT_FIN_WAIT | CT_CLOSE_WAIT | CT_LAST_ACK => flags & CT_FLAG_REPLIED != 0,
        CT_UDP => udp_stream && flags & CT_FLAG_REPLIED != 0,
        _ => false,
    }
}

/// The other direction's key and entry of a flow, rebuilt from one of its entries. A forward
/// entry (client -> frontend) knows the backend and the SNAT source; a reply entry (backend ->
/// client or SNAT source) knows the frontend and the client. The state, times and service are
/// shared; the `ROUTE` bits swap.
#[inline(always)]
pub fn ct_peer<A: Copy + Default>(k: &CtKey<A>, e: &CtValue<A>) -> (CtKey<A>, CtValue<A>) {
    let (mut pk, mut pv) = (CtKey::default(), *e);
    ct_peer_into(k, e, &mut pk, &mut pv);
    (pk, pv)
}

/// `ct_peer` written into the caller's `pk` and `pv`, every field, so that the kernel side can
/// have it built in a per-CPU scratch map instead of its 512-byte stack.
#[inline(always)]
pub fn ct_peer_into<A: Copy + Default>(k: &CtKey<A>, e: &CtValue<A>, pk: &mut CtKey<A>, pv: &mut CtValue<A>) {
    let snat = e.flags & CT_FLAG_SNAT != 0;
    let flags = (e.flags & !(CT_FLAG_ROUTE | CT_FLAG_PEER_ROUTE))
        | if e.flags & CT_FLAG_ROUTE != 0 { CT_FLAG_PEER_ROUTE } else { 0 }
        | if e.flags & CT_FLAG_PEER_ROUTE != 0 { CT_FLAG_ROUTE } else { 0 };
    pv.state = e.state;
    pv.flags = flags;
    // The peer's own key's tag is the datapath's to write (it folds the addresses).
    pv.tag = 0;
    pv.service_id = e.service_id;
    pv.last_seen = e.last_seen;
    pv.created = e.created;
    pk.proto = k.proto;
    pk._pad = 0;
    if k.dir == CT_DIR_FORWARD {
        // Replies come from the backend to the SNAT source, or to the client.
        let (dst, dport) = if snat { (e.snat_addr, e.snat_port) } else { (k.src, k.sport) };
        (pk.src, pk.dst, pk.sport, pk.dport, pk.dir) = (e.nat_addr, dst, e.nat_port, dport, CT_DIR_REPLY);
        (pv.nat_addr, pv.nat_port, pv.snat_addr, pv.snat_port) = (k.dst, k.dport, k.src, k.sport);
    } else {
        // The backend is the reply's source, the SNAT source its destination.
        *pk = ct_forward_key(k, e);
        let (snat_addr, snat_port) = if snat { (k.dst, k.dport) } else { (A::default(), 0) };
        (pv.nat_addr, pv.nat_port, pv.snat_addr, pv.snat_port) = (k.src, k.sport, snat_addr, snat_port);
    }
}

/// `ct_forward_key`, written field by field into `out`: the datapath's IPv6 builds it in its
/// scratch slot, where a whole key made first would take 40 bytes of a subprogram's stack.
#[inline(always)]
pub fn ct_forward_key_into<A: Copy>(k: &CtKey<A>, e: &CtValue<A>, out: &mut CtKey<A>) {
    // Copies that say they do not overlap: plain assignments of the addresses went through
    // a copy on the stack.
    // SAFETY: `out` is a unique borrow, so it overlaps neither `k` nor `e`.
    unsafe {
        core::ptr::copy_nonoverlapping(&e.snat_addr, &mut out.src, 1);
        core::ptr::copy_nonoverlapping(&e.nat_addr, &mut out.dst, 1);
    }
    out.sport = e.snat_port;
    out.dport = e.nat_port;
    out.proto = k.proto;
    out.dir = CT_DIR_FORWARD;
    out._pad = 0;
}

/// The forward key of the flow whose reply entry is `k`, `e`: the client's packets go to the
/// frontend.
#[inline(always)]
pub fn ct_forward_key<A: Copy>(k: &CtKey<A>, e: &CtValue<A>) -> CtKey<A> {
    CtKey {
        src: e.snat_addr,
        dst: e.nat_addr,
        sport: e.snat_port,
        dport: e.nat_port,
        proto: k.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// A UDP flow answered and older than this (seconds) counts as a stream (netfilter: 2 s).
pub const CT_UDP_STREAM_S: u32 = 2;

/// Traffic a service frontend received (client to service direction), per CPU, indexed by
/// service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
}

/// A socket of the node's own that the socket-level programs pointed at a backend, and that
/// backend: what `getpeername` and `recvmsg` must show as the frontend instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The frontend a node-local socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevValue {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// One of the node's own addresses, on which node ports answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeAddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A datagram being fragmented, as every one of its fragments shows it (RFC 791: source,
/// destination, protocol and identification name the datagram).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The IP identification (16 bits in IPv4, 32 in the IPv6 fragment header), network order.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// The L4 ports of a fragmented datagram, from its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when the first fragment passed: an id is reused after 65,536
    /// datagrams, so an entry older than the kernel's reassembly timeout is ignored.
    pub created_ns: u64,
}

/// `loadBalancerSourceRanges` entry for an LPM trie: the first 32 bits of `data` are the
/// service id (always matched whole), the rest the client address prefix. The prefix length
/// of a CIDR `a/n` is `32 + n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceRangeData {
    /// Big-endian, so the trie compares it byte by byte like an address.
    pub service_id_be: u32,
    pub addr: [u32; 4],
}

/// An `LB_LOCAL_SOURCES` prefix: the family (always matched whole, so IPv4 and IPv6 prefixes
/// never match each other's addresses), then the address; the prefix length of `a/n` is
/// `32 + n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalSourceData {
    /// `FAMILY_*`, big-endian.
    pub family_be: u32,
    pub addr: [u32; 4],
}

/// A human-readable name for a service id, written by the agent for `lb list`; the datapath
/// never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// `namespace/name:port-name`, NUL-padded UTF-8.
    pub name: [u8; 120],
    pub layout_version: u32,
    pub _pad: u32,
}

impl Default for ServiceName {
    fn default() -> Self {
        Self { name: [0; 120], layout_version: MAP_LAYOUT_VERSION, _pad: 0 }
    }
}

/// Per-CPU counters, one per verdict or drop reason. Indexes into the stats array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IP (ARP, LLDP, ...), or at tc a VLAN's frame on the VLAN's parent interface (the
    /// VLAN device's own program serves it): passed untouched.
    PassNotIp = 0,
    /// IPv4 but not to a service and not a reply of a tracked flow.
    PassNotService = 1,
    /// Headers shorter than they claim, or bad IHL: passed for the kernel to drop.
    PassMalformed = 2,
    /// An IP fragment of a datagram no service or tracked flow is concerned with: passed.
    PassFragment = 3,
    /// A new flow to a service was translated to a backend.
    FwdNewFlow = 4,
    /// A packet of a tracked flow was translated.
    FwdTracked = 5,
    /// A reply from a backend was translated back to the frontend.
    ReplyTranslated = 6,
    /// A service with no ready backend was refused with ICMP port unreachable.
    RejectNoBackend = 7,
    /// The backend slot the service pointed at was missing (agent update race); dropped.
    DropSlotMissing = 8,
    /// A conntrack entry could not be created; dropped rather than forwarded untracked.
    DropCtInsert = 9,
    /// A rewrite helper failed; dropped.
    DropRewrite = 10,
    /// Traffic to a service address on a protocol we do not translate (ICMP, SCTP, ...).
    PassOtherProto = 11,
    /// A new flow went to the backend its client is pinned to (session affinity).
    AffinityHit = 12,
    /// A local-only frontend (traffic policy Local) had no local backend: dropped, as
    /// kube-proxy does.
    DropNoLocalBackend = 13,
    /// A client outside `loadBalancerSourceRanges`: dropped.
    DropSourceRange = 14,
    /// No free SNAT port for a flow that needed one: dropped.
    DropSnatPorts = 15,
    /// A new flow was SNATed (remote backend of an external frontend, or hairpin).
    FwdSnat = 16,
    /// A translated packet was sent straight to its next hop (its source is a node address).
    Routed = 17,
    /// No route for a packet that had to be routed by the datapath: dropped.
    DropNoRoute = 18,
    /// XDP could not route a packet itself (no neighbour entry yet, say) and left it to tc.
    DeferredToTc = 19,
    /// A later fragment of a datagram followed its first fragment's translation.
    FragTranslated = 20,
    /// A later fragment whose first fragment was not seen (lost, or out of order): dropped,
    /// since it cannot be matched to a flow; the sender retransmits the datagram.
    DropFragNoFirst = 21,
    /// An ICMP error quoting a translated flow was translated with it (outer and inner headers).
    IcmpTranslated = 22,
    /// A packet the datapath would forward itself had TTL <= 1: dropped, as a router drops it
    /// (without the ICMP time exceeded a router sends).
    DropTtlExpired = 23,
    /// A flow became assured but the assured conntrack table was full: it stays in the
    /// new-flow table, where a flood of new flows can evict it. The agent's collection makes room.
    CtAssuredFull = 24,
    /// An IPv6 packet whose extension header chain is longer than the parser walks
    /// (`MAX_EXT_HEADERS`, four): passed untouched, never misparsed.
    PassExtHeaders = 25,
    /// A new flow's entry took the way of a live unassured one in a full set of the new-flow
    /// table (`CtWay`): that flow is untracked until its next packet tracks it again (its
    /// backend is chosen again by Maglev, the same while the backend set holds).
    CtNewEvicted = 26,
    /// A packet the datapath would route itself was larger than the egress interface's MTU
    /// and may not be fragmented (IPv4 with DF, every IPv6 packet): answered with ICMP
    /// "fragmentation needed" or ICMPv6 Packet Too Big naming the MTU, as a router answers,
    /// so path MTU discovery shrinks the sender's packets. (IPv4 without DF, which a router
    /// would fragment, is dropped: `DropNoRoute`.)
    TooBig = 27,
}

/// Hook index of the socket-level programs (cgroup connect4/sendmsg4/recvmsg4/getpeername4).
pub const HOOK_SOCK: u32 = 2;

/// Number of counters per hook.
pub const COUNTER_MAX: u32 = 28;
/// Hooks with their own counters: tc (0), XDP (1), socket (2). The stats array holds
/// `HOOKS * COUNTER_MAX` entries, indexed `hook * COUNTER_MAX + counter`.
pub const HOOKS: u32 = 3;

impl Counter {
    pub const ALL: [Counter; COUNTER_MAX as usize] = [
        Counter::PassNotIp,
        Counter::PassNotService,
        Counter::PassMalformed,
        Counter::PassFragment,
        Counter::FwdNewFlow,
        Counter::FwdTracked,
        Counter::ReplyTranslated,
        Counter::RejectNoBackend,
        Counter::DropSlotMissing,
        Counter::DropCtInsert,
        Counter::DropRewrite,
        Counter::PassOtherProto,
        Counter::AffinityHit,
        Counter::DropNoLocalBackend,
        Counter::DropSourceRange,
        Counter::DropSnatPorts,
        Counter::FwdSnat,
        Counter::Routed,
        Counter::DropNoRoute,
        Counter::DeferredToTc,
        Counter::FragTranslated,
        Counter::DropFragNoFirst,
        Counter::IcmpTranslated,
        Counter::DropTtlExpired,
        Counter::CtAssuredFull,
        Counter::PassExtHeaders,
        Counter::CtNewEvicted,
        Counter::TooBig,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotService => "pass_not_service",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassFragment => "pass_fragment",
            Counter::FwdNewFlow => "fwd_new_flow",
            Counter::FwdTracked => "fwd_tracked",
            Counter::ReplyTranslated => "reply_translated",
            Counter::RejectNoBackend => "reject_no_backend",
            Counter::DropSlotMissing => "drop_slot_missing",
            Counter::DropCtInsert => "drop_ct_insert",
            Counter::DropRewrite => "drop_rewrite",
            Counter::PassOtherProto => "pass_other_proto",
            Counter::AffinityHit => "affinity_hit",
            Counter::DropNoLocalBackend => "drop_no_local_backend",
            Counter::DropSourceRange => "drop_source_range",
            Counter::DropSnatPorts => "drop_snat_ports",
            Counter::FwdSnat => "fwd_snat",
            Counter::Routed => "routed",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DeferredToTc => "deferred_to_tc",
            Counter::FragTranslated => "frag_translated",
            Counter::DropFragNoFirst => "drop_frag_no_first",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::DropTtlExpired => "drop_ttl_expired",
            Counter::CtAssuredFull => "ct_assured_full",
            Counter::PassExtHeaders => "pass_ext_headers",
            Counter::CtNewEvicted => "ct_new_evicted",
            Counter::TooBig => "too_big",
        }
    }
}

/// The hash whose `select_slot` in a frontend's Maglev table picks a new flow's backend (the
/// tests predict choices with it). Inputs are taken as they sit in the packet (network order).
/// Three 64-bit multiplies, the first two independent, where `flow_hash` chains ten 32-bit
/// ones (about 7% of the XDP new-flow stage's profile, some 10 ns). The fields that vary
/// between a client's flows (its address and port) go into the low bits of a product, where
/// each carries into every bit above it; the fold then brings the high half down, so that the
/// last multiply carries every input bit into the high half `select_slot` reads.
#[inline(always)]
pub fn select_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let a = (src as u64 | (sport as u64) << 32 | (proto as u64) << 48).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let b = (dst as u64 | (dport as u64) << 32).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = a ^ b;
    let h = (h ^ h >> 32).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (h >> 32) as u32
}

/// A general 32-bit hash of a 5-tuple's fields (the Maglev permutations, the SNAT port
/// search). Inputs as they sit in the packet (network order); the mix is murmur3's finaliser,
/// which spreads sequential source ports evenly.
#[inline(always)]
pub fn flow_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    h = mix(h ^ src);
    h = mix(h ^ dst);
    h = mix(h ^ (((sport as u32) << 16) | dport as u32));
    h = mix(h ^ proto as u32);
    fmix32(h)
}

#[inline(always)]
fn mix(h: u32) -> u32 {
    h.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Slot a flow hash selects in a table of `size` slots (`size` > 0).
#[inline(always)]
pub fn select_slot(hash: u32, size: u32) -> u32 {
    // Multiply-shift instead of `%`: no division on the fast path, same uniformity.
    (((hash as u64) * (size as u64)) >> 32) as u32
}

// The datapath and the agent must agree on these sizes; a change here is a layout change.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);
const _: () = assert!(core::mem::size_of::<Backend>() == 24);
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue4>() == 28);
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);
// The datapath writes a key's ports, and its protocol with direction and padding, as one
// aligned 32-bit word each (`conntrack::key` in lb-ebpf).
const _: () = assert!(core::mem::offset_of!(CtKey4, sport) == 8 && core::mem::offset_of!(CtKey4, proto) == 12);
// The flow cache reads an IPv4 entry's state and flags as its fourth word (lb-ebpf ct_cache.rs).
const _: () = assert!(core::mem::offset_of!(CtValue4, state) == 12 && core::mem::offset_of!(CtValue4, flags) == 13);
// And its `last_seen` as its sixth word, to choose which copy of a pair to replace.
const _: () = assert!(core::mem::offset_of!(CtValue4, last_seen) == 20);
// The state word (`CtStateWord`) where its compare-and-exchange expects it: 8-aligned in the
// values and in the new-flow array's ways.
const _: () = assert!(
    core::mem::offset_of!(CtValue4, nat_port) == CtStateWord::offset::<u32>()
        && core::mem::offset_of!(CtValue4, tag) == CtStateWord::offset::<u32>() + 6
        && core::mem::offset_of!(CtValue6, nat_port) == CtStateWord::offset::<[u32; 4]>()
        && core::mem::offset_of!(CtValue6, tag) == CtStateWord::offset::<[u32; 4]>() + 6
        && CtStateWord::offset::<u32>().is_multiple_of(8)
        && CtStateWord::offset::<[u32; 4]>().is_multiple_of(8)
        && core::mem::size_of::<CtStateWord>() == 8
        && core::mem::offset_of!(CtWay<u32>, value).is_multiple_of(8)
);
const _: () = assert!(core::mem::offset_of!(CtKey6, sport) == 32 && core::mem::offset_of!(CtKey6, proto) == 36);
const _: () = assert!(core::mem::align_of::<CtKey4>() == 4 && core::mem::align_of::<CtKey6>() == 4);
// Likewise a service key's port, protocol and family, and its scope with padding
// (`service::get` in lb-ebpf, which builds the whole key from words).
const _: () = assert!(core::mem::offset_of!(ServiceKey, port) == 16 && core::mem::offset_of!(ServiceKey, scope) == 20);
const _: () = assert!(core::mem::align_of::<ServiceKey>() == 4);
// And the node address and affinity keys, built from words (`service::lookup`,
// `select::select` in lb-ebpf).
const _: () = assert!(core::mem::offset_of!(NodeAddrKey, family) == 16);
const _: () =
    assert!(core::mem::offset_of!(AffinityKey, service_id) == 16 && core::mem::offset_of!(AffinityKey, family) == 20);
const _: () = assert!(core::mem::size_of::<CtValue6>() == 52);
const _: () = assert!(core::mem::size_of::<CtWay4>() == 44);
const _: () = assert!(core::mem::size_of::<CtCacheSlot4>() == 64 && core::mem::offset_of!(CtCacheSlot4, way) == 0);
const _: () = assert!(core::mem::size_of::<CtWay6>() == 92);
const _: () = assert!(core::mem::size_of::<NodeAddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 32);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 24);
const _: () = assert!(core::mem::size_of::<SourceRangeData>() == 20);
const _: () = assert!(core::mem::size_of::<LocalSourceData>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceName>() == 128);
const _: () = assert!(core::mem::size_of::<BackendMemberKey>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 40);
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragValue>() == 16);

#[cfg(feature = "user")]
pub mod maglev;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, made only of integers, with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue4 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for CtWay4 {}
    unsafe impl aya::Pod for CtWay6 {}
    unsafe impl aya::Pod for CtCacheSlot4 {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for BackendMemberKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for NodeAddrKey {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SourceRangeData {}
    unsafe impl aya::Pod for LocalSourceData {}
    unsafe impl aya::Pod for ServiceStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_stays_in_range_for_every_size() {
        for size in (1..=64u32).chain([61, 65_537]) {
            for port in 0..2000u16 {
                let h = select_hash(0x0501_f40a, 0x0a00_600a, port.to_be(), 80u16.to_be(), PROTO_TCP);
                assert!(select_slot(h, size) < size);
            }
        }
        assert_eq!(select_slot(u32::MAX, 65_537), 65_536);
    }

    #[test]
    fn the_state_word_is_the_values_bytes_and_admits_only_its_own_or_no_tag_in_its_state() {
        let v = CtValue4 {
            nat_addr: 1,
            snat_addr: 2,
            nat_port: 0x1234,
            snat_port: 0x5678,
            state: CT_SYN_RECV,
            flags: CT_FLAG_REPLIED,
            tag: 0x9abc,
            service_id: 7,
            last_seen: 8,
            created: 9,
        };
        // SAFETY: reading 8 bytes inside a `repr(C)` value.
        let raw = unsafe {
            core::ptr::addr_of!(v).cast::<u8>().add(CtStateWord::offset::<u32>()).cast::<u64>().read_unaligned()
        };
        let w = CtStateWord::from_u64(raw);
        assert_eq!(
            w,
            CtStateWord {
                nat_port: 0x1234,
                snat_port: 0x5678,
                state: CT_SYN_RECV,
                flags: CT_FLAG_REPLIED,
                tag: 0x9abc
            }
        );
        assert_eq!(w.to_u64(), raw);
        assert!(w.admits(0x9abc, CT_SYN_RECV, CT_FLAG_REPLIED));
        assert!(!w.admits(0x9abd, CT_SYN_RECV, CT_FLAG_REPLIED), "another key's tag");
        assert!(!w.admits(0x9abc, CT_SYN_SENT, CT_FLAG_REPLIED), "moved on meanwhile");
        assert!(!w.admits(0x9abc, CT_SYN_RECV, 0), "flags moved on meanwhile");
        assert!(CtStateWord { tag: 0, ..w }.admits(0x1111, CT_SYN_RECV, CT_FLAG_REPLIED), "untagged");
    }

    #[test]
    fn tags_are_never_zero_and_tell_a_sets_flows_apart() {
        // Clients of one subnet on many ports, as take turns in a set: few equal tags.
        let mut seen = std::collections::HashMap::new();
        for c in 0..64u32 {
            for p in 0..64u16 {
                let client = u32::from_ne_bytes([10, 0, 0, c as u8]);
                let vip = u32::from_ne_bytes([10, 96, 0, 1]);
                let t = ct_tag(client, vip, (40_000 + p).to_be(), 80u16.to_be());
                assert_ne!(t, 0);
                *seen.entry(t).or_insert(0u32) += 1;
            }
        }
        // 4096 keys into 32,768 tags: a random choice leaves about 3,850 distinct.
        assert!(seen.len() > 3_700, "{} distinct tags of 4096 keys", seen.len());
    }

    /// Linux hands out ephemeral ports close together; they must still spread evenly.
    #[test]
    fn sequential_source_ports_spread_evenly() {
        let mut hits = [0u32; 3];
        for port in 32768..(32768 + 3000u16) {
            let h = select_hash(0x6401_f40a, 0x3b7b_680a, port.to_be(), 80u16.to_be(), PROTO_TCP);
            hits[select_slot(h, 3) as usize] += 1;
        }
        for h in hits {
            assert!((900..1100).contains(&h), "{hits:?}");
        }
    }

    fn way(src: u32, last_seen: u32) -> CtWay<u32> {
        CtWay {
            key: CtKey { src, dst: 2, sport: 3, dport: 4, proto: PROTO_TCP, dir: CT_DIR_FORWARD, _pad: 0 },
            value: CtValue { last_seen, ..Default::default() },
        }
    }

    #[test]
    fn a_set_gives_its_own_way_then_an_empty_or_expired_one_then_the_older_of_two() {
        let never = |_: &CtValue4| false;
        let empty = [CtWay4::default(); CT_WAYS];
        let victim = |w: &[CtWay4; CT_WAYS], k: &CtKey4, hash, stale: &dyn Fn(&CtValue4) -> bool| {
            ct_set_victim(|i| w.get(i), k, hash, 100, stale).unwrap()
        };
        assert_eq!(victim(&empty, &way(1, 0).key, 0, &never), (0, false));
        let mut set = [CtWay4::default(); CT_WAYS];
        for (i, w) in set.iter_mut().enumerate() {
            *w = way(10 + i as u32, 50 + i as u32);
        }
        let find = |w: &[CtWay4; CT_WAYS], k: &CtKey4| ct_set_find(|i| w.get(i), k);
        assert_eq!(find(&set, &way(12, 0).key), Some(2));
        assert_eq!(find(&set, &way(99, 0).key), None);
        // A key already there keeps its way, even behind an expired one.
        assert_eq!(victim(&set, &way(13, 0).key, 0, &|v| v.last_seen == 50), (3, false));
        // An expired one is taken before any live one, and nothing live is lost.
        assert_eq!(victim(&set, &way(99, 0).key, 0, &|v| v.last_seen == 52), (2, false));
        // Full: of the two ways the hash picks (0 and 2, or 1 and 3), the less recently seen.
        assert_eq!(victim(&set, &way(99, 0).key, 0, &never), (0, true));
        assert_eq!(victim(&set, &way(99, 0).key, 2, &never), (0, true));
        assert_eq!(victim(&set, &way(99, 0).key, 1, &never), (1, true));
        // One seen after `now` (wrapping) counts as the newest, not the oldest.
        set[0].value.last_seen = 101;
        assert_eq!(victim(&set, &way(99, 0).key, 0, &never), (2, true));
        // A removed entry (proto 0) is free again, and never matches its old key.
        set[3].key.proto = 0;
        assert_eq!(victim(&set, &way(99, 0).key, 0, &never), (3, false));
        assert_eq!(find(&set, &way(13, 0).key), None);
    }

    #[test]
    fn keys_are_equal_only_when_every_field_is() {
        let k = way(1, 0).key;
        assert!(ct_key_eq(&k, &k));
        for other in [
            CtKey4 { src: 9, ..k },
            CtKey4 { dst: 9, ..k },
            CtKey4 { sport: 9, ..k },
            CtKey4 { dport: 9, ..k },
            CtKey4 { proto: PROTO_UDP, ..k },
            CtKey4 { dir: CT_DIR_REPLY, ..k },
        ] {
            assert!(!ct_key_eq(&k, &other), "{other:?}");
        }
        let k6 = CtKey6 { src: [1, 2, 3, 4], dst: [5, 6, 7, 8], sport: 1, dport: 2, proto: PROTO_TCP, dir: 0, _pad: 0 };
        assert!(ct_key_eq(&k6, &k6.clone()));
        assert!(!ct_key_eq(&k6, &CtKey6 { dst: [5, 6, 7, 9], ..k6 }));
    }

    #[test]
    fn set_indexes_stay_in_range_and_spread() {
        let sets = 1000;
        let mut hits = vec![0u32; sets as usize];
        for port in 0..100_000u32 {
            // One client's ports, and then many clients' one port.
            let h = if port < 65_536 {
                ct_set_hash(0x0a00_0001, 0x0a60_000a, (port as u16).to_be(), 80u16.to_be(), PROTO_TCP, CT_DIR_FORWARD)
            } else {
                let client = (0x0a00_0000 + port).to_be();
                ct_set_hash(client, 0x0a60_000a, 40_000u16.to_be(), 80u16.to_be(), PROTO_TCP, CT_DIR_FORWARD)
            };
            let i = select_slot(h, sets);
            hits[i as usize] += 1;
        }
        // 100 per set on average; a fair spread keeps every set within a few deviations.
        assert!(hits.iter().all(|h| (50..160).contains(h)), "{:?}", (hits.iter().min(), hits.iter().max()));
        // The client side and the protocol count, the frontend does not (the reply key does
        // not know it).
        let h = |src, dst, sport, dport, proto| ct_set_hash(src, dst, sport, dport, proto, CT_DIR_FORWARD);
        let base = h(1, 2, 3, 4, PROTO_TCP);
        for other in [h(9, 2, 3, 4, PROTO_TCP), h(1, 2, 9, 4, PROTO_TCP), h(1, 2, 3, 4, PROTO_UDP)] {
            assert_ne!(other, base);
        }
        assert_eq!(h(1, 9, 3, 9, PROTO_TCP), base);
    }

    #[test]
    fn one_backends_snat_ports_never_share_a_claim_slot() {
        let node = 0x0a00_0064u32.to_be();
        for b in 0..64u32 {
            let backend = (0x0af4_0200 + b).to_be();
            let slots: std::collections::BTreeSet<u32> = (SNAT_PORT_MIN..=SNAT_PORT_MAX)
                .map(|p| snat_claim_slot(node, backend, 8080u16.to_be(), p.to_be(), PROTO_TCP))
                .collect();
            assert_eq!(slots.len(), (SNAT_PORT_MAX - SNAT_PORT_MIN) as usize + 1);
            assert!(slots.iter().all(|s| *s < SNAT_CLAIM_SLOTS));
        }
    }

    #[test]
    fn a_claim_holds_for_its_jiffies_either_side_of_the_clock_also_across_the_wrap() {
        for stamp in [0u32, 1_000, u32::MAX - 1, u32::MAX] {
            for d in 0..=SNAT_CLAIM_JIFFIES {
                assert!(snat_claim_fresh(stamp, stamp.wrapping_add(d)), "{stamp} + {d}");
                assert!(snat_claim_fresh(stamp, stamp.wrapping_sub(d)), "{stamp} - {d}");
            }
            assert!(!snat_claim_fresh(stamp, stamp.wrapping_add(SNAT_CLAIM_JIFFIES + 1)));
            assert!(!snat_claim_fresh(stamp, stamp.wrapping_sub(SNAT_CLAIM_JIFFIES + 1)));
            assert!(!snat_claim_fresh(stamp, stamp.wrapping_add(1 << 31)));
        }
    }

    #[test]
    fn snated_reply_entries_spread_over_the_table() {
        // Every SNAT port of one node address, answered by each of 16 backends: with the
        // destination alone they would take 4,536 sets of 32,768; with the backend mixed in,
        // a fair spread over all of them.
        let sets = 32_768u32;
        let node = 0x0a00_0064u32.to_be();
        let mut hits = vec![0u32; sets as usize];
        for b in 0..16u32 {
            for port in SNAT_PORT_MIN..=SNAT_PORT_MAX {
                let backend = (0x0af4_0200 + b).to_be();
                let h = ct_set_hash(backend, node, 8080u16.to_be(), port.to_be(), PROTO_TCP, CT_DIR_REPLY);
                hits[select_slot(h, sets) as usize] += 1;
            }
        }
        // 72,576 entries, 2.2 per set on average.
        let used = hits.iter().filter(|h| **h > 0).count();
        assert!(used > 28_000, "{used} sets used");
        assert!(hits.iter().all(|h| *h <= 14), "{:?}", hits.iter().max());
        // A reply key outside the SNAT range is placed by its destination alone.
        let a = ct_set_hash(1, 2, 3, 40_000u16.to_be(), PROTO_TCP, CT_DIR_REPLY);
        assert_eq!(a, ct_set_hash(7, 2, 9, 40_000u16.to_be(), PROTO_TCP, CT_DIR_REPLY));
    }

    /// The forward and reply keys of one flow, not SNATed (client -> ClusterIP -> backend).
    fn flow_keys() -> (CtKey4, CtKey4) {
        let (client, vip, backend) = (0x0a00_0001u32, 0x0a60_000au32, 0x0af4_010bu32);
        let fwd =
            CtKey4 { src: client, dst: vip, sport: 40_000, dport: 80, proto: PROTO_TCP, dir: CT_DIR_FORWARD, _pad: 0 };
        let rep = CtKey4 {
            src: backend,
            dst: client,
            sport: 8080,
            dport: 40_000,
            proto: PROTO_TCP,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        (fwd, rep)
    }

    #[test]
    fn a_flows_two_entries_share_a_set_and_its_reply_never_evicts_its_forward_entry() {
        let (fwd, rep) = flow_keys();
        let hash = |k: &CtKey4| ct_set_hash(k.src, k.dst, k.sport, k.dport, k.proto, k.dir);
        assert_eq!(hash(&fwd), hash(&rep));
        // A full set of live entries all seen now (a flood within one jiffy): wherever the
        // forward entry goes, its reply entry goes elsewhere, whatever the hash.
        for h in 0..8u32 {
            let mut ways = [CtWay4::default(); CT_WAYS];
            for (i, w) in ways.iter_mut().enumerate() {
                w.key = CtKey4 { src: 100 + i as u32, proto: PROTO_TCP, ..fwd };
                w.value.last_seen = 7;
            }
            let (f, evicted) = ct_set_victim(|i| ways.get(i), &fwd, h, 7, |_| false).unwrap();
            assert!(evicted);
            ways[f].key = fwd;
            let (r, _) = ct_set_victim(|i| ways.get(i), &rep, h, 7, |_| false).unwrap();
            assert_ne!(r, f, "hash {h}: the reply entry took its forward entry's way");
        }
    }

    #[test]
    fn an_entry_written_alone_never_pushes_out_the_way_it_is_told_to_avoid() {
        let (fwd, rep) = flow_keys();
        for h in 0..8u32 {
            // The forward entry took the set's one free way, which the hash makes one of the
            // reply entry's two candidates; every other way is live and seen this jiffy.
            let taken = (h as usize + CT_DIR_REPLY as usize) % CT_WAYS;
            let mut ways = [CtWay4::default(); CT_WAYS];
            for (i, w) in ways.iter_mut().enumerate() {
                w.key = CtKey4 { src: 100 + i as u32, ..fwd };
                w.value.last_seen = 7;
            }
            ways[taken].key = fwd;
            let victim = |avoid| ct_set_victim_by(|i| ways.get(i), &rep, h, 7, |_| false, ct_key_eq, avoid).unwrap();
            // Without the way to avoid, the tie goes against the forward entry: the case the
            // parameter is for.
            assert_eq!(victim(CT_WAYS), (taken, true), "hash {h}");
            let (r, evicted) = victim(taken);
            assert!(evicted);
            assert_ne!(r, taken, "hash {h}: the reply entry pushed out its forward entry");
            assert_eq!(r, (taken + CT_WAYS / 2) % CT_WAYS, "hash {h}: the reply's other candidate");
            // A way to avoid that is not a candidate changes nothing.
            assert_eq!(victim((taken + 1) % CT_WAYS), (taken, true), "hash {h}");
        }
    }

    #[test]
    fn a_new_flows_pair_of_ways_keeps_its_own_takes_free_ones_then_evicts_apart() {
        let fwd = CtKey4 { src: 1, dst: 2, sport: 3, dport: 4, proto: PROTO_TCP, dir: CT_DIR_FORWARD, _pad: 0 };
        let rep = CtKey4 { src: 5, dst: 1, sport: 6, dport: 3, proto: PROTO_TCP, dir: CT_DIR_REPLY, _pad: 0 };
        let never = |_: &CtValue4| false;
        let pair = |w: &[CtWay4; CT_WAYS], hash, stale: &dyn Fn(&CtValue4) -> bool| {
            ct_set_pair(|i| w.get(i), &fwd, &rep, hash, 100, stale).unwrap()
        };
        let empty = [CtWay4::default(); CT_WAYS];
        assert_eq!(pair(&empty, 0, &never), [(0, false), (1, false)]);
        let mut set = [CtWay4::default(); CT_WAYS];
        for (i, w) in set.iter_mut().enumerate() {
            *w = way(10 + i as u32, 50 + i as u32);
        }
        // Full of live entries: each direction gives up the older of its own two candidates.
        assert_eq!(pair(&set, 0, &never), [(0, true), (1, true)]);
        assert_eq!(pair(&set, 1, &never), [(1, true), (0, true)]);
        // An expired way goes to the forward entry; the reply entry evicts.
        assert_eq!(pair(&set, 0, &|v| v.last_seen == 53), [(3, false), (1, true)]);
        // A free way that is one of the reply's candidates, taken by the forward entry: the
        // reply entry evicts its other candidate, not the forward entry just placed.
        set[1].key.proto = 0;
        assert_eq!(pair(&set, 0, &never), [(1, false), (3, true)]);
        // Own ways are kept, and the other entry never takes one.
        set[1] = CtWay { key: rep, value: CtValue { last_seen: 1, ..Default::default() } };
        assert_eq!(pair(&set, 1, &never), [(3, true), (1, false)]);
        set[2] = CtWay { key: fwd, value: CtValue { last_seen: 1, ..Default::default() } };
        assert_eq!(pair(&set, 0, &never), [(2, false), (1, false)]);

        // Every mix of own, free, expired and live ways, and every hash: two different ways,
        // own ones kept, no live entry pushed out while a free way is left, and `true` exactly
        // for a live entry of another flow.
        for mix in 0..(5u32.pow(CT_WAYS as u32)) {
            let mut set = [CtWay4::default(); CT_WAYS];
            let mut kinds = [0u32; CT_WAYS];
            let (mut m, mut has_fwd, mut has_rep) = (mix, false, false);
            for (i, w) in set.iter_mut().enumerate() {
                kinds[i] = m % 5;
                m /= 5;
                *w = match kinds[i] {
                    0 => CtWay4::default(),
                    1 if !has_fwd => {
                        has_fwd = true;
                        CtWay { key: fwd, ..way(0, 60) }
                    }
                    2 if !has_rep => {
                        has_rep = true;
                        CtWay { key: rep, ..way(0, 60) }
                    }
                    3 => way(200 + i as u32, 0),
                    _ => way(300 + i as u32, 40 + 7 * i as u32),
                };
                if matches!(kinds[i], 1 | 2) && w.key != fwd && w.key != rep {
                    *w = way(300 + i as u32, 40 + 7 * i as u32);
                    kinds[i] = 4;
                }
            }
            let free_ways: Vec<usize> = (0..CT_WAYS).filter(|&i| kinds[i] == 0 || kinds[i] == 3).collect();
            // Own entries both fresh and expired: an expired own way is still the entry's own.
            for own_stale in [false, true] {
                let mut set = set;
                for (i, w) in set.iter_mut().enumerate() {
                    if own_stale && matches!(kinds[i], 1 | 2) {
                        w.value.last_seen = 0;
                    }
                }
                let stale = |v: &CtValue4| v.last_seen == 0;
                for hash in 0..8 {
                    let at = format!("mix {kinds:?} own stale {own_stale} hash {hash}");
                    let [(f, fe), (r, re)] = pair(&set, hash, &stale);
                    assert_ne!(f, r, "{at}");
                    assert_eq!(has_fwd, set[f].key == fwd, "{at}");
                    assert_eq!(has_rep, set[r].key == rep, "{at}");
                    for (w, evicted, dir) in [(f, fe, CT_DIR_FORWARD), (r, re, CT_DIR_REPLY)] {
                        assert_eq!(evicted, kinds[w] == 4, "{at} way {w}");
                        if evicted {
                            // Only one of its direction's two candidates.
                            assert_eq!((w + CT_WAYS - (hash as usize + dir as usize) % CT_WAYS) % 2, 0, "{at} way {w}");
                        }
                    }
                    // Free ways in order: the first to the forward entry, the next to the reply.
                    let mut free = free_ways.iter();
                    if !has_fwd && !fe {
                        assert_eq!(Some(&f), free.next(), "{at}");
                    }
                    if !has_rep && !re {
                        assert_eq!(Some(&r), free.find(|&&w| w != f), "{at}");
                    }
                    let needed = [has_fwd, has_rep].iter().filter(|&&own| !own).count();
                    let evictions = [fe, re].iter().filter(|&&e| e).count();
                    assert_eq!(evictions, needed.saturating_sub(free_ways.len()), "{at}");
                }
            }
        }

        // A key written twice (two CPUs at once): its first copy is its own, as lookups read.
        let mut set = [CtWay4::default(); CT_WAYS];
        set[1] = CtWay { key: fwd, ..way(0, 60) };
        set[3] = CtWay { key: fwd, ..way(0, 60) };
        set[2] = CtWay { key: rep, ..way(0, 60) };
        set[0] = CtWay { key: rep, ..way(0, 60) };
        assert_eq!(pair(&set, 0, &never), [(1, false), (0, false)]);
    }

    #[test]
    fn live_stamps_count_in_any_generation_and_only_whole() {
        let ip = |a: u8, b: u8, c: u8, d: u8| u32::from_ne_bytes([a, b, c, d]);
        let (mut pairs, mut same_word) = (0, 0);
        for i in 0..10_000u32 {
            let places = ct_live_place(ip(10, 244, (i >> 8) as u8, i as u8), ip(10, 96, 0, 10), 80, 80, 6, 1000);
            same_word += (places[0].0 == places[1].0) as u32;
            for (w, mask) in places {
                assert!((1..=1000).contains(&w), "word {w} outside the words of stamps");
                assert_eq!(mask & ct_live_generation(0), mask, "generation 0's bits");
                pairs += (mask.count_ones() == 2) as u32;
                for g in 0..3u64 {
                    let bits = ct_live_stamp(mask, g);
                    assert!(ct_live_present(bits, mask), "a key's own stamp");
                    assert_eq!(bits & ct_live_generation(g), bits, "its generation's bits");
                    assert_eq!(bits & (ct_live_generation(g + 1) | ct_live_generation(g + 2)), 0, "not another's");
                    // A bit short of a stamp, or made up with another generation's bit, is none.
                    for b in 0..64 {
                        if bits >> b & 1 == 1 && mask.count_ones() == 2 {
                            let short = bits & !(1 << b);
                            assert!(!ct_live_present(short, mask));
                            for other in [b + 1, b + 2].map(|o| if o / 3 == b / 3 { o } else { o - 3 }) {
                                assert!(!ct_live_present(short | 1 << other, mask));
                            }
                        }
                    }
                }
            }
        }
        // The two positions of a word coincide about once in 21; a key's two words, once in
        // 1,000 here.
        assert!(pairs > 2 * 9_300, "{pairs} of 20,000 words of 10,000 keys with two bits");
        assert!(same_word < 40, "{same_word} of 10,000 keys with one word twice");
        let all = [0, 1, 2].map(ct_live_generation);
        assert_eq!(all[0] | all[1] | all[2], u64::MAX >> 1);
        assert_eq!(all[0] & all[1] | all[1] & all[2] | all[0] & all[2], 0);
    }

    #[test]
    fn live_stamps_of_absent_keys_rarely_count() {
        // A full default table's forward keys (131,072) in its words (65,536), clients of one
        // subnet on a few ports each, as the flow cache's test has them; then other clients'
        // keys. A stamp of one position would let about 9% through, two positions of one word
        // about 3.8%, two in each of two words about 1.2%.
        let ip = |a: u8, b: u8, c: u8, d: u8| u32::from_ne_bytes([a, b, c, d]);
        let (dst, words) = (ip(10, 96, 0, 20), 65_536u32);
        let mut table = std::vec![0u64; words as usize + 1];
        for i in 0..16_384u32 {
            for j in 0..8u16 {
                let places = ct_live_place(
                    ip(10, 244, (i >> 8) as u8, i as u8),
                    dst,
                    (40_000 + j).to_be(),
                    80u16.to_be(),
                    6,
                    words,
                );
                for (w, mask) in places {
                    table[w as usize] |= ct_live_stamp(mask, 1);
                }
            }
        }
        let (mut first, mut counted) = (0, 0);
        for i in 0..100_000u32 {
            let sport = (50_000 + (i >> 16) as u16).to_be();
            let places = ct_live_place(ip(10, 250, (i >> 8) as u8, i as u8), dst, sport, 80u16.to_be(), 6, words);
            let mut reads = 0;
            counted += ct_live_counts(places, |w| {
                reads += 1;
                Some(table[w as usize])
            }) as u32;
            first += (reads == 2) as u32;
        }
        // About one in 9 reads the second word, and one in 80 counts (one word: one in 25).
        assert!(first < 14_000, "{first} of 100,000 absent keys read a second word");
        assert!(counted < 2_000, "{counted} of 100,000 absent keys counted as stamped");
    }

    #[test]
    fn cache_slots_spread_clients_ports_and_addresses() {
        // One client's sequential ports, then sequential clients on one port, to a ClusterIP
        // (ports and addresses in network order, as the datapath hashes them).
        let slots = 1000;
        for by_address in [false, true] {
            let mut hits = vec![0u32; slots as usize];
            for i in 0..100_000u32 {
                let (src, sport) = if by_address {
                    ((0x0a00_0000 + i).to_be(), 40000u16.to_be())
                } else {
                    (0x0a00_0001u32.to_be(), (i as u16).to_be())
                };
                hits[ct_cache_slot(src, 0x0a60_000au32.to_be(), sport, 80u16.to_be(), PROTO_TCP, slots) as usize] += 1;
            }
            // 100 per slot on average: every slot within a few deviations.
            assert!(
                hits.iter().all(|h| (50..160).contains(h)),
                "{by_address}: {:?}",
                (hits.iter().min(), hits.iter().max())
            );
        }
        let base = ct_cache_slot(1, 2, 3, 4, PROTO_TCP, u32::MAX);
        for other in [
            ct_cache_slot(9, 2, 3, 4, PROTO_TCP, u32::MAX),
            ct_cache_slot(1, 9, 3, 4, PROTO_TCP, u32::MAX),
            ct_cache_slot(1, 2, 9, 4, PROTO_TCP, u32::MAX),
            ct_cache_slot(1, 2, 3, 9, PROTO_TCP, u32::MAX),
            ct_cache_slot(1, 2, 3, 4, PROTO_UDP, u32::MAX),
        ] {
            assert_ne!(base, other);
        }
    }

    /// Clients of one subnet, each on several ports, as many connections look at once: about
    /// as many keys have a slot to themselves as a random choice of slots gives.
    #[test]
    fn cache_slots_spread_clients_times_ports() {
        let ip = |a: u8, b: u8, c: u8, d: u8| u32::from_ne_bytes([a, b, c, d]);
        let dst = ip(10, 96, 0, 20);
        let patterns: [(&str, Vec<(u32, u16)>); 3] = [
            (
                "4096 clients of a /16, 8 ports each",
                (0..4096u32)
                    .flat_map(|i| (0..8u16).map(move |j| (ip(10, 244, (i >> 8) as u8, i as u8), (40_000 + j).to_be())))
                    .collect(),
            ),
            (
                "256 clients of a /24, 128 ports each",
                (0..256u32)
                    .flat_map(|i| (0..128u16).map(move |j| (ip(10, 244, 1, i as u8), (33_000 + 7 * j).to_be())))
                    .collect(),
            ),
            (
                "16384 clients of a /18, 2 ports each",
                (0..32768u32)
                    .map(|c| (ip(10, 130, ((c & 0x3fff) >> 8) as u8, c as u8), (20_000 + (c >> 14) as u16).to_be()))
                    .collect(),
            ),
        ];
        for slots in [131_072u32, 1 << 21] {
            for (what, keys) in &patterns {
                let mut hits = std::collections::HashMap::new();
                for (src, sport) in keys {
                    *hits.entry(ct_cache_slot(*src, dst, *sport, 80u16.to_be(), PROTO_TCP, slots)).or_insert(0u32) += 1;
                }
                let alone = hits.values().filter(|n| **n == 1).count() as f64 / keys.len() as f64;
                // A random choice: each of the other keys misses a key's slot with 1 - 1/slots.
                let random = (1.0 - 1.0 / slots as f64).powi(keys.len() as i32 - 1);
                assert!(alone > random - 0.04, "{what}, {slots} slots: {alone:.3} alone, a random choice {random:.3}");
            }
        }
    }

    /// The backend choice: one client's sequential ports, and many clients on one port, spread
    /// evenly over a Maglev-sized table's slots (grouped as a table's backends hold them) and
    /// over small tables.
    #[test]
    fn select_hash_spreads_ports_and_clients() {
        for by_address in [false, true] {
            for (size, groups) in [(65_537u32, 61u32), (61, 61), (3, 3)] {
                let mut hits = vec![0u32; groups as usize];
                for i in 0..61_000u32 {
                    let (src, sport) = if by_address {
                        ((0x0a00_0000 + i).to_be(), 40000u16.to_be())
                    } else {
                        (0x0a00_0001u32.to_be(), (i as u16).wrapping_add(4000).to_be())
                    };
                    let h = select_hash(src, 0x0a60_000au32.to_be(), sport, 80u16.to_be(), PROTO_TCP);
                    let slot = select_slot(h, size);
                    assert!(slot < size);
                    hits[(slot % groups) as usize] += 1;
                }
                // 61,000 / groups on average: every group within a few deviations.
                let mean = 61_000 / groups;
                let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
                assert!(
                    *min as f64 > mean as f64 * 0.88 && (*max as f64) < mean as f64 * 1.12,
                    "{by_address} {size}: {min}..{max} around {mean}"
                );
            }
        }
        let base = select_hash(1, 2, 3, 4, PROTO_TCP);
        for other in [
            select_hash(9, 2, 3, 4, PROTO_TCP),
            select_hash(1, 9, 3, 4, PROTO_TCP),
            select_hash(1, 2, 9, 4, PROTO_TCP),
            select_hash(1, 2, 3, 9, PROTO_TCP),
            select_hash(1, 2, 3, 4, PROTO_UDP),
        ] {
            assert_ne!(base, other);
        }
    }

    /// Every input bit moves each of the high 16 bits of `select_hash` (what `select_slot`
    /// reads for a table of up to 65,537 slots) in about half of random tuples (4,000: one
    /// standard deviation is 0.008): a field mixed only into the high bits of a product, or a
    /// missing fold, leaves some flipping far less.
    #[test]
    fn select_hash_avalanches_into_its_high_bits() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let tuples: Vec<(u32, u32, u16, u16, u8)> = (0..4000)
            .map(|_| {
                let (r, q) = (next(), next());
                (r as u32, (r >> 32) as u32, q as u16, (q >> 16) as u16, (q >> 32) as u8)
            })
            .collect();
        // Input bits: src 0-31, dst 32-63, sport 64-79, dport 80-95, proto 96-103.
        for bit in 0..104 {
            let mut flips = [0u32; 16];
            for &(src, dst, sport, dport, proto) in &tuples {
                let flip = |v: u64, at: u32| v ^ (1u64 << (bit - at));
                let (s2, d2, sp2, dp2, p2) = match bit {
                    0..32 => (flip(src as u64, 0) as u32, dst, sport, dport, proto),
                    32..64 => (src, flip(dst as u64, 32) as u32, sport, dport, proto),
                    64..80 => (src, dst, flip(sport as u64, 64) as u16, dport, proto),
                    80..96 => (src, dst, sport, flip(dport as u64, 80) as u16, proto),
                    _ => (src, dst, sport, dport, flip(proto as u64, 96) as u8),
                };
                let d = select_hash(src, dst, sport, dport, proto) ^ select_hash(s2, d2, sp2, dp2, p2);
                for (o, f) in flips.iter_mut().enumerate() {
                    *f += d >> (31 - o) & 1;
                }
            }
            // The protocol's top bits sit highest in their product and mix a little less
            // (0.4 to 0.57 here); they tell no two protocols lb tracks apart but SCTP's.
            let bounds = if bit < 102 { 0.44..0.56 } else { 0.35..0.65 };
            for (o, &f) in flips.iter().enumerate() {
                let share = f as f64 / tuples.len() as f64;
                assert!(bounds.contains(&share), "input bit {bit}, output bit {}: {share}", 31 - o);
            }
        }
    }

    #[test]
    fn filter_bit_spreads_service_sets_and_misses_other_traffic() {
        let ip = |a: u8, b: u8, c: u8, d: u8| u32::from_ne_bytes([a, b, c, d]);
        let tcp = |addr, port: u16| filter_bit(addr, port.to_be(), PROTO_TCP);
        // 10,000 ClusterIPs in a row, ports 80 and 443; three node addresses, 5,000 node ports.
        let mut set = std::collections::HashSet::new();
        for port in [80, 443] {
            let bits: std::collections::HashSet<u32> =
                (0..10_000u32).map(|i| tcp(ip(10, 96, (i >> 8) as u8, i as u8), port)).collect();
            assert_eq!(bits.len(), 10_000, "port {port}: ClusterIPs that differ in the address share a bit");
            set.extend(bits);
        }
        for node in [ip(192, 168, 49, 2), ip(192, 168, 49, 3), ip(10, 244, 1, 1)] {
            set.extend((30_000..35_000).map(|p| tcp(node, p)));
        }
        assert!(set.iter().all(|b| *b < 1 << FILTER_BITS_LOG2));
        let fill = set.len() as f64 / f64::from(1u32 << FILTER_BITS_LOG2);
        assert!(set.len() > 34_000, "{}", set.len());
        // Traffic to no frontend: pods on their ports, the node's own ports, UDP to the same
        // ClusterIPs, and pseudo-random addresses and ports.
        let mut probes = Vec::new();
        for i in 0..20_000u32 {
            probes.push(tcp(ip(10, 244, (i >> 8) as u8, i as u8), 8080));
            probes.push(filter_bit(ip(10, 96, (i >> 8) as u8, i as u8), 80u16.to_be(), PROTO_UDP));
        }
        for p in 1..20_000 {
            probes.push(tcp(ip(192, 168, 49, 2), p));
        }
        let mut x = 0x1234_5678u64;
        for _ in 0..40_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            probes.push(tcp((x >> 32) as u32, (x >> 16) as u16));
        }
        let hits = probes.iter().filter(|b| set.contains(b)).count() as f64 / probes.len() as f64;
        assert!(
            hits < 2.0 * fill,
            "other traffic meets a set bit {hits:.4} of the time, the bitmap's fill is {fill:.4}"
        );
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = flow_hash(1, 2, 3, 4, PROTO_TCP);
        assert_ne!(base, flow_hash(9, 2, 3, 4, PROTO_TCP));
        assert_ne!(base, flow_hash(1, 9, 3, 4, PROTO_TCP));
        assert_ne!(base, flow_hash(1, 2, 9, 4, PROTO_TCP));
        assert_ne!(base, flow_hash(1, 2, 3, 9, PROTO_TCP));
        assert_ne!(base, flow_hash(1, 2, 3, 4, PROTO_UDP));
    }
}
