//! Kubernetes mode (`nodeway run --kubernetes`) against an in-process API
//! server that speaks the real list/watch protocol
//! (`nodeway_tests::fake_apiserver`) and serves recorded objects
//! (`tests/fixtures/kube/`): each test changes objects on the API server and
//! checks what the proxy then does — where requests go, how they are routed,
//! which pods it enrolls, what `/config_dump` and `/metrics` say.
//!
//! The world: namespace `shop` opted in, node `node-a` under test. Clients
//! on `node-a`: `sleep` (version v1, 127.0.61.5), `ratings-v2` (version v2,
//! 127.0.61.6); `batch` in the non-enrolled namespace `legacy` (127.0.61.9).
//! Service `reviews` has endpoints `reviews-v1` (127.0.62.1, on node-a) and
//! `reviews-v2` (127.0.62.2, on node-b: known only by its metadata), both
//! mock upstreams on one port. DestinationRule `shop/reviews`: subsets v1/v2,
//! ROUND_ROBIN. VirtualService `shop/reviews`: clients labelled version v2
//! go to subset v2, everyone else to the whole service.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{FixedOriginalDst, TempDir};
use nodeway::app::{self, RunOptions, Running};
use nodeway::config::kube::KubeOptions;
use nodeway::telemetry::access_log::AccessLogTarget;
use nodeway_tests::access_log::{AccessLog, Entry, field};
use nodeway_tests::fake_apiserver::FakeApiServer;
use nodeway_tests::{MockOptions, MockUpstream, Outcome, Proto, request};
use serde_json::{Value, json};

const SLEEP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 61, 5));
const RATINGS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 61, 6));
const BATCH: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 61, 9));
const SLEEP_POD: &str = "shop/sleep-6f8b9d7c5-4xk2p";
const BATCH_POD: &str = "legacy/batch-7c9d5f6b8-zt5vw";
const AUTHORITY: &str = "reviews.shop.svc.cluster.local:9080";
const CLUSTER: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const SUBSET_V2: &str = "outbound|9080|v2|reviews.shop.svc.cluster.local";
const SLICE: &str = "reviews-8kq2w";
/// Longest wait for the proxy to follow a change.
const FOLLOW: Duration = Duration::from_secs(10);

fn backend_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 62, n))
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube")
}

/// `reviews-v1`, `-v2`, `-v3` on 127.0.62.1-3, all on one port (an
/// EndpointSlice has one port for all its endpoints).
async fn backends() -> (u16, Vec<MockUpstream>) {
    for _ in 0..20 {
        let first = MockUpstream::start(
            SocketAddr::new(backend_ip(1), 0),
            MockOptions::named("reviews-v1"),
        )
        .await
        .expect("mock starts");
        let port = first.addr().port();
        let mut mocks = vec![first];
        for n in 2..=3 {
            match MockUpstream::start(
                SocketAddr::new(backend_ip(n), port),
                MockOptions::named(format!("reviews-v{n}")),
            )
            .await
            {
                Ok(m) => mocks.push(m),
                Err(_) => break,
            }
        }
        if mocks.len() == 3 {
            return (port, mocks);
        }
    }
    panic!("no port free on 127.0.62.1-3");
}

/// The endpoint of backend `n` as the EndpointSlice controller writes it.
fn endpoint(n: u8, pod: &str, node: &str) -> Value {
    json!({
        "addresses": [backend_ip(n).to_string()],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod},
        "nodeName": node,
        "zone": if node == "node-a" { "europe-west1-b" } else { "europe-west1-c" },
    })
}

/// The backends and an API server serving the fixtures.
async fn cluster() -> (FakeApiServer, Vec<MockUpstream>) {
    let (port, backends) = backends().await;
    let api = FakeApiServer::start().await;
    api.set_bookmark_interval(Duration::from_millis(300));
    for name in [
        "namespaces",
        "nodes",
        "pods",
        "services",
        "endpointslices",
        "destinationrules",
        "virtualservices",
    ] {
        api.load_list_file(&fixtures().join(format!("{name}.json")), |list| {
            for item in list["items"].as_array_mut().unwrap() {
                if item["metadata"]["name"] == SLICE {
                    item["ports"][0]["port"] = json!(port);
                }
            }
        });
    }
    (api, backends)
}

