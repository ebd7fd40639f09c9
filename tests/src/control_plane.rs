//! A real Kubernetes control plane for the tests, the lab and the benchmarks: etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler built from source by
//! `cargo xtask k8s`, run as plain processes in a network namespace of their own.
//!
//! The namespace makes every port free by construction (tests running side by side each get
//! their own loopback) and keeps the host's network untouched. Everything listens on loopback
//! except kube-apiserver, which also answers on `API_ADDR` (on the namespace's loopback), the address lab
//! nodes reach through a veth each (`attach`), as nodes reach a control-plane node's address.
//!
//! Certificates are generated here (rcgen): a CA, the API server's serving certificate (for
//! `API_ADDR`, loopback and the `kubernetes` Service's names and ClusterIP), an admin client
//! certificate in `system:masters`, and the service-account signing key. One kubeconfig
//! serves kubectl, the controllers, the test's own client, the lab's kubelets and `lb`.
//!
//! Dropping the `ControlPlane` kills every process, waits for each to exit, deletes the
//! namespace and the directory, also when a test panics. The processes also die with the
//! thread that started them (`PR_SET_PDEATHSIG`), so a killed test leaves nothing running.
use std::{
    fs,
    future::Future,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};

/// The API server's address as lab nodes see it (on the control plane namespace's loopback;
/// routed to from every attached node).
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
pub const API_PORT: u16 = 6443;
const ETCD_CLIENT: &str = "127.0.0.1:2379";
const ETCD_PEER: &str = "127.0.0.1:2380";
/// The Service range of minikube, where the seed lab ran: the lab's ClusterIPs
/// (10.104.123.59, 10.97.190.203, ...) are inside it and can be asked for.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Missing(String),
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what} not ready within {secs} s; its log ends:\n{log}")]
    NotReady { what: String, secs: u64, log: String },
    #[error("certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("object {what}: {source}")]
    Json { what: String, source: serde_json::Error },
}

type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// Where `cargo xtask k8s` put the binaries: `$LB_K8S_BIN_DIR`, else `target/k8s/bin`.
pub fn k8s_bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var("LB_K8S_BIN_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("k8s/bin"),
    };
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(ControlPlaneError::Missing(format!(
            "{} is not built: run `cargo xtask k8s` (cargo xtask test does)",
            p.display()
        )))
    }
}

