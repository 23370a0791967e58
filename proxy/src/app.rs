//! Starting, reloading and stopping the proxy: what `nodeway run` does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::{self, LoadOptions, Problem};
use crate::proxy::{ProxySettings, Shared};
use crate::redirect::OriginalDst;
use crate::redirect::ebpf::{EbpfOptions, EbpfRedirect};
use crate::redirect::enroll::{EnrolledPod, Enroller};
use crate::telemetry::access_log::{AccessLogTarget, AccessLogger};

/// Everything `nodeway run` is told. Defaults are the CLI's.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Where redirected pod connections arrive (default `127.0.0.1:15001`).
    pub outbound_addr: SocketAddr,
    /// Admin API, loopback by default (`127.0.0.1:15000`).
    pub admin_addr: SocketAddr,
    /// Prometheus endpoint (`0.0.0.0:15020`): `/metrics`, `/stats/prometheus`.
    pub metrics_addr: SocketAddr,
    pub access_log: AccessLogTarget,
    /// This node's name, for locality (`--node`).
    pub node: Option<String>,
    /// Longest wait for in-flight requests on SIGTERM/SIGINT (default 5 s).
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes (default 1 s).
    pub config_poll_interval: Duration,
    pub load: LoadOptions,
    pub settings: ProxySettings,
    /// Readiness probe listener (`--readiness-addr`, Istio's `:15021`).
    pub readiness: Readiness,
    /// `--redirect ebpf`: load the eBPF programs and enroll pods.
    pub redirect: Option<EbpfOptions>,
}

/// Where `GET /healthz/ready` is served besides the admin API; it answers
/// `503 DRAINING` once shutdown starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Off,
    /// The default port: if it is taken (several proxies on one machine), warn and go on.
    Default(SocketAddr),
    /// Asked for explicitly: failing to listen is a start error.
    Required(SocketAddr),
}

/// Istio's readiness port.
pub const DEFAULT_READINESS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15021);

impl RunOptions {
    pub fn new(config: PathBuf) -> Self {
        RunOptions {
            config,
            outbound_addr: SocketAddr::from(([127, 0, 0, 1], 15001)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            access_log: AccessLogTarget::Stdout,
            node: None,
            drain_timeout: Duration::from_secs(5),
            config_poll_interval: Duration::from_secs(1),
            load: LoadOptions::default(),
            settings: ProxySettings::default(),
            readiness: Readiness::Off,
            redirect: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration {path} has {} problem(s):\n{}", .problems.len(), render_problems(.problems))]
    Config {
        path: String,
        problems: Vec<Problem>,
    },
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open access log {path}: {source}")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
}

pub fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Outcome of the latest configuration (re)load, for the admin API.
#[derive(Debug, Default)]
pub struct ConfigStatus {
    /// Increases with every configuration installed (1 = the initial one).
    pub generation: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    /// What the eBPF data path is doing (admin `/redirect`).
    pub redirect: std::sync::Mutex<RedirectStatus>,
}

/// The eBPF data path as the admin API reports it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RedirectStatus {
    /// `off`, `ebpf`, or `failed` (loading failed; serving without redirect).
    pub mode: &'static str,
    pub error: Option<String>,
    pub cgroup: Option<String>,
    pub sockmap: bool,
    /// Attached programs and their kernel ids (`bpftool prog show id N`).
    pub programs: Vec<ProgramStatus>,
    pub enrolled: Vec<EnrolledPod>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub id: u32,
    /// Where it is attached.
    pub attach: String,
}

/// A running proxy.
pub struct Running {
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    pub shared: Arc<Shared>,
    pub status: Arc<ConfigStatus>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    drain_timeout: Duration,
    enroller: Option<Arc<Mutex<Enroller>>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish for up to the drain
    /// timeout, and returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        if let Some(enroller) = &self.enroller {
            // New connections of enrolled pods go direct from now on.
            enroller.lock().expect("enroller lock").clear();
        }
        self.shutdown.cancel();
        self.connections.close();
        let drained = tokio::time::timeout(self.drain_timeout, self.connections.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout reached with requests in flight");
        }
        // The finished requests' lines are queued; make sure they reach the file.
        let logger = self.shared.logger.clone();
        let _ = tokio::task::spawn_blocking(move || logger.flush(Duration::from_secs(2))).await;
        drained
    }
}

