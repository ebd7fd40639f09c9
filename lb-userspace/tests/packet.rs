//! Packet tests: the real tc program, loaded from the object `lb` embeds, with maps filled by
//! the real translation from YAML, run on crafted frames with `BPF_PROG_TEST_RUN`. Output is
//! checked by the independent parser below, which recomputes every checksum from scratch.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN). Skips when not root, except under CI=true, where a
//! privileged test must run or fail.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::Counter;
use lb_tests::packet::{
    fold, fragment, frame, icmp_error, parse_checked, parse_icmp_checked, reassemble, sum16, with_ip_options, L4,
};
use lb_userspace::{
    dataplane::{backend_value, service_key, Config, Dataplane, DataplaneError, MapSizes, Maps, SLOT_GRACE},
    manifests,
    model::{translate, DesiredState, Endpoint, Frontend, Protocol},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
/// TC_ACT_UNSPEC (-1) as the kernel reports it: "not ours, continue".
const TC_ACT_UNSPEC: u32 = u32::MAX;

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "packet tests need root and CI=true forbids skipping");
    eprintln!("skipping: packet tests need root");
    false
}

/// A datapath loaded with its own pin directory, removed on drop (also when a test fails).
struct Harness {
    dp: Dataplane,
    pin_dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Keeps the test's thread on the CPU it runs on, so that its packets all meet the same
/// per-CPU state of the datapath (its copy of the frontend it found last,
/// `service::lookup_cached`): a thread that moved between packets could miss a copy left
/// stale on the CPU it left, and a test of the agent's changes would pass by luck.
fn stay_on_this_cpu() {
    // SAFETY: plain system calls on this thread, with a set built on the stack.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(r, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
    }
}

fn desired(yaml: &str) -> DesiredState {
    let (objects, errors) = manifests::parse(&[(PathBuf::from("test.yaml"), yaml.to_string())]);
    assert!(errors.is_empty(), "{errors:?}");
    let t = translate(&objects.services, &objects.slices, &lb_userspace::model::NodeInfo::named("node-a"));
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    t.state
}

impl Harness {
    fn new(yaml: &str) -> Self {
        Self::with_config(yaml, Config::default())
    }

    fn with_config(yaml: &str, config: Config) -> Self {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-packet-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        stay_on_this_cpu();
        let dp = Dataplane::load(&pin_dir, &config).expect("loading datapath");
        let mut h = Harness { dp, pin_dir };
        h.apply(yaml);
        h
    }

    fn apply(&mut self, yaml: &str) {
        let report = self.dp.apply(&desired(yaml));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    /// A second handle on the pinned maps, writable, as another process would open them.
    fn pinned_maps(&self) -> Maps {
        Maps::open_pinned(&self.pin_dir).expect("opening pinned maps")
    }

    /// DNAT destination of a SYN from `client:port` to the lab ClusterIP.
    fn syn_dst(&self, client: Ipv4Addr, port: u16) -> (Ipv4Addr, u16) {
        let (verdict, out) = self.run(&frame((client, port), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
        assert_eq!(verdict, TC_ACT_OK);
        parse_checked(&out).dst
    }

    /// Runs the program once on `frame`; returns the verdict and the output frame.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_tc(self.dp.tc_program(), frame)
    }

    /// Runs the tc egress program (what this node itself sends).
    fn run_egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_tc(self.dp.tc_egress_program(), frame)
    }

    /// Runs the tc egress program for devices without a link-layer header on `frame` less its
    /// Ethernet header, as a tunnel device hands it to tc; the verdict and the output with that
    /// header put back, for the parsers.
    fn run_egress_l3(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_tc_l3(self.dp.tc_egress_l3_program(), frame)
    }

    /// Runs the tc ingress program for devices without a link-layer header on `frame` less its
    /// Ethernet header, as a tunnel device hands it to tc; the verdict and the output as the
    /// program left it: with the Ethernet header it pushed when it handed the packet to the
    /// Ethernet program, else from the IP header on.
    fn run_ingress_l3(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_tc(self.dp.tc_ingress_l3_program(), &frame[14..])
    }

    /// A backend's packet to a client whose flow is not SNATed, as a node handles it: the tc
    /// ingress program leaves it untouched to the stack (asserted), which forwards it as the
    /// backend sent it, and the tc egress program of the interface it leaves by restores it.
    /// The egress verdict and frame.
    #[track_caller]
    fn reply(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        assert_eq!(self.run(frame), (TC_ACT_UNSPEC, frame.to_vec()), "a reply left to the stack at ingress");
        self.run_egress(frame)
    }

    fn counter(&self, c: Counter) -> u64 {
        self.dp.maps().stats.get(&(c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// One of the harness's ways to run a program on a frame (`Harness::run_egress`, ...).
type RunOn = fn(&Harness, &[u8]) -> (u32, Vec<u8>);

#[path = "packet/conntrack.rs"]
mod conntrack;
#[path = "packet/ipv6.rs"]
mod ipv6;
#[path = "packet/l3.rs"]
mod l3;
#[path = "packet/vlan.rs"]
mod vlan;

// ---------- fixtures ----------

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

fn lab_yaml(backends: &[&str]) -> String {
    let eps: String =
        backends.iter().map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n")).collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web-service, namespace: default}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: web}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {{name: http, protocol: TCP, port: 80}}
  - {{name: udp, protocol: UDP, port: 53}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-service-abc
  namespace: default
  labels: {{kubernetes.io/service-name: web-service}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
{eps}"#
    )
}

const BACKENDS: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];

fn backend_set(ips: &[&str], port: u16) -> BTreeSet<(Ipv4Addr, u16)> {
    ips.iter().map(|ip| (ip.parse().unwrap(), port)).collect()
}

// ---------- tests ----------

#[test]
fn syn_to_cluster_ip_is_translated_and_reply_is_reversed() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let syn = frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(p.src, (CLIENT, 40000), "source must be untouched");
    assert!(
        backend_set(&BACKENDS, 8080).contains(&p.dst),
        "DNAT to a backend and the slice's target port, got {:?}",
        p.dst
    );
    assert_eq!(out.len(), syn.len());
    assert_eq!(&out[..12], &syn[..12], "MACs untouched");

    // The next packet of the flow goes to the same backend.
    let ack = frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: ACK }, b"GET / HTTP/1.0\r\n\r\n");
    let (verdict, out2) = h.run(&ack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(parse_checked(&out2).dst, p.dst);

    // The backend's SYN-ACK comes back from the ClusterIP and service port (restored at the
    // egress it leaves by, after the stack).
    let reply = frame(p.dst, (CLIENT, 40000), L4::Tcp { flags: SYN_ACK }, &[]);
    let (verdict, out3) = h.reply(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let r = parse_checked(&out3);
    assert_eq!(r.src, (VIP, 80));
    assert_eq!(r.dst, (CLIENT, 40000));

    assert_eq!(h.counter(Counter::FwdNewFlow), 1);
    assert_eq!(h.counter(Counter::FwdTracked), 1);
    assert_eq!(h.counter(Counter::ReplyTranslated), 1);
}

#[test]
fn flows_spread_over_all_backends() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let mut seen = std::collections::BTreeMap::new();
    for port in 30000..30090u16 {
        let (_, out) = h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
        *seen.entry(parse_checked(&out).dst).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n >= 10), "{seen:?}");
}

#[test]
fn udp_is_translated_both_ways_and_zero_checksum_stays_zero() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let q = frame((CLIENT, 5000), (VIP, 53), L4::Udp { zero_csum: false }, b"query");
    let (verdict, out) = h.run(&q);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(p.proto, 17);
    assert!(backend_set(&BACKENDS, 5353).contains(&p.dst), "{:?}", p.dst);
    assert_ne!(p.l4_csum, 0);
    assert_eq!(&out[42..], b"query", "payload untouched");

    let reply = frame(p.dst, (CLIENT, 5000), L4::Udp { zero_csum: false }, b"answer");
    let (_, out) = h.reply(&reply);
    let r = parse_checked(&out);
    assert_eq!(r.src, (VIP, 53));

    let q0 = frame((CLIENT, 5001), (VIP, 53), L4::Udp { zero_csum: true }, b"query");
    let (verdict, out) = h.run(&q0);
    assert_eq!(verdict, TC_ACT_OK);
    let p0 = parse_checked(&out);
    assert!(backend_set(&BACKENDS, 5353).contains(&p0.dst));
    assert_eq!(p0.l4_csum, 0, "a zero UDP checksum means none and must stay zero");
}

#[test]
fn non_service_traffic_is_untouched() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let cases = [
        // Another address, the service port.
        frame((CLIENT, 40000), (Ipv4Addr::new(10, 96, 0, 11), 80), L4::Tcp { flags: SYN }, &[]),
        // The ClusterIP, another port.
        frame((CLIENT, 40000), (VIP, 8080), L4::Tcp { flags: SYN }, &[]),
        // The ClusterIP, port 53 but TCP (only UDP 53 is a service port).
        frame((CLIENT, 40000), (VIP, 53), L4::Tcp { flags: SYN }, &[]),
        // Pod to pod.
        frame((CLIENT, 40000), (Ipv4Addr::new(10, 244, 1, 11), 8080), L4::Tcp { flags: SYN }, &[]),
    ];
    for f in cases {
        let (verdict, out) = h.run(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC);
        assert_eq!(out, f);
    }
    assert_eq!(h.counter(Counter::PassNotService), 4);
}

#[test]
fn truncated_and_non_ip_frames_pass_unharmed() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let syn = frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: SYN }, &[]);
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    let mut ihl_beyond = syn.clone();
    ihl_beyond[14] = 0x4f;
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than Ethernet + a 20-byte IP header
        // (EINVAL on kernel 6.18), as the stack would never hand them to tc; the shortest we
        // can test stop right after the IP header.
        ("no L4 header", syn[..34].to_vec(), Counter::PassMalformed),
        ("IHL beyond the frame", ihl_beyond, Counter::PassMalformed),
        ("TCP header cut", syn[..40].to_vec(), Counter::PassMalformed),
        ("IHL below 5", bad_ihl, Counter::PassMalformed),
        ("ARP", arp, Counter::PassNotIp),
    ];
    for (what, f, counter) in cases {
        let before = h.counter(counter);
        let (verdict, out) = h.run(&f);
        assert_eq!(verdict, TC_ACT_UNSPEC, "{what}");
        assert_eq!(out, f, "{what}: frame must be unchanged");
        assert_eq!(h.counter(counter), before + 1, "{what}: counted as {}", counter.name());
    }
}

/// Checks an ICMP port unreachable built from `orig`.
/// `l4_quote`: bytes of the L4 header quoted (the whole TCP header, UDP's 8).
fn assert_port_unreachable(out: &[u8], orig: &[u8], l4_quote: usize) {
    assert_eq!(&out[0..6], &orig[6..12], "sent back to the client's MAC");
    assert_eq!(&out[6..12], &orig[0..6]);
    let ip = &out[14..34];
    assert_eq!(fold(sum16(ip)), 0, "IPv4 checksum");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(&ip[12..16], &orig[30..34], "from the service address");
    assert_eq!(&ip[16..20], &orig[26..30], "to the client");
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(out.len(), 14 + tot);
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination unreachable / port unreachable");
    assert_eq!(fold(sum16(icmp)), 0, "ICMP checksum");
    assert_eq!(icmp.len(), 8 + 20 + l4_quote);
    assert_eq!(&icmp[8..], &orig[14..14 + 20 + l4_quote], "quotes the original IP header and L4 header");
}

