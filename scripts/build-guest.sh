#!/usr/bin/env bash
# Build the Linux guest that Prism's QEMU tests boot, once, into .cache/guest/.
#
# Outputs (replaced atomically, so a reader never sees a half-written file):
#   vmlinuz        Debian's cloud kernel (linux-image-cloud-amd64 -> linux-image-<abi>-cloud-amd64)
#   base.cpio.gz   initramfs: busybox-static as the whole userland, the kernel modules the NFS
#                  client and virtio-net need (with their dependencies and a modules.dep for
#                  busybox modprobe), and /init. Each run appends a second archive holding
#                  /workload.sh (tests/guest/harness.py); the kernel unpacks both in order.
#   guest.env      key=value facts about the image (kernel_release, package versions)
#   stamp          hash of this recipe; when it matches, the script exits at once
#
# /init mounts proc/sys/dev, loads the modules, configures eth0, runs `sh /workload.sh`, prints
# "PRISM-GUEST-EXIT <code>" and powers off. A setup failure prints
# "PRISM-GUEST-SETUP-FAILED <what>" and skips the workload. eth0 is set up as QEMU user
# networking expects (10.0.2.15/24, gateway and host loopback at 10.0.2.2) unless the kernel
# command line says otherwise: prism.ip=ADDR/PREFIX, prism.gw=ADDR (empty: no default route)
# and prism.hostname=NAME (default prism-guest), for guests on a tap device with their own
# address (tests/guest/harness.py).
#
# Packages come from apt (`apt-get download` + `dpkg -x`); nothing is installed on the host.
# Needs: apt-get, dpkg, gzip, flock, sha256sum. busybox-static (amd64, runs on the host) does
# depmod and cpio, so no host cpio or kmod is needed.
#
# Usage: scripts/build-guest.sh [--force]
# Env:   PRISM_GUEST_CACHE        output directory (default: <repo>/.cache/guest)
#        PRISM_GUEST_KERNEL_META  kernel metapackage (default: linux-image-cloud-amd64)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PRISM_GUEST_CACHE:-$ROOT/.cache/guest}
KERNEL_META=${PRISM_GUEST_KERNEL_META:-linux-image-cloud-amd64}
# Loaded in this order by /init; modprobe pulls in the rest (virtio, failover, sunrpc, grace,
# lockd, nfs_acl, netfs, fscache, nfs) from the generated modules.dep.
MODULES=(virtio_pci virtio_net nfsv3)

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

recipe=$( { cat "${BASH_SOURCE[0]}"; echo "$KERNEL_META"; } | sha256sum | cut -d' ' -f1)
if [[ $force == 0 && -f $CACHE/vmlinuz && -f $CACHE/base.cpio.gz && -f $CACHE/guest.env
      && "$(cat "$CACHE/stamp" 2>/dev/null)" == "$recipe" ]]; then
    exit 0
fi

apt_opts=(-q)
if [[ $(id -u) == 0 ]]; then
    # The download goes into a private temp dir that the _apt sandbox user cannot enter.
    apt_opts+=(-o APT::Sandbox::User=root)
fi

apt_update() {
    [[ $(id -u) == 0 ]] || die "package lists are missing or stale; run 'apt-get update' as root"
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update >&2
}

if ! apt-cache show "$KERNEL_META" busybox-static >/dev/null 2>&1; then
    apt_update
