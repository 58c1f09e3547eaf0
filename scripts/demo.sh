#!/usr/bin/env bash
# The main job on one machine: a local anvil chain with the DIV contracts deployed, left running,
# and a short walk-through whose every command is run here. `make stop` ends it.
set -euo pipefail
# everything the demo writes (keys, env file, ledger, logs) is readable by this user only
umask 077
cd "$(dirname "$0")/.."
# the tools the bootstrap installs (cast, anvil, forge); the script runs on its own, not only under make
export PATH="$PWD/contracts/node_modules/.bin:$PATH"
# the div binary cargo built (the target folder may live outside the clone: CARGO_TARGET_DIR)
DIV=${DIV_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/div}
[ -x "$DIV" ] || { echo "no div binary at $DIV: run cargo build --bin div (make demo does)" >&2; exit 1; }
div() { "$DIV" "$@"; }
# DIV_STATE and the ports let a test run a second stack beside a running demo
STATE=${DIV_STATE:-.div}
PORT=${DIV_RPC_PORT:-8545}
CUSTODIAN_PORT_BASE=${DIV_CUSTODIAN_PORT_BASE:-7100}
export DIV_STATE=$STATE DIV_ADDRESSES=$STATE/addresses.json
mkdir -p "$STATE/logs" "$STATE/pids"
scripts/stop.sh --quiet

rm -f "$STATE/addresses.json" "$STATE/demo.env"
nohup "$DIV" dev --port "$PORT" --state-dir "$STATE" >"$STATE/logs/dev.log" 2>&1 &
echo $! >"$STATE/pids/dev.pid"
for _ in $(seq 1 120); do
  # div dev writes the address book, then the env file: wait for both
  [ -f "$STATE/addresses.json" ] && [ -f "$STATE/demo.env" ] && break
  if ! kill -0 "$(cat "$STATE/pids/dev.pid")" 2>/dev/null; then
    echo "div dev stopped; its log:" >&2; cat "$STATE/logs/dev.log" >&2; exit 1
  fi
  sleep 0.5
done
[ -f "$STATE/addresses.json" ] && [ -f "$STATE/demo.env" ] || { echo "timed out waiting for the deployment" >&2; exit 1; }
# a second chain the host also takes payment on: anvil as chain 314159 (Filecoin Calibration's
# id), with a USDFC stand-in of 18 decimals; its own address book
CHAIN2=314159
CHAIN2_DIR=$STATE/chain-$CHAIN2
rm -rf "$CHAIN2_DIR"
nohup "$DIV" dev --port "$((PORT + 1))" --chain-id "$CHAIN2" --state-dir "$CHAIN2_DIR" >"$STATE/logs/dev-$CHAIN2.log" 2>&1 &
echo $! >"$STATE/pids/dev-$CHAIN2.pid"
for _ in $(seq 1 120); do
  [ -f "$CHAIN2_DIR/addresses.json" ] && [ -f "$CHAIN2_DIR/demo.env" ] && break
  if ! kill -0 "$(cat "$STATE/pids/dev-$CHAIN2.pid")" 2>/dev/null; then
    echo "div dev (chain $CHAIN2) stopped; its log:" >&2; cat "$STATE/logs/dev-$CHAIN2.log" >&2; exit 1
  fi
  sleep 0.5
done
[ -f "$CHAIN2_DIR/demo.env" ] || { echo "timed out waiting for chain $CHAIN2" >&2; exit 1; }
BOOK2=$CHAIN2_DIR/addresses.json

set -a; . "$STATE/demo.env"; set +a
sed -n '/^DIV contracts/,/^accounts/p' "$STATE/logs/dev.log"
echo

env_set() { # KEY VALUE: replace or add a line of the env file
  grep -v "^$1=" "$STATE/demo.env" >"$STATE/demo.env.tmp" || true
  echo "$1=$2" >>"$STATE/demo.env.tmp"
  mv "$STATE/demo.env.tmp" "$STATE/demo.env"
}
wait_up() { # NAME PIDFILE LOG URL: wait until URL answers, or show the log if the process died
  for _ in $(seq 1 1200); do
    curl -sf "$4" >/dev/null && return 0
    if ! kill -0 "$(cat "$2")" 2>/dev/null; then
      echo "$1 stopped; its log:" >&2; cat "$3" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "$1 did not come up" >&2; exit 1
}

