//! Starting, reloading and stopping the proxy: what `nodeway run` does. The
//! top layer: it wires configuration sources (`reload`), the proxy, the eBPF
//! redirect and its enrolled pods (`enroll`) and the admin servers together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod enroll;
mod reload;

use crate::admin;
use crate::admin::metrics::Retired;
use crate::config::LoadOptions;
use crate::config::kube::{KubeError, KubeOptions, KubeSource};
use crate::proxy::{Proxy, ProxySettings};
use crate::redirect::OriginalDst;
use crate::redirect::ebpf::{EbpfOptions, EbpfRedirect};
use crate::status::{ConfigStatus, ProgramStatus, RedirectStatus};
use crate::telemetry::access_log::{AccessLogTarget, AccessLogger};
use enroll::Enroller;
use reload::{ExtraFile, Installer, KubeConfig, load, watch_config};

use crate::config::Problem;

/// Everything `nodeway run` is told. Defaults are the CLI's.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration file (`--config`); with `kubernetes` its objects are
    /// added to the cluster's.
    pub config: Option<PathBuf>,
    /// `--kubernetes`: objects from the API server (watched).
    pub kubernetes: Option<KubeOptions>,
    /// The node-side outbound listener (default `127.0.0.1:15001`): clients
    /// redirected by iptables or naming the proxy; with eBPF, enrolled pods
    /// reach their in-pod listeners instead.
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
            config: Some(config),
            kubernetes: None,
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
    #[error("{0}")]
    Kubernetes(#[from] KubeError),
    #[error("no configuration source: give --config, --kubernetes, or both")]
    NoSource,
}

pub fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running proxy.
pub struct Running {
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
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
            let mut enroller = enroller.lock().expect("enroller lock");
            if enroller.another_process_shares_maps() {
                tracing::info!(
                    "another Nodeway shares the eBPF maps: the enrolled pods stay redirected, to it; draining"
                );
                enroller.hand_over();
            } else {
                tracing::info!(
                    "no other Nodeway on this node: pods unenrolled, their new connections go direct (fail open); draining"
                );
                enroller.clear();
            }
        }
        self.status.ready.store(false, Ordering::Relaxed);
        self.shutdown.cancel();
        self.connections.close();
        let drained = tokio::time::timeout(self.drain_timeout, self.connections.wait())
            .await
            .is_ok();
        if !drained {
            // TCP and upgraded streams were kept to the deadline: FIN now,
            // and as long as they read off what their clients still send.
            tracing::warn!(
                timeout = ?self.drain_timeout,
                open = self.connections.len(),
                "drain deadline reached: closing the connections still open"
            );
            self.proxy.drain_deadline.cancel();
            let linger = crate::proxy::relay::LINGER + Duration::from_millis(100);
            let _ = tokio::time::timeout(linger, self.connections.wait()).await;
        }
        // The finished requests' lines are queued; make sure they reach the file.
        let logger = self.proxy.logger.clone();
        let _ = tokio::task::spawn_blocking(move || logger.flush(Duration::from_secs(2))).await;
        drained
    }
}

