#!/usr/bin/env bash
# Builds the tiny test guest that the VM-lifecycle tests boot under libvirt/TCG:
#   OUTDIR/vmlinuz            a copy of a Debian kernel (/boot/vmlinuz-<ver>)
#   OUTDIR/initramfs.cpio.gz  busybox-static + the virtio NIC, virtio disk and FAT modules
#                             + an /init that reads a cloud-init NoCloud seed (a disk
#                             labelled CIDATA: instance-id, local-hostname) if one is
#                             attached, runs udhcpc on eth0, serves its hostname and
#                             instance-id (and /user-data) with `httpd -p 80` and prints
#                             `TINY-GUEST-READY <ip> <hostname> <instance-id>` on the
#                             serial console. On the ACPI power button (QEMU
#                             system_powerdown, libvirt shutdown/reboot) it syncs,
#                             prints `TINY-GUEST-POWEROFF` and powers off.
# Nothing is downloaded except Debian packages through apt-get (only when missing):
# a guest image from the internet would be an unreviewed binary in the test path.
#
# Usage: scripts/build-tiny-guest.sh OUTDIR
#   KVER=<version>  pick a kernel; default: the newest /boot/vmlinuz-* whose
#                   /lib/modules/<version> exists.
# Boot with: -kernel OUTDIR/vmlinuz -initrd OUTDIR/initramfs.cpio.gz
#            -append 'console=ttyS0 tinyguest.hostname=NAME'   (hostname optional)
#            [-drive file=SEED,format=raw,if=virtio,readonly=on]  (the seed's
#            local-hostname beats tinyguest.hostname=)
#
# Idempotent: when OUTDIR already holds both files and the stamp written next to them
# matches this script's hash and the kernel version, it does nothing.
set -euo pipefail

OUTDIR=${1:?usage: build-tiny-guest.sh OUTDIR}
SELF=$(readlink -f "$0")

log() { echo "build-tiny-guest: $*" >&2; }

# --- packages (Debian only) --------------------------------------------------------
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
newest_kernel() {
    local v best=""
    for k in /boot/vmlinuz-*; do
        [[ -e $k ]] || continue
        v=${k#/boot/vmlinuz-}
        [[ -d /lib/modules/$v ]] || continue
        best=$(printf '%s\n%s\n' "$best" "$v" | sed '/^$/d' | sort -V | tail -n1)
    done
    echo "$best"
}

missing=()
have_pkg busybox-static || missing+=(busybox-static)
have_pkg cpio || missing+=(cpio)
have_pkg kmod || missing+=(kmod)          # modinfo, only for a sanity check
if [[ -z ${KVER:-} && -z $(newest_kernel) ]]; then missing+=(linux-image-amd64); fi
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || { log "missing packages: ${missing[*]}; run as root"; exit 1; }
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

KVER=${KVER:-$(newest_kernel)}
[[ -n $KVER && -e /boot/vmlinuz-$KVER && -d /lib/modules/$KVER ]] \
    || { log "no usable kernel (KVER=$KVER)"; exit 1; }
MODDIR=/lib/modules/$KVER

# --- idempotence -------------------------------------------------------------------
STAMP_WANT="$(sha256sum "$SELF" | cut -d' ' -f1) $KVER"
if [[ -f $OUTDIR/vmlinuz && -f $OUTDIR/initramfs.cpio.gz && -f $OUTDIR/.stamp ]] \
    && [[ $(cat "$OUTDIR/.stamp") == "$STAMP_WANT" ]]; then
    log "up to date in $OUTDIR (kernel $KVER)"
    exit 0
fi

mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc/acpi/PWRF,proc,sys,dev,tmp,run,www,seed,lib/modules}
mkdir -p "$ROOT/usr/share/udhcpc"

# --- busybox ------------------------------------------------------------------------
BB=/bin/busybox
[[ -x $BB ]] || BB=$(command -v busybox)
# ldd fails on a static binary; the initramfs has no libc, so a dynamic one would not run.
if ldd "$BB" >/dev/null 2>&1; then log "$BB is dynamically linked"; exit 1; fi
cp "$BB" "$ROOT/bin/busybox"
for app in sh mount umount mkdir cat echo ip udhcpc httpd insmod hostname sleep ls dmesg \
           ifconfig route sed grep ps poweroff reboot uname mknod findfs head tr \
           acpid stty sync; do
    ln -s busybox "$ROOT/bin/$app"
done

