"""Run metrics (pipeline/metrics.py): recorded by a real extraction on a local Ray, read back from Ray's metrics
export endpoint (what Prometheus scrapes), and the shipped Grafana dashboard queries only metrics that exist."""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from pipeline import metrics
from pipeline.config import get_preset
from pipeline.extraction import ClusterOptions, ExtractionJob, run_extraction

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "monitoring" / "landmark-index-dashboard.json"
SAMPLE = re.compile(r"^(ray_landmark_index_\w+)\{(.*)\} (\S+)$")


def exported(port: int) -> Counter[tuple[str, frozenset[tuple[str, str]]]]:
    """Our metrics on Ray's export endpoint, summed over workers: (name, our tags) → value."""
    values: Counter[tuple[str, frozenset[tuple[str, str]]]] = Counter()
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if match := SAMPLE.match(line):
            name, labels, value = match.groups()
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            ours = frozenset((k, v) for k, v in tags.items() if k in ("stage", "reason", "queue"))
            values[name, ours] += float(value)
    return values


def wait_for(port: int, done, seconds: float = 90) -> Counter:
    """Poll the endpoint until ``done(values)`` (Ray's workers report every few seconds)."""
    deadline = time.monotonic() + seconds
    while not done(values := exported(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return values


def test_an_extraction_records_its_metrics_on_rays_export_endpoint(ray_cluster, tmp_path):
    import ray

    rng = np.random.default_rng(0)
    rows, sizes = [], 0
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        (tmp_path / f"p{i}.jpg").write_bytes(buffer.getvalue())
        sizes += len(buffer.getvalue())
        rows.append({"id": f"p{i}", "url": f"p{i}.jpg"})
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    sizes += len(b"not an image at all")
    rows.append({"id": "broken", "url": "broken.jpg"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    port = ray.nodes()[0]["MetricsExportPort"]
    before = exported(port)
    job = ExtractionJob(str(tmp_path / "manifest.parquet"), str(tmp_path / "store"), get_preset("cpu-small"))
    summary = run_extraction(job, ClusterOptions(address=ray_cluster))
    assert (summary.ok, summary.errors_by_reason) == (3, {"not_an_image": 1})

    images = ("ray_landmark_index_images_total", frozenset({("stage", "extract")}))
    errors = (
        "ray_landmark_index_image_errors_total",
        frozenset({("stage", "extract"), ("reason", "not_an_image")}),
    )
    read = ("ray_landmark_index_bytes_read_total", frozenset())

    def grew(values: Counter) -> bool:
        return all(
            values[key] - before[key] >= want for key, want in ((images, 4), (errors, 1), (read, sizes))
        )

    after = wait_for(port, grew)
    assert after[images] - before[images] >= 4  # rows finished (ok and failed)
    assert after[errors] - before[errors] >= 1
    assert after[read] - before[read] >= sizes  # every image's bytes, the broken one included
    queues = {dict(tags).get("queue") for name, tags in after if name == "ray_landmark_index_queue_depth"}
    assert {"waiting", "extracting", "writing"} <= queues


def test_recording_checks_the_declared_kind_and_tags():
    with pytest.raises(ValueError, match="images is a counter with tags"):
        metrics.gauge("images", 1, stage="extract")
    with pytest.raises(ValueError, match="image_errors is a counter"):
        metrics.count("image_errors", 1, stage="extract")  # the reason tag is missing


def exported_names() -> set[str]:
    """The Prometheus names Ray exports for METRICS: counters get "_total"."""
    return {
        f"ray_{metrics.PREFIX}{name}" + ("_total" if metric.kind == "counter" else "")
        for name, metric in metrics.METRICS.items()
    }


def test_the_dashboard_is_valid_and_queries_only_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert queries and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    named = {name for query in queries for name in re.findall(r"\bray_landmark_index_\w+", query)}
    assert named == exported_names()  # each one exists, and each metric has a panel
    for query in queries:
        assert query.count("(") == query.count(")") and query.count("{") == query.count("}")
        assert set(re.findall(r"\$(\w+)", query)) - {"__rate_interval", "__range"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
