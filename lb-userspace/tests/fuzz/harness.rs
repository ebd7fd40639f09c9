//! The datapath side of the fuzz runs: the real programs loaded under a pin directory of their
//! own, maps filled by the real translation of `lb_tests::fuzz::world::WORLD_YAML`, and the
//! `Datapath` the fuzzer of `lb_tests::fuzz` drives. One file for the fuzz test
//! (`lb-userspace/tests/fuzz.rs`) and the bench's fuzz section (`bench/src/fuzz.rs`), which
//! both include it by path: the fuzzer lives in `lb-tests`, which cannot depend on
//! `lb-userspace` (whose tests depend on it).
use std::{net::Ipv4Addr, path::PathBuf};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{ProgramError, TestRun, TestRunOptions},
};
use lb_common::{FragKey, FragValue, COUNTER_MAX, MAP_FRAGMENTS};
use lb_tests::fuzz::{world, Backend, Counters, Datapath, Frontend, Hook, NodeNs, RunError, World};
use lb_userspace::{
    dataplane::{ClusterCidrFamilies, Config, Dataplane, MapSizes, Maps, Timeouts},
    manifests,
    model::{translate, Cidr, DesiredState, NodeInfo, Scope, ServicePort},
};

/// The datapath under test, under its own pin directory (removed on drop).
pub struct Loaded {
    pub dp: Dataplane,
    pub pin: PathBuf,
    pub maps: Maps,
    pub frags: HashMap<MapData, FragKey, FragValue>,
    /// Egress runs that either program could take (`run_egress`): every other one goes through
    /// the egress program of devices without a link-layer header.
    pub egress_runs: u64,
    /// Frames `lb_tc_egress_l3` changed (restored replies, translated errors).
    pub egress_l3_changed: u64,
    /// Tc ingress runs that either program could take (`run`): every other one goes through
    /// the ingress program of devices without a link-layer header.
    pub ingress_runs: u64,
    /// Frames `lb_tc_ingress_l3` handed to the Ethernet program (with a header pushed).
    pub ingress_l3_handed: u64,
    /// Of those, the whole TCP and UDP packets whose hand-on its pre-filter's bits were
    /// checked against (`prefilter_passes`).
    pub ingress_l3_judged: u64,
    /// The fuzz world, for `Loaded::may_be_refused`.
    world: World,
}

/// Whether `frame`'s ethertype names the IP version its IP header has: the frames a device
/// without a link-layer header could carry (it has no ethertype; the version stands for it).
/// And at least 14 bytes from the IP header on, the least BPF_PROG_TEST_RUN takes for a tc
/// program (it reads any data as an Ethernet frame): a shorter one is refused with EINVAL.
fn version_agrees(frame: &[u8]) -> bool {
    frame.len() >= 28
        && matches!((u16::from_be_bytes([frame[12], frame[13]]), frame[14] >> 4), (0x0800, 4) | (0x86dd, 6))
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// Lifetimes far beyond a run's duration and a conntrack LRU with room for an epoch of
/// flows: nothing the model relies on expires or is evicted.
pub fn config() -> Config {
    let day = 86_400;
    let timeouts = Timeouts {
        tcp_syn_s: day,
        tcp_established_s: day,
        tcp_fin_wait_s: day,
        tcp_last_ack_s: day,
        tcp_time_wait_s: day,
        tcp_close_s: day,
        udp_s: day,
    };
    Config {
        timeouts,
        sizes: MapSizes { conntrack_new: 262_144, ..MapSizes::default() },
        node_ip: Some(world::NODE_IP),
        // As the world's `--cluster-cidr` (`world::CLUSTER_CIDR`, `World::snat_off_cluster`).
        cluster_cidr_families: ClusterCidrFamilies { ipv4: true, ipv6: false },
        ..Config::default()
    }
}

fn desired() -> Result<DesiredState, String> {
    let (objects, errors) = manifests::parse(&[(PathBuf::from("fuzz.yaml"), world::WORLD_YAML.to_string())]);
    if !errors.is_empty() {
        return Err(format!("the fuzz world's YAML: {errors:?}"));
    }
    let t = translate(&objects.services, &objects.slices, &NodeInfo::named(world::NODE_NAME));
    if !t.errors.is_empty() {
        return Err(format!("translating the fuzz world: {:?}", t.errors));
    }
    Ok(t.state)
}

/// The fuzz world is IPv4 only (its datapath is loaded without the IPv6 programs).
fn v4(ip: std::net::IpAddr) -> Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("the fuzz world has no IPv6 address, got {a}"),
    }
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