#[test]
fn service_without_endpoints_is_refused_with_icmp_port_unreachable() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let empty = Ipv4Addr::new(10, 96, 0, 20);
    let syn = frame((CLIENT, 40000), (empty, 80), L4::Tcp { flags: SYN }, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &syn, 20);

    let udp = frame((CLIENT, 5000), (empty, 53), L4::Udp { zero_csum: false }, b"");
    let (verdict, out) = h.run(&udp);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &udp, 8);
    assert_eq!(h.counter(Counter::RejectNoBackend), 2);
}

#[test]
fn a_packet_with_ip_options_is_translated_and_refused_like_any_other() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    // Translated: the L4 header is found behind the options.
    let syn = with_ip_options(&frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: SYN }, b"x"), 2);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[34..42], &syn[34..42], "options untouched");
    let mut plain = out[..34].to_vec();
    plain[14] = 0x45;
    plain.extend_from_slice(&out[42..]);
    let tot = u16::from_be_bytes([plain[16], plain[17]]) - 8;
    plain[16..18].copy_from_slice(&tot.to_be_bytes());
    plain[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&plain[14..34]));
    plain[24..26].copy_from_slice(&c.to_be_bytes());
    assert!(backend_set(&BACKENDS, 8080).contains(&parse_checked(&plain).dst));
    assert_eq!(fold(sum16(&out[14..42])), 0, "header checksum over the options");

    // Refused: the quote carries the header without its options (IHL 5) and the ports.
    let empty = Ipv4Addr::new(10, 96, 0, 20);
    for (l4, quote, n) in [(L4::Tcp { flags: SYN }, 20, 3), (L4::Udp { zero_csum: false }, 8, 10)] {
        let orig = frame((CLIENT, 40001), (empty, if quote == 20 { 80 } else { 53 }), l4, &[7; 12]);
        let (verdict, out) = h.run(&with_ip_options(&orig, n));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{n} option words");
        assert_port_unreachable(&out, &orig, quote);
    }
}

#[test]
fn backend_change_keeps_tracked_flows_and_steers_new_ones() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&lab_yaml(&BACKENDS));
    // Open flows until one lands on each backend.
    let mut flows = std::collections::BTreeMap::new();
    for port in 31000..31100u16 {
        let (_, out) = h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
        flows.entry(parse_checked(&out).dst.0).or_insert(port);
    }
    assert_eq!(flows.len(), 3);
    let removed: Ipv4Addr = BACKENDS[0].parse().unwrap();
    h.apply(&lab_yaml(&BACKENDS[1..]));

    // The established flow to the removed backend keeps going there.
    let port = flows[&removed];
    let (_, out) = h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: ACK }, b"x"));
    assert_eq!(parse_checked(&out).dst, (removed, 8080));

    // No new flow goes to it.
    for port in 32000..32100u16 {
        let (_, out) = h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
        assert_ne!(parse_checked(&out).dst.0, removed);
    }

    // Closing the old flow (FIN both ways, the last ACK: TIME_WAIT) and reusing its 5-tuple
    // for a new connection picks a live backend.
    h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: 0x11 }, &[]));
    h.reply(&frame((removed, 8080), (CLIENT, port), L4::Tcp { flags: 0x11 }, &[]));
    h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: ACK }, &[]));
    let (_, out) = h.run(&frame((CLIENT, port), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
    assert_ne!(parse_checked(&out).dst.0, removed);
}

#[test]
fn deleted_service_stops_translating() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&lab_yaml(&BACKENDS));
    let syn = frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: SYN }, &[]);
    assert_eq!(h.run(&syn).0, TC_ACT_OK);
    h.apply("");
    let (verdict, out) = h.run(&frame((CLIENT, 40001), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_UNSPEC);
    assert_eq!(parse_checked(&out).dst, (VIP, 80));
    // The tables (both ports) stay for packets that read the entry just before it went, then go.
    let slots = 2 * lb_common::maglev::table_size(3) as usize;
    assert_eq!(h.dp.retired_slots(), slots);
    assert_eq!(h.dp.collect_retired_at(Instant::now() + SLOT_GRACE), slots);
    assert_eq!(h.dp.retired_slots(), 0, "tables of the deleted service are freed");
}

/// Whether every slot of the table a service entry names still names a backend (a freed
/// table's slots name none).
fn table_intact(maps: &Maps, v: &lb_common::ServiceValue) -> bool {
    (v.table_off..v.table_off + v.table_size)
        .all(|slot| maps.maglev_slot(slot).is_ok_and(|id| maps.backends.get(&id, 0).is_ok()))
}

/// The lab ClusterIP's HTTP frontend key in `LB_SERVICES`.
fn http_key() -> lb_common::ServiceKey {
    service_key(&Frontend::cluster_ip(VIP, 80, Protocol::Tcp))
}

/// A packet copies the service entry, then looks its slot up. One that read the entry just
/// before a backend update flipped it must still find the generation the copy names.
#[test]
fn a_packet_that_read_the_service_entry_before_an_update_still_finds_its_slots() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&lab_yaml(&BACKENDS));
    let mut maps = h.pinned_maps();
    let before = maps.services.get(&http_key(), 0).unwrap();
    let newer = ["10.244.1.21", "10.244.1.22"];
    h.apply(&lab_yaml(&newer));
    let after = maps.services.get(&http_key(), 0).unwrap();
    assert_ne!(after.generation, before.generation);
    assert!(backend_set(&newer, 8080).contains(&h.syn_dst(CLIENT, 43000)));

    // The copy taken before the flip, as the packet in flight holds it (the generation moved
    // on, as the agent does after a write, so no CPU keeps its copy of the live entry).
    maps.services.insert(http_key(), before, 0).unwrap();
    h.dp.frontends_changed();
    for port in 43001..43030 {
        assert!(backend_set(&BACKENDS, 8080).contains(&h.syn_dst(CLIENT, port)), "an old backend, as before the flip");
    }
    assert_eq!(h.counter(Counter::DropSlotMissing), 0);
    maps.services.insert(http_key(), after, 0).unwrap();
    h.dp.frontends_changed();

    // Kept through the grace period (both ports of web-service changed: two tables)...
    let slots = 2 * lb_common::maglev::table_size(3) as usize;
    assert_eq!(h.dp.collect_retired(), 0);
    assert!(table_intact(&maps, &before));
    assert_eq!(h.dp.retired_slots(), slots);
    // ...also by an apply within it...
    h.apply(&lab_yaml(&newer));
    assert!(table_intact(&maps, &before));
    // ...and gone after it.
    assert_eq!(h.dp.collect_retired_at(Instant::now() + SLOT_GRACE), slots);
    assert_eq!(h.dp.retired_slots(), 0);
    assert!(!table_intact(&maps, &before));
    assert!(table_intact(&maps, &after), "the live table");
    // What the grace prevents: the stale copy now misses its table.
    maps.services.insert(http_key(), before, 0).unwrap();
    h.dp.frontends_changed();
    h.run(&frame((CLIENT, 43100), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(h.counter(Counter::DropSlotMissing), 1);
}

/// Tables held for their grace period count against the array's capacity: when a new table
/// does not fit, they go early rather than the frontend failing.
#[test]
fn retired_tables_give_way_when_the_maglev_array_is_full() {
    if !privileged() {
        return;
    }
    let m = lb_common::maglev::table_size(3);
    // Room for the two live tables (3 backends each) and one more.
    let sizes = MapSizes { maglev: 3 * m + 1, ..MapSizes::default() };
    let mut h = Harness::with_config(&lab_yaml(&BACKENDS), Config { sizes, ..Config::default() });
    // The HTTP port's new table (2 backends keep the size) fits, its old one is retired; the
    // DNS port's does not, so the retired table goes early and the DNS port is written.
    let newer = ["10.244.1.21", "10.244.1.22"];
    h.apply(&lab_yaml(&newer));
    assert_eq!(h.dp.retired_slots(), m as usize, "the DNS port's old table, in its grace");
    assert!(backend_set(&newer, 8080).contains(&h.syn_dst(CLIENT, 43000)));
    let (_, out) = h.run(&frame((CLIENT, 43000), (VIP, 53), L4::Udp { zero_csum: false }, b"q"));
    assert!(backend_set(&newer, 5353).contains(&parse_checked(&out).dst));
    assert_eq!(h.dp.collect_retired_at(Instant::now() + SLOT_GRACE), m as usize);
}

fn affinity_yaml(backends: &[&str], timeout: u32) -> String {
    lab_yaml(backends).replacen(
        "  selector: {app: web}\n",
        &format!("  selector: {{app: web}}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n"),
        1,
    )
}

/// CLOCK_MONOTONIC, which `bpf_ktime_get_ns` reads.
fn ktime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The backend a new flow from `client:port` gets from a fresh Maglev table of `backends`
/// (sorted, as the agent builds it), computed with the shared hash and table builder.
fn hash_choice(client: Ipv4Addr, port: u16, backends: &[&str]) -> Ipv4Addr {
    let mut set: Vec<lb_common::Backend> = backends
        .iter()
        .map(|b| backend_value(&Endpoint { ip: b.parse().unwrap(), port: 8080, local: false }))
        .collect();
    set.sort();
    let table = lb_common::maglev::update(&[], &set);
    let h = lb_common::select_hash(
        u32::from_ne_bytes(client.octets()),
        u32::from_ne_bytes(VIP.octets()),
        port.to_be(),
        80u16.to_be(),
        6,
    );
    match lb_userspace::dataplane::endpoint_of(&table[lb_common::select_slot(h, table.len() as u32) as usize]).ip {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("{other} is not IPv4"),
    }
}

/// A source port not yet used whose hash choice differs from `not`.
fn port_choosing_other_than(client: Ipv4Addr, not: Ipv4Addr, from: u16, backends: &[&str]) -> u16 {
    (from..).find(|&p| hash_choice(client, p, backends) != not).unwrap()
}

fn affinity_key(h: &Harness, client: Ipv4Addr) -> lb_common::AffinityKey {
    let id =
        h.dp.maps()
            .services
            .iter()
            .filter_map(Result::ok)
            // web-service's HTTP frontend (the "empty" Service also has a port 80).
            .find(|(k, _)| k.addr[0] == u32::from_ne_bytes(VIP.octets()) && k.port == 80u16.to_be() && k.proto == 6)
            .unwrap()
            .1
            .id;
    lb_common::AffinityKey {
        client: [u32::from_ne_bytes(client.octets()), 0, 0, 0],
        service_id: id,
        family: 4,
        _pad: [0; 3],
    }
}

#[test]
fn affinity_pins_each_client_and_clients_choose_independently() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&affinity_yaml(&BACKENDS, 60));
    let first = h.syn_dst(CLIENT, 40000);
    // The hash alone would spread these ports over all three backends.
    let hashed: BTreeSet<Ipv4Addr> = (40001..40030).map(|p| hash_choice(CLIENT, p, &BACKENDS)).collect();
    assert_eq!(hashed.len(), 3);
    for port in 40001..40030 {
        assert_eq!(h.syn_dst(CLIENT, port), first, "same client, new connection, same backend");
    }
    assert_eq!(h.counter(Counter::AffinityHit), 29);
    // Other clients are pinned on their own: across 30 clients more than one backend shows.
    let others: BTreeSet<_> = (1..=30u8).map(|i| h.syn_dst(Ipv4Addr::new(10, 244, 2, i), 50000)).collect();
    assert!(others.len() > 1, "{others:?}");
    // Affinity is per frontend: the UDP port of the same Service has its own pin.
    let (_, out) = h.run(&frame((CLIENT, 40000), (VIP, 53), L4::Udp { zero_csum: false }, b"q"));
    assert_eq!(parse_checked(&out).dst.1, 5353);
}

