#!/usr/bin/env bash
# Builds the Debian packages tandem-relay, tandem-agent and tandem-console (cargo-deb) into
# target/debian/.
#
#   scripts/package.sh             from a release build (what you ship)
#   scripts/package.sh --dev       from the debug build (the package tests: same files, faster)
#   TANDEM_DEB_VERSION=0.1.0+2 scripts/package.sh   another package version (upgrade tests)
#   TANDEM_DEB_OUT=DIR             another output folder (cargo-deb replaces older versions in one)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build_args=()
# --dev packages the debug binaries that `cargo build --workspace --bins` made (no rebuild:
# cargo-deb alone would build each package with its own feature set).
[[ "${1:-}" == "--dev" ]] && profile=dev && build_args=(--no-build)

# Build dependencies (nasm, the -dev libraries) and dpkg-dev (dpkg-shlibdeps, for the packages'
# library dependencies): installed as root, otherwise the apt-get line is printed and we stop.
scripts/deps.sh
if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi

# The packaged configuration: the documented example, with the data directory the unit and the
# admin commands share.
sed 's|^# data_dir = "/var/lib/tandem-relay"|data_dir = "/var/lib/tandem-relay"|' \
  relay/dist/relay.toml > relay/dist/deb/relay.toml
grep -q '^data_dir = "/var/lib/tandem-relay"' relay/dist/deb/relay.toml

version_args=()
[[ -n "${TANDEM_DEB_VERSION:-}" ]] && version_args=(--deb-version "$TANDEM_DEB_VERSION")
out="${TANDEM_DEB_OUT:-target/debian}"
mkdir -p "$out"
for p in tandem-relay tandem-agent tandem-console; do
  cargo deb -p "$p" --profile "$profile" "${build_args[@]}" "${version_args[@]}" --output "$out/" --quiet
done
ls -1 "$out"/*.deb
