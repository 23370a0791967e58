//! Outlier detection (passive health checking) as Envoy implements it and Istio configures it.
//!
//! One [`OutlierDetector`] exists per (client pod, cluster); it owns the configuration, the
//! ejection accounting and Envoy's `outlier_detection.*` counters. One [`HostOutlier`] exists per
//! endpoint of that cluster; the data path reports every upstream attempt with
//! [`OutlierDetector::record`] and a timer calls [`OutlierDetector::sweep`] every
//! [`OutlierConfig::interval`]. Everything is lock-free (atomics only).
//!
//! The rules follow Envoy's `source/common/upstream/outlier_detection_impl.cc`:
//!
//! - Consecutive counters compare with `==` after incrementing, so exactly one attempt (and
//!   one thread) sees a threshold being reached; the counter of the detected kind is reset after
//!   the detection, all counters are reset when the host returns.
//! - A host that is already ejected is not detected again (no stats), its counters keep running.
//! - An HTTP status that is a gateway error (502, 503, 504) is checked against the gateway
//!   threshold first, then against the 5xx one (the order Envoy's main thread sees the events).
//! - Ejection is allowed only if `100 * (ejected + 1) / total_hosts <= max_ejection_percent`:
//!   the percentage *after* this ejection must not exceed the maximum, and Envoy does **not**
//!   always eject one host (that is the opt-in `always_eject_one_host`, which Istio never sets).
//!   With Istio's default 10 %, clusters of fewer than 10 hosts never eject. A detection that is
//!   not allowed counts `ejections_overflow`; the percentage is checked before enforcement, so a
//!   detection-only kind overflows too.
//! - The ejection time is `min(base_ejection_time * backoff, max_ejection_time)`, where `backoff`
//!   grows by one at each ejection (while `backoff * base < max + base`) and shrinks by one at
//!   every sweep that finds the host healthy at least `interval` after it last returned.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Envoy's `interval` default.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Envoy's `base_ejection_time` default.
const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Envoy's `max_ejection_time` default (raised to `base_ejection_time` when that is larger).
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Envoy's `consecutive_5xx` default (enforced at 100 %).
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// Envoy's `consecutive_gateway_failure` default; enforced at 0 % unless configured.
const DEFAULT_CONSECUTIVE_GATEWAY_FAILURE: u32 = 5;
/// Envoy's `consecutive_local_origin_failure` default (enforced at 100 %).
const DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURE: u32 = 5;
/// Envoy's `max_ejection_percent` default.
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// How far before its creation a detector can measure times (see `OutlierDetector::new`).
const EPOCH_MARGIN: Duration = Duration::from_secs(3600);

/// Effective settings with Istio's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive 5xx (and, without split, locally originated failures) before ejection.
    /// Istio default 5 when `outlierDetection` is set; `Some(0)`/`None` = disabled.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway errors (502/503/504, and without split locally originated failures)
    /// before ejection. `Some(0)` = disabled. `None` = not configured: as with Istio, Envoy then
    /// still *detects* at its default of 5 (counting `ejections_detected_consecutive_gateway_failure`
    /// and, when the percentage forbids it, `ejections_overflow`) but never ejects for it
    /// (`enforcing_consecutive_gateway_failure` 0).
    pub consecutive_gateway_failure: Option<u32>,
    /// Consecutive locally originated failures before ejection; only used when
    /// `split_external_local_origin_errors`. Default 5; `Some(0)`/`None` = disabled.
    pub consecutive_local_origin_failure: Option<u32>,
    pub split_external_local_origin_errors: bool,
    /// Sweep period. Default 10 s.
    pub interval: Duration,
    /// Default 30 s.
    pub base_ejection_time: Duration,
    /// Envoy default `max(300 s, base_ejection_time)` (not settable in Istio).
    pub max_ejection_time: Duration,
    /// Istio/Envoy default 10 (Istio also sends nothing, hence 10, for 0). Values over 100 act as 100.
    pub max_ejection_percent: u32,
    /// Istio default 0 (becomes the load balancer's healthy panic threshold; not used here).
    pub min_health_percent: u32,
}

impl Default for OutlierConfig {
    /// What Istio produces for an empty `outlierDetection: {}`.
    fn default() -> Self {
        OutlierConfig::from_istio(&crate::state::OutlierDetection::default())
    }
}

impl OutlierConfig {
    /// Applies the defaults the way Istio's `applyOutlierDetection` and Envoy's `DetectorConfig` do.
    pub fn from_istio(od: &crate::state::OutlierDetection) -> OutlierConfig {
        let base_ejection_time = od
            .base_ejection_time
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_BASE_EJECTION_TIME);
        OutlierConfig {
            // Istio passes the value through (0 turns enforcement off); unset = Envoy's 5.
            consecutive_5xx: Some(od.consecutive_5xx_errors.unwrap_or(DEFAULT_CONSECUTIVE_5XX)),
            consecutive_gateway_failure: od.consecutive_gateway_errors,
            // Istio only sends values > 0; otherwise Envoy's default 5 (enforced) applies.
            consecutive_local_origin_failure: Some(
                od.consecutive_local_origin_failures
                    .filter(|&v| v > 0)
                    .unwrap_or(DEFAULT_CONSECUTIVE_LOCAL_ORIGIN_FAILURE),
            ),
            split_external_local_origin_errors: od.split_external_local_origin_errors,
            interval: od
                .interval
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_INTERVAL),
            base_ejection_time,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME.max(base_ejection_time),
            // Istio only sends values > 0.
            max_ejection_percent: od
                .max_ejection_percent
                .filter(|&v| v > 0)
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
            min_health_percent: od.min_health_percent.unwrap_or(0),
        }
    }

    /// The effective cap on one ejection: `max(base_ejection_time, max_ejection_time)`.
    fn ejection_cap(&self) -> Duration {
        self.base_ejection_time.max(self.max_ejection_time)
    }

    /// How long an ejection lasts with the given back-off multiplier:
    /// `min(base_ejection_time * backoff, max(base_ejection_time, max_ejection_time))`.
    pub fn ejection_duration(&self, backoff: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(backoff)
            .min(self.ejection_cap())
    }

    /// (threshold, enforced) for consecutive 5xx; `None` when it can never trigger.
    fn rule_5xx(&self) -> Option<(u32, bool)> {
        self.consecutive_5xx.filter(|&n| n > 0).map(|n| (n, true))
    }

    /// (threshold, enforced) for consecutive gateway failures.
    fn rule_gateway(&self) -> Option<(u32, bool)> {
        match self.consecutive_gateway_failure {
            None => Some((DEFAULT_CONSECUTIVE_GATEWAY_FAILURE, false)),
            Some(0) => None,
            Some(n) => Some((n, true)),
        }
    }

    /// (threshold, enforced) for consecutive local-origin failures (split mode only).
    fn rule_local_origin(&self) -> Option<(u32, bool)> {
        self.consecutive_local_origin_failure
            .filter(|&n| n > 0)
            .map(|n| (n, true))
    }
}

