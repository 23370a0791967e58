use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::*;
use crate::state::{ConsistentHashKey, Labels, LbPolicy, Locality, SimpleLb};

struct TestHost {
    addr: SocketAddr,
    locality: Locality,
    labels: Option<Labels>,
    healthy: AtomicBool,
    active: AtomicU32,
}

impl Host for TestHost {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn locality(&self) -> &Locality {
        &self.locality
    }
    fn labels(&self) -> Option<&Labels> {
        self.labels.as_ref()
    }
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

fn loc(s: &str) -> Locality {
    let mut p = s.split('/').map(|x| (!x.is_empty()).then(|| x.to_string()));
    Locality {
        region: p.next().flatten(),
        zone: p.next().flatten(),
        subzone: p.next().flatten(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn host(i: usize, locality: &str) -> TestHost {
    TestHost {
        addr: SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
        locality: loc(locality),
        labels: None,
        healthy: AtomicBool::new(true),
        active: AtomicU32::new(0),
    }
}

/// Hosts with the given localities, in order.
fn hosts(localities: &[&str]) -> Vec<TestHost> {
    localities
        .iter()
        .enumerate()
        .map(|(i, l)| host(i, l))
        .collect()
}

fn n_hosts(n: usize) -> Vec<TestHost> {
    (0..n).map(|i| host(i, "")).collect()
}

fn policy(lb: SimpleLb) -> LbPolicy {
    LbPolicy::Simple(lb)
}

fn config(policy: Option<&LbPolicy>) -> BalancerConfig<'_> {
    BalancerConfig {
        policy,
        ..Default::default()
    }
}

fn set_health(b: &Balancer, hosts: &[TestHost], i: usize, healthy: bool) {
    hosts[i].healthy.store(healthy, Ordering::Relaxed);
    b.host_health_changed(i, healthy);
}

/// How often each host was picked in `n` picks.
fn counts(b: &Balancer, hosts: &[TestHost], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut c = vec![0; hosts.len()];
    for _ in 0..n {
        let i = b
            .pick_with_rng(hosts, &PickContext::default(), &mut rng)
            .expect("a host");
        c[i] += 1;
    }
    c
}

/// Share of picks that went to each priority.
fn priority_shares(b: &Balancer, hosts: &[TestHost], n: usize, seed: u64) -> Vec<f64> {
    let c = counts(b, hosts, n, seed);
    let mut shares = vec![0.0; b.priority_count()];
    for (i, k) in c.iter().enumerate() {
        shares[b.priority_of(i)] += *k as f64 / n as f64;
    }
    shares
}

fn assert_near(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual:.4} not within {tolerance} of {expected}"
    );
}

const ALL_SIMPLE: [SimpleLb; 3] = [
    SimpleLb::LeastRequest,
    SimpleLb::RoundRobin,
    SimpleLb::Random,
];

// ---------------------------------------------------------------------------
// Algorithms
// ---------------------------------------------------------------------------

#[test]
fn default_policy_is_least_request() {
    let hs = n_hosts(3);
    let b = Balancer::new(&hs, &config(None));
    assert_eq!(b.algorithm, Algorithm::LeastRequest);
    assert!(!b.is_passthrough());
    assert_eq!(b.priority_count(), 1);
}

#[test]
fn balancer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Balancer>();
    let hs = Arc::new(n_hosts(8));
    let p = policy(SimpleLb::RoundRobin);
    let b = Arc::new(Balancer::new(&hs, &config(Some(&p))));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (b, hs) = (b.clone(), hs.clone());
            std::thread::spawn(move || {
                let mut c = vec![0usize; 8];
                for _ in 0..8_000 {
                    c[b.pick(&hs, &PickContext::default()).unwrap()] += 1;
                }
                c
            })
        })
        .collect();
    let mut total = vec![0usize; 8];
    for t in threads {
        for (sum, k) in total.iter_mut().zip(t.join().unwrap()) {
            *sum += k;
        }
    }
    // One shared cursor: exactly even in total.
    assert_eq!(total, vec![4_000; 8]);
}

