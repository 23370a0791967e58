//! Placeholder: replaced by scenario 10 (config scale).
