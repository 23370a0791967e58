//! Map keys and values shared by Nodeway's eBPF programs and the proxy.
//!
//! Addresses are stored as 16 bytes (IPv4 as `::ffff:a.b.c.d`) and ports in
//! host byte order, so both sides build keys the same way. Every struct is
//! `repr(C)` with explicit padding fields, so keys hash identically in the
//! kernel and in userspace.
#![no_std]

/// Port of the in-pod outbound listener that `connect4/6` redirect to.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the in-pod inbound listener that the `sk_lookup` program assigns to.
pub const INBOUND_PORT: u16 = 15006;
/// The inbound listener's port while another Nodeway holds [`INBOUND_PORT`]
/// (during an upgrade). Inbound listeners do not share a port: `sk_lookup`
/// must steer new connections to exactly the newest one.
pub const INBOUND_PORT_ALT: u16 = 15008;
/// Source address of the proxy's inbound forwards to the app; capture skips
/// it (Istio uses the same address for the same purpose).
pub const INBOUND_FORWARD_SRC: [u8; 4] = [127, 0, 0, 6];
/// `SO_MARK` the proxy sets on every socket it dials; `connect4/6` never
/// redirect a socket carrying it, so the proxy cannot loop into itself.
pub const PROXY_MARK: u32 = 0x4e57;

/// `EnrolledNetns::flags`: the pod has an IPv6 loopback listener, so IPv6
/// connects are redirected too.
pub const ENROLLED_IPV6: u32 = 1;

/// Value of the enrolment map, keyed by network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    pub flags: u32,
    pub _pad: u32,
}

/// One end of a TCP connection as seen from one socket, in one network
/// namespace: the key of the original-destination and socket maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub netns: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockTuple {
    /// The same connection seen from the other socket.
    pub fn reversed(&self) -> SockTuple {
        SockTuple {
            netns: self.netns,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Where a redirected connection was going before `connect4/6` rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    pub port: u16,
    /// 4 or 6.
    pub family: u16,
    pub _pad: u32,
}

/// An IPv4 address (network-order bytes) as an IPv4-mapped IPv6 address.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs with explicit padding and no pointers;
    // every bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::EnrolledNetns {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SockTuple {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::OrigDst {}
}
