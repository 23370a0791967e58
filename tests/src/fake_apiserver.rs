//! An in-process Kubernetes API server for the Kubernetes-mode tests: plain
//! HTTP/1.1 on loopback, speaking the list/watch protocol the way a real
//! kube-apiserver does for the resources Nodeway reads.
//!
//! - `GET /api/v1/namespaces`, `/api/v1/nodes`, `/api/v1/pods`,
//!   `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/networking.istio.io/v1/{destinationrules,virtualservices}`
//!   (cluster-wide, as `Api::all` asks):
//!   - LIST: `{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"N"},"items":[…]}`
//!     (built-in kinds' items without `kind`/`apiVersion`, as the API server
//!     writes them; custom resources' with), `limit`/`continue` paging;
//!   - `?watch=1&resourceVersion=N`: newline-delimited
//!     `{"type":"ADDED|MODIFIED|DELETED","object":…}` for every change after
//!     `N`, then live; `BOOKMARK` events every [`FakeApiServer::set_bookmark_interval`]
//!     with `allowWatchBookmarks=true`; a `resourceVersion` older than the
//!     retained history gets one `ERROR` event with a `Status` `410 Expired`;
//!   - `fieldSelector` (`path=value`, `path!=value`, comma-separated; e.g.
//!     `spec.nodeName=node-a`) and equality `labelSelector`s are honoured;
//!   - `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`
//!     (metadata-only list/watch) answers `PartialObjectMetadata(List)`;
//!   - a resource marked absent ([`FakeApiServer::set_absent`], a CRD not
//!     installed) answers `404` with a `Status`, as for an unknown path.
//! - `GET /version`.
//!
//! One resourceVersion counter for all objects (like etcd's revision);
//! every change is kept in a history until [`FakeApiServer::expire_history`]
//! compacts it. [`FakeApiServer::stop`] closes the listener and every
//! connection (API server down), [`FakeApiServer::start`] listens again on
//! the same address with the same objects and history.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

type RespBody = BoxBody<Bytes, Infallible>;

/// A resource the server knows.
#[derive(Debug, Clone, Copy)]
struct ResourceDef {
    /// Collection path, e.g. `/api/v1/pods`.
    path: &'static str,
    kind: &'static str,
    api_version: &'static str,
    namespaced: bool,
    /// Custom resource (its list items keep `kind`/`apiVersion`).
    custom: bool,
}

const RESOURCES: [ResourceDef; 7] = [
    ResourceDef {
        path: "/api/v1/namespaces",
        kind: "Namespace",
        api_version: "v1",
        namespaced: false,
        custom: false,
    },
    ResourceDef {
        path: "/api/v1/nodes",
        kind: "Node",
        api_version: "v1",
        namespaced: false,
        custom: false,
    },
    ResourceDef {
        path: "/api/v1/pods",
        kind: "Pod",
        api_version: "v1",
        namespaced: true,
        custom: false,
    },
    ResourceDef {
        path: "/api/v1/services",
        kind: "Service",
        api_version: "v1",
        namespaced: true,
        custom: false,
    },
    ResourceDef {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        namespaced: true,
        custom: false,
    },
    ResourceDef {
        path: "/apis/networking.istio.io/v1/destinationrules",
        kind: "DestinationRule",
        api_version: "networking.istio.io/v1",
        namespaced: true,
        custom: true,
    },
    ResourceDef {
        path: "/apis/networking.istio.io/v1/virtualservices",
        kind: "VirtualService",
        api_version: "networking.istio.io/v1",
        namespaced: true,
        custom: true,
    },
];

fn resource_index(kind: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve kind {kind}"))
}

/// One change, as a watch event.
#[derive(Debug)]
struct Change {
    rv: u64,
    resource: usize,
    kind: &'static str,
    object: Value,
}

