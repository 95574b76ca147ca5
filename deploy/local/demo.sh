#!/usr/bin/env bash
# fhir-bulk-proxy local demo: a real FHIR R4 server without bulk export (sekmet-fhir, FastAPI + SQLite)
# loaded with synthetic patients (carebundle), and fhir-bulk-proxy in front of it adding $export.
#
#   deploy/local/demo.sh          # start (first run: creates a venv, installs the upstream, builds the proxy)
#   deploy/local/demo.sh stop     # stop both processes (data stays in .demo/; rm -rf .demo to start over)
#
# Environment (all optional):
#   DEMO_UPSTREAM_PORT  port of the upstream FHIR server on 127.0.0.1   (default 8090)
#   DEMO_PORT           port of the proxy on 127.0.0.1                  (default 8080)
#   DEMO_PATIENTS       synthetic patients to load, ~45 resources each  (default 20)
#   DEMO_SEED           carebundle seed (same seed, same patients)      (default 7)
#   PYTHON              Python 3.11+ interpreter for the venv            (default python3)
#
# Needs: Rust (cargo), Python 3.11+ with venv and pip, curl. Everything it writes is under .demo/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEMO="$ROOT/.demo"
VENV="$DEMO/venv"
UP="$DEMO/upstream"
UPSTREAM_PORT="${DEMO_UPSTREAM_PORT:-8090}"
PROXY_PORT="${DEMO_PORT:-8080}"
PATIENTS="${DEMO_PATIENTS:-20}"
SEED="${DEMO_SEED:-7}"
PYTHON="${PYTHON:-python3}"
UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT/fhir"
PROXY="http://127.0.0.1:$PROXY_PORT/fhir"
BIN="$ROOT/target/release/fhir-bulk-proxy"
GROUP_ID=demo-group

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'demo: %s\n' "$*" >&2
  exit 1
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }

stop_pidfile() {
  local pidfile="$1" name="$2" pid
  if alive "$pidfile"; then
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2> /dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2> /dev/null; then
      say "$name (pid $pid) is still shutting down"
    else
      say "stopped $name (pid $pid)"
    fi
  fi
  rm -f "$pidfile"
}

stop() {
  stop_pidfile "$DEMO/proxy.pid" "fhir-bulk-proxy"
  stop_pidfile "$UP/server.pid" "the upstream FHIR server"
}

