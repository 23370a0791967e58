//! The load generator behind `nodeway-bench gen '<json Load>'`.
//!
//! [`run`] executes one [`Load`] and returns its [`LoadResult`]. The harness
//! runs it pinned to one CPU core that it shares with the backend, so nothing
//! here ever spins: every wait is a sleep (thread or tokio) or an I/O wait.
//!
//! - Open loop (`http1`, `h2`, `grpc`, see [`open`]): a pacer thread sleeps
//!   until each request's due time and hands it to the connection that owns
//!   it; connections are tasks on a current-thread tokio runtime. A request
//!   whose connection was free at its due time is charged from the moment the
//!   connection picked it up (the generator's own lateness is not the system
//!   under test's fault); one that had to wait for its connection is charged
//!   from its due time (no coordinated omission).
//! - Closed loop (`ping_pong`, `conn_per_request`, `connect`, see [`closed`]):
//!   latency per operation, rate = operations per second.
//! - `idle` (see [`idle`]): opens keep-alive connections slowly, holds them
//!   until stdin reaches EOF.
//!
//! Only successful operations go into the latency histogram: failures are
//! counted (`errors`) and a few distinct messages kept (`error_samples`).

mod client;
mod closed;
mod idle;
mod open;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::model::{Latency, Load, LoadResult};

use client::Endpoint;

/// How long in-flight work may still finish after the end of a run; what is
/// left then counts as errors ([`TIMEOUT_AT_END`]).
const GRACE: Duration = Duration::from_secs(2);
/// Upper bound of one TCP connect (also bounded by the end of the run).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Distinct error messages kept in [`LoadResult::error_samples`].
const MAX_ERROR_SAMPLES: usize = 5;
/// Error of requests still unfinished [`GRACE`] after the end of a run.
const TIMEOUT_AT_END: &str = "timeout at end of run";
/// Histogram range in microseconds: 1 µs to 60 s, 3 significant digits.
const HIST_LOW_US: u64 = 1;
const HIST_HIGH_US: u64 = 60_000_000;
const HIST_SIGFIG: u8 = 3;
/// Concurrent calls per gRPC connection.
const GRPC_STREAMS: usize = 100;
/// Upper bound of the number of points of [`LoadResult::curve`].
const CURVE_POINTS: usize = 50;

/// Runs one load to completion (blocking) and returns what it measured.
///
/// Builds its own current-thread tokio runtime where needed, so it must not
/// be called from inside an async context. `Idle` prints its
/// `{"idle_open":N,"errors":E}` line on stdout and then blocks until stdin
/// reaches EOF.
pub fn run(load: &Load) -> Result<LoadResult, String> {
    match load {
        Load::Http1 {
            target,
            authority,
            path,
            connections,
            rate,
            duration_ms,
            warmup_ms,
        } => open::run(open::OpenSpec {
            endpoint: Endpoint::http1(*target, authority, path, false)?,
            connections: *connections,
            streams: 1,
            rate: *rate,
            duration: Duration::from_millis(*duration_ms),
            warmup: Duration::from_millis(*warmup_ms),
        }),
        Load::H2 {
            target,
            authority,
            path,
            connections,
            streams,
            rate,
            duration_ms,
            warmup_ms,
        } => open::run(open::OpenSpec {
            endpoint: Endpoint::h2(*target, authority, path)?,
            connections: *connections,
            streams: *streams,
            rate: *rate,
            duration: Duration::from_millis(*duration_ms),
            warmup: Duration::from_millis(*warmup_ms),
        }),
        Load::Grpc {
            target,
            authority,
            mock_path,
            connections,
            rate,
            duration_ms,
            warmup_ms,
        } => open::run(open::OpenSpec {
            endpoint: Endpoint::grpc(*target, authority, mock_path)?,
            connections: *connections,
            // Like a gRPC channel: calls multiplexed freely (100 is the
            // usual server limit of concurrent streams).
            streams: GRPC_STREAMS,
            rate: *rate,
            duration: Duration::from_millis(*duration_ms),
            warmup: Duration::from_millis(*warmup_ms),
        }),
        Load::PingPong {
            target,
            size,
            count,
            warmup,
        } => closed::ping_pong(*target, *size, *count, *warmup),
        Load::ConnPerRequest {
            target,
            authority,
            path,
            concurrency,
            duration_ms,
        } => closed::conn_per_request(
            Endpoint::http1(*target, authority, path, true)?,
            *concurrency,
            Duration::from_millis(*duration_ms),
        ),
        Load::Connect {
            target,
            concurrency,
            duration_ms,
        } => closed::connect(*target, *concurrency, Duration::from_millis(*duration_ms)),
        Load::Idle {
            target,
            authority,
            path,
            count,
            opens_per_sec,
        } => idle::run(
            Endpoint::http1(*target, authority, path, false)?,
            *count,
            *opens_per_sec,
            &mut std::io::stdout().lock(),
            &mut std::io::stdin().lock(),
        ),
    }
}

