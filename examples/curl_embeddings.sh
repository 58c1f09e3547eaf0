#!/usr/bin/env bash
# Embeddings from a DIV host with plain curl:  set -a; . .div/demo.env; set +a; examples/curl_embeddings.sh
# A paid model needs DIV_API_KEY (`div permit` gets one); the host's signed receipt comes back in
# the body (`receipt`) and in the `x-div-receipt` header.
set -euo pipefail
auth=()
[ -n "${DIV_API_KEY:-}" ] && auth=(-H "authorization: Bearer $DIV_API_KEY")
curl -sS "$DIV_URL/v1/embeddings" "${auth[@]}" \
  -H 'content-type: application/json' \
  -d "{\"model\": \"$DIV_MODEL\", \"input\": [\"hello world\", \"DIV serves models it cannot read\"]}" |
  python3 -c '
import json, sys
r = json.load(sys.stdin)
if "error" in r:
    sys.exit("error: %s" % r["error"])
print(r["model"], [len(d["embedding"]) for d in r["data"]], "dims; usage", r["usage"])
rc = r.get("receipt")
if rc:
    print("receipt: paid %s (permit total %s over %s requests), signed by host %s"
          % (rc["amount"], rc["cumulative_amount"], rc["cumulative_requests"], rc["host"]))
'
