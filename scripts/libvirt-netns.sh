#!/usr/bin/env bash
# Runs a private libvirtd for tests inside network namespace NAME, so its bridge
# (virbr0 192.168.122.1/24), dnsmasq, firewall rules and guests exist only there and
# never in the machine's root namespace (docs/test-environment.md, hard network rule).
#
# Usage: scripts/libvirt-netns.sh start NAME   # install if missing, netns, daemons, net
#        scripts/libvirt-netns.sh stop  NAME   # destroy domains + network, kill, delete netns
#        scripts/libvirt-netns.sh prepare NAME # install if missing; on a fresh install,
#                                              # start and stop once in NAME (see prepare())
# Afterwards (while started): virsh -c qemu:///system ...   (the control socket
# /var/run/libvirt/libvirt-sock is machine-wide, so virsh works from any namespace,
# and only one such daemon can run on the machine at a time.)
#
# Before the daemon starts, /dev/kvm is given to the `kvm` group (mode g+rw) when it
# carries another group, and libvirt's QEMU user is put in that group: otherwise libvirtd
# sees KVM as usable when it probes QEMU but not as that user, throws its capability cache
# away and probes QEMU again on almost every call (seconds each). What was changed is said.
# After the start, a second `virsh version` must answer within LIBVIRT_FAST_MS, else the
# script stops the daemon and fails saying what was slow.
#
# Env: LIBVIRT_WAIT_SECS (default 120) bound on waiting for the daemon to answer.
#      LIBVIRT_FAST_MS (default 2000) bound on a plain `virsh version` once it answers.
#      LIBVIRT_TCP=1 also serves libvirt's RPC on TCP port 16509 without authentication,
#      on the addresses of namespace NAME only (the remote-URI test: qemu+tcp://ADDR/system
#      from another test namespace). Never reachable from the root namespace.
set -euo pipefail

CMD=${1:?usage: libvirt-netns.sh start|stop|prepare NAME}
NAME=${2:?usage: libvirt-netns.sh start|stop|prepare NAME}
URI=qemu:///system
WAIT=${LIBVIRT_WAIT_SECS:-120}
FAST_MS=${LIBVIRT_FAST_MS:-2000}
STATE=/run/libvirt-netns
PACKAGES=(libvirt-daemon-system qemu-system-x86 qemu-utils dnsmasq-base)

