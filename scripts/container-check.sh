#!/usr/bin/env bash
# Builds the Dockerfile with podman and runs the image for real (issue 15):
#   1. makes the base images locally when they are missing (no registry is reachable
#      here): debian:bookworm-slim from a debootstrap of Debian's mirror, trimmed the way
#      the official slim image is, and rust:1-bookworm = that base + gcc + this machine's
#      Rust toolchain laid out as in the official rust image;
#   2. builds the image (RUN steps on the host's network, no bridge anywhere), then
#      rebuilds it after changing a source file: the build time with a warm dependency
#      cache;
#   3. runs it inside a network namespace (client ns -- node ns [container, bridge] --
#      vm ns with an HTTP server, the shape of scripts/demo.sh) with --network host,
#      CAP_NET_ADMIN and a data volume, and checks /health, a port map carrying traffic,
#      and that the map survives `podman restart`.
# Prints one `container-check: ...` line per check passed; exits 0 only when all passed.
# Removes its namespaces, container and volume on exit; the images stay (they are the
# cache of the next run). Not part of the default test command.
#
# Usage: scripts/container-check.sh [--cold] [--rebuild-bases] [--no-warm]
#   --cold           build the image once without the layer cache first (a cold build,
#                    about 10+ min on 2 cores), then the warm rebuild
#   --rebuild-bases  make the base images again even when local ones exist
#   --no-warm        skip the warm rebuild (the image is still built, cached or not)
#   IMAGE=name       tag of the image (default localhost/node-vm-agent:check)
set -euo pipefail

cd "$(dirname "$0")/.."
SRC=$PWD

COLD=0
REBUILD_BASES=0
WARM=1
for arg in "$@"; do
    case "$arg" in
        --cold) COLD=1 ;;
        --rebuild-bases) REBUILD_BASES=1 ;;
        --no-warm) WARM=0 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "container-check: unknown argument $arg" >&2; exit 2 ;;
    esac
done

IMAGE=${IMAGE:-localhost/node-vm-agent:check}
SLIM=localhost/debian:bookworm-slim
RUST=localhost/rust:1-bookworm
MIRROR=http://deb.debian.org/debian
SUITE=bookworm
MADE_BY=node-vm-agent.container-check
SIZE_TARGET_MB=100

ok() { echo "container-check: $*"; }
say() { printf '\n== %s\n' "$*"; }
die() { echo "container-check: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------
say "host"
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, network namespaces, rootful podman)"

# Debian package of each command the script uses.
declare -A PKG=([podman]=podman [buildah]=buildah [crun]=crun [debootstrap]=debootstrap
    [ip]=iproute2 [nft]=nftables [curl]=curl [python3]=python3 [nsenter]=util-linux
    [tar]=tar [git]=git)
missing=()
for cmd in "${!PKG[@]}"; do
    command -v "$cmd" > /dev/null || missing+=("${PKG[$cmd]}")
