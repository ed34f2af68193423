#!/usr/bin/env bash
# A short run of every fuzz target over its committed corpus (the CI smoke run; the long runs are
# in the closing notes and fuzz/README.md). Fails on any crash, leak or timeout libFuzzer reports.
# Usage: scripts/fuzz-smoke.sh [seconds per target]   (default 20; TANDEM_SKIP_FUZZ=1 skips)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${TANDEM_SKIP_FUZZ:-}" ]]; then
  echo "==> fuzz smoke run skipped (TANDEM_SKIP_FUZZ)"
  exit 0
fi
SECS="${1:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
if ! command -v clang++ >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "==> installing clang (OpenH264 is built with libFuzzer's coverage)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang >/dev/null; }
  else
    echo "fuzz: clang++ is needed (sudo apt-get install clang)" >&2
    exit 1
  fi
fi
cd fuzz
# cargo-fuzz needs nightly flags (-Z sanitizer); RUSTC_BOOTSTRAP lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1
# cargo-fuzz instruments Rust only: OpenH264's C++ gets coverage and ASan from this compiler
# wrapper (the fuzzer then sees inside the decoder; fuzz/README.md).
export CXX="$PWD/openh264-cxx.sh"
echo "==> fuzz: building targets"
cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
for t in $(cargo fuzz list); do
  echo "==> fuzz: $t for ${SECS} s"
  # Findings go to a scratch directory so a smoke run never adds files to the corpus in the tree.
  scratch=$(mktemp -d)
  cp -r "corpus/$t/." "$scratch/" 2>/dev/null || true
  if ! cargo fuzz run "$t" -O "$scratch" -- -max_total_time="$SECS" -rss_limit_mb=2048 \
      -print_final_stats=1 >"$scratch.log" 2>&1; then
    tail -40 "$scratch.log"
    echo "fuzz target $t failed; the reproducer is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "^Done" "$scratch.log" | sed "s/^/    $t: /"
  rm -rf "$scratch" "$scratch.log"
done
