#!/usr/bin/env bash
# Installs the Debian 12 packages that building node-vm-agent and running its demo or
# its test suite need, for one of two profiles:
#   scripts/install-deps.sh demo   what scripts/demo.sh uses: the build and the sandbox
#   scripts/install-deps.sh [test] that, plus what the test suite uses (the default)
# Idempotent: when every package is already installed it touches nothing (no apt-get
# update), so reruns cost well under a second.
set -euo pipefail

PROFILE=${1:-test}
case $PROFILE in
    demo | test) ;;
    *) echo "install-deps: unknown profile '$PROFILE' (demo or test)" >&2; exit 2 ;;
esac

# What each package is for. The demo and the suite both:
#   build-essential pkg-config  C compiler/linker for the bundled SQLite and other -sys crates
#   libvirt-dev                 libvirt's client library and its pkg-config file, linked by the virt crate
#   iproute2 nftables           `ip netns` for the sandbox; `nft` to show (and the tests to read)
#                               what the agent wrote
#   sqlite3                     operators' (and the demo's) window into $DATA_DIR/agent.db
#   curl ca-certificates        the demo's API calls
#   python3                     the demo's HTTP server inside the "vm" namespace
#   procps                      pgrep/ps for scripts
DEMO=(
    build-essential pkg-config
    libvirt-dev
    iproute2 nftables
    sqlite3
    curl ca-certificates
    python3
    procps
)
# The suite only:
#   iptables                    iptables-nft, which the tests use to build libvirt 9's `ip filter`
#                               chains and to prove `iptables -L` / `iptables-save` still read
#                               them with the agent's accept inside (the agent never runs it)
#   python3-venv                scripts/contract.sh installs its pinned schemathesis into a
#                               virtual environment of its own
#   dosfstools                  `fsck.fat -n`, which the seed unit tests run on the in-memory FAT image
#   prometheus                  `promtool check metrics`, which tests/observability.rs runs on every
#                               scrape (the package's server is never started by the tests)
#   dpkg-dev                    dpkg-shlibdeps, with which cargo-deb (scripts/package.sh) finds the
#                               package's Depends
#   debootstrap systemd-container  scripts/package-check.sh: a clean Debian 12 root to install
#                               the package into, booted with systemd-nspawn (in a test namespace)
#   systemd                     systemd-analyze verify/security on the unit (not as init)
#   python3-websockets          a WebSocket client nobody here wrote, for tests/vm_console.rs
#                               (the interactive console against a real guest)
TEST=(
    iptables
    python3-venv
    dosfstools
    prometheus
    dpkg-dev
    debootstrap systemd-container
    systemd
    python3-websockets
)
# The daemon side for VMs (libvirtd, QEMU, dnsmasq) and the tiny guest's parts are
# installed by scripts/libvirt-netns.sh and scripts/build-tiny-guest.sh, which take care
# that no libvirtd or default network ever starts in the root namespace; load generators
# for the benchmarks by scripts/bench.sh.
PACKAGES=("${DEMO[@]}")
[[ $PROFILE == test ]] && PACKAGES+=("${TEST[@]}")

missing=()
for pkg in "${PACKAGES[@]}"; do
    # `dpkg -s` succeeds for removed-but-configured packages too; check the status line.
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: missing packages: ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine's unattended upgrades may hold dpkg's lock for a while: wait for it
    # rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 update
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"
    # Only promtool is wanted from `prometheus`: on a machine run by systemd the package
    # starts a Prometheus server on :9090; stop it and keep it from starting at boot.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [[ -d /run/systemd/system ]]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        echo "install-deps: installed prometheus for promtool; its server is disabled" >&2
    fi
else
    echo "install-deps: all Debian packages present" >&2
fi

# The Rust toolchain comes from rustup, not apt: say so plainly instead of failing later
# with "cargo: command not found" in the middle of another script.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    echo "install-deps: cargo is in ${HOME:-/root}/.cargo/bin but not on PATH; add it (source ~/.cargo/env)" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found. Install the Rust toolchain with rustup (https://rustup.rs), then rerun." >&2
    exit 1
fi
echo "install-deps: $(cargo --version)" >&2
