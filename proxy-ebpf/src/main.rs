//! Nodeway's eBPF programs: outbound redirect (`cgroup/connect4`,
//! `cgroup/connect6`), original-destination hand-over and socket-map
//! acceleration (`sockops`, `sk_msg`), inbound capture (`sk_lookup`).
//!
//! Every program lets traffic through unchanged when anything is unexpected:
//! the `try_*` helpers return errors and the entry points map them to "allow".
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock_addr, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use nodeway_ebpf_common::{
    ENROLLED_IPV6, EnrolledNetns, INBOUND_FORWARD_SRC, OUTBOUND_PORT, OrigDst, PROXY_MARK,
    SockTuple, v4_mapped,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
/// Cgroup sock_addr programs: 1 lets the connect proceed.
const ALLOW: i32 = 1;

/// Set by the loader: 1 when `--sockmap on`.
#[unsafe(no_mangle)]
static SOCKMAP_ENABLED: u8 = 0;

/// Network namespaces of enrolled pods, by netns cookie. Filled by the proxy.
#[map]
static ENROLLED: HashMap<u64, EnrolledNetns> = HashMap::with_max_entries(4096, 0);

/// Original destination by socket cookie, from connect until established.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Original destination by the client socket's 4-tuple in its netns; the
/// proxy looks it up with its accepted socket's tuple reversed.
#[map]
static ORIG_BY_TUPLE: LruHashMap<SockTuple, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Established loopback sockets between enrolled apps and the outbound
/// listener, for `sk_msg` redirection. Entries leave when sockets close.
#[map]
static SOCKETS: SockHash<SockTuple> = SockHash::with_max_entries(65536, 0);

/// The inbound listener of each enrolled pod, keyed by the pod's IPv4
/// address (network order), for `sk_lookup`.
#[map]
static INBOUND_LISTENERS: SockHash<u32> = SockHash::with_max_entries(4096, 0);

fn enrolled(netns: u64) -> Option<EnrolledNetns> {
    // SAFETY: the value is copied out immediately; no reference outlives the lookup.
    unsafe { ENROLLED.get(&netns) }.copied()
}

fn is_loopback_v4(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127
}

/// The enrolment of the connecting socket's namespace, when this connect is
/// a TCP connect of an enrolled pod (and not one of the proxy's own sockets).
fn enrolled_tcp_connect(ctx: &SockAddrContext, addr: &bpf_sock_addr) -> Option<EnrolledNetns> {
    if addr.protocol != IPPROTO_TCP || addr.type_ != SOCK_STREAM {
        return None;
    }
    // SAFETY: `sk` is always set for connect hooks; the verifier checks the read.
    let mark = unsafe { (*addr.__bindgen_anon_1.sk).mark };
    if mark == PROXY_MARK {
        return None;
    }
    // SAFETY: ctx is the program's context pointer.
    enrolled(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
}

/// Remembers where the socket was going, by socket cookie. On failure (map
/// full) the caller does not redirect: the proxy could not route it.
fn record_orig(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), i64> {
    // SAFETY: ctx is the program's context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.insert(&cookie, orig, 0).map_err(|err| {
        warn!(ctx, "nodeway connect: cannot record original destination ({}); not redirecting", err);
        i64::from(err)
    })
}

#[cgroup_sock_addr(connect4)]
pub fn nodeway_connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_connect4(&ctx);
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), i64> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    let dst_ip = addr.user_ip4;
    if is_loopback_v4(dst_ip) || enrolled_tcp_connect(ctx, addr).is_none() {
        return Ok(());
    }
    let port = u16::from_be(addr.user_port as u16);
    let orig = OrigDst {
        addr: v4_mapped(dst_ip.to_ne_bytes()),
        port,
        family: 4,
        _pad: 0,
    };
    record_orig(ctx, &orig)?;
    addr.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    addr.user_port = u32::from(OUTBOUND_PORT.to_be());
    debug!(ctx, "nodeway connect4: redirected a connect to port {}", port);
    Ok(())
}

