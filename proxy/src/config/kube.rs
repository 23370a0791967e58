//! Kubernetes mode: kube-rs watchers keep reflector stores of the objects
//! Nodeway reads, and [`KubeSource::assemble`] turns the stores into the same
//! [`Objects`] the file mode parses, so both modes share validation and the
//! snapshot build ([`crate::config::resolve::resolve`]).
//!
//! Watched, with get/list/watch only (nothing is ever written):
//! - Namespaces, Services, EndpointSlices: all, full objects;
//! - Pods on this node (`fieldSelector=spec.nodeName=<node>`): full objects —
//!   the clients, with their IPs;
//! - all Pods and all Nodes as metadata only (`PartialObjectMetadata`): the
//!   labels and owners of endpoint pods on other nodes (DestinationRule subsets,
//!   destination labels) and the nodes' locality labels;
//! - Istio `DestinationRule` and `VirtualService` as dynamic objects of
//!   `networking.istio.io/v1`, else `v1beta1`. If neither version is served
//!   (CRD absent) that is logged once, the kind is empty, and it is looked
//!   for again every [`KubeOptions::crd_recheck`].
//!
//! Watches resume from their last resourceVersion after errors, relist after
//! `410 Gone`, and back off exponentially between failed attempts. The stores
//! keep their last content meanwhile, so the proxy keeps serving the last
//! known configuration. Whether the API server answers is tracked on every
//! HTTP exchange of the client (see [`HealthLayer`]) and published in a flag
//! the caller owns (`nodeway_config_source_up`).

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::client::ClientBuilder;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Item, Objects, Origin, Problem, Problems, istio};

/// `Origin::file` of objects read from the API server.
pub const ORIGIN: &str = "kubernetes";
/// Istio's API group and the versions tried, in order.
pub const ISTIO_GROUP: &str = "networking.istio.io";
pub const ISTIO_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// Annotation kubectl keeps a copy of the whole object in; dropped from the stores.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How to reach the API server and how patiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// API server URL (`--kube-api`, e.g. `http://127.0.0.1:8001` for
    /// `kubectl proxy`); `None`: kubeconfig, else the pod's service account
    /// (`kube::Config::infer`).
    pub api_url: Option<String>,
    /// This node: its Pods are watched in full.
    pub node: String,
    /// Back-off after a failed watch or list: from `backoff_min`, doubling
    /// (with up to 25% jitter) up to `backoff_max`; reset by any success.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often an absent Istio CRD is looked for again.
    pub crd_recheck: Duration,
    /// Quiet time after a change before the configuration is rebuilt, so
    /// that a burst of events (a rollout) makes one generation.
    pub debounce: Duration,
    /// Longest wait at start for the first complete list of every kind;
    /// after it the proxy starts with what it has and catches up.
    pub initial_sync_timeout: Duration,
}

