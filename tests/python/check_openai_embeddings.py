#!/usr/bin/env python3
"""Test helper: the stock OpenAI client against a DIV host must reproduce sentence-transformers'
embeddings (cosine >= 0.9999 for every reference sentence), one by one and as a batch.
Prints one JSON line with the worst cosine; exits 1 on any miss."""
import json
import math
import os
import sys

from openai import OpenAI

reference = json.load(open(sys.argv[1]))["items"]
client = OpenAI(base_url=os.environ["DIV_URL"] + "/v1", api_key="test", max_retries=0)
model = os.environ["DIV_MODEL"]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


worst = 1.0
for item in reference:
    got = client.embeddings.create(model=model, input=item["input"]).data[0].embedding
    worst = min(worst, cosine(got, item["embedding"]))
batch = client.embeddings.create(model=model, input=[i["input"] for i in reference])
for got, item in zip(batch.data, reference):
    worst = min(worst, cosine(got.embedding, item["embedding"]))
try:
    client.embeddings.create(model="no-such-model", input="x")
    status = None
except Exception as e:  # openai.NotFoundError
    status = getattr(e, "status_code", None)
print(json.dumps({"worst_cosine": worst, "items": len(reference), "unknown_model_status": status}))
sys.exit(0 if worst >= 0.9999 and status == 404 else 1)