#[test]
fn round_robin_cycles() {
    let hs = n_hosts(4);
    let p = policy(SimpleLb::RoundRobin);
    let b = Balancer::new(&hs, &config(Some(&p)));
    let seq: Vec<usize> = (0..12)
        .map(|_| b.pick(&hs, &PickContext::default()).unwrap())
        .collect();
    for w in seq.chunks(4) {
        let mut sorted = w.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3], "{seq:?}");
    }
    for i in 0..8 {
        assert_eq!(seq[i], seq[i + 4]);
        assert_eq!((seq[i] + 1) % 4, seq[i + 1], "consecutive order: {seq:?}");
    }
}

#[test]
fn round_robin_skips_ejected_evenly() {
    let hs = n_hosts(4);
    let p = policy(SimpleLb::RoundRobin);
    let b = Balancer::new(&hs, &config(Some(&p)));
    set_health(&b, &hs, 1, false);
    let c = counts(&b, &hs, 300, 1);
    assert_eq!(c, vec![100, 0, 100, 100]);
}

#[test]
fn least_request_prefers_less_loaded() {
    let hs = n_hosts(3);
    hs[0].active.store(10, Ordering::Relaxed);
    hs[1].active.store(5, Ordering::Relaxed);
    let b = Balancer::new(&hs, &config(None));
    let n = 60_000;
    let c = counts(&b, &hs, n, 7);
    // Two draws with replacement: the least loaded wins unless both miss it.
    assert_near(c[2] as f64 / n as f64, 5.0 / 9.0, 0.015, "least loaded");
    assert_near(c[1] as f64 / n as f64, 3.0 / 9.0, 0.015, "middle");
    assert_near(c[0] as f64 / n as f64, 1.0 / 9.0, 0.015, "most loaded");
}

#[test]
fn least_request_and_random_spread_evenly() {
    for lb in [SimpleLb::LeastRequest, SimpleLb::Random] {
        let hs = n_hosts(5);
        let p = policy(lb);
        let b = Balancer::new(&hs, &config(Some(&p)));
        let c = counts(&b, &hs, 50_000, 3);
        for k in c {
            assert_near(k as f64 / 50_000.0, 0.2, 0.01, &format!("{lb:?}"));
        }
    }
}

#[test]
fn ejected_hosts_are_not_picked() {
    for lb in ALL_SIMPLE {
        let hs = n_hosts(10);
        let p = policy(lb);
        let b = Balancer::new(&hs, &config(Some(&p)));
        // Most ejected: exercises the counting fallback of random choice.
        for i in 0..8 {
            set_health(&b, &hs, i, false);
        }
        let c = counts(&b, &hs, 10_000, 5);
        assert_eq!(c[..8].iter().sum::<usize>(), 0, "{lb:?}: {c:?}");
        assert_near(c[8] as f64 / 10_000.0, 0.5, 0.03, &format!("{lb:?}"));
    }
}

#[test]
fn all_ejected_without_panic_gives_none() {
    for lb in ALL_SIMPLE {
        let hs = n_hosts(3);
        let p = policy(lb);
        let b = Balancer::new(&hs, &config(Some(&p)));
        for i in 0..3 {
            set_health(&b, &hs, i, false);
        }
        assert_eq!(b.pick(&hs, &PickContext::default()), None, "{lb:?}");
        set_health(&b, &hs, 2, true);
        assert_eq!(b.pick(&hs, &PickContext::default()), Some(2), "{lb:?}");
    }
}

#[test]
fn empty_cluster_gives_none() {
    let hs: Vec<TestHost> = Vec::new();
    let b = Balancer::new(&hs, &config(None));
    assert_eq!(b.pick(&hs, &PickContext::default()), None);
    assert_eq!(b.priority_count(), 0);
}

#[test]
fn initial_health_is_read_and_reports_are_idempotent() {
    let hs = n_hosts(4);
    hs[0].healthy.store(false, Ordering::Relaxed);
    let b = Balancer::new(&hs, &config(None));
    assert_eq!(b.groups[0].healthy(), 3);
    b.host_health_changed(0, false);
    b.host_health_changed(1, true);
    assert_eq!(b.groups[0].healthy(), 3);
    set_health(&b, &hs, 1, false);
    b.host_health_changed(1, false);
    assert_eq!(b.groups[0].healthy(), 2);
    b.host_health_changed(99, false); // out of range: ignored
}

