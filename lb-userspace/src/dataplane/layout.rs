//! Maps a previous agent pinned (perhaps another version, or other `--map-*` sizes), checked
//! before the loader adopts them, and flow maps moved to a new capacity with their flows.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendMemberKey, CtKey, CtKey4, CtKey6, CtValue, CtValue4, CtValue6, CtWay,
    CtWay4, CtWay6, NodeAddrKey, ServiceKey, ServiceName, ServiceValue, SourceRangeData, MAP_AFFINITY,
    MAP_BACKEND_MEMBERS, MAP_CT4, MAP_CT4_NEW, MAP_CT6, MAP_CT6_NEW, MAP_FILTER, MAP_NODE_ADDRS, MAP_SERVICES,
    MAP_SERVICE_NAMES, MAP_SOCK_REVNAT, MAP_SOURCE_RANGES, MAP_STATS,
};

use super::{
    conntrack::{carry_over_legacy, legacy, CtAddr, CtTables},
    ct_new::CtNewTable,
    maps::map_err,
    Dataplane, DataplaneError, MapSizes, Result,
};

/// Maps that only make sense together: a service entry names its id (names, counters,
/// memberships), its Maglev table's range and, through it, backend ids.
const SERVICE_GROUP: [&str; 6] = [
    MAP_SERVICES,
    MAP_SERVICE_NAMES,
    lb_common::MAP_SERVICE_STATS,
    lb_common::MAP_MAGLEV,
    lb_common::MAP_BACKENDS,
    MAP_BACKEND_MEMBERS,
];

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
        s(lb_common::MAP_BACKENDS, 4, size_of::<Backend>(), false),
        s(lb_common::MAP_MAGLEV, 4, 8, false),
        s(MAP_BACKEND_MEMBERS, size_of::<BackendMemberKey>(), 4, false),
        s(MAP_STATS, 4, 8, false),
        s(MAP_NODE_ADDRS, size_of::<NodeAddrKey>(), 4, false),
        s(MAP_SOURCE_RANGES, 4 + size_of::<SourceRangeData>(), 1, false),
        s(lb_common::MAP_LOCAL_SOURCES, 4 + size_of::<lb_common::LocalSourceData>(), 1, false),
        s(MAP_FILTER, 4, 8, false),
        s(lb_common::MAP_SERVICES_GEN, 4, 4, false),
        s(MAP_CT4, size_of::<CtKey4>(), size_of::<CtValue4>(), true),
        s(MAP_CT4_NEW, 4, size_of::<CtWay4>(), true),
        s(MAP_CT6, size_of::<CtKey6>(), size_of::<CtValue6>(), true),
        s(MAP_CT6_NEW, 4, size_of::<CtWay6>(), true),
        s(MAP_AFFINITY, size_of::<AffinityKey>(), size_of::<AffinityValue>(), true),
        s(MAP_SOCK_REVNAT, size_of::<lb_common::SockRevKey>(), size_of::<lb_common::SockRevValue>(), true),
        s(lb_common::MAP_XDP_TARGETS, 4, 4, false),
        // Claims of SNAT ports hold for a jiffy or two: rebuilt rather than migrated.
        s(lb_common::MAP_SNAT_CLAIMS, 4, 8, false),
        // Fragments in flight live for milliseconds: rebuilt rather than migrated.
        s(lb_common::MAP_FRAGMENTS, size_of::<lb_common::FragKey>(), size_of::<lb_common::FragValue>(), false),
    ]
}

/// A flow map moved to a new capacity, or the conntrack map of an older layout whose flows
/// move into the new tables: the old map stays open until the new program has replaced the
/// old one in every link, so flows the old program created meanwhile can be copied over too.
pub struct Migration {
    name: &'static str,
    old: Map,
    path: PathBuf,
    /// The old map is of another layout (`conntrack::legacy`), converted rather than copied,
    /// and unpinned once the old programs are gone.
    legacy: bool,
}

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

