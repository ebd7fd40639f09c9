//! Loading the programs against the pinned maps, and adopting the state a previous agent left.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, VecDeque},
    fs,
    path::Path,
    sync::{atomic::AtomicU64, Arc},
};

use aya::{
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
    EbpfLoader,
};
use lb_common::{
    BackendMemberKey, MAP_AFFINITY, MAP_BACKENDS, MAP_BACKEND_MEMBERS, MAP_CT4, MAP_CT4_NEW, MAP_CT6, MAP_CT6_NEW,
    MAP_MAGLEV, MAP_SERVICES, MAP_SERVICE_NAMES, MAP_SOURCE_RANGES, PROGS_SOCK, PROG_BENCH_EMPTY_TC,
    PROG_BENCH_EMPTY_XDP, PROG_TC_INGRESS, PROG_XDP, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY,
};

use super::{
    apply::Programmed,
    clock::Clock,
    conntrack::spawn_collector,
    layout::check_pinned_layout,
    maps::{addr_words, decode_name, endpoint_of, frontend_of, insert_err, ip_of, map_err, member_key},
    stale_udp,
    sys::{is_bpffs, mount_bpffs, netns_cookie},
    Config, Dataplane, DataplaneError, Maps, PinDirLock, Result, XdpAttachMode, LINKS_DIR,
};
use crate::model::{Cidr, Endpoint, ServicePort};

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

impl Dataplane {
    /// Loads the programs, reusing maps pinned under `pin_dir` (and the flows in them).
    ///
    /// A first load that fails (a program the verifier refuses, a map the kernel will not
    /// create) removes the directory it made, so a node or a test is not left with pinned
    /// maps nothing uses. A load over pins a previous agent left keeps them whatever happens:
    /// the programs still attached go on forwarding the flows in them.
    pub fn load(pin_dir: &Path, config: &Config) -> Result<Self> {
        Self::load_in(pin_dir, config, !pin_dir.exists())
    }

    /// `load` for an agent, which holds `lock` on `pin_dir` (`PinDirLock`, see `pin_lock.rs`).
    /// Whether the directory is fresh is judged under the lock (no pins in it: an agent that
    /// held it before may have made it while this one waited), and a fresh directory of a
    /// failed load is removed while the lock is still held.
    pub fn load_locked(pin_dir: &Path, config: &Config, lock: &PinDirLock) -> Result<Self> {
        debug_assert_eq!(lock.path(), pin_dir);
        Self::load_in(pin_dir, config, holds_no_pins(pin_dir))
    }

    /// `load_pinned`, removing the directory if the load fails and it was `fresh`.
    fn load_in(pin_dir: &Path, config: &Config, fresh: bool) -> Result<Self> {
        let loaded = Self::load_pinned(pin_dir, config, fresh);
        if let (Err(e), true) = (&loaded, fresh) {
            if let Err(rm) = fs::remove_dir_all(pin_dir) {
                tracing::warn!(pin_dir = %pin_dir.display(), error = %rm, load_error = %e, "removing the pin directory of a failed first load");
            }
        }
        loaded
    }

    /// `fresh`: no pins were there, so no programs of an earlier load can be running.
    fn load_pinned(pin_dir: &Path, config: &Config, fresh: bool) -> Result<Self> {
        ensure_pin_dir(pin_dir)?;
        let migrations = check_pinned_layout(pin_dir, &config.sizes)?;
        super::layout::retire_unlinked_stages(pin_dir);
        let stage_pins = stage_table_pins(pin_dir);
        let loaded = Self::load_with_stages(pin_dir, config, migrations, stage_pins.clone(), fresh);
        if loaded.is_err() {
            // Nothing runs through this load's stage tables yet, and no later load could tell
            // (they are named after their programs only once those load): unpin them here, or
            // an agent failing at each start on a node with pins would pile them up.
            super::layout::unpin_stage_tables(pin_dir, &stage_pins);
        }
        loaded
    }

