//! Types shared by the benchmark's parts: what a generator process is asked to
//! do ([`Load`]) and what it reports ([`LoadResult`]), and the report
//! ([`Report`]) that `report.md`, `report.json` and the plots are made from.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One job for the load generator (`nodeway-bench gen '<json>'`, run inside
/// the client pod's network namespace). Durations in milliseconds; the
/// warm-up part of a run is sent at the same rate but not recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Load {
    /// Open loop: HTTP/1.1 keep-alive `GET path` at `rate` requests/s in
    /// total, spread round robin over `connections` connections (each has
    /// its own schedule; a request waiting for its connection is charged
    /// from its due time).
    Http1 {
        target: SocketAddr,
        authority: String,
        path: String,
        connections: usize,
        rate: u64,
        duration_ms: u64,
        warmup_ms: u64,
    },
    /// Open loop: HTTP/2 with prior knowledge over `connections` connections,
    /// at most `streams` concurrent streams each.
    H2 {
        target: SocketAddr,
        authority: String,
        path: String,
        connections: usize,
        streams: usize,
        rate: u64,
        duration_ms: u64,
        warmup_ms: u64,
    },
    /// Open loop: gRPC unary `/nodeway.test.Mock/Call` whose request asks the
    /// mock for `mock_path` (e.g. `/size/1024`), over HTTP/2 `connections`.
    Grpc {
        target: SocketAddr,
        authority: String,
        mock_path: String,
        connections: usize,
        rate: u64,
        duration_ms: u64,
        warmup_ms: u64,
    },
    /// Closed loop on one TCP connection: write `size` bytes, read `size`
    /// bytes back; `warmup` round trips unrecorded, then `count` recorded.
    PingPong {
        target: SocketAddr,
        size: usize,
        count: u64,
        warmup: u64,
    },
    /// Closed loop: `concurrency` workers, each repeatedly connects, sends one
    /// HTTP/1.1 `GET path` with `connection: close`, reads the response and
    /// closes, for `duration_ms`. Latency = connect + request + response.
    ConnPerRequest {
        target: SocketAddr,
        authority: String,
        path: String,
        concurrency: usize,
        duration_ms: u64,
    },
    /// Closed loop: `concurrency` workers, each repeatedly opens a TCP
    /// connection and closes it (no data), for `duration_ms`. Latency =
    /// connect.
    Connect {
        target: SocketAddr,
        concurrency: usize,
        duration_ms: u64,
    },
    /// Opens `count` HTTP/1.1 keep-alive connections, `opens_per_sec` at most
    /// per second, sends one `GET path` on each (so a proxy really carries
    /// it), prints one line `{"idle_open":N,"errors":E}` on stdout when done,
    /// then holds them all until its stdin reaches EOF, and exits printing
    /// its [`LoadResult`] (latency = that one request).
    Idle {
        target: SocketAddr,
        authority: String,
        path: String,
        count: usize,
        opens_per_sec: u64,
    },
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What a generator process prints as its last stdout line (JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadResult {
    /// Requests (or round trips, connections) recorded: warm-up excluded.
    pub sent: u64,
    /// Completed with a 2xx (gRPC: HTTP 200 and grpc-status 0; TCP: all bytes).
    pub ok: u64,
    /// Everything else: other statuses, I/O errors, timeouts.
    pub errors: u64,
    /// Wall time of the recorded part, seconds.
    pub elapsed_s: f64,
    /// `ok / elapsed_s`.
    pub achieved_rate: f64,
    pub latency_us: Latency,
    /// Percentile curve for plots: `(percentile 0..100, µs)`, about 50
    /// points, denser toward the tail (HDR `iter_quantiles`).
    pub curve: Vec<(f64, f64)>,
    /// First few distinct error messages, for the report's notes.
    pub error_samples: Vec<String>,
}

/// The whole benchmark report (`report.json`; `report.md` renders it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// `quick`, `smoke` or `full`.
    pub mode: String,
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    pub machine: Machine,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
    /// Interleaved runs per figure (medians are over these).
    pub runs: usize,
    /// How the measurements were taken (method notes, one paragraph each).
    pub method: Vec<String>,
    pub scenarios: Vec<Scenario>,
    /// Every target of the issue with where we stand.
    pub targets: Vec<TargetCheck>,
    pub plots: Vec<Plot>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub haproxy: String,
    pub nodeway: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scenario {
    /// 1..=10, as numbered in the issue.
    pub id: u32,
    pub title: String,
    /// What was run, one or two sentences.
    pub setup: String,
    pub tables: Vec<Table>,
    /// Observations, caveats, errors seen.
    pub notes: Vec<String>,
}

/// A table of already formatted cells; the first column names the row.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetCheck {
    /// e.g. "added p99 ≤ 1.25× HAProxy's (HTTP/1.1, 5 000 req/s)".
    pub target: String,
    /// e.g. "412 µs vs HAProxy 380 µs (1.08×)".
    pub measured: String,
    pub met: bool,
    /// When missed: by how much, e.g. "+8% over the limit". Empty when met.
    pub missed_by: String,
}

/// A PNG the report links to (file name relative to the report's folder).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plot {
    pub file: String,
    pub title: String,
    pub kind: PlotKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlotKind {
    /// Latency (µs, log y) against percentile (x on an "inverted log" scale:
    /// 0, 90, 99, 99.9, 99.99), one line per series.
    PercentileCurves {
        y_label: String,
        series: Vec<Series>,
    },
    /// Vertical bars, one per `(label, value)`.
    Bars {
        y_label: String,
        bars: Vec<(String, f64)>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    /// `(percentile 0..100, µs)`.
    pub points: Vec<(f64, f64)>,
}

/// How long and how often: `smoke` (CI: seconds, proves the harness runs),
/// `quick` (development, under 3 minutes), `full` (the README's numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Smoke,
    Quick,
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Smoke => "smoke",
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }

    /// Interleaved runs per figure.
    pub fn runs(self) -> usize {
        match self {
            Mode::Smoke => 1,
            Mode::Quick => 1,
            Mode::Full => 5,
        }
    }

    /// Recorded duration of one fixed-rate run, milliseconds.
    pub fn run_ms(self) -> u64 {
        match self {
            Mode::Smoke => 300,
            Mode::Quick => 1_500,
            Mode::Full => 3_000,
        }
    }

    /// Unrecorded warm-up before each run, milliseconds.
    pub fn warmup_ms(self) -> u64 {
        match self {
            Mode::Smoke => 100,
            Mode::Quick => 300,
            Mode::Full => 500,
        }
    }
}
