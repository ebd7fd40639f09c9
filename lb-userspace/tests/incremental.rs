//! The agent's sync path on real maps: the Translator's change set applied with
//! `apply_changes` leaves the pinned maps exactly as a full `apply` of the same desired state
//! leaves a second datapath, change after change; and the eTP Local short-circuit companions
//! are written under their own key. Needs root (BPF); under CI=true a privileged test never
//! skips.
use std::{collections::BTreeMap, path::PathBuf};

use lb_userspace::{
    dataplane::{decode_name, endpoint_of, frontend_of, Config, Dataplane, Maps, SCOPE_FROM_CLUSTER},
    manifests,
    model::{Frontend, NodeInfo, Translator},
};

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "these tests need root and CI=true forbids skipping");
    eprintln!("skipping: these tests need root");
    false
}

/// A datapath under its own pin directory, removed on drop (also when a test fails).
struct Loaded {
    dp: Dataplane,
    pin: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

fn load(tag: &str) -> Loaded {
    let pin = PathBuf::from(format!("/sys/fs/bpf/lb-incremental-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    let dp = Dataplane::load(&pin, &Config::default()).expect("loading the datapath");
    Loaded { dp, pin }
}

/// What the maps serve, read back: frontend -> (service name, the backends its Maglev table
/// names, sorted, flags). Which slot names which backend follows each map's own history of
/// changes (`maglev::update`), so only the set is compared.
fn served(maps: &Maps) -> BTreeMap<Frontend, (String, Vec<String>, u32)> {
    let names: BTreeMap<u32, String> =
        maps.names.iter().filter_map(Result::ok).map(|(id, n)| (id, decode_name(&n))).collect();
    let mut out = BTreeMap::new();
    for (k, v) in maps.services.iter().filter_map(Result::ok) {
        let f = frontend_of(&k, v.flags).expect("a known frontend");
        let backends: std::collections::BTreeSet<String> = (v.table_off..v.table_off + v.table_size)
            .map(|slot| {
                maps.maglev_slot(slot)
                    .and_then(|id| maps.backends.get(&id, 0))
                    .map(|b| endpoint_of(&b).to_string())
                    .unwrap_or_else(|_| "<missing>".into())
            })
            .collect();
        let backends: Vec<String> = backends.into_iter().collect();
        out.insert(f, (names.get(&v.id).cloned().unwrap_or_default(), backends, v.flags));
    }
    out
}

fn objects(yaml: &str) -> manifests::Objects {
    let (o, errors) = manifests::parse(&[(PathBuf::from("t.yaml"), yaml.to_string())]);
    assert!(errors.is_empty(), "{errors:?}");
    o
}

/// A NodePort Service; its node ports follow the last octet of its ClusterIP, so Services
/// sharing a ClusterIP also share node ports.
fn service(name: &str, ip: &str, extra: &str) -> String {
    let last: u16 = ip.rsplit('.').next().and_then(|o| o.parse().ok()).unwrap_or(0);
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n{extra}  ports: [{{name: a, port: 80, nodePort: {}}}, {{name: u, port: 53, protocol: UDP, nodePort: {}}}]\n  type: NodePort\n", 30000 + last, 30100 + last)
}

fn slice(name: &str, eps: &[(&str, &str)]) -> String {
    let eps: String = eps.iter().map(|(ip, node)| format!("- {{addresses: [{ip}], nodeName: {node}}}\n")).collect();
    format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: a, port: 8080}}, {{name: u, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}")
}

/// What makes `dns` dual-stack (IPv4 primary), and its IPv6 slice.
const DNS6: &str =
    "  clusterIPs: [10.96.1.2, 'fd00:96::2']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n";
const DNS6_SLICE: &str = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-6, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv6\nports: [{name: a, port: 8080}, {name: u, port: 5353, protocol: UDP}]\nendpoints:\n- {addresses: ['fd00:244:2::3'], nodeName: node-b}\n";

#[test]
fn incremental_apply_leaves_the_maps_a_full_apply_leaves() {
    if !privileged() {
        return;
    }
    let mut inc = load("inc");
    let mut full = load("full");
    let mut t = Translator::new(NodeInfo::named("node-a"));
    // Each step: the whole object set after it (what a full apply sees), and the changes.
    let steps: Vec<String> = vec![
        service("web", "10.96.1.1", "") + &slice("web", &[("10.244.1.1", "node-a"), ("10.244.2.1", "node-b")]),
        service("web", "10.96.1.1", "  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.1]\n")
            + &slice("web", &[("10.244.1.1", "node-a"), ("10.244.2.1", "node-b")])
            + &service("dns", "10.96.1.2", "")
            + &slice("dns", &[("10.244.2.2", "node-b")]),
        // A conflict: `clash` asks for web's ClusterIP and loses; then web goes and clash wins.
        service("web", "10.96.1.1", "  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.1]\n")
            + &slice("web", &[("10.244.1.1", "node-a")])
            + &service("dns", "10.96.1.2", "")
            + &slice("dns", &[("10.244.2.2", "node-b"), ("10.244.2.3", "node-b")])
            + &service("zclash", "10.96.1.1", ""),
        service("dns", "10.96.1.2", "")
            + &slice("dns", &[("10.244.2.3", "node-b")])
            + &service("zclash", "10.96.1.1", ""),
        // Dual stack: `dns` gains an IPv6 ClusterIP, node ports on IPv6 and an IPv6 slice.
        service("dns", "10.96.1.2", DNS6) + &slice("dns", &[("10.244.2.3", "node-b")]) + DNS6_SLICE,
    ];
    for (i, yaml) in steps.iter().enumerate() {
        let o = objects(yaml);
        t.relist_services(o.services.iter());
        t.relist_slices(o.slices.iter());
        let changes = t.sync();
        let report = inc.dp.apply_changes(t.state(), &changes.frontends);
        assert!(report.errors.is_empty(), "step {i}: {:?}", report.errors);
        let report = full.dp.apply(t.state());
        assert!(report.errors.is_empty(), "step {i}: {:?}", report.errors);
        let (a, b) = (served(inc.dp.maps()), served(full.dp.maps()));
        assert_eq!(a, b, "step {i}: incremental and full maps differ");
        assert_eq!(a.len(), t.state().services.len(), "step {i}");
        // The pre-filter bitmaps too: the same frontend and backend bits.
        let words = |m: &Maps| -> Vec<u64> { m.filter.iter().filter_map(Result::ok).collect() };
        assert!(words(inc.dp.maps()) == words(full.dp.maps()), "step {i}: pre-filter bitmaps differ");
    }
    // Step 2 wrote the eTP Local companions under their own key: the node port and the external
    // IP each have one with every endpoint of the cluster.
    let o = objects(&steps[1]);
    t.relist_services(o.services.iter());
    t.relist_slices(o.slices.iter());
    let changes = t.sync();
    inc.dp.apply_changes(t.state(), &changes.frontends);
    let maps = inc.dp.maps();
    let companions: Vec<_> =
        maps.services.iter().filter_map(Result::ok).filter(|(k, _)| k.scope & SCOPE_FROM_CLUSTER != 0).collect();
    assert_eq!(
        companions.len(),
        4,
        "node ports and the external IP, TCP and UDP: {:#?}",
        t.state().services.keys().collect::<Vec<_>>()
    );
    let served = served(maps);
    for (f, (_, backends, _)) in &served {
        if f.is_from_cluster() && f.protocol == lb_userspace::model::Protocol::Tcp {
            assert_eq!(backends, &vec!["10.244.1.1:8080".to_string(), "10.244.2.1:8080".to_string()], "{f}");
        }
    }
}

/// An address as the datapath reads it from the packet: word `i` is bytes `4i..4i+4` in
/// memory order (network order inside the word). IPv4 uses word 0, the others zero.
/// Waits until the stale-UDP sweeper has removed entries since its counter read `before`.
fn wait_swept(removed: &std::sync::atomic::AtomicU64, before: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while removed.load(std::sync::atomic::Ordering::Relaxed) == before {
        assert!(std::time::Instant::now() < deadline, "the sweep never ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn words(ip: std::net::IpAddr) -> [u32; 4] {
    let o: Vec<u8> = match ip {
        std::net::IpAddr::V4(a) => a.octets().iter().copied().chain([0; 12]).collect(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// The datapath's view of a dual-stack Service: every IPv6 key and value written with the
/// IPv6 family tag and the packet's word order (ClusterIP, node port, backends, memberships,
/// source ranges), node addresses and the cluster's own sources of both families; and the
/// agent's side of IPv6 flows: a UDP flow in `LB_CT6` to a backend that leaves is swept, an
/// idle assured one collected, as their IPv4 twins are.
#[test]
fn ipv6_frontends_backends_and_flows_are_encoded_for_the_datapath() {
    use lb_common::{
        CtKey6, CtValue6, CT_DIR_FORWARD, CT_FLAG_ASSURED, CT_UDP, FAMILY_IPV4, FAMILY_IPV6, SCOPE_EXACT,
        SCOPE_NODEPORT,
    };
    use lb_userspace::{dataplane::conntrack, model::Cidr};
    use std::net::IpAddr;
    if !privileged() {
        return;
    }
    let mut l = load("v6");
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let yaml = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb6}\nspec:\n  type: LoadBalancer\n  clusterIPs: ['fd00:96::10', 10.96.1.10]\n  ipFamilies: [IPv6, IPv4]\n  loadBalancerSourceRanges: ['2001:db8:1::/48', 198.51.100.0/24]\n  ports: [{name: u, port: 53, protocol: UDP, nodePort: 30053}]\nstatus: {loadBalancer: {ingress: [{ip: '2001:db8::53'}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lb6-1, labels: {kubernetes.io/service-name: lb6}}\naddressType: IPv6\nports: [{name: u, port: 5353, protocol: UDP}]\nendpoints:\n- {addresses: ['fd00:244:1::5'], nodeName: node-a}\n- {addresses: ['fd00:244:2::5'], nodeName: node-b}\n";
    let mut t = Translator::new(NodeInfo::named("node-a"));
    let o = objects(yaml);
    t.relist_services(o.services.iter());
    t.relist_slices(o.slices.iter());
    t.sync();
    let report = l.dp.apply(t.state());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let maps = Maps::open_pinned(&l.pin).expect("pinned maps");
    let services: Vec<_> = maps.services.iter().filter_map(Result::ok).collect();
    let find = |scope: u8, family: u8, addr: IpAddr, port: u16| {
        services
            .iter()
            .find(|(k, _)| k.scope == scope && k.family == family && k.addr == words(addr) && k.port == port.to_be())
            .copied()
    };
    // The IPv6 ClusterIP and LoadBalancer IP: exact keys, family 6, the packet's words.
    let (k, cip) = find(SCOPE_EXACT, FAMILY_IPV6, ip("fd00:96::10"), 53).expect("the IPv6 ClusterIP's key");
    assert_eq!(k.proto, 17);
    let (_, lbip) = find(SCOPE_EXACT, FAMILY_IPV6, ip("2001:db8::53"), 53).expect("the IPv6 ingress IP's key");
    assert!(lbip.flags & lb_common::SVC_FLAG_SOURCE_RANGES != 0);
    // The IPv4 ClusterIP is still family 4, its address in word 0.
    find(SCOPE_EXACT, FAMILY_IPV4, ip("10.96.1.10"), 53).expect("the IPv4 ClusterIP's key");
    // The IPv6 node port: address zero, family 6, a key of its own beside the IPv4 one.
    find(SCOPE_NODEPORT, FAMILY_IPV6, ip("::"), 30053).expect("the IPv6 node port's key");
    find(SCOPE_NODEPORT, FAMILY_IPV4, ip("0.0.0.0"), 30053).expect("the IPv4 node port's key");
    // Backends: family 6 and the packet's words; memberships too.
    let table: Vec<_> = (cip.table_off..cip.table_off + cip.table_size)
        .map(|s| maps.backends.get(&maps.maglev_slot(s).unwrap(), 0).unwrap())
        .collect();
    let b = table.iter().find(|b| b.addr == words(ip("fd00:244:1::5"))).expect("a backend in the table");
    assert_eq!((b.family, b.port, b.flags), (FAMILY_IPV6, 5353u16.to_be(), lb_common::BACKEND_FLAG_LOCAL));
    let members: Vec<_> = maps.members.keys().filter_map(Result::ok).filter(|m| m.service_id == cip.id).collect();
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m.family == FAMILY_IPV6), "{members:?}");
    // Source ranges: the LoadBalancer IP's own family's prefix only, keyed by its service id.
    let ranges: Vec<_> = maps.source_ranges.keys().filter_map(Result::ok).map(|k| (k.prefix_len(), k.data())).collect();
    let mine: Vec<_> = ranges.iter().filter(|(_, d)| u32::from_be(d.service_id_be) == lbip.id).collect();
    assert_eq!(mine.len(), 1, "{ranges:?}");
    assert_eq!((mine[0].0, mine[0].1.addr), (32 + 48, words(ip("2001:db8:1::"))));

    // Node addresses and the cluster's own sources of both families.
    l.dp.set_node_addresses(&[ip("192.168.49.2"), ip("fd00:49::2")]).unwrap();
    let addrs: Vec<_> = maps.node_addrs.keys().filter_map(Result::ok).collect();
    assert!(addrs.iter().any(|k| k.family == FAMILY_IPV6 && k.addr == words(ip("fd00:49::2"))), "{addrs:?}");
    assert!(addrs.iter().any(|k| k.family == FAMILY_IPV4 && k.addr == words(ip("192.168.49.2"))), "{addrs:?}");
    let cidrs: Vec<Cidr> = ["10.244.0.0/16", "fd00:244::/56"].iter().map(|c| c.parse().unwrap()).collect();
    l.dp.set_local_sources(&cidrs).unwrap();
    let sources: Vec<_> =
        maps.local_sources.keys().filter_map(Result::ok).map(|k| (k.prefix_len(), k.data())).collect();
    assert!(
        sources.iter().any(|(len, d)| *len == 32 + 56
            && u32::from_be(d.family_be) == FAMILY_IPV6 as u32
            && d.addr == words(ip("fd00:244::"))),
        "{sources:?}"
    );
    assert!(sources.iter().any(|(_, d)| u32::from_be(d.family_be) == FAMILY_IPV4 as u32), "{sources:?}");

    // An IPv6 UDP flow to the backend about to leave, as the datapath would have written it;
    // and an idle assured flow for the collector.
    let mut ct = conntrack::CtTables::open_pinned(&l.pin).expect("conntrack tables");
    let (clock, timeouts) = l.dp.ct_clock();
    let now = clock.jiffies().unwrap();
    let flow = |sport: u16, backend: &str| {
        let k = CtKey6 {
            src: words(ip("fd00:244:3::9")),
            dst: words(ip("fd00:96::10")),
            sport: sport.to_be(),
            dport: 53u16.to_be(),
            proto: 17,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let v = CtValue6 {
            nat_addr: words(ip(backend)),
            nat_port: 5353u16.to_be(),
            service_id: cip.id,
            state: CT_UDP,
            created: now,
            last_seen: now,
            ..Default::default()
        };
        (k, v)
    };
    for (k, v) in [flow(40000, "fd00:244:2::5"), flow(40001, "fd00:244:1::5")] {
        let (pk, pv) = lb_common::ct_peer(&k, &v);
        ct.v6.new.insert(k, v, 0).unwrap();
        ct.v6.new.insert(pk, pv, 0).unwrap();
    }
    let (k, mut v) = flow(40002, "fd00:244:1::5");
    v.flags |= CT_FLAG_ASSURED;
    let idle = now.wrapping_sub(timeouts[CT_UDP as usize] + 100);
    (v.created, v.last_seen) = (idle, idle);
    let (pk, pv) = lb_common::ct_peer(&k, &v);
    ct.v6.assured.insert(k, v, 0).unwrap();
    ct.v6.assured.insert(pk, pv, 0).unwrap();
    // The idle assured flow goes, both entries (the agent's collector thread may get there
    // first: either way the IPv6 table was collected); the new-flow table is not touched.
    conntrack::collect(&mut ct.v6, now, &timeouts, |_, _| ());
    assert_eq!(ct.v6.assured.keys().count(), 0);
    assert_eq!(conntrack::entries(&ct.v6.assured, &ct.v6.new).len(), 4);
    // fd00:244:2::5 leaves: its UDP flow goes (both entries), the other stays.
    let yaml2 = yaml.replace("- {addresses: ['fd00:244:2::5'], nodeName: node-b}\n", "");
    let o = objects(&yaml2);
    t.relist_slices(o.slices.iter());
    let changes = t.sync();
    let removed = l.dp.stale_udp_counter();
    let report = l.dp.apply_changes(t.state(), &changes.frontends);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    wait_swept(&removed, 0);
    let left = conntrack::entries(&ct.v6.assured, &ct.v6.new);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|(k, _, _)| k.sport == 40001u16.to_be() || k.dport == 40001u16.to_be()), "{left:?}");
}

/// kube-proxy's UDP conntrack cleanup (`CleanStaleEntries`): a flow goes when its backend
/// stops serving the Service port, not when it merely stops being picked. Here a backend
/// that starts terminating but still serves keeps its flow; one that leaves loses its flow;
/// one that stops serving loses it too; and while the port has no serving endpoint at all
/// nothing goes, but a flow to an endpoint that served before goes once others serve.
#[test]
fn a_udp_flow_goes_when_its_backend_stops_serving_not_when_it_stops_being_picked() {
    use lb_common::{CtKey4, CtValue4, CT_DIR_FORWARD, CT_UDP};
    use lb_userspace::dataplane::conntrack;
    if !privileged() {
        return;
    }
    let mut l = load("serving");
    let svc = service("dns", "10.96.3.10", "");
    let eps = |conds: &[(&str, &str)]| {
        let eps: String = conds
            .iter()
            .map(|(ip, c)| format!("- {{addresses: [{ip}], nodeName: node-b, conditions: {{{c}}}}}\n"))
            .collect();
        format!("{svc}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{name: a, port: 8080}}, {{name: u, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}")
    };
    let ready = "ready: true";
    let (terminating, gone) =
        ("ready: false, serving: true, terminating: true", "ready: false, serving: false, terminating: true");
    let mut t = Translator::new(NodeInfo::named("node-a"));
    let o = objects(&eps(&[("10.244.1.5", ready), ("10.244.2.5", ready), ("10.244.3.5", ready)]));
    t.relist_services(o.services.iter());
    t.relist_slices(o.slices.iter());
    t.sync();
    let report = l.dp.apply(t.state());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let cip =
        Frontend::cluster_ip("10.96.3.10".parse::<std::net::IpAddr>().unwrap(), 53, lb_userspace::model::Protocol::Udp);
    let maps = Maps::open_pinned(&l.pin).expect("pinned maps");
    let id =
        maps.services.iter().filter_map(Result::ok).find(|(k, v)| frontend_of(k, v.flags) == Some(cip)).unwrap().1.id;
    // A UDP flow to each backend, both entries, as the datapath writes them.
    let mut ct = conntrack::CtTables::open_pinned(&l.pin).expect("conntrack tables");
    let (clock, _) = l.dp.ct_clock();
    let now = clock.jiffies().unwrap();
    let be = |s: &str| u32::from_ne_bytes(s.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let flows: Vec<CtKey4> = ["10.244.1.5", "10.244.2.5", "10.244.3.5"]
        .iter()
        .zip(40_000u16..)
        .map(|(backend, sport)| {
            let k = CtKey4 {
                src: be("10.244.9.9"),
                dst: be("10.96.3.10"),
                sport: sport.to_be(),
                dport: 53u16.to_be(),
                proto: 17,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let v = CtValue4 {
                nat_addr: be(backend),
                nat_port: 5353u16.to_be(),
                service_id: id,
                state: CT_UDP,
                created: now,
                last_seen: now,
                ..Default::default()
            };
            let (pk, pv) = lb_common::ct_peer(&k, &v);
            ct.v4.new.insert(k, v, 0).unwrap();
            ct.v4.new.insert(pk, pv, 0).unwrap();
            k
        })
        .collect();
    let tracked =
        |ct: &conntrack::CtTables| -> Vec<bool> { flows.iter().map(|k| ct.v4.new.get(k, 0).is_ok()).collect() };
    let removed = l.dp.stale_udp_counter();
    // Each step's sweep, if any, is waited for through the counter of swept entries.
    let step = |l: &mut Loaded, t: &mut Translator, yaml: String, sweeps: bool| {
        let o = objects(&yaml);
        t.relist_slices(o.slices.iter());
        let changes = t.sync();
        let before = removed.load(std::sync::atomic::Ordering::Relaxed);
        let report = l.dp.apply_changes(t.state(), &changes.frontends);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        if sweeps {
            wait_swept(&removed, before);
        }
        report
    };
    // 10.244.2.5 terminates but serves: no longer picked, its flow stays.
    step(&mut l, &mut t, eps(&[("10.244.1.5", ready), ("10.244.2.5", terminating), ("10.244.3.5", ready)]), false);
    // 10.244.1.5 leaves: its flow goes (a sweep of 10.244.2.5 asked for before would have
    // run first).
    step(&mut l, &mut t, eps(&[("10.244.2.5", terminating), ("10.244.3.5", ready)]), true);
    assert_eq!(tracked(&ct), [false, true, true], "after 10.244.1.5 left");
    // 10.244.2.5 stops serving: its flow goes.
    let report = step(&mut l, &mut t, eps(&[("10.244.2.5", gone), ("10.244.3.5", ready)]), true);
    // Only the serving set changed, which the maps do not hold: no service entry rewritten.
    assert_eq!((report.updated, report.added), (0, 0), "{report:?}");
    assert!(report.unchanged > 0, "{report:?}");
    assert_eq!(tracked(&ct), [false, false, true], "after 10.244.2.5 stopped serving");
    // No serving endpoint left: nothing goes. Then another serves: 10.244.3.5's flow goes.
    step(&mut l, &mut t, eps(&[("10.244.3.5", gone)]), false);
    step(&mut l, &mut t, eps(&[("10.244.4.5", ready)]), true);
    assert_eq!(tracked(&ct), [false, false, false], "after another endpoint came");
}