#[test]
fn affinity_expires_after_idle_timeout_and_each_new_connection_restarts_the_timer() {
    if !privileged() {
        return;
    }
    let timeout = 30u64;
    let h = Harness::new(&affinity_yaml(&BACKENDS, timeout as u32));
    let pinned = h.syn_dst(CLIENT, 40000).0;
    let key = affinity_key(&h, CLIENT);
    let mut maps = h.pinned_maps();

    // Used 5 s before the timeout ran out: still pinned, and the use restarts the timer.
    let mut v = maps.affinity.get(&key, 0).unwrap();
    v.last_used_ns = ktime_ns() - (timeout - 5) * 1_000_000_000;
    maps.affinity.insert(key, v, 0).unwrap();
    let p1 = port_choosing_other_than(CLIENT, pinned, 41000, &BACKENDS);
    assert_eq!(h.syn_dst(CLIENT, p1).0, pinned);
    let refreshed = maps.affinity.get(&key, 0).unwrap().last_used_ns;
    assert!(ktime_ns() - refreshed < 2_000_000_000, "timer restarted by the new connection");

    // Idle past the timeout: a fresh choice (the hash's) is made and pinned.
    let mut v = maps.affinity.get(&key, 0).unwrap();
    v.last_used_ns = ktime_ns() - (timeout + 1) * 1_000_000_000;
    maps.affinity.insert(key, v, 0).unwrap();
    let p2 = port_choosing_other_than(CLIENT, pinned, p1 + 1, &BACKENDS);
    let fresh = h.syn_dst(CLIENT, p2).0;
    assert_eq!(fresh, hash_choice(CLIENT, p2, &BACKENDS));
    assert_ne!(fresh, pinned);
    assert_eq!(dataplane_ip(maps.affinity.get(&key, 0).unwrap().backend.addr), fresh, "re-pinned");
    let p3 = port_choosing_other_than(CLIENT, fresh, p2 + 1, &BACKENDS);
    assert_eq!(h.syn_dst(CLIENT, p3).0, fresh);
}

fn dataplane_ip(addr: [u32; 4]) -> Ipv4Addr {
    Ipv4Addr::from(addr[0].to_ne_bytes())
}

#[test]
fn affinity_moves_to_a_live_backend_when_the_pinned_one_leaves() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&affinity_yaml(&BACKENDS, 60));
    let pinned = h.syn_dst(CLIENT, 40000).0;
    // A backend set change that keeps the pinned backend keeps the pin.
    let mut more: Vec<&str> = BACKENDS.to_vec();
    more.push("10.244.1.14");
    h.apply(&affinity_yaml(&more, 60));
    assert_eq!(h.syn_dst(CLIENT, 40001).0, pinned);

    let rest: Vec<&str> = more.iter().copied().filter(|b| b.parse::<Ipv4Addr>().unwrap() != pinned).collect();
    h.apply(&affinity_yaml(&rest, 60));
    let moved = h.syn_dst(CLIENT, 40002).0;
    assert_ne!(moved, pinned, "never the removed backend");
    for port in 40003..40020 {
        assert_eq!(h.syn_dst(CLIENT, port).0, moved, "re-pinned to the new choice");
    }
}

#[test]
fn switching_affinity_on_and_off_takes_effect_for_new_connections() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&lab_yaml(&BACKENDS));
    let spread: BTreeSet<_> = (40000..40030).map(|p| h.syn_dst(CLIENT, p).0).collect();
    assert!(spread.len() > 1);
    h.apply(&affinity_yaml(&BACKENDS, 60));
    let pinned: BTreeSet<_> = (41000..41030).map(|p| h.syn_dst(CLIENT, p).0).collect();
    assert_eq!(pinned.len(), 1);
    // The switch rewrote the service entry but not the table.
    assert!(h.pinned_maps().services.iter().filter_map(Result::ok).all(|(_, v)| v.generation == 0));
    assert_eq!(h.dp.retired_slots(), 0);
    h.apply(&lab_yaml(&BACKENDS));
    let spread: BTreeSet<_> = (42000..42030).map(|p| h.syn_dst(CLIENT, p).0).collect();
    assert!(spread.len() > 1);
}

#[test]
fn affinity_map_stays_bounded_under_a_flood_of_clients() {
    if !privileged() {
        return;
    }
    let sizes = MapSizes { affinity: 1024, conntrack: 4096, ..MapSizes::default() };
    let h = Harness::with_config(&affinity_yaml(&BACKENDS, 60), Config { sizes, ..Config::default() });
    for i in 0..100_000u32 {
        let client = Ipv4Addr::from(0x0a80_0000 + i); // 10.128.0.0/15
        let (verdict, _) = h.run(&frame((client, 40000), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
        assert_eq!(verdict, TC_ACT_OK, "client {client}");
    }
    let entries = h.pinned_maps().affinity.keys().count();
    assert!(entries <= 1024, "{entries} entries in a map of 1024");
    assert!(entries > 0);
    let newcomer = Ipv4Addr::new(10, 200, 0, 1);
    assert!(backend_set(&BACKENDS, 8080).contains(&h.syn_dst(newcomer, 40000)));
}

#[test]
fn a_full_services_map_is_reported_and_the_rest_keeps_working() {
    if !privileged() {
        return;
    }
    let sizes = MapSizes { services: 2, ..MapSizes::default() };
    let mut h = Harness::with_config("", Config { sizes, ..Config::default() });
    // Four frontends: web-service's two ports and empty's two.
    let report = h.dp.apply(&desired(&lab_yaml(&BACKENDS)));
    assert_eq!(report.added, 2);
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    for e in &report.errors {
        assert!(matches!(e, DataplaneError::MapFull { name: "LB_SERVICES", capacity: 2, .. }), "{e}");
        assert!(e.to_string().starts_with("map LB_SERVICES is full (2 entries)"), "{e}");
    }
    // The frontends that fit work (web-service:80 sorts first).
    assert!(backend_set(&BACKENDS, 8080).contains(&h.syn_dst(CLIENT, 40000)));
    // Nothing of the failed frontends is left behind in the other maps.
    assert_eq!(h.pinned_maps().names.keys().count(), 2);
}

/// Removed frontends' ids wait for their slots' grace before reuse, but never so that ids grow
/// past the services map's capacity: they index the per-service counters.
#[test]
fn service_ids_stay_within_the_capacity_while_removed_ones_wait() {
    if !privileged() {
        return;
    }
    let sizes = MapSizes { services: 4, ..MapSizes::default() };
    // Per-frontend counting is what this test reads; it is off by default (a flag).
    let mut h =
        Harness::with_config(&lab_yaml(&BACKENDS), Config { sizes, count_per_frontend: true, ..Config::default() });
    // Every frontend replaced by another in one apply.
    h.apply(&lab_yaml(&BACKENDS).replace("10.96.0.10", "10.96.0.30").replace("10.96.0.20", "10.96.0.40"));
    let ids: BTreeSet<u32> = h.dp.maps().services.iter().filter_map(Result::ok).map(|(_, v)| v.id).collect();
    assert_eq!(ids, (1..=4).collect());
    let vip = Ipv4Addr::new(10, 96, 0, 30);
    let (verdict, _) = h.run(&frame((CLIENT, 40000), (vip, 80), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let id = h.dp.maps().services.get(&service_key(&Frontend::cluster_ip(vip, 80, Protocol::Tcp)), 0).unwrap().id;
    let packets: u64 = h.dp.maps().service_stats.get(&id, 0).unwrap().iter().map(|s| s.packets).sum();
    assert_eq!(packets, 1, "counted in the frontend's own slot, from zero");
}

/// An external IP on another Service's ClusterIP: one map key. The ClusterIP's Service holds
/// it and the other keeps its own ClusterIP; deleting the first hands the key to the other,
/// deleting the other leaves the first alone.
#[test]
fn a_cluster_ip_keeps_its_key_from_another_services_external_ip_until_deleted() {
    if !privileged() {
        return;
    }
    let winner = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.1.11]}]\n";
    let loser = "---\napiVersion: v1\nkind: Service\nmetadata: {name: hijack}\nspec: {clusterIP: 10.96.0.60, externalIPs: [10.96.0.50], ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: hijack-1, labels: {kubernetes.io/service-name: hijack}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.1.66]}]\n";
    let state = |yaml: &str| {
        let (objects, errors) = manifests::parse(&[(PathBuf::from("test.yaml"), yaml.to_string())]);
        assert!(errors.is_empty(), "{errors:?}");
        translate(&objects.services, &objects.slices, &lb_userspace::model::NodeInfo::named("node-a")).state
    };
    let mut h = Harness::new("");
    let to_vip = |h: &Harness, vip: Ipv4Addr, port: u16| {
        let (verdict, out) = h.run(&frame((CLIENT, port), (vip, 80), L4::Tcp { flags: SYN }, &[]));
        assert_eq!(verdict, TC_ACT_OK);
        parse_checked(&out).dst.0.to_string()
    };
    let to = |h: &Harness, port: u16| to_vip(h, Ipv4Addr::new(10, 96, 0, 50), port);
    let apply = |h: &mut Harness, yaml: &str| assert!(h.dp.apply(&state(yaml)).errors.is_empty());
    apply(&mut h, &format!("{winner}---\n{loser}"));
    assert_eq!(to(&h, 40000), "10.244.1.11");
    // The loser loses the clashing frontend only, as kube-proxy would still serve its ClusterIP.
    assert_eq!(to_vip(&h, Ipv4Addr::new(10, 96, 0, 60), 40010), "10.244.1.66");
    apply(&mut h, loser);
    assert_eq!(to(&h, 40001), "10.244.1.66", "the winner deleted: the other Service takes the key");
    apply(&mut h, &format!("{loser}---\n{winner}"));
    assert_eq!(to(&h, 40002), "10.244.1.11", "the ClusterIP takes it back");
    apply(&mut h, winner);
    assert_eq!(to(&h, 40003), "10.244.1.11", "the loser deleted: the winner intact");
    let gone = frame((CLIENT, 40011), (Ipv4Addr::new(10, 96, 0, 60), 80), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run(&gone);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, gone), "the loser's ClusterIP went with it");
    assert_eq!(h.dp.programmed().0, 1);
}

// ---------- north-south: node ports, LoadBalancer IPs, policies (issue 4) ----------

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 200);
const LOCAL_POD: &str = "10.244.1.11";
const REMOTE_POD: &str = "10.244.2.21";