#[test]
fn passthrough() {
    let hs = n_hosts(2);
    let p = policy(SimpleLb::Passthrough);
    let b = Balancer::new(&hs, &config(Some(&p)));
    assert!(b.is_passthrough());
    // Asked anyway, it still answers with a healthy host.
    assert!(b.pick(&hs, &PickContext::default()).is_some());
}

#[test]
fn tried_hosts_are_avoided() {
    for lb in ALL_SIMPLE {
        let hs = n_hosts(3);
        let p = policy(lb);
        let b = Balancer::new(&hs, &config(Some(&p)));
        let tried = [hs[0].addr, hs[2].addr];
        let ctx = PickContext {
            tried: &tried,
            hash: None,
        };
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2_000 {
            assert_eq!(b.pick_with_rng(&hs, &ctx, &mut rng), Some(1), "{lb:?}");
        }
        // Every host tried: still answers.
        let all = [hs[0].addr, hs[1].addr, hs[2].addr];
        let ctx = PickContext {
            tried: &all,
            hash: None,
        };
        assert!(b.pick(&hs, &ctx).is_some());
        // A tried host is preferred over an ejected one.
        set_health(&b, &hs, 1, false);
        let ctx = PickContext {
            tried: &tried,
            hash: None,
        };
        let i = b.pick(&hs, &ctx).unwrap();
        assert!(i == 0 || i == 2, "{lb:?}");
    }
}

// ---------------------------------------------------------------------------
// Consistent hash
// ---------------------------------------------------------------------------

fn ring_policy(min: Option<u64>) -> LbPolicy {
    LbPolicy::ConsistentHash {
        key: ConsistentHashKey::HttpHeaderName("x-user".into()),
        minimum_ring_size: min,
    }
}

fn keyed(h: u64) -> PickContext<'static> {
    PickContext {
        tried: &[],
        hash: Some(h),
    }
}

#[test]
fn ring_hash_is_stable_and_spreads_keys() {
    let hs = n_hosts(4);
    let p = ring_policy(None);
    let b = Balancer::new(&hs, &config(Some(&p)));
    let b2 = Balancer::new(&hs, &config(Some(&p)));
    let mut c = [0usize; 4];
    for k in 0..4_000u64 {
        let h = hash_bytes(format!("user-{k}").as_bytes());
        let i = b.pick(&hs, &keyed(h)).unwrap();
        assert_eq!(b.pick(&hs, &keyed(h)), Some(i), "same key, same host");
        assert_eq!(b2.pick(&hs, &keyed(h)), Some(i), "same across rebuilds");
        c[i] += 1;
    }
    for k in c {
        assert_near(k as f64 / 4_000.0, 0.25, 0.08, "ring share");
    }
}

#[test]
fn ring_hash_moves_few_keys_when_a_host_is_added() {
    let p = ring_policy(None);
    let four = n_hosts(4);
    let five = n_hosts(5);
    let b4 = Balancer::new(&four, &config(Some(&p)));
    let b5 = Balancer::new(&five, &config(Some(&p)));
    let moved = (0..2_000u64)
        .filter(|k| {
            let h = hash_bytes(&k.to_le_bytes());
            let a = four[b4.pick(&four, &keyed(h)).unwrap()].addr;
            let b = five[b5.pick(&five, &keyed(h)).unwrap()].addr;
            a != b
        })
        .count();
    // Ideal: 1/5 of the keys move to the new host.
    assert!(moved < 2_000 * 3 / 10, "{moved} keys moved");
}

