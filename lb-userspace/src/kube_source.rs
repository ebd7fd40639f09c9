//! The Kubernetes API as a source: watches of Services, EndpointSlices and this node's Node,
//! the way kube-proxy's informers see them, each event passed on by name as it arrives (the
//! agent's change set); nothing here touches the datapath.
//!
//! A watch that breaks (API server restart, network outage, `410 Gone`) is retried by kube's
//! `watcher` with back-off; a relist is passed on only once complete, as one update holding the
//! whole list, so the agent swaps to it in one step and a resync never flushes.
use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::{
    agent::{ObjectEvent, Update, Updates},
    model::PROXY_LABEL_SELECTOR,
};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error("no Kubernetes client configuration (not in a pod, no KUBECONFIG, no ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Counters the metrics endpoint reports.
#[derive(Default)]
pub struct WatchStats {
    pub events: AtomicU64,
    pub errors: AtomicU64,
    pub relists: AtomicU64,
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

/// Starts watches of Services, EndpointSlices (both with kube-proxy's label selector) and this
/// node's Node on the current runtime; every event goes to `updates` as it arrives, a
/// completed (re)list as one [`Update`] holding the whole list.
pub fn start(client: Client, node_name: &str, updates: Updates) -> Arc<WatchStats> {
    let stats = Arc::new(WatchStats::default());
    let proxied = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    tokio::spawn(watch(
        Api::<Service>::all(client.clone()),
        proxied.clone(),
        (updates.clone(), stats.clone()),
        Update::Services,
    ));
    tokio::spawn(watch(
        Api::<EndpointSlice>::all(client.clone()),
        proxied,
        (updates.clone(), stats.clone()),
        Update::Slices,
    ));
    tokio::spawn(watch(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        (updates, stats.clone()),
        Update::Node,
    ));
    stats
}

async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    (updates, stats): (Updates, Arc<WatchStats>),
    wrap: fn(ObjectEvent<K>) -> Update,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let kind = K::kind(&()).to_string();
    // kube-runtime's default back-off: exponential from 0.8 s to 30 s with jitter, so the
    // nodes of a cluster do not relist in lockstep after an API server outage.
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    // Objects of a list in progress: a consistent view only once it completes.
    let mut listing: Vec<Arc<K>> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(e) => {
                stats.events.fetch_add(1, Ordering::Relaxed);
                if failing {
                    info!(kind, "watch re-established");
                    failing = false;
                }
                match e {
                    watcher::Event::Init => listing.clear(),
                    watcher::Event::InitApply(o) => listing.push(Arc::new(o)),
                    watcher::Event::InitDone => {
                        stats.relists.fetch_add(1, Ordering::Relaxed);
                        debug!(kind, objects = listing.len(), "full list received");
                        updates.send(wrap(ObjectEvent::Relist(std::mem::take(&mut listing))));
                    }
                    watcher::Event::Apply(o) => updates.send(wrap(ObjectEvent::Apply(Arc::new(o)))),
                    watcher::Event::Delete(o) => updates.send(wrap(ObjectEvent::Delete(Arc::new(o)))),
                }
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
