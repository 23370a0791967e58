//! `nodeway-bench`: the benchmark harness behind `cargo xtask bench`.
//!
//! - `nodeway-bench run [--quick|--smoke] [--out DIR] --bin-dir DIR`: builds
//!   the topology, runs every scenario against every system and writes
//!   `report.md`, `report.json` and the plots to `DIR` (default
//!   `target/bench`). Needs root.
//! - `nodeway-bench gen '<json Load>'`: the load generator (runs inside the
//!   client pod); prints a [`model::LoadResult`] as its last stdout line.
//! - `nodeway-bench probe ADDR [--tcp]`: waits up to 15 s for `GET
//!   /size/1024` on `ADDR` to answer 200 (or, `--tcp`, for an echo):
//!   readiness of a system, from inside the client pod.
//! - `nodeway-bench backend --http ADDR [--echo ADDR] [--fail-rate F]`: the
//!   backend (mock upstream: HTTP/1.1, h2c, gRPC; TCP echo).
//! - `nodeway-bench allocators NAME=BINARY…`: the same proxy built with
//!   different global allocators, compared (see `allocators.rs`).

mod allocators;
mod backend;
mod config_scale;
mod harness;
mod load;
mod model;
mod plot;
mod report;
mod scenarios;
mod upgrade;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use model::{Machine, Mode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run_cmd(&args[1..]),
        Some("gen") => gen_cmd(&args[1..]),
        Some("probe") => probe_cmd(&args[1..]),
        Some("backend") => backend::main(&args[1..]),
        Some("allocators") => allocators::main(&args[1..]),
        Some("upgrade") => upgrade::main(&args[1..]),
        _ => Err("usage: nodeway-bench run|gen|backend|allocators|upgrade ...".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeway-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gen_cmd(args: &[String]) -> Result<(), String> {
    let [spec] = args else {
        return Err("usage: nodeway-bench gen '<json>'".to_owned());
    };
    let load: model::Load =
        serde_json::from_str(spec).map_err(|e| format!("gen: bad load spec: {e}"))?;
    let result = load::run(&load)?;
    println!(
        "{}",
        serde_json::to_string(&result).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn run_cmd(args: &[String]) -> Result<(), String> {
    let mut mode = Mode::Full;
    let mut out = PathBuf::from("target/bench");
    let mut nodeway: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--quick" => mode = Mode::Quick,
            "--smoke" => mode = Mode::Smoke,
            "--out" => out = it.next().ok_or("--out needs a value")?.into(),
            "--nodeway" => nodeway = Some(it.next().ok_or("--nodeway needs a value")?.into()),
            other => return Err(format!("run: unknown flag {other}")),
        }
    }
    let nodeway = nodeway.ok_or("run: --nodeway PATH (the proxy binary) is required")?;
    let report = scenarios::run(mode, &nodeway, &out)?;
    let written = report::write(&report, &out)?;
    for path in written {
        eprintln!("bench: wrote {}", path.display());
    }
    let misses = report.targets.iter().filter(|t| !t.met).count();
    eprintln!(
        "bench: {} run done in {:.0} s; {} of {} targets met",
        mode.name(),
        report.duration_s,
        report.targets.len() - misses,
        report.targets.len()
    );
    Ok(())
}

fn probe_cmd(args: &[String]) -> Result<(), String> {
    let (addr, tcp) = match args {
        [addr] => (addr, false),
        [addr, t] if t == "--tcp" => (addr, true),
        _ => return Err("usage: nodeway-bench probe ADDR [--tcp]".to_owned()),
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("probe {addr}: {e}"))?;
    if tcp {
        return probe_echo(addr);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        match harness::http_get(addr, "/size/1024") {
            Some(body) if body.len() == 1024 => return Ok(()),
            Some(body) => last = format!("body of {} bytes", body.len()),
            None => last = "no 200 answer".to_owned(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{addr}: {last} within 15 s"))
}

/// Waits until `addr` echoes a few bytes back.
fn probe_echo(addr: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = (|| {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>(buf == *b"ping")
        })();
        match attempt {
            Ok(true) => return Ok(()),
            Ok(false) => last = "wrong bytes back".to_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{addr}: no echo within 15 s: {last}"))
}

/// Output of a command, trimmed; empty if it cannot run.
fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.trim().to_owned()
        })
        .unwrap_or_default()
}

/// Current UTC time, `YYYY-MM-DD HH:MM`.
pub fn utc_now() -> String {
    command_output("date", &["-u", "+%Y-%m-%d %H:%M"])
}

/// The machine the numbers were taken on.
pub fn machine(nodeway: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kb / 1024.0 / 1024.0,
        kernel: command_output("uname", &["-r"]),
        haproxy: command_output("haproxy", &["-v"])
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("HAProxy version ")
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_owned(),
        nodeway: command_output(&nodeway.display().to_string(), &["--version"]),
    }
}
