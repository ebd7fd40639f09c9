use lb_tests::control_plane::ControlPlane;
use serde_json::json;
#[test]
fn scratch() {
    let cp = ControlPlane::start().unwrap();
    for round in 0..3 {
        let t = std::time::Instant::now();
        let objs: Vec<_> = (0..2000).map(|i| json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{round}-{i}"), "namespace": "default"},
           "spec": {"clusterIP": format!("10.{}.{}.{}", 100 + round, i / 250, i % 250 + 1), "ports": [{"name": "http", "port": 80, "targetPort": 80}, {"name": "sink", "port": 9000, "targetPort": 9000}]}})).collect();
        let prof = if round == 2 {
            let dir = cp.dir.clone();
            let ns = cp.ns.clone();
            Some(std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(3));
                std::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "curl", "-sS", "-m", "60", "-o", "/tmp/apiserver.prof", "--cacert"])
                    .arg(dir.join("pki/ca.crt"))
                    .arg("--cert")
                    .arg(dir.join("pki/admin.crt"))
                    .arg("--key")
                    .arg(dir.join("pki/admin.key"))
                    .arg("https://10.255.0.1:6443/debug/pprof/profile?seconds=15")
                    .status()
                    .unwrap();
            }))
        } else {
            None
        };
        cp.create_many(objs, 32).unwrap();
        eprintln!("round {round}: 2000 services in {:?}", t.elapsed());
        if let Some(p) = prof {
            p.join().unwrap();
        }
    }
}