/// A request the server answered, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `list`, `watch` or `other`.
    pub verb: &'static str,
    /// Kind of the resource (`Pod`), or the path for other requests.
    pub kind: String,
    pub resource_version: Option<String>,
    pub field_selector: Option<String>,
    pub metadata_only: bool,
    /// Status answered (watch: 200 even when the stream carries an ERROR event).
    pub status: u16,
    /// A watch answered with `410 Gone` (its resourceVersion was compacted away).
    pub expired: bool,
}

struct ResourceState {
    objects: BTreeMap<(String, String), Value>,
    absent: bool,
}

/// The stored objects and their history.
pub struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    resources: Vec<ResourceState>,
    history: Vec<Arc<Change>>,
    /// Changes made since the caller last took them (for broadcasting).
    pending: Vec<Arc<Change>>,
}

impl State {
    /// Creates or replaces an object (`kind`, `metadata.name`, and for
    /// namespaced kinds `metadata.namespace` are required); stamps
    /// `resourceVersion`, and on creation `uid` and `creationTimestamp`
    /// unless given.
    pub fn apply(&mut self, mut object: Value) {
        let kind = object["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("object without kind: {object}"))
            .to_string();
        let r = resource_index(&kind);
        let def = RESOURCES[r];
        object["apiVersion"] = json!(def.api_version);
        let key = object_key(&def, &object);
        self.rv += 1;
        let rv = self.rv;
        let previous = self.resources[r].objects.get(&key).cloned();
        let meta = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let event = match &previous {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = old["metadata"].get(field) {
                        meta.insert(field.into(), v.clone());
                    }
                }
                "MODIFIED"
            }
            None => {
                meta.entry("uid")
                    .or_insert_with(|| json!(format!("6b1f{rv:04x}-2c4e-4f0a-9d3b-{rv:012x}")));
                meta.entry("creationTimestamp")
                    .or_insert_with(|| json!(timestamp(rv)));
                "ADDED"
            }
        };
        self.resources[r].objects.insert(key, object.clone());
        self.record(r, event, object);
    }

    /// Changes an existing object with `f` and applies it; panics if absent.
    pub fn modify(&mut self, kind: &str, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut object = self
            .get(kind, namespace, name)
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"));
        f(&mut object);
        self.apply(object);
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        let r = resource_index(kind);
        let def = RESOURCES[r];
        let key = (
            if def.namespaced { namespace } else { "" }.to_string(),
            name.to_string(),
        );
        let Some(mut object) = self.resources[r].objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(r, "DELETED", object);
        true
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = resource_index(kind);
        let def = RESOURCES[r];
        let key = (
            if def.namespaced { namespace } else { "" }.to_string(),
            name.to_string(),
        );
        self.resources[r].objects.get(&key).cloned()
    }

    /// Adds every item of a `…List` document (as `kubectl get -o json` or the
    /// API server prints it).
    pub fn load_list(&mut self, list: &Value) {
        let kind = list["kind"].as_str().expect("list kind");
        let item_kind = kind.strip_suffix("List").expect("a …List document");
        for item in list["items"].as_array().expect("items") {
            let mut item = item.clone();
            item["kind"] = json!(item_kind);
            self.apply(item);
        }
    }

    fn record(&mut self, resource: usize, kind: &'static str, object: Value) {
        let change = Arc::new(Change {
            rv: self.rv,
            resource,
            kind,
            object,
        });
        self.history.push(change.clone());
        self.pending.push(change);
    }
}

fn object_key(def: &ResourceDef, object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().expect("metadata.name").to_string();
    let namespace = if def.namespaced {
        meta["namespace"]
            .as_str()
            .expect("metadata.namespace")
            .to_string()
    } else {
        String::new()
    };
    (namespace, name)
}