# --- modules, in dependency order ---------------------------------------------------
# Wanted: the virtio NIC and what it needs. Each is skipped when the kernel has it
# built in (modules.builtin). virtio_pci pulls virtio/virtio_ring and the
# virtio_pci_*_dev helpers through modules.dep.
# Then the seed disk: virtio_blk, vfat (pulls fat) and the two NLS tables vfat loads at
# mount time without asking: the codepage (FAT_DEFAULT_CODEPAGE, `cp437` -> nls_cp437)
# and the iocharset (FAT_DEFAULT_IOCHARSET, `ascii` on Debian -> nls_ascii). There is no
# modprobe in the initramfs, so a table that is not loaded beforehand makes the mount
# fail. FAT_DEFAULT_UTF8 needs no module (the UTF-8 helpers are in nls_base, built in).
# Then the ACPI power button: `button` (CONFIG_ACPI_BUTTON, =m on Debian) turns the
# fixed-hardware power button into an input device that reports KEY_POWER, and `evdev`
# (CONFIG_INPUT_EVDEV, =m) gives it a /dev/input/event* node for busybox acpid. Without
# them the guest ignores QEMU's system_powerdown (libvirt's ACPI shutdown and reboot).
KCONFIG=/boot/config-$KVER
kconfig() {  # kconfig NAME DEFAULT -> the value of CONFIG_NAME, unquoted
    local v
    v=$(sed -n "s/^CONFIG_$1=//p" "$KCONFIG" 2>/dev/null | tr -d '"')
    echo "${v:-$2}"
}
[[ -f $KCONFIG ]] || log "no $KCONFIG; assuming the kernel's FAT defaults (cp437, iso8859-1)"
FAT_CP=$(kconfig FAT_DEFAULT_CODEPAGE 437)
FAT_IO=$(kconfig FAT_DEFAULT_IOCHARSET iso8859-1)
WANT=(virtio_pci failover net_failover virtio_net
      virtio_blk vfat "nls_cp$FAT_CP" "nls_${FAT_IO//-/_}"
      button evdev)
