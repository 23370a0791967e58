//! Keeps the enrolled pods in step with the configuration: for each pod of
//! an opted-in namespace (on this node, not opted out, with a known network
//! namespace) the proxy opens in-pod listeners and adds the namespace to the
//! eBPF enrolment map; when a pod leaves, it undoes both.
//!
//! A Pod may name its network namespace with the annotation
//! `nodeway.io/netns` (e.g. `/var/run/netns/NAME` or `/proc/PID/ns/net`);
//! otherwise it is found from the pod's UID among the node's processes
//! (`discover.rs`). Namespaces are compared by identity (nsfs inode), so a
//! pod is re-enrolled only when its namespace really changed (a restarted
//! sandbox), whichever path reached it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nodeway_ebpf_common::{ENROLLED_IPV6, INBOUND_PORT, INBOUND_PORT_ALT, OUTBOUND_PORT};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::{ListenerPod, Proxy, serve_inbound, serve_outbound};
use crate::redirect::discover::{netns_identity, pod_netns};
use crate::redirect::ebpf::{EbpfRedirect, Enrolled};
use crate::redirect::netns::{Dialer, Netns};
use crate::state::{Snapshot, Workload};
use crate::status::EnrolledPod;

struct PodEntry {
    netns_path: PathBuf,
    netns_id: (u64, u64),
    enrolled: Enrolled,
    /// The inbound listener's socket (a second descriptor of it), to put
    /// back into the capture map if another Nodeway's entry replaced it.
    inbound: OwnedFd,
    /// Stops the pod's listeners (and drains their connections).
    stop: CancellationToken,
}

/// A pod to enroll: its workload, namespace file and namespace identity.
type Wanted<'a> = (&'a Arc<Workload>, PathBuf, (u64, u64));

pub struct Enroller {
    ebpf: Arc<EbpfRedirect>,
    node: Option<String>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pods: HashMap<String, PodEntry>,
    /// Where processes are looked up by pod UID (`/proc`).
    proc_root: PathBuf,
    /// Pods last found without a namespace, to log each once.
    waiting: HashSet<String>,
    /// Pods the last reconcile could not enroll, `pod: reason`.
    pending: Vec<String>,
}

