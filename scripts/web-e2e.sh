#!/usr/bin/env bash
# The dApp in a real browser against the real stack: runs `scripts/demo.sh` (anvil, contracts,
# three custodians, MiniLM published encrypted, a metered host serving web/dist) on ports of its
# own beside any running demo, drives it with Playwright on Debian's chromium, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
# the tools the bootstrap installs (cast, anvil, forge); the script runs on its own, not only under make
export PATH="$PWD/contracts/node_modules/.bin:$PATH"
export DIV_STATE=target/web-e2e/state DIV_RPC_PORT=18545 DIV_HTTP_PORT=18080 DIV_CUSTODIAN_PORT_BASE=17100
# the test settles by hand to watch the owner's earnings rise; no timer may settle first
export DIV_SETTLE_INTERVAL_SECS=900
out=web/e2e/artifacts
rm -rf "$DIV_STATE" "$out"
mkdir -p "$DIV_STATE" "$out"
trap 'scripts/stop.sh --quiet' EXIT
# the demo must run on its own, not only under make: start it with a PATH that lacks the tools
# the bootstrap installs (it puts them on PATH itself)
bare_path=$(printf '%s' "$PATH" | tr ':' '\n' | grep -v 'node_modules/.bin' | paste -sd:)
if ! env PATH="$bare_path" scripts/demo.sh >"$out/demo.log" 2>&1; then
  echo "web e2e: the stack did not come up; scripts/demo.sh said:" >&2
  tail -n 60 "$out/demo.log" >&2
  exit 1
fi
set -a; . "$DIV_STATE/demo.env"; set +a
# three more hosts the owner authorised for the F32 MiniLM, each lying in its registration: one
# at a URL where nothing answers, one at this host's URL under another address, one at a
# javascript: "URL"; the model page must list them without trusting any of them
model_id=$(cast call "$DIV_MODEL_VAULT" "modelIdOf(address,string)(bytes32)" "$DIV_OWNER" "$DIV_MODEL" --rpc-url "$DIV_RPC_URL")
for spec in "0x$(printf '1%.0s' $(seq 64))|http://127.0.0.1:9/" "0x$(printf '2%.0s' $(seq 64))|$DIV_URL" "0x$(printf '3%.0s' $(seq 64))|javascript:alert(document.domain)"; do
  key=${spec%%|*} where=${spec#*|}
  addr=$(cast wallet address --private-key "$key")
  cast rpc anvil_setBalance "$addr" 0xDE0B6B3A7640000 --rpc-url "$DIV_RPC_URL" >/dev/null
  cast send "$DIV_MODEL_VAULT" "authorizeHost(bytes32,address)" "$model_id" "$addr" --private-key "$DIV_OWNER_KEY" --rpc-url "$DIV_RPC_URL" >/dev/null
  cast send "$DIV_MODEL_VAULT" "registerHost(string,bytes32[])" "$where" "[$model_id]" --private-key "$key" --rpc-url "$DIV_RPC_URL" >/dev/null
done
export DIV_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/div DIV_HOST_STATE=$PWD/$DIV_STATE/host
# the int8 MiniLM becomes a Data DAO's: anvil accounts #7 (the browser's member) and #8 buy 5
# tokens each, the owner hands the model over, #8 proposes a price change; #7 votes in the page
anvil7=0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356
anvil8=0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97
book=$DIV_STATE/addresses.json
DIV_DAO_MODEL_ID=$(cast call "$DIV_MODEL_VAULT" "modelIdOf(address,string)(bytes32)" "$DIV_OWNER" "$DIV_MODEL-int8" --rpc-url "$DIV_RPC_URL")
export DIV_DAO_MODEL_ID
for k in "$anvil7" "$anvil8"; do
  "$DIV_BIN" buy --private-key "$k" --model-id "$DIV_DAO_MODEL_ID" --amount 5 --mint --addresses "$book" >/dev/null
done
"$DIV_BIN" dao create --private-key "$DIV_OWNER_KEY" --model-id "$DIV_DAO_MODEL_ID" --voting-delay-secs 1 \
  --voting-period-secs 3600 --timelock-delay-secs 60 --addresses "$book" >/dev/null
tick() { cast rpc evm_increaseTime "$1" --rpc-url "$DIV_RPC_URL" >/dev/null; cast rpc evm_mine --rpc-url "$DIV_RPC_URL" >/dev/null; }
tick 2
"$DIV_BIN" dao propose --private-key "$anvil8" --model-id "$DIV_DAO_MODEL_ID" --set-price 0.0004 \
  --description "Lower the int8 price to 0.0004 USDC" --addresses "$book" >/dev/null
tick 2
node web/e2e/run.mjs
# the same stack watched by a real Prometheus with the operator's rules (deploy/prometheus)
tests/deploy/observability.sh --live "127.0.0.1:$DIV_HTTP_PORT" \
  "127.0.0.1:$((DIV_CUSTODIAN_PORT_BASE + 1))" "127.0.0.1:$((DIV_CUSTODIAN_PORT_BASE + 2))" "127.0.0.1:$((DIV_CUSTODIAN_PORT_BASE + 3))"
