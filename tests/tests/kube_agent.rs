//! The agent as a Kubernetes client: `lb run --kubeconfig` against the test API server (an
//! in-process HTTP server speaking the list/watch protocol; see `lb_tests::apiserver`), with
//! real traffic between network namespaces and the pinned maps checked through `lb list`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_tests::{
    apiserver::{Kind, TestApiServer},
    eventually, http_get, http_status, lab_manifests, privileged, tcp_connect, udp_request, udp_socket, EchoConn, Lab,
    Node, Pod,
};
use serde_json::json;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 104, 123, 59);
const API: &str = "127.0.0.1:6443";
const EXTRA_PORTS: [(&str, u16, &str, u16); 2] = [("echo", 9000, "TCP", 9000), ("dns", 53, "UDP", 5353)];

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

/// One node, four web pods (HTTP 80, echo 9000, UDP 5353) of which the first three are in
/// the Service's EndpointSlice, a client pod, the test API server in the node's namespace
/// (where the agent reaches it on loopback), and the agent watching it.
struct Cluster {
    // Dropped first: the server, then the lab (agent, namespaces, pins).
    api: TestApiServer,
    lab: Lab,
    node: Node,
    web: Vec<Pod>,
    client: Pod,
    ifaces: Vec<String>,
}

impl Cluster {
    fn new() -> Result<Self> {
        Self::with_server(|ns, dir| TestApiServer::start(ns, API.parse()?, dir))
    }

    fn with_server(server: impl FnOnce(&str, &std::path::Path) -> Result<TestApiServer>) -> Result<Self> {
        let mut lab = Lab::new()?;
        let node = lab.add_node("node1", 1)?;
        let mut web = Vec::new();
        for i in 0..4u8 {
            let pod = lab.add_pod(&node, &format!("web-{i}"), 11 + i)?;
            lab.serve(&pod, &[80], &[9000], &[5353])?;
            web.push(pod);
        }
        let client = lab.add_pod(&node, "busybox", 100)?;
        let mut ifaces: Vec<String> = web.iter().chain([&client]).map(|p| p.host_if.clone()).collect();
        ifaces.push("cbr0".into());
        let api = server(&node.ns, &lab.dir)?;
        let c = Cluster { api, lab, node, web, client, ifaces };
        c.set_endpoints(&[0, 1, 2])?;
        Ok(c)
    }

    /// Writes the lab's Service and an EndpointSlice listing the web pods `idx`.
    fn set_endpoints(&self, idx: &[usize]) -> Result<()> {
        let pods: Vec<(&Pod, bool)> = idx.iter().map(|&i| (&self.web[i], true)).collect();
        self.api.apply_yaml(&lab_manifests(CLUSTER_IP, &pods, &EXTRA_PORTS))
    }

    /// Starts the agent as a client finds its API server: here through `KUBECONFIG`.
    fn start_agent(&mut self) -> Result<()> {
        let kc = self.api.kubeconfig().to_str().expect("utf-8 path").to_string();
        self.lab.agent_env = vec![("KUBECONFIG".into(), kc)];
        self.lab.spawn_agent(&self.node, &[], &[])?;
        self.wait_agent()
    }

    /// Waits until the node's agent is ready with the lab Service's three frontends.
    fn wait_agent(&mut self) -> Result<()> {
        let ifaces: Vec<&str> = self.ifaces.iter().map(String::as_str).collect();
        self.lab.wait_agent(&self.node, &ifaces, 3)
    }

    fn backends(&self) -> String {
        self.lab.list(&self.node, "backends").unwrap_or_default()
    }

    fn has_backend(&self, pod: usize, port: u16) -> bool {
        self.backends().contains(&format!("{}:{port}", self.web[pod].ip))
    }

    fn metrics(&self) -> Result<String> {
        http_get(&self.node.ns, "127.0.0.1:10249".parse()?, "/metrics")
    }
}

