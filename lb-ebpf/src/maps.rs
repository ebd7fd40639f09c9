//! Every map of the datapath, declared once. All are pinned by name so a restarted agent adopts
//! them (and the flows in them) instead of starting empty.
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendMemberKey, CtCacheSlot4, CtKey4, CtKey6, CtValue4, CtValue6, CtWay4,
    CtWay6, FragKey, FragValue, LocalSourceData, NodeAddrKey, ServiceKey, ServiceName, ServiceStats, ServiceValue,
    SockRevKey, SockRevValue, SourceRangeData, AFFINITY_MAX_ENTRIES, BACKENDS_MAX_ENTRIES, BACKEND_MEMBERS_MAX_ENTRIES,
    CONNTRACK_MAX_ENTRIES, CONNTRACK_NEW_MAX_ENTRIES, COUNTER_MAX, FRAGMENTS_MAX_ENTRIES, LOCAL_SOURCES_MAX_ENTRIES,
    MAGLEV_MAX_ENTRIES, NODE_ADDRS_MAX_ENTRIES, SERVICES_MAX_ENTRIES, SERVICE_NAMES_MAX_ENTRIES,
    SOCK_REVNAT_MAX_ENTRIES, SOURCE_RANGES_MAX_ENTRIES, XDP_TARGETS_MAX_ENTRIES,
};

/// Service frontends (address, port, protocol) -> id, backend count and live slot generation.
/// Written only by the agent, so no preallocation: memory follows the number of services.
#[map(name = "LB_SERVICES")]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Every frontend's Maglev table, back to back: slot -> backend id, two u32 slots to a u64
/// element (an array stores every element in 8 bytes, so u32 elements would waste half), slot
/// `s` in element `s / 2`, low half first (the agent's mmap sees plain u32s on little-endian
/// hosts). An array, so selection is two inlined loads (this and `LB_BACKENDS`) instead of a
/// hash lookup; mmapable, so the agent writes a table of thousands of slots with plain stores
/// instead of a syscall per slot.
#[map(name = "LB_MAGLEV")]
pub static LB_MAGLEV: Array<u64> = Array::pinned(MAGLEV_MAX_ENTRIES / 2, BPF_F_MMAPABLE);

/// Backend id -> backend (address, port, flags), shared by every table that names it.
#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: Array<Backend> = Array::pinned(BACKENDS_MAX_ENTRIES, 0);

