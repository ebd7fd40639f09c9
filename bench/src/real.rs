//! lb beside the real kube-proxy (iptables and nftables modes), against the same real control
//! plane (`lb_tests::control_plane`, built by `cargo xtask k8s`) and the same lab: a client pod on
//! node `bench-a`, where the proxy under test runs, and three backend pods (the netns kubelet's)
//! on node `bench-b`. One proxy at a time; the other is stopped and its rules or maps removed
//! (`kube-proxy --cleanup`, `lb cleanup`).
//!
//! The Services are selectorless with EndpointSlices written here (three ready endpoints, an HTTP
//! and a sink port): the EndpointSlice controller would write the same slices, but at its default
//! 20 requests/s it would take eight minutes for 10,000 Services.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{
    control_plane::{k8s_bin, ControlPlane, CLUSTER_CIDR},
    http_get,
    kubelet::{Kubelet, KubeletConfig},
    Lab, Node, Pod,
};
use serde_json::json;

use crate::{bulk, conn_rate, progress, wait_serving};

/// True when `cargo xtask k8s` has built what this needs.
pub fn available() -> bool {
    ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl", "etcd"]
        .iter()
        .all(|b| k8s_bin(b).is_ok())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proxy {
    Lb,
    Nftables,
    Iptables,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Lb => "lb",
            Proxy::Nftables => "kube-proxy nftables",
            Proxy::Iptables => "kube-proxy iptables",
        }
    }
}

struct Bench {
    // Dropped in this order: kubelets (pods), the lab, the control plane.
    _kubelets: Vec<Kubelet>,
    lab: Lab,
    cp: ControlPlane,
    a: Node,
    client: Pod,
    backends: Vec<Pod>,
    /// ClusterIP of svc-i, in creation order.
    vips: Vec<Ipv4Addr>,
    kube_proxy: Option<Child>,
    kube_proxy_log: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop_kube_proxy();
    }
}

fn service(i: usize) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 80}, {"name": "sink", "port": 9000, "targetPort": 9000}]}})
}

fn slice(i: usize, backends: &[Pod]) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = backends
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}, "nodeName": p.node}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "sink", "port": 9000, "protocol": "TCP"}],
           "endpoints": eps})
}

/// The value of the sample `name`: unlabelled (lb's), or kube-proxy's IPv4 series (it runs
/// an IPv4 and an IPv6 proxier, each with its own `ip_family` series; these Services are IPv4).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with("{ip_family=\"IPv4\"}"))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A figure in ms, or "n/a" where the metric was not there to read.
fn ms(seconds: f64) -> String {
    if seconds.is_finite() {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        "n/a".into()
    }
}

/// (count, sum) of `kubeproxy_sync_proxy_rules_duration_seconds`, which kube-proxy and lb both
/// export.
#[derive(Clone, Copy)]
struct Syncs {
    count: f64,
    sum: f64,
}

