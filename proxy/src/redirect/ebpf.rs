//! Loads and attaches Nodeway's eBPF programs (`proxy-ebpf/`), and gives the
//! proxy what it needs from their maps.
//!
//! - `connect4`/`connect6` and `sockops` attach to one cgroup v2 directory
//!   (`--cgroup`, default the cgroup v2 root) and act only on sockets whose
//!   network namespace is in the enrolment map, so enrolling a pod is a map
//!   update and everything else on the node is left alone.
//! - `sk_msg` attaches to the socket map when `--sockmap on`.
//! - `sk_lookup` attaches to each enrolled pod's network namespace.
//!
//! Programs are not pinned: every attachment is a bpf_link owned by this
//! process, so the kernel detaches it when the proxy exits, cleanly or not,
//! and nothing redirects to a proxy that is gone (fail open). The maps are
//! pinned under `--bpf-pin-dir` and shared with any other Nodeway on the
//! node (`pins.rs`), which is what makes an upgrade hitless.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap, IterableMap, MapData, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use nodeway_ebpf_common::{EnrolledNetns, OrigDst, SockTuple, v4_mapped};
use tokio::net::{TcpListener, TcpStream};

use super::OriginalDst;
use super::netns::{Netns, netns_cookie};
use super::pins::{self, PinError, PinState};

/// The programs, built by `proxy/build.rs` from `proxy-ebpf/`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeway"));

/// Which step of loading the eBPF data path failed, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("eBPF redirect: {step} failed: {detail}\n  how to fix: {hint}")]
pub struct EbpfError {
    pub step: String,
    pub detail: String,
    pub hint: &'static str,
}

const HINT_PRIVILEGE: &str = "run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN \
    (the DaemonSet does); or start with --redirect off to serve without eBPF";
const HINT_KERNEL: &str = "needs Linux >= 5.15 with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and \
    BTF; or start with --redirect off";

fn fail(step: impl Into<String>, err: impl std::error::Error, hint: &'static str) -> EbpfError {
    // aya's errors keep the errno in their sources: show the whole chain.
    let mut detail = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    EbpfError {
        step: step.into(),
        detail,
        hint,
    }
}

/// A plain message where there is no error value.
#[derive(Debug)]
struct Message(&'static str);
impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for Message {}

/// The first cgroup v2 mount in `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// cgroup v2 directory the connect and sockops programs attach to; every
    /// enrolled pod's processes must be below it (and, for `--sockmap on`,
    /// the proxy itself too).
    pub cgroup: Option<PathBuf>,
    pub sockmap: bool,
    /// bpffs directory where the shared maps are pinned (`None`: not pinned,
    /// so a second Nodeway cannot take over without a gap).
    pub pin_dir: Option<PathBuf>,
}

/// One enrolled pod's attachments; dropping it does not detach, `unenroll` does.
pub struct Enrolled {
    cookie: u64,
    ipv4: Option<Ipv4Addr>,
    sk_lookup: Option<aya::programs::sk_lookup::SkLookupLinkId>,
}

impl Enrolled {
    pub fn cookie(&self) -> u64 {
        self.cookie
    }
}

pub struct EbpfRedirect {
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledNetns>>,
    orig_by_tuple: Mutex<HashMap<MapData, SockTuple, OrigDst>>,
    inbound_listeners: Mutex<SockHash<MapData, u32>>,
    /// The socket map `sk_msg` reads; kept for its lifetime.
    _sockets: SockHash<MapData, SockTuple>,
    cgroup: PathBuf,
    sockmap: bool,
    /// Programs attached to the cgroup or the socket map, with their
    /// kernel program ids (`bpftool prog show id N`).
    attached: Vec<(&'static str, u32)>,
    /// Kernel id of the inbound capture program (attached per pod).
    inbound_id: u32,
    /// Where the shared maps are pinned, if they are.
    pin_dir: Option<PathBuf>,
    /// Whether a running Nodeway's maps were taken over at load.
    took_over: bool,
}

impl std::fmt::Debug for EbpfRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfRedirect")
            .field("cgroup", &self.cgroup)
            .field("sockmap", &self.sockmap)
            .field("attached", &self.attached)
            .finish()
    }
}