/// Result of one upstream attempt as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// An HTTP response from the host (for gRPC the caller passes the grpc-status already mapped
    /// with [`grpc_to_http`], as Envoy's router does when `grpc-status` is in the headers).
    Status(u16),
    /// Locally originated: connection refused / failed.
    ConnectFailed,
    /// Locally originated: connect timeout or request (per-try/route) timeout.
    Timeout,
    /// Locally originated: connection reset/closed before the response. (Envoy does not report
    /// resets caused by its own circuit breakers; neither should the caller.)
    Reset,
    /// Locally originated success (connection/stream obtained, Envoy's `onPoolReady`) — only
    /// meaningful with `split_external_local_origin_errors`, where it resets the local-origin
    /// counter; report it for every attempt that got a stream, before its outcome.
    ConnectSucceeded,
}

/// Envoy's gRPC→HTTP status mapping (`Grpc::Utility::grpcToHttpStatus`).
pub fn grpc_to_http(grpc_status: u32) -> u16 {
    match grpc_status {
        0 => 200,  // OK
        1 => 499,  // CANCELLED
        2 => 500,  // UNKNOWN
        3 => 400,  // INVALID_ARGUMENT
        4 => 504,  // DEADLINE_EXCEEDED
        5 => 404,  // NOT_FOUND
        6 => 409,  // ALREADY_EXISTS
        7 => 403,  // PERMISSION_DENIED
        8 => 429,  // RESOURCE_EXHAUSTED
        9 => 400,  // FAILED_PRECONDITION
        10 => 409, // ABORTED
        11 => 400, // OUT_OF_RANGE
        12 => 501, // UNIMPLEMENTED
        13 => 500, // INTERNAL
        14 => 503, // UNAVAILABLE
        15 => 500, // DATA_LOSS
        16 => 401, // UNAUTHENTICATED
        _ => 500,
    }
}

/// Per-host state (one per endpoint per (client, cluster)); atomics only, no locks.
#[derive(Debug, Default)]
pub struct HostOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway_failure: AtomicU32,
    consecutive_local_origin_failure: AtomicU32,
    /// 0 = not ejected; otherwise 1 + the ms (since the detector's epoch) at which the ejection
    /// ends. The ejection time depends only on the back-off at ejection (Envoy changes the
    /// back-off of ejected hosts never), so storing the deadline is equivalent to Envoy's check.
    ejected_until: AtomicU64,
    /// 1 + the ms at which the current (or last) ejection started; 0 = never ejected.
    ejected_at: AtomicU64,
    /// 1 + the ms at which the host last returned; 0 = never.
    returned_at: AtomicU64,
    /// Envoy's `ejectTimeBackoff`: the multiplier of `base_ejection_time`.
    backoff: AtomicU32,
    /// Envoy's `num_ejections`: times ejected, never decreases.
    num_ejections: AtomicU32,
    /// Set by [`OutlierDetector::forget`]: the host left the cluster.
    forgotten: AtomicBool,
}

impl HostOutlier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Currently ejected (stays true until a sweep returns the host, as in Envoy).
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) != 0
    }

    /// Times this host has been ejected (Envoy's `num_ejections`; never decreases).
    pub fn ejections(&self) -> u32 {
        self.num_ejections.load(Ordering::Relaxed)
    }

    /// The multiplier of `base_ejection_time` the next ejection starts from (Envoy's
    /// `ejectTimeBackoff`): grows at each ejection, decays on healthy sweeps. The next ejection
    /// lasts `ejection_duration(backoff() + 1)` (unless already at the cap).
    pub fn backoff(&self) -> u32 {
        self.backoff.load(Ordering::Relaxed)
    }

    /// Consecutive (5xx, gateway, local-origin) failure counters, for diagnostics.
    pub fn consecutive(&self) -> (u32, u32, u32) {
        (
            self.consecutive_5xx.load(Ordering::Relaxed),
            self.consecutive_gateway_failure.load(Ordering::Relaxed),
            self.consecutive_local_origin_failure
                .load(Ordering::Relaxed),
        )
    }

    fn reset_counters(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        self.consecutive_local_origin_failure
            .store(0, Ordering::Relaxed);
    }
}

/// Why a host was ejected (for counters and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionReason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

impl EjectionReason {
    /// Envoy's `OutlierEjectionType` name.
    pub fn as_str(self) -> &'static str {
        match self {
            EjectionReason::Consecutive5xx => "CONSECUTIVE_5XX",
            EjectionReason::ConsecutiveGatewayFailure => "CONSECUTIVE_GATEWAY_FAILURE",
            EjectionReason::ConsecutiveLocalOriginFailure => "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
        }
    }
}

/// Counters Envoy keeps per cluster (exposed as `envoy_cluster_outlier_detection_*`). Atomics.
#[derive(Debug, Default)]
pub struct OutlierStats {
    pub ejections_enforced_total: AtomicU64,
    /// Gauge: hosts currently ejected (also the count the percentage rule uses).
    pub ejections_active: AtomicU64,
    pub ejections_overflow: AtomicU64,
    pub ejections_enforced_consecutive_5xx: AtomicU64,
    pub ejections_detected_consecutive_5xx: AtomicU64,
    pub ejections_enforced_consecutive_gateway_failure: AtomicU64,
    pub ejections_detected_consecutive_gateway_failure: AtomicU64,
    pub ejections_enforced_consecutive_local_origin_failure: AtomicU64,
    pub ejections_detected_consecutive_local_origin_failure: AtomicU64,
}

