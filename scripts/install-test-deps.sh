#!/usr/bin/env bash
# Debian packages the test suite needs: OpenStack Swift (the s3_server fixture, an S3 server with s3api)
# and chromium (HTML report rendering test). Idempotent: checks with dpkg first, runs apt-get only for
# what is missing (as root, or through sudo when available).
set -euo pipefail

PACKAGES=(swift swift-proxy swift-account swift-container swift-object chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "test dependencies already installed: ${PACKAGES[*]}"
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi

echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq "${missing[@]}"  # with recommends: the set the tests were proven with
