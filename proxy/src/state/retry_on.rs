//! `retryOn` of an Istio retry policy: Envoy's retry conditions and Istio's
//! defaults.

use std::fmt;
use std::str::FromStr;

/// Parsed `retryOn`: Envoy's HTTP and gRPC retry conditions plus retriable status codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// `retriable-status-codes` given (the codes themselves are in `status_codes`).
    pub retriable_status_codes: bool,
    pub status_codes: Vec<u16>,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_internal: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a valid retryOn condition (expected one of {VALID_CONDITIONS} or an HTTP status code)"
)]
pub struct InvalidRetryOn(pub String);

const VALID_CONDITIONS: &str = "5xx, gateway-error, reset, connect-failure, retriable-4xx, refused-stream, \
    retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable";

impl RetryOn {
    /// Istio's retry policy for routes without `retries`: 2 attempts on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
    pub fn istio_default() -> Self {
        RetryOn {
            connect_failure: true,
            refused_stream: true,
            grpc_unavailable: true,
            grpc_cancelled: true,
            retriable_status_codes: true,
            status_codes: vec![503],
            ..Default::default()
        }
    }

    /// Whether a response with this HTTP status may be retried (before any byte reached the client).
    pub fn retries_status(&self, status: u16) -> bool {
        (self.five_xx && (500..=599).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || (self.retriable_status_codes && self.status_codes.contains(&status))
    }

    /// Whether a gRPC status in the response headers (trailers-only response) may be retried.
    pub fn retries_grpc_status(&self, code: u32) -> bool {
        match code {
            1 => self.grpc_cancelled,
            4 => self.grpc_deadline_exceeded,
            8 => self.grpc_resource_exhausted,
            13 => self.grpc_internal,
            14 => self.grpc_unavailable,
            _ => false,
        }
    }

    /// Connection refused / connect timeout / local connect error.
    pub fn retries_connect_failure(&self) -> bool {
        self.connect_failure || self.five_xx || self.gateway_error
    }

    /// Upstream reset or disconnect before the response started, or a per-try timeout.
    pub fn retries_reset(&self) -> bool {
        self.reset || self.five_xx
    }

    /// Per-try timeout: Envoy retries it under `5xx`, `gateway-error` and `reset`.
    pub fn retries_per_try_timeout(&self) -> bool {
        self.five_xx || self.gateway_error || self.reset
    }

    /// HTTP/2 REFUSED_STREAM from the upstream.
    pub fn retries_refused_stream(&self) -> bool {
        self.refused_stream || self.five_xx
    }
}

impl FromStr for RetryOn {
    type Err = InvalidRetryOn;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut on = RetryOn::default();
        for raw in s.split(',') {
            let cond = raw.trim();
            match cond {
                "" => continue,
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => on.retriable_status_codes = true,
                "cancelled" => on.grpc_cancelled = true,
                "deadline-exceeded" => on.grpc_deadline_exceeded = true,
                "internal" => on.grpc_internal = true,
                "resource-exhausted" => on.grpc_resource_exhausted = true,
                "unavailable" => on.grpc_unavailable = true,
                // Istio turns bare codes into retriable-status-codes.
                code => match code.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => {
                        on.retriable_status_codes = true;
                        if !on.status_codes.contains(&c) {
                            on.status_codes.push(c);
                        }
                    }
                    _ => return Err(InvalidRetryOn(cond.to_string())),
                },
            }
        }
        Ok(on)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let named = [
            (self.five_xx, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.connect_failure, "connect-failure"),
            (self.retriable_4xx, "retriable-4xx"),
            (self.refused_stream, "refused-stream"),
            (self.retriable_status_codes, "retriable-status-codes"),
            (self.grpc_cancelled, "cancelled"),
            (self.grpc_deadline_exceeded, "deadline-exceeded"),
            (self.grpc_internal, "internal"),
            (self.grpc_resource_exhausted, "resource-exhausted"),
            (self.grpc_unavailable, "unavailable"),
        ];
        let mut first = true;
        for (_, name) in named.iter().filter(|(on, _)| *on) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(name)?;
        }
        for code in &self.status_codes {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{code}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envoy_conditions_and_bare_codes() {
        let on: RetryOn = "connect-failure, refused-stream,unavailable,cancelled,503"
            .parse()
            .unwrap();
        assert!(
            on.connect_failure && on.refused_stream && on.grpc_unavailable && on.grpc_cancelled
        );
        assert!(on.retries_status(503));
        assert!(!on.retries_status(500));
        assert_eq!(
            on.to_string(),
            "connect-failure,refused-stream,retriable-status-codes,cancelled,unavailable,503"
        );
    }

    #[test]
    fn rejects_unknown_condition_with_its_name() {
        let err = "5xx,sometimes".parse::<RetryOn>().unwrap_err();
        assert!(err.to_string().contains("\"sometimes\""), "{err}");
        assert!("600".parse::<RetryOn>().is_err());
    }

    #[test]
    fn gateway_error_covers_502_to_504_only() {
        let on: RetryOn = "gateway-error".parse().unwrap();
        assert!(on.retries_status(502) && on.retries_status(503) && on.retries_status(504));
        assert!(!on.retries_status(500));
        assert!(on.retries_connect_failure());
        assert!(!on.retries_reset());
    }
}