impl OutlierStats {
    /// Zeroes the counters; `ejections_active` (a gauge) keeps its value.
    pub fn reset_counters(&self) {
        for c in [
            &self.ejections_enforced_total,
            &self.ejections_overflow,
            &self.ejections_enforced_consecutive_5xx,
            &self.ejections_detected_consecutive_5xx,
            &self.ejections_enforced_consecutive_gateway_failure,
            &self.ejections_detected_consecutive_gateway_failure,
            &self.ejections_enforced_consecutive_local_origin_failure,
            &self.ejections_detected_consecutive_local_origin_failure,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// `(envoy stat name under outlier_detection., value)` pairs.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "ejections_enforced_total",
                v(&self.ejections_enforced_total),
            ),
            ("ejections_active", v(&self.ejections_active)),
            ("ejections_overflow", v(&self.ejections_overflow)),
            (
                "ejections_enforced_consecutive_5xx",
                v(&self.ejections_enforced_consecutive_5xx),
            ),
            (
                "ejections_detected_consecutive_5xx",
                v(&self.ejections_detected_consecutive_5xx),
            ),
            (
                "ejections_enforced_consecutive_gateway_failure",
                v(&self.ejections_enforced_consecutive_gateway_failure),
            ),
            (
                "ejections_detected_consecutive_gateway_failure",
                v(&self.ejections_detected_consecutive_gateway_failure),
            ),
            (
                "ejections_enforced_consecutive_local_origin_failure",
                v(&self.ejections_enforced_consecutive_local_origin_failure),
            ),
            (
                "ejections_detected_consecutive_local_origin_failure",
                v(&self.ejections_detected_consecutive_local_origin_failure),
            ),
        ]
    }

    fn detected(&self, reason: EjectionReason) -> &AtomicU64 {
        match reason {
            EjectionReason::Consecutive5xx => &self.ejections_detected_consecutive_5xx,
            EjectionReason::ConsecutiveGatewayFailure => {
                &self.ejections_detected_consecutive_gateway_failure
            }
            EjectionReason::ConsecutiveLocalOriginFailure => {
                &self.ejections_detected_consecutive_local_origin_failure
            }
        }
    }

    fn enforced(&self, reason: EjectionReason) -> &AtomicU64 {
        match reason {
            EjectionReason::Consecutive5xx => &self.ejections_enforced_consecutive_5xx,
            EjectionReason::ConsecutiveGatewayFailure => {
                &self.ejections_enforced_consecutive_gateway_failure
            }
            EjectionReason::ConsecutiveLocalOriginFailure => {
                &self.ejections_enforced_consecutive_local_origin_failure
            }
        }
    }
}

/// Detector for one (client, cluster): config + ejection accounting.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    /// Times are kept as ms since this instant.
    epoch: Instant,
    stats: OutlierStats,
}

/// Internal shape of an HTTP-level result.
enum Observed {
    Http(u16),
    LocalFailure,
    LocalSuccess,
}

