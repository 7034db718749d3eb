#!/usr/bin/env bash
# The project's test command (what CI runs: .ci/run). In this order:
#   1. setup      every package and tool the suite uses, libvirt's first start after an
#                 install, the tiny guest; then a record of the machine's state
#                 (scripts/machine-state.sh)
#   2. build      every target, --locked
#   3. tests      every unit and integration test binary, two at a time, all of them even
#                 after one failed (scripts/run-tests.sh)
#   4. contract   the API against its OpenAPI document (scripts/contract.sh; one test)
#   5. package    the Debian package booted in a clean Debian root (scripts/package-check.sh;
#                 one test)
#   6. licences   every dependency's licence (scripts/check-licenses.sh; one test)
#   7. leaks      the machine compared with the record of step 1: libvirt's definitions and
#                 DHCP host entries, network namespaces, links, the nftables ruleset,
#                 leftover processes (one test)
# and ends with the time of each phase and one line `test: N passed, N failed, N skipped`;
# its exit status is 0 only when all of that passed. Integration tests create network
# namespaces and nftables tables (inside those namespaces only), so they need root.
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

# The time of each phase, printed at the end.
PHASES=()
phase() {
    PHASE_NAME=$1
    PHASE_T0=$(date +%s)
    echo "== test.sh: $1" >&2
}
phase_done() { PHASES+=("$PHASE_NAME $(($(date +%s) - PHASE_T0))"); }

start=$(date +%s)
log=$(mktemp)
state=$(mktemp /tmp/test-sh-machine-state.XXXXXX)
trap 'rm -f "$log" "$state"' EXIT

phase setup
scripts/install-deps.sh test
# cargo-deb for the package check, installed now: not while cargo test runs.
scripts/package.sh --tool-only
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
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
# libvirt's daemon side and its first start, and the tiny guest, before the record: what
# an install does is not what a test leaves.
scripts/libvirt-netns.sh prepare "nva-$$-prepare"
scripts/build-tiny-guest.sh target/tmp/tiny-guest
scripts/machine-state.sh record "$state"
phase_done

# From here on every step runs even when an earlier one failed, so that the run always
# ends with the leak check and one summary line; the exit status says whether all passed.
set +e
phase build
cargo build --locked --all-targets
build_rc=$?
phase_done

tests_rc=1
contract_rc=1
package_rc=1
if ((build_rc == 0)); then
    phase tests
    # Unit and integration tests (no doctests: the crate has none; the bench target is
    # built above and run by scripts/bench.sh, not here): every binary, two at a time,
    # even after one failed (scripts/run-tests.sh).
    scripts/run-tests.sh 2>&1 | tee "$log"
    tests_rc=${PIPESTATUS[0]}
    phase_done

    phase contract
    scripts/contract.sh
    contract_rc=$?
    phase_done

    phase package
    scripts/package-check.sh --dev
    package_rc=$?
    phase_done
fi

phase licences
scripts/check-licenses.sh
deny_rc=$?
phase_done

phase leaks
scripts/machine-state.sh compare "$state"
leaks_rc=$?
phase_done
set -e

echo "test.sh: phase times (s): ${PHASES[*]}; all $(($(date +%s) - start))" >&2
((build_rc == 0)) || echo "test.sh: the build failed (exit $build_rc); no test ran" >&2
((build_rc != 0 || tests_rc == 0)) || echo "test.sh: cargo test failed (exit $tests_rc)" >&2
((build_rc != 0 || contract_rc == 0)) || echo "test.sh: the API contract failed (scripts/contract.sh, exit $contract_rc)" >&2
((build_rc != 0 || package_rc == 0)) || echo "test.sh: the package check failed (scripts/package-check.sh, exit $package_rc)" >&2
((deny_rc == 0)) || echo "test.sh: the licence check failed (exit $deny_rc)" >&2
((leaks_rc == 0)) || echo "test.sh: the suite left the machine changed (scripts/machine-state.sh, above)" >&2
# One closing line for the whole suite, summed over every test binary, plus the API
# contract, the package check, the licence check and the leak check as one test each. A
# failed build, or a binary that died without its result line (a crash), counts as one
# failure; after a failed build the contract and the package check are skipped.
awk -v rc="$tests_rc" -v build="$build_rc" -v contract="$contract_rc" -v package="$package_rc" \
    -v deny="$deny_rc" -v leaks="$leaks_rc" '
    # run-tests.sh closes with the sum over every binary:
    # "test result: ok. 339 passed; 0 failed; 8 ignored; ..."
    /^test result: / {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") p += $(i - 1)
            if ($i == "failed;") f += $(i - 1)
            if ($i == "ignored;") s += $(i - 1)
        }
    }
    END {
        if (build != 0 || (rc != 0 && f == 0)) f += 1
        if (build != 0) s += 2
        else {
            if (contract == 0) p += 1; else f += 1
            if (package == 0) p += 1; else f += 1
        }
        if (deny == 0) p += 1; else f += 1
        if (leaks == 0) p += 1; else f += 1
        printf "test: %d passed, %d failed, %d skipped\n", p, f, s
    }' "$log"
if ((build_rc || tests_rc || deny_rc || contract_rc || package_rc || leaks_rc)); then
    exit 1
fi
