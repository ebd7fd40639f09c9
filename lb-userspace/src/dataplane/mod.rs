//! The BPF side of the agent: loads the programs with maps pinned under the pin directory,
//! adopts whatever a previous agent left there, applies desired state as a difference, and
//! attaches the tc program to interfaces with pinned links so traffic keeps flowing while no
//! agent runs.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    ffi::CStr,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    programs::{
        links::CgroupAttachMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        CgroupSockAddr, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendMemberKey, BackendSlotKey, CtKey, CtValue, NodeAddrKey, ServiceKey,
    ServiceName, ServiceValue, SourceRangeData, BACKEND_FLAG_LOCAL, FAMILY_IPV4, MAP_AFFINITY, MAP_BACKEND_MEMBERS,
    MAP_BACKEND_SLOTS, MAP_CONNTRACK, MAP_NODE_ADDRS, MAP_PORTS, MAP_SERVICES, MAP_SERVICE_NAMES, MAP_SOCK_REVNAT,
    MAP_SOURCE_RANGES, MAP_STATS, PORT_BACKEND, PORT_FRONTEND, PROGS_SOCK, PROG_BENCH_EMPTY_TC, PROG_BENCH_EMPTY_XDP,
    PROG_TC_INGRESS, PROG_XDP, SCOPE_EXACT, SCOPE_NODEPORT, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY,
    SVC_FLAG_SOURCE_RANGES,
};

use crate::model::{Cidr, DesiredState, Endpoint, Frontend, Protocol, Scope, ServicePort};