/// Node ports as seen by node-a: one backend on this node, one on another, one Local policy
/// Service whose only endpoint is remote, one without endpoints, and a LoadBalancer with
/// source ranges.
const EDGE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np-local}
spec: {type: NodePort, clusterIP: 10.96.1.1, ports: [{port: 8080, targetPort: 80, nodePort: 30080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-local-1, labels: {kubernetes.io/service-name: np-local}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.1.11"], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: np-remote}
spec: {type: NodePort, clusterIP: 10.96.1.2, ports: [{port: 8080, targetPort: 80, nodePort: 30081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-remote-1, labels: {kubernetes.io/service-name: np-remote}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.2.21"], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: np-policy-local}
spec: {type: NodePort, externalTrafficPolicy: Local, clusterIP: 10.96.1.3, ports: [{port: 8080, targetPort: 80, nodePort: 30082}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-policy-local-1, labels: {kubernetes.io/service-name: np-policy-local}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.2.21"], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: np-empty}
spec: {type: NodePort, clusterIP: 10.96.1.4, ports: [{port: 8080, nodePort: 30083}]}
---
apiVersion: v1
kind: Service
metadata: {name: load-bal}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.5
  loadBalancerSourceRanges: [192.168.49.96/28]
  ports: [{port: 8080, targetPort: 80, nodePort: 30088}]
status: {loadBalancer: {ingress: [{ip: 192.168.49.200}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: load-bal-1, labels: {kubernetes.io/service-name: load-bal}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: ["10.244.2.21"], nodeName: node-b}]
"#;

/// `run_tc` of a program for devices without a link-layer header: it gets `frame` from its IP
/// header on, and its output gets `frame`'s Ethernet header back.
fn run_tc_l3(prog: &aya::programs::SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let (verdict, out) = run_tc(prog, &frame[14..]);
    let mut with_eth = frame[..14].to_vec();
    with_eth.extend_from_slice(&out);
    (verdict, with_eth)
}

/// Runs a tc program once on `frame`; returns the verdict and the output frame.
fn run_tc(prog: &aya::programs::SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 1600];
    let res = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// Puts the calling thread into a private network namespace (BPF_PROG_TEST_RUN and the FIB
/// lookups it makes use the caller's namespace) and back out on drop, deleting it.
struct NetNsGuard {
    name: String,
    original: std::fs::File,
}

impl NetNsGuard {
    /// A namespace like a node's: `ext0` (192.168.49.2/24) towards the other node
    /// (192.168.49.3, which routes 10.244.2.0/24) and the outside client 192.168.49.100, both
    /// with static neighbour entries; forwarding on; the same in IPv6 (`fd00:c0a8:31::2/64`,
    /// `::3` routing `fd00:af4:2::/64`, the client `::64`).
    fn node() -> Self {
        let name = format!("lbpt{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let sh = |args: &[&str]| {
            let st = std::process::Command::new(args[0]).args(&args[1..]).status().expect("running ip");
            assert!(st.success(), "{args:?}");
        };
        let original = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        sh(&["ip", "netns", "add", &name]);
        // Made at once, so a failing step below still deletes the namespace (its drop's return
        // to `original` is a no-op until the thread has entered the new one).
        let guard = NetNsGuard { name: name.clone(), original };
        let guard_name = name.clone();
        let x = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", guard_name.as_str()];
            full.extend_from_slice(args);
            sh(&full);
        };
        x(&["ip", "link", "add", "ext0", "type", "veth", "peer", "name", "ext1"]);
        x(&["ip", "link", "set", "ext0", "address", "02:00:00:00:00:02"]);
        x(&["ip", "addr", "add", "192.168.49.2/24", "dev", "ext0"]);
        x(&["ip", "link", "set", "ext0", "up"]);
        x(&["ip", "link", "set", "ext1", "up"]);
        x(&["ip", "link", "set", "lo", "up"]);
        x(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        x(&["ip", "neigh", "add", "192.168.49.3", "lladdr", "02:00:00:00:00:03", "dev", "ext0", "nud", "permanent"]);
        x(&["ip", "neigh", "add", "192.168.49.100", "lladdr", "02:00:00:00:01:00", "dev", "ext0", "nud", "permanent"]);
        x(&["ip", "route", "add", "10.244.2.0/24", "via", "192.168.49.3"]);
        // The IPv6 twins (`lb_tests::twin6`), without duplicate address detection so that the
        // address is usable at once.
        x(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        x(&["ip", "-6", "addr", "add", "fd00:c0a8:31::2/64", "dev", "ext0", "nodad"]);
        x(&[
            "ip",
            "-6",
            "neigh",
            "add",
            "fd00:c0a8:31::3",
            "lladdr",
            "02:00:00:00:00:03",
            "dev",
            "ext0",
            "nud",
            "permanent",
        ]);
        x(&[
            "ip",
            "-6",
            "neigh",
            "add",
            "fd00:c0a8:31::64",
            "lladdr",
            "02:00:00:00:01:00",
            "dev",
            "ext0",
            "nud",
            "permanent",
        ]);
        x(&["ip", "-6", "route", "add", "fd00:af4:2::/64", "via", "fd00:c0a8:31::3"]);
        // This node's pods (the lab's 10.244.1.0/24 and fd00:af4:1::/64), behind one veth as
        // behind a pod bridge: what a hairpin flow is routed to.
        x(&["ip", "link", "add", "pod0", "type", "veth", "peer", "name", "pod1"]);
        x(&["ip", "addr", "add", "10.244.1.1/24", "dev", "pod0"]);
        x(&["ip", "-6", "addr", "add", "fd00:af4:1::1/64", "dev", "pod0", "nodad"]);
        x(&["ip", "link", "set", "pod0", "up"]);
        x(&["ip", "link", "set", "pod1", "up"]);
        let target = std::fs::File::open(format!("/run/netns/{name}")).expect("new netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread with valid namespace fds.
        assert_eq!(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        guard
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: back to the namespace we came from.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

const XDP_TX_OR_REDIRECT: [u32; 2] = [3, 4];
const REMOTE_NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const CLIENT_MAC_ON_WIRE: [u8; 6] = [2, 0, 0, 0, 1, 0];
const EXT0_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// A node's datapath, run inside a node-like namespace (the guard drops last). `ext0` is
/// listed as taking native XDP frames, as the agent lists a driver that has `ndo_xdp_xmit`.
fn edge() -> (Harness, NetNsGuard) {
    let ns = NetNsGuard::node();
    let mut h = Harness::with_config(EDGE, Config { node_ip: Some(NODE_IP), ..Config::default() });
    h.dp.set_node_addresses(&[NODE_IP, Ipv4Addr::new(10, 244, 1, 1)]).unwrap();
    h.allow_xdp_send("ext0");
    (h, ns)
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

impl Harness {
    fn allow_xdp_send(&self, iface: &str) {
        self.pinned_maps().xdp_targets.insert(ifindex(iface), 1, 0).expect("writing LB_XDP_TARGETS");
    }

    fn run_xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; 1600];
        let res = self
            .dp
            .xdp_program()
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    fn xdp_counter(&self, c: Counter) -> u64 {
        let i = lb_common::COUNTER_MAX + c as u32;
        self.dp.maps().stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

#[test]
fn xdp_node_port_to_a_local_backend_is_dnat_only() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let syn = frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30080), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_xdp(&syn);
    assert_eq!(verdict, XDP_PASS);
    let p = parse_checked(&out);
    assert_eq!(p.dst, (LOCAL_POD.parse().unwrap(), 80));
    assert_eq!(p.src, (EXTERNAL_CLIENT, 40000), "a local backend sees the client's address");
    assert_eq!(h.xdp_counter(Counter::FwdNewFlow), 1);
    assert_eq!(h.xdp_counter(Counter::FwdSnat), 0);

    // The pod's reply goes through the stack as the pod sent it (tc on its veth leaves it, so
    // the node's netfilter sees both ways of client <-> pod) and comes back from the node
    // port at the egress it leaves by: the node's address after the stack's source check.
    let (verdict, out) =
        h.reply(&frame((LOCAL_POD.parse().unwrap(), 80), (EXTERNAL_CLIENT, 40000), L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let r = parse_checked(&out);
    assert_eq!((r.src, r.dst), ((NODE_IP, 30080), (EXTERNAL_CLIENT, 40000)));
    assert_eq!(h.counter(Counter::Routed), 0);
}

#[test]
fn xdp_node_port_to_a_remote_backend_is_snated_to_the_node_and_replies_are_restored() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let syn = frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30081), L4::Tcp { flags: SYN }, b"payload");
    let (verdict, out) = h.run_xdp(&syn);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "sent straight on to the backend's node: {verdict}");
    assert_eq!(&out[..6], &REMOTE_NODE_MAC, "to the next hop's MAC");
    assert_eq!(&out[6..12], &EXT0_MAC, "from the egress interface's MAC");
    let p = parse_checked(&out);
    assert_eq!(p.dst, (REMOTE_POD.parse().unwrap(), 80));
    assert_eq!(p.src.0, NODE_IP, "SNAT to the node so the reply comes back here");
    assert!((lb_common::SNAT_PORT_MIN..=lb_common::SNAT_PORT_MAX).contains(&p.src.1), "{}", p.src.1);
    assert_eq!(&out[54..], b"payload");

    // The next packet of the flow keeps the same source port.
    let (_, out2) = h.run_xdp(&frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30081), L4::Tcp { flags: ACK }, &[]));
    assert_eq!(parse_checked(&out2).src, p.src);

    // The backend's reply arrives on the same external interface (XDP), is restored, and goes
    // straight back out to the client.
    let reply = frame(p.dst, p.src, L4::Tcp { flags: SYN_ACK }, &[]);
    let (verdict, out) = h.run_xdp(&reply);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    assert_eq!(&out[..6], &CLIENT_MAC_ON_WIRE);
    let r = parse_checked(&out);
    assert_eq!(r.src, (NODE_IP, 30081));
    assert_eq!(r.dst, (EXTERNAL_CLIENT, 40000));
    // tc does the same for replies that reach it first.
    let (verdict, out) = h.run(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).dst, (EXTERNAL_CLIENT, 40000));
    // And for replies that arrive by a tunnel (the backend's node routes the node's address
    // through one): a reply to the address flows are SNATed to is handed to tc with a header.
    let (verdict, out) = h.run_ingress_l3(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "restored and routed back to the client");
    assert_eq!(&out[..14], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00], "the header pushed");
    let r = parse_checked(&out);
    assert_eq!((r.src, r.dst), ((NODE_IP, 30081), (EXTERNAL_CLIENT, 40000)));

    // Another client gets another SNAT port.
    let (_, out) =
        h.run_xdp(&frame((Ipv4Addr::new(192, 168, 49, 101), 40000), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]));
    assert_ne!(parse_checked(&out).src.1, p.src.1);
}

/// A ClusterIP reached from beyond the cluster (a service CIDR routed or advertised to the
/// nodes): with a cluster CIDR known, a client outside it is SNATed to the node on its way to
/// a remote backend, as kube-proxy masquerades it, so the reply comes back through this node;
/// a pod keeps its address; without a cluster CIDR nobody is SNATed (the datapath cannot tell
/// a pod from an outside client).
#[test]
fn a_clusterip_reached_from_outside_the_cluster_is_snated_to_a_remote_backend() {
    if !privileged() {
        return;
    }
    let cip = (Ipv4Addr::new(10, 96, 1, 2), 8080);
    let backend = (REMOTE_POD.parse::<Ipv4Addr>().unwrap(), 80);
    let (outside, pod) = ((EXTERNAL_CLIENT, 40_100), (Ipv4Addr::new(10, 244, 1, 5), 40_101));
    let _ns = NetNsGuard::node();
    let families = lb_userspace::dataplane::ClusterCidrFamilies { ipv4: true, ipv6: false };
    let mut h = Harness::with_config(
        EDGE,
        Config { node_ip: Some(NODE_IP), cluster_cidr_families: families, ..Config::default() },
    );
    h.dp.set_local_sources(&["10.244.0.0/16".parse().unwrap()]).unwrap();
    h.allow_xdp_send("ext0");
    for (hook, run) in [("tc", Harness::run as fn(&Harness, &[u8]) -> (u32, Vec<u8>)), ("xdp", Harness::run_xdp)] {
        let client = (outside.0, outside.1 + u16::from(hook == "xdp"));
        let (verdict, out) = run(&h, &frame(client, cip, L4::Tcp { flags: SYN }, &[]));
        let p = parse_checked(&out);
        assert_eq!(p.dst, backend, "{hook}");
        assert_eq!(p.src.0, NODE_IP, "{hook}: an outside client is SNATed to the node");
        assert!((lb_common::SNAT_PORT_MIN..=lb_common::SNAT_PORT_MAX).contains(&p.src.1), "{hook}: {}", p.src.1);
        assert!(verdict == TC_ACT_REDIRECT || XDP_TX_OR_REDIRECT.contains(&verdict), "{hook}: routed: {verdict}");
        // The backend's reply, to the node, goes back to the client from the ClusterIP, routed
        // here as the flow's packets were (past the node's netfilter, which never saw the SYN).
        let (verdict, out) = run(&h, &frame(backend, p.src, L4::Tcp { flags: SYN_ACK }, &[]));
        assert!(verdict == TC_ACT_REDIRECT || XDP_TX_OR_REDIRECT.contains(&verdict), "{hook}: routed: {verdict}");
        let r = parse_checked(&out);
        assert_eq!((r.src, r.dst), (cip, client), "{hook}");
    }
    // A client the node has no route to: the reply, translated, goes to the stack (which may
    // know a way the FIB lookup does not), where a node port's reply, whose source is the
    // node's, would be dropped.
    let lost = (Ipv4Addr::new(198, 51, 100, 7), 40_103);
    let p = parse_checked(&h.run(&frame(lost, cip, L4::Tcp { flags: SYN }, &[])).1);
    assert_eq!(p.src.0, NODE_IP);
    let (verdict, out) = h.run(&frame(backend, p.src, L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_OK, "no route: to the stack");
    let r = parse_checked(&out);
    assert_eq!((r.src, r.dst), (cip, lost));
    // A pod of the cluster keeps its own address.
    let p = parse_checked(&h.run(&frame(pod, cip, L4::Tcp { flags: SYN }, &[])).1);
    assert_eq!((p.src, p.dst), (pod, backend));
    // Without a cluster CIDR, an outside client is not SNATed either.
    drop(h);
    let h = Harness::with_config(EDGE, Config { node_ip: Some(NODE_IP), ..Config::default() });
    let client = (outside.0, outside.1 + 2);
    let p = parse_checked(&h.run(&frame(client, cip, L4::Tcp { flags: SYN }, &[])).1);
    assert_eq!((p.src, p.dst), (client, backend));
}

#[test]
fn udp_node_port_through_xdp() {
    if !privileged() {
        return;
    }
    let _ns = NetNsGuard::node();
    let h = Harness::with_config(
        &EDGE.replace("ports: [{port: 8080, targetPort: 80, nodePort: 30081}]", "ports: [{port: 8080, protocol: UDP, targetPort: 80, nodePort: 30081}]")
            .replace("metadata: {name: np-remote-1, labels: {kubernetes.io/service-name: np-remote}}\naddressType: IPv4\nports: [{port: 80}]", "metadata: {name: np-remote-1, labels: {kubernetes.io/service-name: np-remote}}\naddressType: IPv4\nports: [{port: 80, protocol: UDP}]"),
        Config { node_ip: Some(NODE_IP), ..Config::default() },
    );
    let mut h = h;
    h.dp.set_node_addresses(&[NODE_IP]).unwrap();
    h.allow_xdp_send("ext0");
    let (verdict, out) =
        h.run_xdp(&frame((EXTERNAL_CLIENT, 5000), (NODE_IP, 30081), L4::Udp { zero_csum: false }, b"q"));
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    let p = parse_checked(&out);
    assert_eq!((p.proto, p.dst), (17, (REMOTE_POD.parse().unwrap(), 80)));
    assert_eq!(p.src.0, NODE_IP);
    let (_, out) = h.run_xdp(&frame((EXTERNAL_CLIENT, 5001), (NODE_IP, 30081), L4::Udp { zero_csum: true }, b"q"));
    assert_eq!(parse_checked(&out).l4_csum, 0, "zero UDP checksum stays zero at XDP too");
}

#[test]
fn node_port_only_answers_on_node_addresses() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    for dst in [Ipv4Addr::new(10, 96, 1, 1), Ipv4Addr::new(192, 168, 49, 3)] {
        let f = frame((EXTERNAL_CLIENT, 40000), (dst, 30080), L4::Tcp { flags: SYN }, &[]);
        let (verdict, out) = h.run_xdp(&f);
        assert_eq!((verdict, out), (XDP_PASS, f.clone()), "{dst}:30080 is not a node port");
    }
    // Every node address answers, the pod gateway address included (pods use it too).
    let (_, out) = h.run(&frame((CLIENT, 40000), (Ipv4Addr::new(10, 244, 1, 1), 30080), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(parse_checked(&out).dst, (LOCAL_POD.parse().unwrap(), 80));
}

/// A node address the node gives up stops answering for its node ports at once, also for a
/// packet the pre-filter lets through (its bits are hashes, which other frontends may share):
/// the per-CPU copy of the node port a new flow found last through that address
/// (`service::lookup_cached`) must not outlive the address, so the agent moves the frontends'
/// generation on when it removes one.
#[test]
fn a_node_address_given_up_stops_answering_past_a_shared_filter_bit() {
    if !privileged() {
        return;
    }
    let (mut h, _ns) = edge();
    let gateway = Ipv4Addr::new(10, 244, 1, 1);
    // A new flow through the address: this CPU keeps a copy of the node port it found.
    let syn = |port| frame((CLIENT, port), (gateway, 30080), L4::Tcp { flags: SYN }, &[]);
    let (_, out) = h.run(&syn(40000));
    assert_eq!(parse_checked(&out).dst, (LOCAL_POD.parse().unwrap(), 80));
    h.dp.set_node_addresses(&[NODE_IP]).unwrap();
    // The address's bit for the node port, set again as another frontend sharing it would.
    let bit = lb_common::filter_bit(u32::from(gateway).to_be(), 30080u16.to_be(), lb_common::PROTO_TCP);
    let word = lb_common::FILTER_FRONTENDS + (bit >> 6);
    let mut maps = h.pinned_maps();
    let bits = maps.filter.get(&word, 0).expect("reading LB_FILTER");
    maps.filter.set(word, bits | 1 << (bit & 63), 0).expect("writing LB_FILTER");
    let next = syn(40001);
    let (verdict, out) = h.run(&next);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, next), "a node port on an address the node gave up");
    // The node's other address still answers.
    let (_, out) = h.run(&frame((CLIENT, 40002), (NODE_IP, 30080), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(parse_checked(&out).dst, (LOCAL_POD.parse().unwrap(), 80));
}

#[test]
fn load_balancer_ip_admits_only_its_source_ranges() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let allowed = frame((EXTERNAL_CLIENT, 40000), (LB_IP, 8080), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_xdp(&allowed);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    assert_eq!(parse_checked(&out).dst, (REMOTE_POD.parse().unwrap(), 80));

    let outsider = Ipv4Addr::new(192, 168, 49, 150);
    let (verdict, _) = h.run_xdp(&frame((outsider, 40000), (LB_IP, 8080), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.xdp_counter(Counter::DropSourceRange), 1);
    // The same client through the node port is admitted: ranges are for LB addresses.
    let (verdict, out) = h.run_xdp(&frame((outsider, 40000), (NODE_IP, 30088), L4::Tcp { flags: SYN }, &[]));
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    assert_eq!(parse_checked(&out).dst, (REMOTE_POD.parse().unwrap(), 80));
}

#[test]
fn local_policy_without_local_endpoint_drops_and_no_endpoints_is_refused_by_tc() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let (verdict, _) = h.run_xdp(&frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30082), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.xdp_counter(Counter::DropNoLocalBackend), 1);

    // No endpoints at all: XDP leaves the packet to tc, which refuses it.
    let syn = frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30083), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_xdp(&syn);
    assert_eq!((verdict, &out), (XDP_PASS, &syn));
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &syn, 20);
}

/// kube-proxy's short-circuit: an `externalTrafficPolicy: Local` Service keeps only traffic
/// from outside on this node's endpoints; the cluster's own sources (pod CIDRs, the node) get
/// every endpoint in the cluster.
#[test]
fn a_local_policy_external_frontend_serves_the_clusters_own_sources_cluster_wide() {
    if !privileged() {
        return;
    }
    let (mut h, _ns) = edge();
    h.dp.set_local_sources(&["10.244.1.0/24".parse().unwrap()]).unwrap();
    let pod = Ipv4Addr::new(10, 244, 1, 5);
    // np-policy-local's only endpoint is on the other node.
    let (verdict, out) = h.run(&frame((pod, 40000), (NODE_IP, 30082), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_OK, "a pod of this node is the cluster's own");
    let p = parse_checked(&out);
    assert_eq!(p.dst, (REMOTE_POD.parse().unwrap(), 80));
    assert_eq!(p.src, (pod, 40000), "no SNAT for the cluster's own");
    // From outside: local endpoints only, and there are none here.
    let (verdict, _) = h.run(&frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30082), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter(Counter::DropNoLocalBackend), 1);
    // Once not the cluster's any more, the pod is outside too.
    h.dp.set_local_sources(&[]).unwrap();
    let (verdict, _) = h.run(&frame((pod, 40001), (NODE_IP, 30082), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
fn hairpin_is_snated_so_the_pod_can_reach_itself() {
    if !privileged() {
        return;
    }
    // Both ways routed by the datapath (so the node's netfilter, which would see the flow as
    // hairpin -> pod one way and frontend -> pod the other, sees neither): a node's routes.
    let _ns = NetNsGuard::node();
    let h = Harness::new(&lab_yaml(&["10.244.1.11"]));
    let me: Ipv4Addr = "10.244.1.11".parse().unwrap();
    let (verdict, out) = h.run(&frame((me, 40000), (VIP, 80), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed back to the pod");
    let p = parse_checked(&out);
    assert_eq!(p.dst, (me, 8080));
    assert_eq!(p.src, (Ipv4Addr::new(169, 254, 42, 1), 40000), "the pod must see another address than its own");
    assert_eq!(out[22], 63, "a routed packet loses a TTL");
    let (verdict, out) = h.run(&frame((me, 8080), p.src, L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the reply too");
    let r = parse_checked(&out);
    assert_eq!((r.src, r.dst), ((VIP, 80), (me, 40000)));
    assert_eq!(h.counter(Counter::Routed), 2);
}

#[test]
fn replies_of_a_live_flow_translate_after_its_backend_port_left_every_service() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&lab_yaml(&BACKENDS));
    let p = h.syn_dst(CLIENT, 40000);
    assert_eq!(p.1, 8080);
    // Every backend moves to another target port: no Service uses 8080 any more.
    h.apply(&lab_yaml(&BACKENDS).replace("port: 8080", "port: 9090"));
    let (verdict, out) = h.reply(&frame(p, (CLIENT, 40000), L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(parse_checked(&out).src, (VIP, 80), "the reply is still translated");
    // Ports no Service has ever used skip every lookup.
    let f = frame((CLIENT, 40000), (Ipv4Addr::new(10, 244, 1, 11), 7777), L4::Tcp { flags: SYN }, &[]);
    assert_eq!(h.run(&f), (TC_ACT_UNSPEC, f.clone()));
}

#[test]
fn a_new_direct_connection_reusing_a_closed_flows_tuple_is_not_translated() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let b = h.syn_dst(CLIENT, 40000);
    // The flow through the ClusterIP closes (FIN both ways).
    h.run(&frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: 0x11 }, &[]));
    h.run(&frame(b, (CLIENT, 40000), L4::Tcp { flags: 0x11 }, &[]));
    // The client now connects straight to that backend from the same port: its SYN-ACK must
    // reach the client as the backend's, not as the ClusterIP's.
    let synack = frame(b, (CLIENT, 40000), L4::Tcp { flags: SYN_ACK }, &[]);
    let (verdict, out) = h.run(&synack);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, synack));
    // Nor the rest of that connection.
    let data = frame(b, (CLIENT, 40000), L4::Tcp { flags: ACK }, b"HTTP/1.0 200 OK");
    let (verdict, out) = h.run(&data);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, data));
}

/// A frontend removed and another added in its place gets the freed service id (and slot
/// generation 0 again): the old frontend's affinity pins must not steer the new one's clients.
#[test]
fn a_reused_service_id_does_not_inherit_affinity_pins() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&affinity_yaml(&BACKENDS, 3600));
    // Pins on both of web-service's frontends, so whichever freed id the new HTTP frontend
    // gets, an old pin for it exists.
    let old = h.syn_dst(CLIENT, 40000);
    assert!(BACKENDS.contains(&old.0.to_string().as_str()));
    let (_, out) = h.run(&frame((CLIENT, 40000), (VIP, 53), L4::Udp { zero_csum: false }, b"q"));
    assert_eq!(parse_checked(&out).dst.1, 5353);
    assert_eq!(h.dp.maps().affinity.keys().count(), 2);

    let http_pin = affinity_key(&h, CLIENT);
    h.apply("");
    // A packet that read web-service's entry just before the removal writes its pin after it.
    let mut maps = h.pinned_maps();
    let pin = maps.affinity.get(&http_pin, 0).unwrap();
    maps.affinity
        .insert(http_pin, lb_common::AffinityValue { generation: 0, last_used_ns: ktime_ns(), ..pin }, 0)
        .unwrap();
    // The ids come free with the removed frontends' slots, after the grace period; their pins
    // go then, the late one too.
    h.dp.collect_retired_at(Instant::now() + SLOT_GRACE);
    assert_eq!(maps.affinity.keys().count(), 0);

    let new_backends = ["10.244.9.1", "10.244.9.2"];
    let vip2 = Ipv4Addr::new(10, 96, 0, 11);
    h.apply(
        &affinity_yaml(&new_backends, 3600)
            .replace("{name: web-service, namespace", "{name: web-two, namespace")
            .replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.11")
            .replace("kubernetes.io/service-name: web-service", "kubernetes.io/service-name: web-two"),
    );
    let reused = maps.services.get(&service_key(&Frontend::cluster_ip(vip2, 80, Protocol::Tcp)), 0).unwrap().id;
    assert_eq!(reused, http_pin.service_id, "the new frontend got the removed one's id");
    for port in 41000..41010 {
        let (verdict, out) = h.run(&frame((CLIENT, port), (vip2, 80), L4::Tcp { flags: SYN }, &[]));
        assert_eq!(verdict, TC_ACT_OK);
        let dst = parse_checked(&out).dst;
        assert!(
            new_backends.contains(&dst.0.to_string().as_str()),
            "sent to {dst:?}, a backend of the removed Service"
        );
    }
}

// ---------- fragments, ICMP errors, TTL, partial checksums ----------

const TC_ACT_SHOT: u32 = 2;

/// A 4 KB datagram, fragmented as on a 1500-byte link (1480 bytes of IP payload each).
fn big_payload() -> Vec<u8> {
    (0..4000u32).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn fragments_follow_their_first_fragment_both_ways_in_any_order_after_it() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let payload = big_payload();
    let q = frame((CLIENT, 5000), (VIP, 53), L4::Udp { zero_csum: false }, &payload);
    let frags = fragment(&q, 1480);
    assert_eq!(frags.len(), 3);
    // The first fragment first, then the others out of order.
    let mut out = Vec::new();
    for i in [0, 2, 1] {
        let (verdict, o) = h.run(&frags[i]);
        assert_eq!(verdict, TC_ACT_OK, "fragment {i}");
        out.push(o);
    }
    let whole = reassemble(&out);
    let p = parse_checked(&whole);
    assert!(backend_set(&BACKENDS, 5353).contains(&p.dst), "{:?}", p.dst);
    assert_eq!(p.src, (CLIENT, 5000));
    assert_eq!(&whole[42..], &payload[..], "payload byte for byte");
    assert_eq!(h.counter(Counter::FragTranslated), 2);

    // The backend's fragmented answer comes back from the ClusterIP (restored at egress).
    let answer = frame(p.dst, (CLIENT, 5000), L4::Udp { zero_csum: false }, &payload);
    let mut out = Vec::new();
    for (i, f) in fragment(&answer, 1480).iter().enumerate() {
        let (verdict, o) = h.reply(f);
        assert_eq!(verdict, TC_ACT_OK, "answer fragment {i}");
        out.push(o);
    }
    let r = parse_checked(&reassemble(&out));
    assert_eq!((r.src, r.dst), ((VIP, 53), (CLIENT, 5000)));
    assert_eq!(h.counter(Counter::FragTranslated), 4);

    // A later fragment whose first fragment never came (another id) is dropped and counted.
    let mut orphan =
        fragment(&frame((CLIENT, 5001), (VIP, 53), L4::Udp { zero_csum: false }, &payload), 1480)[1].clone();
    orphan[18..20].copy_from_slice(&0x4321u16.to_be_bytes());
    orphan[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&orphan[14..34]));
    orphan[24..26].copy_from_slice(&c.to_be_bytes());
    let (verdict, _) = h.run(&orphan);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter(Counter::DropFragNoFirst), 1);

    // Fragments of traffic no Service concerns pass untouched.
    let other = frame((CLIENT, 5000), (Ipv4Addr::new(10, 244, 7, 7), 9999), L4::Udp { zero_csum: false }, &payload);
    for f in fragment(&other, 1480) {
        let (verdict, o) = h.run(&f);
        assert_eq!((verdict, &o), (TC_ACT_UNSPEC, &f));
    }
}

/// The SYN as the datapath sends it on (its flow is tracked already).
fn sent_again(h: &Harness, syn: &[u8]) -> Vec<u8> {
    h.run(syn).1
}

/// The first 28 (UDP) or 40 (TCP) bytes of a frame's IP packet: what an ICMP error quotes.
fn quote_of(f: &[u8], l4: usize) -> Vec<u8> {
    f[14..34 + l4].to_vec()
}

#[test]
fn icmp_errors_about_a_translated_flow_are_translated_with_it() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let syn = frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: SYN }, b"data");
    let (_, sent) = h.run(&syn);
    let backend = parse_checked(&sent).dst;

    // "Fragmentation needed" from a router between us and the backend, quoting the packet as
    // it left us (client -> backend), whole TCP header included. To the client's own address,
    // it goes through the stack as the flow's replies do (netfilter finds it RELATED to the
    // flow it saw) and is translated at egress.
    let router = Ipv4Addr::new(10, 244, 9, 1);
    let err = icmp_error(router, CLIENT, 3, 4, [0, 0, 0x05, 0x78], &quote_of(&sent, 20));
    let (verdict, out) = h.reply(&err);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, quote) = parse_icmp_checked(&out);
    assert_eq!((src, dst), (router, CLIENT), "a router keeps its own address");
    assert_eq!(quote, quote_of(&syn, 20), "the quote is the client's own packet again, checksums included");
    assert_eq!(&out[38..42], &[0, 0, 0x05, 0x78], "the next-hop MTU is kept");
    assert_eq!(h.counter(Counter::IcmpTranslated), 1);

    // "Port unreachable" from a UDP backend itself: it must come from the ClusterIP.
    let q = frame((CLIENT, 5000), (VIP, 53), L4::Udp { zero_csum: false }, b"query");
    let (_, sent) = h.run(&q);
    let backend_udp = parse_checked(&sent).dst;
    let err = icmp_error(backend_udp.0, CLIENT, 3, 3, [0; 4], &quote_of(&sent, 8));
    let (verdict, out) = h.reply(&err);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, quote) = parse_icmp_checked(&out);
    assert_eq!((src, dst), (VIP, CLIENT));
    assert_eq!(quote, quote_of(&q, 8));

    // The other way: the client's side reports a problem with a translated reply (VIP ->
    // client); the backend must see its own packet quoted, and get the error. Translated at
    // ingress: it is addressed to the frontend, which the stack cannot take to the backend.
    let reply = frame(backend, (CLIENT, 40000), L4::Tcp { flags: SYN_ACK }, &[]);
    let (_, replied) = h.reply(&reply);
    let err = icmp_error(CLIENT, VIP, 3, 4, [0, 0, 0x05, 0x00], &quote_of(&replied, 20));
    let (verdict, out) = h.run(&err);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, quote) = parse_icmp_checked(&out);
    assert_eq!((src, dst), (CLIENT, backend.0));
    assert_eq!(quote, quote_of(&reply, 20));

    // Errors that cannot be matched pass untouched: a quote cut inside the ports, an ICMP echo.
    let cut = icmp_error(router, CLIENT, 3, 4, [0; 4], &quote_of(&sent_again(&h, &syn), 20)[..22]);
    let echo = icmp_error(router, CLIENT, 8, 0, [0; 4], &quote_of(&h.run(&syn).1, 20));
    for (what, f) in [("cut quote", cut), ("echo request", echo)] {
        let (verdict, out) = h.run(&f);
        assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &f), "{what}");
    }

    // An error quoting nothing we track passes untouched.
    let stray = frame((CLIENT, 40001), (Ipv4Addr::new(10, 244, 7, 7), 80), L4::Tcp { flags: SYN }, &[]);
    let err = icmp_error(router, CLIENT, 3, 4, [0; 4], &quote_of(&stray, 8));
    let (verdict, out) = h.run(&err);
    assert_eq!((verdict, out), (TC_ACT_UNSPEC, err));
    assert_eq!(h.counter(Counter::IcmpTranslated), 3);
}