# long-running processes take their keys from 0600 files, never from the command line (ps shows it)
key_file() { # NAME VALUE: write a key file readable by this user only
  mkdir -p "$STATE/keys"
  (umask 077; printf '%s\n' "$2" >"$STATE/keys/$1.key")
  echo "$STATE/keys/$1.key"
}

# three independent key custodians (t = 2 of n = 3), each with its own key and data folder
rm -rf "$STATE/custodians" "$STATE/store" "$STATE/publish"
CUSTODIAN_URLS=()
for i in 1 2 3; do
  port=$((CUSTODIAN_PORT_BASE + i))
  key_var="DIV_CUSTODIAN${i}_KEY"
  nohup "$DIV" custodian --listen "127.0.0.1:$port" --key-file "$(key_file "custodian$i" "${!key_var}")" \
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
div publish "$MODEL_DIR" --plugin "$PLUGIN" --quiet \
  --custodian "${CUSTODIAN_URLS[0]}" --custodian "${CUSTODIAN_URLS[1]}" --custodian "${CUSTODIAN_URLS[2]}" \
  --threshold 2 --price 0.001 --token-price 1 --authorize "$DIV_HOST" --store "$STATE/store" \
  --work-dir "$STATE/publish/all-minilm-l6-v2"

# its int8 variant as a model of its own (same plugin, a lower price)
echo "== publishing $MODEL_DIR-int8 encrypted =="
div publish "$MODEL_DIR-int8" --plugin "$PLUGIN" --quiet \
  --custodian "${CUSTODIAN_URLS[0]}" --custodian "${CUSTODIAN_URLS[1]}" --custodian "${CUSTODIAN_URLS[2]}" \
  --threshold 2 --price 0.0005 --token-price 1 --authorize "$DIV_HOST" --store "$STATE/store" \
  --work-dir "$STATE/publish/all-minilm-l6-v2-int8"

# and SmolLM2-135M-Instruct for chat (GGUF on llama.cpp, its own ChatML template), with the chat plugin, priced per
# request plus per 1000 tokens
CHAT_DIR=build/models/smollm2-135m-instruct
echo "== publishing $CHAT_DIR encrypted =="
div publish "$CHAT_DIR" --plugin plugins/target/wasm32-wasip2/release/div_chat.wasm --quiet \
  --custodian "${CUSTODIAN_URLS[0]}" --custodian "${CUSTODIAN_URLS[1]}" --custodian "${CUSTODIAN_URLS[2]}" \
  --threshold 2 --price 0.0005 --price-per-1k-tokens 0.002 --token-price 1 --authorize "$DIV_HOST" \
  --store "$STATE/store" --work-dir "$STATE/publish/smollm2-135m-instruct"

# the same MiniLM on the second chain: the same ciphertext and custodians (the work folder is
# reused), registered there with its access token sold for USDFC
echo "== registering $MODEL_DIR on chain $CHAIN2 too =="
div publish "$MODEL_DIR" --plugin "$PLUGIN" --quiet \
  --custodian "${CUSTODIAN_URLS[0]}" --custodian "${CUSTODIAN_URLS[1]}" --custodian "${CUSTODIAN_URLS[2]}" \
  --threshold 2 --price 0.001 --token-price 1 --sale-token USDFC --authorize "$DIV_HOST" --store "$STATE/store" \
  --work-dir "$STATE/publish/all-minilm-l6-v2" --addresses "$BOOK2"

# the host: serves what ModelVault authorises it for, decrypted in memory only
HTTP_PORT=${DIV_HTTP_PORT:-8080}
rm -rf "$STATE/host"
# the host serves only what its operator allows: here, the demo owner's models
nohup "$DIV" serve --listen "127.0.0.1:$HTTP_PORT" --vault --host-key-file "$(key_file host "$DIV_HOST_KEY")" \
  --allow-owner "$DIV_OWNER" --custodian "$(IFS=,; echo "${CUSTODIAN_URLS[*]}")" --store "$STATE/store" --state-dir "$STATE/host" \
  --settle-interval-secs "${DIV_SETTLE_INTERVAL_SECS:-60}" --cache-dir "$STATE/cache" --web-dir web/dist \
  --payment-chain "$BOOK2" >"$STATE/logs/serve.log" 2>&1 &
