//! Kubernetes YAML as a source: multi-document files, `kind: List`, or a directory of them.
//! Each document is parsed on its own, so one bad document costs only itself.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::de::DeserializeOwned;
use serde_yaml::Value;

/// The objects lb cares about, as found in the manifests.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: document {doc}: not valid YAML: {source}")]
    Yaml { path: PathBuf, doc: usize, source: serde_yaml::Error },
    #[error("{0}")]
    Object(Box<ObjectError>),
}

/// A document that is YAML but not a valid object of its kind, or one entry of it that is not.
#[derive(Debug, thiserror::Error)]
#[error("{path}: document {doc}: {kind} {object}: field {field}: {reason}{}", skip_note(*.skipped))]
pub struct ObjectError {
    pub path: PathBuf,
    pub doc: usize,
    pub kind: String,
    pub object: String,
    pub field: String,
    pub reason: String,
    /// The entry left out ("port", "endpoint") when the rest of the object is still used;
    /// `None` when the whole object is rejected.
    pub skipped: Option<&'static str>,
}

fn skip_note(skipped: Option<&'static str>) -> String {
    skipped.map(|entry| format!("; this {entry} is skipped, the others are served")).unwrap_or_default()
}

/// Files to read for `path`: the file itself, or the YAML/JSON files of a directory (not
/// recursive, sorted so the result does not depend on directory order).
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |source| ManifestError::Io { path: path.to_owned(), source };
    if !fs::metadata(path).map_err(io)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        let wanted = p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if wanted && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every file and returns its path with its content; used both to parse and to notice
/// changes cheaply.
pub fn read_all(path: &Path) -> Result<Vec<(PathBuf, String)>, ManifestError> {
    files(path)?
        .into_iter()
        .map(|p| match fs::read_to_string(&p) {
            Ok(text) => Ok((p, text)),
            Err(source) => Err(ManifestError::Io { path: p, source }),
        })
        .collect()
}

/// Parses the documents of each file. Unknown kinds are skipped with a debug log.
pub fn parse(files: &[(PathBuf, String)]) -> (Objects, Vec<ManifestError>) {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for (path, text) in files {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc_no = i + 1;
            match Value::deserialize_from(doc) {
                Ok(value) => add_value(path, doc_no, value, &mut objects, &mut errors),
                Err(source) => {
                    errors.push(ManifestError::Yaml { path: path.clone(), doc: doc_no, source });
                    // After a syntax error the stream cannot be resynchronised.
                    break;
                }
            }
        }
    }
    (objects, errors)
}

trait DeserializeFrom: Sized {
    fn deserialize_from(d: serde_yaml::Deserializer<'_>) -> Result<Self, serde_yaml::Error>;
}

impl DeserializeFrom for Value {
    fn deserialize_from(d: serde_yaml::Deserializer<'_>) -> Result<Self, serde_yaml::Error> {
        serde::Deserialize::deserialize(d)
    }
}

fn add_value(path: &Path, doc: usize, value: Value, objects: &mut Objects, errors: &mut Vec<ManifestError>) {
    if value.is_null() {
        return;
    }
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            if let Some(items) = value.get("items").and_then(Value::as_sequence) {
                for item in items.clone() {
                    add_value(path, doc, item, objects, errors);
                }
            }
        }
        ("v1", "Service") => objects.services.extend(typed::<Service>(path, doc, &kind, SERVICE_LISTS, value, errors)),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            objects.slices.extend(typed::<EndpointSlice>(path, doc, &kind, SLICE_LISTS, value, errors))
        }
        _ => {
            tracing::debug!(path = %path.display(), doc, %api_version, %kind, "ignoring object of a kind lb does not use")
        }
    }
}

/// A list of an object whose entries stand alone: an entry of the wrong type or shape is left
/// out by itself, as the translation leaves out a well-typed entry that is invalid (a port out
/// of range, an address that is not one), so one typo in a manifest does not take down the
/// object's other ports or endpoints.
struct EntryList {
    /// Map keys from the object's root to the list.
    path: &'static [&'static str],
    /// What one entry is, for the error message.
    entry: &'static str,
    check: fn(&Value) -> Result<(), serde_path_to_error::Error<serde_yaml::Error>>,
}

