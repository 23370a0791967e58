//! Envoy response flags, kept in the order they were set.
//!
//! Envoy prints flags in insertion order: a connect failure whose retries ran
//! out is `URX,UF` because the router records the exhausted retry budget
//! before it sends the local reply that marks the connection failure.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// `UH`: no healthy upstream host.
    NoHealthyUpstream,
    /// `UT`: upstream request timeout (route or per-try).
    UpstreamRequestTimeout,
    /// `UR`: upstream remote reset (HTTP/2 stream reset by the upstream).
    UpstreamRemoteReset,
    /// `UF`: upstream connection failure.
    UpstreamConnectionFailure,
    /// `UC`: upstream connection termination.
    UpstreamConnectionTermination,
    /// `UO`: upstream overflow (circuit breaking).
    UpstreamOverflow,
    /// `NR`: no route configured.
    NoRouteFound,
    /// `DC`: downstream connection termination.
    DownstreamConnectionTermination,
    /// `URX`: retry limit exceeded.
    UpstreamRetryLimitExceeded,
    /// `DPE`: downstream protocol error.
    DownstreamProtocolError,
    /// `UPE`: upstream protocol error.
    UpstreamProtocolError,
    /// `NC`: no cluster found.
    NoClusterFound,
    /// `OM`: refused by the overload manager (a downstream cap or memory).
    OverloadManager,
    /// `SI`: stream idle timeout.
    StreamIdleTimeout,
}

impl ResponseFlag {
    pub fn short(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::OverloadManager => "OM",
            ResponseFlag::StreamIdleTimeout => "SI",
        }
    }
}

/// Set of response flags in insertion order (no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags {
    flags: [Option<ResponseFlag>; 6],
}

impl ResponseFlags {
    pub fn set(&mut self, flag: ResponseFlag) {
        for slot in self.flags.iter_mut() {
            match slot {
                Some(f) if *f == flag => return,
                Some(_) => continue,
                None => {
                    *slot = Some(flag);
                    return;
                }
            }
        }
    }

    pub fn contains(&self, flag: ResponseFlag) -> bool {
        self.flags.contains(&Some(flag))
    }

    pub fn is_empty(&self) -> bool {
        self.flags[0].is_none()
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, flag) in self.flags.iter().flatten().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(flag.short())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertion_order_and_dedup() {
        let mut flags = ResponseFlags::default();
        assert_eq!(flags.to_string(), "-");
        flags.set(ResponseFlag::UpstreamRetryLimitExceeded);
        flags.set(ResponseFlag::UpstreamConnectionFailure);
        flags.set(ResponseFlag::UpstreamRetryLimitExceeded);
        assert_eq!(flags.to_string(), "URX,UF");
        assert!(flags.contains(ResponseFlag::UpstreamConnectionFailure));
    }
}
