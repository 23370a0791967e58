//! Placeholder: replaced by the load generator.
use crate::model::{Load, LoadResult};

pub fn run(_load: &Load) -> Result<LoadResult, String> {
    Err("load generator not written yet".to_owned())
}
