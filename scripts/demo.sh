#!/usr/bin/env bash
# The agent's main job, end to end, in a throw-away sandbox:
#   client ns --(10.77.1.0/24)-- node ns [agent, bridge] --(10.77.2.0/24)-- vm ns (HTTP)
# A TCP port map created through the authenticated API takes the client's request to
# the node's port 8080 to the vm's HTTP server. Then a real libvirtd inside the node
# namespace (scripts/libvirt-netns.sh) boots a real VM created through the API (the tiny
# TCG guest of scripts/build-tiny-guest.sh, with its cloud-init seed) at the address the
# agent pinned for it, and a second port map reaches the VM's own HTTP server.
# Everything lives in namespaces this script creates, and is removed on exit unless
# --keep is given.
#
# Usage: scripts/demo.sh [--keep] [--no-vm]
#   AGENT_BIN=path   use this binary instead of building target/release/node-vm-agent
set -euo pipefail

cd "$(dirname "$0")/.."

KEEP=0
WITH_VM=1
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        --no-vm) WITH_VM=0 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "demo.sh: must run as root (it creates network namespaces)" >&2
    exit 1
fi
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

# Bold headings on a terminal only: a log file gets no escape codes.
if [[ -t 1 ]]; then
    say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    say() { printf '\n== %s\n' "$*"; }
fi

say "dependencies"
scripts/install-deps.sh demo

if [[ -z ${AGENT_BIN:-} ]]; then
    say "building the release binary (the first time 4 to 11 min on 2 cores)"
    cargo build --locked --release
    AGENT_BIN=$PWD/target/release/node-vm-agent
fi

ID=$$
CLIENT=nva-$ID-demo-client
NODE=nva-$ID-demo-node
VM=nva-$ID-demo-vm
BRIDGE=nvademo0
API=http://10.77.1.1:8000
WORK=$(mktemp -d /tmp/nva-demo.XXXXXX)
DATA=$WORK/data
TOKEN=
mkdir -p "$DATA" "$WORK/www"
chmod 755 "$WORK"   # libvirt's QEMU (another user) reads the pool and the guest's kernel
AGENT_PID=
HTTP_PID=

# Written out so that a --keep sandbox can be removed later by hand.
cat > "$WORK/cleanup.sh" <<CLEAN
#!/usr/bin/env bash
# Removes the demo sandbox $ID.
kill \$(cat "$WORK/agent.pid" 2>/dev/null) \$(cat "$WORK/http.pid" 2>/dev/null) 2>/dev/null || true
sleep 0.5
if [ -f "$WORK/libvirtd.on" ]; then "$PWD/scripts/libvirt-netns.sh" stop $NODE || true; fi
for ns in $CLIENT $NODE $VM; do ip netns delete "\$ns" 2>/dev/null || true; done
rm -rf "$WORK"
CLEAN
chmod +x "$WORK/cleanup.sh"

cleanup() {
    local rc=$?
    if ((KEEP)) && ((rc == 0)); then
        cat <<INFO

Sandbox kept. Try:
  ip netns exec $CLIENT curl -s http://10.77.1.1:8080/
  ip netns exec $CLIENT curl -s -H 'Authorization: Bearer $TOKEN' $API/ports
  ip netns exec $NODE nft list table ip node_vm_agent
  sqlite3 $DATA/agent.db .tables
Agent log: $WORK/agent.log
Remove it with: $WORK/cleanup.sh
INFO
        return
    fi
    say "cleaning up"
    if [[ -n $AGENT_PID ]]; then kill "$AGENT_PID" 2>/dev/null || true; wait "$AGENT_PID" 2>/dev/null || true; fi
    if [[ -n $HTTP_PID ]]; then kill "$HTTP_PID" 2>/dev/null || true; wait "$HTTP_PID" 2>/dev/null || true; fi
    if ((rc != 0)) && [[ -f $WORK/agent.log ]]; then
        echo "--- agent log ---"; tail -n 50 "$WORK/agent.log"
    fi
    "$WORK/cleanup.sh"
    echo "done (exit $rc)"
}
trap cleanup EXIT

# in_ns, sandbox_up: the namespaces and links, nothing in the root namespace.
source scripts/sandbox-net.sh