impl Enroller {
    pub fn new(
        ebpf: Arc<EbpfRedirect>,
        node: Option<String>,
        proxy: Arc<Proxy>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Enroller {
        Enroller {
            ebpf,
            node,
            proxy,
            shutdown,
            tracker,
            pods: HashMap::new(),
            proc_root: PathBuf::from("/proc"),
            waiting: HashSet::new(),
            pending: Vec::new(),
        }
    }

    /// Pods that should be enrolled and are not, sorted; empty when every
    /// pod to enroll is served (readiness).
    pub fn pending(&self) -> &[String] {
        &self.pending
    }

    /// Whether another live Nodeway shares the eBPF maps, so it keeps these
    /// pods redirected when this process stops.
    pub fn another_process_shares_maps(&self) -> bool {
        self.ebpf.another_process_shares_maps()
    }

    /// The pods enrolled now, sorted.
    pub fn enrolled(&self) -> Vec<EnrolledPod> {
        let mut enrolled: Vec<EnrolledPod> = self
            .pods
            .iter()
            .map(|(key, e)| EnrolledPod {
                pod: key.clone(),
                netns: e.netns_path.display().to_string(),
                netns_cookie: e.enrolled.cookie(),
            })
            .collect();
        enrolled.sort_by(|a, b| a.pod.cmp(&b.pod));
        enrolled
    }

    /// The pods that should be enrolled under `snap`, by `namespace/name`,
    /// with their namespace file and its identity. Pods without an
    /// annotation are looked up by UID in one scan of `/proc`.
    fn wanted<'a>(&mut self, snap: &'a Snapshot) -> HashMap<String, Wanted<'a>> {
        let mut candidates = Vec::new();
        for w in snap.pods_by_ip.values() {
            if !w.redirect_enabled {
                continue;
            }
            if let (Some(node), Some(pod_node)) = (&self.node, &w.node_name)
                && node != pod_node
            {
                continue;
            }
            candidates.push(w);
        }
        let uids: HashSet<&str> = candidates
            .iter()
            .filter(|w| w.netns.is_none())
            .filter_map(|w| w.uid.as_deref())
            .collect();
        let discovered = pod_netns(&self.proc_root, &uids);
        let mut wanted = HashMap::new();
        let mut waiting = HashSet::new();
        for w in candidates {
            let key = format!("{}/{}", w.namespace, w.pod_name);
            let path = w
                .netns
                .clone()
                .or_else(|| w.uid.as_deref().and_then(|u| discovered.get(u).cloned()));
            match path.and_then(|p| netns_identity(&p).map(|id| (p, id))) {
                Some((path, id)) => {
                    wanted.insert(key, (w, path, id));
                }
                None => {
                    if !self.waiting.contains(&key) {
                        tracing::info!(pod = %key, "pod to enroll has no network namespace yet (no annotation, or no process found by its UID); retrying");
                    }
                    waiting.insert(key);
                }
            }
        }
        self.pending = waiting
            .iter()
            .map(|pod| format!("{pod}: no network namespace found yet"))
            .collect();
        self.waiting = waiting;
        wanted
    }

    /// Enrolls new pods and unenrolls departed ones. Failures are logged
    /// per pod and retried at the next reconcile (a configuration change or the
    /// periodic rescan, every 2 s).
    pub fn reconcile(&mut self, snap: &Snapshot) {
        let wanted = self.wanted(snap);
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(key, entry)| {
                wanted
                    .get(*key)
                    .is_none_or(|(_, _, id)| *id != entry.netns_id)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if let Some(entry) = self.pods.remove(&key) {
                self.ebpf.unenroll(entry.enrolled);
                entry.stop.cancel();
                tracing::info!(pod = %key, "pod unenrolled: its new connections go direct");
            }
        }
        for (key, (workload, netns_path, netns_id)) in wanted {
            if let Some(entry) = self.pods.get(&key) {
                self.ebpf.restore_inbound(&entry.enrolled, &entry.inbound);
                continue;
            }
            match self.enroll(workload, &netns_path, netns_id) {
                Ok(entry) => {
                    tracing::info!(pod = %key, netns = %netns_path.display(), "pod enrolled");
                    self.pods.insert(key, entry);
                }
                Err(err) => {
                    tracing::error!(pod = %key, netns = %netns_path.display(), "cannot enroll pod: {err}");
                    self.pending.push(format!("{key}: {err}"));
                }
            }
        }
        self.pending.sort();
    }

    fn enroll(
        &self,
        workload: &Arc<Workload>,
        netns_path: &Path,
        netns_id: (u64, u64),
    ) -> Result<PodEntry, String> {
        let netns =
            Netns::open(netns_path).map_err(|e| format!("opening the network namespace: {e}"))?;
        let outbound_addr = SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT));
        let outbound = netns
            .listen(outbound_addr)
            .map_err(|e| format!("listening on {outbound_addr} in the pod: {e}"))?;
        // IPv6 connects are redirected only where the pod has IPv6 loopback.
        let outbound6 = netns
            .listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)))
            .ok();
        // Not shared (no SO_REUSEPORT): in a reuseport group the kernel would
        // spread the connections `sk_lookup` steers over an old Nodeway's
        // listener too, and they would be cut at its drain deadline. So the
        // new process takes the other of two ports and the capture map names
        // its socket alone.
        let inbound_on = |port: u16| netns.listen_exclusive(SocketAddr::from(([0, 0, 0, 0], port)));
        let inbound = inbound_on(INBOUND_PORT)
            .or_else(|_| inbound_on(INBOUND_PORT_ALT))
            .map_err(|e| {
                format!(
                    "listening on 0.0.0.0:{INBOUND_PORT} or :{INBOUND_PORT_ALT} in the pod: {e}"
                )
            })?;
        let inbound_fd = inbound
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the inbound listener: {e}"))?;
        let ipv4 = workload.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let flags = if outbound6.is_some() {
            ENROLLED_IPV6
        } else {
            0
        };
        let enrolled = self
            .ebpf
            .enroll(&netns, flags, ipv4.map(|ip| (&inbound, ip)))
            .map_err(|e| e.to_string())?;
        let pod = Arc::new(ListenerPod {
            workload: workload.clone(),
            dialer: Dialer::in_netns(netns),
        });
        let stop = self.shutdown.child_token();
        for listener in std::iter::once(outbound).chain(outbound6) {
            tokio::spawn(serve_outbound(
                listener,
                self.proxy.clone(),
                stop.clone(),
                self.tracker.clone(),
                Some(pod.clone()),
            ));
        }
        tokio::spawn(serve_inbound(
            inbound,
            self.proxy.clone(),
            stop.clone(),
            self.tracker.clone(),
            pod,
        ));
        Ok(PodEntry {
            netns_path: netns_path.to_path_buf(),
            netns_id,
            enrolled,
            inbound: inbound_fd,
            stop,
        })
    }

    /// Unenrolls every pod and removes the pins: the exit of the last
    /// Nodeway on the node (new connections go direct: fail open).
    pub fn clear(&mut self) {
        for (_, entry) in self.pods.drain() {
            self.ebpf.unenroll(entry.enrolled);
            entry.stop.cancel();
        }
        self.ebpf.remove_pins();
    }

    /// Leaves every pod enrolled for the Nodeway that shares the maps and
    /// stops this one's in-pod listeners: new connections go to the other
    /// process's listeners (same address, `SO_REUSEPORT`), and connections
    /// still queued on ours migrate there as they close.
    pub fn hand_over(&mut self) {
        for (_, entry) in self.pods.drain() {
            entry.stop.cancel();
        }
    }
}