/// statfs magic of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LINKS_DIR: &str = "links";

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
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {name} is missing from the object or the pin directory")]
    MissingMap { name: &'static str },
    #[error("map {name} is full ({capacity} entries); {what} was not programmed")]
    MapFull { name: &'static str, capacity: u32, what: String },
    #[error("interface {iface}: {what}: {detail}")]
    Link { iface: String, what: &'static str, detail: String },
    #[error(
        "pinned map {path} holds live flows in another layout ({found}; this lb needs {wanted}), \
         and carrying them over is not supported: refusing to start rather than drop them. Start \
         this lb with the sizes the running one used, or drain the node and run `lb cleanup --pin-dir {pin_dir}`"
    )]
    FlowLayout { path: PathBuf, found: String, wanted: String, pin_dir: PathBuf },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A pinned map's shape: key and value size, capacity.
type Shape = (u32, u32, u32);

/// The shape each pinned map must have for this build and these sizes, and whether it holds
/// state that cannot be derived again from Kubernetes objects (flows, pins of sockets).
fn expected_shapes(sizes: &MapSizes) -> Vec<(&'static str, Shape, bool)> {
    use std::mem::size_of;
    let s = |name: &'static str, k: usize, v: usize, flows: bool| (name, (k as u32, v as u32, sizes.of(name)), flows);
    vec![
        s(MAP_SERVICES, size_of::<ServiceKey>(), size_of::<ServiceValue>(), false),
        s(MAP_SERVICE_NAMES, 4, size_of::<ServiceName>(), false),
        s(lb_common::MAP_SERVICE_STATS, 4, size_of::<lb_common::ServiceStats>(), false),
        s(MAP_BACKEND_SLOTS, size_of::<BackendSlotKey>(), size_of::<Backend>(), false),
        s(MAP_BACKEND_MEMBERS, size_of::<BackendMemberKey>(), 4, false),
        s(MAP_STATS, 4, 8, false),
        s(MAP_NODE_ADDRS, size_of::<NodeAddrKey>(), 4, false),
        s(MAP_SOURCE_RANGES, 4 + size_of::<SourceRangeData>(), 1, false),
        s(MAP_PORTS, 4, 1, false),
        s(MAP_CONNTRACK, size_of::<CtKey>(), size_of::<CtValue>(), true),
        s(MAP_AFFINITY, size_of::<AffinityKey>(), size_of::<AffinityValue>(), true),
        s(MAP_SOCK_REVNAT, size_of::<lb_common::SockRevKey>(), size_of::<lb_common::SockRevValue>(), true),
        s(lb_common::MAP_XDP_TARGETS, 4, 4, false),
        // Fragments in flight live for milliseconds: rebuilt rather than migrated.
        s(lb_common::MAP_FRAGMENTS, size_of::<lb_common::FragKey>(), size_of::<lb_common::FragValue>(), false),
    ]
}

/// A flow map moved to a new capacity: the old map stays open until the new program has
/// replaced the old one in every link, so flows the old program created meanwhile can be
/// copied over too.
pub struct Migration {
    name: &'static str,
    old: Map,
    path: PathBuf,
}

/// `BPF_MAP_TYPE_LRU_HASH`: every flow map is one.
const LRU_HASH: u32 = 9;

/// Copies every entry of `from` into `to`; with `only_new`, entries `to` already has are kept
/// (they are newer). Returns how many were written.
fn copy_entries<K: aya::Pod, V: aya::Pod>(
    from: &Map,
    to: &mut Map,
    only_new: bool,
) -> std::result::Result<usize, MapError> {
    let src: HashMap<&MapData, K, V> = HashMap::try_from(from)?;
    let mut dst: HashMap<&mut MapData, K, V> = HashMap::try_from(to)?;
    let flags = if only_new {
        1 /* BPF_NOEXIST */
    } else {
        0
    };
    let mut n = 0;
    for (k, v) in src.iter().filter_map(std::result::Result::ok) {
        if dst.insert(k, v, flags).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

fn copy_flow_map(name: &'static str, from: &Map, to: &mut Map, only_new: bool) -> Result<usize> {
    match name {
        MAP_CONNTRACK => copy_entries::<CtKey, CtValue>(from, to, only_new),
        MAP_AFFINITY => copy_entries::<AffinityKey, AffinityValue>(from, to, only_new),
        _ => copy_entries::<lb_common::SockRevKey, lb_common::SockRevValue>(from, to, only_new),
    }
    .map_err(map_err(name))
}

/// Gives a pinned flow map a new capacity without losing its flows: a new map is created,
/// filled from the old, pinned beside it and renamed over the old pin, so the loader adopts it.
fn migrate_flow_map(name: &'static str, path: &Path, capacity: u32) -> Result<Migration> {
    let old = MapData::from_pin(path).map_err(map_err(name))?;
    let info = old.info().map_err(map_err(name))?;
    let obj = aya_obj::Map::new_from_params(LRU_HASH, info.key_size(), info.value_size(), capacity, info.map_flags());
    let new = MapData::create(obj, name, None).map_err(map_err(name))?;
    let old = Map::from_map_data(old).map_err(map_err(name))?;
    let mut new = Map::from_map_data(new).map_err(map_err(name))?;
    let copied = copy_flow_map(name, &old, &mut new, false)?;
    // bpffs refuses names with a dot (bpf_lookup in kernel/bpf/inode.c).
    let tmp = path.with_file_name(format!("{name}_migrating"));
    let _ = fs::remove_file(&tmp);
    let pinned = match &new {
        Map::LruHashMap(d) => d.pin(&tmp),
        _ => unreachable!("created as an LRU hash"),
    };
    pinned
        .map_err(|e| DataplaneError::Map { name, source: MapError::PinError { name: Some(name.into()), error: e } })?;
    // rename(2) on bpffs replaces the old pin in one step (simple_rename).
    fs::rename(&tmp, path).map_err(|source| DataplaneError::Io {
        what: "replacing pin",
        path: path.to_owned(),
        source,
    })?;
    tracing::info!(
        map = name,
        from = info.max_entries(),
        to = capacity,
        entries = copied,
        "flow map moved to its new capacity with its flows"
    );
    Ok(Migration { name, old, path: path.to_owned() })
}

/// Service id -> the backends whose UDP flows must go (`None`: every flow of the frontend).
type StaleUdp = StdHashMap<u32, Option<BTreeSet<Endpoint>>>;

/// Removes the conntrack entries (both directions) of UDP flows whose frontend or backend is
/// gone, so the client's next datagram on the same 5-tuple is load-balanced afresh: UDP has no
/// end of connection, and a DNS client reusing its source port would otherwise keep sending to
/// a deleted pod (kube-proxy's conntrack cleanup does the same). TCP entries are left alone: a
/// connection to a pod that still runs may finish. Counts removed flows into `removed`.
///
/// It walks the whole map (a syscall per entry), so the agent runs it on a thread of its own
/// with its own map handle: the backend sets are already flipped, so no new flow can pick a
/// departed backend meanwhile, and other updates need not wait for the walk.
fn sweep_stale_udp(conntrack: &mut HashMap<MapData, CtKey, CtValue>, stale: &StaleUdp, removed: &AtomicU64) {
    let proto = Protocol::Udp.number();
    let mut doomed = Vec::new();
    for (k, v) in conntrack.iter().filter_map(std::result::Result::ok) {
        if k.dir != lb_common::CT_DIR_FORWARD || k.proto != proto {
            continue;
        }
        let Some(which) = stale.get(&v.service_id) else { continue };
        let backend = (ipv4(v.nat_addr), u16::from_be(v.nat_port));
        if which.as_ref().is_some_and(|set| !set.iter().any(|e| (e.ip, e.port) == backend)) {
            continue;
        }
        let snat = v.flags & lb_common::CT_FLAG_SNAT != 0;
        let reply = CtKey {
            src: v.nat_addr,
            dst: if snat { v.snat_addr } else { k.src },
            sport: v.nat_port,
            dport: if snat { v.snat_port } else { k.sport },
            proto: k.proto,
            family: k.family,
            dir: lb_common::CT_DIR_REPLY,
            _pad: 0,
        };
        doomed.push((k, reply));
    }
    let mut n = 0;
    for (fwd, reply) in &doomed {
        let _ = conntrack.remove(reply);
        if conntrack.remove(fwd).is_ok() {
            removed.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    }
    if n > 0 {
        tracing::info!(flows = n, "removed UDP flows to departed backends");
    }
}

/// Checks maps pinned by a previous agent (perhaps another version, or other `--map-*`
/// sizes) before the loader adopts them: aya reuses a pin by name without comparing its shape,
/// and a program verified against one value size must never run on a map of another.
///
/// Maps whose content the agent derives from Kubernetes objects are unpinned and rebuilt when
/// their shape or the layout version (stamped in every service name entry) differs; the
/// programs still attached keep the old maps until the new ones replace them, already filled,
/// in one link update (affinity pins keyed by the old service ids are then dropped at
/// adoption, as pins of ids no frontend holds). Flow maps (conntrack, affinity, socket reverse NAT) are never dropped: a
/// new capacity is migrated with its entries; a new key or value layout is refused.
fn check_pinned_layout(pin_dir: &Path, sizes: &MapSizes) -> Result<Vec<Migration>> {
    let version_changed = MapData::from_pin(pin_dir.join(MAP_SERVICE_NAMES))
        .ok()
        .and_then(|d| Map::from_map_data(d).ok())
        .and_then(|m| HashMap::<MapData, u32, ServiceName>::try_from(m).ok())
        .and_then(|names| names.iter().filter_map(std::result::Result::ok).map(|(_, n)| n.layout_version).next())
        .filter(|v| *v != lb_common::MAP_LAYOUT_VERSION);
    if let Some(v) = version_changed {
        tracing::warn!(
            pinned = v,
            current = lb_common::MAP_LAYOUT_VERSION,
            "pinned maps are of another layout version; rebuilding the service maps (flows are kept)"
        );
    }
    let mut migrations = Vec::new();
    for (name, wanted, holds_flows) in expected_shapes(sizes) {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        let show = |s: Shape| format!("key {} B, value {} B, {} entries", s.0, s.1, s.2);
        if found == wanted && (holds_flows || version_changed.is_none()) {
            continue;
        }
        if holds_flows {
            let same_layout = (found.0, found.1) == (wanted.0, wanted.1)
                && info.map_type().is_ok_and(|t| t == aya::maps::MapType::LruHash);
            if !same_layout {
                return Err(DataplaneError::FlowLayout {
                    path,
                    found: show(found),
                    wanted: show(wanted),
                    pin_dir: pin_dir.to_owned(),
                });
            }
            if wanted.2 < found.2 {
                tracing::warn!(
                    map = name,
                    from = found.2,
                    to = wanted.2,
                    "shrinking a flow map: the oldest flows may be evicted"
                );
            }
            migrations.push(migrate_flow_map(name, &path, wanted.2)?);
            continue;
        }
        tracing::warn!(map = name, found = %show(found), wanted = %show(wanted), "rebuilding a pinned map of another shape");
        fs::remove_file(&path).map_err(|source| DataplaneError::Io {
            what: "unpinning",
            path: path.clone(),
            source,
        })?;
    }
    Ok(migrations)
}

/// Makes sure `pin_dir` exists on bpffs, mounting bpffs at /sys/fs/bpf if that is where it
/// should live and nobody mounted it yet (the case on a fresh machine).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let bpf_root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpf_root) && !is_bpffs(bpf_root) {
        mount_bpffs(bpf_root)?;
    }
    fs::create_dir_all(pin_dir.join(LINKS_DIR)).map_err(|source| DataplaneError::Io {
        what: "creating pin directory",
        path: pin_dir.to_owned(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(DataplaneError::NotBpffs { path: pin_dir.to_owned() });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs with a valid C string and a zeroed out-struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DataplaneError::Io {
            what: "mounting bpffs at",
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Map capacities (entries), set when the maps are created. Pinned maps keep the size they were
/// created with.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Service frontends (also sizes the names map).
    pub services: u32,
    /// Backend slots over all services (also sizes the membership map).
    pub backend_slots: u32,
    /// Conntrack entries; every flow takes two.
    pub conntrack: u32,
    /// Session affinity pins.
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: lb_common::SERVICES_MAX_ENTRIES,
            backend_slots: lb_common::BACKEND_SLOTS_MAX_ENTRIES,
            conntrack: lb_common::CONNTRACK_MAX_ENTRIES,
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
}

/// Conntrack lifetimes, patched into the programs at load time.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_syn_s: u64,
    pub tcp_established_s: u64,
    pub tcp_close_s: u64,
    pub udp_s: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { tcp_syn_s: 60, tcp_established_s: 6 * 3600, tcp_close_s: 10, udp_s: 60 }
    }
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: [u32::from_ne_bytes(f.ip.octets()), 0, 0, 0],
        port: f.port.to_be(),
        proto: f.protocol.number(),
        family: FAMILY_IPV4,
        scope: if f.scope == Scope::NodePort { SCOPE_NODEPORT } else { SCOPE_EXACT },
        _pad: [0; 3],
    }
}

/// The frontend a service key stands for. Exact-address keys of external frontends look like
/// ClusterIP keys; `flags` (the value's) tells them apart.
pub fn frontend_of(k: &ServiceKey, flags: u32) -> Option<Frontend> {
    let (ip, port, protocol) = (ipv4(k.addr), u16::from_be(k.port), Protocol::from_number(k.proto)?);
    Some(match (k.scope, flags & SVC_FLAG_EXTERNAL != 0) {
        (SCOPE_NODEPORT, _) => Frontend::node_port(port, protocol),
        (_, true) => Frontend::external(ip, port, protocol),
        (_, false) => Frontend::cluster_ip(ip, port, protocol),
    })
}

pub fn backend_value(e: &Endpoint) -> Backend {
    Backend {
        addr: [u32::from_ne_bytes(e.ip.octets()), 0, 0, 0],
        port: e.port.to_be(),
        family: FAMILY_IPV4,
        flags: if e.local { BACKEND_FLAG_LOCAL } else { 0 },
        _pad: 0,
    }
}

fn member_key(service_id: u32, e: &Endpoint) -> BackendMemberKey {
    let b = backend_value(e);
    BackendMemberKey { service_id, port: b.port, family: b.family, _pad: 0, addr: b.addr }
}

pub fn endpoint_of(b: &Backend) -> Endpoint {
    Endpoint { ip: ipv4(b.addr), port: u16::from_be(b.port), local: b.flags & BACKEND_FLAG_LOCAL != 0 }
}

fn source_range_key(service_id: u32, c: &Cidr) -> LpmKey<SourceRangeData> {
    LpmKey::new(
        32 + c.len as u32,
        SourceRangeData { service_id_be: service_id.to_be(), addr: [u32::from_ne_bytes(c.addr.octets()), 0, 0, 0] },
    )
}

fn service_value(id: u32, generation: u16, sp: &ServicePort) -> ServiceValue {
    let mut flags = 0;
    if sp.affinity_timeout_s.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    if sp.external {
        flags |= SVC_FLAG_EXTERNAL;
    }
    if sp.local_only {
        flags |= SVC_FLAG_LOCAL_ONLY;
    }
    if !sp.source_ranges.is_empty() {
        flags |= SVC_FLAG_SOURCE_RANGES;
    }
    ServiceValue {
        id,
        backend_count: sp.backends.len() as u16,
        generation,
        flags,
        affinity_timeout_s: sp.affinity_timeout_s.unwrap_or(0),
    }
}

pub fn ipv4(addr: [u32; 4]) -> Ipv4Addr {
    Ipv4Addr::from(addr[0].to_ne_bytes())
}

fn encode_name(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    let bytes = name.as_bytes();
    // Keep a NUL at the end and never cut a UTF-8 character in half.
    let mut n = bytes.len().min(out.name.len() - 1);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    out.name[..n].copy_from_slice(&bytes[..n]);
    out
}

pub fn decode_name(n: &ServiceName) -> String {
    let end = n.name.iter().position(|&b| b == 0).unwrap_or(n.name.len());
    String::from_utf8_lossy(&n.name[..end]).into_owned()
}

/// What is in the maps for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    id: u32,
    generation: u16,
    port: ServicePort,
}

/// How long a replaced slot generation stays in the map after the service entry stopped
/// pointing at it. A packet copies the service entry and then looks its slot up; one that read
/// the entry just before the flip must still find the old generation (else `DropSlotMissing`).
/// A program run lasts microseconds (no sleeping, no preemption inside it), so this is ample;
/// kube-proxy's nftables proxier likewise removes stale chains a sync later.
pub const SLOT_GRACE: Duration = Duration::from_secs(2);

/// A slot generation retired by a flip or a frontend's removal, deleted after `SLOT_GRACE`.
#[derive(Clone, Debug)]
struct Retired {
    id: u32,
    generation: u16,
    count: usize,
    since: Instant,
    /// The frontend was removed: its id is handed out again only once these slots are gone
    /// (a reused id starts again at generation 0, which these may be), and after its affinity
    /// pins are dropped, including any a packet in flight wrote after the removal.
    release_id: bool,
    /// The flip away from this generation wrapped the counter (65535 -> 0): pins a packet in
    /// flight still wrote with this generation would, 65,536 changes later, pass as current.
    wrapped: bool,
}

/// What one `apply` changed.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// The node's own connected UDP sockets whose backend left, aborted.
    pub stale_udp_sockets: usize,
    pub errors: Vec<DataplaneError>,
}

/// The pinned maps, typed.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, BackendSlotKey, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub names: HashMap<MapData, u32, ServiceName>,
    pub stats: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, lb_common::ServiceStats>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub members: HashMap<MapData, BackendMemberKey, u32>,
    pub node_addrs: HashMap<MapData, NodeAddrKey, u32>,
    pub sock_revnat: HashMap<MapData, lb_common::SockRevKey, lb_common::SockRevValue>,
    pub ports: Array<MapData, u8>,
    pub source_ranges: LpmTrie<MapData, SourceRangeData, u8>,
    pub xdp_targets: HashMap<MapData, u32, u32>,
}

