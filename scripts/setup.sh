#!/usr/bin/env bash
# Prepare a Debian 12 machine (with python3 and pip) to develop and test Prism. Idempotent.
#   1. apt packages: the external NFS client tools, QEMU for the guest tests, rpcbind, and what
#      scripts/build-guest.sh needs (apt-get update only when a package is missing)
#   2. python3 -m pip install -e '.[test]': the runtime dependencies (lmdb, xxhash, cffi, uvloop,
#      prometheus_client, tqdm) and the test extra; compiles the native VRPC ring (PRISM_REQUIRE_NATIVE=1
#      makes a failed C build an error instead of a fallback to the pure-Python ring); the test
#      extra brings pytest, hypothesis, ruff, mypy and pyroute2 (the network-namespace tests)
#   3. scripts/build-guest.sh (kernel + initramfs cached in .cache/guest/); --no-guest skips it
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

APT_PACKAGES=(
    libnfs-utils     # nfs-ls/nfs-cp: an external userspace NFS client
    qemu-system-x86  # boots the guest whose kernel NFS client mounts Prism
    iproute2
    rpcbind
    nfs-common       # rpc.statd and sm-notify, copied into the guests of the locking tests
    ca-certificates
    gzip             # build-guest.sh (busybox-static from the guest does cpio and depmod)
    util-linux       # flock
    zsh              # runs the script of `prism completion zsh` in tests/test_cli_parser.py
    gcc              # builds the native VRPC ring (vrpc._native) at pip install
    libc6-dev        # (its libc.a links the static VRPC guest client, tests/guest/vrpc_guest.py)
    python3-dev      # Python.h for Debian's python3 (pyenv and venv Pythons ship their own)
)

log() { echo "setup: $*" >&2; }

sudo=()
if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || { log "run as root (or install sudo)"; exit 1; }
    sudo=(sudo)
fi
apt_get() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q "$@"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # Fresh images ship without package lists, and old lists can name removed versions:
    # update first in the first case, and retry after an update in the second.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_get update
    fi
    if ! apt_get install -y --no-install-recommends "${missing[@]}"; then
        apt_get update
        apt_get install -y --no-install-recommends "${missing[@]}"
    fi
fi

# Debian's own python3 is "externally managed" (PEP 668); CI machines are disposable, so install
# into it anyway. Older pips ignore these variables.
log "pip install -e .[test]"
PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -e '.[test]'

if [[ ${1:-} == --no-guest ]]; then
    log "done (skipped the QEMU guest image)"
    exit 0
fi
log "building the QEMU guest image"
scripts/build-guest.sh
log "done"
