#!/usr/bin/env python3
"""Asks a DIV host's chat model plain questions with the stock OpenAI Python client, greedy,
and prints {"answers": [...]} as JSON: the flows test checks each holds the expected word.

    DIV_URL=http://127.0.0.1:8080 DIV_CHAT_MODEL=smollm2-135m-instruct python check_chat_answers.py Q1 Q2 ...
"""
import json
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ["DIV_URL"] + "/v1", api_key=os.environ.get("DIV_API_KEY", "unused"))
answers = []
for question in sys.argv[1:]:
    r = client.chat.completions.create(
        model=os.environ["DIV_CHAT_MODEL"],
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=40,
    )
    answers.append(r.choices[0].message.content)
print(json.dumps({"answers": answers}))