    fn load_with_stages(
        pin_dir: &Path,
        config: &Config,
        migrations: Vec<super::layout::Migration>,
        stage_pins: [std::path::PathBuf; 4],
        fresh: bool,
    ) -> Result<Self> {
        let sizes = config.sizes;
        let node_ip = config.node_ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        // The node's IPv6 address for SNAT, in the maps' word order (all zero: none).
        let node_ip6: [u32; 4] = config.node_ip6.map_or([0; 4], |ip| addr_words(ip.into()));
        // `LB_CT4_LIVE`'s words of stamps, after its generation word.
        let live_words = lb_common::ct_live_words(sizes.conntrack);
        // One count of sets serves both families' tables (`CT_NEW_SETS`): a key's set would
        // otherwise be computed for the other table's size. `MapSizes::of` sizes both alike
        // today; this keeps a later change from parting them silently.
        assert_eq!(sizes.of(MAP_CT4_NEW), sizes.of(MAP_CT6_NEW), "both new-flow tables have the same sets");
        let clock = Arc::new(Clock::new()?);
        let ct_timeouts = config.timeouts.in_jiffies(&clock);
        let (refresh, udp_stream) = (clock.to_jiffies(1), clock.to_jiffies(lb_common::CT_UDP_STREAM_S as u64));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global("CT_TIMEOUTS", &ct_timeouts, true)
            .override_global("CT_REFRESH", &refresh, true)
            .override_global("CT_UDP_STREAM", &udp_stream, true)
            .override_global("CT_NEW_SETS", &(sizes.of(MAP_CT4_NEW) / lb_common::CT_WAYS as u32), true)
            .override_global("CT_CACHE_SLOTS", &sizes.of(lb_common::MAP_CT4_CACHE), true)
            .override_global("CT_LIVE_WORDS", &live_words, true)
            .override_global("CT_CACHE_FRESH", &refresh.min(ct_timeouts[lb_common::CT_ESTABLISHED as usize]), true)
            .override_global("NODE_IP", &node_ip, true)
            .override_global("NODE_IP6", &node_ip6, true)
            .override_global("COUNT_SERVICES", &u32::from(config.count_per_frontend), true)
            .override_global("IPV6_ON", &u32::from(config.ipv6), true)
            .override_global("SNAT_OFF_CLUSTER", &config.cluster_cidr_families.bits(), true)
            .override_global("XDP_SEND_ANYWHERE", &u32::from(config.xdp_mode == XdpAttachMode::Generic), true)
            .override_global("NETNS_COOKIE", &netns_cookie()?, true)
            .map_pin_path(lb_common::MAP_TAILS4_TC, stage_pins[0].as_path())
            .map_pin_path(lb_common::MAP_TAILS4_XDP, stage_pins[1].as_path())
            .map_pin_path(lb_common::MAP_TAILS_TC, stage_pins[2].as_path())
            .map_pin_path(lb_common::MAP_TAILS_XDP, stage_pins[3].as_path())
            .map_max_entries(MAP_SERVICES, sizes.services)
            .map_max_entries(MAP_SERVICE_NAMES, sizes.services)
            .map_max_entries(lb_common::MAP_SERVICE_STATS, sizes.of(lb_common::MAP_SERVICE_STATS))
            .map_max_entries(MAP_BACKENDS, sizes.backends)
            .map_max_entries(MAP_MAGLEV, sizes.of(MAP_MAGLEV))
            .map_max_entries(MAP_BACKEND_MEMBERS, sizes.of(MAP_BACKEND_MEMBERS))
            .map_max_entries(MAP_CT4, sizes.conntrack)
            .map_max_entries(lb_common::MAP_CT4_CACHE, sizes.of(lb_common::MAP_CT4_CACHE))
            .map_max_entries(MAP_CT4_NEW, sizes.of(MAP_CT4_NEW))
            .map_max_entries(lb_common::MAP_CT4_LIVE, sizes.of(lb_common::MAP_CT4_LIVE))
            .map_max_entries(MAP_CT6, sizes.conntrack)
            .map_max_entries(MAP_CT6_NEW, sizes.of(MAP_CT6_NEW))
            .map_max_entries(MAP_AFFINITY, sizes.affinity)
            .load(crate::EBPF_OBJECT)?;
        // The tc entry points: Ethernet's, and those of devices without a link-layer header.
        for name in TC_ENTRIES {
            let p: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or(DataplaneError::MissingMap { name })?.try_into()?;
            p.load().map_err(|source| DataplaneError::ProgramLoad { name, source })?;
        }
        let xdp: &mut Xdp =
            ebpf.program_mut(PROG_XDP).ok_or(DataplaneError::MissingMap { name: PROG_XDP })?.try_into()?;
        xdp.load().map_err(|source| DataplaneError::ProgramLoad { name: PROG_XDP, source })?;
        // Without the IPv6 programs the IPv4 ones tail-call an empty slot and IPv6 frames pass
        // untranslated; asked for, they must load. Every table is this load's own and starts
        // empty, so a run without IPv6 needs nothing emptied. IPv4's new-flow stages are
        // always there.
        fill_tails(&mut ebpf, config.ipv6)?;
        let stage_pins = name_stage_tables(&ebpf, stage_pins)?;
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
        let tables = super::tables::Tables::new(
            aya::maps::IterableMap::map(&maps.maglev),
            2 * sizes.of(MAP_MAGLEV),
            sizes.backends,
        )?;
        let live = {
            let name = lb_common::MAP_CT4_LIVE;
            let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
                return Err(DataplaneError::MissingMap { name });
            };
            Arc::new(super::live::LiveStamps::open(data, live_words)?)
        };
        let stale_udp_removed: Arc<AtomicU64> = Arc::default();
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
            filter: Default::default(),
            tables,
            sweeper: stale_udp::Sweeper::new(pin_dir.to_owned(), stale_udp_removed.clone()),
            free_ids: BTreeSet::new(),
            retired: VecDeque::new(),
            next_id: 1,
            migrations,
            stage_pins,
            stale_udp_removed,
            clock,
            ct_timeouts,
            ct_collected: Arc::default(),
            ct_gc_stop: Arc::default(),
            live,
        };
        dp.filter = super::filter::Filter::load(&dp.maps.filter);
        dp.adopt()?;
        // Over a previous agent's pins: it may have stopped between a change and its move of
        // the generation.
        dp.frontends_changed();
        // Counts for what is programmed; bits nothing counts are cleared at the first full
        // apply, which an agent always makes before it reports itself synced.
        let node_addrs: Vec<std::net::IpAddr> =
            dp.maps.node_addrs.keys().filter_map(|k| k.ok()).map(|k| ip_of(k.family, k.addr)).collect();
        dp.filter.set_node_addrs(&node_addrs, [].iter());
        let programmed: Vec<_> = dp.programmed.keys().copied().collect();
        for f in &programmed {
            dp.filter.add_frontend(f);
        }
        dp.carry_over_legacy_flows(false);
        if fresh {
            // No other programs run on these maps: the stamps can count from now on. Over a
            // previous agent's pins, every key counts until the link swap (`finish_migrations`).
            dp.restamp_live_flows();
        }
        spawn_collector(
            pin_dir,
            dp.clock.clone(),
            dp.ct_timeouts,
            sizes.conntrack,
            dp.ct_collected.clone(),
            dp.ct_gc_stop.clone(),
            dp.live.clone(),
        )?;
        Ok(dp)
    }

    /// Rebuilds `programmed` from the pinned maps, and removes what a crashed update left
    /// behind (names of gone services, stale memberships and source ranges). Tables a previous
    /// agent still held for their grace period are free space here: a packet in flight is
    /// long done by the time an agent has loaded. The live tables are read back slot by slot,
    /// so the next change of a backend set starts from them (`maglev::update`).
    fn adopt(&mut self) -> Result<()> {
        // Service id -> its frontend's family: a source range key holds no family of its own.
        let mut live: BTreeMap<u32, u8> = BTreeMap::new();
        let mut entries = Vec::new();
        for item in self.maps.services.iter() {
            let (k, v) = item.map_err(map_err(MAP_SERVICES))?;
            entries.push((k, v));
            live.insert(v.id, k.family);
        }
        let ranges_live: Vec<(u32, u32)> = entries.iter().map(|(_, v)| (v.table_off, v.table_size)).collect();
        let mut tables = self.tables.adopt(&ranges_live, &self.maps.backends)?.into_iter();
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
            if let Some(family) = live.get(&id) {
                let len = (k.prefix_len() - 32) as u8;
                ranges.entry(id).or_default().push(Cidr { addr: ip_of(*family, k.data().addr), len });
            } else {
                stale_ranges.push(k);
            }
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
            let table = tables.next().unwrap_or_default();
            let Some(frontend) = frontend_of(&k, v.flags) else { continue };
            let backends: Vec<Endpoint> =
                table.iter().map(endpoint_of).collect::<BTreeSet<Endpoint>>().into_iter().collect();
            let name = names.remove(&v.id).unwrap_or_default();
            for b in &backends {
                self.maps.members.insert(member_key(v.id, b), 1, 0).map_err(insert_err(
                    self.sizes,
                    MAP_BACKEND_MEMBERS,
                    format!("backend {b} of {name}"),
                ))?;
            }
            let mut source_ranges = ranges.remove(&v.id).unwrap_or_default();
            source_ranges.sort();
            // The maps hold no serving set: the backends stand for it, so a UDP flow to an
            // endpoint that served without being picked (another node's, under a Local
            // policy) is not swept by the first change after a restart if it then leaves.
            let port = ServicePort {
                name,
                serving: backends.clone(),
                backends,
                affinity_timeout_s: (v.flags & SVC_FLAG_AFFINITY != 0).then_some(v.affinity_timeout_s),
                external: v.flags & SVC_FLAG_EXTERNAL != 0,
                local_only: v.flags & SVC_FLAG_LOCAL_ONLY != 0,
                source_ranges,
            };
            let serving = port.serving.clone();
            self.programmed.insert(
                frontend,
                Programmed { id: v.id, generation: v.generation, port, table_off: v.table_off, table, serving },
            );
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
}