impl EbpfRedirect {
    /// Loads the programs and attaches the cgroup ones. Each failure names
    /// its step.
    pub fn load(opts: &EbpfOptions) -> Result<EbpfRedirect, EbpfError> {
        let cgroup = match &opts.cgroup {
            Some(path) => path.clone(),
            None => cgroup2_mount().ok_or_else(|| {
                fail(
                    "finding the cgroup v2 hierarchy",
                    Message("no cgroup2 mount in /proc/self/mountinfo"),
                    "mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup PATH",
                )
            })?,
        };
        let cgroup_dir = File::open(&cgroup).map_err(|e| {
            fail(
                format!("opening cgroup {}", cgroup.display()),
                e,
                "pass --cgroup with a cgroup v2 directory that contains the pods",
            )
        })?;
        let (pin_dir, took_over) = match &opts.pin_dir {
            None => (None, false),
            Some(dir) => match prepare_pins(dir)? {
                Some(state) => (Some(dir.clone()), state == PinState::Shared),
                None => (None, false),
            },
        };
        let sockmap_flag: u8 = opts.sockmap.into();
        let mut loader = EbpfLoader::new();
        loader.override_global("SOCKMAP_ENABLED", &sockmap_flag, true);
        if let Some(dir) = &pin_dir {
            for name in pins::SHARED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| fail("loading the eBPF object (maps and BTF)", e, HINT_PRIVILEGE))?;
        match aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog) {
            Ok(logger) => spawn_log_reader(logger),
            Err(err) => tracing::debug!(%err, "eBPF programs log nothing"),
        }
        // bpf_link attachments always stack with other programs on the same
        // cgroup (the kernel rejects the multi flag for links), so "single"
        // here never displaces anyone else's program.
        let mut attached = Vec::new();
        for name in ["nodeway_connect4", "nodeway_connect6"] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| fail(format!("loading {name} (verifier)"), e, HINT_KERNEL))?;
            program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| {
                    fail(
                        format!("attaching {name} to {}", cgroup.display()),
                        e,
                        HINT_PRIVILEGE,
                    )
                })?;
            attached.push((name, program_id(program.info())));
        }
        let sockops: &mut SockOps = program(&mut ebpf, "nodeway_sockops")?;
        sockops
            .load()
            .map_err(|e| fail("loading nodeway_sockops (verifier)", e, HINT_KERNEL))?;
        sockops
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| {
                fail(
                    format!("attaching nodeway_sockops to {}", cgroup.display()),
                    e,
                    HINT_PRIVILEGE,
                )
            })?;
        attached.push(("nodeway_sockops", program_id(sockops.info())));

        let sockets: SockHash<MapData, SockTuple> = take_map(&mut ebpf, "SOCKETS")?;
        if opts.sockmap {
            let sk_msg: &mut SkMsg = program(&mut ebpf, "nodeway_sk_msg")?;
            sk_msg
                .load()
                .map_err(|e| fail("loading nodeway_sk_msg (verifier)", e, HINT_KERNEL))?;
            sk_msg
                .attach(sockets.fd())
                .map_err(|e| fail("attaching nodeway_sk_msg to the socket map", e, HINT_KERNEL))?;
            attached.push(("nodeway_sk_msg", program_id(sk_msg.info())));
        }
        let sk_lookup: &mut SkLookup = program(&mut ebpf, "nodeway_inbound")?;
        sk_lookup
            .load()
            .map_err(|e| fail("loading nodeway_inbound (verifier)", e, HINT_KERNEL))?;
        let inbound_id = program_id(sk_lookup.info());

        Ok(EbpfRedirect {
            enrolled: Mutex::new(take_map(&mut ebpf, "ENROLLED")?),
            orig_by_tuple: Mutex::new(take_map(&mut ebpf, "ORIG_BY_TUPLE")?),
            inbound_listeners: Mutex::new(take_map(&mut ebpf, "INBOUND_LISTENERS")?),
            _sockets: sockets,
            ebpf: Mutex::new(ebpf),
            cgroup,
            sockmap: opts.sockmap,
            attached,
            inbound_id,
            pin_dir,
            took_over,
        })
    }

    /// Whether this process shares its maps with a Nodeway that was running
    /// when it loaded.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Whether another live Nodeway shares this one's pinned maps (then it
    /// takes over when this one exits). Without pins there is none.
    pub fn another_process_shares_maps(&self) -> bool {
        if self.pin_dir.is_none() {
            return false;
        }
        let Ok(info) = self.enrolled.lock().expect("map lock").map().info() else {
            return false;
        };
        let mut own: Vec<u32> = self.attached.iter().map(|(_, id)| *id).collect();
        own.push(self.inbound_id);
        pins::used_by_another_process(info.id(), &own)
    }

    /// Removes the pins (when no other Nodeway uses them); the maps live on
    /// until this process exits.
    pub fn remove_pins(&self) {
        if let Some(dir) = &self.pin_dir
            && let Err(err) = pins::remove(dir)
        {
            tracing::warn!(%err, "removing the pinned eBPF maps");
        }
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn sockmap(&self) -> bool {
        self.sockmap
    }

    /// Programs attached to the cgroup or the socket map, with kernel ids.
    pub fn attached(&self) -> &[(&'static str, u32)] {
        &self.attached
    }

    /// Kernel id of the per-pod inbound capture program.
    pub fn inbound_program_id(&self) -> u32 {
        self.inbound_id
    }

    /// Starts redirecting a pod: its namespace goes into the enrolment map
    /// and, when it has an inbound listener and an IPv4 address, the inbound
    /// capture is attached to its namespace.
    pub fn enroll(
        &self,
        netns: &Netns,
        flags: u32,
        inbound: Option<(&TcpListener, Ipv4Addr)>,
    ) -> Result<Enrolled, EbpfError> {
        let cookie = netns.cookie();
        let mut enrolled = Enrolled {
            cookie,
            ipv4: None,
            sk_lookup: None,
        };
        if let Some((listener, ip)) = inbound {
            let key = u32::from_ne_bytes(ip.octets());
            self.inbound_listeners
                .lock()
                .expect("map lock")
                .insert(key, listener.as_raw_fd(), 0)
                .map_err(|e| {
                    fail(
                        format!("adding the inbound listener of {ip}"),
                        e,
                        HINT_KERNEL,
                    )
                })?;
            enrolled.ipv4 = Some(ip);
            let file = File::open(netns.path()).map_err(|e| {
                fail(
                    format!("opening {}", netns.path().display()),
                    e,
                    HINT_PRIVILEGE,
                )
            })?;
            let mut ebpf = self.ebpf.lock().expect("ebpf lock");
            let sk_lookup: &mut SkLookup = program(&mut ebpf, "nodeway_inbound")?;
            let link = sk_lookup.attach(&file).map_err(|e| {
                fail(
                    format!("attaching nodeway_inbound to {}", netns.path().display()),
                    e,
                    HINT_PRIVILEGE,
                )
            })?;
            enrolled.sk_lookup = Some(link);
        }
        self.enrolled
            .lock()
            .expect("map lock")
            .insert(cookie, EnrolledNetns { flags, _pad: 0 }, 0)
            .map_err(|e| fail("adding a namespace to the enrolment map", e, HINT_KERNEL))?;
        Ok(enrolled)
    }

    /// Puts a pod's inbound listener back into the map if its entry is gone:
    /// during an upgrade the other process may have put its own there, which
    /// the kernel removes when that socket closes. An entry that is there is
    /// left alone (`BPF_NOEXIST`), so two processes never take turns.
    pub fn restore_inbound(&self, enrolled: &Enrolled, listener: &impl AsRawFd) {
        const BPF_NOEXIST: u64 = 1;
        if let Some(ip) = enrolled.ipv4 {
            let key = u32::from_ne_bytes(ip.octets());
            let _ = self.inbound_listeners.lock().expect("map lock").insert(
                key,
                listener.as_raw_fd(),
                BPF_NOEXIST,
            );
        }
    }

    /// Stops redirecting new connections of a pod; open ones carry on.
    pub fn unenroll(&self, enrolled: Enrolled) {
        if let Err(err) = self
            .enrolled
            .lock()
            .expect("map lock")
            .remove(&enrolled.cookie)
        {
            tracing::warn!(%err, "removing a namespace from the enrolment map");
        }
        if let Some(ip) = enrolled.ipv4 {
            let key = u32::from_ne_bytes(ip.octets());
            let _ = self
                .inbound_listeners
                .lock()
                .expect("map lock")
                .remove(&key);
        }
        if let Some(link) = enrolled.sk_lookup {
            let mut ebpf = self.ebpf.lock().expect("ebpf lock");
            if let Ok(sk_lookup) = program::<SkLookup>(&mut ebpf, "nodeway_inbound")
                && let Err(err) = sk_lookup.detach(link)
            {
                tracing::warn!(%err, "detaching the inbound capture");
            }
        }
    }

    /// Netns cookies in the enrolment map (admin and tests).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled
            .lock()
            .expect("map lock")
            .keys()
            .filter_map(Result::ok)
            .collect()
    }
}