done
if ((${#missing[@]})); then
    echo "installing missing packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "could not install ${missing[*]} with apt-get"
fi
ok "tools present: podman $(podman --version | awk '{print $3}'), buildah $(buildah --version | awk '{print $3}'), crun $(crun --version | awk 'NR==1{print $3}'), debootstrap $(dpkg-query -W -f='${Version}' debootstrap)"

WORK=$(mktemp -d /var/tmp/nva-container-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# podman's settings for this machine, in a containers.conf of this run (CONTAINERS_CONF,
# read by podman build and run alike), from what the host is like.
CGROUPS=v1
[[ -f /sys/fs/cgroup/cgroup.controllers ]] && CGROUPS=v2
grep -qw overlay /proc/filesystems || die "the kernel has no overlay filesystem (podman's storage driver)"
ENGINE=()
CONTAINERS=()
DETECTED="PID 1 is $(cat /proc/1/comm)"
if [[ $(cat /proc/1/comm) != systemd ]]; then
    # No systemd: cgroups through cgroupfs, events to a file rather than journald.
    ENGINE+=('cgroup_manager = "cgroupfs"' 'events_logger = "file"')
fi
if [[ $CGROUPS == v1 && -n $(cat /sys/fs/cgroup/unified/cgroup.controllers 2> /dev/null) ]]; then
    # Hybrid cgroups with a controller on the v2 side: crun refuses to create any
    # container ("cgroups in hybrid mode not supported"); runc accepts it.
    DETECTED+=", cgroup v1 hybrid (controllers on cgroup2: $(tr '\n' ' ' < /sys/fs/cgroup/unified/cgroup.controllers | sed 's/ $//'))"
    command -v runc > /dev/null || {
        echo "installing runc (crun cannot run containers on hybrid cgroups)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runc > /dev/null \
            || die "could not install runc"
    }
    ENGINE+=('runtime = "runc"')
else
    DETECTED+=", cgroup $CGROUPS"
fi
capeff=$(awk '/^CapEff:/{print $2}' /proc/self/status)
if (((16#$capeff >> 24 & 1) == 0)); then
    # Without CAP_SYS_RESOURCE no process may raise a hard limit, and podman's defaults
    # (1048576 open files and processes) are above this machine's: containers get the
    # limits podman itself has (processes: at most kernel.pid_max).
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max)
    if [[ $nproc == unlimited ]] || ((nproc > pid_max)); then nproc=$pid_max; fi
    CONTAINERS+=("default_ulimits = [\"nofile=$(ulimit -Hn):$(ulimit -Hn)\", \"nproc=$nproc:$nproc\"]")
    DETECTED+=", no CAP_SYS_RESOURCE (hard limits: $(ulimit -Hn) open files, $(ulimit -Hu) processes)"
fi
export CONTAINERS_CONF=$WORK/containers.conf
{
    echo "# written by scripts/container-check.sh for this run"
    echo "[containers]"; printf '%s\n' "${CONTAINERS[@]}"
    echo "[engine]"; printf '%s\n' "${ENGINE[@]}"
} > "$CONTAINERS_CONF"
PODMAN=(podman)
ok "detected: $DETECTED, overlay in the kernel; podman gets CONTAINERS_CONF with: $(grep -v '^[#[]' "$CONTAINERS_CONF" | tr '\n' ';' | sed 's/;$//')"

mkdir -p /var/lib/containers
free_gb=$(df -P --block-size=1G /var/lib/containers | awk 'NR==2{print $4}')
((free_gb >= 5)) || die "only ${free_gb} GB free under /var/lib/containers; the bases, the build cache and the image need about 5 GB"
ok "disk: ${free_gb} GB free under /var/lib/containers (5 GB needed)"

curl -fsS --max-time 15 -o /dev/null "$MIRROR/dists/$SUITE/Release" \
    || die "Debian's mirror $MIRROR is not reachable (the bases and the image's apt-get steps need it)"
ok "Debian's mirror $MIRROR is reachable"

# The hard network rule: nothing of this run may appear in the root namespace.
root_links() { ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort; }
root_tables() { nft list tables 2>/dev/null | sort; }
LINKS_BEFORE=$(root_links)
TABLES_BEFORE=$(root_tables)

ID=$$
CLIENT=nva-$ID-ctr-client
NODE=nva-$ID-ctr-node
VM=nva-$ID-ctr-vm
CTR=nva-$ID-agent
VOLUME=nva-$ID-data
BRIDGE=nvactr0
HTTP_PID=

cleanup() {
    local rc=$?
    set +e
    if ((rc != 0)) && "${PODMAN[@]}" container exists "$CTR" 2> /dev/null; then
        echo "--- container log ---"; "${PODMAN[@]}" logs --tail 40 "$CTR" 2>&1
    fi
    "${PODMAN[@]}" rm -f -t 5 "$CTR" > /dev/null 2>&1
    "${PODMAN[@]}" volume rm -f "$VOLUME" > /dev/null 2>&1
    if [[ -n $HTTP_PID ]]; then kill "$HTTP_PID" 2> /dev/null; wait "$HTTP_PID" 2> /dev/null; fi
    for ns in $CLIENT $NODE $VM; do ip netns delete "$ns" 2> /dev/null; done
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------
say "base images (no registry is reachable: they are made here when missing)"

# made_here IMAGE: the image exists and this script made it.
made_here() {
    [[ $("${PODMAN[@]}" image inspect --format "{{index .Labels \"$MADE_BY\"}}" "$1" 2> /dev/null) == yes ]]
}

make_slim() {
    local root=$WORK/rootfs t0=$SECONDS
    echo "debootstrap --variant=minbase $SUITE from $MIRROR (about 80 s)"
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    cat > "$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
    # As debian:*-slim (debuerreotype's slimify and minimizing config): dpkg leaves out
    # docs, man pages and locales of everything installed later, and what is there
    # already goes; apt keeps no caches, lists or translations in the image.
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
    echo 'force-unsafe-io' > "$root/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'APT::AutoRemove::SuggestsImportant "false";\n' > "$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{groff,info,linda,man}/* "$root"/usr/share/lintian/overrides/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
        "$root"/var/log/apt/* "$root"/tmp/* "$root"/debootstrap
    tar --numeric-owner --xattrs -C "$root" -c . | "${PODMAN[@]}" import -q \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change 'CMD ["bash"]' --change "LABEL $MADE_BY=yes" \
        --message "debootstrap --variant=minbase $SUITE $MIRROR, slimmed" - "$SLIM" > /dev/null
    rm -rf "$root"
    ok "made $SLIM: debootstrap --variant=minbase $SUITE $MIRROR, docs/man/locales left out as in debian:bookworm-slim, imported with podman import ($((SECONDS - t0)) s)"
}

make_rust() {
    local ctx=$WORK/rust-base t0=$SECONDS sysroot toolchain
    sysroot=$(rustc --print sysroot) || die "no Rust toolchain on this machine (rustc --print sysroot)"
    toolchain=$(basename "$(readlink -f "$sysroot")")
    local rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
    command -v rustup > /dev/null || die "rustup not found: the rust base imitates the official image's rustup layout"
    mkdir -p "$ctx/rustup/toolchains" "$ctx/cargo/bin"
    # Hard links, not copies (same filesystem when it can be); the docs (~800 MB) stay out.
    cp -al "$(readlink -f "$sysroot")" "$ctx/rustup/toolchains/$toolchain" 2> /dev/null \
        || cp -a "$(readlink -f "$sysroot")" "$ctx/rustup/toolchains/$toolchain"
    rm -rf "$ctx/rustup/toolchains/$toolchain/share/doc"
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n' \
        "$toolchain" > "$ctx/rustup/settings.toml"
    cp "$(readlink -f "$(command -v rustup)")" "$ctx/cargo/bin/rustup"
    for proxy in cargo rustc rustdoc cargo-clippy clippy-driver rustfmt cargo-fmt; do
        ln -s rustup "$ctx/cargo/bin/$proxy"
    done
    # This machine's own CA certificates (a TLS-inspecting egress proxy signs with one):
    # without them cargo in the build cannot fetch from crates.io. The official image
    # would not need them; they go into the local base, not into the Dockerfile.
    local cas=() ca_step=
    mkdir -p "$ctx/local-ca"
    for ca in /usr/local/share/ca-certificates/*.crt; do
        [[ -f $ca ]] && cp "$ca" "$ctx/local-ca/" && cas+=("$(basename "$ca")")
    done
    if ((${#cas[@]})); then
        ca_step='COPY local-ca /usr/local/share/ca-certificates
RUN update-ca-certificates > /dev/null'
        CA_NOTE=" + this machine's CA certificates from /usr/local/share/ca-certificates (${cas[*]})"
    fi
    local version
    version=$(rustc --version | awk '{print $2}')
    cat > "$ctx/Containerfile" <<EOF
FROM $SLIM
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$version
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
    && rm -rf /var/lib/apt/lists/*
$ca_step
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
RUN rustup --version && cargo --version && rustc --version
LABEL $MADE_BY=yes
EOF
    "${PODMAN[@]}" build --pull=never --network host -q -t "$RUST" -f "$ctx/Containerfile" "$ctx" \
        > "$WORK/rust-base.log" 2>&1 || { tail -n 30 "$WORK/rust-base.log"; die "building $RUST failed"; }
    rm -rf "$ctx"
    ok "made $RUST: $SLIM + gcc, libc6-dev, ca-certificates + this machine's toolchain $toolchain (rustc $version, no docs) in /usr/local/rustup and /usr/local/cargo as in the official image${CA_NOTE:-} ($((SECONDS - t0)) s)"
}

if [[ -d ${HOME:-/root}/.cargo/bin ]]; then export PATH="${HOME:-/root}/.cargo/bin:$PATH"; fi
for base in "$SLIM" "$RUST"; do
    if ((REBUILD_BASES)) && "${PODMAN[@]}" image exists "$base"; then
        made_here "$base" || die "$base exists and was not made by this script; not replacing it"
        "${PODMAN[@]}" rmi -f "$base" > /dev/null
    fi
    if ! "${PODMAN[@]}" image exists "$base"; then
        case $base in
            "$SLIM") make_slim ;;
            "$RUST") make_rust ;;
        esac
    elif made_here "$base"; then
        ok "reusing $base made by an earlier run of this script on $("${PODMAN[@]}" image inspect --format '{{.Created.Format "2006-01-02 15:04"}}' "$base") (--rebuild-bases makes it again)"
    else
        ok "using $base as found in local storage (not made by this script)"
    fi
done
"${PODMAN[@]}" run --rm --network none "$SLIM" true 2> "$WORK/probe.log" \
    || die "a container does not start here: $(cat "$WORK/probe.log")"
ok "a container runs: podman run --rm --network none $SLIM true"
# `FROM debian:bookworm-slim` and `FROM rust:1-bookworm` are short names: podman finds
# them under localhost/ in local storage, and --pull=never keeps it from asking a registry.

# ---------------------------------------------------------------------------------
say "building $IMAGE"
COMMIT=$(git rev-parse --short=12 HEAD 2> /dev/null || echo unknown)
build() { # build LOGNAME CONTEXT [podman build args...]
    local log=$WORK/$1.log ctx=$2
    shift 2
    local t0=$SECONDS
    if ! "${PODMAN[@]}" build --pull=never --network host --build-arg "NVA_COMMIT=$COMMIT" \
        "$@" "$ctx" > "$log" 2>&1; then
        tail -n 40 "$log"
        die "podman build failed (log above)"
    fi
    BUILD_SECONDS=$((SECONDS - t0))
}

COLD_NOTE=
if ((COLD)); then
    build cold "$SRC" --no-cache -t "$IMAGE"
    COLD_NOTE="cold build (--no-cache) ${BUILD_SECONDS} s"
    ok "$COLD_NOTE"
else
    build first "$SRC" -t "$IMAGE"
    if grep -q 'Compiling ' "$WORK/first.log"; then
        COLD_NOTE="build ${BUILD_SECONDS} s (compiled: $(grep -c 'Compiling ' "$WORK/first.log") crates)"
    else
        COLD_NOTE="build ${BUILD_SECONDS} s (every layer cached)"
    fi
    ok "$COLD_NOTE"
fi

WARM_NOTE=
if ((WARM)); then
    # A copy of the context with one source file changed (the content: a touched file
    # with the same bytes would hit the layer cache): only the crate's own layer and the
    # runtime stage's COPY are rebuilt, on top of the cached dependency layer.
    warm=$WORK/warm-context
    mkdir -p "$warm"
    tar -C "$SRC" -c Dockerfile .dockerignore Cargo.toml Cargo.lock build.rs src migrations | tar -C "$warm" -x
    echo "// container-check warm rebuild $(date +%s)" >> "$warm/src/main.rs"
    build warm "$warm" -t localhost/node-vm-agent:check-warm
    deps=$(grep -c 'Compiling ' "$WORK/warm.log" || true)
    WARM_NOTE="warm rebuild after changing src/main.rs ${BUILD_SECONDS} s"
    ((deps <= 1)) || die "the warm rebuild compiled $deps crates: the dependency layer was not reused ($(grep 'Compiling ' "$WORK/warm.log" | head -5 | tr '\n' ' '))"
    ok "$WARM_NOTE (dependency layer reused: $deps crate compiled, node-vm-agent)"
    "${PODMAN[@]}" rmi localhost/node-vm-agent:check-warm > /dev/null
    rm -rf "$warm"
fi

SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
SIZE_MB=$(awk -v s="$SIZE" 'BEGIN{printf "%.1f", s/1000000}')
"${PODMAN[@]}" images --filter reference="$IMAGE"
awk -v s="$SIZE" -v t="$SIZE_TARGET_MB" 'BEGIN{exit !(s <= t*1000000)}' \
    || die "image is $SIZE_MB MB, over the ${SIZE_TARGET_MB} MB target"
ok "image size $SIZE bytes ($SIZE_MB MB) <= ${SIZE_TARGET_MB} MB"

# The variant for VMs, with libvirt's client library: only the runtime stage differs,
# the build stage comes from the cache.
LIBVIRT_IMAGE=$IMAGE-libvirt
build libvirt "$SRC" --build-arg LIBVIRT=yes -t "$LIBVIRT_IMAGE"
"${PODMAN[@]}" run --rm --network none --entrypoint sh "$LIBVIRT_IMAGE" -c 'ldconfig -p | grep -q "libvirt.so.0 "' \
    || die "$LIBVIRT_IMAGE has no libvirt.so.0"
LIBVIRT_SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$LIBVIRT_IMAGE")
LIBVIRT_MB=$(awk -v s="$LIBVIRT_SIZE" 'BEGIN{printf "%.1f", s/1000000}')
ok "--build-arg LIBVIRT=yes: $LIBVIRT_IMAGE has libvirt.so.0, $LIBVIRT_SIZE bytes ($LIBVIRT_MB MB; ${BUILD_SECONDS} s with the build stage cached)"

version=$("${PODMAN[@]}" run --rm --network none "$IMAGE" --version)
[[ $version == *"($COMMIT)"* ]] || die "podman run --rm $IMAGE --version printed '$version', without the commit $COMMIT"
ok "podman run --rm $IMAGE --version: $version"

# ---------------------------------------------------------------------------------
say "running the image in network namespace $NODE"
# The namespaces of scripts/demo.sh (in_ns, sandbox_up). The container's /proc/sys is
# read-only: forwarding is the host's to turn on, which sandbox_up does in the node.
source scripts/sandbox-net.sh
sandbox_up $CLIENT $NODE $VM $BRIDGE 10.78

mkdir -p "$WORK/www"
echo "hello from the vm namespace behind $BRIDGE ($ID)" > "$WORK/www/index.html"
ip netns exec $VM python3 -m http.server 80 --bind 10.78.2.2 --directory "$WORK/www" \
    > "$WORK/http.log" 2>&1 &
HTTP_PID=$!
for _ in $(seq 1 50); do
    in_ns $NODE curl -fsS --max-time 1 -o /dev/null http://10.78.2.2/ 2> /dev/null && break
    sleep 0.2
done

TOKEN=container-check-$ID-$RANDOM$RANDOM
API=http://10.78.1.1:8000
auth=(-H "Authorization: Bearer $TOKEN")
"${PODMAN[@]}" volume create "$VOLUME" > /dev/null
# podman itself runs inside the node namespace, so --network host is that namespace.
# nsenter --net, not `ip netns exec`: the latter also makes a mount namespace with a new
# /sys, in which /sys/fs/cgroup is not mounted ("runc create failed: no cgroup mount
# found in mountinfo").
in_node_podman() { nsenter --net="/run/netns/$NODE" "${PODMAN[@]}" "$@"; }
in_node_podman run -d --name "$CTR" --network host --cap-add NET_ADMIN \
    -v "$VOLUME:/data" -e API_TOKEN="$TOKEN" -e VMS_BRIDGE=$BRIDGE \
    -e VM_SUBNET=10.78.2.0/24 -e EXTERNAL_IFACE=ext0 "$IMAGE" > /dev/null

wait_health() {
    for _ in $(seq 1 100); do
        if in_ns $CLIENT curl -fsS --max-time 2 -o /dev/null $API/health 2> /dev/null; then return 0; fi
        [[ $("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$CTR") == true ]] \
            || die "the container stopped: $("${PODMAN[@]}" inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$CTR")"
        sleep 0.2
    done
    die "no answer on $API/health from $CLIENT within 20 s"
}
wait_health
ok "container $CTR runs in $NODE (--network host, --cap-add NET_ADMIN, -v $VOLUME:/data); GET /health from $CLIENT: $(in_ns $CLIENT curl -fsS --max-time 2 $API/health)"

in_ns $CLIENT curl -fsS --max-time 5 "${auth[@]}" -H 'Content-Type: application/json' \
    -d '{"listen_port":8080,"target_ip":"10.78.2.2","target_port":80,"proto":"tcp"}' \
    $API/ports > "$WORK/post.json" || die "POST /ports failed"
ok "POST /ports 8080/tcp -> 10.78.2.2:80: $(cat "$WORK/post.json")"

check_traffic() { # check_traffic WHEN
    local page
    page=$(in_ns $CLIENT curl -fsS --max-time 5 http://10.78.1.1:8080/) \
        || die "$1: no answer from 10.78.1.1:8080 through the port map"
    [[ $page == "hello from the vm namespace behind $BRIDGE ($ID)" ]] \
        || die "$1: 10.78.1.1:8080 answered '$page', not the vm's page"
    ok "$1: $CLIENT -> 10.78.1.1:8080 reached the vm's HTTP server: '$page'"
}
check_traffic "port map carries traffic"

check_listed() { # check_listed WHEN
    local ports
    ports=$(in_ns $CLIENT curl -fsS --max-time 5 "${auth[@]}" $API/ports) || die "$1: GET /ports failed"
    grep -q '"listen_port":8080' <<< "$ports" && grep -q '"target_ip":"10.78.2.2"' <<< "$ports" \
        || die "$1: GET /ports does not list the map: $ports"
    ok "$1: GET /ports lists it: $ports"
}
check_listed "port map stored"

say "podman restart $CTR"
in_node_podman restart -t 10 "$CTR" > /dev/null
wait_health
ok "after podman restart: GET /health $(in_ns $CLIENT curl -fsS --max-time 2 $API/health)"
check_listed "after restart"
check_traffic "after restart"
in_node_podman exec "$CTR" ls /data/agent.db > /dev/null || die "no /data/agent.db in the volume"
ok "the state lives in volume $VOLUME ($("${PODMAN[@]}" volume inspect --format '{{.Mountpoint}}' "$VOLUME"): $(ls "$("${PODMAN[@]}" volume inspect --format '{{.Mountpoint}}' "$VOLUME")" | tr '\n' ' '))"

# ---------------------------------------------------------------------------------
say "root network namespace"
"${PODMAN[@]}" rm -f -t 10 "$CTR" > /dev/null
new_links=$(comm -13 <(echo "$LINKS_BEFORE") <(root_links))
[[ -z $new_links ]] || die "new links in the root namespace: $new_links"
[[ $(root_tables) == "$TABLES_BEFORE" ]] || die "the root namespace's nftables tables changed: $(root_tables)"
ok "root namespace unchanged: no new link (no podman0/cni bridge), nft list tables as before"

echo
echo "container-check: ALL PASSED: image $IMAGE $SIZE_MB MB ($SIZE bytes), with LIBVIRT=yes $LIBVIRT_MB MB; ${COLD_NOTE}; ${WARM_NOTE:-warm rebuild skipped}; commit $COMMIT"
