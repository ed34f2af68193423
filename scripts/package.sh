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

if ! command -v dpkg-shlibdeps >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
  else
    echo "package.sh needs dpkg-dev (for the packages' library dependencies):" >&2
    echo "  sudo apt-get install -y dpkg-dev" >&2
    exit 1
  fi
fi
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
