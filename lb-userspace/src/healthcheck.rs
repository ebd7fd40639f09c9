//! `healthCheckNodePort` servers for `externalTrafficPolicy: Local` LoadBalancers, as kube-proxy
//! runs them: an external load balancer probes every node, and only nodes with a local endpoint
//! answer 200, so traffic goes only where it will not be dropped.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use crate::model::HealthCheck;

#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    #[error("health check node port {port}: binding: {source}")]
    Bind { port: u16, source: std::io::Error },
}

type Shared = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The running servers, one per port, and what each reports.
#[derive(Default)]
pub struct HealthChecks {
    state: Shared,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

/// kube-proxy's status and JSON body for one service.
pub fn response(hc: &HealthCheck) -> (u16, String) {
    let (ns, name) = hc.service.split_once('/').unwrap_or(("default", &hc.service));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    (if hc.local_endpoints > 0 { 200 } else { 503 }, body)
}

impl HealthChecks {
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
                    self.servers.insert(*port, tokio::spawn(serve(listener, *port, self.state.clone())));
                }
                Err(source) => errors.push(HealthCheckError::Bind { port: *port, source }),
            }
        }
        errors
    }
}

/// Reads an HTTP request head, bounded in size (4 KiB) and time (2 s), so a slow or silent
/// client cannot hold a task; returns what arrived.
pub(crate) async fn read_request_head(conn: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
    })
    .await;
    buf.truncate(n);
    buf
}

/// Writes a complete HTTP/1.1 response and lets the connection close (one request each).
pub(crate) async fn write_response(conn: &mut tokio::net::TcpStream, code: u16, content_type: &str, body: &str) {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes()).await;
}

async fn serve(listener: TcpListener, port: u16, state: Shared) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            // Any request gets the answer: its content does not matter.
            read_request_head(&mut conn).await;
            let hc = state.lock().expect("health check state poisoned").get(&port).cloned();
            let Some(hc) = hc else { return };
            let (status, body) = response(&hc);
            write_response(&mut conn, status, "application/json", &body).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_style_body_and_status() {
        let (status, body) = response(&HealthCheck { service: "default/load-bal".into(), local_endpoints: 2 });
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["name"], "load-bal");
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(response(&HealthCheck { service: "a/b".into(), local_endpoints: 0 }).0, 503);
    }
}
