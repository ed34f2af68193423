#!/usr/bin/env bash
# Runs Tandem's whole test suite: formatting, lints, unit tests, the end-to-end tests that start
# real relays, agents and consoles (windows included, on Xvfb with Mesa's software renderer) on
# loopback, and a short run of every fuzz target. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage's header says how long the suite has run, so a slow CI run shows where time went.
stage() { printf '==> %s  [%dm%02ds]\n' "$1" $((SECONDS / 60)) $((SECONDS % 60)); }
stage "system packages"
scripts/deps.sh

stage "cargo fmt --check"
cargo fmt --all --check

stage "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

stage "build binaries used by the end-to-end tests"
cargo build --workspace --bins --quiet

if ! cargo nextest --version >/dev/null 2>&1; then
  stage "installing cargo-nextest"
  cargo install cargo-nextest --locked --quiet
fi
if ! cargo deb --version >/dev/null 2>&1; then
  stage "installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
stage "tests"
profile=default
[[ "${CI:-}" == "true" ]] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"

stage "fuzz smoke run"
scripts/fuzz-smoke.sh
stage "done"
