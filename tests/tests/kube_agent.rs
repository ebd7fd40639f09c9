//! The agent as a Kubernetes client, against a real control plane: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler built from source (`cargo xtask k8s`), the netns
//! kubelet running the pods, and the real EndpointSlice controller writing the slices the agent
//! reads. Real traffic between network namespaces; the pinned maps checked through `lb list`.
//! Changes go through the API as any client makes them (labels that move a pod in or out of a
//! Service's selector, Services and EndpointSlices applied with kubectl). Only faults a real
//! server cannot be made to produce on demand (a list that hangs) use the test API server
//! (`lb_tests::apiserver`).
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
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use lb_tests::{
    apiserver::{Kind, TestApiServer},
    control_plane::{ControlPlane, Options, API_ADDR, API_PORT},
    eventually, http_get, http_status,
    kubelet::{Kubelet, KubeletConfig},
    lab_manifests, privileged, tcp_connect, udp_request, udp_socket, EchoConn, Lab, Node, Pod,
};
use serde_json::json;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 104, 123, 59);
const EXTRA_PORTS: [(&str, u16, &str, u16); 2] = [("echo", 9000, "TCP", 9000), ("dns", 53, "UDP", 5353)];

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

/// The seed lab's web-service with the tests' extra ports: HTTP 80, echo 9000, DNS-like UDP
/// 53 to 5353; with `selector`, the EndpointSlice controller keeps its slice.
fn web_service(selector: bool) -> serde_json::Value {
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-service", "namespace": "default"},
        "spec": {"clusterIP": CLUSTER_IP.to_string(), "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80},
            {"name": "echo", "port": 9000, "protocol": "TCP", "targetPort": 9000},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ]}
    });
    if selector {
        svc["spec"]["selector"] = json!({"app": "web"});
    }
    svc
}

/// A web pod bound to `node`: HTTP on 80, echo on 9000 (`echo-port`), UDP on 5353. `in_service`
/// gives it the label web-service selects.
fn web_pod(i: usize, node: &str, in_service: bool) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("web-{i}"), "namespace": "default",
                     "labels": {"app": if in_service { "web" } else { "off" }, "idx": i.to_string()}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 5, "containers": [{
            "name": "web", "image": "nginx",
            "ports": [{"name": "http", "containerPort": 80}, {"name": "echo-port", "containerPort": 9000},
                      {"name": "dns", "containerPort": 5353, "protocol": "UDP"}],
        }]}
    })
}

/// One node (`node1`) attached to a real control plane, its kubelet running four web pods of
/// which the first three are in web-service, a client pod, and the agent.
struct Cluster {
    // Dropped in this order: the kubelet (pods), the lab (agent, namespaces, pins), the
    // control plane.
    _kubelet: Kubelet,
    lab: Lab,
    cp: ControlPlane,
    node: Node,
    web: Vec<Pod>,
    client: Pod,
    ifaces: Vec<String>,
}

/// How a test wants its cluster.
#[derive(Default)]
struct Setup {
    options: Options,
    node_labels: BTreeMap<String, String>,
    /// web-service without a selector: the test writes its EndpointSlices itself.
    selectorless: bool,
}

impl Cluster {
    fn new() -> Result<Self> {
        Self::with(Setup::default())
    }

