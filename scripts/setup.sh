#!/usr/bin/env bash
# Installs what building, running and testing caas-agent needs on Debian 12, and nothing that is
# already there. Safe to run again. Run as root (or with sudo available).
set -euo pipefail

# Debian packages the build, the tests and the unit check use:
#   gcc, pkg-config  C parts of -sys crates (ring)
#   libseccomp-dev   libcontainer's seccomp support (without it profiles are silently ignored)
#   busybox-static   the root filesystem of test containers and the demo
#   systemd          systemd-analyze, to verify scripts/caas-agent.service
#   iproute2, procps tests inspect links, namespaces and processes
#   crun, runc       the peers in tests/benches/lifecycle.rs
#   containerd       the CRI peer in tests/benches/cri_pod.rs (1.6, run with runc on temp dirs)
#   containernetworking-plugins  its pods' CNI network there (bridge, host-local, loopback)
#   docker-registry  the OCI distribution registry the image tests pull from (on 127.0.0.1)
#   skopeo           pushes the tests' OCI layouts into it; a peer in tests/benches/image_pull.rs
#   umoci            the other half of that peer (unpack)
#   apache2-utils    htpasswd, for the registry's basic-auth test users
#   nftables         the nft binary: the agent loads its firewall and NAT table with it
#   iperf3           tests/benches/network.rs measures throughput with it
#   qemu-system-x86  the VMM of VM tenants (QEMU microvm); its tests boot real guests
#   lz4, e2fsprogs   scripts/guest-kernel.sh inflates the guest kernel; tenant disks are ext4
#   binutils         strip: the guest's copy of the agent binary goes without symbols
#   golang-go, golang-github-docker-spdystream-dev, golang-github-gorilla-websocket-dev
#                    the tests' SPDY client (tests/spdy-client), on the library kubelet uses
#   python3-websocket  the tests' WebSocket exec client (tests/ws-client)
PACKAGES=(gcc pkg-config libseccomp-dev busybox-static systemd iproute2 procps crun runc
  containerd containernetworking-plugins docker-registry skopeo umoci apache2-utils nftables
  iperf3 qemu-system-x86 lz4 e2fsprogs binutils golang-go golang-github-docker-spdystream-dev
  golang-github-gorilla-websocket-dev python3-websocket)

log() { printf 'setup: %s\n' "$*"; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package enables and starts a system containerd; the bench runs its own on temp dirs, so
  # a containerd this script installed is not left running as a service.
  if [[ " ${missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
    log "disabling the containerd service the package started (tests/benches/cri_pod.rs runs its own)"
    $sudo systemctl disable --now containerd.service >/dev/null 2>&1 || true
  fi
else
  log "Debian packages present"
fi

# promtool checks the agent's /metrics output in the tests. Debian ships it only inside the
# prometheus server package; installing that would add a daemon and a system user, so only the
# promtool binary is taken out of the package.
if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool (from Debian's prometheus package) to /usr/local/bin"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"   # apt's download sandbox user must be able to write here
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) ||
    { $sudo apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus >/dev/null); }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  $sudo install -m 0755 "$tmp/x/usr/bin/promtool" /usr/local/bin/promtool
  rm -rf "$tmp"
fi

# The guest kernel of VM tenants: Debian's cloud kernel, unpacked, not installed.
bash "$(dirname "$0")/guest-kernel.sh"

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not installed; install a Rust toolchain (1.88 or newer) with rustup first" >&2
  exit 1
fi
for c in fmt clippy; do
  if ! cargo "$c" --version >/dev/null 2>&1; then
    log "adding rustup component for cargo $c"
    rustup component add "$([ "$c" = fmt ] && echo rustfmt || echo clippy)"
  fi
done
log "toolchain: $(cargo --version)"
