#!/usr/bin/env bash
# The main job on one machine: a local anvil chain with the DIV contracts deployed, left running,
# and a short walk-through whose every command is run here. `make stop` ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.div
PORT=${DIV_RPC_PORT:-8545}
mkdir -p "$STATE/logs" "$STATE/pids"
scripts/stop.sh --quiet

rm -f "$STATE/addresses.json"
nohup target/debug/div dev --port "$PORT" --state-dir "$STATE" >"$STATE/logs/dev.log" 2>&1 &
echo $! >"$STATE/pids/dev.pid"
for _ in $(seq 1 120); do
  [ -f "$STATE/addresses.json" ] && break
  if ! kill -0 "$(cat "$STATE/pids/dev.pid")" 2>/dev/null; then
    echo "div dev stopped; its log:" >&2; cat "$STATE/logs/dev.log" >&2; exit 1
  fi
  sleep 0.5
done
[ -f "$STATE/addresses.json" ] || { echo "timed out waiting for the deployment" >&2; exit 1; }

set -a; . "$STATE/demo.env"; set +a
sed -n '/^DIV contracts/,/^accounts/p' "$STATE/logs/dev.log"
echo

# the host: the sample MiniLM package with its embeddings plugin
HTTP_PORT=${DIV_HTTP_PORT:-8080}
MODEL_DIR=build/models/all-minilm-l6-v2
PLUGIN=plugins/target/wasm32-wasip2/release/div_embeddings.wasm
nohup target/debug/div serve --listen "127.0.0.1:$HTTP_PORT" --model "$MODEL_DIR=$PLUGIN" \
  --cache-dir "$STATE/cache" >"$STATE/logs/serve.log" 2>&1 &
echo $! >"$STATE/pids/serve.pid"
for _ in $(seq 1 360); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break
  if ! kill -0 "$(cat "$STATE/pids/serve.pid")" 2>/dev/null; then
    echo "div serve stopped; its log:" >&2; cat "$STATE/logs/serve.log" >&2; exit 1
  fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null || { echo "div serve did not come up" >&2; exit 1; }
env_set() { # KEY VALUE: replace or add a line of the env file
  grep -v "^$1=" "$STATE/demo.env" >"$STATE/demo.env.tmp" || true
  echo "$1=$2" >>"$STATE/demo.env.tmp"
  mv "$STATE/demo.env.tmp" "$STATE/demo.env"
}
env_set DIV_URL "http://127.0.0.1:$HTTP_PORT"
env_set DIV_MODEL all-minilm-l6-v2
set -a; . "$STATE/demo.env"; set +a
echo "Host: $DIV_URL serving $DIV_MODEL (log: $STATE/logs/serve.log)"
echo
echo "== walk-through (each command below is run now) =="
run() { printf '$ %s\n' "$*"; "$@"; echo; }
run cast call "$DIV_MODEL_VAULT" "modelCount()(uint256)" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_PAYMENT_STREAM" "withdrawDelay()(uint64)" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_PAYMENT_STREAM" "isTokenAllowed(address)(bool)" "$DIV_USDC" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_USDC" "decimals()(uint8)" --rpc-url "$DIV_RPC_URL"
run curl -s "$DIV_URL/v1/models"
echo
run examples/curl_embeddings.sh
run .venv/bin/python examples/openai_embeddings.py
echo "Address book: $STATE/addresses.json   Environment: $STATE/demo.env (set -a; . $STATE/demo.env; set +a)"
echo "Chain: $DIV_RPC_URL (chain id $DIV_CHAIN_ID) and host $DIV_URL, left running. Stop them with: make stop"
