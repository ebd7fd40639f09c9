//! The test API server itself, checked with a raw HTTP client: the agent's Kubernetes tests
//! are only as honest as the protocol it speaks (lists with versions, watch resumption,
//! bookmarks, 410 Gone, selectors, held lists).
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{anyhow, Result};
use lb_tests::{apiserver::TestApiServer, eventually, in_ns, privileged, Lab};
use serde_json::{json, Value};

/// One GET from inside `ns`; the body, de-chunked when the server streamed it.
fn get(ns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    in_ns(ns, || -> Result<String> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = Vec::new();
        c.read_to_end(&mut raw)?;
        let raw = String::from_utf8(raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no body: {raw:?}"))?;
        if !head.contains("Transfer-Encoding: chunked") {
            return Ok(body.to_string());
        }
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").ok_or_else(|| anyhow!("bad chunk"))?;
            let n = usize::from_str_radix(size.trim(), 16)?;
            if n == 0 {
                return Ok(out);
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
    })?
}

fn events(stream: &str) -> Vec<Value> {
    stream.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).expect("JSON event")).collect()
}

fn svc(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default", "labels": labels},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
}

#[test]
fn lists_watches_bookmarks_410_selectors_and_holds() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let node = lab.add_node("api", 9)?;
    let addr: SocketAddr = "127.0.0.1:6443".parse()?;
    let api = TestApiServer::start(&node.ns, addr, &lab.dir)?;
    api.apply(svc("a", json!({})))?;
    api.apply(svc("other", json!({"service.kubernetes.io/service-proxy-name": "x"})))?;

    // A list carries the current version; the selector leaves out the other proxy's Service.
    let list: Value = serde_json::from_str(&get(
        &node.ns,
        addr,
        "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name",
    )?)?;
    assert_eq!(list["kind"], "ServiceList");
    let names: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["a"]);
    let rv: u64 = list["metadata"]["resourceVersion"].as_str().unwrap().parse()?;

    // A watch from that version sees later changes in order, then bookmarks, until its timeout.
    let watcher = std::thread::spawn({
        let ns = node.ns.clone();
        move || {
            get(
                &ns,
                addr,
                &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3"),
            )
        }
    });
    // Changed only once the watch runs, so the events are streamed live, not replayed from the
    // history a resuming watch would also read.
    assert!(eventually(Duration::from_secs(10), || api.open_watches() == 1), "the watch never started");
    api.apply(svc("a", json!({"changed": "yes"})))?;
    api.delete(lb_tests::apiserver::Kind::Service, "default", "a")?;
    let evs = events(&watcher.join().unwrap()?);
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(&kinds[..2], &["MODIFIED", "DELETED"], "{evs:?}");
    assert!(kinds[2..].iter().all(|k| *k == "BOOKMARK") && kinds.len() >= 3, "{kinds:?}");
    let v = |e: &Value| -> u64 { e["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap() };
    assert!(v(&evs[0]) > rv && v(&evs[1]) > v(&evs[0]), "{evs:?}");
    assert_eq!(evs[0]["object"]["metadata"]["labels"]["changed"], "yes");

    // After compaction, resuming from an old version is 410 Gone (an ERROR event); a fresh
    // list's version can be watched again.
    api.compact();
    let gone =
        events(&get(&node.ns, addr, &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=2"))?);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["type"], "ERROR");
    assert_eq!(gone[0]["object"]["code"], 410);
    let list: Value = serde_json::from_str(&get(&node.ns, addr, "/api/v1/services")?)?;
    let fresh = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let ok =
        events(&get(&node.ns, addr, &format!("/api/v1/services?watch=true&resourceVersion={fresh}&timeoutSeconds=1"))?);
    assert!(ok.iter().all(|e| e["type"] != "ERROR"), "{ok:?}");

    // A field selector picks one Node.
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}))?;
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}}))?;
    let nodes: Value = serde_json::from_str(&get(&node.ns, addr, "/api/v1/nodes?fieldSelector=metadata.name%3Dn2")?)?;
    assert_eq!(nodes["items"].as_array().unwrap().len(), 1);
    assert_eq!(nodes["items"][0]["metadata"]["name"], "n2");

    // A held list answers only after release.
    api.hold_lists(lb_tests::apiserver::Kind::EndpointSlice);
    let lister = std::thread::spawn({
        let ns = node.ns.clone();
        move || get(&ns, addr, "/apis/discovery.k8s.io/v1/endpointslices")
    });
    assert!(eventually(Duration::from_secs(10), || api.lists_waiting() == 1), "the list was never held");
    // Time-based: that a held list stays unanswered can only be shown by waiting.
    std::thread::sleep(Duration::from_millis(800));
    assert!(!lister.is_finished());
    api.release_lists();
    let slices: Value = serde_json::from_str(&lister.join().unwrap()?)?;
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(api.lists_waiting(), 0);

    // An outage refuses connections; resuming serves the same objects.
    let mut api = api;
    api.stop();
    assert!(get(&node.ns, addr, "/api/v1/nodes").is_err());
    api.resume()?;
    let nodes: Value = serde_json::from_str(&get(&node.ns, addr, "/api/v1/nodes")?)?;
    assert_eq!(nodes["items"].as_array().unwrap().len(), 2);
    Ok(())
}

