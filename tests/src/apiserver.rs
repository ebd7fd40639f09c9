//! A test API server, kept for the fault the real kube-apiserver (`control_plane.rs`, which the
//! agent's other tests run against) cannot be made to produce on demand: a list that hangs
//! while the client waits. It is not Kubernetes; it serves only what a kube-proxy-like client
//! uses, for Services, EndpointSlices and Nodes, with the real wire protocol: JSON lists
//! carrying a `resourceVersion`; `?watch=true` streams of ADDED / MODIFIED / DELETED events
//! (chunked) resuming from a `resourceVersion`; BOOKMARK events when asked for; `410 Gone` (an
//! ERROR event with an Expired Status) for a version older than the compacted history, which
//! tells the client to list again; label selectors of the forms `key`, `!key`, `key=value`,
//! `key!=value`, and `metadata.name` / `metadata.namespace` field selectors. As kube-apiserver
//! does, lists are paginated (`limit` / `continue`, every page from the first page's snapshot, a
//! continue token older than the compacted history is 410 Gone), and a selecting watch sees an
//! object that stops matching as DELETED (its last matching content at the new version) and one
//! that starts matching as ADDED.
//!
//! Tests drive creates, updates and deletes through its methods, can stop it (an outage), hold
//! lists back, and compact history; they can see how many watches are open and how many lists
//! are held, so they wait for a client to be where they want it rather than for a while.
//! `start_tls` serves HTTPS with a certificate from a CA of its own and requires a bearer
//! token, which is what a pod's in-cluster client (service account token and CA) talks to.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::Notify,
    task::AbortHandle,
};
use tokio_rustls::{rustls, TlsAcceptor};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn of(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The collection path (cluster-wide list and watch).
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }
}

type ObjKey = (Kind, String, String);

struct Event {
    rv: u64,
    kind: Kind,
    typ: &'static str,
    object: Value,
    /// The object before this change (MODIFIED and DELETED), for selector transitions.
    prev: Option<Value>,
    key: ObjKey,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Shared with list snapshots: a write copies the map only while a snapshot holds it.
    objects: Arc<BTreeMap<ObjKey, Value>>,
    /// Lists' snapshots by version, the latest few, so every page of a paginated list comes
    /// from the state its first page saw.
    snapshots: Vec<(u64, Arc<BTreeMap<ObjKey, Value>>)>,
    /// The objects as they were when history was last compacted; with `log`, every state
    /// since can be rebuilt (continued lists are served from their first page's snapshot).
    base: Arc<BTreeMap<ObjKey, Value>>,
    log: Vec<Event>,
    /// Watches resuming from a version below this get 410 Gone.
    compacted_below: u64,
    /// Lists of these kinds wait until released (a slow API server at start-up).
    held: Vec<Kind>,
    /// Every request line served, for assertions on client behaviour.
    requests: Vec<String>,
    /// `events.k8s.io/v1` Events clients created.
    events: Vec<Value>,
}

struct Shared {
    /// Requests must carry `Authorization: Bearer <token>`.
    token: Option<String>,
    state: Mutex<State>,
    changed: Notify,
    /// Open connections, aborted by `stop`.
    conns: Mutex<Vec<AbortHandle>>,
    /// Watches past their start (later changes reach them).
    open_watches: AtomicUsize,
    /// Lists waiting on `hold_lists`.
    lists_waiting: AtomicUsize,
}

/// One in a count for as long as it lives (a request task that is aborted drops it too).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct TestApiServer {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    ns: String,
    addr: SocketAddr,
    acceptor: Option<AbortHandle>,
    kubeconfig: PathBuf,
}

impl TestApiServer {
    /// Listens on `addr` inside network namespace `ns` and writes a kubeconfig pointing at it
    /// into `dir`.
    pub fn start(ns: &str, addr: SocketAddr, dir: &Path) -> Result<Self> {
        Self::start_with(ns, addr, dir, None)
    }

