//! Closed-loop HTTP/1.1 load generator for benchmarks on loopback.
//!
//! `loadgen --target ADDR --src IP --authority HOST --path PATH --concurrency N
//!  --requests N [--rate REQ_PER_S] [--scrape ADDR --scrape-every-ms N]`
//! Each worker keeps one keep-alive connection (bound to the client pod's
//! source IP) and sends its share of requests back to back; latencies are
//! exact (sorted), printed as one JSON object. With `--scrape`, a side task
//! GETs `/metrics` from that address at the given period while the load runs.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use nodeway_tests::connect_from;

struct Args {
    target: SocketAddr,
    src: IpAddr,
    authority: String,
    path: String,
    concurrency: usize,
    requests: usize,
    scrape: Option<SocketAddr>,
    scrape_every: Duration,
    /// Open loop at this many requests/s in total (0 = closed loop).
    rate: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        target: "127.0.0.1:15001".parse().unwrap(),
        src: "127.0.1.5".parse().unwrap(),
        authority: "mock-server".into(),
        path: "/status/200".into(),
        concurrency: 16,
        requests: 10_000,
        scrape: None,
        scrape_every: Duration::from_millis(100),
        rate: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => a.target = value()?.parse().map_err(|e| format!("--target: {e}"))?,
            "--src" => a.src = value()?.parse().map_err(|e| format!("--src: {e}"))?,
            "--authority" => a.authority = value()?,
            "--path" => a.path = value()?,
            "--concurrency" => {
                a.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--requests" => {
                a.requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?
            }
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--scrape" => a.scrape = Some(value()?.parse().map_err(|e| format!("--scrape: {e}"))?),
            "--scrape-every-ms" => {
                a.scrape_every = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|e| format!("--scrape-every-ms: {e}"))?,
                )
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.concurrency == 0 || a.requests == 0 {
        return Err("--concurrency and --requests must be positive".into());
    }
    Ok(a)
}

/// With `--rate`, request `k` of worker `w` is due at `start + (k × workers + w) / rate`;
/// its latency counts from that due time, so a slow answer delaying later
/// sends is charged to them (no coordinated omission).
async fn worker(
    args: &Args,
    n: usize,
    index: usize,
    start: Instant,
) -> Result<Vec<Duration>, String> {
    let stream = connect_from(args.src, args.target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut took = Vec::with_capacity(n);
    for k in 0..n {
        let due = (args.rate > 0).then(|| {
            start
                + Duration::from_secs_f64((k * args.concurrency + index) as f64 / args.rate as f64)
        });
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        let req = http::Request::get(&args.path)
            .header(http::header::HOST, &args.authority)
            .body(Empty::new())
            .expect("request");
        let t = due.unwrap_or_else(Instant::now);
        sender.ready().await.map_err(|e| format!("ready: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        took.push(t.elapsed());
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
    }
    Ok(took)
}

/// Scrapes `/metrics` on its own OS thread (blocking I/O), so the scraper's
/// work never delays the load workers' sends.
fn scraper(
    addr: SocketAddr,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    use std::io::{Read, Write};
    let mut scrapes = 0;
    let mut next = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        next += every;
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut body = Vec::new();
            let ok = stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
                .and_then(|_| stream.read_to_end(&mut body))
                .is_ok();
            if ok && body.starts_with(b"HTTP/1.1 200") {
                scrapes += 1;
            }
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    scrapes
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrape = args.scrape.map(|addr| {
        let (every, stop) = (args.scrape_every, stop.clone());
        std::thread::spawn(move || scraper(addr, every, stop))
    });
    let per_worker = args.requests.div_ceil(args.concurrency);
    let started = Instant::now();
    let args_ref: &'static Args = Box::leak(Box::new(args));
    let workers: Vec<_> = (0..args_ref.concurrency)
        .map(|i| tokio::spawn(worker(args_ref, per_worker, i, started)))
        .collect();
    let mut all = Vec::with_capacity(per_worker * args_ref.concurrency);
    for w in workers {
        match w.await.expect("worker") {
            Ok(t) => all.extend(t),
            Err(e) => {
                eprintln!("loadgen: {e}");
                std::process::exit(1);
            }
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scrape.map_or(0, |s| s.join().unwrap_or(0));
    all.sort();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize].as_micros();
    println!(
        "{{\"requests\":{},\"seconds\":{:.3},\"rps\":{:.0},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"scrapes\":{}}}",
        all.len(),
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        scrapes
    );
}