/// A client pod sending HTTP requests through the ClusterIP back to back, counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<BTreeMap<String, usize>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Load {
    fn start(ns: &str) -> Self {
        let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, o, f, n, ns) = (stop.clone(), ok.clone(), failures.clone(), seen.clone(), ns.to_string());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match http_get(&ns, vip(80), "/") {
                    Ok(pod) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        *n.lock().unwrap().entry(pod).or_insert(0) += 1;
                    }
                    Err(e) => f.lock().unwrap().push(format!("{e:#}")),
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, ok, failures, seen, thread: Some(thread) }
    }

    /// Stops the client; returns (successful requests, failures, answers per pod).
    fn finish(mut self) -> (usize, Vec<String>, BTreeMap<String, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let failures = self.failures.lock().unwrap().clone();
        let seen = self.seen.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, seen)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The value of the first sample line starting with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn agent_follows_creates_updates_and_deletes_from_the_api_server() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("Kubernetes API client configured"), "{log}");

    // The seed lab's ClusterIP spreads over the three pods of the slice.
    let mut seen = BTreeMap::new();
    for _ in 0..45 {
        *seen.entry(http_get(&c.client.ns, vip(80), "/")?).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), vec!["web-0", "web-1", "web-2"], "{seen:?}");

    // Create: a second Service whose named targetPort resolves through its slice's port name.
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo-two", "namespace": "default"},
        "spec": {"clusterIP": "10.96.50.50", "ports": [{"name": "echo", "port": 7000, "targetPort": "echo-port"}]}
    }))?;
    c.api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "echo-two-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo-two"}},
        "addressType": "IPv4",
        "ports": [{"name": "echo", "port": 9000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [c.web[3].ip.to_string()], "conditions": {"ready": true}, "nodeName": "node1"}]
    }))?;
    let echo2: SocketAddr = "10.96.50.50:7000".parse()?;
    assert!(
        eventually(Duration::from_secs(10), || EchoConn::open(&c.client.ns, echo2)
            .and_then(|mut e| e.pod())
            .is_ok_and(|p| p == "web-3")),
        "new Service not served; log:\n{}",
        c.lab.agent_log(&c.node)
    );
    // A Service owned by another proxy is never programmed.
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "not-ours", "namespace": "default", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
        "spec": {"clusterIP": "10.96.60.60", "ports": [{"port": 80}]}
    }))?;

    // Update: web-2 leaves the slice.
    c.set_endpoints(&[0, 1])?;
    assert!(eventually(Duration::from_secs(10), || !c.has_backend(2, 80)), "{}", c.backends());
    for _ in 0..20 {
        let pod = http_get(&c.client.ns, vip(80), "/")?;
        assert!(pod == "web-0" || pod == "web-1", "{pod}");
    }
    assert!(!c.lab.list(&c.node, "services")?.contains("10.96.60.60"));

    // History compacted while the agent cannot watch (the server is briefly down, so it cannot
    // have seen any later version): its resume gets 410 Gone, it lists again, and sees a change
    // made meanwhile.
    let lists = |c: &Cluster| {
        c.api.requests().iter().filter(|r| r.contains("/endpointslices?") && !r.contains("watch=")).count()
    };
    let lists_before = lists(&c);
    c.api.stop();
    c.api.compact();
    c.set_endpoints(&[0, 1, 2])?;
    c.api.resume()?;
    assert!(eventually(Duration::from_secs(15), || c.has_backend(2, 80)), "{}", c.backends());
    let lists_after = lists(&c);
    assert!(lists_after > lists_before, "no relist after 410: {:?}", c.api.requests());

    // Delete: the Service goes, and its address is no longer translated.
    c.api.delete(Kind::Service, "default", "echo-two")?;
    assert!(
        eventually(Duration::from_secs(10), || !c
            .lab
            .list(&c.node, "services")
            .unwrap_or_default()
            .contains("10.96.50.50")),
        "{}",
        c.lab.list(&c.node, "services")?
    );
    assert!(tcp_connect(&c.client.ns, echo2, Duration::from_millis(500))?.is_err());
    Ok(())
}

