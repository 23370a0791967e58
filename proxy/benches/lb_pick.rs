//! `Balancer::pick` cost: LEAST_REQUEST and ROUND_ROBIN over 10, 1 000 and
//! 10 000 endpoints, without and with locality priorities (3 tiers: the
//! client's zone, another zone of its region, another region), plus the
//! priority spill-over path and consistentHash.
//!
//! `cargo bench -p nodeway --bench lb_pick -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nodeway::lb::{Balancer, BalancerConfig, Host, PickContext, hash_bytes};
use nodeway::state::{ConsistentHashKey, Labels, LbPolicy, Locality, SimpleLb};

struct BenchHost {
    addr: SocketAddr,
    locality: Locality,
    healthy: AtomicBool,
    active: AtomicU32,
}

impl Host for BenchHost {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn locality(&self) -> &Locality {
        &self.locality
    }
    fn labels(&self) -> Option<&Labels> {
        None
    }
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

fn locality(region: &str, zone: &str) -> Locality {
    Locality {
        region: Some(region.into()),
        zone: Some(zone.into()),
        subzone: None,
    }
}

/// `n` hosts spread round-robin over three tiers; varied in-flight counts.
fn hosts(n: usize) -> Vec<BenchHost> {
    let tiers = [
        locality("r1", "z1"),
        locality("r1", "z2"),
        locality("r2", "z3"),
    ];
    (0..n)
        .map(|i| BenchHost {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
            locality: tiers[i % 3].clone(),
            healthy: AtomicBool::new(true),
            active: AtomicU32::new((i % 7) as u32),
        })
        .collect()
}

fn bench_pick(c: &mut Criterion) {
    let client = locality("r1", "z1");
    let least_request = LbPolicy::Simple(SimpleLb::LeastRequest);
    let round_robin = LbPolicy::Simple(SimpleLb::RoundRobin);
    let ring_hash = LbPolicy::ConsistentHash {
        key: ConsistentHashKey::HttpHeaderName("x-user".into()),
        minimum_ring_size: None,
    };
    let ctx = PickContext::default();
    let mut group = c.benchmark_group("pick");
    for n in [10usize, 1_000, 10_000] {
        let hs = hosts(n);
        for (name, policy) in [
            ("least_request", &least_request),
            ("round_robin", &round_robin),
        ] {
            for localities in [false, true] {
                let config = BalancerConfig {
                    policy: Some(policy),
                    client_locality: Some(&client),
                    outlier_detection_enabled: localities,
                    ..Default::default()
                };
                let b = Balancer::new(&hs, &config);
                assert_eq!(b.priority_count(), if localities { 3 } else { 1 });
                let id = format!("{name}/{}", if localities { "3_tiers" } else { "plain" });
                group.bench_with_input(BenchmarkId::new(id, n), &n, |bench, _| {
                    bench.iter(|| black_box(b.pick(black_box(&hs), &ctx)))
                });
            }
        }

        // Half of P0 ejected: the full priority-load computation each pick.
        let config = BalancerConfig {
            policy: Some(&least_request),
            client_locality: Some(&client),
            outlier_detection_enabled: true,
            ..Default::default()
        };
        let b = Balancer::new(&hs, &config);
        let p0: Vec<usize> = (0..n).filter(|&i| b.priority_of(i) == 0).collect();
        for &i in &p0[..p0.len() / 2] {
            hs[i].healthy.store(false, Ordering::Relaxed);
            b.host_health_changed(i, false);
        }
        group.bench_with_input(
            BenchmarkId::new("least_request/3_tiers_spill", n),
            &n,
            |bench, _| bench.iter(|| black_box(b.pick(black_box(&hs), &ctx))),
        );
        for &i in &p0[..p0.len() / 2] {
            hs[i].healthy.store(true, Ordering::Relaxed);
        }

        let b = Balancer::new(
            &hs,
            &BalancerConfig {
                policy: Some(&ring_hash),
                ..Default::default()
            },
        );
        let mut key = 0u64;
        group.bench_with_input(BenchmarkId::new("ring_hash", n), &n, |bench, _| {
            bench.iter(|| {
                key = key.wrapping_add(1);
                let ctx = PickContext {
                    tried: &[],
                    hash: Some(hash_bytes(&key.to_le_bytes())),
                };
                black_box(b.pick(black_box(&hs), &ctx))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pick);
criterion_main!(benches);
