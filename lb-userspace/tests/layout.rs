//! Pinned map layout checks at load: what a previous agent (another version, other sizes) left
//! pinned is adopted, migrated, rebuilt or refused, and never silently misused.
use std::path::PathBuf;

use aya::maps::{HashMap, Map, MapData};
use std::net::Ipv4Addr;

use lb_common::{
    AffinityKey, AffinityValue, CtKey4, CtKey6, CtValue4, CtValue6, CtWay4, CT_DIR_FORWARD, CT_ESTABLISHED,
    FAMILY_IPV4, MAP_CONNTRACK_V4, MAP_CT4, MAP_CT4_NEW, MAP_CT6, MAP_CT6_NEW, PROTO_TCP, PROTO_UDP,
};
use lb_userspace::{
    dataplane::{
        conntrack::{self, legacy},
        Config, Dataplane, DataplaneError, MapSizes, PinDirLock,
    },
    model::{DesiredState, Endpoint, Frontend, Protocol, ServicePort},
};

/// A pin directory of its own, removed (maps, links) when the test ends, also on failure.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "BPF tests need root; under CI=true they may not skip"
            );
            return None;
        }
        let p = PathBuf::from(format!("/sys/fs/bpf/lb-layout-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("pin dir on bpffs");
        Some(Self(p))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pins a map of the given type and shape where the agent expects `name`.
fn pin_map(dir: &PinDir, name: &str, kind: u32, key: u32, value: u32, entries: u32) -> Map {
    let obj = aya_obj::Map::new_from_params(kind, key, value, entries, 0);
    let data = MapData::create(obj, name, None).expect("creating map");
    data.pin(dir.0.join(name)).expect("pinning");
    Map::from_map_data(MapData::from_pin(dir.0.join(name)).unwrap()).unwrap()
}

const HASH: u32 = 1;
const LRU_HASH: u32 = 9;

/// A first load that fails leaves no pins behind (a verifier refusal used to leave every
/// test's maps pinned). Here the kernel refuses a map: a hash table of no entries.
#[test]
fn a_failed_first_load_removes_the_pin_directory_it_made() {
    let Some(dir) = PinDir::new("failed-first") else { return };
    std::fs::remove_dir(&dir.0).expect("starting without the directory");
    let sizes = MapSizes { conntrack: 0, ..MapSizes::default() };
    let err = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).err().expect("must fail");
    // The failure is the map's, after the directory was made: not a refusal before it.
    assert!(err.to_string().contains("LB_CT"), "{err}");
    assert!(!dir.0.exists(), "{} left behind after: {err}", dir.0.display());
}

#[test]
fn a_flow_map_of_another_layout_is_refused_naming_it() {
    let Some(dir) = PinDir::new("refuse") else { return };
    // An assured conntrack table whose values are not this build's CtValue4 (28 bytes).
    pin_map(&dir, MAP_CT4, HASH, 16, 32, 1024);
    let err = Dataplane::load(&dir.0, &Config::default()).err().expect("must refuse");
    assert!(matches!(err, DataplaneError::FlowLayout { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("LB_CT4") && msg.contains("value 32 B") && msg.contains("refusing to start"), "{msg}");
    assert!(msg.contains(&format!("lb cleanup --pin-dir {}", dir.0.display())), "{msg}");
    // Nothing was touched: the pinned map is still the old one.
    let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CT4)).unwrap();
    assert_eq!((info.value_size(), info.max_entries()), (32, 1024));
}

#[test]
fn a_flow_map_of_another_capacity_is_migrated_with_its_entries() {
    let Some(dir) = PinDir::new("migrate") else { return };
    let key_size = std::mem::size_of::<CtKey4>() as u32;
    let value_size = std::mem::size_of::<CtValue4>() as u32;
    let mut old = pin_map(&dir, MAP_CT4, HASH, key_size, value_size, 1024);
    let mut flows: HashMap<&mut MapData, CtKey4, CtValue4> = HashMap::try_from(&mut old).unwrap();
    for i in 0..100u32 {
        let k = CtKey4 { src: i, dst: 7, sport: 1, dport: 2, proto: 6, ..Default::default() };
        let v = CtValue4 { created: 1000 + i, state: CT_ESTABLISHED, ..Default::default() };
        flows.insert(k, v, 0).unwrap();
    }
    drop(old);
    let sizes = MapSizes { conntrack: 4096, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates");
    let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CT4)).unwrap();
    assert_eq!(info.max_entries(), 4096);
    assert_eq!(info.map_type().unwrap(), aya::maps::MapType::Hash, "still a hash that never evicts");
    let entries: Vec<_> = dp.maps().conntrack.iter().filter_map(Result::ok).collect();
    assert_eq!(entries.len(), 100);
    assert!(entries.iter().all(|(k, v)| k.dst == 7 && v.created == 1000 + k.src));
}