struct World {
    api: FakeApiServer,
    proxy: Running,
    log: AccessLog,
    backends: Vec<MockUpstream>,
    requests: AtomicU32,
    dir: TempDir,
}

impl World {
    async fn start() -> World {
        Self::start_with(|_| {}).await
    }

    /// Fixtures loaded, `tweak` applied, then the proxy started.
    async fn start_with(tweak: impl FnOnce(&FakeApiServer)) -> World {
        Self::start_full(tweak, None).await
    }

    /// …and with `--config` holding `file` next to `--kubernetes`.
    async fn start_full(tweak: impl FnOnce(&FakeApiServer), file: Option<&str>) -> World {
        let (api, backends) = cluster().await;
        tweak(&api);

        let dir = TempDir::new("kube");
        let log_path = dir.0.join("access.log");
        let mut opts = RunOptions::new(dir.0.join("extra.yaml"));
        match file {
            Some(text) => std::fs::write(dir.0.join("extra.yaml"), text).unwrap(),
            None => opts.config = None,
        }
        opts.config_poll_interval = Duration::from_millis(100);
        let mut kube = KubeOptions::new("node-a");
        kube.api_url = Some(api.url());
        kube.backoff_min = Duration::from_millis(50);
        kube.backoff_max = Duration::from_millis(300);
        kube.crd_recheck = Duration::from_millis(300);
        kube.debounce = Duration::from_millis(30);
        kube.initial_sync_timeout = Duration::from_secs(10);
        opts.kubernetes = Some(kube);
        opts.outbound_addr = "127.0.0.1:0".parse().unwrap();
        opts.admin_addr = "127.0.0.1:0".parse().unwrap();
        opts.metrics_addr = "127.0.0.1:0".parse().unwrap();
        opts.access_log = AccessLogTarget::File(log_path.clone());
        let proxy = app::start(opts, Arc::new(FixedOriginalDst(None)))
            .await
            .unwrap_or_else(|e| panic!("proxy did not start: {e}"));
        World {
            api,
            proxy,
            log: AccessLog::new(log_path),
            backends,
            requests: AtomicU32::new(0),
            dir,
        }
    }

    /// A request to `reviews` from the client at `src`; the path is unique
    /// (`{path}?n={n}`) so that its access-log line can be found.
    async fn call(&self, src: IpAddr, path: &str) -> (String, Outcome) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let path = format!("{path}?n={n}");
        let out = request(
            Proto::Http1,
            self.proxy.outbound_addr,
            src,
            AUTHORITY,
            &path,
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await;
        (path, out)
    }

    /// Which backend answered a request from `src` (or `status N` / the error).
    async fn served_by(&self, src: IpAddr) -> String {
        let (_, out) = self.call(src, "/probe").await;
        describe(&out)
    }