    /// HTTPS on `addr` with a certificate for its IP signed by a fresh CA, and bearer-token
    /// authentication: writes a service account directory (`token`, `ca.crt`, `namespace`) to
    /// `dir/serviceaccount`, as the kubelet mounts it into a pod.
    pub fn start_tls(ns: &str, addr: SocketAddr, dir: &Path, token: &str) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test API server CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec![addr.ip().to_string()])?;
        let cert = params.signed_by(&key, &issuer)?;
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa)?;
        std::fs::write(sa.join("token"), token)?;
        std::fs::write(sa.join("ca.crt"), ca.pem())?;
        std::fs::write(sa.join("namespace"), "kube-system")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        Self::start_with(ns, addr, dir, Some((TlsAcceptor::from(Arc::new(config)), token.to_string())))
    }

    fn start_with(ns: &str, addr: SocketAddr, dir: &Path, tls: Option<(TlsAcceptor, String)>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("test API server runtime")?;
        let kubeconfig = dir.join("kubeconfig");
        let mut f = std::fs::File::create(&kubeconfig)?;
        write!(
            f,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n"
        )?;
        let (tls, token) = match tls {
            Some((acceptor, token)) => (Some(acceptor), Some(token)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            token,
            state: Mutex::new(State { rv: 100, ..Default::default() }),
            changed: Notify::new(),
            conns: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            lists_waiting: AtomicUsize::new(0),
        });
        let mut s = Self { rt, shared, tls, ns: ns.to_string(), addr, acceptor: None, kubeconfig };
        s.resume()?;
        Ok(s)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Starts serving again after `stop` (same address).
    pub fn resume(&mut self) -> Result<()> {
        let addr = self.addr;
        let std_listener = crate::in_ns(&self.ns, || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding the test API server to {addr}"))?;
        std_listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        let tls = self.tls.clone();
        let task = self.rt.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("tokio listener");
            loop {
                let Ok((conn, _)) = listener.accept().await else { continue };
                let (shared2, tls) = (shared.clone(), tls.clone());
                let h = tokio::spawn(async move {
                    let _ = match tls {
                        Some(acceptor) => match acceptor.accept(conn).await {
                            Ok(conn) => handle(conn, shared2).await,
                            Err(e) => Err(e.into()),
                        },
                        None => handle(conn, shared2).await,
                    };
                });
                let mut conns = shared.conns.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(h.abort_handle());
            }
        });
        self.acceptor = Some(task.abort_handle());
        Ok(())
    }

    /// An outage: the listener closes (connections are refused) and every open request,
    /// watches included, is cut. Objects can still be changed meanwhile.
    pub fn stop(&mut self) {
        if let Some(a) = self.acceptor.take() {
            a.abort();
        }
        self.break_watches();
        // Let the aborted tasks drop their sockets before anyone reconnects.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Cuts every open connection, watches included.
    fn break_watches(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Forgets history: a watch resuming from any version handed out so far gets 410 Gone.
    /// The version moves on by one (as etcd's revision does), so a fresh list can be watched.
    pub fn compact(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.rv += 1;
        st.compacted_below = st.rv;
        st.base = st.objects.clone();
        st.snapshots.clear();
        st.log.clear();
    }

    /// Makes lists of `kind` wait until `release`.
    pub fn hold_lists(&self, kind: Kind) {
        self.shared.state.lock().unwrap().held.push(kind);
    }

    pub fn release_lists(&self) {
        self.shared.state.lock().unwrap().held.clear();
        self.shared.changed.notify_waiters();
    }

    /// Watches open now that have started: any change made from here on reaches them.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Lists waiting now because their kind is held (`hold_lists`).
    pub fn lists_waiting(&self) -> usize {
        self.shared.lists_waiting.load(Ordering::SeqCst)
    }

    /// Request lines served so far (`GET /api/v1/services?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// The Events clients created so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().events.clone()
    }

    /// Creates or replaces every Service, EndpointSlice and Node in a YAML stream; other kinds
    /// (the lab's Deployment) are ignored, as the agent would never see them.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc).context("YAML document")?;
            if v.is_null() {
                continue;
            }
            self.apply(v)?;
        }
        Ok(())
    }

    /// Creates or replaces one object (ADDED or MODIFIED).
    pub fn apply(&self, mut obj: Value) -> Result<()> {
        let kind = obj["kind"].as_str().and_then(Kind::of);
        let Some(kind) = kind else { return Ok(()) };
        let name = obj["metadata"]["name"].as_str().ok_or_else(|| anyhow!("object without a name"))?.to_string();
        let namespace = if kind == Kind::Node {
            String::new()
        } else {
            obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
        };
        if kind != Kind::Node {
            obj["metadata"]["namespace"] = json!(namespace);
        }
        obj["apiVersion"] = json!(kind.api_version());
        let mut st = self.shared.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{}-{namespace}-{name}", kind.name()));
        }
        let key = (kind, namespace, name);
        let prev = Arc::make_mut(&mut st.objects).insert(key.clone(), obj.clone());
        let typ = if prev.is_some() { "MODIFIED" } else { "ADDED" };
        st.log.push(Event { rv, kind, typ, object: obj, prev, key });
        drop(st);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut st = self.shared.state.lock().unwrap();
        let key = (kind, if kind == Kind::Node { String::new() } else { namespace.to_string() }, name.to_string());
        let Some(mut obj) = Arc::make_mut(&mut st.objects).remove(&key) else {
            bail!("{kind:?} {namespace}/{name} does not exist")
        };
        let prev = Some(obj.clone());
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push(Event { rv, kind, typ: "DELETED", object: obj, prev, key });
        drop(st);
        self.shared.changed.notify_waiters();
        Ok(())
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl State {
    /// The objects as of version `rv` (at or after the last compaction).
    fn at(&self, rv: u64) -> BTreeMap<ObjKey, Value> {
        let mut objects = (*self.base).clone();
        for e in self.log.iter().take_while(|e| e.rv <= rv) {
            if e.typ == "DELETED" {
                objects.remove(&e.key);
            } else {
                objects.insert(e.key.clone(), e.object.clone());
            }
        }
        objects
    }
}

