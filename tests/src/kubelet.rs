//! A "netns kubelet": what a kubelet does toward the API server, for a lab node whose pods are
//! network namespaces. No container runtime exists on these machines, so containers are not
//! run; each pod is a namespace on the node's `cbr0` bridge with a `podserver` answering with
//! the pod's name on the ports its containers declare.
//!
//! - The Node is registered with its pod CIDR (`10.244.N.0/24`, the lab node's), InternalIP,
//!   capacity and a `Ready` condition; a Lease in `kube-node-lease` is renewed every 5 s, which
//!   is the heartbeat the node lifecycle controller reads (it lifts the `not-ready` taint).
//! - Pods bound to the node (`spec.nodeName`, by the scheduler or the test) get an address from
//!   the pod CIDR, a namespace and their server; status then says `Running` with `podIP(s)`,
//!   `hostIP` and `Ready` from a readiness check (the pod's `readinessProbe`, `httpGet` or
//!   `tcpSocket`, run from the node; without one, ready once the server has bound its ports).
//! - Deletion is graceful as a kubelet's: while the grace period runs the pod stays and keeps
//!   serving for its `preStop` sleep (so its endpoint is `terminating`); then its server is
//!   stopped, its namespace removed, and the deletion finished (grace period 0, uid
//!   precondition).
//!
//! Which server a port gets: a UDP port answers datagrams (`--udp`); a TCP port named `echo*`
//! echoes lines (`--echo`), `sink*` discards (`--sink`); any other TCP port answers HTTP with
//! the pod's name. A container declaring no ports whose image is nginx serves HTTP on 80, as
//! the image does (the seed lab's `deploy.yml` declares none).
//!
//! The kubelet's tasks run on the control plane's runtime (its threads are in the control
//! plane's namespace, where the API server is reachable). Dropping the `Kubelet` stops them,
//! kills the pods' servers and removes their namespaces.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Container, Node, Pod as KubePod},
    },
    apimachinery::pkg::{
        apis::meta::v1::{MicroTime, ObjectMeta, Time},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{control_plane::ControlPlane, podserver_bin, Pod};

const FIELD_MANAGER: &str = "lb-test-kubelet";
const KUBE_VERSION: &str = "v1.37.2";

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("Kubernetes API ({what}): {source}")]
    Api { what: String, source: kube::Error },
    #[error("pod {pod}: {msg}")]
    Pod { pod: String, msg: String },
    #[error("node {node}: {msg}")]
    Node { node: String, msg: String },
}

type Result<T, E = KubeletError> = std::result::Result<T, E>;

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeletError {
    let what = what.into();
    move |source| KubeletError::Api { what, source }
}

/// A pod this kubelet runs.
struct Running {
    uid: String,
    pod: Pod,
    server: Option<Child>,
    ready: bool,
    terminating: bool,
    /// Readiness probes run so far, each counted once its result is in the pod's status.
    probes: u32,
}

struct Shared {
    client: Client,
    node: crate::Node,
    internal_ip: Ipv4Addr,
    first_host: u8,
    /// Keyed `namespace/name`.
    pods: Mutex<BTreeMap<String, Running>>,
    seq: Mutex<u32>,
}

pub struct Kubelet {
    pub node_name: String,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::AbortHandle>,
    handle: tokio::runtime::Handle,
}

/// Settings for one node's kubelet.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// The Node's InternalIP (its address on the lab's underlay, or its control plane link).
    pub internal_ip: Ipv4Addr,
    /// Extra Node labels (`topology.kubernetes.io/zone`, ...).
    pub labels: BTreeMap<String, String>,
    /// Pod addresses start at 10.244.N.`first_host` (the lab may place pods of its own below).
    pub first_host: u8,
}

impl KubeletConfig {
    pub fn new(internal_ip: Ipv4Addr) -> Self {
        Self { internal_ip, labels: BTreeMap::new(), first_host: 2 }
    }
}