    /// How `n` requests from `src` were answered.
    async fn tally(&self, src: IpAddr, n: usize) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for _ in 0..n {
            *t.entry(self.served_by(src).await).or_default() += 1;
        }
        t
    }

    /// The access-log line of the request with this path.
    async fn logged(&self, path: &str) -> Entry {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self
                .log
                .lines()
                .into_iter()
                .find(|l| field(l, "path") == Some(path))
            {
                return line;
            }
            assert!(Instant::now() < deadline, "no access-log line for {path}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `source_workload` of a request from `src`, from its access-log line.
    async fn client_of(&self, src: IpAddr) -> String {
        let (path, out) = self.call(src, "/whoami").await;
        assert_eq!(out.status, Some(200), "{out:?}");
        let line = self.logged(&path).await;
        field(&line, "source_workload").unwrap_or("-").to_string()
    }

    async fn get_text(&self, addr: SocketAddr, path: &str) -> String {
        let out = request(
            Proto::Http1,
            addr,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            &addr.to_string(),
            path,
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(out.status, Some(200), "GET {path}: {out:?}");
        String::from_utf8_lossy(&out.body).into_owned()
    }

    /// An unlabelled gauge from `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let text = self.get_text(self.proxy.metrics_addr, "/metrics").await;
        text.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse().expect("a number"))
            })
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    async fn config_dump(&self) -> Value {
        let text = self.get_text(self.proxy.admin_addr, "/config_dump").await;
        serde_json::from_str(&text).expect("JSON")
    }

    /// The `/config_dump` entry of (client pod, cluster), after a request of
    /// that client made sure it reflects the current configuration.
    async fn client_cluster(&self, src: IpAddr, pod: &str, cluster: &str) -> Value {
        let _ = self.call(src, "/dump").await;
        let dump = self.config_dump().await;
        dump["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["source_pod"] == pod && c["cluster"] == cluster)
            .cloned()
            .unwrap_or_else(|| panic!("no cluster {cluster} for {pod}: {dump:#}"))
    }

    async fn rule_of(&self, src: IpAddr, pod: &str) -> Value {
        self.client_cluster(src, pod, CLUSTER).await["destination_rule"].clone()
    }

    fn slice_endpoints(&self, endpoints: Vec<Value>) {
        self.api.modify("EndpointSlice", "shop", SLICE, |s| {
            s["endpoints"] = Value::Array(endpoints);
        });
    }
}

fn describe(out: &Outcome) -> String {
    match (out.status, out.headers.get("x-served-by")) {
        (Some(200), Some(name)) => name.to_str().unwrap_or("?").to_string(),
        (Some(code), _) => format!("status {code}"),
        (None, _) => format!("error {:?}", out.error),
    }
}

