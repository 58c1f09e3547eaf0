#!/usr/bin/env bash
# The operator's observability files, checked by the tools that load them: Prometheus's config and
# alert rules (deploy/prometheus) with `promtool check` and the rules' unit tests with `promtool
# test rules`; the Grafana dashboard (deploy/grafana) parsed and every panel's queries present (the
# metric names both use are checked against the host's and custodian's expositions by cargo test).
# With --live HOST CUSTODIAN…, a real Prometheus (Debian's, as a plain process of its own)
# scrapes a running host and its custodians with these rules: every target up, each chain's
# `div_chain_up` read, the custodians' counters read, and every rule evaluated without error.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROMTOOL=${PROMTOOL:-/usr/bin/promtool}
PROMETHEUS=${PROMETHEUS:-/usr/bin/prometheus}
[ -x "$PROMTOOL" ] || { echo "no $PROMTOOL: run make bootstrap (it installs Debian's prometheus)" >&2; exit 1; }
"$PROMTOOL" check config deploy/prometheus/prometheus.yml
"$PROMTOOL" check rules deploy/prometheus/rules.yml
"$PROMTOOL" test rules deploy/prometheus/rules.test.yml
python3 - deploy/grafana/div-host.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
panels = d["panels"]
assert len(panels) >= 10, f"only {len(panels)} panels"
for p in panels:
    assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), f"panel {p['title']!r} has no query"
ids = [p["id"] for p in panels]
assert len(ids) == len(set(ids)), "panel ids repeat"
print(f"grafana dashboard {d['title']!r}: {len(panels)} panels, every one with its queries")
PY

[ "${1:-}" = --live ] || exit 0
shift
host=$1; shift
[ -x "$PROMETHEUS" ] || { echo "no $PROMETHEUS: run make bootstrap" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
targets() { local out="" t; for t in "$@"; do out+="\"$t\", "; done; echo "[${out%, }]"; }
cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/deploy/prometheus/rules.yml
scrape_configs:
  - job_name: div-host
    static_configs:
      - targets: $(targets "$host")
  - job_name: div-custodian
    static_configs:
      - targets: $(targets "$@")
YML
"$PROMETHEUS" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$port" >"$work/prometheus.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
python3 - "http://127.0.0.1:$port" "$#" <<'PY' || { echo "prometheus said:" >&2; tail -20 "$work/prometheus.log" >&2; exit 1; }
import json, sys, time, urllib.parse, urllib.request
base, custodians = sys.argv[1], int(sys.argv[2])
def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.load(r)["data"]
def query(q):
    return get("/api/v1/query?query=" + urllib.parse.quote(q))["result"]
deadline = time.time() + 60
while True:
    try:
        targets = get("/api/v1/targets")["activeTargets"]
        rules = [r for g in get("/api/v1/rules")["groups"] for r in g["rules"]]
        chains = {s["metric"]["chain_id"]: s["value"][1] for s in query("div_chain_up")}
        releases = query('div_custodian_requests_total{route="/v1/models/{model_id}/release"}')
        if (len(targets) == 1 + custodians and all(t["health"] == "up" for t in targets)
                and rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
                and chains and releases):
            break
    except OSError:
        pass
    assert time.time() < deadline, f"prometheus never saw everything: targets {targets if 'targets' in dir() else None}"
    time.sleep(0.5)
bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
assert not bad, f"rules that failed to evaluate: {bad}"
assert all(v == "1" for v in chains.values()), f"a chain is down: {chains}"
firing = [r["name"] for r in rules if r.get("state") == "firing"]
print(f"prometheus scraped the host and {custodians} custodians: chains up {sorted(chains)}, "
      f"{len(releases)} release series, {len(rules)} rules evaluated without error (firing: {firing or 'none'})")
PY