/// IPv4's new-flow table was an LRU hash of conntrack keys up to layout 6 and is an array of
/// ways now: a node upgraded mid-handshake keeps its unassured flows, each moved into the way
/// of its set where the datapath looks it up; and the array moves to another capacity with
/// its flows too.
#[test]
fn the_new_flow_table_of_layout_6_moves_into_the_array_of_ways_with_its_flows() {
    let Some(dir) = PinDir::new("ways") else { return };
    let key_size = std::mem::size_of::<CtKey4>() as u32;
    let value_size = std::mem::size_of::<CtValue4>() as u32;
    let mut old = pin_map(&dir, MAP_CT4_NEW, LRU_HASH, key_size, value_size, 1024);
    let mut flows: HashMap<&mut MapData, CtKey4, CtValue4> = HashMap::try_from(&mut old).unwrap();
    for i in 0..100u32 {
        let k = CtKey4 { src: i, dst: 7, sport: 1, dport: 2, proto: PROTO_TCP, ..Default::default() };
        let v = CtValue4 { created: 1000 + i, state: lb_common::CT_SYN_SENT, ..Default::default() };
        flows.insert(k, v, 0).unwrap();
    }
    drop(old);
    let check = |dp: &Dataplane, entries: u32| {
        let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CT4_NEW)).unwrap();
        assert_eq!((info.map_type().unwrap(), info.max_entries()), (aya::maps::MapType::Array, entries));
        let table = &dp.maps().conntrack_new;
        let all: Vec<_> = table.iter().filter_map(Result::ok).collect();
        assert_eq!(all.len(), 100);
        assert!(all.iter().all(|(k, v)| k.dst == 7 && v.created == 1000 + k.src));
        // Each in its set: a lookup, the datapath's way, finds it.
        assert!(all.iter().all(|(k, v)| table.get(k, 0).ok() == Some(*v)));
    };
    // 4,096 entries are 1,024 sets of four; 1,001 are rounded up to whole sets, 1,004.
    let sizes = MapSizes { conntrack_new: 4096, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates");
    check(&dp, 4096);
    drop(dp);
    let sizes = MapSizes { conntrack_new: 1001, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates again");
    check(&dp, 1004);
}

/// Layout 8 chose the new-flow table's sets by the flow's client side: a table left by a
/// layout-7 agent, the same shape, holds its flows in the sets of the old hash (of the whole
/// key), where neither the datapath nor the agent would find them now. The load moves each
/// into its new set, whether the service names say the version is 7 or no name is left to say.
#[test]
fn a_new_flow_table_of_layout_7_has_its_flows_moved_to_their_new_sets() {
    for names_left in [true, false] {
        let Some(dir) = PinDir::new(if names_left { "rehash" } else { "rehash-unnamed" }) else { return };
        let mut dp = Dataplane::load(&dir.0, &Config::default()).expect("fresh load");
        assert!(dp.apply(&one_affinity_service()).errors.is_empty());
        drop(dp);
        // What a layout-7 agent left: its version in the service names (or no names), and
        // flows (both entries each) in the sets its hash chose.
        let mut maps = lb_userspace::dataplane::Maps::open_pinned(&dir.0).unwrap();
        let names: Vec<_> = maps.names.iter().filter_map(Result::ok).collect();
        assert!(!names.is_empty());
        for (id, mut n) in names {
            if names_left {
                n.layout_version = 7;
                maps.names.insert(id, n, 0).unwrap();
            } else {
                maps.names.remove(&id).unwrap();
            }
        }
        drop(maps);
        let path = dir.0.join(MAP_CT4_NEW);
        let mut ways: aya::maps::Array<MapData, CtWay4> =
            aya::maps::Array::try_from(Map::from_map_data(MapData::from_pin(&path).unwrap()).unwrap()).unwrap();
        let sets = ways.len() / lb_common::CT_WAYS as u32;
        let mut used = std::collections::HashMap::<u32, u32>::new();
        let mut keys = Vec::new();
        for i in 0..100u32 {
            let client = u32::from_ne_bytes([10, 244, 1, 100 + i as u8]);
            let fwd = CtKey4 {
                src: client,
                dst: 0x0a60_000a,
                sport: 40_000u16.to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let v = CtValue4 { created: 1000 + i, state: lb_common::CT_SYN_SENT, ..Default::default() };
            let (rk, rv) = lb_common::ct_peer(&fwd, &CtValue4 { nat_addr: 0x0bf4_010a, nat_port: 80u16.to_be(), ..v });
            for (k, v) in [(fwd, v), (rk, rv)] {
                let old_hash = lb_common::flow_hash(k.src ^ 0x2545_f491, k.dst, k.sport, k.dport, k.proto);
                let set = lb_common::select_slot(old_hash, sets);
                let way = used.entry(set).or_default();
                assert!(*way < lb_common::CT_WAYS as u32);
                ways.set(set * lb_common::CT_WAYS as u32 + *way, CtWay4 { key: k, value: v }, 0).unwrap();
                *way += 1;
                keys.push((k, v));
            }
        }
        drop(ways);
        let before = lb_userspace::dataplane::Maps::open_pinned(&dir.0).unwrap();
        let found = keys.iter().filter(|(k, _)| before.conntrack_new.get(k, 0).is_ok()).count();
        assert!(found < 10, "{found} of 200 entries are where the new hash looks already");
        drop(before);
        let dp = Dataplane::load(&dir.0, &Config::default()).expect("moves the flows");
        let table = &dp.maps().conntrack_new;
        assert_eq!(table.iter().filter_map(Result::ok).count(), 200);
        for (k, v) in &keys {
            assert_eq!(table.get(k, 0).ok(), Some(*v), "names left: {names_left}: {k:?} not in its set");
        }
    }
}

/// The IPv6 tables are flow maps like the IPv4 ones: the new-flow table of layout 9 and before
/// (an LRU hash of conntrack keys) moves into the array of ways with its flows, each then
/// found by a lookup in its set, at the configured capacity; another layout of the assured
/// table is refused naming the map.
#[test]
fn ipv6_conntrack_tables_are_migrated_and_checked_like_ipv4_ones() {
    let Some(dir) = PinDir::new("migrate6") else { return };
    let key_size = std::mem::size_of::<CtKey6>() as u32;
    let value_size = std::mem::size_of::<CtValue6>() as u32;
    let mut old = pin_map(&dir, MAP_CT6_NEW, LRU_HASH, key_size, value_size, 1024);
    let mut flows: HashMap<&mut MapData, CtKey6, CtValue6> = HashMap::try_from(&mut old).unwrap();
    for i in 0..50u32 {
        let k =
            CtKey6 { src: [0xfd, 0, 0, i], dst: [0xfd, 0, 0, 7], sport: 1, dport: 2, proto: 17, ..Default::default() };
        let v = CtValue6 { created: 1000 + i, state: lb_common::CT_UDP, ..Default::default() };
        flows.insert(k, v, 0).unwrap();
    }
    drop(old);
    let sizes = MapSizes { conntrack_new: 4096, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates");
    let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CT6_NEW)).unwrap();
    assert_eq!((info.map_type().unwrap(), info.max_entries()), (aya::maps::MapType::Array, 4096));
    let table = &dp.maps().conntrack6_new;
    let entries: Vec<_> = table.iter().filter_map(Result::ok).collect();
    assert_eq!(entries.len(), 50);
    assert!(entries.iter().all(|(k, v)| k.dst == [0xfd, 0, 0, 7] && v.created == 1000 + k.src[3]));
    for (k, v) in &entries {
        assert_eq!(table.get(k, 0).ok(), Some(*v), "{k:?} not in its set");
    }
    // Both IPv6 tables were created with the configured capacities beside the IPv4 ones.
    let assured = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CT6)).unwrap();
    assert_eq!((assured.key_size(), assured.max_entries()), (key_size, sizes.conntrack));
    drop(dp);

    // SNATed flows moved into a table too small for them all: every flow that loses its reply
    // entry goes whole (its SNAT port must not look free while its forward entry takes it).
    let Some(dir) = PinDir::new("migrate6snat") else { return };
    let mut old = pin_map(&dir, MAP_CT6_NEW, LRU_HASH, key_size, value_size, 1024);
    let mut flows: HashMap<&mut MapData, CtKey6, CtValue6> = HashMap::try_from(&mut old).unwrap();
    for i in 0..40u32 {
        let k = CtKey6 {
            src: [0xfd, 0, 1, i],
            dst: [0xfd, 0, 0, 8],
            sport: (1000 + i as u16).to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        let v = CtValue6 {
            nat_addr: [0xfd, 0, 2, 1],
            nat_port: 8080u16.to_be(),
            snat_addr: [0xfd, 0, 3, 1],
            snat_port: (61000 + i as u16).to_be(),
            flags: lb_common::CT_FLAG_SNAT,
            state: lb_common::CT_SYN_SENT,
            created: 1000 + i,
            ..Default::default()
        };
        let (pk, pv) = lb_common::ct_peer(&k, &v);
        flows.insert(k, v, 0).unwrap();
        flows.insert(pk, pv, 0).unwrap();
    }
    drop(old);
    // 80 entries into 64 ways: some sets overflow, most flows stay whole.
    let sizes = MapSizes { conntrack_new: 64, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates");
    let entries: Vec<_> = dp.maps().conntrack6_new.iter().filter_map(Result::ok).collect();
    let whole = entries.iter().filter(|(k, _)| k.dir == lb_common::CT_DIR_FORWARD).count();
    assert!(entries.len() <= 64 && whole >= 10, "{whole} of {}", entries.len());
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == lb_common::CT_DIR_FORWARD) {
        let (pk, _) = lb_common::ct_peer(k, v);
        assert!(entries.iter().any(|(k2, _)| *k2 == pk), "a SNATed forward entry without its reply: {k:?}");
    }
    drop(dp);

    let Some(dir) = PinDir::new("refuse6") else { return };
    pin_map(&dir, MAP_CT6, HASH, key_size, value_size + 4, 1024);
    let err = Dataplane::load(&dir.0, &Config::default()).err().expect("must refuse");
    let msg = err.to_string();
    assert!(matches!(err, DataplaneError::FlowLayout { .. }) && msg.contains("LB_CT6"), "{msg}");
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of layout version 4's conntrack entries.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn flows_of_the_previous_conntrack_layout_are_carried_over_and_its_map_let_go() {
    let Some(dir) = PinDir::new("legacy") else { return };
    let (k, v) = (std::mem::size_of::<legacy::CtKey>() as u32, std::mem::size_of::<legacy::CtValue>() as u32);
    let mut old = pin_map(&dir, MAP_CONNTRACK_V4, LRU_HASH, k, v, 1024);
    let mut flows: HashMap<&mut MapData, legacy::CtKey, legacy::CtValue> = HashMap::try_from(&mut old).unwrap();
    let now = monotonic_ns();
    // An established TCP flow (forward and reply entries), a UDP flow, an expired flow.
    let fwd = |src: u32, proto: u8| legacy::CtKey {
        src: [src, 0, 0, 0],
        dst: [u32::from_ne_bytes([10, 96, 0, 10]), 0, 0, 0],
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto,
        family: FAMILY_IPV4,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let val = |expires_ns: u64| legacy::CtValue {
        nat_addr: [u32::from_ne_bytes([10, 244, 1, 11]), 0, 0, 0],
        nat_port: 8080u16.to_be(),
        flags: legacy::FLAG_REPLIED,
        family: FAMILY_IPV4,
        service_id: 1,
        expires_ns,
        created_ns: now - 5_000_000_000,
        ..Default::default()
    };
    let client = u32::from_ne_bytes([10, 244, 1, 5]);
    flows.insert(fwd(client, PROTO_TCP), val(now + 3_600_000_000_000), 0).unwrap();
    flows.insert(fwd(client, PROTO_UDP), val(now + 60_000_000_000), 0).unwrap();
    flows.insert(fwd(client + 1, PROTO_TCP), val(now - 1), 0).unwrap();
    drop(old);
    let mut dp = Dataplane::load(&dir.0, &Config::default()).expect("carries over");
    let all = conntrack::entries(&dp.maps().conntrack, &dp.maps().conntrack_new);
    let tcp: Vec<_> = all.iter().filter(|(k, _, _)| k.proto == PROTO_TCP).collect();
    assert_eq!(tcp.len(), 2, "the live TCP flow, both directions: {all:?}");
    for (k, v, assured) in &tcp {
        assert!(*assured, "an answered TCP flow is assured");
        assert_eq!(v.state, CT_ESTABLISHED);
        if k.dir == CT_DIR_FORWARD {
            assert_eq!(
                (k.src, v.nat_addr, u16::from_be(v.nat_port)),
                (client, u32::from_ne_bytes([10, 244, 1, 11]), 8080)
            );
        } else {
            assert_eq!(
                (k.src, k.dst, v.nat_addr),
                (u32::from_ne_bytes([10, 244, 1, 11]), client, u32::from_ne_bytes([10, 96, 0, 10]))
            );
        }
    }
    assert_eq!(all.iter().filter(|(k, _, _)| k.proto == PROTO_UDP).count(), 2);
    // The old map stays pinned (the old programs may still use it) until the link swap.
    assert!(dir.0.join(MAP_CONNTRACK_V4).exists());
    dp.finish_migrations();
    assert!(!dir.0.join(MAP_CONNTRACK_V4).exists(), "let go once the new programs are in the links");
}

/// One ClusterIP frontend with session affinity: it gets service id 1.
fn one_affinity_service() -> DesiredState {
    let mut d = DesiredState::default();
    d.services.insert(
        Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp),
        ServicePort {
            name: "default/web".into(),
            backends: vec![Endpoint { ip: Ipv4Addr::new(10, 244, 1, 11).into(), port: 80, local: false }],
            affinity_timeout_s: Some(60),
            ..Default::default()
        },
    );
    d
}

