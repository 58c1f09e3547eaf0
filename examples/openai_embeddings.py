#!/usr/bin/env python3
"""Embeddings from a DIV host with the stock OpenAI Python client.

    set -a; . .div/demo.env; set +a
    .venv/bin/python examples/openai_embeddings.py

Uses DIV_URL, DIV_MODEL and DIV_API_KEY (from `div permit`) from the environment. The host's signed
receipt for the request comes back with the response."""
import math
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["DIV_URL"] + "/v1", api_key=os.environ.get("DIV_API_KEY", "unused"))
sentences = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "Interest rates rose again this quarter.",
]
raw = client.embeddings.with_raw_response.create(model=os.environ["DIV_MODEL"], input=sentences)
response = raw.parse()
receipt = getattr(response, "receipt", None) or (response.model_extra or {}).get("receipt")
vectors = [item.embedding for item in response.data]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


print(f"model {response.model}: {len(vectors)} vectors of {len(vectors[0])} dimensions, "
      f"{response.usage.prompt_tokens} prompt tokens")
for i in range(1, len(sentences)):
    print(f"  similarity(0, {i}) = {cosine(vectors[0], vectors[i]):.3f}   {sentences[i]!r}")
if receipt:
    print(f"  receipt: paid {receipt['amount']}, permit total {receipt['cumulative_amount']} "
          f"over {receipt['cumulative_requests']} requests (x-div-receipt: {len(raw.headers.get('x-div-receipt', ''))} bytes)")
