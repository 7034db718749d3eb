#!/usr/bin/env bash
# Checks every dependency's licence and source against deny.toml (no network needed:
# the advisory database is not consulted).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
cargo deny --locked check licenses bans sources
