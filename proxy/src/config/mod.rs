//! Configuration input: Kubernetes and Istio objects → [`crate::state::Snapshot`].
//!
//! Loading has two stages so that other sources can reuse the second one:
//! 1. parsing turns YAML documents into typed [`Objects`] (each remembering its
//!    [`Origin`]); a Kubernetes-API mode can fill `Objects` from watches instead;
//! 2. [`resolve::resolve`] validates the objects and resolves them into a
//!    `Snapshot` (the types of [`crate::state`]), one submodule per object kind.
//!
//! Every problem is reported, not just the first: parsing continues with the
//! next document after an error, and validation collects all problems of an
//! object.

pub mod duration;
pub mod istio;
pub mod kube;
mod parse;
pub mod resolve;

use std::fmt;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use parse::parse_documents;

/// Settings that are not part of the objects themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// DNS suffix of the cluster (`<svc>.<ns>.svc.<cluster_domain>`).
    pub cluster_domain: String,
    /// Istio's root namespace (mesh-wide DestinationRules live there).
    pub root_namespace: String,
    /// Node this proxy runs on, to fill `Snapshot::node`.
    pub node_name: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            cluster_domain: "cluster.local".to_string(),
            root_namespace: "istio-system".to_string(),
            node_name: None,
        }
    }
}

/// One problem (error or warning) located in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based index of the YAML document in the file; 0 if not applicable.
    pub document: usize,
    /// Object kind such as `VirtualService`; `-` if unknown.
    pub kind: String,
    /// `namespace/name`, or `name` for cluster-scoped objects; `-` if unknown.
    pub name: String,
    /// Path such as `spec.http[0].retries.retryOn`; `-` for the whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} ({} {}): {}: {}",
            self.file, self.document, self.kind, self.name, self.field, self.message
        )
    }
}

/// Errors and warnings collected by one stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems {
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Problems {
    pub fn extend(&mut self, other: Problems) {
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
    }
}

/// Where an object came from, for problem reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// File name, or a label such as `kubernetes` for other sources.
    pub file: String,
    /// 1-based document index in the file; 0 when not from a file.
    pub document: usize,
}

/// An object together with its origin.
#[derive(Debug, Clone)]
pub struct Item<T> {
    pub origin: Origin,
    pub object: T,
}

impl<T> Item<T> {
    pub fn new(origin: Origin, object: T) -> Self {
        Item { origin, object }
    }
}

/// All input objects of one configuration generation, in input order.
///
/// Namespaced Kubernetes objects are expected to have `metadata.namespace`
/// set (the file parser fills in `default`, as kubectl does). Order matters
/// only for duplicates (the later one is rejected) and for the order of
/// DestinationRules/VirtualServices in the snapshot.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub namespaces: Vec<Item<Namespace>>,
    pub nodes: Vec<Item<Node>>,
    pub pods: Vec<Item<Pod>>,
    pub services: Vec<Item<Service>>,
    pub endpoint_slices: Vec<Item<EndpointSlice>>,
    pub destination_rules: Vec<Item<istio::DestinationRule>>,
    pub virtual_services: Vec<Item<istio::VirtualService>>,
}

/// A validated snapshot plus the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: crate::state::Snapshot,
    pub warnings: Vec<Problem>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read file: {0}")]
struct UnreadableFile(std::io::Error);

/// Loads a multi-document YAML file; `Err` holds every error found.
pub fn load_file(path: &Path, opts: &LoadOptions) -> Result<Loaded, Vec<Problem>> {
    let source_name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(yaml) => load_str(&source_name, &yaml, opts),
        Err(err) => Err(vec![Problem {
            file: source_name,
            document: 0,
            kind: "-".into(),
            name: "-".into(),
            field: "-".into(),
            message: UnreadableFile(err).to_string(),
        }]),
    }
}

/// Loads multi-document YAML text; `source_name` labels problems.
pub fn load_str(source_name: &str, yaml: &str, opts: &LoadOptions) -> Result<Loaded, Vec<Problem>> {
    let mut objects = Objects::default();
    let mut problems = Problems::default();
    parse_documents(source_name, yaml, &mut objects, &mut problems);
    let (snapshot, build_problems) = resolve::resolve(&objects, opts);
    problems.extend(build_problems);

    // Parsing and building find problems in different passes; present them in
    // file order.
    let by_position = |p: &Problem| (p.file.clone(), p.document);
    problems.errors.sort_by_key(by_position);
    problems.warnings.sort_by_key(by_position);
    tracing::debug!(
        source = source_name,
        errors = problems.errors.len(),
        warnings = problems.warnings.len(),
        "config loaded"
    );
    if problems.errors.is_empty() {
        Ok(Loaded {
            snapshot,
            warnings: problems.warnings,
        })
    } else {
        Err(problems.errors)
    }
}

#[cfg(test)]
mod tests;