/// The model's view of what was applied: every frontend the datapath has a key for.
fn world_of(state: &DesiredState) -> World {
    let frontends = state
        .services
        .iter()
        .filter(|(f, _)| !f.is_from_cluster())
        .map(|(f, sp)| {
            let companion = f.from_cluster().and_then(|c| state.services.get(&c));
            Frontend { from_cluster: companion.map(|c| Box::new(frontend(f, c))), ..frontend(f, sp) }
        })
        .collect();
    World::new(frontends)
}

/// Loads the datapath under `pin` (inside `ns`, the fuzzer's node namespace) and programs the
/// fuzz world. The agent's collector keeps walking the assured table on its own thread, as on
/// a node: with lifetimes of a day it must find nothing to collect while the packets run.
pub fn load(ns: &NodeNs, pin: PathBuf) -> Result<(Loaded, World), String> {
    let _ = std::fs::remove_dir_all(&pin);
    let mut dp = Dataplane::load(&pin, &config()).map_err(|e| format!("loading the datapath: {e}"))?;
    let state = desired()?;
    let report = dp.apply(&state);
    if !report.errors.is_empty() {
        return Err(format!("applying the fuzz world: {:?}", report.errors));
    }
    let node_addrs: Vec<Ipv4Addr> = World::new(Vec::new()).node_addrs;
    dp.set_node_addresses(&node_addrs).map_err(|e| format!("node addresses: {e}"))?;
    let (addr, len) = world::CLUSTER_CIDR;
    dp.set_local_sources(&[Cidr { addr: std::net::IpAddr::V4(addr), len }])
        .map_err(|e| format!("LB_LOCAL_SOURCES: {e}"))?;
    let mut maps = Maps::open_pinned(&pin).map_err(|e| format!("opening pinned maps: {e}"))?;
    // ext0 takes native XDP frames, as the agent lists a driver with ndo_xdp_xmit.
    maps.xdp_targets.insert(ns.ifindex("ext0")?, 1, 0).map_err(|e| format!("LB_XDP_TARGETS: {e}"))?;
    let frags = MapData::from_pin(pin.join(MAP_FRAGMENTS))
        .map_err(|e| e.to_string())
        .and_then(|d| Map::from_map_data(d).map_err(|e| e.to_string()))
        .and_then(|m| HashMap::try_from(m).map_err(|e| e.to_string()))
        .map_err(|e| format!("LB_FRAGMENTS: {e}"))?;
    let world = world_of(&state);
    let loaded = Loaded {
        dp,
        pin,
        maps,
        frags,
        egress_runs: 0,
        egress_l3_changed: 0,
        ingress_runs: 0,
        ingress_l3_handed: 0,
        ingress_l3_judged: 0,
        world: world.clone(),
    };
    Ok((loaded, world))
}

fn clear<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>) -> Result<(), String> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    keys.iter().try_for_each(|k| map.remove(k).map_err(|e| e.to_string()))
}

/// What BPF_PROG_TEST_RUN answers, before the program runs, for some data from the IP header
/// on: it reads any data as an Ethernet frame (`eth_type_trans`), and the fuzz met a truncated
/// IPv4 packet whose source address's first bytes read as IPv4's ethertype, with less than an
/// IPv4 header behind the first 14 bytes, refused so. A device without a link-layer header
/// has no such rule; such a frame goes through the Ethernet program instead.
const REFUSED_AS_ETHERNET: i32 = libc::EINVAL;

fn run_error(e: ProgramError) -> RunError {
    match e {
        ProgramError::SyscallError(e) => RunError::Refused(e.io_error.raw_os_error().unwrap_or(0)),
        e => RunError::Failed(e.to_string()),
    }
}

