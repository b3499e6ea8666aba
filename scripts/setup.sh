#!/usr/bin/env bash
# Ember's set-up on a fresh Debian 12 machine: host packages, a virtualenv with Ember,
# and the default guest images (kernel ~5 minutes the first time, then cached).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv build-essential flex bison bc libelf-dev libssl-dev   # guest kernel build
  linux-source busybox-static e2fsprogs cpio                          # guest images
  qemu-system-x86 kmod xz-utils zstd                                  # the rig and the QEMU benchmarks
  iproute2 socat                                                      # network and vsock tests
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# A "compat" editable install is one path in a .pth file: setuptools' default
# import-hook finder costs half a second of start-up inside the rig.
.venv/bin/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test,bench]'
# Bytecode ahead of time: Python reads .pyc files even where PYTHONDONTWRITEBYTECODE
# stops it writing them, and compiling Ember's modules costs about a second per start
# inside the rig's emulated CPU.
.venv/bin/python -m compileall -q ember benchmarks >/dev/null
.venv/bin/ember images build
