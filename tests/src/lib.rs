//! Test support for Nodeway: a misbehaving mock upstream (HTTP/1.1, HTTP/2,
//! gRPC), protocol clients that connect from chosen loopback source IPs, and
//! an access-log reader.

pub mod access_log;
pub mod clients;
pub mod ebpf_mesh;
pub mod fake_apiserver;
pub mod grpc;
pub mod h2_frames;
pub mod mock;
pub mod topology;

use std::net::{IpAddr, SocketAddr};

pub use access_log::AccessLog;
pub use clients::{Outcome, Proto, connect_from, raw_exchange, request, request_and_abort};
pub use mock::{MockOptions, MockUpstream};

/// An address on `ip` where nothing listens: binds `ip:0`, takes the port and
/// closes the listener, so connections to it are refused.
pub fn refused_addr(ip: IpAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    drop(listener);
    addr
}
