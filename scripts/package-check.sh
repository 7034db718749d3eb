#!/usr/bin/env bash
# Proves the Debian package and its systemd unit on a clean Debian 12 root:
#   1. builds the package (scripts/package.sh; --dev: from the debug binary the test
#      suite built, else a release build);
#   2. installs it with `dpkg -i` into a fresh debootstrapped bookworm root (made once and
#      kept in target/package-check/base; the first run needs Debian's mirror, ~2 min);
#   3. checks what a new user sees: `node-vm-agent --version` with the commit, the files,
#      /var/lib/node-vm-agent mode 0700, the defaults file a conffile, the unit clean under
#      `systemd-analyze verify` and scoring at most 3.0 under
#      `systemd-analyze security --offline=yes`;
#   4. boots that root with systemd as init (systemd-nspawn, inside a network namespace of
#      its own, so nothing touches the machine's network) and runs the service as an
#      operator would: `systemctl enable --now` returns once the agent said READY=1; the
#      API answers, a port map reaches the namespace's nftables table, forwarding was
#      turned on through the sandbox, the process has only CAP_NET_ADMIN, no new
#      privileges and a seccomp filter; a frozen agent (SIGSTOP) is killed by the watchdog
#      and restarted with its map; `systemctl stop` stops it;
#   5. purges the package: binary and state gone.
# Needs root, debootstrap, systemd-container and systemd (scripts/install-deps.sh).
# Exit status 0 only when every check passed; each failure is said on its own line.
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MAX_EXPOSURE=3.0
WORK=target/package-check
BASE=$WORK/base
TOKEN=package-check-token-0123456789abcdef

say() { echo "package-check: $*" >&2; }
# (Checks below pipe into `grep -c`, never `grep -q`: -q stops reading at the first match,
# the writer dies of SIGPIPE, and pipefail fails the check.)
fail() {
    say "FAILED: $*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "must run as root (chroot, dpkg -i, systemd-nspawn, ip netns)"
for tool in debootstrap systemd-nspawn systemd-analyze ip nft curl; do
    command -v "$tool" >/dev/null || fail "$tool not found: run scripts/install-deps.sh"
done

deb=$(scripts/package.sh "$@" | tail -n 1)
[[ -f $deb ]] || fail "scripts/package.sh made no .deb"
commit=$(git rev-parse --short=12 HEAD)

# --- A clean Debian 12 root with systemd, made once --------------------------------
mkdir -p "$WORK"
# systemd to boot it; libvirt0, the package's Recommends, for the VM API.
INCLUDE=systemd,systemd-sysv,dbus,libvirt0
if [[ $(cat "$BASE/.complete" 2>/dev/null) != "$INCLUDE" ]]; then
    say "debootstrap bookworm (minbase + $INCLUDE) into $BASE from $MIRROR"
    rm -rf "$BASE"
    debootstrap --variant=minbase --include="$INCLUDE" bookworm "$BASE" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap failed; see $WORK/debootstrap.log"
    # No getty on a console nobody reads; the boot is quicker and quieter without them.
    chroot "$BASE" systemctl mask console-getty.service getty@.service >/dev/null 2>&1 || true
    echo "$INCLUDE" >"$BASE/.complete"
fi
ROOT=$(mktemp -d /var/tmp/nva-pkgcheck.XXXXXX)
NS=nva-$$-pkgcheck
NSPAWN_PID=
CONTROLLER_PID=
cleanup() {
    [[ -z $CONTROLLER_PID ]] || kill "$CONTROLLER_PID" 2>/dev/null || true
    if [[ -n $NSPAWN_PID ]]; then
        # nspawn asks the container's systemd to halt; give it 10 s, then kill it all.
        kill "$NSPAWN_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$NSPAWN_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$NSPAWN_PID" 2>/dev/null || true
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    ip netns delete "$NS" 2>/dev/null || true
    rm -rf "$ROOT"
}
trap cleanup EXIT
cp -a "$BASE/." "$ROOT/"

# --- dpkg -i -------------------------------------------------------------------------
cp "$deb" "$ROOT/tmp/node-vm-agent.deb"
chroot "$ROOT" dpkg -i /tmp/node-vm-agent.deb >"$WORK/dpkg.log" 2>&1 ||
    fail "dpkg -i failed: $(cat "$WORK/dpkg.log")"
say "dpkg -i $(basename "$deb"): installed"
version=$(chroot "$ROOT" node-vm-agent --version)
[[ $version == "node-vm-agent $(dpkg-deb -f "$deb" Version | cut -d- -f1) ($commit"* ]] ||
    fail "--version printed '$version', not the version and commit $commit"
say "node-vm-agent --version: $version"
for f in /usr/bin/node-vm-agent /usr/lib/systemd/system/node-vm-agent.service \
    /etc/default/node-vm-agent /usr/share/doc/node-vm-agent/README.md \
    /usr/share/doc/node-vm-agent/packaging.md /usr/share/doc/node-vm-agent/copyright; do
    [[ -e $ROOT$f ]] || fail "$f not installed"
done
mode=$(stat -c %a "$ROOT/var/lib/node-vm-agent")
[[ $mode == 700 ]] || fail "/var/lib/node-vm-agent has mode $mode, not 700"
chroot "$ROOT" dpkg-query -W -f='${Conffiles}' node-vm-agent | grep -c /etc/default/node-vm-agent >/dev/null ||
    fail "/etc/default/node-vm-agent is not a conffile (an upgrade would overwrite it)"
say "files in place; /var/lib/node-vm-agent mode 700; /etc/default/node-vm-agent a conffile"

# --- The unit: clean and tight -------------------------------------------------------
verify=$(systemd-analyze --root="$ROOT" verify node-vm-agent.service 2>&1) ||
    fail "systemd-analyze verify: $verify"
[[ -z $verify ]] || fail "systemd-analyze verify complained: $verify"
exposure=$(systemd-analyze --root="$ROOT" security --offline=yes --no-pager node-vm-agent.service 2>&1 |
    sed -n 's/.*Overall exposure level for node-vm-agent.service: \([0-9.]*\).*/\1/p')
[[ -n $exposure ]] || fail "systemd-analyze security gave no exposure level"
awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e <= max) }' ||
    fail "exposure $exposure is above $MAX_EXPOSURE"
