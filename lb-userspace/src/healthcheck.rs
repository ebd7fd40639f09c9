//! `healthCheckNodePort` servers for `externalTrafficPolicy: Local` LoadBalancers, as kube-proxy
//! runs them: an external load balancer probes every node, and only nodes with a local endpoint
//! and a healthy proxy answer 200, so traffic goes only where it will be served.
//!
//! As kube-proxy's per-family proxiers each run their own server, a port listens once per
//! family the Service has (`0.0.0.0`, and `[::]` as an IPv6-only socket beside it), and a
//! probe is answered with the local endpoint count of the family it arrived over. With
//! `--nodeport-addresses`, as kube-proxy's, a port listens on each node address those select
//! instead (`Listen`), following the addresses as they come and go.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    metrics::SharedStatus,
    model::{HealthCheck, IpFamily},
};

#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    #[error("health check node port {port} on {addr}: binding: {source}")]
    Bind { port: u16, addr: IpAddr, source: std::io::Error },
}

/// Where the servers listen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Listen {
    /// Every address of each family (no `--nodeport-addresses`).
    #[default]
    Everywhere,
    /// These addresses, the node's own that `--nodeport-addresses` selects; the unspecified
    /// address of a family stands for all of it (kube-proxy's `MatchAll`: a `/0` of that
    /// family, or no CIDR of it).
    On(BTreeSet<IpAddr>),
}

impl Listen {
    /// Where `--nodeport-addresses` `cidrs` puts the servers, given the node's addresses they
    /// select (`node_addrs`).
    pub fn for_node_ports(cidrs: &[crate::model::Cidr], node_addrs: &[IpAddr]) -> Self {
        if cidrs.is_empty() {
            return Listen::Everywhere;
        }
        let mut on: BTreeSet<IpAddr> = BTreeSet::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            if crate::model::node_port_family_whole(cidrs, family) {
                on.insert(unspecified(family));
            } else {
                on.extend(node_addrs.iter().filter(|a| IpFamily::of(**a) == family));
            }
        }
        Listen::On(on)
    }

    /// The addresses a server of `family` listens on.
    fn addrs(&self, family: IpFamily) -> Vec<IpAddr> {
        match self {
            Listen::Everywhere => vec![unspecified(family)],
            Listen::On(on) => on.iter().copied().filter(|a| IpFamily::of(*a) == family).collect(),
        }
    }
}

fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => Ipv4Addr::UNSPECIFIED.into(),
        IpFamily::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

type Shared = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The running servers, one per port and address, and what each reports.
pub struct HealthChecks {
    state: Shared,
    status: SharedStatus,
    servers: BTreeMap<(u16, IpAddr), JoinHandle<()>>,
}

/// kube-proxy's status, JSON body and endpoint count header for one service, probed over
/// `family`: 200 only with a local endpoint of that family and a healthy proxy.
pub fn response(hc: &HealthCheck, family: IpFamily, proxy_healthy: bool) -> (u16, String) {
    let (ns, name) = hc.service.split_once('/').unwrap_or(("default", &hc.service));
    let local = hc.local_endpoints_of(family);
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    (if local > 0 && proxy_healthy { 200 } else { 503 }, body)
}

/// A listener on `addr`: for IPv6 an IPv6-only socket, so that on the unspecified address the
/// IPv4 listener of the same port can exist beside it.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The proxy health a health check port reports: the first state programmed and attached, and
/// no change waiting longer than the health timeout (kube-proxy's `IsHealthy`).
fn proxy_healthy(status: &SharedStatus) -> bool {
    let st = status.lock().expect("status poisoned");
    st.synced && st.attached && st.proxy_healthy()
}

async fn answer(
    axum::extract::State((state, status, port, family)): axum::extract::State<(Shared, SharedStatus, u16, IpFamily)>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let hc = state.lock().expect("health check state poisoned").get(&port).cloned();
    let Some(hc) = hc else { return axum::http::StatusCode::NOT_FOUND.into_response() };
    let (code, body) = response(&hc, family, proxy_healthy(&status));
    let code = axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE);
    (
        code,
        [
            ("content-type", "application/json".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            // Weighted load balancers read the local endpoint count from this header.
            ("x-load-balancing-endpoint-weight", hc.local_endpoints_of(family).to_string()),
        ],
        body,
    )
        .into_response()
}