/// An RFC 3339 time that increases with the resourceVersion.
fn timestamp(rv: u64) -> String {
    let (day, rest) = (rv / 86_400, rv % 86_400);
    format!(
        "2025-03-{:02}T{:02}:{:02}:{:02}Z",
        1 + day % 28,
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

struct Inner {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Bumped to end every open watch.
    epoch: watch::Sender<u64>,
    bookmark_interval: Mutex<Duration>,
    seen: Mutex<Vec<Seen>>,
}

impl Inner {
    /// Runs `f` on the state and broadcasts its changes to open watches.
    fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.state.lock().unwrap();
        let result = f(&mut state);
        for change in state.pending.drain(..) {
            // No receivers is fine.
            let _ = self.changes.send(change);
        }
        result
    }
}

struct Listening {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The server; see the module documentation.
pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    listening: Mutex<Option<Listening>>,
}

impl FakeApiServer {
    /// Starts an empty server on `127.0.0.1:0`.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("bound");
        let (changes, _) = broadcast::channel(4096);
        let server = FakeApiServer {
            addr,
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    rv: 100,
                    oldest: 0,
                    resources: RESOURCES
                        .iter()
                        .map(|_| ResourceState {
                            objects: BTreeMap::new(),
                            absent: false,
                        })
                        .collect(),
                    history: Vec::new(),
                    pending: Vec::new(),
                }),
                changes,
                epoch: watch::channel(0).0,
                bookmark_interval: Mutex::new(Duration::from_secs(1)),
                seen: Mutex::new(Vec::new()),
            }),
            listening: Mutex::new(None),
        };
        server.listen(listener);
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes objects; open watches see each change as an event.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.inner.mutate(f)
    }

    pub fn apply(&self, object: Value) {
        self.mutate(|s| s.apply(object));
    }

    pub fn modify(&self, kind: &str, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        self.mutate(|s| s.modify(kind, namespace, name, f));
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.mutate(|s| s.delete(kind, namespace, name))
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.inner.state.lock().unwrap().get(kind, namespace, name)
    }

    /// Loads a `…List` JSON file.
    pub fn load_list_file(&self, path: &std::path::Path, patch: impl FnOnce(&mut Value)) {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut list: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        patch(&mut list);
        self.mutate(|s| s.load_list(&list));
    }

    /// Makes a kind answer 404, as when its CRD is not installed (objects are
    /// kept for when it comes back). Open watches of it end.
    pub fn set_absent(&self, kind: &str, absent: bool) {
        let r = resource_index(kind);
        self.inner.state.lock().unwrap().resources[r].absent = absent;
        if absent {
            self.inner.epoch.send_modify(|e| *e += 1);
        }
    }

    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.inner.bookmark_interval.lock().unwrap() = every;
    }

    /// Ends every open watch, then makes changes that no watcher sees as
    /// events, then forgets the history (etcd compaction): clients that
    /// resume from their last resourceVersion get `410 Gone` and must list
    /// again to see the changes.
    pub fn expire_history(&self, f: impl FnOnce(&mut State)) {
        let mut state = self.inner.state.lock().unwrap();
        self.inner.epoch.send_modify(|e| *e += 1);
        f(&mut state);
        state.pending.clear();
        state.history.clear();
        state.oldest = state.rv;
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.state.lock().unwrap().rv
    }

    /// Requests answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// How many times `kind` was listed (any page, full or metadata-only).
    pub fn lists(&self, kind: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.verb == "list" && s.kind == kind)
            .count()
    }

    /// API server down: closes the listener and every connection, open
    /// watches included. Objects and history stay.
    pub async fn stop(&self) {
        let listening = self.listening.lock().unwrap().take();
        if let Some(l) = listening {
            let _ = l.stop.send(true);
            let _ = l.task.await;
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        assert!(
            self.listening.lock().unwrap().is_none(),
            "the fake API server is running"
        );
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("listen again on {}: {e}", self.addr));
        self.listen(listener);
    }

    fn listen(&self, listener: TcpListener) {
        let (stop, stopped) = watch::channel(false);
        let inner = self.inner.clone();
        let task = tokio::spawn(accept_loop(listener, inner, stopped));
        *self.listening.lock().unwrap() = Some(Listening { stop, task });
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(l) = self.listening.lock().unwrap().take() {
            let _ = l.stop.send(true);
            l.task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let inner = inner.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(handle(&inner, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            // Dropping the connection closes the socket, mid-stream or not.
            tokio::select! {
                _ = conn => {}
                _ = stopped.changed() => {}
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// Parsed query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Form decoding, as Go's `url.ParseQuery`: `+` is a space.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// A field or label selector: `key=value`, `key==value`, `key!=value`, comma-separated.
struct Selector(Vec<(String, bool, String)>);

impl Selector {
    fn parse(s: Option<&str>) -> Selector {
        Selector(
            s.unwrap_or("")
                .split(',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    if let Some((k, v)) = t.split_once("!=") {
                        (k.to_string(), false, v.to_string())
                    } else {
                        let (k, v) = t.split_once('=').unwrap_or((t, ""));
                        (k.to_string(), true, v.trim_start_matches('=').to_string())
                    }
                })
                .collect(),
        )
    }

    fn matches_fields(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut v = object;
            for part in path.split('.') {
                v = &v[part];
            }
            let got = v.as_str().unwrap_or("");
            (got == want) == *eq
        })
    }

    fn matches_labels(&self, object: &Value) -> bool {
        self.0.iter().all(|(key, eq, want)| {
            let got = object["metadata"]["labels"][key.as_str()].as_str();
            (got == Some(want.as_str())) == *eq
        })
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    })
}

