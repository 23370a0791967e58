//! Connection pools, retries, timeouts (outlier detection and breakers come with the resilience issue).
pub mod retry;