declare -A DEPS=() PATHOF=() SEEN=()
while IFS= read -r line; do
    mod_path=${line%%:*}
    name=$(basename "$mod_path"); name=${name%%.ko*}; name=${name//-/_}
    PATHOF[$name]=$mod_path
    DEPS[$name]=${line#*:}
done < "$MODDIR/modules.dep"
is_builtin() { grep -Eq "/$1\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null \
               || grep -Eq "/${1//_/-}\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
ORDER=()
visit() {
    local m=$1 d dn
    [[ -n ${SEEN[$m]:-} ]] && return 0
    SEEN[$m]=1
    if [[ -z ${PATHOF[$m]:-} ]]; then
        is_builtin "$m" && { log "module $m: built in"; return 0; }
        log "module $m: neither a module nor built in for $KVER"; exit 1
    fi
    for d in ${DEPS[$m]}; do
        dn=$(basename "$d"); dn=${dn%%.ko*}; dn=${dn//-/_}
        visit "$dn"
    done
    ORDER+=("$m")
}
for m in "${WANT[@]}"; do visit "$m"; done

: > "$ROOT/etc/modules.order"
for m in "${ORDER[@]}"; do
    src=$MODDIR/${PATHOF[$m]}
    dst=$ROOT/lib/modules/$m.ko
    case $src in
        *.ko.xz)  xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -qdc "$src" > "$dst" ;;
        *.ko.gz)  gzip -dc "$src" > "$dst" ;;
        *.ko)     cp "$src" "$dst" ;;
        *) log "unknown module format: $src"; exit 1 ;;
    esac
    echo "$m" >> "$ROOT/etc/modules.order"
done
log "modules (load order): ${ORDER[*]:-none}"

# --- udhcpc hook and /init ----------------------------------------------------------
cat > "$ROOT/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# Minimal udhcpc hook: configure address, default route, and remember the address.
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
        echo "$ip" > /run/ip
        ;;
esac
exit 0
EOF
chmod +x "$ROOT/usr/share/udhcpc/default.script"

# busybox acpid maps EV_KEY KEY_POWER (value 1) to the action PWRF/00000080 (its built-in
# tables; there is no /etc/acpid.conf or /etc/acpi.map) and, run in /etc/acpi, executes
# that file directly (a directory would need run-parts).
cat > "$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# ACPI power button: a clean, immediate power off. `poweroff -f` calls reboot(2)
# itself; plain `poweroff` would signal PID 1, a shell script that would just die.
exec </dev/null >/dev/console 2>&1
sync
umount /seed 2>/dev/null
# One write, starting with a newline: the console shell's prompt (printed after the READY
# marker) may have left the cursor mid-line, and the marker must be a line of its own.
printf '\nTINY-GUEST-POWEROFF\n'
# The console tty is held open by init, so the line may still sit in the UART's buffer;
# stty applies its (unchanged) setting with TCSADRAIN, i.e. waits until it was sent.
stty -F /dev/console onlcr
poweroff -f
EOF
chmod +x "$ROOT/etc/acpi/PWRF/00000080"

cat > "$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
mkdir -p /dev/pts /run /tmp
[ -e /dev/console ] || mknod /dev/console c 5 1
exec </dev/console >/dev/console 2>&1
echo "tiny-guest: init on $(uname -r)"

for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || echo "tiny-guest: insmod $m failed"
done

# ACPI power button -> /etc/acpi/PWRF/00000080 (sync, TINY-GUEST-POWEROFF, poweroff -f).
# acpid opens /dev/input/event0, event1, ... once, at start; button and evdev are loaded
# above and devtmpfs creates the nodes synchronously, so all of them exist by now.
# Started early so that a shutdown requested during the boot is not lost either.
if grep -q 'Power Button' /proc/bus/input/devices 2>/dev/null && [ -e /dev/input/event0 ]; then
    acpid -d -c /etc/acpi </dev/null &
    echo "tiny-guest: acpid listening for the ACPI power button"
else
    echo "tiny-guest: no ACPI power button input device; shutdown requests are ignored"
fi

name=tiny-guest
for arg in $(cat /proc/cmdline); do
    case "$arg" in tinyguest.hostname=*) name=${arg#tinyguest.hostname=} ;; esac
done

# --- cloud-init NoCloud seed: a FAT disk labelled CIDATA -------------------------
# seed_get KEY FILE: the value of KEY from the one-line JSON meta-data the agent writes
# ({"instance-id":"...","local-hostname":"..."}) or from simple YAML `key: value` lines.
seed_get() {
    v=$(sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$2" | head -n 1)
    [ -n "$v" ] || v=$(sed -n "s/^[[:space:]]*$1[[:space:]]*:[[:space:]]*//p" "$2" | head -n 1 \
        | sed "s/[[:space:]]*\$//; s/^[\"']//; s/[\"']\$//")
    echo "$v"
}
# Only wait for a disk when the machine has a virtio block device (virtio id 2).
has_vblk=
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0002 ] && has_vblk=1
done
seed_dev=
seed_how="label (findfs)"
if [ -n "$has_vblk" ]; then
    i=0
    while [ -z "$seed_dev" ] && [ $i -lt 30 ]; do
        seed_dev=$(findfs LABEL=CIDATA 2>/dev/null)
        if [ -z "$seed_dev" ]; then
            # findfs may not know the label (or the disk is not probed yet): try each disk.
            for dev in /dev/vd*; do
                [ -b "$dev" ] || continue
                if mount -t vfat -o ro "$dev" /seed 2>/dev/null; then
                    [ -f /seed/meta-data ] && { seed_dev=$dev; seed_how="trying each disk"; }
                    umount /seed
                    [ -n "$seed_dev" ] && break
                fi
            done
        fi
        [ -n "$seed_dev" ] || { sleep 0.1; i=$((i+1)); }
    done
fi
instance_id=none
if [ -n "$seed_dev" ] && mount -t vfat -o ro "$seed_dev" /seed; then
    if [ -f /seed/meta-data ]; then
        v=$(seed_get instance-id /seed/meta-data); [ -n "$v" ] && instance_id=$v
        v=$(seed_get local-hostname /seed/meta-data); [ -n "$v" ] && name=$v
        echo "tiny-guest: seed on $seed_dev (found by $seed_how, try $i): instance-id=$instance_id local-hostname=$v"
    else
        echo "tiny-guest: $seed_dev has no meta-data"
    fi
    # Stays mounted read-only (/seed) for inspection from the console.
elif [ -n "$has_vblk" ]; then
    echo "tiny-guest: no CIDATA seed found"
fi
hostname "$name"

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
# -t 20 -T 1: ~20 s of DISCOVERs; -n: give up (not daemonize) if no lease; stays a
# daemon after the lease so renewals work.
udhcpc -i eth0 -t 20 -T 1 -n -S -s /usr/share/udhcpc/default.script \
    || echo "tiny-guest: DHCP failed"

echo "<html><body>hostname: $name</body></html>" > /www/index.html
echo "$name" > /www/hostname
echo "$instance_id" > /www/instance-id
# The seed's user-data as the guest read it (empty without a seed), for tests that check
# what the agent put there (keys, verbatim user-data).
cat /seed/user-data > /www/user-data 2>/dev/null || : > /www/user-data
httpd -p 80 -h /www

echo "TINY-GUEST-READY $(cat /run/ip 2>/dev/null || echo none) $name $instance_id"
# PID 1 must not exit; keep a shell on the console for debugging.
while true; do sh </dev/console >/dev/console 2>&1 || sleep 1; done
EOF
chmod +x "$ROOT/init"

# --- pack ----------------------------------------------------------------------------
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet --owner 0:0) \
    | gzip -9 > "$WORK/initramfs.cpio.gz"
cp "/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
mv "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
mv "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
echo "$STAMP_WANT" > "$OUTDIR/.stamp"
log "built $OUTDIR/vmlinuz ($KVER) and $OUTDIR/initramfs.cpio.gz ($(du -h "$OUTDIR/initramfs.cpio.gz" | cut -f1))"