port_in_use() {
  "$PYTHON" - "$1" << 'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

wait_for() { # URL SECONDS PIDFILE LOG
  local i
  for i in $(seq 1 $(($2 * 2))); do
    if curl -fsS -o /dev/null "$1" 2> /dev/null; then return 0; fi
    if ! alive "$3"; then
      tail -20 "$4" >&2
      die "the process behind $1 exited; see $4"
    fi
    sleep 0.5
  done
  tail -20 "$4" >&2
  die "$1 did not answer within $2 s; see $4"
}

install_upstream() {
  if [ -x "$VENV/bin/sekmet" ] && [ -x "$VENV/bin/carebundle" ]; then return 0; fi
  command -v "$PYTHON" > /dev/null || die "$PYTHON not found: install Python 3.11 or newer"
  if ! "$PYTHON" -c 'import ensurepip, venv' 2> /dev/null; then
    die "Python's venv module is missing (on Debian/Ubuntu: sudo apt-get install python3-venv)"
  fi
  say "creating $VENV and installing sekmet-fhir 0.1.1 and carebundle (first run only)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "sekmet-fhir==0.1.1" carebundle
}

start_upstream() {
  mkdir -p "$UP"
  # A different patient count or seed than last time: start from an empty database.
  if [ -f "$UP/loaded" ] && [ "$(cat "$UP/loaded")" != "$PATIENTS $SEED" ]; then
    say "patient count or seed changed: emptying the upstream database"
    rm -rf "$UP/data" "$UP/loaded"
  fi
  cat > "$UP/settings.yaml" << YAML
base_url: $UPSTREAM
host: 127.0.0.1
port: $UPSTREAM_PORT
data_dir: $UP/data
validation:
  inbound: "off"
simulator:
  enabled: false
log_inbound: false
YAML
  say "starting the upstream FHIR server (sekmet-fhir) at $UPSTREAM"
  (
    cd "$UP"
    nohup "$VENV/bin/sekmet" serve -c "$UP/settings.yaml" > "$UP/server.log" 2>&1 &
    echo $! > "$UP/server.pid"
  )
  wait_for "$UPSTREAM/metadata" 60 "$UP/server.pid" "$UP/server.log"
}

load_patients() {
  if [ -f "$UP/loaded" ]; then
    say "upstream already holds $PATIENTS patients (seed $SEED)"
    return 0
  fi
  local out="$UP/bundles-$PATIENTS-$SEED" f code n=0
  if [ ! -d "$out" ]; then
    say "generating $PATIENTS synthetic patients with carebundle (seed $SEED)"
    "$VENV/bin/carebundle" generate --profile mixed --count "$PATIENTS" --sex mixed --age-range 0-90 \
      --seed "$SEED" --out "$out.tmp" > /dev/null
    mv "$out.tmp" "$out"
  fi
  say "loading them into the upstream (one transaction Bundle per patient)"
  for f in "$out"/*.json; do
    code="$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/fhir+json' \
      --data-binary @"$f" "$UPSTREAM")"
    [ "$code" = 200 ] || die "loading $f failed with HTTP $code"
    n=$((n + 1))
  done
  # A Group of the first five patients, for the Group-level export.
  curl -fsS "$UPSTREAM/Patient?_count=5" > "$UP/first-patients.json"
  "$VENV/bin/python" - "$UP/first-patients.json" "$GROUP_ID" > "$UP/group.json" << 'PY'
import json, sys
bundle = json.load(open(sys.argv[1]))
ids = [e["resource"]["id"] for e in bundle.get("entry", [])]
print(json.dumps({"resourceType": "Group", "id": sys.argv[2], "type": "person", "actual": True,
                  "member": [{"entity": {"reference": f"Patient/{i}"}} for i in ids]}))
PY
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/fhir+json' --data-binary @"$UP/group.json" \
    "$UPSTREAM/Group/$GROUP_ID"
  echo "$PATIENTS $SEED" > "$UP/loaded"
  say "loaded $n patients and Group/$GROUP_ID"
}

start_proxy() {
  command -v cargo > /dev/null || die "cargo not found: install Rust from https://rustup.rs"
  say "building fhir-bulk-proxy (cargo build --release; the first build takes a few minutes)"
  (cd "$ROOT" && cargo build --release --quiet)
  mkdir -p "$DEMO/proxy-data"
  cat > "$DEMO/proxy.toml" << TOML
# Written by deploy/local/demo.sh on every start; config/example.toml documents every key.
[server]
listen = "127.0.0.1:$PROXY_PORT"

[upstream]
base_url = "$UPSTREAM"
requests_per_second = 50
max_concurrent_requests = 4

[export]
data_dir = "$DEMO/proxy-data"
page_size = 200
resources_per_file = 500
patient_batch_size = 10
retry_after_secs = 1
min_poll_interval_ms = 0
expire_after_secs = 3600
TOML
  say "starting fhir-bulk-proxy at $PROXY"
  # The FBP_* variables would override the demo's config file: keep them out of the demo.
  (
    cd "$DEMO"
    nohup env -u FBP_CONFIG -u FBP_LISTEN -u FBP_UPSTREAM_URL -u FBP_PUBLIC_BASE_URL -u FBP_DATA_DIR \
      -u FBP_UPSTREAM_BEARER_TOKEN "$BIN" serve --config "$DEMO/proxy.toml" > "$DEMO/proxy.log" 2>&1 &
    echo $! > "$DEMO/proxy.pid"
  )
  wait_for "$PROXY/metadata" 30 "$DEMO/proxy.pid" "$DEMO/proxy.log"
}

walkthrough() {
  cat << EOF

fhir-bulk-proxy is running at $PROXY in front of $UPSTREAM
($PATIENTS patients, Group/$GROUP_ID). Logs: .demo/proxy.log, .demo/upstream/server.log

Try a full export (copy-paste):

  BASE=$PROXY

  # 1. Kick off: 202 Accepted, Content-Location = the job's status URL
  curl -si "\$BASE/\\\$export?_type=Patient,Condition" \\
    -H 'Accept: application/fhir+json' -H 'Prefer: respond-async'
  #    the same, keeping the status URL in a variable:
  STATUS=\$(curl -s -o /dev/null -D - "\$BASE/\\\$export?_type=Patient,Condition" \\
    -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \\
    | tr -d '\r' | awk 'tolower(\$1) == "content-location:" {print \$2}')
  echo "\$STATUS"
  #    other levels: \$BASE/Patient/\\\$export and \$BASE/Group/$GROUP_ID/\\\$export

  # 2. Poll: 202 with X-Progress and Retry-After while running, then 200 with the manifest
  curl -si "\$STATUS"

  # 3. The manifest: one output entry per NDJSON file
  curl -s "\$STATUS" | python3 -m json.tool

  # 4. Download a file (an output[].url of the manifest), plain or gzip-compressed
  FILE=\$(curl -s "\$STATUS" | python3 -c 'import json,sys; print(json.load(sys.stdin)["output"][0]["url"])')
  curl -s "\$FILE" -H 'Accept: application/fhir+ndjson' | head -c 600; echo
  curl -s "\$FILE" -H 'Accept-Encoding: gzip' | gunzip | wc -l

  # 5. Delete the job and its files: 202, then the status URL answers 404
  curl -si -X DELETE "\$STATUS"

Everything else is passed through to the upstream, e.g.  curl -s "\$BASE/Patient?_count=1"

Stop the demo:   deploy/local/demo.sh stop        (start again: deploy/local/demo.sh)
Start over:      deploy/local/demo.sh stop && rm -rf .demo
EOF
}

start() {
  mkdir -p "$DEMO"
  if alive "$DEMO/proxy.pid" || alive "$UP/server.pid"; then
    die "the demo is already running (deploy/local/demo.sh stop first)"
  fi
  command -v curl > /dev/null || die "curl not found"
  command -v "$PYTHON" > /dev/null || die "$PYTHON not found: install Python 3.11 or newer"
  local port
  for port in "$UPSTREAM_PORT" "$PROXY_PORT"; do
    if port_in_use "$port"; then
      die "127.0.0.1:$port is already in use; choose other ports with DEMO_UPSTREAM_PORT / DEMO_PORT"
    fi
  done
  install_upstream
  # From here on, a failure stops what was started.
  trap 'stop' EXIT
  start_upstream
  load_patients
  start_proxy
  trap - EXIT
  walkthrough
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  -h | --help | help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (use: start, stop)" ;;
esac