/// Runs a command, returns its stdout; a failure carries stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(io(format!("running {cmd:?}")))?;
    if !out.status.success() {
        return Err(ControlPlaneError::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Enters network namespace `ns` on the calling thread.
pub fn enter_netns(ns: &str) -> std::io::Result<()> {
    let file = fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on the calling thread with a valid namespace fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Extra settings for one control plane.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Extra kube-apiserver flags (e.g. `--watch-cache=false`).
    pub apiserver_args: Vec<String>,
}

struct Proc {
    name: &'static str,
    child: Child,
}

pub struct ControlPlane {
    /// The control plane's network namespace.
    pub ns: String,
    pub dir: PathBuf,
    /// Admin kubeconfig (server `https://API_ADDR:API_PORT`), for kubectl, lb and clients.
    pub kubeconfig: PathBuf,
    /// The cluster CA certificate (PEM), as mounted into pods as `ca.crt`.
    pub ca_file: PathBuf,
    procs: Vec<Proc>,
    options: Options,
    links: u8,
    rt: Option<tokio::runtime::Runtime>,
    client: Option<Client>,
}

/// Files under the control plane's directory.
struct Pki {
    ca: PathBuf,
    apiserver_crt: PathBuf,
    apiserver_key: PathBuf,
    admin_crt: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn paths(dir: &Path) -> Self {
        let p = |n: &str| dir.join("pki").join(n);
        Self {
            ca: p("ca.crt"),
            apiserver_crt: p("apiserver.crt"),
            apiserver_key: p("apiserver.key"),
            admin_crt: p("admin.crt"),
            admin_key: p("admin.key"),
            sa_key: p("sa.key"),
            sa_pub: p("sa.pub"),
        }
    }

    fn generate(dir: &Path) -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let pki = Self::paths(dir);
        fs::create_dir_all(dir.join("pki")).map_err(io("creating the pki directory"))?;
        let write = |p: &Path, s: String| fs::write(p, s).map_err(io(format!("writing {}", p.display())));
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca_params.distinguished_name.push(DnType::CommonName, "lb test cluster CA");
        let ca = ca_params.self_signed(&ca_key)?;
        write(&pki.ca, ca.pem())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let sans: Vec<String> = [
            API_ADDR.to_string().as_str(),
            "127.0.0.1",
            // The `kubernetes` Service's ClusterIP (first address of SERVICE_CIDR) and names.
            "10.96.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        write(&pki.apiserver_crt, params.signed_by(&key, &issuer)?.pem())?;
        write(&pki.apiserver_key, key.serialize_pem())?;

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "system:masters");
        params.distinguished_name.push(DnType::CommonName, "admin");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write(&pki.admin_crt, params.signed_by(&key, &issuer)?.pem())?;
        write(&pki.admin_key, key.serialize_pem())?;

        let sa = KeyPair::generate()?;
        write(&pki.sa_key, sa.serialize_pem())?;
        write(&pki.sa_pub, sa.public_key_pem())?;
        Ok(pki)
    }
}

impl ControlPlane {
    pub fn start() -> Result<Self> {
        Self::start_with(Options::default())
    }

    /// Creates the namespace, generates the certificates, starts etcd and kube-apiserver and
    /// waits for `/readyz`, then the controller manager and the scheduler, and waits until the
    /// controller manager has created the `default` service account (pods need it).
    pub fn start_with(options: Options) -> Result<Self> {
        let started = Instant::now();
        let ns = format!("lbcp{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(&ns);
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        output(Command::new("ip").args(["netns", "add", &ns]))?;
        let rt = {
            let ns = ns.clone();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                // Every thread of this runtime lives in the control plane's namespace, so the
                // client's connections (made in spawned tasks, see `run`) reach API_ADDR.
                .on_thread_start(move || {
                    enter_netns(&ns).expect("entering the control plane's network namespace");
                })
                .build()
                .map_err(io("the control plane client's runtime"))
        };
        let kubeconfig = dir.join("kubeconfig");
        let pki = Pki::paths(&dir);
        // From here on a failure cleans up: Drop owns the namespace, directory and processes.
        let mut cp = ControlPlane {
            ns: ns.clone(),
            dir: dir.clone(),
            kubeconfig: kubeconfig.clone(),
            ca_file: pki.ca.clone(),
            procs: Vec::new(),
            options,
            links: 0,
            rt: None,
            client: None,
        };
        cp.rt = Some(rt?);
        let in_ns = |args: &[&str]| output(Command::new("ip").args(["netns", "exec", &ns]).args(args));
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        // On loopback (this kernel has no dummy devices): local to the namespace, reached from
        // every attached node through its link.
        in_ns(&["ip", "addr", "add", &format!("{API_ADDR}/32"), "dev", "lo"])?;
        let pki = Pki::generate(&dir)?;
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lb-test\n  cluster:\n    server: https://{API_ADDR}:{API_PORT}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: lb-test\n  context:\n    cluster: lb-test\n    user: admin\n    namespace: default\ncurrent-context: lb-test\n",
                pki.ca.display(),
                pki.admin_crt.display(),
                pki.admin_key.display()
            ),
        )
        .map_err(io("writing the kubeconfig"))?;

        let etcd_dir = dir.join("etcd");
        let etcd = spawn(
            &ns,
            &dir,
            "etcd",
            Command::new(k8s_bin("etcd")?)
                .args(["--name", "default", "--data-dir"])
                .arg(&etcd_dir)
                .args(["--listen-client-urls", &format!("http://{ETCD_CLIENT}")])
                .args(["--advertise-client-urls", &format!("http://{ETCD_CLIENT}")])
                .args(["--listen-peer-urls", &format!("http://{ETCD_PEER}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{ETCD_PEER}")])
                .args(["--initial-cluster", &format!("default=http://{ETCD_PEER}")])
                // A throwaway store: durability is not what is tested, and fsync on a shared
                // disk makes every write of the API server slow.
                .arg("--unsafe-no-fsync")
                .args(["--log-level", "warn"]),
        )?;
        cp.procs.push(etcd);
        wait_until(&dir, "etcd", Duration::from_secs(30), || {
            curl(&ns, &[&format!("http://{ETCD_CLIENT}/health")]).is_ok_and(|b| b.contains("\"health\":\"true\""))
        })?;
        cp.start_apiserver()?;
        let kc = kubeconfig.clone();
        cp.client = Some(cp.run(async move {
            let config =
                Config::from_custom_kubeconfig(Kubeconfig::read_from(kc)?, &KubeConfigOptions::default()).await?;
            Ok::<_, ControlPlaneError>(Client::try_from(config)?)
        })?);

        let kc = kubeconfig.to_str().expect("utf-8 path").to_string();
        let cm = spawn(
            &ns,
            &dir,
            "kube-controller-manager",
            Command::new(k8s_bin("kube-controller-manager")?)
                .args([
                    "--kubeconfig",
                    &kc,
                    "--leader-elect=false",
                    "--bind-address",
                    "127.0.0.1",
                    "--secure-port",
                    "0",
                ])
                .arg("--service-account-private-key-file")
                .arg(&pki.sa_key)
                .arg("--root-ca-file")
                .arg(&pki.ca)
                .args(["--cluster-cidr", CLUSTER_CIDR, "--service-cluster-ip-range", SERVICE_CIDR])
                // Node CIDRs are the lab's (each kubelet sets its Node's podCIDR); the legacy
                // token secrets controller has nothing to do with projected tokens.
                .args(["--controllers", "*,-nodeipam,-serviceaccount-token"]),
        )?;
        cp.procs.push(cm);
        let sched = spawn(
            &ns,
            &dir,
            "kube-scheduler",
            Command::new(k8s_bin("kube-scheduler")?).args([
                "--kubeconfig",
                &kc,
                "--leader-elect=false",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "0",
            ]),
        )?;
        cp.procs.push(sched);
        let sa: Api<ServiceAccount> = Api::namespaced(cp.client(), "default");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sa = sa.clone();
            if cp.run(async move { sa.get_opt("default").await }).is_ok_and(|s| s.is_some()) {
                break;
            }
            cp.check_alive()?;
            if Instant::now() > deadline {
                return Err(ControlPlaneError::NotReady {
                    what: "the controller manager (default service account)".into(),
                    secs: 60,
                    log: cp.log_tail("kube-controller-manager"),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        tracing::info!(ns = %cp.ns, secs = started.elapsed().as_secs_f64(), "control plane ready");
        Ok(cp)
    }

    /// Starts kube-apiserver (again, after `stop_apiserver`) and waits for `/readyz`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        let pki = Pki::paths(&self.dir);
        let mut cmd = Command::new(k8s_bin("kube-apiserver")?);
        cmd.args(["--etcd-servers", &format!("http://{ETCD_CLIENT}")])
            .args(["--bind-address", "0.0.0.0", "--secure-port", &API_PORT.to_string()])
            .args(["--advertise-address", &API_ADDR.to_string()])
            .arg("--tls-cert-file")
            .arg(&pki.apiserver_crt)
            .arg("--tls-private-key-file")
            .arg(&pki.apiserver_key)
            .arg("--client-ca-file")
            .arg(&pki.ca)
            .args(["--authorization-mode", "Node,RBAC"])
            .arg("--service-account-key-file")
            .arg(&pki.sa_pub)
            .arg("--service-account-signing-key-file")
            .arg(&pki.sa_key)
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args(["--service-cluster-ip-range", SERVICE_CIDR, "--service-node-port-range", "30000-32767"])
            .args(&self.options.apiserver_args);
        let p = spawn(&self.ns, &self.dir, "kube-apiserver", &mut cmd)?;
        self.procs.push(p);
        let (ns, dir) = (self.ns.clone(), self.dir.clone());
        let ca = pki.ca.to_str().expect("utf-8 path").to_string();
        let url = format!("https://{API_ADDR}:{API_PORT}/readyz");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if curl(&ns, &["--cacert", &ca, &url]).is_ok_and(|b| b.trim() == "ok") {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(ControlPlaneError::NotReady {
                    what: "kube-apiserver (/readyz)".into(),
                    secs: 90,
                    log: tail(&dir, "kube-apiserver"),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An API server outage: kube-apiserver is killed and waited for; its port refuses
    /// connections until `start_apiserver`.
    pub fn stop_apiserver(&mut self) {
        self.stop("kube-apiserver");
    }

    fn stop(&mut self, name: &str) {
        for p in self.procs.iter_mut().filter(|p| p.name == name) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.procs.retain(|p| p.name != name);
    }

    /// Fails when a control plane process has exited.
    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(ControlPlaneError::NotReady {
                    what: format!("{} (exited: {status})", p.name),
                    secs: 0,
                    log: tail(&self.dir, p.name),
                });
            }
        }
        Ok(())
    }

    /// The last lines of a process's log.
    pub fn log_tail(&self, name: &str) -> String {
        tail(&self.dir, name)
    }

    /// A client for this control plane. Use it in futures passed to `run`: its connections
    /// must be made from the control plane's namespace.
    pub fn client(&self) -> Client {
        self.client.clone().expect("client made at start")
    }

    /// The runtime whose threads live in the control plane's namespace.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt.as_ref().expect("runtime").handle().clone()
    }

    /// Runs `f` on the control plane's runtime (in its namespace) and waits for it.
    pub fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.rt.as_ref().expect("runtime");
        rt.block_on(rt.spawn(f)).expect("control plane task panicked")
    }

    /// `kubectl ARGS` against this control plane; stdout, or an error with kubectl's stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        output(self.kubectl_cmd().args(args))
    }

    /// `kubectl ARGS` with `input` on stdin (`apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write as _;
        let mut child = self
            .kubectl_cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting kubectl"))?;
        child.stdin.take().expect("piped").write_all(input.as_bytes()).map_err(io("writing to kubectl"))?;
        let out = child.wait_with_output().map_err(io("waiting for kubectl"))?;
        if !out.status.success() {
            return Err(ControlPlaneError::Command {
                cmd: format!("kubectl {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The kubectl command line (in the control plane's namespace, with its kubeconfig), for
    /// callers that print or stream its output themselves.
    pub fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .arg(k8s_bin("kubectl").unwrap_or_else(|_| PathBuf::from("kubectl")))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig);
        c
    }

    /// Creates Services, EndpointSlices and Pods (JSON, `kind` set; namespace `default` if
    /// none), `concurrency` requests at a time, as a controller would rather than kubectl's one
    /// by one; returns the created objects (with what the API server filled in: ClusterIPs,
    /// node ports) in the order given.
    pub fn create_many(&self, objects: Vec<serde_json::Value>, concurrency: usize) -> Result<Vec<serde_json::Value>> {
        let client = self.client();
        self.run(async move {
            futures::stream::iter(objects.into_iter().map(|o| create_one(client.clone(), o)))
                .buffered(concurrency.max(1))
                .try_collect()
                .await
        })
    }

    /// Connects node namespace `node_ns` to the control plane: a veth pair (10.255.N.0/30)
    /// and a route to API_ADDR. Returns the node's address on that link.
    pub fn attach(&mut self, node_ns: &str) -> Result<Ipv4Addr> {
        self.links += 1;
        let n = self.links;
        let (cp_ip, node_ip) = (Ipv4Addr::new(10, 255, n, 1), Ipv4Addr::new(10, 255, n, 2));
        let cp_if = format!("node{n}");
        output(Command::new("ip").args([
            "link", "add", &cp_if, "netns", &self.ns, "type", "veth", "peer", "name", "cp0", "netns", node_ns,
        ]))?;
        let ex = |ns: &str, args: &[&str]| output(Command::new("ip").args(["netns", "exec", ns]).args(args));
        ex(&self.ns, &["ip", "addr", "add", &format!("{cp_ip}/30"), "dev", &cp_if])?;
        ex(&self.ns, &["ip", "link", "set", &cp_if, "up"])?;
        ex(node_ns, &["ip", "addr", "add", &format!("{node_ip}/30"), "dev", "cp0"])?;
        ex(node_ns, &["ip", "link", "set", "cp0", "up"])?;
        ex(node_ns, &["ip", "route", "add", &format!("{API_ADDR}/32"), "via", &cp_ip.to_string()])?;
        Ok(node_ip)
    }

    /// Cuts node `node_ns` off the control plane, as a network partition would: its link goes
    /// down (new connections fail at once) and its open connections to the API server are
    /// aborted (`ss -K`), so its clients notice now rather than at their next write.
    pub fn disconnect(&self, node_ns: &str) -> Result<()> {
        let ex = |args: &[&str]| output(Command::new("ip").args(["netns", "exec", node_ns]).args(args));
        ex(&["ip", "link", "set", "cp0", "down"])?;
        ex(&["ss", "-K", "-t", "dst", &API_ADDR.to_string()])?;
        Ok(())
    }

    /// Undoes `disconnect`: the link comes up and the route to the API server is back.
    pub fn reconnect(&self, node_ns: &str) -> Result<()> {
        let ex = |args: &[&str]| output(Command::new("ip").args(["netns", "exec", node_ns]).args(args));
        ex(&["ip", "link", "set", "cp0", "up"])?;
        let addr = ex(&["ip", "-4", "-o", "addr", "show", "dev", "cp0"])?;
        let node_ip: Ipv4Addr = addr
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| ControlPlaneError::Missing(format!("no address on cp0 in {node_ns}: {addr}")))?;
        // The control plane's end of the /30 is the address below the node's.
        let cp_ip = Ipv4Addr::from(u32::from(node_ip) - 1);
        ex(&["ip", "route", "replace", &format!("{API_ADDR}/32"), "via", &cp_ip.to_string()])?;
        Ok(())
    }

    /// etcd's current revision (what resourceVersions are made of).
    pub fn etcd_revision(&self) -> Result<u64> {
        // etcd's JSON gateway to its gRPC API; keys are base64 ("AA==" is "\0": all keys).
        let body = curl(
            &self.ns,
            &[
                "-X",
                "POST",
                "-d",
                r#"{"key":"AA==","range_end":"AA==","count_only":true}"#,
                &format!("http://{ETCD_CLIENT}/v3/kv/range"),
            ],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| ControlPlaneError::Etcd(format!("{e}: {body}")))?;
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| ControlPlaneError::Etcd(format!("no revision in {body}")))
    }

    /// Writes objects straight into etcd, where kube-apiserver keeps them
    /// (`/registry/<resource>/<namespace>/<name>`, JSON, which its storage decodes as it
    /// decodes its own protobuf), bypassing admission, validation and the ClusterIP allocator.
    /// For the benchmark's 100,000 Services only: kube-apiserver v1.37's allocator takes time
    /// proportional to the ClusterIPs already allocated for each new one, so creating them
    /// through the API would take hours on 2 cores. The API server then lists and watches them
    /// as any other objects. `objects` are (resource, object) pairs, e.g. ("services/specs", ..).
    pub fn put_into_etcd(&self, objects: &[(&str, serde_json::Value)]) -> Result<()> {
        use base64::{engine::general_purpose::STANDARD, Engine};
        // etcd's default --max-txn-ops.
        for chunk in objects.chunks(128) {
            let ops: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(resource, obj)| {
                    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
                    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                    let key = format!("/registry/{resource}/{ns}/{name}");
                    serde_json::json!({"request_put": {"key": STANDARD.encode(key), "value": STANDARD.encode(obj.to_string())}})
                })
                .collect();
            let file = self.dir.join("etcd-txn.json");
            std::fs::write(&file, serde_json::json!({"success": ops}).to_string())
                .map_err(|e| ControlPlaneError::Etcd(format!("writing {}: {e}", file.display())))?;
            let body = curl(
                &self.ns,
                &["-X", "POST", "-d", &format!("@{}", file.display()), &format!("http://{ETCD_CLIENT}/v3/kv/txn")],
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| ControlPlaneError::Etcd(format!("{e}: {body}")))?;
            if v["succeeded"] != serde_json::json!(true) {
                return Err(ControlPlaneError::Etcd(format!("transaction of {} puts: {body}", chunk.len())));
            }
        }
        Ok(())
    }

    /// How many keys etcd holds under `prefix` (e.g. `/registry/ipaddresses/`).
    pub fn etcd_count(&self, prefix: &str) -> Result<usize> {
        use base64::{engine::general_purpose::STANDARD, Engine};
        // The range end of a prefix: its last byte plus one ('/' + 1 = '0').
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let query =
            serde_json::json!({"key": STANDARD.encode(prefix), "range_end": STANDARD.encode(&end), "count_only": true});
        let body =
            curl(&self.ns, &["-X", "POST", "-d", &query.to_string(), &format!("http://{ETCD_CLIENT}/v3/kv/range")])?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| ControlPlaneError::Etcd(format!("{e}: {body}")))?;
        // proto3 JSON leaves a zero count out.
        Ok(v["count"].as_str().and_then(|c| c.parse().ok()).unwrap_or(0))
    }

    /// Compacts etcd's history up to its current revision: a watch resuming from any
    /// resourceVersion before it gets `410 Gone` (when the API server passes it to etcd).
    pub fn compact_etcd(&self) -> Result<u64> {
        let rev = self.etcd_revision()?;
        let body = curl(
            &self.ns,
            &[
                "-X",
                "POST",
                "-d",
                &format!(r#"{{"revision":"{rev}","physical":true}}"#),
                &format!("http://{ETCD_CLIENT}/v3/kv/compaction"),
            ],
        )?;
        if body.contains("error") {
            return Err(ControlPlaneError::Etcd(body));
        }
        Ok(rev)
    }
}