impl Bench {
    fn start() -> Result<Self> {
        let t = Instant::now();
        let mut cp = ControlPlane::start()?;
        progress(&format!("  control plane serving after {:.1} s", t.elapsed().as_secs_f64()));
        let mut lab = Lab::new()?;
        let a = lab.add_node("bench-a", 1)?;
        let b = lab.add_node("bench-b", 2)?;
        lab.link_nodes(&a, &b)?;
        let mut kubelets = Vec::new();
        for n in [&a, &b] {
            let ip = cp.attach(&n.ns)?;
            let mut config = KubeletConfig::new(ip);
            config.first_host = 11;
            kubelets.push(Kubelet::start(&cp, n, config)?);
        }
        let client = lab.add_pod(&a, "client", 100)?;
        let pods: Vec<serde_json::Value> = (0..3)
            .map(|i| {
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": format!("backend-{i}"), "namespace": "default"},
                       "spec": {"nodeName": "bench-b", "containers": [{"name": "server", "image": "podserver",
                                "ports": [{"name": "http", "containerPort": 80}, {"name": "sink", "containerPort": 9000}]}]}})
            })
            .collect();
        cp.create_many(pods, 3)?;
        let backends = (0..3)
            .map(|i| kubelets[1].wait_pod("default", &format!("backend-{i}"), Duration::from_secs(60)))
            .collect::<Result<Vec<_>, _>>()?;
        let kube_proxy_log = lab.dir.join("kube-proxy.log");
        Ok(Bench {
            _kubelets: kubelets,
            lab,
            cp,
            a,
            client,
            backends,
            vips: Vec::new(),
            kube_proxy: None,
            kube_proxy_log,
        })
    }

    /// Creates Services (and slices) until there are `n`.
    fn grow(&mut self, n: usize) -> Result<()> {
        let from = self.vips.len();
        if n <= from {
            return Ok(());
        }
        let t = Instant::now();
        // Services first (their ClusterIPs), then the slices; in chunks, so progress shows.
        for chunk in (from..n).collect::<Vec<_>>().chunks(5_000) {
            let created = self.cp.create_many(chunk.iter().map(|&i| service(i)).collect(), 16)?;
            for svc in created {
                let ip = svc["spec"]["clusterIP"].as_str().context("a ClusterIP")?;
                self.vips.push(ip.parse().with_context(|| format!("ClusterIP {ip}"))?);
            }
            self.cp.create_many(chunk.iter().map(|&i| slice(i, &self.backends)).collect(), 16)?;
        }
        progress(&format!(
            "  {} Services and slices created through the API server in {:.1} s",
            n - from,
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Adds Services (and slices) until there are `n`, written straight into etcd (see
    /// `ControlPlane::put_into_etcd`) with ClusterIPs picked here, then waits until the API
    /// server's own work on them (its ClusterIP repair loop records an IPAddress for each)
    /// has died down, so it does not load the measurement.
    fn grow_through_etcd(&mut self, n: usize) -> Result<()> {
        let from = self.vips.len();
        if n <= from {
            return Ok(());
        }
        let t = Instant::now();
        let used: std::collections::HashSet<Ipv4Addr> = self.vips.iter().copied().collect();
        // 10.100.0.0 onwards: inside SERVICE_CIDR (10.96.0.0/12), clear of its first addresses.
        let mut next = u32::from(Ipv4Addr::new(10, 100, 0, 0));
        let mut objects = Vec::with_capacity(2 * (n - from));
        for i in from..n {
            while used.contains(&Ipv4Addr::from(next)) {
                next += 1;
            }
            let ip = Ipv4Addr::from(next);
            next += 1;
            // Distinct uids: the garbage collector's graph and Events know objects by uid.
            let meta = |name: String, kind: u32| {
                json!({"name": name, "namespace": "default", "uid": format!("00000000-0000-4000-{kind:04}-{i:012}"),
                       "creationTimestamp": "2026-01-01T00:00:00Z"})
            };
            let mut svc = service(i);
            svc["metadata"] = meta(format!("svc-{i}"), 8000);
            svc["spec"]["type"] = json!("ClusterIP");
            svc["spec"]["clusterIP"] = json!(ip.to_string());
            svc["spec"]["clusterIPs"] = json!([ip.to_string()]);
            svc["spec"]["ipFamilies"] = json!(["IPv4"]);
            svc["spec"]["ipFamilyPolicy"] = json!("SingleStack");
            svc["spec"]["sessionAffinity"] = json!("None");
            svc["spec"]["internalTrafficPolicy"] = json!("Cluster");
            for p in svc["spec"]["ports"].as_array_mut().context("ports")? {
                p["protocol"] = json!("TCP");
            }
            svc["status"] = json!({"loadBalancer": {}});
            let mut sl = slice(i, &self.backends);
            let labels = sl["metadata"]["labels"].clone();
            sl["metadata"] = meta(format!("svc-{i}-1"), 9000);
            sl["metadata"]["labels"] = labels;
            objects.push(("services/specs", svc));
            objects.push(("endpointslices", sl));
            self.vips.push(ip);
        }
        self.cp.put_into_etcd(&objects)?;
        progress(&format!(
            "  {} Services and slices written into etcd in {:.1} s",
            n - from,
            t.elapsed().as_secs_f64()
        ));
        // Until the repair loop has recorded an IPAddress for every ClusterIP (the allocator
        // would otherwise hand out a written Service's address), or stops making progress.
        let t = Instant::now();
        let mut last = (self.cp.etcd_count("/registry/ipaddresses/")?, Instant::now());
        while last.0 < n && last.1.elapsed() < Duration::from_secs(60) && t.elapsed() < Duration::from_secs(900) {
            std::thread::sleep(Duration::from_secs(2));
            let count = self.cp.etcd_count("/registry/ipaddresses/")?;
            if count != last.0 {
                last = (count, Instant::now());
            }
        }
        progress(&format!("  the API server recorded {} IPAddresses in {:.1} s", last.0, t.elapsed().as_secs_f64()));
        Ok(())
    }

    /// One change, after a proxy serves: a new Service and its slice, until it serves (from
    /// the Service's create request, and from the slice's creation, its last object, committed:
    /// the first includes the API server's own time, its ClusterIP allocation above all); the
    /// syncs it caused, counted from `first` (the proxy's sync count when it started serving).
    fn one_change(&mut self, proxy: Proxy, first: &Syncs) -> Result<(Duration, Duration, Syncs)> {
        let extra = self.vips.len();
        let t = Instant::now();
        let svc = self.cp.create_many(vec![service(extra)], 1)?;
        self.cp.create_many(vec![slice(extra, &self.backends)], 1)?;
        let committed = Instant::now();
        let vip: Ipv4Addr = svc[0]["spec"]["clusterIP"].as_str().context("a ClusterIP")?.parse()?;
        if self.vips.contains(&vip) {
            // It would serve before the change is programmed: the figure would mean nothing.
            bail!("the new Service got {vip}, which a Service written into etcd already has");
        }
        let change = self.wait_all(proxy, &[vip], t, Duration::from_secs(300))?;
        let since_commit = committed.elapsed();
        // Both proxies may sync once for the Service and once for its slice; the sync that
        // made it serve is done, later ones are in flight: let them finish and count them.
        std::thread::sleep(Duration::from_secs(2));
        let after = self.syncs(first.count)?;
        self.stop_proxy(proxy)?;
        self.cp.kubectl(&["delete", "service", &format!("svc-{extra}")])?;
        self.cp.kubectl(&["delete", "endpointslice", &format!("svc-{extra}-1")])?;
        Ok((change, since_commit, after))
    }

    fn metrics(&self) -> Result<String> {
        http_get(&self.a.ns, "127.0.0.1:10249".parse()?, "/metrics")
    }

    /// The sync figures once more than `after` syncs are counted: a proxy serves a Service once
    /// its rules are in, and records the sync's duration only when the sync returns, so a read
    /// right after the Service serves can come too early (kube-proxy has no series at all before
    /// its first sync). After 30 s the figures are returned as they are.
    fn syncs(&self, after: f64) -> Result<Syncs> {
        let t = Instant::now();
        loop {
            let m = self.metrics()?;
            let s = Syncs {
                count: sample(&m, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
                sum: sample(&m, "kubeproxy_sync_proxy_rules_duration_seconds_sum"),
            };
            if s.count > after || t.elapsed() > Duration::from_secs(30) {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_proxy(&mut self, proxy: Proxy) -> Result<()> {
        match proxy {
            Proxy::Lb => {
                let kc = self.cp.kubeconfig.to_str().context("utf-8 path")?.to_string();
                // tc only, as in the other sections (no XDP program anywhere, so GSO is alike).
                let mut flags = vec!["--no-xdp", "--no-socket-lb"];
                if self.vips.len() > 50_000 {
                    // 200,000 frontends of about 53 Maglev slots each: the default array (4M
                    // slots) holds a fifth of them. Sized as a user with that many would.
                    flags.extend(["--map-maglev", "16777216", "--map-backends", "1048576"]);
                }
                self.lab.spawn_agent(&self.a, &["--kubeconfig", &kc], &flags)
            }
            Proxy::Nftables | Proxy::Iptables => {
                let mode = if proxy == Proxy::Nftables { "nftables" } else { "iptables" };
                let log = std::fs::File::create(&self.kube_proxy_log)?;
                let child = Command::new("ip")
                    .args(["netns", "exec", &self.a.ns])
                    .arg(k8s_bin("kube-proxy")?)
                    .arg("--kubeconfig")
                    .arg(&self.cp.kubeconfig)
                    .args(["--proxy-mode", mode, "--hostname-override", "bench-a", "--cluster-cidr", CLUSTER_CIDR])
                    .args(["--metrics-bind-address", "127.0.0.1:10249", "--healthz-bind-address", "127.0.0.1:10256"])
                    // Leave the host's conntrack table size and this namespace's timeouts alone.
                    .args(["--conntrack-max-per-core", "0"])
                    .args(["--conntrack-tcp-timeout-established", "0s", "--conntrack-tcp-timeout-close-wait", "0s"])
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting kube-proxy")?;
                self.kube_proxy = Some(child);
                Ok(())
            }
        }
    }

    fn stop_kube_proxy(&mut self) {
        if let Some(mut c) = self.kube_proxy.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Its rules stay behind a killed kube-proxy; --cleanup removes both modes' rules.
            if let Ok(bin) = k8s_bin("kube-proxy") {
                let _ = Command::new("ip")
                    .args(["netns", "exec", &self.a.ns])
                    .arg(bin)
                    .arg("--cleanup")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    fn stop_proxy(&mut self, proxy: Proxy) -> Result<()> {
        self.stop_proxy_only(proxy)?;
        // The benchmark's clients reuse source ports within seconds (they close with RST). A
        // netfilter entry left from the last proxy's flows (lb's translated flows are tracked
        // too, once any netfilter NAT is loaded in the namespace) would clash with the next
        // proxy's DNAT of the same client port, and that SYN is dropped: start from an empty
        // table, as a node that switched proxies and waited would have.
        self.lab.exec(&self.a.ns, &["conntrack", "-F"]).context("conntrack -F (is conntrack installed?)")?;
        Ok(())
    }

    fn stop_proxy_only(&mut self, proxy: Proxy) -> Result<()> {
        match proxy {
            Proxy::Lb => {
                self.lab.kill_agent(&self.a);
                lb_tests::sh(&[
                    lb_tests::lb_bin()?.to_str().context("utf-8 path")?,
                    "cleanup",
                    "--pin-dir",
                    self.a.pin_dir.to_str().context("utf-8 path")?,
                ])?;
            }
            _ => self.stop_kube_proxy(),
        }
        Ok(())
    }

    fn proxy_log(&self, proxy: Proxy) -> String {
        match proxy {
            Proxy::Lb => self.lab.agent_log(&self.a),
            _ => std::fs::read_to_string(&self.kube_proxy_log).unwrap_or_default(),
        }
    }

    /// Waits until every one of `vips` (port 80) accepts connections.
    fn wait_all(&self, proxy: Proxy, vips: &[Ipv4Addr], since: Instant, limit: Duration) -> Result<Duration> {
        for vip in vips {
            if let Err(e) = wait_serving(&self.client.ns, SocketAddr::from((*vip, 80)), since, limit) {
                let log = self.proxy_log(proxy);
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!(
                    "{}: {e:#}; its log ends:\n{}",
                    proxy.name(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(since.elapsed())
    }
}

struct TrafficRow {
    size: usize,
    path: String,
    conns: f64,
    gbps: f64,
}

struct ControlRow {
    size: usize,
    proxy: Proxy,
    /// None: not serving within the limit.
    start: Option<Duration>,
    first_sync: f64,
    change: Duration,
    /// The same, from the slice's creation.
    change_committed: Duration,
    change_sync: f64,
    change_syncs: f64,
}

impl ControlRow {
    /// A proxy that served: its start, and the change made after.
    fn served(size: usize, proxy: Proxy, start: Duration, first: &Syncs, change: (Duration, Duration, Syncs)) -> Self {
        let (change, change_committed, after) = change;
        ControlRow {
            size,
            proxy,
            start: Some(start),
            first_sync: first.sum / first.count,
            change,
            change_committed,
            change_sync: (after.sum - first.sum) / (after.count - first.count),
            change_syncs: after.count - first.count,
        }
    }

    /// A proxy that did not serve within the limit: a result, reported as such.
    fn unserved(size: usize, proxy: Proxy) -> Self {
        ControlRow {
            size,
            proxy,
            start: None,
            first_sync: f64::NAN,
            change: Duration::ZERO,
            change_committed: Duration::ZERO,
            change_sync: f64::NAN,
            change_syncs: f64::NAN,
        }
    }
}

/// How long a proxy may take to serve every Service at first.
pub const START_LIMIT: Duration = Duration::from_secs(600);

/// Sections 3 and 4 of the report, on the real control plane.
/// Returns the sections, and the sizes at which kube-proxy in iptables mode never served.
/// `sizes`: the traffic and control rows at 1, 1,000 and 10,000 Services (1 when `quick`);
/// `huge`: the control row at 100,000.
pub fn run(quick: bool, sizes: bool, huge: bool) -> Result<(String, Vec<usize>)> {
    let traffic_sizes: &[usize] = match (sizes, quick) {
        (false, _) => &[],
        (true, true) => &[1],
        (true, false) => &[1, 1_000, 10_000],
    };
    let secs = if quick { 0.5 } else { 3.0 };
    let proxies = [Proxy::Lb, Proxy::Nftables, Proxy::Iptables];
    let mut b = Bench::start()?;
    let mut traffic = Vec::new();
    let mut control = Vec::new();
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    for &n in traffic_sizes {
        b.grow(n)?;
        let with_traffic = true;
        let positions: Vec<(&str, usize)> =
            if n == 1 { vec![("only", 0)] } else { vec![("first", 0), ("middle", n / 2), ("last", n - 1)] };
        let direct: Vec<SocketAddr> = b.backends.iter().map(|p| at(p.ip, 80)).collect();
        let mut measure = |b: &Bench, path: String, http: &[SocketAddr], sink: SocketAddr| -> Result<()> {
            progress(&format!("  {n} services: {path}"));
            let conns = conn_rate(&b.client.ns, http, secs, 2)?;
            let gbps = bulk(&b.client.ns, sink, secs)?;
            traffic.push(TrafficRow { size: n, path, conns, gbps });
            Ok(())
        };
        if with_traffic {
            measure(&b, "direct to the backends (the limit)".into(), &direct, at(b.backends[0].ip, 9000))?;
        }
        for proxy in proxies {
            progress(&format!("  {n} services: {} starting", proxy.name()));
            let t = Instant::now();
            b.start_proxy(proxy)?;
            let watched: Vec<Ipv4Addr> = positions.iter().map(|(_, i)| b.vips[*i]).collect();
            let start = match b.wait_all(proxy, &watched, t, START_LIMIT) {
                Ok(d) => d,
                Err(e) => {
                    // A result, not a failure of the benchmark: reported as such, and the
                    // proxy's other rows at this size are left out.
                    progress(&format!("  {e:#}"));
                    control.push(ControlRow::unserved(n, proxy));
                    b.stop_proxy(proxy)?;
                    continue;
                }
            };
            let first = b.syncs(0.0)?;
            if with_traffic {
                for (pos, i) in &positions {
                    let vip = b.vips[*i];
                    // Positions are by creation order (see the section's header).
                    let label = format!("{}, Service {pos}", proxy.name());
                    measure(&b, label, &[at(vip, 80)], at(vip, 9000))?;
                }
            }
            let change = b.one_change(proxy, &first)?;
            control.push(ControlRow::served(n, proxy, start, &first, change));
        }
        if with_traffic {
            // The limit again: a baseline at both ends of the round is less at the mercy of one
            // moment on a shared 2-core machine.
            measure(&b, "direct to the backends (the limit)".into(), &direct, at(b.backends[0].ip, 9000))?;
        }
    }

    if huge {
        // 100,000 Services: control plane only, lb only (kube-proxy in nftables mode took over
        // four minutes to serve 10,000; in iptables mode it did not serve 10,000 at all).
        // A failure here is reported, not fatal: the rows measured above stay.
        let n = 100_000;
        let proxy = Proxy::Lb;
        let row = (|| -> Result<ControlRow> {
            b.grow_through_etcd(n)?;
            progress(&format!("  {n} services: {} starting", proxy.name()));
            let t = Instant::now();
            b.start_proxy(proxy)?;
            let watched = [b.vips[0], b.vips[n / 2], b.vips[n - 1]];
            let start = b.wait_all(proxy, &watched, t, START_LIMIT)?;
            let first = b.syncs(0.0)?;
            let change = b.one_change(proxy, &first)?;
            Ok(ControlRow::served(n, proxy, start, &first, change))
        })();
        match row {
            Ok(row) => control.push(row),
            Err(e) => {
                progress(&format!("  {n} services: {e:#}"));
                let _ = b.stop_proxy(proxy);
                control.push(ControlRow::unserved(n, proxy));
            }
        }
    }

    let mut md = format!(
        "## 3. Real TCP through a Service: lb beside the real kube-proxy\n\n\
         A real control plane (kube-apiserver, controller manager, scheduler and kube-proxy {}, built from source), a client pod on node bench-a, three backend pods on node bench-b (the netns kubelet's), joined by an underlay veth. Each Service has an HTTP port (one request per connection, {secs} s, 2 client threads) and a sink port (one bulk stream, {secs} s). On bench-a one proxy at a time: lb (API mode, tc only: no XDP anywhere, so GSO is alike), kube-proxy in nftables mode, kube-proxy in iptables mode (each stopped and its rules or maps removed before the next). kube-proxy orders its iptables KUBE-SERVICES chain by Go map iteration, so a Service's place in it is random: \"first/middle/last\" (by creation) are three Services, not three places in its chain (lb and nftables look Services up in maps).\n\n\
         | services | path | connections/s | vs direct | bulk Gbit/s | vs direct |\n|---:|---|---:|---:|---:|---:|\n",
        kube_version(),
    );
    let mut shown: Vec<TrafficRow> = Vec::new();
    for r in traffic {
        match shown.iter_mut().find(|d| d.size == r.size && d.path.starts_with(&r.path)) {
            Some(d) => {
                d.conns = (d.conns + r.conns) / 2.0;
                d.gbps = (d.gbps + r.gbps) / 2.0;
                d.path = format!("{}, mean of runs before and after the others", r.path);
            }
            None => shown.push(r),
        }
    }
    for r in &shown {
        let direct = shown.iter().find(|d| d.size == r.size && d.path.starts_with("direct")).expect("measured first");
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.2}x | {:.2} | {:.2}x |",
            r.size,
            r.path,
            r.conns,
            r.conns / direct.conns,
            r.gbps,
            r.gbps / direct.gbps
        )?;
    }
    md.push_str(
        "\n## 4. Control plane through the real API server\n\n\
         `start`: the proxy started to the first, middle and last Service serving. `change`: one new Service and its EndpointSlice created to it serving. `sync`: `kubeproxy_sync_proxy_rules_duration_seconds` (both export it): the first sync, and the mean of the syncs the change caused (how many in brackets). kube-proxy runs with its defaults (at most one sync per second, `--*-min-sync-period`). At 100,000 Services (not in quick runs) the Services beyond those created through the API for the smaller sizes (the 90,000 beyond the first 10,000 in a full run) are written straight into etcd, where kube-apiserver keeps them, and served by it as any others (list, watch; its ClusterIP repair loop then records an IPAddress and an Event for each, and the row waits until its writes stop): kube-apiserver v1.37.2 allocates a ClusterIP in time proportional to the ClusterIPs already allocated (its allocator counts every IPAddress object, twice, for a metric after each allocation: 71% of its CPU in a profile at 5,000 Services), so creating 100,000 through it would take hours on 2 cores. The new Service of the change is created through the API as at the other sizes. Only lb runs at 100,000: kube-proxy in nftables mode took minutes to serve 10,000 and in iptables mode did not serve them.\n\n\
         | services | proxy | start to serving | first sync | one new Service to serving | from its slice's creation | sync for the change |\n|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in &control {
        match r.start {
            Some(start) => writeln!(
                md,
                "| {} | {} | {:.2} s | {} | {:.2} s | {:.3} s | {} ({:.0}) |",
                r.size,
                r.proxy.name(),
                start.as_secs_f64(),
                ms(r.first_sync),
                r.change.as_secs_f64(),
                r.change_committed.as_secs_f64(),
                ms(r.change_sync),
                r.change_syncs
            )?,
            None => writeln!(
                md,
                "| {} | {} | not serving after {} s | | | | |",
                r.size,
                r.proxy.name(),
                START_LIMIT.as_secs()
            )?,
        }
    }
    md.push('\n');
    let unserved: Vec<usize> =
        control.iter().filter(|r| r.start.is_none() && matches!(r.proxy, Proxy::Iptables)).map(|r| r.size).collect();
    Ok((md, unserved))
}

fn kube_version() -> String {
    k8s_bin("kube-proxy")
        .ok()
        .and_then(|b| Command::new(b).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("Kubernetes ").to_string())
        .unwrap_or_default()
}
