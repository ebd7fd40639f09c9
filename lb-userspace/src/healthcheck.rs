//! `healthCheckNodePort` servers for `externalTrafficPolicy: Local` LoadBalancers, as kube-proxy
//! runs them: an external load balancer probes every node, and only nodes with a local endpoint
//! and a healthy proxy answer 200, so traffic goes only where it will be served.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{metrics::SharedStatus, model::HealthCheck};

#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    #[error("health check node port {port}: binding: {source}")]
    Bind { port: u16, source: std::io::Error },
}

type Shared = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The running servers, one per port, and what each reports.
pub struct HealthChecks {
    state: Shared,
    status: SharedStatus,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

/// kube-proxy's status, JSON body and endpoint count header for one service: 200 only with a
/// local endpoint and a healthy proxy.
pub fn response(hc: &HealthCheck, proxy_healthy: bool) -> (u16, String) {
    let (ns, name) = hc.service.split_once('/').unwrap_or(("default", &hc.service));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    (if hc.local_endpoints > 0 && proxy_healthy { 200 } else { 503 }, body)
}

/// The proxy health a health check port reports: the first state programmed and attached, and
/// no change waiting longer than the health timeout (kube-proxy's `IsHealthy`).
fn proxy_healthy(status: &SharedStatus) -> bool {
    let st = status.lock().expect("status poisoned");
    st.synced && st.attached && st.proxy_healthy()
}

async fn answer(
    axum::extract::State((state, status, port)): axum::extract::State<(Shared, SharedStatus, u16)>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let hc = state.lock().expect("health check state poisoned").get(&port).cloned();
    let Some(hc) = hc else { return axum::http::StatusCode::NOT_FOUND.into_response() };
    let (code, body) = response(&hc, proxy_healthy(&status));
    let code = axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE);
    (
        code,
        [
            ("content-type", "application/json".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            // Weighted load balancers read the local endpoint count from this header.
            ("x-load-balancing-endpoint-weight", hc.local_endpoints.to_string()),
        ],
        body,
    )
        .into_response()
}

impl HealthChecks {
    pub fn new(status: SharedStatus) -> Self {
        Self { state: Shared::default(), status, servers: BTreeMap::new() }
    }

    /// Serves exactly the ports of `want`, with its counts. Must run inside a tokio runtime.
    pub async fn update(&mut self, want: &BTreeMap<u16, HealthCheck>) -> Vec<HealthCheckError> {
        *self.state.lock().expect("health check state poisoned") = want.clone();
        let gone: Vec<u16> = self.servers.keys().filter(|p| !want.contains_key(p)).copied().collect();
        for port in gone {
            if let Some(task) = self.servers.remove(&port) {
                task.abort();
                tracing::info!(port, "health check server stopped");
            }
        }
        let mut errors = Vec::new();
        for port in want.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port))).await {
                Ok(listener) => {
                    tracing::info!(port, "health check server started");
                    // Any path gets the answer, as kube-proxy's.
                    let app = axum::Router::new().fallback(answer).with_state((
                        self.state.clone(),
                        self.status.clone(),
                        *port,
                    ));
                    let port = *port;
                    self.servers.insert(
                        port,
                        tokio::spawn(async move {
                            if let Err(e) = axum::serve(listener, app).await {
                                tracing::warn!(port, error = %e, "health check server stopped");
                            }
                        }),
                    );
                }
                Err(source) => errors.push(HealthCheckError::Bind { port: *port, source }),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_style_body_and_status() {
        let hc = HealthCheck { service: "default/load-bal".into(), local_endpoints: 2 };
        let (status, body) = response(&hc, true);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["name"], "load-bal");
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        assert_eq!(response(&HealthCheck { service: "a/b".into(), local_endpoints: 0 }, true).0, 503);
        // An unhealthy proxy fails the check even with local endpoints.
        let (status, body) = response(&hc, false);
        assert_eq!(status, 503);
        assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
    }
}
