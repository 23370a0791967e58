//! A network-namespace test topology for the eBPF integration tests: a "node"
//! network namespace without any uplink, routed (Calico-style) pods hanging
//! off it on veth pairs, an nftables DNAT stand-in for kube-proxy, and a
//! cgroup v2 directory per pod (the proxy attaches its cgroup eBPF programs
//! to [`Topology::cgroup_dir`]).
//!
//! ```text
//!   pod netns "<id>-a"            node netns "<id>-node"            pod netns "<id>-b"
//!   eth0 10.0.0.2/32  <--veth-->  v0-a   (proxy_arp)                 eth0 10.0.0.3/32
//!   default dev eth0              v1-b   (proxy_arp)  <--veth-->     default dev eth0
//!                                 10.0.0.2/32 dev v0-a, 10.0.0.3/32 dev v1-b
//!                                 service VIPs as /32 addresses on lo
//!                                 nft: ip daddr VIP tcp dport P dnat to backends
//! ```
//!
//! Everything is synchronous and based on `std::process`: the `ip`, `nft`,
//! `nsenter` and `sh` tools do the work, so no `unsafe` is needed. Every
//! namespace, cgroup and process created here is removed when the
//! [`Topology`] is dropped, also when a test panics; [`cleanup_stale`] removes
//! what processes that died without dropping theirs left behind.
//!
//! Safety: the node namespace has no interface to the host and no default
//! route, so nothing sent inside a topology can leave it.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Directory where `ip netns` keeps its named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Directory under the cgroup2 mount holding every topology's cgroups.
pub const CGROUP_PARENT: &str = "nodeway-test";
/// nftables table (family `ip`) of the node namespace.
const NFT_TABLE: &str = "nodeway";
/// How long [`Drop`] waits for processes to die and cgroups to go away.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);
/// How long one helper command (`ip`, `nft`, ...) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics unless the process runs as root (effective uid 0, read from
/// `/proc/self/status`): namespaces, veths, nftables and eBPF need it.
pub fn require_root() {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u32>().ok());
    if euid != Some(0) {
        panic!(
            "this test needs root (CAP_SYS_ADMIN/CAP_NET_ADMIN/CAP_BPF): run as root, CI does \
             (effective uid: {})",
            euid.map_or_else(|| "unknown".to_owned(), |u| u.to_string())
        );
    }
}

/// Undoes the octal escapes (`\040` for a space, ...) of `/proc/*/mountinfo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup v2 hierarchy (first `cgroup2` entry of
/// `/proc/self/mountinfo`; `/sys/fs/cgroup` on unified systems,
/// `/sys/fs/cgroup/unified` on hybrid ones). Panics if there is none.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|e| panic!("cannot read /proc/self/mountinfo: {e}"));
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <super opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            return PathBuf::from(unescape_mountinfo(mp));
        }
    }
    panic!(
        "no cgroup2 file system is mounted (no `cgroup2` entry in /proc/self/mountinfo); the \
         eBPF tests attach cgroup programs and need cgroup v2: mount it with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` (hybrid) or boot with \
         systemd.unified_cgroup_hierarchy=1"
    );
}

/// One pod: a network namespace with `eth0` (`ip`/32, default route on the
/// device) and its own cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Name given to [`Topology::add_pod`].
    pub name: String,
    /// The pod's address on `eth0`.
    pub ip: Ipv4Addr,
    /// Network namespace name (`<id>-<name>`), for `ip -n`.
    pub netns: String,
    /// `/run/netns/<netns>`, for `nsenter --net=`.
    pub netns_path: PathBuf,
    /// The pod's cgroup: `<cgroup_dir>/<name>`.
    pub cgroup: PathBuf,
}

/// A process spawned by a topology: pid plus start time (field 22 of
/// `/proc/<pid>/stat`), so that a reused pid is never killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spawned {
    pid: u32,
    start: Option<u64>,
}

