#!/usr/bin/env bash
# Stops what `make demo` started (the pids in $DIV_STATE/pids, default .div), politely first.
set -uo pipefail
cd "$(dirname "$0")/.."
# the tools the bootstrap installs (cast, anvil, forge); the script runs on its own, not only under make
export PATH="$PWD/contracts/node_modules/.bin:$PATH"
quiet=${1:-}
STATE=${DIV_STATE:-.div}
shopt -s nullglob
for f in "$STATE"/pids/*.pid; do
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
    [ "$quiet" = --quiet ] || echo "stopped $(basename "$f" .pid) ($pid)"
  fi
  rm -f "$f"
done
# anvil is div dev's child; if div dev was killed hard, its anvil may be left
for env in "$STATE/demo.env" "$STATE"/chain-*/demo.env; do
  [ -f "$env" ] || continue
  apid=$(sed -n 's/^DIV_ANVIL_PID=//p' "$env")
  if [ -n "$apid" ] && kill -0 "$apid" 2>/dev/null && grep -q anvil "/proc/$apid/cmdline" 2>/dev/null; then
    kill -TERM "$apid" 2>/dev/null || true
  fi
done
exit 0
