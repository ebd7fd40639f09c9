//! The fuzzer's world: the Services it programs (as YAML, for the real translation), the
//! model's view of the frontends that translation produced, and a node-like network namespace
//! for the FIB lookups of packets the datapath routes itself.
use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// The node the world is seen from (`nodeName` of local endpoints).
pub const NODE_NAME: &str = "node-a";
/// `--node-ip`: external flows to remote backends are SNATed to it.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 49, 2);
/// The node's address on its pod network; node ports answer there too.
pub const NODE_POD_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The cluster's pod CIDR (`--cluster-cidr`): the harness programs it into `LB_LOCAL_SOURCES`,
/// so these sources get an `externalTrafficPolicy: Local` frontend's cluster-wide endpoints
/// (README, the eTP Local short-circuit).
pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
/// The source a pod reaching itself through a Service is given (README, "North-south").
pub const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// MACs of the namespace: the external interface and its two static neighbours.
pub const EXT0_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const NEIGHBOUR_MACS: [[u8; 6]; 2] = [[2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 1, 0]];

/// Services of every kind the datapath treats differently: ClusterIPs with local backends
/// (and a hairpin candidate among the clients), without endpoints, with session affinity and a
/// remote backend; node ports to local, remote (SNAT), Local-policy (drop) and no backends;
/// a LoadBalancer with source ranges; external IPs with local and remote backends; UDP
/// everywhere it matters. Backend sets of different Services overlap on purpose
/// (10.244.2.21:80 serves three), so reply keys can meet.
pub const WORLD_YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: fuzz}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: fuzz, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.1.12], nodeName: node-a}
- {addresses: [10.244.1.13], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: fuzz}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, protocol: TCP, port: 80}
  - {name: dns, protocol: UDP, port: 53}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: fuzz}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}
  ports: [{protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: fuzz, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{protocol: TCP, port: 8080}]
endpoints:
- {addresses: [10.244.1.21], nodeName: node-a}
- {addresses: [10.244.1.22], nodeName: node-a}
- {addresses: [10.244.2.22], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: np-local, namespace: fuzz}
spec: {type: NodePort, clusterIP: 10.96.1.1, ports: [{port: 8080, targetPort: 80, nodePort: 30080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-local-1, namespace: fuzz, labels: {kubernetes.io/service-name: np-local}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.1.11], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: np-remote, namespace: fuzz}
spec: {type: NodePort, clusterIP: 10.96.1.2, ports: [{port: 8080, targetPort: 80, nodePort: 30081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-remote-1, namespace: fuzz, labels: {kubernetes.io/service-name: np-remote}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.2.21], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: np-policy-local, namespace: fuzz}
spec: {type: NodePort, externalTrafficPolicy: Local, clusterIP: 10.96.1.3, ports: [{port: 8080, targetPort: 80, nodePort: 30082}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-policy-local-1, namespace: fuzz, labels: {kubernetes.io/service-name: np-policy-local}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.2.21], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: np-empty, namespace: fuzz}
spec: {type: NodePort, clusterIP: 10.96.1.4, ports: [{port: 8080, nodePort: 30083}]}
---
apiVersion: v1
kind: Service
metadata: {name: load-bal, namespace: fuzz}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.5
  loadBalancerSourceRanges: [192.168.49.96/28]
  ports: [{port: 8080, targetPort: 80, nodePort: 30088}]
status: {loadBalancer: {ingress: [{ip: 192.168.49.200}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: load-bal-1, namespace: fuzz, labels: {kubernetes.io/service-name: load-bal}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.2.21], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: ext-ip, namespace: fuzz}
spec:
  clusterIP: 10.96.2.1
  externalIPs: [192.168.49.210]
  ports:
  - {name: https, protocol: TCP, port: 443, targetPort: 8443}
  - {name: stream, protocol: UDP, port: 5000, targetPort: 5000}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-ip-1, namespace: fuzz, labels: {kubernetes.io/service-name: ext-ip}}
addressType: IPv4
ports: [{name: https, protocol: TCP, port: 8443}, {name: stream, protocol: UDP, port: 5000}]
endpoints:
- {addresses: [10.244.1.31], nodeName: node-a}
- {addresses: [10.244.2.31], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: np-udp, namespace: fuzz}
spec: {type: NodePort, clusterIP: 10.96.2.2, ports: [{protocol: UDP, port: 9000, nodePort: 30090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-udp-1, namespace: fuzz, labels: {kubernetes.io/service-name: np-udp}}
addressType: IPv4
ports: [{protocol: UDP, port: 9000}]
endpoints:
- {addresses: [10.244.1.41], nodeName: node-a}
- {addresses: [10.244.2.41], nodeName: node-b}
"#;

/// Pods on this node that act as clients; 10.244.1.11 and 10.244.1.31 are backends too
/// (hairpin through `web` and `ext-ip`).
pub const POD_CLIENTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 244, 1, 5),
    Ipv4Addr::new(10, 244, 1, 6),
    Ipv4Addr::new(10, 244, 1, 11),
    Ipv4Addr::new(10, 244, 1, 31),
];
/// Clients whose packets come from the wire: outside the cluster, inside the LoadBalancer's
/// source range with and without a neighbour entry, outside it, and one the namespace has no
/// route to; and a pod of the other node (in the cluster CIDR, so short-circuited at XDP too).
pub const EXTERNAL_CLIENTS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(192, 168, 49, 100),
    Ipv4Addr::new(192, 168, 49, 101),
    Ipv4Addr::new(192, 168, 49, 150),
    Ipv4Addr::new(198, 51, 100, 7),
    Ipv4Addr::new(10, 244, 2, 5),
];

fn in_prefix(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// A backend as the model knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node.
    pub local: bool,
}

/// A frontend as the applied desired state describes it (the model never reads the maps).
#[derive(Clone, Debug)]
pub struct Frontend {
    /// `None` for a node port: every node address answers.
    pub ip: Option<Ipv4Addr>,
    pub port: u16,
    pub proto: u8,
    pub backends: Vec<Backend>,
    /// Reached from outside: flows to remote backends are SNATed to the node.
    pub external: bool,
    /// Local traffic policy: no local backend means drop.
    pub local_only: bool,
    /// `loadBalancerSourceRanges` (address, prefix length); empty admits everyone.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    pub affinity: bool,
    pub name: String,
    /// Under `externalTrafficPolicy: Local`, what the cluster's own sources get instead (the
    /// companion entry: every ready endpoint, no SNAT).
    pub from_cluster: Option<Box<Frontend>>,
}

impl Frontend {
    pub fn admits(&self, client: Ipv4Addr) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|&(net, len)| in_prefix(client, net, len))
    }

    pub fn has_backend(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.backends.iter().any(|b| b.ip == ip && b.port == port)
    }
}

