#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (installed on first use, pinned):
#   target/debian/node-vm-agent_<version>-1_<arch>.deb
# It holds the binary (/usr/bin), the systemd unit, /etc/default/node-vm-agent and the
# docs; docs/packaging.md says what the install does.
#
#   scripts/package.sh            a release build (fat LTO: about 10 minutes on 2 cores)
#   scripts/package.sh --dev      packages the debug binary `cargo build` already made,
#                                 with fast compression (the test suite's package check)
#   scripts/package.sh --tool-only  only installs cargo-deb
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
dev=0
tool_only=0
case "${1:-}" in
    "") ;;
    --dev) dev=1 ;;
    --tool-only) tool_only=1 ;;
    *) echo "usage: $0 [--dev | --tool-only]" >&2; exit 2 ;;
esac

if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
    echo "package.sh: installing cargo-deb $CARGO_DEB_VERSION (cargo install, once)" >&2
    cargo install --locked --quiet "cargo-deb@$CARGO_DEB_VERSION"
fi
((tool_only == 0)) || exit 0
if ! command -v dpkg-shlibdeps >/dev/null; then
    echo "package.sh: dpkg-shlibdeps missing (package dpkg-dev): run scripts/install-deps.sh" >&2
    exit 1
fi

# The commit goes into the binary (`node-vm-agent --version`); a build from a tree with
# uncommitted changes says so.
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ $commit != unknown ]] && ! git diff --quiet HEAD -- 2>/dev/null; then
    commit="$commit-dirty"
fi
export NVA_COMMIT=$commit

out=target/debian
rm -f "$out"/node-vm-agent_*.deb
if ((dev)); then
    # The debug binary as `cargo build` made it for the tests: no second build.
    if [[ ! -x target/debug/node-vm-agent ]]; then
        echo "package.sh: --dev packages target/debug/node-vm-agent: run cargo build first" >&2
        exit 1
    fi
    # cargo-deb packages release-like profiles only: the binary goes in as that of the
    # `suite` profile (Cargo.toml: inherits dev), linked, not built again.
    mkdir -p target/suite
    ln -f target/debug/node-vm-agent target/suite/node-vm-agent
    cargo deb --locked --no-build --profile suite --fast --output "$out" >&2
else
    cargo deb --locked --output "$out" >&2
fi
deb=$(ls "$out"/node-vm-agent_*.deb)
echo "package.sh: built $deb ($(du -h "$deb" | cut -f1), commit $commit)" >&2
echo "$deb"
