"""Run metrics, exported with ``ray.util.metrics``: each Ray node's metrics agent serves them to Prometheus
(``ray_landmark_index_*`` on the node's metrics export port; k8s/monitoring/ holds the Grafana dashboard).

Every metric is declared once in :data:`METRICS` (name → kind, description, tag keys); stages record with
:func:`count` (counters: Prometheus' ``rate()`` turns them into per-second figures) and :func:`gauge`. A new
figure (e.g. re-ranking's pairs) is one row here and one call where it happens::

    metrics.count("images", n, stage="extract")
    metrics.gauge("queue_depth", len(in_flight), stage="extract", queue="extracting")

Recording never imports Ray and does nothing in a process that is not connected to Ray (a plain library
call), so no stage needs a branch for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "landmark_index_"  # Ray adds "ray_" in the Prometheus export


@dataclass(frozen=True)
class Metric:
    kind: Literal["counter", "gauge"]
    description: str
    tags: tuple[str, ...]


METRICS = {
    "images": Metric("counter", "Images a stage finished (descriptors or an error record).", ("stage",)),
    "image_errors": Metric("counter", "Images that failed, by reason (error records).", ("stage", "reason")),
    "bytes_read": Metric("counter", "Bytes of images read from storage.", ()),
    "storage_retries": Metric(
        "counter", "Storage calls retried after a transient error (pipeline.storage).", ()
    ),
    "queue_depth": Metric("gauge", "Work items waiting in one of a stage's queues.", ("stage", "queue")),
    "vectors_added": Metric("counter", "Vectors added to an index.", ("stage",)),
    "build_step": Metric("gauge", "The index build's step (0 train, 1 add, 2 merge and recall, 3 done).", ()),
}

_objects: dict[str, Any] = {}  # this process's ray.util.metrics objects, created on first use


def count(name: str, value: float = 1, **tags: str) -> None:
    """Add ``value`` to the counter ``name`` (declared in :data:`METRICS`) under ``tags``."""
    if value:
        _record(name, "counter", value, tags)


def gauge(name: str, value: float, **tags: str) -> None:
    """Set the gauge ``name`` (declared in :data:`METRICS`) under ``tags`` to ``value``."""
    _record(name, "gauge", value, tags)


def _record(name: str, kind: str, value: float, tags: dict[str, str]) -> None:
    metric = METRICS[name]
    if metric.kind != kind or set(tags) != set(metric.tags):
        raise ValueError(
            f"metric {name} is a {metric.kind} with tags {metric.tags}; got {kind} {sorted(tags)}"
        )
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    recorder = _objects.get(name) or _objects.setdefault(name, _create(name, metric))
    if kind == "counter":
        recorder.inc(value, tags=tags)
    else:
        recorder.set(value, tags=tags)


def _create(name: str, metric: Metric) -> Any:
    from ray.util import metrics

    kind = metrics.Counter if metric.kind == "counter" else metrics.Gauge
    return kind(PREFIX + name, description=metric.description, tag_keys=metric.tags)