/// Loads the configuration, binds the listeners and starts serving.
pub async fn start(
    opts: RunOptions,
    original_dst: Arc<dyn OriginalDst>,
) -> Result<Running, StartError> {
    let mut load_opts = opts.load.clone();
    load_opts.node_name = opts.node.clone();
    let loaded = load(&opts.config, &load_opts)?;
    let logger = AccessLogger::start(&opts.access_log).map_err(|source| StartError::AccessLog {
        path: format!("{:?}", opts.access_log),
        source,
    })?;
    let status = Arc::new(ConfigStatus::default());
    status.generation.store(1, Ordering::Relaxed);
    let ebpf = match &opts.redirect {
        None => {
            status.redirect.lock().expect("status lock").mode = "off";
            None
        }
        Some(ebpf_opts) => match EbpfRedirect::load(ebpf_opts) {
            Ok(ebpf) => {
                let ebpf = Arc::new(ebpf);
                let cgroup = ebpf.cgroup().display().to_string();
                let mut programs: Vec<ProgramStatus> = ebpf
                    .attached()
                    .iter()
                    .map(|(name, id)| ProgramStatus {
                        name,
                        id: *id,
                        attach: if *name == "nodeway_sk_msg" {
                            "socket map".into()
                        } else {
                            format!("cgroup {cgroup}")
                        },
                    })
                    .collect();
                programs.push(ProgramStatus {
                    name: "nodeway_inbound",
                    id: ebpf.inbound_program_id(),
                    attach: "each enrolled pod's network namespace".into(),
                });
                tracing::info!(%cgroup, sockmap = ebpf.sockmap(), "eBPF redirect attached");
                *status.redirect.lock().expect("status lock") = RedirectStatus {
                    mode: "ebpf",
                    error: None,
                    cgroup: Some(cgroup),
                    sockmap: ebpf.sockmap(),
                    programs,
                    enrolled: Vec::new(),
                };
                Some(ebpf)
            }
            Err(err) => {
                // Serving without redirect beats not serving: say why, loudly.
                tracing::error!("{err}\n  serving without eBPF redirect");
                let mut redirect = status.redirect.lock().expect("status lock");
                redirect.mode = "failed";
                redirect.error = Some(err.to_string());
                None
            }
        },
    };
    let original_dst: Arc<dyn OriginalDst> = match &ebpf {
        Some(ebpf) => ebpf.clone(),
        None => original_dst,
    };
    let shared = Arc::new(Shared::new(
        loaded,
        logger,
        opts.settings.clone(),
        original_dst,
    ));

    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let outbound = bind("outbound listener", opts.outbound_addr).await?;
    let admin_listener = bind("admin API", opts.admin_addr).await?;
    let metrics_listener = bind("metrics endpoint", opts.metrics_addr).await?;
    let outbound_addr = outbound.local_addr().expect("bound");
    let admin_addr = admin_listener.local_addr().expect("bound");
    let metrics_addr = metrics_listener.local_addr().expect("bound");

    let readiness = match opts.readiness {
        Readiness::Off => None,
        Readiness::Default(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(err) => {
                tracing::warn!(%addr, %err, "cannot listen for the readiness probe; not serving it (use --readiness-addr)");
                None
            }
        },
        Readiness::Required(addr) => Some(bind("readiness probe", addr).await?),
    };
    let shutdown = CancellationToken::new();
    if let Some(listener) = readiness {
        tracing::info!(addr = %listener.local_addr().expect("bound"), "readiness probe listening");
        // Draining starts with shutdown: the probe fails from then on.
        tokio::spawn(admin::serve_readiness(listener, shutdown.clone()));
    }
    let connections = TaskTracker::new();
    tokio::spawn(crate::proxy::serve_outbound(
        outbound,
        shared.clone(),
        shutdown.clone(),
        connections.clone(),
        None,
    ));
    let enroller = match (&opts.redirect, ebpf) {
        (Some(_), Some(ebpf)) => {
            let mut enroller = Enroller::new(
                ebpf,
                opts.node.clone(),
                shared.clone(),
                shutdown.clone(),
                connections.clone(),
            );
            enroller.reconcile(&shared.snapshot.load());
            status.redirect.lock().expect("status lock").enrolled = enroller.enrolled();
            Some(Arc::new(Mutex::new(enroller)))
        }
        _ => None,
    };
    tokio::spawn(admin::serve(
        admin_listener,
        shared.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    // The eBPF issue registers its collector on this registry (see `metrics::registry`).
    let registry = crate::telemetry::metrics::registry(shared.clone(), status.clone());
    tokio::spawn(crate::telemetry::metrics::serve(
        metrics_listener,
        Arc::new(registry),
        shutdown.clone(),
    ));
    tokio::spawn(watch_config(
        opts.config.clone(),
        load_opts,
        opts.config_poll_interval,
        shared.clone(),
        status.clone(),
        shutdown.clone(),
        enroller.clone(),
    ));
    tracing::info!(%outbound_addr, %admin_addr, %metrics_addr, config = %opts.config.display(), "nodeway started");
    Ok(Running {
        outbound_addr,
        admin_addr,
        metrics_addr,
        shared,
        status,
        shutdown,
        connections,
        drain_timeout: opts.drain_timeout,
        enroller,
    })
}

fn load(path: &std::path::Path, opts: &LoadOptions) -> Result<crate::state::Snapshot, StartError> {
    match config::load_file(path, opts) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            Ok(loaded.snapshot)
        }
        Err(problems) => Err(StartError::Config {
            path: path.display().to_string(),
            problems,
        }),
    }
}

