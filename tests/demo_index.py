"""A tiny versioned demo index (2 views of each demo photo, the demo's ImageNet
MobileNetV2 from ../shared) for the query and service tests.

The service fixture runs it on a local Ray Serve.

Two versions are built once per session: v000001 indexes every photo, v000002 one photo fewer. LATEST is put
back on v000001, so a test can publish v000002 itself (a hot swap without an extraction in the test).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import versions
from pipeline.demo import SHARED_WEIGHTS, make_demo_dataset
from pipeline.reindex import ReindexConfig, reindex
from pipeline.serve.app import build_app
from pipeline.serve.settings import ServeSettings

DROPPED = "retina"  # the photo v000002 no longer indexes


@dataclass(frozen=True)
class DemoIndex:
    root: str  # versioned root; LATEST = v000001 at the start of every test
    data: Path  # the demo dataset folder (images/, index.parquet, queries.parquet)

    def photo(self, image_id: str) -> Path:
        return self.data / "images" / f"{image_id}.jpg"


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory, ray_cluster) -> DemoIndex:
    data = tmp_path_factory.mktemp("demo-data")
    dataset = make_demo_dataset(str(data), views=2)
    root = str(tmp_path_factory.mktemp("demo-root"))
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} is absent: a random-init model cannot be loaded again by a query")
    config = ReindexConfig(preset="delg-mobilenetv2-imagenet", weights_url=str(SHARED_WEIGHTS), shard_size=8)
    reindex(dataset.index_manifest, root, config, ray_address=ray_cluster)
    table = pq.read_table(dataset.index_manifest)
    kept = table.filter(pa.array([not i.startswith(DROPPED) for i in table.column("id").to_pylist()]))
    smaller = str(data / "index-v2.parquet")
    pq.write_table(kept, smaller)
    reindex(smaller, root, config, ray_address=ray_cluster)
    return DemoIndex(root, data)


@pytest.fixture
def demo_root(demo_index: DemoIndex) -> DemoIndex:
    """The demo index with v000001 live."""
    versions.publish(demo_index.root, versions.version_name(1))
    return demo_index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(root: str, **changes) -> ServeSettings:
    # 2 CPUs in the test cluster: 1 for extraction, half each for search and verification; 2 torch threads
    # like this process (tests/conftest.py), so float sums run in the same order; one replica each (no CPU
    # for more); 8 requests in flight: the swap's 8 clients fit, the overload test's 16 do not
    return ServeSettings(
        index=root,
        poll_s=0.2,
        max_upload_bytes=200_000,
        max_pixels=2_000_000,
        extractor_threads=2,
        max_extractors=1,
        max_searchers=1,
        max_verifiers=1,
        max_gateways=1,
        max_in_flight=8,
        **changes,
    )


@pytest.fixture(scope="module")
def service(demo_index, ray_cluster):
    """The service on the demo index (v000001 live) at a free port; shut down after the module (its replicas
    hold the test cluster's CPUs)."""
    from ray import serve

    versions.publish(demo_index.root, versions.version_name(1))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_settings(demo_index.root)), name="landmark-index", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", demo_index
    finally:
        serve.shutdown()