#[test]
fn ring_hash_skips_ejected_hosts_and_comes_back() {
    let hs = n_hosts(4);
    let p = ring_policy(Some(64));
    let b = Balancer::new(&hs, &config(Some(&p)));
    let keys: Vec<u64> = (0..500u64).map(|k| hash_bytes(&k.to_be_bytes())).collect();
    let before: Vec<usize> = keys
        .iter()
        .map(|&h| b.pick(&hs, &keyed(h)).unwrap())
        .collect();
    set_health(&b, &hs, 2, false);
    for (&h, &was) in keys.iter().zip(&before) {
        let now = b.pick(&hs, &keyed(h)).unwrap();
        assert_ne!(now, 2);
        if was != 2 {
            assert_eq!(now, was, "keys of healthy hosts stay");
        }
    }
    set_health(&b, &hs, 2, true);
    let after: Vec<usize> = keys
        .iter()
        .map(|&h| b.pick(&hs, &keyed(h)).unwrap())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn ring_hash_without_key_is_random_and_avoids_tried() {
    let hs = n_hosts(3);
    let p = ring_policy(None);
    let b = Balancer::new(&hs, &config(Some(&p)));
    let c = counts(&b, &hs, 9_000, 9);
    for k in c {
        assert_near(k as f64 / 9_000.0, 1.0 / 3.0, 0.06, "keyless ring pick");
    }
    let h = hash_bytes(b"alice");
    let first = b.pick(&hs, &keyed(h)).unwrap();
    let tried = [hs[first].addr];
    let retry = b
        .pick(
            &hs,
            &PickContext {
                tried: &tried,
                hash: Some(h),
            },
        )
        .unwrap();
    assert_ne!(retry, first);
}

// ---------------------------------------------------------------------------
// Locality priorities
// ---------------------------------------------------------------------------

const CLIENT: &str = "r1/z1/s1";

fn locality_config<'a>(
    policy: Option<&'a LbPolicy>,
    client: &'a Locality,
    setting: Option<&'a LocalityLbSetting>,
) -> BalancerConfig<'a> {
    BalancerConfig {
        policy,
        locality_setting: setting,
        client_locality: Some(client),
        client_labels: None,
        outlier_detection_enabled: true,
        min_health_percent: 0,
    }
}

/// 3 hosts in the client's subzone, 3 in another zone of its region, 3 in
/// another region.
fn three_tiers() -> Vec<TestHost> {
    let mut l = vec!["r1/z1/s1"; 3];
    l.extend(["r1/z2/s1"; 3]);
    l.extend(["r2/z1/s1"; 3]);
    hosts(&l)
}