impl Kubelet {
    /// Registers `node` and starts following its pods; returns once the node lifecycle
    /// controller has found it Ready (the `not-ready` taint gone, so pods can be scheduled).
    pub fn start(cp: &ControlPlane, node: &crate::Node, config: KubeletConfig) -> Result<Self> {
        let shared = Arc::new(Shared {
            client: cp.client(),
            node: node.clone(),
            internal_ip: config.internal_ip,
            first_host: config.first_host.max(2),
            pods: Mutex::new(BTreeMap::new()),
            seq: Mutex::new(0),
        });
        let s = shared.clone();
        let labels = config.labels.clone();
        cp.run(async move { register(&s, &labels).await })?;
        let handle = cp.handle();
        let mut kubelet = Kubelet { node_name: node.name.clone(), shared: shared.clone(), tasks: Vec::new(), handle };
        kubelet.tasks.push(kubelet.handle.spawn(heartbeat(shared.clone())).abort_handle());
        kubelet.tasks.push(kubelet.handle.spawn(follow_pods(shared.clone())).abort_handle());
        let nodes: Api<Node> = Api::all(cp.client());
        let name = node.name.clone();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (nodes, name) = (nodes.clone(), name.clone());
            let tainted = cp
                .run(async move { nodes.get(&name).await })
                .map_err(api("reading the Node"))?
                .spec
                .and_then(|s| s.taints)
                .is_some_and(|t| {
                    t.iter().any(|t| {
                        t.key.starts_with("node.kubernetes.io/not-ready")
                            || t.key.starts_with("node.kubernetes.io/unreachable")
                    })
                });
            if !tainted {
                return Ok(kubelet);
            }
            if Instant::now() > deadline {
                return Err(KubeletError::Node {
                    node: node.name.clone(),
                    msg: "still tainted not-ready after 90 s (is the node lifecycle controller running?)".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The running pod `namespace/name`, if this kubelet runs it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.shared.pods.lock().unwrap().get(&format!("{namespace}/{name}")).map(|r| r.pod.clone())
    }

    /// Every pod this kubelet runs, `namespace/name` → pod.
    pub fn pods(&self) -> BTreeMap<String, Pod> {
        self.shared.pods.lock().unwrap().iter().map(|(k, r)| (k.clone(), r.pod.clone())).collect()
    }

    /// How many readiness probes of pod `namespace/name` have run here, each with its result
    /// already written to the pod's status (0 for a pod without a `readinessProbe`).
    pub fn probes_run(&self, namespace: &str, name: &str) -> u32 {
        self.shared.pods.lock().unwrap().get(&format!("{namespace}/{name}")).map_or(0, |r| r.probes)
    }

    /// Waits until pod `namespace/name` runs here and is ready.
    pub fn wait_pod(&self, namespace: &str, name: &str, within: Duration) -> Result<Pod> {
        let key = format!("{namespace}/{name}");
        let deadline = Instant::now() + within;
        loop {
            if let Some(r) = self.shared.pods.lock().unwrap().get(&key).filter(|r| r.ready && !r.terminating) {
                return Ok(r.pod.clone());
            }
            if Instant::now() > deadline {
                return Err(KubeletError::Pod {
                    pod: key,
                    msg: format!("not running and ready on {} within {within:?}", self.node_name),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until pod `namespace/name` no longer runs here.
    pub fn wait_gone(&self, namespace: &str, name: &str, within: Duration) -> Result<()> {
        let key = format!("{namespace}/{name}");
        let deadline = Instant::now() + within;
        while self.shared.pods.lock().unwrap().contains_key(&key) {
            if Instant::now() > deadline {
                return Err(KubeletError::Pod {
                    pod: key,
                    msg: format!("still on {} after {within:?}", self.node_name),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let pods = std::mem::take(&mut *self.shared.pods.lock().unwrap());
        for (_, mut r) in pods {
            teardown(&mut r);
        }
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

async fn register(s: &Shared, labels: &BTreeMap<String, String>) -> Result<()> {
    let name = s.node.name.clone();
    let cidr = format!("10.244.{}.0/24", s.node.pod_net);
    let mut all_labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname".to_string(), name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]
    .into();
    all_labels.extend(labels.clone());
    let nodes: Api<Node> = Api::all(s.client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": all_labels},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }))
    .expect("static Node");
    nodes
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&node))
        .await
        .map_err(api(format!("registering Node {name}")))?;
    let t = serde_json::to_value(now()).expect("time");
    let resources = json!({"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"});
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "netns kubelet is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t}],
        "addresses": [{"type": "InternalIP", "address": s.internal_ip.to_string()}, {"type": "Hostname", "address": name}],
        "capacity": resources, "allocatable": resources,
        "nodeInfo": {"kubeletVersion": KUBE_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
                     "containerRuntimeVersion": "netns://0", "kernelVersion": kernel.trim(), "osImage": "lb test lab", "machineID": "", "systemUUID": "", "bootID": ""},
    }});
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(api(format!("Node {name} status")))?;
    Ok(())
}

/// Renews the node's Lease (what the node lifecycle controller reads as the heartbeat) every
/// 5 s; the Node object itself is left alone, as a kubelet leaves it between status reports,
/// so watchers of Nodes (lb watches its own) see no churn.
async fn heartbeat(s: Arc<Shared>) {
    let leases: Api<Lease> = Api::namespaced(s.client.clone(), "kube-node-lease");
    let name = s.node.name.clone();
    loop {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some("kube-node-lease".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let mut v = serde_json::to_value(&lease).expect("lease");
        v["apiVersion"] = json!("coordination.k8s.io/v1");
        v["kind"] = json!("Lease");
        if let Err(e) = leases.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&v)).await {
            tracing::debug!(node = %name, error = %e, "lease renewal failed");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Watches the pods bound to this node and hands each pod's latest state to its worker.
async fn follow_pods(s: Arc<Shared>) {
    let pods: Api<KubePod> = Api::all(s.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", s.node.name));
    let mut workers: BTreeMap<String, mpsc::UnboundedSender<Option<KubePod>>> = BTreeMap::new();
    let mut listing: Option<BTreeSet<String>> = None;
    let mut stream = watcher(pods, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::debug!(error = %e, "pod watch failed; retrying");
                continue;
            }
        };
        let send = |workers: &mut BTreeMap<String, mpsc::UnboundedSender<Option<KubePod>>>,
                    pod: Option<KubePod>,
                    key: String| {
            workers.retain(|_, tx| !tx.is_closed());
            let tx = workers.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(pod_worker(s.clone(), key, rx));
                tx
            });
            let _ = tx.send(pod);
        };
        match ev {
            watcher::Event::Init => listing = Some(BTreeSet::new()),
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                let key = key_of(&p);
                if let Some(l) = &mut listing {
                    l.insert(key.clone());
                }
                send(&mut workers, Some(p), key);
            }
            watcher::Event::Delete(p) => {
                send(&mut workers, None, key_of(&p));
            }
            watcher::Event::InitDone => {
                // Pods deleted while the watch was down.
                if let Some(seen) = listing.take() {
                    let gone: Vec<String> = workers.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                    for k in gone {
                        send(&mut workers, None, k);
                    }
                }
            }
        }
    }
}

fn key_of(p: &KubePod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// One pod's life, driven by its latest state (None: gone from the API).
async fn pod_worker(s: Arc<Shared>, key: String, mut rx: mpsc::UnboundedReceiver<Option<KubePod>>) {
    while let Some(mut latest) = rx.recv().await {
        // Only the newest state matters.
        while let Ok(next) = rx.try_recv() {
            latest = next;
        }
        let Some(pod) = latest else {
            let r = s.pods.lock().unwrap().remove(&key);
            if let Some(mut r) = r {
                tokio::task::spawn_blocking(move || teardown(&mut r)).await.ok();
            }
            return;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let known = s.pods.lock().unwrap().get(&key).map(|r| (r.uid.clone(), r.terminating));
        if let Some((old_uid, _)) = &known {
            if *old_uid != uid {
                // A new pod of the same name: the old one is gone.
                let old = s.pods.lock().unwrap().remove(&key);
                if let Some(mut r) = old {
                    tokio::task::spawn_blocking(move || teardown(&mut r)).await.ok();
                }
            }
        }
        let known = s.pods.lock().unwrap().get(&key).map(|r| r.terminating);
        if pod.metadata.deletion_timestamp.is_some() {
            if known != Some(true) {
                if let Err(e) = terminate(&s, &key, &pod).await {
                    tracing::warn!(pod = %key, error = %e, "terminating");
                }
            }
            continue;
        }
        if known.is_none() {
            if let Err(e) = start_pod(&s, &key, &pod).await {
                tracing::warn!(pod = %key, error = %e, "starting the pod failed");
            }
        }
    }
}

/// What the pod's containers declare, as podserver arguments.
fn server_args(containers: &[Container]) -> Vec<String> {
    let mut args = Vec::new();
    for c in containers {
        let ports = c.ports.as_deref().unwrap_or_default();
        if ports.is_empty() && c.image.as_deref().is_some_and(|i| i.split(['/', ':']).any(|p| p == "nginx")) {
            args.extend(["--http".to_string(), "80".to_string()]);
        }
        for p in ports {
            let name = p.name.as_deref().unwrap_or_default();
            let flag = match p.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => "--udp",
                "SCTP" => continue,
                _ if name.starts_with("echo") => "--echo",
                _ if name.starts_with("sink") => "--sink",
                _ => "--http",
            };
            args.extend([flag.to_string(), p.container_port.to_string()]);
        }
    }
    args
}

async fn start_pod(s: &Arc<Shared>, key: &str, pod: &KubePod) -> Result<()> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = pod.spec.clone().unwrap_or_default();
    let args = server_args(&spec.containers);
    let ip = {
        let pods = s.pods.lock().unwrap();
        let used: BTreeSet<Ipv4Addr> = pods.values().map(|r| r.pod.ip).collect();
        (s.first_host..=254)
            .map(|h| Ipv4Addr::new(10, 244, s.node.pod_net, h))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| KubeletError::Pod { pod: key.into(), msg: "the node's pod CIDR is full".into() })?
    };
    let seq = {
        let mut seq = s.seq.lock().unwrap();
        *seq += 1;
        *seq
    };
    let lab_pod = Pod {
        ns: format!("{}-k{seq}", s.node.ns),
        name: name.clone(),
        ip,
        ip6: None,
        node: s.node.name.clone(),
        host_if: format!("kv{seq}"),
    };
    // Reserved before the slow part, so the address is not handed out twice.
    s.pods.lock().unwrap().insert(
        key.to_string(),
        Running {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod: lab_pod.clone(),
            server: None,
            ready: false,
            terminating: false,
            probes: 0,
        },
    );
    let (node, p2, a2) = (s.node.clone(), lab_pod.clone(), args.clone());
    let server = tokio::task::spawn_blocking(move || sandbox(&node, &p2, &a2))
        .await
        .map_err(|e| KubeletError::Pod { pod: key.into(), msg: e.to_string() })?;
    let server = match server {
        Ok(server) => server,
        Err(msg) => {
            if let Some(mut r) = s.pods.lock().unwrap().remove(key) {
                teardown(&mut r);
            }
            return Err(KubeletError::Pod { pod: key.into(), msg });
        }
    };
    let started = now();
    if let Some(r) = s.pods.lock().unwrap().get_mut(key) {
        r.server = server;
    }
    let probe = spec
        .containers
        .iter()
        .find_map(|c| c.readiness_probe.clone().map(|p| (p, c.ports.clone().unwrap_or_default())));
    let pods: Api<KubePod> = Api::namespaced(s.client.clone(), &namespace);
    match probe {
        None => {
            set_status(&pods, &name, &lab_pod, s.internal_ip, &spec.containers, true, &started).await?;
            if let Some(r) = s.pods.lock().unwrap().get_mut(key) {
                r.ready = true;
            }
        }
        Some((probe, ports)) => {
            set_status(&pods, &name, &lab_pod, s.internal_ip, &spec.containers, false, &started).await?;
            tokio::spawn(probe_loop(
                s.clone(),
                key.to_string(),
                pods,
                lab_pod,
                spec.containers.clone(),
                probe,
                ports,
                started,
            ));
        }
    }
    Ok(())
}

/// Creates the pod's namespace on the node's bridge and starts its server (if it declares
/// ports); returns once the server's sockets are bound.
fn sandbox(node: &crate::Node, pod: &Pod, args: &[String]) -> std::result::Result<Option<Child>, String> {
    let run = |cmd: &[&str]| crate::sh(cmd).map(|_| ()).map_err(|e| format!("{e:#}"));
    let ex = |ns: &str, cmd: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(cmd);
        crate::sh(&full).map(|_| ()).map_err(|e| format!("{e:#}"))
    };
    run(&["ip", "netns", "add", &pod.ns])?;
    ex(&pod.ns, &["ip", "link", "set", "lo", "up"])?;
    run(&[
        "ip",
        "link",
        "add",
        &pod.host_if,
        "netns",
        &node.ns,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod.ns,
    ])?;
    ex(&node.ns, &["ip", "link", "set", &pod.host_if, "master", "cbr0", "up"])?;
    ex(&pod.ns, &["ip", "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
    ex(&pod.ns, &["ip", "link", "set", "eth0", "up"])?;
    ex(&pod.ns, &["ip", "route", "add", "default", "via", &node.gateway.to_string()])?;
    if args.is_empty() {
        return Ok(None);
    }
    let bin = podserver_bin().map_err(|e| format!("{e:#}"))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pod.ns])
        .arg(bin)
        .args(["--name", &pod.name])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting podserver: {e}"))?;
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line);
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("podserver did not start ({args:?}): {line:?}"));
    }
    Ok(Some(child))
}

/// Stops the pod's server and removes its namespace (the veth goes with it).
fn teardown(r: &mut Running) {
    if let Some(mut c) = r.server.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = Command::new("ip").args(["netns", "del", &r.pod.ns]).status();
}

#[allow(clippy::too_many_arguments)]
async fn set_status(
    pods: &Api<KubePod>,
    name: &str,
    pod: &Pod,
    host_ip: Ipv4Addr,
    containers: &[Container],
    ready: bool,
    started: &Time,
) -> Result<()> {
    let t = serde_json::to_value(now()).expect("time");
    let started = serde_json::to_value(started).expect("time");
    let cond = |typ: &str, ok: bool| json!({"type": typ, "status": if ok { "True" } else { "False" }, "lastTransitionTime": t});
    let statuses: Vec<serde_json::Value> = containers
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "", "containerID": format!("netns://{}", pod.ns),
                   "ready": ready, "started": true, "restartCount": 0, "state": {"running": {"startedAt": started}}})
        })
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": host_ip.to_string(), "hostIPs": [{"ip": host_ip.to_string()}],
        "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}],
        "startTime": started,
        "conditions": [cond("PodReadyToStartContainers", true), cond("Initialized", true), cond("ContainersReady", ready), cond("Ready", ready), cond("PodScheduled", true)],
        "containerStatuses": statuses,
    }});
    // Retried: an API server outage must not leave a pod's status behind for good.
    let mut last = None;
    for _ in 0..20 {
        match pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(KubeletError::Api { what: format!("status of pod {name}"), source: last.expect("an error") })
}

