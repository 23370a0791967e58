//! Sockets inside a pod's network namespace, ztunnel-style.
//!
//! `setns(2)` changes the namespace of the calling thread only, and a socket
//! keeps the namespace it was created in. So the proxy briefly enters a pod's
//! namespace on the current thread, creates the socket and returns; the
//! socket then lives in the pod (its listeners and upstream connections see
//! the pod's addresses and routes) while the proxy serves it as usual.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket};

use nodeway_ebpf_common::PROXY_MARK;

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The proxy's own namespace, to return to after creating a socket in a pod.
fn home_netns() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(file) = HOME.get() {
        return Ok(file);
    }
    // /proc/self is the main thread, which never changes namespace.
    let file = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| file))
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: setns takes a file descriptor we own for the duration of the
    // call and a constant flag; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A pod's network namespace, held open by file descriptor.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

/// Puts the thread back into the proxy's namespace however `run` ends.
struct ReturnHome(&'static File);
impl Drop for ReturnHome {
    fn drop(&mut self) {
        if let Err(err) = setns(self.0) {
            // A worker thread stuck in a pod's namespace would send other
            // pods' traffic from the wrong place: stop rather than risk it.
            eprintln!("nodeway: cannot return to the proxy's network namespace: {err}");
            std::process::abort();
        }
    }
}

impl Netns {
    /// Opens a namespace file such as `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    pub fn open(path: &Path) -> io::Result<Arc<Netns>> {
        let file = File::open(path)?;
        let mut netns = Netns {
            file,
            path: path.to_path_buf(),
            cookie: 0,
        };
        netns.cookie = netns.run(|| {
            let probe = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            netns_cookie(&probe)
        })??;
        Ok(Arc::new(netns))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's identifier of the namespace (what the eBPF programs see).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` with the current thread inside this namespace. `f` must be
    /// quick and synchronous: it runs on whatever thread calls this.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home_netns()?;
        setns(&self.file)?;
        let _back = ReturnHome(home);
        Ok(f())
    }

    /// A listening socket bound to `addr` inside the namespace, shared with
    /// the next Nodeway during an upgrade ([`crate::net::shared_listener`]).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.run(|| {
            enable_request_migration();
            shared_listener(addr)
        })??;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    }
}

/// A listening socket (blocking mode) with `SO_REUSEPORT`: a second Nodeway
/// binds the same address during an upgrade and both accept until the old
/// one closes its socket. With `tcp_migrate_req` on in the namespace,
/// connections still queued on the closed socket move to the other one
/// instead of being reset.
pub fn shared_listener(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

/// [`shared_listener`] in the proxy's own namespace, ready for tokio.
pub fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = shared_listener(addr)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Where `net.ipv4.tcp_migrate_req` is written: the usual path, then a
/// writable mount of the host's `/proc/sys/net` (a container's `/proc/sys`
/// is read-only; the DaemonSet mounts the host's at `/host/proc/sys/net`).
const MIGRATE_REQ_PATHS: [&str; 2] = [
    "/proc/sys/net/ipv4/tcp_migrate_req",
    "/host/proc/sys/net/ipv4/tcp_migrate_req",
];

/// Turns on `net.ipv4.tcp_migrate_req` (Linux 5.14) in the calling thread's
/// network namespace (`/proc/sys/net` follows the opener's namespace,
/// whichever mount it is reached through). Best effort: without it, a
/// handover may reset the few connections queued on the old listener as it
/// closes.
fn enable_request_migration() {
    let mut last = None;
    for path in MIGRATE_REQ_PATHS {
        match std::fs::write(path, "1") {
            Ok(()) => return,
            Err(err) => last = Some(err),
        }
    }
    if let Some(err) = last {
        tracing::debug!(%err, "cannot enable tcp_migrate_req: a handover may reset connections queued on the old listener");
    }
}

impl Netns {
    /// A listening socket bound to `addr` inside the namespace, not shared
    /// with another process (no `SO_REUSEPORT`).
    pub fn listen_exclusive(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.run(|| -> io::Result<Socket> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket)
        })??;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    }
}

/// `SO_NETNS_COOKIE` of a socket: which namespace it lives in.
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is valid for the call; the kernel writes at most `len`
    // bytes into `cookie`, which is exactly that large.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where the proxy opens upstream connections for one client: its own
/// namespace, or (eBPF redirect) the client pod's, marked so the pod's
/// `connect` hook lets them through.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    netns: Option<Arc<Netns>>,
}

impl Dialer {
    pub fn in_netns(netns: Arc<Netns>) -> Dialer {
        Dialer { netns: Some(netns) }
    }

    pub fn netns(&self) -> Option<&Arc<Netns>> {
        self.netns.as_ref()
    }

    pub fn same_netns(&self, other: &Dialer) -> bool {
        self.netns.as_ref().map(|n| n.cookie()) == other.netns.as_ref().map(|n| n.cookie())
    }

    /// A TCP socket ready to connect to an address of `addr`'s family.
    pub fn tcp_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        let Some(netns) = &self.netns else {
            return if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            };
        };
        let socket = netns
            .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))??;
        socket.set_mark(PROXY_MARK)?;
        socket.set_nonblocking(true)?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }
}