/// Everything the model needs to know about the node and its Services.
#[derive(Clone, Debug)]
pub struct World {
    pub frontends: Vec<Frontend>,
    /// Node ports answer on these (`LB_NODE_ADDRS`).
    pub node_addrs: Vec<Ipv4Addr>,
    pub node_ip: Ipv4Addr,
    pub hairpin: Ipv4Addr,
    /// `LB_LOCAL_SOURCES`: the cluster's own sources (address, prefix length).
    pub local_sources: Vec<(Ipv4Addr, u8)>,
    /// A cluster CIDR is known (`--cluster-cidr`): a ClusterIP's client from outside the
    /// cluster's own sources is SNATed to the node on its way to a remote backend.
    pub snat_off_cluster: bool,
}

impl World {
    /// The world for these frontends on the node this module sets up.
    pub fn new(frontends: Vec<Frontend>) -> Self {
        Self {
            frontends,
            node_addrs: vec![NODE_IP, NODE_POD_GW],
            node_ip: NODE_IP,
            hairpin: HAIRPIN_IP,
            local_sources: vec![CLUSTER_CIDR],
            snat_off_cluster: true,
        }
    }

    pub fn is_local_source(&self, ip: Ipv4Addr) -> bool {
        self.local_sources.iter().any(|&(net, len)| in_prefix(ip, net, len))
    }

