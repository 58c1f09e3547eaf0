#!/usr/bin/env bash
# Replicas behind a real load balancer: three `div serve` processes serving MiniLM behind
# Debian's HAProxy (deploy/haproxy/haproxy.cfg, as an operator would run it, as a plain process
# of its own), 16 clients sending embeddings through it without pause. One replica is stopped
# with SIGTERM (it drains: /readyz 503 while it still serves, so HAProxy takes it out first): no
# request fails. Another is killed with SIGKILL: only requests sent to it before it died fail,
# and once HAProxy's health check has taken it out (1 s) none does. The last replica serves everything.
# With --bench (run by `make bench`): one replica, 32 clients for 10 s straight at it, then 10 s
# through HAProxy (the load generator both times); writes bench/out/lb.json (`lb_overhead_c32`).
set -euo pipefail
bench=${1:-}
cd "$(dirname "$0")/../.."
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
[ -x "$HAPROXY" ] || { echo "no $HAPROXY: run make bootstrap (it installs Debian's haproxy)" >&2; exit 1; }
DIV=${DIV_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/div}
[ -x "$DIV" ] || { echo "no div binary at $DIV: cargo build --bin div" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
model="build/models/all-minilm-l6-v2=plugins/target/wasm32-wasip2/release/div_embeddings.wasm"
replicas=()
n=3
[ "$bench" = --bench ] && n=1
for i in $(seq 1 "$n"); do
  p=$(port)
  "$DIV" serve --listen "127.0.0.1:$p" --model "$model" --drain-notice-secs 3 --cache-dir target/div-test-cache \
    >"$work/replica$i.log" 2>&1 &
  pids+=($!)
  replicas+=("127.0.0.1:$p")
done
for r in "${replicas[@]}"; do
  for _ in $(seq 1 600); do curl -sf "http://$r/readyz" >/dev/null && break; sleep 0.2; done
  curl -sf "http://$r/readyz" >/dev/null || { echo "replica $r never got ready" >&2; cat "$work"/replica*.log >&2; exit 1; }
done
lb=127.0.0.1:$(port)
# for the bench, the config's three servers are the one replica
export DIV_LB_LISTEN=$lb DIV_REPLICA_1=${replicas[0]} DIV_REPLICA_2=${replicas[1]:-${replicas[0]}} DIV_REPLICA_3=${replicas[2]:-${replicas[0]}}
"$HAPROXY" -c -q -f deploy/haproxy/haproxy.cfg
"$HAPROXY" -db -f deploy/haproxy/haproxy.cfg >"$work/haproxy.log" 2>&1 &
pids+=($!)
disown "${pids[@]:1}" 2>/dev/null || true  # a killed replica is this test's doing: no job notice
for _ in $(seq 1 100); do curl -sf "http://$lb/readyz" >/dev/null && break; sleep 0.1; done

if [ "$bench" = --bench ]; then
  load() { cargo bench -q -p div-tests --bench load --locked -- "http://$1" --model all-minilm-l6-v2 --clients 32 --secs 10 | tail -n 2; }
  direct=$(load "${replicas[0]}")
  through=$(load "$lb")
  python3 - "$direct" "$through" <<'PY'
import json, re, sys
from pathlib import Path
def parse(line):
    m = re.search(r"(\d+) ok, (\d+) errors .*: (\d+) req/s, p50 ([\d.]+) ms, p99 ([\d.]+) ms", line)
    assert m, f"no load result in {line!r}"
    ok, errors, rps, p50, p99 = m.groups()
    assert int(errors) == 0, f"errors under load: {line}"
    return float(rps), float(p50), float(p99)
d, t = parse(sys.argv[1]), parse(sys.argv[2])
out = Path("bench/out"); out.mkdir(parents=True, exist_ok=True)
keys = {"lb_overhead_c32": t[0] / d[0], "lb_rps_c32": t[0], "lb_direct_rps_c32": d[0], "lb_p99_ms_c32": t[2], "lb_direct_p99_ms_c32": d[2]}
(out / "lb.json").write_text(json.dumps(keys, indent=2) + "\n")
(out / "lb.md").write_text(
    "## Through HAProxy\n\nOne `div serve` replica (F32 MiniLM, free), 32 clients for 10 s each way (the load generator): "
    f"directly {d[0]:.0f} req/s (p50 {d[1]:.1f} ms, p99 {d[2]:.1f} ms), through HAProxy 2.6 with deploy/haproxy/haproxy.cfg "
    f"{t[0]:.0f} req/s (p50 {t[1]:.1f} ms, p99 {t[2]:.1f} ms): **{t[0] / d[0]:.3f}** (`lb_overhead_c32`, goal >= 0.95). "
    "HAProxy shares the two cores with the replica and the load generator.\n")
print(f"lb: direct {d[0]:.0f} req/s, through HAProxy {t[0]:.0f} req/s: {t[0] / d[0]:.3f}")
PY
  exit 0
fi
python3 - "$lb" "${pids[0]}" "${pids[1]}" <<'PY'
import json, os, signal, sys, threading, time, urllib.request, urllib.error
lb, drained_pid, killed_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = []  # (time answered, status, time sent)
lock = threading.Lock()
stop = threading.Event()
body = json.dumps({"model": "all-minilm-l6-v2", "input": "replicas behind a load balancer"}).encode()
def client():
    while not stop.is_set():
        sent = time.monotonic()
        req = urllib.request.Request(f"http://{lb}/v1/embeddings", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status = r.status
                r.read()
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError:
            status = 0
        with lock:
            results.append((time.monotonic(), status, sent))
threads = [threading.Thread(target=client) for _ in range(16)]
t0 = time.monotonic()
for t in threads:
    t.start()
def window(a, b):
    with lock:
        return [s for (t, s, _) in results if a <= t - t0 < b]
time.sleep(3)
os.kill(drained_pid, signal.SIGTERM)        # replica 1 drains
t_term = time.monotonic() - t0
time.sleep(6)
os.kill(killed_pid, signal.SIGKILL)         # replica 2 dies
t_kill = time.monotonic() - t0
time.sleep(6)
stop.set()
for t in threads:
    t.join()
before = window(0, t_term)
drain = window(t_term, t_kill)
crash = window(t_kill, t_kill + 2)
after = window(t_kill + 2, 1e9)
bad = lambda w: [s for s in w if s != 200]
print(f"haproxy: {len(results)} requests through 3 replicas; before {len(before)}, draining {len(drain)} "
      f"({len(bad(drain))} failed), at the SIGKILL {len(crash)} ({len(bad(crash))} failed), after {len(after)} ({len(bad(after))} failed)")
assert before and drain and after, "a phase served nothing"
assert not bad(before), f"failures before any stop: {bad(before)}"
assert not bad(drain), f"a draining replica failed requests: {bad(drain)}"
# only requests the killed replica held fail: sent before the SIGKILL, or in the moment it took
# the process to die (the kernel still accepts connections into its backlog, and HAProxy cannot
# tell those from requests the replica received, so it does not retry them). A request sent a
# second after the kill is never lost: a refused connection is retried on a live replica.
late = [(round(s - t0 - t_kill, 3), st) for (t, st, s) in results if st != 200 and s - t0 >= t_kill + 1]
assert not late, f"requests sent over a second after the SIGKILL failed (seconds after it, status): {late}"
assert not bad(after), f"failures after the health check took the dead replica out: {bad(after)}"
PY
# the drained replica finished what it held and exited cleanly
wait "${pids[0]}" || { echo "the drained replica exited with $?" >&2; cat "$work/replica1.log" >&2; exit 1; }
echo "haproxy: the drained replica exited 0"