#[test]
fn restart_under_load_loses_no_request() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    let mut long_lived = EchoConn::open(&c.client.ns, vip(9000))?;
    let long_pod = long_lived.pod()?;
    let load = Load::start(&c.client.ns);
    thread::sleep(Duration::from_secs(1));

    // First kill, with a Service change (web-3 joins) made while no agent runs.
    c.lab.kill_agent(&c.node);
    c.set_endpoints(&[0, 1, 2, 3])?;
    thread::sleep(Duration::from_secs(1));
    assert!(!c.has_backend(3, 80), "nobody should have programmed web-3 yet");
    c.start_agent()?;
    assert!(eventually(Duration::from_secs(10), || c.has_backend(3, 80)), "{}", c.backends());
    thread::sleep(Duration::from_secs(1));

    // Second kill; the restarted agent finds the API server slow to list EndpointSlices. It
    // must keep the pinned state (not program Services without endpoints) until the list.
    c.lab.kill_agent(&c.node);
    c.api.hold_lists(Kind::EndpointSlice);
    c.lab.spawn_agent_kube(&c.node, c.api.kubeconfig(), &[])?;
    thread::sleep(Duration::from_secs(3));
    // On a loaded machine the agent may still be starting: its health server answers first.
    let healthz: std::net::SocketAddr = "127.0.0.1:10256".parse()?;
    assert!(
        eventually(Duration::from_secs(10), || http_status(&c.node.ns, healthz, "/livez").is_ok()),
        "the restarted agent's health server never answered"
    );
    let log = c.lab.agent_log(&c.node);
    assert!(!log.contains("desired state applied"), "applied before the first full list:\n{log}");
    assert!(c.has_backend(3, 80) && c.has_backend(0, 80), "pinned state flushed: {}", c.backends());
    // Not healthy until the first full state is programmed, while the old state serves; alive.
    let (code, healthz) = http_status(&c.node.ns, "127.0.0.1:10256".parse()?, "/healthz")?;
    assert!(code == 503 && healthz.contains("\"synced\":false"), "{code} {healthz}");
    assert_eq!(http_status(&c.node.ns, "127.0.0.1:10256".parse()?, "/livez")?.0, 200);
    c.api.release_lists();
    c.wait_agent()?;
    thread::sleep(Duration::from_secs(1));

    let (ok, failures, seen) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), ok + failures.len());
    assert!(ok > 100, "only {ok} requests");
    assert!(seen.contains_key("web-3"), "the change made while down was not applied: {seen:?}");
    assert_eq!(long_lived.pod()?, long_pod, "the long-lived connection moved or broke");
    Ok(())
}

#[test]
fn udp_client_follows_a_replaced_backend_at_once() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    // One socket, so one source port throughout: the same 5-tuple before and after.
    let sock = udp_socket(&c.client.ns, vip(53))?;
    let first = udp_request(&sock, "who")?;
    let first = first.split(' ').next().unwrap_or_default().to_string();
    let gone: usize = first.trim_start_matches("web-").parse()?;
    for _ in 0..5 {
        assert!(udp_request(&sock, "who")?.starts_with(&first), "flow not sticky before the change");
    }
    // A TCP connection to the same pod, which keeps running after it leaves the Service.
    let mut tcp = None;
    for _ in 0..40 {
        let mut e = EchoConn::open(&c.client.ns, vip(9000))?;
        if e.pod()? == first {
            tcp = Some(e);
            break;
        }
    }
    let mut tcp = tcp.expect("some echo connection lands on the same pod");

    // The pod is replaced by web-3 (a rollout): it leaves the slice but keeps running.
    let mut keep: Vec<usize> = (0..3).filter(|&i| i != gone).collect();
    keep.push(3);
    let changed = Instant::now();
    c.set_endpoints(&keep)?;
    let mut answers = Vec::new();
    let mut moved = None;
    while changed.elapsed() < Duration::from_secs(10) {
        if let Ok(a) = udp_request(&sock, "who") {
            let pod = a.split(' ').next().unwrap_or_default().to_string();
            if pod != first && moved.is_none() {
                moved = Some(changed.elapsed());
            }
            answers.push(pod);
        }
        if moved.is_some() && answers.len() > 10 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let moved = moved.unwrap_or_else(|| panic!("still answered by {first} after 10 s: {answers:?}"));
    // Once the agent has applied the change, the removed pod never answers again.
    assert!(!c.has_backend(gone, 5353));
    for _ in 0..20 {
        let pod = udp_request(&sock, "who")?;
        assert!(!pod.starts_with(&first), "answered by the removed backend: {pod}");
    }
    eprintln!("moved after {moved:?}");
    // TCP to the departed but running pod is left alone.
    assert_eq!(tcp.pod()?, first);
    let m = c.metrics()?;
    assert!(sample(&m, "lb_stale_udp_flows_removed_total") >= 1.0, "{m}");
    Ok(())
}

