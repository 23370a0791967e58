//! `nodeway-bench upgrade`: the upgrade test's sequence (v1 → v2 → v3 → v4,
//! each started, waited for ready, then the old one sent SIGTERM) under the
//! load of two enrolled client pods (`mixed-load`), at a multiple of the
//! test's rate. Reports failed and bypassed requests, and the p99 latency of
//! requests that started during a handover against the others.
//!
//! ```text
//! nodeway-bench upgrade --nodeway P --mock-upstream P --mixed-load P --out DIR
//!                       [--scale 10] [--seconds 40]
//! ```
//!
//! Writes `DIR/upgrade.json` and `DIR/upgrade.md`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodeway_tests::access_log::field;
use nodeway_tests::ebpf_mesh::{CLIENT, CLIENT_B, Generation, Mesh, MeshOptions, mixed_load_args};
use serde_json::{Value, json};

struct Args {
    nodeway: PathBuf,
    mock_upstream: PathBuf,
    mixed_load: PathBuf,
    out: PathBuf,
    scale: f64,
    seconds: u64,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        nodeway: PathBuf::new(),
        mock_upstream: PathBuf::new(),
        mixed_load: PathBuf::new(),
        out: PathBuf::from("target/bench"),
        scale: 10.0,
        seconds: 40,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodeway" => a.nodeway = v.into(),
            "--mock-upstream" => a.mock_upstream = v.into(),
            "--mixed-load" => a.mixed_load = v.into(),
            "--out" => a.out = v.into(),
            "--scale" => {
                a.scale = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| (0.05..=50.0).contains(s))
                    .ok_or_else(|| format!("--scale {v}: a number from 0.05 to 50"))?;
            }
            "--seconds" => {
                a.seconds = v
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (12..=300).contains(s))
                    .ok_or_else(|| format!("--seconds {v}: 12 to 300"))?;
            }
            other => return Err(format!("upgrade: unknown flag {other}")),
        }
    }
    if a.nodeway.as_os_str().is_empty()
        || a.mock_upstream.as_os_str().is_empty()
        || a.mixed_load.as_os_str().is_empty()
    {
        return Err("upgrade: --nodeway, --mock-upstream and --mixed-load are required".into());
    }
    Ok(a)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Rates of one client pod: the test's (half of the acceptance's totals)
/// times `scale`.
fn load_args(a: &Args, tag: &str, ids: &Path, latencies: &Path) -> Vec<String> {
    let scaled = |base: f64| ((base * a.scale).round() as u64).max(1).to_string();
    let streams = ((10.0 * a.scale).round() as u64).clamp(1, 1000).to_string();
    mixed_load_args(
        tag,
        a.seconds,
        ids,
        &[
            ("--latency-file", latencies.display().to_string()),
            ("--h1-conns", "8".into()),
            ("--h1-rate", scaled(250.0)),
            ("--h2-conns", "2".into()),
            ("--h2-rate", scaled(150.0)),
            ("--grpc-rate", scaled(100.0)),
            ("--new-conn-rate", scaled(50.0)),
            ("--tcp-streams", streams),
        ],
    )
}

fn generation(mesh: &mut Mesh, a: &Args, name: &str) -> Result<Generation, String> {
    let mut g = mesh.spawn_generation(&a.nodeway, name, &["--drain-timeout", "3s"]);
    g.wait_ready(Duration::from_secs(60))?;
    Ok(g)
}

