//! `nodeway-bench`: the benchmark harness behind `cargo xtask bench`.
//!
//! - `nodeway-bench run [--quick|--smoke] [--out DIR] --bin-dir DIR`: builds
//!   the topology, runs every scenario against every system and writes
//!   `report.md`, `report.json` and the plots to `DIR` (default
//!   `target/bench`). Needs root.
//! - `nodeway-bench gen '<json Load>'`: the load generator (runs inside the
//!   client pod); prints a [`model::LoadResult`] as its last stdout line.
//! - `nodeway-bench backend --http ADDR [--echo ADDR] [--fail-rate F]`: the
//!   backend (mock upstream: HTTP/1.1, h2c, gRPC; TCP echo).

mod backend;
mod config_scale;
mod load;
mod model;
mod plot;
mod report;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("gen") => gen_cmd(&args[1..]),
        Some("backend") => backend::main(&args[1..]),
        _ => Err("usage: nodeway-bench run|gen|backend ...".to_owned()),
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
