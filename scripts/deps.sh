#!/usr/bin/env bash
# Installs (as root) or names (otherwise) the Debian/Ubuntu packages Tandem needs to build and test.
# Usage: scripts/deps.sh            -> exit 0 when everything is present
# Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail

# Build: a C compiler for ring and the bundled SQLite; pkg-config for -sys crates.
# nasm: OpenH264's assembly (without it the encoder silently builds 3x slower; a test fails then).
# Tests: Xvfb as the user's screen (input injection and capture tests), xrandr.
# Windows (eframe/glow on X11): libGL/libEGL with Mesa's software renderer (llvmpipe) so the
# console and agent windows also render under Xvfb without a GPU; xkbcommon, Xcursor, Xi, Xrandr
# are loaded by winit at run time.
# clang: the fuzz smoke run builds OpenH264's C++ with libFuzzer's coverage (fuzz/openh264-cxx.sh).
# Firewall tests (tests/tests/firewall_netns.rs, as root): iproute2 (`ip netns`, veth pairs) and
# nftables to build networks that drop UDP or allow only TCP 443; tinyproxy as the HTTP CONNECT
# proxy; nginx as the reverse proxy in front of the relay (relay/dist/nginx-tandem.conf). `nginx`
# is the package with the binary on Debian 12/13 and Ubuntu (nginx-light only adds modules there).
# Wayland: libxkbcommon-dev (the agent compiles keymaps for its virtual keyboard with xkbcommon);
# sway (headless, software rendering), swaybg and grim for the wlroots backend's tests.
# GNOME: libpipewire-0.3-dev (the pipewire crate; its bindings are generated with the libclang
# that clang, above, brings) to build the agent;
# mutter (headless), pipewire, wireplumber, dbus and gdbus (libglib2.0-bin) for the GNOME
# backend's tests; xdg-desktop-portal and xdg-desktop-portal-gnome for the portal backend's.
# xclip: a real X client reading and writing the clipboard in the toolbox's tests.
# Packages (scripts/package.sh, tests/tests/packages.rs): dpkg-dev (dpkg-shlibdeps), debootstrap
# for a clean Debian root to install, upgrade and purge them in; util-linux's `script` gives the
# ready agent's test a terminal.
# fonts-dejavu-core: the text of the peer bench's content (tests/src/content.rs).
# faketime (libfaketime): a relay whose clock is hours off, for "Check connection"'s clock step.
# postgresql: relay clusters share their store in PostgreSQL; tests/tests/cluster.rs starts a
# server of its own (initdb in a temporary directory), never the system's.
PACKAGES=(postgresql faketime fonts-dejavu-core dpkg-dev debootstrap bsdutils build-essential pkg-config nasm clang xvfb x11-xserver-utils xclip libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcursor1 libxi6 libxrandr2
  iproute2 nftables tinyproxy nginx
  libxkbcommon-dev sway swaybg grim
  libpipewire-0.3-dev mutter pipewire wireplumber dbus libglib2.0-bin
  xdg-desktop-portal xdg-desktop-portal-gnome)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "tandem: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tandem: missing system packages: ${missing[*]}" >&2
    echo "tandem: run this, then try again:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null; then
  echo "tandem: cargo not found; install Rust (https://rustup.rs) and try again" >&2
  exit 1
fi