/// The layouts of the shared maps in the embedded programs.
pub fn object_layouts() -> Result<std::collections::HashMap<&'static str, pins::Layout>, String> {
    pins::object_layouts(PROGRAMS)
}

/// Checks the pin directory before loading. `Ok(None)`: pinning is not
/// possible here (no bpffs), so the maps are private to this process.
fn prepare_pins(dir: &Path) -> Result<Option<PinState>, EbpfError> {
    let layouts = object_layouts().map_err(|detail| EbpfError {
        step: "reading the map layouts of the eBPF object".into(),
        detail,
        hint: "rebuild: the object and the proxy are out of step",
    })?;
    match pins::prepare(dir, &layouts, |id| pins::used_by_another_process(id, &[])) {
        Ok(state) => {
            match state {
                PinState::Shared => {
                    tracing::info!(dir = %dir.display(), "taking over the eBPF maps of the Nodeway running on this node")
                }
                PinState::Fresh {
                    removed_stale: true,
                } => {
                    tracing::info!(dir = %dir.display(), "removed eBPF map pins left by a Nodeway that is no longer running")
                }
                PinState::Fresh { .. } => {}
            }
            Ok(Some(state))
        }
        Err(err @ (PinError::NotBpffs(_) | PinError::Io { .. })) => {
            tracing::warn!(
                "cannot pin the eBPF maps ({err}): serving with private maps, so an upgrade \
                 will not be hitless; mount bpffs there (mount -t bpf bpf /sys/fs/bpf) or pass --bpf-pin-dir"
            );
            Ok(None)
        }
        Err(err @ PinError::LayoutMismatch { .. }) => Err(EbpfError {
            step: "sharing the pinned eBPF maps".into(),
            detail: err.to_string(),
            hint: "upgrade with the running Nodeway stopped first (its pods' connections go direct meanwhile), \
                   or roll back to a version with the same map layout",
        }),
    }
}