/// A continue token: the list's version and the last key served, hex-encoded so it needs no
/// escaping in a URL.
fn continue_token(rv: u64, key: &ObjKey) -> String {
    format!("{rv}\u{0}{}\u{0}{}", key.1, key.2).bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.split('\u{0}');
    Some((parts.next()?.parse().ok()?, parts.next()?.to_string(), parts.next()?.to_string()))
}

/// A parsed `labelSelector` / `fieldSelector` term.
enum Term {
    Exists(String),
    Absent(String),
    Eq(String, String),
    Ne(String, String),
}

fn parse_selector(s: &str) -> Vec<Term> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if let Some(k) = t.strip_prefix('!') {
                Term::Absent(k.to_string())
            } else if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(k.to_string(), v.to_string())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(k.to_string(), v.to_string())
            } else {
                Term::Exists(t.to_string())
            }
        })
        .collect()
}

fn matches(terms: &[Term], get: impl Fn(&str) -> Option<String>) -> bool {
    terms.iter().all(|t| match t {
        Term::Exists(k) => get(k).is_some(),
        Term::Absent(k) => get(k).is_none(),
        Term::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
        Term::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
    })
}

struct Query {
    limit: Option<usize>,
    continue_from: Option<String>,
    watch: bool,
    resource_version: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
    labels: Vec<Term>,
    fields: Vec<Term>,
}

