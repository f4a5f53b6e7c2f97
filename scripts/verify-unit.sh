#!/usr/bin/env bash
# Verify scripts/caas-agent.service with `systemd-analyze verify`.
#
# Command this script runs (checked on Debian 12, systemd 252, as root, in a
# container where PID 1 is not systemd):
#
#   SYSTEMD_LOG_LEVEL=info SYSTEMD_LOG_COLOR=0 \
#     systemd-analyze verify --man=no --recursive-errors=one "$tmp/unit/caas-agent.service"
#
# where "$tmp/unit/caas-agent.service" is a copy of the unit in which every
# Exec*= binary that does not exist on this machine (normally
# /usr/local/bin/caas-agent) is replaced by a stub executable in "$tmp/bin".
#
# Notes on what `verify` needs without systemd as PID 1:
#   * No --root and no running manager are needed: `verify` loads the unit in
#     a private, offline manager instance.
#   * The ExecStart= binary must exist and be executable, otherwise verify
#     fails with "Command ... is not executable" -- hence the stub above.
#   * --man=no: otherwise Documentation=man:... entries are checked by
#     running man(1), which minimal images do not have.
#   * --recursive-errors=one: report problems of the unit and its direct
#     dependencies (a missing Requires= target is caught) but not of every
#     unrelated unit on the host. With "no", missing dependencies are silently
#     accepted.
#   * SYSTEMD_LOG_LEVEL=info pins the log level so an inherited debug level
#     does not flood the output.
#   * Depending on the options, verify can exit 0 on warnings such as
#     "Unknown key ..." or "Failed to parse ..., ignoring" (it does without
#     --recursive-errors), so this script also fails on any output line that
#     mentions the unit.
#
# Usage: scripts/verify-unit.sh [path/to/unit.service]
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
unit_src=${1:-"$script_dir/caas-agent.service"}

if [[ ! -f $unit_src ]]; then
    echo "verify-unit: unit file not found: $unit_src" >&2
    exit 2
fi
unit_name=$(basename -- "$unit_src")
unit_base=${unit_name%.*}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify-unit: systemd-analyze not found, installing Debian's systemd package"
    if [[ $EUID -ne 0 ]]; then
        echo "verify-unit: need root to install systemd (apt-get install -y systemd)" >&2
        exit 2
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "verify-unit: apt-get not available; install systemd-analyze by hand" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y systemd
fi

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
mkdir -p "$tmp/unit" "$tmp/bin"
unit_copy="$tmp/unit/$unit_name"

# Copy the unit, pointing Exec*= commands whose binary is missing at stubs.
exec_re='^(Exec[A-Za-z]+=)([-@:+!]*)(/[^[:space:]]+)(.*)$'
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ $exec_re ]]; then
        key=${BASH_REMATCH[1]}
        prefix=${BASH_REMATCH[2]}
        path=${BASH_REMATCH[3]}
        rest=${BASH_REMATCH[4]}
        if [[ ! -x $path ]]; then
            stub="$tmp/bin/$(basename -- "$path")"
            printf '#!/bin/sh\nexit 0\n' >"$stub"
            chmod 0755 "$stub"
            echo "verify-unit: $path does not exist here, using stub $stub" >&2
            line="$key$prefix$stub$rest"
        fi
    fi
    printf '%s\n' "$line"
done <"$unit_src" >"$unit_copy"

echo "verify-unit: systemd-analyze verify $unit_src"
rc=0
output=$(SYSTEMD_LOG_LEVEL=info SYSTEMD_LOG_COLOR=0 \
    systemd-analyze verify --man=no --recursive-errors=one "$unit_copy" 2>&1) || rc=$?

problems=0
if [[ -n $output ]]; then
    while IFS= read -r line; do
        if [[ $line == *"$unit_base"* ]]; then
            echo "  PROBLEM: $line"
            problems=$((problems + 1))
        else
            echo "  note (not about $unit_name): $line"
        fi
    done <<<"$output"
fi

if [[ $rc -ne 0 || $problems -ne 0 ]]; then
    echo "verify-unit: FAILED (systemd-analyze exit code $rc, $problems problem line(s) about $unit_name)" >&2
    exit 1
fi
echo "verify-unit: OK, $unit_name has no warnings or errors"
