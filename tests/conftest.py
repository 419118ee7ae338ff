"""Shared fixtures. Server fixtures live in tests/servers.py and are loaded as a plugin."""

import os

# Keep torch and BLAS to the machine's cores without oversubscribing Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = ["tests.servers"]
