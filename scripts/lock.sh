#!/usr/bin/env bash
# Re-resolves the lock files under requirements/ from pyproject.toml (run after changing a dependency,
# commit the result). uv resolves (fast, universal: one file serves Linux x86_64/aarch64 and macOS) and
# writes plain hashed requirements files, which pip, the Dockerfile and Ray's runtime_env all install.
# The runtime and GPU locks are constrained by the dev lock, so every package has one version everywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
compile() {  # compile OUT [uv pip compile args...]
  local out=$1; shift
  "$UV" pip compile pyproject.toml --python-version 3.11 --universal --generate-hashes --quiet \
    --custom-compile-command "scripts/lock.sh" -c requirements/constraints.in -o "$out" "$@"
}
compile requirements/dev.lock --extra dev --extra convert --extra gcs --extra azure
compile requirements/cpu.lock -c requirements/dev.lock
compile requirements/gpu.lock --extra gpu --no-emit-package faiss-cpu -c requirements/dev.lock
