//! Endpoint choice with Istio's DestinationRule `loadBalancer` semantics, as
//! Envoy implements them for a sidecar: LEAST_REQUEST (power of two choices,
//! the default), ROUND_ROBIN, RANDOM, PASSTHROUGH, consistentHash (ring hash),
//! locality priorities (default, `failover`, `failoverPriority`) chosen with
//! Envoy's priority load (overprovisioning factor 1.4), `distribute` locality
//! weights, panic mode (`minHealthPercent`) and the `previous_hosts` retry
//! predicate.
//!
//! A [`Balancer`] is built once per configuration generation of one
//! (client, cluster) (allocation happens there); [`Balancer::pick`] only reads
//! immutable lists and atomics: no locks, no allocation.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::state::{Labels, LbPolicy, Locality, LocalityLbSetting, SimpleLb};

mod hash;
mod locality;
#[cfg(test)]
mod tests;

use hash::{DEFAULT_MIN_RING_SIZE, Ring, mix64};
pub use hash::{hash_bytes, request_hash};
use locality::Grouping;

/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: u64 = 140;
/// Istio's `host_selection_retry_max_attempts` for the `previous_hosts` predicate.
const HOST_SELECTION_RETRIES: usize = 5;
/// Most random draws before `random_eligible` counts its way to a healthy
/// host (fewer for small groups): with half the hosts ejected the O(n) count
/// practically never runs.
const RANDOM_TRIES: usize = 64;
/// Decorrelates the priority choice from the ring position of one hash.
const PRIORITY_SALT: u64 = 0x5bd1_e995_2f1c_a3b7;

/// What the balancer needs to know about one endpoint (implemented by the
/// caller's per-endpoint slot).
pub trait Host {
    fn addr(&self) -> SocketAddr;
    fn locality(&self) -> &Locality;
    /// Labels of the endpoint's pod (for failoverPriority), if known.
    fn labels(&self) -> Option<&Labels>;
    /// False while outlier detection has ejected it.
    fn is_healthy(&self) -> bool;
    /// Requests in flight to it from this client (LEAST_REQUEST).
    fn active_requests(&self) -> u32;
}

/// Everything fixed for one configuration generation of one (client, cluster).
#[derive(Debug, Clone, Copy, Default)]
pub struct BalancerConfig<'a> {
    /// `None` → Istio's default LEAST_REQUEST.
    pub policy: Option<&'a LbPolicy>,
    pub locality_setting: Option<&'a LocalityLbSetting>,
    /// Locality of the client (the node's locality: Node labels of the proxy's node).
    pub client_locality: Option<&'a Locality>,
    /// Labels of the client pod (failoverPriority matches them against endpoint labels).
    pub client_labels: Option<&'a Labels>,
    /// Istio enables locality-aware priorities only when outlier detection is configured.
    pub outlier_detection_enabled: bool,
    /// DestinationRule outlierDetection.minHealthPercent (Istio default 0 = panic mode off).
    pub min_health_percent: u32,
}

/// Per-request inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext<'a> {
    /// Hosts already tried by this request (Istio's previous_hosts predicate:
    /// avoid them if possible).
    pub tried: &'a [SocketAddr],
    /// Hash for consistentHash policies (see [`request_hash`]).
    pub hash: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    LeastRequest,
    RoundRobin,
    Random,
    Passthrough,
    RingHash,
}

/// A priority level, or a `distribute` locality.
struct Group {
    /// Host indexes, ascending.
    hosts: Vec<usize>,
    /// How many of `hosts` are healthy (high 32 bits, kept by
    /// `host_health_changed`) and the health derived from it (low 32 bits):
    /// updated together so that `pick` reads both without dividing.
    state: AtomicU64,
    /// `distribute` weight (unused for priorities).
    weight: u32,
    /// ROUND_ROBIN position.
    cursor: AtomicU32,
    /// consistentHash ring (empty for other algorithms).
    ring: Arc<Ring>,
}

impl Group {
    fn healthy(&self) -> u64 {
        self.state.load(Ordering::Relaxed) >> 32
    }

