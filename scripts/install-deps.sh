#!/bin/sh
# Install what the project needs on Debian 12: system packages, then a venv.
# Safe to run again: it only does work when something is missing or changed.
set -eu
cd "$(dirname "$0")/.."

# QEMU 10.0 (needed to migrate running TCG guests) comes from scripts/install-qemu10.sh.
APT_PACKAGES="qemu-system-x86 qemu-utils debootstrap e2fsprogs python3-venv python3-pip
python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 zstd cpio gcc python3-dev"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "== installing Debian packages:$missing"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi

scripts/install-qemu10.sh
# bcc compiles against kernel headers; where the running kernel ships none
# (as on this vendor kernel), assemble a tree from Debian's packages.
scripts/bcc-headers.sh

# The venv uses Debian's python3 with system site packages: bcc (python3-bpfcc)
# is importable only from there.
VENV=${VENV:-.venv}
stamp="$VENV/.fphint-installed"
want=$(cat pyproject.toml lab/pyproject.toml scripts/install-deps.sh host_collector/stream/_fastparse.c | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "== creating $VENV"
/usr/bin/python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# The lab (lab/: VM harness, scenarios, guest workloads, demo; and vm-images/'s
# builder) is a second, dev-only distribution: editable here, never in the wheel.
"$VENV/bin/pip" install -q -e '.[collector,dev,bench]' -e ./lab
echo "$want" > "$stamp"
