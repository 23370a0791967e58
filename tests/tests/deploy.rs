//! `deploy/`: the Kubernetes manifests, the Helm chart, the examples and the
//! Dockerfile, checked offline (no cluster, no Helm, no Docker engine here).
//!
//! - `kubectl kustomize deploy/kubernetes` renders the manifests, and
//!   `kubernetes-validate --strict` (PyPI, 1.37.0) checks every object against
//!   the Kubernetes OpenAPI schemas of several versions. Only custom resources
//!   (PodMonitor, Istio's kinds) may lack a schema; they are checked by hand or
//!   by `nodeway validate`.
//! - What a schema cannot see (ports that must agree, capabilities, the cgroup
//!   mount the `--cgroup` flag points at, RBAC verbs) is checked on the
//!   rendered objects, and the real `nodeway` parses the container's
//!   arguments (clap checks every flag and value before `--help` stops it).
//! - Helm is not installable here, so the chart is rendered by a small Go
//!   template interpreter below that knows only what the chart uses (`if`/
//!   `else`/`end`, `define`/`include`, `.Values`/`.Release`/`.Chart` fields,
//!   `quote`, `int64`, `toYaml`, `nindent`, `indent`; comments and `{{-`/`-}}`
//!   trimming as Go does) and fails on anything else. Its `toYaml` writes JSON
//!   (valid YAML with the same meaning, not Helm's text). The rendered chart
//!   must equal the plain manifests object for object, apart from Helm's own
//!   labels; every values.yaml key must be used and every `.Values` reference
//!   defined; values.yaml must satisfy values.schema.json.
//! - Each `deploy/examples/*.yaml` must pass `nodeway validate` without
//!   warnings, and its core objects the Kubernetes schemas.
//! - The Dockerfile is only checked for its structure.
//!
//! The tools come from `cargo xtask setup` (Debian's `kubernetes-client` when
//! there is no `kubectl`, `pip install kubernetes-validate==1.37.0`); without
//! them these tests fail, they are never skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{TempDir, nodeway_bin};
use serde_json::{Value, json};

/// Kubernetes versions the manifests are validated against: the oldest they
/// support (`appArmorProfile` is a 1.30 field) and newer ones.
const K8S_VERSIONS: [&str; 3] = ["1.30.0", "1.33.0", "1.37.0"];
const VALIDATOR_VERSION: &str = "1.37.0";
const SETUP_HINT: &str = "`cargo xtask setup` installs it (Debian's kubernetes-client for kubectl, \
     `python3 -m pip install kubernetes-validate==1.37.0` for kubernetes-validate and PyYAML)";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs a tool, feeding `stdin`; panics with the setup hint if it is missing.