/// Copies every entry of a new-flow table into another: from an array of sets, of this or
/// another size, or from the LRU hash of conntrack keys these tables were before (IPv4's up to layout 6, IPv6's up to 9).
fn copy_new_flows<A: CtAddr>(from: &Map, to: &mut Map, only_new: bool) -> std::result::Result<usize, MapError>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
    CtWay<A>: aya::Pod,
{
    let entries: Vec<(CtKey<A>, CtValue<A>)> = match from {
        Map::Array(_) => CtNewTable::new(Array::<&MapData, CtWay<A>>::try_from(from)?)
            .iter()
            .filter_map(std::result::Result::ok)
            .collect(),
        _ => HashMap::<&MapData, CtKey<A>, CtValue<A>>::try_from(from)?
            .iter()
            .filter_map(std::result::Result::ok)
            .collect(),
    };
    let mut dst = CtNewTable::new(Array::<&mut MapData, CtWay<A>>::try_from(to)?);
    let flags = if only_new {
        1 /* BPF_NOEXIST */
    } else {
        0
    };
    let copied = entries.into_iter().filter(|(k, v)| dst.insert(*k, *v, flags).is_ok()).count();
    // A SNATed flow whose reply entry found no room (pushed out, or refused) goes whole, as the
    // datapath's do: its SNAT port would otherwise look free to the port search while its
    // client's packets still took it. Its next packet starts it again.
    let orphans: Vec<CtKey<A>> = dst
        .iter()
        .filter_map(std::result::Result::ok)
        .filter(|(k, v)| k.dir == lb_common::CT_DIR_FORWARD && v.flags & lb_common::CT_FLAG_SNAT != 0)
        .filter(|(k, v)| dst.get(&lb_common::ct_peer(k, v).0, 0).is_err())
        .map(|(k, _)| k)
        .collect();
    for k in &orphans {
        let _ = dst.remove(k);
    }
    Ok(copied - orphans.len().min(copied))
}

fn copy_flow_map(name: &'static str, from: &Map, to: &mut Map, only_new: bool) -> Result<usize> {
    match name {
        MAP_CT4 => copy_entries::<CtKey4, CtValue4>(from, to, only_new),
        MAP_CT6 => copy_entries::<CtKey6, CtValue6>(from, to, only_new),
        MAP_CT4_NEW => copy_new_flows::<u32>(from, to, only_new),
        MAP_CT6_NEW => copy_new_flows::<[u32; 4]>(from, to, only_new),
        MAP_AFFINITY => copy_entries::<AffinityKey, AffinityValue>(from, to, only_new),
        _ => copy_entries::<lb_common::SockRevKey, lb_common::SockRevValue>(from, to, only_new),
    }
    .map_err(map_err(name))
}

/// Gives a pinned flow map a new capacity without losing its flows: a new map is created,
/// filled from the old, pinned beside it and renamed over the old pin, so the loader adopts it.
/// `to`: the new map's type, shape and flags, when they change too (a new-flow table of layout
/// 6, an LRU hash, becomes an array of ways).
fn migrate_flow_map(
    name: &'static str,
    path: &Path,
    capacity: u32,
    to: Option<(u32, Shape, u32)>,
) -> Result<Migration> {
    let old = MapData::from_pin(path).map_err(map_err(name))?;
    let info = old.info().map_err(map_err(name))?;
    let (kind, (key, value, capacity), flags) = match to {
        Some(t) => t,
        None => (
            info.map_type().map_err(map_err(name))? as u32,
            (info.key_size(), info.value_size(), capacity),
            info.map_flags(),
        ),
    };
    let obj = aya_obj::Map::new_from_params(kind, key, value, capacity, flags);
    let new = MapData::create(obj, name, None).map_err(map_err(name))?;
    let old = Map::from_map_data(old).map_err(map_err(name))?;
    let mut new = Map::from_map_data(new).map_err(map_err(name))?;
    let copied = copy_flow_map(name, &old, &mut new, false)?;
    // bpffs refuses names with a dot (bpf_lookup in kernel/bpf/inode.c).
    let tmp = path.with_file_name(format!("{name}_migrating"));
    let _ = fs::remove_file(&tmp);
    let pinned = match &new {
        Map::LruHashMap(d) | Map::HashMap(d) | Map::Array(d) => d.pin(&tmp),
        _ => unreachable!("created as a hash or an array"),
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
        "flow map moved to its new capacity or layout with its flows"
    );
    Ok(Migration { name, old, path: path.to_owned(), legacy: false })
}

