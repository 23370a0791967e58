//! Consistent hashing: the stable hash, the per-request hash key
//! ([`request_hash`]) and the ring (Envoy's `RING_HASH`, the default Istio
//! uses for `consistentHash`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::state::{ConsistentHashKey, LbPolicy};

/// Envoy's default `minimum_ring_size` (Istio's `minimumRingSize` default).
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's default `maximum_ring_size` (8M entries); larger requests are capped.
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// FNV-1a over `bytes`, finished with MurmurHash3's 64-bit avalanche so that
/// short keys spread over the whole `u64` range. Stable across Rust versions
/// and platforms (unlike `DefaultHasher`).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// MurmurHash3's `fmix64`: a bijective avalanche of 64 bits.
pub fn mix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Hash input of a `consistentHash` policy for one request.
///
/// `None` when the policy isn't `consistentHash` or the request lacks the key
/// (no such header, cookie or query parameter); `pick` then chooses a random
/// position on the ring, as Envoy does.
///
/// - `httpHeaderName`: the header's value (all values of a repeated header,
///   order-independent);
/// - `httpCookie`: the value of the named cookie (surrounding quotes removed);
///   generating a missing cookie (Istio's `ttl`) is the caller's business;
/// - `useSourceIp`: the client's IP (IPv4-mapped IPv6 counts as IPv4);
/// - `httpQueryParameterName`: the raw (not percent-decoded) value of the first
///   occurrence of the parameter; `?k` without `=` hashes the empty value.
pub fn request_hash(
    policy: Option<&LbPolicy>,
    headers: &http::HeaderMap,
    uri: &http::Uri,
    source_ip: IpAddr,
) -> Option<u64> {
    let Some(LbPolicy::ConsistentHash { key, .. }) = policy else {
        return None;
    };
    match key {
        ConsistentHashKey::HttpHeaderName(name) => header_hash(headers, name),
        ConsistentHashKey::HttpCookie { name, .. } => cookie_value(headers, name).map(hash_bytes),
        ConsistentHashKey::UseSourceIp => Some(match source_ip.to_canonical() {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        }),
        ConsistentHashKey::HttpQueryParameterName(name) => {
            query_value(uri.query()?, name).map(|v| hash_bytes(v.as_bytes()))
        }
    }
}

fn header_hash(headers: &http::HeaderMap, name: &str) -> Option<u64> {
    let mut values = headers.get_all(name).iter();
    let first = hash_bytes(values.next()?.as_bytes());
    // Several values: combine independently of their order (Envoy sorts them).
    let mut acc = first;
    let mut several = false;
    for v in values {
        acc = acc.wrapping_add(hash_bytes(v.as_bytes()));
        several = true;
    }
    Some(if several { mix64(acc) } else { first })
}

/// Value of cookie `name` in the request's `Cookie` header(s).
fn cookie_value<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            if k.trim_ascii() != name.as_bytes() {
                return None;
            }
            let v = v.trim_ascii();
            Some(
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v),
            )
        })
}

/// Value of the first query parameter `name` (raw, not decoded).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if pair == name => Some(""),
            _ => None,
        })
}

/// What decides a ring's layout.
#[derive(PartialEq, Eq, Hash)]
struct RingKey {
    members: Vec<(usize, SocketAddr)>,
    min_size: u64,
}

/// A hash ring over some hosts: sorted entry hashes and, in parallel, the
/// host index of each entry.
#[derive(Default)]
pub struct Ring {
    hashes: Vec<u64>,
    hosts: Vec<u32>,
}

