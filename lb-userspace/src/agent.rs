//! The agent's loop: sources (the API server's reflectors or YAML files) -> the objects that
//! changed -> translation -> the datapath, and the interfaces and node addresses it follows.
//! `main.rs` only turns the command line into [`Options`].
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use crate::{
    dataplane::{self, Config, Dataplane, DataplaneError},
    kube_source::{self, KubeSourceError},
    manifests, metrics,
    model::{self, Cidr},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kube(#[from] KubeSourceError),
    #[error("loading the datapath with pin directory {pin_dir}")]
    Load { pin_dir: PathBuf, source: DataplaneError },
    #[error("attaching to cgroup {cgroup}")]
    Cgroup { cgroup: PathBuf, source: DataplaneError },
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("installing the {what} handler")]
    Signal { what: &'static str, source: std::io::Error },
}

/// Where desired state is read from.
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// YAML: a file or a directory of files.
    Manifests(PathBuf),
    /// The API server; `kubeconfig` as any client finds it when `None`.
    Kube { kubeconfig: Option<PathBuf>, watch_retry_max: Duration },
}

/// Everything `lb run` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub node_name: String,
    pub pin_dir: PathBuf,
    pub source: SourceOptions,
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
    /// tc on interfaces matching these globs; empty: every interface but `lo`.
    pub ifaces: Vec<String>,
    /// XDP on interfaces matching these globs; empty: none.
    pub xdp_ifaces: Vec<String>,
    /// The cgroup for socket-level translation; `None`: none.
    pub cgroup: Option<PathBuf>,
    pub nodeport_addresses: Vec<Cidr>,
    pub dataplane: Config,
}

/// Where desired state comes from.
enum Source {
    /// YAML files, re-read on every tick; `last` is what was applied.
    Manifests { path: PathBuf, last: Option<Vec<(PathBuf, String)>> },
    /// The API server, through reflectors.
    Kube(kube_source::KubeSource),
}

/// The objects to translate, when they changed since the last apply.
struct Objects {
    services: Vec<std::sync::Arc<k8s_openapi::api::core::v1::Service>>,
    slices: Vec<std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>>,
    node: model::NodeInfo,
}