/// Polls the file (robust to editors and ConfigMap symlink swaps, unlike
/// inotify) and installs each new valid version; a bad one is logged and the
/// last good configuration stays.
async fn watch_config(
    path: PathBuf,
    opts: LoadOptions,
    every: Duration,
    shared: Arc<Shared>,
    status: Arc<ConfigStatus>,
    shutdown: CancellationToken,
    enroller: Option<Arc<Mutex<Enroller>>>,
) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let current = match tokio::fs::read(&path).await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot read config file; keeping the last good configuration");
                continue;
            }
        };
        if last.as_deref() == Some(current.as_slice()) {
            continue;
        }
        last = Some(current);
        match load(&path, &opts) {
            Ok(snapshot) => {
                shared.install(snapshot);
                if let Some(enroller) = &enroller {
                    let mut enroller = enroller.lock().expect("enroller lock");
                    enroller.reconcile(&shared.snapshot.load());
                    status.redirect.lock().expect("status lock").enrolled = enroller.enrolled();
                }
                let generation = status.generation.fetch_add(1, Ordering::Relaxed) + 1;
                *status.last_error.lock().expect("status lock") = None;
                tracing::info!(generation, "configuration reloaded");
            }
            Err(err) => {
                tracing::error!("{err}\nkeeping the last good configuration");
                *status.last_error.lock().expect("status lock") = Some(err.to_string());
            }
        }
    }
}

/// `nodeway run`: start, wait for SIGTERM/SIGINT, drain, return.
pub async fn run(opts: RunOptions) -> Result<(), StartError> {
    let running = start(opts, Arc::new(crate::redirect::SoOriginalDst)).await?;
    wait_for_signal().await;
    tracing::info!("signal received; draining");
    running.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