/// Polls `check` every 50 ms until it returns true; panics after [`FOLLOW`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + FOLLOW;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {FOLLOW:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_pod_labels_enroll_and_unenroll_live() {
    let w = World::start().await;
    // sleep, ratings and reviews-v1 run on node-a in the opted-in `shop`;
    // reviews-v2 is on node-b, batch in `legacy`, kube-proxy on the host network.
    assert_eq!(w.metric("nodeway_enrolled_workloads").await, 3.0);

    w.api.modify("Namespace", "", "shop", |ns| {
        ns["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("nodeway.io/redirect");
    });
    eventually("shop unlabelled: nothing enrolled", async || {
        w.metric("nodeway_enrolled_workloads").await == 0.0
    })
    .await;

    w.api.modify("Namespace", "", "legacy", |ns| {
        ns["metadata"]["labels"]["nodeway.io/redirect"] = json!("enabled");
    });
    eventually("legacy labelled: batch enrolled", async || {
        w.metric("nodeway_enrolled_workloads").await == 1.0
    })
    .await;

    w.api.modify("Namespace", "", "shop", |ns| {
        ns["metadata"]["labels"]["nodeway.io/redirect"] = json!("enabled");
    });
    eventually("shop labelled again", async || {
        w.metric("nodeway_enrolled_workloads").await == 4.0
    })
    .await;

    // A pod opts out by itself.
    w.api.modify("Pod", "shop", "sleep-6f8b9d7c5-4xk2p", |pod| {
        pod["metadata"]["labels"]["nodeway.io/redirect"] = json!("disabled");
    });
    eventually("sleep opted out", async || {
        w.metric("nodeway_enrolled_workloads").await == 3.0
    })
    .await;
    assert_eq!(w.metric("nodeway_config_source_up").await, 1.0);
    assert_eq!(w.metric("nodeway_config_last_reload_success").await, 1.0);

    // Read-only, and scoped: this node's pods in full, other pods and nodes
    // as metadata, watches with bookmarks from the listed resourceVersion.
    let seen = w.api.seen();
    assert!(
        seen.iter().all(|s| s.verb != "other" || s.status == 404),
        "{seen:?}"
    );
    let has = |verb: &str, kind: &str, selector: Option<&str>, metadata_only: bool| {
        seen.iter().any(|s| {
            s.verb == verb
                && s.kind == kind
                && s.field_selector.as_deref() == selector
                && s.metadata_only == metadata_only
        })
    };
    for verb in ["list", "watch"] {
        assert!(
            has(verb, "Pod", Some("spec.nodeName=node-a"), false),
            "{seen:?}"
        );
        assert!(has(verb, "Pod", None, true), "{seen:?}");
        assert!(has(verb, "Node", None, true), "{seen:?}");
        assert!(!has(verb, "Pod", None, false), "{seen:?}");
        for kind in [
            "Namespace",
            "Service",
            "EndpointSlice",
            "DestinationRule",
            "VirtualService",
        ] {
            assert!(has(verb, kind, None, false), "{verb} {kind}: {seen:?}");
        }
    }
    assert!(
        seen.iter().filter(|s| s.verb == "watch").all(|s| s
            .resource_version
            .as_deref()
            .is_some_and(|rv| rv.parse::<u64>().is_ok())),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_added_removed_and_relabelled() {
    let w = World::start().await;
    let newcomer = IpAddr::V4(Ipv4Addr::new(127, 0, 61, 7));
    let elsewhere = IpAddr::V4(Ipv4Addr::new(127, 0, 61, 8));
    assert_eq!(w.client_of(SLEEP).await, "sleep");
    assert_eq!(w.client_of(newcomer).await, "unknown");

    // A pod is scheduled on this node (and one on another node).
    let mut pod = w
        .api
        .get("Pod", "shop", "sleep-6f8b9d7c5-4xk2p")
        .expect("fixture pod");
    pod["metadata"] = json!({
        "name": "productpage-v1-6b746f74dc-9stvq",
        "namespace": "shop",
        "generateName": "productpage-v1-6b746f74dc-",
        "labels": {"app": "productpage", "version": "v1", "pod-template-hash": "6b746f74dc"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "productpage-v1-6b746f74dc", "uid": "5e0f9a3c-7d21-4b8e-a6c4-2f1d0b9e8a73",
            "controller": true, "blockOwnerDeletion": true}],
    });
    pod["status"]["podIP"] = json!(newcomer.to_string());
    pod["status"]["podIPs"] = json!([{"ip": newcomer.to_string()}]);
    let mut remote = pod.clone();
    remote["metadata"]["name"] = json!("productpage-v1-6b746f74dc-b8kzl");
    remote["spec"]["nodeName"] = json!("node-b");
    remote["status"]["podIP"] = json!(elsewhere.to_string());
    remote["status"]["podIPs"] = json!([{"ip": elsewhere.to_string()}]);
    w.api.apply(pod);
    w.api.apply(remote);
    eventually("the new pod is a known client", async || {
        w.client_of(newcomer).await == "productpage-v1"
    })
    .await;
    // Pods of other nodes are not this proxy's clients (and only their
    // metadata is watched).
    assert_eq!(w.client_of(elsewhere).await, "unknown");

    // Relabelled: sleep becomes a v2 client, which the VirtualService routes to subset v2.
    let before = w.tally(SLEEP, 6).await;
    assert_eq!(before, counts(&[("reviews-v1", 3), ("reviews-v2", 3)]));
    w.api.modify("Pod", "shop", "sleep-6f8b9d7c5-4xk2p", |pod| {
        pod["metadata"]["labels"]["version"] = json!("v2");
    });
    eventually("relabelled sleep is routed to subset v2", async || {
        w.tally(SLEEP, 4).await == counts(&[("reviews-v2", 4)])
    })
    .await;
    let c = w.client_cluster(SLEEP, SLEEP_POD, SUBSET_V2).await;
    assert_eq!(c["destination_rule"], "shop/reviews");

    // Removed: its address identifies nobody any more.
    assert!(
        w.api
            .delete("Pod", "shop", "productpage-v1-6b746f74dc-9stvq")
    );
    eventually("the deleted pod is unknown again", async || {
        w.client_of(newcomer).await == "unknown"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_scale_up_and_down() {
    let w = World::start().await;
    // ROUND_ROBIN over both endpoints.
    assert_eq!(
        w.tally(SLEEP, 6).await,
        counts(&[("reviews-v1", 3), ("reviews-v2", 3)])
    );

    // Scale up: a third replica (on node-b) becomes ready.
    let mut v3 = w
        .api
        .get("Pod", "shop", "reviews-v2-7f6b8c5d9-m8n9p")
        .unwrap();
    v3["metadata"] = json!({
        "name": "reviews-v3-6c9b8d7f5-r4t6y", "namespace": "shop",
        "labels": {"app": "reviews", "version": "v3", "pod-template-hash": "6c9b8d7f5"},
    });
    v3["status"]["podIP"] = json!(backend_ip(3).to_string());
    w.api.apply(v3);
    w.slice_endpoints(vec![
        endpoint(1, "reviews-v1-5c7d8f9b4-h2j4k", "node-a"),
        endpoint(2, "reviews-v2-7f6b8c5d9-m8n9p", "node-b"),
        endpoint(3, "reviews-v3-6c9b8d7f5-r4t6y", "node-b"),
    ]);
    eventually("the new endpoint gets requests", async || {
        w.served_by(SLEEP).await == "reviews-v3"
    })
    .await;
    assert_eq!(
        w.tally(SLEEP, 9).await,
        counts(&[("reviews-v1", 3), ("reviews-v2", 3), ("reviews-v3", 3)])
    );
    let endpoints = w
        .get_text(
            w.proxy.admin_addr,
            &format!(
                "/endpoints?format=json&cluster={}",
                CLUSTER.replace('|', "%7C")
            ),
        )
        .await;
    for n in 1..=3 {
        assert!(endpoints.contains(&format!("127.0.62.{n}:")), "{endpoints}");
    }

    // Scale down to v2 only: v1 and v3 get nothing more.
    w.slice_endpoints(vec![endpoint(2, "reviews-v2-7f6b8c5d9-m8n9p", "node-b")]);
    eventually("only reviews-v2 is left", async || {
        w.tally(SLEEP, 3).await == counts(&[("reviews-v2", 3)])
    })
    .await;
    let (v1, v3) = (w.backends[0].requests(), w.backends[2].requests());
    assert_eq!(w.tally(SLEEP, 8).await, counts(&[("reviews-v2", 8)]));
    assert_eq!(
        (w.backends[0].requests(), w.backends[2].requests()),
        (v1, v3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rules_follow_istio_precedence_as_they_change() {
    let w = World::start().await;
    assert_eq!(w.rule_of(SLEEP, SLEEP_POD).await, "shop/reviews");
    assert_eq!(w.served_by(RATINGS).await, "reviews-v2");

    // A mesh-wide rule in the root namespace: the service's namespace still wins.
    let root_rule = |max_connections: u32| {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "reviews-mesh", "namespace": "istio-system"},
            "spec": {
                "host": "reviews.shop.svc.cluster.local",
                "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": max_connections}}},
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                ],
            },
        })
    };
    w.api.apply(root_rule(11));
    eventually("the root rule is loaded", async || {
        w.config_dump().await["destination_rules"] == 2
    })
    .await;
    assert_eq!(w.rule_of(SLEEP, SLEEP_POD).await, "shop/reviews");

    // The service namespace's rule is deleted while a request is in flight:
    // the root rule takes over for new requests; the slow one completes.
    let addr = w.proxy.outbound_addr;
    let in_flight = tokio::spawn(async move {
        request(
            Proto::Http1,
            addr,
            SLEEP,
            AUTHORITY,
            "/delay/1500",
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(w.api.delete("DestinationRule", "shop", "reviews"));
    eventually("sleep's cluster uses the root rule", async || {
        w.rule_of(SLEEP, SLEEP_POD).await == "istio-system/reviews-mesh"
    })
    .await;
    let c = w.client_cluster(SLEEP, SLEEP_POD, CLUSTER).await;
    assert_eq!(
        c["effective_policy"]["connection_pool"]["max_connections"],
        11
    );
    let slow = in_flight.await.unwrap();
    assert_eq!(
        (slow.status, slow.body_complete),
        (Some(200), true),
        "{slow:?}"
    );
    // The root rule's subsets serve the v2 route.
    assert_eq!(w.served_by(RATINGS).await, "reviews-v2");

    // Changed in place: new requests see the new limit.
    w.api.apply(root_rule(12));
    eventually("the changed root rule is in force", async || {
        let c = w.client_cluster(SLEEP, SLEEP_POD, CLUSTER).await;
        c["effective_policy"]["connection_pool"]["max_connections"] == 12
    })
    .await;

    // A rule in the client's own namespace wins for that client only.
    w.api.apply(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "legacy"},
        "spec": {
            "host": "reviews.shop.svc.cluster.local",
            "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 3}}},
        },
    }));
    eventually("batch uses its namespace's rule", async || {
        w.rule_of(BATCH, BATCH_POD).await == "legacy/reviews"
    })
    .await;
    assert_eq!(
        w.rule_of(SLEEP, SLEEP_POD).await,
        "istio-system/reviews-mesh"
    );

    // No rule defines the subsets any more: the v2 route has no cluster (503 NC).
    assert!(
        w.api
            .delete("DestinationRule", "istio-system", "reviews-mesh")
    );
    eventually("subset v2 is gone", async || {
        w.served_by(RATINGS).await == "status 503"
    })
    .await;
    let (path, out) = w.call(RATINGS, "/nc").await;
    assert_eq!(out.status, Some(503));
    assert_eq!(field(&w.logged(&path).await, "response_flags"), Some("NC"));
    assert_eq!(w.rule_of(SLEEP, SLEEP_POD).await, Value::Null);
    assert_eq!(w.rule_of(BATCH, BATCH_POD).await, "legacy/reviews");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_istio_crds_are_looked_for_again() {
    let started = Instant::now();
    let w = World::start_with(|api| {
        api.set_absent("DestinationRule", true);
        api.set_absent("VirtualService", true);
        // Installed later with a 300 ms route timeout.
        api.modify("VirtualService", "shop", "reviews", |vs| {
            vs["spec"]["http"][1]["timeout"] = json!("300ms");
        });
    })
    .await;
    let dump = w.config_dump().await;
    assert_eq!(
        (
            dump["destination_rules"].clone(),
            dump["virtual_services"].clone()
        ),
        (json!(0), json!(0)),
        "{dump:#}"
    );
    // Istio's default route: no timeout, no subsets.
    let (_, out) = w.call(SLEEP, "/delay/800").await;
    assert_eq!(out.status, Some(200), "{out:?}");
    let t = w.tally(RATINGS, 6).await;
    assert!(t.keys().all(|k| k.starts_with("reviews-v")), "{t:?}");
    // Looked for occasionally, not in a loop.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let rechecks = started.elapsed().as_millis() as usize / 300 + 2;
    let lists = w.api.lists("DestinationRule");
    assert!(
        (1..=rechecks).contains(&lists),
        "{lists} lists of DestinationRules (at most {rechecks} expected)"
    );

    // Istio is installed: the objects take effect.
    w.api.set_absent("DestinationRule", false);
    w.api.set_absent("VirtualService", false);
    eventually("the route timeout is enforced", async || {
        w.call(SLEEP, "/delay/800").await.1.status == Some(504)
    })
    .await;
    assert_eq!(w.tally(RATINGS, 4).await, counts(&[("reviews-v2", 4)]));

    // Uninstalled again: back to the default route.
    w.api.set_absent("VirtualService", true);
    eventually("no VirtualService any more", async || {
        w.call(SLEEP, "/delay/800").await.1.status == Some(200)
    })
    .await;
    assert_eq!(w.metric("nodeway_config_source_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_keeps_serving_then_resumes() {
    let w = World::start().await;
    assert_eq!(w.metric("nodeway_config_source_up").await, 1.0);
    let generation = w.config_dump().await["generation"].clone();

    w.api.stop().await;
    eventually("the source is reported down", async || {
        w.metric("nodeway_config_source_up").await == 0.0
    })
    .await;
    // The last known configuration keeps serving; readiness stays.
    assert_eq!(
        w.tally(SLEEP, 4).await,
        counts(&[("reviews-v1", 2), ("reviews-v2", 2)])
    );
    assert_eq!(w.tally(RATINGS, 2).await, counts(&[("reviews-v2", 2)]));
    let dump = w.config_dump().await;
    assert_eq!(dump["generation"], generation);
    let ready = w.get_text(w.proxy.admin_addr, "/healthz/ready").await;
    assert_eq!(ready.trim(), "LIVE");

    // Changed while the proxy could not watch.
    w.slice_endpoints(vec![endpoint(2, "reviews-v2-7f6b8c5d9-m8n9p", "node-b")]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(w.tally(SLEEP, 2).await.len(), 2, "no change while down");

    w.api.restart().await;
    eventually("the source is reported up again", async || {
        w.metric("nodeway_config_source_up").await == 1.0
    })
    .await;
    eventually("the change made while down arrives", async || {
        w.tally(SLEEP, 3).await == counts(&[("reviews-v2", 3)])
    })
    .await;
    // Resumed from the last resourceVersion: no second list was needed.
    assert_eq!(w.api.lists("EndpointSlice"), 1, "{:?}", w.api.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_resource_version_makes_the_proxy_list_again() {
    let w = World::start().await;
    assert_eq!(w.api.lists("EndpointSlice"), 1);
    // Watches are cut and the change is compacted away before they resume:
    // only a new list can show it.
    w.api.expire_history(|s| {
        s.modify("EndpointSlice", "shop", SLICE, |slice| {
            slice["endpoints"] = json!([endpoint(1, "reviews-v1-5c7d8f9b4-h2j4k", "node-a")]);
        });
    });
    eventually("the relisted slice is in force", async || {
        w.tally(SLEEP, 3).await == counts(&[("reviews-v1", 3)])
    })
    .await;
    let seen = w.api.seen();
    assert!(
        seen.iter()
            .any(|s| s.verb == "watch" && s.kind == "EndpointSlice" && s.expired),
        "no watch got 410 Gone: {seen:?}"
    );
    assert!(w.api.lists("EndpointSlice") >= 2, "{seen:?}");
    assert_eq!(w.metric("nodeway_config_source_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_istio_object_is_skipped_not_the_whole_configuration() {
    let w = World::start().await;
    w.api.apply(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "ratings", "namespace": "shop"},
        "spec": {"host": "ratings", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": "many"}}}},
    }));
    w.api.apply(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "ratings", "namespace": "shop"},
        "spec": {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "ratings"}}], "timeout": "soon"}]},
    }));
    let expected = [
        "kubernetes: document 0 (DestinationRule shop/ratings): spec.trafficPolicy.connectionPool.tcp.maxConnections: invalid type",
        "kubernetes: document 0 (VirtualService shop/ratings): spec.http[0].timeout: invalid duration",
    ];
    eventually("both problems are reported", async || {
        let dump = w.config_dump().await;
        let error = dump["last_reload_error"].as_str().unwrap_or_default();
        expected.iter().all(|e| error.contains(e))
    })
    .await;
    assert_eq!(w.metric("nodeway_config_last_reload_success").await, 0.0);
    let dump = w.config_dump().await;
    assert_eq!(dump["destination_rules"], 1, "{dump:#}");
    assert_eq!(dump["virtual_services"], 1, "{dump:#}");
    // Everything else is in force and still follows changes.
    assert_eq!(w.tally(RATINGS, 2).await, counts(&[("reviews-v2", 2)]));
    w.slice_endpoints(vec![endpoint(1, "reviews-v1-5c7d8f9b4-h2j4k", "node-a")]);
    eventually("the slice change is applied", async || {
        w.tally(SLEEP, 2).await == counts(&[("reviews-v1", 2)])
    })
    .await;

    assert!(w.api.delete("DestinationRule", "shop", "ratings"));
    assert!(w.api.delete("VirtualService", "shop", "ratings"));
    eventually("no problem left", async || {
        w.metric("nodeway_config_last_reload_success").await == 1.0
    })
    .await;
    assert_eq!(w.config_dump().await["last_reload_error"], Value::Null);
}