impl KubeOptions {
    /// client-go's back-off (800 ms doubling to 30 s); CRDs re-checked every minute.
    pub fn new(node: impl Into<String>) -> Self {
        KubeOptions {
            api_url: None,
            node: node.into(),
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            crd_recheck: Duration::from_secs(60),
            debounce: Duration::from_millis(100),
            initial_sync_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid --kube-api URL {url:?}: {source}")]
    Url {
        url: String,
        source: http::uri::InvalidUri,
    },
    #[error(
        "no Kubernetes client configuration (neither a kubeconfig nor a pod service account): {0}"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The objects of the stores as input for [`crate::config::resolve::resolve`].
#[derive(Debug, Default)]
pub struct Assembled {
    pub objects: Objects,
    /// Istio objects whose spec could not be read (skipped) or has fields
    /// Nodeway ignores.
    pub problems: Problems,
    /// Changes whenever any object's resourceVersion does (or one comes or goes).
    pub fingerprint: u64,
}

/// Running watches of the API server; dropping it stops them.
pub struct KubeSource {
    stores: Stores,
    changes: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

struct Stores {
    namespaces: Store<Namespace>,
    nodes: Store<PartialObjectMeta<Node>>,
    local_pods: Store<Pod>,
    pods: Store<PartialObjectMeta<Pod>>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    destination_rules: Store<DynamicObject>,
    virtual_services: Store<DynamicObject>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// Creates the client and starts every watch. Returns at once; see
    /// [`KubeSource::wait_synced`]. `up` is set to whether the API server
    /// answered the latest request.
    pub async fn start(opts: &KubeOptions, up: Arc<AtomicBool>) -> Result<KubeSource, KubeError> {
        let config = match &opts.api_url {
            Some(url) => kube::Config::new(url.parse().map_err(|source| KubeError::Url {
                url: url.clone(),
                source,
            })?),
            None => kube::Config::infer().await?,
        };
        tracing::info!(api = %config.cluster_url, node = %opts.node, "Kubernetes mode: watching the API server");
        let client = ClientBuilder::try_from(config)?
            .with_layer(&HealthLayer(Arc::new(Health { up })))
            .build();

        let (changed_tx, changes) = watch::channel(0u64);
        let ctx = Arc::new(Ctx {
            changes: changed_tx,
            backoff_min: opts.backoff_min,
            backoff_max: opts.backoff_max,
        });
        let mut tasks = Vec::new();

        let all = watcher::Config::default();
        let namespaces = spawn_watch(
            &mut tasks,
            &ctx,
            "Namespace",
            Api::<Namespace>::all(client.clone()),
            all.clone(),
            strip,
        );
        let nodes = spawn_watch(
            &mut tasks,
            &ctx,
            "Node",
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            all.clone(),
            strip_all_annotations,
        );
        let local_pods = spawn_watch(
            &mut tasks,
            &ctx,
            "Pod",
            Api::<Pod>::all(client.clone()),
            all.clone().fields(&format!("spec.nodeName={}", opts.node)),
            strip,
        );
        let pods = spawn_watch(
            &mut tasks,
            &ctx,
            "Pod (metadata)",
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            all.clone(),
            strip_all_annotations,
        );
        let services = spawn_watch(
            &mut tasks,
            &ctx,
            "Service",
            Api::<Service>::all(client.clone()),
            all.clone(),
            strip,
        );
        let endpoint_slices = spawn_watch(
            &mut tasks,
            &ctx,
            "EndpointSlice",
            Api::<EndpointSlice>::all(client.clone()),
            all.clone(),
            strip,
        );
        let mut istio_store = |kind: &'static str| {
            let resource = istio_resource(ISTIO_VERSIONS[0], kind);
            let writer = Writer::<DynamicObject>::new(resource);
            let store = writer.as_reader();
            tasks.push(tokio::spawn(watch_istio(
                kind,
                client.clone(),
                writer,
                ctx.clone(),
                opts.crd_recheck,
            )));
            store
        };
        let destination_rules = istio_store("DestinationRule");
        let virtual_services = istio_store("VirtualService");

        Ok(KubeSource {
            stores: Stores {
                namespaces,
                nodes,
                local_pods,
                pods,
                services,
                endpoint_slices,
                destination_rules,
                virtual_services,
            },
            changes,
            tasks,
        })
    }

    /// Waits until every kind has been listed once (an absent Istio CRD
    /// counts as listed, empty); `false` if `timeout` passed first.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let s = &self.stores;
        let all = async {
            // Errors mean a writer is gone, i.e. the source is stopping.
            let _ = s.namespaces.wait_until_ready().await;
            let _ = s.nodes.wait_until_ready().await;
            let _ = s.local_pods.wait_until_ready().await;
            let _ = s.pods.wait_until_ready().await;
            let _ = s.services.wait_until_ready().await;
            let _ = s.endpoint_slices.wait_until_ready().await;
            let _ = s.destination_rules.wait_until_ready().await;
            let _ = s.virtual_services.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// Resolves when a store changed since the last call (cancel-safe).
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            // Every watch task is gone: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }

    /// The stores' objects, ordered by creation time (as Istio orders
    /// configs), then namespace and name.
    pub fn assemble(&self) -> Assembled {
        let s = &self.stores;
        let mut fp = Fingerprint::default();
        let mut objects = Objects::default();
        let mut problems = Problems::default();
        let origin = || Origin {
            file: ORIGIN.to_string(),
            document: 0,
        };

        for ns in sorted(s.namespaces.state(), &mut fp, "Namespace") {
            objects.namespaces.push(Item::new(origin(), (*ns).clone()));
        }
        for node in sorted(s.nodes.state(), &mut fp, "Node") {
            let node = Node {
                metadata: node.metadata.clone(),
                ..Node::default()
            };
            objects.nodes.push(Item::new(origin(), node));
        }
        // This node's pods in full, then the other nodes' pods as metadata.
        let mut local = HashSet::new();
        for pod in sorted(s.local_pods.state(), &mut fp, "Pod") {
            local.insert((pod.namespace(), pod.name_any()));
            objects.pods.push(Item::new(origin(), (*pod).clone()));
        }
        for pod in sorted(s.pods.state(), &mut fp, "PodMetadata") {
            if local.contains(&(pod.namespace(), pod.name_any())) {
                continue;
            }
            let pod = Pod {
                metadata: pod.metadata.clone(),
                ..Pod::default()
            };
            objects.pods.push(Item::new(origin(), pod));
        }
        for service in sorted(s.services.state(), &mut fp, "Service") {
            objects
                .services
                .push(Item::new(origin(), (*service).clone()));
        }
        for slice in sorted(s.endpoint_slices.state(), &mut fp, "EndpointSlice") {
            objects
                .endpoint_slices
                .push(Item::new(origin(), (*slice).clone()));
        }
        for dr in sorted(s.destination_rules.state(), &mut fp, "DestinationRule") {
            if let Some((metadata, spec)) = istio_object(&dr, "DestinationRule", &mut problems) {
                let rule = istio::DestinationRule { metadata, spec };
                objects.destination_rules.push(Item::new(origin(), rule));
            }
        }
        for vs in sorted(s.virtual_services.state(), &mut fp, "VirtualService") {
            if let Some((metadata, spec)) = istio_object(&vs, "VirtualService", &mut problems) {
                let vs = istio::VirtualService { metadata, spec };
                objects.virtual_services.push(Item::new(origin(), vs));
            }
        }
        Assembled {
            objects,
            problems,
            fingerprint: fp.0.finish(),
        }
    }
}

/// Objects of one store in a stable order, each added to the fingerprint.
fn sorted<K: Resource>(mut objects: Vec<Arc<K>>, fp: &mut Fingerprint, kind: &str) -> Vec<Arc<K>> {
    objects.sort_by(|a, b| {
        let key = |o: &Arc<K>| {
            let m = o.meta();
            (
                m.creation_timestamp.clone(),
                m.namespace.clone(),
                m.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    kind.hash(&mut fp.0);
    objects.len().hash(&mut fp.0);
    for o in &objects {
        let m = o.meta();
        (&m.namespace, &m.name, &m.uid, &m.resource_version).hash(&mut fp.0);
    }
    objects
}

#[derive(Default)]
struct Fingerprint(DefaultHasher);

/// An Istio object's metadata and typed spec; `None` (with an error
/// naming the object and field) when the spec cannot be read.
fn istio_object<T: DeserializeOwned + Default>(
    object: &DynamicObject,
    kind: &'static str,
    problems: &mut Problems,
) -> Option<(ObjectMeta, T)> {
    let metadata = object.metadata.clone();
    let problem = |field: String, message: String| Problem {
        file: ORIGIN.to_string(),
        document: 0,
        kind: kind.to_string(),
        name: format!(
            "{}/{}",
            metadata.namespace.as_deref().unwrap_or("default"),
            metadata.name.as_deref().unwrap_or("-")
        ),
        field,
        message,
    };
    let spec = match object.data.get("spec") {
        None | Some(serde_json::Value::Null) => T::default(),
        Some(spec) => match istio::deserialize_spec::<T, _>(spec) {
            Ok((spec, ignored)) => {
                for path in ignored {
                    problems.warnings.push(problem(
                        spec_field(&path),
                        "field is not supported by Nodeway and is ignored".into(),
                    ));
                }
                spec
            }
            Err(err) => {
                problems
                    .errors
                    .push(problem(spec_field(&err.path), err.message));
                return None;
            }
        },
    };
    Some((metadata, spec))
}

/// `http[0].x` → `spec.http[0].x` (serde_path_to_error prints the root as `.`).
fn spec_field(path: &str) -> String {
    match path {
        "" | "." => "spec".to_string(),
        _ if path.starts_with('[') => format!("spec{path}"),
        _ => format!("spec.{path}"),
    }
}

fn istio_resource(version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(ISTIO_GROUP, version, kind))
}

/// Drops what Nodeway never reads and can be large.
fn strip<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.annotations_mut().remove(LAST_APPLIED);
}

fn strip_all_annotations<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.annotations_mut().clear();
}

/// What the watch tasks share.
struct Ctx {
    changes: watch::Sender<u64>,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Ctx {
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn backoff(&self) -> JitteredBackoff {
        JitteredBackoff {
            min: self.backoff_min,
            max: self.backoff_max.max(self.backoff_min),
            next: self.backoff_min,
        }
    }
}

/// Starts the reflector of one typed kind and returns its store.
fn spawn_watch<K>(
    tasks: &mut Vec<JoinHandle<()>>,
    ctx: &Arc<Ctx>,
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let mut writer = Writer::<K>::default();
    let store = writer.as_reader();
    let ctx = ctx.clone();
    tasks.push(tokio::spawn(async move {
        let stream = watcher(api, config).modify(trim).backoff(ctx.backoff());
        // The watcher recovers from every error itself and never ends.
        pump(kind, stream, &mut writer, &ctx, false, None).await;
    }));
    store
}

/// How [`pump`] stopped.
enum Ended {
    /// The resource is not served (404): its CRD is absent.
    NotFound,
    StreamEnded,
}

/// Feeds watcher events into the store, signalling changes and logging
/// errors once per failure streak.
async fn pump<K, S>(
    kind: &'static str,
    stream: S,
    writer: &mut Writer<K>,
    ctx: &Ctx,
    stop_on_not_found: bool,
    mut on_first_event: Option<String>,
) -> Ended
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
    S: Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if let Some(message) = on_first_event.take() {
                    tracing::info!("{message}");
                }
                if std::mem::take(&mut failing) {
                    tracing::info!(kind, "watch resumed");
                }
                writer.apply_watcher_event(&event);
                // A relist replaces the store at `InitDone`, all at once.
                if matches!(
                    event,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
                ) {
                    ctx.changed();
                }
            }
            Err(err) if stop_on_not_found && is_not_found(&err) => return Ended::NotFound,
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(kind, "resourceVersion expired (410 Gone); listing again");
            }
            Err(err) => {
                if failing {
                    tracing::debug!(kind, %err, "watch still failing");
                } else {
                    tracing::warn!(kind, %err, "watch failed; retrying with back-off, serving the last known objects");
                    failing = true;
                }
            }
        }
    }
    Ended::StreamEnded
}

fn is_not_found(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

/// Watches one Istio kind in the first served version; while none is
/// served the store is empty, which is logged once per absence.
async fn watch_istio(
    kind: &'static str,
    client: Client,
    mut writer: Writer<DynamicObject>,
    ctx: Arc<Ctx>,
    recheck: Duration,
) {
    let mut absent = false;
    loop {
        for version in ISTIO_VERSIONS {
            let resource = istio_resource(version, kind);
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let stream = watcher(api, watcher::Config::default())
                .modify(strip)
                .backoff(ctx.backoff());
            let found = absent
                .then(|| format!("{kind} ({ISTIO_GROUP}/{version}) is served now; watching it"));
            match pump(kind, stream, &mut writer, &ctx, true, found).await {
                Ended::NotFound => tracing::debug!(kind, version, "not served (404)"),
                Ended::StreamEnded => {}
            }
        }
        // No version is served: no objects of this kind (also after a CRD
        // was deleted), and the store counts as listed.
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        ctx.changed();
        if !absent {
            absent = true;
            tracing::info!(
                "{kind} is not served by the API server ({ISTIO_GROUP} {}: 404, is Istio's CRD installed?); \
                 carrying on without {kind}s, looking again every {}",
                ISTIO_VERSIONS.join("/"),
                humantime::format_duration(recheck)
            );
        }
        tokio::time::sleep(recheck).await;
    }
}

/// Exponential back-off with up to 25% added jitter (kube's
/// `default_backoff` has fixed client-go parameters; tests need shorter ones).
struct JitteredBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = base.saturating_mul(2).min(self.max);
        Some(base + base.mul_f64(fastrand::f64() / 4.0))
    }
}

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Whether the API server answers, judged on every request of the client:
/// a response other than 5xx or 401 means up; a transport error (refused,
/// reset, timeout), a 5xx or a 401 means down.
struct Health {
    up: Arc<AtomicBool>,
}

