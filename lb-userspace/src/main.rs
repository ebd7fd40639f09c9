//! `lb`: eBPF Kubernetes Service load balancer. `lb run` is the agent; `lb list` inspects the
//! pinned maps of a running one.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::{Counter, CT_DIR_FORWARD};
use lb_userspace::{
    dataplane::{self, decode_name, endpoint_of, frontend_of, ipv4, Config, Dataplane, MapSizes, Maps, Timeouts},
    manifests, metrics,
    model::{self, Protocol},
};
use tracing::{debug, error, info, warn};

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF Kubernetes Service load balancer (kube-proxy replacement)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: program the datapath from Kubernetes objects and keep it in sync.
    Run(Box<RunArgs>),
    /// Show the state of a running agent, read from its pinned maps.
    List {
        what: ListWhat,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach the programs and remove every pinned map and link under the pin directory.
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser, Debug)]
struct RunArgs {
    /// YAML file whose keys are these flags' long names (`node-name: n1`, `map-conntrack:
    /// 1048576`, lists as YAML lists). A flag given on the command line wins over the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kubernetes YAML instead of the API server: a file (multi-document allowed) or a
    /// directory of .yaml/.yml/.json files. Watched; changes are applied within about a second.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig to reach the API server. Default: as any client (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Longest wait between retries of a broken watch, seconds.
    #[arg(long, default_value_t = 5)]
    watch_retry_max: u64,
    /// Prometheus metrics (and /healthz) address; empty string disables.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: String,
    /// /healthz address (200 once the first state is programmed and attached); empty disables.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: String,
    /// Name of this node, as in EndpointSlice `nodeName`.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where maps and links are pinned. One directory per agent.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Attach the tc program only to interfaces matching these globs (`*`, `?`). Default: all
    /// but `lo`.
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// The node's external interfaces, where the XDP program handles node ports, LoadBalancer
    /// and external IPs ahead of the stack (globs). Default: the default route's interface.
    #[arg(long = "xdp-iface")]
    xdp_ifaces: Vec<String>,
    /// How to attach XDP: `auto` (per interface: native where the driver transmits native XDP
    /// frames, as the kernel's xdp-features say, else none and tc alone), `native` (driver mode
    /// everywhere; packets the driver cannot send go to tc), or `generic` (skb mode everywhere:
    /// works on every device, but costs an skb before XDP runs and linearizes GRO packets).
    #[arg(long, value_enum, default_value_t = dataplane::XdpAttachMode::Auto)]
    xdp_mode: dataplane::XdpAttachMode,
    /// cgroup v2 directory whose processes get socket-level translation (the node's own
    /// processes reaching ClusterIPs and node ports). Default: the cgroup2 mount.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// No socket-level translation: the node's own processes then cannot reach ClusterIPs.
    #[arg(long, conflicts_with = "cgroup")]
    no_socket_lb: bool,
    /// Attach no XDP program (tc alone then does everything).
    #[arg(long, conflicts_with = "xdp_ifaces")]
    no_xdp: bool,
    /// Conntrack lifetime of an established TCP flow, seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_established_s)]
    ct_tcp_established_timeout: u64,
    /// Conntrack lifetime of a TCP flow after a RST (CLOSE), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_close_s)]
    ct_tcp_close_timeout: u64,
    /// Conntrack lifetime of a TCP flow in its handshake (SYN_SENT, SYN_RECV), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_syn_s)]
    ct_tcp_syn_timeout: u64,
    /// Conntrack lifetime of an idle half-closed TCP flow (FIN_WAIT, CLOSE_WAIT), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_fin_wait_s)]
    ct_tcp_fin_wait_timeout: u64,
    /// Conntrack lifetime of a TCP flow closed both ways awaiting the last ACK (LAST_ACK), seconds.
    #[arg(long, default_value_t = Timeouts::default().tcp_last_ack_s)]
    ct_tcp_last_ack_timeout: u64,
    /// Conntrack lifetime of a closed TCP flow (TIME_WAIT), seconds. A new SYN on its tuple
    /// starts a new flow at any time.
    #[arg(long, default_value_t = Timeouts::default().tcp_time_wait_s)]
    ct_tcp_time_wait_timeout: u64,
    /// Conntrack lifetime of an idle UDP flow, seconds.
    #[arg(long, default_value_t = Timeouts::default().udp_s)]
    ct_udp_timeout: u64,
    /// Address that external traffic to a backend on another node is SNATed to (so replies
    /// return through this node). Default: the IPv4 address of the default route's interface.
    #[arg(long)]
    node_ip: Option<std::net::Ipv4Addr>,
    /// Node ports answer only on node addresses inside these CIDRs (comma-separated or
    /// repeated). Default: every address of the node but loopback.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<model::Cidr>,
    /// Capacity of the services map (frontends).
    #[arg(long, default_value_t = MapSizes::default().services)]
    map_services: u32,
    /// Capacity of the backend slots map (backends summed over all frontends).
    #[arg(long, default_value_t = MapSizes::default().backend_slots)]
    map_backends: u32,
    /// Capacity of the assured conntrack table: live connections, two entries each, never
    /// evicted (a flow that finds it full stays in the LRU table, counted as ct_assured_full).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    map_conntrack: u32,
    /// Capacity of the conntrack LRU table of new and finished flows (two entries each).
    #[arg(long, default_value_t = MapSizes::default().conntrack_new)]
    map_conntrack_new: u32,
    /// Capacity of the session affinity map (client, service) pins (LRU).
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    map_affinity: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum ListWhat {
    Services,
    Backends,
    Conntrack,
    Affinity,
    Stats,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = parse_cli(std::env::args_os().collect()).context("reading the configuration")?;
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting runtime")?;
            rt.block_on(run(*args))
        }
        Command::List { what, pin_dir } => list(what, &pin_dir),
        Command::Cleanup { pin_dir } => {
            dataplane::cleanup(&pin_dir).with_context(|| format!("cleaning {}", pin_dir.display()))
        }
    }
}

