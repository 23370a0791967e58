//! Envoy/Istio-compatible JSON access log.
//!
//! One JSON object per line, every value a string, `-` when absent. Lines are
//! handed to a dedicated writer thread through a bounded channel: the request
//! path never waits on disk, and when the writer falls behind lines are
//! dropped and counted rather than delaying traffic.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::flags::ResponseFlags;

/// Where access log lines go (`--access-log PATH|stdout|off`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" | "" => AccessLogTarget::Off,
            "stdout" | "-" => AccessLogTarget::Stdout,
            path => AccessLogTarget::File(PathBuf::from(path)),
        })
    }
}

/// Everything known about one request when it ends.
#[derive(Debug, Clone)]
pub struct AccessLogEntry {
    pub start_time: SystemTime,
    pub method: Option<String>,
    pub path: Option<String>,
    pub protocol: Option<&'static str>,
    /// 0 when nothing was sent downstream.
    pub response_code: u16,
    pub response_flags: ResponseFlags,
    pub response_code_details: Option<String>,
    pub connection_termination_details: Option<String>,
    pub upstream_transport_failure_reason: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_service_time: Option<Duration>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<Arc<str>>,
    pub upstream_local_address: Option<SocketAddr>,
    pub downstream_local_address: Option<SocketAddr>,
    pub downstream_remote_address: Option<SocketAddr>,
    pub requested_server_name: Option<String>,
    pub route_name: Option<Arc<str>>,
    pub grpc_status: Option<u32>,
    pub upstream_request_attempt_count: u32,
    pub request_duration: Option<Duration>,
    pub response_duration: Option<Duration>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
}

impl AccessLogEntry {
    pub fn new(
        start_time: SystemTime,
        source_workload: Arc<str>,
        source_namespace: Arc<str>,
    ) -> Self {
        AccessLogEntry {
            start_time,
            method: None,
            path: None,
            protocol: None,
            response_code: 0,
            response_flags: ResponseFlags::default(),
            response_code_details: None,
            connection_termination_details: None,
            upstream_transport_failure_reason: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            downstream_local_address: None,
            downstream_remote_address: None,
            requested_server_name: None,
            route_name: None,
            grpc_status: None,
            upstream_request_attempt_count: 0,
            request_duration: None,
            response_duration: None,
            source_workload,
            source_namespace,
        }
    }

    /// The JSON line (without newline), fields in the documented order.
    pub fn to_json(&self) -> String {
        fn opt<T: ToString>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or_else(|| "-".to_string(), |v| v.to_string())
        }
        fn ms(d: &Option<Duration>) -> String {
            d.map_or_else(|| "-".to_string(), |d| d.as_millis().to_string())
        }
        let line = Line {
            start_time: humantime::format_rfc3339_millis(self.start_time).to_string(),
            method: opt(&self.method),
            path: opt(&self.path),
            protocol: self.protocol.unwrap_or("-").to_string(),
            response_code: self.response_code.to_string(),
            response_flags: self.response_flags.to_string(),
            response_code_details: opt(&self.response_code_details),
            connection_termination_details: opt(&self.connection_termination_details),
            upstream_transport_failure_reason: opt(&self.upstream_transport_failure_reason),
            bytes_received: self.bytes_received.to_string(),
            bytes_sent: self.bytes_sent.to_string(),
            duration: self.duration.as_millis().to_string(),
            upstream_service_time: ms(&self.upstream_service_time),
            x_forwarded_for: opt(&self.x_forwarded_for),
            user_agent: opt(&self.user_agent),
            request_id: opt(&self.request_id),
            authority: opt(&self.authority),
            upstream_host: opt(&self.upstream_host),
            upstream_cluster: opt(&self.upstream_cluster),
            upstream_local_address: opt(&self.upstream_local_address),
            downstream_local_address: opt(&self.downstream_local_address),
            downstream_remote_address: opt(&self.downstream_remote_address),
            requested_server_name: opt(&self.requested_server_name),
            route_name: opt(&self.route_name),
            grpc_status: self
                .grpc_status
                .map_or_else(|| "-".to_string(), |c| grpc_status_name(c).to_string()),
            upstream_request_attempt_count: if self.upstream_request_attempt_count == 0 {
                "-".to_string()
            } else {
                self.upstream_request_attempt_count.to_string()
            },
            request_duration: ms(&self.request_duration),
            response_duration: ms(&self.response_duration),
            source_workload: self.source_workload.to_string(),
            source_namespace: self.source_namespace.to_string(),
        };
        serde_json::to_string(&line).expect("access log line serializes")
    }
}

