#!/usr/bin/env bash
# Demo, no network needed: a busybox root filesystem, two tenants, one container in each, and what
# each can see. Starts its own agent on temp dirs (so it never disturbs a running one), and
# removes everything when done. Run as root after a build:  scripts/demo.sh [debug|release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-${CAAS_PROFILE:-release}}"
bin="target/$profile"
[ -x "$bin/caas-agent" ] || { echo "demo: build first (cargo build${profile/debug/} --bins)"; exit 1; }
[ -x /bin/busybox ] || bash scripts/setup.sh

tmp=$(mktemp -d)
# Tenant containers run as unprivileged host uids and must traverse the agent's run dir.
chmod 755 "$tmp"
agent_pid=""
ctl() { "$bin/caasctl" --socket "$tmp/run/agent.sock" "$@"; }
cleanup() {
  if [ -n "$agent_pid" ]; then
    ctl tenant rm acme --force >/dev/null 2>&1 || true
    ctl tenant rm globex --force >/dev/null 2>&1 || true
    kill "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  for h in /sys/fs/cgroup/*/; do rmdir "${h}caas-demo-$$.slice" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }

say "a busybox root filesystem"
mkdir -p "$tmp/rootfs"/{bin,etc,tmp}
cp /bin/busybox "$tmp/rootfs/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf /bin/busybox "$tmp/rootfs/bin/$a"; done
chmod 1777 "$tmp/rootfs/tmp"
echo "$tmp/rootfs: $(ls "$tmp/rootfs/bin" | wc -l) applets"

say "an agent on temp dirs"
printf 'state_dir = "%s/state"\nrun_dir = "%s/run"\n[tenants]\ncgroup_slice = "caas-demo-%s.slice"\nengine_binary = "%s"\n[usage]\nwindow_secs = 1\n' \
  "$tmp" "$tmp" "$$" "$(realpath "$bin/caas-agent")" >"$tmp/config.toml"
"$bin/caas-agent" serve --config "$tmp/config.toml" 2>"$tmp/agent.log" &
agent_pid=$!
for _ in $(seq 1 100); do ctl node info >/dev/null 2>&1 && break; sleep 0.1; done
ctl node info

say "two tenants, each with its own uid range, cgroup and namespaces"
ctl tenant create acme --cpus 1 --memory 256Mi >/dev/null
ctl tenant create globex --cpus 0.5 --memory 128Mi >/dev/null
ctl tenant ls
ctl --json tenant get acme | grep -A3 '"id_range"'

say "one container in each"
for t in acme globex; do
  ctl container run "$t" web --rootfs "$tmp/rootfs" -- sh -c 'echo listening; while true; do sleep 600 | nc -l -p 8080; done' >/dev/null
done
ctl container ps
sleep 0.5

say "inside acme: root, alone, with its own network"
ctl container exec acme web -- sh -c 'echo "id -u: $(id -u)"; echo "processes:"; ps -o pid,comm'
pid=$(ctl --json container inspect acme web | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
echo "on the host, acme's container runs as uid $(awk '/^Uid:/ {print $2}' /proc/"$pid"/status)"

say "both listen on port 8080; acme's message reaches acme's listener only"
ctl container exec acme web -- sh -c 'echo hello-from-acme | nc 127.0.0.1 8080 && echo "acme: sent"'
sleep 0.3
echo "acme's listener got:";   ctl container logs acme web
echo "globex's listener got:"; ctl container logs globex web
if ctl container logs globex web | grep -q hello-from-acme; then echo "demo: ISOLATION BROKEN"; exit 1; fi

say "what each tenant used, second by second (billing records per window)"
ctl container run acme burn --rootfs "$tmp/rootfs" --cpus 0.5 -- sh -c 'timeout 2 sh -c "while :; do :; done"; true' >/dev/null
ctl container wait acme burn >/dev/null
ctl container rm acme burn >/dev/null
sleep 1.2
ctl usage get acme --per-second | tail -n 4
ctl usage records --tenant acme | tail -n 3
# (sed, not head: head would close the pipe early, and pipefail would count that)
ctl usage export --format csv --tenant acme | sed -n 1,3p

say "done; cleaning up"
