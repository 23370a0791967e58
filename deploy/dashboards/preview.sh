#!/usr/bin/env bash
# Regenerates docs/dashboard-preview.png: a preview of
# deploy/dashboards/nodeway-resilience.json drawn from live Prometheus queries
# (Grafana itself is not available here; see render_preview.py).
#
# What it does, all on loopback (127.0.0.0/8), everything bounded in time:
#   1. installs prometheus (Debian package) and matplotlib if missing;
#   2. builds nodeway and mock-upstream with cargo;
#   3. starts three mock upstreams on 127.0.0.11-13:8080 (127.0.0.12 answers
#      30 % of requests 503), Nodeway with a config derived from
#      deploy/examples/local.yaml (a second client pod, a DestinationRule with
#      connection-pool limits and outlier detection, a 70/30 v1/v2 split), and
#      Prometheus as a plain process scraping Nodeway every second;
#   4. sends ~3 minutes of requests as two client pods (127.0.1.5 `sleep`,
#      127.0.1.6 `web`): /status/200, /delay/300, /delay/2000 (timeouts) and
#      concurrent bursts (connection-pool overflow);
#   5. renders the PNG with render_preview.py and stops everything it started.
#
# Usage: deploy/dashboards/preview.sh [OUT.png]   (LOAD_SECONDS=180 by default;
# KEEP_TMP=1 keeps the temp dir with the config, logs and Prometheus data)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OUT=${1:-docs/dashboard-preview.png}
LOAD_SECONDS=${LOAD_SECONDS:-180}
PROM_ADDR=127.0.0.1:19090
METRICS_ADDR=127.0.0.1:15020
OUTBOUND_ADDR=127.0.0.1:15001
ADMIN_ADDR=127.0.0.1:15000
READINESS_ADDR=127.0.0.1:15021
CLIENT_SLEEP=127.0.1.5
CLIENT_WEB=127.0.1.6

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'preview.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. installs
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi; }

apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    # Never let the package start Prometheus as a system service: a policy-rc.d
    # that denies service starts, only if the machine has none already.
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod +x "$policy"
        added=1
    fi
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >&2 || {
        [ "$added" = 1 ] && as_root rm -f "$policy"
        die "apt-get install $* failed"
    }
    if [ "$added" = 1 ]; then as_root rm -f "$policy"; fi
}

command -v prometheus >/dev/null || { log "installing prometheus"; apt_install prometheus; }
command -v curl >/dev/null || { log "installing curl"; apt_install curl; }

PY=
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import matplotlib' 2>/dev/null; then
        PY=$candidate
        break
    fi
done
if [ -z "$PY" ]; then
    log "installing matplotlib"
    if command -v apt-get >/dev/null; then
        apt_install python3-matplotlib
        PY=/usr/bin/python3
    else
        python3 -m pip install --quiet matplotlib
        PY=python3
    fi
    "$PY" -c 'import matplotlib' || die "matplotlib still not importable by $PY"
fi

# ------------------------------------------------------------------ 2. build
log "building nodeway and mock-upstream"
cargo build --quiet -p nodeway -p nodeway-tests --bins
BIN=$ROOT/target/debug

# ------------------------------------------------------------ 3. processes
port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for addr in "$PROM_ADDR" "$METRICS_ADDR" "$OUTBOUND_ADDR" "$ADMIN_ADDR" "$READINESS_ADDR" \
    127.0.0.11:8080 127.0.0.12:8080 127.0.0.13:8080; do
    if port_busy "$addr"; then die "$addr is in use (is 'cargo xtask demo' running?)"; fi
done

TMP=$(mktemp -d -t nodeway-preview.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${KEEP_TMP:-0}" = 1 ] || [ "$rc" != 0 ]; then
        log "temp dir kept: $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # URL SECONDS
    local deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "$1 did not answer within $2 s (logs in $TMP)"
        sleep 0.2
    done
}

# The example config without its DestinationRule/VirtualService, plus ours.
awk -v RS='\n---\n' -v ORS='\n---\n' '!/\nkind: (DestinationRule|VirtualService)\n/' \
    deploy/examples/local.yaml > "$TMP/nodeway.yaml"
cat >> "$TMP/nodeway.yaml" <<'EOF'
# A second client pod (127.0.1.6), so that the "by client" panels compare two clients.
apiVersion: v1
kind: Pod
metadata:
  name: web-6b7c8d9e0-fghij
  namespace: default
  labels:
    app: web
    pod-template-hash: 6b7c8d9e0
  ownerReferences:
    - apiVersion: apps/v1
      kind: ReplicaSet
      name: web-6b7c8d9e0
      uid: 00000000-0000-0000-0000-000000000004
      controller: true
spec:
  nodeName: node-a
  containers:
    - name: web
      image: curlimages/curl
status:
  phase: Running
  podIP: 127.0.1.6
  podIPs:
    - ip: 127.0.1.6
---
# Limits low enough for bursts to overflow, and outlier detection that can
# eject the flaky v1 endpoint (50 % of 2 hosts = 1; v2's single host never).
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: mock-server
  namespace: default
