#!/usr/bin/env bash
# Install what benchmarks/run.py needs on Debian 12: NFS-Ganesha with FSAL VFS (the peer),
# libnfs (the client, loaded through cffi) and its tools, and cffi itself.
#
#   bash benchmarks/setup.sh            # packages only; Ganesha then uses a private rpcbind
#                                       # stub (see benchmarks/ganesha.py), port 111 stays free
#   bash benchmarks/setup.sh --rpcbind  # also start a real `rpcbind -w` (takes port 111) for
#                                       # hosts without mount namespaces (run.py --rpcbind system)
#
# Idempotent. Needs root (or sudo): apt-get, and Ganesha's FSAL VFS needs root to run.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

want_rpcbind=0
for arg in "$@"; do
    case "$arg" in
        --rpcbind) want_rpcbind=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

packages=(nfs-ganesha nfs-ganesha-vfs libnfs-dev libnfs-utils util-linux)
if [ "$want_rpcbind" -eq 1 ]; then
    packages+=(rpcbind)
fi

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    $SUDO apt-get update -qq
    # The packages' service units are not started here (no systemd in containers) and are
    # not used: run.py starts its own ganesha.nfsd with its own config.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"
fi

if ! python3 -c "import cffi" 2>/dev/null; then
    python3 -m pip install "cffi>=1.16"
fi

if [ "$want_rpcbind" -eq 1 ]; then
    if pgrep -x rpcbind >/dev/null 2>&1; then
        echo "setup.sh: rpcbind already running"
    else
        # -w: warm start (keeps registrations across restarts). Listens on port 111.
        $SUDO rpcbind -w
        echo "setup.sh: started rpcbind -w (port 111)"
    fi
fi

BENCH_DIR="$HERE" python3 - <<'EOF'
import os
import sys
sys.path.insert(0, os.environ["BENCH_DIR"])
from nfsclient import LIBNFS_SONAME
from ganesha import find_plugins_dir, mount_namespaces_work
print(f"setup.sh: libnfs {LIBNFS_SONAME}, FSAL plugins in {find_plugins_dir()},"
      f" mount namespaces {'usable' if mount_namespaces_work() else 'NOT usable'}")
EOF
