#!/usr/bin/env python3
"""Builds the tiny ONNX graph the host's fault tests run misbehaving plugins against
(build/models/tiny-echo): input `input_ids` int64 [batch, seq] -> output `last_hidden_state`
float32 [batch, seq] (the ids cast to float). Deterministic; rebuilt only when missing."""
import hashlib
import json
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/models/tiny-echo")
out.mkdir(parents=True, exist_ok=True)
graph = helper.make_graph(
    [helper.make_node("Cast", ["input_ids"], ["last_hidden_state"], to=TensorProto.FLOAT)],
    "tiny-echo",
    [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
    [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq"])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="div")
model.ir_version = 8
onnx.checker.check_model(model)
data = model.SerializeToString(deterministic=True)
(out / "model.onnx").write_bytes(data)
manifest = {
    "name": "tiny-echo",
    "task": "embeddings",
    "encoding": "onnx",
    "graph": "model.onnx",
    "max_seq_length": 64,
    "limits": {"memory_mib": 64, "deadline_ms": 1000},
    "files": [{"name": "model.onnx", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"wrote {out}")
