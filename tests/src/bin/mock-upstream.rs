//! `mock-upstream --listen ADDR [--listen ADDR ...] [--name NAME]
//! [--fail-rate F] [--fail-code N] [--echo ADDR]`: runs one mock upstream per
//! listen address until SIGINT/SIGTERM; `--echo` adds a raw TCP echo server.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use nodeway_tests::{MockOptions, MockUpstream};

const USAGE: &str = "usage: mock-upstream --listen ADDR [--listen ADDR ...] [--name NAME] \
                     [--fail-rate F] [--fail-code N] [--echo ADDR]";

struct Args {
    listen: Vec<SocketAddr>,
    name: Option<String>,
    fail_rate: f64,
    fail_code: u16,
    echo: Option<SocketAddr>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        listen: Vec::new(),
        name: None,
        fail_rate: 0.0,
        fail_code: 503,
        echo: None,
    };
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (flag, None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen
                    .push(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--name" => args.name = Some(value()?),
            "--echo" => {
                let v = value()?;
                args.echo = Some(v.parse().map_err(|e| format!("--echo {v}: {e}"))?);
            }
            "--fail-rate" => {
                let v = value()?;
                let f: f64 = v.parse().map_err(|e| format!("--fail-rate {v}: {e}"))?;
                if !(0.0..=1.0).contains(&f) {
                    return Err(format!("--fail-rate {v}: must be within 0.0..=1.0"));
                }
                args.fail_rate = f;
            }
            "--fail-code" => {
                let v = value()?;
                args.fail_code = v.parse().map_err(|e| format!("--fail-code {v}: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.listen.is_empty() {
        return Err(format!("at least one --listen is required\n{USAGE}"));
    }
    Ok(args)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut mocks = Vec::new();
    for addr in &args.listen {
        let opts = MockOptions {
            name: args.name.clone().unwrap_or_else(|| addr.to_string()),
            fail_rate: args.fail_rate,
            fail_code: args.fail_code,
            ..MockOptions::default()
        };
        match MockUpstream::start(*addr, opts).await {
            Ok(m) => {
                println!("listening on {}", m.addr());
                mocks.push(m);
            }
            Err(e) => {
                eprintln!("mock-upstream: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(addr) = args.echo {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                println!("echo on {addr}");
                tokio::spawn(echo(listener));
            }
            Err(e) => {
                eprintln!("mock-upstream: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = std::io::stdout().flush();
    wait_for_signal().await;
    for m in mocks {
        m.stop().await;
    }
    ExitCode::SUCCESS
}

/// Raw TCP echo: every byte back, until the peer closes.
async fn echo(listener: tokio::net::TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}
