//! The BPF side of the agent: loads the programs with maps pinned under the pin directory,
//! adopts whatever a previous agent left there, applies desired state as a difference, and
//! attaches the programs to interfaces with pinned links so traffic keeps flowing while no
//! agent runs.
//!
//! - `maps`: the typed maps and how model values are encoded into them;
//! - `layout`: checks of maps a previous agent pinned, and migration of flow maps;
//! - `load`: loading the programs and adopting the pinned state;
//! - `apply`: desired state written as a difference, slot generations and their grace;
//! - `clock`: the kernel's jiffies, the conntrack clock;
//! - `conntrack`: both conntrack tables as one, collection of idle flows, older layouts;
//! - `live`: the stamps of live IPv4 flows a SYN reads before the assured table;
//! - `stale_udp`: UDP flows and sockets to departed backends;
//! - `attach`: interfaces, links, node addresses;
//! - `sys`: system calls the rest needs (bpffs, addresses, interfaces).
mod apply;
mod attach;
pub mod clock;
pub mod conntrack;
pub mod ct_new;
mod filter;
mod layout;
mod live;
mod load;
mod maps;
mod pin_lock;
mod stale_udp;
mod sys;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
};

use aya::{
    maps::MapError,
    programs::{links::PinnedLink, SchedClassifier, Xdp},
    Ebpf,
};
use lb_common::{PROG_BENCH_EMPTY_TC, PROG_BENCH_EMPTY_XDP, PROG_TC_INGRESS, PROG_XDP};

pub use apply::{ApplyReport, SLOT_GRACE};
pub use attach::{cgroup2_mount, interface_wanted, link_pin_name, Hook};
pub use load::ensure_pin_dir;
pub use maps::{
    addr_words, backend_value, decode_name, endpoint_of, frontend_of, ip_of, ipv4, service_key, Maps,
    SCOPE_FROM_CLUSTER,
};
pub use pin_lock::{cleanup, PinDirLock};
pub use sys::{
    error_chain, interfaces, local_addresses, local_ipv4_addresses, local_ipv4_by_interface, local_ipv6_by_interface,
    node_port_address,
};

use crate::model::{Cidr, Frontend};
use apply::{Programmed, Retired};
use layout::Migration;

pub(super) const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not on a bpf filesystem; mount one there (mount -t bpf bpf {path}) or pick another --pin-dir")]
    NotBpffs { path: PathBuf },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("program {name}: {source}")]
    ProgramLoad { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {name} is missing from the object or the pin directory")]
    MissingMap { name: &'static str },
    #[error("map {name} is full ({capacity} entries); {what} was not programmed")]
    MapFull { name: &'static str, capacity: u32, what: String },
    #[error("interface {iface}: {what}: {detail}")]
    Link { iface: String, what: &'static str, detail: String },
    #[error("conntrack clock: {0}")]
    Clock(#[from] clock::ClockError),
    #[error(
        "pinned map {path} holds live flows in another layout ({found}; this lb needs {wanted}), \
         and carrying them over is not supported: refusing to start rather than drop them. Start \
         this lb with the sizes the running one used, or drain the node and run `lb cleanup --pin-dir {pin_dir}`"
    )]
    FlowLayout { path: PathBuf, found: String, wanted: String, pin_dir: PathBuf },
    #[error("an agent is running with pin directory {pin_dir} (it holds the directory's lock); stop it first")]
    AgentRunning { pin_dir: PathBuf },
}

pub(super) type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Map capacities (entries), set when the maps are created. Pinned maps keep the size they were
/// created with.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Service frontends (also sizes the names map).
    pub services: u32,
    /// Distinct backends (address, port) over all frontends.
    pub backends: u32,
    /// Maglev table slots over all frontends (about 16 per backend of each).
    pub maglev: u32,
    /// Assured conntrack entries (live connections; every flow takes two). Never evicted.
    pub conntrack: u32,
    /// Entries of new and finished flows (a set-associative array, `CT_WAYS` to a set).
    pub conntrack_new: u32,
    /// Session affinity pins.
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: lb_common::SERVICES_MAX_ENTRIES,
            backends: lb_common::BACKENDS_MAX_ENTRIES,
            maglev: lb_common::MAGLEV_MAX_ENTRIES,
            conntrack: lb_common::CONNTRACK_MAX_ENTRIES,
            conntrack_new: lb_common::CONNTRACK_NEW_MAX_ENTRIES,
            affinity: lb_common::AFFINITY_MAX_ENTRIES,
        }
    }
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Per interface: native (driver) mode where the driver transmits native XDP frames (the
    /// kernel's `xdp-features` has `ndo-xmit`), else no XDP there, and tc alone does the work.
    /// Generic XDP would run where tc runs anyway, linearize GSO/GRO skbs and see
    /// CHECKSUM_PARTIAL packets, so it is never the automatic choice.
    #[default]
    Auto,
    /// Driver mode on every XDP interface. Where the driver cannot transmit native frames, the
    /// program leaves packets it would send to tc (it checks `LB_XDP_TARGETS`).
    Native,
    /// Generic (skb) mode on every XDP interface: works on every device, at the cost of an skb
    /// per packet before XDP runs, linearized GRO packets, and CHECKSUM_PARTIAL packets taking
    /// the tc path.
    Generic,
}