/// A current-thread runtime: the generator gets one core, more threads would
/// only fight over it.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// Formats an error with its sources ("connection error: Connection reset by
/// peer (os error 104)"), skipping sources already contained in the text.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// What a run has measured so far (recorded operations only).
struct Stats {
    /// Latencies of successful operations, microseconds.
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    samples: Vec<String>,
}

/// [`Stats`] shared by the tasks of one run (all on one thread: the lock is
/// never contended, it only satisfies `tokio::spawn`'s `Send`).
type SharedStats = Arc<Mutex<Stats>>;

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
                .expect("constant histogram bounds are valid"),
            ok: 0,
            errors: 0,
            samples: Vec::new(),
        }
    }

    fn shared() -> SharedStats {
        Arc::new(Mutex::new(Stats::new()))
    }

    /// Takes the stats out of a [`SharedStats`] (once its tasks are done).
    fn take(shared: &SharedStats) -> Stats {
        std::mem::replace(&mut *lock(shared), Stats::new())
    }

    fn record_ok(&mut self, latency: Duration) {
        self.ok += 1;
        // Rounded to the nearest µs; the histogram's range clamps outliers.
        let us = u64::try_from((latency.as_nanos() + 500) / 1000).unwrap_or(u64::MAX);
        self.hist.saturating_record(us.max(HIST_LOW_US));
    }

    fn record_error(&mut self, msg: &str) {
        self.record_errors(1, msg);
    }

    fn record_errors(&mut self, n: u64, msg: &str) {
        if n == 0 {
            return;
        }
        self.errors += n;
        if self.samples.len() < MAX_ERROR_SAMPLES && !self.samples.iter().any(|s| s == msg) {
            self.samples.push(msg.to_owned());
        }
    }

    /// The result of a run whose recorded part lasted `elapsed`.
    fn into_result(self, elapsed: Duration) -> LoadResult {
        let elapsed_s = elapsed.as_secs_f64();
        let h = &self.hist;
        let latency_us = if h.is_empty() {
            Latency::default()
        } else {
            let q = |q: f64| h.value_at_quantile(q) as f64;
            Latency {
                mean: h.mean(),
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: h.max() as f64,
            }
        };
        LoadResult {
            sent: self.ok + self.errors,
            ok: self.ok,
            errors: self.errors,
            elapsed_s,
            achieved_rate: if elapsed_s > 0.0 {
                self.ok as f64 / elapsed_s
            } else {
                0.0
            },
            latency_us,
            curve: curve(h),
            error_samples: self.samples,
        }
    }
}