    fn total(&self) -> u64 {
        self.hosts.len() as u64
    }

    /// Envoy's per-priority health: `min(100, 140 * healthy / total)`.
    fn health(&self) -> u64 {
        self.state.load(Ordering::Relaxed) & u64::from(u32::MAX)
    }

    fn pack(healthy: u64, total: u64) -> u64 {
        let health = match total {
            0 => 0,
            t => (OVERPROVISIONING * healthy / t).min(100),
        };
        (healthy << 32) | health
    }
}

/// Chooses endpoints of one cluster for one client; see the module docs.
pub struct Balancer {
    algorithm: Algorithm,
    /// `distribute` mode: groups are weighted localities of one priority.
    weighted: bool,
    groups: Vec<Group>,
    /// Sum of group weights (weighted mode).
    total_weight: u64,
    host_group: Vec<u32>,
    /// Health as last reported, so repeated reports don't skew the counters.
    host_healthy: Vec<AtomicBool>,
    min_health_percent: u64,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<(usize, u64, u32)> = self
            .groups
            .iter()
            .map(|g| (g.hosts.len(), g.healthy(), g.weight))
            .collect();
        f.debug_struct("Balancer")
            .field("algorithm", &self.algorithm)
            .field("weighted", &self.weighted)
            .field("groups (hosts, healthy, weight)", &groups)
            .field("min_health_percent", &self.min_health_percent)
            .finish()
    }
}

