//! Nodeway: a node-level L7 proxy that enforces Istio `DestinationRule` and
//! `VirtualService` semantics per client workload.
//!
//! # Layers
//!
//! Modules are layered; a module may use only modules of a lower layer
//! (never its own layer's neighbours, never a higher one), so dependencies
//! point one way and there are no cycles. `tests/layers.rs` reads every
//! `crate::…` path in `src/` and fails on one that points up or sideways;
//! this table is the rule it checks.
//!
//! ```text
//! layer  modules
//! 5      app
//! 4      admin
//! 3      proxy
//! 2      lb resilience
//! 1      config net redirect status telemetry
//! 0      state
//! ```
//!
//! - `state`: the configuration as the proxy uses it (types only).
//! - `config`: Kubernetes and Istio objects from files or the API server,
//!   validated and resolved into a `state::Snapshot`.
//! - `telemetry`: access log, Envoy's response flags, per-cluster counters.
//! - `redirect`: eBPF programs, pods' network namespaces, original destinations.
//! - `net`: the accept loop every listener shares.
//! - `status`: what the proxy reports about its configuration and redirect.
//! - `lb`, `resilience`: load balancing; breakers, outlier detection, back-off.
//! - `proxy`: the data path, by traffic direction (outbound, inbound, upstream).
//! - `admin`: the admin API, `/metrics` and readiness servers, the CLI client.
//! - `app`: `nodeway run`: wires everything, reloads, enrols pods.
//!
//! `docs/ARCHITECTURE.md` follows a connection and a request through them.

pub mod admin;
pub mod app;
pub mod config;
pub mod lb;
pub mod net;
pub mod proxy;
pub mod redirect;
pub mod resilience;
pub mod state;
pub mod status;
pub mod telemetry;