    /// What frontend `fe_i` is for packets from `client`: an `externalTrafficPolicy: Local`
    /// external frontend serves the cluster's own sources from its companion entry.
    pub fn serving(&self, fe_i: usize, client: Ipv4Addr) -> &Frontend {
        let fe = &self.frontends[fe_i];
        match &fe.from_cluster {
            Some(c) if fe.external && fe.local_only && self.is_local_source(client) => c,
            _ => fe,
        }
    }

    /// The frontend a packet to `dst:dport` is addressed to: by exact address, else a node port
    /// when `dst` is a node address.
    pub fn frontend(&self, dst: Ipv4Addr, dport: u16, proto: u8) -> Option<usize> {
        let exact = self.frontends.iter().position(|f| f.ip == Some(dst) && f.port == dport && f.proto == proto);
        exact.or_else(|| {
            if !self.node_addrs.contains(&dst) {
                return None;
            }
            self.frontends.iter().position(|f| f.ip.is_none() && f.port == dport && f.proto == proto)
        })
    }

    pub fn is_node_addr(&self, ip: Ipv4Addr) -> bool {
        self.node_addrs.contains(&ip) || ip == self.node_ip
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A node-like network namespace entered by the calling thread, left and deleted on drop (also
/// when the test fails). `BPF_PROG_TEST_RUN` and the FIB lookups of the programs it runs use
/// the caller's namespace: `ext0` (192.168.49.2/24) with static neighbours 192.168.49.3 (the
/// other node, routing 10.244.2.0/24) and 192.168.49.100, and `pods0` (10.244.1.1/24) for
/// this node's pods, forwarding on.
pub struct NodeNs {
    name: String,
    original: std::fs::File,
}

impl NodeNs {
    pub fn enter() -> Result<Self, String> {
        let name = format!("lbfz{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let sh = |args: &[&str]| -> Result<(), String> {
            let st = Command::new(args[0]).args(&args[1..]).status().map_err(|e| format!("running {args:?}: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("{args:?} failed: {st}"))
            }
        };
        sh(&["ip", "netns", "add", &name])?;
        // From here on the guard exists, so a failure below still deletes the namespace.
        let original = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| format!("own netns: {e}"))?;
        let guard = NodeNs { name, original };
        let x = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", guard.name.as_str()];
            full.extend_from_slice(args);
            sh(&full)
        };
        x(&["ip", "link", "add", "ext0", "type", "veth", "peer", "name", "ext1"])?;
        x(&["ip", "link", "set", "ext0", "address", "02:00:00:00:00:02"])?;
        x(&["ip", "addr", "add", "192.168.49.2/24", "dev", "ext0"])?;
        // A veth, as pods hang off one (and this kernel may have no dummy driver).
        x(&["ip", "link", "add", "pods0", "type", "veth", "peer", "name", "pods1"])?;
        x(&["ip", "addr", "add", "10.244.1.1/24", "dev", "pods0"])?;
        for dev in ["ext0", "ext1", "pods0", "pods1", "lo"] {
            x(&["ip", "link", "set", dev, "up"])?;
        }
        x(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"])?;
        x(&["ip", "neigh", "add", "192.168.49.3", "lladdr", "02:00:00:00:00:03", "dev", "ext0", "nud", "permanent"])?;
        x(&["ip", "neigh", "add", "192.168.49.100", "lladdr", "02:00:00:00:01:00", "dev", "ext0", "nud", "permanent"])?;
        x(&["ip", "route", "add", "10.244.2.0/24", "via", "192.168.49.3"])?;
        let target =
            std::fs::File::open(format!("/run/netns/{}", guard.name)).map_err(|e| format!("opening the netns: {e}"))?;
        // SAFETY: setns on this thread with a valid namespace fd.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(guard)
    }

    /// The interface index of `name` in this namespace (for `LB_XDP_TARGETS`).
    pub fn ifindex(&self, name: &str) -> Result<u32, String> {
        let c = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: a valid NUL-terminated name.
        match unsafe { libc::if_nametoindex(c.as_ptr()) } {
            0 => Err(format!("no interface {name}")),
            i => Ok(i),
        }
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        // SAFETY: back to the namespace this thread came from.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