echo $! >"$STATE/pids/serve.pid"
# it listens at once; /readyz answers 200 once every model it serves is loaded
wait_up "div serve" "$STATE/pids/serve.pid" "$STATE/logs/serve.log" "http://127.0.0.1:$HTTP_PORT/readyz"
env_set DIV_URL "http://127.0.0.1:$HTTP_PORT"
env_set DIV_MODEL all-minilm-l6-v2
env_set DIV_CHAT_MODEL smollm2-135m-instruct
env_set DIV_WEB_URL "http://127.0.0.1:$HTTP_PORT/"
set -a; . "$STATE/demo.env"; set +a
echo "Host: $DIV_URL serving $DIV_MODEL and $DIV_CHAT_MODEL (log: $STATE/logs/serve.log)"
echo "Web dApp: $DIV_WEB_URL (dev wallet: pick an anvil account; #1 is the model owner, #2 the demo user)"
echo
echo "== walk-through (each command below is run now) =="
run() { printf '$ %s\n' "$*"; "$@"; echo; }
run cast call "$DIV_MODEL_VAULT" "modelCount()(uint256)" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_PAYMENT_STREAM" "withdrawDelay()(uint64)" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_PAYMENT_STREAM" "isTokenAllowed(address)(bool)" "$DIV_USDC" --rpc-url "$DIV_RPC_URL"
run cast call "$DIV_USDC" "decimals()(uint8)" --rpc-url "$DIV_RPC_URL"
run div cid "$STATE/publish/all-minilm-l6-v2/model.divenc"
run cast call "$DIV_MODEL_VAULT" "isHostAuthorized(bytes32,address)(bool)" "$(cast call "$DIV_MODEL_VAULT" "modelIdAt(uint256)(bytes32)" 0 --rpc-url "$DIV_RPC_URL")" "$DIV_HOST" --rpc-url "$DIV_RPC_URL"
run curl -s "$DIV_URL/v1/models"
echo
model_id() { curl -s "$DIV_URL/v1/models" | python3 -c 'import json,sys; print(next(m["model_id"] for m in json.load(sys.stdin)["data"] if m["id"] == sys.argv[1]))' "$1"; }
MODEL_ID=$(model_id "$DIV_MODEL")
CHAT_MODEL_ID=$(model_id "$DIV_CHAT_MODEL")
echo "== a user pays for inference =="
# the demo user: 10 USDC deposited, 1 access token bought, a permit for up to 5 USDC signed
run div deposit --private-key "$DIV_USER_KEY" --amount 10 --mint
run div buy --private-key "$DIV_USER_KEY" --model-id "$MODEL_ID" --amount 1 --mint
run div permit --private-key "$DIV_USER_KEY" --url "$DIV_URL" --model "$DIV_MODEL" --max 5 --env-file "$STATE/demo.env"
set -a; . "$STATE/demo.env"; set +a
USER_BEFORE=$(cast call "$DIV_PAYMENT_STREAM" "getBalance(address,address)(uint256)" "$DIV_USER" "$DIV_USDC" --rpc-url "$DIV_RPC_URL" | cut -d' ' -f1)
run examples/curl_embeddings.sh
run .venv/bin/python examples/openai_embeddings.py
# text generation, streamed token by token: an access token and a permit for the chat model too
run div buy --private-key "$DIV_USER_KEY" --model-id "$CHAT_MODEL_ID" --amount 1 --mint
run div permit --private-key "$DIV_USER_KEY" --url "$DIV_URL" --model "$DIV_CHAT_MODEL" --max 5 --env-file "$STATE/demo.env" --env-var DIV_CHAT_API_KEY
set -a; . "$STATE/demo.env"; set +a
run .venv/bin/python examples/openai_chat_stream.py "What is the capital of France?"
# the same model paid on the second chain, in USDFC: the host keeps that chain's ledger apart
# and settles there too (it publishes itself on that chain's ModelVault once the model is loaded)
book2() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$BOOK2" "$1"; }
for _ in $(seq 1 120); do
  cast call "$(book2 modelVault)" "isHostServing(bytes32,address)(bool)" "$MODEL_ID" "$DIV_HOST" --rpc-url "$(book2 rpcUrl)" | grep -q true && break
  sleep 0.5