impl Balancer {
    /// `hosts` is the fixed endpoint list of the cluster for this generation
    /// (index = identity). Initial health is read from `Host::is_healthy`.
    pub fn new<H: Host>(hosts: &[H], config: &BalancerConfig<'_>) -> Balancer {
        let (algorithm, min_ring) = match config.policy {
            None | Some(LbPolicy::Simple(SimpleLb::LeastRequest)) => (Algorithm::LeastRequest, 0),
            Some(LbPolicy::Simple(SimpleLb::RoundRobin)) => (Algorithm::RoundRobin, 0),
            Some(LbPolicy::Simple(SimpleLb::Random)) => (Algorithm::Random, 0),
            Some(LbPolicy::Simple(SimpleLb::Passthrough)) => (Algorithm::Passthrough, 0),
            Some(LbPolicy::ConsistentHash {
                minimum_ring_size, ..
            }) => (
                Algorithm::RingHash,
                minimum_ring_size
                    .filter(|&s| s > 0)
                    .unwrap_or(DEFAULT_MIN_RING_SIZE),
            ),
        };
        let (host_group, weights, weighted) = match locality::group(hosts, config) {
            Grouping::Priorities { group_of, count } => (group_of, vec![0; count], false),
            Grouping::Weighted { group_of, weights } => (group_of, weights, true),
        };
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); weights.len()];
        for (i, &g) in host_group.iter().enumerate() {
            members[g as usize].push(i);
        }
        let groups: Vec<Group> = members
            .into_iter()
            .zip(&weights)
            .map(|(list, &weight)| {
                let healthy = list.iter().filter(|&&i| hosts[i].is_healthy()).count();
                let state = Group::pack(healthy as u64, list.len() as u64);
                let ring = if algorithm == Algorithm::RingHash {
                    let m: Vec<(usize, SocketAddr)> =
                        list.iter().map(|&i| (i, hosts[i].addr())).collect();
                    Ring::shared(&m, min_ring)
                } else {
                    Arc::default()
                };
                Group {
                    // Like Envoy, start round robin at a random position so
                    // that clients don't all hit the first host together.
                    cursor: AtomicU32::new(fastrand::u32(..(list.len() as u32).max(1))),
                    hosts: list,
                    state: AtomicU64::new(state),
                    weight,
                    ring,
                }
            })
            .collect();
        Balancer {
            algorithm,
            weighted,
            total_weight: weights.iter().map(|&w| u64::from(w)).sum(),
            groups,
            host_group,
            host_healthy: hosts
                .iter()
                .map(|h| AtomicBool::new(h.is_healthy()))
                .collect(),
            min_health_percent: u64::from(config.min_health_percent.min(100)),
        }
    }

    /// Index of the chosen host; `None` when no host may be chosen (all
    /// ejected and panic mode off → the caller answers 503 UH).
    ///
    /// No locks, no allocation; O(1) expected for ROUND_ROBIN, RANDOM and
    /// LEAST_REQUEST with few ejected hosts, O(log ring) for consistentHash.
    /// PASSTHROUGH callers connect to the original destination instead
    /// ([`Balancer::is_passthrough`]); asked anyway, it picks at random.
    pub fn pick<H: Host>(&self, hosts: &[H], ctx: &PickContext<'_>) -> Option<usize> {
        self.pick_with_rng(hosts, ctx, &mut fastrand::Rng::new())
    }

    /// [`Balancer::pick`] with the caller's random source (deterministic tests).
    pub fn pick_with_rng<H: Host>(
        &self,
        hosts: &[H],
        ctx: &PickContext<'_>,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        if hosts.len() != self.host_group.len() {
            debug_assert_eq!(hosts.len(), self.host_group.len(), "host list changed");
            return None;
        }
        if hosts.is_empty() {
            return None;
        }
        if self.algorithm == Algorithm::RingHash {
            // No key: a random ring position (Envoy). The hash also chooses
            // the priority, so one key sticks to one host while health holds.
            let h = ctx.hash.unwrap_or_else(|| rng.u64(..));
            let (g, panic) = self.choose_group(mix64(h ^ PRIORITY_SALT))?;
            return self
                .ring_pick(&self.groups[g], panic, hosts, ctx.tried, h)
                .or_else(|| self.any_healthy(hosts, ctx.tried));
        }
        // Envoy re-runs the whole choice (priority included) while the
        // previous_hosts predicate rejects the host, up to 5 more times.
        let mut last = None;
        for _ in 0..=HOST_SELECTION_RETRIES {
            let (g, panic) = self.choose_group(rng.u64(..))?;
            let Some(h) = self.choose_in_group(&self.groups[g], panic, hosts, rng) else {
                // Only when the healthy counters lag behind `is_healthy`.
                return self.any_healthy(hosts, ctx.tried);
            };
            if !is_tried(hosts, h, ctx.tried) {
                return Some(h);
            }
            last = Some((g, panic, h));
        }
        let (g, panic, h) = last?;
        // Make avoidance certain: any untried eligible host of that group.
        Some(
            self.untried_in_group(&self.groups[g], panic, hosts, ctx.tried, rng)
                .unwrap_or(h),
        )
    }

    /// Called by outlier detection when a host is ejected (`healthy=false`) or
    /// returns (`true`); keeps the per-group healthy counts that `pick` reads.
    /// Repeated reports of the same state are ignored.
    pub fn host_health_changed(&self, index: usize, healthy: bool) {
        let Some(flag) = self.host_healthy.get(index) else {
            return;
        };
        if flag.swap(healthy, Ordering::AcqRel) != healthy {
            let group = &self.groups[self.host_group[index] as usize];
            let total = group.total();
            let _ = group
                .state
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    let count = s >> 32;
                    let count = if healthy {
                        count + 1
                    } else {
                        count.saturating_sub(1)
                    };
                    Some(Group::pack(count.min(total), total))
                });
        }
    }

    /// PASSTHROUGH: the caller connects to the original destination instead.
    pub fn is_passthrough(&self) -> bool {
        self.algorithm == Algorithm::Passthrough
    }

    /// Priority level of a host (0 = best); for tests and diagnostics. Always
    /// 0 under `distribute` (one priority of weighted localities).
    pub fn priority_of(&self, index: usize) -> usize {
        if self.weighted {
            0
        } else {
            self.host_group.get(index).map_or(0, |&g| g as usize)
        }
    }

    /// Number of priority levels (1 under `distribute`; 0 without hosts).
    pub fn priority_count(&self) -> usize {
        if self.weighted {
            usize::from(!self.groups.is_empty())
        } else {
            self.groups.len()
        }
    }

    fn in_panic(&self, group: &Group) -> bool {
        // Envoy's isHostSetInPanic: 100 * healthy / total < threshold.
        self.min_health_percent > 0
            && group.healthy() * 100 < self.min_health_percent * group.total()
    }

    /// The group to pick from and whether it is in panic (all its hosts
    /// eligible); `r` is uniform over `u64`.
    fn choose_group(&self, r: u64) -> Option<(usize, bool)> {
        if self.groups.len() == 1 && !self.weighted {
            let g = &self.groups[0];
            let panic = self.in_panic(g);
            return (panic || g.healthy() > 0).then_some((0, panic));
        }
        if self.weighted {
            self.choose_weighted(r)
        } else {
            self.choose_priority(r)
        }
    }

    /// Envoy's priority load: `health_p = min(100, 1.4 * healthy_p / total_p)`
    /// percent; each priority takes `health_p * 100 / normalized` of what is
    /// left, where `normalized = min(100, Σ health)`; rounding leftovers go
    /// to the first priority with health. Below the panic threshold in total,
    /// load follows host counts and health is ignored.
    fn choose_priority(&self, r: u64) -> Option<(usize, bool)> {
        let first = &self.groups[0];
        if first.health() == 100 {
            return Some((0, self.in_panic(first)));
        }
        let mut sum = 0;
        for g in &self.groups {
            sum += g.health();
            if sum >= 100 {
                break;
            }
        }
        let normalized = sum.min(100);
        if self.min_health_percent > 0 && normalized < self.min_health_percent {
            // Total panic: load in proportion to host counts.
            let total: u64 = self.groups.iter().map(Group::total).sum();
            let mut x = scale(r, total);
            for (i, g) in self.groups.iter().enumerate() {
                if x < g.total() {
                    return Some((i, self.in_panic(g)));
                }
                x -= g.total();
            }
            return None;
        }
        if normalized == 0 {
            return None;
        }
        let x = scale(r, 100);
        let (mut left, mut cumulative, mut first_available) = (100, 0, None);
        for (i, g) in self.groups.iter().enumerate() {
            let health = g.health();
            if health > 0 && first_available.is_none() {
                first_available = Some(i);
            }
            let load = (health * 100 / normalized).min(left);
            left -= load;
            cumulative += load;
            if x < cumulative {
                return Some((i, self.in_panic(g)));
            }
        }
        first_available.map(|i| (i, self.in_panic(&self.groups[i])))
    }

    /// `distribute`: localities by `weight * min(1, 1.4 * healthy / total)`
    /// (Envoy's effective locality weight). The priority (all localities with
    /// weight) panics as a whole; then localities go by their configured
    /// weight and health is ignored.
    fn choose_weighted(&self, r: u64) -> Option<(usize, bool)> {
        let (mut healthy, mut total, mut effective) = (0, 0, 0);
        for g in self.groups.iter().filter(|g| g.weight > 0) {
            healthy += g.healthy();
            total += g.total();
            effective += u64::from(g.weight) * g.health();
        }
        let panic = self.min_health_percent > 0 && healthy * 100 < self.min_health_percent * total;
        let (span, weight): (u64, fn(&Group) -> u64) = if panic {
            (self.total_weight, |g| u64::from(g.weight))
        } else {
            (effective, |g| u64::from(g.weight) * g.health())
        };
        if span == 0 {
            return None;
        }
        let mut x = scale(r, span);
        for (i, g) in self.groups.iter().enumerate() {
            let w = weight(g);
            if x < w {
                return Some((i, panic));
            }
            x -= w;
        }
        None
    }

    fn choose_in_group<H: Host>(
        &self,
        group: &Group,
        panic: bool,
        hosts: &[H],
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        match self.algorithm {
            Algorithm::RoundRobin => round_robin(group, panic, hosts),
            Algorithm::Random | Algorithm::Passthrough => random_eligible(group, panic, hosts, rng),
            Algorithm::LeastRequest => {
                // Power of two choices (Envoy's default choice_count 2).
                let a = random_eligible(group, panic, hosts, rng)?;
                let b = random_eligible(group, panic, hosts, rng)?;
                Some(if hosts[b].active_requests() < hosts[a].active_requests() {
                    b
                } else {
                    a
                })
            }
            Algorithm::RingHash => self.ring_pick(group, panic, hosts, &[], rng.u64(..)),
        }
    }

    /// The first eligible host at or after `h` on the group's ring, skipping
    /// ejected hosts (as if they were not on the ring) and tried ones (if
    /// any other is eligible).
    fn ring_pick<H: Host>(
        &self,
        group: &Group,
        panic: bool,
        hosts: &[H],
        tried: &[SocketAddr],
        h: u64,
    ) -> Option<usize> {
        let mut fallback = None;
        for i in group.ring.walk(h) {
            if panic || hosts[i].is_healthy() {
                if !is_tried(hosts, i, tried) {
                    return Some(i);
                }
                fallback.get_or_insert(i);
            }
        }
        fallback
    }

    /// An eligible host of `group` not in `tried`, starting at a random place.
    fn untried_in_group<H: Host>(
        &self,
        group: &Group,
        panic: bool,
        hosts: &[H],
        tried: &[SocketAddr],
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let n = group.hosts.len();
        let start = rng.usize(..n.max(1));
        (0..n)
            .map(|k| group.hosts[(start + k) % n])
            .find(|&i| (panic || hosts[i].is_healthy()) && !is_tried(hosts, i, tried))
    }

    /// Last resort when the counters lag behind `is_healthy`: the first
    /// healthy untried host by priority, else the first healthy one.
    fn any_healthy<H: Host>(&self, hosts: &[H], tried: &[SocketAddr]) -> Option<usize> {
        let mut fallback = None;
        let usable = self
            .groups
            .iter()
            .filter(|g| !self.weighted || g.weight > 0);
        for &i in usable.flat_map(|g| &g.hosts) {
            if hosts[i].is_healthy() {
                if !is_tried(hosts, i, tried) {
                    return Some(i);
                }
                fallback.get_or_insert(i);
            }
        }
        fallback
    }
}

