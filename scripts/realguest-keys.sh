#!/usr/bin/env bash
# Opt-in (not part of scripts/test.sh): the agent's cloud-init seed against the real
# cloud-init of a Debian bookworm guest (22.4.2), tests/realguest_keys.rs. With the
# request's user_data, the SSH keys and the hostname of the agent must reach the guest
# next to that user-data's own keys and users, and the user-data must arrive unchanged.
#
# Usage: scripts/realguest-keys.sh [offline|boot|all]   (default: all)
#   offline  the guest's own cloud-init run on its root filesystem in a throw-away
#            overlay, without booting (scripts/cloud-init-chroot.sh): about a minute
#   boot     the guest created through the agent's API on a real libvirtd inside a test
#            network namespace, checked over SSH: several minutes under TCG
#
# Needs root and the guest of /work/shared/tools/realguest.sh in REALGUEST_DIR (default
# /var/lib/realguest: rootfs/, debian.qcow2, vmlinuz, initrd.img, id_test{,.pub});
# build it with `OUT=$REALGUEST_DIR /work/shared/tools/realguest.sh` (about 10 minutes;
# on a machine whose apt has only deb822 sources, that tool's mirror lookup exits without
# a word: give it MIRROR=http://deb.debian.org/debian and
# SECURITY=http://deb.debian.org/debian-security).
# The boot test starts libvirtd like the VM tests do (scripts/libvirt-netns.sh: the
# machine's own libvirtd must be stopped) and takes /run/nva-libvirtd.lock, shared with
# other checkouts' libvirt tests.
set -euo pipefail

cd "$(dirname "$0")/.."
what=${1:-all}
die() { echo "realguest-keys: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (namespaces, an overlay mount, chroot, libvirtd)"
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
export REALGUEST_DIR=${REALGUEST_DIR:-/var/lib/realguest}
[[ -x $REALGUEST_DIR/rootfs/usr/bin/cloud-init && -f $REALGUEST_DIR/debian.qcow2 ]] ||
    die "no guest in $REALGUEST_DIR: build it with OUT=$REALGUEST_DIR /work/shared/tools/realguest.sh"

run() { cargo test --locked --test realguest_keys -- --ignored --nocapture --test-threads=1 "$@"; }
case $what in
    offline) run real_cloud_init_ ;;
    boot) flock /run/nva-libvirtd.lock bash -c "$(declare -f run); run a_real_debian_guest_" ;;
    all) flock /run/nva-libvirtd.lock bash -c "$(declare -f run); run" ;;
    *) die "usage: realguest-keys.sh [offline|boot|all]" ;;
esac