/// (service id, backend) -> 1: is this backend still in the service's current set? Read only
/// when an affinity pin predates the service's generation.
#[map(name = "LB_BACKEND_MEMBERS")]
pub static LB_BACKEND_MEMBERS: HashMap<BackendMemberKey, u32> =
    HashMap::pinned(BACKEND_MEMBERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// (client address, service id) -> pinned backend, for `sessionAffinity: ClientIP`. LRU: a
/// flood of distinct clients evicts the oldest pins and never fails a new connection.
#[map(name = "LB_AFFINITY")]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Assured IPv4 flows, both directions: preallocated (no allocation on insert) and never
/// evicted, so a flood of new flows cannot push a live connection out (`conntrack.rs`).
#[map(name = "LB_CT4")]
pub static LB_CT4: HashMap<CtKey4, CtValue4> = HashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

/// New and finished IPv4 flows, both directions: a set-associative array (`ct_table.rs`),
/// sized by the agent in whole sets of `CT_WAYS`. A new flow's entries take free ways, or push
/// out a live entry of a full set: only flows not yet (or no longer) assured are ever pushed
/// out. Mmapable, so the agent walks it in memory (`dataplane/ct_new.rs`).
#[map(name = "LB_CT4_NEW")]
pub static LB_CT4_NEW: Array<CtWay4> = Array::pinned(CONNTRACK_NEW_MAX_ENTRIES, BPF_F_MMAPABLE);

/// Copies of established IPv4 flows' entries, read before `LB_CT4` (`ct_cache.rs`), a slot
/// for every other entry `LB_CT4` has room for (the agent sizes both), in pairs. Not pinned: it
/// holds nothing the assured table does not, and a fresh one fills from it as packets come.
/// Mmapable only for the page-aligned elements that gives (`CtCacheSlot4`).
#[map(name = "LB_CT4_CACHE")]
pub static LB_CT4_CACHE: Array<CtCacheSlot4> = Array::with_max_entries(CONNTRACK_MAX_ENTRIES / 2, BPF_F_MMAPABLE);

/// Stamps of the forward keys that may be in `LB_CT4` or `LB_CT6` (`ct_live.rs`; one map for
/// both families, named for the first): a generation word, then a word of stamps per
/// `CT_LIVE_ENTRIES_PER_WORD` entries of `LB_CT4` (the agent sizes both). Mmapable: the agent
/// clears generations and stamps a walk's keys with atomic operations on its mapping, which
/// cannot undo a stamp the datapath ORs into the same word meanwhile, and fills a new map's
/// bits at once. Not pinned: the agent stamps every live flow into a new one when it loads.
#[map(name = "LB_CT4_LIVE")]
pub static LB_CT4_LIVE: Array<u64> =
    Array::with_max_entries(1 + lb_common::ct_live_words(CONNTRACK_MAX_ENTRIES), BPF_F_MMAPABLE);

/// Assured IPv6 flows, as `LB_CT4` (40-byte keys, 52-byte values).
#[map(name = "LB_CT6")]
pub static LB_CT6: HashMap<CtKey6, CtValue6> = HashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

/// New and finished IPv6 flows: an array of ways as `LB_CT4_NEW` (the same number of sets,
/// `CT_NEW_SETS`).
#[map(name = "LB_CT6_NEW")]
pub static LB_CT6_NEW: Array<CtWay6> = Array::pinned(CONNTRACK_NEW_MAX_ENTRIES, BPF_F_MMAPABLE);

/// Verdict and drop-reason counters, indexed by hook (`ctx::HOOK_*`) * COUNTER_MAX +
/// `lb_common::Counter`.
#[map(name = "LB_STATS")]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_MAX * lb_common::HOOKS, 0);

/// Service id -> packets and bytes it received. Sized by the agent to the services map plus
/// one (ids start at 1).
#[map(name = "LB_SERVICE_STATS")]
pub static LB_SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(SERVICES_MAX_ENTRIES + 1, 0);

/// Service id -> readable name, for `lb list`. The datapath never reads it; it lives here so it
/// is pinned beside the maps it describes and survives agent restarts with them.
#[map(name = "LB_SERVICE_NAMES")]
pub static LB_SERVICE_NAMES: HashMap<u32, ServiceName> = HashMap::pinned(SERVICE_NAMES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// The node's own addresses (narrowed by `--nodeport-addresses`): node ports answer on these.
#[map(name = "LB_NODE_ADDRS")]
pub static LB_NODE_ADDRS: HashMap<NodeAddrKey, u32> = HashMap::pinned(NODE_ADDRS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// `loadBalancerSourceRanges`: (service id, client prefix) -> allowed.
#[map(name = "LB_SOURCE_RANGES")]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRangeData, u8> = LpmTrie::pinned(SOURCE_RANGES_MAX_ENTRIES, 0);

/// Typed key of `LB_SOURCE_RANGES`.
pub type SourceRangeKey = Key<SourceRangeData>;

/// Prefixes whose sources are the cluster's own (pods, the node), for the short-circuit of
/// `externalTrafficPolicy: Local` frontends (`lb_common::SCOPE_FROM_CLUSTER`).
#[map(name = "LB_LOCAL_SOURCES")]
pub static LB_LOCAL_SOURCES: LpmTrie<LocalSourceData, u8> = LpmTrie::pinned(LOCAL_SOURCES_MAX_ENTRIES, 0);

/// Typed key of `LB_LOCAL_SOURCES`.
pub type LocalSourceKey = Key<LocalSourceData>;

/// (socket cookie, backend) -> frontend, for node-local sockets the socket-level programs
/// pointed at a backend. LRU: entries of closed sockets age out.
#[map(name = "LB_SOCK_REVNAT")]
pub static LB_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(SOCK_REVNAT_MAX_ENTRIES, 0);

/// The pre-filter (`lb_common::MAP_FILTER`): a frontend bitmap and a backend bitmap of
/// (address, port, protocol) hashes. Array lookups are inlined by the verifier, so a packet
/// that is none of ours costs two loads and no hash lookup.
#[map(name = "LB_FILTER")]
pub static LB_FILTER: Array<u64> = Array::pinned(2 * lb_common::FILTER_WORDS, 0);

/// `lb_common::MAP_SERVICES_GEN`. Pinned, so that a restarted agent's changes reach the
/// copies its predecessor's programs hold until the link swap replaces them.
#[map(name = "LB_SERVICES_GEN")]
pub static LB_SERVICES_GEN: Array<u32> = Array::pinned(1, 0);

/// Interfaces whose driver transmits native XDP frames (`ndo_xdp_xmit`): ifindex -> 1. A veth
/// without GRO or an XDP program on its peer drops `XDP_TX` and redirected frames (the peer has
/// no NAPI to receive them, `veth_xdp_xmit`), so XDP sends only to interfaces listed here and
/// leaves other packets to tc. Written by the agent from the kernel's `xdp-features`.
#[map(name = "LB_XDP_TARGETS")]
pub static LB_XDP_TARGETS: HashMap<u32, u32> = HashMap::pinned(XDP_TARGETS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// SNAT ports claimed at this instant (`lb_common::MAP_SNAT_CLAIMS`). Pinned, so a restarted
/// agent's programs and its predecessor's, both running for the moment of the link swap,
/// claim from one set.
#[map(name = "LB_SNAT_CLAIMS")]
pub static LB_SNAT_CLAIMS: Array<u64> = Array::pinned(lb_common::SNAT_CLAIM_SLOTS, 0);

/// Fragmented datagrams in flight: later fragments carry no ports, so the first fragment
/// records them here and the rest are translated as their flow. LRU: a lost last fragment
/// leaves an entry that ages out.
#[map(name = "LB_FRAGMENTS")]
pub static LB_FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(FRAGMENTS_MAX_ENTRIES, 0);

/// The tc IPv6 programs, tail-called by the IPv4 ones for IPv6 frames (`lb_common::TAIL_TC_*`).
/// A program array serves one program type, so XDP has its own (`LB_TAILS_XDP`). Filled by
/// the agent when it loads the programs, left empty when it runs without IPv6. Pinned, per
/// load under a name of its own (the agent's `STAGE_TABLES`, in its load.rs, says why): the kernel empties
/// a program array once no file descriptor or pin holds it (breaking program/map cycles), and
/// the programs must keep their IPv6 half after the agent exits.
#[map(name = "LB_TAILS_TC")]
pub static LB_TAILS_TC: ProgramArray = ProgramArray::pinned(lb_common::TAILS_TC, 0);

/// The XDP program's IPv6 stages (`lb_common::TAIL_XDP*`), as `LB_TAILS_TC`.
#[map(name = "LB_TAILS_XDP")]
pub static LB_TAILS_XDP: ProgramArray = ProgramArray::pinned(5, 0);

/// IPv4's new-flow stage at tc (`lb_common::PROG_TC_NEW4`), and the tc ingress program for
/// `lb_tc_ingress_l3` (`lb_common::TAIL4_TC_*`); filled whether or not IPv6 is, and pinned per
/// load as the arrays above are.
#[map(name = "LB_TAILS4_TC")]
pub static LB_TAILS4_TC: ProgramArray = ProgramArray::pinned(lb_common::TAILS4_TC, 0);

/// IPv4's new-flow stage at XDP, as `LB_TAILS4_TC`.
#[map(name = "LB_TAILS4_XDP")]
pub static LB_TAILS4_XDP: ProgramArray = ProgramArray::pinned(1, 0);

/// Room for IPv6's large temporaries: a flow's conntrack key and entry and its peer's (184
/// bytes), and an ICMPv6 error's parse handed from the dispatcher to the ICMP stage; at
/// XDP, which has no control block, the note the stages of one packet pass along; and the
/// frontend IPv4's pipeline hands to its new-flow stage, and the last one it found. The
/// verifier's 512-byte stack, shared by a stage and the subprograms it calls, cannot hold
/// them beside the rest of a stage. One slot per CPU: a program runs to its end on its CPU
/// (tc and XDP in softirq, or with bottom halves off on the output path), and a tail call
/// stays on it, so no two uses of a slot overlap. Cilium keeps its large temporaries in
/// per-CPU maps for the same reason. Not pinned: all it carries from one packet to the next
/// is that frontend, taken only while `LB_SERVICES_GEN` is unchanged.
#[map(name = "LB_SCRATCH6")]
pub static LB_SCRATCH6: PerCpuArray<Scratch<[u32; 4]>> = PerCpuArray::with_max_entries(1, 0);

/// See `LB_SCRATCH6`.
#[repr(C)]
pub struct Scratch<A> {
    pub key: lb_common::CtKey<A>,
    pub value: lb_common::CtValue<A>,
    pub peer_key: lb_common::CtKey<A>,
    pub peer_value: lb_common::CtValue<A>,
    pub icmp: crate::parse::IcmpError<A>,
    /// `ctx::Packet::note` at XDP.
    pub note: u32,
    /// The frontend IPv4's pipeline found for a new flow, handed to its new-flow stage
    /// (`service::hand_over`), and what it was found for (destination, source, then port,
    /// protocol and node-port bit).
    pub svc: ServiceValue,
    pub svc_for: [u32; 3],
    /// The frontend IPv4's pipeline last found on this CPU (`service::lookup_cached`), and
    /// what for: destination, then port, protocol, node-port bit and a bit no empty slot has,
    /// then `LB_SERVICES_GEN` as it was read before the lookup.
    pub fe: ServiceValue,
    pub fe_for: [u32; 3],
    /// The forward key of a SNATed flow whose reply entry a new-flow table insert pushes out
    /// (`ct_table.rs`, `write`).
    pub evicted_key: lb_common::CtKey<A>,
}