#[test]
fn default_locality_priorities_are_dense() {
    let hs = three_tiers();
    let client = loc(CLIENT);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    let p: Vec<usize> = (0..9).map(|i| b.priority_of(i)).collect();
    // Match levels 0 (subzone), 2 (region), 3 (other) renumbered 0, 1, 2.
    assert_eq!(p, vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
    assert_eq!(b.priority_count(), 3);

    let hs = hosts(&["r1/z1/s1", "r1/z1/s2", "r1/z2", "r9", ""]);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    let p: Vec<usize> = (0..5).map(|i| b.priority_of(i)).collect();
    assert_eq!(p, vec![0, 1, 2, 3, 3]);
}

#[test]
fn locality_needs_outlier_detection_known_client_and_not_disabled() {
    let hs = three_tiers();
    let client = loc(CLIENT);
    let mut cfg = locality_config(None, &client, None);
    cfg.outlier_detection_enabled = false;
    assert_eq!(Balancer::new(&hs, &cfg).priority_count(), 1);

    let mut cfg = locality_config(None, &client, None);
    cfg.client_locality = None;
    assert_eq!(Balancer::new(&hs, &cfg).priority_count(), 1);

    let off = LocalityLbSetting {
        enabled: Some(false),
        ..Default::default()
    };
    let cfg = locality_config(None, &client, Some(&off));
    assert_eq!(Balancer::new(&hs, &cfg).priority_count(), 1);

    let on = LocalityLbSetting {
        enabled: Some(true),
        ..Default::default()
    };
    let cfg = locality_config(None, &client, Some(&on));
    assert_eq!(Balancer::new(&hs, &cfg).priority_count(), 3);
}

#[test]
fn all_traffic_to_p0_while_healthy() {
    for lb in ALL_SIMPLE {
        let hs = three_tiers();
        let client = loc(CLIENT);
        let p = policy(lb);
        let b = Balancer::new(&hs, &locality_config(Some(&p), &client, None));
        let shares = priority_shares(&b, &hs, 3_000, 1);
        assert_eq!(shares[0], 1.0, "{lb:?}");
    }
}

#[test]
fn p0_with_one_of_three_ejected() {
    // Envoy: health_0 = min(100, 140 * 2/3) = 93, so 93% stays in P0 and 7%
    // spills to P1 (2/3 * 1.4 = 0.93 is below 1).
    let hs = three_tiers();
    let client = loc(CLIENT);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    set_health(&b, &hs, 0, false);
    let shares = priority_shares(&b, &hs, 20_000, 2);
    assert_near(shares[0], 0.93, 0.01, "P0");
    assert_near(shares[1], 0.07, 0.01, "P1");
    assert_eq!(shares[2], 0.0);
}

#[test]
fn p0_with_enough_healthy_keeps_all_traffic() {
    // 4 of 5 healthy: 4/5 * 1.4 = 112% → capped at 100%: all of it.
    let mut l = vec!["r1/z1/s1"; 5];
    l.extend(["r2"; 5]);
    let hs = hosts(&l);
    let client = loc(CLIENT);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    set_health(&b, &hs, 0, false);
    let shares = priority_shares(&b, &hs, 5_000, 3);
    assert_eq!(shares[0], 1.0);
}

#[test]
fn p0_fully_ejected_sends_all_to_p1() {
    for lb in ALL_SIMPLE {
        let hs = three_tiers();
        let client = loc(CLIENT);
        let p = policy(lb);
        let b = Balancer::new(&hs, &locality_config(Some(&p), &client, None));
        for i in 0..3 {
            set_health(&b, &hs, i, false);
        }
        let shares = priority_shares(&b, &hs, 3_000, 4);
        assert_eq!(shares[1], 1.0, "{lb:?}");
        // P0 and P1 gone: P2.
        for i in 3..6 {
            set_health(&b, &hs, i, false);
        }
        let shares = priority_shares(&b, &hs, 3_000, 4);
        assert_eq!(shares[2], 1.0, "{lb:?}");
    }
}

fn ten_per_priority(priorities: usize) -> Vec<TestHost> {
    let tiers = ["r1/z1/s1", "r1/z2", "r2"];
    let l: Vec<&str> = tiers[..priorities]
        .iter()
        .flat_map(|t| std::iter::repeat_n(*t, 10))
        .collect();
    hosts(&l)
}

#[test]
fn partial_spill_over_follows_the_overprovisioning_formula() {
    let client = loc(CLIENT);
    // P0 5/10 healthy: 70% to P0, 30% to P1.
    let hs = ten_per_priority(2);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    for i in 0..5 {
        set_health(&b, &hs, i, false);
    }
    let s = priority_shares(&b, &hs, 40_000, 5);
    assert_near(s[0], 0.70, 0.01, "P0");
    assert_near(s[1], 0.30, 0.01, "P1");

    // P0 3/10 (42), P1 2/10 (28), P2 full: 42 / 28 / 30.
    let hs = ten_per_priority(3);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    for i in (0..7).chain(10..18) {
        set_health(&b, &hs, i, false);
    }
    let s = priority_shares(&b, &hs, 40_000, 6);
    assert_near(s[0], 0.42, 0.01, "P0");
    assert_near(s[1], 0.28, 0.01, "P1");
    assert_near(s[2], 0.30, 0.01, "P2");

    // Not enough health in total (42 + 28 = 70 < 100): normalized to 60 / 40.
    let hs = ten_per_priority(2);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    for i in (0..7).chain(10..18) {
        set_health(&b, &hs, i, false);
    }
    let s = priority_shares(&b, &hs, 40_000, 7);
    assert_near(s[0], 0.60, 0.01, "P0");
    assert_near(s[1], 0.40, 0.01, "P1");
}

#[test]
fn failover_puts_the_target_region_next() {
    let hs = hosts(&["r1/z1", "r1/z2", "r2/z1", "r3/z1", "r4/z1"]);
    let client = loc("r1/z1");
    let setting = LocalityLbSetting {
        failover: vec![("r1".into(), "r3".into())],
        ..Default::default()
    };
    let b = Balancer::new(&hs, &locality_config(None, &client, Some(&setting)));
    let p: Vec<usize> = (0..5).map(|i| b.priority_of(i)).collect();
    assert_eq!(p, vec![0, 1, 3, 2, 3]);
    // Region r1 out: all traffic to r3.
    set_health(&b, &hs, 0, false);
    set_health(&b, &hs, 1, false);
    assert_eq!(counts(&b, &hs, 1_000, 8)[3], 1_000);
}

#[test]
fn failover_priority_ranks_by_leading_matching_labels() {
    let client = loc("r1/z1");
    let client_labels = labels(&[("topology.istio.io/network", "n1"), ("rack", "a")]);
    let ep = |i: usize, locality: &str, net: &str, rack: &str| {
        let mut h = host(i, locality);
        h.labels = Some(labels(&[
            ("topology.istio.io/network", net),
            ("rack", rack),
        ]));
        h
    };
    let hs = vec![
        ep(0, "r2/z9", "n1", "a"), // both match
        ep(1, "r1/z1", "n1", "b"), // network only
        ep(2, "r1/z1", "n2", "a"), // network differs
        ep(3, "r1/z1", "n1", "a"), // both match
    ];
    let setting = LocalityLbSetting {
        failover_priority: vec!["topology.istio.io/network".into(), "rack".into()],
        ..Default::default()
    };
    let mut cfg = locality_config(None, &client, Some(&setting));
    cfg.client_labels = Some(&client_labels);
    let b = Balancer::new(&hs, &cfg);
    // Labels alone decide: locality is ignored without `failover`.
    let p: Vec<usize> = (0..4).map(|i| b.priority_of(i)).collect();
    assert_eq!(p, vec![0, 1, 2, 0]);

    // With `failover` too, locality refines each label priority.
    let setting = LocalityLbSetting {
        failover_priority: vec!["topology.istio.io/network".into(), "rack".into()],
        failover: vec![("r1".into(), "r2".into())],
        ..Default::default()
    };
    let mut cfg = locality_config(None, &client, Some(&setting));
    cfg.client_labels = Some(&client_labels);
    let b = Balancer::new(&hs, &cfg);
    let p: Vec<usize> = (0..4).map(|i| b.priority_of(i)).collect();
    assert_eq!(p, vec![1, 2, 3, 0]);

    // Locality keys compare localities.
    let setting = LocalityLbSetting {
        failover_priority: vec!["topology.kubernetes.io/zone".into()],
        ..Default::default()
    };
    let b = Balancer::new(&hs, &locality_config(None, &client, Some(&setting)));
    let p: Vec<usize> = (0..4).map(|i| b.priority_of(i)).collect();
    assert_eq!(p, vec![1, 0, 0, 0]);
}

#[test]
fn distribute_weights_localities() {
    let hs = hosts(&["r1/z1", "r1/z1", "r1/z2", "r1/z2", "r1/z3", "r1/z3"]);
    let client = loc("r1/z1");
    let setting = LocalityLbSetting {
        distribute: vec![
            (
                "r1/z9/*".into(),
                vec![("r1/z3/*".into(), 100)], // not this client
            ),
            (
                "r1/z1/*".into(),
                vec![("r1/z1/*".into(), 80), ("r1/z2/*".into(), 20)],
            ),
        ],
        ..Default::default()
    };
    let mut cfg = locality_config(None, &client, Some(&setting));
    // `distribute` doesn't depend on outlier detection.
    cfg.outlier_detection_enabled = false;
    let b = Balancer::new(&hs, &cfg);
    assert_eq!(b.priority_count(), 1);
    let n = 40_000;
    let c = counts(&b, &hs, n, 10);
    let share = |a: usize, b: usize| (c[a] + c[b]) as f64 / n as f64;
    assert_near(share(0, 1), 0.8, 0.01, "z1");
    assert_near(share(2, 3), 0.2, 0.01, "z2");
    assert_eq!(share(4, 5), 0.0, "z3 is not a target");

    // Half of z1 ejected: weight 80 * min(1, 1.4 * 0.5) = 56 against 20.
    set_health(&b, &hs, 0, false);
    let c = counts(&b, &hs, n, 11);
    let share = |a: usize, b: usize| (c[a] + c[b]) as f64 / n as f64;
    assert_near(share(0, 1), 56.0 / 76.0, 0.01, "z1 degraded");
    assert_eq!(c[0], 0);

    // A wildcard target shares its weight by endpoint count.
    let hs = hosts(&["r1/z1", "r2/z1", "r2/z2", "r2/z2", "r2/z2"]);
    let setting = LocalityLbSetting {
        distribute: vec![("*".into(), vec![("r1".into(), 50), ("r2/*".into(), 50)])],
        ..Default::default()
    };
    let b = Balancer::new(&hs, &locality_config(None, &client, Some(&setting)));
    let c = counts(&b, &hs, n, 12);
    let f = |i: usize| c[i] as f64 / n as f64;
    // r1 50; r2/z1 ceil(1*50/4) = 13; r2/z2 ceil(3*50/4) = 38 (of 101).
    assert_near(f(0), 50.0 / 101.0, 0.01, "r1");
    assert_near(f(1), 13.0 / 101.0, 0.01, "r2/z1");
    assert_near(f(2) + f(3) + f(4), 38.0 / 101.0, 0.01, "r2/z2");
}

#[test]
fn panic_mode_ignores_health() {
    let hs = n_hosts(4);
    let p = policy(SimpleLb::RoundRobin);
    let mut cfg = config(Some(&p));
    cfg.min_health_percent = 50;
    let b = Balancer::new(&hs, &cfg);
    set_health(&b, &hs, 0, false);
    set_health(&b, &hs, 1, false);
    // 50% healthy is not below 50%: only healthy hosts.
    assert_eq!(counts(&b, &hs, 100, 1), vec![0, 0, 50, 50]);
    // 25% < 50%: panic, every host again.
    set_health(&b, &hs, 2, false);
    assert_eq!(counts(&b, &hs, 100, 1), vec![25, 25, 25, 25]);
    for i in 0..4 {
        set_health(&b, &hs, i, false);
    }
    assert!(b.pick(&hs, &PickContext::default()).is_some());

    // Without a threshold: never panic.
    let b = Balancer::new(&hs, &config(Some(&p)));
    assert_eq!(b.pick(&hs, &PickContext::default()), None);
}

#[test]
fn panic_mode_with_priorities() {
    let client = loc(CLIENT);
    let hs = ten_per_priority(2);
    let mut cfg = locality_config(None, &client, None);
    cfg.min_health_percent = 30;
    let b = Balancer::new(&hs, &cfg);
    // P0 2/10 healthy (health 28, in panic: 20% < 30%), P1 full: P0 gets 28%
    // of the load, spread over all of its hosts.
    for i in 0..8 {
        set_health(&b, &hs, i, false);
    }
    let c = counts(&b, &hs, 40_000, 13);
    let p0: usize = c[..10].iter().sum();
    assert_near(p0 as f64 / 40_000.0, 0.28, 0.01, "P0");
    assert!(
        c[..8].iter().all(|&k| k > 0),
        "ejected P0 hosts used: {c:?}"
    );

    // Everything ejected: total panic, load by host counts.
    for i in 0..20 {
        set_health(&b, &hs, i, false);
    }
    let s = priority_shares(&b, &hs, 20_000, 14);
    assert_near(s[0], 0.5, 0.02, "P0 in total panic");

    // Distribute mode panics as a whole.
    let setting = LocalityLbSetting {
        distribute: vec![("*".into(), vec![("r1/z1".into(), 75), ("r1/z2".into(), 25)])],
        ..Default::default()
    };
    let mut cfg = locality_config(None, &client, Some(&setting));
    cfg.min_health_percent = 30;
    let b = Balancer::new(&hs, &cfg);
    for i in 0..20 {
        set_health(&b, &hs, i, false);
    }
    let c = counts(&b, &hs, 20_000, 15);
    let z1: usize = c[..10].iter().sum();
    assert_near(
        z1 as f64 / 20_000.0,
        0.75,
        0.015,
        "configured weights in panic",
    );
}

#[test]
fn consistent_hash_with_priorities_stays_in_p0() {
    let hs = three_tiers();
    let client = loc(CLIENT);
    let p = ring_policy(None);
    let b = Balancer::new(&hs, &locality_config(Some(&p), &client, None));
    for k in 0..300u64 {
        let h = hash_bytes(&k.to_le_bytes());
        let i = b.pick(&hs, &keyed(h)).unwrap();
        assert_eq!(b.priority_of(i), 0);
        assert_eq!(b.pick(&hs, &keyed(h)), Some(i));
    }
}

#[test]
fn tried_hosts_avoided_within_the_chosen_priority() {
    let hs = three_tiers();
    let client = loc(CLIENT);
    let b = Balancer::new(&hs, &locality_config(None, &client, None));
    let tried = [hs[0].addr, hs[1].addr];
    let ctx = PickContext {
        tried: &tried,
        hash: None,
    };
    for _ in 0..500 {
        assert_eq!(b.pick(&hs, &ctx), Some(2));
    }
}
