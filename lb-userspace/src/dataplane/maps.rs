//! The pinned maps, typed, and how model values are encoded into their keys and values.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
    Ebpf,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendMemberKey, CtKey4, CtKey6, CtValue4, CtValue6, NodeAddrKey, ServiceKey,
    ServiceName, ServiceValue, SourceRangeData, BACKEND_FLAG_LOCAL, FAMILY_IPV6, MAP_AFFINITY, MAP_BACKENDS,
    MAP_BACKEND_MEMBERS, MAP_CT4, MAP_CT4_NEW, MAP_CT6, MAP_CT6_NEW, MAP_FILTER, MAP_MAGLEV, MAP_NODE_ADDRS,
    MAP_SERVICES, MAP_SERVICE_NAMES, MAP_SOCK_REVNAT, MAP_SOURCE_RANGES, MAP_STATS, SCOPE_EXACT, SCOPE_NODEPORT,
    SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY, SVC_FLAG_SOURCE_RANGES,
};

pub use lb_common::SCOPE_FROM_CLUSTER;

use super::{conntrack::CtAddr, ct_new::CtNewTable, DataplaneError, MapSizes, Result};
use crate::model::{Cidr, Endpoint, Frontend, IpFamily, Protocol, Scope, ServicePort};

pub(super) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// An address as the maps hold it, in network order as in the packet: IPv4 in the first word
/// (the others zero), IPv6 in all four.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(a) => w[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (i, c) in a.octets().chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    w
}

/// The address of a map entry with family tag `family` (`FAMILY_IPV4` or `FAMILY_IPV6`; any
/// other tag reads as IPv4, as entries written before the tag meant something did).
pub fn ip_of(family: u8, addr: [u32; 4]) -> IpAddr {
    if family == FAMILY_IPV6 {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(o).into()
    } else {
        ipv4(addr).into()
    }
}

/// The family tag of an address.
pub fn family_tag(ip: IpAddr) -> u8 {
    IpFamily::of(ip).tag()
}

/// The 32 bits the pre-filter hashes for an address: IPv4 as is, IPv6 folded
/// (`lb_common::fold_v6`), as the datapath does.
pub fn filter_addr(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
        IpAddr::V6(_) => lb_common::fold_v6(addr_words(ip)),
    }
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr_words(f.ip),
        port: f.port.to_be(),
        proto: f.protocol.number(),
        family: family_tag(f.ip),
        scope: match f.scope {
            Scope::NodePort => SCOPE_NODEPORT,
            Scope::NodePortFromCluster => SCOPE_NODEPORT | SCOPE_FROM_CLUSTER,
            Scope::ExternalFromCluster => SCOPE_EXACT | SCOPE_FROM_CLUSTER,
            Scope::ClusterIp | Scope::External => SCOPE_EXACT,
        },
        _pad: [0; 3],
    }
}

/// The frontend a service key stands for. Exact-address keys of external frontends look like
/// ClusterIP keys; `flags` (the value's) tells them apart.
pub fn frontend_of(k: &ServiceKey, flags: u32) -> Option<Frontend> {
    let (ip, port, protocol) = (ip_of(k.family, k.addr), u16::from_be(k.port), Protocol::from_number(k.proto)?);
    // A companion's entry is no external frontend of its own (no SNAT for the cluster's own
    // sources), but its key is one's.
    let companion = k.scope & SCOPE_FROM_CLUSTER != 0;
    let primary = match (k.scope & !SCOPE_FROM_CLUSTER, flags & SVC_FLAG_EXTERNAL != 0 || companion) {
        (SCOPE_NODEPORT, _) => Frontend::node_port_of(IpFamily::of(ip), port, protocol),
        (_, true) => Frontend::external(ip, port, protocol),
        (_, false) => Frontend::cluster_ip(ip, port, protocol),
    };
    if k.scope & SCOPE_FROM_CLUSTER != 0 {
        primary.from_cluster()
    } else {
        Some(primary)
    }
}

pub fn backend_value(e: &Endpoint) -> Backend {
    Backend {
        addr: addr_words(e.ip),
        port: e.port.to_be(),
        family: family_tag(e.ip),
        flags: if e.local { BACKEND_FLAG_LOCAL } else { 0 },
        _pad: 0,
    }
}

