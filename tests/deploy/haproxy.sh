#!/usr/bin/env bash
# Replicas behind a real load balancer: three `div serve` processes serving MiniLM behind
# Debian's HAProxy (deploy/haproxy/haproxy.cfg, as an operator would run it, as a plain process
# of its own), 16 clients sending embeddings through it without pause. One replica is stopped
# with SIGTERM (it drains: /readyz 503 while it still serves, so HAProxy takes it out first): no
# request fails. Another is killed with SIGKILL: only requests it held fail, and once HAProxy's
# health check has taken it out (1 s) none does. The last replica serves everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
[ -x "$HAPROXY" ] || { echo "no $HAPROXY: run make bootstrap (it installs Debian's haproxy)" >&2; exit 1; }
DIV=${DIV_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/div}
[ -x "$DIV" ] || { echo "no div binary at $DIV: cargo build --bin div" >&2; exit 1; }
"$HAPROXY" -c -q -f deploy/haproxy/haproxy.cfg 2>/dev/null || true
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
model="build/models/all-minilm-l6-v2=plugins/target/wasm32-wasip2/release/div_embeddings.wasm"
replicas=()
for i in 1 2 3; do
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
DIV_LB_LISTEN=$lb DIV_REPLICA_1=${replicas[0]} DIV_REPLICA_2=${replicas[1]} DIV_REPLICA_3=${replicas[2]} \
  "$HAPROXY" -c -q -f deploy/haproxy/haproxy.cfg
DIV_LB_LISTEN=$lb DIV_REPLICA_1=${replicas[0]} DIV_REPLICA_2=${replicas[1]} DIV_REPLICA_3=${replicas[2]} \
  "$HAPROXY" -db -f deploy/haproxy/haproxy.cfg >"$work/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://$lb/readyz" >/dev/null && break; sleep 0.1; done
python3 - "$lb" "${pids[0]}" "${pids[1]}" <<'PY'
import json, os, signal, sys, threading, time, urllib.request, urllib.error
lb, drained_pid, killed_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = []  # (time, status)
lock = threading.Lock()
stop = threading.Event()
body = json.dumps({"model": "all-minilm-l6-v2", "input": "replicas behind a load balancer"}).encode()
def client():
    while not stop.is_set():
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
            results.append((time.monotonic(), status))
threads = [threading.Thread(target=client) for _ in range(16)]
t0 = time.monotonic()
for t in threads:
    t.start()
def window(a, b):
    with lock:
        return [s for (t, s) in results if a <= t - t0 < b]
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
assert len(bad(crash)) <= 16, f"more failures than requests in flight at the SIGKILL: {len(bad(crash))}"
assert not bad(after), f"failures after the health check took the dead replica out: {bad(after)}"
PY
# the drained replica finished what it held and exited cleanly
wait "${pids[0]}" || { echo "the drained replica exited with $?" >&2; cat "$work/replica1.log" >&2; exit 1; }
echo "haproxy: the drained replica exited 0"