/// Parses the command line; for `lb run --config FILE`, the file's keys become flags placed
/// before the command line's, unless the command line sets the same flag.
fn parse_cli(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    use clap::{parser::ValueSource, CommandFactory};
    // A lenient first pass finds `--config` and which flags the command line sets; required
    // flags may be in the file.
    let matches = Cli::command().ignore_errors(true).try_get_matches_from(&argv).unwrap_or_default();
    let Some(("run", run)) = matches.subcommand() else {
        return Ok(Cli::parse_from(argv));
    };
    let Some(path) = run.get_one::<PathBuf>("config") else {
        return Ok(Cli::parse_from(argv));
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let file: serde_yaml::Mapping =
        serde_yaml::from_str(&text).with_context(|| format!("config file {}: not a YAML mapping", path.display()))?;
    let cmd = RunArgs::command();
    let mut from_file: Vec<std::ffi::OsString> = Vec::new();
    for (k, v) in file {
        let key = k.as_str().map(str::to_string).unwrap_or_default();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .with_context(|| format!("config file {}: unknown key {key:?}", path.display()))?;
        let id = arg.get_id().as_str();
        if run.value_source(id) == Some(ValueSource::CommandLine) {
            continue;
        }
        let scalar = |v: &serde_yaml::Value| -> anyhow::Result<String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                _ => anyhow::bail!("config file {}: key {key:?}: expected a scalar or a list", path.display()),
            }
        };
        match &v {
            serde_yaml::Value::Bool(b) if !arg.get_action().takes_values() => {
                if *b {
                    from_file.push(format!("--{key}").into());
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for item in items {
                    from_file.push(format!("--{key}={}", scalar(item)?).into());
                }
            }
            other => from_file.push(format!("--{key}={}", scalar(other)?).into()),
        }
    }
    // argv is `lb [global...] run [args...]`: insert the file's flags right after `run`.
    let at = argv.iter().position(|a| a == "run").map_or(argv.len(), |i| i + 1);
    let mut merged = argv[..at].to_vec();
    merged.extend(from_file);
    merged.extend_from_slice(&argv[at..]);
    Cli::try_parse_from(merged).with_context(|| format!("config file {}", path.display()))
}