/// Whether `pin_dir` has nothing pinned in it (at most an empty links directory).
/// Any doubt (an entry that cannot be read) counts as pins: the caller removes the directory
/// of a failed load only when this is true.
fn holds_no_pins(pin_dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(pin_dir) else { return false };
    entries.into_iter().all(|e| {
        e.is_ok_and(|e| {
            e.file_name() == LINKS_DIR && fs::read_dir(e.path()).is_ok_and(|mut links| links.next().is_none())
        })
    })
}

/// The tc programs the agent attaches: Ethernet's ingress and egress, then the ingress and
/// egress of devices without a link-layer header.
const TC_ENTRIES: [&str; 4] =
    [PROG_TC_INGRESS, lb_common::PROG_TC_EGRESS, lb_common::PROG_TC_INGRESS_L3, lb_common::PROG_TC_EGRESS_L3];

/// Renames this load's stage tables after the programs that tail-call through them
/// (`<name>-<ns>-p<ids>`: a tc table's tc entry programs, `TC_ENTRIES`, `_` between them, an
/// XDP table's XDP program), so
/// that a later load can tell from the links' program ids alone whether any attached program
/// still uses them (`layout::retire_unlinked_stages`): listing programs by id, to read their
/// maps, takes CAP_SYS_ADMIN, which the DaemonSet does not grant. Renaming a pin leaves the
/// map as it is.
fn name_stage_tables(ebpf: &aya::Ebpf, pins: [std::path::PathBuf; 4]) -> Result<[std::path::PathBuf; 4]> {
    let id = |name: &'static str| -> Result<String> {
        let prog = ebpf.program(name).ok_or(DataplaneError::MissingMap { name })?;
        Ok(prog.info()?.id().to_string())
    };
    let tc = TC_ENTRIES.into_iter().map(id).collect::<Result<Vec<_>>>()?.join("_");
    let xdp = id(PROG_XDP)?;
    let mut named = pins.clone();
    for (i, (pin, new)) in pins.iter().zip(named.iter_mut()).enumerate() {
        // `STAGE_TABLES` order: tc, XDP, tc, XDP.
        let users = if i % 2 == 0 { &tc } else { &xdp };
        *new = std::path::PathBuf::from(format!("{}-p{users}", pin.display()));
        fs::rename(pin, &*new).map_err(|source| DataplaneError::Io {
            what: "naming a stage table after its programs",
            path: pin.clone(),
            source,
        })?;
    }
    Ok(named)
}