/// Loads the configuration, binds the listeners and starts serving.
pub async fn start(
    mut opts: RunOptions,
    original_dst: Arc<dyn OriginalDst>,
) -> Result<Running, StartError> {
    if opts.node.is_none() {
        opts.node = opts.kubernetes.as_ref().map(|k| k.node.clone());
    }
    let mut load_opts = opts.load.clone();
    load_opts.node_name = opts.node.clone();
    let status = Arc::new(ConfigStatus::default());
    let (loaded, source) = match (&opts.kubernetes, &opts.config) {
        (Some(kube), file) => {
            let source = KubeSource::start(kube, status.source_up.clone()).await?;
            if !source.wait_synced(kube.initial_sync_timeout).await {
                tracing::warn!(
                    timeout = ?kube.initial_sync_timeout,
                    "not every kind could be listed from the Kubernetes API yet; starting with what is known and catching up as it arrives"
                );
            }
            let mut kube_config = KubeConfig {
                source,
                file: file.clone().map(ExtraFile::new),
                reported: Default::default(),
                fingerprint: None,
            };
            let snapshot = kube_config
                .rebuild(&load_opts, &status)
                .expect("the first build is always new");
            (snapshot, Some(kube_config))
        }
        (None, Some(path)) => (load(path, &load_opts)?, None),
        (None, None) => return Err(StartError::NoSource),
    };
    let logger = AccessLogger::start(&opts.access_log).map_err(|source| StartError::AccessLog {
        path: format!("{:?}", opts.access_log),
        source,
    })?;
    status.generation.store(1, Ordering::Relaxed);
    // Every listener is bound before the eBPF programs load, so a start that
    // fails here leaves the node's data path (and a running Nodeway) untouched.
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    // Shared with the next Nodeway during an upgrade, like the in-pod listeners.
    let outbound = crate::redirect::netns::bind_shared(opts.outbound_addr).map_err(|source| {
        StartError::Bind {
            what: "outbound listener",
            addr: opts.outbound_addr,
            source,
        }
    })?;
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
                    took_over: ebpf.took_over(),
                    pending: Vec::new(),
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
    let proxy = Arc::new(Proxy::new(
        loaded,
        logger,
        opts.settings.clone(),
        original_dst,
    ));

    let shutdown = CancellationToken::new();
    if let Some(listener) = readiness {
        tracing::info!(addr = %listener.local_addr().expect("bound"), "readiness probe listening");
        // Draining starts with shutdown: the probe fails from then on.
        tokio::spawn(admin::serve_readiness(
            listener,
            status.clone(),
            shutdown.clone(),
        ));
    }
    let connections = TaskTracker::new();
    tokio::spawn(crate::resilience::overload::monitor_memory(
        proxy.overload.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::proxy::serve_outbound(
        outbound,
        proxy.clone(),
        shutdown.clone(),
        connections.clone(),
        None,
    ));
    let enroller = match (&opts.redirect, ebpf) {
        (Some(_), Some(ebpf)) => {
            let mut enroller = Enroller::new(
                ebpf,
                opts.node.clone(),
                proxy.clone(),
                shutdown.clone(),
                connections.clone(),
            );
            enroller.reconcile(&proxy.snapshot.load());
            report_enrolment(&status, &enroller);
            let enroller = Arc::new(Mutex::new(enroller));
            tokio::spawn(rescan_pods(
                enroller.clone(),
                proxy.clone(),
                status.clone(),
                shutdown.clone(),
            ));
            Some(enroller)
        }
        // Without the redirect there is nothing more to wait for; a failed
        // eBPF load is never ready.
        (None, _) => {
            status.ready.store(true, Ordering::Relaxed);
            None
        }
        (Some(_), None) => None,
    };
    tokio::spawn(admin::serve(
        admin_listener,
        proxy.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    let retired = Arc::new(Retired::default());
    let registry = admin::metrics::registry(proxy.clone(), status.clone(), retired.clone());
    tokio::spawn(admin::metrics::serve(
        metrics_listener,
        Arc::new(registry),
        shutdown.clone(),
    ));
    let installer = Installer {
        proxy: proxy.clone(),
        status: status.clone(),
        enroller: enroller.clone(),
        retired,
    };
    match (source, &opts.config) {
        (Some(kube_config), _) => {
            let debounce = opts
                .kubernetes
                .as_ref()
                .map(|k| k.debounce)
                .unwrap_or_default();
            tokio::spawn(kube_config.watch(
                load_opts,
                debounce,
                opts.config_poll_interval,
                installer,
                shutdown.clone(),
            ));
        }
        (None, Some(path)) => {
            tokio::spawn(watch_config(
                path.clone(),
                load_opts,
                opts.config_poll_interval,
                installer,
                shutdown.clone(),
            ));
        }
        (None, None) => unreachable!("checked above"),
    }
    let config_source = match (&opts.kubernetes, &opts.config) {
        (Some(_), Some(path)) => format!("kubernetes + {}", path.display()),
        (Some(_), None) => "kubernetes".to_string(),
        (None, path) => path
            .as_deref()
            .unwrap_or_else(|| Path::new("-"))
            .display()
            .to_string(),
    };
    tracing::info!(%outbound_addr, %admin_addr, %metrics_addr, config = %config_source, "nodeway started");
    Ok(Running {
        outbound_addr,
        admin_addr,
        metrics_addr,
        proxy,
        status,
        shutdown,
        connections,
        drain_timeout: opts.drain_timeout,
        enroller,
    })
}

/// Pods start processes and restart sandboxes without a configuration
/// change: look again every few seconds for namespaces found or replaced.
async fn rescan_pods(
    enroller: Arc<Mutex<Enroller>>,
    proxy: Arc<Proxy>,
    status: Arc<ConfigStatus>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let snapshot = proxy.snapshot.load_full();
        // The scan reads /proc: keep it off the runtime's worker threads.
        let enroller = enroller.clone();
        let status = status.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut enroller = enroller.lock().expect("enroller lock");
            enroller.reconcile(&snapshot);
            report_enrolment(&status, &enroller);
        })
        .await;
    }
}

/// Publishes the enrolment (admin `/redirect`) and readiness: ready once
/// every pod to enroll is enrolled.
fn report_enrolment(status: &ConfigStatus, enroller: &Enroller) {
    let mut redirect = status.redirect.lock().expect("status lock");
    redirect.enrolled = enroller.enrolled();
    redirect.pending = enroller.pending().to_vec();
    status
        .ready
        .store(redirect.pending.is_empty(), Ordering::Relaxed);
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