impl OutlierDetector {
    pub fn new(config: OutlierConfig) -> Self {
        OutlierDetector {
            config,
            // Back-dated so that a `now` taken shortly before the detector existed (a request
            // that started before a reload) is still measured exactly; later times are fine.
            epoch: Instant::now()
                .checked_sub(EPOCH_MARGIN)
                .unwrap_or_else(Instant::now),
            stats: OutlierStats::default(),
        }
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    pub fn stats(&self) -> &OutlierStats {
        &self.stats
    }

    /// Hosts currently ejected (the `ejections_active` gauge).
    pub fn ejected_count(&self) -> u64 {
        self.stats.ejections_active.load(Ordering::Acquire)
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Records one attempt against `host` (`total_hosts` = hosts in the cluster). Returns
    /// `Some(reason)` if this call ejected the host. Lock-free.
    pub fn record(
        &self,
        host: &HostOutlier,
        result: AttemptResult,
        total_hosts: usize,
        now: Instant,
    ) -> Option<EjectionReason> {
        let split = self.config.split_external_local_origin_errors;
        let observed = match (result, split) {
            (AttemptResult::Status(code), _) => Observed::Http(code),
            // Envoy's resultToHttpCode: connect failure (and the router's resets) → 503,
            // timeout → 504 (the router passes its timeout response code), connect success
            // is not mapped.
            (AttemptResult::ConnectFailed | AttemptResult::Reset, false) => Observed::Http(503),
            (AttemptResult::Timeout, false) => Observed::Http(504),
            (AttemptResult::ConnectSucceeded, false) => return None,
            (
                AttemptResult::ConnectFailed | AttemptResult::Reset | AttemptResult::Timeout,
                true,
            ) => Observed::LocalFailure,
            (AttemptResult::ConnectSucceeded, true) => Observed::LocalSuccess,
        };
        match observed {
            Observed::Http(code) => self.put_http_code(host, code, total_hosts, now),
            Observed::LocalFailure => {
                let count = host
                    .consecutive_local_origin_failure
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_add(1);
                match self.config.rule_local_origin() {
                    Some((threshold, enforce)) if count == threshold => self.on_consecutive(
                        host,
                        EjectionReason::ConsecutiveLocalOriginFailure,
                        enforce,
                        total_hosts,
                        now,
                    ),
                    _ => None,
                }
            }
            Observed::LocalSuccess => {
                host.consecutive_local_origin_failure
                    .store(0, Ordering::Relaxed);
                None
            }
        }
    }

    /// Envoy's `putHttpResponseCode`.
    fn put_http_code(
        &self,
        host: &HostOutlier,
        code: u16,
        total_hosts: usize,
        now: Instant,
    ) -> Option<EjectionReason> {
        if !(500..600).contains(&code) {
            host.consecutive_5xx.store(0, Ordering::Relaxed);
            host.consecutive_gateway_failure.store(0, Ordering::Relaxed);
            return None;
        }
        let mut ejected = None;
        if (502..=504).contains(&code) {
            let count = host
                .consecutive_gateway_failure
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if let Some((threshold, enforce)) = self.config.rule_gateway()
                && count == threshold
            {
                ejected = self.on_consecutive(
                    host,
                    EjectionReason::ConsecutiveGatewayFailure,
                    enforce,
                    total_hosts,
                    now,
                );
            }
        } else {
            host.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        }
        let count = host
            .consecutive_5xx
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        if let Some((threshold, enforce)) = self.config.rule_5xx()
            && count == threshold
        {
            // A no-op (no stats, no reset) when the gateway rule just ejected the host, as in
            // Envoy where the second event finds the host already ejected.
            ejected = ejected.or(self.on_consecutive(
                host,
                EjectionReason::Consecutive5xx,
                enforce,
                total_hosts,
                now,
            ));
        }
        ejected
    }

    /// Envoy's `onConsecutiveErrorWorker` + `ejectHost`.
    fn on_consecutive(
        &self,
        host: &HostOutlier,
        reason: EjectionReason,
        enforce: bool,
        total_hosts: usize,
        now: Instant,
    ) -> Option<EjectionReason> {
        if host.is_ejected() || host.forgotten.load(Ordering::Relaxed) {
            return None;
        }
        self.stats.detected(reason).fetch_add(1, Ordering::Relaxed);
        let ejected = self.eject(host, reason, enforce, total_hosts, now);
        // Reset the detected kind's counter so a new bout of errors is detected even without an
        // interleaved success.
        match reason {
            EjectionReason::Consecutive5xx => host.consecutive_5xx.store(0, Ordering::Relaxed),
            EjectionReason::ConsecutiveGatewayFailure => {
                host.consecutive_gateway_failure.store(0, Ordering::Relaxed)
            }
            EjectionReason::ConsecutiveLocalOriginFailure => host
                .consecutive_local_origin_failure
                .store(0, Ordering::Relaxed),
        }
        ejected.then_some(reason)
    }

    /// Whether one more ejection keeps the ejected share at or under `max_ejection_percent`.
    fn ejection_allowed(&self, active: u64, total_hosts: usize) -> bool {
        let max = u64::from(self.config.max_ejection_percent.min(100));
        let total = total_hosts as u64;
        // 100 * (active + 1) / total <= max, in integers (total > 0).
        total > 0 && (active + 1).saturating_mul(100) <= max.saturating_mul(total)
    }

    fn eject(
        &self,
        host: &HostOutlier,
        reason: EjectionReason,
        enforce: bool,
        total_hosts: usize,
        now: Instant,
    ) -> bool {
        let active = &self.stats.ejections_active;
        if !enforce {
            // Envoy checks the percentage before the enforcement roll.
            if !self.ejection_allowed(active.load(Ordering::Acquire), total_hosts) {
                self.stats
                    .ejections_overflow
                    .fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        // Reserve a slot under the percentage rule, then claim the host.
        let reserved = active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
            self.ejection_allowed(a, total_hosts).then_some(a + 1)
        });
        if reserved.is_err() {
            self.stats
                .ejections_overflow
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let backoff = host.backoff.load(Ordering::Relaxed);
        let base = self.config.base_ejection_time;
        let next_backoff =
            if base.saturating_mul(backoff) < self.config.max_ejection_time.saturating_add(base) {
                backoff.saturating_add(1)
            } else {
                backoff
            };
        let now_ms = self.ms(now);
        let duration_ms = u64::try_from(self.config.ejection_duration(next_backoff).as_millis())
            .unwrap_or(u64::MAX);
        let until = now_ms.saturating_add(duration_ms).saturating_add(1).max(1);
        if host
            .ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another thread ejected this host meanwhile; give the slot back.
            active.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        host.backoff.store(next_backoff, Ordering::Relaxed);
        host.ejected_at
            .store(now_ms.saturating_add(1), Ordering::Relaxed);
        host.num_ejections.fetch_add(1, Ordering::Relaxed);
        self.stats.enforced(reason).fetch_add(1, Ordering::Relaxed);
        self.stats
            .ejections_enforced_total
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The periodic `interval` sweep (Envoy's `onIntervalTimer`): returns hosts whose ejection
    /// time has passed (resetting their counters) and decrements the back-off of hosts that are
    /// not ejected and returned at least `interval` ago. Calls `on_return(index)` for each host
    /// brought back (`index` = position in `hosts`).
    pub fn sweep<'a>(
        &self,
        hosts: impl Iterator<Item = &'a HostOutlier>,
        now: Instant,
        mut on_return: impl FnMut(usize),
    ) {
        let now_ms = self.ms(now);
        let interval_ms = u64::try_from(self.config.interval.as_millis()).unwrap_or(u64::MAX);
        for (index, host) in hosts.enumerate() {
            let until = host.ejected_until.load(Ordering::Acquire);
            if until != 0 {
                if until - 1 <= now_ms {
                    host.reset_counters();
                    host.returned_at
                        .store(now_ms.saturating_add(1), Ordering::Relaxed);
                    if host
                        .ejected_until
                        .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.release_slot();
                        on_return(index);
                    }
                }
                // Just returned (or still ejected): no back-off decay this round.
                continue;
            }
            let returned = host.returned_at.load(Ordering::Relaxed);
            if returned != 0 && now_ms.saturating_sub(returned - 1) >= interval_ms {
                let _ = host
                    .backoff
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1));
            }
        }
    }

    /// Call when a host leaves the cluster (endpoint removed): an ejected host stops counting
    /// towards `ejections_active`, as in Envoy's member-update callback. The host is not
    /// ejected again afterwards.
    pub fn forget(&self, host: &HostOutlier) {
        host.forgotten.store(true, Ordering::Relaxed);
        if host.ejected_until.swap(0, Ordering::AcqRel) != 0 {
            self.release_slot();
        }
    }

    fn release_slot(&self) {
        let _ =
            self.stats
                .ejections_active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| a.checked_sub(1));
    }

    /// When the host's current ejection ends (`None` if not ejected).
    pub fn ejected_until(&self, host: &HostOutlier) -> Option<Instant> {
        match host.ejected_until.load(Ordering::Acquire) {
            0 => None,
            until => Some(self.epoch + Duration::from_millis(until - 1)),
        }
    }

