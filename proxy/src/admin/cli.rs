//! The `nodeway stats|endpoints|config` subcommands: a small HTTP/1.1 client
//! for the admin API and the tables they print.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::render_table;

/// Longest wait for the admin API (connect plus answer).
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin API at {addr}: {source}; is nodeway running? use --admin-addr")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the admin API at {addr} did not answer: {reason}")]
    Failed { addr: SocketAddr, reason: String },
    #[error("the admin API at {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        body: String,
    },
    #[error("the admin API at {addr} sent invalid JSON: {source}")]
    Json {
        addr: SocketAddr,
        source: serde_json::Error,
    },
}

/// Sends one request to the admin API and returns the body of a `200`.
pub async fn call(addr: SocketAddr, method: Method, path: &str) -> Result<String, CliError> {
    let failed = |reason: String| CliError::Failed { addr, reason };
    let stream = match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(CliError::Unreachable { addr, source }),
        Err(_) => {
            return Err(CliError::Unreachable {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            });
        }
    };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| failed(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status == StatusCode::OK {
            Ok(body)
        } else {
            Err(CliError::Status {
                addr,
                status,
                body: body.trim_end().to_string(),
            })
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(failed(format!("no answer within {TIMEOUT:?}"))))
}

/// `GET` a JSON document.
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, CliError> {
    let body = call(addr, Method::GET, path).await?;
    serde_json::from_str(&body).map_err(|source| CliError::Json { addr, source })
}

