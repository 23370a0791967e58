//! `nodeway` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use nodeway::admin::{self, cli};
use nodeway::app::{self, RunOptions};
use nodeway::config::{self, LoadOptions};
use nodeway::telemetry::access_log::AccessLogTarget;

#[derive(Parser)]
#[command(
    name = "nodeway",
    version,
    about = "Node-level L7 proxy enforcing Istio DestinationRule/VirtualService per client workload"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Check a configuration file: prints `ok` or every problem, exits non-zero on any.
    Validate {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Show cluster stats of a running proxy (Envoy's names), summed over client pods.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only stats whose full name (`cluster.<name>.<stat>`) matches this regex.
        #[arg(long)]
        filter: Option<String>,
        /// Only this client: workload, `namespace/workload` or `namespace/pod`.
        #[arg(long)]
        source: Option<String>,
        /// A readable table, or the admin API's JSON.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show endpoints and their outlier-detection state per client pod.
    Endpoints {
        #[command(flatten)]
        admin: AdminArgs,
        /// Cluster name (`outbound|80||svc.ns.svc.cluster.local`) or service FQDN.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this client: workload, `namespace/workload` or `namespace/pod`.
        #[arg(long)]
        source: Option<String>,
        /// A readable table, or the admin API's JSON.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the loaded configuration and each client cluster's effective policy.
    Config {
        #[command(flatten)]
        admin: AdminArgs,
        /// A readable table, or the admin API's JSON.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API of the running proxy.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
struct MeshArgs {
    /// Namespace whose DestinationRules apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Cluster DNS suffix.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RedirectMode {
    Off,
    Ebpf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Multi-document YAML of Kubernetes and Istio objects; reloaded on change.
    /// With --kubernetes its objects are added to the cluster's.
    #[arg(long, required_unless_present = "kubernetes")]
    config: Option<PathBuf>,
    /// Watch Namespaces, Nodes, Pods, Services, EndpointSlices and Istio
    /// DestinationRules/VirtualServices on the Kubernetes API server (needs --node).
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes API server URL [default: kubeconfig, else the pod's service account].
    #[arg(long, env = "NODEWAY_KUBE_API")]
    kube_api: Option<String>,
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Readiness probe only (`GET /healthz/ready`), like Istio's port 15021
    /// [default: 0.0.0.0:15021; if that port is taken, a warning and no probe listener].
    #[arg(long)]
    readiness_addr: Option<SocketAddr>,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// `PATH`, `stdout` or `off`.
    #[arg(long, default_value = "stdout")]
    access_log: AccessLogTarget,
    /// Name of this node (its Node object gives the proxy's locality).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// After SIGTERM/SIGINT: how long in-flight requests may finish and TCP
    /// and upgraded connections are kept before they are closed (Istio's
    /// `terminationDrainDuration`).
    #[arg(long, default_value = "5s", value_parser = go_duration)]
    drain_timeout: Duration,
    /// Clients must finish sending request headers within this time, from
    /// the request's first byte.
    #[arg(long, default_value = "10s", value_parser = go_duration)]
    request_header_timeout: Duration,
    /// Downstream HTTP/1.1 connections idle between requests are closed
    /// after this time (Envoy's `idle_timeout`).
    #[arg(long, default_value = "1h", value_parser = go_duration)]
    idle_timeout: Duration,
    /// A request with no body bytes in either direction for this long ends:
    /// `408` before the response started, a reset after (flag `SI`; Envoy's
    /// `stream_idle_timeout`). `0s` disables it.
    #[arg(long, default_value = "5m", value_parser = go_duration)]
    stream_idle_timeout: Duration,
    /// Node-wide cap on upstream connections across all client pods.
    #[arg(long, default_value_t = 16384)]
    max_upstream_connections: u32,
    /// Node-wide cap on requests waiting for an upstream connection.
    #[arg(long, default_value_t = 16384)]
    max_pending_requests: u32,
    /// Largest share (percent) of each node-wide cap a single client pod may hold.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_client_share: u32,
    /// Node-wide cap on downstream connections; a client pod may hold
    /// --max-client-share percent of it. Connections over it are closed at
    /// once and logged with `OM`.
    #[arg(long, default_value_t = 50_000)]
    max_downstream_connections: u32,
    /// Node-wide cap on downstream requests in flight, shared out the same
    /// way; requests over it get `503` with `OM`.
    #[arg(long, default_value_t = 50_000)]
    max_downstream_requests: u32,
    /// Memory the overload manager measures pressure against (bytes, or a
    /// Kubernetes quantity such as `512Mi`): at 95% HTTP/1.1 keep-alive is
    /// disabled, at 98% new requests get `503` (`OM`). Unset: no memory actions.
    #[arg(long, env = "NODEWAY_OVERLOAD_MEMORY_LIMIT", value_parser = memory_quantity)]
    overload_memory_limit: Option<u64>,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// `ebpf`: load the eBPF programs, enroll pods of opted-in namespaces and
    /// open listeners inside them. `off`: serve only `--outbound-addr`.
    #[arg(long, value_enum, default_value_t = RedirectMode::Off)]
    redirect: RedirectMode,
    /// Socket-map acceleration between apps and the proxy (`--redirect ebpf`).
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    sockmap: OnOff,
    /// cgroup v2 directory the eBPF programs attach to; enrolled pods must be
    /// below it [default: the cgroup v2 mount].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory where the eBPF maps are pinned and shared with the
    /// next Nodeway on the node, so an upgrade has no gap; `none`: private
    /// maps. Without a bpf filesystem there, the maps stay private (warned).
    #[arg(long, default_value = "/sys/fs/bpf/nodeway")]
    bpf_pin_dir: PathBuf,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// Durations on the command line use the grammar of the config's (Go's,
/// as Istio's fields): `500ms`, `5s`, `1m30s`.
fn go_duration(text: &str) -> Result<Duration, String> {
    config::duration::parse_duration(text).map_err(|err| err.to_string())
}

/// Bytes as Kubernetes writes a memory quantity: `536870912`, `512Mi`,
/// `2Gi`, `500M`.
fn memory_quantity(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use Ki, Mi, Gi, Ti, k, M, G or T)"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a positive memory quantity"))
}

#[cfg(all(feature = "jemalloc", feature = "mimalloc"))]
compile_error!("choose one allocator: features `jemalloc` and `mimalloc` exclude each other");

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config: path, mesh } => validate(&path, mesh),
        Command::Run(args) => run(*args),
        Command::Stats {
            admin,
            filter,
            source,
            output,
        } => {
            let path = cli::path_with_query(
                "/stats",
                &[
                    ("format", Some("json")),
                    ("filter", filter.as_deref()),
                    ("source", source.as_deref()),
                ],
            );
            query(admin.admin_addr, async move |addr| {
                let stats = cli::get_json(addr, &path).await?;
                Ok(match output {
                    Output::Json => format!("{stats:#}\n"),
                    Output::Table => cli::stats_table(&stats, source.is_none()),
                })
            })
        }
        Command::Endpoints {
            admin,
            cluster,
            source,
            output,
        } => {
            let format = (output == Output::Json).then_some("json");
            let path = cli::path_with_query(
                "/endpoints",
                &[
                    ("cluster", cluster.as_deref()),
                    ("source", source.as_deref()),
                    ("format", format),
                ],
            );
            query(admin.admin_addr, async move |addr| {
                cli::call(addr, http::Method::GET, &path).await
            })
        }
        Command::Config { admin, output } => query(admin.admin_addr, async move |addr| {
            let dump = cli::get_json(addr, "/config_dump").await?;
            Ok(match output {
                Output::Json => format!("{dump:#}\n"),
                Output::Table => cli::config_table(&dump),
            })
        }),
    }
}