/// Objects of `--config` are added to the cluster's and follow file edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_adds_to_the_cluster_objects() {
    let rule = |max: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: from-file, namespace: istio-system}}\n\
             spec:\n  host: reviews.shop.svc.cluster.local\n  \
             trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {max}}}}}}}\n"
        )
    };
    let w = World::start_full(|_| {}, Some(&rule(5))).await;
    assert_eq!(w.config_dump().await["destination_rules"], 2);
    assert_eq!(w.rule_of(SLEEP, SLEEP_POD).await, "shop/reviews");
    assert!(w.api.delete("DestinationRule", "shop", "reviews"));
    eventually("the file's root rule applies", async || {
        w.rule_of(SLEEP, SLEEP_POD).await == "istio-system/from-file"
    })
    .await;
    let path = w.dir.0.join("extra.yaml");
    std::fs::write(&path, rule(6)).unwrap();
    eventually("the file edit applies", async || {
        let c = w.client_cluster(SLEEP, SLEEP_POD, CLUSTER).await;
        c["effective_policy"]["connection_pool"]["max_connections"] == 6
    })
    .await;
    // A broken file document is skipped like a broken cluster object.
    std::fs::write(&path, format!("{}---\nkind: [\n", rule(6))).unwrap();
    eventually("the file's problem is reported", async || {
        w.metric("nodeway_config_last_reload_success").await == 0.0
    })
    .await;
    assert_eq!(w.rule_of(SLEEP, SLEEP_POD).await, "istio-system/from-file");
    assert_eq!(w.served_by(SLEEP).await.get(..8), Some("reviews-"));
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    nodeway_tests::refused_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_in_kubernetes_mode() {
    use std::process::{Command, Stdio};

    let bin = common::nodeway_bin();
    let refused = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("NODEWAY_KUBE_API")
            .output()
            .expect("nodeway runs");
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["run", "--kubernetes", "--kube-api", "http://127.0.0.1:9"]);
    assert!(err.contains("--kubernetes needs --node"), "{err}");
    let err = refused(&["run"]);
    assert!(err.contains("--config"), "{err}");

    let (api, _backends) = cluster().await;
    let dir = TempDir::new("kube-bin");
    let (outbound, metrics) = (free_addr(), free_addr());
    let stderr = std::fs::File::create(dir.0.join("stderr")).unwrap();
    let mut proc = Proc(
        Command::new(&bin)
            .args([
                "run",
                "--kubernetes",
                "--kube-api",
                &api.url(),
                "--node",
                "node-a",
            ])
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &free_addr().to_string()])
            .args(["--access-log", "off"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("nodeway starts"),
    );
    let log = || std::fs::read_to_string(dir.0.join("stderr")).unwrap_or_default();
    let start = Instant::now();
    while std::net::TcpStream::connect(outbound).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nodeway did not start listening:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The v2 route needs the VirtualService, the DestinationRule's subsets
    // and the labels of a pod on another node.
    let out = request(
        Proto::Http1,
        outbound,
        RATINGS,
        AUTHORITY,
        "/",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(describe(&out), "reviews-v2", "{out:?}\n{}", log());
    let metrics = request(
        Proto::Http1,
        metrics,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "nodeway",
        "/metrics",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("\nnodeway_config_source_up 1\n"), "{text}");
    assert!(text.contains("\nnodeway_enrolled_workloads 3\n"), "{text}");

    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}\n{}", log());
}
