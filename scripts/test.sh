#!/usr/bin/env bash
# Runs Tandem's whole test suite: formatting, lints, unit tests, and the end-to-end tests that start
# real relays (and, as they land, agents and consoles) on loopback. Installs what it needs first.
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
echo "==> tests"
profile=default
[[ "${CI:-}" == "true" ]] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