fn finish(child: Child) -> Result<Value, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("mixed-load: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// 99th percentile of `v` (sorted in place).
fn p99(v: &mut [u32]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    v.get(i.saturating_sub(1)).map(|us| f64::from(*us) / 1000.0)
}

pub fn main(args: &[String]) -> Result<(), String> {
    let a = parse(args)?;
    let mut mesh = Mesh::build(
        &a.mock_upstream,
        MeshOptions {
            echo_service: true,
            ..MeshOptions::default()
        },
    );
    let mut current = generation(&mut mesh, &a, "v1")?;
    let mut loads = Vec::new();
    for (pod, tag) in [(CLIENT, "a"), (CLIENT_B, "b")] {
        let ids = mesh.dir.join(format!("ids-{tag}"));
        let lat = mesh.dir.join(format!("latency-{tag}"));
        let child = mesh
            .topo
            .spawn(pod, &a.mixed_load, &load_args(&a, tag, &ids, &lat));
        loads.push((child, ids, lat));
    }
    let step = Duration::from_secs(a.seconds / 5);
    std::thread::sleep(step);
    // Handover windows (unix ms): from starting the new process to the old one's exit.
    let mut windows: Vec<(u64, u64)> = Vec::new();
    let mut done: Vec<Generation> = Vec::new();
    for name in ["v2", "v3", "v4"] {
        let begin = unix_ms();
        let next = generation(&mut mesh, &a, name)?;
        current.signal("TERM");
        current.wait_exit(Duration::from_secs(30));
        windows.push((begin, unix_ms() + 1000));
        done.push(std::mem::replace(&mut current, next));
        std::thread::sleep(step);
    }
    let mut reports = Vec::new();
    let mut answered: Vec<String> = Vec::new();
    let (mut steady, mut handover) = (Vec::new(), Vec::new());
    for (child, ids, lat) in loads {
        let report = finish(child)?;
        let start = report["start_unix_ms"].as_u64().unwrap_or(0);
        answered.extend(
            std::fs::read_to_string(&ids)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned),
        );
        for line in std::fs::read_to_string(&lat).unwrap_or_default().lines() {
            let mut parts = line.split(' ').filter_map(|p| p.parse::<u64>().ok());
            let (Some(at), Some(us)) = (parts.next(), parts.next()) else {
                continue;
            };
            let t = start + at;
            let during = windows.iter().any(|(b, e)| (*b..=*e).contains(&t));
            let us = u32::try_from(us).unwrap_or(u32::MAX);
            if during {
                handover.push(us)
            } else {
                steady.push(us)
            }
        }
        reports.push(report);
    }
    done.push(current);
    std::thread::sleep(Duration::from_secs(2));
    let logged: HashSet<String> = done
        .iter()
        .flat_map(|g| g.log.lines())
        .filter_map(|e| field(&e, "request_id").map(str::to_owned))
        .collect();
    let bypassed = answered.iter().filter(|id| !logged.contains(*id)).count();
    let kinds = ["h1", "h2", "grpc", "conn"];
    let sum = |key: &str| -> u64 {
        reports
            .iter()
            .flat_map(|r| kinds.iter().map(move |k| r[k][key].as_u64().unwrap_or(0)))
            .sum()
    };
    let (sent, failed) = (sum("sent"), sum("failed"));
    let tcp_failed: u64 = reports
        .iter()
        .map(|r| r["tcp"]["failed"].as_u64().unwrap_or(0))
        .sum();
    let rate = sent / a.seconds.max(1);
    let errors: Vec<&Value> = reports
        .iter()
        .flat_map(|r| {
            kinds
                .iter()
                .chain(["tcp"].iter())
                .map(move |k| &r[k]["errors"])
        })
        .filter(|e| e.as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    let result = json!({
        "scale": a.scale,
        "seconds": a.seconds,
        "requests_per_s": rate,
        "sent": sent,
        "failed": failed,
        "bypassed": bypassed,
        "tcp_failed": tcp_failed,
        "p99_ms_steady": p99(&mut steady),
        "p99_ms_handover": p99(&mut handover),
        "handovers": windows.len(),
        "errors": errors,
        "clients": reports,
    });
    std::fs::create_dir_all(&a.out).map_err(|e| e.to_string())?;
    let json_path = a.out.join("upgrade.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&result).unwrap_or_default(),
    )
    .map_err(|e| format!("{}: {e}", json_path.display()))?;
    let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |v| format!("{v:.1} ms"));
    let md = format!(
        "| upgrades v1 → v4 at {:.1}× the test's rate ({rate} req/s + {} TCP streams) | failed | bypassed | TCP failures | p99 steady | p99 during handovers |\n\
         |---|---|---|---|---|---|\n\
         | {sent} requests | {failed} | {bypassed} | {tcp_failed} | {} | {} |\n",
        a.scale,
        ((20.0 * a.scale).round() as u64).clamp(2, 2000),
        ms(&result["p99_ms_steady"]),
        ms(&result["p99_ms_handover"]),
    );
    std::fs::write(a.out.join("upgrade.md"), &md).map_err(|e| e.to_string())?;
    eprintln!("{md}");
    drop(done);
    Ok(())
}
