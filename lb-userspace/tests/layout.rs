//! Pinned map layout checks at load: what a previous agent (another version, other sizes) left
//! pinned is adopted, migrated, rebuilt or refused, and never silently misused.
use std::path::PathBuf;

use aya::maps::{HashMap, Map, MapData};
use lb_common::{AffinityKey, AffinityValue, MAP_AFFINITY, MAP_CONNTRACK};
use lb_userspace::dataplane::{Config, Dataplane, DataplaneError, MapSizes};

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
    let key_size = std::mem::size_of::<AffinityKey>() as u32;
    let value_size = std::mem::size_of::<AffinityValue>() as u32;
    let mut old = pin_lru(&dir, MAP_AFFINITY, key_size, value_size, 1024, 2 /* BPF_F_NO_COMMON_LRU */);
    let mut pins: HashMap<&mut MapData, AffinityKey, AffinityValue> = HashMap::try_from(&mut old).unwrap();
    for i in 0..100u32 {
        let k = AffinityKey { client: [i, 0, 0, 0], service_id: 7, ..Default::default() };
        let v = AffinityValue { last_used_ns: 1000 + i as u64, ..Default::default() };
        pins.insert(k, v, 0).unwrap();
    }
    drop(old);
    let sizes = MapSizes { affinity: 4096, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("migrates");
    let info = aya::maps::MapInfo::from_pin(dir.0.join(MAP_AFFINITY)).unwrap();
    assert_eq!(info.max_entries(), 4096);
    let entries: Vec<_> = dp.maps().affinity.iter().filter_map(Result::ok).collect();
    assert_eq!(entries.len(), 100);
    assert!(entries.iter().all(|(k, v)| k.service_id == 7 && v.last_used_ns == 1000 + k.client[0] as u64));
}

#[test]
fn rebuilt_service_maps_reset_affinity_pins_and_keep_flows() {
    let Some(dir) = PinDir::new("rebuild") else { return };
    let dp = Dataplane::load(&dir.0, &Config::default()).expect("fresh load");
    drop(dp);
    let mut maps = lb_userspace::dataplane::Maps::open_pinned(&dir.0).unwrap();
    let pin = AffinityKey { client: [1, 0, 0, 0], service_id: 1, ..Default::default() };
    maps.affinity.insert(pin, AffinityValue::default(), 0).unwrap();
    let flow =
        lb_common::CtKey { src: [1, 0, 0, 0], dst: [2, 0, 0, 0], sport: 1, dport: 2, proto: 6, ..Default::default() };
    maps.conntrack.insert(flow, lb_common::CtValue::default(), 0).unwrap();
    drop(maps);

    // Another services map size: service ids are handed out afresh, so pins keyed by the old
    // ids must go; the flow stays.
    let sizes = MapSizes { services: 1000, ..MapSizes::default() };
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("rebuilds");
    assert_eq!(dp.maps().affinity.keys().count(), 0);
    assert!(dp.maps().conntrack.get(&flow, 0).is_ok());
    drop(dp);

    // Same sizes again: nothing is rebuilt, so a pin survives a plain restart.
    let mut maps = lb_userspace::dataplane::Maps::open_pinned(&dir.0).unwrap();
    maps.affinity.insert(pin, AffinityValue::default(), 0).unwrap();
    drop(maps);
    let dp = Dataplane::load(&dir.0, &Config { sizes, ..Config::default() }).expect("adopts");
    assert_eq!(dp.maps().affinity.keys().count(), 1);
}
