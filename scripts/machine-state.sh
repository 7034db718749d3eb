#!/usr/bin/env bash
# What the test suite could leave behind on this machine, written as sorted lines, and
# the comparison of two such records: scripts/test.sh records it after its setup and
# compares at its end, failing with the lines that differ.
#
# Usage: scripts/machine-state.sh record FILE     # write the machine's state to FILE
#        scripts/machine-state.sh compare FILE    # compare now with FILE; exit 1 on a leak
#
# Recorded (each line says which kind it is):
#   libvirt   every file under /etc/libvirt (domain, network and pool definitions, the
#             networks' DHCP host entries, autostart links) with its SHA-256, and the
#             DHCP host files libvirt writes from them (/var/lib/libvirt/dnsmasq/*.hostsfile)
#   netns     the network namespaces (`ip netns list`)
#   link      the root namespace's links
#   nft       the root namespace's nftables ruleset (counter values left out)
#   process   processes of the kinds the suite starts (libvirtd, virtlogd, dnsmasq, QEMU,
#             the agent, wireguard-go, systemd-nspawn), and any process whose network
#             namespace is not the root's
#   wgsock    userspace WireGuard control sockets (/var/run/wireguard)
#   tmp       the suite's scratch directories (/tmp/nva-*)
# Process lines carry no pid: a daemon that was there at the start and is there at the
# end is the same line, while one more of a kind is a leak.
set -euo pipefail

CMD=${1:?usage: machine-state.sh record|compare FILE}
FILE=${2:?usage: machine-state.sh record|compare FILE}

# Program names of what the suite starts; matched against /proc/PID/comm.
KINDS='^(libvirtd|virtlogd|virtlockd|dnsmasq|qemu-system-.*|node-vm-agent|wireguard-go|systemd-nspawn)$'

state() {
    local f p comm ns root_ns
    if [[ -d /etc/libvirt ]]; then
        find /etc/libvirt -type f -print0 | sort -z | xargs -0r sha256sum \
            | awk '{print "libvirt " $2 " " $1}'
        find /etc/libvirt -type l -printf 'libvirt %p -> %l\n' | sort
    fi
    for f in /var/lib/libvirt/dnsmasq/*.hostsfile; do
        [[ -e $f ]] && echo "libvirt $f $(sha256sum < "$f" | cut -c1-64)"
    done
    ip netns list 2>/dev/null | awk '{print "netns " $1}' | sort
    ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print "link " $2}' | sort
    if command -v nft >/dev/null; then
        nft list ruleset 2>/dev/null \
            | sed -E 's/counter packets [0-9]+ bytes [0-9]+/counter/' \
            | awk 'NF {print "nft " $0}'
    fi
    # This script runs in the root namespace (scripts/test.sh does).
    root_ns=$(readlink /proc/$$/ns/net)
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        ns=$(readlink "$p/ns/net" 2>/dev/null) || continue
        if [[ $ns != "$root_ns" ]]; then
            echo "process $comm (in network namespace $ns)"
        elif [[ $comm =~ $KINDS ]]; then
            echo "process $comm"
        fi
    done | sort
    if [[ -d /var/run/wireguard ]]; then
        find /var/run/wireguard -mindepth 1 -printf 'wgsock %p\n' | sort
    fi
    find /tmp -maxdepth 1 -name 'nva-*' -printf 'tmp %p\n' 2>/dev/null | sort
}

case $CMD in
    record)
        state > "$FILE"
        ;;
    compare)
        [[ -f $FILE ]] || { echo "machine-state: no record $FILE" >&2; exit 2; }
        now=$(mktemp)
        trap 'rm -f "$now"' EXIT
        state > "$now"
        if diff -q "$FILE" "$now" >/dev/null; then
            echo "machine-state: the machine is as it was ($(wc -l < "$now") lines compared)" >&2
            exit 0
        fi
        echo "machine-state: the suite left the machine changed ('-' was there at the start, '+' is there now):" >&2
        # (diff exits 1 on a difference: not an error here.)
        changes=$(diff "$FILE" "$now" || true)
        grep -E '^[<>]' <<< "$changes" | sed -e 's/^</  -/' -e 's/^>/  +/' >&2
        # A changed libvirt file: show how (the DHCP host entries a test left, say).
        for f in $(awk '/^[<>] libvirt \// {print $3}' <<< "$changes" | sort -u); do
            if [[ -f $f ]]; then
                echo "  $f now holds:" >&2
                grep -E '<host |,' "$f" 2>/dev/null | sed 's/^/    /' >&2 || true
            fi
        done
        exit 1
        ;;
    *)
        echo "usage: machine-state.sh record|compare FILE" >&2
        exit 2
        ;;
esac
