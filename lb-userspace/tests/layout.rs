//! Pinned map layout checks at load: what a previous agent (another version, other sizes) left
//! pinned is adopted, migrated, rebuilt or refused, and never silently misused.
use std::path::PathBuf;

use aya::maps::{HashMap, Map, MapData};
use std::net::Ipv4Addr;

use lb_common::{AffinityKey, AffinityValue, CtKey, CtValue, MAP_CONNTRACK};
use lb_userspace::{
    dataplane::{Config, Dataplane, DataplaneError, MapSizes},
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

/// Pins an LRU hash map of the given shape where the agent expects `name`.
fn pin_lru(dir: &PinDir, name: &str, key: u32, value: u32, entries: u32, flags: u32) -> Map {
    let obj = aya_obj::Map::new_from_params(9 /* BPF_MAP_TYPE_LRU_HASH */, key, value, entries, flags);
    let data = MapData::create(obj, name, None).expect("creating map");
    data.pin(dir.0.join(name)).expect("pinning");
    Map::from_map_data(MapData::from_pin(dir.0.join(name)).unwrap()).unwrap()
}

#[test]
fn a_flow_map_of_another_layout_is_refused_naming_it() {
    let Some(dir) = PinDir::new("refuse") else { return };
    // A conntrack map whose values are not this build's CtValue (64 bytes).
    pin_lru(&dir, MAP_CONNTRACK, 40, 32, 1024, 0);
    let err = Dataplane::load(&dir.0, &Config::default()).err().expect("must refuse");
    assert!(matches!(err, DataplaneError::FlowLayout { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("LB_CONNTRACK") && msg.contains("value 32 B") && msg.contains("refusing to start"), "{msg}");
    assert!(msg.contains(&format!("lb cleanup --pin-dir {}", dir.0.display())), "{msg}");
    // Nothing was touched: the pinned map is still the old one.
    let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CONNTRACK)).unwrap();
    assert_eq!((info.value_size(), info.max_entries()), (32, 1024));
}

#[test]
fn a_flow_map_of_another_capacity_is_migrated_with_its_entries() {
    let Some(dir) = PinDir::new("migrate") else { return };
    let key_size = std::mem::size_of::<CtKey>() as u32;
    let value_size = std::mem::size_of::<CtValue>() as u32;
    let mut old = pin_lru(&dir, MAP_CONNTRACK, key_size, value_size, 1024, 0);
    let mut flows: HashMap<&mut MapData, CtKey, CtValue> = HashMap::try_from(&mut old).unwrap();
    for i in 0..100u32 {
        let k = CtKey { src: [i, 0, 0, 0], dst: [7, 0, 0, 0], sport: 1, dport: 2, proto: 6, ..Default::default() };
        let v = CtValue { created_ns: 1000 + i as u64, ..Default::default() };
        flows.insert(k, v, 0).unwrap();
    }
    drop(old);
    let sizes = MapSizes { conntrack: 4096, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates");
    let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_CONNTRACK)).unwrap();
    assert_eq!(info.max_entries(), 4096);
    let entries: Vec<_> = dp.maps().conntrack.iter().filter_map(Result::ok).collect();
    assert_eq!(entries.len(), 100);
    assert!(entries.iter().all(|(k, v)| k.dst[0] == 7 && v.created_ns == 1000 + k.src[0] as u64));
}

/// One ClusterIP frontend with session affinity: it gets service id 1.
fn one_affinity_service() -> DesiredState {
    let mut d = DesiredState::default();
    d.services.insert(
        Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp),
        ServicePort {
            name: "default/web".into(),
            backends: vec![Endpoint { ip: Ipv4Addr::new(10, 244, 1, 11), port: 80, local: false }],
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
    let flow = CtKey { src: [1, 0, 0, 0], dst: [2, 0, 0, 0], sport: 1, dport: 2, proto: 6, ..Default::default() };
    maps.conntrack.insert(flow, CtValue::default(), 0).unwrap();
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