#[test]
fn api_server_outage_keeps_traffic_and_catches_up() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    let load = Load::start(&c.client.ns);
    thread::sleep(Duration::from_millis(500));
    c.api.stop();
    let down = Instant::now();
    thread::sleep(Duration::from_secs(2));
    // A change while the API server is unreachable from the agent.
    c.set_endpoints(&[0, 1])?;
    thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    assert!(c.has_backend(2, 80), "state flushed or changed during the outage: {}", c.backends());
    c.api.resume()?;
    let back = Instant::now();
    assert!(
        eventually(Duration::from_secs(20), || !c.has_backend(2, 80)),
        "change made during the outage never arrived; log:\n{}",
        c.lab.agent_log(&c.node)
    );
    eprintln!("caught up {:?} after the API server returned", back.elapsed());
    thread::sleep(Duration::from_millis(500));
    let (ok, failures, _) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), ok + failures.len());
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("watch failed") && log.contains("watch re-established"), "{log}");
    Ok(())
}

#[test]
fn metrics_and_healthz_follow_the_traffic() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    // A Service without endpoints, to be refused.
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "empty", "namespace": "default"},
        "spec": {"clusterIP": "10.96.70.70", "ports": [{"port": 80}]}
    }))?;
    let kc = c.api.kubeconfig().to_str().expect("utf-8 path").to_string();
    c.lab.agent_env = vec![("KUBECONFIG".into(), kc)];
    c.lab.spawn_agent(&c.node, &[], &["--metrics-per-frontend"])?;
    c.wait_agent()?;
    let (code, healthz) = http_status(&c.node.ns, "127.0.0.1:10256".parse()?, "/healthz")?;
    assert!(code == 200 && healthz.contains("\"synced\":true") && healthz.contains("\"attached\":true"), "{healthz}");
    assert_eq!(http_status(&c.node.ns, "127.0.0.1:10256".parse()?, "/livez")?.0, 200);

    let http = "lb_service_packets_total{service=\"default/web-service:http\",frontend=\"10.104.123.59:80/TCP\",family=\"IPv4\"}";
    let bytes = "lb_service_bytes_total{service=\"default/web-service:http\",frontend=\"10.104.123.59:80/TCP\",family=\"IPv4\"}";
    let new_flows = "lb_packets_total{hook=\"tc\",verdict=\"fwd_new_flow\"}";
    let before = c.metrics()?;
    for _ in 0..20 {
        http_get(&c.client.ns, vip(80), "/")?;
    }
    match tcp_connect(&c.client.ns, "10.96.70.70:80".parse()?, Duration::from_secs(2))? {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!("a Service without endpoints should refuse: {other:?}"),
    }
    let after = c.metrics()?;
    let delta = |k: &str| sample(&after, k) - sample(&before, k);
    // Each request is at least SYN, ACK, the request and FIN from the client.
    assert!(delta(http) >= 80.0, "packets {} -> {}:\n{after}", sample(&before, http), sample(&after, http));
    assert!(delta(bytes) >= delta(http) * 40.0, "bytes: {after}");
    assert_eq!(delta(new_flows), 20.0, "{after}");
    assert_eq!(delta("lb_no_endpoint_rejects_total"), 1.0, "{after}");
    assert!(sample(&after, "lb_conntrack_entries") >= 2.0, "{after}");
    assert_eq!(sample(&after, "lb_conntrack_capacity"), lb_common::CONNTRACK_MAX_ENTRIES as f64, "{after}");
    assert_eq!(sample(&after, "lb_programmed_frontends"), 4.0, "{after}");
    assert_eq!(sample(&after, "lb_programmed_endpoints"), 9.0, "{after}");
    assert!(sample(&after, "lb_sync_total") >= 1.0 && sample(&after, "lb_last_sync_timestamp_seconds") > 1.7e9);
    assert!(sample(&after, "lb_sync_duration_seconds_count") >= 1.0, "{after}");
    assert!(sample(&after, "lb_watch_relists_total") >= 3.0, "{after}");
    // kube-proxy's own series.
    assert!(sample(&after, "kubeproxy_sync_proxy_rules_service_changes_total") >= 2.0, "{after}");
    assert!(sample(&after, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1.7e9, "{after}");
    assert_eq!(sample(&after, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"), 0.0, "{after}");
    assert!(sample(&after, "process_resident_memory_bytes") > 0.0, "{after}");
    Ok(())
}

#[test]
fn map_layout_changes_rebuild_service_maps_and_migrate_flow_maps() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    let mut long_lived = EchoConn::open(&c.client.ns, vip(9000))?;
    let pod = long_lived.pod()?;
    let ifaces: Vec<&str> = c.ifaces.iter().map(String::as_str).collect();
    let kc = c.api.kubeconfig().to_owned();

    // Another services map size (as after an upgrade that changed a derived map): rebuilt and
    // refilled, and the established connection, tracked in the kept conntrack map, lives on.
    c.lab.kill_agent(&c.node);
    c.lab.start_agent_kube(&c.node, &ifaces, 3, &kc, &["--map-services", "4096"])?;
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("rebuilding a pinned map of another shape") && log.contains("LB_SERVICES"), "{log}");
    assert_eq!(long_lived.pod()?, pod);
    http_get(&c.client.ns, vip(80), "/")?;

    // Another conntrack size (a user raising --map-conntrack): the flow map is migrated with
    // its entries. The long-lived connection's entry keeps its creation time, so it was carried
    // over, not re-created by a later packet.
    thread::sleep(Duration::from_secs(2));
    c.lab.kill_agent(&c.node);
    c.lab.start_agent_kube(&c.node, &ifaces, 3, &kc, &["--map-services", "4096", "--map-conntrack", "8192"])?;
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("flow map moved to its new capacity") && log.contains("LB_CT4"), "{log}");
    assert_eq!(long_lived.pod()?, pod);
    let ct = c.lab.list(&c.node, "conntrack")?;
    let flow = ct
        .lines()
        .find(|l| l.starts_with("forward") && l.contains(":9000 "))
        .unwrap_or_else(|| panic!("long-lived flow missing:\n{ct}"));
    let age: u64 = flow.split_whitespace().nth(6).unwrap_or("0").parse()?;
    assert!(age >= 2, "entry re-created, not migrated: {flow}");
    let m = c.metrics()?;
    assert_eq!(sample(&m, "lb_conntrack_capacity"), 8192.0, "{m}");
    http_get(&c.client.ns, vip(80), "/")?;
    Ok(())
}

