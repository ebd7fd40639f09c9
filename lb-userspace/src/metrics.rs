//! Prometheus metrics (`--metrics-addr`, kube-proxy's 127.0.0.1:10249) and `/healthz`
//! (`--healthz-addr`). The datapath counters are read from the pinned maps at scrape time; what
//! only the agent knows (syncs, programmed counts, watch health) is kept in [`AgentStatus`].
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::{Counter, COUNTER_MAX};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, histogram::Histogram, MetricType},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    dataplane::{decode_name, frontend_of, Maps},
    kube_source::WatchStats,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Upper bounds (seconds) of the sync duration histogram's buckets (`+Inf` is implicit).
const SYNC_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// kube-proxy's buckets for `kubeproxy_network_programming_duration_seconds`: 0.25 s steps to
/// 0.5 s, 1 s steps to 59 s, then 5 s to 115 s, then 30 s to 300 s.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// What the agent reports about itself. Its histograms are shared handles with locks of their
/// own: a copy of the status reads the same ones, as they are at encoding time.
#[derive(Clone, Debug)]
pub struct AgentStatus {
    /// The first full state has been programmed.
    pub synced: bool,
    /// The programs are attached where they should be.
    pub attached: bool,
    pub syncs: u64,
    pub sync_failures: u64,
    pub last_sync_unix_s: f64,
    /// Every sync, full or partial.
    pub all_syncs: Histogram,
    pub full_syncs: Histogram,
    pub partial_syncs: Histogram,
    pub programmed_frontends: usize,
    pub programmed_endpoints: usize,
    pub rejected_objects: usize,
    /// Shared with the dataplane's sweep threads.
    pub stale_udp_flows_removed: Arc<std::sync::atomic::AtomicU64>,
    /// Idle assured flows the conntrack collector removed.
    pub conntrack_collected: Arc<std::sync::atomic::AtomicU64>,
    pub stale_udp_sockets_closed: u64,
    pub conntrack_capacity: u32,
    pub affinity_capacity: u32,
    /// The oldest change received and not applied yet (kube-proxy's `QueuedUpdate`).
    pub oldest_pending: Option<Instant>,
    pub last_queued_unix_s: f64,
    /// The last time the proxier was up to date (kube-proxy's `Updated`).
    pub last_updated: Option<SystemTime>,
    /// `/healthz` fails when a change has waited longer than this (kube-proxy: twice the sync
    /// period).
    pub health_timeout: Duration,
    /// The Node is neither being deleted nor tainted for deletion by the cluster autoscaler.
    pub node_eligible: bool,
    pub service_changes_total: u64,
    pub endpoint_changes_total: u64,
    pub service_changes_pending: usize,
    pub endpoint_changes_pending: usize,
    /// Service ports with a Local policy and no endpoint on this node: (internal, external).
    pub no_local_endpoints: (usize, usize),
    pub network_programming: Histogram,
    /// `/healthz` and `/livez` answers by code.
    pub healthz_answers: BTreeMap<(&'static str, u16), u64>,
}

impl Default for AgentStatus {
    fn default() -> Self {
        Self {
            synced: false,
            attached: false,
            syncs: 0,
            sync_failures: 0,
            last_sync_unix_s: 0.0,
            all_syncs: Histogram::new(SYNC_BUCKETS),
            full_syncs: Histogram::new(SYNC_BUCKETS),
            partial_syncs: Histogram::new(SYNC_BUCKETS),
            programmed_frontends: 0,
            programmed_endpoints: 0,
            rejected_objects: 0,
            stale_udp_flows_removed: Arc::default(),
            conntrack_collected: Arc::default(),
            stale_udp_sockets_closed: 0,
            conntrack_capacity: 0,
            affinity_capacity: 0,
            oldest_pending: None,
            last_queued_unix_s: 0.0,
            last_updated: None,
            health_timeout: Duration::from_secs(60),
            // Eligible until a Node event says otherwise, as kube-proxy starts.
            node_eligible: true,
            service_changes_total: 0,
            endpoint_changes_total: 0,
            service_changes_pending: 0,
            endpoint_changes_pending: 0,
            no_local_endpoints: (0, 0),
            network_programming: Histogram::new(network_programming_buckets()),
            healthz_answers: BTreeMap::new(),
        }
    }
}

impl AgentStatus {
    /// Records one sync (`full`: every frontend compared).
    pub fn record_sync(&mut self, took: Duration, failed: bool, full: bool) {
        self.syncs += 1;
        if failed {
            self.sync_failures += 1;
        }
        let s = took.as_secs_f64();
        self.all_syncs.observe(s);
        if full {
            self.full_syncs.observe(s);
        } else {
            self.partial_syncs.observe(s);
        }
        self.last_sync_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.updated();
    }

