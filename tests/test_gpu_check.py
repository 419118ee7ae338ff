"""`make gpu-check` (benchmarks/gpu_check.py): the script runs end to end here at toy sizes on the CPU and
writes its JSON; without a GPU the real check says why in one line and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env
    )


def test_tiny_check_writes_every_figure(tmp_path: Path, ray_cluster: str) -> None:
    out = tmp_path / "figures" / "gpu-check.json"
    checked = run_check("--tiny", "--out", str(out), "--address", ray_cluster)
    assert checked.returncode == 0, checked.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["tiny"] is True and figures["machine"]["device"] == "cpu"
    extraction = figures["extraction"]
    assert extraction["preset"] == "cpu-small" and extraction["model_only_images"] == 4
    assert extraction["end_to_end_images"] == 6  # every manifest row went through decode → actor → store
    assert extraction["model_only_images_per_s"]["fp32"] > 0 and extraction["end_to_end_images_per_s"] > 0
    rerank = figures["rerank"]
    assert (rerank["candidates"], rerank["features"]) == (3, 300) and rerank["ms_per_query"] > 0
    index = figures["faiss"]
    assert index["gpu"] is False and index["vectors"] == 4000 and index["index"] == "IVF16,PQ8"
    assert min(index["kmeans_s"], index["add_s"], index["search_queries_per_s"]) > 0
    assert figures["total_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the real check would run")
def test_without_a_gpu_the_check_says_why_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    checked = run_check("--out", str(out))
    assert checked.returncode == 0, checked.stderr
    (line,) = checked.stdout.splitlines()
    assert line.startswith("gpu-check skipped: no CUDA GPU visible")
    assert not out.exists()
