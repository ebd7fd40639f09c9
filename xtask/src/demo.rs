//! The seed lab (section 13-1), replayed on this machine: a node namespace, the three
//! `web-deploy` pods answering with their hostname, a busybox client, and `lb` translating
//! `web-service`'s ClusterIP in the kernel.
use std::{collections::BTreeMap, net::Ipv4Addr, process::Command, time::Duration};

use anyhow::{Context, Result};
use lb_tests::{lab_manifests, with_session_affinity, Lab, Node, Pod};

/// The lab's minikube node address.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 100);
const NODE_PORT_CIP: Ipv4Addr = Ipv4Addr::new(10, 97, 190, 203);

/// The lab's svc-np.yml and pod-np.yml (a Pod lb ignores), and the slice for that pod.
fn node_port_manifests(pod: &Pod) -> String {
    format!(
        r#"---
# svc-np.yml
apiVersion: v1
kind: Service
metadata:
  name: node-port
spec:
  type: NodePort
  clusterIP: {NODE_PORT_CIP}
  ports:
  - port: 8080
    protocol: TCP
    targetPort: 80
    nodePort: 30080
  selector:
    run: node-port
---
# pod-np.yml
apiVersion: v1
kind: Pod
metadata:
  labels:
    run: node-port
  name: node-port
spec:
  containers:
  - image: nginx
    name: nginx
    ports:
    - containerPort: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: node-port-lab
  labels:
    kubernetes.io/service-name: node-port
addressType: IPv4
ports:
- port: 80
  protocol: TCP
endpoints:
- addresses: ["{}"]
  nodeName: minikube
"#,
        pod.ip
    )
}

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 104, 123, 59);
const PODS: [&str; 3] = ["web-deploy-66fbbff65d-5lgpk", "web-deploy-66fbbff65d-d6xt6", "web-deploy-66fbbff65d-dwvk4"];

pub(crate) fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