impl Source {
    /// `Some` when there is a new complete view to apply. `dirty` is set by watch events.
    fn poll(&mut self, node_name: &str, dirty: &mut bool, synced: bool) -> Option<Objects> {
        match self {
            Source::Manifests { path, last } => match manifests::read_all(path) {
                Ok(files) if last.as_ref() != Some(&files) => {
                    let (objects, errors) = manifests::parse(&files);
                    for e in &errors {
                        error!(error = %e, "manifest object rejected");
                    }
                    *last = Some(files);
                    Some(Objects {
                        services: objects.services.into_iter().map(std::sync::Arc::new).collect(),
                        slices: objects.slices.into_iter().map(std::sync::Arc::new).collect(),
                        node: model::NodeInfo::named(node_name),
                    })
                }
                Ok(_) => None,
                // Keep serving the last good state: a manifest being rewritten is not an outage.
                Err(e) => {
                    warn!(error = %e, "cannot read manifests; keeping the current state");
                    None
                }
            },
            Source::Kube(k) => {
                // Apply on a change, and until the first apply has happened.
                let wanted = *dirty || !synced;
                if !wanted || !k.ready() {
                    return None;
                }
                *dirty = false;
                let snap = k.snapshot();
                Some(Objects { services: snap.services, slices: snap.slices, node: snap.node })
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. The programs and maps stay pinned afterwards, so
/// traffic keeps flowing.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    let config = opts.dataplane;
    if config.node_ip.is_none() {
        warn!("no --node-ip and no default route: external traffic to backends on other nodes is not SNATed");
    }
    // The API client first: a bad kubeconfig must fail before anything is loaded or attached.
    let mut source = match &opts.source {
        SourceOptions::Manifests(path) => Source::Manifests { path: path.clone(), last: None },
        SourceOptions::Kube { kubeconfig, watch_retry_max } => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            let backoff = kube_source::WatchBackoff::new(
                Duration::from_millis(500),
                (*watch_retry_max).max(Duration::from_secs(1)),
            );
            info!(
                "watching Services, EndpointSlices and this Node; nothing is programmed before their first full list"
            );
            Source::Kube(kube_source::KubeSource::start(client, &opts.node_name, backoff))
        }
    };
    let mut dp = Dataplane::load(&opts.pin_dir, &config)
        .map_err(|source| AgentError::Load { pin_dir: opts.pin_dir.clone(), source })?;
    info!(node = %opts.node_name, pin_dir = %opts.pin_dir.display(), "datapath loaded");
    if let Some(cg) = &opts.cgroup {
        dp.attach_socket_lb(cg).map_err(|source| AgentError::Cgroup { cgroup: cg.clone(), source })?;
    }

    let (changed, watch_stats) = match &source {
        Source::Kube(k) => (Some(k.changed.clone()), Some(k.stats.clone())),
        Source::Manifests { .. } => (None, None),
    };
    let status: metrics::SharedStatus = Default::default();
    {
        let mut st = status.lock().expect("status poisoned");
        st.conntrack_capacity = config.sizes.conntrack;
        st.affinity_capacity = config.sizes.affinity;
        st.stale_udp_flows_removed = dp.stale_udp_counter();
    }
    let mut servers = Vec::new();
    if let Some(addr) = opts.metrics_addr {
        servers.push(metrics::serve(addr, opts.pin_dir.clone(), status.clone(), watch_stats.clone()).await?);
    }
    if let Some(addr) = opts.healthz_addr.filter(|a| Some(*a) != opts.metrics_addr) {
        servers.push(metrics::serve(addr, opts.pin_dir.clone(), status.clone(), watch_stats).await?);
    }

    let globs = opts.ifaces.clone();
    let wanted = move |name: &str| dataplane::interface_wanted(&globs, name);
    let xdp_globs = opts.xdp_ifaces.clone();
    let xdp_wanted = move |name: &str| !xdp_globs.is_empty() && dataplane::interface_wanted(&xdp_globs, name);

    let mut poll = tokio::time::interval(Duration::from_millis(500));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Signal { what: "SIGTERM", source })?;
    let mut health = crate::healthcheck::HealthChecks::default();
    let mut tick: u64 = 0;
    let mut node_addrs = Vec::new();
    let (mut dirty, mut synced, mut attached) = (false, false, false);
    let mut waiting_logged = Instant::now();
    loop {
        let notified = async {
            match &changed {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = poll.tick() => { tick += 1; }
            _ = notified => {
                // Coalesce a burst (a rollout updates many slices at once) into one apply.
                tokio::time::sleep(Duration::from_millis(50)).await;
                dirty = true;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        // From the snapshot (or the file read) to the last map write: what one sync costs.
        let started = Instant::now();
        if let Some(objects) = source.poll(&opts.node_name, &mut dirty, synced) {
            let t = model::translate(
                objects.services.iter().map(|s| s.as_ref()),
                objects.slices.iter().map(|s| s.as_ref()),
                &objects.node,
            );
            for e in &t.errors {
                error!(error = %e, "object rejected");
            }
            let report = dp.apply(&t.state);
            for e in &report.errors {
                error!(error = %e, "programming failed");
            }
            for e in health.update(&t.state.health_checks).await {
                error!(error = %e, "health check server failed");
            }
            info!(
                services = objects.services.len(),
                slices = objects.slices.len(),
                added = report.added,
                updated = report.updated,
                removed = report.removed,
                unchanged = report.unchanged,
                failed = report.errors.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "desired state applied"
            );
            let mut st = status.lock().expect("status poisoned");
            st.record_sync(started.elapsed(), !report.errors.is_empty());
            (st.programmed_frontends, st.programmed_endpoints) = dp.programmed();
            st.rejected_objects = t.errors.len();
            st.stale_udp_sockets_closed += report.stale_udp_sockets as u64;
            st.synced = true;
            synced = true;
        } else if !synced && waiting_logged.elapsed() > Duration::from_secs(10) {
            warn!("still waiting for the first full list of Services and EndpointSlices; pinned state keeps serving");
            waiting_logged = Instant::now();
        }
        // Attach only once something is programmed, so the first packet an interface sees is
        // served; then follow interfaces and node addresses every second.
        if synced && (!attached || tick.is_multiple_of(2)) {
            match dp.sync_node_addresses(&opts.nodeport_addresses) {
                Ok(addrs) if addrs != node_addrs => {
                    info!(addresses = ?addrs, "node port addresses");
                    node_addrs = addrs;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot update node port addresses"),
            }
            for e in dp.sync_interfaces(&wanted, &xdp_wanted) {
                warn!(error = %e, "attach failed");
            }
            if !attached {
                dp.finish_migrations();
                attached = true;
                status.lock().expect("status poisoned").attached = true;
                info!(interfaces = ?dp.attached_interfaces(), "agent ready: services programmed and interfaces attached");
            }
        }
        // Replaced slot generations whose grace has passed.
        dp.collect_retired();
        debug!("poll");
    }
    for s in servers {
        s.abort();
    }
    // Packets that read a service entry just before the last flip may still use the old slots.
    tokio::time::sleep(dp.retired_grace_left()).await;
    dp.collect_retired();
    info!("stopping; programs and maps stay pinned so traffic keeps flowing (lb cleanup removes them)");
    Ok(())
}

/// The first IPv4 address of the interface holding the default route (`/proc/net/route` is
/// per network namespace).
pub fn default_route_address() -> Option<std::net::Ipv4Addr> {
    let iface = default_route_interface()?;
    dataplane::local_ipv4_by_interface().ok()?.into_iter().find(|(i, _)| *i == iface).map(|(_, ip)| ip)
}

/// The interface holding the IPv4 default route, if any.
pub fn default_route_interface() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")).then(|| f[0].to_string())
    })
}
