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
echo "== walk-through (each command below is run now) =="
run() { printf '$ %s\n' "$*"; "$@"; echo; }
run cast call "$DIV_MODEL_VAULT" "modelCount()(uint256)" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_PAYMENT_STREAM" "withdrawDelay()(uint64)" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_PAYMENT_STREAM" "isTokenAllowed(address)(bool)" "$DIV_USDC" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_USDC" "decimals()(uint8)" --rpc-url "$DIV_RPC_URL"
echo "Address book: $STATE/addresses.json   Environment: $STATE/demo.env (set -a; . $STATE/demo.env; set +a)"
echo "Chain: $DIV_RPC_URL (chain id $DIV_CHAIN_ID), left running. Stop it with: make stop"