impl Maps {
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
            ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })
        }
        Ok(Self {
            services: HashMap::try_from(take(ebpf, MAP_SERVICES)?).map_err(map_err(MAP_SERVICES))?,
            slots: HashMap::try_from(take(ebpf, MAP_BACKEND_SLOTS)?).map_err(map_err(MAP_BACKEND_SLOTS))?,
            conntrack: HashMap::try_from(take(ebpf, MAP_CONNTRACK)?).map_err(map_err(MAP_CONNTRACK))?,
            names: HashMap::try_from(take(ebpf, MAP_SERVICE_NAMES)?).map_err(map_err(MAP_SERVICE_NAMES))?,
            stats: PerCpuArray::try_from(take(ebpf, MAP_STATS)?).map_err(map_err(MAP_STATS))?,
            service_stats: PerCpuArray::try_from(take(ebpf, lb_common::MAP_SERVICE_STATS)?)
                .map_err(map_err(lb_common::MAP_SERVICE_STATS))?,
            affinity: HashMap::try_from(take(ebpf, MAP_AFFINITY)?).map_err(map_err(MAP_AFFINITY))?,
            members: HashMap::try_from(take(ebpf, MAP_BACKEND_MEMBERS)?).map_err(map_err(MAP_BACKEND_MEMBERS))?,
            node_addrs: HashMap::try_from(take(ebpf, MAP_NODE_ADDRS)?).map_err(map_err(MAP_NODE_ADDRS))?,
            sock_revnat: HashMap::try_from(take(ebpf, MAP_SOCK_REVNAT)?).map_err(map_err(MAP_SOCK_REVNAT))?,
            ports: Array::try_from(take(ebpf, MAP_PORTS)?).map_err(map_err(MAP_PORTS))?,
            source_ranges: LpmTrie::try_from(take(ebpf, MAP_SOURCE_RANGES)?).map_err(map_err(MAP_SOURCE_RANGES))?,
            xdp_targets: HashMap::try_from(take(ebpf, lb_common::MAP_XDP_TARGETS)?)
                .map_err(map_err(lb_common::MAP_XDP_TARGETS))?,
        })
    }

    /// Opens the maps a running (or departed) agent pinned, for inspection.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        fn open(pin_dir: &Path, name: &'static str) -> Result<Map> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        }
        Ok(Self {
            services: HashMap::try_from(open(pin_dir, MAP_SERVICES)?).map_err(map_err(MAP_SERVICES))?,
            slots: HashMap::try_from(open(pin_dir, MAP_BACKEND_SLOTS)?).map_err(map_err(MAP_BACKEND_SLOTS))?,
            conntrack: HashMap::try_from(open(pin_dir, MAP_CONNTRACK)?).map_err(map_err(MAP_CONNTRACK))?,
            names: HashMap::try_from(open(pin_dir, MAP_SERVICE_NAMES)?).map_err(map_err(MAP_SERVICE_NAMES))?,
            stats: PerCpuArray::try_from(open(pin_dir, MAP_STATS)?).map_err(map_err(MAP_STATS))?,
            service_stats: PerCpuArray::try_from(open(pin_dir, lb_common::MAP_SERVICE_STATS)?)
                .map_err(map_err(lb_common::MAP_SERVICE_STATS))?,
            affinity: HashMap::try_from(open(pin_dir, MAP_AFFINITY)?).map_err(map_err(MAP_AFFINITY))?,
            members: HashMap::try_from(open(pin_dir, MAP_BACKEND_MEMBERS)?).map_err(map_err(MAP_BACKEND_MEMBERS))?,
            node_addrs: HashMap::try_from(open(pin_dir, MAP_NODE_ADDRS)?).map_err(map_err(MAP_NODE_ADDRS))?,
            sock_revnat: HashMap::try_from(open(pin_dir, MAP_SOCK_REVNAT)?).map_err(map_err(MAP_SOCK_REVNAT))?,
            ports: Array::try_from(open(pin_dir, MAP_PORTS)?).map_err(map_err(MAP_PORTS))?,
            source_ranges: LpmTrie::try_from(open(pin_dir, MAP_SOURCE_RANGES)?).map_err(map_err(MAP_SOURCE_RANGES))?,
            xdp_targets: HashMap::try_from(open(pin_dir, lb_common::MAP_XDP_TARGETS)?)
                .map_err(map_err(lb_common::MAP_XDP_TARGETS))?,
        })
    }
}

impl MapSizes {
    fn of(&self, name: &'static str) -> u32 {
        match name {
            MAP_SERVICES | MAP_SERVICE_NAMES => self.services,
            MAP_BACKEND_SLOTS | MAP_BACKEND_MEMBERS => self.backend_slots,
            MAP_CONNTRACK => self.conntrack,
            MAP_AFFINITY => self.affinity,
            // Ids start at 1, indexing the array directly.
            lb_common::MAP_SERVICE_STATS => self.services + 1,
            MAP_NODE_ADDRS => lb_common::NODE_ADDRS_MAX_ENTRIES,
            MAP_SOURCE_RANGES => lb_common::SOURCE_RANGES_MAX_ENTRIES,
            MAP_STATS => lb_common::COUNTER_MAX * lb_common::HOOKS,
            MAP_PORTS => 65_536,
            MAP_SOCK_REVNAT => lb_common::SOCK_REVNAT_MAX_ENTRIES,
            lb_common::MAP_XDP_TARGETS => lb_common::XDP_TARGETS_MAX_ENTRIES,
            lb_common::MAP_FRAGMENTS => lb_common::FRAGMENTS_MAX_ENTRIES,
            _ => 0,
        }
    }
}

/// Turns an insert failure into a "map full" report when that is what the kernel said.
fn insert_err(sizes: MapSizes, name: &'static str, what: String) -> impl FnOnce(MapError) -> DataplaneError {
    let capacity = sizes.of(name);
    move |source| {
        let full = matches!(&source, MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)));
        if full {
            DataplaneError::MapFull { name, capacity, what }
        } else {
            DataplaneError::Map { name, source }
        }
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
    /// Mirror of `LB_PORTS`, so an apply writes only the flags that change.
    port_flags: Vec<u8>,
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
    /// UDP flows removed because their backend left (by the sweep threads).
    stale_udp_removed: Arc<AtomicU64>,
}

