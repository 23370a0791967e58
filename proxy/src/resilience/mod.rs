//! Circuit breaking (limits and the pending queue), connection pools,
//! retries, timeouts and outlier detection.

pub mod breaker;
pub mod outlier;
pub mod pool;
pub mod retry;