pub(super) fn member_key(service_id: u32, e: &Endpoint) -> BackendMemberKey {
    let b = backend_value(e);
    BackendMemberKey { service_id, port: b.port, family: b.family, _pad: 0, addr: b.addr }
}

pub fn endpoint_of(b: &Backend) -> Endpoint {
    Endpoint { ip: ip_of(b.family, b.addr), port: u16::from_be(b.port), local: b.flags & BACKEND_FLAG_LOCAL != 0 }
}

/// A source range of a frontend: the service id, then the client prefix of the frontend's
/// family (a service id has one family, so the trie needs no tag).
pub(super) fn source_range_key(service_id: u32, c: &Cidr) -> LpmKey<SourceRangeData> {
    LpmKey::new(32 + c.len as u32, SourceRangeData { service_id_be: service_id.to_be(), addr: addr_words(c.addr) })
}

/// An `LB_LOCAL_SOURCES` prefix: the family, then the address.
pub(super) fn local_source_key(c: &Cidr) -> LpmKey<lb_common::LocalSourceData> {
    LpmKey::new(
        32 + c.len as u32,
        lb_common::LocalSourceData { family_be: (c.family().tag() as u32).to_be(), addr: addr_words(c.addr) },
    )
}

pub(super) fn service_value(
    id: u32,
    generation: u16,
    sp: &ServicePort,
    table_off: u32,
    table_size: u32,
) -> ServiceValue {
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
        table_off,
        table_size,
    }
}

pub fn ipv4(addr: [u32; 4]) -> Ipv4Addr {
    Ipv4Addr::from(addr[0].to_ne_bytes())
}

pub(super) fn encode_name(name: &str) -> ServiceName {
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

/// The pinned maps, typed.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: Array<MapData, Backend>,
    /// Handle on the Maglev tables, two slots to an element (see `maglev_slot`; the agent
    /// writes them through a mapping).
    pub maglev: Array<MapData, u64>,
    /// Assured flows (`LB_CT4`).
    pub conntrack: HashMap<MapData, CtKey4, CtValue4>,
    /// New and finished flows (`LB_CT4_NEW`, a set-associative array).
    pub conntrack_new: CtNewTable<MapData, u32>,
    /// The same for IPv6 flows (`LB_CT6`, `LB_CT6_NEW`).
    pub conntrack6: HashMap<MapData, CtKey6, CtValue6>,
    pub conntrack6_new: CtNewTable<MapData, [u32; 4]>,
    pub names: HashMap<MapData, u32, ServiceName>,
    pub stats: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, lb_common::ServiceStats>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub members: HashMap<MapData, BackendMemberKey, u32>,
    pub node_addrs: HashMap<MapData, NodeAddrKey, u32>,
    pub sock_revnat: HashMap<MapData, lb_common::SockRevKey, lb_common::SockRevValue>,
    pub filter: Array<MapData, u64>,
    pub source_ranges: LpmTrie<MapData, SourceRangeData, u8>,
    pub local_sources: LpmTrie<MapData, lb_common::LocalSourceData, u8>,
    pub xdp_targets: HashMap<MapData, u32, u32>,
    /// SNAT ports claimed at this instant (`LB_SNAT_CLAIMS`): tests stage claims in it.
    pub snat_claims: Array<MapData, u64>,
}

impl Maps {
    /// Maglev table slot `slot`: the backend id it names.
    pub fn maglev_slot(&self, slot: u32) -> std::result::Result<u32, MapError> {
        let pair = self.maglev.get(&(slot / 2), 0)?;
        Ok((pair >> ((slot % 2) * 32)) as u32)
    }

