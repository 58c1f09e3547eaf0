#!/usr/bin/env bash
# Static analysis of the contracts with Slither (pinned in scripts/requirements-slither.txt,
# installed by the bootstrap into .venv-slither), through forge and the project's solc wrapper.
# Fails on any High finding, and on any Medium that contracts/slither-triage.json does not list
# with its reason; prints the Lows and Informationals for the record.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/contracts/node_modules/.bin:$PATH"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=$tmp/slither.json
# Slither's forge build (sources only, --force) goes to a directory of its own: contracts/out keeps
# the test artifacts other tests load (TestWallet), whatever order the steps run in
(cd contracts && FOUNDRY_OUT="$tmp/out" FOUNDRY_CACHE_PATH="$tmp/cache" \
  ../.venv-slither/bin/slither . --exclude-dependencies --json "$out" >/dev/null 2>&1) || true
python3 - "$out" contracts/slither-triage.json <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
if not report.get("success", False):
    sys.exit(f"slither did not run: {report.get('error')}")
triaged = {(t["check"], t["function"]) for t in json.load(open(sys.argv[2]))["triaged"]}
bad, counts = [], {}
for r in report["results"].get("detectors", []):
    impact, check = r["impact"], r["check"]
    name = r["elements"][0].get("name", "?") if r.get("elements") else "?"
    counts[impact] = counts.get(impact, 0) + 1
    where = r.get("first_markdown_element", "")
    if impact == "High" or (impact == "Medium" and (check, name) not in triaged):
        bad.append(f"{impact} {check} {name} {where}")
print("slither: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; {len(triaged)} Medium triaged in contracts/slither-triage.json")
if bad:
    print("slither: untriaged findings:\n  " + "\n  ".join(bad))
    sys.exit(1)
PY