done
run div deposit --private-key "$DIV_USER_KEY" --addresses "$BOOK2" --token USDFC --amount 10 --mint
run div buy --private-key "$DIV_USER_KEY" --addresses "$BOOK2" --model-id "$MODEL_ID" --amount 1 --mint
run div permit --private-key "$DIV_USER_KEY" --addresses "$BOOK2" --token USDFC --url "$DIV_URL" --model "$DIV_MODEL" --max 5 --env-file "$STATE/demo.env" --env-var DIV_API_KEY_CHAIN2
set -a; . "$STATE/demo.env"; set +a
run curl -s -o /dev/null -w "%{http_code} paid on chain $CHAIN2\n" "$DIV_URL/v1/embeddings" -H "Authorization: Bearer $DIV_API_KEY_CHAIN2" -H 'content-type: application/json' -d "{\"model\":\"$DIV_MODEL\",\"input\":\"paid in USDFC\"}"
run curl -s -o /dev/null -w '%{http_code} without a key\n' "$DIV_URL/v1/embeddings" -d "{\"model\":\"$DIV_MODEL\",\"input\":\"hi\"}"
run div settle --now --url "$DIV_URL" --state-dir "$STATE/host"
run div balance --private-key "$DIV_USER_KEY"
run div earnings --private-key "$DIV_OWNER_KEY"
# settlement credited the models; the claim pays the owner (the access-token sales above paid the
# owner too, so the summary counts what the claim brought)
OWNER_BEFORE=$(cast call "$DIV_USDC" "balanceOf(address)(uint256)" "$DIV_OWNER" --rpc-url "$DIV_RPC_URL" | cut -d' ' -f1)
run div claim --private-key "$DIV_OWNER_KEY"
OWNER_AFTER=$(cast call "$DIV_USDC" "balanceOf(address)(uint256)" "$DIV_OWNER" --rpc-url "$DIV_RPC_URL" | cut -d' ' -f1)
run div claim --private-key "$DIV_OWNER_KEY" --addresses "$BOOK2"
USER_AFTER=$(cast call "$DIV_PAYMENT_STREAM" "getBalance(address,address)(uint256)" "$DIV_USER" "$DIV_USDC" --rpc-url "$DIV_RPC_URL" | cut -d' ' -f1)
GAS=$(curl -s "$DIV_URL/metrics" | awk '/^div_settle_gas_total/ {print $2}')
REQS=$(curl -s "$DIV_URL/metrics" | awk '/^div_settled_requests_total/ {print $2}')
python3 - "$OWNER_BEFORE" "$OWNER_AFTER" "$USER_BEFORE" "$USER_AFTER" "${GAS:-0}" "${REQS:-0}" <<'PY'
import sys
ob, oa, ub, ua, gas, reqs = (float(x) for x in sys.argv[1:])
print("== summary ==")
print(f"owner earned {(oa - ob) / 1e6:.6f} USDC, user paid {(ub - ua) / 1e6:.6f} USDC "
      f"(100 % to the owner), gas per request {gas / reqs if reqs else 0:.0f} over {reqs:.0f} requests")
PY
echo
echo "Address book: $STATE/addresses.json   Environment (with the demo user's DIV_API_KEY): $STATE/demo.env (set -a; . $STATE/demo.env; set +a)"
echo "Chains: $DIV_RPC_URL (chain id $DIV_CHAIN_ID) and $(book2 rpcUrl) (chain id $CHAIN2, address book $BOOK2), custodians $DIV_CUSTODIANS and host $DIV_URL, left running. Stop them with: make stop"
echo "Open the dApp: $DIV_WEB_URL"