say "systemd-analyze verify: clean; security --offline=yes: exposure $exposure (at most $MAX_EXPOSURE)"

# --- Boot it, run the service ------------------------------------------------------
ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward'
# A stand-in controller on the namespace's loopback: its answer to POST /join brings up
# the node's WireGuard device (userspace: these machines have no wireguard module).
ip netns exec "$NS" python3 -c '
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"ok": True, "node_id": "pkg-node", "node_ip": "10.50.0.2",
            "controller_pubkey": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "endpoint": "127.0.0.1:51820", "allowed_ips": "10.50.0.1/32",
            "wg_net": "10.50.0.0/24"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 5000), H).serve_forever()
' &
CONTROLLER_PID=$!
cat >>"$ROOT/etc/default/node-vm-agent" <<EOF
API_LISTEN=127.0.0.1
API_TOKEN=$TOKEN
VM_SUBNET=10.99.0.0/24
CONTROLLER_URL=http://127.0.0.1:5000
JOIN_TOKEN=package-check-join-token
NODE_ID=pkg-node
WG_MODE=userspace
LIBVIRT_URI=test:///default
EOF
systemd-nspawn --quiet --keep-unit --register=no --directory="$ROOT" \
    --network-namespace-path="/run/netns/$NS" --capability=CAP_NET_ADMIN --boot --console=pipe \
    </dev/null >"$WORK/boot.log" 2>&1 &
NSPAWN_PID=$!
init_pid=
state=
for _ in $(seq 1 300); do
    # The container's init: nspawn's child (none yet while it sets up: ps fails).
    init_pid=$(ps -o pid= --ppid "$NSPAWN_PID" 2>/dev/null | head -n 1 | tr -d ' ' || true)
    if [[ -n $init_pid ]]; then
        state=$(nsenter -t "$init_pid" -a systemctl is-system-running 2>/dev/null || true)
        [[ $state == running || $state == degraded ]] && break
    fi
    kill -0 "$NSPAWN_PID" 2>/dev/null || fail "systemd-nspawn exited: $(cat "$WORK/boot.log")"
    sleep 0.2
done
[[ $state == running || $state == degraded ]] || fail "the root did not boot (state '$state')"
inside() { nsenter -t "$init_pid" -a "$@"; }
say "booted the root with systemd-nspawn in namespace $NS (system state: $state)"

inside systemctl enable --now node-vm-agent.service >/dev/null 2>&1 ||
    fail "systemctl enable --now failed: $(inside journalctl -u node-vm-agent --no-pager | tail -n 20)"
prop() { inside systemctl show -p "$1" --value node-vm-agent.service; }
[[ $(prop ActiveState) == active ]] || fail "not active after start"
[[ $(prop StatusText) == "API on 127.0.0.1:8000; 0 port maps applied" ]] ||
    fail "status text '$(prop StatusText)' (READY=1 with STATUS= not seen)"
say "systemctl enable --now: active, status '$(prop StatusText)'"

