#!/usr/bin/env bash
# Runs the real cloud-init of a Debian root filesystem against one seed image of the
# agent, without booting: what its `init` stage makes of the seed's meta-data, user-data
# and vendor-data (hostname, users, authorized_keys).
#
# Usage: scripts/cloud-init-chroot.sh ROOTFS SEED_IMAGE OUT_DIR
#   ROOTFS      a root filesystem with cloud-init installed, left unchanged (an overlay
#               takes every write), e.g. the rootfs/ that /work/shared/tools/realguest.sh
#               leaves next to its guest image (Debian bookworm, cloud-init 22.4.2)
#   SEED_IMAGE  the FAT image `vm::seed::build` made
#   OUT_DIR     receives: hostname (the kernel's, as cloud-init set it), etc-hostname,
#               authorized_keys.<user> (root and every /home user that has one),
#               user-data.txt (the raw user-data cloud-init stored), cloud-init.log,
#               init.out (the stages' output)
#
# Everything runs in new mount, network, UTS, IPC and PID namespaces: the overlay, the
# mounts and the hostname cloud-init sets vanish with them, and no network exists. The
# image's files are read with GNU mtools (a FAT reader independent of the agent's; these
# machines' kernels have no vfat module, and the boot test of tests/realguest_keys.rs has
# a guest kernel read the disk) into NoCloud's seed directory
# (/var/lib/cloud/seed/nocloud), where cloud-init reads the same files it reads from a
# CIDATA disk; a chroot has no udev to find that disk.
# Only the `init` stage's hostname, users and ssh modules run (network config is
# disabled): growpart or resizefs in a chroot would act on the host's root device.
set -euo pipefail

ROOTFS=${1:?usage: cloud-init-chroot.sh ROOTFS SEED_IMAGE OUT_DIR}
IMAGE=${2:?usage: cloud-init-chroot.sh ROOTFS SEED_IMAGE OUT_DIR}
OUT=${3:?usage: cloud-init-chroot.sh ROOTFS SEED_IMAGE OUT_DIR}

die() { echo "cloud-init-chroot: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (namespaces, overlay mount, chroot)"
[[ -x $ROOTFS/usr/bin/cloud-init ]] || die "$ROOTFS has no /usr/bin/cloud-init"
[[ -f $IMAGE ]] || die "no seed image $IMAGE"
if ! command -v mcopy >/dev/null; then
    echo "cloud-init-chroot: installing mtools" >&2
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends mtools >&2
fi
ROOTFS=$(realpath "$ROOTFS")
IMAGE=$(realpath "$IMAGE")
mkdir -p "$OUT"
OUT=$(realpath "$OUT")

work=$(mktemp -d /tmp/nva-cloud-init.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/upper" "$work/work" "$work/root" "$work/seed"
# Every file of the image's root directory; the label must be what NoCloud looks for.
label=$(mlabel -s -i "$IMAGE" :: | sed 's/^ *Volume label is *//; s/ *$//')
[[ ${label,,} == cidata ]] || die "$IMAGE is labelled '$label', not CIDATA"
mcopy -n -i "$IMAGE" '::*' "$work/seed/"

unshare --mount --net --uts --ipc --pid --fork --propagation private \
    bash -euo pipefail -s "$ROOTFS" "$IMAGE" "$OUT" "$work" <<'INNER'
rootfs=$1; image=$2; out=$3; work=$4
m=$work/root
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$work/upper,workdir=$work/work" "$m"
mount -t proc proc "$m/proc"
mount -t tmpfs tmpfs "$m/run"
mkdir -p "$m/var/lib/cloud/seed/nocloud"
cp "$work/seed"/* "$m/var/lib/cloud/seed/nocloud/"
rm -rf "$m/var/lib/cloud/instances" "$m/var/lib/cloud/instance" "$m/var/log/cloud-init"*
cat > "$m/etc/cloud/cloud.cfg.d/99-nva-chroot.cfg" <<CFG
network: {config: disabled}
cloud_init_modules: [set_hostname, update_hostname, users_groups, ssh]
cloud_config_modules: []
cloud_final_modules: []
CFG
hostname nva-chroot-before
rc=0
{ chroot "$m" cloud-init init --local && chroot "$m" cloud-init init; } >"$out/init.out" 2>&1 || rc=$?
hostname >"$out/hostname"
cp "$m/etc/hostname" "$out/etc-hostname"
[[ -f $m/root/.ssh/authorized_keys ]] && cp "$m/root/.ssh/authorized_keys" "$out/authorized_keys.root"
for f in "$m"/home/*/.ssh/authorized_keys; do
    [[ -f $f ]] || continue
    user=${f#"$m/home/"}
    cp "$f" "$out/authorized_keys.${user%%/*}"
done
# instance/ is an absolute symlink, meaningful only inside the chroot.
for f in "$m"/var/lib/cloud/instances/*/user-data.txt; do
    [[ -f $f ]] && cp "$f" "$out/user-data.txt"
done
cp "$m/var/log/cloud-init.log" "$out/cloud-init.log" 2>/dev/null || true
exit "$rc"
INNER
