//! A Kubernetes-like lab in network namespaces: nodes (a namespace with a `cbr0` bridge for its
//! pod CIDR, like kubenet), pods (a namespace each, joined to their node by a veth), underlay
//! links between nodes, `lb` agents in node namespaces, and `podserver` backends.
//!
//! Everything a `Lab` creates is removed when it is dropped, also when a test panics:
//! processes are killed, pin directories (and so the attached programs) removed, namespaces
//! deleted. Only addresses inside these namespaces are used.
//!
//! A dual-stack lab (`Lab::dual_stack`) gives every node, pod, underlay port and outside
//! client an IPv6 address beside its IPv4 one: the IPv4 address's twin in the ULA prefix
//! `fd00::/16` ([`twin6`]: `10.244.1.11` is `fd00:af4:1::b`, each IPv4 /24 a /64), with
//! duplicate address detection off so addresses are usable at once, and IPv6 forwarding on in
//! the nodes.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

pub mod apiserver;
pub mod control_plane;
pub mod fuzz;
pub mod kubelet;
pub mod packet;
pub mod packet6;

/// True when privileged tests can run. Not root: skip, unless CI=true, where that is a failure.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "end-to-end tests need root; under CI=true they may not skip"
    );
    eprintln!("skipping: end-to-end tests need root");
    false
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// The `lb` binary: `$LB_BIN`, else the newest of target/{debug,release}/lb, refused if a
/// source it is built from is newer: `cargo test -p lb-tests` does not build it (it is
/// another package's binary), and a stale one would test the code before the change.
pub fn lb_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("LB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target =
        std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("target"));
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let bin = ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("lb"))
        .filter(|p| p.exists())
        .max_by_key(|p| modified(p))
        .ok_or_else(|| {
            anyhow!("the lb binary is not built: run `cargo build -p lb-userspace` (cargo xtask test does)")
        })?;
    let built = modified(&bin);
    let crates = ["lb-userspace", "lb-ebpf", "lb-common"].map(|d| workspace_root().join(d));
    let newest = crates.iter().flat_map(|c| {
        let manifests = ["Cargo.toml", "build.rs"].map(|f| c.join(f));
        newest_file(&c.join("src"))
            .into_iter()
            .chain(manifests.into_iter().filter_map(|f| Some((f.clone(), modified(&f)?))))
    });
    if let Some(newer) = newest.into_iter().find(|(_, t)| Some(*t) > built) {
        bail!(
            "{} is older than {}: run `cargo build -p lb-userspace --bins` (cargo xtask test does), or set LB_BIN",
            bin.display(),
            newer.0.display()
        );
    }
    Ok(bin)
}

/// The most recently modified Rust source under `dir`, and when (an editor's swap file is no
/// source: cargo would not rebuild for it).
fn newest_file(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    for entry in fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
        let path = entry.path();
        let found = if path.is_dir() {
            newest_file(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            fs::metadata(&path).and_then(|m| m.modified()).ok().map(|t| (path, t))
        } else {
            None
        };
        if let Some(f) = found {
            if newest.as_ref().is_none_or(|n| f.1 > n.1) {
                newest = Some(f);
            }
        }
    }
    newest
}

/// The `podserver` binary, built next to the test binaries.
pub fn podserver_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PODSERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("podserver");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("podserver is not built: run `cargo build -p lb-tests` (cargo xtask test does)")
}