#[cgroup_sock_addr(connect6)]
pub fn nodeway_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    ALLOW
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), i64> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    let bytes = words_to_bytes(addr.user_ip6);
    let v4_mapped_prefix = bytes[..10].iter().all(|b| *b == 0) && bytes[10] == 0xff && bytes[11] == 0xff;
    let loopback6 = bytes[..15].iter().all(|b| *b == 0) && bytes[15] == 1;
    if loopback6 || (v4_mapped_prefix && bytes[12] == 127) {
        return Ok(());
    }
    let Some(enrolment) = enrolled_tcp_connect(ctx, addr) else {
        return Ok(());
    };
    // v4-mapped destinations travel as IPv4 and can reach the IPv4 listener;
    // native IPv6 needs the pod's IPv6 loopback listener.
    if !v4_mapped_prefix && enrolment.flags & ENROLLED_IPV6 == 0 {
        return Ok(());
    }
    let orig = OrigDst {
        addr: bytes,
        port: u16::from_be(addr.user_port as u16),
        family: if v4_mapped_prefix { 4 } else { 6 },
        _pad: 0,
    };
    record_orig(ctx, &orig)?;
    if v4_mapped_prefix {
        addr.user_ip6 = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])];
    } else {
        addr.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    }
    addr.user_port = u32::from(OUTBOUND_PORT.to_be());
    Ok(())
}

/// One volatile load of a context field. The verifier only accepts loads at
/// a constant offset from the context pointer; volatile keeps LLVM from
/// merging the IPv4 and IPv6 branches into one load through a selected pointer.
#[inline(always)]
fn ctx_u32(field: *const u32) -> u32 {
    // SAFETY: `field` points into the context the kernel passed in.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn ctx_ip6(field: *const [u32; 4]) -> [u8; 16] {
    let base = field.cast::<u32>();
    // SAFETY: four consecutive u32 of the same context field.
    let words = unsafe {
        [
            ctx_u32(base),
            ctx_u32(base.add(1)),
            ctx_u32(base.add(2)),
            ctx_u32(base.add(3)),
        ]
    };
    words_to_bytes(words)
}

/// The socket's tuple from a sock_ops context; ports in host order.
fn sock_ops_tuple(ctx: &SockOpsContext, netns: u64) -> Option<SockTuple> {
    let ops = ctx.ops;
    // SAFETY: only field addresses are computed here; loads go through ctx_u32.
    // Every field is loaded up front, each at its own constant offset;
    // loads inside the branches get merged by LLVM into one the verifier rejects.
    let family = ctx_u32(unsafe { &raw const (*ops).family });
    let local4 = v4_mapped(ctx_u32(unsafe { &raw const (*ops).local_ip4 }).to_ne_bytes());
    let remote4 = v4_mapped(ctx_u32(unsafe { &raw const (*ops).remote_ip4 }).to_ne_bytes());
    let local6 = ctx_ip6(unsafe { &raw const (*ops).local_ip6 });
    let remote6 = ctx_ip6(unsafe { &raw const (*ops).remote_ip6 });
    let (local_addr, remote_addr) = match family {
        AF_INET => (local4, remote4),
        AF_INET6 => (local6, remote6),
        _ => return None,
    };
    let local_port = ctx_u32(unsafe { &raw const (*ops).local_port });
    let remote_port = ctx_u32(unsafe { &raw const (*ops).remote_port });
    Some(SockTuple {
        netns,
        local_addr,
        remote_addr,
        local_port: local_port as u16,
        // The kernel hands the remote port in network order in the upper half.
        remote_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
    })
}

fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = words[i].to_ne_bytes();
        bytes[i * 4] = w[0];
        bytes[i * 4 + 1] = w[1];
        bytes[i * 4 + 2] = w[2];
        bytes[i * 4 + 3] = w[3];
        i += 1;
    }
    bytes
}