say "sandbox: namespaces $CLIENT, $NODE, $VM; bridge $BRIDGE inside $NODE"
sandbox_up $CLIENT $NODE $VM $BRIDGE 10.77

say "the vm serves HTTP on 10.77.2.2:80"
echo "hello from the vm behind $BRIDGE" > "$WORK/www/index.html"
# `ip netns exec` directly (not the in_ns function) so that $! is the server's own pid:
# a backgrounded function would be a subshell, and killing it would leave the server.
ip netns exec $VM python3 -m http.server 80 --bind 10.77.2.2 --directory "$WORK/www" \
    > "$WORK/http.log" 2>&1 &
HTTP_PID=$!
echo $HTTP_PID > "$WORK/http.pid"
# python needs a moment to bind; ask it directly from the node (bounded).
for _ in $(seq 1 50); do
    if in_ns $NODE curl -fsS --max-time 1 http://10.77.2.2/ > /dev/null 2>&1; then break; fi
    sleep 0.2
done

VM_ENV=()
if ((WITH_VM)); then
    say "libvirtd inside $NODE (its bridge virbr0 and DHCP exist only there) and the tiny guest"
    touch "$WORK/libvirtd.on"
    scripts/libvirt-netns.sh start $NODE
    scripts/build-tiny-guest.sh "$WORK/guest"
    VM_ENV=(LIBVIRT_URI=qemu:///system VMS_DOMAIN_TYPE=qemu VMS_WORK_DIR="$WORK/pool"
        VMS_POOL=nva-demo-$ID ALLOWED_TARGETS=192.168.122.0/24 VMS_DEFAULT_IMAGE_URL=)
fi

say "starting the agent in $NODE"
# No API_TOKEN: the agent generates one into $DATA/api.token (mode 0600), as on a node.
ip netns exec $NODE env -u API_TOKEN -u PORTMAP_TOKEN DATA_DIR="$DATA" NODE_API_PORT=8000 API_LISTEN=0.0.0.0 \
    VMS_BRIDGE=$BRIDGE VM_SUBNET=10.77.2.0/24 EXTERNAL_IFACE=ext0 "${VM_ENV[@]}" \
    "$AGENT_BIN" serve > "$WORK/agent.log" 2>&1 &
AGENT_PID=$!
echo $AGENT_PID > "$WORK/agent.pid"
for _ in $(seq 1 100); do
    if in_ns $CLIENT curl -fsS --max-time 2 $API/health > /dev/null 2>&1; then break; fi
    if ! kill -0 $AGENT_PID 2>/dev/null; then echo "agent exited" >&2; exit 1; fi
    sleep 0.2
done
echo "GET /health -> $(in_ns $CLIENT curl -sS --max-time 2 $API/health)"
TOKEN=$(cat "$DATA/api.token")
echo "token generated by the agent: $DATA/api.token ($(stat -c %a "$DATA/api.token"))"

auth=(-H "Authorization: Bearer $TOKEN")

# How long libvirtd takes to answer a plain call: the usual reason a VM call is slow.
libvirtd_speed() {
    local t0
    t0=$(date +%s%N)
    if timeout 60 virsh -c qemu:///system version > /dev/null 2>&1; then
        echo "libvirtd answered virsh version in $((($(date +%s%N) - t0) / 1000000)) ms"
    else
        echo "libvirtd did not answer virsh version within 60 s"
    fi
}

# vm_call "WHAT" SECONDS CURL-ARGS...: an API call through libvirt, from the client. It
# may take minutes on a slow libvirtd; when it does not answer in time, say what was slow.
vm_call() {
    local what=$1 secs=$2 rc=0
    shift 2
    in_ns $CLIENT curl -fsS --max-time "$secs" "${auth[@]}" "$@" || rc=$?
    if ((rc == 28)); then
        echo "demo.sh: $what did not answer within $secs s; $(libvirtd_speed)" >&2
    elif ((rc != 0)); then
        echo "demo.sh: $what failed (curl exit $rc)" >&2
    fi
    return $rc
}
say "without the token the API refuses"
in_ns $CLIENT curl -sS --max-time 5 -w ' (HTTP %{http_code})\n' $API/ports

