#!/usr/bin/env bash
# The test command: sets up what is missing, then runs every check CI runs, in order:
# format, lints, one shared debug build, the whole test suite, the systemd unit check, and the
# README's run command end to end. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --bins (shared by the tests and the run check)"
cargo build --workspace --bins --locked

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "cargo test"
cargo test --workspace --locked --no-fail-fast

step "systemd unit"
bash scripts/verify-unit.sh

step "README run command"
bash scripts/check-run.sh

step "all checks passed"
