//! The benchmark backend: the project's mock upstream (HTTP/1.1 keep-alive,
//! h2c, unary gRPC; `/size/1024` answers 1 KiB) and a TCP echo listener for
//! the L4 ping-pong, on one current-thread runtime (the harness pins it to
//! one core). Runs until SIGTERM/SIGINT or stdin EOF is not watched: the
//! harness kills it.

use std::net::SocketAddr;

use nodeway_tests::{MockOptions, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const USAGE: &str =
    "usage: nodeway-bench backend --http ADDR [--echo ADDR] [--name N] [--fail-rate F]";

pub fn main(args: &[String]) -> Result<(), String> {
    let mut http: Option<SocketAddr> = None;
    let mut echo: Option<SocketAddr> = None;
    let mut opts = MockOptions::named("bench");
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--http" => http = Some(value()?.parse().map_err(|e| format!("--http: {e}"))?),
            "--echo" => echo = Some(value()?.parse().map_err(|e| format!("--echo: {e}"))?),
            "--name" => opts.name = value()?,
            "--fail-rate" => {
                opts.fail_rate = value()?.parse().map_err(|e| format!("--fail-rate: {e}"))?
            }
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    let http = http.ok_or_else(|| format!("--http is required\n{USAGE}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let mock = MockUpstream::start(http, opts)
            .await
            .map_err(|e| format!("listen {http}: {e}"))?;
        if let Some(addr) = echo {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("listen {addr}: {e}"))?;
            tokio::spawn(echo_loop(listener));
        }
        println!("ready {}", mock.addr());
        let _ = tokio::signal::ctrl_c().await;
        drop(mock);
        Ok(())
    })
}

async fn echo_loop(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
