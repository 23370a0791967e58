//! The policies' run-time parts, independent of any connection: circuit
//! breaking (limits, budgets and their permits), outlier detection, and the
//! retry back-off. The proxy applies them; connection pools live with it
//! (`proxy::upstream`).

pub mod breaker;
pub mod outlier;
pub mod overload;
pub mod retry;