fn lock(stats: &SharedStats) -> MutexGuard<'_, Stats> {
    // A panicking task cannot leave the counters inconsistent enough to
    // matter; keep measuring.
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Percentile curve `(percentile, µs)` for the "inverted log" plots: points
/// evenly spaced in `-log10(1 - p)` (0, 20.6, 36.9, ... 90, ... 99, ...),
/// from the minimum down to the last single sample, then `(100, max)`.
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    // Beyond a tail fraction of 1/len every quantile is the maximum.
    let x_max = (h.len() as f64).log10();
    let step = (x_max / (CURVE_POINTS - 2) as f64).max(0.1);
    let mut points = Vec::with_capacity(CURVE_POINTS);
    let mut highest = 0.0_f64;
    let mut push = |p: f64, v: u64| {
        // Quantile values are monotone already; this only guards the
        // highest-equivalent rounding of `max()` against the last quantile.
        highest = highest.max(v as f64);
        points.push((p, highest));
    };
    let mut i = 0u32;
    loop {
        let x = f64::from(i) * step;
        if i > 0 && x >= x_max - 1e-9 {
            break;
        }
        let q = 1.0 - 10f64.powf(-x);
        push(q * 100.0, h.value_at_quantile(q));
        i += 1;
    }
    push(100.0, h.max());
    points
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Read};
    use std::net::SocketAddr;
    use std::thread::JoinHandle;

    use nodeway_tests::{MockOptions, MockUpstream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;

    /// A mock upstream (HTTP/1.1, h2c, gRPC) and a TCP echo on loopback,
    /// served by their own thread and runtime until dropped.
    struct Servers {
        http: SocketAddr,
        echo: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    }

    impl Servers {
        fn start() -> Servers {
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let (stop, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = runtime().unwrap();
                rt.block_on(async move {
                    let mock = MockUpstream::start(
                        "127.0.0.1:0".parse().unwrap(),
                        MockOptions::named("t"),
                    )
                    .await
                    .unwrap();
                    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    addr_tx
                        .send((mock.addr(), echo.local_addr().unwrap()))
                        .unwrap();
                    tokio::spawn(echo_loop(echo));
                    let _ = stop_rx.await;
                    drop(mock);
                });
            });
            let (http, echo) = addr_rx.recv().unwrap();
            Servers {
                http,
                echo,
                stop: Some(stop),
                thread: Some(thread),
            }
        }
    }

    impl Drop for Servers {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    async fn echo_loop(listener: TcpListener) {
        while let Ok((mut stream, _)) = listener.accept().await {
            // Like the bench backend's echo: without it, Nagle holds the
            // tail of large echoes until the client's delayed ACK.
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// What every result must satisfy: consistent counters, monotone
    /// percentiles, a sorted curve.
    fn assert_consistent(r: &LoadResult) {
        assert_eq!(r.sent, r.ok + r.errors, "{r:?}");
        assert!(r.error_samples.len() <= MAX_ERROR_SAMPLES, "{r:?}");
        if r.ok == 0 {
            return;
        }
        let l = &r.latency_us;
        assert!(l.p50 > 0.0 && l.mean > 0.0, "{r:?}");
        assert!(
            l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
            "{r:?}"
        );
        assert!(!r.curve.is_empty(), "{r:?}");
        assert!(r.curve.len() <= CURVE_POINTS, "{r:?}");
        for w in r.curve.windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 <= w[1].1, "curve {:?}", r.curve);
        }
        assert_eq!(r.curve.last().unwrap(), &(100.0, l.max));
        assert!(r.achieved_rate > 0.0 && r.elapsed_s > 0.0, "{r:?}");
    }

    /// All ok, `sent` within ±20% of `rate × duration`.
    fn assert_all_ok(r: &LoadResult, expected: f64) {
        assert_consistent(r);
        assert!(
            (r.sent as f64 - expected).abs() <= 0.2 * expected,
            "sent {} for {expected} expected: {r:?}",
            r.sent
        );
        assert_eq!(r.ok, r.sent, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.error_samples.is_empty(), "{r:?}");
        assert!(
            (r.achieved_rate - expected / r.elapsed_s).abs() <= 0.2 * expected / r.elapsed_s,
            "{r:?}"
        );
    }

    fn assert_all_failed(r: &LoadResult, sample: &str) {
        assert_consistent(r);
        assert!(r.sent > 0, "{r:?}");
        assert_eq!(r.errors, r.sent, "{r:?}");
        assert_eq!(r.ok, 0, "{r:?}");
        assert!(
            r.error_samples.iter().any(|s| s.contains(sample)),
            "no {sample:?} in {r:?}"
        );
    }

    fn http1(target: SocketAddr, path: &str, connections: usize, rate: u64) -> Load {
        Load::Http1 {
            target,
            authority: "backend".into(),
            path: path.into(),
            connections,
            rate,
            duration_ms: 500,
            warmup_ms: 100,
        }
    }

    #[test]
    fn load_http1_all_ok() {
        let s = Servers::start();
        let r = run(&http1(s.http, "/size/1024", 4, 400)).unwrap();
        assert_all_ok(&r, 200.0);
        assert_eq!(r.elapsed_s, 0.5);
    }

    #[test]
    fn load_http1_status_errors() {
        let s = Servers::start();
        let r = run(&http1(s.http, "/status/503", 2, 200)).unwrap();
        assert_all_failed(&r, "503");
    }

    #[test]
    fn load_http1_broken_connections_are_reopened() {
        let s = Servers::start();
        // The mock kills the connection on every request: each is an error
        // and the next one needs a new connection.
        let r = run(&http1(s.http, "/reset-before-response/0", 2, 200)).unwrap();
        assert_all_failed(&r, "");
        assert!((r.sent as f64 - 100.0).abs() <= 20.0, "{r:?}");
    }

    #[test]
    fn load_http1_refused_target_finishes() {
        let target = nodeway_tests::refused_addr("127.0.0.1".parse().unwrap());
        let r = run(&http1(target, "/size/1024", 2, 200)).unwrap();
        assert_all_failed(&r, "connect");
        assert!((r.sent as f64 - 100.0).abs() <= 20.0, "{r:?}");
    }

    #[test]
    fn load_http1_backlog_is_charged_from_due_time() {
        let s = Servers::start();
        // One connection, a request every 10 ms, each served in ≥ 20 ms: the
        // backlog grows, request k finishes no earlier than (k + 1) × 20 ms
        // and is due at k × 10 ms, so the last of 30 waits ≥ 310 ms. Charged
        // from its send it would look like ~20 ms (coordinated omission).
        let r = run(&Load::Http1 {
            target: s.http,
            authority: "backend".into(),
            path: "/delay/20".into(),
            connections: 1,
            rate: 100,
            duration_ms: 300,
            warmup_ms: 0,
        })
        .unwrap();
        assert_consistent(&r);
        assert_eq!((r.sent, r.ok), (30, 30), "{r:?}");
        assert!(r.latency_us.max >= 300_000.0, "{r:?}");
    }

    #[test]
    fn load_h2_all_ok() {
        let s = Servers::start();
        let r = run(&Load::H2 {
            target: s.http,
            authority: "backend".into(),
            path: "/size/1024".into(),
            connections: 2,
            streams: 4,
            rate: 400,
            duration_ms: 500,
            warmup_ms: 100,
        })
        .unwrap();
        assert_all_ok(&r, 200.0);
    }

    #[test]
    fn load_h2_status_errors() {
        let s = Servers::start();
        let r = run(&Load::H2 {
            target: s.http,
            authority: "backend".into(),
            path: "/status/503".into(),
            connections: 1,
            streams: 4,
            rate: 200,
            duration_ms: 500,
            warmup_ms: 100,
        })
        .unwrap();
        assert_all_failed(&r, "503");
    }

    fn grpc(target: SocketAddr, mock_path: &str) -> Load {
        Load::Grpc {
            target,
            authority: "backend".into(),
            mock_path: mock_path.into(),
            connections: 2,
            rate: 400,
            duration_ms: 500,
            warmup_ms: 100,
        }
    }

    #[test]
    fn load_grpc_all_ok() {
        let s = Servers::start();
        let r = run(&grpc(s.http, "/size/1024")).unwrap();
        assert_all_ok(&r, 200.0);
    }

    #[test]
    fn load_grpc_errors() {
        let s = Servers::start();
        // A plain HTTP 503 without grpc-status.
        assert_all_failed(&run(&grpc(s.http, "/status/503")).unwrap(), "503");
        // A trailers-only answer with grpc-status 14 (UNAVAILABLE).
        assert_all_failed(
            &run(&grpc(s.http, "/grpc-status/14")).unwrap(),
            "grpc-status 14",
        );
    }

    #[test]
    fn load_ping_pong_exact_count() {
        let s = Servers::start();
        for size in [1, 1024, 300_000] {
            let r = run(&Load::PingPong {
                target: s.echo,
                size,
                count: 200,
                warmup: 20,
            })
            .unwrap();
            assert_consistent(&r);
            assert_eq!((r.sent, r.ok, r.errors), (200, 200, 0), "{r:?}");
        }
    }

    #[test]
    fn load_ping_pong_refused_gives_up() {
        let target = nodeway_tests::refused_addr("127.0.0.1".parse().unwrap());
        let r = run(&Load::PingPong {
            target,
            size: 64,
            count: 1000,
            warmup: 0,
        })
        .unwrap();
        assert_all_failed(&r, "connect");
        assert_eq!(r.sent, 1000);
    }

    #[test]
    fn load_conn_per_request_all_ok() {
        let s = Servers::start();
        let r = run(&Load::ConnPerRequest {
            target: s.http,
            authority: "backend".into(),
            path: "/size/1024".into(),
            concurrency: 2,
            duration_ms: 300,
        })
        .unwrap();
        assert_consistent(&r);
        assert!(r.sent > 0, "{r:?}");
        assert_eq!((r.ok, r.errors), (r.sent, 0), "{r:?}");
    }

    #[test]
    fn load_conn_per_request_status_errors() {
        let s = Servers::start();
        let r = run(&Load::ConnPerRequest {
            target: s.http,
            authority: "backend".into(),
            path: "/status/503".into(),
            concurrency: 2,
            duration_ms: 200,
        })
        .unwrap();
        assert_all_failed(&r, "503");
    }

    #[test]
    fn load_connect_all_ok() {
        let s = Servers::start();
        let r = run(&Load::Connect {
            target: s.echo,
            concurrency: 2,
            duration_ms: 300,
        })
        .unwrap();
        assert_consistent(&r);
        assert!(r.sent > 0, "{r:?}");
        assert_eq!((r.ok, r.errors), (r.sent, 0), "{r:?}");
    }

    #[test]
    fn load_connect_refused_finishes() {
        let target = nodeway_tests::refused_addr("127.0.0.1".parse().unwrap());
        let r = run(&Load::Connect {
            target,
            concurrency: 2,
            duration_ms: 200,
        })
        .unwrap();
        assert_all_failed(&r, "connect");
    }

    /// Stands for stdin: counts reads, so the test sees the hold happened.
    struct Stdin {
        data: Cursor<Vec<u8>>,
        reads: usize,
    }

    impl Read for Stdin {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.reads += 1;
            Read::read(&mut self.data, buf)
        }
    }

    #[test]
    fn load_idle_reports_then_holds_until_eof() {
        let s = Servers::start();
        let mut out = Vec::new();
        let mut stdin = Stdin {
            data: Cursor::new(b"anything\n".to_vec()),
            reads: 0,
        };
        let endpoint = Endpoint::http1(s.http, "backend", "/size/1024", false).unwrap();
        let r = idle::run(endpoint, 20, 200, &mut out, &mut stdin).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line, serde_json::json!({"idle_open": 20, "errors": 0}));
        assert!(stdin.reads >= 2, "stdin read until EOF");
        assert_consistent(&r);
        assert_eq!((r.sent, r.ok, r.errors), (20, 20, 0), "{r:?}");
    }

    #[test]
    fn load_idle_counts_failures() {
        let s = Servers::start();
        let mut out = Vec::new();
        let endpoint = Endpoint::http1(s.http, "backend", "/status/503", false).unwrap();
        let r = idle::run(endpoint, 5, 0, &mut out, &mut std::io::empty()).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line, serde_json::json!({"idle_open": 0, "errors": 5}));
        assert_all_failed(&r, "503");
    }

    #[test]
    fn load_rejects_degenerate_specs() {
        let target: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(run(&http1(target, "/", 0, 100)).is_err());
        assert!(run(&http1(target, "/", 1, 0)).is_err());
        assert!(run(&http1(target, "no-slash", 1, 100)).is_err());
        let ping = Load::PingPong {
            target,
            size: 0,
            count: 1,
            warmup: 0,
        };
        assert!(run(&ping).is_err());
    }

    #[test]
    fn load_curve_shape() {
        let mut stats = Stats::new();
        assert!(curve(&stats.hist).is_empty());
        stats.record_ok(Duration::from_micros(7));
        assert_eq!(curve(&stats.hist), vec![(0.0, 7.0), (100.0, 7.0)]);
        for us in 1..=100_000 {
            stats.record_ok(Duration::from_micros(us));
        }
        let c = curve(&stats.hist);
        assert!(c.len() <= CURVE_POINTS && c.len() >= 40, "{c:?}");
        assert_eq!(c[0].0, 0.0);
        for w in c.windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 <= w[1].1, "{c:?}");
        }
        // Dense toward the tail: 99.9 and beyond are on the curve.
        assert!(c.iter().any(|&(p, _)| p > 99.9 && p < 100.0), "{c:?}");
    }

    #[test]
    fn load_error_samples_are_distinct_and_few() {
        let mut stats = Stats::new();
        for i in 0..20 {
            stats.record_error(&format!("e{}", i % 7));
        }
        stats.record_errors(0, "never");
        let r = stats.into_result(Duration::from_secs(1));
        assert_eq!((r.sent, r.errors, r.ok), (20, 20, 0));
        assert_eq!(r.error_samples, ["e0", "e1", "e2", "e3", "e4"]);
        assert_eq!(r.latency_us, Latency::default());
    }
}