    /// When the host's current (or last) ejection started (`None` if never ejected).
    pub fn ejected_at(&self, host: &HostOutlier) -> Option<Instant> {
        match host.ejected_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.epoch + Duration::from_millis(at - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::OutlierDetection;

    const S: Duration = Duration::from_secs(1);

    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// Istio defaults, with `max_ejection_percent` and the gateway threshold overridable.
    fn config(max_percent: u32, gateway: Option<u32>) -> OutlierConfig {
        OutlierConfig::from_istio(&OutlierDetection {
            max_ejection_percent: Some(max_percent),
            consecutive_gateway_errors: gateway,
            ..Default::default()
        })
    }

    fn hosts(n: usize) -> Vec<HostOutlier> {
        (0..n).map(|_| HostOutlier::new()).collect()
    }

    fn record_n(
        d: &OutlierDetector,
        h: &HostOutlier,
        r: AttemptResult,
        n: usize,
        total: usize,
        now: Instant,
    ) -> Vec<Option<EjectionReason>> {
        (0..n).map(|_| d.record(h, r, total, now)).collect()
    }

    fn returned(d: &OutlierDetector, hs: &[HostOutlier], now: Instant) -> Vec<usize> {
        let mut back = Vec::new();
        d.sweep(hs.iter(), now, |i| back.push(i));
        back
    }

    #[test]
    fn istio_defaults() {
        let c = OutlierConfig::from_istio(&OutlierDetection::default());
        assert_eq!(
            c,
            OutlierConfig {
                consecutive_5xx: Some(5),
                consecutive_gateway_failure: None,
                consecutive_local_origin_failure: Some(5),
                split_external_local_origin_errors: false,
                interval: 10 * S,
                base_ejection_time: 30 * S,
                max_ejection_time: 300 * S,
                max_ejection_percent: 10,
                min_health_percent: 0,
            }
        );
        assert_eq!(OutlierConfig::default(), c);
        let c = OutlierConfig::from_istio(&OutlierDetection {
            consecutive_5xx_errors: Some(0),
            consecutive_gateway_errors: Some(3),
            consecutive_local_origin_failures: Some(0),
            split_external_local_origin_errors: true,
            interval: Some(2 * S),
            base_ejection_time: Some(400 * S),
            max_ejection_percent: Some(0),
            min_health_percent: Some(50),
        });
        assert_eq!(c.consecutive_5xx, Some(0));
        assert_eq!(c.consecutive_gateway_failure, Some(3));
        // Istio sends only values > 0; Envoy's default 5 applies otherwise.
        assert_eq!(c.consecutive_local_origin_failure, Some(5));
        assert!(c.split_external_local_origin_errors);
        assert_eq!(c.interval, 2 * S);
        assert_eq!(c.base_ejection_time, 400 * S);
        assert_eq!(c.max_ejection_time, 400 * S, "max(300s, base)");
        assert_eq!(c.max_ejection_percent, 10, "0 is not sent by Istio");
        assert_eq!(c.min_health_percent, 50);
    }

    #[test]
    fn five_503s_eject_and_a_success_resets() {
        let d = OutlierDetector::new(config(100, Some(0)));
        let hs = hosts(2);
        let t = Instant::now();
        let h = &hs[0];
        assert_eq!(
            record_n(&d, h, AttemptResult::Status(503), 4, 2, t),
            vec![None; 4]
        );
        assert_eq!(d.record(h, AttemptResult::Status(200), 2, t), None);
        assert_eq!(h.consecutive(), (0, 0, 0));
        assert_eq!(
            record_n(&d, h, AttemptResult::Status(503), 4, 2, t),
            vec![None; 4]
        );
        // 4xx is a success too.
        assert_eq!(d.record(h, AttemptResult::Status(404), 2, t), None);
        assert_eq!(
            record_n(&d, h, AttemptResult::Status(503), 4, 2, t),
            vec![None; 4]
        );
        assert!(!h.is_ejected());
        assert_eq!(
            d.record(h, AttemptResult::Status(503), 2, t),
            Some(EjectionReason::Consecutive5xx)
        );
        assert!(h.is_ejected());
        assert_eq!(h.ejections(), 1);
        assert_eq!(h.backoff(), 1);
        assert_eq!(h.consecutive().0, 0, "detected counter reset");
        let start = d.ejected_at(h).unwrap();
        assert!(start <= t && t - start < Duration::from_millis(1));
        assert_eq!(d.ejected_until(h).unwrap() - start, 30 * S);
        // Already ejected: counted, but not detected or ejected again.
        assert_eq!(
            record_n(&d, h, AttemptResult::Status(503), 10, 2, t),
            vec![None; 10]
        );
        assert_eq!(h.consecutive().0, 10);
        assert_eq!(get(&d.stats().ejections_detected_consecutive_5xx), 1);
        assert_eq!(get(&d.stats().ejections_enforced_consecutive_5xx), 1);
        assert_eq!(get(&d.stats().ejections_enforced_total), 1);
        assert_eq!(get(&d.stats().ejections_active), 1);
        assert_eq!(get(&d.stats().ejections_overflow), 0);
        assert!(!hs[1].is_ejected());
    }

    #[test]
    fn gateway_versus_5xx() {
        let mut c = config(100, Some(3));
        c.consecutive_5xx = Some(5);
        let d = OutlierDetector::new(c);
        let hs = hosts(3);
        let t = Instant::now();
        // 500 is a 5xx but not a gateway error: it resets the gateway counter.
        let h = &hs[0];
        for code in [502, 503, 500, 504] {
            assert_eq!(d.record(h, AttemptResult::Status(code), 3, t), None);
        }
        assert_eq!(h.consecutive(), (4, 1, 0));
        assert_eq!(
            d.record(h, AttemptResult::Status(502), 3, t),
            Some(EjectionReason::Consecutive5xx),
            "fifth consecutive 5xx; only two gateway errors in a row"
        );
        assert_eq!(h.consecutive(), (0, 2, 0));
        assert_eq!(get(&d.stats().ejections_enforced_consecutive_5xx), 1);

        // Three gateway errors in a row trip the gateway rule before the 5xx one.
        let h = &hs[1];
        assert_eq!(d.record(h, AttemptResult::Status(500), 3, t), None);
        assert_eq!(d.record(h, AttemptResult::Status(503), 3, t), None);
        assert_eq!(d.record(h, AttemptResult::Status(502), 3, t), None);
        assert_eq!(
            d.record(h, AttemptResult::Status(504), 3, t),
            Some(EjectionReason::ConsecutiveGatewayFailure)
        );
        assert_eq!(h.consecutive(), (4, 0, 0));

        // Only 500s: never a gateway failure.
        let h = &hs[2];
        assert_eq!(
            record_n(&d, h, AttemptResult::Status(500), 4, 3, t),
            vec![None; 4]
        );
        assert_eq!(h.consecutive(), (4, 0, 0));
        assert_eq!(
            d.record(h, AttemptResult::Status(500), 3, t),
            Some(EjectionReason::Consecutive5xx)
        );
        let s = d.stats();
        assert_eq!(get(&s.ejections_detected_consecutive_gateway_failure), 1);
        assert_eq!(get(&s.ejections_enforced_consecutive_gateway_failure), 1);
        assert_eq!(get(&s.ejections_detected_consecutive_5xx), 2);
        assert_eq!(get(&s.ejections_enforced_consecutive_5xx), 2);
        assert_eq!(get(&s.ejections_enforced_total), 3);
        assert_eq!(get(&s.ejections_active), 3);
    }

    #[test]
    fn unconfigured_gateway_rule_detects_without_ejecting() {
        // Istio leaves consecutive_gateway_failure at Envoy's 5 with enforcement 0.
        let d = OutlierDetector::new(config(100, None));
        let hs = hosts(2);
        let t = Instant::now();
        let r = record_n(&d, &hs[0], AttemptResult::Status(502), 5, 2, t);
        assert_eq!(r[4], Some(EjectionReason::Consecutive5xx));
        let s = d.stats();
        assert_eq!(get(&s.ejections_detected_consecutive_gateway_failure), 1);
        assert_eq!(get(&s.ejections_enforced_consecutive_gateway_failure), 0);
        assert_eq!(get(&s.ejections_detected_consecutive_5xx), 1);
        assert_eq!(get(&s.ejections_enforced_consecutive_5xx), 1);
        assert_eq!(get(&s.ejections_enforced_total), 1);

        // Some(0): the gateway rule is off entirely.
        let d = OutlierDetector::new(config(100, Some(0)));
        record_n(&d, &hs[1], AttemptResult::Status(503), 5, 2, t);
        assert_eq!(
            get(&d.stats().ejections_detected_consecutive_gateway_failure),
            0
        );
        assert!(hs[1].is_ejected());

        // consecutive5xxErrors: 0 disables the 5xx rule.
        let mut c = config(100, Some(0));
        c.consecutive_5xx = Some(0);
        let d = OutlierDetector::new(c);
        let h = HostOutlier::new();
        assert!(
            record_n(&d, &h, AttemptResult::Status(500), 20, 1, t)
                .iter()
                .all(Option::is_none)
        );
        assert_eq!(get(&d.stats().ejections_detected_consecutive_5xx), 0);
    }

    #[test]
    fn local_origin_without_split_maps_to_503_and_504() {
        let d = OutlierDetector::new(config(100, Some(5)));
        let hs = hosts(2);
        let t = Instant::now();
        let h = &hs[0];
        assert_eq!(d.record(h, AttemptResult::ConnectFailed, 2, t), None);
        assert_eq!(d.record(h, AttemptResult::Reset, 2, t), None);
        // Not mapped: neither counts nor resets.
        assert_eq!(d.record(h, AttemptResult::ConnectSucceeded, 2, t), None);
        assert_eq!(d.record(h, AttemptResult::Timeout, 2, t), None);
        assert_eq!(h.consecutive(), (3, 3, 0));
        assert_eq!(d.record(h, AttemptResult::ConnectFailed, 2, t), None);
        // All are gateway errors (503/504): the gateway rule sees the fifth first.
        assert_eq!(
            d.record(h, AttemptResult::Timeout, 2, t),
            Some(EjectionReason::ConsecutiveGatewayFailure)
        );
        // The 5xx rule found the host ejected: no detection, counter kept.
        assert_eq!(get(&d.stats().ejections_detected_consecutive_5xx), 0);
        assert_eq!(h.consecutive(), (5, 0, 0));
        // A local failure does reset with a later success.
        let h = &hs[1];
        d.record(h, AttemptResult::Timeout, 2, t);
        d.record(h, AttemptResult::Status(200), 2, t);
        assert_eq!(h.consecutive(), (0, 0, 0));
    }

    #[test]
    fn split_mode_keeps_local_origin_apart() {
        let d = OutlierDetector::new(OutlierConfig::from_istio(&OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failures: Some(3),
            max_ejection_percent: Some(100),
            ..Default::default()
        }));
        let hs = hosts(3);
        let t = Instant::now();
        let h = &hs[0];
        assert_eq!(d.record(h, AttemptResult::ConnectFailed, 3, t), None);
        assert_eq!(d.record(h, AttemptResult::Timeout, 3, t), None);
        // HTTP results do not touch the local-origin counter, and vice versa.
        assert_eq!(d.record(h, AttemptResult::Status(200), 3, t), None);
        assert_eq!(h.consecutive(), (0, 0, 2));
        assert_eq!(d.record(h, AttemptResult::ConnectSucceeded, 3, t), None);
        assert_eq!(h.consecutive(), (0, 0, 0));
        assert_eq!(d.record(h, AttemptResult::Reset, 3, t), None);
        assert_eq!(d.record(h, AttemptResult::Status(503), 3, t), None);
        assert_eq!(d.record(h, AttemptResult::ConnectFailed, 3, t), None);
        assert_eq!(h.consecutive(), (1, 1, 2));
        assert_eq!(
            d.record(h, AttemptResult::Timeout, 3, t),
            Some(EjectionReason::ConsecutiveLocalOriginFailure)
        );
        assert_eq!(h.consecutive(), (1, 1, 0));

        // 5xx still ejects on its own in split mode, unaffected by local failures.
        let h = &hs[1];
        for _ in 0..4 {
            d.record(h, AttemptResult::Status(500), 3, t);
            d.record(h, AttemptResult::ConnectFailed, 3, t);
            d.record(h, AttemptResult::ConnectSucceeded, 3, t);
        }
        assert_eq!(
            d.record(h, AttemptResult::Status(500), 3, t),
            Some(EjectionReason::Consecutive5xx)
        );
        let s = d.stats();
        assert_eq!(
            get(&s.ejections_detected_consecutive_local_origin_failure),
            1
        );
        assert_eq!(
            get(&s.ejections_enforced_consecutive_local_origin_failure),
            1
        );
        assert_eq!(get(&s.ejections_enforced_consecutive_5xx), 1);
        assert_eq!(get(&s.ejections_enforced_total), 2);

        // Without split the local-origin threshold is not used.
        let d = OutlierDetector::new(OutlierConfig {
            consecutive_local_origin_failure: Some(1),
            ..config(100, Some(0))
        });
        let h = &hs[2];
        assert_eq!(d.record(h, AttemptResult::ConnectFailed, 3, t), None);
        assert_eq!(h.consecutive(), (1, 1, 0));
    }

    #[test]
    fn max_ejection_percent_one_three_and_ten_hosts() {
        let t = Instant::now();
        let fail = AttemptResult::Status(500);

        // Istio default 10 %: a single host is never ejected (100 % > 10 %).
        let d = OutlierDetector::new(config(10, None));
        let hs = hosts(1);
        assert!(
            record_n(&d, &hs[0], fail, 5, 1, t)
                .iter()
                .all(Option::is_none)
        );
        assert!(!hs[0].is_ejected());
        assert_eq!(get(&d.stats().ejections_detected_consecutive_5xx), 1);
        assert_eq!(get(&d.stats().ejections_overflow), 1);
        assert_eq!(get(&d.stats().ejections_enforced_total), 0);
        // The counter was reset at the detection: five more are needed for the next one.
        assert!(
            record_n(&d, &hs[0], fail, 4, 1, t)
                .iter()
                .all(Option::is_none)
        );
        assert_eq!(get(&d.stats().ejections_overflow), 1);
        d.record(&hs[0], fail, 1, t);
        assert_eq!(get(&d.stats().ejections_overflow), 2);

        // With 503s and the gateway rule detection-only, both detections overflow.
        let d = OutlierDetector::new(config(10, None));
        let hs = hosts(1);
        record_n(&d, &hs[0], AttemptResult::Status(503), 5, 1, t);
        assert_eq!(get(&d.stats().ejections_overflow), 2);
        assert_eq!(
            get(&d.stats().ejections_detected_consecutive_gateway_failure),
            1
        );

        // 3 hosts: 10 % ejects none; 50 % ejects one (33 %) but not two (67 %); 100 % all.
        for (percent, expect) in [(10, 0), (50, 1), (66, 1), (67, 2), (100, 3)] {
            let d = OutlierDetector::new(config(percent, Some(0)));
            let hs = hosts(3);
            for h in &hs {
                record_n(&d, h, fail, 5, 3, t);
            }
            let ejected = hs.iter().filter(|h| h.is_ejected()).count();
            assert_eq!(ejected, expect, "{percent}% of 3 hosts");
            assert_eq!(get(&d.stats().ejections_active), expect as u64);
            assert_eq!(get(&d.stats().ejections_overflow), 3 - expect as u64);
            assert_eq!(get(&d.stats().ejections_detected_consecutive_5xx), 3);
        }

        // 10 hosts at 10 %: exactly one (10 % <= 10 %); after it returns another may go.
        let d = OutlierDetector::new(config(10, Some(0)));
        let hs = hosts(10);
        for h in &hs {
            record_n(&d, h, fail, 5, 10, t);
        }
        assert!(hs[0].is_ejected());
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 1);
        assert_eq!(get(&d.stats().ejections_overflow), 9);
        assert_eq!(returned(&d, &hs, t + 30 * S), vec![0]);
        assert_eq!(get(&d.stats().ejections_active), 0);
        assert_eq!(
            record_n(&d, &hs[5], fail, 5, 10, t + 30 * S)[4],
            Some(EjectionReason::Consecutive5xx)
        );
        assert_eq!(
            record_n(&d, &hs[6], fail, 5, 10, t + 30 * S)[4],
            None,
            "second host would be 20 %"
        );

        // Percentages over 100 act as 100; zero hosts never eject.
        let d = OutlierDetector::new(OutlierConfig {
            max_ejection_percent: 250,
            ..config(100, Some(0))
        });
        let hs = hosts(2);
        for h in &hs {
            record_n(&d, h, fail, 5, 2, t);
        }
        assert_eq!(get(&d.stats().ejections_active), 2);
        let h = HostOutlier::new();
        record_n(&d, &h, fail, 5, 0, t);
        assert!(!h.is_ejected());
    }

