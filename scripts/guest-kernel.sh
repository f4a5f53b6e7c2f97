#!/usr/bin/env bash
# Fetches the guest kernel of VM tenants from Debian's packages, without installing it: the
# linux-image-cloud-amd64 package is downloaded and unpacked, its bzImage is turned into the
# uncompressed ELF vmlinux that QEMU's microvm boots through PVH (what the kernel's
# scripts/extract-vmlinux does: find the compressed payload by its magic bytes and inflate it),
# and its modules are kept beside it for the agent's initramfs.
#
#   scripts/guest-kernel.sh [DEST]      DEST defaults to /var/lib/caas-agent/guest
#
# Leaves DEST/vmlinux, DEST/modules (the kernel's lib/modules/<version>) and DEST/version.
# Does nothing when DEST already holds them. Run as root (apt-get download needs a writable,
# world-traversable directory; the script makes its own).
set -euo pipefail

dest="${1:-${CAAS_GUEST_DIR:-/var/lib/caas-agent/guest}}"
log() { printf 'guest-kernel: %s\n' "$*"; }

if [ -s "$dest/vmlinux" ] && [ -d "$dest/modules" ] && [ -s "$dest/version" ]; then
  log "present in $dest ($(cat "$dest/version"))"
  exit 0
fi

for tool in lz4 xz zstd gzip; do
  command -v "$tool" >/dev/null 2>&1 || missing_tool=1
done
if [ -n "${missing_tool:-}" ]; then
  log "installing decompressors (lz4 xz-utils zstd)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lz4 xz-utils zstd >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp" # apt's download sandbox user must be able to write here

# The meta package names the current kernel package; download that one.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "guest-kernel: cannot resolve linux-image-cloud-amd64 to a kernel package" >&2; exit 1; }
log "downloading $pkg"
(cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>&1) ||
  { apt-get update -qq && (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null); }
dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x"
bz=$(ls "$tmp"/x/boot/vmlinuz-*)
version=${bz##*/vmlinuz-}

# Try each compressed format the kernel may use, at each place its magic occurs, until one
# inflates to an ELF file. The decompressors stop at the end of the payload and complain about
# the trailing bytes, so their exit status is ignored and the result is checked instead.
try() { # magic-as-grep-P-pattern command...
  local magic=$1
  shift
  local off
  for off in $(LC_ALL=C grep -aboUP "$magic" "$bz" | cut -d: -f1); do
    tail -c +"$((off + 1))" "$bz" | "$@" >"$tmp/vmlinux" 2>/dev/null || true
    if [ "$(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' ')" = "7f454c46" ]; then
      return 0
    fi
  done
  return 1
}
try '\x02\x21\x4c\x18' lz4 -dc ||
  try '\x28\xb5\x2f\xfd' zstd -dc ||
  try '\xfd\x37\x7a\x58\x5a\x00' xz -dc ||
  try '\x1f\x8b\x08' gzip -dc ||
  { echo "guest-kernel: no ELF kernel found inside $bz" >&2; exit 1; }

mkdir -p "$dest.new"
mv "$tmp/vmlinux" "$dest.new/vmlinux"
mv "$tmp/x/lib/modules/$version" "$dest.new/modules"
cp "$tmp/x/boot/config-$version" "$dest.new/config"
echo "$version" >"$dest.new/version"
rm -rf "$dest"
mv "$dest.new" "$dest"
log "$version: $dest/vmlinux ($(du -h "$dest/vmlinux" | cut -f1)), modules in $dest/modules"