    fn with(setup: Setup) -> Result<Self> {
        let mut cp = ControlPlane::start_with(setup.options)?;
        let mut lab = Lab::new()?;
        let node = lab.add_node("node1", 1)?;
        let node_ip = cp.attach(&node.ns)?;
        let mut config = KubeletConfig::new(node_ip);
        config.labels = setup.node_labels;
        // Lab pods (the client) take low host numbers; the kubelet's start at .11.
        config.first_host = 11;
        let kubelet = Kubelet::start(&cp, &node, config)?;
        let client = lab.add_pod(&node, "busybox", 5)?;
        let mut objects: Vec<serde_json::Value> = (0..4).map(|i| web_pod(i, "node1", i < 3)).collect();
        objects.push(web_service(!setup.selectorless));
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        cp.kubectl_stdin(&["apply", "-f", "-"], &list.to_string())?;
        let web = (0..4)
            .map(|i| kubelet.wait_pod("default", &format!("web-{i}"), Duration::from_secs(60)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ifaces: Vec<String> = web.iter().chain([&client]).map(|p| p.host_if.clone()).collect();
        ifaces.push("cbr0".into());
        let c = Cluster { _kubelet: kubelet, lab, cp, node, web, client, ifaces };
        if !setup.selectorless {
            c.wait_slice(&[0, 1, 2])?;
        }
        Ok(c)
    }

    /// Moves web pods in and out of web-service: `idx` get the label its selector matches,
    /// the others lose it (the EndpointSlice controller follows).
    fn set_endpoints(&self, idx: &[usize]) -> Result<()> {
        let pods: Api<KubePod> = Api::namespaced(self.cp.client(), "default");
        let idx = idx.to_vec();
        self.cp.run(async move {
            for i in 0..4 {
                let app = if idx.contains(&i) { "web" } else { "off" };
                let patch = json!({"metadata": {"labels": {"app": app}}});
                pods.patch(&format!("web-{i}"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            Ok::<_, kube::Error>(())
        })?;
        Ok(())
    }

    /// Waits until web-service's slice lists exactly the web pods `idx`, ready.
    fn wait_slice(&self, idx: &[usize]) -> Result<()> {
        self.wait_slice_for(idx, Duration::from_secs(30))
    }

    fn wait_slice_for(&self, idx: &[usize], limit: Duration) -> Result<()> {
        let mut want: Vec<String> = idx.iter().map(|&i| self.web[i].ip.to_string()).collect();
        want.sort();
        let jsonpath = "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}";
        let mut last = String::new();
        let ok = eventually(limit, || {
            last = self
                .cp
                .kubectl(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web-service", "-o", jsonpath])
                .unwrap_or_default();
            let mut got: Vec<String> = last.split_whitespace().map(str::to_string).collect();
            got.sort();
            got == want
        });
        if !ok {
            bail!("web-service's slice lists {last:?}, not {want:?}");
        }
        Ok(())
    }

    /// `kubectl apply` of one object.
    fn apply(&self, obj: serde_json::Value) -> Result<()> {
        self.cp.kubectl_stdin(&["apply", "-f", "-"], &obj.to_string())?;
        Ok(())
    }

    /// Starts the agent as a client finds its API server: here through `KUBECONFIG`.
    fn start_agent(&mut self) -> Result<()> {
        let kc = self.cp.kubeconfig.to_str().expect("utf-8 path").to_string();
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
    // Without the watch cache every watch is served by etcd, so compacting etcd's history is
    // what a resuming watch runs into (with the cache, its own window decides).
    let mut c = Cluster::with(Setup {
        options: Options { apiserver_args: vec!["--watch-cache=false".into()] },
        ..Default::default()
    })?;
    c.start_agent()?;
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("Kubernetes API client configured"), "{log}");

    // The seed lab's ClusterIP spreads over the three pods of the slice.
    let mut seen = BTreeMap::new();
    for _ in 0..45 {
        *seen.entry(http_get(&c.client.ns, vip(80), "/")?).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), vec!["web-0", "web-1", "web-2"], "{seen:?}");

    // A Service owned by another proxy is never programmed. Applied before echo-two, which
    // the same watch delivers after it: once echo-two is served, the agent has seen this one.
    c.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "not-ours", "namespace": "default", "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
        "spec": {"clusterIP": "10.96.60.60", "selector": {"app": "web"}, "ports": [{"port": 80}]}
    }))?;
    // Create: a second Service whose named targetPort the EndpointSlice controller resolves
    // through the pod's container port of that name.
    c.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo-two", "namespace": "default"},
        "spec": {"clusterIP": "10.96.50.50", "selector": {"idx": "3"}, "ports": [{"name": "echo", "port": 7000, "targetPort": "echo-port"}]}
    }))?;
    let echo2: SocketAddr = "10.96.50.50:7000".parse()?;
    assert!(
        eventually(Duration::from_secs(20), || EchoConn::open(&c.client.ns, echo2)
            .and_then(|mut e| e.pod())
            .is_ok_and(|p| p == "web-3")),
        "new Service not served; log:\n{}",
        c.lab.agent_log(&c.node)
    );
    assert!(!c.lab.list(&c.node, "services")?.contains("10.96.60.60"), "another proxy's Service programmed");

    // Update: web-2 leaves the Service (its label no longer matches the selector).
    c.set_endpoints(&[0, 1])?;
    assert!(eventually(Duration::from_secs(20), || !c.has_backend(2, 80)), "{}", c.backends());
    for _ in 0..20 {
        let pod = http_get(&c.client.ns, vip(80), "/")?;
        assert!(pod == "web-0" || pod == "web-1", "{pod}");
    }
    assert!(!c.lab.list(&c.node, "services")?.contains("10.96.60.60"));

    // History compacted while the agent cannot watch: its link to the control plane goes
    // down and its connections are aborted; web-2 comes back meanwhile and etcd compacts past
    // that change. When the link returns, the agent's resume gets 410 Gone, it lists again,
    // and sees the change.
    let relists = |c: &Cluster| c.metrics().map(|m| sample(&m, "lb_watch_relists_total")).unwrap_or(f64::NAN);
    let relists_before = relists(&c);
    c.cp.disconnect(&c.node.ns)?;
    c.set_endpoints(&[0, 1, 2])?;
    c.wait_slice(&[0, 1, 2])?;
    let compacted = c.cp.compact_etcd()?;
    c.cp.reconnect(&c.node.ns)?;
    assert!(eventually(Duration::from_secs(30), || c.has_backend(2, 80)), "{}", c.backends());
    let relists_after = relists(&c);
    assert!(
        relists_after > relists_before,
        "no relist after etcd compacted to revision {compacted} ({relists_before} -> {relists_after}); log:\n{}",
        c.lab.agent_log(&c.node)
    );

    // Delete: the Service goes, and its address is no longer translated.
    c.cp.kubectl(&["delete", "service", "echo-two"])?;
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
    // Time-based warm-up: requests against the healthy agent before the fault.
    thread::sleep(Duration::from_secs(1));

    // Killed, with a Service change (web-3 joins) made while no agent runs.
    c.lab.kill_agent(&c.node);
    c.set_endpoints(&[0, 1, 2, 3])?;
    c.wait_slice(&[0, 1, 2, 3])?;
    assert!(!c.has_backend(3, 80), "nobody should have programmed web-3 yet");
    c.start_agent()?;
    assert!(eventually(Duration::from_secs(10), || c.has_backend(3, 80)), "{}", c.backends());
    // Time-based: requests keep running against the restarted agent.
    thread::sleep(Duration::from_secs(1));

    let (ok, failures, seen) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), ok + failures.len());
    assert!(ok > 50, "only {ok} requests");
    assert!(seen.contains_key("web-3"), "the change made while down was not applied: {seen:?}");
    assert_eq!(long_lived.pod()?, long_pod, "the long-lived connection moved or broke");
    Ok(())
}

