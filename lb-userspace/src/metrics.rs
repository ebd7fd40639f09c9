//! Prometheus metrics (`--metrics-addr`, kube-proxy's 127.0.0.1:10249) and `/healthz`
//! (`--healthz-addr`). The datapath counters are read from the pinned maps at scrape time; what
//! only the agent knows (syncs, programmed counts, watch health) is kept in [`AgentStatus`].
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::{Counter, COUNTER_MAX};
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

/// Upper bounds (seconds) of the sync duration histogram's buckets.
const SYNC_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// What the agent reports about itself.
#[derive(Debug, Default)]
pub struct AgentStatus {
    /// The first full state has been programmed.
    pub synced: bool,
    /// The programs are attached where they should be.
    pub attached: bool,
    pub syncs: u64,
    pub sync_failures: u64,
    pub last_sync_unix_s: f64,
    pub sync_duration_sum_s: f64,
    pub sync_buckets: [u64; SYNC_BUCKETS.len()],
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
}

impl AgentStatus {
    /// Records one apply of a full desired state.
    pub fn record_sync(&mut self, took: Duration, failed: bool) {
        self.syncs += 1;
        if failed {
            self.sync_failures += 1;
        }
        let s = took.as_secs_f64();
        self.sync_duration_sum_s += s;
        for (i, b) in SYNC_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.sync_buckets[i] += 1;
            }
        }
        self.last_sync_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    }
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

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

