//! The config file is reloaded on change without dropping in-flight
//! requests; a bad new file keeps the last good configuration.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use nodeway_tests::{Proto, request};

async fn config_dump(h: &Harness) -> serde_json::Value {
    let out = request(
        Proto::Http1,
        h.admin(),
        "127.0.0.1".parse().unwrap(),
        &h.admin().to_string(),
        "/config_dump",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(out.status, Some(200), "{out:?}");
    serde_json::from_slice(&out.body).expect("config_dump is JSON")
}

async fn wait_generation(h: &Harness, generation: u64) -> serde_json::Value {
    for _ in 0..100 {
        let dump = config_dump(h).await;
        if dump["generation"] == generation {
            return dump;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "generation {generation} never installed: {:?}",
        config_dump(h).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_in_flight_requests_and_bad_files_keep_last_good() {
    let old = mock("old").await;
    let new = mock("new").await;
    let h = Harness::start(&MeshConfig::new(vec![old.addr()]).with_route("5s", 0, "5xx")).await;

    // A slow request is in flight on the old configuration…
    let addr = h.addr();
    let in_flight = tokio::spawn(async move {
        request(
            Proto::Http2,
            addr,
            CLIENT_IP,
            AUTHORITY,
            "/delay/1500",
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // …when the endpoints change.
    std::fs::write(
        &h.config_path,
        MeshConfig::new(vec![new.addr()])
            .with_route("5s", 0, "5xx")
            .render(),
    )
    .unwrap();
    let dump = wait_generation(&h, 2).await;
    assert_eq!(dump["last_reload_error"], serde_json::Value::Null);

    let fresh = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(fresh.status, Some(200));
    assert_eq!(
        fresh.served_by(),
        Some("new"),
        "new requests use the new endpoints"
    );

    let finished = in_flight.await.unwrap();
    assert_eq!(
        finished.status,
        Some(200),
        "the in-flight request survived the reload: {finished:?}"
    );
    assert!(finished.body_complete);
    assert_eq!(finished.served_by(), Some("old"));

    // A broken file is rejected with its reasons and the last good config keeps serving.
    std::fs::write(&h.config_path, "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken, namespace: default}\nspec:\n  hosts: [mock]\n  http:\n  - retries: {attempts: 2, retryOn: sometimes}\n    route: [{destination: {host: mock}}]\n").unwrap();
    let mut error = serde_json::Value::Null;
    for _ in 0..100 {
        error = config_dump(&h).await["last_reload_error"].clone();
        if !error.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = error.as_str().expect("reload error reported").to_string();
    assert!(
        error.contains("retryOn") && error.contains("sometimes"),
        "{error}"
    );
    assert_eq!(config_dump(&h).await["generation"], 2);
    let still = request(
        Proto::Http1,
        h.addr(),
        CLIENT_IP,
        AUTHORITY,
        "/status/200",
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(still.status, Some(200));
    assert_eq!(still.served_by(), Some("new"));
}