const SERVICE_LISTS: &[EntryList] =
    &[EntryList { path: &["spec", "ports"], entry: "port", check: check::<k8s_openapi::api::core::v1::ServicePort> }];

const SLICE_LISTS: &[EntryList] = &[
    EntryList { path: &["ports"], entry: "port", check: check::<k8s_openapi::api::discovery::v1::EndpointPort> },
    EntryList { path: &["endpoints"], entry: "endpoint", check: check::<k8s_openapi::api::discovery::v1::Endpoint> },
];

fn check<E: DeserializeOwned>(v: &Value) -> Result<(), serde_path_to_error::Error<serde_yaml::Error>> {
    serde_path_to_error::deserialize::<_, E>(v).map(drop)
}

/// Whether `failed` lies inside an entry of `list` (not at the list itself: a list that is not
/// a list cannot be mended by leaving entries out).
fn within(failed: &serde_path_to_error::Path, list: &[&str]) -> bool {
    let mut segments = failed.iter();
    list.iter().all(|key| matches!(segments.next(), Some(serde_path_to_error::Segment::Map { key: k }) if k == key))
        && matches!(segments.next(), Some(serde_path_to_error::Segment::Seq { .. }))
}

/// Deserializes into a k8s-openapi type, naming the field that failed. When the failure is
/// inside an entry of one of `lists`, every malformed entry of those lists is left out, each
/// with its own error, and the rest of the object is returned.
fn typed<T: DeserializeOwned>(
    path: &Path,
    doc: usize,
    kind: &str,
    lists: &[EntryList],
    mut value: Value,
    errors: &mut Vec<ManifestError>,
) -> Option<T> {
    let meta = value.get("metadata");
    let object = format!(
        "{}/{}",
        meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default"),
        meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<unnamed>")
    );
    let error = |field: String, reason: String, skipped: Option<&'static str>| {
        ManifestError::Object(Box::new(ObjectError {
            path: path.to_owned(),
            doc,
            kind: kind.to_string(),
            object: object.clone(),
            field,
            reason,
            skipped,
        }))
    };
    // Deserializing from a reference keeps the value for a second attempt without a copy.
    let failed = match serde_path_to_error::deserialize::<_, T>(&value) {
        Ok(t) => return Some(t),
        Err(e) => e,
    };
    if !lists.iter().any(|l| within(failed.path(), l.path)) {
        errors.push(error(failed.path().to_string(), failed.inner().to_string(), None));
        return None;
    }
    // (list, index in the file, field, reason) of each entry left out.
    let mut bad = Vec::new();
    for list in lists {
        let Some(Value::Sequence(entries)) = list.path.iter().try_fold(&mut value, |v, key| v.get_mut(*key)) else {
            continue;
        };
        let mut index = 0;
        entries.retain(|entry| {
            let i = index;
            index += 1;
            let Err(e) = (list.check)(entry) else { return true };
            let field = match e.path().to_string().as_str() {
                // The entry itself is of the wrong type (a scalar where a mapping belongs).
                "." => format!("{}[{i}]", list.path.join(".")),
                inner => format!("{}[{i}].{inner}", list.path.join(".")),
            };
            bad.push((list.entry, field, e.inner().to_string()));
            false
        });
    }
    let result = serde_path_to_error::deserialize::<_, T>(&value);
    // If the object still fails (elsewhere), nothing of it is used: its bad entries are named
    // as errors of a rejected object, not as skipped ones.
    let used = result.is_ok();
    errors.extend(bad.into_iter().map(|(entry, field, reason)| error(field, reason, used.then_some(entry))));
    match result {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(error(e.path().to_string(), e.inner().to_string(), None));
            None
        }
    }
}

/// An object kind this source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    Slice,
}

/// What one file held at its last good read.
struct FileState {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
}

/// Changes found by one [`ManifestWatcher::poll`].
#[derive(Default)]
pub struct ManifestChanges {
    pub services: Vec<ObjectChange<Service>>,
    pub slices: Vec<ObjectChange<EndpointSlice>>,
    pub errors: Vec<ManifestError>,
}