/// Renders the Prometheus text exposition.
fn render(status: &AgentStatus, maps: Option<&Maps>, watch: Option<&WatchStats>, cache: &mut CountCache) -> String {
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(&mut o, "lb_sync_total", "counter", "Applies of the full desired state to the maps.");
    let _ = writeln!(o, "lb_sync_total {}", status.syncs);
    family(&mut o, "lb_sync_failures_total", "counter", "Applies in which some frontend failed to program.");
    let _ = writeln!(o, "lb_sync_failures_total {}", status.sync_failures);
    // Also under kube-proxy's names, so dashboards and alerts written for it keep working.
    for (name, help) in [
        ("lb_sync_duration_seconds", "Time to translate and apply one desired state."),
        ("kubeproxy_sync_proxy_rules_duration_seconds", "kube-proxy's name for lb_sync_duration_seconds."),
    ] {
        family(&mut o, name, "histogram", help);
        for (i, b) in SYNC_BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {}", status.sync_buckets[i]);
        }
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", status.syncs);
        let _ = writeln!(o, "{name}_sum {}", status.sync_duration_sum_s);
        let _ = writeln!(o, "{name}_count {}", status.syncs);
    }
    for (name, help) in [
        ("lb_last_sync_timestamp_seconds", "Unix time of the last apply."),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "kube-proxy's name for lb_last_sync_timestamp_seconds."),
    ] {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {}", status.last_sync_unix_s);
    }
    family(&mut o, "lb_programmed_frontends", "gauge", "Service frontends (address, port, protocol) programmed.");
    let _ = writeln!(o, "lb_programmed_frontends {}", status.programmed_frontends);
    family(&mut o, "lb_programmed_endpoints", "gauge", "Backends summed over programmed frontends.");
    let _ = writeln!(o, "lb_programmed_endpoints {}", status.programmed_endpoints);
    family(&mut o, "lb_rejected_objects", "gauge", "Services and EndpointSlices left out as invalid.");
    let _ = writeln!(o, "lb_rejected_objects {}", status.rejected_objects);
    family(&mut o, "lb_stale_udp_flows_removed_total", "counter", "UDP flows removed because their backend left.");
    let _ = writeln!(
        o,
        "lb_stale_udp_flows_removed_total {}",
        status.stale_udp_flows_removed.load(std::sync::atomic::Ordering::Relaxed)
    );
    family(
        &mut o,
        "lb_stale_udp_sockets_closed_total",
        "counter",
        "The node's own connected UDP sockets aborted because their backend left.",
    );
    let _ = writeln!(o, "lb_stale_udp_sockets_closed_total {}", status.stale_udp_sockets_closed);
    if let Some(w) = watch {
        use std::sync::atomic::Ordering::Relaxed;
        family(&mut o, "lb_watch_events_total", "counter", "Events received from the API server.");
        let _ = writeln!(o, "lb_watch_events_total {}", w.events.load(Relaxed));
        family(&mut o, "lb_watch_errors_total", "counter", "Failed watch or list requests (retried).");
        let _ = writeln!(o, "lb_watch_errors_total {}", w.errors.load(Relaxed));
        family(&mut o, "lb_watch_relists_total", "counter", "Full lists completed (start, 410 Gone, reconnect).");
        let _ = writeln!(o, "lb_watch_relists_total {}", w.relists.load(Relaxed));
    }
    let Some(maps) = maps else { return o };

    family(&mut o, "lb_packets_total", "counter", "Datapath verdicts by hook (tc, xdp, sock) and verdict.");
    let sum = |idx: u32| -> u64 { maps.stats.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    for (hook, hook_name) in ["tc", "xdp", "sock"].iter().enumerate() {
        for c in Counter::ALL {
            let _ = writeln!(
                o,
                "lb_packets_total{{hook=\"{hook_name}\",verdict=\"{}\"}} {}",
                c.name(),
                sum(hook as u32 * COUNTER_MAX + c as u32)
            );
        }
    }
    family(&mut o, "lb_no_endpoint_rejects_total", "counter", "New flows to a Service without endpoints, refused.");
    let rejects: u64 = (0..3).map(|h| sum(h * COUNTER_MAX + Counter::RejectNoBackend as u32)).sum();
    let _ = writeln!(o, "lb_no_endpoint_rejects_total {rejects}");
    family(&mut o, "lb_drops_total", "counter", "Packets dropped by the datapath, by reason.");
    for c in Counter::ALL.iter().filter(|c| c.name().starts_with("drop_")) {
        let n: u64 = (0..3).map(|h| sum(h * COUNTER_MAX + *c as u32)).sum();
        let _ = writeln!(o, "lb_drops_total{{reason=\"{}\"}} {n}", &c.name()["drop_".len()..]);
    }

    if cache.at.is_none_or(|t| t.elapsed() > cache.cost * 20) {
        let started = Instant::now();
        cache.conntrack = maps.conntrack.keys().filter(Result::is_ok).count();
        cache.conntrack_new = maps.conntrack_new.keys().filter(Result::is_ok).count();
        cache.affinity = maps.affinity.keys().filter(Result::is_ok).count();
        cache.cost = started.elapsed();
        cache.at = Some(Instant::now());
    }
    family(&mut o, "lb_conntrack_entries", "gauge", "Conntrack entries in use, both tables (two per flow).");
    let _ = writeln!(o, "lb_conntrack_entries {}", cache.conntrack + cache.conntrack_new);
    family(&mut o, "lb_conntrack_assured_entries", "gauge", "Entries of live connections (the assured table).");
    let _ = writeln!(o, "lb_conntrack_assured_entries {}", cache.conntrack);
    family(
        &mut o,
        "lb_conntrack_capacity",
        "gauge",
        "Capacity of the assured table (never evicted; new flows have an LRU of their own).",
    );
    let _ = writeln!(o, "lb_conntrack_capacity {}", status.conntrack_capacity);
    family(
        &mut o,
        "lb_conntrack_collected_total",
        "counter",
        "Assured flows removed after idling past their lifetime.",
    );
    let _ = writeln!(
        o,
        "lb_conntrack_collected_total {}",
        status.conntrack_collected.load(std::sync::atomic::Ordering::Relaxed)
    );
    family(&mut o, "lb_affinity_entries", "gauge", "Session affinity pins in use.");
    let _ = writeln!(o, "lb_affinity_entries {}", cache.affinity);
    family(&mut o, "lb_affinity_capacity", "gauge", "Session affinity map capacity (LRU).");
    let _ = writeln!(o, "lb_affinity_capacity {}", status.affinity_capacity);

    // Per frontend: id -> (frontend, service name).
    let names: BTreeMap<u32, String> =
        maps.names.iter().filter_map(Result::ok).map(|(id, n)| (id, decode_name(&n))).collect();
    let mut rows: Vec<(String, String, u64, u64)> = Vec::new();
    for (k, v) in maps.services.iter().filter_map(Result::ok) {
        let frontend = frontend_of(&k, v.flags).map(|f| f.to_string()).unwrap_or_default();
        let (mut packets, mut bytes) = (0, 0);
        if let Ok(per_cpu) = maps.service_stats.get(&v.id, 0) {
            for s in per_cpu.iter() {
                packets += s.packets;
                bytes += s.bytes;
            }
        }
        rows.push((names.get(&v.id).cloned().unwrap_or_default(), frontend, packets, bytes));
    }
    rows.sort();
    family(&mut o, "lb_service_packets_total", "counter", "Packets clients sent to a Service frontend.");
    for (svc, fe, p, _) in &rows {
        let _ = writeln!(o, "lb_service_packets_total{{service=\"{}\",frontend=\"{}\"}} {p}", escape(svc), escape(fe));
    }
    family(&mut o, "lb_service_bytes_total", "counter", "Bytes clients sent to a Service frontend.");
    for (svc, fe, _, b) in &rows {
        let _ = writeln!(o, "lb_service_bytes_total{{service=\"{}\",frontend=\"{}\"}} {b}", escape(svc), escape(fe));
    }
    o
}