fn program_id(info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>) -> u32 {
    info.map(|i| i.id()).unwrap_or(0)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| {
        fail(
            format!("finding program {name}"),
            Message("not in the embedded object"),
            "rebuild: the object and the proxy are out of step",
        )
    })?;
    program
        .try_into()
        .map_err(|e| fail(format!("using program {name}"), e, HINT_KERNEL))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        fail(
            format!("finding map {name}"),
            Message("not in the embedded object"),
            "rebuild: the object and the proxy are out of step",
        )
    })?;
    T::try_from(map).map_err(|e| fail(format!("using map {name}"), e, HINT_KERNEL))
}

fn to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn from_orig(orig: &OrigDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(orig.addr);
    let ip = match (orig.family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, orig.port)
}

impl OriginalDst for EbpfRedirect {
    /// The `sockops` program re-keyed the destination by the app socket's
    /// tuple in its namespace: our accepted socket's tuple, reversed.
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr> {
        let local = stream.local_addr().ok()?;
        let peer = stream.peer_addr().ok()?;
        let key = SockTuple {
            netns: netns_cookie(stream).ok()?,
            local_addr: to_bytes(peer.ip()),
            remote_addr: to_bytes(local.ip()),
            local_port: peer.port(),
            remote_port: local.port(),
            _pad: 0,
        };
        let mut map = self.orig_by_tuple.lock().expect("map lock");
        match map.get(&key, 0) {
            Ok(orig) => {
                let _ = map.remove(&key);
                Some(from_orig(&orig))
            }
            // Not redirected by us (e.g. iptables REDIRECT to a host listener).
            Err(_) => {
                drop(map);
                super::SoOriginalDst.original_dst(stream)
            }
        }
    }
}

/// Forwards the programs' aya-log records to `tracing`.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "nodeway::ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "nodeway::ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "nodeway::ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "nodeway::ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "nodeway::ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

#[allow(unsafe_code)]
fn spawn_log_reader(logger: aya_log::EbpfLogger<TracingLog>) {
    // SAFETY: the logger owns its ring buffer's fd, keeps it open for its
    // lifetime and `as_raw_fd` always returns that same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
