#!/usr/bin/env python3
"""Builds the int8 variant of DIV's MiniLM package from the F32 one, with ONNX Runtime's own
quantisation tools (dynamic int8: weights per output channel, activations per tensor at run time).

Plain dynamic quantisation of all-MiniLM-L6-v2 loses too much here (worst cosine against the F32
model 0.990 over the reference sentences): a few hidden channels carry activations far larger
than the rest, and one int8 scale per tensor crushes the others. Two steps keep it close:

1. Smoothing (SmoothQuant, Xiao et al. 2022): for every weight MatMul, each input channel j is
   divided by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (a Mul node before the MatMul) and the
   weight's row j multiplied by s_j. Exact in real arithmetic; it moves the outliers from the
   activations (quantised per tensor) into the weights (quantised per channel). max|x_j| comes
   from running the F32 graph on CALIBRATION below: generic sentences, not the test fixtures.
2. The output projections of attention and FFN (`encoder.layer.N.[attention.]output.dense`; the
   FFN one's input is the GELU output, the worst outliers) stay F32; the query, key, value and
   FFN input projections, 58 % of the weight multiply-adds, are int8.

Deterministic: same F32 package, same pinned packages -> same bytes. Idempotent like
make-minilm-model.py: does nothing when manifest.json records these inputs and its files match.

    .venv/bin/python scripts/make-minilm-int8.py [--src DIR] [--out DIR] [--force]
"""
import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
# the F32 package's script: its file helpers (hashing, atomic writes, the up-to-date check)
_F32_SCRIPT = Path(__file__).resolve().with_name("make-minilm-model.py")
_spec = importlib.util.spec_from_file_location("make_minilm_model", _F32_SCRIPT)
_f32 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_f32)
sha256_file, json_bytes, write_atomic, up_to_date = (
    _f32.sha256_file, _f32.json_bytes, _f32.write_atomic, _f32.up_to_date)
SRC = "all-minilm-l6-v2"
NAME = "all-minilm-l6-v2-int8"
ALPHA = 0.8
# MatMuls left in F32 (node names of make-minilm-model.py's graph): the two output projections of
# each layer, whose errors reach the residual stream directly (keeping only the FFN ones F32 gave
# a worst cosine of 0.9986; these twelve, 0.9992)
KEEP_F32 = [f"encoder.layer.{i}.{part}output.dense/matmul" for i in range(6) for part in ("", "attention.")]

CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "How do I reset my password?",
    "Stock markets fell sharply on Tuesday after the announcement.",
    "She sells sea shells by the sea shore.",
    "The mitochondria is the powerhouse of the cell.",
    "Please send the invoice to accounts@example.com by Friday.",
    "I love this product, it works great!",
    "Quantum computers use qubits instead of bits.",
    "What is the capital of France?",
    "def add(a, b): return a + b",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "1234567890 !@#$%^&*()",
    "Weather today: sunny with a high of 25 degrees.",
    "The committee approved the budget for the next fiscal year after a long debate.",
    "dogs",
    "Children are playing football in the park while their parents watch.",
    "Error: connection refused while contacting the database server on port 5432.",
    "The novel follows a young woman who leaves her village to study medicine in the city.",
    "Add two cups of flour, a pinch of salt and stir until smooth.",
]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def activation_maxima(model: onnx.ModelProto, inputs: list, tok: Tokenizer) -> dict:
    """Per-channel max |x| of each MatMul input named in `inputs`, over CALIBRATION."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in inputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = onnxruntime.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    maxima = {}
    for text in CALIBRATION:
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        for name, value in zip(names, sess.run(None, feed)):
            if name in inputs:
                m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima


def smooth(model: onnx.ModelProto, tok: Tokenizer) -> onnx.ModelProto:
    """SmoothQuant with ALPHA on every weight MatMul that will be quantised."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and n.name not in KEEP_F32:
            groups.setdefault(n.input[0], []).append(n)
    maxima = activation_maxima(model, list(groups), tok)
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = (np.power(np.maximum(maxima[x], 1e-5), ALPHA) / np.power(np.maximum(w_max, 1e-5), 1 - ALPHA))
        s = s.astype(np.float32)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}/smooth_inv")
        g.initializer.append(inv)
        smoothed = f"{x}/smoothed"
        mul = helper.make_node("Mul", [x, inv.name], [smoothed], name=f"{x}/smooth")
        for n, w in zip(nodes, weights):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
            n.input[0] = smoothed
        g.node.insert(list(g.node).index(nodes[0]), mul)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT / "build" / "models" / SRC))
    ap.add_argument("--out", default=str(ROOT / "build" / "models" / NAME))
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)

    src_manifest = json.loads((src / "manifest.json").read_text())
    graph_sha = next(f["sha256"] for f in src_manifest["files"] if f["name"] == "model.onnx")
    source = {
        "f32_model_sha256": graph_sha,
        "generator_sha256": sha256_file(Path(__file__).resolve()),
        "f32_generator_sha256": sha256_file(_F32_SCRIPT),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    if not args.force and up_to_date(out, source):
        print(f"make-minilm-int8: {out} is up to date")
        return
    if sha256_file(src / "model.onnx") != graph_sha:
        sys.exit(f"make-minilm-int8: {src}/model.onnx does not match its manifest (run make-minilm-model.py)")

    started = time.monotonic()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    model = smooth(onnx.load(str(src / "model.onnx")), tok)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        smoothed = Path(tmp) / "smoothed.onnx"
        quantized = Path(tmp) / "model.onnx"
        onnx.save(model, str(smoothed))
        quantize_dynamic(
            str(smoothed),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=KEEP_F32,
        )
        files = {"model.onnx": quantized.read_bytes()}
    for name in ("tokenizer.json", "config.json"):
        files[name] = (src / name).read_bytes()
    for name, data in files.items():
        write_atomic(out / name, data)

    manifest = {k: v for k, v in src_manifest.items() if k not in ("files", "source")}
    manifest["name"] = NAME
    manifest["quantization"] = {
        "method": "onnxruntime.quantization.quantize_dynamic, QInt8 weights per channel, "
                  "uint8 activations per tensor",
        "smoothing_alpha": ALPHA,
        "kept_f32": KEEP_F32,
    }
    manifest["files"] = [{"name": n, "size": len(d), "sha256": sha256_bytes(d)} for n, d in files.items()]
    manifest["source"] = source
    write_atomic(out / "manifest.json", json_bytes(manifest))
    print(f"make-minilm-int8: wrote {out} (model.onnx {len(files['model.onnx'])} bytes) "
          f"in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