#[test]
fn rebuilt_service_maps_reset_affinity_pins_and_keep_flows() {
    let Some(dir) = PinDir::new("rebuild") else { return };
    let mut dp = Dataplane::load(&dir.0, &Config::default()).expect("fresh load");
    assert!(dp.apply(&one_affinity_service()).errors.is_empty());
    drop(dp);
    let mut maps = lb_userspace::dataplane::Maps::open_pinned(&dir.0).unwrap();
    let pin = AffinityKey { client: [1, 0, 0, 0], service_id: 1, ..Default::default() };
    maps.affinity.insert(pin, AffinityValue::default(), 0).unwrap();
    let flow = CtKey4 { src: 1, dst: 2, sport: 1, dport: 2, proto: 6, ..Default::default() };
    maps.conntrack.insert(flow, CtValue4::default(), 0).unwrap();
    drop(maps);

    // Same sizes: nothing is rebuilt, the service keeps id 1, and its pin survives a restart.
    let dp = Dataplane::load(&dir.0, &Config::default()).expect("adopts");
    assert_eq!(dp.maps().affinity.keys().count(), 1);
    drop(dp);

    // Another services map size: service ids are handed out afresh, so pins keyed by the old
    // ids must go; the flow stays.
    let sizes = MapSizes { services: 1000, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("rebuilds");
    assert_eq!(dp.maps().affinity.keys().count(), 0);
    assert!(dp.maps().conntrack.get(&flow, 0).is_ok());
}

#[test]
fn pins_of_frontends_that_no_longer_exist_are_dropped_at_adoption() {
    let Some(dir) = PinDir::new("orphans") else { return };
    let mut dp = Dataplane::load(&dir.0, &Config::default()).expect("fresh load");
    assert!(dp.apply(&one_affinity_service()).errors.is_empty());
    drop(dp);
    // As if an agent died after removing frontend 2 but before dropping its pins.
    let mut maps = lb_userspace::dataplane::Maps::open_pinned(&dir.0).unwrap();
    for id in [1, 2] {
        let pin = AffinityKey { client: [1, 0, 0, 0], service_id: id, ..Default::default() };
        maps.affinity.insert(pin, AffinityValue::default(), 0).unwrap();
    }
    drop(maps);
    let dp = Dataplane::load(&dir.0, &Config::default()).expect("adopts");
    let ids: Vec<u32> = dp.maps().affinity.keys().filter_map(Result::ok).map(|k| k.service_id).collect();
    assert_eq!(ids, vec![1]);
}

#[test]
fn a_maglev_array_of_another_size_is_rebuilt_with_the_services_that_point_into_it() {
    let Some(dir) = PinDir::new("maglev") else { return };
    let mut dp = Dataplane::load(&dir.0, &Config::default()).expect("fresh load");
    assert!(dp.apply(&one_affinity_service()).errors.is_empty());
    drop(dp);
    let sizes = MapSizes { maglev: 1 << 16, ..MapSizes::default() };
    let mut dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("rebuilds");
    // No service entry may point into the new, empty array: they were rebuilt too, and come
    // back with the next sync.
    assert_eq!(dp.maps().services.keys().count(), 0);
    assert!(dp.apply(&one_affinity_service()).errors.is_empty());
    let (_, v) = dp.maps().services.iter().filter_map(Result::ok).next().expect("programmed again");
    assert_eq!(dp.maps().maglev_slot(v.table_off).ok(), Some(0), "the one backend, id 0");
}

/// The pins of the stage tables (IPv4's new-flow stages, the IPv6 stages) in `dir`, sorted.
fn stage_table_pins(dir: &PinDir) -> Vec<String> {
    let tables =
        [lb_common::MAP_TAILS4_TC, lb_common::MAP_TAILS4_XDP, lb_common::MAP_TAILS_TC, lb_common::MAP_TAILS_XDP];
    let mut pins: Vec<String> = std::fs::read_dir(&dir.0)
        .expect("pin dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| tables.iter().any(|t| f.strip_prefix(t).is_some_and(|rest| rest.starts_with('-'))))
        .collect();
    pins.sort();
    pins
}

/// A network namespace with an interface `d0`, entered by this thread; left and
/// deleted on drop, also when the test fails.
struct NetNs {
    name: String,
    original: std::fs::File,
}

impl NetNs {
    fn new(tag: &str) -> Self {
        let name = format!("lbl{}{tag}", std::process::id());
        let sh = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("running ip");
            assert!(st.success(), "ip {args:?}");
        };
        sh(&["netns", "add", &name]);
        let ns = Self { name, original: std::fs::File::open("/proc/thread-self/ns/net").expect("own netns") };
        // A veth pair: the kernels here may lack the dummy driver.
        sh(&["-n", &ns.name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        sh(&["-n", &ns.name, "link", "set", "d0", "up"]);
        let target = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("new netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread with a valid namespace fd.
        assert_eq!(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: back to the namespace this thread came from.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            // No panic in a drop (it would abort the test run): say it, the test's own failure
            // follows.
            eprintln!("cannot return to the test's network namespace: {}", std::io::Error::last_os_error());
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Without CAP_SYS_ADMIN in this thread's effective set until dropped, as the DaemonSet runs
/// the agent (capabilities are per thread; the permitted set keeps it, so it comes back).
struct WithoutSysAdmin;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_SYS_ADMIN: u32 = 21;

/// Sets or clears CAP_SYS_ADMIN in this thread's effective set; false if the kernel refused.
fn set_sys_admin(on: bool) -> bool {
    let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset of this thread with a version-3 header and two data words.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return false;
        }
        if on {
            data[0].effective |= 1 << CAP_SYS_ADMIN;
        } else {
            data[0].effective &= !(1 << CAP_SYS_ADMIN);
        }
        libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0
    }
}

impl WithoutSysAdmin {
    fn new() -> Self {
        assert!(set_sys_admin(false), "capset: {}", std::io::Error::last_os_error());
        Self
    }
}

impl Drop for WithoutSysAdmin {
    fn drop(&mut self) {
        // No panic in a drop: the namespace guard's return, which needs it, reports instead.
        if !set_sys_admin(true) {
            eprintln!("cannot raise CAP_SYS_ADMIN again: {}", std::io::Error::last_os_error());
        }
    }
}

/// Each load gets stage tables of its own: the programs an earlier agent left in the links
/// keep handing their new flows and IPv6 frames to that agent's stages, over the maps those
/// programs read, until this agent's programs are in every link; then the earlier tables go.
/// Tables no attached program uses (an agent that ended before its link swap; here also the
/// first agent's XDP ones, as it attached tc only) go at the next load. All of it without
/// CAP_SYS_ADMIN, as the DaemonSet runs the agent.
#[test]
fn each_load_has_its_own_stage_tables_and_the_earlier_ones_go_after_the_link_swap() {
    let Some(dir) = PinDir::new("stages") else { return };
    let _ns = NetNs::new("st");
    let _caps = WithoutSysAdmin::new();
    assert!(aya::programs::loaded_programs().next().is_none_or(|p| p.is_err()), "CAP_SYS_ADMIN still effective");
    let (tc, no_xdp) = (|i: &str| i == "d0", |_: &str| false);
    let set = |v: Vec<String>| v.into_iter().collect::<std::collections::BTreeSet<String>>();

    let mut first = Dataplane::load(&dir.0, &Config::default()).expect("first load");
    let errors = first.sync_interfaces(&tc, &no_xdp).expect("interfaces");
    assert!(errors.is_empty(), "{errors:?}");
    let first_pins = set(stage_table_pins(&dir));
    assert_eq!(first_pins.len(), 4, "a table per hook for IPv4's new flows and for IPv6: {first_pins:?}");
    let first_tc: std::collections::BTreeSet<String> = first_pins
        .iter()
        .filter(|p| p.starts_with(lb_common::MAP_TAILS4_TC) || p.starts_with(lb_common::MAP_TAILS_TC))
        .cloned()
        .collect();
    assert_eq!(first_tc.len(), 2, "{first_pins:?}");
    drop(first);

    // An agent that ends between its load and its link swap.
    let second = Dataplane::load(&dir.0, &Config::default()).expect("second load");
    let now = set(stage_table_pins(&dir));
    let second_pins: std::collections::BTreeSet<String> = now.difference(&first_pins).cloned().collect();
    assert_eq!(second_pins.len(), 4, "{now:?}");
    assert!(first_tc.is_subset(&now), "the tables of the programs in the links stay: {now:?}");
    assert_eq!(now.len(), 6, "the first agent's XDP tables, which no link uses, went: {now:?}");
    drop(second);

    let mut third = Dataplane::load(&dir.0, &Config::default()).expect("third load");
    let now = set(stage_table_pins(&dir));
    assert!(now.is_disjoint(&second_pins), "the tables of an agent that never reached the links went: {now:?}");
    assert!(first_tc.is_subset(&now), "{now:?}");
    assert_eq!(now.len(), 6, "{now:?}");
    let third_pins: std::collections::BTreeSet<String> = now.difference(&first_tc).cloned().collect();

    let errors = third.sync_interfaces(&tc, &no_xdp).expect("interfaces");
    assert!(errors.is_empty(), "{errors:?}");
    third.finish_migrations();
    assert_eq!(set(stage_table_pins(&dir)), third_pins, "after the swap only this load's tables stay");
}

/// One agent per pin directory (`PinDirLock`): while one holds it, no other can take it and
/// `lb cleanup` refuses; the lock is the agent's, not its datapath's; once let go, another
/// agent or `lb cleanup` may take it.
#[test]
fn one_agent_holds_a_pin_directory_and_cleanup_refuses_meanwhile() {
    let Some(dir) = PinDir::new("owner") else { return };
    let first = PinDirLock::try_acquire(&dir.0).expect("locking").expect("a free directory");
    assert!(PinDirLock::try_acquire(&dir.0).expect("locking").is_none(), "a second agent took a held directory");
    match lb_userspace::dataplane::cleanup(&dir.0) {
        Err(DataplaneError::AgentRunning { .. }) => {}
        other => panic!("cleanup under a running agent: {other:?}"),
    }
    assert!(dir.0.exists(), "cleanup removed a running agent's pins");

    let dp = Dataplane::load_locked(&dir.0, &Config::default(), &first).expect("loads under its lock");
    drop(dp);
    assert!(PinDirLock::try_acquire(&dir.0).expect("locking").is_none(), "the datapath's end let the lock go");
    drop(first);

    let second = PinDirLock::try_acquire(&dir.0).expect("locking").expect("free once the first let go");
    // A failed load keeps a directory with pins in it (the first agent's).
    let sizes = MapSizes { conntrack: 0, ..MapSizes::default() };
    Dataplane::load_locked(&dir.0, &Config { sizes, ..Config::default() }, &second).err().expect("must fail");
    assert!(dir.0.join(MAP_CT4).exists(), "a failed load removed the pins another agent left");
    // Loads that fail after some of their stage tables were pinned leave none behind: aya
    // creates and pins maps in no fixed order, and a services map of no entries fails among
    // them (five tries, so that a stage table comes first in at least one, but for 1 in 3,125).
    for _ in 0..5 {
        let sizes = MapSizes { services: 0, ..MapSizes::default() };
        Dataplane::load_locked(&dir.0, &Config { sizes, ..Config::default() }, &second).err().expect("must fail");
        let left = stage_table_pins(&dir);
        assert!(left.is_empty(), "a failed load left stage tables pinned: {left:?}");
    }
    drop(second);
    lb_userspace::dataplane::cleanup(&dir.0).expect("cleanup with no agent running");
    assert!(!dir.0.exists());
}

/// Freshness is judged under the lock: a directory this agent made (or found empty) goes when
/// its first load fails.
#[test]
fn a_locked_first_load_that_fails_removes_its_directory() {
    let Some(dir) = PinDir::new("owner-fresh") else { return };
    std::fs::remove_dir(&dir.0).expect("starting without the directory");
    let lock = PinDirLock::try_acquire(&dir.0).expect("locking").expect("a free directory");
    let sizes = MapSizes { conntrack: 0, ..MapSizes::default() };
    let err = Dataplane::load_locked(&dir.0, &Config { sizes, ..Config::default() }, &lock).err().expect("must fail");
    assert!(!dir.0.exists(), "{} left behind after: {err}", dir.0.display());
}
