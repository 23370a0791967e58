//! Where a redirected connection was originally going.
//!
//! With `--redirect ebpf` the eBPF programs' map answers (`ebpf`); without,
//! `SO_ORIGINAL_DST` works for iptables `REDIRECT`. The proxy only sees this
//! trait, so tests can supply destinations directly. `netns` opens sockets
//! inside pods; `discover` finds a pod's network namespace. Which pods are
//! enrolled is decided above, in `app::enroll`.

pub mod discover;
pub mod ebpf;
pub mod netns;
pub mod pins;

use std::net::SocketAddr;

use tokio::net::TcpStream;

pub trait OriginalDst: Send + Sync + 'static {
    /// The destination the client dialled, if the connection was redirected.
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr>;
}

/// Reads `SO_ORIGINAL_DST`; a connection made straight to the listener has none.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr> {
        let sock = socket2::SockRef::from(stream);
        let local = stream.local_addr().ok()?;
        let dst = if local.is_ipv4() {
            sock.original_dst_v4()
        } else {
            sock.original_dst_v6()
        };
        let dst = dst.ok()?.as_socket()?;
        // Without a redirect the kernel reports the listener itself (or fails).
        (dst != local).then_some(dst)
    }
}