/// The object as the request wants to see it: full, or `PartialObjectMetadata`.
fn shape(def: &ResourceDef, object: &Value, metadata_only: bool, in_list: bool) -> Value {
    if metadata_only {
        return json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object["metadata"].clone(),
        });
    }
    let mut v = object.clone();
    if in_list && !def.custom {
        let map = v.as_object_mut().expect("object");
        map.remove("kind");
        map.remove("apiVersion");
    } else {
        v["kind"] = json!(def.kind);
        v["apiVersion"] = json!(def.api_version);
    }
    v
}

fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let metadata_only = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let record = |verb: &'static str, kind: &str, status: u16| {
        inner.seen.lock().unwrap().push(Seen {
            verb,
            kind: kind.to_string(),
            resource_version: query.get("resourceVersion").map(str::to_string),
            field_selector: query.get("fieldSelector").map(str::to_string),
            metadata_only,
            status,
            expired: false,
        });
    };
    if req.method() != http::Method::GET {
        record("other", &path, 405);
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status_object(405, "MethodNotAllowed", "the fake API server is read-only"),
        );
    }
    if path == "/version" {
        record("other", &path, 200);
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.1", "platform": "linux/amd64"}),
        );
    }
    let Some(r) = RESOURCES.iter().position(|d| d.path == path) else {
        record("other", &path, 404);
        return not_found();
    };
    let def = RESOURCES[r];
    let watch = matches!(query.get("watch"), Some("1" | "true"));
    let verb = if watch { "watch" } else { "list" };
    if inner.state.lock().unwrap().resources[r].absent {
        record(verb, def.kind, 404);
        return not_found();
    }
    let fields = Selector::parse(query.get("fieldSelector"));
    let labels = Selector::parse(query.get("labelSelector"));
    record(verb, def.kind, 200);
    if watch {
        start_watch(inner, r, &query, fields, labels, metadata_only)
    } else {
        list(inner, r, &query, &fields, &labels, metadata_only)
    }
}

fn not_found() -> Response<RespBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &status_object(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    )
}