/// One object created or updated, or deleted.
pub enum ObjectChange<K> {
    Apply(Arc<K>),
    Delete(Arc<K>),
}

/// The manifests under a path, followed file by file: only files whose stamp changed are read
/// and parsed again, and a file that no longer parses keeps its last good objects (a manifest
/// being rewritten is not an outage), as does one that cannot be read for a moment.
pub struct ManifestWatcher {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The stamp of each file's last read, good or not, and when it was read.
    read: BTreeMap<PathBuf, ((std::time::SystemTime, u64, u64), std::time::SystemTime)>,
    /// A hash of each file's content as last parsed: a file read again only because its stamp
    /// is too recent to trust (below) is parsed again only if its bytes differ. Parsing is
    /// the expensive part (seconds for 100,000 Services); reading is not.
    content: BTreeMap<PathBuf, u64>,
    /// How long after its stamp a file's stamp is trusted (below).
    settle: std::time::Duration,
    /// Files read and parsed so far, for the tests.
    #[cfg(test)]
    counts: (u64, u64),
    /// Per object (kind, namespace/name): the files defining it; the last path wins.
    objects: BTreeMap<(Kind, String), BTreeMap<PathBuf, ObjectRef>>,
}

#[derive(Clone)]
enum ObjectRef {
    Service(Arc<Service>),
    Slice(Arc<EndpointSlice>),
}

impl ObjectRef {
    fn same(&self, other: &ObjectRef) -> bool {
        match (self, other) {
            (ObjectRef::Service(a), ObjectRef::Service(b)) => a == b,
            (ObjectRef::Slice(a), ObjectRef::Slice(b)) => a == b,
            _ => false,
        }
    }
}

fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!("{}/{}", meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or(""))
}

fn stamp(path: &Path) -> std::io::Result<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(path)?;
    Ok((m.modified()?, m.len(), m.ino()))
}