/// Everything that shapes the loaded datapath.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub xdp_mode: XdpAttachMode,
    pub timeouts: Timeouts,
    pub sizes: MapSizes,
    /// The address external flows to remote backends are SNATed to; `None` disables that SNAT
    /// (replies from other nodes would then bypass this one).
    pub node_ip: Option<Ipv4Addr>,
    /// The same for IPv6 flows (the datapath's `NODE_IP6`); `None` disables that SNAT.
    pub node_ip6: Option<Ipv6Addr>,
    /// Count packets and bytes per frontend in the datapath (`LB_SERVICE_STATS`); off, the
    /// established path skips that per-CPU array update.
    pub count_per_frontend: bool,
    /// Load the IPv6 programs (tail-called by the IPv4 ones for IPv6 frames); off, IPv6
    /// frames pass untouched. `lb run` turns it on unless `--ipv6 false`; off in the derived
    /// default, which the packet tests of IPv4 use (the IPv6 stages take seconds to verify).
    pub ipv6: bool,
    /// The families `--cluster-cidr` covers: in each, a flow to a ClusterIP from a source
    /// outside the cluster CIDRs (and this node's pod CIDRs, `LB_LOCAL_SOURCES`) is a client
    /// beyond the cluster, SNATed to the node on its way to a remote backend (the datapath's
    /// `SNAT_OFF_CLUSTER`; kube-proxy masquerades it, to local backends too); in the others, not.
    pub cluster_cidr_families: ClusterCidrFamilies,
}

/// Families that have a cluster CIDR (`Config::cluster_cidr_families`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCidrFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl ClusterCidrFamilies {
    pub fn of(cidrs: &[Cidr]) -> Self {
        Self { ipv4: cidrs.iter().any(|c| c.addr.is_ipv4()), ipv6: cidrs.iter().any(|c| c.addr.is_ipv6()) }
    }

    /// The datapath's `SNAT_OFF_CLUSTER`: bit 0 IPv4, bit 1 IPv6.
    pub(crate) fn bits(self) -> u32 {
        u32::from(self.ipv4) | u32::from(self.ipv6) << 1
    }
}

/// Conntrack lifetimes per state, in seconds; the programs get them in jiffies at load time.
/// netfilter's TCP timeouts (`nf_conntrack_proto_tcp.c`), except ESTABLISHED (6 h instead of
/// 5 days; kube-proxy lowers netfilter's to 24 h) and CLOSE_WAIT (as long as FIN_WAIT: a
/// half-closed peer may idle as long as the side that closed).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// SYN_SENT and SYN_RECV.
    pub tcp_syn_s: u64,
    pub tcp_established_s: u64,
    /// FIN_WAIT and CLOSE_WAIT: one side closed.
    pub tcp_fin_wait_s: u64,
    pub tcp_last_ack_s: u64,
    pub tcp_time_wait_s: u64,
    /// CLOSE: after a RST.
    pub tcp_close_s: u64,
    pub udp_s: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_s: 60,
            tcp_established_s: 6 * 3600,
            tcp_fin_wait_s: 120,
            tcp_last_ack_s: 30,
            tcp_time_wait_s: 120,
            tcp_close_s: 10,
            udp_s: 60,
        }
    }
}

impl Timeouts {
    /// Seconds per state, indexed by `lb_common::CT_*`.
    pub fn by_state(&self) -> [u64; lb_common::CT_STATES] {
        use lb_common::*;
        let mut t = [0; CT_STATES];
        t[CT_NONE as usize] = self.tcp_syn_s;
        t[CT_SYN_SENT as usize] = self.tcp_syn_s;
        t[CT_SYN_RECV as usize] = self.tcp_syn_s;
        t[CT_ESTABLISHED as usize] = self.tcp_established_s;
        t[CT_FIN_WAIT as usize] = self.tcp_fin_wait_s;
        t[CT_CLOSE_WAIT as usize] = self.tcp_fin_wait_s;
        t[CT_LAST_ACK as usize] = self.tcp_last_ack_s;
        t[CT_TIME_WAIT as usize] = self.tcp_time_wait_s;
        t[CT_CLOSE as usize] = self.tcp_close_s;
        t[CT_UDP as usize] = self.udp_s;
        t
    }