/// An ICMP error this node itself sends about a packet it was forwarding after our
/// translation ("fragmentation needed" from `ip_forward` towards a pod behind a smaller MTU)
/// leaves through tc egress, which puts the quote back into the client's view (also when it
/// leaves by a tunnel device, `lb_tc_egress_l3`); an error that tc ingress translated already
/// (its quote in the client's view) leaves untouched.
#[test]
fn icmp_errors_the_node_sends_about_a_translated_flow_are_translated_at_egress() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    let node = Ipv4Addr::new(10, 244, 1, 1);
    let egress: [(&str, RunOn); 2] = [("Ethernet", Harness::run_egress), ("tunnel", Harness::run_egress_l3)];
    for (i, (device, run)) in egress.into_iter().enumerate() {
        let syn = frame((CLIENT, 40000 + i as u16), (VIP, 80), L4::Tcp { flags: SYN }, b"data");
        let (_, sent) = h.run(&syn);
        let err = icmp_error(node, CLIENT, 3, 4, [0, 0, 0x05, 0x78], &quote_of(&sent, 20));
        let (verdict, out) = run(&h, &err);
        assert_eq!(verdict, TC_ACT_OK, "{device}");
        let (src, dst, quote) = parse_icmp_checked(&out);
        assert_eq!((src, dst), (node, CLIENT), "the node keeps its own address ({device})");
        assert_eq!(quote, quote_of(&syn, 20), "the quote is the client's own packet again, checksums included");
        assert_eq!(&out[38..42], &[0, 0, 0x05, 0x78], "the next-hop MTU is kept ({device})");
        assert_eq!(h.counter(Counter::IcmpTranslated), i as u64 + 1, "{device}");
    }
    let syn = frame((CLIENT, 40000), (VIP, 80), L4::Tcp { flags: SYN }, b"data");
    // Translated already (the quote is what the client sent): nothing to match, untouched.
    let translated = icmp_error(node, CLIENT, 3, 4, [0, 0, 0x05, 0x78], &quote_of(&syn, 20));
    let (verdict, out) = h.run_egress(&translated);
    assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &translated));
    assert_eq!(h.counter(Counter::IcmpTranslated), 2);
}