    #[test]
    fn sweep_returns_after_base_time_and_second_ejection_doubles() {
        let d = OutlierDetector::new(config(100, Some(0)));
        let hs = hosts(2);
        let fail = AttemptResult::Status(503);
        let t0 = Instant::now();
        assert_eq!(
            record_n(&d, &hs[1], fail, 5, 2, t0)[4],
            Some(EjectionReason::Consecutive5xx)
        );
        // Counters built up while ejected are dropped when it returns.
        record_n(&d, &hs[1], fail, 3, 2, t0);
        assert!(returned(&d, &hs, t0 + 10 * S).is_empty());
        assert!(returned(&d, &hs, t0 + 30 * S - Duration::from_millis(1)).is_empty());
        assert!(hs[1].is_ejected());
        assert_eq!(returned(&d, &hs, t0 + 30 * S), vec![1]);
        assert!(!hs[1].is_ejected());
        assert_eq!(hs[1].consecutive(), (0, 0, 0));
        assert_eq!(get(&d.stats().ejections_active), 0);
        assert_eq!(hs[1].backoff(), 1, "no decay in the sweep that returned it");

        // Fails again right away: ejected for 2 x 30 s.
        let t1 = t0 + 31 * S;
        assert_eq!(
            record_n(&d, &hs[1], fail, 5, 2, t1)[4],
            Some(EjectionReason::Consecutive5xx)
        );
        assert_eq!(hs[1].ejections(), 2);
        assert_eq!(hs[1].backoff(), 2);
        assert!(returned(&d, &hs, t1 + 60 * S - Duration::from_millis(1)).is_empty());
        assert_eq!(returned(&d, &hs, t1 + 60 * S), vec![1]);
        // A second sweep does not return it twice.
        assert!(returned(&d, &hs, t1 + 60 * S).is_empty());
        assert_eq!(get(&d.stats().ejections_active), 0);
        assert_eq!(get(&d.stats().ejections_enforced_total), 2);
    }

