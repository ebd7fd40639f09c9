//! The real control plane and the netns kubelet, checked on their own before anything relies on
//! them: a Deployment's pods run as namespaces answering with their names, the real
//! EndpointSlice controller lists them ready, a deleted pod is `terminating` (still serving)
//! while its preStop sleep runs and then leaves the slice, and everything is gone afterwards.
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{api::ListParams, Api};
use lb_tests::{
    control_plane::ControlPlane,
    http_get,
    kubelet::{Kubelet, KubeletConfig},
    privileged, Lab,
};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 20
      containers:
      - name: web
        image: nginx
        ports: [{containerPort: 80, name: http}]
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 1
        lifecycle:
          preStop:
            sleep: {seconds: 4}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"#;

/// `(address, ready, serving, terminating)` of every endpoint in the Service's slices.
fn endpoints(cp: &ControlPlane, service: &str) -> Vec<(String, bool, bool, bool)> {
    let slices: Api<EndpointSlice> = Api::namespaced(cp.client(), "default");
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let list = cp.run(async move { slices.list(&lp).await });
    let mut out = Vec::new();
    for s in list.map(|l| l.items).unwrap_or_default() {
        for e in s.endpoints.into_iter().flatten() {
            let c = e.conditions.unwrap_or_default();
            out.push((
                e.addresses[0].clone(),
                c.ready.unwrap_or(false),
                c.serving.unwrap_or(false),
                c.terminating.unwrap_or(false),
            ));
        }
    }
    out.sort();
    out
}

fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !f() {
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn deployment_pods_run_and_the_endpointslice_controller_follows_them() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut cp = ControlPlane::start()?;
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1", 1)?;
    let node_ip = cp.attach(&node.ns)?;
    let kubelet = Kubelet::start(&cp, &node, KubeletConfig::new(node_ip))?;
    let client = lab.add_pod(&node, "client", 250)?;

    let nodes = cp.kubectl(&["get", "nodes", "-o", "wide"])?;
    assert!(nodes.contains("node1") && nodes.contains(" Ready ") && nodes.contains(&node_ip.to_string()), "{nodes}");
    cp.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)?;
    wait("two ready endpoints", Duration::from_secs(60), || {
        let eps = endpoints(&cp, "web");
        eps.len() == 2 && eps.iter().all(|e| e.1)
    })?;
    let pods = kubelet.pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    for (key, pod) in &pods {
        assert!(key.starts_with("default/web-"), "{key}");
        // The pod answers with its own name on the declared port.
        assert_eq!(http_get(&client.ns, (pod.ip, 80).into(), "/")?, pod.name);
        let listed = cp.kubectl(&["get", "pod", &pod.name, "-o", "jsonpath={.status.podIP} {.status.phase}"])?;
        assert_eq!(listed, format!("{} Running", pod.ip));
    }

    // Graceful deletion: terminating while the preStop sleep runs, still serving; then gone,
    // and the ReplicaSet's replacement takes its place.
    let (_, victim) = pods.iter().next().expect("a pod");
    let victim = victim.clone();
    let deleted = Instant::now();
    cp.kubectl(&["delete", "pod", &victim.name, "--wait=false"])?;
    wait("the deleted pod terminating", Duration::from_secs(10), || {
        endpoints(&cp, "web").iter().any(|e| e.0 == victim.ip.to_string() && !e.1 && e.2 && e.3)
    })?;
    assert_eq!(http_get(&client.ns, (victim.ip, 80).into(), "/")?, victim.name, "a terminating pod serves on");
    wait("the deleted pod gone from the slice", Duration::from_secs(20), || {
        !endpoints(&cp, "web").iter().any(|e| e.0 == victim.ip.to_string())
    })?;
    assert!(deleted.elapsed() >= Duration::from_secs(4), "the preStop sleep was cut short");
    kubelet.wait_gone("default", &victim.name, Duration::from_secs(10))?;
    wait("the replacement ready", Duration::from_secs(30), || {
        let eps = endpoints(&cp, "web");
        eps.len() == 2 && eps.iter().all(|e| e.1)
    })?;
    let ns_of_victim = victim.ns.clone();
    drop(kubelet);
    let left = lb_tests::sh(&["ip", "netns", "list"])?;
    assert!(!left.contains(&ns_of_victim), "{left}");
    let _ = client;
    Ok(())
}