impl Loaded {
    /// Whether tc may answer `frame` with an ICMP error it builds in place: an IPv4 frame to
    /// a frontend that serves its source with no backends (and no local traffic policy, which
    /// drops instead). Such frames skip `lb_tc_ingress_l3`, whose
    /// refusal `BPF_PROG_TEST_RUN` cannot show: it reads any data as an Ethernet frame
    /// (`eth_type_trans`), so for a packet from its IP header on the skb's protocol comes from
    /// its address bytes and its network header sits 14 bytes in, and `bpf_skb_adjust_room`,
    /// which makes the error's room, goes by both. (A tunnel device sets them right; the
    /// refusal by a tunnel is shown end to end,
    /// `real_traffic::service_traffic_by_a_tunnel_device_is_translated_both_ways`.)
    fn may_be_refused(&self, frame: &[u8]) -> bool {
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let Some(port) = frame.get(14 + ihl + 2..14 + ihl + 4) else {
            return false;
        };
        if frame[14] >> 4 != 4 || ihl < 20 {
            return false;
        }
        let addr = |i: usize| Ipv4Addr::new(frame[i], frame[i + 1], frame[i + 2], frame[i + 3]);
        let dport = u16::from_be_bytes([port[0], port[1]]);
        self.world.frontend(addr(30), dport, frame[23]).is_some_and(|i| {
            let fe = self.world.serving(i, addr(26));
            fe.backends.is_empty() && !fe.local_only
        })
    }

    /// Whether `lb_tc_ingress_l3` must pass `frame` without handing it on, by what its
    /// pre-filter reads (`passed_as`): a whole IPv4 TCP or UDP packet, its L4 header complete,
    /// whose destination has no bit in `LB_FILTER`'s frontend half and that is no reply to the
    /// node (a destination flows are SNATed to, a source with a bit in the backend half).
    /// `None` for every other frame, which the program may hand on or not: this bounds how
    /// loose its pre-filter may be, which the model cannot see (a frame handed on and passed
    /// untouched by the Ethernet program comes out as if passed at once). The bits are read
    /// from the map the agent wrote, so a frame the filter hits by chance may be handed on.
    fn prefilter_passes(&self, frame: &[u8]) -> Result<Option<bool>, String> {
        let Some(ip) = frame.get(14..).filter(|ip| ip.len() >= 20 && ip[0] >> 4 == 4) else {
            return Ok(None);
        };
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        // More fragments, or an offset: fragments go on whatever their addresses.
        let whole = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0;
        let l4_len = match ip[9] {
            6 => 20,
            17 => 8,
            _ => return Ok(None),
        };
        let Some(l4) = ip.get(ihl..ihl + l4_len).filter(|_| ihl >= 20 && whole) else {
            return Ok(None);
        };
        // As the program loads them: each field's bytes in memory order.
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let hit = |half: u32, addr: u32, port: &[u8]| -> Result<bool, String> {
            let bit = lb_common::filter_bit(addr, u16::from_ne_bytes([port[0], port[1]]), ip[9]);
            let w = self.maps.filter.get(&(half + (bit >> 6)), 0).map_err(|e| format!("reading LB_FILTER: {e}"))?;
            Ok(w & 1 << (bit & 63) != 0)
        };
        let to_node = ip[16..20] == world::NODE_IP.octets() || ip[16..20] == world::HAIRPIN_IP.octets();
        let handed = hit(lb_common::FILTER_FRONTENDS, word(&ip[16..20]), &l4[2..4])?
            || (to_node && hit(lb_common::FILTER_BACKENDS, word(&ip[12..16]), &l4[0..2])?);
        Ok(Some(!handed))
    }

    /// `run_egress` on the egress program of devices without a link-layer header (`l3`), or
    /// on the Ethernet one.
    fn run_egress_on(&mut self, frame: &[u8], out: &mut [u8], l3: bool) -> Result<(u32, usize), RunError> {
        let (prog, data, skip) = if l3 {
            (self.dp.tc_egress_l3_program(), &frame[14..], 14)
        } else {
            (self.dp.tc_egress_program(), frame, 0)
        };
        let opts = TestRunOptions { data_in: Some(data), data_out: Some(&mut out[skip..]), ..Default::default() };
        let r = prog.test_run(opts).map_err(run_error)?;
        out[..skip].copy_from_slice(&frame[..skip]);
        let n = skip + r.data_size_out as usize;
        self.egress_l3_changed += u64::from(l3 && out[..n] != *frame);
        Ok((r.return_value, n))
    }