    pub fn record_full_sync(&self, took: Duration) {
        self.full_syncs.observe(took.as_secs_f64());
    }

    /// Changes received (kube-proxy's `QueuedUpdate`).
    pub fn queued(&mut self, services: usize, endpoints: usize) {
        self.oldest_pending.get_or_insert_with(Instant::now);
        self.last_queued_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.service_changes_total += services as u64;
        self.endpoint_changes_total += endpoints as u64;
        self.service_changes_pending += services;
        self.endpoint_changes_pending += endpoints;
    }

    /// Everything received is applied (kube-proxy's `Updated`).
    pub fn updated(&mut self) {
        self.oldest_pending = None;
        self.service_changes_pending = 0;
        self.endpoint_changes_pending = 0;
        self.last_updated = Some(SystemTime::now());
    }

    /// kube-proxy's proxy health: no change has waited longer than the health timeout.
    pub fn proxy_healthy(&self) -> bool {
        self.oldest_pending.is_none_or(|t| t.elapsed() < self.health_timeout)
    }
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

/// Map entry counts are found by walking the keys, which costs a syscall per entry; a
/// scraper polling every few seconds must not keep a core busy on a million-entry map. A count
/// is reused until twenty times what it cost has passed, so walking takes at most 5% of a core
/// and small maps are counted on every scrape.
struct CountCache {
    at: Option<Instant>,
    cost: Duration,
    conntrack: usize,
    conntrack_new: usize,
    affinity: usize,
}

/// What the datapath's maps said at one scrape.
#[derive(Debug, Default)]
struct Datapath {
    /// (hook, verdict, packets).
    packets: Vec<(&'static str, &'static str, u64)>,
    rejects: u64,
    /// (reason, packets).
    drops: Vec<(&'static str, u64)>,
    /// Entries of the assured table and of the new-flow table.
    conntrack: usize,
    conntrack_new: usize,
    affinity: usize,
    /// (service, frontend, family, packets, bytes), with `--metrics-per-frontend` only.
    frontends: Vec<(String, String, &'static str, u64, u64)>,
}

/// Reads the datapath's counters (blocking syscalls: run off the async runtime).
fn read_datapath(maps: &Maps, cache: &mut CountCache, per_frontend: bool) -> Datapath {
    let mut d = Datapath::default();
    let sum = |idx: u32| -> u64 { maps.stats.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    for (hook, hook_name) in ["tc", "xdp", "sock"].into_iter().enumerate() {
        for c in Counter::ALL {
            d.packets.push((hook_name, c.name(), sum(hook as u32 * COUNTER_MAX + c as u32)));
        }
    }
    d.rejects = (0..3).map(|h| sum(h * COUNTER_MAX + Counter::RejectNoBackend as u32)).sum();
    for c in Counter::ALL.iter().filter(|c| c.name().starts_with("drop_")) {
        d.drops.push((&c.name()["drop_".len()..], (0..3).map(|h| sum(h * COUNTER_MAX + *c as u32)).sum()));
    }
    if cache.at.is_none_or(|t| t.elapsed() > cache.cost * 20) {
        let started = Instant::now();
        // Both families' tables.
        cache.conntrack =
            maps.conntrack.keys().filter(Result::is_ok).count() + maps.conntrack6.keys().filter(Result::is_ok).count();
        cache.conntrack_new = maps.conntrack_new.keys().filter(Result::is_ok).count()
            + maps.conntrack6_new.keys().filter(Result::is_ok).count();
        cache.affinity = maps.affinity.keys().filter(Result::is_ok).count();
        cache.cost = started.elapsed();
        cache.at = Some(Instant::now());
    }
    (d.conntrack, d.conntrack_new, d.affinity) = (cache.conntrack, cache.conntrack_new, cache.affinity);
    if per_frontend {
        let names: BTreeMap<u32, String> =
            maps.names.iter().filter_map(Result::ok).map(|(id, n)| (id, decode_name(&n))).collect();
        for (k, v) in maps.services.iter().filter_map(Result::ok) {
            let f = frontend_of(&k, v.flags);
            let frontend = f.map(|f| f.to_string()).unwrap_or_default();
            let family = f.map_or("", |f| f.family().name());
            let (mut packets, mut bytes) = (0, 0);
            if let Ok(per_cpu) = maps.service_stats.get(&v.id, 0) {
                for s in per_cpu.iter() {
                    packets += s.packets;
                    bytes += s.bytes;
                }
            }
            d.frontends.push((names.get(&v.id).cloned().unwrap_or_default(), frontend, family, packets, bytes));
        }
        d.frontends.sort();
    }
    d
}

/// kube-proxy's process metrics (what Prometheus' process collector reports), from /proc.
#[derive(Debug, Default)]
struct Process {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: f64,
}

fn read_process() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let conf = |v| nix::unistd::sysconf(v).ok().flatten().map_or(1.0, |n| n as f64);
    let (ticks, page) = (conf(nix::unistd::SysconfVar::CLK_TCK), conf(nix::unistd::SysconfVar::PAGE_SIZE));
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()))
        .unwrap_or(0.0);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Max open files"))?.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0.0);
    Some(Process {
        cpu_seconds: (num(14) + num(15)) / ticks,
        resident_bytes: num(24) * page,
        virtual_bytes: num(23),
        start_time_seconds: boot + num(22) / ticks,
        open_fds: std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0) as f64,
        max_fds,
    })
}

/// Everything one scrape reports, read first (status copied, maps walked), then encoded.
#[derive(Debug)]
struct Scrape {
    status: AgentStatus,
    /// (events, errors, relists) of the API watches.
    watch: Option<[u64; 3]>,
    datapath: Option<Datapath>,
    process: Option<Process>,
}

type Labels = Vec<(&'static str, String)>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counters(e: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(Labels, u64)]) -> std::fmt::Result {
    let mut d = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(d.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> std::fmt::Result {
    h.encode(e.encode_descriptor(name, help, None, h.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let st = &self.status;
        counter(&mut e, "lb_sync", "Syncs of the desired state to the maps.", st.syncs)?;
        counter(&mut e, "lb_sync_failures", "Syncs in which some frontend failed to program.", st.sync_failures)?;
        // Also under kube-proxy's names, so dashboards and alerts written for it keep working.
        histogram(&mut e, "lb_sync_duration_seconds", "Time to translate and apply one sync.", &st.all_syncs)?;
        histogram(
            &mut e,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kube-proxy's name for lb_sync_duration_seconds.",
            &st.all_syncs,
        )?;
        histogram(
            &mut e,
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Syncs that compared every frontend (start, resync).",
            &st.full_syncs,
        )?;
        histogram(
            &mut e,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Syncs of the changed Services only.",
            &st.partial_syncs,
        )?;
        histogram(
            &mut e,
            "kubeproxy_network_programming_duration_seconds",
            "From an endpoint change (its slice's last-change-trigger-time) to the datapath serving it.",
            &st.network_programming,
        )?;
        gauge(&mut e, "lb_last_sync_timestamp_seconds", "Unix time of the last sync.", st.last_sync_unix_s)?;
        gauge(
            &mut e,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kube-proxy's name for lb_last_sync_timestamp_seconds.",
            st.last_sync_unix_s,
        )?;
        gauge(
            &mut e,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "Unix time of the last change received.",
            st.last_queued_unix_s,
        )?;
        gauge(
            &mut e,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "EndpointSlice changes received and not applied yet.",
            st.endpoint_changes_pending as f64,
        )?;
        counter(
            &mut e,
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes received.",
            st.endpoint_changes_total,
        )?;
        gauge(
            &mut e,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Service changes received and not applied yet.",
            st.service_changes_pending as f64,
        )?;
        counter(
            &mut e,
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service changes received.",
            st.service_changes_total,
        )?;
        let mut d = e.encode_descriptor(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no endpoint on this node.",
            None,
            MetricType::Gauge,
        )?;
        for (policy, n) in [("internal", st.no_local_endpoints.0), ("external", st.no_local_endpoints.1)] {
            let labels: Labels = vec![("traffic_policy", policy.to_string())];
            ConstGauge::new(n as f64).encode(d.encode_family(&labels)?)?;
        }
        for (name, path) in [("kubeproxy_proxy_healthz", "/healthz"), ("kubeproxy_proxy_livez", "/livez")] {
            let rows: Vec<(Labels, u64)> = [200, 503]
                .into_iter()
                .map(|code| {
                    (vec![("code", code.to_string())], st.healthz_answers.get(&(path, code)).copied().unwrap_or(0))
                })
                .collect();
            counters(&mut e, name, &format!("{path} answers by code."), &rows)?;
        }
        gauge(
            &mut e,
            "lb_programmed_frontends",
            "Service frontends (address, port, protocol) programmed.",
            st.programmed_frontends as f64,
        )?;
        gauge(
            &mut e,
            "lb_programmed_endpoints",
            "Backends summed over programmed frontends.",
            st.programmed_endpoints as f64,
        )?;
        gauge(
            &mut e,
            "lb_rejected_objects",
            "Services left out as a whole (invalid, or a frontend another one holds).",
            st.rejected_objects as f64,
        )?;
        let removed = st.stale_udp_flows_removed.load(std::sync::atomic::Ordering::Relaxed);
        counter(&mut e, "lb_stale_udp_flows_removed", "UDP flows removed because their backend left.", removed)?;
        counter(
            &mut e,
            "lb_stale_udp_sockets_closed",
            "The node's own connected UDP sockets aborted because their backend left.",
            st.stale_udp_sockets_closed,
        )?;
        if let Some([events, errors, relists]) = self.watch {
            counter(&mut e, "lb_watch_events", "Events received from the API server.", events)?;
            counter(&mut e, "lb_watch_errors", "Failed watch or list requests (retried).", errors)?;
            counter(&mut e, "lb_watch_relists", "Full lists completed (start, 410 Gone, reconnect).", relists)?;
        }
        if let Some(p) = &self.process {
            ConstCounter::new(p.cpu_seconds).encode(e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, seconds.",
                None,
                MetricType::Counter,
            )?)?;
            gauge(&mut e, "process_resident_memory_bytes", "Resident memory size, bytes.", p.resident_bytes)?;
            gauge(&mut e, "process_virtual_memory_bytes", "Virtual memory size, bytes.", p.virtual_bytes)?;
            gauge(
                &mut e,
                "process_start_time_seconds",
                "Start time since the Unix epoch, seconds.",
                p.start_time_seconds,
            )?;
            gauge(&mut e, "process_open_fds", "Open file descriptors.", p.open_fds)?;
            gauge(&mut e, "process_max_fds", "Maximum number of open file descriptors.", p.max_fds)?;
        }
        let Some(dp) = &self.datapath else { return Ok(()) };
        let rows: Vec<(Labels, u64)> = dp
            .packets
            .iter()
            .map(|(h, v, n)| (vec![("hook", h.to_string()), ("verdict", v.to_string())], *n))
            .collect();
        counters(&mut e, "lb_packets", "Datapath verdicts by hook (tc, xdp, sock) and verdict.", &rows)?;
        counter(&mut e, "lb_no_endpoint_rejects", "New flows to a Service without endpoints, refused.", dp.rejects)?;
        let rows: Vec<(Labels, u64)> = dp.drops.iter().map(|(r, n)| (vec![("reason", r.to_string())], *n)).collect();
        counters(&mut e, "lb_drops", "Packets dropped by the datapath, by reason.", &rows)?;
        gauge(
            &mut e,
            "lb_conntrack_entries",
            "Conntrack entries in use, both tables of both families (two per flow).",
            (dp.conntrack + dp.conntrack_new) as f64,
        )?;
        gauge(
            &mut e,
            "lb_conntrack_assured_entries",
            "Entries of live connections (the assured tables of both families).",
            dp.conntrack as f64,
        )?;
        gauge(
            &mut e,
            "lb_conntrack_capacity",
            "Capacity of each family's assured table (never evicted; new flows have a table of their own).",
            st.conntrack_capacity as f64,
        )?;
        counter(
            &mut e,
            "lb_conntrack_collected",
            "Assured flows removed after idling past their lifetime.",
            st.conntrack_collected.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        gauge(&mut e, "lb_affinity_entries", "Session affinity pins in use.", dp.affinity as f64)?;
        gauge(&mut e, "lb_affinity_capacity", "Session affinity map capacity (LRU).", st.affinity_capacity as f64)?;
        if !dp.frontends.is_empty() {
            let label = |s: &str, f: &str, fam: &str| -> Labels {
                vec![("service", s.to_string()), ("frontend", f.to_string()), ("family", fam.to_string())]
            };
            let packets: Vec<(Labels, u64)> =
                dp.frontends.iter().map(|(s, f, fam, p, _)| (label(s, f, fam), *p)).collect();
            counters(&mut e, "lb_service_packets", "Packets clients sent to a Service frontend.", &packets)?;
            let bytes: Vec<(Labels, u64)> =
                dp.frontends.iter().map(|(s, f, fam, _, b)| (label(s, f, fam), *b)).collect();
            counters(&mut e, "lb_service_bytes", "Bytes clients sent to a Service frontend.", &bytes)?;
        }
        Ok(())
    }
}

/// Renders the Prometheus text exposition (prometheus-client's encoder).
fn render(
    status: &AgentStatus,
    maps: Option<&Maps>,
    watch: Option<&WatchStats>,
    cache: &mut CountCache,
    per_frontend: bool,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let scrape = Scrape {
        status: status.clone(),
        watch: watch.map(|w| [w.events.load(Relaxed), w.errors.load(Relaxed), w.relists.load(Relaxed)]),
        datapath: maps.map(|m| read_datapath(m, cache, per_frontend)),
        process: read_process(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// `/healthz`, as kube-proxy's: 503 while no complete state is programmed and attached, when a
/// change has waited longer than the health timeout without being applied, or when the Node
/// is being deleted or tainted for deletion by the cluster autoscaler; a JSON body with the
/// last update time.
pub(crate) fn healthz(status: &AgentStatus) -> (u16, String) {
    let healthy = status.synced && status.attached && status.proxy_healthy() && status.node_eligible;
    let now = SystemTime::now();
    let last = if healthy { Some(now) } else { status.last_updated };
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let body = serde_json::json!({
        "lastUpdated": last.map(secs),
        "currentTime": secs(now),
        "nodeEligible": status.node_eligible,
        "synced": status.synced,
        "attached": status.attached,
    })
    .to_string();
    (if healthy { 200 } else { 503 }, body)
}

/// `/livez`: 503 only when a change has waited longer than the health timeout (the proxy is
/// stuck); an agent waiting out an unreachable API server is alive, and a restart would not
/// reach the server any sooner.
fn livez(status: &AgentStatus) -> (u16, String) {
    let healthy = status.proxy_healthy();
    let body = serde_json::json!({
        "lastUpdated": status.last_updated.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
        "currentTime": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
    })
    .to_string();
    (if healthy { 200 } else { 503 }, body)
}

/// What the HTTP handlers read.
pub struct MetricsContext {
    pub pin_dir: std::path::PathBuf,
    pub status: SharedStatus,
    pub watch: Option<Arc<WatchStats>>,
    /// Per-frontend packet and byte series (two per frontend: 200,000 at 100,000 Services).
    pub per_frontend: bool,
    cache: Mutex<CountCache>,
}

impl MetricsContext {
    pub fn new(
        pin_dir: std::path::PathBuf,
        status: SharedStatus,
        watch: Option<Arc<WatchStats>>,
        per_frontend: bool,
    ) -> Arc<Self> {
        let cache =
            Mutex::new(CountCache { at: None, cost: Duration::ZERO, conntrack: 0, conntrack_new: 0, affinity: 0 });
        Arc::new(Self { pin_dir, status, watch, per_frontend, cache })
    }

    /// A copy of the status: the proxier's lock is held only for the copy, never while maps
    /// are walked.
    fn status(&self) -> AgentStatus {
        self.status.lock().expect("status poisoned").clone()
    }

    fn count(&self, path: &'static str, code: u16) {
        *self.status.lock().expect("status poisoned").healthz_answers.entry((path, code)).or_default() += 1;
    }
}

fn json(code: u16, body: String) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let status = axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (status, [("content-type", "application/json"), ("x-content-type-options", "nosniff")], body).into_response()
}

async fn metrics_handler(
    axum::extract::State(ctx): axum::extract::State<Arc<MetricsContext>>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // Map reads are blocking syscalls; keep them off the runtime's threads.
    let text = tokio::task::spawn_blocking(move || {
        let st = ctx.status();
        // The pins are reopened per scrape: a restarted agent may have replaced a map, and a
        // stale fd would report the old one.
        let maps = Maps::open_pinned(&ctx.pin_dir).ok();
        let mut cache = ctx.cache.lock().expect("cache poisoned");
        render(&st, maps.as_ref(), ctx.watch.as_deref(), &mut cache, ctx.per_frontend)
    })
    .await
    .unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn healthz_handler(
    axum::extract::State(ctx): axum::extract::State<Arc<MetricsContext>>,
) -> axum::response::Response {
    let (code, body) = healthz(&ctx.status());
    ctx.count("/healthz", code);
    json(code, body)
}

async fn livez_handler(
    axum::extract::State(ctx): axum::extract::State<Arc<MetricsContext>>,
) -> axum::response::Response {
    let (code, body) = livez(&ctx.status());
    ctx.count("/livez", code);
    json(code, body)
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/livez` (all on every listener, as
/// kube-proxy's metrics server also answers `/healthz`).
pub async fn serve(addr: SocketAddr, ctx: Arc<MetricsContext>) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /livez");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/healthz", axum::routing::get(healthz_handler))
        .route("/livez", axum::routing::get(livez_handler))
        .with_state(ctx);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(%addr, error = %e, "metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_healthz_needs_sync_and_attach() {
        let mut st = AgentStatus::default();
        st.record_sync(Duration::from_millis(3), false, true);
        st.record_sync(Duration::from_millis(200), true, false);
        let mut cache = CountCache { at: None, cost: Duration::ZERO, conntrack: 0, conntrack_new: 0, affinity: 0 };
        let text = render(&st, None, None, &mut cache, false);
        assert!(text.contains("lb_sync_duration_seconds_bucket{le=\"0.001\"} 0"), "{text}");
        assert!(text.contains("lb_sync_duration_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("lb_sync_duration_seconds_bucket{le=\"0.25\"} 2"), "{text}");
        assert!(text.contains("lb_sync_duration_seconds_count 2"), "{text}");
        assert!(text.contains("lb_sync_failures_total 1"), "{text}");
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"), "{text}");
        assert!(text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds "), "{text}");
        assert_eq!(healthz(&st).0, 503);
        st.synced = true;
        assert_eq!(healthz(&st).0, 503);
        st.attached = true;
        assert_eq!(healthz(&st).0, 200);
        assert!(text.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1"), "{text}");
        assert!(text.contains("kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("lb_service_packets_total"), "per-frontend series only behind the flag");
    }

    /// The lines of one metric family in an exposition.
    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.split([' ', '{']).next().is_some_and(|n| n.starts_with(name))).collect()
    }

    /// The exact exposition kube-proxy's scrapers read: every bucket bound, cumulative counts,
    /// an observation past the last bound only in `+Inf`, `_sum` and `_count`.
    #[test]
    fn histogram_exposition_is_kube_proxy_s() {
        let mut st = AgentStatus::default();
        for ms in [3, 200, 200, 40_000] {
            st.record_sync(Duration::from_millis(ms), false, ms == 3);
        }
        let text = render(
            &st,
            None,
            None,
            &mut CountCache { at: None, cost: Duration::ZERO, conntrack: 0, conntrack_new: 0, affinity: 0 },
            false,
        );
        assert!(text.contains("\n# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n"), "{text}");
        // Bounds printed as Go prints them (`1`, not `1.0`), as kube-proxy's are.
        let want = [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.005\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.01\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.05\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.1\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.25\"} 3",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.5\"} 3",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"1\"} 3",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"5\"} 3",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"30\"} 3",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 4",
            "kubeproxy_sync_proxy_rules_duration_seconds_sum 40.403",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 4",
        ];
        assert_eq!(family(&text, "kubeproxy_sync_proxy_rules_duration_seconds"), want, "{text}");
        let partial = family(&text, "kubeproxy_sync_partial_proxy_rules_duration_seconds_");
        assert!(partial.contains(&"kubeproxy_sync_partial_proxy_rules_duration_seconds_count 3"), "{partial:#?}");
        assert!(
            partial.contains(&"kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.1\"} 0"),
            "{partial:#?}"
        );
        assert!(
            partial.contains(&"kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"30\"} 2"),
            "{partial:#?}"
        );
        assert_eq!(family(&text, "lb_sync_duration_seconds_bucket").len(), 11, "{text}");
        let lb: Vec<String> = family(&text, "lb_sync_duration_seconds_")
            .iter()
            .map(|l| l.replace("lb_sync", "kubeproxy_sync_proxy_rules"))
            .collect();
        assert_eq!(lb, want, "lb's own name, the same series");
    }

    /// kube-proxy's rules: a change waiting longer than the health timeout makes `/healthz`
    /// and `/livez` fail; applying it heals both; a Node being deleted (or tainted for it)
    /// fails `/healthz` only.
    #[test]
    fn healthz_and_livez_follow_queued_changes_and_the_node() {
        let mut st = AgentStatus { synced: true, attached: true, ..Default::default() };
        // Long enough that the two checks right after queueing come well within it on a
        // loaded machine.
        st.health_timeout = Duration::from_millis(500);
        assert_eq!((healthz(&st).0, livez(&st).0), (200, 200));
        st.queued(1, 0);
        assert_eq!((healthz(&st).0, livez(&st).0), (200, 200), "queued but not late yet");
        std::thread::sleep(Duration::from_millis(520));
        assert_eq!((healthz(&st).0, livez(&st).0), (503, 503));
        let text = render(
            &st,
            None,
            None,
            &mut CountCache { at: None, cost: Duration::ZERO, conntrack: 0, conntrack_new: 0, affinity: 0 },
            false,
        );
        assert!(text.contains("kubeproxy_sync_proxy_rules_service_changes_pending 1"), "{text}");
        assert!(text.contains("kubeproxy_sync_proxy_rules_service_changes_total 1"), "{text}");
        st.updated();
        assert_eq!((healthz(&st).0, livez(&st).0), (200, 200));
        st.node_eligible = false;
        assert_eq!((healthz(&st).0, livez(&st).0), (503, 200));
        st.network_programming.observe(0.3);
        st.network_programming.observe(70.0);
        let text = render(
            &st,
            None,
            None,
            &mut CountCache { at: None, cost: Duration::ZERO, conntrack: 0, conntrack_new: 0, affinity: 0 },
            false,
        );
        let h = family(&text, "kubeproxy_network_programming_duration_seconds_");
        assert_eq!(h.len(), 61 + 12 + 7 + 1 + 2, "kube-proxy's bounds, +Inf, _sum, _count: {h:#?}");
        for (le, n) in [("0.25", 0), ("0.5", 1), ("59", 1), ("65", 1), ("70", 2), ("300", 2), ("+Inf", 2)] {
            let line = format!("kubeproxy_network_programming_duration_seconds_bucket{{le=\"{le}\"}} {n}");
            assert!(h.contains(&line.as_str()), "{line} in {h:#?}");
        }
        assert!(h.contains(&"kubeproxy_network_programming_duration_seconds_count 2"), "{h:#?}");
    }
}