/// Where desired state comes from.
enum Source {
    /// YAML files, re-read on every tick; `last` is what was applied.
    Manifests { path: PathBuf, last: Option<Vec<(PathBuf, String)>> },
    /// The API server, through reflectors.
    Kube(lb_userspace::kube_source::KubeSource),
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

fn socket_addr(flag: &str, v: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| format!("--{flag} {v:?}: expected ADDRESS:PORT"))?))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config {
        timeouts: Timeouts {
            tcp_syn_s: args.ct_tcp_syn_timeout,
            tcp_established_s: args.ct_tcp_established_timeout,
            tcp_close_s: args.ct_tcp_close_timeout,
            tcp_fin_wait_s: args.ct_tcp_fin_wait_timeout,
            tcp_last_ack_s: args.ct_tcp_last_ack_timeout,
            tcp_time_wait_s: args.ct_tcp_time_wait_timeout,
            udp_s: args.ct_udp_timeout,
        },
        sizes: MapSizes {
            services: args.map_services,
            backend_slots: args.map_backends,
            conntrack: args.map_conntrack,
            conntrack_new: args.map_conntrack_new,
            affinity: args.map_affinity,
        },
        node_ip: args.node_ip.or_else(default_route_address),
        xdp_mode: args.xdp_mode,
    };
    let metrics_addr = socket_addr("metrics-addr", &args.metrics_addr)?;
    let healthz_addr = socket_addr("healthz-addr", &args.healthz_addr)?;
    if config.node_ip.is_none() {
        warn!("no --node-ip and no default route: external traffic to backends on other nodes is not SNATed");
    }
    // The API client first: a bad kubeconfig must fail before anything is loaded or attached.
    let mut source = match &args.manifests {
        Some(path) => Source::Manifests { path: path.clone(), last: None },
        None => {
            let client = lb_userspace::kube_source::client(args.kubeconfig.as_deref()).await?;
            let backoff = lb_userspace::kube_source::WatchBackoff::new(
                Duration::from_millis(500),
                Duration::from_secs(args.watch_retry_max.max(1)),
            );
            info!(
                "watching Services, EndpointSlices and this Node; nothing is programmed before their first full list"
            );
            Source::Kube(lb_userspace::kube_source::KubeSource::start(client, &args.node_name, backoff))
        }
    };
    let mut dp = Dataplane::load(&args.pin_dir, &config)
        .with_context(|| format!("loading the datapath with pin directory {}", args.pin_dir.display()))?;
    info!(node = %args.node_name, pin_dir = %args.pin_dir.display(), "datapath loaded");
    if !args.no_socket_lb {
        match args.cgroup.clone().or_else(dataplane::cgroup2_mount) {
            Some(cg) => dp.attach_socket_lb(&cg).with_context(|| format!("attaching to cgroup {}", cg.display()))?,
            None => warn!("no cgroup v2 mount: the node's own processes cannot reach ClusterIPs"),
        }
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
        st.conntrack_collected = dp.ct_collected_counter();
    }
    let mut servers = Vec::new();
    if let Some(addr) = metrics_addr {
        servers.push(metrics::serve(addr, args.pin_dir.clone(), status.clone(), watch_stats.clone()).await?);
    }
    if let Some(addr) = healthz_addr.filter(|a| Some(*a) != metrics_addr) {
        servers.push(metrics::serve(addr, args.pin_dir.clone(), status.clone(), watch_stats).await?);
    }

    let globs = args.ifaces.clone();
    let wanted = move |name: &str| dataplane::interface_wanted(&globs, name);
    let xdp_globs: Vec<String> = if args.no_xdp {
        Vec::new()
    } else if !args.xdp_ifaces.is_empty() {
        args.xdp_ifaces.clone()
    } else {
        default_route_interface().into_iter().collect()
    };
    let xdp_wanted = move |name: &str| !xdp_globs.is_empty() && dataplane::interface_wanted(&xdp_globs, name);

    let mut poll = tokio::time::interval(Duration::from_millis(500));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let mut health = lb_userspace::healthcheck::HealthChecks::default();
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
        if let Some(objects) = source.poll(&args.node_name, &mut dirty, synced) {
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
            match dp.sync_node_addresses(&args.nodeport_addresses) {
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
fn default_route_address() -> Option<std::net::Ipv4Addr> {
    let iface = default_route_interface()?;
    dataplane::local_ipv4_by_interface().ok()?.into_iter().find(|(i, _)| *i == iface).map(|(_, ip)| ip)
}

/// The interface holding the IPv4 default route, if any.
fn default_route_interface() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")).then(|| f[0].to_string())
    })
}

/// CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime with a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn list(what: ListWhat, pin_dir: &Path) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(pin_dir)
        .with_context(|| format!("opening the maps pinned under {} (is an agent running there?)", pin_dir.display()))?;
    let names: std::collections::BTreeMap<u32, String> =
        maps.names.iter().filter_map(Result::ok).map(|(id, n)| (id, decode_name(&n))).collect();
    let name_of = |id: u32| names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
    match what {
        ListWhat::Services => {
            let mut rows: Vec<_> = maps.services.iter().filter_map(Result::ok).collect();
            rows.sort_by_key(|(k, v)| frontend_of(k, v.flags));
            println!("{:<6} {:<24} {:<8} {:<5} {:<16} SERVICE", "ID", "FRONTEND", "BACKENDS", "GEN", "AFFINITY");
            for (k, v) in rows {
                let f = frontend_of(&k, v.flags).map(|f| f.to_string()).unwrap_or_else(|| "?".into());
                let affinity = if v.flags & lb_common::SVC_FLAG_AFFINITY != 0 {
                    format!("ClientIP/{}s", v.affinity_timeout_s)
                } else {
                    "None".to_string()
                };
                println!(
                    "{:<6} {:<24} {:<8} {:<5} {:<16} {}",
                    v.id,
                    f,
                    v.backend_count,
                    v.generation,
                    affinity,
                    name_of(v.id)
                );
            }
        }
        ListWhat::Backends => {
            let services: Vec<_> = maps.services.iter().filter_map(Result::ok).collect();
            println!("{:<24} {:<5} {:<22} SERVICE", "FRONTEND", "SLOT", "BACKEND");
            let mut rows = Vec::new();
            for (k, v) in &services {
                for slot in 0..v.backend_count {
                    let key = lb_common::BackendSlotKey { service_id: v.id, generation: v.generation, slot };
                    let backend = maps
                        .slots
                        .get(&key, 0)
                        .map(|b| endpoint_of(&b).to_string())
                        .unwrap_or_else(|_| "<missing>".into());
                    rows.push((frontend_of(k, v.flags), slot, backend, name_of(v.id)));
                }
            }
            rows.sort();
            for (f, slot, b, n) in rows {
                let f = f.map(|f| f.to_string()).unwrap_or_else(|| "?".into());
                println!("{f:<24} {slot:<5} {b:<22} {n}");
            }
        }
        ListWhat::Conntrack => {
            let clock = dataplane::clock::Clock::new()?;
            let now = clock.jiffies()?;
            println!(
                "{:<7} {:<5} {:<22} {:<22} {:<26} {:>7} {:>7} {:<11} {:<7} SERVICE",
                "DIR", "PROTO", "SOURCE", "DESTINATION", "TRANSLATED", "AGE(s)", "IDLE(s)", "STATE", "TABLE"
            );
            let flows = dataplane::conntrack::entries(&maps.conntrack, &maps.conntrack_new);
            for (k, v, assured) in flows {
                let proto =
                    Protocol::from_number(k.proto).map(|p| p.to_string()).unwrap_or_else(|| k.proto.to_string());
                let at = |a: u32, p: u16| format!("{}:{}", std::net::Ipv4Addr::from(u32::from_be(a)), u16::from_be(p));
                let (src, dst, nat) = (at(k.src, k.sport), at(k.dst, k.dport), at(v.nat_addr, v.nat_port));
                let (dir, nat) = if k.dir == CT_DIR_FORWARD {
                    ("forward", format!("dst {nat}"))
                } else {
                    ("reply", format!("src {nat}"))
                };
                println!(
                    "{dir:<7} {proto:<5} {src:<22} {dst:<22} {nat:<26} {:>7} {:>7} {:<11} {:<7} {}",
                    clock.to_secs(now.wrapping_sub(v.created)),
                    clock.to_secs(now.wrapping_sub(v.last_seen)),
                    lb_common::ct_state_name(v.state),
                    if assured { "assured" } else { "new" },
                    name_of(v.service_id)
                );
            }
        }
        ListWhat::Affinity => {
            let now = monotonic_ns();
            let services: std::collections::BTreeMap<u32, (String, u32)> = maps
                .services
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| {
                    (v.id, (frontend_of(&k, v.flags).map(|f| f.to_string()).unwrap_or_default(), v.affinity_timeout_s))
                })
                .collect();
            println!(
                "{:<16} {:<24} {:<22} {:>9} {:>11} SERVICE",
                "CLIENT", "FRONTEND", "BACKEND", "IDLE(s)", "EXPIRES(s)"
            );
            let mut rows: Vec<_> = maps.affinity.iter().filter_map(Result::ok).collect();
            rows.sort_by_key(|(k, _)| (k.service_id, ipv4(k.client)));
            for (k, v) in rows {
                let (frontend, timeout) = services.get(&k.service_id).cloned().unwrap_or_default();
                let idle = now.saturating_sub(v.last_used_ns) / 1_000_000_000;
                let left = (timeout as u64).checked_sub(idle).map_or_else(|| "expired".to_string(), |l| l.to_string());
                println!(
                    "{:<16} {:<24} {:<22} {:>9} {:>11} {}",
                    ipv4(k.client),
                    frontend,
                    endpoint_of(&v.backend).to_string(),
                    idle,
                    left,
                    name_of(k.service_id)
                );
            }
        }
        ListWhat::Stats => {
            println!("{:<24} {:>12} {:>12} {:>12}", "COUNTER", "TC", "XDP", "SOCK");
            for c in Counter::ALL {
                let at = |hook: u32| -> u64 {
                    maps.stats.get(&(hook * lb_common::COUNTER_MAX + c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
                };
                println!("{:<24} {:>12} {:>12} {:>12}", c.name(), at(0), at(1), at(2));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(config: &str, argv: &[&str]) -> anyhow::Result<RunArgs> {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}-{}", std::process::id(), argv.len()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("config.yaml");
        std::fs::write(&path, config)?;
        let mut full = vec!["lb".into(), "run".into(), "--config".into(), path.clone().into_os_string()];
        full.extend(argv.iter().map(std::ffi::OsString::from));
        let cli = parse_cli(full);
        let _ = std::fs::remove_dir_all(&dir);
        match cli?.command {
            Command::Run(args) => Ok(*args),
            _ => anyhow::bail!("not run"),
        }
    }

    #[test]
    fn config_file_keys_are_the_flags_and_the_command_line_wins() {
        let config = "node-name: from-file\nmap-conntrack: 1048576\nmap-affinity: 1000\niface: [eth0, \"veth*\"]\nno-xdp: true\nmetrics-addr: 0.0.0.0:9999\nmanifests: /etc/lb/objects\n";
        let args = run_args(config, &["--map-conntrack", "4096"]).unwrap();
        assert_eq!(args.node_name, "from-file");
        assert_eq!(args.map_conntrack, 4096, "the command line wins");
        assert_eq!(args.map_affinity, 1000);
        assert_eq!(args.ifaces, vec!["eth0", "veth*"]);
        assert!(args.no_xdp);
        assert_eq!(args.metrics_addr, "0.0.0.0:9999");
        assert_eq!(args.manifests.as_deref(), Some(Path::new("/etc/lb/objects")));
        // Flags not in the file keep their defaults.
        assert_eq!(args.map_services, MapSizes::default().services);
    }

    #[test]
    fn config_file_errors_name_the_key() {
        let e = run_args("node-name: n\nmap-conntrak: 5\n", &[]).expect_err("an error");
        assert!(format!("{e:#}").contains("unknown key \"map-conntrak\""), "{e:#}");
        let e = run_args("node-name: n\nmap-conntrack: lots\n", &[]).expect_err("an error");
        assert!(format!("{e:#}").contains("map-conntrack"), "{e:#}");
        let e = run_args("- just\n- a list\n", &[]).expect_err("an error");
        assert!(format!("{e:#}").contains("not a YAML mapping"), "{e:#}");
    }
}
