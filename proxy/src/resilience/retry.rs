//! Retry back-off between attempts (Envoy's defaults).

use std::time::Duration;

/// Envoy's default back-off between retries: 25 ms base, 250 ms cap.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Envoy's fully jittered exponential back-off: a random duration in
/// `[0, min(base * 2^retry, max))` for the retry numbered from 1.
pub fn backoff(retry: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_MAX);
    let ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(fastrand::u64(0..ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_cap() {
        for retry in 1..20 {
            assert!(backoff(retry) < BACKOFF_MAX);
        }
        assert!(backoff(1) < Duration::from_millis(50));
    }
}
