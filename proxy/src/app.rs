//! Starting, reloading and stopping the proxy: what `nodeway run` does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::kube::{KubeError, KubeOptions, KubeSource};
use crate::config::{self, LoadOptions, Problem, Problems};
use crate::proxy::{ProxySettings, Shared};
use crate::redirect::OriginalDst;
use crate::redirect::ebpf::{EbpfOptions, EbpfRedirect};
use crate::redirect::enroll::{EnrolledPod, Enroller};
use crate::telemetry::access_log::{AccessLogTarget, AccessLogger};

/// Everything `nodeway run` is told. Defaults are the CLI's.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration file (`--config`); with `kubernetes` its objects are
    /// added to the cluster's.
    pub config: Option<PathBuf>,
    /// `--kubernetes`: objects from the API server (watched).
    pub kubernetes: Option<KubeOptions>,
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

/// Outcome of the latest configuration (re)load, for the admin API.
#[derive(Debug)]
pub struct ConfigStatus {
    /// Increases with every configuration installed (1 = the initial one).
    pub generation: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    /// What the eBPF data path is doing (admin `/redirect`).
    pub redirect: std::sync::Mutex<RedirectStatus>,
    /// Whether the configuration source answers: the Kubernetes API server
    /// (its latest request), or the file (its latest read). While it does
    /// not, the last known configuration is served
    /// (`nodeway_config_source_up`).
    pub source_up: Arc<AtomicBool>,
}