/// The lab's web-service slice with zone hints: `(web pod index, zone)`; `None` leaves an
/// endpoint without hints.
fn hinted_slice(c: &Cluster, eps: &[(usize, Option<&str>)]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = eps
        .iter()
        .map(|(i, zone)| {
            let mut e =
                json!({"addresses": [c.web[*i].ip.to_string()], "conditions": {"ready": true}, "nodeName": "node1"});
            if let Some(z) = zone {
                e["hints"] = json!({"forZones": [{"name": z}]});
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-service-lab", "namespace": "default", "labels": {"kubernetes.io/service-name": "web-service"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "echo", "port": 9000, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    })
}

#[test]
fn zone_hints_follow_the_nodes_zone_label() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))?;
    c.api.apply(hinted_slice(&c, &[(0, Some("zone-a")), (1, Some("zone-b")), (2, Some("zone-b"))]))?;
    c.start_agent()?;
    let answers = |c: &Cluster| -> Result<std::collections::BTreeSet<String>> {
        (0..15).map(|_| http_get(&c.client.ns, vip(80), "/")).collect()
    };
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>();
    // PreferClose: every endpoint has hints, one is for this node's zone.
    assert!(c.has_backend(0, 80) && !c.has_backend(1, 80) && !c.has_backend(2, 80), "{}", c.backends());
    assert_eq!(answers(&c)?, set(&["web-0"]));

    // The Node moves to zone-b (a label change seen through the Node watch).
    c.api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "zone-b"}}}))?;
    assert!(eventually(Duration::from_secs(10), || !c.has_backend(0, 80) && c.has_backend(1, 80)), "{}", c.backends());
    assert_eq!(answers(&c)?, set(&["web-1", "web-2"]));

    // One endpoint without hints: hints are ignored, every endpoint serves.
    c.api.apply(hinted_slice(&c, &[(0, Some("zone-a")), (1, Some("zone-b")), (2, None)]))?;
    assert!(eventually(Duration::from_secs(10), || c.has_backend(0, 80)), "{}", c.backends());
    let mut all = std::collections::BTreeSet::new();
    for _ in 0..4 {
        all.extend(answers(&c)?);
    }
    assert_eq!(all, set(&["web-0", "web-1", "web-2"]));
    Ok(())
}

