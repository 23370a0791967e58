//! Downstream admission: what protects the shared proxy from its own
//! clients. Node-wide caps on downstream connections and in-flight requests,
//! the largest share of each that one client pod may hold (so a flooding pod
//! cannot starve its neighbours), and Envoy's overload manager on memory:
//! above 95% of the memory limit HTTP/1.1 keep-alive is disabled, above 98%
//! new requests get `503` (`OM`) until the pressure falls again.
//!
//! Every refusal is counted by reason; the proxy also logs it with Envoy's
//! `OM` flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::breaker::Gauge;

/// Pressure at which Envoy's example configuration disables keep-alive.
pub const DISABLE_KEEPALIVE_AT: f64 = 0.95;
/// Pressure from which new requests are refused (Envoy's
/// `stop_accepting_requests`).
pub const STOP_ACCEPTING_REQUESTS_AT: f64 = 0.98;
/// How often the memory monitor reads the resident set (Envoy's default
/// overload manager refresh interval).
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(250);

/// The caps (flags of `nodeway run`, see `ProxySettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadLimits {
    /// Downstream connections open at once on the node.
    pub max_connections: u32,
    /// Downstream requests in flight at once on the node.
    pub max_requests: u32,
    /// The largest share (percent) of each cap one client pod may hold.
    pub client_share_percent: u32,
    /// Resident memory the overload manager measures pressure against;
    /// `None`: no memory-based actions.
    pub memory_limit: Option<u64>,
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The node-wide cap is reached.
    Node,
    /// This client pod holds its whole share of the node-wide cap.
    Client,
    /// Memory pressure is above [`STOP_ACCEPTING_REQUESTS_AT`].
    Memory,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Rejection::Node, Rejection::Client, Rejection::Memory];

    /// The `reason` label of `nodeway_downstream_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Node => "node_limit",
            Rejection::Client => "client_limit",
            Rejection::Memory => "memory",
        }
    }
}

/// What is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Connection,
    Request,
}

impl Admitted {
    /// The `kind` label of `nodeway_downstream_rejected_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Admitted::Connection => "connection",
            Admitted::Request => "request",
        }
    }

    /// Envoy-style `response_code_details` of a refusal.
    pub fn details(self, why: Rejection) -> &'static str {
        match (self, why) {
            (_, Rejection::Memory) => "overload",
            (Admitted::Connection, Rejection::Node) => "node_downstream_connection_limit",
            (Admitted::Connection, Rejection::Client) => "client_downstream_connection_limit",
            (Admitted::Request, Rejection::Node) => "node_downstream_request_limit",
            (Admitted::Request, Rejection::Client) => "client_downstream_request_limit",
        }
    }
}

/// One client pod's downstream connections and requests.
#[derive(Debug, Default)]
pub struct ClientDownstream {
    pub connections: Gauge,
    pub requests: Gauge,
}

/// The node's downstream admission state, shared by every connection.
#[derive(Debug)]
pub struct Overload {
    pub limits: OverloadLimits,
    pub connections: Gauge,
    pub requests: Gauge,
    /// Memory pressure in millionths of the limit (0 without a limit).
    pressure_ppm: AtomicU32,
    /// Refusals by [`Admitted`] × [`Rejection`].
    rejected: [[AtomicU64; 3]; 2],
}

impl Overload {
    pub fn new(limits: OverloadLimits) -> Self {
        Overload {
            limits,
            connections: Gauge::default(),
            requests: Gauge::default(),
            pressure_ppm: AtomicU32::new(0),
            rejected: Default::default(),
        }
    }

    /// A client pod's share of a node-wide cap (at least 1).
    pub fn client_cap(&self, node_max: u32) -> u32 {
        ((u64::from(node_max) * u64::from(self.limits.client_share_percent) / 100) as u32).max(1)
    }

    /// Admits one downstream connection of `client`, or says why not. The
    /// returned guard holds the slots until it is dropped.
    pub fn admit_connection(
        self: &Arc<Self>,
        client: &Arc<ClientDownstream>,
    ) -> Result<Admission, Rejection> {
        self.admit(client, Admitted::Connection)
    }

    /// Admits one downstream request of `client` (refused under memory
    /// pressure too); the guard lives until the request's exchange ends.
    pub fn admit_request(
        self: &Arc<Self>,
        client: &Arc<ClientDownstream>,
    ) -> Result<Admission, Rejection> {
        if !self.accepting_requests() {
            self.count(Admitted::Request, Rejection::Memory);
            return Err(Rejection::Memory);
        }
        self.admit(client, Admitted::Request)
    }

    fn admit(
        self: &Arc<Self>,
        client: &Arc<ClientDownstream>,
        what: Admitted,
    ) -> Result<Admission, Rejection> {
        let (node, mine, max) = match what {
            Admitted::Connection => (
                &self.connections,
                &client.connections,
                self.limits.max_connections,
            ),
            Admitted::Request => (&self.requests, &client.requests, self.limits.max_requests),
        };
        if !mine.try_take(self.client_cap(max)) {
            self.count(what, Rejection::Client);
            return Err(Rejection::Client);
        }
        if !node.try_take(max) {
            mine.give();
            self.count(what, Rejection::Node);
            return Err(Rejection::Node);
        }
        Ok(Admission {
            overload: self.clone(),
            client: client.clone(),
            what,
        })
    }

