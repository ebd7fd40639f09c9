//! Kubernetes YAML as a source: multi-document files, `kind: List`, or a directory of them.
//! Each document is parsed on its own, so one bad document costs only itself.
use std::{
    fs,
    path::{Path, PathBuf},
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

/// A document that is YAML but not a valid object of its kind.
#[derive(Debug, thiserror::Error)]
#[error("{path}: document {doc}: {kind} {object}: field {field}: {reason}")]
pub struct ObjectError {
    pub path: PathBuf,
    pub doc: usize,
    pub kind: String,
    pub object: String,
    pub field: String,
    pub reason: String,
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
        ("v1", "Service") => match typed::<Service>(path, doc, &kind, value) {
            Ok(s) => objects.services.push(s),
            Err(e) => errors.push(e),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(path, doc, &kind, value) {
            Ok(s) => objects.slices.push(s),
            Err(e) => errors.push(e),
        },
        _ => {
            tracing::debug!(path = %path.display(), doc, %api_version, %kind, "ignoring object of a kind lb does not use")
        }
    }
}

/// Deserializes into a k8s-openapi type, naming the field that failed.
fn typed<T: DeserializeOwned>(path: &Path, doc: usize, kind: &str, value: Value) -> Result<T, ManifestError> {
    let meta = value.get("metadata");
    let object = format!(
        "{}/{}",
        meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default"),
        meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<unnamed>")
    );
    serde_path_to_error::deserialize(value).map_err(|e| {
        ManifestError::Object(Box::new(ObjectError {
            path: path.to_owned(),
            doc,
            kind: kind.to_string(),
            object,
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        }))
    })
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

    #[test]
    fn a_mistyped_field_names_the_object_and_the_field() {
        let (o, e) = parse_one(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports:\n  - port: eighty\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ok}\n",
        );
        assert_eq!(o.services.len(), 1, "the good document still parses");
        let msg = e[0].to_string();
        assert!(msg.contains("document 1: Service shop/web: field spec.ports[0].port:"), "{msg}");
    }

    #[test]
    fn broken_yaml_is_an_error_and_earlier_documents_survive() {
        let (o, e) = parse_one("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: [unclosed\n");
        assert_eq!(o.services.len(), 1);
        assert!(matches!(e[..], [ManifestError::Yaml { doc: 2, .. }]), "{e:?}");
    }
}
