"""What `pip install landmark-index`, `make demo` and the runtime image install: the wheel's metadata and its
console script, which lock each make target uses, TensorFlow kept out of the runtime, the image's pip check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TENSORFLOW = ("tensorflow", "tensorflow-cpu", "tf-keras", "keras", "tensorboard")


def test_the_wheel_carries_the_licence_and_a_working_cli(tmp_path: Path) -> None:
    """Built like `pip install` builds it (setuptools, PEP 639 metadata); its console script runs."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("landmark_index-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = archive.read(metadata).decode().splitlines()
        licence = archive.read(next(n for n in names if n.endswith("/licenses/LICENSE"))).decode()
    assert "License-Expression: Apache-2.0" in fields and "License-File: LICENSE" in fields
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert licence == (REPO / "LICENSE").read_text()
    assert {"pipeline/cli/catalog.json", "pipeline/serve/page.html"} <= set(names)  # package data
    requires = [f.split(": ", 1)[1] for f in fields if f.startswith("Requires-Dist: ")]
    base = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("faiss-cpu") for r in base), "the CLI needs faiss without an extra"
    assert not [r for r in base if r.split(">")[0].split("=")[0].strip() in TENSORFLOW]
    target = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    shown = subprocess.run(
        [sys.executable, str(target / "bin" / "landmark-index"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "landmark-index 0.1.0"


def make_dry_run(target: str, tmp_path: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    venvs = [f"VENV={tmp_path / 'venv'}", f"GPU_VENV={tmp_path / 'gpu'}"]
    shown = subprocess.run(
        ["make", "-n", "-C", str(REPO), target, *venvs], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


@pytest.mark.parametrize(
    ("target", "lock"),
    [("demo", "cpu.lock"), ("test", "dev.lock"), ("gpu-check", "gpu.lock")],
)
def test_each_make_target_installs_its_lock(target: str, lock: str, tmp_path: Path) -> None:
    commands = make_dry_run(target, tmp_path)
    assert re.findall(r"--require-hashes -r requirements/(\S+)", commands) == [lock]
    assert "pip install -q --no-deps -e ." in commands  # the project never re-resolves the pins


@pytest.mark.parametrize("lock", ["cpu", "gpu"])
def test_runtime_locks_hold_no_tensorflow(lock: str) -> None:
    """TensorFlow is for convert-weights only: not in `make demo` (cpu.lock) nor the image (gpu.lock)."""
    text = (REPO / "requirements" / f"{lock}.lock").read_text()
    pinned = {name.lower() for name in re.findall(r"^([A-Za-z0-9_.-]+)==", text, flags=re.MULTILINE)}
    assert pinned and not pinned & set(TENSORFLOW)
    assert "tensorflow" in (REPO / "requirements" / "dev.lock").read_text()  # the check can see one


def image_pip_check() -> str:
    """The Dockerfile's shell step after installing the project: its `pip check` and the filter on it."""
    text = re.sub(r"\s*\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    (step,) = [line for line in text.splitlines() if line.startswith("RUN") and "pip check" in line]
    return step.split("pip install --no-cache-dir --no-deps . && ", 1)[1]


@pytest.mark.parametrize(
    ("report", "ok"),
    [
        ("No broken requirements found.", True),
        ("landmark-index 0.1.0 requires faiss-cpu, which is not installed.", True),
        (
            "landmark-index 0.1.0 requires faiss-cpu, which is not installed.\nray 2.60.0 requires aiohttp.",
            False,
        ),
        ("torch 2.13.0 has requirement numpy<3, but you have numpy 3.1.", False),
        ("landmark-index 0.1.0 requires faiss-gpu, which is not installed.", False),
    ],
)
def test_image_pip_check_allows_only_faiss_gpu_in_place_of_faiss_cpu(
    report: str, ok: bool, tmp_path: Path
) -> None:
    """gpu.lock swaps faiss-cpu for faiss-gpu; every other broken requirement must still fail the build."""
    fake_pip = tmp_path / "pip"
    fake_pip.write_text(
        f"#!/bin/sh\ncat <<'EOF'\n{report}\nEOF\n[ {int(ok and 'No broken' in report)} = 1 ]\n"
    )
    fake_pip.chmod(0o755)
    checked = subprocess.run(
        ["sh", "-c", image_pip_check()],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert (checked.returncode == 0) is ok, checked.stderr
