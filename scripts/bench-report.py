#!/usr/bin/env python3
"""Collects what each benchmark wrote to bench/out/ (NAME.json flat keys, NAME.md a section) into
bench/results.json and bench/RESULTS.md, with the machine they ran on. Every figure in them was
measured in the same `make bench` run."""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = root / "bench" / "out"
if not out.is_dir() or not any(out.glob("*.json")):
    sys.exit("bench-report: no results in bench/out; run `make bench`")

results = {}
sections = []
for f in sorted(out.glob("*.json")):
    data = json.loads(f.read_text())
    clash = set(results) & set(data)
    if clash:
        sys.exit(f"bench-report: {f.name} repeats keys {sorted(clash)}")
    results.update(data)
    md = f.with_suffix(".md")
    if md.exists():
        sections.append(md.read_text().strip())

def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "commit": rev,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
results_out = dict(sorted(results.items()))
results_out["machine_nproc"] = machine["nproc"]
(root / "bench" / "results.json").write_text(json.dumps(results_out, indent=2) + "\n")

head = (f"# DIV benchmark results\n\nMeasured by `make bench` in one run on {machine['nproc']} cores "
        f"({machine['cpu']}), commit {machine['commit']}, {machine['date']}.\n"
        "Every ratio compares against a baseline measured in the same run.\n")
# a section re-measured alone after a change (`cargo bench --bench NAME`, then this script) says
# so here, so no reader takes the page for one run
note = os.environ.get("DIV_BENCH_NOTE", "").strip()
if note:
    head = (f"# DIV benchmark results\n\nOn {machine['nproc']} cores ({machine['cpu']}). {note}\n"
            "Every ratio compares against a baseline measured in the same run as it.\n")
# the goals the issues name, judged on this run's numbers
GOALS = [
    ("gas_per_request_at_1000", "<=", 100, "settlement gas per request, one permit covering 1000 requests"),
    ("gas_per_request_batch100x100", "<=", 250, "settlement gas per request, 100 permits × 100 requests in one settleBatch (permits settled before)"),
    ("sandbox_ratio_b1", "<=", 1.02, "embeddings through the sandbox ÷ backend directly, batch 1"),
    ("sandbox_ratio_b32", "<=", 1.02, "embeddings through the sandbox ÷ backend directly, batch 32"),
    ("instantiate_p50_us", "<=", 10, "sandbox instantiate p50 (µs)"),
    ("pytorch_ratio_b32", ">=", 1.5, "sentences/s vs PyTorch sentence-transformers, batch 32"),
    ("decrypt_vs_openssl_1core", ">=", 0.9, "model decryption ÷ openssl AES-256-GCM, one core"),
    ("cold_start_ratio", "<=", 1.3, "encrypted cold start ÷ plaintext load of the same model"),
    ("gated_vs_ungated_c32", ">=", 0.95, "gated + metered + journaled ÷ ungated throughput, 32 clients"),
    ("charge_ratio_100k_vs_10", "<=", 1.1, "ledger work per paid request with 100 000 permits ÷ with 10"),
    ("soak_error_rate", "<", 0.001, "soak: failed requests outside the injected faults"),
    ("soak_lost_charges", "<=", 0, "soak: receipted charges missing from the payout"),
    ("llm_tokens_ratio", ">=", 0.95, "text generation tokens/s through HTTP + plugin ÷ llama-cpp-2 directly"),
    ("llm_batch4_vs_single", ">=", 2.0, "four concurrent streams (batched) ÷ one stream, aggregate tokens/s"),
    ("noop_plugin_vs_native_c16", ">=", 0.25, "a no-op plugin through the host ÷ native hyper, 16 clients"),
    ("concurrent64_vs_batch64", ">=", 0.9, "64 concurrent single-sentence requests ÷ one batch-64 request"),
    ("int8_min_cosine", ">=", 0.999, "int8 MiniLM: worst cosine against sentence-transformers"),
    ("int8_vs_f32_b32", ">=", 2.0, "int8 ÷ F32 MiniLM speed at batch 32, graphs called directly"),
    ("paid_rps_c64_int8", ">=", 1000, "full paid path, 64 clients, int8 MiniLM (req/s on these cores)"),
    ("lb_overhead_c32", ">=", 0.95, "through HAProxy ÷ straight to the replica, 32 clients"),
    ("pg_ledger_vs_sled_c32", ">=", 0.9, "paid throughput with the ledger in PostgreSQL ÷ sled, 32 clients"),
    ("cache_hit_vs_miss_c32", ">=", 5, "a result cache hit ÷ a miss, 32 clients (a hit skips the sandbox)"),
]
rows = ["| goal | this run | target | verdict |", "|---|---:|---:|---|"]
for key, op, target, what in GOALS:
    if key not in results:
        rows.append(f"| {what} (`{key}`) | not measured | {op} {target} | not measured |")
        continue
    v = results[key]
    ok = {"<=": v <= target, "<": v < target, ">=": v >= target, ">": v > target}[op]
    rows.append(f"| {what} (`{key}`) | {v:.3f} | {op} {target} | {'met' if ok else '**missed**'} |")
goals = "## Goals\n\n" + "\n".join(rows) + "\n"
(root / "bench" / "RESULTS.md").write_text(head + "\n" + goals + "\n" + "\n\n".join(sections) + "\n")
print(f"bench-report: {len(results)} keys -> bench/results.json, bench/RESULTS.md")
for k, v in sorted(results.items()):
    print(f"  {k:<36} {v}")