#[allow(clippy::too_many_arguments)]
async fn probe_loop(
    s: Arc<Shared>,
    key: String,
    pods: Api<KubePod>,
    pod: Pod,
    containers: Vec<Container>,
    probe: k8s_openapi::api::core::v1::Probe,
    ports: Vec<k8s_openapi::api::core::v1::ContainerPort>,
    started: Time,
) {
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
    let (success_needed, failure_needed) =
        (probe.success_threshold.unwrap_or(1).max(1), probe.failure_threshold.unwrap_or(3).max(1));
    tokio::time::sleep(Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64)).await;
    let (mut ready, mut successes, mut failures) = (false, 0, 0);
    loop {
        if s.pods.lock().unwrap().get(&key).is_none_or(|r| r.pod.ns != pod.ns) {
            return;
        }
        let (node_ns, ip, probe2, ports2) = (s.node.ns.clone(), pod.ip, probe.clone(), ports.clone());
        let ok = tokio::task::spawn_blocking(move || probe_once(&node_ns, ip, &probe2, &ports2)).await.unwrap_or(false);
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let next = if ready { failures < failure_needed } else { successes >= success_needed };
        if next != ready {
            ready = next;
            // Not a new pod's of the same name.
            if let Some(r) = s.pods.lock().unwrap().get_mut(&key).filter(|r| r.pod.ns == pod.ns) {
                r.ready = ready;
            }
            let name = pod.name.clone();
            if let Err(e) = set_status(&pods, &name, &pod, s.internal_ip, &containers, ready, &started).await {
                // Not counted (a probe counts once its result is in the pod's status), and the
                // change is tried again after the next probe.
                tracing::warn!(pod = %key, error = %e, "readiness status");
                ready = !ready;
                if let Some(r) = s.pods.lock().unwrap().get_mut(&key).filter(|r| r.pod.ns == pod.ns) {
                    r.ready = ready;
                }
                tokio::time::sleep(period).await;
                continue;
            }
        }
        if let Some(r) = s.pods.lock().unwrap().get_mut(&key).filter(|r| r.pod.ns == pod.ns) {
            r.probes += 1;
        }
        tokio::time::sleep(period).await;
    }
}