/// `BPF_MAP_TYPE_ARRAY`, and `BPF_F_MMAPABLE` (as `LB_CT4_NEW` is declared).
const ARRAY: u32 = 2;
const MMAPABLE: u32 = 1 << 10;

/// The key and value size a new-flow table had while it was an LRU hash: IPv4's up to layout
/// 6, IPv6's up to layout 9.
fn lru_new_flow_table(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    match name {
        MAP_CT4_NEW => Some((size_of::<CtKey4>() as u32, size_of::<CtValue4>() as u32)),
        MAP_CT6_NEW => Some((size_of::<CtKey6>() as u32, size_of::<CtValue6>() as u32)),
        _ => None,
    }
}

/// Whether a pinned IPv4 new-flow table holds an entry outside the set `ct_set_hash` gives its
/// key now: a table of layout 7 or before, when no service name tells the version (a node
/// with no Service left, its last flows still in their handshake or finished). A system call
/// per way, only then.
fn new_flows_misplaced(path: &Path) -> bool {
    let Ok(map) = MapData::from_pin(path).and_then(Map::from_map_data) else { return false };
    let Ok(ways) = Array::<&MapData, CtWay4>::try_from(&map) else { return false };
    let per_set = lb_common::CT_WAYS as u32;
    let sets = ways.len() / per_set;
    (0..ways.len()).any(|i| {
        let Ok(w) = ways.get(&i, 0) else { return false };
        let k = w.key;
        let first =
            lb_common::select_slot(lb_common::ct_set_hash(k.src, k.dst, k.sport, k.dport, k.proto, k.dir), sets.max(1))
                * per_set;
        k.proto != 0 && !(first..first + per_set).contains(&i)
    })
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
pub(super) fn check_pinned_layout(pin_dir: &Path, sizes: &MapSizes) -> Result<Vec<Migration>> {
    // The version is stamped in every service name entry; none, none known.
    let pinned_version = MapData::from_pin(pin_dir.join(MAP_SERVICE_NAMES))
        .ok()
        .and_then(|d| Map::from_map_data(d).ok())
        .and_then(|m| HashMap::<MapData, u32, ServiceName>::try_from(m).ok())
        .and_then(|names| names.iter().filter_map(std::result::Result::ok).map(|(_, n)| n.layout_version).next());
    let version_changed = pinned_version.filter(|v| *v != lb_common::MAP_LAYOUT_VERSION);
    if let Some(v) = version_changed {
        tracing::warn!(
            pinned = v,
            current = lb_common::MAP_LAYOUT_VERSION,
            "pinned maps are of another layout version; rebuilding the service maps (flows are kept)"
        );
    }
    let mut migrations = Vec::new();
    let mut rebuild: Vec<&'static str> = Vec::new();
    for (name, wanted, holds_flows) in expected_shapes(sizes) {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        let show = |s: Shape| format!("key {} B, value {} B, {} entries", s.0, s.1, s.2);
        // Layout 8 chose `LB_CT4_NEW`'s sets anew (`lb_common::ct_set_hash`): a table of an
        // earlier layout, of the same shape, has its flows moved to their new sets.
        let rehash = name == MAP_CT4_NEW
            && found == wanted
            && match pinned_version {
                Some(v) => v < 8,
                None => new_flows_misplaced(&path),
            };
        if found == wanted && (holds_flows || version_changed.is_none()) && !rehash {
            continue;
        }
        if holds_flows {
            let same_layout = (found.0, found.1) == (wanted.0, wanted.1);
            if !same_layout && lru_new_flow_table(name) == Some((found.0, found.1)) {
                tracing::info!(map = name, "new-flow table of an LRU hash: moving its flows into the array of ways");
                migrations.push(migrate_flow_map(name, &path, wanted.2, Some((ARRAY, wanted, MMAPABLE)))?);
                continue;
            }
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
            migrations.push(migrate_flow_map(name, &path, wanted.2, None)?);
            continue;
        }
        tracing::warn!(map = name, found = %show(found), wanted = %show(wanted), "rebuilding a pinned map of another shape");
        rebuild.push(name);
    }
    // Service entries name table ranges and backend ids: the maps they point into are rebuilt
    // with them, or a kept services map would point into an empty array until the first sync.
    if rebuild.iter().any(|n| SERVICE_GROUP.contains(n)) {
        for name in SERVICE_GROUP {
            if !rebuild.contains(&name) && pin_dir.join(name).exists() {
                tracing::warn!(map = name, "rebuilding with the service maps it belongs with");
                rebuild.push(name);
            }
        }
    }
    for name in rebuild {
        let path = pin_dir.join(name);
        fs::remove_file(&path).map_err(|source| DataplaneError::Io { what: "unpinning", path, source })?;
    }
    // The conntrack map of layout version 4: its flows move into the new tables once they
    // exist (after load), and again after the link swap.
    let legacy = pin_dir.join(lb_common::MAP_CONNTRACK_V4);
    if legacy.exists() {
        let name = lb_common::MAP_CONNTRACK_V4;
        let info = aya::maps::MapInfo::from_pin(&legacy).map_err(map_err(name))?;
        let (k, v) = (std::mem::size_of::<legacy::CtKey>() as u32, std::mem::size_of::<legacy::CtValue>() as u32);
        if (info.key_size(), info.value_size()) != (k, v) {
            return Err(DataplaneError::FlowLayout {
                path: legacy,
                found: format!("key {} B, value {} B", info.key_size(), info.value_size()),
                wanted: format!("key {k} B, value {v} B (layout version 4)"),
                pin_dir: pin_dir.to_owned(),
            });
        }
        let old = MapData::from_pin(&legacy).and_then(Map::from_map_data).map_err(map_err(name))?;
        migrations.push(Migration { name, old, path: legacy, legacy: true });
    }
    Ok(migrations)
}

impl Dataplane {
    /// Moves the flows of an older layout's conntrack map into the tables (before the link
    /// swap; with `only_new` after it, keeping what the new programs made meanwhile).
    pub(super) fn carry_over_legacy_flows(&mut self, only_new: bool) {
        for m in self.migrations.iter().filter(|m| m.legacy) {
            let mut tables = match CtTables::open_pinned(&self.pin_dir) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the conntrack tables to carry flows over");
                    return;
                }
            };
            match carry_over_legacy(&m.old, &mut tables, &self.clock, only_new) {
                Ok(n) => tracing::info!(
                    map = m.name,
                    flows = n,
                    only_new,
                    "flows carried over from the previous conntrack layout"
                ),
                Err(e) => {
                    tracing::warn!(map = m.name, error = %e, "cannot carry flows over from the previous conntrack layout")
                }
            }
        }
    }

    /// Unpins the stage tables of earlier loads (`load::STAGE_TABLES`): only the programs
    /// this agent's have replaced in every link used them. The kernel then empties them (a
    /// program array is cleared when no pin or descriptor holds it) and frees their stages. A
    /// pin under the bare name is of a revision that shared one table between agents.
    fn retire_old_stages(&self) {
        for path in pinned_stage_tables(&self.pin_dir) {
            if !self.stage_pins.contains(&path) {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot unpin an earlier stage table");
                }
            }
        }
    }

    /// Once this agent's programs have replaced the old ones in every link: copies the flows
    /// the old programs created in the old flow maps since the migration, then lets the old
    /// maps go, and stamps the assured flows for SYNs (`restamp_live_flows`).
    pub fn finish_migrations(&mut self) {
        self.retire_old_stages();
        self.carry_over_legacy_flows(true);
        for m in std::mem::take(&mut self.migrations) {
            if m.legacy {
                // Its last user, the old program, is detached: unpinning frees it.
                if let Err(e) = fs::remove_file(&m.path) {
                    tracing::warn!(map = m.name, error = %e, "cannot unpin the previous conntrack map");
                }
                continue;
            }
            let result = MapData::from_pin(&m.path)
                .and_then(Map::from_map_data)
                .map_err(map_err(m.name))
                .and_then(|mut new| copy_flow_map(m.name, &m.old, &mut new, true));
            match result {
                Ok(n) => tracing::info!(map = m.name, entries = n, "flows created during the migration copied"),
                Err(e) => tracing::warn!(map = m.name, error = %e, "cannot copy flows created during the migration"),
            }
        }
        // The copied flows, and those the old programs made assured since this agent's load,
        // are stamped now, so their SYNs find them (`lb-ebpf/src/ct_live.rs`).
        self.restamp_live_flows();
    }
}