say "POST /ports: node port 8080/tcp -> 10.77.2.2:80"
in_ns $CLIENT curl -fsS --max-time 5 "${auth[@]}" -H 'Content-Type: application/json' \
    -d '{"listen_port":8080,"target_ip":"10.77.2.2","target_port":80,"proto":"tcp"}' \
    $API/ports
echo

say "curl from the client to the node's 10.77.1.1:8080"
in_ns $CLIENT curl -fsS --max-time 5 http://10.77.1.1:8080/

say "GET /ports"
in_ns $CLIENT curl -fsS --max-time 5 "${auth[@]}" $API/ports
echo

say "nft list table ip node_vm_agent (in $NODE)"
in_ns $NODE nft list table ip node_vm_agent

if ((WITH_VM)); then
    say "POST /images/tiny: a 4 MiB raw disk image, streamed into libvirt's pool"
    head -c $((4 << 20)) /dev/zero > "$WORK/tiny.img"
    vm_call "POST /images/tiny" 300 --data-binary @"$WORK/tiny.img" \
        -H 'Content-Type: application/octet-stream' $API/images/tiny
    echo
    say "POST /vms: demo1 (256 MiB, 1 vCPU, 1 GiB qcow2 disk backed by the image, direct kernel boot)"
    vm_call "POST /vms" 300 -H 'Content-Type: application/json' -d "{
        \"name\": \"demo1\", \"memory_mib\": 256, \"vcpus\": 1, \"disk_size_gb\": 1, \"image\": \"tiny\",
        \"kernel\": \"$WORK/guest/vmlinuz\", \"initrd\": \"$WORK/guest/initramfs.cpio.gz\",
        \"cmdline\": \"console=ttyS0 loglevel=4 panic=-1\"}" $API/vms
    echo
    say "GET /vms/demo1/ip: the address the agent pinned for demo1 (a DHCP host entry written before it booted)"
    IPJSON=$(vm_call "GET /vms/demo1/ip" 330 "$API/vms/demo1/ip?timeout=300")
    echo "$IPJSON"
    VMIP=$(sed -n 's/.*"ip":"\([0-9.]*\)".*/\1/p' <<<"$IPJSON")
    say "POST /ports: node port 8081/tcp -> $VMIP:80 (the VM's HTTP server)"
    in_ns $CLIENT curl -fsS --max-time 5 "${auth[@]}" -H 'Content-Type: application/json' \
        -d "{\"listen_port\":8081,\"target_ip\":\"$VMIP\",\"target_port\":80}" $API/ports
    echo
    say "curl from the client to the node's 10.77.1.1:8081: the VM answers with the hostname and instance-id from its seed"
    echo "(waiting for the guest to boot under TCG and take its lease: about 10 s, at most 300 s)"
    booted=0
    for _ in $(seq 1 300); do
        if in_ns $CLIENT curl -fsS --max-time 2 http://10.77.1.1:8081/hostname > /dev/null 2>&1; then booted=1; break; fi
        sleep 1
    done
    ((booted)) || { echo "demo.sh: the VM did not answer on 10.77.1.1:8081 within 300 s; $(libvirtd_speed)" >&2; exit 1; }
    echo "hostname:    $(in_ns $CLIENT curl -fsS --max-time 5 http://10.77.1.1:8081/hostname)"
    echo "instance-id: $(in_ns $CLIENT curl -fsS --max-time 5 http://10.77.1.1:8081/instance-id)"
    say "GET /vms"
    vm_call "GET /vms" 180 $API/vms
    echo
    say "DELETE /vms/demo1?delete_files=true (its port map goes with it)"
    vm_call "DELETE /vms/demo1" 300 -X DELETE "$API/vms/demo1?delete_files=true"
    echo
fi

if [[ -f $DATA/agent.db ]]; then
    say "the SQLite state ($DATA/agent.db)"
    sqlite3 "$DATA/agent.db" .tables
    # The audit trail an operator reads; the table name is the agent's (port_maps today).
    sqlite3 -header -column "$DATA/agent.db" 'select * from port_maps' 2>/dev/null || true
    sqlite3 -header -column "$DATA/agent.db" 'select name, state, source, size_bytes, sha256 from images' 2>/dev/null || true
    sqlite3 -header -column "$DATA/agent.db" 'select at, identity, action, outcome, status from audit_log' 2>/dev/null || true
fi
say "demo OK"