/// One readiness probe from the node, as the kubelet runs it (httpGet: a 2xx or 3xx answer;
/// tcpSocket: a connection). Other probe kinds cannot run here and fail.
fn probe_once(
    node_ns: &str,
    ip: Ipv4Addr,
    probe: &k8s_openapi::api::core::v1::Probe,
    ports: &[k8s_openapi::api::core::v1::ContainerPort],
) -> bool {
    let port = |p: &IntOrString| match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => {
            ports.iter().find(|c| c.name.as_deref() == Some(name)).and_then(|c| u16::try_from(c.container_port).ok())
        }
    };
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let connect =
        |port: u16| crate::in_ns(node_ns, || TcpStream::connect_timeout(&SocketAddr::from((ip, port)), timeout));
    if let Some(h) = &probe.http_get {
        let Some(p) = port(&h.port) else { return false };
        let Ok(Ok(mut c)) = connect(p) else { return false };
        let _ = c.set_read_timeout(Some(timeout));
        let path = h.path.as_deref().unwrap_or("/");
        if write!(c, "GET {path} HTTP/1.0\r\nHost: {ip}:{p}\r\nUser-Agent: kube-probe/1.37\r\n\r\n").is_err() {
            return false;
        }
        let mut resp = String::new();
        let _ = c.read_to_string(&mut resp);
        let code: u16 = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        return (200..400).contains(&code);
    }
    if let Some(t) = &probe.tcp_socket {
        return port(&t.port).is_some_and(|p| matches!(connect(p), Ok(Ok(_))));
    }
    false
}