    /// The same in jiffies.
    pub fn in_jiffies(&self, clock: &clock::Clock) -> [u32; lb_common::CT_STATES] {
        self.by_state().map(|s| clock.to_jiffies(s))
    }
}

/// Owner of the loaded programs and maps. Only one task holds it: every map write goes
/// through `apply`.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    sizes: MapSizes,
    xdp_mode: XdpAttachMode,
    pin_dir: PathBuf,
    programmed: BTreeMap<Frontend, Programmed>,
    /// Ids below `next_id` not in use (their frontend was removed or failed to program). A
    /// removed frontend's id comes back here only with its retired slots, after the grace.
    free_ids: BTreeSet<u32>,
    /// Slot generations no service entry points at any more, oldest first, kept for
    /// `SLOT_GRACE` (see `Retired`).
    retired: VecDeque<Retired>,
    next_id: u32,
    /// Mirror of `LB_FILTER`, with the frontend bits' counts.
    filter: filter::Filter,
    /// The Maglev tables' ranges and the backend ids.
    tables: tables::Tables,
    /// Removes UDP flows to departed backends, one walk at a time.
    sweeper: stale_udp::Sweeper,
    /// (interface, hook) -> (ifindex, pinned link).
    attached: StdHashMap<(String, Hook), (u32, PinnedLink)>,
    /// Last attach error per interface and hook, so a persistent failure is reported once.
    attach_failures: StdHashMap<(String, Hook), String>,
    /// Per interface, whether `Auto` chose native XDP, so a change of choice is logged once.
    xdp_choice: StdHashMap<String, bool>,
    /// Mirror of `LB_XDP_TARGETS`.
    xdp_targets: BTreeSet<u32>,
    /// Flow maps given a new capacity at load, whose old copies are still open.
    migrations: Vec<Migration>,
    /// This load's pins of its stage tables (`load::STAGE_TABLES`).
    stage_pins: [PathBuf; 4],
    /// UDP flows removed because their backend left (by the sweep threads).
    stale_udp_removed: Arc<AtomicU64>,
    /// The conntrack clock, and the lifetimes in its unit.
    clock: Arc<clock::Clock>,
    ct_timeouts: [u32; lb_common::CT_STATES],
    /// Idle assured flows removed by the collector thread, which runs until `ct_gc_stop`.
    ct_collected: Arc<AtomicU64>,
    ct_gc_stop: Arc<std::sync::atomic::AtomicBool>,
    /// `LB_CT4_LIVE`, restamped at load, after a migration and by the collector.
    live: Arc<live::LiveStamps>,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.ct_gc_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Dataplane {
    /// The running count of UDP flows removed because their backend left.
    pub fn stale_udp_counter(&self) -> Arc<AtomicU64> {
        self.stale_udp_removed.clone()
    }

    /// The running count of idle assured flows the collector removed.
    pub fn ct_collected_counter(&self) -> Arc<AtomicU64> {
        self.ct_collected.clone()
    }

    /// Stops the collector thread (within 100 ms), for tests that judge every map change by
    /// the packets they send.
    pub fn stop_ct_collector(&self) {
        self.ct_gc_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Moves `LB_SERVICES_GEN` on, right after each write or removal of an `LB_SERVICES` entry
    /// and after `LB_NODE_ADDRS` loses an address: each CPU's copy of the frontend it found
    /// last (`lb-ebpf/src/service.rs`, `lookup_cached`) stands only while the generation is the
    /// one read before the lookup that made it. Two system calls (read, write): a few percent
    /// of what a frontend's write costs. A test that writes `LB_SERVICES` by hand calls it too.
    pub fn frontends_changed(&mut self) {
        let name = lb_common::MAP_SERVICES_GEN;
        let moved = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })
            .and_then(|m| aya::maps::Array::<_, u32>::try_from(m).map_err(maps::map_err(name)))
            .and_then(|mut gen| {
                let next = gen.get(&0, 0).map_err(maps::map_err(name))?.wrapping_add(1);
                gen.set(0, next, 0).map_err(maps::map_err(name))
            });
        if let Err(e) = moved {
            // Cannot happen short of a broken map; the copies would then outlive a change.
            tracing::error!(error = %e, "cannot move the frontend maps' generation on");
        }
    }

    /// The conntrack clock (jiffies) and the lifetime of each state in jiffies.
    pub fn ct_clock(&self) -> (Arc<clock::Clock>, [u32; lb_common::CT_STATES]) {
        (self.clock.clone(), self.ct_timeouts)
    }

    /// Drops the datapath's cached copies of these IPv4 entries (`LB_CT4_CACHE`, see
    /// `lb-ebpf/src/ct_cache.rs`), where it holds them. The agent never needs to: it removes
    /// only expired flows and UDP ones, which no copy stands for. A test that rewrites or
    /// empties `LB_CT4` by hand, to make time pass, does.
    pub fn forget_cached_flows<'a>(&self, keys: impl IntoIterator<Item = &'a lb_common::CtKey4>) -> Result<()> {
        use lb_common::MAP_CT4_CACHE;
        let err = |e| maps::map_err(MAP_CT4_CACHE)(e);
        let map = self.ebpf.map(MAP_CT4_CACHE).ok_or(DataplaneError::MissingMap { name: MAP_CT4_CACHE })?;
        let aya::maps::Map::Array(data) = map else {
            return Err(DataplaneError::MissingMap { name: MAP_CT4_CACHE });
        };
        // The loader's handle is shared; a handle of our own, by id, may be written through.
        let id = data.info().map_err(err)?.id();
        let mut cache: aya::maps::Array<_, lb_common::CtCacheSlot4> =
            aya::maps::Array::try_from(aya::maps::Map::Array(aya::maps::MapData::from_id(id).map_err(err)?))
                .map_err(err)?;
        for k in keys {
            let first = lb_common::ct_cache_pair(k.src, k.dst, k.sport, k.dport, k.proto, self.sizes.of(MAP_CT4_CACHE));
            for slot in [first, first + 1] {
                if cache.get(&slot, 0).map_err(err)?.way.key == *k {
                    cache.set(slot, lb_common::CtCacheSlot4::default(), 0).map_err(err)?;
                }
            }
        }
        Ok(())
    }

    /// A pass over both assured tables' flows (`lb-ebpf/src/ct_live.rs`): a new
    /// generation of `LB_CT4_LIVE` and every flow stamped in it. The first call (at a first
    /// load, where no other programs run; otherwise after the link swap,
    /// `finish_migrations`) lets the collector make passes, and makes two back to back, which
    /// end the time when every key counts; the collector makes one at each collection after
    /// it; a test that writes flows into `LB_CT4` or `LB_CT6` by hand makes one to have their
    /// SYNs find them.
    pub fn restamp_live_flows(&self) {
        self.live.allow();
        for _ in 0..2 {
            let pass = self.live.begin();
            // `&`, not `&&`: IPv6's table is walked even when IPv4's walk failed part way.
            let whole = pass.stamp_keys(self.maps.conntrack.keys()) & pass.stamp_keys(self.maps.conntrack6.keys());
            pass.end(whole);
            if self.live.armed() {
                break;
            }
        }
    }

    /// Frontends programmed and backends summed over them.
    pub fn programmed(&self) -> (usize, usize) {
        (self.programmed.len(), self.programmed.values().map(|p| p.port.backends.len()).sum())
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The empty XDP and tc programs: the floor per-packet costs are measured against.
    pub fn floor_programs(&self) -> (&Xdp, &SchedClassifier) {
        let xdp = self.ebpf.program(PROG_BENCH_EMPTY_XDP).and_then(|p| p.try_into().ok()).expect("loaded");
        let tc = self.ebpf.program(PROG_BENCH_EMPTY_TC).and_then(|p| p.try_into().ok()).expect("loaded");
        (xdp, tc)
    }

    /// Every loaded program by name, for verifier statistics.
    pub fn programs(&self) -> impl Iterator<Item = (&str, &aya::programs::Program)> {
        self.ebpf.programs()
    }

    /// The loaded XDP program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn xdp_program(&self) -> &Xdp {
        self.ebpf.program(PROG_XDP).and_then(|p| p.try_into().ok()).expect("loaded in Dataplane::load")
    }

    /// The loaded tc program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn tc_program(&self) -> &SchedClassifier {
        self.ebpf.program(PROG_TC_INGRESS).and_then(|p| p.try_into().ok()).expect("loaded in Dataplane::load")
    }

    /// The loaded tc egress program, for `BPF_PROG_TEST_RUN` in tests.
    pub fn tc_egress_program(&self) -> &SchedClassifier {
        self.ebpf.program(lb_common::PROG_TC_EGRESS).and_then(|p| p.try_into().ok()).expect("loaded in Dataplane::load")
    }

    /// The loaded tc ingress program for devices without a link-layer header, for
    /// `BPF_PROG_TEST_RUN` in tests.
    pub fn tc_ingress_l3_program(&self) -> &SchedClassifier {
        self.ebpf
            .program(lb_common::PROG_TC_INGRESS_L3)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load")
    }

    /// The loaded tc egress program for devices without a link-layer header, for
    /// `BPF_PROG_TEST_RUN` in tests.
    pub fn tc_egress_l3_program(&self) -> &SchedClassifier {
        self.ebpf
            .program(lb_common::PROG_TC_EGRESS_L3)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load")
    }
}