/// The test API server in the node's namespace, for faults the real API server cannot be made
/// to produce on demand: one node, four web pods of the lab (the first three in the lab's
/// hand-written EndpointSlice), a client pod, the agent.
struct FaultCluster {
    // Dropped first: the server, then the lab (agent, namespaces, pins).
    api: TestApiServer,
    lab: Lab,
    node: Node,
    web: Vec<Pod>,
    client: Pod,
    ifaces: Vec<String>,
}

impl FaultCluster {
    fn start() -> Result<Self> {
        let mut lab = Lab::new()?;
        let node = lab.add_node("node1", 1)?;
        let mut web = Vec::new();
        for i in 0..4u8 {
            let pod = lab.add_pod(&node, &format!("web-{i}"), 11 + i)?;
            lab.serve(&pod, &[80], &[9000], &[5353])?;
            web.push(pod);
        }
        let client = lab.add_pod(&node, "busybox", 100)?;
        let api = TestApiServer::start(&node.ns, "127.0.0.1:6443".parse()?, &lab.dir)?;
        let pods: Vec<(&Pod, bool)> = web[..3].iter().map(|p| (p, true)).collect();
        api.apply_yaml(&lab_manifests(CLUSTER_IP, &pods, &EXTRA_PORTS))?;
        let mut ifaces: Vec<String> = web.iter().chain([&client]).map(|p| p.host_if.clone()).collect();
        ifaces.push("cbr0".into());
        let mut c = FaultCluster { api, lab, node, web, client, ifaces };
        let ifaces: Vec<&str> = c.ifaces.iter().map(String::as_str).collect();
        c.lab.start_agent_kube(&c.node, &ifaces, 3, c.api.kubeconfig(), &[])?;
        Ok(c)
    }

