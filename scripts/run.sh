#!/usr/bin/env bash
# The run command: sets up what is missing, builds, and runs the agent in the foreground on its
# embedded defaults (or on /etc/caas-agent/config.toml, or $CAAS_CONFIG, when present).
#   CAAS_PROFILE=release|debug   build profile (default: release)
# In another shell:  target/release/caasctl node info
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
profile="${CAAS_PROFILE:-release}"
if [ "$profile" = release ]; then
  cargo build --release --bins --locked
else
  cargo build --bins --locked
fi
exec "target/$profile/caas-agent" serve "$@"