impl Default for ConfigStatus {
    fn default() -> Self {
        ConfigStatus {
            generation: AtomicU64::new(0),
            last_error: std::sync::Mutex::default(),
            redirect: std::sync::Mutex::default(),
            source_up: Arc::new(AtomicBool::new(true)),
        }
    }
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
            let enroller = Arc::new(Mutex::new(enroller));
            tokio::spawn(rescan_pods(
                enroller.clone(),
                shared.clone(),
                status.clone(),
                shutdown.clone(),
            ));
            Some(enroller)
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
    let installer = Installer {
        shared: shared.clone(),
        status: status.clone(),
        enroller: enroller.clone(),
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

/// Pods start processes and restart sandboxes without a configuration
/// change: look again every few seconds for namespaces found or replaced.
async fn rescan_pods(
    enroller: Arc<Mutex<Enroller>>,
    shared: Arc<Shared>,
    status: Arc<ConfigStatus>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let snapshot = shared.snapshot.load_full();
        // The scan reads /proc: keep it off the runtime's worker threads.
        let enroller = enroller.clone();
        let enrolled = tokio::task::spawn_blocking(move || {
            let mut enroller = enroller.lock().expect("enroller lock");
            enroller.reconcile(&snapshot);
            enroller.enrolled()
        })
        .await;
        if let Ok(enrolled) = enrolled {
            status.redirect.lock().expect("status lock").enrolled = enrolled;
        }
    }
}

/// Polls the file (robust to editors and ConfigMap symlink swaps, unlike
/// inotify) and installs each new valid version; a bad one is logged and the
/// last good configuration stays.
async fn watch_config(
    path: PathBuf,
    opts: LoadOptions,
    every: Duration,
    installer: Installer,
    shutdown: CancellationToken,
) {
    let status = installer.status.clone();
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let current = match tokio::fs::read(&path).await {
            Ok(c) => c,
            Err(err) => {
                if status.source_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(path = %path.display(), %err, "cannot read config file; keeping the last good configuration");
                }
                continue;
            }
        };
        status.source_up.store(true, Ordering::Relaxed);
        if last.as_deref() == Some(current.as_slice()) {
            continue;
        }
        last = Some(current);
        // Loading a large file takes a while: off the runtime's workers,
        // which carry traffic (and the admin API) meanwhile.
        let loaded = {
            let (path, opts) = (path.clone(), opts.clone());
            tokio::task::spawn_blocking(move || load(&path, &opts)).await
        };
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                tracing::error!(%err, "config loader task failed; keeping the last good configuration");
                continue;
            }
        };
        match loaded {
            Ok(snapshot) => {
                let generation = installer.install(snapshot);
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

/// What installing a new configuration touches.
struct Installer {
    shared: Arc<Shared>,
    status: Arc<ConfigStatus>,
    enroller: Option<Arc<Mutex<Enroller>>>,
}

impl Installer {
    /// Installs `snapshot` for new requests (in-flight ones finish on theirs),
    /// enrolls/unenrolls pods, and returns the new generation.
    fn install(&self, snapshot: crate::state::Snapshot) -> u64 {
        self.shared.install(snapshot);
        if let Some(enroller) = &self.enroller {
            let mut enroller = enroller.lock().expect("enroller lock");
            enroller.reconcile(&self.shared.snapshot.load());
            self.status.redirect.lock().expect("status lock").enrolled = enroller.enrolled();
        }
        self.status.generation.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Kubernetes mode: the watched objects, plus those of `--config` if given.
struct KubeConfig {
    source: KubeSource,
    file: Option<ExtraFile>,
    /// Problems already logged, so that each is logged once.
    reported: std::collections::HashSet<String>,
    /// Of the objects last built.
    fingerprint: Option<u64>,
}

impl KubeConfig {
    /// Builds a snapshot from the current objects, or `None` when nothing
    /// changed since the last build. Objects with errors are left out (and
    /// reported in the log and `last_reload_error`); the rest is used.
    fn rebuild(
        &mut self,
        opts: &LoadOptions,
        status: &ConfigStatus,
    ) -> Option<crate::state::Snapshot> {
        let mut assembled = self.source.assemble();
        let mut fingerprint = assembled.fingerprint;
        if let Some(file) = &self.file {
            fingerprint = fingerprint.wrapping_mul(31).wrapping_add(file.hash);
            if let Some(text) = &file.text {
                let name = file.path.display().to_string();
                config::parse_documents(
                    &name,
                    text,
                    &mut assembled.objects,
                    &mut assembled.problems,
                );
            }
        }
        if self.fingerprint == Some(fingerprint) {
            return None;
        }
        self.fingerprint = Some(fingerprint);
        let (snapshot, problems) = crate::config::resolve::resolve(&assembled.objects, opts);
        let mut all = assembled.problems;
        all.extend(problems);
        self.report(&all, status);
        Some(snapshot)
    }

    fn report(&mut self, problems: &Problems, status: &ConfigStatus) {
        let mut now = std::collections::HashSet::new();
        for (p, error) in problems
            .errors
            .iter()
            .map(|p| (p, true))
            .chain(problems.warnings.iter().map(|p| (p, false)))
        {
            let line = p.to_string();
            if !self.reported.contains(&line) {
                if error {
                    tracing::error!("{line}; this object is skipped");
                } else {
                    tracing::warn!("{line}");
                }
            }
            now.insert(line);
        }
        self.reported = now;
        *status.last_error.lock().expect("status lock") = if problems.errors.is_empty() {
            None
        } else {
            Some(format!(
                "{} problem(s); the objects concerned are skipped, the rest is in use:\n{}",
                problems.errors.len(),
                render_problems(&problems.errors)
            ))
        };
    }

    /// Rebuilds after changes settle (`debounce`) and installs each new
    /// configuration; the file, if any, is checked every `every`.
    async fn watch(
        mut self,
        opts: LoadOptions,
        debounce: Duration,
        every: Duration,
        installer: Installer,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.source.changed() => {}
                _ = tokio::time::sleep(every), if self.file.is_some() => {
                    if !self.file.as_mut().is_some_and(ExtraFile::refresh) {
                        continue;
                    }
                }
            }
            // Let a burst of events (a rollout, a relist) settle into one generation.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(debounce) => {}
            }
            if let Some(snapshot) = self.rebuild(&opts, &installer.status) {
                let generation = installer.install(snapshot);
                tracing::info!(generation, "configuration updated from the Kubernetes API");
            }
        }
    }
}

/// `--config` next to `--kubernetes`: its last readable content.
struct ExtraFile {
    path: PathBuf,
    text: Option<String>,
    hash: u64,
    readable: bool,
}

impl ExtraFile {
    fn new(path: PathBuf) -> ExtraFile {
        let mut file = ExtraFile {
            path,
            text: None,
            hash: 0,
            readable: true,
        };
        file.refresh();
        file
    }

    /// Reads the file again; `true` if its content changed. An unreadable
    /// file keeps its last content.
    fn refresh(&mut self) -> bool {
        use std::hash::{Hash, Hasher};
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                text.hash(&mut h);
                let hash = h.finish();
                let changed = hash != self.hash;
                self.hash = hash;
                self.text = Some(text);
                self.readable = true;
                changed
            }
            Err(err) => {
                if std::mem::replace(&mut self.readable, false) {
                    tracing::warn!(path = %self.path.display(), %err, "cannot read config file; keeping its last content");
                }
                false
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
