#!/usr/bin/env bash
# Runs every unit and integration test binary, the set `cargo test --lib --bins --tests`
# runs, two at a time: most of the suite's time is waiting (for a TCG guest to boot, a
# frozen libvirtd, a dead tunnel to be noticed), and the waits of two binaries overlap.
#   lane libvirt: the binaries that use the machine's one libvirtd (their source takes
#                 `support::libvirt::turn()`, a lock across test processes), one after
#                 another;
#   lane other:   every other binary, one after another.
# Every output line is prefixed with its binary's name and printed as it comes, so a
# long wait says what it waits for (tests/support: `say`). Each binary prints libtest's
# own `test result:` line. The exit status is 0 only when every binary passed; the
# binaries that failed are named at the end.
#
# Usage: scripts/run-tests.sh [ARGS...]   ARGS go to every test binary (e.g. --nocapture,
#                                         or a filter)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

# Build (nothing to do after scripts/test.sh's build) and list the test executables:
# "NAME KIND PATH" per line, KIND lib, bin or test.
binaries=$(cargo test --locked --no-run --lib --bins --tests --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        print(t["name"], t["kind"][0], m["executable"])
')

libvirt_lane=()
other_lane=()
while read -r name kind exe; do
    [[ -n $name ]] || continue
    if [[ $kind == test ]] && grep -q 'libvirt::turn()' "tests/$name.rs" 2>/dev/null; then
        libvirt_lane+=("$name=$exe")
    else
        other_lane+=("$name=$exe")
    fi
done <<< "$binaries"

failed=$(mktemp)
trap 'rm -f "$failed"' EXIT

# run_lane NAME=PATH...: each binary in turn, its lines prefixed with its name.
run_lane() {
    local entry name exe rc
    for entry in "$@"; do
        name=${entry%%=*}
        exe=${entry#*=}
        echo "[$name] running $exe"
        set +e
        "$exe" "${ARGS[@]}" 2>&1 | sed -u "s/^/[$name] /"
        rc=${PIPESTATUS[0]}
        set -e
        if ((rc != 0)); then
            echo "[$name] FAILED (exit $rc)"
            echo "$name" >> "$failed"
        fi
    done
}

ARGS=("$@")
echo "run-tests: lane libvirt: ${#libvirt_lane[@]} binaries; lane other: ${#other_lane[@]} binaries"
run_lane "${libvirt_lane[@]}" &
lane_pid=$!
run_lane "${other_lane[@]}"
wait "$lane_pid"

if [[ -s $failed ]]; then
    echo "run-tests: failed: $(sort "$failed" | tr '\n' ' ')"
    exit 1
fi
echo "run-tests: every test binary passed"
