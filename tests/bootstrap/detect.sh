#!/usr/bin/env bash
# The bootstrap's "is it there" checks against fake roots: each must look for the exact file the
# build loads. The case that broke a fresh machine: libclang-cpp (the C++ API) present, the C
# library bindgen loads absent, so libclang-dev was never installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
fails=0 passes=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# a root with every tool present, then one thing taken away per case
full_root() {
  local r=$1
  mkdir -p "$r/usr/bin" "$r/usr/sbin" "$r/usr/lib/llvm-14/lib" "$r/usr/lib/x86_64-linux-gnu"
  for c in node npm curl ipfs_cid cmake c++ chromium systemd-analyze promtool prometheus redis-server; do
    printf '#!/bin/sh\n' >"$r/usr/bin/$c"
    chmod +x "$r/usr/bin/$c"
  done
  touch "$r/usr/lib/llvm-14/lib/libclang.so.1"
  printf '#!/bin/sh\n' >"$r/usr/sbin/haproxy"
  chmod +x "$r/usr/sbin/haproxy"
  mkdir -p "$r/usr/lib/postgresql/15/bin"
  for c in initdb postgres pg_isready; do
    printf '#!/bin/sh\n' >"$r/usr/lib/postgresql/15/bin/$c"
    chmod +x "$r/usr/lib/postgresql/15/bin/$c"
  done
}

needs() { DIV_BOOTSTRAP_ROOT=$1 scripts/bootstrap.sh --needs | tr '\n' ' '; }

expect() { # NAME ROOT WANT(package or "none")
  local got
  got=$(needs "$2")
  if [ "$3" = none ]; then
    [ -z "${got// /}" ] && ok "$1" || bad "$1" "expected nothing to install, got: $got"
  else
    [[ " $got " == *" $3 "* ]] && ok "$1" || bad "$1" "expected $3 to be requested, got: $got"
  fi
}
ok() { passes=$((passes + 1)); echo "PASS $1"; }
bad() { fails=$((fails + 1)); echo "FAIL $1: $2"; }

r=$tmp/complete; full_root "$r"
expect "a complete root needs nothing" "$r" none

r=$tmp/cpp-only; full_root "$r"
rm "$r/usr/lib/llvm-14/lib/libclang.so.1"
touch "$r/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14" "$r/usr/lib/llvm-14/lib/libclang-cpp.so.14"
expect "libclang-cpp without libclang.so requests libclang-dev" "$r" libclang-dev

r=$tmp/dev; full_root "$r"
rm "$r/usr/lib/llvm-14/lib/libclang.so.1"
touch "$r/usr/lib/llvm-14/lib/libclang.so" "$r/usr/lib/llvm-14/lib/libclang-cpp.so.14"
expect "libclang.so (libclang-dev) satisfies bindgen" "$r" none

r=$tmp/versioned; full_root "$r"
rm "$r/usr/lib/llvm-14/lib/libclang.so.1"
touch "$r/usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6"
expect "libclang-14.so.N (libclang1-14) satisfies bindgen" "$r" none

r=$tmp/no-chromium; full_root "$r"; rm "$r/usr/bin/chromium"
expect "no /usr/bin/chromium requests chromium" "$r" chromium

r=$tmp/no-cmake; full_root "$r"; rm "$r/usr/bin/cmake"
expect "no cmake requests cmake" "$r" cmake

r=$tmp/no-cxx; full_root "$r"; rm "$r/usr/bin/c++"
expect "no C++ compiler requests g++" "$r" g++

r=$tmp/no-systemd-analyze; full_root "$r"; rm "$r/usr/bin/systemd-analyze"
expect "no systemd-analyze requests systemd" "$r" systemd

r=$tmp/no-promtool; full_root "$r"; rm "$r/usr/bin/promtool"
expect "no /usr/bin/promtool requests prometheus" "$r" prometheus

r=$tmp/no-prometheus; full_root "$r"; rm "$r/usr/bin/prometheus"
expect "promtool without the server requests prometheus" "$r" prometheus

r=$tmp/no-haproxy; full_root "$r"; rm "$r/usr/sbin/haproxy"
expect "no /usr/sbin/haproxy requests haproxy" "$r" haproxy

r=$tmp/no-postgres; full_root "$r"; rm -r "$r/usr/lib/postgresql"
expect "no PostgreSQL server requests postgresql" "$r" postgresql

r=$tmp/pg-client-only; full_root "$r"; rm "$r/usr/lib/postgresql/15/bin/postgres"
expect "initdb without the server program requests postgresql" "$r" postgresql

r=$tmp/no-redis; full_root "$r"; rm "$r/usr/bin/redis-server"
expect "no /usr/bin/redis-server requests redis-server" "$r" redis-server

echo "bootstrap detection: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