/// A test topology; see the module documentation. Dropping it kills every
/// process it spawned (and anything else in its cgroups) and removes its
/// cgroups and network namespaces.
#[derive(Debug)]
pub struct Topology {
    id: String,
    cgroup_dir: PathBuf,
    node_ns: String,
    pods: Vec<Pod>,
    /// Network namespaces created, in creation order (node first).
    netns: Vec<String>,
    /// Cgroup directories created, in creation order (parents first).
    cgroups: Vec<PathBuf>,
    /// `VIP:port`s with a DNAT rule.
    services: HashSet<SocketAddrV4>,
    /// Whether the nftables table and chain exist.
    nat_ready: bool,
    children: Mutex<Vec<Spawned>>,
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("path {p:?} is not UTF-8"))
}

fn describe(program: &OsStr, args: &[OsString]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Reads `r` to the end in a thread; the result arrives on the channel.
fn drain<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    match r {
        Some(mut r) => {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
        }
        None => {
            let _ = tx.send(Vec::new());
        }
    }
    rx
}

/// Waits for `child` to exit, reading its stdout/stderr meanwhile. On timeout
/// kills it and returns `Err` with what it wrote to stderr so far.
fn wait_output(mut child: Child, timeout: Duration) -> Result<Output, String> {
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => break None,
            Err(e) => return Err(format!("waiting for pid {}: {e}", child.id())),
        }
    };
    // The pipes close when the process (and any child holding them) exits;
    // do not hang on a grandchild that keeps them open.
    let grace = Duration::from_secs(2);
    match status {
        Some(status) => Ok(Output {
            status,
            stdout: out_rx.recv_timeout(grace).unwrap_or_default(),
            stderr: err_rx.recv_timeout(grace).unwrap_or_default(),
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
            Err(format!(
                "did not finish within {timeout:?} (killed); stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            ))
        }
    }
}

/// Runs a helper tool to completion; `Err` carries its stderr.
fn tool(program: &str, args: &[&str]) -> Result<String, String> {
    tool_stdin(program, args, None)
}

fn tool_stdin(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let desc = format!("`{program} {}`", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {desc}: {e}"))?;
    if let Some(input) = stdin
        && let Some(mut w) = child.stdin.take()
    {
        use std::io::Write;
        w.write_all(input.as_bytes())
            .map_err(|e| format!("writing stdin of {desc}: {e}"))?;
    }
    let out = wait_output(child, TOOL_TIMEOUT).map_err(|e| format!("{desc}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{desc} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Like [`tool`], panicking on failure (topology construction).
fn must(program: &str, args: &[&str]) -> String {
    tool(program, args).unwrap_or_else(|e| panic!("topology setup: {e}"))
}

/// Writes a sysctl of network namespace `ns` (`key` like
/// `net/ipv4/ip_forward`): `/proc/sys/net` shows the writer's namespace.
fn sysctl(ns: &str, key: &str, value: &str) {
    let ns_path = format!("{NETNS_DIR}/{ns}");
    let file = format!("/proc/sys/{key}");
    must(
        "nsenter",
        &[
            &format!("--net={ns_path}"),
            "--",
            "sh",
            "-c",
            r#"printf '%s\n' "$1" > "$0""#,
            &file,
            value,
        ],
    );
}

/// Start time (clock ticks since boot) of `pid`, `None` if it is gone.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields after the
    // last ')' start at field 3 (state); starttime is field 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// State letter of `pid` (`Z` for a zombie), `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

fn alive(pid: u32) -> bool {
    !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let mut args = vec![
        "-c".to_owned(),
        r#"kill -KILL "$@""#.to_owned(),
        "kill".to_owned(),
    ];
    args.extend(pids.iter().map(|p| p.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Failures are expected for processes that died meanwhile.
    let _ = tool("sh", &args);
}

fn cgroup_pids(cg: &Path) -> Vec<u32> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// All cgroup directories under (and including) `root`, children after
/// their parent; bounded depth and count.
fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() && out.len() < 10_000 {
        if out[i].components().count() > root.components().count() + 16 {
            i += 1;
            continue;
        }
        if let Ok(rd) = fs::read_dir(&out[i]) {
            let mut subs: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            subs.sort();
            out.extend(subs);
        }
        i += 1;
    }
    out
}

/// Kills everything in the cgroup subtree `root` (via `cgroup.kill`, and pid
/// by pid as well), waits (bounded by `deadline`) until it is empty, then
/// removes the directories, children first. Returns the problems seen.
fn remove_cgroup_tree(root: &Path, extra: &[PathBuf], deadline: Instant) -> Vec<String> {
    let mut problems = Vec::new();
    if !root.exists() {
        return problems;
    }
    let _ = fs::write(root.join("cgroup.kill"), "1");
    let mut tree = cgroup_tree(root);
    for p in extra {
        if !tree.contains(p) && p.exists() {
            tree.push(p.clone());
        }
    }
    loop {
        let pids: Vec<u32> = tree.iter().flat_map(|c| cgroup_pids(c)).collect();
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            problems.push(format!("processes still in {}: {pids:?}", root.display()));
            break;
        }
        kill_pids(&pids);
        thread::sleep(Duration::from_millis(10));
    }
    // Children first: deepest paths last in `tree`, so go in reverse.
    tree.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for cg in &tree {
        if !cg.exists() {
            continue;
        }
        // rmdir can briefly fail with EBUSY right after the last task left.
        loop {
            match fs::remove_dir(cg) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    if Instant::now() >= deadline {
                        problems.push(format!("rmdir {}: {e}", cg.display()));
                        break;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    problems
}

fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn del_netns(ns: &str) -> Result<(), String> {
    match tool("ip", &["netns", "del", ns]) {
        Ok(_) => Ok(()),
        Err(_) if !Path::new(NETNS_DIR).join(ns).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The pid in a topology id or derived name (`nw<pid>x<n>[-...]`).
fn id_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("nw")?;
    let (pid, after) = rest.split_once('x')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = after.split('-').next()?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// True if `name` starts with `prefix` at a token boundary: when `prefix`
/// ends in a digit the next character must not be one (so `nw12` does not
/// match `nw123x0`, nor `nw5x1` match `nw5x10-node`).
fn has_prefix(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    !(prefix.ends_with(|c: char| c.is_ascii_digit())
        && rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Network namespace names and cgroup directories (full paths) still present
/// whose name starts with `id_prefix` (at a token boundary, see above): pass a
/// topology's [`Topology::id`] to check that it was torn down completely.
pub fn leftovers(id_prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| has_prefix(n, id_prefix))
        .collect();
    let parent = cgroup2_mount().join(CGROUP_PARENT);
    if let Ok(rd) = fs::read_dir(&parent) {
        let mut cgs: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| has_prefix(n, id_prefix))
            })
            .map(|e| e.path().display().to_string())
            .collect();
        cgs.sort();
        out.extend(cgs);
    }
    out
}

/// Removes the network namespaces named `nw<pid>x*` and the cgroups
/// `<cgroup2>/nodeway-test/nw<pid>x*` whose `<pid>` is no longer a running
/// process (left behind by a test process that was killed). Idempotent and
/// safe to run concurrently; called by [`Topology::new`].
pub fn cleanup_stale() {
    let dead = |name: &str| id_pid(name).is_some_and(|pid| !alive(pid));
    let parent = cgroup2_mount().join(CGROUP_PARENT);
    if let Ok(rd) = fs::read_dir(&parent) {
        let deadline = Instant::now() + TEARDOWN_WAIT;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if e.file_type().is_ok_and(|t| t.is_dir()) && dead(name) {
                for p in remove_cgroup_tree(&e.path(), &[], deadline) {
                    if e.path().exists() {
                        eprintln!("nodeway topology: stale cleanup: {p}");
                    }
                }
            }
        }
    }
    let mut stale: Vec<String> = netns_names().into_iter().filter(|n| dead(n)).collect();
    // Pods before their node namespace.
    stale.sort_by_key(|n| n.ends_with("-node"));
    for ns in stale {
        if let Err(e) = del_netns(&ns) {
            eprintln!("nodeway topology: stale cleanup: {e}");
        }
    }
}

impl Topology {
    /// Creates a topology with a unique id `nw<pid>x<counter>`: the node
    /// network namespace `<id>-node` (loopback up, IPv4 forwarding on, no
    /// other interface, no default route) and the cgroup
    /// `<cgroup2>/nodeway-test/<id>`. Panics (after undoing what was done) if
    /// anything fails, and if not root.
    pub fn new() -> Topology {
        require_root();
        cleanup_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("nw{}x{n}", std::process::id());
        let parent = cgroup2_mount().join(CGROUP_PARENT);
        let mut topo = Topology {
            cgroup_dir: parent.join(&id),
            node_ns: format!("{id}-node"),
            id,
            pods: Vec::new(),
            netns: Vec::new(),
            cgroups: Vec::new(),
            services: HashSet::new(),
            nat_ready: false,
            children: Mutex::new(Vec::new()),
        };
        fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        fs::create_dir(&topo.cgroup_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", topo.cgroup_dir.display()));
        topo.cgroups.push(topo.cgroup_dir.clone());

        let node = topo.node_ns.clone();
        must("ip", &["netns", "add", &node]);
        topo.netns.push(node.clone());
        must("ip", &["-n", &node, "link", "set", "lo", "up"]);
        sysctl(&node, "net/ipv4/ip_forward", "1");
        // New namespaces copy the host's IPv4 conf/all values: make sure ARP
        // requests for the VIPs (local addresses on lo) are answered.
        sysctl(&node, "net/ipv4/conf/all/arp_ignore", "0");
        topo
    }

    /// The topology id (`nw<pid>x<counter>`), prefix of all its names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The topology's cgroup, `<cgroup2>/nodeway-test/<id>`; every pod's
    /// cgroup is below it.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// Name of the node network namespace (`<id>-node`).
    pub fn node_netns(&self) -> &str {
        &self.node_ns
    }

    /// Every pod added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Adds pod `name` (lowercase letters, digits, `-`; at most 20) with
    /// address `ip`: network namespace `<id>-<name>` whose `eth0` holds
    /// `ip/32` with `default dev eth0`, peered with `v<n>-<name>` in the node
    /// namespace (proxy ARP, `ip/32` routed to it), and cgroup
    /// `<cgroup_dir>/<name>`.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Pod {
        let valid = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        assert!(
            valid,
            "pod name {name:?}: use 1-20 lowercase letters, digits or '-'"
        );
        assert!(
            name != "node" && self.pods.iter().all(|p| p.name != name),
            "pod name {name:?} is already used in topology {}",
            self.id
        );
        assert!(
            self.pods.iter().all(|p| p.ip != ip),
            "pod address {ip} is already used in topology {}",
            self.id
        );
        let netns = format!("{}-{name}", self.id);
        let pod = Pod {
            name: name.to_owned(),
            ip,
            netns_path: Path::new(NETNS_DIR).join(&netns),
            netns: netns.clone(),
            cgroup: self.cgroup_dir.join(name),
        };
        fs::create_dir(&pod.cgroup)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", pod.cgroup.display()));
        self.cgroups.push(pod.cgroup.clone());

        must("ip", &["netns", "add", &netns]);
        self.netns.push(netns.clone());
        let node = self.node_ns.clone();
        let mut host_if = format!("v{}-{name}", self.pods.len());
        host_if.truncate(15);
        let cidr = format!("{ip}/32");
        must("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        // Both ends are created directly in their namespaces: nothing ever
        // appears in the host namespace.
        must(
            "ip",
            &[
                "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &host_if,
                "netns", &node,
            ],
        );
        must("ip", &["-n", &netns, "addr", "add", &cidr, "dev", "eth0"]);
        must("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        must(
            "ip",
            &["-n", &netns, "route", "add", "default", "dev", "eth0"],
        );
        // Proxy ARP answers the pod's ARP requests for anything the node
        // routes elsewhere; proxy_delay 0, else each answer to a broadcast
        // request is delayed randomly by up to 0.8 s.
        sysctl(&node, &format!("net/ipv4/conf/{host_if}/proxy_arp"), "1");
        sysctl(&node, &format!("net/ipv4/neigh/{host_if}/proxy_delay"), "0");
        sysctl(&node, &format!("net/ipv4/conf/{host_if}/arp_ignore"), "0");
        must("ip", &["-n", &node, "link", "set", &host_if, "up"]);
        must("ip", &["-n", &node, "route", "add", &cidr, "dev", &host_if]);
        self.pods.push(pod.clone());
        pod
    }

    /// Adds cgroup `<cgroup_dir>/<name>` (e.g. `proxy`), removed on drop.
    pub fn add_cgroup(&mut self, name: &str) -> PathBuf {
        assert!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "cgroup name {name:?}: one path component"
        );
        let dir = self.cgroup_dir.join(name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        self.cgroups.push(dir.clone());
        dir
    }

    fn ensure_nat(&mut self) {
        if self.nat_ready {
            return;
        }
        let script = format!(
            "add table ip {NFT_TABLE}\n\
             add chain ip {NFT_TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
        );
        self.nft(&script);
        self.nat_ready = true;
    }

    fn nft(&self, script: &str) {
        let ns = format!("--net={NETNS_DIR}/{}", self.node_ns);
        tool_stdin("nsenter", &[&ns, "--", "nft", "-f", "-"], Some(script))
            .unwrap_or_else(|e| panic!("topology setup: {e}\nscript:\n{script}"));
    }

    /// kube-proxy stand-in: in the node namespace only, DNATs TCP to `vip`
    /// to `backends` (round robin with `numgen inc`, or the only one). A pod
    /// whose connections are not redirected reaches a backend directly.
    /// Panics if `backends` is empty or `vip` was already added.
    pub fn add_service_vip(&mut self, vip: SocketAddrV4, backends: &[SocketAddrV4]) {
        assert!(!backends.is_empty(), "service {vip}: no backends");
        assert!(
            self.services.insert(vip),
            "service {vip} was already added to topology {}",
            self.id
        );
        self.ensure_nat();
        // The VIP is a local address of the node (on its `lo`, as kube-proxy
        // in IPVS mode puts VIPs on its kube-ipvs0 dummy; this kernel may lack
        // the dummy driver): the node answers the pods' ARP requests for it,
        // and a VIP port without a rule is refused instead of blackholed.
        let cidr = format!("{}/32", vip.ip());
        must(
            "ip",
            &["-n", &self.node_ns, "addr", "replace", &cidr, "dev", "lo"],
        );
        let target = if backends.len() == 1 {
            format!("dnat ip to {}", backends[0])
        } else {
            let entries: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {} . {}", b.ip(), b.port()))
                .collect();
            format!(
                "dnat ip to numgen inc mod {} map {{ {} }}",
                backends.len(),
                entries.join(", ")
            )
        };
        let script = format!(
            "add rule ip {NFT_TABLE} prerouting ip daddr {} tcp dport {} {target}\n",
            vip.ip(),
            vip.port()
        );
        self.nft(&script);
    }

    /// The pod named `name`; panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("topology {} has no pod {name:?}", self.id))
    }

    fn spawn_inner(
        &self,
        cgroup: &Path,
        netns: Option<&Path>,
        program: &OsStr,
        args: &[OsString],
    ) -> Child {
        let procs = sh_quote(path_str(&cgroup.join("cgroup.procs")));
        // The shell moves itself into the cgroup, then becomes nsenter, which
        // becomes the program: the returned pid is the program's. `ip netns
        // exec` is not used: it remounts /sys, hiding the cgroup2 mount.
        let script = match netns {
            Some(ns) => format!(
                r#"echo $$ > {procs} && exec nsenter --net={} -- "$0" "$@""#,
                sh_quote(path_str(ns))
            ),
            None => format!(r#"echo $$ > {procs} && exec "$0" "$@""#),
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", describe(program, args)));
        let pid = child.id();
        let spawned = Spawned {
            pid,
            start: start_time(pid),
        };
        match self.children.lock() {
            Ok(mut c) => c.push(spawned),
            Err(poisoned) => poisoned.into_inner().push(spawned),
        }
        child
    }

    /// Runs `program args...` in pod `pod`'s cgroup and network namespace
    /// (stdin null, stdout/stderr piped: read them, or the program blocks
    /// once a pipe is full). It is killed when the topology is dropped.
    pub fn spawn(
        &self,
        pod: &str,
        program: impl AsRef<OsStr>,
        args: &[impl AsRef<OsStr>],
    ) -> Child {
        let p = self.pod(pod);
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        self.spawn_inner(&p.cgroup, Some(&p.netns_path), program.as_ref(), &args)
    }

    /// Like [`Topology::spawn`] but in the host network namespace, in
    /// `cgroup` (which must be below [`Topology::cgroup_dir`], e.g. from
    /// [`Topology::add_cgroup`]); for the proxy process.
    pub fn spawn_in_cgroup(
        &self,
        cgroup: &Path,
        program: impl AsRef<OsStr>,
        args: &[impl AsRef<OsStr>],
    ) -> Child {
        assert!(
            cgroup.starts_with(&self.cgroup_dir) && cgroup.is_dir(),
            "{} is not a cgroup of topology {} (use add_cgroup)",
            cgroup.display(),
            self.id
        );
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        self.spawn_inner(cgroup, None, program.as_ref(), &args)
    }

    /// Runs `program args...` in pod `pod` (see [`Topology::spawn`]) and
    /// waits for it; on timeout kills it and panics with its stderr.
    pub fn run(
        &self,
        pod: &str,
        program: impl AsRef<OsStr>,
        args: &[impl AsRef<OsStr>],
        timeout: Duration,
    ) -> Output {
        let desc = {
            let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
            describe(program.as_ref(), &args)
        };
        let child = self.spawn(pod, program, args);
        wait_output(child, timeout).unwrap_or_else(|e| panic!("`{desc}` in pod {pod}: {e}"))
    }

    fn kill_spawned(&self) -> Vec<u32> {
        let children = match self.children.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        // Only pids that still are the process spawned (same start time).
        let live: Vec<u32> = children
            .iter()
            .filter(|c| c.start.is_some() && start_time(c.pid) == c.start && alive(c.pid))
            .map(|c| c.pid)
            .collect();
        kill_pids(&live);
        live
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let deadline = Instant::now() + TEARDOWN_WAIT;
        let mut problems = Vec::new();
        // Spawned processes first (one may not have moved into its cgroup
        // yet), then everything in the cgroups.
        let spawned = self.kill_spawned();
        problems.extend(remove_cgroup_tree(
            &self.cgroup_dir,
            &self.cgroups,
            deadline,
        ));
        for _ in 0..200 {
            if spawned.iter().all(|p| !alive(*p)) || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let still: Vec<u32> = spawned.into_iter().filter(|p| alive(*p)).collect();
        if !still.is_empty() {
            problems.push(format!("spawned processes still alive: {still:?}"));
        }
        // Pods (reverse creation order), then the node.
        for ns in self.netns.iter().rev() {
            if let Err(e) = del_netns(ns) {
                problems.push(e);
            }
        }
        for p in problems {
            eprintln!("nodeway topology {}: teardown: {p}", self.id);
        }
    }
}

/// Reads `child`'s stdout line by line until a line contains `needle` and
/// returns it; panics after `timeout` or at end of output. A thread keeps
/// reading (and discarding) the rest of stdout so the child never blocks on
/// a full pipe. Takes `child.stdout`.
pub fn wait_for_stdout_line(child: &mut Child, needle: &str, timeout: Duration) -> String {
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("stdout of pid {} is not piped or already taken", child.id()));
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            // The receiver is gone once the line was found: keep draining.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => {
                if seen.len() < 50 {
                    seen.push(line);
                }
            }
            Err(e) => {
                let status = child.try_wait().ok().flatten();
                panic!(
                    "pid {}: no stdout line containing {needle:?} ({}; exit status {status:?}); \
                     stdout so far: {seen:?}",
                    child.id(),
                    match e {
                        mpsc::RecvTimeoutError::Timeout => format!("timed out after {timeout:?}"),
                        mpsc::RecvTimeoutError::Disconnected => "end of output".to_owned(),
                    }
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trail\04"), r"/trail\04");
    }

    #[test]
    fn ids() {
        assert_eq!(id_pid("nw123x0"), Some(123));
        assert_eq!(id_pid("nw123x10-node"), Some(123));
        assert_eq!(id_pid("nw123x10-a-b"), Some(123));
        assert_eq!(id_pid("nwx1"), None);
        assert_eq!(id_pid("nw12y1"), None);
        assert_eq!(id_pid("nw12x"), None);
        assert_eq!(id_pid("other"), None);
    }

    #[test]
    fn prefixes() {
        assert!(has_prefix("nw5x1-node", "nw5x1"));
        assert!(has_prefix("nw5x1", "nw5x1"));
        assert!(!has_prefix("nw5x10-node", "nw5x1"));
        assert!(!has_prefix("nw55x1", "nw5"));
        assert!(has_prefix("nw55x1", "nw"));
        assert!(has_prefix("nw5x1", "nw5x"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
