//! The fuzz run of issue 11 at ten times the test's length: 10,000,000 random, truncated and
//! mutated frames (100,000 with `--quick`) through the tc and XDP programs, each output judged
//! by the model of `lb_tests::fuzz` (as `lb-userspace/tests/fuzz.rs` does with 1,000,000). A
//! judgement that fails fails the bench, with the seed that replays it (`LB_FUZZ_SEED`).
use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{ProgramError, TestRun, TestRunOptions},
};
use lb_common::{FragKey, FragValue, COUNTER_MAX, MAP_FRAGMENTS};
use lb_tests::fuzz::{self, world, Backend, Counters, Datapath, Frontend, Hook, NodeNs, RunError, World};
use lb_userspace::{
    dataplane::{Config, Dataplane, MapSizes, Maps, Timeouts},
    manifests,
    model::{translate, Cidr, NodeInfo, Scope, ServicePort},
};

struct Loaded {
    dp: Dataplane,
    pin: PathBuf,
    maps: Maps,
    frags: HashMap<MapData, FragKey, FragValue>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// As the test's: nothing expires during the run, an epoch of flows fits the LRU.
fn config() -> Config {
    let day = 86_400;
    Config {
        timeouts: Timeouts {
            tcp_syn_s: day,
            tcp_established_s: day,
            tcp_fin_wait_s: day,
            tcp_last_ack_s: day,
            tcp_time_wait_s: day,
            tcp_close_s: day,
            udp_s: day,
        },
        sizes: MapSizes { conntrack_new: 262_144, ..MapSizes::default() },
        node_ip: Some(world::NODE_IP),
        ..Config::default()
    }
}

fn load(ns: &NodeNs) -> Result<(Loaded, World)> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}-fuzz", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    let dp = Dataplane::load(&pin, &config()).context("loading the datapath")?;
    // The agent's collector keeps walking the assured table meanwhile, as on a node.
    let (objects, errors) = manifests::parse(&[(PathBuf::from("fuzz.yaml"), world::WORLD_YAML.to_string())]);
    if !errors.is_empty() {
        bail!("the fuzz world's YAML: {errors:?}");
    }
    let state = translate(&objects.services, &objects.slices, &NodeInfo::named(world::NODE_NAME)).state;
    let frontends = state
        .services
        .iter()
        .filter(|(f, _)| !f.is_from_cluster())
        .map(|(f, sp)| {
            let companion = f.from_cluster().and_then(|c| state.services.get(&c));
            Frontend { from_cluster: companion.map(|c| Box::new(frontend(f, c))), ..frontend(f, sp) }
        })
        .collect();
    let world = World::new(frontends);
    let mut loaded = Loaded {
        maps: Maps::open_pinned(&pin)?,
        frags: HashMap::try_from(Map::from_map_data(MapData::from_pin(pin.join(MAP_FRAGMENTS))?)?)?,
        dp,
        pin,
    };
    let report = loaded.dp.apply(&state);
    if !report.errors.is_empty() {
        bail!("applying the fuzz world: {:?}", report.errors);
    }
    let node_addrs: Vec<Ipv4Addr> = world.node_addrs.clone();
    loaded.dp.set_node_addresses(&node_addrs)?;
    let (addr, len) = world::CLUSTER_CIDR;
    loaded.dp.set_local_sources(&[Cidr { addr: std::net::IpAddr::V4(addr), len }])?;
    loaded.maps.xdp_targets.insert(ns.ifindex("ext0").map_err(|e| anyhow!(e))?, 1, 0)?;
    Ok((loaded, world))
}

/// The model's view of one frontend the translation produced.
fn frontend(f: &lb_userspace::model::Frontend, sp: &ServicePort) -> Frontend {
    Frontend {
        ip: (f.scope != Scope::NodePort).then_some(v4(f.ip)),
        port: f.port,
        proto: f.protocol.number(),
        backends: sp.backends.iter().map(|e| Backend { ip: v4(e.ip), port: e.port, local: e.local }).collect(),
        external: sp.external,
        local_only: sp.local_only,
        source_ranges: sp.source_ranges.iter().map(|c| (v4(c.addr), c.len)).collect(),
        affinity: sp.affinity_timeout_s.is_some(),
        name: sp.name.clone(),
        from_cluster: None,
    }
}

fn clear<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>) -> Result<(), String> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    keys.iter().try_for_each(|k| map.remove(k).map_err(|e| e.to_string()))
}

impl Datapath for Loaded {
    fn run(&mut self, hook: Hook, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError> {
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(out), ..Default::default() };
        let res = match hook {
            Hook::Tc => self.dp.tc_program().test_run(opts),
            Hook::Xdp => self.dp.xdp_program().test_run(opts),
        };
        match res {
            Ok(r) => Ok((r.return_value, r.data_size_out as usize)),
            Err(ProgramError::SyscallError(e)) => Err(RunError::Refused(e.io_error.raw_os_error().unwrap_or(0))),
            Err(e) => Err(RunError::Failed(e.to_string())),
        }
    }

    fn counters(&mut self) -> Result<Counters, String> {
        let mut c = [[0u64; COUNTER_MAX as usize]; 2];
        for (h, hook) in c.iter_mut().enumerate() {
            for (i, v) in hook.iter_mut().enumerate() {
                let index = h as u32 * COUNTER_MAX + i as u32;
                *v = self.maps.stats.get(&index, 0).map_err(|e| e.to_string())?.iter().sum();
            }
        }
        Ok(c)
    }

    fn clear_flows(&mut self) -> Result<(), String> {
        clear(&mut self.maps.conntrack)?;
        clear(&mut self.maps.conntrack_new)?;
        clear(&mut self.maps.affinity)?;
        clear(&mut self.frags)
    }
}

/// Runs the fuzzer and returns its section of the results.
pub fn run(quick: bool) -> Result<String> {
    let frames = if quick { 100_000 } else { 10_000_000 };
    // On a thread of its own: it enters a network namespace, which must not leak into the
    // other measurements.
    let report = std::thread::spawn(move || -> Result<fuzz::Report> {
        let ns = NodeNs::enter().map_err(|e| anyhow!(e))?;
        let (mut dp, world) = load(&ns)?;
        let sizes = config().sizes;
        let opts = fuzz::Options::from_env(frames, fuzz::budget(sizes.conntrack_new, sizes.affinity));
        fuzz::run(&mut dp, world, &opts).map_err(|f| anyhow!("{f}"))
    })
    .join()
    .map_err(|_| anyhow!("the fuzz thread panicked"))??;
    report.coverage().map_err(|e| anyhow!("seed {}: {e}", report.seed))?;
    report.fixed_bugs_absent().map_err(|e| anyhow!("seed {}: {e}", report.seed))?;
    let mut md = String::from("## 6. Fuzz (issue 11)\n\n");
    writeln!(
        md,
        "{} random, truncated and mutated frames through the tc and XDP programs (`BPF_PROG_TEST_RUN`), every \
         output judged by the userspace model and the independent parser of `lb_tests::fuzz`: all passed ({:.0} \
         frames/s).\n\n{}\n",
        report.frames,
        report.frames as f64 / report.elapsed.as_secs_f64(),
        report.summary()
    )?;
    Ok(md)
}

/// The fuzz world is IPv4 only (the IPv6 datapath is not loaded by default).
fn v4(ip: std::net::IpAddr) -> std::net::Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("the fuzz world has no IPv6 address, got {a}"),
    }
}