/// Graceful termination: the pod keeps serving through its `preStop` sleep (bounded by the
/// deletion's grace period), its server then stops, its namespace goes, and the deletion is
/// finished with grace period 0 for this uid.
async fn terminate(s: &Arc<Shared>, key: &str, pod: &KubePod) -> Result<()> {
    if let Some(r) = s.pods.lock().unwrap().get_mut(key) {
        r.terminating = true;
    }
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
    let pre_stop = pod
        .spec
        .as_ref()
        .map(|spec| {
            spec.containers
                .iter()
                .filter_map(|c| {
                    c.lifecycle.as_ref()?.pre_stop.as_ref()?.sleep.as_ref().map(|s| s.seconds.max(0) as u64)
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(pre_stop.min(grace))).await;
    let r = s.pods.lock().unwrap().remove(key);
    if let Some(mut r) = r {
        tokio::task::spawn_blocking(move || teardown(&mut r)).await.ok();
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let pods: Api<KubePod> = Api::namespaced(s.client.clone(), pod.metadata.namespace.as_deref().unwrap_or("default"));
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None }),
        ..Default::default()
    };
    for _ in 0..20 {
        match pods.delete(&name, &dp).await {
            Ok(_) => return Ok(()),
            // Already gone, or a new pod of that name (the precondition).
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
            Err(e) => tracing::debug!(pod = %key, error = %e, "finishing the deletion; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(KubeletError::Pod { pod: key.into(), msg: "could not finish the deletion".into() })
}