impl Dataplane {
    /// Loads the programs, reusing maps pinned under `pin_dir` (and the flows in them).
    pub fn load(pin_dir: &Path, config: &Config) -> Result<Self> {
        ensure_pin_dir(pin_dir)?;
        let migrations = check_pinned_layout(pin_dir, &config.sizes)?;
        let (timeouts, sizes) = (config.timeouts, config.sizes);
        let node_ip = config.node_ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        let ns = |s: u64| s.saturating_mul(1_000_000_000);
        let (syn, est, close, udp) =
            (ns(timeouts.tcp_syn_s), ns(timeouts.tcp_established_s), ns(timeouts.tcp_close_s), ns(timeouts.udp_s));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global("CT_TCP_SYN_TIMEOUT_NS", &syn, true)
            .override_global("CT_TCP_ESTABLISHED_TIMEOUT_NS", &est, true)
            .override_global("CT_TCP_CLOSE_TIMEOUT_NS", &close, true)
            .override_global("CT_UDP_TIMEOUT_NS", &udp, true)
            .override_global("NODE_IP", &node_ip, true)
            .override_global("XDP_SEND_ANYWHERE", &u32::from(config.xdp_mode == XdpAttachMode::Generic), true)
            .override_global("NETNS_COOKIE", &netns_cookie()?, true)
            .map_max_entries(MAP_SERVICES, sizes.services)
            .map_max_entries(MAP_SERVICE_NAMES, sizes.services)
            .map_max_entries(lb_common::MAP_SERVICE_STATS, sizes.of(lb_common::MAP_SERVICE_STATS))
            .map_max_entries(MAP_BACKEND_SLOTS, sizes.backend_slots)
            .map_max_entries(MAP_BACKEND_MEMBERS, sizes.backend_slots)
            .map_max_entries(MAP_CONNTRACK, sizes.conntrack)
            .map_max_entries(MAP_AFFINITY, sizes.affinity)
            .load(crate::EBPF_OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_TC_INGRESS)
            .ok_or(DataplaneError::MissingMap { name: PROG_TC_INGRESS })?
            .try_into()?;
        prog.load()?;
        let egress: &mut SchedClassifier = ebpf
            .program_mut(lb_common::PROG_TC_EGRESS)
            .ok_or(DataplaneError::MissingMap { name: lb_common::PROG_TC_EGRESS })?
            .try_into()?;
        egress.load()?;
        let xdp: &mut Xdp =
            ebpf.program_mut(PROG_XDP).ok_or(DataplaneError::MissingMap { name: PROG_XDP })?.try_into()?;
        xdp.load()?;
        for name in PROGS_SOCK {
            let p: &mut CgroupSockAddr =
                ebpf.program_mut(name).ok_or(DataplaneError::MissingMap { name })?.try_into()?;
            p.load()?;
        }
        // The benchmark's floor: loaded (a few instructions) so lb-bench measures the same
        // object the agent runs, never attached.
        let empty: &mut Xdp = ebpf
            .program_mut(PROG_BENCH_EMPTY_XDP)
            .ok_or(DataplaneError::MissingMap { name: PROG_BENCH_EMPTY_XDP })?
            .try_into()?;
        empty.load()?;
        let empty: &mut SchedClassifier = ebpf
            .program_mut(PROG_BENCH_EMPTY_TC)
            .ok_or(DataplaneError::MissingMap { name: PROG_BENCH_EMPTY_TC })?
            .try_into()?;
        empty.load()?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let mut dp = Self {
            ebpf,
            maps,
            sizes,
            xdp_mode: config.xdp_mode,
            pin_dir: pin_dir.to_owned(),
            programmed: BTreeMap::new(),
            attached: StdHashMap::new(),
            attach_failures: StdHashMap::new(),
            xdp_choice: StdHashMap::new(),
            xdp_targets: BTreeSet::new(),
            port_flags: Vec::new(),
            free_ids: BTreeSet::new(),
            retired: VecDeque::new(),
            next_id: 1,
            migrations,
            stale_udp_removed: Arc::default(),
        };
        dp.port_flags = (0..65_536u32).map(|p| dp.maps.ports.get(&p, 0).unwrap_or(0)).collect();
        dp.adopt()?;
        Ok(dp)
    }

    /// Once this agent's programs have replaced the old ones in every link: copies the flows
    /// the old programs created in the old flow maps since the migration, then lets the old
    /// maps go.
    pub fn finish_migrations(&mut self) {
        for m in std::mem::take(&mut self.migrations) {
            let result = MapData::from_pin(&m.path)
                .and_then(Map::from_map_data)
                .map_err(map_err(m.name))
                .and_then(|mut new| copy_flow_map(m.name, &m.old, &mut new, true));
            match result {
                Ok(n) => tracing::info!(map = m.name, entries = n, "flows created during the migration copied"),
                Err(e) => tracing::warn!(map = m.name, error = %e, "cannot copy flows created during the migration"),
            }
        }
    }