    fn has_backend(&self, pod: usize, port: u16) -> bool {
        self.lab.list(&self.node, "backends").unwrap_or_default().contains(&format!("{}:{port}", self.web[pod].ip))
    }
}

/// A restarted agent finds its EndpointSlice list hanging (the test API server holds it back).
/// It must keep the pinned state (not program Services without endpoints) until the list
/// arrives, report itself unready meanwhile and alive, and lose no request.
#[test]
fn restarted_agent_keeps_pinned_state_while_its_first_list_hangs() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = FaultCluster::start()?;
    assert!(c.has_backend(2, 80));
    let load = Load::start(&c.client.ns);
    // Time-based warm-up: requests against the healthy agent before the fault.
    thread::sleep(Duration::from_secs(1));

    c.lab.kill_agent(&c.node);
    c.api.hold_lists(Kind::EndpointSlice);
    let before = c.api.requests().len();
    c.lab.spawn_agent_kube(&c.node, c.api.kubeconfig(), &[])?;
    // Where the fault is meant to catch it: the Services list answered (the agent watches
    // them now), the EndpointSlice list hanging.
    assert!(
        eventually(Duration::from_secs(20), || {
            let watching = c.api.requests()[before..]
                .iter()
                .any(|r| r.starts_with("GET /api/v1/services?") && r.contains("watch=true"));
            watching && c.api.lists_waiting() > 0
        }),
        "the restarted agent never got to its held list; requests: {:?}\n{}",
        &c.api.requests()[before..],
        c.lab.agent_log(&c.node)
    );
    // The watches start before the datapath is loaded, the health server after it.
    let healthz: SocketAddr = "127.0.0.1:10256".parse()?;
    assert!(
        eventually(Duration::from_secs(10), || http_status(&c.node.ns, healthz, "/livez").is_ok()),
        "the restarted agent's health server never answered"
    );
    let log = c.lab.agent_log(&c.node);
    assert!(!log.contains("desired state applied"), "applied before the first full list:\n{log}");
    assert!(c.has_backend(2, 80) && c.has_backend(0, 80), "pinned state flushed");
    // Not healthy until the first full state is programmed, while the old state serves; alive.
    let (code, body) = http_status(&c.node.ns, healthz, "/healthz")?;
    assert!(code == 503 && body.contains("\"synced\":false"), "{code} {body}");
    assert_eq!(http_status(&c.node.ns, healthz, "/livez")?.0, 200);
    c.api.release_lists();
    let ifaces: Vec<&str> = c.ifaces.iter().map(String::as_str).collect();
    c.lab.wait_agent(&c.node, &ifaces, 3)?;
    // Time-based: requests keep running against the recovered agent.
    thread::sleep(Duration::from_secs(1));
    let (ok, failures, _) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), ok + failures.len());
    assert!(ok > 50, "only {ok} requests");
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
    // Time-based warm-up: requests against the healthy agent before the outage.
    thread::sleep(Duration::from_millis(500));
    // kube-apiserver is killed: the agent's watches break and reconnecting is refused.
    c.cp.stop_apiserver();
    let down = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || c.lab.agent_log(&c.node).contains("watch failed")),
        "{}",
        c.lab.agent_log(&c.node)
    );
    // Time-based: the outage lasts 10 s while requests run.
    thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    assert!(c.has_backend(2, 80), "state flushed or changed during the outage: {}", c.backends());
    c.cp.start_apiserver()?;
    let back = Instant::now();
    // A change once it is back arrives (a resumed watch that sees no change says nothing, so
    // the change is what shows the agent watches again).
    c.set_endpoints(&[0, 1])?;
    // The change reaches the slice only once kube-controller-manager's own watches are back:
    // client-go's reflector backs off exponentially to 30 s with a jitter of up to as much
    // again, so this wait is long; it is not what the test measures.
    c.wait_slice_for(&[0, 1], Duration::from_secs(90))?;
    let sliced = Instant::now();
    // The agent's watch backs off the same way (kube-runtime's default: 0.8 s doubling to
    // 30 s, each step with up to as much again of jitter); after a 10 s outage its steps are
    // still short of that, so 45 s is ample.
    assert!(
        eventually(Duration::from_secs(45), || !c.has_backend(2, 80)),
        "change made after the outage never arrived; log:\n{}",
        c.lab.agent_log(&c.node)
    );
    eprintln!(
        "a change applied {:?} after the API server returned, {:?} after the slice showed it",
        back.elapsed(),
        sliced.elapsed()
    );
    let log = c.lab.agent_log(&c.node);
    assert!(log.contains("watch re-established"), "{log}");
    // Time-based: requests keep running after the catch-up.
    thread::sleep(Duration::from_millis(500));
    let (ok, failures, _) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), ok + failures.len());
    Ok(())
}