/// Runs one admin API query and prints its result, or the error (exit 1).
fn query(
    addr: SocketAddr,
    f: impl AsyncFnOnce(SocketAddr) -> Result<String, cli::CliError>,
) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(f(addr)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn validate(path: &std::path::Path, mesh: MeshArgs) -> ExitCode {
    let opts = LoadOptions {
        cluster_domain: mesh.cluster_domain,
        root_namespace: mesh.root_namespace,
        node_name: None,
    };
    match config::load_file(path, &opts) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            eprintln!("{} problem(s) found", problems.len());
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    // The admin API's `POST /logging` changes this filter at run time.
    if let Err(err) = admin::logging::init(&args.log_level) {
        eprintln!("warning: logging not set up: {err}");
    }
    let mut opts = RunOptions::new(PathBuf::new());
    opts.config = args.config;
    if args.kubernetes {
        let Some(node) = args.node.clone() else {
            eprintln!(
                "error: --kubernetes needs --node (or NODE_NAME): only this node's pods are clients"
            );
            return ExitCode::FAILURE;
        };
        let mut kube = nodeway::config::kube::KubeOptions::new(node);
        kube.api_url = args.kube_api;
        opts.kubernetes = Some(kube);
    }
    opts.readiness = match args.readiness_addr {
        Some(addr) => app::Readiness::Required(addr),
        None => app::Readiness::Default(app::DEFAULT_READINESS_ADDR),
    };
    opts.outbound_addr = args.outbound_addr;
    opts.admin_addr = args.admin_addr;
    opts.metrics_addr = args.metrics_addr;
    opts.access_log = args.access_log;
    opts.node = args.node;
    opts.drain_timeout = args.drain_timeout;
    opts.settings.request_header_timeout = args.request_header_timeout;
    opts.settings.idle_timeout = args.idle_timeout;
    opts.settings.stream_idle_timeout = args.stream_idle_timeout;
    opts.settings.max_upstream_connections = args.max_upstream_connections;
    opts.settings.max_pending_requests = args.max_pending_requests;
    opts.settings.max_client_share_percent = args.max_client_share;
    opts.settings.max_downstream_connections = args.max_downstream_connections;
    opts.settings.max_downstream_requests = args.max_downstream_requests;
    opts.settings.overload_memory_limit = args.overload_memory_limit;
    opts.load.root_namespace = args.mesh.root_namespace;
    opts.load.cluster_domain = args.mesh.cluster_domain;
    if args.redirect == RedirectMode::Ebpf {
        opts.redirect = Some(nodeway::redirect::ebpf::EbpfOptions {
            cgroup: args.cgroup,
            sockmap: args.sockmap == OnOff::On,
            pin_dir: (args.bpf_pin_dir.as_os_str() != "none").then_some(args.bpf_pin_dir),
        });
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    match rt.block_on(app::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
