//! What the proxy reports about itself: the configuration's generation and
//! latest reload error, whether its source answers, and the eBPF data path.
//! Written by `app` (start, reload, enrolment), read by `admin` (the admin
//! API and `/metrics`); it depends on nothing else in the crate.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

/// Outcome of the latest configuration (re)load, for the admin API.
#[derive(Debug)]
pub struct ConfigStatus {
    /// Increases with every configuration installed (1 = the initial one).
    pub generation: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// What the eBPF data path is doing (admin `/redirect`).
    pub redirect: Mutex<RedirectStatus>,
    /// Whether the configuration source answers: the Kubernetes API server
    /// (its latest request), or the file (its latest read). While it does
    /// not, the last known configuration is served
    /// (`nodeway_config_source_up`).
    pub source_up: Arc<AtomicBool>,
    /// Ready to take the node's traffic (`/healthz/ready`): started and, with
    /// the eBPF redirect, every pod to enroll has its in-pod listeners and
    /// enrolment. A failed eBPF load is never ready, so a rollout waits and
    /// the running Nodeway keeps the node.
    pub ready: AtomicBool,
}

impl ConfigStatus {
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for ConfigStatus {
    fn default() -> Self {
        ConfigStatus {
            generation: AtomicU64::new(0),
            last_error: Mutex::default(),
            redirect: Mutex::default(),
            source_up: Arc::new(AtomicBool::new(true)),
            ready: AtomicBool::new(false),
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
    /// Whether the maps of a Nodeway already running were taken over at start.
    pub took_over: bool,
    /// Pods to enroll that are not (yet): no network namespace found, or the
    /// enrolment failed (logged); `pod: reason`.
    pub pending: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub id: u32,
    /// Where it is attached.
    pub attach: String,
}

/// What `/config_dump` and tests see of one enrolled pod.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EnrolledPod {
    pub pod: String,
    pub netns: String,
    pub netns_cookie: u64,
}
