//! The real control plane and the netns kubelet, checked on their own before anything relies on
//! them: a Deployment's pods run as namespaces answering with their names, the real
//! EndpointSlice controller lists them ready, a deleted pod is `terminating` (still serving)
//! while its preStop sleep runs and then leaves the slice, and everything is gone afterwards.
//! A pod whose readiness probe fails is Running but not Ready, and its endpoint not ready,
//! until the probe passes; when it fails again, the pod is taken out again.
use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{api::ListParams, Api};
use lb_tests::{
    control_plane::ControlPlane,
    http_get, in_ns,
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

/// A pod whose readiness probe asks a port its server does not listen on (the server answers
/// on 80 all along: only the probe decides), and a Service selecting it.
const PROBED: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: probed
  labels: {app: probed}
spec:
  nodeName: node1
  containers:
  - name: web
    image: nginx
    ports: [{containerPort: 80, name: http}]
    readinessProbe:
      tcpSocket: {port: 8081}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Service
metadata:
  name: probed
spec:
  selector: {app: probed}
  ports: [{port: 80, targetPort: http}]
"#;

/// The pod's phase and its `Ready` condition's status, as the API server has them.
fn phase_and_ready(cp: &ControlPlane, pod: &str) -> String {
    cp.kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.phase} {.status.conditions[?(@.type==\"Ready\")].status}"])
        .unwrap_or_default()
}

#[test]
fn a_failing_readiness_probe_keeps_the_pod_and_its_endpoint_not_ready() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut cp = ControlPlane::start()?;
    let mut lab = Lab::new()?;
    let node = lab.add_node("node1", 1)?;
    let node_ip = cp.attach(&node.ns)?;
    let kubelet = Kubelet::start(&cp, &node, KubeletConfig::new(node_ip))?;
    cp.kubectl_stdin(&["apply", "-f", "-"], PROBED)?;

    // Three probes failed, each one's result already in the pod's status.
    wait("three readiness probes", Duration::from_secs(60), || kubelet.probes_run("default", "probed") >= 3)?;
    let pod = kubelet.pod("default", "probed").expect("the kubelet runs the pod");
    assert_eq!(phase_and_ready(&cp, "probed"), "Running False");
    let ip = pod.ip.to_string();
    let not_ready = vec![(ip.clone(), false, false, false)];
    wait("the endpoint listed, not ready", Duration::from_secs(30), || endpoints(&cp, "probed") == not_ready)?;

    // Something listens on the probed port now: ready, and so is the endpoint.
    let listener = in_ns(&pod.ns, || TcpListener::bind("0.0.0.0:8081"))??;
    wait("the pod ready", Duration::from_secs(30), || phase_and_ready(&cp, "probed") == "Running True")?;
    let ready = vec![(ip.clone(), true, true, false)];
    wait("the endpoint ready", Duration::from_secs(30), || endpoints(&cp, "probed") == ready)?;

    // It stops listening: after two failed probes, not ready again.
    drop(listener);
    wait("the pod not ready again", Duration::from_secs(30), || phase_and_ready(&cp, "probed") == "Running False")?;
    wait("the endpoint not ready again", Duration::from_secs(30), || endpoints(&cp, "probed") == not_ready)?;
    Ok(())
}