fi
kernel_pkg=$(apt-cache depends "$KERNEL_META" \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[[ -n $kernel_pkg ]] || die "cannot resolve the kernel package behind $KERNEL_META"

work=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/debs" "$work/x"

download() { (cd "$work/debs" && apt-get "${apt_opts[@]}" download "$kernel_pkg" busybox-static >&2); }
log "downloading $kernel_pkg busybox-static"
if ! download; then
    # A security update can remove the version the local lists name: refresh once and retry.
    apt_update
    download
fi
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$work/x"
done

x=$work/x
bb=$x/bin/busybox
[[ -x $bb ]] || die "busybox-static did not unpack to /bin/busybox"
krel=$(basename "$(find "$x/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[[ -f $x/boot/vmlinuz-$krel ]] || die "no vmlinuz-$krel in $kernel_pkg"
kmods=lib/modules/$krel

# The .deb ships no modules.dep (depmod runs at install time), so make one.
"$bb" depmod -b "$x" "$krel"
mapfile -t kos < <(awk -v want="${MODULES[*]}" '
    BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) need[w[i]] = 1 }
    {
        path = $1; sub(/:$/, "", path)
        name = path; sub(/.*\//, "", name); sub(/\.ko(\.[a-z]+)?$/, "", name)
        if (name in need) {
            found[name] = 1
            print path
            for (i = 2; i <= NF; i++) print $i
        }
    }
    END { for (m in need) if (!(m in found)) { print "missing module " m > "/dev/stderr"; exit 1 } }
' "$x/$kmods/modules.dep" | sort -u)
[[ ${#kos[@]} -gt 0 ]] || die "module closure is empty"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,root,etc,"$kmods"}
cp "$bb" "$root/bin/busybox"
while read -r applet; do
    [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
done < <("$bb" --list-full)
for ko in "${kos[@]}"; do
    install -D -m 644 "$x/$kmods/$ko" "$root/$kmods/$ko"
done
cp "$x/$kmods/modules.builtin" "$x/$kmods/modules.order" "$root/$kmods/"
"$bb" depmod -b "$root" "$krel"
printf '%s\n' "${MODULES[@]}" > "$root/etc/prism-guest-modules"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"

cat > "$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the Prism test guest (generated by scripts/build-guest.sh).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
setup_failed() { echo "PRISM-GUEST-SETUP-FAILED $*"; failed=1; }
failed=0

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

while read -r m; do
    modprobe "$m" || setup_failed "modprobe $m"
done </etc/prism-guest-modules

address=10.0.2.15/24 gateway=10.0.2.2 name=prism-guest
for arg in $(cat /proc/cmdline); do
    case $arg in
        prism.ip=*) address=${arg#prism.ip=} ;;
        prism.gw=*) gateway=${arg#prism.gw=} ;;
        prism.hostname=*) name=${arg#prism.hostname=} ;;
    esac
done
hostname "$name"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 250 ]; do
    usleep 20000
    i=$((i + 1))
done
{ ip link set eth0 up &&
  ip addr add "$address" dev eth0 &&
  { [ -z "$gateway" ] || ip route add default via "$gateway"; }; } || setup_failed "network"
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ "$i" -lt 100 ]; do
    usleep 20000
    i=$((i + 1))
done

rc=255
if [ "$failed" != 0 ]; then
    :
elif [ -f /workload.sh ]; then
    cd /
    echo "PRISM-GUEST-START"
    sh /workload.sh </dev/null
    rc=$?
else
    setup_failed "no /workload.sh in the initramfs"
fi
sync
echo "PRISM-GUEST-EXIT $rc"
poweroff -f
# poweroff needs ACPI; if it returns, make the kernel panic (panic=-1, QEMU -no-reboot exits).
exit "$rc"
EOF
chmod 755 "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null) \
    | gzip -n -9 > "$work/base.cpio.gz"
cp "$x/boot/vmlinuz-$krel" "$work/vmlinuz"

pkg_version() { dpkg-deb -f "$1" Version; }
{
    echo "kernel_release=$krel"
    echo "kernel_package=$kernel_pkg"
    echo "kernel_version=$(pkg_version "$work"/debs/linux-image-*.deb)"
    echo "busybox_version=$(pkg_version "$work"/debs/busybox-static_*.deb)"
    echo "modules=${MODULES[*]}"
} > "$work/guest.env"

mv -f "$work/vmlinuz" "$CACHE/vmlinuz"
mv -f "$work/base.cpio.gz" "$CACHE/base.cpio.gz"
mv -f "$work/guest.env" "$CACHE/guest.env"
echo "$recipe" > "$work/stamp"
mv -f "$work/stamp" "$CACHE/stamp"
log "built $CACHE ($krel, $(du -h "$CACHE/base.cpio.gz" | cut -f1) initramfs, ${#kos[@]} modules)"
