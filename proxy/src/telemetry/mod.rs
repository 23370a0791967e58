//! What the proxy reports: access log and response flags (metrics come with the observability issue).

pub mod access_log;
pub mod flags;
pub mod stats;

pub use flags::{ResponseFlag, ResponseFlags};
