#!/usr/bin/env bash
# Make python:3.11-slim, the bento Dockerfile's base image, available to podman: pulled when a registry
# answers, else built locally from Debian's packages (bookworm's Python is 3.11) with debootstrap.
set -euo pipefail
base=docker.io/library/python:3.11-slim
podman image exists "$base" && exit 0
timeout 60 podman pull -q "$base" >/dev/null 2>&1 && exit 0
echo "no registry answers: building $base locally from Debian bookworm (about a minute)" >&2
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" \
  "${mirror:-http://deb.debian.org/debian}" >/dev/null
# Extra certificate authorities this machine trusts (a TLS-intercepting proxy to the package index).
cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$rootfs" update-ca-certificates >/dev/null
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
tar -C "$rootfs" -c . | podman import -q \
  --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV UV_NATIVE_TLS=1' - "$base" >/dev/null
