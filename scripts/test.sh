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
# cargo-deb for the package check below, installed now: not while cargo test runs.
scripts/package.sh --tool-only

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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# From here on every step runs even when an earlier one failed, so that the run always
# ends with the licence check and one summary line; the exit status says whether all passed.
set +e
cargo build --locked --all-targets
build_rc=$?
tests_rc=0
if ((build_rc == 0)); then
    # Unit and integration tests (no doctests: the crate has none; the bench target is
    # built above and run by scripts/bench.sh, not here). --no-fail-fast: a failing test
    # binary must not keep the others from running.
    cargo test --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
    tests_rc=${PIPESTATUS[0]}
fi
# The API contract: schemathesis against the agent binary built above (one test of the
# summary line below; scripts/contract.sh says what it runs).
contract_rc=1
if ((build_rc == 0)); then
    scripts/contract.sh
    contract_rc=$?
fi
# The Debian package of the binary built above, installed into a clean Debian 12 root
# that then boots with systemd and runs the hardened service (one test of the summary
# line; scripts/package-check.sh says what it checks).
package_rc=1
if ((build_rc == 0)); then
    scripts/package-check.sh --dev
    package_rc=$?
fi
# Every dependency's licence against deny.toml (installs cargo-deny on first use).
scripts/check-licenses.sh
deny_rc=$?
set -e

echo "test.sh: build + tests took $(($(date +%s) - start)) s" >&2
((build_rc == 0)) || echo "test.sh: the build failed (exit $build_rc); no test ran" >&2
((tests_rc == 0)) || echo "test.sh: cargo test failed (exit $tests_rc)" >&2
((deny_rc == 0)) || echo "test.sh: the licence check failed (exit $deny_rc)" >&2
((build_rc != 0 || contract_rc == 0)) || echo "test.sh: the API contract failed (scripts/contract.sh, exit $contract_rc)" >&2
((build_rc != 0 || package_rc == 0)) || echo "test.sh: the package check failed (scripts/package-check.sh, exit $package_rc)" >&2
# One closing line for the whole suite, summed over every test binary, plus the API
# contract and the package check as one test each. A failed build, or a binary that died
# without its result line (a crash), counts as one failure; after a failed build the
# contract and the package check are skipped.
awk -v rc="$tests_rc" -v build="$build_rc" -v contract="$contract_rc" -v package="$package_rc" '
    /^test result:/ { p += $4; f += $6; s += $8 }
    END {
        if (build != 0 || (rc != 0 && f == 0)) f += 1
        if (build != 0) s += 2
        else {
            if (contract == 0) p += 1; else f += 1
            if (package == 0) p += 1; else f += 1
        }
        printf "test: %d passed, %d failed, %d skipped\n", p, f, s
    }' "$log"
if ((build_rc || tests_rc || deny_rc || contract_rc || package_rc)); then
    exit 1
fi