async fn create_one(client: Client, obj: serde_json::Value) -> Result<serde_json::Value> {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    let what =
        format!("{} {ns}/{}", obj["kind"].as_str().unwrap_or("?"), obj["metadata"]["name"].as_str().unwrap_or("?"));
    let json = |source| ControlPlaneError::Json { what: what.clone(), source };
    let pp = PostParams::default();
    let created = match obj["kind"].as_str() {
        Some("Service") => {
            let o: Service = serde_json::from_value(obj).map_err(json)?;
            serde_json::to_value(Api::<Service>::namespaced(client, &ns).create(&pp, &o).await?)
        }
        Some("EndpointSlice") => {
            let o: EndpointSlice = serde_json::from_value(obj).map_err(json)?;
            serde_json::to_value(Api::<EndpointSlice>::namespaced(client, &ns).create(&pp, &o).await?)
        }
        Some("Pod") => {
            let o: Pod = serde_json::from_value(obj).map_err(json)?;
            serde_json::to_value(Api::<Pod>::namespaced(client, &ns).create(&pp, &o).await?)
        }
        _ => {
            return Err(ControlPlaneError::Missing(format!(
                "{what}: create_many takes Services, EndpointSlices and Pods"
            )))
        }
    };
    created.map_err(json)
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The client's runtime first: its threads hold the namespace.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        // The reverse of the start order: clients of the API server before it, etcd last.
        for p in self.procs.iter_mut().rev() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts `cmd` in namespace `ns`, its output in `dir/NAME.log`.
fn spawn(ns: &str, dir: &Path, name: &'static str, cmd: &mut Command) -> Result<Proc> {
    let log = fs::File::create(dir.join(format!("{name}.log"))).map_err(io(format!("creating {name}.log")))?;
    let err = log.try_clone().map_err(io("log file"))?;
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut full = Command::new("ip");
    full.args(["netns", "exec", ns]).arg(program).args(args).stdout(log).stderr(err).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        full.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = full.spawn().map_err(io(format!("starting {name}")))?;
    Ok(Proc { name, child })
}

fn tail(dir: &Path, name: &str) -> String {
    let text = fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn wait_until(dir: &Path, what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            return Err(ControlPlaneError::NotReady {
                what: what.into(),
                secs: within.as_secs(),
                log: tail(dir, what),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `curl -sS ARGS` inside namespace `ns`; the body.
fn curl(ns: &str, args: &[&str]) -> Result<String> {
    output(Command::new("ip").args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5"]).args(args))
}
