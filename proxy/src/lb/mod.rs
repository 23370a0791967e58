//! Endpoint choice. Round robin that skips hosts already tried by this
//! request (Istio's `previous_hosts` retry predicate); the DestinationRule
//! algorithms and locality come with the load-balancing issue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::state::Endpoint;

/// Picks the next endpoint not in `tried`; when all were tried, the next one.
/// `endpoints` must not be empty.
pub fn pick<'a>(
    endpoints: &'a [Arc<Endpoint>],
    tried: &[SocketAddr],
    cursor: &AtomicUsize,
) -> &'a Arc<Endpoint> {
    let n = endpoints.len();
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    (0..n)
        .map(|i| &endpoints[(start + i) % n])
        .find(|e| !tried.contains(&e.addr))
        .unwrap_or(&endpoints[start % n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Locality;

    fn ep(port: u16) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ready: true,
            locality: Locality::default(),
            node_name: None,
            pod: None,
        })
    }

    #[test]
    fn skips_tried_hosts_until_all_tried() {
        let eps = vec![ep(1), ep(2), ep(3)];
        let cursor = AtomicUsize::new(0);
        let mut tried = vec![];
        for _ in 0..3 {
            let e = pick(&eps, &tried, &cursor);
            assert!(!tried.contains(&e.addr));
            tried.push(e.addr);
        }
        // All tried: still answers.
        pick(&eps, &tried, &cursor);
    }
}