/// Where this load pins its stage tables (IPv4's new-flow stages, `LB_TAILS4_TC` and
/// `LB_TAILS4_XDP`; the IPv6 stages, `LB_TAILS_TC` and `LB_TAILS_XDP`): under names of its own
/// (`<name>-<nanoseconds since the epoch>`; bpffs refuses dots in names), never adopting an
/// earlier agent's. Until the link swap the programs that agent left attached keep running,
/// and a shared table would hand their new flows and IPv6 frames to this agent's stages, which
/// may use rebuilt or migrated maps the old programs do not read (an empty services map, a
/// conntrack table the old programs' reply lookups miss). The earlier tables go once this
/// agent's programs are in every link (`Dataplane::retire_old_stages`).
pub(super) const STAGE_TABLES: [&str; 4] =
    [lb_common::MAP_TAILS4_TC, lb_common::MAP_TAILS4_XDP, lb_common::MAP_TAILS_TC, lb_common::MAP_TAILS_XDP];

/// This load's pins of `STAGE_TABLES`, before `name_stage_tables` adds their programs' ids.
fn stage_table_pins(pin_dir: &Path) -> [std::path::PathBuf; 4] {
    let load = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    STAGE_TABLES.map(|name| pin_dir.join(format!("{name}-{load}")))
}

