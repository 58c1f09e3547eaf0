#!/usr/bin/env python3
"""Reference renderings of chat templates, computed once with Jinja2 exactly as Hugging Face
`transformers` renders them (`ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`, `raise_exception`), kept in tests/fixtures/chat/ for the host's own
renderer (minijinja) to match. Not run by the tests: they read the fixtures.

SmolLM2's template is read from its GGUF (`tokenizer.chat_template`, via the `gguf` reader in
this script's own minimal parser); the Gemma, Llama 3 and Phi-3 templates are those families'
turn formats as written in their tokenizer configs, to show the renderer takes each dialect.

    python3 -m venv /tmp/j2 && /tmp/j2/bin/pip install jinja2==3.1.6
    /tmp/j2/bin/python scripts/make-chat-fixtures.py
"""
import hashlib
import json
import struct
import sys
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "chat"

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "  And of Italy?  "},
]


def gguf_string(path: Path, key: str) -> str:
    """The string value of `key` in a GGUF file's metadata (GGUF v2/v3)."""
    with path.open("rb") as f:
        magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
        assert magic == b"GGUF" and version >= 2, "not GGUF v2+"
        _tensors, kvs = struct.unpack("<QQ", f.read(16))

        def s():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8")

        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def skip(t):
            if t == 8:
                s()
            elif t == 9:
                (et,) = struct.unpack("<I", f.read(4))
                (n,) = struct.unpack("<Q", f.read(8))
                for _ in range(n):
                    skip(et)
            else:
                f.read(sizes[t])

        for _ in range(kvs):
            k = s()
            (t,) = struct.unpack("<I", f.read(4))
            if k == key and t == 8:
                return s()
            skip(t)
    raise KeyError(key)


def render(template: str, messages, bos: str, eos: str) -> str:
    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def main() -> int:
    smol = gguf_string(ROOT / "build/models/smollm2-135m-instruct/model.gguf", "tokenizer.chat_template")
    families = {
        "smollm2": (smol, "<|im_start|>", "<|im_end|>", CONVERSATION),
        # Gemma has no system role: the template folds it into the first user turn
        "gemma": (GEMMA, "<bos>", "<eos>", CONVERSATION),
        "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", CONVERSATION),
        "phi3": (PHI3, "<s>", "<|endoftext|>", CONVERSATION),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (tpl, bos, eos, msgs) in families.items():
        fixture = {
            "template": tpl,
            "template_sha256": hashlib.sha256(tpl.encode()).hexdigest(),
            "bos_token": bos,
            "eos_token": eos,
            "messages": msgs,
            "add_generation_prompt": True,
            "rendered": render(tpl, msgs, bos, eos),
            "by": "jinja2 3.1.6, ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)",
        }
        (OUT / f"{name}.json").write_text(json.dumps(fixture, indent=2, ensure_ascii=False) + "\n")
        print(f"{name}: {len(fixture['rendered'])} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
