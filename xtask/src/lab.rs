//! `cargo xtask lab --real`: the seed lab replayed against a real control plane. kube-apiserver,
//! kube-controller-manager and kube-scheduler (built by `cargo xtask k8s`) run on loopback in a
//! namespace of their own; two lab nodes (`minikube`, `minikube-m02`) run the netns kubelet and
//! `lb` as the DaemonSet runs it (its RBAC, a real service-account token, the config map's
//! config); the lab's own YAML (`deploy/lab/seed/`) goes in with `kubectl apply -f`. Every step
//! is checked; a step that misbehaves fails the command. Everything is removed on exit.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{
    control_plane::{ControlPlane, API_ADDR, API_PORT},
    kubelet::{Kubelet, KubeletConfig},
    Lab, Node, Pod,
};

use crate::{
    demo::{curl, step},
    workspace_root,
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 3);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 100);
/// What a cloud controller (or MetalLB) would give `load-bal`; announced through NODE_A.
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 240);

struct Cluster {
    // Dropped in this order: kubelets (pods), the lab (agents, nodes), the control plane.
    kubelets: Vec<Kubelet>,
    lab: Lab,
    cp: ControlPlane,
    nodes: Vec<Node>,
    outside: Pod,
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        Ok(self.cp.kubectl(args)?)
    }

    /// Prints `kubectl ARGS` and its output, as typed in the lab.
    fn show(&self, args: &[&str]) -> Result<String> {
        println!("$ kubectl {}", args.join(" "));
        let out = self.kubectl(args)?;
        print!("{out}");
        Ok(out)
    }

    fn apply(&self, file: &str) -> Result<()> {
        let path = workspace_root().join("deploy/lab/seed").join(file);
        println!("$ kubectl apply -f {file}");
        print!("{}", self.kubectl(&["apply", "-f", path.to_str().expect("utf-8 path")])?);
        Ok(())
    }

    /// The pod `default/name` wherever it was scheduled.
    fn pod(&self, name: &str) -> Result<Pod> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(p) = self.kubelets.iter().find_map(|k| k.pod("default", name)) {
                let kubelet = self.kubelets.iter().find(|k| k.node_name == p.node).expect("its kubelet");
                return Ok(kubelet.wait_pod("default", name, Duration::from_secs(60))?);
            }
            if Instant::now() > deadline {
                bail!("pod {name} is not running on any node after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("a lab node")
    }

    /// Waits until the agent on `node` shows `text` in `lb list services`.
    fn wait_programmed(&self, node: &Node, text: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.lab.list(node, "services")?.contains(text) {
            if Instant::now() > deadline {
                bail!(
                    "lb on {} did not program {text} within 20 s:\n{}\nagent log:\n{}",
                    node.name,
                    self.lab.list(node, "services")?,
                    self.lab.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

/// 10 rounds of the lab's `wget -q -O - http://web-service` from `pod`.
fn wget_loop(pod: &Pod, url: &str) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let body = curl(pod, url)?;
        println!("{body}");
        *seen.entry(body).or_insert(0) += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(seen)
}

fn start() -> Result<Cluster> {
    step("control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built from source by `cargo xtask k8s`)");
    let started = Instant::now();
    let mut cp = ControlPlane::start()?;
    println!("serving https://{API_ADDR}:{API_PORT} after {:.1} s", started.elapsed().as_secs_f64());
    print!("{}", cp.kubectl(&["version"])?);

    step("two nodes, minikube (192.168.49.2) and minikube-m02 (192.168.49.3), each with the netns kubelet");
    let mut lab = Lab::new()?;
    let a = lab.add_node("minikube", 1)?;
    let b = lab.add_node("minikube-m02", 2)?;
    let wire = lab.add_underlay()?;
    lab.connect_nodes(&wire, &[(&a, NODE_A), (&b, NODE_B)])?;
    let outside = lab.add_outside(&wire, "outside", OUTSIDE)?;
    let mut kubelets = Vec::new();
    for (n, ip) in [(&a, NODE_A), (&b, NODE_B)] {
        cp.attach(&n.ns)?;
        kubelets.push(Kubelet::start(&cp, n, KubeletConfig::new(ip))?);
    }
    let c = Cluster { kubelets, lab, cp, nodes: vec![a, b], outside };
    c.show(&["get", "nodes", "-o", "wide"])?;

    step("lb as the DaemonSet runs it: deploy/rbac.yaml, a service-account token, the config map's config.yaml");
    let deploy = workspace_root().join("deploy");
    c.show(&["apply", "-f", deploy.join("rbac.yaml").to_str().expect("utf-8 path")])?;
    Ok(c)
}

/// Starts `lb run` on every node as the DaemonSet's container: in-cluster client (the token
/// and CA mounted where a kubelet mounts them, `KUBERNETES_SERVICE_HOST` at the API server),
/// `--config` with the config map's file, and the node's names for the lab's wiring.
fn start_agents(c: &mut Cluster) -> Result<()> {
    let deploy = workspace_root().join("deploy");
    let token = c.kubectl(&["create", "token", "lb", "-n", "kube-system", "--duration", "2h"])?;
    let sa = c.lab.dir.join("serviceaccount");
    std::fs::create_dir_all(&sa)?;
    std::fs::write(sa.join("token"), token.trim())?;
    std::fs::copy(&c.cp.ca_file, sa.join("ca.crt")).context("copying the cluster CA")?;
    std::fs::write(sa.join("namespace"), "kube-system")?;
    // The config map goes into the cluster; the agent gets its file as the volume would hold it.
    c.show(&["apply", "-f", deploy.join("config.yaml").to_str().expect("utf-8 path")])?;
    let config =
        c.kubectl(&["get", "configmap", "lb-config", "-n", "kube-system", "-o", "jsonpath={.data.config\\.yaml}"])?;
    let config_path = c.lab.dir.join("config.yaml");
    std::fs::write(&config_path, config)?;
    let home = c.lab.dir.join("home");
    std::fs::create_dir_all(&home)?;
    c.lab.agent_env = vec![
        ("KUBERNETES_SERVICE_HOST".into(), API_ADDR.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), API_PORT.to_string()),
        ("HOME".into(), home.to_str().expect("utf-8 path").into()),
    ];
    // The kubelet's service-account mount, in a mount namespace of the agent's own.
    let script = "set -e; mount -t tmpfs tmpfs /run; d=/run/secrets/kubernetes.io/serviceaccount; \
                  mkdir -p $d; cp \"$0\"/token \"$0\"/ca.crt \"$0\"/namespace $d/; exec \"$@\"";
    c.lab.agent_wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        .iter()
        .map(|s| s.to_string())
        .chain([sa.to_str().expect("utf-8 path").to_string()])
        .collect();
    let cgroup = lb_tests::sh(&["findmnt", "-n", "-o", "TARGET", "-t", "cgroup2"])?;
    let cgroup = cgroup.lines().next().unwrap_or("/sys/fs/cgroup").to_string();
    for (node, ip) in [(c.nodes[0].clone(), NODE_A), (c.nodes[1].clone(), NODE_B)] {
        let ip = ip.to_string();
        // The config map's pin directory and cgroup are the host's; the lab has its own. The
        // lab's nodes have no default route to take the node IP and external interface from.
        let args = [
            "--config",
            config_path.to_str().expect("utf-8 path"),
            "--cgroup",
            &cgroup,
            "--node-ip",
            &ip,
            "--xdp-iface",
            "eth0",
        ];
        c.lab.spawn_agent(&node, &[], &args)?;
        // The `kubernetes` Service is there from the start.
        c.lab.wait_agent(&node, &["cbr0", "eth0"], 1)?;
        println!("lb on {}: ready", node.name);
    }
    print!("{}", c.lab.list(&c.nodes[0], "services")?);
    Ok(())
}

pub fn real() -> Result<()> {
    let mut c = start()?;
    start_agents(&mut c)?;

    step("kubectl apply -f deploy.yml   (3 nginx pods; the kubelet serves each pod's name on port 80)");
    c.apply("deploy.yml")?;
    c.show(&["rollout", "status", "deployment/web-deploy", "--timeout=120s"])?;
    c.show(&["get", "pods", "-o", "wide"])?;

    step("kubectl apply -f svc.yml");
    c.apply("svc.yml")?;
    let cip = c.kubectl(&["get", "svc", "web-service", "-o", "jsonpath={.spec.clusterIP}"])?;
    let cip: Ipv4Addr = cip.trim().parse().with_context(|| format!("web-service's ClusterIP {cip:?}"))?;
    c.show(&["get", "svc", "web-service"])?;
    c.show(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web-service"])?;

    step("kubectl run busybox --image=busybox --restart=Never -- sleep infinity");
    c.show(&["run", "busybox", "--image=busybox", "--restart=Never", "--", "sleep", "infinity"])?;
    let busybox = c.pod("busybox")?;
    println!("busybox runs on {} at {}", busybox.node, busybox.ip);
    // No cluster DNS here: the name resolves through the pod's /etc/hosts.
    c.lab.add_hosts(&busybox, &[(cip, "web-service web-service.default web-service.default.svc.cluster.local")])?;
    let on = c.node(&busybox.node).clone();
    c.wait_programmed(&on, &format!("{cip}:80/TCP"))?;

    step("/ # while true; do wget -q -O - http://web-service; sleep 1; done");
    let spread = wget_loop(&busybox, "http://web-service")?;
    if spread.len() < 2 || !spread.keys().all(|k| k.starts_with("web-deploy-")) {
        bail!("web-service should spread over the web-deploy pods: {spread:?}");
    }

    step("sessionAffinity: ClientIP, timeoutSeconds: 60 added to svc.yml; kubectl apply -f svc-affinity.yml");
    c.apply("svc-affinity.yml")?;
    c.wait_programmed(&on, "ClientIP/60s")?;
    print!("{}", c.lab.list(&on, "services")?);
    step("/ # while true; do wget -q -O - http://web-service; sleep 1; done   (affinity on)");
    let pinned = wget_loop(&busybox, "http://web-service")?;
    if pinned.len() != 1 {
        bail!("with sessionAffinity: ClientIP one pod should answer: {pinned:?}");
    }

    step("kubectl apply -f svc-np.yml; kubectl apply -f pod-np.yml   (NodePort 8080:30080)");
    c.apply("svc-np.yml")?;
    c.apply("pod-np.yml")?;
    c.pod("node-port")?;
    c.show(&["get", "svc", "node-port"])?;
    let np_cip = c.kubectl(&["get", "svc", "node-port", "-o", "jsonpath={.spec.clusterIP}"])?;
    for n in &c.nodes {
        c.wait_programmed(n, "*:30080/TCP")?;
    }
    let outside = c.outside.clone();
    for ip in [NODE_A, NODE_B] {
        println!("(outside, {OUTSIDE})$ curl http://{ip}:30080");
        let got = curl(&outside, &format!("http://{ip}:30080"))?;
        println!("{got}");
        if got != "node-port" {
            bail!("node port 30080 on {ip} answered {got:?}");
        }
    }
    println!(
        "(busybox)$ curl http://{np_cip}:30080   (the ClusterIP with the node port: the lab found it does not answer)"
    );
    let got = curl(&busybox, &format!("http://{np_cip}:30080"))?;
    println!("{got}");
    if got == "node-port" {
        bail!("{np_cip}:30080 answered; only the node addresses serve node ports");
    }

    step("kubectl apply -f svc-lb.yml; kubectl apply -f pod-lb.yml   (LoadBalancer 8080:30088)");
    c.apply("svc-lb.yml")?;
    c.apply("pod-lb.yml")?;
    c.pod("load-bal")?;
    let shown = c.show(&["get", "svc", "load-bal"])?;
    if !shown.contains("<pending>") {
        bail!("load-bal should be pending before a load balancer answers: {shown}");
    }
    c.wait_programmed(&c.nodes[0], "*:30088/TCP")?;
    println!("(outside)$ curl http://{NODE_A}:30088   (pending: its node port works, as in the lab)");
    let got = curl(&outside, &format!("http://{NODE_A}:30088"))?;
    println!("{got}");
    if got != "load-bal" {
        bail!("node port 30088 answered {got:?}");
    }
    step(&format!("a cloud controller assigns {LB_IP} (status subresource), announced through minikube"));
    let patch = format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}"}}]}}}}}}"#);
    c.show(&["patch", "svc", "load-bal", "--subresource=status", "--type=merge", "-p", &patch])?;
    c.show(&["get", "svc", "load-bal"])?;
    c.lab.exec(&outside.ns, &["ip", "route", "add", &format!("{LB_IP}/32"), "via", &NODE_A.to_string()])?;
    c.wait_programmed(&c.nodes[0], &format!("{LB_IP}:8080/TCP"))?;
    println!("(outside)$ curl http://{LB_IP}:8080");
    let got = curl(&outside, &format!("http://{LB_IP}:8080"))?;
    println!("{got}");
    if got != "load-bal" {
        bail!("the LoadBalancer IP answered {got:?}");
    }

    step("kubectl apply -f external.yml   (ExternalName: a DNS alias, nothing to translate)");
    let before = c.lab.list(&c.nodes[0], "services")?.lines().count();
    c.apply("external.yml")?;
    c.show(&["get", "svc", "google-svc"])?;
    step("kubectl apply -f svc-headless.yml   (clusterIP: None: the slice lists the pods, no virtual address)");
    c.apply("svc-headless.yml")?;
    c.show(&["get", "svc", "web-headless"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let slices = c.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web-headless",
            "-o",
            "jsonpath={range .items[*].endpoints[*]}{.addresses[0]} {end}",
        ])?;
        if slices.split_whitespace().count() == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("web-headless's EndpointSlice does not list the three pods: {slices:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    c.show(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web-headless"])?;
    // lb watches Services in order: once a Service created after these two is programmed, it
    // has seen them.
    c.show(&["create", "service", "clusterip", "lab-sentinel", "--tcp=81"])?;
    let sentinel = c.kubectl(&["get", "svc", "lab-sentinel", "-o", "jsonpath={.spec.clusterIP}"])?;
    c.wait_programmed(&c.nodes[0], &format!("{sentinel}:81/TCP"))?;
    let services = c.lab.list(&c.nodes[0], "services")?;
    print!("{services}");
    if services.lines().count() != before + 1 || services.contains("google") || services.contains("web-headless") {
        bail!("ExternalName and headless Services must program nothing:\n{services}");
    }
    c.show(&["delete", "service", "lab-sentinel"])?;

    step("summary");
    println!("ClusterIP web-service ({cip}:80): 10 requests reached {} pods: {spread:?}", spread.len());
    println!("with sessionAffinity: ClientIP: {pinned:?}");
    println!("NodePort 30080 answered on both nodes from outside; {np_cip}:30080 did not (as the lab found)");
    println!("LoadBalancer: node port 30088 while pending, then {LB_IP}:8080 once assigned");
    println!("ExternalName and headless: in the API, nothing programmed by lb");
    println!("(the control plane, kubelets, agents, namespaces, programs and pins are removed on exit)");
    Ok(())
}