/// The pins of stage tables (`load::STAGE_TABLES`) in `pin_dir`, of every load; a pin under
/// the bare name is of a revision that shared one table between agents.
fn pinned_stage_tables(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(pin_dir) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|path| {
            path.file_name().and_then(|f| f.to_str()).is_some_and(|file| {
                super::load::STAGE_TABLES
                    .iter()
                    .any(|name| file == *name || file.strip_prefix(name).is_some_and(|rest| rest.starts_with('-')))
            })
        })
        .collect()
}

/// Unpins, before a load, the stage tables that no program in this pin directory's links
/// uses: those of agents that ended between their load and their link swap (killed, crashed,
/// or stopped before the first sync). `retire_old_stages` goes only after a swap, so on a node
/// whose agent keeps failing early each start would leave four program arrays, and the
/// programs in them, pinned for good. A table's users are in its name
/// (`load::name_stage_tables`); tables of the programs in the links stay, as do tables named
/// otherwise (a load that ended before naming them, or an earlier revision's): those go after
/// the next link swap. When in doubt (a link whose information cannot be read) every table
/// stays.
pub(super) fn retire_unlinked_stages(pin_dir: &Path) {
    let Some(linked) = linked_programs(pin_dir) else { return };
    for path in pinned_stage_tables(pin_dir) {
        let Some(users) = stage_table_users(&path) else { continue };
        if users.iter().any(|id| linked.contains(id)) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "unpinned a stage table that no attached program uses"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot unpin an unused stage table"),
        }
    }
}