api() { ip netns exec "$NS" curl -sS -m 5 -H "Authorization: Bearer $TOKEN" "$@"; }
health=$(api http://127.0.0.1:8000/health)
[[ $health == *'"ok":true'* ]] || fail "/health answered '$health'"
api -X POST -H 'Content-Type: application/json' \
    -d '{"listen_port": 8080, "target_ip": "10.99.0.2", "target_port": 80}' \
    http://127.0.0.1:8000/ports | grep -c '"listen_port":8080' >/dev/null || fail "POST /ports was refused"
ip netns exec "$NS" nft list map ip node_vm_agent tcp_ports | grep -Ec '8080 .*: 10\.99\.0\.2 \. 80' >/dev/null ||
    fail "the map is not in the namespace's nftables table: $(ip netns exec "$NS" nft list ruleset)"
[[ $(ip netns exec "$NS" cat /proc/sys/net/ipv4/ip_forward) == 1 ]] ||
    fail "the agent could not turn on forwarding from its sandbox"
say "API answers; a port map is in the kernel; forwarding turned on from the sandbox"
for _ in $(seq 1 100); do
    [[ $(api http://127.0.0.1:8000/health) == *'"join":"joined"'* ]] && break
    sleep 0.1
done
[[ $(api http://127.0.0.1:8000/health) == *'"join":"joined"'* ]] ||
    fail "no mesh join from the sandbox: $(api http://127.0.0.1:8000/health)"
ip -n "$NS" -br addr show wg0 | grep -c '10.50.0.2/32' >/dev/null ||
    fail "no WireGuard device wg0 with 10.50.0.2: $(ip -n "$NS" -br addr)"
# libvirt.so.0, loaded on the first VM call, with libvirt's in-process test driver.
vms=$(api http://127.0.0.1:8000/vms)
[[ $vms == *'"vms":['* ]] || fail "GET /vms (libvirt test driver) answered '$vms'"
say "joined the stand-in controller: wg0 (userspace WireGuard) up with 10.50.0.2; libvirt loaded: GET /vms answers"

pid=$(prop MainPID)
status=$(inside cat "/proc/$pid/status")
grep -q '^CapBnd:[[:space:]]*0000000000001000$' <<<"$status" ||
    fail "capability bounding set is not CAP_NET_ADMIN alone: $(grep CapBnd <<<"$status")"
grep -q '^NoNewPrivs:[[:space:]]*1$' <<<"$status" || fail "NoNewPrivs is not set"
grep -q '^Seccomp:[[:space:]]*2$' <<<"$status" || fail "no seccomp filter"
inside nsenter -t "$pid" -m test -c /dev/net/tun || fail "/dev/net/tun not in the sandbox"
inside nsenter -t "$pid" -m sh -c '! touch /usr/bin/x 2>/dev/null && [ -z "$(ls -A /root)" ]' ||
    fail "/usr writable or /root readable in the sandbox"
say "sandbox: CapBnd CAP_NET_ADMIN only, NoNewPrivs, seccomp, /usr read-only, /root hidden, /dev/net/tun present"

# The watchdog: a frozen agent is killed and started again, its map back from SQLite.
mkdir -p "$ROOT/etc/systemd/system/node-vm-agent.service.d"
printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n' \
    >"$ROOT/etc/systemd/system/node-vm-agent.service.d/check.conf"
inside systemctl daemon-reload
inside systemctl restart node-vm-agent.service
pid=$(prop MainPID)
restarts=$(prop NRestarts)
inside systemctl kill --signal=SIGSTOP --kill-whom=main node-vm-agent.service
for _ in $(seq 1 150); do
    now=$(prop MainPID)
    [[ $now != "$pid" && $now != 0 && $(prop ActiveState) == active ]] && break
    sleep 0.1
done
[[ $(prop MainPID) != "$pid" && $(prop ActiveState) == active ]] ||
    fail "the frozen agent was not restarted (state $(prop ActiveState), pid $(prop MainPID))"
((restarts < $(prop NRestarts))) || fail "NRestarts did not grow"
inside journalctl -u node-vm-agent --no-pager | grep -c 'Watchdog timeout' >/dev/null ||
    fail "the journal does not say the watchdog fired"
api http://127.0.0.1:8000/ports | grep -c '"listen_port":8080' >/dev/null || fail "the map is gone after the restart"
say "watchdog: SIGSTOPped agent killed after 2 s and restarted (NRestarts $(prop NRestarts)), map kept"

inside systemctl stop node-vm-agent.service
[[ $(prop ActiveState) == inactive ]] || fail "systemctl stop left it $(prop ActiveState)"
# journald reads the service's output on its own time: wait for the last line.
for _ in $(seq 1 50); do
    inside journalctl -u node-vm-agent --no-pager | grep -c 'INFO node_vm_agent::agent: stopped' >/dev/null && break
    sleep 0.1
done
inside journalctl -u node-vm-agent --no-pager | grep -c 'INFO node_vm_agent::agent: stopped' >/dev/null ||
    fail "the agent did not log 'stopped'"
inside journalctl -u node-vm-agent --no-pager >"$WORK/journal.log" 2>&1 || true
say "systemctl stop: inactive"

inside systemctl poweroff >/dev/null 2>&1 || true
for _ in $(seq 1 100); do
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$NSPAWN_PID" 2>/dev/null && fail "the container did not power off within 10 s"
wait "$NSPAWN_PID" 2>/dev/null || true
NSPAWN_PID=

# --- Purge ------------------------------------------------------------------------------
chroot "$ROOT" dpkg --purge node-vm-agent >>"$WORK/dpkg.log" 2>&1 || fail "dpkg --purge failed"
[[ ! -e $ROOT/usr/bin/node-vm-agent && ! -e $ROOT/var/lib/node-vm-agent ]] ||
    fail "dpkg --purge left the binary or /var/lib/node-vm-agent"
say "dpkg --purge: binary and state removed"
say "passed"
