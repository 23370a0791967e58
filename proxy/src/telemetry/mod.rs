//! What the proxy reports: access log, response flags, Envoy/Istio counters
//! (`stats`) and the Prometheus endpoint (`metrics`).

pub mod access_log;
pub mod flags;
pub mod metrics;
pub mod stats;

pub use flags::{ResponseFlag, ResponseFlags};