impl Query {
    fn selects(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        matches(&self.labels, |k| meta["labels"][k].as_str().map(str::to_string))
            && matches(&self.fields, |k| match k {
                "metadata.name" => meta["name"].as_str().map(str::to_string),
                "metadata.namespace" => meta["namespace"].as_str().map(str::to_string),
                _ => None,
            })
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?');
                out.push(h);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, shared: Arc<Shared>) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            bail!("request head too large");
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let line = head.lines().next().unwrap_or_default().to_string();
    shared.state.lock().unwrap().requests.push(line.clone());
    if let Some(token) = &shared.token {
        let wanted = format!("Bearer {token}");
        let authorized = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .any(|(name, value)| name.trim().eq_ignore_ascii_case("authorization") && value.trim() == wanted);
        if !authorized {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401, "message": "Unauthorized"}).to_string();
            return respond(&mut conn, 401, &body).await;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<String, String> =
        query.split('&').filter_map(|kv| kv.split_once('=').map(|(k, v)| (decode(k), decode(v)))).collect();
    if method == "POST" && path.starts_with("/apis/events.k8s.io/v1/namespaces/") && path.ends_with("/events") {
        // Events are kept for assertions, never served back.
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let start = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("head read") + 4;
        let mut body = buf[start..].to_vec();
        while body.len() < len {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        shared.state.lock().unwrap().events.push(event.clone());
        return respond(&mut conn, 201, &event.to_string()).await;
    }
    let Some(kind) = Kind::from_path(path).filter(|_| method == "GET") else {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{method} {path} is not served by the test API server")}).to_string();
        return respond(&mut conn, 404, &body).await;
    };
    let q = Query {
        limit: params.get("limit").and_then(|v| v.parse().ok()).filter(|n| *n > 0),
        continue_from: params.get("continue").filter(|c| !c.is_empty()).cloned(),
        watch: params.get("watch").is_some_and(|v| v == "true" || v == "1"),
        resource_version: params.get("resourceVersion").and_then(|v| v.parse().ok()).filter(|v| *v != 0),
        bookmarks: params.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
        timeout: Duration::from_secs(params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300)),
        labels: parse_selector(params.get("labelSelector").map_or("", |s| s.as_str())),
        fields: parse_selector(params.get("fieldSelector").map_or("", |s| s.as_str())),
    };
    if q.watch {
        watch(conn, shared, kind, q).await
    } else {
        let mut waiting = None;
        loop {
            let notified = shared.changed.notified();
            if !shared.state.lock().unwrap().held.contains(&kind) {
                break;
            }
            waiting.get_or_insert_with(|| Counted::new(&shared.lists_waiting));
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        drop(waiting);
        // A continued list is served from the first page's snapshot; one older than the
        // compacted history is gone, as etcd's revision is.
        let page = {
            let mut st = shared.state.lock().unwrap();
            match q.continue_from.as_deref().map(parse_continue) {
                Some(None) => Err((400, "BadRequest", "invalid continue token".to_string())),
                Some(Some((rv, _, _))) if rv < st.compacted_below => Err((
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".to_string(),
                )),
                cont => {
                    let (rv, after) = match cont.flatten() {
                        Some((rv, ns, name)) => (rv, Some((kind, ns, name))),
                        None => (st.rv, None),
                    };
                    let snapshot = match st.snapshots.iter().find(|(v, _)| *v == rv) {
                        Some((_, snap)) => snap.clone(),
                        None => {
                            let snap = if rv == st.rv { st.objects.clone() } else { Arc::new(st.at(rv)) };
                            st.snapshots.push((rv, snap.clone()));
                            if st.snapshots.len() > 8 {
                                st.snapshots.remove(0);
                            }
                            snap
                        }
                    };
                    drop(st);
                    // Keys sort by kind first: a page is a range scan from the last key served.
                    let start = match &after {
                        Some(a) => std::ops::Bound::Excluded(a.clone()),
                        None => std::ops::Bound::Included((kind, String::new(), String::new())),
                    };
                    let mut matching = snapshot
                        .range((start, std::ops::Bound::Unbounded))
                        .take_while(|(k, _)| k.0 == kind)
                        .filter(|(_, o)| q.selects(o));
                    let limit = q.limit.unwrap_or(usize::MAX);
                    let items: Vec<(ObjKey, Value)> =
                        matching.by_ref().take(limit).map(|(k, o)| (k.clone(), o.clone())).collect();
                    // Whether more follow (kube-apiserver's remainingItemCount is optional too).
                    let more = matching.next().is_some();
                    Ok((items, rv, more))
                }
            }
        };
        let (items, rv, more) = match page {
            Ok(p) => p,
            Err((code, reason, message)) => {
                let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "code": code, "message": message}).to_string();
                return respond(&mut conn, code, &body).await;
            }
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if more {
            let last = &items.last().expect("a full page").0;
            metadata["continue"] = json!(continue_token(rv, last));
        }
        let items: Vec<Value> = items
            .into_iter()
            .map(|(_, mut o)| {
                o["kind"] = json!(kind.name());
                o
            })
            .collect();
        let body = json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        })
        .to_string();
        respond(&mut conn, 200, &body).await
    }
}

