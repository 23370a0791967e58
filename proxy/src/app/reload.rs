//! Configuration sources over time: the file polled for changes, or the
//! Kubernetes API's watches (plus an optional file), each new valid
//! configuration installed into the running proxy.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::StartError;
use super::enroll::Enroller;
use super::render_problems;
use crate::admin::metrics::Retired;
use crate::config::kube::KubeSource;
use crate::config::{self, LoadOptions, Problems};
use crate::proxy::Proxy;
use crate::state::Snapshot;
use crate::status::ConfigStatus;

pub(super) fn load(path: &Path, opts: &LoadOptions) -> Result<Snapshot, StartError> {
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
pub(super) async fn watch_config(
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
pub(super) struct Installer {
    pub proxy: Arc<Proxy>,
    pub status: Arc<ConfigStatus>,
    pub enroller: Option<Arc<Mutex<Enroller>>>,
    /// Counters of client pods the new configuration no longer has.
    pub retired: Arc<Retired>,
}

impl Installer {
    /// Installs `snapshot` for new requests (in-flight ones finish on theirs),
    /// enrolls/unenrolls pods, and returns the new generation.
    fn install(&self, snapshot: Snapshot) -> u64 {
        self.retired
            .retire_while(&self.proxy.clients, || self.proxy.install(snapshot));
        if let Some(enroller) = &self.enroller {
            let mut enroller = enroller.lock().expect("enroller lock");
            enroller.reconcile(&self.proxy.snapshot.load());
            super::report_enrolment(&self.status, &enroller);
        }
        self.status.generation.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Kubernetes mode: the watched objects, plus those of `--config` if given.
pub(super) struct KubeConfig {
    pub source: KubeSource,
    pub file: Option<ExtraFile>,
    /// Problems already logged, so that each is logged once.
    pub reported: std::collections::HashSet<String>,
    /// Of the objects last built.
    pub fingerprint: Option<u64>,
}

impl KubeConfig {
    /// Builds a snapshot from the current objects, or `None` when nothing
    /// changed since the last build. Objects with errors are left out (and
    /// reported in the log and `last_reload_error`); the rest is used.
    pub(super) fn rebuild(
        &mut self,
        opts: &LoadOptions,
        status: &ConfigStatus,
    ) -> Option<Snapshot> {
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
    pub(super) async fn watch(
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
pub(super) struct ExtraFile {
    path: PathBuf,
    text: Option<String>,
    hash: u64,
    readable: bool,
}

impl ExtraFile {
    pub(super) fn new(path: PathBuf) -> ExtraFile {
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
