//! The deployment manifests in deploy/ parse as their Kubernetes types and say what the README
//! promises: read-only RBAC on exactly Services, EndpointSlices and Nodes; a host-network
//! DaemonSet with named capabilities and no privilege; a config every key of which `lb run`
//! accepts; a kind cluster without kube-proxy.
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ConfigMap,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

fn deploy(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn docs(file: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(&deploy(file))
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let doc = docs(file).into_iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in {file}"));
    serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{kind} in {file}: {e}"))
}

/// Read-only on what lb translates; it writes Events (create, and patch for a repeated one)
/// and nothing else.
#[test]
fn rbac_reads_services_endpointslices_and_nodes_and_writes_only_events() {
    let role: ClusterRole = of_kind("rbac.yaml", "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap() {
            for r in rule.resources.clone().unwrap() {
                for v in &rule.verbs {
                    granted.insert(format!("{group}/{r}:{v}"));
                }
            }
        }
    }
    let mut want: BTreeSet<String> = BTreeSet::new();
    for r in ["/services", "/nodes", "discovery.k8s.io/endpointslices"] {
        for v in ["get", "list", "watch"] {
            want.insert(format!("{r}:{v}"));
        }
    }
    want.insert("events.k8s.io/events:create".into());
    want.insert("events.k8s.io/events:patch".into());
    assert_eq!(granted, want);
    let binding: ClusterRoleBinding = of_kind("rbac.yaml", "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "lb");
    assert_eq!(binding.subjects.unwrap()[0].name, "lb");
}

#[test]
fn daemonset_runs_on_the_host_network_with_named_capabilities_only() {
    let ds: DaemonSet = of_kind("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb"));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), vec!["ALL"]);
    assert_eq!(caps.add.unwrap(), vec!["BPF", "NET_ADMIN", "PERFMON"]);
    let mounts: BTreeSet<String> = c.volume_mounts.clone().unwrap().into_iter().map(|m| m.mount_path).collect();
    assert!(mounts.contains("/sys/fs/bpf") && mounts.contains("/run/lb/cgroupv2") && mounts.contains("/etc/lb"));
    // No host sysctls: the reverse-path filter is left alone by default (`--relax-rp-filter`).
    assert!(!mounts.iter().any(|m| m.contains("proc")), "{mounts:?}");
    let hostpaths: BTreeSet<String> =
        pod.volumes.unwrap().into_iter().filter_map(|v| v.host_path.map(|h| h.path)).collect();
    assert_eq!(hostpaths, ["/sys/fs/bpf", "/sys/fs/cgroup"].iter().map(|s| s.to_string()).collect());
    let env = c.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
    // The API server is reached directly (no kube-proxy to serve the `kubernetes` Service):
    // on kind, through the control-plane node of the cluster deploy/kind.yaml creates.
    let kind = &docs("kind.yaml")[0];
    let host = env.iter().find(|e| e.name == "KUBERNETES_SERVICE_HOST").unwrap().value.clone().unwrap();
    assert_eq!(host, format!("{}-control-plane", kind["name"].as_str().unwrap()));
    assert_eq!(c.args.clone().unwrap(), vec!["run", "--config", "/etc/lb/config.yaml"]);
    let probe = c.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    let probe = c.liveness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
}

#[test]
fn config_map_keys_are_lb_run_flags() {
    let cm: ConfigMap = of_kind("config.yaml", "ConfigMap");
    let config: serde_yaml::Mapping = serde_yaml::from_str(&cm.data.unwrap()["config.yaml"]).unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_lb")).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for key in config.keys() {
        let key = key.as_str().unwrap();
        assert!(help.contains(&format!("--{key} ")) || help.contains(&format!("--{key}\n")), "--{key} not in:\n{help}");
    }
}

#[test]
fn kind_cluster_has_no_kube_proxy() {
    let kind = &docs("kind.yaml")[0];
    assert_eq!(kind["networking"]["kubeProxyMode"], "none");
    assert!(kind["nodes"].as_sequence().unwrap().len() >= 2);
}