#[sock_ops]
pub fn nodeway_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    0
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // SAFETY: ctx is the program's context pointer.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if enrolled(netns).is_none() {
        return Ok(());
    }
    let tuple = sock_ops_tuple(ctx, netns).ok_or(0i64)?;
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if tuple.remote_port != OUTBOUND_PORT {
            return Ok(());
        }
        // An app socket redirected by connect4/6 just connected to the
        // outbound listener: re-key its original destination by tuple.
        // SAFETY: ctx is the program's context pointer.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: copied out before the map can change.
        let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
            return Ok(());
        };
        let _ = ORIG_BY_COOKIE.remove(&cookie);
        ORIG_BY_TUPLE.insert(&tuple, &orig, 0).map_err(i64::from)?;
    } else if tuple.local_port != OUTBOUND_PORT {
        return Ok(());
    }
    // SAFETY: reading a global set once at load time.
    if unsafe { core::ptr::read_volatile(&SOCKMAP_ENABLED) } != 0 {
        let mut key = tuple;
        // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this callback.
        SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, 0).map_err(i64::from)?;
    }
    Ok(())
}

/// Hands each message to the peer socket's receive queue, skipping the
/// loopback TCP stack. Without a peer in the map it takes the normal path.
#[sk_msg]
pub fn nodeway_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: only field addresses are computed here; loads go through ctx_u32.
    // Every field is loaded up front, each at its own constant offset;
    // loads inside the branches get merged by LLVM into one the verifier rejects.
    let family = ctx_u32(unsafe { &raw const (*md).family });
    let local4 = v4_mapped(ctx_u32(unsafe { &raw const (*md).local_ip4 }).to_ne_bytes());
    let remote4 = v4_mapped(ctx_u32(unsafe { &raw const (*md).remote_ip4 }).to_ne_bytes());
    let local6 = ctx_ip6(unsafe { &raw const (*md).local_ip6 });
    let remote6 = ctx_ip6(unsafe { &raw const (*md).remote_ip6 });
    let (local_addr, remote_addr) = match family {
        AF_INET => (local4, remote4),
        AF_INET6 => (local6, remote6),
        _ => return sk_action::SK_PASS,
    };
    let local_port = ctx_u32(unsafe { &raw const (*md).local_port });
    let remote_port = ctx_u32(unsafe { &raw const (*md).remote_port });
    // SAFETY: ctx is the program's context pointer.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Key of the peer socket: this socket's tuple reversed.
    let mut peer = SockTuple {
        netns,
        local_addr: remote_addr,
        remote_addr: local_addr,
        local_port: u16::from_be((remote_port >> 16) as u16),
        remote_port: local_port as u16,
        _pad: 0,
    };
    let _ = SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    sk_action::SK_PASS
}

/// Delivers connections arriving for an enrolled pod's own IPv4 address to
/// the pod's inbound listener, except the proxy's own forwards.
#[sk_lookup]
pub fn nodeway_inbound(ctx: SkLookupContext) -> u32 {
    let _ = try_inbound(&ctx);
    sk_action::SK_PASS
}

fn try_inbound(ctx: &SkLookupContext) -> Result<(), i32> {
    // SAFETY: the kernel passes a valid bpf_sk_lookup for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return Ok(());
    }
    let remote = lookup.remote_ip4.to_ne_bytes();
    if remote == INBOUND_FORWARD_SRC || is_loopback_v4(lookup.local_ip4) {
        return Ok(());
    }
    let local_port = lookup.local_port as u16;
    if local_port == OUTBOUND_PORT
        || local_port == nodeway_ebpf_common::INBOUND_PORT
        || local_port == nodeway_ebpf_common::INBOUND_PORT_ALT
    {
        return Ok(());
    }
    INBOUND_LISTENERS.redirect_sk_lookup(ctx, lookup.local_ip4, 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
