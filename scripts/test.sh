#!/usr/bin/env bash
# The project's test command: packages, a locked build of every target, then every unit
# and integration test. Integration tests create network namespaces and nftables tables
# (inside those namespaces only), so they need root.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: must run as root: the integration tests create network namespaces (ip netns add) and nftables tables inside them" >&2
    exit 1
fi

# rustup puts cargo in ~/.cargo/bin, which a non-login shell (CI) may not have on PATH.
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

scripts/install-deps.sh

# Namespaces left by a test process that was killed (SIGKILL skips the Drop guards).
# Names are nva-<pid>-<n>-<role>; only those whose creating process is gone are removed.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^nva-[0-9]+-' || true); do
    pid=${ns#nva-}
    pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "test.sh: removing stale namespace $ns" >&2
        ip netns delete "$ns" || true
    fi
done

start=$(date +%s)
cargo build --locked --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --all-targets: unit, integration and bench-target tests (there are no doctests).
cargo test --locked --all-targets 2>&1 | tee "$log"
# Every dependency's licence against deny.toml (installs cargo-deny on first use).
scripts/check-licenses.sh
echo "test.sh: build + tests took $(($(date +%s) - start)) s" >&2
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "test: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