#[test]
fn icmp_error_from_a_remote_backend_of_a_snated_node_port_is_routed_back_to_the_client() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let syn = frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
    let (_, sent) = h.run_xdp(&syn);
    let p = parse_checked(&sent);
    // The backend (or its node) answers the SNATed packet with an error.
    let err = icmp_error(p.dst.0, NODE_IP, 3, 4, [0, 0, 0x05, 0x78], &quote_of(&sent, 20));
    let (verdict, out) = h.run_xdp(&err);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
    assert_eq!(&out[..6], &CLIENT_MAC_ON_WIRE);
    let (src, dst, quote) = parse_icmp_checked(&out);
    assert_eq!((src, dst), (NODE_IP, EXTERNAL_CLIENT));
    assert_eq!(out[22], 63, "TTL decremented: the datapath forwarded it");
    // The quote shows the client's packet: its addresses and ports (its TTL is the one the
    // forwarded packet had).
    assert_eq!(&quote[12..20], &syn[26..34]);
    assert_eq!(&quote[20..24], &syn[34..38]);
    let mut expect = quote_of(&syn, 20);
    expect[8] = quote[8];
    expect[10..12].copy_from_slice(&quote[10..12]);
    assert_eq!(quote, expect, "ports and TCP checksum are the client's again");
    // tc does the same.
    let (verdict, out) = h.run(&err);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_icmp_checked(&out).1, EXTERNAL_CLIENT);
}

