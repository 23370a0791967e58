//! Placeholder: replaced by the report writer.
