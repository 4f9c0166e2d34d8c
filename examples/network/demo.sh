#!/usr/bin/env bash
# make demo-network: one server and three hospital sites on 127.0.0.1 train
# UCI Heart Disease with SecAgg+ and central DP, over gRPC with mutual TLS.
#
#   bash examples/network/demo.sh        (from the repository root)
#
# Everything goes to runs/demo-network/ (deleted first):
#   operator/ca/        the federation's CA (ca.key never leaves it)
#   operator/inbox/     the sites' certificate signing requests
#   operator/signed/    the certificates the operator sends back
#   operator/state/     the server's state: summary.json, metrics.jsonl,
#                       report.html, checkpoint.npz, state.db
#   sites/<site>/       each hospital's own folder: its CSV, site.toml, key,
#                       certificate and the CA's certificate
#   logs/               server.log and one <site>.log per site
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
FEDSHIELD="$BIN/fedshield"
PYTHON="$BIN/python"
WORK=runs/demo-network
SITES=(cleveland hungary va)
PORT_WAIT_S=${PORT_WAIT_S:-120}   # how long to wait for the server to listen
SERVER_TOML=examples/network/server.toml
# The example policy (examples/network/policy.toml) asks for min_clients = 3,
# which SecAgg's threshold of 2 of 3 does not meet; see demo_policy.toml.
POLICY=examples/network/demo_policy.toml

PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        echo "demo-network FAILED (exit $status); logs in $WORK/logs/" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n== %s\n' "$*"; }

started=$(date +%s)
rm -rf "$WORK"
mkdir -p "$WORK/operator/inbox" "$WORK/operator/signed" "$WORK/logs" "$WORK/sites"

step "each hospital prepares its own data (examples/network/make_sites.py)"
"$PYTHON" examples/network/make_sites.py "$WORK/sites"

step "operator: create the federation's CA"
"$FEDSHIELD" ca init "$WORK/operator/ca" --server-host 127.0.0.1

for site in "${SITES[@]}"; do
    step "$site: request a certificate (the key stays in sites/$site/)"
    "$FEDSHIELD" ca request "$site" --out "$WORK/sites/$site"
    # The site sends only its certificate signing request to the operator.
    cp "$WORK/sites/$site/$site.csr" "$WORK/operator/inbox/"
    step "operator: approve $site's request"
    "$FEDSHIELD" ca approve "$WORK/operator/inbox/$site.csr" \
        --ca "$WORK/operator/ca" --out "$WORK/operator/signed"
    # The operator sends back the site's certificate and the CA's certificate.
    cp "$WORK/operator/signed/$site.crt" "$WORK/operator/signed/ca.crt" \
        "$WORK/sites/$site/"
done

step "operator: start the server (log: $WORK/logs/server.log)"
PORT_FILE="$WORK/operator/state/port"
"$FEDSHIELD" serve "$SERVER_TOML" --ca "$WORK/operator/ca" \
    --state "$WORK/operator/state" --listen 127.0.0.1:0 \
    --port-file "$PORT_FILE" >"$WORK/logs/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")

deadline=$(($(date +%s) + PORT_WAIT_S))
until [ -s "$PORT_FILE" ]; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "the server exited before listening:" >&2
        tail -n 30 "$WORK/logs/server.log" >&2
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "the server did not write $PORT_FILE within ${PORT_WAIT_S}s" >&2
        tail -n 30 "$WORK/logs/server.log" >&2
        exit 1
    fi
    sleep 0.2
done
PORT=$(tr -d '[:space:]' <"$PORT_FILE")
echo "server listening on 127.0.0.1:$PORT"

declare -A SITE_PID
for site in "${SITES[@]}"; do
    step "$site: join with its policy (log: $WORK/logs/$site.log)"
    "$FEDSHIELD" join --server "127.0.0.1:$PORT" --identity "$WORK/sites/$site" \
        --data "$WORK/sites/$site/site.toml" --policy "$POLICY" \
        >"$WORK/logs/$site.log" 2>&1 &
    SITE_PID[$site]=$!
    PIDS+=("${SITE_PID[$site]}")
done

step "training: the server's rounds"
# Follow the server's log while the run lasts.
tail -n +1 -f "$WORK/logs/server.log" --pid "$SERVER_PID" &
TAIL_PID=$!
PIDS+=("$TAIL_PID")

failed=0
server_status=0
wait "$SERVER_PID" || server_status=$?
wait "$TAIL_PID" 2>/dev/null || true
if [ "$server_status" -ne 0 ]; then
    echo "server exited with $server_status (log: $WORK/logs/server.log)" >&2
    failed=1
fi
for site in "${SITES[@]}"; do
    site_status=0
    wait "${SITE_PID[$site]}" || site_status=$?
    if [ "$site_status" -ne 0 ]; then
        echo "$site exited with $site_status (log: $WORK/logs/$site.log)" >&2
        tail -n 20 "$WORK/logs/$site.log" >&2
        failed=1
    else
        echo "$site exited 0"
    fi
done
if [ "$failed" -ne 0 ]; then
    exit 1
fi

SUMMARY="$WORK/operator/state/summary.json"
if [ ! -f "$SUMMARY" ]; then
    echo "no $SUMMARY" >&2
    exit 1
fi
step "summary ($SUMMARY)"
"$PYTHON" - "$SUMMARY" <<'EOF'
import json
import sys

s = json.load(open(sys.argv[1]))
p = s.get("privacy") or {}
acc, eps = s.get("accuracy"), s.get("epsilon")
print(f"status:    {s.get('status')}, {s.get('rounds')} of {s.get('planned_rounds')} rounds")
source = s.get("accuracy_source") or "server"
print(f"accuracy:  {acc:.4f} ({source} evaluation)" if acc is not None else "accuracy:  -")
if eps is not None:
    print(f"epsilon:   {eps:.3f} (delta {s.get('delta')}, {p.get('mode')} DP)")
if p.get("outside_guarantee"):
    print(f"not covered by epsilon: {', '.join(p['outside_guarantee'])}")
EOF
echo "report:    $WORK/operator/state/report.html"
echo "logs:      $WORK/logs/"
echo "demo-network finished in $(($(date +%s) - started)) s"
