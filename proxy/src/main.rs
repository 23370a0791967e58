//! `nodeway` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
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

#[derive(clap::Args)]
struct RunArgs {
    /// Multi-document YAML of Kubernetes and Istio objects; reloaded on change.
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
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
    /// Longest wait for in-flight requests after SIGTERM/SIGINT.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Clients must finish sending request headers within this time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_header_timeout: Duration,
    /// Node-wide cap on upstream connections across all client pods.
    #[arg(long, default_value_t = 16384)]
    max_upstream_connections: u32,
    /// Node-wide cap on requests waiting for an upstream connection.
    #[arg(long, default_value_t = 16384)]
    max_pending_requests: u32,
    /// Largest share (percent) of each node-wide cap a single client pod may hold.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_client_share: u32,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
    #[command(flatten)]
    mesh: MeshArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config: path, mesh } => validate(&path, mesh),
        Command::Run(args) => run(*args),
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
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut opts = RunOptions::new(args.config);
    opts.outbound_addr = args.outbound_addr;
    opts.admin_addr = args.admin_addr;
    opts.metrics_addr = args.metrics_addr;
    opts.access_log = args.access_log;
    opts.node = args.node;
    opts.drain_timeout = args.drain_timeout;
    opts.settings.request_header_timeout = args.request_header_timeout;
    opts.settings.max_upstream_connections = args.max_upstream_connections;
    opts.settings.max_pending_requests = args.max_pending_requests;
    opts.settings.max_client_share_percent = args.max_client_share;
    opts.load.root_namespace = args.mesh.root_namespace;
    opts.load.cluster_domain = args.mesh.cluster_domain;
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