/// `icmp_error`, with `n` words of IP options in its own header.
fn icmp_error_with_options(n: usize, src: Ipv4Addr, dst: Ipv4Addr, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    with_ip_options(&icmp_error(src, dst, 3, 4, rest, quote), n)
}

#[test]
fn icmp_errors_with_ip_options_in_either_header_are_translated_at_both_hooks() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    // Options in the client's packets, so in the quote too.
    for (outer_words, quoted_words) in [(0, 2), (3, 0), (10, 10)] {
        let sport = 41000 + outer_words as u16;
        let syn = with_ip_options(
            &frame((EXTERNAL_CLIENT, sport), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]),
            quoted_words,
        );
        let (_, sent) = h.run_xdp(&syn);
        let ihl = 20 + 4 * quoted_words;
        let p = parse_checked(&sent);
        let quote = &sent[14..14 + ihl + 20];
        let err = icmp_error_with_options(outer_words, p.dst.0, NODE_IP, [0, 0, 0x05, 0x78], quote);
        let expect_quote = |got: &[u8]| {
            // The client's packet again: addresses, options, ports, TCP checksum; its TTL and
            // header checksum are those of the forwarded packet.
            let mut expect = syn[14..14 + ihl + 20].to_vec();
            expect[8] = got[8];
            expect[10..12].copy_from_slice(&got[10..12]);
            assert_eq!(got, &expect[..], "{outer_words}/{quoted_words} option words");
        };
        let (verdict, out) = h.run_xdp(&err);
        assert!(XDP_TX_OR_REDIRECT.contains(&verdict), "{verdict}");
        let (src, dst, got) = parse_icmp_checked(&out);
        assert_eq!((src, dst), (NODE_IP, EXTERNAL_CLIENT));
        expect_quote(&got);
        assert_eq!(&out[14 + 20..14 + 20 + 4 * outer_words], &err[34..34 + 4 * outer_words], "outer options kept");
        let (verdict, out) = h.run(&err);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let (src, dst, got) = parse_icmp_checked(&out);
        assert_eq!((src, dst), (NODE_IP, EXTERNAL_CLIENT));
        expect_quote(&got);
    }
    assert_eq!(h.counter(Counter::IcmpTranslated), 3);
}

#[test]
fn packets_the_datapath_forwards_itself_lose_a_ttl_and_expire_at_one() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let syn = frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
    let (verdict, out) = h.run_xdp(&syn);
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict));
    parse_checked(&out);
    assert_eq!(out[22], 63);
    // tc routes the backend's reply itself too.
    let p = parse_checked(&out);
    let (verdict, out) = h.run(&frame(p.dst, p.src, L4::Tcp { flags: SYN_ACK }, &[]));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    parse_checked(&out);
    assert_eq!(out[22], 63);
    // TTL 1: a router would not forward it.
    let mut last = frame((EXTERNAL_CLIENT, 40001), (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
    last[22] = 1;
    last[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&last[14..34]));
    last[24..26].copy_from_slice(&c.to_be_bytes());
    let (verdict, _) = h.run_xdp(&last);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.xdp_counter(Counter::DropTtlExpired), 1);
    // A translated packet the stack forwards keeps its TTL: the stack decrements it.
    let (_, out) = h.run_xdp(&frame((EXTERNAL_CLIENT, 40002), (NODE_IP, 30080), L4::Tcp { flags: SYN }, &[]));
    assert_eq!(out[22], 64);
}

/// Sets or clears DF in a frame's IPv4 header, its checksum to match.
fn with_df(mut f: Vec<u8>, df: bool) -> Vec<u8> {
    if df {
        f[20] |= 0x40;
    } else {
        f[20] &= !0x40;
    }
    f[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// A packet the datapath routes itself that is too big for the way out gets what
/// `ip_forward` would send: ICMP "fragmentation needed" with the egress MTU, quoting the
/// packet as the client sent it (so its path MTU discovery finds the flow), where it used to
/// be dropped without a word. Without DF (a router would fragment it) it is dropped; XDP
/// leaves it to tc.
#[test]
fn a_routed_packet_too_big_for_the_way_out_gets_fragmentation_needed() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    let client = (EXTERNAL_CLIENT, 40000);
    let syn = frame(client, (NODE_IP, 30081), L4::Tcp { flags: SYN }, &[]);
    let (verdict, _) = h.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "the flow routed to the remote backend");
    // This thread is in the node's namespace: the command runs there too.
    let st = std::process::Command::new("ip").args(["link", "set", "ext0", "mtu", "1400"]).status().unwrap();
    assert!(st.success());
    let big = with_df(frame(client, (NODE_IP, 30081), L4::Tcp { flags: ACK }, &[0x5a; 1460]), true);
    assert_eq!(big.len(), 14 + 1500);
    let (verdict, out) = h.run(&big);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the arrival interface");
    assert_eq!(h.counter(Counter::TooBig), 1);
    assert_eq!(&out[0..6], &big[6..12], "back to the client's MAC");
    let ip = &out[14..34];
    assert_eq!(fold(sum16(ip)), 0, "IPv4 checksum");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!((&ip[12..16], &ip[16..20]), (&NODE_IP.octets()[..], &EXTERNAL_CLIENT.octets()[..]));
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "destination unreachable / fragmentation needed");
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400, "the next hop's MTU");
    assert_eq!(fold(sum16(icmp)), 0, "ICMP checksum");
    assert_eq!(&icmp[8..], &big[14..14 + 40], "quotes the packet as the client sent it");
    // A packet that fits still goes to the backend.
    let (verdict, out) = h.run(&with_df(frame(client, (NODE_IP, 30081), L4::Tcp { flags: ACK }, &[0x5a; 1360]), true));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).dst, (REMOTE_POD.parse().unwrap(), 80));
    // Without DF: dropped, as before (a router would fragment it; the datapath cannot).
    let no_route = h.counter(Counter::DropNoRoute);
    let (verdict, _) = h.run(&with_df(big.clone(), false));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(h.counter(Counter::DropNoRoute), no_route + 1);
    // XDP leaves it to tc (as it did before tc answered such packets).
    let (verdict, out) = h.run_xdp(&big);
    assert_eq!((verdict, out.as_slice()), (XDP_PASS, big.as_slice()));
}

#[test]
fn a_checksum_partial_packet_at_xdp_is_left_to_tc() {
    if !privileged() {
        return;
    }
    let (h, _ns) = edge();
    // As a local sender's skb holds it: the TCP checksum field has the folded pseudo-header
    // sum (not complemented), the device or the veth peer finishes it.
    let mut f = frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30081), L4::Tcp { flags: SYN }, b"data");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&EXTERNAL_CLIENT.octets());
    pseudo.extend_from_slice(&NODE_IP.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 24]);
    let partial = !fold(sum16(&pseudo));
    f[50..52].copy_from_slice(&partial.to_be_bytes());
    let before = h.xdp_counter(Counter::DeferredToTc);
    let (verdict, out) = h.run_xdp(&f);
    assert_eq!((verdict, &out), (XDP_PASS, &f), "untouched, for tc");
    assert_eq!(h.xdp_counter(Counter::DeferredToTc), before + 1);
    // A complete checksum is translated at XDP as before.
    let (verdict, _) = h.run_xdp(&frame((EXTERNAL_CLIENT, 40000), (NODE_IP, 30081), L4::Tcp { flags: SYN }, b"data"));
    assert!(XDP_TX_OR_REDIRECT.contains(&verdict));
}