    #[test]
    fn backoff_decays_on_healthy_sweeps_and_is_capped() {
        let d = OutlierDetector::new(config(100, Some(0)));
        let hs = hosts(1);
        let fail = AttemptResult::Status(500);
        let mut t = Instant::now();
        for round in 1..=2 {
            record_n(&d, &hs[0], fail, 5, 1, t);
            assert_eq!(hs[0].backoff(), round);
            t += d.config().ejection_duration(round);
            assert_eq!(returned(&d, &hs, t), vec![0]);
        }
        // Returned at t with back-off 2: each sweep at least `interval` later takes one off.
        assert!(returned(&d, &hs, t + 9 * S).is_empty());
        assert_eq!(hs[0].backoff(), 2);
        assert!(returned(&d, &hs, t + 10 * S).is_empty());
        assert_eq!(hs[0].backoff(), 1);
        assert!(returned(&d, &hs, t + 20 * S).is_empty());
        assert_eq!(hs[0].backoff(), 0);
        assert!(returned(&d, &hs, t + 30 * S).is_empty());
        assert_eq!(hs[0].backoff(), 0);
        // Back to the base time; the ejection count itself never decreases.
        let t2 = t + 40 * S;
        record_n(&d, &hs[0], fail, 5, 1, t2);
        assert_eq!(hs[0].ejections(), 3);
        assert_eq!(hs[0].backoff(), 1);
        assert!(returned(&d, &hs, t2 + 30 * S - Duration::from_millis(1)).is_empty());
        assert_eq!(returned(&d, &hs, t2 + 30 * S), vec![0]);

        // A host that was never ejected has nothing to decay.
        let never = HostOutlier::new();
        d.sweep(std::iter::once(&never), t2 + 100 * S, |_| panic!());
        assert_eq!(never.backoff(), 0);

        // base 100 s, max 300 s: 100, 200, 300, 300, ... (back-off stops at 4).
        let d = OutlierDetector::new(OutlierConfig {
            base_ejection_time: 100 * S,
            ..config(100, Some(0))
        });
        let h = HostOutlier::new();
        let mut t = Instant::now();
        for (backoff, secs) in [(1, 100), (2, 200), (3, 300), (4, 300), (4, 300), (4, 300)] {
            record_n(&d, &h, fail, 5, 1, t);
            assert_eq!(h.backoff(), backoff);
            let until = d.ejected_until(&h).unwrap();
            let start = d.ejected_at(&h).unwrap();
            assert_eq!(until - start, secs * S);
            t += secs * S;
            d.sweep(std::iter::once(&h), t, |_| {});
            assert!(!h.is_ejected());
        }
        assert_eq!(
            OutlierConfig {
                max_ejection_time: Duration::ZERO,
                ..config(10, None)
            }
            .ejection_duration(3),
            30 * S,
            "cap is max(base, max_ejection_time)"
        );
    }