impl ManifestWatcher {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            files: BTreeMap::new(),
            read: BTreeMap::new(),
            content: BTreeMap::new(),
            settle: std::time::Duration::from_secs(2),
            #[cfg(test)]
            counts: (0, 0),
            objects: BTreeMap::new(),
        }
    }

    /// Reads what changed since the last poll. `Err` when the path itself cannot be listed
    /// (the last good state then stays).
    pub fn poll(&mut self) -> Result<ManifestChanges, ManifestError> {
        let mut changes = ManifestChanges::default();
        let present: BTreeSet<PathBuf> = files(&self.path)?.into_iter().collect();
        // Per touched object, what was in effect before this poll.
        let mut touched: BTreeMap<(Kind, String), Option<ObjectRef>> = BTreeMap::new();
        let gone: Vec<PathBuf> = self.files.keys().filter(|p| !present.contains(*p)).cloned().collect();
        self.read.retain(|p, _| present.contains(p));
        self.content.retain(|p, _| present.contains(p));
        for p in gone {
            let old = self.files.remove(&p).expect("listed");
            self.forget(&p, &old, &mut touched);
        }
        for p in &present {
            let Ok(now) = stamp(p) else { continue };
            // A stamp is trusted only once the file is older than the clock's granularity for
            // it (coarse: a few ms): two writes of the same size within one tick share a stamp
            // (git's "racy" files). A recent file is read again until then.
            let settled = |(mtime, _, _): (std::time::SystemTime, u64, u64), read_at: std::time::SystemTime| {
                mtime + self.settle < read_at
            };
            if self.read.get(p).is_some_and(|(s, at)| *s == now && settled(*s, *at)) {
                continue;
            }
            let read_at = std::time::SystemTime::now();
            let text = match fs::read_to_string(p) {
                Ok(t) => t,
                Err(source) => {
                    // No stamp recorded: a file that cannot be read now (its mode, say, which
                    // a fix leaves the stamp alone for) is tried again at the next look.
                    changes.errors.push(ManifestError::Io { path: p.clone(), source });
                    continue;
                }
            };
            self.read.insert(p.clone(), (now, read_at));
            #[cfg(test)]
            {
                self.counts.0 += 1;
            }
            let hash = {
                use std::hash::{BuildHasher as _, BuildHasherDefault};
                BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(&text)
            };
            if self.content.insert(p.clone(), hash) == Some(hash) {
                continue;
            }
            #[cfg(test)]
            {
                self.counts.1 += 1;
            }
            let (objects, errors) = parse(&[(p.clone(), text)]);
            let syntax = errors.iter().any(|e| matches!(e, ManifestError::Yaml { .. }));
            changes.errors.extend(errors);
            if syntax && self.files.contains_key(p) {
                // Keep what the file said last time it parsed, until it changes again.
                continue;
            }
            let state = FileState {
                services: objects.services.into_iter().map(Arc::new).collect(),
                slices: objects.slices.into_iter().map(Arc::new).collect(),
            };
            if let Some(old) = self.files.remove(p) {
                self.forget(p, &old, &mut touched);
            }
            let added = state
                .services
                .iter()
                .map(|s| ((Kind::Service, object_key(&s.metadata)), ObjectRef::Service(s.clone())))
                .chain(
                    state.slices.iter().map(|s| ((Kind::Slice, object_key(&s.metadata)), ObjectRef::Slice(s.clone()))),
                );
            for (k, obj) in added {
                touched.entry(k.clone()).or_insert_with(|| self.effective(&k));
                self.objects.entry(k).or_default().insert(p.clone(), obj);
            }
            self.files.insert(p.clone(), state);
        }
        for (k, before) in touched {
            let after = self.effective(&k);
            match (before, after) {
                (Some(b), Some(a)) if b.same(&a) => {}
                (_, Some(ObjectRef::Service(s))) => changes.services.push(ObjectChange::Apply(s)),
                (_, Some(ObjectRef::Slice(s))) => changes.slices.push(ObjectChange::Apply(s)),
                (Some(ObjectRef::Service(s)), None) => changes.services.push(ObjectChange::Delete(s)),
                (Some(ObjectRef::Slice(s)), None) => changes.slices.push(ObjectChange::Delete(s)),
                (None, None) => {}
            }
        }
        Ok(changes)
    }

    /// The object in effect for `k`: the one in the last file that defines it.
    fn effective(&self, k: &(Kind, String)) -> Option<ObjectRef> {
        self.objects.get(k).and_then(|m| m.values().next_back().cloned())
    }

    /// Takes a file's objects out, remembering what each touched object was before.
    fn forget(&mut self, path: &Path, old: &FileState, touched: &mut BTreeMap<(Kind, String), Option<ObjectRef>>) {
        let keys = old
            .services
            .iter()
            .map(|s| (Kind::Service, object_key(&s.metadata)))
            .chain(old.slices.iter().map(|s| (Kind::Slice, object_key(&s.metadata))));
        for k in keys {
            touched.entry(k.clone()).or_insert_with(|| self.effective(&k));
            if let Some(m) = self.objects.get_mut(&k) {
                m.remove(path);
                if m.is_empty() {
                    self.objects.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(text: &str) -> (Objects, Vec<ManifestError>) {
        parse(&[(PathBuf::from("m.yaml"), text.to_string())])
    }

    #[test]
    fn multi_document_files_lists_and_other_kinds() {
        let (o, e) = parse_one(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web-deploy}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {name: a-1}\n  addressType: IPv4\n  endpoints: []\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!((o.services.len(), o.slices.len()), (1, 1));
    }

    fn port_numbers(s: &Service) -> Vec<i32> {
        s.spec.as_ref().and_then(|s| s.ports.as_ref()).map(|p| p.iter().map(|p| p.port).collect()).unwrap_or_default()
    }

    /// A mistyped port costs only that port: the Service is kept with its other ports, and the
    /// error names the document, the object and the field.
    #[test]
    fn a_mistyped_port_is_skipped_alone_and_named() {
        let (o, e) = parse_one(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n  - {name: https, port: eighty}\n  - eighty-one\n  - {name: dns, port: 53, protocol: UDP}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ok}\n",
        );
        let names: Vec<_> = o.services.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["web", "ok"]);
        assert_eq!(port_numbers(&o.services[0]), [80, 53], "the well-typed ports are kept, in order");
        let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:#?}");
        assert!(msgs[0].starts_with("m.yaml: document 1: Service shop/web: field spec.ports[1].port: "), "{msgs:#?}");
        assert!(msgs[0].ends_with("; this port is skipped, the others are served"), "{msgs:#?}");
        assert!(msgs[1].starts_with("m.yaml: document 1: Service shop/web: field spec.ports[2]: "), "{msgs:#?}");
    }

    /// A mistyped field outside the entry lists rejects the whole object, naming the field; a
    /// mistyped port of such an object is named too, but not as skipped (nothing is served).
    #[test]
    fn a_mistyped_field_outside_the_ports_rejects_the_object() {
        let (o, e) = parse_one(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: [10.96.0.10]\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: both}\nspec:\n  ports: [{port: eighty}, {port: 81}]\n  sessionAffinity: [ClientIP]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: list}\nspec: {ports: 80}\n",
        );
        assert!(o.services.is_empty(), "{:?}", o.services);
        let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 4, "{msgs:#?}");
        assert!(msgs[0].contains("document 1: Service default/web: field spec.clusterIP: "), "{msgs:#?}");
        assert!(msgs[1].contains("document 2: Service default/both: field spec.ports[0].port: "), "{msgs:#?}");
        assert!(msgs[2].contains("document 2: Service default/both: field spec.sessionAffinity: "), "{msgs:#?}");
        assert!(msgs[3].contains("document 3: Service default/list: field spec.ports: "), "{msgs:#?}");
        assert!(msgs.iter().all(|m| !m.contains("skipped")), "{msgs:#?}");
    }

    /// A mistyped port or endpoint of an EndpointSlice is left out alone; the slice keeps the rest.
    #[test]
    fn a_mistyped_slice_port_or_endpoint_is_skipped_alone() {
        let (o, e) = parse_one(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {name: web-1, namespace: shop}\n  addressType: IPv4\n  ports: [{name: http, port: http}, {name: https, port: 8443}]\n  endpoints:\n  - addresses: [10.244.1.1]\n  - {addresses: 10.244.1.2}\n  - addresses: [10.244.1.3]\n    conditions: {ready: maybe}\n  - addresses: [10.244.1.4]\n",
        );
        assert_eq!(o.slices.len(), 1, "{e:?}");
        let s = &o.slices[0];
        let ports: Vec<_> = s.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [Some(8443)]);
        let addresses: Vec<_> = s.endpoints.iter().flatten().map(|e| e.addresses[0].as_str()).collect();
        assert_eq!(addresses, ["10.244.1.1", "10.244.1.4"]);
        let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:#?}");
        for (m, field, entry) in msgs
            .iter()
            .zip([
                ("ports[0].port", "port"),
                ("endpoints[1].addresses", "endpoint"),
                ("endpoints[2].conditions.ready", "endpoint"),
            ])
            .map(|(m, (f, e))| (m, f, e))
        {
            assert!(m.starts_with(&format!("m.yaml: document 1: EndpointSlice shop/web-1: field {field}: ")), "{m}");
            assert!(m.ends_with(&format!("; this {entry} is skipped, the others are served")), "{m}");
        }
    }

    #[test]
    fn broken_yaml_is_an_error_and_earlier_documents_survive() {
        let (o, e) = parse_one("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: [unclosed\n");
        assert_eq!(o.services.len(), 1);
        assert!(matches!(e[..], [ManifestError::Yaml { doc: 2, .. }]), "{e:?}");
    }
}