async fn respond<S: AsyncWrite + Unpin>(conn: &mut S, code: u16, body: &str) -> Result<()> {
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        410 => "Gone",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await?;
    Ok(())
}

async fn send_chunk<S: AsyncWrite + Unpin>(conn: &mut S, v: &Value) -> Result<()> {
    let line = format!("{v}\n");
    conn.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await?;
    Ok(())
}

async fn watch<S: AsyncWrite + Unpin>(mut conn: S, shared: Arc<Shared>, kind: Kind, q: Query) -> Result<()> {
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let deadline = tokio::time::Instant::now() + q.timeout;
    // Without a version, a watch starts with the current objects as ADDED events.
    let mut from = match q.resource_version {
        Some(rv) => {
            let gone = shared.state.lock().unwrap().compacted_below > rv;
            if gone {
                let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410}});
                send_chunk(&mut conn, &status).await?;
                conn.write_all(b"0\r\n\r\n").await?;
                return Ok(());
            }
            rv
        }
        None => {
            let (objs, rv) = {
                let st = shared.state.lock().unwrap();
                let objs: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((k, _, _), o)| *k == kind && q.selects(o))
                    .map(|(_, o)| o.clone())
                    .collect();
                (objs, st.rv)
            };
            for mut o in objs {
                o["kind"] = json!(kind.name());
                send_chunk(&mut conn, &json!({"type": "ADDED", "object": o})).await?;
            }
            rv
        }
    };
    // From here every change after `from` is sent, whenever it is made.
    let _open = Counted::new(&shared.open_watches);
    let mut last_bookmark = tokio::time::Instant::now();
    loop {
        let notified = shared.changed.notified();
        let (events, rv): (Vec<Value>, u64) = {
            let st = shared.state.lock().unwrap();
            let evs = st
                .log
                .iter()
                .filter(|e| e.rv > from && e.kind == kind)
                .filter_map(|e| {
                    // As kube-apiserver filters: by the object before and after the change.
                    let now = e.typ != "DELETED" && q.selects(&e.object);
                    let before = e.prev.as_ref().is_some_and(|p| q.selects(p));
                    let (typ, mut o) = match (before, now) {
                        (false, true) => ("ADDED", e.object.clone()),
                        (true, true) => (e.typ, e.object.clone()),
                        (true, false) => {
                            // The last content that matched, at the new version.
                            let mut o = e.prev.clone().expect("matched before");
                            o["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                            ("DELETED", o)
                        }
                        (false, false) => return None,
                    };
                    o["kind"] = json!(kind.name());
                    Some(json!({"type": typ, "object": o}))
                })
                .collect();
            (evs, st.rv)
        };
        for e in events {
            send_chunk(&mut conn, &e).await?;
        }
        from = rv;
        if q.bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let bm = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}}});
            send_chunk(&mut conn, &bm).await?;
            last_bookmark = tokio::time::Instant::now();
        }
        if tokio::time::Instant::now() >= deadline {
            conn.write_all(b"0\r\n\r\n").await?;
            return Ok(());
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
    }
}