    #[test]
    fn forget_releases_the_slot() {
        let d = OutlierDetector::new(config(50, Some(0)));
        let hs = hosts(2);
        let t = Instant::now();
        record_n(&d, &hs[0], AttemptResult::Status(500), 5, 2, t);
        assert!(hs[0].is_ejected());
        assert_eq!(d.ejected_count(), 1);
        d.forget(&hs[0]);
        assert!(!hs[0].is_ejected());
        assert_eq!(d.ejected_count(), 0);
        record_n(&d, &hs[0], AttemptResult::Status(500), 5, 1, t);
        assert!(!hs[0].is_ejected(), "a forgotten host is not ejected again");
        assert_eq!(
            record_n(&d, &hs[1], AttemptResult::Status(500), 5, 2, t)[4],
            Some(EjectionReason::Consecutive5xx)
        );
    }

    #[test]
    fn concurrent_records_respect_the_cap() {
        let d = OutlierDetector::new(config(50, Some(0)));
        let hs = hosts(10);
        let t = Instant::now();
        let ejected = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for h in &hs {
                            if d.record(h, AttemptResult::Status(503), 10, t).is_some() {
                                ejected.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(get(&ejected), 5);
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 5);
        assert_eq!(get(&d.stats().ejections_active), 5);
        assert_eq!(get(&d.stats().ejections_enforced_total), 5);
        assert!(get(&d.stats().ejections_overflow) > 0);
    }

    #[test]
    fn grpc_to_http_matches_envoy() {
        let expected = [
            200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
        ];
        for (status, http) in expected.iter().enumerate() {
            assert_eq!(grpc_to_http(status as u32), *http, "grpc-status {status}");
        }
        assert_eq!(grpc_to_http(17), 500);
        assert_eq!(grpc_to_http(u32::MAX), 500);
        // UNAVAILABLE counts as a gateway failure, DEADLINE_EXCEEDED too, CANCELLED as success.
        let d = OutlierDetector::new(config(100, Some(2)));
        let h = HostOutlier::new();
        let t = Instant::now();
        d.record(&h, AttemptResult::Status(grpc_to_http(1)), 1, t);
        assert_eq!(h.consecutive(), (0, 0, 0));
        d.record(&h, AttemptResult::Status(grpc_to_http(14)), 1, t);
        assert_eq!(
            d.record(&h, AttemptResult::Status(grpc_to_http(4)), 1, t),
            Some(EjectionReason::ConsecutiveGatewayFailure)
        );
    }

    #[test]
    fn stats_values() {
        let d = OutlierDetector::new(config(50, None));
        let hs = hosts(4);
        let t = Instant::now();
        // Host 0: 503s eject it (gateway detected, not enforced; 5xx enforced).
        record_n(&d, &hs[0], AttemptResult::Status(503), 5, 4, t);
        // Host 1: 500s eject it (50 %).
        record_n(&d, &hs[1], AttemptResult::Status(500), 5, 4, t);
        // Host 2: would be 75 %: both detections overflow.
        record_n(&d, &hs[2], AttemptResult::Status(504), 5, 4, t);
        let s = d.stats();
        let all = [
            get(&s.ejections_enforced_total),
            get(&s.ejections_active),
            get(&s.ejections_overflow),
            get(&s.ejections_enforced_consecutive_5xx),
            get(&s.ejections_detected_consecutive_5xx),
            get(&s.ejections_enforced_consecutive_gateway_failure),
            get(&s.ejections_detected_consecutive_gateway_failure),
            get(&s.ejections_enforced_consecutive_local_origin_failure),
            get(&s.ejections_detected_consecutive_local_origin_failure),
        ];
        assert_eq!(all, [2, 2, 2, 2, 3, 0, 2, 0, 0]);
        assert_eq!(returned(&d, &hs, t + 30 * S), vec![0, 1]);
        assert_eq!(get(&s.ejections_active), 0);
        assert_eq!(get(&s.ejections_enforced_total), 2, "counters only grow");
        assert_eq!(EjectionReason::Consecutive5xx.as_str(), "CONSECUTIVE_5XX");
    }
}