#[cfg(test)]
mod watcher_tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")
    }

    fn names(c: &ManifestChanges) -> Vec<String> {
        c.services
            .iter()
            .map(|c| match c {
                ObjectChange::Apply(s) => format!("apply {}", s.metadata.name.as_deref().unwrap_or("")),
                ObjectChange::Delete(s) => format!("delete {}", s.metadata.name.as_deref().unwrap_or("")),
            })
            .collect()
    }

    /// Only changed files are read again; a file with a syntax error keeps its last good
    /// objects; a removed file removes its objects; an unchanged rewrite changes nothing.
    #[test]
    fn follows_files_one_by_one_and_keeps_the_last_good_state_of_a_broken_file() {
        let dir = crate::scratch::Scratch::new("manifest-watch");
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        fs::write(&a, svc("one", "10.96.0.1")).unwrap();
        fs::write(&b, svc("two", "10.96.0.2")).unwrap();
        let mut w = ManifestWatcher::new(&dir);
        let c = w.poll().unwrap();
        assert_eq!(names(&c), vec!["apply one", "apply two"]);
        assert!(names(&w.poll().unwrap()).is_empty(), "nothing changed");
        fs::write(&a, svc("one", "10.96.0.11")).unwrap();
        assert_eq!(names(&w.poll().unwrap()), vec!["apply one"]);
        // The same content written again: read, but no change.
        fs::write(&a, svc("one", "10.96.0.11") + "\n").unwrap();
        assert!(names(&w.poll().unwrap()).is_empty());
        fs::write(&b, "apiVersion: v1\nkind: Service\nmetadata: {name: two\n").unwrap();
        let c = w.poll().unwrap();
        assert!(names(&c).is_empty(), "a broken file keeps its objects");
        assert!(matches!(c.errors[..], [ManifestError::Yaml { .. }]), "{:?}", c.errors);
        assert!(names(&w.poll().unwrap()).is_empty(), "still broken");
        fs::write(&b, svc("three", "10.96.0.3")).unwrap();
        assert_eq!(names(&w.poll().unwrap()), vec!["apply three", "delete two"]);
        fs::remove_file(&b).unwrap();
        assert_eq!(names(&w.poll().unwrap()), vec!["delete three"]);
    }

    /// A file that cannot be read is tried again at each look, even when what fixes it leaves
    /// its stamp as it was.
    #[test]
    fn an_unreadable_file_is_read_once_it_can_be() {
        let dir = crate::scratch::Scratch::new("manifest-unreadable");
        let a = dir.join("a.yaml");
        let good = svc("one", "10.96.0.1");
        // Not UTF-8, so not readable as text (root reads any file whatever its mode).
        let mut bad = good.clone().into_bytes();
        bad[0] = 0xff;
        fs::write(&a, &bad).unwrap();
        let stamp_before = stamp(&a).unwrap();
        let mut w = ManifestWatcher::new(&dir);
        w.settle = std::time::Duration::ZERO;
        let c = w.poll().unwrap();
        assert!(names(&c).is_empty());
        assert!(matches!(c.errors[..], [ManifestError::Io { .. }]), "{:?}", c.errors);
        // Fixed in place: same size, and its modification time put back.
        fs::write(&a, &good).unwrap();
        fs::File::options().write(true).open(&a).unwrap().set_modified(stamp_before.0).unwrap();
        assert_eq!(stamp(&a).unwrap(), stamp_before);
        assert_eq!(names(&w.poll().unwrap()), vec!["apply one"]);
    }

    /// A file written just now is read again on every poll until its stamp can be trusted,
    /// but parsed again only when its bytes changed.
    #[test]
    fn a_recent_file_read_again_is_parsed_only_when_it_changed() {
        let dir = crate::scratch::Scratch::new("manifest-parse");
        let a = dir.join("a.yaml");
        fs::write(&a, svc("one", "10.96.0.1")).unwrap();
        let mut w = ManifestWatcher::new(&dir);
        // No stamp is trusted here, however slow the machine: every look reads every file.
        w.settle = std::time::Duration::from_secs(3600);
        assert_eq!(names(&w.poll().unwrap()), vec!["apply one"]);
        assert_eq!(w.counts, (1, 1), "(reads, parses)");
        assert!(names(&w.poll().unwrap()).is_empty());
        assert_eq!(w.counts, (2, 1), "read again, but unchanged bytes are not parsed again");
        fs::write(&a, svc("one", "10.96.0.2")).unwrap();
        assert_eq!(names(&w.poll().unwrap()), vec!["apply one"]);
        assert_eq!(w.counts, (3, 2));
        // Removed and written again with the same bytes: a new file, parsed.
        fs::remove_file(&a).unwrap();
        assert_eq!(names(&w.poll().unwrap()), vec!["delete one"]);
        fs::write(&a, svc("one", "10.96.0.2")).unwrap();
        assert_eq!(names(&w.poll().unwrap()), vec!["apply one"]);
        assert_eq!(w.counts, (4, 3));
    }
}