    /// `lb_tc_ingress_l3` on `frame` from its IP header on, as a tunnel device hands it to tc;
    /// the output as the Ethernet program's would be. A packet it passes comes out from its IP
    /// header on, untouched: the frame's Ethernet header goes back in front. One it hands to
    /// the Ethernet program comes out behind the header it pushed, whose addresses are zeros
    /// (an IP header cannot start with a zero byte, so the first byte tells which): the
    /// frame's go in their place, swapped where the Ethernet program answered with an ICMP
    /// error it built in place (`reject.rs` swaps a frame's addresses). Anything else in
    /// that header is left for the model to find.
    fn run_ingress_l3(&mut self, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError> {
        let opts = TestRunOptions { data_in: Some(&frame[14..]), data_out: Some(out), ..Default::default() };
        let r = self.dp.tc_ingress_l3_program().test_run(opts).map_err(run_error)?;
        let n = r.data_size_out as usize;
        if n == 0 || out[0] != 0 {
            if n + 14 > out.len() {
                return Err(RunError::Failed(format!("output of {n} bytes and its Ethernet header overflow")));
            }
            out.copy_within(..n, 14);
            out[..14].copy_from_slice(&frame[..14]);
            return Ok((r.return_value, n + 14));
        }
        self.ingress_l3_handed += 1;
        let judged = self.prefilter_passes(frame).map_err(RunError::Failed)?;
        self.ingress_l3_judged += u64::from(judged.is_some());
        if judged == Some(true) {
            return Err(RunError::Wrong(
                "lb_tc_ingress_l3 handed on a whole IPv4 TCP or UDP packet whose destination is no frontend's \
                 and that is no backend's reply to the node (its pre-filter should have passed it)"
                    .into(),
            ));
        }
        if n >= 34 && out[..12] == [0; 12] {
            let (proto, icmp) = if frame[14] >> 4 == 4 { (23, 1) } else { (20, 58) };
            if out[proto] == icmp && frame[proto] != icmp {
                out[..6].copy_from_slice(&frame[6..12]);
                out[6..12].copy_from_slice(&frame[..6]);
            } else {
                out[..12].copy_from_slice(&frame[..12]);
            }
        }
        Ok((r.return_value, n))
    }
}

impl Datapath for Loaded {
    /// At tc, every other frame whose IP version agrees with its ethertype goes through
    /// `lb_tc_ingress_l3` instead (`Loaded::run_ingress_l3`), so that the model judges the
    /// tunnel's ingress program, and the Ethernet program behind it, on the same traffic.
    fn run(&mut self, hook: Hook, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError> {
        if hook == Hook::Tc && version_agrees(frame) && !self.may_be_refused(frame) {
            self.ingress_runs += 1;
            if self.ingress_runs.is_multiple_of(2) {
                match self.run_ingress_l3(frame, out) {
                    Err(RunError::Refused(e)) if e == REFUSED_AS_ETHERNET => {}
                    r => return r,
                }
            }
        }
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(out), ..Default::default() };
        let res = match hook {
            Hook::Tc => self.dp.tc_program().test_run(opts),
            Hook::Xdp => self.dp.xdp_program().test_run(opts),
        };
        res.map(|r| (r.return_value, r.data_size_out as usize)).map_err(run_error)
    }

    /// Every other frame whose IP version agrees with its ethertype goes through
    /// `lb_tc_egress_l3` instead, as a tunnel device hands it to tc (from its IP header on; the
    /// frame's Ethernet header is put back on the output), so that the model judges the
    /// tunnel's egress program on the same traffic. (Where version and ethertype disagree the
    /// two programs rightly differ: a tunnel's packet has no ethertype.)
    fn run_egress(&mut self, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), RunError> {
        let agree = version_agrees(frame);
        self.egress_runs += u64::from(agree);
        let l3 = agree && self.egress_runs.is_multiple_of(2);
        match self.run_egress_on(frame, out, l3) {
            Err(RunError::Refused(e)) if l3 && e == REFUSED_AS_ETHERNET => self.run_egress_on(frame, out, false),
            r => r,
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
        // The datapath's cached copies of established entries go with them (`ct_cache.rs`).
        let keys: Vec<_> = self.maps.conntrack.keys().filter_map(Result::ok).collect();
        self.dp.forget_cached_flows(&keys).map_err(|e| e.to_string())?;
        clear(&mut self.maps.conntrack)?;
        self.maps.conntrack_new.clear().map_err(|e| e.to_string())?;
        clear(&mut self.maps.affinity)?;
        clear(&mut self.frags)
    }
}