/// Maps a uniform `u64` onto `0..n` without dividing (Lemire's multiply-shift).
fn scale(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

fn is_tried<H: Host>(hosts: &[H], i: usize, tried: &[SocketAddr]) -> bool {
    !tried.is_empty() && tried.contains(&hosts[i].addr())
}

/// Next eligible host after the group's cursor; the cursor then moves past
/// it, so ejected hosts don't give their turns to their neighbours.
fn round_robin<H: Host>(group: &Group, panic: bool, hosts: &[H]) -> Option<usize> {
    let n = group.hosts.len();
    if n == 0 {
        return None;
    }
    // 32 bits: a cheaper division; the wrap-around every 2^32 picks is harmless.
    let start = (group.cursor.fetch_add(1, Ordering::Relaxed) % n as u32) as usize;
    for k in 0..n {
        let pos = start + k;
        let i = group.hosts[if pos >= n { pos - n } else { pos }];
        if panic || hosts[i].is_healthy() {
            if k > 0 {
                group.cursor.fetch_add(k as u32, Ordering::Relaxed);
            }
            return Some(i);
        }
    }
    None
}

/// A uniformly random eligible host of the group: random draws, then (when
/// nearly all are ejected) the k-th healthy host by counting.
fn random_eligible<H: Host>(
    group: &Group,
    panic: bool,
    hosts: &[H],
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    let list = &group.hosts;
    let n = list.len();
    if n == 0 {
        return None;
    }
    if panic {
        return Some(list[rng.usize(..n)]);
    }
    for _ in 0..n.clamp(4, RANDOM_TRIES) {
        let i = list[rng.usize(..n)];
        if hosts[i].is_healthy() {
            return Some(i);
        }
    }
    let k = rng.usize(..(group.healthy() as usize).max(1));
    let mut seen = 0;
    let mut first = None;
    for &i in list {
        if hosts[i].is_healthy() {
            if seen == k {
                return Some(i);
            }
            first.get_or_insert(i);
            seen += 1;
        }
    }
    first
}