#[test]
fn node_local_connected_udp_socket_is_aborted_when_its_backend_leaves() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    // A process of the node itself: its connected socket is pointed at a backend once, at
    // connect(), by the socket-level programs; no conntrack entry exists to clean up.
    let sock = udp_socket(&c.node.ns, vip(53))?;
    let first = udp_request(&sock, "who")?.split(' ').next().unwrap_or_default().to_string();
    let gone: usize = first.trim_start_matches("web-").parse()?;
    // A socket the node connected to that pod's own address is not the Service's business.
    let direct = udp_socket(&c.node.ns, SocketAddr::from((c.web[gone].ip, 5353)))?;
    assert!(udp_request(&direct, "who")?.starts_with(&first));

    let keep: Vec<usize> = (0..4).filter(|&i| i != gone).collect();
    c.set_endpoints(&keep)?;
    let aborted = |e: &anyhow::Error| {
        e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|n| n == libc::ECONNABORTED || n == libc::EDESTADDRREQ)
    };
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(10), || match udp_request(&sock, "who") {
            Ok(a) => {
                last = a;
                false
            }
            Err(e) => aborted(&e),
        }),
        "the socket still talks to its departed backend ({last}); log:\n{}",
        c.lab.agent_log(&c.node)
    );
    // A new socket gets a live backend; the direct one is untouched.
    let fresh = udp_socket(&c.node.ns, vip(53))?;
    let pod = udp_request(&fresh, "who")?;
    assert!(!pod.starts_with(&first), "{pod}");
    assert!(udp_request(&direct, "who")?.starts_with(&first));
    let m = c.metrics()?;
    assert!(sample(&m, "lb_stale_udp_sockets_closed_total") >= 1.0, "{m}");
    Ok(())
}

/// The DaemonSet's container as far as this machine can play it: the capabilities of
/// deploy/daemonset.yaml and nothing else (root's other capabilities dropped from the
/// bounding set, as the container runtime does), the args it gives, and the config map's
/// config.yaml, with only the host paths the DaemonSet's mounts would provide replaced.
fn run_as_daemonset(c: &mut Cluster, caps: &[&str]) -> Result<()> {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let cm: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(deploy.join("config.yaml"))?)?;
    let config = cm["data"]["config.yaml"].as_str().expect("config.yaml in the config map").to_string();
    let path = c.lab.dir.join("daemonset-config.yaml");
    std::fs::write(&path, config)?;
    let set = format!("-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
    c.lab.agent_wrapper = ["setpriv", "--bounding-set", &set, "--inh-caps", &set, "--ambient-caps", &set]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let kc = c.api.kubeconfig().to_owned();
    let cgroup = lb_tests::sh(&["findmnt", "-n", "-o", "TARGET", "-t", "cgroup2"])?;
    let cgroup = cgroup.lines().next().unwrap_or("/sys/fs/cgroup").to_string();
    let args = ["--config", path.to_str().unwrap(), "--cgroup", &cgroup];
    c.lab.spawn_agent_kube(&c.node, &kc, &args)
}

#[test]
fn the_daemonsets_capabilities_and_config_suffice_and_each_capability_is_needed() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    run_as_daemonset(&mut c, &["bpf", "net_admin", "perfmon"])?;
    c.wait_agent()?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(http_get(&c.client.ns, vip(80), "/")?);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // The config map's metrics address (0.0.0.0:10249) answers on the node's address.
    let m = http_get(&c.node.ns, SocketAddr::from((c.node.gateway, 10249)), "/metrics")?;
    assert!(sample(&m, "lb_programmed_frontends") >= 3.0, "{m}");
    // A backend change still reaches the datapath, and the node's own connected UDP socket is
    // still aborted (SOCK_DESTROY needs CAP_NET_ADMIN).
    let sock = udp_socket(&c.node.ns, vip(53))?;
    let first = udp_request(&sock, "who")?.split(' ').next().unwrap_or_default().to_string();
    let gone: usize = first.trim_start_matches("web-").parse()?;
    c.set_endpoints(&(0..4).filter(|&i| i != gone).collect::<Vec<_>>())?;
    assert!(eventually(Duration::from_secs(10), || udp_request(&sock, "who").is_err()), "{}", c.lab.agent_log(&c.node));
    let log = c.lab.agent_log(&c.node);
    assert!(!log.contains("attach failed") && !log.contains("cannot abort"), "{log}");

    // Each capability is needed: without it a fresh agent cannot start (BPF: map creation;
    // NET_ADMIN: loading networking programs; PERFMON: the verifier's "pointer arithmetic
    // prohibited for !root" on the parser's packet pointers).
    for missing in ["bpf", "net_admin", "perfmon"] {
        c.lab.kill_agent(&c.node);
        lb_tests::sh(&[
            lb_tests::lb_bin()?.to_str().unwrap(),
            "cleanup",
            "--pin-dir",
            c.node.pin_dir.to_str().unwrap(),
        ])?;
        let caps: Vec<&str> = ["bpf", "net_admin", "perfmon"].into_iter().filter(|c| *c != missing).collect();
        run_as_daemonset(&mut c, &caps)?;
        let failed = eventually(Duration::from_secs(10), || {
            let log = c.lab.agent_log(&c.node);
            log.contains("Error:") || log.contains("attach failed")
        });
        assert!(failed, "the agent worked without {missing}; log:\n{}", c.lab.agent_log(&c.node));
    }
    Ok(())
}

