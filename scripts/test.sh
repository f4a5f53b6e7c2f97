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
log=$(mktemp)
export CAAS_SKIP_LOG
CAAS_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$CAAS_SKIP_LOG"' EXIT
rc=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || rc=$?
# One closing line for the whole suite: cargo prints a summary per test binary, and the last of
# them (doc tests) often counts zero.
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}')
skipped=$(grep -c '^SKIP ' "$CAAS_SKIP_LOG" || true)
if [ "$skipped" -gt 0 ]; then
  echo "skipped tests:"
  cat "$CAAS_SKIP_LOG"
fi
summary="tests: $passed passed, $failed failed, $skipped skipped"
[ "$rc" -eq 0 ] || { echo "$summary"; exit "$rc"; }

step "systemd unit"
bash scripts/verify-unit.sh

step "demo (two isolated tenants)"
bash scripts/demo.sh debug

step "README run command"
bash scripts/check-run.sh

step "all checks passed"
echo "$summary"