#[test]
fn metrics_and_healthz_follow_the_traffic() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    // A Service without endpoints, to be refused.
    c.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "empty", "namespace": "default"},
        "spec": {"clusterIP": "10.96.70.70", "ports": [{"port": 80}]}
    }))?;
    let kc = c.cp.kubeconfig.to_str().expect("utf-8 path").to_string();
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
    // The agent counts table entries at most every twenty times what a count cost (the
    // tables are walked key by key), so a scrape right after the traffic may show the last
    // count: wait for a fresh one.
    let mut last = after.clone();
    let counted = eventually(Duration::from_secs(10), || {
        last = c.metrics().unwrap_or_default();
        sample(&last, "lb_conntrack_entries") >= 2.0
    });
    assert!(counted, "{last}");
    assert_eq!(sample(&after, "lb_conntrack_capacity"), lb_common::CONNTRACK_MAX_ENTRIES as f64, "{after}");
    // web-service's three ports, `empty`, and the `kubernetes` Service the API server keeps.
    assert_eq!(sample(&after, "lb_programmed_frontends"), 5.0, "{after}");
    assert_eq!(sample(&after, "lb_programmed_endpoints"), 10.0, "{after}");
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
    let kc = c.cp.kubeconfig.clone();

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
    // Time-based: the entry must be old enough that a re-created one would show (age >= 2).
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
    // web-service without a selector: the slices, hints included, are written here (the real
    // controller would hint every endpoint of a one-node cluster with that node's zone).
    let mut c = Cluster::with(Setup {
        node_labels: [("topology.kubernetes.io/zone".to_string(), "zone-a".to_string())].into(),
        selectorless: true,
        ..Default::default()
    })?;
    c.apply(hinted_slice(&c, &[(0, Some("zone-a")), (1, Some("zone-b")), (2, Some("zone-b"))]))?;
    c.start_agent()?;
    let answers = |c: &Cluster| -> Result<std::collections::BTreeSet<String>> {
        (0..15).map(|_| http_get(&c.client.ns, vip(80), "/")).collect()
    };
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>();
    // PreferClose: every endpoint has hints, one is for this node's zone.
    assert!(c.has_backend(0, 80) && !c.has_backend(1, 80) && !c.has_backend(2, 80), "{}", c.backends());
    assert_eq!(answers(&c)?, set(&["web-0"]));

    // The Node moves to zone-b (a label change seen through the Node watch).
    c.cp.kubectl(&["label", "node", "node1", "topology.kubernetes.io/zone=zone-b", "--overwrite"])?;
    assert!(eventually(Duration::from_secs(10), || !c.has_backend(0, 80) && c.has_backend(1, 80)), "{}", c.backends());
    assert_eq!(answers(&c)?, set(&["web-1", "web-2"]));

    // One endpoint without hints: hints are ignored, every endpoint serves.
    c.apply(hinted_slice(&c, &[(0, Some("zone-a")), (1, Some("zone-b")), (2, None)]))?;
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
    let kc = c.cp.kubeconfig.clone();
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
        // Refused for want of the capability (EPERM, or the verifier's EACCES), not failed
        // for some other reason.
        let refused = eventually(Duration::from_secs(10), || {
            let log = c.lab.agent_log(&c.node);
            (log.contains("Error:") || log.contains("attach failed"))
                && ["Operation not permitted", "Permission denied"].iter().any(|m| log.contains(m))
        });
        assert!(refused, "the agent worked without {missing}, or failed otherwise; log:\n{}", c.lab.agent_log(&c.node));
    }
    Ok(())
}