impl Ring {
    /// Builds Envoy-style: every host gets `ceil(min_size / n)` entries (at
    /// least one; total capped at [`MAX_RING_SIZE`]); entry `i` of a host is
    /// placed by hashing its address and `i`, so a host keeps its positions
    /// across configuration generations.
    pub fn build(members: &[(usize, SocketAddr)], min_size: u64) -> Ring {
        if members.is_empty() {
            return Ring::default();
        }
        let n = members.len() as u64;
        let min_size = min_size.clamp(1, MAX_RING_SIZE);
        let per_host = min_size.div_ceil(n).min((MAX_RING_SIZE / n).max(1));
        let mut entries: Vec<(u64, u32)> = Vec::with_capacity((n * per_host) as usize);
        for &(index, addr) in members {
            let base = hash_bytes(addr.to_string().as_bytes());
            for i in 0..per_host {
                let h = mix64(base ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                entries.push((h, index as u32));
            }
        }
        entries.sort_unstable();
        let (hashes, hosts) = entries.into_iter().unzip();
        Ring { hashes, hosts }
    }

    /// The ring for `members` and `min_size`, shared with every balancer
    /// that asks for the same one: client pods with the same endpoints (and
    /// configuration generations that did not change them) use one ring
    /// instead of each building its own, which for a `minimumRingSize` of
    /// millions costs tens of MB and hundreds of milliseconds.
    pub fn shared(members: &[(usize, SocketAddr)], min_size: u64) -> Arc<Ring> {
        static RINGS: LazyLock<Mutex<HashMap<RingKey, Weak<Ring>>>> =
            LazyLock::new(Default::default);
        let key = RingKey {
            members: members.to_vec(),
            min_size,
        };
        // Built under the lock: simultaneous first requests wait for one
        // build instead of each making the same ring.
        let mut rings = RINGS.lock().expect("ring cache lock");
        if let Some(ring) = rings.get(&key).and_then(Weak::upgrade) {
            return ring;
        }
        let ring = Arc::new(Ring::build(members, min_size));
        rings.retain(|_, ring| ring.strong_count() > 0);
        rings.insert(key, Arc::downgrade(&ring));
        ring
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Host indexes in ring order starting at the first entry whose hash is
    /// `>= h` (wrapping), each entry once.
    pub fn walk(&self, h: u64) -> impl Iterator<Item = usize> + '_ {
        let len = self.hashes.len();
        let start = match self.hashes.partition_point(|&x| x < h) {
            p if p == len => 0,
            p => p,
        };
        (0..len).map(move |k| {
            let mut i = start + k;
            if i >= len {
                i -= len;
            }
            self.hosts[i] as usize
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ConsistentHashKey as K;
    use http::{HeaderMap, HeaderValue, Uri};

    fn policy(key: K) -> LbPolicy {
        LbPolicy::ConsistentHash {
            key,
            minimum_ring_size: None,
        }
    }

    fn ip() -> IpAddr {
        IpAddr::from([10, 0, 0, 1])
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values: the ring layout must not change between builds.
        assert_eq!(hash_bytes(b""), mix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash_bytes(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
        assert_ne!(hash_bytes(b"user-1"), hash_bytes(b"user-2"));
    }

    #[test]
    fn non_hash_policies_give_none() {
        let h = HeaderMap::new();
        let u = Uri::from_static("/");
        assert_eq!(request_hash(None, &h, &u, ip()), None);
        let simple = LbPolicy::Simple(crate::state::SimpleLb::RoundRobin);
        assert_eq!(request_hash(Some(&simple), &h, &u, ip()), None);
    }

    #[test]
    fn header_key() {
        let p = policy(K::HttpHeaderName("X-User".into()));
        let u = Uri::from_static("/");
        let mut h = HeaderMap::new();
        assert_eq!(request_hash(Some(&p), &h, &u, ip()), None);
        h.insert("x-user", HeaderValue::from_static("alice"));
        let a = request_hash(Some(&p), &h, &u, ip());
        assert_eq!(a, Some(hash_bytes(b"alice")));
        h.insert("x-user", HeaderValue::from_static("bob"));
        assert_ne!(request_hash(Some(&p), &h, &u, ip()), a);
        // Repeated header: order does not matter.
        let mut h1 = HeaderMap::new();
        h1.append("x-user", HeaderValue::from_static("a"));
        h1.append("x-user", HeaderValue::from_static("b"));
        let mut h2 = HeaderMap::new();
        h2.append("x-user", HeaderValue::from_static("b"));
        h2.append("x-user", HeaderValue::from_static("a"));
        assert_eq!(
            request_hash(Some(&p), &h1, &u, ip()),
            request_hash(Some(&p), &h2, &u, ip())
        );
    }

    #[test]
    fn cookie_key() {
        let p = policy(K::HttpCookie {
            name: "session".into(),
            path: None,
            ttl: None,
        });
        let u = Uri::from_static("/");
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            HeaderValue::from_static("a=1; session=\"xyz\"; b=2"),
        );
        assert_eq!(
            request_hash(Some(&p), &h, &u, ip()),
            Some(hash_bytes(b"xyz"))
        );
        h.insert("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("session=xyz"));
        assert_eq!(
            request_hash(Some(&p), &h, &u, ip()),
            Some(hash_bytes(b"xyz"))
        );
        h.insert("cookie", HeaderValue::from_static("sessionx=1; a=session"));
        assert_eq!(request_hash(Some(&p), &h, &u, ip()), None);
    }

    #[test]
    fn source_ip_key() {
        let p = policy(K::UseSourceIp);
        let h = HeaderMap::new();
        let u = Uri::from_static("/");
        let v4 = request_hash(Some(&p), &h, &u, ip());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(v4, request_hash(Some(&p), &h, &u, mapped));
        assert_ne!(
            v4,
            request_hash(Some(&p), &h, &u, IpAddr::from([10, 0, 0, 2]))
        );
    }

    #[test]
    fn query_key() {
        let p = policy(K::HttpQueryParameterName("user".into()));
        let h = HeaderMap::new();
        let hash = |s: &'static str| request_hash(Some(&p), &h, &Uri::from_static(s), ip());
        assert_eq!(hash("/a?x=1&user=bob&user=eve"), Some(hash_bytes(b"bob")));
        assert_eq!(hash("/a?user"), Some(hash_bytes(b"")));
        assert_eq!(hash("/a?username=bob"), None);
        assert_eq!(hash("/a"), None);
    }

    #[test]
    fn ring_sizes() {
        let members: Vec<(usize, SocketAddr)> = (0..3)
            .map(|i| (i, SocketAddr::from(([10, 0, 0, i as u8], 80))))
            .collect();
        assert_eq!(Ring::build(&members, 1024).len(), 3 * 342);
        assert_eq!(Ring::build(&members, 1).len(), 3);
        assert_eq!(Ring::build(&[], 1024).len(), 0);
        let ring = Ring::build(&members, 1024);
        assert_eq!(ring.walk(0).count(), ring.len());
        assert_eq!(ring.walk(u64::MAX).count(), ring.len());
    }
}