fn tool(program: &str, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{program}` ({e}): {SETUP_HINT}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout_of(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Multi-document YAML → JSON values, parsed by PyYAML (YAML 1.1, like the
/// Kubernetes API machinery: an unquoted `off` is `false`). Empty documents
/// are dropped.
fn yaml_docs(text: &str) -> Vec<Value> {
    let script = "import sys, json, yaml\n\
                  docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
                  json.dump(docs, sys.stdout)\n";
    let out = tool("python3", &["-c", script], text);
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No module named") {
        panic!(
            "python3 has no PyYAML: {SETUP_HINT}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json = stdout_of(&out, "parsing YAML with python3");
    match serde_json::from_str(&json).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}

fn yaml_doc(text: &str) -> Value {
    let mut docs = yaml_docs(text);
    assert_eq!(docs.len(), 1, "expected one YAML document");
    docs.pop().unwrap()
}

fn kustomize() -> String {
    let out = tool("kubectl", &["kustomize", "deploy/kubernetes"], "");
    stdout_of(&out, "kubectl kustomize deploy/kubernetes")
}

fn kind_name(o: &Value) -> (String, String) {
    (
        o["kind"].as_str().unwrap_or("?").to_string(),
        o["metadata"]["name"].as_str().unwrap_or("?").to_string(),
    )
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind_name(o) == (kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Runs `kubernetes-validate --strict` on `text` for every version in
/// [`K8S_VERSIONS`] and checks that every object whose API group is not in
/// `custom_groups` was validated ("passed") for each version, and that only
/// objects of `custom_groups` lacked a schema. Returns the kinds without one.
fn validate_schemas(text: &str, custom_groups: &[&str]) -> BTreeSet<String> {
    let version = tool("kubernetes-validate", &["--version"], "");
    assert_eq!(
        stdout_of(&version, "kubernetes-validate --version").trim(),
        VALIDATOR_VERSION,
        "{SETUP_HINT}"
    );
    let dir = TempDir::new("deploy");
    let file = dir.0.join("objects.yaml");
    std::fs::write(&file, text).unwrap();
    let mut args = vec!["--strict"];
    for v in K8S_VERSIONS {
        args.extend(["-k", v]);
    }
    let file_arg = file.to_str().unwrap();
    args.push(file_arg);
    let out = tool("kubernetes-validate", &args, "");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !report.contains("ERROR") && !report.contains("FATAL"),
        "kubernetes-validate rejected the objects:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = yaml_docs(text);
    assert!(!objects.is_empty());
    let mut without_schema = BTreeSet::new();
    for o in &objects {
        let api_version = o["apiVersion"].as_str().unwrap();
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        let (kind, name) = kind_name(o);
        if custom_groups.contains(&group) {
            let warning =
                format!("Couldn't find schema for kind {kind} with api version {api_version}");
            assert!(
                report.contains(&warning),
                "{kind} ({api_version}) was expected to have no schema; it is now validated \
                 or reported differently:\n{report}"
            );
            without_schema.insert(kind);
            continue;
        }
        for v in K8S_VERSIONS {
            let minor = v.rsplit_once('.').unwrap().0;
            let passed = format!(
                "passed for resource {}/{name} against version {minor}",
                kind.to_lowercase()
            );
            assert!(
                report.contains(&passed),
                "{kind} {name} was not validated against {minor}:\n{report}"
            );
        }
    }
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            without_schema
                .iter()
                .any(|k| line.contains(&format!("kind {k} "))),
            "unexpected warning: {line}"
        );
    }
    without_schema
}

// ---------------------------------------------------------------- manifests

#[test]
fn kustomize_renders_objects_that_validate_against_kubernetes_schemas() {
    let text = kustomize();
    let objects = yaml_docs(&text);
    let found: BTreeSet<_> = objects.iter().map(kind_name).collect();
    let expected: BTreeSet<_> = [
        ("Namespace", "nodeway-system"),
        ("ServiceAccount", "nodeway"),
        ("ClusterRole", "nodeway"),
        ("ClusterRoleBinding", "nodeway"),
        ("DaemonSet", "nodeway"),
        ("Service", "nodeway-metrics"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(found, expected);
    let no_schema = validate_schemas(&text, &[]);
    assert!(no_schema.is_empty());
}

#[test]
fn podmonitor_has_no_schema_here_so_its_fields_are_checked_by_hand() {
    let text = read("deploy/kubernetes/podmonitor.yaml");
    let no_schema = validate_schemas(&text, &["monitoring.coreos.com"]);
    assert_eq!(no_schema, BTreeSet::from(["PodMonitor".to_string()]));
    let kustomization = yaml_doc(&read("deploy/kubernetes/kustomization.yaml"));
    assert!(
        !kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "podmonitor.yaml"),
        "the PodMonitor needs the Prometheus Operator's CRD: keep it out of the default kustomization"
    );

    let pm = yaml_doc(&text);
    let objects = yaml_docs(&kustomize());
    let ds = find(&objects, "DaemonSet", "nodeway");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let selector = pm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "PodMonitor selector {k}");
    }
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let port_name = endpoints[0]["port"].as_str().unwrap();
    assert_eq!(container_port(ds, port_name), 15020);
    assert_eq!(endpoints[0]["path"], "/metrics");
    let known: BTreeSet<&str> = ["port", "path", "interval", "relabelings"].into();
    for key in endpoints[0].as_object().unwrap().keys() {
        assert!(
            known.contains(key.as_str()),
            "unexpected endpoint field {key}"
        );
    }
}

fn container(ds: &Value) -> &Value {
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn container_port(ds: &Value, name: &str) -> u64 {
    container(ds)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

fn args(ds: &Value) -> Vec<String> {
    container(ds)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap_or_else(|| panic!("argument {a} is not a string"))
                .to_string()
        })
        .collect()
}

/// The value after `--flag` in the DaemonSet's args.
fn flag(ds: &Value, name: &str) -> String {
    let args = args(ds);
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("no {name} in {args:?}"));
    args[i + 1].clone()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// `nodeway` parses the DaemonSet's arguments: clap checks every flag and
/// value it meets before `--help`, which then stops it.
fn cli_accepts(args: &[String]) {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-a"))
        .chain(["--help".to_string()])
        .collect();
    let out = Command::new(nodeway_bin()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "nodeway rejects the DaemonSet's arguments {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn daemonset_settings_agree_with_each_other_and_with_nodeway() {
    let objects = yaml_docs(&kustomize());
    let ds = find(&objects, "DaemonSet", "nodeway");
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(ds);

    assert_eq!(args(ds)[..2], ["run", "--kubernetes"]);
    // Its own network namespace: old and new pods of an upgrade run side
    // by side without colliding on ports.
    assert_ne!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_ne!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &json!({"operator": "Exists"}))
    );
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(
        (
            &strategy["rollingUpdate"]["maxSurge"],
            &strategy["rollingUpdate"]["maxUnavailable"]
        ),
        (&json!(1), &json!(0)),
        "the new proxy starts before the old one stops"
    );

    // Node name from the downward API.
    assert_eq!(flag(ds, "--node"), "$(NODE_NAME)");
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    // The overload manager's memory limit is the container's.
    assert!(
        env.iter()
            .any(|e| e["name"] == "NODEWAY_OVERLOAD_MEMORY_LIMIT"
                && e["valueFrom"]["resourceFieldRef"]["resource"] == "limits.memory"
                && e["valueFrom"]["resourceFieldRef"]["containerName"] == c["name"]),
        "{env:?}"
    );
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(flag(ds, "--redirect"), "ebpf");
    assert_eq!(flag(ds, "--sockmap"), "off");

    // Ports: flags, container ports, probes, scrape annotations, Service.
    let metrics = port_of(&flag(ds, "--metrics-addr"));
    let ready = port_of(&flag(ds, "--readiness-addr"));
    assert_eq!((metrics, ready), (15020, 15021));
    assert!(flag(ds, "--admin-addr").starts_with("127.0.0.1:"));
    assert_eq!(container_port(ds, "http-metrics"), metrics);
    assert_eq!(container_port(ds, "http-health"), ready);
    for (probe, path) in [
        ("readinessProbe", "/healthz/ready"),
        ("livenessProbe", "/healthz/live"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], ready, "{probe}");
    }
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let svc = find(&objects, "Service", "nodeway-metrics");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], metrics);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http-metrics");

    // Selectors.
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    for selector in [
        &ds["spec"]["selector"]["matchLabels"],
        &svc["spec"]["selector"],
    ] {
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(pod_labels.get(k), Some(v), "selector {k}");
        }
    }
    assert!(
        !pod_labels.contains_key("nodeway.io/redirect"),
        "the proxy's own pods are never enrolled"
    );

    // Draining: the grace period covers --drain-timeout, the 1 s streams get
    // to close after it and the 2 s log flush, with margin.
    let drain = flag(ds, "--drain-timeout");
    let drain: u64 = drain.strip_suffix('s').unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace >= drain + 5, "grace {grace}s vs drain {drain}s");

    // Privileges: named capabilities as root, not privileged.
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let added: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"])
    );
    // The API server rejects allowPrivilegeEscalation: false with SYS_ADMIN.
    assert_ne!(sc["allowPrivilegeEscalation"], false);
    let requests = &c["resources"]["requests"];
    let limits = &c["resources"]["limits"];
    assert!(requests["cpu"].is_string() && requests["memory"].is_string());
    assert!(limits["cpu"].is_string() && limits["memory"].is_string());

    // --cgroup names the host's cgroup v2 root, mounted from a hostPath.
    let cgroup = flag(ds, "--cgroup");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == cgroup.as_str())
        .unwrap_or_else(|| panic!("--cgroup {cgroup} is not a volume mount"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/cgroup");
    // --bpf-pin-dir is on the host's bpffs, writable, so that the next
    // Nodeway on the node finds the maps.
    let pin_dir = flag(ds, "--bpf-pin-dir");
    let mount_of = |host: &str| {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("no hostPath volume {host}"));
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{host} is not mounted"))
            .clone()
    };
    let bpffs = mount_of("/sys/fs/bpf");
    assert!(pin_dir.starts_with(&format!("{}/", bpffs["mountPath"].as_str().unwrap())));
    assert_ne!(bpffs["readOnly"], true);
    // tcp_migrate_req is written through the host's /proc/sys/net.
    assert_eq!(mount_of("/proc/sys/net")["mountPath"], "/host/proc/sys/net");

    cli_accepts(&args(ds));
}

#[test]
fn rbac_is_read_only_and_bound_to_the_daemonsets_account() {
    let objects = yaml_docs(&kustomize());
    let ds = find(&objects, "DaemonSet", "nodeway");
    let namespace = ds["metadata"]["namespace"].as_str().unwrap();
    assert_eq!(namespace, "nodeway-system");
    let account = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    find(&objects, "ServiceAccount", account);

    let role = find(&objects, "ClusterRole", "nodeway");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs: BTreeSet<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule}");
        assert!(rule.get("resourceNames").is_none());
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                granted.insert(format!(
                    "{}/{}",
                    group.as_str().unwrap(),
                    resource.as_str().unwrap()
                ));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "/namespaces",
        "/nodes",
        "/pods",
        "/services",
        "discovery.k8s.io/endpointslices",
        "networking.istio.io/destinationrules",
        "networking.istio.io/virtualservices",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(granted, expected);

    let binding = find(&objects, "ClusterRoleBinding", "nodeway");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "nodeway");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": account, "namespace": namespace}])
    );
    let ns = find(&objects, "Namespace", namespace);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

// ----------------------------------------------------------------- examples

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_passes_nodeway_validate_without_warnings() {
    let files = examples();
    assert!(files.len() >= 5, "{files:?}");
    for file in &files {
        let out = Command::new(nodeway_bin())
            .args(["validate", "--config"])
            .arg(file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && out.stdout == b"ok\n",
            "{}: {}{stderr}",
            file.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.trim().is_empty(),
            "{}: warnings:\n{stderr}",
            file.display()
        );
    }
}

#[test]
fn examples_core_objects_validate_against_kubernetes_schemas() {
    for file in examples() {
        let text = std::fs::read_to_string(&file).unwrap();
        validate_schemas(&text, &["networking.istio.io"]);
    }
}

#[test]
fn examples_show_the_documented_behaviours() {
    let opt_in = yaml_docs(&read("deploy/examples/namespace-opt-in.yaml"));
    assert!(
        opt_in.iter().any(|o| o["kind"] == "Namespace"
            && o["metadata"]["labels"]["nodeway.io/redirect"] == "enabled")
    );
    assert!(opt_in.iter().any(
        |o| o["kind"] == "Pod" && o["metadata"]["labels"]["nodeway.io/redirect"] == "disabled"
    ));

    let spec_of = |file: &str, kind: &str| -> Value {
        let docs = yaml_docs(&read(&format!("deploy/examples/{file}")));
        let o = docs
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("{file}: no {kind}"));
        // The Service it is about is in the same file.
        let host = o["spec"]["host"]
            .as_str()
            .or_else(|| o["spec"]["hosts"][0].as_str())
            .unwrap();
        let service = host.split('.').next().unwrap();
        assert!(
            docs.iter()
                .any(|d| d["kind"] == "Service" && d["metadata"]["name"] == service),
            "{file}: no Service {service}"
        );
        o["spec"].clone()
    };
    let pool = spec_of("destinationrule-connection-pool.yaml", "DestinationRule");
    let tp = &pool["trafficPolicy"];
    assert!(tp["connectionPool"]["tcp"]["maxConnections"].is_u64());
    assert!(tp["connectionPool"]["http"]["http1MaxPendingRequests"].is_u64());
    assert!(tp["outlierDetection"]["consecutive5xxErrors"].is_u64());

    let locality = spec_of("destinationrule-locality-failover.yaml", "DestinationRule");
    let tp = &locality["trafficPolicy"];
    assert!(
        !tp["loadBalancer"]["localityLbSetting"]["failover"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        tp["outlierDetection"].is_object(),
        "locality priorities need outlier detection"
    );

    let vs = spec_of("virtualservice-retries-timeouts.yaml", "VirtualService");
    let routes = vs["http"].as_array().unwrap();
    assert!(routes.iter().any(|r| r["timeout"].is_string()
        && r["retries"]["perTryTimeout"].is_string()
        && r["retries"]["retryOn"].is_string()));
}

// --------------------------------------------------------------------- Helm

const CHART: &str = "deploy/helm/nodeway";

fn chart_files(ext: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(root().join(CHART).join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(ext))
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn values() -> Value {
    yaml_doc(&read(&format!("{CHART}/values.yaml")))
}

/// Renders the chart as `helm template nodeway -n nodeway-system` would, with
/// values.yaml overridden by `set` (dotted paths), and parses the result.
fn helm_template(set: &[(&str, Value)]) -> Vec<Value> {
    let mut values = values();
    for (path, v) in set {
        let mut at = &mut values;
        for key in path.split('.') {
            at = &mut at[key];
        }
        *at = v.clone();
    }
    gotemplate::numbers_as_helm_reads_them(&mut values);
    let chart = yaml_doc(&read(&format!("{CHART}/Chart.yaml")));
    let ctx = json!({
        "Values": values,
        "Release": {"Name": "nodeway", "Namespace": "nodeway-system", "Service": "Helm"},
        "Chart": {
            "Name": chart["name"],
            "Version": chart["version"],
            "AppVersion": chart["appVersion"],
        },
    });
    let mut tpl = gotemplate::Templates::default();
    let mut sources = chart_files(".tpl");
    sources.extend(chart_files(".yaml"));
    for (name, text) in &sources {
        tpl.parse(name, text);
    }
    let mut out = String::new();
    for (name, _) in chart_files(".yaml") {
        out.push_str(&format!("---\n# Source: nodeway/templates/{name}\n"));
        out.push_str(&tpl.render(&name, &ctx));
        out.push('\n');
    }
    // NOTES.txt renders too (Helm prints it after installing).
    let notes = read(&format!("{CHART}/templates/NOTES.txt"));
    tpl.parse("NOTES.txt", &notes);
    let rendered_notes = tpl.render("NOTES.txt", &ctx);
    assert!(rendered_notes.contains("nodeway-system"));
    yaml_docs(&out)
}

/// Helm's own labels, which the plain manifests do not carry.
fn without_helm_labels(mut o: Value) -> Value {
    if let Some(labels) = o["metadata"]
        .get_mut("labels")
        .and_then(|l| l.as_object_mut())
    {
        labels.remove("helm.sh/chart");
        labels.remove("app.kubernetes.io/managed-by");
    }
    o
}

fn by_kind_name(objects: Vec<Value>) -> BTreeMap<(String, String), Value> {
    let mut map = BTreeMap::new();
    for o in objects {
        let key = kind_name(&o);
        assert!(map.insert(key.clone(), o).is_none(), "{key:?} twice");
    }
    map
}

/// Paths where `a` (plain) and `b` (Helm) differ, with both values.
fn json_diff(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                json_diff(va, vb, format!("{path}.{k}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                json_diff(va, vb, format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("  {path}: plain {a}, helm {b}")),
        _ => {}
    }
}

#[test]
fn helm_chart_renders_the_same_objects_as_the_plain_manifests() {
    let mut plain = yaml_docs(&kustomize());
    plain.extend(yaml_docs(&read("deploy/kubernetes/podmonitor.yaml")));
    let plain = by_kind_name(plain);

    let rendered = helm_template(&[
        ("namespace.create", json!(true)),
        ("podMonitor.enabled", json!(true)),
    ]);
    for o in &rendered {
        let labels = &o["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{o}");
        assert_eq!(labels["helm.sh/chart"], "nodeway-0.1.0", "{o}");
    }
    let helm = by_kind_name(rendered.into_iter().map(without_helm_labels).collect());
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        helm.keys().collect::<Vec<_>>(),
        "objects of deploy/kubernetes vs the chart"
    );
    for (key, p) in &plain {
        let mut differences = Vec::new();
        json_diff(p, &helm[key], String::new(), &mut differences);
        assert!(
            differences.is_empty(),
            "{key:?} differs between deploy/kubernetes and the chart:\n{}",
            differences.join("\n")
        );
    }

    // Default values: no Namespace (helm's --create-namespace), no PodMonitor.
    let defaults = helm_template(&[]);
    let kinds: BTreeSet<_> = defaults.iter().map(|o| kind_name(o).0).collect();
    assert!(!kinds.contains("Namespace") && !kinds.contains("PodMonitor"));
    assert_eq!(defaults.len(), plain.len() - 2);
    let text: String = defaults
        .iter()
        .map(|o| format!("---\n{o}\n"))
        .collect::<String>();
    assert!(validate_schemas(&text, &[]).is_empty());
}

#[test]
fn helm_values_reach_the_daemonset() {
    let objects = helm_template(&[
        ("sockmap", json!(true)),
        ("redirect", json!("off")),
        ("logLevel", json!("nodeway=debug,warn")),
        ("maxUpstreamConnections", json!(2_000_000)),
        ("maxClientShare", json!(25)),
        ("ports.metrics", json!(19020)),
        ("image.repository", json!("registry.example/nodeway")),
        ("resources.limits.memory", json!("1Gi")),
    ]);
    let ds = find(&objects, "DaemonSet", "nodeway");
    assert_eq!(flag(ds, "--sockmap"), "on");
    assert_eq!(flag(ds, "--redirect"), "off");
    assert_eq!(flag(ds, "--log-level"), "nodeway=debug,warn");
    assert_eq!(flag(ds, "--max-upstream-connections"), "2000000");
    assert_eq!(flag(ds, "--max-client-share"), "25");
    assert_eq!(flag(ds, "--metrics-addr"), "0.0.0.0:19020");
    assert_eq!(container_port(ds, "http-metrics"), 19020);
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        "19020"
    );
    assert_eq!(container(ds)["image"], "registry.example/nodeway:0.1.0");
    assert_eq!(container(ds)["resources"]["limits"]["memory"], "1Gi");
    let svc = find(&objects, "Service", "nodeway-metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 19020);
    cli_accepts(&args(ds));
}

/// `.Values.a.b` references in the chart's templates.
fn values_references() -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut texts: Vec<String> = chart_files(".yaml").into_iter().map(|f| f.1).collect();
    texts.extend(chart_files(".tpl").into_iter().map(|f| f.1));
    texts.push(read(&format!("{CHART}/templates/NOTES.txt")));
    for text in texts {
        for (i, _) in text.match_indices(".Values.") {
            let rest = &text[i + ".Values.".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            refs.insert(rest[..end].trim_end_matches('.').to_string());
        }
    }
    refs
}

fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_paths(v, &p, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_helm_value_is_used_and_every_reference_defined() {
    let values = values();
    let refs = values_references();
    let mut leaves = Vec::new();
    leaf_paths(&values, "", &mut leaves);
    for leaf in &leaves {
        assert!(
            refs.iter()
                .any(|r| leaf == r || leaf.starts_with(&format!("{r}."))),
            "values.yaml key {leaf} is used by no template"
        );
    }
    for r in &refs {
        let mut at = &values;
        for key in r.split('.') {
            at = at
                .get(key)
                .unwrap_or_else(|| panic!("templates use .Values.{r}, values.yaml lacks it"));
        }
    }
}

#[test]
fn helm_values_satisfy_the_chart_schema() {
    let check = |values: &Value| -> bool {
        let script = "import sys, json, jsonschema\n\
                      schema = json.load(open(sys.argv[1]))\n\
                      try:\n    jsonschema.validate(json.load(sys.stdin), schema)\n\
                      except jsonschema.ValidationError as e:\n    print(e.message); sys.exit(3)\n";
        let schema = format!("{CHART}/values.schema.json");
        let out = tool("python3", &["-c", script, &schema], &values.to_string());
        match out.status.code() {
            Some(0) => true,
            Some(3) => false,
            _ => panic!(
                "jsonschema (comes with kubernetes-validate: {SETUP_HINT}): {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    let values = values();
    assert!(
        check(&values),
        "values.yaml does not satisfy values.schema.json"
    );
    for (path, bad) in [
        ("redirect", json!(false)), // `redirect: off` unquoted
        ("sockmap", json!("on")),
        ("maxClientShare", json!(101)),
    ] {
        let mut v = values.clone();
        v[path] = bad.clone();
        assert!(!check(&v), "schema accepted {path}: {bad}");
    }
}

#[test]
fn versions_agree_across_crate_chart_and_images() {
    let crate_version = read("proxy/Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let chart = yaml_doc(&read(&format!("{CHART}/Chart.yaml")));
    assert_eq!(chart["appVersion"], crate_version.as_str());
    assert_eq!(values()["image"]["tag"], crate_version.as_str());
    let kustomization = yaml_doc(&read("deploy/kubernetes/kustomization.yaml"));
    assert_eq!(kustomization["images"][0]["newTag"], crate_version.as_str());
    let objects = yaml_docs(&kustomize());
    let ds = find(&objects, "DaemonSet", "nodeway");
    assert_eq!(container(ds)["image"], format!("nodeway:{crate_version}"));
}

// --------------------------------------------------------------- Dockerfile

#[test]
fn dockerfile_is_multi_stage_with_pinned_bases_and_the_whole_workspace() {
    let text = read("deploy/Dockerfile");
    let froms: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    for from in &froms {
        let image = from.split_whitespace().next().unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t);
        assert!(
            tag.is_some_and(|t| t != "latest" && !t.contains('/')),
            "base image without a fixed tag: {image}"
        );
    }
    assert!(froms[0].starts_with("rust:") && froms[0].contains("bookworm"));
    assert!(
        froms
            .last()
            .unwrap()
            .starts_with("gcr.io/distroless/cc-debian12")
    );
    assert!(text.contains("cargo build --release --locked -p nodeway"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/nodeway\"]"));

    // Cargo needs every workspace member to load the workspace.
    let manifest = read("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .unwrap();
    for member in members.trim_matches(['[', ']']).split(',') {
        let dir = member.trim().trim_matches('"').split('/').next().unwrap();
        assert!(
            text.contains(&format!("COPY {dir} {dir}")),
            "the Dockerfile does not copy workspace member {dir}"
        );
    }
    // The same eBPF toolchain as `cargo xtask setup`.
    let xtask = read("xtask/src/main.rs");
    let linker = xtask
        .split("\"bpf-linker\", \"--version\", \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("bpf-linker version in xtask");
    assert!(text.contains(&format!("bpf-linker --version {linker} ")));
    assert!(text.contains("llvm-22-dev libpolly-22-dev"));
    assert!(root().join("deploy/Dockerfile.dockerignore").exists());
}

// ----------------------------------------------------- Go template subset

/// The part of Go's text/template (and Helm's functions) the chart uses.
/// Anything else is a test failure, so the chart cannot drift into
/// constructs this check would get wrong.
mod gotemplate {
    use super::Value;
    use std::collections::HashMap;

    /// Helm reads every number in values.yaml as a float64.
    pub fn numbers_as_helm_reads_them(v: &mut Value) {
        match v {
            Value::Number(n) => {
                *v = serde_json::Number::from_f64(n.as_f64().unwrap())
                    .unwrap()
                    .into()
            }
            Value::Array(a) => a.iter_mut().for_each(numbers_as_helm_reads_them),
            Value::Object(o) => o.values_mut().for_each(numbers_as_helm_reads_them),
            _ => {}
        }
    }

    /// And writes integral floats as integers in `toYaml`.
    fn integral_floats_as_integers(v: &mut Value) {
        match v {
            Value::Number(n) => {
                let f = n.as_f64().unwrap();
                if f.fract() == 0.0 && f.abs() < 9e15 {
                    *v = (f as i64).into();
                }
            }
            Value::Array(a) => a.iter_mut().for_each(integral_floats_as_integers),
            Value::Object(o) => o.values_mut().for_each(integral_floats_as_integers),
            _ => {}
        }
    }

    #[derive(Debug, Clone)]
    enum Node {
        Text(String),
        Action(String),
        If(String, Vec<Node>, Vec<Node>),
    }

    #[derive(Default)]
    pub struct Templates {
        files: HashMap<String, Vec<Node>>,
        defines: HashMap<String, Vec<Node>>,
    }

    enum Token {
        Text(String),
        Action(String),
    }

    fn tokenize(src: &str) -> Vec<Token> {
        let mut tokens = Vec::new();
        let mut rest = src;
        let mut trim_next = false;
        loop {
            let Some(start) = rest.find("{{") else {
                let mut text = rest.to_string();
                if trim_next {
                    text = text.trim_start().to_string();
                }
                tokens.push(Token::Text(text));
                return tokens;
            };
            let mut text = rest[..start].to_string();
            if trim_next {
                text = text.trim_start().to_string();
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").expect("unclosed {{");
            let mut inner = &after[..end];
            if let Some(s) = inner.strip_prefix("- ") {
                text = text.trim_end().to_string();
                inner = s;
            }
            trim_next = false;
            if let Some(s) = inner.strip_suffix(" -") {
                trim_next = true;
                inner = s;
            }
            tokens.push(Token::Text(text));
            tokens.push(Token::Action(inner.trim().to_string()));
            rest = &after[end + 2..];
        }
    }

    /// Parses until `end`/`else` (returned) or the end of the tokens.
    fn parse_list(
        tokens: &mut std::iter::Peekable<std::vec::IntoIter<Token>>,
        defines: &mut HashMap<String, Vec<Node>>,
    ) -> (Vec<Node>, Option<String>) {
        let mut nodes = Vec::new();
        while let Some(token) = tokens.next() {
            match token {
                Token::Text(t) => nodes.push(Node::Text(t)),
                Token::Action(a) if a.starts_with("/*") => {
                    assert!(a.ends_with("*/"), "comment {a}");
                }
                Token::Action(a) if a == "end" || a == "else" => return (nodes, Some(a)),
                Token::Action(a) => {
                    if let Some(cond) = a.strip_prefix("if ") {
                        let (then, stop) = parse_list(tokens, defines);
                        let otherwise = if stop.as_deref() == Some("else") {
                            let (otherwise, stop) = parse_list(tokens, defines);
                            assert_eq!(stop.as_deref(), Some("end"), "if without end");
                            otherwise
                        } else {
                            assert_eq!(stop.as_deref(), Some("end"), "if without end");
                            Vec::new()
                        };
                        nodes.push(Node::If(cond.to_string(), then, otherwise));
                    } else if let Some(name) = a.strip_prefix("define ") {
                        let (body, stop) = parse_list(tokens, defines);
                        assert_eq!(stop.as_deref(), Some("end"), "define without end");
                        defines.insert(unquote(name.trim()), body);
                    } else {
                        let keyword = a.split_whitespace().next().unwrap_or("");
                        assert!(
                            !["range", "with", "block", "template"].contains(&keyword),
                            "`{a}` is not supported by this check's renderer"
                        );
                        nodes.push(Node::Action(a));
                    }
                }
            }
        }
        (nodes, None)
    }

    fn unquote(s: &str) -> String {
        serde_json::from_str::<String>(s).unwrap_or_else(|_| panic!("not a string literal: {s}"))
    }

    impl Templates {
        pub fn parse(&mut self, name: &str, src: &str) {
            let mut tokens = tokenize(src).into_iter().peekable();
            let (nodes, stop) = parse_list(&mut tokens, &mut self.defines);
            assert!(stop.is_none(), "{name}: unexpected {stop:?}");
            self.files.insert(name.to_string(), nodes);
        }

        pub fn render(&self, name: &str, ctx: &Value) -> String {
            let mut out = String::new();
            self.render_nodes(&self.files[name], ctx, &mut out);
            out
        }

        fn render_nodes(&self, nodes: &[Node], ctx: &Value, out: &mut String) {
            for node in nodes {
                match node {
                    Node::Text(t) => out.push_str(t),
                    Node::Action(a) => out.push_str(&to_text(&self.pipeline(a, ctx))),
                    Node::If(cond, then, otherwise) => {
                        let branch = if truthy(&self.pipeline(cond, ctx)) {
                            then
                        } else {
                            otherwise
                        };
                        self.render_nodes(branch, ctx, out);
                    }
                }
            }
        }

        fn pipeline(&self, src: &str, ctx: &Value) -> Value {
            let mut value: Option<Value> = None;
            for command in src.split(" | ") {
                let words = words(command);
                let (head, args) = words.split_first().expect("empty command");
                let mut args: Vec<Value> = args.iter().map(|w| self.term(w, ctx)).collect();
                if let Some(v) = value.take() {
                    args.push(v);
                }
                value = Some(if head.starts_with('.') || head.starts_with('"') {
                    assert!(args.is_empty(), "`{command}`: a value takes no arguments");
                    self.term(head, ctx)
                } else {
                    self.call(head, args, ctx)
                });
            }
            value.unwrap()
        }

        fn term(&self, word: &str, ctx: &Value) -> Value {
            if word == "." {
                return ctx.clone();
            }
            if word.starts_with('"') {
                return Value::String(unquote(word));
            }
            if let Ok(n) = word.parse::<i64>() {
                return n.into();
            }
            let path = word
                .strip_prefix('.')
                .unwrap_or_else(|| panic!("term {word}"));
            let mut at = ctx;
            for key in path.split('.') {
                at = at
                    .get(key)
                    .unwrap_or_else(|| panic!("{word}: no value (Helm would render <no value>)"));
            }
            at.clone()
        }

        fn call(&self, name: &str, args: Vec<Value>, _ctx: &Value) -> Value {
            let arity = |n: usize| assert_eq!(args.len(), n, "{name} takes {n} arguments");
            match name {
                "quote" => {
                    arity(1);
                    Value::String(serde_json::to_string(&to_text(&args[0])).unwrap())
                }
                "int64" => {
                    arity(1);
                    match &args[0] {
                        Value::Number(n) => (n.as_f64().unwrap() as i64).into(),
                        Value::String(s) => s.parse::<i64>().unwrap_or(0).into(),
                        other => panic!("int64 of {other}"),
                    }
                }
                // JSON is YAML: same meaning, not Helm's text.
                "toYaml" => {
                    arity(1);
                    let mut v = args[0].clone();
                    integral_floats_as_integers(&mut v);
                    Value::String(v.to_string())
                }
                "nindent" | "indent" => {
                    arity(2);
                    let n = args[0].as_u64().expect("indent width") as usize;
                    let pad = " ".repeat(n);
                    let text = to_text(&args[1]);
                    let body = text
                        .split('\n')
                        .map(|l| format!("{pad}{l}"))
                        .collect::<Vec<_>>()
                        .join("\n");
                    Value::String(if name == "nindent" {
                        format!("\n{body}")
                    } else {
                        body
                    })
                }
                "include" => {
                    arity(2);
                    let template = args[0].as_str().expect("include name");
                    let body = self
                        .defines
                        .get(template)
                        .unwrap_or_else(|| panic!("no define {template}"));
                    let mut out = String::new();
                    self.render_nodes(body, &args[1], &mut out);
                    Value::String(out)
                }
                other => panic!("function {other} is not supported by this check's renderer"),
            }
        }
    }

    fn words(command: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut current = String::new();
        let mut in_string = false;
        for c in command.chars() {
            match c {
                '"' => {
                    in_string = !in_string;
                    current.push(c);
                }
                c if c.is_whitespace() && !in_string => {
                    if !current.is_empty() {
                        words.push(std::mem::take(&mut current));
                    }
                }
                c => current.push(c),
            }
        }
        if !current.is_empty() {
            words.push(current);
        }
        words
    }

    /// Go's truth: false, 0, nil and empty values are false.
    fn truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }

    /// How `{{ value }}` prints, for the kinds of values the chart prints.
    fn to_text(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            // An int64 (from `int64`) prints as is; a float64 (every number
            // of values.yaml) as Go's %v: e-notation from 1e6 on.
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => i.to_string(),
                (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e6 => (f as i64).to_string(),
                _ => panic!("{n} would print in e-notation (Go's %v of a float64): use int64"),
            },
            Value::Null | Value::Array(_) | Value::Object(_) => {
                panic!("{v} printed without toYaml")
            }
        }
    }
}