    fn count(&self, what: Admitted, why: Rejection) {
        self.rejected[what as usize][why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far of `what` for `why`.
    pub fn rejected(&self, what: Admitted, why: Rejection) -> u64 {
        self.rejected[what as usize][why as usize].load(Ordering::Relaxed)
    }

    /// Records a reading of the resident set; the actions follow from it.
    pub fn record_memory(&self, resident: u64) {
        let ppm = match self.limits.memory_limit {
            Some(limit) if limit > 0 => (u128::from(resident) * 1_000_000 / u128::from(limit))
                .min(u128::from(u32::MAX)) as u32,
            _ => 0,
        };
        self.pressure_ppm.store(ppm, Ordering::Relaxed);
    }

    /// Memory pressure: resident set / limit (0 without a limit).
    pub fn pressure(&self) -> f64 {
        f64::from(self.pressure_ppm.load(Ordering::Relaxed)) / 1e6
    }

    /// Envoy's `disable_http_keepalive` action is active.
    pub fn keepalive_disabled(&self) -> bool {
        self.pressure() >= DISABLE_KEEPALIVE_AT
    }

    /// Envoy's `stop_accepting_requests` action is not active.
    pub fn accepting_requests(&self) -> bool {
        self.pressure() < STOP_ACCEPTING_REQUESTS_AT
    }
}

/// Slots of one admitted connection or request; dropping gives them back.
#[derive(Debug)]
pub struct Admission {
    overload: Arc<Overload>,
    client: Arc<ClientDownstream>,
    what: Admitted,
}

impl Drop for Admission {
    fn drop(&mut self) {
        match self.what {
            Admitted::Connection => {
                self.client.connections.give();
                self.overload.connections.give();
            }
            Admitted::Request => {
                self.client.requests.give();
                self.overload.requests.give();
            }
        }
    }
}

/// Resident set size in bytes (`VmRSS` of `/proc/self/status`, in kB).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads the resident set every [`REFRESH_INTERVAL`] until `stop` (only
/// when a memory limit is set).
pub async fn monitor_memory(overload: Arc<Overload>, stop: CancellationToken) {
    if overload.limits.memory_limit.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was = (false, true);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Some(resident) = resident_memory_bytes() {
            overload.record_memory(resident);
        }
        let now = (overload.keepalive_disabled(), overload.accepting_requests());
        if now != was {
            tracing::warn!(
                pressure = format!("{:.1}%", overload.pressure() * 100.0),
                keepalive_disabled = now.0,
                accepting_requests = now.1,
                "overload manager: memory pressure changed the actions in force"
            );
            was = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overload(max: u32, share: u32, memory_limit: Option<u64>) -> Arc<Overload> {
        Arc::new(Overload::new(OverloadLimits {
            max_connections: max,
            max_requests: max,
            client_share_percent: share,
            memory_limit,
        }))
    }

    #[test]
    fn a_client_gets_its_share_and_the_node_its_cap() {
        let o = overload(4, 50, None);
        let (a, b, c) = (Arc::default(), Arc::default(), Arc::default());
        let a1 = o.admit_connection(&a).unwrap();
        let _a2 = o.admit_connection(&a).unwrap();
        assert_eq!(o.admit_connection(&a).unwrap_err(), Rejection::Client);
        let _b1 = o.admit_connection(&b).unwrap();
        let _b2 = o.admit_connection(&b).unwrap();
        assert_eq!(o.admit_connection(&c).unwrap_err(), Rejection::Node);
        // The refused node slot was not kept against `c`.
        assert_eq!(c.connections.get(), 0);
        drop(a1);
        let _c1 = o.admit_connection(&c).unwrap();
        assert_eq!(o.connections.get(), 4);
        assert_eq!(o.rejected(Admitted::Connection, Rejection::Client), 1);
        assert_eq!(o.rejected(Admitted::Connection, Rejection::Node), 1);
        assert_eq!(o.rejected(Admitted::Request, Rejection::Node), 0);
    }

    #[test]
    fn memory_pressure_turns_actions_on_and_off() {
        let o = overload(100, 50, Some(1000));
        let client = Arc::default();
        o.record_memory(900);
        assert!(!o.keepalive_disabled() && o.accepting_requests());
        o.record_memory(960);
        assert!(o.keepalive_disabled() && o.accepting_requests());
        o.record_memory(985);
        assert!(!o.accepting_requests());
        assert_eq!(o.admit_request(&client).unwrap_err(), Rejection::Memory);
        // Connections are still admitted: they may carry requests later.
        assert!(o.admit_connection(&client).is_ok());
        o.record_memory(500);
        assert!(o.admit_request(&client).is_ok());
        assert_eq!(o.rejected(Admitted::Request, Rejection::Memory), 1);
        // Without a limit there is no pressure, however large the process.
        let unlimited = overload(100, 50, None);
        unlimited.record_memory(u64::MAX);
        assert_eq!(unlimited.pressure(), 0.0);
    }

    #[test]
    fn a_reading_of_this_process() {
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
    }
}
