#!/usr/bin/env bash
# Runs Tandem's whole test suite: formatting, lints, unit tests, the end-to-end tests that start
# real relays, agents and consoles (windows included, on Xvfb with Mesa's software renderer) on
# loopback, and a short run of every fuzz target. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> build binaries used by the end-to-end tests"
cargo build --workspace --bins --quiet

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install cargo-nextest --locked --quiet
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
echo "==> tests"
profile=default
[[ "${CI:-}" == "true" ]] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"

echo "==> fuzz smoke run"
scripts/fuzz-smoke.sh
