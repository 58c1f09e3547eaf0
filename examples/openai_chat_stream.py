#!/usr/bin/env python3
"""A streamed chat completion from a DIV host with the stock OpenAI Python client.

    set -a; . .div/demo.env; set +a
    .venv/bin/python examples/openai_chat_stream.py "What is the capital of France?"

Uses DIV_URL, DIV_CHAT_MODEL and DIV_CHAT_API_KEY (else DIV_API_KEY) from the environment. Prints each piece as it
arrives, then the usage and the host's receipt. With --json it prints one JSON line per chunk
(its arrival time in seconds and its text) and a final line with the usage and receipt: the
form the tests read."""
import json
import os
import sys
import time

from openai import OpenAI

args = [a for a in sys.argv[1:] if not a.startswith("--")]
as_json = "--json" in sys.argv
prompt = args[0] if args else "What is the capital of France?"
key = os.environ.get("DIV_CHAT_API_KEY") or os.environ.get("DIV_API_KEY", "unused")
client = OpenAI(base_url=os.environ["DIV_URL"] + "/v1", api_key=key)
start = time.monotonic()
stream = client.chat.completions.create(
    model=os.environ["DIV_CHAT_MODEL"],
    messages=[{"role": "user", "content": prompt}],
    max_tokens=int(os.environ.get("DIV_MAX_TOKENS", "48")),
    temperature=0,
    seed=42,
    stream=True,
    stream_options={"include_usage": True},
)
usage, receipt, finish = None, None, None
for chunk in stream:
    extra = chunk.model_extra or {}
    receipt = extra.get("receipt", receipt)
    if chunk.usage:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        finish = choice.finish_reason or finish
        piece = choice.delta.content or ""
        if as_json:
            print(json.dumps({"t": round(time.monotonic() - start, 4), "text": piece}), flush=True)
        else:
            print(piece, end="", flush=True)
if as_json:
    print(json.dumps({"done": True, "finish_reason": finish, "usage": usage, "receipt": receipt}))
else:
    print(f"\n[{finish}] usage {usage}")
    if receipt:
        print(f"receipt: paid {receipt['amount']}, permit total {receipt['cumulative_amount']} "
              f"over {receipt['cumulative_requests']} requests, signed by {receipt['host']}")
