//! Placeholder: replaced by the plot writer.