/// How soon a port that could not be served is tried again (`serve`).
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the ports `want` publishes, as they change, until its sender goes. Every `retry`
/// the servers are checked again: a port that could not be bound (another process holding it
/// a moment, an address not yet up) is tried again, and a server whose accept loop stopped is
/// started again, as kube-proxy's proxier tries again at every sync, not only when the
/// published ports change: the load balancer probing the port meanwhile sees the node refuse
/// and drains it.
pub async fn serve(
    status: SharedStatus,
    mut want: tokio::sync::watch::Receiver<BTreeMap<u16, HealthCheck>>,
    mut listen: tokio::sync::watch::Receiver<Listen>,
    retry: std::time::Duration,
) {
    let mut checks = HealthChecks::new(status);
    let mut current = BTreeMap::new();
    let mut on = listen.borrow_and_update().clone();
    loop {
        tokio::select! {
            changed = want.changed() => match changed {
                Ok(()) => current = want.borrow_and_update().clone(),
                Err(_) => return,
            },
            // The node's addresses changed (with `--nodeport-addresses`); a closed channel
            // leaves them as they are.
            Ok(()) = listen.changed() => on = listen.borrow_and_update().clone(),
            // The ports as they were: only missing or stopped servers are started.
            () = tokio::time::sleep(retry) => {}
        }
        for e in checks.update(&current, &on).await {
            tracing::error!(error = %e, retry_s = retry.as_secs(), "health check server failed; trying again");
        }
    }
}

impl HealthChecks {
    pub fn new(status: SharedStatus) -> Self {
        Self { state: Shared::default(), status, servers: BTreeMap::new() }
    }

