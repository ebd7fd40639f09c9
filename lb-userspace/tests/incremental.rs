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