#[derive(Serialize)]
struct Line {
    start_time: String,
    method: String,
    path: String,
    protocol: String,
    response_code: String,
    response_flags: String,
    response_code_details: String,
    connection_termination_details: String,
    upstream_transport_failure_reason: String,
    bytes_received: String,
    bytes_sent: String,
    duration: String,
    upstream_service_time: String,
    x_forwarded_for: String,
    user_agent: String,
    request_id: String,
    authority: String,
    upstream_host: String,
    upstream_cluster: String,
    upstream_local_address: String,
    downstream_local_address: String,
    downstream_remote_address: String,
    requested_server_name: String,
    route_name: String,
    grpc_status: String,
    upstream_request_attempt_count: String,
    request_duration: String,
    response_duration: String,
    source_workload: String,
    source_namespace: String,
}

/// Envoy's `%GRPC_STATUS%` default (camel-case) names.
pub fn grpc_status_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "InvalidCode",
    }
}

/// Lines waiting for the writer before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// What the writer thread receives.
enum Message {
    Line(Box<AccessLogEntry>),
    /// Everything sent before is written; then the writer acknowledges.
    Flush(SyncSender<()>),
}

/// Cheap handle for the data path; clone per connection.
#[derive(Clone)]
pub struct AccessLogger {
    tx: Option<SyncSender<Message>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLogger {
    pub fn off() -> Self {
        AccessLogger {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Opens the target and starts the writer thread. The file is appended to.
    pub fn start(target: &AccessLogTarget) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(Self::off()),
            AccessLogTarget::Stdout => Box::new(io::stdout()),
            AccessLogTarget::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, sink))?;
        Ok(AccessLogger {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Never blocks: a full queue drops the line and counts it.
    pub fn log(&self, entry: AccessLogEntry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Message::Line(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (up to `timeout`) until every line logged before the call is
    /// written; used at shutdown so the last requests' lines are not lost.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
        if tx.send(Message::Flush(ack_tx)).is_err() {
            return false;
        }
        ack_rx.recv_timeout(timeout).is_ok()
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write_lines(rx: Receiver<Message>, mut sink: Box<dyn Write + Send>) {
    let mut buf = String::with_capacity(4096);
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        buf.clear();
        let mut next = Some(first);
        // Batch whatever else is queued, then write once so tailers see whole lines promptly.
        while let Some(msg) = next.take() {
            match msg {
                Message::Line(entry) => {
                    buf.push_str(&entry.to_json());
                    buf.push('\n');
                }
                Message::Flush(ack) => acks.push(ack),
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty()
            && let Err(err) = sink.write_all(buf.as_bytes()).and_then(|_| sink.flush())
        {
            tracing::warn!(%err, "writing access log failed");
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ResponseFlag;

    #[test]
    fn line_has_every_field_as_string_in_order() {
        let mut e = AccessLogEntry::new(SystemTime::UNIX_EPOCH, "sleep".into(), "default".into());
        e.response_flags
            .set(ResponseFlag::UpstreamRetryLimitExceeded);
        e.response_flags
            .set(ResponseFlag::UpstreamConnectionFailure);
        e.response_code = 503;
        e.upstream_request_attempt_count = 3;
        let json = e.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 30);
        assert!(obj.values().all(|v| v.is_string()));
        assert_eq!(obj["start_time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(obj["response_flags"], "URX,UF");
        assert_eq!(obj["response_code"], "503");
        assert_eq!(obj["upstream_host"], "-");
        assert_eq!(obj["upstream_request_attempt_count"], "3");
        assert!(json.starts_with("{\"start_time\""));
        assert!(json.ends_with("\"source_namespace\":\"default\"}"));
    }
}
