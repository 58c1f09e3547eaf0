#!/usr/bin/env python3
"""Checks the model package made by scripts/make-minilm-model.py against embeddings that
sentence-transformers (PyTorch) produced for the same weights.

It does what DIV's host will do with the package: verify the files against manifest.json, load
tokenizer.json as it is (its embedded truncation/padding settings are part of what is checked),
run model.onnx on onnxruntime's CPU provider, mean-pool with the attention mask, L2-normalise.
Every reference sentence is run alone and then all together as one padded batch; each must reach
--min-cosine against the reference, and the batched vectors must equal the single ones (padding
must not leak into the result). Exits non-zero on any failure.

    .venv/bin/python scripts/check-minilm-model.py [--model DIR] [--reference FILE]
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
# shared/ sits beside the repo, both here and in CI's fresh clone.
DEFAULT_REFERENCE = ROOT.parent / "shared" / "fixtures" / "minilm" / "reference.json"
# Batched vs single runs of the same sentence differ only by float summation order.
BATCH_TOLERANCE = 1e-5


def fail(msg):
    sys.exit(f"check-minilm-model: FAIL: {msg}")


def verify_files(model_dir: Path) -> dict:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for f in manifest["files"]:
        data = (model_dir / f["name"]).read_bytes()
        if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
            fail(f"{f['name']} does not match manifest.json")
    return manifest


def load_tokenizer(path: Path, manifest: dict) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    # The host will rely on the file's own settings, so check them rather than override them.
    trunc, pad = tok.truncation, tok.padding
    if not trunc or trunc["max_length"] != manifest["max_seq_length"]:
        fail(f"tokenizer.json truncation is {trunc}, want max_length "
             f"{manifest['max_seq_length']}")
    if not pad or pad["length"] is not None or pad["pad_id"] != 0:
        fail(f"tokenizer.json padding is {pad}, want pad-to-longest with [PAD]=0")
    return tok


def embed(session, manifest, encodings) -> np.ndarray:
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    assert [i["name"] for i in manifest["inputs"]] == list(feeds)
    (hidden,) = session.run([manifest["outputs"][0]["name"]], feeds)
    # Mean pooling over real tokens only (sentence-transformers' Pooling, mean mode) ...
    mask = feeds["attention_mask"][:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    # ... then Normalize (L2), as the manifest says.
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "build" / "models" / "all-minilm-l6-v2"))
    ap.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    ap.add_argument("--min-cosine", type=float, default=0.9999)
    args = ap.parse_args()
    model_dir = Path(args.model)

    manifest = verify_files(model_dir)
    tok = load_tokenizer(model_dir / "tokenizer.json", manifest)
    ref = json.loads(Path(args.reference).read_text())
    if ref.get("max_seq_length") != manifest["max_seq_length"]:
        fail(f"reference max_seq_length {ref.get('max_seq_length')} != manifest's")
    items = ref["items"]
    texts = [it["input"] for it in items]
    want = np.array([it["embedding"] for it in items], dtype=np.float64)
    if want.shape[1] != manifest["dimensions"]:
        fail(f"reference has {want.shape[1]} dimensions, manifest {manifest['dimensions']}")

    # Both the fully optimised graph (what the host runs by default, with onnxruntime's
    # attention/GELU/LayerNorm fusions) and the graph exactly as written.
    levels = {
        "optimised": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "unoptimised": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    worst = 1.0
    for label, level in levels.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        session = ort.InferenceSession(str(model_dir / "model.onnx"), opts,
                                       providers=["CPUExecutionProvider"])

        singles = []
        for text, ref_vec in zip(texts, want):
            enc = tok.encode(text)
            if len(enc.ids) > manifest["max_seq_length"]:
                fail(f"encoding of {text[:40]!r} has {len(enc.ids)} tokens, not truncated")
            vec = embed(session, manifest, [enc])[0]
            c = cosine(vec, ref_vec)
            worst = min(worst, c)
            err = float(np.abs(vec - ref_vec).max())
            print(f"  {label:11} cos={c:.8f} max|d|={err:.1e} tokens={len(enc.ids):3d} "
                  f"{text[:44]!r}")
            if c < args.min_cosine:
                fail(f"cosine {c:.8f} < {args.min_cosine} for {text[:60]!r}")
            singles.append(vec)

        batch_encs = tok.encode_batch(texts)
        batch = embed(session, manifest, batch_encs)
        seq = len(batch_encs[0].ids)
        for text, vec, single, ref_vec in zip(texts, batch, singles, want):
            c = cosine(vec, ref_vec)
            worst = min(worst, c)
            if c < args.min_cosine:
                fail(f"batched cosine {c:.8f} < {args.min_cosine} for {text[:60]!r}")
            diff = float(np.abs(vec - single).max())
            if diff > BATCH_TOLERANCE:
                fail(f"batched vs single differ by {diff:.2e} for {text[:60]!r}")
        max_diff = float(np.abs(batch - np.array(singles)).max())
        print(f"  {label:11} batch of {len(texts)} padded to {seq}: "
              f"max |batch - single| = {max_diff:.2e}")

    print(f"check-minilm-model: OK, {len(texts)} sentences, min cosine {worst:.10f} "
          f"(1 - cos = {1 - worst:.1e}; threshold {args.min_cosine})")


if __name__ == "__main__":
    main()