#[test]
fn in_cluster_client_uses_its_service_account_over_tls() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    // What the DaemonSet's pod gets: its service account (deploy/rbac.yaml, applied to the real
    // RBAC authorizer), a token the API server issued for it and the cluster CA, mounted where
    // the kubelet mounts them, and KUBERNETES_SERVICE_HOST/PORT pointing at the API server (as
    // deploy/daemonset.yaml sets them).
    let mut c = Cluster::new()?;
    let rbac = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    c.cp.kubectl(&["apply", "-f", rbac.to_str().unwrap()])?;
    let token = c.cp.kubectl(&["create", "token", "lb", "-n", "kube-system"])?;
    let sa = c.lab.dir.join("serviceaccount");
    std::fs::create_dir_all(&sa)?;
    std::fs::write(sa.join("token"), token.trim())?;
    std::fs::copy(&c.cp.ca_file, sa.join("ca.crt"))?;
    std::fs::write(sa.join("namespace"), "kube-system")?;
    let home = c.lab.dir.join("home");
    std::fs::create_dir_all(&home)?;
    c.lab.agent_env = vec![
        ("KUBERNETES_SERVICE_HOST".into(), API_ADDR.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), API_PORT.to_string()),
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
    assert!(log.contains(&format!("server=https://{API_ADDR}:{API_PORT}")), "{log}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(http_get(&c.client.ns, vip(80), "/")?);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    c.set_endpoints(&[0])?;
    assert!(eventually(Duration::from_secs(20), || !c.has_backend(1, 80)), "{}", c.backends());
    // The API server knows who asked: the watches were the service account's, allowed by the
    // ClusterRole (a forbidden list would have left the agent unready above).
    assert!(!c.lab.agent_log(&c.node).contains("forbidden"), "{}", c.lab.agent_log(&c.node));
    Ok(())
}

/// A Service lb cannot serve in full gets a Warning Event, as `kubectl describe` shows: one with
/// an SCTP port is served on its other ports, with a Warning for that port, stored by the real
/// API server (deploy/rbac.yaml grants the agent events create); the lab Service keeps working.
#[test]
fn partly_served_services_get_warning_events() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut c = Cluster::new()?;
    c.start_agent()?;
    c.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "mixed", "namespace": "default"},
        "spec": {"clusterIP": "10.96.71.71", "ports": [{"name": "s", "port": 80, "protocol": "SCTP"}, {"name": "t", "port": 80}]}
    }))?;
    let event = |c: &Cluster| -> Option<serde_json::Value> {
        let list = c.cp.kubectl(&["get", "events.v1.events.k8s.io", "-n", "default", "-o", "json"]).ok()?;
        let list: serde_json::Value = serde_json::from_str(&list).ok()?;
        list["items"]
            .as_array()?
            .iter()
            .find(|e| e["regarding"]["name"] == "mixed" && e["reason"] == "PartlyProgrammed" && e["type"] == "Warning")
            .cloned()
    };
    assert!(
        eventually(Duration::from_secs(20), || event(&c).is_some()),
        "no Warning Event; log:\n{}",
        c.lab.agent_log(&c.node)
    );
    let note = event(&c).unwrap()["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("spec.ports[0].protocol") && note.contains("SCTP"), "{note}");
    let pod = http_get(&c.client.ns, vip(80), "/")?;
    assert!(c.web.iter().any(|p| p.name == pod), "the lab Service keeps working: {pod}");
    let services = c.lab.list(&c.node, "services")?;
    assert!(services.contains("10.96.71.71:80") && services.contains("default/mixed:t"), "{services}");
    Ok(())
}

/// A Service whose ClusterIP another Service already has (which a real API server refuses to
/// store, hence the test API server) is rejected whole, with a Warning Event; the lab Service
/// keeps working.
#[test]
fn a_clusterip_clash_gets_a_warning_event() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let c = FaultCluster::start()?;
    c.api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "zz-clash", "namespace": "default"},
        "spec": {"clusterIP": CLUSTER_IP.to_string(), "ports": [{"port": 80}]}
    }))?;
    let event = || {
        c.api.events().into_iter().find(|e| {
            e["regarding"]["name"] == "zz-clash" && e["reason"] == "FailedToProgram" && e["type"] == "Warning"
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || event().is_some()),
        "events: {:#?}\nlog:\n{}",
        c.api.events(),
        c.lab.agent_log(&c.node)
    );
    let pod = http_get(&c.client.ns, vip(80), "/")?;
    assert!(c.web.iter().any(|p| p.name == pod), "the lab Service keeps working: {pod}");
    Ok(())
}