#[test]
fn in_cluster_client_uses_its_service_account_over_tls() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    // What the DaemonSet's pod gets: a service account token and CA mounted by the kubelet, and
    // KUBERNETES_SERVICE_HOST/PORT (set by deploy/daemonset.yaml to the API server itself). The
    // server only answers HTTPS with that token.
    let token = "lb-test-service-account-token";
    let mut c = Cluster::with_server(|ns, dir| TestApiServer::start_tls(ns, API.parse()?, dir, token))?;
    let sa = c.lab.dir.join("serviceaccount");
    let home = c.lab.dir.join("home");
    std::fs::create_dir_all(&home)?;
    let api: SocketAddr = API.parse()?;
    c.lab.agent_env = vec![
        ("KUBERNETES_SERVICE_HOST".into(), api.ip().to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), api.port().to_string()),
        // No ~/.kube/config to find first.
        ("HOME".into(), home.to_str().unwrap().into()),
    ];
    // The kubelet's mount, in a mount namespace of the agent's own (a tmpfs over /run, where
    // /var/run/secrets lives), so the host is not touched.
    let script = "set -e; mount -t tmpfs tmpfs /run; d=/run/secrets/kubernetes.io/serviceaccount; \
                  mkdir -p $d; cp \"$0\"/token \"$0\"/ca.crt \"$0\"/namespace $d/; exec \"$@\"";
    c.lab.agent_wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sa.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    c.lab.spawn_agent(&c.node, &[], &[])?;
    c.wait_agent()?;
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("server=https://127.0.0.1:6443"), "{log}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(http_get(&c.client.ns, vip(80), "/")?);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    c.set_endpoints(&[0])?;
    assert!(eventually(Duration::from_secs(10), || !c.has_backend(1, 80)), "{}", c.backends());
    Ok(())
}

/// A Service lb cannot serve gets a Warning Event, as `kubectl describe` shows: one whose
/// ClusterIP another Service already has is rejected whole; one with an SCTP port is served on
/// its other ports, with a Warning for that port; the lab Service keeps working.
#[test]
fn rejected_services_get_warning_events() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "zz-clash", "namespace": "default"},
        "spec": {"clusterIP": CLUSTER_IP.to_string(), "ports": [{"port": 80}]}
    }))?;
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "mixed", "namespace": "default"},
        "spec": {"clusterIP": "10.96.71.71", "ports": [{"name": "s", "port": 80, "protocol": "SCTP"}, {"name": "t", "port": 80}]}
    }))?;
    let event = |name: &str, reason: &str| {
        c.api
            .events()
            .into_iter()
            .find(|e| e["regarding"]["name"] == name && e["reason"] == reason && e["type"] == "Warning")
    };
    assert!(
        eventually(Duration::from_secs(10), || event("zz-clash", "FailedToProgram").is_some()
            && event("mixed", "PartlyProgrammed").is_some()),
        "events: {:#?}\nlog:\n{}",
        c.api.events(),
        c.lab.agent_log(&c.node)
    );
    let note = event("mixed", "PartlyProgrammed").unwrap()["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("spec.ports[0].protocol") && note.contains("SCTP"), "{note}");
    let pod = http_get(&c.client.ns, vip(80), "/")?;
    assert!(c.web.iter().any(|p| p.name == pod), "the lab Service keeps working: {pod}");
    let services = c.lab.list(&c.node, "services")?;
    assert!(services.contains("10.96.71.71:80") && services.contains("default/mixed:t"), "{services}");
    Ok(())
}