#[test]
fn lists_paginate_from_one_snapshot_and_watches_see_selector_transitions() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    let node = lab.add_node("api", 9)?;
    let addr: SocketAddr = "127.0.0.1:6443".parse()?;
    let api = TestApiServer::start(&node.ns, addr, &lab.dir)?;
    for i in 0..5 {
        api.apply(svc(&format!("s{i}"), json!({"app": "web"})))?;
    }
    let list = |query: &str| -> Result<Value> {
        Ok(serde_json::from_str(&get(&node.ns, addr, &format!("/api/v1/services?{query}"))?)?)
    };
    let names = |l: &Value| -> Vec<String> {
        l["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
    };

    // Pages of two, each carrying the first page's version; a change between pages is not
    // seen by the continued list.
    let first = list("limit=2")?;
    assert_eq!(names(&first), ["s0", "s1"]);
    assert!(first["metadata"]["continue"].is_string(), "{first}");
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    api.delete(lb_tests::apiserver::Kind::Service, "default", "s3")?;
    api.apply(svc("s5", json!({"app": "web"})))?;
    let mut all = names(&first);
    let mut token = first["metadata"]["continue"].as_str().unwrap().to_string();
    loop {
        let page = list(&format!("limit=2&continue={token}"))?;
        assert_eq!(page["metadata"]["resourceVersion"].as_str().unwrap(), rv, "a page from another snapshot");
        all.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    assert_eq!(all, ["s0", "s1", "s2", "s3", "s4"], "the continued list is the first page's snapshot");
    let fresh = list("limit=10")?;
    assert_eq!(names(&fresh), ["s0", "s1", "s2", "s4", "s5"]);
    assert!(fresh["metadata"]["continue"].is_null(), "{fresh}");

    // A continue token older than the compacted history is 410 Gone.
    let first = list("limit=2")?;
    let token = first["metadata"]["continue"].as_str().unwrap().to_string();
    api.compact();
    let gone = list(&format!("limit=2&continue={token}"))?;
    assert_eq!(gone["code"], 410, "{gone}");
    assert_eq!(gone["reason"], "Expired", "{gone}");

    // A selecting watch: leaving the selector is DELETED (with the last matching content at
    // the new version), entering it is ADDED, changes outside it are not seen.
    let rv: u64 = list("")?["metadata"]["resourceVersion"].as_str().unwrap().parse()?;
    let watcher = std::thread::spawn({
        let ns = node.ns.clone();
        move || {
            get(
                &ns,
                addr,
                &format!("/api/v1/services?watch=true&resourceVersion={rv}&labelSelector=app%3Dweb&timeoutSeconds=3"),
            )
        }
    });
    // Changed only once the watch runs: the selector transitions are the live path's.
    assert!(eventually(Duration::from_secs(10), || api.open_watches() == 1), "the watch never started");
    api.apply(svc("s0", json!({"app": "other"})))?;
    api.apply(svc("s0", json!({"app": "other", "x": "1"})))?;
    api.apply(svc("s0", json!({"app": "web"})))?;
    api.apply(svc("s1", json!({"app": "web", "y": "2"})))?;
    let evs = events(&watcher.join().unwrap()?);
    let seen: Vec<(String, String, String)> = evs
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["labels"]["app"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> =
        [("DELETED", "s0", "web"), ("ADDED", "s0", "web"), ("MODIFIED", "s1", "web")]
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
    assert_eq!(seen, want, "{evs:?}");
    let v = |e: &Value| -> u64 { e["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap() };
    assert!(v(&evs[0]) > rv && v(&evs[1]) > v(&evs[0]), "the DELETED event carries the change's version: {evs:?}");
    Ok(())
}