/// At tc, a field holding the pseudo-header sum may be a CHECKSUM_PARTIAL packet's, so the
/// port change goes to the helper, which reads `ip_summed` (the address change always does).
/// BPF_PROG_TEST_RUN's skb is CHECKSUM_NONE: the field must then get every change, addresses
/// and port, as RFC 1624 computes it. Also with the port unchanged (a Service whose port is its
/// targetPort), where no port call is made.
#[test]
fn a_field_holding_the_pseudo_header_sum_gets_every_change_at_tc() {
    if !privileged() {
        return;
    }
    for same_port in [false, true] {
        let mut yaml = lab_yaml(&BACKENDS);
        if same_port {
            yaml = yaml
                .replace("port: 80, targetPort: web", "port: 8080, targetPort: web")
                .replace("port: 53, targetPort: 5353", "port: 5353, targetPort: 5353");
        }
        let h = Harness::new(&yaml);
        let cases = [
            (L4::Tcp { flags: SYN }, if same_port { 8080 } else { 80 }, 8080, 50),
            (L4::Udp { zero_csum: false }, if same_port { 5353 } else { 53 }, 5353, 40),
        ];
        for (l4, port, target, off) in cases {
            let mut f = frame((CLIENT, 40000), (VIP, port), l4, b"data");
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&CLIENT.octets());
            pseudo.extend_from_slice(&VIP.octets());
            pseudo.extend_from_slice(&[0, f[23]]);
            pseudo.extend_from_slice(&((f.len() - 34) as u16).to_be_bytes());
            let field = !fold(sum16(&pseudo));
            f[off..off + 2].copy_from_slice(&field.to_be_bytes());
            let (verdict, out) = h.run(&f);
            assert_eq!(verdict, TC_ACT_OK, "same port {same_port}, proto {}", f[23]);
            // Read by offset: the L4 checksum is not valid, before or after, for the parser.
            let dst = (Ipv4Addr::new(out[30], out[31], out[32], out[33]), u16::from_be_bytes([out[36], out[37]]));
            assert!(backend_set(&BACKENDS, target).contains(&dst), "DNAT to a backend, got {dst:?}");
            assert_eq!(fold(sum16(&out[14..34])), 0, "IP header checksum");
            let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]) as u32;
            let mut sum = !field as u32;
            for i in [30, 32, 36] {
                sum += (!word(&f, i) & 0xffff) + word(&out, i);
            }
            let (want, got) = (fold(sum), word(&out, off) as u16);
            // 0 and 0xffff are one value in ones' complement.
            assert!(
                want == got || want | got == 0xffff && want & got == 0,
                "same port {same_port}, proto {}: field {got:#06x}, RFC 1624 gives {want:#06x}",
                f[23]
            );
            for (i, (a, b)) in f.iter().zip(&out).enumerate() {
                let rewritten = matches!(i, 24..=25 | 30..=33 | 36..=37) || (off..off + 2).contains(&i);
                assert!(rewritten || a == b, "byte {i} changed");
            }
        }
    }
}

/// A Service whose port is its targetPort: the port adds nothing to the checksums (tc makes
/// no helper call for it), the addresses still do, both ways, TCP and UDP.
#[test]
fn service_port_equal_to_its_target_port_keeps_valid_checksums() {
    if !privileged() {
        return;
    }
    let yaml = lab_yaml(&BACKENDS)
        .replace("port: 80, targetPort: web", "port: 8080, targetPort: web")
        .replace("port: 53, targetPort: 5353", "port: 5353, targetPort: 5353");
    let h = Harness::new(&yaml);
    for (l4, port) in [(L4::Tcp { flags: SYN }, 8080), (L4::Udp { zero_csum: false }, 5353)] {
        let (verdict, out) = h.run(&frame((CLIENT, 40000), (VIP, port), l4, b"query"));
        assert_eq!(verdict, TC_ACT_OK);
        let p = parse_checked(&out);
        assert!(backend_set(&BACKENDS, port).contains(&p.dst), "{:?}", p.dst);
        let back = if port == 8080 { L4::Tcp { flags: SYN_ACK } } else { L4::Udp { zero_csum: false } };
        let (verdict, out) = h.reply(&frame(p.dst, (CLIENT, 40000), back, b"answer"));
        assert_eq!(verdict, TC_ACT_OK);
        let r = parse_checked(&out);
        assert_eq!((r.src, r.dst), ((VIP, port), (CLIENT, 40000)));
    }
}

/// tc adds the port part of an IPv4 UDP checksum by hand, then the address part through the
/// helper, told that a zero field means "no checksum" (BPF_F_MARK_MANGLED_0). A datagram whose
/// field comes to zero after the port part must still get its address part: its checksum is
/// chosen here (two payload bytes) so that it does, for the lab's 53 -> 5353.
#[test]
fn a_udp_checksum_that_comes_to_zero_between_the_parts_still_gets_the_addresses() {
    if !privileged() {
        return;
    }
    let h = Harness::new(&lab_yaml(&BACKENDS));
    // The field F whose update for the port change alone, !(!F + 5353 - 53), is zero:
    // F = 5353 - 53 (ones' complement). The source stays, so nothing else goes into it.
    let sum = |s: u32| !fold(s);
    let target = sum((!53u16) as u32 + 5353);
    let build = |w: u16| {
        let mut payload = w.to_be_bytes().to_vec();
        payload.extend_from_slice(b"query");
        frame((CLIENT, 40000), (VIP, 53), L4::Udp { zero_csum: false }, &payload)
    };
    let f0 = u16::from_be_bytes([build(0)[40], build(0)[41]]);
    let q = build(sum((!target) as u32 + f0 as u32));
    assert_eq!(u16::from_be_bytes([q[40], q[41]]), target, "the datagram's checksum, as chosen");
    let (verdict, out) = h.run(&q);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse_checked(&out);
    assert_eq!(p.src, (CLIENT, 40000), "a DNAT only");
    assert!(backend_set(&BACKENDS, 5353).contains(&p.dst), "{:?}", p.dst);
    assert_ne!(p.l4_csum, 0, "a checksum, not \"none\"");
}

/// The slot generation is a u16: 65,536 backend changes bring it back to a value an old pin
/// may hold, and a pin whose generation equals the service's is trusted without a membership
/// check. The wrap drops the frontend's pins, so a backend that left is never chosen.
#[test]
fn a_wrapped_slot_generation_does_not_revive_a_stale_affinity_pin() {
    if !privileged() {
        return;
    }
    let mut h = Harness::new(&affinity_yaml(&BACKENDS, 3600));
    let pinned = h.syn_dst(CLIENT, 40000).0;
    let pin_key = affinity_key(&h, CLIENT);
    let mut maps = h.pinned_maps();
    assert_eq!(maps.affinity.get(&pin_key, 0).unwrap().generation, 0);

    // 65,535 changes later (written into the maps, then adopted by a new agent): the pinned
    // backend has left, the generation is 65535, and the client has not connected since.
    let v = maps.services.get(&http_key(), 0).unwrap();
    let rest: Vec<&str> = BACKENDS.iter().copied().filter(|b| b.parse::<Ipv4Addr>().unwrap() != pinned).collect();
    // The table now names only the others (their ids are in LB_BACKENDS already).
    let ids: Vec<u32> = rest
        .iter()
        .map(|b| {
            let want = backend_value(&Endpoint { ip: b.parse().unwrap(), port: 8080, local: false });
            (0..16).find(|&id| maps.backends.get(&id, 0).is_ok_and(|x| x == want)).expect("an id")
        })
        .collect();
    // Two slots to an element, low half first.
    let slots: Vec<u32> = (0..v.table_size).map(|i| ids[i as usize % ids.len()]).collect();
    for (i, slot) in (v.table_off..v.table_off + v.table_size).enumerate() {
        let pair = maps.maglev.get(&(slot / 2), 0).unwrap();
        let half = (slot % 2) * 32;
        let pair = (pair & !(0xffff_ffffu64 << half)) | ((slots[i] as u64) << half);
        maps.maglev.set(slot / 2, pair, 0).unwrap();
    }
    maps.services
        .insert(http_key(), lb_common::ServiceValue { generation: u16::MAX, backend_count: rest.len() as u16, ..v }, 0)
        .unwrap();
    h.dp = Dataplane::load(&h.pin_dir, &Config::default()).expect("adopting");
    assert_eq!(maps.affinity.get(&pin_key, 0).unwrap().generation, 0, "the old pin is still there");

    // One more change: the generation wraps to 0, the old pin's.
    let mut next = rest.clone();
    next.push("10.244.1.14");
    h.apply(&affinity_yaml(&next, 3600));
    assert_eq!(maps.services.get(&http_key(), 0).unwrap().generation, 0);
    let chosen = h.syn_dst(CLIENT, 40001).0;
    assert_ne!(chosen, pinned, "the backend that left must not be chosen");
    assert!(next.contains(&chosen.to_string().as_str()));
    for port in 40002..40010 {
        assert_eq!(h.syn_dst(CLIENT, port).0, chosen, "re-pinned to the new choice");
    }

    // A pin a packet in flight wrote under generation 65535 after the flip goes with that
    // generation's table; pins of the new generation stay.
    let other = lb_common::AffinityKey { client: [u32::from_ne_bytes([10, 244, 3, 3]), 0, 0, 0], ..pin_key };
    let late = lb_common::AffinityValue { generation: u16::MAX, ..maps.affinity.get(&pin_key, 0).unwrap() };
    maps.affinity.insert(other, late, 0).unwrap();
    h.dp.collect_retired_at(Instant::now() + SLOT_GRACE);
    assert!(maps.affinity.get(&other, 0).is_err(), "the late pin of the wrapped generation is dropped");
    assert_eq!(maps.affinity.get(&pin_key, 0).unwrap().generation, 0);
}

/// The tail-called stages of both hooks load: IPv4's new-flow stages and the IPv6 programs
/// (which the IPv4 ones tail-call for IPv6 frames).
#[test]
fn tail_called_stages_pass_the_verifier() {
    if !privileged() {
        return;
    }
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-packet-test-v6-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let _guard =
        Harness { dp: Dataplane::load(&pin_dir, &Config::default()).expect("loading"), pin_dir: pin_dir.clone() };
    // Each stage on its own first, so that a refusal names its program and the verifier's
    // last words.
    let (cookie, node_ip) = (1u64, u32::from_ne_bytes([192, 168, 49, 2]));
    // A node address of each family, as the agent sets them: with zeros the verifier prunes
    // the SNAT paths as dead code.
    let o = "fd00:c0a8:31::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let node_ip6: [u32; 4] =
        std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]));
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pin_dir)
        .override_global("NETNS_COOKIE", &cookie, true)
        .override_global("NODE_IP", &node_ip, true)
        .override_global("NODE_IP6", &node_ip6, true)
        .load(lb_userspace::EBPF_OBJECT)
        .expect("object");
    let mut refused = Vec::new();
    for name in [
        lb_common::PROG_TC_NEW4,
        lb_common::PROG_XDP_NEW4,
        lb_common::PROG_TC_INGRESS6,
        lb_common::PROG_TC_EGRESS6,
        lb_common::PROG_TC_NEW6,
        lb_common::PROG_TC_ICMP6,
        lb_common::PROG_TC_FWD6,
        lb_common::PROG_TC_REPLY6,
        lb_common::PROG_TC_EGRESS6_L3,
        lb_common::PROG_TC_ICMP6_L3,
        lb_common::PROG_XDP6,
        lb_common::PROG_XDP_NEW6,
        lb_common::PROG_XDP_ICMP6,
        lb_common::PROG_XDP_FWD6,
        lb_common::PROG_XDP_REPLY6,
    ] {
        let loaded = match ebpf.program_mut(name).expect(name) {
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::Xdp(p) => p.load(),
            _ => panic!("{name}: neither tc nor XDP"),
        };
        match loaded {
            Ok(()) => {}
            Err(aya::programs::ProgramError::LoadError { verifier_log, .. }) => {
                let log = verifier_log.to_string();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                refused.push(format!("{name}: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")));
            }
            // Any other failure to load (a missing map, BTF) fails the test too.
            Err(e) => refused.push(format!("{name}: {e}")),
        }
    }
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    drop(ebpf);
    let dp = Dataplane::load(&pin_dir, &Config { ipv6: true, ..Config::default() });
    assert!(dp.is_ok(), "{:?}", dp.err());
}