pub fn sh(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The IPv6 twin of an IPv4 address in a dual-stack lab: `a.b.c.d` is
/// `fd00:{a}{b}:{c}::{d}` (hexadecimal), so an IPv4 /24 maps to an IPv6 /64 and the host part
/// stays the last byte.
pub fn twin6(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::new(0xfd00, u16::from_be_bytes([a, b]), c as u16, 0, 0, 0, 0, d as u16)
}

/// A node namespace: its name, pod gateway and the pod CIDR prefix `10.244.N`.
#[derive(Clone, Debug)]
pub struct Node {
    pub ns: String,
    pub name: String,
    pub gateway: Ipv4Addr,
    /// The pod gateway's IPv6 twin in a dual-stack lab (pod CIDR `twin6(10.244.N.0)/64`).
    pub gateway6: Option<Ipv6Addr>,
    pub pod_net: u8,
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
}

/// The switch namespace of an underlay.
pub struct Underlay {
    pub ns: String,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub ns: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (`twin6(ip)`) in a dual-stack lab.
    pub ip6: Option<Ipv6Addr>,
    pub node: String,
    /// The pod's veth in its node's namespace (empty outside the cluster).
    pub host_if: String,
}

pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    pin_dirs: Vec<PathBuf>,
    etc_dirs: Vec<PathBuf>,
    pub dir: PathBuf,
    veth_seq: u32,
    /// A command the agent is run under, inside its node's namespace (e.g. `setpriv` with the
    /// DaemonSet's capabilities).
    pub agent_wrapper: Vec<String>,
    /// Extra environment of the agent.
    pub agent_env: Vec<(String, String)>,
    /// Every namespace gets IPv6 addresses too (`dual_stack`).
    ipv6: bool,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let prefix = format!("lbt{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
            pin_dirs: Vec::new(),
            etc_dirs: Vec::new(),
            dir,
            veth_seq: 0,
            agent_wrapper: Vec::new(),
            agent_env: Vec::new(),
            ipv6: false,
        })
    }

    /// A lab whose nodes, pods, underlay ports and outside clients all have an IPv6 address
    /// (the twin of their IPv4 one, [`twin6`]) beside their IPv4 one.
    pub fn dual_stack() -> Result<Self> {
        let mut lab = Self::new()?;
        lab.ipv6 = true;
        Ok(lab)
    }

    pub fn is_dual_stack(&self) -> bool {
        self.ipv6
    }

    fn add_ns(&mut self, short: &str) -> Result<String> {
        let ns = format!("{}-{short}", self.prefix);
        sh(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        if self.ipv6 {
            // Before any device exists, so every interface inherits them: no duplicate address
            // detection (an address is usable the moment it is added, link-local ones too), and
            // no redirects taken, which could teach a pod a path around the translation.
            for kv in [
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.default.accept_redirects=0",
            ] {
                self.sysctl(&ns, kv)?;
            }
        }
        self.exec(&ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adds `ip`/64 to `dev` in `ns`, usable at once (no duplicate address detection).
    fn add_addr6(&self, ns: &str, ip: Ipv6Addr, dev: &str) -> Result<()> {
        self.exec(ns, &["ip", "-6", "addr", "add", &format!("{ip}/64"), "dev", dev, "nodad"]).map(|_| ())
    }

    /// Runs a command in a namespace and returns its stdout.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(cmd);
        sh(&full)
    }

    fn sysctl(&self, ns: &str, kv: &str) -> Result<()> {
        self.exec(ns, &["sysctl", "-qw", kv]).map(|_| ())
    }

    /// A node with pod network 10.244.`pod_net`.0/24 on bridge cbr0 (gateway .1).
    pub fn add_node(&mut self, name: &str, pod_net: u8) -> Result<Node> {
        let ns = self.add_ns(name)?;
        // Before any device exists, so every interface inherits it: a node that forwards a
        // translated packet out of the interface it came in on must not send ICMP redirects,
        // which would teach the sender a path that bypasses the translation.
        self.sysctl(&ns, "net.ipv4.conf.default.send_redirects=0")?;
        let gw = Ipv4Addr::new(10, 244, pod_net, 1);
        self.exec(&ns, &["ip", "link", "add", "cbr0", "type", "bridge"])?;
        self.exec(&ns, &["ip", "addr", "add", &format!("{gw}/24"), "dev", "cbr0"])?;
        self.exec(&ns, &["ip", "link", "set", "cbr0", "up"])?;
        self.sysctl(&ns, "net.ipv4.ip_forward=1")?;
        // Translated pod-to-pod traffic leaves cbr0 the way it came in; an ICMP redirect for
        // it would teach the client a route that bypasses nothing and only confuses.
        self.sysctl(&ns, "net.ipv4.conf.all.send_redirects=0")?;
        self.sysctl(&ns, "net.ipv4.conf.cbr0.send_redirects=0")?;
        let gateway6 = if self.ipv6 {
            let gw6 = twin6(gw);
            self.add_addr6(&ns, gw6, "cbr0")?;
            self.sysctl(&ns, "net.ipv6.conf.all.forwarding=1")?;
            Some(gw6)
        } else {
            None
        };
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-{name}", self.prefix));
        self.pin_dirs.push(pin_dir.clone());
        let manifests = self.dir.join(format!("{name}-manifests"));
        fs::create_dir_all(&manifests)?;
        Ok(Node { ns, name: name.to_string(), gateway: gw, gateway6, pod_net, pin_dir, manifests })
    }

    /// A pod namespace on `node` with address 10.244.N.`host`, default route via the node.
    pub fn add_pod(&mut self, node: &Node, name: &str, host: u8) -> Result<Pod> {
        self.veth_seq += 1;
        let short = format!("p{}", self.veth_seq);
        let ns = self.add_ns(&short)?;
        let host_if = format!("veth{}", self.veth_seq);
        let ip = Ipv4Addr::new(10, 244, node.pod_net, host);
        sh(&["ip", "link", "add", &host_if, "netns", &node.ns, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        self.exec(&node.ns, &["ip", "link", "set", &host_if, "master", "cbr0", "up"])?;
        self.exec(&ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        self.exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
        self.exec(&ns, &["ip", "route", "add", "default", "via", &node.gateway.to_string()])?;
        let ip6 = match node.gateway6 {
            Some(gw6) => {
                let ip6 = twin6(ip);
                self.add_addr6(&ns, ip6, "eth0")?;
                self.exec(&ns, &["ip", "-6", "route", "add", "default", "via", &gw6.to_string()])?;
                Some(ip6)
            }
            None => None,
        };
        Ok(Pod { ns, name: name.to_string(), ip, ip6, node: node.name.clone(), host_if })
    }

    /// A switch: a namespace with bridge `br0` that nodes and outside clients join.
    pub fn add_underlay(&mut self) -> Result<Underlay> {
        let ns = self.add_ns("sw")?;
        self.exec(&ns, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(&ns, &["ip", "link", "set", "br0", "up"])?;
        Ok(Underlay { ns })
    }

    /// Plugs `ns` into the switch as `eth0` with `ip`/24 (and `twin6(ip)`/64 in a dual-stack
    /// lab). Offloads stay as Linux sets them on a
    /// veth (tx checksum offload on, GRO off), as on every kind node: packets on this "wire"
    /// may be CHECKSUM_PARTIAL, and the datapath must cope.
    pub fn plug(&mut self, ul: &Underlay, ns: &str, ip: Ipv4Addr) -> Result<()> {
        self.veth_seq += 1;
        let port = format!("sw{}", self.veth_seq);
        sh(&["ip", "link", "add", &port, "netns", &ul.ns, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        self.exec(&ul.ns, &["ip", "link", "set", &port, "master", "br0", "up"])?;
        self.exec(ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        if self.ipv6 {
            self.add_addr6(ns, twin6(ip), "eth0")?;
        }
        self.exec(ns, &["ip", "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// A machine outside the cluster on the underlay (the lab's "curl from outside").
    pub fn add_outside(&mut self, ul: &Underlay, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        let ns = self.add_ns(name)?;
        self.plug(ul, &ns, ip)?;
        let ip6 = self.ipv6.then(|| twin6(ip));
        Ok(Pod { ns, name: name.to_string(), ip, ip6, node: String::new(), host_if: String::new() })
    }

    /// Plugs every node into the switch with its address, and routes each node's pod network
    /// to the others through it.
    pub fn connect_nodes(&mut self, ul: &Underlay, nodes: &[(&Node, Ipv4Addr)]) -> Result<()> {
        for (n, ip) in nodes {
            self.plug(ul, &n.ns, *ip)?;
        }
        for (n, _) in nodes {
            for (other, other_ip) in nodes {
                if other.name != n.name {
                    self.exec(
                        &n.ns,
                        &[
                            "ip",
                            "route",
                            "add",
                            &format!("10.244.{}.0/24", other.pod_net),
                            "via",
                            &other_ip.to_string(),
                        ],
                    )?;
                    if self.ipv6 {
                        let net6 = twin6(Ipv4Addr::new(10, 244, other.pod_net, 0));
                        let via6 = twin6(*other_ip).to_string();
                        self.exec(&n.ns, &["ip", "-6", "route", "add", &format!("{net6}/64"), "via", &via6])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Joins two nodes by an underlay veth (`ul0` on each, 10.100.0.0/24) and routes each
    /// node's pod CIDR over it.
    pub fn link_nodes(&mut self, a: &Node, b: &Node) -> Result<()> {
        sh(&["ip", "link", "add", "ul0", "netns", &a.ns, "type", "veth", "peer", "name", "ul0", "netns", &b.ns])?;
        for (n, other, ip, peer) in [(a, b, "10.100.0.1", "10.100.0.2"), (b, a, "10.100.0.2", "10.100.0.1")] {
            self.exec(&n.ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "ul0"])?;
            if self.ipv6 {
                self.add_addr6(&n.ns, twin6(ip.parse()?), "ul0")?;
            }
            self.exec(&n.ns, &["ip", "link", "set", "ul0", "up"])?;
            self.exec(&n.ns, &["ip", "route", "add", &format!("10.244.{}.0/24", other.pod_net), "via", peer])?;
            if self.ipv6 {
                let net6 = twin6(Ipv4Addr::new(10, 244, other.pod_net, 0));
                let via6 = twin6(peer.parse()?).to_string();
                self.exec(&n.ns, &["ip", "-6", "route", "add", &format!("{net6}/64"), "via", &via6])?;
            }
        }
        Ok(())
    }

    fn spawn(&mut self, what: &str, cmd: &mut Command) -> Result<&mut Child> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        self.children.push((what.to_string(), child));
        Ok(&mut self.children.last_mut().expect("just pushed").1)
    }

    /// Starts a `podserver` in the pod and waits until its sockets are bound.
    pub fn serve(&mut self, pod: &Pod, http: &[u16], echo: &[u16], udp: &[u16]) -> Result<()> {
        self.serve_with(pod, http, echo, udp, &[])
    }

    /// `serve` with sink ports too (read and discard, for bulk throughput).
    pub fn serve_with(&mut self, pod: &Pod, http: &[u16], echo: &[u16], udp: &[u16], sink: &[u16]) -> Result<()> {
        self.serve_args(pod, http, echo, udp, sink, &[])
    }

    /// `serve_with` plus raw podserver arguments (`--udp-echo`, `--count`, `--source`).
    pub fn serve_args(
        &mut self,
        pod: &Pod,
        http: &[u16],
        echo: &[u16],
        udp: &[u16],
        sink: &[u16],
        extra: &[&str],
    ) -> Result<()> {
        let bin = podserver_bin()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.ns]).arg(bin).args(["--name", &pod.name]).args(extra);
        if self.ipv6 && !extra.contains(&"--bind") {
            // One socket per port for both families (IPv4 clients as IPv4-mapped addresses).
            cmd.args(["--bind", "::"]);
        }
        for p in http {
            cmd.args(["--http", &p.to_string()]);
        }
        for p in echo {
            cmd.args(["--echo", &p.to_string()]);
        }
        for p in udp {
            cmd.args(["--udp", &p.to_string()]);
        }
        for p in sink {
            cmd.args(["--sink", &p.to_string()]);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let child = self.spawn(&format!("podserver {}", pod.name), &mut cmd)?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("podserver {} did not start: {line:?}", pod.name);
        }
        Ok(())
    }

    /// Starts `lb run` in the node's network namespace (host mount namespace, so it pins on
    /// the real bpffs) and waits until it has attached to `ifaces` and programmed
    /// `services` frontends.
    pub fn start_agent(&mut self, node: &Node, ifaces: &[&str], services: usize, extra: &[&str]) -> Result<()> {
        let manifests = node.manifests.to_str().expect("utf-8 path").to_string();
        self.start_agent_from(node, ifaces, services, &["--manifests", &manifests], extra)
    }

    /// As `start_agent`, with the agent watching an API server through `kubeconfig`.
    pub fn start_agent_kube(
        &mut self,
        node: &Node,
        ifaces: &[&str],
        services: usize,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<()> {
        let kc = kubeconfig.to_str().expect("utf-8 path").to_string();
        self.start_agent_from(node, ifaces, services, &["--kubeconfig", &kc], extra)
    }

    fn start_agent_from(
        &mut self,
        node: &Node,
        ifaces: &[&str],
        services: usize,
        source: &[&str],
        extra: &[&str],
    ) -> Result<()> {
        self.spawn_agent(node, source, extra)?;
        self.wait_agent(node, ifaces, services)
    }

    /// Starts an agent watching the API server of `kubeconfig` without waiting for it.
    pub fn spawn_agent_kube(&mut self, node: &Node, kubeconfig: &Path, extra: &[&str]) -> Result<()> {
        let kc = kubeconfig.to_str().expect("utf-8 path").to_string();
        self.spawn_agent(node, &["--kubeconfig", &kc], extra)
    }

    /// Starts `lb run` in the node's namespace with `source` flags (none: the agent finds its
    /// API server as any client does) without waiting for it.
    pub fn spawn_agent(&mut self, node: &Node, source: &[&str], extra: &[&str]) -> Result<()> {
        let lb = lb_bin()?;
        let log = fs::File::create(self.dir.join(format!("agent-{}.log", node.name)))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.ns))
            .args(&self.agent_wrapper)
            .arg(&lb)
            .arg("run")
            .args(source)
            .args(["--node-name", &node.name, "--pin-dir"])
            .arg(&node.pin_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log);
        self.spawn(&format!("lb agent on {}", node.name), &mut cmd).map(|_| ())
    }

    /// Waits until the node's agent says it is ready, has attached to `ifaces` and programmed
    /// `services` frontends.
    pub fn wait_agent(&mut self, node: &Node, ifaces: &[&str], services: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Pins and map entries may be a previous agent's: wait for this one to say it is ready.
            let ready = self.agent_log(node).contains("agent ready");
            let attached = ready
                && ifaces
                    .iter()
                    .all(|i| node.pin_dir.join("links").join(format!("tc_ingress_{}", i.replace('.', "%"))).exists());
            let programmed = self.list(node, "services").map(|s| s.lines().count().saturating_sub(1)).unwrap_or(0);
            if attached && programmed >= services {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {} not ready (attached: {attached}, services: {programmed}); log:\n{}",
                    node.name,
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn agent_log(&self, node: &Node) -> String {
        fs::read_to_string(self.dir.join(format!("agent-{}.log", node.name))).unwrap_or_default()
    }

    /// Kills the agent of `node` (its pins stay, as after a crash).
    pub fn kill_agent(&mut self, node: &Node) {
        let what = format!("lb agent on {}", node.name);
        for (w, c) in &mut self.children {
            if *w == what {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.children.retain(|(w, _)| *w != what);
    }

    /// Stops the pod's `podserver` (a pod's containers exiting after its grace period).
    pub fn stop_server(&mut self, pod: &Pod) {
        let what = format!("podserver {}", pod.name);
        for (w, c) in &mut self.children {
            if *w == what {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.children.retain(|(w, _)| *w != what);
    }

    /// `lb list WHAT` against the node's agent.
    pub fn list(&self, node: &Node, what: &str) -> Result<String> {
        let lb = lb_bin()?;
        sh(&[lb.to_str().expect("utf-8 path"), "list", what, "--pin-dir", node.pin_dir.to_str().expect("utf-8 path")])
    }

    /// Gives the pod's `ip netns exec` commands an /etc/hosts (iproute2 bind-mounts
    /// /etc/netns/NS/hosts), standing in for cluster DNS: `curl http://web-service` works.
    pub fn add_hosts(&mut self, pod: &Pod, entries: &[(Ipv4Addr, &str)]) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(&pod.ns);
        fs::create_dir_all(&dir)?;
        self.etc_dirs.push(dir.clone());
        let text: String = std::iter::once("127.0.0.1 localhost\n".to_string())
            .chain(entries.iter().map(|(ip, names)| format!("{ip} {names}\n")))
            .collect();
        fs::write(dir.join("hosts"), text)?;
        Ok(())
    }

    /// Writes the node's manifest file (the agent watches the directory).
    pub fn write_manifests(&self, node: &Node, yaml: &str) -> Result<()> {
        // Write then rename, so the agent never reads a half-written file.
        let tmp = node.manifests.join(".lab.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, node.manifests.join("lab.yaml"))?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Removing the pins detaches the programs and frees the maps.
        for p in &self.pin_dirs {
            let _ = fs::remove_dir_all(p);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for d in &self.etc_dirs {
            let _ = fs::remove_dir_all(d);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets made there stay in
/// that namespace after `f` returns.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in {ns} panicked"))?
    })
}

/// One HTTP/1.0 GET from inside `ns`; returns the body of a 2xx answer, and fails on any
/// other status (a 503 is not a success).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    http_get_from(ns, any_of(addr), addr, path)
}

/// The wildcard address, port 0, of `addr`'s family: where a client socket binds.
pub fn any_of(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// One HTTP/1.0 GET from inside `ns`; returns the status code and the body, whatever the code.
pub fn http_status(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_exchange(ns, any_of(addr), addr, path)
}

/// Polls `f` every 100 ms until it returns true or `within` passes; the last answer counts.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// A long-lived connection to an echo port: each line sent comes back as `POD-NAME line`.
pub struct EchoConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl EchoConn {
    pub fn open(ns: &str, addr: SocketAddr) -> Result<Self> {
        let conn = tcp_connect(ns, addr, Duration::from_secs(2))??;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Self { reader: BufReader::new(conn.try_clone()?), writer: conn })
    }

    /// Sends `msg`, returns the answer line.
    pub fn ask(&mut self, msg: &str) -> Result<String> {
        writeln!(self.writer, "{msg}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }

    /// The pod that answers on this connection.
    pub fn pod(&mut self) -> Result<String> {
        Ok(self.ask("who")?.split(' ').next().unwrap_or_default().to_string())
    }
}

/// One HTTP/1.0 GET from inside `ns` from a chosen source address and port (port 0: any);
/// the body of a 2xx answer.
pub fn http_get_from(ns: &str, src: SocketAddr, addr: SocketAddr, path: &str) -> Result<String> {
    let (code, body) = http_exchange(ns, src, addr, path)?;
    if !(200..300).contains(&code) {
        bail!("GET http://{addr}{path}: status {code}: {body}");
    }
    Ok(body)
}

fn http_exchange(ns: &str, src: SocketAddr, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    in_ns(ns, || -> Result<(u16, String)> {
        let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.bind(&src.into())?;
        sock.connect_timeout(&addr.into(), Duration::from_secs(2))?;
        let mut c: TcpStream = sock.into();
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut resp = String::new();
        c.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("no HTTP status line in {resp:?}"))?;
        let body = resp.split("\r\n\r\n").nth(1).ok_or_else(|| anyhow!("no HTTP body in {resp:?}"))?;
        Ok((code, body.trim().to_string()))
    })?
}

/// Adds secondary addresses to a pod's eth0, to play several clients from one namespace.
pub fn add_addresses(lab: &Lab, pod: &Pod, ips: &[Ipv4Addr]) -> Result<()> {
    for ip in ips {
        lab.exec(&pod.ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    }
    Ok(())
}

/// Adds secondary IPv6 addresses (/64, usable at once) to a pod's eth0.
pub fn add_addresses6(lab: &Lab, pod: &Pod, ips: &[Ipv6Addr]) -> Result<()> {
    for ip in ips {
        lab.add_addr6(&pod.ns, *ip, "eth0")?;
    }
    Ok(())
}

/// The lab's `web-service` with `sessionAffinity: ClientIP` and the given timeout, as the lab
/// adds it to svc.yml.
pub fn with_session_affinity(manifests: &str, timeout_seconds: u32) -> String {
    manifests.replacen(
        "  selector:\n    app: web\n",
        &format!(
            "  selector:\n    app: web\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {timeout_seconds}\n"
        ),
        1,
    )
}

/// The backend a new TCP flow gets from a fresh Maglev table of `backends` (all listening on
/// `port`), computed with the datapath's shared hash and the agent's table builder.
pub fn hash_choice(client: SocketAddr, vip: SocketAddr, backends: &[Ipv4Addr], port: u16) -> Ipv4Addr {
    let ip = |a: SocketAddr| match a {
        SocketAddr::V4(a) => u32::from_ne_bytes(a.ip().octets()),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    let mut set: Vec<lb_common::Backend> = backends
        .iter()
        .map(|b| lb_common::Backend {
            addr: [u32::from_ne_bytes(b.octets()), 0, 0, 0],
            port: port.to_be(),
            family: lb_common::FAMILY_IPV4,
            ..Default::default()
        })
        .collect();
    set.sort();
    let table = lb_common::maglev::update(&[], &set);
    let h =
        lb_common::select_hash(ip(client), ip(vip), client.port().to_be(), vip.port().to_be(), lb_common::PROTO_TCP);
    Ipv4Addr::from(table[lb_common::select_slot(h, table.len() as u32) as usize].addr[0].to_ne_bytes())
}

/// A Service `name` on `cluster_ips` (one per family, the primary first, with the
/// `ipFamilies` and `ipFamilyPolicy` the API server would write), `spec_extra` lines (two
/// spaces in: `type: NodePort`, policies...) and `ports` (name, port, protocol, target port,
/// node port); and, per family, the EndpointSlice the controller would write with `pods`'
/// addresses of that family (ready).
pub fn dual_stack_service(
    name: &str,
    cluster_ips: &[IpAddr],
    spec_extra: &str,
    ports: &[(&str, u16, &str, u16, Option<u16>)],
    pods: &[&Pod],
) -> String {
    let family = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let quoted = |v: Vec<String>| v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let ips = quoted(cluster_ips.iter().map(|ip| ip.to_string()).collect());
    let families = cluster_ips.iter().map(family).collect::<Vec<_>>().join(", ");
    let policy = if cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" };
    let svc_ports: String = ports
        .iter()
        .map(|(n, p, proto, t, np)| {
            let np = np.map(|np| format!(", nodePort: {np}")).unwrap_or_default();
            format!("  - {{name: {n}, port: {p}, protocol: {proto}, targetPort: {t}{np}}}\n")
        })
        .collect();
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: \"{}\"\n  clusterIPs: [{ips}]\n  ipFamilies: [{families}]\n  ipFamilyPolicy: {policy}\n{spec_extra}  ports:\n{svc_ports}",
        cluster_ips[0]
    );
    let slice_ports: String = ports
        .iter()
        .map(|(n, _, proto, t, _)| format!("{{name: {n}, port: {t}, protocol: {proto}}}"))
        .collect::<Vec<_>>()
        .join(", ");
    for ip in cluster_ips {
        let fam = family(ip);
        let endpoints: String = pods
            .iter()
            .filter_map(|p| {
                let a: IpAddr = if ip.is_ipv4() { p.ip.into() } else { p.ip6?.into() };
                Some(format!("- {{addresses: [\"{a}\"], nodeName: {}, conditions: {{ready: true}}}}\n", p.node))
            })
            .collect();
        let endpoints = if endpoints.is_empty() { " []\n".to_string() } else { format!("\n{endpoints}") };
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {fam}\nports: [{slice_ports}]\nendpoints:{endpoints}",
            fam.to_lowercase()
        );
    }
    y
}

/// Connects from inside `ns`; the error kind tells refused from unreachable.
pub fn tcp_connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<std::io::Result<TcpStream>> {
    in_ns(ns, || TcpStream::connect_timeout(&addr, timeout))
}

/// A UDP socket bound in `ns` and connected to `addr`, so it only accepts replies whose source
/// is exactly `addr`: a reply that was not reverse-translated is never seen.
pub fn udp_socket(ns: &str, addr: SocketAddr) -> Result<UdpSocket> {
    in_ns(ns, || -> Result<UdpSocket> {
        let s = UdpSocket::bind(any_of(addr))?;
        s.connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })?
}

pub fn udp_request(sock: &UdpSocket, msg: &str) -> Result<String> {
    sock.send(msg.as_bytes())?;
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The seed lab's Service (`svc.yml`) with an explicit ClusterIP, its Deployment (`deploy.yml`,
/// which lb ignores), and the EndpointSlice the endpoints controller would write for `pods`.
/// `extra_ports` adds named ports (`name`, port, protocol, target) used by the tests.
pub fn lab_manifests(cluster_ip: Ipv4Addr, pods: &[(&Pod, bool)], extra_ports: &[(&str, u16, &str, u16)]) -> String {
    let mut svc_ports = String::new();
    let mut slice_ports = String::new();
    if extra_ports.is_empty() {
        svc_ports.push_str("  - protocol: TCP\n    port: 80\n");
        slice_ports.push_str("- port: 80\n  protocol: TCP\n");
    } else {
        svc_ports.push_str("  - name: http\n    protocol: TCP\n    port: 80\n");
        slice_ports.push_str("- name: http\n  port: 80\n  protocol: TCP\n");
        for (name, port, proto, target) in extra_ports {
            svc_ports.push_str(&format!(
                "  - name: {name}\n    protocol: {proto}\n    port: {port}\n    targetPort: {target}\n"
            ));
            slice_ports.push_str(&format!("- name: {name}\n  port: {target}\n  protocol: {proto}\n"));
        }
    }
    let endpoints: String = pods
        .iter()
        .map(|(p, ready)| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {ready}}}\n  nodeName: {}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
                p.ip, p.node, p.name
            )
        })
        .collect();
    format!(
        r#"# svc.yml from the lab, with the ClusterIP the API server would have allocated
apiVersion: v1
kind: Service
metadata:
  name: web-service
  namespace: default
spec:
  clusterIP: {cluster_ip}
  selector:
    app: web
  ports:
{svc_ports}---
# deploy.yml from the lab (lb does not run pods; the lab's namespaces play them)
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-deploy
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: nginx
        image: nginx:latest
---
# what the EndpointSlice controller would write for web-service
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-service-lab
  namespace: default
  labels:
    kubernetes.io/service-name: web-service
addressType: IPv4
ports:
{slice_ports}endpoints:
{endpoints}"#
    )
}

/// A point-to-point tunnel between two namespaces over tun devices, whose packets this process
/// carries from one device to the other, as a userspace WireGuard carries them between its tun
/// device and its socket. Tun devices have no link-layer header (`ARPHRD_NONE`), as kernel
/// WireGuard, IPIP and GRE devices do: the tc hooks on them see packets start with their IP
/// header. The devices are made up; routes through them are the test's. Dropping the tunnel
/// stops its threads and closes the devices, which removes them.
pub struct Tunnel {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Tunnel {
    /// Creates device `a.1` in namespace `a.0` and `b.1` in `b.0`, both up.
    pub fn open(a: (&str, &str), b: (&str, &str)) -> Result<Self> {
        let fa = in_ns(a.0, || tun_device(a.1))??;
        let fb = in_ns(b.0, || tun_device(b.1))??;
        for (ns, dev) in [a, b] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (fa, fb) = (std::sync::Arc::new(fa), std::sync::Arc::new(fb));
        let threads = [(fa.clone(), fb.clone()), (fb, fa)]
            .into_iter()
            .map(|(from, to)| {
                let stop = stop.clone();
                std::thread::spawn(move || carry(&from, &to, &stop))
            })
            .collect();
        Ok(Self { stop, threads })
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A tun device named `name` in the caller's network namespace (`TUNSETIFF` with `IFF_TUN |
/// IFF_NO_PI`: packets are read and written as bare IP packets). Through libc: no crate in
/// the workspace wraps the ioctl.
fn tun_device(name: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_NO_PI: libc::c_short = 0x1000;
    anyhow::ensure!(name.len() < 16, "tun device name {name} too long");
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq { name: [0; 16], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF with a valid ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("creating tun device {name}"));
    }
    Ok(fd)
}

/// Copies packets read from `from` to `to` until `stop` is set.
fn carry(from: &std::os::fd::OwnedFd, to: &std::os::fd::OwnedFd, stop: &std::sync::atomic::AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: reading into a buffer we own, of the length given.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let e = (n < 0).then(std::io::Error::last_os_error);
            if e.as_ref().is_some_and(|e| e.kind() == std::io::ErrorKind::Interrupted) {
                continue;
            }
            // Said, so that a tunnel that died shows in the test's output, not as a timeout.
            if !stop.load(Ordering::Relaxed) {
                let why = e.map_or("end of file".to_string(), |e| e.to_string());
                eprintln!("tunnel: reading from the tun device ended ({why}); no more packets carried");
            }
            break;
        }
        // SAFETY: writing the n bytes just read.
        if unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) } < 0 {
            // A full queue drops the packet, as a link would; anything else is said.
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) && e.raw_os_error() != Some(libc::EAGAIN) {
                eprintln!("tunnel: writing to the tun device failed: {e}");
            }
        }
    }
}