    /// Serves exactly the ports of `want`, each on the families it counts, with its counts,
    /// on the addresses `on` gives. Must run inside a tokio runtime.
    pub async fn update(&mut self, want: &BTreeMap<u16, HealthCheck>, on: &Listen) -> Vec<HealthCheckError> {
        *self.state.lock().expect("health check state poisoned") = want.clone();
        let wanted: BTreeSet<(u16, IpAddr)> = want
            .iter()
            .flat_map(|(port, hc)| hc.local_endpoints.keys().flat_map(|f| on.addrs(*f)).map(|a| (*port, a)))
            .collect();
        let gone: Vec<(u16, IpAddr)> = self.servers.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for k in gone {
            if let Some(task) = self.servers.remove(&k) {
                task.abort();
                tracing::info!(port = k.0, addr = %k.1, "health check server stopped");
            }
        }
        let mut errors = Vec::new();
        for k in wanted {
            let (port, addr) = k;
            let family = IpFamily::of(addr);
            // A server that stopped (its accept loop failed) is started again.
            if self.servers.get(&k).is_some_and(|task| !task.is_finished()) {
                continue;
            }
            match listen(SocketAddr::new(addr, port)) {
                Ok(listener) => {
                    tracing::info!(port, %addr, "health check server started");
                    // Any path gets the answer, as kube-proxy's.
                    let app = axum::Router::new().fallback(answer).with_state((
                        self.state.clone(),
                        self.status.clone(),
                        port,
                        family,
                    ));
                    self.servers.insert(
                        k,
                        tokio::spawn(async move {
                            if let Err(e) = axum::serve(listener, app).await {
                                tracing::warn!(port, %addr, error = %e, "health check server stopped");
                            }
                        }),
                    );
                }
                Err(source) => errors.push(HealthCheckError::Bind { port, addr, source }),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(service: &str, v4: usize) -> HealthCheck {
        HealthCheck { service: service.into(), local_endpoints: BTreeMap::from([(IpFamily::V4, v4)]) }
    }

    #[test]
    fn kube_proxy_style_body_and_status() {
        let hc = check("default/load-bal", 2);
        let (status, body) = response(&hc, IpFamily::V4, true);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["name"], "load-bal");
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        assert_eq!(response(&check("a/b", 0), IpFamily::V4, true).0, 503);
        // An unhealthy proxy fails the check even with local endpoints.
        let (status, body) = response(&hc, IpFamily::V4, false);
        assert_eq!(status, 503);
        assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
    }

    #[test]
    fn each_family_is_answered_with_its_own_count() {
        let hc = HealthCheck {
            service: "default/dual".into(),
            local_endpoints: BTreeMap::from([(IpFamily::V4, 0), (IpFamily::V6, 3)]),
        };
        assert_eq!(response(&hc, IpFamily::V4, true).0, 503, "no local IPv4 endpoint");
        let (status, body) = response(&hc, IpFamily::V6, true);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 3);
    }

    /// The status of a proxy that is synced and attached.
    fn healthy() -> SharedStatus {
        let status: SharedStatus = Default::default();
        {
            let mut st = status.lock().unwrap();
            st.synced = true;
            st.attached = true;
        }
        status
    }

    /// One HTTP/1.1 GET, the whole response as text.
    async fn get(addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /any/path HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The value of header `name` (case-insensitive) in a raw HTTP response.
    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// kube-proxy's `X-Load-Balancing-Endpoint-Weight` carries the local endpoint count on every
    /// answer, 503s included (a weighted load balancer reads it whatever the status), and
    /// follows the count as it changes.
    #[tokio::test]
    async fn the_endpoint_weight_header_carries_the_local_count() {
        let status = healthy();
        let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut checks = HealthChecks::new(status.clone());
        assert!(checks.update(&BTreeMap::from([(port, check("shop/web", 3))]), &Listen::Everywhere).await.is_empty());
        let r = get(addr).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(header(&r, "X-Load-Balancing-Endpoint-Weight"), Some("3"), "{r}");
        assert_eq!(header(&r, "content-type"), Some("application/json"), "{r}");
        assert!(r.contains("\"localEndpoints\":3"), "{r}");
        // The count changes without the server restarting.
        assert!(checks.update(&BTreeMap::from([(port, check("shop/web", 0))]), &Listen::Everywhere).await.is_empty());
        let r = get(addr).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(header(&r, "x-load-balancing-endpoint-weight"), Some("0"), "{r}");
        // An unhealthy proxy answers 503 but still reports its local endpoints.
        assert!(checks.update(&BTreeMap::from([(port, check("shop/web", 5))]), &Listen::Everywhere).await.is_empty());
        status.lock().unwrap().attached = false;
        let r = get(addr).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert_eq!(header(&r, "x-load-balancing-endpoint-weight"), Some("5"), "{r}");
    }

    /// A port another process holds is tried again until it is served, with no change of the
    /// published ports in between.
    #[tokio::test]
    async fn a_port_that_cannot_be_bound_is_tried_again_until_it_is_served() {
        let status = healthy();
        let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::watch::channel(BTreeMap::new());
        let (_listen_tx, listen) = tokio::sync::watch::channel(Listen::Everywhere);
        let server = tokio::spawn(serve(status, rx, listen, std::time::Duration::from_millis(50)));
        tx.send(BTreeMap::from([(port, check("shop/web", 1))])).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // Still held by the other socket, which answers nothing: the port was not taken.
        drop(held);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
                let mut r = String::new();
                s.read_to_string(&mut r).await.unwrap();
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the port was never served after it was freed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop(tx);
        server.await.unwrap();
    }

    /// With `--nodeport-addresses`, a port listens on the node addresses it selects only, and
    /// moves with them. (On loopback addresses of the test's own namespace: binding them takes
    /// no privilege and reaches nothing outside.)
    #[tokio::test]
    async fn with_node_port_addresses_a_port_listens_on_those_addresses_only() {
        let status = healthy();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (one, two): (IpAddr, IpAddr) = (Ipv4Addr::new(127, 0, 0, 1).into(), Ipv4Addr::new(127, 0, 0, 2).into());
        let answers = |ip: IpAddr| std::net::TcpStream::connect(SocketAddr::new(ip, port)).is_ok();
        let mut checks = HealthChecks::new(status);
        let want = BTreeMap::from([(port, check("shop/web", 1))]);
        let on = |a: IpAddr| Listen::On(BTreeSet::from([a]));
        assert!(checks.update(&want, &on(one)).await.is_empty());
        assert!(get(SocketAddr::new(one, port)).await.starts_with("HTTP/1.1 200"));
        assert!(!answers(two), "listening on 127.0.0.2 too");
        // The node's selected address changes: the server follows.
        assert!(checks.update(&want, &on(two)).await.is_empty());
        assert!(get(SocketAddr::new(two, port)).await.starts_with("HTTP/1.1 200"));
        // The old server's task is aborted, not awaited: its socket closes when the runtime
        // next polls it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while answers(one) {
            assert!(std::time::Instant::now() < deadline, "still listening on 127.0.0.1");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // No address of the family selected: no server of it.
        assert!(checks.update(&want, &Listen::On(BTreeSet::new())).await.is_empty());
        assert!(checks.servers.is_empty());
    }

    #[test]
    fn node_port_addresses_select_the_listening_addresses() {
        let cidr = |s: &str| s.parse::<crate::model::Cidr>().unwrap();
        let node: Vec<IpAddr> =
            vec![Ipv4Addr::new(192, 168, 49, 2).into(), Ipv4Addr::new(10, 0, 0, 2).into(), "fd00::2".parse().unwrap()];
        assert_eq!(Listen::for_node_ports(&[], &node), Listen::Everywhere);
        // The agent passes the addresses the CIDRs selected: all of them are listened on.
        let on = Listen::for_node_ports(&[cidr("192.168.49.0/24")], &node[..1]);
        assert_eq!(on.addrs(IpFamily::V4), vec![node[0]]);
        // No CIDR of IPv6: all of it, as kube-proxy's `NewNodePortAddresses` has it.
        assert_eq!(on.addrs(IpFamily::V6), vec![IpAddr::from(Ipv6Addr::UNSPECIFIED)]);
        // A family's /0 is all of it: its unspecified address (kube-proxy's MatchAll).
        let on = Listen::for_node_ports(&[cidr("0.0.0.0/0"), cidr("fd00::/64")], &node);
        assert_eq!(on.addrs(IpFamily::V4), vec![IpAddr::from(Ipv4Addr::UNSPECIFIED)]);
        assert_eq!(on.addrs(IpFamily::V6), vec![node[2]]);
    }

    /// The IPv4 and the IPv6 listener of one port bind side by side, and each answers with its
    /// family's count.
    #[tokio::test]
    async fn a_port_listens_on_both_families_side_by_side() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            // No IPv6 on this machine (the kernel's ipv6 disabled); nothing to check.
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI machines have IPv6");
            return;
        }
        let status = healthy();
        let port = {
            // A free port on both families.
            let l = std::net::TcpListener::bind("[::]:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut checks = HealthChecks::new(status);
        let want = BTreeMap::from([(
            port,
            HealthCheck {
                service: "default/dual".into(),
                local_endpoints: BTreeMap::from([(IpFamily::V4, 0), (IpFamily::V6, 2)]),
            },
        )]);
        let errors = checks.update(&want, &Listen::Everywhere).await;
        assert!(errors.is_empty(), "{errors:?}");
        let v4 = get(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
        assert!(v4.starts_with("HTTP/1.1 503"), "{v4}");
        assert_eq!(header(&v4, "x-load-balancing-endpoint-weight"), Some("0"), "{v4}");
        let v6 = get(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await;
        assert!(v6.starts_with("HTTP/1.1 200"), "{v6}");
        assert!(v6.contains("\"localEndpoints\":2"), "{v6}");
        assert_eq!(header(&v6, "x-load-balancing-endpoint-weight"), Some("2"), "{v6}");
        // The Service loses its IPv4 family: that listener goes, the other stays.
        let want = BTreeMap::from([(
            port,
            HealthCheck { service: "default/dual".into(), local_endpoints: BTreeMap::from([(IpFamily::V6, 2)]) },
        )]);
        assert!(checks.update(&want, &Listen::Everywhere).await.is_empty());
        assert_eq!(
            checks.servers.keys().copied().collect::<Vec<_>>(),
            vec![(port, IpAddr::from(Ipv6Addr::UNSPECIFIED))]
        );
    }
}
