#!/usr/bin/env bash
# Runs every unit and integration test binary, the set `cargo test --lib --bins --tests`
# runs, two at a time: most of the suite's time is waiting (for a TCG guest to boot, a
# frozen libvirtd, a dead tunnel to be noticed), and the waits of two binaries overlap.
#   lane libvirt: the binaries that use the machine's one libvirtd (their source takes
#                 `support::libvirt::turn()`, a lock across test processes), one after
#                 another;
#   lane other:   every other binary, one after another.
# Every output line is prefixed with its binary's name and printed as it comes, so a
# long wait says what it waits for (tests/support: `say`). Each binary's libtest summary
# shows as `[binary] result: ok. N passed; ...`; the run closes with one libtest-shaped
# line summed over every binary, `test result: ok. N passed; N failed; N ignored; ...`,
# so a reader of the closing lines (CI) sees the whole suite's count, not the last
# binary's (a benchmark whose one test is ignored). The exit status is 0 only when every
# binary passed; the binaries that failed are named at the end.
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
results=$(mktemp -d)
trap 'rm -rf "$failed" "$results"' EXIT

# run_lane LANE NAME=PATH...: each binary in turn, its lines prefixed with its name and
# kept in $results/LANE too.
run_lane() {
    local lane=$1 entry name exe rc
    shift
    for entry in "$@"; do
        name=${entry%%=*}
        exe=${entry#*=}
        echo "[$name] running $exe"
        set +e
        "$exe" "${ARGS[@]}" 2>&1 | sed -u -e "s/^test result: /result: /" -e "s/^/[$name] /" \
            | tee -a "$results/$lane"
        rc=${PIPESTATUS[0]}
        set -e
        if ((rc != 0)); then
            echo "[$name] FAILED (exit $rc)"
            echo "$name" >> "$failed"
        fi
    done
}

ARGS=("$@")
started=$(date +%s)
echo "run-tests: lane libvirt: ${#libvirt_lane[@]} binaries; lane other: ${#other_lane[@]} binaries"
run_lane libvirt "${libvirt_lane[@]}" &
lane_pid=$!
run_lane other "${other_lane[@]}"
wait "$lane_pid"

# One libtest-shaped line for the whole run, summed over every binary's result line.
awk -v secs="$(($(date +%s) - started))" -v bad="$([[ -s $failed ]] && echo 1 || echo 0)" '
    {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") p += $(i - 1)
            if ($i == "failed;") f += $(i - 1)
            if ($i == "ignored;") s += $(i - 1)
            if ($i == "measured;") m += $(i - 1)
            if ($i == "filtered") o += $(i - 1)
        }
    }
    END {
        printf "test result: %s. %d passed; %d failed; %d ignored; %d measured; %d filtered out; finished in %d.00s\n",
            (bad || f ? "FAILED" : "ok"), p, f, s, m, o, secs
    }' <(cat "$results"/* 2>/dev/null | grep '^\[[^]]*\] result: ')

if [[ -s $failed ]]; then
    echo "run-tests: failed: $(sort "$failed" | tr '\n' ' ')"
    exit 1
fi
echo "run-tests: every test binary passed"