/// A path with the query parameters that are set, percent-encoded.
pub fn path_with_query(path: &str, params: &[(&str, Option<&str>)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", super::percent_encode(v))))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// `nodeway stats`: `/stats?format=json` summed over the listed client pods,
/// one row per (cluster, stat); then the node-wide budget when it is present
/// and `with_node` (no `--source`).
pub fn stats_table(stats: &Value, with_node: bool) -> String {
    let mut totals: BTreeMap<(String, String), u64> = BTreeMap::new();
    for entry in stats["clusters"].as_array().into_iter().flatten() {
        let cluster = entry["cluster"].as_str().unwrap_or("-");
        for (stat, value) in entry["stats"].as_object().into_iter().flatten() {
            let total = totals
                .entry((cluster.to_string(), stat.clone()))
                .or_default();
            *total = total.saturating_add(value.as_u64().unwrap_or(0));
        }
    }
    let rows: Vec<Vec<String>> = totals
        .into_iter()
        .map(|((cluster, stat), value)| vec![cluster, stat, value.to_string()])
        .collect();
    let mut out = render_table(&["CLUSTER", "STAT", "VALUE"], &rows);
    let node = &stats["node"];
    if with_node && node.is_object() {
        out.push_str(&format!(
            "\nnode-wide budget: {}/{} upstream connections, {}/{} pending requests\n",
            node["upstream_connections"],
            node["max_upstream_connections"],
            node["pending_requests"],
            node["max_pending_requests"],
        ));
    }
    out
}

/// Istio's "unset" (2^32-1) reads as `-`.
fn limit(v: &Value) -> String {
    match v.as_u64() {
        Some(n) if n >= u64::from(u32::MAX) => "-".into(),
        Some(n) => n.to_string(),
        None => "-".into(),
    }
}

fn str_or_dash(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One-line summary of effective outlier settings.
fn outlier_summary(od: &Value) -> String {
    if od.is_null() {
        return "-".into();
    }
    let mut parts = vec![format!(
        "5xx={}",
        str_or_dash(&od["consecutive_5xx_errors"])
    )];
    if !od["consecutive_gateway_errors"].is_null() {
        parts.push(format!("gateway={}", od["consecutive_gateway_errors"]));
    }
    if od["split_external_local_origin_errors"] == true {
        parts.push(format!(
            "local-origin={}",
            str_or_dash(&od["consecutive_local_origin_failures"])
        ));
    }
    parts.push(format!("interval={}", str_or_dash(&od["interval"])));
    parts.push(format!(
        "base-ejection={}",
        str_or_dash(&od["base_ejection_time"])
    ));
    parts.push(format!(
        "max-ejection={}%",
        str_or_dash(&od["max_ejection_percent"])
    ));
    parts.join(" ")
}

/// `nodeway config`: the summary, then one row per (client pod, cluster)
/// with its effective policy and DestinationRule.
pub fn config_table(dump: &Value) -> String {
    let mut out = format!(
        "generation {}, last reload error: {}\nservices {}, pods {}, DestinationRules {}, VirtualServices {}; access-log lines dropped {}\n\n",
        dump["generation"],
        dump["last_reload_error"].as_str().unwrap_or("none"),
        dump["services"],
        dump["pods"],
        dump["destination_rules"],
        dump["virtual_services"],
        dump["access_log_lines_dropped"],
    );
    let rows: Vec<Vec<String>> = dump["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let p = &c["effective_policy"];
            let pool = &p["connection_pool"];
            vec![
                str_or_dash(&c["source_pod"]),
                str_or_dash(&c["cluster"]),
                str_or_dash(&c["destination_rule"]),
                str_or_dash(&p["load_balancer"]["policy"]),
                limit(&pool["max_connections"]),
                limit(&pool["max_pending_requests"]),
                limit(&pool["max_requests"]),
                limit(&pool["max_retries"]),
                str_or_dash(&pool["connect_timeout"]),
                outlier_summary(&p["outlier_detection"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no client clusters yet (they appear once a client pod sends traffic)\n");
        return out;
    }
    out.push_str(&render_table(
        &[
            "SOURCE",
            "CLUSTER",
            "DESTINATION RULE",
            "LB",
            "MAX CONN",
            "MAX PENDING",
            "MAX REQUESTS",
            "MAX RETRIES",
            "CONNECT TIMEOUT",
            "OUTLIER DETECTION",
        ],
        &rows,
    ));
    out.push_str("(- : not set, unlimited)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_is_encoded_and_unset_params_dropped() {
        assert_eq!(
            path_with_query(
                "/endpoints",
                &[
                    ("cluster", Some("outbound|80||a.b.svc.cluster.local")),
                    ("source", None),
                    ("format", Some("json")),
                ]
            ),
            "/endpoints?cluster=outbound%7C80%7C%7Ca.b.svc.cluster.local&format=json"
        );
        assert_eq!(path_with_query("/stats", &[("source", None)]), "/stats");
    }

    #[test]
    fn stats_table_sums_clients() {
        let stats = json!({
            "node": {"upstream_connections": 1, "max_upstream_connections": 10, "pending_requests": 0, "max_pending_requests": 10},
            "clusters": [
                {"cluster": "outbound|80||a", "source_pod": "x", "stats": {"upstream_rq_total": 2}},
                {"cluster": "outbound|80||a", "source_pod": "y", "stats": {"upstream_rq_total": 3}},
            ],
        });
        let out = stats_table(&stats, true);
        assert!(
            out.contains("outbound|80||a     upstream_rq_total     5\n"),
            "{out}"
        );
        assert!(out.contains("1/10 upstream connections"), "{out}");
        assert!(!stats_table(&stats, false).contains("node-wide"));
    }

    #[test]
    fn config_table_shows_limits_and_rule() {
        let dump = json!({
            "generation": 1, "last_reload_error": null, "services": 1, "pods": 1,
            "destination_rules": 1, "virtual_services": 0, "access_log_lines_dropped": 0,
            "clusters": [{
                "source_pod": "default/sleep-1", "cluster": "outbound|80||a", "destination_rule": "default/a",
                "effective_policy": {
                    "connection_pool": {"max_connections": 7, "max_pending_requests": 4294967295u64,
                        "max_requests": 4294967295u64, "max_retries": 4294967295u64, "connect_timeout": "250ms"},
                    "load_balancer": {"policy": "ROUND_ROBIN"},
                    "outlier_detection": {"consecutive_5xx_errors": 2, "consecutive_gateway_errors": null,
                        "interval": "10s", "base_ejection_time": "30s", "max_ejection_percent": 100,
                        "split_external_local_origin_errors": false},
                },
            }],
        });
        let out = config_table(&dump);
        let row = out
            .lines()
            .find(|l| l.starts_with("default/sleep-1"))
            .unwrap();
        let cells: Vec<&str> = row
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cells,
            [
                "default/sleep-1",
                "outbound|80||a",
                "default/a",
                "ROUND_ROBIN",
                "7",
                "-",
                "-",
                "-",
                "250ms",
                "5xx=2 interval=10s base-ejection=30s max-ejection=100%"
            ],
            "{out}"
        );
        assert!(out.starts_with("generation 1, last reload error: none\n"));
    }
}