impl Health {
    fn record(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("Kubernetes API server answers again");
                }
            }
            Err(why) => {
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "Kubernetes API server unreachable ({why}); serving the last known configuration"
                    );
                }
            }
        }
    }
}

/// A tower layer around the kube client's HTTP stack feeding [`Health`].
#[derive(Clone)]
struct HealthLayer(Arc<Health>);

impl<S> tower::Layer<S> for HealthLayer {
    type Service = HealthService<S>;

    fn layer(&self, inner: S) -> HealthService<S> {
        HealthService {
            inner,
            health: self.0.clone(),
        }
    }
}

struct HealthService<S> {
    inner: S,
    health: Arc<Health>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<kube::client::Body>> for HealthService<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: fmt::Display + Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let health = self.health.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            health.record(match &result {
                Ok(r) if r.status().is_server_error() || r.status().as_u16() == 401 => {
                    Err(format!("HTTP {}", r.status()))
                }
                Ok(_) => Ok(()),
                Err(err) => Err(err.to_string()),
            });
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = JitteredBackoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(350),
            next: Duration::from_millis(100),
        };
        let within = |d: Duration, base: u64| {
            d >= Duration::from_millis(base) && d <= Duration::from_millis(base + base / 4)
        };
        assert!(within(b.next().unwrap(), 100));
        assert!(within(b.next().unwrap(), 200));
        assert!(within(b.next().unwrap(), 350));
        assert!(within(b.next().unwrap(), 350));
        b.reset();
        assert!(within(b.next().unwrap(), 100));
    }

    fn dynamic(kind: &str, data: serde_json::Value) -> DynamicObject {
        let mut object = DynamicObject::new("r", &istio_resource("v1", kind)).within("shop");
        object.data = data;
        object
    }

    #[test]
    fn istio_specs_are_read_and_bad_ones_named() {
        let mut problems = Problems::default();
        let good = dynamic(
            "DestinationRule",
            serde_json::json!({"spec": {"host": "reviews", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}),
        );
        let (meta, spec) =
            istio_object::<istio::DestinationRuleSpec>(&good, "DestinationRule", &mut problems)
                .expect("readable");
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(spec.host.as_deref(), Some("reviews"));
        let warnings: Vec<String> = problems.warnings.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            warnings,
            [
                "kubernetes: document 0 (DestinationRule shop/r): spec.trafficPolicy.tls: field is not supported by Nodeway and is ignored"
            ]
        );

        let bad = dynamic(
            "VirtualService",
            serde_json::json!({"spec": {"hosts": "reviews"}}),
        );
        assert!(
            istio_object::<istio::VirtualServiceSpec>(&bad, "VirtualService", &mut problems)
                .is_none()
        );
        assert_eq!(problems.errors.len(), 1);
        let error = problems.errors[0].to_string();
        assert!(
            error.starts_with("kubernetes: document 0 (VirtualService shop/r): spec.hosts: "),
            "{error}"
        );

        // No spec at all is an empty spec, as in file mode.
        let empty = dynamic("DestinationRule", serde_json::json!({}));
        assert!(
            istio_object::<istio::DestinationRuleSpec>(&empty, "DestinationRule", &mut problems)
                .is_some()
        );
    }

    #[test]
    fn spec_fields() {
        assert_eq!(spec_field("."), "spec");
        assert_eq!(spec_field("http[0].retries"), "spec.http[0].retries");
        assert_eq!(spec_field("[1]"), "spec[1]");
    }
}
