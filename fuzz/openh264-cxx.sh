#!/usr/bin/env bash
# The C++ compiler of the fuzz build (scripts/fuzz-smoke.sh sets CXX to this script). cargo-fuzz
# instruments Rust only, and the cc crate adds just `-fsanitize=address` to C++; this adds
# libFuzzer's coverage (inline 8-bit counters, PC table, comparison tracing) to OpenH264's sources
# (third_party/openh264-sys2), so the fuzzer sees inside the decoder. clang for every file, so
# that cc passes clang's flags; other C++ (libFuzzer itself) gets no coverage.
# TANDEM_CXX_LOG=file logs each command line.
set -euo pipefail
[[ -n "${TANDEM_CXX_LOG:-}" ]] && echo "$*" >>"$TANDEM_CXX_LOG"
for arg in "$@"; do
  case "$arg" in
    upstream/codec/*.cpp | */upstream/codec/*.cpp)
      exec clang++ -fsanitize=fuzzer-no-link,address "$@"
      ;;
  esac
done
exec clang++ "$@"
