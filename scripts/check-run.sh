#!/usr/bin/env bash
# Checks the README's run command: scripts/run.sh brings an agent up and `caasctl node info`
# answers; SIGTERM stops it with exit 0. Uses the debug build the tests already made.
# With no live agent at the default socket and as root, it runs on the embedded defaults;
# otherwise on a temp config, so it never disturbs an agent that is already running.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
# The agent refuses a run_dir that tenant containers (unprivileged uids) cannot traverse.
chmod 755 "$tmp"
agent_pid=""
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

socket=/run/caas-agent/agent.sock
if [ "$(id -u)" -eq 0 ] && ! target/debug/caasctl --socket "$socket" node info >/dev/null 2>&1 \
   && [ ! -e /etc/caas-agent/config.toml ]; then
  echo "check-run: running on the embedded defaults (socket $socket)"
  unset CAAS_CONFIG
else
  echo "check-run: an agent or a config already exists here; running on a temp config instead"
  socket="$tmp/run/agent.sock"
  printf 'state_dir = "%s/state"\nrun_dir = "%s/run"\n' "$tmp" "$tmp" >"$tmp/config.toml"
  export CAAS_CONFIG="$tmp/config.toml"
fi

CAAS_PROFILE=debug bash scripts/run.sh >"$tmp/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 1 600); do
  if target/debug/caasctl --socket "$socket" node info >"$tmp/info.txt" 2>/dev/null; then
    break
  fi
  kill -0 "$agent_pid" 2>/dev/null || { echo "check-run: the agent exited:"; cat "$tmp/agent.log"; exit 1; }
  sleep 0.1
done
grep -q '^version' "$tmp/info.txt" || { echo "check-run: caasctl node info did not answer:"; cat "$tmp/agent.log"; exit 1; }
cat "$tmp/info.txt"
kill -TERM "$agent_pid"
rc=0
wait "$agent_pid" || rc=$?
agent_pid=""
if [ "$rc" -ne 0 ]; then
  echo "check-run: the agent exited with $rc after SIGTERM:"; cat "$tmp/agent.log"; exit 1
fi
echo "check-run: ok (agent answered, then exited 0 on SIGTERM)"