/// `/healthz`: 200 once the first full state is programmed and the programs attached, as
/// kube-proxy's (a JSON body with the last update time).
fn healthz(status: &AgentStatus) -> (u16, String) {
    let healthy = status.synced && status.attached;
    let body = serde_json::json!({
        "lastUpdated": status.last_sync_unix_s,
        "currentTime": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        "synced": status.synced,
        "attached": status.attached,
    })
    .to_string();
    (if healthy { 200 } else { 503 }, body)
}

/// Binds `addr` and serves `/metrics` and `/healthz` (both on every listener, as kube-proxy's
/// metrics server also answers `/healthz`).
pub async fn serve(
    addr: SocketAddr,
    pin_dir: std::path::PathBuf,
    status: SharedStatus,
    watch: Option<Arc<WatchStats>>,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    let cache = Arc::new(Mutex::new(CountCache {
        at: None,
        cost: Duration::ZERO,
        conntrack: 0,
        conntrack_new: 0,
        affinity: 0,
    }));
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { continue };
            let (status, watch, pin_dir, cache) = (status.clone(), watch.clone(), pin_dir.clone(), cache.clone());
            tokio::spawn(async move {
                let head = crate::healthcheck::read_request_head(&mut conn).await;
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
                // Map reads are blocking syscalls; keep them off the runtime's thread.
                let (code, ctype, body) = tokio::task::spawn_blocking(move || {
                    let st = status.lock().expect("status poisoned");
                    match path.as_str() {
                        "/metrics" => {
                            // The pins are reopened per scrape: a restarted agent may have
                            // replaced a map, and a stale fd would report the old one.
                            let maps = Maps::open_pinned(&pin_dir).ok();
                            let mut cache = cache.lock().expect("cache poisoned");
                            let text = render(&st, maps.as_ref(), watch.as_deref(), &mut cache);
                            (200, "text/plain; version=0.0.4", text)
                        }
                        "/healthz" => {
                            let (code, body) = healthz(&st);
                            (code, "application/json", body)
                        }
                        // The process answers: a liveness probe must not restart an agent that
                        // is only waiting for an unreachable API server (the pinned datapath
                        // serves meanwhile, and a restart would not reach it any sooner).
                        "/livez" => (200, "text/plain", "ok\n".to_string()),
                        _ => (404, "text/plain", "not found\n".to_string()),
                    }
                })
                .await
                .unwrap_or((500, "text/plain", "internal error\n".to_string()));
                crate::healthcheck::write_response(&mut conn, code, ctype, &body).await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_healthz_needs_sync_and_attach() {
        let mut st = AgentStatus::default();
        st.record_sync(Duration::from_millis(3), false);
        st.record_sync(Duration::from_millis(200), true);
        let mut cache = CountCache { at: None, cost: Duration::ZERO, conntrack: 0, conntrack_new: 0, affinity: 0 };
        let text = render(&st, None, None, &mut cache);
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
    }
}
