#!/usr/bin/env bash
# Build a local stand-in for `python:3.11-slim` from Debian packages, for hosts
# that reach an apt mirror but no image registry (the deployment test):
#
#   deploy/test/debian-base.sh [IMAGE]        # default imgq-debian-base:bookworm
#
# Debian bookworm's Python is 3.11. `python` and `pip` are those of a virtualenv
# on PATH (/opt/venv), as `python` and `pip` are in the official image; Debian's
# own pip refuses to install into the system Python. The host's CA bundle is
# copied in, so that pip and apt verify the registries' certificates as the host
# does. The mirror is the one the host's apt configuration names.
set -euo pipefail

image=${1:-imgq-debian-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"
  exit 0
fi

# The host's Debian mirror: deb822 (URIs:) or one-line (deb URL SUITE ...) format.
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ {print $2} /^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
    | grep -v -- '-security' | head -n1 || true)
fi
if [ -z "$mirror" ]; then
  echo "no Debian mirror in /etc/apt/sources.list*; set DEBIAN_MIRROR" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 1; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs" "$mirror" >/dev/null
# The same mirror inside the image, for the apt-get of the images built on it.
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$suite" "$mirror" "$suite" \
  >"$rootfs/etc/apt/sources.list"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
chroot "$rootfs" python3 -m venv /opt/venv
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image" >/dev/null
echo "$image built"