    /// The running count of UDP flows removed because their backend left.
    pub fn stale_udp_counter(&self) -> Arc<AtomicU64> {
        self.stale_udp_removed.clone()
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

    /// Rebuilds `programmed` from the pinned maps, and removes what a crashed update left
    /// behind (slots of dead generations, names of gone services, stale memberships and source
    /// ranges). Slot generations a previous agent still held for their grace period are dead
    /// generations here too: a packet in flight is long done by the time an agent has loaded.
    fn adopt(&mut self) -> Result<()> {
        let mut live: BTreeMap<u32, (u16, u16)> = BTreeMap::new();
        let mut entries = Vec::new();
        for item in self.maps.services.iter() {
            let (k, v) = item.map_err(map_err(MAP_SERVICES))?;
            entries.push((k, v));
            live.insert(v.id, (v.generation, v.backend_count));
        }
        let mut slots: BTreeMap<u32, BTreeMap<u16, Endpoint>> = BTreeMap::new();
        let mut stale_slots = Vec::new();
        for item in self.maps.slots.iter() {
            let (k, b) = item.map_err(map_err(MAP_BACKEND_SLOTS))?;
            match live.get(&k.service_id) {
                Some(&(gen, count)) if gen == k.generation && k.slot < count => {
                    slots.entry(k.service_id).or_default().insert(k.slot, endpoint_of(&b));
                }
                _ => stale_slots.push(k),
            }
        }
        let mut names = BTreeMap::new();
        let mut stale_names = Vec::new();
        for item in self.maps.names.iter() {
            let (id, n) = item.map_err(map_err(MAP_SERVICE_NAMES))?;
            if live.contains_key(&id) {
                names.insert(id, decode_name(&n));
            } else {
                stale_names.push(id);
            }
        }
        let mut ranges: BTreeMap<u32, Vec<Cidr>> = BTreeMap::new();
        let mut stale_ranges = Vec::new();
        for item in self.maps.source_ranges.keys() {
            let k = item.map_err(map_err(MAP_SOURCE_RANGES))?;
            let id = u32::from_be(k.data().service_id_be);
            if live.contains_key(&id) {
                let len = (k.prefix_len() - 32) as u8;
                ranges.entry(id).or_default().push(Cidr { addr: ipv4(k.data().addr), len });
            } else {
                stale_ranges.push(k);
            }
        }
        for k in stale_slots {
            let _ = self.maps.slots.remove(&k);
        }
        for id in stale_names {
            let _ = self.maps.names.remove(&id);
        }
        for k in stale_ranges {
            let _ = self.maps.source_ranges.remove(&k);
        }
        // Membership is rebuilt from the live slots: whatever was there is dropped and
        // rewritten, which also clears entries a crashed update left behind.
        let members: Vec<BackendMemberKey> = self.maps.members.keys().filter_map(|k| k.ok()).collect();
        for k in members {
            let _ = self.maps.members.remove(&k);
        }
        for (k, v) in entries {
            let Some(frontend) = frontend_of(&k, v.flags) else { continue };
            let backends: Vec<Endpoint> = slots.remove(&v.id).map(|m| m.into_values().collect()).unwrap_or_default();
            let name = names.remove(&v.id).unwrap_or_default();
            for (slot, b) in backends.iter().enumerate() {
                self.maps.members.insert(member_key(v.id, b), slot as u32, 0).map_err(insert_err(
                    self.sizes,
                    MAP_BACKEND_MEMBERS,
                    format!("backend {b} of {name}"),
                ))?;
            }
            let mut source_ranges = ranges.remove(&v.id).unwrap_or_default();
            source_ranges.sort();
            let port = ServicePort {
                name,
                backends,
                affinity_timeout_s: (v.flags & SVC_FLAG_AFFINITY != 0).then_some(v.affinity_timeout_s),
                external: v.flags & SVC_FLAG_EXTERNAL != 0,
                local_only: v.flags & SVC_FLAG_LOCAL_ONLY != 0,
                source_ranges,
            };
            self.programmed.insert(frontend, Programmed { id: v.id, generation: v.generation, port });
        }
        let used: BTreeSet<u32> = self.programmed.values().map(|p| p.id).collect();
        self.next_id = used.last().map_or(1, |m| m + 1);
        self.free_ids = (1..self.next_id).filter(|id| !used.contains(id)).collect();
        // Pins of ids no frontend holds: a previous agent died between removing a frontend and
        // dropping its pins, or the services map was rebuilt and every id is handed out afresh.
        let stale = self.purge_affinity(|id| !used.contains(&id));
        if stale > 0 {
            tracing::info!(pins = stale, "dropped affinity pins of frontends that no longer exist");
        }
        if !self.programmed.is_empty() {
            tracing::info!(services = self.programmed.len(), "adopted service state pinned by a previous agent");
        }
        Ok(())
    }

    /// Removes the session-affinity pins of the service ids `doomed` selects; returns how many.
    fn purge_affinity(&mut self, doomed: impl Fn(u32) -> bool) -> usize {
        let keys: Vec<AffinityKey> =
            self.maps.affinity.keys().filter_map(std::result::Result::ok).filter(|k| doomed(k.service_id)).collect();
        keys.iter().filter(|k| self.maps.affinity.remove(k).is_ok()).count()
    }

    /// Lowest unused id: ids of removed frontends are reused first, so ids stay dense. Its
    /// traffic counters start from zero, so a reused id does not inherit another frontend's.
    fn next_free_id(&mut self) -> u32 {
        // Ids index the per-service counters (one slot per possible frontend): rather than
        // grow past them while removed frontends' ids wait out their slots' grace, take those
        // back early.
        if self.free_ids.is_empty() && self.next_id > self.sizes.services && self.retired.iter().any(|r| r.release_id) {
            tracing::warn!("service ids up to the services map's capacity in use: releasing removed frontends' ids before their grace period");
            self.collect_retired_at(Instant::now() + SLOT_GRACE);
        }
        let id = match self.free_ids.pop_first() {
            Some(id) => id,
            None => {
                self.next_id += 1;
                self.next_id - 1
            }
        };
        if let Ok(cpus) = aya::util::nr_cpus() {
            if let Ok(zero) = aya::maps::PerCpuValues::try_from(vec![lb_common::ServiceStats::default(); cpus]) {
                let _ = self.maps.service_stats.set(id, zero, 0);
            }
        }
        id
    }

    /// Aborts the node's own connected UDP sockets that the socket-level programs pointed at a
    /// backend that has now left `frontend` (see `sockdiag`). A socket is identified by the
    /// cookie the programs recorded with the backend, so sockets a process connected to the
    /// pod address itself are left alone.
    fn close_stale_udp_sockets(
        &mut self,
        stale: &[(Frontend, BTreeSet<Endpoint>)],
    ) -> std::result::Result<usize, crate::sockdiag::SockDiagError> {
        let mut doomed: StdHashMap<u64, (Ipv4Addr, u16)> = StdHashMap::new();
        let mut entries = Vec::new();
        for (k, v) in self.maps.sock_revnat.iter().filter_map(std::result::Result::ok) {
            let backend = (ipv4(k.addr), u16::from_be(k.port));
            let (fe_ip, fe_port) = (ipv4(v.addr), u16::from_be(v.port));
            let hit = stale.iter().any(|(f, left)| {
                let same_frontend = fe_port == f.port && (f.scope == Scope::NodePort || fe_ip == f.ip);
                same_frontend && left.iter().any(|e| (e.ip, e.port) == backend)
            });
            if hit {
                doomed.insert(k.cookie, backend);
                entries.push(k);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut closed = 0;
        for s in crate::sockdiag::udp_sockets()? {
            if doomed.get(&s.cookie).is_some_and(|b| *b == (*s.remote.ip(), s.remote.port()))
                && crate::sockdiag::destroy(&s)?
            {
                closed += 1;
            }
        }
        for k in entries {
            let _ = self.maps.sock_revnat.remove(&k);
        }
        Ok(closed)
    }

    /// Makes the maps match `desired`, touching only frontends that changed. Per-frontend
    /// failures are reported and do not stop the others.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.collect_retired();
        // Port flags first: the datapath must not skip a frontend that is about to exist.
        self.update_ports(desired.services.iter(), false, &mut report);
        let gone: Vec<Frontend> =
            self.programmed.keys().filter(|f| !desired.services.contains_key(f)).copied().collect();
        // Service id -> backends whose UDP flows must go (`None`: every flow of the frontend).
        let mut stale_udp: StaleUdp = StdHashMap::new();
        // The same departures, by frontend, for the node's own connected sockets.
        let mut stale_socks: Vec<(Frontend, BTreeSet<Endpoint>)> = Vec::new();
        for f in gone {
            let p = self.programmed.remove(&f).expect("listed above");
            if f.protocol == Protocol::Udp {
                stale_udp.insert(p.id, None);
                stale_socks.push((f, p.port.backends.iter().copied().collect()));
            }
            // Service entry first, so no new flow can pick a slot we are about to delete. The
            // slots go after the grace, for packets that read the entry just before; the id is
            // free again (its affinity pins dropped) only then.
            let _ = self.maps.services.remove(&service_key(&f));
            self.retire(p.id, p.generation, p.port.backends.len(), true, false);
            self.remove_members(p.id, &p.port.backends, &[]);
            self.remove_ranges(p.id, &p.port.source_ranges, &[]);
            let _ = self.maps.names.remove(&p.id);
            tracing::info!(frontend = %f, service = %p.port.name, "service removed");
            report.removed += 1;
        }
        for (f, want) in &desired.services {
            let old = self.programmed.get(f).cloned();
            let next = match &old {
                Some(p) if p.port == *want => {
                    report.unchanged += 1;
                    continue;
                }
                // Same backends: keep the generation, so affinity pins stay valid without a
                // membership lookup and no slot is rewritten.
                Some(p) if p.port.backends == want.backends => {
                    Programmed { id: p.id, generation: p.generation, port: want.clone() }
                }
                Some(p) => Programmed { id: p.id, generation: p.generation.wrapping_add(1), port: want.clone() },
                None => Programmed { id: self.next_free_id(), generation: 0, port: want.clone() },
            };
            if old.as_ref().is_some_and(|p| p.generation != next.generation) {
                // A generation still in its grace that the counter came back to is rewritten
                // now: its later deletion must not hit the live slots.
                self.drop_retired(next.id, next.generation);
                if next.generation == 0 {
                    // Wrapped: a pin is trusted without a membership check while its generation
                    // equals the service's, and pins of 65,536 changes ago may hold this one.
                    let n = self.purge_affinity(|id| id == next.id);
                    tracing::info!(frontend = %f, pins = n, "slot generation wrapped; affinity pins of the frontend dropped");
                }
            }
            let mut written = self.write_service(f, &next, old.as_ref());
            if matches!(written, Err(DataplaneError::MapFull { name: MAP_BACKEND_SLOTS, .. }))
                && !self.retired.is_empty()
            {
                // Retired generations count against the capacity: under that pressure they go
                // before their grace (a packet in flight may then drop) rather than leave the
                // frontend unprogrammed.
                tracing::warn!(
                    retired_slots = self.retired_slots(),
                    "backend slots map full: deleting replaced slot generations before their grace period"
                );
                self.collect_retired_at(Instant::now() + SLOT_GRACE);
                written = self.write_service(f, &next, old.as_ref());
            }
            match written {
                Ok(()) => {
                    if let Some(old) = old.as_ref().filter(|_| f.protocol == Protocol::Udp) {
                        let left: BTreeSet<Endpoint> =
                            old.port.backends.iter().filter(|b| !next.port.backends.contains(b)).copied().collect();
                        if !left.is_empty() {
                            stale_socks.push((*f, left.clone()));
                            stale_udp.insert(next.id, Some(left));
                        }
                    }
                    tracing::info!(
                        frontend = %f,
                        service = %next.port.name,
                        backends = next.port.backends.len(),
                        affinity_timeout_s = ?next.port.affinity_timeout_s,
                        local_only = next.port.local_only,
                        source_ranges = next.port.source_ranges.len(),
                        "service {}", if old.is_some() { "updated" } else { "added" }
                    );
                    if old.is_some() {
                        report.updated += 1;
                    } else {
                        report.added += 1;
                    }
                    self.programmed.insert(*f, next);
                }
                Err(e) => {
                    if old.is_none() {
                        self.free_ids.insert(next.id);
                    }
                    report.errors.push(e)
                }
            }
        }
        let programmed: Vec<(Frontend, ServicePort)> =
            self.programmed.iter().map(|(f, p)| (*f, p.port.clone())).collect();
        self.update_ports(programmed.iter().map(|(f, sp)| (f, sp)), true, &mut report);
        // After the flips: no new flow can pick a departed backend while we sweep.
        if !stale_udp.is_empty() {
            let counter = self.stale_udp_removed.clone();
            let handle = MapData::from_pin(self.pin_dir.join(MAP_CONNTRACK))
                .and_then(Map::from_map_data)
                .and_then(HashMap::<MapData, CtKey, CtValue>::try_from);
            match handle {
                Ok(mut ct) => {
                    let spawned = std::thread::Builder::new()
                        .name("lb-udp-sweep".into())
                        .spawn(move || sweep_stale_udp(&mut ct, &stale_udp, &counter));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start the stale UDP flow sweep");
                    }
                }
                // Without a second handle, sweep here: later than never.
                Err(_) => sweep_stale_udp(&mut self.maps.conntrack, &stale_udp, &counter),
            }
        }
        if !stale_socks.is_empty() {
            match self.close_stale_udp_sockets(&stale_socks) {
                Ok(0) => {}
                Ok(n) => {
                    report.stale_udp_sockets = n;
                    tracing::info!(sockets = n, "aborted this node's connected UDP sockets to departed backends");
                }
                Err(e) => tracing::warn!(error = %e, "cannot abort connected UDP sockets to departed backends"),
            }
        }
        report
    }

    /// Sets the `LB_PORTS` flags the given frontends need. With `clear`, also clears the
    /// frontend flag of ports no longer in use. Backend flags are never cleared: a connection to
    /// a backend that left may live on for hours, and its replies must still be translated; a
    /// stale flag only costs one conntrack lookup.
    fn update_ports<'a>(
        &mut self,
        frontends: impl Iterator<Item = (&'a Frontend, &'a ServicePort)>,
        clear: bool,
        report: &mut ApplyReport,
    ) {
        let mut want = vec![0u8; 65_536];
        for (f, sp) in frontends {
            want[f.port as usize] |= PORT_FRONTEND;
            for b in &sp.backends {
                want[b.port as usize] |= PORT_BACKEND;
            }
        }
        for (port, &flags) in want.iter().enumerate() {
            let have = self.port_flags[port];
            let next = if clear { (have & PORT_BACKEND) | flags } else { have | flags };
            if next != have {
                match self.maps.ports.set(port as u32, next, 0) {
                    Ok(()) => self.port_flags[port] = next,
                    Err(e) => report.errors.push(DataplaneError::Map { name: MAP_PORTS, source: e }),
                }
            }
        }
    }