pub fn demo() -> Result<()> {
    let mut lab = Lab::new()?;
    step("node `minikube` (192.168.49.2) with pod network 10.244.1.0/24; kubectl apply -f deploy.yml");
    let node = lab.add_node("minikube", 1)?;
    let wire = lab.add_underlay()?;
    lab.connect_nodes(&wire, &[(&node, NODE_IP)])?;
    let outside = lab.add_outside(&wire, "outside", OUTSIDE_IP)?;
    let mut web: Vec<Pod> = Vec::new();
    for (i, name) in PODS.iter().enumerate() {
        let pod = lab.add_pod(&node, name, 11 + i as u8)?;
        // `hostname > /usr/share/nginx/html/index.html`: each pod answers with its name.
        lab.serve(&pod, &[80], &[], &[])?;
        println!("pod/{name:<32} 1/1  Running  {}", pod.ip);
        web.push(pod);
    }
    let busybox = lab.add_pod(&node, "busybox", 100)?;
    let np_pod = lab.add_pod(&node, "node-port", 20)?;
    lab.serve(&np_pod, &[80], &[], &[])?;
    lab.add_hosts(&busybox, &[(CLUSTER_IP, "web-service web-service.default web-service.default.svc.cluster.local")])?;
    println!("pod/{:<32} 1/1  Running  {}", "busybox", busybox.ip);

    step("kubectl apply -f svc.yml");
    let ready: Vec<(&Pod, bool)> = web.iter().map(|p| (p, true)).collect();
    lab.write_manifests(&node, &lab_manifests(CLUSTER_IP, &ready, &[]))?;
    println!("service/web-service   ClusterIP   {CLUSTER_IP}   <none>   80/TCP");
    println!("(manifests: {})", node.manifests.join("lab.yaml").display());

    step("lb run --manifests ... --node-name minikube (the eBPF datapath replaces kube-proxy)");
    let ifaces = ["cbr0", "eth0", web[0].host_if.as_str(), busybox.host_if.as_str()];
    let node_ip = NODE_IP.to_string();
    lab.start_agent(&node, &ifaces, 1, &["--node-ip", &node_ip, "--xdp-iface", "eth0"])?;
    println!("attached to {ifaces:?}");
    print!("{}", lab.list(&node, "services")?);
    print!("{}", lab.list(&node, "backends")?);

    step("kubectl run -it busybox ... sh;  / # while true; do wget -q -O - http://web-service; sleep 1; done");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let out = Command::new("ip")
            .args(["netns", "exec", &busybox.ns, "curl", "-sS", "--max-time", "3", "http://web-service"])
            .output()
            .context("running curl in the busybox pod")?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let shown =
            if out.status.success() { body.clone() } else { String::from_utf8_lossy(&out.stderr).trim().to_string() };
        println!("{shown}");
        *seen.entry(body).or_default() += 1;
        std::thread::sleep(Duration::from_millis(300));
    }

    step("lb list conntrack (live flows, both directions)");
    let ct = lab.list(&node, "conntrack")?;
    for line in ct.lines().take(7) {
        println!("{line}");
    }
    step("sessionAffinity: ClientIP with timeoutSeconds: 60 added to svc.yml; kubectl apply -f svc.yml");
    lab.write_manifests(&node, &with_session_affinity(&lab_manifests(CLUSTER_IP, &ready, &[]), 60))?;
    wait_for(&lab, &node, "ClientIP/60s")?;
    print!("{}", lab.list(&node, "services")?);
    step("/ # while true; do wget -q -O - http://web-service; sleep 1; done   (same busybox, affinity on)");
    let pinned = wget_loop(&busybox)?;
    step("lb list affinity");
    print!("{}", lab.list(&node, "affinity")?);

    step("kubectl apply -f svc-np.yml -f pod-np.yml   (NodePort 8080:30080)");
    let ready: Vec<(&Pod, bool)> = web.iter().map(|p| (p, true)).collect();
    let all = with_session_affinity(&lab_manifests(CLUSTER_IP, &ready, &[]), 60) + &node_port_manifests(&np_pod);
    lab.write_manifests(&node, &all)?;
    wait_for(&lab, &node, "*:30080/TCP")?;
    print!("{}", lab.list(&node, "services")?);
    step(&format!("from outside the cluster ({OUTSIDE_IP}): curl http://{NODE_IP}:30080"));
    let np = curl(&outside, &format!("http://{NODE_IP}:30080"))?;
    println!("{np}");
    step(&format!(
        "curl http://{NODE_PORT_CIP}:30080   (the ClusterIP with the node port: the lab found it does not answer)"
    ));
    println!("{}", curl(&busybox, &format!("http://{NODE_PORT_CIP}:30080"))?);

    step("summary");
    println!(
        "without affinity, 10 requests to http://web-service ({CLUSTER_IP}:80) reached {} pods: {seen:?}",
        seen.len()
    );
    println!("with sessionAffinity: ClientIP, 10 requests reached {} pod: {pinned:?}", pinned.len());
    println!("from outside, {NODE_IP}:30080 answered {np:?}");
    println!("(all namespaces, programs and pins of the demo are removed on exit)");
    Ok(())
}

/// `curl URL` inside `pod`'s namespace: the body, or curl's error.
pub(crate) fn curl(pod: &Pod, url: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.ns, "curl", "-sS", "--max-time", "3", url])
        .output()
        .with_context(|| format!("running curl in {}", pod.name))?;
    Ok(if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    })
}

/// The lab's `while true; do wget -q -O - http://web-service; sleep 1; done`, 10 rounds.
fn wget_loop(busybox: &Pod) -> Result<BTreeMap<String, usize>> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let body = curl(busybox, "http://web-service")?;
        println!("{body}");
        *seen.entry(body).or_default() += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(seen)
}

/// Waits until `lb list services` shows `text` (the agent applies changes within a second).
fn wait_for(lab: &Lab, node: &Node, text: &str) -> Result<()> {
    for _ in 0..50 {
        if lab.list(node, "services")?.contains(text) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the agent did not apply the change within 5 s")
}