    pub(super) fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
            ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })
        }
        Ok(Self {
            services: HashMap::try_from(take(ebpf, MAP_SERVICES)?).map_err(map_err(MAP_SERVICES))?,
            backends: Array::try_from(take(ebpf, MAP_BACKENDS)?).map_err(map_err(MAP_BACKENDS))?,
            maglev: Array::try_from(take(ebpf, MAP_MAGLEV)?).map_err(map_err(MAP_MAGLEV))?,
            conntrack: HashMap::try_from(take(ebpf, MAP_CT4)?).map_err(map_err(MAP_CT4))?,
            conntrack_new: u32::new_table(take(ebpf, MAP_CT4_NEW)?, MAP_CT4_NEW)?,
            conntrack6: HashMap::try_from(take(ebpf, MAP_CT6)?).map_err(map_err(MAP_CT6))?,
            conntrack6_new: <[u32; 4]>::new_table(take(ebpf, MAP_CT6_NEW)?, MAP_CT6_NEW)?,
            names: HashMap::try_from(take(ebpf, MAP_SERVICE_NAMES)?).map_err(map_err(MAP_SERVICE_NAMES))?,
            stats: PerCpuArray::try_from(take(ebpf, MAP_STATS)?).map_err(map_err(MAP_STATS))?,
            service_stats: PerCpuArray::try_from(take(ebpf, lb_common::MAP_SERVICE_STATS)?)
                .map_err(map_err(lb_common::MAP_SERVICE_STATS))?,
            affinity: HashMap::try_from(take(ebpf, MAP_AFFINITY)?).map_err(map_err(MAP_AFFINITY))?,
            members: HashMap::try_from(take(ebpf, MAP_BACKEND_MEMBERS)?).map_err(map_err(MAP_BACKEND_MEMBERS))?,
            node_addrs: HashMap::try_from(take(ebpf, MAP_NODE_ADDRS)?).map_err(map_err(MAP_NODE_ADDRS))?,
            sock_revnat: HashMap::try_from(take(ebpf, MAP_SOCK_REVNAT)?).map_err(map_err(MAP_SOCK_REVNAT))?,
            filter: Array::try_from(take(ebpf, MAP_FILTER)?).map_err(map_err(MAP_FILTER))?,
            source_ranges: LpmTrie::try_from(take(ebpf, MAP_SOURCE_RANGES)?).map_err(map_err(MAP_SOURCE_RANGES))?,
            local_sources: LpmTrie::try_from(take(ebpf, lb_common::MAP_LOCAL_SOURCES)?)
                .map_err(map_err(lb_common::MAP_LOCAL_SOURCES))?,
            xdp_targets: HashMap::try_from(take(ebpf, lb_common::MAP_XDP_TARGETS)?)
                .map_err(map_err(lb_common::MAP_XDP_TARGETS))?,
            snat_claims: Array::try_from(take(ebpf, lb_common::MAP_SNAT_CLAIMS)?)
                .map_err(map_err(lb_common::MAP_SNAT_CLAIMS))?,
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
            backends: Array::try_from(open(pin_dir, MAP_BACKENDS)?).map_err(map_err(MAP_BACKENDS))?,
            maglev: Array::try_from(open(pin_dir, MAP_MAGLEV)?).map_err(map_err(MAP_MAGLEV))?,
            conntrack: HashMap::try_from(open(pin_dir, MAP_CT4)?).map_err(map_err(MAP_CT4))?,
            conntrack_new: u32::new_table(open(pin_dir, MAP_CT4_NEW)?, MAP_CT4_NEW)?,
            conntrack6: HashMap::try_from(open(pin_dir, MAP_CT6)?).map_err(map_err(MAP_CT6))?,
            conntrack6_new: <[u32; 4]>::new_table(open(pin_dir, MAP_CT6_NEW)?, MAP_CT6_NEW)?,
            names: HashMap::try_from(open(pin_dir, MAP_SERVICE_NAMES)?).map_err(map_err(MAP_SERVICE_NAMES))?,
            stats: PerCpuArray::try_from(open(pin_dir, MAP_STATS)?).map_err(map_err(MAP_STATS))?,
            service_stats: PerCpuArray::try_from(open(pin_dir, lb_common::MAP_SERVICE_STATS)?)
                .map_err(map_err(lb_common::MAP_SERVICE_STATS))?,
            affinity: HashMap::try_from(open(pin_dir, MAP_AFFINITY)?).map_err(map_err(MAP_AFFINITY))?,
            members: HashMap::try_from(open(pin_dir, MAP_BACKEND_MEMBERS)?).map_err(map_err(MAP_BACKEND_MEMBERS))?,
            node_addrs: HashMap::try_from(open(pin_dir, MAP_NODE_ADDRS)?).map_err(map_err(MAP_NODE_ADDRS))?,
            sock_revnat: HashMap::try_from(open(pin_dir, MAP_SOCK_REVNAT)?).map_err(map_err(MAP_SOCK_REVNAT))?,
            filter: Array::try_from(open(pin_dir, MAP_FILTER)?).map_err(map_err(MAP_FILTER))?,
            source_ranges: LpmTrie::try_from(open(pin_dir, MAP_SOURCE_RANGES)?).map_err(map_err(MAP_SOURCE_RANGES))?,
            local_sources: LpmTrie::try_from(open(pin_dir, lb_common::MAP_LOCAL_SOURCES)?)
                .map_err(map_err(lb_common::MAP_LOCAL_SOURCES))?,
            xdp_targets: HashMap::try_from(open(pin_dir, lb_common::MAP_XDP_TARGETS)?)
                .map_err(map_err(lb_common::MAP_XDP_TARGETS))?,
            snat_claims: Array::try_from(open(pin_dir, lb_common::MAP_SNAT_CLAIMS)?)
                .map_err(map_err(lb_common::MAP_SNAT_CLAIMS))?,
        })
    }
}

