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

env_set() { # KEY VALUE: replace or add a line of the env file
  grep -v "^$1=" "$STATE/demo.env" >"$STATE/demo.env.tmp" || true
  echo "$1=$2" >>"$STATE/demo.env.tmp"
  mv "$STATE/demo.env.tmp" "$STATE/demo.env"
}
wait_up() { # NAME PIDFILE LOG URL: wait until URL answers, or show the log if the process died
  for _ in $(seq 1 360); do
    curl -sf "$4" >/dev/null && return 0
    if ! kill -0 "$(cat "$2")" 2>/dev/null; then
      echo "$1 stopped; its log:" >&2; cat "$3" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "$1 did not come up" >&2; exit 1
}

# three independent key custodians (t = 2 of n = 3), each with its own key and data folder
rm -rf "$STATE/custodians" "$STATE/store" "$STATE/publish"
CUSTODIAN_URLS=()
for i in 1 2 3; do
  port=$((7100 + i))
  key_var="DIV_CUSTODIAN${i}_KEY"
  nohup target/debug/div custodian --listen "127.0.0.1:$port" --private-key "${!key_var}" \
    --data-dir "$STATE/custodians/$i" >"$STATE/logs/custodian$i.log" 2>&1 &
  echo $! >"$STATE/pids/custodian$i.pid"
  wait_up "custodian $i" "$STATE/pids/custodian$i.pid" "$STATE/logs/custodian$i.log" "http://127.0.0.1:$port/healthz"
  CUSTODIAN_URLS+=("http://127.0.0.1:$port")
done
env_set DIV_CUSTODIANS "$(IFS=,; echo "${CUSTODIAN_URLS[*]}")"
echo "Custodians: ${CUSTODIAN_URLS[*]}"

# the owner publishes the sample MiniLM package encrypted, with its embeddings plugin
MODEL_DIR=build/models/all-minilm-l6-v2
PLUGIN=plugins/target/wasm32-wasip2/release/div_embeddings.wasm
echo
echo "== publishing $MODEL_DIR encrypted =="
target/debug/div publish "$MODEL_DIR" --plugin "$PLUGIN" --quiet \
  --custodian "${CUSTODIAN_URLS[0]}" --custodian "${CUSTODIAN_URLS[1]}" --custodian "${CUSTODIAN_URLS[2]}" \
  --threshold 2 --price 0.001 --token-price 1 --authorize "$DIV_HOST" --store "$STATE/store"

# the host: serves what ModelVault authorises it for, decrypted in memory only
HTTP_PORT=${DIV_HTTP_PORT:-8080}
nohup target/debug/div serve --listen "127.0.0.1:$HTTP_PORT" --vault --host-key "$DIV_HOST_KEY" \
  --custodian "$(IFS=,; echo "${CUSTODIAN_URLS[*]}")" --store "$STATE/store" \
  --cache-dir "$STATE/cache" >"$STATE/logs/serve.log" 2>&1 &
echo $! >"$STATE/pids/serve.pid"
wait_up "div serve" "$STATE/pids/serve.pid" "$STATE/logs/serve.log" "http://127.0.0.1:$HTTP_PORT/healthz"
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
run target/debug/div cid "$STATE/publish/all-minilm-l6-v2/model.divenc"
run cast call "$DIV_MODEL_VAULT" "isHostAuthorized(bytes32,address)(bool)" "$(cast call "$DIV_MODEL_VAULT" "modelIdAt(uint256)(bytes32)" 0 --rpc-url "$DIV_RPC_URL")" "$DIV_HOST" --rpc-url "$DIV_RPC_URL"
run curl -s "$DIV_URL/v1/models"
echo
run examples/curl_embeddings.sh
run .venv/bin/python examples/openai_embeddings.py
echo "Address book: $STATE/addresses.json   Environment: $STATE/demo.env (set -a; . $STATE/demo.env; set +a)"
echo "Chain: $DIV_RPC_URL (chain id $DIV_CHAIN_ID) and host $DIV_URL, left running. Stop them with: make stop"
