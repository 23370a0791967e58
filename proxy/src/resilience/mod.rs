//! Connection pools, retries and timeouts (breakers and outlier detection come with the resilience issue).

pub mod pool;
pub mod retry;