    /// Writes `next` for frontend `f` over `prev` (`None` for a new frontend).
    ///
    /// What the flipped service entry will point at is written first: a new slot generation
    /// (only if the backends changed), memberships, source ranges. Then the service entry is
    /// replaced in one update, so the datapath sees the old state or the new one, never a mix;
    /// what only the old state used is removed afterwards. On failure whatever was written for
    /// `next` is removed again and `prev` stays intact.
    fn write_service(&mut self, f: &Frontend, next: &Programmed, prev: Option<&Programmed>) -> Result<()> {
        let sizes = self.sizes;
        let what = |x: &dyn std::fmt::Display| format!("{x} of {} ({f})", next.port.name);
        let empty = ServicePort::default();
        let prev_port = prev.map_or(&empty, |p| &p.port);
        let new_generation = prev.is_none_or(|p| p.generation != next.generation);
        let mut written = Ok(());
        let mut slots_written = 0;
        if new_generation {
            for (slot, b) in next.port.backends.iter().enumerate() {
                let key = BackendSlotKey { service_id: next.id, generation: next.generation, slot: slot as u16 };
                written = self
                    .maps
                    .slots
                    .insert(key, backend_value(b), 0)
                    .map_err(insert_err(sizes, MAP_BACKEND_SLOTS, what(&format!("backend {b}"))))
                    .and_then(|()| {
                        self.maps.members.insert(member_key(next.id, b), slot as u32, 0).map_err(insert_err(
                            sizes,
                            MAP_BACKEND_MEMBERS,
                            what(&format!("backend {b}")),
                        ))
                    });
                slots_written = slot + 1;
                if written.is_err() {
                    break;
                }
            }
        }
        let mut ranges_written = 0;
        if written.is_ok() {
            for c in &next.port.source_ranges {
                written = self.maps.source_ranges.insert(&source_range_key(next.id, c), 1, 0).map_err(insert_err(
                    sizes,
                    MAP_SOURCE_RANGES,
                    what(&format!("source range {c}")),
                ));
                if written.is_err() {
                    break;
                }
                ranges_written += 1;
            }
        }
        let written = written.and_then(|()| {
            self.maps
                .services
                .insert(service_key(f), service_value(next.id, next.generation, &next.port), 0)
                .map_err(insert_err(sizes, MAP_SERVICES, what(&"frontend")))
        });
        if let Err(e) = written {
            if new_generation {
                self.remove_slots(next.id, next.generation, slots_written);
                self.remove_members(next.id, &next.port.backends[..slots_written], &prev_port.backends);
            }
            self.remove_ranges(next.id, &next.port.source_ranges[..ranges_written], &prev_port.source_ranges);
            return Err(e);
        }
        if let Some(p) = prev {
            if new_generation {
                // Packets that copied the old entry a moment ago still look these up.
                self.retire(p.id, p.generation, p.port.backends.len(), false, p.generation == u16::MAX);
                self.remove_members(p.id, &p.port.backends, &next.port.backends);
            }
            self.remove_ranges(p.id, &p.port.source_ranges, &next.port.source_ranges);
        }
        // The name only serves `lb list`: failing to store it must not fail the service.
        if let Err(e) = self.maps.names.insert(next.id, encode_name(&next.port.name), 0) {
            tracing::warn!(service = %next.port.name, error = %error_chain(&e), "could not store the service name for lb list");
        }
        Ok(())
    }

    /// Queues slot generation `generation` of `id` for deletion after `SLOT_GRACE`.
    fn retire(&mut self, id: u32, generation: u16, count: usize, release_id: bool, wrapped: bool) {
        if count == 0 && !release_id && !wrapped {
            return;
        }
        self.retired.push_back(Retired { id, generation, count, since: Instant::now(), release_id, wrapped });
    }

    /// Deletes a retired generation at once, because it is about to be written again.
    fn drop_retired(&mut self, id: u32, generation: u16) {
        let hits: Vec<usize> = (0..self.retired.len())
            .rev()
            .filter(|&i| {
                self.retired[i].id == id && self.retired[i].generation == generation && !self.retired[i].release_id
            })
            .collect();
        for i in hits {
            if let Some(r) = self.retired.remove(i) {
                self.remove_slots(r.id, r.generation, r.count);
            }
        }
    }

    /// Backend slots held by retired generations (they count against the map's capacity).
    pub fn retired_slots(&self) -> usize {
        self.retired.iter().map(|r| r.count).sum()
    }

    /// Deletes the retired slot generations whose grace has passed; returns how many slots.
    /// The agent calls it on every tick, and `apply` first thing.
    pub fn collect_retired(&mut self) -> usize {
        self.collect_retired_at(Instant::now())
    }

    /// `collect_retired` as if it were `now` (a later instant deletes more).
    pub fn collect_retired_at(&mut self, now: Instant) -> usize {
        let mut slots = 0;
        let mut released = BTreeSet::new();
        let mut wrapped = BTreeSet::new();
        while self.retired.front().is_some_and(|r| now.saturating_duration_since(r.since) >= SLOT_GRACE) {
            let r = self.retired.pop_front().expect("checked");
            self.remove_slots(r.id, r.generation, r.count);
            slots += r.count;
            if r.release_id {
                released.insert(r.id);
            }
            if r.wrapped {
                wrapped.insert((r.id, r.generation));
            }
        }
        if !released.is_empty() || !wrapped.is_empty() {
            let doomed: Vec<AffinityKey> = self
                .maps
                .affinity
                .iter()
                .filter_map(std::result::Result::ok)
                .filter(|(k, v)| released.contains(&k.service_id) || wrapped.contains(&(k.service_id, v.generation)))
                .map(|(k, _)| k)
                .collect();
            for k in &doomed {
                let _ = self.maps.affinity.remove(k);
            }
            // Only now may a new frontend get these ids (and generation 0 again).
            self.free_ids.extend(released);
        }
        slots
    }

    /// How long until every retired generation may go: the agent waits this out before it
    /// exits, then collects them, so the pinned maps hold exactly what adoption expects.
    pub fn retired_grace_left(&self) -> Duration {
        self.retired.back().map_or(Duration::ZERO, |r| SLOT_GRACE.saturating_sub(r.since.elapsed()))
    }

    fn remove_slots(&mut self, id: u32, generation: u16, count: usize) {
        for slot in 0..count {
            let _ = self.maps.slots.remove(&BackendSlotKey { service_id: id, generation, slot: slot as u16 });
        }
    }

    /// Removes the membership of `backends` in service `id`, except those also in `keep`.
    fn remove_members(&mut self, id: u32, backends: &[Endpoint], keep: &[Endpoint]) {
        for b in backends.iter().filter(|b| !keep.iter().any(|k| k.ip == b.ip && k.port == b.port)) {
            let _ = self.maps.members.remove(&member_key(id, b));
        }
    }

    fn remove_ranges(&mut self, id: u32, ranges: &[Cidr], keep: &[Cidr]) {
        for c in ranges.iter().filter(|c| !keep.contains(c)) {
            let _ = self.maps.source_ranges.remove(&source_range_key(id, c));
        }
    }

