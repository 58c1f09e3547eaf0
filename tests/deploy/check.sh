#!/usr/bin/env bash
# The self-hosting recipe, as far as this machine allows (no systemd as PID 1, no VM):
# 1. scripts/release.sh packs this tree's div (the debug build) into a release tarball;
# 2. the script cloud-init writes (deploy/cloud-init.yaml) runs as at first boot, fetching that
#    tarball by URL (file://), checking its SHA-256 and installing it under a scratch root
#    (DIV_ROOT): /opt/div, /etc/div, /etc/systemd/system;
# 3. the installed units pass `systemd-analyze verify` (no warning allowed) and score at most 2.0
#    on `systemd-analyze security --offline` ("OK"); the installed div runs and takes the
#    installed config files (`--config`);
# 4. the installed div custodian, configured by a file alone, listens where the file says;
# 5. a tampered tarball is refused by the SHA-256 check.
# What is not tested here: booting a VM and starting the units under systemd.
set -euo pipefail
cd "$(dirname "$0")/../.."
div=${DIV_BIN:-${CARGO_TARGET_DIR:-target}/debug/div}
[ -x "$div" ] || { echo "deploy check: $div missing (cargo build --bin div)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "deploy check: $*" >&2; exit 1; }

scripts/release.sh --bin "$div" --out "$tmp/rel/div.tar.gz" >/dev/null
sha=$(cut -d' ' -f1 "$tmp/rel/div.tar.gz.sha256")

# the first-boot script, exactly as cloud-init writes it
awk '/^    content: \|/{on=1; next} on && /^runcmd:/{on=0} on{sub(/^      /, ""); print}' deploy/cloud-init.yaml >"$tmp/first-boot.sh"
grep -q 'install.sh' "$tmp/first-boot.sh" || fail "no install step found in deploy/cloud-init.yaml"
root="$tmp/root"
DIV_ROOT="$root" DIV_RELEASE_URL="file://$tmp/rel/div.tar.gz" DIV_RELEASE_SHA256="$sha" DIV_ROLE=both \
  bash "$tmp/first-boot.sh" >"$tmp/boot.log" 2>&1 || { cat "$tmp/boot.log"; fail "the first-boot script failed"; }
for f in opt/div/bin/div opt/div/lib/libonnxruntime.so opt/div/plugins/div_embeddings.wasm \
         etc/div/div.toml etc/div/custodian.toml \
         etc/systemd/system/div-host.service etc/systemd/system/div-custodian.service; do
  [ -e "$root/$f" ] || fail "$f was not installed"
done
"$root/opt/div/bin/div" --version >/dev/null || fail "the installed div does not run"

# every setting of the shipped config files names a flag of its command (their values are parsed
# by the unit test config_file::the_shipped_config_files_parse_as_the_real_commands)
for cmd in serve:div.toml custodian:custodian.toml; do
  out=$("$root/opt/div/bin/div" "${cmd%%:*}" --config "$root/etc/div/${cmd#*:}" --help 2>&1) \
    || { echo "$out"; fail "div ${cmd%%:*} refuses ${cmd#*:}"; }
done
echo 'listn = "x"' >"$tmp/bad.toml"
if out=$("$root/opt/div/bin/div" serve --config "$tmp/bad.toml" 2>&1); then fail "an unknown setting was accepted"; fi
grep -q "unknown setting \`listn\`" <<<"$out" || fail "an unknown setting was not named: $out"

# a real process configured by a file only: the installed div custodian listens where it says
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$tmp/addresses.json" <<JSON
{"chainId": 31337, "rpcUrl": "http://127.0.0.1:9", "governance": "0x0000000000000000000000000000000000000001",
 "modelVault": "0x0000000000000000000000000000000000000002", "paymentStream": "0x0000000000000000000000000000000000000003",
 "accessTokenImplementation": "0x0000000000000000000000000000000000000004", "stablecoins": [], "deployedAtBlock": 0}
JSON
printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s/custodian"\naddresses = "%s/addresses.json"\n' "$port" "$tmp" "$tmp" >"$tmp/custodian.toml"
DIV_CUSTODIAN_KEY=0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d \
  "$root/opt/div/bin/div" custodian --config "$tmp/custodian.toml" >"$tmp/custodian.log" 2>&1 &
cpid=$!
up=""
for _ in $(seq 1 600); do
  if [ "$(curl -s "http://127.0.0.1:$port/healthz" 2>/dev/null)" = ok ]; then up=1; break; fi
  sleep 0.1
done
kill "$cpid" 2>/dev/null || true
wait "$cpid" 2>/dev/null || true
[ -n "$up" ] || { cat "$tmp/custodian.log"; fail "div custodian --config did not listen where its file says"; }

# the units, against the installed tree
for u in div-host div-custodian; do
  unit="$tmp/$u.service"
  sed "s|/opt/div/bin/div|$root/opt/div/bin/div|" "$root/etc/systemd/system/$u.service" >"$unit"
  out=$(systemd-analyze verify "$unit" 2>&1) || { echo "$out"; fail "$u.service does not verify"; }
  [ -z "$out" ] || { echo "$out"; fail "$u.service verifies with warnings"; }
  score=$(systemd-analyze security --offline=yes "$unit" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || fail "no security score for $u.service"
  python3 -c "import sys; sys.exit(0 if float('$score') <= 2.0 else 1)" || fail "$u.service exposure $score > 2.0"
  echo "deploy check: $u.service verifies, exposure $score"
done

# a tarball that is not the release is refused before anything is installed
cp "$tmp/rel/div.tar.gz" "$tmp/rel/evil.tar.gz"
printf 'x' >>"$tmp/rel/evil.tar.gz"
if DIV_ROOT="$tmp/root2" DIV_RELEASE_URL="file://$tmp/rel/evil.tar.gz" DIV_RELEASE_SHA256="$sha" \
  bash "$tmp/first-boot.sh" >/dev/null 2>&1; then fail "a tampered release was installed"; fi
[ ! -e "$tmp/root2/opt/div" ] || fail "a tampered release left files behind"
echo "deploy check: release packed, first-boot script installed it under a scratch root, units verified, tampering refused"
