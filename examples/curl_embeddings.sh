#!/usr/bin/env bash
# Embeddings from a DIV host with plain curl:  set -a; . .div/demo.env; set +a; examples/curl_embeddings.sh
set -euo pipefail
curl -sS "$DIV_URL/v1/embeddings" \
  -H 'content-type: application/json' \
  -d "{\"model\": \"$DIV_MODEL\", \"input\": [\"hello world\", \"DIV serves models it cannot read\"]}" |
  python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["model"], [len(d["embedding"]) for d in r["data"]], "dims; usage", r["usage"])'