fn list(
    inner: &Inner,
    r: usize,
    query: &Query,
    fields: &Selector,
    labels: &Selector,
    metadata_only: bool,
) -> Response<RespBody> {
    let def = RESOURCES[r];
    let state = inner.state.lock().unwrap();
    let matching: Vec<&Value> = state.resources[r]
        .objects
        .values()
        .filter(|o| fields.matches_fields(o) && labels.matches_labels(o))
        .collect();
    let start: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(limit)
        .map(|o| shape(&def, o, metadata_only, true))
        .collect();
    let mut metadata = json!({"resourceVersion": state.rv.to_string()});
    if start.saturating_add(limit) < matching.len() {
        metadata["continue"] = json!((start + limit).to_string());
        metadata["remainingItemCount"] = json!(matching.len() - start - limit);
    }
    let (kind, api_version) = if metadata_only {
        ("PartialObjectMetadataList".to_string(), "meta.k8s.io/v1")
    } else {
        (format!("{}List", def.kind), def.api_version)
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page}),
    )
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn start_watch(
    inner: &Arc<Inner>,
    r: usize,
    query: &Query,
    fields: Selector,
    labels: Selector,
    metadata_only: bool,
) -> Response<RespBody> {
    let def = RESOURCES[r];
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let bookmarks = matches!(query.get("allowWatchBookmarks"), Some("true" | "1"));
    let every = *inner.bookmark_interval.lock().unwrap();
    let visible = move |o: &Value| fields.matches_fields(o) && labels.matches_labels(o);

    let state = inner.state.lock().unwrap();
    let from: u64 = match query.get("resourceVersion") {
        None | Some("" | "0") => state.rv,
        Some(rv) => rv.parse().unwrap_or(0),
    };
    let mut backlog = Vec::new();
    if from < state.oldest {
        let status = status_object(
            410,
            "Expired",
            &format!("too old resource version: {from} ({})", state.oldest),
        );
        backlog.push(event_line("ERROR", status));
        drop(state);
        if let Some(seen) = inner.seen.lock().unwrap().last_mut() {
            seen.expired = true;
        }
        for line in backlog {
            let _ = tx.try_send(line);
        }
        return streaming(rx);
    }
    for change in state
        .history
        .iter()
        .filter(|c| c.rv > from && c.resource == r)
    {
        if visible(&change.object) {
            backlog.push(event_line(
                change.kind,
                shape(&def, &change.object, metadata_only, false),
            ));
        }
    }
    let mut live = inner.changes.subscribe();
    let mut epoch = inner.epoch.subscribe();
    let mut last = state.rv;
    drop(state);

    tokio::spawn(async move {
        for line in backlog {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(every);
        tick.reset();
        loop {
            let line = tokio::select! {
                _ = epoch.changed() => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let mut object = json!({"metadata": {"resourceVersion": last.to_string()}});
                    if metadata_only {
                        object["kind"] = json!("PartialObjectMetadata");
                        object["apiVersion"] = json!("meta.k8s.io/v1");
                    } else {
                        object["kind"] = json!(def.kind);
                        object["apiVersion"] = json!(def.api_version);
                    }
                    event_line("BOOKMARK", object)
                }
                change = live.recv() => match change {
                    Ok(change) => {
                        last = last.max(change.rv);
                        if change.resource != r || !visible(&change.object) {
                            continue;
                        }
                        event_line(change.kind, shape(&def, &change.object, metadata_only, false))
                    }
                    // Too slow a reader: end the watch; the client resumes.
                    Err(_) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    streaming(rx)
}

/// A chunked `200` whose body is the lines sent on the channel.
fn streaming(rx: mpsc::Receiver<Bytes>) -> Response<RespBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(ChannelBody(rx).boxed())
        .expect("response")
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_queries() {
        let q = Query::parse(Some("fieldSelector=spec.nodeName%3Dnode-a&watch=true&x"));
        assert_eq!(q.get("fieldSelector"), Some("spec.nodeName=node-a"));
        assert_eq!(q.get("watch"), Some("true"));
        assert_eq!(q.get("x"), Some(""));
        let pod = json!({"metadata": {"labels": {"app": "a"}}, "spec": {"nodeName": "node-a"}});
        assert!(Selector::parse(Some("spec.nodeName=node-a")).matches_fields(&pod));
        assert!(!Selector::parse(Some("spec.nodeName!=node-a")).matches_fields(&pod));
        assert!(Selector::parse(Some("app==a")).matches_labels(&pod));
        assert!(Selector::parse(None).matches_fields(&pod));
    }

    #[test]
    fn timestamps_increase() {
        assert_eq!(timestamp(101), "2025-03-01T00:01:41Z");
        assert!(timestamp(5000) > timestamp(4999));
    }
}
