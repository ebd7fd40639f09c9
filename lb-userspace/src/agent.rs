//! The agent's loop, shaped like kube-proxy's: sources (the API server's watches, or YAML
//! files) send every change by name to one thread, the proxier, which records them (the
//! change set), translates only what changed and applies the difference to the datapath, and
//! follows the node's interfaces and addresses. Translation and map writes never run on the
//! async runtime, so `/healthz`, `/metrics` and the watches keep answering during a large
//! sync. `main.rs` only turns the command line into [`Options`].
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{mpsc, Arc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tracing::{debug, error, info, warn};

use crate::{
    dataplane::{self, Config, Dataplane, DataplaneError},
    file_events::FileEvents,
    kube_source::{self, KubeSourceError},
    manifests::{self, ManifestWatcher, ObjectChange},
    metrics,
    model::{Cidr, Frontend, HealthCheck, NodeInfo, TranslateError, Translator},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kube(#[from] KubeSourceError),
    #[error("loading the datapath with pin directory {pin_dir}")]
    Load { pin_dir: PathBuf, source: Box<DataplaneError> },
    #[error("attaching to cgroup {cgroup}")]
    Cgroup { cgroup: PathBuf, source: Box<DataplaneError> },
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("installing the {what} handler")]
    Signal { what: &'static str, source: std::io::Error },
    #[error("starting the {what} thread")]
    Thread { what: &'static str, source: std::io::Error },
}

/// Where desired state is read from.
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// YAML: a file or a directory of files.
    Manifests(PathBuf),
    /// The API server; `kubeconfig` as any client finds it when `None`.
    Kube { kubeconfig: Option<PathBuf> },
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
    /// The cluster's pod CIDRs (`--cluster-cidr`, as kube-proxy's): their sources, with this
    /// node's pod CIDRs, get cluster-wide endpoints at `externalTrafficPolicy: Local` external
    /// frontends.
    pub cluster_cidrs: Vec<Cidr>,
    /// The `/proc/sys` whose strict reverse-path filtering is made loose (`rp_filter.rs`,
    /// `--relax-rp-filter`); `None`: left alone, the default.
    pub rp_filter: Option<PathBuf>,
    pub dataplane: Config,
    /// At least one sync per period; `/healthz` fails when a change has waited twice as long.
    pub sync_period: Duration,
    /// Everything is translated and compared again this often (the incremental result is
    /// checked against it).
    pub full_sync_period: Duration,
    /// Per-frontend packet and byte series in `/metrics`.
    pub per_frontend_metrics: bool,
}

/// One change of an object kind, as a source saw it.
pub enum ObjectEvent<K> {
    Apply(Arc<K>),
    Delete(Arc<K>),
    /// A complete (re)list: what is not in it no longer exists.
    Relist(Vec<Arc<K>>),
}

/// What the proxier thread is told.
pub enum Update {
    Services(ObjectEvent<Service>),
    Slices(ObjectEvent<EndpointSlice>),
    Node(ObjectEvent<Node>),
    /// The node's interfaces or addresses changed.
    Links,
    Shutdown,
}

/// The sending side of the proxier's queue. Every object change is also recorded as queued
/// (kube-proxy's `QueuedUpdate`), which `/healthz` and the metrics read.
#[derive(Clone)]
pub struct Updates {
    tx: mpsc::Sender<Update>,
    status: metrics::SharedStatus,
}

impl Updates {
    pub fn send(&self, u: Update) {
        let (services, endpoints) = match &u {
            Update::Services(e) => (e.count(), 0),
            Update::Slices(e) => (0, e.count()),
            _ => (0, 0),
        };
        if services + endpoints > 0 {
            self.status.lock().expect("status poisoned").queued(services, endpoints);
        }
        let _ = self.tx.send(u);
    }
}

impl<K> ObjectEvent<K> {
    fn count(&self) -> usize {
        match self {
            ObjectEvent::Apply(_) | ObjectEvent::Delete(_) => 1,
            ObjectEvent::Relist(v) => v.len().max(1),
        }
    }
}

/// A rejected Service to report as a Warning Event (API mode).
pub struct Rejection {
    pub service: String,
    pub reason: &'static str,
    pub message: String,
}

/// Runs the agent until SIGINT or SIGTERM. The programs and maps stay pinned afterwards, so
/// traffic keeps flowing.
pub async fn run(opts: Options) -> Result<(), AgentError> {
    // Both streams first, kept for the whole run: tokio keeps a signal's handler once it is
    // installed, and a signal that arrives while no stream is listening would be lost.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Signal { what: "SIGTERM", source })?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|source| AgentError::Signal { what: "SIGINT", source })?;
    // Held until this function returns, whatever becomes of the proxier thread.
    let Some(pin_dir_lock) = take_pin_dir(&opts.pin_dir, &mut sigterm, &mut sigint).await? else {
        info!("stopped while waiting for the pin directory; nothing was loaded");
        return Ok(());
    };
    let config = opts.dataplane;
    if config.node_ip.is_none() {
        warn!("no --node-ip and no default route: external traffic to backends on other nodes is not SNATed");
    }
    if config.node_ip6.is_none() {
        info!(
            "no --node-ip6 and no global IPv6 address on the default route's interface: external IPv6 traffic to \
             backends on other nodes is not SNATed"
        );
    }
    let status: metrics::SharedStatus = Default::default();
    let (tx, rx) = mpsc::channel();
    let updates = Updates { tx, status: status.clone() };
    // The API client first: a bad kubeconfig must fail before anything is loaded or attached.
    let (watch_stats, client) = match &opts.source {
        SourceOptions::Manifests(_) => (None, None),
        SourceOptions::Kube { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            info!(
                "watching Services, EndpointSlices and this Node; nothing is programmed before their first full list"
            );
            let stats = kube_source::start(client.clone(), &opts.node_name, updates.clone());
            (Some(stats), Some(client))
        }
    };
    let mut dp = Dataplane::load_locked(&opts.pin_dir, &config, &pin_dir_lock)
        .map_err(|source| AgentError::Load { pin_dir: opts.pin_dir.clone(), source: Box::new(source) })?;
    info!(node = %opts.node_name, pin_dir = %opts.pin_dir.display(), "datapath loaded");
    if let Some(cg) = &opts.cgroup {
        dp.attach_socket_lb(cg)
            .map_err(|source| AgentError::Cgroup { cgroup: cg.clone(), source: Box::new(source) })?;
    }
    {
        let mut st = status.lock().expect("status poisoned");
        st.conntrack_capacity = config.sizes.conntrack;
        st.affinity_capacity = config.sizes.affinity;
        st.stale_udp_flows_removed = dp.stale_udp_counter();
        st.conntrack_collected = dp.ct_collected_counter();
        st.health_timeout = 2 * opts.sync_period;
    }
    let mut servers = Vec::new();
    let ctx =
        metrics::MetricsContext::new(opts.pin_dir.clone(), status.clone(), watch_stats, opts.per_frontend_metrics);
    if let Some(addr) = opts.metrics_addr {
        servers.push(metrics::serve(addr, ctx.clone()).await?);
    }
    if let Some(addr) = opts.healthz_addr.filter(|a| Some(*a) != opts.metrics_addr) {
        servers.push(metrics::serve(addr, ctx).await?);
    }
    if let SourceOptions::Manifests(path) = &opts.source {
        spawn_manifest_watcher(path.clone(), updates.clone())?;
    }
    // Interfaces and addresses as they change; without the subscription, every second.
    let link_poll = match spawn_link_watcher(updates.clone()) {
        Ok(()) => opts.sync_period,
        Err(e) => {
            warn!(error = %e, "no rtnetlink events: interfaces and addresses are polled every second");
            Duration::from_secs(1)
        }
    };

    // Health check node ports follow what the proxier publishes.
    // On the addresses `--nodeport-addresses` selects, once the proxier has read them.
    let (health_tx, health_rx) = tokio::sync::watch::channel(BTreeMap::<u16, HealthCheck>::new());
    let (listen_tx, listen_rx) =
        tokio::sync::watch::channel(crate::healthcheck::Listen::for_node_ports(&opts.nodeport_addresses, &[]));
    servers.push(tokio::spawn(crate::healthcheck::serve(
        status.clone(),
        health_rx,
        listen_rx,
        crate::healthcheck::RETRY,
    )));
    // Warning Events for rejected Services, published off the proxier's thread.
    let (event_tx, mut event_rx) = tokio::sync::mpsc::unbounded_channel::<Rejection>();
    if let Some(client) = client {
        let node = opts.node_name.clone();
        servers.push(tokio::spawn(async move {
            let recorder = crate::events::ServiceEvents::new(client, &node);
            while let Some(r) = event_rx.recv().await {
                recorder.warn(&r).await;
            }
        }));
    }

    let proxier = Proxier::new(dp, &opts, status.clone(), (health_tx, listen_tx), event_tx, link_poll);
    let thread = std::thread::Builder::new()
        .name("lb-proxier".into())
        .spawn(move || proxier.run(rx))
        .map_err(|source| AgentError::Thread { what: "proxier", source })?;

    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    updates.send(Update::Shutdown);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    for s in servers {
        s.abort();
    }
    info!("stopping; programs and maps stay pinned so traffic keeps flowing (lb cleanup removes them)");
    Ok(())
}

/// Takes the pin directory for this agent (`dataplane::PinDirLock`), waiting while another
/// agent holds it: `None` if SIGINT or SIGTERM came first. A DaemonSet's rolling update stops
/// the old pod before it starts the new one, so the wait is for a second `lb run` on a node
/// (or a surge): it says why it waits, and is not ready meanwhile.
async fn take_pin_dir(
    pin_dir: &std::path::Path,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<Option<dataplane::PinDirLock>, AgentError> {
    let load_err = |source| AgentError::Load { pin_dir: pin_dir.to_owned(), source: Box::new(source) };
    let mut waiting = false;
    loop {
        if let Some(lock) = dataplane::PinDirLock::try_acquire(pin_dir).map_err(load_err)? {
            if waiting {
                info!(pin_dir = %pin_dir.display(), "the other agent has let go of the pin directory; going on");
            }
            return Ok(Some(lock));
        }
        if !waiting {
            warn!(pin_dir = %pin_dir.display(), "another agent holds this pin directory; waiting for it to exit");
            waiting = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = sigint.recv() => return Ok(None),
            _ = sigterm.recv() => return Ok(None),
        }
    }
}

/// How often the manifests' stamps are looked at without a file event.
const MANIFEST_POLL: Duration = Duration::from_millis(500);

/// Follows the manifests under `path` on a thread of its own: the files' stamps are compared
/// whenever inotify reports a file written or moved in the directory, and every 0.5 s in any
/// case; only changed files are read and parsed again.
fn spawn_manifest_watcher(path: PathBuf, updates: Updates) -> Result<(), AgentError> {
    let mut watcher = ManifestWatcher::new(&path);
    // Set up before the first read, so that no change after it goes unreported.
    let mut events = match FileEvents::new(&path) {
        Ok(e) => {
            info!(path = %path.display(), "following manifest file events (inotify), and file stamps every 0.5 s");
            Some(e)
        }
        Err(e) => {
            warn!(error = %e, "no file events; a manifest change is seen within 0.5 s (file stamps)");
            None
        }
    };
    let run = move || {
        let mut first = true;
        let mut failing = false;
        let mut events_failing = false;
        loop {
            match watcher.poll() {
                Ok(changes) => {
                    failing = false;
                    for e in &changes.errors {
                        error!(error = %e, "manifest rejected; the file's last good objects stay");
                    }
                    send_manifest_changes(&updates, changes, first);
                    first = false;
                }
                // Keep serving the last good state: a manifest being rewritten is not an outage.
                Err(e) if !failing => {
                    warn!(error = %e, "cannot read manifests; keeping the current state");
                    failing = true;
                }
                Err(_) => {}
            }
            match events.as_mut().map(|e| e.wait(MANIFEST_POLL)) {
                Some(Ok(_)) => events_failing = false,
                // The wait slept; the watch is tried again at the next one.
                Some(Err(e)) if !events_failing => {
                    warn!(error = %e, "no file events for now; a manifest change is seen within 0.5 s (file stamps)");
                    events_failing = true;
                }
                Some(Err(_)) => {}
                None => std::thread::sleep(MANIFEST_POLL),
            }
        }
    };
    std::thread::Builder::new()
        .name("lb-manifests".into())
        .spawn(run)
        .map(|_| ())
        .map_err(|source| AgentError::Thread { what: "manifest watcher", source })
}

fn send_manifest_changes(updates: &Updates, changes: manifests::ManifestChanges, first: bool) {
    if first {
        // The first read is the complete state, as a list from the API server would be.
        fn applied<K>(c: ObjectChange<K>) -> Option<Arc<K>> {
            match c {
                ObjectChange::Apply(o) => Some(o),
                ObjectChange::Delete(_) => None,
            }
        }
        updates.send(Update::Services(ObjectEvent::Relist(changes.services.into_iter().filter_map(applied).collect())));
        updates.send(Update::Slices(ObjectEvent::Relist(changes.slices.into_iter().filter_map(applied).collect())));
        return;
    }
    for c in changes.services {
        updates.send(Update::Services(match c {
            ObjectChange::Apply(o) => ObjectEvent::Apply(o),
            ObjectChange::Delete(o) => ObjectEvent::Delete(o),
        }));
    }
    for c in changes.slices {
        updates.send(Update::Slices(match c {
            ObjectChange::Apply(o) => ObjectEvent::Apply(o),
            ObjectChange::Delete(o) => ObjectEvent::Delete(o),
        }));
    }
}

/// Sends [`Update::Links`] whenever an interface or address of this namespace changes.
fn spawn_link_watcher(updates: Updates) -> Result<(), crate::links::LinksError> {
    let mut events = crate::links::LinkEvents::subscribe()?;
    let run = move || loop {
        match events.wait() {
            Ok(true) => updates.send(Update::Links),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "rtnetlink events failed: interfaces and addresses are polled every second");
                loop {
                    updates.send(Update::Links);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    };
    std::thread::Builder::new().name("lb-links".into()).spawn(run).map(|_| ()).map_err(crate::links::LinksError::Socket)
}

/// kube-proxy's `endpoints.kubernetes.io/last-change-trigger-time`: when the change that led to
/// this slice happened, for the network programming latency.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(slice: &EndpointSlice) -> Option<f64> {
    let t = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let ts: k8s_openapi::jiff::Timestamp = t.parse().ok()?;
    Some(ts.as_millisecond() as f64 / 1000.0)
}

/// A Node's pod CIDRs of both families (`spec.podCIDRs`, else `spec.podCIDR`).
fn node_pod_cidrs(node: &Node) -> Vec<Cidr> {
    let spec = node.spec.as_ref();
    let mut list: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if list.is_empty() {
        list.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    list.iter().filter_map(|c| c.parse().ok()).collect()
}

/// Whether the Node leaves this proxy healthy for load balancers (kube-proxy's
/// `nodeEligible`): not when it is being deleted, or tainted for deletion by the cluster
/// autoscaler, so load balancers drain it before it goes.
fn node_eligible(node: &Node) -> bool {
    const TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
    node.metadata.deletion_timestamp.is_none()
        && !node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED))
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The thread that owns the translation and the datapath.
struct Proxier {
    dp: Dataplane,
    translator: Translator,
    status: metrics::SharedStatus,
    health_tx: tokio::sync::watch::Sender<BTreeMap<u16, HealthCheck>>,
    /// Where the health check servers listen, following the node port addresses.
    health_listen: tokio::sync::watch::Sender<crate::healthcheck::Listen>,
    events: tokio::sync::mpsc::UnboundedSender<Rejection>,
    node_name: String,
    tc_globs: Vec<String>,
    xdp_globs: Vec<String>,
    nodeport_addresses: Vec<Cidr>,
    cluster_cidrs: Vec<Cidr>,
    /// This node's `spec.podCIDRs` (both families), from its Node object.
    node_pod_cidrs: Vec<Cidr>,
    rp_filter: Option<crate::rp_filter::RpFilter>,
    full_sync_period: Duration,
    services_listed: bool,
    slices_listed: bool,
    synced: bool,
    attached: bool,
    links_dirty: bool,
    node_addrs: Vec<IpAddr>,
    /// Frontends whose map writes failed, retried with back-off.
    failed: BTreeSet<Frontend>,
    retry_delay: Duration,
    retry_at: Option<Instant>,
    next_full: Instant,
    next_links: Instant,
    /// Interfaces and addresses are looked at again this often even without an event.
    link_poll: Duration,
    /// Trigger times of endpoint changes not applied yet.
    triggers: Vec<f64>,
    /// Rejections already reported, per Service, so each is reported once.
    reported: HashMap<String, Vec<String>>,
    waiting_logged: Instant,
}

impl Proxier {
    fn new(
        dp: Dataplane,
        opts: &Options,
        status: metrics::SharedStatus,
        (health_tx, health_listen): (
            tokio::sync::watch::Sender<BTreeMap<u16, HealthCheck>>,
            tokio::sync::watch::Sender<crate::healthcheck::Listen>,
        ),
        events: tokio::sync::mpsc::UnboundedSender<Rejection>,
        link_poll: Duration,
    ) -> Self {
        let now = Instant::now();
        Self {
            dp,
            translator: Translator::new(NodeInfo::named(&opts.node_name)),
            status,
            health_tx,
            health_listen,
            events,
            node_name: opts.node_name.clone(),
            tc_globs: opts.ifaces.clone(),
            xdp_globs: opts.xdp_ifaces.clone(),
            nodeport_addresses: opts.nodeport_addresses.clone(),
            cluster_cidrs: opts.cluster_cidrs.clone(),
            node_pod_cidrs: Vec::new(),
            rp_filter: opts.rp_filter.as_deref().map(crate::rp_filter::RpFilter::new),
            full_sync_period: opts.full_sync_period,
            services_listed: false,
            slices_listed: false,
            synced: false,
            attached: false,
            links_dirty: true,
            node_addrs: Vec::new(),
            failed: BTreeSet::new(),
            retry_delay: Duration::from_millis(500),
            retry_at: None,
            next_full: now + opts.full_sync_period,
            next_links: now + link_poll,
            link_poll,
            triggers: Vec::new(),
            reported: HashMap::new(),
            waiting_logged: now,
        }
    }

    /// Receives updates until told to stop; syncs whenever something changed.
    fn run(mut self, rx: mpsc::Receiver<Update>) {
        self.update_local_sources();
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        'outer: loop {
            let wake = self.retry_at.map_or(next_tick, |r| r.min(next_tick));
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(u) => {
                    if !self.handle(u) {
                        break;
                    }
                    // Take everything already queued into this sync (a rollout updates many
                    // slices at once).
                    while let Ok(u) = rx.try_recv() {
                        if !self.handle(u) {
                            break 'outer;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let ready = self.services_listed && self.slices_listed;
            if ready && (self.translator.has_pending() || !self.synced) {
                self.sync();
            } else if !ready && self.waiting_logged.elapsed() > Duration::from_secs(10) {
                warn!(
                    "still waiting for the first full list of Services and EndpointSlices; pinned state keeps serving"
                );
                self.waiting_logged = Instant::now();
            }
            let now = Instant::now();
            if self.retry_at.is_some_and(|r| now >= r) {
                self.retry();
            }
            if now >= next_tick {
                next_tick = now + Duration::from_secs(1);
                self.tick(now);
            }
            // Attach only once something is programmed, so the first packet an interface sees
            // is served.
            if self.synced && self.links_dirty {
                self.sync_links();
            }
        }
        // Packets that read a service entry just before the last flip may still use the old slots.
        std::thread::sleep(self.dp.retired_grace_left());
        self.dp.collect_retired();
    }

    /// Records one update; `false` to stop.
    fn handle(&mut self, u: Update) -> bool {
        match u {
            Update::Services(ObjectEvent::Apply(s)) => self.translator.upsert_service(&s),
            Update::Services(ObjectEvent::Delete(s)) => {
                self.translator.delete_service(s.metadata.namespace.as_ref(), s.metadata.name.as_ref())
            }
            Update::Services(ObjectEvent::Relist(list)) => {
                self.translator.relist_services(list.iter().map(|s| s.as_ref()));
                self.services_listed = true;
            }
            Update::Slices(ObjectEvent::Apply(s)) => {
                self.triggers.extend(trigger_time(&s));
                self.translator.upsert_slice(&s)
            }
            Update::Slices(ObjectEvent::Delete(s)) => {
                self.translator.delete_slice(s.metadata.namespace.as_ref(), s.metadata.name.as_ref())
            }
            Update::Slices(ObjectEvent::Relist(list)) => {
                self.translator.relist_slices(list.iter().map(|s| s.as_ref()));
                self.slices_listed = true;
            }
            Update::Node(e) => {
                let node = match e {
                    ObjectEvent::Apply(n) => Some(n),
                    ObjectEvent::Relist(list) => list.into_iter().next(),
                    ObjectEvent::Delete(_) => {
                        self.status.lock().expect("status poisoned").node_eligible = false;
                        None
                    }
                };
                if let Some(n) = node {
                    self.translator.set_node(NodeInfo::from_node(&self.node_name, Some(&n)));
                    self.status.lock().expect("status poisoned").node_eligible = node_eligible(&n);
                    let pod_cidrs = node_pod_cidrs(&n);
                    if pod_cidrs != self.node_pod_cidrs {
                        self.node_pod_cidrs = pod_cidrs;
                        self.update_local_sources();
                    }
                }
            }
            Update::Links => self.links_dirty = true,
            Update::Shutdown => return false,
        }
        true
    }

    fn sync(&mut self) {
        // From the change set to the last map write: what one sync costs.
        let started = Instant::now();
        let first = !self.synced;
        let changes = self.translator.sync();
        let report = if first {
            // A previous agent's frontends that are no longer wanted are only found by a full
            // comparison.
            self.dp.apply(self.translator.state())
        } else {
            self.dp.apply_changes(self.translator.state(), &changes.frontends)
        };
        let took = started.elapsed();
        for e in &report.errors {
            error!(error = %e, "programming failed; retrying with back-off");
        }
        let tried: BTreeSet<Frontend> =
            if first { self.translator.state().services.keys().copied().collect() } else { changes.frontends.clone() };
        self.note_failures(&tried, &report.failed);
        if first || changes.health_checks {
            let _ = self.health_tx.send(self.translator.state().health_checks.clone());
        }
        self.report_rejections(&changes.touched);
        info!(
            services = changes.services,
            frontends = changes.frontends.len(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            unchanged = report.unchanged,
            failed = report.errors.len(),
            took_ms = took.as_millis() as u64,
            took_us = took.as_micros() as u64,
            "desired state applied"
        );
        let now = unix_now();
        // These walk every frontend and Service: counted before the status lock is taken, so
        // /healthz, /metrics and the health check ports never wait on the walk.
        let programmed = self.dp.programmed();
        let rejected = self.translator.rejected_count();
        let no_local = self.translator.no_local_endpoints();
        let mut st = self.status.lock().expect("status poisoned");
        st.record_sync(took, !report.errors.is_empty(), first);
        for t in self.triggers.drain(..) {
            st.network_programming.observe((now - t).max(0.0));
        }
        (st.programmed_frontends, st.programmed_endpoints) = programmed;
        st.rejected_objects = rejected;
        st.stale_udp_sockets_closed += report.stale_udp_sockets as u64;
        st.no_local_endpoints = no_local;
        st.synced = true;
        drop(st);
        self.synced = true;
    }

    /// Records what a sync of `tried` frontends could not write; frontends written since they
    /// failed leave the retry set.
    fn note_failures(&mut self, tried: &BTreeSet<Frontend>, failed: &[Frontend]) {
        self.failed.retain(|f| !tried.contains(f));
        self.failed.extend(failed.iter().copied());
        if self.failed.is_empty() {
            self.retry_at = None;
            self.retry_delay = Duration::from_millis(500);
        } else if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.retry_delay);
        }
    }

    /// Writes the frontends that failed again (a full map may have room by now), backing off
    /// while they keep failing.
    fn retry(&mut self) {
        let failed = std::mem::take(&mut self.failed);
        let report = self.dp.apply_changes(self.translator.state(), &failed);
        self.failed = report.failed.iter().copied().collect();
        if self.failed.is_empty() {
            info!(frontends = failed.len(), "frontends that had failed are programmed now");
            self.retry_at = None;
            self.retry_delay = Duration::from_millis(500);
        } else {
            self.retry_delay = (self.retry_delay * 2).min(Duration::from_secs(30));
            self.retry_at = Some(Instant::now() + self.retry_delay);
            debug!(frontends = self.failed.len(), next_in = ?self.retry_delay, "frontends still failing");
        }
        let programmed = self.dp.programmed();
        let mut st = self.status.lock().expect("status poisoned");
        (st.programmed_frontends, st.programmed_endpoints) = programmed;
    }

    /// Logs each newly rejected Service (or part of one) once, and asks for a Warning Event on
    /// it; forgets rejections that went away. Only Services the sync touched are read.
    fn report_rejections(&mut self, touched: &BTreeSet<String>) {
        for name in touched {
            let errors: Vec<String> = self.translator.errors_of(name).iter().map(|e| e.to_string()).collect();
            let before = self.reported.remove(name).unwrap_or_default();
            for (e, text) in self.translator.errors_of(name).iter().zip(&errors) {
                if before.contains(text) {
                    continue;
                }
                error!(error = %e, "object rejected");
                // A clash leaves out only the frontends another Service holds; when that is all
                // of them, nothing of this Service is programmed.
                let clash = matches!(e, TranslateError::Conflict { .. } | TranslateError::HealthCheckConflict { .. });
                let whole = e.rejects_object() || (clash && self.translator.crowded_out(name));
                let reason = if whole { "FailedToProgram" } else { "PartlyProgrammed" };
                let _ = self.events.send(Rejection { service: name.clone(), reason, message: text.clone() });
            }
            if !errors.is_empty() {
                self.reported.insert(name.clone(), errors);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        self.dp.collect_retired();
        if self.synced && now >= self.next_full {
            self.next_full = now + self.full_sync_period;
            self.full_resync();
        }
        if now >= self.next_links {
            // A safety net under the rtnetlink events (and the only way without them).
            self.next_links = now + self.link_poll;
            self.links_dirty = true;
        }
        let mut st = self.status.lock().expect("status poisoned");
        st.service_changes_pending = self.translator.pending_service_changes;
        st.endpoint_changes_pending = self.translator.pending_endpoint_changes;
        if !self.translator.has_pending() && self.synced {
            // Nothing waits: the proxier is up to date (kube-proxy's periodic sync).
            st.updated();
        }
    }

    /// Translates everything again and compares every frontend with the maps: the incremental
    /// path is checked against it, and whatever drifted is rewritten.
    fn full_resync(&mut self) {
        let started = Instant::now();
        let incremental = self.translator.state().clone();
        let changes = self.translator.rebuild();
        if !changes.is_empty() || incremental != *self.translator.state() {
            warn!(
                frontends = changes.frontends.len(),
                "the full resync found frontends the incremental translation had wrong; rewriting them"
            );
        }
        let report = self.dp.apply(self.translator.state());
        let tried: BTreeSet<Frontend> = self.translator.state().services.keys().copied().collect();
        self.note_failures(&tried, &report.failed);
        self.report_rejections(&changes.touched);
        let _ = self.health_tx.send(self.translator.state().health_checks.clone());
        info!(
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            took_ms = started.elapsed().as_millis() as u64,
            "full resync done"
        );
        self.status.lock().expect("status poisoned").record_full_sync(started.elapsed());
    }

    /// The sources that count as the cluster's own: `--cluster-cidr` and this node's pod CIDRs.
    fn update_local_sources(&mut self) {
        let mut all = self.cluster_cidrs.clone();
        all.extend(self.node_pod_cidrs.iter().copied());
        all.sort();
        all.dedup();
        match self.dp.set_local_sources(&all) {
            Ok(()) => info!(cidrs = ?all, "sources of the cluster's own (externalTrafficPolicy: Local short-circuit)"),
            Err(e) => warn!(error = %e, "cannot set the cluster's own sources"),
        }
    }

    /// Node port addresses and interfaces, after a change (or at the safety-net poll).
    fn sync_links(&mut self) {
        self.links_dirty = false;
        match self.dp.sync_node_addresses(&self.nodeport_addresses) {
            Ok(addrs) if addrs != self.node_addrs => {
                info!(addresses = ?addrs, "node port addresses");
                let _ = self
                    .health_listen
                    .send(crate::healthcheck::Listen::for_node_ports(&self.nodeport_addresses, &addrs));
                self.node_addrs = addrs;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot update node port addresses"),
        }
        let tc_globs = &self.tc_globs;
        let xdp_globs = &self.xdp_globs;
        let tc = |name: &str| dataplane::interface_wanted(tc_globs, name);
        let xdp = |name: &str| !xdp_globs.is_empty() && dataplane::interface_wanted(xdp_globs, name);
        match self.dp.sync_interfaces(&tc, &xdp) {
            Ok(failures) => {
                for e in failures {
                    warn!(error = %e, "attach failed");
                }
                if let Some(rp) = &mut self.rp_filter {
                    relax_rp_filter(rp, &self.dp.tc_interfaces());
                }
            }
            Err(e) => {
                // No link was taken over: a previous agent's programs still run in them, on
                // their own stage tables and flow maps, which `finish_migrations` would let go.
                warn!(error = %e, "cannot list the interfaces or read their link types; links not synced");
                return;
            }
        }
        if !self.attached {
            self.dp.finish_migrations();
            self.attached = true;
            self.status.lock().expect("status poisoned").attached = true;
            info!(interfaces = ?self.dp.attached_interfaces(), "agent ready: services programmed and interfaces attached");
        }
        debug!("links synced");
    }
}

/// Relaxes the reverse-path filter on the interfaces tc is attached to (`rp_filter.rs`), and
/// logs what changed.
fn relax_rp_filter(rp: &mut crate::rp_filter::RpFilter, attached: &BTreeSet<String>) {
    // Which interfaces have an address decides what each gets: unknown, nothing is changed.
    let addressed: BTreeSet<String> = match dataplane::local_ipv4_by_interface() {
        Ok(a) => a.into_iter().map(|(i, _)| i).collect(),
        Err(e) => {
            warn!(error = %e, "cannot list the interfaces' addresses; reverse-path filtering left as it is");
            return;
        }
    };
    let (done, errors) = rp.relax(attached.iter().map(|i| (i.as_str(), addressed.contains(i))));
    if !done.loose.is_empty() {
        info!(interfaces = ?done.loose, "strict reverse-path filtering made loose (rp_filter 2)");
    }
    if !done.off.is_empty() {
        info!(interfaces = ?done.off, "reverse-path filtering turned off on interfaces without an IPv4 address");
    }
    if let Some(was) = done.all_was {
        warn!(
            was,
            "net.ipv4.conf.all.rp_filter set to 0 (every other interface's own value raised to {was}, so the mode in \
             force there is unchanged): it applies on top of each interface's (--relax-rp-filter asked for it)"
        );
    }
    for e in errors {
        warn!(
            error = %e,
            "cannot relax reverse-path filtering as --relax-rp-filter asks (mount the host's /proc/sys/net \
             writable, see --proc-sys)"
        );
    }
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

/// The node's IPv6 address for SNAT when `--node-ip6` is not given: the first global address
/// (not loopback, not link-local) of the interface holding the IPv6 default route, else of the
/// IPv4 default route's interface (a node whose IPv6 has no default route yet).
pub fn default_route_address6() -> Option<std::net::Ipv6Addr> {
    let routes = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let addrs = dataplane::local_ipv6_by_interface().ok()?;
    let global = |iface: &str| {
        addrs.iter().find(|(i, ip)| i == iface && dataplane::node_port_address((*ip).into())).map(|(_, ip)| *ip)
    };
    default_route_interface6(&routes).and_then(|i| global(&i)).or_else(|| global(&default_route_interface()?))
}

/// The interface of the IPv6 default route in `/proc/net/ipv6_route` text: destination `::/0`,
/// up (`RTF_UP`), not a reject route (`RTF_REJECT`, the kernel's unreachable default on `lo`).
fn default_route_interface6(routes: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    routes.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
        let default = f[0].bytes().all(|b| b == b'0') && f.get(1) == Some(&"00");
        (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && f.get(9) != Some(&"lo"))
            .then(|| f.get(9).map(|s| s.to_string()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_default_route_is_found_and_reject_routes_are_not() {
        let routes = "\
fd000049000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000049000000000000000000000001 00000400 00000001 00000000 00450003     eth1
";
        assert_eq!(default_route_interface6(routes).as_deref(), Some("eth1"));
        assert_eq!(default_route_interface6(&routes.lines().take(2).collect::<Vec<_>>().join("\n")), None);
    }

    /// kube-proxy's node eligibility: a Node being deleted, or carrying the cluster
    /// autoscaler's deletion taint (whatever its effect), fails `/healthz`; any other Node,
    /// tainted or not, leaves it passing.
    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        let node = |extra: serde_json::Value| -> Node {
            let mut v = serde_json::json!({"metadata": {"name": "n1"}, "spec": {}});
            for (k, e) in extra.as_object().unwrap() {
                v[k].as_object_mut().unwrap().extend(e.as_object().unwrap().clone());
            }
            serde_json::from_value(v).unwrap()
        };
        let cases = [
            ("plain", serde_json::json!({}), true),
            (
                "other taint",
                serde_json::json!({"spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
                true,
            ),
            ("deleted", serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-03T10:00:00Z"}}), false),
            (
                "autoscaler",
                serde_json::json!({"spec": {"taints": [
                    {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                    {"key": "ToBeDeletedByClusterAutoscaler", "value": "1764756000", "effect": "NoSchedule"}
                ]}}),
                false,
            ),
            (
                "autoscaler, other effect",
                serde_json::json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "PreferNoSchedule"}]}}),
                false,
            ),
        ];
        for (name, extra, want) in cases {
            let eligible = node_eligible(&node(extra));
            assert_eq!(eligible, want, "{name}");
            // What /healthz answers for it, all else healthy.
            let st =
                metrics::AgentStatus { synced: true, attached: true, node_eligible: eligible, ..Default::default() };
            assert_eq!(metrics::healthz(&st).0, if want { 200 } else { 503 }, "{name}");
        }
    }

    #[test]
    fn node_pod_cidrs_of_both_families() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]}
        }))
        .unwrap();
        let cidrs: Vec<String> = node_pod_cidrs(&node).iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, ["10.244.1.0/24", "fd00:244:1::/64"]);
    }
}