    /// Makes `LB_NODE_ADDRS` hold exactly the addresses of this network namespace that lie in
    /// `cidrs` (all of them if `cidrs` is empty), except loopback. Node ports answer on these.
    pub fn sync_node_addresses(&mut self, cidrs: &[Cidr]) -> Result<Vec<Ipv4Addr>> {
        let want: Vec<Ipv4Addr> = local_ipv4_addresses()?
            .into_iter()
            .filter(|ip| !ip.is_loopback())
            .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*ip)))
            .collect();
        self.set_node_addresses(&want)
    }

    /// Makes `LB_NODE_ADDRS` hold exactly `addrs`; returns what it holds.
    pub fn set_node_addresses(&mut self, addrs: &[Ipv4Addr]) -> Result<Vec<Ipv4Addr>> {
        let mut want: BTreeSet<Ipv4Addr> = addrs.iter().copied().collect();
        let key = |ip: &Ipv4Addr| NodeAddrKey {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            family: FAMILY_IPV4,
            _pad: [0; 3],
        };
        let have: Vec<NodeAddrKey> = self.maps.node_addrs.keys().filter_map(|k| k.ok()).collect();
        for k in have {
            if !want.remove(&ipv4(k.addr)) {
                let _ = self.maps.node_addrs.remove(&k);
            }
        }
        for ip in &want {
            self.maps.node_addrs.insert(key(ip), 1, 0).map_err(insert_err(
                self.sizes,
                MAP_NODE_ADDRS,
                format!("node address {ip}"),
            ))?;
        }
        Ok(self.maps.node_addrs.keys().filter_map(|k| k.ok()).map(|k| ipv4(k.addr)).collect())
    }

    fn link_pin(&self, iface: &str, hook: Hook) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(link_pin_name(iface, hook))
    }

    /// Attaches tc to every interface `tc_wanted` accepts and XDP to those `xdp_wanted`
    /// accepts, takes over links pinned by a previous agent (replacing their program
    /// atomically), and drops links of interfaces that went away or are no longer wanted.
    /// Returns the per-interface failures; the others stay attached.
    pub fn sync_interfaces(
        &mut self,
        tc_wanted: &dyn Fn(&str) -> bool,
        xdp_wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<DataplaneError> {
        let mut errors = Vec::new();
        let present: StdHashMap<String, u32> = match interfaces() {
            Ok(list) => list.into_iter().collect(),
            Err(e) => return vec![e],
        };
        // Which devices take native XDP frames: the XDP program sends only to those, and `Auto`
        // attaches native XDP only on those. Without the netdev family (kernel < 6.3) none is
        // known to, so XDP leaves every packet it would send to tc.
        let features = match crate::xdp_features::all() {
            Ok(f) => f,
            Err(e) => {
                if self.attach_failures.insert((String::new(), Hook::Xdp), e.to_string()).is_none() {
                    tracing::warn!(error = %e, "cannot read the devices' XDP features; XDP sends nothing itself");
                }
                StdHashMap::new()
            }
        };
        let can_transmit =
            |ifindex: u32| features.get(&ifindex).copied().is_some_and(crate::xdp_features::can_transmit);
        self.sync_xdp_targets(present.values().copied().filter(|i| can_transmit(*i)).collect(), &mut errors);
        if self.xdp_mode == XdpAttachMode::Auto {
            for (name, ifindex) in &present {
                if !xdp_wanted(name) {
                    continue;
                }
                let native = auto_native(name, Some(ifindex), &can_transmit);
                if self.xdp_choice.insert(name.clone(), native) != Some(native) {
                    if native {
                        tracing::info!(iface = %name, mode = "native", "XDP: the driver transmits native XDP frames");
                    } else {
                        tracing::info!(
                            iface = %name,
                            mode = "none (tc only)",
                            features = features.get(ifindex).copied().unwrap_or(0),
                            "XDP: the driver does not transmit native XDP frames, or the device is virtual (a veth); \
                             tc handles this interface alone"
                        );
                    }
                }
            }
        }
        let auto = self.xdp_mode == XdpAttachMode::Auto;
        let wanted = |name: &str, hook: Hook| match hook {
            Hook::Tc | Hook::TcEgress => tc_wanted(name),
            Hook::Xdp => xdp_wanted(name) && (!auto || auto_native(name, present.get(name), &can_transmit)),
        };
        // Links of interfaces that disappeared, were recreated under the same name, or are no
        // longer wanted.
        let stale: Vec<(String, Hook)> = self
            .attached
            .iter()
            .filter(|((name, hook), (idx, _))| present.get(name) != Some(idx) || !wanted(name, *hook))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, pinned)) = self.attached.remove(&k) {
                let _ = pinned.unpin();
                tracing::info!(iface = %k.0, hook = ?k.1, "link removed");
            }
        }
        for (name, ifindex) in &present {
            for hook in [Hook::Tc, Hook::TcEgress, Hook::Xdp] {
                let k = (name.clone(), hook);
                if !wanted(name, hook) || self.attached.contains_key(&k) {
                    continue;
                }
                match self.attach(name, hook) {
                    Ok(pinned) => {
                        self.attach_failures.remove(&k);
                        self.attached.insert(k, (*ifindex, pinned));
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if self.attach_failures.get(&k) != Some(&text) {
                            self.attach_failures.insert(k, text);
                            errors.push(e);
                        }
                    }
                }
            }
        }
        // Pins of links for interfaces no longer here or no longer wanted (a previous agent's).
        if let Ok(dir) = fs::read_dir(self.pin_dir.join(LINKS_DIR)) {
            for entry in dir.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let Some((iface, hook)) = iface_of_link_pin(&file) else { continue };
                if !present.contains_key(&iface) || !wanted(&iface, hook) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        errors
    }

    /// Makes `LB_XDP_TARGETS` hold exactly `want`.
    fn sync_xdp_targets(&mut self, want: BTreeSet<u32>, errors: &mut Vec<DataplaneError>) {
        for gone in self.xdp_targets.difference(&want).copied().collect::<Vec<_>>() {
            let _ = self.maps.xdp_targets.remove(&gone);
            self.xdp_targets.remove(&gone);
        }
        for new in want.difference(&self.xdp_targets).copied().collect::<Vec<_>>() {
            match self.maps.xdp_targets.insert(new, 1, 0) {
                Ok(()) => {
                    self.xdp_targets.insert(new);
                }
                Err(e) => errors.push(DataplaneError::Map { name: lb_common::MAP_XDP_TARGETS, source: e }),
            }
        }
    }

    fn attach(&mut self, iface: &str, hook: Hook) -> Result<PinnedLink> {
        let pin = self.link_pin(iface, hook);
        let link_err = |what: &'static str| {
            let iface = iface.to_string();
            move |e: &(dyn std::error::Error + 'static)| DataplaneError::Link { iface, what, detail: error_chain(e) }
        };
        // A link pinned by an earlier agent: swap our program into it. bpf_link_update is
        // atomic, so no packet on the interface goes unprocessed during an upgrade.
        if pin.exists() {
            match self.take_over(&pin, hook) {
                Ok(()) => {
                    // The pin already names this link; keep a handle by opening it again.
                    let pinned = PinnedLink::from_pin(&pin).map_err(|e| link_err("reopening pinned link")(&e))?;
                    tracing::info!(iface, ?hook, "took over pinned link");
                    return Ok(pinned);
                }
                Err(e) => {
                    // Typically the interface was recreated and the old link is defunct.
                    tracing::warn!(iface, ?hook, error = %e, "could not take over pinned link; attaching anew");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let fd = match hook {
            Hook::Tc => {
                let prog: &mut SchedClassifier =
                    self.ebpf.program_mut(PROG_TC_INGRESS).expect("loaded in Dataplane::load").try_into()?;
                let id = prog.attach(iface, TcAttachType::Ingress)?;
                FdLink::try_from(prog.take_link(id)?)
                    .map_err(|e| link_err("tc link is not a TCX link (kernel < 6.6?)")(&e))?
            }
            Hook::TcEgress => {
                let prog: &mut SchedClassifier =
                    self.ebpf.program_mut(lb_common::PROG_TC_EGRESS).expect("loaded in Dataplane::load").try_into()?;
                let id = prog.attach(iface, TcAttachType::Egress)?;
                FdLink::try_from(prog.take_link(id)?)
                    .map_err(|e| link_err("tc link is not a TCX link (kernel < 6.6?)")(&e))?
            }
            Hook::Xdp => {
                let mode = self.xdp_mode;
                let prog: &mut Xdp = self.ebpf.program_mut(PROG_XDP).expect("loaded in Dataplane::load").try_into()?;
                let id = match mode {
                    XdpAttachMode::Generic => prog.attach(iface, XdpMode::Skb)?,
                    // Auto only gets here for a driver that transmits native frames.
                    XdpAttachMode::Native | XdpAttachMode::Auto => prog.attach(iface, XdpMode::Driver)?,
                };
                FdLink::try_from(prog.take_link(id)?).map_err(|e| link_err("XDP link is not a bpf_link")(&e))?
            }
        };
        let pinned = fd.pin(&pin).map_err(|e| link_err("pinning link")(&e))?;
        tracing::info!(iface, ?hook, "attached");
        Ok(pinned)
    }

    /// Attaches the socket-level programs (for the node's own processes) to the cgroup v2
    /// hierarchy at `cgroup`, replacing those a previous agent pinned. They act only in this
    /// network namespace (its cookie is patched in at load time).
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let io = |what, source| DataplaneError::Io { what, path: cgroup.to_owned(), source };
        let dir = fs::File::open(cgroup).map_err(|e| io("opening cgroup", e))?;
        for name in PROGS_SOCK {
            let link_err = |what: &'static str| {
                move |e: &(dyn std::error::Error + 'static)| DataplaneError::Link {
                    iface: format!("cgroup {}", cgroup.display()),
                    what,
                    detail: format!("{name}: {}", error_chain(e)),
                }
            };
            let prog: &mut CgroupSockAddr = self.ebpf.program_mut(name).expect("loaded").try_into()?;
            // A cgroup bpf_link always coexists with other programs; the kernel refuses the
            // BPF_F_ALLOW_MULTI flag on BPF_LINK_CREATE (EINVAL), so no mode flag is passed.
            let id = prog.attach(&dir, CgroupAttachMode::Single)?;
            let fd = FdLink::try_from(prog.take_link(id)?).map_err(|e| link_err("cgroup link")(&e))?;
            // Pin beside the previous agent's link, then rename over it: the old program is
            // detached only once ours runs (both running is harmless: the second sees a backend
            // address, which is no frontend).
            let pin = self.pin_dir.join(LINKS_DIR).join(name);
            let fresh = self.pin_dir.join(LINKS_DIR).join(format!("{name}_new"));
            let _ = fs::remove_file(&fresh);
            let pinned = fd.pin(&fresh).map_err(|e| link_err("pinning link")(&e))?;
            fs::rename(&fresh, &pin).map_err(|e| io("replacing pinned cgroup link", e))?;
            drop(pinned);
        }
        tracing::info!(cgroup = %cgroup.display(), "socket-level translation attached for this node's processes");
        Ok(())
    }

    /// Replaces the program of a link pinned at `pin` with ours.
    fn take_over(&mut self, pin: &Path, hook: Hook) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let fd = FdLink::from(PinnedLink::from_pin(pin)?);
        match hook {
            Hook::Tc | Hook::TcEgress => {
                let name = if hook == Hook::Tc { PROG_TC_INGRESS } else { lb_common::PROG_TC_EGRESS };
                let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
                let id = prog.attach_to_link(SchedClassifierLink::try_from(fd)?)?;
                // Our handle closes; the pin keeps the link (and our program in it).
                drop(prog.take_link(id)?);
            }
            Hook::Xdp => {
                let prog: &mut Xdp = self.ebpf.program_mut(PROG_XDP).expect("loaded").try_into()?;
                let id = prog.attach_to_link(XdpLink::try_from(fd)?)?;
                drop(prog.take_link(id)?);
            }
        }
        Ok(())
    }

    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .attached
            .keys()
            .map(|(name, hook)| match hook {
                Hook::Tc => format!("{name}(tc)"),
                Hook::TcEgress => format!("{name}(tc-egress)"),
                Hook::Xdp => format!("{name}(xdp)"),
            })
            .collect();
        v.sort();
        v
    }
}