/// Loads the stages the main programs tail-call and puts them in their tables: IPv4's
/// new-flow stages, and with `ipv6` the IPv6 programs (`lb_common::TAIL_*`). The tables are
/// pinned, so the entries outlive this process; they are this load's own (`stage_table_pins`),
/// so without `ipv6` the IPv6 tables stay empty.
fn fill_tails(ebpf: &mut aya::Ebpf, ipv6: bool) -> Result<()> {
    use aya::maps::ProgramArray;
    use lb_common::*;
    let dup = |name: &'static str, fd: &aya::programs::ProgramFd| {
        fd.try_clone().map_err(|source| DataplaneError::Io {
            what: "duplicating a program fd",
            path: name.into(),
            source,
        })
    };
    let mut fds = Vec::new();
    let tc_ipv6 = [
        (PROG_TC_INGRESS6, MAP_TAILS_TC, TAIL_TC_INGRESS6),
        (PROG_TC_EGRESS6, MAP_TAILS_TC, TAIL_TC_EGRESS6),
        (PROG_TC_NEW6, MAP_TAILS_TC, TAIL_TC_NEW6),
        (PROG_TC_ICMP6, MAP_TAILS_TC, TAIL_TC_ICMP6),
        (PROG_TC_FWD6, MAP_TAILS_TC, TAIL_TC_FWD6),
        (PROG_TC_REPLY6, MAP_TAILS_TC, TAIL_TC_REPLY6),
        (PROG_TC_EGRESS6_L3, MAP_TAILS_TC, TAIL_TC_EGRESS6_L3),
        (PROG_TC_ICMP6_L3, MAP_TAILS_TC, TAIL_TC_ICMP6_L3),
    ];
    let tc_ipv6 = if ipv6 { &tc_ipv6[..] } else { &[] };
    for &(name, table, index) in [(PROG_TC_NEW4, MAP_TAILS4_TC, TAIL4_TC_NEW4)].iter().chain(tc_ipv6) {
        let p: &mut SchedClassifier = ebpf.program_mut(name).ok_or(DataplaneError::MissingMap { name })?.try_into()?;
        p.load().map_err(|source| DataplaneError::ProgramLoad { name, source })?;
        fds.push((table, index, dup(name, p.fd()?)?));
    }
    // The Ethernet ingress program, loaded with the entry points already, behind the tunnel
    // devices' ingress (`lb_tc_ingress_l3`).
    let p: &SchedClassifier =
        ebpf.program(PROG_TC_INGRESS).ok_or(DataplaneError::MissingMap { name: PROG_TC_INGRESS })?.try_into()?;
    fds.push((MAP_TAILS4_TC, TAIL4_TC_INGRESS, dup(PROG_TC_INGRESS, p.fd()?)?));
    let xdp_ipv6 = [
        (PROG_XDP6, MAP_TAILS_XDP, TAIL_XDP6),
        (PROG_XDP_NEW6, MAP_TAILS_XDP, TAIL_XDP_NEW6),
        (PROG_XDP_ICMP6, MAP_TAILS_XDP, TAIL_XDP_ICMP6),
        (PROG_XDP_FWD6, MAP_TAILS_XDP, TAIL_XDP_FWD6),
        (PROG_XDP_REPLY6, MAP_TAILS_XDP, TAIL_XDP_REPLY6),
    ];
    let xdp_ipv6 = if ipv6 { &xdp_ipv6[..] } else { &[] };
    for &(name, table, index) in [(PROG_XDP_NEW4, MAP_TAILS4_XDP, 0)].iter().chain(xdp_ipv6) {
        let p: &mut Xdp = ebpf.program_mut(name).ok_or(DataplaneError::MissingMap { name })?.try_into()?;
        p.load().map_err(|source| DataplaneError::ProgramLoad { name, source })?;
        fds.push((table, index, dup(name, p.fd()?)?));
    }
    for (table, index, fd) in &fds {
        let map = ebpf.map_mut(table).ok_or(DataplaneError::MissingMap { name: table })?;
        let mut tails = ProgramArray::try_from(map).map_err(super::maps::map_err(table))?;
        tails.set(*index, fd, 0).map_err(super::maps::map_err(table))?;
    }
    Ok(())
}
