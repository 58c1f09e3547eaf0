# DIV: the two set-up commands are `make demo` and `make test`; everything else is a step of them.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(CURDIR)/contracts/node_modules/.bin:$(PATH)
export DIV_ANVIL := $(CURDIR)/contracts/node_modules/.bin/anvil
FORGE := cd contracts && forge
# the gas snapshot holds the deterministic tests: a fuzz or invariant run's gas depends on the
# inputs forge draws, which differ between a fresh clone and a warm build
SNAPSHOT_TESTS := --no-match-test 'testFuzz_|invariant_'

.PHONY: demo test check bench stop bootstrap build contracts artifacts fmt snapshot plugins web clippy-wasm

## demo: start a local chain with DIV deployed and walk through it (leaves it running; `make stop`)
demo: bootstrap contracts plugins web
	cargo build --bin div
	scripts/demo.sh

## test: every test — forge (unit, fuzz, invariant), cargo (unit, whole flows), linters
test: bootstrap
	tests/bootstrap/detect.sh
	$(FORGE) fmt --check
	$(FORGE) build --quiet
	contracts/tools/export-artifacts --check
	$(FORGE) test
	$(FORGE) snapshot --check $(SNAPSHOT_TESTS)
	scripts/slither.sh
	cargo fmt --all --check
	cargo fmt --manifest-path plugins/Cargo.toml --all --check
	cargo fmt --manifest-path tests/plugins/Cargo.toml --all --check
	cargo fmt --manifest-path guest-sdk/Cargo.toml --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	$(MAKE) --no-print-directory clippy-wasm
	$(MAKE) --no-print-directory plugins
	cargo test --workspace --locked --no-fail-fast
	cd web && npm run --silent lint && npm run --silent typecheck
	$(MAKE) --no-print-directory web
	cargo build --bin div --locked
	tests/deploy/check.sh
	tests/deploy/observability.sh
	tests/deploy/haproxy.sh
	scripts/web-e2e.sh

## check: the fast inner loop (format, lint, unit tests)
check:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(MAKE) --no-print-directory clippy-wasm
	cargo test --workspace --lib --bins
	$(FORGE) fmt --check

## bench: every benchmark; prints ratios and writes bench/results.json and bench/RESULTS.md
bench: bootstrap contracts
	rm -rf bench/out
	$(MAKE) --no-print-directory plugins
	cargo bench -p div-meter --locked
	cargo bench -p div-tests --locked
	cargo bench -p div-cli --bench soak --locked
	cargo build --bin div --locked
	tests/deploy/haproxy.sh --bench
	scripts/bench-report.py

## web: the dApp's production build (web/dist), which `div serve --web-dir` serves
web:
	cd web && npm run --silent build

stop:
	scripts/stop.sh

bootstrap:
	scripts/bootstrap.sh

contracts:
	$(FORGE) build --quiet

## artifacts: refresh host/chain/abi from the contracts (commit the result)
artifacts: contracts
	contracts/tools/export-artifacts

fmt:
	cargo fmt --all
	cargo fmt --manifest-path plugins/Cargo.toml --all
	cargo fmt --manifest-path tests/plugins/Cargo.toml --all
	cargo fmt --manifest-path guest-sdk/Cargo.toml
	$(FORGE) fmt

snapshot:
	$(FORGE) snapshot $(SNAPSHOT_TESTS)

## clippy-wasm: lint the guest SDK and the plugins for their own target (outside the workspace)
clippy-wasm:
	cargo clippy --manifest-path guest-sdk/Cargo.toml --target wasm32-wasip2 --target-dir plugins/target --locked -- -D warnings
	cargo clippy --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --target-dir plugins/target --all --locked -- -D warnings
	cargo clippy --manifest-path tests/plugins/Cargo.toml --target wasm32-wasip2 --target-dir tests/plugins/target --all --locked -- -D warnings

## plugins: the WebAssembly components (wasm32-wasip2), outside the host's build graph
plugins:
	cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --target-dir plugins/target --release --locked
	cargo build --manifest-path tests/plugins/Cargo.toml --target wasm32-wasip2 --target-dir tests/plugins/target --release --locked