spec:
  host: mock-server
  trafficPolicy:
    connectionPool:
      tcp:
        connectTimeout: 1s
        maxConnections: 4
      http:
        http1MaxPendingRequests: 4
    loadBalancer:
      simple: ROUND_ROBIN
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 2s
      baseEjectionTime: 10s
      maxEjectionPercent: 50
  subsets:
    - name: v1
      labels:
        version: v1
    - name: v2
      labels:
        version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: mock-server
  namespace: default
spec:
  hosts:
    - mock-server
  http:
    - name: default-route
      route:
        - destination:
            host: mock-server
            subset: v1
          weight: 70
        - destination:
            host: mock-server
            subset: v2
          weight: 30
      timeout: 3s
      retries:
        attempts: 2
        perTryTimeout: 1s
        retryOn: connect-failure,refused-stream,unavailable,cancelled,5xx
EOF
"$BIN/nodeway" validate --config "$TMP/nodeway.yaml" >&2

cat > "$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: nodeway
    metrics_path: /metrics
    static_configs:
      - targets: ['$METRICS_ADDR']
EOF

log "starting mock upstreams, nodeway and prometheus (logs in $TMP)"
"$BIN/mock-upstream" --listen 127.0.0.11:8080 --name mock-server-v1-a >"$TMP/mock-11.log" 2>&1 &
PIDS+=($!)
"$BIN/mock-upstream" --listen 127.0.0.12:8080 --name mock-server-v1-b \
    --fail-rate 0.3 --fail-code 503 >"$TMP/mock-12.log" 2>&1 &
PIDS+=($!)
"$BIN/mock-upstream" --listen 127.0.0.13:8080 --name mock-server-v2 >"$TMP/mock-13.log" 2>&1 &
PIDS+=($!)
"$BIN/nodeway" run --config "$TMP/nodeway.yaml" --node node-a --access-log off --log-level warn \
    --outbound-addr "$OUTBOUND_ADDR" --admin-addr "$ADMIN_ADDR" \
    --metrics-addr "$METRICS_ADDR" --readiness-addr "$READINESS_ADDR" >"$TMP/nodeway.log" 2>&1 &
PIDS+=($!)
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prometheus-data" \
    --web.listen-address="$PROM_ADDR" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)

wait_http "http://$READINESS_ADDR/healthz/ready" 15
wait_http "http://$METRICS_ADDR/metrics" 5
wait_http "http://$PROM_ADDR/-/ready" 30
for ip in 127.0.0.11 127.0.0.12 127.0.0.13; do wait_http "http://$ip:8080/status/200" 10; done

# ------------------------------------------------------------------- 4. load
# One request in the background; curl's own --max-time bounds it.
req() { # CLIENT_IP PATH
    curl -s -o /dev/null --max-time 5 --interface "$1" -x "http://$OUTBOUND_ADDR" \
        "http://mock-server$2" || true
}

# A client's steady traffic: ~4 requests/s of mixed paths, at most 6 in flight.
steady() { # CLIENT_IP END_SECONDS TIMEOUT_EVERY
    local ip=$1 end=$2 every=$3 i path
    for ((i = 0; i < 2000 && SECONDS < end; i++)); do
        if ((i % every == every - 1)); then
            path=/delay/2000 # > perTryTimeout 1s: per-try timeouts, retries, route timeout 3s
        elif ((i % 5 == 4)); then
            path=/delay/300
        else
            path=/status/200
        fi
        req "$ip" "$path" &
        while (($(jobs -rp | wc -l) >= 6)); do wait -n || true; done
        sleep 0.25
    done
    wait
}

# Bursts of concurrent slow requests from one client: more than
# maxConnections + http1MaxPendingRequests (4 + 4), so the rest overflow (UO).
bursts() { # CLIENT_IP START_SECONDS END_SECONDS
    local ip=$1 start=$2 end=$3 b k
    while ((SECONDS < start)); do sleep 1; done
    for ((b = 0; b < 20 && SECONDS < end; b++)); do
        for ((k = 0; k < 16; k++)); do req "$ip" /delay/500 & done
        wait
        sleep 4
    done
}

T0=$SECONDS
LOAD_START=$(date +%s)
log "sending requests for ${LOAD_SECONDS}s as sleep ($CLIENT_SLEEP) and web ($CLIENT_WEB)"
steady "$CLIENT_SLEEP" $((T0 + LOAD_SECONDS)) 15 &
LOAD_PIDS=($!)
steady "$CLIENT_WEB" $((T0 + LOAD_SECONDS)) 25 &
LOAD_PIDS+=($!)
bursts "$CLIENT_SLEEP" $((T0 + LOAD_SECONDS / 4)) $((T0 + LOAD_SECONDS * 3 / 4)) &
LOAD_PIDS+=($!)
PIDS+=("${LOAD_PIDS[@]}")
for pid in "${LOAD_PIDS[@]}"; do wait "$pid" || true; done
sleep 3 # two more scrapes after the last request
LOAD_END=$(date +%s)

# ----------------------------------------------------------------- 5. render
mkdir -p "$(dirname "$OUT")"
log "rendering $OUT"
"$PY" deploy/dashboards/render_preview.py --prometheus "http://$PROM_ADDR" \
    --dashboard deploy/dashboards/nodeway-resilience.json --out "$OUT" \
    --start "$LOAD_START" --end "$LOAD_END" --step 2s --rate-interval 30s
log "done: $OUT"
