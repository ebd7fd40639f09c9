//! The Kubernetes API as a source: reflectors over Services, EndpointSlices and this node's
//! Node, the way kube-proxy's informers see them. The owner task reads consistent snapshots
//! of the stores after a change is signalled; nothing here touches the datapath.
//!
//! Shape after kube-rs's `controller-rs`: `watcher` streams with back-off feed `reflector`
//! stores; the stores are what the rest of the agent reads. A watch that breaks (API server
//! restart, network outage, `410 Gone`) is retried by the watcher itself, which relists and
//! swaps the store contents in one step when the relist completes, so a resync never flushes.
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        utils::Backoff,
        watcher, WatchStreamExt as _,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::model::{NodeInfo, PROXY_LABEL_SELECTOR};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error("no Kubernetes client configuration (not in a pod, no KUBECONFIG, no ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Exponential back-off for broken watches, capped low: an agent that is minutes late after
/// an API server outage keeps serving a stale view for minutes. Reset after a healthy event.
#[derive(Clone)]
pub struct WatchBackoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl WatchBackoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { next: min, min, max }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Counters the metrics endpoint reports.
#[derive(Default)]
pub struct WatchStats {
    pub events: AtomicU64,
    pub errors: AtomicU64,
    pub relists: AtomicU64,
}

/// Live reflector stores, filled by background tasks.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Set at each store's first complete list.
    services_listed: Arc<AtomicBool>,
    slices_listed: Arc<AtomicBool>,
    node_name: String,
    /// Signalled after every event that may change the translation.
    pub changed: Arc<Notify>,
    pub stats: Arc<WatchStats>,
}

/// The objects the translation needs, as the stores held them at one moment (shared, not
/// copied).
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub node: NodeInfo,
}

/// A client from `kubeconfig` when given, else as every Kubernetes client does: `KUBECONFIG`
/// or `~/.kube/config`, then the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|source| KubeSourceError::Kubeconfig { path: path.display().to_string(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig { path: path.display().to_string(), source })?
        }
        None => kube::Config::infer().await?,
    };
    info!(server = %config.cluster_url, "Kubernetes API client configured");
    Ok(Client::try_from(config)?)
}

impl KubeSource {
    /// Starts the three reflectors on the current runtime.
    pub fn start(client: Client, node_name: &str, backoff: WatchBackoff) -> Self {
        let changed = Arc::new(Notify::new());
        let stats = Arc::new(WatchStats::default());
        let proxied = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let (services_listed, slices_listed) = (Arc::default(), Arc::default());
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            proxied.clone(),
            backoff.clone(),
            (changed.clone(), stats.clone(), Arc::clone(&services_listed)),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            proxied,
            backoff.clone(),
            (changed.clone(), stats.clone(), Arc::clone(&slices_listed)),
        );
        let nodes = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            backoff,
            (changed.clone(), stats.clone(), Arc::default()),
        );
        Self {
            services,
            slices,
            nodes,
            services_listed,
            slices_listed,
            node_name: node_name.to_string(),
            changed,
            stats,
        }
    }

    /// True once Services and EndpointSlices have each been listed in full. The Node is not
    /// waited for: without it only zone hints are ignored, which is what a node without a
    /// zone label gets anyway.
    pub fn ready(&self) -> bool {
        self.services_listed.load(Ordering::Acquire) && self.slices_listed.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Snapshot {
        let node = self.nodes.state().into_iter().find(|n| n.metadata.name.as_deref() == Some(&self.node_name));
        Snapshot {
            services: self.services.state(),
            slices: self.slices.state(),
            node: NodeInfo::from_node(&self.node_name, node.as_deref()),
        }
    }
}

/// What a reflector's driver reports to: the change signal, the counters, and the flag set at
/// its first complete list.
type Reporting = (Arc<Notify>, Arc<WatchStats>, Arc<AtomicBool>);

fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, backoff: WatchBackoff, report: Reporting) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let kind = K::kind(&()).to_string();
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).backoff(backoff));
    tokio::spawn(drive(kind, stream, report));
    store
}

async fn drive<K>(
    kind: String,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    (changed, stats, listed): Reporting,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(e) => {
                stats.events.fetch_add(1, Ordering::Relaxed);
                if failing {
                    info!(kind, "watch re-established");
                    failing = false;
                }
                match e {
                    // Mid-list objects are not a consistent view; the store swaps at InitDone.
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                    watcher::Event::InitDone => {
                        // The reflector has swapped the store before passing the event on.
                        listed.store(true, Ordering::Release);
                        stats.relists.fetch_add(1, Ordering::Relaxed);
                        debug!(kind, "full list received");
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                }
                changed.notify_one();
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                // One line per outage, not one per retry.
                if !failing {
                    warn!(kind, error = %e, "watch failed; keeping the last known state and retrying");
                    failing = true;
                } else {
                    debug!(kind, error = %e, "watch retry failed");
                }
            }
        }
    }
}
