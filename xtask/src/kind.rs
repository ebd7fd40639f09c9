//! `cargo xtask kind`: lb on a kind cluster created without kube-proxy, then the seed lab on
//! it. Needs docker (with its daemon), kind and kubectl on PATH; none of them is installed by
//! `setup`, because CI and the test machines have no Docker daemon.
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{run, workspace_root};

const CLUSTER: &str = "lb";

fn have(tool: &str) -> bool {
    Command::new(tool).arg("version").output().is_ok_and(|o| o.status.success())
}

fn kubectl(args: &[&str]) -> Result<()> {
    run(Command::new("kubectl").args(["--context", &format!("kind-{CLUSTER}")]).args(args))
}

fn kubectl_out(args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .args(["--context", &format!("kind-{CLUSTER}")])
        .args(args)
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn kind() -> Result<()> {
    for tool in ["docker", "kind", "kubectl"] {
        if !have(tool) {
            bail!("`{tool}` is missing or cannot reach its server; `cargo xtask kind` needs docker (daemon running), kind and kubectl");
        }
    }
    let root = workspace_root();
    let clusters =
        String::from_utf8_lossy(&Command::new("kind").args(["get", "clusters"]).output()?.stdout).into_owned();
    if !clusters.lines().any(|c| c == CLUSTER) {
        run(Command::new("kind").args(["create", "cluster", "--config"]).arg(root.join("deploy/kind.yaml")))?;
    }
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "--bin",
        "lb",
    ]))?;
    run(Command::new("docker").current_dir(&root).args(["build", "-t", "lb:dev", "-f", "deploy/Dockerfile", "."]))?;
    run(Command::new("kind").args(["load", "docker-image", "lb:dev", "--name", CLUSTER]))?;
    for f in ["rbac.yaml", "config.yaml", "daemonset.yaml"] {
        kubectl(&["apply", "-f", root.join("deploy").join(f).to_str().expect("utf-8 path")])?;
    }
    // Restart so a rebuilt image is picked up; pinned state carries traffic meanwhile.
    kubectl(&["-n", "kube-system", "rollout", "restart", "daemonset/lb"])?;
    kubectl(&["-n", "kube-system", "rollout", "status", "daemonset/lb", "--timeout=180s"])?;
    kubectl(&["apply", "-f", root.join("deploy/lab/lab.yaml").to_str().expect("utf-8 path")])?;
    kubectl(&["rollout", "status", "deployment/web-deploy", "--timeout=180s"])?;
    kubectl(&["wait", "--for=condition=Ready", "pod/busybox", "--timeout=180s"])?;
    println!("\n== ClusterIP web-service from the busybox pod, 30 requests ==");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let pod = kubectl_out(&["exec", "busybox", "--", "wget", "-qO-", "-T", "2", "http://web-service"])?;
        *seen.entry(pod.trim().to_string()).or_insert(0) += 1;
    }
    for (pod, n) in &seen {
        println!("  {pod}: {n}");
    }
    if seen.len() < 2 {
        bail!("expected answers from several pods: {seen:?}");
    }
    println!("\n== lb's metrics on one node ==");
    let node_ip = kubectl_out(&["get", "nodes", "-o", "jsonpath={.items[0].status.addresses[0].address}"])?;
    let metrics = kubectl_out(&["exec", "busybox", "--", "wget", "-qO-", &format!("http://{node_ip}:10249/metrics")])?;
    for l in metrics.lines().filter(|l| l.starts_with("lb_programmed") || l.starts_with("lb_sync_total")) {
        println!("  {l}");
    }
    println!("\nlb runs on kind cluster `{CLUSTER}` in place of kube-proxy (kind delete cluster --name {CLUSTER} removes it).");
    Ok(())
}