impl MapSizes {
    pub(super) fn of(&self, name: &'static str) -> u32 {
        match name {
            MAP_SERVICES | MAP_SERVICE_NAMES => self.services,
            MAP_BACKENDS => self.backends,
            MAP_MAGLEV => self.maglev.div_ceil(2),
            MAP_BACKEND_MEMBERS => lb_common::BACKEND_MEMBERS_MAX_ENTRIES,
            MAP_CT4 | MAP_CT6 => self.conntrack,
            // Whole sets, two at least: with one, every way's index is a constant, and the
            // verifier, following each apart, ran past its million instructions.
            // Both families' tables have the same sets (`CT_NEW_SETS` is the datapath's count
            // for both).
            MAP_CT4_NEW | MAP_CT6_NEW => {
                self.conntrack_new.div_ceil(lb_common::CT_WAYS as u32).max(2) * lb_common::CT_WAYS as u32
            }
            // A slot for every other assured entry, in pairs: 64 bytes per flow of the assured
            // table's room (both directions), where a slot per entry would take 128.
            lb_common::MAP_CT4_CACHE => (self.conntrack / 2).max(2).next_multiple_of(2),
            // The generation word, then a word of stamps per `CT_LIVE_ENTRIES_PER_WORD` assured
            // entries: 4 bytes per flow of the assured table's room.
            lb_common::MAP_CT4_LIVE => 1 + lb_common::ct_live_words(self.conntrack),
            MAP_AFFINITY => self.affinity,
            // Ids start at 1, indexing the array directly.
            lb_common::MAP_SERVICE_STATS => self.services + 1,
            MAP_NODE_ADDRS => lb_common::NODE_ADDRS_MAX_ENTRIES,
            MAP_SOURCE_RANGES => lb_common::SOURCE_RANGES_MAX_ENTRIES,
            lb_common::MAP_LOCAL_SOURCES => lb_common::LOCAL_SOURCES_MAX_ENTRIES,
            MAP_STATS => lb_common::COUNTER_MAX * lb_common::HOOKS,
            MAP_FILTER => 2 * lb_common::FILTER_WORDS,
            lb_common::MAP_SERVICES_GEN => 1,
            MAP_SOCK_REVNAT => lb_common::SOCK_REVNAT_MAX_ENTRIES,
            lb_common::MAP_XDP_TARGETS => lb_common::XDP_TARGETS_MAX_ENTRIES,
            lb_common::MAP_FRAGMENTS => lb_common::FRAGMENTS_MAX_ENTRIES,
            lb_common::MAP_SNAT_CLAIMS => lb_common::SNAT_CLAIM_SLOTS,
            _ => 0,
        }
    }
}

/// Turns an insert failure into a "map full" report when that is what the kernel said.
pub(super) fn insert_err(sizes: MapSizes, name: &'static str, what: String) -> impl FnOnce(MapError) -> DataplaneError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_truncated_on_a_character_boundary() {
        let long = "ü".repeat(100);
        let decoded = decode_name(&encode_name(&long));
        assert!(long.starts_with(&decoded) && decoded.len() <= 119);
        assert_eq!(decode_name(&encode_name("default/web-service:http")), "default/web-service:http");
    }
}
