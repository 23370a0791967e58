//! What the proxy reports: access log and response flags (metrics come with the observability issue).

pub mod access_log;
pub mod flags;

pub use flags::{ResponseFlag, ResponseFlags};