/// Whether the agent attaches to `name`: every interface but `lo` by default, else those
/// matching one of `globs` (`*` any run, `?` one character).
pub fn interface_wanted(globs: &[String], name: &str) -> bool {
    fn matches(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => matches(&p[1..], n) || (!n.is_empty() && matches(p, &n[1..])),
            (Some(b'?'), Some(_)) => matches(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &n[1..]),
            _ => false,
        }
    }
    if globs.is_empty() {
        name != "lo"
    } else {
        globs.iter().any(|g| matches(g.as_bytes(), name.as_bytes()))
    }
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Tc,
    /// Replies of host-network endpoints: the node's own packets pass no ingress hook.
    TcEgress,
    Xdp,
}

impl Hook {
    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Tc => "tc_ingress_",
            Hook::TcEgress => "tc_egress_",
            Hook::Xdp => "xdp_",
        }
    }
}

/// Whether `Auto` attaches native XDP on an interface: a driver that transmits native frames,
/// on a physical device (one with a bus address, as `ethtool -i` shows). Virtual devices (veth,
/// bridges, tunnels) are left to tc: a veth advertises `ndo-xmit` once its peer has GRO,
/// yet in this project's lab replies sent with native XDP_TX over such a veth were lost, and
/// a veth's packets are CHECKSUM_PARTIAL, which XDP leaves to tc anyway. `--xdp-mode native`
/// still forces it.
fn auto_native(name: &str, ifindex: Option<&u32>, can_transmit: &dyn Fn(u32) -> bool) -> bool {
    let physical = crate::xdp_features::driver_info(name).is_some_and(|(_, bus)| !bus.is_empty());
    physical && ifindex.is_some_and(|i| can_transmit(*i))
}

/// bpffs refuses names with a dot (`bpf_lookup` reserves them for its own files), and
/// interface names may have one (VLANs: `eth0.100`); `%` can never be in an interface name.
pub fn link_pin_name(iface: &str, hook: Hook) -> String {
    format!("{}{}", hook.pin_prefix(), iface.replace('.', "%"))
}

/// The first cgroup v2 mount (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14).
fn netns_cookie() -> Result<u64> {
    let err =
        |source| DataplaneError::Io { what: "reading the cookie of", path: "this network namespace".into(), source };
    // SAFETY: a throwaway socket queried with getsockopt into a u64, then closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie as *mut u64 as *mut _, &mut len);
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err(e));
        }
        Ok(cookie)
    }
}

fn iface_of_link_pin(file: &str) -> Option<(String, Hook)> {
    [Hook::Tc, Hook::TcEgress, Hook::Xdp]
        .into_iter()
        .find_map(|h| file.strip_prefix(h.pin_prefix()).map(|i| (i.replace('%', "."), h)))
}

/// An error and all its causes on one line: aya's errors keep the OS error in `source()`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// IPv4 addresses of the current network namespace (`getifaddrs(3)`).
pub fn local_ipv4_addresses() -> Result<Vec<Ipv4Addr>> {
    Ok(local_ipv4_by_interface()?.into_iter().map(|(_, ip)| ip).collect())
}

/// (interface, IPv4 address) pairs of the current network namespace.
pub fn local_ipv4_by_interface() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(DataplaneError::Io {
                what: "listing addresses of",
                path: PathBuf::from("this network namespace"),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                out.push((CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned(), ip));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// Interfaces of the current network namespace, by name and index (`if_nameindex(3)`, which
/// asks netlink, so it is right inside `ip netns exec` or `nsenter --net`).
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(DataplaneError::Io {
                what: "listing interfaces of",
                path: PathBuf::from("this network namespace"),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 {
            out.push((CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(), (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// Removes everything an agent pinned: links (detaching the programs) and maps.
pub fn cleanup(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    fs::remove_dir_all(pin_dir).map_err(|source| DataplaneError::Io {
        what: "removing",
        path: pin_dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_selection() {
        let none: Vec<String> = vec![];
        assert!(interface_wanted(&none, "eth0"));
        assert!(!interface_wanted(&none, "lo"));
        let globs = vec!["veth*".to_string(), "eth?".to_string()];
        assert!(interface_wanted(&globs, "veth1a2b"));
        assert!(interface_wanted(&globs, "eth1"));
        assert!(!interface_wanted(&globs, "eth10"));
        assert!(!interface_wanted(&globs, "cbr0"));
        assert!(!interface_wanted(&globs, "lo"));
    }

    #[test]
    fn link_pin_names_survive_dotted_interface_names() {
        assert_eq!(link_pin_name("eth0.100", Hook::Tc), "tc_ingress_eth0%100");
        assert_eq!(iface_of_link_pin(&link_pin_name("eth0.100", Hook::Tc)), Some(("eth0.100".to_string(), Hook::Tc)));
        assert_eq!(iface_of_link_pin(&link_pin_name("eth0", Hook::Xdp)), Some(("eth0".to_string(), Hook::Xdp)));
        assert_eq!(iface_of_link_pin("maps.debug"), None);
    }

    #[test]
    fn names_are_truncated_on_a_character_boundary() {
        let long = "ü".repeat(100);
        let decoded = decode_name(&encode_name(&long));
        assert!(long.starts_with(&decoded) && decoded.len() <= 119);
        assert_eq!(decode_name(&encode_name("default/web-service:http")), "default/web-service:http");
    }
}
