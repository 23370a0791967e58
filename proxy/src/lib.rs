//! Nodeway: a node-level L7 proxy that enforces Istio `DestinationRule` and
//! `VirtualService` semantics per client workload.
//!
//! Data flows one way: `config` → `state` → `proxy` (using `resilience` and
//! `lb`) → `telemetry`. `admin` serves health and config dumps; `redirect`
//! supplies original destinations (eBPF, later).

pub mod admin;
pub mod app;
pub mod config;
pub mod lb;
pub mod proxy;
pub mod redirect;
pub mod resilience;
pub mod state;
pub mod telemetry;
