#!/usr/bin/env bash
# A release tarball for a VM (what deploy/cloud-init.yaml and deploy/install.sh install):
# div (release build), ONNX Runtime's libonnxruntime.so from the pinned wheel, the plugins, the
# web dApp and deploy/ (systemd units, config files, install.sh), with its SHA-256 beside it.
#
#   scripts/release.sh [--bin PATH] [--out FILE]
#
# --bin packs an already built div (tests pack the debug build; a release is `cargo build
# --release`). Needs `make bootstrap` (the venv with onnxruntime) and `make plugins`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
bin=""
out="dist/div-$version-linux-$(uname -m).tar.gz"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "release.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  cargo build --release --locked --bin div
  bin="${CARGO_TARGET_DIR:-target}/release/div"
fi
ort=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | sort | tail -1)
[ -n "$ort" ] || { echo "release.sh: no libonnxruntime.so in .venv (run make bootstrap)" >&2; exit 1; }
plugins=(plugins/target/wasm32-wasip2/release/div_embeddings.wasm plugins/target/wasm32-wasip2/release/div_chat.wasm)
for p in "${plugins[@]}"; do [ -f "$p" ] || { echo "release.sh: $p missing (run make plugins)" >&2; exit 1; }; done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/div/bin" "$stage/div/lib" "$stage/div/plugins" "$stage/div/web"
install -m 0755 "$bin" "$stage/div/bin/div"
install -m 0644 "$ort" "$stage/div/lib/"
ln -s "$(basename "$ort")" "$stage/div/lib/libonnxruntime.so"
install -m 0644 "${plugins[@]}" "$stage/div/plugins/"
if [ -d web/dist ]; then cp -r web/dist/. "$stage/div/web/"; fi
cp -r deploy "$stage/div/deploy"
mkdir -p "$(dirname "$out")"
tar -C "$stage" --owner=0 --group=0 -czf "$out" div
(cd "$(dirname "$out")" && sha256sum "$(basename "$out")" >"$(basename "$out").sha256")
echo "release.sh: wrote $out ($(du -h "$out" | cut -f1)), sha256 $(cut -d' ' -f1 "$out.sha256")"