log() { echo "libvirt-netns: $*" >&2; }
die() { log "$*"; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root"
virsh_() { virsh -q -c "$URI" "$@"; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pidfile_pid() { [[ -f $1 ]] && cat "$1" || true; }

install_missing() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do have_pkg "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Keep maintainer scripts from starting libvirtd/virtlogd in the ROOT namespace
    # (on a systemd or sysvinit host their postinst would start the daemon, and an
    # autostarted `default` network would put virbr0 in the root namespace).
    local rc_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        rc_added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine's unattended upgrades may hold dpkg's lock for a while: wait for it.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
    ((rc_added)) && rm -f /usr/sbin/policy-rc.d
    # Never autostart the default network: it must only come up inside NAME, by us.
    rm -f /etc/libvirt/qemu/networks/autostart/default.xml
}

# libvirtd decides whether KVM is usable by checking /dev/kvm as QEMU's user
# (libvirt-qemu, a member of `kvm`), while it probes QEMU's capabilities with root's view.
# A device node carrying another group (seen: gid 103 while kvm is 107; it depends on
# the machine image and on the order packages were installed) makes the two disagree.
# udev's rule on a normal host gives /dev/kvm to root:kvm 0660; make it so.
make_kvm_consistent() {
    if [[ ! -c /dev/kvm ]]; then
        log "/dev/kvm absent: libvirtd sees no KVM (guests run under TCG); nothing to change"
        return 0
    fi
    local kvm_gid qemu_user gid mode
    kvm_gid=$(getent group kvm | cut -d: -f3)
    [[ -n $kvm_gid ]] || die "/dev/kvm exists but there is no 'kvm' group (the qemu/libvirt packages create it); cannot make libvirt's view of KVM consistent"
    gid=$(stat -c %g /dev/kvm)
    mode=$(stat -c %a /dev/kvm)
    if [[ $gid != "$kvm_gid" ]]; then
        chgrp kvm /dev/kvm
        log "changed /dev/kvm's group from gid $gid to kvm (gid $kvm_gid), so that libvirtd and its QEMU user agree on whether KVM is usable"
    fi
    if (( (8#$mode & 8#060) != 8#060 )); then
        chmod g+rw /dev/kvm
        log "changed /dev/kvm's mode from $mode to $(stat -c %a /dev/kvm) (group kvm may read and write it)"
    fi
    qemu_user=$(awk -F'"' '/^[[:space:]]*user[[:space:]]*=/ {print $2}' /etc/libvirt/qemu.conf 2>/dev/null | tail -n1)
    qemu_user=${qemu_user:-libvirt-qemu}
    if id "$qemu_user" >/dev/null 2>&1 && ! id -nG "$qemu_user" | tr ' ' '\n' | grep -qx kvm; then
        usermod -aG kvm "$qemu_user"
        log "added $qemu_user (the user libvirt runs QEMU as) to group kvm"
    fi
}

# Milliseconds of one `virsh version`.
virsh_version_ms() {
    local t0 t1
    t0=$(date +%s%N)
    virsh -c "$URI" version >/dev/null 2>&1 || return 1
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000))
}

# The daemon must answer a plain call fast: the better of two calls (the first may carry
# the one legitimate capability probe of a fresh daemon) within FAST_MS.
check_fast() {
    local a b best
    a=$(virsh_version_ms) || { stop; die "libvirtd stopped answering 'virsh version' right after it started (see /var/log/libvirt)"; }
    b=$(virsh_version_ms) || { stop; die "libvirtd stopped answering 'virsh version' right after it started (see /var/log/libvirt)"; }
    best=$((a < b ? a : b))
    if ((best > FAST_MS)); then
        local kvm
        kvm=$(ls -ln /dev/kvm 2>/dev/null || echo "/dev/kvm absent")
        stop
        die "libvirtd answered 'virsh version' in ${a} ms and ${b} ms (limit ${FAST_MS} ms, LIBVIRT_FAST_MS): it is probably probing QEMU again on every call; /dev/kvm: $kvm; kvm group: $(getent group kvm || echo none)"
    fi
    log "libvirtd answers 'virsh version' in ${best} ms"
}

root_has_virbr() { ip -o link show 2>/dev/null | grep -q ': virbr'; }

start() {
    install_missing
    [[ -f /etc/libvirt/qemu/networks/autostart/default.xml ]] \
        && rm -f /etc/libvirt/qemu/networks/autostart/default.xml
    if pid_alive "$(pidfile_pid /var/run/libvirtd.pid)"; then
        die "a libvirtd is already running (pid $(cat /var/run/libvirtd.pid)); its socket is machine-wide, stop it first (systemctl stop libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket, or kill that pid)"
    fi
    root_has_virbr && die "a virbr* already exists in the root namespace; refusing"

    if ! ip netns list | grep -qw "^$NAME"; then
        ip netns add "$NAME"
    fi
    ip -n "$NAME" link set lo up
    make_kvm_consistent
    mkdir -p /var/log/libvirt /var/run/libvirt "$STATE"
    echo "$NAME" > "$STATE/current"

    pid_alive "$(pidfile_pid /var/run/virtlogd.pid)" \
        || ip netns exec "$NAME" virtlogd -d
    if [[ ${LIBVIRT_TCP:-0} == 1 ]]; then
        # Not in /etc/libvirt: a config of our own, used by this daemon only.
        printf 'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\ntcp_port = "16509"\n' \
            > "$STATE/libvirtd-tcp.conf"
        ip netns exec "$NAME" libvirtd -d --listen -f "$STATE/libvirtd-tcp.conf"
    else
        ip netns exec "$NAME" libvirtd -d
    fi

    local deadline=$((SECONDS + WAIT))
    until virsh -c "$URI" version >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "libvirtd did not answer within ${WAIT}s (see /var/log/libvirt)"
        sleep 0.2
    done
    log "libvirtd answers after ~$((SECONDS - deadline + WAIT))s"
    check_fast

    if ! virsh_ net-info default >/dev/null 2>&1; then
        virsh_ net-define /etc/libvirt/qemu/networks/default.xml >/dev/null \
            || die "no 'default' network definition"
    fi
    if ! virsh_ net-info default | grep -Eq '^Active:\s+yes'; then
        virsh_ net-start default >/dev/null
    fi
    virsh_ net-autostart --disable default >/dev/null 2>&1 || true

    ip -n "$NAME" -o link show virbr0 >/dev/null || die "virbr0 missing in netns $NAME"
    if root_has_virbr; then
        log "virbr* appeared in the ROOT namespace; tearing down"
        stop
        exit 1
    fi
    log "started: netns $NAME, virbr0 $(ip -n "$NAME" -o -4 addr show virbr0 | awk '{print $4}'), uri $URI"
}

stop() {
    # Domains and networks: everything this daemon runs is ours (it serves only tests).
    if virsh -c "$URI" version >/dev/null 2>&1; then
        local d n
        for d in $(virsh_ list --name --all); do
            virsh_ destroy "$d" >/dev/null 2>&1 || true
            virsh_ undefine --nvram "$d" >/dev/null 2>&1 \
                || virsh_ undefine "$d" >/dev/null 2>&1 || true
        done
        for n in $(virsh_ net-list --name); do
            virsh_ net-destroy "$n" >/dev/null 2>&1 || true
        done
        # Pools the tests (and the agent under test) defined: their directories are
        # temporary, and libvirt keeps pool definitions in /etc/libvirt/storage.
        for n in $(virsh_ pool-list --all --name | grep -E '^(nva-|node-vm-agent)' || true); do
            virsh_ pool-destroy "$n" >/dev/null 2>&1 || true
            virsh_ pool-undefine "$n" >/dev/null 2>&1 || true
        done
    fi
    # libvirt keeps the default network's leases across daemon runs; a later run would
    # list this run's (dead) guests in net-dhcp-leases. Only our daemons use virbr0.
    rm -f /var/lib/libvirt/dnsmasq/virbr0.status
    # The agent under test sets the network to autostart (as it should on a node); on
    # this machine it must never come up outside a test namespace.
    rm -f /etc/libvirt/qemu/networks/autostart/default.xml
    local p
    for f in /var/run/libvirtd.pid /var/run/virtlogd.pid; do
        p=$(pidfile_pid "$f")
        if pid_alive "$p"; then
            kill "$p"
            for _ in $(seq 50); do pid_alive "$p" || break; sleep 0.1; done
            pid_alive "$p" && kill -9 "$p"
        fi
    done
    if ip netns list | grep -qw "^$NAME"; then
        # Anything left inside (qemu, dnsmasq) was started by this script's daemon.
        for p in $(ip netns pids "$NAME"); do kill "$p" 2>/dev/null || true; done
        sleep 0.3
        for p in $(ip netns pids "$NAME"); do kill -9 "$p" 2>/dev/null || true; done
        ip netns delete "$NAME"
    fi
    rm -f "$STATE/current" "$STATE/libvirtd-tcp.conf"
    root_has_virbr && log "WARNING: a virbr* is present in the root namespace"
    log "stopped: $NAME"
}

# The first daemon start after an install writes into /etc/libvirt and
# /var/lib/libvirt (the default network's uuid and MAC, its DHCP host file). Done once
# here, before scripts/test.sh records the machine's state, so that its leak check
# compares what the tests did and not what a fresh install does on its first start.
prepare() {
    install_missing
    local net=/etc/libvirt/qemu/networks/default.xml
    if grep -q '<uuid>' "$net" 2>/dev/null && [[ -e /var/lib/libvirt/dnsmasq/default.hostsfile ]]; then
        log "prepared already (the default network has its uuid and DHCP host file)"
        return 0
    fi
    log "first start after the install, in netns $NAME, so that its writes come before the suite"
    start
    stop
}

case $CMD in
    start) start ;;
    stop) stop ;;
    prepare) prepare ;;
    *) die "usage: libvirt-netns.sh start|stop|prepare NAME" ;;
esac
