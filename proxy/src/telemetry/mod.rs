//! What the data path records: the access log, Envoy's response flags and
//! the Envoy/Istio counters (`stats`). A leaf: it knows the configuration's
//! types and nothing of the proxy; `admin::metrics` reads the counters.

pub mod access_log;
pub mod flags;
pub mod stats;

pub use flags::{ResponseFlag, ResponseFlags};