/// Unpins a failed load's stage tables (`load::stage_table_pins`), named after their programs
/// already (`load::name_stage_tables`) or not.
pub(super) fn unpin_stage_tables(pin_dir: &Path, pins: &[PathBuf; 4]) {
    for path in pinned_stage_tables(pin_dir) {
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else { continue };
        let ours = pins
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .any(|own| file == own || file.strip_prefix(own).is_some_and(|rest| rest.starts_with("-p")));
        if ours {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot unpin a failed load's stage table");
            }
        }
    }
}

/// The ids of the programs a stage table's pin is named after (`-p<id>_<id>`, `-p<id>`).
fn stage_table_users(path: &Path) -> Option<Vec<u32>> {
    let (_, ids) = path.file_name()?.to_str()?.rsplit_once("-p")?;
    ids.split('_').map(|id| id.parse().ok()).collect()
}

/// Ids of the programs attached through the links pinned under `pin_dir`; `None` if any link
/// cannot be read. (Link information takes no capability beyond access to the pin.)
fn linked_programs(pin_dir: &Path) -> Option<std::collections::BTreeSet<u32>> {
    use aya::programs::links::{FdLink, PinnedLink};
    let mut programs = std::collections::BTreeSet::new();
    match fs::read_dir(pin_dir.join(super::LINKS_DIR)) {
        Ok(dir) => {
            for entry in dir {
                let link = PinnedLink::from_pin(entry.ok()?.path()).ok()?;
                programs.insert(FdLink::from(link).info().ok()?.program_id());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return None,
    }
    Some(programs)
}
